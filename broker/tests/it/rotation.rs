//! Rotation with an overlap (issue 12), over real mTLS: during the overlap
//! both the old and the new certificate work; when it ends, the broker cuts
//! the sessions of the old one (the file did not change: the entry took
//! effect) and refuses it at the handshake.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cityplane_proto::Role;
use common::tls_assert::*;
use common::*;
use rustls::AlertDescription;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A live MQTT session with `tls` as `client_id` (CONNACK accepted).
async fn session(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    client_id: &str,
) -> TlsStream<TcpStream> {
    let mut s = raw_tls(addr, tls)
        .await
        .unwrap_or_else(|e| panic!("{client_id}: handshake refused: {e}"));
    s.write_all(&connect_packet(client_id, 0x02, 30, &[]))
        .await
        .expect("write CONNECT");
    assert_eq!(
        read_exact(&mut s, 4).await.expect("connack"),
        [0x20, 2, 0, 0],
        "{client_id}: CONNACK accepted"
    );
    s
}

/// Fails the test if the overlap ended before a step meant to run inside it
/// (the machine stalled for seconds): the outcome would say nothing.
fn still_in_overlap(effective: OffsetDateTime, step: &str) {
    assert!(
        OffsetDateTime::now_utc() < effective,
        "{step}: the overlap ended before this step ran; re-run on a less loaded machine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rotated_with_an_overlap_keeps_the_old_certificate_until_it_ends() {
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    // The operator's machine keeps the old files until the new ones arrive.
    let old = tempfile::tempdir().expect("tempdir");
    let (old_crt, old_key) = (old.path().join("op.crt"), old.path().join("op.key"));
    std::fs::copy(t.pki.cert_path("op"), &old_crt).expect("copy crt");
    std::fs::copy(t.pki.key_path("op"), &old_key).expect("copy key");
    let old_tls = tls_config_with_ca(&t.pki.ca_cert_path(), Some((old_crt, old_key)));
    let mut old_live = session(addr, old_tls.clone(), "op:before").await;

    let rotated = t
        .pki
        .rotate_overlapping("op", time::Duration::seconds(3))
        .expect("rotate with overlap");
    let effective = rotated.revoked[0]
        .effective_at
        .as_deref()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .expect("effective_at");
    // Let the watcher read the changed file (poll 100 ms): what follows must
    // hold with the new list installed, not only before it was read.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // During the overlap: the old session lives, the old certificate opens
    // new sessions, and the new certificate works at once.
    assert_session_live(&mut old_live, "old session during the overlap").await;
    let mut old_again = session(addr, old_tls.clone(), "op:during").await;
    let mut new_live = session(addr, tls_config(t.path(), Some("op")), "op:new").await;
    assert_session_live(&mut old_again, "new session with the old certificate").await;
    still_in_overlap(effective, "old certificate accepted during the overlap");

    // After it: every session of the old certificate is cut, and it is
    // refused at the handshake; the new one is untouched.
    let wait = (effective - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
    tokio::time::sleep(Duration::try_from(wait).unwrap_or_default()).await;
    assert_session_cut(&mut old_live, "old session after the overlap").await;
    assert_session_cut(&mut old_again, "second old session after the overlap").await;
    assert_eq!(
        refused_with_alert(addr, old_tls, "op:after").await,
        AlertDescription::CertificateRevoked,
        "the old certificate is refused at the handshake once the overlap is over"
    );
    assert_session_live(&mut new_live, "the new certificate's session").await;
    broker.shutdown().await;
}
