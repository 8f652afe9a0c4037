//! The live revocation list. It is re-read whenever `revoked.json` changes;
//! if it cannot be read or parsed the broker fails closed: every handshake
//! is refused and every live session is cut until a good list is back.
//!
//! "Changes" means its contents: every poll reads the file and compares a
//! hash of the bytes with the hash of the bytes the installed list was
//! parsed from. Size and mtime miss a same-length rewrite within one mtime
//! tick (or with the mtime restored), and fingerprinting the file apart
//! from reading it misses a change in between.
//!
//! An entry can take effect later than it was written (a rotation's
//! overlap): the file does not change at that instant, so each poll also
//! checks whether the next such instant has passed and then cuts the
//! sessions it revokes. Time is the system clock, as for certificate expiry.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use cityplane_certs::RevocationList;
use rustls::{CertificateError, OtherError};
use time::OffsetDateTime;

use crate::registry::Registry;

#[derive(Debug)]
pub(crate) struct RevocationState {
    path: PathBuf,
    current: RwLock<Installed>,
}

/// A list and the contents of the file it came from.
#[derive(Debug)]
struct Installed {
    /// Hash of the bytes `list` was parsed from; `None` if the file could not
    /// be read.
    digest: Option<u64>,
    /// `Err` holds why the list is unusable (fail closed).
    list: Result<Arc<RevocationList>, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("revocation list {path} is unusable, refusing every client: {reason}")]
struct FailClosed {
    path: String,
    reason: String,
}

impl RevocationState {
    pub(crate) fn load(path: PathBuf) -> Arc<Self> {
        let current = read_list(&path);
        if let Err(reason) = &current.list {
            tracing::error!(path = %path.display(), %reason, "revocation list unusable: failing closed, every client is refused");
        }
        Arc::new(RevocationState {
            path,
            current: RwLock::new(current),
        })
    }

    /// Refuses a serial that is revoked now, or every serial when the list
    /// is unusable.
    pub(crate) fn check(&self, serial: &str) -> Result<(), rustls::Error> {
        self.check_at(serial, OffsetDateTime::now_utc())
    }

    fn check_at(&self, serial: &str, now: OffsetDateTime) -> Result<(), rustls::Error> {
        match &self.read().list {
            Ok(list) if list.is_revoked_at(serial, now) => {
                Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
            }
            Ok(_) => Ok(()),
            Err(reason) => Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(FailClosed {
                    path: self.path.display().to_string(),
                    reason: reason.clone(),
                })),
            ))),
        }
    }

    pub(crate) fn is_allowed(&self, serial: &str) -> bool {
        self.check(serial).is_ok()
    }

    /// The next instant after `now` at which a listed serial becomes revoked.
    fn next_effective_after(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        match &self.read().list {
            Ok(list) => list.next_effective_after(now),
            Err(_) => None,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Installed> {
        // A poisoned lock only means a panic elsewhere while swapping a value;
        // the value inside is still whole.
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    fn replace(&self, value: Installed) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

/// Reads the file once and parses those very bytes.
fn read_list(path: &Path) -> Installed {
    let read = std::fs::read(path);
    Installed {
        digest: read.as_ref().ok().map(|bytes| digest(bytes)),
        list: parse(path, read),
    }
}

fn parse(path: &Path, read: std::io::Result<Vec<u8>>) -> Result<Arc<RevocationList>, String> {
    let bytes = read.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    RevocationList::parse(path, &bytes)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Only tells our own successive reads apart (nobody gains by forging a
/// collision: whoever can write the file decides revocation anyway).
fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// The file as it is now, or `None` if its contents are the installed ones.
/// Off the runtime's workers: it reads the whole file on every poll.
async fn read_if_changed(path: &Path, installed: Option<u64>) -> Option<Installed> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let read = std::fs::read(&path);
        let digest = read.as_ref().ok().map(|bytes| digest(bytes));
        (digest != installed).then(|| Installed {
            digest,
            list: parse(&path, read),
        })
    })
    .await
    .ok()
    .flatten()
}

/// Polls the list and cuts sessions whose certificate is no longer allowed:
/// when the file changes, and when an entry recorded for a later instant
/// takes effect.
pub(crate) async fn watch(
    state: Arc<RevocationState>,
    registry: Arc<Registry>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_due = state.next_effective_after(OffsetDateTime::now_utc());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        // Taken before the read: an entry due between this instant and the
        // cut is left for the next tick, never skipped.
        let now = OffsetDateTime::now_utc();
        let (installed, failing) = {
            let current = state.read();
            (current.digest, current.list.is_err())
        };
        let Some(loaded) = read_if_changed(&state.path, installed).await else {
            if next_due.is_some_and(|due| due <= now) {
                next_due = state.next_effective_after(now);
                cut_refused(&state, &registry, now, "a revocation took effect");
            }
            continue;
        };
        match &loaded.list {
            Ok(list) => {
                if failing {
                    tracing::info!(path = %state.path.display(), revoked = list.len(), "revocation list readable again: accepting clients");
                } else {
                    tracing::info!(path = %state.path.display(), revoked = list.len(), "revocation list reloaded");
                }
            }
            Err(reason) if !failing => {
                tracing::error!(path = %state.path.display(), %reason, "revocation list unusable: failing closed, cutting every session");
            }
            Err(_) => {}
        }
        state.replace(loaded);
        next_due = state.next_effective_after(now);
        cut_refused(&state, &registry, now, "revocation list changed");
    }
}

fn cut_refused(state: &RevocationState, registry: &Registry, now: OffsetDateTime, why: &str) {
    let cut = registry.kick_where(|_, serial| state.check_at(serial, now).is_err());
    if cut > 0 {
        tracing::warn!(sessions = cut, reason = why, "sessions cut by revocation");
    }
}
