//! Volumes in memory: [`MemoryProvisioner`].
//!
//! Each volume is an `Arc<MemoryBackend>` in one map; [`VolumeProvisioner::open`] hands out that
//! same `Arc` every time, so data survives deactivation and reactivation within the process (and
//! nothing survives the process). A [`MemoryBackend`] keeps only written 4 KiB chunks, as immutable
//! reference-counted `Bytes`, so a snapshot is a copy of the chunk map
//! ([`MemoryBackend::duplicate_all`]) and shares the data with its volume until either side writes:
//!
//! ```text
//!   volumes: VolumeName ─▶ Volume ─ backend: Arc<MemoryBackend> ─┐ chunk map (one entry per
//!                           │  └ origin: the snapshot it was       │ written 4 KiB chunk)
//!                           │    cloned from                       ▼
//!                           └ snapshots: [Snapshot ─ data: MemoryBackend (duplicate, shares chunks)
//!                                                └ clones: volumes cloned from it]
//! ```
//!
//! Behaves like the ZFS provisioner where the catalog can see it: snapshots of several volumes are
//! one atomic point in time, a snapshot with clones cannot be deleted (nor can its volume), and
//! [`VolumeProvisioner::list`] reports origins. A forced shrink drops the data beyond the new end
//! (it reads as zeros if the volume grows again).
//!
//! Nothing outlives the process ([`VolumeProvisioner::durable`] is false): a node restarted on the
//! memory backend forgets the volumes of its previous run. Its capacity is the machine's memory
//! (`MemTotal` and `MemAvailable` of `/proc/meminfo`).
//!
//! Overhead: an empty volume costs its map entry (64 bytes in a table kept at most 7/8 full), one
//! `MemoryBackend` allocation (96 bytes with malloc's overhead) and its name: about 210 bytes at 100K
//! volumes and 265 at one million (the table has just doubled there), measured by the
//! `empty_volumes_are_small` test. A million idle volumes take about 250 MiB.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use nvmeof_target::{BlockBackend, MemoryBackend};
use parking_lot::RwLock;

use super::{check_block_size, check_size, check_spec, refuse_shrink};
use crate::provision::{
    Capacity, ListedVolume, ProvisionError, SnapshotName, SnapshotRef, Usage, VolumeName, VolumeProvisioner,
    VolumeSpec,
};

/// Volatile volumes in memory, for tests and scale runs (see the [module documentation](self)).
///
/// All operations take one lock over the volume map (a read lock for queries, resize and open); I/O
/// on an opened volume never takes it.
pub struct MemoryProvisioner {
    volumes: RwLock<HashMap<VolumeName, Volume>>,
    /// Random per instance: the [`VolumeProvisioner::location`] that tells a catalog whether its
    /// volumes are still here (the same provisioner, reopened in the same process) or gone.
    instance: String,
}

impl Default for MemoryProvisioner {
    fn default() -> Self {
        Self { volumes: RwLock::default(), instance: uuid::Uuid::new_v4().simple().to_string() }
    }
}

/// One volume. Kept small: a million of these must fit comfortably.
struct Volume {
    backend: Arc<MemoryBackend>,
    /// The snapshot this volume was cloned from (boxed: most volumes are not clones).
    origin: Option<Box<SnapshotRef>>,
    /// Its snapshots, oldest first.
    snapshots: Vec<Snapshot>,
}

/// One snapshot: a frozen duplicate of its volume.
struct Snapshot {
    name: SnapshotName,
    data: MemoryBackend,
    /// Volumes cloned from this snapshot; while there are any, it cannot be deleted.
    clones: Vec<VolumeName>,
}

impl MemoryProvisioner {
    /// An empty provisioner.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }
}

impl fmt::Debug for MemoryProvisioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the volumes themselves: there may be a million of them.
        f.debug_struct("MemoryProvisioner").field("volumes", &self.volumes.read().len()).finish()
    }
}

fn not_found(what: &impl fmt::Display) -> ProvisionError {
    ProvisionError::NotFound(what.to_string())
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn parse_meminfo(text: &str) -> Option<Capacity> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.get(name.len()..)?.trim().trim_end_matches("kB").trim().parse().ok()?;
        kib.checked_mul(1024)
    };
    Some(Capacity { total_bytes: field("MemTotal:")?, available_bytes: field("MemAvailable:")? })
}

impl VolumeProvisioner for MemoryProvisioner {
    fn kind(&self) -> &'static str {
        "memory"
    }

    /// `instance <random id>`: each provisioner is a backend of its own.
    fn location(&self) -> String {
        format!("instance {}", self.instance)
    }

    fn durable(&self) -> bool {
        false
    }

    /// The machine's memory.
    fn capacity(&self) -> Result<Option<Capacity>, ProvisionError> {
        let text = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| ProvisionError::io("reading /proc/meminfo", e))?;
        Ok(parse_meminfo(&text))
    }

    fn create(&self, spec: &VolumeSpec) -> Result<(), ProvisionError> {
        check_spec(spec, self.kind())?;
        let mut volumes = self.volumes.write();
        if volumes.contains_key(&spec.name) {
            return Err(ProvisionError::AlreadyExists(spec.name.to_string()));
        }
        let backend = Arc::new(
            MemoryBackend::new(spec.size_bytes, spec.block_size).with_stream_copy(crate::stream::stream_copy),
        );
        volumes.insert(spec.name.clone(), Volume { backend, origin: None, snapshots: Vec::new() });
        Ok(())
    }

    /// Takes every snapshot at one point in time: under the map's write lock, all names are checked
    /// first (each volume exists, no snapshot exists or is listed twice), then all volumes are
    /// duplicated while their chunk maps are locked together, so a write lands in all snapshots or in
    /// none.
    fn snapshot(&self, snapshots: &[SnapshotRef]) -> Result<(), ProvisionError> {
        let mut volumes = self.volumes.write();
        let mut sources = Vec::with_capacity(snapshots.len());
        for (i, s) in snapshots.iter().enumerate() {
            let volume = volumes.get(&s.volume).ok_or_else(|| not_found(&s.volume))?;
            if volume.snapshots.iter().any(|existing| existing.name == s.snapshot)
                || snapshots.iter().take(i).any(|earlier| earlier == s)
            {
                return Err(ProvisionError::AlreadyExists(s.to_string()));
            }
            sources.push(&*volume.backend);
        }
        let copies = MemoryBackend::duplicate_all(&sources);
        for (s, data) in snapshots.iter().zip(copies) {
            if let Some(volume) = volumes.get_mut(&s.volume) {
                volume.snapshots.push(Snapshot { name: s.snapshot.clone(), data, clones: Vec::new() });
            }
        }
        Ok(())
    }

    /// The clone keeps the snapshot's block size: `new.block_size` must match it.
    fn clone_snapshot(&self, origin: &SnapshotRef, new: &VolumeSpec) -> Result<(), ProvisionError> {
        check_spec(new, self.kind())?;
        let mut volumes = self.volumes.write();
        if volumes.contains_key(&new.name) {
            return Err(ProvisionError::AlreadyExists(new.name.to_string()));
        }
        let snapshot = volumes
            .get_mut(&origin.volume)
            .and_then(|v| v.snapshots.iter_mut().find(|s| s.name == origin.snapshot))
            .ok_or_else(|| not_found(origin))?;
        let block_size = snapshot.data.info().block_size;
        if new.block_size != block_size {
            return Err(ProvisionError::InvalidArgument(format!(
                "a clone of {origin} has its {block_size}-byte blocks, not {}",
                new.block_size
            )));
        }
        let origin_size = snapshot.data.size_bytes();
        if new.size_bytes < origin_size {
            return Err(ProvisionError::InvalidArgument(format!(
                "a clone of {origin} needs at least its {origin_size} bytes, got {}",
                new.size_bytes
            )));
        }
        let backend = snapshot.data.duplicate();
        if new.size_bytes > origin_size {
            backend
                .resize(new.size_bytes)
                .map_err(|e| ProvisionError::io(format!("growing {}", new.name), e))?;
        }
        snapshot.clones.push(new.name.clone());
        let volume = Volume {
            backend: Arc::new(backend),
            origin: Some(Box::new(origin.clone())),
            snapshots: Vec::new(),
        };
        volumes.insert(new.name.clone(), volume);
        Ok(())
    }

    /// Grows, or with `allow_shrink` shrinks (dropping the data beyond the new end). The size must be
    /// a non-zero multiple of the volume's block size. An opened volume sees the new size at once (it
    /// is the same object).
    fn resize(
        &self,
        name: &VolumeName,
        new_size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<(), ProvisionError> {
        let volumes = self.volumes.read();
        let volume = volumes.get(name).ok_or_else(|| not_found(name))?;
        check_size(new_size_bytes, volume.backend.info().block_size)?;
        let current = volume.backend.size_bytes();
        if new_size_bytes < current && !allow_shrink {
            return Err(refuse_shrink(name, current, new_size_bytes));
        }
        volume.backend.resize(new_size_bytes).map_err(|e| ProvisionError::io(format!("resizing {name}"), e))
    }

    fn delete_volume(&self, name: &VolumeName) -> Result<(), ProvisionError> {
        let mut volumes = self.volumes.write();
        let volume = volumes.get(name).ok_or_else(|| not_found(name))?;
        let dependents: Vec<String> =
            volume.snapshots.iter().flat_map(|s| &s.clones).map(VolumeName::to_string).collect();
        if !dependents.is_empty() {
            return Err(ProvisionError::HasDependents { what: name.to_string(), dependents });
        }
        let origin = volumes.remove(name).and_then(|v| v.origin);
        if let Some(origin) = origin {
            let snapshot = volumes
                .get_mut(&origin.volume)
                .and_then(|v| v.snapshots.iter_mut().find(|s| s.name == origin.snapshot));
            if let Some(snapshot) = snapshot {
                snapshot.clones.retain(|clone| clone != name);
            }
        }
        Ok(())
    }

    fn delete_snapshot(&self, snapshot: &SnapshotRef) -> Result<(), ProvisionError> {
        let mut volumes = self.volumes.write();
        let snapshots = &mut volumes.get_mut(&snapshot.volume).ok_or_else(|| not_found(snapshot))?.snapshots;
        let index =
            snapshots.iter().position(|s| s.name == snapshot.snapshot).ok_or_else(|| not_found(snapshot))?;
        let clones = snapshots.get(index).map(|s| s.clones.as_slice()).unwrap_or_default();
        if !clones.is_empty() {
            return Err(ProvisionError::HasDependents {
                what: snapshot.to_string(),
                dependents: clones.iter().map(VolumeName::to_string).collect(),
            });
        }
        snapshots.remove(index);
        Ok(())
    }

    fn exists(&self, name: &VolumeName) -> Result<bool, ProvisionError> {
        Ok(self.volumes.read().contains_key(name))
    }

    fn snapshot_exists(&self, snapshot: &SnapshotRef) -> Result<bool, ProvisionError> {
        let volumes = self.volumes.read();
        Ok(volumes
            .get(&snapshot.volume)
            .is_some_and(|v| v.snapshots.iter().any(|s| s.name == snapshot.snapshot)))
    }

    /// `used_bytes` is the memory holding the volume's written chunks, including chunks it still
    /// shares with its snapshots or origin (so `referenced_bytes` and `logical_used_bytes` are the
    /// same number).
    fn usage(&self, name: &VolumeName) -> Result<Usage, ProvisionError> {
        let volumes = self.volumes.read();
        let backend = &volumes.get(name).ok_or_else(|| not_found(name))?.backend;
        let used_bytes = backend.allocated_bytes();
        Ok(Usage {
            size_bytes: backend.size_bytes(),
            used_bytes,
            referenced_bytes: used_bytes,
            logical_used_bytes: used_bytes,
            compress_ratio: 1.0,
        })
    }

    /// Sorted by name; snapshots oldest first.
    fn list(&self) -> Result<Vec<ListedVolume>, ProvisionError> {
        let volumes = self.volumes.read();
        let mut listed: Vec<ListedVolume> = volumes
            .iter()
            .map(|(name, v)| ListedVolume {
                name: name.clone(),
                size_bytes: v.backend.size_bytes(),
                origin: v.origin.as_deref().cloned(),
                snapshots: v.snapshots.iter().map(|s| s.name.clone()).collect(),
            })
            .collect();
        drop(volumes);
        listed.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    }

    /// The same `Arc` every time. `block_size` must be the one the volume was created with.
    fn open(&self, name: &VolumeName, block_size: u32) -> Result<Arc<dyn BlockBackend>, ProvisionError> {
        check_block_size(block_size)?;
        let volumes = self.volumes.read();
        let backend = &volumes.get(name).ok_or_else(|| not_found(name))?.backend;
        let own = backend.info().block_size;
        if own != block_size {
            return Err(ProvisionError::InvalidArgument(format!(
                "{name} has {own}-byte blocks, asked to open it with {block_size}"
            )));
        }
        Ok(Arc::clone(backend) as Arc<dyn BlockBackend>)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{self as common, spec, vol};
    use super::*;

    #[test]
    fn lifecycle() {
        common::lifecycle(&MemoryProvisioner::new());
    }

    #[test]
    fn snapshots_of_several_volumes_are_all_or_none() {
        common::multi_snapshot_all_or_none(&MemoryProvisioner::new());
    }

    #[test]
    fn usage_follows_writes_and_discards() {
        common::usage_follows_writes_and_discards(&MemoryProvisioner::new());
    }

    #[test]
    fn open_returns_the_same_volume_every_time() {
        let p = MemoryProvisioner::new();
        p.create(&spec("v", 1 << 20, 512)).unwrap();
        let a = p.open(&vol("v"), 512).unwrap();
        common::write(&*a, 0, &[7; 4096]);
        let b = p.open(&vol("v"), 512).unwrap();
        assert_eq!(common::read(&*b, 0, 4096), vec![7; 4096], "data persists across activations");
        p.resize(&vol("v"), 2 << 20, false).unwrap();
        assert_eq!(a.size_bytes(), 2 << 20, "an open volume sees a resize at once");
        assert!(matches!(p.open(&vol("v"), 4096), Err(ProvisionError::InvalidArgument(_))));
    }

    #[test]
    fn capacity_is_the_machines_memory() {
        let text = "MemTotal:       24523456 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some(Capacity { total_bytes: 24_523_456 * 1024, available_bytes: 20_000_000 * 1024 })
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        let c = MemoryProvisioner::new().capacity().unwrap().unwrap();
        assert!(c.total_bytes > 0 && c.available_bytes <= c.total_bytes, "{c:?}");
        assert!(!MemoryProvisioner::new().durable());
    }

    #[test]
    fn snapshots_with_clones_cannot_be_deleted() {
        let p = MemoryProvisioner::new();
        p.create(&spec("v", 1 << 20, 512)).unwrap();
        let s = common::snap("v", "s");
        p.snapshot(std::slice::from_ref(&s)).unwrap();
        p.clone_snapshot(&s, &spec("c", 1 << 20, 512)).unwrap();
        let e = p.delete_snapshot(&s).unwrap_err();
        assert!(
            matches!(&e, ProvisionError::HasDependents { dependents, .. } if dependents == &["c"]),
            "{e:?}"
        );
        let e = p.delete_volume(&vol("v")).unwrap_err();
        assert!(matches!(e, ProvisionError::HasDependents { .. }), "{e:?}");
        let listed = p.list().unwrap();
        assert_eq!(listed.iter().find(|l| l.name == vol("c")).unwrap().origin, Some(s.clone()));
        p.delete_volume(&vol("c")).unwrap();
        p.delete_snapshot(&s).unwrap();
        p.delete_volume(&vol("v")).unwrap();
        assert!(p.list().unwrap().is_empty());
    }

    #[test]
    fn clones_keep_the_block_size_and_at_least_the_size() {
        let p = MemoryProvisioner::new();
        p.create(&spec("v", 1 << 20, 4096)).unwrap();
        let s = common::snap("v", "s");
        p.snapshot(std::slice::from_ref(&s)).unwrap();
        let e = p.clone_snapshot(&s, &spec("c", 1 << 20, 512)).unwrap_err();
        assert!(matches!(e, ProvisionError::InvalidArgument(_)), "{e:?}");
        let e = p.clone_snapshot(&s, &spec("c", 1 << 19, 4096)).unwrap_err();
        assert!(matches!(e, ProvisionError::InvalidArgument(_)), "{e:?}");
        assert!(!p.exists(&vol("c")).unwrap());
    }

    #[test]
    fn concurrent_creates_and_snapshots() {
        let p = MemoryProvisioner::new();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let p = &p;
                scope.spawn(move || {
                    for i in 0..500 {
                        let name = format!("t{t}-{i}");
                        p.create(&spec(&name, 1 << 20, 512)).unwrap();
                        common::write(&*p.open(&vol(&name), 512).unwrap(), 0, &[t as u8 + 1; 512]);
                        p.snapshot(&[common::snap(&name, "s")]).unwrap();
                    }
                });
            }
        });
        let listed = p.list().unwrap();
        assert_eq!(listed.len(), 2000);
        assert!(listed.iter().all(|l| l.snapshots.len() == 1));
        assert_eq!(p.usage(&vol("t3-499")).unwrap().used_bytes, 4096);
    }

    /// Measures the heap bytes of empty volumes (set `XATASTOR_MEM_VOLUMES` to change the count; the
    /// map's share depends on how full its table is at that count). Prints the result; the bound only
    /// catches a gross regression.
    #[test]
    fn empty_volumes_are_small() {
        let count: usize =
            std::env::var("XATASTOR_MEM_VOLUMES").ok().and_then(|n| n.parse().ok()).unwrap_or(100_000);
        let names: Vec<VolumeSpec> =
            (0..count).map(|i| spec(&format!("pvc-{i:08}"), 1 << 30, 4096)).collect();
        let before = alloc_count::live();
        let p = MemoryProvisioner::new();
        for s in &names {
            p.create(s).unwrap();
        }
        let after = alloc_count::live();
        let requested = (after.requested - before.requested) as f64 / count as f64;
        let malloc = (after.malloc - before.malloc) as f64 / count as f64;
        println!(
            "{count} empty memory volumes: {requested:.0} bytes/volume requested, ~{malloc:.0} bytes/volume \
             with glibc malloc's per-allocation overhead"
        );
        assert!(malloc < 512.0, "an empty volume costs {malloc:.0} bytes");
        drop(p);
    }

    /// Counts this thread's live heap bytes (a global allocator over the system one; per thread, so
    /// tests running in parallel do not disturb the measurement).
    mod alloc_count {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        thread_local! {
            static REQUESTED: Cell<i64> = const { Cell::new(0) };
            static MALLOC: Cell<i64> = const { Cell::new(0) };
        }

        /// Live bytes of this thread.
        #[derive(Clone, Copy)]
        pub(super) struct Live {
            /// As requested by the program.
            pub(super) requested: i64,
            /// As glibc malloc lays them out: an 8-byte header, 16-byte granules, 32 bytes at least.
            pub(super) malloc: i64,
        }

        pub(super) fn live() -> Live {
            Live { requested: REQUESTED.with(Cell::get), malloc: MALLOC.with(Cell::get) }
        }

        fn account(size: usize, sign: i64) {
            let chunk = (size + 8).div_ceil(16).max(2) * 16;
            let _ = REQUESTED.try_with(|c| c.set(c.get() + sign * size as i64));
            let _ = MALLOC.try_with(|c| c.set(c.get() + sign * chunk as i64));
        }

        struct Counting;

        // SAFETY: every call is forwarded unchanged to the system allocator; the counting only reads
        // sizes and touches const-initialised thread-locals (which never allocate).
        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which we pass on.
                let p = unsafe { System.alloc(layout) };
                if !p.is_null() {
                    account(layout.size(), 1);
                }
                p
            }

            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                // SAFETY: as for `alloc`.
                let p = unsafe { System.alloc_zeroed(layout) };
                if !p.is_null() {
                    account(layout.size(), 1);
                }
                p
            }

            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: `ptr` came from this allocator, i.e. from `System`, with `layout`.
                unsafe { System.dealloc(ptr, layout) };
                account(layout.size(), -1);
            }

            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                // SAFETY: `ptr` came from `System` with `layout`; the caller upholds the rest.
                let p = unsafe { System.realloc(ptr, layout, new_size) };
                if !p.is_null() {
                    account(layout.size(), -1);
                    account(new_size, 1);
                }
                p
            }
        }

        #[global_allocator]
        static GLOBAL: Counting = Counting;
    }
}
