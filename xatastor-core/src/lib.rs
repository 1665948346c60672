//! # xatastor-core
//!
//! The Xatastor storage node: serves 100K–1M mostly idle thin volumes per node over NVMe/TCP, where an
//! idle volume costs its disk space and nothing else.
//!
//! ```text
//!   worker 0 .. worker N-1  (one per core, each: io_uring, SO_REUSEPORT listener, buffer pool)
//!       │  parse ─ decode ─ backend I/O ─ respond, all on the connection's core
//!       ▼
//!   nvmeof-target engine ── BlockBackend (file, memory, zvol)
//!       │  Connect to an unloaded NQN ──▶ SubsystemSource (the Node)
//!       ▼
//!   Node ── Catalog (redb: volumes, snapshots, host index, intents)
//!        └─ VolumeProvisioner (memory, file, zvol): create, snapshot, clone, resize, delete
//! ```
//!
//! - [`server`]: the thread-per-core io_uring server (no busy polling; no per-volume threads,
//!   timers or file descriptors);
//! - [`catalog`] and [`node`]: the persistent catalog (with the backend its volumes live on), the
//!   lifecycle (intent → backend operation → commit, reconciled after a crash), the shrink rule,
//!   editable host access, capacity and the overcommit limit, lazy activation on Connect, idle
//!   unload, discovery from the host index;
//! - [`secrets`]: DH-HMAC-CHAP host authentication — per-volume requirement, secrets per (volume,
//!   host) in a private directory (0700, files 0600), read when a volume is loaded, rotated without
//!   dropping connected hosts, never logged;
//! - [`provision`] and [`provisioners`]: the provisioner trait, memory and file implementations;
//! - [`ratelimit`]: warnings a host can trigger over and over, logged once per interval;
//! - [`admin`]: the admin API (requests, typed responses, one handler) that the local socket, the
//!   network (gRPC) service and other programs share.
//!
//! Embedding a node (memory volumes, one worker):
//!
//! ```no_run
//! use std::sync::Arc;
//! use nvmeof_target::{Target, TargetConfig};
//! use xatastor_core::provisioners::MemoryProvisioner;
//! use xatastor_core::{CreateVolume, Node, NodeConfig, Server, ServerConfig};
//!
//! let target = Target::new(TargetConfig::default());
//! let node = Node::open(NodeConfig::new("/tmp/x/catalog.redb"), Arc::new(MemoryProvisioner::new()), target.clone())?;
//! let mut volume = CreateVolume::new("vol1", 1 << 30);
//! volume.allowed_hosts.push("nqn.2014-08.org.nvmexpress:uuid:my-host".into());
//! node.create_volume(volume)?;
//! let server = Server::start(target, ServerConfig::new("127.0.0.1:4420".parse()?))?;
//! println!("connect to {}", node.nqn_of("vol1"));
//! # server.shutdown()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

pub mod admin;
pub mod aligned;
pub mod catalog;
mod handover;
pub mod node;
pub mod provision;
pub mod provisioners;
pub mod ratelimit;
pub mod secrets;
pub mod server;
mod stream;
pub mod upgrade;

pub use node::{
    CreateVolume, IoTotals, Node, NodeCapacity, NodeConfig, NodeError, NodeStats, VolumeAuthOptions,
    VolumeInfo,
};
pub use nvmeof_target::auth::{DhchapHash, DhchapSecret, HostSecrets};
pub use provision::{
    Capacity, ListedVolume, ProvisionError, SnapshotName, SnapshotRef, Usage, VolumeName, VolumeProvisioner,
    VolumeSpec,
};
pub use secrets::{HostAuth, SecretParams, SecretsError, VolumeAuth};
pub use server::{raise_open_file_limit, Server, ServerConfig, WorkerStats};
