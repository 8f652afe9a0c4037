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

/// One certificate holder of any role, as the PKI knows it: what an
/// external broker's users and the external controller's view of who asks
/// are made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedIdentity {
    pub id: String,
    pub role: Role,
    /// An operator's organisation, from its newest certificate.
    pub org: Option<String>,
    /// Its newest certificate is revoked.
    pub revoked: bool,
}

/// Every identity recorded in `dir` (devices, operators, controllers),
/// newest record per id and role, in the order ids were first issued.
pub fn issued_identities(dir: &Path) -> Result<Vec<IssuedIdentity>, CertError> {
    let index = IssuedIndex::load(&dir.join(ISSUED_FILE))?;
    let revocation = dir.join(REVOCATION_FILE);
    let revoked = if revocation.exists() {
        RevocationFile::load(&revocation)?
    } else {
        RevocationFile::empty()
    };
    let mut out: Vec<IssuedIdentity> = Vec::new();
    let mut at: HashMap<(&str, Role), usize> = HashMap::new();
    for rec in &index.records {
        let identity = IssuedIdentity {
            id: rec.id.clone(),
            role: rec.role,
            org: rec.org.clone(),
            revoked: revoked.find(&rec.serial).is_some(),
        };
        match at.get(&(rec.id.as_str(), rec.role)) {
            Some(&i) => out[i] = identity,
            None => {
                at.insert((&rec.id, rec.role), out.len());
                out.push(identity);
            }
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
