//! A 3-node RabbitMQ cluster (`cityplane cluster up`) for end-to-end tests,
//! stopped by `cluster down` when dropped.
//!
//! ```ignore
//! let Some(cluster) = RabbitCluster::up(&pki, &dir.path().join("rabbit")) else {
//!     return; // not installed, and CITYPLANE_REQUIRE_RABBITMQ is not set
//! };
//! cluster.sync(&pki);                  // one user per issued identity
//! let node0 = &cluster.mqtts()[0];     // "127.0.0.1:PORT", mTLS from `pki`
//! ```
//!
//! Starting takes ~25 s on 2 cores: share one cluster per test function.
//! The methods block (they run the `cityplane` binary): call them from a
//! multi-threaded tokio test, or from `spawn_blocking`, so MQTT clients'
//! tasks keep running meanwhile.

use std::path::{Path, PathBuf};
use std::process::Command;

use cityplane::cluster::rabbit::{Cluster, RABBITMQ_BIN};
use serde_json::Value;

use super::{ok, BIN};

/// Ports a cluster uses above its base: MQTTS +0..2, management +10..12,
/// distribution +20..22, epmd +30.
const PORT_SPAN: u16 = 31;

/// A running cluster of 3 nodes on 127.0.0.1; `cluster down` on drop.
pub struct RabbitCluster {
    dir: PathBuf,
    mqtts: Vec<String>,
    down: bool,
}

impl RabbitCluster {
    /// Starts a cluster in `dir` (created if missing) with the broker
    /// certificate of the PKI in `pki`, on random free ports. `None` when
    /// RabbitMQ is not installed and `CITYPLANE_REQUIRE_RABBITMQ` is unset
    /// (or `0`): the caller returns, skipped, after the reason is printed.
    /// Panics if it is required and missing, or if the cluster fails to
    /// start (after stopping whatever did start).
    pub fn up(pki: &Path, dir: &Path) -> Option<RabbitCluster> {
        if !installed() {
            return None;
        }
        std::fs::create_dir_all(dir).expect("cluster directory");
        // As root the nodes run as `rabbitmq`, which must reach `dir`; a
        // test's tempdir is 0700.
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir).expect("stat").permissions().mode();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))
            .expect("make the cluster directory reachable");
        let dir = std::fs::canonicalize(dir).expect("canonical cluster directory");
        // The probe and `up` race with other tests binding ports: retry on
        // a taken port (`up` checks every port before it writes anything).
        let mut last = String::new();
        for _ in 0..5 {
            let base = free_base_port();
            let out = Command::new(BIN)
                .args(["cluster", "up", "--output", "json", "--dir"])
                .arg(&dir)
                .arg("--pki")
                .arg(pki)
                .args(["--base-port", &base.to_string()])
                .output()
                .expect("cityplane cluster up runs");
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() {
                let up: Value = serde_json::from_slice(&out.stdout).expect("up's JSON");
                let mqtts = up["mqtts"]
                    .as_array()
                    .expect("mqtts")
                    .iter()
                    .map(|a| a.as_str().expect("address").to_owned())
                    .collect();
                return Some(RabbitCluster {
                    dir,
                    mqtts,
                    down: false,
                });
            }
            if !stderr.contains("is taken") {
                stop(&dir);
                panic!("cityplane cluster up failed: {}\n{stderr}", out.status);
            }
            last = stderr;
        }
        panic!("no free base port after 5 tries: {last}");
    }

    /// `cluster sync --output json`: the report (`created`, `revoked`,
    /// `refused`, `drift`, ...).
    pub fn sync(&self, pki: &Path) -> Value {
        self.sync_with(pki, &[])
    }

    /// [`RabbitCluster::sync`] with `--prune`: drift users are deleted.
    pub fn sync_prune(&self, pki: &Path) -> Value {
        self.sync_with(pki, &["--prune"])
    }

    /// `cluster sync --output json` with more arguments.
    pub fn sync_with(&self, pki: &Path, extra: &[&str]) -> Value {
        let out = ok(Command::new(BIN)
            .args(["cluster", "sync", "--output", "json", "--dir"])
            .arg(&self.dir)
            .arg("--pki")
            .arg(pki)
            .args(extra));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("sync's JSON: {e}: {out}"))
    }

    /// `cluster status --output json`, healthy or not.
    pub fn status(&self) -> Value {
        let out = Command::new(BIN)
            .args(["cluster", "status", "--output", "json", "--dir"])
            .arg(&self.dir)
            .output()
            .expect("cityplane cluster status runs");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status's JSON: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// `"127.0.0.1:PORT"` of each node's MQTTS listener, node 0 first.
    pub fn mqtts(&self) -> Vec<String> {
        self.mqtts.clone()
    }

    /// The cluster directory: `admin.secret` (the management API's
    /// password for `cityplane-admin`), `cluster.json`, the nodes' logs
    /// in `rabbitN/log/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILLs node `i`'s VM (0-based, as in [`RabbitCluster::mqtts`]): a
    /// crash. Its clients lose their connections at once.
    pub fn kill_node(&self, i: usize) {
        Cluster::open(&self.dir)
            .expect("cluster.json")
            .kill_node(i)
            .expect("kill node");
    }

    /// Starts node `i` again (`cluster start-node`) and returns once it runs
    /// in the cluster and listens (~7 s here).
    pub fn start_node(&self, i: usize) {
        ok(Command::new(BIN)
            .args([
                "cluster",
                "start-node",
                "--node",
                &(i + 1).to_string(),
                "--dir",
            ])
            .arg(&self.dir));
    }

    /// Registers a name with this cluster's epmd and keeps it registered
    /// while the returned socket is open: what a node not yet unregistered,
    /// or a CLI's Erlang VM, looks like to epmd at `cluster down`.
    pub fn hold_epmd_name(&self, name: &str) -> std::net::TcpStream {
        use std::io::{Read as _, Write as _};
        let port = Cluster::open(&self.dir)
            .expect("the cluster's record")
            .info
            .epmd_port;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("epmd listens");
        // ALIVE2_REQ (erts' epmd protocol): listening port, normal node,
        // TCP, distribution versions 5..6, the name, no extra.
        let mut body = vec![b'x'];
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&[77, 0]);
        body.extend_from_slice(&6u16.to_be_bytes());
        body.extend_from_slice(&5u16.to_be_bytes());
        body.extend_from_slice(&u16::try_from(name.len()).expect("short").to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&0u16.to_be_bytes());
        let mut req = u16::try_from(body.len())
            .expect("short")
            .to_be_bytes()
            .to_vec();
        req.extend_from_slice(&body);
        s.write_all(&req).expect("ALIVE2_REQ");
        let mut resp = [0u8; 2];
        s.read_exact(&mut resp).expect("ALIVE2 response");
        assert!(
            matches!(resp, [b'y' | b'v', 0]),
            "epmd refused the name: {resp:?}"
        );
        s
    }

    /// `cluster down`, asserting that it succeeded and left no process of
    /// this cluster (drop does the same without asserting). Whatever it
    /// left is killed before the panic.
    pub fn down(mut self) {
        self.down = true;
        let out = Command::new(BIN)
            .args(["cluster", "down", "--dir"])
            .arg(&self.dir)
            .output()
            .expect("cityplane cluster down runs");
        let left = processes_of(&self.dir);
        if !out.status.success() || !left.is_empty() {
            stop(&self.dir);
            panic!(
                "cluster down: {}, left these processes of {}: {left:?}\n{}",
                out.status,
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        if !self.down {
            stop(&self.dir);
        }
    }
}

/// Whether `rabbitmq-server` is installed; if not, says so and returns
/// false, or panics when `CITYPLANE_REQUIRE_RABBITMQ` is set to anything
/// but `0` (CI).
pub fn installed() -> bool {
    let server = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
    if server.is_file() {
        return true;
    }
    let required =
        std::env::var("CITYPLANE_REQUIRE_RABBITMQ").is_ok_and(|v| !v.is_empty() && v != "0");
    assert!(
        !required,
        "CITYPLANE_REQUIRE_RABBITMQ is set but {} is missing (apt-get install rabbitmq-server)",
        server.display()
    );
    eprintln!(
        "SKIPPED: {} is not installed (apt-get install rabbitmq-server; \
         set CITYPLANE_REQUIRE_RABBITMQ=1 to make this an error)",
        server.display()
    );
    false
}

/// A base port whose 31 ports are free now, below Linux's ephemeral range
/// (32768..) so outgoing connections do not take them meanwhile; random,
/// so parallel tests rarely probe the same one.
pub fn free_base_port() -> u16 {
    loop {
        let base = fastrand::u16(20000..32768 - PORT_SPAN);
        let free =
            (base..base + PORT_SPAN).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
}

/// `cluster down`, then SIGKILL to anything of the cluster still alive: a
/// failed test must not leave nodes running on a shared machine.
fn stop(dir: &Path) {
    let out = Command::new(BIN)
        .args(["cluster", "down", "--dir"])
        .arg(dir)
        .output();
    if let Some(out) = out.ok().filter(|o| !o.status.success()) {
        eprintln!(
            "cluster down failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let left = processes_of(dir);
    for pid in &left {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    // A VM takes a moment to exit after SIGKILL, and one whose wrapper died
    // with it stays a zombie until PID 1 reaps it: the next test (or the
    // caller's `pgrep beam`) must see neither.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while left
        .iter()
        .any(|pid| Path::new(&format!("/proc/{pid}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Live processes started for the cluster in `dir` (the node wrappers, the
/// Erlang VMs, their epmd): `cluster up` names `dir` in every node's
/// environment, which the children inherit. Zombies have no environment.
fn processes_of(dir: &Path) -> Vec<u32> {
    let marker = format!("RABBITMQ_MNESIA_BASE={}/", dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|b| *b == 0)
                    .any(|v| v.starts_with(marker.as_bytes()))
            })
        })
        .collect()
}
