//! The admin API on a Unix socket in the data directory: one JSON request per line, one JSON
//! response line back (see [`super::Request`] and [`super::response_json`]). Mode 0600: only the
//! server's user can manage volumes; nothing on the network.
//!
//! ```text
//!   $ xatastor-target volume create pg-main --size 10GiB --allow-host nqn.2014-08.org.nvmexpress:uuid:…
//!        │  {"op":"volume_create","name":"pg-main","size_bytes":10737418240,…}\n
//!        ▼
//!   <data dir>/admin.sock ──▶ handle ──▶ {"ok":true,"result":{…}}\n
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{handle, response_json, AdminError, Endpoint, ErrorKind, Request};
use crate::Node;

/// Largest request line accepted (a batch create of many volumes fits).
const MAX_REQUEST_BYTES: u64 = 64 << 20;

/// The bound admin socket; the socket file is removed when this is dropped (a start that fails
/// later, or a shutdown, leaves no socket behind).
#[derive(Debug)]
pub struct AdminSocket {
    path: PathBuf,
}

impl AdminSocket {
    /// The socket file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the admin socket at `path` (mode 0600; a stale socket from a dead server is replaced, a
/// live server's is not) and serves it on a thread, one thread per admin client (admin traffic is
/// rare).
pub fn serve(path: &Path, node: Node, ep: Endpoint) -> std::io::Result<AdminSocket> {
    if path.exists() {
        // Refuse to take over from a live server; replace a stale socket.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another server is running (its admin socket {} answers)", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    let socket = AdminSocket { path: path.to_owned() };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new().name("xatastor-admin".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (node, ep) = (node.clone(), ep.clone());
            let _ = std::thread::Builder::new().name("xatastor-admin-conn".into()).spawn(move || {
                serve_client(stream, &node, &ep);
            });
        }
    })?;
    Ok(socket)
}

fn serve_client(stream: UnixStream, node: &Node, ep: &Endpoint) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(std::io::Read::take(stream, MAX_REQUEST_BYTES));
    let mut line = String::new();
    while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
        let result = match serde_json::from_str::<Request>(&line) {
            Ok(req) => {
                let op = req.op();
                tracing::debug!(op, request = ?req, "admin request");
                let result = handle(node, ep, req);
                match &result {
                    Ok(_) => tracing::debug!(op, "admin request done"),
                    Err(e) if e.kind == ErrorKind::Internal => {
                        tracing::warn!(op, error = %e, "admin request failed")
                    }
                    Err(e) => {
                        tracing::debug!(op, kind = e.kind.as_str(), error = %e, "admin request refused")
                    }
                }
                result
            }
            Err(e) => Err(AdminError::new(ErrorKind::Invalid, format!("bad request: {e}"))),
        };
        if writeln!(out, "{}", response_json(&result)).is_err() {
            return;
        }
        line.clear();
    }
}

/// Sends one request to the server's admin socket and returns its result, or a one-line message:
/// the server's error, or why the socket could not be used.
pub fn call(path: &Path, req: &Request) -> Result<Value, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {}: the admin socket belongs to the user running the server (mode 0600); \
             run this as that user",
            path.display()
        ),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "cannot reach the server at {} ({e}); is `xatastor-target serve` running with this --data-dir?",
            path.display()
        ),
        _ => format!("cannot use the admin socket {}: {e}", path.display()),
    })?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(stream, "{line}").map_err(|e| format!("sending to the server: {e}"))?;
    let mut resp = String::new();
    BufReader::new(&stream).read_line(&mut resp).map_err(|e| format!("reading the server's answer: {e}"))?;
    let v: Value = serde_json::from_str(&resp).map_err(|e| format!("bad answer from the server: {e}"))?;
    if v.get("ok").and_then(Value::as_bool) == Some(true) {
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    } else {
        Err(v.get("error").and_then(Value::as_str).unwrap_or("the server reported an error").to_owned())
    }
}
