//! Revocation takes effect on a running broker, survives a restart, and a
//! broken revocation list fails closed.

mod common;

use std::time::{Duration, Instant};

use cityplane_proto::Role;
use common::*;
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

    t.pki.revoke("d1").expect("revoke");
    let revoked_at = Instant::now();
    assert_eq!(
        read_until_closed(&mut d1).await,
        Some(vec![]),
        "revoked session must be cut"
    );
    let cut_after = revoked_at.elapsed();
    assert!(
        cut_after < Duration::from_secs(1),
        "cut after {cut_after:?}, promised within 1 s"
    );

    // The other device is untouched.
    d2.write_all(&[0xC0, 0]).await.expect("ping");
    assert_eq!(read_exact(&mut d2, 2).await.expect("pingresp"), [0xD0, 0]);

    // Reconnects are refused at the handshake.
    let mut again = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tcp+tls");
    let _ = again.write_all(&connect_packet("d1", 0x02, 30, &[])).await;
    assert_eq!(
        read_until_closed(&mut again).await,
        Some(vec![]),
        "revoked reconnect must be refused"
    );
    broker.shutdown().await;

    // A fresh broker on the same PKI still refuses d1 and accepts d2.
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let mut again = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tcp+tls");
    let _ = again.write_all(&connect_packet("d1", 0x02, 30, &[])).await;
    assert_eq!(
        read_until_closed(&mut again).await,
        Some(vec![]),
        "still refused after restart"
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

    // Corrupt at start: nobody gets in.
    std::fs::write(&list, b"{ not json").expect("corrupt");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tcp+tls");
    let _ = s.write_all(&connect_packet("d1", 0x02, 30, &[])).await;
    assert_eq!(
        read_until_closed(&mut s).await,
        Some(vec![]),
        "must fail closed"
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
    std::fs::write(&list, b"").expect("truncate");
    assert_eq!(
        read_until_closed(&mut live).await,
        Some(vec![]),
        "live session cut when the list breaks"
    );

    // Unreadable (missing) is treated the same.
    std::fs::remove_file(&list).expect("remove");
    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tcp+tls");
    let _ = s.write_all(&connect_packet("d1", 0x02, 30, &[])).await;
    assert_eq!(
        read_until_closed(&mut s).await,
        Some(vec![]),
        "missing list must fail closed"
    );
    broker.shutdown().await;
}
