//! Crash-safe file writes: a reader (or a restart after a crash) sees either
//! the old file or the complete new one, never half of it.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::CertError;

/// Mode of private key files.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificates, the CRL and the revocation list: public material.
pub(crate) const PUBLIC_MODE: u32 = 0o644;
/// Mode of a PKI directory this crate creates.
pub(crate) const DIR_MODE: u32 = 0o700;

/// Prefix of temporary files. Identities cannot start with '.', so these never
/// collide with, or get listed as, real files.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `data` to `dir/name` atomically.
///
/// The data goes to a fresh temporary file in `dir`, created with `mode` (so a
/// key is never readable by others, not even for an instant), is flushed to
/// disk, and is renamed over `name`. With `sync_dir` the directory is flushed
/// too, which makes the rename itself durable before this returns; bulk
/// callers pass `false` and call [`sync_dir`] once at the end.
pub(crate) fn write_atomic(
    dir: &Path,
    name: &str,
    data: &[u8],
    mode: u32,
    sync_dir_after: bool,
) -> Result<(), CertError> {
    let target = dir.join(name);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!("{TMP_PREFIX}{name}-{}-{n}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| CertError::io("create", &tmp, e))?;
        file.write_all(data)
            .map_err(|e| CertError::io("write", &tmp, e))?;
        file.sync_all()
            .map_err(|e| CertError::io("flush", &tmp, e))?;
        drop(file);
        fs::rename(&tmp, &target).map_err(|e| CertError::io("replace", &target, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if sync_dir_after {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Flushes a directory, making renames and removals in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), CertError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CertError::io("flush directory", dir, e))
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub(crate) fn create_dir(dir: &Path) -> Result<(), CertError> {
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(CertError::io("create directory", dir, e)),
    }
}

/// Refuses a directory other users can write to: they could replace the CA
/// certificate, plant a key or swap files between our writes.
pub(crate) fn check_private_dir(dir: &Path) -> Result<(), CertError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(dir).map_err(|e| CertError::io("inspect", dir, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(CertError::InsecureDir {
            dir: dir.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads a file, returning `None` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, CertError> {
    match fs::read(path) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CertError::io("read", path, e)),
    }
}

/// Reads a file that must exist.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|e| CertError::io("read", path, e))
}

/// Removes a file; a file that is already gone is fine.
pub(crate) fn remove_optional(path: &Path) -> Result<(), CertError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CertError::io("remove", path, e)),
    }
}
