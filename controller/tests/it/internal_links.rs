//! No client can take over a router link the broker or the controller opens
//! for itself. rumqttd drops the older link when a second one with the same
//! id connects, so a certificate holding the controller's link id would
//! switch the controller off (issue 8, item 1).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use cityplane_proto::Role;
use common::*;
use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects with the given certificate and sends CONNECT as `id`; returns
/// whether the broker let it in (CONNACK 0).
async fn gets_in(addr: std::net::SocketAddr, tls: Arc<rustls::ClientConfig>, id: &str) -> bool {
    let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let name = ServerName::try_from("localhost").expect("name");
    let Ok(mut s) = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
    else {
        return false;
    };
    let mut connect = vec![
        0x10,
        (12 + id.len()) as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        30,
    ];
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id.as_bytes());
    if s.write_all(&connect).await.is_err() {
        return false;
    }
    let mut connack = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut connack)).await,
        Ok(Ok(_)) if connack == [0x20, 2, 0, 0]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_can_take_an_internal_link_over() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut d = Device::new(
        &s,
        "lamp0001",
        json!({"class": "streetlight", "dimming": 100}),
    );
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "online", |v| v["online"] == true)
        .await;

    // The link ids without their `_` are ordinary ids a certificate may
    // hold; connecting with them is harmless.
    let roles = [Role::Operator, Role::Controller, Role::Device];
    for (i, internal) in cityplane_broker::INTERNAL_LINK_IDS.iter().enumerate() {
        let plain = internal.trim_start_matches('_');
        let role = roles[i % roles.len()];
        s.pki.issue(role, plain).expect("issue");
        assert!(
            gets_in(s.addr, tls(s.pki_path(), plain), plain).await,
            "{plain} is an ordinary id"
        );
    }
    // The internal ids themselves: even a certificate the CA signed for one
    // (the CLI refuses to issue it) is refused, in every role.
    let mut n = 0;
    for internal in cityplane_broker::INTERNAL_LINK_IDS {
        for role in ["operator", "controller", "device"] {
            n += 1;
            let (crt, key) = cityplane_testkit::forge::client_cert(s.pki_path(), internal, role, n)
                .expect("forge");
            let ca = s.pki_path().join("ca.crt");
            let tls = cityplane_testkit::tls::client_config(&ca, Some((&crt, &key))).expect("tls");
            assert!(
                !gets_in(s.addr, Arc::new(tls), internal).await,
                "a certificate for {internal} ({role}) got in"
            );
        }
    }

    // The controller still answers, commands and reads reports.
    let answer = op
        .apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    op.eventually_device("lamp0001", "converged", |v| v["converged"] == true)
        .await;
    assert_eq!(d.get("dimming"), Some(json!(40)));
    s.stop().await;
}
