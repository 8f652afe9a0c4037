//! Revocation takes effect on a running broker, survives a restart, and a
//! broken revocation list fails closed. Each refusal is checked where it is
//! promised: a new connection is stopped at the TLS handshake with an alert,
//! a live session is closed after having worked.

use crate::common;

use std::time::Duration;

use cityplane_proto::Role;
use common::tls_assert::*;
use common::*;
use rustls::AlertDescription;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_id_cuts_its_live_session_and_refuses_it_after_restart() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Device, "d2");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    let mut d1 = raw_connected(addr, t.path(), "d1").await;
    let mut d2 = raw_connected(addr, t.path(), "d2").await;
    assert_session_live(&mut d1, "d1 before its revocation").await;

    t.pki.revoke("d1").expect("revoke");
    assert_session_cut(&mut d1, "revoked d1's live session").await;

    assert_session_live(&mut d2, "d2 after d1's revocation").await;

    assert_eq!(
        refused_with_alert(addr, tls_config(t.path(), Some("d1")), "d1").await,
        AlertDescription::CertificateRevoked,
        "a revoked reconnect must be refused at the handshake"
    );
    broker.shutdown().await;

    // A fresh broker on the same PKI still refuses d1 and accepts d2.
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    assert_eq!(
        refused_with_alert(addr, tls_config(t.path(), Some("d1")), "d1").await,
        AlertDescription::CertificateRevoked,
        "still refused at the handshake after a restart"
    );
    let _d2 = raw_connected(addr, t.path(), "d2").await;

    // Re-issuing the revoked id gives a new serial that is accepted.
    t.pki.issue(Role::Device, "d1").expect("re-issue");
    let _d1 = raw_connected(addr, t.path(), "d1").await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_revocation_list_refuses_every_client_until_repaired() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let list = t.pki.revocation_path();
    let good = std::fs::read(&list).expect("list");

    // Corrupt at start: nobody gets past the handshake. The verifier cannot
    // say "revoked" about a list it cannot read, hence certificate_unknown.
    std::fs::write(&list, b"{ not json").expect("corrupt");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    assert_eq!(
        refused_with_alert(addr, tls_config(t.path(), Some("d1")), "d1").await,
        AlertDescription::CertificateUnknown,
        "a corrupt list must fail closed at the handshake"
    );

    // Repaired: accepted again; corrupted while connected: the session is cut.
    std::fs::write(&list, &good).expect("repair");
    let mut live = None;
    for _ in 0..50 {
        let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
            .await
            .expect("tcp+tls");
        let _ = s.write_all(&connect_packet("d1", 0x02, 30, &[])).await;
        if read_exact(&mut s, 4).await.ok().as_deref() == Some(&[0x20, 2, 0, 0][..]) {
            live = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut live = live.expect("accepted once the list is readable again");
    assert_session_live(&mut live, "d1 once the list is repaired").await;
    std::fs::write(&list, b"").expect("truncate");
    assert_session_cut(&mut live, "live session when the list breaks").await;

    // Unreadable (missing) is treated the same.
    std::fs::remove_file(&list).expect("remove");
    assert_eq!(
        refused_with_alert(addr, tls_config(t.path(), Some("d1")), "d1").await,
        AlertDescription::CertificateUnknown,
        "a missing list must fail closed at the handshake"
    );
    broker.shutdown().await;
}
