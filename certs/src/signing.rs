//! Ed25519 signing keys that are not the CA: the firmware release key
//! ([`crate::firmware`]) and the city's policy key ([`crate::policy`]).
//!
//! Each lives in a directory of its own as `<name>.key` (PKCS#8 PEM, mode
//! 0600 from creation) and `<name>.pub` (the 32-byte public key, base64,
//! one line: what verifiers are provisioned with). Signatures cover exact
//! text bytes, so nobody has to canonicalise JSON to verify one. Ed25519
//! (ring): small signatures, one fixed curve, no nonce to get wrong.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::fsutil::{self, KEY_MODE, PUBLIC_MODE};

const PEM_TAG: &str = "PRIVATE KEY";

/// Which key a message is about, so errors speak of "the release key" or
/// "the policy key" and say how to make one.
#[derive(Debug, Clone, Copy)]
pub struct KeyKind {
    /// File stem: `release` gives `release.key` and `release.pub`.
    pub name: &'static str,
    /// "release", "policy": as in "the release key".
    pub noun: &'static str,
    /// Who trusts the public half: "devices", "controllers and auditors".
    pub trusted_by: &'static str,
    /// The command that makes one.
    pub keygen: &'static str,
}

impl KeyKind {
    pub fn key_file(&self) -> String {
        format!("{}.key", self.name)
    }

    pub fn pub_file(&self) -> String {
        format!("{}.pub", self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SigningError {
    /// A key cannot be made, read or parsed.
    #[error("{0}")]
    Key(String),
    /// Not signed by this key, or changed after signing.
    #[error("bad signature")]
    BadSignature,
}

/// Creates `dir/<name>.key` (0600) and `dir/<name>.pub`; refuses to
/// replace a key unless `force` (everyone who trusts the old public half
/// would refuse what the new one signs).
pub fn generate_keypair(dir: &Path, kind: KeyKind, force: bool) -> Result<PathBuf, SigningError> {
    let io = |e: crate::CertError| SigningError::Key(e.to_string());
    fsutil::create_dir(dir).map_err(io)?;
    fsutil::check_private_dir(dir).map_err(io)?;
    let key_file = kind.key_file();
    let key_path = dir.join(&key_file);
    if key_path.exists() && !force {
        return Err(SigningError::Key(format!(
            "{} already exists: refusing to replace the {} key ({} trust its public half). Pass \
             --force to make a new one",
            key_path.display(),
            kind.noun,
            kind.trusted_by
        )));
    }
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| SigningError::Key("cannot generate an Ed25519 key".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| SigningError::Key("generated key does not parse".into()))?;
    let pem = pem::encode(&pem::Pem::new(PEM_TAG, pkcs8.as_ref().to_vec()));
    fsutil::write_atomic(dir, &key_file, pem.as_bytes(), KEY_MODE, false).map_err(io)?;
    let public = format!("{}\n", b64().encode(pair.public_key().as_ref()));
    fsutil::write_atomic(dir, &kind.pub_file(), public.as_bytes(), PUBLIC_MODE, true)
        .map_err(io)?;
    Ok(key_path)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The key pair from a `<name>.key` file.
pub fn read_private_key(path: &Path, kind: KeyKind) -> Result<Ed25519KeyPair, SigningError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SigningError::Key(format!("cannot read {}: {e}", path.display())))?;
    let pem = pem::parse(text.as_bytes())
        .map_err(|e| SigningError::Key(format!("{} is not a PEM key: {e}", path.display())))?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(pem.contents()).map_err(|_| {
        SigningError::Key(format!(
            "{} is not an Ed25519 {} key (make one with `{}`)",
            path.display(),
            kind.noun,
            kind.keygen
        ))
    })
}

/// A public key as written in `<name>.pub` (32 bytes, base64).
pub fn parse_public_key(text: &str, kind: KeyKind) -> Result<[u8; 32], SigningError> {
    let bytes = b64()
        .decode(text.trim())
        .map_err(|e| SigningError::Key(format!("{} public key is not base64: {e}", kind.noun)))?;
    bytes
        .try_into()
        .map_err(|_| SigningError::Key(format!("{} public key is not 32 bytes", kind.noun)))
}

pub fn read_public_key(path: &Path, kind: KeyKind) -> Result<[u8; 32], SigningError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SigningError::Key(format!("cannot read {}: {e}", path.display())))?;
    parse_public_key(&text, kind)
}

/// The standard-base64 Ed25519 signature over `text`'s bytes.
pub fn sign_text(key: &Ed25519KeyPair, text: &str) -> String {
    b64().encode(key.sign(text.as_bytes()).as_ref())
}

/// Checks a [`sign_text`] signature.
pub fn verify_text(public_key: &[u8; 32], text: &str, signature: &str) -> Result<(), SigningError> {
    let signature = b64()
        .decode(signature.trim())
        .map_err(|_| SigningError::BadSignature)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(text.as_bytes(), &signature)
        .map_err(|_| SigningError::BadSignature)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const KIND: KeyKind = KeyKind {
        name: "test",
        noun: "test",
        trusted_by: "tests",
        keygen: "make-test-key",
    };

    #[test]
    fn a_keypair_signs_and_verifies_text_and_is_private_from_the_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("k");
        let key_path = generate_keypair(&dir, KIND, false).expect("keygen");
        let mode = std::fs::metadata(&key_path)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = generate_keypair(&dir, KIND, false).expect_err("refuses to replace");
        assert!(
            err.to_string().contains("refusing to replace the test key"),
            "{err}"
        );
        let key = read_private_key(&key_path, KIND).expect("reads");
        let public = read_public_key(&dir.join("test.pub"), KIND).expect("reads");
        let sig = sign_text(&key, "hello");
        assert_eq!(verify_text(&public, "hello", &sig), Ok(()));
        assert_eq!(
            verify_text(&public, "hellO", &sig),
            Err(SigningError::BadSignature)
        );
        assert_eq!(
            verify_text(&public, "hello", "not base64!"),
            Err(SigningError::BadSignature)
        );
        let err = read_private_key(&dir.join("test.pub"), KIND).expect_err("not private");
        assert!(err.to_string().contains("is not a PEM key"), "{err}");
        let err = parse_public_key("AAAA", KIND).expect_err("short");
        assert_eq!(err.to_string(), "test public key is not 32 bytes");
        // --force replaces the key: the old signature no longer verifies.
        generate_keypair(&dir, KIND, true).expect("forced");
        let public = read_public_key(&dir.join("test.pub"), KIND).expect("reads");
        assert_eq!(
            verify_text(&public, "hello", &sig),
            Err(SigningError::BadSignature)
        );
    }
}
