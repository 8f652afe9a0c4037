//! The simulator against the real broker and controller (in one process, as
//! `cityplane serve` runs them), over mutual TLS on 127.0.0.1.

use std::time::{Duration, Instant};

use cityplane::client::{ConnectArgs, Operator};
use cityplane_agent_sim::scenario::{self, Scenario, ScenarioOptions};
use cityplane_agent_sim::{Fleet, PresenceMode, SimConfig};
use cityplane_broker::{Broker, BrokerConfig, RunningBroker};
use cityplane_certs::Pki;
use cityplane_controller::{Controller, ControllerConfig};
use cityplane_proto::Role;
use serde_json::{json, Value};

struct Setup {
    _dir: tempfile::TempDir,
    pki: std::path::PathBuf,
    broker: RunningBroker,
    controller: Controller,
}

async fn setup(prefix: &str, devices: usize) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    let pki = Pki::init(&pki_dir, false).expect("pki");
    pki.issue(Role::Operator, "op").expect("operator");
    pki.issue_bulk(Role::Device, prefix, devices, |_| {})
        .expect("devices");
    let broker = Broker::start_closed(BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        pki: pki_dir.clone(),
        limits: Default::default(),
    })
    .await
    .expect("broker");
    let mut cc = ControllerConfig::new(dir.path().join("data"));
    cc.pki = Some(pki_dir.clone());
    let controller = Controller::start_in_process(&broker, cc)
        .await
        .expect("controller");
    Setup {
        _dir: dir,
        pki: pki_dir,
        broker,
        controller,
    }
}

impl Setup {
    async fn operator(&self) -> Operator {
        Operator::connect(&ConnectArgs {
            server: self.broker.local_addr().to_string(),
            pki: self.pki.clone(),
            id: "op".into(),
            timeout: 10,
        })
        .await
        .expect("operator connects")
    }

    fn sim(&self, prefix: &str, devices: usize) -> SimConfig {
        let mut sim = SimConfig::new(
            &self.pki,
            format!("localhost:{}", self.broker.local_addr().port()),
            prefix,
            devices,
        );
        sim.presence = PresenceMode::Skip;
        sim.faults.reboot_time = (Duration::from_millis(100), Duration::from_millis(400));
        sim
    }

    async fn stop(self) {
        self.controller.shutdown().await.expect("controller stops");
        self.broker.shutdown().await;
    }
}

async fn status(op: &mut Operator, body: Value) -> Value {
    op.query("status", body).await.expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_mixed_devices_converge_even_when_some_reboot_mid_change() {
    let s = setup("sim", 200).await;
    let fleet = Fleet::start(s.sim("sim", 200)).await.expect("fleet");
    assert!(
        fleet.wait_online(200, Duration::from_secs(60)).await,
        "{:?}",
        fleet.stats()
    );
    let mut op = s.operator().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(&mut op, json!({})).await["total"] != 200 {
        assert!(
            Instant::now() < deadline,
            "controller never saw 200 devices"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for doc in [
        json!({"name": "baseline", "target": {"all": true}, "state": {"maintenance_window": "02:00-04:00"}}),
        json!({"name": "dim", "target": {"class": "streetlight"}, "priority": 5, "state": {"dimming": 40}}),
    ] {
        let name = doc["name"].as_str().expect("name").to_owned();
        let answer = op
            .request(&format!("fleet/desired/{name}"), doc)
            .await
            .expect("apply");
        assert_eq!(answer["status"], "accepted", "{answer}");
    }
    // Every tenth device reboots in the middle of the change.
    let ids = fleet.ids();
    for id in ids.iter().step_by(10) {
        assert!(fleet.reboot(id));
    }

    let window = json!("02:00-04:00");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (have, total) = fleet.count_with("maintenance_window", &window, None);
        let st = status(&mut op, json!({})).await;
        // The rebooted devices are back too (the change may well have
        // converged before they went down).
        let back = fleet.stats().reconnects >= 20 && st["online"] == 200;
        if have == total && st["pending"] == 0 && back {
            assert_eq!(st["failed"], 0, "{st}");
            assert_eq!(st["converged"], 200, "{st}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{have}/{total} devices changed, {} reconnects; controller: {st}",
            fleet.stats().reconnects
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lights = fleet.count_with(
        "dimming",
        &json!(40),
        Some(cityplane_agent_sim::Class::Streetlight),
    );
    assert_eq!(lights.0, lights.1, "every streetlight dimmed");
    let stats = fleet.shutdown().await;
    assert!(stats.reconnects >= 20, "the reboots happened: {stats:?}");
    op.disconnect().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_converge_report_parses_and_matches_the_controller() {
    let s = setup("rep", 60).await;
    let mut opts = ScenarioOptions::new(Scenario::Converge);
    opts.operator = Some("op".into());
    opts.set = Some(("dimming".into(), json!(33)));
    opts.id_prefix = Some("rep".into());
    opts.timeout = Duration::from_secs(60);
    let report = scenario::run(s.sim("rep", 60), opts, &indicatif::ProgressBar::hidden())
        .await
        .expect("scenario runs");
    let parsed: Value = serde_json::from_str(&serde_json::to_string(&report).expect("json"))
        .expect("report parses");
    assert_eq!(parsed["ok"], true, "{parsed:#}");
    let conv = &parsed["convergence"];
    let name = conv["name"].as_str().expect("document name").to_owned();
    let mut op = s.operator().await;
    let st = status(&mut op, json!({"name": name})).await;
    assert_eq!(
        conv["targeted"], st["total"],
        "report {conv} vs controller {st}"
    );
    assert_eq!(
        conv["converged"], st["converged"],
        "report {conv} vs controller {st}"
    );
    assert!(conv["converged"].as_u64() > Some(0));
    op.disconnect().await;
    s.stop().await;
}
