//! Zero-downtime upgrade: a running node hands its listening sockets and every established
//! connection, with the engine state each needs, to a new process, which goes on serving them. The
//! hosts keep their TCP connections and their controllers (same CNTLID); they see a pause of a few
//! milliseconds, no reconnect.
//!
//! ```text
//!  old process (serving)                               new process (started with the rendezvous path)
//!  UpgradeOffer::bind(path) ─── start the new binary ──▶ Takeover::connect(path)
//!        accept ◀──────────────────────────── Hello {format version, pid}
//!  hand_over:
//!    version differs? ──▶ Refused (old keeps serving)
//!    workers: stop accepting, hold new commands,
//!             finish started ones, stop receiving,
//!             write connections down
//!    catalog released
//!    State {controllers, connections} + fds ─────────▶ (listeners, then one socket per connection)
//!                                                     open the catalog, Node::open, then
//!                                                     Takeover::import: controllers (same CNTLID),
//!                                                     connections (held commands, unread bytes)
//!        ◀───────────────────────────────────────────── Ready {imported, closed}
//!    before_commit (admin socket, metrics released)
//!    Commit ─────────────────────────────────────────▶ ReadyTakeover::commit: workers start
//!    workers abandon the connections, process exits     held commands run, sockets read again
//!
//!  any failure before Commit: the old process reopens the catalog and serves on (held commands run
//!  there), and the new process exits
//! ```
//!
//! New connections are not refused meanwhile: both processes hold the listening sockets, and
//! connections that arrive during the handover wait in the listen backlog for the new process.
//! Keep-alive deadlines carry over with the time they had left; a command is answered by exactly
//! one of the two processes (started ones by the old, held ones by the new).
//!
//! What cannot be handed over: volumes of the memory backend (their data lives in the process: the
//! upgrade of a node on that backend is refused), connections that are closing (they close with the old
//! process), and connections whose controller cannot be recreated in the new process (a volume
//! deleted meanwhile): those are closed and their hosts reconnect.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvmeof_target::{HandoverState, Target, TransportParams, HANDOVER_FORMAT_VERSION};
use serde::{Deserialize, Serialize};

use crate::handover::wire::Channel;
use crate::node::Node;
use crate::server::{Imported, Server, ServerConfig, Takeover as ServerTakeover};

/// Largest control message (everything but the state).
const MAX_CONTROL: usize = 64 * 1024;
/// Largest state message: ~300 bytes per connection, plus held commands and unread bytes.
const MAX_STATE: usize = 1 << 30;
/// Most descriptors in one handover (listeners and connections).
const MAX_FDS: usize = 4 << 20;

/// The messages of the rendezvous socket (postcard; the variant order is the protocol).
#[derive(Debug, Serialize, Deserialize)]
enum Msg {
    /// New → old: the state format this build reads, and who it is.
    Hello { format: u32, pid: u32, build: String },
    /// Old → new: the state; the descriptors travel with it (the listeners, then one per
    /// connection, in order).
    State { listeners: Vec<u32>, conn_workers: Vec<u32>, state: Vec<u8> },
    /// Either way: the handover does not happen.
    Refused { reason: String },
    /// New → old: everything is taken in.
    Ready { imported: u32, closed: u32 },
    /// Old → new: serve.
    Commit,
    /// New → old: serving (and, under systemd, the service's main process now).
    Serving,
}

fn encode(msg: &Msg) -> Vec<u8> {
    postcard::to_allocvec(msg).unwrap_or_default()
}

fn decode(bytes: &[u8]) -> Result<Msg, UpgradeError> {
    postcard::from_bytes(bytes).map_err(|e| UpgradeError::Protocol(format!("unreadable message: {e}")))
}

/// Why an upgrade did not happen. The process that reports it keeps (old) or never took (new) the
/// connections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The rendezvous socket failed.
    #[error("handover socket: {0}")]
    Io(#[from] io::Error),
    /// The other process sent something unexpected.
    #[error("handover protocol: {0}")]
    Protocol(String),
    /// The other process refused (its reason).
    #[error("{0}")]
    Refused(String),
    /// The connections could not be written down in time, or the state is not acceptable.
    #[error("{0}")]
    NotReady(String),
}

/// What an upgrade did (the old process's view).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpgradeReport {
    /// The new process.
    pub new_pid: u32,
    /// Its build (its `--version`).
    pub new_build: String,
    /// Connections handed over and taken in.
    pub connections: usize,
    /// Connections the new process could not take in (closed; their hosts reconnect).
    pub closed: usize,
    /// Controllers handed over.
    pub controllers: usize,
    /// Commands that arrived during the handover and run in the new process.
    pub held_commands: usize,
    /// Listening sockets handed over.
    pub listeners: usize,
    /// From the first held command's hold to every connection written down.
    pub quiesce: Duration,
    /// From the start of the hold to the new process serving: the longest a command waited.
    pub pause: Duration,
    /// The new process said it serves. If not (it died after the go), nobody serves the
    /// connections: this process should exit with a failure, so that a service manager restarts
    /// the node (hosts then reconnect).
    pub serving: bool,
}

/// The rendezvous socket of a running node, for the new process to connect to.
#[derive(Debug)]
pub struct UpgradeOffer {
    listener: UnixListener,
    path: PathBuf,
}

impl UpgradeOffer {
    /// Binds the rendezvous socket at `path` (mode 0600; a stale file is replaced).
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self { listener, path: path.to_owned() })
    }

    /// The socket's path (give it to the new process).
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits up to `timeout` for the new process to connect; `alive` is asked every few
    /// milliseconds whether it still runs (a new binary that exits early ends the wait at once).
    ///
    /// # Errors
    /// Timed out, the new process ended, or the socket failed.
    pub fn accept(
        &self,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<UnixStream, UpgradeError> {
        #[allow(clippy::disallowed_methods)] // control path
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    return Ok(s);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            alive().map_err(UpgradeError::Refused)?;
            #[allow(clippy::disallowed_methods)] // control path
            if Instant::now() >= deadline {
                return Err(UpgradeError::NotReady(format!(
                    "the new process did not connect to {} within {} s",
                    self.path.display(),
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for UpgradeOffer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long each step of a handover may take.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct HandoverLimits {
    /// For the workers to finish the commands in flight and write their connections down.
    pub quiesce: Duration,
    /// For the new process to take everything in and say it is ready.
    pub import: Duration,
}

impl Default for HandoverLimits {
    /// 5 s to quiesce, 60 s to import.
    fn default() -> Self {
        Self { quiesce: Duration::from_secs(5), import: Duration::from_secs(60) }
    }
}

/// Hands the node's connections to the new process on `stream` (the old process's side).
///
/// On success the server's workers have let go of every connection (call [`Server::abandon`] or
/// exit); the catalog is released (the new process has it). `before_commit` runs once the new
/// process is ready and before it is told to serve: release what the new process binds next (the
/// admin socket, the metrics port); if it fails, the upgrade fails. On any failure the node serves
/// on: the catalog is reopened and the workers resume.
///
/// # Errors
/// Why the upgrade did not happen.
pub fn hand_over(
    server: &Server,
    node: &Node,
    stream: UnixStream,
    limits: HandoverLimits,
    before_commit: impl FnOnce() -> Result<(), String>,
) -> Result<UpgradeReport, UpgradeError> {
    let mut ch = Channel::new(stream);
    ch.set_timeout(Some(limits.import))?;
    let (body, _) = ch.recv(MAX_CONTROL, 0)?;
    let (new_pid, new_build) = match decode(&body)? {
        Msg::Hello { format, pid, build } if format == HANDOVER_FORMAT_VERSION => (pid, build),
        Msg::Hello { format, build, .. } => {
            let reason = format!(
                "the new binary ({build}) reads handover format {format}, this node writes {HANDOVER_FORMAT_VERSION}: \
                 upgrade with a restart instead"
            );
            let _ = ch.send(&encode(&Msg::Refused { reason: reason.clone() }), &[]);
            return Err(UpgradeError::Refused(reason));
        }
        other => return Err(UpgradeError::Protocol(format!("expected Hello, got {other:?}"))),
    };
    let refuse = |ch: &mut Channel, reason: String| {
        let _ = ch.send(&encode(&Msg::Refused { reason: reason.clone() }), &[]);
        UpgradeError::NotReady(reason)
    };
    if node.provisioner().kind() == "memory" {
        return Err(refuse(
            &mut ch,
            "the memory backend keeps its volumes' data in this process: it cannot be handed over".into(),
        ));
    }
    #[allow(clippy::disallowed_methods)] // control path
    let t0 = Instant::now();
    let export =
        server.export_connections(limits.quiesce).map_err(|e| refuse(&mut ch, format!("quiescing: {e}")))?;
    #[allow(clippy::disallowed_methods)] // control path
    let quiesce = t0.elapsed();
    #[allow(clippy::disallowed_methods)] // the time left of keep-alives is measured now
    let now = Instant::now();
    let target = node.target();
    let mut state = HandoverState::default();
    let mut seen = BTreeSet::new();
    let mut fds: Vec<std::os::fd::RawFd> = Vec::new();
    let mut conn_workers = Vec::new();
    let mut held_commands = 0;
    let (listeners, listener_fds): (Vec<u32>, Vec<OwnedFd>) =
        export.listeners.into_iter().map(|(i, fd)| (i as u32, fd)).unzip();
    for c in export.conns {
        if let Some(q) = &c.state.queue {
            let key = (q.subnqn.clone(), q.cntlid);
            if !seen.contains(&key) {
                // A controller torn down meanwhile: its connections close with this process.
                let Some(cs) = target.export_controller(&q.subnqn, q.cntlid, now) else { continue };
                state.controllers.push(cs);
                seen.insert(key);
            }
        }
        held_commands += c.state.held.len();
        conn_workers.push(c.worker as u32);
        state.connections.push(c.state);
        fds.push(c.fd);
    }
    let connections = state.connections.len();
    let controllers = state.controllers.len();
    let bytes = match state.encode() {
        Ok(b) => b,
        Err(e) => {
            server.resume();
            return Err(refuse(&mut ch, e.to_string()));
        }
    };
    let fail = |ch: &mut Channel, e: UpgradeError| {
        if let Err(err) = node.catalog().reacquire() {
            tracing::error!(error = %err, "cannot reopen the catalog after a failed handover: volumes cannot be managed until restart");
        }
        server.resume();
        let _ = ch.send(&encode(&Msg::Refused { reason: e.to_string() }), &[]);
        e
    };
    #[allow(clippy::disallowed_methods)] // control path
    let written = t0.elapsed();
    if let Err(e) = node.catalog().release() {
        server.resume();
        return Err(refuse(&mut ch, format!("releasing the catalog: {e}")));
    }
    #[allow(clippy::disallowed_methods)] // control path
    let released = t0.elapsed();
    let msg = encode(&Msg::State { listeners, conn_workers, state: bytes });
    let mut borrowed: Vec<_> = listener_fds.iter().map(AsFd::as_fd).collect();
    // SAFETY: each is the descriptor of a connection its worker keeps open, untouched, while it is
    // written down: a worker closes connections only after `Server::resume` or `Server::let_go`,
    // which come after this send (or its failure).
    borrowed.extend(fds.iter().map(|&fd| unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }));
    if let Err(e) = ch.send(&msg, &borrowed) {
        return Err(fail(&mut ch, e.into()));
    }
    drop(borrowed);
    #[allow(clippy::disallowed_methods)] // control path
    let sent = t0.elapsed();
    let reply = ch.recv(MAX_CONTROL, 0).map_err(UpgradeError::from).and_then(|(b, _)| decode(&b));
    let (imported, closed) = match reply {
        Ok(Msg::Ready { imported, closed }) => (imported as usize, closed as usize),
        Ok(Msg::Refused { reason }) => {
            return Err(fail(&mut ch, UpgradeError::Refused(format!("the new process: {reason}"))))
        }
        Ok(other) => {
            return Err(fail(&mut ch, UpgradeError::Protocol(format!("expected Ready, got {other:?}"))))
        }
        Err(e) => return Err(fail(&mut ch, e)),
    };
    #[allow(clippy::disallowed_methods)] // control path
    let ready = t0.elapsed();
    if let Err(reason) = before_commit() {
        return Err(fail(&mut ch, UpgradeError::NotReady(reason)));
    }
    if let Err(e) = ch.send(&encode(&Msg::Commit), &[]) {
        // The new process is gone: nobody serves the connections but us.
        return Err(fail(&mut ch, e.into()));
    }
    server.let_go();
    // The new process says when it serves (and has told the service manager it is the main
    // process now): only then may this one exit.
    let serving = match ch.recv(MAX_CONTROL, 0).map_err(UpgradeError::from).and_then(|(b, _)| decode(&b)) {
        Ok(Msg::Serving) => true,
        Ok(other) => {
            tracing::error!(message = ?other, "the new process sent something unexpected after the go");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "the new process did not confirm it serves after the go");
            false
        }
    };
    #[allow(clippy::disallowed_methods)] // control path
    let pause = t0.elapsed();
    tracing::info!(
        new_pid,
        connections = imported,
        closed,
        controllers,
        ?quiesce,
        ?written,
        ?released,
        ?sent,
        ?ready,
        ?pause,
        "handed over to the new process (times since the hold began)"
    );
    Ok(UpgradeReport {
        new_pid,
        new_build,
        connections: imported.min(connections),
        closed,
        controllers,
        held_commands,
        listeners: listener_fds.len(),
        quiesce,
        pause,
        serving,
    })
}

/// The new process's side, after it received the state.
#[derive(Debug)]
pub struct Takeover {
    ch: Channel,
    state: HandoverState,
    listeners: Vec<(u32, OwnedFd)>,
    conns: Vec<(u32, OwnedFd)>,
}

impl Takeover {
    /// Connects to the running node's rendezvous socket, says which state format this build reads,
    /// and waits up to `timeout` for the state and the sockets. The old process has released its
    /// catalog when this returns: open the node next, then [`Takeover::import`].
    ///
    /// # Errors
    /// The old process refused (its reason) or the socket failed.
    pub fn connect(path: &Path, build: &str, timeout: Duration) -> Result<Self, UpgradeError> {
        let stream = UnixStream::connect(path)?;
        let mut ch = Channel::new(stream);
        ch.set_timeout(Some(timeout))?;
        let hello =
            Msg::Hello { format: HANDOVER_FORMAT_VERSION, pid: std::process::id(), build: build.to_owned() };
        ch.send(&encode(&hello), &[])?;
        let (body, mut fds) = ch.recv(MAX_STATE, MAX_FDS)?;
        match decode(&body)? {
            Msg::State { listeners, conn_workers, state } => {
                if fds.len() != listeners.len() + conn_workers.len() {
                    return Err(UpgradeError::Protocol(format!(
                        "{} descriptors for {} listeners and {} connections",
                        fds.len(),
                        listeners.len(),
                        conn_workers.len()
                    )));
                }
                let state = HandoverState::decode(&state).map_err(|e| {
                    let reason = e.to_string();
                    let _ = ch.send(&encode(&Msg::Refused { reason: reason.clone() }), &[]);
                    UpgradeError::NotReady(reason)
                })?;
                if state.connections.len() != conn_workers.len() {
                    return Err(UpgradeError::Protocol("connection count differs from the state".into()));
                }
                let conn_fds = fds.split_off(listeners.len());
                Ok(Self {
                    ch,
                    state,
                    listeners: listeners.into_iter().zip(fds).collect(),
                    conns: conn_workers.into_iter().zip(conn_fds).collect(),
                })
            }
            Msg::Refused { reason } => Err(UpgradeError::Refused(reason)),
            other => Err(UpgradeError::Protocol(format!("expected State, got {other:?}"))),
        }
    }

    /// Connections handed over.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Tells the old process why this one gives up (it then serves on).
    pub fn refuse(mut self, reason: &str) {
        let _ = self.ch.send(&encode(&Msg::Refused { reason: reason.to_owned() }), &[]);
    }

    /// Recreates the controllers and connections in `target` (whose subsystems come from the node
    /// opened after [`Takeover::connect`]), tells the old process it is ready, and waits for its go.
    /// Connections that cannot be recreated are closed (their hosts reconnect).
    ///
    /// # Errors
    /// The old process did not give the go (it serves on; this process must exit).
    pub fn import(mut self, target: &Target, port_id: u16) -> Result<ReadyTakeover, UpgradeError> {
        #[allow(clippy::disallowed_methods)] // the time left of keep-alives counts from now
        let now = Instant::now();
        for c in &self.state.controllers {
            if let Err(e) = target.import_controller(c, now) {
                tracing::warn!(subsystem = %c.subnqn, cntlid = c.cntlid, error = %e, "a controller cannot be taken over; its host will reconnect");
            }
        }
        let mut imported = Vec::with_capacity(self.conns.len());
        let mut closed = 0u32;
        let states = std::mem::take(&mut self.state.connections);
        for ((worker, fd), state) in std::mem::take(&mut self.conns).into_iter().zip(states) {
            let stream = std::net::TcpStream::from(fd);
            let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else {
                closed += 1;
                continue;
            };
            let params = TransportParams { local_addr: local, peer_addr: peer, port_id };
            match target.import_connection(&state, params, now) {
                Ok(engine) => imported.push(Imported {
                    worker: worker as usize,
                    stream,
                    engine,
                    unread: state.unread_input,
                }),
                Err(e) => {
                    tracing::info!(%peer, error = %e, "a connection cannot be taken over: closing it");
                    closed += 1;
                }
            }
        }
        let count = imported.len() as u32;
        self.ch.send(&encode(&Msg::Ready { imported: count, closed }), &[])?;
        let (body, _) = self.ch.recv(MAX_CONTROL, 0)?;
        match decode(&body)? {
            Msg::Commit => {}
            Msg::Refused { reason } => return Err(UpgradeError::Refused(reason)),
            other => return Err(UpgradeError::Protocol(format!("expected Commit, got {other:?}"))),
        }
        let listeners = self.listeners.into_iter().map(|(_, fd)| std::net::TcpListener::from(fd)).collect();
        Ok(ReadyTakeover { ch: self.ch, takeover: ServerTakeover { listeners, conns: imported }, closed })
    }
}

/// Everything taken in and the old process's go received: start the server.
#[derive(Debug)]
pub struct ReadyTakeover {
    ch: Channel,
    takeover: ServerTakeover,
    closed: u32,
}

impl ReadyTakeover {
    /// Connections that could not be taken in (closed).
    #[must_use]
    pub fn closed(&self) -> usize {
        self.closed as usize
    }

    /// Connections taken in.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.takeover.conns.len()
    }

    /// Starts the server on the listening sockets and connections handed over (one worker per
    /// listening socket: the old process's number of workers; `config.workers` is not used), runs
    /// `serving` (tell a service manager this is the main process now), then lets the old process
    /// exit.
    ///
    /// # Errors
    /// io_uring is not available (the connections are closed then).
    pub fn serve(
        mut self,
        target: Target,
        config: ServerConfig,
        serving: impl FnOnce(),
    ) -> io::Result<Server> {
        let server = Server::start_taking_over(target, config, self.takeover)?;
        serving();
        if let Err(e) = self.ch.send(&encode(&Msg::Serving), &[]) {
            tracing::warn!(error = %e, "could not tell the old process that this one serves");
        }
        Ok(server)
    }
}
