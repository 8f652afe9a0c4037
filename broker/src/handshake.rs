//! The budget of sockets still in the TLS handshake, apart from the budget of
//! authenticated connections: a peer without a certificate can hold a socket
//! for up to the handshake timeout, so these must never take the slots of
//! clients that proved who they are.
//!
//! When all `max_handshakes` are pending, or `max_handshakes_per_addr` from
//! the new socket's address, the oldest of them is dropped to admit the new
//! one. A legitimate handshake takes milliseconds, so an attacker would have
//! to open that many new sockets within those milliseconds to push it out,
//! while silent or slow sockets are the first to go; refusing new sockets
//! instead would let one address lock out every client behind the same
//! address (NAT) for as long as it holds its sockets.

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
    fn evict(&mut self, key: u64) {
        if let Some((_, notify)) = self.pending.get(&key) {
            // notify_one keeps a permit for a task not yet waiting.
            notify.notify_one();
        }
        self.remove(key);
    }

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
    /// A place for a new socket from `ip`, made by dropping the oldest
    /// pending handshake (of that address, or of all) if either budget is full.
    pub(crate) fn admit(&self, ip: IpAddr, limits: &Limits) -> Pending {
        let mut inner = lock(&self.inner);
        while inner.per_addr.get(&ip).copied().unwrap_or(0) >= limits.max_handshakes_per_addr.max(1)
        {
            let oldest = inner
                .pending
                .iter()
                .find(|(_, (from, _))| *from == ip)
                .map(|(key, _)| *key);
            match oldest {
                Some(key) => inner.evict(key),
                None => break,
            }
        }
        while inner.pending.len() >= limits.max_handshakes.max(1) {
            let Some(&oldest) = inner.pending.keys().next() else {
                break;
            };
            inner.evict(oldest);
        }
        let key = inner.next;
        inner.next += 1;
        let evicted = Arc::new(Notify::new());
        inner.pending.insert(key, (ip, evicted.clone()));
        *inner.per_addr.entry(ip).or_default() += 1;
        Pending {
            inner: self.inner.clone(),
            key,
            evicted,
        }
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
    async fn the_oldest_pending_handshake_makes_room() {
        let limits = Limits {
            max_handshakes: 3,
            max_handshakes_per_addr: 2,
            ..Limits::default()
        };
        let h = Handshakes::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let b1 = h.admit(b, &limits);
        let a1 = h.admit(a, &limits);
        let a2 = h.admit(a, &limits);
        // a's third pushes out a's oldest, not b's older one.
        let a3 = h.admit(a, &limits);
        evicted(&a1).await;
        assert_eq!(h.len(), 3);
        // All full: c's socket pushes out the oldest of all (b1).
        let _c1 = h.admit(c, &limits);
        evicted(&b1).await;
        assert_eq!(h.len(), 3);
        drop(a1);
        drop(b1);
        assert_eq!(h.len(), 3, "an evicted place is not freed twice");
        drop(a2);
        drop(a3);
        assert_eq!(h.len(), 1);
    }

    async fn evicted(p: &Pending) {
        tokio::time::timeout(std::time::Duration::from_secs(1), p.evicted())
            .await
            .expect("evicted");
    }
}
