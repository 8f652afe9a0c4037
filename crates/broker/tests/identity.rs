//! Mutual TLS and identity binding: who may connect, and as whom.

mod common;

use std::time::Duration;

use cityplane_certs::{IssueOptions, Pki};
use cityplane_proto::Role;
use common::*;
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

/// The handshake must fail: the server answers our first read with an alert
/// (TLS 1.3 verifies the client certificate after the client's Finished).
async fn assert_refused(
    addr: std::net::SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    what: &str,
) {
    let mut stream = match raw_tls(addr, tls).await {
        Err(_) => return,
        Ok(s) => s,
    };
    let _ = stream.write_all(&connect_packet("x", 0x02, 30, &[])).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await
    .expect("server must answer or close");
    match read {
        Err(e) => assert!(
            e.to_string().contains("alert") || e.kind() == std::io::ErrorKind::ConnectionReset,
            "{what}: unexpected error {e}"
        ),
        Ok(n) => assert_eq!(
            n,
            0,
            "{what}: server sent MQTT bytes {:?} instead of refusing",
            &buf[..n]
        ),
    }
}

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

    assert_refused(addr, tls_config(t.path(), None), "no client certificate").await;
    assert_refused(
        addr,
        tls_config_with_ca(
            &t.path().join("ca.crt"),
            Some((other.path().join("good.crt"), other.path().join("good.key"))),
        ),
        "certificate from another CA",
    )
    .await;
    for id in ["expired", "future", "serverusage", "revoked"] {
        assert_refused(addr, tls_config(t.path(), Some(id)), id).await;
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
