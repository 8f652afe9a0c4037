//! Findings of the outside security review (issue 8): revocation without the
//! certificate file, insecure PKI directories, the CA's path length, the
//! CRL's lifetime and the server-only directory.

use crate::common;

use std::os::unix::fs::PermissionsExt;

use cityplane_certs::{CertError, Pki, RevocationList};
use cityplane_proto::Role;
use common::{mode, pem_der, pki, TestResult};
use time::{Duration, OffsetDateTime};
use x509_parser::pem::parse_x509_pem;

fn crl_next_update(pki: &Pki) -> Result<(OffsetDateTime, Vec<String>), Box<dyn std::error::Error>> {
    let data = std::fs::read(pki.crl_path())?;
    let (_, pem) = parse_x509_pem(&data).map_err(|e| format!("{e:?}"))?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).map_err(|e| format!("{e:?}"))?;
    let next = crl.next_update().ok_or("nextUpdate")?.to_datetime();
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| cityplane_certs::normalize_serial(&r.raw_serial_as_string()).unwrap_or_default())
        .collect();
    Ok((next, serials))
}

// ---- 1. a lost certificate file -------------------------------------------

#[test]
fn a_serial_whose_file_is_gone_can_still_be_revoked() -> TestResult {
    let (_tmp, pki) = pki()?;
    let lost = pki.issue(Role::Device, "lamp1")?;
    std::fs::remove_file(pki.cert_path("lamp1"))?;

    let entry = pki.revoke_serial(&lost.serial)?;
    assert_eq!(entry.serial, lost.serial);
    assert_eq!(entry.id, "lamp1", "attributed from the issuance record");
    assert!(RevocationList::load(&pki.revocation_path())?.is_revoked(&lost.serial));
    assert!(crl_next_update(&pki)?.1.contains(&lost.serial));

    // A serial this directory never saw is revoked too (a certificate from a
    // backup, or one reported by a device vendor).
    let stranger = "7a:01:02:03:04:05:06:07";
    let entry = pki.revoke(stranger)?;
    assert_eq!(entry.serial, "7a01020304050607");
    assert!(RevocationList::load(&pki.revocation_path())?.is_revoked(stranger));
    assert!(crl_next_update(&pki)?.1.contains(&entry.serial));
    // Not a serial at all, or longer than X.509 allows: refused.
    assert!(pki.revoke_serial("xyz").is_err());
    assert!(pki.revoke_serial(&"7f".repeat(21)).is_err());
    Ok(())
}

#[test]
fn an_id_whose_file_is_gone_can_be_revoked_and_is_not_silently_reissued() -> TestResult {
    let (_tmp, pki) = pki()?;
    let lost = pki.issue(Role::Device, "lamp0002")?;
    std::fs::remove_file(pki.cert_path("lamp0002"))?;

    // Issuing again would leave the leaked certificate valid: refused.
    let err = pki
        .issue(Role::Device, "lamp0002")
        .expect_err("live certificate");
    assert!(matches!(err, CertError::AlreadyIssued { .. }), "{err}");
    assert!(err.to_string().contains(&lost.serial), "{err}");
    assert!(err.to_string().contains("--rotate"), "{err}");
    // Bulk refuses it too, before writing anything.
    let err = pki
        .issue_bulk(Role::Device, "lamp", 3, |_| {})
        .expect_err("bulk over a live certificate");
    assert!(
        err.to_string().contains("lamp0002") || err.to_string().contains("lamp0002"),
        "{err}"
    );

    // `list` shows it, without a file.
    let listed = pki.list()?;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    assert_eq!(listed[0].serial, lost.serial);
    assert!(!listed[0].revoked && listed[0].cert_path.as_os_str().is_empty());

    let entry = pki.revoke_id("lamp0002")?;
    assert_eq!(entry.serial, lost.serial);
    assert!(RevocationList::load(&pki.revocation_path())?.is_revoked(&lost.serial));
    // Now the id may be issued again.
    let fresh = pki.issue(Role::Device, "lamp0002")?;
    assert_ne!(fresh.serial, lost.serial);
    Ok(())
}

#[test]
fn rotate_revokes_a_live_certificate_whose_file_is_gone() -> TestResult {
    let (_tmp, pki) = pki()?;
    let lost = pki.issue(Role::Operator, "alice")?;
    std::fs::remove_file(pki.cert_path("alice"))?;
    let new = pki.rotate(Role::Operator, "alice")?;
    let list = RevocationList::load(&pki.revocation_path())?;
    assert!(list.is_revoked(&lost.serial));
    assert!(!list.is_revoked(&new.serial));
    Ok(())
}

// ---- 2. insecure directories ----------------------------------------------

#[test]
fn init_refuses_a_directory_others_can_write() -> TestResult {
    let tmp = tempfile::tempdir()?;
    for bad in [0o777, 0o770, 0o1777] {
        let dir = tmp.path().join(format!("pki-{bad:o}"));
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(bad))?;
        let err = Pki::init(&dir, false).expect_err("writable by others");
        let msg = err.to_string();
        assert!(msg.contains("chmod 700"), "{msg}");
        assert!(!dir.join("ca.key").exists(), "nothing written");
    }
    // A private existing directory is fine.
    let ok = tmp.path().join("pki-ok");
    std::fs::create_dir(&ok)?;
    std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o700))?;
    Pki::init(&ok, false)?;
    assert_eq!(mode(&ok)?, 0o700);
    Ok(())
}

// ---- 3. the CA signs leaves only ------------------------------------------

#[test]
fn the_ca_has_path_length_zero() -> TestResult {
    let (_tmp, pki) = pki()?;
    let der = pem_der(&pki.ca_cert_path())?;
    let (_, ca) = x509_parser::parse_x509_certificate(&der)?;
    let bc = ca.basic_constraints()?.ok_or("basic constraints")?;
    assert!(bc.critical, "basicConstraints must be critical");
    assert!(bc.value.ca);
    assert_eq!(bc.value.path_len_constraint, Some(0));
    Ok(())
}

// ---- 4. the CRL -------------------------------------------------------------

#[test]
fn the_crl_is_valid_for_thirty_days() -> TestResult {
    let (_tmp, pki) = pki()?;
    let (next, _) = crl_next_update(&pki)?;
    let days = (next - OffsetDateTime::now_utc()).whole_days();
    assert!((29..=30).contains(&days), "nextUpdate in {days} days");
    let info = pki.issue(Role::Device, "d1")?;
    pki.revoke_serial(&info.serial)?;
    let (next, serials) = crl_next_update(&pki)?;
    assert!(next < OffsetDateTime::now_utc() + Duration::days(31));
    assert_eq!(serials, vec![info.serial]);
    Ok(())
}

#[test]
fn refresh_crl_re_signs_with_a_new_next_update_and_the_same_serials() -> TestResult {
    let (_tmp, pki) = pki()?;
    let a = pki.issue(Role::Device, "a")?;
    pki.revoke_id("a")?;
    let before = std::fs::read(pki.crl_path())?;
    // Whole seconds: make sure thisUpdate moves.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let info = pki.refresh_crl()?;
    assert_eq!(info.revoked, 1);
    assert_eq!(info.path, pki.crl_path());
    assert_ne!(std::fs::read(pki.crl_path())?, before, "re-signed");
    let (next, serials) = crl_next_update(&pki)?;
    assert_eq!(serials, vec![a.serial.clone()]);
    assert!(next > OffsetDateTime::now_utc() + Duration::days(29));
    assert_eq!(
        OffsetDateTime::parse(
            &info.next_update,
            &time::format_description::well_known::Rfc3339
        )?,
        next
    );
    // A server directory without ca.key cannot sign.
    std::fs::remove_file(pki.ca_key_path())?;
    assert!(pki.refresh_crl().is_err());
    Ok(())
}

#[test]
fn re_revoking_heals_a_crl_left_behind_by_a_crash() -> TestResult {
    let (_tmp, pki) = pki()?;
    let a = pki.issue(Role::Device, "a")?;
    let empty_crl = std::fs::read(pki.crl_path())?;
    pki.revoke_serial(&a.serial)?;
    // A crash between the two writes: revoked.json has it, crl.pem not yet.
    std::fs::write(pki.crl_path(), &empty_crl)?;
    assert!(crl_next_update(&pki)?.1.is_empty());
    let err = pki.revoke_serial(&a.serial).expect_err("already revoked");
    assert!(matches!(err, CertError::AlreadyRevoked { .. }), "{err}");
    assert_eq!(crl_next_update(&pki)?.1, vec![a.serial.clone()]);
    std::fs::write(pki.crl_path(), &empty_crl)?;
    assert!(matches!(
        pki.revoke_id("a"),
        Err(CertError::AlreadyRevoked { .. })
    ));
    assert_eq!(crl_next_update(&pki)?.1, vec![a.serial]);
    Ok(())
}

// ---- 5. the server directory ------------------------------------------------

#[test]
fn export_server_copies_what_a_server_needs_and_never_the_ca_key() -> TestResult {
    let (tmp, pki) = pki()?;
    let out = tmp.path().join("server-pki");
    let written = pki.export_server(&out)?;
    let mut names: Vec<String> = std::fs::read_dir(&out)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(
        names,
        [
            "broker.crt",
            "broker.key",
            "ca.crt",
            "crl.pem",
            "revoked.json"
        ]
    );
    assert_eq!(written.len(), 5);
    assert!(!out.join("ca.key").exists());
    assert_eq!(mode(&out)?, 0o700);
    assert_eq!(mode(&out.join("broker.key"))?, 0o600);
    assert_eq!(
        std::fs::read(out.join("broker.key"))?,
        std::fs::read(pki.server_key_path())?
    );
    // The broker opens it as a PKI.
    let server = Pki::open(&out)?;
    assert!(server.list()?.is_empty());

    // Revocations reach it.
    let d = pki.issue(Role::Device, "d1")?;
    pki.revoke_id("d1")?;
    assert!(!RevocationList::load(&server.revocation_path())?.is_revoked(&d.serial));
    pki.publish_revocations(&out)?;
    assert!(RevocationList::load(&server.revocation_path())?.is_revoked(&d.serial));
    assert_eq!(
        std::fs::read(server.crl_path())?,
        std::fs::read(pki.crl_path())?
    );

    // Never into the CA directory itself, nor into a directory of another CA.
    assert!(pki.export_server(pki.dir()).is_err());
    assert!(pki.publish_revocations(pki.dir()).is_err());
    let (_tmp2, other) = self::pki()?;
    let other_out = tmp.path().join("other-server");
    other.export_server(&other_out)?;
    let err = pki.publish_revocations(&other_out).expect_err("another CA");
    assert!(err.to_string().contains("export-server"), "{err}");
    Ok(())
}
