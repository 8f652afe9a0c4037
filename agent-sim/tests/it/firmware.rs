//! Firmware updates: downloading → verifying → installing → rebooting (the
//! device disconnects and reconnects) → health-check → done.

use crate::common;

use std::time::Duration;

use cityplane_agent_sim::{FirmwareSim, Fleet, StepFailures};
use cityplane_proto::messages::{Ack, AckStatus, Reported};
use cityplane_proto::{topics, Role};
use common::{Env, TestClient};
use serde_json::{json, Value};

enum Seen {
    Report(Reported),
    Presence(Value),
    Ack(Ack),
}

async fn next(ctl: &mut TestClient, id: &str) -> Seen {
    let id = id.to_owned();
    ctl.expect("a message from the device", |t, v| {
        let (dev, leaf) = topics::split_device_topic(t)?;
        if dev != id {
            return None;
        }
        match leaf {
            "reported" => Some(Seen::Report(
                serde_json::from_value(v.clone()).expect("reported"),
            )),
            "presence" => Some(Seen::Presence(v.clone())),
            "acks" => Some(Seen::Ack(serde_json::from_value(v.clone()).expect("ack"))),
            _ => None,
        }
    })
    .await
}

/// Update states reported (above version `after`) until the ack; also
/// whether the will fired.
async fn follow_update(
    ctl: &mut TestClient,
    id: &str,
    after: u64,
) -> (Vec<String>, bool, Ack, Reported) {
    let mut states = Vec::new();
    let mut went_offline = false;
    let mut last = None;
    loop {
        match next(ctl, id).await {
            Seen::Report(r) if r.version <= after => {}
            Seen::Report(r) => {
                let s = r.state["update"]["state"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned();
                if states.last() != Some(&s) {
                    states.push(s);
                }
                last = Some(r);
            }
            Seen::Presence(v) => went_offline |= v == json!({"online": false}),
            Seen::Ack(a) => {
                return (
                    states,
                    went_offline,
                    a,
                    last.expect("a report before the ack"),
                )
            }
        }
    }
}

fn fast_config(env: &Env, prefix: &str) -> cityplane_agent_sim::SimConfig {
    let mut c = env.sim(prefix, 2);
    c.mix = "camera=1".parse().expect("mix");
    c.firmware = FirmwareSim::fast();
    c.faults.reboot_time = (Duration::from_millis(50), Duration::from_millis(100));
    c.backoff.initial = Duration::from_millis(50);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_runs_through_its_states_reboots_and_comes_back_new() {
    let env = Env::start("fw", 2, &[(Role::Controller, "ctl")]).await;
    let mut ctl = env
        .client(
            "ctl",
            &["devices/+/reported", "devices/+/acks", "devices/+/presence"],
        )
        .await;
    let fleet = Fleet::start(fast_config(&env, "fw")).await.expect("fleet");
    assert!(fleet.wait_online(2, common::WAIT).await);
    let id = "fw0001";
    let before = fleet.device(id).expect("device");
    assert_eq!(before.connects, 1);
    ctl.drain(Duration::from_millis(200)).await;

    ctl.publish(
        &topics::commands(id),
        json!({"id": "c-fw", "generation": 3, "state": {"firmware": "9.9.9", "manifest": {"sha256": "ab12", "signature": "unchecked"}}}).to_string(),
    );
    let (states, went_offline, ack, last) = follow_update(&mut ctl, id, before.version).await;
    assert_eq!(states, common::UPDATE_STATES);
    assert!(
        went_offline,
        "the reboot drops the connection, so the will fires"
    );
    assert_eq!(
        ack,
        Ack {
            id: "c-fw".into(),
            status: AckStatus::Applied,
            reason: None
        }
    );
    assert_eq!(last.state["firmware"], json!("9.9.9"));
    assert_eq!(last.state["update"]["from"], before.state["firmware"]);
    let after = fleet.device(id).expect("device");
    assert_eq!(after.state["firmware"], json!("9.9.9"));
    assert_eq!(after.connects, 2, "reconnected once after the reboot");
    assert_eq!(after.last_generation, 3);
    assert!(after.online);
    let stats = fleet.stats();
    assert_eq!(
        (
            stats.firmware.started,
            stats.firmware.succeeded,
            stats.firmware.failed
        ),
        (1, 1, 0)
    );
    assert_eq!(stats.reboots, 1);

    // The same version again is a no-op command: applied at once.
    let v = fleet.device(id).expect("device").version;
    ctl.publish(
        &topics::commands(id),
        json!({"id": "c-fw2", "generation": 4, "state": {"firmware": "9.9.9"}}).to_string(),
    );
    let (_, _, ack, _) = follow_update(&mut ctl, id, v).await;
    assert_eq!((ack.id.as_str(), ack.status), ("c-fw2", AckStatus::Applied));
    fleet.shutdown().await;
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_rejects_the_update_and_keeps_the_old_firmware() {
    let env = Env::start("fwf", 2, &[(Role::Controller, "ctl")]).await;
    let mut ctl = env
        .client("ctl", &["devices/+/reported", "devices/+/acks"])
        .await;
    let mut config = fast_config(&env, "fwf");
    config.firmware.failure = StepFailures {
        verify: 1.0,
        ..StepFailures::default()
    };
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(2, common::WAIT).await);
    let id = "fwf0002";
    let snap = fleet.device(id).expect("device");
    let old = snap.state["firmware"].clone();
    ctl.publish(
        &topics::commands(id),
        json!({"id": "c-bad", "generation": 1, "state": {"firmware": "9.9.9"}}).to_string(),
    );
    let (states, _, ack, last) = follow_update(&mut ctl, id, snap.version).await;
    assert_eq!(states, ["downloading", "verifying", "failed"]);
    assert_eq!(ack.status, AckStatus::Rejected);
    assert_eq!(
        ack.reason.as_deref(),
        Some("verification failed: bad image signature")
    );
    assert_eq!(last.state["firmware"], old);
    assert_eq!(last.state["update"]["step"], json!("verifying"));
    let stats = fleet.stats();
    assert_eq!((stats.firmware.failed, stats.reboots), (1, 0));
    assert_eq!(stats.firmware.by_outcome.get("failed: verifying"), Some(&1));
    fleet.shutdown().await;
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_mid_update_is_reported_after_the_device_returns() {
    let env = Env::start("fwr", 2, &[(Role::Controller, "ctl")]).await;
    let mut ctl = env
        .client("ctl", &["devices/+/reported", "devices/+/acks"])
        .await;
    let mut config = fast_config(&env, "fwr");
    config.faults.reboot_during_update = 1.0;
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(2, common::WAIT).await);
    let id = "fwr0001";
    let snap = fleet.device(id).expect("device");
    let old = snap.state["firmware"].clone();
    ctl.publish(
        &topics::commands(id),
        json!({"id": "c-pl", "generation": 1, "state": {"firmware": "9.9.9"}}).to_string(),
    );
    let (states, _, ack, last) = follow_update(&mut ctl, id, snap.version).await;
    assert_eq!(states.last().map(String::as_str), Some("failed"));
    assert_eq!(ack.status, AckStatus::Rejected);
    let reason = ack.reason.expect("reason");
    assert!(
        reason.starts_with("interrupted by a reboot during "),
        "{reason}"
    );
    assert_eq!(last.state["firmware"], old);
    // Online means the command subscription was granted, which can come
    // after the report published on reconnect.
    assert!(fleet.wait_online(2, common::WAIT).await);
    let after = fleet.device(id).expect("device");
    assert_eq!(after.connects, 2);
    assert!(after.online);
    assert_eq!(fleet.stats().firmware.failed, 1);
    fleet.shutdown().await;
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_during_an_update_are_handled() {
    let env = Env::start("fwc", 2, &[(Role::Controller, "ctl")]).await;
    let mut ctl = env
        .client("ctl", &["devices/+/reported", "devices/+/acks"])
        .await;
    let mut config = fast_config(&env, "fwc");
    // A slow download so commands arrive mid-update.
    config.firmware.size_kib = 6400;
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(2, common::WAIT).await);
    let id = "fwc0001";
    let cmd = topics::commands(id);
    ctl.publish(
        &cmd,
        json!({"id": "u-1", "generation": 2, "state": {"firmware": "7.0.0"}}).to_string(),
    );
    // Another target while updating: rejected.
    ctl.publish(
        &cmd,
        json!({"id": "u-2", "generation": 2, "state": {"firmware": "8.0.0"}}).to_string(),
    );
    // An unrelated setting: applied at once.
    ctl.publish(
        &cmd,
        json!({"id": "u-3", "generation": 2, "state": {"retention_days": 7}}).to_string(),
    );
    // A retry of the same update (new id): acknowledged with the first.
    ctl.publish(
        &cmd,
        json!({"id": "u-4", "generation": 2, "state": {"firmware": "7.0.0"}}).to_string(),
    );
    let mut acks = Vec::new();
    while acks.len() < 4 {
        if let Seen::Ack(a) = next(&mut ctl, id).await {
            acks.push((a.id, a.status));
        }
    }
    assert_eq!(
        acks,
        [
            ("u-2".to_owned(), AckStatus::Rejected),
            ("u-3".to_owned(), AckStatus::Applied),
            ("u-1".to_owned(), AckStatus::Applied),
            ("u-4".to_owned(), AckStatus::Applied),
        ]
    );
    let after = fleet.device(id).expect("device");
    assert_eq!(after.state["firmware"], json!("7.0.0"));
    assert_eq!(after.state["retention_days"], json!(7));
    fleet.shutdown().await;
    env.broker.shutdown().await;
}
