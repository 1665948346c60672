//! Prometheus metrics of `xatastor-target` in the text exposition format, on a localhost port.
//!
//! Node gauges (volumes in the catalog, active volumes, controllers, connections per worker) and,
//! per *active* volume (loaded because a host uses it), I/O counters and a latency histogram. Idle
//! volumes are not listed: with a million of them a scrape must stay small.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use nvmeof_target::LATENCY_BUCKETS;
use xatastor_core::{Node, Server};

/// Renders the metrics.
pub fn render(node: &Node, server: Option<&Server>) -> String {
    let mut out = String::new();
    let stats = node.stats().unwrap_or_default();
    let _ = writeln!(out, "# HELP xatastor_volumes Volumes in the catalog.\n# TYPE xatastor_volumes gauge");
    let _ = writeln!(out, "xatastor_volumes {}", stats.volumes_total);
    let _ = writeln!(
        out,
        "# HELP xatastor_volumes_active Volumes loaded because a host uses them.\n# TYPE xatastor_volumes_active gauge"
    );
    let _ = writeln!(out, "xatastor_volumes_active {}", stats.volumes_active);
    let _ = writeln!(
        out,
        "# HELP xatastor_controllers Live NVMe controllers.\n# TYPE xatastor_controllers gauge"
    );
    let _ = writeln!(out, "xatastor_controllers {}", stats.controllers);
    if let Some(server) = server {
        let _ = writeln!(
            out,
            "# HELP xatastor_connections Open TCP connections (queues) per worker.\n# TYPE xatastor_connections gauge"
        );
        let ws = server.worker_stats();
        for (i, w) in ws.iter().enumerate() {
            let _ = writeln!(out, "xatastor_connections{{worker=\"{i}\"}} {}", w.connections);
        }
        let _ = writeln!(
            out,
            "# HELP xatastor_connections_refused_total Connections closed at once by a limit.\n# TYPE xatastor_connections_refused_total counter"
        );
        for (i, w) in ws.iter().enumerate() {
            let _ = writeln!(out, "xatastor_connections_refused_total{{worker=\"{i}\"}} {}", w.refused);
        }
    }
    let prefix = format!("{}:", node.nqn_prefix());
    let target = node.target();
    let mut vols = Vec::new();
    for nqn in target.subsystem_nqns() {
        let Some(name) = nqn.strip_prefix(&prefix) else { continue };
        let Some(ns) = target.subsystem(&nqn).and_then(|s| s.namespace(1)) else { continue };
        vols.push((name.to_owned(), ns.stats().snapshot()));
    }
    type Counter = (&'static str, &'static str, fn(&nvmeof_target::StatsSnapshot) -> u64);
    let counters: [Counter; 6] = [
        ("xatastor_volume_reads_total", "Read commands completed.", |s| s.reads),
        ("xatastor_volume_writes_total", "Write commands completed.", |s| s.writes),
        ("xatastor_volume_read_bytes_total", "Bytes read.", |s| s.read_bytes),
        ("xatastor_volume_written_bytes_total", "Bytes written.", |s| s.write_bytes),
        ("xatastor_volume_other_commands_total", "Flush, Write Zeroes and Deallocate commands.", |s| s.other),
        ("xatastor_volume_errors_total", "Commands completed with an error status.", |s| s.errors),
    ];
    for (metric, help, get) in counters {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for (name, s) in &vols {
            let _ = writeln!(out, "{metric}{{volume=\"{name}\"}} {}", get(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP xatastor_volume_latency_seconds Command latency, capsule received to completion sent.\n# TYPE xatastor_volume_latency_seconds histogram"
    );
    for (name, s) in &vols {
        let mut cumulative = 0u64;
        for (i, n) in s.latency_buckets.iter().enumerate() {
            cumulative += n;
            if i + 1 < LATENCY_BUCKETS {
                let le = (1u64 << i) as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "xatastor_volume_latency_seconds_bucket{{volume=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
        }
        let _ = writeln!(
            out,
            "xatastor_volume_latency_seconds_bucket{{volume=\"{name}\",le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(out, "xatastor_volume_latency_seconds_count{{volume=\"{name}\"}} {cumulative}");
    }
    out
}

/// Serves `GET /metrics` (any path, in fact) on `addr` from a thread.
pub fn serve(
    addr: SocketAddr,
    node: Node,
    server: Arc<parking_lot::Mutex<Option<Arc<Server>>>>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("xatastor-metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf); // the request; its content does not matter
            let srv = server.lock().clone();
            let body = render(&node, srv.as_deref());
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(local)
}
