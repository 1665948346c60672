//! One CSI call from the command line (`xatastor-csi call`), the way a container orchestrator
//! makes it: for checking a driver by hand, and for the end-to-end suite, which drives the driver
//! with it. The answer is one JSON object.
//!
//! ```sh
//! xatastor-csi call --endpoint /csi/csi.sock create-volume pvc-1 --size 1073741824 --param compression=lz4
//! xatastor-csi call --endpoint /csi/csi.sock publish node-a/pvc-1 "$(cat /etc/nvme/hostnqn)"
//! ```

// Every CSI error is a gRPC status (the spec defines the codes).
#![allow(clippy::result_large_err, missing_docs)]

use std::collections::HashMap;
use std::path::Path;

use clap::Subcommand;
use serde_json::{json, Value};

use super::pb;

/// One call.
#[derive(Subcommand, Debug)]
pub enum Call {
    /// Identity.Probe and GetPluginInfo.
    Probe,
    /// Node.NodeGetInfo.
    NodeInfo,
    /// Controller.CreateVolume.
    CreateVolume {
        name: String,
        #[arg(long)]
        size: i64,
        /// StorageClass parameter KEY=VALUE (repeat).
        #[arg(long = "param")]
        params: Vec<String>,
        /// Clone this snapshot.
        #[arg(long)]
        from_snapshot: Option<String>,
        /// Clone this volume.
        #[arg(long)]
        from_volume: Option<String>,
        /// A raw block volume (default: a file system).
        #[arg(long)]
        block: bool,
    },
    /// Controller.DeleteVolume.
    DeleteVolume { volume_id: String },
    /// Controller.ControllerPublishVolume.
    Publish {
        volume_id: String,
        node_id: String,
        #[arg(long)]
        block: bool,
    },
    /// Controller.ControllerUnpublishVolume.
    Unpublish { volume_id: String, node_id: String },
    /// Controller.ControllerExpandVolume.
    Expand { volume_id: String, size: i64 },
    /// Controller.CreateSnapshot.
    CreateSnapshot { source_volume_id: String, name: String },
    /// Controller.DeleteSnapshot.
    DeleteSnapshot { snapshot_id: String },
    /// Node.NodeStageVolume (publish and volume context from KEY=VALUE pairs).
    Stage {
        volume_id: String,
        staging_path: String,
        #[arg(long = "context")]
        context: Vec<String>,
        #[arg(long)]
        block: bool,
    },
    /// Node.NodeUnstageVolume.
    Unstage { volume_id: String, staging_path: String },
    /// Node.NodePublishVolume.
    NodePublish {
        volume_id: String,
        staging_path: String,
        target_path: String,
        #[arg(long = "context")]
        context: Vec<String>,
        #[arg(long)]
        block: bool,
        #[arg(long)]
        readonly: bool,
    },
    /// Node.NodeUnpublishVolume.
    NodeUnpublish { volume_id: String, target_path: String },
    /// Node.NodeExpandVolume.
    NodeExpand { volume_id: String, volume_path: String, size: i64 },
    /// Node.NodeGetVolumeStats.
    Stats { volume_id: String, volume_path: String },
}

fn kv(pairs: &[String]) -> Result<HashMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("{p:?} is not KEY=VALUE"))
        })
        .collect()
}

fn capability(block: bool) -> pb::VolumeCapability {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
    pb::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: "xfs".into(), ..Default::default() })
        }),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

pub async fn call(endpoint: &Path, call: Call) -> Result<Value, tonic::Status> {
    let channel = super::unix_channel(endpoint)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("{}: {e}", endpoint.display())))?;
    let mut id = pb::identity_client::IdentityClient::new(channel.clone());
    let mut ctl = pb::controller_client::ControllerClient::new(channel.clone());
    let mut node = pb::node_client::NodeClient::new(channel);
    let bad = |e: String| tonic::Status::invalid_argument(e);
    Ok(match call {
        Call::Probe => {
            let info = id.get_plugin_info(pb::GetPluginInfoRequest {}).await?.into_inner();
            let ready = id.probe(pb::ProbeRequest {}).await?.into_inner().ready;
            json!({"name": info.name, "vendor_version": info.vendor_version, "ready": ready})
        }
        Call::NodeInfo => {
            json!({"node_id": node.node_get_info(pb::NodeGetInfoRequest {}).await?.into_inner().node_id})
        }
        Call::CreateVolume { name, size, params, from_snapshot, from_volume, block } => {
            use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
            let source = match (from_snapshot, from_volume) {
                (Some(s), _) => Some(Type::Snapshot(SnapshotSource { snapshot_id: s })),
                (None, Some(v)) => Some(Type::Volume(VolumeSource { volume_id: v })),
                (None, None) => None,
            };
            let r = pb::CreateVolumeRequest {
                name,
                capacity_range: Some(pb::CapacityRange { required_bytes: size, limit_bytes: 0 }),
                volume_capabilities: vec![capability(block)],
                parameters: kv(&params).map_err(bad)?,
                volume_content_source: source.map(|t| pb::VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            };
            let v = ctl.create_volume(r).await?.into_inner().volume.unwrap_or_default();
            json!({"volume_id": v.volume_id, "capacity_bytes": v.capacity_bytes, "volume_context": v.volume_context})
        }
        Call::DeleteVolume { volume_id } => {
            ctl.delete_volume(pb::DeleteVolumeRequest { volume_id, ..Default::default() }).await?;
            json!({})
        }
        Call::Publish { volume_id, node_id, block } => {
            let r = pb::ControllerPublishVolumeRequest {
                volume_id,
                node_id,
                volume_capability: Some(capability(block)),
                ..Default::default()
            };
            json!({"publish_context": ctl.controller_publish_volume(r).await?.into_inner().publish_context})
        }
        Call::Unpublish { volume_id, node_id } => {
            let r = pb::ControllerUnpublishVolumeRequest { volume_id, node_id, ..Default::default() };
            ctl.controller_unpublish_volume(r).await?;
            json!({})
        }
        Call::Expand { volume_id, size } => {
            let r = pb::ControllerExpandVolumeRequest {
                volume_id,
                capacity_range: Some(pb::CapacityRange { required_bytes: size, limit_bytes: 0 }),
                volume_capability: Some(capability(false)),
                ..Default::default()
            };
            let r = ctl.controller_expand_volume(r).await?.into_inner();
            json!({"capacity_bytes": r.capacity_bytes, "node_expansion_required": r.node_expansion_required})
        }
        Call::CreateSnapshot { source_volume_id, name } => {
            let r = pb::CreateSnapshotRequest { source_volume_id, name, ..Default::default() };
            let s = ctl.create_snapshot(r).await?.into_inner().snapshot.unwrap_or_default();
            json!({"snapshot_id": s.snapshot_id, "size_bytes": s.size_bytes, "ready_to_use": s.ready_to_use})
        }
        Call::DeleteSnapshot { snapshot_id } => {
            ctl.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id, ..Default::default() }).await?;
            json!({})
        }
        Call::Stage { volume_id, staging_path, context, block } => {
            let ctx = kv(&context).map_err(bad)?;
            let r = pb::NodeStageVolumeRequest {
                volume_id,
                publish_context: ctx.clone(),
                staging_target_path: staging_path,
                volume_capability: Some(capability(block)),
                volume_context: ctx,
                ..Default::default()
            };
            node.node_stage_volume(r).await?;
            json!({})
        }
        Call::Unstage { volume_id, staging_path } => {
            node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id,
                staging_target_path: staging_path,
            })
            .await?;
            json!({})
        }
        Call::NodePublish { volume_id, staging_path, target_path, context, block, readonly } => {
            let ctx = kv(&context).map_err(bad)?;
            let r = pb::NodePublishVolumeRequest {
                volume_id,
                publish_context: ctx.clone(),
                staging_target_path: staging_path,
                target_path,
                volume_capability: Some(capability(block)),
                readonly,
                volume_context: ctx,
                ..Default::default()
            };
            node.node_publish_volume(r).await?;
            json!({})
        }
        Call::NodeUnpublish { volume_id, target_path } => {
            node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest { volume_id, target_path }).await?;
            json!({})
        }
        Call::NodeExpand { volume_id, volume_path, size } => {
            let r = pb::NodeExpandVolumeRequest {
                volume_id,
                volume_path,
                capacity_range: Some(pb::CapacityRange { required_bytes: size, limit_bytes: 0 }),
                ..Default::default()
            };
            json!({"capacity_bytes": node.node_expand_volume(r).await?.into_inner().capacity_bytes})
        }
        Call::Stats { volume_id, volume_path } => {
            let r = pb::NodeGetVolumeStatsRequest { volume_id, volume_path, ..Default::default() };
            let s = node.node_get_volume_stats(r).await?.into_inner();
            let usage: Vec<Value> = s
                .usage
                .iter()
                .map(|u| json!({"unit": u.unit, "total": u.total, "used": u.used, "available": u.available}))
                .collect();
            let abnormal = s.volume_condition.map(|c| c.abnormal);
            json!({"usage": usage, "abnormal": abnormal})
        }
    })
}
