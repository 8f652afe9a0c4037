//! Strict MQTT 3.1.1: every spec-violating packet closes the connection,
//! nothing of it is routed, and the broker keeps serving.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cityplane_broker::Limits;
use cityplane_proto::Role;
use common::*;
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn limits() -> Limits {
    Limits {
        max_payload: 1024,
        connect_timeout: Duration::from_millis(500),
        handshake_timeout: Duration::from_millis(500),
        ..test_limits()
    }
}

/// Sends `bytes` (after a valid CONNECT if `after_connect`) and expects the
/// broker to close the connection without answering anything but `answer`.
async fn refused(
    addr: SocketAddr,
    pki: &Path,
    after_connect: bool,
    bytes: &[u8],
    answer: &[u8],
    what: &str,
) {
    let mut s = if after_connect {
        raw_connected(addr, pki, "d1").await
    } else {
        raw_tls(addr, tls_config(pki, Some("d1")))
            .await
            .expect("tls")
    };
    s.write_all(bytes).await.expect("write");
    let got = read_until_closed(&mut s)
        .await
        .unwrap_or_else(|| panic!("{what}: connection left open"));
    assert_eq!(got, answer, "{what}: unexpected answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_violations_close_the_connection_and_route_nothing() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Controller, "spy");
    let broker = start(t.path(), limits()).await;
    let addr = broker.local_addr();
    let (spy, mut spy_rx) = connected(addr, t.path(), "spy", &["#"]).await;
    let p = t.path();

    // CONNECT-level violations: refused before any session exists.
    refused(
        addr,
        p,
        false,
        &connect_packet("d1", 0x03, 30, &[]),
        &[],
        "CONNECT reserved flag",
    )
    .await;
    refused(
        addr,
        p,
        false,
        &connect_packet("d1", 0x42, 30, &[0, 1, b'p']),
        &[],
        "password without user name",
    )
    .await;
    refused(
        addr,
        p,
        false,
        &connect_packet("d1", 0x22, 30, &[]),
        &[],
        "will retain without will",
    )
    .await;
    let mut v5 = connect_packet("d1", 0x02, 30, &[]);
    v5[8] = 5;
    refused(
        addr,
        p,
        false,
        &v5,
        &[0x20, 2, 0, 1],
        "MQTT 5 CONNECT gets 'unacceptable protocol'",
    )
    .await;
    refused(
        addr,
        p,
        false,
        &publish_packet("devices/d1/reported", b"{}"),
        &[],
        "PUBLISH before CONNECT",
    )
    .await;

    // After a valid CONNECT.
    let reported = "devices/d1/reported";
    refused(
        addr,
        p,
        true,
        &connect_packet("d1", 0x02, 30, &[]),
        &[],
        "second CONNECT",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &publish_packet("", b"x"),
        &[],
        "PUBLISH empty topic",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &publish_packet("devices/d1/#", b"x"),
        &[],
        "PUBLISH # in topic",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &publish_packet("devices/d1/+", b"x"),
        &[],
        "PUBLISH + in topic",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &publish_packet("devices/d1/rep\0orted", b"x"),
        &[],
        "PUBLISH U+0000 in topic",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &frame(0x36, &[0, 1, b'a', 0, 1]),
        &[],
        "PUBLISH QoS 3",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &frame(0x30, &[0, 200, b'a']),
        &[],
        "PUBLISH topic length past the packet",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &frame(0x30, &[0, 2, 0xC3, 0x28, b'x']),
        &[],
        "PUBLISH topic not UTF-8",
    )
    .await;
    let filter = "devices/d1/commands";
    let mut sub = vec![0, 1, 0, filter.len() as u8];
    sub.extend_from_slice(filter.as_bytes());
    sub.push(1);
    refused(
        addr,
        p,
        true,
        &frame(0x80, &sub),
        &[],
        "SUBSCRIBE wrong header flags",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &frame(0x82, &[0, 1, 0, 5, b'a', b'/', b'#', b'/', b'b', 0]),
        &[],
        "SUBSCRIBE a/#/b",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &frame(0x82, &[0, 1]),
        &[],
        "SUBSCRIBE without filters",
    )
    .await;
    refused(
        addr,
        p,
        true,
        &frame(0x82, &[0, 1, 0, 1, b'a', 3]),
        &[],
        "SUBSCRIBE QoS 3",
    )
    .await;
    refused(addr, p, true, &[0xC0, 1, 0], &[], "PINGREQ with a body").await;
    refused(
        addr,
        p,
        true,
        &[0x20, 2, 0, 0],
        &[],
        "CONNACK from a client",
    )
    .await;
    refused(addr, p, true, &[0x00, 0], &[], "reserved packet type 0").await;
    refused(
        addr,
        p,
        true,
        &[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        &[],
        "five-byte remaining length",
    )
    .await;
    let big = vec![b'x'; 2000];
    refused(
        addr,
        p,
        true,
        &cityplane_broker::mqtt::encode_publish(reported, &big, 0, false, 0),
        &[],
        "payload over the limit",
    )
    .await;
    // Declares 100 MiB and sends none of it: refused on the length alone.
    refused(
        addr,
        p,
        true,
        &[0x30, 0x80, 0x80, 0x80, 0x32],
        &[],
        "declared length over the limit",
    )
    .await;

    // None of it was routed: the next thing the spy sees is the sentinel.
    spy.publish("fleet/ops/sentinel", QoS::AtLeastOnce, false, "end")
        .await
        .expect("sentinel");
    loop {
        let (topic, _) = tokio::time::timeout(Duration::from_secs(10), spy_rx.recv())
            .await
            .expect("sentinel")
            .expect("open");
        if topic == "fleet/ops/sentinel" {
            break;
        }
        // Presence is the broker announcing d1's sessions, not routed input.
        assert_eq!(
            topic, "devices/d1/presence",
            "something malformed was routed"
        );
    }

    // And the broker still serves a well-behaved client.
    let (_d1, _) = connected(addr, p, "d1", &["devices/d1/commands"]).await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_truncated_and_silent_connections_are_closed() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let broker = start(t.path(), limits()).await;
    let addr = broker.local_addr();

    // TCP without a TLS handshake: closed after the handshake timeout.
    let mut tcp = TcpStream::connect(addr).await.expect("tcp");
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("closed by broker");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "stalled handshake must be closed"
    );

    // TLS but no CONNECT: closed after the CONNECT timeout.
    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tls");
    assert_eq!(
        read_until_closed(&mut s).await,
        Some(vec![]),
        "idle TLS connection must be closed"
    );

    // Half a CONNECT, then silence.
    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tls");
    let connect = connect_packet("d1", 0x02, 30, &[]);
    s.write_all(&connect[..connect.len() / 2])
        .await
        .expect("write");
    assert_eq!(
        read_until_closed(&mut s).await,
        Some(vec![]),
        "truncated CONNECT must be closed"
    );

    // Keep-alive 1 s and then silence: closed after 1.5 s.
    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tls");
    s.write_all(&connect_packet("d1", 0x02, 1, &[]))
        .await
        .expect("write");
    assert_eq!(
        read_until_closed(&mut s).await,
        Some(vec![0x20, 2, 0, 0]),
        "keep-alive must be enforced"
    );

    // Truncated packet after CONNECT: the keep-alive still closes it.
    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tls");
    s.write_all(&connect_packet("d1", 0x02, 1, &[]))
        .await
        .expect("write");
    s.write_all(&[0x30, 0x10, 0x00]).await.expect("write");
    assert_eq!(
        read_until_closed(&mut s).await,
        Some(vec![0x20, 2, 0, 0]),
        "truncated PUBLISH must not hold the connection"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_accepted() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let broker = start(t.path(), limits()).await;
    let mut s = raw_tls(broker.local_addr(), tls_config(t.path(), Some("d1")))
        .await
        .expect("tls");
    s.write_all(&connect_packet("d1", 0x02, 0, &[]))
        .await
        .expect("write");
    assert_eq!(
        read_exact(&mut s, 4).await.expect("connack"),
        [0x20, 2, 0, 0]
    );
    s.write_all(&[0xC0, 0]).await.expect("ping");
    assert_eq!(read_exact(&mut s, 2).await.expect("pingresp"), [0xD0, 0]);
    broker.shutdown().await;
}
