//! A clean, unscoped session's subscriptions to device topics are held by
//! the edge, not the router (`broker/src/interest.rs`): the edge sends the
//! retained messages they match, then every live message of the device,
//! QoS 1 included, in the order the device sent them across its topics
//! (`broker/src/direct.rs`). What the router still serves (persistent
//! sessions, other filters) must see no difference.

use crate::common;

use cityplane_proto::{topics, Role};
use common::*;
use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::mpsc::UnboundedReceiver;

async fn watcher(
    addr: std::net::SocketAddr,
    pki: &std::path::Path,
    id: &str,
    filters: &[&str],
) -> (AsyncClient, UnboundedReceiver<Publish>) {
    let (client, eventloop) = mqtt(addr, pki, id, id);
    watching(client, eventloop, filters).await
}

/// [`watcher`] with a persistent session (the router holds its filters).
async fn persistent_watcher(
    addr: std::net::SocketAddr,
    pki: &std::path::Path,
    id: &str,
    client_id: &str,
    filters: &[&str],
) -> (AsyncClient, UnboundedReceiver<Publish>) {
    let tls = tls_config(pki, Some(id));
    let (client, eventloop) = mqtt_with(addr, tls, client_id, |o| {
        o.set_clean_session(false);
    });
    watching(client, eventloop, filters).await
}

/// (topic, payload, retain) of each, in arrival order.
fn seen(got: &[Publish]) -> Vec<(String, String, bool)> {
    got.iter()
        .map(|p| {
            (
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.retain,
            )
        })
        .collect()
}

async fn publish(client: &AsyncClient, topic: &str, qos: QoS, retain: bool, payload: &str) {
    client
        .publish(topic, qos, retain, payload.to_owned())
        .await
        .expect("publish");
}

/// `device` sends a report, an ack and telemetry in turn, `rounds` times
/// (QoS 1, 1 and 0); returns (topic, payload, retain) of each in order.
async fn report_ack_telemetry(
    device: &AsyncClient,
    id: &str,
    rounds: usize,
) -> Vec<(String, String, bool)> {
    let mut sent = Vec::new();
    for i in 0..rounds {
        for (leaf, qos) in [
            ("reported", QoS::AtLeastOnce),
            ("acks", QoS::AtLeastOnce),
            ("telemetry", QoS::AtMostOnce),
        ] {
            let topic = format!("devices/{id}/{leaf}");
            publish(device, &topic, qos, false, &format!("{{\"seq\":{i}}}")).await;
            sent.push((topic, format!("{{\"seq\":{i}}}"), false));
        }
    }
    sent
}

/// What a new subscriber gets first: the last retained message of each
/// device topic its filters match (RETAIN set, once, a deleted one never),
/// then live ones (RETAIN clear, QoS 1 as published). A persistent session,
/// which the router serves, gets the same retained messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscriber_gets_each_retained_device_message_once_then_live_ones() {
    let pki = TestPki::new();
    for id in ["lamp1", "lamp2"] {
        pki.issue(Role::Device, id);
    }
    pki.issue(Role::Operator, "alice");
    pki.issue(Role::Operator, "carol");
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();

    let (lamp1, _) = connected(addr, pki.path(), "lamp1", &[]).await;
    let (lamp2, _) = connected(addr, pki.path(), "lamp2", &[]).await;
    let (r1, r2) = (topics::reported("lamp1"), topics::reported("lamp2"));
    publish(&lamp1, &r1, QoS::AtLeastOnce, true, r#"{"seq":1}"#).await;
    publish(&lamp1, &r1, QoS::AtLeastOnce, true, r#"{"seq":2}"#).await;
    publish(&lamp1, &r1, QoS::AtLeastOnce, false, r#"{"seq":3}"#).await;
    publish(&lamp2, &r2, QoS::AtLeastOnce, true, r#"{"seq":1}"#).await;
    // An empty retained publish deletes lamp2's.
    publish(&lamp2, &r2, QoS::AtLeastOnce, true, "").await;
    // The ingress has routed all of it once lamp2's own subscriber sees a
    // later message; a watcher of lamp2's telemetry tells.
    let (_probe, mut probe) =
        watcher(addr, pki.path(), "carol", &["devices/lamp2/telemetry"]).await;
    publish(
        &lamp2,
        &topics::telemetry("lamp2"),
        QoS::AtMostOnce,
        false,
        "{}",
    )
    .await;
    assert_eq!(gather(&mut probe, 1).await.len(), 1);

    let filters = ["devices/+/reported", "devices/+/presence"];
    let (_alice, mut alice) = watcher(addr, pki.path(), "alice", &filters).await;
    let retained = gather(&mut alice, 3).await;
    let mut got = seen(&retained);
    got.sort();
    let online =
        |p: &Publish| p.topic.ends_with("/presence") && p.payload.starts_with(br#"{"online":true"#);
    assert!(
        retained
            .iter()
            .filter(|p| p.topic.ends_with("/presence"))
            .all(online),
        "{got:?}"
    );
    let got: Vec<_> = got
        .into_iter()
        .map(|(t, p, r)| {
            (
                t,
                if p.contains("online") {
                    "online".into()
                } else {
                    p
                },
                r,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (topics::presence("lamp1"), "online".into(), true),
            (r1.clone(), r#"{"seq":2}"#.into(), true),
            (topics::presence("lamp2"), "online".into(), true),
        ],
        "the last retained of each topic, once; lamp2's deleted report not at all"
    );

    publish(&lamp1, &r1, QoS::AtLeastOnce, false, r#"{"seq":4}"#).await;
    publish(&lamp2, &r2, QoS::AtLeastOnce, true, r#"{"seq":5}"#).await;
    let live = gather(&mut alice, 2).await;
    // Two devices: no order between them.
    let mut got = seen(&live);
    got.sort();
    assert_eq!(
        got,
        [
            (r1.clone(), r#"{"seq":4}"#.into(), false),
            (r2.clone(), r#"{"seq":5}"#.into(), false),
        ],
        "live ones after, RETAIN clear even when the device set it"
    );
    assert!(
        live.iter().all(|p| p.qos == QoS::AtLeastOnce),
        "QoS 1 as published and granted"
    );

    // The router kept its copies for the sessions it serves.
    let (_carol, mut carol) = persistent_watcher(
        addr,
        pki.path(),
        "carol",
        "carol:p",
        &["devices/+/reported"],
    )
    .await;
    let mut got = seen(&gather(&mut carol, 2).await);
    got.sort();
    assert_eq!(
        got,
        [
            (r1.clone(), r#"{"seq":2}"#.into(), true),
            (r2.clone(), r#"{"seq":5}"#.into(), true),
        ]
    );
    broker.shutdown().await;
}

/// A device's report, ack and telemetry, sent in turn on three topics at
/// QoS 1, 1 and 0, reach a subscriber of all three in the order sent:
/// what readers of a rollout's progress rely on ("the report before the
/// ack"). Through the router, telemetry took the edge's path and overtook
/// the reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_messages_on_several_topics_arrive_in_the_order_sent() {
    const EACH: usize = 30;
    let pki = TestPki::new();
    pki.issue(Role::Device, "cam1");
    // Operators may not read acks; a controller may.
    pki.issue(Role::Controller, "alice");
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();
    let filters = [
        "devices/+/reported",
        "devices/+/acks",
        "devices/+/telemetry",
    ];
    let (_alice, mut alice) = watcher(addr, pki.path(), "alice", &filters).await;
    let (cam, _) = connected(addr, pki.path(), "cam1", &[]).await;
    let want = report_ack_telemetry(&cam, "cam1", EACH).await;
    let got: Vec<_> = seen(&gather(&mut alice, want.len()).await)
        .into_iter()
        .filter(|(t, _, _)| !t.ends_with("/presence"))
        .collect();
    assert_eq!(got, want);
    broker.shutdown().await;
}

/// One SUBSCRIBE of device filters beside another (`mosquitto_sub -t
/// devices/+/reported -t fleet/#` sends one): the edge keeps the device
/// filters, so the device's messages still arrive in the order sent across
/// its topics; the router serves the other filter; the one SUBACK carries
/// each filter's code in the order asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_mixing_device_and_other_filters_keeps_the_device_order() {
    const EACH: usize = 30;
    let pki = TestPki::new();
    pki.issue(Role::Device, "cam1");
    pki.issue(Role::Controller, "alice");
    pki.issue(Role::Controller, "ctl");
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (client, eventloop) = mqtt(addr, pki.path(), "alice", "alice");
    let filters = [
        ("devices/+/reported", QoS::AtLeastOnce),
        ("fleet/#", QoS::AtMostOnce),
        ("devices/+/acks", QoS::AtLeastOnce),
        ("devices/+/telemetry", QoS::AtMostOnce),
    ];
    let (_alice, mut alice, codes) = watching_at_once(client, eventloop, &filters).await;
    use rumqttc::SubscribeReasonCode::Success;
    assert_eq!(
        codes,
        [
            Success(QoS::AtLeastOnce),
            Success(QoS::AtMostOnce),
            Success(QoS::AtLeastOnce),
            Success(QoS::AtMostOnce),
        ],
        "one code per filter, in order"
    );
    let (cam, _) = connected(addr, pki.path(), "cam1", &[]).await;
    let (ctl, _) = connected(addr, pki.path(), "ctl", &[]).await;
    let want = report_ack_telemetry(&cam, "cam1", EACH).await;
    publish(&ctl, "fleet/test", QoS::AtLeastOnce, false, "{}").await;
    let got = seen(&gather(&mut alice, want.len() + 1).await);
    let (fleet, device): (Vec<_>, Vec<_>) = got
        .into_iter()
        .filter(|(t, _, _)| !t.ends_with("/presence"))
        .partition(|(t, _, _)| t.starts_with("fleet/"));
    assert_eq!(device, want);
    assert_eq!(
        fleet,
        [("fleet/test".to_owned(), "{}".to_owned(), false)],
        "the router's filter"
    );
    broker.shutdown().await;
}

/// A controller-role client may publish on a device's topics (on its own
/// router link); the edge's subscribers get that too, live and, when
/// retained, on subscribing. UNSUBSCRIBE at the edge stops deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controllers_publish_on_a_device_topic_reaches_the_edges_subscribers() {
    let pki = TestPki::new();
    pki.issue(Role::Controller, "ctl");
    pki.issue(Role::Operator, "alice");
    pki.issue(Role::Operator, "bob");
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (alice, mut alice_rx) = watcher(addr, pki.path(), "alice", &["devices/+/reported"]).await;
    let (ctl, _) = connected(addr, pki.path(), "ctl", &[]).await;
    let topic = topics::reported("ghost");
    publish(&ctl, &topic, QoS::AtLeastOnce, true, r#"{"seq":1}"#).await;
    publish(&ctl, &topic, QoS::AtMostOnce, false, r#"{"seq":2}"#).await;
    assert_eq!(
        seen(&gather(&mut alice_rx, 2).await),
        [
            (topic.clone(), r#"{"seq":1}"#.into(), false),
            (topic.clone(), r#"{"seq":2}"#.into(), false),
        ]
    );
    let (_bob, mut bob) = watcher(addr, pki.path(), "bob", &["devices/ghost/reported"]).await;
    assert_eq!(
        seen(&gather(&mut bob, 1).await),
        [(topic.clone(), r#"{"seq":1}"#.into(), true)],
        "the controller's retained report, kept by the edge"
    );

    alice
        .unsubscribe("devices/+/reported")
        .await
        .expect("unsubscribe");
    assert_eq!(
        seen(&gather(&mut alice_rx, 1).await),
        [(String::new(), String::new(), false)],
        "the UNSUBACK, from the edge"
    );
    publish(&ctl, &topic, QoS::AtLeastOnce, false, r#"{"seq":3}"#).await;
    assert_eq!(
        seen(&gather(&mut bob, 1).await),
        [(topic.clone(), r#"{"seq":3}"#.into(), false)]
    );
    assert!(gather(&mut alice_rx, 0).await.is_empty(), "unsubscribed");
    broker.shutdown().await;
}

/// The edge keeps at most 100 of its QoS 1 deliveries unacknowledged per
/// session, as the router does; the rest wait for PUBACKs, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_acknowledge_gets_at_most_100_qos1_messages() {
    const DEVICES: usize = 3;
    const EACH: usize = 50;
    let pki = TestPki::new();
    for n in 0..DEVICES {
        pki.issue(Role::Device, &format!("bin{n}"));
    }
    pki.issue(Role::Controller, "alice");
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();
    let (alice, eventloop) = mqtt_with(addr, tls_config(pki.path(), Some("alice")), "alice", |o| {
        o.set_manual_acks(true);
    });
    let (alice, mut rx) = watching(alice, eventloop, &["devices/+/acks"]).await;
    let mut devices = Vec::new();
    for n in 0..DEVICES {
        devices.push(connected(addr, pki.path(), &format!("bin{n}"), &[]).await.0);
    }
    for i in 0..EACH {
        for (n, dev) in devices.iter().enumerate() {
            let topic = topics::acks(&format!("bin{n}"));
            publish(
                dev,
                &topic,
                QoS::AtLeastOnce,
                false,
                &format!("{{\"seq\":{i}}}"),
            )
            .await;
        }
    }
    let first = gather(&mut rx, 100).await;
    assert_eq!(first.len(), 100, "a window of 100 unacknowledged");
    for p in &first {
        alice.ack(p).await.expect("ack");
    }
    let rest = gather(&mut rx, DEVICES * EACH - 100).await;
    assert_eq!(
        rest.len(),
        DEVICES * EACH - 100,
        "the rest once acknowledged"
    );
    let mut ids: Vec<u16> = first.iter().chain(&rest).map(|p| p.pkid).collect();
    assert!(ids.iter().all(|id| *id > 100), "the edge's packet ids");
    ids.sort_unstable();
    ids.dedup();
    assert!(ids.len() >= 100, "distinct ids while in flight");
    broker.shutdown().await;
}

/// Every UNSUBSCRIBE is answered once, by the edge, whoever held the
/// filters: rumqttd answers one for filters it never held not at all, and
/// one per filter it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unsubscribe_is_answered_once() {
    let pki = TestPki::new();
    pki.issue(Role::Device, "lamp1");
    pki.issue(Role::Operator, "carol");
    let broker = start(pki.path(), test_limits()).await;
    let addr = broker.local_addr();
    // A persistent session: the router holds its filters.
    let filters = ["devices/+/reported", "fleet/#"];
    let (carol, mut rx) = persistent_watcher(addr, pki.path(), "carol", "carol", &filters).await;
    let unsuback = [(String::new(), String::new(), false)];
    for filter in ["devices/nobody/telemetry", "devices/+/reported", "fleet/#"] {
        carol.unsubscribe(filter).await.expect("unsubscribe");
        assert_eq!(
            seen(&gather(&mut rx, 1).await),
            unsuback,
            "one UNSUBACK for {filter}"
        );
    }
    let (lamp, _) = connected(addr, pki.path(), "lamp1", &[]).await;
    publish(
        &lamp,
        &topics::reported("lamp1"),
        QoS::AtLeastOnce,
        false,
        "{}",
    )
    .await;
    assert!(gather(&mut rx, 0).await.is_empty(), "unsubscribed");
    broker.shutdown().await;
}
