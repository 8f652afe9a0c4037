//! The pure heart of the controller: given what a device should be and what
//! it is, decide the next step. No I/O, no clock: `now` is an argument.

use std::time::Duration;

use cityplane_proto::messages::State;

use crate::delta::delta_reported;
use crate::model::{DeviceRecord, Millis};

/// Retries: per-command timeout, exponential backoff with jitter, a cap.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub command_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Sends of one change before the device is marked `Failed`.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            command_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1`: base × 2^(attempt-1), capped, then
    /// scaled into [50 %, 100 %] by `jitter` ∈ [0, 1) ("equal jitter"), so a
    /// fleet that failed together does not retry together.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)));
        let capped = exp.min(self.backoff_max);
        capped.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// Deterministic jitter in [0, 1) from the device and attempt, so retries
/// spread out without a random number generator in the pure core.
pub fn jitter(device: &str, attempt: u32) -> f64 {
    let h = fnv1a(device.bytes().chain(attempt.to_le_bytes()));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// FNV-1a (64 bits): a hash that stays the same across runs, machines and
/// Rust versions (std's `DefaultHasher` promises none of that), so the
/// spreads derived from it survive a controller upgrade.
pub(crate) fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Reported matches desired.
    InSync,
    /// Nothing to do until an event arrives (offline, failed, never reported).
    Idle,
    /// Send a new command with these keys.
    Send { state: State },
    /// Send the in-flight command again, same id.
    Resend,
    /// Look again at this time.
    WaitUntil(Millis),
    /// Give up on this change.
    Fail { reason: String },
}

pub fn reconcile(device: &DeviceRecord, now: Millis, policy: &RetryPolicy) -> Action {
    if device.reported_version == 0 {
        return Action::Idle;
    }
    let delta = delta_reported(&device.desired, &device.reported);
    if delta.is_empty() {
        return Action::InSync;
    }
    if device.failed.is_some() || !device.online {
        return Action::Idle;
    }
    let current = device
        .inflight
        .as_ref()
        .filter(|c| c.generation == device.desired_generation && c.state == delta);
    let Some(cmd) = current else {
        return Action::Send { state: delta };
    };
    let timeout_at = cmd.sent_at + policy.command_timeout.as_millis() as Millis;
    if now < timeout_at {
        return Action::WaitUntil(timeout_at);
    }
    if cmd.attempt >= policy.max_attempts {
        return Action::Fail {
            reason: format!(
                "no effect after {} attempts of command {} (timeout {:?} each)",
                cmd.attempt, cmd.id, policy.command_timeout
            ),
        };
    }
    let retry_at = timeout_at
        + policy
            .backoff(cmd.attempt, jitter(&device.id, cmd.attempt))
            .as_millis() as Millis;
    if now < retry_at {
        Action::WaitUntil(retry_at)
    } else {
        Action::Resend
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::apply;
    use crate::model::Inflight;
    use crate::model::ReportedState;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn state(v: Value) -> State {
        v.as_object().cloned().expect("object")
    }

    fn device(desired: Value, reported: Value) -> DeviceRecord {
        DeviceRecord {
            id: "d1".into(),
            desired: state(desired),
            desired_generation: 7,
            reported: state(reported).into(),
            reported_version: 1,
            online: true,
            ..Default::default()
        }
    }

    fn inflight(state_: Value, generation: u64, sent_at: Millis, attempt: u32) -> Inflight {
        Inflight {
            id: "c1".into(),
            generation,
            state: state(state_),
            sent_at,
            attempt,
        }
    }

    #[test]
    fn reconcile_table() {
        let p = RetryPolicy::default();
        let t0 = 1_000_000;
        let timeout = p.command_timeout.as_millis() as u64;
        let mut never = device(json!({"a": 1}), json!({}));
        never.reported_version = 0;
        let mut offline = device(json!({"a": 1}), json!({}));
        offline.online = false;
        let mut failed = device(json!({"a": 1}), json!({}));
        failed.failed = Some("rejected".into());
        let mut waiting = device(json!({"a": 1}), json!({}));
        waiting.inflight = Some(inflight(json!({"a": 1}), 7, t0, 1));
        let mut stale_cmd = device(json!({"a": 1}), json!({}));
        stale_cmd.inflight = Some(inflight(json!({"a": 0}), 6, t0, 1));
        let mut exhausted = device(json!({"a": 1}), json!({}));
        exhausted.inflight = Some(inflight(json!({"a": 1}), 7, t0, p.max_attempts));
        let backoff1 = p.backoff(1, jitter("d1", 1)).as_millis() as u64;

        let cases: Vec<(&str, DeviceRecord, Millis, Action)> = vec![
            (
                "in sync",
                device(json!({"a": 1}), json!({"a": 1, "b": 2})),
                t0,
                Action::InSync,
            ),
            ("never reported", never, t0, Action::Idle),
            ("offline keeps desired", offline, t0, Action::Idle),
            ("failed waits for a re-drive", failed, t0, Action::Idle),
            (
                "differs: send",
                device(json!({"a": 1, "b": null}), json!({"b": 2})),
                t0,
                Action::Send {
                    state: state(json!({"a": 1, "b": null})),
                },
            ),
            (
                "in flight: wait for timeout",
                waiting.clone(),
                t0 + 1,
                Action::WaitUntil(t0 + timeout),
            ),
            (
                "timed out: back off",
                waiting.clone(),
                t0 + timeout,
                Action::WaitUntil(t0 + timeout + backoff1),
            ),
            (
                "backoff over: resend",
                waiting,
                t0 + timeout + backoff1,
                Action::Resend,
            ),
            (
                "desired moved on: new command",
                stale_cmd,
                t0 + 1,
                Action::Send {
                    state: state(json!({"a": 1})),
                },
            ),
            (
                "attempts exhausted",
                exhausted,
                t0 + timeout,
                Action::Fail {
                    reason: format!(
                        "no effect after {} attempts of command c1 (timeout {:?} each)",
                        p.max_attempts, p.command_timeout
                    ),
                },
            ),
        ];
        for (name, dev, now, want) in cases {
            assert_eq!(reconcile(&dev, now, &p), want, "{name}");
        }
    }

    #[test]
    fn backoff_grows_exponentially_within_jitter_and_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff(1, 0.0), Duration::from_millis(500));
        assert_eq!(
            p.backoff(1, 0.999_999),
            p.backoff_base.mul_f64(0.5 + 0.999_999 / 2.0)
        );
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(2));
        assert_eq!(p.backoff(30, 0.0), p.backoff_max / 2);
        for attempt in 1..10 {
            let j = jitter("lamp0001", attempt);
            assert!((0.0..1.0).contains(&j));
        }
        assert_ne!(jitter("a", 1), jitter("b", 1), "jitter spreads devices");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            (0i64..5).prop_map(Value::from),
            "[a-c]".prop_map(Value::from),
            prop::collection::vec(0i64..3, 0..3).prop_map(|v| json!(v)),
        ]
    }

    fn state_strategy() -> impl Strategy<Value = State> {
        prop::collection::btree_map("[a-e]", json_value(), 0..5)
            .prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// Applying the action the way a device does, then reconciling
        /// again, leaves nothing to do.
        #[test]
        fn applying_the_action_then_reconciling_is_a_no_op(desired in state_strategy(), reported in state_strategy()) {
            let mut dev = DeviceRecord {
                id: "d".into(),
                desired,
                desired_generation: 1,
                reported: reported.into(),
                reported_version: 1,
                online: true,
                ..Default::default()
            };
            let p = RetryPolicy::default();
            match reconcile(&dev, 0, &p) {
                Action::InSync => {}
                Action::Send { state } => {
                    let mut reported = dev.reported.to_state();
                    apply(&mut reported, &state);
                    dev.reported = reported.into();
                    dev.reported_version += 1;
                    prop_assert_eq!(reconcile(&dev, 0, &p), Action::InSync);
                    // And a second application (a replay) changes nothing.
                    let mut again = dev.reported.to_state();
                    apply(&mut again, &state);
                    prop_assert_eq!(ReportedState::from(again), dev.reported.clone());
                }
                other => prop_assert!(false, "unexpected action {:?}", other),
            }
        }
    }
}
