//! Who may receive a device's message: the router is entered only then.
//!
//! Every device publish used to cross the router thread (two thread
//! wake-ups and a context switch each way) even when nobody subscribed to
//! it: at 1,000 devices sending telemetry with no subscriber, the broker
//! spent 1.4× mosquitto's CPU, mostly in wake-ups. Subscriptions reach the
//! router only through this process (linked sessions' SUBSCRIBE and
//! in-process links), so the edge can keep its own table of the filters
//! the router holds and ask it first.
//!
//! The table may say "wanted" for a topic nobody receives (a persistent
//! session's filters stay after it ends, until a clean session of the same
//! client id discards them, as the router does); it must never say "not
//! wanted" for one somebody does: that would lose the message. So filters
//! are added before the SUBSCRIBE reaches the router and removed only
//! after the UNSUBSCRIBE or the clean end was handed to it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use cityplane_proto::topics;

/// One subscriber's handle in the table: a linked session, or an
/// in-process link (never removed).
pub(crate) type Holder = u64;

#[derive(Default)]
pub(crate) struct Interest {
    next: AtomicU64,
    table: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    /// Filter (without a `$share/<group>/` prefix) → holders holding it.
    filters: HashMap<String, usize>,
    /// The filters with a wildcard, matched one by one (few in practice:
    /// per-identity filter quotas bound them).
    wild: Vec<String>,
    holders: HashMap<Holder, HashSet<String>>,
    /// Holders of persistent sessions that ended, by client id: the router
    /// keeps their subscriptions (and queues for them) until a clean
    /// session of that id connects.
    parked: HashMap<String, Vec<Holder>>,
}

impl Table {
    fn add(&mut self, holder: Holder, filter: &str) {
        let filter = unshared(filter);
        let held = self.holders.entry(holder).or_default();
        if held.insert(filter.to_owned()) {
            let count = self.filters.entry(filter.to_owned()).or_insert(0);
            *count += 1;
            if *count == 1 && is_wild(filter) {
                self.wild.push(filter.to_owned());
            }
        }
    }

    fn remove(&mut self, holder: Holder, filter: &str) {
        let filter = unshared(filter);
        let Some(held) = self.holders.get_mut(&holder) else {
            return;
        };
        if held.remove(filter) {
            self.release(filter);
        }
    }

    fn release(&mut self, filter: &str) {
        if let Some(count) = self.filters.get_mut(filter) {
            *count -= 1;
            if *count == 0 {
                self.filters.remove(filter);
                self.wild.retain(|w| w != filter);
            }
        }
    }

    fn drop_holder(&mut self, holder: Holder) {
        for filter in self.holders.remove(&holder).unwrap_or_default() {
            self.release(&filter);
        }
    }
}

impl Interest {
    /// A new holder for a linked session of `client_id`. A clean session
    /// discards what earlier persistent sessions of that id left (the
    /// router does the same when the link is built).
    pub(crate) fn session(&self, client_id: &str, clean: bool) -> Holder {
        let holder = self.next.fetch_add(1, Ordering::Relaxed);
        if clean {
            let mut table = self.write();
            for old in table.parked.remove(client_id).unwrap_or_default() {
                table.drop_holder(old);
            }
        }
        holder
    }

    /// The session behind `holder` ended. A persistent one's filters stay
    /// (see [`Interest::session`]).
    pub(crate) fn end(&self, holder: Holder, client_id: &str, clean: bool) {
        let mut table = self.write();
        if clean {
            table.drop_holder(holder);
        } else if table.holders.contains_key(&holder) {
            table
                .parked
                .entry(client_id.to_owned())
                .or_default()
                .push(holder);
        }
    }

    /// A holder that is never removed: an in-process link.
    pub(crate) fn permanent(&self) -> Holder {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn add<'a>(&self, holder: Holder, filters: impl IntoIterator<Item = &'a str>) {
        let mut table = self.write();
        for filter in filters {
            table.add(holder, filter);
        }
    }

    pub(crate) fn remove<'a>(&self, holder: Holder, filters: impl IntoIterator<Item = &'a str>) {
        let mut table = self.write();
        for filter in filters {
            table.remove(holder, filter);
        }
    }

    /// Whether a subscription may match `topic`.
    pub(crate) fn wanted(&self, topic: &str) -> bool {
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        table.filters.contains_key(topic) || table.wild.iter().any(|f| matches(f, topic))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn unshared(filter: &str) -> &str {
    filter
        .strip_prefix(topics::SHARE_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_group, filter)| filter)
}

fn is_wild(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// MQTT 3.1.1 filter matching (4.7). A topic starting with `$` is matched
/// by wildcards too: saying "wanted" too often only costs a router pass.
fn matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_mqtt_says() {
        for (filter, topic, want) in [
            ("devices/+/reported", "devices/d1/reported", true),
            ("devices/+/reported", "devices/d1/telemetry", false),
            ("devices/#", "devices/d1/reported", true),
            ("devices/#", "devices", true),
            ("#", "devices/d1/reported", true),
            ("+/+/+", "devices/d1/reported", true),
            ("+/+", "devices/d1/reported", false),
            ("devices/d1/reported", "devices/d1/reported", true),
            ("devices/+", "devices/d1/reported", false),
            ("devices/+/reported/+", "devices/d1/reported", false),
        ] {
            assert_eq!(matches(filter, topic), want, "{filter} vs {topic}");
        }
    }

    #[test]
    fn a_topic_is_wanted_exactly_while_a_subscription_may_match_it() {
        let interest = Interest::default();
        let topic = "devices/d1/telemetry";
        assert!(!interest.wanted(topic));

        // Two sessions hold the same wildcard; one leaving keeps it wanted.
        let a = interest.session("alice:1", true);
        let b = interest.session("bob:1", true);
        interest.add(a, ["devices/+/telemetry"]);
        interest.add(b, ["$share/bob:g/devices/+/telemetry"]);
        assert!(interest.wanted(topic));
        interest.end(a, "alice:1", true);
        assert!(interest.wanted(topic));
        interest.remove(b, ["$share/bob:g/devices/+/telemetry"]);
        assert!(!interest.wanted(topic));

        // An exact filter, held twice by one holder, counts once.
        interest.add(b, [topic, topic]);
        interest.remove(b, [topic]);
        assert!(!interest.wanted(topic));

        // A persistent session's filters outlive it until a clean session
        // of the same client id; another id's clean session does not touch them.
        let p = interest.session("carol:1", false);
        interest.add(p, ["devices/#"]);
        interest.end(p, "carol:1", false);
        assert!(interest.wanted(topic));
        let other = interest.session("carol:2", true);
        interest.end(other, "carol:2", true);
        assert!(interest.wanted(topic));
        let resumed = interest.session("carol:1", false);
        interest.end(resumed, "carol:1", false);
        assert!(interest.wanted(topic));
        let clean = interest.session("carol:1", true);
        assert!(!interest.wanted(topic));
        interest.end(clean, "carol:1", true);

        let link = interest.permanent();
        interest.add(link, ["devices/+/+"]);
        assert!(interest.wanted(topic));
    }
}
