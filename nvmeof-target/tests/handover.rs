//! Handing connections and controllers to another target (a new process in production): held
//! commands run once, on the new side; the controller keeps its CNTLID, keep-alive time and pending
//! events; a partial PDU carries over; an unknown format version is refused.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nvmeof_proto::nvme::features::AsyncEvent;
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::Payload;
use nvmeof_target::host::HostOptions;
use nvmeof_target::{
    CloseReason, ConnectionPhase, HandoverError, HandoverState, MemoryBackend, NamespaceConfig,
    SubsystemConfig, Target, TargetConfig, HANDOVER_FORMAT_VERSION,
};

fn keep_alive() -> Sqe {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x18;
    sqe
}

fn aer() -> Sqe {
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x0c;
    sqe
}

/// A second target serving the same volume (the same backend), as a new process would.
fn successor(backend: Arc<MemoryBackend>) -> Target {
    let target = Target::new(TargetConfig::default());
    let mut sc = SubsystemConfig::new(SUBNQN, "XS0001");
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    target.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 1, backend)).unwrap();
    target
}

/// Exports both links' connections and their controller, through the byte format.
fn export(old: &Target, links: &mut [&mut Link], cntlid: u16, now: Instant) -> HandoverState {
    let mut state = HandoverState::default();
    state.controllers.push(old.export_controller(SUBNQN, cntlid, now).expect("controller"));
    for link in links.iter_mut() {
        assert!(link.conn.handover_ready(), "ready: {:?}", link.conn);
        let mut c = link.conn.export_handover(now).unwrap();
        c.unread_input = std::mem::take(&mut link.to_target).to_vec();
        state.connections.push(c);
    }
    let bytes = state.encode().unwrap();
    HandoverState::decode(&bytes).unwrap()
}

/// Installs the imported connections in the links (the host side stays as it is: same TCP stream).
fn import(new: &Target, state: &HandoverState, links: &mut [&mut Link], now: Instant) {
    for c in &state.controllers {
        new.import_controller(c, now).unwrap();
    }
    for (link, c) in links.iter_mut().zip(&state.connections) {
        let conn = new.import_connection(c, params(), now).unwrap();
        // The old side is dropped without a word to the host (the process exits).
        let old = std::mem::replace(&mut link.conn, conn);
        std::mem::forget(old);
        link.to_target.extend_from_slice(&c.unread_input);
        link.conn.end_handover(now);
        link.pump(now);
    }
}

#[test]
fn held_commands_run_once_on_the_new_side_and_the_controller_goes_on() {
    let mut clock = Clock::new();
    let now = clock.0;
    let (old, backend) = target_with_volume();
    let (mut admin, mut io, cntlid) = io_setup(&old, HostOptions::default(), 10_000, now);
    // Namespace events on, one AER outstanding (the Linux host keeps one).
    assert_eq!(set_features(&mut admin, 0x0b, 1 << 8, now).status(), Status::SUCCESS);
    let aer_cid = admin.host.submit(aer(), None, 0);
    admin.pump(now);
    assert_eq!(write(&mut io, 8, vec![0xa5; 4096], now).status(), Status::SUCCESS);

    // 4 s of the 10 s keep-alive pass, then the handover starts.
    let now = clock.advance(Duration::from_secs(4));
    admin.conn.begin_handover();
    io.conn.begin_handover();
    // Commands that arrive now are held: no answer yet.
    let ka = admin.host.submit(keep_alive(), None, 0);
    admin.pump(now);
    let read_cid = {
        let sqe = rw_sqe(0x02, 8, 8, false);
        io.host.submit(sqe, None, 4096)
    };
    io.pump(now);
    assert_eq!(admin.conn.held_commands(), 1);
    assert_eq!(io.conn.held_commands(), 1);
    assert!(admin.pending_completions().is_empty(), "nothing answered while held");
    assert!(io.pending_completions().is_empty());
    // Half of a write capsule is in flight on the I/O connection: it carries over as unread input.
    let wcid = io.host.submit(rw_sqe(0x01, 16, 8, false), Some(Payload::from(vec![0x5a; 4096])), 0);
    let mut whole = Vec::new();
    while let Some(p) = io.host.poll_transmit() {
        whole.extend_from_slice(&p.to_vec());
    }
    assert!(whole.len() > 100);
    io.to_target.extend_from_slice(&whole[..100]);
    io.conn.handle_input(&mut io.to_target, now);
    assert_eq!(io.to_target.len(), 100, "a partial PDU stays with the driver");

    let state = export(&old, &mut [&mut admin, &mut io], cntlid, now);
    assert_eq!(state.connections[0].phase, ConnectionPhase::Live);
    assert_eq!(state.connections[0].queue.as_ref().unwrap().aer_cids, vec![aer_cid]);
    assert_eq!(state.connections[1].unread_input.len(), 100);
    let ka_left = state.controllers[0].keep_alive_left_ms.unwrap();
    assert!((5_900..=6_000).contains(&ka_left), "6 s of keep-alive left, got {ka_left} ms");

    let new = successor(backend);
    let later = clock.advance(Duration::from_millis(50));
    import(&new, &state, &mut [&mut admin, &mut io], later);
    // The held commands ran on the new side, once.
    assert_eq!(admin.take_completion(ka).status(), Status::SUCCESS);
    let r = io.take_completion(read_cid);
    assert_eq!(r.status(), Status::SUCCESS);
    assert_eq!(r.data.to_bytes().as_ref(), &[0xa5; 4096][..]);
    // The rest of the partial write arrives on the "same socket" and completes there.
    io.to_target.extend_from_slice(&whole[100..]);
    io.pump(later);
    assert_eq!(io.take_completion(wcid).status(), Status::SUCCESS);
    assert_eq!(read(&mut io, 16, 8, later).data.to_bytes().as_ref(), &[0x5a; 4096][..]);
    assert!(io.pending_completions().is_empty(), "nothing answered twice");
    // Same CNTLID; the AER is delivered by the new target.
    let infos = new.controllers();
    assert_eq!(infos.len(), 1);
    assert_eq!((infos[0].cntlid, infos[0].io_queues), (cntlid, 1));
    let ns2 = Arc::new(MemoryBackend::new(1 << 20, 512));
    new.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 2, ns2)).unwrap();
    admin.conn.handle_wakeup(later);
    admin.pump(later);
    let ev = admin.take_completion(aer_cid);
    assert_eq!(ev.status(), Status::SUCCESS);
    assert_eq!(ev.cqe.dw0.get(), AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED.to_dw0());
    // The keep-alive answered on the new side restarted the timer there: it does not expire 6 s
    // after the handover, but 10 s after that keep-alive.
    let t = clock.advance(Duration::from_secs(9));
    admin.conn.handle_timeout(t);
    assert!(admin.closed.is_none() && !admin.conn.is_closed());
    let t = clock.advance(Duration::from_millis(1100));
    admin.conn.handle_timeout(t);
    admin.drain_events(t);
    assert_eq!(admin.closed, Some(CloseReason::KeepAliveExpired));
}

#[test]
fn a_keep_alive_deadline_carries_over_without_traffic() {
    let mut clock = Clock::new();
    let now = clock.0;
    let (old, backend) = target_with_volume();
    let (mut admin, mut io, cntlid) = io_setup(&old, HostOptions::default(), 5_000, now);
    let now = clock.advance(Duration::from_secs(3));
    admin.conn.begin_handover();
    io.conn.begin_handover();
    let state = export(&old, &mut [&mut admin, &mut io], cntlid, now);
    let new = successor(backend);
    import(&new, &state, &mut [&mut admin, &mut io], now);
    // 2 s were left: the new side expires the controller then, not 5 s later.
    let deadline = admin.conn.poll_timeout().unwrap();
    assert_eq!(deadline, now + Duration::from_secs(2));
    admin.conn.handle_timeout(deadline);
    admin.drain_events(deadline);
    assert_eq!(admin.closed, Some(CloseReason::KeepAliveExpired));
}

#[test]
fn a_failed_handover_resumes_and_runs_the_held_commands_on_the_old_side() {
    let now = Clock::new().0;
    let (old, _) = target_with_volume();
    let (mut admin, mut io, _) = io_setup(&old, HostOptions::default(), 5_000, now);
    assert_eq!(write(&mut io, 0, vec![7; 512], now).status(), Status::SUCCESS);
    io.conn.begin_handover();
    let cid = io.host.submit(rw_sqe(0x02, 0, 1, false), None, 512);
    io.pump(now);
    assert!(io.pending_completions().is_empty());
    io.conn.end_handover(now);
    io.pump(now);
    let c = io.take_completion(cid);
    assert_eq!((c.status(), c.data.to_bytes().to_vec()), (Status::SUCCESS, vec![7; 512]));
    assert_eq!(keep_alive_status(&mut admin, now), Status::SUCCESS);
}

fn keep_alive_status(admin: &mut Link, now: Instant) -> Status {
    admin.command(keep_alive(), None, 0, now).status()
}

#[test]
fn a_connection_with_a_command_in_flight_is_not_ready_until_it_completes() {
    let now = Clock::new().0;
    let (old, _) = target_with_volume();
    let (_admin, mut io, _) = io_setup(&old, HostOptions::default(), 5_000, now);
    io.defer_io = true;
    let cid = io.host.submit(rw_sqe(0x02, 0, 1, false), None, 512);
    io.pump(now);
    io.conn.begin_handover();
    assert!(!io.conn.handover_ready());
    assert_eq!(io.conn.export_handover(now), Err(HandoverError::NotReady));
    for req in std::mem::take(&mut io.parked) {
        let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
        io.conn.complete_io(req.token, r, now);
    }
    io.pump(now);
    assert_eq!(io.take_completion(cid).status(), Status::SUCCESS);
    assert!(io.conn.handover_ready());
}

#[test]
fn a_host_cannot_make_the_hold_grow_beyond_its_queue() {
    let now = Clock::new().0;
    let (old, _) = target_with_volume();
    let (_admin, mut io, _) = io_setup(&old, HostOptions::default(), 5_000, now);
    io.conn.begin_handover();
    // The I/O queue has 128 entries (Linux's default size is what io_setup asks for); send more
    // distinct commands than that without waiting.
    for cid in 0..400u16 {
        let mut sqe = keep_alive();
        sqe.opcode = 0x00; // Flush
        sqe.nsid.set(1);
        sqe.cid.set(cid);
        let pdu = nvmeof_proto::Pdu::CapsuleCmd(nvmeof_proto::CapsuleCmd { sqe, data: Payload::new() });
        io.to_target.extend_from_slice(&pdu.encode(&Default::default()).unwrap().to_vec());
    }
    io.conn.handle_input(&mut io.to_target, now);
    io.drain_events(now);
    assert!(io.conn.held_commands() < 400, "held {}", io.conn.held_commands());
    assert!(matches!(io.closed, Some(CloseReason::SequenceError { .. })), "{:?}", io.closed);
}

#[test]
fn another_format_version_and_garbage_are_refused() {
    let mut bytes = HandoverState::default().encode().unwrap();
    assert_eq!(HandoverState::decode(&bytes), Ok(HandoverState::default()));
    bytes[..4].copy_from_slice(&(HANDOVER_FORMAT_VERSION + 1).to_le_bytes());
    assert_eq!(
        HandoverState::decode(&bytes),
        Err(HandoverError::UnknownVersion {
            found: HANDOVER_FORMAT_VERSION + 1,
            supported: HANDOVER_FORMAT_VERSION
        })
    );
    assert!(matches!(HandoverState::decode(&[1, 0]), Err(HandoverError::Malformed(_))));
    let mut trailing = HandoverState::default().encode().unwrap();
    trailing.push(0);
    assert!(matches!(HandoverState::decode(&trailing), Err(HandoverError::Malformed(_))));
    // Arbitrary bytes after a valid version never panic.
    for seed in 0..2000u32 {
        let mut b = HANDOVER_FORMAT_VERSION.to_le_bytes().to_vec();
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        for _ in 0..(seed % 64) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            b.push(x as u8);
        }
        let _ = HandoverState::decode(&b);
    }
}

#[test]
fn an_imported_cntlid_that_is_taken_or_a_missing_controller_is_refused() {
    let now = Clock::new().0;
    let (old, backend) = target_with_volume();
    let (mut admin, mut io, cntlid) = io_setup(&old, HostOptions::default(), 5_000, now);
    admin.conn.begin_handover();
    io.conn.begin_handover();
    let state = export(&old, &mut [&mut admin, &mut io], cntlid, now);
    let new = successor(backend);
    // The I/O queue before its controller: refused.
    assert!(matches!(
        new.import_connection(&state.connections[1], params(), now),
        Err(HandoverError::NoSuchController { .. })
    ));
    new.import_controller(&state.controllers[0], now).unwrap();
    assert!(matches!(
        new.import_controller(&state.controllers[0], now),
        Err(HandoverError::ControllerExists { .. })
    ));
    // An unknown subsystem.
    let mut other = state.controllers[0].clone();
    other.subnqn = "nqn.2026-01.io.xatastor:gone".into();
    assert_eq!(
        new.import_controller(&other, now),
        Err(HandoverError::NoSuchSubsystem("nqn.2026-01.io.xatastor:gone".into()))
    );
    // The same I/O queue twice: the second cannot claim its QID.
    let _first = new.import_connection(&state.connections[1], params(), now).unwrap();
    assert!(matches!(
        new.import_connection(&state.connections[1], params(), now),
        Err(HandoverError::QueueUnavailable { .. })
    ));
    // A new controller of the host gets a CNTLID other than the imported one.
    let mut fresh = Link::new(&new, HostOptions::default(), now);
    let again = bring_up_admin(&mut fresh, SUBNQN, 5_000, now);
    assert_ne!(again, cntlid);
}

#[test]
fn an_event_raised_before_the_handover_is_delivered_by_the_new_side() {
    let now = Clock::new().0;
    let (old, backend) = target_with_volume();
    let (mut admin, mut io, cntlid) = io_setup(&old, HostOptions::default(), 5_000, now);
    assert_eq!(set_features(&mut admin, 0x0b, 1 << 8, now).status(), Status::SUCCESS);
    let aer_cid = admin.host.submit(aer(), None, 0);
    admin.pump(now);
    admin.conn.begin_handover();
    io.conn.begin_handover();
    // An event is raised before the export; the old side never handles the wake-up.
    let ns2 = Arc::new(MemoryBackend::new(1 << 20, 512));
    old.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 2, ns2.clone())).unwrap();
    let state = export(&old, &mut [&mut admin, &mut io], cntlid, now);
    assert_eq!(state.controllers[0].pending_events, vec![AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED.to_dw0()]);
    let new = successor(backend);
    new.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 2, ns2)).unwrap();
    import(&new, &state, &mut [&mut admin, &mut io], now);
    let ev = admin.take_completion(aer_cid);
    assert_eq!(ev.cqe.dw0.get(), AsyncEvent::NAMESPACE_ATTRIBUTE_CHANGED.to_dw0());
    assert!(admin.pending_completions().is_empty(), "delivered once");
}

#[test]
fn the_pdu_limits_the_host_was_told_hold_on_in_a_build_with_lower_ones() {
    let now = Clock::new().0;
    let mut big = TargetConfig::default();
    big.maxh2cdata = 1 << 20;
    let (old, backend) = target_with_config(big);
    // The host takes one R2T at a time and sends the whole transfer as one H2CData PDU of up to
    // MAXH2CDATA (1 MiB here).
    let (mut admin, mut io, cntlid) = io_setup(&old, HostOptions::default(), 5_000, now);
    admin.conn.begin_handover();
    io.conn.begin_handover();
    let state = export(&old, &mut [&mut admin, &mut io], cntlid, now);
    assert_eq!(state.connections[1].maxh2cdata, 1 << 20);
    // The new build announces 128 KiB to new hosts, but this one was told 1 MiB.
    let new = successor(backend);
    assert_eq!(new.config().maxh2cdata, 128 * 1024);
    import(&new, &state, &mut [&mut admin, &mut io], now);
    let data = vec![0x3c; 512 * 1024];
    let c = write(&mut io, 64, data.clone(), now);
    assert_eq!(c.status(), Status::SUCCESS, "closed: {:?}", io.closed);
    assert_eq!(read(&mut io, 64, 1024, now).data.to_bytes().as_ref(), &data[..]);
}
