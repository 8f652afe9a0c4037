//! `revoked.json`: the durable list of revoked serials, the broker's source
//! of truth for revocation.

use std::collections::HashSet;
use std::path::Path;

use cityplane_proto::Role;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::serial::normalize_serial;
use crate::{fsutil, CertError};

/// The only `revoked.json` format version this crate reads and writes.
pub const REVOCATION_FORMAT_VERSION: u32 = 1;

/// One revoked certificate, as stored in `revoked.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedEntry {
    /// Canonical serial: lowercase hex, no colons, no leading zero bytes.
    pub serial: String,
    /// The identity (certificate CN) the certificate belonged to.
    pub id: String,
    /// When it was revoked, RFC 3339 (UTC).
    pub revoked_at: String,
}

/// On-disk entry: [`RevokedEntry`] plus what `list` needs to describe a
/// revoked certificate whose file has since been replaced. The extra fields are
/// optional so a hand-written file with only the three public fields loads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RevokedRecord {
    pub serial: String,
    pub id: String,
    pub revoked_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

impl RevokedRecord {
    pub(crate) fn entry(&self) -> RevokedEntry {
        RevokedEntry {
            serial: self.serial.clone(),
            id: self.id.clone(),
            revoked_at: self.revoked_at.clone(),
        }
    }

    pub(crate) fn revoked_at_time(&self) -> Option<OffsetDateTime> {
        OffsetDateTime::parse(&self.revoked_at, &Rfc3339).ok()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RevocationFile {
    pub version: u32,
    pub revoked: Vec<RevokedRecord>,
}

impl RevocationFile {
    pub(crate) fn empty() -> Self {
        RevocationFile {
            version: REVOCATION_FORMAT_VERSION,
            revoked: Vec::new(),
        }
    }

    /// Reads and checks the file. Serials are returned in canonical form.
    pub(crate) fn load(path: &Path) -> Result<Self, CertError> {
        Self::parse(path, &fsutil::read(path)?)
    }

    /// Checks the contents `data` of the file at `path` (named in errors).
    pub(crate) fn parse(path: &Path, data: &[u8]) -> Result<Self, CertError> {
        let bad = |reason: String| CertError::BadRevocationList {
            path: path.to_owned(),
            reason,
        };
        let mut file: RevocationFile =
            serde_json::from_slice(data).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if file.version != REVOCATION_FORMAT_VERSION {
            return Err(bad(format!(
                "unsupported version {} (this build reads version {REVOCATION_FORMAT_VERSION})",
                file.version
            )));
        }
        for (i, rec) in file.revoked.iter_mut().enumerate() {
            rec.serial = normalize_serial(&rec.serial).ok_or_else(|| {
                bad(format!(
                    "entry {i}: serial {:?} is not hexadecimal",
                    rec.serial
                ))
            })?;
            if rec.revoked_at_time().is_none() {
                return Err(bad(format!(
                    "entry {i}: revoked_at {:?} is not an RFC 3339 time",
                    rec.revoked_at
                )));
            }
        }
        Ok(file)
    }

    pub(crate) fn to_json(&self) -> Result<Vec<u8>, CertError> {
        let mut out =
            serde_json::to_vec_pretty(self).map_err(|e| CertError::BadRevocationList {
                path: "revoked.json".into(),
                reason: format!("cannot serialise: {e}"),
            })?;
        out.push(b'\n');
        Ok(out)
    }

    pub(crate) fn find(&self, serial: &str) -> Option<&RevokedRecord> {
        self.revoked.iter().find(|r| r.serial == serial)
    }
}

/// The broker's view of revocation, loaded from `revoked.json`.
///
/// [`RevocationList::load`] fails on a missing, unreadable or corrupt file (bad
/// JSON, unknown version, a serial that is not hex, a bad time): callers must
/// treat `Err` as "trust nobody" (fail closed).
#[derive(Debug, Clone)]
pub struct RevocationList {
    serials: HashSet<String>,
    entries: Vec<RevokedEntry>,
}

impl RevocationList {
    pub fn load(path: &Path) -> Result<RevocationList, CertError> {
        Ok(Self::from_file(&RevocationFile::load(path)?))
    }

    /// Like [`RevocationList::load`], from contents already read from `path`
    /// (which only names the file in errors): a watcher can then decide on
    /// exactly the bytes it parsed.
    pub fn parse(path: &Path, data: &[u8]) -> Result<RevocationList, CertError> {
        Ok(Self::from_file(&RevocationFile::parse(path, data)?))
    }

    pub(crate) fn from_file(file: &RevocationFile) -> Self {
        RevocationList {
            serials: file.revoked.iter().map(|r| r.serial.clone()).collect(),
            entries: file.revoked.iter().map(RevokedRecord::entry).collect(),
        }
    }

    /// Whether `serial_hex` is revoked. Accepts any spelling of the serial
    /// (upper case, colons, leading `00`); a non-hex string is never revoked.
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        // Fast path for the canonical spelling the broker gets from `peer_cert`.
        self.serials.contains(serial_hex)
            || normalize_serial(serial_hex).is_some_and(|s| self.serials.contains(&s))
    }

    /// Number of distinct revoked serials.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// The entries in file order (oldest revocation first).
    pub fn entries(&self) -> &[RevokedEntry] {
        &self.entries
    }
}
