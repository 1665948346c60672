//! # xatastor-benches
//!
//! Criterion benchmarks for the Xatastor crates (`cargo bench -p xatastor-benches`) and, arriving with the
//! server issue, an NVMe/TCP load generator in the style of SPDK's `perf`.
//!
//! This library target is empty; the benchmarks live in `benches/`.
