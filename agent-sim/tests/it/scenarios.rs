//! The scenarios behind `agent-sim run`, small, against the in-process
//! broker. `converge` runs against a stand-in controller that follows the
//! contract (reads `fleet/desired/+`, commands the devices, answers on
//! `fleet/responses/<operator>/<request id>`).

use crate::common;

use std::time::Duration;

use cityplane_agent_sim::device_ids;
use cityplane_agent_sim::scenario::{self, Scenario, ScenarioOptions};
use cityplane_proto::{topics, Role};
use common::{Env, WAIT};
use serde_json::{json, Value};

fn opts(scenario: Scenario) -> ScenarioOptions {
    let mut o = ScenarioOptions::new(scenario);
    o.timeout = WAIT;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_reports_rate_latency_and_memory() {
    let env = Env::start("cs", 20, &[]).await;
    let mut config = env.sim("cs", 20);
    config.connect_rate = 200.0;
    let report = scenario::run(config, opts(Scenario::ConnectStorm), &|_| {})
        .await
        .expect("scenario");
    assert!(report.ok, "{report}");
    assert_eq!(report.connect.online, 20);
    assert_eq!(report.connect.time_to_online.count, 20);
    assert!(report.connect.rate_per_s > 0.0);
    assert!(report.memory.rss_online_kib > 0);
    assert_eq!(report.classes.values().sum::<usize>(), 20);
    // The JSON report carries the same.
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["connect"]["online"], json!(20));
    assert_eq!(json["scenario"], json!("connect-storm"));
    let text = report.to_string();
    assert!(text.contains("20/20 online"), "{text}");
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_wave_brings_everyone_back() {
    let env = Env::start("rw", 10, &[]).await;
    let mut config = env.sim("rw", 10);
    config.faults.reboot_time = (Duration::from_millis(10), Duration::from_millis(50));
    let mut o = opts(Scenario::RebootWave);
    o.wave = Duration::from_millis(100);
    o.reboot_fraction = 0.5;
    let report = scenario::run(config, o, &|_| {}).await.expect("scenario");
    assert!(report.ok, "{report}");
    let reboot = report.reboot.expect("reboot report");
    assert_eq!((reboot.rebooted, reboot.back_online), (5, 5));
    assert_eq!(reboot.time.count, 5);
    assert_eq!(report.stats.reboots, 5);
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogue_scenario_reports_refused_equals_attempted() {
    let env = Env::start("rg", 4, &[]).await;
    env.pki
        .issue_bulk(Role::Device, "evil", 1, |_| {})
        .expect("rogue cert");
    let mut config = env.sim("rg", 4);
    config.rogue_ids = device_ids("evil", 1);
    let report = scenario::run(config, opts(Scenario::Rogue), &|_| {})
        .await
        .expect("scenario");
    assert!(report.ok, "{report}");
    let rogue = report.rogue.as_ref().expect("rogue report");
    assert!(rogue.attempted >= 20);
    assert_eq!(rogue.refused, rogue.attempted);
    assert!(report.honest.as_ref().expect("honest").unaffected());
    assert!(report.to_string().contains("refused == attempted: yes"));
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converge_times_each_device_against_a_contract_controller() {
    let env = Env::start(
        "cv",
        6,
        &[(Role::Controller, "ctl"), (Role::Operator, "op")],
    )
    .await;
    let mut ctl = env
        .client("ctl", &["fleet/desired/+", "fleet/ops/register"])
        .await;
    let mut config = env.sim("cv", 6);
    config.mix = "streetlight=1".parse().expect("mix");
    let mut o = opts(Scenario::Converge);
    o.operator = Some("op".into());
    o.id_prefix = Some("cv".into());
    o.set = Some(("dimming".into(), json!(33)));
    let run = tokio::spawn(async move { scenario::run(config, o, &|_| {}).await });

    // The stand-in controller: the fleet registered with what the simulator
    // installed (selectors match the registry), then one desired document
    // in, commands out.
    let (rid, devices) = ctl
        .expect("a register request", |t, v| {
            (t == "fleet/ops/register")
                .then(|| Some((v["request_id"].as_str()?.to_owned(), v["devices"].clone())))
                .flatten()
        })
        .await;
    let devices = devices.as_array().expect("devices").clone();
    assert_eq!(devices.len(), 6, "{devices:?}");
    assert!(
        devices
            .iter()
            .all(|d| d["class"] == "streetlight" && d["labels"]["zone"].is_string()),
        "{devices:?}"
    );
    ctl.publish(
        &format!("fleet/responses/op/{rid}"),
        json!({"request_id": rid, "status": "ok", "result": {"registered": 6, "updated": 0, "total": 6}})
            .to_string(),
    );
    let (name, doc) = ctl
        .expect("a desired document", |t, v| {
            t.strip_prefix("fleet/desired/")
                .map(|n| (n.to_owned(), v.clone()))
        })
        .await;
    assert_eq!(doc["name"], json!(name));
    assert_eq!(
        doc["target"],
        json!({"class": "streetlight", "id_prefix": "cv"})
    );
    assert_eq!(doc["state"], json!({"dimming": 33}));
    let request_id = doc["request_id"].as_str().expect("request id").to_owned();
    for (i, id) in device_ids("cv", 6).iter().enumerate() {
        ctl.publish(
            &topics::commands(id),
            json!({"id": format!("c-{i}"), "generation": 1, "state": doc["state"]}).to_string(),
        );
    }
    ctl.publish(
        &format!("fleet/responses/op/{request_id}"),
        json!({"request_id": request_id, "status": "accepted", "name": name, "generation": 1, "devices": 6})
            .to_string(),
    );

    let report = run.await.expect("join").expect("scenario");
    assert!(report.ok, "{report}");
    let conv = report.convergence.expect("convergence");
    assert_eq!((conv.targeted, conv.converged), (6, 6));
    assert_eq!(conv.time.count, 6);
    assert_eq!(
        conv.response
            .as_ref()
            .and_then(|r| r.get("status"))
            .and_then(Value::as_str),
        Some("accepted")
    );
    assert_eq!(report.stats.commands_applied, 6);
    env.broker.shutdown().await;
}
