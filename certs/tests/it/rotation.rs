//! Certificate rotation with the device's own key: the CA signs a device's
//! CSR only for its own identity and takes nothing but the key from it;
//! the device accepts only a certificate for the key it made; old serials
//! are revoked in one batch.

use crate::common;

use cityplane_certs::rotation::{check_delivery, device_csr, DeliveryError};
use cityplane_certs::{normalize_serial, CertError, Pki, RevocationList};
use cityplane_proto::Role;
use common::{pem_der, pki, TestResult};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use x509_parser::pem::parse_x509_pem;

/// A CSR over a fresh P-256 key with this subject and these SANs.
fn csr_with(
    subject: &[(DnType, &str)],
    sans: &[&str],
) -> Result<String, Box<dyn std::error::Error>> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    let mut dn = DistinguishedName::new();
    for (ty, v) in subject {
        dn.push(ty.clone(), *v);
    }
    params.distinguished_name = dn;
    Ok(params.serialize_request(&key)?.pem()?)
}

fn refused(pki: &Pki, id: &str, csr: &str) -> String {
    match pki.sign_device_csr(id, csr) {
        Err(e @ CertError::BadCsr { .. }) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_ca_signs_a_device_csr_with_its_key_and_the_issue_layout() -> TestResult {
    let (_tmp, pki) = pki()?;
    let old = pki.issue(Role::Device, "d1")?;
    let req = device_csr("d1")?;
    let signed = pki.sign_device_csr("d1", &req.csr_pem)?;
    assert_eq!(signed.cert.id, "d1");
    assert_eq!(signed.cert.role, Role::Device);
    assert_ne!(signed.cert.serial, old.serial);
    assert!(signed.cert.cert_path.as_os_str().is_empty(), "no file");

    // The device's key, the CA's layout: the same subject and usage as issue.
    let (_, pem) = parse_x509_pem(signed.pem.as_bytes())?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents)?;
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        req.public_key.as_slice()
    );
    let old_der = pem_der(&pki.cert_path("d1"))?;
    let (_, old_cert) = x509_parser::parse_x509_certificate(&old_der)?;
    assert_eq!(cert.subject(), old_cert.subject());
    assert_eq!(cert.issuer(), old_cert.issuer());
    let eku = cert.extended_key_usage()?.ok_or("eku")?;
    assert!(eku.value.client_auth && !eku.value.server_auth);
    assert!(cert.subject_alternative_name()?.is_none());
    assert_eq!(
        cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp(),
        old_cert.validity().not_after.timestamp() - old_cert.validity().not_before.timestamp(),
    );

    // Recorded like any issuance, no key written, the file untouched.
    let listed = pki.list()?;
    assert!(listed
        .iter()
        .any(|c| c.serial == signed.cert.serial && !c.revoked));
    assert_eq!(pki.current_cert("d1")?.ok_or("d1")?.serial, old.serial);
    assert!(matches!(
        pki.issue(Role::Device, "d1"),
        Err(CertError::AlreadyIssued { .. })
    ));

    // And the device takes it.
    let ca = std::fs::read(pki.ca_cert_path())?;
    let got = check_delivery(&ca, "d1", &req.public_key, &signed.pem)?;
    assert_eq!(got.serial, signed.cert.serial);
    Ok(())
}

#[test]
fn a_csr_for_another_identity_or_role_is_refused() -> TestResult {
    let (_tmp, pki) = pki()?;
    pki.issue(Role::Device, "d1")?;
    pki.issue(Role::Device, "d2")?;
    let other = device_csr("d2")?;
    assert!(refused(&pki, "d1", &other.csr_pem).contains("\"d2\""));
    let operator = csr_with(
        &[
            (DnType::OrganizationName, "cityplane"),
            (DnType::OrganizationalUnitName, "operator"),
            (DnType::CommonName, "d1"),
        ],
        &[],
    )?;
    assert!(refused(&pki, "d1", &operator).contains("\"operator\""));
    for subject in [
        vec![(DnType::CommonName, "d1")],
        vec![
            (DnType::OrganizationalUnitName, "device"),
            (DnType::CommonName, "d1"),
            (DnType::LocalityName, "x"),
        ],
    ] {
        refused(&pki, "d1", &csr_with(&subject, &[])?);
    }
    let with_san = csr_with(
        &[
            (DnType::OrganizationalUnitName, "device"),
            (DnType::CommonName, "d1"),
        ],
        &["broker"],
    )?;
    assert!(refused(&pki, "d1", &with_san).contains("extension"));
    // The bare layout (no O) is fine.
    let bare = csr_with(
        &[
            (DnType::OrganizationalUnitName, "device"),
            (DnType::CommonName, "d1"),
        ],
        &[],
    )?;
    pki.sign_device_csr("d1", &bare)?;
    // No device certificate to renew: nothing is signed.
    let stranger = device_csr("d9")?;
    assert!(matches!(
        pki.sign_device_csr("d9", &stranger.csr_pem),
        Err(CertError::NotFound { .. })
    ));
    for junk in [
        "",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "\u{0}",
    ] {
        refused(&pki, "d1", junk);
    }
    Ok(())
}

#[test]
fn a_csr_whose_signature_is_broken_is_refused() -> TestResult {
    let (_tmp, pki) = pki()?;
    pki.issue(Role::Device, "d1")?;
    let req = device_csr("d1")?;
    let (_, pem) = parse_x509_pem(req.csr_pem.as_bytes())?;
    let mut der = pem.contents.clone();
    // The last byte is inside the signature's BIT STRING.
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    assert!(refused(&pki, "d1", &tampered).contains("signature"));
    pki.sign_device_csr("d1", &req.csr_pem)?;
    Ok(())
}

#[test]
fn a_device_refuses_a_certificate_for_another_key_ca_or_identity() -> TestResult {
    let (_tmp, pki) = pki()?;
    pki.issue(Role::Device, "d1")?;
    pki.issue(Role::Device, "d2")?;
    let ca = std::fs::read(pki.ca_cert_path())?;
    let mine = device_csr("d1")?;
    let other_key = device_csr("d1")?;
    let signed_other_key = pki.sign_device_csr("d1", &other_key.csr_pem)?;
    assert_eq!(
        check_delivery(&ca, "d1", &mine.public_key, &signed_other_key.pem),
        Err(DeliveryError::WrongKey)
    );
    let d2 = device_csr("d2")?;
    let for_d2 = pki.sign_device_csr("d2", &d2.csr_pem)?;
    assert!(matches!(
        check_delivery(&ca, "d1", &d2.public_key, &for_d2.pem),
        Err(DeliveryError::WrongIdentity { .. })
    ));
    let (_tmp2, other_ca) = pki_other()?;
    other_ca.issue(Role::Device, "d1")?;
    let foreign = other_ca.sign_device_csr("d1", &mine.csr_pem)?;
    assert_eq!(
        check_delivery(&ca, "d1", &mine.public_key, &foreign.pem),
        Err(DeliveryError::NotFromCa)
    );
    assert_eq!(
        check_delivery(&ca, "d1", &mine.public_key, "junk"),
        Err(DeliveryError::NotPem)
    );
    let good = pki.sign_device_csr("d1", &mine.csr_pem)?;
    check_delivery(&ca, "d1", &mine.public_key, &good.pem)?;
    Ok(())
}

fn pki_other() -> Result<(tempfile::TempDir, Pki), Box<dyn std::error::Error>> {
    pki()
}

#[test]
fn revoke_serials_revokes_a_batch_into_one_crl() -> TestResult {
    let (_tmp, pki) = pki()?;
    let serials: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|id| pki.issue(Role::Device, id).map(|c| c.serial))
        .collect::<Result<_, _>>()?;
    let keep = pki.issue(Role::Device, "d")?;
    // Any case, colons, a repeat: one entry each.
    let mut asked = serials.clone();
    asked.push(serials[0].to_uppercase());
    let entries = pki.revoke_serials(&asked)?;
    assert_eq!(
        entries.iter().map(|e| e.serial.clone()).collect::<Vec<_>>(),
        serials
    );
    assert_eq!(
        entries.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );

    let list = RevocationList::load(&pki.revocation_path())?;
    for s in &serials {
        assert!(list.is_revoked(s), "{s}");
    }
    assert!(!list.is_revoked(&keep.serial));
    let data = std::fs::read(pki.crl_path())?;
    let (_, pem) = parse_x509_pem(&data)?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents)?;
    let mut in_crl: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| normalize_serial(&r.raw_serial_as_string()).unwrap_or_default())
        .collect();
    in_crl.sort();
    let mut want = serials.clone();
    want.sort();
    assert_eq!(in_crl, want);

    // Nothing new: nothing added; a bad serial anywhere: nothing written.
    assert!(pki.revoke_serials(&serials)?.is_empty());
    let before = std::fs::read(pki.revocation_path())?;
    assert!(matches!(
        pki.revoke_serials(&[keep.serial.clone(), "xyz".into()]),
        Err(CertError::InvalidSerial(_))
    ));
    assert_eq!(std::fs::read(pki.revocation_path())?, before);
    Ok(())
}

/// A controller revoking rotated serials while an operator revokes a stolen
/// device (or several controllers on one directory): each revocation reads
/// `revoked.json`, adds to it and writes it back, so two at once must not
/// each write their own read back and lose the other's.
#[test]
fn revocations_at_the_same_time_are_all_kept() -> TestResult {
    const WRITERS: usize = 4;
    const EACH: usize = 12;
    let (_tmp, pki) = pki()?;
    let mut serials = Vec::new();
    for w in 0..WRITERS {
        let mut mine = Vec::new();
        for i in 0..EACH {
            mine.push(pki.issue(Role::Device, &format!("w{w}-d{i}"))?.serial);
        }
        serials.push(mine);
    }
    std::thread::scope(|s| {
        for (w, mine) in serials.iter().enumerate() {
            let pki = pki.clone();
            s.spawn(move || {
                for (i, serial) in mine.iter().enumerate() {
                    // One writer by id, the others by serial, one at a time
                    // or in pairs: every kind of revocation takes the lock.
                    let done = match (w, i % 2) {
                        (0, _) => pki.revoke_id(&format!("w{w}-d{i}")).map(|_| ()),
                        (_, 0) => pki.revoke_serial(serial).map(|_| ()),
                        _ => pki.revoke_serials(std::slice::from_ref(serial)).map(|_| ()),
                    };
                    done.expect("revoked");
                }
            });
        }
    });
    let list = RevocationList::load(&pki.revocation_path())?;
    let lost: Vec<&String> = serials
        .iter()
        .flatten()
        .filter(|s| !list.is_revoked(s))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} revocations lost",
        lost.len(),
        WRITERS * EACH
    );
    Ok(())
}
