//! `revoked.json`: the durable list of revoked serials, the broker's source
//! of truth for revocation.
//!
//! An entry may carry `effective_at`: a rotation with an overlap records the
//! old serial at once, but it keeps working until that instant, so whoever
//! holds it has time to deploy the new certificate. Whether a serial is
//! revoked is therefore a question about an instant ([`RevocationList::is_revoked_at`]).

use std::collections::HashMap;
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
    /// RFC 3339 (UTC): the certificate works until this instant (a rotation
    /// with an overlap). `None`: revoked from `revoked_at` on.
    pub effective_at: Option<String>,
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
    /// See [`RevokedEntry::effective_at`]. Absent in files written before
    /// overlaps existed: those entries are in effect at once, as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_at: Option<String>,
}

impl RevokedRecord {
    pub(crate) fn entry(&self) -> RevokedEntry {
        RevokedEntry {
            serial: self.serial.clone(),
            id: self.id.clone(),
            revoked_at: self.revoked_at.clone(),
            effective_at: self.effective_at.clone(),
        }
    }

    pub(crate) fn revoked_at_time(&self) -> Option<OffsetDateTime> {
        OffsetDateTime::parse(&self.revoked_at, &Rfc3339).ok()
    }

    /// From when the serial is refused. `None` only for a record that
    /// [`RevocationFile::parse`] would have refused.
    pub(crate) fn effective_time(&self) -> Option<OffsetDateTime> {
        match &self.effective_at {
            Some(t) => OffsetDateTime::parse(t, &Rfc3339).ok(),
            None => self.revoked_at_time(),
        }
    }

    /// The same revocation, in effect from `now` (recorded as revoked then).
    pub(crate) fn in_effect_from(&self, now: OffsetDateTime) -> RevokedRecord {
        RevokedRecord {
            revoked_at: crate::peer::rfc3339(now),
            effective_at: None,
            ..self.clone()
        }
    }

    /// In effect at `now`. An unreadable time counts as in effect: when in
    /// doubt, refuse.
    pub(crate) fn is_effective_at(&self, now: OffsetDateTime) -> bool {
        self.effective_time().is_none_or(|t| t <= now)
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
            if let Some(at) = &rec.effective_at {
                if OffsetDateTime::parse(at, &Rfc3339).is_err() {
                    return Err(bad(format!(
                        "entry {i}: effective_at {at:?} is not an RFC 3339 time"
                    )));
                }
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

    /// The record that revokes `serial` at `now`, if any (a serial rotated
    /// with an overlap and later revoked at once has two records).
    pub(crate) fn find_effective(
        &self,
        serial: &str,
        now: OffsetDateTime,
    ) -> Option<&RevokedRecord> {
        self.revoked
            .iter()
            .find(|r| r.serial == serial && r.is_effective_at(now))
    }

    /// Records in effect at `now`, in file order: what a CRL signed at `now`
    /// may list. A CRL cannot say "from tomorrow", and relying parties read
    /// its entries as refused at once.
    pub(crate) fn effective_at(&self, now: OffsetDateTime) -> impl Iterator<Item = &RevokedRecord> {
        self.revoked.iter().filter(move |r| r.is_effective_at(now))
    }

    /// When `serial` stops working, if that is after `now`: a revocation
    /// recorded but not yet in effect.
    pub(crate) fn pending_until(
        &self,
        serial: &str,
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        if self.find_effective(serial, now).is_some() {
            return None;
        }
        self.revoked
            .iter()
            .filter(|r| r.serial == serial)
            .filter_map(RevokedRecord::effective_time)
            .min()
    }

    /// Records of `id` not yet in effect at `now` whose serial no other
    /// record revokes already: what "revoke this id at once" must still cut.
    pub(crate) fn pending_for_id(&self, id: &str, now: OffsetDateTime) -> Vec<&RevokedRecord> {
        let mut pending: Vec<&RevokedRecord> = Vec::new();
        for rec in &self.revoked {
            if rec.id == id
                && self.find_effective(&rec.serial, now).is_none()
                && !pending.iter().any(|p| p.serial == rec.serial)
            {
                pending.push(rec);
            }
        }
        pending
    }

    /// The earliest instant after `now` at which a recorded revocation takes
    /// effect.
    pub(crate) fn next_effective_after(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.revoked
            .iter()
            .filter_map(RevokedRecord::effective_time)
            .filter(|t| *t > now)
            .min()
    }
}

/// The broker's view of revocation, loaded from `revoked.json`.
///
/// [`RevocationList::load`] fails on a missing, unreadable or corrupt file (bad
/// JSON, unknown version, a serial that is not hex, a bad time): callers must
/// treat `Err` as "trust nobody" (fail closed).
#[derive(Debug, Clone)]
pub struct RevocationList {
    /// Canonical serial → the instant it is refused from (the earliest, if
    /// it is listed more than once: a later `revoke` can only hasten it).
    serials: HashMap<String, OffsetDateTime>,
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
        let mut serials: HashMap<String, OffsetDateTime> = HashMap::new();
        for rec in &file.revoked {
            // `parse` checked every time; the fallback refuses from the
            // beginning of time rather than not at all.
            let from = rec.effective_time().unwrap_or(OffsetDateTime::UNIX_EPOCH);
            serials
                .entry(rec.serial.clone())
                .and_modify(|t| *t = (*t).min(from))
                .or_insert(from);
        }
        RevocationList {
            serials,
            entries: file.revoked.iter().map(RevokedRecord::entry).collect(),
        }
    }

    /// Whether `serial_hex` is revoked now (system clock); see
    /// [`is_revoked_at`](Self::is_revoked_at).
    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.is_revoked_at(serial_hex, OffsetDateTime::now_utc())
    }

    /// Whether `serial_hex` is refused at `now`: listed, and its
    /// `effective_at` (if any) is not after `now`. Accepts any spelling of
    /// the serial (upper case, colons, leading `00`); a non-hex string is
    /// never revoked.
    pub fn is_revoked_at(&self, serial_hex: &str, now: OffsetDateTime) -> bool {
        self.effective_from(serial_hex)
            .is_some_and(|from| from <= now)
    }

    /// From when `serial_hex` is refused, if it is listed at all.
    pub fn effective_from(&self, serial_hex: &str) -> Option<OffsetDateTime> {
        // Fast path for the canonical spelling the broker gets from `peer_cert`.
        self.serials
            .get(serial_hex)
            .copied()
            .or_else(|| normalize_serial(serial_hex).and_then(|s| self.serials.get(&s).copied()))
    }

    /// The earliest instant after `now` at which a listed serial becomes
    /// refused: when a watcher must look again although the file did not
    /// change.
    pub fn next_effective_after(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.serials.values().filter(|t| **t > now).min().copied()
    }

    /// Number of distinct serials listed, revoked now or from a later instant.
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

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    const T0: &str = "2030-01-01T00:00:00Z";

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &Rfc3339).expect("time")
    }

    fn list(json: &str) -> RevocationList {
        RevocationList::parse(Path::new("revoked.json"), json.as_bytes()).expect("parses")
    }

    #[test]
    fn a_pending_entry_is_accepted_before_effective_at_and_refused_from_it() {
        let l = list(&format!(
            r#"{{"version":1,"revoked":[
                {{"serial":"0a","id":"op","revoked_at":"{T0}","effective_at":"2030-01-02T00:00:00Z"}},
                {{"serial":"0b","id":"old","revoked_at":"{T0}"}}]}}"#
        ));
        let (before, effective) = (at("2030-01-01T23:59:59Z"), at("2030-01-02T00:00:00Z"));
        assert!(
            !l.is_revoked_at("0a", before),
            "accepted during the overlap"
        );
        assert!(
            l.is_revoked_at("0a", effective),
            "refused from effective_at on"
        );
        assert!(l.is_revoked_at("0A", effective + Duration::days(400)));
        // Without effective_at: revoked from revoked_at, as before overlaps.
        assert!(l.is_revoked_at("0b", at(T0)));
        assert!(!l.is_revoked_at("0c", effective), "not listed");
        assert_eq!(l.next_effective_after(before), Some(effective));
        assert_eq!(l.next_effective_after(effective), None);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn the_earliest_of_two_entries_for_one_serial_wins() {
        // Rotated with an overlap, then revoked at once (stolen): refused now.
        let l = list(&format!(
            r#"{{"version":1,"revoked":[
                {{"serial":"0a","id":"op","revoked_at":"{T0}","effective_at":"2030-02-01T00:00:00Z"}},
                {{"serial":"0a","id":"op","revoked_at":"2030-01-05T00:00:00Z"}}]}}"#
        ));
        assert!(!l.is_revoked_at("0a", at("2030-01-04T00:00:00Z")));
        assert!(l.is_revoked_at("0a", at("2030-01-05T00:00:00Z")));
        let file = RevocationFile::parse(
            Path::new("revoked.json"),
            format!(
                r#"{{"version":1,"revoked":[
                {{"serial":"0a","id":"op","revoked_at":"{T0}","effective_at":"2030-02-01T00:00:00Z"}}]}}"#
            )
            .as_bytes(),
        )
        .expect("parses");
        let now = at("2030-01-10T00:00:00Z");
        assert_eq!(
            file.pending_until("0a", now),
            Some(at("2030-02-01T00:00:00Z"))
        );
        assert_eq!(file.pending_for_id("op", now).len(), 1);
        assert_eq!(file.effective_at(now).count(), 0);
        assert_eq!(file.effective_at(at("2030-02-01T00:00:00Z")).count(), 1);
    }

    #[test]
    fn a_bad_effective_at_fails_closed() {
        let err = RevocationList::parse(
            Path::new("revoked.json"),
            format!(
                r#"{{"version":1,"revoked":[{{"serial":"0a","id":"a","revoked_at":"{T0}","effective_at":"tomorrow"}}]}}"#
            )
            .as_bytes(),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("effective_at"), "{err}");
    }
}
