//! What one identity may spend, over all its connections and the broker's
//! lifetime: publish and control-packet rates (a reconnect does not refill
//! them), the distinct filters it has made the router create, and the
//! retained messages it holds. Pure bookkeeping behind mutexes, no I/O.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::Limits;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Bucket {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// One token at `now` (the caller's clock: the session core reads none).
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One identity's budget, shared by all its connections.
#[derive(Debug)]
pub(crate) struct IdentityQuota {
    publishes: Mutex<Bucket>,
    control: Mutex<Bucket>,
    /// Every filter this identity has subscribed to since the broker started.
    filters: Mutex<HashSet<String>>,
    /// Its connections past the handshake.
    connections: std::sync::atomic::AtomicUsize,
}

/// One of an identity's connections; dropping it gives the place back.
#[derive(Debug)]
pub(crate) struct ConnectionPlace(Arc<IdentityQuota>);

impl Drop for ConnectionPlace {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl IdentityQuota {
    /// A place for one more connection of this identity, if it holds
    /// fewer than `cap`.
    pub(crate) fn connect(self: &Arc<Self>, cap: usize) -> Option<ConnectionPlace> {
        use std::sync::atomic::Ordering;
        let mut n = self.connections.load(Ordering::Acquire);
        loop {
            if n >= cap {
                return None;
            }
            match self
                .connections
                .compare_exchange(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(ConnectionPlace(self.clone())),
                Err(now) => n = now,
            }
        }
    }

    /// One PUBLISH.
    pub(crate) fn take_publish(&self, now: Instant) -> bool {
        lock(&self.publishes).take(now)
    }

    /// One SUBSCRIBE, UNSUBSCRIBE or PINGREQ.
    pub(crate) fn take_control(&self, now: Instant) -> bool {
        lock(&self.control).take(now)
    }

    /// Records `filters` as used by this identity unless that would make
    /// more than `cap` distinct filters; all or nothing.
    pub(crate) fn admit_filters<'a>(
        &self,
        filters: impl IntoIterator<Item = &'a str> + Clone,
        cap: usize,
    ) -> bool {
        let mut known = lock(&self.filters);
        let new: HashSet<&str> = filters
            .clone()
            .into_iter()
            .filter(|f| !known.contains(*f))
            .collect();
        if known.len() + new.len() > cap {
            return false;
        }
        known.extend(new.into_iter().map(str::to_owned));
        true
    }
}

/// Quotas by identity id. An entry lives as long as the broker: a few
/// hundred bytes per identity that ever connected.
#[derive(Debug, Default)]
pub(crate) struct Quotas {
    by_id: Mutex<HashMap<String, Arc<IdentityQuota>>>,
}

impl Quotas {
    pub(crate) fn of(&self, id: &str, limits: &Limits) -> Arc<IdentityQuota> {
        let mut map = lock(&self.by_id);
        if let Some(q) = map.get(id) {
            return q.clone();
        }
        let q = Arc::new(IdentityQuota {
            publishes: Mutex::new(Bucket::new(
                limits.max_publishes_per_sec,
                limits.max_publishes_per_sec,
            )),
            control: Mutex::new(Bucket::new(
                limits.max_subscribes_per_sec,
                limits
                    .max_subscribes_per_sec
                    .max(u32::try_from(limits.max_subscriptions).unwrap_or(u32::MAX)),
            )),
            filters: Mutex::new(HashSet::new()),
            connections: std::sync::atomic::AtomicUsize::new(0),
        });
        map.insert(id.to_owned(), q.clone());
        q
    }
}

/// At most one log line a second for an event any peer can cause.
#[derive(Debug, Default)]
pub(crate) struct LogBudget {
    inner: Mutex<(Option<Instant>, u64)>,
}

impl LogBudget {
    /// `Some(n)` when this event may be logged, `n` being how many since the
    /// last logged one were not.
    pub(crate) fn admit(&self) -> Option<u64> {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        match inner.0 {
            Some(last) if now.duration_since(last) < std::time::Duration::from_secs(1) => {
                inner.1 += 1;
                None
            }
            _ => {
                let unlogged = std::mem::take(&mut inner.1);
                inner.0 = Some(now);
                Some(unlogged)
            }
        }
    }
}

/// The retained messages clients have set (the router holds the messages;
/// this holds who set each and its size, to enforce the limits).
#[derive(Debug, Default)]
pub(crate) struct Retained {
    inner: Mutex<RetainedInner>,
}

#[derive(Debug, Default)]
struct RetainedInner {
    by_topic: HashMap<String, (String, usize)>,
    by_owner: HashMap<String, (usize, usize)>,
    count: usize,
    bytes: usize,
}

impl RetainedInner {
    fn remove(&mut self, topic: &str) {
        if let Some((owner, bytes)) = self.by_topic.remove(topic) {
            self.count -= 1;
            self.bytes -= bytes;
            if let Some(o) = self.by_owner.get_mut(&owner) {
                o.0 -= 1;
                o.1 -= bytes;
                if o.0 == 0 {
                    self.by_owner.remove(&owner);
                }
            }
        }
    }
}

impl Retained {
    /// Accounts a retained publish of `bytes` on `topic` by `owner` (0 bytes
    /// deletes the message). `Err` says which limit it would break; then
    /// nothing changes.
    pub(crate) fn set(
        &self,
        owner: &str,
        topic: &str,
        bytes: usize,
        limits: &Limits,
    ) -> Result<(), String> {
        let mut r = lock(&self.inner);
        if bytes == 0 {
            r.remove(topic);
            return Ok(());
        }
        // What the replaced message frees, if any.
        let (freed_count, freed_bytes, freed_own_count, freed_own_bytes) =
            match r.by_topic.get(topic) {
                Some((o, b)) if o == owner => (1, *b, 1, *b),
                Some((_, b)) => (1, *b, 0, 0),
                None => (0, 0, 0, 0),
            };
        let (own_count, own_bytes) = r.by_owner.get(owner).copied().unwrap_or((0, 0));
        if r.count - freed_count + 1 > limits.max_retained
            || r.bytes - freed_bytes + bytes > limits.max_retained_bytes
        {
            return Err(format!(
                "broker-wide retained limit reached ({} messages / {} bytes)",
                limits.max_retained, limits.max_retained_bytes
            ));
        }
        if own_count - freed_own_count + 1 > limits.max_retained_per_identity
            || own_bytes - freed_own_bytes + bytes > limits.max_retained_bytes_per_identity
        {
            return Err(format!(
                "retained limit of this identity reached ({} messages / {} bytes)",
                limits.max_retained_per_identity, limits.max_retained_bytes_per_identity
            ));
        }
        r.remove(topic);
        r.by_topic
            .insert(topic.to_owned(), (owner.to_owned(), bytes));
        let o = r.by_owner.entry(owner.to_owned()).or_default();
        o.0 += 1;
        o.1 += bytes;
        r.count += 1;
        r.bytes += bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_retained: 4,
            max_retained_bytes: 100,
            max_retained_per_identity: 2,
            max_retained_bytes_per_identity: 50,
            ..Limits::default()
        }
    }

    #[test]
    fn retained_limits_count_replacements_once() {
        let r = Retained::default();
        let l = limits();
        r.set("a", "t1", 20, &l).unwrap();
        r.set("a", "t2", 20, &l).unwrap();
        // A third topic is over a's count; replacing one is not.
        assert!(r.set("a", "t3", 1, &l).is_err());
        r.set("a", "t2", 30, &l).unwrap();
        assert!(r.set("a", "t2", 31, &l).is_err(), "a's bytes: 20 + 31 > 50");
        // Deleting frees room.
        r.set("a", "t1", 0, &l).unwrap();
        r.set("a", "t3", 20, &l).unwrap();
        r.set("b", "t4", 50, &l).unwrap();
        assert!(r.set("c", "t5", 1, &l).is_err(), "broker-wide bytes: 100");
        r.set("c", "t4", 1, &l).unwrap();
        r.set("c", "t6", 1, &l).unwrap();
        assert!(r.set("d", "t7", 1, &l).is_err(), "broker-wide count: 4");
    }

    #[test]
    fn distinct_filters_are_capped_all_or_nothing() {
        let q = Quotas::default().of("op", &Limits::default());
        assert!(q.admit_filters(["a", "b"], 3));
        assert!(q.admit_filters(["a", "b"], 3), "known filters cost nothing");
        assert!(!q.admit_filters(["c", "d"], 3));
        assert!(q.admit_filters(["c"], 3));
        assert!(!q.admit_filters(["e"], 3));
    }

    #[test]
    fn connection_places_per_identity_are_capped_and_given_back() {
        let q = Quotas::default().of("d1", &Limits::default());
        let a = q.connect(2).expect("first");
        let _b = q.connect(2).expect("second");
        assert!(q.connect(2).is_none());
        drop(a);
        assert!(q.connect(2).is_some());
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut b = Bucket::new(1, 3);
        let now = Instant::now();
        assert!((0..3).all(|_| b.take(now)));
        assert!(!b.take(now));
        assert!(b.take(now + std::time::Duration::from_secs(1)));
    }
}
