//! Rollouts: one change (a firmware release, a configuration patch, or
//! both) taken to the devices a target picks, wave by wave, each wave gated
//! on its success threshold and on the updated devices' health for a soak
//! time, aborted (and rolled back) when failures cross a threshold.
//!
//! No I/O here: the spec, the stored record, each device's part in a
//! rollout, and pure decisions over them. [`crate::fleet`] keeps the
//! records and turns decisions into desired state; a device's rollout
//! entries are layers of its desired state like documents, so commands,
//! retries, outbox and convergence are the documents' machinery.

use std::collections::BTreeMap;

use cityplane_proto::messages::{State, Target};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::input::Rejection;
use crate::model::{DeviceRecord, Millis, ReportedState};
use crate::window::Window;

/// The key a firmware release sets in desired state.
pub const FIRMWARE_KEY: &str = "firmware";
/// Events kept on a rollout record (newest last).
pub const ROLLOUT_HISTORY: usize = 50;

/// What an operator sends to create a rollout (`rollout create -f`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct RolloutSpec {
    pub name: String,
    pub target: Target,
    /// A published release's version: devices install it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// Desired-state keys to set (null deletes), like a document's `state`.
    #[serde(default, skip_serializing_if = "State::is_empty")]
    pub state: State,
    /// A secret-valued key (`admin_password`) to rotate: each device gets a
    /// new secret of its own when admitted (`cityplane secrets rotate`;
    /// `crate::secrets`). Alone: no `state` or `firmware` with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Wave sizes in order; the last wave takes every device left.
    #[serde(default = "default_waves")]
    pub waves: Vec<WaveSpec>,
    /// At most this many devices start per minute (within the waves),
    /// growing while devices succeed (AWS IoT Jobs' exponential rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Percent of a wave that must have succeeded before it may soak.
    #[serde(default = "default_threshold")]
    pub success_threshold: f64,
    #[serde(default)]
    pub health: HealthGate,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub abort: Vec<AbortRule>,
    /// On abort, put the devices already reached back to what they had.
    #[serde(default)]
    pub rollback: bool,
    /// New devices start only while this window is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// Spread each device's start over this many seconds after its wave
    /// starts (or its window opens), so a wave does not reconnect or
    /// download at one instant.
    #[serde(default)]
    pub jitter_s: u64,
    /// Against documents setting the same keys (documents default to 0).
    #[serde(default = "default_priority")]
    pub priority: i64,
    /// The label waves are spread over, so a canary is representative.
    #[serde(default = "default_spread")]
    pub spread_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// When the sender stops waiting (RFC 3339): taken up later, the write
    /// is refused with `expired` (docs/PROTOCOL.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

fn default_waves() -> Vec<WaveSpec> {
    [1.0, 10.0, 89.0]
        .into_iter()
        .map(|p| WaveSpec {
            count: None,
            percent: Some(p),
        })
        .collect()
}

fn default_threshold() -> f64 {
    95.0
}

fn default_priority() -> i64 {
    100
}

fn default_spread() -> String {
    "zone".to_owned()
}

/// One wave: a number of devices or a percentage of those targeted at create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct WaveSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
}

/// Devices started per minute: `per_minute`, multiplied by
/// `increase_factor` for every `every_succeeded` devices that succeeded,
/// up to `max_per_minute`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u64,
    #[serde(default = "one_f")]
    pub increase_factor: f64,
    #[serde(default)]
    pub every_succeeded: u64,
    #[serde(default)]
    pub max_per_minute: Option<u64>,
}

fn one_f() -> f64 {
    1.0
}

impl Rate {
    /// Devices that may start in a minute once `succeeded` devices succeeded.
    pub fn per_minute_after(&self, succeeded: u64) -> u64 {
        let steps = succeeded.checked_div(self.every_succeeded).unwrap_or(0);
        let grown = self.per_minute as f64 * self.increase_factor.powf(steps.min(64) as f64);
        let cap = self.max_per_minute.unwrap_or(u64::MAX) as f64;
        grown.min(cap).min(1e12) as u64
    }
}

/// What must hold for the devices already updated before the next wave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct HealthGate {
    /// How long the wave's devices must stay healthy after its threshold holds.
    #[serde(default)]
    pub soak_s: u64,
    /// Rules over the updated devices' reported state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HealthRule>,
    /// More reconnects than this after succeeding is a reboot loop.
    #[serde(default = "default_reboots")]
    pub max_reboots: u64,
    /// An updated device that goes offline counts as unhealthy.
    #[serde(default = "yes")]
    pub require_online: bool,
    /// The gate fails when more than this percent of updated devices are unhealthy.
    #[serde(default)]
    pub max_unhealthy_percent: f64,
}

impl Default for HealthGate {
    fn default() -> Self {
        HealthGate {
            soak_s: 0,
            rules: Vec::new(),
            max_reboots: default_reboots(),
            require_online: true,
            max_unhealthy_percent: 0.0,
        }
    }
}

fn default_reboots() -> u64 {
    2
}

fn yes() -> bool {
    true
}

/// `key op value` over reported state; `key` may be a dotted path
/// (`health.error_rate`). A missing key fails the rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct HealthRule {
    pub key: String,
    pub op: String,
    pub value: Value,
}

impl HealthRule {
    pub fn check(&self, reported: &State) -> bool {
        let mut parts = self.key.split('.');
        let first = parts.next().unwrap_or_default();
        let mut v = reported.get(first);
        for p in parts {
            v = v.and_then(|x| x.get(p));
        }
        let Some(v) = v else { return false };
        match self.op.as_str() {
            "==" => *v == self.value,
            "!=" => *v != self.value,
            op => match (v.as_f64(), self.value.as_f64()) {
                (Some(a), Some(b)) => match op {
                    "<" => a < b,
                    "<=" => a <= b,
                    ">" => a > b,
                    ">=" => a >= b,
                    _ => false,
                },
                _ => false,
            },
        }
    }

    pub fn describe(&self) -> String {
        format!("{} {} {}", self.key, self.op, self.value)
    }
}

/// A device's failure without the command id (`device rejected command
/// c-…: wrong model: …` → `wrong model: …`), for summaries.
pub fn short_reason(reason: &str) -> &str {
    reason
        .strip_prefix("device rejected command ")
        .and_then(|rest| rest.split_once(": "))
        .map_or(reason, |(_, why)| why)
}

/// Which failures an abort rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureType {
    /// Every failure.
    Any,
    /// The device refused (its ack said `rejected`: bad signature, model, …).
    Rejected,
    /// Retries ran out without the device taking the change.
    TimedOut,
}

/// AWS IoT Jobs' abort criteria: abort when at least `min_executed` devices
/// finished (succeeded or failed) and `threshold_percent` of them failed so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct AbortRule {
    #[serde(default = "any")]
    pub failure: FailureType,
    pub threshold_percent: f64,
    #[serde(default = "one")]
    pub min_executed: usize,
}

fn any() -> FailureType {
    FailureType::Any
}

fn one() -> usize {
    1
}

// Bodies are JSON objects only (see `cityplane_proto::messages`).
cityplane_proto::object_only!(serialize: RolloutSpec, WaveSpec, Rate, HealthGate, HealthRule, AbortRule);

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Active,
    /// By an operator; `resume` goes on.
    Paused,
    /// By its health gate; `resume` soaks the wave again, `abort` ends it.
    Halted,
    Aborted,
    Completed,
}

impl Phase {
    /// Still holding its keys on its devices against other rollouts.
    pub fn is_live(self) -> bool {
        matches!(self, Phase::Active | Phase::Paused | Phase::Halted)
    }
}

/// A stored rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub spec: RolloutSpec,
    /// The author's organisation: only devices in its scope are admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    /// What the rollout sets: `state` plus `firmware`.
    pub patch: State,
    /// Global write sequence (orders its layer against documents).
    pub seq: u64,
    pub author: String,
    pub created_at: Millis,
    pub phase: Phase,
    /// Why it is paused, halted or aborted.
    #[serde(default)]
    pub reason: String,
    /// The wave in progress (== number of waves once completed).
    pub wave: usize,
    /// Planned size of each wave at create.
    pub wave_sizes: Vec<usize>,
    pub wave_started_at: Millis,
    /// When the wave's success threshold first held.
    #[serde(default)]
    pub soak_from: Option<Millis>,
    #[serde(default)]
    pub history: Vec<RolloutEvent>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutEvent {
    pub at: Millis,
    pub who: String,
    pub what: String,
}

impl RolloutRecord {
    pub fn log(&mut self, at: Millis, who: &str, what: impl Into<String>) {
        if self.history.len() == ROLLOUT_HISTORY {
            self.history.remove(0);
        }
        self.history.push(RolloutEvent {
            at,
            who: who.to_owned(),
            what: what.into(),
        });
    }

    pub fn firmware(&self) -> Option<&str> {
        self.spec.firmware.as_deref()
    }

    /// When devices of the current wave may start at `now`, before their
    /// jitter: when the wave began or, with a window, when the window's
    /// current opening began if later; `None` while the window is closed.
    pub fn starts_from(&self, now: Millis) -> Option<Millis> {
        match &self.spec.window {
            None => Some(self.wave_started_at),
            Some(w) => w.opened_at(now).map(|o| o.max(self.wave_started_at)),
        }
    }

    /// When device `id` may start, for a wave that starts from `base`.
    pub fn start_at(&self, base: Millis, id: &str) -> Millis {
        base + crate::window::jitter_ms(id, self.seq, self.spec.jitter_s * 1000)
    }
}

/// A device's part in one rollout, stored in its record (so its admission
/// and the desired state it causes are written in the same commit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRollout {
    pub wave: usize,
    pub stage: Stage,
    #[serde(default)]
    pub admitted_at: Millis,
    /// The rollout's keys as the device reported them when admitted
    /// (`null`: it had none): what a rollback puts back.
    #[serde(default)]
    pub previous: State,
    /// Already at the target when its turn came.
    #[serde(default)]
    pub skipped: bool,
    /// This device's own change, when it differs per device (a secret
    /// rotation: the reference to its new secret); empty: the rollout's
    /// `patch`.
    #[serde(default, skip_serializing_if = "State::is_empty")]
    pub values: State,
    /// The failure that counted against the rollout (kept after the device's
    /// own `failed` is cleared by a reconnect, until it succeeds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeeded_at: Option<Millis>,
    /// The device's connect count when it succeeded (reboot-loop check).
    #[serde(default)]
    pub connects_at_success: u64,
}

impl DeviceRollout {
    /// What the rollout sets on this device.
    pub fn patch<'a>(&'a self, r: &'a RolloutRecord) -> &'a State {
        if self.values.is_empty() {
            &r.patch
        } else {
            &self.values
        }
    }

    /// Waiting for wave `wave`.
    pub fn queued(wave: usize) -> DeviceRollout {
        DeviceRollout {
            wave,
            stage: Stage::Queued,
            admitted_at: 0,
            previous: State::new(),
            skipped: false,
            values: State::new(),
            failed: None,
            succeeded_at: None,
            connects_at_success: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Waiting for its wave, its start time or the window.
    Queued,
    /// The rollout's patch is part of its desired state.
    Admitted,
    /// Aborted with rollback: `previous` is part of its desired state.
    RolledBack,
    /// The rollout ended before the device's turn.
    Cancelled,
}

/// What `rollout status` and `rollout devices` call a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Queued,
    Notified,
    Downloading,
    Installing,
    Rebooting,
    Verifying,
    Succeeded,
    Skipped,
    Offline,
    Failed,
    RollingBack,
    RolledBack,
    RollbackFailed,
    Cancelled,
}

impl FailureType {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureType::Any => "any",
            FailureType::Rejected => "rejected",
            FailureType::TimedOut => "timed_out",
        }
    }
}

impl DeviceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Queued => "queued",
            DeviceStatus::Notified => "notified",
            DeviceStatus::Downloading => "downloading",
            DeviceStatus::Installing => "installing",
            DeviceStatus::Rebooting => "rebooting",
            DeviceStatus::Verifying => "verifying",
            DeviceStatus::Succeeded => "succeeded",
            DeviceStatus::Skipped => "skipped",
            DeviceStatus::Offline => "offline",
            DeviceStatus::Failed => "failed",
            DeviceStatus::RollingBack => "rolling_back",
            DeviceStatus::RolledBack => "rolled_back",
            DeviceStatus::RollbackFailed => "rollback_failed",
            DeviceStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<DeviceStatus> {
        ALL_STATUSES.into_iter().find(|x| x.as_str() == s)
    }

    /// Counts toward a wave's success threshold.
    pub fn is_success(self) -> bool {
        matches!(self, DeviceStatus::Succeeded | DeviceStatus::Skipped)
    }
}

pub const ALL_STATUSES: [DeviceStatus; 14] = [
    DeviceStatus::Queued,
    DeviceStatus::Notified,
    DeviceStatus::Downloading,
    DeviceStatus::Installing,
    DeviceStatus::Rebooting,
    DeviceStatus::Verifying,
    DeviceStatus::Succeeded,
    DeviceStatus::Skipped,
    DeviceStatus::Offline,
    DeviceStatus::Failed,
    DeviceStatus::RollingBack,
    DeviceStatus::RolledBack,
    DeviceStatus::RollbackFailed,
    DeviceStatus::Cancelled,
];

/// A secret rotation's `patch` value: the keys it holds, for conflicts and
/// views. Each admitted device gets its own reference instead
/// ([`DeviceRollout::values`]); should this ever reach a device, it names
/// no stored secret and the device refuses it ("secret missing").
pub fn secret_placeholder() -> Value {
    cityplane_proto::secrets::SecretRef {
        fingerprint: String::new(),
        rotated_at: String::new(),
    }
    .to_value()
}

/// Does the device's reported state hold every key of `patch` (null: absent)?
pub fn holds(reported: &ReportedState, patch: &State) -> bool {
    let reported = reported.pick_keys_of(patch);
    patch.iter().all(|(k, v)| match (v, reported.get(k)) {
        (Value::Null, None) => true,
        (want, Some(have)) => want == have,
        _ => false,
    })
}

/// The device's status in a rollout, and why (for a failure).
pub fn device_status(
    dev: &DeviceRecord,
    entry: &DeviceRollout,
    rollout: &RolloutRecord,
) -> (DeviceStatus, Option<String>) {
    match entry.stage {
        Stage::Queued => (DeviceStatus::Queued, None),
        Stage::Cancelled => (DeviceStatus::Cancelled, None),
        Stage::RolledBack => {
            if dev.reported_version > 0 && holds(&dev.reported, &entry.previous) {
                (DeviceStatus::RolledBack, None)
            } else if let Some(f) = &dev.failed {
                (DeviceStatus::RollbackFailed, Some(f.clone()))
            } else {
                (DeviceStatus::RollingBack, None)
            }
        }
        Stage::Admitted => {
            if dev.reported_version > 0 && holds(&dev.reported, entry.patch(rollout)) {
                if entry.skipped {
                    return (
                        DeviceStatus::Skipped,
                        Some("already at the target".to_owned()),
                    );
                }
                return (DeviceStatus::Succeeded, None);
            }
            if let Some(f) = dev.failed.as_ref().or(entry.failed.as_ref()) {
                return (DeviceStatus::Failed, Some(f.clone()));
            }
            if !dev.online {
                return (
                    DeviceStatus::Offline,
                    Some(if dev.reported_version == 0 {
                        "never connected".to_owned()
                    } else {
                        "offline: continues when it reconnects".to_owned()
                    }),
                );
            }
            (update_step(dev, rollout), None)
        }
    }
}

/// Where a device is in its update, from the `update` sub-state it reports
/// (docs/PROTOCOL.md): `notified` until it says.
fn update_step(dev: &DeviceRecord, rollout: &RolloutRecord) -> DeviceStatus {
    let Some(fw) = rollout.firmware() else {
        return DeviceStatus::Notified;
    };
    let Some(update) = dev.reported.get("update") else {
        return DeviceStatus::Notified;
    };
    if update.get("target").and_then(Value::as_str) != Some(fw) {
        return DeviceStatus::Notified;
    }
    match update.get("state").and_then(Value::as_str).unwrap_or("") {
        "downloading" | "verifying" => DeviceStatus::Downloading,
        "installing" => DeviceStatus::Installing,
        "rebooting" => DeviceStatus::Rebooting,
        "health-check" | "health_check" | "verifying-boot" => DeviceStatus::Verifying,
        _ => DeviceStatus::Notified,
    }
}

/// Is the failure of this kind? A device's refusal reads "device rejected
/// command …" (fleet's `on_ack`); everything else ran out of retries.
pub fn failure_is(kind: FailureType, reason: &str) -> bool {
    let rejected = reason.starts_with("device rejected");
    match kind {
        FailureType::Any => true,
        FailureType::Rejected => rejected,
        FailureType::TimedOut => !rejected,
    }
}

/// Checks a spec against what a rollout may be; `published` says whether a
/// release of this version exists.
pub fn check_spec(
    spec: &RolloutSpec,
    published: impl Fn(&str) -> bool,
) -> Result<State, Rejection> {
    let bad = |code: &'static str, reason: String| Err(Rejection::new(code, reason));
    if cityplane_proto::validate_id(&spec.name).is_err() {
        return bad(
            "bad_name",
            format!(
                "rollout name {:?} must match [a-z0-9][a-z0-9._-]{{0,63}}",
                spec.name
            ),
        );
    }
    match &spec.target {
        Target::Ids(l) if l.ids.is_empty() => {
            return bad("bad_target", "target ids is empty".into())
        }
        Target::Selector(s) if s.is_empty() => {
            return bad(
                "bad_target",
                "an empty selector is refused; use {\"all\": true} for the whole fleet".into(),
            )
        }
        _ => {}
    }
    if spec.state.contains_key(FIRMWARE_KEY) {
        return bad(
            "bad_schema",
            "set firmware with \"firmware\": \"VERSION\", not in \"state\" (the release is \
             attached to the command)"
                .into(),
        );
    }
    let mut patch = spec.state.clone();
    if let Some(name) = &spec.secret {
        if !patch.is_empty() || spec.firmware.is_some() {
            return bad(
                "bad_schema",
                "a secret rotation sets its key alone: no \"state\" or \"firmware\" with \"secret\""
                    .into(),
            );
        }
        if cityplane_proto::validate_id(name).is_err()
            || matches!(name.as_str(), FIRMWARE_KEY | "class" | "labels")
        {
            return bad(
                "bad_schema",
                format!(
                    "secret key {name:?} must match [a-z0-9][a-z0-9._-]{{0,63}} and not be firmware, class or labels"
                ),
            );
        }
        patch.insert(name.clone(), secret_placeholder());
    }
    if let Some(fw) = &spec.firmware {
        if !published(fw) {
            return bad(
                "not_found",
                format!(
                    "no release {fw} is published: `cityplane firmware publish RELEASE.json --image IMAGE` first"
                ),
            );
        }
        patch.insert(FIRMWARE_KEY.to_owned(), Value::String(fw.clone()));
    }
    if patch.is_empty() {
        return bad(
            "bad_schema",
            "a rollout needs \"firmware\" or a non-empty \"state\"".into(),
        );
    }
    if spec.waves.is_empty() || spec.waves.len() > 100 {
        return bad("bad_waves", "1 to 100 waves".into());
    }
    for (i, w) in spec.waves.iter().enumerate() {
        match (w.count, w.percent) {
            (Some(c), None) if c > 0 => {}
            (None, Some(p)) if p > 0.0 && p <= 100.0 => {}
            _ => {
                return bad(
                    "bad_waves",
                    format!(
                    "wave {}: give exactly one of \"count\" (> 0) or \"percent\" (0 < p <= 100)",
                    i + 1
                ),
                )
            }
        }
    }
    if let Some(r) = &spec.rate {
        if r.per_minute == 0 || !(1.0..=10.0).contains(&r.increase_factor) {
            return bad(
                "bad_schema",
                "rate: per_minute > 0 and increase_factor from 1 to 10".into(),
            );
        }
    }
    if !(0.0..=100.0).contains(&spec.success_threshold) {
        return bad(
            "bad_schema",
            "success_threshold is a percent (0..100)".into(),
        );
    }
    for r in &spec.abort {
        if !(0.0..=100.0).contains(&r.threshold_percent) {
            return bad(
                "bad_schema",
                "abort threshold_percent is a percent (0..100)".into(),
            );
        }
    }
    for r in &spec.health.rules {
        if !["==", "!=", "<", "<=", ">", ">="].contains(&r.op.as_str()) || r.key.is_empty() {
            return bad(
                "bad_schema",
                format!(
                    "health rule {:?} {:?}: op is one of == != < <= > >=",
                    r.key, r.op
                ),
            );
        }
        if !matches!(r.op.as_str(), "==" | "!=") && !r.value.is_number() {
            return bad(
                "bad_schema",
                format!("health rule {}: {} needs a number", r.key, r.op),
            );
        }
    }
    if let Some(w) = &spec.window {
        w.validate()
            .map_err(|e| Rejection::new("bad_window", format!("window: {e}")))?;
    }
    if spec.jitter_s > 24 * 3600 {
        return bad("bad_schema", "jitter_s is at most 86400".into());
    }
    Ok(patch)
}

/// Orders devices so that consecutive slices spread over the values of
/// label `by` (round robin over the values, each value's ids in order):
/// the first wave is not "the first N ids", which are often one street.
pub fn spread_order(devices: &[&DeviceRecord], by: &str) -> Vec<String> {
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for d in devices {
        let key = d.attrs.labels.get(by).map_or("", String::as_str);
        groups.entry(key).or_default().push(&d.id);
    }
    for ids in groups.values_mut() {
        ids.sort_unstable();
    }
    let mut out = Vec::with_capacity(devices.len());
    let mut cursors: Vec<std::slice::Iter<&str>> = groups.values().map(|v| v.iter()).collect();
    loop {
        let before = out.len();
        for c in cursors.iter_mut() {
            if let Some(id) = c.next() {
                out.push((*id).to_owned());
            }
        }
        if out.len() == before {
            return out;
        }
    }
}

/// The size of each wave for `total` devices: counts as given, percents
/// rounded up (a wave of a percent is never empty), the last wave takes
/// whatever is left.
pub fn wave_sizes(waves: &[WaveSpec], total: usize) -> Vec<usize> {
    let mut left = total;
    let mut sizes = Vec::with_capacity(waves.len());
    for (i, w) in waves.iter().enumerate() {
        let want = if i + 1 == waves.len() {
            left
        } else {
            match (w.count, w.percent) {
                (Some(c), _) => c,
                (_, Some(p)) => ((total as f64) * p / 100.0).ceil() as usize,
                _ => 0,
            }
        };
        let n = want.min(left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

/// Per-status counts of a set of devices.
pub type Counts = BTreeMap<&'static str, usize>;

pub fn count(counts: &mut Counts, s: DeviceStatus) {
    *counts.entry(s.as_str()).or_default() += 1;
}

#[cfg(test)]
mod tests {
    use super::*;
    use cityplane_proto::messages::Attributes;
    use serde_json::json;

    fn dev(id: &str, zone: &str) -> DeviceRecord {
        let mut d = DeviceRecord::new(id);
        d.attrs = Attributes {
            labels: [("zone".to_owned(), zone.to_owned())].into(),
            ..Default::default()
        };
        d
    }

    #[test]
    fn waves_are_spread_over_zones_and_sized_from_the_total() {
        let devices: Vec<DeviceRecord> = (0..9)
            .map(|i| dev(&format!("d{i}"), if i < 6 { "north" } else { "south" }))
            .collect();
        let refs: Vec<&DeviceRecord> = devices.iter().collect();
        let order = spread_order(&refs, "zone");
        assert_eq!(&order[..4], ["d0", "d6", "d1", "d7"]);
        assert_eq!(order.len(), 9);
        let spec = default_waves();
        assert_eq!(wave_sizes(&spec, 10_000), vec![100, 1000, 8900]);
        assert_eq!(wave_sizes(&spec, 9), vec![1, 1, 7]);
        assert_eq!(wave_sizes(&spec, 0), vec![0, 0, 0]);
        let counts = [
            WaveSpec {
                count: Some(5),
                percent: None,
            },
            WaveSpec {
                count: Some(50),
                percent: None,
            },
            WaveSpec {
                count: None,
                percent: Some(1.0),
            },
        ];
        assert_eq!(wave_sizes(&counts, 30), vec![5, 25, 0]);
    }

    #[test]
    fn health_rules_read_dotted_paths_and_fail_on_missing_keys() {
        let reported: State = json!({"healthy": true, "health": {"error_rate": 0.002}})
            .as_object()
            .cloned()
            .unwrap();
        let rule = |k: &str, op: &str, v: Value| HealthRule {
            key: k.into(),
            op: op.into(),
            value: v,
        };
        assert!(rule("healthy", "==", json!(true)).check(&reported));
        assert!(rule("health.error_rate", "<", json!(0.01)).check(&reported));
        assert!(!rule("health.error_rate", ">", json!(0.01)).check(&reported));
        assert!(!rule("missing", "!=", json!(1)).check(&reported));
        assert!(!rule("healthy", "<", json!(1)).check(&reported));
    }

    #[test]
    fn a_spec_is_checked_before_anything_is_stored() {
        let spec = |v: Value| serde_json::from_value::<RolloutSpec>(v).unwrap();
        let published = |v: &str| v == "2.0.0";
        let ok = spec(json!({"name": "r1", "target": {"all": true}, "firmware": "2.0.0"}));
        let patch = check_spec(&ok, published).unwrap();
        assert_eq!(patch.get("firmware"), Some(&json!("2.0.0")));
        for (v, code) in [
            (
                json!({"name": "r1", "target": {"all": true}, "firmware": "9.9.9"}),
                "not_found",
            ),
            (
                json!({"name": "R 1", "target": {"all": true}, "state": {"a": 1}}),
                "bad_name",
            ),
            (
                json!({"name": "r1", "target": {}, "state": {"a": 1}}),
                "bad_target",
            ),
            (json!({"name": "r1", "target": {"all": true}}), "bad_schema"),
            (
                json!({"name": "r1", "target": {"all": true}, "state": {"firmware": "1"}}),
                "bad_schema",
            ),
            (
                json!({"name": "r1", "target": {"all": true}, "state": {"a": 1}, "waves": []}),
                "bad_waves",
            ),
            (
                json!({"name": "r1", "target": {"all": true}, "state": {"a": 1}, "waves": [{"count": 1, "percent": 2}]}),
                "bad_waves",
            ),
            (
                json!({"name": "r1", "target": {"all": true}, "state": {"a": 1}, "health": {"rules": [{"key": "x", "op": "<", "value": "a"}]}}),
                "bad_schema",
            ),
        ] {
            assert_eq!(
                check_spec(&spec(v.clone()), published)
                    .err()
                    .map(|r| r.code),
                Some(code),
                "{v}"
            );
        }
    }
}
