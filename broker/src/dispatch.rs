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

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use cityplane_proto::topics;
use rumqttd::local::LinkRx;
use rumqttd::Notification;
use tokio::sync::Notify;

/// The router link that receives every command (see the module docs).
pub(crate) const LINK_ID: &str = "_cityplane-dispatch";

/// Commands a slow device may have queued before new ones are dropped
/// (the controller retries; a device this far behind is not keeping up).
pub(crate) const QUEUE: usize = 64;

/// A device session's queue of commands. Not a tokio mpsc channel: one of
/// those preallocates a block of 32 slots and cache-padded state, ~1.5 KiB
/// per connection whether or not a command ever comes; this holds nothing
/// while empty.
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    queue: Mutex<VecDeque<Bytes>>,
    ready: Notify,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Bytes>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a command; false if the queue is full.
    fn push(&self, command: Bytes) -> bool {
        {
            let mut queue = self.lock();
            if queue.len() >= QUEUE {
                return false;
            }
            queue.push_back(command);
        }
        // notify_one keeps a permit if the session is not waiting right now.
        self.ready.notify_one();
        true
    }

    /// The next command, waiting for one.
    pub(crate) async fn next(&self) -> Bytes {
        loop {
            {
                let mut queue = self.lock();
                if let Some(command) = queue.pop_front() {
                    if queue.is_empty() && queue.capacity() > 4 {
                        *queue = VecDeque::new();
                    }
                    return command;
                }
            }
            self.ready.notified().await;
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Dispatch {
    routes: Mutex<HashMap<String, Arc<Inbox>>>,
}

impl Dispatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Inbox>>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn register(&self, device: &str, inbox: Arc<Inbox>) {
        self.lock().insert(device.to_owned(), inbox);
    }

    /// Removes the route only if it is still this session's (a newer
    /// session of the same device may have replaced it).
    pub(crate) fn unregister(&self, device: &str, inbox: &Arc<Inbox>) {
        let mut routes = self.lock();
        if routes.get(device).is_some_and(|i| Arc::ptr_eq(i, inbox)) {
            routes.remove(device);
        }
    }

    pub(crate) fn deliver(&self, device: &str, payload: Bytes) {
        let Some(inbox) = self.lock().get(device).cloned() else {
            tracing::debug!(
                device,
                "command for a device that is not subscribed; dropped"
            );
            return;
        };
        if !inbox.push(payload) {
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
    pub(crate) inbox: Arc<Inbox>,
}

impl Drop for Route {
    fn drop(&mut self) {
        self.dispatch.unregister(&self.device, &self.inbox);
    }
}
