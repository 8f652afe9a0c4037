//! Which devices each organisation's operators may see.
//!
//! An operator of [`ADMIN_ORG`] (the city's own administrators) sees every
//! device. Any other organisation (a contractor) sees only the devices of
//! its scope, which the controller computes from registry attributes and
//! hands over whole with [`Scopes::replace`]; the broker trusts that table
//! and checks it at SUBSCRIBE (a filter naming one device) and on every
//! delivery to a scoped operator's connection (`session::core`), so
//! wildcards, `$share` groups and retained messages are covered and a
//! device leaving a scope stops being delivered at once.
//!
//! Until the controller fills the table, every organisation but
//! [`ADMIN_ORG`] sees nothing: a standalone `cityplane broker` without a
//! controller never fills it, so scoped operators get no device topics
//! there (fail closed).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use cityplane_proto::{validate_org, ADMIN_ORG};

type Table = HashMap<String, Arc<HashSet<String>>>;

/// The live scope table; cheap to clone (one per broker, shared by every
/// session and the controller).
#[derive(Clone, Default)]
pub struct Scopes {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The table and the generation it is, changed together.
    table: RwLock<(u64, Arc<Table>)>,
    /// A copy of the table's generation, read without the lock: a session
    /// checks it per delivery and takes the lock only when it moved.
    generation: AtomicU64,
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scopes")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl Scopes {
    /// Replaces the whole table: `org -> device ids`. An organisation
    /// missing from it sees no device. Entries for [`ADMIN_ORG`] are
    /// pointless (it sees everything) and names that are no valid
    /// organisation could never match a certificate; both are dropped.
    pub fn replace(&self, table: HashMap<String, HashSet<String>>) {
        let table: Table = table
            .into_iter()
            .filter(|(org, _)| org != ADMIN_ORG && validate_org(org).is_ok())
            .map(|(org, devices)| (org, Arc::new(devices)))
            .collect();
        let mut guard = self.inner.table.write().unwrap_or_else(|e| e.into_inner());
        let generation = guard.0 + 1;
        *guard = (generation, Arc::new(table));
        // Published while the new table is in place: a reader that sees the
        // new number finds the new table (or a newer one).
        self.inner.generation.store(generation, Ordering::Release);
    }

    /// Whether operators of `org` may see `device`.
    pub fn allows(&self, org: &str, device: &str) -> bool {
        org == ADMIN_ORG || self.devices_of(org).1.is_some_and(|d| d.contains(device))
    }

    /// Changes with every [`Scopes::replace`].
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// The devices of `org` (`None`: none at all) and the generation of
    /// the table they come from.
    fn devices_of(&self, org: &str) -> (u64, Option<Arc<HashSet<String>>>) {
        let guard = self.inner.table.read().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.get(org).cloned())
    }
}

/// One connection's copy of its organisation's scope, refreshed when the
/// table changes: a delivery costs an atomic load and a hash lookup, not
/// a lock.
#[derive(Debug, Default)]
pub(crate) struct ScopeCache {
    /// `None` until first used.
    cached: Option<(u64, Option<Arc<HashSet<String>>>)>,
}

impl ScopeCache {
    /// [`Scopes::allows`] for the organisation this cache serves (a
    /// connection's organisation never changes).
    pub(crate) fn allows(&mut self, scopes: &Scopes, org: &str, device: &str) -> bool {
        if org == ADMIN_ORG {
            return true;
        }
        let generation = scopes.generation();
        let devices = match &self.cached {
            Some((g, devices)) if *g == generation => devices,
            _ => &self.cached.insert(scopes.devices_of(org)).1,
        };
        devices.as_ref().is_some_and(|d| d.contains(device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, &[&str])]) -> HashMap<String, HashSet<String>> {
        entries
            .iter()
            .map(|(org, devices)| {
                (
                    (*org).to_owned(),
                    devices.iter().map(|d| (*d).to_owned()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn the_city_sees_everything_and_others_only_their_scope() {
        let scopes = Scopes::default();
        assert!(scopes.allows(ADMIN_ORG, "d1"));
        assert!(!scopes.allows("lighting-co", "d1"), "empty table: nothing");
        scopes.replace(table(&[
            ("lighting-co", &["d1", "d2"]),
            ("camera-int", &["c1"]),
            ("Bad/Org", &["d1"]),
            (ADMIN_ORG, &[]),
        ]));
        assert!(scopes.allows("lighting-co", "d1"));
        assert!(!scopes.allows("lighting-co", "c1"));
        assert!(scopes.allows("camera-int", "c1"));
        assert!(!scopes.allows("nobody", "d1"));
        assert!(!scopes.allows("Bad/Org", "d1"));
        assert!(scopes.allows(ADMIN_ORG, "anything"));
        assert!(!scopes.allows("", "d1"));
    }

    #[test]
    fn a_cache_follows_every_replace() {
        let scopes = Scopes::default();
        let mut cache = ScopeCache::default();
        assert!(!cache.allows(&scopes, "lighting-co", "d1"));
        scopes.replace(table(&[("lighting-co", &["d1"])]));
        assert!(cache.allows(&scopes, "lighting-co", "d1"));
        scopes.replace(table(&[("lighting-co", &["d2"])]));
        assert!(!cache.allows(&scopes, "lighting-co", "d1"));
        assert!(cache.allows(&scopes, "lighting-co", "d2"));
        scopes.replace(HashMap::new());
        assert!(!cache.allows(&scopes, "lighting-co", "d2"));
    }
}
