//! The controller's event loop: one task owns the fleet, so no two
//! reconciles of a device ever run at once. Events are taken in batches; each
//! batch ends with one durable commit (group commit), and only then are
//! responses and commands published.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cityplane_broker::backlog::Credit;
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
use crate::model::{now_ms, Millis};
use crate::reconcile::RetryPolicy;
use crate::store::{Changes, CommitGate, Store, StoreError};

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// sled database directory.
    pub data: PathBuf,
    /// When set, reports from ids without a certificate here are refused.
    pub pki: Option<PathBuf>,
    pub retry: RetryPolicy,
    pub input: InputLimits,
    /// sled's page cache. It does not bound memory: at 100,000 devices
    /// the process holds ~9 KiB per device with 8 MiB or 256 MiB alike
    /// (~3.5 KiB of it the in-memory fleet); a larger cache is faster there.
    pub cache_bytes: u64,
    /// How often the fleet summary is republished on `fleet/status`.
    pub status_every: Duration,
    /// Events taken per loop turn (one commit each).
    pub max_batch: usize,
    /// Tests only: holds or fails commits (see [`CommitGate`]).
    pub commit_gate: Option<CommitGate>,
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
            commit_gate: None,
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
        let gate = config.commit_gate.clone();
        let store = tokio::task::spawn_blocking(move || {
            Store::open(&data, cache).map(|s| s.with_gate(gate))
        })
        .await
        .map_err(|e| ControllerError::Broker(e.to_string()))??;
        let store = Arc::new(store);
        let loaded = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.load())
                .await
                .map_err(|e| ControllerError::Broker(e.to_string()))??
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
            loaded.audit_last,
            config.retry.clone(),
            config.input,
            format!("{:x}", now_ms()),
        );

        let (mut tx, rx) = broker
            .link(cityplane_broker::CONTROLLER_LINK_ID)
            .await
            .map_err(|e| ControllerError::Broker(e.to_string()))?;
        const LEAVES: [&str; 3] = ["reported", "acks", "presence"];
        for leaf in LEAVES {
            tx.subscribe(format!("{}/+/{leaf}", topics::DEVICES))
                .map_err(|e| ControllerError::Broker(e.to_string()))?;
        }
        let credit = broker
            .limit_device_backlog(&LEAVES)
            .ok_or_else(|| ControllerError::Broker("device backlog already limited".into()))?;
        let tap = broker
            .tap_operator_messages()
            .ok_or_else(|| ControllerError::Broker("operator tap already taken".into()))?;
        let (events_tx, events) = mpsc::channel(8192);
        tokio::spawn(read_link(rx, events_tx.clone(), credit));
        tokio::spawn(read_tap(tap, events_tx));
        let (out_tx, out_rx) = mpsc::channel(8192);
        tokio::spawn(publish_to_router(tx, out_rx));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            fleet,
            store,
            events,
            out_tx,
            config,
            shutdown_rx,
            Clock::new(),
        ));
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

/// Router → events. Credit for each device message goes back to the broker
/// as it is read here, so the router holds only a bounded unread backlog;
/// beyond that, the events queue and then the devices wait.
async fn read_link(mut rx: LinkRx, events: mpsc::Sender<Event>, credit: Credit) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Forward(forward))) => {
                credit.consumed(&forward.publish.topic, &forward.publish.payload);
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

/// Publishes what the loop produces, in order, on the controller's router link.
async fn publish_to_router(mut tx: LinkTx, mut out: mpsc::Receiver<Outgoing>) {
    let mut pkid: u16 = 0;
    while let Some(out) = out.recv().await {
        pkid = pkid.checked_add(1).unwrap_or(1);
        // Commands and responses go out as QoS 1 so the router delivers them at QoS 1.
        let Some(packet) =
            cityplane_broker::link_publish(&out.topic, &out.payload, true, out.retain, pkid)
        else {
            tracing::error!(topic = %out.topic, "could not encode publish");
            continue;
        };
        if let Err(e) = tx.send(packet).await {
            tracing::error!(error = %e, topic = %out.topic, "router refused publish");
        }
    }
}

/// The loop's time: wall-clock milliseconds (records outlive the process)
/// advanced by tokio's monotonic clock, so timers follow tokio time (and a
/// paused clock in tests) and never jump with the system clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall_at_start: Millis,
    start: tokio::time::Instant,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            wall_at_start: now_ms(),
            start: tokio::time::Instant::now(),
        }
    }

    pub(crate) fn now(&self) -> Millis {
        self.wall_at_start + self.start.elapsed().as_millis() as Millis
    }

    fn instant_at(&self, at: Millis) -> tokio::time::Instant {
        self.start + Duration::from_millis(at.saturating_sub(self.wall_at_start))
    }
}

/// What waits for a commit before it may be published.
#[derive(Default)]
struct Held {
    /// Answers to operators (queries are answered from memory, so only
    /// once the state they describe is durable).
    responses: Vec<Outgoing>,
    /// Commands: only after the record of the command (the outbox) is durable.
    commands: Vec<Outgoing>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.responses.is_empty() && self.commands.is_empty()
    }
}

struct CommitInFlight {
    /// The ids of the device records written, and the outcome.
    task: JoinHandle<(Vec<String>, Result<(), StoreError>)>,
    held: Held,
}

/// Pause before writing again after a failed commit (e.g. a full disk).
const COMMIT_RETRY: Duration = Duration::from_millis(200);

async fn send_all(out: &mpsc::Sender<Outgoing>, messages: impl IntoIterator<Item = Outgoing>) {
    for message in messages {
        if out.send(message).await.is_err() {
            return;
        }
    }
}

/// Whether a device id has a certificate in the PKI directory (checked only
/// when the controller serves from one that holds the CA; see `serve`). An
/// edge check: the fleet core gets the answer, not the file system.
fn known_devices(pki: Option<std::path::PathBuf>) -> Box<dyn FnMut(&str) -> bool + Send> {
    match pki {
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
    }
}

/// The loop. Commits are pipelined: while one batch's commit is being
/// fsynced, the next events are applied in memory and their records wait
/// for the following commit, so the commit grows with the load (group
/// commit) instead of the loop idling on the disk.
async fn run(
    mut fleet: Fleet,
    store: Arc<Store>,
    mut events: mpsc::Receiver<Event>,
    out: mpsc::Sender<Outgoing>,
    config: ControllerConfig,
    mut shutdown: watch::Receiver<bool>,
    clock: Clock,
) -> Result<(), ControllerError> {
    let mut known_device = known_devices(config.pki.clone());
    let mut status_tick = tokio::time::interval(config.status_every);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_summary = None;
    let mut in_flight: Option<CommitInFlight> = None;
    let mut held = Held::default();
    let mut retry_commit_at: Option<tokio::time::Instant> = None;
    // Everything already in the store may have work to do.
    let ids: Vec<String> = fleet.devices.keys().cloned().collect();
    fleet.reconcile_later(ids);
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let wake = fleet
            .next_timer()
            .map(|at| clock.instant_at(at))
            .into_iter()
            .chain(retry_commit_at)
            .min()
            .unwrap_or(far);
        let mut batch = Vec::new();
        let mut stop = false;
        tokio::select! {
            done = async {
                match in_flight.as_mut() {
                    Some(c) => (&mut c.task).await,
                    None => std::future::pending().await,
                }
            } => {
                let held = in_flight.take().map(|c| c.held).unwrap_or_default();
                let (written, result) = match done {
                    Ok(pair) => pair,
                    Err(e) => (
                        Vec::new(),
                        Err(StoreError::Transaction(format!("commit task failed: {e}"))),
                    ),
                };
                match result {
                    Ok(()) => send_all(&out, held.responses.into_iter().chain(held.commands)).await,
                    Err(e) => {
                        tracing::error!(error = %e, disk_full = e.is_disk_full(), "commit failed; holding changes and commands until storage works again");
                        fleet.mark_dirty(written);
                        // Commands are not sent before their record is durable;
                        // the timers re-send them once a commit succeeds.
                        fleet.commands_not_sent(
                            held.commands
                                .iter()
                                .filter_map(|c| topics::split_device_topic(&c.topic).map(|(id, _)| id)),
                        );
                        send_all(&out, held.responses).await;
                        retry_commit_at = Some(tokio::time::Instant::now() + COMMIT_RETRY);
                    }
                }
            }
            got = events.recv() => match got {
                Some(ev) => batch.push(ev),
                None => stop = true,
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = status_tick.tick() => {
                let summary = fleet.summary();
                if last_summary.as_ref() != Some(&summary) {
                    let body = json!({
                        "total": summary.total, "online": summary.online, "converged": summary.converged,
                        "pending": summary.pending, "failed": summary.failed, "drifted": summary.drifted,
                        "at": crate::model::rfc3339(clock.now()),
                    });
                    send_all(&out, [Outgoing {
                        topic: topics::FLEET_STATUS.to_owned(),
                        payload: serde_json::to_vec(&body).unwrap_or_default(),
                        retain: true,
                    }]).await;
                    last_summary = Some(summary);
                }
            }
            _ = shutdown.changed() => stop = true,
        }
        if stop {
            return finish(fleet, &store, &out, in_flight, held).await;
        }
        while batch.len() < config.max_batch {
            match events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }

        let now = clock.now();
        for event in batch {
            match event {
                Event::Device { id, leaf, payload } => {
                    if known_device(&id) {
                        fleet.on_device_message(&id, &leaf, &payload, now)
                    } else {
                        fleet.refuse_unknown_device(&id, &leaf)
                    }
                }
                Event::Operator(msg) => {
                    let answers = handle_operator(&mut fleet, &store, msg, now).await;
                    held.responses.extend(answers);
                }
            }
        }
        held.commands.extend(fleet.reconcile_due(now));

        let may_commit = in_flight.is_none()
            && retry_commit_at.is_none_or(|at| at <= tokio::time::Instant::now());
        if !may_commit {
            continue;
        }
        retry_commit_at = None;
        if fleet.has_dirty() {
            let changes = Changes {
                devices: fleet.take_dirty(),
                seq: Some(fleet.seq),
                ..Default::default()
            };
            let store = store.clone();
            in_flight = Some(CommitInFlight {
                task: tokio::task::spawn_blocking(move || store.commit_owned(changes)),
                held: std::mem::take(&mut held),
            });
        } else if !held.is_empty() {
            // Nothing new to make durable: what is held may go now.
            let ready = std::mem::take(&mut held);
            send_all(&out, ready.responses.into_iter().chain(ready.commands)).await;
        }
    }
}

/// On shutdown: the commit in flight and one last commit of what changed
/// since, then what they held is published.
async fn finish(
    mut fleet: Fleet,
    store: &Arc<Store>,
    out: &mpsc::Sender<Outgoing>,
    in_flight: Option<CommitInFlight>,
    held: Held,
) -> Result<(), ControllerError> {
    if let Some(c) = in_flight {
        match c.task.await {
            Ok((_, Ok(()))) => {
                send_all(out, c.held.responses.into_iter().chain(c.held.commands)).await
            }
            Ok((written, Err(e))) => {
                tracing::error!(error = %e, "commit failed at shutdown");
                fleet.mark_dirty(written);
            }
            Err(e) => tracing::error!(error = %e, "commit task failed at shutdown"),
        }
    }
    let changes = Changes {
        devices: fleet.take_dirty(),
        seq: Some(fleet.seq),
        ..Default::default()
    };
    let (_, result) = commit(store, changes).await;
    match result {
        Ok(()) => send_all(out, held.responses.into_iter().chain(held.commands)).await,
        Err(e) => {
            tracing::error!(error = %e, "last commit failed at shutdown; the changes since the last commit are re-derived at the next start");
            send_all(out, held.responses).await;
        }
    }
    Ok(())
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

/// Like every body, a JSON object only (see `cityplane_proto::messages`).
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
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

cityplane_proto::object_only!(Query);

/// Operator writes commit immediately (they are rare and must be durable
/// before they are answered); queries are answered from memory.
async fn handle_operator(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    msg: OperatorMessage,
    now: u64,
) -> Vec<Outgoing> {
    let who = msg.from.id.clone();
    if let Some(name) = topics::desired_name(&msg.topic) {
        let name = name.to_owned();
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
                let changes = fleet.doc_changes(&doc, audit.clone());
                let (_, result) = commit(store, changes).await;
                match result {
                    Ok(()) => {
                        let changed = fleet.apply_doc(doc.clone());
                        tracing::info!(operator = %who, name = %doc.name, generation = doc.generation, devices_changed = changed, "desired state accepted");
                        vec![response]
                    }
                    Err(e) => {
                        tracing::error!(error = %e, disk_full = e.is_disk_full(), "could not store desired state");
                        let reason = if e.is_disk_full() {
                            "the controller's data disk is full (no space left on device): \
                             the write was not stored; free space on the server and retry"
                                .to_owned()
                        } else {
                            format!("the controller could not store the write: {e}")
                        };
                        // The failed commit may have reached the disk anyway:
                        // the next commit that succeeds puts back what was.
                        store.defer_restore_doc(&doc.name, fleet.docs.get(&doc.name).cloned());
                        // The refusal is audited (under the entry's sequence)
                        // once a commit succeeds again.
                        store.defer_audit([crate::model::AuditEntry {
                            result: format!("rejected (storage_unavailable): {reason}"),
                            ..audit
                        }]);
                        let rid = fleet::request_id_of(&msg.payload).unwrap_or(name);
                        vec![fleet::response_to(
                            &who,
                            &rid,
                            &json!({
                                "request_id": rid, "status": "rejected", "code": "storage_unavailable",
                                "reason": reason,
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
                if let (changes, Err(e)) = commit(store, changes).await {
                    tracing::error!(error = %e, "could not append to the audit log; written with the next commit that succeeds");
                    store.defer_audit(changes.audit);
                }
                vec![response]
            }
        }
    } else if let Some(verb) = topics::ops_verb(&msg.topic) {
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
                .map(|d| &**d)
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
            // From memory, like every query: reading sled fails on a full disk.
            let entries = store.recent_audit(q.limit.unwrap_or(50).min(crate::store::AUDIT_KEPT));
            Ok(json!({"entries": entries}))
        }
        other => Err(Rejection::new(
            "unknown_verb",
            format!("unknown operation {other:?}; expected status, get-devices, describe or audit"),
        )),
    }
}

#[cfg(test)]
mod query_tests {
    use super::*;

    #[test]
    fn a_query_is_an_object_only() {
        let l = InputLimits::default();
        let q = input::parse::<Query>(br#"{"request_id": "r", "id": "d1", "limit": -0}"#, l)
            .expect("object");
        assert_eq!((q.id.as_deref(), q.limit), (Some("d1"), Some(0)));
        for bad in [
            &br#"["r", "d1"]"#[..],
            br#"{"selector": []}"#,
            br#"{"selector": ["lamp"]}"#,
            b"null",
        ] {
            let r = input::parse::<Query>(bad, l).err().expect("refused");
            assert_eq!(
                r.code,
                "bad_schema",
                "{}: {r}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

/// The retry schedule as the running loop produces it, on tokio's paused
/// clock: virtual time only moves when every task waits, so each command is
/// observed at exactly the instant the loop sent it.
#[cfg(test)]
mod paused_clock_tests {
    use super::*;
    use crate::model::{DeviceRecord, DocRecord};
    use crate::reconcile::jitter;
    use cityplane_proto::messages::{self, IdList, State, Target};
    use tokio::time::Instant;

    const DEVICE: &str = "lamp";

    fn state(v: Value) -> State {
        v.as_object().cloned().expect("object")
    }

    struct Harness {
        events: mpsc::Sender<Event>,
        out: mpsc::Receiver<Outgoing>,
        shutdown: watch::Sender<bool>,
        task: JoinHandle<Result<(), ControllerError>>,
        _dir: tempfile::TempDir,
    }

    /// One device that reported `dimming: 10`, one document that wants 50.
    fn start(policy: RetryPolicy) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), 8 << 20).expect("store"));
        let doc = DocRecord {
            name: "dim".into(),
            target: Target::Ids(IdList {
                ids: vec![DEVICE.into()],
            }),
            priority: 0,
            state: state(json!({"dimming": 50})),
            generation: 1,
            seq: 1,
            author: "op".into(),
            written_at: 0,
        };
        let mut lamp = DeviceRecord::new(DEVICE);
        lamp.reported = state(json!({"dimming": 10}));
        lamp.reported_version = 1;
        let fleet = Fleet::new(
            vec![doc],
            vec![lamp],
            1,
            0,
            policy,
            InputLimits::default(),
            "test".into(),
        );
        let config = ControllerConfig::new(dir.path().to_path_buf());
        let (events, events_rx) = mpsc::channel(64);
        let (out_tx, out) = mpsc::channel(64);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            fleet,
            store,
            events_rx,
            out_tx,
            config,
            shutdown_rx,
            Clock::new(),
        ));
        Harness {
            events,
            out,
            shutdown,
            task,
            _dir: dir,
        }
    }

    impl Harness {
        async fn device_says(&self, leaf: &str, body: Value) {
            self.events
                .send(Event::Device {
                    id: DEVICE.into(),
                    leaf: leaf.into(),
                    payload: body.to_string().into(),
                })
                .await
                .expect("controller running");
        }

        /// The next command, with the (virtual) instant it was sent.
        async fn next_command(&mut self) -> (Instant, messages::Command) {
            loop {
                let out = self.out.recv().await.expect("controller running");
                if out.topic == topics::commands(DEVICE) {
                    let cmd = serde_json::from_slice(&out.payload).expect("command JSON");
                    return (Instant::now(), cmd);
                }
            }
        }

        /// Everything published during `span` of virtual time: commands and
        /// the last fleet summary.
        async fn quiet_for(&mut self, span: Duration) -> (usize, Value) {
            let until = Instant::now() + span;
            let (mut commands, mut summary) = (0, Value::Null);
            while let Ok(Some(out)) = tokio::time::timeout_at(until, self.out.recv()).await {
                if out.topic == topics::commands(DEVICE) {
                    commands += 1;
                } else if out.topic == topics::FLEET_STATUS {
                    summary = serde_json::from_slice(&out.payload).expect("status JSON");
                }
            }
            (commands, summary)
        }

        async fn stop(self) {
            let _ = self.shutdown.send(true);
            self.task.await.expect("join").expect("clean stop");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_up_to_the_cap_then_fail() {
        let policy = RetryPolicy {
            command_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
            max_attempts: 5,
        };
        let mut h = start(policy.clone());
        // Nothing is sent to a device that is not online.
        let (sent, _) = h.quiet_for(Duration::from_secs(60)).await;
        assert_eq!(sent, 0, "a command went to an offline device");

        let online_at = Instant::now();
        h.device_says("presence", json!({"online": true})).await;
        let (first_at, first) = h.next_command().await;
        assert_eq!(first_at, online_at, "the first command goes out at once");
        assert_eq!(first.state, state(json!({"dimming": 50})));

        let mut previous = first_at;
        for attempt in 1..policy.max_attempts {
            let (at, cmd) = h.next_command().await;
            assert_eq!(cmd.id, first.id, "a re-send keeps the command id");
            assert_eq!(cmd.generation, first.generation);
            let gap = at - previous;
            // timeout, then base × 2^(attempt-1) capped at the maximum, with
            // "equal jitter": between half and all of it.
            let nominal = (policy.backoff_base * 2u32.pow(attempt - 1)).min(policy.backoff_max);
            let wait = gap
                .checked_sub(policy.command_timeout)
                .expect("re-sent before the command timed out");
            assert!(
                wait >= nominal / 2 && wait <= nominal,
                "attempt {}: waited {wait:?} after the timeout, nominal backoff {nominal:?}",
                attempt + 1
            );
            let expected =
                policy.command_timeout + policy.backoff(attempt, jitter(DEVICE, attempt));
            assert_eq!(
                gap.as_millis(),
                expected.as_millis(),
                "attempt {}",
                attempt + 1
            );
            previous = at;
        }

        // The last attempt times out: Failed, and nothing more is sent.
        let (sent, summary) = h.quiet_for(Duration::from_secs(24 * 3600)).await;
        assert_eq!(sent, 0, "commands after the last attempt");
        assert_eq!(summary["failed"], 1, "{summary}");

        // Back online (a reboot): re-driven at once, same command id.
        h.device_says("presence", json!({"online": false})).await;
        let back_at = Instant::now();
        h.device_says("presence", json!({"online": true})).await;
        let (at, cmd) = h.next_command().await;
        assert_eq!(at, back_at);
        assert_eq!(cmd.id, first.id);

        // Applied and reported: converged, and the timers stay quiet.
        h.device_says("acks", json!({"id": cmd.id, "status": "applied"}))
            .await;
        h.device_says("reported", json!({"version": 2, "state": {"dimming": 50}}))
            .await;
        let (sent, summary) = h.quiet_for(Duration::from_secs(24 * 3600)).await;
        assert_eq!(sent, 0, "commands after convergence");
        assert_eq!(summary["converged"], 1, "{summary}");
        assert_eq!(summary["failed"], 0, "{summary}");
        h.stop().await;
    }
}
