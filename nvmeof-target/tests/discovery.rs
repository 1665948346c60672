//! Discovery log pages served a window at a time: a Get Log Page asks the subsystem source for the
//! entries its window overlaps, never for the whole list, whatever the number of subsystems.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use nvmeof_proto::nvme::discovery::{DiscoveryLogEntry, DiscoveryLogPage, DISCOVERY_NQN};
use nvmeof_proto::nvme::Status;
use nvmeof_target::host::HostOptions;
use nvmeof_target::{HostAccess, NamespaceConfig, SubsystemConfig, SubsystemSource, Target};
use zerocopy::FromBytes;

/// A source of `n` allow-any-host subsystems (not loaded) that counts what it is asked.
struct CountingSource {
    nqns: Vec<String>,
    /// Entries handed out by `discovery_range`, all calls together.
    entries_asked: AtomicU64,
    range_calls: AtomicU64,
}

impl CountingSource {
    fn new(n: usize) -> Arc<Self> {
        let nqns = (0..n).map(|i| format!("nqn.2026-01.io.xatastor:src-{i:07}")).collect();
        Arc::new(Self { nqns, entries_asked: AtomicU64::new(0), range_calls: AtomicU64::new(0) })
    }
}

impl SubsystemSource for CountingSource {
    fn activate(&self, _subnqn: &str) -> Option<(SubsystemConfig, Vec<NamespaceConfig>)> {
        None
    }
    fn discovery_len(&self, _hostnqn: &str) -> u64 {
        self.nqns.len() as u64
    }
    fn discovery_range(&self, _hostnqn: &str, first: u64, count: usize) -> Vec<String> {
        self.range_calls.fetch_add(1, Ordering::Relaxed);
        let first = usize::try_from(first).unwrap_or(usize::MAX).min(self.nqns.len());
        let out: Vec<String> = self.nqns[first..].iter().take(count).cloned().collect();
        self.entries_asked.fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }
    fn discovery_lists(&self, _hostnqn: &str, subnqn: &str) -> bool {
        self.nqns.binary_search_by(|n| n.as_str().cmp(subnqn)).is_ok()
    }
}

fn header_of(data: &[u8]) -> (u64, u64) {
    let genctr = u64::from_le_bytes(data[..8].try_into().unwrap());
    let numrec = u64::from_le_bytes(data[8..16].try_into().unwrap());
    (genctr, numrec)
}

fn entries_of(data: &[u8]) -> Vec<String> {
    data.chunks(1024)
        .map(|c| DiscoveryLogEntry::read_from_bytes(c).unwrap())
        .map(|e| e.subnqn().unwrap_or("").to_owned())
        .collect()
}

fn discovery_link(target: &Target, now: Instant) -> Link {
    let mut link = Link::new(target, HostOptions::default(), now);
    bring_up_admin(&mut link, DISCOVERY_NQN, 0, now);
    link
}

/// Reads the whole page the way libnvme does: header, then 4 KiB pieces.
fn read_whole_page(link: &mut Link, now: Instant) -> Vec<u8> {
    let header = get_log_page(link, 0x70, 0, 0, 1024, true, now);
    let (_, numrec) = header_of(&header.data.to_bytes());
    let total = 1024 * (1 + numrec as u32);
    let mut page = Vec::new();
    let mut off = 0;
    while off < total {
        let n = 4096.min(total - off);
        let c = get_log_page(link, 0x70, 0, u64::from(off), n, off + n < total, now);
        assert_eq!(c.status(), Status::SUCCESS);
        page.extend_from_slice(&c.data.to_bytes());
        off += n;
    }
    page
}

#[test]
fn a_window_at_a_high_offset_asks_the_source_for_that_window_only() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume(); // SUBNQN, allowed to HOSTNQN, not in the source
    let source = CountingSource::new(100_000);
    target.set_source(source.clone());
    let mut link = discovery_link(&target, now);

    // The header: NUMREC counts the source's entries and the target's own, without building any.
    let c = get_log_page(&mut link, 0x70, 0, 0, 1024, true, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let (genctr, numrec) = header_of(&c.data.to_bytes());
    assert_eq!(numrec, 100_001);
    assert_eq!(source.entries_asked.load(Ordering::Relaxed), 0);

    // Four entries at position 90,000: the source hands out those four.
    let offset = 1024 + 90_000 * 1024;
    let c = get_log_page(&mut link, 0x70, 0, offset, 4096, true, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let data = c.data.to_bytes();
    assert_eq!(data.len(), 4096);
    assert_eq!(entries_of(&data), source.nqns[90_000..90_004]);
    assert_eq!(source.entries_asked.load(Ordering::Relaxed), 4, "the window's entries, not 100,000");
    assert_eq!(source.range_calls.load(Ordering::Relaxed), 1);

    // A window starting in the middle of an entry: the entries it overlaps, cut where it is.
    let c = get_log_page(&mut link, 0x70, 0, offset + 512, 1024, true, now);
    let data = c.data.to_bytes();
    let mut expected = vec![0u8; 2048];
    let whole = get_log_page(&mut link, 0x70, 0, offset, 2048, true, now).data.to_bytes();
    expected.copy_from_slice(&whole);
    assert_eq!(&data[..], &expected[512..1536]);

    // The last source entry and the target's own subsystem after it, then zeros past the end.
    let offset = 1024 + 99_999 * 1024;
    let c = get_log_page(&mut link, 0x70, 0, offset, 4096, true, now);
    let data = c.data.to_bytes();
    assert_eq!(data.len(), 4096);
    let names = entries_of(&data[..2048]);
    assert_eq!(names, [source.nqns[99_999].as_str(), SUBNQN]);
    assert!(data[2048..].iter().all(|&b| b == 0), "past the end of the page: zeros");

    // Far past the end: zeros, and nothing asked of the source.
    let before = source.entries_asked.load(Ordering::Relaxed);
    let c = get_log_page(&mut link, 0x70, 0, 1 << 40, 4096, true, now);
    assert_eq!(c.status(), Status::SUCCESS);
    assert!(c.data.to_bytes().iter().all(|&b| b == 0));
    assert_eq!(source.entries_asked.load(Ordering::Relaxed), before);

    // Nothing changed: the generation counter is the same in every window.
    let c = get_log_page(&mut link, 0x70, 0, 0, 1024, true, now);
    assert_eq!(header_of(&c.data.to_bytes()), (genctr, 100_001));
}

#[test]
fn windows_read_in_pieces_make_the_same_page_as_one_read() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let source = CountingSource::new(10);
    // Added to the target and listed by the source too: listed once, where the source lists it.
    let dup = source.nqns[3].clone();
    target
        .add_subsystem(SubsystemConfig { access: HostAccess::AllowAny, ..SubsystemConfig::new(&dup, "XD1") })
        .unwrap();
    // Added, allowing any host, not in the source: listed after the source's entries, in NQN order.
    let extra = "nqn.2026-01.io.xatastor:aaa-extra";
    target
        .add_subsystem(SubsystemConfig { access: HostAccess::AllowAny, ..SubsystemConfig::new(extra, "XE1") })
        .unwrap();
    // Added, not for this host: not listed.
    target.add_subsystem(SubsystemConfig::new("nqn.2026-01.io.xatastor:hidden", "XH1")).unwrap();
    target.set_source(source.clone());
    let mut link = discovery_link(&target, now);

    let pieces = read_whole_page(&mut link, now);
    let log = DiscoveryLogPage::parse(&pieces).unwrap();
    let names: Vec<&str> = log.entries.iter().map(|e| e.subnqn().unwrap()).collect();
    let mut expected: Vec<&str> = source.nqns.iter().map(String::as_str).collect();
    expected.extend([extra, SUBNQN]);
    assert_eq!(names, expected);

    // One read of the whole page (and more: zeros after it) gives the same bytes.
    let len = pieces.len() as u32 + 8192;
    let one = get_log_page(&mut link, 0x70, 0, 0, len, true, now);
    assert_eq!(one.status(), Status::SUCCESS);
    let one = one.data.to_bytes();
    assert_eq!(one.len(), len as usize);
    assert_eq!(&one[..pieces.len()], &pieces[..]);
    assert!(one[pieces.len()..].iter().all(|&b| b == 0));

    // A change bumps the generation counter seen by the next window.
    target.set_host_access("nqn.2026-01.io.xatastor:hidden", HostAccess::AllowAny).unwrap();
    let c = get_log_page(&mut link, 0x70, 0, 0, 1024, true, now);
    let (genctr, numrec) = header_of(&c.data.to_bytes());
    assert!(genctr > log.genctr());
    assert_eq!(numrec, 13);
}

#[test]
fn a_read_longer_than_mdts_is_refused_and_others_get_the_page_and_zeros() {
    let now = Clock::new().0;
    let (target, _) = target_with_volume();
    let mut link = discovery_link(&target, now);
    let mdts = target.config().max_transfer_bytes;
    let c = get_log_page(&mut link, 0x70, 0, 0, mdts + 4096, true, now);
    assert_eq!(c.status(), Status::INVALID_FIELD.with_dnr());
    // The longest read there is, for a page of one entry: the entry, then zeros.
    let c = get_log_page(&mut link, 0x70, 0, 0, mdts, true, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let data = c.data.to_bytes();
    assert_eq!(data.len(), mdts as usize);
    assert_eq!(header_of(&data).1, 1);
    assert_eq!(entries_of(&data[1024..2048]), [SUBNQN]);
    assert!(data[2048..].iter().all(|&b| b == 0));
    // Other log pages too: the SMART log (512 bytes) then zeros.
    let mut io = Link::new(&target, HostOptions::default(), now);
    bring_up_admin(&mut io, SUBNQN, 0, now);
    let c = get_log_page(&mut io, 0x02, 0xffff_ffff, 0, mdts, true, now);
    assert_eq!(c.status(), Status::SUCCESS);
    let data = c.data.to_bytes();
    assert_eq!(data.len(), mdts as usize);
    assert_eq!((data[3], data[4]), (100, 10), "available spare and its threshold");
    assert!(data[512..].iter().all(|&b| b == 0));
}
