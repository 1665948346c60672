//! Whole sessions between the in-process host and the target: the sequences a Linux host sends for
//! `nvme discover` and `nvme connect`, then I/O, asynchronous events, keep-alive, resize, disconnect,
//! and the error statuses of each command.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use nvmeof_proto::nvme::discovery::{DiscoveryLogPage, DISCOVERY_NQN};
use nvmeof_proto::nvme::fabrics::{InvalidParameter, CNTLID_DYNAMIC};
use nvmeof_proto::nvme::identify::{
    parse_ns_id_descriptors, IdentifyController, IdentifyNamespace, NsIdDescriptor,
};
use nvmeof_proto::nvme::nvm::DsmRange;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_proto::{Digests, Payload};
use nvmeof_target::host::{self, HostOptions};
use nvmeof_target::{CloseReason, NamespaceConfig, SubsystemConfig, TargetConfig};
use zerocopy::{FromBytes, IntoBytes};

fn id_ctrl(link: &mut Link, now: std::time::Instant) -> IdentifyController {
    let c = identify(link, 1, 0, now);
    assert_eq!(c.status(), Status::SUCCESS);
    IdentifyController::read_from_bytes(&c.data.to_bytes()).unwrap()
}

#[test]
fn linux_connect_sequence_then_io() {
    let clock = Clock::new();
    let now = clock.0;
    let (target, _backend) = target_with_volume();
    let mut admin = Link::new(&target, HostOptions::default(), now);
    let cntlid = bring_up_admin(&mut admin, SUBNQN, 5000, now);

    // What the Linux host checks in Identify Controller.
    let id = id_ctrl(&mut admin, now);
    assert_eq!(id.cntlid.get(), cntlid, "CNTLID matches Connect");
    assert_ne!(id.kas.get(), 0, "KAS must not be zero");
    assert_eq!(id.icdoff.get(), 0);
    assert_ne!(id.sgls.get() & 0b11, 0, "SGLs supported");
    assert_ne!(id.sgls.get() & (1 << 20), 0, "SGL offsets (in-capsule data)");
    assert!(id.maxcmd.get() >= 128);
    assert!(id.ioccsz.get() >= 4);
    assert_eq!(id.iorcsz.get(), 1);
    assert_ne!(id.cmic & 0b10, 0, "several controllers per subsystem");
    assert_eq!(id.cntrltype, 1);
    assert_eq!(id.subnqn().unwrap(), SUBNQN);
    assert_eq!(id.serial_number().unwrap(), "XS0001");
    assert_eq!(id.vwc & 1, 1);
    assert_ne!(id.oncs.get() & (1 << 2), 0, "DSM");
    assert_ne!(id.oncs.get() & (1 << 3), 0, "Write Zeroes");
    assert!(id.mdts > 0);

    // Effects log (LPA bit 1), SMART for hwmon, features, AEN.
    let effects = get_log_page(&mut admin, 0x05, 0, 0, 4096, false, now);
    assert_eq!(effects.status(), Status::SUCCESS);
    assert_eq!(
        effects.data.to_bytes()[1024 + 4] & 0b11, // I/O opcode 01h (Write)
        0b11,
        "Write: CSUPP | LBCC"
    );
    let smart = get_log_page(&mut admin, 0x02, 0xffff_ffff, 0, 512, false, now);
    assert_eq!(smart.status(), Status::SUCCESS);
    let nq = set_features(&mut admin, 0x07, (3 << 16) | 3, now);
    assert_eq!(nq.status(), Status::SUCCESS);
    assert_eq!(nq.cqe.dw0.get(), (3 << 16) | 3, "four queues granted");
    assert_eq!(set_features(&mut admin, 0x0b, 1 << 8, now).status(), Status::SUCCESS);

    // Namespace scan: CNS 06 (errors tolerated), 02, then 03 and 00 per namespace.
    assert_eq!(
        identify(&mut admin, 0x06, 0, now).status(),
        Status::SUCCESS,
        "NVM command set controller data"
    );
    let list = identify(&mut admin, 0x02, 0, now);
    let nsids: Vec<u32> = list
        .data
        .to_bytes()
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .take_while(|&n| n != 0)
        .collect();
    assert_eq!(nsids, vec![1]);
    let descs = identify(&mut admin, 0x03, 1, now);
    assert_eq!(descs.status(), Status::SUCCESS);
    let bytes = descs.data.to_bytes();
    let kinds: Vec<u8> = parse_ns_id_descriptors(&bytes).map(|d| d.unwrap().nidt()).collect();
    assert_eq!(kinds, vec![2, 3, 4], "NGUID, UUID, CSI");
    let ns = identify(&mut admin, 0x00, 1, now);
    let ns = IdentifyNamespace::read_from_bytes(&ns.data.to_bytes()).unwrap();
    assert_eq!(ns.nsze.get(), (64 << 20) / 512);
    assert_ne!(ns.ncap.get(), 0);
    assert_eq!(ns.current_lba_format().unwrap().data_size(), Some(512));
    let nguid_from_descs = parse_ns_id_descriptors(&bytes)
        .find_map(|d| match d.unwrap() {
            NsIdDescriptor::Nguid(g) => Some(g),
            _ => None,
        })
        .unwrap();
    assert_eq!(ns.nguid, nguid_from_descs, "one NGUID everywhere");

    // Two I/O queues, as `--nr-io-queues 2` would make, then I/O on both.
    let mut io1 = Link::new(&target, HostOptions::default(), now);
    bring_up_io(&mut io1, cntlid, 1, now);
    let mut io2 = Link::new(&target, HostOptions::default(), now);
    bring_up_io(&mut io2, cntlid, 2, now);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(write(&mut io1, 8, data.clone(), now).status(), Status::SUCCESS);
    let r = read(&mut io2, 8, 8, now);
    assert_eq!(r.status(), Status::SUCCESS);
    assert_eq!(r.data, Payload::from(data));
    assert_eq!(target.controllers().len(), 1);
    assert_eq!(target.controllers()[0].io_queues, 2);
}

#[test]
fn nvme_discover_lists_exactly_the_hosts_subsystems() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    // A subsystem this host may not see, and one it may.
    target.add_subsystem(SubsystemConfig::new("nqn.2026-01.io.xatastor:hidden", "XS0002")).unwrap();
    let mut visible = SubsystemConfig::new("nqn.2026-01.io.xatastor:other", "XS0003");
    visible.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(visible).unwrap();

    let mut link = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut link, DISCOVERY_NQN, 0, now);
    let id = id_ctrl(&mut link, now);
    assert_eq!(id.cntrltype, 2, "discovery controller");
    assert_eq!(id.subnqn().unwrap(), DISCOVERY_NQN);
    assert_ne!(id.sgls.get() & 0b11, 0);

    // libnvme: header first, then the whole log, in 4 KiB pieces.
    let header = get_log_page(&mut link, 0x70, 0, 0, 1024, true, now);
    assert_eq!(header.status(), Status::SUCCESS);
    let numrec = u64::from_le_bytes(header.data.to_bytes()[8..16].try_into().unwrap());
    assert_eq!(numrec, 2);
    let total = 1024 * (1 + numrec as u32);
    let mut page = Vec::new();
    let mut off = 0;
    while off < total {
        let n = 4096.min(total - off);
        let c = get_log_page(&mut link, 0x70, 0, u64::from(off), n, off + n < total, now);
        assert_eq!(c.status(), Status::SUCCESS);
        page.extend_from_slice(&c.data.to_bytes());
        off += n;
    }
    let log = DiscoveryLogPage::parse(&page).unwrap();
    let mut nqns: Vec<String> = log.entries.iter().map(|e| e.subnqn().unwrap().to_owned()).collect();
    nqns.sort();
    assert_eq!(nqns, vec!["nqn.2026-01.io.xatastor:other".to_owned(), SUBNQN.to_owned()]);
    for e in log.entries {
        assert_eq!(e.trtype, 3, "TCP");
        assert_eq!(e.adrfam, 1, "IPv4");
        assert_eq!(e.traddr().unwrap(), "127.0.0.1");
        assert_eq!(e.trsvcid().unwrap(), "4420");
        assert_eq!(e.subtype, 2);
    }
    // A change to what the host may see bumps the generation counter.
    let genctr = log.header.genctr.get();
    target.allow_host("nqn.2026-01.io.xatastor:hidden", HOSTNQN).unwrap();
    let again = get_log_page(&mut link, 0x70, 0, 0, 1024, false, now);
    assert!(u64::from_le_bytes(again.data.to_bytes()[..8].try_into().unwrap()) > genctr);
    assert_eq!(u64::from_le_bytes(again.data.to_bytes()[8..16].try_into().unwrap()), 3);
}

#[test]
fn connect_refusals_carry_the_specified_statuses() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let connect = |subnqn: &str, hostnqn: &str, qid: u16, cntlid: u16, entries: u16| {
        let mut link = Link::new(&target, HostOptions::default(), now);
        link.pump(now);
        let (sqe, data) = host::connect_command(qid, entries, 5000, cntlid, HOSTID, subnqn, hostnqn);
        link.command(sqe, Some(data), 0, now)
    };
    // A host not on the list (default deny).
    let c = connect(SUBNQN, "nqn.2014-08.org.nvmexpress:uuid:intruder", 0, CNTLID_DYNAMIC, 32);
    assert_eq!(c.status(), Status::CONNECT_INVALID_HOST.with_dnr());
    // An unknown subsystem: Invalid Parameters pointing at SUBNQN in the data.
    let c = connect("nqn.2026-01.io.xatastor:nope", HOSTNQN, 0, CNTLID_DYNAMIC, 32);
    assert_eq!(c.status(), Status::CONNECT_INVALID_PARAMETERS.with_dnr());
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::SUBNQN);
    // Admin queue with a static CNTLID.
    let c = connect(SUBNQN, HOSTNQN, 0, 5, 32);
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::CNTLID);
    // An I/O queue of a controller that does not exist.
    let c = connect(SUBNQN, HOSTNQN, 1, 0x1234, 128);
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::CNTLID);
    // Queue too large.
    let c = connect(SUBNQN, HOSTNQN, 0, CNTLID_DYNAMIC, 2048);
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::SQSIZE);
    // Admin queue smaller than 32 entries.
    let c = connect(SUBNQN, HOSTNQN, 0, CNTLID_DYNAMIC, 16);
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::SQSIZE);
    // I/O queue beyond the granted number, and a second connect of the same QID.
    let mut admin = Link::new(&target, HostOptions::default(), now);
    let cntlid = bring_up_admin(&mut admin, SUBNQN, 5000, now);
    assert_eq!(set_features(&mut admin, 0x07, 0, now).status(), Status::SUCCESS);
    let c = connect(SUBNQN, HOSTNQN, 2, cntlid, 128);
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::QID);
    let mut io = Link::new(&target, HostOptions::default(), now);
    bring_up_io(&mut io, cntlid, 1, now);
    let c = connect(SUBNQN, HOSTNQN, 1, cntlid, 128);
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::QID);
    // Another host cannot join this host's controller.
    target.allow_host(SUBNQN, "nqn.2014-08.org.nvmexpress:uuid:other").unwrap();
    let c = connect(SUBNQN, "nqn.2014-08.org.nvmexpress:uuid:other", 3, cntlid, 128);
    assert_eq!(c.status(), Status::CONNECT_INVALID_HOST.with_dnr());
}

#[test]
fn commands_before_connect_or_enable_are_refused() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut link = Link::new(&target, HostOptions::default(), now);
    link.pump(now);
    // Before Connect: only Connect.
    let c = identify(&mut link, 1, 0, now);
    assert_eq!(c.status(), Status::INVALID_OPCODE.with_dnr());
    // After Connect but before CC.EN: Command Sequence Error.
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, HOSTID, SUBNQN, HOSTNQN);
    assert_eq!(link.command(sqe, Some(data), 0, now).status(), Status::SUCCESS);
    assert_eq!(identify(&mut link, 1, 0, now).status(), Status::COMMAND_SEQUENCE_ERROR);
    // Property Get of a property that does not exist, or with the wrong width.
    let c = link.command(host::property_get(0x30, PropertyWidth::Four), None, 0, now);
    assert_eq!(c.status(), Status::INVALID_FIELD.with_dnr());
    let c = link.command(host::property_get(offset::CAP, PropertyWidth::Four), None, 0, now);
    assert_eq!(c.status(), Status::INVALID_FIELD.with_dnr());
}

#[test]
fn admin_command_errors() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut admin = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut admin, SUBNQN, 5000, now);
    // Unknown opcode.
    let mut sqe = Sqe::zeroed();
    sqe.opcode = 0x80; // Format NVM: not supported
    assert_eq!(admin.command(sqe, None, 0, now).status(), Status::INVALID_OPCODE.with_dnr());
    // Identify of an unsupported CNS, of a namespace out of range, of an inactive namespace.
    assert_eq!(identify(&mut admin, 0x13, 0, now).status(), Status::INVALID_FIELD.with_dnr());
    assert_eq!(identify(&mut admin, 0x00, 0xffff_fff0, now).status(), Status::INVALID_NAMESPACE.with_dnr());
    let inactive = identify(&mut admin, 0x00, 7, now);
    assert_eq!(inactive.status(), Status::SUCCESS);
    assert!(inactive.data.iter_bytes().all(|b| b == 0), "inactive namespace: all zeros");
    // Unknown log page, unaligned offset.
    assert_eq!(
        get_log_page(&mut admin, 0x0d, 0, 0, 512, false, now).status(),
        Status::INVALID_LOG_PAGE.with_dnr()
    );
    assert_eq!(
        get_log_page(&mut admin, 0x02, 0, 2, 512, false, now).status(),
        Status::INVALID_FIELD.with_dnr()
    );
    // A log page read beyond MDTS (a hostile 4 GiB request must not allocate 4 GiB).
    assert_eq!(
        get_log_page(&mut admin, 0x02, 0, 0, 0xffff_fffc, false, now).status(),
        Status::INVALID_FIELD.with_dnr()
    );
    // Unsupported feature; saving a feature.
    assert_eq!(set_features(&mut admin, 0x0c, 0, now).status(), Status::INVALID_FIELD.with_dnr());
    assert_eq!(
        set_features(&mut admin, 0x0b | (1u32 << 31), 0, now).status(),
        Status::FEATURE_NOT_SAVEABLE.with_dnr()
    );
    // Abort is answered "not aborted".
    let mut abort = Sqe::zeroed();
    abort.opcode = 0x08;
    let c = admin.command(abort, None, 0, now);
    assert_eq!((c.status(), c.cqe.dw0.get() & 1), (Status::SUCCESS, 1));
    // A second command with a CID still in use (a parked AER).
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    aer.cid.set(31);
    admin.host.submit(aer, None, 0);
    admin.pump(now);
    let mut dup = Sqe::zeroed();
    dup.opcode = 0x18;
    dup.cid.set(31);
    // The host helper would pick a new CID; send the raw capsule instead.
    let pdu = nvmeof_proto::Pdu::CapsuleCmd(nvmeof_proto::CapsuleCmd { sqe: dup, data: Payload::new() });
    admin.to_target.extend_from_slice(&pdu.encode(&Default::default()).unwrap().to_vec());
    admin.conn.handle_input(&mut admin.to_target, now);
    admin.drain_events(now);
    let mut buf = std::mem::take(&mut admin.to_host);
    let mut dec = nvmeof_proto::PduDecoder::new(nvmeof_proto::DecoderConfig::host());
    match dec.decode(&mut buf).unwrap() {
        Some(nvmeof_proto::Pdu::CapsuleResp(r)) => {
            assert_eq!(r.cqe.status(), Status::COMMAND_ID_CONFLICT.with_dnr())
        }
        other => panic!("expected a response, got {other:?}"),
    }
}

#[test]
fn io_paths_and_statuses() {
    let now = Clock::new().0;
    let (target, backend) = target_with_volume();
    let (_admin, mut io, _) =
        io_setup(&target, HostOptions { maxr2t: 3, ..HostOptions::default() }, 5000, now);

    // In-capsule write (4 KiB) and R2T write (512 KiB = 4 R2Ts of 128 KiB), read back.
    let small: Vec<u8> = vec![0xab; 4096];
    assert_eq!(write(&mut io, 0, small.clone(), now).status(), Status::SUCCESS);
    let big: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(write(&mut io, 1000, big.clone(), now).status(), Status::SUCCESS);
    assert_eq!(read(&mut io, 0, 8, now).data, Payload::from(small));
    assert_eq!(read(&mut io, 1000, 1024, now).data, Payload::from(big));

    // FUA write and flush.
    let c = io.command(rw_sqe(0x01, 16, 1, true), Some(Payload::from(vec![1u8; 512])), 0, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let mut flush = Sqe::zeroed();
    flush.nsid.set(1);
    assert_eq!(io.command(flush, None, 0, now).status(), Status::SUCCESS);

    // Write Zeroes.
    let mut wz = rw_sqe(0x08, 1000, 8, false);
    wz.cdw12.set(7 | (1 << 25));
    assert_eq!(io.command(wz, None, 0, now).status(), Status::SUCCESS);
    assert!(read(&mut io, 1000, 8, now).data.iter_bytes().all(|b| b == 0));

    // Dataset Management deallocate, with the 4096-byte buffer Linux sends: space is given back.
    let before = backend.allocated_bytes();
    let mut ranges = vec![0u8; 4096];
    ranges[..16].copy_from_slice(DsmRange::new(1008, 1016).as_bytes());
    let mut dsm = Sqe::zeroed();
    dsm.opcode = 0x09;
    dsm.nsid.set(1);
    dsm.cdw10.set(0);
    dsm.cdw11.set(1 << 2);
    assert_eq!(io.command(dsm, Some(Payload::from(ranges)), 0, now).status(), Status::SUCCESS);
    assert!(backend.allocated_bytes() < before, "deallocate frees memory");
    assert!(read(&mut io, 1008, 1016, now).data.iter_bytes().all(|b| b == 0));

    // Errors: out of range, bad namespace, beyond MDTS, unknown opcode, SGL length mismatch.
    let blocks = (64u64 << 20) / 512;
    assert_eq!(read(&mut io, blocks - 1, 2, now).status(), Status::LBA_OUT_OF_RANGE.with_dnr());
    let mut bad_ns = rw_sqe(0x02, 0, 1, false);
    bad_ns.nsid.set(9);
    assert_eq!(io.command(bad_ns, None, 512, now).status(), Status::INVALID_NAMESPACE.with_dnr());
    assert_eq!(read(&mut io, 0, 2048, now).status(), Status::INVALID_FIELD.with_dnr(), "1 MiB > MDTS");
    let mut odd = Sqe::zeroed();
    odd.opcode = 0x7e;
    odd.nsid.set(1);
    assert_eq!(io.command(odd, None, 0, now).status(), Status::INVALID_OPCODE.with_dnr());
    assert_eq!(
        io.command(rw_sqe(0x02, 0, 2, false), None, 512, now).status(),
        Status::DATA_SGL_LENGTH_INVALID.with_dnr()
    );

    // Statistics went up.
    let stats = target.subsystem(SUBNQN).unwrap().namespace(1).unwrap().stats().snapshot();
    assert!(stats.reads >= 4 && stats.writes >= 3);
    assert_eq!(stats.write_bytes, 4096 + 512 * 1024 + 512);
    assert!(stats.errors >= 3);
}

#[test]
fn completions_may_come_back_in_any_order() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (_admin, mut io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    io.defer_io = true;
    let cids: Vec<u16> = (0..8u64)
        .map(|i| io.host.submit(rw_sqe(0x01, i * 8, 8, false), Some(Payload::from(vec![i as u8; 4096])), 0))
        .collect();
    io.pump(now);
    assert_eq!(io.parked.len(), 8);
    // Complete them newest first, as an asynchronous backend might.
    while let Some(req) = io.parked.pop() {
        let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
        io.conn.complete_io(req.token, r, now);
    }
    io.pump(now);
    for cid in cids {
        assert_eq!(io.take_completion(cid).status(), Status::SUCCESS);
    }
    io.defer_io = false;
    for i in 0..8u64 {
        assert!(read(&mut io, i * 8, 8, now).data.iter_bytes().all(|b| b == i as u8));
    }
}

#[test]
fn keep_alive_expiry_tears_the_controller_down() {
    let mut clock = Clock::new();
    let now = clock.0;
    let (target, _) = target_with_volume();
    let (mut admin, mut io, _) = io_setup(&target, HostOptions::default(), 2000, now);
    let deadline = admin.conn.poll_timeout().unwrap();
    assert_eq!(deadline, now + Duration::from_millis(2000));

    // A keep alive (or any command: traffic-based keep alive) pushes the deadline.
    let t1 = clock.advance(Duration::from_millis(1500));
    let mut ka = Sqe::zeroed();
    ka.opcode = 0x18;
    assert_eq!(admin.command(ka, None, 0, t1).status(), Status::SUCCESS);
    assert_eq!(admin.conn.poll_timeout().unwrap(), t1 + Duration::from_millis(2000));
    let t2 = clock.advance(Duration::from_millis(1500));
    assert_eq!(write(&mut io, 0, vec![5; 512], t2).status(), Status::SUCCESS);
    admin.conn.handle_timeout(t2 + Duration::from_millis(1000));
    assert!(admin.closed.is_none() && admin.conn.poll_event().is_none(), "I/O traffic kept it alive");

    // Silence past KATO: the controller and all its queues go.
    let t3 = clock.advance(Duration::from_millis(2001));
    admin.conn.handle_timeout(t3);
    admin.drain_events(t3);
    assert_eq!(admin.closed, Some(CloseReason::KeepAliveExpired));
    assert!(target.controllers().is_empty());
    io.conn.handle_wakeup(t3);
    io.drain_events(t3);
    assert_eq!(io.closed, Some(CloseReason::ControllerGone));
}

#[test]
fn resize_raises_namespace_attribute_changed() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut admin = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut admin, SUBNQN, 5000, now);
    assert_eq!(set_features(&mut admin, 0x0b, 1 << 8, now).status(), Status::SUCCESS);
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    let aer_cid = admin.host.submit(aer, None, 0);
    admin.pump(now);
    assert!(admin.pending_completions().is_empty(), "AER waits for an event");

    let woken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = woken.clone();
    admin.conn.set_notifier(std::sync::Arc::new(move || {
        w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    target.resize_namespace(SUBNQN, 1, 128 << 20).unwrap();
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1, "admin connection woken");
    admin.conn.handle_wakeup(now);
    admin.pump(now);
    let ev = admin.take_completion(aer_cid);
    assert_eq!(ev.cqe.dw0.get(), 0x0004_0002, "notice / namespace attribute changed / log 04h");
    // Linux then reads the Changed Namespace List (RAE 0) and Identify Namespace.
    let changed = get_log_page(&mut admin, 0x04, 0xffff_ffff, 0, 4096, false, now);
    assert_eq!(&changed.data.to_bytes()[..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
    let again = get_log_page(&mut admin, 0x04, 0xffff_ffff, 0, 4096, false, now);
    assert!(again.data.iter_bytes().all(|b| b == 0), "reading cleared the list");
    let ns = IdentifyNamespace::read_from_bytes(&identify(&mut admin, 0, 1, now).data.to_bytes()).unwrap();
    assert_eq!(ns.nsze.get(), (128 << 20) / 512);

    // Adding and removing namespaces at run time raise events too (one per kind while unread).
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    let aer2 = admin.host.submit(aer, None, 0);
    let backend = std::sync::Arc::new(nvmeof_target::MemoryBackend::new(1 << 20, 4096));
    target.add_namespace(SUBNQN, NamespaceConfig::derived(SUBNQN, 2, backend)).unwrap();
    admin.conn.handle_wakeup(now);
    admin.pump(now);
    assert_eq!(admin.take_completion(aer2).cqe.dw0.get(), 0x0004_0002);
    let list = identify(&mut admin, 2, 0, now);
    assert_eq!(&list.data.to_bytes()[..12], &[1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    let ns2 = IdentifyNamespace::read_from_bytes(&identify(&mut admin, 0, 2, now).data.to_bytes()).unwrap();
    assert_eq!(ns2.current_lba_format().unwrap().data_size(), Some(4096));
}

#[test]
fn linux_style_disconnect_and_shutdown() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (mut admin, mut io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    // The I/O socket is shut down (no Fabrics Disconnect)...
    io.conn.handle_peer_closed();
    io.drain_events(now);
    assert_eq!(io.closed, Some(CloseReason::PeerClosed));
    assert_eq!(target.controllers()[0].io_queues, 0);
    // ... then CC.SHN = normal: the target flushes and reports shutdown complete.
    let c = admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_4001), None, 0, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let csts = admin.command(host::property_get(offset::CSTS, PropertyWidth::Four), None, 0, now);
    assert_eq!((csts.cqe.dw0.get() >> 2) & 0b11, 0b10, "SHST complete");
    admin.conn.handle_peer_closed();
    admin.drain_events(now);
    assert!(target.controllers().is_empty(), "the controller is freed with its admin queue");
    // A Fabrics Disconnect on an I/O queue also works.
    let (_admin, mut io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    let disconnect = nvmeof_proto::nvme::fabrics::DisconnectCommand::new(0).to_sqe();
    assert_eq!(io.command(disconnect, None, 0, now).status(), Status::SUCCESS);
    assert_eq!(io.closed, Some(CloseReason::Disconnected));
}

#[test]
fn digests_and_a_corrupt_data_digest() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let opts = HostOptions { digests: Digests::BOTH, ..HostOptions::default() };
    let (_admin, mut io, _) = io_setup(&target, opts, 5000, now);
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
    assert_eq!(write(&mut io, 0, data.clone(), now).status(), Status::SUCCESS);
    assert_eq!(read(&mut io, 0, 128, now).data, Payload::from(data.clone()));

    // Corrupt one byte of an in-capsule write on the wire: the command fails, the queue lives on.
    let cid = io.host.submit(rw_sqe(0x01, 0, 1, false), Some(Payload::from(vec![9u8; 512])), 0);
    let pdu = io.host.poll_transmit().unwrap();
    let mut wire = pdu.to_vec();
    let at = wire.len() - 10;
    wire[at] ^= 0xff;
    io.to_target.extend_from_slice(&wire);
    io.pump(now);
    assert_eq!(io.take_completion(cid).status(), Status::TRANSIENT_TRANSPORT_ERROR);
    assert!(io.closed.is_none());
    assert_eq!(
        read(&mut io, 0, 1, now).data,
        Payload::from(data[..512].to_vec()),
        "corrupt data was not written"
    );
}

#[test]
fn hostile_bytes_end_only_their_own_connection() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut admin = Link::new(&target, HostOptions::default(), now);
    let cntlid = bring_up_admin(&mut admin, SUBNQN, 5000, now);
    set_features(&mut admin, 0x07, (1 << 16) | 1, now);
    let mut good = Link::new(&target, HostOptions::default(), now);
    bring_up_io(&mut good, cntlid, 1, now);
    let mut bad = Link::new(&target, HostOptions::default(), now);
    bring_up_io(&mut bad, cntlid, 2, now);
    // An H2CData nobody asked for: PDU sequence error.
    bad.to_target.extend_from_slice(&[
        6, 4, 24, 24, 28, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
    ]);
    bad.pump(now);
    assert!(matches!(bad.closed, Some(CloseReason::SequenceError { .. })));
    assert!(bad.host_error.as_deref().unwrap_or("").contains("terminated"), "{:?}", bad.host_error);
    // Garbage: invalid header field, C2HTermReq, closed.
    let mut junk = Link::new(&target, HostOptions::default(), now);
    junk.pump(now);
    junk.to_target.extend_from_slice(&[0x42; 64]);
    junk.pump(now);
    assert!(matches!(junk.closed, Some(CloseReason::ProtocolError(_))));
    // The healthy queue is unaffected.
    assert_eq!(write(&mut good, 0, vec![3; 512], now).status(), Status::SUCCESS);
    assert_eq!(target.controllers().len(), 1);
}

#[test]
fn connect_timeout_frees_idle_sockets() {
    let mut clock = Clock::new();
    let (target, _) = target_with_volume();
    let mut link = Link::new(&target, HostOptions::default(), clock.0);
    let deadline = link.conn.poll_timeout().unwrap();
    let t = clock.advance(Duration::from_secs(11));
    assert!(t >= deadline);
    link.conn.handle_timeout(t);
    link.drain_events(t);
    assert_eq!(link.closed, Some(CloseReason::ConnectTimeout));
}

#[test]
fn removing_a_busy_subsystem_needs_force() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut admin = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut admin, SUBNQN, 5000, now);
    assert!(matches!(target.remove_subsystem(SUBNQN, false), Err(nvmeof_target::TargetError::Busy(..))));
    target.remove_subsystem(SUBNQN, true).unwrap();
    admin.conn.handle_wakeup(now);
    admin.drain_events(now);
    assert_eq!(admin.closed, Some(CloseReason::ControllerGone));
    assert!(target.subsystem(SUBNQN).is_none());
    let _ = BytesMut::new();
    let _ = TargetConfig::default();
}

#[test]
fn sq_head_and_the_success_flag() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (_admin, mut io, cntlid) = io_setup(&target, HostOptions::default(), 5000, now);
    let a = read(&mut io, 0, 1, now);
    let b = read(&mut io, 0, 1, now);
    assert!(!a.via_success_flag && !b.via_success_flag);
    assert_eq!((a.cqe.sqid.get(), a.cqe.sqhd.get()), (1, 2), "Connect and the read consumed two entries");
    assert_eq!(b.cqe.sqhd.get(), 3);
    // SQ flow control disabled (CATTR bit 2, as Linux asks when the discovery entry allows it): a
    // successful read completes with the SUCCESS flag on its last C2HData and no response capsule.
    let mut io2 = Link::new(&target, HostOptions::default(), now);
    io2.pump(now);
    let (mut sqe, data) = host::connect_command(2, 128, 0, cntlid, HOSTID, SUBNQN, HOSTNQN);
    sqe.as_mut_bytes()[46] = 1 << 2;
    assert_eq!(io2.command(sqe, Some(data), 0, now).status(), Status::SUCCESS);
    let c = read(&mut io2, 0, 8, now);
    assert!(c.via_success_flag);
    assert_eq!(c.data.len(), 4096);
    // Errors still come as response capsules.
    let e = read(&mut io2, u64::MAX - 1, 1, now);
    assert!(!e.via_success_flag);
    assert_eq!(e.status(), Status::LBA_OUT_OF_RANGE.with_dnr());
}

#[test]
fn data_in_flight_per_connection_is_bounded() {
    let now = Clock::new().0;
    // The smallest budget: one maximal transfer (512 KiB) at a time.
    let mut config = TargetConfig::default();
    config.max_data_in_flight_per_connection = 0;
    let (target, _) = target_with_config(config);
    let (_admin, mut io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    io.defer_io = true;
    let cids: Vec<u16> = (0..4u64)
        .map(|i| {
            io.host.submit(
                rw_sqe(0x01, i * 1024, 1024, false),
                Some(Payload::from(vec![i as u8; 512 * 1024])),
                0,
            )
        })
        .collect();
    io.pump(now);
    for step in 0..4 {
        // Only one write's data is held (received and waiting for the backend); the others wait for
        // their R2Ts.
        assert_eq!(io.parked.len(), 1, "step {step}");
        let req = io.parked.pop().unwrap();
        let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
        io.conn.complete_io(req.token, r, now);
        io.pump(now);
    }
    for cid in cids {
        assert_eq!(io.take_completion(cid).status(), Status::SUCCESS);
    }
}

#[test]
fn discovery_controllers_hear_of_changes() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut link = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut link, DISCOVERY_NQN, 0, now);
    // KATO 0 from `nvme discover`: the target still keeps a 120 s timer, as Linux's target does.
    assert_eq!(link.conn.poll_timeout(), Some(now + Duration::from_secs(120)));
    // A persistent discovery controller enables discovery log change notices and waits.
    assert_eq!(set_features(&mut link, 0x0b, 1 << 31, now).status(), Status::SUCCESS);
    let mut aer = Sqe::zeroed();
    aer.opcode = 0x0c;
    let cid = link.host.submit(aer, None, 0);
    link.pump(now);
    let mut sc = SubsystemConfig::new("nqn.2026-01.io.xatastor:new", "XS0009");
    sc.allowed_hosts.push(HOSTNQN.into());
    target.add_subsystem(sc).unwrap();
    link.conn.handle_wakeup(now);
    link.pump(now);
    assert_eq!(
        link.take_completion(cid).cqe.dw0.get(),
        0x0070_f002,
        "notice / discovery log change / log 70h"
    );
    // Discovery controllers have no I/O commands and no namespaces.
    assert_eq!(set_features(&mut link, 0x07, 0, now).status(), Status::INVALID_FIELD.with_dnr());
    assert_eq!(identify(&mut link, 0x02, 0, now).status(), Status::INVALID_FIELD.with_dnr());
}

/// Encodes a PDU as the host would (for hand-crafted, possibly corrupted traffic).
fn wire(pdu: nvmeof_proto::Pdu, digests: Digests) -> Vec<u8> {
    pdu.encode(&nvmeof_proto::EncodeOptions { digests, pda: 0 }).unwrap().to_vec()
}

#[test]
fn corrupt_h2c_data_fails_only_its_command_after_draining_the_r2t() {
    let now = Clock::new().0;
    let (target, backend) = target_with_volume();
    let opts = HostOptions { digests: Digests::BOTH, max_inline_data: 0, ..HostOptions::default() };
    let (_admin, mut io, _) = io_setup(&target, opts, 5000, now);
    // A 16 KiB write via one R2T; the host's H2CData PDUs are intercepted and one is corrupted.
    let cid = io.host.submit(rw_sqe(0x01, 0, 32, false), Some(Payload::from(vec![0x11u8; 16384])), 0);
    // Deliver the capsule by hand and keep the R2T from the host: we answer it ourselves, with the
    // data in two H2CData PDUs, the first one corrupt.
    let capsule = io.host.poll_transmit().unwrap();
    io.to_target.extend_from_slice(&capsule.to_vec());
    io.conn.handle_input(&mut io.to_target, now);
    io.drain_events(now);
    let mut dec = nvmeof_proto::PduDecoder::new(nvmeof_proto::DecoderConfig {
        digests: Digests::BOTH,
        ..nvmeof_proto::DecoderConfig::host()
    });
    match dec.decode(&mut io.to_host).unwrap() {
        Some(nvmeof_proto::Pdu::R2t(r)) => assert_eq!((r.cccid, r.r2to, r.r2tl), (cid, 0, 16384)),
        other => panic!("expected an R2T, got {other:?}"),
    }
    let part = |off: usize, last: bool| {
        nvmeof_proto::Pdu::H2cData(nvmeof_proto::H2cData {
            cccid: cid,
            ttag: cid,
            datao: off as u32,
            last,
            data: Payload::from(vec![0x22u8; 8192]),
        })
    };
    let mut first = wire(part(0, false), Digests::BOTH);
    let n = first.len();
    first[n - 10] ^= 1;
    io.to_target.extend_from_slice(&first);
    io.conn.handle_input(&mut io.to_target, now);
    io.drain_events(now);
    assert!(io.to_host.is_empty(), "no completion before the R2T's data is all in");
    io.to_target.extend_from_slice(&wire(part(8192, true), Digests::BOTH));
    io.conn.handle_input(&mut io.to_target, now);
    io.drain_events(now);
    assert!(io.closed.is_none(), "a data digest error is not fatal");
    match dec.decode(&mut io.to_host).unwrap() {
        Some(nvmeof_proto::Pdu::CapsuleResp(r)) => {
            assert_eq!(r.cqe.cid.get(), cid);
            assert_eq!(r.cqe.status(), Status::TRANSIENT_TRANSPORT_ERROR);
        }
        other => panic!("expected the failed write's response, got {other:?}"),
    }
    io.to_host.clear();
    // The host forgets the command it never got an answer for (it was failed underneath it).
    io.host = nvmeof_target::host::HostQueue::new(opts);
    assert!(io.closed.is_none());
    assert!(backend.read(0, 16384).unwrap().iter().all(|&b| b == 0), "nothing was written");
}

#[test]
fn corrupt_capsule_reusing_a_busy_command_id_is_fatal() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let opts = HostOptions { digests: Digests::BOTH, ..HostOptions::default() };
    let (_admin, mut io, _) = io_setup(&target, opts, 5000, now);
    io.defer_io = true;
    let busy = io.host.submit(rw_sqe(0x02, 0, 1, false), None, 512);
    io.pump(now);
    assert_eq!(io.parked.len(), 1);
    let mut sqe = rw_sqe(0x01, 0, 1, false);
    sqe.cid.set(busy);
    sqe.dptr = nvmeof_proto::nvme::SglDescriptor::in_capsule(0, 512);
    let capsule =
        nvmeof_proto::Pdu::CapsuleCmd(nvmeof_proto::CapsuleCmd { sqe, data: Payload::from(vec![1u8; 512]) });
    let mut bytes = wire(capsule, Digests::BOTH);
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    io.to_target.extend_from_slice(&bytes);
    io.conn.handle_input(&mut io.to_target, now);
    io.drain_events(now);
    assert!(matches!(io.closed, Some(CloseReason::SequenceError { .. })));
}

#[test]
fn disabling_the_controller_deletes_its_io_queues() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (mut admin, mut io, cntlid) = io_setup(&target, HostOptions::default(), 5000, now);
    let woken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let w = woken.clone();
    io.conn.set_notifier(std::sync::Arc::new(move || w.store(true, std::sync::atomic::Ordering::SeqCst)));
    let c = admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0000), None, 0, now);
    assert_eq!(c.status(), Status::SUCCESS);
    assert!(woken.load(std::sync::atomic::Ordering::SeqCst), "the I/O queue was woken");
    io.conn.handle_wakeup(now);
    io.drain_events(now);
    assert_eq!(io.closed, Some(CloseReason::ControllerGone));
    // Re-enable: the queue count must be negotiated again, and QID 1 is free for a new connection.
    let c = admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0, now);
    assert_eq!(c.status(), Status::SUCCESS);
    assert_eq!(set_features(&mut admin, 0x07, 0, now).status(), Status::SUCCESS);
    let mut io2 = Link::new(&target, HostOptions::default(), now);
    bring_up_io(&mut io2, cntlid, 1, now);
    // The old connection going away now must not free QID 1 from under the new one.
    drop(io);
    let mut io3 = Link::new(&target, HostOptions::default(), now);
    io3.pump(now);
    let (sqe, data) = host::connect_command(1, 128, 0, cntlid, HOSTID, SUBNQN, HOSTNQN);
    let c = io3.command(sqe, Some(data), 0, now);
    assert_eq!(InvalidParameter::from_dw0(c.cqe.dw0.get()), InvalidParameter::QID);
    assert_eq!(write(&mut io2, 0, vec![1; 512], now).status(), Status::SUCCESS);
}

#[test]
fn dropping_a_connection_releases_its_controller() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut admin = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut admin, SUBNQN, 5000, now);
    assert_eq!(target.controllers().len(), 1);
    drop(admin);
    assert!(target.controllers().is_empty());
    target.remove_subsystem(SUBNQN, false).unwrap();
}

#[test]
fn io_tokens_are_unique_across_connections() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (_admin, mut io1, cntlid) = io_setup(&target, HostOptions::default(), 5000, now);
    let mut io2 = Link::new(&target, HostOptions::default(), now);
    bring_up_io(&mut io2, cntlid, 2, now);
    io1.defer_io = true;
    io2.defer_io = true;
    for link in [&mut io1, &mut io2] {
        let mut sqe = rw_sqe(0x02, 0, 1, false);
        sqe.cid.set(7);
        link.host.submit(sqe, None, 512);
        link.pump(now);
    }
    assert_ne!(io1.parked[0].token, io2.parked[0].token);
}

#[test]
fn a_host_cannot_recreate_its_controller_while_old_writes_are_running() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (admin, mut io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    io.defer_io = true;
    let _ = io.host.submit(rw_sqe(0x01, 0, 1, false), Some(Payload::from(vec![1u8; 512])), 0);
    io.pump(now);
    assert_eq!(io.parked.len(), 1);
    // The host loses both connections (error recovery) while the write is still in the backend.
    drop(admin);
    io.conn.handle_wakeup(now);
    io.drain_events(now);
    assert_eq!(io.closed, Some(CloseReason::ControllerGone));
    assert!(!io.conn.is_drained());
    // Reconnecting now is refused with a retryable status...
    let mut again = Link::new(&target, HostOptions::default(), now);
    again.pump(now);
    let (sqe, data) = host::connect_command(0, 32, 5000, CNTLID_DYNAMIC, HOSTID, SUBNQN, HOSTNQN);
    let c = again.command(sqe, Some(data), 0, now);
    assert_eq!(c.status(), Status::CONNECT_CONTROLLER_BUSY);
    assert!(!c.status().dnr());
    // ... until the old write has landed.
    let req = io.parked.pop().unwrap();
    let r = nvmeof_target::execute_blocking(req.namespace.backend().as_ref(), req.op);
    io.conn.complete_io(req.token, r, now);
    assert!(io.conn.is_drained());
    let mut again = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut again, SUBNQN, 5000, now);
}

#[test]
fn the_test_host_never_reuses_a_command_id_before_its_completion_is_taken() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let (_admin, mut io, _) = io_setup(&target, HostOptions::default(), 5000, now);
    let a = io.host.submit(rw_sqe(0x02, 0, 1, false), None, 512);
    let b = io.host.submit(rw_sqe(0x02, 8, 1, false), None, 512);
    io.pump(now);
    // Both completions wait in the host's queue; a new command must not take either CID.
    let c = io.host.submit(rw_sqe(0x02, 16, 1, false), None, 512);
    assert!(c != a && c != b);
    io.pump(now);
    let got: Vec<u16> = io.pending_completions().iter().map(|c| c.cqe.cid.get()).collect();
    assert_eq!(got.len(), 3);
    assert!(got.contains(&a) && got.contains(&b) && got.contains(&c));
}

/// Traffic-based keep alive is announced only when configured: with it, an idle Linux host checks
/// every KATO/4 and sends twice the keep-alives.
#[test]
fn traffic_based_keep_alive_is_announced_only_when_configured() {
    let now = Clock::new().0;
    for tbkas in [false, true] {
        let mut config = TargetConfig::default();
        config.traffic_based_keep_alive = tbkas;
        let (target, _) = target_with_config(config);
        let mut admin = Link::new(&target, HostOptions::default(), now);
        bring_up_admin(&mut admin, SUBNQN, 5000, now);
        let ctratt = id_ctrl(&mut admin, now).ctratt.get();
        assert_eq!(ctratt & nvmeof_proto::nvme::identify::CTRATT_TBKAS != 0, tbkas, "CTRATT {ctratt:#x}");
        assert_ne!(ctratt & nvmeof_proto::nvme::identify::CTRATT_HOST_ID_128, 0);
    }
}
