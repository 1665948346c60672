//! A node that runs out of file descriptors: accepting pauses (no retry loop, no log flood), the
//! connections it has keep working, and it accepts again once descriptors are free.
//!
//! Its own test binary: it lowers the process's open-file limit.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nvmeof_proto::{Digests, EncodeOptions, IcReq, Pdu};
use nvmeof_target::{Target, TargetConfig};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use xatastor_core::{Server, ServerConfig};

fn icreq() -> Vec<u8> {
    Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests: Digests::NONE, maxr2t: 0 })
        .encode(&EncodeOptions::default())
        .unwrap()
        .to_vec()
}

/// Sends an ICReq and says whether an ICResp came back within 10 s.
fn handshake(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(&icreq()).is_err() {
        return false;
    }
    let mut resp = [0u8; 128];
    s.read_exact(&mut resp).is_ok() && resp[0] == 0x01
}

fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap()
}

#[test]
fn out_of_file_descriptors_pauses_accepting_then_recovers() {
    // The clients' sockets exist before the limit is lowered (connecting needs no new descriptor).
    let clients: Vec<socket2::Socket> = (0..60)
        .map(|_| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap())
        .collect();
    // The limit is lowered before the server starts: io_uring takes the limit an accept obeys
    // when the accept is armed.
    let saved = getrlimit(Resource::Nofile);
    setrlimit(Resource::Nofile, Rlimit { current: Some(highest_fd() + 64), maximum: saved.maximum }).unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.workers = 1;
    config.recv_buffers = 16;
    config.recv_buffer_bytes = 4096;
    let server = Server::start(Target::new(TargetConfig::default()), config).unwrap();
    let addr: SocketAddr = server.local_addr();
    // Every descriptor left is taken, then 20 are given back: room for 20 connections.
    let mut fillers = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        fillers.push(f);
    }
    fillers.truncate(fillers.len().saturating_sub(20));

    let mut streams: Vec<TcpStream> = clients
        .into_iter()
        .map(|s| {
            s.connect(&addr.into()).unwrap();
            s.into()
        })
        .collect();
    common::eventually("accepts fail for lack of descriptors", || {
        server.worker_stats()[0].accept_failures > 0
    });
    let accepted = server.worker_stats()[0].connections;
    assert!(
        (1..=20).contains(&accepted),
        "{accepted} connections accepted under a limit that leaves room for 20"
    );
    // The worker is not retrying in a loop while descriptors are short: one failure per pause.
    std::thread::sleep(Duration::from_secs(1));
    let failures = server.worker_stats()[0].accept_failures;
    assert!(failures < 100, "{failures} failed accepts in about a second: accepting is not paused");
    // Descriptors come back: the waiting connections are accepted and served.
    setrlimit(Resource::Nofile, saved).unwrap();
    let ok = streams.iter_mut().map(handshake).filter(|&ok| ok).count();
    assert_eq!(ok, 60, "every connection is served once descriptors are available");
    common::eventually("all connections accepted", || server.worker_stats()[0].connections == 60);
    drop(streams);
    drop(fillers);
    server.shutdown().unwrap();
}
