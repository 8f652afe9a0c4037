//! The typed in-process link the controller reads devices through and
//! publishes on: deliveries in, publishes out, and none of rumqttd's types
//! across the API (the controller does not depend on rumqttd).

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;

use crate::BrokerError;

/// A message the router delivered on one of the link's subscriptions.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
}

/// The receiving half of [`crate::RunningBroker::open_link`].
pub struct LinkReceiver {
    rx: LinkRx,
}

impl LinkReceiver {
    /// The next delivery; an error once the router closed the link.
    pub async fn recv(&mut self) -> Result<Delivery, BrokerError> {
        loop {
            match self.rx.next().await {
                Ok(Some(Notification::Forward(forward))) => {
                    return Ok(Delivery {
                        topic: forward.publish.topic,
                        payload: forward.publish.payload,
                    })
                }
                // The router paused the link (its buffer was full): ask for more.
                Ok(Some(Notification::Unschedule)) => self
                    .rx
                    .wake()
                    .await
                    .map_err(|e| BrokerError::Link(e.to_string()))?,
                Ok(_) => {}
                Err(e) => return Err(BrokerError::Link(e.to_string())),
            }
        }
    }
}

/// The sending half of [`crate::RunningBroker::open_link`].
pub struct LinkSender {
    tx: LinkTx,
    pkid: u16,
}

impl LinkSender {
    /// Publishes at QoS 1, so the router delivers at QoS 1 (commands and
    /// answers must not be lost on the way to a connected client).
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        retain: bool,
    ) -> Result<(), BrokerError> {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        let packet = crate::mqtt::outbound::link_publish(topic, payload, true, retain, self.pkid)
            .ok_or_else(|| {
            BrokerError::Link(format!("cannot encode a publish to {topic:?}"))
        })?;
        self.tx
            .send(packet)
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::Link(e.to_string()))
    }
}

pub(crate) fn typed(
    mut tx: LinkTx,
    rx: LinkRx,
    filters: &[String],
) -> Result<(LinkSender, LinkReceiver), BrokerError> {
    for filter in filters {
        tx.subscribe(filter.as_str())
            .map_err(|e| BrokerError::Link(e.to_string()))?;
    }
    Ok((LinkSender { tx, pkid: 0 }, LinkReceiver { rx }))
}

/// The receiving half of [`crate::RunningBroker::tap_device_messages`].
pub struct DeviceTap {
    rx: tokio::sync::mpsc::Receiver<Vec<Delivery>>,
    ready: std::collections::VecDeque<Delivery>,
}

impl DeviceTap {
    pub(crate) fn new(rx: tokio::sync::mpsc::Receiver<Vec<Delivery>>) -> Self {
        DeviceTap {
            rx,
            ready: Default::default(),
        }
    }

    /// The next device message; `None` once the broker stopped.
    pub async fn recv(&mut self) -> Option<Delivery> {
        while self.ready.is_empty() {
            self.ready.extend(self.rx.recv().await?);
        }
        self.ready.pop_front()
    }

    /// The messages that arrived together (at least one, in order); `None`
    /// once the broker stopped.
    pub async fn recv_batch(&mut self) -> Option<Vec<Delivery>> {
        if !self.ready.is_empty() {
            return Some(self.ready.drain(..).collect());
        }
        self.rx.recv().await
    }
}

/// Commands to devices from in-process code ([`crate::RunningBroker::commands`]).
#[derive(Clone)]
pub struct Commands {
    dispatch: std::sync::Arc<crate::dispatch::Dispatch>,
    routing: std::sync::Arc<crate::ingress::Routing>,
}

impl Commands {
    pub(crate) fn new(
        dispatch: std::sync::Arc<crate::dispatch::Dispatch>,
        routing: std::sync::Arc<crate::ingress::Routing>,
    ) -> Self {
        Commands { dispatch, routing }
    }

    /// Queues `payload` on `device`'s connection (dropped, as through the
    /// router, when the device is not connected or not keeping up: the
    /// controller re-sends).
    pub fn deliver(&self, device: &str, payload: Bytes) {
        self.dispatch.deliver(device, payload);
    }

    /// Whether a subscriber other than the device may want `topic`, so the
    /// router must get a copy too.
    pub fn routed(&self, topic: &str) -> bool {
        self.routing.interest.wanted(topic)
    }
}
