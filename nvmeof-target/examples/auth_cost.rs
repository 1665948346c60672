//! What one queue's DH-HMAC-CHAP authentication costs, per DH group: the in-tree host and the
//! target in one process (no sockets), SHA-512, unidirectional; each figure is the median of 15 runs
//! and covers both sides (each side computes one public value and one shared secret, so the
//! target's share is about half).
//!
//! ```sh
//! cargo run --release -p nvmeof-target --example auth_cost
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_target::auth::{DhGroup, DhchapHash, DhchapSecret, HostSecrets, MemoryHostKeys, OsEntropy};
use nvmeof_target::host::{self, Completion, HostAuthConfig, HostAuthenticator, HostOptions, HostQueue};
use nvmeof_target::{Connection, Event, SubsystemConfig, Target, TargetConfig, TransportParams};

const SUBNQN: &str = "nqn.2026-01.io.xatastor:cost";
const HOSTNQN: &str = "nqn.2014-08.io.example:cost";

/// Moves PDUs both ways until the host has the completion of `cid`.
fn run(conn: &mut Connection, host: &mut HostQueue, cid: u16, now: Instant) -> Completion {
    let mut to_target = BytesMut::new();
    let mut to_host = BytesMut::new();
    loop {
        while let Some(p) = host.poll_transmit() {
            to_target.extend_from_slice(&p.to_vec());
        }
        conn.handle_input(&mut to_target, now);
        while let Some(ev) = conn.poll_event() {
            if let Event::Transmit(p) = ev {
                to_host.extend_from_slice(&p.to_vec());
            }
        }
        host.handle_input(&mut to_host).expect("valid PDUs");
        if let Some(c) = host.poll_completion() {
            if c.cqe.cid.get() == cid {
                return c;
            }
        }
    }
}

fn main() {
    let secret = DhchapSecret::generate(&OsEntropy, 32, Some(DhchapHash::Sha256)).expect("entropy");
    println!("group      median per queue authentication (host + target)");
    for group in [
        DhGroup::Null,
        DhGroup::Ffdhe2048,
        DhGroup::Ffdhe3072,
        DhGroup::Ffdhe4096,
        DhGroup::Ffdhe6144,
        DhGroup::Ffdhe8192,
    ] {
        let mut times: Vec<Duration> = Vec::new();
        for _ in 0..15 {
            #[allow(clippy::disallowed_methods)] // a benchmark: this is the driver
            let now = Instant::now();
            let target = Target::new(TargetConfig::default());
            let mut sc = SubsystemConfig::new(SUBNQN, "COST1");
            sc.allowed_hosts.push(HOSTNQN.into());
            sc.require_auth = true;
            target.add_subsystem(sc).expect("subsystem");
            let keys = Arc::new(MemoryHostKeys::new());
            keys.set(SUBNQN, HOSTNQN, HostSecrets::new(secret.clone()));
            target.set_host_keys(keys);
            let addr = "127.0.0.1:4420".parse().expect("address");
            let mut conn =
                target.accept(TransportParams { local_addr: addr, peer_addr: addr, port_id: 1 }, now);
            let mut host = HostQueue::new(HostOptions::default());
            let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, [1; 16], SUBNQN, HOSTNQN);
            let cid = host.submit(sqe, Some(data), 0);
            run(&mut conn, &mut host, cid, now);
            let mut cfg = HostAuthConfig::new(HOSTNQN, SUBNQN, secret.clone());
            cfg.hashes = vec![DhchapHash::Sha512];
            cfg.dh_groups = vec![group];
            let mut auth = HostAuthenticator::new(Arc::new(cfg), 1, Arc::new(OsEntropy));
            #[allow(clippy::disallowed_methods)]
            let t = Instant::now();
            while let Some((sqe, data, read_len)) = auth.poll_command() {
                let cid = host.submit(sqe, data, read_len);
                let c = run(&mut conn, &mut host, cid, now);
                auth.handle_completion(&c);
            }
            times.push(t.elapsed());
            assert!(matches!(auth.result(), Some(Ok(_))), "{:?}", auth.result());
        }
        times.sort();
        println!("{:<10} {:?}", group.name(), times[times.len() / 2]);
    }
}
