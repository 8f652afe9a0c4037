//! A RabbitMQ cluster on loopback, from the project PKI: `cluster up`,
//! `status`, `down`, one node's `stop_node`/`start_node`, and the crash
//! the tests inject (`kill_node`).
//!
//! Layout of a cluster directory:
//!
//! | path | what |
//! |---|---|
//! | `cluster.json` | node names and ports (public) |
//! | `admin.secret` | the management API's password (0600, the operator's) |
//! | `home/.erlang.cookie` | the one cookie every node and `rabbitmqctl` share (0400) |
//! | `tls/` | `ca.crt`, `broker.crt`, `broker.key` (0600) copied from the PKI |
//! | `rabbitN/` | config, plugins file, mnesia, RabbitMQ's log (`log/`), its console (`console.log`), pid files |
//!
//! As root, RabbitMQ runs as the `rabbitmq` user (as Debian's own wrapper
//! does), so everything a node reads or writes is created owned by it.
//! Ports, for a base port P and node i (0-based): MQTTS P+i, management
//! HTTP P+10+i, Erlang distribution P+20+i, and one epmd on P+30 for the
//! whole cluster, so two clusters on one host (a test and a developer's)
//! never meet. Everything listens on 127.0.0.1 only.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::mgmt::{Mgmt, MgmtError};

/// Debian's `rabbitmq-server` package puts the real scripts here; the
/// `/usr/sbin` wrappers would redirect the console to /var/log and `cd`
/// to /var/lib/rabbitmq.
pub const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
const INSTALL_HINT: &str = "apt-get install rabbitmq-server";
/// The management API's administrator: created by the first node's first
/// boot, with no permission on any vhost, so it cannot speak MQTT.
pub const ADMIN_USER: &str = "cityplane-admin";
pub const MAX_NODES: usize = 9;
pub const DEFAULT_BASE_PORT: u16 = 28830;
/// A node of this machine kind starts in ~20 s; two joining at once on
/// two busy cores take longer.
/// The MQTT plugin's unacknowledged deliveries per subscriber
/// (`mqtt.prefetch`, see `node_config`).
const MQTT_PREFETCH: u32 = 1000;
const START_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

const CLUSTER_FILE: &str = "cluster.json";
const SECRET_FILE: &str = "admin.secret";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("RabbitMQ is not installed ({0} is missing): {INSTALL_HINT}")]
    NotInstalled(PathBuf),
    #[error("port {port} on 127.0.0.1 is taken ({what}); choose another --base-port")]
    PortTaken { port: u16, what: String },
    #[error("{0} already holds a cluster; `cityplane cluster down --dir {0}` first")]
    AlreadyUp(PathBuf),
    #[error("{0} holds no cluster (no {CLUSTER_FILE}); `cityplane cluster up` creates one")]
    NoCluster(PathBuf),
    #[error("--nodes must be 1 to {MAX_NODES}, not {0}")]
    BadNodeCount(usize),
    #[error("this cluster has nodes 1 to {nodes}, not {node}")]
    NoSuchNode { node: usize, nodes: usize },
    #[error("{0} is running already")]
    NodeRunning(String),
    #[error("the user {user} cannot reach {path}: give it search permission (o+x) on every directory above --dir, or choose another --dir")]
    NotTraversable { user: String, path: PathBuf },
    #[error("node {node} did not come up: {why}. Last lines of {log}:\n{tail}")]
    NodeFailed {
        node: String,
        why: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Pki(#[from] cityplane_certs::CertError),
    #[error(transparent)]
    Mgmt(#[from] MgmtError),
    #[error("{path}: {source}")]
    BadState {
        path: PathBuf,
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What `cluster up` is asked for.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub dir: PathBuf,
    pub pki: PathBuf,
    pub nodes: usize,
    pub base_port: u16,
}

/// `cluster.json`: how to reach each node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterInfo {
    pub nodes: Vec<NodeInfo>,
    pub epmd_port: u16,
    pub admin_user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    /// `rabbitN@localhost`.
    pub name: String,
    pub mqtts: SocketAddr,
    pub management: SocketAddr,
    pub dist_port: u16,
}

impl NodeInfo {
    /// `rabbitN`: the node's directory under the cluster directory.
    fn short(&self) -> &str {
        self.name.split('@').next().unwrap_or(&self.name)
    }
}

/// One node as `cluster status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    pub mqtts: SocketAddr,
    /// Its Erlang VM is alive (pid file and /proc).
    pub process: bool,
    /// The cluster (any node's management API) says it runs.
    pub running: bool,
    /// Its MQTTS port accepts connections.
    pub mqtt_listening: bool,
    /// Erlang's memory use as the management API reports it (bytes).
    pub mem_used: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClusterStatus {
    pub dir: PathBuf,
    pub nodes: Vec<NodeStatus>,
    /// Every node runs and listens.
    pub healthy: bool,
}

/// A cluster directory holding `cluster.json`.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub dir: PathBuf,
    pub info: ClusterInfo,
}

/// Who the nodes run as: `rabbitmq` when we are root (RabbitMQ refuses
/// nothing as root, but Debian's layout and FIELD-NOTES assume it), else
/// ourselves.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    ids: Option<(u32, u32)>,
}

impl RunAs {
    fn detect() -> Result<RunAs, ClusterError> {
        if effective_uid() != Some(0) {
            return Ok(RunAs {
                name: std::env::var("USER").unwrap_or_else(|_| "this user".into()),
                ids: None,
            });
        }
        let passwd = fs::read_to_string("/etc/passwd").map_err(io(Path::new("/etc/passwd")))?;
        let ids = passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == "rabbitmq")
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
                .flatten()
        });
        match ids {
            Some(ids) => Ok(RunAs {
                name: "rabbitmq".into(),
                ids: Some(ids),
            }),
            None => Err(ClusterError::NotInstalled(PathBuf::from(
                "the rabbitmq system user",
            ))),
        }
    }

    /// Makes `path` (just created by us) the node user's.
    fn own(&self, path: &Path) -> Result<(), ClusterError> {
        match self.ids {
            Some((uid, gid)) => {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io(path))
            }
            None => Ok(()),
        }
    }

    /// Whether this user can search every directory from `/` to `dir`.
    fn can_reach(&self, dir: &Path) -> Result<(), ClusterError> {
        let Some((uid, gid)) = self.ids else {
            return Ok(());
        };
        for d in dir.ancestors().filter(|d| !d.as_os_str().is_empty()) {
            let m = fs::metadata(d).map_err(io(d))?;
            let mode = m.mode();
            let ok = if m.uid() == uid {
                mode & 0o100 != 0
            } else if m.gid() == gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !ok {
                return Err(ClusterError::NotTraversable {
                    user: self.name.clone(),
                    path: d.to_owned(),
                });
            }
        }
        Ok(())
    }
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Starts a cluster as `spec` says, waits until it is healthy and returns
/// it. `progress` gets one line per step (the start takes 20 to 60 s).
/// RabbitMQ's own output goes to files under the node's directory.
pub async fn up(
    spec: &ClusterSpec,
    mut progress: impl FnMut(&str),
) -> Result<Cluster, ClusterError> {
    let server = Path::new(RABBITMQ_BIN).join("rabbitmq-server");
    if !server.is_file() {
        return Err(ClusterError::NotInstalled(server));
    }
    if spec.nodes == 0 || spec.nodes > MAX_NODES {
        return Err(ClusterError::BadNodeCount(spec.nodes));
    }
    if spec.dir.join(CLUSTER_FILE).exists() {
        return Err(ClusterError::AlreadyUp(spec.dir.clone()));
    }
    let pki = cityplane_certs::Pki::open(&spec.pki)?;
    let run_as = RunAs::detect()?;
    let info = layout(spec.nodes, spec.base_port);
    check_ports(&info)?;
    fs::create_dir_all(&spec.dir).map_err(io(&spec.dir))?;
    let dir = fs::canonicalize(&spec.dir).map_err(io(&spec.dir))?;
    run_as.can_reach(&dir)?;

    let password = random_secret();
    write_new(&dir.join(SECRET_FILE), password.as_bytes(), 0o600, None)?;
    let home = dir.join("home");
    make_dir(&home, &run_as)?;
    write_new(
        &home.join(".erlang.cookie"),
        random_secret().as_bytes(),
        0o400,
        Some(&run_as),
    )?;
    let tls = dir.join("tls");
    make_dir(&tls, &run_as)?;
    for (from, name, mode) in [
        (pki.ca_cert_path(), "ca.crt", 0o644),
        (pki.server_cert_path(), "broker.crt", 0o644),
        (pki.server_key_path(), "broker.key", 0o600),
    ] {
        let bytes = fs::read(&from).map_err(io(&from))?;
        write_new(&tls.join(name), &bytes, mode, Some(&run_as))?;
    }
    for node in &info.nodes {
        let nd = dir.join(node.short());
        make_dir(&nd, &run_as)?;
        for sub in ["mnesia", "log"] {
            make_dir(&nd.join(sub), &run_as)?;
        }
        let conf = node_config(&info, node, &tls, &password);
        // The config holds the administrator's password: the node's only.
        write_new(
            &nd.join("rabbitmq.conf"),
            conf.as_bytes(),
            0o600,
            Some(&run_as),
        )?;
        write_new(
            &nd.join("enabled_plugins"),
            b"[rabbitmq_mqtt,rabbitmq_management].\n",
            0o644,
            Some(&run_as),
        )?;
    }
    write_new(
        &dir.join(CLUSTER_FILE),
        &serde_json::to_vec_pretty(&info).unwrap_or_default(),
        0o644,
        None,
    )?;
    let cluster = Cluster {
        dir: dir.clone(),
        info,
    };

    // The first node forms the cluster; the others find it through
    // classic_config and join. Starting all at once can form two clusters
    // (classic_config takes no lock).
    let started = Instant::now();
    let first = &cluster.info.nodes[0];
    progress(&format!(
        "starting {} (logs: {})",
        first.name,
        cluster.node_dir(first).join("log").display()
    ));
    cluster.start_epmd(&run_as)?;
    let mut watch = vec![cluster.spawn(first, &run_as)?];
    cluster
        .wait_until(&watch, &cluster.info.nodes[..1], &mut progress, started)
        .await?;
    progress(&format!(
        "{} is up after {} s",
        first.name,
        started.elapsed().as_secs()
    ));
    let rest = &cluster.info.nodes[1..];
    if !rest.is_empty() {
        let names: Vec<&str> = rest.iter().map(|n| n.name.as_str()).collect();
        progress(&format!(
            "starting {} (joining {})",
            names.join(", "),
            first.name
        ));
        for node in rest {
            watch.push(cluster.spawn(node, &run_as)?);
        }
        cluster
            .wait_until(&watch, &cluster.info.nodes, &mut progress, started)
            .await?;
    }
    progress(&format!(
        "cluster healthy: {} node(s) after {} s",
        cluster.info.nodes.len(),
        started.elapsed().as_secs()
    ));
    Ok(cluster)
}

/// A started node's wrapper process: reaped by a thread of its own, so a
/// node that dies during `up` is noticed (and no zombie is left).
struct Spawned {
    node: String,
    exited: Arc<Mutex<Option<std::process::ExitStatus>>>,
}

fn layout(nodes: usize, base: u16) -> ClusterInfo {
    let at = |offset: usize| base.saturating_add(u16::try_from(offset).unwrap_or(u16::MAX));
    let loopback = |port: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    ClusterInfo {
        nodes: (0..nodes)
            .map(|i| NodeInfo {
                name: format!("rabbit{}@localhost", i + 1),
                mqtts: loopback(at(i)),
                management: loopback(at(10 + i)),
                dist_port: at(20 + i),
            })
            .collect(),
        epmd_port: at(30),
        admin_user: ADMIN_USER.to_owned(),
    }
}

fn check_ports(info: &ClusterInfo) -> Result<(), ClusterError> {
    let mut ports = vec![(info.epmd_port, "epmd".to_owned())];
    for n in &info.nodes {
        ports.push((n.mqtts.port(), format!("{} MQTTS", n.name)));
        ports.push((n.management.port(), format!("{} management", n.name)));
        ports.push((n.dist_port, format!("{} distribution", n.name)));
    }
    for (port, what) in ports {
        if port == u16::MAX || TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
            return Err(ClusterError::PortTaken { port, what });
        }
    }
    Ok(())
}

fn node_config(info: &ClusterInfo, node: &NodeInfo, tls: &Path, password: &str) -> String {
    let peers: String = info
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                "cluster_formation.classic_config.nodes.{} = {}\n",
                i + 1,
                n.name
            )
        })
        .collect();
    let tls = tls.display();
    format!(
        "# Written by `cityplane cluster up`; regenerated by the next `up`.\n\
         # No AMQP and no plain MQTT: devices and operators speak MQTTS only.\n\
         listeners.tcp = none\n\
         mqtt.listeners.tcp = none\n\
         mqtt.listeners.ssl.1 = {mqtts}\n\
         # The identity is the certificate's CN; the user must exist (cluster sync).\n\
         mqtt.ssl_cert_login = true\n\
         ssl_cert_login_from = common_name\n\
         mqtt.allow_anonymous = false\n\
         # Persistent sessions replicated across nodes (takes effect on a new cluster only).\n\
         mqtt.durable_queue_type = quorum\n\
         # Unacknowledged deliveries per subscriber (the plugin's default is 10). The\n\
         # controller acknowledges a shard's messages once its commit holds them: at 10\n\
         # its view trailed 10,000 devices' acks by 20-35 s, at 1000 by 4-8 s.\n\
         mqtt.prefetch = {MQTT_PREFETCH}\n\
         ssl_options.cacertfile = {tls}/ca.crt\n\
         ssl_options.certfile = {tls}/broker.crt\n\
         ssl_options.keyfile = {tls}/broker.key\n\
         ssl_options.verify = verify_peer\n\
         ssl_options.fail_if_no_peer_cert = true\n\
         management.tcp.ip = 127.0.0.1\n\
         management.tcp.port = {mgmt}\n\
         cluster_formation.peer_discovery_backend = classic_config\n\
         {peers}\
         # The administrator manages users; with no vhost permission it cannot publish.\n\
         default_user = {admin}\n\
         default_pass = {password}\n\
         default_user_tags.administrator = true\n\
         default_permissions.configure = ^$\n\
         default_permissions.read = ^$\n\
         default_permissions.write = ^$\n\
         loopback_users.{admin} = true\n\
         log.console = false\n\
         log.file.level = info\n",
        mqtts = node.mqtts,
        mgmt = node.management.port(),
        admin = info.admin_user,
    )
}

/// 32 bytes from the system's CSPRNG, hex.
fn random_secret() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    // The system RNG failing is not something to recover from.
    #[allow(clippy::expect_used)]
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random number generator");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn make_dir(path: &Path, run_as: &RunAs) -> Result<(), ClusterError> {
    fs::create_dir_all(path).map_err(io(path))?;
    run_as.own(path)
}

/// Creates `path` with `mode` from the start (a secret never exists with a
/// wider mode), owned by the node user when `owner` says so.
fn write_new(
    path: &Path,
    data: &[u8],
    mode: u32,
    owner: Option<&RunAs>,
) -> Result<(), ClusterError> {
    let _ = fs::remove_file(path);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    if let Some(run_as) = owner {
        run_as.own(path)?;
    }
    Ok(())
}

impl Cluster {
    pub fn open(dir: &Path) -> Result<Cluster, ClusterError> {
        // Absolute, as `up` recorded it in each node's environment (which
        // is how a node's VM is told from another process).
        let dir = &fs::canonicalize(dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ClusterError::NoCluster(dir.to_owned()),
            _ => io(dir)(e),
        })?;
        let path = dir.join(CLUSTER_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClusterError::NoCluster(dir.to_owned()))
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let info = serde_json::from_slice(&bytes).map_err(|source| ClusterError::BadState {
            path: path.clone(),
            source,
        })?;
        Ok(Cluster {
            dir: dir.to_owned(),
            info,
        })
    }

    pub fn mqtts_addrs(&self) -> Vec<SocketAddr> {
        self.info.nodes.iter().map(|n| n.mqtts).collect()
    }

    /// A client of the management API that tries every node in turn.
    pub fn mgmt(&self) -> Result<Mgmt, ClusterError> {
        let path = self.dir.join(SECRET_FILE);
        let password = fs::read_to_string(&path).map_err(io(&path))?;
        Ok(Mgmt::new(
            self.info.nodes.iter().map(|n| n.management).collect(),
            &self.info.admin_user,
            password.trim(),
        ))
    }

    fn node_dir(&self, node: &NodeInfo) -> PathBuf {
        self.dir.join(node.short())
    }

    /// Where RabbitMQ writes this node's log.
    pub fn log_path(&self, node: usize) -> Option<PathBuf> {
        let n = self.info.nodes.get(node)?;
        Some(self.node_dir(n).join("log").join(format!("{}.log", n.name)))
    }

    /// Starts this cluster's epmd before its first node (which would
    /// otherwise start one itself), with `-relaxed_command_check`: a plain
    /// epmd refuses `epmd -kill` while any name is registered, and one
    /// outlived `down` that way (a later `up` on the same ports then found
    /// its port taken). `-daemon` returns once it listens.
    fn start_epmd(&self, run_as: &RunAs) -> Result<(), ClusterError> {
        let first = &self.info.nodes[0];
        let mut cmd = Command::new("epmd");
        cmd.args(["-daemon", "-relaxed_command_check"])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        self.node_env(&mut cmd, first);
        // What names this cluster's processes (`processes_of` in the tests).
        cmd.env("RABBITMQ_MNESIA_BASE", self.node_dir(first).join("mnesia"));
        if let Some((uid, gid)) = run_as.ids {
            cmd.uid(uid).gid(gid);
        }
        let status = cmd.status().map_err(io(Path::new("epmd")))?;
        if !status.success() {
            return Err(ClusterError::Io {
                path: PathBuf::from("epmd"),
                source: std::io::Error::other(format!(
                    "epmd -daemon on port {} failed: {status}",
                    self.info.epmd_port
                )),
            });
        }
        Ok(())
    }

    fn spawn(&self, node: &NodeInfo, run_as: &RunAs) -> Result<Spawned, ClusterError> {
        let nd = self.node_dir(node);
        let console = nd.join("console.log");
        let out = File::create(&console).map_err(io(&console))?;
        run_as.own(&console)?;
        let err = out.try_clone().map_err(io(&console))?;
        let mut cmd = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmq-server"));
        cmd.current_dir(&nd)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a Ctrl-C meant for `cluster up` (or a
            // test runner) must not stop the cluster.
            .process_group(0);
        self.node_env(&mut cmd, node);
        cmd.env("RABBITMQ_CONFIG_FILE", nd.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", nd.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", nd.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", nd.join("log"))
            .env("RABBITMQ_PID_FILE", nd.join("rabbit.pid"))
            // The distribution listens on loopback only, and the VM does not
            // spin its schedulers: two other builds share these two cores.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none",
            );
        if let Some((uid, gid)) = run_as.ids {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().map_err(io(&console))?;
        write_new(
            &nd.join("wrapper.pid"),
            child.id().to_string().as_bytes(),
            0o644,
            None,
        )?;
        let exited = Arc::new(Mutex::new(None));
        let slot = exited.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                if let Ok(mut s) = slot.lock() {
                    *s = Some(status);
                }
            }
        });
        Ok(Spawned {
            node: node.name.clone(),
            exited,
        })
    }

    /// The environment every RabbitMQ tool needs to find this cluster.
    fn node_env(&self, cmd: &mut Command, node: &NodeInfo) {
        cmd.env("HOME", self.dir.join("home"))
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.info.epmd_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            // Debian's /etc/rabbitmq/rabbitmq-env.conf is for the system node.
            .env("RABBITMQ_CONF_ENV_FILE", "/dev/null");
    }

    /// `rabbitmqctl -n <node> ARGS` against this cluster (output captured).
    pub fn ctl(&self, node: usize, args: &[&str]) -> Result<std::process::Output, ClusterError> {
        let n = &self.info.nodes[node.min(self.info.nodes.len() - 1)];
        let tool = Path::new(RABBITMQ_BIN).join("rabbitmqctl");
        let mut cmd = Command::new(&tool);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .arg("-n")
            .arg(&n.name)
            .args(args)
            .stdin(Stdio::null());
        self.node_env(&mut cmd, n);
        cmd.output().map_err(io(&tool))
    }

    /// Waits until every node of `expect` runs in one cluster with its MQTT
    /// listener up, or one of `watch` exits, or the time is up.
    async fn wait_until(
        &self,
        watch: &[Spawned],
        expect: &[NodeInfo],
        progress: &mut impl FnMut(&str),
        started: Instant,
    ) -> Result<(), ClusterError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mgmt = self.mgmt()?;
        let mut last_note = Instant::now();
        loop {
            for s in watch {
                let exited = s.exited.lock().ok().and_then(|e| *e);
                if let Some(status) = exited {
                    return Err(self.node_failed(&s.node, format!("it exited ({status})")));
                }
            }
            if let Ok(status) = self.status_with(&mgmt).await {
                let up = |n: &NodeInfo| {
                    status
                        .nodes
                        .iter()
                        .any(|s| s.name == n.name && s.running && s.mqtt_listening)
                };
                if expect.iter().all(up) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let node = expect.last().map(|n| n.name.clone()).unwrap_or_default();
                return Err(self.node_failed(
                    &node,
                    format!("not running after {} s", START_TIMEOUT.as_secs()),
                ));
            }
            if last_note.elapsed() > Duration::from_secs(10) {
                progress(&format!(
                    "  still starting ({} s)",
                    started.elapsed().as_secs()
                ));
                last_note = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn node_failed(&self, name: &str, why: String) -> ClusterError {
        let node = self
            .info
            .nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or(0);
        let log = self
            .log_path(node)
            .filter(|p| p.exists())
            .unwrap_or_else(|| self.node_dir(&self.info.nodes[node]).join("console.log"));
        ClusterError::NodeFailed {
            node: name.to_owned(),
            why,
            tail: tail(&log, 20),
            log,
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClusterError> {
        self.status_with(&self.mgmt()?).await
    }

    async fn status_with(&self, mgmt: &Mgmt) -> Result<ClusterStatus, ClusterError> {
        // One answer for the whole cluster; with every node down, none.
        let (nodes, overview) = match mgmt.get("/api/nodes").await {
            Ok(nodes) => (
                nodes,
                mgmt.get("/api/overview").await.unwrap_or(Value::Null),
            ),
            Err(MgmtError::Unreachable { .. }) => (Value::Null, Value::Null),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for n in &self.info.nodes {
            let api = nodes
                .as_array()
                .and_then(|a| a.iter().find(|v| v["name"] == n.name.as_str()));
            let listed = overview["listeners"].as_array().is_some_and(|ls| {
                ls.iter().any(|l| {
                    l["node"] == n.name.as_str()
                        && l["protocol"] == "mqtt/ssl"
                        && l["port"].as_u64() == Some(u64::from(n.mqtts.port()))
                })
            });
            let connects = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect(n.mqtts),
            )
            .await
            .is_ok_and(|c| c.is_ok());
            out.push(NodeStatus {
                name: n.name.clone(),
                mqtts: n.mqtts,
                process: self.vm_pid(n).is_some(),
                running: api.is_some_and(|v| v["running"] == true),
                mqtt_listening: listed && connects,
                mem_used: api.and_then(|v| v["mem_used"].as_u64()),
            });
        }
        let healthy = out.iter().all(|n| n.running && n.mqtt_listening);
        Ok(ClusterStatus {
            dir: self.dir.clone(),
            nodes: out,
            healthy,
        })
    }

    /// The node's Erlang VM, if alive and really that node (a pid file can
    /// outlive its process, and the number can be reused).
    fn vm_pid(&self, node: &NodeInfo) -> Option<u32> {
        let pid = read_pid(&self.node_dir(node).join("rabbit.pid"))?;
        // The environment we started it with names this cluster's
        // directory (the command line does not).
        let environ = fs::read(format!("/proc/{pid}/environ")).ok()?;
        let want = format!(
            "RABBITMQ_MNESIA_BASE={}",
            self.node_dir(node).join("mnesia").display()
        );
        environ
            .split(|b| *b == 0)
            .any(|v| v == want.as_bytes())
            .then_some(pid)
    }

    /// Debian's shell wrapper that started the VM, if still alive.
    fn wrapper_pid(&self, node: &NodeInfo) -> Option<u32> {
        let pid = read_pid(&self.node_dir(node).join("wrapper.pid"))?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains("rabbitmq-server")
            .then_some(pid)
    }

    /// Node `i` (0-based) of this cluster, or the error naming the range.
    fn node(&self, i: usize) -> Result<&NodeInfo, ClusterError> {
        self.info.nodes.get(i).ok_or(ClusterError::NoSuchNode {
            node: i + 1,
            nodes: self.info.nodes.len(),
        })
    }

    /// SIGKILLs node `i`'s VM (0-based): a crash, for fault tests.
    pub fn kill_node(&self, i: usize) -> Result<(), ClusterError> {
        let node = self.node(i)?;
        if let Some(pid) = self.vm_pid(node) {
            signal("KILL", pid);
        }
        Ok(())
    }

    /// Starts node `i` (0-based) again after a crash or `stop_node`, with
    /// the configuration and state `up` gave it, and waits until it runs in
    /// the cluster and listens for MQTTS. The other nodes must still hold
    /// the cluster: a node that comes back alone waits for its peers.
    pub async fn start_node(
        &self,
        i: usize,
        mut progress: impl FnMut(&str),
    ) -> Result<(), ClusterError> {
        let node = self.node(i)?;
        if self.vm_pid(node).is_some() {
            return Err(ClusterError::NodeRunning(node.name.clone()));
        }
        let run_as = RunAs::detect()?;
        let started = Instant::now();
        progress(&format!("starting {}", node.name));
        let watch = [self.spawn(node, &run_as)?];
        self.wait_until(&watch, std::slice::from_ref(node), &mut progress, started)
            .await?;
        progress(&format!(
            "{} is running after {} s",
            node.name,
            started.elapsed().as_secs()
        ));
        Ok(())
    }

    /// Stops node `i` (0-based) as `down` stops every node (SIGTERM, SIGKILL
    /// after 30 s) but keeps its state, so `start_node` brings it back.
    /// Its clients are disconnected and may reconnect to another node.
    pub async fn stop_node(&self, i: usize) -> Result<(), ClusterError> {
        let node = self.node(i)?;
        stop_pids(
            [self.wrapper_pid(node), self.vm_pid(node)]
                .into_iter()
                .flatten()
                .collect(),
        )
        .await;
        Ok(())
    }

    /// Stops every node (SIGTERM: RabbitMQ shuts down cleanly; SIGKILL
    /// after 30 s), stops this cluster's epmd and removes the nodes' state.
    /// RabbitMQ's logs stay in `rabbitN/log/` for a post-mortem.
    pub async fn down(&self) -> Result<(), ClusterError> {
        stop_pids(
            self.info
                .nodes
                .iter()
                .flat_map(|n| [self.wrapper_pid(n), self.vm_pid(n)])
                .flatten()
                .collect(),
        )
        .await;
        // epmd outlives the nodes that started it; this one is ours alone.
        let _ = Command::new("epmd")
            .arg("-kill")
            .env("ERL_EPMD_PORT", self.info.epmd_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        for node in &self.info.nodes {
            let nd = self.node_dir(node);
            for state in [
                "mnesia",
                "rabbitmq.conf",
                "enabled_plugins",
                "rabbit.pid",
                "wrapper.pid",
            ] {
                remove(&nd.join(state))?;
            }
        }
        for state in ["home", "tls", SECRET_FILE, CLUSTER_FILE] {
            remove(&self.dir.join(state))?;
        }
        Ok(())
    }
}

/// SIGTERM to `pids` (RabbitMQ shuts down cleanly), SIGKILL to those still
/// alive after [`STOP_TIMEOUT`]. RabbitMQ deletes its pid file as it begins
/// to stop: the pids are read once by the caller, then watched through
/// /proc.
async fn stop_pids(pids: Vec<u32>) {
    for pid in &pids {
        signal("TERM", *pid);
    }
    let alive = |pid: &u32| {
        fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    let deadline = Instant::now() + STOP_TIMEOUT;
    while pids.iter().any(alive) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for pid in pids.iter().filter(|p| alive(p)) {
        signal("KILL", *pid);
    }
}

fn remove(path: &Path) -> Result<(), ClusterError> {
    let result = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last `lines` lines of a log (at most its last 64 KiB).
fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("({} is unreadable)", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_laid_out_per_node_and_on_loopback() {
        let info = layout(3, 20000);
        assert_eq!(info.nodes[2].name, "rabbit3@localhost");
        assert_eq!(info.nodes[2].mqtts, "127.0.0.1:20002".parse().unwrap());
        assert_eq!(info.nodes[0].management, "127.0.0.1:20010".parse().unwrap());
        assert_eq!(info.nodes[1].dist_port, 20021);
        assert_eq!(info.epmd_port, 20030);
    }

    #[test]
    fn the_config_exposes_only_mqtts_and_loopback_management() {
        let info = layout(3, 20000);
        let conf = node_config(&info, &info.nodes[1], Path::new("/c/tls"), "pw");
        for line in [
            "listeners.tcp = none",
            "mqtt.listeners.tcp = none",
            "mqtt.listeners.ssl.1 = 127.0.0.1:20001",
            "management.tcp.ip = 127.0.0.1",
            "ssl_options.fail_if_no_peer_cert = true",
            "cluster_formation.classic_config.nodes.3 = rabbit3@localhost",
            "default_permissions.write = ^$",
            "mqtt.prefetch = 1000",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
        }
    }
}
