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
//! `CITYPLANE_BENCH_PERF=FILE` records the server with `perf` during phase 1,
//! `CITYPLANE_BENCH_PERF_CONVERGE=FILE` from the apply until converged.
//! Prints a summary and `BENCH_JSON {…}`; writes target/bench/controller_e2e.json.
//!
//! `--policy-rules P [--rounds K]` (issue 11) measures phase 1 only, with and
//! without a security policy of P rules (the first P of
//! benches/policy-30-rules.json, at most 30), K rounds of both arms in one
//! run (the order alternates each round), each arm on a fresh `cityplane
//! serve`. In both arms the N devices are registered first (class, zone and
//! owner, so class selectors match) and report an agent-sim-like state
//! (firmware, `security.services.*`, `security.ntp`, class keys: ~500 bytes
//! instead of phase 1's ~90, the same in both arms); the policy arm
//! publishes the policy (`policy-apply`) before the clock, so every report
//! is evaluated against the rules that apply to its device. Writes
//! target/bench/controller_e2e_policy-{devices,loaders}.json.

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
/// The operator identity, of the city's organisation (O=city). Not `op`: a
/// bench PKI kept from before organisations (target/bench/controller-pki)
/// has an `op` with O=cityplane, an organisation the controller does not
/// know, so its writes (`register`, `policy-apply`) are refused.
const OPERATOR: &str = "bench-city-op";

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
    rich: bool,
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
    for (index, (id, tls)) in ids.into_iter().zip(tls).enumerate() {
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
                match Client::connect(
                    addr,
                    name.clone(),
                    tls.clone(),
                    &opts,
                    Duration::from_secs(30),
                )
                .await
                {
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
                        let body = report_body(index, version, rich);
                        client.queue_publish(&topic, body.as_bytes(), 1, false);
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
    for id in [OPERATOR] {
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

    let policy_rules = arg("--policy-rules", 0);
    if policy_rules > 0 {
        compare_policy(&root, &pki_dir, devices, reports_per_device, policy_rules).await;
        return;
    }

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
        id: OPERATOR.into(),
        timeout: 30,
        cluster: false,
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
            false,
        )
        .await
    } else {
        phase1_loaders(
            &mut op,
            &pki_dir,
            port,
            pid,
            devices,
            reports_per_device,
            false,
        )
        .await
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
                "  apply -> every device applied: {:.2} s; -> controller converged: {:.2} s [issue 3: <= 3 s; issue 15: <= 0.5 s]",
                c.devices_applied_s, c.converged_s
            );
            println!(
                "  CPU from the apply to converged: server {:.2} s, bench (simulator) {:.2} s, elsewhere {:.2} s",
                c.cpu_server_s, c.cpu_bench_s, c.cpu_elsewhere_s
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
                   "controller_converged_s": c.converged_s, "target_s": 3.0, "issue15_target_s": 0.5,
                   "cpu_server_s": c.cpu_server_s, "cpu_bench_s": c.cpu_bench_s, "cpu_elsewhere_s": c.cpu_elsewhere_s,
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

/// `perf record` of the server into the file `var` names, when it is set.
fn perf_start(var: &str, pid: u32) -> Option<ChildGuard> {
    std::env::var(var).ok().map(|out| {
        ChildGuard::new(
            Command::new("perf")
                .args(["record", "-F", "499", "--call-graph", "dwarf,32768"])
                .args(["-p", &pid.to_string(), "-o", &out])
                .stderr(Stdio::null())
                .spawn()
                .expect("perf"),
        )
    })
}

fn perf_stop(perf: Option<ChildGuard>) {
    if let Some(mut p) = perf {
        // perf writes its file on SIGINT, not on the SIGKILL of ChildGuard.
        let _ = Command::new("kill")
            .args(["-INT", &p.pid().to_string()])
            .status();
        let _ = p.wait();
    }
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
    rich: bool,
) -> Phase1 {
    let mut loaders = Vec::new();
    for n in 0..LOADERS {
        loaders.push(Arc::new(loader(port, pki_dir, &format!("load{n}")).await));
    }
    let total_reports = devices as u64 * reports_per_device;
    let perf = perf_start("CITYPLANE_BENCH_PERF", pid);
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
                    while published.load(Ordering::Relaxed)
                        > counted.load(Ordering::Relaxed) + WINDOW
                    {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    let id = format!("dev{:04}", d + 1);
                    let body = report_body(d, version, rich);
                    client
                        .publish(
                            format!("devices/{id}/reported"),
                            QoS::AtLeastOnce,
                            false,
                            body,
                        )
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
    perf_stop(perf);
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
#[allow(clippy::too_many_arguments)] // the bench's knobs, passed as they are parsed
async fn phase1_devices(
    op: &mut Operator,
    pki_dir: &Path,
    port: u16,
    pid: u32,
    devices: usize,
    reports_per_device: u64,
    burst: bool,
    rich: bool,
) -> Phase1 {
    let total_reports = devices as u64 * reports_per_device;
    let (go, stop, c, tasks, connect_s) =
        via_devices(pki_dir, port, devices, reports_per_device, burst, rich).await;
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
    /// CPU seconds from the apply to converged: the server's, this
    /// process's (the simulated fleet), and the rest of the machine's.
    cpu_server_s: f64,
    cpu_bench_s: f64,
    cpu_elsewhere_s: f64,
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
    let perf = perf_start("CITYPLANE_BENCH_PERF_CONVERGE", pid);
    let cpu0 = cpu_mark(pid);
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
    let applied_before = fleet.stats().commands_applied;
    let mut sim_done = None;
    loop {
        // The simulator's counter is a few atomic loads; the scan that
        // confirms it locks 10,000 devices, so it runs only once the
        // counter says they are all there (scanning every 5 ms took ~13 %
        // of the machine from the server it measures).
        if sim_done.is_none() && fleet.stats().commands_applied >= applied_before + devices as u64 {
            let (have, total) = fleet.count_with("maintenance_window", &want, None);
            if have == total {
                sim_done = Some(t_apply.elapsed());
            }
        }
        // A `status` query walks every device in the server: asked only
        // once the devices are done, every 10 ms.
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
        let pause = if sim_done.is_some() { 10 } else { 2 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let converged_s = t_apply.elapsed().as_secs_f64();
    let cpu1 = cpu_mark(pid);
    let cpu_elsewhere = cpu_elsewhere_since(cpu0, pid).as_secs_f64();
    perf_stop(perf);
    let devices_applied_s = sim_done.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    let rss_end = rss_kib(pid);
    let stats = fleet.shutdown().await;
    Converge {
        connect_s,
        all_online,
        acked_ms,
        devices_applied_s,
        converged_s,
        cpu_server_s: cpu1.2.saturating_sub(cpu0.2).as_secs_f64(),
        cpu_bench_s: cpu1.1.saturating_sub(cpu0.1).as_secs_f64(),
        cpu_elsewhere_s: cpu_elsewhere,
        rss_connected,
        rss_end,
        commands_applied: stats.commands_applied,
        ignored_replays: stats.ignored_replays,
    }
}

/// The benchmark policy (benches/policy-30-rules.json), its first `n` rules.
fn bench_policy(n: usize) -> serde_json::Value {
    let mut policy: serde_json::Value =
        serde_json::from_str(include_str!("policy-30-rules.json")).expect("policy JSON");
    if let Some(rules) = policy["rules"].as_array_mut() {
        rules.truncate(n);
    }
    policy
}

/// Device `i`'s class (agent-sim's default mix: 60 % streetlights, 20 %
/// waste bins, 15 % cameras, 5 % air sensors), zone and owner.
fn device_attrs(i: usize) -> (&'static str, &'static str, &'static str) {
    const ZONES: [&str; 5] = ["north", "south", "east", "west", "center"];
    let (class, owner) = match i % 20 {
        0..=11 => ("streetlight", "lighting-co"),
        12..=15 => ("waste-bin", "waste-co"),
        16..=18 => ("camera", "camera-co"),
        _ => ("air-sensor", "air-co"),
    };
    (class, ZONES[(i / 20) % ZONES.len()], owner)
}

/// The registry entries of `devices` devices (`dev0001`, …).
fn manifest(devices: usize) -> Vec<serde_json::Value> {
    (0..devices)
        .map(|i| {
            let (class, zone, owner) = device_attrs(i);
            json!({"id": format!("dev{:04}", i + 1), "class": class, "labels": {"zone": zone}, "owner": owner})
        })
        .collect()
}

/// Report `version` of device `i`. Plain: phase 1's small body. Rich: the
/// state an agent-sim device of its class reports (classes.rs), with some
/// drift (old firmware, telnet or ssh on, the default password, another
/// NTP server) for the policy to find.
fn report_body(i: usize, version: u64, rich: bool) -> String {
    if !rich {
        return json!({"version": version, "state": {"class": "streetlight", "labels": {"zone": "north"}, "dimming": version}})
            .to_string();
    }
    let (class, zone, _) = device_attrs(i);
    let old = i % 10 == 7;
    let (firmware, model) = match class {
        "streetlight" => (if old { "1.3.9" } else { "1.4.2" }, "LumiNode SL-300"),
        "waste-bin" => (if old { "2.0.3" } else { "2.1.0" }, "BinSense B3"),
        "camera" => (if old { "5.6.0" } else { "5.7.1" }, "Vista IPC-5120"),
        _ => (if old { "0.9.1" } else { "0.9.4" }, "AeroQ AQ-12"),
    };
    let mut services = json!({"ssh": i % 20 == 5, "telnet": i % 50 == 3});
    if class == "camera" {
        services["onvif"] = json!(true);
    }
    let mut state = json!({
        "class": class, "hardware_model": model, "firmware": firmware,
        "labels": {"zone": zone},
        "security": {"services": services, "default_password_changed": i % 12 != 1,
                     "ntp": if i % 10 == 9 { "pool.ntp.org" } else { "ntp.city.local" }},
        "cert_not_after": "2027-11-30T00:00:00Z",
        "update": {"state": "idle"},
    });
    let extra = match class {
        "streetlight" => {
            let dimming = version % 101;
            json!({"dimming": dimming, "schedule": {"on": "18:30", "off": "06:30"},
                   "lamp_power_w": dimming * 120 / 100, "fault": if i % 100 == 11 { "lamp_failure" } else { "none" }})
        }
        "waste-bin" => {
            json!({"fill_level": version % 80, "lid_sensor": "closed", "pickup_threshold": 80})
        }
        "camera" => json!({"stream_profile": "h264-1080p", "retention_days": 30,
                           "admin_password_hash": format!("$argon2id$v=19$m=19456,t=2,p=1${i:016x}")}),
        _ => json!({"sample_interval_s": 60}),
    };
    for (k, v) in extra.as_object().into_iter().flatten() {
        state[k] = v.clone();
    }
    json!({"version": version, "state": state}).to_string()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One arm of the policy comparison: phase 1 on a fresh server.
struct Arm {
    rules: usize,
    round: usize,
    /// Registering the devices (CLI-free: the operator's `register`).
    register_s: f64,
    /// `policy-apply` answered (the policy fsynced, every device evaluated).
    policy_apply_ms: Option<f64>,
    /// Then a `status` answered: the device records the policy changed written.
    settle_s: f64,
    phase: Phase1,
    /// The compliance summary after the reports (policy arm only).
    compliance: serde_json::Value,
    rss_end: u64,
}

impl Arm {
    fn received_per_s(&self) -> f64 {
        self.phase.counted as f64 / self.phase.persisted_in.as_secs_f64()
    }

    /// Offered: written by the devices, or queued by the loaders.
    fn offered(&self) -> (u64, f64) {
        match &self.phase.via {
            Some(v) => (v.offered, v.offered as f64 / v.offered_s.max(1e-9)),
            None => (
                self.phase.counted,
                self.phase.counted as f64 / self.phase.publish_done.as_secs_f64().max(1e-9),
            ),
        }
    }

    fn disturbed(&self) -> bool {
        self.phase.cpu_elsewhere > (self.phase.persisted_in / 10).max(Duration::from_millis(100))
    }

    fn json(&self) -> serde_json::Value {
        let (offered, offered_per_s) = self.offered();
        json!({
            "policy_rules": self.rules, "round": self.round,
            "register_s": self.register_s, "policy_apply_ms": self.policy_apply_ms, "settle_s": self.settle_s,
            "received_persisted": self.phase.counted, "seconds": self.phase.persisted_in.as_secs_f64(),
            "received_persisted_per_sec": self.received_per_s(),
            "offered": offered, "offered_per_sec": offered_per_s,
            "offered_seconds": self.phase.publish_done.as_secs_f64(),
            "devices_path": self.phase.via.as_ref().map(|v| json!({"connected": v.connected, "connect_s": v.connect_s,
                "pubacks_received": v.acked, "errors": v.errors})),
            "cpu_elsewhere_s": self.phase.cpu_elsewhere.as_secs_f64(), "disturbed": self.disturbed(),
            "server_rss_kib": {"reports_peak": self.phase.rss_peak, "end": self.rss_end},
            "compliance": self.compliance,
        })
    }
}

/// `--policy-rules P`: phase 1 with and without the policy, `--rounds` times.
async fn compare_policy(
    root: &Path,
    pki_dir: &Path,
    devices: usize,
    reports_per_device: u64,
    rules: usize,
) {
    let started = Instant::now();
    let rounds = arg("--rounds", 1).max(1);
    let via_devices = std::env::args()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "--reports-via" && w[1] == "devices");
    let burst = std::env::args().any(|a| a == "--device-burst");
    let policy = bench_policy(rules);
    let rules = policy["rules"].as_array().map_or(0, Vec::len);
    let manifest = manifest(devices);
    let mut arms: Vec<Arm> = Vec::new();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [0, rules]
        } else {
            [rules, 0]
        };
        for arm_rules in order {
            eprintln!("round {}: {} rules", round + 1, arm_rules);
            let data = tempfile::tempdir().expect("data");
            let (server, addr) = cityplane_testkit::bench::start_cityplane_serve(
                Path::new(BIN),
                pki_dir,
                data.path(),
                &root.join("controller_e2e_policy-serve.log"),
            )
            .expect("serve");
            let pid = server.pid();
            let connect = ConnectArgs {
                server: addr.to_string(),
                pki: pki_dir.to_path_buf(),
                id: OPERATOR.into(),
                timeout: 60,
                cluster: false,
            };
            let mut op = Operator::connect_retrying(&connect, Duration::from_secs(10))
                .await
                .expect("server up");
            let t = Instant::now();
            op.register(&manifest, 500, |_| {}).await.expect("register");
            let register_s = t.elapsed().as_secs_f64();
            let policy_apply_ms = if arm_rules > 0 {
                let t = Instant::now();
                let r = op
                    .query("policy-apply", json!({"policy": policy}))
                    .await
                    .expect("policy-apply");
                assert_eq!(r["rules"], rules, "{r}");
                Some(t.elapsed().as_secs_f64() * 1e3)
            } else {
                None
            };
            let t = Instant::now();
            op.query("status", json!({})).await.expect("status");
            let settle_s = t.elapsed().as_secs_f64();
            let phase = if via_devices {
                phase1_devices(
                    &mut op,
                    pki_dir,
                    addr.port(),
                    pid,
                    devices,
                    reports_per_device,
                    burst,
                    true,
                )
                .await
            } else {
                phase1_loaders(
                    &mut op,
                    pki_dir,
                    addr.port(),
                    pid,
                    devices,
                    reports_per_device,
                    true,
                )
                .await
            };
            let compliance = if arm_rules > 0 {
                let r = op
                    .query("compliance", json!({"limit": 0}))
                    .await
                    .expect("compliance");
                let by_rule: serde_json::Map<String, serde_json::Value> = r["by_rule"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| {
                        (
                            b["rule"].as_str().unwrap_or("").to_owned(),
                            b["violations"].clone(),
                        )
                    })
                    .collect();
                json!({"total": r["total"], "compliant": r["compliant"], "compliant_pct": r["compliant_pct"],
                       "violations_total": r["violations_total"], "violations_by_rule": by_rule})
            } else {
                json!(null)
            };
            let rss_end = rss_kib(pid);
            op.disconnect().await;
            drop(server);
            let arm = Arm {
                rules: arm_rules,
                round: round + 1,
                register_s,
                policy_apply_ms,
                settle_s,
                phase,
                compliance,
                rss_end,
            };
            let (offered, offered_per_s) = arm.offered();
            eprintln!(
                "  {} rules: received and persisted {} in {:.2} s = {:.0}/s; offered {offered} = {offered_per_s:.0}/s{}",
                arm_rules,
                arm.phase.counted,
                arm.phase.persisted_in.as_secs_f64(),
                arm.received_per_s(),
                if arm.disturbed() { " (DISTURBED)" } else { "" }
            );
            arms.push(arm);
        }
    }
    let side = |with: bool| -> (Vec<f64>, Vec<f64>) {
        let a: Vec<&Arm> = arms.iter().filter(|a| (a.rules > 0) == with).collect();
        (
            a.iter().map(|a| a.received_per_s()).collect(),
            a.iter().map(|a| a.offered().1).collect(),
        )
    };
    let (without_rx, without_tx) = side(false);
    let (with_rx, with_tx) = side(true);
    let (m_without, m_with) = (median(without_rx.clone()), median(with_rx.clone()));
    let drop_pct = (1.0 - m_with / m_without) * 100.0;
    let incomplete = arms
        .iter()
        .any(|a| a.phase.counted < devices as u64 * reports_per_device);
    let path = match (via_devices, burst) {
        (true, true) => "device connections, each device's reports in one burst",
        (true, false) => "device connections (device certificates, edge ingress, backlog credit), one report in flight per device",
        (false, _) => "4 controller-role loaders (own router links: no device ingress, no backlog credit)",
    };
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let machine = machine::describe();
    println!("\ncontroller_e2e --policy-rules {rules}: {devices} registered devices, {reports_per_device} reports each, {rounds} round(s)");
    println!("  machine: {machine}");
    println!("  reports via {path}");
    println!(
        "  without policy: received and persisted {m_without:.0}/s ({}); offered {:.0}/s ({})",
        list(&without_rx),
        median(without_tx.clone()),
        list(&without_tx)
    );
    println!(
        "  with {rules} rules : received and persisted {m_with:.0}/s ({}); offered {:.0}/s ({})",
        list(&with_rx),
        median(with_tx.clone()),
        list(&with_tx)
    );
    println!(
        "  drop {drop_pct:.1} % [target <= 20 %: {}]; with the policy {m_with:.0}/s [target >= 50,000/s: {}]{}",
        if drop_pct <= 20.0 { "PASS" } else { "MISS" },
        if m_with >= 50_000.0 { "PASS" } else { "MISS" },
        if incomplete { " (INCOMPLETE: some reports not persisted)" } else { "" }
    );
    if arms.iter().any(Arm::disturbed) {
        println!("  DISTURBED: other work used the CPU during some arms (see the JSON)");
    }
    let result = json!({
        "bench": "controller_e2e_policy", "machine": machine, "devices": devices,
        "reports_per_device": reports_per_device, "policy_rules": rules, "rounds": rounds,
        "reports_via": if via_devices { "devices" } else { "controller-loaders" }, "device_burst": via_devices && burst,
        "report_body": "agent-sim-like state (rich), the same in both arms",
        "median": {
            "without": {"received_persisted_per_sec": m_without, "offered_per_sec": median(without_tx)},
            "with": {"received_persisted_per_sec": m_with, "offered_per_sec": median(with_tx)},
        },
        "drop_pct": drop_pct,
        "targets": {"drop_pct_max": 20.0, "drop_met": drop_pct <= 20.0,
                    "with_policy_per_sec_min": 50000, "with_policy_met": m_with >= 50_000.0},
        "incomplete": incomplete,
        "arms": arms.iter().map(Arm::json).collect::<Vec<_>>(),
    });
    let name = if via_devices {
        "controller_e2e_policy-devices"
    } else {
        "controller_e2e_policy-loaders"
    };
    cityplane_testkit::bench::write_result(root, name, &result, started).expect("result");
}
