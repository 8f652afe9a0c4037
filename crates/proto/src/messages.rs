//! JSON bodies of the cityplane contract (docs/PROTOCOL.md). Unknown fields
//! are refused in everything the controller receives, so a typo is an error,
//! not a silently ignored setting.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A device's state document: a JSON object.
pub type State = Map<String, Value>;

/// `devices/D/reported`: the device's full state, stamped with its own
/// monotonically increasing `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reported {
    pub version: u64,
    pub state: State,
}

/// `devices/D/commands`: keys to set (`null` deletes), carrying the desired
/// generation they come from and a unique id so replays are recognised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub id: String,
    pub generation: u64,
    pub state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Applied,
    Rejected,
}

/// `devices/D/acks`: the device's answer to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub id: String,
    pub status: AckStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `devices/D/presence`: published by the device on connect (`true`) and as
/// its will (`false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Presence {
    pub online: bool,
}

/// Which devices a desired document applies to: a list of ids or a selector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    Ids(IdList),
    Selector(Selector),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdList {
    pub ids: Vec<String>,
}

/// Every given field must match; `all: true` alone selects the whole fleet
/// (an empty selector is refused, so nobody targets everything by accident).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.class.is_none() && self.labels.is_empty() && self.id_prefix.is_none() && !self.all
    }
}

/// What `cityplane apply -f FILE` sends to `fleet/desired/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredDoc {
    pub name: String,
    pub target: Target,
    #[serde(default)]
    pub priority: i64,
    pub state: State,
    /// Optimistic concurrency: refuse the write unless the stored document
    /// is at this generation (0 = must not exist yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_generation: Option<u64>,
    /// Echoed in the response so the operator can match it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}
