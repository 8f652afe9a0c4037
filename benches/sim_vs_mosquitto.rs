//! The simulator's `connect-storm` and `steady` scenarios against cityplane's
//! broker and against mosquitto: same load, same machine, one run.
//!
//! ```text
//! cargo bench -p cityplane --bench sim_vs_mosquitto [-- --devices N]
//! ```
//!
//! Every party is its own process, so memory figures are one process's each
//! and no run inherits the allocator state or leftover tasks of the one
//! before: our broker is the real binary, `cityplane broker` on a server
//! directory exported from the bench PKI (default limits with a 10 s
//! handshake timeout, in its `--config` file;
//! `testkit::bench::start_cityplane_broker`), mosquitto is `/usr/sbin/mosquitto` on a generated
//! configuration trusting the same CA (`require_certificate true`,
//! `use_identity_as_username true`), and the simulator is this binary
//! re-executed with `CITYPLANE_BENCH_ROLE=sim`, running the library's
//! `scenario::run`. Each scenario gets a freshly started broker.
//!
//! For each broker:
//! 1. `connect-storm`, unpaced (`connect_rate` 0; at most 100 handshakes in
//!    flight, the simulator's default): how fast N devices come online (TCP,
//!    mTLS, CONNECT/CONNACK, SUBSCRIBE/SUBACK, first report). Paced at the
//!    default 500/s both brokers keep up, which would only measure the
//!    pacer. Broker memory here is the peak (VmHWM) over the idle broker.
//! 2. `steady`: devices connect paced at the default 500/s, then run for
//!    `--steady-secs` with telemetry (QoS 0) every `--telemetry-ms` from each
//!    device. Meanwhile this process, with a controller certificate and
//!    subscribed to every device's telemetry, reports and acks, sends
//!    `--cmd-rate` commands/s (QoS 1) round robin to the devices; each applies
//!    it and answers with a report and an ack. Messages per second each way
//!    are the simulator's; deliveries to the controller and the command
//!    round trip are measured here, over the window from "every device has
//!    reported" to one second before the simulator's window ends. Broker RSS
//!    per connection is sampled in the middle of that window.
//! 3. `steady`, nobody subscribed: the same devices and telemetry without
//!    the controller, so nothing is delivered; the broker's CPU is read over
//!    the same window by the clock (paced connects + 1 s, then
//!    `--steady-secs` − 2 s). What a message costs the broker that only
//!    receives it (TLS, parsing, the ACL, deciding nobody wants it).
//!
//! Presence: against cityplane devices use `PresenceMode::Skip` (the broker
//! announces them and refuses a device's own presence publish); against
//! mosquitto `PresenceMode::Auto`, which probes once and then publishes,
//! because mosquitto announces nobody. So on mosquitto each connect carries
//! one retained QoS 1 publish more: what the contract (docs/PROTOCOL.md) asks
//! of devices on a third-party broker.
//!
//! The load generator shares the machine with the brokers, so other work on
//! it skews the numbers: each scenario counts the CPU used outside the
//! broker, the simulator and this process, and the CPU the hypervisor took
//! (steal), and flags a disturbed run when either is large.
//!
//! Options (also as environment variables): `--devices N`
//! (`CITYPLANE_BENCH_DEVICES`, default 2000), `--steady-secs S` (10),
//! `--telemetry-ms T` (1000), `--cmd-rate R` (200), `--only
//! cityplane|mosquitto` (`CITYPLANE_BENCH_ONLY`). `CITYPLANE_BENCH_LOG` is the
//! log filter of our broker and the simulator (default `warn`),
//! `CITYPLANE_BENCH_BROKER_WRAP` a command prefix for our broker. Results: a
//! table on stdout, one `BENCH_JSON {...}` line, and
//! `target/bench/sim_vs_mosquitto.json`; logs in `target/bench/sim-*.log`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cityplane_agent_sim::mqtt::{server_name, Client, ConnectOptions, Packet, SUBACK_FAILURE};
use cityplane_agent_sim::scenario::{self, Scenario, ScenarioOptions};
use cityplane_agent_sim::tls::TlsBase;
use cityplane_agent_sim::{Percentiles, PresenceMode, SimConfig};
use cityplane_certs::Pki;
use cityplane_proto::topics;
use cityplane_testkit::mosquitto::{self, MOSQUITTO};
use cityplane_testkit::process::{self, ChildGuard};
use cityplane_testkit::{bench, machine};
use serde::Serialize;
use serde_json::{json, Value};

const DEVICE_PREFIX: &str = "sim";
const CONTROLLER_ID: &str = "sim-ctl";
/// Our broker: the `cityplane` binary of this package.
const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
/// Its `--config`: as the simulator's earlier numbers, a storm's queued
/// handshakes wait up to 10 s (default 5 s); the other limits are defaults.
const BROKER_CONFIG: &str = "# sim_vs_mosquitto\n[limits]\nhandshake_timeout_ms = 10000\n";
/// The simulator's wait for every device to be online (connect-storm and the
/// start of steady).
const ONLINE_WAIT: Duration = Duration::from_secs(60);
/// Beyond the scenario's own time: certificate loading and shutdown.
const SIM_SLACK: Duration = Duration::from_secs(30);
/// The simulator's default pacing, used for `steady`.
const STEADY_CONNECT_RATE: f64 = 500.0;
/// A scenario is flagged as disturbed when the CPU used elsewhere, or the
/// CPU the hypervisor took (steal), exceeds this many seconds plus
/// [`DISTURBED_SHARE`] of the machine's capacity over the run: per-process
/// and machine-wide accounting differ by a few percent. Steal up to 8 s in
/// a 15 s scenario was seen on this VM, with mosquitto's CPU per message
/// half again its undisturbed figure.
const DISTURBED_CPU_S: f64 = 1.0;
const DISTURBED_SHARE: f64 = 0.05;

// ---------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Serialize)]
struct Opts {
    devices: usize,
    steady_secs: u64,
    telemetry_ms: u64,
    cmd_rate: u32,
    steady_connect_rate: f64,
    only: Option<String>,
}

fn opts() -> Result<Opts> {
    let env = |k: &str| std::env::var(k).ok();
    let mut o = Opts {
        devices: env("CITYPLANE_BENCH_DEVICES").map_or(Ok(2000), |v| v.parse())?,
        steady_secs: 10,
        telemetry_ms: 1000,
        cmd_rate: 200,
        steady_connect_rate: STEADY_CONNECT_RATE,
        only: env("CITYPLANE_BENCH_ONLY"),
    };
    bench::parse_args(std::env::args().skip(1), |key, value| {
        match key {
            "--devices" => o.devices = value()?.parse()?,
            "--steady-secs" => o.steady_secs = value()?.parse()?,
            "--telemetry-ms" => o.telemetry_ms = value()?.parse()?,
            "--cmd-rate" => o.cmd_rate = value()?.parse()?,
            "--only" => o.only = Some(value()?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if o.devices == 0 {
        bail!("--devices must be at least 1");
    }
    // The controller's measuring window is one second shorter than steady's.
    if o.steady_secs < 3 {
        bail!("--steady-secs must be at least 3");
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Entry points

fn main() {
    let role = std::env::var("CITYPLANE_BENCH_ROLE").unwrap_or_default();
    let result = match role.as_str() {
        "sim" => sim_child(),
        _ => opts().and_then(|opts| bench::block_on(run(opts))),
    };
    bench::finish(&format!("sim_vs_mosquitto {role}"), result);
}

/// `--key value` pairs of a child role.
fn child_args() -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut args = std::env::args().skip(1);
    while let Some(key) = args.next() {
        let key = key
            .strip_prefix("--")
            .with_context(|| format!("unexpected argument {key:?}"))?
            .to_owned();
        let value = args
            .next()
            .with_context(|| format!("--{key} needs a value"))?;
        out.insert(key, value);
    }
    Ok(out)
}

fn init_child_logging() {
    let filter = std::env::var("CITYPLANE_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    cityplane_broker::logging::init_stderr(&filter, false);
}

/// `CITYPLANE_BENCH_ROLE=sim`: one scenario, then `REPORT {json}` on stdout.
fn sim_child() -> Result<()> {
    let args = child_args()?;
    let get = |k: &str| {
        args.get(k)
            .map(String::as_str)
            .with_context(|| format!("--{k} is required"))
    };
    init_child_logging();
    let scenario: Scenario = get("scenario")?.parse().map_err(|e: String| anyhow!(e))?;
    let devices: usize = get("devices")?.parse()?;
    let mut config = SimConfig::new(get("pki")?, get("broker")?, DEVICE_PREFIX, devices);
    config.connect_rate = get("rate")?.parse()?;
    config.presence = match get("presence")? {
        "skip" => PresenceMode::Skip,
        "auto" => PresenceMode::Auto,
        "publish" => PresenceMode::Publish,
        other => bail!("unknown presence mode {other:?}"),
    };
    if let Some(ms) = args.get("telemetry-ms") {
        config.telemetry_interval = Some(Duration::from_millis(ms.parse()?));
    }
    let mut opts = ScenarioOptions::new(scenario);
    opts.timeout = ONLINE_WAIT;
    opts.duration = Duration::from_secs(get("steady-secs")?.parse()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(scenario::run(config, opts, &|_| {}))?;
    let out = json!({
        "report": report,
        "cpu_s": process::cpu_time("self").as_secs_f64(),
        "rss_peak_kib": process::status_kib("self", "VmHWM:"),
    });
    println!("REPORT {}", serde_json::to_string(&out)?);
    std::io::stdout().flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Child processes

/// Reads a child's stdout on a thread: the first line starting with
/// `prefix` (without it) goes to the returned channel; `eof` is set when the
/// child closes stdout (it has exited, or is about to).
fn watch_stdout(
    stdout: std::process::ChildStdout,
    prefix: &'static str,
) -> (tokio::sync::oneshot::Receiver<String>, Arc<AtomicBool>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let eof = Arc::new(AtomicBool::new(false));
    let eof2 = eof.clone();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(prefix) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(rest.to_owned());
                }
            }
        }
        eof2.store(true, Ordering::Relaxed);
    });
    (rx, eof)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cityplane,
    Mosquitto,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Cityplane => "cityplane",
            Kind::Mosquitto => "mosquitto",
        }
    }

    /// See the module documentation.
    fn presence(self) -> &'static str {
        match self {
            Kind::Cityplane => "skip",
            Kind::Mosquitto => "auto",
        }
    }
}

fn start_broker(kind: Kind, pki: &Pki, bench_dir: &Path) -> Result<(ChildGuard, SocketAddr)> {
    match kind {
        Kind::Cityplane => {
            bench::start_cityplane_broker(Path::new(BIN), pki, bench_dir, "sim-", BROKER_CONFIG)
        }
        Kind::Mosquitto => mosquitto::start("sim_vs_mosquitto", pki, bench_dir, "sim-"),
    }
}

/// The simulator as a child process running one scenario.
struct SimChild {
    guard: ChildGuard,
    report: tokio::sync::oneshot::Receiver<String>,
    exited: Arc<AtomicBool>,
    log: PathBuf,
}

impl SimChild {
    fn spawn(
        kind: Kind,
        scenario: Scenario,
        addr: SocketAddr,
        pki: &Path,
        opts: &Opts,
        bench_dir: &Path,
    ) -> Result<SimChild> {
        let log = bench_dir.join(format!("sim-{}-{}.log", kind.name(), scenario.as_str()));
        let rate = match scenario {
            Scenario::Steady => opts.steady_connect_rate,
            _ => 0.0,
        };
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.env("CITYPLANE_BENCH_ROLE", "sim")
            .args(["--scenario", scenario.as_str()])
            .arg("--pki")
            .arg(pki)
            .args(["--broker", &addr.to_string()])
            .args(["--devices", &opts.devices.to_string()])
            .args(["--rate", &rate.to_string()])
            .args(["--presence", kind.presence()])
            .args(["--steady-secs", &opts.steady_secs.to_string()]);
        if scenario == Scenario::Steady {
            cmd.args(["--telemetry-ms", &opts.telemetry_ms.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(&log)?))
            .spawn()
            .context("re-exec the bench binary as the simulator")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let guard = ChildGuard::new(child);
        let (report, exited) = watch_stdout(stdout, "REPORT ");
        Ok(SimChild {
            guard,
            report,
            exited,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The simulator's output: `{"report", "cpu_s", "rss_peak_kib"}`.
    async fn finish(self, timeout: Duration) -> Result<Value> {
        let line = tokio::time::timeout(timeout, self.report)
            .await
            .map_err(|_| anyhow!("the simulator did not finish within {timeout:?}"))?
            .map_err(|_| anyhow!("the simulator exited without a report"))
            .with_context(|| format!("see {}", self.log.display()))?;
        drop(self.guard);
        Ok(serde_json::from_str(&line)?)
    }
}

// ---------------------------------------------------------------------------
// The controller of `steady`

/// What the controller saw during `steady`.
#[derive(Debug, Clone, Default, Serialize)]
struct SteadyLoad {
    devices_reported: usize,
    /// Controller connected → every device's first report seen.
    all_reported_after_s: f64,
    window_s: f64,
    /// Commands queued (offered), not counting whether they were delivered.
    cmd_offered: u64,
    /// Commands whose ack the controller received.
    cmd_acked: u64,
    cmd_lost: u64,
    /// Command published → the device's ack received.
    cmd_round_trip: Percentiles,
    delivered_telemetry: u64,
    delivered_reported: u64,
    delivered_acks: u64,
    delivered_per_s: f64,
    broker_rss_connected_kib: u64,
    broker_cpu_s: f64,
    broker_cpu_pct: f64,
}

async fn connect_controller(addr: SocketAddr, pki: &Pki) -> Result<Client> {
    let identity = TlsBase::from_ca_file(&pki.ca_cert_path())?
        .identity(&pki.cert_path(CONTROLLER_ID), &pki.key_path(CONTROLLER_ID))?;
    let mut client = Client::connect(
        addr,
        server_name("127.0.0.1").map_err(|e| anyhow!(e))?,
        identity.config,
        &ConnectOptions {
            client_id: CONTROLLER_ID,
            keep_alive: 60,
            clean_session: true,
            will: None,
        },
        Duration::from_secs(10),
    )
    .await
    .context("controller connect")?;
    for filter in [
        topics::reported("+"),
        topics::acks("+"),
        topics::telemetry("+"),
    ] {
        let pkid = client.subscribe(&filter, 1).await?;
        let codes = client
            .recv_until(Duration::from_secs(10), |p| match p {
                Packet::SubAck { pkid: id, codes } if *id == pkid => Some(codes.clone()),
                _ => None,
            })
            .await
            .with_context(|| format!("SUBACK for {filter}"))?;
        if codes.first().is_none_or(|c| *c == SUBACK_FAILURE) {
            bail!("the broker refused the controller's SUBSCRIBE to {filter}");
        }
    }
    Ok(client)
}

/// Counts deliveries by leaf; `acks` gets each ack's command sequence number
/// and arrival time.
fn on_packet(
    client: &mut Client,
    packet: Packet,
    counts: &mut BTreeMap<&'static str, u64>,
    reported: &mut HashSet<String>,
    acks: &mut Vec<(u64, Instant)>,
) {
    let Packet::Publish(p) = packet else { return };
    if p.qos == 1 {
        client.queue_puback(p.pkid);
    }
    let Some((id, leaf)) = topics::split_device_topic(&p.topic) else {
        return;
    };
    let leaf: &'static str = match leaf {
        "telemetry" => "telemetry",
        "reported" => {
            if !reported.contains(id) {
                reported.insert(id.to_owned());
            }
            "reported"
        }
        "acks" => {
            let seq = serde_json::from_slice::<Value>(&p.payload)
                .ok()
                .and_then(|v| {
                    v.get("id")?
                        .as_str()?
                        .strip_prefix("b-")?
                        .parse::<u64>()
                        .ok()
                });
            if let Some(seq) = seq {
                acks.push((seq, Instant::now()));
            }
            "acks"
        }
        _ => "other",
    };
    *counts.entry(leaf).or_insert(0) += 1;
}

fn command_payload(seq: u64) -> Vec<u8> {
    // An unknown key is stored as given by every device class, so each
    // command is applied (report + ack) whatever the class mix.
    json!({"id": format!("b-{seq}"), "generation": seq, "state": {"bench_seq": seq}})
        .to_string()
        .into_bytes()
}

async fn steady_controller(
    mut client: Client,
    opts: &Opts,
    broker_pid: u32,
    sim_exited: &AtomicBool,
) -> Result<SteadyLoad> {
    let n = opts.devices;
    let t_connected = Instant::now();
    let mut counts = BTreeMap::new();
    let mut reported = HashSet::new();
    let mut acks = Vec::new();
    // Phase 1: every device online. Its first report follows its SUBSCRIBE on
    // the same connection, so a device that reported can get commands.
    let deadline = t_connected + ONLINE_WAIT + SIM_SLACK;
    while reported.len() < n && Instant::now() < deadline && !sim_exited.load(Ordering::Relaxed) {
        if let Ok(packet) = tokio::time::timeout(Duration::from_millis(200), client.recv()).await {
            on_packet(&mut client, packet?, &mut counts, &mut reported, &mut acks);
            client.flush().await?;
        }
    }
    let mut load = SteadyLoad {
        devices_reported: reported.len(),
        all_reported_after_s: t_connected.elapsed().as_secs_f64(),
        ..SteadyLoad::default()
    };
    if reported.is_empty() {
        return Ok(load);
    }
    let mut targets: Vec<String> = reported.iter().cloned().collect();
    targets.sort();

    // Phase 2: the window. Commands are paced by the clock (due = elapsed ×
    // rate) so a slow tick does not lower the offered rate.
    let pid = broker_pid.to_string();
    let window = Duration::from_secs(opts.steady_secs - 1);
    counts.clear();
    acks.clear();
    let t0 = Instant::now();
    let cpu0 = process::cpu_time(&pid);
    let end = t0 + window;
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let due = ((now - t0).as_secs_f64() * f64::from(opts.cmd_rate)) as u64;
                while (sent_at.len() as u64) < due {
                    let seq = sent_at.len() as u64;
                    let device = &targets[seq as usize % targets.len()];
                    client.queue_publish(&topics::commands(device), &command_payload(seq), 1, false);
                    sent_at.push(now);
                }
                if load.broker_rss_connected_kib == 0 && now >= t0 + window / 2 {
                    load.broker_rss_connected_kib = process::status_kib(&pid, "VmRSS:");
                }
            }
            packet = client.recv() => {
                on_packet(&mut client, packet?, &mut counts, &mut reported, &mut acks);
            }
        }
        client.flush().await?;
    }
    let cpu1 = process::cpu_time(&pid);
    let window_s = t0.elapsed().as_secs_f64();
    let delivered: u64 = counts.values().sum();
    load.delivered_telemetry = counts.get("telemetry").copied().unwrap_or(0);
    load.delivered_reported = counts.get("reported").copied().unwrap_or(0);
    load.delivered_acks = counts.get("acks").copied().unwrap_or(0);

    // Phase 3: late acks (the simulator's window lasts another second).
    let mut round_trips = Vec::new();
    let mut acked = vec![false; sent_at.len()];
    let grace = Instant::now() + Duration::from_millis(800);
    loop {
        for (seq, at) in acks.drain(..) {
            if let Some(slot) = acked.get_mut(seq as usize) {
                if !*slot {
                    *slot = true;
                    round_trips.push(at - sent_at[seq as usize]);
                }
            }
        }
        let done = acked.iter().all(|a| *a);
        if done || Instant::now() >= grace {
            break;
        }
        if let Ok(packet) = tokio::time::timeout(Duration::from_millis(50), client.recv()).await {
            on_packet(&mut client, packet?, &mut counts, &mut reported, &mut acks);
            client.flush().await?;
        }
    }
    client.disconnect().await;
    let cmd_offered = sent_at.len() as u64;
    let cmd_acked = round_trips.len() as u64;
    Ok(SteadyLoad {
        window_s,
        cmd_offered,
        cmd_acked,
        cmd_lost: cmd_offered - cmd_acked,
        cmd_round_trip: Percentiles::from_durations(round_trips),
        delivered_per_s: delivered as f64 / window_s,
        broker_cpu_s: (cpu1 - cpu0).as_secs_f64(),
        broker_cpu_pct: (cpu1 - cpu0).as_secs_f64() / window_s * 100.0,
        ..load
    })
}

// ---------------------------------------------------------------------------
// One broker

#[derive(Debug, Clone, Serialize)]
struct ScenarioRun {
    scenario: String,
    /// The simulator's own report (scenario.rs `Report`), as JSON.
    report: Value,
    sim_cpu_s: f64,
    sim_rss_peak_kib: u64,
    broker_rss_idle_kib: u64,
    /// connect-storm: the broker's peak RSS (VmHWM); steady: RSS in the
    /// middle of the window, every device connected.
    broker_rss_loaded_kib: u64,
    broker_kib_per_connection: f64,
    broker_cpu_s: f64,
    wall_s: f64,
    /// CPU the machine spent outside the broker, the simulator and this
    /// process while the scenario ran (other work on the box, plus kernel
    /// time not charged to a process): large values mean a disturbed run.
    other_cpu_s: f64,
    /// CPU time the hypervisor took from this VM meanwhile.
    steal_s: f64,
    /// `other_cpu_s` or `steal_s` above [`DISTURBED_CPU_S`] +
    /// [`DISTURBED_SHARE`].
    disturbed: bool,
    /// steady only: what the controller measured.
    load: Option<SteadyLoad>,
    /// steady without a controller: the broker's CPU over the same window
    /// (every device online, one second in, until a second before the end).
    quiet_cpu_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct BrokerRun {
    broker: String,
    connect_storm: ScenarioRun,
    steady: ScenarioRun,
    /// `steady` with nobody subscribed: devices' telemetry only.
    quiet: ScenarioRun,
}

async fn run_scenario(
    kind: Kind,
    scenario: Scenario,
    subscribed: bool,
    pki: &Pki,
    opts: &Opts,
    bench_dir: &Path,
) -> Result<ScenarioRun> {
    let started = Instant::now();
    let name = match scenario {
        Scenario::Steady if !subscribed => "steady, nobody subscribed",
        _ => scenario.as_str(),
    };
    let (mut broker, addr) = start_broker(kind, pki, bench_dir)?;
    let pid = broker.pid().to_string();
    // Connected before the idle reading: one connection more or less does
    // not matter, and the controller must not miss the devices' first reports.
    let controller = match scenario {
        Scenario::Steady if subscribed => Some(connect_controller(addr, pki).await?),
        _ => None,
    };
    let rss_idle = process::status_kib(&pid, "VmRSS:");
    let cpu0 = process::cpu_time(&pid);
    let (machine0, steal0) = process::machine_cpu();
    let own0 = process::cpu_time("self");
    let sim = SimChild::spawn(kind, scenario, addr, pki.dir(), opts, bench_dir)?;
    println!(
        "  {} {}: broker pid {}, simulator pid {}",
        kind.name(),
        name,
        broker.pid(),
        sim.pid()
    );
    let mut load = None;
    let mut quiet_cpu_pct = None;
    if let Some(controller) = controller {
        let l = steady_controller(controller, opts, broker.pid(), &sim.exited).await?;
        load = Some(l);
    } else if scenario == Scenario::Steady {
        // The controller's window, by the clock: paced connects, a second,
        // then steady's length less two seconds.
        let connecting = Duration::from_secs_f64(opts.devices as f64 / opts.steady_connect_rate);
        tokio::time::sleep(connecting + Duration::from_secs(1)).await;
        let window = Duration::from_secs(opts.steady_secs - 2);
        let cpu0 = process::cpu_time(&pid);
        tokio::time::sleep(window).await;
        let cpu1 = process::cpu_time(&pid);
        quiet_cpu_pct = Some((cpu1 - cpu0).as_secs_f64() * 100.0 / window.as_secs_f64());
    }
    let budget = ONLINE_WAIT
        + SIM_SLACK
        + match scenario {
            Scenario::Steady => Duration::from_secs(opts.steady_secs),
            _ => Duration::ZERO,
        };
    let out = sim.finish(budget).await?;
    broker.check_alive(kind.name())?;
    let cpu1 = process::cpu_time(&pid);
    let (machine1, steal1) = process::machine_cpu();
    let own1 = process::cpu_time("self");
    let rss_loaded = match &load {
        Some(l) => l.broker_rss_connected_kib,
        None => process::status_kib(&pid, "VmHWM:"),
    };
    drop(broker);
    let online = num(&out["report"], "/connect/online");
    let sim_cpu_s = num(&out, "/cpu_s");
    let broker_cpu_s = (cpu1 - cpu0).as_secs_f64();
    let wall_s = started.elapsed().as_secs_f64();
    let other_cpu_s = (machine1 - machine0).as_secs_f64()
        - broker_cpu_s
        - sim_cpu_s
        - (own1 - own0).as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Ok(ScenarioRun {
        scenario: name.into(),
        sim_cpu_s,
        sim_rss_peak_kib: num(&out, "/rss_peak_kib") as u64,
        report: out["report"].clone(),
        broker_rss_idle_kib: rss_idle,
        broker_rss_loaded_kib: rss_loaded,
        broker_kib_per_connection: if online > 0.0 {
            rss_loaded.saturating_sub(rss_idle) as f64 / online
        } else {
            0.0
        },
        broker_cpu_s,
        wall_s,
        other_cpu_s,
        steal_s: (steal1 - steal0).as_secs_f64(),
        disturbed: other_cpu_s.max((steal1 - steal0).as_secs_f64())
            > DISTURBED_CPU_S + DISTURBED_SHARE * wall_s * cores,
        load,
        quiet_cpu_pct,
    })
}

fn num(v: &Value, pointer: &str) -> f64 {
    v.pointer(pointer).and_then(Value::as_f64).unwrap_or(0.0)
}

fn failures(r: &ScenarioRun) -> f64 {
    r.report
        .get("failures")
        .and_then(Value::as_object)
        .map_or(0.0, |m| {
            m.values().filter_map(Value::as_f64).fold(0.0, |a, b| a + b)
        })
}

fn print_run(r: &ScenarioRun) {
    let rep = &r.report;
    println!(
        "    {}/{} online in {:.2} s = {:.0}/s; handshake p50 {:.1} ms p99 {:.1} ms; devices offered {:.0}/s (queued), received {:.0}/s (commands), PUBACKs received {:.0}/s; failures {}; presence by {}",
        num(rep, "/connect/online"),
        num(rep, "/devices"),
        num(rep, "/connect/seconds"),
        num(rep, "/connect/rate_per_s"),
        num(rep, "/connect/handshake/p50_ms"),
        num(rep, "/connect/handshake/p99_ms"),
        num(rep, "/messages/offered_per_s"),
        num(rep, "/messages/received_per_s"),
        num(rep, "/messages/pubacks_received_per_s"),
        failures(r),
        rep.pointer("/stats/presence").and_then(Value::as_str).unwrap_or("?"),
    );
    println!(
        "    broker RSS {} → {} KiB = {:.1} KiB/connection, CPU {:.2} s; simulator {:.1} KiB/device, CPU {:.2} s",
        r.broker_rss_idle_kib,
        r.broker_rss_loaded_kib,
        r.broker_kib_per_connection,
        r.broker_cpu_s,
        num(rep, "/memory/kib_per_device"),
        r.sim_cpu_s
    );
    if let Some(l) = &r.load {
        println!(
            "    controller: {} commands offered (queued), {} acks received, round trip p50 {:.2} ms p99 {:.2} ms; received {:.0}/s; broker CPU {:.0} %",
            l.cmd_offered,
            l.cmd_acked,
            l.cmd_round_trip.p50_ms,
            l.cmd_round_trip.p99_ms,
            l.delivered_per_s,
            l.broker_cpu_pct
        );
    }
    println!(
        "    wall {:.1} s; CPU elsewhere on the machine {:.2} s, steal {:.2} s",
        r.wall_s, r.other_cpu_s, r.steal_s
    );
    if r.disturbed {
        println!(
            "    WARNING: other work on the machine, or the hypervisor (steal), took CPU during this run; its numbers are disturbed"
        );
    }
    if let Some(notes) = rep.get("notes").and_then(Value::as_array) {
        for note in notes {
            println!("    note: {}", note.as_str().unwrap_or_default());
        }
    }
}

// ---------------------------------------------------------------------------
// The run

async fn run(opts: Opts) -> Result<()> {
    let started = Instant::now();
    let bench_dir = bench::target_dir().join("bench");
    std::fs::create_dir_all(&bench_dir)?;
    let machine = machine::describe();
    println!(
        "sim_vs_mosquitto: {} devices; machine {machine}",
        opts.devices
    );
    let pki = bench::prepare_pki_verbose(
        &bench_dir.join("sim-pki"),
        DEVICE_PREFIX,
        opts.devices,
        CONTROLLER_ID,
    )?;

    let want = |k: Kind| opts.only.as_deref().is_none_or(|o| o == k.name());
    let mut kinds = Vec::new();
    if want(Kind::Cityplane) {
        kinds.push(Kind::Cityplane);
    }
    if want(Kind::Mosquitto) {
        if mosquitto::installed() {
            kinds.push(Kind::Mosquitto);
        } else {
            println!("{MOSQUITTO} not found: mosquitto skipped, cityplane only");
        }
    }
    let mut results = Vec::new();
    for kind in kinds {
        println!("\n== {} ==", kind.name());
        let storm =
            run_scenario(kind, Scenario::ConnectStorm, false, &pki, &opts, &bench_dir).await?;
        print_run(&storm);
        let steady = run_scenario(kind, Scenario::Steady, true, &pki, &opts, &bench_dir).await?;
        print_run(&steady);
        let quiet = run_scenario(kind, Scenario::Steady, false, &pki, &opts, &bench_dir).await?;
        print_run(&quiet);
        results.push(BrokerRun {
            broker: kind.name().into(),
            connect_storm: storm,
            steady,
            quiet,
        });
    }

    let c = results.iter().find(|r| r.broker == "cityplane");
    let m = results.iter().find(|r| r.broker == "mosquitto");
    let summary = print_summary(c, m, &opts);
    let json = json!({
        "bench": "sim_vs_mosquitto",
        "machine": machine,
        "options": opts,
        "summary": summary,
        "disturbed": results
            .iter()
            .any(|r| r.connect_storm.disturbed || r.steady.disturbed || r.quiet.disturbed),
        "results": results,
        "total_run_s": started.elapsed().as_secs_f64(),
    });
    bench::write_result(&bench_dir, "sim_vs_mosquitto", &json, started)
}

// ---------------------------------------------------------------------------
// Summary

#[derive(Debug, Clone, Serialize)]
struct Row {
    metric: &'static str,
    cityplane: Option<f64>,
    mosquitto: Option<f64>,
    /// cityplane / mosquitto.
    ratio: Option<f64>,
}

fn print_summary(c: Option<&BrokerRun>, m: Option<&BrokerRun>, opts: &Opts) -> Vec<Row> {
    type Get = fn(&BrokerRun) -> f64;
    let metrics: Vec<(&'static str, Get)> = vec![
        ("storm: devices online", |r| {
            num(&r.connect_storm.report, "/connect/online")
        }),
        ("storm: connects/s, unpaced", |r| {
            num(&r.connect_storm.report, "/connect/rate_per_s")
        }),
        ("storm: handshake p50 ms", |r| {
            num(&r.connect_storm.report, "/connect/handshake/p50_ms")
        }),
        ("storm: handshake p99 ms", |r| {
            num(&r.connect_storm.report, "/connect/handshake/p99_ms")
        }),
        ("storm: broker CPU ms/connect", |r| {
            let online = num(&r.connect_storm.report, "/connect/online").max(1.0);
            r.connect_storm.broker_cpu_s * 1e3 / online
        }),
        ("storm: broker peak KiB/connection", |r| {
            r.connect_storm.broker_kib_per_connection
        }),
        ("storm: simulator KiB/device", |r| {
            num(&r.connect_storm.report, "/memory/kib_per_device")
        }),
        ("storm: failures", |r| failures(&r.connect_storm)),
        ("steady: connects/s, paced 500/s", |r| {
            num(&r.steady.report, "/connect/rate_per_s")
        }),
        ("steady: handshake p50 ms at 500/s", |r| {
            num(&r.steady.report, "/connect/handshake/p50_ms")
        }),
        ("steady: handshake p99 ms at 500/s", |r| {
            num(&r.steady.report, "/connect/handshake/p99_ms")
        }),
        ("steady: devices→broker msg/s, offered (queued)", |r| {
            num(&r.steady.report, "/messages/offered_per_s")
        }),
        ("steady: devices' QoS 1 publishes acked, received", |r| {
            num(&r.steady.report, "/messages/pubacks_received_per_s")
        }),
        ("steady: broker→devices msg/s, received", |r| {
            num(&r.steady.report, "/messages/received_per_s")
        }),
        ("steady: delivered to controller msg/s, received", |r| {
            r.steady.load.as_ref().map_or(0.0, |l| l.delivered_per_s)
        }),
        ("steady: command round trip p50 ms", |r| {
            r.steady
                .load
                .as_ref()
                .map_or(0.0, |l| l.cmd_round_trip.p50_ms)
        }),
        ("steady: command round trip p99 ms", |r| {
            r.steady
                .load
                .as_ref()
                .map_or(0.0, |l| l.cmd_round_trip.p99_ms)
        }),
        ("steady: commands unacknowledged", |r| {
            r.steady.load.as_ref().map_or(0.0, |l| l.cmd_lost as f64)
        }),
        ("steady: broker CPU % of a core", |r| {
            r.steady.load.as_ref().map_or(0.0, |l| l.broker_cpu_pct)
        }),
        ("steady: broker CPU µs per routed message", |r| {
            r.steady.load.as_ref().map_or(0.0, |l| {
                let routed = l.delivered_per_s + num(&r.steady.report, "/messages/received_per_s");
                l.broker_cpu_pct * 1e4 / routed.max(1.0)
            })
        }),
        ("quiet (nobody subscribed): device msg/s, offered", |r| {
            num(&r.quiet.report, "/messages/offered_per_s")
        }),
        ("quiet: broker CPU % of a core", |r| {
            r.quiet.quiet_cpu_pct.unwrap_or(0.0)
        }),
        ("quiet: broker CPU µs per device message", |r| {
            let offered = num(&r.quiet.report, "/messages/offered_per_s");
            r.quiet.quiet_cpu_pct.unwrap_or(0.0) * 1e4 / offered.max(1.0)
        }),
        ("steady: broker KiB/connection", |r| {
            r.steady.broker_kib_per_connection
        }),
        ("steady: simulator KiB/device", |r| {
            num(&r.steady.report, "/memory/kib_per_device")
        }),
        ("steady: failures", |r| failures(&r.steady)),
        ("CPU elsewhere on the machine, max s", |r| {
            r.connect_storm
                .other_cpu_s
                .max(r.steady.other_cpu_s)
                .max(r.quiet.other_cpu_s)
        }),
    ];
    let rows: Vec<Row> = metrics
        .into_iter()
        .map(|(metric, get)| {
            let cv = c.map(get);
            let mv = m.map(get);
            // Counts of things that should be zero, and the disturbance
            // check, have no meaningful ratio.
            let comparable = !metric.contains("failures")
                && !metric.contains("unacknowledged")
                && !metric.starts_with("CPU elsewhere");
            let ratio = match (cv, mv) {
                (Some(a), Some(b)) if comparable && b != 0.0 => Some(a / b),
                _ => None,
            };
            Row {
                metric,
                cityplane: cv,
                mosquitto: mv,
                ratio,
            }
        })
        .collect();
    let fmt = |v: Option<f64>| match v {
        None => "—".to_owned(),
        Some(v) if v.abs() >= 100.0 || v.fract() == 0.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    };
    println!(
        "\n== summary: {} devices; steady {} s, telemetry every {} ms, {} commands/s ==",
        opts.devices, opts.steady_secs, opts.telemetry_ms, opts.cmd_rate
    );
    println!(
        "{:<40} {:>12} {:>12} {:>8}",
        "metric", "cityplane", "mosquitto", "ratio"
    );
    for r in &rows {
        println!(
            "{:<40} {:>12} {:>12} {:>8}",
            r.metric,
            fmt(r.cityplane),
            fmt(r.mosquitto),
            r.ratio.map_or("—".to_owned(), |x| format!("{x:.2}×"))
        );
    }
    rows
}
