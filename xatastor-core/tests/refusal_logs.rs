//! A peer that keeps connecting past its connection limit does not flood the log: each refusal is
//! counted, and the warning about them comes at most once per 10 seconds with the number of the
//! others.
//!
//! Its own test binary: it installs the process's log subscriber.

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nvmeof_target::{Target, TargetConfig};
use xatastor_core::{Server, ServerConfig};

mod common;
use common::LogCapture;

#[test]
#[allow(clippy::disallowed_methods)] // the test's clock: how many report intervals the run spans
fn refused_connections_are_counted_and_logged_at_most_once_per_interval() {
    let capture = LogCapture::install(tracing::Level::WARN);

    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.workers = 1;
    config.max_connections_per_peer = 1;
    let server = Server::start(Target::new(TargetConfig::default()), config).unwrap();
    let addr = server.local_addr();
    let started = Instant::now();
    let _kept = TcpStream::connect(addr).unwrap();
    const ATTEMPTS: u64 = 300;
    for _ in 0..ATTEMPTS {
        let mut s = TcpStream::connect(addr).unwrap();
        // The server closes it at once: the read ends (EOF or reset) instead of waiting.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(!matches!(s.read(&mut b), Ok(1)), "a refused connection sent data");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.worker_stats()[0].refused < ATTEMPTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = started.elapsed();
    assert_eq!(server.worker_stats()[0].refused, ATTEMPTS, "every refused connection is counted");

    let log = capture.text();
    let lines: Vec<&str> =
        log.lines().filter(|l| l.contains("connection limit of the peer address")).collect();
    // One report per started 10 s of the run, however many attempts there were.
    let allowed = 1 + (elapsed.as_secs() / 10) as usize;
    assert!(!lines.is_empty(), "the first refusal is reported");
    assert!(lines.len() <= allowed, "{} lines for {ATTEMPTS} refusals in {elapsed:?}:\n{log}", lines.len());
    server.shutdown().unwrap();
}
