//! `cityplane cluster` against a real 3-node RabbitMQ cluster: what the
//! provisioned users may do, checked with MQTT clients over mTLS
//! (docs/DEPLOYMENT.md, "What holds on the RabbitMQ cluster").

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::common::cluster::RabbitCluster;
use crate::common::{ok, BIN};

/// How long a refusal (a closed connection) or a delivery may take.
const WITHIN: Duration = Duration::from_secs(5);

/// What a client's event loop saw, in order.
#[derive(Debug)]
enum Seen {
    Publish(String, Vec<u8>),
    PubAck,
    SubAck(Vec<SubscribeReasonCode>),
    /// The connection ended (the loop stops: no reconnect).
    Closed,
}

/// One MQTT connection over mTLS as a PKI identity.
struct Mqtt {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Mqtt {
    /// Connects to `addr` ("127.0.0.1:PORT") as `id` with `id`'s certificate
    /// and client id; the CONNACK's refusal as an error.
    async fn connect(pki: &Path, addr: &str, id: &str) -> Result<Mqtt, ConnectionError> {
        Mqtt::connect_as(pki, addr, id, id, true).await
    }

    /// [`Mqtt::connect`] with another client id than the CN, and a
    /// persistent session unless `clean`.
    async fn connect_as(
        pki: &Path,
        addr: &str,
        id: &str,
        client_id: &str,
        clean: bool,
    ) -> Result<Mqtt, ConnectionError> {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut options = MqttOptions::new(client_id, host, port.parse().expect("port"));
        options.set_clean_session(clean);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            std::sync::Arc::new(cityplane_certs::client_tls::config(pki, id).expect("tls")),
        )));
        let (client, mut eventloop) = AsyncClient::new(options, 16);
        loop {
            match tokio::time::timeout(WITHIN, eventloop.poll())
                .await
                .expect("CONNACK in time")?
            {
                Event::Incoming(Packet::ConnAck(_)) => break,
                _ => continue,
            }
        }
        let (tx, seen) = mpsc::unbounded_channel();
        let who = format!("{id}@{addr}");
        tokio::spawn(async move {
            loop {
                let seen = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Seen::Publish(p.topic, p.payload.to_vec())
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
                    Ok(Event::Incoming(Packet::SubAck(s))) => Seen::SubAck(s.return_codes),
                    Ok(_) => continue,
                    Err(e) => {
                        eprintln!("{who}: connection ended: {e}");
                        let _ = tx.send(Seen::Closed);
                        return;
                    }
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        Ok(Mqtt { client, seen })
    }

    async fn next(&mut self) -> Option<Seen> {
        tokio::time::timeout(WITHIN, self.seen.recv())
            .await
            .ok()
            .flatten()
    }

    /// Publishes at QoS 1 and says whether the broker acknowledged it
    /// (`true`) or closed the connection (`false`).
    async fn publish(&mut self, topic: &str, payload: &[u8]) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("queue publish");
        match self.next().await {
            Some(Seen::PubAck) => true,
            Some(Seen::Closed) => false,
            other => panic!("publish on {topic}: neither PUBACK nor a close: {other:?}"),
        }
    }

    /// Subscribes at QoS 1 and says whether the broker granted it (`true`)
    /// or closed the connection (`false`; RabbitMQ before 3.12 sends no
    /// SUBACK failure code).
    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        match self.next().await {
            Some(Seen::SubAck(codes)) => {
                assert!(
                    codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
                    "SUBACK for {filter}: {codes:?}"
                );
                true
            }
            Some(Seen::Closed) => false,
            other => panic!("subscribe to {filter}: neither SUBACK nor a close: {other:?}"),
        }
    }

    /// The next message delivered, within [`WITHIN`].
    async fn delivery(&mut self) -> Option<(String, Vec<u8>)> {
        match self.next().await {
            Some(Seen::Publish(topic, payload)) => Some((topic, payload)),
            _ => None,
        }
    }

    /// Waits until the broker closes this connection; how long it took.
    async fn closed(&mut self) -> Duration {
        let started = Instant::now();
        loop {
            match self.next().await {
                Some(Seen::Closed) => return started.elapsed(),
                Some(_) => continue,
                None => panic!("the connection is still open after {WITHIN:?}"),
            }
        }
    }
}

/// A connection attempt that must get a CONNACK refusal: its code.
async fn refused(pki: &Path, addr: &str, id: &str) -> ConnectReturnCode {
    match Mqtt::connect(pki, addr, id).await {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(e) => panic!("{id} at {addr}: not a CONNACK refusal: {e}"),
        Ok(_) => panic!("{id} at {addr}: connected"),
    }
}

fn issue(pki: &Path, role: &str, id: &str) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["certs", "issue", "--role", role, "--id", id, "--pki"])
        .arg(pki);
    if role == "operator" {
        cmd.args(["--org", "city"]);
    }
    ok(&mut cmd);
}

fn names(report: &Value, field: &str) -> Vec<String> {
    let mut names: Vec<String> = report[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} in {report}"))
        .iter()
        .map(|v| v.as_str().expect("a name").to_owned())
        .collect();
    names.sort();
    names
}

/// Creates a user the PKI never issued, with every permission, straight
/// through the management API (as someone with the admin password could).
async fn create_intruder(cluster: &RabbitCluster, name: &str) {
    let mgmt = cityplane::cluster::rabbit::Cluster::open(cluster.dir())
        .expect("cluster.json")
        .mgmt()
        .expect("admin.secret");
    mgmt.post(
        "/api/definitions",
        &json!({
            "users": [{"name": name, "password_hash": "", "tags": []}],
            "permissions": [{"user": name, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}],
        }),
    )
    .await
    .expect("import a user");
    let users = mgmt.get("/api/users").await.expect("users");
    assert!(users
        .as_array()
        .expect("list")
        .iter()
        .any(|u| u["name"] == name));
}

/// One cluster for every check (it takes ~25 s to start): users appear
/// only with `sync`, the topic rules hold both ways for devices and
/// operators, an id with a `.` gets no user, a revocation cuts a live
/// session and refuses the reconnect, drift is reported and pruned,
/// `--shards` binds each device to its shard's session queue, the cluster
/// survives the loss of a node, and `down` leaves no process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_users_hold_the_pki_rules_on_a_rabbitmq_cluster() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    ok(std::process::Command::new(BIN)
        .args(["certs", "init", "--pki"])
        .arg(&pki));
    for (role, id) in [
        ("device", "dev-a"),
        ("device", "dev-b"),
        ("device", "dev-c"),
        ("device", "dev-d"),
        ("device", "dev.dot"),
        ("operator", "alice"),
        ("operator", "bob"),
        ("controller", "ctl"),
    ] {
        issue(&pki, role, id);
    }
    let Some(cluster) = RabbitCluster::up(&pki, &tmp.path().join("rabbit")) else {
        return;
    };
    let up_took = started.elapsed();
    let node = cluster.mqtts();

    // No user yet: the certificate alone does not log in.
    let before = refused(&pki, &node[0], "dev-a").await;

    let report = cluster.sync(&pki);
    assert_eq!(
        names(&report, "created"),
        ["alice", "bob", "ctl", "dev-a", "dev-b", "dev-c", "dev-d"],
        "{report}"
    );
    // '.' is a routing-key separator: `dev.dot` could otherwise publish
    // as `devxdot`.
    let refused_ids: Vec<&Value> = report["refused"]
        .as_array()
        .expect("refused")
        .iter()
        .collect();
    assert_eq!(refused_ids.len(), 1, "{report}");
    assert_eq!(refused_ids[0]["id"], "dev.dot");
    assert!(
        refused_ids[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("'.'")),
        "{report}"
    );
    refused(&pki, &node[1], "dev.dot").await;

    // The controller on another node than the devices: routing crosses nodes.
    let mut ctl = Mqtt::connect(&pki, &node[1], "ctl").await.expect("ctl");
    assert!(ctl.subscribe("devices/+/reported").await);
    assert!(ctl.subscribe("fleet/by/+/ops/#").await);

    let mut a = Mqtt::connect(&pki, &node[0], "dev-a")
        .await
        .expect("dev-a after sync");
    assert!(a.publish("devices/dev-a/reported", b"{\"n\":1}").await);
    assert_eq!(
        ctl.delivery().await,
        Some(("devices/dev-a/reported".into(), b"{\"n\":1}".to_vec()))
    );

    // Another device's topic: the connection is closed, nothing delivered.
    let mut b = Mqtt::connect(&pki, &node[2], "dev-b").await.expect("dev-b");
    assert!(
        b.subscribe("devices/dev-b/commands").await,
        "its own commands"
    );
    assert!(
        !b.publish("devices/dev-a/reported", b"{\"forged\":true}")
            .await,
        "dev-b published as dev-a"
    );
    let mut b = Mqtt::connect(&pki, &node[2], "dev-b")
        .await
        .expect("dev-b again");
    assert!(
        !b.subscribe("devices/dev-a/commands").await,
        "dev-b reads dev-a's commands"
    );

    // Operators: only under their own name, and no device topics.
    let mut alice = Mqtt::connect(&pki, &node[0], "alice").await.expect("alice");
    assert!(alice.publish("fleet/by/alice/ops/status", b"{}").await);
    assert_eq!(
        ctl.delivery().await.map(|(topic, _)| topic).as_deref(),
        Some("fleet/by/alice/ops/status"),
        "the forged publish reached the controller, or alice's did not"
    );
    assert!(
        !alice.publish("fleet/by/bob/ops/status", b"{}").await,
        "alice spoke as bob"
    );
    let mut alice = Mqtt::connect(&pki, &node[0], "alice")
        .await
        .expect("alice again");
    assert!(!alice.subscribe("devices/#").await, "alice reads devices/#");

    // Revocation: the live session is cut by the sync, the reconnect refused.
    let mut c = Mqtt::connect(&pki, &node[2], "dev-c").await.expect("dev-c");
    assert!(c.subscribe("devices/dev-c/commands").await);
    ok(std::process::Command::new(BIN)
        .args(["certs", "revoke", "--id", "dev-c", "--pki"])
        .arg(&pki));
    let revoked_at = Instant::now();
    let report = cluster.sync(&pki);
    assert_eq!(names(&report, "revoked"), ["dev-c"], "{report}");
    c.closed().await;
    let cut_after = revoked_at.elapsed();
    let after_revoke = refused(&pki, &node[0], "dev-c").await;

    // Drift: reported, kept without --prune, deleted with it; then no change.
    create_intruder(&cluster, "intruder").await;
    let report = cluster.sync(&pki);
    assert_eq!(names(&report, "drift"), ["intruder"], "{report}");
    assert_eq!(names(&report, "pruned"), Vec::<String>::new(), "{report}");
    let report = cluster.sync_prune(&pki);
    assert_eq!(names(&report, "pruned"), ["intruder"], "{report}");
    let report = cluster.sync(&pki);
    for field in ["created", "updated", "revoked", "pruned", "drift"] {
        assert_eq!(
            names(&report, field),
            Vec::<String>::new(),
            "{field}: {report}"
        );
    }
    assert_eq!(report["unchanged"], 6, "{report}");

    // Sharded controllers (4 shards): the sync makes a session queue per
    // shard and binds each device's leaves to its shard's queue, so each
    // shard's persistent session (client id `ctl.shard-<k>`, subscribing to
    // nothing itself) receives its own devices' reports and no others.
    let shard = |id: &str| cityplane_controller::shard::shard_of(id, 4);
    let report = cluster.sync_with(&pki, &["--shards", "4", "--controller-id", "ctl"]);
    assert_eq!(names(&report, "queues_created").len(), 4, "{report}");
    assert_eq!(
        names(&report, "bound"),
        ["dev-a", "dev-b", "dev-d"],
        "{report}"
    );
    let mut sessions = Vec::new();
    for k in 0..4 {
        let client_id = format!("ctl.shard-{k}");
        let session = Mqtt::connect_as(&pki, &node[k % 3], "ctl", &client_id, false)
            .await
            .expect("a shard session");
        sessions.push(session);
    }
    let mut a = Mqtt::connect(&pki, &node[1], "dev-a").await.expect("dev-a");
    assert!(a.publish("devices/dev-a/reported", b"{\"n\":10}").await);
    assert!(a.publish("devices/dev-a/telemetry", b"{\"t\":1}").await);
    let mut b = Mqtt::connect(&pki, &node[2], "dev-b").await.expect("dev-b");
    assert!(b.publish("devices/dev-b/acks", b"{\"id\":\"c1\"}").await);
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); 4];
    expected[shard("dev-a") as usize].push("devices/dev-a/reported".into());
    expected[shard("dev-b") as usize].push("devices/dev-b/acks".into());
    for (k, want) in expected.iter().enumerate() {
        let mut got = Vec::new();
        for _ in want {
            got.extend(sessions[k].delivery().await.map(|(topic, _)| topic));
        }
        assert_eq!(&got, want, "shard {k}'s session");
    }
    // A wildcard subscription (`devices/+/reported`) still gets its own.
    assert_eq!(
        ctl.delivery().await.map(|(topic, _)| topic).as_deref(),
        Some("devices/dev-a/reported")
    );
    // Nothing else arrived anywhere (telemetry is not bound).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (k, session) in sessions.iter_mut().enumerate() {
        assert!(session.seen.try_recv().is_err(), "shard {k} got more");
    }
    let report = cluster.sync_with(&pki, &["--shards", "4", "--controller-id", "ctl"]);
    assert!(
        names(&report, "bound").is_empty() && names(&report, "queues_created").is_empty(),
        "a second sync binds nothing: {report}"
    );
    // A revoked device loses its user; its bindings route nothing then.
    ok(std::process::Command::new(BIN)
        .args(["certs", "revoke", "--id", "dev-d", "--pki"])
        .arg(&pki));
    let report = cluster.sync_with(&pki, &["--shards", "4", "--controller-id", "ctl"]);
    assert_eq!(names(&report, "revoked"), ["dev-d"], "{report}");
    assert!(names(&report, "bound").is_empty(), "{report}");
    drop(sessions);

    // A node lost: its clients reconnect to a survivor (2 of 3 still hold
    // the client-id majority), and the node rejoins.
    let status = cluster.status();
    assert_eq!(status["healthy"], true, "{status}");
    let nodes = status["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{status}");
    assert!(
        nodes
            .iter()
            .all(|n| n["process"] == true && n["running"] == true && n["mqtt_listening"] == true),
        "{status}"
    );
    let mut b = Mqtt::connect(&pki, &node[2], "dev-b")
        .await
        .expect("dev-b on node 3");
    let lost = Instant::now();
    cluster.kill_node(2);
    b.closed().await;
    assert_eq!(cluster.status()["healthy"], false);
    let mut b = Mqtt::connect(&pki, &node[0], "dev-b")
        .await
        .expect("dev-b on a survivor");
    assert!(b.publish("devices/dev-b/reported", b"{\"n\":2}").await);
    assert_eq!(
        ctl.delivery().await.map(|(topic, _)| topic).as_deref(),
        Some("devices/dev-b/reported")
    );
    let reconnected = lost.elapsed();
    cluster.start_node(2);
    assert_eq!(cluster.status()["healthy"], true);
    let mut b = Mqtt::connect(&pki, &node[2], "dev-b")
        .await
        .expect("dev-b on node 3 again");
    assert!(b.publish("devices/dev-b/reported", b"{\"n\":3}").await);
    let node_back = lost.elapsed();

    // Asserts that no process of the cluster (VMs, wrappers, epmd) is left,
    // also when epmd still has a name registered as it is told to stop (a
    // plain epmd refuses `epmd -kill` then, and outlived `cluster down`).
    let _name = cluster.hold_epmd_name("cityplane-test");
    cluster.down();
    eprintln!(
        "cluster test: up {up_took:?}; before sync CONNACK {before:?}; revoked session cut {cut_after:?} after sync began, \
         reconnect CONNACK {after_revoke:?}; node lost -> publish via survivor {reconnected:?}, node back {node_back:?}; \
         total {:?}",
        started.elapsed()
    );
}
