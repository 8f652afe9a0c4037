//! Device messages handed by the edge straight to clean linked sessions,
//! without rumqttd's router.
//!
//! With a controller or operator subscribed over the network, every device
//! message crossed the router's thread: the ingress woke it, it matched the
//! topic and woke the subscriber's task. Two thread wake-ups and context
//! switches per message, where mosquitto handles a message in one pass; the
//! broker spent 1.5× mosquitto's CPU per routed message in the `steady`
//! bench (docs/BENCHMARKS.md).
//!
//! **When.** Two ways ([`crate::interest`]):
//! - A clean linked session's SUBSCRIBE whose filters are all on
//!   a device's own leaves (`devices/<id or +>/<reported, telemetry, acks,
//!   csr or presence>`) is answered by the edge, and the router never holds
//!   those filters. Every message on such a topic reaches the edge first
//!   (a device's through the ingress, a linked client's on its way to its
//!   router link, wills and presence alike), which queues it here for each
//!   such subscription, QoS 0 or 1, retained or not, and keeps the last
//!   retained one per topic to send on a new subscription. The router gets
//!   the message too only when it is retained (it keeps its own copy for
//!   its own subscribers) or one of its own filters matches.
//! - For the router's own filters: a QoS 0 message not retained, on a
//!   topic that cannot hold a retained message, that only clean linked
//!   sessions' unshared filters match goes here instead of to the router
//!   (all or nothing: nobody gets it both ways).
//!
//! Everything else is the router's, as before: `$share` groups (it picks
//! the member), persistent sessions (it queues while the client is away),
//! in-process links, filters outside a device's own leaves (`#`,
//! `devices/#`, commands).
//!
//! **Order.** For a subscription the edge holds, all of a device's
//! messages take one path (the ingress, in the order the device sent them),
//! so a subscriber of several of its topics gets them in that order across
//! topics: a report before the ack sent after it, presence before the
//! first report. The retained messages a new subscription gets are queued
//! before any live one, under the table's lock. (Session 22 tried QoS 1
//! from the edge while the router still held the filters: a device's acks
//! overtook the reports it had sent before them, which still crossed the
//! router; `agent-sim/tests/it/firmware.rs` failed.)
//!
//! **Packet ids.** The router numbers a session's QoS 1 and 2 deliveries
//! 1..=100 (rumqttd's in-flight window); the edge numbers its own from
//! [`FIRST_PKID`] up, with at most [`INFLIGHT`] unacknowledged, so a
//! client's PUBACK says by its id which of the two it answers. A session
//! whose client stops acknowledging stops taking from its sink.
//!
//! **Loss.** As through the router, messages for a subscriber that does
//! not keep up are dropped (the router drops the oldest of a filter's log
//! that a reader has not read; the device tap, not this, is where nothing
//! acknowledged may be lost): a sink holds at most [`BUDGET`] bytes of live
//! messages, and what does not fit is counted and logged by the session. A
//! client that subscribes to every device and never reads holds at most
//! that much of the broker's memory per connection, plus
//! [`RETAINED_BUDGET`] for the retained messages it was sent on
//! subscribing (their bytes are the store's, shared; subscribing again and
//! again without reading hits that bound), and slows no device down. A
//! clean session's unacknowledged messages end with it, as with the
//! router.
//!
//! **Who sees what** is unchanged: the filters here are the ones the ACL
//! granted (a SUBSCRIBE with one refused filter is refused whole), and a
//! scoped operator's deliveries pass the same per-delivery scope check as
//! the router's. One of the edge's QoS 1 deliveries that the check drops
//! is simply not sent: its packet id is free again, and unlike the
//! router's it owes nobody a PUBACK.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

/// Bytes of topic and payload a sink holds for its session, at most.
pub(crate) const BUDGET: usize = 4 * 1024 * 1024;

/// The router numbers a session's QoS 1 and 2 deliveries 1..=100 (rumqttd
/// 0.20's `MAX_INFLIGHT`); the edge's own start above them, so a client's
/// PUBACK says by its id which of the two it answers. A session that gets
/// a router delivery numbered from here ends (`session::forward`) rather
/// than confuse the two.
pub(crate) const FIRST_PKID: u16 = 101;

/// The edge's QoS 1 deliveries a session may have unacknowledged.
pub(crate) const INFLIGHT: usize = 100;

/// A device message for one session, at the QoS it is delivered at.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub(crate) topic: Bytes,
    pub(crate) payload: Bytes,
    pub(crate) qos: u8,
    /// Sent because the session subscribed (a retained message), not live.
    pub(crate) retain: bool,
}

impl Message {
    /// What it counts against its budget: a live message its bytes
    /// ([`BUDGET`]); a retained one its own size ([`RETAINED_BUDGET`]:
    /// its bytes are the store's, shared).
    fn charged(&self) -> (usize, usize) {
        if self.retain {
            (0, std::mem::size_of::<Message>())
        } else {
            (self.topic.len() + self.payload.len(), 0)
        }
    }
}

/// Bytes of queue a sink spends on retained messages sent on subscribing,
/// at most: room for ~400,000 (every device's presence and report at
/// 100,000 devices, twice), and a bound on a client that subscribes again
/// and again without reading.
pub(crate) const RETAINED_BUDGET: usize = 32 * 1024 * 1024;

/// How often a session logs what its sink dropped, at most.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// One clean linked session's queue of device messages.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    state: Mutex<State>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Message>,
    bytes: usize,
    retained_bytes: usize,
    /// Dropped and not yet reported to the session.
    dropped: u64,
    reported_at: Option<Instant>,
}

/// What [`Sink::take`] hands the session.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) deliveries: Vec<Message>,
    /// Messages dropped since the last report, when one is due.
    pub(crate) dropped: u64,
}

impl Sink {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `delivery` without waking the session (the ingress wakes
    /// each sink once per batch, [`Sink::wake`]); false if it was dropped.
    pub(crate) fn push(&self, delivery: Message) -> bool {
        let (size, _) = delivery.charged();
        let mut state = self.lock();
        if state.bytes + size > BUDGET {
            state.dropped += 1;
            return false;
        }
        state.bytes += size;
        state.queue.push_back(delivery);
        true
    }

    /// Queues the retained messages a new subscription gets, outside the
    /// live messages' budget: a subscriber must not miss a device's
    /// presence because telemetry filled its queue. What does not fit
    /// [`RETAINED_BUDGET`] is dropped and counted.
    pub(crate) fn push_retained(&self, retained: impl IntoIterator<Item = Message>) {
        let mut state = self.lock();
        for message in retained {
            let message = Message {
                retain: true,
                ..message
            };
            let (_, size) = message.charged();
            if state.retained_bytes + size > RETAINED_BUDGET {
                state.dropped += 1;
                continue;
            }
            state.retained_bytes += size;
            state.queue.push_back(message);
        }
    }

    pub(crate) fn wake(&self) {
        // notify_one keeps a permit if the session is not waiting right now.
        self.ready.notify_one();
    }

    /// Waits for something queued, then takes up to `max` deliveries.
    /// Cancel-safe: nothing is taken unless it is returned.
    pub(crate) async fn take(&self, max: usize) -> Taken {
        loop {
            {
                let mut state = self.lock();
                let now = Instant::now();
                let report = state.dropped > 0
                    && state
                        .reported_at
                        .is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
                if !state.queue.is_empty() || report {
                    let n = state.queue.len().min(max);
                    let deliveries: Vec<Message> = state.queue.drain(..n).collect();
                    for (live, retained) in deliveries.iter().map(Message::charged) {
                        state.bytes -= live;
                        state.retained_bytes -= retained;
                    }
                    if state.queue.is_empty() && state.queue.capacity() > 64 {
                        state.queue = VecDeque::new();
                    }
                    let dropped = if report {
                        state.reported_at = Some(now);
                        std::mem::take(&mut state.dropped)
                    } else {
                        0
                    };
                    if !state.queue.is_empty() {
                        // The rest is for the next turn.
                        self.ready.notify_one();
                    }
                    return Taken {
                        deliveries,
                        dropped,
                    };
                }
            }
            self.ready.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(n: usize, size: usize) -> Message {
        Message {
            topic: Bytes::from(format!("devices/d{n}/telemetry")),
            payload: Bytes::from(vec![b'x'; size]),
            qos: 0,
            retain: false,
        }
    }

    #[tokio::test]
    async fn a_sink_keeps_order_bounds_its_bytes_and_counts_what_it_dropped() {
        let sink = Sink::default();
        let big = BUDGET / 4;
        for n in 0..4 {
            assert!(sink.push(delivery(n, big - 100)), "{n} fits");
        }
        assert!(!sink.push(delivery(4, big)), "over the budget: dropped");
        assert!(!sink.push(delivery(5, big)));
        sink.wake();

        let taken = sink.take(3).await;
        let topics: Vec<_> = taken.deliveries.iter().map(|d| d.topic.clone()).collect();
        assert_eq!(
            topics,
            [
                "devices/d0/telemetry",
                "devices/d1/telemetry",
                "devices/d2/telemetry"
            ]
        );
        assert_eq!(
            taken.dropped, 2,
            "both drops are reported with the first take"
        );

        // Room again once taken; the rest comes next, in order.
        assert!(sink.push(delivery(6, 10)));
        let taken = sink.take(10).await;
        let topics: Vec<_> = taken.deliveries.iter().map(|d| d.topic.clone()).collect();
        assert_eq!(topics, ["devices/d3/telemetry", "devices/d6/telemetry"]);
        assert_eq!(taken.dropped, 0);

        // A drop within a second of the last report waits for the next one.
        for n in 0..5 {
            sink.push(delivery(n, big - 100));
        }
        let taken = sink.take(10).await;
        assert_eq!(taken.deliveries.len(), 4);
        assert_eq!(taken.dropped, 0, "reported at most once a second");
        assert_eq!(sink.lock().dropped, 1);
    }

    #[tokio::test]
    async fn retained_messages_have_a_budget_of_their_own() {
        let sink = Sink::default();
        for n in 0..4 {
            assert!(sink.push(delivery(n, BUDGET / 4 - 100)));
        }
        let fit = RETAINED_BUDGET / std::mem::size_of::<Message>();
        sink.push_retained((0..fit + 3).map(|n| delivery(n, 10)));
        assert_eq!(
            sink.lock().queue.len(),
            4 + fit,
            "a full live budget takes nothing from it"
        );
        assert_eq!(sink.lock().dropped, 3);
        let taken = sink.take(4 + fit).await;
        assert_eq!(taken.dropped, 3);
        assert!(taken.deliveries[4..].iter().all(|m| m.retain));
        let state = sink.lock();
        assert_eq!((state.bytes, state.retained_bytes), (0, 0));
    }
}
