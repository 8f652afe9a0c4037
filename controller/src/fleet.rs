//! The controller's in-memory view of the fleet and the state transitions
//! that events and reconcile actions cause. No I/O: the runtime feeds events
//! in and carries the resulting commands, responses and store writes out.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use cityplane_proto::messages::{
    self, AckStatus, Attributes, DesiredDoc, Presence, Registration, Reported, Response, State,
    Target,
};
use cityplane_proto::topics;
use serde::Serialize;
use serde_json::{json, Value};

use crate::delta::{delta, delta_reported, merge, selects, Layer};
use crate::input::{self, InputLimits, Rejection};
use crate::model::{
    rfc3339, AuditEntry, DeviceRecord, DocRecord, DocVersion, Inflight, Millis, ReleaseRecord,
    ReportedState, DOC_HISTORY,
};
use crate::reconcile::{reconcile, Action, RetryPolicy};
use crate::rollout::{RolloutRecord, Stage};
use crate::store::Changes;

mod governance;
mod incidents;
pub use incidents::{canonical_serial, MAX_INCIDENT_DEVICES};
mod intents;
pub use intents::{IntentKind, DEFAULT_INTENT_KEEP};
mod rollouts;
mod rotation;
pub use governance::{check_scope, ExceptionRecord, Governance, PolicyRecord};
pub use rollouts::Control;
pub use rotation::{rotation_state, SignRequest, Signed};

/// A message for the transport to publish once the changes behind it are durable.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// A command re-sent because the last two copies had no effect within
    /// the timeout while the device was online (not the re-drive of a device
    /// that came back): its subscription may be lost in the broker, which a
    /// transport that can act on the broker repairs
    /// ([`crate::runtime::external::ExternalBroker::unanswered`]).
    pub unanswered: bool,
}

/// Counters for bad input and notable events (exported in `status`).
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Counters {
    pub reports: u64,
    pub stale_reports: u64,
    pub commands_sent: u64,
    pub commands_resent: u64,
    pub drift_corrected: u64,
    pub rejected_inputs: BTreeMap<String, u64>,
}

impl Counters {
    /// Adds `other`'s counts (sharded: another controller's).
    pub fn add(&mut self, other: &Counters) {
        self.reports += other.reports;
        self.stale_reports += other.stale_reports;
        self.commands_sent += other.commands_sent;
        self.commands_resent += other.commands_resent;
        self.drift_corrected += other.drift_corrected;
        for (k, v) in &other.rejected_inputs {
            *self.rejected_inputs.entry(k.clone()).or_default() += v;
        }
    }
}

/// Fleet summary, as published on `fleet/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub total: usize,
    pub online: usize,
    pub converged: usize,
    pub pending: usize,
    pub failed: usize,
    pub drifted: usize,
}

/// Which documents may select which device. A change of a document then
/// recomputes only the devices its old or new target selects, and a device
/// looks only at the documents that list it plus the selector documents.
/// Recomputing every device against every document on each write held the
/// loop ~0.5 s per write at 10,000 devices and 200 documents of 50 ids
/// (`status` p99 1.1 s; benches/apply_load.rs).
#[derive(Default)]
struct DocIndex {
    /// Device id → names of the documents whose `ids` list it.
    by_id: HashMap<String, BTreeSet<String>>,
    /// Names of the documents with a selector (checked against each device).
    selectors: BTreeSet<String>,
}

impl DocIndex {
    fn insert(&mut self, doc: &DocRecord) {
        match &doc.target {
            Target::Ids(list) => {
                for id in &list.ids {
                    self.by_id
                        .entry(id.clone())
                        .or_default()
                        .insert(doc.name.clone());
                }
            }
            Target::Selector(_) => {
                self.selectors.insert(doc.name.clone());
            }
        }
    }

    fn remove(&mut self, doc: &DocRecord) {
        match &doc.target {
            Target::Ids(list) => {
                for id in &list.ids {
                    if let Some(names) = self.by_id.get_mut(id) {
                        names.remove(&doc.name);
                        if names.is_empty() {
                            self.by_id.remove(id);
                        }
                    }
                }
            }
            Target::Selector(_) => {
                self.selectors.remove(&doc.name);
            }
        }
    }
}

/// Who registered a device that was first seen before any registration.
pub const FIRST_CONTACT: &str = "first-contact";
/// Who registered a device read from the PKI's issuance record.
pub const FROM_PKI: &str = "pki";

/// Whether a registration replaces the attributes of a registered device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// A manifest or `devices register`: the operator's word.
    Always,
    /// The PKI import: attributes given at issue only introduce a device.
    Never,
}

/// `devices label`: attributes to set and label keys to remove (an empty
/// `class` or `owner` clears it).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct LabelChange {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub class: Option<String>,
    #[serde(default)]
    pub owner: Option<String>,
}

cityplane_proto::object_only!(LabelChange);

impl LabelChange {
    fn apply_to(&self, attrs: &mut Attributes) {
        for (k, v) in &self.set {
            attrs.labels.insert(k.clone(), v.clone());
        }
        for k in &self.remove {
            attrs.labels.remove(k);
        }
        if let Some(c) = &self.class {
            attrs.class = Some(c.clone()).filter(|c| !c.is_empty());
        }
        if let Some(o) = &self.owner {
            attrs.owner = Some(o.clone()).filter(|o| !o.is_empty());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
            && self.remove.is_empty()
            && self.class.is_none()
            && self.owner.is_none()
    }
}

pub struct Fleet {
    /// Shared with the commit in flight: a record changed while its last
    /// version is being written is copied then (`Arc::make_mut`), not
    /// cloned for every commit.
    pub devices: HashMap<String, Arc<DeviceRecord>>,
    pub docs: BTreeMap<String, DocRecord>,
    index: DocIndex,
    pub seq: u64,
    audit_seq: u64,
    timers: BinaryHeap<Reverse<(Millis, String)>>,
    pub counters: Counters,
    pub policy: RetryPolicy,
    pub limits: InputLimits,
    /// Prefix that makes command ids unique across restarts.
    boot: String,
    next_command: u64,
    /// Devices touched since the last commit.
    dirty: HashSet<String>,
    /// Devices touched since the last reconcile (a subset of what the next
    /// commit writes: with pipelined commits, one commit spans many turns).
    to_reconcile: HashSet<String>,
    pub rollouts: BTreeMap<String, RolloutRecord>,
    /// Published firmware, by version: attached to commands that set it.
    pub releases: BTreeMap<String, ReleaseRecord>,
    /// Rollout records changed since the last commit.
    dirty_rollouts: HashSet<String>,
    /// The organisation of the operator whose request is being handled
    /// (written into audit entries).
    pub acting_org: Option<String>,
    /// Organisations, their policy and compliance (`fleet/governance.rs`).
    pub gov: governance::Governance,
    /// A quarantine, release or rotation changed what the broker must
    /// refuse ([`Fleet::pin_table`]).
    pub pins_dirty: bool,
    /// The runtime can sign CSRs (it holds the CA): rotations may run.
    pub can_sign: bool,
    /// The broker says which certificate (serial) each device's session
    /// uses: our edge does; RabbitMQ and mosquitto do not (a device's own
    /// presence carries none). Only that confirms a rotated device, so
    /// without it rotations are refused ([`Fleet::cannot_rotate`]).
    pub sees_session_serials: bool,
    /// Devices with a certificate rotation under way.
    rotating: HashSet<String>,
    sign_queue: Vec<rotation::SignRequest>,
    revoke_queue: Vec<String>,
    deliveries: Vec<Outgoing>,
    /// Makes devices' secrets for secret rotations (`crate::secrets`); none:
    /// such a rollout admits nobody.
    pub secrets: Option<Arc<dyn crate::secrets::Minter>>,
    /// Sharded (docs/DESIGN-SHARDING.md): the shards this controller
    /// holds. It writes only their devices; the others' records are
    /// read-only copies of the store's ([`Fleet::follow_devices`]), kept
    /// for queries. `None`: every device is this controller's.
    pub owner: Option<crate::shard::Ownership>,
    /// Sharded: the operator intents the store keeps, by number
    /// ([`Fleet::take_intents`]), and the highest number ever given.
    intents: BTreeMap<u64, Arc<crate::model::IntentRecord>>,
    intent_last: u64,
    /// Writes the global records (rollouts' waves and aborts): always,
    /// but sharded only while it holds the leader's lease.
    pub leading: bool,
}

impl Fleet {
    pub fn new(
        docs: Vec<DocRecord>,
        devices: Vec<DeviceRecord>,
        seq: u64,
        audit_len: u64,
        policy: RetryPolicy,
        limits: InputLimits,
        boot: String,
    ) -> Fleet {
        let mut fleet = Fleet {
            devices: devices
                .into_iter()
                .map(|d| (d.id.clone(), Arc::new(d)))
                .collect(),
            index: DocIndex::default(),
            docs: docs.into_iter().map(|d| (d.name.clone(), d)).collect(),
            seq,
            audit_seq: audit_len,
            timers: BinaryHeap::new(),
            counters: Counters::default(),
            policy,
            limits,
            boot,
            next_command: 0,
            dirty: HashSet::new(),
            to_reconcile: HashSet::new(),
            rollouts: BTreeMap::new(),
            releases: BTreeMap::new(),
            dirty_rollouts: HashSet::new(),
            acting_org: None,
            gov: governance::Governance::default(),
            pins_dirty: false,
            can_sign: false,
            sees_session_serials: true,
            rotating: HashSet::new(),
            sign_queue: Vec::new(),
            revoke_queue: Vec::new(),
            deliveries: Vec::new(),
            secrets: None,
            owner: None,
            intents: BTreeMap::new(),
            intent_last: 0,
            leading: true,
        };
        fleet.rotating = fleet
            .devices
            .values()
            .filter(|d| d.cert_rotation.is_some())
            .map(|d| d.id.clone())
            .collect();
        // A document may have been committed just before a crash, before the
        // device records it changes: derive desired state again from the
        // stored documents so every acknowledged write takes effect.
        for doc in fleet.docs.values() {
            fleet.index.insert(doc);
        }
        let ids: Vec<String> = fleet.devices.keys().cloned().collect();
        fleet.recompute_desired(ids);
        fleet
    }

    /// Forgets who is online, for a controller whose broker starts with it
    /// (`serve`): every session ended with the last process, so nobody is
    /// online until they say so; in-flight commands stay and are re-sent
    /// (same id) when they return. Not for an external broker: its devices
    /// stay connected while a controller restarts or a standby takes over,
    /// and say nothing new, and every presence change meanwhile waits in the
    /// controller's persistent session, so the stored state is the truth.
    pub fn forget_presence(&mut self) {
        for d in self.devices.values_mut() {
            Arc::make_mut(d).online = false;
        }
    }

    /// A fleet of `devices` with default policies and no documents (unit tests).
    #[cfg(test)]
    pub(crate) fn for_tests(devices: Vec<DeviceRecord>) -> Fleet {
        Fleet::new(
            Vec::new(),
            devices,
            0,
            0,
            RetryPolicy::default(),
            InputLimits::default(),
            "test".into(),
        )
    }

    fn reject(&mut self, what: &str, rejection: &Rejection) {
        *self
            .counters
            .rejected_inputs
            .entry(format!("{what}:{}", rejection.code))
            .or_default() += 1;
    }

    /// A message from a device the edge found no certificate for: counted
    /// and dropped.
    pub fn refuse_unknown_device(&mut self, id: &str, leaf: &str) {
        let r = Rejection::new(
            "unknown_device",
            format!("no certificate for device {id:?}"),
        );
        tracing::warn!(device = id, leaf, %r, "device message refused");
        self.reject(leaf, &r);
    }

    /// A message from a device topic (the ACL guarantees it is that device).
    pub fn on_device_message(&mut self, id: &str, leaf: &str, payload: &[u8], now: Millis) {
        if !self.owns(id) {
            // From a shard session of a shard just given up: its new
            // owner gets it again from the broker (the loop does not
            // acknowledge it).
            return;
        }
        if self.devices.get(id).is_some_and(|d| d.quarantine.is_some()) {
            // Sent before the broker cut it off (still in the router's
            // queues): a quarantined device has no say, not even "online".
            self.reject(
                leaf,
                &Rejection::new("quarantined", format!("device {id:?} is quarantined")),
            );
            return;
        }
        let result =
            match leaf {
                "reported" => input::parse::<Reported>(payload, self.limits)
                    .map(|r| self.on_reported(id, r, now)),
                "acks" => input::parse::<messages::Ack>(payload, self.limits)
                    .map(|a| self.on_ack(id, a, now)),
                "presence" => input::parse::<Presence>(payload, self.limits)
                    .map(|p| self.on_presence(id, p, now)),
                "csr" => input::parse::<messages::CsrRequest>(payload, self.limits)
                    .and_then(|c| self.on_csr(id, c, now)),
                _ => Ok(()),
            };
        if let Err(r) = result {
            tracing::warn!(device = id, leaf, %r, "device message refused");
            self.reject(leaf, &r);
        }
    }

    /// The device's record. A certificate the registry did not know yet
    /// (issued after the last import, or by a CA directory this server does
    /// not read) is registered at first contact, without attributes, and
    /// gets what the documents that select it want at once.
    fn device(&mut self, id: &str, now: Millis) -> &mut DeviceRecord {
        if !self.devices.contains_key(id) {
            let mut dev = DeviceRecord::new(id);
            dev.registered_at = now;
            dev.registered_by = FIRST_CONTACT.to_owned();
            self.devices.insert(id.to_owned(), Arc::new(dev));
            self.gov.scopes_dirty = true;
            self.recompute_desired([id.to_owned()]);
        }
        let dev = self.devices.get_mut(id).expect("inserted above");
        Arc::make_mut(dev)
    }

    fn on_reported(&mut self, id: &str, report: Reported, now: Millis) {
        self.counters.reports += 1;
        let dev = self.device(id, now);
        if report.version <= dev.reported_version {
            self.counters.stale_reports += 1;
            return;
        }
        let was_in_sync = dev.reported_version > 0
            && dev.inflight.is_none()
            && dev.converged_generation == dev.desired_generation
            && delta_reported(&dev.desired, &dev.reported).is_empty();
        // What the device says of its class or labels is reported state
        // only: the registry's attributes decide which documents select it.
        dev.reported = ReportedState::new(&report.state);
        dev.reported_version = report.version;
        dev.last_seen = now;
        dev.online = true;
        let drifted = was_in_sync && !delta(&dev.desired, &report.state).is_empty();
        if drifted {
            dev.drift_count += 1;
            self.counters.drift_corrected += 1;
            tracing::info!(device = id, "drift: reported state moved away from desired");
        }
        self.touch(id);
        self.evaluate_with(id, now, Some(&report.state));
    }

    fn on_ack(&mut self, id: &str, ack: messages::Ack, now: Millis) {
        let dev = self.device(id, now);
        dev.last_seen = now;
        let Some(cmd) = dev.inflight.as_ref().filter(|c| c.id == ack.id) else {
            return; // an ack for an old or unknown command changes nothing
        };
        let generation = cmd.generation;
        match ack.status {
            AckStatus::Applied => dev.log_command(&ack.id, generation, now, "applied"),
            AckStatus::Rejected => {
                let reason = ack
                    .reason
                    .unwrap_or_else(|| "rejected by the device".into());
                dev.log_command(&ack.id, generation, now, format!("rejected: {reason}"));
                dev.failed = Some(format!("device rejected command {}: {reason}", ack.id));
                dev.inflight = None;
            }
        }
        self.touch(id);
    }

    fn on_presence(&mut self, id: &str, presence: Presence, now: Millis) {
        let dev = self.device(id, now);
        dev.last_seen = now;
        if presence.online && !dev.online {
            dev.connects += 1;
        }
        // Every online presence starts a session, also when no offline one
        // ended the last: no will comes for a connection on a node that
        // died, nor (measured on RabbitMQ 3.10) for one the broker closed
        // itself, as `controller --cluster-dir` does to a stranded
        // subscription.
        if presence.online {
            // Back online (or rebooted): re-drive anything that failed, and
            // re-send what was in flight now (same id: a device that already
            // applied it ignores the copy) instead of waiting for a timeout.
            dev.failed = None;
            if let Some(cmd) = dev.inflight.as_mut() {
                cmd.attempt = 0;
                cmd.sent_at = 0;
            }
        }
        dev.online = presence.online;
        if let Some(serial) = presence.serial.as_deref().filter(|_| presence.online) {
            self.on_session_serial(id, serial);
        }
        self.touch(id);
    }

    /// Whether this controller writes `id`'s record (see [`Fleet::owner`]).
    pub fn owns(&self, id: &str) -> bool {
        self.owner.as_ref().is_none_or(|o| o.owns(id))
    }

    /// Becomes one of several sharded controllers, holding no shard yet:
    /// nothing of another's devices is reconciled or written from now on.
    pub fn shard(&mut self, shards: u32) {
        self.owner = Some(crate::shard::Ownership::none_of(shards));
        self.leading = false;
        self.forget_what_is_not_owned();
    }

    fn forget_what_is_not_owned(&mut self) {
        let Some(owner) = &self.owner else {
            return;
        };
        self.dirty.retain(|id| owner.owns(id));
        self.to_reconcile.retain(|id| owner.owns(id));
    }

    /// Takes the store's records of devices this controller does not
    /// write: another controller's (read-only copies, for queries), or
    /// of shards it is about to take (then the previous owner's last
    /// word, before it acts on them). Its own devices' records are newer
    /// here than in the store, or the same.
    pub fn follow_devices(&mut self, stored: Vec<DeviceRecord>) {
        for record in stored {
            if self.owns(&record.id) {
                continue;
            }
            // Generations handed out by another owner stay behind this
            // one's sequence, should these devices become its own.
            self.seq = self.seq.max(record.desired_generation);
            if record.cert_rotation.is_some() {
                self.rotating.insert(record.id.clone());
            } else {
                self.rotating.remove(&record.id);
            }
            let mut record = record;
            self.overlay_intents(&mut record);
            // What the broker enforces follows the owners' incidents.
            let pins = |d: &DeviceRecord| (d.quarantine.is_some(), d.cert_pin.clone());
            let before = self
                .devices
                .get(&record.id)
                .map_or((false, Vec::new()), |d| pins(d));
            if before != pins(&record) {
                self.pins_dirty = true;
            }
            self.devices.insert(record.id.clone(), Arc::new(record));
        }
    }

    /// Holds exactly `held` from now on (sharded only). Devices of shards
    /// given up or lost are no longer written: what they had pending here
    /// is dropped, since their new owner starts from the store (and the
    /// broker hands it whatever was not acknowledged). Devices of shards
    /// gained get the documents' desired state and are reconciled: a
    /// command the last owner left in flight is re-sent under its own id
    /// when its timer is due. Call [`Fleet::follow_devices`] with the
    /// store's records first. Returns the shards gained.
    pub fn hold_shards(&mut self, held: BTreeSet<u32>) -> BTreeSet<u32> {
        let Some(owner) = self.owner.as_mut() else {
            return BTreeSet::new();
        };
        let gained = owner.hold(held);
        let shards = owner.shards();
        self.forget_what_is_not_owned();
        if gained.is_empty() {
            return gained;
        }
        let ids: Vec<String> = self
            .devices
            .keys()
            .filter(|id| gained.contains(&crate::shard::shard_of(id, shards)))
            .cloned()
            .collect();
        // Intents their last owner had not applied yet.
        self.reapply_intents();
        self.recompute_desired(ids.iter().cloned());
        self.to_reconcile.extend(ids);
        gained
    }

    fn touch(&mut self, id: &str) {
        if !self.to_reconcile.contains(id) {
            self.to_reconcile.insert(id.to_owned());
        }
    }

    /// Recomputes the effective desired state of these devices, bumping
    /// the generation of each whose state changed.
    fn recompute_desired(&mut self, ids: impl IntoIterator<Item = String>) -> usize {
        let mut changed = 0;
        for id in ids {
            let Some(dev) = self.devices.get(&id).filter(|_| self.owns(&id)) else {
                continue;
            };
            // A quarantined device is cut off: nothing is desired of it
            // until it is released (then all of it again).
            let cut_off = dev.quarantine.is_some();
            let listed = self.index.by_id.get(&id).into_iter().flatten();
            let selecting = self.index.selectors.iter().filter(|name| {
                self.docs
                    .get(*name)
                    .is_some_and(|d| selects(&d.target, &dev.id, &dev.attrs))
            });
            // A document reaches only devices its author's organisation sees.
            let layers = listed
                .chain(selecting)
                .filter_map(|name| self.docs.get(name))
                .filter(|d| self.org_sees(d.org.as_deref(), dev))
                .map(DocRecord::layer);
            // A rollout is a layer of the devices it admitted; a rollback
            // is the lowest layer, so any document setting the key wins.
            let rollout_layers = dev.rollouts.iter().filter_map(|(name, entry)| {
                let r = self.rollouts.get(name)?;
                if !self.org_sees(r.org.as_deref(), dev) {
                    return None;
                }
                match entry.stage {
                    Stage::Admitted => Some(Layer {
                        priority: r.spec.priority,
                        seq: r.seq,
                        state: entry.patch(r),
                    }),
                    Stage::RolledBack => Some(Layer {
                        priority: i64::MIN,
                        seq: r.seq,
                        state: &entry.previous,
                    }),
                    Stage::Queued | Stage::Cancelled => None,
                }
            });
            let desired = if cut_off {
                State::new()
            } else {
                merge(layers.chain(rollout_layers))
            };
            if desired != dev.desired {
                self.seq += 1;
                let seq = self.seq;
                if let Some(dev) = self.devices.get_mut(&id).map(Arc::make_mut) {
                    dev.desired = desired;
                    dev.desired_generation = seq;
                    dev.failed = None;
                }
                self.to_reconcile.insert(id);
                changed += 1;
            }
        }
        changed
    }

    /// Validates and applies an operator's desired document. Returns the
    /// changes to commit, the response, and whether it was accepted.
    pub fn on_desired(
        &mut self,
        who: &str,
        topic: &str,
        payload: &[u8],
        now: Millis,
    ) -> (Outgoing, Result<DocRecord, Rejection>) {
        let topic_name = topics::desired_name(topic).unwrap_or_default().to_owned();
        let parsed = input::parse::<DesiredDoc>(payload, self.limits).map_err(|mut r| {
            if r.reason.contains("untagged enum Target") {
                r = Rejection::new(
                    "bad_target",
                    r#"target must be {"ids": [...]} or a selector with any of "class", "labels", "id_prefix", "all""#,
                );
            }
            r
        });
        // Even a document we refuse gets its answer where the operator waits.
        let request_id = request_id_of(payload).unwrap_or_else(|| topic_name.clone());
        let result = parsed.and_then(|doc| self.check_doc(&topic_name, doc));
        let result = result.map(|doc| {
            self.seq += 1;
            let previous = self.docs.get(&doc.name);
            let generation = previous.map_or(0, |d| d.generation) + 1;
            let mut history = previous.map(|d| d.history.clone()).unwrap_or_default();
            if let Some(p) = previous {
                history.push(DocVersion {
                    generation: p.generation,
                    author: p.author.clone(),
                    written_at: p.written_at,
                    priority: p.priority,
                    target: p.target.clone(),
                });
                let excess = history.len().saturating_sub(DOC_HISTORY);
                history.drain(..excess);
            }
            DocRecord {
                name: doc.name,
                target: doc.target,
                priority: doc.priority,
                state: doc.state,
                generation,
                seq: self.seq,
                author: who.to_owned(),
                org: None,
                written_at: now,
                history,
            }
        });
        if let Err(r) = &result {
            tracing::warn!(operator = who, topic, %r, "desired state refused");
            self.reject("desired", r);
        }
        let response = match &result {
            Ok(doc) => Response::Accepted {
                request_id,
                name: doc.name.clone(),
                generation: doc.generation,
                devices: self.targeted(&doc.target).len(),
            },
            Err(r) => r.response(request_id),
        };
        (response_to(who, &response), result)
    }

    fn check_doc(&self, topic_name: &str, doc: DesiredDoc) -> Result<DesiredDoc, Rejection> {
        cityplane_proto::validate_id(&doc.name)
            .map_err(|e| Rejection::new("bad_name", format!("name: {e}")))?;
        if doc.name != topic_name {
            return Err(Rejection::new(
                "bad_name",
                format!(
                    "document name {:?} must equal the topic after fleet/desired/, {topic_name:?}",
                    doc.name
                ),
            ));
        }
        match &doc.target {
            Target::Ids(list) if list.ids.is_empty() => {
                return Err(Rejection::new("bad_target", "target.ids is empty"));
            }
            Target::Ids(list) => {
                for id in &list.ids {
                    cityplane_proto::validate_id(id)
                        .map_err(|e| Rejection::new("bad_target", e.to_string()))?;
                }
            }
            Target::Selector(sel) if sel.is_empty() => {
                return Err(Rejection::new(
                    "bad_target",
                    r#"empty selector; to target the whole fleet say {"all": true}"#,
                ));
            }
            Target::Selector(_) => {}
        }
        let stored = self.docs.get(&doc.name).map_or(0, |d| d.generation);
        if let Some(want) = doc.if_generation {
            if want != stored {
                return Err(Rejection::new(
                    "conflict",
                    format!(
                        "if_generation is {want} but the stored generation of {:?} is {stored}",
                        doc.name
                    ),
                ));
            }
        }
        Ok(doc)
    }

    /// Applies an accepted (and already durable) document.
    /// Only the devices the old or the new target selects can change.
    pub fn apply_doc(&mut self, doc: DocRecord) -> usize {
        let mut affected: HashSet<String> = self.targeted_ids(&doc.target);
        if let Some(old) = self.docs.remove(&doc.name) {
            affected.extend(self.targeted_ids(&old.target));
            self.index.remove(&old);
        }
        self.index.insert(&doc);
        self.docs.insert(doc.name.clone(), doc);
        self.recompute_desired(affected)
    }

    /// Follows the documents as the store holds them, written by another
    /// controller (sharded: the leader writes documents, each shard's
    /// owner follows them for its own devices): applies those that are new
    /// or changed, removes those gone. Returns how many devices' desired
    /// state changed.
    ///
    /// The fleet's sequence first moves past every stored document's, so
    /// a device whose desired state changes now gets a generation past the
    /// document's: "converged for this document" (`desired_generation >=
    /// doc.seq`) means the same whichever controller computed it.
    pub fn follow_docs(&mut self, stored: Vec<DocRecord>) -> usize {
        self.seq = stored.iter().map(|d| d.seq).fold(self.seq, u64::max);
        let stored_names: HashSet<&str> = stored.iter().map(|d| d.name.as_str()).collect();
        let gone: Vec<String> = self
            .docs
            .keys()
            .filter(|n| !stored_names.contains(n.as_str()))
            .cloned()
            .collect();
        let mut changed = 0;
        for name in gone {
            changed += self.delete_doc(&name).map_or(0, |(_, n)| n);
        }
        for doc in stored {
            let known = self.docs.get(&doc.name).map(|d| (d.generation, d.seq));
            if known != Some((doc.generation, doc.seq)) {
                changed += self.apply_doc(doc);
            }
        }
        changed
    }

    /// Registers devices or updates their attributes (a manifest, an
    /// import). With `Overwrite::Never`, ids already registered keep the
    /// attributes the registry holds: the PKI introduces a device, operators
    /// own its attributes afterwards. Returns (new, updated).
    pub fn register(
        &mut self,
        entries: &[Registration],
        who: &str,
        overwrite: Overwrite,
        now: Millis,
    ) -> (usize, usize) {
        let records = self.registered_records(entries, who, overwrite, now);
        self.apply_registry(records)
    }

    /// The records [`Fleet::register`] writes, for the commit that precedes
    /// it: new devices, and registered ones whose attributes or registrar
    /// change (a device first seen before it was registered takes the
    /// manifest's attributes, nobody set any yet).
    pub fn registered_records(
        &self,
        entries: &[Registration],
        who: &str,
        overwrite: Overwrite,
        now: Millis,
    ) -> Vec<Arc<DeviceRecord>> {
        entries
            .iter()
            .filter_map(|e| {
                let attrs = e.attributes();
                let Some(dev) = self.devices.get(&e.id) else {
                    let mut dev = DeviceRecord::new(&e.id);
                    dev.attrs = attrs;
                    dev.registered_at = now;
                    dev.registered_by = who.to_owned();
                    return Some(Arc::new(dev));
                };
                let unset = dev.registered_by == FIRST_CONTACT;
                let new_attrs = (overwrite == Overwrite::Always || unset) && dev.attrs != attrs;
                (new_attrs || unset).then(|| {
                    let mut dev = (**dev).clone();
                    if new_attrs {
                        dev.attrs = attrs;
                    }
                    if unset {
                        dev.registered_by = who.to_owned();
                    }
                    Arc::new(dev)
                })
            })
            .collect()
    }

    /// Changes the attributes of these devices; returns how many changed.
    #[cfg(test)]
    fn label(&mut self, ids: &[String], change: &LabelChange) -> usize {
        let records = self.labelled_records(ids, change);
        self.apply_registry(records).1
    }

    /// The records [`Fleet::label`] writes, for the commit before it.
    pub fn labelled_records(&self, ids: &[String], change: &LabelChange) -> Vec<Arc<DeviceRecord>> {
        ids.iter()
            .filter_map(|id| self.devices.get(id))
            .filter_map(|dev| {
                let mut attrs = dev.attrs.clone();
                change.apply_to(&mut attrs);
                (attrs != dev.attrs).then(|| {
                    let mut dev = (**dev).clone();
                    dev.attrs = attrs;
                    Arc::new(dev)
                })
            })
            .collect()
    }

    /// Takes the registry fields (attributes, registrar) of `records` made
    /// by [`Fleet::registered_records`] or [`Fleet::labelled_records`], adds
    /// the new devices, and recomputes desired state where attributes
    /// changed. Returns (new devices, devices whose attributes changed).
    pub fn apply_registry(&mut self, records: Vec<Arc<DeviceRecord>>) -> (usize, usize) {
        let (mut new, mut updated) = (0, 0);
        let mut changed = Vec::new();
        for record in records {
            let id = record.id.clone();
            if !self.owns(&id) {
                continue;
            }
            match self.devices.get_mut(&id).map(Arc::make_mut) {
                Some(dev) => {
                    if dev.attrs != record.attrs {
                        dev.attrs = record.attrs.clone();
                        updated += 1;
                        changed.push(id.clone());
                    }
                    dev.registered_by = record.registered_by.clone();
                    dev.intent_seq = dev.intent_seq.max(record.intent_seq);
                }
                None => {
                    self.devices.insert(id.clone(), record);
                    self.to_reconcile.insert(id.clone());
                    new += 1;
                    changed.push(id.clone());
                }
            }
            self.dirty.insert(id);
        }
        if !changed.is_empty() {
            self.gov.scopes_dirty = true;
        }
        self.recompute_desired(changed.iter().cloned());
        // Attributes decide which rules apply. Their clock is the last
        // report's: a registry change is not a reason to judge time rules.
        for id in &changed {
            let at = self.devices.get(id).map_or(0, |d| d.last_seen);
            self.evaluate(id, at);
        }
        (new, updated)
    }

    /// Marks exactly `revoked` (device ids) as revoked among the devices
    /// the registry holds.
    pub fn set_revoked(&mut self, revoked: &HashSet<String>) {
        for (id, dev) in self.devices.iter_mut() {
            if !self.owner.as_ref().is_none_or(|o| o.owns(id)) {
                continue;
            }
            let now_revoked = revoked.contains(id);
            if dev.revoked != now_revoked {
                Arc::make_mut(dev).revoked = now_revoked;
                self.dirty.insert(id.clone());
            }
        }
    }

    /// Removes a stored document (already durable). The keys it set leave
    /// the desired state of the devices it targeted, unless another
    /// document sets them; devices keep the values they hold.
    pub fn delete_doc(&mut self, name: &str) -> Option<(DocRecord, usize)> {
        let old = self.docs.remove(name)?;
        let affected = self.targeted_ids(&old.target);
        self.index.remove(&old);
        let changed = self.recompute_desired(affected);
        Some((old, changed))
    }

    /// What applying `doc` would do, without doing it: the devices it
    /// targets, how many of them would get another desired state, and per
    /// key how many devices would change. Refusals are a real apply's.
    pub fn dry_run(&self, who: &str, payload: &[u8]) -> Result<Value, Rejection> {
        let doc = input::parse::<DesiredDoc>(payload, self.limits)?;
        let name = doc.name.clone();
        let doc = self.check_doc(&name, doc)?;
        let generation = self.docs.get(&doc.name).map_or(0, |d| d.generation) + 1;
        let probe = DocRecord {
            name: doc.name.clone(),
            target: doc.target.clone(),
            priority: doc.priority,
            state: doc.state.clone(),
            generation,
            seq: self.seq + 1,
            author: who.to_owned(),
            org: None,
            written_at: 0,
            history: Vec::new(),
        };
        let mut affected = self.targeted_ids(&doc.target);
        if let Some(old) = self.docs.get(&doc.name) {
            affected.extend(self.targeted_ids(&old.target));
        }
        let mut changing = 0usize;
        let mut keys: BTreeMap<String, usize> = BTreeMap::new();
        for id in &affected {
            let Some(dev) = self.devices.get(id) else {
                continue;
            };
            let layers = self
                .docs
                .values()
                .filter(|d| d.name != probe.name)
                .chain(std::iter::once(&probe))
                .filter(|d| selects(&d.target, id, &dev.attrs))
                .map(DocRecord::layer);
            let after = merge(layers);
            if after != dev.desired {
                changing += 1;
                let differing: BTreeSet<&String> = after
                    .keys()
                    .chain(dev.desired.keys())
                    .filter(|k| after.get(*k) != dev.desired.get(*k))
                    .collect();
                for key in differing {
                    *keys.entry(key.clone()).or_default() += 1;
                }
            }
        }
        Ok(json!({
            "name": doc.name, "generation": generation,
            "devices": self.targeted(&doc.target).len(),
            "changing": changing, "keys": keys,
        }))
    }

    /// Audit entries go on after `last` (the store's head, for a
    /// controller that takes over writing the log).
    pub fn audit_after(&mut self, last: u64) {
        self.audit_seq = self.audit_seq.max(last);
    }

    pub fn audit_entry(
        &mut self,
        who: &str,
        action: &str,
        name: &str,
        result: &str,
        now: Millis,
    ) -> AuditEntry {
        self.audit_seq += 1;
        AuditEntry {
            seq: self.audit_seq,
            at: rfc3339(now),
            who: who.to_owned(),
            action: action.to_owned(),
            name: name.to_owned(),
            result: result.to_owned(),
            org: self.acting_org.clone(),
            devices: Vec::new(),
            prev: String::new(),
            hash: String::new(),
        }
    }

    /// The known devices `target` selects (each once), quarantined ones
    /// left out: no document or rollout reaches them.
    pub fn targeted(&self, target: &Target) -> Vec<&DeviceRecord> {
        self.selected(target, false)
    }

    /// The known devices `target` names (each once), quarantined ones too
    /// if `with_quarantined`.
    pub(crate) fn selected(&self, target: &Target, with_quarantined: bool) -> Vec<&DeviceRecord> {
        let keep = |d: &&DeviceRecord| with_quarantined || d.quarantine.is_none();
        match target {
            // Looked up, not a scan of the fleet against the list.
            Target::Ids(list) => {
                let mut seen = HashSet::new();
                list.ids
                    .iter()
                    .filter(|id| seen.insert(id.as_str()))
                    .filter_map(|id| self.devices.get(id))
                    .map(|d| &**d)
                    .filter(keep)
                    .collect()
            }
            Target::Selector(_) => self
                .devices
                .values()
                .map(|d| &**d)
                .filter(|d| keep(d) && selects(target, &d.id, &d.attrs))
                .collect(),
        }
    }

    fn targeted_ids(&self, target: &Target) -> HashSet<String> {
        self.targeted(target)
            .into_iter()
            .map(|d| d.id.clone())
            .collect()
    }

    /// Reconciles every device touched since the last call and every device
    /// whose timer is due; each is written by the next commit.
    /// Returns the commands to send after the commit.
    pub fn reconcile_due(&mut self, now: Millis) -> Vec<Outgoing> {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, id))) = self.timers.pop() {
                self.to_reconcile.insert(id);
            }
        }
        let ids = std::mem::take(&mut self.to_reconcile);
        let mut out = Vec::new();
        for id in ids {
            // A timer set before its shard went to another controller.
            if !self.owns(&id) {
                continue;
            }
            self.reconcile_one(&id, now, &mut out);
            self.dirty.insert(id);
        }
        out
    }

    fn reconcile_one(&mut self, id: &str, now: Millis, out: &mut Vec<Outgoing>) {
        let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        match reconcile(dev, now, &self.policy) {
            Action::InSync => {
                if let Some(cmd) = dev.inflight.take() {
                    dev.log_command(&cmd.id, cmd.generation, now, "converged");
                }
                dev.converged_generation = dev.desired_generation;
                dev.failed = None;
            }
            Action::Idle => {}
            Action::Send { state } => {
                self.next_command += 1;
                let cmd = Inflight {
                    id: format!("c-{}-{}", self.boot, self.next_command),
                    generation: dev.desired_generation,
                    state,
                    sent_at: now,
                    attempt: 1,
                };
                dev.log_command(&cmd.id, cmd.generation, now, "sent");
                out.push(command_message(id, &cmd, &self.releases));
                self.timers.push(Reverse((
                    now + self.policy.command_timeout.as_millis() as u64,
                    id.to_owned(),
                )));
                dev.inflight = Some(cmd);
                self.counters.commands_sent += 1;
            }
            Action::Resend => {
                if let Some(cmd) = dev.inflight.as_mut() {
                    cmd.attempt += 1;
                    cmd.sent_at = now;
                    let (cid, generation, attempt) = (cmd.id.clone(), cmd.generation, cmd.attempt);
                    let mut message = command_message(id, cmd, &self.releases);
                    // A re-drive after presence came back starts again at
                    // attempt 1: only timeouts get past it. The first re-send
                    // is not flagged: it recovers a copy lost with the
                    // controller's own connection (a broker node died under
                    // it), which is no sign of the device's subscription.
                    message.unanswered = attempt >= 3;
                    out.push(message);
                    dev.log_command(
                        &cid,
                        generation,
                        now,
                        format!("re-sent (attempt {attempt})"),
                    );
                    self.timers.push(Reverse((
                        now + self.policy.command_timeout.as_millis() as u64,
                        id.to_owned(),
                    )));
                    self.counters.commands_resent += 1;
                }
            }
            Action::WaitUntil(at) => self.timers.push(Reverse((at, id.to_owned()))),
            Action::Fail { reason } => {
                tracing::warn!(device = id, %reason, "device marked Failed");
                dev.failed = Some(reason);
            }
        }
        update_conditions(dev, now);
    }

    /// Device records changed since the last call, for the commit.
    pub fn take_dirty(&mut self) -> Vec<Arc<DeviceRecord>> {
        let owner = self.owner.as_ref();
        let mut foreign = 0;
        let taken = self
            .dirty
            .drain()
            .filter(|id| {
                let owned = owner.is_none_or(|o| o.owns(id));
                foreign += usize::from(!owned);
                owned
            })
            .filter_map(|id| self.devices.get(&id).cloned())
            .collect();
        if foreign > 0 {
            // A commit with them would be refused whole (`NotHeld`).
            tracing::warn!(
                devices = foreign,
                "changes to devices of shards this controller does not hold were not written"
            );
        }
        taken
    }

    /// The commands to `devices` were not sent (their commit failed): a copy
    /// that never left must not count as an attempt, or a storage outage
    /// longer than every retry would mark devices Failed that were never
    /// asked. The first copy stays counted (attempts start at 1); its
    /// re-send is the first to leave.
    pub fn commands_not_sent<'a>(&mut self, devices: impl IntoIterator<Item = &'a str>) {
        for id in devices {
            if let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) {
                if let Some(cmd) = dev.inflight.as_mut() {
                    cmd.attempt = cmd.attempt.saturating_sub(1).max(1);
                    self.dirty.insert(id.to_owned());
                }
            }
        }
    }

    /// Marks records whose commit failed, so the next commit writes them.
    pub fn mark_dirty(&mut self, ids: impl IntoIterator<Item = String>) {
        let owner = self.owner.as_ref();
        // A commit that failed because its shard was lost meanwhile.
        self.dirty.extend(
            ids.into_iter()
                .filter(|id| owner.is_none_or(|o| o.owns(id))),
        );
    }

    /// Marks devices for the next reconcile (e.g. all of them after a restart).
    pub fn reconcile_later(&mut self, ids: impl IntoIterator<Item = String>) {
        self.to_reconcile.extend(ids);
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    pub fn next_timer(&self) -> Option<Millis> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    pub fn summary_of<'a>(devices: impl Iterator<Item = &'a DeviceRecord>) -> Summary {
        let mut s = Summary::default();
        for d in devices {
            s.total += 1;
            s.online += usize::from(d.online);
            if d.failed.is_some() {
                s.failed += 1;
            } else if d.is_converged() {
                s.converged += 1;
            } else {
                s.pending += 1;
            }
            s.drifted += usize::from(d.drift_count > 0);
        }
        s
    }

    pub fn summary(&self) -> Summary {
        Fleet::summary_of(self.devices.values().map(|d| &**d))
    }

    /// Builds the commit for an accepted document plus its audit line.
    pub fn doc_changes(&self, doc: &DocRecord, audit: AuditEntry) -> Changes {
        Changes {
            docs: vec![doc.clone()],
            audit: vec![audit],
            seq: Some(self.seq),
            ..Default::default()
        }
    }
}

fn update_conditions(dev: &mut DeviceRecord, now: Millis) {
    let online = dev.online;
    dev.set_condition(
        "Online",
        online,
        if online { "Connected" } else { "Disconnected" },
        "",
        now,
    );
    let converged = dev.is_converged();
    let (reason, message) = match (&dev.failed, converged, &dev.inflight) {
        (_, true, _) => ("InSync", String::new()),
        (Some(f), false, _) => ("Failed", f.clone()),
        (None, false, Some(c)) => (
            "CommandInFlight",
            format!("command {} attempt {}", c.id, c.attempt),
        ),
        (None, false, None) if !online => {
            ("Offline", "waiting for the device to come back".to_owned())
        }
        (None, false, None) => ("Pending", String::new()),
    };
    dev.set_condition("Converged", converged, reason, &message, now);
    let failed = dev.failed.clone();
    dev.set_condition(
        "Failed",
        failed.is_some(),
        if failed.is_some() {
            "Failed"
        } else {
            "NoFailure"
        },
        failed.as_deref().unwrap_or(""),
        now,
    );
}

/// The command for `cmd`; one that sets `firmware` carries the signed
/// release of that version (none published: the device refuses it as
/// unsigned, which is what a release nobody signed deserves).
fn command_message(
    device: &str,
    cmd: &Inflight,
    releases: &BTreeMap<String, ReleaseRecord>,
) -> Outgoing {
    let release = cmd
        .state
        .get(crate::rollout::FIRMWARE_KEY)
        .and_then(Value::as_str)
        .and_then(|v| releases.get(v))
        .map(|r| r.release.clone());
    let body = messages::Command {
        id: cmd.id.clone(),
        generation: cmd.generation,
        state: cmd.state.clone(),
        release,
        certificate: None,
        // The plaintexts are added by the runtime as it publishes
        // (`crate::secrets::Secrets::fill_command`): nothing the core holds, stores
        // or logs ever has them.
        secrets: Default::default(),
    };
    Outgoing {
        topic: topics::commands(device),
        payload: serde_json::to_vec(&body).unwrap_or_default(),
        retain: false,
        unanswered: false,
    }
}

pub fn response_to(operator: &str, response: &Response) -> Outgoing {
    let request_id = response.request_id();
    // A request id becomes a topic level: keep it to safe characters.
    let rid: String = request_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    Outgoing {
        topic: cityplane_proto::topics::response(operator, &rid),
        payload: serde_json::to_vec(response).unwrap_or_default(),
        retain: false,
        unanswered: false,
    }
}

/// The `request_id` of a JSON request, read leniently (the document itself may be invalid).
pub fn request_id_of(payload: &[u8]) -> Option<String> {
    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
        return v.get("request_id")?.as_str().map(str::to_owned);
    }
    // Malformed JSON: find `"request_id": "…"` by hand so the refusal still
    // reaches the operator waiting for it.
    let text = std::str::from_utf8(payload).ok()?;
    let rest = &text[text.find("\"request_id\"")? + 12..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(rest[..end].to_owned())
}

/// `never` for a device that has not been seen.
fn last_seen(d: &DeviceRecord) -> String {
    if d.last_seen > 0 {
        rfc3339(d.last_seen)
    } else {
        "never".to_owned()
    }
}

/// One group's figures in [`overview`]: the summary's counts plus the
/// quarantined and non-compliant devices.
#[derive(Debug, Clone, Default, Serialize)]
struct GroupCounts {
    total: usize,
    online: usize,
    converged: usize,
    pending: usize,
    failed: usize,
    drifted: usize,
    quarantined: usize,
    non_compliant: usize,
}

impl GroupCounts {
    /// The same classification as [`Fleet::summary_of`], so the totals
    /// agree with `status`.
    fn add(&mut self, d: &DeviceRecord, converged: bool) {
        self.total += 1;
        self.online += usize::from(d.online);
        if d.failed.is_some() {
            self.failed += 1;
        } else if converged {
            self.converged += 1;
        } else {
            self.pending += 1;
        }
        self.drifted += usize::from(d.drift_count > 0);
        self.quarantined += usize::from(d.quarantine.is_some());
        self.non_compliant += usize::from(!d.violations.is_empty());
    }
}

/// The label that names a device's zone in the overview.
pub const ZONE_LABEL: &str = "zone";

/// `overview`: the devices' counts overall and by class, zone (the `zone`
/// label) and owner, each dimension's `limit` largest groups (a device
/// without the attribute counts under `-`). One pass over the devices.
pub fn overview<'a>(devices: impl Iterator<Item = &'a DeviceRecord>, limit: usize) -> Value {
    let mut all = GroupCounts::default();
    let mut by: [BTreeMap<String, GroupCounts>; 3] = Default::default();
    for d in devices {
        // A delta per device, not one per group it counts in.
        let converged = d.failed.is_none() && d.is_converged();
        all.add(d, converged);
        let keys = [
            d.attrs.class.as_deref(),
            d.attrs.labels.get(ZONE_LABEL).map(String::as_str),
            d.attrs.owner.as_deref(),
        ];
        for (map, key) in by.iter_mut().zip(keys) {
            // Most devices fall in a group already there: no key allocated.
            match map.get_mut(key.unwrap_or("-")) {
                Some(group) => group.add(d, converged),
                None => map
                    .entry(key.unwrap_or("-").to_owned())
                    .or_default()
                    .add(d, converged),
            }
        }
    }
    let rows = |map: BTreeMap<String, GroupCounts>| -> Value {
        let mut rows: Vec<(String, GroupCounts)> = map.into_iter().collect();
        rows.sort_by(|a, b| b.1.total.cmp(&a.1.total).then_with(|| a.0.cmp(&b.0)));
        let groups = rows.len();
        let shown: Vec<Value> = rows
            .into_iter()
            .take(limit)
            .map(|(name, c)| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                v["name"] = json!(name);
                v
            })
            .collect();
        json!({"groups": groups, "rows": shown})
    };
    let [class, zone, owner] = by;
    json!({
        "all": all,
        "class": rows(class),
        "zone": rows(zone),
        "owner": rows(owner),
    })
}

/// A device row for `get devices`.
pub fn device_row(d: &DeviceRecord) -> Value {
    json!({
        "id": d.id, "class": d.attrs.class, "labels": d.attrs.labels, "owner": d.attrs.owner,
        "online": d.online, "converged": d.is_converged(),
        "failed": d.failed.is_some(), "revoked": d.revoked, "generation": d.desired_generation,
        "last_seen": last_seen(d), "firmware": d.reported.get(crate::rollout::FIRMWARE_KEY),
        "quarantined": d.quarantine.is_some(),
    })
}

pub fn describe(d: &DeviceRecord) -> Value {
    let delta: State = delta_reported(&d.desired, &d.reported);
    json!({
        "id": d.id, "class": d.attrs.class, "labels": d.attrs.labels, "owner": d.attrs.owner,
        "registered": rfc3339(d.registered_at), "registered_by": d.registered_by,
        "revoked": d.revoked, "online": d.online,
        "desired": d.desired, "desired_generation": d.desired_generation,
        "reported": if d.reported_version > 0 { Value::Object(d.reported.to_state()) } else { Value::Null },
        "reported_version": d.reported_version,
        "delta": delta, "converged": d.is_converged(), "failed": d.failed,
        "drift_count": d.drift_count, "inflight": d.inflight,
        "conditions": d.conditions, "recent_commands": d.recent_commands,
        "last_seen": last_seen(d), "rollouts": d.rollouts,
        "violations": d.violations.iter().map(|(rule, v)| (rule.clone(), json!({
            "since": rfc3339(v.since), "reason": v.reason,
        }))).collect::<serde_json::Map<_, _>>(),
        "certificate_not_after": d.cert_not_after.map(rfc3339),
        "quarantine": d.quarantine.as_ref().map(|q| json!({
            "incident": q.incident, "since": rfc3339(q.since), "by": q.by,
            "org": q.org, "reason": q.reason,
        })),
        "certificate_pin": d.cert_pin,
    })
}

/// A document row for `get documents`, with the status of the devices it
/// targets (converged: at or past the generation it produced).
pub fn document_row(fleet: &Fleet, doc: &DocRecord) -> Value {
    let targeted = fleet.targeted(&doc.target);
    let mut s = Fleet::summary_of(targeted.iter().copied());
    s.converged = targeted
        .iter()
        .filter(|d| d.is_converged() && d.desired_generation >= doc.seq)
        .count();
    s.pending = s.total - s.converged - s.failed;
    json!({
        "name": doc.name, "target": doc.target, "priority": doc.priority,
        "generation": doc.generation, "author": doc.author, "updated": rfc3339(doc.written_at),
        "targeted": s.total, "converged": s.converged, "pending": s.pending, "failed": s.failed,
        "online": s.online,
    })
}

/// `describe document`: the document, its generations, and its devices.
pub fn describe_document(fleet: &Fleet, doc: &DocRecord) -> Value {
    let mut out = document_row(fleet, doc);
    out["state"] = Value::Object(doc.state.clone());
    out["history"] = doc
        .history
        .iter()
        .map(|v| {
            json!({"generation": v.generation, "author": v.author, "written_at": rfc3339(v.written_at),
                   "priority": v.priority, "target": v.target})
        })
        .chain(std::iter::once(json!({
            "generation": doc.generation, "author": doc.author,
            "written_at": rfc3339(doc.written_at), "priority": doc.priority, "target": doc.target,
        })))
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cityplane_proto::messages::{IdList, Selector};

    fn object(v: Value) -> State {
        v.as_object().cloned().expect("object")
    }

    fn ids(ids: &[&str]) -> Target {
        Target::Ids(IdList {
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        })
    }

    fn zone(z: &str) -> Target {
        Target::Selector(Selector {
            labels: [("zone".to_owned(), z.to_owned())].into(),
            ..Default::default()
        })
    }

    /// A device's desired state without the index: every document merged.
    fn merged_by_scan(fleet: &Fleet, dev: &DeviceRecord) -> State {
        merge(
            fleet
                .docs
                .values()
                .filter(|d| selects(&d.target, &dev.id, &dev.attrs))
                .map(DocRecord::layer),
        )
    }

    fn lamps(range: std::ops::Range<usize>) -> Vec<DeviceRecord> {
        range
            .map(|i| {
                let mut d = DeviceRecord::new(&format!("d{i}"));
                d.attrs.labels.insert("zone".into(), format!("z{}", i % 3));
                d
            })
            .collect()
    }

    /// A shard's owner holds some of the devices and follows documents the
    /// leader wrote: its devices end with the desired state the leader's
    /// whole fleet gives them, generations past each document's, through
    /// new documents, changed targets and deletions.
    #[test]
    fn an_owner_following_the_leaders_documents_computes_the_same_desired_state() {
        let mut leader = Fleet::for_tests(lamps(0..12));
        let mut owner = Fleet::for_tests(lamps(4..8));
        fn write(leader: &mut Fleet, name: &str, target: Target, state: Value) {
            leader.seq += 1;
            let generation = leader.docs.get(name).map_or(0, |d| d.generation) + 1;
            leader.apply_doc(DocRecord {
                name: name.into(),
                target,
                priority: 0,
                state: object(state),
                generation,
                seq: leader.seq,
                author: "t".into(),
                org: None,
                written_at: 0,
                history: Vec::new(),
            });
        }
        let all = Target::Selector(Selector {
            all: true,
            ..Default::default()
        });
        for n in 0..4 {
            match n {
                0 => write(&mut leader, "night", zone("z1"), json!({"dim": 30})),
                1 => write(
                    &mut leader,
                    "all",
                    all.clone(),
                    json!({"fw": "1.2", "dim": 10}),
                ),
                2 => write(
                    &mut leader,
                    "night",
                    ids(&["d5", "d6", "d11"]),
                    json!({"dim": 40}),
                ),
                _ => {
                    leader.delete_doc("all");
                }
            }
            let stored: Vec<DocRecord> = leader.docs.values().cloned().collect();
            owner.follow_docs(stored.clone());
            for dev in owner.devices.values() {
                assert_eq!(
                    dev.desired, leader.devices[&dev.id].desired,
                    "step {n}, {}",
                    dev.id
                );
                for doc in stored
                    .iter()
                    .filter(|d| selects(&d.target, &dev.id, &dev.attrs))
                {
                    assert!(dev.desired_generation > doc.seq, "step {n}, {}", dev.id);
                }
            }
            assert_eq!(
                owner.follow_docs(stored),
                0,
                "step {n}: nothing new, nothing changes"
            );
        }
    }

    /// Sharded: a controller reconciles, commands and writes only the
    /// devices of the shards it holds, whatever reaches it (a document for
    /// the whole fleet, a late message from a shard given up); the others'
    /// records it takes from the store as they are. A shard gained comes
    /// with its last owner's records, and a command that owner left in
    /// flight is re-sent under its own id, never as a new one.
    #[test]
    fn a_sharded_owner_writes_and_commands_only_the_devices_of_its_shards() {
        const SHARDS: u32 = 4;
        let shard = |id: &str| crate::shard::shard_of(id, SHARDS);
        let mut devices = lamps(0..40);
        for d in &mut devices {
            d.online = true;
            d.reported = object(json!({"dim": 0})).into();
            d.reported_version = 1;
        }
        let mut fleet = Fleet::for_tests(devices);
        fleet.shard(SHARDS);
        fleet.hold_shards([0, 1].into());
        fleet.seq += 1;
        fleet.apply_doc(DocRecord {
            name: "all".into(),
            target: Target::Selector(Selector {
                all: true,
                ..Default::default()
            }),
            priority: 0,
            state: object(json!({"dim": 30})),
            generation: 1,
            seq: fleet.seq,
            author: "t".into(),
            org: None,
            written_at: 0,
            history: Vec::new(),
        });
        let now = 1_000;
        let commands = fleet.reconcile_due(now);
        let commanded: HashSet<String> = commands
            .iter()
            .filter_map(|c| topics::split_device_topic(&c.topic).map(|(id, _)| id.to_owned()))
            .collect();
        let owned: HashSet<String> = fleet
            .devices
            .keys()
            .filter(|id| shard(id) <= 1)
            .cloned()
            .collect();
        assert!(!owned.is_empty() && owned.len() < 40, "{owned:?}");
        assert_eq!(commanded, owned, "commands to its own devices only");
        let written: HashSet<String> = fleet.take_dirty().iter().map(|d| d.id.clone()).collect();
        assert_eq!(written, owned, "records of its own devices only");

        // A late report of another shard's device changes nothing here,
        // nor did the document: its owner computes its desired state.
        let foreign = fleet
            .devices
            .keys()
            .find(|id| shard(id) == 2)
            .cloned()
            .expect("a device of shard 2");
        assert!(
            fleet.devices[&foreign].desired.is_empty(),
            "a copy is not recomputed"
        );
        fleet.on_device_message(
            &foreign,
            "reported",
            br#"{"version": 9, "state": {"dim": 1}}"#,
            now,
        );
        assert!(fleet.reconcile_due(now).is_empty());
        assert!(
            fleet.take_dirty().is_empty(),
            "nothing of shard 2 is written"
        );
        assert_eq!(fleet.devices[&foreign].reported_version, 1);

        // Shard 2 moves here; its last owner had sent `foreign` a command.
        let mut stored = (*fleet.devices[&foreign]).clone();
        stored.desired = object(json!({"dim": 30}));
        stored.desired_generation = fleet.seq + 50;
        stored.inflight = Some(Inflight {
            id: "c-other-7".into(),
            generation: stored.desired_generation,
            state: object(json!({"dim": 30})),
            sent_at: now,
            attempt: 1,
        });
        fleet.follow_devices(vec![stored.clone()]);
        assert_eq!(fleet.devices[&foreign].inflight, stored.inflight);
        assert_eq!(fleet.hold_shards([0, 1, 2].into()), [2].into());
        assert!(
            fleet.seq >= stored.desired_generation,
            "generations go on past the last owner's"
        );
        let later = now + fleet.policy.command_timeout.as_millis() as u64 + 60_000;
        let resent: Vec<messages::Command> = fleet
            .reconcile_due(later)
            .iter()
            .filter(|c| c.topic == topics::commands(&foreign))
            .map(|c| serde_json::from_slice(&c.payload).expect("command"))
            .collect();
        assert_eq!(resent.len(), 1, "{resent:?}");
        assert_eq!(resent[0].id, "c-other-7", "re-sent under its own id");

        // Shard 0 goes: what it had pending is not written here any more.
        let mine = fleet
            .devices
            .keys()
            .find(|id| shard(id) == 0)
            .cloned()
            .expect("a device of shard 0");
        fleet.on_device_message(
            &mine,
            "reported",
            br#"{"version": 9, "state": {"dim": 1}}"#,
            now,
        );
        fleet.hold_shards([1, 2].into());
        fleet.reconcile_due(later);
        assert!(
            fleet.take_dirty().iter().all(|d| shard(&d.id) != 0),
            "a shard given up is not written"
        );
    }

    /// Sharded, `label` and `register` reach a device's record through
    /// its owner only, once, whoever owns it when (`fleet/intents.rs`).
    #[test]
    fn a_sharded_write_about_devices_is_applied_once_by_each_devices_owner() {
        const SHARDS: u32 = 4;
        let shard = |id: &str| crate::shard::shard_of(id, SHARDS);
        let north = DocRecord {
            name: "north".into(),
            target: zone("north"),
            priority: 0,
            state: object(json!({"dim": 50})),
            generation: 1,
            seq: 1,
            author: "t".into(),
            org: None,
            written_at: 0,
            history: Vec::new(),
        };
        let fleet_of = |held: BTreeSet<u32>| {
            let mut devices = lamps(0..40);
            for d in &mut devices {
                d.online = true;
                d.reported_version = 1;
            }
            let mut f = Fleet::for_tests(devices);
            f.shard(SHARDS);
            f.hold_shards(held);
            f.follow_docs(vec![north.clone()]);
            f.take_dirty();
            f
        };
        let mut leader = fleet_of([0, 1].into());
        let mut other = fleet_of([2, 3].into());
        let pick = |s: u32| {
            (0..40)
                .map(|i| format!("d{i}"))
                .find(|id| shard(id) == s)
                .expect("a device of that shard")
        };
        let (mine, theirs) = (pick(0), pick(2));
        let stale = (*other.devices[&theirs]).clone();

        // The leader labels one device of its own and one of the other's.
        let change = LabelChange {
            set: [("zone".to_owned(), "north".to_owned())].into(),
            ..Default::default()
        };
        let records = leader.labelled_records(&[mine.clone(), theirs.clone()], &change);
        let intents = leader.intents_of(&records, IntentKind::Registry, 1_000);
        assert_eq!(intents.len(), 1);
        assert_eq!(leader.took_intents(intents.clone()), (0, 2));
        let written: Vec<String> = leader.take_dirty().iter().map(|d| d.id.clone()).collect();
        assert_eq!(
            written,
            vec![mine.clone()],
            "the leader writes its own device only"
        );
        assert_eq!(leader.devices[&mine].desired, object(json!({"dim": 50})));
        assert_eq!(
            leader.devices[&theirs].attrs.labels["zone"], "north",
            "the copy shows it"
        );
        assert_eq!(
            leader.devices[&theirs].intent_seq, 0,
            "the copy has not passed it"
        );

        // Its owner applies it, once: read again, it changes nothing.
        other.take_intents(intents.clone(), 1);
        let written = other.take_dirty();
        assert_eq!(written.len(), 1);
        assert_eq!(
            (written[0].id.as_str(), written[0].intent_seq),
            (theirs.as_str(), 1)
        );
        assert_eq!(written[0].desired, object(json!({"dim": 50})));
        other.take_intents(intents.clone(), 1);
        assert!(other.take_dirty().is_empty(), "applied once");

        // A copy read before its owner applied it still shows it, and the
        // intent is not passed, so not pruned.
        leader.follow_devices(vec![stale.clone()]);
        assert_eq!(leader.devices[&theirs].attrs.labels["zone"], "north");
        assert!(leader
            .passed_intents(1_000 + 3_600_000, DEFAULT_INTENT_KEEP)
            .is_empty());

        // Its owner dies before its record was durable: the shard moves to
        // the leader, which applies the intent there.
        assert_eq!(leader.hold_shards([0, 1, 2].into()), [2].into());
        let written: Vec<Arc<DeviceRecord>> = leader.take_dirty();
        let rec = written.iter().find(|d| d.id == theirs).expect("written");
        assert_eq!(
            (rec.intent_seq, rec.attrs.labels["zone"].as_str()),
            (1, "north")
        );
        assert_eq!(rec.desired, object(json!({"dim": 50})));
        assert_eq!(
            leader.passed_intents(1_000 + 59_000, DEFAULT_INTENT_KEEP),
            Vec::<u64>::new(),
            "kept a minute"
        );
        assert_eq!(
            leader.passed_intents(1_000 + 60_000, DEFAULT_INTENT_KEEP),
            vec![1]
        );

        // A quarantine and a release of the other's device: the copy shows
        // them (the broker's pins follow), its owner writes them once.
        let mark = crate::model::Quarantine {
            incident: "inc-9".into(),
            since: 2_000,
            by: "op".into(),
            org: "city".into(),
            reason: "tampered".into(),
        };
        let other_dev = pick(3);
        let (cut, _) = leader.quarantined_records(std::slice::from_ref(&other_dev), &mark);
        let quarantine = leader.intents_of(&cut, IntentKind::Incident, 2_000);
        leader.pins_dirty = false;
        leader.took_intents(quarantine.clone());
        assert!(leader.pins_dirty, "the pins follow a copy's quarantine");
        assert_eq!(
            leader.pin_table().get(&other_dev),
            Some(&cityplane_broker::Pin::Refused)
        );
        assert!(leader.take_dirty().is_empty(), "not written by the leader");
        let mut all = intents.clone();
        all.extend(quarantine.clone());
        other.take_intents(all.clone(), 2);
        let written = other.take_dirty();
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].quarantine.as_ref(), Some(&mark));
        assert_eq!(written[0].intent_seq, 2);
        other.take_intents(all.clone(), 2);
        assert!(other.take_dirty().is_empty(), "quarantined once");
        let serials = [(other_dev.clone(), "0abc".to_owned())].into();
        let back = leader
            .released_records(&serials, 3_000)
            .expect("quarantined here");
        let release = leader.intents_of(&back, IntentKind::Incident, 3_000);
        leader.took_intents(release.clone());
        assert_eq!(
            leader.pin_table().get(&other_dev),
            Some(&cityplane_broker::Pin::Only(vec!["0abc".into()]))
        );
        all.extend(release);
        other.take_intents(all, 3);
        let written = other.take_dirty();
        assert_eq!(written.len(), 1);
        assert_eq!(
            (written[0].quarantine.is_none(), written[0].cert_pin.clone()),
            (true, vec!["0abc".to_owned()])
        );

        // The next leader numbers on from the store's last number.
        let mut next = fleet_of([3].into());
        next.take_intents(Vec::new(), 7);
        let more = next.intents_of(&records, IntentKind::Registry, 2_000);
        assert_eq!(more[0].seq, 8);
    }

    #[test]
    fn recomputing_only_the_targeted_devices_matches_merging_every_document() {
        let devices = (0..30)
            .map(|i| {
                let mut d = DeviceRecord::new(&format!("d{i}"));
                d.attrs.class = Some("lamp".into());
                d.attrs.labels.insert("zone".into(), format!("z{}", i % 3));
                d.reported_version = 1;
                d
            })
            .collect();
        let mut fleet = Fleet::for_tests(devices);
        // Documents move between id lists (with repeats) and selectors,
        // overlap, and change priority; devices change zone in between.
        let targets = [
            ids(&["d1", "d2", "d3"]),
            zone("z1"),
            ids(&["d2", "d2", "d29", "nobody"]),
            zone("z2"),
            ids(&["d5"]),
        ];
        for step in 0..60usize {
            fleet.seq += 1;
            fleet.apply_doc(DocRecord {
                name: format!("doc{}", step % 4),
                target: targets[(step * 7) % targets.len()].clone(),
                priority: (step % 3) as i64,
                state: object(json!({"a": step, format!("k{}", step % 5): step})),
                generation: 1,
                seq: fleet.seq,
                author: "t".into(),
                org: None,
                written_at: 0,
                history: Vec::new(),
            });
            let moved = format!("d{}", (step * 11) % 30);
            let zone = [("zone".to_owned(), format!("z{}", step % 3 + 1))].into();
            fleet.label(
                &[moved],
                &LabelChange {
                    set: zone,
                    ..Default::default()
                },
            );
            for dev in fleet.devices.values() {
                assert_eq!(
                    dev.desired,
                    merged_by_scan(&fleet, dev),
                    "step {step}, {}",
                    dev.id
                );
            }
        }
    }
}
