//! # xatastor-core
//!
//! The Xatastor storage node: serves 100K–1M mostly idle thin volumes per node over NVMe/TCP, where an
//! idle volume costs its disk space and nothing else.
//!
//! **Status: early.** [`server`] holds a first version of the io_uring server (connections, timers
//! and wake-ups on the ring; backend I/O still synchronous on the worker); the catalog and the
//! lifecycle arrive with their issues. The crate will hold:
//!
//! ```text
//!   worker 0 .. worker N-1  (one per core, each: io_uring, SO_REUSEPORT listener, buffer pool)
//!       │  parse ─ decode ─ backend I/O ─ respond, all on the connection's core
//!       ▼
//!   nvmeof-target engine ── BlockBackend (file, memory, zvol)
//!       │
//!   volume catalog (embedded transactional store) ── VolumeProvisioner (create, snapshot, clone,
//!                                                   resize, delete)
//! ```
//!
//! - a thread-per-core io_uring server that drives the `nvmeof-target` engine: no busy polling, no
//!   per-volume threads, timers or file descriptors;
//! - a persistent volume catalog with intent → backend operation → commit lifecycle steps that reconcile
//!   after a crash, lazy activation of volumes on Connect, and a host → volumes index for discovery.

pub mod catalog;
pub mod node;
pub mod provision;
pub mod provisioners;
pub mod server;

pub use node::{CreateVolume, Node, NodeConfig, NodeError, NodeStats, VolumeInfo};
pub use provision::{
    ListedVolume, ProvisionError, SnapshotName, SnapshotRef, Usage, VolumeName, VolumeProvisioner, VolumeSpec,
};
pub use server::{Server, ServerConfig, WorkerStats};
