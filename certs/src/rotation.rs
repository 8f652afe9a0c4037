//! The device's side of a certificate rotation: a new key pair made on the
//! device with its certificate signing request ([`device_csr`]), and the
//! checks a device makes of the certificate delivered for it
//! ([`check_delivery`]) before it connects with it. The CA's side is
//! [`crate::Pki::sign_device_csr`].
//!
//! Here rather than in the simulator: rcgen is the CA crate's dependency
//! (and testkit's) only, and a real device vendor would use the same
//! subject layout the CA writes.

use cityplane_proto::Role;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use x509_parser::certificate::X509Certificate;
use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::FromDer;

use crate::peer::{parse_identity, rfc3339};
use crate::CertError;

/// A key pair generated for a rotation and the request to certify it.
pub struct DeviceCsr {
    /// PKCS#8, PEM. Never sent anywhere.
    pub key_pem: String,
    /// PKCS#10, PEM: what the device publishes on `devices/D/csr`.
    pub csr_pem: String,
    /// The public key as it appears in a certificate's SubjectPublicKeyInfo
    /// (the uncompressed point): what a delivered certificate must carry.
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for DeviceCsr {
    /// Without the private key: it must not end up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCsr")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

/// A new ECDSA P-256 key pair for device `id` and its CSR, with the subject
/// the CA gives devices (O = cityplane, OU = device, CN = `id`) and no
/// requested extensions: the CA builds the certificate itself and takes
/// only the key from the request.
pub fn device_csr(id: &str) -> Result<DeviceCsr, CertError> {
    cityplane_proto::validate_id(id)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = crate::pki::subject(Role::Device, None, id)?;
    let csr = params.serialize_request(&key)?;
    Ok(DeviceCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
        public_key: key.public_key_raw().to_vec(),
    })
}

/// A delivered certificate that passed [`check_delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Canonical serial (as [`crate::CertInfo::serial`]).
    pub serial: String,
    /// RFC 3339 (UTC).
    pub not_after: String,
}

/// Why a device refuses a delivered certificate. The messages go back to
/// the controller as the ack's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("not a PEM certificate")]
    NotPem,
    #[error("the CA certificate is unusable: {0}")]
    BadCa(String),
    #[error("not a device certificate: {0}")]
    NotIdentity(String),
    #[error("issued to {got:?} as {role}, not to this device {want:?}")]
    WrongIdentity {
        want: String,
        got: String,
        role: Role,
    },
    #[error("not for client authentication (no clientAuth)")]
    NotClientAuth,
    #[error("not signed by the CA this device trusts")]
    NotFromCa,
    #[error("not valid now")]
    NotValidNow,
    #[error("its public key is not the key this device generated for the rotation")]
    WrongKey,
}

/// A device's checks of the certificate delivered for its rotation: it is
/// a device certificate for `id` with clientAuth, signed by the CA in
/// `ca_pem` (the CA the device already trusts), valid now, and for the key
/// pair the device generated (`public_key`, [`DeviceCsr::public_key`]).
/// Everything here came over the network: nothing panics on it.
pub fn check_delivery(
    ca_pem: &[u8],
    id: &str,
    public_key: &[u8],
    cert_pem: &str,
) -> Result<Delivered, DeliveryError> {
    let (_, ca) = parse_x509_pem(ca_pem).map_err(|e| DeliveryError::BadCa(e.to_string()))?;
    let (_, ca) =
        X509Certificate::from_der(&ca.contents).map_err(|e| DeliveryError::BadCa(e.to_string()))?;
    let (rest, pem) = parse_x509_pem(cert_pem.as_bytes()).map_err(|_| DeliveryError::NotPem)?;
    if pem.label != "CERTIFICATE" || !rest.iter().all(u8::is_ascii_whitespace) {
        return Err(DeliveryError::NotPem);
    }
    let parsed = parse_identity(&pem.contents).map_err(DeliveryError::NotIdentity)?;
    if parsed.identity.id != id || parsed.identity.role != Role::Device {
        return Err(DeliveryError::WrongIdentity {
            want: id.to_owned(),
            got: parsed.identity.id,
            role: parsed.identity.role,
        });
    }
    if !parsed.client_auth {
        return Err(DeliveryError::NotClientAuth);
    }
    let (_, cert) = X509Certificate::from_der(&pem.contents)
        .map_err(|e| DeliveryError::NotIdentity(e.to_string()))?;
    if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
        return Err(DeliveryError::NotFromCa);
    }
    if !cert.validity().is_valid() {
        return Err(DeliveryError::NotValidNow);
    }
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(DeliveryError::WrongKey);
    }
    Ok(Delivered {
        serial: parsed.serial,
        not_after: rfc3339(parsed.not_after),
    })
}
