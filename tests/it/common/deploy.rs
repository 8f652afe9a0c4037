//! One fleet, three ways to run cityplane: the embedded `serve` (broker and
//! controller in one process), `cityplane controller` behind mosquitto (one
//! external node, its ACL what `cluster sync` gives RabbitMQ), and
//! `cityplane controller` behind a 3-node RabbitMQ cluster. The scenarios in
//! `tests/it/deployments.rs` run unchanged on each, through the same CLI
//! and devices a user has; only what a deployment cannot promise (listed
//! in docs/DEPLOYMENT.md) differs, and each difference is asserted too.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cityplane_agent_sim::{Backoff, PresenceMode, SimConfig};
use cityplane_testkit::process::ChildGuard;
use serde_json::Value;

use super::cluster::RabbitCluster;
use super::{free_port, ok, Server, BIN};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedded,
    Mosquitto,
    Rabbit,
}

enum Running {
    Embedded(Server),
    Mosquitto {
        broker: ChildGuard,
        controllers: Vec<ChildGuard>,
    },
    Rabbit {
        cluster: RabbitCluster,
        controllers: Vec<ChildGuard>,
    },
}

/// The controllers of an external deployment: `count` processes (the
/// first acts, the others stand by) sharing `store` (PostgreSQL; `None`:
/// one controller on sled) and one data directory.
#[derive(Debug, Clone, Default)]
pub struct Controllers {
    pub count: usize,
    pub store: Option<String>,
    /// `--shards N` (RabbitMQ): device messages through N shard sessions,
    /// bound by `cluster sync --shards N` before the devices connect.
    pub shards: Option<u32>,
}

/// A running deployment with its PKI: operator `op`, devices
/// `dev0001`… (streetlights), device `rogue01` (no class), controller
/// `controller`.
pub struct Deployment {
    /// First: stopped before the directory it runs in is removed.
    running: Running,
    pub kind: Kind,
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    /// Where devices and operators connect, `127.0.0.1:PORT`, one per node.
    pub nodes: Vec<String>,
    controllers: Controllers,
}

impl Deployment {
    /// Issues the PKI and starts `kind` with `devices` device certificates;
    /// `None` when the deployment's programs are missing and not required
    /// (see `skip_unless_installed` of each).
    pub fn start(kind: Kind, test: &str, devices: usize) -> Option<Deployment> {
        Deployment::start_with(kind, test, devices, Controllers::default())
    }

    /// [`Deployment::start`] with `controllers` (external kinds only).
    pub fn start_with(
        kind: Kind,
        test: &str,
        devices: usize,
        controllers: Controllers,
    ) -> Option<Deployment> {
        if kind == Kind::Mosquitto && cityplane_testkit::mosquitto::skip_unless_installed(test) {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let p = pki.to_str().expect("utf-8");
        ok(Command::new(BIN).args(["certs", "init", "--pki", p]));
        ok(Command::new(BIN).args([
            "certs", "issue", "--pki", p, "--role", "operator", "--id", "op", "--org", "city",
        ]));
        ok(Command::new(BIN).args([
            "certs",
            "issue",
            "--pki",
            p,
            "--role",
            "controller",
            "--id",
            "controller",
        ]));
        ok(Command::new(BIN).args([
            "certs",
            "issue",
            "--pki",
            p,
            "--role",
            "device",
            "--count",
            &devices.to_string(),
            "--prefix",
            "dev",
            "--class",
            "streetlight",
        ]));
        // A device of no class: the suite's rogue, which no document targets.
        ok(Command::new(BIN).args([
            "certs", "issue", "--pki", p, "--role", "device", "--id", "rogue01",
        ]));
        let data = dir.path().join("data");
        let (running, nodes) = match kind {
            Kind::Embedded => {
                let port = free_port();
                let server =
                    Server::start(&pki, &data, port, &dir.path().join("serve.log"), "info");
                (Running::Embedded(server), vec![format!("127.0.0.1:{port}")])
            }
            Kind::Mosquitto => {
                let acl = cityplane_testkit::mosquitto::cluster_acl(dir.path(), &["controller"])
                    .expect("acl");
                let (broker, addr) = cityplane_testkit::mosquitto::start_with(
                    "deployments",
                    &cityplane_certs::Pki::open(&pki).expect("pki"),
                    dir.path(),
                    "",
                    &acl,
                )
                .expect("mosquitto");
                let nodes = vec![addr.to_string()];
                let controller =
                    start_controller(&pki, &data, &nodes, dir.path(), &[], &controllers, 0);
                (
                    Running::Mosquitto {
                        broker,
                        controllers: vec![controller],
                    },
                    nodes,
                )
            }
            Kind::Rabbit => {
                let cluster = RabbitCluster::up(&pki, &dir.path().join("rabbit"))?;
                match controllers.shards {
                    Some(n) => cluster.sync_with(&pki, &["--shards", &n.to_string()]),
                    None => cluster.sync(&pki),
                };
                let nodes = cluster.mqtts();
                let controller = start_controller(
                    &pki,
                    &data,
                    &nodes,
                    dir.path(),
                    &["--cluster-dir", cluster.dir().to_str().expect("utf-8")],
                    &controllers,
                    0,
                );
                (
                    Running::Rabbit {
                        cluster,
                        controllers: vec![controller],
                    },
                    nodes,
                )
            }
        };
        let mut d = Deployment {
            kind,
            dir,
            pki,
            nodes,
            running,
            controllers: controllers.clone(),
        };
        d.wait_up();
        // Started once the first one acts: they stand by.
        for i in 1..controllers.count {
            let child = d.start_controller(i);
            d.controller_guards().push(child);
        }
        Some(d)
    }

    fn start_controller(&self, i: usize) -> ChildGuard {
        let data = self.dir.path().join("data");
        let cluster_dir;
        let extra: Vec<&str> = match self.cluster() {
            Some(c) => {
                cluster_dir = c.dir().to_str().expect("utf-8").to_owned();
                vec!["--cluster-dir", &cluster_dir]
            }
            None => Vec::new(),
        };
        start_controller(
            &self.pki,
            &data,
            &self.nodes,
            self.dir.path(),
            &extra,
            &self.controllers,
            i,
        )
    }

    fn controller_guards(&mut self) -> &mut Vec<ChildGuard> {
        match &mut self.running {
            Running::Mosquitto { controllers, .. } | Running::Rabbit { controllers, .. } => {
                controllers
            }
            Running::Embedded(_) => panic!("the embedded deployment has no controller process"),
        }
    }

    /// Controller `i`'s process id.
    pub fn controller_pid(&mut self, i: usize) -> u32 {
        self.controller_guards()[i].pid()
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`) to controller `i`.
    pub fn signal_controller(&mut self, i: usize, signal: &str) {
        let pid = self.controller_pid(i);
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Kills mosquitto, waits `away`, and starts it again on the same
    /// port (mosquitto deployments only): every client loses its
    /// connection, and the broker what its sessions held.
    pub fn restart_broker(&mut self, away: Duration) {
        let dir = self.dir.path().to_path_buf();
        let addr: std::net::SocketAddr = self.nodes[0].parse().expect("node address");
        let Running::Mosquitto { broker, .. } = &mut self.running else {
            panic!("restart_broker: a mosquitto deployment only");
        };
        broker.kill().expect("kill mosquitto");
        broker.wait().expect("reap mosquitto");
        std::thread::sleep(away);
        *broker = cityplane_testkit::mosquitto::restart(&dir, "", addr).expect("mosquitto again");
    }

    /// Controller `i`'s exit status, once it has exited.
    pub fn controller_exit(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.controller_guards()[i].try_wait().expect("try_wait")
    }

    /// Controller `i`'s log.
    pub fn controller_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(controller_log_name(i))).unwrap_or_default()
    }

    /// Runs on an external broker: operators name themselves in topics.
    pub fn external(&self) -> bool {
        self.kind != Kind::Embedded
    }

    /// The `cityplane` binary as operator `op`, against the first node.
    pub fn cli(&self, args: &[&str]) -> Command {
        self.cli_at(0, args)
    }

    /// The `cityplane` binary as operator `op`, against node `node`.
    pub fn cli_at(&self, node: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("CITYPLANE_SERVER", &self.nodes[node])
            .env("CITYPLANE_PKI", &self.pki)
            .env("CITYPLANE_ID", "op")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null());
        if self.external() {
            cmd.env("CITYPLANE_CLUSTER", "true");
        }
        cmd
    }

    /// An operator command with `--output json` that must succeed; its answer.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.extend(["--output", "json"]);
        let out = ok(&mut self.cli(&args));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// An operator command that must fail; what it said on stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        super::fails(&mut self.cli(args))
    }

    /// Writes `doc` to a file in the deployment's directory; its path.
    pub fn file(&self, name: &str, doc: &Value) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, doc.to_string()).expect("write");
        path.to_str().expect("utf-8").to_owned()
    }

    /// Simulated streetlights `dev0001`…`dev{n}` spread over every node.
    pub fn sim(&self, n: usize) -> SimConfig {
        let mut sim = SimConfig::new(&self.pki, self.nodes.join(","), "dev", n);
        // What the registry says they are (`certs issue --class`).
        sim.mix = "streetlight=1".parse().expect("mix");
        // The embedded broker publishes presence itself; an external one
        // carries the devices' own birth message and will.
        sim.presence = if self.external() {
            PresenceMode::Publish
        } else {
            PresenceMode::Skip
        };
        if self.kind == Kind::Rabbit {
            // docs/DEPLOYMENT.md: a QoS 1 subscription on RabbitMQ 3.10 is
            // a queue stranded on its node when that node dies.
            sim.commands_qos = 0;
        }
        sim.backoff = Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(400),
            multiplier: 2.0,
        };
        sim
    }

    /// Revokes `id`'s certificates with `certs revoke`, and nothing else:
    /// the embedded broker watches the list, `cityplane controller
    /// --cluster-dir` deletes the RabbitMQ user (cutting its sessions
    /// cluster-wide).
    pub fn revoke(&self, id: &str) {
        let p = self.pki.to_str().expect("utf-8");
        ok(Command::new(BIN).args(["certs", "revoke", "--pki", p, "--id", id]));
    }

    /// Whether a live session is cut when its certificate is revoked or its
    /// device quarantined. Mosquitto reads its CRL only at start and knows
    /// nothing of the controller's quarantine.
    pub fn cuts_sessions(&self) -> bool {
        self.kind != Kind::Mosquitto
    }

    /// The RabbitMQ cluster, on that deployment.
    pub fn cluster(&self) -> Option<&RabbitCluster> {
        match &self.running {
            Running::Rabbit { cluster, .. } => Some(cluster),
            _ => None,
        }
    }

    /// Whether the server (or the controller) process is still running.
    pub fn alive(&mut self) -> bool {
        match &mut self.running {
            Running::Embedded(server) => server.alive(),
            Running::Mosquitto { controllers, .. } | Running::Rabbit { controllers, .. } => {
                matches!(controllers[0].try_wait(), Ok(None))
            }
        }
    }

    /// The server's or the controller's log.
    pub fn log(&self) -> String {
        let name = match self.kind {
            Kind::Embedded => "serve.log",
            _ => "controller.log",
        };
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn wait_up(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let out = self
                .cli(&["status", "--timeout", "2"])
                .output()
                .expect("status runs");
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{:?} did not answer `status` within 60 s: {}\n{}",
                self.kind,
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// `controller.log`, then `controller-1.log`….
/// A failed test's logs (the controllers', the server's) outlive its
/// directory: copied to `$TMPDIR/cityplane-failed/<dir>/`, and the path said.
impl Drop for Deployment {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Some(name) = self.dir.path().file_name() else {
            return;
        };
        let keep = std::env::temp_dir().join("cityplane-failed").join(name);
        if std::fs::create_dir_all(&keep).is_err() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let _ = std::fs::copy(&path, keep.join(entry.file_name()));
            }
        }
        eprintln!("logs kept in {}", keep.display());
    }
}

fn controller_log_name(i: usize) -> String {
    match i {
        0 => "controller.log".into(),
        i => format!("controller-{i}.log"),
    }
}

/// Controller `i` of `controllers` against `nodes`, its log in `dir`.
fn start_controller(
    pki: &Path,
    data: &Path,
    nodes: &[String],
    dir: &Path,
    extra: &[&str],
    controllers: &Controllers,
    i: usize,
) -> ChildGuard {
    let log = std::fs::File::create(dir.join(controller_log_name(i))).expect("log");
    let mut cmd = Command::new(BIN);
    if let Some(url) = &controllers.store {
        cmd.arg("controller").arg("--store").arg(url);
    } else {
        cmd.arg("controller");
    }
    if let Some(n) = controllers.shards {
        cmd.arg("--shards").arg(n.to_string());
    }
    let child = cmd
        .arg("--broker")
        .arg(nodes.join(","))
        .arg("--pki")
        .arg(pki)
        .arg("--data")
        .arg(data)
        .args(extra)
        .env("CITYPLANE_ROLLOUT_TICK_MS", "100")
        .env("CITYPLANE_COMPLIANCE_TICK_MS", "200")
        // Above the copies' lag (seconds), under the default minute: the
        // kill test waits for the leader to prune.
        .env("CITYPLANE_INTENT_KEEP_SECS", "20")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("controller starts");
    ChildGuard::new(child)
}
