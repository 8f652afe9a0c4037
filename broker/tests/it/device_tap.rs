//! The in-process controller reads device messages from the edge's tap,
//! without the router; the router gets a copy only when a subscription may
//! want it (`broker/src/interest.rs`). Nothing may be lost, doubled or
//! reordered on either side, and subscribers through the router (wildcard,
//! persistent sessions that are offline) must still get theirs.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use cityplane_broker::link::DeviceTap;
use cityplane_proto::Role;
use common::*;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::mpsc::UnboundedReceiver;

const DEVICES: usize = 3;
/// Per device: 20 reports in a second's burst is under the 100/s budget.
const EACH: usize = 20;

fn device(n: usize) -> String {
    format!("tap-dev{n}")
}

/// Each device publishes `EACH` reports (QoS 1) numbered from `from`, with
/// a telemetry message (QoS 0) between them.
async fn publish_reports(devices: &[AsyncClient], from: usize) {
    for i in from..from + EACH {
        for (n, client) in devices.iter().enumerate() {
            let id = device(n);
            client
                .publish(
                    format!("devices/{id}/reported"),
                    QoS::AtLeastOnce,
                    false,
                    format!("{{\"seq\":{i}}}"),
                )
                .await
                .expect("publish report");
            client
                .publish(
                    format!("devices/{id}/telemetry"),
                    QoS::AtMostOnce,
                    false,
                    format!("{{\"t\":{i}}}"),
                )
                .await
                .expect("publish telemetry");
        }
    }
}

/// Per device, the sequence numbers of `messages` on `leaf`, in arrival order.
fn by_device<'a>(
    messages: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    leaf: &str,
) -> BTreeMap<String, Vec<usize>> {
    let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (topic, payload) in messages {
        let Some((id, l)) = cityplane_proto::topics::split_device_topic(topic) else {
            continue;
        };
        if l != leaf {
            continue;
        }
        let value: serde_json::Value = serde_json::from_slice(payload).expect("json");
        let seq = value["seq"]
            .as_u64()
            .or(value["t"].as_u64())
            .expect("numbered") as usize;
        out.entry(id.to_owned()).or_default().push(seq);
    }
    out
}

fn expected(range: std::ops::Range<usize>) -> BTreeMap<String, Vec<usize>> {
    (0..DEVICES)
        .map(|n| (device(n), range.clone().collect()))
        .collect()
}

/// The tap as a channel like a client's, so both are read the same way.
fn tap_channel(mut tap: DeviceTap) -> UnboundedReceiver<(String, Vec<u8>)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(d) = tap.recv().await {
            let topic = String::from_utf8(d.topic.to_vec()).expect("utf-8");
            if tx.send((topic, d.payload.to_vec())).is_err() {
                return;
            }
        }
    });
    rx
}

fn pairs(v: &[(String, Vec<u8>)]) -> impl Iterator<Item = (&str, &[u8])> {
    v.iter().map(|(t, p)| (t.as_str(), p.as_slice()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_the_tap_in_order_exactly_once_and_subscribers_still_get_theirs() {
    let pki = TestPki::new();
    for n in 0..DEVICES {
        pki.issue(Role::Device, &device(n));
    }
    pki.issue(Role::Operator, "alice");
    pki.issue(Role::Controller, "bob");
    let broker = start(pki.path(), test_limits()).await;
    let mut tap = tap_channel(
        broker
            .tap_device_messages(&["reported"])
            .expect("first tap"),
    );
    assert!(
        broker.tap_device_messages(&["reported"]).is_none(),
        "a second tap"
    );
    let addr = broker.local_addr();

    // alice watches every report; nobody watches telemetry yet.
    let (alice, mut alice_rx) = connected(addr, pki.path(), "alice", &["devices/+/reported"]).await;
    let mut devices = Vec::new();
    for n in 0..DEVICES {
        devices.push(connected(addr, pki.path(), &device(n), &[]).await.0);
    }

    publish_reports(&devices, 0).await;
    let tapped = gather(&mut tap, DEVICES * EACH).await;
    assert_eq!(
        by_device(pairs(&tapped), "reported"),
        expected(0..EACH),
        "the tap: every report once, in order"
    );
    assert!(
        tapped.iter().all(|(t, _)| t.ends_with("/reported")),
        "the tap took only its leaf"
    );
    let watched = gather(&mut alice_rx, DEVICES * EACH).await;
    assert_eq!(
        by_device(pairs(&watched), "reported"),
        expected(0..EACH),
        "alice: every report once, in order"
    );
    assert_eq!(
        watched.len(),
        DEVICES * EACH,
        "alice got only what she subscribed to"
    );

    // bob (a controller client) subscribes to everything with a wildcard
    // and a shared group;
    // alice unsubscribes: the tap is unaffected either way.
    let (_bob, mut bob_rx) = connected(
        addr,
        pki.path(),
        "bob",
        &["devices/#", "$share/g/devices/+/telemetry"],
    )
    .await;
    alice
        .unsubscribe("devices/+/reported")
        .await
        .expect("unsubscribe");
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_reports(&devices, EACH).await;
    let tapped = gather(&mut tap, DEVICES * EACH).await;
    assert_eq!(
        by_device(pairs(&tapped), "reported"),
        expected(EACH..2 * EACH)
    );
    let bob = gather(&mut bob_rx, 3 * DEVICES * EACH).await;
    assert_eq!(
        by_device(pairs(&bob), "reported"),
        expected(EACH..2 * EACH),
        "bob's wildcard"
    );
    let telemetry = by_device(pairs(&bob), "telemetry");
    for n in 0..DEVICES {
        // Once through `devices/#` and once through the group (QoS 0: the
        // router may still drop one under load; none did here, but order is
        // what the contract says).
        let seqs = &telemetry[&device(n)];
        assert_eq!(seqs.len(), 2 * EACH, "bob's telemetry of {}", device(n));
    }
    assert!(
        gather(&mut alice_rx, 0).await.is_empty(),
        "alice unsubscribed"
    );
    broker.shutdown().await;
}

/// A persistent session's subscription outlives its connection: messages
/// published while it is offline must still enter the router, which queues
/// them for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_persistent_subscriber_still_gets_what_was_published_meanwhile() {
    let pki = TestPki::new();
    pki.issue(Role::Device, &device(0));
    pki.issue(Role::Operator, "carol");
    let broker = start(pki.path(), test_limits()).await;
    let _tap = broker.tap_device_messages(&["reported"]).expect("tap");
    let addr = broker.local_addr();
    let persistent = |o: &mut rumqttc::MqttOptions| {
        o.set_clean_session(false);
    };

    let (carol, mut eventloop) = mqtt_with(
        addr,
        tls_config(pki.path(), Some("carol")),
        "carol",
        persistent,
    );
    connack(&mut eventloop).await.expect("connects");
    carol
        .subscribe("devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("suback") {
            break;
        }
    }
    carol.disconnect().await.expect("disconnect");
    while eventloop.poll().await.is_ok() {}
    drop((carol, eventloop));

    let (dev, _) = connected(addr, pki.path(), &device(0), &[]).await;
    for i in 0..5 {
        dev.publish(
            format!("devices/{}/telemetry", device(0)),
            QoS::AtLeastOnce,
            false,
            format!("{{\"t\":{i}}}"),
        )
        .await
        .expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (_carol, mut eventloop) = mqtt_with(
        addr,
        tls_config(pki.path(), Some("carol")),
        "carol",
        persistent,
    );
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got.len() < 5 {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p.payload.to_vec()),
            Ok(Ok(_)) => {}
            other => panic!(
                "carol's queued messages: {other:?} after {} of 5",
                got.len()
            ),
        }
    }
    let want: Vec<Vec<u8>> = (0..5)
        .map(|i| format!("{{\"t\":{i}}}").into_bytes())
        .collect();
    assert_eq!(got, want);
    broker.shutdown().await;
}

/// Exactly `range`'s telemetry per device, once each and in order, and
/// nothing else: what `rx` gets next.
async fn assert_telemetry(
    rx: &mut UnboundedReceiver<(String, Vec<u8>)>,
    range: std::ops::Range<usize>,
    who: &str,
) {
    let got = gather(rx, DEVICES * range.len()).await;
    assert_eq!(
        by_device(pairs(&got), "telemetry"),
        expected(range.clone()),
        "{who}: each telemetry message once, in order"
    );
    assert_eq!(got.len(), DEVICES * range.len(), "{who}: nothing else");
}

/// QoS 0 device messages that only clean sessions want go to them from the
/// edge, without the router (`broker/src/direct.rs`); as soon as one
/// subscriber needs the router (a shared group, a persistent session,
/// connected or not) they all go through it. Whichever way, every
/// subscriber gets each message once and in order (a group: once among its
/// members), and the way back to the edge opens when the last such
/// subscriber is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_messages_reach_every_kind_of_subscriber_once_and_in_order() {
    let pki = TestPki::new();
    for n in 0..DEVICES {
        pki.issue(Role::Device, &device(n));
    }
    for who in ["alice", "carol", "dave"] {
        pki.issue(Role::Operator, who);
    }
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();
    let telemetry = ["devices/+/telemetry"];
    let mut devices = Vec::new();
    for n in 0..DEVICES {
        devices.push(connected(addr, pki.path(), &device(n), &[]).await.0);
    }

    // Only a clean session: the edge delivers.
    let (_alice, mut alice) = connected(addr, pki.path(), "alice", &telemetry).await;
    publish_reports(&devices, 0).await;
    assert_telemetry(&mut alice, 0..EACH, "alice alone").await;

    // A shared group of two clean sessions (one identity's group): the
    // router picks a member for each message.
    let group = ["$share/g/devices/+/telemetry"];
    let (dave, mut dave_rx) = connected(addr, pki.path(), "dave", &group).await;
    let (dave2, mut dave2_rx) = {
        let (client, eventloop) = mqtt(addr, pki.path(), "dave", "dave:2");
        subscribed(client, eventloop, &group).await
    };
    publish_reports(&devices, EACH).await;
    assert_telemetry(&mut alice, EACH..2 * EACH, "alice with a group").await;
    let mut members = gather(&mut dave_rx, 0).await;
    members.extend(gather(&mut dave2_rx, 0).await);
    let mut shared = by_device(pairs(&members), "telemetry");
    shared.values_mut().for_each(|seqs| seqs.sort_unstable());
    assert_eq!(
        shared,
        expected(EACH..2 * EACH),
        "the group: each message once among its members"
    );
    dave.disconnect().await.expect("disconnect");
    dave2.disconnect().await.expect("disconnect");

    // A persistent session: the router delivers, connected or not.
    let persistent = |o: &mut rumqttc::MqttOptions| {
        o.set_clean_session(false);
    };
    let (carol, eventloop) = mqtt_with(
        addr,
        tls_config(pki.path(), Some("carol")),
        "carol",
        persistent,
    );
    let (carol, mut carol_rx) = subscribed(carol, eventloop, &telemetry).await;
    publish_reports(&devices, 2 * EACH).await;
    assert_telemetry(&mut alice, 2 * EACH..3 * EACH, "alice with carol").await;
    assert_telemetry(&mut carol_rx, 2 * EACH..3 * EACH, "carol (persistent)").await;
    carol.disconnect().await.expect("disconnect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_reports(&devices, 3 * EACH).await;
    assert_telemetry(&mut alice, 3 * EACH..4 * EACH, "alice, carol offline").await;

    // carol back with a clean session discards the stored one: the edge
    // delivers to both again.
    let (_carol, mut carol_rx) = connected(addr, pki.path(), "carol", &telemetry).await;
    publish_reports(&devices, 4 * EACH).await;
    assert_telemetry(&mut alice, 4 * EACH..5 * EACH, "alice, carol clean").await;
    assert_telemetry(&mut carol_rx, 4 * EACH..5 * EACH, "carol (clean)").await;
    broker.shutdown().await;
}

/// A device's reports may be retained (the router stores those) or not: all
/// of them take the router, QoS 0 included, so a subscriber gets them in
/// the order the device sent them, never a live one from the edge before
/// the retained one sent first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_and_live_reports_reach_a_clean_subscriber_in_order() {
    let pki = TestPki::new();
    pki.issue(Role::Device, &device(0));
    pki.issue(Role::Operator, "alice");
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (_alice, mut alice) = connected(addr, pki.path(), "alice", &["devices/+/reported"]).await;
    let (dev, _) = connected(addr, pki.path(), &device(0), &[]).await;
    for i in 0..EACH {
        dev.publish(
            format!("devices/{}/reported", device(0)),
            QoS::AtMostOnce,
            i % 2 == 0,
            format!("{{\"seq\":{i}}}"),
        )
        .await
        .expect("publish");
    }
    let got = gather(&mut alice, EACH).await;
    let want: BTreeMap<String, Vec<usize>> = [(device(0), (0..EACH).collect())].into();
    assert_eq!(by_device(pairs(&got), "reported"), want);
    broker.shutdown().await;
}
