//! Harness: a throwaway PKI, the cityplane broker on 127.0.0.1:0 (real
//! mutual TLS), and a test client with a controller certificate that plays
//! the controller (publishes commands, watches reports and acks).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cityplane_agent_sim::mqtt::{server_name, Client, ConnectOptions, Packet, SUBACK_FAILURE};
use cityplane_agent_sim::tls::TlsBase;
use cityplane_agent_sim::SimConfig;
use cityplane_broker::{Broker, BrokerConfig, Limits, RunningBroker};
use cityplane_certs::Pki;
use cityplane_proto::Role;
use tokio::sync::mpsc;

/// Every wait in these tests is bounded by this (generous: CI boxes are slow).
pub const WAIT: Duration = Duration::from_secs(30);

/// The `update` states a successful firmware update reports, in order.
pub const UPDATE_STATES: [&str; 6] = [
    "downloading",
    "verifying",
    "installing",
    "rebooting",
    "health-check",
    "done",
];

pub struct Env {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub broker: RunningBroker,
}

impl Env {
    /// A PKI with `devices` device certificates `{prefix}0001…`, plus the
    /// given extra identities, and a broker trusting it.
    pub async fn start(prefix: &str, devices: usize, extra: &[(Role, &str)]) -> Env {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,cityplane_broker=error".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::init(dir.path(), false).expect("pki");
        if devices > 0 {
            pki.issue_bulk(Role::Device, prefix, devices, |_| {})
                .expect("device certs");
        }
        for (role, id) in extra {
            pki.issue(*role, id).expect("issue");
        }
        let firmware_dir = dir.path().join("firmware");
        std::fs::create_dir(&firmware_dir).expect("firmware dir");
        let broker = Broker::start(BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            pki: dir.path().to_path_buf(),
            limits: Limits::default(),
            // Images devices fetch (`firmware_dir`), as the controller stores them.
            firmware_dir: Some(firmware_dir),
        })
        .await
        .expect("broker starts");
        Env { dir, pki, broker }
    }

    /// Where the broker serves firmware images from: `<sha256>` files.
    pub fn firmware_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("firmware")
    }

    pub fn addr(&self) -> SocketAddr {
        self.broker.local_addr()
    }

    /// A fleet configuration for `count` devices `{prefix}0001…` on this broker.
    pub fn sim(&self, prefix: &str, count: usize) -> SimConfig {
        let mut c = SimConfig::new(
            self.dir.path(),
            format!("127.0.0.1:{}", self.addr().port()),
            prefix,
            count,
        );
        c.connect_rate = 0.0;
        c
    }

    pub async fn client(&self, id: &str, filters: &[&str]) -> TestClient {
        TestClient::connect(self.addr(), self.dir.path(), id, filters).await
    }
}

/// A connected client: publishes what is sent on `out`, delivers every
/// received PUBLISH as (topic, payload).
pub struct TestClient {
    out: mpsc::UnboundedSender<(String, Vec<u8>)>,
    pub rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
}

impl TestClient {
    pub async fn connect(addr: SocketAddr, pki: &Path, id: &str, filters: &[&str]) -> TestClient {
        let base = TlsBase::from_ca_file(&pki.join("ca.crt")).expect("ca");
        let identity = base
            .identity(
                &pki.join(format!("{id}.crt")),
                &pki.join(format!("{id}.key")),
            )
            .expect("identity");
        let mut c = Client::connect(
            addr,
            server_name("127.0.0.1").expect("name"),
            identity.config,
            &ConnectOptions {
                client_id: id,
                keep_alive: 30,
                clean_session: true,
                will: None,
            },
            WAIT,
        )
        .await
        .expect("test client connects");
        for filter in filters {
            let pkid = c.subscribe(filter, 1).await.expect("subscribe");
            let codes = c
                .recv_until(WAIT, |p| match p {
                    Packet::SubAck { pkid: id, codes } if *id == pkid => Some(codes.clone()),
                    _ => None,
                })
                .await
                .expect("suback");
            assert_ne!(
                codes,
                vec![SUBACK_FAILURE],
                "subscription to {filter} refused"
            );
        }
        let (out, mut out_rx) = mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = out_rx.recv() => {
                        let Some((topic, payload)) = msg else { break };
                        if c.publish(&topic, &payload, 1, false).await.is_err() {
                            break;
                        }
                    }
                    packet = c.recv() => {
                        match packet {
                            Ok(Packet::Publish(p)) => {
                                if p.qos == 1 {
                                    c.queue_puback(p.pkid);
                                    if c.flush().await.is_err() {
                                        break;
                                    }
                                }
                                let _ = tx.send((p.topic, p.payload));
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
            }
        });
        TestClient { out, rx }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.out
            .send((topic.to_owned(), payload.into()))
            .expect("client task alive");
    }

    /// The next message for which `want` returns `Some`, skipping others.
    pub async fn expect<T>(
        &mut self,
        what: &str,
        mut want: impl FnMut(&str, &serde_json::Value) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.recv()).await;
            let (topic, payload) = match msg {
                Ok(Some(m)) => m,
                Ok(None) => panic!("client closed while waiting for {what}"),
                Err(_) => panic!("timed out waiting for {what}"),
            };
            let value: serde_json::Value =
                serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null);
            if let Some(t) = want(&topic, &value) {
                return t;
            }
        }
    }

    /// Whatever arrives within `quiet` of silence.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<(String, Vec<u8>)> {
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(quiet, self.rx.recv()).await {
            got.push(m);
        }
        got
    }
}
