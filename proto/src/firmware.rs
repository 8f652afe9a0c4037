//! Signed firmware releases and how devices fetch their images
//! (docs/PROTOCOL.md, "Firmware").
//!
//! A release is a manifest (the JSON text of [`ReleaseManifest`]) signed with
//! a release key that is not the CA: Ed25519 over the exact UTF-8 bytes of
//! the `manifest` string, so nobody has to canonicalise JSON to verify it.
//! The controller attaches the signed release to a command that sets
//! `firmware`; the device verifies it (signature, model, version floor),
//! fetches the image in chunks on `devices/D/fetch` → `devices/D/blob`,
//! checks size and SHA-256, then installs.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// The most image bytes one `fetch` may ask for (a blob stays well under
/// the 128 KiB payload limit).
pub const MAX_CHUNK: u32 = 64 * 1024;

/// What a release is: signed by the release key, checked by every device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct ReleaseManifest {
    /// Dotted numbers, e.g. `1.4.3` ([`compare_versions`]).
    pub version: String,
    /// Hardware models (a device's `hardware_model`) the image fits.
    pub models: Vec<String>,
    /// Image size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the image: also its name on the fetch topic.
    pub sha256: String,
    /// After installing, the device refuses anything older than this
    /// version (rollback protection). Never lowers the floor, unless
    /// `downgrade` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub floor: Option<String>,
    /// The signer allows this release below a device's floor (an operator's
    /// explicit rollback); the device's floor becomes this release's
    /// `floor` (or its version).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub downgrade: bool,
    /// Where the image comes from: `mqtt` (chunks on `devices/D/fetch`).
    #[serde(default = "mqtt")]
    pub fetch: String,
}

fn mqtt() -> String {
    "mqtt".to_owned()
}

/// A manifest and its signature, as carried in a command's `release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct SignedRelease {
    /// The JSON text of a [`ReleaseManifest`], exactly as signed.
    pub manifest: String,
    /// Standard base64 of the Ed25519 signature over `manifest`'s bytes.
    pub signature: String,
}

/// `devices/D/fetch`: a device asks for `length` bytes of an image at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct FetchRequest {
    pub sha256: String,
    pub offset: u64,
    pub length: u32,
}

/// The header line of a `devices/D/blob` payload; the image bytes follow
/// the first `\n`. `error` (and no bytes) when the request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
pub struct BlobHeader {
    pub sha256: String,
    pub offset: u64,
    /// The stored image's size.
    pub total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

crate::object_only!(serialize: ReleaseManifest, SignedRelease, FetchRequest, BlobHeader);

/// Reads a device's fetch payload: the request, or the header of the
/// answer that says why it cannot be served (a bad request is answered,
/// not punished). Who serves the bytes (the embedded broker's edge, or
/// `cityplane controller` behind an external broker) answers alike.
pub fn read_fetch(payload: &[u8]) -> Result<FetchRequest, BlobHeader> {
    let refuse = |sha256: String, offset: u64, reason: String| BlobHeader {
        sha256,
        offset,
        total: 0,
        error: Some(format!("bad_request: {reason}")),
    };
    let req: FetchRequest = match serde_json::from_slice(payload) {
        Ok(req) => req,
        Err(e) if e.is_data() => return Err(refuse(String::new(), 0, format!("bad_schema: {e}"))),
        Err(e) => return Err(refuse(String::new(), 0, format!("not JSON: {e}"))),
    };
    if !is_sha256_hex(&req.sha256) {
        let reason = "sha256 must be 64 lowercase hex digits".to_owned();
        return Err(refuse(String::new(), req.offset, reason));
    }
    if req.length == 0 {
        return Err(refuse(
            req.sha256,
            req.offset,
            "length must be above 0".into(),
        ));
    }
    Ok(req)
}

/// A blob payload: the header, `\n`, the bytes. Compact JSON escapes
/// newlines inside strings, so the first `\n` always ends the header.
pub fn encode_blob(header: &BlobHeader, bytes: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(header).unwrap_or_default();
    out.reserve(bytes.len() + 1);
    out.push(b'\n');
    out.extend_from_slice(bytes);
    out
}

/// Splits a blob payload into its header and bytes.
pub fn decode_blob(payload: &[u8]) -> Result<(BlobHeader, &[u8]), String> {
    let split = payload
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("blob without a header line")?;
    let header: BlobHeader =
        serde_json::from_slice(&payload[..split]).map_err(|e| format!("bad blob header: {e}"))?;
    Ok((header, &payload[split + 1..]))
}

/// Is this a lowercase hex SHA-256?
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Parses `1.4.2`-style versions: 1 to 4 dot-separated decimal numbers.
pub fn parse_version(v: &str) -> Option<Vec<u64>> {
    let parts: Vec<u64> = v
        .split('.')
        .map(|p| {
            (!p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse().ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    (1..=4).contains(&parts.len()).then_some(parts)
}

/// Orders two versions numerically (`1.10` > `1.9`; `1.4` == `1.4.0`);
/// `None` when either is not a version.
pub fn compare_versions(a: &str, b: &str) -> Option<Ordering> {
    let (mut a, mut b) = (parse_version(a)?, parse_version(b)?);
    let len = a.len().max(b.len());
    a.resize(len, 0);
    b.resize(len, 0);
    Some(a.cmp(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("1.10.0", "1.9.9"), Some(Ordering::Greater));
        assert_eq!(compare_versions("1.4", "1.4.0"), Some(Ordering::Equal));
        assert_eq!(compare_versions("0.9.1", "0.9.4"), Some(Ordering::Less));
        for bad in ["", "1..2", "1.a", "v1", "1.2.3.4.5", "-1", "1.2-rc1"] {
            assert_eq!(compare_versions(bad, "1"), None, "{bad}");
        }
    }

    #[test]
    fn a_blob_splits_at_the_first_newline() {
        let h = BlobHeader {
            sha256: "ab".into(),
            offset: 3,
            total: 10,
            error: None,
        };
        let payload = encode_blob(&h, b"x\ny");
        let (back, bytes) = decode_blob(&payload).unwrap();
        assert_eq!((back, bytes), (h, &b"x\ny"[..]));
        assert!(decode_blob(b"no header").is_err());
    }

    #[test]
    fn a_manifest_defaults_to_fetching_over_mqtt() {
        let m: ReleaseManifest =
            serde_json::from_str(r#"{"version":"1.0.0","models":["m"],"size":1,"sha256":"00"}"#)
                .unwrap();
        assert_eq!(m.fetch, "mqtt");
        assert!(!m.downgrade);
        assert!(serde_json::from_str::<ReleaseManifest>(r#"["1.0.0"]"#).is_err());
    }
}
