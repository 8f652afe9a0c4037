//! The dashboard at scale (issue 16's numbers), against a real `cityplane
//! serve --dashboard` process:
//!
//! 1. N devices (default 100,000, in 20 zones, 4 classes) registered from a
//!    manifest through the operator API; the server runs from an exported
//!    server directory (no ca.key), so reports need no device certificate;
//! 2. L controller-role loaders (default 4) publish reports on
//!    `devices/<id>/reported` at a paced R reports/s in total (default
//!    10,000), every device in turn, for the whole measurement;
//! 3. signed in with a link from `dashboard-login`, the bench times, over
//!    loopback HTTP, the fleet overview (`/`: `status` and `overview`, the
//!    counts by class, zone and owner) and pages of the device list
//!    (`/devices?page=P`, first, middle and last, and with a selector)
//!    `--runs` times each (default 7); medians and worst. The time is the
//!    client's from connect to the last byte on 127.0.0.1, so it is the
//!    server's time plus a loopback round trip.
//!
//! `cargo bench -p cityplane --bench dashboard [-- --devices N] [--rate R]
//! [--runs K]`. Prints a summary and `BENCH_JSON {…}`; writes
//! target/bench/dashboard.json.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cityplane::client::{tls_config, ConnectArgs, Operator};
use cityplane_certs::Pki;
use cityplane_proto::Role;
use cityplane_testkit::bench::{self, arg, median};
use cityplane_testkit::process::{cpu_time, machine_cpu, ChildGuard};
use cityplane_testkit::{http, machine};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
const LOADERS: usize = 4;
const OPERATOR: &str = "bench-city-op";

fn worst(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// One page, signed in: its time from connect to the last byte.
fn time_get(dash: &str, cookie: &str, path: &str) -> f64 {
    let t = Instant::now();
    let r = http::request(dash, "GET", path, &[("Cookie", cookie)], "").expect("request");
    let s = t.elapsed().as_secs_f64();
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    s
}

fn id_of(n: usize) -> String {
    format!("lamp{n:06}")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn loader(port: u16, pki: &Path, id: &str) -> AsyncClient {
    let mut opts = MqttOptions::new(id, "localhost", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(500);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_config(pki, id).expect("tls"),
    )));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.expect("connect") {
            break;
        }
    }
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

async fn run() {
    let started = Instant::now();
    let devices = arg("--devices", 100_000);
    let rate = arg("--rate", 10_000);
    let runs = arg("--runs", 7).max(1);
    let root = bench::target_dir().join("bench");
    std::fs::create_dir_all(&root).expect("bench dir");
    let work = tempfile::tempdir_in(&root).expect("work dir");
    let pki_dir = work.path().join("pki");
    let pki = Pki::init(&pki_dir, false).expect("pki");
    pki.issue(Role::Operator, OPERATOR).expect("operator");
    for n in 0..LOADERS {
        pki.issue(Role::Controller, &format!("load{n}"))
            .expect("loader");
    }
    let server_dir = work.path().join("server-pki");
    pki.export_server(&server_dir).expect("server directory");

    let mqtt = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let dash = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .to_string();
    let log = std::fs::File::create(root.join("dashboard-serve.log")).expect("log");
    let server = ChildGuard::new(
        Command::new(BIN)
            .args(["serve", "--listen", &mqtt.to_string(), "--dashboard", &dash])
            .arg("--pki")
            .arg(&server_dir)
            .arg("--data")
            .arg(work.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve"),
    );
    let pid = server.id();
    let connect = ConnectArgs {
        server: mqtt.to_string(),
        pki: pki_dir.clone(),
        id: OPERATOR.into(),
        timeout: 120,
        cluster: false,
    };
    let mut op = Operator::connect_retrying(&connect, Duration::from_secs(10))
        .await
        .expect("server up");

    // 1. The registry.
    let t = Instant::now();
    let classes = ["streetlight", "waste-bin", "camera", "air-quality"];
    let manifest: Vec<Value> = (1..=devices)
        .map(|n| {
            json!({"id": id_of(n), "class": classes[n % 4], "owner": "lighting-co",
                   "labels": {"zone": format!("z{:02}", n % 20)}})
        })
        .collect();
    op.register(&manifest, 500, |_| {}).await.expect("register");
    drop(manifest);
    eprintln!(
        "{devices} devices registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // 2. The load: paced reports from controller-role loaders.
    let sent = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for n in 0..LOADERS {
        let client = loader(mqtt.port(), &pki_dir, &format!("load{n}")).await;
        let (sent, stop) = (sent.clone(), stop.clone());
        let per_tick = (rate / LOADERS / 100).max(1);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut next = n;
            let mut version = 1u64;
            while !*stop.borrow() {
                tick.tick().await;
                for _ in 0..per_tick {
                    let body = json!({"version": version, "state": {"dimming": version % 100,
                                      "firmware": "1.4.2"}});
                    let topic = format!("devices/{}/reported", id_of(next + 1));
                    if client
                        .publish(topic, QoS::AtLeastOnce, false, body.to_string())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    next += LOADERS;
                    if next >= devices {
                        next = n;
                        version += 1;
                    }
                }
            }
        }));
    }
    // Steady state before measuring.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // 3. Sign in and time the pages.
    let link = op
        .query("dashboard-login", json!({}))
        .await
        .expect("a sign-in link");
    let url = link["url"].as_str().expect("url").to_owned();
    let path = url
        .strip_prefix(&format!("http://{dash}"))
        .expect("the dashboard's link")
        .to_owned();
    let signed = http::request(&dash, "GET", &path, &[], "").expect("sign in");
    assert_eq!(signed.status, 303, "{}", signed.body);
    let cookie = signed
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .expect("cookie")
        .to_owned();
    let status0 = op.query("status", json!({})).await.expect("status");
    let (sent0, at0) = (sent.load(Ordering::Relaxed), Instant::now());
    let (machine0, self0, server0) = (machine_cpu().0, cpu_time("self"), cpu_time(pid));
    let last = devices.div_ceil(50).saturating_sub(1);
    let pages: Vec<(String, String)> = vec![
        ("fleet overview".into(), "/".into()),
        ("devices, first page".into(), "/devices?page=0".into()),
        (
            "devices, middle page".into(),
            format!("/devices?page={}", last / 2),
        ),
        ("devices, last page".into(), format!("/devices?page={last}")),
        (
            "devices, selector zone=z07, page 10".into(),
            "/devices?page=10&selector=%7B%22labels%22%3A%7B%22zone%22%3A%22z07%22%7D%7D".into(),
        ),
    ];
    let mut results = Vec::new();
    for (what, path) in &pages {
        let mut times = Vec::new();
        for _ in 0..runs {
            let (dash, cookie, p) = (dash.clone(), cookie.clone(), path.clone());
            let t = tokio::task::spawn_blocking(move || time_get(&dash, &cookie, &p))
                .await
                .expect("timed");
            times.push(t);
        }
        results.push(
            json!({"page": what, "path": path, "median_s": median(times.clone()),
                            "worst_s": worst(&times), "runs_s": times}),
        );
    }
    let window = at0.elapsed().as_secs_f64();
    let offered = (sent.load(Ordering::Relaxed) - sent0) as f64 / window;
    let status1 = op.query("status", json!({})).await.expect("status");
    assert_eq!(status1["total"], devices, "{status1}");
    let persisted = (status1["counters"]["reports"].as_u64().unwrap_or(0) as f64
        - status0["counters"]["reports"].as_u64().unwrap_or(0) as f64)
        / window;
    let machine_s = (machine_cpu().0 - machine0).as_secs_f64();
    let bench_s = (cpu_time("self") - self0).as_secs_f64();
    let server_s = (cpu_time(pid) - server0).as_secs_f64();
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    op.disconnect().await;
    drop(server);

    let result = json!({
        "bench": "dashboard",
        "machine": machine::describe(),
        "devices": devices,
        "rate_target": rate,
        "reports_offered_per_s": offered,
        "reports_applied_per_s": persisted,
        "window_s": window,
        "cpu_s": {"machine": machine_s, "server": server_s, "bench": bench_s,
                  "elsewhere": machine_s - server_s - bench_s},
        "pages": results,
    });
    println!("\ndashboard, {devices} devices, under {offered:.0} reports/s offered ({persisted:.0}/s applied by the controller), cityplane serve on loopback");
    for r in &results {
        println!(
            "  {:<40} median {:>7.1} ms, worst {:>7.1} ms ({runs} runs)",
            r["page"].as_str().unwrap_or(""),
            r["median_s"].as_f64().unwrap_or(f64::NAN) * 1000.0,
            r["worst_s"].as_f64().unwrap_or(f64::NAN) * 1000.0
        );
    }
    println!(
        "  targets: overview <= 1 s, a device list page <= 200 ms; CPU during the window: \
         server {server_s:.1} s, bench {bench_s:.1} s, elsewhere {:.1} s of {window:.1} s x cores",
        machine_s - server_s - bench_s
    );
    bench::write_result(&root, "dashboard", &result, started).expect("result written");
}
