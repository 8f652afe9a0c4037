//! Certificates the project CA would never issue, signed with its key as a
//! stolen CA key or a bug would: identities outside `validate_id` (the
//! broker's internal link ids), to show the broker refuses them anyway.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Signs a client certificate with subject `CN = cn, OU = ou` with the CA
/// in `pki`, writes `DIR/forged-<n>.crt|key` and returns their paths.
pub fn client_cert(pki: &Path, cn: &str, ou: &str, n: usize) -> Result<(PathBuf, PathBuf)> {
    client_cert_with_org(pki, cn, ou, Some("cityplane"), n)
}

/// [`client_cert`] with this O (organisation), or none: an operator
/// certificate from before organisations (`cityplane`), or one whose O the
/// CA would never write. (rcgen writes one value per attribute type, so
/// "two O" cannot be made here.)
pub fn client_cert_with_org(
    pki: &Path,
    cn: &str,
    ou: &str,
    org: Option<&str>,
    n: usize,
) -> Result<(PathBuf, PathBuf)> {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key"))?)?;
    let ca_pem = std::fs::read(pki.join("ca.crt"))?;
    let ca_der = rustls::pki_types::pem::PemObject::from_pem_slice(&ca_pem)
        .map(|c: rustls::pki_types::CertificateDer<'static>| c)
        .context("ca.crt")?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(org) = org {
        dn.push(DnType::OrganizationName, org);
    }
    dn.push(DnType::OrganizationalUnitName, ou);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    let (crt, k) = (
        pki.join(format!("forged-{n}.crt")),
        pki.join(format!("forged-{n}.key")),
    );
    std::fs::write(&crt, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((crt, k))
}
