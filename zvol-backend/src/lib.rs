//! # zvol-backend
//!
//! ZFS zvols as thin, snapshot-able, clone-able volumes for the Xatastor NVMe/TCP target.
//!
//! **Status: not yet implemented.** This crate currently holds only this description; the backend
//! arrives with the zvol-backend issue. It will hold:
//!
//! ```text
//!            xatastor-core (VolumeProvisioner)     nvmeof-target (BlockBackend)
//!                        │                                   │
//!   control path: libzfs_core (lzc_create,          data path: /dev/zvol/<pool>/<name>,
//!   lzc_snapshot, lzc_clone, lzc_destroy),          O_DIRECT, reads/writes/flush/write-zeroes/
//!   loaded at run time; `zfs` command fallback      discard executed on the worker's io_uring
//! ```
//!
//! - a data path that opens zvol devices `O_DIRECT` and lets the server's io_uring execute reads, writes
//!   (FUA), flushes, write-zeroes and discards (so deallocated blocks return to the pool);
//! - a control path creating sparse zvols with a chosen volblocksize and compression, taking several
//!   snapshots in one transaction, cloning, resizing and destroying them, and reading their space usage.
