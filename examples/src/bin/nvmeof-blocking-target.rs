//! `nvmeof-blocking-target`: serves one volume over NVMe/TCP with the blocking driver.
//!
//! ```sh
//! nvmeof-blocking-target --listen 127.0.0.1:4420 --memory 1GiB --allow-any-host
//! nvme discover -t tcp -a 127.0.0.1 -s 4420
//! nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-01.io.xatastor:blocking
//! ```
//!
//! With `--control PATH` (a FIFO) it also reads management commands at run time, one per line:
//!
//! ```sh
//! mkfifo /tmp/ctl
//! nvmeof-blocking-target --memory 1GiB --allow-any-host --control /tmp/ctl &
//! echo "resize 2GiB" > /tmp/ctl     # stderr: control: ok resize ...
//! echo "controllers" > /tmp/ctl     # stderr: control: ok controllers ...
//! ```
//!
//! In-band authentication (DH-HMAC-CHAP): give each `--host` a secret (a DHHC-1 string as
//! `nvme gen-dhchap-key` prints it, or a file holding one), optionally a controller secret for
//! bidirectional authentication, and `--require-auth` to refuse hosts without one:
//!
//! ```sh
//! nvme gen-dhchap-key -n nqn.2014-08.org.nvmexpress:uuid:1234 > host.key; chmod 600 host.key
//! nvmeof-blocking-target --memory 1GiB --host nqn.2014-08.org.nvmexpress:uuid:1234 \
//!     --dhchap-secret host.key --require-auth
//! nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-01.io.xatastor:blocking \
//!     --hostnqn nqn.2014-08.org.nvmexpress:uuid:1234 --dhchap-secret "$(cat host.key)"
//! echo "dhchap-secret nqn.2014-08.org.nvmexpress:uuid:1234 new.key" > /tmp/ctl   # rotate
//! ```

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, ValueEnum};
use nvmeof_target::auth::{AuthConfig, DhGroup, DhchapHash, DhchapSecret, HostSecrets, MemoryHostKeys};
use nvmeof_target::{
    BlockBackend, FileBackend, HostAccess, MemoryBackend, NamespaceConfig, SubsystemConfig, Target,
    TargetConfig,
};
use xatastor_examples::units::parse_size;

/// Which driver serves the connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Driver {
    /// One thread per connection, blocking sockets.
    Blocking,
    /// xatastor-core's thread-per-core io_uring server.
    IoUring,
}

/// Serve one volume over NVMe/TCP (for tests and evaluation).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Driver: the blocking thread-per-connection one, or the io_uring server.
    #[arg(long, value_enum, default_value_t = Driver::Blocking)]
    driver: Driver,
    /// Worker threads of the io_uring server (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
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
    /// Every host must authenticate (DH-HMAC-CHAP); a host without a secret cannot connect.
    /// Without this only hosts given a secret must authenticate.
    #[arg(long)]
    require_auth: bool,
    /// DH-HMAC-CHAP secret of the `--host` hosts: a DHHC-1 string (`DHHC-1:00:…:`, as `nvme
    /// gen-dhchap-key` prints it) or a file holding one. The hosts must then authenticate with it.
    #[arg(long, value_name = "SECRET|FILE", requires = "hosts")]
    dhchap_secret: Option<String>,
    /// Controller secret for bidirectional authentication (the host's `--dhchap-ctrl-secret`): a
    /// DHHC-1 string or a file holding one.
    #[arg(long, value_name = "SECRET|FILE", requires = "dhchap_secret")]
    dhchap_ctrl_secret: Option<String>,
    /// Hash functions the target accepts for DH-HMAC-CHAP, most preferred first (comma-separated:
    /// `sha256`, `sha384`, `sha512`); the first one the host offers is used. Default:
    /// `sha512,sha384,sha256`.
    #[arg(long, value_name = "HASH,...", value_delimiter = ',', value_parser = parse_hash)]
    dhchap_hashes: Vec<DhchapHash>,
    /// Diffie-Hellman groups the target accepts for DH-HMAC-CHAP, most preferred first
    /// (comma-separated: `null`, `ffdhe2048`, `ffdhe3072`, `ffdhe4096`, `ffdhe6144`, `ffdhe8192`);
    /// the first one the host offers is used. Leave `null` out to refuse authentication without a
    /// DH exchange. Default: `ffdhe3072,ffdhe4096,ffdhe6144,ffdhe8192,ffdhe2048,null`.
    #[arg(long, value_name = "GROUP,...", value_delimiter = ',', value_parser = parse_dhgroup)]
    dhchap_dhgroups: Vec<DhGroup>,
    /// Log filter (tracing-subscriber syntax), e.g. `info`, `nvmeof_target=debug`.
    #[arg(long, default_value = "info")]
    log: String,
    /// Read run-time commands, one per line, from this FIFO (make it with `mkfifo` first).
    ///
    /// Commands: `resize SIZE` resizes namespace 1 (e.g. `resize 1GiB`; connected hosts get a
    /// Namespace Attribute Changed event and see the new size without reconnecting); `controllers`
    /// lists the live controllers; `dhchap-secret HOSTNQN SECRET|FILE [CTRL_SECRET|FILE]` sets or
    /// replaces a host's secrets (used from its next authentication on: connected hosts stay);
    /// `dhchap-remove HOSTNQN` drops them; `require-auth on|off`. Each command prints one line to stderr, `control: ok ...` or
    /// `control: error ...`. The target keeps the FIFO open, so writers may come and go
    /// (e.g. `echo "resize 2GiB" > PATH`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
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
            // A block device (a zvol, a disk): O_DIRECT, BLKDISCARD for deallocate (so thin devices
            // get their space back), size re-read on resize.
            None if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) => Arc::new(
                zvol_backend::ZvolBackend::open(path, args.block_size)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
            ),
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
    let mut auth = AuthConfig::default();
    if !args.dhchap_hashes.is_empty() {
        auth.hashes = args.dhchap_hashes.clone();
    }
    if !args.dhchap_dhgroups.is_empty() {
        auth.dh_groups = args.dhchap_dhgroups.clone();
    }
    let mut config = TargetConfig::default();
    config.auth = auth;
    let target = Target::new(config);
    let mut sc = SubsystemConfig::new(args.nqn.clone(), args.serial.clone());
    sc.allowed_hosts = args.hosts.clone();
    if args.allow_any_host {
        sc.access = HostAccess::AllowAny;
    }
    sc.require_auth = args.require_auth;
    target.add_subsystem(sc)?;
    let keys = Arc::new(MemoryHostKeys::new());
    if let Some(host_secret) = &args.dhchap_secret {
        let host = load_secret(host_secret).map_err(|e| format!("--dhchap-secret: {e}"))?;
        let mut secrets = HostSecrets::new(host);
        if let Some(c) = &args.dhchap_ctrl_secret {
            secrets =
                secrets.with_controller(load_secret(c).map_err(|e| format!("--dhchap-ctrl-secret: {e}"))?);
        }
        for h in &args.hosts {
            keys.set(&args.nqn, h, secrets.clone());
        }
    }
    target.set_host_keys(keys.clone());
    target.add_namespace(&args.nqn, NamespaceConfig::derived(&args.nqn, 1, backend.clone()))?;
    if let Some(path) = &args.control {
        spawn_control(path, target.clone(), args.nqn.clone(), keys.clone())?;
    }
    let (addr, serve): (SocketAddr, Box<dyn FnOnce() -> std::io::Result<()>>) = match args.driver {
        Driver::Blocking => {
            let listener = TcpListener::bind(args.listen)
                .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
            let addr = listener.local_addr()?;
            let target = target.clone();
            (addr, Box::new(move || xatastor_examples::blocking::serve(listener, target, 1)))
        }
        Driver::IoUring => {
            let mut config = xatastor_core::ServerConfig::new(args.listen);
            config.workers = args.workers;
            let server = xatastor_core::Server::start(target.clone(), config)
                .map_err(|e| format!("cannot start the io_uring server on {}: {e}", args.listen))?;
            let addr = server.local_addr();
            (
                addr,
                Box::new(move || loop {
                    // The workers serve until the process is killed.
                    let _ = &server;
                    std::thread::park();
                }),
            )
        }
    };
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
    if args.dhchap_secret.is_some() || args.require_auth {
        eprintln!(
            "  authentication: {}; connect with --hostnqn <host> --dhchap-secret <host secret>{}",
            if args.require_auth { "required of every host" } else { "required of hosts with a secret" },
            if args.dhchap_ctrl_secret.is_some() { " --dhchap-ctrl-secret <controller secret>" } else { "" }
        );
    }
    if args.dhchap_secret.is_some() || args.require_auth || args.control.is_some() {
        let auth = &target.config().auth;
        let hashes: Vec<&str> = auth.hashes.iter().map(|h| h.name()).collect();
        let groups: Vec<&str> = auth.dh_groups.iter().map(|g| g.name()).collect();
        eprintln!(
            "  DH-HMAC-CHAP (most preferred first): hashes {}; DH groups {}",
            hashes.join(","),
            groups.join(",")
        );
    }
    if let Some(path) = &args.control {
        eprintln!("  control: reading commands from {}", path.display());
    }
    serve()?;
    Ok(())
}

/// A DH-HMAC-CHAP hash function by name: `sha256` (also `SHA-256`, `hmac(sha256)`), `sha384`, `sha512`.
fn parse_hash(s: &str) -> Result<DhchapHash, String> {
    let name = s.trim().to_ascii_lowercase().replace('-', "");
    let name = name.strip_prefix("hmac(").and_then(|n| n.strip_suffix(')')).unwrap_or(&name);
    DhchapHash::ALL
        .iter()
        .copied()
        .find(|h| h.name().to_ascii_lowercase().replace('-', "") == name)
        .ok_or_else(|| format!("unknown hash '{s}' (sha256, sha384, sha512)"))
}

/// A DH group by name: `null`, `ffdhe2048` ... `ffdhe8192`.
fn parse_dhgroup(s: &str) -> Result<DhGroup, String> {
    let name = s.trim().to_ascii_lowercase();
    DhGroup::ALL.iter().copied().find(|g| g.name() == name).ok_or_else(|| {
        let known: Vec<&str> = DhGroup::ALL.iter().map(|g| g.name()).collect();
        format!("unknown DH group '{s}' ({})", known.join(", "))
    })
}

/// A DH-HMAC-CHAP secret given as a DHHC-1 string or as a file holding one. A file others may read
/// is used with a warning.
fn load_secret(arg: &str) -> Result<DhchapSecret, String> {
    if arg.trim_start().starts_with("DHHC-1:") {
        return DhchapSecret::parse(arg).map_err(|e| e.to_string());
    }
    let meta = std::fs::metadata(arg)
        .map_err(|e| format!("{arg}: {e} (give a DHHC-1 secret or a file holding one)"))?;
    if std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o077 != 0 {
        eprintln!("warning: {arg} can be read by other users (chmod 600 it)");
    }
    let text = std::fs::read_to_string(arg).map_err(|e| format!("{arg}: {e}"))?;
    DhchapSecret::parse(&text).map_err(|e| format!("{arg}: {e}"))
}

/// Opens the control FIFO and serves its commands on a thread of its own.
fn spawn_control(
    path: &Path,
    target: Target,
    nqn: String,
    keys: Arc<MemoryHostKeys>,
) -> Result<(), Box<dyn std::error::Error>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("--control {}: {e} (create it with mkfifo)", path.display()))?;
    if !meta.file_type().is_fifo() {
        return Err(format!("--control {}: not a FIFO (create it with mkfifo)", path.display()).into());
    }
    // Read and write: opening does not wait for a writer, and the reader never sees end-of-file
    // when a writer closes, so any number of writers can come and go.
    let fifo = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("--control {}: {e}", path.display()))?;
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for line in BufReader::new(fifo).lines() {
            match line {
                Ok(line) => {
                    let line = line.trim();
                    if !line.is_empty() && !line.starts_with('#') {
                        match control_command(&target, &nqn, &keys, line) {
                            Ok(msg) => eprintln!("control: ok {msg}"),
                            Err(msg) => eprintln!("control: error {line:?}: {msg}"),
                        }
                    }
                }
                Err(e) => {
                    eprintln!("control: error reading the control FIFO: {e}; no more commands");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

/// Executes one control command; the text of the `ok` or `error` line (never a secret).
fn control_command(target: &Target, nqn: &str, keys: &MemoryHostKeys, line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["dhchap-secret", host, secret, rest @ ..] if rest.len() <= 1 => {
            let mut secrets = HostSecrets::new(load_secret(secret)?);
            if let [ctrl] = rest {
                secrets = secrets.with_controller(load_secret(ctrl)?);
            }
            keys.set(nqn, host, secrets);
            Ok(format!(
                "dhchap-secret {host}: set{}",
                if rest.is_empty() { "" } else { " with a controller secret" }
            ))
        }
        ["dhchap-remove", host] => {
            if keys.remove(nqn, host) {
                Ok(format!("dhchap-remove {host}"))
            } else {
                Err(format!("{host} has no secret"))
            }
        }
        ["require-auth", on_off @ ("on" | "off")] => {
            target.set_auth_required(nqn, *on_off == "on").map_err(|e| e.to_string())?;
            Ok(format!("require-auth {on_off}"))
        }
        ["resize", size] => {
            let bytes = parse_size(size)?;
            if bytes == 0 {
                return Err("the size must not be 0".into());
            }
            let ns = target
                .subsystem(nqn)
                .and_then(|s| s.namespace(1))
                .ok_or_else(|| format!("no namespace 1 in {nqn}"))?;
            let old = ns.backend().size_bytes();
            target.resize_namespace(nqn, 1, bytes).map_err(|e| e.to_string())?;
            Ok(format!("resize {nqn} nsid 1: {old} -> {} bytes", ns.backend().size_bytes()))
        }
        ["controllers"] => {
            let list = target.controllers();
            let items: Vec<String> = list
                .iter()
                .map(|c| {
                    format!(
                        "cntlid={} subnqn={} hostnqn={} io_queues={} kato_ms={}",
                        c.cntlid, c.subnqn, c.hostnqn, c.io_queues, c.kato_ms
                    )
                })
                .collect();
            if items.is_empty() {
                Ok("controllers 0".into())
            } else {
                Ok(format!("controllers {}: {}", items.len(), items.join("; ")))
            }
        }
        _ => Err("unknown command (commands: resize SIZE, controllers, dhchap-secret HOSTNQN SECRET|FILE \
                  [CTRL_SECRET|FILE], dhchap-remove HOSTNQN, require-auth on|off)"
            .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_names() {
        for (s, h) in [
            ("sha256", DhchapHash::Sha256),
            ("SHA-384", DhchapHash::Sha384),
            ("hmac(sha512)", DhchapHash::Sha512),
            (" Sha512 ", DhchapHash::Sha512),
        ] {
            assert_eq!(parse_hash(s), Ok(h), "{s}");
        }
        for s in ["", "sha1", "md5", "hmac(sha256", "sha-2"] {
            assert!(parse_hash(s).is_err(), "{s}");
        }
    }

    #[test]
    fn dhgroup_names() {
        for g in DhGroup::ALL {
            assert_eq!(parse_dhgroup(g.name()), Ok(*g));
            assert_eq!(parse_dhgroup(&g.name().to_ascii_uppercase()), Ok(*g));
        }
        for s in ["", "ffdhe1024", "modp2048", "none"] {
            assert!(parse_dhgroup(s).unwrap_err().contains("ffdhe8192"), "{s}");
        }
    }

    #[test]
    fn preference_lists_parse() {
        let args = Args::try_parse_from([
            "nvmeof-blocking-target",
            "--memory",
            "1MiB",
            "--dhchap-hashes",
            "sha384,sha256",
            "--dhchap-dhgroups",
            "ffdhe4096,null",
        ])
        .unwrap();
        assert_eq!(args.dhchap_hashes, [DhchapHash::Sha384, DhchapHash::Sha256]);
        assert_eq!(args.dhchap_dhgroups, [DhGroup::Ffdhe4096, DhGroup::Null]);
        assert!(
            Args::try_parse_from(["nvmeof-blocking-target", "--dhchap-dhgroups", "ffdhe4096,bogus"]).is_err()
        );
    }
}
