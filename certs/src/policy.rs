//! The city's policy key and the signed policy export (docs/PROTOCOL.md,
//! "The security policy").
//!
//! The policy key is Ed25519 and not the CA, like the release key: whoever
//! publishes the city's security policy need not be able to mint
//! identities, and the key can stay offline with the city's security
//! office. An export carries the exact JSON text of one policy version and
//! a signature over its bytes, so a contractor or an auditor can check
//! offline that the rules in hand are the city's.
//!
//! | file | what |
//! |---|---|
//! | `policy.key` | PKCS#8 Ed25519 private key, PEM, mode 0600 |
//! | `policy.pub` | the 32-byte public key, base64, one line |

use std::path::{Path, PathBuf};

use cityplane_proto::policy::{parse_policy, Policy, PolicyError};
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::signing::{self, KeyKind, SigningError};

/// The `format` of an export; another value is another format.
pub const POLICY_FORMAT: &str = "cityplane-policy/1";
pub const POLICY_KEY_FILE: &str = "policy.key";
pub const POLICY_PUB_FILE: &str = "policy.pub";

/// The policy key, for [`crate::signing`].
pub const POLICY_KEY: KeyKind = KeyKind {
    name: "policy",
    noun: "policy",
    trusted_by: "controllers, contractors and auditors",
    keygen: "cityplane policy keygen",
};

/// A signed policy version, as `policy export` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SignedPolicy {
    /// [`POLICY_FORMAT`].
    pub format: String,
    /// The version inside `policy`, repeated for readers; only the signed
    /// text counts ([`verify_policy`] refuses a mismatch).
    pub version: u64,
    /// The exact JSON text of a [`PolicyVersion`], as signed.
    pub policy: String,
    /// Standard base64 of the Ed25519 signature over `policy`'s bytes.
    pub signature: String,
}

/// What the signed text holds: one published version of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct PolicyVersion {
    pub version: u64,
    /// RFC 3339.
    pub published_at: String,
    /// The operator identity that published it.
    pub published_by: String,
    /// The policy document (read with [`parse_policy`]).
    pub policy: Value,
}

cityplane_proto::object_only!(serialize: SignedPolicy, PolicyVersion);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyExportError {
    #[error("{0}")]
    Key(String),
    #[error("format {0:?} is not {POLICY_FORMAT:?}: not a cityplane policy export, or from a newer version")]
    WrongFormat(String),
    #[error("bad signature: not signed by this policy key, or changed after signing")]
    BadSignature,
    #[error("the signed text is not a policy version: {0}")]
    BadText(String),
    #[error("the export says version {outer} but the signed text is version {signed}")]
    VersionMismatch { outer: u64, signed: u64 },
    #[error("the signed policy is not valid: {0}")]
    Policy(#[from] PolicyError),
}

fn key_error(e: SigningError) -> PolicyExportError {
    match e {
        SigningError::BadSignature => PolicyExportError::BadSignature,
        e => PolicyExportError::Key(e.to_string()),
    }
}

/// Creates `dir/policy.key` (0600) and `dir/policy.pub`; refuses to
/// replace a key unless `force`.
pub fn generate_policy_key(dir: &Path, force: bool) -> Result<PathBuf, PolicyExportError> {
    signing::generate_keypair(dir, POLICY_KEY, force).map_err(key_error)
}

pub fn read_policy_key(path: &Path) -> Result<Ed25519KeyPair, PolicyExportError> {
    signing::read_private_key(path, POLICY_KEY).map_err(key_error)
}

pub fn read_policy_public_key(path: &Path) -> Result<[u8; 32], PolicyExportError> {
    signing::read_public_key(path, POLICY_KEY).map_err(key_error)
}

/// Reads a policy version's text: the version and the checked policy.
pub fn parse_policy_version(text: &str) -> Result<(u64, Policy), PolicyExportError> {
    let v: PolicyVersion =
        serde_json::from_str(text).map_err(|e| PolicyExportError::BadText(e.to_string()))?;
    let policy = parse_policy(v.policy.to_string().as_bytes())?;
    Ok((v.version, policy))
}

/// Signs the exact text of a policy version (`{"version":N,"published_at":
/// …,"published_by":…,"policy":{…}}`); refuses text that is not one, so
/// nothing invalid ever carries the city's signature.
pub fn sign_policy(
    key: &Ed25519KeyPair,
    version_text: &str,
) -> Result<SignedPolicy, PolicyExportError> {
    let (version, _) = parse_policy_version(version_text)?;
    Ok(SignedPolicy {
        format: POLICY_FORMAT.to_owned(),
        version,
        signature: signing::sign_text(key, version_text),
        policy: version_text.to_owned(),
    })
}

/// The version and policy of an export, if `public_key` signed it.
pub fn verify_policy(
    public_key: &[u8; 32],
    signed: &SignedPolicy,
) -> Result<(u64, Policy), PolicyExportError> {
    if signed.format != POLICY_FORMAT {
        return Err(PolicyExportError::WrongFormat(signed.format.clone()));
    }
    signing::verify_text(public_key, &signed.policy, &signed.signature).map_err(key_error)?;
    let (version, policy) = parse_policy_version(&signed.policy)?;
    if version != signed.version {
        return Err(PolicyExportError::VersionMismatch {
            outer: signed.version,
            signed: version,
        });
    }
    Ok((version, policy))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn text(version: u64, rules: &str) -> String {
        format!(
            r#"{{"version":{version},"published_at":"2026-11-30T12:00:00Z","published_by":"ciso","policy":{{"rules":{rules}}}}}"#
        )
    }

    const RULES: &str = r#"[{"id":"telnet-off","description":"Telnet is off","severity":"high","selector":{"all":true},"check":{"reported":"telnet","equals":false}}]"#;

    #[test]
    fn an_export_verifies_and_every_tampering_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("policy-key");
        let key_path = generate_policy_key(&dir, false).expect("keygen");
        assert_eq!(key_path, dir.join(POLICY_KEY_FILE));
        let mode = std::fs::metadata(&key_path)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = read_policy_key(&key_path).expect("key");
        let public = read_policy_public_key(&dir.join(POLICY_PUB_FILE)).expect("pub");

        let signed = sign_policy(&key, &text(3, RULES)).expect("signs");
        assert_eq!(signed.version, 3);
        let (version, policy) = verify_policy(&public, &signed).expect("verifies");
        assert_eq!((version, policy.rules.len()), (3, 1));
        // Round trip through the file format.
        let json = serde_json::to_string(&signed).expect("serializes");
        let back: SignedPolicy = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, signed);

        let mut tampered = signed.clone();
        tampered.policy = tampered.policy.replace("false", "true ");
        assert_eq!(
            verify_policy(&public, &tampered),
            Err(PolicyExportError::BadSignature)
        );
        let mut relabelled = signed.clone();
        relabelled.version = 4;
        assert_eq!(
            verify_policy(&public, &relabelled),
            Err(PolicyExportError::VersionMismatch {
                outer: 4,
                signed: 3
            })
        );
        let mut format = signed.clone();
        format.format = "cityplane-policy/2".into();
        assert!(matches!(
            verify_policy(&public, &format),
            Err(PolicyExportError::WrongFormat(_))
        ));
        let other = tempfile::tempdir().expect("tempdir");
        generate_policy_key(other.path(), false).expect("keygen");
        let stranger = read_policy_public_key(&other.path().join(POLICY_PUB_FILE)).expect("pub");
        assert_eq!(
            verify_policy(&stranger, &signed),
            Err(PolicyExportError::BadSignature)
        );
        let unknown = json.replace("\"signature\"", "\"extra\":1,\"signature\"");
        let e = serde_json::from_str::<SignedPolicy>(&unknown).expect_err("unknown field");
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn only_valid_policy_versions_are_signed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let key =
            read_policy_key(&generate_policy_key(tmp.path(), false).expect("keygen")).expect("key");
        let dup = RULES.replace(']', &format!(",{}]", &RULES[1..RULES.len() - 1]));
        let err = sign_policy(&key, &text(1, &dup)).expect_err("duplicate ids");
        assert!(
            err.to_string()
                .contains("rule telnet-off: the id is used by another rule"),
            "{err}"
        );
        assert!(matches!(
            sign_policy(&key, r#"{"version":1}"#),
            Err(PolicyExportError::BadText(_))
        ));
    }
}
