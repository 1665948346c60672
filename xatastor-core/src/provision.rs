//! Volume lifecycle on a storage backend: the [`VolumeProvisioner`] trait.
//!
//! A provisioner creates, snapshots, clones, resizes and deletes volumes on one storage backend
//! (memory, files in a directory, a ZFS pool) and opens a volume as a [`BlockBackend`] when a host
//! connects. It is the *backend operation* step of the catalog's intent → operation → commit
//! sequence, so every call must be safe to repeat after a crash:
//!
//! - `create`/`clone_snapshot` of a volume that already exists with the requested size report
//!   [`ProvisionError::AlreadyExists`]; the catalog uses [`VolumeProvisioner::exists`] to tell a
//!   finished step from a missing one when it reconciles.
//! - `delete_volume`/`delete_snapshot` of something that is not there report
//!   [`ProvisionError::NotFound`], which the catalog treats as done.
//! - `snapshot` takes several snapshots atomically (all or none).
//!
//! Names are validated [`VolumeName`]s and [`SnapshotName`]s; how they map onto the backend
//! (a path, a dataset under a parent dataset) is the provisioner's business.
//!
//! **Shrinking** destroys the data beyond the new end. A provisioner shrinks only when
//! [`VolumeProvisioner::resize`] is called with `allow_shrink` (the node does that only for a forced
//! resize of a volume no host is connected to) and refuses a smaller size otherwise.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

use std::fmt;
use std::io;
use std::sync::Arc;

use nvmeof_target::BlockBackend;

/// Longest volume or snapshot name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A validated volume name: 1–128 bytes of `[A-Za-z0-9_.:-]`, not starting with `.` or `-`.
///
/// The character set is the intersection of what ZFS dataset components, file names and NQN suffixes
/// accept, so one name works on every backend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

/// A validated snapshot name (same rules as [`VolumeName`]), local to its volume.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotName(String);

fn validate(kind: &str, s: &str) -> Result<(), ProvisionError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(ProvisionError::InvalidArgument(format!(
            "{kind} name must be 1-{MAX_NAME_LEN} bytes, got {}",
            s.len()
        )));
    }
    if s.starts_with(['.', '-']) {
        return Err(ProvisionError::InvalidArgument(format!(
            "{kind} name {s:?} must not start with '.' or '-'"
        )));
    }
    if let Some(c) = s.chars().find(|&c| !ok_char(c)) {
        return Err(ProvisionError::InvalidArgument(format!(
            "{kind} name {s:?} contains {c:?}; allowed: letters, digits, '_', '.', ':', '-'"
        )));
    }
    Ok(())
}

impl VolumeName {
    /// Validates `s` as a volume name.
    pub fn new(s: impl Into<String>) -> Result<Self, ProvisionError> {
        let s = s.into();
        validate("volume", &s)?;
        Ok(Self(s))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl SnapshotName {
    /// Validates `s` as a snapshot name.
    pub fn new(s: impl Into<String>) -> Result<Self, ProvisionError> {
        let s = s.into();
        validate("snapshot", &s)?;
        Ok(Self(s))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A snapshot of a volume: `volume@snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotRef {
    /// The volume the snapshot was taken of.
    pub volume: VolumeName,
    /// The snapshot's name.
    pub snapshot: SnapshotName,
}

impl fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// The new volume's name.
    pub name: VolumeName,
    /// Size in bytes, a multiple of `block_size`.
    pub size_bytes: u64,
    /// Logical block size exposed to hosts: 512 or 4096.
    pub block_size: u32,
    /// Compression algorithm where the backend has one (ZFS: `lz4`, `zstd`, `off`, …); `None` keeps
    /// the backend's default. Backends without compression reject `Some`.
    pub compression: Option<String>,
}

/// Space used by a volume, as the backend reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Provisioned size in bytes.
    pub size_bytes: u64,
    /// Bytes of backend storage this volume holds (ZFS `used`; allocated blocks of a sparse file).
    pub used_bytes: u64,
    /// Bytes referenced, shared with snapshots/origin included (ZFS `referenced`); `used_bytes` where
    /// the backend does not tell them apart.
    pub referenced_bytes: u64,
    /// Bytes written before compression (ZFS `logicalused`); `used_bytes` without compression.
    pub logical_used_bytes: u64,
    /// Compression ratio (ZFS `compressratio`); 1.0 without compression.
    pub compress_ratio: f64,
}

/// A volume as the backend sees it (for adoption and reconciliation, not for the start path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedVolume {
    /// Its name.
    pub name: VolumeName,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// The snapshot it was cloned from, if any.
    pub origin: Option<SnapshotRef>,
    /// Its snapshots.
    pub snapshots: Vec<SnapshotName>,
}

/// The space of a backend's storage pool (the file system of a directory, the ZFS dataset, the
/// machine's memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    /// Size of the pool in bytes (used + available).
    pub total_bytes: u64,
    /// Bytes still available for writes.
    pub available_bytes: u64,
}

/// Errors of lifecycle operations, typed so callers (and the admin CLI) can react to each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProvisionError {
    /// The volume or snapshot exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The volume or snapshot does not exist.
    #[error("{0} does not exist")]
    NotFound(String),
    /// The volume is in use (open by a host, being changed) and the operation was not forced.
    #[error("{0} is busy")]
    Busy(String),
    /// The backend is out of space.
    #[error("no space left for {0}")]
    NoSpace(String),
    /// The snapshot (or volume) has clones or snapshots depending on it; delete those first.
    #[error("{what} has dependents: {dependents:?}")]
    HasDependents {
        /// What was to be deleted.
        what: String,
        /// The volumes/snapshots that depend on it.
        dependents: Vec<String>,
    },
    /// The backend cannot do this at all (reflink on a filesystem without it, shrink on ZFS, …).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// An argument is invalid (name, size, block size, compression).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An I/O error from the backend.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Any other backend failure, with the backend's own message.
    #[error("{0}")]
    Backend(String),
}

impl ProvisionError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io { context: context.into(), source }
    }
}

/// Creates, snapshots, clones, resizes, deletes and opens volumes on one storage backend.
///
/// Implementations must be thread-safe; calls for different volumes may run concurrently, and the
/// catalog serialises calls for the same volume. See the module documentation for the idempotency
/// rules the catalog's crash recovery relies on.
pub trait VolumeProvisioner: Send + Sync + fmt::Debug {
    /// A short name of the backend kind (`memory`, `file`, `zvol`).
    fn kind(&self) -> &'static str;

    /// Where on its backend this provisioner keeps volumes: the parent dataset (zvol), the directory
    /// (file, an absolute path), or empty (memory). Recorded in the catalog with [`Self::kind`] and
    /// checked at every start, so that a catalog is never served from another backend.
    fn location(&self) -> String {
        String::new()
    }

    /// Whether volumes outlive the process (memory: no). The node forgets a non-durable backend's
    /// volumes at its next start instead of reporting them ready.
    fn durable(&self) -> bool {
        true
    }

    /// The space of the pool the volumes are made in, if the backend can tell.
    fn capacity(&self) -> Result<Option<Capacity>, ProvisionError> {
        Ok(None)
    }

    /// Creates a thin (sparse) volume.
    fn create(&self, spec: &VolumeSpec) -> Result<(), ProvisionError>;

    /// Takes all `snapshots` in one atomic step (all or none), without pausing I/O on the volumes.
    fn snapshot(&self, snapshots: &[SnapshotRef]) -> Result<(), ProvisionError>;

    /// Creates volume `new` as a writable copy-on-write clone of `origin`. `new.size_bytes` is the
    /// origin's size; a larger size grows the clone after cloning.
    fn clone_snapshot(&self, origin: &SnapshotRef, new: &VolumeSpec) -> Result<(), ProvisionError>;

    /// Sets the volume's size. A smaller size is refused with [`ProvisionError::InvalidArgument`]
    /// unless `allow_shrink`; with it, the data beyond the new end is gone (and reads as zeros if
    /// the volume grows again). Callers shrink only volumes that no host has open.
    fn resize(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<(), ProvisionError>;

    /// Deletes a volume. Fails with [`ProvisionError::HasDependents`] while it has snapshots that
    /// clones depend on; its other snapshots go with it.
    fn delete_volume(&self, name: &VolumeName) -> Result<(), ProvisionError>;

    /// Deletes a snapshot. Fails with [`ProvisionError::HasDependents`] while clones depend on it.
    fn delete_snapshot(&self, snapshot: &SnapshotRef) -> Result<(), ProvisionError>;

    /// Whether the volume exists (used to reconcile after a crash).
    fn exists(&self, name: &VolumeName) -> Result<bool, ProvisionError>;

    /// Whether the snapshot exists (used to reconcile after a crash).
    fn snapshot_exists(&self, snapshot: &SnapshotRef) -> Result<bool, ProvisionError>;

    /// Space used by the volume.
    fn usage(&self, name: &VolumeName) -> Result<Usage, ProvisionError>;

    /// Every volume the backend holds, with snapshots and origins. Expensive on big backends: for
    /// adoption of existing volumes and for consistency checks, never on the start path.
    fn list(&self) -> Result<Vec<ListedVolume>, ProvisionError>;

    /// Opens the volume for I/O (on a host's Connect). `block_size` is the catalog's block size.
    fn open(&self, name: &VolumeName, block_size: u32) -> Result<Arc<dyn BlockBackend>, ProvisionError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(VolumeName::new("pg-branch_42.v1:a").is_ok());
        assert!(VolumeName::new("").is_err());
        assert!(VolumeName::new("-x").is_err());
        assert!(VolumeName::new(".x").is_err());
        assert!(VolumeName::new("a/b").is_err());
        assert!(VolumeName::new("a@b").is_err());
        assert!(VolumeName::new("x".repeat(MAX_NAME_LEN)).is_ok());
        assert!(VolumeName::new("x".repeat(MAX_NAME_LEN + 1)).is_err());
        let e = SnapshotName::new("a b").unwrap_err();
        assert!(e.to_string().contains("' '"), "{e}");
    }
}
