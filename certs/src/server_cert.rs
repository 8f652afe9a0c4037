//! The broker's own certificate (`broker.crt`, `broker.key`): signed at
//! `init`, replaced by [`Pki::rotate_server`].
//!
//! Devices trust the CA, not this certificate, so a new one signed by the
//! same CA is accepted at their next connection with nothing to deploy on
//! them. A running broker keeps serving with the certificate it loaded at
//! start (its TLS configuration is built once) until it is restarted.

use std::net::IpAddr;

use rcgen::{
    Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::FromDer;

use crate::fsutil::{self, KEY_MODE, PUBLIC_MODE};
use crate::peer::rfc3339;
use crate::pki::{
    default_server_names, dn, now, Ca, ORGANIZATION, SERVER_CERT_FILE, SERVER_KEY_FILE, SERVER_NAME,
};
use crate::serial::{random_serial, serial_hex};
use crate::{CertError, Pki, BACKDATE};

/// What [`Pki::rotate_server`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRotated {
    /// The serial of the certificate replaced, if `broker.crt` was readable.
    pub old_serial: Option<String>,
    pub serial: String,
    /// RFC 3339 (UTC): the CA's own expiry, as at `init`.
    pub not_after: String,
    /// The names it is valid for (DNS names and IP addresses).
    pub names: Vec<String>,
}

/// A new key and server certificate for `names`, valid until the CA expires.
pub(crate) fn sign(ca: &Ca, names: &[SanType]) -> Result<(KeyPair, Certificate), CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = names.to_vec();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    params.not_before = now() - BACKDATE;
    params.not_after = ca.not_after;
    params.distinguished_name = dn(&[
        (DnType::OrganizationName, ORGANIZATION),
        (DnType::OrganizationalUnitName, SERVER_NAME),
        (DnType::CommonName, SERVER_NAME),
    ]);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok((key, cert))
}

impl Pki {
    /// Replaces `broker.key` and `broker.crt` with a new key and a
    /// certificate signed by this CA. `names` are DNS names or IP addresses
    /// (an entry that parses as an address is one); empty keeps the names of
    /// the current certificate (`localhost` and `127.0.0.1` if it cannot be
    /// read). Needs `ca.key`.
    ///
    /// The old certificate is not revoked: clients check the server against
    /// the CA only. Copy the new files to servers with
    /// [`export_server`](Self::export_server) and restart them.
    pub fn rotate_server(&self, names: &[String]) -> Result<ServerRotated, CertError> {
        let ca = self.load_ca()?;
        let current = fsutil::read_optional(&self.server_cert_path())?
            .and_then(|pem| current_server_cert(&pem));
        let sans = if !names.is_empty() {
            names
                .iter()
                .map(|n| san(n))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            match current.as_ref().map(|c| c.1.clone()) {
                Some(sans) if !sans.is_empty() => sans,
                _ => default_server_names()?,
            }
        };
        let (key, cert) = sign(&ca, &sans)?;
        let parsed = serial_and_expiry(cert.der()).ok_or_else(|| {
            CertError::bad_file(
                self.server_cert_path(),
                "generated an unreadable certificate",
            )
        })?;
        // Key first, as for identities: a crash between the two leaves a key
        // that does not match broker.crt, which the server refuses to start
        // with (loudly) and re-running this command repairs.
        fsutil::write_atomic(
            self.dir(),
            SERVER_KEY_FILE,
            key.serialize_pem().as_bytes(),
            KEY_MODE,
            true,
        )?;
        fsutil::write_atomic(
            self.dir(),
            SERVER_CERT_FILE,
            cert.pem().as_bytes(),
            PUBLIC_MODE,
            true,
        )?;
        tracing::info!(dir = %self.dir().display(), serial = %parsed.0, "rotated the broker's certificate");
        Ok(ServerRotated {
            old_serial: current.map(|c| c.0),
            serial: parsed.0,
            not_after: rfc3339(parsed.1),
            names: sans.iter().map(san_text).collect(),
        })
    }
}

/// Reports what was written: read back from the DER.
fn serial_and_expiry(der: &[u8]) -> Option<(String, time::OffsetDateTime)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some((
        serial_hex(cert.raw_serial()),
        cert.validity().not_after.to_datetime(),
    ))
}

fn san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if name.is_empty() {
        return Err(CertError::InvalidValidity(
            "a server name must not be empty".into(),
        ));
    }
    Ok(SanType::DnsName(name.try_into()?))
}

fn san_text(san: &SanType) -> String {
    match san {
        SanType::DnsName(n) => n.as_str().to_owned(),
        SanType::IpAddress(ip) => ip.to_string(),
        other => format!("{other:?}"),
    }
}

/// Serial and names of the current `broker.crt`; `None` if unreadable (it is
/// being replaced anyway).
fn current_server_cert(pem: &[u8]) -> Option<(String, Vec<SanType>)> {
    let (_, pem) = parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let serial = serial_hex(cert.raw_serial());
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(n) => sans.push(SanType::DnsName((*n).try_into().ok()?)),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(*b).ok()?),
                        16 => IpAddr::from(<[u8; 16]>::try_from(*b).ok()?),
                        _ => return None,
                    };
                    sans.push(SanType::IpAddress(ip));
                }
                _ => {}
            }
        }
    }
    Some((serial, sans))
}
