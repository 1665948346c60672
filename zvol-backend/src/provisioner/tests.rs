//! `ZfsProvisioner` against a fake control path that records every call and can fail any of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use super::*;
use crate::zfs::{DatasetProps, ListEntry};

#[derive(Clone, Debug, PartialEq)]
enum Call {
    Create { dataset: String, props: VolumeProps },
    Snapshot(Vec<String>),
    Clone { origin: String, dataset: String, props: CloneProps },
    Destroy(String),
    DestroySnapshots(Vec<String>),
    SetVolsize(String, u64),
    Properties(String),
    Exists(String),
    List(String),
    Snapshots(String),
    Clones(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Create,
    Snapshot,
    Clone,
    Destroy,
    DestroySnapshots,
    SetVolsize,
    Properties,
    Exists,
    List,
}

#[derive(Clone, Debug)]
struct Vol {
    volsize: u64,
    volblocksize: u64,
    origin: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    volumes: BTreeMap<String, Vol>,
    snapshots: BTreeMap<String, u64>,
    calls: Vec<Call>,
    fail: HashMap<Op, ProvisionError>,
    busy: BTreeSet<String>,
}

/// A ZFS in memory: enough semantics to be believable, every call recorded.
#[derive(Debug, Default)]
struct FakeZfs(Mutex<State>);

impl FakeZfs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }
    fn fail_next(&self, op: Op, e: ProvisionError) {
        self.state().fail.insert(op, e);
    }
    fn add_volume(&self, ds: &str, volsize: u64) {
        self.state().volumes.insert(ds.into(), Vol { volsize, volblocksize: 16384, origin: None });
    }
    fn add_snapshot(&self, snap: &str) {
        let mut s = self.state();
        let size = s.volumes.get(zfs::dataset_of(snap)).map_or(0, |v| v.volsize);
        s.snapshots.insert(snap.into(), size);
    }
    /// Records the call and returns an injected failure for `op`, if any.
    fn enter(&self, op: Op, call: Call) -> Result<std::sync::MutexGuard<'_, State>, ProvisionError> {
        let mut s = self.state();
        s.calls.push(call);
        match s.fail.remove(&op) {
            Some(e) => Err(e),
            None => Ok(s),
        }
    }
    fn clones_of(s: &State, snap: &str) -> Vec<String> {
        s.volumes.iter().filter(|(_, v)| v.origin.as_deref() == Some(snap)).map(|(n, _)| n.clone()).collect()
    }
}

impl ZfsOps for FakeZfs {
    fn implementation(&self) -> &'static str {
        "fake"
    }
    fn create_volume(&self, dataset: &str, props: &VolumeProps) -> Result<(), ProvisionError> {
        let mut s = self.enter(Op::Create, Call::Create { dataset: dataset.into(), props: props.clone() })?;
        if s.volumes.contains_key(dataset) {
            return Err(ProvisionError::AlreadyExists(dataset.into()));
        }
        let vol = Vol { volsize: props.volsize, volblocksize: u64::from(props.volblocksize), origin: None };
        s.volumes.insert(dataset.into(), vol);
        Ok(())
    }
    fn snapshot(&self, snapshots: &[String]) -> Result<(), ProvisionError> {
        let mut s = self.enter(Op::Snapshot, Call::Snapshot(snapshots.to_vec()))?;
        for snap in snapshots {
            if !s.volumes.contains_key(zfs::dataset_of(snap)) {
                return Err(ProvisionError::NotFound(zfs::dataset_of(snap).into()));
            }
            if s.snapshots.contains_key(snap) {
                return Err(ProvisionError::AlreadyExists(snap.clone()));
            }
        }
        for snap in snapshots {
            let size = s.volumes.get(zfs::dataset_of(snap)).map_or(0, |v| v.volsize);
            s.snapshots.insert(snap.clone(), size);
        }
        Ok(())
    }
    fn clone_snapshot(&self, origin: &str, dataset: &str, props: &CloneProps) -> Result<(), ProvisionError> {
        let call = Call::Clone { origin: origin.into(), dataset: dataset.into(), props: props.clone() };
        let mut s = self.enter(Op::Clone, call)?;
        let Some(&volsize) = s.snapshots.get(origin) else {
            return Err(ProvisionError::NotFound(origin.into()));
        };
        if s.volumes.contains_key(dataset) {
            return Err(ProvisionError::AlreadyExists(dataset.into()));
        }
        s.volumes.insert(dataset.into(), Vol { volsize, volblocksize: 16384, origin: Some(origin.into()) });
        Ok(())
    }
    fn destroy(&self, dataset: &str) -> Result<(), ProvisionError> {
        let mut s = self.enter(Op::Destroy, Call::Destroy(dataset.into()))?;
        if !s.volumes.contains_key(dataset) {
            return Err(ProvisionError::NotFound(dataset.into()));
        }
        if s.busy.contains(dataset) {
            return Err(ProvisionError::Busy(dataset.into())); // the device is open
        }
        if s.snapshots.keys().any(|k| zfs::dataset_of(k) == dataset) {
            return Err(ProvisionError::Busy(dataset.into())); // ZFS: EBUSY while it has snapshots
        }
        s.volumes.remove(dataset);
        Ok(())
    }
    fn destroy_snapshots(&self, snapshots: &[String]) -> Result<(), ProvisionError> {
        let mut s = self.enter(Op::DestroySnapshots, Call::DestroySnapshots(snapshots.to_vec()))?;
        for snap in snapshots {
            let clones = Self::clones_of(&s, snap);
            if !clones.is_empty() {
                return Err(ProvisionError::HasDependents { what: snap.clone(), dependents: clones });
            }
        }
        for snap in snapshots {
            s.snapshots.remove(snap);
        }
        Ok(())
    }
    fn set_volsize(&self, dataset: &str, volsize: u64) -> Result<(), ProvisionError> {
        let mut s = self.enter(Op::SetVolsize, Call::SetVolsize(dataset.into(), volsize))?;
        let v = s.volumes.get_mut(dataset).ok_or_else(|| ProvisionError::NotFound(dataset.into()))?;
        v.volsize = volsize;
        Ok(())
    }
    fn properties(&self, dataset: &str) -> Result<DatasetProps, ProvisionError> {
        let s = self.enter(Op::Properties, Call::Properties(dataset.into()))?;
        if dataset == "tank/xs" {
            return Ok(DatasetProps { used: 7000, available: Some(5000), ..DatasetProps::default() });
        }
        let (volsize, volblocksize, origin) = if let Some(v) = s.volumes.get(dataset) {
            (v.volsize, v.volblocksize, v.origin.clone())
        } else if let Some(&size) = s.snapshots.get(dataset) {
            (size, 16384, None)
        } else {
            return Err(ProvisionError::NotFound(dataset.into()));
        };
        Ok(DatasetProps {
            used: 1000,
            referenced: 2000,
            logical_used: 3000,
            compress_ratio: 1.5,
            volsize: Some(volsize),
            volblocksize: Some(volblocksize),
            origin,
            available: Some(5000),
        })
    }
    fn exists(&self, dataset: &str) -> Result<bool, ProvisionError> {
        let s = self.enter(Op::Exists, Call::Exists(dataset.into()))?;
        Ok(s.volumes.contains_key(dataset) || s.snapshots.contains_key(dataset))
    }
    fn list(&self, parent: &str) -> Result<Vec<ListEntry>, ProvisionError> {
        let s = self.enter(Op::List, Call::List(parent.into()))?;
        let vols = s.volumes.iter().map(|(n, v)| ListEntry {
            name: n.clone(),
            kind: DatasetKind::Volume,
            volsize: Some(v.volsize),
            origin: v.origin.clone(),
        });
        let snaps = s.snapshots.iter().map(|(n, &size)| ListEntry {
            name: n.clone(),
            kind: DatasetKind::Snapshot,
            volsize: Some(size),
            origin: None,
        });
        Ok(vols.chain(snaps).filter(|e| e.name.starts_with(&format!("{parent}/"))).collect())
    }
    fn snapshots(&self, dataset: &str) -> Result<Vec<String>, ProvisionError> {
        let mut s = self.state();
        s.calls.push(Call::Snapshots(dataset.into()));
        if !s.volumes.contains_key(dataset) {
            return Err(ProvisionError::NotFound(dataset.into()));
        }
        Ok(s.snapshots.keys().filter(|k| zfs::dataset_of(k) == dataset).cloned().collect())
    }
    fn clones(&self, snapshot: &str) -> Result<Vec<String>, ProvisionError> {
        let mut s = self.state();
        s.calls.push(Call::Clones(snapshot.into()));
        Ok(Self::clones_of(&s, snapshot))
    }
}

const GIB: u64 = 1 << 30;

/// A provisioner on a fake, without retrying busy destroys (so injected `Busy` errors surface).
fn setup() -> (Arc<FakeZfs>, ZfsProvisioner) {
    let fake = Arc::new(FakeZfs::default());
    let config = ZfsConfig { busy_retry: Duration::ZERO, ..ZfsConfig::new("tank/xs") };
    let p = ZfsProvisioner::with_ops(config, fake.clone()).unwrap();
    (fake, p)
}

fn vol(s: &str) -> VolumeName {
    VolumeName::new(s).unwrap()
}

fn snap(v: &str, s: &str) -> SnapshotRef {
    SnapshotRef { volume: vol(v), snapshot: SnapshotName::new(s).unwrap() }
}

fn spec(name: &str, size_bytes: u64) -> VolumeSpec {
    VolumeSpec { name: vol(name), size_bytes, block_size: 4096, compression: None }
}

#[test]
fn create_makes_a_sparse_zvol_with_volblocksize_and_compression() {
    let (fake, p) = setup();
    assert_eq!(p.kind(), "zvol");
    let s = VolumeSpec { compression: Some("lz4".into()), ..spec("db1", GIB) };
    p.create(&s).unwrap();
    assert_eq!(
        fake.calls(),
        vec![Call::Create {
            dataset: "tank/xs/db1".into(),
            props: VolumeProps { volsize: GIB, volblocksize: 16384, compression: Some("lz4".into()) },
        }]
    );
    assert!(matches!(p.create(&s), Err(ProvisionError::AlreadyExists(_))), "repeating reports AlreadyExists");
}

#[test]
fn create_refuses_bad_arguments_without_calling_zfs() {
    let (fake, p) = setup();
    let cases = [
        spec("a", GIB + 4096),                             // not a multiple of volblocksize
        spec("a", 0),                                      // empty
        VolumeSpec { block_size: 1024, ..spec("a", GIB) }, // block size
        VolumeSpec { compression: Some("lz4 -o x".into()), ..spec("a", GIB) },
        VolumeSpec { compression: Some(String::new()), ..spec("a", GIB) },
    ];
    for s in cases {
        assert!(matches!(p.create(&s), Err(ProvisionError::InvalidArgument(_))), "{s:?}");
    }
    assert_eq!(fake.calls(), vec![]);
    let long = vol(&"x".repeat(128));
    let long_parent = ZfsProvisioner::with_ops(ZfsConfig::new("p".repeat(127)), fake.clone()).unwrap();
    assert!(matches!(long_parent.dataset(&long), Err(ProvisionError::InvalidArgument(_))), "255-byte limit");
    for bad in ["", "/tank", "tank/", "tank//x", "tank@s", "tank/../x"] {
        assert!(ZfsProvisioner::with_ops(ZfsConfig::new(bad), fake.clone()).is_err(), "{bad:?}");
    }
    let odd = ZfsConfig { volblocksize: 3000, ..ZfsConfig::new("tank") };
    assert!(ZfsProvisioner::with_ops(odd, fake.clone()).is_err());
}

#[test]
fn snapshot_of_several_volumes_is_one_call() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/a", GIB);
    fake.add_volume("tank/xs/b", GIB);
    p.snapshot(&[snap("b", "s1"), snap("a", "s1"), snap("a", "s1")]).unwrap();
    assert_eq!(fake.calls(), vec![Call::Snapshot(vec!["tank/xs/a@s1".into(), "tank/xs/b@s1".into()])]);
    assert!(matches!(
        p.snapshot(&[snap("a", "s2"), snap("a", "s3")]),
        Err(ProvisionError::InvalidArgument(_))
    ));
    p.snapshot(&[]).unwrap();
    assert_eq!(fake.calls(), vec![Call::Snapshot(vec![])], "an empty list is passed on (a no-op for ZFS)");
    // All or none: one existing snapshot fails the whole call.
    assert!(matches!(p.snapshot(&[snap("a", "s2"), snap("b", "s1")]), Err(ProvisionError::AlreadyExists(_))));
    assert!(!p.snapshot_exists(&snap("a", "s2")).unwrap());
}

#[test]
fn clone_grows_after_cloning_and_refuses_to_shrink() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/base", GIB);
    fake.add_snapshot("tank/xs/base@s");
    fake.calls();
    let new = VolumeSpec { compression: Some("zstd".into()), ..spec("branch", 2 * GIB) };
    p.clone_snapshot(&snap("base", "s"), &new).unwrap();
    assert_eq!(
        fake.calls(),
        vec![
            Call::Properties("tank/xs/base@s".into()),
            Call::Clone {
                origin: "tank/xs/base@s".into(),
                dataset: "tank/xs/branch".into(),
                props: CloneProps { compression: Some("zstd".into()) },
            },
            Call::SetVolsize("tank/xs/branch".into(), 2 * GIB),
        ]
    );
    // Same size: no volsize change.
    p.clone_snapshot(&snap("base", "s"), &spec("same", GIB)).unwrap();
    assert!(!fake.calls().iter().any(|c| matches!(c, Call::SetVolsize(..))));
    // Smaller: refused before anything is created.
    match p.clone_snapshot(&snap("base", "s"), &spec("small", GIB / 2)) {
        Err(ProvisionError::Unsupported(m)) => assert!(m.contains("shrinking"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.calls(), vec![Call::Properties("tank/xs/base@s".into())]);
    // Missing origin: NotFound naming the snapshot.
    assert!(matches!(
        p.clone_snapshot(&snap("base", "nope"), &spec("x", GIB)),
        Err(ProvisionError::NotFound(n)) if n == "base@nope"
    ));
}

#[test]
fn clone_that_cannot_grow_is_removed_again() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/base", GIB);
    fake.add_snapshot("tank/xs/base@s");
    fake.calls();
    fake.fail_next(Op::SetVolsize, ProvisionError::NoSpace("tank/xs/big".into()));
    assert!(matches!(
        p.clone_snapshot(&snap("base", "s"), &spec("big", 4 * GIB)),
        Err(ProvisionError::NoSpace(_))
    ));
    let calls = fake.calls();
    assert_eq!(calls.last(), Some(&Call::Destroy("tank/xs/big".into())), "{calls:?}");
    assert!(!p.exists(&vol("big")).unwrap());
}

#[test]
fn resize_grows_shrinks_only_when_allowed_and_ignores_same_size() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/a", GIB);
    fake.calls();
    p.resize(&vol("a"), 2 * GIB, false).unwrap();
    assert_eq!(
        fake.calls(),
        vec![Call::Properties("tank/xs/a".into()), Call::SetVolsize("tank/xs/a".into(), 2 * GIB)]
    );
    p.resize(&vol("a"), 2 * GIB, false).unwrap();
    assert_eq!(fake.calls(), vec![Call::Properties("tank/xs/a".into())]);
    assert!(matches!(p.resize(&vol("a"), GIB, false), Err(ProvisionError::InvalidArgument(_))));
    assert_eq!(fake.calls(), vec![Call::Properties("tank/xs/a".into())], "a refused shrink sets nothing");
    assert!(matches!(p.resize(&vol("a"), 2 * GIB + 512, false), Err(ProvisionError::InvalidArgument(_))));
    assert!(matches!(p.resize(&vol("nope"), GIB, false), Err(ProvisionError::NotFound(n)) if n == "nope"));
    // A forced shrink is one `zfs set volsize`.
    fake.calls();
    p.resize(&vol("a"), GIB, true).unwrap();
    assert_eq!(
        fake.calls(),
        vec![Call::Properties("tank/xs/a".into()), Call::SetVolsize("tank/xs/a".into(), GIB)]
    );
    assert!(matches!(p.resize(&vol("a"), GIB / 2 + 512, true), Err(ProvisionError::InvalidArgument(_))));
}

#[test]
fn location_and_capacity_are_the_parent_datasets() {
    let (_fake, p) = setup();
    assert_eq!(p.location(), "tank/xs");
    assert!(p.durable());
    assert_eq!(
        p.capacity().unwrap(),
        Some(xatastor_core::Capacity { total_bytes: 12000, available_bytes: 5000 })
    );
}

#[test]
fn delete_volume_destroys_snapshots_then_the_volume() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/a", GIB);
    fake.add_snapshot("tank/xs/a@s1");
    fake.add_snapshot("tank/xs/a@s2");
    fake.calls();
    p.delete_volume(&vol("a")).unwrap();
    assert_eq!(
        fake.calls(),
        vec![
            Call::Snapshots("tank/xs/a".into()),
            Call::DestroySnapshots(vec!["tank/xs/a@s1".into(), "tank/xs/a@s2".into()]),
            Call::Destroy("tank/xs/a".into()),
        ]
    );
    assert!(matches!(p.delete_volume(&vol("a")), Err(ProvisionError::NotFound(n)) if n == "a"));
}

#[test]
fn delete_retries_a_briefly_busy_volume_and_reports_a_busy_one() {
    let fake = Arc::new(FakeZfs::default());
    let p = ZfsProvisioner::with_ops(ZfsConfig::new("tank/xs"), fake.clone()).unwrap();
    assert_eq!(ZfsConfig::new("x").busy_retry, Duration::from_secs(1), "retrying is the default");
    fake.add_volume("tank/xs/a", GIB);
    fake.calls();
    // Busy once (udev probing a new device): retried, then gone.
    fake.fail_next(Op::Destroy, ProvisionError::Busy("tank/xs/a".into()));
    p.delete_volume(&vol("a")).unwrap();
    let destroys = fake.calls().iter().filter(|c| matches!(c, Call::Destroy(_))).count();
    assert_eq!(destroys, 2);
    // Busy for good (a host has it open): Busy, named after the volume, after the retry window.
    let config = ZfsConfig { busy_retry: Duration::from_millis(50), ..ZfsConfig::new("tank/xs") };
    let p = ZfsProvisioner::with_ops(config, fake.clone()).unwrap();
    fake.add_volume("tank/xs/b", GIB);
    fake.state().busy.insert("tank/xs/b".into());
    assert!(matches!(p.delete_volume(&vol("b")), Err(ProvisionError::Busy(n)) if n == "b"));
    assert!(p.exists(&vol("b")).unwrap());
    // Retrying can be switched off.
    let config = ZfsConfig { busy_retry: Duration::ZERO, ..ZfsConfig::new("tank/xs") };
    let p = ZfsProvisioner::with_ops(config, fake.clone()).unwrap();
    fake.calls();
    assert!(matches!(p.delete_volume(&vol("b")), Err(ProvisionError::Busy(_))));
    assert_eq!(fake.calls().iter().filter(|c| matches!(c, Call::Destroy(_))).count(), 1);
}

#[test]
fn delete_with_dependent_clones_names_them() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/a", GIB);
    fake.add_snapshot("tank/xs/a@s1");
    p.clone_snapshot(&snap("a", "s1"), &spec("c1", GIB)).unwrap();
    fake.calls();
    match p.delete_volume(&vol("a")) {
        Err(ProvisionError::HasDependents { what, dependents }) => {
            assert_eq!(what, "a");
            assert_eq!(dependents, vec!["c1"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(!fake.calls().contains(&Call::Destroy("tank/xs/a".into())), "the volume is not touched");
    match p.delete_snapshot(&snap("a", "s1")) {
        Err(ProvisionError::HasDependents { what, dependents }) => {
            assert_eq!((what.as_str(), dependents), ("a@s1", vec!["c1".to_owned()]));
        }
        other => panic!("{other:?}"),
    }
    // Delete the clone, then the snapshot goes.
    p.delete_volume(&vol("c1")).unwrap();
    p.delete_snapshot(&snap("a", "s1")).unwrap();
    assert!(!p.snapshot_exists(&snap("a", "s1")).unwrap());
}

#[test]
fn delete_snapshot_of_a_missing_snapshot_is_not_found_without_destroying() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/a", GIB);
    fake.calls();
    assert!(
        matches!(p.delete_snapshot(&snap("a", "gone")), Err(ProvisionError::NotFound(n)) if n == "a@gone")
    );
    assert_eq!(fake.calls(), vec![Call::Exists("tank/xs/a@gone".into())]);
}

#[test]
fn every_error_kind_of_the_control_path_reaches_the_caller() {
    use ProvisionError as E;
    let kinds: [fn() -> E; 6] = [
        || E::AlreadyExists("x".into()),
        || E::NotFound("x".into()),
        || E::Busy("x".into()),
        || E::NoSpace("x".into()),
        || E::HasDependents { what: "x".into(), dependents: vec!["tank/xs/d".into()] },
        || E::Backend("boom".into()),
    ];
    let same = |a: &E, b: &E| std::mem::discriminant(a) == std::mem::discriminant(b);
    for make in kinds {
        let (fake, p) = setup();
        fake.add_volume("tank/xs/a", GIB);
        fake.add_snapshot("tank/xs/a@s");

        fake.fail_next(Op::Create, make());
        assert!(same(&p.create(&spec("n", GIB)).unwrap_err(), &make()), "create");

        fake.fail_next(Op::Snapshot, make());
        assert!(same(&p.snapshot(&[snap("a", "t")]).unwrap_err(), &make()), "snapshot");

        fake.fail_next(Op::Clone, make());
        assert!(same(&p.clone_snapshot(&snap("a", "s"), &spec("c", GIB)).unwrap_err(), &make()), "clone");

        fake.fail_next(Op::Exists, make());
        assert!(same(&p.exists(&vol("a")).unwrap_err(), &make()), "exists");

        fake.fail_next(Op::List, make());
        assert!(same(&p.list().unwrap_err(), &make()), "list");

        fake.fail_next(Op::SetVolsize, make());
        assert!(same(&p.resize(&vol("a"), 2 * GIB, false).unwrap_err(), &make()), "resize");

        fake.fail_next(Op::DestroySnapshots, make());
        let e = p.delete_volume(&vol("a")).unwrap_err();
        assert!(same(&e, &make()), "delete_volume: {e:?}");
        if let E::HasDependents { what, dependents } = e {
            assert_eq!(
                (what.as_str(), dependents),
                ("a", vec!["d".to_owned()]),
                "names relative to the parent"
            );
        }

        let (fake, p) = setup();
        fake.add_volume("tank/xs/a", GIB);
        fake.fail_next(Op::Destroy, make());
        let e = p.delete_volume(&vol("a")).unwrap_err();
        assert!(same(&e, &make()), "destroy: {e:?}");
        if matches!(e, E::Busy(_) | E::NotFound(_)) {
            assert!(e.to_string().starts_with("a "), "reported with the volume name: {e}");
        }

        fake.fail_next(Op::Properties, make());
        let e = p.usage(&vol("a")).unwrap_err();
        assert!(same(&e, &make()), "usage: {e:?}");
    }
}

#[test]
fn usage_comes_from_the_properties() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/a", GIB);
    let u = p.usage(&vol("a")).unwrap();
    assert_eq!(
        u,
        Usage {
            size_bytes: GIB,
            used_bytes: 1000,
            referenced_bytes: 2000,
            logical_used_bytes: 3000,
            compress_ratio: 1.5
        }
    );
}

#[test]
fn list_is_one_call_with_snapshots_and_origins() {
    let (fake, p) = setup();
    fake.add_volume("tank/xs/a", GIB);
    fake.add_snapshot("tank/xs/a@s1");
    fake.add_snapshot("tank/xs/a@s2");
    p.clone_snapshot(&snap("a", "s1"), &spec("b", 2 * GIB)).unwrap();
    {
        let mut s = fake.state();
        // Things the catalog cannot hold are skipped.
        s.volumes.insert("tank/xs/deep/er".into(), Vol { volsize: GIB, volblocksize: 16384, origin: None });
        s.volumes.insert("tank/xs/-bad".into(), Vol { volsize: GIB, volblocksize: 16384, origin: None });
        s.volumes.insert(
            "tank/xs/foreign".into(),
            Vol { volsize: GIB, volblocksize: 16384, origin: Some("other/pool@x".into()) },
        );
    }
    fake.calls();
    let listed = p.list().unwrap();
    assert_eq!(fake.calls(), vec![Call::List("tank/xs".into())], "one listing");
    assert_eq!(
        listed,
        vec![
            ListedVolume {
                name: vol("a"),
                size_bytes: GIB,
                origin: None,
                snapshots: vec![SnapshotName::new("s1").unwrap(), SnapshotName::new("s2").unwrap()],
            },
            ListedVolume {
                name: vol("b"),
                size_bytes: 2 * GIB,
                origin: Some(snap("a", "s1")),
                snapshots: vec![]
            },
            ListedVolume { name: vol("foreign"), size_bytes: GIB, origin: None, snapshots: vec![] },
        ]
    );
}

mod open {
    use super::*;
    use std::time::Instant;

    fn dev_tree(fake: &Arc<FakeZfs>, timeout: Duration) -> (tempfile::TempDir, ZfsProvisioner) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("dev/zvol/tank/xs")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys/block")).unwrap();
        let resolver = DeviceResolver::new()
            .with_roots(dir.path().join("dev"), dir.path().join("sys/block"))
            .with_timeout(timeout)
            .with_scan(Duration::from_millis(10), Duration::from_millis(10));
        let p = ZfsProvisioner::with_ops(ZfsConfig::new("tank/xs"), fake.clone())
            .unwrap()
            .with_resolver(resolver);
        (dir, p)
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // measuring that nothing waits
    fn open_resolves_the_device_and_returns_a_zvol_backend() {
        let fake = Arc::new(FakeZfs::default());
        let (dir, p) = dev_tree(&fake, Duration::from_secs(5));
        fake.add_volume("tank/xs/a", 8 << 20);
        // The "device": a file standing in for /dev/zd0, linked like udev does.
        let dev = dir.path().join("dev/zd0");
        std::fs::File::create(&dev).unwrap().set_len(8 << 20).unwrap();
        std::os::unix::fs::symlink(&dev, dir.path().join("dev/zvol/tank/xs/a")).unwrap();
        let b = p.open(&vol("a"), 4096).unwrap();
        assert_eq!(b.size_bytes(), 8 << 20);
        assert_eq!(b.info().block_size, 4096);
        assert!(b.info().volatile_write_cache);
        let raw = b.raw_device().unwrap();
        assert!(raw.direct || raw.alignment == 1);

        // A volume that does not exist: NotFound at once, not after the timeout.
        let start = Instant::now();
        assert!(matches!(p.open(&vol("nope"), 4096), Err(ProvisionError::NotFound(n)) if n == "nope"));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(matches!(p.open(&vol("a"), 1000), Err(ProvisionError::InvalidArgument(_))));
    }

    #[test]
    fn open_of_a_volume_whose_device_never_appears_times_out_clearly() {
        let fake = Arc::new(FakeZfs::default());
        let (_dir, p) = dev_tree(&fake, Duration::from_millis(100));
        fake.add_volume("tank/xs/slow", GIB);
        match p.open(&vol("slow"), 4096) {
            Err(ProvisionError::Backend(m)) => {
                assert!(m.contains("tank/xs/slow") && m.contains("did not appear within 0.1s"), "{m}");
            }
            other => panic!("{other:?}"),
        }
    }
}
