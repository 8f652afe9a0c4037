//! A device's reported state as the controller holds it: compact JSON text.
//!
//! A streetlight's report is ~400 bytes of JSON and ~4.2 KB as a
//! `serde_json::Map` (a B-tree node of ~630 bytes for each nested object,
//! plus a heap string per key). At 10,000 devices that difference is most
//! of what separated the server from 20 KiB per device (docs/BENCHMARKS.md,
//! "Per-message cost, session 21"). Readers parse what they need: the keys
//! a desired state or a rule names ([`ReportedState::pick`]), or the whole
//! state for a status view ([`ReportedState::to_state`]).

use std::borrow::Cow;
use std::fmt;

use cityplane_proto::messages::State;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// Compact JSON text of an object, always produced from a [`State`] (so
/// valid, keys sorted and unique): equal states have equal text.
/// `None` is the empty object.
#[derive(Clone, Default)]
pub struct ReportedState(Option<Box<RawValue>>);

impl ReportedState {
    pub fn new(state: &State) -> ReportedState {
        if state.is_empty() {
            return ReportedState(None);
        }
        // A map of JSON values always serializes.
        ReportedState(serde_json::value::to_raw_value(state).ok())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// The text (`{}` when empty).
    pub fn as_json(&self) -> &str {
        self.0.as_deref().map_or("{}", RawValue::get)
    }

    /// The whole state, parsed.
    pub fn to_state(&self) -> State {
        self.pick(|_| true)
    }

    /// The top-level keys `wanted` accepts, parsed; the others are skipped
    /// without being built.
    pub fn pick(&self, wanted: impl Fn(&str) -> bool) -> State {
        let Some(raw) = &self.0 else {
            return State::new();
        };
        let mut de = serde_json::Deserializer::from_str(raw.get());
        // The text was written from a map (see the type's invariant).
        Pick(wanted).deserialize(&mut de).unwrap_or_default()
    }

    /// The keys `other` has (a desired state, a patch): enough for
    /// [`crate::delta::delta`] and [`crate::rollout::holds`], which ignore
    /// keys only reported has.
    pub fn pick_keys_of(&self, other: &State) -> State {
        if other.is_empty() {
            return State::new();
        }
        self.pick(|k| other.contains_key(k))
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.pick(|k| k == key).remove(key)
    }
}

impl From<&State> for ReportedState {
    fn from(state: &State) -> ReportedState {
        ReportedState::new(state)
    }
}

impl From<State> for ReportedState {
    fn from(state: State) -> ReportedState {
        ReportedState::new(&state)
    }
}

impl PartialEq for ReportedState {
    fn eq(&self, other: &ReportedState) -> bool {
        self.as_json() == other.as_json()
    }
}

impl fmt::Debug for ReportedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_json())
    }
}

impl Serialize for ReportedState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            Some(raw) => raw.serialize(s),
            None => State::new().serialize(s),
        }
    }
}

/// Read as a map (a stored record, whatever its spacing or key order) and
/// written again as compact text, so the type's invariant holds.
impl<'de> Deserialize<'de> for ReportedState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ReportedState, D::Error> {
        State::deserialize(d).map(|s| ReportedState::new(&s))
    }
}

struct Pick<F>(F);

impl<'de, F: Fn(&str) -> bool> DeserializeSeed<'de> for Pick<F> {
    type Value = State;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<State, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: Fn(&str) -> bool> Visitor<'de> for Pick<F> {
    type Value = State;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<State, A::Error> {
        let mut out = State::new();
        while let Some(Key(key)) = map.next_key()? {
            if (self.0)(&key) {
                out.insert(key.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

/// A key borrowed from the text when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(v: Value) -> State {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn what_is_held_is_what_was_reported() {
        let s = state(json!({
            "dimming": 30, "labels": {"zone": "north"}, "a\"b": [1, 2.5, null],
            "security": {"services": {"telnet": false}}, "firmware": "2.4.1"
        }));
        let r = ReportedState::new(&s);
        assert_eq!(r.to_state(), s);
        assert_eq!(r.get("labels"), Some(json!({"zone": "north"})));
        assert_eq!(r.get("a\"b"), Some(json!([1, 2.5, null])));
        assert_eq!(r.get("zone"), None, "only top-level keys");
        let want = state(json!({"dimming": 0, "firmware": null, "other": 1}));
        assert_eq!(
            r.pick_keys_of(&want),
            state(json!({"dimming": 30, "firmware": "2.4.1"}))
        );
        assert!(!r.as_json().contains(' '), "compact: {}", r.as_json());
    }

    #[test]
    fn a_stored_record_round_trips_and_equal_states_compare_equal() {
        let s = state(json!({"b": 1, "a": {"y": true, "x": "é"}}));
        let r = ReportedState::new(&s);
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"a":{"x":"é","y":true},"b":1}"#);
        // Spacing and key order as another writer might have left them.
        let back: ReportedState =
            serde_json::from_str(r#"{ "b" : 1, "a": {"x":"é","y":true} }"#).unwrap();
        assert_eq!(back, r);
        assert_eq!(serde_json::to_value(&r).unwrap(), Value::Object(s));
        let empty = ReportedState::default();
        assert!(empty.is_empty() && empty.to_state().is_empty());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
        let back: ReportedState = serde_json::from_str("{}").unwrap();
        assert_eq!(back, empty);
        assert!(serde_json::from_str::<ReportedState>("[1]").is_err());
    }
}
