//! Is the controller loop still responsive while documents are applied?
//! (issue 8, finding 4: every accepted document used to recompute the
//! desired state of every device against every document.)
//!
//! Broker and controller run in-process as `cityplane serve` runs them, on
//! their own tokio runtime (2 workers); the clients are on another. All
//! traffic is MQTT over mutual TLS on 127.0.0.1.
//!
//! 1. Setup: a controller-role loader reports N devices (class
//!    `streetlight`, label `zone` one of 20).
//! 2. Apply, R rounds: an operator applies D documents one after the other
//!    (each answered, i.e. fsynced, before the next); three quarters target
//!    K ids each, the rest a zone. Meanwhile a second operator asks `status`
//!    every 12 ms and times each answer (each
//!    client stays under the broker's 100 publishes/s, so at most ~80
//!    documents/s are applied). Round 1 creates the documents,
//!    later rounds change them.
//! 3. Label churn: the loader reports every device twice more with another
//!    zone (each report moves the device to other documents), at a steady
//!    `--churn-rate` reports/s, while the prober keeps timing `status`.
//!
//! `cargo bench -p cityplane-controller --bench apply_load [-- --devices N
//! --documents D --ids-per-document K --rounds R --churn-rate C]` (defaults
//! 10,000, 200, 50, 3, 5,000). Target: `status` p99 <= 100 ms while documents are applied.
//! Prints a summary and `BENCH_JSON {…}`; writes target/bench/apply_load.json.

#[path = "../tests/it/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use cityplane_broker::{Broker, BrokerConfig, Limits};
use cityplane_certs::Pki;
use cityplane_controller::{Controller, ControllerConfig};
use cityplane_proto::Role;
use cityplane_testkit::{bench, machine};
use common::Client;
use serde_json::{json, Value};
use tokio::sync::Mutex;

const ZONES: usize = 20;
/// The broker disconnects a client above 100 publishes a second: the prober
/// and the applier each stay below it.
const PROBE_EVERY: Duration = Duration::from_millis(12);
const APPLY_EVERY: Duration = Duration::from_millis(12);
const TARGET_P99_MS: f64 = 100.0;

struct Options {
    devices: usize,
    documents: usize,
    ids_per_document: usize,
    rounds: usize,
    churn_rate: usize,
}

fn options() -> Result<Options> {
    let mut o = Options {
        devices: 10_000,
        documents: 200,
        ids_per_document: 50,
        rounds: 3,
        churn_rate: 5_000,
    };
    bench::parse_args(std::env::args().skip(1), |key, value| {
        let slot = match key {
            "--devices" => &mut o.devices,
            "--documents" => &mut o.documents,
            "--ids-per-document" => &mut o.ids_per_document,
            "--rounds" => &mut o.rounds,
            "--churn-rate" => &mut o.churn_rate,
            _ => return Ok(false),
        };
        *slot = value()?.parse()?;
        Ok(true)
    })?;
    Ok(o)
}

fn device(i: usize) -> String {
    format!("dev{i:05}")
}

/// Latencies in ms: count, p50, p99, max.
fn percentiles(mut ms: Vec<f64>) -> Value {
    if ms.is_empty() {
        return json!({"count": 0});
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    json!({"count": ms.len(), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": ms[ms.len() - 1]})
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times `status` every PROBE_EVERY until `stop`; returns the latencies in ms.
async fn probe(prober: Arc<Mutex<Client>>, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut prober = prober.lock().await;
    let mut ms = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let answer = prober.request("fleet/ops/status", json!({})).await;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(answer["status"], "ok", "{answer}");
        tokio::time::sleep(PROBE_EVERY).await;
    }
    ms
}

/// Reports counted so far (fresh and stale).
async fn counted(op: &mut Client) -> u64 {
    let s = op.query("status", json!({})).await;
    s["counters"]["reports"].as_u64().unwrap_or(0)
        + s["counters"]["stale_reports"].as_u64().unwrap_or(0)
}

/// Every device reports once at `version`, in zone `(i + version) % ZONES`,
/// at `rate` reports/s (0: as fast as they go); returns when the controller
/// has counted `until` reports.
async fn report_all(
    loader: &Client,
    op: &mut Client,
    o: &Options,
    version: u64,
    rate: usize,
    until: u64,
) {
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut next = tokio::time::Instant::now();
    for i in 0..o.devices {
        if rate > 0 && i % per_tick == 0 {
            tokio::time::sleep_until(next).await;
            next += TICK;
        }
        let body = json!({"version": version, "state": {"class": "streetlight",
            "labels": {"zone": format!("z{}", (i + version as usize) % ZONES)}}});
        loader
            .publish(&format!("devices/{}/reported", device(i)), body.to_string())
            .await;
    }
    let t = Instant::now();
    while counted(op).await < until {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "reports not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn document(o: &Options, j: usize, round: usize) -> Value {
    let target = if j % 4 == 3 {
        json!({"labels": {"zone": format!("z{}", j % ZONES)}})
    } else {
        // Spread over the fleet, overlapping other documents.
        let ids: Vec<String> = (0..o.ids_per_document)
            .map(|k| device((j * 37 + k * 211) % o.devices))
            .collect();
        json!({"ids": ids})
    };
    json!({"name": format!("doc{j:03}"), "target": target, "priority": j % 7,
           "state": {format!("k{j}"): round}})
}

fn main() -> Result<()> {
    let started = Instant::now();
    let o = options()?;
    let root = bench::target_dir().join("bench");
    std::fs::create_dir_all(&root)?;
    let pki_dir = root.join("apply-load-pki");
    let pki = match Pki::open(&pki_dir) {
        Ok(pki) if pki.ca_key_path().exists() => pki,
        _ => Pki::init(&pki_dir, true)?,
    };
    for (role, id) in [
        (Role::Operator, "op"),
        (Role::Operator, "probe"),
        (Role::Controller, "load"),
    ] {
        if pki.current_cert(id)?.is_none() {
            pki.issue(role, id)?;
        }
    }
    let data = tempfile::tempdir()?;

    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("server")
        .enable_all()
        .build()?;
    let (broker, controller) = server_rt.block_on(async {
        let broker = Broker::start_closed(BrokerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            pki: pki_dir.clone(),
            limits: Limits::default(),
            firmware_dir: None,
        })
        .await?;
        // The loader reports for devices without certificates: no PKI check.
        let config = ControllerConfig::new(data.path().join("db"));
        let controller = Controller::start_in_process(&broker, config).await?;
        anyhow::Ok((broker, controller))
    })?;
    let addr = broker.local_addr();

    let clients_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = clients_rt.block_on(async {
        let mut op = Client::connect(addr, &pki_dir, "op", &["fleet/responses/op/#"], None).await;
        let prober = Arc::new(Mutex::new(
            Client::connect(addr, &pki_dir, "probe", &["fleet/responses/probe/#"], None).await,
        ));
        let loader = Client::connect(addr, &pki_dir, "load", &[], None).await;
        let n = o.devices as u64;

        // 1. The fleet.
        let t = Instant::now();
        report_all(&loader, &mut op, &o, 1, 0, n).await;
        let setup_s = t.elapsed().as_secs_f64();
        eprintln!("{} devices reported in {setup_s:.1} s", o.devices);

        // 2. Documents applied while `status` is timed.
        let mut rounds = Vec::new();
        for round in 1..=o.rounds {
            let stop = Arc::new(AtomicBool::new(false));
            let probing = tokio::spawn(probe(prober.clone(), stop.clone()));
            let t = Instant::now();
            let mut apply_ms = Vec::new();
            for j in 0..o.documents {
                let a = Instant::now();
                let answer = op.apply(document(&o, j, round)).await;
                assert_eq!(answer["status"], "accepted", "{answer}");
                apply_ms.push(a.elapsed().as_secs_f64() * 1e3);
                tokio::time::sleep(APPLY_EVERY.saturating_sub(a.elapsed())).await;
            }
            let seconds = t.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let status = percentiles(probing.await.expect("prober"));
            let apply = percentiles(apply_ms);
            eprintln!("round {round}: {} documents in {seconds:.2} s; status {status}; apply {apply}", o.documents);
            rounds.push(json!({"round": round, "seconds": seconds,
                "documents_per_sec": o.documents as f64 / seconds, "status": status, "apply": apply}));
        }

        // 3. Every device moves zone on every report.
        let stop = Arc::new(AtomicBool::new(false));
        let probing = tokio::spawn(probe(prober.clone(), stop.clone()));
        let t = Instant::now();
        report_all(&loader, &mut op, &o, 2, o.churn_rate, 2 * n).await;
        report_all(&loader, &mut op, &o, 3, o.churn_rate, 3 * n).await;
        let churn_s = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let churn_status = percentiles(probing.await.expect("prober"));
        eprintln!("label churn: {} reports in {churn_s:.2} s; status {churn_status}", 2 * n);

        op.close().await;
        loader.close().await;
        json!({"setup_s": setup_s, "rounds": rounds,
               "churn": {"reports": 2 * n, "seconds": churn_s, "reports_per_sec": 2.0 * n as f64 / churn_s, "status": churn_status}})
    });
    server_rt.block_on(async {
        let _ = controller.shutdown().await;
        broker.shutdown().await;
    });

    let p99s: Vec<f64> = report["rounds"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|r| r["status"]["p99_ms"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    let rates: Vec<f64> = report["rounds"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|r| r["documents_per_sec"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    let (p99, rate) = (median(p99s), median(rates));
    let churn = &report["churn"];
    let m = machine::describe();
    println!(
        "apply_load on {} cores ({}), {} devices, {} documents ({} ids each or a zone), {} rounds",
        m["nproc"], m["cpu_model"], o.devices, o.documents, o.ids_per_document, o.rounds
    );
    println!(
        "  status while applying, median of the rounds' p99: {p99:.1} ms [target <= {TARGET_P99_MS} ms] {}",
        if p99 <= TARGET_P99_MS { "PASS" } else { "MISS" }
    );
    println!("  documents applied (answered, fsynced), median round: {rate:.0}/s");
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "  label churn at {}/s offered: {:.0} reports/s counted; status p50 {:.1} ms, p99 {:.1} ms [target <= {TARGET_P99_MS} ms]",
        o.churn_rate,
        ms(&churn["reports_per_sec"]),
        ms(&churn["status"]["p50_ms"]),
        ms(&churn["status"]["p99_ms"])
    );
    let json = json!({"bench": "apply_load", "machine": m, "devices": o.devices, "documents": o.documents,
        "ids_per_document": o.ids_per_document, "churn_rate": o.churn_rate, "target_status_p99_ms": TARGET_P99_MS,
        "status_p99_ms_median": p99, "documents_per_sec_median": rate, "detail": report});
    bench::write_result(&root, "apply_load", &json, started)
}
