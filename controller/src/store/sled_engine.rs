//! The sled engine: one sled tree per store tree, in a directory.
//!
//! Durability: sled's `flush()` is not durable against power loss on Linux
//! (it uses `sync_file_range` and never fsyncs its directory). After every
//! commit we therefore `fsync` sled's data file ourselves, and at open we
//! fsync the directory entries, so an acknowledged write survives a power
//! cut, not only a process kill.

use std::fs::File;
use std::path::Path;

use sled::Transactional;

use super::{rotated_slots, Op, StoreError, Tree, Visit, Walk};

/// sled writes log items above a quarter of a segment to separate blob
/// files that it never fsyncs; with 16 MiB segments (sled's default is
/// 512 KiB) no record of ours gets there, and `commit` refuses any record
/// larger than [`super::MAX_RECORD`] outright.
const SEGMENT_SIZE: usize = 16 * 1024 * 1024;

pub(super) struct SledEngine {
    db: sled::Db,
    /// Indexed by `Tree as usize` (the order of [`Tree::ALL`]).
    trees: Vec<sled::Tree>,
    /// sled's data file, fsynced after each commit.
    data_file: File,
}

impl SledEngine {
    pub(super) fn open(path: &Path, cache_bytes: u64) -> Result<SledEngine, StoreError> {
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
        let trees = Tree::ALL
            .iter()
            .map(|t| db.open_tree(t.name()))
            .collect::<Result<Vec<_>, _>>()?;
        let engine = SledEngine {
            trees,
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

    fn tree(&self, tree: Tree) -> &sled::Tree {
        &self.trees[tree as usize]
    }

    pub(super) fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(tree).get(key)?.map(|v| v.to_vec()))
    }

    pub(super) fn len(&self, tree: Tree) -> usize {
        self.tree(tree).len()
    }

    pub(super) fn walk(
        &self,
        tree: Tree,
        walk: Walk<'_>,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let items: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match walk {
            Walk::From(from) => Box::new(self.tree(tree).range(from..)),
            Walk::Back => Box::new(self.tree(tree).iter().rev()),
        };
        for item in items {
            let (k, v) = item?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    pub(super) fn apply(
        &self,
        rotations: &[crate::secrets::Rotation],
        ops: &[Op<'_>],
    ) -> Result<(), StoreError> {
        // One multi-tree transaction even for device-only commits: sled's
        // `apply_batch` was ~10 % cheaper in CPU, but kept superseded
        // values in memory (100,000 devices: RSS 1.6 GiB after 3 updates
        // each, 3.3 GiB after 8; transactions: 0.9 and 1.0 GiB).
        self.trees[..]
            .transaction(|t| {
                let secrets = &t[Tree::Secrets as usize];
                let slots = rotated_slots(rotations, |key| {
                    Ok::<_, sled::transaction::UnabortableTransactionError>(
                        secrets.get(key)?.map(|v| v.to_vec()),
                    )
                })?;
                for (k, v) in &slots {
                    secrets.insert(k.as_slice(), v.as_slice())?;
                }
                for (tree, k, v) in ops {
                    let tree = &t[*tree as usize];
                    match v {
                        Some(v) => tree.insert(*k, *v)?,
                        None => tree.remove(*k)?,
                    };
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
}
