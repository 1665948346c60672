//! # xatastor-examples
//!
//! The `xatastor-target` storage-node binary and programs showing how to drive the Xatastor crates.
//!
//! - `xatastor-target` (`src/bin`): a [`xatastor_core::Node`] on the memory, file or zvol backend,
//!   served by the io_uring server, managed through [`xatastor_core::admin`] (request types and
//!   handler) over its Unix socket ([`xatastor_core::admin::socket`]) and, when enabled, over the
//!   network ([`grpc`]: gRPC with TLS client certificates or a bearer token), with Prometheus
//!   [`metrics`] and sizes parsed by [`units`].
//! - `xatastor-csi` (`src/bin`, [`csi`]): the Kubernetes CSI driver — a controller plugin that
//!   places and manages volumes on several storage nodes through their network admin API, and a
//!   node plugin that attaches them with the kernel's NVMe/TCP initiator; manifests in
//!   `examples/kubernetes/`.
//! - [`blocking`]: a thread-per-connection `std::net` driver for the sans-I/O [`nvmeof_target`]
//!   engine, and the `nvmeof-blocking-target` binary built on it, which serves memory or file volumes
//!   on a TCP port to any NVMe/TCP host (the Linux kernel initiator included).
//! - [`systemd`]: readiness and reload notifications, the file descriptor store and the sockets
//!   systemd passes, for running `xatastor-target` as a `Type=notify` service (unit in
//!   `examples/systemd/`).
//! - [`tokio_driver`]: the same engine driven from tokio (one task per connection), to show that the
//!   engine is runtime-agnostic.

pub mod blocking;
pub mod csi;
pub mod grpc;
pub mod metrics;
pub mod node_upgrade;
pub mod systemd;
pub mod tokio_driver;
pub mod units;
