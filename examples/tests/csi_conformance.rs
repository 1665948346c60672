//! CSI conformance over gRPC: the cases `csi-sanity` (kubernetes-csi/csi-test) runs — identity,
//! capabilities, argument checks, idempotency, not-found / already-exists, publish and unpublish,
//! the snapshot lifecycle, clones, expansion, listing with pagination — against `xatastor-csi`'s
//! controller with two storage nodes on loopback (in-process nodes with memory volumes, each with
//! its own token-authenticated admin API), and the Node service's argument checks. The node
//! plugin's real work (nvme connect, mkfs, mount) runs in the e2e VM (`tests/e2e/scenarios/csi.sh`).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use nvmeof_target::{Target, TargetConfig};
use tonic::transport::Channel;
use tonic::Code;
use xatastor_core::admin::Endpoint;
use xatastor_core::provisioners::MemoryProvisioner;
use xatastor_core::{Node, NodeConfig};
use xatastor_examples::csi::controller::{Controller, StorageNode};
use xatastor_examples::csi::pb::controller_client::ControllerClient;
use xatastor_examples::csi::pb::identity_client::IdentityClient;
use xatastor_examples::csi::pb::node_client::NodeClient;
use xatastor_examples::csi::{self, pb, CsiEndpoint, Services};
use xatastor_examples::grpc::{self, AdminServerConfig, ClientAuth};

const TOKEN: &str = "conformance-token-0123456789";
const HOST_A: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000a1";
const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000b2";
const GIB: i64 = 1 << 30;

struct Cluster {
    dir: tempfile::TempDir,
    storage: Vec<(Node, Option<grpc::AdminServer>)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), String>>>,
    identity: IdentityClient<Channel>,
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Cluster {
    /// Two storage nodes `a` and `b` (memory volumes, overcommit limit 20x the machine's memory),
    /// the controller over both, and a node plugin whose host NQN is `HOST_A`.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, TOKEN).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut storage = Vec::new();
        let mut nodes = Vec::new();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            let mut config = NodeConfig::new(d.join("catalog.redb"));
            config.overcommit_ratio = Some(20.0);
            let node =
                Node::open(config, Arc::new(MemoryProvisioner::new()), Target::new(TargetConfig::default()))
                    .unwrap();
            let nvme = format!("127.0.0.{}:4420", i + 1).parse().unwrap();
            let config = AdminServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                token_file: Some(token.clone()),
                tls: None,
            };
            let server = grpc::serve(&config, node.clone(), Endpoint::new(nvme, "memory")).unwrap();
            let auth = ClientAuth { token: Some(TOKEN.into()), ..ClientAuth::default() };
            nodes.push(StorageNode::new(name, &format!("http://{}", server.local_addr()), &auth).unwrap());
            storage.push((node, Some(server)));
        }
        let hostnqn = dir.path().join("hostnqn");
        std::fs::write(&hostnqn, format!("{HOST_A}\n")).unwrap();
        std::fs::create_dir_all(dir.path().join("sys")).unwrap();
        let node_plugin = csi::node::Node::new(csi::node::NodeConfig {
            hostnqn_file: hostnqn,
            state_dir: dir.path().join("state"),
            sysfs: dir.path().join("sys"),
            ..Default::default()
        });
        let sock = dir.path().join("csi.sock");
        let services =
            Services { controller: Some(Controller::new(nodes).unwrap()), node: Some(node_plugin) };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let endpoint = CsiEndpoint::Unix(sock.clone());
        let server = tokio::spawn(async move {
            csi::serve(&endpoint, services, async {
                let _ = stopped.await;
            })
            .await
        });
        let mut tries = 0;
        let channel = loop {
            match csi::unix_channel(&sock).await {
                Ok(c) => break c,
                Err(e) if tries < 200 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => panic!("CSI endpoint: {e}"),
            }
        };
        Self {
            dir,
            storage,
            stop: Some(stop),
            server: Some(server),
            identity: IdentityClient::new(channel.clone()),
            ctl: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        }
    }

    fn storage(&self, name: &str) -> &Node {
        &self.storage[if name == "a" { 0 } else { 1 }].0
    }

    /// Stops storage node `name`'s admin API (the node is unreachable from then on).
    fn take_down(&mut self, name: &str) {
        self.storage[if name == "a" { 0 } else { 1 }].1 = None;
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.server.take() {
            h.await.unwrap().unwrap();
        }
    }
}

fn mount_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn block_cap() -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn cap_with_mode(mode: pb::volume_capability::access_mode::Mode) -> pb::VolumeCapability {
    let mut c = mount_cap();
    c.access_mode = Some(pb::volume_capability::AccessMode { mode: mode as i32 });
    c
}

fn create_req(name: &str, required: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: (required > 0)
            .then_some(pb::CapacityRange { required_bytes: required, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    }
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

impl Cluster {
    async fn create(&mut self, name: &str, required: i64) -> pb::Volume {
        self.ctl.create_volume(create_req(name, required)).await.unwrap().into_inner().volume.unwrap()
    }

    async fn create_err(&mut self, r: pb::CreateVolumeRequest) -> tonic::Status {
        self.ctl.create_volume(r).await.unwrap_err()
    }

    async fn snapshot(&mut self, source: &str, name: &str) -> Result<pb::Snapshot, tonic::Status> {
        let r = pb::CreateSnapshotRequest {
            source_volume_id: source.into(),
            name: name.into(),
            ..Default::default()
        };
        self.ctl.create_snapshot(r).await.map(|r| r.into_inner().snapshot.unwrap())
    }

    async fn publish(
        &mut self,
        volume_id: &str,
        node_id: &str,
    ) -> Result<HashMap<String, String>, tonic::Status> {
        let r = pb::ControllerPublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: node_id.into(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        };
        self.ctl.controller_publish_volume(r).await.map(|r| r.into_inner().publish_context)
    }

    async fn all_volumes(&mut self, max: i32) -> Vec<pb::list_volumes_response::Entry> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .ctl
                .list_volumes(pb::ListVolumesRequest { max_entries: max, starting_token: token.clone() })
                .await
                .unwrap()
                .into_inner();
            if max > 0 {
                assert!(r.entries.len() <= max as usize, "more than max_entries");
            }
            out.extend(r.entries);
            if r.next_token.is_empty() {
                return out;
            }
            token = r.next_token;
        }
    }
}

// ---- Identity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_plugin_info_capabilities_and_probe() {
    let mut c = Cluster::start().await;
    let info = c.identity.get_plugin_info(pb::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, csi::DRIVER_NAME);
    assert!(!info.vendor_version.is_empty());
    let caps =
        c.identity.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    use pb::plugin_capability::{service, volume_expansion, Type};
    let types: Vec<_> = caps.capabilities.iter().filter_map(|c| c.r#type).collect();
    assert!(types.contains(&Type::Service(pb::plugin_capability::Service {
        r#type: service::Type::ControllerService as i32
    })));
    assert!(types.contains(&Type::VolumeExpansion(pb::plugin_capability::VolumeExpansion {
        r#type: volume_expansion::Type::Online as i32
    })));
    let probe = c.identity.probe(pb::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    c.stop().await;
}

// ---- Controller: capabilities, capacity ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_capabilities_and_capacity() {
    let mut c = Cluster::start().await;
    use pb::controller_service_capability::{rpc::Type, Type as Cap};
    let caps = c
        .ctl
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let types: Vec<i32> =
        caps.capabilities.iter().filter_map(|c| c.r#type.map(|Cap::Rpc(r)| r.r#type)).collect();
    for t in [
        Type::CreateDeleteVolume,
        Type::PublishUnpublishVolume,
        Type::ListVolumes,
        Type::GetCapacity,
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::CloneVolume,
        Type::ExpandVolume,
    ] {
        assert!(types.contains(&(t as i32)), "{t:?}");
    }
    let total = c.ctl.get_capacity(pb::GetCapacityRequest::default()).await.unwrap().into_inner();
    let one = c
        .ctl
        .get_capacity(pb::GetCapacityRequest {
            parameters: params(&[("storageNode", "a")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(total.available_capacity > 0 && one.available_capacity > 0);
    assert_eq!(total.available_capacity, 2 * one.available_capacity, "two equal nodes");
    assert_eq!(total.maximum_volume_size, Some(one.available_capacity));
    // Provisioning lowers it.
    c.create("cap-1", GIB).await;
    let after = c.ctl.get_capacity(pb::GetCapacityRequest::default()).await.unwrap().into_inner();
    assert_eq!(after.available_capacity, total.available_capacity - GIB);
    let err = c
        .ctl
        .get_capacity(pb::GetCapacityRequest { parameters: params(&[("bogus", "1")]), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    c.stop().await;
}

// ---- CreateVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_argument_checks() {
    let mut c = Cluster::start().await;
    use pb::volume_capability::access_mode::Mode;
    let no_name = c.create_err(create_req("", GIB)).await;
    assert_eq!(no_name.code(), Code::InvalidArgument, "no name");
    let mut no_caps = create_req("v", GIB);
    no_caps.volume_capabilities.clear();
    assert_eq!(c.create_err(no_caps).await.code(), Code::InvalidArgument, "no capabilities");
    for mode in [Mode::MultiNodeMultiWriter, Mode::MultiNodeReaderOnly, Mode::Unknown] {
        let mut r = create_req("v", GIB);
        r.volume_capabilities = vec![cap_with_mode(mode)];
        assert_eq!(c.create_err(r).await.code(), Code::InvalidArgument, "{mode:?}");
    }
    let mut no_type = create_req("v", GIB);
    no_type.volume_capabilities[0].access_type = None;
    assert_eq!(c.create_err(no_type).await.code(), Code::InvalidArgument, "no access type");
    let mut fs = create_req("v", GIB);
    if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut fs.volume_capabilities[0].access_type {
        m.fs_type = "btrfs".into();
    }
    let e = c.create_err(fs).await;
    assert!(e.code() == Code::InvalidArgument && e.message().contains("btrfs"), "{e:?}");
    let mut bad_param = create_req("v", GIB);
    bad_param.parameters = params(&[("replicas", "3")]);
    assert_eq!(c.create_err(bad_param).await.code(), Code::InvalidArgument);
    let mut bad_bs = create_req("v", GIB);
    bad_bs.parameters = params(&[("blockSize", "1000")]);
    assert_eq!(c.create_err(bad_bs).await.code(), Code::InvalidArgument);
    let mut bad_tmo = create_req("v", GIB);
    bad_tmo.parameters = params(&[("ctrlLossTmo", "0")]);
    assert_eq!(c.create_err(bad_tmo).await.code(), Code::InvalidArgument);
    let mut neg = create_req("v", GIB);
    neg.capacity_range = Some(pb::CapacityRange { required_bytes: -1, limit_bytes: 0 });
    assert_eq!(c.create_err(neg).await.code(), Code::InvalidArgument);
    // Nothing was made by any of them.
    assert!(c.all_volumes(0).await.is_empty());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_sizes_follow_the_capacity_range() {
    let mut c = Cluster::start().await;
    let v = c.create("default-size", 0).await;
    assert_eq!(v.capacity_bytes, GIB, "no capacity range: 1 GiB");
    let v = c.create("some-size", 10 * 1024 * 1024 + 1).await;
    assert!(v.capacity_bytes > 10 * 1024 * 1024 && v.capacity_bytes % 4096 == 0, "{}", v.capacity_bytes);
    let mut exact = create_req("exact", 0);
    exact.capacity_range = Some(pb::CapacityRange { required_bytes: 64 << 20, limit_bytes: 64 << 20 });
    assert_eq!(
        c.ctl.create_volume(exact).await.unwrap().into_inner().volume.unwrap().capacity_bytes,
        64 << 20
    );
    let mut small_limit = create_req("too-small", 0);
    small_limit.capacity_range = Some(pb::CapacityRange { required_bytes: 5000, limit_bytes: 6000 });
    assert_eq!(c.create_err(small_limit).await.code(), Code::OutOfRange);
    let mut bs512 = create_req("bs512", 0);
    bs512.capacity_range = Some(pb::CapacityRange { required_bytes: 5120, limit_bytes: 5120 });
    bs512.parameters = params(&[("blockSize", "512")]);
    assert_eq!(c.ctl.create_volume(bs512).await.unwrap().into_inner().volume.unwrap().capacity_bytes, 5120);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_is_idempotent_by_name() {
    let mut c = Cluster::start().await;
    let first = c.create("pvc-idem", GIB).await;
    let again = c.create("pvc-idem", GIB).await;
    assert_eq!(again.volume_id, first.volume_id, "same name, same capacity: the same volume");
    assert_eq!(again.capacity_bytes, first.capacity_bytes);
    assert_eq!(again.volume_context, first.volume_context);
    // Same name, other capacity: ALREADY_EXISTS.
    let e = c.create_err(create_req("pvc-idem", 2 * GIB)).await;
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // Same name, other parameters: ALREADY_EXISTS.
    let mut other = create_req("pvc-idem", GIB);
    other.parameters = params(&[("blockSize", "512")]);
    assert_eq!(c.create_err(other).await.code(), Code::AlreadyExists);
    assert_eq!(c.all_volumes(0).await.len(), 1, "still one volume");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_names_of_maximum_length_and_any_text() {
    let mut c = Cluster::start().await;
    let long = "a".repeat(128);
    let v = c.create(&long, GIB).await;
    assert!(v.volume_id.ends_with(&long));
    assert_eq!(c.create(&long, GIB).await.volume_id, v.volume_id);
    let odd = "Ünïcode name with spaces";
    let w = c.create(odd, GIB).await;
    assert_ne!(w.volume_id, v.volume_id);
    assert_eq!(c.create(odd, GIB).await.volume_id, w.volume_id, "mapped names are stable");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_by_free_capacity_and_ids_name_the_node() {
    let mut c = Cluster::start().await;
    // Equal nodes: the first; then the other one has more free capacity.
    let v1 = c.create("place-1", GIB).await;
    let v2 = c.create("place-2", GIB).await;
    let node_of = |v: &pb::Volume| v.volume_id.split('/').next().unwrap().to_owned();
    assert_ne!(node_of(&v1), node_of(&v2), "{} {}", v1.volume_id, v2.volume_id);
    let v3 = c.create("place-3", 4 * GIB).await;
    let v4 = c.create("place-4", GIB).await;
    assert_ne!(node_of(&v3), node_of(&v4), "the 4 GiB volume's node has less free now");
    assert_eq!(v1.volume_context.get("storageNode"), Some(&node_of(&v1)));
    // The node really has it.
    assert!(c.storage(&node_of(&v3)).volume("place-3").is_ok());
    // storageNode pins it; an unknown node is a bad argument; nothing fits: RESOURCE_EXHAUSTED.
    let mut pinned = create_req("pinned", GIB);
    pinned.parameters = params(&[("storageNode", "b")]);
    let p = c.ctl.create_volume(pinned).await.unwrap().into_inner().volume.unwrap();
    assert!(p.volume_id.starts_with("b/"));
    let mut unknown = create_req("nowhere", GIB);
    unknown.parameters = params(&[("storageNode", "zz")]);
    assert_eq!(c.create_err(unknown).await.code(), Code::InvalidArgument);
    let huge = c.create_err(create_req("huge", 1 << 58)).await;
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_storage_node_makes_calls_unavailable_not_wrong() {
    let mut c = Cluster::start().await;
    c.create("before", GIB).await;
    c.take_down("b");
    // The name might be on the silent node: the controller does not guess.
    let e = c.create_err(create_req("after", GIB)).await;
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    c.stop().await;
}

// ---- DeleteVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume() {
    let mut c = Cluster::start().await;
    let e = c.ctl.delete_volume(pb::DeleteVolumeRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "no id");
    for id in ["reallyfakevolumeid", "a/nope", "zz/nope", "a/", "a/.x"] {
        c.ctl
            .delete_volume(pb::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() })
            .await
            .unwrap();
    }
    let v = c.create("to-delete", GIB).await;
    c.ctl
        .delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() })
        .await
        .unwrap();
    assert!(c.all_volumes(0).await.is_empty());
    // Idempotent.
    c.ctl
        .delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() })
        .await
        .unwrap();
    let e = c
        .ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    c.stop().await;
}

/// A volume with snapshots is not deleted (they would go with it): FAILED_PRECONDITION until the
/// snapshots are gone, then the delete goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_volume_with_snapshots_fails_until_they_are_gone() {
    let mut c = Cluster::start().await;
    let v = c.create("has-snapshots", GIB).await;
    let s = c.snapshot(&v.volume_id, "snapshot-kept").await.unwrap();
    let del = pb::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() };
    let e = c.ctl.delete_volume(del.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("snapshot-kept"), "{e:?}");
    let node = v.volume_id[..1].to_owned();
    assert_eq!(c.storage(&node).snapshots("has-snapshots").unwrap().len(), 1, "the snapshot is still there");
    c.ctl
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.snapshot_id, ..Default::default() })
        .await
        .unwrap();
    c.ctl.delete_volume(del).await.unwrap();
    assert!(c.all_volumes(0).await.is_empty());
    c.stop().await;
}

// ---- ValidateVolumeCapabilities ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_volume_capabilities() {
    let mut c = Cluster::start().await;
    let v = c.create("validate", GIB).await;
    let req = |id: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    assert_eq!(
        c.ctl.validate_volume_capabilities(req("", vec![mount_cap()])).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.ctl.validate_volume_capabilities(req(&v.volume_id, vec![])).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.ctl.validate_volume_capabilities(req("a/none", vec![mount_cap()])).await.unwrap_err().code(),
        Code::NotFound
    );
    let ok = c
        .ctl
        .validate_volume_capabilities(req(&v.volume_id, vec![mount_cap(), block_cap()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities.len(), 2);
    use pb::volume_capability::access_mode::Mode;
    let no = c
        .ctl
        .validate_volume_capabilities(req(&v.volume_id, vec![cap_with_mode(Mode::MultiNodeMultiWriter)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    c.stop().await;
}

// ---- ListVolumes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_volumes_with_pagination_across_nodes() {
    let mut c = Cluster::start().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(c.create(&format!("list-{i}"), GIB).await.volume_id);
    }
    assert!(ids.iter().any(|i| i.starts_with("a/")) && ids.iter().any(|i| i.starts_with("b/")));
    let mut all: Vec<String> =
        c.all_volumes(0).await.into_iter().map(|e| e.volume.unwrap().volume_id).collect();
    let mut paged: Vec<String> =
        c.all_volumes(2).await.into_iter().map(|e| e.volume.unwrap().volume_id).collect();
    let mut one: Vec<String> =
        c.all_volumes(1).await.into_iter().map(|e| e.volume.unwrap().volume_id).collect();
    ids.sort();
    all.sort();
    paged.sort();
    one.sort();
    assert_eq!(all, ids);
    assert_eq!(paged, ids, "pages of 2: every volume once");
    assert_eq!(one, ids, "pages of 1: every volume once");
    let e = c
        .ctl
        .list_volumes(pb::ListVolumesRequest { max_entries: -1, ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .ctl
        .list_volumes(pb::ListVolumesRequest { starting_token: "garbage".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    // Published nodes are listed.
    c.publish(&ids[0], HOST_A).await.unwrap();
    let listed = c.all_volumes(0).await;
    let e = listed.iter().find(|e| e.volume.as_ref().unwrap().volume_id == ids[0]).unwrap();
    assert_eq!(e.status.as_ref().unwrap().published_node_ids, [HOST_A]);
    c.stop().await;
}

// ---- ControllerPublish / Unpublish ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_publish_and_unpublish() {
    let mut c = Cluster::start().await;
    let v = c.create("pub", GIB).await;
    let base = pb::ControllerPublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        node_id: HOST_A.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    let e = |r: pb::ControllerPublishVolumeRequest| {
        let mut ctl = c.ctl.clone();
        async move { ctl.controller_publish_volume(r).await.unwrap_err().code() }
    };
    assert_eq!(
        e(pb::ControllerPublishVolumeRequest { volume_id: String::new(), ..base.clone() }).await,
        Code::InvalidArgument
    );
    assert_eq!(
        e(pb::ControllerPublishVolumeRequest { node_id: String::new(), ..base.clone() }).await,
        Code::InvalidArgument
    );
    assert_eq!(
        e(pb::ControllerPublishVolumeRequest { volume_capability: None, ..base.clone() }).await,
        Code::InvalidArgument
    );
    assert_eq!(
        e(pb::ControllerPublishVolumeRequest { volume_id: "a/nope".into(), ..base.clone() }).await,
        Code::NotFound
    );
    assert_eq!(
        e(pb::ControllerPublishVolumeRequest { node_id: "some-fake-node-id".into(), ..base.clone() }).await,
        Code::NotFound
    );

    let ctx = c.publish(&v.volume_id, HOST_A).await.unwrap();
    let node = &v.volume_id[..1];
    assert_eq!(
        ctx.get("address").map(String::as_str),
        Some(if node == "a" { "127.0.0.1" } else { "127.0.0.2" })
    );
    assert_eq!(ctx.get("port").map(String::as_str), Some("4420"));
    assert_eq!(ctx.get("nqn"), v.volume_context.get("nqn"));
    assert_eq!(c.publish(&v.volume_id, HOST_A).await.unwrap(), ctx, "idempotent");
    let volume_name = v.volume_id.split('/').nth(1).unwrap();
    assert_eq!(c.storage(node).volume(volume_name).unwrap().record.allowed_hosts, [HOST_A]);
    // A single-node volume cannot be published to a second node.
    assert_eq!(c.publish(&v.volume_id, HOST_B).await.unwrap_err().code(), Code::FailedPrecondition);

    let un = |id: &str, node: &str| pb::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    };
    assert_eq!(
        c.ctl.controller_unpublish_volume(un("", HOST_A)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    c.ctl.controller_unpublish_volume(un("a/nope", HOST_A)).await.unwrap();
    c.ctl.controller_unpublish_volume(un(&v.volume_id, HOST_A)).await.unwrap();
    assert!(c.storage(node).volume(volume_name).unwrap().record.allowed_hosts.is_empty());
    c.ctl.controller_unpublish_volume(un(&v.volume_id, HOST_A)).await.unwrap();
    // Now the other node may have it; unpublishing without a node id removes every node.
    c.publish(&v.volume_id, HOST_B).await.unwrap();
    c.ctl.controller_unpublish_volume(un(&v.volume_id, "")).await.unwrap();
    assert!(c.storage(node).volume(volume_name).unwrap().record.allowed_hosts.is_empty());
    c.stop().await;
}

// ---- Snapshots ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_snapshot_checks_and_idempotency() {
    let mut c = Cluster::start().await;
    let v1 = c.create("snap-src-1", GIB).await;
    let v2 = c.create("snap-src-2", GIB).await;
    assert_eq!(c.snapshot(&v1.volume_id, "").await.unwrap_err().code(), Code::InvalidArgument, "no name");
    assert_eq!(c.snapshot("", "s").await.unwrap_err().code(), Code::InvalidArgument, "no source");
    assert_eq!(c.snapshot("a/nope", "s").await.unwrap_err().code(), Code::NotFound);
    let s = c.snapshot(&v1.volume_id, "snapshot-1").await.unwrap();
    assert!(s.ready_to_use && s.size_bytes == GIB && s.creation_time.is_some());
    assert_eq!(s.source_volume_id, v1.volume_id);
    assert!(
        s.snapshot_id.starts_with(&format!("{}@", v1.volume_id)),
        "on the source's node: {}",
        s.snapshot_id
    );
    let again = c.snapshot(&v1.volume_id, "snapshot-1").await.unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id, "idempotent");
    let e = c.snapshot(&v2.volume_id, "snapshot-1").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "same name, other source: {e:?}");
    let long = c.snapshot(&v1.volume_id, &"s".repeat(128)).await.unwrap();
    assert!(long.ready_to_use);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_snapshots_by_id_source_and_pages() {
    let mut c = Cluster::start().await;
    let v1 = c.create("ls-1", GIB).await;
    let v2 = c.create("ls-2", GIB).await;
    let mut all = Vec::new();
    for (v, n) in [(&v1, "s1"), (&v1, "s2"), (&v2, "s3")] {
        all.push(c.snapshot(&v.volume_id, n).await.unwrap().snapshot_id);
    }
    let list = |r: pb::ListSnapshotsRequest| {
        let mut ctl = c.ctl.clone();
        async move { ctl.list_snapshots(r).await.map(|r| r.into_inner()) }
    };
    let ids = |r: &pb::ListSnapshotsResponse| -> Vec<String> {
        let mut v: Vec<String> =
            r.entries.iter().map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()).collect();
        v.sort();
        v
    };
    all.sort();
    assert_eq!(ids(&list(pb::ListSnapshotsRequest::default()).await.unwrap()), all);
    let one =
        list(pb::ListSnapshotsRequest { snapshot_id: all[0].clone(), ..Default::default() }).await.unwrap();
    assert_eq!(ids(&one), [all[0].clone()]);
    let none =
        list(pb::ListSnapshotsRequest { snapshot_id: "a/x@y".into(), ..Default::default() }).await.unwrap();
    assert!(none.entries.is_empty(), "a snapshot that does not exist: an empty list");
    let by_src =
        list(pb::ListSnapshotsRequest { source_volume_id: v1.volume_id.clone(), ..Default::default() })
            .await
            .unwrap();
    assert_eq!(ids(&by_src).len(), 2);
    let none = list(pb::ListSnapshotsRequest { source_volume_id: "a/nope".into(), ..Default::default() })
        .await
        .unwrap();
    assert!(none.entries.is_empty());
    // Pages of one.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let r = list(pb::ListSnapshotsRequest {
            max_entries: 1,
            starting_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(r.entries.len() <= 1);
        seen.extend(ids(&r));
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    seen.sort();
    assert_eq!(seen, all);
    assert_eq!(
        list(pb::ListSnapshotsRequest { max_entries: -1, ..Default::default() }).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let bad = pb::ListSnapshotsRequest { starting_token: "nope".into(), ..Default::default() };
    assert_eq!(list(bad).await.unwrap_err().code(), Code::Aborted);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_snapshot_and_dependent_clones() {
    let mut c = Cluster::start().await;
    let e = c.ctl.delete_snapshot(pb::DeleteSnapshotRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    c.ctl
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: "a/v@nope".into(), ..Default::default() })
        .await
        .unwrap();
    c.ctl
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: "garbage".into(), ..Default::default() })
        .await
        .unwrap();
    let v = c.create("del-snap", GIB).await;
    let s = c.snapshot(&v.volume_id, "del-s1").await.unwrap();
    let mut clone = create_req("del-clone", 0);
    clone.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: s.snapshot_id.clone(),
        })),
    });
    let cl = c.ctl.create_volume(clone).await.unwrap().into_inner().volume.unwrap();
    let e = c
        .ctl
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "a clone depends on it: {e:?}");
    c.ctl
        .delete_volume(pb::DeleteVolumeRequest { volume_id: cl.volume_id, ..Default::default() })
        .await
        .unwrap();
    c.ctl
        .delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let left = c.ctl.list_snapshots(pb::ListSnapshotsRequest::default()).await.unwrap().into_inner();
    assert!(left.entries.is_empty());
    c.ctl
        .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.snapshot_id, ..Default::default() })
        .await
        .unwrap();
    c.stop().await;
}

// ---- Clones ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_from_a_snapshot() {
    let mut c = Cluster::start().await;
    let v = c.create("origin", GIB).await;
    let node = v.volume_id[..1].to_owned();
    let s = c.snapshot(&v.volume_id, "origin-snap").await.unwrap();
    let from = |name: &str, snap: &str, required: i64, limit: i64| {
        let mut r = create_req(name, 0);
        r.capacity_range = (required > 0 || limit > 0)
            .then_some(pb::CapacityRange { required_bytes: required, limit_bytes: limit });
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource { snapshot_id: snap.into() },
            )),
        });
        r
    };
    let cl = c
        .ctl
        .create_volume(from("restored", &s.snapshot_id, 0, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(cl.volume_id.starts_with(&format!("{node}/")), "on the snapshot's node");
    assert_eq!(cl.capacity_bytes, GIB);
    assert_eq!(cl.content_source, from("x", &s.snapshot_id, 0, 0).volume_content_source);
    let rec = c.storage(&node).volume("restored").unwrap().record;
    assert_eq!(rec.origin, Some(("origin".into(), "origin-snap".into())));
    // Idempotent; larger is allowed; smaller than the snapshot is not.
    let again = c
        .ctl
        .create_volume(from("restored", &s.snapshot_id, 0, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, cl.volume_id);
    let big = c
        .ctl
        .create_volume(from("restored-big", &s.snapshot_id, 2 * GIB, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(big.capacity_bytes, 2 * GIB);
    let e = c.ctl.create_volume(from("restored-small", &s.snapshot_id, 0, GIB / 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    let e = c.ctl.create_volume(from("restored-none", "a/origin@nope", 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c.ctl.create_volume(from("restored-garbage", "garbage", 0, 0)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // The same name from another source: ALREADY_EXISTS.
    let e = c.create_err(create_req("restored", GIB)).await;
    assert_eq!(e.code(), Code::AlreadyExists);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_from_a_volume() {
    let mut c = Cluster::start().await;
    let v = c.create("source-vol", GIB).await;
    let node = v.volume_id[..1].to_owned();
    let from = |name: &str, src: &str| {
        let mut r = create_req(name, 0);
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
                volume_id: src.into(),
            })),
        });
        r
    };
    let cl =
        c.ctl.create_volume(from("cloned-vol", &v.volume_id)).await.unwrap().into_inner().volume.unwrap();
    assert!(cl.volume_id.starts_with(&format!("{node}/")));
    assert_eq!(cl.capacity_bytes, GIB);
    let again =
        c.ctl.create_volume(from("cloned-vol", &v.volume_id)).await.unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, cl.volume_id, "idempotent");
    assert_eq!(c.storage(&node).snapshots("source-vol").unwrap().len(), 1, "one snapshot to clone from");
    assert_eq!(c.ctl.create_volume(from("cloned-none", "a/nope")).await.unwrap_err().code(), Code::NotFound);
    // The clone's snapshot goes with the clone; then the source can go too.
    c.ctl
        .delete_volume(pb::DeleteVolumeRequest { volume_id: cl.volume_id, ..Default::default() })
        .await
        .unwrap();
    assert!(c.storage(&node).snapshots("source-vol").unwrap().is_empty());
    c.ctl
        .delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id, ..Default::default() })
        .await
        .unwrap();
    assert!(c.all_volumes(0).await.is_empty());
    c.stop().await;
}

// ---- Expansion and ControllerGetVolume ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_expand_volume() {
    let mut c = Cluster::start().await;
    let v = c.create("grow", GIB).await;
    let req = |id: &str, required: Option<i64>, cap: Option<pb::VolumeCapability>| {
        pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: required.map(|r| pb::CapacityRange { required_bytes: r, limit_bytes: 0 }),
            volume_capability: cap,
            ..Default::default()
        }
    };
    assert_eq!(
        c.ctl.controller_expand_volume(req("", Some(2 * GIB), None)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.ctl.controller_expand_volume(req(&v.volume_id, None, None)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.ctl.controller_expand_volume(req("a/none", Some(2 * GIB), None)).await.unwrap_err().code(),
        Code::NotFound
    );
    let r = c
        .ctl
        .controller_expand_volume(req(&v.volume_id, Some(2 * GIB), Some(mount_cap())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.capacity_bytes, r.node_expansion_required), (2 * GIB, true));
    let r = c
        .ctl
        .controller_expand_volume(req(&v.volume_id, Some(3 * GIB), Some(block_cap())))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.capacity_bytes, r.node_expansion_required),
        (3 * GIB, false),
        "a raw block volume needs no node step"
    );
    // A retry, or a smaller size: the volume stays as it is.
    let r = c.ctl.controller_expand_volume(req(&v.volume_id, Some(GIB), None)).await.unwrap().into_inner();
    assert_eq!(r.capacity_bytes, 3 * GIB);
    let got = c
        .ctl
        .controller_get_volume(pb::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 3 * GIB);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
    c.stop().await;
}

// ---- Node service (argument checks; the real work runs in the e2e VM) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_info_capabilities_and_argument_checks() {
    let mut c = Cluster::start().await;
    let info = c.node.node_get_info(pb::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, HOST_A, "the node id is the host NQN");
    let caps = c.node.node_get_capabilities(pb::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    use pb::node_service_capability::{rpc::Type, Type as Cap};
    let types: Vec<i32> =
        caps.capabilities.iter().filter_map(|c| c.r#type.map(|Cap::Rpc(r)| r.r#type)).collect();
    for t in [Type::StageUnstageVolume, Type::GetVolumeStats, Type::ExpandVolume] {
        assert!(types.contains(&(t as i32)), "{t:?}");
    }
    let dir = c.dir.path().to_owned();
    let staging = dir.join("staging").to_string_lossy().into_owned();
    let target = dir.join("target").to_string_lossy().into_owned();
    let ctx = HashMap::from([
        ("address".to_owned(), "127.0.0.1".to_owned()),
        ("port".to_owned(), "4420".to_owned()),
        ("nqn".to_owned(), "nqn.x:v".to_owned()),
    ]);
    let stage = pb::NodeStageVolumeRequest {
        volume_id: "a/v".into(),
        publish_context: ctx.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    for (what, r) in [
        ("no volume id", pb::NodeStageVolumeRequest { volume_id: String::new(), ..stage.clone() }),
        (
            "no staging path",
            pb::NodeStageVolumeRequest { staging_target_path: String::new(), ..stage.clone() },
        ),
        ("no capability", pb::NodeStageVolumeRequest { volume_capability: None, ..stage.clone() }),
        (
            "no publish context",
            pb::NodeStageVolumeRequest { publish_context: HashMap::new(), ..stage.clone() },
        ),
        (
            "a multi-node mode",
            pb::NodeStageVolumeRequest {
                volume_capability: Some(cap_with_mode(
                    pb::volume_capability::access_mode::Mode::MultiNodeMultiWriter,
                )),
                ..stage.clone()
            },
        ),
    ] {
        assert_eq!(
            c.node.node_stage_volume(r).await.unwrap_err().code(),
            Code::InvalidArgument,
            "stage: {what}"
        );
    }
    let unstage = |id: &str, path: &str| pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
    };
    assert_eq!(
        c.node.node_unstage_volume(unstage("", &staging)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.node.node_unstage_volume(unstage("a/v", "")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    c.node.node_unstage_volume(unstage("a/never-staged", &staging)).await.unwrap();

    let publish = pb::NodePublishVolumeRequest {
        volume_id: "a/v".into(),
        publish_context: ctx,
        staging_target_path: staging.clone(),
        target_path: target.clone(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    for (what, r) in [
        ("no volume id", pb::NodePublishVolumeRequest { volume_id: String::new(), ..publish.clone() }),
        ("no target path", pb::NodePublishVolumeRequest { target_path: String::new(), ..publish.clone() }),
        ("no capability", pb::NodePublishVolumeRequest { volume_capability: None, ..publish.clone() }),
        (
            "no staging path",
            pb::NodePublishVolumeRequest { staging_target_path: String::new(), ..publish.clone() },
        ),
    ] {
        assert_eq!(
            c.node.node_publish_volume(r).await.unwrap_err().code(),
            Code::InvalidArgument,
            "publish: {what}"
        );
    }
    // Not staged: a failed precondition, not a mount of nothing.
    assert_eq!(c.node.node_publish_volume(publish).await.unwrap_err().code(), Code::FailedPrecondition);
    let unpublish = |id: &str, path: &str| pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: path.into(),
    };
    assert_eq!(
        c.node.node_unpublish_volume(unpublish("", &target)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.node.node_unpublish_volume(unpublish("a/v", "")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    c.node.node_unpublish_volume(unpublish("a/v", &target)).await.unwrap();

    let stats = |id: &str, path: &str| pb::NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(
        c.node.node_get_volume_stats(stats("", &target)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.node.node_get_volume_stats(stats("a/v", "")).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.node.node_get_volume_stats(stats("a/v", "/nonexistent/path")).await.unwrap_err().code(),
        Code::NotFound
    );
    let plain_dir = dir.join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let e = c.node.node_get_volume_stats(stats("a/v", &plain_dir.to_string_lossy())).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "a directory without a volume: {e:?}");

    let expand = |id: &str, path: &str| pb::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        capacity_range: Some(pb::CapacityRange { required_bytes: GIB, limit_bytes: 0 }),
        ..Default::default()
    };
    assert_eq!(
        c.node.node_expand_volume(expand("", &target)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(c.node.node_expand_volume(expand("a/v", "")).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        c.node.node_expand_volume(expand("a/v", "/nonexistent/path")).await.unwrap_err().code(),
        Code::NotFound
    );
    c.stop().await;
}
