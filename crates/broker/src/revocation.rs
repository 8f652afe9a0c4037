//! The live revocation list. It is re-read whenever `revoked.json` changes;
//! if it cannot be read or parsed the broker fails closed: every handshake
//! is refused and every live session is cut until a good list is back.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use cityplane_certs::RevocationList;
use rustls::{CertificateError, OtherError};

use crate::registry::Registry;

#[derive(Debug)]
pub(crate) struct RevocationState {
    path: PathBuf,
    /// `Err` holds why the list is unusable (fail closed).
    current: RwLock<Result<Arc<RevocationList>, String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("revocation list {path} is unusable, refusing every client: {reason}")]
struct FailClosed {
    path: String,
    reason: String,
}

impl RevocationState {
    pub(crate) fn load(path: PathBuf) -> Arc<Self> {
        let current = load_list(&path);
        if let Err(reason) = &current {
            tracing::error!(path = %path.display(), %reason, "revocation list unusable: failing closed, every client is refused");
        }
        Arc::new(RevocationState {
            path,
            current: RwLock::new(current),
        })
    }

    /// Refuses a serial that is revoked, or every serial when the list is unusable.
    pub(crate) fn check(&self, serial: &str) -> Result<(), rustls::Error> {
        match &*self.read() {
            Ok(list) if list.is_revoked(serial) => {
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

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Result<Arc<RevocationList>, String>> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc;
        // the value inside is still whole.
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    fn replace(&self, value: Result<Arc<RevocationList>, String>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

fn load_list(path: &std::path::Path) -> Result<Arc<RevocationList>, String> {
    RevocationList::load(path)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// (modified time, length): cheap to poll, changes on every atomic rewrite.
fn fingerprint(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Polls the list and cuts sessions whose certificate is no longer allowed.
pub(crate) async fn watch(
    state: Arc<RevocationState>,
    registry: Arc<Registry>,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut seen = fingerprint(&state.path);
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = fingerprint(&state.path);
        let failing = state.read().is_err();
        if now == seen && !failing {
            continue;
        }
        seen = now;
        let loaded = load_list(&state.path);
        match &loaded {
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
        let cut = registry.kick_where(|serial| !state.is_allowed(serial));
        if cut > 0 {
            tracing::warn!(sessions = cut, "sessions cut after revocation list change");
        }
    }
}
