//! The wire contract every cityplane party shares: who a client is ([`Identity`],
//! [`Role`]), how identities are spelled ([`validate_id`]) and which topics exist
//! ([`topics`]). Only this crate builds topic strings.

pub mod firmware;
mod identity;
pub mod messages;
pub mod policy;
pub mod secrets;
pub mod topics;

pub use identity::{validate_id, validate_org, IdError, Identity, Role, ADMIN_ORG, MAX_ID_LEN};

// For `object_only!` in other crates.
#[doc(hidden)]
pub use serde as __serde;
