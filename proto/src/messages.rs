//! JSON bodies of the cityplane contract (docs/PROTOCOL.md). Unknown fields
//! are refused in everything the controller receives, so a typo is an error,
//! not a silently ignored setting.
//!
//! Every body is a JSON object and nothing else: serde's derived
//! `Deserialize` also fills a struct from an array of its fields in order
//! (`[7, {}]` would be a report), so each type here derives into an inherent
//! function (`remote = "Self"`) and its trait impls, written by
//! [`object_only!`](crate::object_only), reach it only through a map.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A device's state document: a JSON object.
pub type State = Map<String, Value>;

/// `devices/D/reported`: the device's full state, stamped with its own
/// monotonically increasing `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Reported {
    pub version: u64,
    pub state: State,
}

/// `devices/D/commands`: keys to set (`null` deletes), carrying the desired
/// generation they come from and a unique id so replays are recognised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Command {
    pub id: String,
    pub generation: u64,
    pub state: State,
    /// The signed release to install, when `state` sets `firmware`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<crate::firmware::SignedRelease>,
    /// A certificate signed for the device's pending rotation (the answer
    /// to its `devices/D/csr`). A command carrying one sets no state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateDelivery>,
    /// Plaintexts of the secret references `state` sets, by key
    /// ([`crate::secrets`]). Filled in by the controller just before the
    /// command is published, never stored; its `Debug` redacts them.
    #[serde(default, skip_serializing_if = "crate::secrets::SecretMap::is_empty")]
    pub secrets: crate::secrets::SecretMap,
}

/// The device's certificate for rotation `rotation`, signed by the CA from
/// the device's CSR (`Command::certificate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct CertificateDelivery {
    pub rotation: String,
    /// The certificate, PEM.
    pub pem: String,
}

/// `devices/D/csr`: a device asks for a certificate for rotation
/// `rotation`; the key pair was generated on the device and never leaves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct CsrRequest {
    pub rotation: String,
    /// PKCS#10, PEM.
    pub csr: String,
}

/// The value of the `certificate` key in desired and reported state:
/// `{"rotation": R}`, the rotation whose certificate the device uses
/// (`issued` for the certificate it was provisioned with).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct CertificateState {
    pub rotation: String,
}

impl CertificateState {
    /// The state key.
    pub const KEY: &'static str = "certificate";
    /// The rotation of a device's provisioned certificate.
    pub const ISSUED: &'static str = "issued";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckStatus {
    Applied,
    Rejected,
}

impl<'de> Deserialize<'de> for AckStatus {
    /// A string and nothing else: serde's derived enum also takes
    /// `{"applied": null}`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        match &*s {
            "applied" => Ok(AckStatus::Applied),
            "rejected" => Ok(AckStatus::Rejected),
            other => Err(serde::de::Error::unknown_variant(
                other,
                &["applied", "rejected"],
            )),
        }
    }
}

/// `devices/D/acks`: the device's answer to one command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Ack {
    pub id: String,
    pub status: AckStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `devices/D/presence`: published by the broker on connect (`true`, with
/// the serial of the certificate the session authenticated with) and on
/// disconnect or as the device's will (`false`, no serial).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Presence {
    pub online: bool,
    /// Canonical hex serial (as `cityplane_certs` reports it). A device's
    /// will may not carry one (the broker refuses it): only the edge, which
    /// saw the certificate, says which one a device is using.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// Which devices a desired document applies to: a list of ids or a selector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", untagged)]
pub enum Target {
    Ids(IdList),
    Selector(Selector),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct IdList {
    pub ids: Vec<String>,
}

/// Every given field must match; `all: true` alone selects the whole fleet
/// (an empty selector is refused, so nobody targets everything by accident).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.class.is_none()
            && self.labels.is_empty()
            && self.id_prefix.is_none()
            && self.owner.is_none()
            && !self.all
    }

    /// Does this selector pick the device with this id and registry attributes?
    pub fn matches(&self, id: &str, attrs: &Attributes) -> bool {
        self.class
            .as_deref()
            .is_none_or(|c| attrs.class.as_deref() == Some(c))
            && self
                .owner
                .as_deref()
                .is_none_or(|o| attrs.owner.as_deref() == Some(o))
            && self.id_prefix.as_deref().is_none_or(|p| id.starts_with(p))
            && self
                .labels
                .iter()
                .all(|(k, v)| attrs.labels.get(k) == Some(v))
    }
}

/// What the registry knows of a device, set by operators (at issue, in a
/// manifest, with `devices label`), never by the device: selectors match
/// these, so a device cannot move itself into another document's target by
/// what it reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Attributes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// One device of a provisioning manifest (`cityplane devices register`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct Registration {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

impl Registration {
    pub fn attributes(&self) -> Attributes {
        Attributes {
            class: self.class.clone(),
            labels: self.labels.clone(),
            owner: self.owner.clone(),
        }
    }
}

/// What `cityplane apply -f FILE` sends to `fleet/desired/<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
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
    /// When the sender stops waiting (RFC 3339): taken up later, the write
    /// is refused with `expired` (docs/PROTOCOL.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// The controller's answer on `fleet/responses/<operator>/<request id>`,
/// tagged by `status`: a document `accepted`, a query or registry write
/// `ok` with its `result`, or `rejected` with a stable `code`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Response {
    Accepted {
        request_id: String,
        name: String,
        generation: u64,
        /// Devices the document targets now (registered, seen or not).
        devices: usize,
    },
    Ok {
        request_id: String,
        result: Value,
    },
    Rejected {
        request_id: String,
        code: String,
        reason: String,
    },
}

impl Response {
    pub fn request_id(&self) -> &str {
        match self {
            Response::Accepted { request_id, .. }
            | Response::Ok { request_id, .. }
            | Response::Rejected { request_id, .. } => request_id,
        }
    }
}

crate::object_only!(serialize: Reported, Command, CertificateDelivery, CsrRequest, CertificateState, Ack, Presence, Target, IdList, Selector, DesiredDoc, Attributes, Registration);

/// Implements `Deserialize` for types whose derived deserializer is an
/// inherent function (`#[serde(remote = "Self")]`) so that they are read from
/// a JSON object only; anything else is "invalid type: …, expected a JSON
/// object". With `serialize:` it also implements `Serialize` through the
/// derived inherent function.
#[macro_export]
macro_rules! object_only {
    (serialize: $($ty:ident),+ $(,)?) => {
        $crate::object_only!($($ty),+);
        $(
            impl $crate::__serde::Serialize for $ty {
                fn serialize<S: $crate::__serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    $ty::serialize(self, s)
                }
            }
        )+
    };
    ($($ty:ident),+ $(,)?) => {$(
        impl<'de> $crate::__serde::Deserialize<'de> for $ty {
            fn deserialize<D: $crate::__serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct ObjectOnly;
                impl<'de> $crate::__serde::de::Visitor<'de> for ObjectOnly {
                    type Value = $ty;
                    fn expecting(&self, f: &mut ::std::fmt::Formatter) -> ::std::fmt::Result {
                        f.write_str(concat!("a JSON object (", stringify!($ty), ")"))
                    }
                    fn visit_map<A: $crate::__serde::de::MapAccess<'de>>(self, map: A) -> Result<$ty, A::Error> {
                        // The inherent (derived) function, not this trait's.
                        $ty::deserialize($crate::__serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(ObjectOnly)
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;

    #[test]
    fn an_ack_status_is_a_string_only() {
        for (json, want) in [
            (r#""applied""#, AckStatus::Applied),
            (r#""rejected""#, AckStatus::Rejected),
        ] {
            assert_eq!(serde_json::from_str::<AckStatus>(json).unwrap(), want);
        }
        for bad in [r#"{"applied":null}"#, r#""Applied""#, r#"["applied"]"#, "0"] {
            assert!(serde_json::from_str::<AckStatus>(bad).is_err(), "{bad}");
        }
    }

    /// `object` is accepted and serializes back to itself; the same fields
    /// as an array (what serde's derived impls would take) are refused.
    fn only_objects<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
        object: &str,
        array: &str,
    ) {
        let t: T = serde_json::from_str(object).expect(object);
        let back: Value = serde_json::to_value(&t).expect("serializes");
        assert_eq!(back, serde_json::from_str::<Value>(object).expect("json"));
        let e = serde_json::from_str::<T>(array).expect_err(array);
        assert!(e.is_data(), "{array}: {e}");
        assert!(
            e.to_string().contains("expected a JSON object"),
            "{array}: {e}"
        );
        for other in ["null", "1", "\"x\"", "true", "[]"] {
            assert!(
                serde_json::from_str::<T>(other).is_err(),
                "{other} accepted"
            );
        }
    }

    #[test]
    fn responses_keep_their_wire_shape() {
        let cases = [
            (
                Response::Accepted {
                    request_id: "r1".into(),
                    name: "dim".into(),
                    generation: 2,
                    devices: 30,
                },
                r#"{"status":"accepted","request_id":"r1","name":"dim","generation":2,"devices":30}"#,
            ),
            (
                Response::Ok {
                    request_id: "r2".into(),
                    result: serde_json::json!({"total": 1}),
                },
                r#"{"status":"ok","request_id":"r2","result":{"total":1}}"#,
            ),
            (
                Response::Rejected {
                    request_id: "r3".into(),
                    code: "conflict".into(),
                    reason: "stale".into(),
                },
                r#"{"status":"rejected","request_id":"r3","code":"conflict","reason":"stale"}"#,
            ),
        ];
        for (response, wire) in cases {
            let want: Value = serde_json::from_str(wire).unwrap();
            assert_eq!(serde_json::to_value(&response).unwrap(), want);
            assert_eq!(serde_json::from_value::<Response>(want).unwrap(), response);
        }
    }

    #[test]
    fn reported_is_an_object_only() {
        only_objects::<Reported>(r#"{"version":3,"state":{"a":1}}"#, r#"[3, {"a": 1}]"#);
    }

    #[test]
    fn command_is_an_object_only() {
        only_objects::<Command>(r#"{"id":"c","generation":2,"state":{}}"#, r#"["c", 2, {}]"#);
    }

    #[test]
    fn ack_is_an_object_only() {
        only_objects::<Ack>(r#"{"id":"c","status":"applied"}"#, r#"["c", "applied"]"#);
    }

    #[test]
    fn presence_is_an_object_only() {
        only_objects::<Presence>(r#"{"online":true}"#, "[true]");
        only_objects::<Presence>(r#"{"online":true,"serial":"0a1b"}"#, r#"[true, "0a1b"]"#);
    }

    #[test]
    fn rotation_bodies_are_objects_only_and_strict() {
        only_objects::<Command>(
            r#"{"id":"c","generation":2,"state":{},"certificate":{"rotation":"r1","pem":"P"}}"#,
            r#"["c", 2, {}, null, {"rotation": "r1", "pem": "P"}]"#,
        );
        only_objects::<CertificateDelivery>(r#"{"rotation":"r1","pem":"P"}"#, r#"["r1", "P"]"#);
        only_objects::<CsrRequest>(r#"{"rotation":"r1","csr":"C"}"#, r#"["r1", "C"]"#);
        only_objects::<CertificateState>(r#"{"rotation":"r1"}"#, r#"["r1"]"#);
        for bad in [
            r#"{"id":"c","generation":2,"state":{},"certificate":["r1","P"]}"#,
            r#"{"id":"c","generation":2,"state":{},"certificate":{"rotation":"r1","pem":"P","key":"K"}}"#,
        ] {
            assert!(serde_json::from_str::<Command>(bad).is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<CsrRequest>(r#"{"rotation":"r1"}"#).is_err());
        assert!(serde_json::from_str::<CertificateState>(r#"{"rotation":"r1","x":1}"#).is_err());
    }

    #[test]
    fn id_list_is_an_object_only() {
        only_objects::<IdList>(r#"{"ids":["a"]}"#, r#"[["a"]]"#);
    }

    #[test]
    fn selector_is_an_object_only() {
        only_objects::<Selector>(r#"{"class":"lamp"}"#, r#"["lamp"]"#);
    }

    #[test]
    fn target_is_an_object_only() {
        only_objects::<Target>(r#"{"ids":["a"]}"#, r#"[["a"]]"#);
        only_objects::<Target>(r#"{"labels":{"zone":"n"}}"#, r#"[null, {"zone": "n"}]"#);
    }

    #[test]
    fn desired_doc_is_an_object_only_down_to_its_target() {
        only_objects::<DesiredDoc>(
            r#"{"name":"n","target":{"ids":["a"]},"priority":3,"state":{}}"#,
            r#"["n", {"ids": ["a"]}, 3, {}, null, "r-1"]"#,
        );
        for target in [r#"[["a"]]"#, "[]", r#""a""#] {
            let doc = format!(r#"{{"name":"n","target":{target},"state":{{}}}}"#);
            assert!(serde_json::from_str::<DesiredDoc>(&doc).is_err(), "{doc}");
        }
    }
}
