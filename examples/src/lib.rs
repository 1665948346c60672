//! # xatastor-examples
//!
//! The `xatastor-target` storage-node binary and programs showing how to drive the Xatastor crates.
//!
//! - `xatastor-target` (`src/bin`): a [`xatastor_core::Node`] on the memory, file or zvol backend,
//!   served by the io_uring server, managed through [`admin`] (request types and handler) over its
//!   Unix socket ([`admin::socket`]), with Prometheus [`metrics`] and sizes parsed by [`units`].
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
