//! # nvmeof-target
//!
//! A runtime-agnostic (sans-I/O) NVMe over Fabrics target engine for the NVMe/TCP transport, and the
//! [`BlockBackend`] trait that puts any block device behind it.
//!
//! ```text
//!  driver (any runtime)                      nvmeof-target
//!  ───────────────────                       ─────────────────────────────────────────────────────
//!  accept()          ── Target::accept ────▶ Connection (one per TCP connection = one queue)
//!  bytes from socket ── handle_input(now) ──▶   │ decode PDUs (nvmeof-proto), run commands
//!  write vectored    ◀── poll_event: Transmit   │
//!  backend I/O       ◀── poll_event: Io(token)  ├──▶ Controller (shared by a host's admin + I/O queues)
//!  complete_io(token, result, now) ─────────▶   │       └─ Subsystem ─ Namespaces ─ BlockBackend
//!  timers            ◀── poll_timeout / handle_timeout(now)
//!  notifier fired    ── handle_wakeup(now) ──▶  (events raised by management calls, teardown)
//! ```
//!
//! The engine never touches a socket, a clock or a thread: the driver feeds it bytes and the current
//! time, and carries out what it asks for. Controllers are shared between the connections of their
//! queues, which may be served by different threads; the I/O path reads the namespace table through an
//! `arc-swap` snapshot and the controller through atomics, never through a lock the admin path holds.
//!
//! ## What it implements
//!
//! - ICReq/ICResp (digest negotiation, HPDA, MAXR2T, MAXH2CDATA), connect timeout.
//! - Fabrics Connect (admin and I/O queues, dynamic controller model with CNTLIDs allocated per
//!   subsystem — no node-wide limit of 65,519 controllers — host access checks), Property
//!   Get/Set with the CC.EN → CSTS.RDY and CC.SHN → CSTS.SHST sequences, Disconnect.
//! - Identify (controller, namespace, active namespace list, namespace identification descriptors, NVM
//!   command-set specific structures), Get Log Page (error information, SMART/health, firmware slot,
//!   changed namespace list, commands supported and effects, discovery log — built for the requested
//!   window only, from a [`SubsystemSource`] read by position), Get/Set Features (number of
//!   queues, asynchronous event configuration, keep alive timer, volatile write cache), Keep Alive with
//!   KATO enforcement, Asynchronous Event Requests, Abort.
//! - Read, Write (FUA), Flush, Write Zeroes, Dataset Management (deallocate), with in-capsule data or
//!   R2T/H2CData, reads as C2HData (with SUCCESS when the host disabled SQ flow control).
//! - The discovery subsystem; subsystems and namespaces added, removed and resized at run time.
//! - Prompt host detach ([`Target::detach_namespaces`]): namespaces taken away from chosen
//!   controllers (with a Namespace Attribute Changed event) before their connections are cut, and
//!   the hosts' reconnects answered so that they stop.
//! - In-band authentication ([`auth`]): Authentication Send/Receive with DH-HMAC-CHAP (SHA-256/384/512,
//!   null and FFDHE 2048–8192 groups, bidirectional), AUTHREQ in the Connect response, re-authentication,
//!   secrets per host from a [`auth::HostKeys`] the embedder provides.
//!
//! ## Example: a memory-backed target, driven by hand
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Instant;
//! use nvmeof_target::{
//!     HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target, TargetConfig, TransportParams,
//! };
//!
//! let target = Target::new(TargetConfig::default());
//! let nqn = "nqn.2026-01.io.xatastor:example";
//! target.add_subsystem(SubsystemConfig { access: HostAccess::AllowAny, ..SubsystemConfig::new(nqn, "SN1") })?;
//! let backend = Arc::new(MemoryBackend::new(1 << 30, 512));
//! target.add_namespace(nqn, NamespaceConfig::derived(nqn, 1, backend))?;
//!
//! let addr = "127.0.0.1:4420".parse()?;
//! let mut conn = target.accept(TransportParams { local_addr: addr, peer_addr: addr, port_id: 1 }, Instant::now());
//! // The driver now feeds received bytes to conn.handle_input(..) and acts on conn.poll_event().
//! assert!(conn.poll_event().is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

mod admin;
pub mod auth;
pub mod backend;
mod chunk_map;
mod config;
mod connection;
mod controller;
mod detach;
mod handover;
mod hash;
pub mod host;
mod io;
mod ratelimit;
mod subsystem;
mod target;

pub use backend::{
    execute_blocking, BackendInfo, BlockBackend, ByteRange, Completer, CompletionSink, FileBackend, IoError,
    IoOp, IoOutput, IoResult, IoToken, MemoryBackend, RawDevice, StreamCopy, Submitted,
};
pub use config::{TargetConfig, TransportParams};
pub use connection::{CloseReason, Connection, Event, IoRequest};
pub use controller::{ControllerInfo, Notifier};
pub use detach::{Detach, MAX_TOMBSTONES};
pub use handover::{
    ConnectionPhase, ConnectionState, ControllerState, HandoverError, HandoverState, HeldCommand, QueueState,
    HANDOVER_FORMAT_VERSION,
};
pub use subsystem::{
    HostAccess, Namespace, NamespaceConfig, NamespaceStats, StatsSnapshot, Subsystem, SubsystemConfig,
    LATENCY_BUCKETS, LATENCY_BUCKET_BASE_NS,
};
pub use target::{ActivationRunner, SubsystemSource, Target, TargetError};

/// Internals for the fuzz targets in `fuzz/` (compiled only with `--cfg fuzzing`, as cargo-fuzz does).
#[cfg(fuzzing)]
pub mod fuzzing {
    use std::sync::atomic::AtomicU32;
    use std::time::Instant;

    use crate::auth::session::{Ctx, QueueAuth, ReceiveOutcome, SendOutcome};
    use crate::auth::{AuthConfig, DeterministicEntropy, HostKeys, HostSecrets, MemoryHostKeys};

    /// What a message did to the queue's authentication.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Step {
        /// Moved on (or ignored after a failure).
        Continue,
        /// Failed: AUTH_Failure1 is next.
        Failed,
        /// The queue is authenticated.
        Authenticated,
        /// The host gave up: the queue ends.
        Aborted,
    }

    /// One queue's authentication state machine, driven directly (no PDUs): the host secrets of
    /// `HOSTNQN` for `SUBNQN` are the given ones, randomness is deterministic.
    pub struct AuthHarness {
        auth: QueueAuth,
        keys: MemoryHostKeys,
        config: AuthConfig,
        entropy: DeterministicEntropy,
        seqnum: AtomicU32,
        /// The host NQN the queue connected with.
        pub hostnqn: String,
        /// The subsystem NQN.
        pub subnqn: String,
    }

    impl AuthHarness {
        /// A queue that must authenticate before `deadline`, with these secrets for its host, under
        /// `config`.
        pub fn new(secrets: Option<HostSecrets>, config: AuthConfig, deadline: Instant, seed: u64) -> Self {
            let keys = MemoryHostKeys::new();
            let (subnqn, hostnqn) =
                ("nqn.2026-01.io.xatastor:fuzz".to_owned(), "nqn.2014-08.io.example:host".to_owned());
            if let Some(s) = secrets {
                keys.set(&subnqn, &hostnqn, s);
            }
            Self {
                auth: QueueAuth::required(deadline),
                keys,
                config,
                entropy: DeterministicEntropy::new(seed),
                seqnum: AtomicU32::new(0),
                hostnqn,
                subnqn,
            }
        }

        fn with_ctx<R>(&mut self, now: Instant, f: impl FnOnce(&mut QueueAuth, &Ctx<'_>) -> R) -> R {
            let keys: Option<&dyn HostKeys> = Some(&self.keys);
            let ctx = Ctx {
                subnqn: &self.subnqn,
                hostnqn: &self.hostnqn,
                config: &self.config,
                entropy: &self.entropy,
                seqnum: &self.seqnum,
                keys,
                now,
            };
            f(&mut self.auth, &ctx)
        }

        /// An Authentication Send with `msg`.
        pub fn send(&mut self, msg: &[u8], now: Instant) -> Step {
            match self.with_ctx(now, |a, ctx| a.handle_send(msg, ctx)) {
                SendOutcome::Continue => Step::Continue,
                SendOutcome::Failed(..) => Step::Failed,
                SendOutcome::Authenticated(_) => Step::Authenticated,
                SendOutcome::HostAborted(_) => Step::Aborted,
            }
        }

        /// An Authentication Receive into `al` bytes: the message returned (if any) and whether the
        /// queue ends after it.
        pub fn receive(&mut self, al: u32, now: Instant) -> (Option<Vec<u8>>, bool) {
            match self.with_ctx(now, |a, ctx| a.handle_receive(al, ctx)) {
                ReceiveOutcome::Message(m) | ReceiveOutcome::Authenticated(m, _) => (Some(m), false),
                ReceiveOutcome::Failure1(m, _) => (Some(m), true),
                ReceiveOutcome::BufferTooSmall => (None, true),
            }
        }

        /// The deadline may have passed: true if the queue must end.
        pub fn timeout(&mut self, now: Instant) -> bool {
            self.auth.handle_timeout(now)
        }

        /// True once other commands may run.
        pub fn is_authenticated(&self) -> bool {
            self.auth.is_authenticated()
        }
    }

    /// Host secrets for the harness from DHHC-1 strings.
    #[must_use]
    pub fn secrets(host: &str, ctrl: Option<&str>) -> Option<HostSecrets> {
        let h = crate::auth::DhchapSecret::parse(host).ok()?;
        let mut s = HostSecrets::new(h);
        if let Some(c) = ctrl {
            s = s.with_controller(crate::auth::DhchapSecret::parse(c).ok()?);
        }
        Some(s)
    }
}
