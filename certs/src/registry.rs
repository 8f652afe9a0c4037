//! What a server's device registry learns from a PKI or server directory:
//! every device certificate in `issued.jsonl` (with the attributes given at
//! issue) and whether its newest certificate is revoked (`revoked.json`).
//!
//! The controller's store is the registry; this is one of its inputs. A
//! device read here for the first time is registered with these
//! attributes; one the registry already holds keeps the attributes
//! operators gave it since.

use std::collections::HashMap;
use std::path::Path;

use cityplane_proto::messages::Attributes;
use cityplane_proto::Role;

use crate::issued::IssuedIndex;
use crate::revocation::RevocationFile;
use crate::{CertError, ISSUED_FILE, REVOCATION_FILE};

/// One device as the PKI knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedDevice {
    pub id: String,
    /// The attributes of its newest certificate's record.
    pub attributes: Attributes,
    /// Its newest certificate is revoked.
    pub revoked: bool,
    /// When its newest certificate expires (unix milliseconds); `None` when
    /// the record's time is unreadable.
    pub not_after_ms: Option<u64>,
}

/// Every device certificate recorded in `dir`, newest record per id, in
/// the order ids were first issued. A directory without `issued.jsonl`
/// (an older export) has none.
pub fn issued_devices(dir: &Path) -> Result<Vec<IssuedDevice>, CertError> {
    let index = IssuedIndex::load(&dir.join(ISSUED_FILE))?;
    let revocation = dir.join(REVOCATION_FILE);
    let revoked = if revocation.exists() {
        RevocationFile::load(&revocation)?
    } else {
        RevocationFile::empty()
    };
    let mut out: Vec<IssuedDevice> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for rec in index.records.iter().filter(|r| r.role == Role::Device) {
        let device = IssuedDevice {
            id: rec.id.clone(),
            attributes: rec.attributes.clone(),
            revoked: revoked.find(&rec.serial).is_some(),
            not_after_ms: unix_ms(&rec.not_after),
        };
        match at.get(rec.id.as_str()) {
            Some(&i) => out[i] = device,
            None => {
                at.insert(&rec.id, out.len());
                out.push(device);
            }
        }
    }
    Ok(out)
}

/// One identity (any role) as the issuance record knows it: what an
/// external broker must hold a user for, or must no longer hold one for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedIdentity {
    pub id: String,
    /// The role of its newest certificate that is still usable at `now`, or
    /// of its newest record when none is.
    pub role: Role,
    /// An operator's organisation (from the same record as `role`).
    pub org: Option<String>,
    /// At least one of its certificates is unexpired and not revoked at
    /// `now` (a rotation's overlap keeps the old one usable until its
    /// `effective_at`).
    pub usable: bool,
    /// Its usable certificates name more than one role. A broker that logs
    /// in by CN alone cannot tell them apart, so such an identity must get
    /// no user at all.
    pub conflicting_roles: bool,
}

/// Every identity recorded in `dir`'s `issued.jsonl` (devices, operators,
/// controllers), in the order ids were first issued, judged at `now`
/// against `revoked.json`.
pub fn issued_identities(
    dir: &Path,
    now: time::OffsetDateTime,
) -> Result<Vec<IssuedIdentity>, CertError> {
    let index = IssuedIndex::load(&dir.join(ISSUED_FILE))?;
    let revocation = dir.join(REVOCATION_FILE);
    let revoked = crate::RevocationList::from_file(&if revocation.exists() {
        RevocationFile::load(&revocation)?
    } else {
        RevocationFile::empty()
    });
    let mut out: Vec<IssuedIdentity> = Vec::new();
    let mut at: HashMap<&str, usize> = HashMap::new();
    for rec in &index.records {
        let usable = rec.unexpired_at(now) && !revoked.is_revoked_at(&rec.serial, now);
        let i = *at.entry(rec.id.as_str()).or_insert_with(|| {
            out.push(IssuedIdentity {
                id: rec.id.clone(),
                role: rec.role,
                org: rec.org.clone(),
                usable: false,
                conflicting_roles: false,
            });
            out.len() - 1
        });
        let known = &mut out[i];
        if usable {
            if known.usable && known.role != rec.role {
                known.conflicting_roles = true;
            }
            known.usable = true;
            known.role = rec.role;
            known.org = rec.org.clone();
        } else if !known.usable {
            known.role = rec.role;
            known.org = rec.org.clone();
        }
    }
    Ok(out)
}

/// An RFC 3339 time as unix milliseconds (`None` if unreadable or before 1970).
fn unix_ms(rfc3339: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_times_become_unix_milliseconds() {
        assert_eq!(super::unix_ms("1970-01-01T00:00:01Z"), Some(1000));
        assert_eq!(
            super::unix_ms("2026-01-01T00:00:00Z"),
            Some(1_767_225_600_000)
        );
        assert_eq!(super::unix_ms("junk"), None);
        assert_eq!(super::unix_ms("1969-12-31T00:00:00Z"), None);
    }
}
