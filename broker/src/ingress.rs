//! The one router link that every device connection publishes through.
//!
//! A link of its own costs each connection what rumqttd's `LinkBuilder`
//! preallocates (buffers for 200 packets each way, 100 in flight, the
//! router's per-connection state): most of a connection's memory. Devices do
//! not need one: their only subscription (`devices/D/commands`) is answered
//! by the edge and fed by [`crate::dispatch`], and everything else they send
//! is PUBLISH (plus PUBACK, PINGREQ, DISCONNECT, which the edge answers).
//! So device publishes, wills and presence all enter the router here.
//!
//! Sessions hand packets to one bounded FIFO queue, so each device's packets
//! keep their order and a slow router slows the devices down (nothing is
//! dropped). One task moves whatever is queued into the link's buffer and
//! wakes the router once per batch (a dedicated thread cost a thread wake-up
//! per message at moderate rates: ~60% more broker CPU per message in the
//! fan-in bench). `LinkTx::send` blocks that task's worker while the
//! router's 1000-slot channel is full, as it did every session's worker
//! before; with one wake-up per batch the ingress uses few slots. Another
//! task drains what the router sends back on the link (a PubAck per QoS 1
//! publish; it would answer `Unschedule` with `wake()`).
//!
//! On the way, each message is handed to the in-process controller's tap
//! if it is on one of its leaves, and enters the router only if it is
//! retained or a subscription may want it ([`crate::interest`]): a quiet
//! fleet nobody watches costs no router wake-ups at all. A QoS 0 message
//! that only clean linked sessions want goes to them without the router
//! ([`crate::direct`]), each session woken once per batch.
//!
//! Packet ids of many devices collide on this link. The router keeps no
//! state for a QoS 0 or 1 publish it receives (it only queues the PUBACK),
//! but it holds a QoS 2 publish under its packet id until PUBREL, so only
//! QoS 0 and 1 are sent here: the edge turns a device's QoS 2 publish into
//! QoS 1 and runs the QoS 2 handshake with the device itself.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::Packet;
use rumqttd::Notification;
use tokio::sync::{mpsc, watch};

use crate::backlog::Backlog;
use crate::direct::{Message, Sink};
use crate::interest::{Interest, Published, Sinks};
use crate::link::Delivery;
use crate::{BrokerError, RouterTx};

/// Packets that may wait for the router before sessions have to wait.
const QUEUE: usize = 4096;
/// Packets moved into the link per router wake-up, at most.
const BATCH: usize = 512;
/// Not a valid cityplane id (ids start with `[a-z0-9]`), so no client can
/// take this link over by connecting with the same client id.
pub(crate) const LINK_ID: &str = "_cityplane-ingress";

/// Where a device's message goes besides the router: the in-process
/// controller's tap, and whether the router is needed at all.
#[derive(Default)]
pub(crate) struct Routing {
    pub(crate) interest: Interest,
    pub(crate) device_tap: std::sync::OnceLock<DeviceTapTx>,
}

/// Device messages on `devices/+/<leaf>` for `leaves` go to `tx`.
pub(crate) struct DeviceTapTx {
    pub(crate) leaves: Vec<&'static str>,
    /// In batches: one wake-up of the reader per batch the ingress moves
    /// (one per message cost 25 % of the report rate through devices).
    pub(crate) tx: mpsc::Sender<Vec<Delivery>>,
}

impl Routing {
    /// What the tap takes of `packet` (a device message on a tapped leaf),
    /// whoever published it: a device through the ingress, or a
    /// controller-role client on its own link.
    pub(crate) fn tapped(
        &self,
        packet: &Packet,
    ) -> Option<(&mpsc::Sender<Vec<Delivery>>, Delivery)> {
        let tap = self.device_tap.get()?;
        let Packet::Publish(publish, _) = packet else {
            return None;
        };
        let topic = std::str::from_utf8(&publish.topic).ok()?;
        let (_, leaf) = cityplane_proto::topics::split_device_topic(topic)?;
        tap.leaves.contains(&leaf).then(|| {
            (
                &tap.tx,
                Delivery {
                    topic: publish.topic.clone(),
                    payload: publish.payload.clone(),
                },
            )
        })
    }

    /// Where `packet` goes: `sinks` gets the sessions the edge delivers it
    /// to itself ([`crate::direct`]); true when the router must get it too
    /// (to store a retained one, or for a subscription held there).
    fn route(&self, packet: &Packet, sinks: &mut Sinks) -> bool {
        sinks.clear();
        let Some(message) = published(packet) else {
            return true;
        };
        // A topic that may hold a retained message (a device's reports; its
        // presence is always retained) takes the router whatever the flag
        // for the router's own subscriptions, so retained and live messages
        // on it keep their order for them.
        let retainable = cityplane_proto::topics::split_device_topic(message.topic)
            .is_some_and(|(_, leaf)| crate::acl::DEVICE_RETAINABLE_LEAVES.contains(&leaf));
        self.interest.route(&message, retainable, sinks)
    }

    /// A linked client's publish on a device topic, which goes to the
    /// router on the client's own link: delivered here to the sessions
    /// whose subscriptions the edge holds (the router knows nothing of
    /// them).
    pub(crate) fn at_edge(&self, packet: &Packet) {
        let Some(message) = published(packet) else {
            return;
        };
        let mut sinks = Vec::new();
        self.interest.route_at_edge(&message, &mut sinks);
        let mut woken = Vec::new();
        direct(packet, &sinks, &mut woken);
        wake(&mut woken);
    }
}

/// A publish as [`crate::interest`] routes it.
fn published(packet: &Packet) -> Option<Published<'_>> {
    let Packet::Publish(publish, _) = packet else {
        return None;
    };
    let topic = std::str::from_utf8(&publish.topic).ok()?;
    let qos = if crate::mqtt::outbound::is_qos0(publish) {
        0
    } else {
        1
    };
    Some(Published {
        topic,
        topic_bytes: &publish.topic,
        payload: &publish.payload,
        qos,
        retain: publish.retain,
    })
}

/// The router no longer takes packets (its thread is gone).
#[derive(Debug)]
pub(crate) struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("router ingress closed")
    }
}

/// The sending side, shared by every device session.
#[derive(Debug)]
pub(crate) struct Ingress {
    tx: mpsc::Sender<Packet>,
}

impl Ingress {
    /// Opens the shared link and starts its forwarding and drain tasks.
    pub(crate) async fn start(
        router_tx: RouterTx,
        backlog: Arc<Backlog>,
        routing: Arc<Routing>,
    ) -> Result<Ingress, BrokerError> {
        let (link_tx, link_rx) = open(&router_tx).await?;
        let dead = Arc::new(AtomicBool::new(false));
        // Dropped by `forward` when it ends, which ends the drain tasks.
        let (stop, _) = watch::channel(());
        tokio::spawn(drain(link_rx, dead.clone(), stop.subscribe()));
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(forward(
            rx, link_tx, router_tx, dead, stop, backlog, routing,
        ));
        Ok(Ingress { tx })
    }

    /// Room for one packet, waiting while the queue is full. Packets from
    /// one caller reach the router in the order they were queued.
    pub(crate) async fn reserve_one(&self) -> Result<mpsc::Permit<'_, Packet>, Closed> {
        self.tx.reserve().await.map_err(|_| Closed)
    }

    /// Room for `n` packets, to be queued later without waiting (e.g. while
    /// holding the registry's lock, see [`crate::registry`]).
    pub(crate) async fn reserve(
        &self,
        n: usize,
    ) -> Result<mpsc::PermitIterator<'_, Packet>, Closed> {
        self.tx.reserve_many(n).await.map_err(|_| Closed)
    }
}

async fn open(router_tx: &RouterTx) -> Result<(LinkTx, LinkRx), BrokerError> {
    let router_tx = router_tx.clone();
    // Building a link blocks until the router answers.
    tokio::task::spawn_blocking(move || router_tx(LINK_ID, true))
        .await
        .map_err(|e| BrokerError::Link(e.to_string()))?
        .map(|(tx, rx, _connack)| (tx, rx))
        .map_err(BrokerError::Link)
}

/// Queue → link, one router wake-up per batch. Ends when every session and
/// the broker dropped their `Ingress` (after forwarding what was queued),
/// and then closes the link.
async fn forward(
    mut rx: mpsc::Receiver<Packet>,
    mut link: LinkTx,
    router_tx: RouterTx,
    dead: Arc<AtomicBool>,
    stop: watch::Sender<()>,
    backlog: Arc<Backlog>,
    routing: Arc<Routing>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut ready = Vec::with_capacity(BATCH);
    // Sessions a message goes to directly, and those to wake after the batch.
    let mut sinks = Vec::new();
    let mut woken: Vec<Arc<Sink>> = Vec::new();
    let mut router_gone = false;
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        if router_gone {
            // Keep draining so sessions are not stuck on a full queue.
            batch.clear();
            continue;
        }
        if dead.swap(false, Ordering::AcqRel) {
            // The router dropped the link; it never should (we only send
            // valid QoS 0/1 publishes), but devices must not go unheard.
            match open(&router_tx).await {
                Ok((tx, rx)) => {
                    tracing::error!("router ingress link was closed; reopened it");
                    link = tx;
                    tokio::spawn(drain(rx, dead.clone(), stop.subscribe()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the router ingress link; device publishes are dropped");
                    dead.store(true, Ordering::Release);
                    batch.clear();
                    continue;
                }
            }
        }
        let mut tap = None;
        let mut tapped = Vec::new();
        for packet in batch.drain(..) {
            if let Some((tx, delivery)) = routing.tapped(&packet) {
                tap = Some(tx);
                tapped.push(delivery);
            }
            let router = routing.route(&packet, &mut sinks);
            direct(&packet, &sinks, &mut woken);
            if !router {
                continue;
            }
            if let Err(needed) = backlog.try_take(&packet) {
                // The controller is behind: hand the router what already has
                // credit (so it can be read and credit comes back), then wait.
                router_gone |= !send(&mut link, &mut ready);
                wake(&mut woken);
                backlog.wait(needed).await;
            }
            ready.push(packet);
        }
        router_gone |= !send(&mut link, &mut ready);
        wake(&mut woken);
        if let Some(tap) = tap {
            // A full tap means the controller is behind: every device waits
            // (in TCP) for it, as with the backlog's credit; nothing is dropped.
            let _ = tap.send(std::mem::take(&mut tapped)).await;
        }
    }
    // The drain tasks stop first: the router closing the link after this
    // DISCONNECT is the expected end, not an error to log.
    drop(stop);
    if !router_gone {
        let _ = poll_once(link.send(crate::mqtt::outbound::disconnect_packet()));
    }
}

/// Queues `packet` (a publish) on each of `sinks`, to be woken later.
fn direct(packet: &Packet, sinks: &Sinks, woken: &mut Vec<Arc<Sink>>) {
    let Packet::Publish(publish, _) = packet else {
        return;
    };
    for (sink, qos) in sinks {
        let delivery = Message {
            topic: publish.topic.clone(),
            payload: publish.payload.clone(),
            qos: *qos,
            retain: false,
        };
        if sink.push(delivery) && !woken.iter().any(|w| Arc::ptr_eq(w, sink)) {
            woken.push(sink.clone());
        }
    }
}

/// One wake-up per session for what the batch queued for it.
fn wake(woken: &mut Vec<Arc<Sink>>) {
    for sink in woken.drain(..) {
        sink.wake();
    }
}

/// Moves `packets` into the link and wakes the router once; false when the
/// router is gone.
fn send(link: &mut LinkTx, packets: &mut Vec<Packet>) -> bool {
    let Some(last) = packets.pop() else {
        return true;
    };
    link.buffer().extend(packets.drain(..));
    // `send` queues the last packet and notifies the router, blocking
    // while the router's channel is full; it never awaits anything.
    match poll_once(link.send(last)) {
        Some(Ok(_)) => true,
        Some(Err(e)) => {
            tracing::error!(error = %e, "router is gone; device publishes are dropped");
            false
        }
        None => {
            tracing::error!("router link send did not complete");
            true
        }
    }
}

/// Reads the link's notifications (PUBACKs for QoS 1 publishes) so the
/// router never stalls on it.
async fn drain(mut rx: LinkRx, dead: Arc<AtomicBool>, mut stop: watch::Receiver<()>) {
    loop {
        let note = tokio::select! {
            // A stop and the link closing can be ready together at shutdown.
            biased;
            _ = stop.changed() => return,
            note = rx.next() => note,
        };
        match note {
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "router ingress link closed");
                break;
            }
        }
    }
    dead.store(true, Ordering::Release);
}

/// Polls a future that completes without waiting (`LinkTx::send`).
fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}
