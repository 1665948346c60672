//! `xatastor-scale`: what a node with many volumes costs — a benchmark, not a test.
//!
//! For each count (default 10K, 100K, 1M volumes) it
//! 1. **populates** a fresh catalog through [`Node::create_volumes`] in batches (memory provisioner,
//!    so the figure is the catalog's and the node's, not a file system's): create throughput and
//!    catalog size on disk;
//! 2. makes `--probes` of those volumes real sparse files (file provisioner) for the cold-connect
//!    measurement;
//! 3. **restarts** in a fresh child process: opens the node on that catalog with the file provisioner
//!    and starts the io_uring server — start-up time to accepting connections, and RSS;
//! 4. connects to each probe volume cold (not loaded): TCP connect → ICReq → Connect (the volume is
//!    looked up and opened here) → enable → Set Features → I/O queue → first 4 KiB read completed;
//!    reports min/p50/p99/max, then RSS again.
//!
//! ```sh
//! cargo run --release -p xatastor-benches --bin xatastor-scale -- --counts 10000,100000,1000000
//! ```
//!
//! With `--connected N,…` it measures connected-idle controllers instead (see `connected.rs`), with
//! `--keep-alive-floor N,…` what the same keep-alives cost a bare epoll + recv + send server (see
//! `floor.rs`), with `--upgrade N,…` a zero-downtime upgrade against the number of connections (see
//! `upgrade.rs`).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod connected;
mod floor;
mod upgrade;

use clap::Parser;
use nvmeof_proto::nvme::fabrics::CNTLID_DYNAMIC;
use nvmeof_proto::nvme::nvm::RwCommand;
use nvmeof_proto::nvme::registers::{offset, PropertyWidth};
use nvmeof_proto::nvme::{Sqe, Status};
use nvmeof_target::host::{self, BlockingHost, HostOptions};
use nvmeof_target::{Target, TargetConfig};
use xatastor_core::provisioners::{FileProvisioner, MemoryProvisioner};
use xatastor_core::{
    CreateVolume, Node, NodeConfig, Server, ServerConfig, VolumeName, VolumeProvisioner, VolumeSpec,
};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:xatastor-scale";

#[derive(Parser, Debug)]
#[command(about = "Start-up, RSS, catalog size, create throughput and cold connect latency vs. volume count")]
struct Args {
    /// Volume counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    counts: Vec<u64>,
    /// Volumes created per catalog transaction.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Cold volumes connected to (and read from) after the restart.
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// Work directory (default: a temporary directory per count).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Seconds of idle after the probes over which the server's CPU time is measured.
    #[arg(long, default_value_t = 5)]
    idle_secs: u64,
    /// Internal: run the restart phase on this directory and print one line of figures.
    #[arg(long, hide = true)]
    restart: Option<PathBuf>,
    /// Measure connected-idle controllers instead: these connection counts (admin queues plus I/O
    /// queues), each controller on its own volume, held with keep-alives.
    #[arg(long, value_delimiter = ',')]
    connected: Vec<u64>,
    /// How long the connected controllers are held, in seconds.
    #[arg(long, default_value_t = 300)]
    hold_secs: u64,
    /// Keep-alive timeout the controllers connect with, in milliseconds (they send a Keep Alive
    /// every half of it). 5000 is the Linux host's default.
    #[arg(long, default_value_t = 5000)]
    kato_ms: u32,
    /// One controller in this many also connects an I/O queue.
    #[arg(long, default_value_t = 10)]
    io_queue_every: u64,
    /// Worker threads of the target.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Pin the target process to this core.
    #[arg(long)]
    target_cpu: Option<usize>,
    /// Pin this (client) process to this core.
    #[arg(long)]
    client_cpu: Option<usize>,
    /// The target's batch window for quiet admin queues, in milliseconds (0: off).
    #[arg(long, default_value_t = 10)]
    admin_batch_window_ms: u64,
    /// Open-file limit the target starts with, `SOFT:HARD` (it raises the soft limit to the hard one).
    #[arg(long, value_parser = parse_nofile)]
    target_nofile: Option<(u64, u64)>,
    /// Measure `xatastor-target upgrade` instead: handover time and pause with these connection
    /// counts (a target process from the same build directory, file backend). This process holds
    /// every connection, so counts above its open-file limit (e.g. 100000 where the limit is 20000)
    /// are skipped; the old node process needs two descriptors per connection while it hands them
    /// over.
    #[arg(long, value_delimiter = ',')]
    upgrade: Vec<u64>,
    /// Measure the floor for `--connected` instead: the CPU per keep-alive of a bare epoll + recv +
    /// send server (no NVMe, no io_uring) holding this many TCP connections, with the same rate
    /// (`--kato-ms`), hold, cores and batch window.
    #[arg(long, value_delimiter = ',')]
    keep_alive_floor: Vec<u64>,
    /// Internal: serve this many bare connections for `--keep-alive-floor`.
    #[arg(long, hide = true)]
    serve_floor: Option<u64>,
    /// Internal: serve this many loaded volumes for `--connected`.
    #[arg(long, hide = true)]
    serve_connected: Option<u64>,
}

fn parse_nofile(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once(':').ok_or("expected SOFT:HARD, e.g. 1024:20000")?;
    let soft = a.parse::<u64>().map_err(|e| format!("soft limit: {e}"))?;
    let hard = b.parse::<u64>().map_err(|e| format!("hard limit: {e}"))?;
    if soft > hard {
        return Err(format!("the soft limit {soft} is above the hard limit {hard}"));
    }
    Ok((soft, hard))
}

fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// VmRSS of process `pid` ("self" for this one), in KiB (0 if unknown).
fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time of all the threads of process `pid`, in nanoseconds (schedstat: time on a CPU).
fn cpu_ns_of(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

fn name(i: u64) -> String {
    format!("vol{i:07}")
}

fn probe_names(count: u64, probes: usize) -> Vec<String> {
    let step = (count / probes.max(1) as u64).max(1);
    (0..probes as u64).map(|k| name((k * step + 7) % count)).collect()
}

fn main() {
    let args = Args::parse();
    if let Some(dir) = &args.restart {
        restart_phase(dir, args.probes, args.idle_secs);
        return;
    }
    if let Some(volumes) = args.serve_connected {
        connected::serve(&connected::Serve {
            volumes,
            workers: args.workers,
            cpu: args.target_cpu,
            nofile: args.target_nofile,
            admin_batch_window: Duration::from_millis(args.admin_batch_window_ms),
        });
        return;
    }
    if let Some(n) = args.serve_floor {
        floor::serve(n, args.target_cpu, Duration::from_millis(args.admin_batch_window_ms));
        return;
    }
    if !args.keep_alive_floor.is_empty() {
        floor::run(&floor::Options {
            counts: args.keep_alive_floor.clone(),
            hold_secs: args.hold_secs,
            kato_ms: args.kato_ms,
            target_cpu: args.target_cpu,
            client_cpu: args.client_cpu,
            window_ms: args.admin_batch_window_ms,
        });
        return;
    }
    if !args.upgrade.is_empty() {
        upgrade::run(&upgrade::Options {
            counts: args.upgrade.clone(),
            workers: args.workers,
            target_cpu: args.target_cpu,
            client_cpu: args.client_cpu,
        });
        return;
    }
    if !args.connected.is_empty() {
        connected::run(&connected::Options {
            counts: args.connected.clone(),
            hold_secs: args.hold_secs,
            kato_ms: args.kato_ms,
            io_queue_every: args.io_queue_every,
            workers: args.workers,
            target_cpu: args.target_cpu,
            client_cpu: args.client_cpu,
            target_nofile: args.target_nofile,
            admin_batch_window_ms: args.admin_batch_window_ms,
        });
        return;
    }
    println!(
        "{:>9} {:>10} {:>11} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "volumes",
        "create/s",
        "catalog MiB",
        "start ms",
        "RSS MiB",
        "cold p50",
        "cold p99",
        "cold max",
        "cold min",
        "RSS after",
        "idle CPU %"
    );
    for &count in &args.counts {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let dir = args.dir.clone().map_or_else(|| tmp.path().to_owned(), |d| d.join(format!("n{count}")));
        std::fs::create_dir_all(&dir).expect("work directory");
        let (rate, catalog_bytes) = populate(&dir, count, args.batch, args.probes);
        let out = std::process::Command::new(std::env::current_exe().expect("own path"))
            .args(["--restart", &dir.display().to_string(), "--probes", &args.probes.to_string()])
            .args(["--idle-secs", &args.idle_secs.to_string()])
            .output()
            .expect("restart phase");
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if f.len() < 8 || !out.status.success() {
            eprintln!("restart phase failed: {}{}", line, String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        }
        println!(
            "{:>9} {:>10.0} {:>11.1} {:>8.1} {:>8.1} {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>9.1} {:>10.2}",
            count,
            rate,
            catalog_bytes as f64 / 1048576.0,
            f[0],
            f[1] / 1024.0,
            f[2],
            f[3],
            f[4],
            f[5],
            f[6] / 1024.0,
            f[7]
        );
    }
}

/// Creates `count` volumes; returns (volumes per second, catalog bytes).
fn populate(dir: &Path, count: u64, batch: usize, probes: usize) -> (f64, u64) {
    let target = Target::new(TargetConfig::default());
    let node =
        Node::open(NodeConfig::new(dir.join("catalog.redb")), Arc::new(MemoryProvisioner::new()), target)
            .expect("open node");
    #[allow(clippy::disallowed_methods)]
    let start = Instant::now();
    let mut i = 0u64;
    while i < count {
        let n = (count - i).min(batch as u64);
        let reqs = (i..i + n)
            .map(|k| {
                let mut c = CreateVolume::new(name(k), 1 << 30);
                c.allowed_hosts = vec![HOST.to_owned()];
                c
            })
            .collect();
        node.create_volumes(reqs).expect("create volumes");
        i += n;
    }
    let rate = count as f64 / start.elapsed().as_secs_f64();
    // Real (sparse) files for the volumes the restart phase will connect to.
    let files = FileProvisioner::new(dir.join("files")).expect("file provisioner");
    for p in probe_names(count, probes) {
        let spec = VolumeSpec {
            name: VolumeName::new(p).expect("name"),
            size_bytes: 1 << 30,
            block_size: 512,
            compression: None,
        };
        files.create(&spec).expect("probe file");
    }
    (rate, node.catalog().file_bytes())
}

/// CPU time (user + system) of this process so far, in clock ticks.
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// In a fresh process: start-up, RSS, cold connects, idle CPU. Prints
/// `startup_ms rss_kib p50_us p99_us max_us min_us rss_after_kib idle_cpu_percent`.
#[allow(clippy::disallowed_methods)]
fn restart_phase(dir: &Path, probes: usize, idle_secs: u64) {
    let t0 = Instant::now();
    let target = Target::new(TargetConfig::default());
    let prov: Arc<dyn VolumeProvisioner> = Arc::new(FileProvisioner::new(dir.join("files")).expect("files"));
    let mut config = NodeConfig::new(dir.join("catalog.redb"));
    config.idle_unload = Duration::from_secs(600);
    // Populated on the memory provisioner (the catalog's cost), served from files now.
    config.rebind_backend = true;
    let node = Node::open(config, prov, target.clone()).expect("open node");
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().expect("address"));
    sc.workers = 1;
    let server = Server::start(target, sc).expect("server");
    // Accepting: a TCP connect succeeds.
    drop(TcpStream::connect(server.local_addr()).expect("connect"));
    let startup_ms = t0.elapsed().as_secs_f64() * 1e3;
    let rss = rss_kib();
    let count = node.catalog().volume_count().expect("count");
    let mut lat: Vec<f64> = probe_names(count, probes)
        .iter()
        .map(|n| cold_connect_and_read(server.local_addr(), &node.nqn_of(n)).as_secs_f64() * 1e6)
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    let rss_after = rss_kib();
    // Idle: the probe connections are closed; the volumes stay loaded (idle unload is 10 min), the
    // server waits in io_uring_enter.
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(idle_secs));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_pct = (cpu_ticks() - before) as f64 / hz / idle_secs.max(1) as f64 * 100.0;
    println!(
        "{startup_ms:.2} {rss} {:.1} {:.1} {:.1} {:.1} {rss_after} {idle_pct:.2}",
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(0.0),
        lat.first().copied().unwrap_or(0.0),
    );
    let _ = server.shutdown();
}

/// TCP connect to first 4 KiB read completed, on a volume that is not loaded.
#[allow(clippy::disallowed_methods)]
fn cold_connect_and_read(addr: SocketAddr, subnqn: &str) -> Duration {
    let t = Instant::now();
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    let mut admin = BlockingHost::new(s, HostOptions::default()).expect("ICReq");
    let (sqe, data) = host::connect_command(0, 32, 0, CNTLID_DYNAMIC, [5; 16], subnqn, HOST);
    let c = admin.command(sqe, Some(data), 0).expect("connect");
    assert_eq!(c.status(), Status::SUCCESS, "connect to {subnqn}");
    let cntlid = c.cqe.dw0.get() as u16;
    let c =
        admin.command(host::property_set(offset::CC, PropertyWidth::Four, 0x0046_0001), None, 0).expect("CC");
    assert_eq!(c.status(), Status::SUCCESS);
    let mut nq = Sqe::zeroed();
    nq.opcode = 0x09;
    nq.cdw10.set(0x07);
    assert_eq!(admin.command(nq, None, 0).expect("set features").status(), Status::SUCCESS);
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    let mut q = BlockingHost::new(s, HostOptions::default()).expect("ICReq");
    let (sqe, data) = host::connect_command(1, 32, 0, cntlid, [5; 16], subnqn, HOST);
    assert_eq!(q.command(sqe, Some(data), 0).expect("connect I/O").status(), Status::SUCCESS);
    let mut rd = Sqe::zeroed();
    rd.opcode = 0x02;
    rd.nsid.set(1);
    RwCommand::new(0, 8).apply(&mut rd);
    let c = q.command(rd, None, 4096).expect("read");
    assert_eq!(c.status(), Status::SUCCESS);
    t.elapsed()
}
