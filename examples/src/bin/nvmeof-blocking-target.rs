//! `nvmeof-blocking-target`: serves one volume over NVMe/TCP with the blocking driver.
//!
//! ```sh
//! nvmeof-blocking-target --listen 127.0.0.1:4420 --memory 1GiB --allow-any-host
//! nvme discover -t tcp -a 127.0.0.1 -s 4420
//! nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-01.io.xatastor:blocking
//! ```

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use nvmeof_target::{
    BlockBackend, FileBackend, HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target,
    TargetConfig,
};

/// Serve one volume over NVMe/TCP (thread per connection, blocking I/O; for tests and evaluation).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4420")]
    listen: SocketAddr,
    /// Subsystem NQN of the volume.
    #[arg(long, default_value = "nqn.2026-01.io.xatastor:blocking")]
    nqn: String,
    /// Serial number reported to hosts.
    #[arg(long, default_value = "XSBLOCKING1")]
    serial: String,
    /// Serve a thin in-memory volume of this size (e.g. 1GiB, 512MiB, 4096).
    #[arg(long, value_parser = parse_size, conflicts_with = "file")]
    memory: Option<u64>,
    /// Serve this file or block device (must exist; `--create SIZE` makes a sparse file).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Create `--file` as a sparse file of this size first.
    #[arg(long, value_parser = parse_size, requires = "file")]
    create: Option<u64>,
    /// Logical block size: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Host NQN allowed to connect (repeatable). Without it and without --allow-any-host nobody can.
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Let any host connect.
    #[arg(long)]
    allow_any_host: bool,
    /// Log filter (tracing-subscriber syntax), e.g. `info`, `nvmeof_target=debug`.
    #[arg(long, default_value = "info")]
    log: String,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(format!("unknown unit {unit:?} (use KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvmeof-blocking-target: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let backend: Arc<dyn BlockBackend> = match (&args.file, args.memory) {
        (Some(path), _) => match args.create {
            Some(size) => Arc::new(FileBackend::create(path, size, args.block_size)?),
            None => Arc::new(
                FileBackend::open(path, args.block_size)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
            ),
        },
        (None, Some(size)) => Arc::new(MemoryBackend::new(size, args.block_size)),
        (None, None) => return Err("give --memory SIZE or --file PATH".into()),
    };
    if backend.size_bytes() == 0 {
        return Err("the volume is empty (size 0)".into());
    }
    let target = Target::new(TargetConfig::default());
    let mut sc = SubsystemConfig::new(args.nqn.clone(), args.serial.clone());
    sc.allowed_hosts = args.hosts.clone();
    if args.allow_any_host {
        sc.access = HostAccess::AllowAny;
    }
    target.add_subsystem(sc)?;
    target.add_namespace(&args.nqn, NamespaceConfig::derived(&args.nqn, 1, backend.clone()))?;
    let listener =
        TcpListener::bind(args.listen).map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "serving {} ({} bytes) on {addr}\n  nvme discover -t tcp -a {} -s {}\n  nvme connect -t tcp -a {} -s {} -n {}",
        args.nqn,
        backend.size_bytes(),
        addr.ip(),
        addr.port(),
        addr.ip(),
        addr.port(),
        args.nqn
    );
    if args.hosts.is_empty() && !args.allow_any_host {
        eprintln!("  note: no host may connect: add --host NQN or --allow-any-host");
    }
    nvmeof_target_serve(listener, target)?;
    Ok(())
}

fn nvmeof_target_serve(listener: TcpListener, target: Target) -> std::io::Result<()> {
    xatastor_examples::blocking::serve(listener, target, 1)
}
