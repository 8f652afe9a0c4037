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
use std::sync::{Arc, RwLock};

use cityplane_proto::topics;

use crate::direct::Sink;

/// One subscriber's handle in the table: a linked session, or an
/// in-process link (never removed).
pub(crate) type Holder = u64;

/// Where a QoS 0, not retained message goes ([`Interest::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// No subscription may match it.
    Nobody,
    /// At least one subscription the edge cannot serve itself matches it.
    Router,
    /// Every matching subscription is a clean linked session's own
    /// (unshared) filter: to their sinks, not to the router.
    Direct,
}

#[derive(Default)]
pub(crate) struct Interest {
    next: AtomicU64,
    table: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    /// Filter (without a `$share/<group>/` prefix) → who holds it, and
    /// whether through a shared subscription.
    filters: HashMap<String, Vec<(Holder, bool)>>,
    /// The filters with a wildcard, matched one by one (few in practice:
    /// per-identity filter quotas bound them).
    wild: Vec<String>,
    /// Holder → the filters it holds, as subscribed (`$share/...` kept).
    holders: HashMap<Holder, HashSet<String>>,
    /// Holders of persistent sessions that ended, by client id: the router
    /// keeps their subscriptions (and queues for them) until a clean
    /// session of that id connects.
    parked: HashMap<String, Vec<Holder>>,
    /// Clean linked sessions' queues for messages the edge delivers itself
    /// ([`crate::direct`]).
    sinks: HashMap<Holder, Arc<Sink>>,
}

impl Table {
    fn add(&mut self, holder: Holder, filter: &str) {
        let held = self.holders.entry(holder).or_default();
        if held.insert(filter.to_owned()) {
            let (bare, shared) = unshared(filter);
            let subs = self.filters.entry(bare.to_owned()).or_default();
            if subs.is_empty() && is_wild(bare) {
                self.wild.push(bare.to_owned());
            }
            subs.push((holder, shared));
        }
    }

    fn remove(&mut self, holder: Holder, filter: &str) {
        let Some(held) = self.holders.get_mut(&holder) else {
            return;
        };
        if held.remove(filter) {
            self.release(holder, filter);
        }
    }

    fn release(&mut self, holder: Holder, filter: &str) {
        let (bare, shared) = unshared(filter);
        if let Some(subs) = self.filters.get_mut(bare) {
            if let Some(at) = subs.iter().position(|s| *s == (holder, shared)) {
                subs.swap_remove(at);
            }
            if subs.is_empty() {
                self.filters.remove(bare);
                self.wild.retain(|w| w != bare);
            }
        }
    }

    fn drop_holder(&mut self, holder: Holder) {
        self.sinks.remove(&holder);
        for filter in self.holders.remove(&holder).unwrap_or_default() {
            self.release(holder, &filter);
        }
    }
}

impl Interest {
    /// A new holder for a linked session of `client_id`, and for a clean
    /// one its sink. A clean session discards what earlier persistent
    /// sessions of that id left (the router does the same when the link is
    /// built).
    pub(crate) fn session(&self, client_id: &str, clean: bool) -> (Holder, Option<Arc<Sink>>) {
        let holder = self.next.fetch_add(1, Ordering::Relaxed);
        if !clean {
            return (holder, None);
        }
        let sink = Arc::new(Sink::default());
        let mut table = self.write();
        for old in table.parked.remove(client_id).unwrap_or_default() {
            table.drop_holder(old);
        }
        table.sinks.insert(holder, sink.clone());
        (holder, Some(sink))
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
        let table = self.read();
        table.filters.contains_key(topic) || table.wild.iter().any(|f| matches(f, topic))
    }

    /// Where a QoS 0, not retained message on `topic` goes; for
    /// [`Route::Direct`], `sinks` is left holding each receiving session's
    /// sink once per filter of its that matches: a copy each, as the router
    /// delivers one per matching subscription.
    pub(crate) fn route(&self, topic: &str, sinks: &mut Vec<Arc<Sink>>) -> Route {
        sinks.clear();
        let table = self.read();
        let exact = table.filters.get(topic);
        let wild = table
            .wild
            .iter()
            .filter(|f| matches(f, topic))
            .filter_map(|f| table.filters.get(f.as_str()));
        let mut matched = false;
        for &(holder, shared) in exact.into_iter().chain(wild).flatten() {
            matched = true;
            // `$` topics are not for wildcards (MQTT 4.7.2), which `matches`
            // does not check: the router decides those.
            let sink = table
                .sinks
                .get(&holder)
                .filter(|_| !shared && !topic.starts_with('$'));
            let Some(sink) = sink else {
                sinks.clear();
                return Route::Router;
            };
            sinks.push(sink.clone());
        }
        if matched {
            Route::Direct
        } else {
            Route::Nobody
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The filter without a `$share/<group>/` prefix, and whether it had one.
fn unshared(filter: &str) -> (&str, bool) {
    filter
        .strip_prefix(topics::SHARE_PREFIX)
        .and_then(|rest| rest.split_once('/'))
        .map_or((filter, false), |(_group, filter)| (filter, true))
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
        let (a, _) = interest.session("alice:1", true);
        let (b, _) = interest.session("bob:1", true);
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
        let (p, _) = interest.session("carol:1", false);
        interest.add(p, ["devices/#"]);
        interest.end(p, "carol:1", false);
        assert!(interest.wanted(topic));
        let (other, _) = interest.session("carol:2", true);
        interest.end(other, "carol:2", true);
        assert!(interest.wanted(topic));
        let (resumed, _) = interest.session("carol:1", false);
        interest.end(resumed, "carol:1", false);
        assert!(interest.wanted(topic));
        let (clean, _) = interest.session("carol:1", true);
        assert!(!interest.wanted(topic));
        interest.end(clean, "carol:1", true);

        let link = interest.permanent();
        interest.add(link, ["devices/+/+"]);
        assert!(interest.wanted(topic));
    }

    #[test]
    fn a_qos0_message_goes_direct_only_when_every_match_is_a_clean_sessions_own_filter() {
        let interest = Interest::default();
        let mut sinks = Vec::new();
        let topic = "devices/d1/telemetry";
        assert_eq!(interest.route(topic, &mut sinks), Route::Nobody);

        // One clean session with two filters matching: its sink twice, a
        // copy per subscription as through the router.
        let (a, a_sink) = interest.session("alice:1", true);
        let a_sink = a_sink.expect("a clean session has a sink");
        interest.add(a, ["devices/+/telemetry", "devices/#"]);
        assert_eq!(interest.route(topic, &mut sinks), Route::Direct);
        assert_eq!(sinks.len(), 2);
        assert!(sinks.iter().all(|s| Arc::ptr_eq(s, &a_sink)));
        assert_eq!(
            interest.route("devices/d1/reported", &mut sinks),
            Route::Direct
        );
        assert_eq!(sinks.len(), 1);
        assert_eq!(
            interest.route("fleet/compliance/x", &mut sinks),
            Route::Nobody
        );
        assert!(sinks.is_empty());

        // A second clean session on an exact filter: both sinks.
        let (b, _) = interest.session("bob:1", true);
        interest.add(b, [topic]);
        assert_eq!(interest.route(topic, &mut sinks), Route::Direct);
        assert_eq!(sinks.len(), 3);

        // A shared subscription needs the router (it picks the member)...
        interest.add(b, ["$share/bob:g/devices/+/telemetry"]);
        assert_eq!(interest.route(topic, &mut sinks), Route::Router);
        assert!(sinks.is_empty(), "nothing to deliver directly");
        interest.remove(b, ["$share/bob:g/devices/+/telemetry"]);
        assert_eq!(interest.route(topic, &mut sinks), Route::Direct);

        // ...and so does a persistent session, connected or parked...
        let (p, p_sink) = interest.session("carol:1", false);
        assert!(p_sink.is_none());
        interest.add(p, ["devices/+/telemetry"]);
        assert_eq!(interest.route(topic, &mut sinks), Route::Router);
        interest.end(p, "carol:1", false);
        assert_eq!(interest.route(topic, &mut sinks), Route::Router);
        let (clean, _) = interest.session("carol:1", true);
        assert_eq!(interest.route(topic, &mut sinks), Route::Direct);
        interest.end(clean, "carol:1", true);

        // ...and an in-process link, and a `$` topic a wildcard seems to match.
        let link = interest.permanent();
        interest.add(link, ["devices/+/acks"]);
        assert_eq!(interest.route("devices/d1/acks", &mut sinks), Route::Router);
        assert_eq!(
            interest.route("$SYS/x/telemetry", &mut sinks),
            Route::Nobody
        );
        interest.add(a, ["#"]);
        assert_eq!(interest.route("$SYS/x", &mut sinks), Route::Router);

        // A session that ended takes its sink with it.
        interest.end(a, "alice:1", true);
        interest.end(b, "bob:1", true);
        assert_eq!(interest.route(topic, &mut sinks), Route::Nobody);
    }
}
