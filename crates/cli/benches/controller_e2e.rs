//! End-to-end controller benchmark (issue 3's numbers), against a real
//! `cityplane serve` process over mutual TLS on 127.0.0.1:
//!
//! 1. reported updates persisted per second: controller-role clients publish
//!    100,000 `devices/D/reported` updates (QoS 1) for 10,000 devices; the
//!    clock stops when an operator's `status` query shows all of them
//!    counted (a query is answered only after its batch is fsynced);
//! 2. apply → 10,000 simulated devices converged: the simulator (this
//!    process) runs 10,000 devices; one `apply` targets all of them; the
//!    clock stops when every device has the new value and the controller
//!    reports nothing pending.
//!
//! `cargo bench -p cityplane --bench controller_e2e [-- --devices N]`.
//! Prints a summary and `BENCH_JSON {…}`; writes target/bench/controller_e2e.json.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cityplane::client::{tls_config, ConnectArgs, Operator};
use cityplane_agent_sim::{Fleet, PresenceMode, SimConfig};
use cityplane_certs::Pki;
use cityplane_proto::Role;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
const LOADERS: usize = 4;
const REPORTS_PER_DEVICE: u64 = 10;

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn loader(port: u16, pki: &Path, id: &str) -> AsyncClient {
    let mut opts = MqttOptions::new(id, "localhost", port);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(500);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        tls_config(pki, id).expect("tls"),
    )));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.expect("connect") {
            break;
        }
    }
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let devices = arg("--devices", 10_000);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench");
    std::fs::create_dir_all(&root).expect("bench dir");
    let pki_dir = root.join("controller-pki");
    let pki = if pki_dir.join("ca.crt").exists() {
        Pki::open(&pki_dir).expect("pki")
    } else {
        Pki::init(&pki_dir, false).expect("pki")
    };
    for id in ["op"] {
        if pki.current_cert(id).expect("list").is_none() {
            pki.issue(Role::Operator, id).expect("operator");
        }
    }
    for n in 0..LOADERS {
        let id = format!("load{n}");
        if pki.current_cert(&id).expect("list").is_none() {
            pki.issue(Role::Controller, &id).expect("controller");
        }
    }
    let t = Instant::now();
    pki.issue_bulk(Role::Device, "dev", devices, |_| {})
        .expect("devices");
    eprintln!("certificates ready in {:.1} s", t.elapsed().as_secs_f64());

    let data = tempfile::tempdir().expect("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let log = std::fs::File::create(root.join("controller_e2e-serve.log")).expect("log");
    let server = KillOnDrop(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--pki")
            .arg(&pki_dir)
            .arg("--data")
            .arg(data.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve"),
    );
    let pid = server.0.id();
    let connect = ConnectArgs {
        server: format!("127.0.0.1:{port}"),
        pki: pki_dir.clone(),
        id: "op".into(),
        timeout: 30,
    };
    let mut op = None;
    for _ in 0..100 {
        if let Ok(o) = Operator::connect(&connect).await {
            op = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut op = op.expect("server up");
    let rss_idle = rss_kib(pid);

    // 1. Reported updates persisted per second.
    let mut loaders = Vec::new();
    for n in 0..LOADERS {
        loaders.push(Arc::new(loader(port, &pki_dir, &format!("load{n}")).await));
    }
    let total_reports = devices as u64 * REPORTS_PER_DEVICE;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (n, client) in loaders.iter().enumerate() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for version in 1..=REPORTS_PER_DEVICE {
                for d in (n..devices).step_by(LOADERS) {
                    let id = format!("dev{:04}", d + 1);
                    let body = json!({"version": version, "state": {"class": "streetlight", "labels": {"zone": "north"}, "dimming": version}});
                    client
                        .publish(format!("devices/{id}/reported"), QoS::AtLeastOnce, false, body.to_string())
                        .await
                        .expect("publish");
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("loader");
    }
    let publish_done = t.elapsed();
    let mut last = json!(null);
    loop {
        let s = op.query("status", json!({})).await.expect("status");
        let counted = s["counters"]["reports"].as_u64().unwrap_or(0)
            + s["counters"]["stale_reports"].as_u64().unwrap_or(0);
        last = s;
        if counted >= total_reports || t.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let persisted_in = t.elapsed();
    let counted = last["counters"]["reports"].as_u64().unwrap_or(0);
    let reports_per_sec = counted as f64 / persisted_in.as_secs_f64();
    for client in &loaders {
        let _ = client.disconnect().await;
    }
    let rss_after_reports = rss_kib(pid);

    // 2. One apply → every simulated device converged.
    let mut sim = SimConfig::new(&pki_dir, format!("localhost:{port}"), "dev", devices);
    sim.presence = PresenceMode::Skip;
    sim.connect_rate = 2000.0;
    sim.max_connecting = 200;
    let t_connect = Instant::now();
    let fleet = Fleet::start(sim).await.expect("fleet");
    let all_online = fleet.wait_online(devices, Duration::from_secs(180)).await;
    let connect_s = t_connect.elapsed().as_secs_f64();
    // Let the controller take in every device's fresh report first.
    loop {
        let s = op.query("status", json!({})).await.expect("status");
        if s["online"].as_u64() >= Some(devices as u64)
            || t_connect.elapsed() > Duration::from_secs(240)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = rss_kib(pid);
    let value = format!("bench-{}", std::process::id());
    let t_apply = Instant::now();
    let answer = op
        .request(
            "fleet/desired/bench",
            json!({"name": "bench", "target": {"all": true}, "state": {"maintenance_window": value}}),
        )
        .await
        .expect("apply");
    assert_eq!(answer["status"], "accepted", "{answer}");
    let acked_ms = t_apply.elapsed().as_secs_f64() * 1e3;
    let want = json!(value);
    let mut sim_done = None;
    loop {
        let (have, total) = fleet.count_with("maintenance_window", &want, None);
        if have == total && sim_done.is_none() {
            sim_done = Some(t_apply.elapsed());
        }
        if sim_done.is_some() {
            let s = op
                .query("status", json!({"name": "bench"}))
                .await
                .expect("status");
            if s["pending"] == 0 && s["total"].as_u64() >= Some(devices as u64) {
                break;
            }
        }
        if t_apply.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let converged_s = t_apply.elapsed().as_secs_f64();
    let devices_applied_s = sim_done.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    let rss_end = rss_kib(pid);
    let stats = fleet.shutdown().await;
    op.disconnect().await;
    drop(server);

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!("controller_e2e on {nproc} cores ({cpu}), {devices} devices, server and load in separate processes");
    println!("  reported updates persisted : {counted} in {:.2} s = {reports_per_sec:.0}/s (publishing took {:.2} s) [target >= 50,000/s]", persisted_in.as_secs_f64(), publish_done.as_secs_f64());
    println!(
        "  simulated fleet connected  : {devices} in {connect_s:.1} s (all online: {all_online})"
    );
    println!("  apply acknowledged (fsync) : {acked_ms:.1} ms");
    println!("  apply -> every device applied: {devices_applied_s:.2} s; -> controller converged: {converged_s:.2} s [target <= 3 s]");
    println!("  server RSS: idle {rss_idle} KiB, after reports {rss_after_reports} KiB, fleet connected {rss_connected} KiB, end {rss_end} KiB");
    println!(
        "  simulator: commands applied {}, replays ignored {}",
        stats.commands_applied, stats.ignored_replays
    );
    let report = json!({
        "bench": "controller_e2e", "devices": devices, "nproc": nproc, "cpu": cpu,
        "reports": {"count": counted, "seconds": persisted_in.as_secs_f64(), "per_sec": reports_per_sec, "target_per_sec": 50000},
        "converge": {"connect_s": connect_s, "apply_ack_ms": acked_ms, "devices_applied_s": devices_applied_s, "controller_converged_s": converged_s, "target_s": 3.0},
        "server_rss_kib": {"idle": rss_idle, "after_reports": rss_after_reports, "connected": rss_connected, "end": rss_end},
    });
    println!("BENCH_JSON {report}");
    let _ = std::fs::write(
        root.join("controller_e2e.json"),
        serde_json::to_vec_pretty(&report).unwrap_or_default(),
    );
}
