//! DH-HMAC-CHAP between the in-tree host and the target: agreement for every hash and group, uni-
//! and bidirectional; refusals (wrong secret, no secret, wrong controller secret) end in AUTH_Failure1
//! or AUTH_Failure2 and the queue's teardown; the requirement follows the subsystem and the host's
//! secret; rotation applies to the next authentication; timeouts; and hostile messages.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvmeof_proto::nvme::auth::{
    AuthMessage, DhGroup, DhchapHash, Failure, FailureExplanation, Negotiate, ProtocolDescriptor, Reply,
    SC_C_NONE,
};
use nvmeof_proto::nvme::fabrics::CONNECT_AUTHREQ_ATR;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::Status;
use nvmeof_target::auth::{AuthConfig, DhchapSecret, HostSecrets};
use nvmeof_target::host::{
    self, auth_receive_command, auth_send_command, Completion, HostAuthConfig, HostAuthError, HostOptions,
};
use nvmeof_target::{CloseReason, TargetConfig};
use proptest::prelude::*;

const ALL_HASHES: [DhchapHash; 3] = [DhchapHash::Sha256, DhchapHash::Sha384, DhchapHash::Sha512];
const ALL_GROUPS: [DhGroup; 6] = [
    DhGroup::Null,
    DhGroup::Ffdhe2048,
    DhGroup::Ffdhe3072,
    DhGroup::Ffdhe4096,
    DhGroup::Ffdhe6144,
    DhGroup::Ffdhe8192,
];

fn restricted(cfg: Arc<HostAuthConfig>, hash: DhchapHash, group: DhGroup) -> Arc<HostAuthConfig> {
    let mut c = (*cfg).clone();
    c.hashes = vec![hash];
    c.dh_groups = vec![group];
    Arc::new(c)
}

fn send(link: &mut Link, msg: Vec<u8>, now: std::time::Instant) -> Completion {
    let (sqe, data) = auth_send_command(msg);
    link.command(sqe, Some(data), 0, now)
}

fn receive(link: &mut Link, al: u32, now: std::time::Instant) -> Completion {
    link.command(auth_receive_command(al), None, al, now)
}

fn negotiate(t_id: u16, hashes: &[DhchapHash], groups: &[DhGroup]) -> Vec<u8> {
    AuthMessage::Negotiate(Negotiate {
        t_id,
        sc_c: SC_C_NONE,
        protocols: &[ProtocolDescriptor::dhchap(hashes, groups)],
    })
    .to_vec()
}

fn identify_status(link: &mut Link, now: std::time::Instant) -> Status {
    identify(link, 1, 0, now).status()
}

/// Property Get CAP: refused before authentication, answered after (also before CC.EN).
fn cap_status(link: &mut Link, now: std::time::Instant) -> Status {
    link.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0, now).status()
}

/// The Receive that must return AUTH_Failure1 with `explanation`, after which the queue is gone.
fn expect_failure1(link: &mut Link, explanation: FailureExplanation, now: std::time::Instant) {
    let c = receive(link, 4096, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let bytes = c.data.to_bytes();
    let (msg, _) = AuthMessage::parse(&bytes).unwrap();
    assert_eq!(msg, AuthMessage::Failure1(Failure::new(msg.t_id(), explanation)), "Failure1");
    assert_eq!(link.closed, Some(CloseReason::AuthenticationFailed), "queue torn down after Failure1");
}

/// A fresh admin queue, connected (ATR) but not authenticated.
fn connected(target: &nvmeof_target::Target, now: std::time::Instant) -> Link {
    let mut link = Link::new(target, HostOptions::default(), now);
    let c = connect_admin(&mut link, SUBNQN, HOSTNQN, 30_000, now);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_ne!(c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR, 0);
    link
}

#[test]
fn every_hash_and_group_uni_and_bidirectional() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    for hash in ALL_HASHES {
        for group in ALL_GROUPS {
            for ctrl in [None, Some(CTRL_SECRET)] {
                let mut link = Link::new(&target, HostOptions::default(), now);
                let cfg = restricted(host_auth(HOST_SECRET, ctrl), hash, group);
                let (cntlid, outcome) = bring_up_admin_auth(&mut link, cfg, now);
                assert_eq!(outcome.hash, hash);
                assert_eq!(outcome.dh_group, group);
                assert_eq!(outcome.bidirectional, ctrl.is_some());
                assert_eq!(identify_status(&mut link, now), Status::SUCCESS, "{hash} {group}: usable");
                assert!(target.controllers().iter().any(|c| c.cntlid == cntlid));
            }
        }
    }
}

#[test]
fn target_preference_decides_among_what_the_host_offers() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    // The host offers everything (like Linux): the default preference picks SHA-512 and ffdhe3072.
    let mut link = Link::new(&target, HostOptions::default(), now);
    let (_, outcome) = bring_up_admin_auth(&mut link, host_auth(HOST_SECRET, None), now);
    assert_eq!((outcome.hash, outcome.dh_group), (DhchapHash::Sha512, DhGroup::Ffdhe3072));
    assert_eq!(AuthConfig::default().hashes[0], DhchapHash::Sha512);
}

#[test]
fn io_queues_authenticate_too() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let mut admin = Link::new(&target, HostOptions::default(), now);
    let (cntlid, _) = bring_up_admin_auth(&mut admin, host_auth(HOST_SECRET, None), now);
    assert_eq!(set_features(&mut admin, 0x07, (1 << 16) | 1, now).status(), Status::SUCCESS);
    let mut io = Link::new(&target, HostOptions::default(), now);
    let c = connect_io(&mut io, cntlid, 1, now);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_ne!(c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR, 0, "the I/O queue must authenticate");
    // Knowing the CNTLID is not enough to do I/O.
    assert_eq!(read(&mut io, 0, 1, now).status(), Status::AUTHENTICATION_REQUIRED.with_dnr());
    assert_eq!(write(&mut io, 0, vec![1; 512], now).status(), Status::AUTHENTICATION_REQUIRED.with_dnr());
    authenticate(&mut io, host_auth(HOST_SECRET, Some(CTRL_SECRET)), 2, 9, now).unwrap();
    assert_eq!(write(&mut io, 0, vec![1; 512], now).status(), Status::SUCCESS);
    assert_eq!(read(&mut io, 0, 1, now).data.to_bytes(), vec![1u8; 512]);

    // An I/O queue presenting the wrong secret fails and goes; the controller stays.
    assert_eq!(set_features(&mut admin, 0x07, (2 << 16) | 2, now).status(), Status::COMMAND_SEQUENCE_ERROR);
    let mut io2 = Link::new(&target, HostOptions::default(), now);
    let _ = io2; // queue IDs are granted once: reuse qid 1's controller through a second admin below
    let mut admin2 = Link::new(&target, HostOptions::default(), now);
    let (cntlid2, _) = bring_up_admin_auth(&mut admin2, host_auth(HOST_SECRET, None), now);
    assert_eq!(set_features(&mut admin2, 0x07, (1 << 16) | 1, now).status(), Status::SUCCESS);
    io2 = Link::new(&target, HostOptions::default(), now);
    assert_eq!(connect_io(&mut io2, cntlid2, 1, now).status(), Status::SUCCESS);
    let e = authenticate(&mut io2, host_auth(OTHER_SECRET, None), 2, 9, now).unwrap_err();
    assert_eq!(e, HostAuthError::Refused(Failure::new(2, FailureExplanation::Failed)));
    assert_eq!(io2.closed, Some(CloseReason::AuthenticationFailed));
    assert_eq!(identify_status(&mut admin2, now), Status::SUCCESS, "the admin queue is untouched");
}

#[test]
fn wrong_secret_gets_failure1_then_teardown() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let mut link = connected(&target, now);
    let e = authenticate(&mut link, host_auth(OTHER_SECRET, None), 5, 1, now).unwrap_err();
    assert_eq!(e, HostAuthError::Refused(Failure::new(5, FailureExplanation::Failed)));
    assert_eq!(link.closed, Some(CloseReason::AuthenticationFailed));
    assert!(target.controllers().is_empty(), "the controller went with its admin queue");
}

#[test]
fn commands_before_authentication_are_refused() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let mut link = connected(&target, now);
    let refused = Status::AUTHENTICATION_REQUIRED.with_dnr();
    let cap = link.command(host::property_get(offset::CAP, PropertyWidth::Eight), None, 0, now);
    assert_eq!(cap.status(), refused, "Property Get");
    let en = link.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0, now);
    assert_eq!(en.status(), refused, "Property Set (no enabling the controller)");
    assert_eq!(identify_status(&mut link, now), refused, "Identify");
    assert_eq!(set_features(&mut link, 0x07, 0, now).status(), refused, "Set Features");
    assert!(link.closed.is_none());
    // Disconnect is allowed.
    let d = link.command(nvmeof_proto::nvme::fabrics::DisconnectCommand::new(0).to_sqe(), None, 0, now);
    assert_eq!(d.status(), Status::SUCCESS);
    assert_eq!(link.closed, Some(CloseReason::Disconnected));
}

#[test]
fn no_secret_on_an_auth_required_subsystem_is_refused() {
    let now = Clock::new().0;
    let (target, keys) = target_with_auth(true);
    assert!(keys.remove(SUBNQN, HOSTNQN));
    // The Connect still asks for authentication; a host without a secret cannot get further.
    let mut link = connected(&target, now);
    assert_eq!(identify_status(&mut link, now), Status::AUTHENTICATION_REQUIRED.with_dnr());
    // One that tries anyway fails exactly like a wrong secret.
    let e = authenticate(&mut link, host_auth(HOST_SECRET, None), 1, 1, now).unwrap_err();
    assert_eq!(e, HostAuthError::Refused(Failure::new(1, FailureExplanation::Failed)));
    assert_eq!(link.closed, Some(CloseReason::AuthenticationFailed));
}

#[test]
fn requirement_follows_the_subsystem_and_the_hosts_secret() {
    let now = Clock::new().0;
    // Not required, no secret for the host: no ATR, the host works as before.
    let (target, keys) = target_with_auth(false);
    keys.remove(SUBNQN, HOSTNQN);
    let mut plain = Link::new(&target, HostOptions::default(), now);
    let c = connect_admin(&mut plain, SUBNQN, HOSTNQN, 5000, now);
    assert_eq!(c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR, 0, "no authentication asked");
    drop(plain);
    let (_target2, _) = (target.clone(), ());
    let (admin, io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    let mut io = io;
    assert_eq!(write(&mut io, 0, vec![3; 512], now).status(), Status::SUCCESS);
    drop((admin, io));

    // Not required, but the host has a secret: it must use it.
    keys.set(SUBNQN, HOSTNQN, HostSecrets::new(secret(HOST_SECRET)));
    let mut link = connected(&target, now);
    authenticate(&mut link, host_auth(HOST_SECRET, None), 1, 1, now).unwrap();

    // Required of everyone: switched on at run time, applies to the next Connect.
    keys.remove(SUBNQN, HOSTNQN);
    target.set_auth_required(SUBNQN, true).unwrap();
    let mut link2 = Link::new(&target, HostOptions::default(), now);
    let c = connect_admin(&mut link2, SUBNQN, HOSTNQN, 5000, now);
    assert_ne!(c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR, 0);
    assert_eq!(cap_status(&mut link, now), Status::SUCCESS, "live queues are not disturbed");
}

#[test]
fn rotation_applies_to_the_next_authentication_and_keeps_hosts_connected() {
    let now = Clock::new().0;
    let (target, keys) = target_with_auth(true);
    let mut admin = Link::new(&target, HostOptions::default(), now);
    let (cntlid, _) = bring_up_admin_auth(&mut admin, host_auth(HOST_SECRET, None), now);
    assert_eq!(set_features(&mut admin, 0x07, (1 << 16) | 1, now).status(), Status::SUCCESS);
    let mut io = Link::new(&target, HostOptions::default(), now);
    assert_eq!(connect_io(&mut io, cntlid, 1, now).status(), Status::SUCCESS);
    authenticate(&mut io, host_auth(HOST_SECRET, None), 2, 2, now).unwrap();

    // Rotate: the node stores a new secret.
    keys.set(SUBNQN, HOSTNQN, HostSecrets::new(secret(OTHER_SECRET)));
    assert_eq!(
        write(&mut io, 8, vec![7; 512], now).status(),
        Status::SUCCESS,
        "connected host keeps working"
    );
    // The host re-authenticates its live queues with the new secret (as Linux does after
    // `echo <new> > /sys/class/nvme/nvmeX/dhchap_secret`).
    let out = authenticate(&mut admin, host_auth(OTHER_SECRET, None), 3, 3, now).unwrap();
    assert_eq!(out.hash, DhchapHash::Sha512);
    authenticate(&mut io, host_auth(OTHER_SECRET, None), 4, 4, now).unwrap();
    assert_eq!(read(&mut io, 8, 1, now).data.to_bytes(), vec![7u8; 512]);
    assert_eq!(identify_status(&mut admin, now), Status::SUCCESS);

    // The old secret is refused from now on: a new host connection with it fails...
    let mut old = connected(&target, now);
    assert!(authenticate(&mut old, host_auth(HOST_SECRET, None), 1, 1, now).is_err());
    // ... and so does a re-authentication with it, which ends the queue.
    let e = authenticate(&mut io, host_auth(HOST_SECRET, None), 5, 5, now).unwrap_err();
    assert!(matches!(e, HostAuthError::Refused(_)), "{e:?}");
    assert_eq!(io.closed, Some(CloseReason::AuthenticationFailed));
    assert_eq!(identify_status(&mut admin, now), Status::SUCCESS, "only that queue");
}

#[test]
fn queues_stay_usable_during_reauthentication() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let mut admin = Link::new(&target, HostOptions::default(), now);
    bring_up_admin_auth(&mut admin, host_auth(HOST_SECRET, None), now);
    assert_eq!(send(&mut admin, negotiate(9, &ALL_HASHES, &ALL_GROUPS), now).status(), Status::SUCCESS);
    assert_eq!(identify_status(&mut admin, now), Status::SUCCESS, "mid-transaction");
}

#[test]
fn bidirectional_authentication() {
    let now = Clock::new().0;
    let (target, keys) = target_with_auth(true);
    // The controller proves CTRL_SECRET.
    let mut ok = connected(&target, now);
    let out = authenticate(&mut ok, host_auth(HOST_SECRET, Some(CTRL_SECRET)), 1, 1, now).unwrap();
    assert!(out.bidirectional);
    assert_eq!(cap_status(&mut ok, now), Status::SUCCESS);

    // The host expects another controller secret: it refuses us (AUTH_Failure2), the queue goes.
    let mut wrong = connected(&target, now);
    let e = authenticate(&mut wrong, host_auth(HOST_SECRET, Some(OTHER_SECRET)), 1, 1, now).unwrap_err();
    assert_eq!(e, HostAuthError::ControllerNotAuthenticated);
    assert_eq!(wrong.closed, Some(CloseReason::AuthenticationFailed));

    // The host asks for it while the target has no controller secret: AUTH_Failure1.
    keys.set(SUBNQN, HOSTNQN, HostSecrets::new(secret(HOST_SECRET)));
    let mut none = connected(&target, now);
    let e = authenticate(&mut none, host_auth(HOST_SECRET, Some(CTRL_SECRET)), 1, 1, now).unwrap_err();
    assert_eq!(e, HostAuthError::Refused(Failure::new(1, FailureExplanation::Failed)));
    assert_eq!(none.closed, Some(CloseReason::AuthenticationFailed));
}

#[test]
fn a_queue_that_does_not_authenticate_in_time_is_torn_down() {
    let mut clock = Clock::new();
    let now = clock.0;
    let (target, _keys) = target_with_auth(true);
    let mut link = connected(&target, now);
    let deadline = link.conn.poll_timeout().expect("a deadline");
    assert!(deadline <= now + AuthConfig::default().timeout);
    link.conn.handle_timeout(clock.advance(Duration::from_secs(5)));
    link.drain_events(clock.0);
    assert!(link.closed.is_none(), "not yet");
    // Halfway through, still not authenticated: the deadline does not move.
    assert_eq!(send(&mut link, negotiate(1, &ALL_HASHES, &ALL_GROUPS), clock.0).status(), Status::SUCCESS);
    assert_eq!(link.conn.poll_timeout(), Some(deadline));
    let later = clock.advance(Duration::from_secs(6));
    link.conn.handle_timeout(later);
    link.drain_events(later);
    assert_eq!(link.closed, Some(CloseReason::AuthenticationTimeout));
    assert!(target.controllers().is_empty());
}

#[test]
fn an_unfinished_reauthentication_is_dropped_not_the_queue() {
    let mut clock = Clock::new();
    let now = clock.0;
    let (target, _keys) = target_with_auth(true);
    let mut link = Link::new(&target, HostOptions::default(), now);
    bring_up_admin_auth(&mut link, host_auth(HOST_SECRET, None), now);
    assert_eq!(
        link.conn.poll_timeout().map(|d| d > now + Duration::from_secs(4)),
        Some(true),
        "only keep-alive"
    );
    assert_eq!(send(&mut link, negotiate(2, &ALL_HASHES, &ALL_GROUPS), now).status(), Status::SUCCESS);
    let t = clock.advance(Duration::from_secs(4));
    // Keep-alive traffic keeps the controller alive meanwhile.
    assert_eq!(
        link.command(
            nvmeof_proto::nvme::Sqe { opcode: 0x18, ..nvmeof_proto::nvme::Sqe::zeroed() },
            None,
            0,
            t
        )
        .status(),
        Status::SUCCESS
    );
    let t = clock.advance(Duration::from_secs(7));
    assert_eq!(
        link.command(
            nvmeof_proto::nvme::Sqe { opcode: 0x18, ..nvmeof_proto::nvme::Sqe::zeroed() },
            None,
            0,
            t
        )
        .status(),
        Status::SUCCESS
    );
    link.conn.handle_timeout(t);
    link.drain_events(t);
    assert!(link.closed.is_none(), "{:?}", link.closed);
    assert_eq!(identify_status(&mut link, t), Status::SUCCESS);
    // The next transaction starts afresh.
    authenticate(&mut link, host_auth(HOST_SECRET, None), 3, 3, t).unwrap();
}

#[test]
fn the_auth_send_message_may_come_by_r2t() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let mut link = connected(&target, now);
    let (sqe, data) = auth_send_command(negotiate(1, &[DhchapHash::Sha256], &[DhGroup::Ffdhe2048]));
    let cid = link.host.submit_data_by_r2t(sqe, data);
    link.pump(now);
    assert_eq!(link.take_completion(cid).status(), Status::SUCCESS);
    let c = receive(&mut link, 4096, now);
    let bytes = c.data.to_bytes();
    let (msg, _) = AuthMessage::parse(&bytes).unwrap();
    assert!(matches!(msg, AuthMessage::Challenge(ch) if ch.dh_value.len() == 256), "{msg:?}");
}

#[test]
fn secrets_of_every_kind_work() {
    let now = Clock::new().0;
    let e = nvmeof_target::auth::DeterministicEntropy::new(99);
    let (target, keys) = target_with_auth(true);
    for (len, t) in [
        (32, None),
        (48, None),
        (64, None),
        (32, Some(DhchapHash::Sha256)),
        (48, Some(DhchapHash::Sha384)),
        (64, Some(DhchapHash::Sha512)),
        (64, Some(DhchapHash::Sha256)),
    ] {
        let host = DhchapSecret::generate(&e, len, t).unwrap();
        let ctrl = DhchapSecret::generate(&e, len, t).unwrap();
        keys.set(SUBNQN, HOSTNQN, HostSecrets::new(host.clone()).with_controller(ctrl.clone()));
        let mut cfg = (*host_auth(HOST_SECRET, None)).clone();
        cfg.secret = host;
        cfg.controller_secret = Some(ctrl);
        let mut link = connected(&target, now);
        let out = authenticate(&mut link, Arc::new(cfg), 1, 1, now).unwrap();
        assert!(out.bidirectional, "{len} {t:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Host and target agree for random secrets, NQNs, transaction IDs and randomness; and one
    /// wrong byte in the host's key makes it fail.
    #[test]
    fn host_and_target_agree(
        key in proptest::collection::vec(any::<u8>(), 32..=32),
        hh in 0u8..4,
        host_suffix in "[a-z0-9]{1,40}",
        t_id in any::<u16>(),
        seed in any::<u64>(),
        hash in 0usize..3,
        group in 0usize..3,
        bidirectional in any::<bool>(),
        flip in 0usize..32,
    ) {
        let now = Clock::new().0;
        let hostnqn = format!("nqn.2014-08.io.example:{host_suffix}");
        let (target, keys) = target_with_auth(true);
        target.allow_host(SUBNQN, &hostnqn).unwrap();
        target.set_entropy(Arc::new(nvmeof_target::auth::DeterministicEntropy::new(seed)));
        let transform = DhchapHash::from_u8(hh);
        let host_secret = DhchapSecret::from_key(&key, transform).unwrap();
        let mut ckey = key.clone();
        ckey.reverse();
        let ctrl_secret = DhchapSecret::from_key(&ckey, transform).unwrap();
        keys.set(SUBNQN, &hostnqn, HostSecrets::new(host_secret.clone()).with_controller(ctrl_secret.clone()));
        let groups = [DhGroup::Null, DhGroup::Ffdhe2048, DhGroup::Ffdhe3072];
        let mut cfg = HostAuthConfig::new(hostnqn.clone(), SUBNQN, host_secret);
        cfg.hashes = vec![ALL_HASHES[hash]];
        cfg.dh_groups = vec![groups[group]];
        cfg.controller_secret = bidirectional.then_some(ctrl_secret);
        let connect = |link: &mut Link| {
            let c = connect_admin(link, SUBNQN, &hostnqn, 5000, now);
            prop_assert_ne!(c.cqe.dw0.get() & CONNECT_AUTHREQ_ATR, 0);
            Ok(())
        };
        let mut link = Link::new(&target, HostOptions::default(), now);
        connect(&mut link)?;
        let out = authenticate(&mut link, Arc::new(cfg.clone()), t_id, seed ^ 1, now);
        prop_assert!(out.is_ok(), "{:?}", out);
        prop_assert_eq!(cap_status(&mut link, now), Status::SUCCESS);

        let mut bad_key = key.clone();
        bad_key[flip] ^= 1;
        cfg.secret = DhchapSecret::from_key(&bad_key, transform).unwrap();
        let mut link = Link::new(&target, HostOptions::default(), now);
        connect(&mut link)?;
        let out = authenticate(&mut link, Arc::new(cfg), t_id, seed ^ 2, now);
        prop_assert_eq!(out, Err(HostAuthError::Refused(Failure::new(t_id, FailureExplanation::Failed))));
        prop_assert_eq!(link.closed.clone(), Some(CloseReason::AuthenticationFailed));
    }
}

// ---- hostile input ----

/// Each bad first message: the Send completes, the next Receive returns AUTH_Failure1 with the
/// explanation, and the queue is torn down.
#[test]
fn bad_first_messages_are_answered_with_failure1() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let good = negotiate(1, &ALL_HASHES, &ALL_GROUPS);
    let mut two_napd = good.clone();
    two_napd[7] = 2;
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0; 4]);
    let mut sc_c = good.clone();
    sc_c[6] = 1;
    let mut other_protocol = good.clone();
    other_protocol[8] = 0x02;
    let mut halen_31 = good.clone();
    halen_31[10] = 31;
    let reply = AuthMessage::Reply(Reply {
        t_id: 1,
        cvalid: 0,
        seqnum: 0,
        response: &[0; 32],
        challenge: &[0; 32],
        dh_value: &[],
    })
    .to_vec();
    let cases: Vec<(&str, Vec<u8>, FailureExplanation)> = vec![
        ("truncated", good[..7].to_vec(), FailureExplanation::IncorrectPayload),
        ("NAPD beyond the data", two_napd, FailureExplanation::IncorrectPayload),
        ("trailing bytes", trailing, FailureExplanation::IncorrectPayload),
        ("unknown message", vec![0x07, 0x00, 0, 0, 1, 0, 0, 0], FailureExplanation::IncorrectProtocolMessage),
        ("secure channel concatenation", sc_c, FailureExplanation::ConcatenationMismatch),
        ("no DH-HMAC-CHAP descriptor", other_protocol, FailureExplanation::ProtocolNotUsable),
        ("HALEN 31", halen_31, FailureExplanation::IncorrectPayload),
        ("unknown hashes", negotiate_ids(&[0x09], &[0x01]), FailureExplanation::HashNotUsable),
        ("unknown groups", negotiate_ids(&[0x01], &[0x07, 0x08]), FailureExplanation::DhGroupNotUsable),
        ("Reply first", reply, FailureExplanation::IncorrectProtocolMessage),
        (
            "Success2 first",
            AuthMessage::Success2 { t_id: 1 }.to_vec(),
            FailureExplanation::IncorrectProtocolMessage,
        ),
    ];
    for (name, msg, explanation) in cases {
        let mut link = connected(&target, now);
        assert_eq!(send(&mut link, msg, now).status(), Status::SUCCESS, "{name}");
        assert!(link.closed.is_none(), "{name}: not before Failure1 was fetched");
        // Whatever the host sends now does not change it.
        assert_eq!(send(&mut link, negotiate(1, &ALL_HASHES, &ALL_GROUPS), now).status(), Status::SUCCESS);
        expect_failure1(&mut link, explanation, now);
    }
    // A Receive before anything was negotiated.
    let mut link = connected(&target, now);
    expect_failure1(&mut link, FailureExplanation::IncorrectProtocolMessage, now);
}

fn negotiate_ids(hashes: &[u8], groups: &[u8]) -> Vec<u8> {
    let mut d = ProtocolDescriptor::dhchap(&[], &[]);
    d.halen = hashes.len() as u8;
    d.dhlen = groups.len() as u8;
    d.hash_ids[..hashes.len()].copy_from_slice(hashes);
    d.dh_group_ids[..groups.len()].copy_from_slice(groups);
    AuthMessage::Negotiate(Negotiate { t_id: 1, sc_c: 0, protocols: &[d] }).to_vec()
}

/// Negotiates SHA-256 with `group` and fetches the Challenge; returns its T_ID-1 message bytes.
fn challenged(target: &nvmeof_target::Target, group: DhGroup, now: std::time::Instant) -> (Link, Vec<u8>) {
    let mut link = connected(target, now);
    assert_eq!(send(&mut link, negotiate(1, &[DhchapHash::Sha256], &[group]), now).status(), Status::SUCCESS);
    let c = receive(&mut link, 4096, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let bytes = c.data.to_bytes().to_vec();
    assert!(matches!(AuthMessage::parse(&bytes), Ok((AuthMessage::Challenge(_), _))));
    (link, bytes)
}

#[test]
fn bad_replies_are_answered_with_failure1() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let r = [0x11u8; 32];
    let c2 = [0u8; 32];
    let two = {
        let mut v = vec![0u8; 256];
        v[255] = 2;
        v
    };
    let reply = |t_id, hl: usize, cvalid, seqnum, dh: &[u8]| {
        AuthMessage::Reply(Reply {
            t_id,
            cvalid,
            seqnum,
            response: &r[..hl],
            challenge: &c2[..hl],
            dh_value: dh,
        })
        .to_vec()
    };
    let mut huge_dhvlen = reply(1, 32, 0, 0, &two);
    huge_dhvlen[10..12].copy_from_slice(&u16::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, FailureExplanation)> = vec![
        ("wrong T_ID", reply(2, 32, 0, 0, &two), FailureExplanation::IncorrectPayload),
        ("HL of another hash", reply(1, 16, 0, 0, &two), FailureExplanation::IncorrectPayload),
        ("CVALID 2", reply(1, 32, 2, 5, &two), FailureExplanation::IncorrectPayload),
        ("CVALID without S2", reply(1, 32, 1, 0, &two), FailureExplanation::IncorrectPayload),
        ("DH value too short", reply(1, 32, 0, 0, &two[1..]), FailureExplanation::IncorrectPayload),
        ("no DH value", reply(1, 32, 0, 0, &[]), FailureExplanation::IncorrectPayload),
        ("DHVLEN 65535 on 256 bytes", huge_dhvlen, FailureExplanation::IncorrectPayload),
        ("DH value 0", reply(1, 32, 0, 0, &[0; 256]), FailureExplanation::DhGroupNotUsable),
        (
            "DH value 1",
            reply(1, 32, 0, 0, &{
                let mut v = vec![0u8; 256];
                v[255] = 1;
                v
            }),
            FailureExplanation::DhGroupNotUsable,
        ),
        ("DH value above p", reply(1, 32, 0, 0, &[0xff; 256]), FailureExplanation::DhGroupNotUsable),
        ("wrong response", reply(1, 32, 0, 0, &two), FailureExplanation::Failed),
        (
            "Success2 instead",
            AuthMessage::Success2 { t_id: 1 }.to_vec(),
            FailureExplanation::IncorrectProtocolMessage,
        ),
    ];
    for (name, msg, explanation) in cases {
        let (mut link, _) = challenged(&target, DhGroup::Ffdhe2048, now);
        assert_eq!(send(&mut link, msg, now).status(), Status::SUCCESS, "{name}");
        expect_failure1(&mut link, explanation, now);
    }
}

#[test]
fn a_second_negotiate_restarts_the_transaction() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let (mut link, _) = challenged(&target, DhGroup::Ffdhe2048, now);
    // The host starts over (as Linux does when it re-runs authentication): the run completes.
    authenticate(&mut link, host_auth(HOST_SECRET, None), 7, 7, now).unwrap();
    assert_eq!(cap_status(&mut link, now), Status::SUCCESS);
}

#[test]
fn failure2_from_the_host_ends_the_queue() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let (mut link, _) = challenged(&target, DhGroup::Null, now);
    let f2 = AuthMessage::Failure2(Failure::new(1, FailureExplanation::HashNotUsable)).to_vec();
    assert_eq!(send(&mut link, f2, now).status(), Status::SUCCESS);
    assert_eq!(link.closed, Some(CloseReason::AuthenticationFailed));
}

#[test]
fn bad_auth_commands_fail_as_commands() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let mut link = connected(&target, now);
    let invalid = Status::INVALID_FIELD.with_dnr();
    let msg = negotiate(1, &ALL_HASHES, &ALL_GROUPS);
    // Wrong security protocol, wrong SPSP, zero and huge transfer lengths.
    type Patch = fn(&mut nvmeof_proto::nvme::fabrics::AuthSendCommand);
    let patches: [Patch; 3] = [|s| s.secp = 0xea, |s| s.spsp0 = 0, |s| s.spsp1 = 2];
    for patch in patches {
        let (sqe, data) = auth_send_command(msg.clone());
        let mut c = nvmeof_proto::nvme::fabrics::AuthSendCommand::from_sqe(&sqe);
        patch(&mut c);
        assert_eq!(link.command(c.to_sqe(), Some(data), 0, now).status(), invalid);
    }
    let (sqe, _) = auth_send_command(msg.clone());
    let mut c = nvmeof_proto::nvme::fabrics::AuthSendCommand::from_sqe(&sqe);
    c.tl.set(0);
    assert_eq!(link.command(c.to_sqe(), None, 0, now).status(), invalid, "TL 0");
    let big = vec![0u8; 8200];
    let (sqe, data) = auth_send_command(big);
    assert_eq!(link.command(sqe, Some(data), 0, now).status(), invalid, "TL over 8 KiB");
    let (sqe, data) = auth_send_command(msg.clone());
    let mut c = nvmeof_proto::nvme::fabrics::AuthSendCommand::from_sqe(&sqe);
    c.tl.set(msg.len() as u32 + 8);
    assert_eq!(
        link.command(c.to_sqe(), Some(data), 0, now).status(),
        Status::DATA_SGL_LENGTH_INVALID.with_dnr(),
        "TL differs from the SGL"
    );
    let mut r = nvmeof_proto::nvme::fabrics::AuthReceiveCommand::from_sqe(&auth_receive_command(4096));
    r.al.set(0);
    assert_eq!(link.command(r.to_sqe(), None, 4096, now).status(), invalid, "AL 0");
    r.al.set(4096);
    r.secp = 0;
    assert_eq!(link.command(r.to_sqe(), None, 4096, now).status(), invalid, "Receive SECP");
    r.secp = 0xe9;
    r.al.set(100);
    assert_eq!(
        link.command(r.to_sqe(), None, 4096, now).status(),
        Status::DATA_SGL_LENGTH_INVALID.with_dnr(),
        "AL differs from the SGL"
    );
    // None of that touched the protocol state: authentication still works.
    assert!(link.closed.is_none());
    authenticate(&mut link, host_auth(HOST_SECRET, None), 1, 1, now).unwrap();
}

#[test]
fn host_buffers_too_small_for_the_answer() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    // The challenge (16 + 64 + 1024 bytes) does not fit 100 bytes: AUTH_Failure1 instead.
    let mut link = connected(&target, now);
    assert_eq!(
        send(&mut link, negotiate(1, &[DhchapHash::Sha512], &[DhGroup::Ffdhe8192]), now).status(),
        Status::SUCCESS
    );
    let c = receive(&mut link, 100, now);
    let bytes = c.data.to_bytes();
    assert_eq!(
        AuthMessage::parse(&bytes).unwrap().0,
        AuthMessage::Failure1(Failure::new(1, FailureExplanation::IncorrectPayload))
    );
    assert_eq!(link.closed, Some(CloseReason::AuthenticationFailed));
    // Not even AUTH_Failure1 fits 4 bytes: the command fails and the queue goes.
    let mut link = connected(&target, now);
    assert_eq!(send(&mut link, negotiate(1, &ALL_HASHES, &ALL_GROUPS), now).status(), Status::SUCCESS);
    assert_eq!(receive(&mut link, 4, now).status(), Status::INVALID_FIELD.with_dnr());
    assert_eq!(link.closed, Some(CloseReason::AuthenticationFailed));
}

#[test]
fn authentication_on_a_subsystem_that_needs_none_still_checks() {
    let now = Clock::new().0;
    let (target, keys) = target_with_auth(false);
    keys.remove(SUBNQN, HOSTNQN);
    let (mut admin, _io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    // A host that authenticates anyway (no secret here) fails, and its queue goes.
    let e = authenticate(&mut admin, host_auth(HOST_SECRET, None), 1, 1, now).unwrap_err();
    assert!(matches!(e, HostAuthError::Refused(_)));
    assert_eq!(admin.closed, Some(CloseReason::AuthenticationFailed));
}

#[test]
fn many_connects_share_the_sequence_counter() {
    let now = Clock::new().0;
    let (target, _keys) = target_with_auth(true);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..5 {
        let (_link, bytes) = challenged(&target, DhGroup::Null, now);
        let Ok((AuthMessage::Challenge(c), _)) = AuthMessage::parse(&bytes) else { panic!() };
        assert_ne!(c.seqnum, 0);
        assert!(seen.insert(c.seqnum), "S1 never repeats");
    }
}

#[test]
fn target_config_limits_what_is_accepted() {
    let now = Clock::new().0;
    let mut config = TargetConfig::default();
    config.auth = AuthConfig {
        dh_groups: vec![DhGroup::Ffdhe2048],
        hashes: vec![DhchapHash::Sha256],
        ..AuthConfig::default()
    };
    let (target, _) = target_with_config(config);
    let keys = Arc::new(nvmeof_target::auth::MemoryHostKeys::new());
    keys.set(SUBNQN, HOSTNQN, HostSecrets::new(secret(HOST_SECRET)));
    target.set_host_keys(keys);
    let mut link = connected(&target, now);
    let out = authenticate(&mut link, host_auth(HOST_SECRET, None), 1, 1, now).unwrap();
    assert_eq!((out.hash, out.dh_group), (DhchapHash::Sha256, DhGroup::Ffdhe2048));
    // A host that offers only the null group is refused by this target.
    let mut link = connected(&target, now);
    let cfg = restricted(host_auth(HOST_SECRET, None), DhchapHash::Sha256, DhGroup::Null);
    let e = authenticate(&mut link, cfg, 1, 1, now).unwrap_err();
    assert_eq!(e, HostAuthError::Refused(Failure::new(1, FailureExplanation::DhGroupNotUsable)));
}
