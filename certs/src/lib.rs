//! The cityplane certificate authority.
//!
//! Every party on the broker (device, operator, controller) holds its own
//! X.509 certificate: CN = identity, OU = role. This crate creates and manages
//! the PKI directory the broker trusts:
//!
//! | file | what |
//! |---|---|
//! | `ca.crt`, `ca.key` | the CA (ECDSA P-256, 10 years) |
//! | `broker.crt`, `broker.key` | the broker's server certificate (`localhost`, `127.0.0.1`; replaced by [`Pki::rotate_server`]) |
//! | `<id>.crt`, `<id>.key` | one identity each (clientAuth, 365 days by default) |
//! | `issued.jsonl` | every serial signed (id, role, expiry, registry attributes of a device), appended before the certificate is written |
//! | `revoked.json` | revoked serials, some from a later instant (a rotation's overlap): the broker's source of truth |
//! | `crl.pem` | the same serials as a CA-signed X.509 CRL (mosquitto `crlfile`), valid 30 days |
//!
//! Private keys are created with mode 0600; every file is replaced atomically
//! (temporary file, fsync, rename, fsync of the directory); `issued.jsonl` is
//! only appended to (fsynced).
//!
//! A server needs only `ca.crt`, `broker.crt`, `broker.key`, `revoked.json`
//! and `crl.pem` (and `issued.jsonl`, from which its registry learns of new
//! devices): [`Pki::export_server`] copies them into a directory of their
//! own and [`Pki::publish_revocations`] keeps revocations and the issuance
//! record current there.
//!
//! ```no_run
//! use cityplane_certs::Pki;
//! use cityplane_proto::Role;
//! # fn main() -> Result<(), cityplane_certs::CertError> {
//! let pki = Pki::init("pki".as_ref(), false)?;
//! let cert = pki.issue(Role::Device, "dev0001")?;
//! pki.revoke(&cert.serial)?;
//! # Ok(()) }
//! ```

pub mod client_tls;
mod error;
pub mod firmware;
mod fsutil;
mod issued;
mod peer;
mod pki;
pub mod policy;
pub mod registry;
mod revocation;
pub mod rotation;
mod serial;
mod server_cert;
pub mod signing;

pub use error::CertError;
pub use peer::{peer_cert, PeerCert};
pub use pki::{
    BulkIssued, CertInfo, CrlInfo, IssueOptions, Pki, Rotated, SignedCsr, BACKDATE, CA_CERT_FILE,
    CA_KEY_FILE, CA_VALIDITY_DAYS, CRL_FILE, CRL_VALIDITY_DAYS, DEFAULT_VALIDITY_DAYS, ISSUED_FILE,
    LOCK_FILE, MAX_OVERLAP_DAYS, RESERVED_IDS, REVOCATION_FILE, SERVER_CERT_FILE, SERVER_FILES,
    SERVER_KEY_FILE,
};
pub use revocation::{RevocationList, RevokedEntry, REVOCATION_FORMAT_VERSION};
pub use serial::normalize_serial;
pub use server_cert::ServerRotated;
