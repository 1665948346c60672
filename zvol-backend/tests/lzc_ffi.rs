//! `LzcZfs` through the real FFI against a stand-in libzfs_core (`tests/fake_lzc/fake_lzc.c`) that
//! logs every call with its nvlists (read with the real libnvpair) and fails on request. This checks
//! argument order, nvlist contents, errlist handling and errno mapping without a ZFS kernel module.
//!
//! Needs a C compiler and the real `libnvpair.so.3` (Debian `libnvpair3linux`, OpenZFS 2.1):
//!
//! ```sh
//! apt-get download libnvpair3linux && dpkg -x libnvpair3linux_*.deb /tmp/zfslibs
//! XATASTOR_ZFS_LIB_DIR=/tmp/zfslibs/lib/x86_64-linux-gnu cargo test -p zvol-backend --test lzc_ffi -- --ignored
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use xatastor_core::ProvisionError;
use zvol_backend::zfs::{CloneProps, VolumeProps};
use zvol_backend::{CommandZfs, LzcConfig, LzcZfs, ZfsOps};

fn take_log(dir: &Path, name: &str) -> Vec<String> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    text.lines().map(str::to_owned).collect()
}

fn fail_next(dir: &Path, op: &str, errno: i32, name: Option<&str>) {
    std::fs::write(dir.join(format!("errno_{op}")), errno.to_string()).unwrap();
    if let Some(n) = name {
        std::fs::write(dir.join(format!("errname_{op}")), n).unwrap();
    }
}

#[test]
#[ignore = "needs cc and the real libnvpair.so.3 in $XATASTOR_ZFS_LIB_DIR (see the file's documentation)"]
fn lzc_calls_through_the_ffi() {
    let lib_dir = std::env::var("XATASTOR_ZFS_LIB_DIR").expect("XATASTOR_ZFS_LIB_DIR is not set");
    let nvpair = format!("{lib_dir}/libnvpair.so.3");
    assert!(Path::new(&nvpair).exists(), "{nvpair} is missing");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fake = dir.join("libzfs_core.so.3");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_lzc/fake_lzc.c");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
        .arg(&fake)
        .arg(format!("-DCTL_DIR=\"{}\"", dir.display()))
        .arg(&src)
        .arg(&nvpair)
        .output()
        .expect("cc must run");
    assert!(out.status.success(), "cc failed: {}", String::from_utf8_lossy(&out.stderr));

    // The zfs command for what libzfs_core lacks: a script answering `list` and `get clones`.
    let zfs = dir.join("zfs");
    std::fs::write(
        &zfs,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}/cmdlog'\ncase \"$1\" in\n\
             list) printf 'tank/x/a\\tvolume\\t1073741824\\t-\\ntank/x/a/child\\tvolume\\t1073741824\\t-\\n' ;;\n\
             get) echo 'tank/x/c1,tank/x/c2' ;;\nesac\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&zfs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = LzcConfig { libzfs_core: vec![fake.display().to_string()], libnvpair: vec![nvpair.clone()] };

    // libzfs_core_init failing (no /dev/zfs) is the clear "not available" error.
    fail_next(dir, "init", libc::ENOENT, None);
    let e = LzcZfs::load(&config, CommandZfs::with_program(&zfs)).unwrap_err().to_string();
    assert!(e.starts_with("ZFS is not available: libzfs_core_init failed: No such file or directory"), "{e}");
    assert_eq!(take_log(dir, "log"), ["init"]);

    let lzc = LzcZfs::load(&config, CommandZfs::with_program(&zfs)).unwrap();
    assert_eq!(lzc.implementation(), "libzfs_core");
    assert_eq!(take_log(dir, "log"), ["init"]);

    // create: a zvol (type 3), no key, volsize/volblocksize/compression as uint64 (lz4 = 15).
    let props = VolumeProps { volsize: 1 << 30, volblocksize: 16384, compression: Some("lz4".into()) };
    lzc.create_volume("tank/x/a", &props).unwrap();
    lzc.create_volume("tank/x/b", &VolumeProps { compression: None, ..props.clone() }).unwrap();
    assert_eq!(
        take_log(dir, "log"),
        [
            "create tank/x/a type=3 key=null/0 volsize=1073741824 volblocksize=16384 compression=15",
            "create tank/x/b type=3 key=null/0 volsize=1073741824 volblocksize=16384",
        ]
    );
    for (errno, check) in [
        (
            libc::EEXIST,
            (|e: &ProvisionError| matches!(e, ProvisionError::AlreadyExists(n) if n == "tank/x/a"))
                as fn(&_) -> bool,
        ),
        (libc::ENOENT, |e| matches!(e, ProvisionError::NotFound(n) if n.starts_with("tank/x (parent"))),
        (libc::ENOSPC, |e| matches!(e, ProvisionError::NoSpace(_))),
        (libc::EDOM, |e| matches!(e, ProvisionError::InvalidArgument(_))),
        (libc::EIO, |e| matches!(e, ProvisionError::Io { .. })),
    ] {
        fail_next(dir, "create", errno, None);
        let e = lzc.create_volume("tank/x/a", &props).unwrap_err();
        assert!(check(&e), "errno {errno}: {e:?}");
    }
    take_log(dir, "log");
    // A compression level the lzc table lacks goes through `zfs create`.
    lzc.create_volume("tank/x/z", &VolumeProps { compression: Some("zstd-7".into()), ..props.clone() })
        .unwrap();
    assert_eq!(take_log(dir, "log"), Vec::<String>::new());
    assert_eq!(
        take_log(dir, "cmdlog"),
        ["create -s -V 1073741824 -o volblocksize=16384 -o compression=zstd-7 tank/x/z"]
    );

    // snapshot: one call, all names as booleans, no props; the errlist names the failing one.
    lzc.snapshot(&["tank/x/a@s".into(), "tank/x/b@s".into()]).unwrap();
    assert_eq!(take_log(dir, "log"), ["snapshot props=null tank/x/a@s tank/x/b@s"]);
    fail_next(dir, "snapshot", libc::EEXIST, Some("tank/x/b@s"));
    let e = lzc.snapshot(&["tank/x/a@s".into(), "tank/x/b@s".into()]).unwrap_err();
    assert!(matches!(&e, ProvisionError::AlreadyExists(n) if n == "tank/x/b@s"), "{e:?}");
    fail_next(dir, "snapshot", libc::EXDEV, None);
    assert!(matches!(lzc.snapshot(&["tank/x/a@t".into()]), Err(ProvisionError::InvalidArgument(_))));
    fail_next(dir, "snapshot", libc::ENOENT, Some("tank/x/gone@t"));
    assert!(
        matches!(lzc.snapshot(&["tank/x/gone@t".into()]), Err(ProvisionError::NotFound(n)) if n == "tank/x/gone")
    );
    lzc.snapshot(&[]).unwrap();
    take_log(dir, "log");

    // clone: (new name, origin) in that order, compression as a number (zstd = 16).
    lzc.clone_snapshot("tank/x/a@s", "tank/x/c", &CloneProps { compression: Some("zstd".into()) }).unwrap();
    lzc.clone_snapshot("tank/x/a@s", "tank/x/d", &CloneProps::default()).unwrap();
    assert_eq!(
        take_log(dir, "log"),
        ["clone tank/x/c origin=tank/x/a@s compression=16", "clone tank/x/d origin=tank/x/a@s"]
    );
    fail_next(dir, "clone", libc::ENOENT, None);
    assert!(matches!(
        lzc.clone_snapshot("tank/x/a@nope", "tank/x/e", &CloneProps::default()),
        Err(ProvisionError::NotFound(n)) if n == "tank/x/a@nope"
    ));
    std::fs::write(dir.join("exists"), "tank/x/a@s\n").unwrap();
    fail_next(dir, "clone", libc::ENOENT, None);
    assert!(matches!(
        lzc.clone_snapshot("tank/x/a@s", "tank/gone/e", &CloneProps::default()),
        Err(ProvisionError::NotFound(n)) if n.starts_with("tank/gone (parent")
    ));
    take_log(dir, "log");

    // destroy: EBUSY is Busy; EEXIST (children) names them through `zfs list`.
    lzc.destroy("tank/x/d").unwrap();
    assert_eq!(take_log(dir, "log"), ["destroy tank/x/d"]);
    fail_next(dir, "destroy", libc::EBUSY, None);
    assert!(matches!(lzc.destroy("tank/x/a"), Err(ProvisionError::Busy(n)) if n == "tank/x/a"));
    fail_next(dir, "destroy", libc::EEXIST, None);
    match lzc.destroy("tank/x/a") {
        Err(ProvisionError::HasDependents { what, dependents }) => {
            assert_eq!((what.as_str(), dependents), ("tank/x/a", vec!["tank/x/a/child".to_owned()]));
        }
        other => panic!("{other:?}"),
    }
    take_log(dir, "log");
    take_log(dir, "cmdlog");

    // destroy_snaps: one call, defer = B_FALSE; EEXIST (clones) names them through `zfs get clones`.
    lzc.destroy_snapshots(&["tank/x/a@s".into(), "tank/x/a@t".into()]).unwrap();
    assert_eq!(take_log(dir, "log"), ["destroy_snaps defer=0 tank/x/a@s tank/x/a@t"]);
    fail_next(dir, "destroy_snaps", libc::EEXIST, Some("tank/x/a@t"));
    match lzc.destroy_snapshots(&["tank/x/a@s".into(), "tank/x/a@t".into()]) {
        Err(ProvisionError::HasDependents { what, dependents }) => {
            assert_eq!(what, "tank/x/a@t");
            assert_eq!(dependents, ["tank/x/c1", "tank/x/c2"]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(take_log(dir, "cmdlog"), ["get -H -o value clones tank/x/a@t"]);
    fail_next(dir, "destroy_snaps", libc::EBUSY, None);
    assert!(
        matches!(lzc.destroy_snapshots(&["tank/x/a@s".into()]), Err(ProvisionError::Busy(n)) if n == "tank/x/a@s")
    );
    take_log(dir, "log");

    // exists
    assert!(lzc.exists("tank/x/a@s").unwrap());
    assert!(!lzc.exists("tank/x/nope").unwrap());
    assert_eq!(take_log(dir, "log"), ["exists tank/x/a@s", "exists tank/x/nope"]);

    // Dropping the last handle calls libzfs_core_fini.
    drop(lzc);
    assert_eq!(take_log(dir, "log"), ["fini"]);
}
