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
        firmware_dir: None,
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
            cluster: false,
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
        // Long enough that polling `describe` for 20 devices, one query at a
        // time on a loaded machine, catches each of them while it is down.
        sim.faults.reboot_time = (Duration::from_millis(1500), Duration::from_millis(2500));
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
    // Down 1.5 to 2.5 s (`Setup::sim`): long enough for the loop below to
    // look at each one while it is, even while the 5,000-device tests run
    // beside it (300 to 600 ms missed 11 of 20 in CI).
    let sim = s.sim("sim", 200);
    let fleet = Fleet::start(sim).await.expect("fleet");
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

    // Every tenth device loses power when the change reaches it: it receives
    // the command, then reboots before applying or acknowledging it.
    let ids = fleet.ids();
    let rebooting: Vec<String> = ids.iter().step_by(10).cloned().collect();
    for id in &rebooting {
        assert!(fleet.reboot_on_next_command(id));
    }

    // Selectors match the registry: the installer registers what it installed.
    op.register(&fleet.manifest(), 250, |_| {})
        .await
        .expect("register");
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
    // The rebooting devices are pending at the controller while they are
    // down: it sent them the change and has no ack.
    let mut seen_pending = std::collections::BTreeSet::new();
    let window = json!("02:00-04:00");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for id in &rebooting {
            let down = |d: &cityplane_agent_sim::DeviceSnapshot| {
                d.reboots_before_applying == 1 && d.connects == 1 && !d.connected
            };
            if seen_pending.contains(id) || !fleet.device(id).is_some_and(|d| down(&d)) {
                continue;
            }
            let desc = op
                .query("describe", json!({"id": id}))
                .await
                .expect("describe");
            // Down before and after the answer: the answer describes the
            // controller's record while the device was rebooting.
            if fleet.device(id).is_some_and(|d| down(&d))
                && desc["converged"] == false
                && desc["delta"].as_object().is_some_and(|d| !d.is_empty())
            {
                seen_pending.insert(id.clone());
            }
        }
        let (have, total) = fleet.count_with("maintenance_window", &window, None);
        let st = status(&mut op, json!({})).await;
        let back = rebooting.iter().all(|id| {
            fleet
                .device(id)
                .is_some_and(|d| d.connects == 2 && d.online)
        });
        if have == total && st["pending"] == 0 && back && st["online"] == 200 {
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
    assert_eq!(
        seen_pending.len(),
        rebooting.len(),
        "the controller showed each rebooting device unconverged while it was down: {seen_pending:?}"
    );
    // From the devices' records: each rebooting device received the change
    // and rebooted before applying it (so while not converged), came back
    // (a second session), was sent the change again and applied it.
    for id in &rebooting {
        let d = fleet.device(id).expect("device");
        assert_eq!(
            d.reboots_before_applying, 1,
            "{id} rebooted mid-change: {d:?}"
        );
        assert_eq!(d.connects, 2, "{id} came back once: {d:?}");
        assert!(d.commands_received >= 2, "{id} got the change again: {d:?}");
        assert_eq!(d.state.get("maintenance_window"), Some(&window), "{id}");
    }
    let stats = fleet.shutdown().await;
    assert_eq!(stats.reconnects, 20, "only the 20 reboots: {stats:?}");
    assert_eq!(stats.reboots, 20, "{stats:?}");
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
    let report = scenario::run(s.sim("rep", 60), opts, &|_| {})
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
