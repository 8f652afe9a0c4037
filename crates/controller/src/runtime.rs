//! The controller's event loop: one task owns the fleet, so no two
//! reconciles of a device ever run at once. Events are taken in batches; each
//! batch ends with one durable commit (group commit), and only then are
//! responses and commands published.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cityplane_broker::{OperatorMessage, RunningBroker};
use cityplane_proto::messages::Selector;
use cityplane_proto::topics;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::delta::selects;
use crate::fleet::{self, Fleet, Outgoing};
use crate::input::{self, InputLimits, Rejection};
use crate::reconcile::RetryPolicy;
use crate::store::{Changes, Store, StoreError};

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// sled database directory.
    pub data: PathBuf,
    /// When set, reports from ids without a certificate here are refused.
    pub pki: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub input: InputLimits,
    /// sled page cache; RSS is roughly 1.5–2× this plus ~40 B per record.
    pub cache_bytes: u64,
    /// How often the fleet summary is republished on `fleet/status`.
    pub status_every: Duration,
    /// Events taken per loop turn (one commit each).
    pub max_batch: usize,
}

impl ControllerConfig {
    pub fn new(data: PathBuf) -> Self {
        ControllerConfig {
            data,
            pki: None,
            retry: RetryPolicy::default(),
            input: InputLimits::default(),
            cache_bytes: 64 * 1024 * 1024,
            status_every: Duration::from_secs(1),
            max_batch: 2048,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(String),
}

enum Event {
    Device {
        id: String,
        leaf: String,
        payload: bytes::Bytes,
    },
    Operator(OperatorMessage),
}

pub struct Controller {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ControllerError>>,
}

impl Controller {
    /// Starts the controller inside the broker's process, wired to the
    /// router by an in-process link and to operators through the tap.
    pub async fn start_in_process(
        broker: &RunningBroker,
        config: ControllerConfig,
    ) -> Result<Controller, ControllerError> {
        let data = config.data.clone();
        let cache = config.cache_bytes;
        let store = tokio::task::spawn_blocking(move || Store::open(&data, cache))
            .await
            .map_err(|e| ControllerError::Broker(e.to_string()))??;
        let store = Arc::new(store);
        let loaded = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.load())
                .await
                .map_err(|e| ControllerError::Broker(e.to_string()))??
        };
        let known: Box<dyn FnMut(&str) -> bool + Send> = match config.pki.clone() {
            Some(dir) => {
                // A stat per report would cost more than the report; ids
                // with a certificate are remembered (revocation is the
                // broker's job: a revoked device cannot publish anyway).
                let mut known = std::collections::HashSet::new();
                Box::new(move |id: &str| {
                    if known.contains(id) {
                        return true;
                    }
                    let exists = dir.join(format!("{id}.crt")).exists();
                    if exists {
                        known.insert(id.to_owned());
                    }
                    exists
                })
            }
            None => Box::new(|_: &str| true),
        };
        tracing::info!(
            devices = loaded.devices.len(),
            documents = loaded.docs.len(),
            data = %config.data.display(),
            "controller state loaded"
        );
        let fleet = Fleet::new(
            loaded.docs,
            loaded.devices,
            loaded.seq,
            loaded.audit_len as u64,
            config.retry.clone(),
            config.input,
            known,
        );

        let (mut tx, rx) = broker
            .link("cityplane-controller")
            .await
            .map_err(|e| ControllerError::Broker(e.to_string()))?;
        for leaf in ["reported", "acks", "presence"] {
            tx.subscribe(format!("{}/+/{leaf}", topics::DEVICES))
                .map_err(|e| ControllerError::Broker(e.to_string()))?;
        }
        let tap = broker
            .tap_operator_messages()
            .ok_or_else(|| ControllerError::Broker("operator tap already taken".into()))?;
        let (events_tx, events) = mpsc::channel(8192);
        tokio::spawn(read_link(rx, events_tx.clone()));
        tokio::spawn(read_tap(tap, events_tx));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(fleet, store, tx, events, config, shutdown_rx));
        // Subscribed and tapped: now devices may connect.
        broker.open();
        Ok(Controller { shutdown, task })
    }

    /// Stops after the current batch is committed.
    pub async fn shutdown(self) -> Result<(), ControllerError> {
        let _ = self.shutdown.send(true);
        self.task
            .await
            .map_err(|e| ControllerError::Broker(e.to_string()))?
    }
}

async fn read_link(mut rx: LinkRx, events: mpsc::Sender<Event>) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Forward(forward))) => {
                let topic = String::from_utf8_lossy(&forward.publish.topic).into_owned();
                let Some((id, leaf)) = topics::split_device_topic(&topic) else {
                    continue;
                };
                let event = Event::Device {
                    id: id.to_owned(),
                    leaf: leaf.to_owned(),
                    payload: forward.publish.payload,
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "controller link to the router closed");
                return;
            }
        }
    }
}

async fn read_tap(mut tap: mpsc::Receiver<OperatorMessage>, events: mpsc::Sender<Event>) {
    while let Some(message) = tap.recv().await {
        if events.send(Event::Operator(message)).await.is_err() {
            return;
        }
    }
}

struct Publisher {
    tx: LinkTx,
    pkid: u16,
}

impl Publisher {
    async fn publish(&mut self, out: Outgoing) {
        self.pkid = self.pkid.checked_add(1).unwrap_or(1);
        // Commands and responses go out as QoS 1 so the router delivers them at QoS 1.
        let Some(packet) =
            cityplane_broker::link_publish(&out.topic, &out.payload, true, out.retain, self.pkid)
        else {
            tracing::error!(topic = %out.topic, "could not encode publish");
            return;
        };
        if let Err(e) = self.tx.send(packet).await {
            tracing::error!(error = %e, topic = %out.topic, "router refused publish");
        }
    }
}

async fn run(
    mut fleet: Fleet,
    store: Arc<Store>,
    tx: LinkTx,
    mut events: mpsc::Receiver<Event>,
    config: ControllerConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ControllerError> {
    let mut publisher = Publisher { tx, pkid: 0 };
    let mut status_tick = tokio::time::interval(config.status_every);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_summary = None;
    // Device records waiting for a successful commit (e.g. while the disk is full).
    let mut pending: Vec<crate::model::DeviceRecord> = Vec::new();
    // Everything already in the store may have work to do.
    let ids: Vec<String> = fleet.devices.keys().cloned().collect();
    for id in &ids {
        fleet.on_device_message_touch(id);
    }
    loop {
        let mut batch = Vec::new();
        let sleep = fleet
            .next_timer()
            .map(|at| Duration::from_millis(at.saturating_sub(fleet::now())))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            got = events.recv() => match got {
                Some(ev) => batch.push(ev),
                None => return Ok(()),
            },
            _ = tokio::time::sleep(sleep) => {}
            _ = status_tick.tick() => {
                let summary = fleet.summary();
                if last_summary.as_ref() != Some(&summary) {
                    let body = json!({
                        "total": summary.total, "online": summary.online, "converged": summary.converged,
                        "pending": summary.pending, "failed": summary.failed, "drifted": summary.drifted,
                        "at": crate::model::rfc3339(fleet::now()),
                    });
                    publisher.publish(Outgoing {
                        topic: topics::FLEET_STATUS.to_owned(),
                        payload: serde_json::to_vec(&body).unwrap_or_default(),
                        retain: true,
                    }).await;
                    last_summary = Some(summary);
                }
                continue;
            }
            _ = shutdown.changed() => return Ok(()),
        }
        while batch.len() < config.max_batch {
            match events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }

        let now = fleet::now();
        let mut after_commit: Vec<Outgoing> = Vec::new();
        for event in batch {
            match event {
                Event::Device { id, leaf, payload } => {
                    fleet.on_device_message(&id, &leaf, &payload, now)
                }
                Event::Operator(msg) => {
                    let out = handle_operator(&mut fleet, &store, msg, now).await;
                    after_commit.extend(out);
                }
            }
        }
        let commands = fleet.reconcile_due(now);
        pending.extend(fleet.take_dirty());
        if !pending.is_empty() {
            let changes = Changes {
                devices: std::mem::take(&mut pending),
                seq: Some(fleet.seq),
                ..Default::default()
            };
            let (changes, result) = commit(&store, changes).await;
            if let Err(e) = result {
                tracing::error!(error = %e, disk_full = e.is_disk_full(), "commit failed; holding changes and commands until storage works again");
                pending = changes.devices;
                // Commands are not sent before their record is durable; the
                // timers re-send them once a commit succeeds.
                for out in after_commit {
                    publisher.publish(out).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        for out in after_commit.into_iter().chain(commands) {
            publisher.publish(out).await;
        }
    }
}

async fn commit(store: &Arc<Store>, changes: Changes) -> (Changes, Result<(), StoreError>) {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || {
        let result = store.commit(&changes);
        (changes, result)
    })
    .await
    {
        Ok(pair) => pair,
        Err(e) => (
            Changes::default(),
            Err(StoreError::Transaction(format!("commit task failed: {e}"))),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    /// Accepted so `deny_unknown_fields` lets it through; read leniently elsewhere.
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    offset: Option<usize>,
}

/// Operator writes commit immediately (they are rare and must be durable
/// before they are answered); queries are answered from memory.
async fn handle_operator(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    msg: OperatorMessage,
    now: u64,
) -> Vec<Outgoing> {
    let who = msg.from.id.clone();
    if let Some(rest) = msg.topic.strip_prefix("fleet/desired/") {
        let name = rest.to_owned();
        let (response, result) = fleet.on_desired(&who, &msg.topic, &msg.payload, now);
        match result {
            Ok(doc) => {
                let audit = fleet.audit_entry(
                    &who,
                    "apply",
                    &doc.name,
                    &format!("accepted generation {}", doc.generation),
                    now,
                );
                let changes = fleet.doc_changes(&doc, audit);
                let (_, result) = commit(store, changes).await;
                match result {
                    Ok(()) => {
                        let changed = fleet.apply_doc(doc.clone());
                        tracing::info!(operator = %who, name = %doc.name, generation = doc.generation, devices_changed = changed, "desired state accepted");
                        vec![response]
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not store desired state");
                        let rid = fleet::request_id_of(&msg.payload).unwrap_or(name);
                        vec![fleet::response_to(
                            &who,
                            &rid,
                            &json!({
                                "request_id": rid, "status": "rejected", "code": "storage_unavailable",
                                "reason": format!("the controller could not store the write: {e}"),
                            }),
                        )]
                    }
                }
            }
            Err(r) => {
                let audit = fleet.audit_entry(
                    &who,
                    "apply",
                    &name,
                    &format!("rejected ({}): {}", r.code, r.reason),
                    now,
                );
                let changes = Changes {
                    audit: vec![audit],
                    ..Default::default()
                };
                if let (_, Err(e)) = commit(store, changes).await {
                    tracing::error!(error = %e, "could not append to the audit log");
                }
                vec![response]
            }
        }
    } else if let Some(verb) = msg.topic.strip_prefix("fleet/ops/") {
        let verb = verb.to_owned();
        let query = input::parse::<Query>(&msg.payload, fleet.limits);
        let rid = fleet::request_id_of(&msg.payload).unwrap_or_else(|| verb.clone());
        let body = match query.and_then(|q| answer(fleet, store, &verb, q)) {
            Ok(result) => json!({"request_id": rid, "status": "ok", "result": result}),
            Err(r) => {
                tracing::warn!(operator = %who, verb, %r, "query refused");
                json!({"request_id": rid, "status": "rejected", "code": r.code, "reason": r.reason})
            }
        };
        vec![fleet::response_to(&who, &rid, &body)]
    } else {
        Vec::new()
    }
}

fn answer(fleet: &Fleet, store: &Arc<Store>, verb: &str, q: Query) -> Result<Value, Rejection> {
    match verb {
        "status" => {
            let summary = match &q.name {
                Some(name) => {
                    let doc = fleet.docs.get(name).ok_or_else(|| {
                        Rejection::new("not_found", format!("no desired document named {name:?}"))
                    })?;
                    let mut s = Fleet::summary_of(fleet.targeted(&doc.target).into_iter());
                    // Converged for a document means: at or past the
                    // generation that document produced.
                    s.converged = fleet
                        .targeted(&doc.target)
                        .iter()
                        .filter(|d| d.is_converged() && d.desired_generation >= doc.seq)
                        .count();
                    s.pending = s.total - s.converged - s.failed;
                    s
                }
                None => fleet.summary(),
            };
            Ok(json!({
                "total": summary.total, "online": summary.online, "converged": summary.converged,
                "pending": summary.pending, "failed": summary.failed, "drifted": summary.drifted,
                "counters": fleet.counters,
            }))
        }
        "get-devices" => {
            let mut rows: Vec<&crate::model::DeviceRecord> = fleet
                .devices
                .values()
                .filter(|d| {
                    q.selector.as_ref().is_none_or(|s| {
                        selects(
                            &cityplane_proto::messages::Target::Selector(s.clone()),
                            &d.id,
                            d.class.as_deref(),
                            &d.labels,
                        )
                    })
                })
                .collect();
            rows.sort_by(|a, b| a.id.cmp(&b.id));
            let total = rows.len();
            let offset = q.offset.unwrap_or(0);
            let limit = q.limit.unwrap_or(500).min(2000);
            let page: Vec<Value> = rows
                .into_iter()
                .skip(offset)
                .take(limit)
                .map(fleet::device_row)
                .collect();
            Ok(json!({"total": total, "offset": offset, "devices": page}))
        }
        "describe" => {
            let id =
                q.id.ok_or_else(|| Rejection::new("bad_schema", "describe needs \"id\""))?;
            let dev = fleet.devices.get(&id).ok_or_else(|| {
                Rejection::new("not_found", format!("no device {id:?} has reported yet"))
            })?;
            Ok(fleet::describe(dev))
        }
        "audit" => {
            let entries = store
                .audit_tail(q.limit.unwrap_or(50).min(1000))
                .map_err(|e| Rejection::new("storage_unavailable", e.to_string()))?;
            Ok(json!({"entries": entries}))
        }
        other => Err(Rejection::new(
            "unknown_verb",
            format!("unknown operation {other:?}; expected status, get-devices, describe or audit"),
        )),
    }
}
