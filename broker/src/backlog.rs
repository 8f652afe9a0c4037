//! Flow control between devices and the in-process controller.
//!
//! rumqttd keeps each subscription filter's messages in a log of bounded
//! segments; when a log is full it drops its oldest segment even if a reader
//! has not read it yet. A controller that falls behind a burst (100,000
//! devices reporting after a restart) would silently lose reports the broker
//! had already acknowledged. So device publishes the controller consumes take
//! credit (their size) before they enter the router, and the controller gives
//! it back as it reads them: the unread backlog stays far below a log's
//! capacity, and a burst slows the devices down (TCP backpressure) instead of
//! losing their messages.

use std::sync::{Arc, OnceLock};

use rumqttd::protocol::Packet;
use tokio::sync::{Semaphore, TryAcquireError};

/// Bytes of device messages that may wait unread in the router: half of the
/// smallest log the controller reads (4 × 4 MiB, see `router_config`).
pub const BUDGET_BYTES: u32 = 8 * 1024 * 1024;

/// Shared by the ingress (takes credit) and the consumer (gives it back).
#[derive(Default)]
pub(crate) struct Backlog {
    limited: OnceLock<Limited>,
}

struct Limited {
    credit: Arc<Semaphore>,
    leaves: Vec<&'static str>,
}

impl Backlog {
    /// Starts limiting publishes on `devices/+/<leaf>` for `leaves`; `None`
    /// when a consumer already did.
    pub(crate) fn limit(&self, leaves: &[&'static str]) -> Option<Credit> {
        let credit = Arc::new(Semaphore::new(BUDGET_BYTES as usize));
        self.limited
            .set(Limited {
                credit: credit.clone(),
                leaves: leaves.to_vec(),
            })
            .ok()
            .map(|()| Credit(credit))
    }

    /// What `packet` costs, if it is limited.
    fn cost(&self, packet: &Packet) -> Option<(&Semaphore, u32)> {
        let limited = self.limited.get()?;
        let Packet::Publish(publish, _) = packet else {
            return None;
        };
        let topic = std::str::from_utf8(&publish.topic).ok()?;
        let (_, leaf) = cityplane_proto::topics::split_device_topic(topic)?;
        limited
            .leaves
            .contains(&leaf)
            .then(|| (&*limited.credit, cost(&publish.topic, &publish.payload)))
    }

    /// Takes the credit `packet` needs. `Ok` when it was there (or the packet
    /// is not limited, or the consumer is gone); `Err` with the amount when
    /// the caller must first let the router drain and then [`Self::wait`].
    pub(crate) fn try_take(&self, packet: &Packet) -> Result<(), u32> {
        let Some((credit, n)) = self.cost(packet) else {
            return Ok(());
        };
        match credit.try_acquire_many(n) {
            Ok(permit) => {
                permit.forget();
                Ok(())
            }
            Err(TryAcquireError::Closed) => Ok(()),
            Err(TryAcquireError::NoPermits) => Err(n),
        }
    }

    /// Waits for `n` bytes of credit (returns at once once the consumer is gone).
    pub(crate) async fn wait(&self, n: u32) {
        if let Some(limited) = self.limited.get() {
            if let Ok(permit) = limited.credit.acquire_many(n).await {
                permit.forget();
            }
        }
    }
}

/// The credit of one message, the same on both sides.
pub fn cost(topic: &[u8], payload: &[u8]) -> u32 {
    u32::try_from(topic.len() + payload.len())
        .unwrap_or(u32::MAX)
        .clamp(1, BUDGET_BYTES)
}

/// The consumer's side: give credit back for every limited message read
/// from the router. Dropping it lifts the limit (nobody would give back).
pub struct Credit(Arc<Semaphore>);

impl Credit {
    pub fn consumed(&self, topic: &[u8], payload: &[u8]) {
        self.0.add_permits(cost(topic, payload) as usize);
        // Messages that took no credit (retained ones, publishes from
        // in-process links or controller clients) must not raise the limit.
        let excess = self
            .0
            .available_permits()
            .saturating_sub(BUDGET_BYTES as usize);
        if excess > 0 {
            self.0.forget_permits(excess);
        }
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        self.0.close();
    }
}
