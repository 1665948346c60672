//! The ZFS control path: [`ZfsOps`], the handful of dataset operations the provisioner needs, and its
//! two implementations.
//!
//! | operation | [`LzcZfs`] (libzfs_core, dlopen) | [`CommandZfs`] (`zfs` command) |
//! | --- | --- | --- |
//! | create a sparse zvol | `lzc_create` | `zfs create -s -V` |
//! | snapshot several datasets at once | `lzc_snapshot` (one transaction) | `zfs snapshot a@x b@y` (one transaction) |
//! | clone | `lzc_clone` | `zfs clone` |
//! | destroy a volume / snapshots | `lzc_destroy` / `lzc_destroy_snaps` | `zfs destroy` |
//! | exists | `lzc_exists` | `zfs list` |
//! | set volsize, read properties, list | `zfs set` / `zfs get` / `zfs list` (libzfs_core 2.1 has no such calls) | same |
//!
//! [`detect`] picks libzfs_core when it loads and initialises, else the `zfs` command, else fails with
//! "ZFS is not available: …". All operations report [`ProvisionError`]s: `EEXIST` → `AlreadyExists`,
//! `ENOENT` → `NotFound`, `EBUSY` → `Busy`, `ENOSPC` → `NoSpace`, dependent clones → `HasDependents`;
//! the command's messages are mapped the same way (see [`classify_failure`]).

pub mod command;
pub mod lzc;

use std::fmt;
use std::sync::Arc;

use xatastor_core::ProvisionError;

pub use command::{classify_failure, parse_list, parse_names, parse_properties, CommandZfs};
pub use lzc::{compression_index, LzcConfig, LzcZfs};

/// Properties of a new zvol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeProps {
    /// `volsize` in bytes (a multiple of `volblocksize`).
    pub volsize: u64,
    /// `volblocksize` in bytes (a power of two, 512 B–128 KiB on ZFS 2.1).
    pub volblocksize: u32,
    /// `compression` (`lz4`, `zstd`, `off`, …); `None` inherits the parent's.
    pub compression: Option<String>,
}

/// Properties set on a new clone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CloneProps {
    /// `compression`; `None` inherits.
    pub compression: Option<String>,
}

/// Properties of a dataset that the provisioner reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatasetProps {
    /// `used`, bytes.
    pub used: u64,
    /// `referenced`, bytes.
    pub referenced: u64,
    /// `logicalused`, bytes.
    pub logical_used: u64,
    /// `compressratio` (1.0 = none).
    pub compress_ratio: f64,
    /// `volsize`, bytes (volumes and their snapshots).
    pub volsize: Option<u64>,
    /// `volblocksize`, bytes (volumes and their snapshots).
    pub volblocksize: Option<u64>,
    /// `origin`: the snapshot a clone was made from.
    pub origin: Option<String>,
    /// `available`, bytes (what the dataset and its children can still write; none for snapshots).
    pub available: Option<u64>,
}

/// The type of a listed dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetKind {
    /// A zvol.
    Volume,
    /// A snapshot.
    Snapshot,
    /// Anything else (filesystem, bookmark).
    Other,
}

/// One line of a dataset listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    /// Full dataset name (`pool/parent/vol` or `pool/parent/vol@snap`).
    pub name: String,
    /// Its type.
    pub kind: DatasetKind,
    /// `volsize` (volumes and their snapshots).
    pub volsize: Option<u64>,
    /// `origin` (clones).
    pub origin: Option<String>,
}

/// The ZFS operations behind [`ZfsProvisioner`](crate::ZfsProvisioner): a narrow seam with a
/// libzfs_core implementation, a `zfs`-command implementation and fakes in tests.
///
/// Dataset names are full names (`pool/parent/vol`, `pool/parent/vol@snap`). Errors follow the
/// mapping in the [module documentation](self).
pub trait ZfsOps: Send + Sync + fmt::Debug {
    /// Which implementation this is (`libzfs_core`, `zfs command`, …).
    fn implementation(&self) -> &'static str;

    /// Creates a sparse zvol (no `refreservation`).
    fn create_volume(&self, dataset: &str, props: &VolumeProps) -> Result<(), ProvisionError>;

    /// Takes all `snapshots` (`ds@name`) in one transaction: all or none.
    fn snapshot(&self, snapshots: &[String]) -> Result<(), ProvisionError>;

    /// Clones `origin` (a snapshot) as `dataset`.
    fn clone_snapshot(&self, origin: &str, dataset: &str, props: &CloneProps) -> Result<(), ProvisionError>;

    /// Destroys a volume that has no snapshots. `Busy` while its device is open.
    fn destroy(&self, dataset: &str) -> Result<(), ProvisionError>;

    /// Destroys snapshots, all or none; `HasDependents` if one has clones. Snapshots that do not exist
    /// are ignored (like `lzc_destroy_snaps`), so callers check existence first where it matters.
    fn destroy_snapshots(&self, snapshots: &[String]) -> Result<(), ProvisionError>;

    /// Sets `volsize`.
    fn set_volsize(&self, dataset: &str, volsize: u64) -> Result<(), ProvisionError>;

    /// Reads `used`, `referenced`, `logicalused`, `compressratio`, `volsize`, `volblocksize`, `origin`.
    fn properties(&self, dataset: &str) -> Result<DatasetProps, ProvisionError>;

    /// Whether the dataset (or snapshot) exists.
    fn exists(&self, dataset: &str) -> Result<bool, ProvisionError>;

    /// Every volume and snapshot below `parent`, recursively, in one call.
    fn list(&self, parent: &str) -> Result<Vec<ListEntry>, ProvisionError>;

    /// The snapshots of one dataset (full names).
    fn snapshots(&self, dataset: &str) -> Result<Vec<String>, ProvisionError>;

    /// The clones of a snapshot (full names).
    fn clones(&self, snapshot: &str) -> Result<Vec<String>, ProvisionError>;
}

/// Picks the control path: libzfs_core if it loads (with `lzc` settings), else the `zfs` command
/// (`zfs_command`), else `Backend("ZFS is not available: …")` naming why both failed.
pub fn detect(lzc: &LzcConfig, zfs_command: &CommandZfs) -> Result<Arc<dyn ZfsOps>, ProvisionError> {
    let lzc_error = match LzcZfs::load(lzc, zfs_command.clone()) {
        Ok(ops) => return Ok(Arc::new(ops)),
        Err(e) => e,
    };
    tracing::info!(reason = %lzc_error, "libzfs_core not usable; trying the zfs command");
    match zfs_command.check() {
        Ok(()) => Ok(Arc::new(zfs_command.clone())),
        Err(cmd_error) => Err(ProvisionError::Backend(format!(
            "{UNAVAILABLE}libzfs_core: {}; zfs command: {}",
            reason(&lzc_error),
            reason(&cmd_error)
        ))),
    }
}

/// The prefix of "ZFS is not available" errors.
pub(crate) const UNAVAILABLE: &str = "ZFS is not available: ";

/// An error's message without the "ZFS is not available" prefix.
fn reason(e: &ProvisionError) -> String {
    let s = e.to_string();
    s.strip_prefix(UNAVAILABLE).map_or_else(|| s.clone(), str::to_owned)
}

/// `pool/a/b@snap` → `pool/a/b`.
pub(crate) fn dataset_of(snapshot: &str) -> &str {
    snapshot.split_once('@').map_or(snapshot, |(ds, _)| ds)
}

/// `pool/a/b` → `pool/a`.
pub(crate) fn parent_of(dataset: &str) -> &str {
    dataset.rsplit_once('/').map_or(dataset, |(p, _)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing_lzc() -> LzcConfig {
        LzcConfig {
            libzfs_core: vec!["libzfs_core-missing.so.3".into()],
            libnvpair: vec!["libnvpair-missing.so.3".into()],
        }
    }

    #[test]
    fn detect_falls_back_to_the_command_then_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let zfs = command::tests::fake_zfs(dir.path(), "exit 0");
        assert_eq!(detect(&missing_lzc(), &zfs).unwrap().implementation(), "zfs command");

        let e =
            detect(&missing_lzc(), &CommandZfs::with_program("/nonexistent/zfs")).unwrap_err().to_string();
        assert!(
            e.starts_with("ZFS is not available: libzfs_core: cannot load libnvpair-missing.so.3: "),
            "{e}"
        );
        assert!(e.ends_with("; zfs command: the zfs command (/nonexistent/zfs) was not found"), "{e}");
        assert_eq!(e.matches("ZFS is not available").count(), 1, "{e}");
    }

    #[test]
    fn names_split() {
        assert_eq!(dataset_of("tank/a/b@s"), "tank/a/b");
        assert_eq!(dataset_of("tank/a"), "tank/a");
        assert_eq!(parent_of("tank/a/b"), "tank/a");
        assert_eq!(parent_of("tank"), "tank");
    }
}
