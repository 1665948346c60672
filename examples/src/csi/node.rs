//! The CSI Node service: runs on every Kubernetes host and puts a published volume on it with the
//! kernel's NVMe/TCP initiator.
//!
//! ```text
//!   NodeStageVolume    nvme connect -t tcp -a ADDR -s PORT -n NQN (I/O queues, keep-alive,
//!                      ctrl-loss and reconnect settings from the StorageClass); the block device
//!                      is found by its subsystem NQN (/sys/block/nvmeXnY/device/subsysnqn);
//!                      mkfs (xfs, or ext4) only if the device carries no signature; mount on the
//!                      staging path (xfs with nouuid: a clone has its origin's file system UUID)
//!   NodePublishVolume  bind mount of the staging path (or of the block device) on the target path
//!   NodeUnpublish      unmount, remove the target
//!   NodeUnstage        unmount, nvme disconnect
//!   NodeExpandVolume   wait for the device's new size (the target announces it), xfs_growfs / resize2fs
//! ```
//!
//! What a staged volume was connected to is kept in a small file per volume in the state
//! directory, so that unstaging finds the controller to disconnect even for raw block volumes.

// Every CSI error is a gRPC status (the spec defines the codes); these are control-plane calls,
// where the size of the error value does not matter.
#![allow(clippy::result_large_err)]
// The node plugin runs commands and waits for devices on its own clock.
#![allow(clippy::disallowed_methods)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tonic::{Request, Response, Status};

use super::pb;
use super::{check_capability, connect_settings, Access, CTX_ADDRESS, CTX_NQN, CTX_PORT};

/// How the Node service finds things on its host.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The host NQN file (its content is the CSI node id).
    pub hostnqn_file: PathBuf,
    /// Where staged volumes are recorded.
    pub state_dir: PathBuf,
    /// The sysfs mount (block devices and NVMe subsystems are looked up there).
    pub sysfs: PathBuf,
    /// How long to wait for a block device to appear or grow.
    pub device_wait: Duration,
    /// How long one external command (nvme, mkfs, mount, …) may take.
    pub command_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            hostnqn_file: PathBuf::from("/etc/nvme/hostnqn"),
            state_dir: PathBuf::from("/var/lib/xatastor-csi"),
            sysfs: PathBuf::from("/sys"),
            device_wait: Duration::from_secs(30),
            command_timeout: Duration::from_secs(120),
        }
    }
}

/// The Node service.
#[derive(Clone)]
pub struct Node {
    config: Arc<NodeConfig>,
    busy: Arc<Mutex<HashSet<String>>>,
}

struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// What a stage recorded about a volume.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Staged {
    nqn: String,
    staging_target_path: PathBuf,
    block: bool,
}

type Reply<T> = Result<Response<T>, Status>;

impl Node {
    /// The Node service with `config`.
    #[must_use]
    pub fn new(config: NodeConfig) -> Self {
        Self { config: Arc::new(config), busy: Arc::default() }
    }

    fn lock(&self, volume_id: &str) -> Result<Busy, Status> {
        if !self.busy.lock().insert(volume_id.to_owned()) {
            return Err(Status::aborted(format!("an operation on volume {volume_id} is in progress")));
        }
        Ok(Busy { set: self.busy.clone(), key: volume_id.to_owned() })
    }

    /// Runs `f` on a blocking thread with the volume locked.
    async fn blocking<T: Send + 'static>(
        &self,
        volume_id: &str,
        f: impl FnOnce(&NodeConfig) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let busy = self.lock(volume_id)?;
        let config = self.config.clone();
        let r = tokio::task::spawn_blocking(move || {
            let _busy = busy;
            f(&config)
        })
        .await
        .map_err(|e| Status::internal(format!("the node operation's thread failed: {e}")))?;
        r
    }

    /// The host NQN: this node's CSI id.
    pub fn host_nqn(&self) -> Result<String, Status> {
        let text = std::fs::read_to_string(&self.config.hostnqn_file).map_err(|e| {
            Status::failed_precondition(format!(
                "{}: {e} (create it with `nvme gen-hostnqn > {0}`)",
                self.config.hostnqn_file.display()
            ))
        })?;
        let nqn = text.trim();
        if !nqn.starts_with("nqn.") || nqn.len() > 223 {
            return Err(Status::failed_precondition(format!(
                "{} does not hold a host NQN",
                self.config.hostnqn_file.display()
            )));
        }
        Ok(nqn.to_owned())
    }
}

fn state_file(config: &NodeConfig, volume_id: &str) -> PathBuf {
    let safe: String = volume_id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.@".contains(c) { c } else { '_' })
        .collect();
    config.state_dir.join(format!("{safe}.json"))
}

fn read_state(config: &NodeConfig, volume_id: &str) -> Option<Staged> {
    let text = std::fs::read_to_string(state_file(config, volume_id)).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_state(config: &NodeConfig, volume_id: &str, s: &Staged) -> Result<(), Status> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| Status::internal(format!("state directory {}: {e}", config.state_dir.display())))?;
    let path = state_file(config, volume_id);
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(s).map_err(|e| Status::internal(e.to_string()))?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Status::internal(format!("recording the stage in {}: {e}", path.display())))
}

// ---- the host: commands, sysfs, mounts ----

/// Runs a command, bounded by `timeout`; its stderr in the error.
fn run(config: &NodeConfig, program: &str, args: &[&str]) -> Result<String, Status> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Status::failed_precondition(format!("cannot run {program}: {e}")))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < config.command_timeout => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Status::deadline_exceeded(format!(
                    "{program} {} did not finish",
                    args.join(" ")
                )));
            }
            Err(e) => return Err(Status::internal(format!("waiting for {program}: {e}"))),
        }
    }
    let out = child.wait_with_output().map_err(|e| Status::internal(format!("{program}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(Status::internal(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            err.trim().lines().last().unwrap_or("")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The block device (`nvme0n1`) of the first namespace of subsystem `nqn`, if connected.
fn device_of(config: &NodeConfig, nqn: &str) -> Option<String> {
    let dir = std::fs::read_dir(config.sysfs.join("block")).ok()?;
    let mut names: Vec<String> = dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    names.into_iter().find(|name| {
        is_nvme_head(name)
            && std::fs::read_to_string(config.sysfs.join("block").join(name).join("device/subsysnqn"))
                .is_ok_and(|s| s.trim() == nqn)
    })
}

/// `nvme<N>n<M>`: a namespace's block device (not a hidden multipath path `nvmeXcYnZ`).
fn is_nvme_head(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else { return false };
    let Some((a, b)) = rest.split_once('n') else { return false };
    !a.is_empty()
        && !b.is_empty()
        && a.bytes().all(|c| c.is_ascii_digit())
        && b.bytes().all(|c| c.is_ascii_digit())
}

/// Controllers (`nvme0`) connected to subsystem `nqn`.
fn controllers_of(config: &NodeConfig, nqn: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(config.sysfs.join("class/nvme")) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|c| {
            std::fs::read_to_string(config.sysfs.join("class/nvme").join(c).join("subsysnqn"))
                .is_ok_and(|s| s.trim() == nqn)
        })
        .collect()
}

/// The block device (`nvme0n1`) that `path` is: a raw block volume is published as a bind mount
/// of the device node, whose mount source in mountinfo is the devtmpfs, not the device; the
/// device number of the node is what names it (`/sys/dev/block/MAJ:MIN`).
fn block_device_at(config: &NodeConfig, path: &Path) -> Option<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let (major, minor) = (rustix::fs::major(meta.rdev()), rustix::fs::minor(meta.rdev()));
    block_device_by_number(config, major, minor)
}

/// The name of block device `major:minor` from sysfs.
fn block_device_by_number(config: &NodeConfig, major: u32, minor: u32) -> Option<String> {
    let link = std::fs::read_link(config.sysfs.join("dev/block").join(format!("{major}:{minor}"))).ok()?;
    link.file_name()?.to_str().map(str::to_owned)
}

fn device_size(config: &NodeConfig, dev: &str) -> Option<u64> {
    let sectors = std::fs::read_to_string(config.sysfs.join("block").join(dev).join("size")).ok()?;
    sectors.trim().parse::<u64>().ok().map(|s| s * 512)
}

/// How long a stage waits for the namespace of a controller that is already connected before it
/// takes it for a stale one.
const STALE_CONTROLLER_WAIT: Duration = Duration::from_secs(5);

/// One line of /proc/self/mountinfo: mount point, source, file system type, read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    point: PathBuf,
    source: String,
    fs_type: String,
    read_only: bool,
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v =
                u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            out.push(char::from_u32(v).unwrap_or('?'));
            i += 4;
        } else {
            out.push(char::from(b[i]));
            i += 1;
        }
    }
    out
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ').skip(4);
            let point = l.next()?;
            let read_only = l.next()?.split(',').any(|o| o == "ro");
            let mut r = right.split(' ');
            let fs_type = r.next()?;
            let source = r.next()?;
            Some(Mount {
                point: PathBuf::from(unescape(point)),
                source: unescape(source),
                fs_type: fs_type.to_owned(),
                read_only,
            })
        })
        .collect()
}

fn mount_at(path: &Path) -> Option<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text).into_iter().rev().find(|m| m.point == path)
}

fn path_arg(p: &Path) -> Result<&str, Status> {
    p.to_str().ok_or_else(|| Status::invalid_argument(format!("path {} is not UTF-8", p.display())))
}

fn unmount_all(config: &NodeConfig, path: &Path) -> Result<(), Status> {
    while mount_at(path).is_some() {
        run(config, "umount", &[path_arg(path)?])?;
    }
    Ok(())
}

fn require(s: &str, what: &str) -> Result<(), Status> {
    if s.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    Ok(())
}

/// A controller of `nqn` is connected but shows no namespace: waits [`STALE_CONTROLLER_WAIT`] for
/// it (a retried stage whose connect is still coming up), then disconnects it as one left behind
/// after a detach. True when it was disconnected.
fn drop_stale_controller(config: &NodeConfig, volume_id: &str, nqn: &str) -> Result<bool, Status> {
    let start = Instant::now();
    while device_of(config, nqn).is_none() && start.elapsed() < STALE_CONTROLLER_WAIT {
        std::thread::sleep(Duration::from_millis(100));
    }
    if device_of(config, nqn).is_some() {
        return Ok(false);
    }
    tracing::info!(volume = volume_id, %nqn, "a controller of the volume shows no namespace: disconnecting it to connect again");
    run(config, "nvme", &["disconnect", "-n", nqn])?;
    Ok(true)
}

fn stage(
    config: &NodeConfig,
    volume_id: &str,
    r: &pb::NodeStageVolumeRequest,
    access: &Access,
) -> Result<(), Status> {
    let ctx = |k: &str| {
        r.publish_context.get(k).filter(|v| !v.is_empty()).ok_or_else(|| {
            Status::invalid_argument(format!("publish context has no {k:?} (was the volume published?)"))
        })
    };
    let (address, port, nqn) = (ctx(CTX_ADDRESS)?, ctx(CTX_PORT)?, ctx(CTX_NQN)?);
    let settings = connect_settings(&r.volume_context)?;
    let staging = PathBuf::from(&r.staging_target_path);
    let block = *access == Access::Block;
    write_state(
        config,
        volume_id,
        &Staged { nqn: nqn.clone(), staging_target_path: staging.clone(), block },
    )?;

    // Connect unless a controller for the subsystem is there (a retried stage). A controller
    // that shows no namespace for a while is one left connected to a volume it no longer sees
    // (the volume was detached from this host and published again): start over with it.
    let connect = device_of(config, nqn).is_none()
        && (controllers_of(config, nqn).is_empty() || drop_stale_controller(config, volume_id, nqn)?);
    if connect {
        let get = |k: &str| settings.iter().find(|(n, _)| *n == k).map_or(0, |(_, v)| *v).to_string();
        let args = [
            "connect".to_owned(),
            "-t".into(),
            "tcp".into(),
            "-a".into(),
            address.clone(),
            "-s".into(),
            port.clone(),
            "-n".into(),
            nqn.clone(),
            format!("--nr-io-queues={}", get(super::PARAM_NR_IO_QUEUES)),
            format!("--keep-alive-tmo={}", get(super::PARAM_KEEP_ALIVE_TMO)),
            format!("--ctrl-loss-tmo={}", get(super::PARAM_CTRL_LOSS_TMO)),
            format!("--reconnect-delay={}", get(super::PARAM_RECONNECT_DELAY)),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(config, "nvme", &args)?;
    }
    let start = Instant::now();
    let dev = loop {
        if let Some(d) = device_of(config, nqn) {
            break d;
        }
        if start.elapsed() > config.device_wait {
            return Err(Status::deadline_exceeded(format!("no block device appeared for {nqn}")));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let Access::Mount { fs_type, flags } = access else { return Ok(()) };
    let dev_path = format!("/dev/{dev}");
    if let Some(m) = mount_at(&staging) {
        if m.source == dev_path {
            return Ok(()); // staged already
        }
        return Err(Status::failed_precondition(format!(
            "{} has {} mounted, not {dev_path}",
            staging.display(),
            m.source
        )));
    }
    // A file system only on a blank device (blkid -p: exit status 2 when it finds nothing).
    let probe = std::process::Command::new("blkid")
        .args(["-p", "-o", "export", &dev_path])
        .output()
        .map_err(|e| Status::failed_precondition(format!("cannot run blkid: {e}")))?;
    match probe.status.code() {
        Some(2) => {
            tracing::info!(volume = volume_id, device = %dev_path, fs_type, "making a file system on a blank volume");
            match fs_type.as_str() {
                "xfs" => run(config, "mkfs.xfs", &["-K", &dev_path])?,
                _ => run(config, "mkfs.ext4", &["-F", "-E", "nodiscard", &dev_path])?,
            };
        }
        Some(0) => {
            let found = String::from_utf8_lossy(&probe.stdout);
            let kind = found.lines().find_map(|l| l.strip_prefix("TYPE=")).unwrap_or("").to_owned();
            if kind != *fs_type {
                return Err(Status::failed_precondition(format!(
                    "{dev_path} holds {} (not {fs_type}): not formatting it",
                    if kind.is_empty() {
                        "data of an unknown kind".to_owned()
                    } else {
                        format!("a {kind} file system")
                    }
                )));
            }
        }
        _ => {
            return Err(Status::internal(format!(
                "blkid -p {dev_path}: {}",
                String::from_utf8_lossy(&probe.stderr).trim()
            )))
        }
    }
    std::fs::create_dir_all(&staging)
        .map_err(|e| Status::internal(format!("creating {}: {e}", staging.display())))?;
    let mut opts: Vec<String> = flags.clone();
    if fs_type == "xfs" {
        opts.push("nouuid".into());
    }
    let o = opts.join(",");
    let mut args = vec!["-t", fs_type.as_str()];
    if !o.is_empty() {
        args.extend(["-o", o.as_str()]);
    }
    args.extend([dev_path.as_str(), path_arg(&staging)?]);
    run(config, "mount", &args)?;
    tracing::info!(volume = volume_id, device = %dev_path, staging = %staging.display(), "volume staged");
    Ok(())
}

fn unstage(config: &NodeConfig, volume_id: &str, staging: &Path) -> Result<(), Status> {
    let staged = read_state(config, volume_id);
    let mounted = mount_at(staging);
    // The subsystem: recorded at stage, else the one of the device mounted there.
    let nqn = staged.as_ref().map(|s| s.nqn.clone()).or_else(|| {
        let dev = mounted.as_ref()?.source.strip_prefix("/dev/")?.to_owned();
        std::fs::read_to_string(config.sysfs.join("block").join(dev).join("device/subsysnqn"))
            .ok()
            .map(|s| s.trim().to_owned())
    });
    unmount_all(config, staging)?;
    if let Some(nqn) = nqn {
        if !controllers_of(config, &nqn).is_empty() {
            run(config, "nvme", &["disconnect", "-n", &nqn])?;
            tracing::info!(volume = volume_id, %nqn, "volume unstaged: disconnected");
        }
    }
    match std::fs::remove_file(state_file(config, volume_id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Status::internal(format!("removing the stage record: {e}")))
        }
        _ => {}
    }
    Ok(())
}

/// The subsystem of a volume being published: from the publish context, else from the stage record.
fn published_nqn(config: &NodeConfig, volume_id: &str, r: &pb::NodePublishVolumeRequest) -> Option<String> {
    r.publish_context.get(CTX_NQN).cloned().or_else(|| read_state(config, volume_id).map(|s| s.nqn))
}

fn publish(
    config: &NodeConfig,
    volume_id: &str,
    r: &pb::NodePublishVolumeRequest,
    access: &Access,
) -> Result<(), Status> {
    let target = PathBuf::from(&r.target_path);
    if let Some(m) = mount_at(&target) {
        // Published already (a retry) — or something else is there: ALREADY_EXISTS, as the spec
        // says for a target path published with an incompatible source or read-only flag.
        let same_source = match access {
            Access::Block => {
                let want = published_nqn(config, volume_id, r).and_then(|n| device_of(config, &n));
                want.is_some() && block_device_at(config, &target) == want
            }
            Access::Mount { .. } => {
                mount_at(Path::new(&r.staging_target_path)).is_some_and(|staged| staged.source == m.source)
            }
        };
        if same_source && m.read_only == r.readonly {
            return Ok(());
        }
        return Err(Status::already_exists(format!(
            "{} is already a mount of {}{}: not the volume {volume_id} as asked",
            target.display(),
            m.source,
            if m.read_only { " (read-only)" } else { "" }
        )));
    }
    let mut opts = vec!["bind".to_owned()];
    if r.readonly {
        opts.push("ro".into());
    }
    let source = match access {
        Access::Block => {
            let nqn = published_nqn(config, volume_id, r)
                .ok_or_else(|| Status::failed_precondition(format!("volume {volume_id} is not staged")))?;
            let dev = device_of(config, &nqn).ok_or_else(|| {
                Status::failed_precondition(format!("volume {volume_id} has no block device (not staged?)"))
            })?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Status::internal(format!("{}: {e}", parent.display())))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&target)
                .map_err(|e| Status::internal(format!("creating {}: {e}", target.display())))?;
            format!("/dev/{dev}")
        }
        Access::Mount { .. } => {
            let staging = PathBuf::from(&r.staging_target_path);
            if mount_at(&staging).is_none() {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is not staged at {}",
                    staging.display()
                )));
            }
            std::fs::create_dir_all(&target)
                .map_err(|e| Status::internal(format!("{}: {e}", target.display())))?;
            r.staging_target_path.clone()
        }
    };
    run(config, "mount", &["-o", &opts.join(","), &source, path_arg(&target)?])?;
    Ok(())
}

fn unpublish(config: &NodeConfig, target: &Path) -> Result<(), Status> {
    unmount_all(config, target)?;
    let removed = match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed.map_err(|e| Status::internal(format!("removing {}: {e}", target.display())))
}

fn stats(config: &NodeConfig, path: &Path) -> Result<pb::NodeGetVolumeStatsResponse, Status> {
    use pb::volume_usage::Unit;
    let meta = std::fs::metadata(path)
        .map_err(|_| Status::not_found(format!("{} does not exist", path.display())))?;
    let m = mount_at(path)
        .ok_or_else(|| Status::not_found(format!("no volume is published at {}", path.display())))?;
    let condition = |dev: &str| {
        let gone = dev.starts_with("/dev/") && !Path::new(dev).exists();
        pb::VolumeCondition {
            abnormal: gone,
            message: if gone { format!("{dev} is gone (the volume was detached)") } else { String::new() },
        }
    };
    if !meta.is_dir() {
        let Some(dev) = block_device_at(config, path) else {
            let condition = pb::VolumeCondition {
                abnormal: true,
                message: format!(
                    "{} is not a block device any more (the volume was detached)",
                    path.display()
                ),
            };
            return Ok(pb::NodeGetVolumeStatsResponse {
                usage: Vec::new(),
                volume_condition: Some(condition),
            });
        };
        let total = device_size(config, &dev).unwrap_or(0);
        let usage = vec![pb::VolumeUsage {
            available: 0,
            total: total as i64,
            used: total as i64,
            unit: Unit::Bytes as i32,
        }];
        return Ok(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition(&format!("/dev/{dev}"))),
        });
    }
    let st = rustix::fs::statvfs(path)
        .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
    let f = st.f_frsize;
    let i = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
    let usage = vec![
        pb::VolumeUsage {
            available: i(st.f_bavail.saturating_mul(f)),
            total: i(st.f_blocks.saturating_mul(f)),
            used: i(st.f_blocks.saturating_sub(st.f_bfree).saturating_mul(f)),
            unit: Unit::Bytes as i32,
        },
        pb::VolumeUsage {
            available: i(st.f_favail),
            total: i(st.f_files),
            used: i(st.f_files.saturating_sub(st.f_ffree)),
            unit: Unit::Inodes as i32,
        },
    ];
    Ok(pb::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition(&m.source)) })
}

fn expand(config: &NodeConfig, path: &Path, required: u64) -> Result<u64, Status> {
    if !path.exists() {
        return Err(Status::not_found(format!("{} does not exist", path.display())));
    }
    let m = mount_at(path)
        .ok_or_else(|| Status::not_found(format!("no volume is published at {}", path.display())))?;
    let dev = match block_device_at(config, path) {
        Some(dev) => dev,
        None => m.source.strip_prefix("/dev/").unwrap_or(&m.source).to_owned(),
    };
    // The target announces the new size (Namespace Attribute Changed): wait for the host to see it.
    let start = Instant::now();
    let size = loop {
        let size = device_size(config, &dev).unwrap_or(0);
        if size >= required || start.elapsed() > config.device_wait {
            break size;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if size < required {
        return Err(Status::internal(format!("{} still has {size} bytes, not {required}", m.source)));
    }
    match m.fs_type.as_str() {
        "xfs" => {
            run(config, "xfs_growfs", &[path_arg(path)?])?;
        }
        "ext4" | "ext3" | "ext2" => {
            run(config, "resize2fs", &[&m.source])?;
        }
        // A raw block volume: nothing to grow.
        _ if !path.is_dir() => {}
        other => return Err(Status::invalid_argument(format!("cannot grow a {other} file system"))),
    }
    Ok(size)
}

#[tonic::async_trait]
impl pb::node_server::Node for Node {
    async fn node_stage_volume(
        &self,
        r: Request<pb::NodeStageVolumeRequest>,
    ) -> Reply<pb::NodeStageVolumeResponse> {
        let r = r.into_inner();
        require(&r.volume_id, "volume id")?;
        require(&r.staging_target_path, "staging target path")?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
        let access = check_capability(cap).map_err(Status::invalid_argument)?;
        let id = r.volume_id.clone();
        self.blocking(&id.clone(), move |c| stage(c, &id, &r, &access)).await?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        r: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Reply<pb::NodeUnstageVolumeResponse> {
        let r = r.into_inner();
        require(&r.volume_id, "volume id")?;
        require(&r.staging_target_path, "staging target path")?;
        let id = r.volume_id.clone();
        let staging = PathBuf::from(&r.staging_target_path);
        self.blocking(&id.clone(), move |c| unstage(c, &id, &staging)).await?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        r: Request<pb::NodePublishVolumeRequest>,
    ) -> Reply<pb::NodePublishVolumeResponse> {
        let r = r.into_inner();
        require(&r.volume_id, "volume id")?;
        require(&r.target_path, "target path")?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume capability is required"))?;
        let access = check_capability(cap).map_err(Status::invalid_argument)?;
        require(&r.staging_target_path, "staging target path")?;
        let id = r.volume_id.clone();
        self.blocking(&id.clone(), move |c| publish(c, &id, &r, &access)).await?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Reply<pb::NodeUnpublishVolumeResponse> {
        let r = r.into_inner();
        require(&r.volume_id, "volume id")?;
        require(&r.target_path, "target path")?;
        let target = PathBuf::from(&r.target_path);
        self.blocking(&r.volume_id, move |c| unpublish(c, &target)).await?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Reply<pb::NodeGetVolumeStatsResponse> {
        let r = r.into_inner();
        require(&r.volume_id, "volume id")?;
        require(&r.volume_path, "volume path")?;
        let path = PathBuf::from(&r.volume_path);
        let config = self.config.clone();
        let s = tokio::task::spawn_blocking(move || stats(&config, &path))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(s))
    }

    async fn node_expand_volume(
        &self,
        r: Request<pb::NodeExpandVolumeRequest>,
    ) -> Reply<pb::NodeExpandVolumeResponse> {
        let r = r.into_inner();
        require(&r.volume_id, "volume id")?;
        require(&r.volume_path, "volume path")?;
        let required = r.capacity_range.map_or(0, |c| c.required_bytes.max(0) as u64);
        if let Some(c) = &r.volume_capability {
            check_capability(c).map_err(Status::invalid_argument)?;
        }
        let path = PathBuf::from(&r.volume_path);
        let size = self.blocking(&r.volume_id, move |c| expand(c, &path, required)).await?;
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Reply<pb::NodeGetCapabilitiesResponse> {
        use pb::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities =
            [Type::StageUnstageVolume, Type::GetVolumeStats, Type::ExpandVolume, Type::VolumeCondition]
                .into_iter()
                .map(|t| pb::NodeServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
                .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(&self, _: Request<pb::NodeGetInfoRequest>) -> Reply<pb::NodeGetInfoResponse> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.host_nqn()?,
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// The volumes this node has staged (volume id → subsystem NQN), from the state directory.
#[must_use]
pub fn staged_volumes(config: &NodeConfig) -> HashMap<String, String> {
    let Ok(dir) = std::fs::read_dir(&config.state_dir) else { return HashMap::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?.strip_suffix(".json")?.to_owned();
        let s: Staged = serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok()?;
        Some((name, s.nqn))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - xfs /dev/nvme0n1 rw\n\
                    37 35 0:1 / /proc rw - proc proc rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            m[0],
            Mount {
                point: PathBuf::from("/mnt/with space"),
                source: "/dev/nvme0n1".into(),
                fs_type: "xfs".into(),
                read_only: false,
            }
        );
        assert_eq!(m[1].fs_type, "proc");
        let ro = parse_mountinfo("40 35 98:0 /x /pub ro,relatime - xfs /dev/nvme0n1 rw\n");
        assert!(ro[0].read_only, "the mount point's own options decide");
    }

    #[test]
    fn devices_are_found_by_subsystem_nqn_in_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        let mk = |dev: &str, nqn: &str, sectors: u64| {
            let d = sys.path().join("block").join(dev).join("device");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("subsysnqn"), format!("{nqn}\n")).unwrap();
            std::fs::write(sys.path().join("block").join(dev).join("size"), format!("{sectors}\n")).unwrap();
        };
        mk("nvme0c0n1", "nqn.x:a", 8); // a hidden path: never the answer
        mk("nvme0n1", "nqn.x:a", 2048);
        mk("nvme1n1", "nqn.x:b", 4096);
        let c = NodeConfig { sysfs: sys.path().to_owned(), ..NodeConfig::default() };
        assert_eq!(device_of(&c, "nqn.x:a").as_deref(), Some("nvme0n1"));
        assert_eq!(device_of(&c, "nqn.x:b").as_deref(), Some("nvme1n1"));
        assert_eq!(device_of(&c, "nqn.x:c"), None);
        assert_eq!(device_size(&c, "nvme1n1"), Some(4096 * 512));
        assert!(
            is_nvme_head("nvme12n3")
                && !is_nvme_head("nvme0c0n1")
                && !is_nvme_head("nvme0")
                && !is_nvme_head("nvmen1")
        );
    }

    #[test]
    fn block_devices_are_named_by_their_number() {
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(sys.path().join("dev/block")).unwrap();
        std::os::unix::fs::symlink(
            "../../devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1",
            sys.path().join("dev/block/259:0"),
        )
        .unwrap();
        let c = NodeConfig { sysfs: sys.path().to_owned(), ..NodeConfig::default() };
        assert_eq!(block_device_by_number(&c, 259, 0).as_deref(), Some("nvme0n1"));
        assert_eq!(block_device_by_number(&c, 259, 1), None);
        // A path that is not a block device names none.
        assert_eq!(block_device_at(&c, sys.path()), None);
    }

    #[test]
    fn stage_records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let c = NodeConfig { state_dir: dir.path().join("state"), ..NodeConfig::default() };
        let s = Staged { nqn: "nqn.x:v".into(), staging_target_path: "/stage/v".into(), block: false };
        write_state(&c, "a/v", &s).unwrap();
        assert_eq!(read_state(&c, "a/v"), Some(s));
        assert_eq!(staged_volumes(&c).get("a_v").map(String::as_str), Some("nqn.x:v"));
        assert_eq!(read_state(&c, "a/w"), None);
    }
}
