//! # zvol-backend
//!
//! ZFS zvols as thin, snapshot-able, clone-able volumes for the Xatastor NVMe/TCP target: a
//! [`BlockBackend`](nvmeof_target::BlockBackend) for the data path and a
//! [`VolumeProvisioner`](xatastor_core::VolumeProvisioner) for the control path.
//!
//! ## Design
//!
//! ```text
//!     xatastor-core catalog                         nvmeof-target engine / io_uring server
//!            │ VolumeProvisioner                               │ BlockBackend
//!            ▼                                                 ▼
//!   ZfsProvisioner ── open() ── DeviceResolver ──▶ ZvolBackend  (/dev/zvol/<pool>/<vol>, O_DIRECT)
//!            │                  (udev link, or        │ raw_device(): the worker's ring runs reads,
//!            │ ZfsOps            BLKZNAME over        │ writes (FUA = RWF_DSYNC) and flushes itself
//!            ▼                   /sys/block/zd*)      │ execute(): blocking path, write zeroes,
//!   LzcZfs ─ dlopen libzfs_core.so.3 (lzc_create,     │ deallocate (fallocate / BLKDISCARD)
//!   │        lzc_snapshot, lzc_clone, lzc_destroy…)   ▼
//!   └ CommandZfs ─ `zfs` (fallback; set volsize,     zvol: ZIL commit on flush/FUA, freed blocks
//!                  properties, listings)             return to the pool on deallocate
//! ```
//!
//! - **Data path** ([`ZvolBackend`]): the zvol's device opened `O_DIRECT`. A driver with an io_uring
//!   takes the descriptor from `raw_device()` (`direct: true`, `alignment` = the logical block size)
//!   and runs reads, writes and flushes on its ring with the PDUs' buffers. [`ZvolBackend::execute`]
//!   does the same synchronously for drivers without a ring, through aligned bounce buffers
//!   ([`AlignedBuf`], handed to the engine with `Bytes::from_owner`, no copy for reads), and carries
//!   out Write Zeroes and Deallocate so that freed blocks go back to the pool.
//! - **Device resolution** ([`DeviceResolver`]): `/dev/zvol/<dataset>` is made by udev, some time after
//!   the zvol exists; the resolver polls for it with backoff and, if it is late, finds the `zdN` device
//!   by asking each its dataset name (`BLKZNAME`).
//! - **Control path** ([`zfs::ZfsOps`]): libzfs_core loaded at run time ([`LzcZfs`]; the crate needs
//!   no ZFS to build), the `zfs` command as fallback ([`CommandZfs`]), errors typed as
//!   [`ProvisionError`](xatastor_core::ProvisionError)s.
//! - **Provisioner** ([`ZfsProvisioner`]): volumes are sparse zvols `<parent>/<name>`, snapshots
//!   `<parent>/<name>@<snap>`; several snapshots are one transaction; clones can be larger than their
//!   origin (grown after cloning) but not smaller.
//!
//! ## Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use nvmeof_target::{execute_blocking, BlockBackend, IoOp};
//! use xatastor_core::{VolumeName, VolumeProvisioner, VolumeSpec};
//! use zvol_backend::{ZfsConfig, ZfsProvisioner};
//!
//! // libzfs_core if it loads, else the zfs command.
//! let zfs = ZfsProvisioner::new(ZfsConfig::new("tank/xatastor"))?;
//! let name = VolumeName::new("pg-main")?;
//! zfs.create(&VolumeSpec { name: name.clone(), size_bytes: 10 << 30, block_size: 4096, compression: Some("lz4".into()) })?;
//! let backend: Arc<dyn BlockBackend> = zfs.open(&name, 4096)?;
//! execute_blocking(backend.as_ref(), IoOp::Write { offset: 0, data: vec![1u8; 4096].into(), fua: true })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A regular file or any block device works as a [`ZvolBackend`] too (that is how the data path is
//! tested without ZFS):
//!
//! ```
//! use nvmeof_target::{execute_blocking, BlockBackend, IoOp, IoOutput};
//! use zvol_backend::ZvolBackend;
//!
//! let file = tempfile::NamedTempFile::new()?;
//! file.as_file().set_len(1 << 20)?;
//! let vol = ZvolBackend::open(file.path(), 4096)?;
//! execute_blocking(&vol, IoOp::Write { offset: 8192, data: vec![7u8; 4096].into(), fua: false })?;
//! let IoOutput::Data(back) = execute_blocking(&vol, IoOp::Read { offset: 8192, len: 4096 })? else { panic!() };
//! assert_eq!(back.to_bytes(), vec![7u8; 4096]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

pub mod backend;
mod backoff;
mod ioctl;
pub mod provisioner;
pub mod resolve;
pub mod zfs;

pub use backend::{ZvolBackend, ZvolOptions};
pub use ioctl::{zvol_dataset_name, ZFS_MAX_DATASET_NAME_LEN};
pub use provisioner::{ZfsConfig, ZfsProvisioner};
pub use resolve::{DeviceResolver, ResolveError};
pub use xatastor_core::aligned::AlignedBuf;
pub use zfs::{CommandZfs, LzcConfig, LzcZfs, ZfsOps};
