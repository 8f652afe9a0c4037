//! SIGKILL `cityplane serve` at random moments during a 200-device change:
//! after each restart the fleet converges, no acknowledged write is lost and
//! no device applies a command twice. Uses the real binary, the operator CLI
//! and the simulator, all over mutual TLS on 127.0.0.1.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cityplane_agent_sim::Fleet;
use cityplane_certs::Pki;
use cityplane_proto::Role;
use common::{cli, free_port, online_fleet, Server};
use serde_json::{json, Value};

const DEVICES: usize = 200;
const RUNS: usize = 20;

fn status(pki: &Path, port: u16) -> Option<Value> {
    let out = cli(pki, port, &["status", "--output", "json", "--timeout", "2"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

async fn wait_converged(fleet: &Fleet, value: &str, pki: &Path, port: u16, what: &str) {
    let want = json!(value);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (have, total) = fleet.count_with("maintenance_window", &want, None);
        let mut last = None;
        if have == total {
            last = status(pki, port);
            if let Some(s) = &last {
                if s["total"] == DEVICES && s["pending"] == 0 && s["failed"] == 0 {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {have}/{total} devices at {value} after 60 s; controller says {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_change_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir: PathBuf = dir.path().join("pki");
    let data = dir.path().join("data");
    let log = dir.path().join("serve.log");
    let pki = Pki::init(&pki_dir, false).expect("pki");
    pki.issue(Role::Operator, "op").expect("operator");
    pki.issue_bulk(Role::Device, "dev", DEVICES, |_| {})
        .expect("devices");
    let port = free_port();
    let mut server = Some(Server::start(&pki_dir, &data, port, &log, "warn"));

    let fleet = online_fleet(&pki_dir, port, DEVICES, Duration::from_secs(60)).await;

    // Seeded: the kill moments are the same on every run.
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    let mut acked_runs = 0;
    for run in 0..RUNS {
        let run_started = Instant::now();
        let value = format!("run-{run}");
        let doc_path = dir.path().join(format!("doc-{run}.json"));
        let doc = json!({"name": "crash", "target": {"all": true}, "state": {"maintenance_window": value}});
        std::fs::write(&doc_path, doc.to_string()).expect("doc");
        let doc_arg = doc_path.to_string_lossy().into_owned();

        // Apply and kill the server somewhere inside the change.
        let apply = cli(&pki_dir, port, &["apply", "-f", &doc_arg, "--timeout", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("apply");
        tokio::time::sleep(Duration::from_millis(rng.u64(..400))).await;
        if let Some(s) = server.take() {
            s.kill();
        }
        let acked = tokio::task::spawn_blocking(move || {
            let mut apply = apply;
            apply.wait().map(|s| s.success()).unwrap_or(false)
        })
        .await
        .expect("join");
        server = Some(Server::start(&pki_dir, &data, port, &log, "warn"));

        if acked {
            acked_runs += 1;
            // Acknowledged before the kill: it must survive without help.
            wait_converged(
                &fleet,
                &value,
                &pki_dir,
                port,
                &format!("run {run} (acknowledged)"),
            )
            .await;
        } else {
            // Not acknowledged: the operator retries, as a user would.
            let mut tries = 0;
            loop {
                let ok = cli(&pki_dir, port, &["apply", "-f", &doc_arg, "--timeout", "5"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
                tries += 1;
                assert!(tries < 50, "server never came back: see {}", log.display());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            wait_converged(
                &fleet,
                &value,
                &pki_dir,
                port,
                &format!("run {run} (re-applied)"),
            )
            .await;
        }
        eprintln!(
            "run {run}: acknowledged before kill: {acked}; converged after {:?}",
            run_started.elapsed()
        );
    }
    let stats = fleet.shutdown().await;
    drop(server);
    eprintln!(
        "{RUNS} kills, {acked_runs} acknowledged before the kill; commands applied {}, replays ignored {}",
        stats.commands_applied, stats.ignored_replays
    );
    // Every run changed every device exactly once.
    assert_eq!(
        stats.commands_applied,
        (DEVICES * RUNS) as u64,
        "each device applies each change exactly once (replays ignored: {})",
        stats.ignored_replays
    );
    assert!(
        acked_runs > 0 && acked_runs < RUNS || RUNS < 4,
        "kills should land both before and after the ack ({acked_runs}/{RUNS})"
    );
}
