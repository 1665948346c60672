//! [`ZfsProvisioner`]: volumes as zvols under one parent dataset.
//!
//! | catalog | ZFS |
//! | --- | --- |
//! | volume `v` | zvol `<parent>/v` (sparse, `volblocksize` from [`ZfsConfig`], optional compression) |
//! | snapshot `v@s` | snapshot `<parent>/v@s` |
//! | clone of `v@s` as `c` | `<parent>/c` with origin `<parent>/v@s` |
//!
//! Each lifecycle operation is one ZFS operation where ZFS allows it (create, snapshot of several
//! volumes, clone, destroy); the exceptions are spelled out on the methods: a clone larger than its
//! origin is grown after cloning, and deleting a volume destroys its snapshots first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use nvmeof_target::BlockBackend;
use xatastor_core::{
    Capacity, ListedVolume, ProvisionError, SnapshotName, SnapshotRef, Usage, VolumeName, VolumeProvisioner,
    VolumeSpec,
};

use crate::backend::{ZvolBackend, ZvolOptions};
use crate::backoff::Backoff;
use crate::ioctl::ZFS_MAX_DATASET_NAME_LEN;
use crate::resolve::{DeviceResolver, ResolveError};
use crate::zfs::{self, CloneProps, CommandZfs, DatasetKind, LzcConfig, VolumeProps, ZfsOps};

/// Settings of a [`ZfsProvisioner`].
#[derive(Clone, Debug)]
pub struct ZfsConfig {
    /// The dataset the volumes live under, e.g. `tank/xatastor` (must exist).
    pub parent: String,
    /// `volblocksize` of new zvols in bytes (a power of two from 512 to 128 KiB). Sizes must be
    /// multiples of it. Default 16 KiB (the OpenZFS 2.2 default; 2.1's is 8 KiB).
    pub volblocksize: u32,
    /// How long [`VolumeProvisioner::open`] waits for a new zvol's device. Default 10 s.
    pub device_timeout: Duration,
    /// How long [`VolumeProvisioner::delete_volume`] retries a destroy that fails with `Busy`: udev
    /// opens a new zvol briefly to probe it, so a volume deleted right after it was made can be busy
    /// for a moment. A volume that stays busy (open by a host) is reported `Busy` after this. Default
    /// 1 s; zero disables retrying.
    pub busy_retry: Duration,
    /// Where [`ZfsProvisioner::new`] looks for libzfs_core (unused by [`ZfsProvisioner::with_ops`]).
    pub lzc: LzcConfig,
    /// The `zfs` command [`ZfsProvisioner::new`] falls back to and uses for what libzfs_core lacks.
    pub zfs_command: CommandZfs,
}

impl ZfsConfig {
    /// Defaults for volumes under `parent`.
    #[must_use]
    pub fn new(parent: impl Into<String>) -> Self {
        Self {
            parent: parent.into(),
            volblocksize: 16 * 1024,
            device_timeout: Duration::from_secs(10),
            busy_retry: Duration::from_secs(1),
            lzc: LzcConfig::default(),
            zfs_command: CommandZfs::new(),
        }
    }
}

/// Creates, snapshots, clones, resizes and deletes zvols under a parent dataset, and opens them as
/// [`ZvolBackend`]s (see the [module documentation](self)).
#[derive(Debug)]
pub struct ZfsProvisioner {
    parent: String,
    volblocksize: u32,
    busy_retry: Duration,
    ops: Arc<dyn ZfsOps>,
    resolver: DeviceResolver,
}

fn validate_parent(parent: &str) -> Result<(), ProvisionError> {
    let ok = !parent.is_empty()
        && !parent.starts_with('/')
        && !parent.ends_with('/')
        && !parent.contains(['@', '#', ' ', '\0'])
        && parent.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(ProvisionError::InvalidArgument(format!("{parent:?} is not a dataset name (like tank/xatastor)")))
    }
}

fn validate_volblocksize(v: u32) -> Result<(), ProvisionError> {
    if v.is_power_of_two() && (512..=128 * 1024).contains(&v) {
        Ok(())
    } else {
        Err(ProvisionError::InvalidArgument(format!(
            "volblocksize {v} must be a power of two from 512 to 131072"
        )))
    }
}

fn validate_compression(c: &str) -> Result<(), ProvisionError> {
    if !c.is_empty()
        && c.len() <= 32
        && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Ok(())
    } else {
        Err(ProvisionError::InvalidArgument(format!(
            "{c:?} is not a ZFS compression name (like lz4, zstd, off)"
        )))
    }
}

fn validate_spec(spec: &VolumeSpec) -> Result<(), ProvisionError> {
    if !matches!(spec.block_size, 512 | 4096) {
        return Err(ProvisionError::InvalidArgument(format!(
            "block size must be 512 or 4096, not {}",
            spec.block_size
        )));
    }
    if spec.size_bytes == 0 || spec.size_bytes % u64::from(spec.block_size) != 0 {
        return Err(ProvisionError::InvalidArgument(format!(
            "size {} must be a positive multiple of the block size {}",
            spec.size_bytes, spec.block_size
        )));
    }
    if let Some(c) = &spec.compression {
        validate_compression(c)?;
    }
    Ok(())
}

fn check_multiple(what: &str, size: u64, volblocksize: u64) -> Result<(), ProvisionError> {
    if volblocksize != 0 && size % volblocksize != 0 {
        return Err(ProvisionError::InvalidArgument(format!(
            "{what} size {size} must be a multiple of the volblocksize {volblocksize}"
        )));
    }
    Ok(())
}

impl ZfsProvisioner {
    /// A provisioner using libzfs_core if it loads, else the `zfs` command (see [`zfs::detect`]).
    ///
    /// Fails with `Backend("ZFS is not available: …")` when neither works, and with
    /// `InvalidArgument` for a bad parent name or volblocksize.
    pub fn new(config: ZfsConfig) -> Result<Self, ProvisionError> {
        let ops = zfs::detect(&config.lzc, &config.zfs_command)?;
        tracing::info!(implementation = ops.implementation(), parent = %config.parent, "ZFS control path");
        Self::with_ops(config, ops)
    }

    /// A provisioner on an explicit control path (a fake in tests, or a chosen implementation).
    pub fn with_ops(config: ZfsConfig, ops: Arc<dyn ZfsOps>) -> Result<Self, ProvisionError> {
        validate_parent(&config.parent)?;
        validate_volblocksize(config.volblocksize)?;
        Ok(Self {
            parent: config.parent,
            volblocksize: config.volblocksize,
            busy_retry: config.busy_retry,
            ops,
            resolver: DeviceResolver::new().with_timeout(config.device_timeout),
        })
    }

    /// Replaces the device resolver (other `/dev` and `/sys` roots, timeouts).
    #[must_use]
    pub fn with_resolver(mut self, resolver: DeviceResolver) -> Self {
        self.resolver = resolver;
        self
    }

    /// The control path in use.
    #[must_use]
    pub fn ops(&self) -> &Arc<dyn ZfsOps> {
        &self.ops
    }

    /// The parent dataset.
    #[must_use]
    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// The dataset of a volume: `<parent>/<name>`.
    pub fn dataset(&self, name: &VolumeName) -> Result<String, ProvisionError> {
        Self::checked_len(format!("{}/{}", self.parent, name))
    }

    /// The dataset of a snapshot: `<parent>/<volume>@<snapshot>`.
    pub fn snapshot_dataset(&self, s: &SnapshotRef) -> Result<String, ProvisionError> {
        Self::checked_len(format!("{}/{}@{}", self.parent, s.volume, s.snapshot))
    }

    fn checked_len(name: String) -> Result<String, ProvisionError> {
        if name.len() >= ZFS_MAX_DATASET_NAME_LEN {
            return Err(ProvisionError::InvalidArgument(format!(
                "{name} is longer than ZFS allows ({} bytes)",
                ZFS_MAX_DATASET_NAME_LEN - 1
            )));
        }
        Ok(name)
    }

    /// `<parent>/x` → `x`; other names stay whole (dependents outside the parent).
    fn relative<'a>(&self, dataset: &'a str) -> &'a str {
        dataset
            .strip_prefix(self.parent.as_str())
            .and_then(|r| r.strip_prefix('/'))
            .filter(|r| !r.contains('/'))
            .unwrap_or(dataset)
    }

    /// `<parent>/v@s` as a [`SnapshotRef`], if it is one of ours with valid names.
    fn snapshot_ref(&self, dataset: &str) -> Option<SnapshotRef> {
        let (volume, snapshot) = self.relative(dataset).split_once('@')?;
        if volume.contains('/') {
            return None;
        }
        Some(SnapshotRef {
            volume: VolumeName::new(volume).ok()?,
            snapshot: SnapshotName::new(snapshot).ok()?,
        })
    }

    fn with_relative_dependents(&self, e: ProvisionError, what: String) -> ProvisionError {
        match e {
            ProvisionError::HasDependents { dependents, .. } => ProvisionError::HasDependents {
                what,
                dependents: dependents.iter().map(|d| self.relative(d).to_owned()).collect(),
            },
            other => other,
        }
    }

    /// `destroy`, retried with backoff while it fails with `Busy`, for up to `busy_retry`.
    fn destroy_retrying_busy(&self, dataset: &str) -> Result<(), ProvisionError> {
        let mut backoff = Backoff::new(self.busy_retry, Duration::from_millis(5), Duration::from_millis(100));
        loop {
            match self.ops.destroy(dataset) {
                Err(ProvisionError::Busy(what)) if !backoff.expired() => {
                    tracing::debug!(%what, "busy; retrying the destroy");
                    backoff.wait();
                }
                other => return other,
            }
        }
    }

    fn open_device(
        &self,
        name: &VolumeName,
        dataset: &str,
        block_size: u32,
    ) -> Result<ZvolBackend, ProvisionError> {
        let path =
            match self.resolver.lookup_now(dataset).map_err(|e| ProvisionError::Backend(e.to_string()))? {
                Some(p) => p,
                // Do not wait for the device of a volume that is not there.
                None if !self.ops.exists(dataset)? => return Err(ProvisionError::NotFound(name.to_string())),
                None => self.resolver.resolve(dataset).map_err(|e| match e {
                    ResolveError::TimedOut { .. } => ProvisionError::Backend(e.to_string()),
                    other => ProvisionError::InvalidArgument(other.to_string()),
                })?,
            };
        let backend = ZvolBackend::open_with(&path, ZvolOptions { block_size, direct: true })
            .map_err(|e| ProvisionError::io(format!("opening {} ({dataset})", path.display()), e))?;
        // A stale link must not hand out another volume's data.
        if let Some(actual) = backend.dataset() {
            if actual != dataset {
                return Err(ProvisionError::Backend(format!(
                    "{} is the device of {actual}, not of {dataset}",
                    path.display()
                )));
            }
        }
        Ok(backend)
    }
}

impl VolumeProvisioner for ZfsProvisioner {
    fn kind(&self) -> &'static str {
        "zvol"
    }

    /// The parent dataset.
    fn location(&self) -> String {
        self.parent.clone()
    }

    /// The parent dataset's `used` + `available` and `available` (one `zfs get`).
    fn capacity(&self) -> Result<Option<Capacity>, ProvisionError> {
        let p = self.ops.properties(&self.parent)?;
        Ok(p.available.map(|available| Capacity {
            total_bytes: p.used.saturating_add(available),
            available_bytes: available,
        }))
    }

    /// `lzc_create` / `zfs create -s -V`: a sparse zvol with the configured volblocksize.
    fn create(&self, spec: &VolumeSpec) -> Result<(), ProvisionError> {
        validate_spec(spec)?;
        check_multiple("volume", spec.size_bytes, u64::from(self.volblocksize))?;
        let dataset = self.dataset(&spec.name)?;
        let props = VolumeProps {
            volsize: spec.size_bytes,
            volblocksize: self.volblocksize,
            compression: spec.compression.clone(),
        };
        self.ops.create_volume(&dataset, &props)
    }

    /// One `lzc_snapshot` / `zfs snapshot` of all of them: atomic. At most one snapshot per volume.
    fn snapshot(&self, snapshots: &[SnapshotRef]) -> Result<(), ProvisionError> {
        let unique: BTreeSet<&SnapshotRef> = snapshots.iter().collect();
        let mut volumes = BTreeSet::new();
        for s in &unique {
            if !volumes.insert(&s.volume) {
                return Err(ProvisionError::InvalidArgument(format!(
                    "two snapshots of volume {} in one atomic snapshot",
                    s.volume
                )));
            }
        }
        let names = unique.iter().map(|s| self.snapshot_dataset(s)).collect::<Result<Vec<_>, _>>()?;
        self.ops.snapshot(&names)
    }

    /// Reads the origin's `volsize` (a larger size than the origin's grows the clone, a smaller one is
    /// refused with `Unsupported` before cloning), clones, then sets `volsize` if it grows. If growing
    /// fails, the new clone is destroyed again.
    fn clone_snapshot(&self, origin: &SnapshotRef, new: &VolumeSpec) -> Result<(), ProvisionError> {
        validate_spec(new)?;
        let origin_ds = self.snapshot_dataset(origin)?;
        let dataset = self.dataset(&new.name)?;
        let origin_props = self.ops.properties(&origin_ds).map_err(|e| match e {
            ProvisionError::NotFound(_) => ProvisionError::NotFound(origin.to_string()),
            other => other,
        })?;
        let origin_size = origin_props.volsize.ok_or_else(|| {
            ProvisionError::InvalidArgument(format!("{origin} is not a snapshot of a volume"))
        })?;
        if new.size_bytes < origin_size {
            return Err(ProvisionError::Unsupported(format!(
                "a clone of {origin} must be at least its size {origin_size} bytes, not {}: shrinking a zvol \
                 discards the data beyond the new end",
                new.size_bytes
            )));
        }
        check_multiple("clone", new.size_bytes, origin_props.volblocksize.unwrap_or(0))?;
        let props = CloneProps { compression: new.compression.clone() };
        self.ops.clone_snapshot(&origin_ds, &dataset, &props)?;
        if new.size_bytes > origin_size {
            if let Err(e) = self.ops.set_volsize(&dataset, new.size_bytes) {
                if let Err(undo) = self.ops.destroy(&dataset) {
                    tracing::warn!(%dataset, error = %undo, "could not destroy the clone after failing to grow it");
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// `zfs set volsize`. The same size is a no-op; a smaller one is refused with `InvalidArgument`
    /// unless `allow_shrink` (ZFS then discards the data beyond the new end). Open backends take the
    /// new size over with [`BlockBackend::resize`].
    fn resize(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<(), ProvisionError> {
        let dataset = self.dataset(name)?;
        let props = self.ops.properties(&dataset).map_err(|e| match e {
            ProvisionError::NotFound(_) => ProvisionError::NotFound(name.to_string()),
            other => other,
        })?;
        let current = props
            .volsize
            .ok_or_else(|| ProvisionError::InvalidArgument(format!("{dataset} is not a volume")))?;
        if new_size_bytes == current {
            return Ok(());
        }
        if new_size_bytes < current && !allow_shrink {
            return Err(ProvisionError::InvalidArgument(format!(
                "shrinking {name} from {current} to {new_size_bytes} bytes discards the data beyond the new end; \
                 it must be forced"
            )));
        }
        check_multiple("new", new_size_bytes, props.volblocksize.unwrap_or(0))?;
        self.ops.set_volsize(&dataset, new_size_bytes)
    }

    /// Destroys the volume's snapshots (one `lzc_destroy_snaps`), then the volume. `HasDependents`
    /// (nothing destroyed) while clones depend on one of its snapshots; `Busy` while its device stays
    /// open (after retrying for [`ZfsConfig::busy_retry`]) — in that case its snapshots are already
    /// gone.
    fn delete_volume(&self, name: &VolumeName) -> Result<(), ProvisionError> {
        let dataset = self.dataset(name)?;
        let snapshots = self.ops.snapshots(&dataset).map_err(|e| match e {
            ProvisionError::NotFound(_) => ProvisionError::NotFound(name.to_string()),
            other => other,
        })?;
        if !snapshots.is_empty() {
            self.ops
                .destroy_snapshots(&snapshots)
                .map_err(|e| self.with_relative_dependents(e, name.to_string()))?;
        }
        self.destroy_retrying_busy(&dataset).map_err(|e| match e {
            ProvisionError::NotFound(_) => ProvisionError::NotFound(name.to_string()),
            ProvisionError::Busy(_) => ProvisionError::Busy(name.to_string()),
            other => self.with_relative_dependents(other, name.to_string()),
        })
    }

    /// `NotFound` if it does not exist, else one `lzc_destroy_snaps`; `HasDependents` while clones
    /// depend on it.
    fn delete_snapshot(&self, snapshot: &SnapshotRef) -> Result<(), ProvisionError> {
        let ds = self.snapshot_dataset(snapshot)?;
        if !self.ops.exists(&ds)? {
            return Err(ProvisionError::NotFound(snapshot.to_string()));
        }
        self.ops.destroy_snapshots(&[ds]).map_err(|e| match e {
            ProvisionError::Busy(_) => ProvisionError::Busy(snapshot.to_string()),
            other => self.with_relative_dependents(other, snapshot.to_string()),
        })
    }

    fn exists(&self, name: &VolumeName) -> Result<bool, ProvisionError> {
        self.ops.exists(&self.dataset(name)?)
    }

    fn snapshot_exists(&self, snapshot: &SnapshotRef) -> Result<bool, ProvisionError> {
        self.ops.exists(&self.snapshot_dataset(snapshot)?)
    }

    /// `used`, `referenced`, `logicalused`, `compressratio` and `volsize` (one `zfs get`).
    fn usage(&self, name: &VolumeName) -> Result<Usage, ProvisionError> {
        let dataset = self.dataset(name)?;
        let p = self.ops.properties(&dataset).map_err(|e| match e {
            ProvisionError::NotFound(_) => ProvisionError::NotFound(name.to_string()),
            other => other,
        })?;
        Ok(Usage {
            size_bytes: p.volsize.unwrap_or(0),
            used_bytes: p.used,
            referenced_bytes: p.referenced,
            logical_used_bytes: p.logical_used,
            compress_ratio: p.compress_ratio,
        })
    }

    /// One `zfs list -r` of the parent. Datasets deeper than one level, with names the catalog cannot
    /// hold, or of other types are skipped (with a warning); origins outside the parent are `None`.
    fn list(&self) -> Result<Vec<ListedVolume>, ProvisionError> {
        let entries = self.ops.list(&self.parent)?;
        let mut volumes: BTreeMap<VolumeName, ListedVolume> = BTreeMap::new();
        let mut snapshots: Vec<(VolumeName, SnapshotName)> = Vec::new();
        for e in entries {
            let rel = self.relative(&e.name);
            if rel == e.name {
                continue; // the parent itself, or something deeper
            }
            match e.kind {
                DatasetKind::Volume => {
                    let Ok(name) = VolumeName::new(rel) else {
                        tracing::warn!(dataset = %e.name, "zvol name not usable as a volume name; skipped");
                        continue;
                    };
                    let origin = e.origin.as_deref().and_then(|o| {
                        let r = self.snapshot_ref(o);
                        if r.is_none() {
                            tracing::warn!(dataset = %e.name, origin = o, "origin outside the parent; not recorded");
                        }
                        r
                    });
                    volumes.insert(
                        name.clone(),
                        ListedVolume {
                            name,
                            size_bytes: e.volsize.unwrap_or(0),
                            origin,
                            snapshots: Vec::new(),
                        },
                    );
                }
                DatasetKind::Snapshot => match self.snapshot_ref(&e.name) {
                    Some(s) => snapshots.push((s.volume, s.snapshot)),
                    None => tracing::warn!(snapshot = %e.name, "snapshot name not usable; skipped"),
                },
                DatasetKind::Other => {}
            }
        }
        for (volume, snapshot) in snapshots {
            if let Some(v) = volumes.get_mut(&volume) {
                v.snapshots.push(snapshot);
            }
        }
        Ok(volumes.into_values().collect())
    }

    /// Finds the device (the udev link, or by `BLKZNAME`, waiting up to the configured timeout for a
    /// new zvol; `NotFound` at once for a volume that does not exist) and opens it `O_DIRECT`.
    fn open(&self, name: &VolumeName, block_size: u32) -> Result<Arc<dyn BlockBackend>, ProvisionError> {
        if !matches!(block_size, 512 | 4096) {
            return Err(ProvisionError::InvalidArgument(format!(
                "block size must be 512 or 4096, not {block_size}"
            )));
        }
        let dataset = self.dataset(name)?;
        let backend = self.open_device(name, &dataset, block_size)?;
        Ok(Arc::new(backend))
    }
}

#[cfg(test)]
mod tests;
