//! Live sessions, so that revocation and shutdown can reach them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cityplane_proto::Identity;
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Entry>>,
}

#[derive(Debug)]
struct Entry {
    serial: String,
    kill: Arc<Notify>,
}

/// Removes the session from the registry when the session ends.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    key: u64,
    pub(crate) kill: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(self: &Arc<Self>, _who: &Identity, serial: &str) -> Registration {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        self.lock().insert(
            key,
            Entry {
                serial: serial.to_owned(),
                kill: kill.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            key,
            kill,
        }
    }

    /// Signals every session whose certificate serial matches; returns how many.
    pub(crate) fn kick_where(&self, doomed: impl Fn(&str) -> bool) -> usize {
        let live = self.lock();
        let mut n = 0;
        for entry in live.values().filter(|e| doomed(&e.serial)) {
            // notify_one keeps a permit, so a session busy elsewhere still sees it.
            entry.kill.notify_one();
            n += 1;
        }
        n
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
