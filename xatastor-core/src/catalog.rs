//! The persistent volume catalog: every volume and snapshot with its NVMe identity, who may connect,
//! and the lifecycle operations in progress — in one embedded transactional store.
//!
//! ```text
//!   volumes       name            → VolumeRecord   (size, block size, origin, NQN, NGUID/UUID,
//!                                                   serial, allowed hosts, authentication, state)
//!   snapshots     "volume@snap"   → SnapshotRecord
//!   discovery     "<host NQN | *>\0<volume>" → ()   (the discovery index, readable by position:
//!                                                   see `catalog/discovery.rs`)
//!   clones        "volume@snap"   →→ clone name    (multimap: dependents of a snapshot)
//!   intents       id              → Intent         (operations started, not yet committed)
//!   meta          key             → value          (schema version, NQN prefix, the backend the
//!                                                   volumes live on, provisioned bytes)
//! ```
//!
//! The catalog owns what is decided once per volume and must never change: a new record's NVMe
//! identity ([`VolumeRecord::new`]: subsystem NQN, random NGUID, RFC 9562 version 4 UUID, serial), and
//! the bookkeeping that follows from records: the host and clone indexes, a volume's snapshots going
//! with it ([`CatalogTxn::remove_volume_and_snapshots`]) and the sum of provisioned sizes (kept in
//! `meta` with every write, so capacity questions never scan the volumes).
//!
//! It also records **which backend** the volumes live on ([`BackendRecord`]: kind, dataset or
//! directory, durable or not), so that a node started on another backend is refused instead of
//! serving volumes whose devices are elsewhere.
//!
//! **Authentication.** A record says whether every host must authenticate (DH-HMAC-CHAP) and which
//! hosts have a secret ([`VolumeRecord::dhchap_hosts`]); the secrets themselves are never in the
//! catalog (see [`crate::secrets`]).
//!
//! **Record versions.** Volume records are written as `0x00, 2, postcard(VolumeRecord)`; a record
//! without that tag is the first layout (no authentication fields) and reads as one that requires no
//! authentication. A catalog of schema version 1 opens as it is (nothing is rewritten at start) and
//! is marked version 2, which older builds refuse instead of misreading the new records.
//!
//! **Why redb.** It is an embedded, pure-Rust, ACID key-value store with copy-on-write B-trees:
//! a commit is durable when it returns (fsync), a crash at any moment leaves the last committed
//! state, readers never block the writer, and opening a database does not read its contents — so
//! start-up does not grow with the number of volumes. Records are small `postcard` encodings
//! (~150 bytes per volume). SQLite would do as well but means C and a SQL layer for what is a few
//! key lookups; sled is unmaintained; RocksDB/LMDB are C/C++ and bring a build toolchain.
//!
//! Lookups the hot paths need are single index reads: a host's Connect maps its subsystem NQN to a
//! volume name by stripping the node's NQN prefix, and a host's discovery log page reads a window of
//! that host's list in the `discovery` index ([`Catalog::discovery_range`]: the host's own volumes,
//! then those open to any host), through a small in-memory position index, so that the work per
//! request follows the window and not the number of volumes.
//!
//! **Schema 3** replaced the `host_volumes` multimap (which can only be read from the start) with the
//! `discovery` table; a catalog of an older schema has its index rebuilt from the volume records
//! once, when first opened.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use redb::{Database, MultimapTableDefinition, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const VOLUMES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("volumes");
const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
/// The discovery index of schemas 1 and 2 (host → volumes); deleted when such a catalog is opened.
const HOST_VOLUMES: MultimapTableDefinition<'_, &str, &str> = MultimapTableDefinition::new("host_volumes");
const CLONES: MultimapTableDefinition<'_, &str, &str> = MultimapTableDefinition::new("clones");
const INTENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("intents");
const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

mod discovery;
use discovery::{entry_key, Delta, PositionIndex, DISCOVERY};

/// The list of volumes any host may connect to in the discovery index.
const ANY_HOST: &str = "*";
/// Catalog layout version, stored in `meta`: 2 since volume records carry authentication settings,
/// 3 since the discovery index is the `discovery` table.
const SCHEMA_VERSION: u32 = 3;
/// The oldest layout this build opens (and marks [`SCHEMA_VERSION`]).
const OLDEST_SCHEMA_VERSION: u32 = 1;
/// First byte of a versioned volume record. A record of the first layout starts with the varint
/// length of its (non-empty) name, so never with 0.
const RECORD_TAG: u8 = 0;
/// Version of the volume record layout written now.
const RECORD_VERSION: u8 = 2;

/// Meta keys of the backend record and the provisioned-bytes counter.
const META_BACKEND_KIND: &str = "backend_kind";
const META_BACKEND_LOCATION: &str = "backend_location";
const META_BACKEND_DURABLE: &str = "backend_durable";
const META_PROVISIONED: &str = "provisioned_bytes";

/// Errors of the catalog store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// Another process has the catalog open (redb holds an exclusive lock on the file).
    #[error("{} is in use by another process: another node serves this data directory", path.display())]
    Locked {
        /// The catalog file.
        path: PathBuf,
    },
    /// The catalog was released ([`Catalog::release`]) for another process to take over; nothing can
    /// be read or written here until [`Catalog::reacquire`].
    #[error("the catalog {} was handed to another process", path.display())]
    Released {
        /// The catalog file.
        path: PathBuf,
    },
    /// The store failed (I/O, corruption, another process holds it).
    #[error("catalog store: {0}")]
    Store(Box<redb::Error>),
    /// A record could not be decoded (written by an incompatible version?).
    #[error("catalog record {key:?} is unreadable: {reason}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The catalog was written by a newer, incompatible version.
    #[error(
        "catalog schema version {found} is not supported (this build reads versions \
         {OLDEST_SCHEMA_VERSION} to {SCHEMA_VERSION})"
    )]
    Schema {
        /// The version found.
        found: u32,
    },
}

fn store<E: Into<redb::Error>>(e: E) -> CatalogError {
    CatalogError::Store(Box::new(e.into()))
}

/// Where a volume is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum VolumeState {
    /// Recorded; the backend volume may not exist yet (an intent is pending).
    Creating,
    /// Exists and may be exported.
    Ready,
    /// Being deleted (an intent is pending); not exported any more.
    Deleting,
    /// Reported, never stored: the catalog says [`VolumeState::Ready`] but the backend does not have
    /// the volume (removed behind the node's back, or a backend that lost it). Not exported.
    Missing,
}

impl VolumeState {
    /// The lower-case name used in reports (`creating`, `ready`, `deleting`, `missing`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Ready => "ready",
            Self::Deleting => "deleting",
            Self::Missing => "missing",
        }
    }
}

/// The backend a catalog's volumes live on, recorded on the first start and checked on every other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRecord {
    /// The provisioner's kind (`memory`, `file`, `zvol`, …).
    pub kind: String,
    /// Where on that backend: the parent dataset of zvols, the directory of files (relative to the
    /// catalog's directory when it lies inside it, so a data directory can be moved whole); empty for
    /// memory.
    pub location: String,
    /// Whether volumes outlive the process (false for memory).
    pub durable: bool,
}

impl std::fmt::Display for BackendRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.kind.as_str(), self.location.as_str()) {
            (kind, _) if !self.durable => f.write_str(kind),
            (kind, "") => f.write_str(kind),
            ("zvol", loc) => write!(f, "zvol:{loc}"),
            (kind, loc) => write!(f, "{kind} in {loc}"),
        }
    }
}

/// A volume as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical block size (512 or 4096).
    pub block_size: u32,
    /// Compression asked for at creation (`None`: the backend's default).
    pub compression: Option<String>,
    /// `(volume, snapshot)` this volume was cloned from.
    pub origin: Option<(String, String)>,
    /// Subsystem NQN hosts connect to.
    pub nqn: String,
    /// Namespace NGUID (random at creation, stable for the volume's life).
    pub nguid: [u8; 16],
    /// Namespace UUID (random, RFC 4122 version 4).
    pub uuid: [u8; 16],
    /// Controller serial number (20 printable ASCII characters at most).
    pub serial: String,
    /// Any host may connect.
    pub allow_any_host: bool,
    /// Host NQNs allowed to connect.
    pub allowed_hosts: Vec<String>,
    /// Lifecycle state.
    pub state: VolumeState,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// Every host must authenticate (DH-HMAC-CHAP); a host without a secret cannot connect.
    pub require_auth: bool,
    /// Hosts that have a DH-HMAC-CHAP secret for this volume, sorted. The secrets are in the node's
    /// secrets directory, never here; this list is what that directory must hold at least (a volume
    /// whose secrets file lacks one of them is not exported: see [`crate::secrets`]).
    pub dhchap_hosts: Vec<String>,
}

/// The first layout of [`VolumeRecord`] (schema version 1), before authentication.
#[derive(Deserialize)]
struct VolumeRecordV1 {
    name: String,
    size_bytes: u64,
    block_size: u32,
    compression: Option<String>,
    origin: Option<(String, String)>,
    nqn: String,
    nguid: [u8; 16],
    uuid: [u8; 16],
    serial: String,
    allow_any_host: bool,
    allowed_hosts: Vec<String>,
    state: VolumeState,
    created_unix_s: u64,
}

impl From<VolumeRecordV1> for VolumeRecord {
    fn from(v: VolumeRecordV1) -> Self {
        Self {
            name: v.name,
            size_bytes: v.size_bytes,
            block_size: v.block_size,
            compression: v.compression,
            origin: v.origin,
            nqn: v.nqn,
            nguid: v.nguid,
            uuid: v.uuid,
            serial: v.serial,
            allow_any_host: v.allow_any_host,
            allowed_hosts: v.allowed_hosts,
            state: v.state,
            created_unix_s: v.created_unix_s,
            require_auth: false,
            dhchap_hosts: Vec::new(),
        }
    }
}

/// A snapshot as the catalog knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The volume.
    pub volume: String,
    /// The snapshot's name.
    pub name: String,
    /// Size of the volume when the snapshot was taken.
    pub size_bytes: u64,
    /// Lifecycle state (`Creating` while its intent is pending).
    pub state: VolumeState,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix_s: u64,
}

/// A lifecycle operation that was started (recorded) but not yet committed. On restart the node
/// finishes or undoes each one, depending on what the backend shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Creating volumes (one, or a batch), recorded as `Creating`.
    Create {
        /// Their names.
        names: Vec<String>,
    },
    /// Cloning `origin` into `name`, recorded as `Creating`.
    Clone {
        /// The new volume.
        name: String,
        /// `(volume, snapshot)`.
        origin: (String, String),
        /// Size to grow the clone to after cloning, if larger than the snapshot.
        size_bytes: u64,
    },
    /// Taking snapshots `(volume, snapshot)`, recorded as `Creating`.
    Snapshot {
        /// The snapshots.
        snapshots: Vec<(String, String)>,
    },
    /// Resizing `name` from `from` to `to` bytes.
    Resize {
        /// The volume.
        name: String,
        /// Old size.
        from: u64,
        /// New size.
        to: u64,
    },
    /// Deleting volume `name` (recorded as `Deleting`) and its snapshots.
    DeleteVolume {
        /// The volume.
        name: String,
    },
    /// Deleting a snapshot.
    DeleteSnapshot {
        /// `(volume, snapshot)`.
        snapshot: (String, String),
    },
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain structs of strings and integers into a Vec cannot fail.
    postcard::to_stdvec(v).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, CatalogError> {
    postcard::from_bytes(bytes)
        .map_err(|e| CatalogError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

/// A volume record in the current layout: tag, version, postcard.
fn encode_volume(rec: &VolumeRecord) -> Vec<u8> {
    let mut out = vec![RECORD_TAG, RECORD_VERSION];
    out.extend_from_slice(&encode(rec));
    out
}

/// A volume record of any layout this build knows.
fn decode_volume(key: &str, bytes: &[u8]) -> Result<VolumeRecord, CatalogError> {
    match bytes {
        [RECORD_TAG, RECORD_VERSION, rest @ ..] => decode(key, rest),
        [RECORD_TAG, version, ..] => Err(CatalogError::Corrupt {
            key: key.to_owned(),
            reason: format!("volume record version {version} is not known to this build"),
        }),
        _ => decode::<VolumeRecordV1>(key, bytes).map(VolumeRecord::from),
    }
}

/// The catalog database (one file). Cheap to share behind an `Arc`; writes are serialised by the
/// store, reads run concurrently with them.
///
/// **Handing the catalog to another process.** The file is locked while it is open, so that two
/// nodes never serve one data directory. A new process taking over a running node (an upgrade without
/// downtime) needs the file: the running node calls [`Catalog::release`], which waits for the
/// transactions in progress and closes the file; from then on every operation here fails with
/// [`CatalogError::Released`], at once, until [`Catalog::reacquire`] opens the file again — which the
/// node does when the handover fails and it keeps serving. What it reads then is what the file holds,
/// including any changes the other process made meanwhile.
#[derive(Debug)]
pub struct Catalog {
    db: Arc<DbHandle>,
    path: PathBuf,
    /// Positions in the long discovery lists; locked while a transaction commits and while a reader
    /// reads the `discovery` table through it, so the two always agree.
    positions: Arc<Mutex<PositionIndex>>,
}

/// A write transaction on the catalog: everything in it commits atomically, or nothing.
pub struct CatalogTxn {
    txn: redb::WriteTransaction,
    positions: Arc<Mutex<PositionIndex>>,
    /// Changes to the `discovery` table, applied to `positions` at commit.
    deltas: Vec<Delta>,
    /// Keeps the database open (and [`Catalog::release`] waiting) until the transaction is over;
    /// declared after `txn`, so dropped after it.
    _use: DbUse,
}

/// The open database, or none while the catalog is released, and the number of its users.
#[derive(Debug, Default)]
struct DbHandle {
    state: Mutex<DbState>,
    /// Signalled when the last user is gone.
    idle: Condvar,
    /// Held by [`Catalog::release`] and [`Catalog::reacquire`]: one at a time.
    switch: Mutex<()>,
}

#[derive(Debug, Default)]
struct DbState {
    /// `None` while released (or being released).
    db: Option<Arc<Database>>,
    /// Transactions and reads in progress, each holding a clone of `db`.
    users: usize,
}

/// One user of the database: a read or a write transaction in progress. Its clone of the database is
/// dropped before the count goes down, so that when [`Catalog::release`] sees no user, the database
/// it holds is the last reference to the file.
#[derive(Debug)]
struct DbUse {
    db: Arc<Database>,
    _count: UseCount,
}

#[derive(Debug)]
struct UseCount(Arc<DbHandle>);

impl Drop for UseCount {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.users = state.users.saturating_sub(1);
        if state.users == 0 {
            self.0.idle.notify_all();
        }
    }
}

/// A read transaction, and the use that keeps its database open (dropped after it).
struct ReadTxn {
    txn: redb::ReadTransaction,
    _use: DbUse,
}

impl std::ops::Deref for ReadTxn {
    type Target = redb::ReadTransaction;
    fn deref(&self) -> &redb::ReadTransaction {
        &self.txn
    }
}

impl std::fmt::Debug for CatalogTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogTxn").finish_non_exhaustive()
    }
}

impl VolumeRecord {
    /// A new record in state [`VolumeState::Creating`] with a fresh NVMe identity: subsystem NQN
    /// `<nqn_prefix>:<name>`, a random NGUID, a random RFC 9562 version 4 UUID and a random serial
    /// (`XS` + 18 hex digits). Any host, allowed hosts, compression and origin are left for the
    /// caller to set.
    #[must_use]
    pub fn new(name: &str, nqn_prefix: &str, size_bytes: u64, block_size: u32) -> Self {
        let serial = uuid::Uuid::new_v4().simple().to_string();
        Self {
            name: name.to_owned(),
            size_bytes,
            block_size,
            compression: None,
            origin: None,
            nqn: format!("{nqn_prefix}:{name}"),
            nguid: *uuid::Uuid::new_v4().as_bytes(),
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            serial: format!("XS{}", serial.get(..18).unwrap_or(&serial)),
            allow_any_host: false,
            allowed_hosts: Vec::new(),
            state: VolumeState::Creating,
            created_unix_s: unix_now(),
            require_auth: false,
            dhchap_hosts: Vec::new(),
        }
    }
}

/// Seconds since the Unix epoch (creation times).
#[allow(clippy::disallowed_methods)] // wall-clock creation times
#[must_use]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn meta_u64(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<u64>, CatalogError> {
    Ok(t.get(key).map_err(store)?.and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes)))
}

/// Opens (or creates) the catalog file: every table created, the schema checked (and an older one
/// upgraded).
/// True if every table exists, the schema is this build's and the provisioned-bytes counter is
/// there: opening needs no write.
fn is_current(db: &Database) -> bool {
    let Ok(r) = db.begin_read() else { return false };
    let tables = r.open_table(VOLUMES).is_ok()
        && r.open_table(SNAPSHOTS).is_ok()
        && r.open_table(DISCOVERY).is_ok()
        && r.open_multimap_table(CLONES).is_ok()
        && r.open_table(INTENTS).is_ok()
        && r.open_multimap_table(HOST_VOLUMES).is_err();
    let Ok(meta) = r.open_table(META) else { return false };
    let schema =
        meta.get("schema").ok().flatten().and_then(|v| v.value().try_into().ok().map(u32::from_le_bytes));
    tables && schema == Some(SCHEMA_VERSION) && meta_u64(&meta, META_PROVISIONED).ok().flatten().is_some()
}

fn open_db(path: &Path) -> Result<Database, CatalogError> {
    let db = Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => CatalogError::Locked { path: path.to_owned() },
        e => store(e),
    })?;
    if is_current(&db) {
        // Nothing to create or upgrade: no write (and no sync) at open. A node taking over from a
        // running one opens its catalog while the hosts' commands wait.
        return Ok(db);
    }
    let txn = db.begin_write().map_err(store)?;
    {
        // Create every table, so readers never see a missing one.
        txn.open_table(VOLUMES).map_err(store)?;
        txn.open_table(SNAPSHOTS).map_err(store)?;
        txn.open_table(DISCOVERY).map_err(store)?;
        txn.open_multimap_table(CLONES).map_err(store)?;
        txn.open_table(INTENTS).map_err(store)?;
        let mut meta = txn.open_table(META).map_err(store)?;
        let found = meta
            .get("schema")
            .map_err(store)?
            .and_then(|v| v.value().try_into().ok().map(u32::from_le_bytes));
        match found {
            Some(SCHEMA_VERSION) => {}
            // New, or an older layout this build reads as it is: records of the old layout are
            // decoded as such and written in the new one when they change. Only the discovery
            // index is rebuilt (once) in the `discovery` table.
            None | Some(OLDEST_SCHEMA_VERSION..SCHEMA_VERSION) => {
                if found.is_some() {
                    let volumes = txn.open_table(VOLUMES).map_err(store)?;
                    let mut idx = txn.open_table(DISCOVERY).map_err(store)?;
                    let mut n = 0u64;
                    for entry in volumes.iter().map_err(store)? {
                        let (k, v) = entry.map_err(store)?;
                        let rec = decode_volume(k.value(), v.value())?;
                        for list in index_keys(&rec) {
                            idx.insert(entry_key(list, &rec.name).as_str(), ()).map_err(store)?;
                        }
                        n += 1;
                    }
                    tracing::info!(volumes = n, "catalog upgraded: discovery index rebuilt");
                }
                txn.delete_multimap_table(HOST_VOLUMES).map_err(store)?;
                meta.insert("schema", SCHEMA_VERSION.to_le_bytes().as_slice()).map_err(store)?;
            }
            Some(found) => return Err(CatalogError::Schema { found }),
        }
        if meta_u64(&meta, META_PROVISIONED)?.is_none() {
            // A catalog from before the counter: count once.
            let volumes = txn.open_table(VOLUMES).map_err(store)?;
            let mut sum = 0u64;
            for entry in volumes.iter().map_err(store)? {
                let (k, v) = entry.map_err(store)?;
                let rec = decode_volume(k.value(), v.value())?;
                sum = sum.saturating_add(rec.size_bytes);
            }
            meta.insert(META_PROVISIONED, sum.to_le_bytes().as_slice()).map_err(store)?;
        }
    }
    txn.commit().map_err(store)?;
    Ok(db)
}

impl Catalog {
    /// Opens (or creates) the catalog file. Reads nothing per volume (except once, to count the
    /// provisioned bytes of a catalog written before that counter existed).
    ///
    /// Another process holding the file is [`CatalogError::Locked`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CatalogError> {
        let path = path.as_ref().to_owned();
        let db = open_db(&path)?;
        let handle = DbHandle {
            state: Mutex::new(DbState { db: Some(Arc::new(db)), users: 0 }),
            ..Default::default()
        };
        Ok(Self { db: Arc::new(handle), path, positions: Arc::default() })
    }

    /// Waits for the transactions in progress to finish, then closes the catalog file, releasing its
    /// lock, so that another process can open it (a new process taking over the node). From the
    /// moment this is called, every operation on this catalog fails at once with
    /// [`CatalogError::Released`] (it never waits), until [`Catalog::reacquire`]. Releasing a released
    /// catalog does nothing.
    ///
    /// The wait is for transactions of other threads: a thread that calls this while it holds a
    /// [`CatalogTxn`] itself waits forever.
    ///
    /// # Errors
    /// The file is still locked once closed — by another process that took it in the meantime, or
    /// (a bug) by something of this one.
    pub fn release(&self) -> Result<(), CatalogError> {
        let _switch = self.db.switch.lock();
        let db = {
            let mut state = self.db.state.lock();
            let Some(db) = state.db.take() else { return Ok(()) };
            while state.users > 0 {
                self.db.idle.wait(&mut state);
            }
            db
        };
        // Nothing can read through the positions any more; they are rebuilt from the file when it is
        // open again.
        *self.positions.lock() = PositionIndex::default();
        // The last reference: the file is closed (and unlocked) here.
        drop(db);
        // Check that it really is free: a lock of our own would make the other process fail.
        let file = std::fs::File::open(&self.path).map_err(store)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(()),
            Err(e) => Err(store(std::io::Error::other(format!(
                "{} is still locked after it was released: {e}",
                self.path.display()
            )))),
        }
    }

    /// Opens the file again after [`Catalog::release`] (a handover that failed): operations work
    /// again, and read what the file holds now, changes made meanwhile by another process included
    /// (the in-memory discovery positions are rebuilt from the file). Does nothing if the catalog is
    /// open.
    ///
    /// # Errors
    /// [`CatalogError::Locked`] if another process holds the file now; [`CatalogError::Schema`] if
    /// one has marked it with a schema this build does not read; any store error. The catalog stays
    /// released on error.
    pub fn reacquire(&self) -> Result<(), CatalogError> {
        let _switch = self.db.switch.lock();
        if self.db.state.lock().db.is_some() {
            return Ok(());
        }
        let db = open_db(&self.path)?;
        // Released, so nobody has read the positions since `release` cleared them; cleared again in
        // case the file changed under an earlier state all the same.
        *self.positions.lock() = PositionIndex::default();
        self.db.state.lock().db = Some(Arc::new(db));
        Ok(())
    }

    /// True from [`Catalog::release`] on until [`Catalog::reacquire`] succeeds.
    #[must_use]
    pub fn is_released(&self) -> bool {
        self.db.state.lock().db.is_none()
    }

    /// The open database, counted as in use until the returned value is dropped.
    fn db(&self) -> Result<DbUse, CatalogError> {
        let mut state = self.db.state.lock();
        let Some(db) = state.db.clone() else {
            return Err(CatalogError::Released { path: self.path.clone() });
        };
        state.users += 1;
        Ok(DbUse { db, _count: UseCount(self.db.clone()) })
    }

    /// A read transaction.
    fn read(&self) -> Result<ReadTxn, CatalogError> {
        let use_ = self.db()?;
        Ok(ReadTxn { txn: use_.db.begin_read().map_err(store)?, _use: use_ })
    }

    /// The backend recorded for this catalog's volumes, if one is.
    pub fn backend(&self) -> Result<Option<BackendRecord>, CatalogError> {
        let Some(kind) = self.meta(META_BACKEND_KIND)? else { return Ok(None) };
        let location = self.meta(META_BACKEND_LOCATION)?.unwrap_or_default();
        let durable = self.meta(META_BACKEND_DURABLE)?.is_none_or(|v| v.first() != Some(&0));
        Ok(Some(BackendRecord {
            kind: String::from_utf8_lossy(&kind).into_owned(),
            location: String::from_utf8_lossy(&location).into_owned(),
            durable,
        }))
    }

    /// Sum of the sizes of all volumes in the catalog (any state), in bytes.
    pub fn provisioned_bytes(&self) -> Result<u64, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(META).map_err(store)?;
        Ok(meta_u64(&t, META_PROVISIONED)?.unwrap_or(0))
    }

    /// The catalog file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a write transaction.
    pub fn begin(&self) -> Result<CatalogTxn, CatalogError> {
        let use_ = self.db()?;
        Ok(CatalogTxn {
            txn: use_.db.begin_write().map_err(store)?,
            positions: self.positions.clone(),
            deltas: Vec::new(),
            _use: use_,
        })
    }

    /// A meta value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(META).map_err(store)?;
        Ok(t.get(key).map_err(store)?.map(|v| v.value().to_vec()))
    }

    /// The volume `name`.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(VOLUMES).map_err(store)?;
        let v = t.get(name).map_err(store)?;
        v.map(|v| decode_volume(name, v.value())).transpose()
    }

    /// The snapshot `volume@snapshot`.
    pub fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Option<SnapshotRecord>, CatalogError> {
        let key = format!("{volume}@{snapshot}");
        let r = self.read()?;
        let t = r.open_table(SNAPSHOTS).map_err(store)?;
        let v = t.get(key.as_str()).map_err(store)?;
        v.map(|v| decode(&key, v.value())).transpose()
    }

    /// Up to `limit` volumes with names starting with `prefix`, after `after` (exclusive), in name
    /// order — for paging through a million.
    pub fn volumes(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VolumeRecord>, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(VOLUMES).map_err(store)?;
        let mut out = Vec::new();
        let range = match after {
            Some(a) => t.range::<&str>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => t.range::<&str>(prefix..),
        }
        .map_err(store)?;
        for entry in range {
            let (k, v) = entry.map_err(store)?;
            if !k.value().starts_with(prefix) {
                if k.value() > prefix {
                    break;
                }
                continue;
            }
            out.push(decode_volume(k.value(), v.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The first of `names` that is a volume in the catalog (one read transaction for all).
    pub fn first_existing<'a>(
        &self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<&'a str>, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(VOLUMES).map_err(store)?;
        for name in names {
            if t.get(name).map_err(store)?.is_some() {
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Number of volumes.
    pub fn volume_count(&self) -> Result<u64, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(VOLUMES).map_err(store)?;
        t.len().map_err(store)
    }

    /// Snapshots of `volume`, in name order.
    pub fn snapshots_of(&self, volume: &str) -> Result<Vec<SnapshotRecord>, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(SNAPSHOTS).map_err(store)?;
        let start = format!("{volume}@");
        let mut out = Vec::new();
        for entry in t.range::<&str>(start.as_str()..).map_err(store)? {
            let (k, v) = entry.map_err(store)?;
            if !k.value().starts_with(&start) {
                break;
            }
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Volumes cloned from `volume@snapshot` (an index read).
    pub fn clones_of(&self, volume: &str, snapshot: &str) -> Result<Vec<String>, CatalogError> {
        let r = self.read()?;
        let t = r.open_multimap_table(CLONES).map_err(store)?;
        let mut out = Vec::new();
        for v in t.get(format!("{volume}@{snapshot}").as_str()).map_err(store)? {
            out.push(v.map_err(store)?.value().to_owned());
        }
        Ok(out)
    }

    /// Volumes cloned from any snapshot of `volume` (an index range read).
    pub fn clones_of_volume(&self, volume: &str) -> Result<Vec<String>, CatalogError> {
        let r = self.read()?;
        let t = r.open_multimap_table(CLONES).map_err(store)?;
        // Keys are `volume@snapshot`; name characters sort after '@' only from 'A' on, and a key of
        // another volume with this one as a prefix continues with a character other than '@'.
        let (start, end) = (format!("{volume}@"), format!("{volume}A"));
        let mut out = Vec::new();
        for entry in t.range::<&str>(start.as_str()..end.as_str()).map_err(store)? {
            let (k, values) = entry.map_err(store)?;
            if !k.value().starts_with(&start) {
                continue;
            }
            for v in values {
                out.push(v.map_err(store)?.value().to_owned());
            }
        }
        Ok(out)
    }

    /// Names of the volumes `hostnqn` may connect to (its own entries and those open to any host), in
    /// name order. Reads both lists whole: discovery reads windows ([`Catalog::discovery_range`]).
    pub fn volumes_for_host(&self, hostnqn: &str) -> Result<Vec<String>, CatalogError> {
        let len = self.discovery_len(hostnqn)?;
        let mut out = self.discovery_range(hostnqn, 0, usize::try_from(len).unwrap_or(usize::MAX))?;
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// The lists making up `hostnqn`'s discovery list, in order: its own, then the any-host one.
    fn discovery_lists_of(hostnqn: &str) -> [Option<&str>; 2] {
        // A host calling itself "*" has no list of its own (that name is the any-host list).
        [(hostnqn != ANY_HOST).then_some(hostnqn), Some(ANY_HOST)]
    }

    /// Number of volumes in `hostnqn`'s discovery list: those it is allowed, and those open to any
    /// host. Work: bounded by a few hundred index entries, whatever the number of volumes.
    pub fn discovery_len(&self, hostnqn: &str) -> Result<u64, CatalogError> {
        let mut positions = self.positions.lock();
        let r = self.read()?;
        let t = r.open_table(DISCOVERY).map_err(store)?;
        let mut n = 0u64;
        for list in Self::discovery_lists_of(hostnqn).into_iter().flatten() {
            n = n.saturating_add(positions.len(&t, list)?);
        }
        Ok(n)
    }

    /// Names of the volumes at positions `first .. first + count` of `hostnqn`'s discovery list
    /// (fewer where it ends): the host's own volumes in name order, then those open to any host in
    /// name order — the same order for as long as the catalog does not change. Work: the window plus
    /// at most a few hundred index entries, whatever the number of volumes.
    pub fn discovery_range(
        &self,
        hostnqn: &str,
        first: u64,
        count: usize,
    ) -> Result<Vec<String>, CatalogError> {
        let mut positions = self.positions.lock();
        let r = self.read()?;
        let t = r.open_table(DISCOVERY).map_err(store)?;
        let mut out = Vec::new();
        let mut first = first;
        for list in Self::discovery_lists_of(hostnqn).into_iter().flatten() {
            let want = count - out.len();
            if want == 0 {
                break;
            }
            let len = positions.len(&t, list)?;
            if first >= len {
                first -= len;
                continue;
            }
            out.extend(positions.range(&t, list, first, want)?);
            first = 0;
        }
        Ok(out)
    }

    /// True if volume `name` is in `hostnqn`'s discovery list (an index lookup).
    pub fn discovery_lists(&self, hostnqn: &str, name: &str) -> Result<bool, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(DISCOVERY).map_err(store)?;
        for list in Self::discovery_lists_of(hostnqn).into_iter().flatten() {
            if t.get(entry_key(list, name).as_str()).map_err(store)?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Pending intents, oldest first.
    pub fn intents(&self) -> Result<Vec<(u64, Intent)>, CatalogError> {
        let r = self.read()?;
        let t = r.open_table(INTENTS).map_err(store)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(store)? {
            let (k, v) = entry.map_err(store)?;
            out.push((k.value(), decode(&format!("intent {}", k.value()), v.value())?));
        }
        Ok(out)
    }

    /// Size of the catalog file in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }
}

impl CatalogTxn {
    /// Reads a volume inside the transaction.
    pub fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, CatalogError> {
        let t = self.txn.open_table(VOLUMES).map_err(store)?;
        let v = t.get(name).map_err(store)?;
        v.map(|v| decode_volume(name, v.value())).transpose()
    }

    /// Reads a snapshot inside the transaction.
    pub fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Option<SnapshotRecord>, CatalogError> {
        let key = format!("{volume}@{snapshot}");
        let t = self.txn.open_table(SNAPSHOTS).map_err(store)?;
        let v = t.get(key.as_str()).map_err(store)?;
        v.map(|v| decode(&key, v.value())).transpose()
    }

    fn add_provisioned(&mut self, add: u64, sub: u64) -> Result<(), CatalogError> {
        if add == sub {
            return Ok(());
        }
        let mut t = self.txn.open_table(META).map_err(store)?;
        let now = meta_u64(&t, META_PROVISIONED)?.unwrap_or(0);
        let new = now.saturating_add(add).saturating_sub(sub);
        t.insert(META_PROVISIONED, new.to_le_bytes().as_slice()).map_err(store)?;
        Ok(())
    }

    /// Sum of the sizes of all volumes, as of this transaction.
    pub fn provisioned_bytes(&self) -> Result<u64, CatalogError> {
        let t = self.txn.open_table(META).map_err(store)?;
        Ok(meta_u64(&t, META_PROVISIONED)?.unwrap_or(0))
    }

    /// Records the backend the volumes live on.
    pub fn set_backend(&mut self, backend: &BackendRecord) -> Result<(), CatalogError> {
        self.set_meta(META_BACKEND_KIND, backend.kind.as_bytes())?;
        self.set_meta(META_BACKEND_LOCATION, backend.location.as_bytes())?;
        self.set_meta(META_BACKEND_DURABLE, &[u8::from(backend.durable)])
    }

    /// Inserts or replaces a volume, keeping the host index in step with its allowed hosts, the
    /// clone index with its origin, and the provisioned-bytes counter with its size.
    pub fn put_volume(&mut self, rec: &VolumeRecord) -> Result<(), CatalogError> {
        let old = self.volume(&rec.name)?;
        self.add_provisioned(rec.size_bytes, old.as_ref().map_or(0, |o| o.size_bytes))?;
        if old.is_none() {
            if let Some((v, snap)) = &rec.origin {
                let mut idx = self.txn.open_multimap_table(CLONES).map_err(store)?;
                idx.insert(format!("{v}@{snap}").as_str(), rec.name.as_str()).map_err(store)?;
            }
        }
        if let Some(old) = &old {
            self.unindex(old)?;
        }
        self.index(rec)?;
        let mut t = self.txn.open_table(VOLUMES).map_err(store)?;
        t.insert(rec.name.as_str(), encode_volume(rec).as_slice()).map_err(store)?;
        Ok(())
    }

    /// Removes a volume and its snapshots (and its host and clone index entries).
    pub fn remove_volume_and_snapshots(&mut self, name: &str) -> Result<(), CatalogError> {
        for s in self.snapshot_names(name)? {
            self.remove_snapshot(name, &s)?;
        }
        self.remove_volume(name)
    }

    /// Removes every volume, snapshot and pending intent (their indexes too), keeping `meta` (the
    /// NQN prefix): for a backend whose volumes did not outlive the previous process. Returns the
    /// number of volumes removed.
    pub fn clear_volumes(&mut self) -> Result<u64, CatalogError> {
        let count = self.txn.open_table(VOLUMES).map_err(store)?.len().map_err(store)?;
        self.txn.delete_table(VOLUMES).map_err(store)?;
        self.txn.delete_table(SNAPSHOTS).map_err(store)?;
        self.txn.delete_table(INTENTS).map_err(store)?;
        self.txn.delete_table(DISCOVERY).map_err(store)?;
        self.deltas.push(Delta::Reset);
        self.txn.delete_multimap_table(CLONES).map_err(store)?;
        self.txn.open_table(VOLUMES).map_err(store)?;
        self.txn.open_table(SNAPSHOTS).map_err(store)?;
        self.txn.open_table(INTENTS).map_err(store)?;
        self.txn.open_table(DISCOVERY).map_err(store)?;
        self.txn.open_multimap_table(CLONES).map_err(store)?;
        self.set_meta(META_PROVISIONED, &0u64.to_le_bytes())?;
        Ok(count)
    }

    /// Removes a volume (and its host and clone index entries); its snapshots stay (see
    /// [`CatalogTxn::remove_volume_and_snapshots`]).
    pub fn remove_volume(&mut self, name: &str) -> Result<(), CatalogError> {
        if let Some(old) = self.volume(name)? {
            self.add_provisioned(0, old.size_bytes)?;
            if let Some((v, snap)) = &old.origin {
                let mut idx = self.txn.open_multimap_table(CLONES).map_err(store)?;
                idx.remove(format!("{v}@{snap}").as_str(), name).map_err(store)?;
            }
            self.unindex(&old)?;
        }
        let mut t = self.txn.open_table(VOLUMES).map_err(store)?;
        t.remove(name).map_err(store)?;
        Ok(())
    }

    /// Inserts or replaces a snapshot.
    pub fn put_snapshot(&mut self, rec: &SnapshotRecord) -> Result<(), CatalogError> {
        let key = format!("{}@{}", rec.volume, rec.name);
        let mut t = self.txn.open_table(SNAPSHOTS).map_err(store)?;
        t.insert(key.as_str(), encode(rec).as_slice()).map_err(store)?;
        Ok(())
    }

    /// Removes a snapshot.
    pub fn remove_snapshot(&mut self, volume: &str, snapshot: &str) -> Result<(), CatalogError> {
        let key = format!("{volume}@{snapshot}");
        let mut t = self.txn.open_table(SNAPSHOTS).map_err(store)?;
        t.remove(key.as_str()).map_err(store)?;
        Ok(())
    }

    /// Names of the snapshots of `volume`.
    pub fn snapshot_names(&self, volume: &str) -> Result<Vec<String>, CatalogError> {
        let t = self.txn.open_table(SNAPSHOTS).map_err(store)?;
        let start = format!("{volume}@");
        let mut out = Vec::new();
        for entry in t.range::<&str>(start.as_str()..).map_err(store)? {
            let (k, _) = entry.map_err(store)?;
            match k.value().strip_prefix(&start) {
                Some(snap) => out.push(snap.to_owned()),
                None => break,
            }
        }
        Ok(out)
    }

    /// Records an intent; returns its id.
    pub fn add_intent(&mut self, intent: &Intent) -> Result<u64, CatalogError> {
        let mut t = self.txn.open_table(INTENTS).map_err(store)?;
        let id = t.last().map_err(store)?.map_or(1, |(k, _)| k.value() + 1);
        t.insert(id, encode(intent).as_slice()).map_err(store)?;
        Ok(id)
    }

    /// Removes an intent (the operation is committed or undone).
    pub fn remove_intent(&mut self, id: u64) -> Result<(), CatalogError> {
        let mut t = self.txn.open_table(INTENTS).map_err(store)?;
        t.remove(id).map_err(store)?;
        Ok(())
    }

    /// Sets a meta value.
    pub fn set_meta(&mut self, key: &str, value: &[u8]) -> Result<(), CatalogError> {
        let mut t = self.txn.open_table(META).map_err(store)?;
        t.insert(key, value).map_err(store)?;
        Ok(())
    }

    /// Adds a volume's discovery index entries.
    fn index(&mut self, rec: &VolumeRecord) -> Result<(), CatalogError> {
        let mut idx = self.txn.open_table(DISCOVERY).map_err(store)?;
        for list in index_keys(rec) {
            if idx.insert(entry_key(list, &rec.name).as_str(), ()).map_err(store)?.is_none() {
                self.deltas.push(Delta::Add(list.to_owned(), rec.name.clone()));
            }
        }
        Ok(())
    }

    /// Removes a volume's discovery index entries.
    fn unindex(&mut self, rec: &VolumeRecord) -> Result<(), CatalogError> {
        let mut idx = self.txn.open_table(DISCOVERY).map_err(store)?;
        for list in index_keys(rec) {
            if idx.remove(entry_key(list, &rec.name).as_str()).map_err(store)?.is_some() {
                self.deltas.push(Delta::Remove(list.to_owned(), rec.name.clone()));
            }
        }
        Ok(())
    }

    /// Makes everything in the transaction durable (fsync) or nothing.
    pub fn commit(self) -> Result<(), CatalogError> {
        let Self { txn, positions, deltas, _use } = self;
        if deltas.is_empty() {
            return txn.commit().map_err(store);
        }
        // Readers of the discovery index wait for the commit: they see the table and the positions
        // both before it or both after it.
        let mut positions = positions.lock();
        match txn.open_table(DISCOVERY) {
            Ok(t) => positions.apply(&t, &deltas),
            Err(_) => *positions = PositionIndex::default(),
        }
        let r = txn.commit().map_err(store);
        if r.is_err() {
            // Nothing was committed: start again from the table as it is.
            *positions = PositionIndex::default();
        }
        r
    }
}

/// Discovery lists a volume is in: only ready volumes are discoverable, and a volume any host may
/// use is in the any-host list only (so that no host's list has it twice).
fn index_keys(rec: &VolumeRecord) -> Vec<&str> {
    if rec.state != VolumeState::Ready {
        return Vec::new();
    }
    if rec.allow_any_host {
        return vec![ANY_HOST];
    }
    rec.allowed_hosts.iter().map(String::as_str).filter(|h| *h != ANY_HOST).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, hosts: &[&str]) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            size_bytes: 1 << 30,
            block_size: 512,
            compression: None,
            origin: None,
            nqn: format!("nqn.x:{name}"),
            nguid: [1; 16],
            uuid: [2; 16],
            serial: "S".into(),
            allow_any_host: false,
            allowed_hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            state: VolumeState::Ready,
            created_unix_s: 0,
            require_auth: false,
            dhchap_hosts: Vec::new(),
        }
    }

    #[test]
    fn records_indexes_and_intents_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.redb");
        {
            let cat = Catalog::open(&path).unwrap();
            let mut t = cat.begin().unwrap();
            t.put_volume(&rec("a", &["h1"])).unwrap();
            t.put_volume(&rec("b", &["h1", "h2"])).unwrap();
            let mut c = rec("c", &[]);
            c.allow_any_host = true;
            t.put_volume(&c).unwrap();
            t.put_snapshot(&SnapshotRecord {
                volume: "a".into(),
                name: "s1".into(),
                size_bytes: 1,
                state: VolumeState::Ready,
                created_unix_s: 0,
            })
            .unwrap();
            let id = t.add_intent(&Intent::Create { names: vec!["d".into()] }).unwrap();
            assert_eq!(id, 1);
            t.commit().unwrap();
            // Not committed: gone.
            let mut t = cat.begin().unwrap();
            t.put_volume(&rec("zzz", &["h1"])).unwrap();
            drop(t);
        }
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.volume_count().unwrap(), 3);
        assert_eq!(cat.volumes_for_host("h1").unwrap(), ["a", "b", "c"]);
        assert_eq!(cat.volumes_for_host("h2").unwrap(), ["b", "c"]);
        assert_eq!(cat.volumes_for_host("h3").unwrap(), ["c"]);
        assert_eq!(cat.snapshots_of("a").unwrap().len(), 1);
        assert_eq!(cat.intents().unwrap(), [(1, Intent::Create { names: vec!["d".into()] })]);
        // Changing allowed hosts moves the index entries.
        let mut t = cat.begin().unwrap();
        t.put_volume(&rec("b", &["h3"])).unwrap();
        t.remove_volume("a").unwrap();
        t.remove_intent(1).unwrap();
        t.commit().unwrap();
        assert_eq!(cat.volumes_for_host("h1").unwrap(), ["c"]);
        assert_eq!(cat.volumes_for_host("h3").unwrap(), ["b", "c"]);
        assert!(cat.intents().unwrap().is_empty());
        let names: Vec<String> = cat.volumes("", None, 10).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["b", "c"]);
        let names: Vec<String> =
            cat.volumes("", Some("b"), 10).unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["c"]);
    }

    /// The first record layout, as the previous build wrote it.
    #[derive(Serialize)]
    struct V1 {
        name: String,
        size_bytes: u64,
        block_size: u32,
        compression: Option<String>,
        origin: Option<(String, String)>,
        nqn: String,
        nguid: [u8; 16],
        uuid: [u8; 16],
        serial: String,
        allow_any_host: bool,
        allowed_hosts: Vec<String>,
        state: VolumeState,
        created_unix_s: u64,
    }

    fn v1(name: &str, hosts: &[&str]) -> V1 {
        V1 {
            name: name.to_owned(),
            size_bytes: 1 << 30,
            block_size: 512,
            compression: Some("lz4".into()),
            origin: None,
            nqn: format!("nqn.x:{name}"),
            nguid: [1; 16],
            uuid: [2; 16],
            serial: "S".into(),
            allow_any_host: false,
            allowed_hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            state: VolumeState::Ready,
            created_unix_s: 7,
        }
    }

    /// Writes a catalog as a schema-1 build left it: schema 1 in meta, first-layout records, no
    /// provisioned-bytes counter.
    fn write_v1_catalog(path: &Path, records: &[V1]) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert("schema", 1u32.to_le_bytes().as_slice()).unwrap();
            let mut vols = txn.open_table(VOLUMES).unwrap();
            let mut idx = txn.open_multimap_table(HOST_VOLUMES).unwrap();
            for r in records {
                vols.insert(r.name.as_str(), postcard::to_stdvec(r).unwrap().as_slice()).unwrap();
                for h in &r.allowed_hosts {
                    idx.insert(h.as_str(), r.name.as_str()).unwrap();
                }
            }
        }
        txn.commit().unwrap();
    }

    #[test]
    fn schema_1_catalog_opens_and_its_records_read_without_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.redb");
        write_v1_catalog(&path, &[v1("a", &["h1"]), v1("b", &[])]);
        let cat = Catalog::open(&path).unwrap();
        // Marked the new version (an older build refuses it from now on).
        assert_eq!(cat.meta("schema").unwrap().unwrap(), SCHEMA_VERSION.to_le_bytes());
        let a = cat.volume("a").unwrap().unwrap();
        assert_eq!(a.name, "a");
        assert_eq!(a.compression.as_deref(), Some("lz4"));
        assert_eq!(a.allowed_hosts, ["h1"]);
        assert_eq!(a.created_unix_s, 7);
        assert!(!a.require_auth);
        assert!(a.dhchap_hosts.is_empty());
        assert_eq!(cat.volumes("", None, 10).unwrap().len(), 2);
        assert_eq!(cat.provisioned_bytes().unwrap(), 2 << 30, "counted from old records");
        assert_eq!(cat.volumes_for_host("h1").unwrap(), ["a"]);
        // A changed record is written in the new layout; the untouched one stays readable.
        let mut t = cat.begin().unwrap();
        t.put_volume(&VolumeRecord { require_auth: true, dhchap_hosts: vec!["h1".into()], ..a.clone() })
            .unwrap();
        t.commit().unwrap();
        drop(cat);
        let cat = Catalog::open(&path).unwrap();
        let a2 = cat.volume("a").unwrap().unwrap();
        assert!(a2.require_auth);
        assert_eq!(a2.dhchap_hosts, ["h1"]);
        assert_eq!(VolumeRecord { require_auth: false, dhchap_hosts: Vec::new(), ..a2 }, a);
        assert!(!cat.volume("b").unwrap().unwrap().require_auth);
        let r = cat.read().unwrap();
        let raw = r.open_table(VOLUMES).unwrap().get("a").unwrap().unwrap().value().to_vec();
        assert_eq!(raw[..2], [RECORD_TAG, RECORD_VERSION]);
    }

    #[test]
    fn newer_schema_and_unknown_record_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let newer = SCHEMA_VERSION + 1;
            txn.open_table(META).unwrap().insert("schema", newer.to_le_bytes().as_slice()).unwrap();
            txn.commit().unwrap();
        }
        assert!(
            matches!(Catalog::open(&path), Err(CatalogError::Schema { found }) if found == SCHEMA_VERSION + 1)
        );
        let e = decode_volume("x", &[RECORD_TAG, 9, 1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        assert!(decode_volume("x", &[RECORD_TAG]).is_err());
        assert!(decode_volume("x", &[]).is_err());
    }

    #[test]
    fn clone_index_follows_origins() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::open(dir.path().join("c.redb")).unwrap();
        let clone = |name: &str, vol: &str, snap: &str| VolumeRecord {
            origin: Some((vol.into(), snap.into())),
            ..rec(name, &[])
        };
        let mut t = cat.begin().unwrap();
        for r in [
            rec("a", &[]),
            clone("c1", "a", "s1"),
            clone("c2", "a", "s1"),
            clone("c3", "a", "s2"),
            // Volumes whose names start with "a" and their clones must not be mixed up with a's.
            clone("d1", "a-b", "s1"),
            clone("d2", "aB", "s1"),
            clone("d3", "a.x", "s1"),
        ] {
            t.put_volume(&r).unwrap();
        }
        t.commit().unwrap();
        assert_eq!(cat.clones_of("a", "s1").unwrap(), ["c1", "c2"]);
        assert_eq!(cat.clones_of("a", "s3").unwrap(), Vec::<String>::new());
        assert_eq!(cat.clones_of_volume("a").unwrap(), ["c1", "c2", "c3"]);
        assert_eq!(cat.clones_of_volume("a-b").unwrap(), ["d1"]);
        let mut t = cat.begin().unwrap();
        t.remove_volume("c1").unwrap();
        t.put_volume(&clone("c2", "a", "s1")).unwrap(); // replacing keeps one entry
        t.commit().unwrap();
        assert_eq!(cat.clones_of("a", "s1").unwrap(), ["c2"]);
        assert_eq!(cat.clones_of_volume("a").unwrap(), ["c2", "c3"]);
    }

    /// The discovery list `hostnqn` should see, from a model: its own volumes, then the any-host ones.
    fn model_list(
        own: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        any: &std::collections::BTreeSet<String>,
        host: &str,
    ) -> Vec<String> {
        let mut out: Vec<String> = own.get(host).map(|s| s.iter().cloned().collect()).unwrap_or_default();
        out.extend(any.iter().cloned());
        out
    }

    fn check_windows(
        cat: &Catalog,
        own: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        any: &std::collections::BTreeSet<String>,
    ) {
        for host in ["h1", "h2", "h3"] {
            let expected = model_list(own, any, host);
            assert_eq!(cat.discovery_len(host).unwrap(), expected.len() as u64, "{host}");
            let len = expected.len();
            let mut pos = 0;
            while pos <= len + 3 {
                for count in [1, 4, 9] {
                    let got = cat.discovery_range(host, pos as u64, count).unwrap();
                    let want: Vec<String> = expected.iter().skip(pos).take(count).cloned().collect();
                    assert_eq!(got, want, "{host} at {pos}, {count}");
                }
                pos += 61;
            }
            for name in expected.iter().step_by(97) {
                assert!(cat.discovery_lists(host, name).unwrap());
            }
        }
        assert!(!cat.discovery_lists("h3", "nope").unwrap());
    }

    /// Whether another process (`flock(1)`) can take the file's lock right now.
    fn lockable_by_another_process(path: &Path) -> bool {
        std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(path)
            .arg("true")
            .status()
            .expect("flock(1) from util-linux")
            .success()
    }

    #[test]
    fn released_catalog_is_taken_by_another_handle_and_reacquired_with_its_changes() {
        use std::collections::{BTreeMap, BTreeSet};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.redb");
        let cat = Arc::new(Catalog::open(&path).unwrap());
        let mut own: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut any: BTreeSet<String> = BTreeSet::new();
        let any_rec = |name: &str| VolumeRecord { allow_any_host: true, ..rec(name, &[]) };
        // Long lists (with position buckets once read) and a short one.
        let mut t = cat.begin().unwrap();
        for i in 0..1500 {
            let name = format!("v{:05}", i * 2);
            t.put_volume(&any_rec(&name)).unwrap();
            any.insert(name);
        }
        for i in 0..600 {
            let name = format!("h1-{i:04}");
            t.put_volume(&rec(&name, &["h1"])).unwrap();
            own.entry("h1".into()).or_default().insert(name);
        }
        t.put_volume(&rec("h2-a", &["h2"])).unwrap();
        own.entry("h2".into()).or_default().insert("h2-a".into());
        t.commit().unwrap();
        check_windows(&cat, &own, &any);
        assert_eq!(cat.positions.lock().indexed_lists(), 2);

        // Open here: locked for another handle of this process and for another process.
        assert!(matches!(Catalog::open(&path), Err(CatalogError::Locked { .. })));
        assert!(!lockable_by_another_process(&path));
        assert!(!cat.is_released());

        // A transaction in progress holds the release back, and is committed whole.
        let mut t = cat.begin().unwrap();
        t.put_volume(&rec("h2-b", &["h2"])).unwrap();
        own.get_mut("h2").unwrap().insert("h2-b".into());
        let releasing = {
            let cat = cat.clone();
            std::thread::spawn(move || cat.release())
        };
        while !cat.is_released() {
            std::thread::yield_now();
        }
        // Released from the caller's view (no new operation starts, none waits) ...
        assert!(matches!(cat.volume("h2-a"), Err(CatalogError::Released { .. })));
        assert!(matches!(cat.begin(), Err(CatalogError::Released { .. })));
        // ... but the file is still open: the release waits for the transaction.
        assert!(!releasing.is_finished());
        assert!(matches!(Catalog::open(&path), Err(CatalogError::Locked { .. })));
        t.commit().unwrap();
        releasing.join().unwrap().unwrap();
        assert!(cat.is_released());
        cat.release().unwrap(); // again: nothing to do

        // Every operation fails with Released, at once.
        let released = |r: Result<(), CatalogError>| match r {
            Err(e @ CatalogError::Released { .. }) => {
                assert!(e.to_string().contains("handed to another process"), "{e}");
                assert!(e.to_string().contains("handover.redb"), "{e}");
            }
            other => panic!("expected Released, got {other:?}"),
        };
        released(cat.volume("h2-a").map(drop));
        released(cat.begin().map(drop));
        released(cat.meta("schema").map(drop));
        released(cat.volumes("", None, 10).map(drop));
        released(cat.volume_count().map(drop));
        released(cat.discovery_len("h1").map(drop));
        released(cat.discovery_range("h1", 700, 5).map(drop));
        released(cat.discovery_lists("h1", "h1-0001").map(drop));
        released(cat.volumes_for_host("h2").map(drop));
        released(cat.intents().map(drop));
        released(cat.provisioned_bytes().map(drop));
        released(cat.backend().map(drop));
        released(cat.snapshots_of("h2-a").map(drop));
        released(cat.clones_of_volume("h2-a").map(drop));
        released(cat.first_existing(["h2-a"]).map(drop));

        // Free for another process, and for another handle, which sees the last commit and changes
        // the long lists (so that positions kept from before would be wrong).
        assert!(lockable_by_another_process(&path));
        let other = Catalog::open(&path).unwrap();
        assert!(other.volume("h2-b").unwrap().is_some(), "the transaction that held the release back");
        // While the other holds it, it cannot be taken back.
        assert!(matches!(cat.reacquire(), Err(CatalogError::Locked { .. })));
        assert!(cat.is_released());
        let mut t = other.begin().unwrap();
        for i in 0..700 {
            let name = format!("v{:05}", i * 4 + 1);
            t.put_volume(&any_rec(&name)).unwrap();
            any.insert(name);
        }
        for i in 0..400 {
            let name = format!("v{:05}", i * 2);
            t.remove_volume(&name).unwrap();
            any.remove(&name);
        }
        for i in 0..100 {
            let name = format!("h1-{i:04}");
            t.remove_volume(&name).unwrap();
            own.get_mut("h1").unwrap().remove(&name);
        }
        t.put_volume(&VolumeRecord { state: VolumeState::Deleting, ..rec("h2-a", &["h2"]) }).unwrap();
        own.get_mut("h2").unwrap().remove("h2-a");
        t.set_meta("nqn_prefix", b"nqn.other").unwrap();
        t.commit().unwrap();
        check_windows(&other, &own, &any);
        drop(other);

        // Taken back: the other handle's changes, discovery lists included.
        cat.reacquire().unwrap();
        assert!(!cat.is_released());
        cat.reacquire().unwrap(); // again: nothing to do
        assert_eq!(cat.meta("nqn_prefix").unwrap().unwrap(), b"nqn.other");
        assert_eq!(cat.volume("h2-a").unwrap().unwrap().state, VolumeState::Deleting);
        check_windows(&cat, &own, &any);
        assert_eq!(cat.volumes_for_host("h2").unwrap().len(), 1 + any.len());
        // And it works as before: writes, locked for others.
        let mut t = cat.begin().unwrap();
        t.remove_volume("h1-0200").unwrap();
        own.get_mut("h1").unwrap().remove("h1-0200");
        t.commit().unwrap();
        check_windows(&cat, &own, &any);
        assert!(!lockable_by_another_process(&path));
    }

    #[test]
    fn reacquire_refuses_a_catalog_marked_with_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.redb");
        let cat = Catalog::open(&path).unwrap();
        cat.release().unwrap();
        {
            // The other process is a newer build that moved the catalog on.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert("schema", (SCHEMA_VERSION + 1).to_le_bytes().as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(
            matches!(cat.reacquire(), Err(CatalogError::Schema { found }) if found == SCHEMA_VERSION + 1)
        );
        assert!(cat.is_released());
        assert!(matches!(cat.volume_count(), Err(CatalogError::Released { .. })));
    }

    #[test]
    fn discovery_windows_follow_the_index_through_changes() {
        use std::collections::{BTreeMap, BTreeSet};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.redb");
        let cat = Catalog::open(&path).unwrap();
        let mut own: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut any: BTreeSet<String> = BTreeSet::new();
        let any_rec = |name: &str| VolumeRecord { allow_any_host: true, ..rec(name, &[]) };

        // 3,000 any-host volumes (long list: buckets), 700 of h1's own (long), 10 of h2's (short),
        // and one open to any host that also names h1 (listed once, with the any-host ones).
        let mut t = cat.begin().unwrap();
        for i in 0..3000 {
            let name = format!("v{:06}", i * 10);
            t.put_volume(&any_rec(&name)).unwrap();
            any.insert(name);
        }
        for i in 0..700 {
            let name = format!("h1-{i:04}");
            t.put_volume(&rec(&name, &["h1"])).unwrap();
            own.entry("h1".into()).or_default().insert(name);
        }
        for i in 0..10 {
            let name = format!("h2-{i:02}");
            t.put_volume(&rec(&name, &["h2"])).unwrap();
            own.entry("h2".into()).or_default().insert(name);
        }
        t.put_volume(&VolumeRecord { allow_any_host: true, ..rec("both", &["h1"]) }).unwrap();
        any.insert("both".into());
        t.commit().unwrap();
        check_windows(&cat, &own, &any);
        assert_eq!(cat.positions.lock().indexed_lists(), 2, "the two long lists have buckets");

        // A window far into a long list reads a bucket at most, besides the window.
        discovery::ENTRIES_READ.with(|n| n.set(0));
        let got = cat.discovery_range("h1", 2900, 4).unwrap();
        assert_eq!(got, model_list(&own, &any, "h1")[2900..2904]);
        let read = discovery::ENTRIES_READ.with(|n| n.get());
        assert!(read <= u64::from(2 * discovery::BUCKET) + 4, "{read} index entries read");

        // Many names landing in one bucket (splits), in one transaction.
        let mut t = cat.begin().unwrap();
        for i in 0..2500 {
            let name = format!("v{:06}", 15_000 + i * 2 + 1);
            t.put_volume(&any_rec(&name)).unwrap();
            any.insert(name);
        }
        t.commit().unwrap();
        assert_eq!(cat.positions.lock().indexed_lists(), 2, "kept in step, not forgotten and rebuilt");
        check_windows(&cat, &own, &any);
        // Removals (emptying whole buckets), names before the first and after the last.
        let mut t = cat.begin().unwrap();
        for i in 0..1500 {
            let name = format!("v{:06}", i * 10);
            t.remove_volume(&name).unwrap();
            any.remove(&name);
        }
        for name in ["a-first", "zz-last"] {
            t.put_volume(&any_rec(name)).unwrap();
            any.insert(name.into());
        }
        t.commit().unwrap();
        assert_eq!(cat.positions.lock().indexed_lists(), 2, "kept in step, not forgotten and rebuilt");
        check_windows(&cat, &own, &any);
        // A volume leaving the any-host list for h1's, one deleted, one no longer ready.
        let mut t = cat.begin().unwrap();
        t.put_volume(&rec("both", &["h1"])).unwrap();
        any.remove("both");
        own.get_mut("h1").unwrap().insert("both".into());
        t.remove_volume("h1-0003").unwrap();
        own.get_mut("h1").unwrap().remove("h1-0003");
        t.put_volume(&VolumeRecord { state: VolumeState::Deleting, ..rec("h2-05", &["h2"]) }).unwrap();
        own.get_mut("h2").unwrap().remove("h2-05");
        t.commit().unwrap();
        assert_eq!(cat.positions.lock().indexed_lists(), 2, "kept in step, not forgotten and rebuilt");
        check_windows(&cat, &own, &any);
        // A transaction dropped without commit changes nothing.
        let mut t = cat.begin().unwrap();
        for i in 0..600 {
            t.put_volume(&any_rec(&format!("x{i:04}"))).unwrap();
        }
        drop(t);
        check_windows(&cat, &own, &any);
        // Reopened: the same lists (positions rebuilt from the table when asked for).
        drop(cat);
        let cat = Catalog::open(&path).unwrap();
        assert_eq!(cat.positions.lock().indexed_lists(), 0);
        check_windows(&cat, &own, &any);
        assert_eq!(cat.volumes_for_host("h2").unwrap().len(), 9 + any.len());
        // Cleared: nothing left to discover.
        let mut t = cat.begin().unwrap();
        t.clear_volumes().unwrap();
        t.commit().unwrap();
        assert_eq!(cat.discovery_len("h1").unwrap(), 0);
        assert!(cat.discovery_range("h1", 0, 10).unwrap().is_empty());
    }
}
