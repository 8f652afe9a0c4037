//! What feeds the loop and carries its output: the router link, the
//! operator tap, the PKI's issuance record.

use super::*;

/// Device messages → events, straight from the broker's edge. A full
/// events queue stops this task, which fills the tap's queue, which makes
/// every device wait (TCP backpressure): nothing acknowledged is dropped.
pub(super) async fn read_devices(mut tap: DeviceTap, events: mpsc::Sender<Event>) {
    while let Some(batch) = tap.recv_batch().await {
        for delivery in batch {
            let topic = String::from_utf8_lossy(&delivery.topic);
            let Some((id, leaf)) = topics::split_device_topic(&topic) else {
                continue;
            };
            let event = Event::Device {
                id: id.to_owned(),
                leaf: leaf.to_owned(),
                payload: delivery.payload,
                ack: None,
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// How often the registry source is checked for changes (a stat).
const ISSUED_POLL: Duration = Duration::from_secs(1);

pub(super) async fn read_issued(dir: &std::path::Path) -> Option<Vec<IssuedDevice>> {
    let dir = dir.to_path_buf();
    let read = tokio::task::spawn_blocking(move || cityplane_certs::registry::issued_devices(&dir));
    match read.await {
        Ok(Ok(devices)) => Some(devices),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not read the PKI's issuance record; the registry keeps what it has");
            None
        }
        Err(_) => None,
    }
}

/// Size and modification time of the files the import reads: `issued.jsonl`
/// is appended to and `revoked.json` replaced, so either changes them.
fn issued_stamp(dir: &std::path::Path) -> Vec<Option<(u64, std::time::SystemTime)>> {
    [
        cityplane_certs::ISSUED_FILE,
        cityplane_certs::REVOCATION_FILE,
    ]
    .iter()
    .map(|f| {
        std::fs::metadata(dir.join(f))
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
    })
    .collect()
}

/// Re-reads the issuance record whenever it changes.
pub(super) async fn watch_issued(dir: PathBuf, events: mpsc::Sender<Event>) {
    let mut seen = issued_stamp(&dir);
    loop {
        tokio::time::sleep(ISSUED_POLL).await;
        let now = issued_stamp(&dir);
        if now == seen {
            continue;
        }
        seen = now;
        if let Some(devices) = read_issued(&dir).await {
            if events.send(Event::Issued(devices)).await.is_err() {
                return;
            }
        }
    }
}

pub(super) async fn read_tap(
    mut tap: mpsc::Receiver<OperatorMessage>,
    events: mpsc::Sender<Event>,
) {
    while let Some(message) = tap.recv().await {
        if events.send(Event::Operator(message, None)).await.is_err() {
            return;
        }
    }
}

/// Publishes what the loop produces, in order: commands straight to the
/// device's connection (through the router when another subscriber wants
/// them too), the rest on the controller's router link. A command gets the
/// plaintexts of the secrets it refers to here, at the last moment: the
/// loop, the outbox and the store never hold them.
pub(super) async fn publish(
    mut tx: LinkSender,
    commands: Commands,
    mut out: mpsc::Receiver<Outgoing>,
    secrets: Arc<crate::secrets::Secrets>,
) {
    while let Some(mut out) = out.recv().await {
        if let Some(device) = secrets.fill_if_command(&out.topic, &mut out.payload) {
            // Through the router it reaches the device too (the broker's
            // dispatch link), so one path or the other, never both.
            if !out.retain && !commands.routed(&out.topic) {
                commands.deliver(device, out.payload.into());
                continue;
            }
        }
        if let Err(e) = tx.publish(&out.topic, &out.payload, out.retain).await {
            tracing::error!(error = %e, topic = %out.topic, "router refused publish");
        }
    }
}
