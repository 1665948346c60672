//! # xatastor-examples
//!
//! Programs showing how to drive the Xatastor crates, and (arriving with the server and catalog
//! issues) the `xatastor-target` server binary.
//!
//! - [`blocking`]: a thread-per-connection `std::net` driver for the sans-I/O [`nvmeof_target`]
//!   engine, and the `nvmeof-blocking-target` binary built on it, which serves memory or file volumes
//!   on a TCP port to any NVMe/TCP host (the Linux kernel initiator included).
//! - [`tokio_driver`]: the same engine driven from tokio (one task per connection), to show that the
//!   engine is runtime-agnostic.

pub mod admin;
pub mod blocking;
pub mod metrics;
pub mod tokio_driver;
pub mod units;
