//! Durable storage. The only module that touches sled, so the engine can be
//! replaced.
//!
//! Key layout (one sled tree each, values are JSON):
//! - `docs`:    document name            → `DocRecord`
//! - `devices`: device id                → `DeviceRecord` (reported, desired,
//!   status, in-flight command = the outbox)
//! - `audit`:   sequence (u64 big-endian) → `AuditEntry`, append-only
//! - `meta`:    `"seq"`                  → last global sequence (u64 BE)
//!
//! Durability: sled's `flush()` is not durable against power loss on Linux
//! (it uses `sync_file_range` and never fsyncs its directory). After every
//! commit we therefore `fsync` sled's data file ourselves, and at open we
//! fsync the directory entries, so an acknowledged write survives a power
//! cut, not only a process kill.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::Transactional;

use crate::model::{AuditEntry, DeviceRecord, DocRecord};

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
    /// True when the disk is full: reads still work, writes wait for space.
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            StoreError::Io(e) => Some(e),
            StoreError::Sled(sled::Error::Io(e)) => Some(e),
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
    pub devices: Vec<DeviceRecord>,
    pub audit: Vec<AuditEntry>,
    pub seq: Option<u64>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
            && self.devices.is_empty()
            && self.audit.is_empty()
            && self.seq.is_none()
    }
}

pub struct Store {
    path: PathBuf,
    db: sled::Db,
    docs: sled::Tree,
    devices: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, fsynced after each commit.
    data_file: File,
}

/// Everything the controller needs in memory at start.
pub struct Loaded {
    pub docs: Vec<DocRecord>,
    pub devices: Vec<DeviceRecord>,
    pub seq: u64,
    pub audit_len: usize,
}

impl Store {
    /// Opens (or creates) the store. `cache_bytes` bounds sled's page cache.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        std::fs::create_dir_all(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let tree = |name: &str| db.open_tree(name);
        let store = Store {
            docs: tree("docs")?,
            devices: tree("devices")?,
            audit: tree("audit")?,
            meta: tree("meta")?,
            data_file: File::open(path.join("db"))?,
            path: path.to_path_buf(),
            db,
        };
        store.db.flush()?;
        store.sync_all()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the directory entries of a fresh database durable too.
    fn sync_all(&self) -> Result<(), StoreError> {
        self.data_file.sync_all()?;
        if let Ok(conf) = File::open(self.path.join("conf")) {
            conf.sync_all()?;
        }
        File::open(&self.path)?.sync_all()?;
        if let Some(parent) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(parent)?.sync_all()?;
        }
        Ok(())
    }

    pub fn load(&self) -> Result<Loaded, StoreError> {
        let docs = read_all(&self.docs, "docs")?;
        let devices = read_all(&self.devices, "devices")?;
        let seq = self.meta.get("seq")?.map(|v| decode_u64(&v)).unwrap_or(0);
        Ok(Loaded {
            docs,
            devices,
            seq,
            audit_len: self.audit.len(),
        })
    }

    /// Writes all changes atomically and returns only once they are on disk.
    pub fn commit(&self, changes: &Changes) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let docs: Vec<(Vec<u8>, Vec<u8>)> = changes
            .docs
            .iter()
            .map(|d| (d.name.as_bytes().to_vec(), json(d)))
            .collect();
        let devices: Vec<(Vec<u8>, Vec<u8>)> = changes
            .devices
            .iter()
            .map(|d| (d.id.as_bytes().to_vec(), json(d)))
            .collect();
        let audit: Vec<(Vec<u8>, Vec<u8>)> = changes
            .audit
            .iter()
            .map(|a| (a.seq.to_be_bytes().to_vec(), json(a)))
            .collect();
        (&self.docs, &self.devices, &self.audit, &self.meta)
            .transaction(|(docs_t, devices_t, audit_t, meta_t)| {
                for (k, v) in &docs {
                    docs_t.insert(k.as_slice(), v.as_slice())?;
                }
                for (k, v) in &devices {
                    devices_t.insert(k.as_slice(), v.as_slice())?;
                }
                for (k, v) in &audit {
                    audit_t.insert(k.as_slice(), v.as_slice())?;
                }
                if let Some(seq) = changes.seq {
                    meta_t.insert("seq", &seq.to_be_bytes())?;
                }
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
                other => StoreError::Transaction(format!("{other:?}")),
            })?;
        self.db.flush()?;
        self.data_file.sync_data()?;
        Ok(())
    }

    /// The newest `limit` audit entries, oldest first.
    pub fn audit_tail(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let mut out = self
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
