//! The same engine driven from tokio: one task per connection, backend I/O on the blocking pool.
//!
//! This shows that [`nvmeof_target`] is runtime-agnostic: the code below is all the glue a tokio
//! application needs. Each connection task waits for whichever comes first — bytes from the socket,
//! a backend completion, the engine's notifier, or its next deadline — hands it to the engine, then
//! carries out the engine's events (awaiting the socket writes, which is also the backpressure).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use nvmeof_target::{execute_blocking, Event, IoResult, IoToken, Target, TransportParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// Accepts connections forever, serving each on its own task.
pub async fn serve(listener: TcpListener, target: Target, port_id: u16) -> io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let params = TransportParams { local_addr: stream.local_addr()?, peer_addr: peer, port_id };
        let target = target.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, target, params).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Serves one connection until the engine closes it or the peer goes away.
#[allow(clippy::disallowed_methods)] // the driver owns the clock
pub async fn serve_connection(stream: TcpStream, target: Target, params: TransportParams) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut conn = target.accept(params, Instant::now());
    let wake = Arc::new(Notify::new());
    let w = wake.clone();
    conn.set_notifier(Arc::new(move || w.notify_one()));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(IoToken, IoResult)>();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut peer_open = true;
    loop {
        let deadline = conn.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            read = rd.read_buf(&mut buf), if peer_open => match read {
                Ok(0) | Err(_) => {
                    peer_open = false;
                    conn.handle_peer_closed();
                }
                Ok(_) => conn.handle_input(&mut buf, Instant::now()),
            },
            Some((token, result)) = done_rx.recv() => conn.complete_io(token, result, Instant::now()),
            () = wake.notified() => conn.handle_wakeup(Instant::now()),
            () = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } }, if deadline.is_some() => {
                conn.handle_timeout(Instant::now());
            }
        }
        while let Some(ev) = conn.poll_event() {
            match ev {
                Event::Transmit(pdu) => {
                    for chunk in pdu.chunks() {
                        wr.write_all(chunk).await?;
                    }
                }
                Event::Io(req) => {
                    let tx = done_tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = execute_blocking(req.namespace.backend().as_ref(), req.op);
                        let _ = tx.send((req.token, result));
                    });
                }
                Event::Close(reason) => {
                    tracing::debug!(?reason, "closing connection");
                    let _ = wr.shutdown().await;
                }
                // A newer engine's event this driver does not know: end the connection.
                other => {
                    tracing::warn!(event = ?other, "unknown engine event: closing the connection");
                    let _ = wr.shutdown().await;
                }
            }
        }
        if conn.is_drained() {
            return Ok(());
        }
    }
}
