//! Mutual TLS and identity binding: who may connect, and as whom.

use crate::common;

use std::time::Duration;

use cityplane_certs::{IssueOptions, Pki};
use cityplane_proto::Role;
use common::tls_assert::*;
use common::*;
use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet, QoS};
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
            org: None,
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

/// An operator may run several tools at once: `<id>:<session>` client ids
/// are its own sessions, side by side. Nobody else gets that: a device or a
/// controller uses its id, and a session of another identity's id is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_sessions_side_by_side_and_nobody_else_may() {
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    t.issue(Role::Operator, "other");
    t.issue(Role::Device, "d1");
    t.issue(Role::Controller, "ctl");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (ctl, _) = connected(addr, t.path(), "ctl", &[]).await;

    let session = |client_id: &str| {
        let (client, mut eventloop) = mqtt(addr, t.path(), "op", client_id);
        async move {
            connack(&mut eventloop).await.expect("connects");
            client
                .subscribe("devices/+/reported", QoS::AtLeastOnce)
                .await
                .expect("subscribe");
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Ok(event) = eventloop.poll().await {
                    if let Event::Incoming(Packet::Publish(p)) = event {
                        let _ = tx.send(p.payload.to_vec());
                    }
                }
            });
            (client, rx)
        }
    };
    let (_watch, mut watch_rx) = session("op:watch").await;
    let (_apply, mut apply_rx) = session("op:apply-1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both are alive: the second did not take the first over.
    ctl.publish("devices/x1/reported", QoS::AtLeastOnce, false, "r1")
        .await
        .expect("publish");
    for rx in [&mut watch_rx, &mut apply_rx] {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("both sessions receive")
            .expect("open");
        assert_eq!(got, b"r1".to_vec());
    }

    // Refused: a session of someone else's id, a malformed session, and a
    // session for a device or a controller.
    for (cert, client_id) in [
        ("op", "other:1"),
        ("op", "op:"),
        ("op", "op:A"),
        ("op", "op:a:b"),
        ("d1", "d1:1"),
        ("ctl", "ctl:1"),
    ] {
        let (_c, mut eventloop) = mqtt(addr, t.path(), cert, client_id);
        match connack(&mut eventloop).await {
            Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
            other => panic!("{cert} as {client_id:?}: {other:?}"),
        }
    }
    broker.shutdown().await;
}
