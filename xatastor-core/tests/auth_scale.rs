//! What secrets cost with many volumes (a measurement, ignored by default; prints figures, asserts
//! only what must hold whatever the machine):
//!
//! ```text
//! XATASTOR_AUTH_SCALE_VOLUMES=10000 cargo test -p xatastor-core --test auth_scale -- --ignored --nocapture
//! ```
//!
//! - creating volumes with a host secret (one secrets file each, written and fsynced);
//! - start-up with all of them in the catalog: reads no secret (the same as without secrets);
//! - reading every secrets file, which is what loading them all at start would cost;
//! - one file read, which is what a volume's activation adds.

use std::sync::Arc;
use std::time::Instant;

use nvmeof_target::{Target, TargetConfig};
use xatastor_core::provisioners::MemoryProvisioner;
use xatastor_core::secrets::SecretsDir;
use xatastor_core::{CreateVolume, HostSecrets, Node, NodeConfig, SecretParams, VolumeAuthOptions};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:scale-host";

#[test]
#[ignore = "a measurement: run with --ignored --nocapture"]
#[allow(clippy::disallowed_methods)] // wall-clock timing of a measurement
fn secrets_cost_with_many_volumes() {
    let n: usize =
        std::env::var("XATASTOR_AUTH_SCALE_VOLUMES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let tmp = tempfile::tempdir().unwrap();
    let prov = Arc::new(MemoryProvisioner::new());
    let config = || NodeConfig::new(tmp.path().join("catalog.redb"));
    let node = Node::open(config(), prov.clone(), Target::new(TargetConfig::default())).unwrap();
    let mut auth = VolumeAuthOptions::new();
    auth.host_secrets
        .push((HOST.into(), HostSecrets::new(Node::generate_secret(SecretParams::default()).unwrap())));
    let reqs: Vec<CreateVolume> = (0..n)
        .map(|i| {
            let mut c = CreateVolume::new(format!("vol{i:07}"), 1 << 20);
            c.allowed_hosts.push(HOST.into());
            c
        })
        .collect();
    let baseline = {
        let tmp = tempfile::tempdir().unwrap();
        let node = Node::open(
            NodeConfig::new(tmp.path().join("catalog.redb")),
            Arc::new(MemoryProvisioner::new()),
            Target::new(TargetConfig::default()),
        )
        .unwrap();
        let t = Instant::now();
        node.create_volumes(reqs.clone()).unwrap();
        t.elapsed()
    };
    let t = Instant::now();
    node.create_volumes_with_auth(reqs, &auth).unwrap();
    let create = t.elapsed();
    let secrets_dir = node.secrets_dir().to_owned();
    drop(node);

    let t = Instant::now();
    let node = Node::open(config(), prov.clone(), Target::new(TargetConfig::default())).unwrap();
    let open = t.elapsed();
    assert_eq!(node.stats().unwrap().volumes_total, n as u64);
    assert_eq!(node.stats().unwrap().secrets_loaded, 0, "start-up loads no secret");

    let dir = SecretsDir::open(&secrets_dir).unwrap();
    let t = Instant::now();
    for i in 0..n {
        assert_eq!(dir.read(&format!("vol{i:07}")).unwrap().hosts().count(), 1);
    }
    let read_all = t.elapsed();
    println!(
        "{n} volumes with a host secret: batch create {:.2} s ({:.0} µs per volume; without secrets {:.2} s); \
         Node::open {:.1} ms (no secret read); reading every secrets file {:.1} ms ({:.1} µs per file: what \
         an activation adds)",
        create.as_secs_f64(),
        create.as_secs_f64() * 1e6 / n as f64,
        baseline.as_secs_f64(),
        open.as_secs_f64() * 1e3,
        read_all.as_secs_f64() * 1e3,
        read_all.as_secs_f64() * 1e6 / n as f64,
    );
}
