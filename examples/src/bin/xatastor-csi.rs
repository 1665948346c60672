//! `xatastor-csi`: the Kubernetes CSI driver for Xatastor storage nodes.
//!
//! ```sh
//! # the controller plugin (a Deployment, with the CSI sidecars):
//! xatastor-csi controller --endpoint unix:///csi/csi.sock \
//!     --storage-node a=https://10.0.0.7:4430 --storage-node b=https://10.0.0.8:4430 \
//!     --admin-ca /tls/ca.pem --admin-cert /tls/tls.crt --admin-key /tls/tls.key
//! # the node plugin (a DaemonSet, with the node-driver-registrar):
//! xatastor-csi node --endpoint unix:///csi/csi.sock
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use xatastor_examples::csi::{self, controller, node, CsiEndpoint, Services};
use xatastor_examples::grpc::ClientAuth;

/// The Kubernetes CSI driver (csi.xatastor.io) for Xatastor storage nodes: volumes, snapshots,
/// clones and expansion on several nodes, attached with the kernel's NVMe/TCP initiator.
#[derive(Parser, Debug)]
#[command(name = "xatastor-csi", version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// The controller plugin: Identity and Controller services, talking to the storage nodes'
    /// admin API.
    Controller(ControllerArgs),
    /// The node plugin: Identity and Node services (nvme connect, mkfs, mount) on this host.
    Node(NodeArgs),
    /// Make one CSI call to an endpoint, as a container orchestrator does (for checking a
    /// deployment by hand); prints the answer as JSON.
    Call {
        /// The endpoint's Unix socket.
        #[arg(long, default_value = "/csi/csi.sock")]
        endpoint: PathBuf,
        #[command(subcommand)]
        call: csi::call::Call,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// The CSI endpoint: unix:///path/csi.sock (as the sidecars and kubelet use) or tcp://ADDR.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Args, Debug)]
struct ControllerArgs {
    #[command(flatten)]
    common: Common,
    /// A storage node: NAME=URL of its admin API (`https://host:port` with TLS, `http://…`
    /// without). NAME (a-z, 0-9, '-', '.') is part of every volume ID: keep it stable. Repeat for
    /// each node.
    #[arg(long = "storage-node", required = true, value_name = "NAME=URL")]
    storage_nodes: Vec<String>,
    /// Bearer token file for the storage nodes' admin API (mode 0600).
    #[arg(long, env = "XATASTOR_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// CA (PEM) that signed the storage nodes' admin certificates.
    #[arg(long)]
    admin_ca: Option<PathBuf>,
    /// Client certificate (PEM) for the storage nodes' admin API.
    #[arg(long)]
    admin_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    admin_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct NodeArgs {
    #[command(flatten)]
    common: Common,
    /// The host NQN file; its content is the node id the controller allows on volumes.
    #[arg(long, default_value = "/etc/nvme/hostnqn")]
    hostnqn_file: PathBuf,
    /// Where staged volumes are recorded (keep it across restarts of the plugin).
    #[arg(long, default_value = "/var/lib/xatastor-csi")]
    state_dir: PathBuf,
}

/// The plugin this process serves.
enum Plugin {
    Controller(ControllerArgs),
    Node(NodeArgs),
}

fn init_logging(filter: &str) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("--log {filter:?}: {e}"))?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    Ok(())
}

fn call(endpoint: &std::path::Path, c: csi::call::Call) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    match rt.block_on(csi::call::call(endpoint, c)) {
        Ok(v) => {
            println!("{v}");
            Ok(())
        }
        Err(s) => {
            Err(serde_json::json!({"code": format!("{:?}", s.code()), "message": s.message()}).to_string())
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let plugin = match cli.mode {
        Mode::Call { endpoint, call: c } => return call(&endpoint, c),
        Mode::Controller(a) => Plugin::Controller(a),
        Mode::Node(a) => Plugin::Node(a),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    // The admin clients' connections are tasks of this runtime.
    let _enter = rt.enter();
    let (common, services) = match plugin {
        Plugin::Controller(a) => {
            init_logging(&a.common.log)?;
            let auth = ClientAuth::from_files(
                a.admin_token_file.as_deref(),
                a.admin_ca.as_deref(),
                a.admin_cert.as_deref(),
                a.admin_key.as_deref(),
            )?;
            if auth.token.is_none() && auth.identity.is_none() {
                return Err("the storage nodes' admin API needs credentials: --admin-token-file and/or \
                            --admin-cert/--admin-key"
                    .into());
            }
            let nodes = a
                .storage_nodes
                .iter()
                .map(|s| {
                    let (name, url) =
                        s.split_once('=').ok_or_else(|| format!("--storage-node {s:?}: NAME=URL"))?;
                    controller::StorageNode::new(name, url, &auth)
                })
                .collect::<Result<Vec<_>, String>>()?;
            let c = controller::Controller::new(nodes)?;
            (a.common, Services { controller: Some(c), node: None })
        }
        Plugin::Node(a) => {
            init_logging(&a.common.log)?;
            let config = node::NodeConfig {
                hostnqn_file: a.hostnqn_file,
                state_dir: a.state_dir,
                ..Default::default()
            };
            let n = node::Node::new(config);
            let id = n.host_nqn().map_err(|s| s.message().to_owned())?;
            tracing::info!(node_id = %id, "node plugin");
            (a.common, Services { controller: None, node: Some(n) })
        }
    };
    let endpoint = CsiEndpoint::parse(&common.endpoint)?;
    let mut signals =
        signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
            .map_err(|e| format!("installing the signal handlers: {e}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down");
        }
        let _ = stop.send(());
    });
    tracing::info!(endpoint = %common.endpoint, driver = csi::DRIVER_NAME, "serving");
    rt.block_on(csi::serve(&endpoint, services, async {
        let _ = stopped.await;
    }))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xatastor-csi: {e}");
            ExitCode::FAILURE
        }
    }
}
