//! Organisations: who an operator works for, which devices it may see and
//! change (its scope) and what it may do there (its rights). Pure data and
//! checks; the controller enforces them on every query and write and tells
//! the broker each organisation's devices.
//!
//! The organisation is the operator certificate's subject O (see
//! docs/PROTOCOL.md). `city` ([`ADMIN_ORG`]) is built in: the whole fleet,
//! every right, and only its operators manage organisations. Any other
//! organisation exists only once the city creates it; an operator of an
//! organisation nobody created can do nothing (fail closed).

use std::collections::BTreeSet;

use cityplane_proto::messages::{Attributes, Selector};
pub use cityplane_proto::ADMIN_ORG;
use serde::{Deserialize, Serialize};

use crate::input::Rejection;
use crate::model::Millis;

/// What an organisation may do inside its scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Right {
    /// Queries: devices, documents, rollouts, compliance, audit.
    Read,
    /// Desired state: documents, device registration and labels.
    Write,
    /// Rollouts and firmware publishing.
    Rollout,
    /// The security policy and its exceptions.
    Policy,
    /// Incident response (quarantine; issue 12).
    Incident,
}

impl Right {
    pub const ALL: [Right; 5] = [
        Right::Read,
        Right::Write,
        Right::Rollout,
        Right::Policy,
        Right::Incident,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Right::Read => "read",
            Right::Write => "write",
            Right::Rollout => "rollout",
            Right::Policy => "policy",
            Right::Incident => "incident",
        }
    }

    pub fn parse(s: &str) -> Option<Right> {
        Right::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A stored organisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrgRecord {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The devices it may see and change; `None` only for the city.
    pub scope: Option<Selector>,
    pub rights: BTreeSet<Right>,
    pub created_by: String,
    pub created_at: Millis,
    pub updated_by: String,
    pub updated_at: Millis,
    pub generation: u64,
}

impl OrgRecord {
    /// The built-in administrators' organisation.
    pub fn city() -> OrgRecord {
        OrgRecord {
            name: ADMIN_ORG.to_owned(),
            description: "the city's administrators (built in)".to_owned(),
            scope: None,
            rights: Right::ALL.into_iter().collect(),
            created_by: "built-in".to_owned(),
            created_at: 0,
            updated_by: "built-in".to_owned(),
            updated_at: 0,
            generation: 0,
        }
    }

    pub fn key(name: &str) -> String {
        format!("org/{name}")
    }
}

/// What one operator may do, resolved from its certificate's organisation.
#[derive(Debug, Clone)]
pub struct Access {
    pub operator: String,
    pub org: String,
    /// `None`: the whole fleet.
    pub scope: Option<Selector>,
    pub rights: BTreeSet<Right>,
    /// The organisation exists (the city, or one the city created).
    pub known: bool,
}

impl Access {
    pub fn resolve(
        operator: &str,
        org: Option<&str>,
        orgs: &std::collections::BTreeMap<String, OrgRecord>,
    ) -> Access {
        let org = org.unwrap_or_default();
        if org == ADMIN_ORG {
            let city = OrgRecord::city();
            return Access {
                operator: operator.to_owned(),
                org: org.to_owned(),
                scope: None,
                rights: city.rights,
                known: true,
            };
        }
        match orgs.get(org) {
            Some(rec) => Access {
                operator: operator.to_owned(),
                org: org.to_owned(),
                // A stored organisation always has a scope; a missing one
                // would mean everything, so read it as nothing.
                scope: Some(rec.scope.clone().unwrap_or_else(nothing)),
                rights: rec.rights.clone(),
                known: true,
            },
            None => Access {
                operator: operator.to_owned(),
                org: org.to_owned(),
                scope: Some(nothing()),
                rights: BTreeSet::new(),
                known: false,
            },
        }
    }

    pub fn is_admin(&self) -> bool {
        self.org == ADMIN_ORG
    }

    /// Whether the device is inside this operator's scope.
    pub fn sees(&self, id: &str, attrs: &Attributes) -> bool {
        self.scope.as_ref().is_none_or(|s| s.matches(id, attrs))
    }

    /// Refuses unless the organisation holds `right`.
    pub fn require(&self, right: Right, what: &str) -> Result<(), Rejection> {
        if self.rights.contains(&right) {
            return Ok(());
        }
        let why = if self.known {
            format!(
                "organisation {:?} does not hold the {:?} right needed to {what}; the city's administrators grant rights (cityplane orgs grant)",
                self.org,
                right.as_str()
            )
        } else {
            format!(
                "organisation {:?} (the O of your certificate) does not exist: the city's administrators create it (cityplane orgs create)",
                self.org
            )
        };
        Err(Rejection::new("forbidden", why))
    }

    /// Whether a thing owned by `owner_org` (a document, a rollout) may be
    /// changed by this operator: its own organisation's, or any for the city.
    pub fn owns(&self, owner_org: Option<&str>) -> bool {
        self.is_admin() || owner_org.unwrap_or(ADMIN_ORG) == self.org
    }
}

/// A selector no device matches: an id prefix no valid id can start with.
fn nothing() -> Selector {
    Selector {
        id_prefix: Some("/".to_owned()),
        ..Selector::default()
    }
}

/// `org-create` / `org-grant` bodies, checked.
pub fn check_org_name(name: &str) -> Result<(), Rejection> {
    cityplane_proto::validate_org(name)
        .map_err(|e| Rejection::new("bad_name", format!("organisation name: {e}")))?;
    if name == ADMIN_ORG {
        return Err(Rejection::new(
            "bad_name",
            format!("{ADMIN_ORG:?} is built in: the whole fleet and every right"),
        ));
    }
    Ok(())
}

pub fn parse_rights(names: &[String]) -> Result<BTreeSet<Right>, Rejection> {
    names
        .iter()
        .map(|n| {
            Right::parse(n).ok_or_else(|| {
                Rejection::new(
                    "bad_schema",
                    format!(
                        "unknown right {n:?}; expected read, write, rollout, policy or incident"
                    ),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn attrs(owner: &str) -> Attributes {
        Attributes {
            owner: Some(owner.to_owned()),
            ..Attributes::default()
        }
    }

    #[test]
    fn unknown_organisations_can_do_nothing_and_see_nothing() {
        let a = Access::resolve("op", Some("nobody"), &BTreeMap::new());
        assert!(!a.sees("d1", &attrs("nobody")));
        assert!(a.require(Right::Read, "read").is_err());
        let none = Access::resolve("op", None, &BTreeMap::new());
        assert!(!none.sees("d1", &Attributes::default()));
        assert!(none.require(Right::Read, "read").is_err());
    }

    #[test]
    fn the_city_sees_everything_and_a_contractor_its_scope() {
        let mut orgs = BTreeMap::new();
        orgs.insert(
            "lighting-co".to_owned(),
            OrgRecord {
                name: "lighting-co".into(),
                scope: Some(Selector {
                    owner: Some("lighting-co".into()),
                    ..Selector::default()
                }),
                rights: [Right::Read].into_iter().collect(),
                ..OrgRecord::city()
            },
        );
        let city = Access::resolve("admin", Some(ADMIN_ORG), &orgs);
        assert!(city.sees("d1", &attrs("camera-int")));
        let lc = Access::resolve("lc", Some("lighting-co"), &orgs);
        assert!(lc.sees("d1", &attrs("lighting-co")));
        assert!(!lc.sees("d2", &attrs("camera-int")));
        assert!(lc.require(Right::Read, "read").is_ok());
        assert!(lc.require(Right::Write, "write").is_err());
        assert!(lc.owns(Some("lighting-co")) && !lc.owns(None) && !lc.owns(Some("x")));
        assert!(city.owns(Some("lighting-co")));
    }
}
