//! NVMe in-band authentication: DH-HMAC-CHAP (NVMe Base Specification 2.x, "Authentication"), the
//! controller side of the engine and the secrets it checks hosts against.
//!
//! A queue whose subsystem requires authentication for the connecting host is answered with
//! AUTHREQ.ATR in its Connect response; until the host has authenticated it, every command but
//! Authentication Send, Authentication Receive and Disconnect fails with *Authentication Required*.
//! Each queue (admin and I/O) authenticates on its own; a live queue may authenticate again whenever
//! the host starts a new transaction (it stays usable meanwhile).
//!
//! ```text
//!  Connect ──(ATR)──▶ Idle ◀───────────────────────────────────────────── authenticated ◀──┐
//!                      │ Send AUTH_Negotiate (any state but Failed: a new transaction)        │
//!                      ▼                                                                      │
//!                 Negotiated ── Receive ──▶ DH-HMAC-CHAP_Challenge (hash, group, S1, C1, g^x) │
//!                      │                                                                      │
//!                      ▼                                                                      │
//!                 AwaitReply ── Send DH-HMAC-CHAP_Reply (R1 checked; C2 if bidirectional)     │
//!                      │                                                                      │
//!                      ▼                                                                      │
//!                 Success1 ── Receive ──▶ DH-HMAC-CHAP_Success1 ──── no C2 ──────────────────▶┤
//!                      │ (R2 sent)                                                            │
//!                      ▼                                                                      │
//!                AwaitSuccess2 ── Send DH-HMAC-CHAP_Success2 ────────────────────────────────▶┘
//!
//!  any check failing ──▶ Failed ── Receive ──▶ AUTH_Failure1 (reason) ──▶ queue torn down
//!  Send AUTH_Failure2 (the host refuses us) ──────────────────────────────▶ queue torn down
//!  deadline passed: before the first success ──▶ queue torn down; during a re-authentication
//!                   ──▶ the transaction is dropped, the queue stays authenticated
//! ```
//!
//! Secrets come from a [`HostKeys`] the embedder installs with [`crate::Target::set_host_keys`]
//! ([`MemoryHostKeys`] is a ready one): it is asked at every Connect (does this host have a
//! secret, so that it must authenticate?) and at the start of every transaction (which secrets to
//! check against), so a changed secret applies to the next (re)authentication and connected hosts
//! stay connected. A subsystem with [`crate::SubsystemConfig::require_auth`] makes every host
//! authenticate; a host without a secret then fails exactly like one with a wrong secret.
//!
//! Nothing here logs a secret: [`DhchapSecret`]'s `Debug` is redacted and keys are wiped on drop.
//! Randomness (challenges, sequence numbers, DH exponents) comes from an [`Entropy`], the OS's by
//! default and a deterministic one in tests.

pub(crate) mod commands;
mod crypto;
pub(crate) mod dh;
mod secret;
pub(crate) mod session;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use nvmeof_proto::nvme::auth::{DhGroup, DhchapHash, FailureExplanation};
use parking_lot::{Mutex, RwLock};
pub use secret::{DhchapSecret, SecretError};
use sha2::{Digest, Sha256};

pub(crate) use crypto::{ct_eq, Response, CONTROLLER_LABEL, HOST_LABEL};

/// The random number source failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the random number source failed")]
pub struct EntropyError;

/// Where challenges, sequence numbers and Diffie-Hellman exponents come from.
pub trait Entropy: Send + Sync {
    /// Fills `dest` with unpredictable bytes.
    fn fill(&self, dest: &mut [u8]) -> Result<(), EntropyError>;
}

/// The operating system's random number generator (`getrandom(2)`): the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&self, dest: &mut [u8]) -> Result<(), EntropyError> {
        getrandom::fill(dest).map_err(|_| EntropyError)
    }
}

/// A reproducible byte stream (SHA-256 of a seed and a counter): the same seed gives the same
/// challenges and exponents, so a test or a fuzz run can be replayed. Never use it to protect
/// anything.
#[derive(Debug)]
pub struct DeterministicEntropy {
    seed: u64,
    counter: Mutex<u64>,
}

impl DeterministicEntropy {
    /// The stream for `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: Mutex::new(0) }
    }
}

impl Entropy for DeterministicEntropy {
    fn fill(&self, dest: &mut [u8]) -> Result<(), EntropyError> {
        let mut counter = self.counter.lock();
        for chunk in dest.chunks_mut(32) {
            let block = Sha256::new()
                .chain_update(self.seed.to_le_bytes())
                .chain_update(counter.to_le_bytes())
                .finalize();
            *counter += 1;
            for (d, s) in chunk.iter_mut().zip(block.iter()) {
                *d = *s;
            }
        }
        Ok(())
    }
}

/// The secrets of one host for one subsystem.
#[derive(Clone, Debug)]
pub struct HostSecrets {
    /// The host's secret: what the host proves it knows (its `--dhchap-secret`).
    pub host: DhchapSecret,
    /// The controller's secret, for bidirectional authentication (the host's
    /// `--dhchap-ctrl-secret`): with it the target proves itself to hosts that ask. A host that asks
    /// while none is set fails authentication.
    pub controller: Option<DhchapSecret>,
}

impl HostSecrets {
    /// Secrets for unidirectional authentication.
    #[must_use]
    pub fn new(host: DhchapSecret) -> Self {
        Self { host, controller: None }
    }

    /// The same with a controller secret (bidirectional authentication).
    #[must_use]
    pub fn with_controller(mut self, controller: DhchapSecret) -> Self {
        self.controller = Some(controller);
        self
    }
}

/// Where the target finds the DH-HMAC-CHAP secrets of a host.
///
/// The target calls it on the connection's thread at every Connect of a queue to a subsystem and at
/// the start of every authentication transaction: keep it quick (a map lookup; load files ahead of
/// time or cache them) and never block. Returning a changed value is how secrets are rotated: the
/// next (re)authentication uses it, live queues are not disturbed.
pub trait HostKeys: Send + Sync {
    /// The secrets `hostnqn` must prove for subsystem `subnqn`, or `None` if it has none (then it
    /// need not authenticate, unless the subsystem requires authentication of every host, in which
    /// case it cannot connect).
    fn host_secrets(&self, subnqn: &str, hostnqn: &str) -> Option<Arc<HostSecrets>>;
}

/// A [`HostKeys`] kept in memory: secrets per (subsystem, host), changeable at any time.
///
/// ```
/// use std::sync::Arc;
/// use nvmeof_target::auth::{DhchapSecret, HostSecrets, MemoryHostKeys};
/// use nvmeof_target::{Target, TargetConfig};
///
/// let keys = Arc::new(MemoryHostKeys::new());
/// let secret = DhchapSecret::parse("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:")?;
/// keys.set("nqn.2026-01.io.xatastor:vol1", "nqn.2014-08.org.nvmexpress:uuid:1234", HostSecrets::new(secret));
/// let target = Target::new(TargetConfig::default());
/// target.set_host_keys(keys.clone());
/// // Later: keys.set(..) again to rotate; keys.remove(..) to drop the requirement.
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Default)]
pub struct MemoryHostKeys {
    map: RwLock<HashMap<(String, String), Arc<HostSecrets>>>,
}

impl fmt::Debug for MemoryHostKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHostKeys").field("entries", &self.map.read().len()).finish()
    }
}

impl MemoryHostKeys {
    /// An empty set: no host has a secret.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets (or replaces) the secrets of `hostnqn` for `subnqn`.
    pub fn set(&self, subnqn: &str, hostnqn: &str, secrets: HostSecrets) {
        self.map.write().insert((subnqn.to_owned(), hostnqn.to_owned()), Arc::new(secrets));
    }

    /// Removes the secrets of `hostnqn` for `subnqn`; false if there were none.
    pub fn remove(&self, subnqn: &str, hostnqn: &str) -> bool {
        self.map.write().remove(&(subnqn.to_owned(), hostnqn.to_owned())).is_some()
    }
}

impl HostKeys for MemoryHostKeys {
    fn host_secrets(&self, subnqn: &str, hostnqn: &str) -> Option<Arc<HostSecrets>> {
        self.map.read().get(&(subnqn.to_owned(), hostnqn.to_owned())).cloned()
    }
}

/// What the target accepts in DH-HMAC-CHAP, and how long a host may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthConfig {
    /// Time a queue has to authenticate after its Connect, and each later (re)authentication
    /// transaction has from its AUTH_Negotiate. A queue that has not authenticated in time is torn
    /// down; a re-authentication that does not finish is dropped (the queue keeps its earlier
    /// authentication).
    pub timeout: Duration,
    /// Hash functions accepted, most preferred first: the first one the host offers is chosen.
    pub hashes: Vec<DhchapHash>,
    /// Diffie-Hellman groups accepted, most preferred first. Leave [`DhGroup::Null`] out to refuse
    /// hosts that offer no FFDHE group.
    pub dh_groups: Vec<DhGroup>,
}

impl Default for AuthConfig {
    /// SHA-512, SHA-384, SHA-256; ffdhe3072 first (128-bit strength, like SHA-256, for a fraction of
    /// what ffdhe8192 costs: each queue's authentication takes two exponentiations on the
    /// connection's thread, about 2.5 ms with ffdhe3072 and 20 ms with ffdhe8192 on a current x86-64
    /// core; see `examples/auth_cost.rs`), then the larger groups, then ffdhe2048 and, last, no DH
    /// exchange.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            hashes: vec![DhchapHash::Sha512, DhchapHash::Sha384, DhchapHash::Sha256],
            dh_groups: vec![
                DhGroup::Ffdhe3072,
                DhGroup::Ffdhe4096,
                DhGroup::Ffdhe6144,
                DhGroup::Ffdhe8192,
                DhGroup::Ffdhe2048,
                DhGroup::Null,
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// R1 and R2 for every hash, the null group and ffdhe2048, and secrets of every `hh`, byte for
    /// byte against an independent implementation (tests/vectors/gen_dhchap_vectors.py).
    #[test]
    fn response_vectors_byte_exact() {
        let text = include_str!("../../tests/vectors/dhchap-responses.txt");
        let ffdhe = include_str!("../../tests/vectors/ffdhe.txt");
        let shared2048 = unhex(
            ffdhe
                .split("[openssl-ffdhe2048]")
                .nth(1)
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("shared="))
                .unwrap(),
        );
        let global = |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap();
        let (hostnqn, subnqn) = (global("hostnqn"), global("subnqn"));
        let mut cases = 0;
        for block in text.split("[case-").skip(1) {
            let f = |k: &str| block.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap();
            let hash = DhchapHash::from_u8(f("hash").parse().unwrap()).unwrap();
            let shared = match f("group") {
                "null" => None,
                "ffdhe2048" => Some(&shared2048[..]),
                g => panic!("{g}"),
            };
            let t_id: u16 = f("t_id").parse().unwrap();
            let host = DhchapSecret::parse(f("host_secret")).unwrap().transformed_key(hostnqn);
            let ctrl = DhchapSecret::parse(f("ctrl_secret")).unwrap().transformed_key(subnqn);
            let (c1, c2) = (unhex(f("c1")), unhex(f("c2")));
            let r1 = Response {
                hash,
                key: &host,
                challenge: &c1,
                shared_secret: shared,
                seqnum: f("s1").parse().unwrap(),
                t_id,
                label: HOST_LABEL,
                nqn1: hostnqn,
                nqn2: subnqn,
            };
            assert_eq!(*r1.compute(), unhex(f("r1")), "case {}", &block[..3]);
            assert!(r1.verify(&unhex(f("r1"))));
            let r2 = Response {
                hash,
                key: &ctrl,
                challenge: &c2,
                shared_secret: shared,
                seqnum: f("s2").parse().unwrap(),
                t_id,
                label: CONTROLLER_LABEL,
                nqn1: subnqn,
                nqn2: hostnqn,
            };
            assert_eq!(*r2.compute(), unhex(f("r2")), "case {}", &block[..3]);
            cases += 1;
        }
        assert_eq!(cases, 24);
    }

    #[test]
    fn deterministic_entropy_repeats_per_seed() {
        let (mut a, mut b, mut c) = ([0u8; 70], [0u8; 70], [0u8; 70]);
        DeterministicEntropy::new(1).fill(&mut a).unwrap();
        DeterministicEntropy::new(1).fill(&mut b).unwrap();
        DeterministicEntropy::new(2).fill(&mut c).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a[..32], a[32..64], "blocks differ");
    }

    #[test]
    fn os_entropy_fills() {
        let mut a = [0u8; 64];
        OsEntropy.fill(&mut a).unwrap();
        assert_ne!(a, [0u8; 64]);
    }

    #[test]
    fn memory_host_keys_set_replace_remove() {
        let keys = MemoryHostKeys::new();
        let e = DeterministicEntropy::new(3);
        let s1 = DhchapSecret::generate(&e, 32, None).unwrap();
        let s2 = DhchapSecret::generate(&e, 32, None).unwrap();
        keys.set("sub", "host", HostSecrets::new(s1.clone()));
        assert_eq!(*keys.host_secrets("sub", "host").unwrap().host.to_dhhc1(), *s1.to_dhhc1());
        assert!(keys.host_secrets("sub", "other").is_none());
        assert!(keys.host_secrets("other", "host").is_none());
        keys.set("sub", "host", HostSecrets::new(s2.clone()));
        assert_eq!(*keys.host_secrets("sub", "host").unwrap().host.to_dhhc1(), *s2.to_dhhc1());
        assert!(keys.remove("sub", "host"));
        assert!(!keys.remove("sub", "host"));
        assert!(format!("{keys:?}").contains("entries"));
    }
}
