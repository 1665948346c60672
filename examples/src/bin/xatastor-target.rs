//! `xatastor-target`: the Xatastor storage node — thin, snapshot-able volumes over NVMe/TCP.
//!
//! ```sh
//! xatastor-target                          # serve ./xatastor-data (file backend) on 127.0.0.1:4420
//! xatastor-target volume create pg --size 10GiB --allow-host "$(cat /etc/nvme/hostnqn)"
//! xatastor-target volume show pg           # prints the `nvme connect` line
//! xatastor-target snapshot create pg@s1
//! xatastor-target volume clone pg@s1 pg-branch --allow-host …
//! # host authentication (DH-HMAC-CHAP): the host proves a secret
//! xatastor-target volume allow-host pg "$HOSTNQN" --dhchap-secret-file host.key
//! xatastor-target volume require-auth pg on
//! ```
//!
//! `serve` (the default: `xatastor-target --config f.toml` is `xatastor-target serve --config
//! f.toml`) runs the node; every other subcommand talks to the running node through its admin
//! socket `<data dir>/admin.sock` (mode 0600).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nvmeof_target::{Target, TargetConfig};
use serde::Deserialize;
use serde_json::Value;
use xatastor_core::admin::socket::AdminSocket;
use xatastor_core::admin::{self, socket, Request, SecretText};
use xatastor_core::catalog::{Catalog, CatalogError};
use xatastor_core::provisioners::{FileProvisioner, MemoryProvisioner};
use xatastor_core::upgrade::Takeover;
use xatastor_core::{Node, NodeConfig, NodeError, ProvisionError, Server, ServerConfig, VolumeProvisioner};
use xatastor_examples::grpc;
use xatastor_examples::node_upgrade::Upgrader;
use xatastor_examples::systemd;
use xatastor_examples::units::{format_size, parse_size};

/// Volume and snapshot names, for --help.
const NAME_RULES: &str =
    "1-128 bytes of ASCII letters, digits, '_', '.', ':', '-'; not starting with '.' or '-'";

/// `volume allow-host --help`: host authentication.
const ALLOW_HOST_HELP: &str = "\
Host authentication (DH-HMAC-CHAP): with a secret, the host must prove it at every connect (nvme
connect --dhchap-secret); with a controller secret too, the node proves itself to the host
(--dhchap-ctrl-secret). A secret file holds one DHHC-1 line as `nvme gen-dhchap-key` prints it and
must be readable by its owner only (mode 0600), like an ssh key. The node keeps the secrets in
<data dir>/secrets (0700, files 0600), never in the catalog or a log, and `volume show` never
prints them.

Rotation: run allow-host again with new secret files (or --generate-dhchap-secret). Connected
hosts stay connected; their next authentication must use the new secret (a Linux host
re-authenticates when the new one is written to /sys/class/nvme/nvmeX/dhchap_secret, and when it
reconnects). Remove a host's secrets with `volume remove-host-secret`; `volume deny-host` removes
them with the host.

Examples:
  # a secret made on the host, in a file only its owner can read
  (umask 077; nvme gen-dhchap-key --nqn \"$HOSTNQN\" > host.key)
  xatastor-target volume allow-host pg \"$HOSTNQN\" --dhchap-secret-file host.key
  # bidirectional: a controller secret too
  xatastor-target volume allow-host pg \"$HOSTNQN\" --dhchap-secret-file host.key --dhchap-ctrl-secret-file ctrl.key
  # the node makes them and prints them once (store them 0600)
  xatastor-target volume allow-host pg \"$HOSTNQN\" --generate-dhchap-secret --bidirectional --hmac 1
  # then, on the host (volume show prints the line with placeholders)
  nvme connect -t tcp -a ADDR -s 4420 -n NQN --hostnqn=\"$HOSTNQN\" --dhchap-secret=\"$(cat host.key)\"";

/// Longest secret file read (one DHHC-1 line is under 100 bytes).
const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// The default overcommit limit.
const DEFAULT_OVERCOMMIT: f64 = 20.0;

/// The Xatastor storage node: thin, snapshot-able block volumes over NVMe/TCP for the Linux kernel
/// initiator.
///
/// Without a subcommand it serves (the same as `serve`, with the same options): by default
/// ./xatastor-data with the file backend on 127.0.0.1:4420. The other subcommands manage the
/// volumes of a running node through its admin socket (admin.sock in the data directory).
#[derive(Parser, Debug)]
#[command(name = "xatastor-target", version)]
struct Cli {
    /// Data directory: catalog, admin socket, and (file backend) the volumes [default: ./xatastor-data].
    #[arg(long, global = true, env = "XATASTOR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print machine-readable JSON instead of text (admin subcommands).
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the storage node (the default).
    Serve(Box<ServeArgs>),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Manage snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Node status: volumes, loaded volumes, controllers, capacity.
    Status,
    /// Zero-downtime upgrade: the running node starts the new binary with its own arguments and
    /// hands it every connection (hosts keep their controllers and see a pause of milliseconds, no
    /// reconnect). Returns when the new process serves, or says why the upgrade did not happen (the
    /// node then serves on). SIGHUP to the node does the same with the binary it was started from.
    Upgrade {
        /// The new binary [default: the binary the node was started from].
        #[arg(long)]
        binary: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// TOML configuration file with the same settings (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address hosts connect to: IP:PORT or HOST:PORT (a name is resolved; IPv4 preferred)
    /// [default: 127.0.0.1:4420].
    #[arg(long)]
    listen: Option<String>,
    /// Address printed in `nvme connect` lines (volume show, the start banner) when hosts reach the
    /// node by another address than --listen, which they must when it listens on 0.0.0.0 or ::
    /// [default: the --listen address].
    #[arg(long)]
    advertise: Option<String>,
    /// Storage backend: `file` (sparse files in the data directory; snapshots need reflink),
    /// `memory` (volatile), or `zvol:<pool/dataset>` (ZFS zvols under that dataset) [default: the
    /// one recorded in the data directory's catalog, else file].
    #[arg(long)]
    backend: Option<String>,
    /// Record --backend in the catalog even though another backend is recorded there (the dataset
    /// was renamed, the directory moved); volumes the backend lacks show as missing.
    #[arg(long)]
    rebind_backend: bool,
    /// Refuse creates and grows past this many provisioned bytes per byte of the backend's pool,
    /// or `off` [default: 20].
    #[arg(long)]
    overcommit_ratio: Option<String>,
    /// Worker threads, each with its own io_uring (0: one per core) [default: 0].
    #[arg(long)]
    workers: Option<usize>,
    /// Prometheus metrics address (served at /metrics), or `off` [default: 127.0.0.1:9464].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Seconds a volume stays loaded after its last host disconnected [default: 30].
    #[arg(long)]
    idle_unload_secs: Option<u64>,
    /// Connections accepted from one peer address [default: 16384].
    #[arg(long)]
    max_connections_per_peer: Option<usize>,
    /// Microseconds a worker polls for the next request of a busy connection before it sleeps
    /// (lower latency for a host keeping a queue busy; a worker woken soon after it stopped polling
    /// polls up to four times as long; idle workers and sparse traffic never poll; 0: never poll)
    /// [default: 50].
    #[arg(long)]
    poll_window_us: Option<u64>,
    /// Threads that run the volume operations a worker must not wait for (zeroing a range on a file
    /// system without fallocate, a zvol's discard, misaligned O_DIRECT requests) [default: 4].
    #[arg(long)]
    blocking_threads: Option<usize>,
    /// Announce traffic-based keep alive (TBKAS): busy hosts stop sending keep-alives, but idle
    /// Linux hosts send twice as many (every KATO/4). Off by default: on a node of mostly idle
    /// volumes it doubles the keep-alive load.
    #[arg(long)]
    traffic_based_keep_alive: bool,
    /// How long a quiet admin queue's commands (an idle host's keep-alives) may wait so that a
    /// worker wakes once for many of them, in milliseconds (at most 1000); 0: answer each at once
    /// [default: 10].
    #[arg(long)]
    admin_batch_window_ms: Option<u64>,
    /// Volume operations (file, zvol and other file-descriptor volumes) one connection keeps in
    /// flight at least while its worker's connections to other volumes have some too; beyond this
    /// it keeps as many as those together ask for. Lower favours light tenants' latency over a deep
    /// queue's throughput next to them; 0: no limit [default: 4].
    #[arg(long)]
    disk_share: Option<usize>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter) [default: info].
    #[arg(long)]
    log: Option<String>,
    /// Serve the admin API over gRPC on this address (for a CSI driver or other tools), or `off`.
    /// Needs --admin-token-file and/or the three --admin-tls-* files [default: off].
    #[arg(long)]
    admin_listen: Option<String>,
    /// Bearer token of the gRPC admin API: a file with one word of at least 16 characters, mode
    /// 0600 (calls without `authorization: Bearer <token>` are refused).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// TLS certificate (PEM) of the gRPC admin API.
    #[arg(long)]
    admin_tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of the gRPC admin API.
    #[arg(long)]
    admin_tls_key: Option<PathBuf>,
    /// CA (PEM) that signs the certificates of the admin API's clients; clients without one are
    /// refused.
    #[arg(long)]
    admin_tls_client_ca: Option<PathBuf>,
    /// Take over the connections of the node that listens on this rendezvous socket (set by
    /// `xatastor-target upgrade`, which starts the new binary with it; not for use by hand).
    #[arg(long, value_name = "SOCKET")]
    takeover_from: Option<PathBuf>,
}

/// The TOML configuration file: the same settings as the `serve` flags.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    backend: Option<String>,
    overcommit_ratio: Option<toml::Value>,
    workers: Option<usize>,
    metrics_listen: Option<String>,
    idle_unload_secs: Option<u64>,
    max_connections_per_peer: Option<usize>,
    poll_window_us: Option<u64>,
    blocking_threads: Option<usize>,
    traffic_based_keep_alive: Option<bool>,
    admin_batch_window_ms: Option<u64>,
    disk_share: Option<usize>,
    log: Option<String>,
    admin_listen: Option<String>,
    admin_token_file: Option<PathBuf>,
    admin_tls_cert: Option<PathBuf>,
    admin_tls_key: Option<PathBuf>,
    admin_tls_client_ca: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a thin volume.
    #[command(after_help = format!("Names: {NAME_RULES}.\nSizes: {}.", xatastor_examples::units::SIZE_HELP))]
    Create {
        /// Name (see below).
        name: String,
        /// Size, e.g. 10GiB, 1.5GiB, 10G (= 10GiB), 10GB (= 10 × 1000³ bytes).
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
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
        /// Let any host connect (can be turned off later with `volume any-host NAME off`).
        #[arg(long)]
        allow_any_host: bool,
        /// Every host must authenticate (DH-HMAC-CHAP) from the start: give hosts secrets with
        /// `volume allow-host … --dhchap-secret-file` (see `volume require-auth`).
        #[arg(long)]
        require_auth: bool,
    },
    /// Create many volumes `<prefix><n>` in one catalog transaction (fleet provisioning): all or
    /// none, also if the node crashes meanwhile.
    #[command(after_help = format!("Names: {NAME_RULES}.\nSizes: {}.", xatastor_examples::units::SIZE_HELP))]
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
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: u64,
        /// Logical block size.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Host NQN allowed to connect to each.
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
        /// Every host must authenticate (DH-HMAC-CHAP) to each from the start.
        #[arg(long)]
        require_auth: bool,
    },
    /// List volumes in name order, a page at a time (the next page: --after the last name shown).
    List {
        /// Only names starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Start after this name.
        #[arg(long)]
        after: Option<String>,
        /// At most this many; 0 lists all.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show a volume: identity, state, size and usage, hosts, authentication (which hosts have a
    /// secret, never the secret), and the `nvme connect` line of each allowed host.
    Show {
        /// Volume name.
        name: String,
    },
    /// Resize a volume (connected hosts see a larger size at once).
    ///
    /// Shrinking destroys the data beyond the new size: it needs --force, and is refused while a
    /// host is connected (disconnect it first).
    #[command(after_help = format!("Sizes: {}.", xatastor_examples::units::SIZE_HELP))]
    Resize {
        /// Volume name.
        name: String,
        /// New size (e.g. 20GiB).
        #[arg(value_parser = parse_size, allow_hyphen_values = true)]
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
    #[command(after_help = format!("Names: {NAME_RULES}.\nSizes: {}.", xatastor_examples::units::SIZE_HELP))]
    Clone {
        /// Source snapshot: VOLUME@SNAPSHOT.
        source: String,
        /// New volume name.
        name: String,
        /// Size: at least the snapshot's, a multiple of the block size [default: the snapshot's].
        #[arg(long, value_parser = parse_size, allow_hyphen_values = true)]
        size: Option<u64>,
        /// Host NQN allowed to connect to the clone.
        #[arg(long = "allow-host")]
        allow_host: Vec<String>,
        /// Every host must authenticate (DH-HMAC-CHAP); a clone requires it anyway when its
        /// origin does. Host secrets are not copied from the origin: give them with `volume
        /// allow-host … --dhchap-secret-file`.
        #[arg(long)]
        require_auth: bool,
    },
    /// Allow a host to connect, optionally with DH-HMAC-CHAP secrets it must prove (again with new
    /// secrets: rotation, connected hosts stay).
    #[command(after_help = ALLOW_HOST_HELP)]
    AllowHost {
        /// Volume name.
        name: String,
        /// Host NQN.
        host: String,
        /// File with the host's secret: one DHHC-1 line (`nvme gen-dhchap-key` output), mode 0600.
        #[arg(long, value_name = "FILE", conflicts_with = "generate_dhchap_secret")]
        dhchap_secret_file: Option<PathBuf>,
        /// File with the controller's secret for bidirectional authentication (mode 0600).
        #[arg(long, value_name = "FILE", requires = "dhchap_secret_file")]
        dhchap_ctrl_secret_file: Option<PathBuf>,
        /// Let the node make the host's secret (like `nvme gen-dhchap-key`) and print it once.
        #[arg(long)]
        generate_dhchap_secret: bool,
        /// With --generate-dhchap-secret: make a controller secret too (bidirectional).
        #[arg(long, requires = "generate_dhchap_secret")]
        bidirectional: bool,
        /// With --generate-dhchap-secret: the key transformation, as `nvme gen-dhchap-key --hmac`:
        /// 0 none, 1 SHA-256, 2 SHA-384, 3 SHA-512.
        #[arg(long, default_value_t = 0, requires = "generate_dhchap_secret",
              value_parser = clap::value_parser!(u8).range(0..=3))]
        hmac: u8,
        /// With --generate-dhchap-secret: key length in bytes, 32, 48 or 64.
        #[arg(long, default_value = "32", requires = "generate_dhchap_secret",
              value_parser = ["32", "48", "64"])]
        key_length: String,
    },
    /// Remove a host's DH-HMAC-CHAP secrets: it stays allowed and connects without authenticating
    /// (unless the volume requires authentication: then it cannot connect). Connected hosts stay.
    RemoveHostSecret {
        /// Volume name.
        name: String,
        /// Host NQN.
        host: String,
    },
    /// Require every host to authenticate (DH-HMAC-CHAP) to the volume (on), or only the hosts
    /// that have a secret (off).
    ///
    /// With it on, a host without a secret cannot connect; hosts already connected stay unless
    /// --disconnect. Give hosts secrets first (`volume allow-host … --dhchap-secret-file`).
    #[command(after_help = "Example:\n  xatastor-target volume require-auth pg on --disconnect")]
    RequireAuth {
        /// Volume name.
        name: String,
        /// on or off.
        #[arg(value_enum)]
        state: OnOff,
        /// Turning it on: also disconnect the hosts that have no secret now.
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
    /// Import the backend's existing volumes and snapshots into the catalog (once, e.g. zvols that
    /// were created before this node managed the dataset). They start with no allowed host.
    Adopt,
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
    #[command(after_help = format!("Snapshot names: {NAME_RULES}."))]
    Create {
        /// VOLUME@SNAPSHOT, one or more.
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// List a volume's snapshots, or every volume's.
    List {
        /// Volume name [default: all volumes].
        volume: Option<String>,
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

impl ServeArgs {
    /// Whether any serve option was given.
    fn any(&self) -> bool {
        let Self {
            config,
            listen,
            advertise,
            backend,
            rebind_backend,
            overcommit_ratio,
            workers,
            metrics_listen,
            idle_unload_secs,
            max_connections_per_peer,
            poll_window_us,
            blocking_threads,
            traffic_based_keep_alive,
            admin_batch_window_ms,
            disk_share,
            log,
            admin_listen,
            admin_token_file,
            admin_tls_cert,
            admin_tls_key,
            admin_tls_client_ca,
            takeover_from,
        } = self;
        config.is_some()
            || listen.is_some()
            || advertise.is_some()
            || backend.is_some()
            || *rebind_backend
            || overcommit_ratio.is_some()
            || workers.is_some()
            || metrics_listen.is_some()
            || idle_unload_secs.is_some()
            || max_connections_per_peer.is_some()
            || poll_window_us.is_some()
            || blocking_threads.is_some()
            || *traffic_based_keep_alive
            || admin_batch_window_ms.is_some()
            || disk_share.is_some()
            || log.is_some()
            || admin_listen.is_some()
            || admin_token_file.is_some()
            || admin_tls_cert.is_some()
            || admin_tls_key.is_some()
            || admin_tls_client_ca.is_some()
            || takeover_from.is_some()
    }
}

/// Descriptors the node needs besides its connections (catalog, listeners, rings, devices, logs).
const RESERVED_FDS: u64 = 64;

/// The allocator: mimalloc. The I/O path allocates a buffer per read (4 KiB up to the largest
/// transfer): glibc's malloc serves those outside its per-thread cache and gives freed memory back
/// to the kernel eagerly (a 128 KiB read page-faulted its buffer in every time). Measured with
/// mimalloc instead (benches/spdk-compare.sh): 4 KiB random reads +21%, 128 KiB reads ×2.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let data_dir = cli.data_dir.clone();
    let result = match cli.cmd {
        Some(_) if cli.serve.any() => {
            Err("serve options (--listen, --backend, …) go after `serve`, or without a subcommand".into())
        }
        None | Some(Cmd::Serve(_)) if cli.json => {
            Err("--json is for the admin subcommands (volume, snapshot, status); serve logs text".into())
        }
        None => serve(data_dir, cli.serve),
        Some(Cmd::Serve(args)) => serve(data_dir, *args),
        Some(Cmd::Volume(c)) => client(data_dir, cli.json, volume_request(c)),
        Some(Cmd::Snapshot(c)) => client(data_dir, cli.json, snapshot_request(c)),
        Some(Cmd::Status) => client(data_dir, cli.json, Ok(Request::Status)),
        Some(Cmd::Upgrade { binary }) => client(
            data_dir,
            cli.json,
            binary
                .map(|b| std::path::absolute(&b).map_err(|e| format!("{}: {e}", b.display())))
                .transpose()
                .map(|binary| Request::Upgrade { binary: binary.map(|b| b.to_string_lossy().into_owned()) }),
        ),
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
        VolumeCmd::Create {
            name,
            size,
            block_size,
            compression,
            allow_host,
            allow_any_host,
            require_auth,
        } => Request::VolumeCreate {
            name,
            size_bytes: size,
            block_size,
            compression,
            allowed_hosts: allow_host,
            allow_any_host,
            require_auth,
        },
        VolumeCmd::CreateBatch { prefix, count, start, size, block_size, allow_host, require_auth } => {
            Request::VolumeCreateBatch {
                prefix,
                start,
                count,
                size_bytes: size,
                block_size,
                allowed_hosts: allow_host,
                require_auth,
            }
        }
        VolumeCmd::List { prefix, after, limit } => Request::VolumeList { prefix, after, limit },
        VolumeCmd::Show { name } => Request::VolumeShow { name },
        VolumeCmd::Resize { name, size, force } => Request::VolumeResize { name, size_bytes: size, force },
        VolumeCmd::Delete { name, force } => Request::VolumeDelete { name, force },
        VolumeCmd::Clone { source, name, size, allow_host, require_auth } => {
            let (volume, snapshot) = split_snapshot(&source)?;
            if size == Some(0) {
                return Err(
                    "--size 0: a clone needs at least its snapshot's size (leave --size out for that)".into(),
                );
            }
            Request::VolumeClone {
                volume,
                snapshot,
                name,
                size_bytes: size.unwrap_or(0),
                allowed_hosts: allow_host,
                require_auth,
            }
        }
        VolumeCmd::AllowHost {
            name,
            host,
            dhchap_secret_file,
            dhchap_ctrl_secret_file,
            generate_dhchap_secret,
            bidirectional,
            hmac,
            key_length,
        } => {
            if generate_dhchap_secret {
                Request::VolumeGenerateHostSecret {
                    name,
                    host,
                    hmac,
                    key_length_bytes: key_length.parse().map_err(|_| format!("--key-length {key_length}"))?,
                    bidirectional,
                }
            } else {
                Request::VolumeAllowHost {
                    name,
                    host,
                    dhchap_secret: dhchap_secret_file.as_deref().map(read_secret_file).transpose()?,
                    dhchap_ctrl_secret: dhchap_ctrl_secret_file
                        .as_deref()
                        .map(read_secret_file)
                        .transpose()?,
                }
            }
        }
        VolumeCmd::RemoveHostSecret { name, host } => Request::VolumeRemoveHostSecret { name, host },
        VolumeCmd::RequireAuth { name, state, disconnect } => {
            Request::VolumeSetRequireAuth { name, require_auth: state == OnOff::On, disconnect }
        }
        VolumeCmd::DenyHost { name, host, disconnect } => Request::VolumeDenyHost { name, host, disconnect },
        VolumeCmd::AnyHost { name, state, disconnect } => {
            Request::VolumeSetAnyHost { name, allow_any_host: state == OnOff::On, disconnect }
        }
        VolumeCmd::Adopt => Request::Adopt,
    })
}

/// Reads a DH-HMAC-CHAP secret file: one DHHC-1 line (blank lines and `#` comments are skipped).
/// Like ssh with a private key, a file that others may read or write is refused. Messages name the
/// file, never its contents.
fn read_secret_file(path: &Path) -> Result<SecretText, String> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let mut file = std::fs::File::open(path).map_err(|e| format!("secret file {shown}: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("secret file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("secret file {shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "secret file {shown} has mode {mode:04o}: it is accessible by others; a secret file must be \
             readable by its owner only (chmod 600 {shown})"
        ));
    }
    let mut text = zeroize::Zeroizing::new(String::new());
    (&mut file)
        .take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("secret file {shown}: {e}"))?;
    if text.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!("secret file {shown} is larger than {MAX_SECRET_FILE_BYTES} bytes"));
    }
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err(format!("secret file {shown}: expected one DHHC-1 line (as nvme gen-dhchap-key prints)"));
    };
    nvmeof_target::auth::DhchapSecret::parse(line).map_err(|e| format!("secret file {shown}: {e}"))?;
    Ok(SecretText::new(line))
}

fn snapshot_request(c: SnapshotCmd) -> Result<Request, String> {
    Ok(match c {
        SnapshotCmd::Create { snapshots } => Request::SnapshotCreate {
            snapshots: snapshots.iter().map(|s| split_snapshot(s)).collect::<Result<_, _>>()?,
        },
        SnapshotCmd::List { volume } => Request::SnapshotList { volume, name: None, after: None, limit: 0 },
        SnapshotCmd::Delete { snapshot } => {
            let (volume, snapshot) = split_snapshot(&snapshot)?;
            Request::SnapshotDelete { volume, snapshot }
        }
    })
}

/// Writes to stdout; a reader that went away (`| head`) ends the output quietly.
fn emit(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("writing the output: {e}")),
        _ => Ok(()),
    }
}

fn client(data_dir: Option<PathBuf>, json: bool, req: Result<Request, String>) -> Result<(), String> {
    let req = req?;
    let socket = data_dir_or_default(data_dir).join("admin.sock");
    let result = socket::call(&socket, &req).map_err(|e| match &req {
        Request::Upgrade { .. } => format!(
            "upgrade did not happen: {e}\nthe node serves on. To upgrade anyway, restart it (e.g. `systemctl restart \
             xatastor-target`): volumes keep their NVMe identities (NQN, NGUID, UUID, serial), but every host \
             reconnects, after its reconnect delay (10 s by default)"
        ),
        _ => e,
    })?;
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(&result).unwrap_or_default())
    } else {
        human(&req, &result)
    };
    emit(&text)?;
    if let Request::VolumeGenerateHostSecret { .. } = &req {
        eprintln!(
            "xatastor-target: these secrets are shown only now: store them where only the host's \
             administrator can read them (a file of mode 0600), and give them to nvme connect \
             --dhchap-secret (and --dhchap-ctrl-secret)"
        );
    }
    if let Request::VolumeList { limit, .. } = &req {
        let shown = result.as_array().map_or(0, Vec::len);
        if *limit > 0 && shown >= *limit {
            let last = result.as_array().and_then(|a| a.last()).map(|v| s(&v["name"])).unwrap_or_default();
            eprintln!(
                "xatastor-target: {shown} volume(s) shown, there may be more: the next page is \
                 `volume list --after {last}`, all of them `--limit 0`"
            );
        }
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn size_of(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), format_size)
}

fn volume_text(v: &Value) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "volume     {}", s(&v["name"]));
    let _ = writeln!(
        o,
        "size       {} ({} bytes, {}-byte blocks)",
        size_of(&v["size_bytes"]),
        s(&v["size_bytes"]),
        s(&v["block_size"])
    );
    let state = s(&v["state"]);
    if state == "missing" {
        let _ = writeln!(o, "state      missing (in the catalog, not in the backend: hosts cannot connect)");
    } else {
        let _ = writeln!(o, "state      {state}");
    }
    if !v["origin"].is_null() {
        let _ = writeln!(o, "origin     {}", s(&v["origin"]));
    }
    let _ = writeln!(o, "nqn        {}", s(&v["nqn"]));
    let _ = writeln!(o, "nguid      {}", s(&v["nguid"]));
    let _ = writeln!(o, "uuid       {}", s(&v["uuid"]));
    let _ = writeln!(o, "serial     {}", s(&v["serial"]));
    let hosts: Vec<String> =
        v["allowed_hosts"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
    let any = v["allow_any_host"].as_bool() == Some(true);
    let hosts = match (any, hosts.is_empty()) {
        (true, true) => "any".to_owned(),
        (true, false) => format!("any (also listed: {})", hosts.join(", ")),
        (false, true) => "none (use volume allow-host)".to_owned(),
        (false, false) => hosts.join(", "),
    };
    let _ = writeln!(o, "hosts      {hosts}");
    let auth = if v["require_auth"].as_bool() == Some(true) {
        "required (DH-HMAC-CHAP: a host without a secret cannot connect)"
    } else {
        "not required (hosts with a secret must authenticate)"
    };
    let _ = writeln!(o, "auth       {auth}");
    let secrets: Vec<String> = match v["auth_hosts"].as_array() {
        Some(a) => a
            .iter()
            .map(|h| {
                let bidi = if h["bidirectional"].as_bool() == Some(true) { " (bidirectional)" } else { "" };
                format!("{}{bidi}", s(&h["host"]))
            })
            .collect(),
        None => v["dhchap_hosts"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default(),
    };
    if !secrets.is_empty() {
        let _ = writeln!(o, "secrets    {} (never shown)", secrets.join(", "));
    }
    if let Some(used) = v["used_bytes"].as_u64() {
        let _ = writeln!(
            o,
            "used       {} (compression ratio {:.2}); {} not yet backed by the pool",
            format_size(used),
            v["compress_ratio"].as_f64().unwrap_or(1.0),
            size_of(&v["free_bytes"])
        );
    }
    if let Some(share) = v["pool_share"].as_f64() {
        let _ = writeln!(o, "pool share {:.1}% of the pool when full", share * 100.0);
    }
    if !v["active"].is_null() {
        let _ = writeln!(o, "active     {} ({} controller(s))", s(&v["active"]), s(&v["controllers"]));
    }
    if let Some(snaps) = v["snapshots"].as_array().filter(|a| !a.is_empty()) {
        let _ = writeln!(o, "snapshots  {}", snaps.iter().map(s).collect::<Vec<_>>().join(", "));
    }
    match v["connect_lines"].as_array().filter(|a| !a.is_empty()) {
        Some(lines) => {
            for (i, l) in lines.iter().enumerate() {
                let _ = writeln!(o, "{}{}", if i == 0 { "connect    " } else { "           " }, s(l));
            }
        }
        None => {
            let _ = writeln!(o, "connect    {}", s(&v["connect"]));
        }
    }
    o
}

fn human(req: &Request, r: &Value) -> String {
    let mut o = String::new();
    match req {
        Request::VolumeList { .. } => {
            let _ = writeln!(o, "{:<32} {:>10} {:<9} {:<20} HOSTS", "NAME", "SIZE", "STATE", "ORIGIN");
            for v in r.as_array().into_iter().flatten() {
                let hosts = if v["allow_any_host"].as_bool() == Some(true) {
                    "any".to_owned()
                } else {
                    v["allowed_hosts"].as_array().map_or(0, Vec::len).to_string()
                };
                let _ = writeln!(
                    o,
                    "{:<32} {:>10} {:<9} {:<20} {hosts}",
                    s(&v["name"]),
                    size_of(&v["size_bytes"]),
                    s(&v["state"]),
                    s(&v["origin"])
                );
            }
        }
        Request::SnapshotList { .. } | Request::SnapshotCreate { .. } => {
            let _ = writeln!(o, "{:<40} {:>10} STATE", "SNAPSHOT", "SIZE");
            for v in r.as_array().into_iter().flatten() {
                let _ = writeln!(
                    o,
                    "{:<40} {:>10} {}",
                    format!("{}@{}", s(&v["volume"]), s(&v["name"])),
                    size_of(&v["size_bytes"]),
                    s(&v["state"])
                );
            }
        }
        Request::VolumeDelete { .. } | Request::SnapshotDelete { .. } => {
            let _ = writeln!(o, "deleted {}", s(&r["deleted"]));
        }
        Request::VolumeCreateBatch { .. } => {
            let _ = writeln!(o, "created {} volume(s)", s(&r["created"]));
        }
        Request::VolumeGenerateHostSecret { .. } => {
            let _ = writeln!(o, "host               {}", s(&r["host"]));
            let _ = writeln!(o, "dhchap-secret      {}", s(&r["dhchap_secret"]));
            if !r["dhchap_ctrl_secret"].is_null() {
                let _ = writeln!(o, "dhchap-ctrl-secret {}", s(&r["dhchap_ctrl_secret"]));
            }
            let _ = writeln!(o, "connect            {}", s(&r["connect"]));
        }
        Request::Upgrade { .. } => {
            let u = &r["upgraded"];
            let _ = writeln!(
                o,
                "upgraded: pid {} -> {} ({}): {} connection(s) and {} controller(s) handed over, {} closed; \
                 commands paused {:.1} ms (quiesce {:.1} ms), {} held command(s) ran in the new process",
                s(&u["old_pid"]),
                s(&u["new_pid"]),
                s(&u["new_build"]),
                s(&u["connections"]),
                s(&u["controllers"]),
                s(&u["closed"]),
                u["pause_ms"].as_f64().unwrap_or(0.0),
                u["quiesce_ms"].as_f64().unwrap_or(0.0),
                s(&u["held_commands"]),
            );
        }
        Request::Adopt => {
            let names: Vec<String> =
                r["adopted"].as_array().map(|a| a.iter().map(s).collect()).unwrap_or_default();
            let _ = writeln!(
                o,
                "adopted {} volume(s){}{}",
                names.len(),
                if names.is_empty() { "" } else { ": " },
                names.join(", ")
            );
        }
        Request::Status => {
            for k in [
                "listen",
                "advertise",
                "backend",
                "nqn_prefix",
                "volumes_total",
                "volumes_active",
                "controllers",
            ] {
                let _ = writeln!(o, "{k:<15} {}", s(&r[k]));
            }
            let _ = writeln!(o, "{:<15} {}", "catalog", size_of(&r["catalog_bytes"]));
            let _ = writeln!(o, "{:<15} {}", "provisioned", size_of(&r["provisioned_bytes"]));
            if r["pool_bytes"].is_u64() {
                let _ = writeln!(
                    o,
                    "{:<15} {} ({} used, {} available)",
                    "pool",
                    size_of(&r["pool_bytes"]),
                    size_of(&r["pool_used_bytes"]),
                    size_of(&r["pool_available_bytes"])
                );
            }
            let limit =
                r["overcommit_limit"].as_f64().map_or_else(|| "no limit".into(), |l| format!("limit {l}x"));
            match r["overcommit"].as_f64() {
                Some(x) => {
                    let _ = writeln!(o, "{:<15} {x:.2}x ({limit})", "overcommit");
                }
                None => {
                    let _ = writeln!(o, "{:<15} - ({limit})", "overcommit");
                }
            }
        }
        _ => o = volume_text(r),
    }
    o
}

// ---- server ----

fn load_config(args: &ServeArgs) -> Result<FileConfig, String> {
    let Some(path) = &args.config else { return Ok(FileConfig::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `--listen`: an address or HOST:PORT (resolved; the first IPv4 address if there is one).
fn resolve_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("--listen {s:?}: not an address or HOST:PORT that resolves ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("--listen {s:?} resolves to no address"))
}

/// `--overcommit-ratio`: a positive number or `off`.
fn overcommit(v: Option<String>) -> Result<Option<f64>, String> {
    match v.as_deref() {
        None => Ok(Some(DEFAULT_OVERCOMMIT)),
        Some("off") => Ok(None),
        Some(x) => match x.parse::<f64>() {
            Ok(r) if r.is_finite() && r > 0.0 => Ok(Some(r)),
            _ => Err(format!("--overcommit-ratio {x:?}: a positive number (like 20 or 1.5) or off")),
        },
    }
}

/// The `--backend` value of a recorded backend.
fn backend_flag(kind: &str, location: &str) -> String {
    match kind {
        "zvol" => format!("zvol:{location}"),
        other => other.to_owned(),
    }
}

/// The backend recorded in the data directory's catalog, as a `--backend` value (`None` for a new
/// data directory). Reports a catalog held by another node.
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
        "file" => {
            let p = FileProvisioner::new(data_dir)
                .map_err(|e| format!("file backend in {}: {e}", data_dir.display()))?;
            if let Err(e) = p.supports_reflink() {
                let why = match e {
                    ProvisionError::Unsupported(m) => m,
                    other => other.to_string(),
                };
                tracing::warn!("snapshots and clones will be refused: {why}");
                eprintln!("xatastor-target: warning: snapshots and clones will be refused: {why}");
            }
            Ok(Arc::new(p))
        }
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

fn init_logging(filter: &str) -> Result<(), String> {
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("--log {filter:?}: {e}"))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    Ok(())
}

fn serve(data_dir: Option<PathBuf>, args: ServeArgs) -> Result<(), String> {
    let file = load_config(&args)?;
    let data_dir = data_dir_or_default(data_dir.or(file.data_dir));
    let listen = args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:4420".into());
    let listen = resolve_listen(&listen)?;
    let workers = args.workers.or(file.workers).unwrap_or(0);
    let metrics_listen =
        args.metrics_listen.or(file.metrics_listen).unwrap_or_else(|| "127.0.0.1:9464".into());
    let idle = Duration::from_secs(args.idle_unload_secs.or(file.idle_unload_secs).unwrap_or(30));
    let per_peer = args.max_connections_per_peer.or(file.max_connections_per_peer).unwrap_or(16384);
    let poll_window = Duration::from_micros(args.poll_window_us.or(file.poll_window_us).unwrap_or(50));
    let blocking_threads = args.blocking_threads.or(file.blocking_threads).unwrap_or(4).max(1);
    let tbkas = args.traffic_based_keep_alive || file.traffic_based_keep_alive.unwrap_or(false);
    let admin_batch_window = Duration::from_millis(
        args.admin_batch_window_ms.or(file.admin_batch_window_ms).unwrap_or(10).min(1000),
    );
    let ratio = args.overcommit_ratio.or(file.overcommit_ratio.map(|v| match v {
        toml::Value::String(s) => s,
        other => other.to_string(),
    }));
    let overcommit_ratio = overcommit(ratio)?;
    let log = args.log.or(file.log).unwrap_or_else(|| "info".into());
    let admin_listen = match args.admin_listen.or(file.admin_listen).as_deref() {
        None | Some("off") => None,
        Some(a) => {
            Some(resolve_listen(a).map_err(|_| format!("--admin-listen {a:?} is not an address or off"))?)
        }
    };
    let admin_tls = match (
        args.admin_tls_cert.or(file.admin_tls_cert),
        args.admin_tls_key.or(file.admin_tls_key),
        args.admin_tls_client_ca.or(file.admin_tls_client_ca),
    ) {
        (Some(cert), Some(key), Some(client_ca)) => Some(grpc::ServerTls { cert, key, client_ca }),
        (None, None, None) => None,
        _ => {
            return Err(
                "admin TLS needs all three of admin_tls_cert, admin_tls_key, admin_tls_client_ca".into()
            )
        }
    };
    let admin_token_file = args.admin_token_file.or(file.admin_token_file);
    if admin_listen.is_none() && (admin_tls.is_some() || admin_token_file.is_some()) {
        return Err("--admin-token-file and --admin-tls-* are for --admin-listen, which is off".into());
    }
    init_logging(&log)?;
    // Every connection is a file descriptor: take the hard limit (services often start with a soft
    // limit of 1024, which would cap the node at about a thousand connections).
    let limit = match xatastor_core::raise_open_file_limit() {
        Ok((old, new)) => {
            if new > old {
                tracing::info!(from = old, to = new, "raised the open-file limit");
            }
            Some(new)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    };
    // Each connection takes a descriptor: say once when even the raised limit is below what the
    // connection limits let hosts open.
    let effective_workers = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let per_worker = ServerConfig::new(listen).max_connections_per_worker;
    let allowed = (per_worker * effective_workers) as u64;
    if let Some(limit) = limit.filter(|&l| l < allowed + RESERVED_FDS) {
        tracing::warn!(
            "the open-file limit ({limit}) is below what the connection limits allow ({allowed}: \
             {per_worker} per worker x {effective_workers} workers): about {} connections fit, \
             more wait in the listen backlog; raise the hard limit (LimitNOFILE= in the systemd unit)",
            limit.saturating_sub(RESERVED_FDS)
        );
    }
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("installing the signal handlers: {e}"))?;
    // Listening sockets systemd kept for us (its fd store) across a restart: reused, so that no
    // connection was refused while the node was down.
    let mut inherited = systemd::take_listen_fds().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ignoring the descriptors systemd passed");
        Vec::new()
    });
    // The binary and arguments an upgrade starts again (resolved now: a package upgrade replaces
    // the file later).
    let binary = std::env::current_exe().map_err(|e| format!("finding this program's path: {e}"))?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();

    std::fs::create_dir_all(&data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let backend = match args.backend.or(file.backend) {
        Some(b) => b,
        None => recorded_backend(&data_dir)?.unwrap_or_else(|| "file".into()),
    };
    let prov = provisioner(&backend, &data_dir)?;
    // Taking over from a running node: its sockets and state come first (it lets go of the
    // catalog before it sends them).
    let takeover = match &args.takeover_from {
        Some(p) => {
            eprintln!("xatastor-target: taking over from the node at {}", p.display());
            let t = Takeover::connect(p, BUILD, Duration::from_secs(120))
                .map_err(|e| format!("taking over through {}: {e}", p.display()))?;
            #[allow(clippy::disallowed_methods)] // start-up timing for the log
            let received = std::time::Instant::now();
            Some((t, received))
        }
        None => None,
    };
    let mut target_config = TargetConfig::default();
    target_config.traffic_based_keep_alive = tbkas;
    let target = Target::new(target_config);
    let mut node_config = NodeConfig::new(data_dir.join("catalog.redb"));
    node_config.idle_unload = idle;
    node_config.rebind_backend = args.rebind_backend;
    node_config.overcommit_ratio = overcommit_ratio;
    let node = match Node::open(node_config, prov, target.clone()) {
        Ok(n) => n,
        Err(e) => {
            let msg = match e {
                NodeError::BackendMismatch { recorded, given } => format!(
                    "{} holds volumes on {recorded}, not on {given}: start with --backend {} (or add \
                     --rebind-backend if the volumes moved there)",
                    data_dir.display(),
                    backend_flag(&recorded.kind, &recorded.location)
                ),
                NodeError::Catalog(e @ CatalogError::Locked { .. }) => e.to_string(),
                e => format!("opening the catalog: {e}"),
            };
            if let Some((t, _)) = takeover {
                t.refuse(&msg);
            }
            return Err(msg);
        }
    };

    let mut config = ServerConfig::new(listen);
    config.workers = workers;
    config.max_connections_per_peer = per_peer;
    config.poll_window = poll_window;
    config.blocking_threads = blocking_threads;
    config.admin_batch_window = admin_batch_window;
    config.disk_share = args.disk_share.or(file.disk_share).unwrap_or(4);
    let taking_over = takeover.is_some();
    let server = match takeover {
        Some((t, received)) => {
            let opened = received.elapsed();
            let ready = t.import(&target, config.port_id).map_err(|e| format!("taking over: {e}"))?;
            tracing::info!(
                connections = ready.connections(),
                closed = ready.closed(),
                catalog_ms = opened.as_millis() as u64,
                imported_and_go_ms = (received.elapsed() - opened).as_millis() as u64,
                "took over the connections"
            );
            eprintln!(
                "xatastor-target: took over {} connection(s) ({} could not be taken over and were closed)",
                ready.connections(),
                ready.closed()
            );
            ready
                .serve(target, config, || {
                    // The service's main process from now on (before the old one exits).
                    let _ = systemd::notify_main_pid_ready();
                    let _ = systemd::notify_barrier(Duration::from_secs(5));
                })
                .map_err(|e| format!("serving the connections taken over: {e}"))?
        }
        None => {
            let mut kept = Vec::new();
            while let Some((_, l)) = systemd::take_tcp_listener(&mut inherited, listen) {
                kept.push(l);
            }
            if kept.is_empty() {
                Server::start(target, config).map_err(|e| format!("listening on {listen}: {e}"))?
            } else {
                tracing::info!(listeners = kept.len(), "reusing the listening sockets systemd kept");
                Server::start_with_listeners(target, config, kept)
                    .map_err(|e| format!("listening on {listen}: {e}"))?
            }
        }
    };
    drop(inherited);
    let server = Arc::new(server);
    // Kept by systemd (FileDescriptorStoreMax=): a crash-restart finds its port still listening.
    if let Ok(fds) = server.listeners() {
        let fds: Vec<_> = fds.iter().map(std::os::fd::AsFd::as_fd).collect();
        if let Err(e) = systemd::store_fds(LISTEN_FDNAME, &fds) {
            tracing::debug!(error = %e, "systemd's fd store did not take the listening sockets");
        }
    }
    let addr = server.local_addr();
    let advertise = match args.advertise.or(file.advertise) {
        Some(a) => a,
        None if addr.ip().is_unspecified() => {
            tracing::warn!(listen = %addr, "listening on all addresses: set --advertise to the address hosts use");
            "<this node's address: set --advertise>".into()
        }
        None => addr.ip().to_string(),
    };
    let (events, next_event) = std::sync::mpsc::channel::<Event>();
    // The hook reaches the upgrader weakly: the upgrader holds the admin endpoints (and so the
    // hook), and the server must be free to shut down.
    let cell: Arc<std::sync::OnceLock<std::sync::Weak<Upgrader>>> = Arc::default();
    let hook_cell = cell.clone();
    let ep = admin::Endpoint::new(addr, backend.clone()).with_advertise(advertise.clone()).with_upgrade(
        admin::UpgradeHook(Arc::new(move |binary: Option<String>| {
            match hook_cell.get().and_then(std::sync::Weak::upgrade) {
                Some(u) => u.run(binary.as_deref().map(Path::new)),
                None => Err("the node is starting or stopping".into()),
            }
        })),
    );
    let socket_path = data_dir.join("admin.sock");
    let grpc_config = admin_listen.map(|listen| grpc::AdminServerConfig {
        listen,
        token_file: admin_token_file,
        tls: admin_tls,
    });
    let bind_admin = {
        let (node, ep, socket_path, grpc_config) =
            (node.clone(), ep.clone(), socket_path.clone(), grpc_config.clone());
        move || -> Result<(AdminSocket, Option<grpc::AdminServer>), String> {
            // Removes the socket file when dropped, whether the start failed later or it shut down.
            let socket = socket::serve(&socket_path, node.clone(), ep.clone())
                .map_err(|e| format!("admin socket {}: {e}", socket_path.display()))?;
            let grpc = match &grpc_config {
                Some(config) => Some(bind_retrying(|| grpc::serve(config, node.clone(), ep.clone()))?),
                None => None,
            };
            Ok((socket, grpc))
        }
    };
    let (admin_socket, admin_grpc) = match bind_admin() {
        Ok((s, g)) => (Some(s), g),
        // Serving the connections taken over matters more than the admin endpoints: say so and
        // serve on (they come back with a restart or the next upgrade).
        Err(e) if taking_over => {
            tracing::error!(error = %e, "the admin endpoints could not be bound after the takeover; serving without them");
            (None, None)
        }
        Err(e) => return Err(e),
    };
    let admin_socket_path = admin_socket.as_ref().map(|s| s.path().to_owned());
    let grpc_addr = admin_grpc.as_ref().map(grpc::AdminServer::local_addr);
    let shared: xatastor_examples::metrics::SharedServer =
        Arc::new(parking_lot::Mutex::new(Some(server.clone())));
    let metrics = if metrics_listen == "off" {
        None
    } else {
        let a = resolve_listen(&metrics_listen)
            .map_err(|_| format!("--metrics-listen {metrics_listen:?} is not an address or off"))?;
        let (node, shared) = (node.clone(), shared.clone());
        let bind = move || xatastor_examples::metrics::serve(a, node.clone(), shared.clone());
        if taking_over {
            // The old process lets go of the port when it exits, a moment after the go.
            std::thread::spawn(move || {
                if let Err(e) = bind_retrying(|| bind().map_err(|e| format!("metrics on {a}: {e}"))) {
                    tracing::warn!(error = %e, "no metrics endpoint");
                }
            });
            Some(a)
        } else {
            Some(bind().map_err(|e| format!("metrics on {a}: {e}"))?)
        }
    };
    let upgrader = Arc::new(Upgrader::new(
        server.clone(),
        node.clone(),
        data_dir.clone(),
        binary,
        argv,
        admin_socket,
        admin_grpc,
        Box::new(move || match bind_admin() {
            Ok((s, g)) => (Some(s), g),
            Err(e) => {
                tracing::error!(error = %e, "cannot bind the admin endpoints again after a failed upgrade");
                (None, None)
            }
        }),
        Box::new({
            let events = events.clone();
            move |serving| {
                let _ = events.send(Event::HandedOver { serving });
            }
        }),
    ));
    let _ = cell.set(Arc::downgrade(&upgrader));
    if !taking_over {
        let _ = systemd::notify_ready();
    }
    let volumes = node.stats().map(|s| s.volumes_total).unwrap_or(0);
    let me = std::env::args().next().unwrap_or_else(|| "xatastor-target".into());
    let dd = data_dir.display();
    eprintln!("xatastor-target: serving {volumes} volume(s) ({backend} backend, data in {dd}) on {addr}");
    if let Some(p) = &admin_socket_path {
        eprintln!("  admin socket {}", p.display());
    }
    if let Some(g) = grpc_addr {
        eprintln!("  admin gRPC   {g} (authenticated)");
    }
    if let Some(m) = metrics {
        eprintln!("  metrics      http://{m}/metrics");
    }
    if !taking_over {
        eprintln!("create a volume and connect to it from a Linux host:");
        eprintln!(
            "  {me} --data-dir {dd} volume create vol1 --size 10GiB --allow-host \"$(cat /etc/nvme/hostnqn)\""
        );
        eprintln!("  {me} --data-dir {dd} volume show vol1        # prints the nvme connect line");
        eprintln!("  nvme connect -t tcp -a {advertise} -s {} -n {}:vol1", addr.port(), node.nqn_prefix());
    }

    let mut signals = signals;
    std::thread::Builder::new()
        .name("xatastor-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if events.send(Event::Signal(sig)).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    let sig = loop {
        match next_event.recv() {
            Ok(Event::Signal(SIGHUP)) => {
                eprintln!("xatastor-target: SIGHUP: upgrading to {}", upgrader.binary().display());
                let u = upgrader.clone();
                std::thread::spawn(move || {
                    if let Err(e) = u.run(None) {
                        eprintln!("xatastor-target: upgrade did not happen: {e}");
                    }
                });
            }
            Ok(Event::Signal(sig)) => break sig,
            Ok(Event::HandedOver { serving }) => {
                // The answer to the upgrade request is being written: give it a moment, then go
                // without closing anything (the new process has the connections).
                std::thread::sleep(Duration::from_millis(200));
                if !serving {
                    // Nobody serves the connections: fail, so that the service manager restarts
                    // the node (hosts reconnect).
                    eprintln!("xatastor-target: handed over, but the new process did not confirm it serves; exiting with a failure");
                    std::process::exit(1);
                }
                eprintln!("xatastor-target: handed over to the new process; exiting");
                std::process::exit(0);
            }
            Err(_) => break SIGTERM,
        }
    };
    let _ = systemd::notify_stopping();
    eprintln!("xatastor-target: signal {sig}: shutting down (finishing I/O, flushing volumes)");
    shared.lock().take();
    upgrader.close_admin();
    drop(cell);
    drop(upgrader);
    // A metrics scrape (or a finished upgrade attempt) may hold the server for a moment.
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

/// What the main thread of `serve` waits for.
enum Event {
    Signal(i32),
    HandedOver { serving: bool },
}

/// The build an upgrade reports.
const BUILD: &str = concat!("xatastor-target ", env!("CARGO_PKG_VERSION"));

/// The name of the listening sockets in systemd's fd store.
const LISTEN_FDNAME: &str = "nvme-listen";

/// Binds with `bind`, retrying for up to 5 s while the address is in use (a node that just handed
/// over still holds it for a moment).
fn bind_retrying<T>(mut bind: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let mut tries = 0;
    loop {
        match bind() {
            Ok(t) => return Ok(t),
            Err(e) if tries < 100 && e.to_lowercase().contains("in use") => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}
