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
//! 3. **compliance** (issue 11): `cityplane policy apply -f` publishes a
//!    policy of P rules (default 30: benches/policy-30-rules.json) on the
//!    registry of never-connected devices (every rule on reported state
//!    fails closed, "not reported"); then `cityplane compliance --output
//!    json` (the CLI: process start, mTLS, the query) is timed C times
//!    (default 5), and the same query through the operator API (one
//!    connection, answer only) C times; medians.
//!
//! `cargo bench -p cityplane --bench registry [-- --devices N] [--runs R]
//! [--batch B] [--policy-rules P] [--compliance-calls C]` (`--policy-rules
//! 0` skips step 3); `CITYPLANE_BENCH_PERF=FILE` records the server with
//! `perf` during step 3's queries. Prints a summary and `BENCH_JSON {…}`; writes
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
        cluster: false,
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
    // 3. The security policy on the registry, then `compliance`.
    let compliance = compliance(&mut op, &pki_dir, &server_addr, work.path(), devices, pid).await;
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
        "compliance": compliance,
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
    if !compliance.is_null() {
        let c = &compliance;
        println!(
            "  policy of {} rules applied via `cityplane policy apply` in {:.3} s (CLI wall), its device records written {:.2} s later",
            c["policy_rules"], c["policy_apply_cli_s"].as_f64().unwrap_or(f64::NAN),
            c["policy_settle_s"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  `cityplane compliance --output json` on {devices} devices: {:.3} s median of {} CLI calls ({}) [target <= 1 s: {}]",
            c["cli_median_s"].as_f64().unwrap_or(f64::NAN),
            c["calls"],
            c["cli_s"],
            if c["cli_median_s"].as_f64().is_some_and(|s| s <= 1.0) { "PASS" } else { "MISS" }
        );
        println!(
            "  the same query through the operator API: {:.3} s median ({}); report: {} of {} compliant, {} violations",
            c["api_median_s"].as_f64().unwrap_or(f64::NAN),
            c["api_s"],
            c["report"]["compliant"],
            c["report"]["total"],
            c["report"]["violations_total"]
        );
    }
    bench::write_result(&root, "registry", &result, started).expect("result");
}

/// Step 3: a policy of `--policy-rules` rules published with the CLI, then
/// `compliance` timed through the CLI and through the operator API.
async fn compliance(
    op: &mut Operator,
    pki_dir: &Path,
    server_addr: &str,
    work: &Path,
    devices: usize,
    pid: u32,
) -> Value {
    let rules = arg("--policy-rules", 30);
    let calls = arg("--compliance-calls", 5).max(1);
    if rules == 0 {
        return Value::Null;
    }
    let mut policy: Value =
        serde_json::from_str(include_str!("policy-30-rules.json")).expect("policy JSON");
    if let Some(r) = policy["rules"].as_array_mut() {
        r.truncate(rules);
    }
    let rules = policy["rules"].as_array().map_or(0, Vec::len);
    let policy_path = work.join("policy.json");
    std::fs::write(
        &policy_path,
        serde_json::to_vec_pretty(&policy).expect("json"),
    )
    .expect("write");
    let cli = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.args(args)
            .args([
                "--output",
                "json",
                "--server",
                server_addr,
                "--id",
                "op-cli",
            ])
            .arg("--pki")
            .arg(pki_dir);
        c
    };
    let t = Instant::now();
    let file = format!("--file={}", policy_path.display());
    let out = cli(&["policy", "apply", &file])
        .output()
        .expect("policy apply");
    let apply_s = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "policy apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every device evaluated: wait for the records that changed to be written.
    let t = Instant::now();
    op.query("status", json!({})).await.expect("status");
    let settle_s = t.elapsed().as_secs_f64();
    // `CITYPLANE_BENCH_PERF=FILE`: the server under `perf record` while
    // the compliance queries run (not the policy apply before them).
    let perf = std::env::var("CITYPLANE_BENCH_PERF").ok().map(|out| {
        cityplane_testkit::process::ChildGuard::new(
            Command::new("perf")
                .args(["record", "-F", "499", "--call-graph", "dwarf,32768"])
                .args(["-p", &pid.to_string(), "-o", &out])
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("perf"),
        )
    });
    let mut cli_s = Vec::new();
    let mut report = Value::Null;
    for _ in 0..calls {
        let t = Instant::now();
        let out = cli(&["compliance"]).output().expect("compliance");
        cli_s.push(t.elapsed().as_secs_f64());
        assert!(
            out.status.success(),
            "compliance failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        report = serde_json::from_slice(&out.stdout).expect("compliance JSON");
        assert_eq!(report["total"], devices, "{}", report["total"]);
    }
    let mut api_s = Vec::new();
    for _ in 0..calls {
        let t = Instant::now();
        // The CLI's default: 20 violations listed.
        let r = op
            .query("compliance", json!({"limit": 20}))
            .await
            .expect("compliance");
        api_s.push(t.elapsed().as_secs_f64());
        assert_eq!(r["total"], devices, "{}", r["total"]);
    }
    if let Some(mut p) = perf {
        // perf writes its file on SIGINT, not on the SIGKILL of ChildGuard.
        let _ = Command::new("kill")
            .args(["-INT", &p.pid().to_string()])
            .status();
        let _ = p.wait();
    }
    let bytes = serde_json::to_vec(&report).map_or(0, |b| b.len());
    json!({
        "policy_rules": rules,
        "policy_apply_cli_s": apply_s,
        "policy_settle_s": settle_s,
        "calls": calls,
        "cli_s": cli_s,
        "cli_median_s": median(cli_s.clone()),
        "api_s": api_s,
        "api_median_s": median(api_s.clone()),
        "target_s": 1.0,
        "cli_target_met": median(cli_s.clone()) <= 1.0,
        "answer_bytes": bytes,
        "report": {"total": report["total"], "compliant": report["compliant"],
                   "violations_total": report["violations_total"],
                   "by_rule": report["by_rule"].as_array().into_iter().flatten()
                       .map(|r| json!({"rule": r["rule"], "violations": r["violations"]})).collect::<Vec<_>>()},
    })
}
