//! `xatastor-target`'s zero-downtime upgrade: starting the new binary, handing it everything
//! ([`xatastor_core::upgrade`]), and telling systemd about it.
//!
//! ```text
//!  xatastor-target upgrade  ──admin socket──▶ Upgrader::run ──┐      SIGHUP ──▶ Upgrader::run
//!                                                             ▼
//!   RELOADING=1 ── bind <data dir>/upgrade.sock ── spawn `<binary> <same arguments> --takeover-from <sock>`
//!   hand_over: quiesce, release the catalog, pass sockets + state ── new process imports, says Ready
//!   before the go: the admin socket and the gRPC admin port are let go (the new process binds them)
//!   go ──▶ new process: MAINPID=<its pid>, READY=1 ── this process exits
//!   any failure: the new process is stopped, this one serves on (READY=1, STATUS=why)
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{json, Value};
use xatastor_core::admin::socket::AdminSocket;
use xatastor_core::upgrade::{hand_over, HandoverLimits, UpgradeOffer};
use xatastor_core::{Node, Server};

use crate::grpc::AdminServer;

/// How long the new binary may take to start and connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The name of the rendezvous socket in the data directory.
pub const RENDEZVOUS: &str = "upgrade.sock";

/// The flag that makes `serve` take over from a running node.
pub const TAKEOVER_FLAG: &str = "--takeover-from";

/// What the node's upgrade needs, shared by the admin socket's requests and SIGHUP.
pub struct Upgrader {
    server: Arc<Server>,
    node: Node,
    data_dir: PathBuf,
    /// The binary this process was started from (resolved at start: a package upgrade replaces
    /// the file later).
    binary: PathBuf,
    /// This process's arguments, without any takeover flag.
    args: Vec<OsString>,
    /// The admin socket and the gRPC admin server: let go before the new process binds them, and
    /// bound again by `restore` if the upgrade fails after that.
    admin_socket: Mutex<Option<AdminSocket>>,
    admin_grpc: Mutex<Option<AdminServer>>,
    restore: Box<dyn Fn() -> (Option<AdminSocket>, Option<AdminServer>) + Send + Sync>,
    busy: AtomicBool,
    /// Called when the connections are handed over (with whether the new process confirmed it
    /// serves): the process then exits.
    on_done: Box<dyn Fn(bool) + Send + Sync>,
}

impl std::fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrader")
            .field("binary", &self.binary)
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// `args` without `--takeover-from PATH` / `--takeover-from=PATH` (a node started by an earlier
/// upgrade has one).
#[must_use]
pub fn without_takeover(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == TAKEOVER_FLAG {
            skip = true;
            continue;
        }
        if a.to_string_lossy().starts_with(&format!("{TAKEOVER_FLAG}=")) {
            continue;
        }
        out.push(a);
    }
    out
}

impl Upgrader {
    /// An upgrader for a serving node. `restore` binds the admin socket and gRPC admin server
    /// again (after a failed upgrade that had let them go).
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub fn new(
        server: Arc<Server>,
        node: Node,
        data_dir: PathBuf,
        binary: PathBuf,
        args: Vec<OsString>,
        admin_socket: Option<AdminSocket>,
        admin_grpc: Option<AdminServer>,
        restore: Box<dyn Fn() -> (Option<AdminSocket>, Option<AdminServer>) + Send + Sync>,
        on_done: Box<dyn Fn(bool) + Send + Sync>,
    ) -> Self {
        Self {
            server,
            node,
            data_dir,
            binary,
            args: without_takeover(args),
            admin_socket: Mutex::new(admin_socket),
            admin_grpc: Mutex::new(admin_grpc),
            restore,
            busy: AtomicBool::new(false),
            on_done,
        }
    }

    /// The binary an upgrade starts by default (the one the node was started from).
    #[must_use]
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Lets the admin socket and gRPC server go (at shutdown).
    pub fn close_admin(&self) {
        self.admin_grpc.lock().take();
        self.admin_socket.lock().take();
    }

    /// Upgrades to `binary` (default: the binary this node was started from): the report as JSON,
    /// or why the upgrade did not happen (this node then serves on).
    ///
    /// # Errors
    /// The reason, in one line.
    pub fn run(&self, binary: Option<&Path>) -> Result<Value, String> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err("an upgrade is already in progress".into());
        }
        let binary = binary.map_or_else(|| self.binary.clone(), Path::to_path_buf);
        let _ = crate::systemd::notify_reloading();
        tracing::info!(binary = %binary.display(), "upgrade: starting the new binary");
        let result = self.attempt(&binary);
        match &result {
            Ok(report) => {
                tracing::info!(%report, "upgrade: the new process serves; this one exits");
                (self.on_done)(report["serving"].as_bool() == Some(true));
            }
            Err(e) => {
                tracing::warn!(error = %e, "upgrade did not happen; serving on");
                let _ = crate::systemd::notify_status(&format!("upgrade failed: {e}"));
                let _ = crate::systemd::notify_ready();
                self.busy.store(false, Ordering::Release);
            }
        }
        result
    }

    fn attempt(&self, binary: &Path) -> Result<Value, String> {
        if self.node.provisioner().kind() == "memory" {
            return Err(
                "the memory backend keeps its volumes' data in this process: it cannot be handed over \
                        (a restart loses it too)"
                    .into(),
            );
        }
        let path = self.data_dir.join(RENDEZVOUS);
        let offer = UpgradeOffer::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))?;
        let mut child = Command::new(binary)
            .args(&self.args)
            .arg(TAKEOVER_FLAG)
            .arg(offer.path())
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let outcome = self.hand_over_to(&offer, &mut child);
        if outcome.is_err() {
            // The new process gives up on its own when the handover fails; make sure.
            let _ = child.kill();
            let _ = child.wait();
        }
        outcome
    }

    fn hand_over_to(&self, offer: &UpgradeOffer, child: &mut Child) -> Result<Value, String> {
        let stream = offer
            .accept(CONNECT_TIMEOUT, || match child.try_wait() {
                Ok(Some(status)) => Err(format!("the new binary exited ({status}) before taking over")),
                Ok(None) => Ok(()),
                Err(e) => Err(format!("watching the new binary: {e}")),
            })
            .map_err(|e| e.to_string())?;
        let released = AtomicBool::new(false);
        let result = hand_over(&self.server, &self.node, stream, HandoverLimits::default(), || {
            // The new process binds these next.
            self.close_admin();
            released.store(true, Ordering::Release);
            Ok(())
        });
        match result {
            Ok(r) => Ok(json!({
                "old_pid": std::process::id(),
                "new_pid": r.new_pid,
                "new_build": r.new_build,
                "connections": r.connections,
                "closed": r.closed,
                "controllers": r.controllers,
                "held_commands": r.held_commands,
                "listeners": r.listeners,
                "quiesce_ms": (r.quiesce.as_secs_f64() * 1e4).round() / 10.0,
                "pause_ms": (r.pause.as_secs_f64() * 1e4).round() / 10.0,
                "serving": r.serving,
            })),
            Err(e) => {
                if released.load(Ordering::Acquire) {
                    let (socket, grpc) = (self.restore)();
                    *self.admin_socket.lock() = socket;
                    *self.admin_grpc.lock() = grpc;
                }
                Err(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_flags_are_dropped_from_the_arguments() {
        let args: Vec<OsString> = [
            "--data-dir",
            "/d",
            "serve",
            "--takeover-from",
            "/d/upgrade.sock",
            "--listen",
            "x",
            "--takeover-from=/y",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let out: Vec<String> =
            without_takeover(args).into_iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(out, ["--data-dir", "/d", "serve", "--listen", "x"]);
    }
}
