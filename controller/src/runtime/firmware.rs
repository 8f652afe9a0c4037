//! `publish-firmware`: an operator uploads a signed release and its image
//! in chunks; the image is streamed to `firmware/<sha256>` (never held in
//! memory whole), checked against the manifest's size and SHA-256, made
//! durable, and only then the release is stored and answered.
//!
//! The controller does not verify the signature: devices do, with the key
//! they were provisioned with. A controller that trusted nothing it did not
//! check itself could still be made to serve any image; the point of a
//! release key apart from the server is that it need not be trusted.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use cityplane_certs::firmware::{hex, validate_manifest};
use cityplane_proto::firmware::{ReleaseManifest, SignedRelease};

use super::event_loop::commit;
use super::*;
use crate::model::ReleaseRecord;

/// The largest image a release may have (disk is the only thing spent).
pub const MAX_IMAGE: u64 = 1 << 30;

/// One chunk of an upload.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct PublishChunk {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    release: SignedRelease,
    offset: u64,
    /// Standard base64 of the image bytes at `offset`.
    data: String,
}

cityplane_proto::object_only!(PublishChunk);

/// Uploads in progress, by image SHA-256.
pub(super) struct Uploads {
    dir: PathBuf,
    /// Bytes of images the server may hold, published and uploading.
    max_bytes: u64,
    open: HashMap<String, Upload>,
}

struct Upload {
    file: File,
    path: PathBuf,
    size: u64,
    received: u64,
    digest: ring::digest::Context,
}

impl Uploads {
    pub(super) fn new(dir: PathBuf, max_bytes: u64) -> Uploads {
        Uploads {
            dir,
            max_bytes,
            open: HashMap::new(),
        }
    }
}

fn io_rejection(what: &str, path: &Path, e: std::io::Error) -> Rejection {
    Rejection::new(
        "storage_unavailable",
        format!("cannot {what} {}: {e}", path.display()),
    )
}

/// Takes one chunk; the last one stores the release.
pub(super) async fn publish_chunk(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    uploads: &mut Uploads,
    who: &str,
    payload: &[u8],
    now: Millis,
) -> Result<Value, Rejection> {
    let chunk = input::parse::<PublishChunk>(payload, fleet.limits)?;
    let manifest: ReleaseManifest = serde_json::from_str(&chunk.release.manifest)
        .map_err(|e| Rejection::new("bad_manifest", format!("manifest: {e}")))?;
    validate_manifest(&manifest).map_err(|e| Rejection::new("bad_manifest", e.to_string()))?;
    if manifest.size > MAX_IMAGE {
        return Err(Rejection::new(
            "too_large",
            format!("the image is {} bytes; at most {MAX_IMAGE}", manifest.size),
        ));
    }
    if let Some(have) = fleet.releases.get(&manifest.version) {
        if have.sha256 == manifest.sha256 && have.release == chunk.release {
            return Ok(
                json!({"version": have.version, "sha256": have.sha256, "size": have.size,
                "complete": true, "already_published": true}),
            );
        }
        return Err(Rejection::new(
            "conflict",
            format!(
                "release {} is already published with another manifest (image {}); a version \
                 names one image for good: sign a new version",
                manifest.version, have.sha256
            ),
        ));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(chunk.data.as_bytes())
        .map_err(|e| Rejection::new("bad_schema", format!("data is not base64: {e}")))?;
    let sha = manifest.sha256.clone();
    if chunk.offset == 0 {
        // Images fill the data disk: a quota, so an operator cannot.
        let held: u64 = fleet.releases.values().map(|r| r.size).sum::<u64>()
            + uploads
                .open
                .iter()
                .filter(|(s, _)| **s != sha)
                .map(|(_, u)| u.size)
                .sum::<u64>();
        if held + manifest.size > uploads.max_bytes {
            return Err(Rejection::new(
                "quota",
                format!(
                    "the server holds {} MiB of firmware images; this one ({} MiB) would pass its \
                     limit of {} MiB (serve --max-firmware-mib)",
                    held >> 20,
                    manifest.size.div_ceil(1 << 20),
                    uploads.max_bytes >> 20
                ),
            ));
        }
        fs::create_dir_all(&uploads.dir).map_err(|e| io_rejection("create", &uploads.dir, e))?;
        let path = uploads.dir.join(format!(".upload-{sha}"));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_rejection("create", &path, e))?;
        uploads.open.insert(
            sha.clone(),
            Upload {
                file,
                path,
                size: manifest.size,
                received: 0,
                digest: ring::digest::Context::new(&ring::digest::SHA256),
            },
        );
    }
    let Some(up) = uploads.open.get_mut(&sha) else {
        return Err(Rejection::new(
            "conflict",
            format!("no upload of image {sha} is in progress: start again at offset 0"),
        ));
    };
    if chunk.offset != up.received {
        return Err(Rejection::new(
            "conflict",
            format!(
                "the upload of image {sha} is at byte {}; send offset {} or start again at 0",
                up.received, up.received
            ),
        ));
    }
    let end = up.received + data.len() as u64;
    if end > manifest.size {
        let path = up.path.clone();
        uploads.open.remove(&sha);
        let _ = fs::remove_file(path);
        return Err(Rejection::new(
            "too_large",
            format!(
                "the image is longer than the manifest's size ({} bytes)",
                manifest.size
            ),
        ));
    }
    up.file
        .write_all(&data)
        .map_err(|e| io_rejection("write", &up.path, e))?;
    up.digest.update(&data);
    up.received = end;
    if end < manifest.size {
        return Ok(json!({"received": end, "size": manifest.size, "complete": false}));
    }
    let Some(up) = uploads.open.remove(&sha) else {
        return Err(Rejection::new("conflict", "upload vanished"));
    };
    let got = hex(up.digest.finish().as_ref());
    if got != sha {
        let _ = fs::remove_file(&up.path);
        return Err(Rejection::new(
            "hash_mismatch",
            format!("the image's SHA-256 is {got}, the manifest says {sha}: nothing was stored"),
        ));
    }
    let final_path = uploads.dir.join(&sha);
    let made_durable = up
        .file
        .sync_all()
        .and_then(|()| fs::rename(&up.path, &final_path))
        .and_then(|()| File::open(&uploads.dir)?.sync_all());
    made_durable.map_err(|e| io_rejection("store", &final_path, e))?;
    let record = ReleaseRecord {
        version: manifest.version.clone(),
        release: chunk.release,
        models: manifest.models.clone(),
        size: manifest.size,
        sha256: sha.clone(),
        published_by: who.to_owned(),
        published_at: now,
    };
    let audit = fleet.audit_entry(
        who,
        "publish-firmware",
        &manifest.version,
        &format!("accepted, image {sha} ({} bytes)", manifest.size),
        now,
    );
    let changes = Changes {
        releases: vec![record.clone()],
        audit: vec![audit],
        ..Default::default()
    };
    let (_, result) = commit(store, changes).await;
    result.map_err(|e| {
        Rejection::new(
            "storage_unavailable",
            format!("the release could not be stored: {e}"),
        )
    })?;
    tracing::info!(operator = who, version = %record.version, sha256 = %sha, size = record.size, "firmware published");
    fleet.add_release(record);
    Ok(json!({"version": manifest.version, "sha256": sha, "size": manifest.size, "complete": true}))
}

/// `get-releases`.
pub(super) fn releases(fleet: &Fleet) -> Value {
    let rows: Vec<Value> = fleet
        .releases
        .values()
        .map(|r| {
            json!({"version": r.version, "models": r.models, "size": r.size, "sha256": r.sha256,
                "published_by": r.published_by, "published": crate::model::rfc3339(r.published_at)})
        })
        .collect();
    json!({"total": rows.len(), "releases": rows})
}
