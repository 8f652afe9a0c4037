//! The budget of sockets still in the TLS handshake, apart from the budget of
//! authenticated connections: a peer without a certificate can hold a socket
//! for up to the handshake timeout, so these must never take the slots of
//! clients that proved who they are.
//!
//! Per source address at most `max_handshakes_per_addr` are pending; more
//! are closed at once. When all `max_handshakes` are pending, the oldest is
//! dropped to admit the new one: a legitimate handshake takes milliseconds,
//! so an attacker would have to open the whole budget again within that
//! time to push it out, while slow or silent sockets are the first to go.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::Limits;

#[derive(Debug, Default)]
pub(crate) struct Handshakes {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Oldest first.
    pending: BTreeMap<u64, (IpAddr, Arc<Notify>)>,
    per_addr: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove(&mut self, key: u64) {
        if let Some((ip, _)) = self.pending.remove(&key) {
            if let Some(n) = self.per_addr.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_addr.remove(&ip);
                }
            }
        }
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pending handshake's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Pending {
    inner: Arc<Mutex<Inner>>,
    key: u64,
    evicted: Arc<Notify>,
}

impl Pending {
    /// Resolves when a newer socket took this place.
    pub(crate) async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.inner).remove(self.key);
    }
}

impl Handshakes {
    /// A place for a new socket from `ip`, or `None` if that address has
    /// too many handshakes pending.
    pub(crate) fn admit(&self, ip: IpAddr, limits: &Limits) -> Option<Pending> {
        let mut inner = lock(&self.inner);
        let from_ip = inner.per_addr.get(&ip).copied().unwrap_or(0);
        if from_ip >= limits.max_handshakes_per_addr {
            return None;
        }
        while inner.pending.len() >= limits.max_handshakes.max(1) {
            let Some((&oldest, (_, notify))) = inner.pending.first_key_value() else {
                break;
            };
            // notify_one keeps a permit for a task not yet waiting.
            notify.notify_one();
            inner.remove(oldest);
        }
        let key = inner.next;
        inner.next += 1;
        let evicted = Arc::new(Notify::new());
        inner.pending.insert(key, (ip, evicted.clone()));
        *inner.per_addr.entry(ip).or_default() += 1;
        Some(Pending {
            inner: self.inner.clone(),
            key,
            evicted,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.inner).pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn per_address_limit_and_oldest_evicted_when_full() {
        let limits = Limits {
            max_handshakes: 3,
            max_handshakes_per_addr: 2,
            ..Limits::default()
        };
        let h = Handshakes::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let a1 = h.admit(a, &limits).unwrap();
        let _a2 = h.admit(a, &limits).unwrap();
        assert!(h.admit(a, &limits).is_none(), "a has 2 pending");
        let _b1 = h.admit(b, &limits).unwrap();
        // Full: c's socket pushes out the oldest (a1).
        let _c1 = h.admit(c, &limits).unwrap();
        assert_eq!(h.len(), 3);
        tokio::time::timeout(std::time::Duration::from_secs(1), a1.evicted())
            .await
            .expect("oldest evicted");
        drop(a1);
        assert_eq!(h.len(), 3, "dropping an evicted place frees nothing twice");
        // a has one place left again.
        assert!(h.admit(a, &limits).is_some());
    }
}
