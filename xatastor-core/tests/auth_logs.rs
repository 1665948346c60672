//! No secret in any log line or `Debug` output: every log line of the node, the engine and the
//! server is captured at TRACE level (its own test binary, so the subscriber is the process's)
//! while secrets are set, generated, rotated, used, refused, copied to a clone, read from files
//! that are broken or too open, and removed; then no secret may appear in the capture, while the
//! lines that say what happened must.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use nvmeof_target::auth::DhchapSecret;
use nvmeof_target::{Target, TargetConfig};
use xatastor_core::provisioners::MemoryProvisioner;
use xatastor_core::{
    CreateVolume, DhchapHash, HostSecrets, Node, NodeConfig, SecretParams, Server, ServerConfig,
    VolumeAuthOptions,
};

mod common;
use common::{authenticate, connect_admin_only, enable, LogCapture};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:logs-test-host";

/// The parts of a secret that must never be shown: the DHHC-1 string and runs of its base64 key.
fn forbidden(s: &DhchapSecret) -> Vec<String> {
    let text = s.to_dhhc1().to_string();
    let b64 = text.trim_end_matches(':').rsplit(':').next().unwrap().to_owned();
    vec![text, b64[..24].to_owned(), b64[b64.len() - 24..].to_owned()]
}

#[test]
fn no_secret_in_logs_or_debug_output() {
    let capture = LogCapture::install(tracing::Level::TRACE);

    let tmp = tempfile::tempdir().unwrap();
    let target = Target::new(TargetConfig::default());
    let mut config = NodeConfig::new(tmp.path().join("catalog.redb"));
    config.idle_unload = Duration::from_millis(100);
    let node = Node::open(config, Arc::new(MemoryProvisioner::new()), target.clone()).unwrap();
    let mut sc = ServerConfig::new("127.0.0.1:0".parse().unwrap());
    sc.workers = 1;
    let server = Server::start(target, sc).unwrap();
    let addr = server.local_addr();

    let mut secrets: Vec<DhchapSecret> = Vec::new();
    let mut debug = String::new();

    // Created with a secret; generated bidirectional ones; rotated.
    let first = Node::generate_secret(SecretParams::default()).unwrap();
    secrets.push(first.clone());
    let mut auth = VolumeAuthOptions::new();
    auth.require_auth = true;
    auth.host_secrets.push((HOST.into(), HostSecrets::new(first.clone())));
    debug += &format!("{auth:?}");
    let mut req = CreateVolume::new("logvol", 1 << 20);
    req.allowed_hosts.push(HOST.into());
    debug += &format!("{:?}", node.create_volume_with_auth(req, &auth).unwrap());
    let params = SecretParams { key_len_bytes: 64, transform: Some(DhchapHash::Sha512) };
    let generated = node.generate_host_secrets("logvol", HOST, params, true).unwrap();
    debug += &format!("{generated:?}");
    secrets.push(generated.host.clone());
    secrets.push(generated.controller.clone().unwrap());
    let nqn = node.nqn_of("logvol");
    let second = Node::generate_secret(SecretParams::default()).unwrap();
    secrets.push(second.clone());
    node.set_host_secrets("logvol", "nqn.2014-08.org.nvmexpress:uuid:logs-second", HostSecrets::new(second))
        .unwrap();

    // Used (bidirectional), refused (a wrong secret, an old one).
    let (mut admin, _, atr) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(atr);
    authenticate(&mut admin, HOST, &nqn, &generated.host, generated.controller.as_ref(), 1).unwrap();
    enable(&mut admin);
    let (mut bad, _, _) = connect_admin_only(addr, &nqn, HOST, 0).unwrap();
    assert!(authenticate(&mut bad, HOST, &nqn, &first, None, 1).is_err());
    let rotated = Node::generate_secret(SecretParams::default()).unwrap();
    secrets.push(rotated.clone());
    debug +=
        &format!("{:?}", node.set_host_secrets("logvol", HOST, HostSecrets::new(rotated.clone())).unwrap());
    authenticate(&mut admin, HOST, &nqn, &rotated, None, 2).unwrap();
    debug += &format!("{:?}", node.volume("logvol").unwrap());
    debug += &format!("{node:?} {:?}", node.stats().unwrap());

    // Copied to a clone.
    node.snapshot(&[("logvol".into(), "s".into())]).unwrap();
    let mut inherit = VolumeAuthOptions::new();
    inherit.inherit_secrets = true;
    let mut req = CreateVolume::new("logclone", 0);
    req.allowed_hosts.push(HOST.into());
    debug += &format!("{:?}", node.clone_volume_with_auth("logvol", "s", req, &inherit).unwrap());
    drop((admin, bad));

    // Read from a file that is broken (a mistyped secret on a line) or too open, at activation and
    // through the admin calls.
    let file = node.secrets_dir().join("logclone.dhchap");
    let good = std::fs::read_to_string(&file).unwrap();
    let mistyped = good.replacen("DHHC-1:00:", "DHHC-1:00:A", 1);
    std::fs::write(&file, &mistyped).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(connect_admin_only(addr, &node.nqn_of("logclone"), HOST, 0).is_err());
    let e = node.volume_auth("logclone").unwrap_err();
    debug += &format!("{e} {e:?}");
    std::fs::write(&file, &good).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(connect_admin_only(addr, &node.nqn_of("logclone"), HOST, 0).is_err());
    let e = node.set_host_secrets("logclone", HOST, HostSecrets::new(rotated.clone())).unwrap_err();
    debug += &format!("{e} {e:?}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Removed; the volume deleted.
    assert!(node.remove_host_secrets("logvol", HOST).unwrap());
    node.delete_volume("logclone", true).unwrap();
    server.shutdown().unwrap();

    let logs = capture.text();
    for s in &secrets {
        for needle in forbidden(s) {
            assert!(!logs.contains(&needle), "a secret in the logs:\n{logs}");
            assert!(!debug.contains(&needle), "a secret in Debug output:\n{debug}");
        }
    }
    // The capture did see what happened (so the check above means something).
    for line in [
        "host secret set",
        "host secret replaced",
        "host secret removed",
        "host authenticated",
        "authentication failed",
        "connect refused: the volume's secrets are unusable",
        "line 3",
    ] {
        assert!(logs.contains(line), "no {line:?} in the logs:\n{logs}");
    }
    assert!(debug.contains("chmod 600"), "{debug}");
    assert!(debug.contains("redacted"), "Debug of a secret says it is redacted: {debug}");
    assert!(debug.contains(HOST));
    if std::env::var_os("XATASTOR_SHOW_LOGS").is_some() {
        println!("{logs}\n{debug}");
    }
}
