//! Devices that reboot, go offline, or sit on flaky links come back.

use crate::common;

use std::time::Duration;

use cityplane_agent_sim::{Backoff, DeviceSnapshot, Fleet};
use cityplane_proto::{topics, Role};
use common::{Env, WAIT};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebooted_offline_and_dropped_devices_come_back() {
    let env = Env::start("flt", 3, &[(Role::Controller, "ctl")]).await;
    let mut ctl = env.client("ctl", &["devices/+/presence"]).await;
    let mut config = env.sim("flt", 3);
    config.faults.reboot_time = (Duration::from_millis(20), Duration::from_millis(40));
    config.backoff.initial = Duration::from_millis(20);
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(3, WAIT).await);
    ctl.drain(Duration::from_millis(200)).await;

    assert!(fleet.reboot("flt0001"));
    assert!(fleet.take_offline("flt0002", Duration::from_millis(100)));
    assert!(fleet.drop_link("flt0003"));
    assert!(!fleet.reboot("nobody"));
    // Each one drops without DISCONNECT: the broker publishes its will.
    let mut offline = std::collections::BTreeSet::new();
    while offline.len() < 3 {
        let id = ctl
            .expect("presence offline", |t, v| {
                let (id, leaf) = topics::split_device_topic(t)?;
                (leaf == "presence" && v == &json!({"online": false})).then(|| id.to_owned())
            })
            .await;
        offline.insert(id);
    }
    assert!(
        fleet
            .wait_until(WAIT, |s| s.online == 3 && s.connects >= 6)
            .await,
        "{:?}",
        fleet.stats()
    );
    for id in fleet.ids() {
        assert_eq!(fleet.device(&id).expect("device").connects, 2, "{id}");
    }
    let stats = fleet.stats();
    assert_eq!((stats.reboots, stats.offline_episodes), (1, 1));
    assert_eq!(stats.failures.get("session lost: link dropped"), Some(&1));
    assert_eq!(stats.reconnects, 3);
    fleet.shutdown().await;
    env.broker.shutdown().await;
}

/// The waits between a device's recorded connection attempts, each with the
/// backoff step the policy prescribes for it: `n` = failed connects or lost
/// sessions in a row since the device was last online, minus one (the
/// device's `lost_in_row - 1`), as [`Backoff::delay`] takes it.
fn waits(d: &DeviceSnapshot) -> Vec<(u32, Duration)> {
    let mut out = Vec::new();
    let mut step: Option<u32> = None;
    for pair in d.attempts.windows(2) {
        let (prev, next) = (pair[0], pair[1]);
        let ended = prev.ended.expect("an attempt followed by another ended");
        step = if prev.online {
            Some(0)
        } else {
            Some(step.map_or(0, |s| s + 1))
        };
        out.push((step.unwrap_or(0), next.started - ended));
    }
    out
}

/// The shortest wait the policy allows before attempt step `n`: its delay is
/// drawn from the upper half of `initial × multiplier^n` (capped).
fn policy_min(b: &Backoff, n: u32) -> Duration {
    let base = b.initial.mul_f64(b.multiplier.powi(n as i32)).min(b.max);
    base / 2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_links_reconnect_after_the_policy_backoff_every_time() {
    let env = Env::start("flk", 2, &[]).await;
    let mut config = env.sim("flk", 2);
    // About one drop per device every 0.2 s.
    config.faults.link_drops_per_hour = 18_000.0;
    config.backoff.initial = Duration::from_millis(40);
    config.backoff.max = Duration::from_millis(160);
    let backoff = config.backoff.clone();
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(
        fleet.wait_until(WAIT, |s| s.reconnects >= 6).await,
        "{:?}",
        fleet.stats()
    );
    // Still coming back every time.
    assert!(fleet.wait_online(2, WAIT).await);
    let devices = fleet.device_states();
    let stats = fleet.shutdown().await;
    assert!(
        stats
            .failures
            .get("session lost: link dropped")
            .copied()
            .unwrap_or(0)
            >= 6
    );
    assert_eq!(stats.connect_failures, 0);
    // From the devices' own records: every reconnect came after at least
    // the wait the backoff policy prescribes for its step (a session that
    // got online restarts at step 0; one lost before that moves on a step).
    let mut observed = 0;
    for d in &devices {
        for (i, (step, wait)) in waits(d).into_iter().enumerate() {
            let min = policy_min(&backoff, step);
            assert!(
                wait >= min,
                "{}: reconnect {i} (step {step}) after {wait:?}, policy minimum {min:?}; {:?}",
                d.id,
                d.attempts
            );
            observed += 1;
        }
    }
    assert!(observed >= 6, "{observed} reconnect waits recorded");
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried_with_growing_backoff() {
    let env = Env::start("unr", 1, &[]).await;
    let mut config = env.sim("unr", 1);
    // Nothing listens here (the port was just released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    config.broker = format!("127.0.0.1:{port}");
    // Steps 40, 80, 160, 320 ms, then capped at 320 ms.
    config.backoff.initial = Duration::from_millis(40);
    config.backoff.max = Duration::from_millis(320);
    config.backoff.multiplier = 2.0;
    let backoff = config.backoff.clone();
    config.presence = cityplane_agent_sim::PresenceMode::Publish;
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_until(WAIT, |s| s.connect_failures >= 6).await);
    let device = fleet.device("unr0001").expect("device");
    let stats = fleet.shutdown().await;
    assert_eq!(stats.connects, 0);
    assert!(
        stats.failures.keys().any(|k| k.starts_with("connect: tcp")),
        "{:?}",
        stats.failures
    );
    // The device's recorded attempts: every failure moves the backoff on a
    // step, and each wait is at least the policy's minimum for its step.
    let waits = waits(&device);
    assert!(waits.len() >= 5, "{:?}", device.attempts);
    for (i, (step, wait)) in waits.iter().enumerate() {
        assert_eq!(*step, i as u32, "no attempt got online: {waits:?}");
        let min = policy_min(&backoff, *step);
        assert!(
            *wait >= min,
            "wait {i} = {wait:?}, policy minimum {min:?}: {waits:?}"
        );
    }
    // The waits grow: two steps on, the policy's minimum is the previous
    // maximum doubled (until the cap), so each wait exceeds the one two
    // attempts earlier.
    for i in 0..3 {
        assert!(
            waits[i + 2].1 > waits[i].1,
            "wait {} not longer than wait {i}: {waits:?}",
            i + 2
        );
    }
    env.broker.shutdown().await;
}
