//! `xatastor-target`: the Xatastor storage node — thin, snapshot-able volumes over NVMe/TCP.
//!
//! ```sh
//! xatastor-target                          # serve ./xatastor-data (file backend) on 127.0.0.1:4420
//! xatastor-target volume create pg --size 10GiB --allow-host "$(cat /etc/nvme/hostnqn)"
//! xatastor-target volume show pg           # prints the `nvme connect` line
//! xatastor-target snapshot create pg@s1
//! xatastor-target volume clone pg@s1 pg-branch --allow-host …
//! ```
//!
//! `serve` (the default) runs the node; every other subcommand talks to the running node through
//! its admin socket `<data dir>/admin.sock` (mode 0600).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nvmeof_target::{Target, TargetConfig};
use serde::Deserialize;
use serde_json::Value;
use xatastor_core::catalog::{Catalog, CatalogError};
use xatastor_core::provisioners::{FileProvisioner, MemoryProvisioner};
use xatastor_core::{Node, NodeConfig, NodeError, Server, ServerConfig, VolumeProvisioner};
use xatastor_examples::admin::{self, Request};
use xatastor_examples::units::{format_size, parse_size};

/// Thin, snapshot-able block volumes over NVMe/TCP for the Linux kernel initiator.
///
/// Without a subcommand it serves ./xatastor-data with the file backend on 127.0.0.1:4420.
/// The other subcommands manage volumes of a running server through its admin socket.
#[derive(Parser, Debug)]
#[command(name = "xatastor-target", version, about, long_about = None)]
struct Cli {
    /// Data directory: catalog, admin socket, and (file backend) the volumes.
    #[arg(long, global = true, env = "XATASTOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the storage node (the default).
    Serve(ServeArgs),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Manage snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Node status: volumes, active volumes, controllers.
    Status,
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// TOML configuration file (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address hosts connect to [default: 127.0.0.1:4420].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Storage backend: `file` (sparse files in the data directory; snapshots need reflink),
    /// `memory` (volatile), or `zvol:<pool/dataset>` (ZFS zvols under that dataset) [default: the
    /// one recorded in the data directory's catalog, else file].
    #[arg(long)]
    backend: Option<String>,
    /// Record --backend in the catalog even though another backend is recorded there (the dataset
    /// was renamed, the directory moved); volumes the backend lacks show as missing.
    #[arg(long)]
    rebind_backend: bool,
    /// Worker threads, each with its own io_uring (0: one per core) [default: 0].
    #[arg(long)]
    workers: Option<usize>,
    /// Prometheus metrics address, or `off` [default: 127.0.0.1:9464].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Seconds a volume stays loaded after its last host disconnected [default: 30].
    #[arg(long)]
    idle_unload_secs: Option<u64>,
    /// Connections accepted from one peer address [default: 16384].
    #[arg(long)]
    max_connections_per_peer: Option<usize>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter) [default: info].
    #[arg(long)]
    log: Option<String>,
}

/// The TOML configuration file: the same settings as the `serve` flags.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    backend: Option<String>,
    workers: Option<usize>,
    metrics_listen: Option<String>,
    idle_unload_secs: Option<u64>,
    max_connections_per_peer: Option<usize>,
    log: Option<String>,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a thin volume.
    Create {
        /// Name: letters, digits, '_', '.', ':', '-'.
        name: String,
        /// Size (e.g. 10GiB).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Logical block size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Compression (zvol backend: lz4, zstd, off, …).
        #[arg(long)]
        compression: Option<String>,
        /// Host NQN allowed to connect (repeat for several).
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
        /// Let any host connect.
        #[arg(long)]
        allow_any_host: bool,
    },
    /// Create many volumes `<prefix><n>` in one catalog transaction (fleet provisioning).
    CreateBatch {
        /// Name prefix.
        #[arg(long)]
        prefix: String,
        /// How many.
        #[arg(long)]
        count: u64,
        /// First number.
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Size of each.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Logical block size.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Host NQN allowed to connect to each.
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
    },
    /// List volumes (in name order, paged).
    List {
        /// Only names starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Start after this name.
        #[arg(long)]
        after: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show a volume: identity, usage, hosts, and the `nvme connect` line.
    Show {
        /// Volume name.
        name: String,
    },
    /// Resize a volume (connected hosts see a larger size at once).
    ///
    /// Shrinking destroys the data beyond the new size: it needs --force, and is refused while a
    /// host is connected (disconnect it first).
    Resize {
        /// Volume name.
        name: String,
        /// New size (e.g. 20GiB).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Allow a smaller size (the data beyond it is lost).
        #[arg(long)]
        force: bool,
    },
    /// Delete a volume and its snapshots.
    Delete {
        /// Volume name.
        name: String,
        /// Disconnect connected hosts first.
        #[arg(long)]
        force: bool,
    },
    /// Create a volume as a copy-on-write clone of a snapshot.
    Clone {
        /// Source snapshot: VOLUME@SNAPSHOT.
        source: String,
        /// New volume name.
        name: String,
        /// Size (default: the snapshot's).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Host NQN allowed to connect to the clone.
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
    },
    /// Allow a host to connect.
    AllowHost {
        /// Volume name.
        name: String,
        /// Host NQN.
        host: String,
    },
    /// Import the backend's existing volumes and snapshots into the catalog (once, e.g. zvols that
    /// were created before this node managed the dataset). They start with no allowed host.
    Adopt,
    /// Let any host connect (on), or only the allowed hosts (off).
    AnyHost {
        /// Volume name.
        name: String,
        /// on or off.
        #[arg(value_enum)]
        state: OnOff,
        /// Turning it off: also disconnect the hosts that are not allowed now.
        #[arg(long)]
        disconnect: bool,
    },
    /// Stop an allowed host from connecting (an error for a host that is not allowed, or for a
    /// volume that lets any host connect: turn that off with `volume any-host NAME off`).
    DenyHost {
        /// Volume name.
        name: String,
        /// Host NQN.
        host: String,
        /// Also disconnect its controllers now.
        #[arg(long)]
        disconnect: bool,
    },
}

/// `on` / `off`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Take snapshots; several VOLUME@SNAPSHOT at once are taken in one step.
    Create {
        /// VOLUME@SNAPSHOT, one or more.
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// List a volume's snapshots.
    List {
        /// Volume name.
        volume: String,
    },
    /// Delete a snapshot.
    Delete {
        /// VOLUME@SNAPSHOT.
        snapshot: String,
    },
}

fn split_snapshot(s: &str) -> Result<(String, String), String> {
    match s.split_once('@') {
        Some((v, n)) if !v.is_empty() && !n.is_empty() => Ok((v.to_owned(), n.to_owned())),
        _ => Err(format!("{s:?} is not VOLUME@SNAPSHOT")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let data_dir = cli.data_dir.clone();
    let result = match cli.cmd {
        None => serve(data_dir, ServeArgs::default()),
        Some(Cmd::Serve(args)) => serve(data_dir, args),
        Some(Cmd::Volume(c)) => client(data_dir, cli.json, volume_request(c)),
        Some(Cmd::Snapshot(c)) => client(data_dir, cli.json, snapshot_request(c)),
        Some(Cmd::Status) => client(data_dir, cli.json, Ok(Request::Status)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xatastor-target: {e}");
            ExitCode::FAILURE
        }
    }
}

fn data_dir_or_default(d: Option<PathBuf>) -> PathBuf {
    d.unwrap_or_else(|| PathBuf::from("./xatastor-data"))
}

// ---- client ----

fn volume_request(c: VolumeCmd) -> Result<Request, String> {
    Ok(match c {
        VolumeCmd::Create { name, size, block_size, compression, allow_host, allow_any_host } => {
            Request::VolumeCreate {
                name,
                size_bytes: size,
                block_size,
                compression,
                allowed_hosts: allow_host,
                allow_any_host,
            }
        }
        VolumeCmd::CreateBatch { prefix, count, start, size, block_size, allow_host } => {
            Request::VolumeCreateBatch {
                prefix,
                start,
                count,
                size_bytes: size,
                block_size,
                allowed_hosts: allow_host,
            }
        }
        VolumeCmd::List { prefix, after, limit } => Request::VolumeList { prefix, after, limit },
        VolumeCmd::Show { name } => Request::VolumeShow { name },
        VolumeCmd::Resize { name, size, force } => Request::VolumeResize { name, size_bytes: size, force },
        VolumeCmd::AnyHost { name, state, disconnect } => {
            Request::VolumeSetAnyHost { name, allow_any_host: state == OnOff::On, disconnect }
        }
        VolumeCmd::Delete { name, force } => Request::VolumeDelete { name, force },
        VolumeCmd::Clone { source, name, size, allow_host } => {
            let (volume, snapshot) = split_snapshot(&source)?;
            Request::VolumeClone {
                volume,
                snapshot,
                name,
                size_bytes: size.unwrap_or(0),
                allowed_hosts: allow_host,
            }
        }
        VolumeCmd::AllowHost { name, host } => Request::VolumeAllowHost { name, host },
        VolumeCmd::Adopt => Request::Adopt,
        VolumeCmd::DenyHost { name, host, disconnect } => Request::VolumeDenyHost { name, host, disconnect },
    })
}

fn snapshot_request(c: SnapshotCmd) -> Result<Request, String> {
    Ok(match c {
        SnapshotCmd::Create { snapshots } => Request::SnapshotCreate {
            snapshots: snapshots.iter().map(|s| split_snapshot(s)).collect::<Result<_, _>>()?,
        },
        SnapshotCmd::List { volume } => Request::SnapshotList { volume },
        SnapshotCmd::Delete { snapshot } => {
            let (volume, snapshot) = split_snapshot(&snapshot)?;
            Request::SnapshotDelete { volume, snapshot }
        }
    })
}

fn client(data_dir: Option<PathBuf>, json: bool, req: Result<Request, String>) -> Result<(), String> {
    let req = req?;
    let socket = data_dir_or_default(data_dir).join("admin.sock");
    let result = admin::call(&socket, &req)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default());
        return Ok(());
    }
    print_human(&req, &result);
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_volume(v: &Value) {
    println!("volume     {}", s(&v["name"]));
    println!(
        "size       {} ({} bytes, {}-byte blocks)",
        format_size(v["size_bytes"].as_u64().unwrap_or(0)),
        s(&v["size_bytes"]),
        s(&v["block_size"])
    );
    println!("state      {}", s(&v["state"]));
    if !v["origin"].is_null() {
        println!("origin     {}", s(&v["origin"]));
    }
    println!("nqn        {}", s(&v["nqn"]));
    println!("nguid      {}", s(&v["nguid"]));
    println!("uuid       {}", s(&v["uuid"]));
    println!("serial     {}", s(&v["serial"]));
    let hosts: Vec<String> =
        v["allowed_hosts"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
    let any = v["allow_any_host"].as_bool() == Some(true);
    println!(
        "hosts      {}",
        if any {
            "any".into()
        } else if hosts.is_empty() {
            "none (use volume allow-host)".into()
        } else {
            hosts.join(", ")
        }
    );
    if let Some(used) = v["used_bytes"].as_u64() {
        println!(
            "used       {} (compression ratio {:.2})",
            format_size(used),
            v["compress_ratio"].as_f64().unwrap_or(1.0)
        );
    }
    if !v["active"].is_null() {
        println!("active     {} ({} controller(s))", s(&v["active"]), s(&v["controllers"]));
    }
    if let Some(snaps) = v["snapshots"].as_array().filter(|a| !a.is_empty()) {
        println!("snapshots  {}", snaps.iter().map(s).collect::<Vec<_>>().join(", "));
    }
    println!("connect    {}", s(&v["connect"]));
}

fn print_human(req: &Request, r: &Value) {
    match req {
        Request::VolumeList { .. } => {
            println!("{:<32} {:>10} {:<9} {:<20} HOSTS", "NAME", "SIZE", "STATE", "ORIGIN");
            for v in r.as_array().into_iter().flatten() {
                let hosts = if v["allow_any_host"].as_bool() == Some(true) {
                    "any".to_owned()
                } else {
                    v["allowed_hosts"].as_array().map_or(0, Vec::len).to_string()
                };
                println!(
                    "{:<32} {:>10} {:<9} {:<20} {hosts}",
                    s(&v["name"]),
                    format_size(v["size_bytes"].as_u64().unwrap_or(0)),
                    s(&v["state"]),
                    s(&v["origin"])
                );
            }
        }
        Request::SnapshotList { .. } | Request::SnapshotCreate { .. } => {
            println!("{:<40} {:>10} STATE", "SNAPSHOT", "SIZE");
            for v in r.as_array().into_iter().flatten() {
                println!(
                    "{:<40} {:>10} {}",
                    format!("{}@{}", s(&v["volume"]), s(&v["name"])),
                    format_size(v["size_bytes"].as_u64().unwrap_or(0)),
                    s(&v["state"])
                );
            }
        }
        Request::VolumeDelete { .. } | Request::SnapshotDelete { .. } => {
            println!("deleted {}", s(&r["deleted"]))
        }
        Request::VolumeCreateBatch { .. } => println!("created {} volume(s)", s(&r["created"])),
        Request::Adopt => {
            let names: Vec<String> =
                r["adopted"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
            println!(
                "adopted {} volume(s){}{}",
                names.len(),
                if names.is_empty() { "" } else { ": " },
                names.join(", ")
            );
        }
        Request::Status => {
            for k in [
                "listen",
                "backend",
                "nqn_prefix",
                "volumes_total",
                "volumes_active",
                "controllers",
                "catalog_bytes",
            ] {
                println!("{k:<15} {}", s(&r[k]));
            }
        }
        _ => print_volume(r),
    }
}

// ---- server ----

fn load_config(args: &ServeArgs) -> Result<FileConfig, String> {
    let Some(path) = &args.config else { return Ok(FileConfig::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The `--backend` value of a recorded backend.
fn backend_flag(kind: &str, location: &str) -> String {
    match kind {
        "zvol" => format!("zvol:{location}"),
        other => other.to_owned(),
    }
}

/// The backend recorded in the data directory's catalog, as a `--backend` value (`None` for a new
/// data directory).
fn recorded_backend(data_dir: &Path) -> Result<Option<String>, String> {
    let path = data_dir.join("catalog.redb");
    if !path.exists() {
        return Ok(None);
    }
    let catalog = Catalog::open(&path).map_err(|e| e.to_string())?;
    let recorded = catalog.backend().map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(recorded.map(|b| backend_flag(&b.kind, &b.location)))
}

fn provisioner(backend: &str, data_dir: &Path) -> Result<Arc<dyn VolumeProvisioner>, String> {
    match backend {
        "file" => FileProvisioner::new(data_dir)
            .map(|p| Arc::new(p) as Arc<dyn VolumeProvisioner>)
            .map_err(|e| format!("file backend in {}: {e}", data_dir.display())),
        "memory" => Ok(Arc::new(MemoryProvisioner::new())),
        other => match other.strip_prefix("zvol:") {
            Some(dataset) if !dataset.is_empty() => {
                zvol_backend::ZfsProvisioner::new(zvol_backend::ZfsConfig::new(dataset))
                    .map(|p| Arc::new(p) as Arc<dyn VolumeProvisioner>)
                    .map_err(|e| format!("zvol backend on {dataset}: {e}"))
            }
            _ => Err(format!("unknown backend {other:?}: use file, memory or zvol:<pool/dataset>")),
        },
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after it) and returns
/// the set, for `sigwait`.
fn block_signals() -> libc::sigset_t {
    // SAFETY: `sigset_t` is plain data; `sigemptyset`/`sigaddset` initialise it, and
    // `pthread_sigmask` only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` was initialised by `block_signals`; `sig` is a valid out pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

fn serve(data_dir: Option<PathBuf>, args: ServeArgs) -> Result<(), String> {
    let file = load_config(&args)?;
    let data_dir = data_dir_or_default(data_dir.or(file.data_dir));
    let listen = args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4420)));
    let backend = match args.backend.or(file.backend) {
        Some(b) => b,
        None => recorded_backend(&data_dir)?.unwrap_or_else(|| "file".into()),
    };
    let workers = args.workers.or(file.workers).unwrap_or(0);
    let metrics_listen =
        args.metrics_listen.or(file.metrics_listen).unwrap_or_else(|| "127.0.0.1:9464".into());
    let idle = Duration::from_secs(args.idle_unload_secs.or(file.idle_unload_secs).unwrap_or(30));
    let per_peer = args.max_connections_per_peer.or(file.max_connections_per_peer).unwrap_or(16384);
    let log = args.log.or(file.log).unwrap_or_else(|| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&log).map_err(|e| format!("--log {log:?}: {e}"))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let signals = block_signals();

    std::fs::create_dir_all(&data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let prov = provisioner(&backend, &data_dir)?;
    let target = Target::new(TargetConfig::default());
    let mut node_config = NodeConfig::new(data_dir.join("catalog.redb"));
    node_config.idle_unload = idle;
    node_config.rebind_backend = args.rebind_backend;
    let node = Node::open(node_config, prov, target.clone()).map_err(|e| match e {
        NodeError::BackendMismatch { recorded, given } => format!(
            "{} holds volumes on {recorded}, not on {given}: start with --backend {} (or add \
             --rebind-backend if the volumes moved there)",
            data_dir.display(),
            backend_flag(&recorded.kind, &recorded.location)
        ),
        NodeError::Catalog(e @ CatalogError::Locked { .. }) => e.to_string(),
        e => format!("opening the catalog: {e}"),
    })?;

    let mut config = ServerConfig::new(listen);
    config.workers = workers;
    config.max_connections_per_peer = per_peer;
    let server = Arc::new(Server::start(target, config).map_err(|e| format!("listening on {listen}: {e}"))?);
    let addr = server.local_addr();
    let ep =
        admin::Endpoint { traddr: addr.ip().to_string(), trsvcid: addr.port(), backend: backend.clone() };
    let socket = data_dir.join("admin.sock");
    admin::serve(&socket, node.clone(), ep).map_err(|e| format!("admin socket {}: {e}", socket.display()))?;
    let shared = Arc::new(parking_lot::Mutex::new(Some(server.clone())));
    let metrics = if metrics_listen == "off" {
        None
    } else {
        let a: SocketAddr = metrics_listen
            .parse()
            .map_err(|_| format!("--metrics-listen {metrics_listen:?} is not an address or off"))?;
        Some(
            xatastor_examples::metrics::serve(a, node.clone(), shared.clone())
                .map_err(|e| format!("metrics on {a}: {e}"))?,
        )
    };
    let volumes = node.stats().map(|s| s.volumes_total).unwrap_or(0);
    let me = std::env::args().next().unwrap_or_else(|| "xatastor-target".into());
    let dd = data_dir.display();
    eprintln!("xatastor-target: serving {volumes} volume(s) ({backend} backend, data in {dd}) on {addr}");
    eprintln!("  admin socket {}", socket.display());
    if let Some(m) = metrics {
        eprintln!("  metrics      http://{m}/metrics");
    }
    eprintln!("create a volume and connect to it from a Linux host:");
    eprintln!(
        "  {me} --data-dir {dd} volume create vol1 --size 10GiB --allow-host \"$(cat /etc/nvme/hostnqn)\""
    );
    eprintln!("  {me} --data-dir {dd} volume show vol1        # prints the nvme connect line");
    eprintln!("  nvme connect -t tcp -a {} -s {} -n {}:vol1", addr.ip(), addr.port(), node.nqn_prefix());

    let sig = wait_for_signal(&signals);
    eprintln!("xatastor-target: signal {sig}: shutting down (finishing I/O, flushing volumes)");
    shared.lock().take();
    let _ = std::fs::remove_file(&socket);
    // A metrics scrape may hold the server for a moment.
    let mut server = server;
    for _ in 0..250 {
        match Arc::try_unwrap(server) {
            Ok(s) => return s.shutdown().map_err(|e| format!("shutdown: {e}")),
            Err(s) => {
                server = s;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Err("shutdown: the server is still in use by the metrics thread".into())
}
