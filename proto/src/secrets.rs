//! Secret-valued desired state (docs/PROTOCOL.md, "Secrets"): a key such as
//! `admin_password` appears in desired and reported state only as a
//! reference, `{"secret": {"fingerprint": "<16 hex>", "rotated_at": "<RFC
//! 3339>"}}`; the plaintext travels only in a command's `secrets` map, on
//! the device's own commands topic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Hex digits of a fingerprint: the first 64 bits of SHA-256. Enough to
/// tell a device's current secret from its previous one and to show an
/// operator that a rotation happened; useless for guessing a secret of
/// 128 random bits.
pub const FINGERPRINT_HEX: usize = 16;

/// The first [`FINGERPRINT_HEX`] lowercase hex digits of the SHA-256 of
/// `plaintext`.
pub fn fingerprint(plaintext: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, plaintext.as_bytes());
    let mut hex = String::with_capacity(FINGERPRINT_HEX);
    for b in digest.as_ref().iter().take(FINGERPRINT_HEX / 2) {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

/// What state holds in place of a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    pub fingerprint: String,
    /// RFC 3339.
    pub rotated_at: String,
}

impl SecretRef {
    /// The reference a state value is, if it is one: an object whose only
    /// field is `secret`, an object with a string `fingerprint` (and
    /// `rotated_at`).
    pub fn of(value: &Value) -> Option<SecretRef> {
        let outer = value.as_object()?;
        if outer.len() != 1 {
            return None;
        }
        let inner = outer.get("secret")?.as_object()?;
        Some(SecretRef {
            fingerprint: inner.get("fingerprint")?.as_str()?.to_owned(),
            rotated_at: inner
                .get("rotated_at")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        })
    }

    pub fn to_value(&self) -> Value {
        json!({"secret": {"fingerprint": self.fingerprint, "rotated_at": self.rotated_at}})
    }
}

/// A command's plaintexts, by state key. Its `Debug` names the keys and
/// never the values, so logging a command (or an error holding one) cannot
/// leak a secret; only serialization, for the device's own topic, writes
/// them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretMap(pub BTreeMap<String, String>);

impl SecretMap {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    pub fn insert(&mut self, key: String, plaintext: String) {
        self.0.insert(key, plaintext);
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }
}

impl std::fmt::Debug for SecretMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_plaintext() {
        let mut m = SecretMap::default();
        m.insert("admin_password".into(), "hunter2-very-secret".into());
        let shown = format!("{m:?} {m:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("admin_password"), "{shown}");
    }

    #[test]
    fn only_the_reference_shape_is_a_reference() {
        let r = SecretRef {
            fingerprint: fingerprint("x"),
            rotated_at: "2026-11-30T19:00:00Z".into(),
        };
        assert_eq!(SecretRef::of(&r.to_value()), Some(r.clone()));
        assert_eq!(r.fingerprint.len(), FINGERPRINT_HEX);
        for not in [
            json!("x"),
            json!({"secret": "x"}),
            json!({"secret": {"fingerprint": 1}}),
            json!({"secret": {"fingerprint": "ab"}, "other": 1}),
        ] {
            assert_eq!(SecretRef::of(&not), None, "{not}");
        }
    }
}
