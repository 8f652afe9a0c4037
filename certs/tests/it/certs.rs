use crate::common;
use std::collections::HashSet;

use std::path::Path;

use cityplane_certs::{normalize_serial, peer_cert, CertError, IssueOptions, Pki, RevocationList};
use cityplane_proto::Role;
use common::{mode, pem_der, pki, TestResult};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::pem::parse_x509_pem;

#[test]
fn init_creates_every_file_and_refuses_to_overwrite_without_force() -> TestResult {
    let (_tmp, pki) = pki()?;
    for path in [
        pki.ca_cert_path(),
        pki.ca_key_path(),
        pki.server_cert_path(),
        pki.server_key_path(),
        pki.revocation_path(),
        pki.crl_path(),
    ] {
        assert!(path.is_file(), "{} missing", path.display());
    }
    assert_eq!(mode(pki.dir())?, 0o700);
    assert!(RevocationList::load(&pki.revocation_path())?.is_empty());
    pki.issue(Role::Device, "dev0001")?;
    let ca_before = std::fs::read(pki.ca_cert_path())?;

    let err = Pki::init(pki.dir(), false).expect_err("second init must refuse");
    assert!(matches!(err, CertError::AlreadyInitialized { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(pki.ca_cert_path())?,
        ca_before,
        "CA untouched"
    );
    assert_eq!(pki.list()?.len(), 1);

    let pki = Pki::init(pki.dir(), true)?;
    assert_ne!(std::fs::read(pki.ca_cert_path())?, ca_before, "new CA");
    assert!(pki.list()?.is_empty(), "old CA's identities are removed");
    assert!(!pki.key_path("dev0001").exists());
    Ok(())
}

#[test]
fn init_refuses_when_only_the_ca_key_exists() -> TestResult {
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("ca.key"), "x")?;
    assert!(matches!(
        Pki::init(tmp.path(), false),
        Err(CertError::AlreadyInitialized { .. })
    ));
    Ok(())
}

#[test]
fn open_explains_how_to_initialise() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let err = Pki::open(tmp.path()).expect_err("empty dir is not a PKI");
    let msg = err.to_string();
    assert!(msg.contains("cityplane certs init --pki"), "{msg}");
    assert!(msg.contains(&tmp.path().display().to_string()), "{msg}");

    let (_tmp, pki) = pki()?;
    let opened = Pki::open(pki.dir())?;
    assert_eq!(opened.dir(), pki.dir());
    Ok(())
}

#[test]
fn private_keys_are_created_0600() -> TestResult {
    let (_tmp, pki) = pki()?;
    pki.issue(Role::Operator, "op1")?;
    pki.issue_bulk(Role::Device, "d", 3, |_| {})?;
    for key in [
        pki.ca_key_path(),
        pki.server_key_path(),
        pki.key_path("op1"),
        pki.key_path("d0002"),
    ] {
        assert_eq!(mode(&key)?, 0o600, "{}", key.display());
    }
    assert_eq!(mode(&pki.cert_path("op1"))?, 0o644);
    // No temporary files are left behind; the lock stays, private.
    for entry in std::fs::read_dir(pki.dir())? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.') || name == cityplane_certs::LOCK_FILE,
            "leftover {name}"
        );
    }
    assert_eq!(mode(&pki.dir().join(cityplane_certs::LOCK_FILE))?, 0o600);
    Ok(())
}

#[test]
fn bad_ids_are_rejected_with_clear_messages() -> TestResult {
    let (_tmp, pki) = pki()?;
    for (id, expect) in [
        ("", "empty"),
        ("Dev1", "lowercase"),
        ("dev/1", "lowercase"),
        ("-dev", "starting with"),
        (&"a".repeat(65), "longer than 64"),
        ("ca", "reserved"),
        ("broker", "reserved"),
    ] {
        let err = pki.issue(Role::Device, id).expect_err(id);
        let msg = err.to_string();
        assert!(msg.contains(expect), "{id:?}: {msg}");
        assert!(!pki.cert_path(id).exists() || id == "ca" || id == "broker");
    }
    // Bulk validates every id before writing anything.
    let err = pki
        .issue_bulk(Role::Device, "Dev", 5, |_| {})
        .expect_err("uppercase prefix");
    assert!(matches!(err, CertError::InvalidId(_)), "{err}");
    let err = pki
        .issue_bulk(Role::Device, &"a".repeat(61), 1, |_| {})
        .expect_err("too long");
    assert!(err.to_string().contains("longer than 64"), "{err}");
    assert!(pki.list()?.is_empty());
    Ok(())
}

#[test]
fn issue_list_revoke_and_reissue() -> TestResult {
    let (_tmp, pki) = pki()?;
    let first = pki.issue(Role::Device, "dev0001")?;
    assert_eq!(first.id, "dev0001");
    assert_eq!(first.role, Role::Device);
    assert_eq!(first.serial.len(), 32);
    assert!(!first.revoked);
    assert_eq!(first.cert_path, pki.cert_path("dev0001"));
    assert_eq!(pki.list()?, vec![first.clone()]);

    let not_after = OffsetDateTime::parse(
        &first.not_after,
        &time::format_description::well_known::Rfc3339,
    )?;
    let days = (not_after - OffsetDateTime::now_utc()).whole_days();
    assert!((364..=365).contains(&days), "{days}");

    let err = pki
        .issue(Role::Device, "dev0001")
        .expect_err("already issued");
    assert!(matches!(err, CertError::AlreadyIssued { .. }), "{err}");
    assert!(err.to_string().contains("--rotate"), "{err}");

    let entry = pki.revoke("dev0001")?;
    assert_eq!(entry.serial, first.serial);
    assert_eq!(entry.id, "dev0001");
    let err = pki.revoke("dev0001").expect_err("twice");
    assert!(matches!(err, CertError::AlreadyRevoked { .. }), "{err}");
    let err = pki.revoke(&first.serial).expect_err("twice by serial");
    assert!(matches!(err, CertError::AlreadyRevoked { .. }), "{err}");
    assert!(pki.list()?[0].revoked);

    let second = pki.issue(Role::Device, "dev0001")?;
    assert_ne!(second.serial, first.serial);
    assert!(!second.revoked);
    let list = pki.list()?;
    assert_eq!(list.len(), 2, "{list:#?}");
    assert_eq!(list[0].serial, first.serial);
    assert!(list[0].revoked);
    assert_eq!(list[0].role, Role::Device);
    assert_eq!(list[0].not_after, first.not_after);
    assert_eq!(list[0].cert_path, Path::new(""));
    assert_eq!(list[1], second);
    Ok(())
}

#[test]
fn revoke_by_serial_accepts_any_spelling_and_refuses_unknown() -> TestResult {
    let (_tmp, pki) = pki()?;
    let a = pki.issue(Role::Device, "a1")?;
    let b = pki.issue(Role::Operator, "b1")?;
    let spelled: String = a
        .serial
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    let entry = pki.revoke(&format!("00:{spelled}"))?;
    assert_eq!(entry.serial, a.serial);
    assert_eq!(entry.id, "a1");
    assert!(!pki.current_cert("b1")?.ok_or("b1")?.revoked, "{b:?}");

    // A serial with no file or record is revoked all the same (see hardening.rs).
    let unknown = pki.revoke("0123456789abcdef")?;
    assert_eq!(unknown.id, "");
    let err = pki.revoke_id("nobody").expect_err("unknown id");
    assert!(matches!(err, CertError::NotFound { .. }), "{err}");
    let err = pki.revoke("not a serial!").expect_err("garbage");
    assert!(matches!(err, CertError::NotFound { .. }), "{err}");
    Ok(())
}

#[test]
fn rotate_issues_a_new_serial_and_revokes_the_old() -> TestResult {
    let (_tmp, pki) = pki()?;
    let old = pki.issue(Role::Controller, "ctl")?;
    let old_key = std::fs::read(pki.key_path("ctl"))?;
    let new = pki.rotate(Role::Controller, "ctl")?;
    assert_ne!(new.serial, old.serial);
    assert_ne!(std::fs::read(pki.key_path("ctl"))?, old_key, "new key");
    let revoked = RevocationList::load(&pki.revocation_path())?;
    assert!(revoked.is_revoked(&old.serial));
    assert!(!revoked.is_revoked(&new.serial));
    let list = pki.list()?;
    assert_eq!(list.len(), 2);
    assert!(list[0].revoked && list[0].serial == old.serial);
    assert!(!list[1].revoked && list[1].serial == new.serial);

    // Rotating an id without a certificate just issues one.
    let fresh = pki.rotate(Role::Device, "fresh")?;
    assert!(!fresh.revoked);
    // Rotating a revoked certificate does not revoke it twice.
    pki.revoke("fresh")?;
    pki.rotate(Role::Device, "fresh")?;
    assert_eq!(RevocationList::load(&pki.revocation_path())?.len(), 2);
    Ok(())
}

#[test]
fn revocations_survive_reopening() -> TestResult {
    let (_tmp, pki) = pki()?;
    let info = pki.issue(Role::Device, "dev0001")?;
    pki.revoke("dev0001")?;
    let dir = pki.dir().to_owned();
    drop(pki);

    let pki = Pki::open(&dir)?;
    let list = RevocationList::load(&pki.revocation_path())?;
    assert_eq!(list.len(), 1);
    assert!(list.is_revoked(&info.serial));
    assert!(list.is_revoked(&info.serial.to_uppercase()));
    assert_eq!(list.entries()[0].id, "dev0001");
    assert!(pki.list()?[0].revoked);
    Ok(())
}

#[test]
fn revocation_list_load_fails_closed() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("revoked.json");
    assert!(RevocationList::load(&path).is_err(), "missing");

    for bad in [
        "",
        "{",
        "[]",
        r#"{"version":2,"revoked":[]}"#,
        r#"{"version":1}"#,
        r#"{"version":1,"revoked":[{"serial":"xyz","id":"a","revoked_at":"2024-01-01T00:00:00Z"}]}"#,
        r#"{"version":1,"revoked":[{"serial":"0a","id":"a","revoked_at":"yesterday"}]}"#,
    ] {
        std::fs::write(&path, bad)?;
        let err = RevocationList::load(&path).expect_err(bad);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    // A hand-written file with only the documented fields is fine.
    std::fs::write(
        &path,
        r#"{"version":1,"revoked":[{"serial":"00:AB:cd","id":"a","revoked_at":"2024-01-01T00:00:00Z"}]}"#,
    )?;
    let list = RevocationList::load(&path)?;
    assert!(list.is_revoked("abcd"));
    assert!(!list.is_revoked("abce"));
    assert!(!list.is_revoked("not hex"));
    Ok(())
}

#[test]
fn peer_cert_reads_identity_and_the_serial_list_shows() -> TestResult {
    let (_tmp, pki) = pki()?;
    for (role, id) in [
        (Role::Device, "dev0001"),
        (Role::Operator, "alice"),
        (Role::Controller, "ctl-1"),
    ] {
        let info = pki.issue(role, id)?;
        let peer = peer_cert(&pem_der(&info.cert_path)?)?;
        assert_eq!(peer.identity.id, id);
        assert_eq!(peer.identity.role, role);
        assert_eq!(peer.serial, info.serial);
    }

    // The broker's own certificate is not an identity.
    let err = peer_cert(&pem_der(&pki.server_cert_path())?).expect_err("broker");
    assert!(
        err.to_string().contains("OU \"broker\" is not a role"),
        "{err}"
    );
    let err = peer_cert(&pem_der(&pki.ca_cert_path())?).expect_err("ca");
    assert!(err.to_string().contains("CN"), "{err}");
    assert!(peer_cert(b"garbage").is_err());
    Ok(())
}

#[test]
fn certificates_carry_the_documented_extensions() -> TestResult {
    let (_tmp, pki) = pki()?;
    let ca_der = pem_der(&pki.ca_cert_path())?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)?;
    let bc = ca.basic_constraints()?.ok_or("ca basic constraints")?;
    assert!(bc.value.ca);
    let ku = ca.key_usage()?.ok_or("ca key usage")?;
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
    let ca_years = (ca.validity().not_after.to_datetime() - OffsetDateTime::now_utc()).whole_days();
    assert!(ca_years >= 3649, "{ca_years}");

    let srv_der = pem_der(&pki.server_cert_path())?;
    let (_, srv) = x509_parser::parse_x509_certificate(&srv_der)?;
    let eku = srv.extended_key_usage()?.ok_or("server eku")?;
    assert!(eku.value.server_auth && !eku.value.client_auth);
    let san = srv.subject_alternative_name()?.ok_or("server san")?;
    let sans = &san.value.general_names;
    assert!(
        sans.iter()
            .any(|n| matches!(n, GeneralName::DNSName("localhost"))),
        "{sans:?}"
    );
    assert!(
        sans.iter()
            .any(|n| matches!(n, GeneralName::IPAddress([127, 0, 0, 1]))),
        "{sans:?}"
    );

    let info = pki.issue(Role::Device, "dev1")?;
    let der = pem_der(&info.cert_path)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&der)?;
    let eku = leaf.extended_key_usage()?.ok_or("leaf eku")?;
    assert!(eku.value.client_auth && !eku.value.server_auth);
    assert!(leaf
        .key_usage()?
        .ok_or("leaf ku")?
        .value
        .digital_signature());
    assert_eq!(leaf.issuer(), ca.subject());
    assert!(
        leaf.validity().not_before.to_datetime()
            <= OffsetDateTime::now_utc() - Duration::minutes(59)
    );
    assert!(leaf.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));

    // Low-level issue for tests: wrong usage and expired certificates.
    let now = OffsetDateTime::now_utc();
    let bad = pki.issue_with(
        Role::Device,
        "wrong-eku",
        &IssueOptions {
            not_before: now - Duration::days(10),
            not_after: now - Duration::days(1),
            client_auth: false,
            org: None,
        },
    )?;
    let der = pem_der(&bad.cert_path)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&der)?;
    let eku = leaf.extended_key_usage()?.ok_or("eku")?;
    assert!(eku.value.server_auth && !eku.value.client_auth);
    assert!(leaf.validity().not_after.to_datetime() < now);
    // issue_with replaces without the AlreadyIssued check.
    pki.issue_with(Role::Device, "wrong-eku", &IssueOptions::default())?;
    let err = pki
        .issue_with(
            Role::Device,
            "x",
            &IssueOptions {
                not_before: now,
                not_after: now,
                client_auth: true,
                org: None,
            },
        )
        .expect_err("empty validity");
    assert!(matches!(err, CertError::InvalidValidity(_)), "{err}");
    Ok(())
}

#[test]
fn validity_days_are_configurable() -> TestResult {
    let (_tmp, pki) = pki()?;
    let pki = pki.with_validity_days(30)?;
    let info = pki.issue(Role::Device, "short")?;
    let not_after = OffsetDateTime::parse(
        &info.not_after,
        &time::format_description::well_known::Rfc3339,
    )?;
    let days = (not_after - OffsetDateTime::now_utc()).whole_days();
    assert!((29..=30).contains(&days), "{days}");
    assert!(pki.with_validity_days(0).is_err());
    Ok(())
}

#[test]
fn bulk_issues_numbered_ids_and_skips_valid_ones() -> TestResult {
    let (_tmp, pki) = pki()?;
    let mut progress = Vec::new();
    let out = pki.issue_bulk(Role::Device, "prefix", 200, |n| progress.push(n))?;
    assert!(out.skipped.is_empty());
    let ids: Vec<&str> = out.issued.iter().map(|c| c.id.as_str()).collect();
    let expected: Vec<String> = (1..=200).map(|n| format!("prefix{n:04}")).collect();
    assert_eq!(ids, expected);
    assert_eq!(progress.first(), Some(&0));
    assert_eq!(progress.last(), Some(&200));
    assert!(progress.windows(2).all(|w| w[0] < w[1]));
    let serials: HashSet<&str> = out.issued.iter().map(|c| c.serial.as_str()).collect();
    assert_eq!(serials.len(), 200, "serials are unique");
    for c in &out.issued {
        assert_eq!(peer_cert(&pem_der(&c.cert_path)?)?.serial, c.serial);
    }
    assert_eq!(pki.list()?.len(), 200);

    // Again: everything is kept; a revoked one is re-issued.
    pki.revoke("prefix0007")?;
    let mut last = 0;
    let again = pki.issue_bulk(Role::Device, "prefix", 201, |n| last = n)?;
    assert_eq!(last, 201);
    assert_eq!(again.skipped.len(), 199);
    let issued: Vec<&str> = again.issued.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(issued, ["prefix0007", "prefix0201"]);
    let all = again.into_all();
    assert_eq!(all.len(), 201);
    assert_eq!(all[0].id, "prefix0001");
    assert_eq!(pki.list()?.len(), 202, "201 current + 1 revoked");
    Ok(())
}

#[test]
fn crl_is_signed_by_the_ca_and_lists_revoked_serials() -> TestResult {
    let (_tmp, pki) = pki()?;
    // Every project CA has the same name: only the signature tells whose
    // CRL this is.
    let (_other_tmp, other) = self::pki()?;
    let crl_of = |pki: &Pki| -> Result<Vec<String>, Box<dyn std::error::Error>> {
        let data = std::fs::read(pki.crl_path())?;
        let (_, pem) = parse_x509_pem(&data).map_err(|e| format!("{e:?}"))?;
        assert_eq!(pem.label, "X509 CRL");
        let (rest, crl) =
            x509_parser::parse_x509_crl(&pem.contents).map_err(|e| format!("{e:?}"))?;
        assert!(rest.is_empty());
        let ca_der = pem_der(&pki.ca_cert_path())?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)?;
        assert_eq!(crl.issuer(), ca.subject());
        crl.verify_signature(ca.public_key())
            .map_err(|e| format!("crl.pem is not signed by ca.crt's key: {e:?}"))?;
        let other_ca_der = pem_der(&other.ca_cert_path())?;
        let (_, other_ca) = x509_parser::parse_x509_certificate(&other_ca_der)?;
        assert_eq!(crl.issuer(), other_ca.subject());
        assert!(
            crl.verify_signature(other_ca.public_key()).is_err(),
            "another CA's key must not verify this CRL"
        );
        let next = crl.next_update().ok_or("nextUpdate")?.to_datetime();
        assert!(next > OffsetDateTime::now_utc() + Duration::days(29));
        Ok(crl
            .iter_revoked_certificates()
            .map(|r| normalize_serial(&r.raw_serial_as_string()).unwrap_or_default())
            .collect())
    };
    assert!(crl_of(&pki)?.is_empty());
    let a = pki.issue(Role::Device, "a")?;
    let b = pki.issue(Role::Device, "b")?;
    pki.revoke("a")?;
    assert_eq!(crl_of(&pki)?, vec![a.serial.clone()]);
    pki.revoke(&b.serial)?;
    assert_eq!(crl_of(&pki)?, vec![a.serial, b.serial]);
    Ok(())
}

#[test]
fn list_reports_foreign_files_clearly() -> TestResult {
    let (_tmp, pki) = pki()?;
    pki.issue(Role::Device, "a")?;
    // Files that are not identities are ignored.
    std::fs::write(pki.dir().join("README.txt"), "notes")?;
    std::fs::write(pki.dir().join("Upper.crt"), "not an id")?;
    assert_eq!(pki.list()?.len(), 1);
    // A broken identity file is named in the error.
    std::fs::write(pki.cert_path("broken"), "garbage")?;
    let err = pki.list().expect_err("broken file");
    assert!(err.to_string().contains("broken.crt"), "{err}");
    // A certificate under the wrong name too.
    std::fs::remove_file(pki.cert_path("broken"))?;
    std::fs::copy(pki.cert_path("a"), pki.cert_path("b"))?;
    let err = pki.list().expect_err("misnamed file");
    assert!(err.to_string().contains("not of \"b\""), "{err}");
    Ok(())
}

#[test]
fn pki_without_ca_key_can_be_opened_but_not_issue() -> TestResult {
    let (_tmp, pki) = pki()?;
    pki.issue(Role::Device, "a")?;
    std::fs::remove_file(pki.ca_key_path())?;
    let pki = Pki::open(pki.dir())?;
    assert_eq!(pki.list()?.len(), 1);
    let err = pki.issue(Role::Device, "b").expect_err("no CA key");
    assert!(err.to_string().contains("ca.key is missing"), "{err}");
    Ok(())
}

#[test]
fn ca_key_not_matching_ca_cert_is_detected() -> TestResult {
    let (_tmp, one) = pki()?;
    let (_tmp2, two) = pki()?;
    std::fs::copy(two.ca_key_path(), one.ca_key_path())?;
    let err = one.issue(Role::Device, "a").expect_err("mismatched key");
    assert!(err.to_string().contains("does not belong"), "{err}");
    Ok(())
}

#[test]
fn an_operator_certificate_names_its_organisation_in_o() -> TestResult {
    let (_tmp, pki) = pki()?;
    let read =
        |info: &cityplane_certs::CertInfo| -> Result<Option<String>, Box<dyn std::error::Error>> {
            Ok(peer_cert(&pem_der(&info.cert_path)?)?.identity.org)
        };
    // Library callers that do not say issue the city's own administrators.
    let admin = pki.issue(Role::Operator, "alice")?;
    assert_eq!(read(&admin)?.as_deref(), Some(cityplane_proto::ADMIN_ORG));
    assert_eq!(admin.org.as_deref(), Some("city"));
    let lighting = pki.clone().with_org("lighting-co")?;
    let bob = lighting.issue(Role::Operator, "bob")?;
    assert_eq!(read(&bob)?.as_deref(), Some("lighting-co"));
    let nobody = pki.issue_with(
        Role::Operator,
        "carol",
        &IssueOptions {
            org: Some("nobody".into()),
            ..IssueOptions::default()
        },
    )?;
    assert_eq!(read(&nobody)?.as_deref(), Some("nobody"));
    // Devices and controllers belong to none, and cannot be made to.
    let dev = pki.issue(Role::Device, "dev0001")?;
    assert_eq!((read(&dev)?, dev.org.clone()), (None, None));
    assert!(matches!(
        lighting.issue(Role::Device, "dev0002"),
        Err(CertError::OrgNotForRole { role: Role::Device })
    ));
    assert!(matches!(
        lighting.issue_bulk(Role::Controller, "ctl", 2, |_| {}),
        Err(CertError::OrgNotForRole { .. })
    ));
    for bad in ["", "Lighting", "a/b", "+", "#"] {
        assert!(
            matches!(pki.clone().with_org(bad), Err(CertError::InvalidOrg(_))),
            "{bad:?}"
        );
    }
    // `list` shows it, also for a certificate whose file is gone (from issued.jsonl).
    std::fs::remove_file(&bob.cert_path)?;
    let listed = pki.list()?;
    let org_of = |id: &str| {
        listed
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.org.clone())
    };
    assert_eq!(org_of("bob").as_deref(), Some("lighting-co"));
    assert_eq!(org_of("alice").as_deref(), Some("city"));
    assert_eq!(org_of("dev0001"), None);
    let ops = lighting.issue_bulk(Role::Operator, "op", 2, |_| {})?;
    assert!(ops
        .issued
        .iter()
        .all(|c| c.org.as_deref() == Some("lighting-co")));
    Ok(())
}

#[test]
fn an_operator_certificate_without_a_valid_o_is_refused() -> TestResult {
    let (_tmp, pki) = pki()?;
    for (n, org) in [None, Some("Not An Org"), Some("")].into_iter().enumerate() {
        let (crt, _) = cityplane_testkit::forge::client_cert_with_org(
            pki.dir(),
            "mallory",
            "operator",
            org,
            n,
        )?;
        let err = peer_cert(&pem_der(&crt)?).expect_err("refused");
        assert!(err.to_string().contains("O (organ"), "{org:?}: {err}");
    }
    // Before organisations every certificate had O = cityplane: such an
    // operator belongs to an organisation of that name (which nobody
    // creates: it sees no device), and devices never read their O.
    let (crt, _) = cityplane_testkit::forge::client_cert(pki.dir(), "legacy", "operator", 10)?;
    assert_eq!(
        peer_cert(&pem_der(&crt)?)?.identity.org.as_deref(),
        Some("cityplane")
    );
    let (crt, _) =
        cityplane_testkit::forge::client_cert_with_org(pki.dir(), "dev9", "device", None, 11)?;
    assert_eq!(peer_cert(&pem_der(&crt)?)?.identity.org, None);
    Ok(())
}

#[test]
fn the_registry_input_says_when_a_device_certificate_expires() -> TestResult {
    let (_tmp, pki) = pki()?;
    let info = pki
        .clone()
        .with_validity_days(40)?
        .issue(Role::Device, "dev0001")?;
    let devices = cityplane_certs::registry::issued_devices(pki.dir())?;
    let expected = time::OffsetDateTime::parse(
        &info.not_after,
        &time::format_description::well_known::Rfc3339,
    )?
    .unix_timestamp()
        * 1000;
    assert_eq!(devices[0].not_after_ms, Some(expected as u64));
    Ok(())
}
