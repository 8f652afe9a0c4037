//! Nothing cityplane-specific: the same devices against mosquitto configured
//! with the PKI's CA (`require_certificate`, `use_identity_as_username`).
//! Skipped when /usr/sbin/mosquitto (or `mosquitto` on PATH) is missing.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cityplane_agent_sim::{Fleet, SimConfig};
use cityplane_certs::Pki;
use cityplane_proto::messages::{Ack, AckStatus};
use cityplane_proto::{topics, Role};
use common::{TestClient, WAIT};
use serde_json::json;

fn mosquitto_binary() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

struct Mosquitto(Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_mosquitto(bin: &Path, pki: &Path) -> (Mosquitto, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let conf = format!(
        "per_listener_settings false\nallow_anonymous false\npersistence false\nuser root\n\
         listener {port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
         require_certificate true\nuse_identity_as_username true\n",
        ca = pki.join("ca.crt").display(),
        cert = pki.join("broker.crt").display(),
        key = pki.join("broker.key").display(),
    );
    let conf_path = pki.join("mosquitto.conf");
    std::fs::write(&conf_path, conf).expect("conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto starts");
    (Mosquitto(child), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_work_against_mosquitto_with_the_same_ca() {
    let Some(bin) = mosquitto_binary() else {
        eprintln!("skipping: mosquitto not installed");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(dir.path(), false).expect("pki");
    pki.issue_bulk(Role::Device, "mq", 5, |_| {})
        .expect("certs");
    pki.issue(Role::Controller, "ctl").expect("controller cert");
    let (_mosquitto, port) = start_mosquitto(&bin, dir.path());
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");

    // Wait for the listener.
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "mosquitto did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ctl = TestClient::connect(
        addr,
        dir.path(),
        "ctl",
        &["devices/+/presence", "devices/+/reported", "devices/+/acks"],
    )
    .await;
    let mut config = SimConfig::new(dir.path(), format!("127.0.0.1:{port}"), "mq", 5);
    // Other brokers do not announce presence: let the simulator find out.
    config.presence = cityplane_agent_sim::PresenceMode::Auto;
    config.mix = "streetlight=1".parse().expect("mix");
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(5, WAIT).await, "{:?}", fleet.stats());
    // mosquitto has no presence rule: devices announce themselves, per contract.
    assert_eq!(fleet.stats().presence, "devices");
    let mut online = BTreeSet::new();
    let mut reported = BTreeSet::new();
    while online.len() < 5 || reported.len() < 5 {
        let (id, leaf) = ctl
            .expect("presence and reports", |t, v| {
                let (id, leaf) = topics::split_device_topic(t)?;
                match leaf {
                    "presence" if v == &json!({"online": true}) => {
                        Some((id.to_owned(), "presence"))
                    }
                    "reported" => Some((id.to_owned(), "reported")),
                    _ => None,
                }
            })
            .await;
        if leaf == "presence" {
            online.insert(id);
        } else {
            reported.insert(id);
        }
    }
    ctl.publish(
        &topics::commands("mq0003"),
        json!({"id": "m-1", "generation": 1, "state": {"dimming": 12}}).to_string(),
    );
    let ack: Ack = ctl
        .expect("ack", |t, v| {
            (t == topics::acks("mq0003")).then(|| serde_json::from_value(v.clone()).expect("ack"))
        })
        .await;
    assert_eq!((ack.id.as_str(), ack.status), ("m-1", AckStatus::Applied));
    assert_eq!(fleet.value_of("mq0003", "dimming"), Some(Some(json!(12))));
    let stats = fleet.shutdown().await;
    assert_eq!(stats.sessions_lost, 0, "{:?}", stats.failures);
}
