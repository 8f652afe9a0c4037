//! Quarantine benchmark (issue 12), against a real `cityplane serve` over
//! mutual TLS on 127.0.0.1: N simulated devices (this process, each with
//! its own certificate) are registered, every fifth in lot `L-7`; one
//! `quarantine` of that lot (N/5 devices) is timed:
//!
//! - command: from sending `quarantine` to its answer;
//! - in effect: from the answer until the last quarantined device has seen
//!   its connection closed (the simulator's view; target ≤ 2 s);
//! - the others: how many are still connected on their first session, and
//!   how long a document then takes to converge on all of them (received:
//!   the controller's converged count).
//!
//! - then a rotation of the others' certificates (`cert-rotate`, waves of
//!   10 % / 90 %): from the command until every one of them has connected
//!   with a certificate made for its own new key (received: the rollout's
//!   succeeded count), and the server's CPU time over it.
//!
//! Each run issues a fresh PKI (a rotation replaces the devices'
//! certificates, which the next run's devices would no longer have).
//!
//! `cargo bench -p cityplane --bench quarantine [-- --devices N] [--runs R]`
//! (defaults 5,000 and 3). Prints a summary and `BENCH_JSON {…}`; writes
//! target/bench/quarantine.json.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cityplane::client::{ConnectArgs, Operator};
use cityplane_agent_sim::{Backoff, Fleet, PresenceMode, SimConfig};
use cityplane_testkit::bench::{self, target_dir};
use cityplane_testkit::machine;
use cityplane_testkit::process::cpu_time;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
const OPERATOR: &str = "bench-operator";

struct Args {
    devices: usize,
    runs: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        devices: 5_000,
        runs: 3,
    };
    bench::parse_args(std::env::args().skip(1), |key, value| {
        match key {
            "--devices" => a.devices = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--bench" => {}
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(a)
}

fn main() {
    let result = bench::block_on(run());
    bench::finish("quarantine", result);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct RunResult {
    command_s: f64,
    in_effect_after_answer_s: f64,
    quarantined: usize,
    others_on_first_session: usize,
    others: usize,
    others_converged_s: f64,
    rotation_s: f64,
    rotation_cpu_s: f64,
    rotated: u64,
}

async fn run() -> Result<()> {
    let started = Instant::now();
    let a = args()?;
    let bench_dir = target_dir().join("bench");
    let dir = bench_dir.join("quarantine");
    std::fs::create_dir_all(&dir)?;
    let pki_dir = dir.join("pki");
    let mut runs = Vec::new();
    for i in 0..a.runs {
        eprintln!("\nrun {} of {}", i + 1, a.runs);
        let _ = std::fs::remove_dir_all(&pki_dir);
        let pki = bench::prepare_pki_verbose(&pki_dir, "dev", a.devices, "bench-controller")?;
        pki.issue(cityplane_proto::Role::Operator, OPERATOR)?;
        let r = once(&a, &pki_dir, &dir).await?;
        eprintln!(
            "  command {:.3} s; all {} cut {:.3} s after the answer; {} of {} others on their first session, converged in {:.2} s",
            r.command_s, r.quarantined, r.in_effect_after_answer_s, r.others_on_first_session, r.others, r.others_converged_s
        );
        eprintln!(
            "  rotation of {} certificates: {:.2} s, server CPU {:.2} s",
            r.rotated, r.rotation_s, r.rotation_cpu_s
        );
        runs.push(r);
    }
    let m = |f: fn(&RunResult) -> f64| median(runs.iter().map(f).collect());
    let result = json!({
        "bench": "quarantine",
        "machine": machine::describe(),
        "devices": a.devices,
        "quarantined": a.devices / 5,
        "runs": a.runs,
        "median": {
            "command_s": m(|r| r.command_s),
            "in_effect_after_answer_s": m(|r| r.in_effect_after_answer_s),
            "others_on_first_session": m(|r| r.others_on_first_session as f64),
            "others_converged_s": m(|r| r.others_converged_s),
            "rotation_s": m(|r| r.rotation_s),
            "rotation_server_cpu_s": m(|r| r.rotation_cpu_s),
        },
        "runs_detail": runs.iter().map(|r| json!({
            "command_s": r.command_s, "in_effect_after_answer_s": r.in_effect_after_answer_s,
            "quarantined": r.quarantined, "others": r.others,
            "others_on_first_session": r.others_on_first_session,
            "others_converged_s": r.others_converged_s,
            "rotation_s": r.rotation_s, "rotation_server_cpu_s": r.rotation_cpu_s,
            "rotated": r.rotated,
        })).collect::<Vec<_>>(),
    });
    let md = &result["median"];
    println!(
        "\nquarantine of {} of {} connected devices, medians of {}:",
        a.devices / 5,
        a.devices,
        a.runs
    );
    println!(
        "  command answered in {:.3} s; every quarantined device cut {:.3} s after the answer (target <= 2 s)",
        md["command_s"].as_f64().unwrap_or(0.0),
        md["in_effect_after_answer_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  the other {}: {} still on their first session; a document converged on all of them in {:.2} s",
        a.devices - a.devices / 5,
        md["others_on_first_session"],
        md["others_converged_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  then their certificates rotated (keys made on the devices, CSRs signed by the server): {:.2} s, server CPU {:.2} s",
        md["rotation_s"].as_f64().unwrap_or(0.0),
        md["rotation_server_cpu_s"].as_f64().unwrap_or(0.0)
    );
    bench::write_result(&bench_dir, "quarantine", &result, started)
}

async fn once(a: &Args, pki_dir: &Path, dir: &Path) -> Result<RunResult> {
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let (server, addr) =
        bench::start_cityplane_serve(Path::new(BIN), pki_dir, &data, &dir.join("serve.log"))?;
    let connect = ConnectArgs {
        server: addr.to_string(),
        pki: pki_dir.to_path_buf(),
        id: OPERATOR.to_owned(),
        timeout: 60,
        cluster: false,
    };
    let mut op = Operator::connect_retrying(&connect, Duration::from_secs(30)).await?;
    let mut sim = SimConfig::new(
        pki_dir,
        format!("localhost:{}", addr.port()),
        "dev",
        a.devices,
    );
    sim.presence = PresenceMode::Skip;
    sim.mix = "streetlight=1".parse().map_err(anyhow::Error::msg)?;
    sim.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        multiplier: 2.0,
    };
    let fleet = Fleet::start(sim).await.context("simulated fleet")?;
    if !fleet.wait_online(a.devices, Duration::from_secs(300)).await {
        bail!("the fleet did not come online");
    }
    let mut manifest = fleet.manifest();
    let mut suspect = HashSet::new();
    for (i, entry) in manifest.iter_mut().enumerate() {
        let lot = if (i + 1) % 5 == 0 { "L-7" } else { "L-1" };
        entry["labels"]["lot"] = json!(lot);
        if lot == "L-7" {
            suspect.insert(entry["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    op.register(&manifest, 500, |_| {}).await?;
    let connects: HashMap<String, u32> = fleet
        .device_states()
        .into_iter()
        .map(|d| (d.id, d.connects))
        .collect();

    let t0 = Instant::now();
    let r = op
        .query(
            "quarantine",
            json!({"target": {"labels": {"lot": "L-7"}}, "reason": "benchmark"}),
        )
        .await?;
    let answered = Instant::now();
    let quarantined = r["quarantined"].as_u64().unwrap_or(0) as usize;
    if quarantined != suspect.len() {
        bail!("quarantined {quarantined}, expected {}: {r}", suspect.len());
    }
    let in_effect = loop {
        let states = fleet.device_states();
        if states
            .iter()
            .filter(|d| suspect.contains(&d.id))
            .all(|d| !d.connected)
        {
            break answered.elapsed();
        }
        if answered.elapsed() > Duration::from_secs(60) {
            bail!("the quarantined devices were not all cut within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let states = fleet.device_states();
    let others: Vec<_> = states.iter().filter(|d| !suspect.contains(&d.id)).collect();
    let first_session = others
        .iter()
        .filter(|d| d.connected && d.connects == connects[&d.id])
        .count();

    let t1 = Instant::now();
    let doc = json!({"name": "after-incident", "target": {"class": "streetlight"},
                     "state": {"dimming": 35}});
    let answer = op
        .request(&cityplane_proto::topics::desired("after-incident"), doc)
        .await?;
    if answer["status"] != "accepted" {
        bail!("the document was refused: {answer}");
    }
    let converged_s = loop {
        let docs = op.query("get-documents", json!({})).await?;
        let row: Option<&Value> = docs["documents"]
            .as_array()
            .and_then(|d| d.iter().find(|r| r["name"] == "after-incident"));
        if let Some(row) = row {
            if row["targeted"].as_u64() == Some(others.len() as u64)
                && row["converged"] == row["targeted"]
            {
                break t1.elapsed().as_secs_f64();
            }
        }
        if t1.elapsed() > Duration::from_secs(300) {
            bail!("the others did not converge within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let pid = server.id();
    let cpu0 = cpu_time(pid);
    let t2 = Instant::now();
    op.query(
        "cert-rotate",
        json!({"name": "bench-rotate", "target": {"labels": {"lot": "L-1"}},
               "waves": [{"percent": 10}, {"percent": 90}], "success_threshold": 100}),
    )
    .await?;
    let rotated = loop {
        let st = op
            .query("rollout-status", json!({"name": "bench-rotate"}))
            .await?;
        let done = st["totals"]["succeeded"].as_u64().unwrap_or(0);
        if st["phase"] == "completed" && done as usize >= others.len() {
            break done;
        }
        if st["phase"] != "active" {
            bail!("the rotation stopped: {st}");
        }
        if t2.elapsed() > Duration::from_secs(600) {
            bail!("the rotation did not finish in 10 minutes: {st}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rotation_s = t2.elapsed().as_secs_f64();
    let rotation_cpu_s = (cpu_time(pid) - cpu0).as_secs_f64();
    op.disconnect().await;
    fleet.shutdown().await;
    drop(server);
    Ok(RunResult {
        rotation_s,
        rotation_cpu_s,
        rotated,
        command_s: (answered - t0).as_secs_f64(),
        in_effect_after_answer_s: in_effect.as_secs_f64(),
        quarantined,
        others_on_first_session: first_session,
        others: others.len(),
        others_converged_s: converged_s,
    })
}
