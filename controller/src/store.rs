//! Durable storage. The only module that touches sled, so the engine can be
//! replaced.
//!
//! Key layout (one sled tree each, values are JSON):
//! - `docs`:    document name            → `DocRecord`
//! - `devices`: device id                → `DeviceRecord` (reported, desired,
//!   status, in-flight command = the outbox)
//! - `audit`:   sequence (u64 big-endian) → `AuditEntry`, append-only
//! - `meta`:    `"seq"`                  → last global sequence (u64 BE)
//! - `rollouts`: rollout name            → `RolloutRecord` (each device's
//!   part in a rollout is in its `DeviceRecord`, written in the same commits)
//! - `releases`: firmware version        → `ReleaseRecord` (the image is the
//!   file `firmware/<sha256>` next to the database, fsynced before this)
//! - `governance`: `org/<name>` → `OrgRecord`, `policy/<version u64 BE as
//!   16 hex digits>` → `PolicyRecord`, `exception/<id>` → `ExceptionRecord`,
//!   `history/<org>/<unix ms as 16 hex digits>` → a compliance `Sample`
//!   (organisations, the security policy's versions and exceptions, and
//!   compliance over time: at most 2,000 samples per organisation)
//! - `secrets`: `<device id>\0<key name>` → `secrets::Slot` (the current
//!   and previous secret, each sealed with the secrets key, which is not
//!   stored here: see `crate::secrets`)
//!
//! Durability: sled's `flush()` is not durable against power loss on Linux
//! (it uses `sync_file_range` and never fsyncs its directory). After every
//! commit we therefore `fsync` sled's data file ourselves, and at open we
//! fsync the directory entries, so an acknowledged write survives a power
//! cut, not only a process kill.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::Transactional;

use crate::model::{AuditEntry, DeviceRecord, DocRecord, ReleaseRecord};
use crate::rollout::RolloutRecord;

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
        io.is_some_and(|e| {
            e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
        })
    }
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

/// sled writes log items above a quarter of a segment to separate blob
/// files that it never fsyncs; with 16 MiB segments (sled's default is
/// 512 KiB) no record of ours gets there, and `commit` refuses any record
/// larger than [`MAX_RECORD`] outright.
const SEGMENT_SIZE: usize = 16 * 1024 * 1024;
pub const MAX_RECORD: usize = 256 * 1024;
/// Audit entries kept in memory: `audit` queries are answered from there,
/// because reading sled fails while the disk is full.
pub const AUDIT_KEPT: usize = 1000;

pub struct Store {
    path: PathBuf,
    cache_bytes: u64,
    /// `None` after an I/O error: sled keeps the error on its handle for
    /// good, so the next operation opens the database again.
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
    /// reached the disk all the same (e.g. written, then fsync failed), so
    /// the next commit that succeeds writes them back (`None`: deletes).
    deferred_docs: std::sync::Mutex<Vec<(String, Option<DocRecord>)>>,
    /// New sealed secrets, written with the next commit (the one that
    /// also writes the admission that made them, so no command referring
    /// to one is published before it is durable; a failed commit keeps
    /// them for the next).
    pending_secrets: std::sync::Mutex<Vec<crate::secrets::Rotation>>,
    gate: Option<CommitGate>,
}

struct Engine {
    db: sled::Db,
    docs: sled::Tree,
    devices: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    rollouts: sled::Tree,
    releases: sled::Tree,
    governance: sled::Tree,
    secrets: sled::Tree,
    /// sled's data file, fsynced after each commit.
    data_file: File,
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

impl Engine {
    fn open(path: &Path, cache_bytes: u64) -> Result<Engine, StoreError> {
        std::fs::create_dir_all(path)?;
        // sled releases its file lock shortly after a dropped handle closes.
        let mut tries = 0;
        let db = loop {
            let opened = sled::Config::new()
                .path(path)
                .cache_capacity(cache_bytes)
                .segment_size(SEGMENT_SIZE)
                .open();
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock && tries < 50 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) if e.to_string().contains("could not acquire lock") && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        };
        let engine = Engine {
            docs: db.open_tree("docs")?,
            devices: db.open_tree("devices")?,
            audit: db.open_tree("audit")?,
            meta: db.open_tree("meta")?,
            rollouts: db.open_tree("rollouts")?,
            releases: db.open_tree("releases")?,
            governance: db.open_tree("governance")?,
            secrets: db.open_tree("secrets")?,
            data_file: File::open(path.join("db"))?,
            db,
        };
        engine.db.flush()?;
        engine.sync_all(path)?;
        Ok(engine)
    }

    /// Makes the directory entries of a fresh database durable too.
    fn sync_all(&self, path: &Path) -> Result<(), StoreError> {
        self.data_file.sync_all()?;
        if let Ok(conf) = File::open(path.join("conf")) {
            conf.sync_all()?;
        }
        File::open(path)?.sync_all()?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }
}

/// A commit's records, encoded (and size-checked) before any I/O.
struct Encoded {
    docs: Vec<(Vec<u8>, Vec<u8>)>,
    deleted_docs: Vec<Vec<u8>>,
    devices: Vec<(Vec<u8>, Vec<u8>)>,
    rollouts: Vec<(Vec<u8>, Vec<u8>)>,
    releases: Vec<(Vec<u8>, Vec<u8>)>,
    governance: Vec<(Vec<u8>, Option<Vec<u8>>)>,
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
        let mut governed = governance
            .iter()
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
            audit_entries: changes.audit.clone(),
            seq: changes.seq,
        })
    }
}

impl Store {
    /// Opens (or creates) the store. `cache_bytes` bounds sled's page cache.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let engine = Engine::open(path, cache_bytes)?;
        let mut recent = engine
            .audit
            .iter()
            .rev()
            .take(AUDIT_KEPT)
            .map(|item| {
                let (k, v) = item?;
                decode("audit", &k, &v)
            })
            .collect::<Result<std::collections::VecDeque<AuditEntry>, StoreError>>()?;
        recent.make_contiguous().reverse();
        let head = recent
            .back()
            .map(|a| (a.seq, a.hash.clone()))
            .unwrap_or_default();
        Ok(Store {
            path: path.to_path_buf(),
            cache_bytes,
            engine: std::sync::Mutex::new(Some(engine)),
            recent_audit: std::sync::Mutex::new(recent),
            audit_head: std::sync::Mutex::new(head),
            deferred_audit: std::sync::Mutex::new(Vec::new()),
            deferred_docs: std::sync::Mutex::new(Vec::new()),
            pending_secrets: std::sync::Mutex::new(Vec::new()),
            gate: None,
        })
    }

    /// Every later commit passes `gate` once durable (see [`CommitGate`]).
    pub fn with_gate(mut self, gate: Option<CommitGate>) -> Store {
        self.gate = gate;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the engine, reopening it first if an earlier I/O error
    /// poisoned it, and dropping it when `f` hits an I/O error.
    fn with<T>(&self, f: impl FnOnce(&Engine) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut guard = self.engine.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Engine::open(&self.path, self.cache_bytes)?);
            tracing::info!(path = %self.path.display(), "store reopened after an I/O error");
        }
        let Some(engine) = guard.as_ref() else {
            return Err(StoreError::Transaction("store unavailable".into()));
        };
        let result = f(engine);
        if matches!(
            result,
            Err(StoreError::Io(_)) | Err(StoreError::Sled(sled::Error::Io(_)))
        ) {
            *guard = None;
        }
        result
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        self.with(|e| {
            let docs = read_all(&e.docs, "docs")?;
            let devices = read_all(&e.devices, "devices")?;
            let rollouts: Vec<RolloutRecord> = read_all(&e.rollouts, "rollouts")?;
            let releases = read_all(&e.releases, "releases")?;
            let governance = e
                .governance
                .iter()
                .map(|item| {
                    let (k, v) = item?;
                    Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            // Belt and braces: the sequence also covers every generation
            // already handed out, should `meta` ever lag the records.
            let seq = e.meta.get("seq")?.map(|v| decode_u64(&v)).unwrap_or(0);
            let seq = devices
                .iter()
                .map(|d: &DeviceRecord| d.desired_generation)
                .chain(docs.iter().map(|d: &DocRecord| d.seq))
                .chain(rollouts.iter().map(|r| r.seq))
                .fold(seq, u64::max);
            let audit_last = e.audit.last()?.map_or(0, |(k, _)| decode_u64(&k));
            Ok(Loaded {
                docs,
                devices,
                rollouts,
                releases,
                governance,
                seq,
                audit_len: e.audit.len(),
                audit_last,
            })
        })
    }

    /// Writes all changes atomically and returns only once they are on disk.
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
            // One multi-tree transaction even for device-only commits: sled's
            // `apply_batch` was ~10 % cheaper in CPU, but kept superseded
            // values in memory (100,000 devices: RSS 1.6 GiB after 3 updates
            // each, 3.3 GiB after 8; transactions: 0.9 and 1.0 GiB).
            (
                &e.docs,
                &e.devices,
                &e.audit,
                &e.meta,
                &e.rollouts,
                &e.releases,
                &e.governance,
                &e.secrets,
            )
                .transaction(
                    |(
                        docs_t,
                        devices_t,
                        audit_t,
                        meta_t,
                        rollouts_t,
                        releases_t,
                        gov_t,
                        secrets_t,
                    )| {
                        for r in secrets {
                            let key = crate::secrets::slot_key(&r.device, &r.name);
                            let old = secrets_t
                                .get(key.as_slice())?
                                .and_then(|v| serde_json::from_slice(&v).ok());
                            let slot = crate::secrets::Slot::rotate(
                                old,
                                r.sealed.clone(),
                                r.keep.as_deref(),
                            );
                            secrets_t.insert(key.as_slice(), json(&slot))?;
                        }
                        for (k, v) in &restored {
                            match v {
                                Some(v) => docs_t.insert(k.as_slice(), v.as_slice())?,
                                None => docs_t.remove(k.as_slice())?,
                            };
                        }
                        for (k, v) in &docs {
                            docs_t.insert(k.as_slice(), v.as_slice())?;
                        }
                        for k in &deleted_docs {
                            docs_t.remove(k.as_slice())?;
                        }
                        for (k, v) in &devices {
                            devices_t.insert(k.as_slice(), v.as_slice())?;
                        }
                        for (k, v) in &audit {
                            audit_t.insert(k.as_slice(), v.as_slice())?;
                        }
                        for (k, v) in &rollouts {
                            rollouts_t.insert(k.as_slice(), v.as_slice())?;
                        }
                        for (k, v) in &releases {
                            releases_t.insert(k.as_slice(), v.as_slice())?;
                        }
                        for (k, v) in &governance {
                            match v {
                                Some(v) => gov_t.insert(k.as_slice(), v.as_slice())?,
                                None => gov_t.remove(k.as_slice())?,
                            };
                        }
                        if let Some(seq) = seq {
                            meta_t.insert("seq", &seq.to_be_bytes())?;
                        }
                        Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                    },
                )
                .map_err(|e| match e {
                    sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                    other => StoreError::Transaction(format!("{other:?}")),
                })?;
            e.db.flush()?;
            e.data_file.sync_data()?;
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
    pub fn secret_slot(
        &self,
        device: &str,
        name: &str,
    ) -> Result<Option<crate::secrets::Slot>, StoreError> {
        let key = crate::secrets::slot_key(device, name);
        let stored = self.with(|e| {
            e.secrets
                .get(&key)?
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
            for item in e.audit.iter() {
                let (k, val) = item?;
                let entry: AuditEntry = decode("audit", &k, &val)?;
                if let Err(broken) = v.push(&entry) {
                    return Ok(Err(broken));
                }
            }
            Ok(Ok(v.head().clone()))
        })
    }

    /// Up to `limit` audit entries after sequence `after`, oldest first.
    pub fn audit_page(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.with(|e| {
            e.audit
                .range(after.saturating_add(1).to_be_bytes()..)
                .take(limit)
                .map(|item| {
                    let (k, v) = item?;
                    decode("audit", &k, &v)
                })
                .collect()
        })
    }

    /// The newest `limit` stored audit entries `keep` accepts, oldest first
    /// (the whole log, not only what memory holds).
    pub fn audit_find(
        &self,
        keep: impl Fn(&AuditEntry) -> bool,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.with(|e| {
            let mut out = Vec::new();
            for item in e.audit.iter().rev() {
                let (k, v) = item?;
                let entry: AuditEntry = decode("audit", &k, &v)?;
                if keep(&entry) {
                    out.push(entry);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            out.reverse();
            Ok(out)
        })
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.with(|e| {
            let mut out = e
                .audit
                .iter()
                .rev()
                .take(limit)
                .map(|item| {
                    let (k, v) = item?;
                    decode("audit", &k, &v)
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.reverse();
            Ok(out)
        })
    }
}

fn json<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain data (string keys, no floats that could be NaN
    // from our side): serialization cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

fn read_all<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|item| {
            let (k, v) = item?;
            decode(name, &k, &v)
        })
        .collect()
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
    use cityplane_proto::messages::{IdList, Target};

    fn doc(name: &str, generation: u64) -> DocRecord {
        DocRecord {
            name: name.into(),
            target: Target::Ids(IdList {
                ids: vec!["d1".into()],
            }),
            priority: 0,
            state: Default::default(),
            generation,
            seq: generation,
            author: "op".into(),
            org: None,
            written_at: 0,
            history: Vec::new(),
        }
    }

    fn docs(store: &Store) -> Vec<(String, u64)> {
        let mut docs: Vec<_> = store
            .load()
            .expect("load")
            .docs
            .into_iter()
            .map(|d| (d.name, d.generation))
            .collect();
        docs.sort();
        docs
    }

    #[test]
    fn a_refused_document_write_is_undone_by_the_next_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 1 << 20).expect("open");
        let commit_doc = |d: DocRecord| {
            store
                .commit(&Changes {
                    docs: vec![d],
                    ..Default::default()
                })
                .expect("commit")
        };
        commit_doc(doc("kept", 1));
        // As if these two had reached the disk although their commits failed.
        commit_doc(doc("kept", 2));
        commit_doc(doc("new", 1));
        store.defer_restore_doc("kept", Some(doc("kept", 1)));
        store.defer_restore_doc("new", None);
        assert_eq!(docs(&store), [("kept".into(), 2), ("new".into(), 1)]);
        commit_doc(doc("other", 1));
        assert_eq!(docs(&store), [("kept".into(), 1), ("other".into(), 1)]);
        // Done once: later commits leave documents alone.
        commit_doc(doc("new", 1));
        assert_eq!(
            docs(&store),
            [("kept".into(), 1), ("new".into(), 1), ("other".into(), 1)]
        );
    }
}
