//! A blocking `std::net` driver for the [`nvmeof_target`] engine: one thread per connection.
//!
//! This is the simplest possible driver — no io_uring, no async runtime — so that the engine can be
//! served on a TCP port and tested against the Linux initiator before the thread-per-core server
//! exists. Each connection thread reads from its socket with a timeout (the engine's next deadline,
//! at most [`WAKEUP_POLL`]), feeds the bytes in, executes backend I/O synchronously and writes what the
//! engine asks to transmit, vectored.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nvmeof_target::{execute_blocking, Connection, Event, Target, TransportParams};

/// Longest a connection thread sleeps in `read` before it looks at wake-ups (asynchronous events,
/// controller teardown) again.
pub const WAKEUP_POLL: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` forever, serving each on its own thread. Returns only if
/// accepting fails.
pub fn serve(listener: TcpListener, target: Target, port_id: u16) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept()?;
        let local = stream.local_addr()?;
        let target = target.clone();
        let params = TransportParams { local_addr: local, peer_addr: peer, port_id };
        std::thread::Builder::new().name(format!("nvmet-{peer}")).spawn(move || {
            if let Err(e) = serve_connection(stream, &target, params) {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        })?;
    }
}

/// Serves one connection until the engine closes it or the peer goes away.
#[allow(clippy::disallowed_methods)] // the driver owns the clock
pub fn serve_connection(mut stream: TcpStream, target: &Target, params: TransportParams) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut conn = target.accept(params, Instant::now());
    let woken = Arc::new(AtomicBool::new(false));
    let flag = woken.clone();
    conn.set_notifier(Arc::new(move || flag.store(true, Ordering::Release)));
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 256 * 1024];
    loop {
        let now = Instant::now();
        let wait =
            conn.poll_timeout().map_or(WAKEUP_POLL, |d| d.saturating_duration_since(now)).min(WAKEUP_POLL);
        stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        match stream.read(&mut chunk) {
            Ok(0) => conn.handle_peer_closed(),
            Ok(n) => {
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                conn.handle_input(&mut buf, Instant::now());
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => conn.handle_peer_closed(),
        }
        let now = Instant::now();
        if conn.poll_timeout().is_some_and(|d| now >= d) {
            conn.handle_timeout(now);
        }
        if woken.swap(false, Ordering::AcqRel) {
            conn.handle_wakeup(now);
        }
        if drive(&mut conn, &mut stream)? {
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Carries out the engine's events; true once the connection is closed.
#[allow(clippy::disallowed_methods)]
fn drive(conn: &mut Connection, stream: &mut TcpStream) -> io::Result<bool> {
    while let Some(ev) = conn.poll_event() {
        match ev {
            Event::Transmit(pdu) => {
                let mut slices = Vec::with_capacity(4);
                pdu.io_slices(&mut slices);
                write_all_vectored(stream, &mut slices)?;
            }
            Event::Io(req) => {
                let result = execute_blocking(req.namespace.backend().as_ref(), req.op);
                conn.complete_io(req.token, result, Instant::now());
            }
            Event::Close(reason) => {
                tracing::debug!(?reason, "closing connection");
                stream.flush()?;
                return Ok(true);
            }
            // A newer engine's event this driver does not know: end the connection.
            other => {
                tracing::warn!(event = ?other, "unknown engine event: closing the connection");
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn write_all_vectored(stream: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
