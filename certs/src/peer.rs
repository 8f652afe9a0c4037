//! Reading identities out of certificates.

use cityplane_proto::{validate_id, validate_org, Identity, Role};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

use crate::serial::serial_hex;
use crate::CertError;

/// The identity a TLS peer proved with its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// CN = id, OU = role, and for an operator O = organisation.
    pub identity: Identity,
    /// Canonical serial (lowercase hex, no colons, no leading zero bytes):
    /// the same string [`crate::CertInfo::serial`] shows for this certificate
    /// and that [`crate::RevocationList::is_revoked`] expects.
    pub serial: String,
    /// The extended key usage extension lists clientAuth. `false` when the
    /// extension is missing, although webpki then accepts any purpose:
    /// cityplane issues every client certificate with clientAuth.
    pub client_auth: bool,
    /// The end of the validity period: a session must not outlive it.
    pub not_after: std::time::SystemTime,
}

/// Parses a DER client certificate presented at the TLS handshake.
///
/// The chain and validity period must already have been verified (rustls
/// does that); this reads who the certificate names and whether it is meant
/// for client authentication.
/// The subject must hold exactly one CN, which must be a valid identity (see
/// [`cityplane_proto::validate_id`]), and exactly one OU, which must be a
/// [`Role`] name. An operator's subject must also hold exactly one O, its
/// organisation (see [`cityplane_proto::validate_org`]); the O of devices
/// and controllers (`cityplane`) means nothing and is not read. An operator
/// certificate from before organisations existed has O = `cityplane`: it
/// belongs to an organisation of that name, which nobody creates, so it
/// sees no device (fails closed) until it is re-issued with `--org`.
pub fn peer_cert(der: &[u8]) -> Result<PeerCert, CertError> {
    let parsed = parse_identity(der).map_err(CertError::BadPeerCert)?;
    Ok(PeerCert {
        identity: parsed.identity,
        serial: parsed.serial,
        client_auth: parsed.client_auth,
        not_after: parsed.not_after.into(),
    })
}

/// What the PKI needs to know about an identity certificate.
pub(crate) struct ParsedIdentity {
    pub identity: Identity,
    pub serial: String,
    pub not_after: OffsetDateTime,
    pub client_auth: bool,
}

impl ParsedIdentity {
    pub(crate) fn not_after_rfc3339(&self) -> String {
        rfc3339(self.not_after)
    }
}

pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    // Only fails for years outside 0..=9999, which X.509 cannot express anyway.
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// Parses a DER certificate into an identity; the error is a reason phrase.
pub(crate) fn parse_identity(der: &[u8]) -> Result<ParsedIdentity, String> {
    let (rest, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "{} unexpected bytes after the certificate",
            rest.len()
        ));
    }
    let subject = cert.subject();
    let id = single_attr(subject, "CN (common name)", X509Name::iter_common_name)?;
    validate_id(id).map_err(|e| format!("CN {e}"))?;
    let ou = single_attr(
        subject,
        "OU (organizational unit)",
        X509Name::iter_organizational_unit,
    )?;
    let role: Role = ou
        .parse()
        .map_err(|_| format!("OU {ou:?} is not a role: expected device, operator or controller"))?;
    let org = match role {
        Role::Operator => {
            let org = single_attr(subject, "O (organization)", X509Name::iter_organization)?;
            validate_org(org).map_err(|e| format!("O (organisation) {e}"))?;
            Some(org.to_owned())
        }
        Role::Device | Role::Controller => None,
    };
    Ok(ParsedIdentity {
        identity: Identity {
            id: id.to_owned(),
            role,
            org,
        },
        serial: serial_hex(cert.raw_serial()),
        not_after: cert.validity().not_after.to_datetime(),
        // A duplicated or malformed extension counts as no clientAuth.
        client_auth: matches!(cert.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth),
    })
}

fn single_attr<'a, I>(
    name: &'a X509Name<'a>,
    what: &str,
    iter: impl FnOnce(&'a X509Name<'a>) -> I,
) -> Result<&'a str, String>
where
    I: Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
{
    let mut values = iter(name);
    let first = values
        .next()
        .ok_or_else(|| format!("the subject has no {what}"))?;
    if values.next().is_some() {
        return Err(format!("the subject has more than one {what}"));
    }
    first
        .as_str()
        .map_err(|_| format!("the subject's {what} is not a text string"))
}
