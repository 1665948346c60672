//! # xatastor-benches
//!
//! Criterion benchmarks for the Xatastor crates (`cargo bench -p xatastor-benches`), `nvmf-perf` (an
//! NVMe/TCP load generator in the style of SPDK's `perf`) and `xatastor-scale` (what 10K–1M volumes
//! cost).
//!
//! This library target is empty; the benchmarks live in `benches/`.
