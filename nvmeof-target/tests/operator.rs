//! What an operator sees: log lines (controller lifecycle, why a Connect was refused, per-command
//! warnings rate-limited, never a secret), Connects with an empty host NQN, the SMART log.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use nvmeof_proto::nvme::fabrics::{ConnectData, CNTLID_DYNAMIC};
use nvmeof_proto::nvme::Status;
use nvmeof_proto::Payload;
use nvmeof_target::auth::{HostSecrets, MemoryHostKeys};
use nvmeof_target::host::{self, HostOptions};
use nvmeof_target::{
    BackendInfo, BlockBackend, Completer, IoError, IoOp, NamespaceConfig, Submitted, SubsystemConfig, Target,
    TargetConfig,
};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;
use zerocopy::{FromZeros, IntoBytes};

/// Everything logged (at TRACE) on this thread while `f` runs.
fn capture<R>(f: impl FnOnce() -> R) -> (R, String) {
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Sink {
        type Writer = Sink;
        fn make_writer(&'a self) -> Sink {
            self.clone()
        }
    }
    let sink = Sink::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(sink.clone())
        .with_ansi(false)
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .finish();
    let guard = subscriber.set_default();
    let r = f();
    drop(guard);
    let text = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    (r, text)
}

fn lines_with<'a>(logs: &'a str, what: &str) -> Vec<&'a str> {
    logs.lines().filter(|l| l.contains(what)).collect()
}

#[test]
fn no_secret_reaches_the_log() {
    let now = Clock::new().0;
    let ((), logs) = capture(|| {
        let (target, keys) = target_with_auth(true);
        tracing::info!(?keys, secrets = ?keys_for_debug(&keys), "debug output of the key store");
        let mut ok = Link::new(&target, HostOptions::default(), now);
        bring_up_admin_auth(&mut ok, host_auth(HOST_SECRET, Some(CTRL_SECRET)), now);
        let mut bad = Link::new(&target, HostOptions::default(), now);
        let _ = connect_admin(&mut bad, SUBNQN, HOSTNQN, 5000, now);
        let _ = authenticate(&mut bad, host_auth(OTHER_SECRET, None), 1, 1, now);
        keys.set(SUBNQN, HOSTNQN, HostSecrets::new(secret(OTHER_SECRET)));
        let _ = authenticate(&mut ok, host_auth(OTHER_SECRET, None), 2, 2, now);
    });
    assert!(logs.contains("host authenticated"), "the capture works: {logs}");
    assert!(logs.contains("authentication failed"), "{logs}");
    for s in [HOST_SECRET, CTRL_SECRET, OTHER_SECRET] {
        let b64 = s.split(':').nth(2).unwrap();
        assert!(!logs.contains(b64), "base64 of a secret in the log");
        assert!(!logs.contains(&b64[..16]), "part of a secret in the log");
    }
    // HOST_SECRET's key is the bytes 00 01 02 … 1f: neither as a list nor as hex.
    assert!(!logs.contains("0, 1, 2, 3, 4, 5, 6, 7"));
    assert!(!logs.contains("000102030405060708"));
}

fn keys_for_debug(keys: &MemoryHostKeys) -> Option<Arc<HostSecrets>> {
    use nvmeof_target::auth::HostKeys;
    keys.host_secrets(SUBNQN, HOSTNQN)
}

/// A backend whose every request fails (a full disk).
#[derive(Debug)]
struct Full;

impl BlockBackend for Full {
    fn size_bytes(&self) -> u64 {
        1 << 20
    }
    fn info(&self) -> BackendInfo {
        nvmeof_target::MemoryBackend::new(1 << 20, 512).info()
    }
    fn submit(&self, _op: IoOp, _completer: Completer) -> Submitted {
        Submitted::Done(Err(IoError::NoSpace))
    }
}

#[test]
fn backend_failures_are_logged_once_per_second() {
    let mut clock = Clock::new();
    let now = clock.0;
    let ((), logs) = capture(|| {
        let target = Target::new(TargetConfig::default());
        let mut sc = SubsystemConfig::new(SUBNQN, "FULL1");
        sc.allowed_hosts.push(HOSTNQN.into());
        target.add_subsystem(sc).unwrap();
        target.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 1, Arc::new(Full))).unwrap();
        let (_admin, mut io, _) = io_setup(&target, HostOptions::default(), 0, now);
        for i in 0..500 {
            let c = write(&mut io, i, vec![0; 512], now);
            assert_eq!(c.status(), Status::CAPACITY_EXCEEDED.with_dnr(), "{:?}", c.status());
        }
        let later = clock.advance(Duration::from_millis(1500));
        write(&mut io, 0, vec![0; 512], later);
        for _ in 0..3 {
            write(&mut io, 0, vec![0; 512], later);
        }
        drop(io);
    });
    let lines = lines_with(&logs, "backend I/O failed");
    assert_eq!(lines.len(), 3, "first, then one with the count, then the rest at close: {lines:#?}");
    assert!(lines[0].contains("suppressed=0"), "{}", lines[0]);
    assert!(lines[1].contains("suppressed=499"), "{}", lines[1]);
    assert!(lines[2].contains("3 more not logged"), "{}", lines[2]);
}

/// A full disk under ten hosts: 10,000 failed commands log one line target-wide, and each connection
/// says at its close how many of its failures were not logged; a host writing invalid CCs over and
/// over logs one line.
#[test]
fn ten_thousand_failed_commands_log_a_bounded_number_of_lines() {
    let now = Clock::new().0;
    let ((), logs) = capture(|| {
        let target = Target::new(TargetConfig::default());
        let mut sc = SubsystemConfig::new(SUBNQN, "FULL2");
        sc.allowed_hosts.push(HOSTNQN.into());
        target.add_subsystem(sc).unwrap();
        target.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 1, Arc::new(Full))).unwrap();
        let mut links = Vec::new();
        for _ in 0..10 {
            links.push(io_setup(&target, HostOptions::default(), 0, now));
        }
        for (_, io, _) in &mut links {
            for i in 0..1000 {
                let c = write(io, i, vec![0; 512], now);
                assert_eq!(c.status(), Status::CAPACITY_EXCEEDED.with_dnr());
            }
        }
        // Invalid CC values (I/O queue entry sizes of 2^0), enabled and disabled 2,000 times.
        let (admin, _, _) = &mut links[0];
        for _ in 0..2000 {
            for cc in [0x0000_0001u64, 0] {
                let r = admin.command(
                    host::property_set(0x14, nvmeof_proto::nvme::registers::PropertyWidth::Four, cc),
                    None,
                    0,
                    now,
                );
                assert_eq!(r.status(), Status::SUCCESS);
            }
        }
        drop(links);
    });
    let failed = lines_with(&logs, "backend I/O failed");
    assert!(failed.len() <= 11, "{} lines: {failed:#?}", failed.len());
    assert!(failed[0].contains("suppressed=0"), "{}", failed[0]);
    // Every failure is accounted for: the one logged, and the counts at close.
    let counted: u64 = failed
        .iter()
        .filter_map(|l| l.split(" more not logged").next()?.rsplit(": ").next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(counted + 1, 10_000, "{failed:#?}");
    assert_eq!(lines_with(&logs, "invalid CC").len(), 1);
    let warnings = logs.lines().filter(|l| l.contains(" WARN ")).count();
    assert!(warnings <= 12, "{warnings} warnings");
}

#[test]
fn controller_lifecycle_is_logged() {
    let mut clock = Clock::new();
    let now = clock.0;
    let ((), logs) = capture(|| {
        let (target, _) = target_with_volume();
        let mut admin = Link::new(&target, HostOptions::default(), now);
        bring_up_admin(&mut admin, SUBNQN, 0, now);
        let d = admin.command(nvmeof_proto::nvme::fabrics::DisconnectCommand::new(0).to_sqe(), None, 0, now);
        assert_eq!(d.status(), Status::SUCCESS);
        let mut idle = Link::new(&target, HostOptions::default(), now);
        bring_up_admin(&mut idle, SUBNQN, 1000, now);
        let t = clock.advance(Duration::from_secs(2));
        idle.conn.handle_timeout(t);
        idle.drain_events(t);
    });
    let created = lines_with(&logs, "controller created");
    assert_eq!(created.len(), 2, "{logs}");
    assert!(created[0].contains(&format!("host={HOSTNQN}")), "{}", created[0]);
    assert!(created[0].contains(SUBNQN), "{}", created[0]);
    assert!(created[0].contains("cntlid="));
    let removed = lines_with(&logs, "controller removed");
    assert_eq!(removed.len(), 2, "{logs}");
    assert!(removed[0].contains("reason=\"host disconnected\""), "{}", removed[0]);
    assert!(removed[1].contains("reason=\"keep-alive timeout\""), "{}", removed[1]);
    assert!(created.iter().chain(&removed).all(|l| l.contains("INFO")));
}

#[test]
fn refused_connects_say_why_and_who() {
    let now = Clock::new().0;
    let ((), logs) = capture(|| {
        let (target, _) = target_with_volume();
        let mut l = Link::new(&target, HostOptions::default(), now);
        let c = connect_admin(&mut l, "nqn.2026-01.io.xatastor:nope", HOSTNQN, 0, now);
        assert_eq!(c.status(), Status::CONNECT_INVALID_PARAMETERS.with_dnr());
        let mut l = Link::new(&target, HostOptions::default(), now);
        let c = connect_admin(&mut l, SUBNQN, "nqn.2014-08.io.example:stranger", 0, now);
        assert_eq!(c.status(), Status::CONNECT_INVALID_HOST.with_dnr());
        // A host NQN field without its terminator.
        let mut data = ConnectData::new(HOSTID, CNTLID_DYNAMIC, SUBNQN, HOSTNQN).unwrap();
        data.hostnqn = [b'x'; 256];
        let mut l = Link::new(&target, HostOptions::default(), now);
        l.pump(now);
        let (sqe, _) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, HOSTID, SUBNQN, HOSTNQN);
        let c = l.command(sqe, Some(Payload::from(data.as_bytes().to_vec())), 0, now);
        assert_eq!(c.status(), Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    });
    let refused = lines_with(&logs, "Connect refused");
    assert_eq!(refused.len(), 3, "{logs}");
    assert!(
        refused[0].contains("reason=\"no such subsystem\"")
            && refused[0].contains("subsystem=nqn.2026-01.io.xatastor:nope")
    );
    assert!(
        refused[1].contains("reason=\"host not allowed\"")
            && refused[1].contains("host=nqn.2014-08.io.example:stranger")
    );
    assert!(
        refused[2].contains("reason=\"host NQN not NUL-terminated\"") && refused[2].contains("host=xxxx")
    );
    assert!(!logs.contains("host=?"), "{logs}");
}

fn connect_with_empty_hostnqn(target: &Target, subnqn: &str, now: std::time::Instant) -> (Status, Link) {
    let mut data = ConnectData::new_zeroed();
    data.hostid = HOSTID;
    data.cntlid.set(CNTLID_DYNAMIC);
    data.set_subnqn(subnqn).unwrap();
    let mut l = Link::new(target, HostOptions::default(), now);
    l.pump(now);
    let (sqe, _) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, HOSTID, SUBNQN, HOSTNQN);
    let status = l.command(sqe, Some(Payload::from(data.as_bytes().to_vec())), 0, now).status();
    (status, l)
}

/// SPDK's perf sends an empty host NQN unless told one: accepted where any host may connect (as
/// Linux's and SPDK's targets do), refused as an unknown host elsewhere.
#[test]
fn an_empty_host_nqn_connects_where_any_host_may() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    assert_eq!(connect_with_empty_hostnqn(&target, SUBNQN, now).0, Status::CONNECT_INVALID_HOST.with_dnr());
    allow_any(&target, SUBNQN);
    let (status, _io_host) = connect_with_empty_hostnqn(&target, SUBNQN, now);
    assert_eq!(status, Status::SUCCESS);
    let (status, _discovery) =
        connect_with_empty_hostnqn(&target, nvmeof_proto::nvme::discovery::DISCOVERY_NQN, now);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(target.controllers().iter().filter(|c| c.hostnqn.is_empty()).count(), 2);
    // Where authentication is required it still must authenticate (and cannot: no secret names it).
    target.set_auth_required(SUBNQN, true).unwrap();
    target.set_host_keys(Arc::new(MemoryHostKeys::new()));
    let (status, mut l) = connect_with_empty_hostnqn(&target, SUBNQN, now);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!(identify(&mut l, 1, 0, now).status(), Status::AUTHENTICATION_REQUIRED.with_dnr());
}

#[test]
fn smart_log_reports_no_made_up_temperature() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut admin = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut admin, SUBNQN, 0, now);
    let smart = get_log_page(&mut admin, 0x02, 0xffff_ffff, 0, 512, false, now);
    assert_eq!(smart.status(), Status::SUCCESS);
    let bytes = smart.data.to_bytes();
    assert_eq!(&bytes[1..3], &[0, 0], "Composite Temperature: not reported");
    assert_eq!(bytes[3], 100, "available spare");
}
