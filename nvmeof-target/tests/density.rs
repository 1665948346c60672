//! Controller density: CNTLIDs are allocated per subsystem, so one target holds more live
//! controllers than one CNTLID space (65,519) has, and each subsystem's controllers are counted,
//! listed and found on their own.
//!
//! Connections are driven in memory (no sockets): the admin queues only go as far as a successful
//! Fabrics Connect, which is what creates a controller.

mod common;

use std::time::Instant;

use common::*;
use nvmeof_proto::nvme::discovery::DISCOVERY_NQN;
use nvmeof_proto::nvme::fabrics::{CNTLID_DYNAMIC, CNTLID_MAX, CNTLID_MIN};
use nvmeof_proto::nvme::Status;
use nvmeof_target::host::{self, HostOptions};
use nvmeof_target::{Connection, HostAccess, SubsystemConfig, Target, TargetConfig};

const A: &str = "nqn.2026-01.io.xatastor:density-a";
const B: &str = "nqn.2026-01.io.xatastor:density-b";

/// CNTLIDs one subsystem can hand out.
const SPAN: usize = (CNTLID_MAX - CNTLID_MIN) as usize + 1;

fn target_with_two_subsystems() -> Target {
    let (target, _) = target_with_config(TargetConfig::default());
    for (nqn, serial) in [(A, "DA"), (B, "DB")] {
        target
            .add_subsystem(SubsystemConfig {
                access: HostAccess::AllowAny,
                ..SubsystemConfig::new(nqn, serial)
            })
            .unwrap();
    }
    target
}

/// An admin-queue Fabrics Connect to `subnqn`: the connection (which keeps the controller alive)
/// and the completion's status and CNTLID.
fn connect_admin(target: &Target, subnqn: &str, now: Instant) -> (Connection, Status, u16) {
    let mut l = Link::new(target, HostOptions::default(), now);
    l.pump(now);
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, HOSTID, subnqn, HOSTNQN);
    let c = l.command(sqe, Some(data), 0, now);
    let Link { conn, .. } = l;
    (conn, c.status(), c.cqe.dw0.get() as u16)
}

#[test]
fn seventy_thousand_controllers_with_per_subsystem_cntlids() {
    let now = Clock::new().0;
    let target = target_with_two_subsystems();
    let mut keep: Vec<Connection> = Vec::with_capacity(70_000);

    // Subsystem A takes its whole CNTLID space, in order.
    for i in 0..SPAN {
        let (conn, status, cntlid) = connect_admin(&target, A, now);
        assert_eq!(status, Status::SUCCESS, "controller {i} of A");
        assert_eq!(usize::from(cntlid), i + usize::from(CNTLID_MIN));
        keep.push(conn);
    }
    // Full: the next Connect to A is refused with Controller Busy (no DNR: the host may retry)...
    let (_refused, status, _) = connect_admin(&target, A, now);
    assert_eq!(status, Status::CONNECT_CONTROLLER_BUSY);
    assert!(!status.dnr());
    // ...while B and the discovery subsystem have CNTLIDs of their own, starting again at 1.
    let (conn, status, first_b) = connect_admin(&target, B, now);
    assert_eq!((status, first_b), (Status::SUCCESS, CNTLID_MIN));
    keep.push(conn);
    let (_disc, status, disc_id) = connect_admin(&target, DISCOVERY_NQN, now);
    assert_eq!((status, disc_id), (Status::SUCCESS, CNTLID_MIN));
    while keep.len() < 70_000 {
        let (conn, status, _) = connect_admin(&target, B, now);
        assert_eq!(status, Status::SUCCESS);
        keep.push(conn);
    }
    let on_b = 70_000 - SPAN;
    assert_eq!(target.controller_count(), 70_001, "70,000 + one discovery controller");
    assert_eq!(target.controller_count_of(A), SPAN);
    assert_eq!(target.controller_count_of(B), on_b);
    assert_eq!(target.controller_count_of(DISCOVERY_NQN), 1);
    assert_eq!(target.controller_count_of(SUBNQN), 0);
    let listed_b = target.controllers_of_subsystem(B);
    assert_eq!(listed_b.len(), on_b);
    assert!(listed_b.iter().all(|c| c.subnqn == B));
    assert_eq!(listed_b.first().map(|c| c.cntlid), Some(CNTLID_MIN));

    // CNTLID 1 exists in both A and B: management names a controller by (subsystem, CNTLID).
    assert!(target.disconnect_controller(A, CNTLID_MIN));
    assert!(!target.disconnect_controller(A, CNTLID_MIN), "gone already");
    assert_eq!(target.controller_count_of(A), SPAN - 1);
    assert_eq!(target.controller_count_of(B), on_b);
    assert_eq!(target.controllers_of_subsystem(B).first().map(|c| c.cntlid), Some(CNTLID_MIN));
    // The freed CNTLID is A's to hand out again.
    let (conn, status, again) = connect_admin(&target, A, now);
    assert_eq!((status, again), (Status::SUCCESS, CNTLID_MIN));
    keep.push(conn);

    // Every connection dropped: every controller gone, and every index empty.
    drop(keep);
    assert_eq!(target.controller_count(), 1);
    assert_eq!(target.controller_count_of(A), 0);
    assert_eq!(target.controller_count_of(B), 0);
}

/// An I/O queue's Connect names its controller by SUBNQN and CNTLID: with the same CNTLID live in
/// two subsystems, each I/O queue joins the controller of its own subsystem.
#[test]
fn io_queue_connect_finds_the_controller_by_subsystem_and_cntlid() {
    let now = Clock::new().0;
    let target = target_with_two_subsystems();
    let mut a = Link::new(&target, HostOptions::default(), now);
    let id_a = bring_up_admin(&mut a, A, 0, now);
    let mut b = Link::new(&target, HostOptions::default(), now);
    let id_b = bring_up_admin(&mut b, B, 0, now);
    assert_eq!((id_a, id_b), (CNTLID_MIN, CNTLID_MIN), "each subsystem starts at 1");

    let connect_io = |subnqn: &str, cntlid: u16, qid: u16| {
        let mut io = Link::new(&target, HostOptions::default(), now);
        io.pump(now);
        let (sqe, data) = host::connect_command(qid, 128, 0, cntlid, HOSTID, subnqn, HOSTNQN);
        let c = io.command(sqe, Some(data), 0, now);
        (io, c.status())
    };
    let (_io_b, status) = connect_io(B, id_b, 1);
    assert_eq!(status, Status::SUCCESS);
    let io_queues =
        |nqn: &str| target.controllers_of_subsystem(nqn).iter().map(|c| c.io_queues).sum::<usize>();
    assert_eq!((io_queues(A), io_queues(B)), (0, 1), "the queue joined B's controller 1, not A's");
    let (_io_a, status) = connect_io(A, id_a, 1);
    assert_eq!(status, Status::SUCCESS);
    assert_eq!((io_queues(A), io_queues(B)), (1, 1));
    // A CNTLID that exists in B only is no controller of A.
    let (_c2, _, id_b2) = connect_admin(&target, B, now);
    assert_eq!(id_b2, CNTLID_MIN + 1);
    let (_x, status) = connect_io(A, id_b2, 2);
    assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    // Disconnecting B's controller 1 leaves A's controller 1 (and its I/O queue) alone.
    assert!(target.disconnect_controller(B, id_b));
    b.pump(now);
    assert_eq!((io_queues(A), target.controller_count_of(A)), (1, 1));
    assert_eq!(target.controller_count_of(B), 1);
}
