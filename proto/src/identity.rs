use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest identity (certificate CN and MQTT client id) cityplane accepts.
pub const MAX_ID_LEN: usize = 64;

/// The organisation of the city's own administrators: its operators see
/// every device. Every other organisation (a contractor) sees only the
/// devices of its scope.
pub const ADMIN_ORG: &str = "city";

/// What a certificate holder is allowed to be. Stored in the certificate's OU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Operator,
    Controller,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Device, Role::Operator, Role::Controller];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Operator => "operator",
            Role::Controller => "controller",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| IdError::UnknownRole(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("identity is empty")]
    Empty,
    #[error("identity {0:?} is longer than {MAX_ID_LEN} characters")]
    TooLong(String),
    #[error(
        "identity {0:?} is not valid: use lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    BadCharacters(String),
    #[error("unknown role {0:?}: expected device, operator or controller")]
    UnknownRole(String),
}

/// Checks an identity against `[a-z0-9][a-z0-9._-]{0,63}`.
///
/// The rule keeps identities safe to embed in topic names (no `/`, `+`, `#`),
/// in file names (no leading `.`) and in MQTT client ids.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    let bytes = id.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(IdError::Empty);
    };
    if bytes.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(id.to_owned()));
    }
    let lower_or_digit = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !lower_or_digit(first)
        || !bytes[1..]
            .iter()
            .all(|b| lower_or_digit(b) || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(IdError::BadCharacters(id.to_owned()));
    }
    Ok(())
}

/// Checks an organisation name: the same rule as [`validate_id`], since
/// organisations appear in topic names (`fleet/compliance/<org>`).
pub fn validate_org(org: &str) -> Result<(), IdError> {
    validate_id(org)
}

/// Who is on the other end of a connection, as proven by its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub id: String,
    pub role: Role,
    /// An operator's organisation (the certificate subject's O); `None` for
    /// devices and controllers. Which devices an organisation may see is
    /// the controller's to say (the broker's scope table), except for
    /// [`ADMIN_ORG`], which sees all of them.
    pub org: Option<String>,
}

/// Longest session suffix of an operator's client id (`<id>:<session>`).
pub const MAX_SESSION_LEN: usize = 32;

impl Identity {
    /// Whether this identity may connect with `client_id`: its id, or for an
    /// operator also `<id>:<session>` (1 to 32 of `a-z 0-9 _ -`), so one
    /// operator can run several tools at once (a `get devices --watch` and an
    /// `apply`): MQTT lets one client id hold one connection. No identity
    /// contains `:`, so a session id is never another identity's id.
    pub fn may_use_client_id(&self, client_id: &str) -> bool {
        if client_id == self.id {
            return true;
        }
        let session = client_id
            .strip_prefix(self.id.as_str())
            .and_then(|rest| rest.strip_prefix(':'));
        self.role == Role::Operator
            && session.is_some_and(|s| {
                !s.is_empty()
                    && s.len() <= MAX_SESSION_LEN
                    && s.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    })
            })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_documented_pattern() {
        for good in ["a", "0", "dev0001", "street-light_3.north", &"a".repeat(64)] {
            assert_eq!(validate_id(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "_a",
            "A",
            "dev/1",
            "dev+",
            "dev#",
            "dé",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn an_operator_may_add_a_session_to_its_client_id_and_nobody_else_may() {
        let op = Identity {
            id: "op".into(),
            role: Role::Operator,
            org: Some(ADMIN_ORG.into()),
        };
        for good in [
            "op",
            "op:1",
            "op:watch-2f_a",
            &format!("op:{}", "a".repeat(32)),
        ] {
            assert!(op.may_use_client_id(good), "{good}");
        }
        for bad in [
            "op:",
            "op:A",
            "op:a:b",
            "op:a/b",
            "op:a b",
            "opx:1",
            "o:1",
            "op1",
            "op.x",
            ":1",
            &format!("op:{}", "a".repeat(33)),
        ] {
            assert!(!op.may_use_client_id(bad), "{bad:?}");
        }
        for role in [Role::Device, Role::Controller] {
            let who = Identity {
                id: "d1".into(),
                role,
                org: None,
            };
            assert!(who.may_use_client_id("d1"));
            assert!(!who.may_use_client_id("d1:1"), "{role}");
        }
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("admin".parse::<Role>().is_err());
    }
}
