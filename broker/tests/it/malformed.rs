//! Strict MQTT 3.1.1: every spec-violating packet closes the connection,
//! nothing of it is routed, and the broker keeps serving.

use crate::common;

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

/// Sends `bytes` as `id` (after a valid CONNECT if `after_connect`) and
/// expects the broker to close the connection without answering anything
/// but `answer`.
async fn refused(
    addr: SocketAddr,
    pki: &Path,
    id: &str,
    after_connect: bool,
    bytes: &[u8],
    answer: &[u8],
    what: &str,
) {
    let mut s = if after_connect {
        raw_connected(addr, pki, id).await
    } else {
        raw_tls(addr, tls_config(pki, Some(id))).await.expect("tls")
    };
    s.write_all(bytes).await.expect("write");
    let got = read_until_closed(&mut s)
        .await
        .unwrap_or_else(|| panic!("{id}: {what}: connection left open"));
    assert_eq!(got, answer, "{id}: {what}: unexpected answer");
}

/// One malformed input: sent after a valid CONNECT or instead of it, the
/// bytes, what the broker may answer before closing, and a description.
type Case = (bool, Vec<u8>, Vec<u8>, &'static str);

/// Cases only the parser can refuse when sent by the controller, whose ACL
/// allows every topic and filter (bar `$`): a device would also be refused
/// by its ACL, which would hide a parser that let them through.
fn parser_cases(id: &str) -> Vec<Case> {
    let subscribe = |header: u8, filter: &str, qos: u8| {
        let mut body = vec![0, 1, 0, filter.len() as u8];
        body.extend_from_slice(filter.as_bytes());
        body.push(qos);
        frame(header, &body)
    };
    let mut v5 = connect_packet(id, 0x02, 30, &[]);
    v5[8] = 5;
    vec![
        // CONNECT-level violations: refused before any session exists.
        (
            false,
            connect_packet(id, 0x03, 30, &[]),
            vec![],
            "CONNECT reserved flag",
        ),
        (
            false,
            connect_packet(id, 0x42, 30, &[0, 1, b'p']),
            vec![],
            "password without user name",
        ),
        (
            false,
            connect_packet(id, 0x22, 30, &[]),
            vec![],
            "will retain without will",
        ),
        (
            false,
            v5,
            vec![0x20, 2, 0, 1],
            "MQTT 5 CONNECT gets 'unacceptable protocol'",
        ),
        (
            false,
            publish_packet("fleet/status", b"{}"),
            vec![],
            "PUBLISH before CONNECT",
        ),
        // After a valid CONNECT.
        (
            true,
            connect_packet(id, 0x02, 30, &[]),
            vec![],
            "second CONNECT",
        ),
        (
            true,
            publish_packet("", b"x"),
            vec![],
            "PUBLISH empty topic",
        ),
        (
            true,
            publish_packet("devices/d1/#", b"x"),
            vec![],
            "PUBLISH # in topic",
        ),
        (
            true,
            publish_packet("devices/d1/+", b"x"),
            vec![],
            "PUBLISH + in topic",
        ),
        (
            true,
            publish_packet("devices/d1/rep\0orted", b"x"),
            vec![],
            "PUBLISH U+0000 in topic",
        ),
        (
            true,
            frame(0x36, &[0, 1, b'a', 0, 1]),
            vec![],
            "PUBLISH QoS 3",
        ),
        (
            true,
            frame(0x38, &[0, 1, b'a']),
            vec![],
            "PUBLISH QoS 0 with DUP",
        ),
        (
            true,
            frame(0x32, &[0, 1, b'a', 0, 0]),
            vec![],
            "PUBLISH packet id 0",
        ),
        (
            true,
            frame(0x30, &[0, 200, b'a']),
            vec![],
            "PUBLISH topic length past the packet",
        ),
        (
            true,
            frame(0x30, &[0, 2, 0xC3, 0x28, b'x']),
            vec![],
            "PUBLISH topic not UTF-8",
        ),
        (
            true,
            subscribe(0x80, "fleet/status", 1),
            vec![],
            "SUBSCRIBE wrong header flags",
        ),
        (true, subscribe(0x82, "a/#/b", 0), vec![], "SUBSCRIBE a/#/b"),
        (
            true,
            subscribe(0x82, "a/b+", 0),
            vec![],
            "SUBSCRIBE + inside a level",
        ),
        (
            true,
            frame(0x82, &[0, 1]),
            vec![],
            "SUBSCRIBE without filters",
        ),
        (true, subscribe(0x82, "a", 3), vec![], "SUBSCRIBE QoS 3"),
        (
            true,
            frame(0xA2, &[0, 1, 0, 5, b'a', b'/', b'#', b'/', b'b']),
            vec![],
            "UNSUBSCRIBE a/#/b",
        ),
        (true, vec![0xC0, 1, 0], vec![], "PINGREQ with a body"),
        (true, vec![0x20, 2, 0, 0], vec![], "CONNACK from a client"),
        (true, vec![0x00, 0], vec![], "reserved packet type 0"),
        (
            true,
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            vec![],
            "five-byte remaining length",
        ),
        (
            true,
            cityplane_broker::mqtt::encode_publish("fleet/status", &[b'x'; 2000], 0, false, 0),
            vec![],
            "payload over the limit",
        ),
        // Declares 100 MiB and sends none of it: refused on the length alone.
        (
            true,
            vec![0x30, 0x80, 0x80, 0x80, 0x32],
            vec![],
            "declared length over the limit",
        ),
    ]
}

/// Parser refusals on a device's session (its own loop in the broker), on
/// topics and filters the device's ACL allows, so again only the parser
/// stands between them and the router.
fn device_cases() -> Vec<Case> {
    let reported = "devices/d1/reported";
    let mut qos3 = vec![0, reported.len() as u8];
    qos3.extend_from_slice(reported.as_bytes());
    qos3.extend_from_slice(&[0, 1, b'{', b'}']);
    let filter = "devices/d1/commands";
    let mut sub = vec![0, 1, 0, filter.len() as u8];
    sub.extend_from_slice(filter.as_bytes());
    sub.push(1);
    vec![
        (
            true,
            frame(0x36, &qos3),
            vec![],
            "PUBLISH QoS 3 on its own reported topic",
        ),
        (
            true,
            cityplane_broker::mqtt::encode_publish(reported, &[b'x'; 2000], 0, false, 0),
            vec![],
            "payload over the limit on its own reported topic",
        ),
        (
            true,
            frame(0x80, &sub),
            vec![],
            "SUBSCRIBE to its commands with wrong header flags",
        ),
        (
            true,
            vec![0x30, 0x80, 0x80, 0x80, 0x32],
            vec![],
            "declared length over the limit",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_violations_close_the_connection_and_route_nothing() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Controller, "ctl");
    t.issue(Role::Controller, "spy");
    let broker = start(t.path(), limits()).await;
    let addr = broker.local_addr();
    let (spy, mut spy_rx) = connected(addr, t.path(), "spy", &["#"]).await;
    let p = t.path();

    for (after_connect, bytes, answer, what) in parser_cases("ctl") {
        refused(addr, p, "ctl", after_connect, &bytes, &answer, what).await;
    }
    for (after_connect, bytes, answer, what) in device_cases() {
        refused(addr, p, "d1", after_connect, &bytes, &answer, what).await;
    }

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

    // And the broker still serves well-behaved clients of both kinds.
    let (_d1, _) = connected(addr, p, "d1", &["devices/d1/commands"]).await;
    let (_ctl, _) = connected(addr, p, "ctl", &["devices/+/reported"]).await;
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
