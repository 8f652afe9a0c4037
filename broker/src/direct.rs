//! QoS 0 device messages handed by the edge straight to clean linked
//! sessions, without rumqttd's router.
//!
//! With a controller or operator subscribed over the network, every device
//! message crossed the router's thread: the ingress woke it, it matched the
//! topic and woke the subscriber's task. Two thread wake-ups and context
//! switches per message, where mosquitto handles a message in one pass; the
//! broker spent 1.5× mosquitto's CPU per routed message in the `steady`
//! bench (docs/BENCHMARKS.md). Most of that traffic is QoS 0 telemetry.
//!
//! **When.** A device's publish that is QoS 0 and not retained, on a topic
//! that cannot hold a retained message and whose every matching
//! subscription is an unshared filter of a clean linked session
//! ([`crate::interest::Interest::route`]), is queued here for each of those
//! sessions and never enters the router. Anything else goes through the
//! router as before, which still holds every subscription: QoS 1 and 2
//! (the router assigns packet ids and keeps what is in flight), retained
//! messages (it stores them) and every message on a topic that may hold
//! one (a device's reports and presence, so that retained and live ones
//! keep their order), `$share` groups (it picks the member), a persistent
//! session (it queues while the client is away), an in-process link. It is
//! all or nothing per message, so no subscriber gets a copy both ways; a
//! session gets a copy per matching filter, as from the router.
//!
//! **Order.** MQTT 3.1.1 (4.6) asks for each subscriber to get one client's
//! messages on a topic in order, per QoS. Both paths keep order, and a
//! device's QoS 0 messages on a topic take one path while the subscriptions
//! matching it stay the same. Across topics and QoS levels MQTT promises
//! nothing, and here a device's telemetry may reach a subscriber before
//! the report or presence it sent earlier. QoS 1 stays on the router for
//! that reason: taking a device's acks past the router put them ahead of
//! the report sent before them, which readers of a firmware update's
//! progress rely on (session 22 tried it; `agent-sim/tests/it/firmware.rs`
//! failed).
//!
//! **Loss.** As through the router, QoS 0 messages for a subscriber that
//! does not keep up are dropped: a sink holds at most [`BUDGET`] bytes, and
//! what does not fit is counted and logged by the session. A client that
//! subscribes to every device and never reads holds at most that much of
//! the broker's memory per connection, and slows no device down.
//!
//! **Who sees what** is unchanged: the filters here are the ones the ACL
//! granted (a SUBSCRIBE with one refused filter is refused whole), and a
//! scoped operator's deliveries pass the same per-delivery scope check as
//! the router's.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::link::Delivery;

/// Bytes of topic and payload a sink holds for its session, at most.
pub(crate) const BUDGET: usize = 4 * 1024 * 1024;

/// How often a session logs what its sink dropped, at most.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// One clean linked session's queue of QoS 0 device messages.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    state: Mutex<State>,
    ready: Notify,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Delivery>,
    bytes: usize,
    /// Dropped and not yet reported to the session.
    dropped: u64,
    reported_at: Option<Instant>,
}

/// What [`Sink::take`] hands the session.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    pub(crate) deliveries: Vec<Delivery>,
    /// Messages dropped since the last report, when one is due.
    pub(crate) dropped: u64,
}

impl Sink {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `delivery` without waking the session (the ingress wakes
    /// each sink once per batch, [`Sink::wake`]); false if it was dropped.
    pub(crate) fn push(&self, delivery: Delivery) -> bool {
        let size = delivery.topic.len() + delivery.payload.len();
        let mut state = self.lock();
        if state.bytes + size > BUDGET {
            state.dropped += 1;
            return false;
        }
        state.bytes += size;
        state.queue.push_back(delivery);
        true
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
                    let deliveries: Vec<Delivery> = state.queue.drain(..n).collect();
                    state.bytes -= deliveries
                        .iter()
                        .map(|d| d.topic.len() + d.payload.len())
                        .sum::<usize>();
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
    use bytes::Bytes;

    fn delivery(n: usize, size: usize) -> Delivery {
        Delivery {
            topic: Bytes::from(format!("devices/d{n}/telemetry")),
            payload: Bytes::from(vec![b'x'; size]),
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
}
