//! A fleet spread over several broker nodes (`--broker h:p,h:p`): device
//! `i` starts on node `i % n`, moves round-robin when its node fails it,
//! and goes back to its own node after a reboot. Two cityplane brokers on
//! the same PKI stand in for the nodes of a cluster.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cityplane_agent_sim::{Fleet, SimConfig, SimError};
use cityplane_broker::{Broker, BrokerConfig, Limits, RunningBroker};
use common::{Env, WAIT};

async fn start_broker(pki: &Path, listen: SocketAddr) -> RunningBroker {
    Broker::start(BrokerConfig {
        listen,
        pki: pki.to_path_buf(),
        limits: Limits::default(),
        firmware_dir: None,
    })
    .await
    .expect("second broker starts")
}

/// `env`'s broker and a second one: the fleet's two nodes.
async fn two_nodes(prefix: &str, devices: usize) -> (Env, RunningBroker, SimConfig) {
    let env = Env::start(prefix, devices, &[]).await;
    let second = start_broker(env.dir.path(), "127.0.0.1:0".parse().expect("addr")).await;
    let mut config = env.sim(prefix, devices);
    config.broker = format!(
        "127.0.0.1:{},127.0.0.1:{}",
        env.addr().port(),
        second.local_addr().port()
    );
    // Moving to the other node should not wait behind long backoffs.
    config.backoff.initial = Duration::from_millis(20);
    config.backoff.max = Duration::from_millis(200);
    config.faults.reboot_time = (Duration::from_millis(10), Duration::from_millis(20));
    (env, second, config)
}

fn per_node(fleet: &Fleet) -> Vec<usize> {
    fleet.stats().per_node.iter().map(|n| n.connected).collect()
}

/// Polls `broker`'s own count of sessions until it is `n`.
async fn broker_sessions_reach(broker: &RunningBroker, n: usize) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.sessions() != n {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_devices_over_two_nodes_are_three_on_each() {
    let (env, second, config) = two_nodes("spr", 6).await;
    let entries: Vec<String> = config.broker.split(',').map(str::to_owned).collect();
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(
        fleet
            .wait_until(WAIT, |s| s.online == 6
                && s.per_node.iter().map(|n| n.connected).eq([3, 3]))
            .await,
        "{:?}",
        fleet.stats().per_node
    );
    let stats = fleet.stats();
    let addrs: Vec<&str> = stats.per_node.iter().map(|n| n.addr.as_str()).collect();
    assert_eq!(addrs, entries, "per_node follows the list's order");
    // Each broker's own view agrees: nobody went anywhere else first.
    assert!(broker_sessions_reach(&env.broker, 3).await);
    assert!(broker_sessions_reach(&second, 3).await);
    assert_eq!(stats.connects, 6, "every device connected at its first try");
    fleet.shutdown().await;
    second.shutdown().await;
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_devices_move_to_the_survivor_and_go_home_after_a_reboot() {
    let (env, second, config) = two_nodes("mov", 6).await;
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(
        fleet
            .wait_until(WAIT, |s| s.online == 6
                && s.per_node.iter().map(|n| n.connected).eq([3, 3]))
            .await,
        "{:?}",
        fleet.stats().per_node
    );

    let second_addr = second.local_addr();
    second.shutdown().await;
    assert!(
        fleet
            .wait_until(WAIT, |s| s.online == 6
                && s.per_node.iter().map(|n| n.connected).eq([6, 0]))
            .await,
        "{:?} {:?}",
        fleet.stats().per_node,
        fleet.stats().failures
    );
    assert!(broker_sessions_reach(&env.broker, 6).await);

    // The node is back: a device rebooted (on purpose, not failed) tries
    // its own node first again. Devices 2, 4, 6 are the second node's.
    let second = start_broker(env.dir.path(), second_addr).await;
    for id in ["mov0002", "mov0004", "mov0006"] {
        assert!(fleet.reboot(id));
    }
    assert!(
        fleet
            .wait_until(WAIT, |s| s.online == 6
                && s.per_node.iter().map(|n| n.connected).eq([3, 3]))
            .await,
        "{:?}",
        per_node(&fleet)
    );
    assert!(broker_sessions_reach(&second, 3).await);
    fleet.shutdown().await;
    second.shutdown().await;
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_in_the_list_is_named() {
    let env = Env::start("bad", 2, &[]).await;
    let good = format!("127.0.0.1:{}", env.addr().port());
    for bad in ["127.0.0.1", "127.0.0.1:notaport", ""] {
        let mut config = env.sim("bad", 2);
        config.broker = format!("{good},{bad}");
        let err = Fleet::start(config)
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad:?} in the list was accepted"));
        match &err {
            SimError::Broker { addr, .. } => assert_eq!(addr, bad, "{err}"),
            other => panic!("{bad:?}: expected a broker address error, got {other}"),
        }
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
    env.broker.shutdown().await;
}

/// `agent-sim run` over two nodes: the JSON report counts each node's
/// devices, and a bad entry is an error naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_report_shows_each_nodes_devices() {
    let (env, second, config) = two_nodes("rep", 4).await;
    let report = env.dir.path().join("report.json");
    let run = |broker: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_agent-sim"))
            .args([
                "run",
                "--prefix",
                "rep",
                "--devices",
                "4",
                "--timeout-s",
                "30",
            ])
            .args([
                "--connect-rate",
                "0",
                "--presence",
                "skip",
                "--broker",
                broker,
            ])
            .arg("--pki")
            .arg(env.dir.path())
            .arg("--report")
            .arg(&report)
            .env_remove("CITYPLANE_SERVER")
            .output()
            .expect("agent-sim runs")
    };
    let out = tokio::task::block_in_place(|| run(&config.broker));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).expect("report")).expect("json");
    let nodes: Vec<(String, u64)> = json["connect"]["per_node"]
        .as_array()
        .expect("connect.per_node")
        .iter()
        .map(|n| {
            let addr = n["addr"].as_str().expect("addr").to_owned();
            (addr, n["connected"].as_u64().expect("connected"))
        })
        .collect();
    let entries: Vec<&str> = config.broker.split(',').collect();
    assert_eq!(
        nodes,
        [(entries[0].to_owned(), 2), (entries[1].to_owned(), 2)]
    );
    assert!(stdout.contains("  nodes       "), "{stdout}");

    let bad = format!("{},nowhere", config.broker);
    let out = tokio::task::block_in_place(|| run(&bad));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("\"nowhere\""), "{stderr}");
    second.shutdown().await;
    env.broker.shutdown().await;
}

/// A rogue whose own node is down makes its attempts on the next one: what
/// it tried is still answered (refused), not lost to the dead node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rogues_pass_a_dead_node_on_to_the_next() {
    let env = Env::start("rhn", 2, &[]).await;
    env.pki
        .issue_bulk(cityplane_proto::Role::Device, "rgn", 2, |_| {})
        .expect("rogue certs");
    // Nothing listens there any more: connection refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let mut config = env.sim("rhn", 2);
    config.broker = format!("127.0.0.1:{},{dead}", env.addr().port());
    config.backoff.initial = Duration::from_millis(20);
    config.rogue_ids = cityplane_agent_sim::device_ids("rgn", 2);
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(2, WAIT).await, "{:?}", per_node(&fleet));
    // rgn0002 starts on the dead node.
    let rogue = fleet.run_rogues().await;
    assert_eq!(rogue.unanswered, 0, "{:#?}", rogue.by_action);
    assert!(rogue.all_refused(), "{:?}", rogue.accepted_details);
    fleet.shutdown().await;
    env.broker.shutdown().await;
}
