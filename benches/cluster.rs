//! Beyond one machine (issue 13): the embedded server against a 3-node
//! RabbitMQ cluster with one `cityplane controller`, side by side in one
//! run, on 127.0.0.1 with mutual TLS.
//!
//! For each size N (default 2,500 / 5,000 / 10,000), each deployment:
//!
//! - **embedded**: `cityplane serve` (the real binary, its own process);
//! - **cluster**: `cityplane cluster up` (3 RabbitMQ 3.10 nodes), `cluster
//!   sync` (one user per issued identity), `cityplane controller --broker
//!   n1,n2,n3`; torn down with `cluster down` after the size, also on a
//!   panic or Ctrl-C (a guard).
//!
//! Phases, with memory (VmRSS) and CPU seconds of every process of the
//! deployment (the server, or the controller and each node's `beam.smp`):
//!
//! 1. **connect**: N agent-sim devices (this process; on the cluster device
//!    i goes to node i % 3, publishes its own presence and subscribes to its
//!    commands with QoS 0, as docs/DEPLOYMENT.md advises on RabbitMQ 3.10),
//!    200 handshakes in flight (`--in-flight`), unpaced; the clock stops when the controller's `status`
//!    counts N online (received), and separately when the simulator sees N
//!    sessions.
//! 2. **converge**, 3 times: `cityplane apply -f doc --wait` (the CLI, a
//!    child process) of one document targeting every device, a new value
//!    each time. Measured: the CLI's wall time, every simulated device holding
//!    the value, and the controller's `status` for the document showing all
//!    converged. Medians of the 3.
//! 3. **reports**: the simulated fleet stops; N device connections of this
//!    bench (own certificates, spread over the nodes the same way) publish R
//!    `devices/<id>/reported` each (QoS 1, one in flight: the next after the
//!    PUBACK). Offered = written by the devices; received = counted by the
//!    controller (`status` counters, answered after the commit covering
//!    them); persisted = received minus stale ones.
//!
//! `cargo bench -p cityplane --bench cluster [-- --sizes 500,1000]
//! [--reports R] [--applies K] [--only embedded|cluster] [--base-port P]
//! [--shards N] [--controllers K] [--quiet-wait S] [--in-flight H]
//! [--connect-limit S] [--command-timeout S] [--connect-rate R]`; env `CITYPLANE_BENCH_SIZES`, `CITYPLANE_BENCH_REPORTS`
//! (default 5), `CITYPLANE_BENCH_APPLIES` (3), `CITYPLANE_BENCH_ONLY`,
//! `CITYPLANE_BENCH_BASE_PORT` (29630), `CITYPLANE_BENCH_SHARDS` (device
//! messages through N shard sessions), `CITYPLANE_BENCH_CONTROLLERS` (K
//! sharded controllers sharing a throwaway PostgreSQL store; needs
//! `--shards`), `CITYPLANE_BENCH_QUIET_WAIT` (seconds
//! to wait for a load average below 0.8 before starting, default 600; 0 = do
//! not wait), `CITYPLANE_BENCH_IN_FLIGHT` (handshakes in flight, default
//! 200), `CITYPLANE_BENCH_CONNECT_LIMIT` (seconds the connect phase may
//! take; default 600, or 1.5 × devices / `--connect-rate` when longer),
//! `CITYPLANE_BENCH_COMMAND_TIMEOUT` (the cluster's controllers'
//! `--command-timeout-secs`; their default 10 when unset),
//! `CITYPLANE_BENCH_CONNECT_RATE` (new device connections per second on
//! the cluster, reconnects included; default 0, unpaced).
//! Without rabbitmq-server installed the cluster side is skipped
//! (said on stdout and in the JSON). Prints a summary and `BENCH_JSON {…}`;
//! writes target/bench/cluster.json, logs under target/bench/cluster/.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cityplane::client::{ConnectArgs, Operator};
use cityplane_agent_sim::{Backoff, Fleet, PresenceMode, SimConfig};
use cityplane_certs::Pki;
use cityplane_proto::Role;
use cityplane_testkit::bench::{self, median, target_dir};
use cityplane_testkit::machine;
use cityplane_testkit::process::ChildGuard;
use cityplane_testkit::process::{cpu_time, kill_registered_children, machine_cpu, rss_kib};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
/// Of the city's organisation (`Pki::issue` gives operators O=city).
const OPERATOR: &str = "bench-city-op";
/// `cityplane controller`'s default `--id`.
const CONTROLLER: &str = "controller";
const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// Handshakes in flight, for the simulator and the report clients alike
/// (`--in-flight`).
const IN_FLIGHT: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Embedded,
    Cluster,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Embedded => "embedded",
            Side::Cluster => "cluster",
        }
    }
}

struct Args {
    sizes: Vec<usize>,
    reports: u64,
    applies: usize,
    only: Option<Side>,
    base_port: u16,
    quiet_wait: u64,
    /// `controller --shards N` (and `cluster sync --shards N`).
    shards: Option<u32>,
    /// More than 1: that many sharded controllers on a PostgreSQL store.
    controllers: usize,
    /// Handshakes in flight (the simulator's and the report clients').
    in_flight: usize,
    /// How long the connect phase may take before the size is given up;
    /// unset, [`Args::connect_limit`] decides.
    connect_limit: Option<Duration>,
    /// The cluster's controllers' `--command-timeout-secs` (their default
    /// when unset).
    command_timeout: Option<u64>,
    /// New device connections per second on the cluster, reconnects
    /// included (0: unpaced). Each device's command subscription declares a
    /// queue (a Mnesia transaction over the three nodes), which follows
    /// the handshake: `--in-flight` alone does not bound them.
    connect_rate: f64,
}

fn args() -> Result<Args> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let parse_sizes = |s: &str| -> Result<Vec<usize>> {
        s.split(',')
            .map(|v| v.trim().replace('_', "").parse().context("--sizes"))
            .collect()
    };
    let parse_side = |s: &str| -> Result<Side> {
        match s {
            "embedded" => Ok(Side::Embedded),
            "cluster" => Ok(Side::Cluster),
            _ => bail!("--only embedded|cluster, not {s:?}"),
        }
    };
    let mut a = Args {
        sizes: match env("CITYPLANE_BENCH_SIZES") {
            Some(s) => parse_sizes(&s)?,
            None => vec![2_500, 5_000, 10_000],
        },
        reports: env("CITYPLANE_BENCH_REPORTS").map_or(Ok(5), |v| v.parse())?,
        applies: env("CITYPLANE_BENCH_APPLIES").map_or(Ok(3), |v| v.parse())?,
        only: env("CITYPLANE_BENCH_ONLY")
            .map(|s| parse_side(&s))
            .transpose()?,
        base_port: env("CITYPLANE_BENCH_BASE_PORT").map_or(Ok(29630), |v| v.parse())?,
        quiet_wait: env("CITYPLANE_BENCH_QUIET_WAIT").map_or(Ok(600), |v| v.parse())?,
        shards: env("CITYPLANE_BENCH_SHARDS")
            .map(|v| v.parse())
            .transpose()?,
        controllers: env("CITYPLANE_BENCH_CONTROLLERS").map_or(Ok(1), |v| v.parse())?,
        in_flight: env("CITYPLANE_BENCH_IN_FLIGHT").map_or(Ok(IN_FLIGHT), |v| v.parse())?,
        connect_limit: env("CITYPLANE_BENCH_CONNECT_LIMIT")
            .map(|v| v.parse().map(Duration::from_secs))
            .transpose()?,
        command_timeout: env("CITYPLANE_BENCH_COMMAND_TIMEOUT")
            .map(|v| v.parse())
            .transpose()?,
        connect_rate: env("CITYPLANE_BENCH_CONNECT_RATE").map_or(Ok(0.0), |v| v.parse())?,
    };
    bench::parse_args(std::env::args().skip(1), |key, value| {
        match key {
            "--sizes" => a.sizes = parse_sizes(&value()?)?,
            "--reports" => a.reports = value()?.parse()?,
            "--applies" => a.applies = value()?.parse()?,
            "--only" => a.only = Some(parse_side(&value()?)?),
            "--base-port" => a.base_port = value()?.parse()?,
            "--quiet-wait" => a.quiet_wait = value()?.parse()?,
            "--shards" => a.shards = Some(value()?.parse()?),
            "--controllers" => a.controllers = value()?.parse()?,
            "--in-flight" => a.in_flight = value()?.parse()?,
            "--connect-limit" => a.connect_limit = Some(Duration::from_secs(value()?.parse()?)),
            "--command-timeout" => a.command_timeout = Some(value()?.parse()?),
            "--connect-rate" => a.connect_rate = value()?.parse()?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if a.controllers == 0 || (a.controllers > 1 && a.shards.is_none()) {
        bail!("--controllers K: 1, or more with --shards N (sharded controllers)");
    }
    if a.sizes.is_empty()
        || a.sizes.contains(&0)
        || a.reports == 0
        || a.applies == 0
        || a.in_flight == 0
        || a.connect_rate.is_nan()
        || a.connect_rate < 0.0
    {
        bail!("sizes, --reports, --applies and --in-flight must be at least 1, --connect-rate at least 0");
    }
    Ok(a)
}

impl Args {
    /// `--connect-limit`, or 600 s, or half as long again as `n` devices
    /// take at `rate` per second when that is longer: at 15/s, 10,000
    /// devices need 667 s, and a 600 s limit gave the run up at 9,005.
    fn connect_limit(&self, n: usize, rate: f64) -> Duration {
        self.connect_limit.unwrap_or_else(|| {
            let paced = if rate > 0.0 {
                1.5 * n as f64 / rate
            } else {
                0.0
            };
            Duration::from_secs_f64(paced.max(600.0))
        })
    }
}

// ---------------------------------------------------------------------------
// The cluster's lifetime: `cluster down` on drop, on a panic and on Ctrl-C.

/// Cluster directories that are up: what the Ctrl-C handler tears down.
static LIVE_CLUSTERS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn cluster_down(dir: &Path) -> bool {
    Command::new(BIN)
        .args(["cluster", "down", "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A cluster started by `cluster up`: `cluster down` when dropped.
struct ClusterGuard {
    dir: PathBuf,
}

impl ClusterGuard {
    fn new(dir: PathBuf) -> ClusterGuard {
        LIVE_CLUSTERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(dir.clone());
        ClusterGuard { dir }
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        if !cluster_down(&self.dir) {
            eprintln!("cluster down --dir {} failed", self.dir.display());
        }
        LIVE_CLUSTERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d != &self.dir);
    }
}

fn main() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return bench::finish("cluster", Err(e.into())),
    };
    let result = rt.block_on(async {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                kill_registered_children();
                let dirs = LIVE_CLUSTERS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                for dir in dirs {
                    eprintln!("\ninterrupted: cluster down --dir {}", dir.display());
                    cluster_down(&dir);
                }
                std::process::exit(130);
            }
        });
        run().await
    });
    bench::finish("cluster", result);
}

// ---------------------------------------------------------------------------
// Processes measured.

/// One process of a deployment: the server, the controller or a node's VM.
#[derive(Clone)]
struct Proc {
    name: String,
    pid: u32,
}

/// VmRSS (KiB) and CPU time of each process at one instant.
#[derive(Clone)]
struct Snapshot {
    rss_kib: Vec<u64>,
    cpu: Vec<Duration>,
}

fn snapshot(procs: &[Proc]) -> Snapshot {
    Snapshot {
        rss_kib: procs.iter().map(|p| rss_kib(p.pid)).collect(),
        cpu: procs.iter().map(|p| cpu_time(p.pid)).collect(),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `{process: MiB}`.
fn rss_json(procs: &[Proc], s: &Snapshot) -> Value {
    procs
        .iter()
        .zip(&s.rss_kib)
        .map(|(p, k)| (p.name.clone(), json!(round1(mib(*k)))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `{process: CPU seconds between a and b}`, plus `bench` (this process).
fn cpu_json(procs: &[Proc], a: &Snapshot, b: &Snapshot) -> BTreeMap<String, f64> {
    procs
        .iter()
        .zip(a.cpu.iter().zip(&b.cpu))
        .map(|(p, (x, y))| (p.name.clone(), round2(y.saturating_sub(*x).as_secs_f64())))
        .collect()
}

/// Peak VmRSS of each process, sampled every 100 ms while it runs.
struct PeakSampler {
    peaks: Arc<Vec<AtomicU64>>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakSampler {
    fn start(procs: &[Proc]) -> PeakSampler {
        let pids: Vec<u32> = procs.iter().map(|p| p.pid).collect();
        let peaks = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let p = peaks.clone();
        let task = tokio::spawn(async move {
            loop {
                for (pid, peak) in pids.iter().zip(p.iter()) {
                    peak.fetch_max(rss_kib(*pid), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        PeakSampler { peaks, task }
    }

    fn peaks_json(&self, procs: &[Proc]) -> Value {
        procs
            .iter()
            .zip(self.peaks.iter())
            .map(|(p, k)| {
                (
                    p.name.clone(),
                    json!(round1(mib(k.load(Ordering::Relaxed)))),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

impl Drop for PeakSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}

fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The node's Erlang VM, from its pid file, if it is a live `beam.smp`.
fn beam_pid(cluster_dir: &Path, node: usize) -> Option<u32> {
    let pid: u32 =
        std::fs::read_to_string(cluster_dir.join(format!("rabbit{}/rabbit.pid", node + 1)))
            .ok()?
            .trim()
            .parse()
            .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "beam.smp").then_some(pid)
}

/// Live `beam.smp` processes started for `cluster_dir` (their environment
/// names it), and all `beam.smp` on the machine (other users' included).
fn beams_left(cluster_dir: &Path) -> (usize, usize) {
    let out = Command::new("pgrep")
        .args(["-f", "beam.smp"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let pids: Vec<&str> = out.split_whitespace().collect();
    let want = cluster_dir.display().to_string();
    let ours = pids
        .iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|e| String::from_utf8_lossy(&e).contains(&want))
        })
        .count();
    (ours, pids.len())
}

/// `epmd` daemons started for `cluster_dir` (their HOME is in it).
fn epmds_of(cluster_dir: &Path) -> Vec<u32> {
    let want = format!("HOME={}", cluster_dir.join("home").display());
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "epmd")
                && std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|e| e.split(|b| *b == 0).any(|v| v == want.as_bytes()))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// One deployment.

struct Deployment {
    side: Side,
    /// Where devices connect, one per node.
    nodes: Vec<String>,
    procs: Vec<Proc>,
    setup: Value,
    /// Dropped in this order: the controllers (or server) first, then the
    /// cluster and the store.
    server: Vec<ChildGuard>,
    cluster: Option<ClusterGuard>,
    store: Option<cityplane_testkit::postgres::Postgres>,
}

impl Deployment {
    fn stop(&mut self) {
        self.server.clear();
        self.cluster.take();
        self.store.take();
    }
}

fn run_cli(args: &[&str]) -> Result<(String, f64)> {
    let t = Instant::now();
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cityplane {args:?}"))?;
    let took = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "cityplane {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((String::from_utf8_lossy(&out.stdout).into_owned(), took))
}

async fn start(side: Side, a: &Args, pki: &Path, dir: &Path) -> Result<Deployment> {
    let data = dir.join(format!("{}-data", side.name()));
    let _ = std::fs::remove_dir_all(&data);
    match side {
        Side::Embedded => {
            let (server, addr) =
                bench::start_cityplane_serve(Path::new(BIN), pki, &data, &dir.join("serve.log"))?;
            Ok(Deployment {
                side,
                nodes: vec![addr.to_string()],
                procs: vec![Proc {
                    name: "server".into(),
                    pid: server.pid(),
                }],
                setup: json!({}),
                server: vec![server],
                cluster: None,
                store: None,
            })
        }
        Side::Cluster => {
            let cdir = dir.join("rabbit");
            if cdir.join("cluster.json").exists() {
                eprintln!(
                    "a cluster of an earlier run is in {}: down first",
                    cdir.display()
                );
                cluster_down(&cdir);
            }
            std::fs::create_dir_all(&cdir)?;
            let cdir = std::fs::canonicalize(&cdir)?;
            let cdir_s = cdir.to_str().context("utf-8 path")?.to_owned();
            let pki_s = pki.to_str().context("utf-8 path")?.to_owned();
            let base = a.base_port.to_string();
            let up = {
                let (cdir_s, pki_s) = (cdir_s.clone(), pki_s.clone());
                tokio::task::spawn_blocking(move || {
                    run_cli(&[
                        "cluster",
                        "up",
                        "--dir",
                        &cdir_s,
                        "--pki",
                        &pki_s,
                        "--base-port",
                        &base,
                        "--output",
                        "json",
                    ])
                })
                .await?
            };
            // Guarded before `up` is checked: a half-started cluster is torn down too.
            let cluster = ClusterGuard::new(cdir.clone());
            let (up_out, up_s) = up?;
            let up: Value = serde_json::from_str(up_out.trim()).context("cluster up's JSON")?;
            let nodes: Vec<String> = up["mqtts"]
                .as_array()
                .context("cluster up: no mqtts")?
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            let shards = a.shards.map(|n| n.to_string());
            let sharded = shards.clone();
            let (sync_out, sync_s) = tokio::task::spawn_blocking(move || {
                let mut args = vec![
                    "cluster", "sync", "--dir", &cdir_s, "--pki", &pki_s, "--output", "json",
                ];
                if let Some(n) = &sharded {
                    args.extend(["--shards", n]);
                }
                run_cli(&args)
            })
            .await??;
            let sync: Value = serde_json::from_str(sync_out.trim()).unwrap_or(Value::Null);
            let users = sync["created"].as_array().map_or(0, Vec::len);
            eprintln!("  cluster up {up_s:.1} s, sync {sync_s:.1} s ({users} users created)");
            // Sharded controllers share a throwaway PostgreSQL store.
            let store = if a.controllers > 1 {
                Some(cityplane_testkit::postgres::Postgres::start()?)
            } else {
                None
            };
            let mut controllers = Vec::new();
            let mut procs = Vec::new();
            for k in 0..a.controllers {
                let name = if a.controllers == 1 {
                    "controller".to_owned()
                } else {
                    format!("controller-{}", k + 1)
                };
                let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
                let mut cmd = Command::new(BIN);
                cmd.arg("controller")
                    .arg("--broker")
                    .arg(nodes.join(","))
                    .arg("--pki")
                    .arg(pki)
                    .arg("--data")
                    .arg(&data)
                    .args(shards.iter().flat_map(|n| ["--shards", n.as_str()]))
                    // Shards changing hands, in the log with the warnings.
                    .env(
                        "RUST_LOG",
                        "warn,cityplane_controller::runtime::sharding=info",
                    );
                if shards.is_some() {
                    // Binds the devices to their shards' queues.
                    cmd.arg("--cluster-dir").arg(&cdir);
                }
                if let Some(pg) = &store {
                    cmd.arg("--store").arg(pg.url());
                }
                if let Some(secs) = a.command_timeout {
                    cmd.arg("--command-timeout-secs").arg(secs.to_string());
                }
                let controller = ChildGuard::new(
                    cmd.stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .context("start cityplane controller")?,
                );
                procs.push(Proc {
                    name,
                    pid: controller.pid(),
                });
                controllers.push(controller);
            }
            for i in 0..nodes.len() {
                let pid = beam_pid(&cdir, i)
                    .with_context(|| format!("no beam.smp for rabbit{}", i + 1))?;
                procs.push(Proc {
                    name: format!("rabbit{}", i + 1),
                    pid,
                });
            }
            Ok(Deployment {
                side,
                nodes,
                procs,
                setup: json!({"cluster_up_s": round1(up_s), "cluster_sync_s": round1(sync_s),
                              "users_created": users, "shards": a.shards,
                              "controllers": a.controllers}),
                server: controllers,
                cluster: Some(cluster),
                store,
            })
        }
    }
}

fn connect_args(d: &Deployment, pki: &Path) -> ConnectArgs {
    ConnectArgs {
        server: d.nodes[0].clone(),
        pki: pki.to_path_buf(),
        id: OPERATOR.to_owned(),
        timeout: 60,
        cluster: d.side == Side::Cluster,
    }
}

/// The bench's operator session. It sits idle while devices connect, which
/// RabbitMQ ends at 1.5 × the keep-alive (rumqttc pings only while polled):
/// a failed query reconnects once and asks again.
struct Op {
    args: ConnectArgs,
    op: Operator,
}

impl Op {
    async fn connect(args: ConnectArgs) -> Result<Op> {
        let op = Operator::connect_retrying(&args, Duration::from_secs(90))
            .await
            .context("operator connect")?;
        Ok(Op { args, op })
    }

    async fn query(&mut self, verb: &str, body: Value) -> Result<Value> {
        match self.op.query(verb, body.clone()).await {
            Ok(v) => Ok(v),
            Err(_) => {
                self.op = Operator::connect_retrying(&self.args, Duration::from_secs(90))
                    .await
                    .context("operator reconnect")?;
                self.op.query(verb, body).await
            }
        }
    }
}

async fn status(op: &mut Op, body: Value) -> Result<Value> {
    op.query("status", body).await
}

fn count(v: &Value, path: &[&str]) -> u64 {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The phases.

async fn measure(side: Side, n: usize, a: &Args, pki: &Path, dir: &Path) -> Result<Value> {
    eprintln!("\n== {} with {n} devices (load {})", side.name(), loadavg());
    let load_at_start = loadavg();
    let mut d = start(side, a, pki, dir).await?;
    let result = phases(&d, n, a, pki, dir).await;
    d.stop();
    let mut out = match result {
        Ok(v) => v,
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    out["deployment"] = json!(side.name());
    out["devices"] = json!(n);
    out["setup"] = d.setup.clone();
    out["load_at_start"] = json!(load_at_start);
    out["processes"] = json!(d.procs.iter().map(|p| p.name.clone()).collect::<Vec<_>>());
    if side == Side::Cluster {
        let cdir = std::fs::canonicalize(dir.join("rabbit")).unwrap_or_else(|_| dir.join("rabbit"));
        // `cluster down` waits for the VMs; look once more after a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ours, all) = beams_left(&cdir);
        eprintln!("  after cluster down: beam.smp of this cluster {ours}, on the machine {all}");
        out["beam_smp_left"] = json!({"this_cluster": ours, "machine": all});
        // `cluster down` runs `epmd -kill`; an epmd of this cluster that
        // survived it would block the next `cluster up` on its port.
        let epmds = epmds_of(&cdir);
        for pid in &epmds {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        if !epmds.is_empty() {
            eprintln!("  an epmd of this cluster outlived cluster down: killed {epmds:?}");
        }
        out["epmd_left_after_down"] = json!(epmds.len());
        if ours > 0 {
            bail!(
                "{ours} beam.smp of {} still running after cluster down",
                cdir.display()
            );
        }
    }
    if let Some(e) = out.get("error") {
        bail!("{} at {n}: {}", side.name(), e);
    }
    Ok(out)
}

async fn phases(d: &Deployment, n: usize, a: &Args, pki: &Path, dir: &Path) -> Result<Value> {
    let procs = &d.procs;
    // The controller answers (a request sent before it subscribed is
    // lost on an external broker: ask with a short timeout until answered).
    let mut quick = connect_args(d, pki);
    quick.timeout = 3;
    let mut ready = Operator::connect_retrying(&quick, Duration::from_secs(90))
        .await
        .context("operator connect")?;
    let deadline = Instant::now() + Duration::from_secs(90);
    while ready.query("status", json!({})).await.is_err() {
        if Instant::now() > deadline {
            bail!("the controller did not answer status within 90 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ready.disconnect().await;
    let mut op = Op::connect(connect_args(d, pki)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = snapshot(procs);
    let peaks = PeakSampler::start(procs);
    let bench_cpu = || cpu_time("self");

    // 1. Connect.
    let mut sim = SimConfig::new(pki, d.nodes.join(","), "dev", n);
    sim.presence = match d.side {
        Side::Embedded => PresenceMode::Skip,
        Side::Cluster => PresenceMode::Publish,
    };
    // As docs/DEPLOYMENT.md has devices do on RabbitMQ 3.10: a QoS 1
    // subscription is a durable queue (a replicated Mnesia write per
    // device), which at 10,000 devices timed its declarations out (130 s,
    // the connection dies and comes back) until fewer were online than
    // before; the controller re-sends commands until reported.
    if d.side == Side::Cluster {
        sim.commands_qos = 0;
    }
    sim.mix = "streetlight=1".parse().map_err(anyhow::Error::msg)?;
    sim.connect_rate = match d.side {
        Side::Embedded => 0.0,
        Side::Cluster => a.connect_rate,
    };
    sim.max_connecting = a.in_flight;
    sim.connect_timeout = Duration::from_secs(30);
    sim.keep_alive = 60;
    sim.backoff = Backoff {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(2),
        multiplier: 2.0,
    };
    let before = snapshot(procs);
    let bench0 = bench_cpu();
    let t0 = Instant::now();
    let sim_commands_qos = sim.commands_qos;
    let sim_connect_rate = sim.connect_rate;
    let fleet = Fleet::start(sim).await.context("simulated fleet")?;
    let connect_limit = a.connect_limit(n, sim_connect_rate);
    let sim_online = fleet.wait_online(n, connect_limit).await;
    let sim_online_s = t0.elapsed().as_secs_f64();
    let ctl_online_s = loop {
        let s = status(&mut op, json!({})).await?;
        if count(&s, &["online"]) >= n as u64 {
            break Some(t0.elapsed().as_secs_f64());
        }
        if t0.elapsed() > connect_limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = snapshot(procs);
    let connect_bench_cpu = (bench_cpu() - bench0).as_secs_f64();
    let st = fleet.stats();
    if !sim_online || ctl_online_s.is_none() {
        bail!(
            "not all {n} online within {} s: simulator {} online, {} connect failures",
            connect_limit.as_secs(),
            st.online,
            st.connect_failures
        );
    }
    let ctl_online_s = ctl_online_s.unwrap_or(f64::NAN);
    eprintln!(
        "  connect: all {n} online at the simulator after {sim_online_s:.1} s, at the controller after {ctl_online_s:.1} s ({:.0}/s received)",
        n as f64 / ctl_online_s
    );
    let connect = json!({
        "commands_qos": sim_commands_qos,
        "sim_online_s": round2(sim_online_s),
        "controller_online_s": round2(ctl_online_s),
        "rate_received_per_s": round1(n as f64 / ctl_online_s),
        "connect_failures": st.connect_failures,
        "connect_attempts": st.connect_attempts,
        "per_node": st.per_node.iter().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)).collect::<Vec<_>>(),
        "cpu_s": cpu_json(procs, &before, &after),
        "bench_cpu_s": round2(connect_bench_cpu),
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let connected = snapshot(procs);

    // 2. Converge, `applies` times.
    let mut applies = Vec::new();
    let mut last_value = String::new();
    for k in 1..=a.applies {
        let value = format!("bench-{n}-{k}-{}", std::process::id());
        let doc = json!({"name": "bench", "target": {"all": true},
                         "state": {"maintenance_window": value}});
        let file = dir.join("bench-doc.json");
        std::fs::write(&file, doc.to_string())?;
        let mut cli = vec![
            "apply".to_owned(),
            "-f".into(),
            file.to_str().context("utf-8")?.into(),
            "--wait".into(),
            "--wait-timeout".into(),
            "300".into(),
            "--output".into(),
            "json".into(),
            "--server".into(),
            d.nodes[0].clone(),
            "--pki".into(),
            pki.to_str().context("utf-8")?.into(),
            "--id".into(),
            OPERATOR.into(),
            "--timeout".into(),
            "60".into(),
        ];
        if d.side == Side::Cluster {
            cli.push("--cluster".into());
        }
        let before = snapshot(procs);
        let bench0 = bench_cpu();
        let t = Instant::now();
        let apply = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = cli.iter().map(String::as_str).collect();
            run_cli(&args)
        });
        let want = json!(value);
        let mut devices_s = None;
        let mut controller_s = None;
        while controller_s.is_none() && t.elapsed() < Duration::from_secs(300) {
            if devices_s.is_none() {
                let (have, total) = fleet.count_with("maintenance_window", &want, None);
                if have == total {
                    devices_s = Some(t.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            } else {
                let s = status(&mut op, json!({"name": "bench"})).await?;
                if count(&s, &["converged"]) >= n as u64 && s["pending"] == 0 {
                    controller_s = Some(t.elapsed().as_secs_f64());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // `apply --wait` exits 1 when devices failed: that is a result
        // (recorded), not a reason to stop the run.
        let (out, cli_s, cli_ok) = match apply.await? {
            Ok((out, s)) => (out, s, true),
            Err(e) => {
                let text = format!("{e:#}");
                // Why, in the log: the JSON alone does not say.
                let tail: String = text
                    .chars()
                    .rev()
                    .take(600)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                eprintln!("  apply {k}: the CLI failed: …{tail}");
                let json = text
                    .find('{')
                    .and_then(|i| text.rfind('}').map(|j| text[i..=j].to_owned()))
                    .unwrap_or_default();
                (json, t.elapsed().as_secs_f64(), false)
            }
        };
        let after = snapshot(procs);
        let bench_cpu_s = (bench_cpu() - bench0).as_secs_f64();
        let answer: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
        let converged = count(&answer, &["status", "converged"]);
        eprintln!(
            "  apply {k}: CLI --wait {cli_s:.2} s; devices applied {:.2} s; controller converged {:.2} s ({converged}/{n})",
            devices_s.unwrap_or(f64::NAN),
            controller_s.unwrap_or(f64::NAN)
        );
        let failed = count(&answer, &["status", "failed"]);
        if converged < n as u64 {
            eprintln!("  apply {k}: only {converged} of {n} converged, {failed} failed");
        }
        applies.push(json!({
            "cli_ok": cli_ok,
            "failed": failed,
            "commands_resent": count(&answer, &["status", "counters", "commands_resent"]),
            "cli_wait_s": round2(cli_s),
            "devices_applied_s": devices_s.map(round2),
            "controller_converged_s": controller_s.map(round2),
            "converged": converged,
            "cpu_s": cpu_json(procs, &before, &after),
            "bench_cpu_s": round2(bench_cpu_s),
        }));
        last_value = value;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let med = |key: &str| {
        round2(median(
            applies.iter().filter_map(|r| r[key].as_f64()).collect(),
        ))
    };
    let mut cpu_median = serde_json::Map::new();
    for p in procs {
        cpu_median.insert(
            p.name.clone(),
            json!(round2(median(
                applies
                    .iter()
                    .filter_map(|r| r["cpu_s"][&p.name].as_f64())
                    .collect()
            ))),
        );
    }
    let converge = json!({
        "applies": a.applies,
        "median": {
            "cli_wait_s": med("cli_wait_s"),
            "devices_applied_s": med("devices_applied_s"),
            "controller_converged_s": med("controller_converged_s"),
            "cpu_s": cpu_median,
        },
        "runs": applies,
    });
    let converged_mem = snapshot(procs);
    let sim_stats = fleet.shutdown().await;
    drop(sim_stats);

    // 3. Reports through N device connections of this bench. Received is
    // counted by the controller answering `status` (sharded: the leader
    // adds up every controller's counters, published once a second).
    let reports = reports_phase(&mut op, d, pki, n, a, &last_value).await?;
    let end = snapshot(procs);
    op.op.disconnect().await;

    Ok(json!({
        "connect": connect,
        "converge": converge,
        "reports": reports,
        "rss_mib": {
            "idle": rss_json(procs, &idle),
            "connected": rss_json(procs, &connected),
            "after_converge": rss_json(procs, &converged_mem),
            "end": rss_json(procs, &end),
            "peak": peaks.peaks_json(procs),
        },
        "cpu_s_total": cpu_json(procs, &idle, &end),
    }))
}

/// Phase 3: `n` device connections publish `r` reports each, one in flight.
async fn reports_phase(
    op: &mut Op,
    d: &Deployment,
    pki_dir: &Path,
    n: usize,
    a: &Args,
    value: &str,
) -> Result<Value> {
    let r = a.reports;
    use cityplane_agent_sim::mqtt::{server_name, Client, ConnectOptions, Packet};
    use cityplane_agent_sim::tls::TlsBase;
    let procs = &d.procs;
    let pki = Pki::open(pki_dir)?;
    let ids = cityplane_agent_sim::device_ids("dev", n);
    let tls: Vec<_> = {
        let ids = ids.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<_>> {
            let base = TlsBase::from_ca_file(&pki.ca_cert_path())?;
            ids.iter()
                .map(|id| Ok(base.identity(&pki.cert_path(id), &pki.key_path(id))?.config))
                .collect()
        })
        .await??
    };
    let addrs: Vec<std::net::SocketAddr> = d
        .nodes
        .iter()
        .map(|a| a.parse().context("node address"))
        .collect::<Result<_>>()?;
    let name = server_name("localhost").map_err(anyhow::Error::msg)?;
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let c = Arc::new(Counters::default());
    let connecting = Arc::new(tokio::sync::Semaphore::new(a.in_flight));
    let value = value.to_owned();
    let version_base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64)
        * 1000;
    let t_connect = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (index, (id, tls)) in ids.into_iter().zip(tls).enumerate() {
        let (name, c, connecting, value) =
            (name.clone(), c.clone(), connecting.clone(), value.clone());
        let (mut go, mut stop) = (go_rx.clone(), stop_rx.clone());
        let addr = addrs[index % addrs.len()];
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
                    Ok(cl) => {
                        client = Some(cl);
                        break;
                    }
                    Err(_) => {
                        drop(permit);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
            let Some(mut client) = client else {
                c.errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            c.connected.fetch_add(1, Ordering::Relaxed);
            while !*go.borrow() {
                if go.changed().await.is_err() {
                    return;
                }
            }
            let topic = format!("devices/{id}/reported");
            // Above whatever the simulator reported before (its versions
            // start at the Unix time in ms), so none is stale.
            let base = version_base;
            for k in 1..=r {
                let body = json!({"version": base + k, "state": {
                    "class": "streetlight", "maintenance_window": value, "dimming": k}})
                .to_string();
                client.queue_publish(&topic, body.as_bytes(), 1, false);
                c.offered.fetch_add(1, Ordering::Relaxed);
                if client.flush().await.is_err() {
                    c.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if k == r {
                    c.written.fetch_add(1, Ordering::Relaxed);
                }
                loop {
                    match tokio::time::timeout(Duration::from_secs(300), client.recv()).await {
                        Ok(Ok(Packet::PubAck(_))) => {
                            c.acked.fetch_add(1, Ordering::Relaxed);
                            if k == r {
                                c.finished.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                        Ok(Ok(_)) => {}
                        _ => {
                            c.errors.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
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
    while c.connected.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed) < n as u64 {
        if t_connect.elapsed() > a.connect_limit(n, 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_s = t_connect.elapsed().as_secs_f64();
    let connected = c.connected.load(Ordering::Relaxed);
    eprintln!("  reports: {connected} report clients connected in {connect_s:.1} s");
    let counted = |s: &Value| {
        (
            count(s, &["counters", "reports"]),
            count(s, &["counters", "stale_reports"]),
        )
    };
    let (base_reports, base_stale) = counted(&status(op, json!({})).await?);
    let total = connected * r;
    let before = snapshot(procs);
    let bench0 = cpu_time("self");
    let machine0 = machine_cpu().0;
    let t = Instant::now();
    let _ = go.send(true);
    let mut written_s = None;
    let (received, stale) = loop {
        let s = status(op, json!({})).await?;
        let (reports, stale) = counted(&s);
        let (received, stale) = (reports - base_reports, stale - base_stale);
        if written_s.is_none()
            && c.written.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed) >= n as u64
        {
            written_s = Some(t.elapsed().as_secs_f64());
        }
        // Done: everything counted, or every client finished or failed
        // and every acknowledged report counted (a failed client's
        // unacknowledged report may never arrive).
        let settled = c.finished.load(Ordering::Relaxed) + c.errors.load(Ordering::Relaxed)
            >= n as u64
            && received >= c.acked.load(Ordering::Relaxed);
        if received >= total || settled || t.elapsed() > Duration::from_secs(600) {
            break (received, stale);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = t.elapsed().as_secs_f64();
    let after = snapshot(procs);
    let bench_cpu_s = (cpu_time("self") - bench0).as_secs_f64();
    let machine_cpu_s = (machine_cpu().0 - machine0).as_secs_f64();
    let acks_deadline = Instant::now() + Duration::from_secs(60);
    while c.acked.load(Ordering::Relaxed) < c.offered.load(Ordering::Relaxed)
        && Instant::now() < acks_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    let offered = c.offered.load(Ordering::Relaxed);
    let written_s = written_s.unwrap_or(took);
    // Acknowledged by the broker and not counted: where they are.
    let uncounted = c.acked.load(Ordering::Relaxed).saturating_sub(received);
    let queues = match (&d.cluster, uncounted) {
        (Some(guard), 1..) => {
            eprintln!("  reports: {uncounted} acknowledged by the broker and not counted; the controllers' queues:");
            let listed = shard_queues(&guard.dir);
            eprintln!("{listed}");
            Value::String(listed)
        }
        _ => Value::Null,
    };
    eprintln!(
        "  reports: {received} received ({stale} stale) of {total} in {took:.2} s = {:.0}/s received; offered {offered} in {written_s:.2} s",
        received as f64 / took
    );
    Ok(json!({
        "per_device": r,
        "clients_connected": connected,
        "clients_connect_s": round2(connect_s),
        "clients_errors": c.errors.load(Ordering::Relaxed),
        "offered": offered,
        "offered_s": round2(written_s),
        "offered_per_s": round1(offered as f64 / written_s),
        "pubacks_received": c.acked.load(Ordering::Relaxed),
        "received": received,
        "stale": stale,
        "persisted": received - stale,
        "received_s": round2(took),
        "received_per_s": round1(received as f64 / took),
        "persisted_per_s": round1((received - stale) as f64 / took),
        "cpu_s": cpu_json(procs, &before, &after),
        "bench_cpu_s": round2(bench_cpu_s),
        "machine_cpu_s": round2(machine_cpu_s),
        "uncounted_queues": queues,
    }))
}

/// `rabbitmqctl list_queues` of the controllers' queues (ready,
/// unacknowledged, consumers), or why it could not be had.
fn shard_queues(dir: &Path) -> String {
    let listed = cityplane::cluster::rabbit::Cluster::open(dir).and_then(|c| {
        c.ctl(
            0,
            &[
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ],
        )
    });
    match listed {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.contains("mqtt-subscription-dev"))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(list_queues: {e})"),
    }
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    offered: AtomicU64,
    written: AtomicU64,
    acked: AtomicU64,
    /// Clients with every report acknowledged.
    finished: AtomicU64,
    errors: AtomicU64,
}

// ---------------------------------------------------------------------------

async fn wait_quiet(max: u64) -> Value {
    let first = loadavg();
    let t = Instant::now();
    if max == 0 {
        return json!({"waited_s": 0, "quiet": load1() < 0.8, "loadavg": first});
    }
    eprintln!("waiting up to {max} s for a 1-minute load average below 0.8 (now {first})");
    while load1() >= 0.8 && t.elapsed() < Duration::from_secs(max) {
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    let quiet = load1() < 0.8;
    eprintln!(
        "{} after {:.0} s: load {}",
        if quiet {
            "quiet"
        } else {
            "NOT quiet, running anyway"
        },
        t.elapsed().as_secs_f64(),
        loadavg()
    );
    json!({"waited_s": t.elapsed().as_secs(), "quiet": quiet, "loadavg_before": first, "loadavg": loadavg()})
}

async fn run() -> Result<()> {
    let started = Instant::now();
    let a = args()?;
    let bench_dir = target_dir().join("bench");
    let dir = bench_dir.join("cluster");
    std::fs::create_dir_all(&dir)?;
    // RabbitMQ runs as `rabbitmq` under root: it must reach the cluster
    // directory (`cluster up` says which directory if not).
    let dir = std::fs::canonicalize(&dir)?;
    let rabbit = Path::new(RABBITMQ_SERVER).is_file();
    let mut sides = vec![Side::Embedded, Side::Cluster];
    if let Some(only) = a.only {
        sides.retain(|s| *s == only);
    }
    let mut skipped = None;
    if !rabbit && sides.contains(&Side::Cluster) {
        let why = format!("rabbitmq-server is not installed ({RABBITMQ_SERVER} missing; apt-get install rabbitmq-server): the cluster side is skipped");
        println!("{why}");
        skipped = Some(why);
        sides.retain(|s| *s != Side::Cluster);
    }
    // One PKI per size: the controller registers every device the PKI has
    // issued, so a PKI of N devices makes "every device" exactly the fleet.
    for &n in &a.sizes {
        let pki = bench::prepare_pki_verbose(&dir.join(format!("pki-{n}")), "dev", n, CONTROLLER)?;
        if !pki.cert_path(OPERATOR).exists() {
            pki.issue(Role::Operator, OPERATOR)?;
        }
    }
    let quiet = wait_quiet(a.quiet_wait).await;
    let machine_cpu0 = machine_cpu().0;
    let mut results = Vec::new();
    for &n in &a.sizes {
        for &side in &sides {
            results.push(measure(side, n, &a, &dir.join(format!("pki-{n}")), &dir).await?);
            // What is measured so far survives a later failure.
            std::fs::write(
                bench_dir.join("cluster.partial.json"),
                serde_json::to_string_pretty(&results)?,
            )?;
        }
    }
    let fits = fits(&results);
    let result = json!({
        "bench": "cluster",
        "machine": machine::describe(),
        "rabbitmq": rabbit.then_some("3.10 (Debian rabbitmq-server)"),
        "skipped": skipped,
        "quiet": quiet,
        "loadavg_end": loadavg(),
        "machine_cpu_s": round1((machine_cpu().0 - machine_cpu0).as_secs_f64()),
        "sizes": a.sizes,
        "reports_per_device": a.reports,
        "applies": a.applies,
        "handshakes_in_flight": a.in_flight,
        // Per size, at the cluster's pace.
        "connect_limit_s": a.sizes.iter().map(|&n| a.connect_limit(n, a.connect_rate).as_secs()).collect::<Vec<_>>(),
        "cluster_command_timeout_s": a.command_timeout,
        "cluster_connect_rate_per_s": a.connect_rate,
        "repetition": format!("each size once per deployment; the converge {} times (medians); connect and reports once", a.applies),
        "results": results,
        "fits": fits,
    });
    summary(&result);
    bench::write_result(&bench_dir, "cluster", &result, started)
}

/// Least-squares line y = a + b·N over the sizes measured, per deployment
/// and quantity: the cost curve the capacity model extrapolates.
fn fits(results: &[Value]) -> Value {
    let mut out = serde_json::Map::new();
    for side in ["embedded", "cluster"] {
        let rows: Vec<&Value> = results.iter().filter(|r| r["deployment"] == side).collect();
        if rows.len() < 2 {
            continue;
        }
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for r in &rows {
            let n = r["devices"].as_f64().unwrap_or(0.0);
            for proc in r["processes"].as_array().into_iter().flatten() {
                let p = proc.as_str().unwrap_or("?");
                let mut push = |key: String, y: Option<f64>| {
                    if let Some(y) = y {
                        series.entry(key).or_default().push((n, y));
                    }
                };
                push(
                    format!("{p}.rss_connected_mib"),
                    r["rss_mib"]["connected"][p].as_f64(),
                );
                push(
                    format!("{p}.rss_peak_mib"),
                    r["rss_mib"]["peak"][p].as_f64(),
                );
                push(
                    format!("{p}.cpu_connect_s"),
                    r["connect"]["cpu_s"][p].as_f64(),
                );
                push(
                    format!("{p}.cpu_converge_s"),
                    r["converge"]["median"]["cpu_s"][p].as_f64(),
                );
                push(
                    format!("{p}.cpu_reports_s"),
                    r["reports"]["cpu_s"][p].as_f64(),
                );
            }
        }
        let mut side_fits = serde_json::Map::new();
        for (key, pts) in series {
            if let Some((a, b)) = line(&pts) {
                side_fits.insert(
                    key,
                    json!({"intercept": round2(a), "per_device": b, "points": pts}),
                );
            }
        }
        out.insert(side.into(), side_fits.into());
    }
    out.into()
}

fn line(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return None;
    }
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

fn summary(r: &Value) {
    println!(
        "\nRabbitMQ cluster (3 nodes + cityplane controller) vs embedded (cityplane serve), 127.0.0.1, mTLS; {}",
        r["repetition"].as_str().unwrap_or("")
    );
    println!(
        "machine: {} x {}, load at start {} (quiet: {}), at end {}",
        r["machine"]["nproc"],
        r["machine"]["cpu_model"].as_str().unwrap_or("?"),
        r["quiet"]["loadavg"].as_str().unwrap_or("?"),
        r["quiet"]["quiet"],
        r["loadavg_end"].as_str().unwrap_or("?")
    );
    if let Some(s) = r["skipped"].as_str() {
        println!("{s}");
    }
    println!(
        "{:>6} {:<9} {:>10} {:>9} {:>9} {:>9} {:>11} {:>11} {:>10} {:>24}",
        "N",
        "side",
        "connect/s",
        "apply CLI",
        "devices",
        "ctl conv",
        "reports rx/s",
        "offered/s",
        "server MiB",
        "rabbit MiB (n1/n2/n3)"
    );
    for x in r["results"].as_array().into_iter().flatten() {
        let side = x["deployment"].as_str().unwrap_or("?");
        let connected = &x["rss_mib"]["connected"];
        // The controllers together (sharded: several), or the server.
        let main: f64 = connected
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with("controller") || k.as_str() == "server")
            .filter_map(|(_, v)| v.as_f64())
            .sum();
        let rab: Vec<String> = (1..=3)
            .filter_map(|i| x["rss_mib"]["connected"][format!("rabbit{i}")].as_f64())
            .map(|m| format!("{m:.0}"))
            .collect();
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>6} {:<9} {:>10.0} {:>8.2}s {:>8.2}s {:>8.2}s {:>11.0} {:>11.0} {:>10.0} {:>24}",
            x["devices"],
            side,
            f(&x["connect"]["rate_received_per_s"]),
            f(&x["converge"]["median"]["cli_wait_s"]),
            f(&x["converge"]["median"]["devices_applied_s"]),
            f(&x["converge"]["median"]["controller_converged_s"]),
            f(&x["reports"]["received_per_s"]),
            f(&x["reports"]["offered_per_s"]),
            main,
            if rab.is_empty() {
                "-".into()
            } else {
                rab.join("/")
            },
        );
        let cpu = |phase: &Value| -> String {
            phase
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k} {:.1}", v.as_f64().unwrap_or(0.0)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:>17} CPU s: connect [{}]; converge median [{}]; reports [{}]",
            "",
            cpu(&x["connect"]["cpu_s"]),
            cpu(&x["converge"]["median"]["cpu_s"]),
            cpu(&x["reports"]["cpu_s"])
        );
    }
    println!("(connect/s and reports rx/s: received, counted by the controller; offered/s: written by the report clients; MiB: VmRSS with all N connected)");
}
