//! The controller's runtime, around the pure fleet core: `wiring` (router
//! link, operator tap, the PKI's issuance record → events), `event_loop`
//! (one task owns the fleet, so no two reconciles of a device ever run at
//! once; events in batches, one durable commit per batch, then what it held
//! is published) and `operator` (documents, queries and registry writes).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cityplane_broker::link::{Commands, DeviceTap, LinkSender};
use cityplane_broker::{OperatorMessage, RunningBroker};
use cityplane_certs::registry::IssuedDevice;
use cityplane_proto::messages::{Attributes, Registration, Selector, Target};
use cityplane_proto::topics;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::delta::selects;
use crate::fleet::{self, Fleet, LabelChange, Outgoing, Overwrite};
use crate::input::{self, InputLimits, Rejection};
use crate::model::{now_ms, Millis};
use crate::reconcile::RetryPolicy;
use crate::store::{Changes, CommitGate, Store, StoreError, StoreLocation};

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The data directory: firmware images, the secrets key and, unless
    /// `store_url` says otherwise, the sled database.
    pub data: PathBuf,
    /// A PostgreSQL database for the store instead of sled in `data`
    /// (`postgres://user@host:port/db`). Its `Debug` hides the password.
    pub store_url: Option<StoreUrl>,
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
    /// Most device records in one transaction of a commit: each chunk's
    /// commands leave once it is durable, before the next is written. 250:
    /// against 1,000 and one transaction per commit, the fastest apply to
    /// 10,000 devices and the least memory (docs/BENCHMARKS.md). In-process
    /// only: [`Controller::start_external`] writes one transaction.
    pub commit_chunk: usize,
    /// Tests only: holds or fails commits (see [`CommitGate`]).
    pub commit_gate: Option<CommitGate>,
    /// How often rollouts are stepped (devices admitted, waves gated).
    pub rollout_every: Duration,
    /// How often compliance is sampled and published, the time-based
    /// rules evaluated again and enforcement considered.
    pub compliance_every: Duration,
    /// Firmware images the server holds at most, in bytes (published and
    /// uploading): operators cannot fill the data disk with them.
    pub max_firmware_bytes: u64,
    /// The key device secrets are sealed with (`crate::secrets`); `None`:
    /// `secrets.key` in the data directory, created on first start.
    pub secrets_key: Option<PathBuf>,
    /// The dashboard's sign-in tokens (`dashboard-login`); `None`: this
    /// server runs no dashboard and the verb is refused.
    pub sign_ins: Option<Arc<crate::signin::SignIns>>,
    /// The generation of the store's lease this controller holds
    /// ([`crate::store::Lease`], PostgreSQL only): every commit is fenced
    /// with it. `None`: unfenced (sled, or one controller by itself).
    pub fence: Option<i64>,
    /// Sharded: how long the leader keeps an operator write about devices
    /// once every device's owner has applied it (see
    /// [`crate::fleet::DEFAULT_INTENT_KEEP`]).
    pub intent_keep: Duration,
    /// The name this controller holds the store's lease under
    /// (`id@host:pid`, with `fence`): `status` says which controller acts.
    pub lease_holder: Option<String>,
}

impl ControllerConfig {
    pub fn new(data: PathBuf) -> Self {
        ControllerConfig {
            data,
            store_url: None,
            pki: None,
            registry_source: None,
            retry: RetryPolicy::default(),
            input: InputLimits::default(),
            cache_bytes: 64 * 1024 * 1024,
            status_every: Duration::from_secs(1),
            max_batch: 2048,
            commit_chunk: 250,
            commit_gate: None,
            rollout_every: Duration::from_millis(250),
            compliance_every: Duration::from_secs(5),
            max_firmware_bytes: 16 << 30,
            secrets_key: None,
            sign_ins: None,
            fence: None,
            intent_keep: Duration::from_millis(crate::fleet::DEFAULT_INTENT_KEEP),
            lease_holder: None,
        }
    }

    /// Where the store lives: `store_url`, else sled in `data`.
    pub fn store_location(&self) -> StoreLocation {
        match &self.store_url {
            Some(url) => StoreLocation::Postgres(url.0.clone()),
            None => StoreLocation::Sled(self.data.clone()),
        }
    }

    /// Where published firmware images are kept (the broker serves them
    /// from there): `firmware/` in the data directory.
    pub fn firmware_dir(&self) -> PathBuf {
        firmware_dir(&self.data)
    }
}

/// A store URL (see [`ControllerConfig::store_url`]): a `String` whose
/// `Debug` and `Display` never show the password, so the config can be
/// logged.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::store::redact_url(&self.0))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::store::redact_url(&self.0))
    }
}

/// `firmware/` in a controller's data directory.
pub fn firmware_dir(data: &std::path::Path) -> PathBuf {
    data.join("firmware")
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(String),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
}

enum Event {
    Device {
        id: String,
        leaf: String,
        payload: bytes::Bytes,
        /// From an external broker: acknowledged once durable.
        ack: Option<external::Ack>,
    },
    Operator(OperatorMessage, Option<external::Ack>),
    /// An operator's write the external broker delivered again (MQTT's
    /// DUP): answered with a refusal, not carried out (see
    /// [`operator::redelivered`]).
    Redelivered(OperatorMessage, Option<external::Ack>),
    /// The device certificates a PKI directory records, read anew.
    Issued(Vec<IssuedDevice>),
    /// An operator request from inside the process (the dashboard), for an
    /// identity it authenticated; answered on `reply`, not over MQTT.
    Local {
        msg: OperatorMessage,
        reply: tokio::sync::oneshot::Sender<bytes::Bytes>,
    },
    /// Sharded: the shards to act on, with the generations of their
    /// leases (the fence), and the device records the store got since the
    /// last round (`sharding.rs`).
    Shards {
        acting: std::collections::BTreeMap<u32, i64>,
        copies: Vec<crate::model::DeviceRecord>,
        /// Who holds each shard (`status` shows it).
        holders: std::collections::BTreeMap<u32, String>,
        /// The other live controllers' counters (JSON), as they last
        /// published them.
        others: Vec<String>,
        /// Where this controller's counters go (JSON), to be published.
        counters: tokio::sync::oneshot::Sender<String>,
    },
    /// Sharded: the stored documents, as the leader wrote them.
    Docs(Vec<crate::model::DocRecord>),
    /// Sharded: the operator intents stored, and the highest number given
    /// (`Store::intents`).
    Intents(Vec<crate::model::IntentRecord>, u64),
    /// Sharded: the organisations, policy and exceptions stored
    /// (`Store::governance`).
    Governance(Vec<(String, Vec<u8>)>),
    /// Sharded: the rollouts and releases stored (`Store::rollouts`).
    Rollouts(
        Vec<crate::rollout::RolloutRecord>,
        Vec<crate::model::ReleaseRecord>,
    ),
    /// Sharded: this controller holds the leader's lease from now on.
    Lead {
        generation: i64,
        holder: String,
    },
}

pub struct Controller {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), ControllerError>>,
    events: mpsc::Sender<Event>,
    /// Sharded: the keeper (told to leave once the loop stopped) and the
    /// switch of the main session (on when this controller leads).
    sharded: Option<ShardedParts>,
}

struct ShardedParts {
    keeper_stop: tokio::sync::oneshot::Sender<()>,
    keeper: JoinHandle<()>,
    lead: watch::Sender<bool>,
}

/// A refused operator request: the stable code and the reason, as an
/// operator over MQTT would read them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    pub code: String,
    pub reason: String,
}

/// The operator protocol from inside the process: the same verbs, checks
/// (organisation scope, rights), audit lines and answers as an operator's
/// publish on `fleet/ops/<verb>`, for an identity the caller has already
/// authenticated. The dashboard asks through this, so scoping has one
/// implementation.
///
/// Queries are answered from memory at once, not after the commit that
/// covers them as over MQTT: what the dashboard shows is a view refreshed
/// every half second, nothing acts on it; writes are still committed
/// before they are answered.
#[derive(Clone)]
pub struct OperatorApi {
    events: mpsc::Sender<Event>,
}

impl OperatorApi {
    pub async fn ask(
        &self,
        from: &cityplane_proto::Identity,
        verb: &str,
        body: Value,
    ) -> Result<Value, Refusal> {
        let gone = || Refusal {
            code: "unavailable".into(),
            reason: "the controller is stopping".into(),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let msg = OperatorMessage {
            from: from.clone(),
            topic: topics::ops(verb),
            payload: serde_json::to_vec(&body).unwrap_or_default().into(),
        };
        self.events
            .send(Event::Local { msg, reply })
            .await
            .map_err(|_| gone())?;
        let bytes = answer.await.map_err(|_| gone())?;
        match serde_json::from_slice::<cityplane_proto::messages::Response>(&bytes) {
            Ok(cityplane_proto::messages::Response::Ok { result, .. }) => Ok(result),
            Ok(cityplane_proto::messages::Response::Rejected { code, reason, .. }) => {
                Err(Refusal { code, reason })
            }
            Ok(other) => Ok(serde_json::to_value(other).unwrap_or_default()),
            Err(e) => Err(Refusal {
                code: "internal".into(),
                reason: format!("unreadable answer: {e}"),
            }),
        }
    }
}

impl Controller {
    /// Starts the controller inside the broker's process, wired to the
    /// router by an in-process link and to operators through the tap.
    pub async fn start_in_process(
        broker: &RunningBroker,
        config: ControllerConfig,
    ) -> Result<Controller, ControllerError> {
        let (mut fleet, store, secrets) = prepare(&config).await?;
        fleet.forget_presence();
        let tables = event_loop::BrokerTables {
            scopes: broker.scopes(),
            pins: broker.pins(),
        };
        tables.scopes.replace(fleet.scope_table());
        fleet.gov.scopes_dirty = false;
        // Before the broker opens: a quarantined device never gets in.
        fleet.pins_dirty = true;
        tables.push_pins(&mut fleet);

        // Device messages come from the edge's tap, commands go straight to
        // the devices' connections: the router thread is crossed only by
        // what other subscribers want. The link publishes the rest.
        let (tx, _rx) = broker
            .open_link(cityplane_broker::CONTROLLER_LINK_ID, &[])
            .await
            .map_err(|e| ControllerError::Broker(e.to_string()))?;
        let device_tap = broker
            .tap_device_messages(&DEVICE_LEAVES)
            .ok_or_else(|| ControllerError::Broker("device messages already tapped".into()))?;
        let tap = broker
            .tap_operator_messages()
            .ok_or_else(|| ControllerError::Broker("operator tap already taken".into()))?;
        let (events_tx, events) = mpsc::channel(EVENTS_QUEUE);
        tokio::spawn(read_devices(device_tap, events_tx.clone()));
        feed_registry(&config, &events_tx).await;
        tokio::spawn(read_tap(tap, events_tx.clone()));
        let (out_tx, out_rx) = mpsc::channel(EVENTS_QUEUE);
        tokio::spawn(publish(tx, broker.commands(), out_rx, secrets));
        let controller = launch(fleet, store, events_tx, events, out_tx, config, tables);
        // Subscribed and tapped: now devices may connect.
        broker.open();
        Ok(controller)
    }

    /// Starts the controller as a client of an external MQTT broker
    /// (a RabbitMQ cluster): device messages and operators' requests
    /// arrive by subscription and are acknowledged to the broker only once
    /// what they changed is durable; commands and answers are published.
    /// The broker enforces identity and topic rules (`cluster sync`).
    ///
    /// With `sharding`, this controller is one of several on a shared
    /// PostgreSQL store (docs/DESIGN-SHARDING.md): it acts on the devices
    /// of the shards it holds, keeps read-only copies of the others', and
    /// answers operators only once told it leads ([`Controller::lead`]).
    pub async fn start_external(
        mut broker: external::ExternalBroker,
        mut config: ControllerConfig,
        sharding: Option<sharding::Sharding>,
    ) -> Result<Controller, ControllerError> {
        // One transaction per commit here: the broker's deliveries are
        // acknowledged only when the whole commit is durable, and the
        // broker stops delivering while too many wait, so chunks (more
        // transactions per commit) slowed the report intake. Measured once
        // on the RabbitMQ cluster at 2,500 devices: converged 13.4 s with
        // chunks of 250, 10.5 s without (docs/BENCHMARKS.md).
        config.commit_chunk = usize::MAX;
        let (mut fleet, store, secrets) = prepare(&config).await?;
        // A device's own presence carries no serial: nothing here could
        // confirm a rotated certificate.
        fleet.sees_session_serials = false;
        // The external broker's users and permissions are its scopes; the
        // pins go to whoever provisions it (see `ExternalBroker::pins`).
        let tables = event_loop::BrokerTables {
            scopes: cityplane_broker::Scopes::default(),
            pins: broker.pins.clone(),
        };
        fleet.gov.scopes_dirty = false;
        fleet.pins_dirty = true;
        tables.push_pins(&mut fleet);
        let (events_tx, events) = mpsc::channel(EVENTS_QUEUE);
        let mut steering = None;
        let mut parts = None;
        if let Some(sharding) = sharding {
            fleet.shard(sharding.keeper.shards());
            broker.member = Some(sharding.keeper.member().to_owned());
            let (shards_tx, shards_rx) = watch::channel(Default::default());
            let (lead, lead_rx) = watch::channel(false);
            steering = Some(external::Steering {
                shards: shards_rx,
                lead: lead_rx,
            });
            // Handles of their own: neither waits behind the loop's commits.
            let (copies, documents) = {
                let location = config.store_location();
                let cache = config.cache_bytes;
                tokio::task::spawn_blocking(move || {
                    Ok::<_, StoreError>((
                        Store::open_at(&location, cache)?,
                        Store::open_at(&location, cache)?,
                    ))
                })
                .await
                .map_err(|e| ControllerError::Broker(e.to_string()))??
            };
            tokio::spawn(sharding::follow_documents(
                sharding.url.clone(),
                documents,
                events_tx.clone(),
            ));
            let (keeper_stop, keeper) =
                sharding::spawn_keeper(sharding, copies, events_tx.clone(), shards_tx);
            parts = Some(ShardedParts {
                keeper_stop,
                keeper,
                lead,
            });
        }
        feed_registry(&config, &events_tx).await;
        let (out_tx, out_rx) = mpsc::channel(EVENTS_QUEUE);
        external::spawn(broker, events_tx.clone(), out_rx, secrets, steering);
        let mut controller = launch(fleet, store, events_tx, events, out_tx, config, tables);
        controller.sharded = parts;
        Ok(controller)
    }

    /// Sharded: this controller now holds the leader's lease (of
    /// `generation`, under the name `holder`): it writes the global
    /// records from now on (documents, the audit log) and answers
    /// operators, through the main session it opens now.
    pub async fn lead(&self, generation: i64, holder: String) -> Result<(), ControllerError> {
        self.events
            .send(Event::Lead { generation, holder })
            .await
            .map_err(|_| ControllerError::Broker("the controller stopped".into()))?;
        if let Some(parts) = &self.sharded {
            parts.lead.send_replace(true);
        }
        Ok(())
    }

    /// The operator protocol for in-process callers (the dashboard).
    pub fn operator_api(&self) -> OperatorApi {
        OperatorApi {
            events: self.events.clone(),
        }
    }

    /// Stops after the current batch is committed.
    pub async fn shutdown(self) -> Result<(), ControllerError> {
        let _ = self.shutdown.send(true);
        let stopped = self
            .task
            .await
            .map_err(|e| ControllerError::Broker(e.to_string()))?;
        // Only now: the last commit is written, nothing more is.
        if let Some(parts) = self.sharded {
            let _ = parts.keeper_stop.send(());
            let _ = parts.keeper.await;
        }
        stopped
    }
}

/// The device leaves the controller reads.
const DEVICE_LEAVES: [&str; 4] = ["reported", "acks", "presence", topics::DEVICE_CSR_LEAF];
/// Events and outgoing messages queued between the loop and its I/O.
const EVENTS_QUEUE: usize = 8192;

/// Opens the store, loads the fleet and the secrets vault.
async fn prepare(
    config: &ControllerConfig,
) -> Result<(Fleet, Arc<Store>, Arc<crate::secrets::Secrets>), ControllerError> {
    // Firmware and the secrets key live there whichever the engine
    // (sled creates it for itself; PostgreSQL does not).
    std::fs::create_dir_all(&config.data).map_err(StoreError::Io)?;
    let location = config.store_location();
    let cache = config.cache_bytes;
    let gate = config.commit_gate.clone();
    let store = tokio::task::spawn_blocking(move || {
        Store::open_at(&location, cache).map(|s| s.with_gate(gate))
    })
    .await
    .map_err(|e| ControllerError::Broker(e.to_string()))??;
    if let Some(generation) = config.fence {
        store.fence_with(generation);
    }
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
        store = %store.location(),
        "controller state loaded"
    );
    let mut fleet = Fleet::new(
        loaded.docs,
        loaded.devices,
        loaded.seq,
        loaded.audit_last,
        config.retry.clone(),
        config.input,
        format!("{:x}", now_ms()),
    );
    fleet.restore_rollouts(loaded.rollouts, loaded.releases);
    let key_path = config
        .secrets_key
        .clone()
        .unwrap_or_else(|| crate::secrets::default_key_path(&config.data));
    let vault = crate::secrets::Vault::open_or_create(&key_path)?;
    // A controller with another key than the one that sealed the store's
    // secrets (a standby or a restore given the wrong file) would fail
    // every secret command only once it acts: refused here, before it acts.
    let sample = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.any_secret_slot())
            .await
            .map_err(|e| ControllerError::Broker(e.to_string()))??
    };
    if let Some((device, name, slot)) = sample {
        if vault.open(&device, &name, &slot.current).is_err() {
            return Err(crate::secrets::SecretsError::WrongKey {
                path: key_path,
                device,
            }
            .into());
        }
    }
    let secrets = Arc::new(crate::secrets::Secrets {
        vault,
        store: store.clone(),
    });
    fleet.secrets = Some(secrets.clone());
    fleet.load_governance(loaded.governance, now_ms())?;
    Ok((fleet, store, secrets))
}

/// The registry's first read is queued before any device can be heard
/// from; then the source is watched.
async fn feed_registry(config: &ControllerConfig, events: &mpsc::Sender<Event>) {
    if let Some(dir) = config.registry_source.clone() {
        if let Some(devices) = read_issued(&dir).await {
            let _ = events.send(Event::Issued(devices)).await;
        }
        tokio::spawn(watch_issued(dir, events.clone()));
    }
}

fn launch(
    fleet: Fleet,
    store: Arc<Store>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    out_tx: mpsc::Sender<Outgoing>,
    config: ControllerConfig,
    tables: event_loop::BrokerTables,
) -> Controller {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(run(
        fleet,
        store,
        events,
        out_tx,
        config,
        shutdown_rx,
        Clock::new(),
        tables,
    ));
    Controller {
        shutdown,
        task,
        events: events_tx,
        sharded: None,
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

mod event_loop;
pub mod external;
mod firmware;
mod governance;
mod incidents;
mod operator;
pub mod sharding;
mod wiring;

use event_loop::run;
use governance::enforce;
use wiring::{publish, read_devices, read_issued, read_tap, watch_issued};
