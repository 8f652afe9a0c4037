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
