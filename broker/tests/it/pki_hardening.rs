//! End to end over mTLS on 127.0.0.1 (issue 8): a certificate whose file is
//! gone from the PKI directory is still revocable, and a broker serving from
//! an exported server directory (no ca.key) enforces revocations published
//! to it.

use crate::common;

use std::path::{Path, PathBuf};

use cityplane_proto::Role;
use common::*;
use tokio::io::AsyncWriteExt;

/// What a device holds: its certificate and key, copied out of the PKI
/// directory (where the files may later be deleted).
fn device_copy(pki: &Path, id: &str, to: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (to.join(format!("{id}.crt")), to.join(format!("{id}.key")));
    std::fs::copy(pki.join(format!("{id}.crt")), &crt).expect("copy crt");
    std::fs::copy(pki.join(format!("{id}.key")), &key).expect("copy key");
    (crt, key)
}

/// Connects with the device's own files; `true` if CONNACK 0 came back.
async fn accepted(
    addr: std::net::SocketAddr,
    ca: &Path,
    id: &str,
    files: &(PathBuf, PathBuf),
) -> bool {
    let tls = tls_config_with_ca(ca, Some(files.clone()));
    let Ok(mut s) = raw_tls(addr, tls).await else {
        return false;
    };
    if s.write_all(&connect_packet(id, 0x02, 30, &[]))
        .await
        .is_err()
    {
        return false;
    }
    read_exact(&mut s, 4).await.ok().as_deref() == Some(&[0x20, 2, 0, 0][..])
}

/// Waits (up to 5 s, the broker polls revoked.json) until `id` is refused.
async fn refused_soon(
    addr: std::net::SocketAddr,
    ca: &Path,
    id: &str,
    files: &(PathBuf, PathBuf),
) -> bool {
    for _ in 0..50 {
        if !accepted(addr, ca, id, files).await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_whose_file_was_deleted_is_revoked_by_serial_and_refused() {
    let t = TestPki::new();
    let device_dir = tempfile::tempdir().expect("tempdir");
    let leaked = t.pki.issue(Role::Device, "lamp1").expect("issue");
    let files = device_copy(t.path(), "lamp1", device_dir.path());
    std::fs::remove_file(t.pki.cert_path("lamp1")).expect("lose the .crt");

    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let ca = t.pki.ca_cert_path();
    let mut live = raw_tls(addr, tls_config_with_ca(&ca, Some(files.clone())))
        .await
        .expect("tls");
    live.write_all(&connect_packet("lamp1", 0x02, 30, &[]))
        .await
        .expect("connect");
    assert_eq!(
        read_exact(&mut live, 4).await.expect("connack"),
        [0x20, 2, 0, 0]
    );

    // Issuing the id again must not leave the leaked certificate valid.
    assert!(t.pki.issue(Role::Device, "lamp1").is_err());

    let entry = t
        .pki
        .revoke_serial(&leaked.serial)
        .expect("revoke by serial without the file");
    assert_eq!(entry.id, "lamp1");
    assert_eq!(
        read_until_closed(&mut live).await,
        Some(vec![]),
        "the live session is cut"
    );
    // Refused at the handshake: no CONNACK, the stream just closes.
    let mut again = raw_tls(addr, tls_config_with_ca(&ca, Some(files.clone())))
        .await
        .expect("tcp+tls");
    let _ = again
        .write_all(&connect_packet("lamp1", 0x02, 30, &[]))
        .await;
    assert_eq!(read_until_closed(&mut again).await, Some(vec![]), "refused");

    // The id gets a new certificate, which is accepted.
    t.pki
        .issue(Role::Device, "lamp1")
        .expect("re-issue after revocation");
    let _fresh = raw_connected(addr, t.path(), "lamp1").await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_an_exported_server_dir_accepts_devices_and_enforces_published_revocations() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Device, "d2");
    let server = tempfile::tempdir().expect("tempdir");
    let server_dir = server.path().join("server-pki");
    t.pki.export_server(&server_dir).expect("export");
    assert!(!server_dir.join("ca.key").exists());

    let broker = start(&server_dir, test_limits()).await;
    let addr = broker.local_addr();
    let ca = t.pki.ca_cert_path();
    let d1 = (t.pki.cert_path("d1"), t.pki.key_path("d1"));
    let d2 = (t.pki.cert_path("d2"), t.pki.key_path("d2"));
    assert!(accepted(addr, &ca, "d1", &d1).await, "d1 accepted");
    assert!(accepted(addr, &ca, "d2", &d2).await, "d2 accepted");

    t.pki.revoke_id("d1").expect("revoke");
    t.pki
        .publish_revocations(&server_dir)
        .expect("publish to the server dir");
    assert!(
        refused_soon(addr, &ca, "d1", &d1).await,
        "revoked d1 refused"
    );
    assert!(accepted(addr, &ca, "d2", &d2).await, "d2 still accepted");
    broker.shutdown().await;
}
