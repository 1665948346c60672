//! Subsystems and namespaces: what a target exports, changeable at run time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::RwLock;

use crate::backend::BlockBackend;

/// A namespace: a volume with a stable identity.
pub struct Namespace {
    nsid: u32,
    backend: Arc<dyn BlockBackend>,
    nguid: [u8; 16],
    uuid: [u8; 16],
    block_shift: u8,
    stats: NamespaceStats,
}

impl Namespace {
    pub(crate) fn new(config: NamespaceConfig, block_size: u32) -> Self {
        Self {
            nsid: config.nsid,
            backend: config.backend,
            nguid: config.nguid,
            uuid: config.uuid,
            block_shift: if block_size == 4096 { 12 } else { 9 },
            stats: NamespaceStats::default(),
        }
    }

    /// Namespace ID (1-based).
    #[must_use]
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// The backend holding the data.
    #[must_use]
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    /// NGUID reported in Identify Namespace and the descriptor list.
    #[must_use]
    pub fn nguid(&self) -> [u8; 16] {
        self.nguid
    }

    /// UUID reported in the descriptor list.
    #[must_use]
    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    /// Logical block size in bytes.
    #[must_use]
    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    /// log2 of the block size.
    #[must_use]
    pub fn block_shift(&self) -> u8 {
        self.block_shift
    }

    /// Size in logical blocks (NSZE).
    #[must_use]
    pub fn size_blocks(&self) -> u64 {
        self.backend.size_bytes() >> self.block_shift
    }

    /// Counters of the I/O done on this namespace.
    #[must_use]
    pub fn stats(&self) -> &NamespaceStats {
        &self.stats
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Namespace")
            .field("nsid", &self.nsid)
            .field("size_blocks", &self.size_blocks())
            .field("block_size", &self.block_size())
            .finish_non_exhaustive()
    }
}

/// How to create a namespace.
#[derive(Clone)]
pub struct NamespaceConfig {
    /// Namespace ID, 1..=[`crate::TargetConfig::max_namespaces`].
    pub nsid: u32,
    /// The volume.
    pub backend: Arc<dyn BlockBackend>,
    /// NGUID: globally unique and stable across restarts (the host identifies the namespace by it).
    pub nguid: [u8; 16],
    /// UUID: globally unique and stable across restarts.
    pub uuid: [u8; 16],
}

impl fmt::Debug for NamespaceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamespaceConfig").field("nsid", &self.nsid).finish_non_exhaustive()
    }
}

impl NamespaceConfig {
    /// A namespace whose NGUID and UUID are derived from `(subsystem NQN, nsid)` with a stable hash —
    /// convenient for tests and for embedders that do not store identities. Production code should
    /// store random identities with the volume.
    #[must_use]
    pub fn derived(subnqn: &str, nsid: u32, backend: Arc<dyn BlockBackend>) -> Self {
        let nguid = derive_id(subnqn, nsid, 0x6e67);
        let mut uuid = derive_id(subnqn, nsid, 0x7575);
        // RFC 4122 version 8 (custom) / variant bits.
        uuid[6] = (uuid[6] & 0x0f) | 0x80;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        Self { nsid, backend, nguid, uuid }
    }
}

/// 128 stable bits from a string and two numbers (FNV-1a, twice with different seeds).
fn derive_id(name: &str, n: u32, salt: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (half, seed) in [(0usize, 0xcbf2_9ce4_8422_2325u64), (8, 0x8422_2325_cbf2_9ce4)] {
        let mut h = seed;
        for b in name.bytes().chain(n.to_le_bytes()).chain(salt.to_le_bytes()).chain([half as u8]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        if let Some(dst) = out.get_mut(half..half + 8) {
            dst.copy_from_slice(&h.to_be_bytes());
        }
    }
    out
}

/// Per-namespace I/O counters, updated lock-free on the I/O path.
#[derive(Debug, Default)]
pub struct NamespaceStats {
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    other: AtomicU64,
    errors: AtomicU64,
    latency: LatencyHistogram,
    latency_sum_ns: AtomicU64,
}

/// Kinds of operations counted by [`NamespaceStats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpClass {
    Read,
    Write,
    Other,
}

impl NamespaceStats {
    pub(crate) fn record(&self, class: OpClass, bytes: u64, ok: bool, latency: Duration) {
        match class {
            OpClass::Read => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            OpClass::Write => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            OpClass::Other => {
                self.other.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.latency.record(latency);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    #[must_use]
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency_buckets: self.latency.snapshot(),
            latency_sum_ns: self.latency_sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// Number of latency buckets: bucket `i` counts operations that took less than
/// `LATENCY_BUCKET_BASE_NS × 2^i` nanoseconds (128 ns, 256 ns, … 8.6 s; the last bucket counts
/// everything slower). The target's own time for a command is often well under a microsecond (a
/// memory volume's 4 KiB read), so the buckets start below it.
pub const LATENCY_BUCKETS: usize = 28;

/// Upper bound of latency bucket 0, in nanoseconds (see [`LATENCY_BUCKETS`]).
pub const LATENCY_BUCKET_BASE_NS: u64 = 128;

#[derive(Debug, Default)]
struct LatencyHistogram([AtomicU64; LATENCY_BUCKETS]);

impl LatencyHistogram {
    fn record(&self, d: Duration) {
        let units = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX) / LATENCY_BUCKET_BASE_NS;
        let bucket = (64 - units.leading_zeros() as usize).min(LATENCY_BUCKETS - 1);
        if let Some(b) = self.0.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> [u64; LATENCY_BUCKETS] {
        let mut out = [0; LATENCY_BUCKETS];
        for (o, b) in out.iter_mut().zip(&self.0) {
            *o = b.load(Ordering::Relaxed);
        }
        out
    }
}

/// A copy of a namespace's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Read commands completed.
    pub reads: u64,
    /// Write commands completed.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flush, Write Zeroes and Dataset Management commands completed.
    pub other: u64,
    /// Commands completed with an error status.
    pub errors: u64,
    /// Latency histogram: entry `i` counts commands that took less than 2^i µs (from the command
    /// capsule's arrival to its completion).
    pub latency_buckets: [u64; LATENCY_BUCKETS],
    /// Sum of the latencies counted in `latency_buckets`, in nanoseconds (wraps after ~584 years).
    pub latency_sum_ns: u64,
}

/// Which hosts may connect to a subsystem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum HostAccess {
    /// Only the listed host NQNs (the default, with an empty list: nobody).
    #[default]
    DenyAllExcept,
    /// Any host. Must be chosen explicitly.
    AllowAny,
}

/// How to create a subsystem.
#[derive(Clone, Debug)]
pub struct SubsystemConfig {
    /// Subsystem NQN (at most 223 bytes), e.g. `nqn.2026-01.io.xatastor:vol-1`.
    pub nqn: String,
    /// Serial number (at most 20 printable ASCII characters).
    pub serial: String,
    /// Model number (at most 40 printable ASCII characters).
    pub model: String,
    /// Who may connect besides [`SubsystemConfig::allowed_hosts`].
    pub access: HostAccess,
    /// Host NQNs allowed to connect.
    pub allowed_hosts: Vec<String>,
    /// Every host must authenticate with DH-HMAC-CHAP (see [`crate::auth`]); a host without a
    /// secret in the target's [`crate::auth::HostKeys`] cannot use the subsystem. Without it, only
    /// hosts that have a secret there must authenticate.
    pub require_auth: bool,
}

impl SubsystemConfig {
    /// A subsystem no host may connect to until allowed (default deny), with model "Xatastor".
    #[must_use]
    pub fn new(nqn: impl Into<String>, serial: impl Into<String>) -> Self {
        Self {
            nqn: nqn.into(),
            serial: serial.into(),
            model: "Xatastor".into(),
            access: HostAccess::DenyAllExcept,
            allowed_hosts: Vec::new(),
            require_auth: false,
        }
    }
}

pub(crate) type NamespaceMap = BTreeMap<u32, Arc<Namespace>>;

/// An NVM subsystem: namespaces plus who may reach them.
pub struct Subsystem {
    nqn: String,
    serial: String,
    model: String,
    /// Read on every I/O command without a lock; replaced wholesale by the admin path.
    namespaces: ArcSwap<NamespaceMap>,
    namespaces_writer: parking_lot::Mutex<()>,
    hosts: RwLock<(HostAccess, BTreeSet<String>)>,
    require_auth: AtomicBool,
}

impl Subsystem {
    pub(crate) fn new(config: SubsystemConfig) -> Self {
        Self {
            nqn: config.nqn,
            serial: config.serial,
            model: config.model,
            namespaces: ArcSwap::from_pointee(BTreeMap::new()),
            namespaces_writer: parking_lot::Mutex::new(()),
            hosts: RwLock::new((config.access, config.allowed_hosts.into_iter().collect())),
            require_auth: AtomicBool::new(config.require_auth),
        }
    }

    /// Subsystem NQN.
    #[must_use]
    pub fn nqn(&self) -> &str {
        &self.nqn
    }

    /// Serial number.
    #[must_use]
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Model number.
    #[must_use]
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The namespace with ID `nsid`, if attached (lock-free).
    #[must_use]
    pub fn namespace(&self, nsid: u32) -> Option<Arc<Namespace>> {
        self.namespaces.load().get(&nsid).cloned()
    }

    /// All attached namespaces, in NSID order.
    #[must_use]
    pub fn namespaces(&self) -> Arc<NamespaceMap> {
        self.namespaces.load_full()
    }

    /// Copy-on-write update of the namespace table; writers are serialised, readers never wait.
    pub(crate) fn update_namespaces<R>(&self, f: impl FnOnce(&mut NamespaceMap) -> R) -> R {
        let _writer = self.namespaces_writer.lock();
        let mut next = NamespaceMap::clone(&self.namespaces.load());
        let r = f(&mut next);
        self.namespaces.store(Arc::new(next));
        r
    }

    /// True if `hostnqn` may connect.
    #[must_use]
    pub fn allows_host(&self, hostnqn: &str) -> bool {
        let hosts = self.hosts.read();
        hosts.0 == HostAccess::AllowAny || hosts.1.contains(hostnqn)
    }

    pub(crate) fn set_host_allowed(&self, hostnqn: &str, allowed: bool) -> bool {
        let mut hosts = self.hosts.write();
        if allowed {
            hosts.1.insert(hostnqn.to_owned())
        } else {
            hosts.1.remove(hostnqn)
        }
    }

    pub(crate) fn set_access(&self, access: HostAccess) {
        self.hosts.write().0 = access;
    }

    /// True if every host must authenticate (see [`SubsystemConfig::require_auth`]).
    #[must_use]
    pub fn requires_auth(&self) -> bool {
        self.require_auth.load(Ordering::Relaxed)
    }

    pub(crate) fn set_require_auth(&self, required: bool) {
        self.require_auth.store(required, Ordering::Relaxed);
    }
}

impl fmt::Debug for Subsystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subsystem")
            .field("nqn", &self.nqn)
            .field("namespaces", &self.namespaces.load().len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_start_below_a_microsecond() {
        let h = LatencyHistogram::default();
        for ns in [0, 127, 128, 255, 256, 999, 1_000, 1_000_000, 60_000_000_000] {
            h.record(Duration::from_nanos(ns));
        }
        let b = h.snapshot();
        assert_eq!(b[0], 2, "0 and 127 ns");
        assert_eq!(b[1], 2, "128 and 255 ns");
        assert_eq!(b[2], 1, "256 ns");
        assert_eq!(b[3], 2, "999 and 1000 ns: under 1024");
        assert_eq!(b[13], 1, "1 ms: under 128 ns × 2^13 = 1.05 ms");
        assert_eq!(b[LATENCY_BUCKETS - 1], 1, "a minute: the last bucket");
    }
}
