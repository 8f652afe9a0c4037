//! Harness: a throwaway PKI, broker + controller in-process (as `cityplane
//! serve` runs them), operators and scripted devices over real mTLS.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cityplane_broker::{Broker, BrokerConfig, Limits, RunningBroker};
use cityplane_certs::Pki;
use cityplane_controller::reconcile::RetryPolicy;
use cityplane_controller::store::CommitGate;
use cityplane_controller::{Controller, ControllerConfig};
use cityplane_proto::messages::{Command, State};
use cityplane_proto::Role;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::{json, Value};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "cityplane_controller=debug,cityplane_broker=info,rumqttd=warn".into()
            }),
        )
        .with_test_writer()
        .try_init();
}

pub struct Server {
    pub pki_dir: tempfile::TempDir,
    pub data_dir: tempfile::TempDir,
    pub pki: Pki,
    pub broker: Option<RunningBroker>,
    pub controller: Option<Controller>,
    pub addr: SocketAddr,
    pub retry: RetryPolicy,
    /// Passed to every controller this server boots.
    pub gate: Option<CommitGate>,
}

pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        command_timeout: Duration::from_millis(500),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        max_attempts: 3,
    }
}

impl Server {
    pub async fn start() -> Server {
        Server::start_with(fast_retry()).await
    }

    pub async fn start_with(retry: RetryPolicy) -> Server {
        Server::start_gated(retry, None).await
    }

    pub async fn start_gated(retry: RetryPolicy, gate: Option<CommitGate>) -> Server {
        init_tracing();
        let pki_dir = tempfile::tempdir().expect("tempdir");
        let data_dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::init(pki_dir.path(), false).expect("pki");
        pki.issue(Role::Operator, "op").expect("operator");
        pki.issue(Role::Controller, "spy").expect("spy");
        let mut server = Server {
            pki_dir,
            data_dir,
            pki,
            broker: None,
            controller: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            retry,
            gate,
        };
        server.boot().await;
        server
    }

    /// (Re)starts broker and controller on the same PKI and data.
    pub async fn boot(&mut self) {
        let broker = Broker::start_closed(BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            pki: self.pki_dir.path().to_path_buf(),
            limits: Limits::default(),
            firmware_dir: None,
        })
        .await
        .expect("broker");
        let mut config = ControllerConfig::new(self.data_dir.path().join("db"));
        config.pki = Some(self.pki_dir.path().to_path_buf());
        config.retry = self.retry.clone();
        config.status_every = Duration::from_millis(200);
        config.commit_gate = self.gate.clone();
        if self.gate.is_some() {
            // Every device record its own transaction: the gate sees chunks.
            config.commit_chunk = 1;
        }
        let controller = Controller::start_in_process(&broker, config)
            .await
            .expect("controller");
        self.addr = broker.local_addr();
        self.broker = Some(broker);
        self.controller = Some(controller);
    }

    pub async fn stop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.shutdown().await.expect("controller stops");
        }
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
    }

    pub fn pki_path(&self) -> &Path {
        self.pki_dir.path()
    }

    pub fn devices(&self, prefix: &str, n: usize) -> Vec<String> {
        self.pki
            .issue_bulk(Role::Device, prefix, n, |_| {})
            .expect("bulk");
        (1..=n).map(|i| format!("{prefix}{i:04}")).collect()
    }

    pub async fn operator(&self) -> Client {
        Client::connect(
            self.addr,
            self.pki_path(),
            "op",
            &["fleet/responses/op/#"],
            None,
        )
        .await
    }
}

pub fn tls(pki: &Path, id: &str) -> Arc<rustls::ClientConfig> {
    cityplane_testkit::tls::pki_client(pki, Some(id)).expect("client TLS config")
}

/// A connected client whose received publishes land in a channel.
pub struct Client {
    pub id: String,
    pub mqtt: AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    task: tokio::task::JoinHandle<()>,
    next: u64,
}

impl Client {
    pub async fn connect(
        addr: SocketAddr,
        pki: &Path,
        id: &str,
        subscribe: &[&str],
        will: Option<LastWill>,
    ) -> Client {
        let mut opts = MqttOptions::new(id, "localhost", addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 * 1024 * 1024, 256 * 1024);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls(
            pki, id,
        ))));
        if let Some(w) = will {
            opts.set_last_will(w);
        }
        let (mqtt, mut eventloop) = AsyncClient::new(opts, 256);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        wait_connack(&mut eventloop).await;
        for f in subscribe {
            mqtt.subscribe(*f, QoS::AtLeastOnce)
                .await
                .expect("subscribe");
        }
        let mut subacks = subscribe.len();
        while subacks > 0 {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("poll") {
                subacks -= 1;
            }
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
            }
        });
        Client {
            id: id.to_owned(),
            mqtt,
            rx,
            task,
            next: 0,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Waits for the next publish on `topic`.
    pub async fn next_on(&mut self, topic: &str) -> Vec<u8> {
        loop {
            let (t, p) = tokio::time::timeout(Duration::from_secs(20), self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{}: nothing on {topic} within 20 s", self.id))
                .expect("open");
            if t == topic {
                return p;
            }
        }
    }

    /// Operator request: publishes with a fresh request id and returns the answer.
    pub async fn request(&mut self, topic: &str, mut body: Value) -> Value {
        self.next += 1;
        let rid = format!("r{}", self.next);
        body["request_id"] = json!(rid);
        self.publish(topic, serde_json::to_vec(&body).expect("json"))
            .await;
        let answer = self
            .next_on(&format!("fleet/responses/{}/{rid}", self.id))
            .await;
        serde_json::from_slice(&answer).expect("answer is JSON")
    }

    pub async fn raw_request(&mut self, topic: &str, payload: &[u8], rid: &str) -> Value {
        self.publish(topic, payload.to_vec()).await;
        let answer = self
            .next_on(&format!("fleet/responses/{}/{rid}", self.id))
            .await;
        serde_json::from_slice(&answer).expect("answer is JSON")
    }

    /// Registers devices with the class and labels of their initial state
    /// (what an installer's manifest holds): selectors match the registry.
    pub async fn register(&mut self, devices: &[&Device]) -> Value {
        let entries: Vec<Value> = devices
            .iter()
            .map(|d| {
                let state = d.state.lock().expect("lock");
                let mut e = json!({"id": d.id});
                if let Some(c) = state.get("class") {
                    e["class"] = c.clone();
                }
                if let Some(l) = state.get("labels") {
                    e["labels"] = l.clone();
                }
                e
            })
            .collect();
        let r = self.query("register", json!({"devices": entries})).await;
        assert!(r["registered"].is_u64(), "register: {r}");
        r
    }

    pub async fn apply(&mut self, doc: Value) -> Value {
        let name = doc["name"].as_str().expect("name").to_owned();
        self.request(&format!("fleet/desired/{name}"), doc).await
    }

    pub async fn query(&mut self, verb: &str, body: Value) -> Value {
        let answer = self.request(&format!("fleet/ops/{verb}"), body).await;
        assert_eq!(answer["status"], "ok", "query {verb} refused: {answer}");
        answer["result"].clone()
    }

    /// Polls `describe` until `check` holds.
    pub async fn eventually_device(
        &mut self,
        id: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        for _ in 0..200 {
            let answer = self.request("fleet/ops/describe", json!({"id": id})).await;
            if answer["status"] == "ok" {
                last = answer["result"].clone();
                if check(&last) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{id}: never {what}; last seen {last:#}");
    }

    pub async fn eventually_status(
        &mut self,
        body: Value,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        for _ in 0..200 {
            last = self.query("status", body.clone()).await;
            if check(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("status never {what}; last {last:#}");
    }

    pub async fn close(self) {
        let _ = self.mqtt.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }

    /// Drops the connection without DISCONNECT (the will fires).
    pub fn kill(self) {
        self.task.abort();
    }
}

async fn wait_connack(eventloop: &mut EventLoop) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return,
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK: {other:?}"),
        }
    }
}

/// What a scripted device does with commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Apply,
    Ignore,
    Reject,
}

/// A scripted device speaking the device side of the contract.
pub struct Device {
    pub id: String,
    pub state: Arc<Mutex<State>>,
    pub version: Arc<Mutex<u64>>,
    pub commands: Arc<Mutex<Vec<Command>>>,
    pub applied: Arc<Mutex<Vec<String>>>,
    pub mode: Arc<Mutex<Mode>>,
    task: Option<tokio::task::JoinHandle<()>>,
    client: Option<AsyncClient>,
    addr: SocketAddr,
    pki: PathBuf,
}

impl Device {
    pub fn new(server: &Server, id: &str, state: Value) -> Device {
        Device {
            id: id.to_owned(),
            state: Arc::new(Mutex::new(state.as_object().cloned().expect("object"))),
            version: Arc::new(Mutex::new(0)),
            commands: Arc::default(),
            applied: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Apply)),
            task: None,
            client: None,
            addr: server.addr,
            pki: server.pki_path().to_path_buf(),
        }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
    }

    pub async fn connect(&mut self, addr: SocketAddr) {
        self.addr = addr;
        let id = self.id.clone();
        let will = LastWill::new(
            format!("devices/{id}/presence"),
            r#"{"online":false}"#,
            QoS::AtLeastOnce,
            true,
        );
        let c = Client::connect(
            addr,
            &self.pki,
            &id,
            &[&format!("devices/{id}/commands")],
            Some(will),
        )
        .await;
        let Client {
            mqtt,
            mut rx,
            task: inner,
            ..
        } = c;
        report(&mqtt, &id, &self.state, &self.version).await;
        let (state, version, commands, applied, mode) = (
            self.state.clone(),
            self.version.clone(),
            self.commands.clone(),
            self.applied.clone(),
            self.mode.clone(),
        );
        let client = mqtt.clone();
        self.task = Some(tokio::spawn(async move {
            let _inner = AbortOnDrop(inner);
            while let Some((_topic, payload)) = rx.recv().await {
                let Ok(cmd) = serde_json::from_slice::<Command>(&payload) else {
                    continue;
                };
                commands.lock().expect("lock").push(cmd.clone());
                let m = *mode.lock().expect("lock");
                match m {
                    Mode::Ignore => continue,
                    Mode::Reject => {
                        let ack =
                            json!({"id": cmd.id, "status": "rejected", "reason": "not today"});
                        let _ = client
                            .publish(
                                format!("devices/{id}/acks"),
                                QoS::AtLeastOnce,
                                false,
                                ack.to_string(),
                            )
                            .await;
                        continue;
                    }
                    Mode::Apply => {}
                }
                if applied.lock().expect("lock").contains(&cmd.id) {
                    continue; // replay
                }
                applied.lock().expect("lock").push(cmd.id.clone());
                {
                    let mut s = state.lock().expect("lock");
                    cityplane_controller::delta::apply(&mut s, &cmd.state);
                }
                report(&client, &id, &state, &version).await;
                let ack = json!({"id": cmd.id, "status": "applied"});
                let _ = client
                    .publish(
                        format!("devices/{id}/acks"),
                        QoS::AtLeastOnce,
                        false,
                        ack.to_string(),
                    )
                    .await;
            }
        }));
        self.client = Some(mqtt);
    }

    /// Changes local state behind the controller's back and reports it.
    pub async fn tamper(&self, key: &str, value: Value) {
        self.state
            .lock()
            .expect("lock")
            .insert(key.to_owned(), value);
        if let Some(c) = &self.client {
            report(c, &self.id, &self.state, &self.version).await;
        }
    }

    pub fn disconnect_abruptly(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.client = None;
    }

    pub fn get(&self, key: &str) -> Option<Value> {
        self.state.lock().expect("lock").get(key).cloned()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn report(
    client: &AsyncClient,
    id: &str,
    state: &Arc<Mutex<State>>,
    version: &Arc<Mutex<u64>>,
) {
    let body = {
        let mut v = version.lock().expect("lock");
        *v += 1;
        json!({"version": *v, "state": state.lock().expect("lock").clone()})
    };
    client
        .publish(
            format!("devices/{id}/reported"),
            QoS::AtLeastOnce,
            false,
            body.to_string(),
        )
        .await
        .expect("report");
}

/// A stored document record targeting device `d1`, as the store tests
/// write it.
pub fn doc(name: &str, generation: u64) -> cityplane_controller::model::DocRecord {
    cityplane_controller::model::DocRecord {
        name: name.into(),
        target: cityplane_proto::messages::Target::Ids(cityplane_proto::messages::IdList {
            ids: vec!["d1".into()],
        }),
        priority: 0,
        state: Default::default(),
        generation,
        seq: generation,
        author: "op".into(),
        org: None,
        written_at: 0,
        history: Vec::new(),
    }
}
