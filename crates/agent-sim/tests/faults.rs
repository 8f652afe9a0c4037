//! Devices that reboot, go offline, or sit on flaky links come back.

mod common;

use std::time::Duration;

use cityplane_agent_sim::Fleet;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_links_reconnect_with_backoff() {
    let env = Env::start("flk", 2, &[]).await;
    let mut config = env.sim("flk", 2);
    // About one drop per device every 0.2 s.
    config.faults.link_drops_per_hour = 18_000.0;
    config.backoff.initial = Duration::from_millis(20);
    config.backoff.max = Duration::from_millis(100);
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(
        fleet.wait_until(WAIT, |s| s.reconnects >= 6).await,
        "{:?}",
        fleet.stats()
    );
    // Still coming back every time.
    assert!(fleet.wait_online(2, WAIT).await);
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
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_retried_with_backoff() {
    let env = Env::start("unr", 1, &[]).await;
    let mut config = env.sim("unr", 1);
    // Nothing listens here (the port was just released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    config.broker = format!("127.0.0.1:{port}");
    config.backoff.initial = Duration::from_millis(10);
    config.backoff.max = Duration::from_millis(50);
    config.presence = cityplane_agent_sim::PresenceMode::Publish;
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_until(WAIT, |s| s.connect_failures >= 3).await);
    let stats = fleet.shutdown().await;
    assert_eq!(stats.connects, 0);
    assert!(
        stats.failures.keys().any(|k| k.starts_with("connect: tcp")),
        "{:?}",
        stats.failures
    );
    env.broker.shutdown().await;
}
