//! Commands to devices, delivered by the edge.
//!
//! rumqttd's router matches every never-seen topic against every filter and
//! caches only matches, so one `devices/<id>/commands` filter per device
//! makes the first command to each of 10,000 devices cost ~12 s of router
//! CPU. Instead, a device's SUBSCRIBE to its own commands topic is answered
//! by the edge, one internal link subscribes to `devices/+/commands`, and
//! each command is handed to the device's connection task. The router keeps
//! a handful of filters whatever the fleet size.
//!
//! Commands are not queued for offline devices and not retained: the
//! controller re-sends (level-triggered) when the device is back.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use cityplane_proto::topics;
use rumqttd::local::LinkRx;
use rumqttd::Notification;
use tokio::sync::mpsc;

/// Commands a slow device may have queued before new ones are dropped
/// (the controller retries; a device this far behind is not keeping up).
pub(crate) const QUEUE: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct Dispatch {
    routes: Mutex<HashMap<String, mpsc::Sender<Bytes>>>,
}

impl Dispatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Bytes>>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, device: &str, tx: mpsc::Sender<Bytes>) {
        self.lock().insert(device.to_owned(), tx);
    }

    /// Removes the route only if it is still this session's (a newer
    /// session of the same device may have replaced it).
    pub(crate) fn unregister(&self, device: &str, tx: &mpsc::Sender<Bytes>) {
        let mut routes = self.lock();
        if routes.get(device).is_some_and(|t| t.same_channel(tx)) {
            routes.remove(device);
        }
    }

    fn deliver(&self, device: &str, payload: Bytes) {
        let Some(tx) = self.lock().get(device).cloned() else {
            tracing::debug!(
                device,
                "command for a device that is not subscribed; dropped"
            );
            return;
        };
        if tx.try_send(payload).is_err() {
            tracing::warn!(
                device,
                "device is not keeping up with its commands; command dropped"
            );
        }
    }
}

/// Reads `devices/+/commands` from the router and hands each command over.
pub(crate) async fn run(
    dispatch: std::sync::Arc<Dispatch>,
    mut rx: LinkRx,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let next = tokio::select! {
            next = rx.next() => next,
            _ = shutdown.changed() => return,
        };
        match next {
            Ok(Some(Notification::Forward(forward))) => {
                let topic = String::from_utf8_lossy(&forward.publish.topic);
                if let Some((device, topics::DEVICE_SUBSCRIBE_LEAF)) =
                    topics::split_device_topic(&topic)
                {
                    dispatch.deliver(device, forward.publish.payload);
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "command dispatch link closed");
                return;
            }
        }
    }
}

/// Unregisters a session's route when the session ends.
pub(crate) struct Route {
    pub(crate) dispatch: std::sync::Arc<Dispatch>,
    pub(crate) device: String,
    pub(crate) tx: mpsc::Sender<Bytes>,
}

impl Drop for Route {
    fn drop(&mut self) {
        self.dispatch.unregister(&self.device, &self.tx);
    }
}
