//! What the controller stores, per device and per desired document.

use std::collections::{BTreeMap, VecDeque};

use cityplane_proto::messages::{Attributes, State, Target};
use serde::{Deserialize, Serialize};

pub use crate::reported::ReportedState;

/// Milliseconds since the Unix epoch: records outlive the process, so they
/// hold wall-clock times.
pub type Millis = u64;

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn rfc3339(ms: Millis) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A stored desired document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocRecord {
    pub name: String,
    pub target: Target,
    pub priority: i64,
    pub state: State,
    /// Per-document counter, what `if_generation` compares against.
    pub generation: u64,
    /// Global write sequence number (orders documents for priority ties).
    pub seq: u64,
    pub author: String,
    /// The author's organisation: the document applies only to devices in
    /// its scope (`None`: written before organisations, the city's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    pub written_at: Millis,
    /// Earlier generations, newest last (at most [`DOC_HISTORY`]).
    #[serde(default)]
    pub history: Vec<DocVersion>,
}

impl DocRecord {
    /// This document as one layer of a device's merged desired state.
    pub fn layer(&self) -> crate::delta::Layer<'_> {
        crate::delta::Layer {
            priority: self.priority,
            seq: self.seq,
            state: &self.state,
        }
    }
}

/// Who wrote one generation of a document, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocVersion {
    pub generation: u64,
    pub author: String,
    pub written_at: Millis,
    pub priority: i64,
    pub target: Target,
}

pub const DOC_HISTORY: usize = 20;

/// A command sent and not yet seen to take effect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inflight {
    pub id: String,
    pub generation: u64,
    pub state: State,
    pub sent_at: Millis,
    /// 1 for the first send; a re-send keeps the id and counts up.
    pub attempt: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandLog {
    pub id: String,
    pub generation: u64,
    pub at: Millis,
    pub event: String,
}

/// Kubernetes-style condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
    pub observed_generation: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: String,
    /// Registry attributes, set by operators only (selectors match these).
    /// Records written before the registry held the device's own claims
    /// under `class`/`labels`; those are ignored, not trusted.
    #[serde(default)]
    pub attrs: Attributes,
    /// When the device entered the registry (issue, manifest, or first
    /// contact of a certificate the registry did not know yet).
    #[serde(default)]
    pub registered_at: Millis,
    /// `pki` (its certificate was issued with the CA this server reads),
    /// an operator's id (a manifest), or `first-contact`.
    #[serde(default)]
    pub registered_by: String,
    /// Its certificate is revoked: it stays listed, as revoked.
    #[serde(default)]
    pub revoked: bool,
    /// As compact JSON text: see [`crate::reported`].
    pub reported: ReportedState,
    /// 0 = never reported.
    pub reported_version: u64,
    pub online: bool,
    pub last_seen: Millis,
    /// Effective desired state (merge of the documents targeting the device).
    pub desired: State,
    /// Bumped (from the global sequence) whenever `desired` changes.
    pub desired_generation: u64,
    pub inflight: Option<Inflight>,
    /// Set when the device rejected the change or retries ran out; cleared
    /// when the device comes back online or desired changes.
    pub failed: Option<String>,
    /// Generation at which the device was last seen converged.
    pub converged_generation: u64,
    pub drift_count: u64,
    pub conditions: Vec<Condition>,
    pub recent_commands: VecDeque<CommandLog>,
    /// Times it came online (a reboot loop shows as many).
    #[serde(default)]
    pub connects: u64,
    /// Its part in each rollout that reached it (by rollout name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, crate::rollout::DeviceRollout>,
    /// The security policy's rules it breaks now, by rule id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub violations: BTreeMap<String, Violation>,
    /// When its newest certificate expires (from the PKI's record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<Millis>,
    /// Cut off by an incident: the broker refuses every certificate it
    /// holds, rollouts and documents pass it by, until it is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<Quarantine>,
    /// The only certificate serials it may connect with (set when it was
    /// given a new certificate: released, rotated). Empty: any certificate
    /// the CA issued it and did not revoke.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cert_pin: Vec<String>,
    /// The serial of the certificate its last session authenticated with
    /// (the broker's edge says so in its online presence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// A certificate rotation under way (from its CSR until it connects
    /// with the new certificate, or is rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_rotation: Option<CertRotation>,
    /// Sharded: the last operator intent applied to this record
    /// ([`IntentRecord::seq`]). It travels with the record, so an intent
    /// is applied once per device whoever owns it when.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub intent_seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Sharded (docs/DESIGN-SHARDING.md, "Operator writes"): an operator's
/// write about devices, committed by the leading controller and applied
/// to each device's record by the owner of its shard, where the record's
/// `intent_seq` is lower. The leader numbers them; several make one
/// write when its devices do not fit one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentRecord {
    pub seq: u64,
    pub at: Millis,
    pub devices: BTreeMap<String, Intent>,
}

/// What an intent does to one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Intent {
    /// Its registry fields as `register` or `label` left them: applied
    /// whole (not as a change), so applying it again changes nothing.
    Registry {
        attrs: Attributes,
        registered_by: String,
        /// Used when the device is new to its owner.
        registered_at: Millis,
    },
    /// Cut off by an incident (`quarantine`).
    Quarantine { mark: Quarantine },
    /// Back from quarantine, pinned to this certificate serial (`release`).
    Release { serial: String },
    /// Queued in a rollout's wave (`rollout-create`: the leader's plan).
    Enrol { rollout: String, wave: usize },
}

/// One device's certificate rotation in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRotation {
    /// The rotation rollout's name.
    pub rotation: String,
    /// The serial it connected with when it asked (kept until the new one
    /// is confirmed; what a rollback pins it back to).
    pub old_serial: Option<String>,
    pub requested_at: Millis,
    /// Set once the CA signed its CSR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_serial: Option<String>,
    /// The signed certificate (public), re-delivered if asked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Millis>,
}

/// Why and by whom a device was quarantined.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The incident it belongs to (`inc-<n>`), as in the audit log.
    pub incident: String,
    pub since: Millis,
    pub by: String,
    pub org: String,
    pub reason: String,
}

/// A rule a device breaks: since when, and why (the last evaluation's words).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub since: Millis,
    pub reason: String,
}

pub const RECENT_COMMANDS: usize = 10;

impl DeviceRecord {
    pub fn new(id: &str) -> Self {
        DeviceRecord {
            id: id.to_owned(),
            ..Default::default()
        }
    }

    pub fn log_command(&mut self, id: &str, generation: u64, at: Millis, event: impl Into<String>) {
        if self.recent_commands.len() == RECENT_COMMANDS {
            self.recent_commands.pop_front();
        }
        self.recent_commands.push_back(CommandLog {
            id: id.to_owned(),
            generation,
            at,
            event: event.into(),
        });
    }

    pub fn is_converged(&self) -> bool {
        self.reported_version > 0
            && crate::delta::delta_reported(&self.desired, &self.reported).is_empty()
    }

    /// Sets a condition, keeping its transition time when the status is unchanged.
    pub fn set_condition(
        &mut self,
        kind: &str,
        status: bool,
        reason: &str,
        message: &str,
        now: Millis,
    ) {
        let status = if status { "True" } else { "False" };
        let generation = self.desired_generation;
        match self.conditions.iter_mut().find(|c| c.kind == kind) {
            // Most reports change no condition: assign only what differs.
            Some(c) => {
                if c.status != status {
                    c.last_transition_time = rfc3339(now);
                    c.status = status.to_owned();
                }
                if c.reason != reason {
                    c.reason = reason.to_owned();
                }
                if c.message != message {
                    c.message = message.to_owned();
                }
                c.observed_generation = generation;
            }
            None => self.conditions.push(Condition {
                kind: kind.to_owned(),
                status: status.to_owned(),
                reason: reason.to_owned(),
                message: message.to_owned(),
                last_transition_time: rfc3339(now),
                observed_generation: generation,
            }),
        }
    }
}

/// A published firmware release: the signed manifest as the signer made it
/// (devices verify it; the controller only checks the image matches its
/// size and SHA-256), the image stored as `firmware/<sha256>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub version: String,
    pub release: cityplane_proto::firmware::SignedRelease,
    pub models: Vec<String>,
    pub size: u64,
    pub sha256: String,
    pub published_by: String,
    pub published_at: Millis,
}

/// One line of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: String,
    pub who: String,
    pub action: String,
    pub name: String,
    pub result: String,
    /// The organisation of `who` (an operator's), for scoped reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// The devices an incident action touched (quarantine, release), so
    /// `audit --device` finds them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Hash of the entry before it in the log (`crate::audit`), set by the
    /// store when it writes the entry; empty for the first.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prev: String,
    /// This entry's hash (over everything above); empty before the store
    /// writes it, and in logs written before the chain existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}
