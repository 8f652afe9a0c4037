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
//!
//! The table also holds subscriptions the router never hears of: a clean
//! session's filters on a device's own leaves, which the edge
//! serves itself, with the last retained message of each device topic
//! ([`crate::direct`] says when and why). Those are never "wanted": the
//! router does not serve them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use cityplane_proto::topics;

use crate::direct::{Message, Sink};

/// One subscriber's handle in the table: a linked session, or an
/// in-process link (never removed).
pub(crate) type Holder = u64;

/// A device message as the edge routes it.
pub(crate) struct Published<'a> {
    pub(crate) topic: &'a str,
    pub(crate) topic_bytes: &'a Bytes,
    pub(crate) payload: &'a Bytes,
    /// 0 or 1: the edge turns a device's QoS 2 into 1.
    pub(crate) qos: u8,
    pub(crate) retain: bool,
}

/// Sessions a message goes to without the router, each with the QoS it
/// gets it at; a session once per matching filter.
pub(crate) type Sinks = Vec<(Arc<Sink>, u8)>;

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
    /// Filters on device topics that clean linked sessions hold
    /// at the edge alone ([`is_edge_filter`]; the router never hears of
    /// them): filter → holder and granted QoS.
    edge: HashMap<String, Vec<(Holder, u8)>>,
    /// The ones of `edge` with a wildcard.
    edge_wild: Vec<String>,
    /// Holder → its filters in `edge`, with their granted QoS.
    edge_held: HashMap<Holder, HashMap<String, u8>>,
    /// The last retained message of each device topic ([`is_edge_topic`]),
    /// for the edge's own subscriptions; the router keeps its copy for its
    /// own.
    retained: HashMap<String, Message>,
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
        for filter in self
            .edge_held
            .remove(&holder)
            .unwrap_or_default()
            .into_keys()
        {
            self.release_edge(holder, &filter);
        }
    }

    fn release_edge(&mut self, holder: Holder, filter: &str) {
        if let Some(subs) = self.edge.get_mut(filter) {
            subs.retain(|(h, _)| *h != holder);
            if subs.is_empty() {
                self.edge.remove(filter);
                self.edge_wild.retain(|w| w != filter);
            }
        }
    }

    /// Keeps `message` as its topic's retained one (an empty payload
    /// deletes it, as MQTT says).
    fn keep(&mut self, topic: &str, message: &Published<'_>) {
        if message.payload.is_empty() {
            self.retained.remove(topic);
        } else {
            self.retained.insert(
                topic.to_owned(),
                Message {
                    topic: message.topic_bytes.clone(),
                    payload: message.payload.clone(),
                    qos: message.qos,
                    retain: true,
                },
            );
        }
    }

    /// The edge's own subscriptions that match `message`, into `out`.
    fn at_edge(&self, message: &Published<'_>, out: &mut Sinks) {
        let topic = message.topic;
        if !is_edge_topic(topic) {
            return;
        }
        for &(holder, granted) in matching(&self.edge, &self.edge_wild, topic) {
            if let Some(sink) = self.sinks.get(&holder) {
                out.push((sink.clone(), granted.min(message.qos)));
            }
        }
    }

    /// Whether the router must get `message`, for its retained store or a
    /// subscription held there; when not, `out` also gets the sessions
    /// whose router-held filters the edge may serve (QoS 0, not on a
    /// `retainable` topic: see [`crate::direct`]).
    fn to_router(&self, message: &Published<'_>, retainable: bool, out: &mut Sinks) -> bool {
        let topic = message.topic;
        if message.retain {
            return true;
        }
        let mark = out.len();
        for &(holder, shared) in matching(&self.filters, &self.wild, topic) {
            // `$` topics are not for wildcards (MQTT 4.7.2), which `matches`
            // does not check: the router decides those.
            let sink = self
                .sinks
                .get(&holder)
                .filter(|_| message.qos == 0 && !retainable && !shared && !topic.starts_with('$'));
            let Some(sink) = sink else {
                out.truncate(mark);
                return true;
            };
            out.push((sink.clone(), 0));
        }
        false
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

    /// Routes a device's message (from the ingress, in the order devices
    /// sent them): `out` gets the sessions the edge delivers it to; true
    /// when the router must get it too ([`Table::to_router`]). A retained
    /// one is kept for the edge's subscriptions first.
    pub(crate) fn route(&self, message: &Published<'_>, retainable: bool, out: &mut Sinks) -> bool {
        out.clear();
        let mut write;
        let read;
        let table: &Table = if message.retain && is_edge_topic(message.topic) {
            write = self.write();
            write.keep(message.topic, message);
            &write
        } else {
            read = self.read();
            &read
        };
        table.at_edge(message, out);
        table.to_router(message, retainable, out)
    }

    /// A device message a linked client published on its own router link:
    /// `out` gets the edge's own subscriptions that want it (the router
    /// serves its own), and a retained one is kept for them.
    pub(crate) fn route_at_edge(&self, message: &Published<'_>, out: &mut Sinks) {
        out.clear();
        if !is_edge_topic(message.topic) {
            return;
        }
        if message.retain {
            let mut table = self.write();
            table.keep(message.topic, message);
            table.at_edge(message, out);
        } else {
            self.read().at_edge(message, out);
        }
    }

    /// Holds `filters` (with the QoS asked for) at the edge for `holder`, a
    /// clean session's, and queues on its sink the retained messages they
    /// match, ahead of any live one (the ingress routes under the same
    /// lock). False, and nothing done, when the router must take the
    /// SUBSCRIBE: a filter that is not an edge one ([`is_edge_filter`]), or
    /// one the holder already holds there.
    pub(crate) fn subscribe_at_edge(&self, holder: Holder, filters: &[(&str, u8)]) -> bool {
        if !filters.iter().all(|(f, _)| is_edge_filter(f)) {
            return false;
        }
        let mut table = self.write();
        let Some(sink) = table.sinks.get(&holder).cloned() else {
            return false;
        };
        if let Some(held) = table.holders.get(&holder) {
            if filters.iter().any(|(f, _)| held.contains(*f)) {
                return false;
            }
        }
        let table = &mut *table;
        for &(filter, qos) in filters {
            let held = table.edge_held.entry(holder).or_default();
            let subs = table.edge.entry(filter.to_owned()).or_default();
            if held.insert(filter.to_owned(), qos).is_some() {
                // Subscribing again replaces the QoS (MQTT 3.8.4).
                for sub in subs.iter_mut().filter(|(h, _)| *h == holder) {
                    sub.1 = qos;
                }
            } else {
                if subs.is_empty() && is_wild(filter) {
                    table.edge_wild.push(filter.to_owned());
                }
                subs.push((holder, qos));
            }
            // Every subscription, new or replaced, gets the retained
            // messages it matches (MQTT 3.3.1.3, 3.8.4).
            let at = |m: &Message| Message {
                qos: m.qos.min(qos),
                ..m.clone()
            };
            if is_wild(filter) {
                sink.push_retained(
                    table
                        .retained
                        .iter()
                        .filter(|(topic, _)| matches(filter, topic))
                        .map(|(_, m)| at(m)),
                );
            } else {
                sink.push_retained(table.retained.get(filter).map(at));
            }
        }
        sink.wake();
        true
    }

    /// Drops what of `filters` `holder` holds at the edge. True when the
    /// router need not hear of the UNSUBSCRIBE: it holds none of them for
    /// `holder`.
    pub(crate) fn unsubscribe_at_edge(&self, holder: Holder, filters: &[&str]) -> bool {
        let mut table = self.write();
        for filter in filters {
            let held = table
                .edge_held
                .get_mut(&holder)
                .is_some_and(|held| held.remove(*filter).is_some());
            if held {
                table.release_edge(holder, filter);
            }
        }
        table
            .holders
            .get(&holder)
            .is_none_or(|held| !filters.iter().any(|f| held.contains(*f)))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// A leaf of a device topic the edge serves subscriptions to itself: what
/// a device publishes (through the ingress) and its presence.
fn is_edge_leaf(leaf: &str) -> bool {
    topics::DEVICE_PUBLISH_LEAVES.contains(&leaf) || leaf == topics::DEVICE_WILL_LEAF
}

/// A device topic whose subscriptions the edge may hold:
/// `devices/<id>/<leaf>` with a leaf of [`is_edge_leaf`].
pub(crate) fn is_edge_topic(topic: &str) -> bool {
    topics::split_device_topic(topic).is_some_and(|(_, leaf)| is_edge_leaf(leaf))
}

/// A filter the edge may hold instead of the router: `devices/<id or
/// +>/<leaf>` with a leaf of [`is_edge_leaf`]. It matches only topics that
/// reach the edge's routing (a device's publishes and presence, through
/// the ingress; a linked client's, [`Interest::route_at_edge`]), never a
/// device's commands (a controller's link) or image path.
pub(crate) fn is_edge_filter(filter: &str) -> bool {
    topics::split_device_topic(filter)
        .is_some_and(|(id, leaf)| is_edge_leaf(leaf) && (id == "+" || !id.contains(['+', '#'])))
}

/// The subscriptions in `filters` whose filter matches `topic`: the exact
/// one, then those of the filters with a wildcard (`wild`).
fn matching<'a, T>(
    filters: &'a HashMap<String, Vec<T>>,
    wild: &'a [String],
    topic: &'a str,
) -> impl Iterator<Item = &'a T> {
    let exact = filters.get(topic);
    let wild = wild
        .iter()
        .filter(move |f| matches(f, topic))
        .filter_map(move |f| filters.get(f.as_str()));
    exact.into_iter().chain(wild).flatten()
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

    /// Where a device's message on `topic` goes, as the ingress asks.
    #[derive(Debug, PartialEq)]
    enum Route {
        /// Nowhere.
        Nobody,
        /// To the router (and nothing to the edge's own subscriptions).
        Router,
        /// To these many sessions' sinks, and not to the router.
        Direct(usize),
    }

    fn route(interest: &Interest, topic: &str, qos: u8, sinks: &mut Sinks) -> Route {
        let payload = Bytes::from_static(b"{}");
        let topic_bytes = Bytes::copy_from_slice(topic.as_bytes());
        let message = Published {
            topic,
            topic_bytes: &topic_bytes,
            payload: &payload,
            qos,
            retain: false,
        };
        let retainable = topic.ends_with("/reported");
        match (interest.route(&message, retainable, sinks), sinks.len()) {
            (false, 0) => Route::Nobody,
            (true, 0) => Route::Router,
            (false, n) => Route::Direct(n),
            (true, n) => panic!("{topic}: the router and {n} sinks"),
        }
    }

    #[test]
    fn a_router_held_qos0_message_goes_direct_only_when_every_match_is_a_clean_sessions_own_filter()
    {
        let interest = Interest::default();
        let mut sinks = Vec::new();
        let topic = "devices/d1/telemetry";
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Nobody);

        // One clean session with two filters matching: its sink twice, a
        // copy per subscription as through the router.
        let (a, a_sink) = interest.session("alice:1", true);
        let a_sink = a_sink.expect("a clean session has a sink");
        interest.add(a, ["devices/+/telemetry", "devices/#"]);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Direct(2));
        assert!(sinks.iter().all(|(s, _)| Arc::ptr_eq(s, &a_sink)));
        // Reports, QoS 1: the router (see `crate::direct`).
        assert_eq!(
            route(&interest, "devices/d1/reported", 0, &mut sinks),
            Route::Router
        );
        assert_eq!(route(&interest, topic, 1, &mut sinks), Route::Router);
        assert_eq!(
            route(&interest, "fleet/compliance/x", 0, &mut sinks),
            Route::Nobody
        );

        // A second clean session on an exact filter: both sinks.
        let (b, _) = interest.session("bob:1", true);
        interest.add(b, [topic]);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Direct(3));

        // A shared subscription needs the router (it picks the member)...
        interest.add(b, ["$share/bob:g/devices/+/telemetry"]);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Router);
        interest.remove(b, ["$share/bob:g/devices/+/telemetry"]);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Direct(3));

        // ...and so does a persistent session, connected or parked...
        let (p, p_sink) = interest.session("carol:1", false);
        assert!(p_sink.is_none());
        interest.add(p, ["devices/+/telemetry"]);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Router);
        interest.end(p, "carol:1", false);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Router);
        let (clean, _) = interest.session("carol:1", true);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Direct(3));
        interest.end(clean, "carol:1", true);

        // ...and an in-process link, and a `$` topic a wildcard seems to match.
        let link = interest.permanent();
        interest.add(link, ["devices/+/acks"]);
        assert_eq!(
            route(&interest, "devices/d1/acks", 0, &mut sinks),
            Route::Router
        );
        assert_eq!(
            route(&interest, "$SYS/x/telemetry", 0, &mut sinks),
            Route::Nobody
        );
        interest.add(a, ["#"]);
        assert_eq!(route(&interest, "$SYS/x", 0, &mut sinks), Route::Router);

        // A session that ended takes its sink with it.
        interest.end(a, "alice:1", true);
        interest.end(b, "bob:1", true);
        assert_eq!(route(&interest, topic, 0, &mut sinks), Route::Nobody);
    }

    #[test]
    fn the_edge_holds_clean_sessions_device_filters_and_serves_them_whatever_the_router_gets() {
        let interest = Interest::default();
        let mut sinks = Vec::new();
        let (a, a_sink) = interest.session("alice:1", true);
        let a_sink = a_sink.expect("a clean session has a sink");

        // Only device filters on leaves that reach the edge, never commands
        // or what a persistent session subscribes.
        assert!(!interest.subscribe_at_edge(a, &[("devices/+/commands", 1)]));
        assert!(!interest.subscribe_at_edge(a, &[("devices/#", 1)]));
        assert!(!interest.subscribe_at_edge(a, &[("devices/+/reported", 1), ("fleet/#", 0)]));
        let (p, _) = interest.session("carol:1", false);
        assert!(!interest.subscribe_at_edge(p, &[("devices/+/reported", 1)]));
        assert!(interest.subscribe_at_edge(a, &[("devices/+/reported", 1), ("devices/d1/acks", 0)]));
        assert!(
            !interest.wanted("devices/d1/reported"),
            "the router never hears of it"
        );

        // QoS 1 at the edge, at the lower of the two QoS, alongside the
        // router when it has its own subscriber.
        assert_eq!(
            route(&interest, "devices/d1/reported", 1, &mut sinks),
            Route::Direct(1)
        );
        assert_eq!(sinks[0].1, 1);
        assert_eq!(
            route(&interest, "devices/d1/acks", 1, &mut sinks),
            Route::Direct(1)
        );
        assert_eq!(sinks[0].1, 0, "granted QoS 0");
        interest.add(p, ["devices/+/reported"]);
        let payload = Bytes::from_static(b"{}");
        let topic_bytes = Bytes::from_static(b"devices/d1/reported");
        let message = Published {
            topic: "devices/d1/reported",
            topic_bytes: &topic_bytes,
            payload: &payload,
            qos: 1,
            retain: false,
        };
        assert!(
            interest.route(&message, true, &mut sinks),
            "carol's, at the router"
        );
        assert_eq!(sinks.len(), 1, "alice's, at the edge");

        // A filter already at the router stays there.
        let (b, _) = interest.session("bob:1", true);
        interest.add(b, ["devices/+/telemetry"]);
        assert!(!interest.subscribe_at_edge(b, &[("devices/+/telemetry", 0)]));

        // UNSUBSCRIBE: answered at the edge unless the router holds one.
        assert!(interest.unsubscribe_at_edge(a, &["devices/d1/acks", "devices/x/never"]));
        assert_eq!(
            route(&interest, "devices/d1/acks", 1, &mut sinks),
            Route::Nobody
        );
        assert!(!interest.unsubscribe_at_edge(b, &["devices/+/telemetry"]));
        drop(a_sink);
        interest.end(a, "alice:1", true);
        interest.end(b, "bob:1", true);
        assert!(interest.route(&message, true, &mut sinks));
        assert!(sinks.is_empty(), "alice ended");
    }

    #[tokio::test]
    async fn a_new_edge_subscription_gets_the_retained_messages_first_and_a_deleted_one_never() {
        let interest = Interest::default();
        let mut sinks = Vec::new();
        let retained = |topic: &'static str, payload: &'static [u8]| {
            let (topic_bytes, payload) = (
                Bytes::from_static(topic.as_bytes()),
                Bytes::from_static(payload),
            );
            let message = Published {
                topic,
                topic_bytes: &topic_bytes,
                payload: &payload,
                qos: 1,
                retain: true,
            };
            let mut sinks = Vec::new();
            assert!(
                interest.route(&message, true, &mut sinks),
                "the router stores it too"
            );
        };
        retained("devices/d1/presence", b"off");
        retained("devices/d2/presence", b"on");
        retained("devices/d3/presence", b"on");
        retained("devices/d3/presence", b"");
        retained("devices/d1/presence", b"on");

        let (a, sink) = interest.session("alice:1", true);
        let sink = sink.expect("sink");
        assert!(interest.subscribe_at_edge(a, &[("devices/+/presence", 0)]));
        assert_eq!(
            route(&interest, "devices/d2/presence", 1, &mut sinks),
            Route::Direct(1)
        );
        for (s, qos) in &sinks {
            s.push(Message {
                topic: Bytes::from_static(b"devices/d2/presence"),
                payload: Bytes::from_static(b"live"),
                qos: *qos,
                retain: false,
            });
        }
        let taken = sink.take(10).await.deliveries;
        let mut first: Vec<_> = taken[..2]
            .iter()
            .map(|m| (m.topic.clone(), m.payload.clone(), m.qos, m.retain))
            .collect();
        first.sort();
        assert_eq!(
            first,
            [
                (
                    Bytes::from("devices/d1/presence"),
                    Bytes::from("on"),
                    0,
                    true
                ),
                (
                    Bytes::from("devices/d2/presence"),
                    Bytes::from("on"),
                    0,
                    true
                ),
            ],
            "the last retained of each topic, at the granted QoS; d3's was deleted"
        );
        assert_eq!(taken.len(), 3);
        assert_eq!(
            (taken[2].payload.as_ref(), taken[2].retain),
            (&b"live"[..], false)
        );

        // Subscribing again sends them again (MQTT 3.8.4).
        assert!(interest.subscribe_at_edge(a, &[("devices/d1/presence", 1)]));
        let again = sink.take(10).await.deliveries;
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].qos, again[0].retain), (1, true));
    }
}
