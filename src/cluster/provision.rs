//! RabbitMQ users and permissions from cityplane's own truth: every identity
//! the PKI issued and did not revoke becomes a user with no password
//! (certificate login only) and topic permissions equivalent to
//! `broker/src/acl.rs`; every other user is revoked (deleted, which closes
//! its connections cluster-wide) or reported as drift.
//!
//! Topic permissions are regexes over the AMQP routing key, where MQTT's
//! `/` becomes `.` and a `.` inside an MQTT level becomes `/`. A `.` in an
//! id would therefore be a wildcard in the regex and an ambiguity in the
//! key: a device `a.b` granted `devices.a.b.reported` could publish as
//! `axb`. So an id outside `[a-z0-9_-]` is never provisioned (cityplane ids
//! may contain `.`: `proto::validate_id`), and every id is escaped as a
//! regex literal anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Instant;

use cityplane_certs::registry::{self, IssuedIdentity};
use cityplane_proto::{topics, Role, ADMIN_ORG};
use serde::Serialize;
use serde_json::{json, Value};

use super::mgmt::{segment, Mgmt, MgmtError};

/// The vhost and exchange RabbitMQ's MQTT plugin uses by default.
const VHOST: &str = "/";
const EXCHANGE: &str = "amq.topic";
/// Users per `POST /api/definitions`: one call imports thousands in about
/// a second; a sync killed between calls is finished by the next one.
const IMPORT_BATCH: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("reading the PKI's records: {0}")]
    Pki(#[from] cityplane_certs::CertError),
    #[error(transparent)]
    Mgmt(#[from] MgmtError),
    #[error("reading the controller's quarantine list: {0}")]
    Quarantine(String),
    #[error("the management API's {what} is not what RabbitMQ 3.10 returns: {detail}")]
    Unexpected { what: &'static str, detail: String },
}

/// Bindings per `POST /api/definitions`: RabbitMQ 3.10 makes about 200 a
/// second on 3 nodes (docs/DESIGN-SHARDING.md), so a call stays well
/// inside the API client's timeout.
const BINDING_BATCH: usize = 1000;

/// The MQTT plugin's queue lifetime when no session uses it
/// (`mqtt.subscription_ttl`, default 24 h): a queue declared here must carry
/// the same arguments as the plugin's own declaration, or the plugin's
/// declare fails when the session connects.
const SUBSCRIPTION_TTL_MS: u64 = 86_400_000;

/// What the broker should hold: the PKI's identities at one instant, less
/// the devices the controller quarantined.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub identities: Vec<IssuedIdentity>,
    /// Devices the controller cut off (`cityplane quarantine`): their
    /// certificates are valid, but they get no user until released.
    pub quarantined: BTreeSet<String>,
    /// Sharded controllers: each device's leaves bound to its shard's
    /// session queue (none: a controller subscribes for itself).
    pub shards: Option<ShardQueues>,
}

/// Where sharded controllers receive device messages
/// (docs/DESIGN-SHARDING.md): one persistent MQTT session per shard, client
/// id `<controller>.shard-<k>`, whose queue the MQTT plugin names
/// `mqtt-subscription-<client id>qos1`. A device's leaves the controller
/// reads are bound to its shard's queue before the device gets a user, so
/// none of its messages is routed nowhere; nothing is subscribed by the
/// sessions themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardQueues {
    /// The controllers' identity (the CN of their certificate).
    pub controller: String,
    /// The store's shard count (`cityplane_schema.shards`).
    pub shards: u32,
}

impl ShardQueues {
    /// The MQTT client id of shard `shard`'s session.
    pub fn client_id(&self, shard: u32) -> String {
        format!("{}.shard-{shard}", self.controller)
    }

    /// The queue of shard `shard`'s session.
    pub fn queue(&self, shard: u32) -> String {
        format!("mqtt-subscription-{}qos1", self.client_id(shard))
    }

    /// `device`'s bindings: (queue, routing key) for each leaf the
    /// controller reads.
    pub fn bindings(&self, device: &str) -> Vec<(String, String)> {
        let queue = self.queue(cityplane_controller::shard::shard_of(device, self.shards));
        CONTROLLER_LEAVES
            .iter()
            .map(|leaf| {
                (
                    queue.clone(),
                    format!("{}.{device}.{leaf}", topics::DEVICES),
                )
            })
            .collect()
    }
}

/// The device leaves a controller reads (`runtime::DEVICE_LEAVES`).
const CONTROLLER_LEAVES: [&str; 4] = ["reported", "acks", "presence", topics::DEVICE_CSR_LEAF];

/// Where `cityplane controller --cluster-dir` leaves the devices it
/// quarantined, in the cluster's directory, so that a `cluster sync` run
/// by hand does not let them back in.
pub const QUARANTINE_FILE: &str = "quarantined.json";

impl Desired {
    /// Every identity in `pki/issued.jsonl`, judged against `revoked.json`
    /// now (a PKI directory or a server directory from `export-server`).
    pub fn from_pki(pki: &Path) -> Result<Desired, ProvisionError> {
        Ok(Desired {
            identities: registry::issued_identities(pki, time::OffsetDateTime::now_utc())?,
            quarantined: BTreeSet::new(),
            shards: None,
        })
    }

    /// [`Desired::from_pki`] less the devices the controller last recorded
    /// as quarantined in the cluster directory `dir` ([`QUARANTINE_FILE`];
    /// none when there is no such file).
    pub fn from_pki_and_cluster(pki: &Path, dir: &Path) -> Result<Desired, ProvisionError> {
        let mut desired = Desired::from_pki(pki)?;
        let path = dir.join(QUARANTINE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                desired.quarantined = serde_json::from_slice(&bytes)
                    .map_err(|e| ProvisionError::Quarantine(format!("{}: {e}", path.display())))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ProvisionError::Quarantine(format!(
                    "{}: {e}",
                    path.display()
                )))
            }
        }
        Ok(desired)
    }
}

/// One user as the broker must hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRules {
    pub user: String,
    /// Vhost permissions: configure, write, read (queues and exchanges).
    pub configure: String,
    pub write: String,
    pub read: String,
    /// Topic permissions on `amq.topic` (routing keys).
    pub topic_write: String,
    pub topic_read: String,
}

/// Why an identity gets no user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    pub id: String,
    pub reason: String,
}

/// Whether `id` may become a RabbitMQ user: `[a-z0-9_-]`, 1 to 64 bytes
/// (cityplane's own rule without `.`). Checked on the raw id, never on a
/// normalised one.
pub fn check_broker_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("{id:?}: an id must be 1 to 64 characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-')))
    {
        return Err(format!(
            "{id:?} contains {c:?}: on RabbitMQ only [a-z0-9_-] is safe in an id \
             (a '.' separates routing-key levels and matches any character in a permission), \
             so this identity gets no user; issue it a new id"
        ));
    }
    Ok(())
}

/// `s` as a regex literal (PCRE, as RabbitMQ's `re`): every character but
/// letters, digits, `_` and `-` escaped.
pub fn regex_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') {
            out.push(c);
        } else {
            out.push('\\');
            out.push(c);
        }
    }
    out
}

/// An MQTT topic prefix from `proto::topics` as routing-key regex text:
/// levels escaped, joined by an escaped `.`.
fn key(mqtt_levels: &str) -> String {
    mqtt_levels
        .split('/')
        .map(regex_literal)
        .collect::<Vec<_>>()
        .join("\\.")
}

fn one_of(choices: &[&str]) -> String {
    let alts: Vec<String> = choices.iter().map(|c| regex_literal(c)).collect();
    format!("({})", alts.join("|"))
}

/// The rules for one identity, or why it gets none.
pub fn rules_for(identity: &IssuedIdentity) -> Result<UserRules, String> {
    check_broker_id(&identity.id)?;
    if identity.conflicting_roles {
        return Err(format!(
            "{:?} holds usable certificates of two roles; RabbitMQ logs in by CN alone and \
             cannot tell them apart: revoke one",
            identity.id
        ));
    }
    let id = regex_literal(&identity.id);
    // The MQTT plugin's subscription queues are `mqtt-subscription-<client
    // id>qos0|qos1`; only the client's own, and only with its own id as the
    // client id (an operator may add `:<session>`, as on the embedded
    // broker; no id contains `:`).
    let own = |client: &str| {
        format!(
            "^({}|mqtt-subscription-{client}qos[01])$",
            regex_literal(EXCHANGE)
        )
    };
    let devices = key(topics::DEVICES);
    Ok(match identity.role {
        Role::Device => {
            let mut publish: Vec<&str> = topics::DEVICE_PUBLISH_LEAVES.to_vec();
            publish.extend([topics::DEVICE_WILL_LEAF, topics::DEVICE_FETCH_LEAF]);
            let queues = own(&id);
            UserRules {
                user: identity.id.clone(),
                configure: queues.clone(),
                write: queues.clone(),
                read: queues,
                topic_write: format!("^{devices}\\.{id}\\.{}$", one_of(&publish)),
                topic_read: format!(
                    "^{devices}\\.{id}\\.{}$",
                    one_of(&[topics::DEVICE_SUBSCRIBE_LEAF, topics::DEVICE_BLOB_LEAF])
                ),
            }
        }
        Role::Operator => {
            let queues = own(&format!("{id}(:[a-z0-9_-]+)?"));
            let by = key(topics::FLEET_BY);
            let responses = format!("{}\\.{id}\\..+", key(topics::FLEET_RESPONSES));
            // As on the embedded broker: the city's own operators read the
            // fleet summary, a contractor's operators their organisation's
            // compliance summary instead.
            let summary = match identity.org.as_deref() {
                None | Some(ADMIN_ORG) => key(topics::FLEET_STATUS),
                Some(org) => match check_broker_id(org) {
                    Ok(()) => key(&topics::compliance(org)),
                    Err(why) => return Err(format!("organisation {why}")),
                },
            };
            UserRules {
                user: identity.id.clone(),
                configure: queues.clone(),
                write: queues.clone(),
                read: queues,
                topic_write: format!(
                    "^{by}\\.{id}\\.{}\\..+$",
                    one_of(&topics::BY_OPERATOR_LEAVES)
                ),
                topic_read: format!("^({responses}|{summary})$"),
            }
        }
        Role::Controller => UserRules {
            user: identity.id.clone(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
            topic_write: ".*".into(),
            topic_read: ".*".into(),
        },
    })
}

/// What one sync did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SyncReport {
    /// Users created.
    pub created: Vec<String>,
    /// Users whose password, tags or permissions were put back.
    pub updated: Vec<String>,
    /// Users that were right already.
    pub unchanged: usize,
    /// Users deleted because their identity's certificates are all revoked
    /// or expired, or because the identity may not be a user (see
    /// `refused`). Their connections were closed.
    pub revoked: Vec<String>,
    /// Users deleted because the controller quarantined the device. Their
    /// connections were closed.
    pub quarantined: Vec<String>,
    /// Identities that get no user, and why.
    pub refused: Vec<Refused>,
    /// Users on the broker that the PKI never issued (drift).
    pub drift: Vec<String>,
    /// Drift users deleted (`--prune`).
    pub pruned: Vec<String>,
    /// Sharded: shard queues created.
    pub queues_created: Vec<String>,
    /// Sharded: devices whose bindings were made (before their users).
    pub bound: Vec<String>,
    pub took_ms: u64,
}

impl SyncReport {
    /// Whether the run changed anything on the broker.
    pub fn changed(&self) -> bool {
        !(self.created.is_empty()
            && self.updated.is_empty()
            && self.revoked.is_empty()
            && self.quarantined.is_empty()
            && self.pruned.is_empty()
            && self.queues_created.is_empty()
            && self.bound.is_empty())
    }
}

/// What the broker holds for one user, as far as a sync cares.
#[derive(Debug, Default)]
struct Observed {
    has_password: bool,
    tags: Vec<String>,
    permissions: Vec<(String, String, String, String)>,
    topic_permissions: Vec<(String, String, String, String)>,
}

impl Observed {
    fn matches(&self, want: &UserRules) -> bool {
        !self.has_password
            && self.tags.is_empty()
            && self.permissions
                == [(
                    VHOST.to_owned(),
                    want.configure.clone(),
                    want.write.clone(),
                    want.read.clone(),
                )]
            && self.topic_permissions
                == [(
                    VHOST.to_owned(),
                    EXCHANGE.to_owned(),
                    want.topic_write.clone(),
                    want.topic_read.clone(),
                )]
    }

    /// Permissions the import cannot take away (it only adds or replaces):
    /// another vhost or exchange.
    fn has_foreign_grants(&self) -> bool {
        self.permissions.iter().any(|p| p.0 != VHOST)
            || self
                .topic_permissions
                .iter()
                .any(|p| p.0 != VHOST || p.1 != EXCHANGE)
    }
}

/// Management API calls a bulk close keeps in flight.
const CLOSES_IN_FLIGHT: usize = 16;

/// Told (devices bound so far, devices to bind) after each batch of
/// bindings: at about 200 bindings a second, 10,000 devices take minutes.
pub type Progress = std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>;

/// Provisions one RabbitMQ cluster through its management API.
#[derive(Clone)]
pub struct Provisioner {
    api: Mgmt,
    /// The API's own administrator: never drift, never deleted.
    admin_user: String,
    progress: Option<Progress>,
}

impl std::fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provisioner")
            .field("api", &self.api)
            .field("admin_user", &self.admin_user)
            .finish_non_exhaustive()
    }
}

impl Provisioner {
    pub fn new(api: Mgmt, admin_user: &str) -> Provisioner {
        Provisioner {
            api,
            admin_user: admin_user.to_owned(),
            progress: None,
        }
    }

    /// Reports the progress of making bindings (`--shards`) to `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Provisioner {
        self.progress = Some(progress);
        self
    }

    /// Makes the broker's users what `desired` says. Idempotent: a second
    /// run changes nothing and says so (`SyncReport::changed`). Resumable:
    /// every run compares against what the broker holds now, so one killed
    /// half-way is completed by the next. Users of revoked identities are
    /// deleted (their sessions cut cluster-wide); users the PKI never
    /// issued are reported as drift and deleted only when `prune`.
    pub async fn sync(&self, desired: &Desired, prune: bool) -> Result<SyncReport, ProvisionError> {
        let started = Instant::now();
        let mut report = SyncReport::default();
        let observed = self.observe().await?;

        let mut want: Vec<UserRules> = Vec::new();
        let mut unwanted: BTreeSet<String> = BTreeSet::new();
        let mut known: BTreeSet<&str> = BTreeSet::new();
        let mut quarantined: BTreeSet<&str> = BTreeSet::new();
        for identity in &desired.identities {
            known.insert(&identity.id);
            if !identity.usable {
                unwanted.insert(identity.id.clone());
                continue;
            }
            if identity.role == Role::Device && desired.quarantined.contains(&identity.id) {
                quarantined.insert(&identity.id);
                unwanted.insert(identity.id.clone());
                continue;
            }
            match rules_for(identity) {
                Ok(rules) => want.push(rules),
                Err(reason) => {
                    report.refused.push(Refused {
                        id: identity.id.clone(),
                        reason,
                    });
                    unwanted.insert(identity.id.clone());
                }
            }
        }

        let mut import = Vec::new();
        let mut recreate = Vec::new();
        for rules in want {
            match observed.get(&rules.user) {
                None => {
                    report.created.push(rules.user.clone());
                    import.push(rules);
                }
                Some(o) if o.matches(&rules) => report.unchanged += 1,
                Some(o) => {
                    if o.has_foreign_grants() {
                        recreate.push(rules.user.clone());
                    }
                    report.updated.push(rules.user.clone());
                    import.push(rules);
                }
            }
        }
        // Revocations first: a revoked identity must lose its sessions even
        // if the imports below fail.
        for user in observed.keys() {
            if *user == self.admin_user {
                continue;
            }
            if unwanted.contains(user) {
                if self.delete_user(user).await? {
                    if quarantined.contains(user.as_str()) {
                        report.quarantined.push(user.clone());
                    } else {
                        report.revoked.push(user.clone());
                    }
                }
            } else if !known.contains(user.as_str()) {
                report.drift.push(user.clone());
                if prune && self.delete_user(user).await? {
                    report.pruned.push(user.clone());
                }
            }
        }
        for user in &recreate {
            self.delete_user(user).await?;
        }
        if let Some(shards) = &desired.shards {
            // Bound before any user is made: a new device's first report
            // already has somewhere to go.
            let bound: Vec<&str> = desired
                .identities
                .iter()
                .filter(|i| i.role == Role::Device && !unwanted.contains(&i.id))
                .map(|i| i.id.as_str())
                .chain(quarantined.iter().copied())
                .filter(|id| check_broker_id(id).is_ok())
                .collect();
            self.bind(shards, &bound, &mut report).await?;
        }
        for batch in import.chunks(IMPORT_BATCH) {
            self.api
                .post("/api/definitions", &definitions(batch))
                .await?;
        }
        report.took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(report)
    }

    /// Makes the shard queues and the bindings of the devices in `bound`;
    /// what is already there is left alone. A revoked device's bindings
    /// stay: it has no user, so nothing is routed through them, and the
    /// API's administrator has no permission on queues to remove them (it
    /// manages users only). A quarantined device keeps them for its
    /// release.
    async fn bind(
        &self,
        shards: &ShardQueues,
        bound: &[&str],
        report: &mut SyncReport,
    ) -> Result<(), ProvisionError> {
        let queues = self.api.get("/api/queues?columns=name").await?;
        let existing: BTreeSet<&str> = queues
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|q| q["name"].as_str())
            .collect();
        let missing: Vec<String> = (0..shards.shards)
            .map(|k| shards.queue(k))
            .filter(|q| !existing.contains(q.as_str()))
            .collect();
        if !missing.is_empty() {
            let queues: Vec<Value> = missing
                .iter()
                .map(|q| {
                    json!({
                        "name": q, "vhost": VHOST, "durable": true, "auto_delete": false,
                        "arguments": {"x-queue-type": "quorum", "x-expires": SUBSCRIPTION_TTL_MS},
                    })
                })
                .collect();
            self.api
                .post("/api/definitions", &json!({"queues": queues}))
                .await?;
            report.queues_created = missing;
        }

        let ours: BTreeSet<String> = (0..shards.shards).map(|k| shards.queue(k)).collect();
        let listed = self
            .api
            .get(&format!(
                "/api/exchanges/{}/{}/bindings/source",
                segment(VHOST),
                segment(EXCHANGE)
            ))
            .await?;
        let existing: BTreeSet<(String, String)> = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| Some((b["destination"].as_str()?, b["routing_key"].as_str()?)))
            .filter(|(queue, _)| ours.contains(*queue))
            .map(|(q, k)| (q.to_owned(), k.to_owned()))
            .collect();

        let mut add = Vec::new();
        for device in bound {
            let missing: Vec<(String, String)> = shards
                .bindings(device)
                .into_iter()
                .filter(|b| !existing.contains(b))
                .collect();
            if !missing.is_empty() {
                report.bound.push((*device).to_owned());
                add.extend(missing);
            }
        }
        let per_device = CONTROLLER_LEAVES.len();
        for (i, batch) in add.chunks(BINDING_BATCH).enumerate() {
            if let Some(progress) = &self.progress {
                progress(i * BINDING_BATCH / per_device, add.len() / per_device);
            }
            let bindings: Vec<Value> = batch
                .iter()
                .map(|(queue, key)| {
                    json!({
                        "source": EXCHANGE, "vhost": VHOST, "destination": queue,
                        "destination_type": "queue", "routing_key": key, "arguments": {},
                    })
                })
                .collect();
            self.api
                .post("/api/definitions", &json!({"bindings": bindings}))
                .await?;
        }
        Ok(())
    }

    /// Deletes user `id`, which closes its connections on every node (how a
    /// revocation or a quarantine cuts a live session). `Ok(false)` when
    /// there was no such user.
    pub async fn delete_user(&self, id: &str) -> Result<bool, ProvisionError> {
        Ok(self
            .api
            .delete(&format!("/api/users/{}", segment(id)))
            .await?)
    }

    /// Closes every connection of the users in `ids`, on any node
    /// ([`CLOSES_IN_FLIGHT`] at a time); the
    /// users it closed one of (the API lists a connection only once its
    /// node reported it, so a device can be missing). A device whose subscription RabbitMQ 3.10 stranded
    /// (a binding with no route after a node died, see
    /// `ExternalBroker::unanswered`) reconnects, and its new queue and
    /// binding are whole: a SUBSCRIBE on the same connection would find the
    /// binding recorded and add nothing.
    pub async fn close_connections(
        &self,
        ids: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, ProvisionError> {
        let connections = self.api.get("/api/connections?columns=name,user").await?;
        let targets: Vec<(String, String)> = connections
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["name"].as_str()?, c["user"].as_str()?)))
            .filter(|(_, user)| ids.contains(*user))
            .map(|(name, user)| (name.to_owned(), user.to_owned()))
            .collect();
        // One DELETE at a time took 122 s for 1,551 connections on a loaded
        // cluster (measured), longer than a command's five attempts.
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(CLOSES_IN_FLIGHT));
        let mut calls = tokio::task::JoinSet::new();
        for (name, user) in targets {
            let api = self.api.clone();
            let permits = permits.clone();
            calls.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let path = format!("/api/connections/{}", segment(&name));
                api.delete(&path).await.map(|gone| gone.then_some(user))
            });
        }
        let mut closed = BTreeSet::new();
        let mut failed = None;
        while let Some(call) = calls.join_next().await {
            match call {
                Ok(Ok(Some(user))) => {
                    closed.insert(user);
                }
                Ok(Ok(None)) => {}
                // The others still run: a device closed is a device helped.
                Ok(Err(e)) => failed = Some(e),
                Err(e) => tracing::warn!(error = %e, "a connection close did not finish"),
            }
        }
        match failed {
            Some(e) if closed.is_empty() => Err(e.into()),
            _ => Ok(closed),
        }
    }

    /// How many transient queues are still recorded on a node that is
    /// down. RabbitMQ 3.10 deletes a dead node's transient queues in
    /// batches and only then, all at once, drops their bindings from the
    /// topic exchange's routing table, by queue name and routing key: a
    /// device that re-declared its queue (same name) on a survivor meanwhile
    /// keeps a binding that `list_bindings` shows and nothing routes to
    /// (rabbitmq-server issues 5075, 6271). Until this is 0 (and that last
    /// step is done), a device made to subscribe again can be stranded again.
    /// Whether a node is down or came back lately ([`node_lost_lately`]):
    /// only then can a subscription be stranded (see
    /// [`Provisioner::transient_queues_on_down_nodes`]).
    pub async fn node_lost_lately(&self) -> Result<bool, ProvisionError> {
        let nodes = self
            .api
            .get("/api/nodes?columns=name,running,uptime")
            .await?;
        Ok(node_lost_lately(&nodes))
    }

    pub async fn transient_queues_on_down_nodes(&self) -> Result<usize, ProvisionError> {
        let nodes = self.api.get("/api/nodes?columns=name,running").await?;
        let down: BTreeSet<&str> = nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["running"] != Value::Bool(true))
            .filter_map(|n| n["name"].as_str())
            .collect();
        if down.is_empty() {
            return Ok(0);
        }
        let queues = self
            .api
            .get("/api/queues?columns=name,node,durable")
            .await?;
        Ok(queues
            .as_array()
            .into_iter()
            .flatten()
            .filter(|q| q["durable"] != Value::Bool(true))
            .filter(|q| q["node"].as_str().is_some_and(|n| down.contains(n)))
            .count())
    }

    /// Every user the broker holds, with its grants.
    async fn observe(&self) -> Result<BTreeMap<String, Observed>, ProvisionError> {
        let users = self.api.get("/api/users").await?;
        let permissions = self.api.get("/api/permissions").await?;
        let topic_permissions = self.api.get("/api/topic-permissions").await?;
        let list = |v: &Value, what: &'static str| -> Result<Vec<Value>, ProvisionError> {
            v.as_array()
                .cloned()
                .ok_or_else(|| ProvisionError::Unexpected {
                    what,
                    detail: v.to_string().chars().take(200).collect(),
                })
        };
        let s = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let mut out: BTreeMap<String, Observed> = BTreeMap::new();
        for u in list(&users, "user list")? {
            let tags = match &u["tags"] {
                Value::Array(a) => a.iter().map(s).collect(),
                // Older answers give a comma-separated string.
                Value::String(t) => t
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect(),
                _ => Vec::new(),
            };
            out.insert(
                s(&u["name"]),
                Observed {
                    has_password: !s(&u["password_hash"]).is_empty(),
                    tags,
                    ..Observed::default()
                },
            );
        }
        for p in list(&permissions, "permission list")? {
            if let Some(o) = out.get_mut(&s(&p["user"])) {
                o.permissions.push((
                    s(&p["vhost"]),
                    s(&p["configure"]),
                    s(&p["write"]),
                    s(&p["read"]),
                ));
            }
        }
        for p in list(&topic_permissions, "topic permission list")? {
            if let Some(o) = out.get_mut(&s(&p["user"])) {
                o.topic_permissions.push((
                    s(&p["vhost"]),
                    s(&p["exchange"]),
                    s(&p["write"]),
                    s(&p["read"]),
                ));
            }
        }
        Ok(out)
    }
}

/// The body of `POST /api/definitions` for `users`: no password (an empty
/// hash never matches, so only the certificate logs in), no tags.
fn definitions(users: &[UserRules]) -> Value {
    json!({
        "users": users.iter().map(|u| json!({
            "name": u.user,
            "password_hash": "",
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": [],
        })).collect::<Vec<_>>(),
        "permissions": users.iter().map(|u| json!({
            "user": u.user, "vhost": VHOST,
            "configure": u.configure, "write": u.write, "read": u.read,
        })).collect::<Vec<_>>(),
        "topic_permissions": users.iter().map(|u| json!({
            "user": u.user, "vhost": VHOST, "exchange": EXCHANGE,
            "write": u.topic_write, "read": u.topic_read,
        })).collect::<Vec<_>>(),
    })
}

/// How long after a node came back the controller still takes an
/// unanswered command for a stranded subscription.
pub const NODE_LOSS_WINDOW_MS: u64 = 10 * 60 * 1000;

/// From `/api/nodes` (name, running, uptime in ms): a node is down, or one
/// started again less than [`NODE_LOSS_WINDOW_MS`] ago and over a minute
/// after the longest-running one (nodes started together, as a cluster
/// is, are no loss). Otherwise commands that go unanswered are slow, not
/// stranded, and closing their devices' connections only adds load: at
/// 10,000 devices on 2 cores, 853 such closes in one converge fed its
/// queue declarations past RabbitMQ's 130 s timeout (docs/BENCHMARKS.md).
pub fn node_lost_lately(nodes: &Value) -> bool {
    let nodes = nodes.as_array().map(Vec::as_slice).unwrap_or_default();
    if nodes.iter().any(|n| n["running"] != Value::Bool(true)) {
        return true;
    }
    let uptimes: Vec<u64> = nodes.iter().filter_map(|n| n["uptime"].as_u64()).collect();
    let oldest = uptimes.iter().copied().max().unwrap_or(0);
    uptimes
        .iter()
        .any(|&up| up < NODE_LOSS_WINDOW_MS && oldest.saturating_sub(up) > 60_000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_node_counts_as_lost_while_down_and_for_a_while_after_it_came_back() {
        use super::{node_lost_lately, NODE_LOSS_WINDOW_MS as WINDOW};
        let nodes = |n: &[(bool, u64)]| {
            serde_json::Value::Array(
                n.iter()
                    .map(|(running, uptime)| serde_json::json!({"running": running, "uptime": uptime}))
                    .collect(),
            )
        };
        let hour = 3_600_000;
        assert!(
            !node_lost_lately(&nodes(&[(true, hour); 3])),
            "all up for an hour"
        );
        assert!(
            !node_lost_lately(&nodes(&[(true, 20_000), (true, 15_000), (true, 10_000)])),
            "a cluster started together"
        );
        // The API gives a node that is down no uptime.
        let one_down = serde_json::json!([
            {"running": true, "uptime": hour},
            {"running": false},
            {"running": true, "uptime": hour},
        ]);
        assert!(node_lost_lately(&one_down), "one down");
        assert!(
            node_lost_lately(&nodes(&[(true, hour), (true, 30_000), (true, hour)])),
            "one back 30 s ago"
        );
        assert!(
            !node_lost_lately(&nodes(&[(true, hour), (true, WINDOW + 1), (true, hour)])),
            "one back longer ago than the window"
        );
        assert!(
            !node_lost_lately(&serde_json::json!("not a list")),
            "nothing to go by"
        );
    }

    use super::*;

    fn identity(role: Role, id: &str, org: Option<&str>) -> IssuedIdentity {
        IssuedIdentity {
            id: id.into(),
            role,
            org: org.map(str::to_owned),
            usable: true,
            conflicting_roles: false,
        }
    }

    #[test]
    fn a_device_writes_and_reads_only_its_own_leaves() {
        let r = rules_for(&identity(Role::Device, "lamp-01", None)).unwrap();
        assert_eq!(
            r.topic_write,
            r"^devices\.lamp-01\.(reported|telemetry|acks|csr|presence|fetch)$"
        );
        assert_eq!(r.topic_read, r"^devices\.lamp-01\.(commands|blob)$");
        assert_eq!(
            r.configure,
            r"^(amq\.topic|mqtt-subscription-lamp-01qos[01])$"
        );
    }

    #[test]
    fn an_operator_writes_only_under_its_own_name() {
        let r = rules_for(&identity(Role::Operator, "alice", Some("city"))).unwrap();
        assert_eq!(r.topic_write, r"^fleet\.by\.alice\.(ops|desired)\..+$");
        assert_eq!(
            r.topic_read,
            r"^(fleet\.responses\.alice\..+|fleet\.status)$"
        );
        let scoped = rules_for(&identity(Role::Operator, "bob", Some("lighting-co"))).unwrap();
        assert_eq!(
            scoped.topic_read,
            r"^(fleet\.responses\.bob\..+|fleet\.compliance\.lighting-co)$"
        );
    }

    #[test]
    fn ids_with_a_dot_or_anything_outside_the_safe_set_get_no_user() {
        for bad in ["a.b", "a+b", "a#b", "A", "", "a*b", "a/b", "é"] {
            assert!(
                rules_for(&identity(Role::Device, bad, None)).is_err(),
                "{bad:?} was provisioned"
            );
        }
        assert!(rules_for(&identity(Role::Operator, "ok", Some("bad.org"))).is_err());
    }

    /// Belt and braces behind `check_broker_id`: whatever reaches a
    /// pattern is a literal there.
    #[test]
    fn every_substituted_id_is_a_regex_literal() {
        assert_eq!(regex_literal("a.b"), r"a\.b");
        assert_eq!(regex_literal("a.*|x"), r"a\.\*\|x");
        assert_eq!(key("devices/a.b"), r"devices\.a\.b");
    }
}
