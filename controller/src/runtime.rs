//! The controller's event loop: one task owns the fleet, so no two
//! reconciles of a device ever run at once. Events are taken in batches; each
//! batch ends with one durable commit (group commit), and only then are
//! responses and commands published.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cityplane_broker::backlog::Credit;
use cityplane_broker::{OperatorMessage, RunningBroker};
use cityplane_certs::registry::IssuedDevice;
use cityplane_proto::messages::{Attributes, Registration, Selector, Target};
use cityplane_proto::topics;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::Notification;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::delta::selects;
use crate::fleet::{self, Fleet, LabelChange, Outgoing, Overwrite};
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
    /// A PKI or server directory whose `issued.jsonl` introduces devices to
    /// the registry (read at start, then whenever it changes).
    pub registry_source: Option<PathBuf>,
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
            registry_source: None,
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
    /// The device certificates a PKI directory records, read anew.
    Issued(Vec<IssuedDevice>),
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
        if let Some(dir) = config.registry_source.clone() {
            // The first read is in the loop's queue before any device can
            // connect (the broker opens below).
            let first = read_issued(&dir).await;
            if let Some(devices) = first.clone() {
                let _ = events_tx.send(Event::Issued(devices)).await;
            }
            tokio::spawn(watch_issued(dir, events_tx.clone()));
        }
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

/// How often the registry source is checked for changes (a stat).
const ISSUED_POLL: Duration = Duration::from_secs(1);

async fn read_issued(dir: &std::path::Path) -> Option<Vec<IssuedDevice>> {
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
async fn watch_issued(dir: PathBuf, events: mpsc::Sender<Event>) {
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
                    // A write commits itself before it is answered: its answer
                    // need not wait for the batch's commit (which, after a
                    // document that changes 50,000 devices, writes them all).
                    let write = topics::desired_name(&msg.topic).is_some()
                        || topics::ops_verb(&msg.topic).is_some_and(|v| WRITE_VERBS.contains(&v));
                    let answers = handle_operator(&mut fleet, &store, msg, now).await;
                    if write {
                        send_all(&out, answers).await;
                    } else {
                        held.responses.extend(answers);
                    }
                }
                Event::Issued(devices) => {
                    let revoked: std::collections::HashSet<String> = devices
                        .iter()
                        .filter(|d| d.revoked)
                        .map(|d| d.id.clone())
                        .collect();
                    let (new, updated) = fleet.register(
                        devices.into_iter().map(|d| Registration {
                            id: d.id,
                            class: d.attributes.class,
                            labels: d.attributes.labels,
                            owner: d.attributes.owner,
                        }),
                        fleet::FROM_PKI,
                        Overwrite::Never,
                        now,
                    );
                    fleet.set_revoked(&revoked);
                    if new + updated > 0 {
                        tracing::info!(
                            new,
                            updated,
                            "registry: devices from the PKI's issuance record"
                        );
                    }
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
    /// `dry-run`: the document an `apply` would send.
    #[serde(default)]
    document: Option<Value>,
}

/// `register`: a provisioning manifest (or part of one).
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RegisterRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    devices: Vec<Registration>,
}

/// `label`: these ids, or the devices a selector picks, get `change`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct LabelRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    selector: Option<Selector>,
    change: LabelChange,
}

/// `delete-document`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct DeleteRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    name: String,
    #[serde(default)]
    if_generation: Option<u64>,
}

cityplane_proto::object_only!(Query, RegisterRequest, LabelRequest, DeleteRequest);

/// Verbs on `fleet/ops/` that change state: committed before answered, and
/// audited (refusals too).
const WRITE_VERBS: [&str; 3] = ["register", "label", "delete-document"];

/// Longest class, owner, label key or value the registry takes.
const MAX_ATTRIBUTE: usize = 128;

fn check_attribute(what: &str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() || value.len() > MAX_ATTRIBUTE || value.chars().any(char::is_control) {
        return Err(Rejection::new(
            "bad_attribute",
            format!(
                "{what} {value:?} must be 1 to {MAX_ATTRIBUTE} bytes without control characters"
            ),
        ));
    }
    Ok(())
}

fn check_attributes(a: &Attributes) -> Result<(), Rejection> {
    for c in a.class.iter() {
        check_attribute("class", c)?;
    }
    for o in a.owner.iter() {
        check_attribute("owner", o)?;
    }
    for (k, v) in &a.labels {
        check_attribute("label key", k)?;
        check_attribute("label value", v)?;
    }
    Ok(())
}

/// Commits an operator write; a failure becomes the operator's refusal.
async fn commit_write(store: &Arc<Store>, changes: Changes) -> Result<(), Rejection> {
    let (changes, result) = commit(store, changes).await;
    result.map_err(|e| {
        tracing::error!(error = %e, disk_full = e.is_disk_full(), "could not store an operator write");
        // The refusal's audit line waits for the next commit that works.
        store.defer_audit(changes.audit.into_iter().map(|a| crate::model::AuditEntry {
            result: "rejected (storage_unavailable)".to_owned(),
            ..a
        }));
        storage_rejection(&e)
    })
}

fn storage_rejection(e: &StoreError) -> Rejection {
    let reason = if e.is_disk_full() {
        "the controller's data disk is full (no space left on device): \
         the write was not stored; free space on the server and retry"
            .to_owned()
    } else {
        format!("the controller could not store the write: {e}")
    };
    Rejection::new("storage_unavailable", reason)
}

/// `register`, `label`, `delete-document`: validated, committed with their
/// audit line, then applied in memory.
async fn operator_write(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    who: &str,
    verb: &str,
    payload: &[u8],
    now: Millis,
) -> Result<Value, Rejection> {
    match verb {
        "register" => {
            let req = input::parse::<RegisterRequest>(payload, fleet.limits)?;
            for r in &req.devices {
                cityplane_proto::validate_id(&r.id)
                    .map_err(|e| Rejection::new("bad_id", format!("{:?}: {e}", r.id)))?;
                check_attributes(&r.attributes())?;
            }
            let records = fleet.registered_records(&req.devices, who, now);
            let audit = fleet.audit_entry(
                who,
                "register",
                &format!("{} devices", req.devices.len()),
                &format!("accepted, {} records written", records.len()),
                now,
            );
            commit_write(
                store,
                Changes {
                    devices: records,
                    audit: vec![audit],
                    ..Default::default()
                },
            )
            .await?;
            let (new, updated) = fleet.register(req.devices, who, Overwrite::Always, now);
            tracing::info!(operator = who, new, updated, "devices registered");
            Ok(json!({"registered": new, "updated": updated, "total": fleet.devices.len()}))
        }
        "label" => {
            let req = input::parse::<LabelRequest>(payload, fleet.limits)?;
            if req.change.is_empty() {
                return Err(Rejection::new(
                    "bad_schema",
                    "the change sets and removes nothing",
                ));
            }
            let probe = Attributes {
                class: req.change.class.clone().filter(|c| !c.is_empty()),
                owner: req.change.owner.clone().filter(|o| !o.is_empty()),
                labels: req.change.set.clone(),
            };
            check_attributes(&probe)?;
            let ids: Vec<String> = match (&req.selector, req.ids.is_empty()) {
                (Some(sel), true) if !sel.is_empty() => fleet
                    .targeted(&Target::Selector(sel.clone()))
                    .into_iter()
                    .map(|d| d.id.clone())
                    .collect(),
                (None, false) => {
                    if let Some(missing) =
                        req.ids.iter().find(|id| !fleet.devices.contains_key(*id))
                    {
                        return Err(Rejection::new(
                            "not_found",
                            format!("no device {missing:?} is registered"),
                        ));
                    }
                    req.ids.clone()
                }
                _ => {
                    return Err(Rejection::new(
                        "bad_target",
                        "label needs either \"ids\" or a non-empty \"selector\"",
                    ))
                }
            };
            let records = fleet.labelled_records(&ids, &req.change);
            let audit = fleet.audit_entry(
                who,
                "label",
                &format!("{} devices", ids.len()),
                &format!("accepted, {} changed", records.len()),
                now,
            );
            commit_write(
                store,
                Changes {
                    devices: records,
                    audit: vec![audit],
                    ..Default::default()
                },
            )
            .await?;
            let changed = fleet.label(&ids, &req.change);
            Ok(json!({"matched": ids.len(), "changed": changed}))
        }
        "delete-document" => {
            let req = input::parse::<DeleteRequest>(payload, fleet.limits)?;
            let doc = fleet.docs.get(&req.name).ok_or_else(|| {
                Rejection::new(
                    "not_found",
                    format!("no desired document named {:?}", req.name),
                )
            })?;
            if let Some(want) = req.if_generation {
                if want != doc.generation {
                    return Err(Rejection::new(
                        "conflict",
                        format!(
                            "if_generation is {want} but the stored generation of {:?} is {}",
                            req.name, doc.generation
                        ),
                    ));
                }
            }
            let previous = doc.clone();
            let audit = fleet.audit_entry(
                who,
                "delete",
                &req.name,
                &format!("deleted generation {}", previous.generation),
                now,
            );
            let changes = Changes {
                deleted_docs: vec![req.name.clone()],
                audit: vec![audit],
                ..Default::default()
            };
            if let Err(r) = commit_write(store, changes).await {
                // The failed commit may have reached the disk anyway.
                store.defer_restore_doc(&req.name, Some(previous));
                return Err(r);
            }
            let (old, changed) = fleet
                .delete_doc(&req.name)
                .ok_or_else(|| Rejection::new("not_found", "deleted meanwhile"))?;
            tracing::info!(operator = who, name = %old.name, devices_changed = changed, "desired document deleted");
            Ok(json!({"name": old.name, "generation": old.generation, "devices_changed": changed}))
        }
        other => Err(Rejection::new(
            "unknown_verb",
            format!("{other:?} is not a write"),
        )),
    }
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
        let rid = fleet::request_id_of(&msg.payload).unwrap_or_else(|| verb.clone());
        let result = if WRITE_VERBS.contains(&verb.as_str()) {
            let result = operator_write(fleet, store, &who, &verb, &msg.payload, now).await;
            if let Err(r) = &result {
                if r.code != "storage_unavailable" {
                    audit_refusal(fleet, store, &who, &verb, r, now).await;
                }
            }
            result
        } else {
            input::parse::<Query>(&msg.payload, fleet.limits)
                .and_then(|q| answer(fleet, store, &who, &verb, q))
        };
        let body = match result {
            Ok(result) => json!({"request_id": rid, "status": "ok", "result": result}),
            Err(r) => {
                tracing::warn!(operator = %who, verb, %r, "operator request refused");
                json!({"request_id": rid, "status": "rejected", "code": r.code, "reason": r.reason})
            }
        };
        vec![fleet::response_to(&who, &rid, &body)]
    } else {
        Vec::new()
    }
}

/// A refused write is audited like an accepted one.
async fn audit_refusal(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    who: &str,
    verb: &str,
    r: &Rejection,
    now: Millis,
) {
    let audit = fleet.audit_entry(
        who,
        verb,
        "",
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
}

fn answer(
    fleet: &Fleet,
    store: &Arc<Store>,
    who: &str,
    verb: &str,
    q: Query,
) -> Result<Value, Rejection> {
    match verb {
        "get-documents" => {
            let docs: Vec<Value> = fleet
                .docs
                .values()
                .map(|d| fleet::document_row(fleet, d))
                .collect();
            Ok(json!({"total": docs.len(), "documents": docs}))
        }
        "describe-document" => {
            let name = q
                .name
                .ok_or_else(|| Rejection::new("bad_schema", "describe-document needs \"name\""))?;
            let doc = fleet.docs.get(&name).ok_or_else(|| {
                Rejection::new("not_found", format!("no desired document named {name:?}"))
            })?;
            Ok(fleet::describe_document(fleet, doc))
        }
        "dry-run" => {
            let doc = q
                .document
                .ok_or_else(|| Rejection::new("bad_schema", "dry-run needs \"document\""))?;
            let bytes = serde_json::to_vec(&doc).unwrap_or_default();
            fleet.dry_run(who, &bytes)
        }
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
                    q.selector
                        .as_ref()
                        .is_none_or(|s| selects(&Target::Selector(s.clone()), &d.id, &d.attrs))
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
                Rejection::new(
                    "not_found",
                    format!("no device {id:?} is registered (cityplane devices register, or certs issue)"),
                )
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
            format!(
                "unknown operation {other:?}; expected status, get-devices, describe, audit, \
                 get-documents, describe-document, dry-run, register, label or delete-document"
            ),
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
            history: Vec::new(),
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
