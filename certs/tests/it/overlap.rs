//! Rotation with an overlap (issue 12): the old serial is recorded at once
//! but refused only from `effective_at`; the CRL lists it only from then on;
//! the server's own certificate is replaced under the same CA.

use crate::common::{mode, pem_der, pki, TestResult};

use cityplane_certs::{normalize_serial, CertError, Pki, RevocationList, MAX_OVERLAP_DAYS};
use cityplane_proto::Role;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

fn crl_serials(pki: &Pki) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let data = std::fs::read(pki.crl_path())?;
    let (_, pem) = parse_x509_pem(&data).map_err(|e| format!("{e:?}"))?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).map_err(|e| format!("{e:?}"))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| normalize_serial(&r.raw_serial_as_string()).unwrap_or_default())
        .collect())
}

#[test]
fn rotating_with_an_overlap_records_the_old_serial_from_now_plus_the_overlap() -> TestResult {
    let (_tmp, pki) = pki()?;
    let old = pki
        .clone()
        .with_org("lighting-co")?
        .issue(Role::Operator, "op")?;
    let before = OffsetDateTime::now_utc().replace_nanosecond(0)?;
    let rotated = pki.rotate_overlapping("op", Duration::hours(1))?;
    let after = OffsetDateTime::now_utc();

    // Same role and organisation; a new serial and key, mode 0600.
    assert_eq!(rotated.cert.role, Role::Operator);
    assert_eq!(rotated.cert.org.as_deref(), Some("lighting-co"));
    assert_ne!(rotated.cert.serial, old.serial);
    assert_eq!(mode(&pki.key_path("op"))?, 0o600);

    // The old serial: recorded, effective one hour from now.
    assert_eq!(rotated.revoked.len(), 1);
    let entry = &rotated.revoked[0];
    assert_eq!(entry.serial, old.serial);
    let effective = OffsetDateTime::parse(
        entry.effective_at.as_deref().ok_or("effective_at")?,
        &Rfc3339,
    )?;
    assert!(
        effective >= before + Duration::hours(1) && effective <= after + Duration::hours(1),
        "{effective} not one hour after the rotation"
    );
    let list = RevocationList::load(&pki.revocation_path())?;
    assert_eq!(list.entries()[0].effective_at, entry.effective_at);
    assert!(
        !list.is_revoked(&old.serial),
        "still accepted during the overlap"
    );
    assert!(list.is_revoked_at(&old.serial, effective));
    assert!(!list.is_revoked(&rotated.cert.serial));

    // `list` shows it revoked from that instant.
    let listed = pki.list()?;
    let old_listed = listed
        .iter()
        .find(|c| c.serial == old.serial)
        .ok_or("old listed")?;
    assert_eq!(old_listed.revoked_from, entry.effective_at);
    assert!(listed
        .iter()
        .any(|c| c.serial == rotated.cert.serial && !c.revoked));

    // The CRL, read by other brokers as "refused now", does not list it yet.
    assert!(
        crl_serials(&pki)?.is_empty(),
        "a pending entry is not in the CRL"
    );
    let crl = pki.refresh_crl()?;
    assert_eq!(crl.revoked, 0);
    assert_eq!(crl.pending_until, entry.effective_at);

    // A device keeps no organisation; zero overlap is at once, as `--rotate`.
    let dev = pki.issue(Role::Device, "lamp")?;
    let r = pki.rotate_overlapping("lamp", Duration::ZERO)?;
    assert_eq!(r.cert.role, Role::Device);
    assert_eq!(r.cert.org, None);
    assert!(RevocationList::load(&pki.revocation_path())?.is_revoked(&dev.serial));
    assert_eq!(crl_serials(&pki)?, vec![dev.serial]);

    // Out of range, or nothing to rotate.
    for bad in [
        Duration::seconds(-1),
        Duration::days(i64::from(MAX_OVERLAP_DAYS) + 1),
    ] {
        let err = pki.rotate_overlapping("op", bad).expect_err("refused");
        assert!(matches!(err, CertError::InvalidOverlap(_)), "{err}");
    }
    let err = pki
        .rotate_overlapping("nobody", Duration::hours(1))
        .expect_err("none");
    assert!(matches!(err, CertError::NothingToRotate { .. }), "{err}");
    Ok(())
}

#[test]
fn the_crl_lists_a_pending_entry_once_it_is_in_effect() -> TestResult {
    let (_tmp, pki) = pki()?;
    let old = pki.issue(Role::Controller, "ctl")?;
    pki.rotate_overlapping("ctl", Duration::seconds(2))?;
    assert!(crl_serials(&pki)?.is_empty());
    std::thread::sleep(std::time::Duration::from_millis(2100));
    // Any later command that writes the CRL includes what became effective.
    pki.issue(Role::Device, "other")?;
    pki.revoke("other")?;
    let listed = crl_serials(&pki)?;
    assert!(listed.contains(&old.serial), "{listed:?}");
    assert_eq!(pki.refresh_crl()?.pending_until, None);
    Ok(())
}

#[test]
fn revoking_during_the_overlap_revokes_the_old_certificate_at_once() -> TestResult {
    let (_tmp, pki) = pki()?;
    let a = pki.issue(Role::Controller, "a")?;
    let new_a = pki.rotate_overlapping("a", Duration::hours(1))?.cert;
    let b = pki.issue(Role::Controller, "b")?;
    pki.rotate_overlapping("b", Duration::hours(1))?;

    // By id: the new certificate and the pending old one, now.
    pki.revoke_id_all("a")?;
    let list = RevocationList::load(&pki.revocation_path())?;
    assert!(list.is_revoked(&a.serial) && list.is_revoked(&new_a.serial));
    // By serial: the pending one, now.
    pki.revoke_serial(&b.serial)?;
    assert!(RevocationList::load(&pki.revocation_path())?.is_revoked(&b.serial));
    let crl = crl_serials(&pki)?;
    assert!(
        crl.contains(&a.serial) && crl.contains(&b.serial),
        "{crl:?}"
    );
    Ok(())
}

#[test]
fn rotating_the_server_certificate_keeps_its_names_and_ca() -> TestResult {
    let (_tmp, pki) = pki()?;
    let old_cert = std::fs::read(pki.server_cert_path())?;
    let old_key = std::fs::read(pki.server_key_path())?;
    let r = pki.rotate_server(&[])?;
    assert_ne!(std::fs::read(pki.server_cert_path())?, old_cert);
    assert_ne!(std::fs::read(pki.server_key_path())?, old_key);
    assert_eq!(mode(&pki.server_key_path())?, 0o600);
    assert!(r.old_serial.is_some() && r.old_serial.as_ref() != Some(&r.serial));
    assert_eq!(r.names, ["localhost", "127.0.0.1"]);

    let r = pki.rotate_server(&["broker.city.example".into(), "10.0.0.5".into()])?;
    assert_eq!(r.names, ["broker.city.example", "10.0.0.5"]);
    let der = pem_der(&pki.server_cert_path())?;
    let (_, srv) = x509_parser::parse_x509_certificate(&der)?;
    let ca_der = pem_der(&pki.ca_cert_path())?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)?;
    assert_eq!(srv.issuer(), ca.subject());
    srv.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("not signed by the CA: {e:?}"))?;
    let san = srv.subject_alternative_name()?.ok_or("san")?;
    assert!(san
        .value
        .general_names
        .iter()
        .any(|n| matches!(n, GeneralName::DNSName("broker.city.example"))));
    // Without names: the current ones again.
    assert_eq!(
        pki.rotate_server(&[])?.names,
        ["broker.city.example", "10.0.0.5"]
    );
    assert!(pki.rotate_server(&[String::new()]).is_err());
    Ok(())
}
