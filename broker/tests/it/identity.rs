//! Mutual TLS and identity binding: who may connect, and as whom.

use crate::common;

use std::time::Duration;

use cityplane_certs::{IssueOptions, Pki};
use cityplane_proto::Role;
use common::tls_assert::*;
use common::*;
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use rustls::AlertDescription;
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

fn issue_with(
    pki: &Pki,
    id: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    client_auth: bool,
) {
    pki.issue_with(
        Role::Device,
        id,
        &IssueOptions {
            not_before,
            not_after,
            client_auth,
        },
    )
    .expect("issue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_unrevoked_certificates_from_our_ca_get_in() {
    let t = TestPki::new();
    let now = OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    t.issue(Role::Device, "good");
    issue_with(&t.pki, "expired", now - 3 * day, now - day, true);
    issue_with(&t.pki, "future", now + day, now + 3 * day, true);
    issue_with(&t.pki, "serverusage", now - day, now + day, false);
    t.issue(Role::Device, "revoked");
    t.pki.revoke("revoked").expect("revoke");

    let other = TestPki::new();
    other.issue(Role::Device, "good");

    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    // Positive control: the same path with a good certificate works.
    let mut good = raw_connected(addr, t.path(), "good").await;
    good.write_all(&[0xC0, 0]).await.expect("ping");
    assert_eq!(read_exact(&mut good, 2).await.expect("pingresp"), [0xD0, 0]);

    // Each refusal is the alert of the TLS handshake, not a CONNACK or a
    // close after CONNECT, and the alert says why.
    assert_eq!(
        refused_with_alert(addr, tls_config(t.path(), None), "no client certificate").await,
        AlertDescription::CertificateRequired
    );
    assert_eq!(
        refused_with_alert(
            addr,
            tls_config_with_ca(
                &t.path().join("ca.crt"),
                Some((other.path().join("good.crt"), other.path().join("good.key"))),
            ),
            "good",
        )
        .await,
        // Every project CA has the same name, so webpki finds an issuer by
        // name and then the signature does not verify.
        AlertDescription::DecryptError,
        "certificate from another CA"
    );
    for (id, alert) in [
        ("expired", AlertDescription::CertificateExpired),
        ("future", AlertDescription::CertificateExpired),
        ("serverusage", AlertDescription::UnsupportedCertificate),
        ("revoked", AlertDescription::CertificateRevoked),
    ] {
        assert_eq!(
            refused_with_alert(addr, tls_config(t.path(), Some(id)), id).await,
            alert,
            "{id}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_that_is_not_the_certificate_cn_is_not_authorized() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Device, "victim");
    t.issue(Role::Controller, "ctl");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    let (_victim, mut victim_rx) =
        connected(addr, t.path(), "victim", &["devices/victim/commands"]).await;
    let (ctl, _) = connected(addr, t.path(), "ctl", &[]).await;

    // d1's certificate, victim's client id.
    let (_spoof, mut eventloop) = mqtt(addr, t.path(), "d1", "victim");
    match connack(&mut eventloop).await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
        other => panic!("spoofed client id must get CONNACK not authorized, got {other:?}"),
    }
    // An empty client id is not the certificate's CN either.
    let (_anon, mut eventloop) = mqtt(addr, t.path(), "d1", "");
    assert!(connack(&mut eventloop).await.is_err());

    // The victim's live session is untouched: it still gets its commands.
    ctl.publish(
        "devices/victim/commands",
        QoS::AtLeastOnce,
        false,
        "still-here",
    )
    .await
    .expect("publish");
    let got = tokio::time::timeout(Duration::from_secs(10), victim_rx.recv())
        .await
        .expect("victim still receives")
        .expect("open");
    assert_eq!(
        got,
        ("devices/victim/commands".to_owned(), b"still-here".to_vec())
    );
    broker.shutdown().await;
}
