//! Live sessions, so that revocation, shutdown and session takeover can
//! reach them.
//!
//! Devices have no router link of their own (see [`crate::ingress`]), so the
//! router cannot take over a device's session; this registry does it: a
//! device session that [`Registry::claim`]s its id kicks the session that held
//! it before, marked as taken over. A taken-over session publishes neither its
//! will nor offline presence. Everything a device session says about its
//! presence is queued under the registry's lock ([`Registry::claim`],
//! [`Registry::if_current`]), so the new session's `online` is always queued
//! after anything the old session said: it stays the last word.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cityplane_proto::{Identity, Role};
use tokio::sync::Notify;

#[derive(Debug, Default)]
pub(crate) struct Registry {
    next: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    live: HashMap<u64, Entry>,
    /// Device id → key of the session that holds it.
    devices: HashMap<String, u64>,
}

#[derive(Debug)]
struct Entry {
    /// The device id, for a device's session (pins are per device).
    device: Option<String>,
    serial: String,
    kill: Arc<Kill>,
}

/// How a session is told to end.
#[derive(Debug, Default)]
pub(crate) struct Kill {
    notify: Notify,
    /// Set (under the registry's lock) when a newer session took the id over.
    taken_over: AtomicBool,
    /// Set when the session's certificate was revoked: such a session
    /// publishes no will (a revoked device must not get the last word).
    revoked: AtomicBool,
}

impl Kill {
    /// Resolves once the session must end (revocation, shutdown, takeover).
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    pub(crate) fn taken_over(&self) -> bool {
        self.taken_over.load(Ordering::Acquire)
    }

    pub(crate) fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    fn signal(&self) {
        // notify_one keeps a permit, so a session busy elsewhere still sees it.
        self.notify.notify_one();
    }
}

/// Removes the session from the registry when the session ends.
pub(crate) struct Registration {
    registry: Arc<Registry>,
    key: u64,
    /// The device id this session claimed, if any.
    claimed: Option<String>,
    pub(crate) kill: Arc<Kill>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        inner.live.remove(&self.key);
        if let Some(id) = &self.claimed {
            if inner.devices.get(id) == Some(&self.key) {
                inner.devices.remove(id);
            }
        }
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the session reachable by revocation and shutdown.
    pub(crate) fn register(self: &Arc<Self>, who: &Identity, serial: &str) -> Registration {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Kill::default());
        self.lock().live.insert(
            key,
            Entry {
                device: (who.role == Role::Device).then(|| who.id.clone()),
                serial: serial.to_owned(),
                kill: kill.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            key,
            claimed: None,
            kill,
        }
    }

    /// Makes `registration` the live session of device `id`: the session
    /// that held the id before (if any) is kicked as taken over. `then` runs
    /// under the same lock (it queues the new session's online presence).
    pub(crate) fn claim<R>(
        &self,
        registration: &mut Registration,
        id: &str,
        then: impl FnOnce() -> R,
    ) -> R {
        let mut inner = self.lock();
        if let Some(old) = inner.devices.insert(id.to_owned(), registration.key) {
            if old != registration.key {
                if let Some(entry) = inner.live.get(&old) {
                    entry.kill.taken_over.store(true, Ordering::Release);
                    entry.kill.signal();
                }
            }
        }
        registration.claimed = Some(id.to_owned());
        then()
    }

    /// Runs `f` under the registry's lock unless the session was taken over;
    /// returns whether it ran. A session queues its last words through this,
    /// so that they can never come after a newer session's online presence.
    pub(crate) fn if_current(&self, registration: &Registration, f: impl FnOnce()) -> bool {
        let _inner = self.lock();
        if registration.kill.taken_over() {
            return false;
        }
        f();
        true
    }

    /// Cuts every session for which `doomed(device id, certificate serial)`
    /// holds, as revoked; returns how many. The id is `None` for sessions
    /// that are not a device's.
    pub(crate) fn kick_where(&self, doomed: impl Fn(Option<&str>, &str) -> bool) -> usize {
        let inner = self.lock();
        let mut n = 0;
        for entry in inner
            .live
            .values()
            .filter(|e| doomed(e.device.as_deref(), &e.serial))
        {
            entry.kill.revoked.store(true, Ordering::Release);
            entry.kill.signal();
            n += 1;
        }
        n
    }

    /// Cuts every session (broker shutdown).
    pub(crate) fn shutdown_all(&self) {
        for entry in self.lock().live.values() {
            entry.kill.signal();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> Identity {
        Identity {
            id: id.to_owned(),
            role: Role::Device,
            org: None,
        }
    }

    #[test]
    fn a_second_claim_takes_the_first_session_over() {
        let registry = Arc::new(Registry::default());
        let mut first = registry.register(&device("d1"), "s1");
        registry.claim(&mut first, "d1", || ());
        assert!(!first.kill.taken_over());

        let mut second = registry.register(&device("d1"), "s2");
        registry.claim(&mut second, "d1", || ());
        assert!(first.kill.taken_over());
        assert!(!second.kill.taken_over());
        assert!(!registry.if_current(&first, || panic!("must not run")));
        assert!(registry.if_current(&second, || ()));

        // The old session ending does not release the id held by the new one.
        drop(first);
        let mut third = registry.register(&device("d1"), "s3");
        registry.claim(&mut third, "d1", || ());
        assert!(second.kill.taken_over());
        assert_eq!(registry.len(), 2);

        // Other devices are not affected.
        let mut other = registry.register(&device("d2"), "s4");
        registry.claim(&mut other, "d2", || ());
        assert!(!third.kill.taken_over());
        drop(third);
        drop(second);
        assert_eq!(registry.len(), 1);
        assert!(!registry.lock().devices.contains_key("d1"));
    }
}
