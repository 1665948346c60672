//! Volumes as sparse files in a data directory: [`FileProvisioner`].
//!
//! ```text
//!   <dir>/volumes/<name>.img                 a volume: a sparse file, opened as a FileBackend
//!   <dir>/snapshots/<volume>@<snapshot>.img  a snapshot: a reflink copy of the volume's file
//!   <dir>/{volumes,snapshots}/.<file>.tmp    a file being made (removed by FileProvisioner::new)
//! ```
//!
//! Names cannot contain `@` or `/` and cannot start with `.` ([`VolumeName`]), so the layout is
//! unambiguous and temporary files never collide with real ones.
//!
//! **Crash safety.** Every file is made under a temporary name, fsynced, renamed to its final name
//! without replacing anything (`renameat2(RENAME_NOREPLACE)`), and then its directory is fsynced: a
//! crash leaves either no file or a complete one under the final name, and a volume reported created
//! (which the catalog then commits) survives a power loss. Deletions fsync the directory too.
//!
//! **Snapshots and clones** are reflink copies (the `FICLONE` ioctl): instant, sharing all blocks
//! with the source until either side writes. They need a file system with reflink (XFS made with
//! `reflink=1`, btrfs); elsewhere they fail with [`ProvisionError::Unsupported`] naming the file
//! system. A reflink copy depends on nothing, so, unlike ZFS, snapshots with clones can be deleted,
//! [`ProvisionError::HasDependents`] never happens, and [`VolumeProvisioner::list`] cannot report
//! origins (`None`).
//!
//! **Several snapshots in one call** are all or none (a failure removes the ones this call made) but,
//! unlike ZFS, not one point in time across volumes: each snapshot is a crash-consistent image of its
//! own volume (the reflink sees every write completed before it), taken one volume after another.
//! A crash during such a call can leave some of them; the catalog finds them with
//! [`VolumeProvisioner::snapshot_exists`] when it reconciles.
//!
//! **Resize** grows the file; shrinking truncates it and only happens with `allow_shrink` (the node
//! allows it for a forced resize of a volume no host has open: an open [`FileBackend`] caches its
//! size, and a host could write past the new end and grow the file again).
//!
//! **Capacity** is the file system's (`statvfs`): its size, and the space available to this user.
//! [`FileProvisioner::supports_reflink`] tells at start whether snapshots will work.
//!
//! One provisioner per directory: the catalog serialises operations on one volume, and nothing here
//! guards against a second process using the same directory.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvmeof_target::{BlockBackend, FileBackend};
use rustix::io::Errno;

use super::{check_block_size, check_spec, refuse_shrink};
use crate::provision::{
    Capacity, ListedVolume, ProvisionError, SnapshotName, SnapshotRef, Usage, VolumeName, VolumeProvisioner,
    VolumeSpec,
};

/// Sizes of file volumes are multiples of this (the smallest block size); the catalog checks the
/// volume's own block size.
const SECTOR: u64 = 512;

/// Volumes as sparse files in a directory, snapshots and clones as reflink copies (see the
/// [module documentation](self)).
#[derive(Debug)]
pub struct FileProvisioner {
    dir: PathBuf,
    volumes: PathBuf,
    snapshots: PathBuf,
}

impl FileProvisioner {
    /// Uses `dir` as the data directory: creates `volumes/` and `snapshots/` in it if missing and
    /// removes temporary files a crash left behind.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ProvisionError> {
        let dir = dir.into();
        let p = Self { volumes: dir.join("volumes"), snapshots: dir.join("snapshots"), dir };
        let created = !path_exists(&p.dir)?;
        for sub in [&p.volumes, &p.snapshots] {
            fs::create_dir_all(sub).map_err(|e| fs_error("creating", sub, e))?;
        }
        sync_dir(&p.dir)?;
        if created {
            // Best effort: the parent may not be readable; the subdirectories are synced above.
            if let Some(parent) = p.dir.parent().filter(|parent| !parent.as_os_str().is_empty()) {
                let _ = sync_dir(parent);
            }
        }
        for sub in [&p.volumes, &p.snapshots] {
            let mut removed = false;
            for entry in fs::read_dir(sub).map_err(|e| fs_error("reading", sub, e))? {
                let entry = entry.map_err(|e| fs_error("reading", sub, e))?;
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    tracing::info!(file = %entry.path().display(), "removing a temporary file left by a crash");
                    fs::remove_file(entry.path()).map_err(|e| fs_error("removing", &entry.path(), e))?;
                    removed = true;
                }
            }
            if removed {
                sync_dir(sub)?;
            }
        }
        Ok(p)
    }

    /// The data directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory's file system makes reflink copies (so snapshots and clones work):
    /// tries one on two empty temporary files, which are removed again. `Err` is the reason it cannot
    /// (the message names the file system).
    pub fn supports_reflink(&self) -> Result<(), ProvisionError> {
        let src = TempFile::create(&self.volumes.join("reflink-probe-a.img"))?;
        let dst = TempFile::create(&self.volumes.join("reflink-probe-b.img"))?;
        match rustix::fs::ioctl_ficlone(&dst.file, &src.file) {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY) => Err(self.no_reflink()),
            Err(e) => Err(fs_error("reflinking", &dst.path, e.into())),
        }
    }

    /// Where volume `name` lives: `<dir>/volumes/<name>.img`.
    #[must_use]
    pub fn volume_path(&self, name: &VolumeName) -> PathBuf {
        self.volumes.join(format!("{name}.img"))
    }

    /// Where `snapshot` lives: `<dir>/snapshots/<volume>@<snapshot>.img`.
    #[must_use]
    pub fn snapshot_path(&self, snapshot: &SnapshotRef) -> PathBuf {
        self.snapshots.join(format!("{snapshot}.img"))
    }

    /// The error for a file system without reflink, naming it.
    fn no_reflink(&self) -> ProvisionError {
        ProvisionError::Unsupported(format!(
            "snapshots need a file system with reflink (XFS with reflink=1, btrfs); {} is on {}",
            self.dir.display(),
            fs_type(&self.dir)
        ))
    }

    /// Makes `dst` a reflink copy of `src` (grown to `grow_to` bytes if that is larger), through a
    /// temporary file next to `dst` ([`TempFile`]). Does not fsync the directory.
    fn reflink(
        &self,
        src: &Path,
        src_what: &dyn fmt::Display,
        dst: &Path,
        dst_what: &dyn fmt::Display,
        grow_to: Option<u64>,
    ) -> Result<(), ProvisionError> {
        let source = File::open(src).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProvisionError::NotFound(src_what.to_string()),
            _ => fs_error("opening", src, e),
        })?;
        let tmp = TempFile::create(dst)?;
        rustix::fs::ioctl_ficlone(&tmp.file, &source).map_err(|e| match e {
            Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY => self.no_reflink(),
            Errno::NOSPC | Errno::DQUOT => ProvisionError::NoSpace(dst_what.to_string()),
            e => fs_error("reflinking to", &tmp.path, e.into()),
        })?;
        if let Some(size) = grow_to {
            let len = tmp.file.metadata().map_err(|e| fs_error("inspecting", &tmp.path, e))?.len();
            if size > len {
                tmp.file.set_len(size).map_err(|e| fs_error("growing", &tmp.path, e))?;
            }
        }
        tmp.commit(dst, dst_what)
    }

    /// The snapshot files of `volume`.
    fn snapshot_files(&self, volume: &VolumeName) -> Result<Vec<PathBuf>, ProvisionError> {
        let prefix = format!("{volume}@");
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.snapshots).map_err(|e| fs_error("reading", &self.snapshots, e))? {
            let entry = entry.map_err(|e| fs_error("reading", &self.snapshots, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && name.ends_with(".img") {
                files.push(entry.path());
            }
        }
        Ok(files)
    }
}

/// A file being made under a temporary name; removed on drop unless committed.
struct TempFile {
    file: File,
    path: PathBuf,
    committed: bool,
}

impl TempFile {
    /// Creates `.<final name minus ".img">.tmp` next to `final_path` (replacing a stale one).
    fn create(final_path: &Path) -> Result<Self, ProvisionError> {
        let stem = final_path.file_stem().unwrap_or_default().to_string_lossy();
        let path = final_path.with_file_name(format!(".{stem}.tmp"));
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fs_error("removing", &path, e)),
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| fs_error("creating", &path, e))?;
        Ok(Self { file, path, committed: false })
    }

    /// Makes the file durable and gives it its final name, which must be free.
    fn commit(mut self, final_path: &Path, what: &dyn fmt::Display) -> Result<(), ProvisionError> {
        self.file.sync_all().map_err(|e| fs_error("syncing", &self.path, e))?;
        rename_noreplace(&self.path, final_path).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ProvisionError::AlreadyExists(what.to_string()),
            _ => fs_error("renaming", &self.path, e),
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), atomically.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{renameat_with, RenameFlags, CWD};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        // A file system without RENAME_NOREPLACE: a hard link also refuses to replace, atomically.
        Err(Errno::INVAL | Errno::NOSYS) => {
            fs::hard_link(from, to)?;
            fs::remove_file(from)
        }
        other => other.map_err(io::Error::from),
    }
}

/// fsyncs a directory, so that the entries created, renamed or removed in it are durable.
fn sync_dir(dir: &Path) -> Result<(), ProvisionError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| fs_error("syncing", dir, e))
}

/// Whether `path` exists.
fn path_exists(path: &Path) -> Result<bool, ProvisionError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(fs_error("inspecting", path, e)),
    }
}

/// An I/O error while `doing` something to `path`; a full file system is [`ProvisionError::NoSpace`].
fn fs_error(doing: &str, path: &Path, e: io::Error) -> ProvisionError {
    match e.raw_os_error().map(Errno::from_raw_os_error) {
        Some(Errno::NOSPC | Errno::DQUOT) => ProvisionError::NoSpace(path.display().to_string()),
        _ => ProvisionError::io(format!("{doing} {}", path.display()), e),
    }
}

/// The file system `path` is on, for error messages.
fn fs_type(path: &Path) -> String {
    let Ok(st) = rustix::fs::statfs(path) else { return "an unknown file system".into() };
    // `f_type`'s width and signedness differ between architectures; magics are 32 bits.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64 & 0xffff_ffff;
    let name = match magic {
        0xef53 => "ext2/ext3/ext4",
        0x5846_5342 => "xfs (made without reflink=1?)",
        0x9123_683e => "btrfs",
        0x0102_1994 => "tmpfs",
        0x8584_58f6 => "ramfs",
        0x794c_7630 => "overlayfs",
        0x6969 => "nfs",
        0xff53_4d42 | 0xfe53_4d42 => "cifs/smb",
        0x2fc1_2fc1 => "zfs",
        0xf2f5_2010 => "f2fs",
        0xca45_1a4e => "bcachefs",
        0x6573_5546 => "a FUSE file system",
        _ => return format!("a file system with magic {magic:#x}"),
    };
    name.to_owned()
}

impl VolumeProvisioner for FileProvisioner {
    fn kind(&self) -> &'static str {
        "file"
    }

    /// The data directory, made absolute (symbolic links resolved).
    fn location(&self) -> String {
        fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone()).display().to_string()
    }

    /// The file system's size and the bytes available to this user (`statvfs`).
    fn capacity(&self) -> Result<Option<Capacity>, ProvisionError> {
        let st = rustix::fs::statvfs(&self.dir).map_err(|e| fs_error("statvfs of", &self.dir, e.into()))?;
        Ok(Some(Capacity {
            total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
            available_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        }))
    }

    /// A sparse file of the spec's size; the block size is not recorded (it is the catalog's).
    fn create(&self, spec: &VolumeSpec) -> Result<(), ProvisionError> {
        check_spec(spec, self.kind())?;
        let path = self.volume_path(&spec.name);
        if path_exists(&path)? {
            return Err(ProvisionError::AlreadyExists(spec.name.to_string()));
        }
        let tmp = TempFile::create(&path)?;
        tmp.file.set_len(spec.size_bytes).map_err(|e| fs_error("sizing", &tmp.path, e))?;
        tmp.commit(&path, &spec.name)?;
        sync_dir(&self.volumes)
    }

    /// Reflinks each volume in turn; if one fails, removes the snapshots made by this call. Not one
    /// point in time across volumes (see the [module documentation](self)).
    fn snapshot(&self, snapshots: &[SnapshotRef]) -> Result<(), ProvisionError> {
        for (i, s) in snapshots.iter().enumerate() {
            if !path_exists(&self.volume_path(&s.volume))? {
                return Err(ProvisionError::NotFound(s.volume.to_string()));
            }
            if path_exists(&self.snapshot_path(s))? || snapshots.iter().take(i).any(|earlier| earlier == s) {
                return Err(ProvisionError::AlreadyExists(s.to_string()));
            }
        }
        let mut made = Vec::with_capacity(snapshots.len());
        let result = snapshots
            .iter()
            .try_for_each(|s| {
                let path = self.snapshot_path(s);
                self.reflink(&self.volume_path(&s.volume), &s.volume, &path, s, None)?;
                made.push(path);
                Ok(())
            })
            .and_then(|()| sync_dir(&self.snapshots));
        if result.is_err() {
            for path in &made {
                let _ = fs::remove_file(path);
            }
            let _ = sync_dir(&self.snapshots);
        }
        result
    }

    fn clone_snapshot(&self, origin: &SnapshotRef, new: &VolumeSpec) -> Result<(), ProvisionError> {
        check_spec(new, self.kind())?;
        let path = self.volume_path(&new.name);
        if path_exists(&path)? {
            return Err(ProvisionError::AlreadyExists(new.name.to_string()));
        }
        let snapshot = self.snapshot_path(origin);
        let origin_size = match fs::metadata(&snapshot) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ProvisionError::NotFound(origin.to_string()))
            }
            Err(e) => return Err(fs_error("inspecting", &snapshot, e)),
        };
        if new.size_bytes < origin_size {
            return Err(ProvisionError::InvalidArgument(format!(
                "a clone of {origin} needs at least its {origin_size} bytes, got {}",
                new.size_bytes
            )));
        }
        self.reflink(&snapshot, origin, &path, &new.name, Some(new.size_bytes))?;
        sync_dir(&self.volumes)
    }

    /// Grows the file (a non-zero multiple of 512 bytes), or with `allow_shrink` truncates it; the
    /// same size is a no-op. An open [`FileBackend`] learns the new size from its own
    /// [`BlockBackend::resize`].
    fn resize(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<(), ProvisionError> {
        let path = self.volume_path(name);
        let file = match OpenOptions::new().write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ProvisionError::NotFound(name.to_string()))
            }
            Err(e) => return Err(fs_error("opening", &path, e)),
        };
        if new_size_bytes == 0 || new_size_bytes % SECTOR != 0 {
            return Err(ProvisionError::InvalidArgument(format!(
                "size must be a non-zero multiple of {SECTOR}, got {new_size_bytes}"
            )));
        }
        let size = file.metadata().map_err(|e| fs_error("inspecting", &path, e))?.len();
        if new_size_bytes < size && !allow_shrink {
            return Err(refuse_shrink(name, size, new_size_bytes));
        }
        if new_size_bytes != size {
            file.set_len(new_size_bytes).map_err(|e| fs_error("resizing", &path, e))?;
            file.sync_all().map_err(|e| fs_error("syncing", &path, e))?;
        }
        Ok(())
    }

    /// Removes the volume's snapshots, then the volume.
    fn delete_volume(&self, name: &VolumeName) -> Result<(), ProvisionError> {
        let path = self.volume_path(name);
        if !path_exists(&path)? {
            return Err(ProvisionError::NotFound(name.to_string()));
        }
        // Snapshots first: a crash in between leaves the volume, and deleting it again finishes.
        let snapshots = self.snapshot_files(name)?;
        for snapshot in &snapshots {
            match fs::remove_file(snapshot) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(fs_error("removing", snapshot, e))
                }
                _ => {}
            }
        }
        if !snapshots.is_empty() {
            sync_dir(&self.snapshots)?;
        }
        fs::remove_file(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProvisionError::NotFound(name.to_string()),
            _ => fs_error("removing", &path, e),
        })?;
        sync_dir(&self.volumes)
    }

    fn delete_snapshot(&self, snapshot: &SnapshotRef) -> Result<(), ProvisionError> {
        let path = self.snapshot_path(snapshot);
        fs::remove_file(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProvisionError::NotFound(snapshot.to_string()),
            _ => fs_error("removing", &path, e),
        })?;
        sync_dir(&self.snapshots)
    }

    fn exists(&self, name: &VolumeName) -> Result<bool, ProvisionError> {
        path_exists(&self.volume_path(name))
    }

    fn snapshot_exists(&self, snapshot: &SnapshotRef) -> Result<bool, ProvisionError> {
        path_exists(&self.snapshot_path(snapshot))
    }

    /// `used_bytes` is the file's allocated blocks (`st_blocks × 512`), which count blocks shared
    /// with snapshots and clones in full; `referenced_bytes` and `logical_used_bytes` are the same.
    fn usage(&self, name: &VolumeName) -> Result<Usage, ProvisionError> {
        let path = self.volume_path(name);
        let meta = fs::metadata(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProvisionError::NotFound(name.to_string()),
            _ => fs_error("inspecting", &path, e),
        })?;
        let used_bytes = meta.blocks() * 512;
        Ok(Usage {
            size_bytes: meta.len(),
            used_bytes,
            referenced_bytes: used_bytes,
            logical_used_bytes: used_bytes,
            compress_ratio: 1.0,
        })
    }

    /// Reads both directories; sorted by name, snapshots by name too. Files whose names are not
    /// valid names, and snapshots of volumes that do not exist, are skipped with a warning.
    fn list(&self) -> Result<Vec<ListedVolume>, ProvisionError> {
        let mut volumes = BTreeMap::new();
        for entry in fs::read_dir(&self.volumes).map_err(|e| fs_error("reading", &self.volumes, e))? {
            let entry = entry.map_err(|e| fs_error("reading", &self.volumes, e))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if file.starts_with('.') {
                continue;
            }
            let Some(name) = file.strip_suffix(".img").and_then(|n| VolumeName::new(n).ok()) else {
                tracing::warn!(file = %entry.path().display(), "not a volume file; skipped");
                continue;
            };
            let size_bytes = match entry.metadata() {
                Ok(m) => m.len(),
                // Deleted since read_dir saw it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(fs_error("inspecting", &entry.path(), e)),
            };
            volumes
                .insert(name.clone(), ListedVolume { name, size_bytes, origin: None, snapshots: Vec::new() });
        }
        for entry in fs::read_dir(&self.snapshots).map_err(|e| fs_error("reading", &self.snapshots, e))? {
            let entry = entry.map_err(|e| fs_error("reading", &self.snapshots, e))?;
            let file = entry.file_name();
            let file = file.to_string_lossy();
            if file.starts_with('.') {
                continue;
            }
            let parsed = file
                .strip_suffix(".img")
                .and_then(|n| n.split_once('@'))
                .and_then(|(v, s)| Some((VolumeName::new(v).ok()?, SnapshotName::new(s).ok()?)));
            match parsed.and_then(|(v, s)| Some((volumes.get_mut(&v)?, s))) {
                Some((volume, snapshot)) => volume.snapshots.push(snapshot),
                None => {
                    tracing::warn!(file = %entry.path().display(), "not a snapshot of a volume; skipped");
                }
            }
        }
        Ok(volumes
            .into_values()
            .map(|mut v| {
                v.snapshots.sort_unstable();
                v
            })
            .collect())
    }

    /// Opens the file read-write as a [`FileBackend`] (a new one on every call); its size must be a
    /// multiple of `block_size`.
    fn open(&self, name: &VolumeName, block_size: u32) -> Result<Arc<dyn BlockBackend>, ProvisionError> {
        check_block_size(block_size)?;
        let path = self.volume_path(name);
        let backend = FileBackend::open(&path, block_size).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ProvisionError::NotFound(name.to_string()),
            _ => fs_error("opening", &path, e),
        })?;
        let size = fs::metadata(&path).map_err(|e| fs_error("inspecting", &path, e))?.len();
        if size % u64::from(block_size) != 0 {
            return Err(ProvisionError::InvalidArgument(format!(
                "{name} has {size} bytes, not a multiple of the block size {block_size}"
            )));
        }
        Ok(Arc::new(backend))
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::tests::{self as common, assert_err, snap, spec, vol};
    use super::*;

    /// A small XFS file system with reflink on a loop device, mounted in a temporary directory;
    /// unmounted and detached on drop (also when the test panics). The tests that use it run by
    /// default and need root and xfsprogs (`mkfs.xfs`): without them they fail with a message saying
    /// so, rather than pass without testing anything.
    struct Xfs {
        device: String,
        mount: PathBuf,
        mounted: bool,
        // Dropped after `Drop::drop` has unmounted and detached.
        _dir: tempfile::TempDir,
    }

    fn run(cmd: &mut Command) -> Result<String, String> {
        match cmd.output() {
            Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
            Ok(out) => {
                Err(format!("{cmd:?}: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
            }
            Err(e) => Err(format!("{cmd:?}: {e}")),
        }
    }

    impl Xfs {
        fn new() -> Self {
            const HOW: &str = "the reflink tests need root (losetup, mount) and xfsprogs \
                               (`apt-get install -y xfsprogs`)";
            let uid = run(Command::new("id").arg("-u")).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(uid, "0", "{HOW}: running as uid {uid}");
            if let Err(e) = run(Command::new("mkfs.xfs").arg("-V")) {
                panic!("{HOW}: {e}");
            }
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("xfs.img");
            // 300 MiB is mkfs.xfs's minimum; the file is sparse.
            File::create(&image).unwrap().set_len(300 << 20).unwrap();
            run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&image))
                .unwrap_or_else(|e| panic!("{HOW}: {e}"));
            let device = run(Command::new("losetup").args(["--find", "--show"]).arg(&image))
                .unwrap_or_else(|e| panic!("{HOW}: {e}"));
            let mount = dir.path().join("mnt");
            fs::create_dir(&mount).unwrap();
            let mut xfs = Self { device, mount, mounted: false, _dir: dir };
            run(Command::new("mount").args(["-t", "xfs", &xfs.device]).arg(&xfs.mount))
                .unwrap_or_else(|e| panic!("{HOW}: {e}"));
            xfs.mounted = true;
            xfs
        }

        fn data_dir(&self) -> PathBuf {
            self.mount.join("data")
        }
    }

    impl Drop for Xfs {
        fn drop(&mut self) {
            if self.mounted {
                if let Err(e) = run(Command::new("umount").arg(&self.mount)) {
                    eprintln!("cleanup: {e}");
                }
            }
            if let Err(e) = run(Command::new("losetup").arg("-d").arg(&self.device)) {
                eprintln!("cleanup: {e}");
            }
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn lifecycle_on_xfs() {
        let xfs = Xfs::new();
        let p = FileProvisioner::new(xfs.data_dir()).unwrap();
        p.supports_reflink().unwrap();
        let c = p.capacity().unwrap().unwrap();
        assert!(c.total_bytes > 200 << 20 && c.total_bytes < 300 << 20, "a 300 MiB image: {c:?}");
        assert_eq!(p.location(), fs::canonicalize(xfs.data_dir()).unwrap().display().to_string());
        common::lifecycle(&p);
        assert!(entries(&p.volumes).is_empty() && entries(&p.snapshots).is_empty(), "nothing left behind");
    }

    #[test]
    fn snapshots_of_several_volumes_are_all_or_none_on_xfs() {
        let xfs = Xfs::new();
        let p = FileProvisioner::new(xfs.data_dir()).unwrap();
        common::multi_snapshot_all_or_none(&p);
        assert_eq!(entries(&p.snapshots), ["a@x.img", "b@x.img", "b@y.img", "c@x.img"]);
    }

    /// A reflink that fails after others in the same call succeeded removes those.
    #[test]
    fn a_failed_snapshot_call_removes_the_snapshots_it_made() {
        let xfs = Xfs::new();
        let p = FileProvisioner::new(xfs.data_dir()).unwrap();
        p.create(&spec("a", 1 << 20, 512)).unwrap();
        // "b" exists but cannot be reflinked: its "file" is a directory.
        fs::create_dir(p.volume_path(&vol("b"))).unwrap();
        let e = p.snapshot(&[snap("a", "x"), snap("b", "x")]).unwrap_err();
        assert!(matches!(e, ProvisionError::Unsupported(_) | ProvisionError::Io { .. }), "{e:?}");
        assert!(!p.snapshot_exists(&snap("a", "x")).unwrap(), "the first snapshot was rolled back");
        assert!(entries(&p.snapshots).is_empty(), "no temporary files either: {:?}", entries(&p.snapshots));
        p.snapshot(&[snap("a", "x")]).unwrap();
    }

    #[test]
    fn usage_follows_writes_and_discards_on_xfs() {
        let xfs = Xfs::new();
        common::usage_follows_writes_and_discards(&FileProvisioner::new(xfs.data_dir()).unwrap());
    }

    #[test]
    fn usage_follows_writes_and_discards() {
        let dir = tempfile::tempdir().unwrap();
        common::usage_follows_writes_and_discards(&FileProvisioner::new(dir.path()).unwrap());
    }

    /// On a file system without reflink (this machine's ext4 temp dir), snapshots and clones fail with a
    /// clear `Unsupported` and leave nothing behind.
    #[test]
    fn snapshots_without_reflink_are_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let p = FileProvisioner::new(dir.path()).unwrap();
        p.create(&spec("a", 1 << 20, 512)).unwrap();
        p.create(&spec("b", 1 << 20, 512)).unwrap();
        let fs = fs_type(dir.path());
        let probe = p.supports_reflink();
        assert_eq!(entries(&p.volumes), ["a.img", "b.img"], "the probe leaves nothing behind");
        match p.snapshot(&[snap("a", "x"), snap("b", "x")]) {
            Ok(()) => {
                assert!(probe.is_ok(), "{probe:?}");
                assert!(
                    fs.starts_with("btrfs") || fs.starts_with("xfs"),
                    "reflink worked on {fs}: expected xfs or btrfs"
                );
            }
            Err(ProvisionError::Unsupported(message)) => {
                assert!(matches!(&probe, Err(ProvisionError::Unsupported(m)) if *m == message), "{probe:?}");
                assert!(message.contains("reflink"), "{message}");
                assert!(message.contains(&dir.path().display().to_string()), "{message}");
                assert!(message.ends_with(&fs), "{message}");
                assert!(entries(&p.snapshots).is_empty(), "{:?}", entries(&p.snapshots));
                println!("{message}");
            }
            Err(e) => panic!("expected Unsupported, got {e:?}"),
        }
    }

    #[test]
    fn create_resize_delete_without_reflink() {
        use ProvisionError as E;
        let dir = tempfile::tempdir().unwrap();
        let p = FileProvisioner::new(dir.path()).unwrap();
        assert_err!(p.create(&spec("v", 1000, 512)), E::InvalidArgument(_));
        assert_err!(p.create(&spec("v", 1 << 20, 2048)), E::InvalidArgument(_));
        let lz4 = VolumeSpec { compression: Some("zstd".into()), ..spec("v", 1 << 20, 512) };
        assert_err!(p.create(&lz4), E::Unsupported(_));
        assert!(entries(&p.volumes).is_empty(), "refused specs leave no files");
        p.create(&spec("v", 1 << 30, 4096)).unwrap();
        let path = p.volume_path(&vol("v"));
        assert_eq!(path, dir.path().join("volumes/v.img"));
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.len(), meta.blocks()), (1 << 30, 0), "a sparse file");
        assert_err!(p.create(&spec("v", 1 << 20, 512)), E::AlreadyExists(_));
        assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 30, "a refused create keeps the volume");

        let b = p.open(&vol("v"), 4096).unwrap();
        assert_eq!(b.info().block_size, 4096);
        assert!(b.raw_device().is_some(), "file volumes can be driven on the ring");
        common::write(&*b, 1 << 29, &[5; 4096]);
        p.resize(&vol("v"), 2 << 30, false).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 2 << 30);
        assert_err!(p.resize(&vol("v"), 1 << 30, false), E::InvalidArgument(_));
        assert_eq!(fs::metadata(&path).unwrap().len(), 2 << 30);
        assert_err!(p.resize(&vol("v"), (2 << 30) + 100, false), E::InvalidArgument(_));
        assert_eq!(common::read(&*p.open(&vol("v"), 4096).unwrap(), 1 << 29, 4096), vec![5; 4096]);

        p.create(&spec("odd", 4096 + 512, 512)).unwrap();
        assert_err!(p.open(&vol("odd"), 4096), E::InvalidArgument(_));
        assert_eq!(p.open(&vol("odd"), 512).unwrap().size_bytes(), 4096 + 512);

        let listed = p.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!((listed[1].name.as_str(), listed[1].size_bytes), ("v", 2 << 30));
        drop(b);
        p.delete_volume(&vol("v")).unwrap();
        assert!(!path.exists());
        assert_err!(p.delete_volume(&vol("v")), E::NotFound(_));
        assert_err!(p.resize(&vol("v"), 1 << 30, true), E::NotFound(_));
        assert_err!(p.clone_snapshot(&snap("odd", "s"), &spec("c", 1 << 20, 512)), E::NotFound(_));
        assert_err!(p.clone_snapshot(&snap("odd", "s"), &spec("odd", 1 << 20, 512)), E::AlreadyExists(_));
    }

    #[test]
    fn new_removes_temporary_files_left_by_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let p = FileProvisioner::new(dir.path()).unwrap();
        p.create(&spec("v", 1 << 20, 512)).unwrap();
        fs::write(p.volumes.join(".w.tmp"), b"half made").unwrap();
        fs::write(p.snapshots.join(".v@s.tmp"), b"half made").unwrap();
        // Not a volume, not ours: left alone, and not listed.
        fs::write(p.volumes.join("README"), b"hello").unwrap();
        let p = FileProvisioner::new(dir.path()).unwrap();
        assert_eq!(entries(&p.volumes), ["README", "v.img"]);
        assert!(entries(&p.snapshots).is_empty());
        let names: Vec<VolumeName> = p.list().unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, [vol("v")]);
        assert!(!p.exists(&vol("w")).unwrap());
    }

    #[test]
    fn a_snapshot_file_without_its_volume_is_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let p = FileProvisioner::new(dir.path()).unwrap();
        p.create(&spec("v", 1 << 20, 512)).unwrap();
        fs::write(p.snapshot_path(&snap("gone", "s")), b"").unwrap();
        fs::write(p.snapshot_path(&snap("v", "s")), b"").unwrap();
        let listed = p.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].snapshots, [snap("v", "s").snapshot]);
        p.delete_volume(&vol("v")).unwrap();
        assert_eq!(entries(&p.snapshots), ["gone@s.img"], "only v's snapshots go with it");
    }
}
