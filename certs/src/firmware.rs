//! The release key: signs firmware manifests, and is not the CA.
//!
//! A stolen CA key lets an attacker mint identities; a stolen release key
//! lets one sign images. Keeping them apart means neither alone installs
//! code on a device, and the release key can live offline with whoever
//! builds firmware. Ed25519 (ring): small signatures, one fixed curve, no
//! nonce to get wrong.
//!
//! | file | what |
//! |---|---|
//! | `release.key` | PKCS#8 Ed25519 private key, PEM, mode 0600 |
//! | `release.pub` | the 32-byte public key, base64, one line: what devices are provisioned with |

use std::path::{Path, PathBuf};

use base64::Engine as _;
use cityplane_proto::firmware::{
    compare_versions, is_sha256_hex, parse_version, ReleaseManifest, SignedRelease,
};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::fsutil::{self, KEY_MODE, PUBLIC_MODE};

pub const RELEASE_KEY_FILE: &str = "release.key";
pub const RELEASE_PUB_FILE: &str = "release.pub";
const PEM_TAG: &str = "PRIVATE KEY";

/// Why a release cannot be signed or is not to be installed. Device-side
/// refusals ([`check_release`]) are what a device puts in its ack.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseError {
    #[error("{0}")]
    Key(String),
    #[error("bad signature: the release is not signed by this device's release key")]
    BadSignature,
    #[error("bad manifest: {0}")]
    BadManifest(String),
    #[error("wrong model: the release fits {fits}, this device is {model:?}")]
    WrongModel { model: String, fits: String },
    #[error("downgrade: {version} is below this device's floor {floor}")]
    Downgrade { version: String, floor: String },
    #[error("release is for {release}, the command asks for {asked}")]
    VersionMismatch { release: String, asked: String },
}

/// Creates `dir/release.key` (0600) and `dir/release.pub`; refuses to
/// overwrite a key unless `force` (every device would then refuse releases
/// signed with the new one until re-provisioned).
pub fn generate_release_key(dir: &Path, force: bool) -> Result<PathBuf, ReleaseError> {
    let io = |e: crate::CertError| ReleaseError::Key(e.to_string());
    fsutil::create_dir(dir).map_err(io)?;
    fsutil::check_private_dir(dir).map_err(io)?;
    let key_path = dir.join(RELEASE_KEY_FILE);
    if key_path.exists() && !force {
        return Err(ReleaseError::Key(format!(
            "{} already exists: refusing to replace the release key (devices trust its public \
             half). Pass --force to make a new one",
            key_path.display()
        )));
    }
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| ReleaseError::Key("cannot generate an Ed25519 key".into()))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| ReleaseError::Key("generated key does not parse".into()))?;
    let pem = pem::encode(&pem::Pem::new(PEM_TAG, pkcs8.as_ref().to_vec()));
    fsutil::write_atomic(dir, RELEASE_KEY_FILE, pem.as_bytes(), KEY_MODE, false).map_err(io)?;
    let public = format!("{}\n", b64().encode(pair.public_key().as_ref()));
    fsutil::write_atomic(dir, RELEASE_PUB_FILE, public.as_bytes(), PUBLIC_MODE, true)
        .map_err(io)?;
    Ok(key_path)
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The release key pair from a `release.key` file.
pub fn read_release_key(path: &Path) -> Result<Ed25519KeyPair, ReleaseError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ReleaseError::Key(format!("cannot read {}: {e}", path.display())))?;
    let pem = pem::parse(text.as_bytes())
        .map_err(|e| ReleaseError::Key(format!("{} is not a PEM key: {e}", path.display())))?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(pem.contents()).map_err(|_| {
        ReleaseError::Key(format!(
            "{} is not an Ed25519 release key (make one with `cityplane firmware keygen`)",
            path.display()
        ))
    })
}

/// A public key as written in `release.pub` (32 bytes, base64).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], ReleaseError> {
    let bytes = b64()
        .decode(text.trim())
        .map_err(|e| ReleaseError::Key(format!("release public key is not base64: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| ReleaseError::Key("release public key is not 32 bytes".into()))
}

pub fn read_public_key(path: &Path) -> Result<[u8; 32], ReleaseError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ReleaseError::Key(format!("cannot read {}: {e}", path.display())))?;
    parse_public_key(&text)
}

/// Checks what a signer may put in a manifest (a device checks it again).
pub fn validate_manifest(m: &ReleaseManifest) -> Result<(), ReleaseError> {
    let bad = |s: String| Err(ReleaseError::BadManifest(s));
    if parse_version(&m.version).is_none() {
        return bad(format!(
            "version {:?} is not dotted numbers (e.g. 1.4.3)",
            m.version
        ));
    }
    if let Some(f) = &m.floor {
        if parse_version(f).is_none() {
            return bad(format!("floor {f:?} is not dotted numbers"));
        }
    }
    if m.models.is_empty() || m.models.iter().any(|s| s.is_empty() || s.len() > 64) {
        return bad("models must name 1 or more hardware models of 1..64 characters".into());
    }
    if !is_sha256_hex(&m.sha256) {
        return bad("sha256 must be 64 lowercase hex digits".into());
    }
    if m.fetch != "mqtt" {
        return bad(format!("fetch {:?}: only \"mqtt\" is supported", m.fetch));
    }
    Ok(())
}

/// Lowercase hex, as a manifest spells a SHA-256.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Signs a release of `image` (its size and SHA-256 taken from the bytes).
pub fn sign_image(
    key: &Ed25519KeyPair,
    version: &str,
    models: &[&str],
    image: &[u8],
    downgrade: bool,
) -> Result<SignedRelease, ReleaseError> {
    sign_manifest(
        key,
        &ReleaseManifest {
            version: version.to_owned(),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            size: image.len() as u64,
            sha256: hex(ring::digest::digest(&ring::digest::SHA256, image).as_ref()),
            floor: None,
            downgrade,
            fetch: "mqtt".to_owned(),
        },
    )
}

/// Signs a manifest: the signature covers the exact manifest text.
pub fn sign_manifest(
    key: &Ed25519KeyPair,
    manifest: &ReleaseManifest,
) -> Result<SignedRelease, ReleaseError> {
    validate_manifest(manifest)?;
    let text =
        serde_json::to_string(manifest).map_err(|e| ReleaseError::BadManifest(e.to_string()))?;
    let signature = key.sign(text.as_bytes());
    Ok(SignedRelease {
        manifest: text,
        signature: b64().encode(signature.as_ref()),
    })
}

/// The manifest of a release, if `public_key` signed it.
pub fn verify_release(
    public_key: &[u8; 32],
    release: &SignedRelease,
) -> Result<ReleaseManifest, ReleaseError> {
    let signature = b64()
        .decode(release.signature.trim())
        .map_err(|_| ReleaseError::BadSignature)?;
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(release.manifest.as_bytes(), &signature)
        .map_err(|_| ReleaseError::BadSignature)?;
    let manifest: ReleaseManifest = serde_json::from_str(&release.manifest)
        .map_err(|e| ReleaseError::BadManifest(e.to_string()))?;
    validate_manifest(&manifest)?;
    Ok(manifest)
}

/// What a device checks before downloading: signed by its release key, for
/// the version the command asks for, for its hardware model, and not below
/// its floor unless the signer allowed the downgrade.
pub fn check_release(
    public_key: &[u8; 32],
    release: &SignedRelease,
    asked_version: &str,
    model: &str,
    floor: &str,
) -> Result<ReleaseManifest, ReleaseError> {
    let m = verify_release(public_key, release)?;
    if m.version != asked_version {
        return Err(ReleaseError::VersionMismatch {
            release: m.version,
            asked: asked_version.to_owned(),
        });
    }
    if !m.models.iter().any(|x| x == model) {
        return Err(ReleaseError::WrongModel {
            model: model.to_owned(),
            fits: m.models.join(", "),
        });
    }
    let below = compare_versions(&m.version, floor).is_some_and(|o| o.is_lt());
    if below && !m.downgrade {
        return Err(ReleaseError::Downgrade {
            version: m.version,
            floor: floor.to_owned(),
        });
    }
    Ok(m)
}

/// The device's floor after installing `m` on top of `floor`.
pub fn floor_after(m: &ReleaseManifest, floor: &str) -> String {
    let new = m.floor.clone().unwrap_or_else(|| m.version.clone());
    if m.downgrade {
        return new;
    }
    match compare_versions(&new, floor) {
        Some(std::cmp::Ordering::Greater) => new,
        _ => floor.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str) -> ReleaseManifest {
        ReleaseManifest {
            version: version.into(),
            models: vec!["LumiNode SL-200".into()],
            size: 3,
            sha256: "a".repeat(64),
            floor: None,
            downgrade: false,
            fetch: "mqtt".into(),
        }
    }

    fn key() -> (Ed25519KeyPair, [u8; 32]) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = pair.public_key().as_ref().try_into().unwrap();
        (pair, public)
    }

    #[test]
    fn a_device_refuses_every_release_it_should() {
        let (pair, public) = key();
        let (_, other) = key();
        let signed = sign_manifest(&pair, &manifest("2.0.0")).unwrap();
        let model = "LumiNode SL-200";
        assert!(check_release(&public, &signed, "2.0.0", model, "1.4.2").is_ok());
        assert_eq!(
            check_release(&other, &signed, "2.0.0", model, "0"),
            Err(ReleaseError::BadSignature)
        );
        let mut tampered = signed.clone();
        tampered.manifest = tampered.manifest.replace("2.0.0", "2.0.1");
        assert_eq!(
            check_release(&public, &tampered, "2.0.1", model, "0"),
            Err(ReleaseError::BadSignature)
        );
        assert!(matches!(
            check_release(&public, &signed, "2.0.0", "Orbis LX-4", "0"),
            Err(ReleaseError::WrongModel { .. })
        ));
        assert!(matches!(
            check_release(&public, &signed, "2.0.0", model, "2.1"),
            Err(ReleaseError::Downgrade { .. })
        ));
        assert!(matches!(
            check_release(&public, &signed, "2.0.1", model, "0"),
            Err(ReleaseError::VersionMismatch { .. })
        ));
        let mut rollback = manifest("1.4.2");
        rollback.downgrade = true;
        let rollback = sign_manifest(&pair, &rollback).unwrap();
        let m = check_release(&public, &rollback, "1.4.2", model, "2.1").unwrap();
        assert_eq!(floor_after(&m, "2.1"), "1.4.2");
    }

    #[test]
    fn the_floor_only_rises_unless_the_signer_says_downgrade() {
        let mut m = manifest("2.0.0");
        assert_eq!(floor_after(&m, "1.0"), "2.0.0");
        m.floor = Some("1.5".into());
        assert_eq!(floor_after(&m, "1.8"), "1.8");
    }
}
