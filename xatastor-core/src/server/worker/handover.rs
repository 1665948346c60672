//! A worker's part of a handover to another process: quiesce, stop receiving, write the connections
//! down; or, in the process that takes over, install the connections it was handed.
//!
//! ```text
//!  Begin ──▶ Quiescing: no accepts; new commands held by the engine; started ones finish and
//!            │          their responses go out (input is still received: H2CData of writes)
//!            │ every connection settled
//!            ▼
//!           Detaching: receives cancelled (quiet queues leave the readiness set); what the last
//!            │          completions bring is decoded (held) or kept as unread input
//!            │ no receive in flight, still settled
//!            ▼
//!           Exported: socket duplicates + engine state + unread bytes sent to the server; the
//!                     worker serves nothing (no timers, no wake-ups) until Resume or Abandon
//!  deadline passed, or Resume ──▶ Off: held commands run, receives and accepts armed again
//! ```

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::time::Instant;

use super::{Conn, Key, RxMode, Worker, KIND_RECV};
use crate::server::{ExportedConn, HandoverCmd, Imported, WorkerExport};

/// Where the worker is in a handover.
#[derive(Debug, Default)]
pub(super) enum Phase {
    /// Serving.
    #[default]
    Off,
    /// Waiting for every connection to settle; `waiting`: those not settled when last looked at
    /// (a list that shrinks: a turn looks at these only, not at every connection).
    Quiescing { deadline: Instant, reply: Sender<Result<WorkerExport, String>>, waiting: Vec<Key> },
    /// Waiting for the cancelled receives to end (`waiting`: connections whose receive had not
    /// ended when last looked at), then for every connection to be settled still.
    Detaching { deadline: Instant, reply: Sender<Result<WorkerExport, String>>, waiting: Vec<Key> },
    /// Written down; waiting for Resume or Abandon.
    Exported,
}

/// A connection that can be written down: nothing started and unfinished, nothing to send, no input
/// waiting to be decoded behind a full send queue or the turn's budget.
fn settled(c: &Conn) -> bool {
    c.engine.handover_ready()
        && c.tx.is_empty()
        && !c.tx.inflight
        && c.disk_inflight == 0
        && c.disk_waiting.is_empty()
        && !c.deferred
        && !c.rx.held
        && !c.rx.paused
        && !matches!(c.rx.mode, RxMode::Switching { .. })
}

/// Receiving still, or not settled (see the Detaching phase).
fn busy(c: &Conn) -> bool {
    c.rx.armed || (handed_over(c) && !settled(c))
}

/// Connections that end anyway (closing, or the peer is gone) are not handed over: they close with
/// this process.
fn handed_over(c: &Conn) -> bool {
    !c.closing && !c.dead
}

impl Worker {
    /// Receives are not armed again (the connections are being handed over).
    pub(super) fn rx_frozen(&self) -> bool {
        matches!(self.handover, Phase::Detaching { .. } | Phase::Exported)
    }

    /// A handover is being prepared or was made: no accepts, no new quiet queues.
    pub(super) fn handing_over(&self) -> bool {
        !matches!(self.handover, Phase::Off)
    }

    /// When the worker must look at the handover again even if nothing happens.
    pub(super) fn handover_deadline(&self) -> Option<Instant> {
        match &self.handover {
            Phase::Quiescing { deadline, .. } | Phase::Detaching { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// Takes the handover requests from the mailbox.
    pub(super) fn on_handover_cmds(&mut self, now: Instant) {
        let cmds = std::mem::take(&mut *self.mailbox.handover.lock());
        for cmd in cmds {
            match cmd {
                HandoverCmd::Begin { deadline, reply } => {
                    if self.handing_over() {
                        let _ = reply.send(Err("a handover is already in progress".into()));
                        continue;
                    }
                    tracing::debug!(
                        worker = self.index,
                        connections = self.conns.len(),
                        "preparing a handover"
                    );
                    if self.accept_armed {
                        self.cancel(u64::from(super::KIND_ACCEPT) << 56);
                    }
                    let keys: Vec<Key> = self.conns.keys().collect();
                    for &key in &keys {
                        if let Some(c) = self.conns.get_mut(key) {
                            c.engine.begin_handover();
                        }
                    }
                    self.handover = Phase::Quiescing { deadline, reply, waiting: keys };
                }
                HandoverCmd::Resume => self.resume_serving(now, None),
                HandoverCmd::Abandon => {
                    // The connections live on in the new process: let go of them without a word.
                    for (_, c) in self.conns.iter_mut() {
                        c.engine.hand_off();
                    }
                    self.abandoned = true;
                }
            }
        }
    }

    /// Connections in `keys` that are handed over and not settled.
    fn unsettled(&mut self, keys: &mut Vec<Key>) {
        keys.retain(|&k| self.conns.get(k).is_some_and(|c| handed_over(c) && !settled(c)));
    }

    /// Every connection that is handed over and not settled.
    fn all_unsettled(&mut self) -> Vec<Key> {
        self.conns.iter_mut().filter(|(_, c)| handed_over(c) && !settled(c)).map(|(k, _)| k).collect()
    }

    /// Moves the handover on (called once per loop turn). Each turn looks only at the connections
    /// it is still waiting for; every connection is looked at again once they are done (a wake-up
    /// may have given a settled one a response to send meanwhile).
    pub(super) fn handover_step(&mut self, now: Instant) {
        if let Phase::Quiescing { deadline, waiting, .. } = &mut self.handover {
            let deadline = *deadline;
            let mut list = std::mem::take(waiting);
            self.unsettled(&mut list);
            if list.is_empty() {
                list = self.all_unsettled();
            }
            if now >= deadline {
                let busy = list.len();
                self.resume_serving(
                    now,
                    Some(format!("{busy} connection(s) still had commands in flight or responses to send")),
                );
                return;
            }
            if !list.is_empty() {
                if let Phase::Quiescing { waiting, .. } = &mut self.handover {
                    *waiting = list;
                }
                return;
            }
            let Phase::Quiescing { deadline, reply, .. } = std::mem::take(&mut self.handover) else { return };
            // Stop receiving: the multishot receives end (their last completion says ECANCELED, or
            // brings the bytes that raced with the cancel); quiet queues leave the readiness set.
            let keys: Vec<Key> = self.conns.keys().collect();
            let mut receiving = Vec::new();
            for key in keys {
                let Some(c) = self.conns.get_mut(key) else { continue };
                if c.dormant {
                    c.dormant = false;
                    if let Some(q) = self.quiet.as_mut() {
                        let _ = rustix::event::epoll::delete(&q.epoll, &c.stream);
                        q.count -= 1;
                        self.mailbox.stats.dormant.store(q.count, Ordering::Relaxed);
                    }
                }
                if c.rx.armed {
                    receiving.push(key);
                    self.cancel(key.user_data(KIND_RECV));
                }
            }
            if let Some(q) = self.quiet.as_mut() {
                q.ready.clear();
            }
            self.handover = Phase::Detaching { deadline, reply, waiting: receiving };
        }
        if let Phase::Detaching { deadline, waiting, .. } = &mut self.handover {
            let deadline = *deadline;
            let mut list = std::mem::take(waiting);
            list.retain(|&k| self.conns.get(k).is_some_and(|c| busy(c)));
            if list.is_empty() {
                list = self.conns.iter_mut().filter(|(_, c)| busy(c)).map(|(k, _)| k).collect();
            }
            if now >= deadline {
                self.resume_serving(now, Some("the connections did not stop receiving in time".into()));
                return;
            }
            if !list.is_empty() {
                if let Phase::Detaching { waiting, .. } = &mut self.handover {
                    *waiting = list;
                }
                return;
            }
            let Phase::Detaching { reply, .. } = std::mem::take(&mut self.handover) else { return };
            match self.export_all(now) {
                Ok(export) => {
                    tracing::debug!(
                        worker = self.index,
                        connections = export.conns.len(),
                        "connections written down"
                    );
                    if reply.send(Ok(export)).is_err() {
                        // Nobody waits for it any more: serve on.
                        self.resume_serving(now, None);
                        return;
                    }
                    self.handover = Phase::Exported;
                }
                Err(e) => {
                    self.handover = Phase::Detaching { deadline, reply, waiting: Vec::new() };
                    self.resume_serving(now, Some(e));
                }
            }
        }
    }

    fn export_all(&mut self, now: Instant) -> Result<WorkerExport, String> {
        let listener: OwnedFd =
            self.listener.try_clone().map_err(|e| format!("duplicating the listening socket: {e}"))?.into();
        let mut conns = Vec::with_capacity(self.conns.len());
        for (_, c) in self.conns.iter_mut() {
            if !handed_over(c) {
                continue;
            }
            let mut state = c.engine.export_handover(now).map_err(|e| e.to_string())?;
            state.unread_input = c.rx.unread().ok_or("a connection was switching its receive mode")?;
            conns.push(ExportedConn { worker: self.index, fd: c.stream.as_raw_fd(), state });
        }
        Ok(WorkerExport { worker: self.index, listener, conns })
    }

    /// Serves again after a handover that did not happen (`failure` is sent to whoever waits).
    fn resume_serving(&mut self, now: Instant, failure: Option<String>) {
        match std::mem::take(&mut self.handover) {
            Phase::Quiescing { reply, .. } | Phase::Detaching { reply, .. } => {
                let _ = reply.send(Err(failure.unwrap_or_else(|| "cancelled".into())));
            }
            Phase::Exported | Phase::Off => {}
        }
        let keys: Vec<Key> = self.conns.keys().collect();
        for key in &keys {
            if let Some(c) = self.conns.get_mut(*key) {
                c.engine.end_handover(now);
            }
            self.after_engine(*key, now);
        }
        // Wake-ups that came while the connections were written down.
        for key in std::mem::take(&mut self.woken_later) {
            let key = Key::from_u64(key);
            let Some(c) = self.conns.get_mut(key) else { continue };
            c.woken.store(false, Ordering::Release);
            c.engine.handle_wakeup(now);
            self.after_engine(key, now);
        }
        // Input the last receives brought was decoded then (its commands held, run above); what is
        // left is a partial PDU, completed by the next receive.
        for key in keys {
            self.arm_recv(key);
        }
        if self.accepting && !self.accept_armed && self.accept_paused_until.is_none() {
            self.arm_accept();
        }
        self.flush_sends();
        tracing::info!(worker = self.index, "serving again after a handover that did not happen");
    }

    /// Installs connections taken over from another process (before the worker runs): the commands
    /// the old process held run first, then the input it had received and not decoded, then the
    /// socket is received from.
    #[allow(clippy::disallowed_methods)] // the driver owns the clock
    pub(in crate::server) fn install(&mut self, imported: Vec<Imported>) {
        let now = Instant::now();
        for Imported { stream, engine, unread, .. } in imported {
            let Some(key) = self.conns.next_key() else {
                tracing::warn!("no room for a connection taken over: closing it");
                continue;
            };
            let peer_ip =
                stream.peer_addr().map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.ip().to_canonical());
            *self.peers.lock().entry(peer_ip).or_insert(0) += 1;
            let _ = stream.set_nodelay(true);
            let mut conn = self.new_conn(key, stream, peer_ip, engine);
            conn.rx.buf.extend_from_slice(&unread);
            let inserted = self.conns.insert(conn);
            debug_assert_eq!(inserted, Some(key));
            if let Some(c) = self.conns.get_mut(key) {
                c.engine.end_handover(now);
            }
            self.after_engine(key, now);
            self.feed(key, now);
            self.after_engine(key, now);
            self.arm_recv(key);
        }
        self.mailbox.stats.connections.store(self.conns.len(), Ordering::Relaxed);
    }
}
