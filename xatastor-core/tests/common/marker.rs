//! A provisioner whose state survives the process (for crash tests): each volume and snapshot is a
//! marker file, so that what matters is the node's side of the protocol.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvmeof_target::{BlockBackend, MemoryBackend};
use xatastor_core::{
    ListedVolume, ProvisionError, SnapshotRef, Usage, VolumeName, VolumeProvisioner, VolumeSpec,
};

/// Volumes are `<dir>/v.<name>` holding the size; snapshots `<dir>/s.<volume>@<snapshot>`. Every
/// change is one create/rename/unlink, so each backend step is atomic like a ZFS one.
#[derive(Debug)]
pub(crate) struct MarkerProvisioner(pub(crate) PathBuf);

impl MarkerProvisioner {
    fn vol(&self, n: &VolumeName) -> PathBuf {
        self.0.join(format!("v.{n}"))
    }
    fn snap(&self, s: &SnapshotRef) -> PathBuf {
        self.0.join(format!("s.{s}"))
    }
    fn write_new(path: &Path, content: &str) -> Result<(), ProvisionError> {
        if path.exists() {
            return Err(ProvisionError::AlreadyExists(path.display().to_string()));
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).map_err(|e| ProvisionError::io("write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| ProvisionError::io("rename", e))
    }
    fn remove(path: &Path) -> Result<(), ProvisionError> {
        std::fs::remove_file(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProvisionError::NotFound(path.display().to_string()),
            _ => ProvisionError::io("remove", e),
        })
    }
}

impl VolumeProvisioner for MarkerProvisioner {
    fn kind(&self) -> &'static str {
        "marker"
    }
    fn create(&self, spec: &VolumeSpec) -> Result<(), ProvisionError> {
        Self::write_new(&self.vol(&spec.name), &spec.size_bytes.to_string())
    }
    fn snapshot(&self, snapshots: &[SnapshotRef]) -> Result<(), ProvisionError> {
        // All in one rename of a directory would be atomic; for the test one file per snapshot,
        // created in order, is enough (the node is killed between steps, not inside this call).
        for s in snapshots {
            let size =
                std::fs::read_to_string(self.vol(&s.volume)).map_err(|e| ProvisionError::io("read", e))?;
            Self::write_new(&self.snap(s), &size)?;
        }
        Ok(())
    }
    fn clone_snapshot(&self, origin: &SnapshotRef, new: &VolumeSpec) -> Result<(), ProvisionError> {
        if !self.snap(origin).exists() {
            return Err(ProvisionError::NotFound(origin.to_string()));
        }
        Self::write_new(&self.vol(&new.name), &new.size_bytes.to_string())
    }
    fn resize(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
        _allow_shrink: bool,
    ) -> Result<(), ProvisionError> {
        let p = self.vol(name);
        if !p.exists() {
            return Err(ProvisionError::NotFound(name.to_string()));
        }
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, new_size_bytes.to_string()).map_err(|e| ProvisionError::io("write", e))?;
        std::fs::rename(&tmp, &p).map_err(|e| ProvisionError::io("rename", e))
    }
    fn delete_volume(&self, name: &VolumeName) -> Result<(), ProvisionError> {
        Self::remove(&self.vol(name))
    }
    fn delete_snapshot(&self, snapshot: &SnapshotRef) -> Result<(), ProvisionError> {
        Self::remove(&self.snap(snapshot))
    }
    fn exists(&self, name: &VolumeName) -> Result<bool, ProvisionError> {
        Ok(self.vol(name).exists())
    }
    fn snapshot_exists(&self, snapshot: &SnapshotRef) -> Result<bool, ProvisionError> {
        Ok(self.snap(snapshot).exists())
    }
    fn usage(&self, name: &VolumeName) -> Result<Usage, ProvisionError> {
        let size: u64 = std::fs::read_to_string(self.vol(name))
            .map_err(|e| ProvisionError::io("read", e))?
            .parse()
            .map_err(|_| ProvisionError::Backend("bad marker".into()))?;
        Ok(Usage { size_bytes: size, compress_ratio: 1.0, ..Usage::default() })
    }
    fn list(&self) -> Result<Vec<ListedVolume>, ProvisionError> {
        Ok(Vec::new())
    }
    fn open(&self, name: &VolumeName, block_size: u32) -> Result<Arc<dyn BlockBackend>, ProvisionError> {
        Ok(Arc::new(MemoryBackend::new(self.usage(name)?.size_bytes, block_size)))
    }
}
