//! Desired-state arithmetic: merging overlapping documents and the delta
//! between desired and reported (AWS IoT shadow semantics, top-level keys).

use std::collections::BTreeMap;

use cityplane_proto::messages::{Attributes, State, Target};
use serde_json::Value;

use crate::reported::ReportedState;

/// Keys in desired whose value differs from reported. A `null` in desired
/// means "absent": it is in the delta only while reported still has the key.
/// Keys only in reported are ignored. Values (arrays, objects) compare whole.
pub fn delta(desired: &State, reported: &State) -> State {
    desired
        .iter()
        .filter(|(key, want)| match (want, reported.get(*key)) {
            (Value::Null, None) => false,
            (want, Some(have)) => *want != have,
            (_, None) => true,
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// [`delta`] against the reported state the controller holds, parsing only
/// the keys desired names.
pub fn delta_reported(desired: &State, reported: &ReportedState) -> State {
    delta(desired, &reported.pick_keys_of(desired))
}

/// Applies a command's state the way a device must: set every key, `null` deletes.
pub fn apply(state: &mut State, change: &State) {
    for (key, value) in change {
        if value.is_null() {
            state.remove(key);
        } else {
            state.insert(key.clone(), value.clone());
        }
    }
}

/// One stored desired document as the merge sees it.
pub struct Layer<'a> {
    pub priority: i64,
    /// Global write sequence: newer wins a priority tie.
    pub seq: u64,
    pub state: &'a State,
}

/// Merges the documents that target one device: per key, the highest
/// priority wins, the newest on a tie (Azure automatic device management).
pub fn merge<'a>(layers: impl IntoIterator<Item = Layer<'a>>) -> State {
    let mut winners: BTreeMap<&str, (i64, u64, &Value)> = BTreeMap::new();
    for layer in layers {
        for (key, value) in layer.state {
            let rank = (layer.priority, layer.seq);
            match winners.get(key.as_str()) {
                Some((p, s, _)) if (*p, *s) >= rank => {}
                _ => {
                    winners.insert(key, (layer.priority, layer.seq, value));
                }
            }
        }
    }
    winners
        .into_iter()
        .map(|(k, (_, _, v))| (k.to_owned(), v.clone()))
        .collect()
}

/// Does `target` select the device with this id and registry attributes?
pub fn selects(target: &Target, id: &str, attrs: &Attributes) -> bool {
    match target {
        Target::Ids(list) => list.ids.iter().any(|i| i == id),
        Target::Selector(sel) => sel.matches(id, attrs),
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
    fn delta_table() {
        let cases = [
            // (desired, reported, delta)
            (json!({"a": 1}), json!({"a": 1}), json!({})),
            (json!({"a": 1}), json!({"a": 2}), json!({"a": 1})),
            (json!({"a": 1}), json!({}), json!({"a": 1})),
            (json!({}), json!({"extra": 1}), json!({})),
            (json!({"a": null}), json!({"a": 1}), json!({"a": null})),
            (json!({"a": null}), json!({}), json!({})),
            (
                json!({"a": [1, 2]}),
                json!({"a": [1]}),
                json!({"a": [1, 2]}),
            ),
            (json!({"a": [1, 2]}), json!({"a": [1, 2]}), json!({})),
            (
                json!({"a": {"x": 1}}),
                json!({"a": {"x": 1, "y": 2}}),
                json!({"a": {"x": 1}}),
            ),
        ];
        for (desired, reported, want) in cases {
            assert_eq!(
                Value::Object(delta(&state(desired.clone()), &state(reported.clone()))),
                want,
                "desired {desired} reported {reported}"
            );
        }
    }

    #[test]
    fn higher_priority_wins_then_newest() {
        let low_new = state(json!({"dim": 10, "only_low": true}));
        let high_old = state(json!({"dim": 90}));
        let tie_old = state(json!({"mode": "a"}));
        let tie_new = state(json!({"mode": "b"}));
        let merged = merge([
            Layer {
                priority: 1,
                seq: 9,
                state: &low_new,
            },
            Layer {
                priority: 5,
                seq: 2,
                state: &high_old,
            },
            Layer {
                priority: 0,
                seq: 3,
                state: &tie_old,
            },
            Layer {
                priority: 0,
                seq: 4,
                state: &tie_new,
            },
        ]);
        assert_eq!(
            Value::Object(merged),
            json!({"dim": 90, "only_low": true, "mode": "b"})
        );
    }

    #[test]
    fn selectors_match_class_labels_owner_and_prefix() {
        let lamp = Attributes {
            class: Some("streetlight".into()),
            labels: [("zone".to_owned(), "north".to_owned())].into(),
            owner: Some("lighting-co".into()),
        };
        let bare = Attributes::default();
        let sel = |v: Value| serde_json::from_value::<Target>(v).expect("target");
        let both = sel(json!({"class": "streetlight", "labels": {"zone": "north"}}));
        assert!(selects(&both, "l1", &lamp));
        assert!(!selects(&both, "l1", &bare));
        assert!(!selects(&sel(json!({"class": "camera"})), "l1", &lamp));
        assert!(!selects(
            &sel(json!({"labels": {"zone": "south"}})),
            "l1",
            &lamp
        ));
        assert!(selects(&sel(json!({"owner": "lighting-co"})), "l1", &lamp));
        assert!(!selects(&sel(json!({"owner": "waste-co"})), "l1", &lamp));
        assert!(!selects(&sel(json!({"owner": "lighting-co"})), "l1", &bare));
        assert!(selects(&sel(json!({"id_prefix": "l"})), "l1", &bare));
        assert!(selects(&sel(json!({"all": true})), "l1", &bare));
        assert!(selects(&sel(json!({"ids": ["l1", "l2"]})), "l1", &bare));
        assert!(!selects(&sel(json!({"ids": ["l2"]})), "l1", &lamp));
    }
}
