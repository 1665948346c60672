//! Host authentication through the admin API ([`admin::handle`] and its JSON wire form): requiring
//! it on create, clone and later; allowing a host with secrets given as DHHC-1 strings (and the
//! error kinds of bad ones); secrets the node generates; rotation; removal; what `volume_show`
//! tells (who has a secret, the connect lines with placeholders, never a secret); the error kinds
//! of a lost or too open secrets file; and `Debug` of requests and responses without secrets.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use nvmeof_target::{Target, TargetConfig};
use xatastor_core::admin::{
    self, AdminError, Endpoint, ErrorKind, GeneratedSecrets, Request, Response, SecretText, VolumeDetail,
    VolumeView,
};
use xatastor_core::provisioners::MemoryProvisioner;
use xatastor_core::{DhchapHash, DhchapSecret, Node, NodeConfig, SecretParams};

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:admin-auth-host";
const OTHER: &str = "nqn.2014-08.org.nvmexpress:uuid:admin-auth-other";
const MIB: u64 = 1 << 20;

struct Fixture {
    tmp: tempfile::TempDir,
    node: Node,
    ep: Endpoint,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let target = Target::new(TargetConfig::default());
        let node = Node::open(
            NodeConfig::new(tmp.path().join("catalog.redb")),
            Arc::new(MemoryProvisioner::new()),
            target,
        )
        .unwrap();
        let ep = Endpoint::new("192.0.2.7:4420".parse().unwrap(), "memory");
        Self { tmp, node, ep }
    }

    fn call(&self, req: Request) -> Result<Response, AdminError> {
        admin::handle(&self.node, &self.ep, req)
    }

    fn err(&self, req: Request) -> AdminError {
        self.call(req).unwrap_err()
    }

    fn volume(&self, req: Request) -> VolumeView {
        match self.call(req).unwrap() {
            Response::Volume(v) => v,
            other => panic!("not a volume: {other:?}"),
        }
    }

    fn show(&self, name: &str) -> VolumeDetail {
        match self.call(Request::VolumeShow { name: name.into() }).unwrap() {
            Response::VolumeDetail(d) => *d,
            other => panic!("not a detail: {other:?}"),
        }
    }

    fn create(&self, name: &str, hosts: &[&str], require_auth: bool) -> VolumeView {
        self.volume(create_req(name, hosts, require_auth))
    }
}

fn create_req(name: &str, hosts: &[&str], require_auth: bool) -> Request {
    let text = serde_json::json!({
        "op": "volume_create",
        "name": name,
        "size_bytes": 4 * MIB,
        "allowed_hosts": hosts,
        "require_auth": require_auth,
    });
    serde_json::from_value(text).unwrap()
}

fn gen(transform: Option<DhchapHash>) -> String {
    Node::generate_secret(SecretParams { key_len_bytes: 32, transform }).unwrap().to_dhhc1().to_string()
}

fn allow(name: &str, host: &str, secret: Option<&str>, ctrl: Option<&str>) -> Request {
    let mut text = serde_json::json!({ "op": "volume_allow_host", "name": name, "host": host });
    if let Some(s) = secret {
        text["dhchap_secret"] = s.into();
    }
    if let Some(c) = ctrl {
        text["dhchap_ctrl_secret"] = c.into();
    }
    serde_json::from_value(text).unwrap()
}

fn generate(name: &str, host: &str, hmac: u8, key_length_bytes: usize, bidirectional: bool) -> Request {
    serde_json::from_value(serde_json::json!({
        "op": "volume_generate_host_secret",
        "name": name,
        "host": host,
        "hmac": hmac,
        "key_length_bytes": key_length_bytes,
        "bidirectional": bidirectional,
    }))
    .unwrap()
}

#[test]
fn require_auth_on_create_and_later_shows_in_the_view_and_the_connect_line() {
    let f = Fixture::new();
    let v = f.create("req", &[HOST], true);
    assert!(v.require_auth);
    assert!(v.dhchap_hosts.is_empty());
    assert!(
        v.connect.ends_with(&format!(" --hostnqn={HOST} --dhchap-secret=<host secret>")),
        "{}",
        v.connect
    );
    assert!(f.node.volume_auth("req").unwrap().require_auth);
    // Idempotent: the same again, and without the requirement (it may have been turned on since).
    assert!(f.create("req", &[HOST], true).require_auth);
    assert!(f.create("req", &[HOST], false).require_auth);

    let plain = f.create("plain", &[HOST], false);
    assert!(!plain.require_auth);
    assert!(!plain.connect.contains("dhchap"), "{}", plain.connect);
    // Asking for a requirement the existing volume lacks: another volume.
    let e = f.err(create_req("plain", &[HOST], true));
    assert_eq!(e.kind, ErrorKind::Exists);
    assert!(e.message.contains("authentication"), "{e}");

    let on = |required: bool| Request::VolumeSetRequireAuth {
        name: "plain".into(),
        require_auth: required,
        disconnect: true,
    };
    let v = f.volume(on(true));
    assert!(v.require_auth);
    assert!(v.connect.contains("--dhchap-secret=<host secret>"));
    assert!(f.show("plain").volume.require_auth);
    assert!(!f.volume(on(false)).require_auth);
    assert!(!f.node.volume_auth("plain").unwrap().require_auth);
    let e =
        f.err(Request::VolumeSetRequireAuth { name: "nope".into(), require_auth: true, disconnect: false });
    assert_eq!(e.kind, ErrorKind::NotFound);

    // A batch, and a clone (asked, or following its origin).
    let batch: Request = serde_json::from_value(serde_json::json!({
        "op": "volume_create_batch", "prefix": "b", "start": 0, "count": 2,
        "size_bytes": MIB, "require_auth": true,
    }))
    .unwrap();
    assert!(matches!(f.call(batch).unwrap(), Response::Created { created: 2 }));
    assert!(f.node.volume_auth("b1").unwrap().require_auth);
    f.call(Request::SnapshotCreate { snapshots: vec![("plain".into(), "s".into())] }).unwrap();
    let clone = |name: &str, require_auth: bool| {
        serde_json::from_value::<Request>(serde_json::json!({
            "op": "volume_clone", "volume": "plain", "snapshot": "s", "name": name,
            "require_auth": require_auth,
        }))
        .unwrap()
    };
    assert!(!f.volume(clone("c0", false)).require_auth);
    assert!(f.volume(clone("c1", true)).require_auth);
    assert!(f.volume(clone("c1", true)).require_auth, "idempotent");
    assert_eq!(f.err(clone("c0", true)).kind, ErrorKind::Exists);
}

#[test]
fn allow_host_with_secrets_rotation_and_removal() {
    let f = Fixture::new();
    f.create("v", &[], false);
    let s1 = gen(Some(DhchapHash::Sha256));
    let v = f.volume(allow("v", HOST, Some(&s1), None));
    assert_eq!(v.allowed_hosts, [HOST]);
    assert_eq!(v.dhchap_hosts, [HOST]);
    assert!(v.connect.ends_with("--dhchap-secret=<host secret>"), "{}", v.connect);
    let auth = f.node.volume_auth("v").unwrap();
    assert!(auth.host(HOST).is_some_and(|h| !h.controller_secret));
    // The stored secret is the one given.
    let file = std::fs::read_to_string(f.node.secrets_dir().join("v.dhchap")).unwrap();
    assert!(file.contains(&s1));

    // Rotation: the same call with new secrets, bidirectional now.
    let (s2, c2) = (gen(None), gen(Some(DhchapHash::Sha512)));
    let v = f.volume(allow("v", HOST, Some(&s2), Some(&c2)));
    assert_eq!(v.allowed_hosts, [HOST], "allowed once");
    let file = std::fs::read_to_string(f.node.secrets_dir().join("v.dhchap")).unwrap();
    assert!(file.contains(&s2) && file.contains(&c2) && !file.contains(&s1));
    let d = f.show("v");
    assert_eq!(d.auth_hosts.len(), 1);
    assert!(d.auth_hosts[0].bidirectional);
    assert!(
        d.volume.connect.ends_with(&format!(
            "--hostnqn={HOST} --dhchap-secret=<host secret> --dhchap-ctrl-secret=<controller secret>"
        )),
        "{}",
        d.volume.connect
    );
    assert_eq!(d.connect_lines.len(), 1);
    assert_eq!(d.connect_lines[0], d.volume.connect);

    // A second host without secret: its connect line has none (the volume does not require it).
    f.volume(allow("v", OTHER, None, None));
    let d = f.show("v");
    assert_eq!(d.connect_lines.len(), 2);
    let other_line = d.connect_lines.iter().find(|l| l.contains(OTHER)).unwrap();
    assert!(!other_line.contains("dhchap"), "{other_line}");

    // Nothing shown or serialized holds a secret.
    let shown =
        serde_json::to_string(&admin::response_json(&f.call(Request::VolumeShow { name: "v".into() })))
            .unwrap();
    for secret in [&s1, &s2, &c2] {
        assert!(!shown.contains(secret.as_str()));
        assert!(!shown.contains(&secret[10..40]));
    }

    // Removal: the host stays allowed, without a secret; a second removal finds nothing.
    let rm = || Request::VolumeRemoveHostSecret { name: "v".into(), host: HOST.into() };
    let v = f.volume(rm());
    assert!(v.dhchap_hosts.is_empty());
    assert!(v.allowed_hosts.contains(&HOST.to_owned()));
    assert!(f.node.volume_auth("v").unwrap().hosts.is_empty());
    let e = f.err(rm());
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.contains(HOST), "{e}");
    let e = f.err(Request::VolumeRemoveHostSecret { name: "nope".into(), host: HOST.into() });
    assert_eq!(e.kind, ErrorKind::NotFound);
}

#[test]
fn bad_secrets_are_invalid_and_never_echoed() {
    let f = Fixture::new();
    f.create("v", &[], false);
    let good = gen(None);
    // A DHHC-1 string with one character changed: the CRC no longer matches.
    let mut typo = good.clone().into_bytes();
    typo[12] = if typo[12] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).unwrap();
    let cases: [(Request, &str, &str); 6] = [
        (allow("v", HOST, Some("not-a-secret-at-all"), None), "dhchap_secret", "not-a-secret-at-all"),
        (allow("v", HOST, Some(&typo), None), "CRC", &typo),
        (allow("v", HOST, Some("DHHC-1:07:AAAA:"), None), "transformation", "AAAA"),
        (allow("v", HOST, Some(&good), Some("DHHC-1:00:c2hvcnQ=:")), "dhchap_ctrl_secret", "c2hvcnQ="),
        (allow("v", HOST, None, Some(&good)), "needs a host secret", &good),
        (allow("v", HOST, Some(&good), Some(&good)), "must differ", &good),
    ];
    for (req, says, secret) in cases {
        let e = f.err(req);
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains(says), "{e}");
        assert!(!e.message.contains(secret), "the message shows the secret: {e}");
    }
    // Nothing was stored or allowed by the refused calls.
    assert!(f.node.volume_auth("v").unwrap().hosts.is_empty());
    assert!(f.show("v").volume.allowed_hosts.is_empty());
    // A bad host NQN, a missing volume.
    assert_eq!(f.err(allow("v", "not-an-nqn", Some(&good), None)).kind, ErrorKind::Invalid);
    assert_eq!(f.err(allow("nope", HOST, Some(&good), None)).kind, ErrorKind::NotFound);
    // Wrong type in the JSON: the request does not parse (the socket answers `invalid`).
    let bad = serde_json::from_value::<Request>(
        serde_json::json!({"op": "volume_allow_host", "name": "v", "host": HOST, "dhchap_secret": 5}),
    );
    assert!(bad.is_err());
}

#[test]
fn generated_secrets_are_returned_once_and_work_as_given() {
    let f = Fixture::new();
    f.create("g", &[], true);
    let Response::GeneratedSecrets(g) = f.call(generate("g", HOST, 2, 48, true)).unwrap() else {
        panic!("not generated secrets")
    };
    let GeneratedSecrets { host, dhchap_secret, dhchap_ctrl_secret, connect, volume } = *g;
    assert_eq!(host, HOST);
    assert!(
        connect.ends_with(&format!(
            "--hostnqn={HOST} --dhchap-secret=<host secret> --dhchap-ctrl-secret=<controller secret>"
        )),
        "{connect}"
    );
    let h = DhchapSecret::parse(dhchap_secret.expose()).unwrap();
    assert_eq!((h.key_len(), h.transform()), (48, Some(DhchapHash::Sha384)));
    assert!(dhchap_secret.expose().starts_with("DHHC-1:02:"));
    let c = DhchapSecret::parse(dhchap_ctrl_secret.as_ref().unwrap().expose()).unwrap();
    assert_eq!(c.key_len(), 48);
    assert_ne!(dhchap_secret, *dhchap_ctrl_secret.as_ref().unwrap());
    assert_eq!(volume.allowed_hosts, [HOST], "the host is allowed");
    assert_eq!(volume.dhchap_hosts, [HOST]);
    let file = std::fs::read_to_string(f.node.secrets_dir().join("g.dhchap")).unwrap();
    assert!(file.contains(dhchap_secret.expose()));
    assert!(file.contains(dhchap_ctrl_secret.as_ref().unwrap().expose()));
    // The wire form carries them (this once); `Debug` does not.
    let r = f.call(generate("g", OTHER, 0, 32, false)).unwrap();
    let wire = admin::response_json(&Ok(r.clone()));
    let s = wire["result"]["dhchap_secret"].as_str().unwrap().to_owned();
    assert!(s.starts_with("DHHC-1:00:"));
    assert_eq!(DhchapSecret::parse(&s).unwrap().key_len(), 32);
    assert!(wire["result"]["dhchap_ctrl_secret"].is_null());
    let connect = wire["result"]["connect"].as_str().unwrap();
    assert!(connect.ends_with(&format!("--hostnqn={OTHER} --dhchap-secret=<host secret>")), "{connect}");
    let debug = format!("{r:?}");
    assert!(!debug.contains(&s) && !debug.contains(&s[10..40]), "{debug}");
    assert!(debug.contains("<redacted>"));
    // Generating again replaces them (rotation).
    let Response::GeneratedSecrets(again) = f.call(generate("g", OTHER, 0, 32, false)).unwrap() else {
        panic!()
    };
    assert_ne!(again.dhchap_secret.expose(), s);
    let file = std::fs::read_to_string(f.node.secrets_dir().join("g.dhchap")).unwrap();
    assert!(!file.contains(&s) && file.contains(again.dhchap_secret.expose()));

    for (req, says) in [
        (generate("g", HOST, 4, 32, false), "hmac 4"),
        (generate("g", HOST, 1, 33, false), "key length 33"),
        (generate("g", "bad host", 1, 32, false), "host"),
    ] {
        let e = f.err(req);
        assert_eq!(e.kind, ErrorKind::Invalid, "{e}");
        assert!(e.message.contains(says), "{e}");
    }
    assert_eq!(f.err(generate("nope", HOST, 1, 32, false)).kind, ErrorKind::NotFound);
    // Defaults: hmac 0, 32 bytes, one secret.
    let r: Request = serde_json::from_value(
        serde_json::json!({"op": "volume_generate_host_secret", "name": "g", "host": HOST}),
    )
    .unwrap();
    let Response::GeneratedSecrets(d) = f.call(r).unwrap() else { panic!() };
    assert!(d.dhchap_secret.expose().starts_with("DHHC-1:00:"));
    assert!(d.dhchap_ctrl_secret.is_none());
    assert!(!f.show("g").auth_hosts.iter().find(|h| h.host == HOST).unwrap().bidirectional);
}

#[test]
fn requests_print_no_secret_in_debug_and_round_trip_on_the_wire() {
    let s = gen(None);
    let c = gen(Some(DhchapHash::Sha256));
    let req = Request::VolumeAllowHost {
        name: "v".into(),
        host: HOST.into(),
        dhchap_secret: Some(SecretText::new(s.clone())),
        dhchap_ctrl_secret: Some(SecretText::new(c.clone())),
    };
    let debug = format!("{req:?}");
    for secret in [&s, &c] {
        assert!(!debug.contains(secret.as_str()) && !debug.contains(&secret[10..40]), "{debug}");
    }
    let line = serde_json::to_string(&req).unwrap();
    assert!(line.contains(&s) && line.contains(&c));
    assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);
    assert_eq!(req.op(), "volume_allow_host");
    // Without secrets the fields are left out (an older node reads the request as before).
    let plain = Request::VolumeAllowHost {
        name: "v".into(),
        host: HOST.into(),
        dhchap_secret: None,
        dhchap_ctrl_secret: None,
    };
    assert!(!serde_json::to_string(&plain).unwrap().contains("dhchap"));
}

#[test]
fn a_lost_secrets_file_is_not_ready_and_a_too_open_one_names_the_chmod() {
    let f = Fixture::new();
    f.create("v", &[], false);
    f.volume(allow("v", HOST, Some(&gen(None)), None));
    let file = f.node.secrets_dir().join("v.dhchap");

    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = f.err(Request::VolumeShow { name: "v".into() });
    assert_eq!(e.kind, ErrorKind::Internal, "{e}");
    assert!(e.message.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(f.show("v").auth_hosts.len(), 1);

    std::fs::remove_file(&file).unwrap();
    let e = f.err(Request::VolumeShow { name: "v".into() });
    assert_eq!(e.kind, ErrorKind::NotReady, "{e}");
    assert!(e.message.contains(HOST), "{e}");
    // Setting the secret again repairs it.
    f.volume(allow("v", HOST, Some(&gen(None)), None));
    assert_eq!(f.show("v").auth_hosts.len(), 1);
    drop(f.tmp);
}
