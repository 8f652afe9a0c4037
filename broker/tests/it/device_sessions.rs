//! Device sessions have no router link of their own: the edge answers them
//! (CONNACK, PUBACK, the QoS 2 handshake) and routes what they publish
//! through one shared link. These tests check what a device and a subscriber
//! see: acknowledgements, exactly one delivery, and session takeover.

use crate::common;

use std::time::Duration;

use cityplane_broker::mqtt::encode_publish;
use cityplane_proto::Role;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const QUIET: Duration = Duration::from_millis(500);

/// A raw device connection; `flags` are the CONNECT flags.
async fn raw_device(
    addr: std::net::SocketAddr,
    pki: &std::path::Path,
    id: &str,
    flags: u8,
    extra_payload: &[u8],
) -> TlsStream<TcpStream> {
    let mut s = raw_tls(addr, tls_config(pki, Some(id))).await.expect("tls");
    s.write_all(&connect_packet(id, flags, 30, extra_payload))
        .await
        .expect("write");
    // Devices always get a clean session: session present is 0.
    assert_eq!(
        read_exact(&mut s, 4).await.expect("connack"),
        [0x20, 2, 0, 0]
    );
    s
}

fn only_topic(got: &[(String, Vec<u8>)], topic: &str) -> Vec<Vec<u8>> {
    got.iter()
        .filter(|(t, _)| t == topic)
        .map(|(_, p)| p.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos1_publish_is_acked_by_the_edge_and_routed_exactly_once() {
    let t = TestPki::new();
    for id in ["d1", "d2"] {
        t.issue(Role::Device, id);
    }
    t.issue(Role::Operator, "op1");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_op, mut op_rx) = connected(addr, t.path(), "op1", &["devices/+/reported"]).await;

    // d1 asks for a persistent session: it still gets session present 0.
    let mut d1 = raw_device(addr, t.path(), "d1", 0x00, &[]).await;
    let mut d2 = raw_device(addr, t.path(), "d2", 0x02, &[]).await;
    // Both use packet id 7: ids of different devices meet on the shared link.
    for (s, id) in [(&mut d1, "d1"), (&mut d2, "d2")] {
        let topic = format!("devices/{id}/reported");
        s.write_all(&encode_publish(&topic, id.as_bytes(), 1, false, 7))
            .await
            .expect("publish");
    }
    for s in [&mut d1, &mut d2] {
        assert_eq!(
            read_exact(s, 4).await.expect("puback"),
            [0x40, 2, 0, 7],
            "the edge answers a QoS 1 publish with PUBACK"
        );
    }
    // A second publish with the same id (the first was acknowledged, so the
    // id is free again) is a new message.
    d1.write_all(&encode_publish(
        "devices/d1/reported",
        b"d1-again",
        1,
        false,
        7,
    ))
    .await
    .expect("publish");
    assert_eq!(
        read_exact(&mut d1, 4).await.expect("puback"),
        [0x40, 2, 0, 7]
    );

    let got = drain(&mut op_rx, QUIET).await;
    assert_eq!(
        only_topic(&got, "devices/d1/reported"),
        vec![b"d1".to_vec(), b"d1-again".to_vec()],
        "each publish is routed once, in order: {got:?}"
    );
    assert_eq!(
        only_topic(&got, "devices/d2/reported"),
        vec![b"d2".to_vec()],
        "routed once: {got:?}"
    );
    // The connection is still healthy.
    d1.write_all(&[0xC0, 0]).await.expect("pingreq");
    assert_eq!(read_exact(&mut d1, 2).await.expect("pingresp"), [0xD0, 0]);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos2_publish_completes_the_handshake_and_is_delivered_once() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Operator, "op1");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_op, mut op_rx) = connected(addr, t.path(), "op1", &["devices/+/telemetry"]).await;
    let mut d1 = raw_device(addr, t.path(), "d1", 0x02, &[]).await;

    let publish = encode_publish("devices/d1/telemetry", b"t1", 2, false, 9);
    d1.write_all(&publish).await.expect("publish");
    assert_eq!(
        read_exact(&mut d1, 4).await.expect("pubrec"),
        [0x50, 2, 0, 9]
    );
    // A re-send before PUBREL (DUP set) is answered again, not routed again.
    let mut dup = publish.clone();
    dup[0] |= 0x08;
    d1.write_all(&dup).await.expect("publish dup");
    assert_eq!(
        read_exact(&mut d1, 4).await.expect("pubrec"),
        [0x50, 2, 0, 9]
    );
    d1.write_all(&[0x62, 2, 0, 9]).await.expect("pubrel");
    assert_eq!(
        read_exact(&mut d1, 4).await.expect("pubcomp"),
        [0x70, 2, 0, 9]
    );

    let got = drain(&mut op_rx, QUIET).await;
    assert_eq!(
        only_topic(&got, "devices/d1/telemetry"),
        vec![b"t1".to_vec()],
        "delivered exactly once: {got:?}"
    );

    // The id is free after PUBCOMP: the same id carries a new message.
    d1.write_all(&encode_publish("devices/d1/telemetry", b"t2", 2, false, 9))
        .await
        .expect("publish");
    assert_eq!(
        read_exact(&mut d1, 4).await.expect("pubrec"),
        [0x50, 2, 0, 9]
    );
    d1.write_all(&[0x62, 2, 0, 9]).await.expect("pubrel");
    assert_eq!(
        read_exact(&mut d1, 4).await.expect("pubcomp"),
        [0x70, 2, 0, 9]
    );
    let got = drain(&mut op_rx, QUIET).await;
    assert_eq!(
        only_topic(&got, "devices/d1/telemetry"),
        vec![b"t2".to_vec()]
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_with_the_same_id_takes_the_session_over() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Controller, "spy");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (spy, mut spy_rx) = connected(
        addr,
        t.path(),
        "spy",
        &["devices/+/presence", "devices/+/reported"],
    )
    .await;

    // Will on its presence topic, QoS 1, retained: as PROTOCOL.md recommends.
    let mut will = field(b"devices/d1/presence");
    // Spaced, so it can be told apart from the broker's own offline presence.
    will.extend(field(br#"{"online": false}"#));
    let will_flags = 0x02 | 0x04 | 0x08 | 0x20;
    let mut first = raw_device(addr, t.path(), "d1", will_flags, &will).await;
    // Subscribed, so the first session holds the command route too.
    subscribe_commands(&mut first, 1, 1).await;
    let got = drain(&mut spy_rx, QUIET).await;
    let serial = t.pki.current_cert("d1").expect("read").expect("d1").serial;
    let online = format!(r#"{{"online":true,"serial":"{serial}"}}"#).into_bytes();
    assert_eq!(
        only_topic(&got, "devices/d1/presence"),
        vec![online.clone()]
    );

    let mut second = raw_device(addr, t.path(), "d1", will_flags, &will).await;
    assert!(
        read_until_closed(&mut first).await.is_some(),
        "the first connection is closed when the second connects"
    );
    let got = drain(&mut spy_rx, QUIET).await;
    assert_eq!(
        only_topic(&got, "devices/d1/presence"),
        vec![online.clone()],
        "only the new session's online presence, no will or offline for the old one: {got:?}"
    );
    assert_eq!(broker.sessions(), 2, "the new device session and the spy");

    // The new session works: it publishes, and commands reach it.
    second
        .write_all(&encode_publish("devices/d1/reported", b"r1", 1, false, 1))
        .await
        .expect("publish");
    assert_eq!(
        read_exact(&mut second, 4).await.expect("puback"),
        [0x40, 2, 0, 1]
    );
    subscribe_commands(&mut second, 2, 0).await;
    let got = drain(&mut spy_rx, QUIET).await;
    assert_eq!(
        only_topic(&got, "devices/d1/reported"),
        vec![b"r1".to_vec()]
    );
    spy.publish(
        "devices/d1/commands",
        rumqttc::QoS::AtLeastOnce,
        false,
        "cmd",
    )
    .await
    .expect("command");
    let command = read_exact(&mut second, 2 + 2 + 19 + 3)
        .await
        .expect("command delivered to the new session");
    assert_eq!(
        command,
        encode_publish("devices/d1/commands", b"cmd", 0, false, 0)
    );

    // The old session's end did not unregister anything of the new one, and
    // the new session's own abrupt end publishes its will.
    drop(second);
    let got = drain(&mut spy_rx, QUIET).await;
    assert_eq!(
        only_topic(&got, "devices/d1/presence"),
        vec![br#"{"online": false}"#.to_vec()],
        "{got:?}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(broker.sessions(), 1, "only the spy is left");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_sent_right_behind_connect_are_handled() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Operator, "op1");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_op, mut op_rx) = connected(addr, t.path(), "op1", &["devices/+/reported"]).await;

    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tls");
    // CONNECT, PUBLISH (QoS 1) and PINGREQ in one write.
    let mut bytes = connect_packet("d1", 0x02, 30, &[]);
    bytes.extend(encode_publish("devices/d1/reported", b"early", 1, false, 3));
    bytes.extend([0xC0, 0]);
    s.write_all(&bytes).await.expect("write");
    assert_eq!(
        read_exact(&mut s, 10).await.expect("answers"),
        [0x20, 2, 0, 0, 0x40, 2, 0, 3, 0xD0, 0],
        "CONNACK, PUBACK, PINGRESP without waiting for more input"
    );
    let got = drain(&mut op_rx, QUIET).await;
    assert_eq!(
        only_topic(&got, "devices/d1/reported"),
        vec![b"early".to_vec()]
    );
    broker.shutdown().await;
}

/// SUBSCRIBE to d1's commands with packet id `pkid` at `qos`; the SUBACK
/// must grant exactly that QoS.
async fn subscribe_commands(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    pkid: u8,
    qos: u8,
) {
    stream
        .write_all(&frame(
            0x82,
            &[&[0, pkid][..], &field(b"devices/d1/commands"), &[qos]].concat(),
        ))
        .await
        .expect("subscribe");
    assert_eq!(
        read_exact(stream, 5).await.expect("suback"),
        [0x90, 3, 0, pkid, qos]
    );
}

/// A QoS 1 PUBLISH frame of `topic` with packet id `pkid`.
fn publish1(topic: &str, payload: &str, pkid: u16) -> Vec<u8> {
    encode_publish(topic, payload.as_bytes(), 1, false, pkid)
}

fn pubacks(pkids: impl IntoIterator<Item = u16>) -> Vec<u8> {
    pkids
        .into_iter()
        .flat_map(|p| {
            let [hi, lo] = p.to_be_bytes();
            [0x40, 2, hi, lo]
        })
        .collect()
}

/// A controller's commands go from its connection straight to the device's
/// while nobody else subscribes to them, and through the router when
/// someone does. Either way each arrives once and in order, and the
/// controller's PUBACKs come in the order of its publishes (MQTT 4.6) even
/// when one the router acknowledges comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controllers_commands_reach_the_device_once_in_order_and_are_acked_in_order() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Controller, "ctl");
    t.issue(Role::Controller, "audit");
    let limits = cityplane_broker::Limits {
        max_publishes_per_sec: 10_000,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    let (_d1, mut d1) = connected(addr, t.path(), "d1", &["devices/d1/commands"]).await;
    let mut ctl = raw_connected(addr, t.path(), "ctl").await;
    let commands = "devices/d1/commands";
    let payloads = |r: std::ops::Range<u16>| -> Vec<Vec<u8>> {
        r.map(|n| format!("{{\"id\":\"c{n}\"}}").into_bytes())
            .collect()
    };
    let send = |r: std::ops::Range<u16>| -> Vec<u8> {
        r.flat_map(|n| publish1(commands, &format!("{{\"id\":\"c{n}\"}}"), n))
            .collect()
    };

    // Nobody else wants them: the edge hands them over and acknowledges.
    ctl.write_all(&send(1..21)).await.expect("publish");
    assert_eq!(
        read_exact(&mut ctl, 80).await.expect("pubacks"),
        pubacks(1..21)
    );
    assert_eq!(
        only_topic(&drain(&mut d1, QUIET).await, commands),
        payloads(1..21)
    );

    // A publish the router acknowledges, then a command: PUBACKs in order.
    let mut both = publish1("devices/d1/reported", "{}", 21);
    both.extend(publish1(commands, "{\"id\":\"c22\"}", 22));
    ctl.write_all(&both).await.expect("publish");
    assert_eq!(
        read_exact(&mut ctl, 8).await.expect("pubacks"),
        pubacks([21, 22])
    );
    assert_eq!(
        only_topic(&drain(&mut d1, QUIET).await, commands),
        payloads(22..23)
    );

    // Another subscriber: through the router, to both, once each.
    let (_audit, mut audit) = connected(addr, t.path(), "audit", &["devices/+/commands"]).await;
    ctl.write_all(&send(23..33)).await.expect("publish");
    assert_eq!(
        read_exact(&mut ctl, 40).await.expect("pubacks"),
        pubacks(23..33)
    );
    assert_eq!(
        only_topic(&drain(&mut d1, QUIET).await, commands),
        payloads(23..33)
    );
    assert_eq!(
        only_topic(&drain(&mut audit, QUIET).await, commands),
        payloads(23..33)
    );
    broker.shutdown().await;
}
