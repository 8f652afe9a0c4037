use std::path::PathBuf;

use cityplane_proto::IdError;

/// Everything that can go wrong in the cityplane PKI.
///
/// Messages are written for the operator reading them on a terminal: they
/// name the file involved and, where there is one, the command that fixes it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The I/O error is part of the message (not a `source()`), so a plain
    /// `{}` of this error says everything.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },

    #[error(
        "{} holds no cityplane PKI ({missing} is missing): run `cityplane certs init --pki {}`",
        dir.display(),
        dir.display()
    )]
    NotInitialized { dir: PathBuf, missing: &'static str },

    #[error(
        "{} already holds a CA (ca.crt/ca.key): refusing to overwrite it. \
         Pass --force to create a new CA; every certificate issued by the old one stops working",
        dir.display()
    )]
    AlreadyInitialized { dir: PathBuf },

    #[error(
        "{} has mode {mode:04o}: other users can write to it and could replace the CA or \
         the keys in it. Run `chmod 700 {}` (or choose a private directory) and try again",
        dir.display(),
        dir.display()
    )]
    InsecureDir { dir: PathBuf, mode: u32 },

    #[error(
        "{count} identit{} ha{} a valid certificate recorded in issued.jsonl but no .crt file \
         ({ids}): it may be in use somewhere. Revoke them (`cityplane certs revoke --id ID`) or \
         replace them one by one (`cityplane certs issue --id ID --rotate`), then run again",
        if *count == 1 { "y" } else { "ies" },
        if *count == 1 { "s" } else { "ve" }
    )]
    LiveWithoutFile { count: usize, ids: String },

    #[error("{}: {reason}", dir.display())]
    ServerDir { dir: PathBuf, reason: String },

    /// Says which identity and what the rule is.
    #[error(transparent)]
    InvalidId(#[from] IdError),

    /// Says the rule (the same as for identities: orgs appear in topics).
    #[error("invalid organisation: {0}")]
    InvalidOrg(IdError),

    #[error("only an operator belongs to an organisation; a {role} certificate has none")]
    OrgNotForRole { role: cityplane_proto::Role },

    #[error("identity {0:?} is reserved for the PKI's own files (ca.crt, broker.crt); choose another id")]
    ReservedId(String),

    #[error(
        "{id} already has a valid certificate (serial {serial}, expires {not_after}{}): \
         pass --rotate to issue a new one and revoke the old one",
        if path.as_os_str().is_empty() {
            ", its .crt file is gone but the certificate may be in use".to_owned()
        } else {
            format!(", {}", path.display())
        }
    )]
    AlreadyIssued {
        id: String,
        serial: String,
        not_after: String,
        path: PathBuf,
    },

    #[error("certificate {serial} of {id} is already revoked")]
    AlreadyRevoked { serial: String, id: String },

    #[error("no certificate for {what} in {}", dir.display())]
    NotFound { what: String, dir: PathBuf },

    #[error("{0:?} is not a certificate serial number: expected hexadecimal digits, optionally separated by ':'")]
    InvalidSerial(String),

    #[error("invalid validity: {0}")]
    InvalidValidity(String),

    /// A rotation's overlap: negative, or longer than allowed.
    #[error("invalid overlap: {0}")]
    InvalidOverlap(String),

    /// `rotate` needs a current certificate to take the role and
    /// organisation from.
    #[error(
        "{id} has no valid certificate in {} to rotate: issue one with `cityplane certs issue --id {id} --role ROLE`",
        dir.display()
    )]
    NothingToRotate { id: String, dir: PathBuf },

    #[error("{}: {reason}", path.display())]
    BadFile { path: PathBuf, reason: String },

    #[error("revocation list {} is unusable: {reason}", path.display())]
    BadRevocationList { path: PathBuf, reason: String },

    #[error("client certificate rejected: {0}")]
    BadPeerCert(String),

    /// A device's certificate signing request that the CA will not sign:
    /// unreadable, badly signed, or asking for something other than the
    /// device's own identity with a P-256 key.
    #[error("certificate signing request of {id} refused: {reason}")]
    BadCsr { id: String, reason: String },

    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),

    #[error("the system random number generator failed: {0}")]
    Random(String),
}

impl From<rcgen::Error> for CertError {
    fn from(e: rcgen::Error) -> Self {
        CertError::Generate(e)
    }
}

impl CertError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        error: std::io::Error,
    ) -> Self {
        CertError::Io {
            action,
            path: path.into(),
            error,
        }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CertError::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
