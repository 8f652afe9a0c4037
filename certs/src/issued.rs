//! `issued.jsonl`: the record of every certificate this CA signed.
//!
//! `<id>.crt` files can be deleted, overwritten or never have existed on this
//! host (copied to the device and removed); a certificate that is still valid
//! must stay revocable and must stop `issue` from silently minting a second
//! one. So each serial is appended here, one JSON object per line, and
//! fsynced *before* its certificate file is written: no certificate this
//! directory produced exists without a record.
//!
//! Append-only: a line is never rewritten. A crash during an append leaves at
//! most a torn last line; its certificate was never written (the record comes
//! first), so unreadable lines are skipped with a warning.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use cityplane_proto::messages::Attributes;
use cityplane_proto::Role;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::fsutil::{self, PUBLIC_MODE};
use crate::CertError;

/// One signed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IssuedRecord {
    /// Canonical serial.
    pub serial: String,
    pub id: String,
    pub role: Role,
    /// RFC 3339 (UTC).
    pub not_after: String,
    /// RFC 3339 (UTC).
    pub issued_at: String,
    /// Registry attributes given at issue (`certs issue --class …`): what
    /// a server reading this record registers a new device with.
    #[serde(default, skip_serializing_if = "attributes_empty")]
    pub attributes: Attributes,
    /// An operator's organisation; absent for other roles and in records
    /// written before organisations existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
}

fn attributes_empty(a: &Attributes) -> bool {
    a == &Attributes::default()
}

impl IssuedRecord {
    /// What `list` and `revoke` show for this record's certificate while it
    /// is not revoked: its file is gone, so no path.
    pub(crate) fn unrevoked_info(&self) -> crate::CertInfo {
        crate::CertInfo {
            id: self.id.clone(),
            role: self.role,
            serial: self.serial.clone(),
            not_after: self.not_after.clone(),
            revoked: false,
            cert_path: std::path::PathBuf::new(),
            org: self.org.clone(),
            revoked_from: None,
        }
    }

    /// Not expired at `now`. A record with an unreadable time counts as
    /// unexpired: when in doubt, keep it revocable.
    pub(crate) fn unexpired_at(&self, now: OffsetDateTime) -> bool {
        OffsetDateTime::parse(&self.not_after, &Rfc3339).map_or(true, |t| t > now)
    }
}

#[derive(Debug, Default)]
pub(crate) struct IssuedIndex {
    /// File order (oldest first).
    pub records: Vec<IssuedRecord>,
    /// Positions in `records`: bulk issue looks up every id of a large
    /// fleet, so a scan per id would be quadratic.
    by_id: HashMap<String, Vec<usize>>,
    by_serial: HashMap<String, usize>,
}

impl IssuedIndex {
    /// Reads the index; a missing file (a PKI created before the index
    /// existed) is an empty index.
    pub(crate) fn load(path: &Path) -> Result<IssuedIndex, CertError> {
        let Some(data) = fsutil::read_optional(path)? else {
            return Ok(IssuedIndex::default());
        };
        let mut records = Vec::new();
        for (n, line) in data.split(|b| *b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<IssuedRecord>(line) {
                Ok(rec) => records.push(rec),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    line = n + 1,
                    error = %e,
                    "skipping an unreadable issuance record (an interrupted append)"
                ),
            }
        }
        let mut index = IssuedIndex::default();
        for (i, rec) in records.iter().enumerate() {
            index.by_id.entry(rec.id.clone()).or_default().push(i);
            index.by_serial.insert(rec.serial.clone(), i);
        }
        index.records = records;
        Ok(index)
    }

    /// Appends `records` durably (one write, one fsync).
    pub(crate) fn append(
        dir: &Path,
        name: &str,
        records: &[IssuedRecord],
    ) -> Result<(), CertError> {
        if records.is_empty() {
            return Ok(());
        }
        let path = dir.join(name);
        let mut buf = Vec::new();
        for rec in records {
            serde_json::to_writer(&mut buf, rec).map_err(|e| {
                CertError::bad_file(&path, format!("cannot encode an issuance record: {e}"))
            })?;
            buf.push(b'\n');
        }
        let created = match std::fs::symlink_metadata(&path) {
            Ok(_) => false,
            Err(e) if e.kind() == ErrorKind::NotFound => true,
            Err(e) => return Err(CertError::io("inspect", &path, e)),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(PUBLIC_MODE)
            .open(&path)
            .map_err(|e| CertError::io("open", &path, e))?;
        // A torn last line must not swallow the first record of this append.
        let len = file
            .metadata()
            .map_err(|e| CertError::io("inspect", &path, e))?
            .len();
        if len > 0 {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, len - 1)
                .map_err(|e| CertError::io("read", &path, e))?;
            if last[0] != b'\n' {
                buf.insert(0, b'\n');
            }
        }
        file.write_all(&buf)
            .map_err(|e| CertError::io("append to", &path, e))?;
        file.sync_data()
            .map_err(|e| CertError::io("flush", &path, e))?;
        if created {
            fsutil::sync_dir(dir)?;
        }
        Ok(())
    }

    pub(crate) fn by_serial(&self, serial: &str) -> Option<&IssuedRecord> {
        self.by_serial.get(serial).map(|&i| &self.records[i])
    }

    /// Records of `id`, oldest first.
    pub(crate) fn for_id<'a>(&'a self, id: &str) -> impl Iterator<Item = &'a IssuedRecord> {
        self.by_id
            .get(id)
            .into_iter()
            .flatten()
            .map(|&i| &self.records[i])
    }
}
