//! Organisations (issue 11): an operator of any organisation but the
//! city's own sees only the devices the controller puts in its scope
//! (`RunningBroker::scopes`), its own answers and its organisation's
//! compliance summary.
//!
//! "Nothing arrived" is shown without waiting for silence: a later message
//! on the same filter (one router log, so delivered in order) the operator
//! may see is the sentinel, and everything before it is what it got.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use cityplane_broker::{RunningBroker, Scopes};
use cityplane_certs::IssueOptions;
use cityplane_proto::{topics, Role};
use common::*;
use rumqttc::{Event, Packet, QoS, SubscribeReasonCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_rustls::client::TlsStream;

const ORG: &str = "lighting-co";

/// Generous rates: these tests publish and subscribe in bursts.
fn limits() -> cityplane_broker::Limits {
    cityplane_broker::Limits {
        max_publishes_per_sec: 100_000,
        max_subscribes_per_sec: 10_000,
        ..test_limits()
    }
}

/// Devices lamp1, lamp2, cam1, cam2; `alice` of the city, `bob` of
/// lighting-co, whose scope is the lamps.
async fn setup() -> (TestPki, RunningBroker) {
    let t = TestPki::new();
    for d in ["lamp1", "lamp2", "cam1", "cam2"] {
        t.issue(Role::Device, d);
    }
    t.issue(Role::Operator, "alice");
    t.issue(Role::Controller, "ctl");
    t.pki
        .clone()
        .with_org(ORG)
        .expect("org")
        .issue(Role::Operator, "bob")
        .expect("bob");
    let broker = start(t.path(), limits()).await;
    set_scope(&broker.scopes(), &[(ORG, &["lamp1", "lamp2"])]);
    (t, broker)
}

fn set_scope(scopes: &Scopes, table: &[(&str, &[&str])]) {
    let table: HashMap<String, HashSet<String>> = table
        .iter()
        .map(|(org, devices)| {
            let devices = devices.iter().map(|d| (*d).to_owned()).collect();
            ((*org).to_owned(), devices)
        })
        .collect();
    scopes.replace(table);
}

/// A device on a raw connection: each publish is QoS 1 and returns once
/// the broker acknowledged it (it is then in the router, in order).
struct Device {
    id: String,
    stream: TlsStream<TcpStream>,
    pkid: u16,
}

impl Device {
    async fn connect(addr: SocketAddr, pki: &Path, id: &str) -> Device {
        Device {
            id: id.to_owned(),
            stream: raw_connected(addr, pki, id).await,
            pkid: 0,
        }
    }

    async fn publish(&mut self, leaf: &str, payload: &str, retain: bool) {
        self.pkid = self.pkid % u16::MAX + 1;
        let topic = format!("{}/{}/{leaf}", topics::DEVICES, self.id);
        let packet = cityplane_broker::mqtt::encode_publish(
            &topic,
            payload.as_bytes(),
            1,
            retain,
            self.pkid,
        );
        self.stream.write_all(&packet).await.expect("publish");
        let [hi, lo] = self.pkid.to_be_bytes();
        assert_eq!(
            read_exact(&mut self.stream, 4).await.expect("puback"),
            [0x40, 2, hi, lo],
            "{topic}"
        );
    }
}

impl Device {
    /// A QoS 0 publish: nothing comes back.
    async fn publish_qos0(&mut self, leaf: &str, payload: &str) {
        let topic = format!("{}/{}/{leaf}", topics::DEVICES, self.id);
        let packet =
            cityplane_broker::mqtt::encode_publish(&topic, payload.as_bytes(), 0, false, 0);
        self.stream.write_all(&packet).await.expect("publish");
    }
}

/// Everything `rx` got up to and including `(topic, payload)`.
async fn until(
    rx: &mut UnboundedReceiver<(String, Vec<u8>)>,
    topic: &str,
    payload: &str,
) -> Vec<(String, String)> {
    let mut got = Vec::new();
    loop {
        let (t, p) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{topic} {payload} never arrived; got {got:?}"))
            .expect("client running");
        let p = String::from_utf8_lossy(&p).into_owned();
        let done = t == topic && p == payload;
        got.push((t, p));
        if done {
            return got;
        }
    }
}

/// `common::connected`, but publishes that come before the last SUBACK
/// (retained ones) are kept too.
async fn subscribed(
    addr: SocketAddr,
    pki: &Path,
    id: &str,
    filters: &[&str],
) -> (rumqttc::AsyncClient, UnboundedReceiver<(String, Vec<u8>)>) {
    let (client, mut eventloop) = mqtt(addr, pki, id, id);
    connack(&mut eventloop).await.expect("connects");
    for filter in filters {
        client
            .subscribe(*filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut pending = filters.len();
    while pending > 0 {
        match eventloop.poll().await.expect("suback") {
            Event::Incoming(Packet::SubAck(ack)) => {
                assert!(granted(&ack.return_codes), "{id}: refused: {ack:?}");
                pending -= 1;
            }
            Event::Incoming(Packet::Publish(p)) => {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
            }
            _ => {}
        }
    }
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });
    (client, rx)
}

fn devices_in(got: &[(String, String)]) -> HashSet<String> {
    got.iter()
        .filter_map(|(t, _)| topics::split_device_topic(t).map(|(d, _)| d.to_owned()))
        .collect()
}

fn set(items: &[&str]) -> HashSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
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
async fn a_scoped_operator_reads_only_its_scope_through_wildcards_shares_and_retained() {
    let (t, broker) = setup().await;
    let addr = broker.local_addr();
    let mut lamp1 = Device::connect(addr, t.path(), "lamp1").await;
    let mut lamp2 = Device::connect(addr, t.path(), "lamp2").await;
    let mut cam1 = Device::connect(addr, t.path(), "cam1").await;
    // Retained before anyone subscribes: handed over at SUBSCRIBE.
    cam1.publish("reported", "cam-retained", true).await;
    lamp1.publish("reported", "lamp-retained", true).await;

    let (_bob, mut bob) = subscribed(
        addr,
        t.path(),
        "bob",
        &[
            "devices/+/reported",
            "$share/dash/devices/+/telemetry",
            "devices/+/presence",
        ],
    )
    .await;
    let (_alice, mut alice) = subscribed(addr, t.path(), "alice", &["devices/+/reported"]).await;

    cam1.publish("reported", "cam-live", false).await;
    lamp2.publish("reported", "sentinel", false).await;
    let got = until(&mut bob, "devices/lamp2/reported", "sentinel").await;
    assert!(
        got.contains(&("devices/lamp1/reported".into(), "lamp-retained".into())),
        "{got:?}"
    );
    assert_eq!(devices_in(&got), set(&["lamp1", "lamp2"]), "{got:?}");

    cam1.publish("telemetry", "cam-t", false).await;
    lamp1.publish("telemetry", "lamp-t", false).await;
    let got = until(&mut bob, "devices/lamp1/telemetry", "lamp-t").await;
    assert_eq!(devices_in(&got), set(&["lamp1"]), "{got:?}");

    // Presence (the edge's own retained messages) too.
    drop(Device::connect(addr, t.path(), "cam2").await);
    Device::connect(addr, t.path(), "lamp2").await;
    let serial = t
        .pki
        .current_cert("lamp2")
        .expect("read")
        .expect("lamp2")
        .serial;
    let online = format!(r#"{{"online":true,"serial":"{serial}"}}"#);
    let got = until(&mut bob, "devices/lamp2/presence", &online).await;
    assert!(!devices_in(&got).contains("cam2"), "{got:?}");
    assert!(!devices_in(&got).contains("cam1"), "{got:?}");

    // The city's operator sees every device.
    let got = until(&mut alice, "devices/lamp2/reported", "sentinel").await;
    assert!(
        got.contains(&("devices/cam1/reported".into(), "cam-retained".into()))
            && got.contains(&("devices/cam1/reported".into(), "cam-live".into())),
        "{got:?}"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_operator_subscribes_to_its_devices_answers_and_compliance_only() {
    let (t, broker) = setup().await;
    let addr = broker.local_addr();
    for filter in [
        "devices/+/reported",
        "devices/lamp1/reported",
        "$share/g/devices/lamp2/telemetry",
        "devices/+/presence",
        "fleet/responses/bob/#",
        "fleet/responses/bob/r1",
        "fleet/compliance/lighting-co",
    ] {
        assert!(
            granted(&subscribe_codes(addr, t.path(), "bob", filter).await),
            "bob may read {filter}"
        );
    }
    for filter in [
        "devices/cam1/reported",
        "$share/g/devices/cam1/telemetry",
        "fleet/#",
        "fleet/status",
        "fleet/compliance",
        "fleet/compliance/camera-int",
        "fleet/responses/alice/#",
        "fleet/responses/#",
        "#",
        "+/lamp1/reported",
        "devices/#",
    ] {
        let codes = subscribe_codes(addr, t.path(), "bob", filter).await;
        assert_eq!(
            codes,
            [SubscribeReasonCode::Failure],
            "bob must not read {filter}"
        );
    }

    // What the controller sends there arrives: answers and the retained
    // compliance summary; another operator's answers do not.
    let (ctl, _) = subscribed(addr, t.path(), "ctl", &[]).await;
    ctl.publish("fleet/compliance/lighting-co", QoS::AtLeastOnce, true, "ok")
        .await
        .expect("compliance");
    let (_bob, mut bob) = subscribed(
        addr,
        t.path(),
        "bob",
        &["fleet/responses/bob/#", "fleet/compliance/lighting-co"],
    )
    .await;
    let got = until(&mut bob, "fleet/compliance/lighting-co", "ok").await;
    assert_eq!(got.len(), 1, "{got:?}");
    for topic in [
        topics::response("alice", "r1"),
        topics::response("bob", "r2"),
    ] {
        ctl.publish(topic, QoS::AtLeastOnce, false, "answer")
            .await
            .expect("answer");
    }
    let got = until(&mut bob, "fleet/responses/bob/r2", "answer").await;
    assert_eq!(got.len(), 1, "{got:?}");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_change_applies_to_existing_subscriptions() {
    let (t, broker) = setup().await;
    let addr = broker.local_addr();
    let mut lamp1 = Device::connect(addr, t.path(), "lamp1").await;
    let mut cam1 = Device::connect(addr, t.path(), "cam1").await;
    let (_bob, mut bob) = subscribed(addr, t.path(), "bob", &["devices/+/reported"]).await;

    cam1.publish("reported", "c1", false).await;
    lamp1.publish("reported", "s1", false).await;
    let got = until(&mut bob, "devices/lamp1/reported", "s1").await;
    assert_eq!(devices_in(&got), set(&["lamp1"]), "{got:?}");

    set_scope(&broker.scopes(), &[(ORG, &["lamp1", "cam1"])]);
    cam1.publish("reported", "c2", false).await;
    lamp1.publish("reported", "s2", false).await;
    let got = until(&mut bob, "devices/lamp1/reported", "s2").await;
    assert_eq!(
        got,
        [
            ("devices/cam1/reported".to_owned(), "c2".to_owned()),
            ("devices/lamp1/reported".to_owned(), "s2".to_owned())
        ]
    );

    set_scope(&broker.scopes(), &[(ORG, &["lamp1"])]);
    cam1.publish("reported", "c3", false).await;
    lamp1.publish("reported", "s3", false).await;
    let got = until(&mut bob, "devices/lamp1/reported", "s3").await;
    assert_eq!(devices_in(&got), set(&["lamp1"]), "{got:?}");
    broker.shutdown().await;
}

/// An organisation nobody gave a scope (one the CA was told to write, and
/// `cityplane`, the O of every certificate from before organisations)
/// sees no device. Its sentinel: a device added to its scope at the end;
/// every report before it was delivered under a table without any of
/// those devices, whenever the router got to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_of_an_organisation_without_a_scope_sees_no_device() {
    let (t, broker) = setup().await;
    let addr = broker.local_addr();
    t.pki
        .issue_with(
            Role::Operator,
            "carol",
            &IssueOptions {
                org: Some("nobody".into()),
                ..IssueOptions::default()
            },
        )
        .expect("carol");
    let (legacy_crt, legacy_key) =
        cityplane_testkit::forge::client_cert(t.path(), "old", "operator", 1).expect("legacy");
    let legacy_tls = tls_config_with_ca(&t.path().join("ca.crt"), Some((legacy_crt, legacy_key)));

    let mut lamp1 = Device::connect(addr, t.path(), "lamp1").await;
    let mut cam1 = Device::connect(addr, t.path(), "cam1").await;
    lamp1.publish("reported", "retained", true).await;

    // A device named explicitly is refused outright.
    assert!(!granted(
        &subscribe_codes(addr, t.path(), "carol", "devices/lamp1/reported").await
    ));
    let (_carol, mut carol) = subscribed(addr, t.path(), "carol", &["devices/+/reported"]).await;
    let (old, mut old_loop) = mqtt_with(addr, legacy_tls, "old", |_| {});
    connack(&mut old_loop)
        .await
        .expect("a legacy operator connects");
    old.subscribe("devices/+/reported", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (old_tx, mut old_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = old_loop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = old_tx.send((p.topic.clone(), p.payload.to_vec()));
            }
        }
    });
    cam1.publish("reported", "c", false).await;
    lamp1.publish("reported", "l", false).await;
    set_scope(
        &broker.scopes(),
        &[
            (ORG, &["lamp1"]),
            ("nobody", &["lamp2"]),
            ("cityplane", &["lamp2"]),
        ],
    );
    let mut lamp2 = Device::connect(addr, t.path(), "lamp2").await;
    lamp2.publish("reported", "sentinel", false).await;
    for rx in [&mut carol, &mut old_rx] {
        let got = until(rx, "devices/lamp2/reported", "sentinel").await;
        assert_eq!(devices_in(&got), set(&["lamp2"]), "{got:?}");
    }
    broker.shutdown().await;
}

/// The router keeps a window of 100 unacknowledged QoS 1 deliveries per
/// connection, and so does the edge for its own (which serves this
/// subscription: `broker/src/direct.rs`): dropped deliveries never
/// acknowledged or released would fill it after 100, and nothing in scope
/// would arrive again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_qos1_deliveries_do_not_stall_the_ones_in_scope() {
    let (t, broker) = setup().await;
    let addr = broker.local_addr();
    let mut lamp1 = Device::connect(addr, t.path(), "lamp1").await;
    let mut cam1 = Device::connect(addr, t.path(), "cam1").await;
    let (_bob, mut bob) = subscribed(addr, t.path(), "bob", &["devices/+/telemetry"]).await;

    for n in 0..150 {
        cam1.publish("telemetry", &format!("c{n}"), false).await;
    }
    // Interleaved: some dropped deliveries wait behind ones bob has not
    // acknowledged yet.
    for n in 0..50 {
        cam1.publish("telemetry", &format!("x{n}"), false).await;
        lamp1.publish("telemetry", &format!("l{n}"), false).await;
    }
    let got = until(&mut bob, "devices/lamp1/telemetry", "l49").await;
    let expected: Vec<(String, String)> = (0..50)
        .map(|n| ("devices/lamp1/telemetry".to_owned(), format!("l{n}")))
        .collect();
    assert_eq!(got, expected);
    broker.shutdown().await;
}

/// `mosquitto_sub` with a contractor's certificate: of the retained
/// reports it gets only its scope's (`--retained-only` prints retained
/// messages and exits at the first live one, the sentinel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sub_with_a_contractor_certificate_gets_only_its_scope() {
    if std::process::Command::new("mosquitto_sub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        assert!(
            std::env::var_os("CITYPLANE_REQUIRE_MOSQUITTO").is_none(),
            "mosquitto clients are required"
        );
        eprintln!("skipping: mosquitto_sub not installed");
        return;
    }
    let (t, broker) = setup().await;
    let addr = broker.local_addr();
    let mut lamp1 = Device::connect(addr, t.path(), "lamp1").await;
    let mut lamp2 = Device::connect(addr, t.path(), "lamp2").await;
    let mut cam1 = Device::connect(addr, t.path(), "cam1").await;
    let mut cam2 = Device::connect(addr, t.path(), "cam2").await;
    cam1.publish("reported", "c1", true).await;
    lamp1.publish("reported", "l1", true).await;
    cam2.publish("reported", "c2", true).await;

    let mut sub = tokio::process::Command::new("mosquitto_sub");
    sub.args([
        "-h",
        "localhost",
        "-p",
        &addr.port().to_string(),
        "-i",
        "bob",
    ])
    .arg("--cafile")
    .arg(t.path().join("ca.crt"))
    .arg("--cert")
    .arg(t.path().join("bob.crt"))
    .arg("--key")
    .arg(t.path().join("bob.key"))
    .args([
        "-t",
        "devices/+/reported",
        "-v",
        "-q",
        "1",
        "--retained-only",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut sub = sub.spawn().expect("mosquitto_sub");
    // Live reports until it has subscribed and seen one (it then exits).
    let mut tries = 0;
    let status = loop {
        tries += 1;
        assert!(tries < 150, "mosquitto_sub never got a live report");
        lamp2.publish("reported", "live", false).await;
        if let Ok(status) = tokio::time::timeout(Duration::from_millis(200), sub.wait()).await {
            break status.expect("mosquitto_sub runs");
        }
    };
    let out = sub.wait_with_output().await.expect("output");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success(),
        "{printed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(printed.trim(), "devices/lamp1/reported l1");
    broker.shutdown().await;
}

/// QoS 0 device messages reach clean sessions from the edge, without the
/// router (`broker/src/direct.rs`): the scope holds on that way too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_operator_gets_qos0_telemetry_of_its_scope_only() {
    let (t, broker) = setup().await;
    let addr = broker.local_addr();
    let mut lamp1 = Device::connect(addr, t.path(), "lamp1").await;
    let mut cam1 = Device::connect(addr, t.path(), "cam1").await;
    let (_bob, mut bob) = subscribed(addr, t.path(), "bob", &["devices/+/telemetry"]).await;
    let (_alice, mut alice) = subscribed(addr, t.path(), "alice", &["devices/+/telemetry"]).await;

    for n in 0..20 {
        cam1.publish_qos0("telemetry", &format!("c{n}")).await;
        lamp1.publish_qos0("telemetry", &format!("l{n}")).await;
    }
    // Acknowledged once queued behind cam1's QoS 0 messages; lamp1's last
    // one then comes after all of them, for every subscriber.
    cam1.publish("reported", "cam-done", false).await;
    lamp1.publish_qos0("telemetry", "l-end").await;

    let got = until(&mut bob, "devices/lamp1/telemetry", "l-end").await;
    assert_eq!(devices_in(&got), set(&["lamp1"]), "{got:?}");
    let lamp: Vec<String> = got.iter().map(|(_, p)| p.clone()).collect();
    let want: Vec<String> = (0..20)
        .map(|n| format!("l{n}"))
        .chain(["l-end".to_owned()])
        .collect();
    assert_eq!(lamp, want, "bob: lamp1's telemetry once each, in order");

    let got = until(&mut alice, "devices/lamp1/telemetry", "l-end").await;
    let cam: Vec<&str> = got
        .iter()
        .filter(|(t, _)| t == "devices/cam1/telemetry")
        .map(|(_, p)| p.as_str())
        .collect();
    let want: Vec<String> = (0..20).map(|n| format!("c{n}")).collect();
    assert_eq!(cam, want, "alice (the city) sees cam1's too");
    broker.shutdown().await;
}
