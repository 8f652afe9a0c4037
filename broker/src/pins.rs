//! Which certificates each device may use, beyond the revocation list.
//!
//! `revoked.json` is the CA holder's word and needs the CA's directory to
//! change. The controller has its own, faster one: a quarantined device is
//! refused whatever certificate it shows, and a device whose certificate was
//! replaced (released from quarantine, rotated) is pinned to the serials it
//! may use now, so an old serial stays refused even before the CA's list
//! says so. The controller hands the whole table over with
//! [`Pins::replace`]; sessions it no longer allows are cut at once, and the
//! TLS verifier refuses their handshakes from then on.
//!
//! A device missing from the table may use any certificate the CA issued
//! it that is not revoked: a standalone `cityplane broker` has no
//! controller and an empty table, as before pins existed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::registry::Registry;

/// What one device may connect with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// Nothing: the device is quarantined.
    Refused,
    /// Only certificates with these serials (as `cityplane_certs` spells
    /// them: lowercase hex).
    Only(Vec<String>),
}

impl Pin {
    fn allows(&self, serial: &str) -> bool {
        match self {
            Pin::Refused => false,
            Pin::Only(serials) => serials.iter().any(|s| s.eq_ignore_ascii_case(serial)),
        }
    }
}

type Table = HashMap<String, Pin>;

/// The live pin table; cheap to clone (one per broker, shared by the TLS
/// verifier, every session and the controller).
#[derive(Clone)]
pub struct Pins {
    table: Arc<RwLock<Arc<Table>>>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Pins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pins")
            .field("devices", &self.read().len())
            .finish_non_exhaustive()
    }
}

/// A table no broker reads (for tests of what fills it).
impl Default for Pins {
    fn default() -> Pins {
        Pins::new(Arc::default())
    }
}

impl Pins {
    pub(crate) fn new(registry: Arc<Registry>) -> Pins {
        Pins {
            table: Arc::default(),
            registry,
        }
    }

    fn read(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the whole table (`device id -> pin`) and cuts every live
    /// device session it no longer allows; returns how many were cut.
    pub fn replace(&self, table: HashMap<String, Pin>) -> usize {
        let table = Arc::new(table);
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = table.clone();
        // Sessions that authenticate from now on see the new table at their
        // handshake (or at CONNECT, see `session.rs`); this cuts the ones
        // that authenticated before it.
        self.registry.kick_where(|device, serial| {
            device.is_some_and(|id| table.get(id).is_some_and(|pin| !pin.allows(serial)))
        })
    }

    /// Whether device `id` may connect with the certificate `serial`.
    pub fn allows(&self, id: &str, serial: &str) -> bool {
        self.read().get(id).is_none_or(|pin| pin.allows(serial))
    }

    /// The quarantined devices: what an external broker must refuse
    /// whatever certificate they show (it cannot tell serials apart).
    pub fn refused(&self) -> std::collections::BTreeSet<String> {
        self.read()
            .iter()
            .filter(|(_, pin)| **pin == Pin::Refused)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Devices in the table (quarantined or pinned).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cityplane_proto::{Identity, Role};

    fn device(id: &str) -> Identity {
        Identity {
            id: id.to_owned(),
            role: Role::Device,
            org: None,
        }
    }

    #[test]
    fn replacing_the_table_cuts_exactly_the_sessions_it_refuses() {
        let registry = Arc::new(Registry::default());
        let pins = Pins::new(registry.clone());
        let quarantined = registry.register(&device("d1"), "aa");
        let old_serial = registry.register(&device("d2"), "bb");
        let new_serial = registry.register(&device("d3"), "cc");
        let unpinned = registry.register(&device("d4"), "dd");
        // An operator whose id happens to be a quarantined device's id is
        // not a device: pins are about devices only.
        let operator = registry.register(
            &Identity {
                id: "d1".into(),
                role: Role::Operator,
                org: Some("city".into()),
            },
            "ee",
        );
        let cut = pins.replace(HashMap::from([
            ("d1".to_owned(), Pin::Refused),
            ("d2".to_owned(), Pin::Only(vec!["b2".into()])),
            ("d3".to_owned(), Pin::Only(vec!["CC".into()])),
        ]));
        assert_eq!(cut, 2);
        assert!(quarantined.kill.revoked());
        assert!(old_serial.kill.revoked());
        assert!(!new_serial.kill.revoked());
        assert!(!unpinned.kill.revoked());
        assert!(!operator.kill.revoked());
        assert!(!pins.allows("d1", "aa"));
        assert!(pins.allows("d2", "b2") && !pins.allows("d2", "bb"));
        assert!(pins.allows("d4", "anything"));
    }
}
