//! Prompt host detach: namespaces taken away from chosen controllers (with a Namespace Attribute
//! Changed event) before their connections are cut, and the hosts' reconnects answered with an
//! empty controller so that they stop retrying.

mod common;

use common::*;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_target::host::{self, HostOptions};
use nvmeof_target::CloseReason;

/// Enables namespace attribute events (as Linux does) and leaves an AER outstanding; returns its CID.
fn arm_events(admin: &mut Link, now: std::time::Instant) -> u16 {
    assert_eq!(set_features(admin, 0x0b, 1 << 8, now).status(), Status::SUCCESS);
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    let cid = admin.host.submit(aer, None, 0);
    admin.pump(now);
    cid
}

/// The NSIDs of the active namespace list.
fn active_list(admin: &mut Link, now: std::time::Instant) -> Vec<u32> {
    let c = identify(admin, 2, 0, now);
    assert_eq!(c.status(), Status::SUCCESS);
    c.data
        .to_bytes()
        .chunks(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .take_while(|&n| n != 0)
        .collect()
}

#[test]
fn detach_hides_the_namespaces_raises_the_event_and_waits_for_the_host() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (mut admin, mut io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    let aer = arm_events(&mut admin, now);
    assert_eq!(write(&mut io, 8, vec![0x5a; 512], now).status(), Status::SUCCESS);
    assert_eq!(active_list(&mut admin, now), [1]);

    let detach = target.detach_namespaces(SUBNQN, None);
    assert_eq!(detach.len(), 1);
    assert!(!detach.is_acknowledged(), "the host has not looked yet");
    admin.conn.handle_wakeup(now);
    admin.pump(now);
    assert_eq!(admin.take_completion(aer).cqe.dw0.get(), 0x0004_0002, "namespace attribute changed");

    // I/O to the namespace fails at once (no more writes land), before the host even looked.
    let r = read(&mut io, 8, 1, now);
    assert_eq!(r.status(), Status::INVALID_NAMESPACE.with_dnr());
    assert_eq!(write(&mut io, 8, vec![1; 512], now).status(), Status::INVALID_NAMESPACE.with_dnr());

    // Linux: Changed Namespace List, then the active namespace list: empty. That is the
    // acknowledgement; Identify Namespace shows the namespace inactive (all zeros).
    let changed = get_log_page(&mut admin, 0x04, 0xffff_ffff, 0, 4096, false, now);
    assert_eq!(&changed.data.to_bytes()[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert!(!detach.is_acknowledged());
    assert_eq!(active_list(&mut admin, now), Vec::<u32>::new());
    assert!(detach.is_acknowledged());
    let ns = identify(&mut admin, 0, 1, now);
    assert!(ns.data.iter_bytes().all(|b| b == 0), "an inactive namespace identifies as zeros");
    assert_eq!(identify(&mut admin, 3, 1, now).status(), Status::INVALID_NAMESPACE.with_dnr());
    // Nothing was cut yet: the caller cuts now.
    assert!(admin.closed.is_none() && io.closed.is_none());
    target.remove_subsystem(SUBNQN, true).unwrap();
    admin.conn.handle_wakeup(now);
    admin.drain_events(now);
    io.conn.handle_wakeup(now);
    io.drain_events(now);
    assert_eq!(admin.closed, Some(CloseReason::ControllerGone));
    assert_eq!(io.closed, Some(CloseReason::ControllerGone));
}

#[test]
fn the_hosts_reconnects_get_an_empty_controller_until_it_disconnects() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (mut admin, _io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    arm_events(&mut admin, now);
    let detach = target.detach_namespaces(SUBNQN, None);
    assert_eq!(target.tombstone_count(), 1);
    assert!(!detach.is_empty());
    target.remove_subsystem(SUBNQN, true).unwrap();
    drop(admin);

    // The host reconnects (admin and I/O queue) the way Linux does: accepted, no namespace.
    let (mut admin, mut io, cntlid) = io_setup(&target, HostOptions::default(), 5000, now);
    assert!(target.controllers().iter().any(|c| c.cntlid == cntlid && c.subnqn == SUBNQN));
    assert_eq!(active_list(&mut admin, now), Vec::<u32>::new());
    assert_eq!(read(&mut io, 0, 1, now).status(), Status::INVALID_NAMESPACE.with_dnr());
    assert!(target.subsystem(SUBNQN).is_none(), "the tombstone is not a subsystem");

    // `nvme disconnect`: the controller goes, and with it the tombstone; a new connect is refused.
    drop(io);
    drop(admin);
    assert_eq!(target.tombstone_count(), 0);
    let mut again = Link::new(&target, HostOptions::default(), now);
    again.pump(now);
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, HOSTID, SUBNQN, HOSTNQN);
    let c = again.command(sqe, Some(data), 0, now);
    assert_eq!(c.status(), Status::CONNECT_INVALID_PARAMETERS.with_dnr());
}

#[test]
fn detaching_one_host_leaves_the_others_alone() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000002";
    target.allow_host(SUBNQN, other).unwrap();
    let (mut admin, _io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    arm_events(&mut admin, now);
    let mut admin2 = Link::new(&target, HostOptions::default(), now);
    admin2.pump(now);
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, [9; 16], SUBNQN, other);
    assert_eq!(admin2.command(sqe, Some(data), 0, now).status(), Status::SUCCESS);

    let detach = target.detach_namespaces(SUBNQN, Some(other));
    assert_eq!(detach.len(), 1);
    // The other controller is not enabled: it cannot be told, so there is nothing to wait for.
    assert!(detach.is_acknowledged());
    assert_eq!(active_list(&mut admin, now), [1], "HOSTNQN keeps its namespace");
    assert!(admin.pending_completions().is_empty(), "and gets no event");
    target.deny_host(SUBNQN, other, true).unwrap();
    assert_eq!(target.controllers().len(), 1);
    // A host that lost access without a detach is refused as before.
    let stranger = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000003";
    let mut s = Link::new(&target, HostOptions::default(), now);
    s.pump(now);
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, [3; 16], SUBNQN, stranger);
    assert_eq!(s.command(sqe, Some(data), 0, now).status(), Status::CONNECT_INVALID_HOST.with_dnr());
    // The detached host reconnects to an empty controller even though it is denied now.
    let mut back = Link::new(&target, HostOptions::default(), now);
    back.pump(now);
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, [9; 16], SUBNQN, other);
    assert_eq!(back.command(sqe, Some(data), 0, now).status(), Status::SUCCESS);
}

#[test]
fn a_host_that_did_not_ask_for_namespace_events_is_not_waited_for() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (_admin, _io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    let detach = target.detach_namespaces(SUBNQN, None);
    assert_eq!(detach.len(), 1);
    assert!(detach.is_acknowledged());
    assert!(target.detach_namespaces("nqn.2026-01.io.xatastor:none", None).is_empty());
}

/// Host keys that fail closed for a subsystem once it is "gone" (as a storage node's do for a deleted
/// volume): every host would have to authenticate, and could not.
struct FailClosedOnceGone {
    gone: std::sync::atomic::AtomicBool,
    unknown: std::sync::Arc<nvmeof_target::auth::HostSecrets>,
}

impl nvmeof_target::auth::HostKeys for FailClosedOnceGone {
    fn host_secrets(&self, _: &str, _: &str) -> Option<std::sync::Arc<nvmeof_target::auth::HostSecrets>> {
        self.gone.load(std::sync::atomic::Ordering::SeqCst).then(|| self.unknown.clone())
    }
}

#[test]
fn a_tombstone_asks_for_authentication_as_the_subsystem_did_at_the_detach() {
    use nvmeof_target::auth::{DhchapSecret, HostSecrets};
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let secret = DhchapSecret::parse("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:").unwrap();
    let keys = std::sync::Arc::new(FailClosedOnceGone {
        gone: false.into(),
        unknown: std::sync::Arc::new(HostSecrets::new(secret)),
    });
    target.set_host_keys(keys.clone());
    let (admin, _io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    let _ = target.detach_namespaces(SUBNQN, None);
    target.remove_subsystem(SUBNQN, true).unwrap();
    drop(admin);
    keys.gone.store(true, std::sync::atomic::Ordering::SeqCst);
    // The host did not authenticate before: its reconnect is answered without authentication.
    let mut back = Link::new(&target, HostOptions::default(), now);
    back.pump(now);
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, HOSTID, SUBNQN, HOSTNQN);
    let c = back.command(sqe, Some(data), 0, now);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(c.cqe.dw0.get() >> 16 & 0x3, 0, "no authentication asked for (AUTHREQ clear)");
}
