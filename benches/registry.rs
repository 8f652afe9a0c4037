//! The device registry at scale (issue 9's numbers), against a real
//! `cityplane serve` process over mutual TLS on 127.0.0.1:
//!
//! 1. **register**: `cityplane devices register -f manifest.json` (the CLI,
//!    as an operator runs it) registers N devices (default 100,000; half
//!    `zone=north`) that have never connected; the clock is the CLI
//!    process's wall time, from start to its last answer (every batch is
//!    fsynced and audited before it is answered);
//! 2. **apply**: an operator applies a document whose selector matches the
//!    N/2 north devices; the clock runs from the publish to the `accepted`
//!    answer (sent after the document is fsynced), which counts the devices
//!    targeted. Repeated `--runs` times (a new generation each), median;
//!    between runs the bench waits until the device records the apply
//!    changed are written (timed too), so each apply is measured on a
//!    server that is not still writing the previous one.
//!
//! `cargo bench -p cityplane --bench registry [-- --devices N] [--runs R]
//! [--batch B]`. Prints a summary and `BENCH_JSON {…}`; writes
//! target/bench/registry.json.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cityplane::client::{ConnectArgs, Operator};
use cityplane_certs::Pki;
use cityplane_proto::Role;
use cityplane_testkit::bench;
use cityplane_testkit::machine;
use cityplane_testkit::process::rss_kib;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let started = Instant::now();
    let devices = arg("--devices", 100_000);
    let runs = arg("--runs", 3).max(1);
    let batch = arg("--batch", 500);
    let root = bench::target_dir().join("bench");
    std::fs::create_dir_all(&root).expect("bench dir");
    let work = tempfile::tempdir_in(&root).expect("work dir");
    let pki_dir = work.path().join("pki");
    let pki = Pki::init(&pki_dir, false).expect("pki");
    // Two operators: an MQTT client id is one connection at a time.
    pki.issue(Role::Operator, "op").expect("operator");
    pki.issue(Role::Operator, "op-cli").expect("operator");

    // The manifest: keys made elsewhere, attributes from the installer.
    let manifest: Vec<Value> = (1..=devices)
        .map(|n| {
            let zone = if n % 2 == 0 { "north" } else { "south" };
            json!({"id": format!("lamp{n:06}"), "class": "streetlight",
                   "labels": {"zone": zone, "street": format!("s{}", n % 97)}, "owner": "lighting-co"})
        })
        .collect();
    let manifest_path = work.path().join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).expect("json")).expect("write");

    let (server, addr) = bench::start_cityplane_serve(
        Path::new(BIN),
        &pki_dir,
        &work.path().join("data"),
        &root.join("registry-serve.log"),
    )
    .expect("serve");
    let server_addr = addr.to_string();
    let pid = server.pid();
    let connect = ConnectArgs {
        server: server_addr.clone(),
        pki: pki_dir.clone(),
        id: "op".into(),
        timeout: 60,
    };
    let mut op = Operator::connect_retrying(&connect, Duration::from_secs(10))
        .await
        .expect("server up");
    let rss_before = rss_kib(pid);

    // 1. Register through the CLI.
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(["devices", "register", "--output", "json", "-f"])
        .arg(&manifest_path)
        .args([
            "--batch",
            &batch.to_string(),
            "--server",
            &server_addr,
            "--id",
            "op-cli",
        ])
        .arg("--pki")
        .arg(&pki_dir)
        .output()
        .expect("register");
    let register_s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "register failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registered: Value = serde_json::from_slice(&out.stdout).expect("register JSON");
    assert_eq!(registered["registered"], devices, "{registered}");
    let rss_after = rss_kib(pid);

    // 2. Apply to the north half, durably answered.
    let mut apply_s = Vec::new();
    // Apply answered → its device records written.
    let mut settle_s = Vec::new();
    for run in 0..runs {
        let doc = json!({"name": "north-dimming", "target": {"class": "streetlight", "labels": {"zone": "north"}},
                         "priority": 10, "state": {"dimming": 40 + run}});
        let t = Instant::now();
        let answer = op
            .request(&cityplane_proto::topics::desired("north-dimming"), doc)
            .await
            .expect("apply");
        apply_s.push(t.elapsed().as_secs_f64());
        assert_eq!(answer["status"], "accepted", "{answer}");
        assert_eq!(answer["devices"], devices / 2, "{answer}");
        // A query is answered after the commit that follows it: once the
        // 50,000 device records this apply changed are written, so the next
        // apply does not queue behind them (back to back, one waits for the
        // other's commit: see docs/BENCHMARKS.md).
        let t = Instant::now();
        op.query("status", json!({})).await.expect("status");
        settle_s.push(t.elapsed().as_secs_f64());
    }
    let status = op.query("status", json!({})).await.expect("status");
    op.disconnect().await;
    drop(server);

    let apply_median = median(apply_s.clone());
    let result = json!({
        "bench": "registry",
        "machine": machine::describe(),
        "devices": devices,
        "batch": batch,
        "register_s": register_s,
        "register_per_s": devices as f64 / register_s,
        "apply_targeted": devices / 2,
        "apply_answer_s": apply_s,
        "apply_answer_median_s": apply_median,
        "apply_records_written_s": settle_s,
        "registry_total": status["total"],
        "server_rss_kib": {"before": rss_before, "after_register": rss_after},
    });
    println!("\nregistry, {devices} devices (manifest, never connected), cityplane serve on loopback mTLS");
    println!(
        "  register via `cityplane devices register` (batches of {batch}): {register_s:.2} s ({:.0} devices/s; target <= 10 s)",
        devices as f64 / register_s
    );
    println!(
        "  apply to a selector matching {}: answered (durably) in {:.3} s median of {runs} (target <= 1 s)",
        devices / 2,
        apply_median
    );
    println!(
        "  then the {} device records it changed written in {:.2} s median",
        devices / 2,
        median(settle_s.clone())
    );
    println!(
        "  server RSS {} -> {} KiB ({:.1} KiB per registered device)",
        rss_before,
        rss_after,
        rss_after.saturating_sub(rss_before) as f64 / devices as f64
    );
    bench::write_result(&root, "registry", &result, started).expect("result");
}
