//! [`VolumeProvisioner`](crate::VolumeProvisioner) implementations that need nothing but this crate:
//! memory (volatile, for tests and scale runs) and files in a data directory.
//!
//! ```text
//!   MemoryProvisioner                      FileProvisioner (<dir>)
//!   ─────────────────                      ───────────────────────────────────────────────
//!   name ─▶ Arc<MemoryBackend>             volumes/<name>.img              sparse file
//!           + snapshots: duplicates        snapshots/<volume>@<snap>.img   reflink copy
//!             sharing the 4 KiB chunks     .<file>.tmp                     being made
//! ```
//!
//! Neither backend compresses: a [`VolumeSpec`] with compression other than
//! `None` or `"off"` is refused with [`ProvisionError::Unsupported`].

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

pub mod file;
pub mod memory;

pub use file::FileProvisioner;
pub use memory::MemoryProvisioner;

use crate::provision::{ProvisionError, VolumeSpec};

/// Checks a block size: 512 or 4096.
fn check_block_size(block_size: u32) -> Result<(), ProvisionError> {
    if matches!(block_size, 512 | 4096) {
        Ok(())
    } else {
        Err(ProvisionError::InvalidArgument(format!("block size must be 512 or 4096, got {block_size}")))
    }
}

/// Checks a size: a non-zero multiple of `block_size`.
fn check_size(size_bytes: u64, block_size: u32) -> Result<(), ProvisionError> {
    if size_bytes == 0 || size_bytes % u64::from(block_size) != 0 {
        return Err(ProvisionError::InvalidArgument(format!(
            "size must be a non-zero multiple of the block size ({block_size}), got {size_bytes}"
        )));
    }
    Ok(())
}

/// The error for a smaller size without `allow_shrink`.
pub(crate) fn refuse_shrink(name: &crate::provision::VolumeName, current: u64, new: u64) -> ProvisionError {
    ProvisionError::InvalidArgument(format!(
        "shrinking {name} from {current} to {new} bytes destroys the data beyond the new end; it must be \
         forced"
    ))
}

/// Checks a spec for a backend without compression (`kind` names the backend in messages).
fn check_spec(spec: &VolumeSpec, kind: &str) -> Result<(), ProvisionError> {
    check_block_size(spec.block_size)?;
    check_size(spec.size_bytes, spec.block_size)?;
    match spec.compression.as_deref() {
        None | Some("off") => Ok(()),
        Some(other) => Err(ProvisionError::Unsupported(format!(
            "the {kind} backend has no compression (asked for {other:?}); use none or \"off\""
        ))),
    }
}

/// Scenarios every provisioner must pass, run by each backend's tests.
#[cfg(test)]
mod tests {
    use nvmeof_target::{execute_blocking, BlockBackend, ByteRange, IoOp, IoOutput};

    use crate::provision::{
        ProvisionError, SnapshotName, SnapshotRef, VolumeName, VolumeProvisioner, VolumeSpec,
    };

    pub(super) fn vol(name: &str) -> VolumeName {
        VolumeName::new(name).unwrap()
    }

    pub(super) fn snap(volume: &str, snapshot: &str) -> SnapshotRef {
        SnapshotRef { volume: vol(volume), snapshot: SnapshotName::new(snapshot).unwrap() }
    }

    pub(super) fn spec(name: &str, size_bytes: u64, block_size: u32) -> VolumeSpec {
        VolumeSpec { name: vol(name), size_bytes, block_size, compression: None }
    }

    pub(super) fn write(b: &dyn BlockBackend, offset: u64, data: &[u8]) {
        let data = bytes::Bytes::copy_from_slice(data).into();
        execute_blocking(b, IoOp::Write { offset, data, fua: false }).unwrap();
    }

    pub(super) fn read(b: &dyn BlockBackend, offset: u64, len: u32) -> Vec<u8> {
        match execute_blocking(b, IoOp::Read { offset, len }).unwrap() {
            IoOutput::Data(d) => d.to_bytes().to_vec(),
            other => panic!("a read returns data, not {other:?}"),
        }
    }

    fn flush(b: &dyn BlockBackend) {
        execute_blocking(b, IoOp::Flush).unwrap();
    }

    fn discard(b: &dyn BlockBackend, offset: u64, len: u64) {
        let ranges = [ByteRange { offset, len }].into_iter().collect();
        execute_blocking(b, IoOp::Discard { ranges }).unwrap();
    }

    /// `[fill; len]` followed by `[fill2; len2]`.
    fn two(fill: u8, len: usize, fill2: u8, len2: usize) -> Vec<u8> {
        let mut v = vec![fill; len];
        v.resize(len + len2, fill2);
        v
    }

    macro_rules! assert_err {
        ($result:expr, $pattern:pat) => {
            match $result {
                Err(e) => assert!(matches!(e, $pattern), "{}: got {e:?}", stringify!($result)),
                Ok(_) => panic!("{} succeeded", stringify!($result)),
            }
        };
    }
    pub(super) use assert_err;

    /// Create, write, snapshot, clone, resize, list, delete, with the typed errors of each step.
    pub(super) fn lifecycle(p: &dyn VolumeProvisioner) {
        use ProvisionError as E;
        let memory = p.kind() == "memory";
        assert!(p
            .capacity()
            .unwrap()
            .is_some_and(|c| c.total_bytes >= c.available_bytes && c.total_bytes > 0));
        const MIB: u64 = 1 << 20;

        // Arguments.
        assert_err!(p.create(&spec("v", MIB, 1024)), E::InvalidArgument(_));
        assert_err!(p.create(&spec("v", 1000, 512)), E::InvalidArgument(_));
        assert_err!(p.create(&spec("v", 0, 512)), E::InvalidArgument(_));
        assert_err!(p.create(&spec("v", MIB + 512, 4096)), E::InvalidArgument(_));
        let lz4 = VolumeSpec { compression: Some("lz4".into()), ..spec("v", MIB, 512) };
        assert_err!(p.create(&lz4), E::Unsupported(_));
        assert!(!p.exists(&vol("v")).unwrap(), "refused specs create nothing");
        p.create(&VolumeSpec { compression: Some("off".into()), ..spec("v-off", MIB, 4096) }).unwrap();

        // Create, open, write.
        p.create(&spec("v", MIB, 512)).unwrap();
        assert!(p.exists(&vol("v")).unwrap());
        assert!(!p.exists(&vol("w")).unwrap());
        assert_err!(p.create(&spec("v", MIB, 512)), E::AlreadyExists(_));
        assert_err!(p.open(&vol("w"), 512), E::NotFound(_));
        assert_err!(p.open(&vol("v"), 1000), E::InvalidArgument(_));
        let v = p.open(&vol("v"), 512).unwrap();
        assert_eq!(v.size_bytes(), MIB);
        assert_eq!(read(&*v, 0, 8192), vec![0; 8192], "a new volume reads as zeros");
        write(&*v, 0, &[1; 8192]);
        assert_eq!(read(&*v, 0, 8192), vec![1; 8192]);

        // Snapshot, then write more.
        let s1 = snap("v", "s1");
        assert!(!p.snapshot_exists(&s1).unwrap());
        p.snapshot(std::slice::from_ref(&s1)).unwrap();
        assert!(p.snapshot_exists(&s1).unwrap());
        assert!(!p.snapshot_exists(&snap("v", "s2")).unwrap());
        assert!(!p.snapshot_exists(&snap("w", "s1")).unwrap());
        assert_err!(p.snapshot(std::slice::from_ref(&s1)), E::AlreadyExists(_));
        assert_err!(p.snapshot(&[snap("w", "s1")]), E::NotFound(_));
        write(&*v, 0, &[2; 4096]);

        // Clone (grown): the snapshot-time data, independent of both sides' later writes.
        assert_err!(p.clone_snapshot(&snap("v", "nope"), &spec("c", 2 * MIB, 512)), E::NotFound(_));
        assert_err!(p.clone_snapshot(&s1, &spec("c", MIB / 2, 512)), E::InvalidArgument(_));
        assert_err!(p.clone_snapshot(&s1, &spec("v", 2 * MIB, 512)), E::AlreadyExists(_));
        p.clone_snapshot(&s1, &spec("c", 2 * MIB, 512)).unwrap();
        assert_err!(p.clone_snapshot(&s1, &spec("c", 2 * MIB, 512)), E::AlreadyExists(_));
        let c = p.open(&vol("c"), 512).unwrap();
        assert_eq!(c.size_bytes(), 2 * MIB);
        assert_eq!(read(&*c, 0, 8192), vec![1; 8192], "the clone has the snapshot's data");
        assert_eq!(read(&*c, 2 * MIB - 4096, 4096), vec![0; 4096], "the grown part reads as zeros");
        write(&*c, 4096, &[3; 4096]);
        write(&*v, 8192, &[4; 4096]);
        assert_eq!(read(&*v, 0, 12288), [two(2, 4096, 1, 4096), vec![4; 4096]].concat());
        assert_eq!(read(&*c, 0, 12288), [two(1, 4096, 3, 4096), vec![0; 4096]].concat());
        p.clone_snapshot(&s1, &spec("c2", MIB, 512)).unwrap();
        let c2 = p.open(&vol("c2"), 512).unwrap();
        assert_eq!(read(&*c2, 0, 12288), two(1, 8192, 0, 4096), "the snapshot did not change");

        // Resize.
        p.resize(&vol("v"), 4 * MIB, false).unwrap();
        assert_eq!(p.usage(&vol("v")).unwrap().size_bytes, 4 * MIB);
        let v = p.open(&vol("v"), 512).unwrap();
        assert_eq!(v.size_bytes(), 4 * MIB);
        assert_eq!(read(&*v, 0, 8192), two(2, 4096, 1, 4096), "growing keeps the data");
        assert_err!(p.resize(&vol("v"), 4 * MIB + 100, false), E::InvalidArgument(_));
        assert_err!(p.resize(&vol("v"), 0, true), E::InvalidArgument(_));
        assert_err!(p.resize(&vol("w"), 4 * MIB, false), E::NotFound(_));
        p.resize(&vol("v"), 4 * MIB, false).unwrap();
        // Shrinking: refused unless allowed; allowed, it drops the data beyond the new end.
        write(&*p.open(&vol("v"), 512).unwrap(), 3 * MIB, &[9; 4096]);
        assert_err!(p.resize(&vol("v"), 2 * MIB, false), E::InvalidArgument(_));
        assert_eq!(p.usage(&vol("v")).unwrap().size_bytes, 4 * MIB, "a refused shrink changes nothing");
        p.resize(&vol("v"), 2 * MIB, true).unwrap();
        assert_eq!(p.usage(&vol("v")).unwrap().size_bytes, 2 * MIB);
        p.resize(&vol("v"), 4 * MIB, false).unwrap();
        let v = p.open(&vol("v"), 512).unwrap();
        assert_eq!(read(&*v, 3 * MIB, 4096), vec![0; 4096], "shrunk away, then grown: zeros");
        assert_eq!(read(&*v, 0, 8192), two(2, 4096, 1, 4096), "the data before the new end stays");

        // List.
        let listed = p.list().unwrap();
        let names: Vec<&str> = listed.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["c", "c2", "v", "v-off"]);
        let [lc, _, lv, loff] = &listed[..] else { unreachable!() };
        assert_eq!(lv.snapshots, std::slice::from_ref(&s1.snapshot));
        assert_eq!(lc.size_bytes, 2 * MIB);
        assert_eq!(lc.origin, if memory { Some(s1.clone()) } else { None });
        assert_eq!((loff.size_bytes, loff.origin.clone(), loff.snapshots.len()), (MIB, None, 0));

        // Delete.
        drop((c, c2));
        if memory {
            assert_err!(p.delete_snapshot(&s1), E::HasDependents { .. });
            p.delete_volume(&vol("c")).unwrap();
            p.delete_volume(&vol("c2")).unwrap();
            p.delete_snapshot(&s1).unwrap();
        } else {
            p.delete_snapshot(&s1).unwrap();
            let c = p.open(&vol("c"), 512).unwrap();
            assert_eq!(read(&*c, 0, 8192), two(1, 4096, 3, 4096), "a clone outlives its snapshot");
            p.delete_volume(&vol("c")).unwrap();
            p.delete_volume(&vol("c2")).unwrap();
        }
        assert!(!p.snapshot_exists(&s1).unwrap());
        assert_err!(p.delete_snapshot(&s1), E::NotFound(_));
        assert_err!(p.delete_snapshot(&snap("w", "s1")), E::NotFound(_));
        p.snapshot(&[snap("v", "last")]).unwrap();
        p.delete_volume(&vol("v")).unwrap();
        assert!(!p.exists(&vol("v")).unwrap());
        assert!(!p.snapshot_exists(&snap("v", "last")).unwrap(), "a volume's snapshots go with it");
        assert_err!(p.delete_volume(&vol("v")), E::NotFound(_));
        assert_err!(p.open(&vol("v"), 512), E::NotFound(_));
        assert_err!(p.usage(&vol("v")), E::NotFound(_));
        p.delete_volume(&vol("v-off")).unwrap();
        assert!(p.list().unwrap().is_empty());
    }

    /// A multi-volume snapshot with one bad name creates none; a good one creates all.
    pub(super) fn multi_snapshot_all_or_none(p: &dyn VolumeProvisioner) {
        use ProvisionError as E;
        for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
            p.create(&spec(name, 1 << 20, 512)).unwrap();
            write(&*p.open(&vol(name), 512).unwrap(), 0, &[i as u8 + 1; 4096]);
        }
        p.snapshot(&[snap("b", "x")]).unwrap();
        assert_err!(p.snapshot(&[snap("a", "x"), snap("b", "x"), snap("c", "x")]), E::AlreadyExists(_));
        assert_err!(p.snapshot(&[snap("a", "y"), snap("missing", "y")]), E::NotFound(_));
        assert_err!(p.snapshot(&[snap("a", "z"), snap("a", "z")]), E::AlreadyExists(_));
        for s in [snap("a", "x"), snap("c", "x"), snap("a", "y"), snap("a", "z")] {
            assert!(!p.snapshot_exists(&s).unwrap(), "{s} was created by a failed call");
        }
        p.snapshot(&[]).unwrap();
        p.snapshot(&[snap("a", "x"), snap("c", "x"), snap("b", "y")]).unwrap();
        for s in [snap("a", "x"), snap("c", "x"), snap("b", "x"), snap("b", "y")] {
            assert!(p.snapshot_exists(&s).unwrap(), "{s}");
        }
        let listed = p.list().unwrap();
        let snapshots: Vec<Vec<&str>> = listed
            .iter()
            .map(|l| {
                let mut s: Vec<&str> = l.snapshots.iter().map(SnapshotName::as_str).collect();
                s.sort_unstable();
                s
            })
            .collect();
        assert_eq!(snapshots, [vec!["x"], vec!["x", "y"], vec!["x"]]);
        // Two snapshots of one volume in one call.
        p.snapshot(&[snap("c", "p"), snap("c", "q")]).unwrap();
        assert!(p.snapshot_exists(&snap("c", "p")).unwrap() && p.snapshot_exists(&snap("c", "q")).unwrap());
        p.delete_snapshot(&snap("c", "p")).unwrap();
        p.delete_snapshot(&snap("c", "q")).unwrap();
        for (i, name) in ["a", "c"].into_iter().enumerate() {
            let clone = format!("{name}-clone");
            p.clone_snapshot(&snap(name, "x"), &spec(&clone, 1 << 20, 512)).unwrap();
            let want = if name == "a" { 1 } else { 3 };
            assert_eq!(read(&*p.open(&vol(&clone), 512).unwrap(), 0, 4096), vec![want; 4096], "{i}");
        }
    }

    /// `used_bytes` grows with writes and shrinks with discards.
    pub(super) fn usage_follows_writes_and_discards(p: &dyn VolumeProvisioner) {
        const MIB: u64 = 1 << 20;
        p.create(&spec("u", 16 * MIB, 4096)).unwrap();
        let empty = p.usage(&vol("u")).unwrap();
        assert_eq!(empty.size_bytes, 16 * MIB);
        assert!(empty.used_bytes < 64 * 1024, "a new volume is thin: {empty:?}");
        let b = p.open(&vol("u"), 4096).unwrap();
        let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8 + 1).collect();
        write(&*b, 4 * MIB, &data);
        flush(&*b);
        let written = p.usage(&vol("u")).unwrap();
        assert!(written.used_bytes >= empty.used_bytes + 2 * MIB, "{empty:?} then {written:?}");
        assert_eq!(written.referenced_bytes, written.used_bytes);
        assert_eq!(written.logical_used_bytes, written.used_bytes);
        assert!((written.compress_ratio - 1.0).abs() < f64::EPSILON);
        discard(&*b, 4 * MIB, MIB);
        flush(&*b);
        let discarded = p.usage(&vol("u")).unwrap();
        assert!(discarded.used_bytes + MIB <= written.used_bytes, "{written:?} then {discarded:?}");
        assert_eq!(read(&*b, 4 * MIB, 4096), vec![0; 4096]);
        assert_eq!(read(&*b, 5 * MIB, 4096), data[MIB as usize..MIB as usize + 4096]);
    }
}
