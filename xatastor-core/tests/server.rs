//! The io_uring server under connection churn: many connections, peers vanishing mid-PDU, garbage,
//! and a graceful shutdown that waits for all of them to be released.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmeof_proto::{Digests, EncodeOptions, IcReq, Pdu};
use nvmeof_target::{HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use xatastor_core::{Server, ServerConfig};

const NQN: &str = "nqn.2026-01.io.xatastor:server-test";

fn start(workers: usize) -> (Server, Target) {
    let target = Target::new(TargetConfig::default());
    target
        .add_subsystem(SubsystemConfig { access: HostAccess::AllowAny, ..SubsystemConfig::new(NQN, "S1") })
        .unwrap();
    target
        .add_namespace(NQN, NamespaceConfig::derived(NQN, 1, Arc::new(MemoryBackend::new(1 << 20, 512))))
        .unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    config.workers = workers;
    config.recv_buffer_bytes = 4096;
    config.recv_buffers = 16;
    (Server::start(target.clone(), config).unwrap(), target)
}

fn icreq() -> Vec<u8> {
    Pdu::IcReq(IcReq { pfv: 0, hpda: 0, digests: Digests::NONE, maxr2t: 0 })
        .encode(&EncodeOptions::default())
        .unwrap()
        .to_vec()
}

fn read_icresp(s: &mut TcpStream) {
    let mut resp = [0u8; 128];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0;
    while got < 128 {
        match s.read(&mut resp[got..]) {
            Ok(0) => panic!("closed before ICResp"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(resp[0], 0x01, "ICResp");
}

#[test]
#[allow(clippy::disallowed_methods)]
fn churn_then_graceful_shutdown() {
    let (server, _target) = start(2);
    let addr = server.local_addr();
    // 200 connections complete the ICReq exchange and stay open.
    let mut open: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&icreq()).unwrap();
            read_icresp(&mut s);
            s
        })
        .collect();
    // Peers that vanish in the middle of a PDU, and peers that send garbage.
    for i in 0..50 {
        let mut s = TcpStream::connect(addr).unwrap();
        let bytes = icreq();
        if i % 2 == 0 {
            s.write_all(&bytes[..37]).unwrap();
        } else {
            s.write_all(&[0xff; 64]).unwrap();
        }
        drop(s);
    }
    // The server still answers new connections.
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh.write_all(&icreq()).unwrap();
    read_icresp(&mut fresh);
    // Half the long-lived peers go away abruptly.
    open.truncate(100);
    // Shutdown closes the rest and waits for every connection to be released.
    let t = Instant::now();
    server.shutdown().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "shutdown took {:?}", t.elapsed());
    // The remaining peers see their connections closed.
    for s in &mut open {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 16];
        let n = loop {
            match s.read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        assert!(matches!(n, Ok(0) | Err(_)), "connection still open after shutdown");
    }
}

/// Only the workers of one server share its port: another server, or any other process listening
/// on the address (even with `SO_REUSEPORT`), makes the start fail instead of splitting connections.
#[test]
fn a_port_held_by_another_listener_is_an_error_at_start() {
    let (first, _target) = start(2);
    let addr = first.local_addr();
    let mut config = ServerConfig::new(addr);
    config.workers = 1;
    let err =
        Server::start(Target::new(TargetConfig::default()), config).expect_err("a second server on the port");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("already in use"), "{err}");
    // The first server still gets every connection.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&icreq()).unwrap();
    read_icresp(&mut s);
    drop(s);
    first.shutdown().unwrap();

    // Someone else's SO_REUSEPORT listener on the port.
    let foreign = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    foreign.set_reuse_address(true).unwrap();
    foreign.set_reuse_port(true).unwrap();
    foreign.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    foreign.listen(16).unwrap();
    let taken = foreign.local_addr().unwrap().as_socket().unwrap();
    let err = Server::start(Target::new(TargetConfig::default()), ServerConfig::new(taken))
        .expect_err("a port another process listens on");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    drop(foreign);
    // Once it is gone, the port is ours.
    let mut config = ServerConfig::new(taken);
    config.workers = 2;
    Server::start(Target::new(TargetConfig::default()), config).unwrap().shutdown().unwrap();
}

/// Once `shutdown` has returned, the port is free: nothing of the stopped server (its listeners,
/// the accepts its rings had armed) keeps it, so a restart on the same port is immediate — and so is
/// a plain, non-`SO_REUSEPORT` bind by anyone else.
#[test]
fn the_port_is_free_when_shutdown_returns() {
    let (first, _target) = start(2);
    let addr = first.local_addr();
    first.shutdown().unwrap();
    for round in 0..20 {
        if round > 0 {
            let mut config = ServerConfig::new(addr);
            config.workers = 2;
            let s = Server::start(Target::new(TargetConfig::default()), config).unwrap();
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&icreq()).unwrap();
            read_icresp(&mut c);
            s.shutdown().unwrap();
        }
        let plain = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        plain.set_reuse_address(true).unwrap();
        plain
            .bind(&addr.into())
            .unwrap_or_else(|e| panic!("round {round}: port still taken after shutdown: {e}"));
    }
}

/// A listener that goes away while a server starts (a process that has just exited) is waited for:
/// the start succeeds once the port is released, instead of failing at once.
#[test]
fn a_start_waits_for_a_port_that_is_being_released() {
    let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    holder.set_reuse_address(true).unwrap();
    holder.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    holder.listen(16).unwrap();
    let addr = holder.local_addr().unwrap().as_socket().unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(holder);
    });
    let mut config = ServerConfig::new(addr);
    config.workers = 1;
    let server = Server::start(Target::new(TargetConfig::default()), config).unwrap();
    release.join().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&icreq()).unwrap();
    read_icresp(&mut c);
    server.shutdown().unwrap();
}
