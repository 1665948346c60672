//! Prometheus metrics of `xatastor-target` (OpenMetrics text, encoded by the Prometheus project's
//! `prometheus-client` crate), served at `GET /metrics` on a local port; every other path is 404.
//!
//! ```text
//!   scrape ──▶ NodeCollector::encode ──▶ node gauges, capacity, I/O totals (catalog + target)
//!                                    ├─▶ per worker: connections, polling, copies (server)
//!                                    └─▶ per *loaded* volume: I/O counters, size, latency histogram
//! ```
//!
//! - **Node:** volumes in the catalog, loaded volumes, controllers; capacity (provisioned bytes, the
//!   pool's size, used and available bytes, overcommit and its limit); I/O totals of all volumes
//!   since the node started (`xatastor_read_commands_total`, …), which never go down.
//! - **Per loaded volume** (loaded because a host uses it; idle volumes are not listed, so a scrape
//!   of a node with a million volumes stays small): I/O counters, the namespace size and the
//!   latency histogram. Its counters start from 0 each time the volume is loaded: keeping them for
//!   an unloaded volume would cost memory per idle volume, which the node avoids. Prometheus reads
//!   the drop as a counter reset (`rate()`/`increase()` handle it); the node-wide totals above stay
//!   monotonic across unloads.
//! - **Per worker:** open connections, connections refused by a limit, the time spent in poll
//!   windows (`xatastor_worker_poll_seconds_total`, measured by the clock around the busy loop: CPU
//!   time unless the thread was preempted; a worker's CPU time less this is about its work) and
//!   how the windows ended, bytes copied out of the shared receive buffers, bounced `O_DIRECT`
//!   writes, requests sent to the blocking pool, failed accepts.
//! - **Latency** (`xatastor_volume_latency_seconds`): the target's own time for a command, from the
//!   moment the command was decoded to its completion being queued for sending, as the engine
//!   measures it. It does not include the network, the host's stack or the time the command waited
//!   in a socket buffer, so it is lower than what a host measures (on the memory backend a read
//!   takes well under a microsecond here while a host sees tens of microseconds). Buckets are
//!   powers of two from 128 ns (everything faster is in the first) to 8.6 s.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nvmeof_target::{StatsSnapshot, LATENCY_BUCKETS, LATENCY_BUCKET_BASE_NS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use xatastor_core::{Node, Server, WorkerStats};

/// The server handle the metrics read worker gauges from (`None` while it shuts down).
pub type SharedServer = Arc<parking_lot::Mutex<Option<Arc<Server>>>>;

/// Reads the node (and the server) at every scrape: the values are encoded straight from the node's
/// state, so nothing is kept per volume between scrapes.
struct NodeCollector {
    node: Node,
    server: SharedServer,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCollector").finish_non_exhaustive()
    }
}

/// A value of a metric without labels.
#[derive(Clone, Copy)]
enum Value {
    /// An integer gauge.
    Gauge(u64),
    /// A ratio gauge.
    Ratio(f64),
    /// A counter.
    Counter(u64),
}

/// A metric without labels.
fn single(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    v: Value,
) -> std::fmt::Result {
    let kind = if matches!(v, Value::Counter(_)) { MetricType::Counter } else { MetricType::Gauge };
    let mut m = e.encode_descriptor(name, help, unit.as_ref(), kind)?;
    match v {
        Value::Gauge(v) => m.encode_gauge(&i64::try_from(v).unwrap_or(i64::MAX)),
        Value::Ratio(v) => m.encode_gauge(&v),
        Value::Counter(v) => m.encode_counter::<NoLabelSet, _, u64>(&v, None),
    }
}

/// One series per label value.
fn family<'a, T: 'a>(
    e: &mut DescriptorEncoder<'_>,
    (name, help, unit, kind): (&str, &str, Option<Unit>, MetricType),
    label: &str,
    items: impl IntoIterator<Item = (&'a str, T)>,
    value: impl Fn(&T) -> u64,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit.as_ref(), kind)?;
    for (l, item) in items {
        let labels = [(label, l)];
        let mut s = m.encode_family(&labels)?;
        let v = value(&item);
        match kind {
            MetricType::Counter => s.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            _ => s.encode_gauge(&i64::try_from(v).unwrap_or(i64::MAX))?,
        }
    }
    Ok(())
}

/// One counter in seconds per label value.
fn family_seconds<'a, T: 'a>(
    e: &mut DescriptorEncoder<'_>,
    (name, help): (&str, &str),
    label: &str,
    items: impl IntoIterator<Item = (&'a str, T)>,
    value: impl Fn(&T) -> Duration,
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Counter)?;
    for (l, item) in items {
        let labels = [(label, l)];
        m.encode_family(&labels)?.encode_counter::<NoLabelSet, _, u64>(&value(&item).as_secs_f64(), None)?;
    }
    Ok(())
}

/// Upper bounds of the engine's latency buckets, in seconds: 128 ns × 2^i (the last is +Inf).
fn bucket_bounds() -> [f64; LATENCY_BUCKETS] {
    let mut b = [f64::INFINITY; LATENCY_BUCKETS];
    for (i, bound) in b.iter_mut().enumerate().take(LATENCY_BUCKETS - 1) {
        *bound = (LATENCY_BUCKET_BASE_NS << i) as f64 / 1e9;
    }
    b
}

/// The histogram's `_sum`: the engine's sum of latencies, in seconds.
fn latency_sum_seconds(s: &StatsSnapshot) -> f64 {
    s.latency_sum_ns as f64 / 1e9
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};
        let node = &self.node;
        let stats = node.stats().unwrap_or_default();
        single(
            &mut e,
            "xatastor_volumes",
            "Volumes in the catalog.",
            None,
            Value::Gauge(stats.volumes_total),
        )?;
        single(
            &mut e,
            "xatastor_volumes_active",
            "Volumes loaded because a host uses them (or did within the idle time).",
            None,
            Value::Gauge(stats.volumes_active as u64),
        )?;
        single(
            &mut e,
            "xatastor_controllers",
            "Live NVMe controllers.",
            None,
            Value::Gauge(stats.controllers as u64),
        )?;

        // Capacity.
        if let Ok(c) = node.capacity() {
            single(
                &mut e,
                "xatastor_provisioned",
                "Sum of the sizes of all volumes (thin: what hosts may write, not what is written).",
                Some(Unit::Bytes),
                Value::Gauge(c.provisioned_bytes),
            )?;
            let pool = [
                (
                    "xatastor_pool_size",
                    "Size of the backend's pool (file system, ZFS dataset, memory).",
                    c.pool_bytes,
                ),
                ("xatastor_pool_used", "Bytes used in the backend's pool.", c.used_bytes),
                (
                    "xatastor_pool_available",
                    "Bytes still available in the backend's pool.",
                    c.available_bytes,
                ),
            ];
            for (name, help, v) in pool {
                if let Some(v) = v {
                    single(&mut e, name, help, Some(Unit::Bytes), Value::Gauge(v))?;
                }
            }
            if let Some(r) = c.overcommit {
                single(
                    &mut e,
                    "xatastor_overcommit_ratio",
                    "Provisioned bytes over the pool's size.",
                    None,
                    Value::Ratio(r),
                )?;
            }
            if let Some(r) = c.overcommit_limit {
                single(
                    &mut e,
                    "xatastor_overcommit_limit_ratio",
                    "Creates and grows past this overcommit are refused.",
                    None,
                    Value::Ratio(r),
                )?;
            }
        }

        // Node-wide I/O totals: monotonic across volume unloads.
        let t = node.io_totals();
        let totals = [
            ("xatastor_read_commands", "Read commands completed on all volumes.", None, t.reads),
            ("xatastor_write_commands", "Write commands completed on all volumes.", None, t.writes),
            ("xatastor_read", "Bytes read from all volumes.", Some(Unit::Bytes), t.read_bytes),
            ("xatastor_written", "Bytes written to all volumes.", Some(Unit::Bytes), t.write_bytes),
            (
                "xatastor_other_commands",
                "Flush, Write Zeroes and Deallocate commands on all volumes.",
                None,
                t.other,
            ),
            (
                "xatastor_command_errors",
                "Commands completed with an error status on all volumes.",
                None,
                t.errors,
            ),
        ];
        for (name, help, unit, v) in totals {
            single(&mut e, name, help, unit, Value::Counter(v))?;
        }

        // Workers.
        if let Some(server) = self.server.lock().clone() {
            let ws = server.worker_stats();
            let workers: Vec<(String, _)> = ws.iter().enumerate().map(|(i, w)| (i.to_string(), w)).collect();
            let by_worker = || workers.iter().map(|(i, w)| (i.as_str(), *w));
            family(
                &mut e,
                ("xatastor_connections", "Open TCP connections (queues) per worker.", None, Gauge),
                "worker",
                by_worker(),
                |w| w.connections as u64,
            )?;
            family(
                &mut e,
                (
                    "xatastor_connections_refused",
                    "Connections closed at once by a limit, per worker.",
                    None,
                    Counter,
                ),
                "worker",
                by_worker(),
                |w| w.refused,
            )?;
            family_seconds(
                &mut e,
                (
                    "xatastor_worker_poll",
                    "Time the worker spent polling for the next request after activity, by the clock \
                     around its busy loop (the poll window's CPU cost unless the thread was \
                     preempted; the rest of its CPU time is about its work).",
                ),
                "worker",
                by_worker(),
                |w| w.poll_time,
            )?;
            type WorkerGet = fn(&WorkerStats) -> u64;
            let counters: [(&str, &str, Option<Unit>, WorkerGet); 6] = [
                (
                    "xatastor_worker_polls_found_work",
                    "Poll windows that found a request before they ran out.",
                    None,
                    |w| w.poll_hits,
                ),
                (
                    "xatastor_worker_polls_expired",
                    "Poll windows that ran out (the worker then slept until the next completion).",
                    None,
                    |w| w.poll_misses,
                ),
                (
                    "xatastor_worker_receive_copied",
                    "Bytes copied from the shared receive buffers into connections' reassembly \
                     buffers (queues of O_DIRECT volumes receive into their own buffers instead).",
                    Some(Unit::Bytes),
                    |w| w.received_bytes_copied,
                ),
                (
                    "xatastor_worker_bounced_writes",
                    "Writes to O_DIRECT devices whose data was not aligned and was copied into an \
                     aligned buffer first.",
                    None,
                    |w| w.bounced_writes,
                ),
                (
                    "xatastor_worker_blocking_pool_requests",
                    "Requests of file-descriptor volumes the ring cannot do, run on the blocking pool.",
                    None,
                    |w| w.pool_requests,
                ),
                (
                    "xatastor_worker_accept_failures",
                    "Accepts that failed for lack of file descriptors or memory (accepting pauses \
                     for 100 ms each time).",
                    None,
                    |w| w.accept_failures,
                ),
            ];
            for (name, help, unit, get) in counters {
                family(&mut e, (name, help, unit, Counter), "worker", by_worker(), |w| get(w))?;
            }
        }

        // Loaded volumes.
        let prefix = format!("{}:", node.nqn_prefix());
        let target = node.target();
        let mut vols: Vec<(String, StatsSnapshot, u64)> = Vec::new();
        for nqn in target.subsystem_nqns() {
            let Some(name) = nqn.strip_prefix(&prefix) else { continue };
            let Some(ns) = target.subsystem(&nqn).and_then(|s| s.namespace(1)) else { continue };
            let size = ns.size_blocks().saturating_mul(u64::from(ns.block_size()));
            vols.push((name.to_owned(), ns.stats().snapshot(), size));
        }
        vols.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let each = || vols.iter().map(|(n, s, size)| (n.as_str(), (s, *size)));
        type Get = fn(&(&StatsSnapshot, u64)) -> u64;
        let counters: [(&str, &str, Option<Unit>, Get); 6] = [
            ("xatastor_volume_reads", "Read commands completed (since the volume was loaded).", None, |v| {
                v.0.reads
            }),
            (
                "xatastor_volume_writes",
                "Write commands completed (since the volume was loaded).",
                None,
                |v| v.0.writes,
            ),
            ("xatastor_volume_read", "Bytes read (since the volume was loaded).", Some(Unit::Bytes), |v| {
                v.0.read_bytes
            }),
            (
                "xatastor_volume_written",
                "Bytes written (since the volume was loaded).",
                Some(Unit::Bytes),
                |v| v.0.write_bytes,
            ),
            ("xatastor_volume_other_commands", "Flush, Write Zeroes and Deallocate commands.", None, |v| {
                v.0.other
            }),
            ("xatastor_volume_errors", "Commands completed with an error status.", None, |v| v.0.errors),
        ];
        for (name, help, unit, get) in counters {
            family(&mut e, (name, help, unit, Counter), "volume", each(), get)?;
        }
        family(
            &mut e,
            ("xatastor_volume_size", "Size of the loaded volume.", Some(Unit::Bytes), Gauge),
            "volume",
            each(),
            |v| v.1,
        )?;
        let mut m = e.encode_descriptor(
            "xatastor_volume_latency",
            "The target's time per command, from its decode to its completion being queued for sending \
             (not the host-observed latency: no network, no host stack). Since the volume was loaded.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        let bounds = bucket_bounds();
        for (name, s, _) in &vols {
            let labels = [("volume", name.as_str())];
            let buckets: Vec<(f64, u64)> = bounds.iter().copied().zip(s.latency_buckets).collect();
            let count = s.latency_buckets.iter().sum();
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                latency_sum_seconds(s),
                count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

/// Renders the metrics (OpenMetrics text).
pub fn render(node: &Node, server: &SharedServer) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector { node: node.clone(), server: server.clone() }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    out
}

/// What a request asks for.
fn route(request: &[u8]) -> (&'static str, bool) {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", method == "HEAD"),
        ("GET" | "HEAD", _) => ("404 Not Found", method == "HEAD"),
        _ => ("405 Method Not Allowed", false),
    }
}

fn answer(mut s: TcpStream, node: &Node, server: &SharedServer) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    // The request head (at most 8 KiB; the body of a GET is empty).
    let mut req = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while req.len() < 8192 && !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(buf.get(..n).unwrap_or_default()),
        }
    }
    let (status, head_only) = route(&req);
    let (content_type, body) = if status.starts_with("200") {
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", render(node, server))
    } else {
        ("text/plain; charset=utf-8", format!("{status}: the metrics are at /metrics\n"))
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        let _ = s.write_all(body.as_bytes());
    }
}

/// Serves `GET /metrics` on `addr` from a thread (404 for other paths, 405 for other methods).
pub fn serve(addr: SocketAddr, node: Node, server: SharedServer) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new().name("xatastor-metrics".into()).spawn(move || {
        for s in listener.incoming().flatten() {
            answer(s, &node, &server);
        }
    })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), ("200 OK", false));
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), ("200 OK", false));
        assert_eq!(route(b"HEAD /metrics HTTP/1.1\r\n\r\n"), ("200 OK", true));
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(route(b"GET /metricsx HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n").0, "405 Method Not Allowed");
        assert_eq!(route(b"").0, "405 Method Not Allowed");
    }

    #[test]
    fn buckets_are_powers_of_two_from_128_ns() {
        let b = bucket_bounds();
        assert_eq!(b[0], 128e-9);
        assert_eq!(b[1], 256e-9);
        assert!((b[26] - 8.589_934_592).abs() < 1e-9);
        assert_eq!(b[27], f64::INFINITY);
    }
}
