//! The release key: signs firmware manifests, and is not the CA.
//!
//! A stolen CA key lets an attacker mint identities; a stolen release key
//! lets one sign images. Keeping them apart means neither alone installs
//! code on a device, and the release key can live offline with whoever
//! builds firmware. The key handling is [`crate::signing`]'s.
//!
//! | file | what |
//! |---|---|
//! | `release.key` | PKCS#8 Ed25519 private key, PEM, mode 0600 |
//! | `release.pub` | the 32-byte public key, base64, one line: what devices are provisioned with |

use std::path::{Path, PathBuf};

use cityplane_proto::firmware::{
    compare_versions, is_sha256_hex, parse_version, ReleaseManifest, SignedRelease,
};
use ring::signature::Ed25519KeyPair;

use crate::signing::{self, KeyKind, SigningError};

pub const RELEASE_KEY_FILE: &str = "release.key";
pub const RELEASE_PUB_FILE: &str = "release.pub";

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

/// The release key, for [`crate::signing`].
pub const RELEASE_KEY: KeyKind = KeyKind {
    name: "release",
    noun: "release",
    trusted_by: "devices",
    keygen: "cityplane firmware keygen",
};

fn key_error(e: SigningError) -> ReleaseError {
    match e {
        SigningError::BadSignature => ReleaseError::BadSignature,
        e => ReleaseError::Key(e.to_string()),
    }
}

/// Creates `dir/release.key` (0600) and `dir/release.pub`; refuses to
/// overwrite a key unless `force` (every device would then refuse releases
/// signed with the new one until re-provisioned).
pub fn generate_release_key(dir: &Path, force: bool) -> Result<PathBuf, ReleaseError> {
    signing::generate_keypair(dir, RELEASE_KEY, force).map_err(key_error)
}

/// The release key pair from a `release.key` file.
pub fn read_release_key(path: &Path) -> Result<Ed25519KeyPair, ReleaseError> {
    signing::read_private_key(path, RELEASE_KEY).map_err(key_error)
}

/// A public key as written in `release.pub` (32 bytes, base64).
pub fn parse_public_key(text: &str) -> Result<[u8; 32], ReleaseError> {
    signing::parse_public_key(text, RELEASE_KEY).map_err(key_error)
}

pub fn read_public_key(path: &Path) -> Result<[u8; 32], ReleaseError> {
    signing::read_public_key(path, RELEASE_KEY).map_err(key_error)
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
    Ok(SignedRelease {
        signature: signing::sign_text(key, &text),
        manifest: text,
    })
}

/// The manifest of a release, if `public_key` signed it.
pub fn verify_release(
    public_key: &[u8; 32],
    release: &SignedRelease,
) -> Result<ReleaseManifest, ReleaseError> {
    signing::verify_text(public_key, &release.manifest, &release.signature).map_err(key_error)?;
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
    use ring::signature::KeyPair;

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
