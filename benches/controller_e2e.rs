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
//! `cargo bench -p cityplane --bench controller_e2e [-- --devices N]
//! [--reports R] [--reports-only] [--reports-via devices [--device-burst]]`: N devices
//! (default 10,000), R reports each (default 10); `--reports-only` skips
//! phase 2.
//!
//! Phase 1's default loaders are controller-role clients on their own router
//! links: they bypass the device ingress and its backlog credit (they pace
//! themselves instead). `--reports-via devices` measures the device path
//! instead: N device connections (each with its own certificate) first
//! connect, then each publishes its own R `devices/<id>/reported` (QoS 1)
//! through the broker's edge, ingress queue and backlog credit, one at a
//! time (the next after the PUBACK; `--device-burst`: all R at once); the
//! clock runs from that start until the controller has persisted all of
//! them. The bench process then holds N sockets, the server N more (each
//! under the 20,000 open-files limit per process); they are closed before
//! phase 2's simulated fleet connects. Server RSS is sampled
//! every 20 ms through phase 1 (peak and end), so `--devices 100000
//! --reports 3 --reports-only` measures the controller's memory at 100,000
//! devices (phase 2 needs one connection per device, at most ~15,000).
//! `CITYPLANE_BENCH_PERF=FILE` records the server with `perf` during phase 1.
//! Prints a summary and `BENCH_JSON {…}`; writes target/bench/controller_e2e.json.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cityplane::client::{tls_config, ConnectArgs, Operator};
use cityplane_agent_sim::{Fleet, PresenceMode, SimConfig};
use cityplane_certs::Pki;
use cityplane_proto::Role;
use cityplane_testkit::machine;
use cityplane_testkit::process::{cpu_time, machine_cpu, rss_kib, ChildGuard};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
const LOADERS: usize = 4;

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

/// What phase 1 over device connections measured.
struct ViaDevices {
    connected: usize,
    connect_s: f64,
    /// Reports the devices queued (offered) and flushed to their sockets.
    offered: u64,
    /// PUBACKs the devices received: reports the broker accepted.
    acked: u64,
    /// Devices whose connection failed or closed during the phase.
    errors: u64,
    /// Start → every device had written all its reports (offered).
    offered_s: f64,
}

/// Phase 1 through real device connections. Returns the clock's start (all
/// devices connected, none has published yet), a handle that ends when
/// every device has its PUBACKs, the stop signal (closes the connections)
/// and the numbers filled in as it runs.
async fn via_devices(
    pki_dir: &Path,
    port: u16,
    devices: usize,
    reports: u64,
    burst: bool,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Sender<bool>,
    Arc<ViaCounters>,
    Vec<tokio::task::JoinHandle<()>>,
    f64,
) {
    use cityplane_agent_sim::mqtt::{server_name, Client, ConnectOptions, Packet};
    use cityplane_agent_sim::tls::TlsBase;
    let pki = Pki::open(pki_dir).expect("pki");
    let t = Instant::now();
    let ids = cityplane_agent_sim::device_ids("dev", devices);
    let tls: Vec<_> = {
        let ids = ids.clone();
        tokio::task::spawn_blocking(move || {
            let base = TlsBase::from_ca_file(&pki.ca_cert_path()).expect("ca");
            ids.iter()
                .map(|id| {
                    base.identity(&pki.cert_path(id), &pki.key_path(id))
                        .expect("device identity")
                        .config
                })
                .collect()
        })
        .await
        .expect("identities")
    };
    eprintln!(
        "{devices} device identities loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let name = server_name("localhost").expect("server name");
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let counters = Arc::new(ViaCounters::default());
    let connecting = Arc::new(tokio::sync::Semaphore::new(200));
    let t_connect = Instant::now();
    let mut tasks = Vec::with_capacity(devices);
    for (id, tls) in ids.into_iter().zip(tls) {
        let (name, counters, connecting) = (name.clone(), counters.clone(), connecting.clone());
        let (mut go, mut stop) = (go_rx.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let opts = ConnectOptions {
                client_id: &id,
                keep_alive: 0,
                clean_session: true,
                will: None,
            };
            let mut client = None;
            for _ in 0..5 {
                let permit = connecting.acquire().await;
                match Client::connect(addr, name.clone(), tls.clone(), &opts, Duration::from_secs(30)).await {
                    Ok(c) => {
                        client = Some(c);
                        break;
                    }
                    Err(e) => {
                        drop(permit);
                        eprintln!("{id}: connect: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            let Some(mut client) = client else {
                counters.errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            counters.connected.fetch_add(1, Ordering::Relaxed);
            while !*go.borrow() {
                if go.changed().await.is_err() {
                    return;
                }
            }
            let topic = format!("devices/{id}/reported");
            // Burst: all R queued at once. Otherwise one at a time: the next
            // report after the PUBACK of the previous one.
            let per_write = if burst { reports } else { 1 };
            let mut version = 0;
            let mut acked = 0;
            while acked < reports {
                if version == acked {
                    for _ in 0..per_write {
                        version += 1;
                        let body = json!({"version": version, "state": {"class": "streetlight", "labels": {"zone": "north"}, "dimming": version}});
                        client.queue_publish(&topic, body.to_string().as_bytes(), 1, false);
                    }
                    counters.offered.fetch_add(per_write, Ordering::Relaxed);
                    if client.flush().await.is_err() {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    if version == reports {
                        counters.flushed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match tokio::time::timeout(Duration::from_secs(600), client.recv()).await {
                    Ok(Ok(Packet::PubAck(_))) => {
                        acked += 1;
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(_)) => {}
                    _ => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
            client.disconnect().await;
        }));
    }
    while counters.connected.load(Ordering::Relaxed) + counters.errors.load(Ordering::Relaxed)
        < devices as u64
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    (go, stop, counters, tasks, connect_s)
}

#[derive(Default)]
struct ViaCounters {
    connected: AtomicU64,
    offered: AtomicU64,
    flushed: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

async fn run() {
    let devices = arg("--devices", 10_000);
    let reports_per_device = arg("--reports", 10).max(1) as u64;
    let converge_phase = !std::env::args().any(|a| a == "--reports-only");
    let root = cityplane_testkit::bench::target_dir().join("bench");
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
    let (server, addr) = cityplane_testkit::bench::start_cityplane_serve(
        Path::new(BIN),
        &pki_dir,
        data.path(),
        &root.join("controller_e2e-serve.log"),
    )
    .expect("serve");
    let port = addr.port();
    let pid = server.pid();
    let connect = ConnectArgs {
        server: addr.to_string(),
        pki: pki_dir.clone(),
        id: "op".into(),
        timeout: 30,
    };
    let mut op = Operator::connect_retrying(&connect, Duration::from_secs(10))
        .await
        .expect("server up");
    let rss_idle = rss_kib(pid);

    // 1. Reported updates persisted per second.
    let via_mode = std::env::args()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "--reports-via" && w[1] == "devices");
    let total_reports = devices as u64 * reports_per_device;
    let phase1 = if via_mode {
        let burst = std::env::args().any(|a| a == "--device-burst");
        phase1_devices(
            &mut op,
            &pki_dir,
            port,
            pid,
            devices,
            reports_per_device,
            burst,
        )
        .await
    } else {
        phase1_loaders(&mut op, &pki_dir, port, pid, devices, reports_per_device).await
    };
    let Phase1 {
        counted,
        persisted_in,
        publish_done,
        rss_peak,
        via,
        cpu_elsewhere,
    } = phase1;
    let reports_per_sec = counted as f64 / persisted_in.as_secs_f64();
    if counted < total_reports {
        eprintln!("INCOMPLETE: only {counted} of {total_reports} reports persisted");
    }
    let rss_after_reports = rss_kib(pid);

    // 2. One apply → every simulated device converged.
    let phase2 = if converge_phase {
        Some(converge(&mut op, &pki_dir, port, pid, devices).await)
    } else {
        None
    };
    op.disconnect().await;
    drop(server);

    let cpu = machine::cpu_model().unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    // Busy CPU outside the two processes above 10 % of the window (at least
    // 0.1 s: /proc/stat counts in 10 ms ticks) means other work ran.
    let disturbed = cpu_elsewhere > (persisted_in / 10).max(Duration::from_millis(100));
    let burst = std::env::args().any(|a| a == "--device-burst");
    let path = if via.is_some() && burst {
        "device connections (device certificates, edge ingress, backlog credit), each device's reports in one burst"
    } else if via.is_some() {
        "device connections (device certificates, edge ingress, backlog credit), one report in flight per device"
    } else {
        "4 controller-role loaders (own router links: no device ingress, no backlog credit)"
    };
    let machine = machine::describe();
    println!("controller_e2e on {nproc} cores ({cpu}), {devices} devices, server and load in separate processes");
    println!("  machine: {machine}");
    println!("  reports via {path}");
    if let Some(v) = &via {
        println!(
            "  devices connected          : {} of {devices} in {:.1} s (before the clock); errors {}",
            v.connected, v.connect_s, v.errors
        );
        println!(
            "  reports offered (written by the devices): {} in {:.2} s = {:.0}/s; PUBACKs received {}",
            v.offered,
            v.offered_s,
            v.offered as f64 / v.offered_s.max(1e-9),
            v.acked
        );
    }
    println!("  reported updates received and persisted: {counted} in {:.2} s = {reports_per_sec:.0}/s (offering took {:.2} s) [target >= 50,000/s]", persisted_in.as_secs_f64(), publish_done.as_secs_f64());
    println!(
        "  CPU used outside the bench and the server meanwhile: {:.2} s{}",
        cpu_elsewhere.as_secs_f64(),
        if disturbed {
            " (DISTURBED: other work on the machine)"
        } else {
            ""
        }
    );
    println!(
        "  server RSS: idle {rss_idle} KiB; reports phase peak {rss_peak} KiB, end {rss_after_reports} KiB ({:.1} KiB per device above idle)",
        rss_after_reports.saturating_sub(rss_idle) as f64 / devices as f64
    );
    let converge_json = match &phase2 {
        Some(c) => {
            println!(
                "  simulated fleet connected  : {devices} in {:.1} s (all online: {})",
                c.connect_s, c.all_online
            );
            println!("  apply acknowledged (fsync) : {:.1} ms", c.acked_ms);
            println!(
                "  apply -> every device applied: {:.2} s; -> controller converged: {:.2} s [target <= 3 s]",
                c.devices_applied_s, c.converged_s
            );
            println!(
                "  server RSS: fleet connected {} KiB, end {} KiB",
                c.rss_connected, c.rss_end
            );
            println!(
                "  simulator: commands applied {}, replays ignored {}",
                c.commands_applied, c.ignored_replays
            );
            json!({"connect_s": c.connect_s, "apply_ack_ms": c.acked_ms, "devices_applied_s": c.devices_applied_s,
                   "controller_converged_s": c.converged_s, "target_s": 3.0,
                   "rss_connected_kib": c.rss_connected, "rss_end_kib": c.rss_end})
        }
        None => json!(null),
    };
    let report = json!({
        "bench": "controller_e2e", "devices": devices, "reports_per_device": reports_per_device, "nproc": nproc, "cpu": cpu,
        "machine": machine,
        "reports_via": if via.is_some() { "devices" } else { "controller-loaders" },
        "device_burst": via.is_some() && burst,
        "reports": {"persisted": counted, "seconds": persisted_in.as_secs_f64(), "persisted_per_sec": reports_per_sec,
                    "offered_seconds": publish_done.as_secs_f64(), "target_per_sec": 50000,
                    "cpu_elsewhere_s": cpu_elsewhere.as_secs_f64(), "disturbed": disturbed},
        "devices_path": via.as_ref().map(|v| json!({"connected": v.connected, "connect_s": v.connect_s, "offered": v.offered,
                    "offered_per_sec": v.offered as f64 / v.offered_s.max(1e-9), "pubacks_received": v.acked, "errors": v.errors})),
        "converge": converge_json,
        "server_rss_kib": {"idle": rss_idle, "reports_peak": rss_peak, "after_reports": rss_after_reports},
    });
    println!("BENCH_JSON {report}");
    let _ = std::fs::write(
        root.join("controller_e2e.json"),
        serde_json::to_vec_pretty(&report).unwrap_or_default(),
    );
}

/// Phase 1's numbers.
struct Phase1 {
    /// Reports the controller counted (persisted: a status answer waits for
    /// the commit covering them).
    counted: u64,
    persisted_in: Duration,
    /// Start → everything offered (queued by the loaders or written by the
    /// devices).
    publish_done: Duration,
    rss_peak: u64,
    via: Option<ViaDevices>,
    /// Machine CPU used outside the bench and the server while the clock ran.
    cpu_elsewhere: Duration,
}

/// CPU so far: the machine's, the bench's, the server's.
fn cpu_mark(pid: u32) -> (Duration, Duration, Duration) {
    (machine_cpu().0, cpu_time("self"), cpu_time(pid))
}

/// Machine CPU since `mark` that neither the bench nor the server used.
fn cpu_elsewhere_since(mark: (Duration, Duration, Duration), pid: u32) -> Duration {
    let now = cpu_mark(pid);
    now.0
        .saturating_sub(mark.0)
        .saturating_sub(now.1.saturating_sub(mark.1))
        .saturating_sub(now.2.saturating_sub(mark.2))
}

/// Phase 1 with controller-role loaders on their own router links (they
/// bypass the device ingress and its backlog credit).
async fn phase1_loaders(
    op: &mut Operator,
    pki_dir: &Path,
    port: u16,
    pid: u32,
    devices: usize,
    reports_per_device: u64,
) -> Phase1 {
    let mut loaders = Vec::new();
    for n in 0..LOADERS {
        loaders.push(Arc::new(loader(port, pki_dir, &format!("load{n}")).await));
    }
    let total_reports = devices as u64 * reports_per_device;
    let perf = std::env::var("CITYPLANE_BENCH_PERF").ok().map(|out| {
        ChildGuard::new(
            Command::new("perf")
                .args(["record", "-F", "499", "--call-graph", "dwarf,32768"])
                .args(["-p", &pid.to_string(), "-o", &out])
                .stderr(Stdio::null())
                .spawn()
                .expect("perf"),
        )
    });
    // The loaders publish as a controller identity on their own router links,
    // which the broker's device backlog limit does not cover (devices'
    // publishes are), so they keep at most WINDOW reports unread themselves:
    // rumqttd drops the oldest part of a full log (16 MiB ≈ 100,000 reports).
    const WINDOW: u64 = 40_000;
    let published = Arc::new(AtomicU64::new(0));
    let counted_so_far = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_mark(pid);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (n, client) in loaders.iter().enumerate() {
        let client = client.clone();
        let (published, counted) = (published.clone(), counted_so_far.clone());
        tasks.push(tokio::spawn(async move {
            for version in 1..=reports_per_device {
                for d in (n..devices).step_by(LOADERS) {
                    while published.load(Ordering::Relaxed) > counted.load(Ordering::Relaxed) + WINDOW {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let id = format!("dev{:04}", d + 1);
                    let body = json!({"version": version, "state": {"class": "streetlight", "labels": {"zone": "north"}, "dimming": version}});
                    client
                        .publish(format!("devices/{id}/reported"), QoS::AtLeastOnce, false, body.to_string())
                        .await
                        .expect("publish");
                    published.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut publish_done = None;
    let mut last = json!(null);
    let mut rss_peak = 0;
    loop {
        rss_peak = rss_peak.max(rss_kib(pid));
        let s = op.query("status", json!({})).await.expect("status");
        let counted = s["counters"]["reports"].as_u64().unwrap_or(0)
            + s["counters"]["stale_reports"].as_u64().unwrap_or(0);
        counted_so_far.store(counted, Ordering::Relaxed);
        last = s;
        if publish_done.is_none() && tasks.iter().all(|t| t.is_finished()) {
            publish_done = Some(t.elapsed());
        }
        if counted >= total_reports || t.elapsed() > Duration::from_secs(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for task in tasks {
        task.await.expect("loader");
    }
    let publish_done = publish_done.unwrap_or_else(|| t.elapsed());
    let persisted_in = t.elapsed();
    let cpu_elsewhere = cpu_elsewhere_since(cpu0, pid);
    if let Some(mut p) = perf {
        // perf writes its file on SIGINT, not on the SIGKILL of ChildGuard.
        let _ = Command::new("kill")
            .args(["-INT", &p.pid().to_string()])
            .status();
        let _ = p.wait();
    }
    let counted = last["counters"]["reports"].as_u64().unwrap_or(0);
    for client in &loaders {
        let _ = client.disconnect().await;
    }
    Phase1 {
        counted,
        persisted_in,
        publish_done,
        rss_peak,
        via: None,
        cpu_elsewhere,
    }
}

/// Phase 1 through device connections: every device publishes its own
/// reports through the broker's device path (edge, ingress, backlog credit).
async fn phase1_devices(
    op: &mut Operator,
    pki_dir: &Path,
    port: u16,
    pid: u32,
    devices: usize,
    reports_per_device: u64,
    burst: bool,
) -> Phase1 {
    let total_reports = devices as u64 * reports_per_device;
    let (go, stop, c, tasks, connect_s) =
        via_devices(pki_dir, port, devices, reports_per_device, burst).await;
    let connected = c.connected.load(Ordering::Relaxed) as usize;
    eprintln!(
        "{connected} devices connected in {connect_s:.1} s (server fds: {})",
        fds(pid)
    );
    // The presence of every device (published by the broker) first.
    loop {
        let s = op.query("status", json!({})).await.expect("status");
        if s["online"].as_u64() >= Some(connected as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let base = {
        let s = op.query("status", json!({})).await.expect("status");
        s["counters"]["reports"].as_u64().unwrap_or(0)
            + s["counters"]["stale_reports"].as_u64().unwrap_or(0)
    };
    let cpu0 = cpu_mark(pid);
    let t = Instant::now();
    let _ = go.send(true);
    let mut publish_done = None;
    let mut rss_peak = 0;
    let counted = loop {
        rss_peak = rss_peak.max(rss_kib(pid));
        let s = op.query("status", json!({})).await.expect("status");
        let counted = (s["counters"]["reports"].as_u64().unwrap_or(0)
            + s["counters"]["stale_reports"].as_u64().unwrap_or(0))
        .saturating_sub(base);
        if publish_done.is_none()
            && c.flushed.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed)
                >= devices as u64
        {
            publish_done = Some(t.elapsed());
        }
        if counted >= total_reports || t.elapsed() > Duration::from_secs(600) {
            break counted;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let persisted_in = t.elapsed();
    let cpu_elsewhere = cpu_elsewhere_since(cpu0, pid);
    let publish_done = publish_done.unwrap_or(persisted_in);
    // Every PUBACK in (they may trail the commit), then close the connections.
    let t_acks = Instant::now();
    while c.acked.load(Ordering::Relaxed) < c.offered.load(Ordering::Relaxed)
        && c.errors.load(Ordering::Relaxed) == 0
        && t_acks.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    Phase1 {
        counted,
        persisted_in,
        publish_done,
        rss_peak,
        via: Some(ViaDevices {
            connected,
            connect_s,
            offered: c.offered.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            offered_s: publish_done.as_secs_f64(),
        }),
        cpu_elsewhere,
    }
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Phase 2's numbers.
struct Converge {
    connect_s: f64,
    all_online: bool,
    acked_ms: f64,
    devices_applied_s: f64,
    converged_s: f64,
    rss_connected: u64,
    rss_end: u64,
    commands_applied: u64,
    ignored_replays: u64,
}

/// Phase 2: `devices` simulated devices connect; one `apply` targets them all.
async fn converge(
    op: &mut Operator,
    pki_dir: &Path,
    port: u16,
    pid: u32,
    devices: usize,
) -> Converge {
    let mut sim = SimConfig::new(pki_dir, format!("localhost:{port}"), "dev", devices);
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
    Converge {
        connect_s,
        all_online,
        acked_ms,
        devices_applied_s,
        converged_s,
        rss_connected,
        rss_end,
        commands_applied: stats.commands_applied,
        ignored_replays: stats.ignored_replays,
    }
}
