//! The identity in the certificate decides what a client may publish and
//! subscribe to. A spy with the controller identity subscribed to `#` proves
//! that nothing refused was routed.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cityplane_proto::Role;
use common::*;
use rumqttc::{
    ConnectReturnCode, ConnectionError, Event, LastWill, Packet, QoS, SubscribeReasonCode,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::UnboundedReceiver;

const SENTINEL: &str = "fleet/ops/sentinel";

/// Publishes with a raw client and reports whether the broker closed the connection.
async fn publish_closes(addr: SocketAddr, pki: &Path, id: &str, topic: &str) -> bool {
    let mut s = raw_connected(addr, pki, id).await;
    s.write_all(&publish_packet(topic, b"x"))
        .await
        .expect("write");
    // A PINGREQ after the PUBLISH: an open connection answers it, a closed
    // one ends the stream.
    let _ = s.write_all(&[0xC0, 0]).await;
    match read_exact(&mut s, 2).await {
        Ok(bytes) => {
            assert_eq!(bytes, [0xD0, 0], "unexpected answer");
            false
        }
        Err(_) => true,
    }
}

/// Everything the spy saw up to the sentinel, which `op` publishes last.
async fn spy_until_sentinel(
    op: &rumqttc::AsyncClient,
    spy: &mut UnboundedReceiver<(String, Vec<u8>)>,
) -> Vec<String> {
    op.publish(SENTINEL, QoS::AtLeastOnce, false, "end")
        .await
        .expect("sentinel");
    let mut seen = Vec::new();
    loop {
        let (topic, _) = tokio::time::timeout(Duration::from_secs(10), spy.recv())
            .await
            .expect("sentinel reaches the spy")
            .expect("spy open");
        if topic == SENTINEL {
            return seen;
        }
        // The broker's own presence announcements are not client publishes.
        if !topic.ends_with("/presence") {
            seen.push(topic);
        }
    }
}

async fn subscribe_codes(
    addr: SocketAddr,
    pki: &Path,
    id: &str,
    filter: &str,
) -> Vec<SubscribeReasonCode> {
    let (client, mut eventloop) = mqtt(addr, pki, id, id);
    connack(&mut eventloop).await.expect("connect");
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => return ack.return_codes,
            Ok(Ok(_)) => {}
            other => panic!("{id} subscribing {filter}: no SUBACK: {other:?}"),
        }
    }
}

fn granted(codes: &[SubscribeReasonCode]) -> bool {
    codes
        .iter()
        .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_operators_publish_only_where_their_role_allows() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Operator, "op");
    t.issue(Role::Operator, "sentinel");
    t.issue(Role::Controller, "spy");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_spy, mut spy_rx) = connected(addr, t.path(), "spy", &["#"]).await;
    let (op, _) = connected(addr, t.path(), "sentinel", &[]).await;

    let allowed = [
        ("d1", "devices/d1/reported"),
        ("d1", "devices/d1/telemetry"),
        ("d1", "devices/d1/acks"),
        ("op", "fleet/desired/lights"),
        ("op", "fleet/ops/describe"),
    ];
    for (id, topic) in allowed {
        assert!(
            !publish_closes(addr, t.path(), id, topic).await,
            "{id} may publish to {topic}"
        );
    }
    let refused = [
        ("d1", "devices/d2/reported"),
        ("d1", "devices/d1/commands"),
        ("d1", "devices/d1/presence"),
        ("d1", "devices/d1/reported/extra"),
        ("d1", "fleet/desired/all"),
        ("d1", "$SYS/broker"),
        ("op", "devices/d1/commands"),
        ("op", "devices/d1/reported"),
        ("op", "fleet/status"),
    ];
    for (id, topic) in refused {
        assert!(
            publish_closes(addr, t.path(), id, topic).await,
            "{id} must not publish to {topic}"
        );
    }

    let seen = spy_until_sentinel(&op, &mut spy_rx).await;
    let mut expected: Vec<String> = allowed.iter().map(|(_, t)| t.to_string()).collect();
    expected.sort();
    let mut seen_sorted = seen.clone();
    seen_sorted.sort();
    assert_eq!(
        seen_sorted, expected,
        "the spy sees exactly the allowed publishes"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_limited_to_what_the_role_may_read() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Operator, "op");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    assert!(granted(
        &subscribe_codes(addr, t.path(), "d1", "devices/d1/commands").await
    ));
    for filter in [
        "devices/d2/commands",
        "devices/+/commands",
        "devices/d1/#",
        "#",
        "$share/g/devices/d1/commands",
        "$SYS/#",
    ] {
        assert!(
            !granted(&subscribe_codes(addr, t.path(), "d1", filter).await),
            "device must not read {filter}"
        );
    }
    for filter in [
        "devices/+/reported",
        "devices/+/telemetry",
        "devices/+/presence",
        "fleet/#",
        "devices/d1/reported",
    ] {
        assert!(
            granted(&subscribe_codes(addr, t.path(), "op", filter).await),
            "operator may read {filter}"
        );
    }
    for filter in [
        "devices/+/commands",
        "devices/#",
        "#",
        "$SYS/#",
        "devices/+/acks",
    ] {
        assert!(
            !granted(&subscribe_codes(addr, t.path(), "op", filter).await),
            "operator must not read {filter}"
        );
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_receives_nothing() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Device, "d2");
    t.issue(Role::Controller, "ctl");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (ctl, _) = connected(addr, t.path(), "ctl", &[]).await;

    // d1 tries to read d2's commands, then subscribes to its own.
    let (d1, mut eventloop) = mqtt(addr, t.path(), "d1", "d1");
    connack(&mut eventloop).await.expect("connect");
    d1.subscribe("devices/d2/commands", QoS::AtLeastOnce)
        .await
        .expect("sub");
    d1.subscribe("devices/d1/commands", QoS::AtLeastOnce)
        .await
        .expect("sub");
    let mut acks = 0;
    while acks < 2 {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("poll") {
            acks += 1;
        }
    }
    ctl.publish("devices/d2/commands", QoS::AtLeastOnce, false, "secret")
        .await
        .expect("pub");
    ctl.publish("devices/d1/commands", QoS::AtLeastOnce, false, "mine")
        .await
        .expect("pub");
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .expect("d1 gets its own command")
            .expect("open");
        if let Event::Incoming(Packet::Publish(p)) = event {
            assert_eq!(
                p.topic, "devices/d1/commands",
                "d1 must never see d2's commands"
            );
            break;
        }
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_will_may_only_announce_its_own_presence() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Controller, "spy");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_spy, mut spy_rx) = connected(addr, t.path(), "spy", &["devices/+/presence"]).await;

    let (_c, mut eventloop) = mqtt_with(addr, tls_config(t.path(), Some("d1")), "d1", |o| {
        o.set_last_will(LastWill::new(
            "devices/d2/presence",
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
    });
    match connack(&mut eventloop).await {
        Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
        other => panic!("a will on another device's topic must be refused, got {other:?}"),
    }

    // Its own presence topic is fine, and the will fires when the link dies.
    let (_c, mut eventloop) = mqtt_with(addr, tls_config(t.path(), Some("d1")), "d1", |o| {
        o.set_last_will(LastWill::new(
            "devices/d1/presence",
            r#"{"online": false}"#,
            QoS::AtLeastOnce,
            false,
        ));
    });
    connack(&mut eventloop).await.expect("own will accepted");
    // The broker announces the device online at CONNECT.
    let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), spy_rx.recv())
        .await
        .expect("presence published")
        .expect("open");
    // With the serial of the certificate the session authenticated with.
    let serial = t.pki.current_cert("d1").expect("read").expect("d1").serial;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        (
            "devices/d1/presence",
            format!(r#"{{"online":true,"serial":"{serial}"}}"#).as_bytes()
        )
    );
    drop(eventloop); // socket closed without DISCONNECT
    let (topic, payload) = tokio::time::timeout(Duration::from_secs(10), spy_rx.recv())
        .await
        .expect("will published")
        .expect("open");
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("devices/d1/presence", &br#"{"online": false}"#[..])
    );
    broker.shutdown().await;
}

/// `devices/D/csr` is a device's request to the CA during a rotation: the
/// device publishes only its own, and only the controller reads them (an
/// operator must not collect other devices' pending public keys or learn
/// who is rotating).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sends_only_its_own_csr_and_only_the_controller_reads_csrs() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Operator, "op");
    t.issue(Role::Operator, "sentinel");
    t.issue(Role::Controller, "spy");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_spy, mut spy_rx) = connected(addr, t.path(), "spy", &["devices/+/csr", SENTINEL]).await;
    let (op, _) = connected(addr, t.path(), "sentinel", &[]).await;

    assert!(
        !publish_closes(addr, t.path(), "d1", "devices/d1/csr").await,
        "d1 may send its own CSR"
    );
    assert!(
        publish_closes(addr, t.path(), "d1", "devices/d2/csr").await,
        "d1 must not send a CSR in d2's name"
    );
    let seen = spy_until_sentinel(&op, &mut spy_rx).await;
    assert_eq!(seen, ["devices/d1/csr"], "only d1's own CSR was routed");

    for filter in ["devices/+/csr", "devices/d1/csr", "$share/g/devices/+/csr"] {
        assert!(
            !granted(&subscribe_codes(addr, t.path(), "op", filter).await),
            "an operator must not read {filter}"
        );
    }
    assert!(granted(
        &subscribe_codes(addr, t.path(), "spy", "devices/+/csr").await
    ));
    broker.shutdown().await;
}
