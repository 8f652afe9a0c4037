//! Durable storage, on one of two engines: sled in a directory (the
//! default, `store/sled_engine.rs`) or PostgreSQL (`store/pg_engine.rs`).
//! Only the engines touch sled or PostgreSQL; `Store` keeps everything
//! else (the audit chain, deferred writes, record limits, the commit gate)
//! the same on both.
//!
//! Key layout (one tree each, values are JSON; on PostgreSQL a tree is
//! the `tree` column of one key/value table):
//! - `docs`:    document name            → `DocRecord`
//! - `devices`: device id                → `DeviceRecord` (reported, desired,
//!   status, in-flight command = the outbox)
//! - `audit`:   sequence (u64 big-endian) → `AuditEntry`, append-only
//! - `meta`:    `"seq"`                  → last global sequence (u64 BE)
//! - `rollouts`: rollout name            → `RolloutRecord` (each device's
//!   part in a rollout is in its `DeviceRecord`, written in the same commits)
//! - `releases`: firmware version        → `ReleaseRecord` (the image is the
//!   file `firmware/<sha256>` in the data directory, fsynced before this)
//! - `governance`: `org/<name>` → `OrgRecord`, `policy/<version u64 BE as
//!   16 hex digits>` → `PolicyRecord`, `exception/<id>` → `ExceptionRecord`,
//!   `history/<org>/<unix ms as 16 hex digits>` → a compliance `Sample`
//!   (organisations, the security policy's versions and exceptions, and
//!   compliance over time: at most 2,000 samples per organisation)
//! - `secrets`: `<device id>\0<key name>` → `secrets::Slot` (the current
//!   and previous secret, each sealed with the secrets key, which is not
//!   stored here: see `crate::secrets`)
//!
//! Keys compare as bytes on both engines, so a walk over a tree meets its
//! records in the same order (audit sequences are big-endian for that).
//!
//! Durability: a commit is one transaction of the engine and `commit`
//! returns only once it is durable (sled: fsynced by us, see its engine;
//! PostgreSQL: COMMIT returned with `synchronous_commit` on, which the
//! engine checks at every connection).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{AuditEntry, DeviceRecord, DocRecord, ReleaseRecord};
use crate::rollout::RolloutRecord;

pub mod lease;
mod listen;
mod pg_client;
mod pg_engine;
mod shards;
mod sled_engine;

pub use lease::{Attempt, Lease};
pub use listen::{GlobalListener, Heard};
pub use shards::{Round, ShardKeeper};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store transaction: {0}")]
    Transaction(String),
    #[error("stored record {key:?} in {tree} is corrupt: {reason}")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
    /// The database cannot be reached (down, restarting, connection lost):
    /// like a full disk, the controller refuses writes, answers queries
    /// from memory and retries; the next operation connects again.
    #[error("store {store} is unavailable: {reason}")]
    Unavailable { store: String, reason: String },
    /// This controller's generation of a lease (`controller`, or a
    /// shard's) is no longer current: another controller took over (or it
    /// expired while the database was out of reach). Nothing was written;
    /// the controller must stop acting on what that lease guards.
    #[error("store {store}: generation {generation} of lease {lease:?} is not current (expired, or another controller took over): nothing written")]
    Fenced {
        store: String,
        lease: String,
        generation: i64,
    },
    /// The commit writes a record guarded by a lease this controller does
    /// not hold (a device of a shard it does not own, or a global record
    /// while it is not the leader). Nothing was written.
    #[error("store {store}: this controller does not hold lease {lease:?}, which guards {record}: nothing written")]
    NotHeld {
        store: String,
        lease: String,
        record: String,
    },
    /// The database refused an operation (`code` is its SQLSTATE).
    #[error("store {store}: {message} (SQLSTATE {code})")]
    Database {
        store: String,
        code: String,
        message: String,
    },
    /// The database would not keep acknowledged writes through a crash, or
    /// the location is not one we can use: refused before anything is
    /// written.
    #[error("store {store} refused: {reason}")]
    Refused { store: String, reason: String },
}

impl StoreError {
    /// True when the disk is full. The controller keeps answering queries
    /// from memory and retries the write; the store reopens itself once
    /// space is back.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Io(e) => Some(e),
            StoreError::Sled(sled::Error::Io(e)) => Some(e),
            // Opening writes too (snapshot, config): a restart on a full disk.
            StoreError::Open {
                source: sled::Error::Io(e),
                ..
            } => Some(e),
            _ => None,
        };
        if let StoreError::Database { code, .. } = self {
            // PostgreSQL's `disk_full`: its disk, not ours, but the same
            // remedy (free space, and the controller retries).
            return code == "53100";
        }
        io.is_some_and(|e| {
            e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
        })
    }

    /// True when the database cannot be reached: writes are refused and
    /// retried as on a full disk, queries are answered from memory.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// After this error the engine's handle is not trusted again: the next
    /// operation opens the database anew (sled keeps an I/O error on its
    /// handle for good; a PostgreSQL connection may be gone or in an
    /// aborted transaction).
    fn drops_engine(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_)
                | StoreError::Sled(sled::Error::Io(_))
                | StoreError::Unavailable { .. }
                | StoreError::Database { .. }
        )
    }
}

/// Where the store lives. `Display` and `Debug` never show a password.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A sled database in this directory.
    Sled(PathBuf),
    /// A PostgreSQL database, `postgres://user[:password]@host[:port]/db`
    /// (or libpq's `key=value` form).
    Postgres(String),
}

impl StoreLocation {
    /// A `--store` value: a `postgres://` or `postgresql://` URL. (sled is
    /// the default, chosen by giving none.)
    pub fn from_url(url: &str) -> Result<StoreLocation, StoreError> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Ok(StoreLocation::Postgres(url.to_owned()))
        } else {
            Err(StoreError::Refused {
                store: redact_url(url),
                reason: "not a store URL: expected postgres://user@host:port/database".into(),
            })
        }
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sled(path) => write!(f, "sled at {}", path.display()),
            StoreLocation::Postgres(url) => f.write_str(&redact_url(url)),
        }
    }
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// `url` with its password replaced by `***`, for errors and logs: the
/// URL form (`postgres://user:secret@host/db`, also `?password=secret`)
/// and libpq's `password=secret` keyword form.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let authority_end = out[auth_start..]
            .find(['/', '?'])
            .map_or(out.len(), |i| auth_start + i);
        // The last `@` of the authority ends the user info (a password may
        // hold `@` itself, which a careless URL leaves unescaped).
        if let Some(at) = out[auth_start..authority_end].rfind('@') {
            let userinfo = &out[auth_start..auth_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(auth_start + colon + 1..auth_start + at, "***");
            }
        }
    }
    redact_password_parameters(&out)
}

/// `password=…` up to the next `&` or whitespace (query string or
/// keyword/value form) becomes `password=***`.
fn redact_password_parameters(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.to_ascii_lowercase().find("password=") {
        let value_start = i + "password=".len();
        out.push_str(&rest[..value_start]);
        out.push_str("***");
        let value = &rest[value_start..];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            // libpq's quoted value: up to the closing quote, \' escaped.
            let mut end = quoted.len();
            let mut escaped = false;
            for (j, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '\'' if !escaped => {
                        end = j + 1;
                        break;
                    }
                    _ => escaped = false,
                }
            }
            1 + end.min(quoted.len())
        } else {
            value
                .find(|c: char| c == '&' || c.is_whitespace())
                .unwrap_or(value.len())
        };
        rest = &value[value_len..];
    }
    out.push_str(rest);
    out
}

/// Everything one commit writes, applied atomically.
#[derive(Debug, Default)]
pub struct Changes {
    pub docs: Vec<DocRecord>,
    /// Names of documents to delete.
    pub deleted_docs: Vec<String>,
    pub devices: Vec<Arc<DeviceRecord>>,
    pub audit: Vec<AuditEntry>,
    pub seq: Option<u64>,
    pub rollouts: Vec<RolloutRecord>,
    pub releases: Vec<ReleaseRecord>,
    /// Governance records by key (see the module's key layout); `None`
    /// deletes the key.
    pub governance: Vec<(String, Option<Vec<u8>>)>,
    /// Sharded: operator intents the leader numbered (the store keeps
    /// the highest number with them, see [`Store::intents`]).
    pub intents: Vec<crate::model::IntentRecord>,
    /// Sharded: intents every device they name has passed.
    pub pruned_intents: Vec<u64>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
            && self.deleted_docs.is_empty()
            && self.devices.is_empty()
            && self.audit.is_empty()
            && self.seq.is_none()
            && self.rollouts.is_empty()
            && self.releases.is_empty()
            && self.governance.is_empty()
            && self.intents.is_empty()
            && self.pruned_intents.is_empty()
    }
}

/// A commit's records as they are written (key, JSON value), shown to a
/// [`CommitGate`].
pub struct Pending<'a> {
    pub docs: &'a [(Vec<u8>, Vec<u8>)],
    pub devices: &'a [(Vec<u8>, Vec<u8>)],
}

/// Runs on the committing thread after a commit's fsync, before the commit
/// is reported done; its error fails the commit as an fsync error would.
/// The seam that lets a test hold commits (a slow disk) or fail them and
/// watch what the controller publishes meanwhile: a SIGKILL test cannot
/// tell "after fsync" from "after write", the page cache survives it.
/// `None` in production.
#[derive(Clone)]
pub struct CommitGate(Arc<GateFn>);

type GateFn = dyn Fn(&Pending<'_>) -> Result<(), StoreError> + Send + Sync;

impl CommitGate {
    pub fn new(f: impl Fn(&Pending<'_>) -> Result<(), StoreError> + Send + Sync + 'static) -> Self {
        CommitGate(Arc::new(f))
    }
}

impl std::fmt::Debug for CommitGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitGate")
    }
}

/// The largest record `commit` takes. On sled it also keeps every record
/// in the log segments we fsync (see `sled_engine::SEGMENT_SIZE`).
pub const MAX_RECORD: usize = 256 * 1024;
/// Audit entries kept in memory: `audit` queries are answered from there,
/// because reading the store fails while the disk is full or the database
/// is down.
pub const AUDIT_KEPT: usize = 1000;

pub struct Store {
    location: StoreLocation,
    cache_bytes: u64,
    /// `None` after an error that leaves the engine's handle untrusted
    /// ([`StoreError::drops_engine`]): the next operation opens it again.
    engine: std::sync::Mutex<Option<Engine>>,
    /// The newest [`AUDIT_KEPT`] stored audit entries, oldest first.
    recent_audit: std::sync::Mutex<std::collections::VecDeque<AuditEntry>>,
    /// Audit entries a failed commit could not write; written with the
    /// next commit that succeeds.
    deferred_audit: std::sync::Mutex<Vec<AuditEntry>>,
    /// Sequence and hash of the last audit entry stored: where the chain
    /// goes on.
    audit_head: std::sync::Mutex<(u64, String)>,
    /// Documents as they were before a commit that failed: it may have
    /// reached the disk all the same (e.g. written, then fsync failed, or
    /// COMMIT sent and the connection lost before its answer), so the next
    /// commit that succeeds writes them back (`None`: deletes).
    deferred_docs: std::sync::Mutex<Vec<(String, Option<DocRecord>)>>,
    /// New sealed secrets, written with the next commit (the one that
    /// also writes the admission that made them, so no command referring
    /// to one is published before it is durable; a failed commit keeps
    /// them for the next).
    pending_secrets: std::sync::Mutex<Vec<crate::secrets::Rotation>>,
    gate: Option<CommitGate>,
    /// The leases commits are fenced with (PostgreSQL, set by
    /// [`Store::fence_with`] and [`Store::fence_shards`]).
    fence: std::sync::Mutex<Fence>,
}

/// The leases a commit must prove, in its own transaction, that this
/// controller still holds (see `PgEngine::apply`).
#[derive(Debug, Clone, Default)]
struct Fence {
    /// The `controller` lease's generation. Unsharded, it guards every
    /// record; sharded, every record that is not a device's (documents,
    /// the audit log, rollouts, ...): the leader's.
    leader: Option<i64>,
    /// Sharded: the store's shard count and the generation of each shard
    /// held. A device's record and secrets are guarded by its shard's
    /// lease.
    shards: Option<(u32, std::collections::BTreeMap<u32, i64>)>,
}

impl Fence {
    /// The (lease, generation) pairs a commit of `ops` and `rotations`
    /// must hold; [`StoreError::NotHeld`] when one of its records is
    /// guarded by a lease this controller does not hold at all.
    fn rows(
        &self,
        store: &StoreLocation,
        rotations: &[crate::secrets::Rotation],
        ops: &[Op<'_>],
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let Some((shards, held)) = &self.shards else {
            return Ok(self
                .leader
                .map(|g| vec![(lease::LEASE.to_owned(), g)])
                .unwrap_or_default());
        };
        let not_held = |lease: String, record: String| StoreError::NotHeld {
            store: store.to_string(),
            lease,
            record,
        };
        let mut rows = std::collections::BTreeMap::new();
        let devices = ops
            .iter()
            .filter_map(|(tree, key, _)| match tree {
                Tree::Devices => Some(*key),
                // `<device>\0<name>`.
                Tree::Secrets => key.split(|b| *b == 0).next(),
                _ => None,
            })
            .map(String::from_utf8_lossy)
            .chain(rotations.iter().map(|r| r.device.as_str().into()));
        for device in devices {
            let shard = crate::shard::shard_of(&device, *shards);
            let row = crate::shard::lease_row(shard);
            let Some(generation) = held.get(&shard) else {
                return Err(not_held(row, format!("device {device:?}")));
            };
            rows.insert(row, *generation);
        }
        if let Some((tree, key, _)) = ops
            .iter()
            .find(|(tree, _, _)| !matches!(tree, Tree::Devices | Tree::Secrets))
        {
            let Some(generation) = self.leader else {
                return Err(not_held(
                    lease::LEASE.to_owned(),
                    format!("{} {:?}", tree.name(), String::from_utf8_lossy(key)),
                ));
            };
            rows.insert(lease::LEASE.to_owned(), generation);
        }
        Ok(rows.into_iter().collect())
    }
}

/// Where [`Store::device_changes`] goes on from (opaque: a snapshot's
/// xmin on PostgreSQL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeCursor(String);

/// The store's trees (see the module's key layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tree {
    Docs,
    Devices,
    Audit,
    Meta,
    Rollouts,
    Releases,
    Governance,
    Secrets,
    Intents,
}

impl Tree {
    const ALL: [Tree; 9] = [
        Tree::Docs,
        Tree::Devices,
        Tree::Audit,
        Tree::Meta,
        Tree::Rollouts,
        Tree::Releases,
        Tree::Governance,
        Tree::Secrets,
        Tree::Intents,
    ];

    fn name(self) -> &'static str {
        match self {
            Tree::Docs => "docs",
            Tree::Devices => "devices",
            Tree::Audit => "audit",
            Tree::Meta => "meta",
            Tree::Rollouts => "rollouts",
            Tree::Releases => "releases",
            Tree::Governance => "governance",
            Tree::Secrets => "secrets",
            Tree::Intents => "intents",
        }
    }
}

/// A key and its value.
type Record = (Vec<u8>, Vec<u8>);

/// One write of a commit: `None` deletes the key.
type Op<'a> = (Tree, &'a [u8], Option<&'a [u8]>);

/// Where a walk over a tree starts and which way it goes.
#[derive(Clone, Copy)]
enum Walk<'a> {
    /// Keys from this one (inclusive) upwards; `&[]`: the whole tree.
    From(&'a [u8]),
    /// Every key, from the last downwards.
    Back,
}

/// Called with each record a walk meets; `Ok(false)` stops the walk.
type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'a;

/// The two engines behind the same few operations. An enum, not a trait
/// object: there are two, both known here, and each operation is a match.
enum Engine {
    Sled(sled_engine::SledEngine),
    /// Boxed: the client is ~4 times the size of sled's handles.
    Postgres(Box<pg_engine::PgEngine>),
}

impl Engine {
    fn open(location: &StoreLocation, cache_bytes: u64) -> Result<Engine, StoreError> {
        match location {
            StoreLocation::Sled(path) => {
                sled_engine::SledEngine::open(path, cache_bytes).map(Engine::Sled)
            }
            StoreLocation::Postgres(url) => {
                pg_engine::PgEngine::open(url).map(|e| Engine::Postgres(Box::new(e)))
            }
        }
    }

    fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Engine::Sled(e) => e.get(tree, key),
            Engine::Postgres(e) => e.get(tree, key),
        }
    }

    fn walk(
        &mut self,
        tree: Tree,
        walk: Walk<'_>,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        match self {
            Engine::Sled(e) => e.walk(tree, walk, visit),
            Engine::Postgres(e) => e.walk(tree, walk, visit),
        }
    }

    fn len(&mut self, tree: Tree) -> Result<usize, StoreError> {
        match self {
            Engine::Sled(e) => Ok(e.len(tree)),
            Engine::Postgres(e) => e.len(tree),
        }
    }

    /// Applies `rotations` (on top of the stored secret slots, read in the
    /// same transaction) and then `ops`, in order, as one transaction, and
    /// returns once it is durable.
    /// `fence`: see `PgEngine::apply` (sled is one process's, locked by
    /// sled itself: nothing to fence).
    fn apply(
        &mut self,
        fence: &[(String, i64)],
        rotations: &[crate::secrets::Rotation],
        ops: &[Op<'_>],
    ) -> Result<(), StoreError> {
        match self {
            Engine::Sled(e) => e.apply(rotations, ops),
            Engine::Postgres(e) => e.apply(fence, rotations, ops),
        }
    }
}

/// The secret slots `rotations` leave, in order: each on top of the slot
/// `stored` reads (inside the engine's transaction) or of an earlier
/// rotation of the same key in this commit, so two rotations of one secret
/// chain whichever engine writes them.
fn rotated_slots<E>(
    rotations: &[crate::secrets::Rotation],
    mut stored: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, E>,
) -> Result<Vec<Record>, E> {
    let mut slots: Vec<Record> = Vec::with_capacity(rotations.len());
    for r in rotations {
        let key = crate::secrets::slot_key(&r.device, &r.name);
        let old = match slots.iter().rev().find(|(k, _)| *k == key) {
            Some((_, v)) => Some(v.clone()),
            None => stored(&key)?,
        };
        let old = old.and_then(|v| serde_json::from_slice(&v).ok());
        let slot = crate::secrets::Slot::rotate(old, r.sealed.clone(), r.keep.as_deref());
        slots.push((key, json(&slot)));
    }
    Ok(slots)
}

/// Everything the controller needs in memory at start.
pub struct Loaded {
    pub docs: Vec<DocRecord>,
    pub devices: Vec<DeviceRecord>,
    pub rollouts: Vec<RolloutRecord>,
    pub releases: Vec<ReleaseRecord>,
    /// Governance records (key, JSON), in key order.
    pub governance: Vec<(String, Vec<u8>)>,
    pub seq: u64,
    pub audit_len: usize,
    /// The highest audit sequence stored (the audit may have gaps).
    pub audit_last: u64,
}

/// A commit's records, encoded (and size-checked) before any I/O.
struct Encoded {
    docs: Vec<(Vec<u8>, Vec<u8>)>,
    deleted_docs: Vec<Vec<u8>>,
    devices: Vec<(Vec<u8>, Vec<u8>)>,
    rollouts: Vec<(Vec<u8>, Vec<u8>)>,
    releases: Vec<(Vec<u8>, Vec<u8>)>,
    governance: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Intents written (`Some`) and pruned (`None`), by number.
    intents: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// The highest intent number written, kept in `meta`.
    intent_seq: Option<[u8; 8]>,
    /// Chained and encoded at the write, in the order of the commits.
    audit_entries: Vec<AuditEntry>,
    seq: Option<u64>,
}

impl Encoded {
    fn new(changes: &Changes) -> Result<Encoded, StoreError> {
        let docs: Vec<(Vec<u8>, Vec<u8>)> = changes
            .docs
            .iter()
            .map(|d| (d.name.as_bytes().to_vec(), json(d)))
            .collect();
        let devices: Vec<(Vec<u8>, Vec<u8>)> = changes
            .devices
            .iter()
            .map(|d| (d.id.as_bytes().to_vec(), json(&**d)))
            .collect();
        let rollouts: Vec<(Vec<u8>, Vec<u8>)> = changes
            .rollouts
            .iter()
            .map(|r| (r.spec.name.as_bytes().to_vec(), json(r)))
            .collect();
        let releases: Vec<(Vec<u8>, Vec<u8>)> = changes
            .releases
            .iter()
            .map(|r| (r.version.as_bytes().to_vec(), json(r)))
            .collect();
        let governance: Vec<(Vec<u8>, Option<Vec<u8>>)> = changes
            .governance
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect();
        let intents: Vec<(Vec<u8>, Option<Vec<u8>>)> = changes
            .intents
            .iter()
            .map(|i| (i.seq.to_be_bytes().to_vec(), Some(json(i))))
            .chain(
                changes
                    .pruned_intents
                    .iter()
                    .map(|n| (n.to_be_bytes().to_vec(), None)),
            )
            .collect();
        let mut governed = governance
            .iter()
            .chain(&intents)
            .filter_map(|(k, v)| Some((k, v.as_ref()?)));
        if let Some((k, v)) = governed.find(|(_, v)| v.len() > MAX_RECORD) {
            return Err(StoreError::Transaction(format!(
                "record {:?} is {} bytes, above the {MAX_RECORD}-byte limit",
                String::from_utf8_lossy(k),
                v.len()
            )));
        }
        if let Some((k, v)) = docs
            .iter()
            .chain(&devices)
            .chain(&rollouts)
            .chain(&releases)
            .find(|(_, v)| v.len() > MAX_RECORD)
        {
            return Err(StoreError::Transaction(format!(
                "record {:?} is {} bytes, above the {MAX_RECORD}-byte limit",
                String::from_utf8_lossy(k),
                v.len()
            )));
        }
        Ok(Encoded {
            docs,
            deleted_docs: changes
                .deleted_docs
                .iter()
                .map(|n| n.as_bytes().to_vec())
                .collect(),
            devices,
            rollouts,
            releases,
            governance,
            intents,
            intent_seq: changes
                .intents
                .iter()
                .map(|i| i.seq)
                .max()
                .map(u64::to_be_bytes),
            audit_entries: changes.audit.clone(),
            seq: changes.seq,
        })
    }
}

impl Store {
    /// Opens (or creates) a sled store in `path`. `cache_bytes` bounds
    /// sled's page cache.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Store::open_at(&StoreLocation::Sled(path.to_path_buf()), cache_bytes)
    }

    /// Opens (or creates) the store at `location`. `cache_bytes` bounds
    /// sled's page cache (PostgreSQL has its own).
    pub fn open_at(location: &StoreLocation, cache_bytes: u64) -> Result<Store, StoreError> {
        let mut engine = Engine::open(location, cache_bytes)?;
        let (recent, head) = audit_tail(&mut engine)?;
        Ok(Store {
            location: location.clone(),
            cache_bytes,
            engine: std::sync::Mutex::new(Some(engine)),
            recent_audit: std::sync::Mutex::new(recent),
            audit_head: std::sync::Mutex::new(head),
            deferred_audit: std::sync::Mutex::new(Vec::new()),
            deferred_docs: std::sync::Mutex::new(Vec::new()),
            pending_secrets: std::sync::Mutex::new(Vec::new()),
            gate: None,
            fence: std::sync::Mutex::new(Fence::default()),
        })
    }

    /// Every later commit succeeds only while `generation` of the
    /// `controller` lease is held ([`Lease`]); otherwise it fails with
    /// [`StoreError::Fenced`] and writes nothing. Once sharded
    /// ([`Store::fence_shards`]) that lease is the leader's and guards only
    /// the records that are not a device's.
    pub fn fence_with(&self, generation: i64) {
        self.fence.lock().unwrap_or_else(|e| e.into_inner()).leader = Some(generation);
    }

    /// Sharded: every later commit writes a device's record (or secrets)
    /// only while the generation in `held` of that device's shard (of
    /// `shards`, see [`crate::shard`]) is current, and refuses a device of
    /// a shard not in `held` ([`StoreError::NotHeld`]); anything else
    /// needs [`Store::fence_with`]'s lease. Called again whenever the
    /// shards held change ([`ShardKeeper`]).
    pub fn fence_shards(&self, shards: u32, held: std::collections::BTreeMap<u32, i64>) {
        self.fence.lock().unwrap_or_else(|e| e.into_inner()).shards = Some((shards, held));
    }

    fn fence(&self) -> Fence {
        self.fence.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every later commit passes `gate` once durable (see [`CommitGate`]).
    pub fn with_gate(mut self, gate: Option<CommitGate>) -> Store {
        self.gate = gate;
        self
    }

    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Runs `f` on the engine, opening it first if an earlier error
    /// dropped it, and dropping it when `f` fails in a way that leaves the
    /// handle untrusted.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Engine) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Engine::open(&self.location, self.cache_bytes)?);
            tracing::info!(store = %self.location, "store reopened after an error");
        }
        let Some(engine) = guard.as_mut() else {
            return Err(StoreError::Transaction("store unavailable".into()));
        };
        let result = f(engine);
        if result.as_ref().is_err_and(StoreError::drops_engine) {
            *guard = None;
        }
        result
    }

    /// The device records written since `since` (`None`: every one), and
    /// the cursor to ask with next time: how a controller that does not
    /// write them (sharded, the leader answering queries) keeps a copy.
    /// A record may come again, never be missed, and comes only once
    /// durable. PostgreSQL only: sled is one process's.
    pub fn device_changes(
        &self,
        since: Option<&ChangeCursor>,
    ) -> Result<(Vec<DeviceRecord>, ChangeCursor), StoreError> {
        self.with(|e| {
            let Engine::Postgres(pg) = e else {
                return Err(StoreError::Refused {
                    store: self.location.to_string(),
                    reason: "following changes needs PostgreSQL".into(),
                });
            };
            let (rows, cursor) = pg.changes(Tree::Devices, since.map(|c| c.0.as_str()))?;
            let devices = rows
                .iter()
                .map(|(k, v)| decode(Tree::Devices.name(), k, v))
                .collect::<Result<_, _>>()?;
            Ok((devices, ChangeCursor(cursor)))
        })
    }

    /// The stored documents (a sharded owner follows the leader's).
    pub fn docs(&self) -> Result<Vec<DocRecord>, StoreError> {
        self.with(|e| read_all(e, Tree::Docs))
    }

    /// The organisations, policy versions and exceptions stored (what
    /// owners follow; not the compliance history, which only the leader
    /// writes and shows).
    pub fn governance(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with(|e| read_governance(e, false))
    }

    /// The rollouts and firmware releases stored (what owners follow).
    pub fn rollouts(&self) -> Result<(Vec<RolloutRecord>, Vec<ReleaseRecord>), StoreError> {
        self.with(|e| Ok((read_all(e, Tree::Rollouts)?, read_all(e, Tree::Releases)?)))
    }

    /// The operator intents kept (sharded), in order, and the highest
    /// number ever written (pruned ones included): where the next leader
    /// numbers on from.
    pub fn intents(&self) -> Result<(Vec<crate::model::IntentRecord>, u64), StoreError> {
        self.with(|e| {
            let intents = read_all(e, Tree::Intents)?;
            let last = e
                .get(Tree::Meta, b"intent_seq")?
                .map_or(0, |v| decode_u64(&v));
            Ok((intents, last))
        })
    }

    /// Reads the audit log's tail again, for a controller that starts
    /// writing it after another did (a sharded controller that became the
    /// leader): its entries chain on from the stored head. Returns the
    /// last entry's sequence number.
    pub fn refresh_audit(&self) -> Result<u64, StoreError> {
        self.with(|e| {
            let (recent, head) = audit_tail(e)?;
            let last = head.0;
            *self.audit_head.lock().unwrap_or_else(|e| e.into_inner()) = head;
            *self.recent_audit.lock().unwrap_or_else(|e| e.into_inner()) = recent;
            Ok(last)
        })
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        self.with(|e| {
            let docs: Vec<DocRecord> = read_all(e, Tree::Docs)?;
            let devices: Vec<DeviceRecord> = read_all(e, Tree::Devices)?;
            let rollouts: Vec<RolloutRecord> = read_all(e, Tree::Rollouts)?;
            let releases = read_all(e, Tree::Releases)?;
            let governance = read_governance(e, true)?;
            // Belt and braces: the sequence also covers every generation
            // already handed out, should `meta` ever lag the records.
            let seq = e
                .get(Tree::Meta, b"seq")?
                .map(|v| decode_u64(&v))
                .unwrap_or(0);
            let seq = devices
                .iter()
                .map(|d| d.desired_generation)
                .chain(docs.iter().map(|d| d.seq))
                .chain(rollouts.iter().map(|r| r.seq))
                .fold(seq, u64::max);
            let mut audit_last = 0;
            e.walk(Tree::Audit, Walk::Back, &mut |k, _| {
                audit_last = decode_u64(k);
                Ok(false)
            })?;
            Ok(Loaded {
                docs,
                devices,
                rollouts,
                releases,
                governance,
                seq,
                audit_len: e.len(Tree::Audit)?,
                audit_last,
            })
        })
    }

    /// Writes all changes atomically and returns only once they are durable.
    pub fn commit(&self, changes: &Changes) -> Result<(), StoreError> {
        if changes.is_empty() && !self.has_pending_secrets() {
            return Ok(());
        }
        let encoded = Encoded::new(changes)?;
        self.write(encoded)
    }

    /// [`Store::commit`] for a caller that hands its changes over: the
    /// device records are released as soon as they are encoded, before the
    /// write and fsync, so a caller sharing them (`Arc`) can change them
    /// again without copying. Returns the ids of the devices written.
    pub fn commit_owned(&self, changes: Changes) -> (Vec<String>, Result<(), StoreError>) {
        let ids = changes.devices.iter().map(|d| d.id.clone()).collect();
        if changes.is_empty() && !self.has_pending_secrets() {
            return (ids, Ok(()));
        }
        let encoded = Encoded::new(&changes);
        drop(changes);
        (ids, encoded.and_then(|e| self.write(e)))
    }

    fn write(&self, encoded: Encoded) -> Result<(), StoreError> {
        let Encoded {
            docs,
            deleted_docs,
            devices,
            rollouts,
            releases,
            governance,
            intents,
            intent_seq,
            audit_entries,
            seq,
        } = encoded;
        let deferred = std::mem::take(
            &mut *self
                .deferred_audit
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );

        let restores =
            std::mem::take(&mut *self.deferred_docs.lock().unwrap_or_else(|e| e.into_inner()));
        let mut secrets = Vec::new();
        let restored: Vec<(Vec<u8>, Option<Vec<u8>>)> = restores
            .iter()
            .map(|(name, doc)| (name.as_bytes().to_vec(), doc.as_ref().map(json)))
            .collect();
        let result = self.with(|e| {
            // Taken under the engine's lock, as the audit chain: two
            // rotations of one secret are written in the order they were
            // made, whichever commit carries them.
            secrets = std::mem::take(
                &mut *self
                    .pending_secrets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            let secrets = &secrets;
            // Chained here, under the engine's lock: in the order of the
            // commits, after what the last successful one wrote.
            let mut head = self.audit_head.lock().unwrap_or_else(|e| e.into_inner());
            let mut chained: Vec<AuditEntry> =
                deferred.iter().chain(&audit_entries).cloned().collect();
            let new_head = crate::audit::chain(&mut chained, &head.1);
            let audit: Vec<(Vec<u8>, Vec<u8>)> = chained
                .iter()
                .map(|a| (a.seq.to_be_bytes().to_vec(), json(a)))
                .collect();
            let seq = seq.map(u64::to_be_bytes);
            // In this order: a document put back by `restored` and written
            // again in this commit ends as this commit says.
            fn put(tree: Tree, (k, v): &(Vec<u8>, Vec<u8>)) -> Op<'_> {
                (tree, k.as_slice(), Some(v.as_slice()))
            }
            let ops: Vec<Op<'_>> = restored
                .iter()
                .map(|(k, v)| (Tree::Docs, k.as_slice(), v.as_deref()))
                .chain(docs.iter().map(|d| put(Tree::Docs, d)))
                .chain(
                    deleted_docs
                        .iter()
                        .map(|k| (Tree::Docs, k.as_slice(), None)),
                )
                .chain(devices.iter().map(|d| put(Tree::Devices, d)))
                .chain(audit.iter().map(|a| put(Tree::Audit, a)))
                .chain(rollouts.iter().map(|r| put(Tree::Rollouts, r)))
                .chain(releases.iter().map(|r| put(Tree::Releases, r)))
                .chain(
                    governance
                        .iter()
                        .map(|(k, v)| (Tree::Governance, k.as_slice(), v.as_deref())),
                )
                .chain(
                    seq.as_ref()
                        .map(|s| (Tree::Meta, &b"seq"[..], Some(&s[..]))),
                )
                .chain(
                    intents
                        .iter()
                        .map(|(k, v)| (Tree::Intents, k.as_slice(), v.as_deref())),
                )
                .chain(
                    intent_seq
                        .as_ref()
                        .map(|s| (Tree::Meta, &b"intent_seq"[..], Some(&s[..]))),
                )
                .collect();
            let fence = self.fence().rows(&self.location, secrets, &ops)?;
            e.apply(&fence, secrets, &ops)?;
            if let Some(gate) = &self.gate {
                (gate.0)(&Pending {
                    docs: &docs,
                    devices: &devices,
                })?;
            }
            // Still under the engine's lock: in the order of the commits.
            if let Some(last) = chained.last() {
                *head = (last.seq, new_head);
            }
            let mut recent = self.recent_audit.lock().unwrap_or_else(|e| e.into_inner());
            recent.extend(chained);
            let excess = recent.len().saturating_sub(AUDIT_KEPT);
            recent.drain(..excess);
            Ok(())
        });
        if result.is_err() && !deferred.is_empty() {
            let mut again = self
                .deferred_audit
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            again.splice(0..0, deferred);
        }
        if result.is_err() && !secrets.is_empty() {
            let mut again = self
                .pending_secrets
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            again.splice(0..0, secrets);
        }
        if result.is_err() && !restores.is_empty() {
            let mut again = self.deferred_docs.lock().unwrap_or_else(|e| e.into_inner());
            again.splice(0..0, restores);
        }
        result
    }

    /// A new sealed secret, written with the next commit.
    pub fn queue_secret(&self, rotation: crate::secrets::Rotation) {
        self.pending_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(rotation);
    }

    fn has_pending_secrets(&self) -> bool {
        !self
            .pending_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// The sealed secrets of `name` on `device`: as stored, with the
    /// rotations still waiting for a commit applied on top.
    /// One stored secret slot (the first by key), with its device and
    /// name: enough to tell whether a key is the one the store's secrets
    /// were sealed with.
    pub fn any_secret_slot(
        &self,
    ) -> Result<Option<(String, String, crate::secrets::Slot)>, StoreError> {
        self.with(|e| {
            let mut found = None;
            e.walk(Tree::Secrets, Walk::From(&[]), &mut |k, v| {
                let mut parts = k.splitn(2, |b| *b == 0);
                let device = String::from_utf8_lossy(parts.next().unwrap_or_default());
                let name = String::from_utf8_lossy(parts.next().unwrap_or_default());
                found = Some((
                    device.into_owned(),
                    name.into_owned(),
                    decode("secrets", k, v)?,
                ));
                Ok(false)
            })?;
            Ok(found)
        })
    }

    pub fn secret_slot(
        &self,
        device: &str,
        name: &str,
    ) -> Result<Option<crate::secrets::Slot>, StoreError> {
        let key = crate::secrets::slot_key(device, name);
        let stored = self.with(|e| {
            e.get(Tree::Secrets, &key)?
                .map(|v| decode("secrets", &key, &v))
                .transpose()
        })?;
        let pending = self
            .pending_secrets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(pending
            .iter()
            .filter(|r| r.device == device && r.name == name)
            .fold(stored, |slot, r| {
                Some(crate::secrets::Slot::rotate(
                    slot,
                    r.sealed.clone(),
                    r.keep.as_deref(),
                ))
            }))
    }

    /// After a failed commit of document `name`: make the disk say what it
    /// said before (`previous`, or no document) with the next commit that
    /// succeeds, so a write refused to the operator cannot reappear.
    pub fn defer_restore_doc(&self, name: &str, previous: Option<DocRecord>) {
        self.deferred_docs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_owned(), previous));
    }

    /// Audit entries a failed commit did not write (e.g. the refusal of a
    /// write for a full disk): they go with the next commit that succeeds.
    pub fn defer_audit(&self, entries: impl IntoIterator<Item = AuditEntry>) {
        self.deferred_audit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(entries);
    }

    /// The newest `limit` (at most [`AUDIT_KEPT`]) stored audit entries,
    /// oldest first, from memory: answered also while the disk is full.
    pub fn recent_audit(&self, limit: usize) -> Vec<AuditEntry> {
        let recent = self.recent_audit.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .skip(recent.len().saturating_sub(limit))
            .cloned()
            .collect()
    }

    /// Sequence and hash of the last audit entry stored (the chain's head).
    pub fn audit_head(&self) -> (u64, String) {
        self.audit_head
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Walks the whole stored audit log through its hash chain
    /// (`crate::audit`): its head, or the first entry that does not fit.
    pub fn audit_verify(
        &self,
    ) -> Result<Result<crate::audit::Head, crate::audit::Broken>, StoreError> {
        self.with(|e| {
            let mut v = crate::audit::Verifier::new();
            let mut broken = None;
            e.walk(Tree::Audit, Walk::From(&[]), &mut |k, val| {
                let entry: AuditEntry = decode("audit", k, val)?;
                broken = v.push(&entry).err();
                Ok(broken.is_none())
            })?;
            Ok(match broken {
                Some(b) => Err(b),
                None => Ok(v.head().clone()),
            })
        })
    }

    /// Up to `limit` audit entries after sequence `after`, oldest first.
    pub fn audit_page(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        if limit == 0 || after == u64::MAX {
            return Ok(Vec::new());
        }
        let from = (after + 1).to_be_bytes();
        self.with(|e| {
            let mut out = Vec::new();
            e.walk(Tree::Audit, Walk::From(&from), &mut |k, v| {
                out.push(decode("audit", k, v)?);
                Ok(out.len() < limit)
            })?;
            Ok(out)
        })
    }

    /// The newest `limit` stored audit entries `keep` accepts, oldest first
    /// (the whole log, not only what memory holds).
    pub fn audit_find(
        &self,
        keep: impl Fn(&AuditEntry) -> bool,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.with(|e| {
            let mut out = Vec::new();
            e.walk(Tree::Audit, Walk::Back, &mut |k, v| {
                let entry: AuditEntry = decode("audit", k, v)?;
                if keep(&entry) {
                    out.push(entry);
                }
                Ok(out.len() < limit)
            })?;
            out.reverse();
            Ok(out)
        })
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.audit_find(|_| true, limit)
    }
}

fn json<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain data (string keys, no floats that could be NaN
    // from our side): serialization cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// The newest [`AUDIT_KEPT`] audit entries and the chain's head (last
/// sequence number and hash).
type AuditTail = (std::collections::VecDeque<AuditEntry>, (u64, String));

fn audit_tail(engine: &mut Engine) -> Result<AuditTail, StoreError> {
    let mut recent = std::collections::VecDeque::new();
    engine.walk(Tree::Audit, Walk::Back, &mut |k, v| {
        recent.push_front(decode("audit", k, v)?);
        Ok(recent.len() < AUDIT_KEPT)
    })?;
    let head = recent
        .back()
        .map(|a: &AuditEntry| (a.seq, a.hash.clone()))
        .unwrap_or_default();
    Ok((recent, head))
}

/// The governance records by key, the compliance history's with them or not.
fn read_governance(
    engine: &mut Engine,
    history: bool,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    engine.walk(Tree::Governance, Walk::From(&[]), &mut |k, v| {
        if history || !k.starts_with(b"history/") {
            out.push((String::from_utf8_lossy(k).into_owned(), v.to_vec()));
        }
        Ok(true)
    })?;
    Ok(out)
}

fn read_all<T: DeserializeOwned>(engine: &mut Engine, tree: Tree) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    engine.walk(tree, Walk::From(&[]), &mut |k, v| {
        out.push(decode(tree.name(), k, v)?);
        Ok(true)
    })?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    value: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[8 - n..].copy_from_slice(&bytes[bytes.len() - n..]);
    u64::from_be_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sharded, a commit proves the lease of each device's shard it
    /// writes (record or secret slot) and the leader's for anything else,
    /// and is refused before it is sent when one is not held at all.
    #[test]
    fn a_sharded_commit_is_fenced_by_the_leases_of_what_it_writes() {
        use crate::shard::{lease_row, shard_of, DEFAULT_SHARDS};
        let location = StoreLocation::Postgres("postgres://db/x".into());
        let (a, b) = ("lamp0001", "lamp0002");
        let (sa, sb) = (shard_of(a, DEFAULT_SHARDS), shard_of(b, DEFAULT_SHARDS));
        assert_ne!(sa, sb);
        let fence = Fence {
            leader: None,
            shards: Some((DEFAULT_SHARDS, [(sa, 4)].into())),
        };
        let secret = crate::secrets::slot_key(a, "wifi");
        let ops: Vec<Op<'_>> = vec![
            (Tree::Devices, a.as_bytes(), Some(b"{}")),
            (Tree::Secrets, &secret, Some(b"{}")),
        ];
        assert_eq!(
            fence.rows(&location, &[], &ops).expect("held"),
            [(lease_row(sa), 4)]
        );
        let other = crate::secrets::slot_key(b, "wifi");
        for op in [
            (Tree::Devices, b.as_bytes(), Some(&b"{}"[..])),
            (Tree::Secrets, &other[..], None),
        ] {
            let err = fence
                .rows(&location, &[], &[ops[0], op])
                .expect_err("b's shard");
            assert!(
                matches!(&err, StoreError::NotHeld { lease, .. } if *lease == lease_row(sb)),
                "{err}"
            );
        }
        let global = [ops[0], (Tree::Meta, &b"seq"[..], Some(&b"1"[..]))];
        let err = fence
            .rows(&location, &[], &global)
            .expect_err("not the leader");
        assert!(
            matches!(&err, StoreError::NotHeld { lease, .. } if lease == "controller"),
            "{err}"
        );
        let leader = Fence {
            leader: Some(9),
            ..fence
        };
        assert_eq!(
            leader.rows(&location, &[], &global).expect("held"),
            [("controller".to_owned(), 9), (lease_row(sa), 4)]
        );
        // Unsharded, the one lease guards everything.
        let single = Fence {
            leader: Some(2),
            shards: None,
        };
        assert_eq!(
            single
                .rows(&location, &[], &[ops[0], global[1]])
                .expect("held"),
            [("controller".to_owned(), 2)]
        );
    }

    #[test]
    fn passwords_never_show_in_a_redacted_location() {
        for (url, want) in [
            (
                "postgres://city:s3cret@db.example:5432/cityplane",
                "postgres://city:***@db.example:5432/cityplane",
            ),
            // An unescaped `@` in the password: the last one ends it.
            (
                "postgresql://city:p@ss:w0rd@127.0.0.1/cp?sslmode=disable",
                "postgresql://city:***@127.0.0.1/cp?sslmode=disable",
            ),
            (
                "postgres://city@127.0.0.1/cp?password=s3cret&application_name=x",
                "postgres://city@127.0.0.1/cp?password=***&application_name=x",
            ),
            (
                "host=127.0.0.1 password='s3 cr\\'et' user=city",
                "host=127.0.0.1 password=*** user=city",
            ),
            (
                "host=/run/postgresql PASSWORD=s3cret",
                "host=/run/postgresql PASSWORD=***",
            ),
            // Nothing to hide: unchanged.
            (
                "postgres://city@127.0.0.1:5432/cp",
                "postgres://city@127.0.0.1:5432/cp",
            ),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
            let location = StoreLocation::Postgres(url.to_owned());
            for shown in [location.to_string(), format!("{location:?}")] {
                assert!(!shown.contains("s3") && !shown.contains("w0rd"), "{shown}");
            }
        }
        let err = StoreLocation::from_url("mysql://root:s3cret@db/x").expect_err("not postgres");
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}
