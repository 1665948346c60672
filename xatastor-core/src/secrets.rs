//! DH-HMAC-CHAP secrets of the node's volumes: one private file per volume, read when the volume is
//! loaded, and the [`HostKeys`] the node gives its target.
//!
//! ```text
//!   <data dir>/secrets/            0700, owned by the node's user (checked at start)
//!       <volume>.dhchap            0600: one line per host with a secret (checked at every read)
//!       .<volume>.tmp              a write in progress (temp → fsync → rename → fsync of the directory)
//!       .batch-<uuid>.tmp          a batch of new volumes in progress: one file, hard-linked as each
//!                                  volume's file (one data fsync and one directory fsync per batch)
//!
//!   host Connect ──▶ Node activates the volume ──▶ reads <volume>.dhchap into memory
//!   Connect / (re)authentication ──▶ HostKeys::host_secrets(subnqn, hostnqn) ──▶ a map lookup
//!   volume unloaded ──▶ its secrets leave memory
//! ```
//!
//! **Scope: a secret belongs to a (volume, host) pair**, the same pair an allowed host is: granting a
//! host a volume and giving it the secret it proves are one decision, made and revoked together
//! (`allow-host … --dhchap-secret-file`, deny, delete). On a node shared by tenants, a secret handed
//! to one tenant's host for one volume (by a CSI driver at publish time, say) opens that volume and
//! nothing else, and rotating it touches that volume alone. The controller secret (bidirectional
//! authentication) is transformed with the subsystem NQN, so it is per volume by nature. A host that
//! is to use one secret everywhere is given the same secret on each of its volumes; the Linux host
//! takes a secret per connection (`nvme connect --dhchap-secret`), so nothing is lost.
//!
//! **Loaded with the volume, not at start.** Start-up reads nothing per volume (it must not grow with
//! a million volumes), and an idle volume holds nothing in memory: its secrets are read when a host's
//! Connect activates it (on the connection's thread, next to opening its device — one small file)
//! and dropped when it is unloaded. From then on every lookup the target makes, at each Connect and
//! (re)authentication, is a map lookup under a read lock. A loaded volume whose secrets are not in
//! memory (a race with its unloading) gets a secret nobody knows: such a host fails authentication
//! rather than skipping it.
//!
//! **Permissions.** The directory is created 0700; a directory or file that others can read or write,
//! or that belongs to another user, is refused (the node does not start; the volume is not exported)
//! with the `chmod`/`chown` that fixes it. Files are opened without following symbolic links.
//!
//! **Never logged.** [`VolumeSecrets`] and [`nvmeof_target::auth::DhchapSecret`] print no key in
//! `Debug`; errors name the file and the line, never its contents; secrets in memory are wiped when
//! dropped, and so are the file contents read or written.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvmeof_target::auth::{DhchapHash, DhchapSecret, HostKeys, HostSecrets, OsEntropy};
use parking_lot::{Mutex, RwLock};
use zeroize::Zeroizing;

use crate::ratelimit::RateLimit;

/// The first line of a secrets file.
const HEADER: &str = "xatastor-dhchap-secrets 1";
/// Suffix of a volume's secrets file.
const SUFFIX: &str = ".dhchap";
/// A secrets file larger than this is refused (about 4,000 hosts with bidirectional secrets).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why secrets could not be read or written. Messages name files and lines, never their contents.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretsError {
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Others may read or write it.
    #[error(
        "{} has mode {mode:04o}: secrets must be accessible to the node's user only (chmod {expected:o} {})",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file or directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// What they must be.
        expected: u32,
    },
    /// It belongs to another user.
    #[error(
        "{} belongs to user {owner}, not to the node's user {user} (chown {user} {})",
        path.display(),
        path.display()
    )]
    Owner {
        /// The file or directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The node's (effective) user.
        user: u32,
    },
    /// Not a directory (the secrets directory) or not a regular file (a secrets file).
    #[error("{} is not a {expected}", path.display())]
    WrongType {
        /// The path.
        path: PathBuf,
        /// `directory` or `regular file`.
        expected: &'static str,
    },
    /// Larger than [`MAX_FILE_BYTES`].
    #[error("{} is larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A line that is not `<host secret> <controller secret or -> <host NQN>`.
    #[error("{} line {line}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the line itself).
        reason: String,
    },
    /// The catalog says these hosts have secrets, and the volume's secrets file does not hold them
    /// (the directory was lost, replaced or restored from an older copy). The volume is not exported
    /// until their secrets are set again (or removed).
    #[error(
        "{} lacks the secrets of {} host(s) the catalog says have one ({}): set them again, or remove \
         them to let those hosts connect without",
        path.display(),
        hosts.len(),
        hosts.join(", ")
    )]
    Missing {
        /// The volume's secrets file.
        path: PathBuf,
        /// The hosts.
        hosts: Vec<String>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretsError + '_ {
    move |source| SecretsError::Io { path: path.to_owned(), source }
}

/// The node's effective user id.
fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() }
}

/// The secrets of one volume: per host, its secret and optionally the controller secret.
///
/// `Debug` shows the hosts and whether each is bidirectional, never a key.
#[derive(Clone, Default)]
pub struct VolumeSecrets {
    hosts: BTreeMap<String, Arc<HostSecrets>>,
}

impl fmt::Debug for VolumeSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.hosts.iter().map(|(h, s)| (h, Redacted(s.controller.is_some())))).finish()
    }
}

struct Redacted(bool);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0 { "<host and controller secrets>" } else { "<host secret>" })
    }
}

impl VolumeSecrets {
    /// No host has a secret.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The secrets of `hostnqn`.
    #[must_use]
    pub fn get(&self, hostnqn: &str) -> Option<&Arc<HostSecrets>> {
        self.hosts.get(hostnqn)
    }

    /// Sets (or replaces) the secrets of `hostnqn`.
    pub fn set(&mut self, hostnqn: &str, secrets: HostSecrets) {
        self.hosts.insert(hostnqn.to_owned(), Arc::new(secrets));
    }

    /// Removes the secrets of `hostnqn`; false if it had none.
    pub fn remove(&mut self, hostnqn: &str) -> bool {
        self.hosts.remove(hostnqn).is_some()
    }

    /// Takes every host secret of `other`, replacing those of the same hosts.
    pub fn overlay(&mut self, other: &VolumeSecrets) {
        for (h, s) in &other.hosts {
            self.hosts.insert(h.clone(), s.clone());
        }
    }

    /// No host has a secret.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Hosts with a secret and whether each has a controller secret too, in NQN order.
    pub fn hosts(&self) -> impl Iterator<Item = (&str, bool)> + '_ {
        self.hosts.iter().map(|(h, s)| (h.as_str(), s.controller.is_some()))
    }

    /// The file's contents (wiped when dropped). They do not name the volume: a batch of new
    /// volumes shares one file through hard links.
    fn to_file(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::new());
        out.push_str(HEADER);
        out.push('\n');
        out.push_str("# DH-HMAC-CHAP secrets of a volume, one host a line: <host secret> <controller secret or -> <host NQN>\n");
        for (host, s) in &self.hosts {
            out.push_str(&s.host.to_dhhc1());
            out.push(' ');
            match &s.controller {
                Some(c) => out.push_str(&c.to_dhhc1()),
                None => out.push('-'),
            }
            out.push(' ');
            out.push_str(host);
            out.push('\n');
        }
        out
    }

    fn parse(path: &Path, text: &str) -> Result<Self, SecretsError> {
        let bad =
            |line: usize, reason: String| SecretsError::Malformed { path: path.to_owned(), line, reason };
        let mut hosts = BTreeMap::new();
        let mut header = false;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            if !header {
                if line.trim_end() != HEADER {
                    return Err(bad(n, format!("expected the header line {HEADER:?}")));
                }
                header = true;
                continue;
            }
            let mut fields = line.splitn(3, ' ');
            let (Some(host_secret), Some(ctrl_secret), Some(hostnqn)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(n, "expected <host secret> <controller secret or -> <host NQN>".into()));
            };
            let host = DhchapSecret::parse(host_secret).map_err(|e| bad(n, format!("host secret: {e}")))?;
            let mut secrets = HostSecrets::new(host);
            if ctrl_secret != "-" {
                let c = DhchapSecret::parse(ctrl_secret)
                    .map_err(|e| bad(n, format!("controller secret: {e}")))?;
                secrets = secrets.with_controller(c);
            }
            if hostnqn.is_empty() || hostnqn.chars().any(char::is_control) {
                return Err(bad(n, "the host NQN is empty or has control characters".into()));
            }
            if hosts.insert(hostnqn.to_owned(), Arc::new(secrets)).is_some() {
                return Err(bad(n, format!("a second line for host {hostnqn}")));
            }
        }
        if !header && !text.trim().is_empty() {
            return Err(bad(1, format!("expected the header line {HEADER:?}")));
        }
        Ok(Self { hosts })
    }
}

/// The secrets directory: one file per volume with secrets (see the module documentation).
#[derive(Debug, Clone)]
pub struct SecretsDir {
    path: PathBuf,
    user: u32,
}

impl SecretsDir {
    /// Opens `path`, creating it (0700) if missing. Refuses a directory that is not the node
    /// user's or that others may access.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, SecretsError> {
        let path = path.into();
        match std::fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                // Exactly 0700 whatever the umask.
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err(&path))?;
                sync_parent(&path)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        let dir = Self { path, user: euid() };
        let meta = std::fs::metadata(&dir.path).map_err(io_err(&dir.path))?;
        if !meta.is_dir() {
            return Err(SecretsError::WrongType { path: dir.path, expected: "directory" });
        }
        dir.check_private(&dir.path, &meta, 0o700)?;
        Ok(dir)
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The secrets file of `volume` (a valid volume name: no `/`, never starting with `.`).
    #[must_use]
    pub fn file_of(&self, volume: &str) -> PathBuf {
        self.path.join(format!("{volume}{SUFFIX}"))
    }

    fn check_private(
        &self,
        path: &Path,
        meta: &std::fs::Metadata,
        expected: u32,
    ) -> Result<(), SecretsError> {
        if meta.uid() != self.user {
            return Err(SecretsError::Owner { path: path.to_owned(), owner: meta.uid(), user: self.user });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Permissions { path: path.to_owned(), mode, expected });
        }
        Ok(())
    }

    /// The secrets of `volume` (none if it has no file). The file must be a regular file of the
    /// node's user that only that user may read (0600 or stricter).
    pub fn read(&self, volume: &str) -> Result<VolumeSecrets, SecretsError> {
        let path = self.file_of(volume);
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(VolumeSecrets::new()),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(SecretsError::WrongType { path, expected: "regular file" })
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        if !meta.is_file() {
            return Err(SecretsError::WrongType { path, expected: "regular file" });
        }
        self.check_private(&path, &meta, 0o600)?;
        if meta.len() > MAX_FILE_BYTES {
            return Err(SecretsError::TooLarge { path });
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0)));
        (&mut file).take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(io_err(&path))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(SecretsError::TooLarge { path });
        }
        let text = std::str::from_utf8(&bytes).map_err(|e| SecretsError::Malformed {
            path: path.clone(),
            line: bytes.get(..e.valid_up_to()).map_or(1, |b| b.iter().filter(|&&c| c == b'\n').count() + 1),
            reason: "not UTF-8".into(),
        })?;
        VolumeSecrets::parse(&path, text)
    }

    /// Replaces the secrets of `volume` atomically (temporary file 0600, fsync, rename, fsync of the
    /// directory): after a crash the file holds either the old or the new secrets. No secrets
    /// removes the file.
    pub fn write(&self, volume: &str, secrets: &VolumeSecrets) -> Result<(), SecretsError> {
        if secrets.is_empty() {
            self.remove(volume)?;
            return Ok(());
        }
        let path = self.file_of(volume);
        let tmp = self.write_temp(&format!(".{volume}.tmp"), secrets)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(&path)(e)
        })?;
        self.sync()
    }

    /// Gives every volume of `volumes` the same secrets (replacing whatever files they had; no
    /// secrets removes them), durably when this returns, with one data fsync and one directory
    /// fsync for the whole batch: the volumes' files are hard links to one file (a later change
    /// of one volume's secrets replaces its link, not the shared file). Meant for volumes no host
    /// can use yet (a batch being created): a crash in the middle leaves some with their files and
    /// some without.
    pub fn write_many(&self, volumes: &[&str], secrets: &VolumeSecrets) -> Result<(), SecretsError> {
        let mut changed = false;
        for v in volumes {
            let path = self.file_of(v);
            match std::fs::remove_file(&path) {
                Ok(()) => changed = true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        if !secrets.is_empty() {
            let name = format!(".batch-{}.tmp", uuid::Uuid::new_v4().simple());
            let mut source = self.write_temp(&name, secrets)?;
            let linked = (|| {
                for v in volumes {
                    let path = self.file_of(v);
                    match std::fs::hard_link(&source, &path) {
                        Ok(()) => {}
                        // The file system's limit of links to one file (65,000 on ext4): go on with a
                        // fresh copy.
                        Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                            let next = self.write_temp(&name, secrets)?;
                            source = next;
                            std::fs::hard_link(&source, &path).map_err(io_err(&path))?;
                        }
                        Err(e) => return Err(io_err(&path)(e)),
                    }
                }
                Ok(())
            })();
            let _ = std::fs::remove_file(&source);
            linked?;
            changed = true;
        }
        if changed {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes `secrets` to a new file `name` in the directory (0600, fsynced) and returns its path;
    /// a file of that name left by a crash is replaced.
    fn write_temp(&self, name: &str, secrets: &VolumeSecrets) -> Result<PathBuf, SecretsError> {
        let tmp = self.path.join(name);
        match std::fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&tmp)(e)),
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let written = (|| {
            // Exactly 0600 whatever the umask.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            file.write_all(secrets.to_file().as_bytes())?;
            file.sync_all()
        })();
        drop(file);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
        }
        Ok(tmp)
    }

    /// Removes the secrets file of `volume` (durably); false if there was none.
    pub fn remove(&self, volume: &str) -> Result<bool, SecretsError> {
        let path = self.file_of(volume);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                self.sync()?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// fsync of the directory: renames and unlinks in it are durable.
    fn sync(&self) -> Result<(), SecretsError> {
        File::open(&self.path).and_then(|d| d.sync_all()).map_err(io_err(&self.path))
    }
}

fn sync_parent(path: &Path) -> Result<(), SecretsError> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => File::open(parent).and_then(|d| d.sync_all()).map_err(io_err(parent)),
        None => Ok(()),
    }
}

/// How a new secret is made ([`crate::Node::generate_secret`]), as `nvme gen-dhchap-key` makes one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecretParams {
    /// Key length: 32, 48 or 64 bytes (`--key-length`).
    pub key_len_bytes: usize,
    /// The hash the key is transformed with before use (`--hmac` 1, 2, 3), or none (`--hmac 0`).
    pub transform: Option<DhchapHash>,
}

impl Default for SecretParams {
    /// 32 bytes, no transformation: what `nvme gen-dhchap-key` makes without options.
    fn default() -> Self {
        Self { key_len_bytes: 32, transform: None }
    }
}

/// Whether one host has secrets for a volume, without the secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAuth {
    /// The host NQN.
    pub hostnqn: String,
    /// A controller secret is set too: the host may (and should) authenticate the controller with
    /// `--dhchap-ctrl-secret`.
    pub controller_secret: bool,
}

/// A volume's authentication settings, without any secret: what `volume show` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VolumeAuth {
    /// Every host must authenticate; a host without a secret cannot connect.
    pub require_auth: bool,
    /// Hosts with a secret, in NQN order.
    pub hosts: Vec<HostAuth>,
}

impl VolumeAuth {
    /// The secrets settings of `hostnqn`, if it has any.
    #[must_use]
    pub fn host(&self, hostnqn: &str) -> Option<&HostAuth> {
        self.hosts.iter().find(|h| h.hostnqn == hostnqn)
    }

    /// The `nvme connect` options `hostnqn` needs for this volume, with placeholders where the
    /// secrets go, each option preceded by a space (empty when the host need not authenticate):
    /// ` --dhchap-secret=<host secret>` when the host has a secret or every host must authenticate,
    /// and ` --dhchap-ctrl-secret=<controller secret>` when a controller secret is set.
    #[must_use]
    pub fn connect_options(&self, hostnqn: &str) -> String {
        let host = self.host(hostnqn);
        let mut out = String::new();
        if host.is_some() || self.require_auth {
            out.push_str(" --dhchap-secret=<host secret>");
        }
        if host.is_some_and(|h| h.controller_secret) {
            out.push_str(" --dhchap-ctrl-secret=<controller secret>");
        }
        out
    }

    pub(crate) fn from_secrets(require_auth: bool, secrets: &VolumeSecrets) -> Self {
        Self {
            require_auth,
            hosts: secrets
                .hosts()
                .map(|(h, c)| HostAuth { hostnqn: h.to_owned(), controller_secret: c })
                .collect(),
        }
    }
}

/// The secrets of the loaded volumes, kept in step with their files.
///
/// A volume's entry is written when it is activated (its file read under `update`, so that a
/// concurrent change of the file is either read or applied after) and changed in place when its
/// secrets change; it is removed when the volume is unloaded, unless it was activated again since
/// (the generation tells).
pub(crate) struct LoadedSecrets {
    map: RwLock<HashMap<String, Loaded>>,
    /// Serialises loads and updates of one volume (sharded by name: activations of different
    /// volumes, on different workers, rarely wait for each other).
    update: [Mutex<()>; UPDATE_SHARDS],
    next_generation: AtomicU64,
    /// What a host of a loaded volume without an entry must prove: a random secret nobody has.
    unknown: Arc<HostSecrets>,
    misses: RateLimit,
}

const UPDATE_SHARDS: usize = 64;

struct Loaded {
    generation: u64,
    hosts: HashMap<String, Arc<HostSecrets>>,
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// The volume is not in memory.
    NotLoaded,
    /// It is; the host has no secret.
    NoSecret,
    /// The host's secrets.
    Secrets(Arc<HostSecrets>),
}

impl fmt::Debug for LoadedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedSecrets").field("volumes", &self.map.read().len()).finish_non_exhaustive()
    }
}

impl LoadedSecrets {
    pub(crate) fn new() -> Result<Self, nvmeof_target::auth::SecretError> {
        let unknown = DhchapSecret::generate(&OsEntropy, 64, None)?;
        Ok(Self {
            map: RwLock::new(HashMap::new()),
            update: std::array::from_fn(|_| Mutex::new(())),
            next_generation: AtomicU64::new(1),
            unknown: Arc::new(HostSecrets::new(unknown)),
            misses: RateLimit::new(Duration::from_secs(10)),
        })
    }

    fn update_lock(&self, volume: &str) -> parking_lot::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        volume.hash(&mut h);
        let shard = (h.finish() % UPDATE_SHARDS as u64) as usize;
        let [first, ..] = &self.update;
        self.update.get(shard).unwrap_or(first).lock() // always `get`: shard < UPDATE_SHARDS
    }

    /// Reads a volume's secrets with `read` and keeps them, all under the volume's update lock.
    /// Returns the entry's generation.
    pub(crate) fn load<E>(
        &self,
        volume: &str,
        read: impl FnOnce() -> Result<VolumeSecrets, E>,
    ) -> Result<u64, E> {
        let _update = self.update_lock(volume);
        let secrets = read()?;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let hosts = secrets.hosts.into_iter().collect();
        self.map.write().insert(volume.to_owned(), Loaded { generation, hosts });
        Ok(generation)
    }

    /// Replaces a loaded volume's secrets (nothing if it is not loaded). Call after the file is
    /// written.
    pub(crate) fn update_if_loaded(&self, volume: &str, secrets: &VolumeSecrets) {
        let _update = self.update_lock(volume);
        if let Some(entry) = self.map.write().get_mut(volume) {
            entry.hosts = secrets.hosts.iter().map(|(h, s)| (h.clone(), s.clone())).collect();
        }
    }

    /// Removes one host's secrets from a loaded volume (nothing if it is not loaded). Call after
    /// the file is written.
    pub(crate) fn remove_host_if_loaded(&self, volume: &str, hostnqn: &str) {
        let _update = self.update_lock(volume);
        if let Some(entry) = self.map.write().get_mut(volume) {
            entry.hosts.remove(hostnqn);
        }
    }

    /// Runs `f` under the update lock of `volume` (serialises with its loads and updates).
    pub(crate) fn with_update_lock<R>(&self, volume: &str, f: impl FnOnce() -> R) -> R {
        let _update = self.update_lock(volume);
        f()
    }

    /// The generation of a volume's entry.
    pub(crate) fn generation(&self, volume: &str) -> Option<u64> {
        self.map.read().get(volume).map(|e| e.generation)
    }

    /// Drops a volume's entry if it is still generation `generation` (not loaded again since).
    pub(crate) fn forget_if(&self, volume: &str, generation: u64) {
        let _update = self.update_lock(volume);
        let mut map = self.map.write();
        if map.get(volume).is_some_and(|e| e.generation == generation) {
            map.remove(volume);
        }
    }

    /// Drops a volume's entry.
    pub(crate) fn forget(&self, volume: &str) {
        let _update = self.update_lock(volume);
        self.map.write().remove(volume);
    }

    /// Volumes in memory.
    pub(crate) fn len(&self) -> usize {
        self.map.read().len()
    }

    pub(crate) fn lookup(&self, volume: &str, hostnqn: &str) -> Lookup {
        match self.map.read().get(volume) {
            None => Lookup::NotLoaded,
            Some(e) => e.hosts.get(hostnqn).map_or(Lookup::NoSecret, |s| Lookup::Secrets(s.clone())),
        }
    }
}

/// The node's [`HostKeys`]: secrets of its loaded volumes, by subsystem NQN `<prefix>:<volume>`.
pub(crate) struct NodeHostKeys {
    /// `<prefix>:`.
    prefix: String,
    loaded: Arc<LoadedSecrets>,
}

impl NodeHostKeys {
    pub(crate) fn new(prefix: &str, loaded: Arc<LoadedSecrets>) -> Self {
        Self { prefix: format!("{prefix}:"), loaded }
    }
}

impl HostKeys for NodeHostKeys {
    fn host_secrets(&self, subnqn: &str, hostnqn: &str) -> Option<Arc<HostSecrets>> {
        let volume = subnqn.strip_prefix(self.prefix.as_str())?;
        match self.loaded.lookup(volume, hostnqn) {
            Lookup::Secrets(s) => Some(s),
            Lookup::NoSecret => None,
            Lookup::NotLoaded => {
                if let Some(more) = self.loaded.misses.check_now() {
                    tracing::warn!(
                        volume,
                        suppressed = more,
                        "secrets of a volume asked for while it is not loaded (unloading meanwhile?): \
                         the host must authenticate, and cannot"
                    );
                }
                Some(self.loaded.unknown.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nvmeof_target::auth::DeterministicEntropy;

    use super::*;

    fn secret(seed: u64) -> DhchapSecret {
        DhchapSecret::generate(&DeterministicEntropy::new(seed), 32, Some(DhchapHash::Sha256)).unwrap()
    }

    #[test]
    fn file_round_trip_permissions_and_atomic_replace() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SecretsDir::open(tmp.path().join("secrets")).unwrap();
        assert_eq!(mode(dir.path()), 0o700);
        assert!(dir.read("v").unwrap().is_empty(), "no file: no secrets");
        let mut s = VolumeSecrets::new();
        s.set("nqn.h1", HostSecrets::new(secret(1)));
        s.set("nqn.h 2 with spaces", HostSecrets::new(secret(2)).with_controller(secret(3)));
        dir.write("v", &s).unwrap();
        assert_eq!(mode(&dir.file_of("v")), 0o600);
        let back = dir.read("v").unwrap();
        let hosts: Vec<(&str, bool)> = back.hosts().collect();
        assert_eq!(hosts, [("nqn.h 2 with spaces", true), ("nqn.h1", false)]);
        assert_eq!(*back.get("nqn.h1").unwrap().host.to_dhhc1(), *secret(1).to_dhhc1());
        let c = back.get("nqn.h 2 with spaces").unwrap().controller.as_ref().unwrap();
        assert_eq!(*c.to_dhhc1(), *secret(3).to_dhhc1());
        // Replaced whole; no temporary file left.
        s.remove("nqn.h1");
        dir.write("v", &s).unwrap();
        assert_eq!(dir.read("v").unwrap().hosts().count(), 1);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["v.dhchap"]);
        // Empty: the file goes.
        dir.write("v", &VolumeSecrets::new()).unwrap();
        assert!(!dir.file_of("v").exists());
        assert!(!dir.remove("v").unwrap());
    }

    #[test]
    fn a_batch_shares_one_file_until_one_volume_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SecretsDir::open(tmp.path().join("secrets")).unwrap();
        let mut stale = VolumeSecrets::new();
        stale.set("nqn.old", HostSecrets::new(secret(7)));
        dir.write("b", &stale).unwrap();
        let mut s = VolumeSecrets::new();
        s.set("nqn.h", HostSecrets::new(secret(1)));
        dir.write_many(&["a", "b", "c"], &s).unwrap();
        for v in ["a", "b", "c"] {
            let got = dir.read(v).unwrap();
            assert_eq!(got.hosts().collect::<Vec<_>>(), [("nqn.h", false)], "{v}");
            assert_eq!(std::fs::metadata(dir.file_of(v)).unwrap().nlink(), 3);
            assert_eq!(mode(&dir.file_of(v)), 0o600);
        }
        // One volume's change replaces its link only.
        s.set("nqn.h2", HostSecrets::new(secret(2)));
        dir.write("b", &s).unwrap();
        assert_eq!(dir.read("b").unwrap().hosts().count(), 2);
        assert_eq!(dir.read("a").unwrap().hosts().count(), 1);
        assert_eq!(dir.read("c").unwrap().hosts().count(), 1);
        // No secrets: the batch's files go; no temporary file is left.
        dir.write_many(&["a", "b", "x"], &VolumeSecrets::new()).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["c.dhchap"]);
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn loose_permissions_and_links_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SecretsDir::open(tmp.path().join("secrets")).unwrap();
        let mut s = VolumeSecrets::new();
        s.set("nqn.h1", HostSecrets::new(secret(1)));
        dir.write("v", &s).unwrap();
        let file = dir.file_of("v");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = dir.read("v").unwrap_err();
        assert!(matches!(e, SecretsError::Permissions { mode: 0o640, expected: 0o600, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(dir.read("v").unwrap().hosts().count(), 1, "stricter is fine");
        // A symbolic link is not followed.
        std::os::unix::fs::symlink(&file, dir.file_of("w")).unwrap();
        assert!(matches!(dir.read("w"), Err(SecretsError::WrongType { .. })));
        // The directory itself.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = SecretsDir::open(dir.path()).unwrap_err();
        assert!(matches!(e, SecretsError::Permissions { mode: 0o755, expected: 0o700, .. }), "{e}");
        assert!(e.to_string().contains("chmod 700"), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        SecretsDir::open(dir.path()).unwrap();
        let plain = tmp.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(SecretsDir::open(&plain), Err(SecretsError::WrongType { .. })));
    }

    #[test]
    fn malformed_files_name_the_line_never_the_contents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SecretsDir::open(tmp.path().join("secrets")).unwrap();
        let good = secret(1).to_dhhc1().to_string();
        // A CRC error: the key is mistyped.
        let mut typo = good.clone();
        typo.replace_range(12..13, if &good[12..13] == "A" { "B" } else { "A" });
        let cases = [
            (format!("{good} - nqn.h\n"), 1, "header"),
            (format!("{HEADER}\n{good} -\n"), 2, "expected <host secret>"),
            (format!("{HEADER}\n\n# c\n{typo} - nqn.h\n"), 4, "host secret"),
            (format!("{HEADER}\n{good} {typo} nqn.h\n"), 2, "controller secret"),
            (format!("{HEADER}\n{good} - nqn.h\n{good} - nqn.h\n"), 3, "second line"),
            (format!("{HEADER}\n{good} - nqn.\u{7}\n"), 2, "control"),
        ];
        for (text, line, what) in cases {
            let path = dir.file_of("m");
            std::fs::write(&path, &text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = dir.read("m").unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, SecretsError::Malformed { line: l, .. } if l == line), "{msg}");
            assert!(msg.contains(what), "{msg}");
            for s in [&good, &typo] {
                assert!(!msg.contains(&s[10..30]), "the message shows a secret: {msg}");
            }
        }
        std::fs::write(dir.file_of("big"), vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        std::fs::set_permissions(dir.file_of("big"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(dir.read("big"), Err(SecretsError::TooLarge { .. })));
    }

    #[test]
    fn debug_output_has_no_secret() {
        let mut s = VolumeSecrets::new();
        let sec = secret(9);
        s.set("nqn.h", HostSecrets::new(sec.clone()).with_controller(secret(10)));
        let text = format!("{s:?} {:?}", s.get("nqn.h").unwrap());
        let dhhc1 = sec.to_dhhc1();
        assert!(!text.contains(&dhhc1[10..30]), "{text}");
        assert!(text.contains("nqn.h") && text.contains("controller"), "{text}");
    }

    #[test]
    fn loaded_secrets_generations_and_unknown_fallback() {
        let loaded = Arc::new(LoadedSecrets::new().unwrap());
        let keys = NodeHostKeys::new("nqn.p", loaded.clone());
        assert!(keys.host_secrets("nqn.other:v", "h").is_none(), "not the node's");
        // Not loaded: a secret nobody knows, never "no authentication".
        let unknown = keys.host_secrets("nqn.p:v", "h").unwrap();
        let mut s = VolumeSecrets::new();
        s.set("h", HostSecrets::new(secret(1)));
        let g1 = loaded.load("v", || Ok::<_, ()>(s.clone())).unwrap();
        let got = keys.host_secrets("nqn.p:v", "h").unwrap();
        assert_eq!(*got.host.to_dhhc1(), *secret(1).to_dhhc1());
        assert_ne!(*got.host.to_dhhc1(), *unknown.host.to_dhhc1());
        assert!(keys.host_secrets("nqn.p:v", "other").is_none());
        // Rotation in place.
        s.set("h", HostSecrets::new(secret(2)));
        loaded.update_if_loaded("v", &s);
        assert_eq!(*keys.host_secrets("nqn.p:v", "h").unwrap().host.to_dhhc1(), *secret(2).to_dhhc1());
        loaded.update_if_loaded("w", &s);
        loaded.remove_host_if_loaded("w", "h");
        assert_eq!(loaded.len(), 1, "an update does not load");
        loaded.remove_host_if_loaded("v", "h");
        assert!(keys.host_secrets("nqn.p:v", "h").is_none());
        loaded.update_if_loaded("v", &s);
        // Loaded again meanwhile: an unload of the older generation keeps it.
        let g2 = loaded.load("v", || Ok::<_, ()>(s.clone())).unwrap();
        assert!(g2 > g1);
        loaded.forget_if("v", g1);
        assert_eq!(loaded.generation("v"), Some(g2));
        loaded.forget_if("v", g2);
        assert_eq!(loaded.generation("v"), None);
        assert!(loaded.load("v", || Err::<VolumeSecrets, _>("unreadable")).is_err());
        assert_eq!(loaded.len(), 0, "a failed read loads nothing");
    }
}
