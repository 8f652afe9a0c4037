//! What an outside review broke (issue 8), each over real mTLS: filter
//! churn, retained messages, stored sessions, certificate-less sockets,
//! wills after revocation, `$`-topics, rate limits that must act before
//! anything is carried out, and shared-subscription groups.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cityplane_broker::mqtt::encode_publish;
use cityplane_broker::Limits;
use cityplane_proto::Role;
use common::*;
use rumqttc::{ConnectReturnCode, ConnectionError, Event, LastWill, Packet, QoS};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

const QUIET: Duration = Duration::from_millis(500);

fn subscribe(pkid: u16, filter: &str) -> Vec<u8> {
    frame(
        0x82,
        &[&pkid.to_be_bytes()[..], &field(filter.as_bytes()), &[1]].concat(),
    )
}

fn unsubscribe(pkid: u16, filter: &str) -> Vec<u8> {
    frame(
        0xA2,
        &[&pkid.to_be_bytes()[..], &field(filter.as_bytes())].concat(),
    )
}

/// The SUBACK for one filter: `code` is the granted QoS or 0x80.
async fn expect_suback(s: &mut TlsStream<TcpStream>, pkid: u16, code: u8) {
    let [hi, lo] = pkid.to_be_bytes();
    assert_eq!(
        read_exact(s, 5).await.expect("suback"),
        [0x90, 3, hi, lo, code],
        "SUBACK for pkid {pkid}"
    );
}

/// Asserts the server closes the connection without sending anything more.
async fn expect_closed(s: &mut TlsStream<TcpStream>, what: &str) {
    assert_eq!(
        read_until_closed(s).await,
        Some(vec![]),
        "{what}: the connection must be closed with nothing sent"
    );
}

/// A TCP connection from a chosen loopback source address (all of
/// 127.0.0.0/8 is local on Linux), so tests can be several peers.
async fn tcp_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source"))?;
    socket.connect(addr).await
}

/// CONNECT as `id` with a will (or not); the CONNACK return code.
async fn connect_code(
    addr: SocketAddr,
    pki: &Path,
    id: &str,
    will: Option<(&str, &[u8])>,
) -> Result<(), ConnectionError> {
    let (_c, mut eventloop) = mqtt_with(addr, tls_config(pki, Some(id)), id, |o| {
        if let Some((topic, payload)) = will {
            o.set_last_will(LastWill::new(
                topic,
                payload.to_vec(),
                QoS::AtLeastOnce,
                true,
            ));
        }
    });
    connack(&mut eventloop).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_filters_are_capped_per_identity_across_connections() {
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    let limits = Limits {
        max_filters_per_identity: 20,
        max_subscribes_per_sec: 1_000,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    let mut s = raw_connected(addr, t.path(), "op").await;
    let mut pkid = 0;
    for i in 0..20 {
        pkid += 1;
        s.write_all(&subscribe(pkid, &format!("fleet/churn/{i}")))
            .await
            .expect("write");
        expect_suback(&mut s, pkid, 1).await;
        s.write_all(&unsubscribe(pkid, &format!("fleet/churn/{i}")))
            .await
            .expect("write");
        let [hi, lo] = pkid.to_be_bytes();
        assert_eq!(
            read_exact(&mut s, 4).await.expect("unsuback"),
            [0xB0, 2, hi, lo]
        );
    }
    // Unsubscribing did not give the filters back: the router keeps them.
    s.write_all(&subscribe(100, "fleet/churn/20"))
        .await
        .expect("write");
    expect_suback(&mut s, 100, 0x80).await;
    // A filter it already made costs nothing.
    s.write_all(&subscribe(101, "fleet/churn/3"))
        .await
        .expect("write");
    expect_suback(&mut s, 101, 1).await;
    drop(s);
    // A new connection of the same identity has the same budget.
    let mut s = raw_connected(addr, t.path(), "op").await;
    s.write_all(&subscribe(1, "fleet/churn/21"))
        .await
        .expect("write");
    expect_suback(&mut s, 1, 0x80).await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_ping_floods_disconnect() {
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    t.issue(Role::Operator, "pinger");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    let mut s = raw_connected(addr, t.path(), "op").await;
    let mut flood = Vec::new();
    for pkid in 1..=200u16 {
        flood.extend(subscribe(pkid, "fleet/churn"));
        flood.extend(unsubscribe(pkid, "fleet/churn"));
    }
    s.write_all(&flood).await.expect("write");
    let got = read_until_closed(&mut s)
        .await
        .expect("a SUBSCRIBE/UNSUBSCRIBE flood must be disconnected");
    assert!(got.len() < 200 * 9, "not every packet was answered");

    let mut s = raw_connected(addr, t.path(), "pinger").await;
    s.write_all(&[0xC0, 0].repeat(200)).await.expect("write");
    let got = read_until_closed(&mut s)
        .await
        .expect("a PINGREQ flood must be disconnected");
    assert!(got.len() < 400);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_is_refused_where_the_protocol_does_not_retain() {
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    // A controller identity: it may read every topic, acks included.
    t.issue(Role::Controller, "late");
    t.issue(Role::Device, "d1");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    for (id, topic) in [
        ("op", "fleet/desired/x"),
        ("op", "fleet/ops/status"),
        ("d1", "devices/d1/telemetry"),
        ("d1", "devices/d1/acks"),
    ] {
        let mut s = raw_connected(addr, t.path(), id).await;
        s.write_all(&encode_publish(topic, b"{}", 1, true, 1))
            .await
            .expect("write");
        expect_closed(&mut s, &format!("{id} retaining on {topic}")).await;
    }
    // Where the protocol retains, it works; an empty payload without RETAIN
    // (which rumqttd would take as "delete the retained message") does not.
    let mut s = raw_connected(addr, t.path(), "d1").await;
    s.write_all(&encode_publish(
        "devices/d1/reported",
        b"{\"v\":1}",
        1,
        true,
        1,
    ))
    .await
    .expect("write");
    assert_eq!(
        read_exact(&mut s, 4).await.expect("puback"),
        [0x40, 2, 0, 1]
    );
    s.write_all(&encode_publish("devices/d1/reported", b"", 1, false, 2))
        .await
        .expect("write");
    expect_closed(&mut s, "empty payload without RETAIN").await;

    let (_late, mut rx) = connected(
        addr,
        t.path(),
        "late",
        &[
            "fleet/#",
            "devices/+/telemetry",
            "devices/+/acks",
            "devices/+/reported",
        ],
    )
    .await;
    let got = drain(&mut rx, QUIET).await;
    assert_eq!(
        got,
        vec![("devices/d1/reported".to_owned(), b"{\"v\":1}".to_vec())],
        "a later subscriber gets only what the protocol retains"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retained_store_is_capped_per_identity_and_broker_wide() {
    let t = TestPki::new();
    t.issue(Role::Controller, "ctl");
    t.issue(Role::Device, "d1");
    t.issue(Role::Device, "d2");
    let limits = Limits {
        max_retained_per_identity: 2,
        max_retained_bytes: 1_000,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();

    let mut s = raw_connected(addr, t.path(), "ctl").await;
    for (pkid, d) in [(1u16, "a"), (2, "b")] {
        s.write_all(&encode_publish(
            &format!("devices/{d}/reported"),
            b"{}",
            1,
            true,
            pkid,
        ))
        .await
        .expect("write");
        assert_eq!(
            read_exact(&mut s, 4).await.expect("puback"),
            [0x40, 2, 0, pkid as u8]
        );
    }
    s.write_all(&encode_publish("devices/c/reported", b"{}", 1, true, 3))
        .await
        .expect("write");
    expect_closed(&mut s, "a third retained message of one identity").await;

    let big = vec![b'x'; 600];
    let mut s1 = raw_connected(addr, t.path(), "d1").await;
    s1.write_all(&encode_publish("devices/d1/reported", &big, 1, true, 1))
        .await
        .expect("write");
    assert_eq!(
        read_exact(&mut s1, 4).await.expect("puback"),
        [0x40, 2, 0, 1]
    );
    // Replacing one's own message counts once.
    s1.write_all(&encode_publish(
        "devices/d1/reported",
        &vec![b'y'; 700],
        1,
        true,
        2,
    ))
    .await
    .expect("write");
    assert_eq!(
        read_exact(&mut s1, 4).await.expect("puback"),
        [0x40, 2, 0, 2]
    );
    let mut s2 = raw_connected(addr, t.path(), "d2").await;
    s2.write_all(&encode_publish("devices/d2/reported", &big, 1, true, 1))
        .await
        .expect("write");
    expect_closed(&mut s2, "a retained message over the broker-wide bytes").await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_session_is_not_inherited_by_a_new_certificate() {
    let t = TestPki::new();
    t.issue(Role::Controller, "spy");
    t.issue(Role::Device, "d1");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    async fn persistent(
        addr: SocketAddr,
        pki: &Path,
    ) -> (rumqttc::AsyncClient, rumqttc::EventLoop, bool) {
        let (client, mut eventloop) = mqtt_with(addr, tls_config(pki, Some("spy")), "spy", |o| {
            o.set_clean_session(false);
        });
        loop {
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    return (client, eventloop, ack.session_present)
                }
                Ok(Ok(_)) => {}
                other => panic!("no CONNACK: {other:?}"),
            }
        }
    }

    let (client, mut eventloop, present) = persistent(addr, t.path()).await;
    assert!(!present);
    client
        .subscribe("#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("suback") {
            break;
        }
    }
    client.disconnect().await.expect("disconnect");
    while eventloop.poll().await.is_ok() {}
    // The same certificate resumes its session (the feature still works).
    let (client, mut eventloop, present) = persistent(addr, t.path()).await;
    assert!(present, "the same certificate resumes its stored session");
    client.disconnect().await.expect("disconnect");
    while eventloop.poll().await.is_ok() {}

    // Revoked, then re-issued to the same id as an operator.
    t.pki.revoke("spy").expect("revoke");
    tokio::time::sleep(Duration::from_millis(400)).await;
    t.pki
        .issue(Role::Operator, "spy")
        .expect("re-issue as operator");
    let (_client, mut eventloop, present) = persistent(addr, t.path()).await;
    assert!(
        !present,
        "a new certificate must not resume the old session"
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });
    let mut d = raw_connected(addr, t.path(), "d1").await;
    for (i, topic) in ["devices/d1/reported", "devices/d1/acks"]
        .iter()
        .enumerate()
    {
        d.write_all(&encode_publish(topic, b"{}", 1, false, i as u16 + 1))
            .await
            .expect("publish");
        read_exact(&mut d, 4).await.expect("puback");
    }
    let got = drain(&mut rx, QUIET).await;
    assert!(
        got.is_empty(),
        "the old controller subscription leaked: {got:?}"
    );
    broker.shutdown().await;
}

/// `n` sockets from `source` that connect and send nothing, renewed every
/// `renew` (as a patient attacker would, just inside the handshake timeout).
fn bare_sockets(
    addr: SocketAddr,
    sources: Vec<String>,
    n: usize,
    renew: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut held = Vec::with_capacity(n);
            for i in 0..n {
                if let Ok(s) = tcp_from(&sources[i % sources.len()], addr).await {
                    held.push(s);
                }
            }
            tokio::time::sleep(renew).await;
            drop(held);
        }
    })
}

/// 24 connects of a device with a valid certificate, each must get CONNACK 0.
async fn device_gets_in_every_time(addr: SocketAddr, pki: &Path) {
    for attempt in 0..24 {
        let mut s = raw_tls(addr, tls_config(pki, Some("d1")))
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: TLS failed: {e}"));
        s.write_all(&connect_packet("d1", 0x02, 30, &[]))
            .await
            .expect("write");
        assert_eq!(
            read_exact(&mut s, 4).await.ok(),
            Some(vec![0x20, 2, 0, 0]),
            "attempt {attempt}: the device was kept out"
        );
        s.write_all(&[0xE0, 0]).await.expect("disconnect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_less_sockets_cannot_keep_a_device_out_at_a_small_limit() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let limits = Limits {
        max_connections: 64,
        max_handshakes: 16,
        max_handshakes_per_addr: 8,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    // The review's attack: 64 bare sockets from one host, renewed every 4.5 s.
    let attacker = bare_sockets(
        addr,
        vec!["127.0.0.2".into()],
        64,
        Duration::from_millis(4_500),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    device_gets_in_every_time(addr, t.path()).await;
    attacker.abort();
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_less_sockets_cannot_keep_a_device_out_at_the_default_limits() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let limits = test_limits();
    let (budget, per_addr) = (limits.max_handshakes, limits.max_handshakes_per_addr);
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    // More bare sockets than the whole handshake budget, from 5 addresses.
    let sources: Vec<String> = (2..7).map(|i| format!("127.0.0.{i}")).collect();
    assert!(sources.len() * per_addr > budget);
    let n = budget + 200;
    let mut held = Vec::new();
    for i in 0..n {
        held.push(
            tcp_from(&sources[i % sources.len()], addr)
                .await
                .expect("tcp"),
        );
    }
    // The oldest are closed to make room, long before the handshake timeout.
    let mut closed = 0;
    for s in &held[..200] {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_secs(2), async {
            s.readable().await?;
            s.try_read(&mut buf)
        })
        .await
        {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 200,
        "the oldest bare sockets make room for new ones"
    );
    device_gets_in_every_time(addr, t.path()).await;
    drop(held);
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_cannot_fake_presence_nor_outlive_revocation() {
    let t = TestPki::new();
    for id in ["d1", "d2"] {
        t.issue(Role::Device, id);
    }
    for id in ["c1", "c2"] {
        t.issue(Role::Controller, id);
    }
    t.issue(Role::Operator, "op");
    t.issue(Role::Operator, "watch");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_w, mut rx) = connected(addr, t.path(), "watch", &["devices/+/presence", "fleet/#"]).await;

    for (id, topic, payload, what) in [
        (
            "d1",
            "devices/d1/presence",
            &br#"{"online":true}"#[..],
            "a device will saying online",
        ),
        (
            "d1",
            "devices/d1/presence",
            b"",
            "an empty device will (deletes presence)",
        ),
        (
            "d1",
            "devices/d1/presence",
            b"bye",
            "a device will that is not presence",
        ),
        (
            "op",
            "fleet/desired/x",
            br#"{}"#,
            "an operator will on a topic the controller reads",
        ),
    ] {
        match connect_code(addr, t.path(), id, Some((topic, payload))).await {
            Err(ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)) => {}
            other => panic!("{what} must be refused with CONNACK 5, got {other:?}"),
        }
    }
    drain(&mut rx, QUIET).await;

    // Control: an abrupt end publishes the will.
    let (_c2, mut e2) = mqtt_with(addr, tls_config(t.path(), Some("c2")), "c2", |o| {
        o.set_last_will(LastWill::new(
            "fleet/wills/c2",
            "c2-gone",
            QoS::AtLeastOnce,
            false,
        ));
    });
    connack(&mut e2).await.expect("c2 connects");
    drop(e2);
    let got = drain(&mut rx, QUIET).await;
    assert!(
        got.contains(&("fleet/wills/c2".into(), b"c2-gone".to_vec())),
        "{got:?}"
    );

    // A revoked session's will is not published.
    let (_c1, mut e1) = mqtt_with(addr, tls_config(t.path(), Some("c1")), "c1", |o| {
        o.set_last_will(LastWill::new(
            "fleet/wills/c1",
            "c1-gone",
            QoS::AtLeastOnce,
            false,
        ));
    });
    connack(&mut e1).await.expect("c1 connects");
    let c1_loop = tokio::spawn(async move { while e1.poll().await.is_ok() {} });
    // A device whose will differs (spacing) from the broker's own offline.
    let mut will = field(b"devices/d2/presence");
    will.extend(field(br#"{ "online": false }"#));
    let mut d2 = raw_tls(addr, tls_config(t.path(), Some("d2")))
        .await
        .expect("tls");
    d2.write_all(&connect_packet("d2", 0x02 | 0x04 | 0x08 | 0x20, 30, &will))
        .await
        .expect("write");
    assert_eq!(
        read_exact(&mut d2, 4).await.expect("connack"),
        [0x20, 2, 0, 0]
    );
    drain(&mut rx, QUIET).await;
    t.pki.revoke("c1").expect("revoke");
    t.pki.revoke("d2").expect("revoke");
    tokio::time::timeout(Duration::from_secs(10), c1_loop)
        .await
        .expect("c1 cut")
        .expect("join");
    expect_closed(&mut d2, "revoked device").await;
    let got = drain(&mut rx, QUIET).await;
    assert!(
        !got.iter().any(|(topic, _)| topic == "fleet/wills/c1"),
        "a revoked client's will was published: {got:?}"
    );
    assert_eq!(
        got.iter()
            .filter(|(topic, _)| topic == "devices/d2/presence")
            .map(|(_, p)| p.clone())
            .collect::<Vec<_>>(),
        vec![br#"{"online":false}"#.to_vec()],
        "a revoked device: the broker's offline presence, not its will"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_and_bare_fleet_topics_are_refused_not_dropped() {
    let t = TestPki::new();
    t.issue(Role::Controller, "ctl");
    t.issue(Role::Operator, "op");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    let mut s = raw_connected(addr, t.path(), "ctl").await;
    s.write_all(&subscribe(1, "$TopicA/B"))
        .await
        .expect("write");
    expect_suback(&mut s, 1, 0x80).await;
    s.write_all(&[0xC0, 0]).await.expect("ping");
    assert_eq!(
        read_exact(&mut s, 2).await.expect("the session lives on"),
        [0xD0, 0]
    );
    s.write_all(&encode_publish("$TopicA/B", b"{}", 1, false, 2))
        .await
        .expect("write");
    expect_closed(&mut s, "a publish to a $-topic").await;

    for topic in ["fleet/desired", "fleet/ops"] {
        let mut s = raw_connected(addr, t.path(), "op").await;
        s.write_all(&encode_publish(topic, b"{}", 1, false, 1))
            .await
            .expect("write");
        expect_closed(&mut s, topic).await;
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_over_the_rate_limit_has_no_effect() {
    let t = TestPki::new();
    t.issue(Role::Operator, "op");
    t.issue(Role::Operator, "watch");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let mut tap = broker.tap_operator_messages().expect("tap");
    let (_w, mut rx) = connected(addr, t.path(), "watch", &["fleet/desired/#"]).await;

    let mut s = raw_connected(addr, t.path(), "op").await;
    let mut burst = Vec::new();
    for i in 0..130 {
        burst.extend(encode_publish(
            &format!("fleet/desired/rl-{i}"),
            b"{}",
            0,
            false,
            0,
        ));
    }
    s.write_all(&burst).await.expect("write");
    expect_closed(&mut s, "a burst over the rate limit").await;
    let routed = drain(&mut rx, QUIET).await.len();
    let mut tapped = 0;
    while tap.try_recv().is_ok() {
        tapped += 1;
    }
    assert!(routed < 130, "the limit held ({routed} routed)");
    assert_eq!(
        tapped, routed,
        "the controller must see exactly what was routed, not the refused publish"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_refill_the_publish_budget() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let limits = Limits {
        max_publishes_per_sec: 20,
        ..test_limits()
    };
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    let burst: Vec<u8> = (0..20)
        .flat_map(|_| encode_publish("devices/d1/telemetry", b"{}", 0, false, 0))
        .collect();
    let mut s = raw_connected(addr, t.path(), "d1").await;
    s.write_all(&burst).await.expect("write");
    s.write_all(&[0xC0, 0]).await.expect("ping");
    assert_eq!(
        read_exact(&mut s, 2).await.expect("within the budget"),
        [0xD0, 0]
    );
    s.write_all(&[0xE0, 0]).await.expect("disconnect");
    drop(s);
    let mut s = raw_connected(addr, t.path(), "d1").await;
    s.write_all(&burst).await.expect("write");
    expect_closed(&mut s, "the same budget spent again after a reconnect").await;
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscription_groups_are_per_identity() {
    let t = TestPki::new();
    t.issue(Role::Controller, "ctl");
    t.issue(Role::Operator, "op1");
    t.issue(Role::Operator, "op2");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let filter = "$share/g/devices/+/telemetry";
    let (_o1, mut rx1) = connected(addr, t.path(), "op1", &[filter]).await;
    let (_o2, mut rx2) = connected(addr, t.path(), "op2", &[filter]).await;
    let (ctl, _) = connected(addr, t.path(), "ctl", &[]).await;
    for i in 0..20 {
        ctl.publish(
            format!("devices/d{i}/telemetry"),
            QoS::AtLeastOnce,
            false,
            "{}",
        )
        .await
        .expect("publish");
    }
    let (got1, got2) = (drain(&mut rx1, QUIET).await, drain(&mut rx2, QUIET).await);
    assert_eq!(
        (got1.len(), got2.len()),
        (20, 20),
        "each operator's group gets every message; one cannot join the other's"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_certificate_expires() {
    let t = TestPki::new();
    let now = time::OffsetDateTime::now_utc();
    t.pki
        .issue_with(
            Role::Device,
            "d1",
            &cityplane_certs::IssueOptions {
                not_before: now - time::Duration::minutes(1),
                not_after: now + time::Duration::seconds(3),
                client_auth: true,
                org: None,
            },
        )
        .expect("issue");
    t.issue(Role::Operator, "watch");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_w, mut rx) = connected(addr, t.path(), "watch", &["devices/+/presence"]).await;
    // Keep-alive 0: only the certificate's end can close this session.
    let mut s = raw_tls(addr, tls_config(t.path(), Some("d1")))
        .await
        .expect("tls");
    s.write_all(&connect_packet("d1", 0x02, 0, &[]))
        .await
        .expect("write");
    assert_eq!(
        read_exact(&mut s, 4).await.expect("connack"),
        [0x20, 2, 0, 0]
    );
    expect_closed(&mut s, "a session past its certificate's end").await;
    let got = drain(&mut rx, QUIET).await;
    assert_eq!(
        got.last(),
        Some(&(
            "devices/d1/presence".to_owned(),
            br#"{"online":false}"#.to_vec()
        )),
        "{got:?}"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stolen_certificate_cannot_fill_the_connection_slots() {
    let t = TestPki::new();
    t.issue(Role::Device, "stolen");
    t.issue(Role::Device, "d1");
    let limits = Limits {
        max_connections: 8,
        // Sockets within the budget stay for the whole test.
        connect_timeout: Duration::from_secs(60),
        ..test_limits()
    };
    let per_identity = limits.max_connections_per_identity;
    assert!(per_identity < 8);
    let broker = start(t.path(), limits).await;
    let addr = broker.local_addr();
    // Handshakes completed with a valid certificate, and no CONNECT: each
    // would hold a slot for the whole connect timeout.
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(
            raw_tls(addr, tls_config(t.path(), Some("stolen")))
                .await
                .expect("tls"),
        );
    }
    // Those over the identity's budget are closed at once.
    let mut closed = 0;
    for s in &mut held[per_identity..] {
        if read_until_closed(s).await == Some(vec![]) {
            closed += 1;
        }
    }
    assert_eq!(closed, 12 - per_identity);
    device_gets_in_every_time(addr, t.path()).await;
    drop(held);
    broker.shutdown().await;
}
