//! `cityplane serve` as a child process, shared by the cli crate's tests.

#![allow(dead_code)] // each test file uses its own part

use std::path::Path;

use serde_json::Value;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use cityplane_testkit::process::ChildGuard;

pub mod cluster;
pub mod deploy;

pub const BIN: &str = env!("CARGO_BIN_EXE_cityplane");

/// `cityplane serve`, killed (SIGKILL) and reaped when dropped.
pub struct Server {
    child: ChildGuard,
}

impl Server {
    /// Starts serve on 127.0.0.1:`port`, its log appended to `log`.
    pub fn start(pki: &Path, data: &Path, port: u16, log: &Path, rust_log: &str) -> Server {
        Server::start_with(pki, data, port, log, rust_log, &[])
    }

    /// As [`Server::start`], with more arguments for `serve`.
    pub fn start_with(
        pki: &Path,
        data: &Path,
        port: u16,
        log: &Path,
        rust_log: &str,
        extra: &[&str],
    ) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            // Rollout steps 10 times a second: waves move on in tests.
            .env("CITYPLANE_ROLLOUT_TICK_MS", "100")
            // Compliance sampled and enforced 5 times a second.
            .env("CITYPLANE_COMPLIANCE_TICK_MS", "200")
            // 4 MiB of firmware images: enough for the tests, and the quota's test.
            .env("CITYPLANE_MAX_FIRMWARE_MIB", "4")
            .arg("--pki")
            .arg(pki)
            .arg("--data")
            .arg(data)
            .args(extra)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("serve starts");
        Server {
            child: ChildGuard::new(child),
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(self) {
        drop(self);
    }

    /// Ctrl-C (SIGINT), as a user stops it; waits up to `within` for the exit.
    pub fn stop(mut self, within: Duration) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -INT failed: {sent}");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for serve") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "serve did not stop within {within:?} of SIGINT"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The `cityplane` binary as operator `op` of the serve on `port`.
pub fn cli(pki: &Path, port: u16, args: &[&str]) -> Command {
    cli_as(pki, port, "op", args)
}

/// The `cityplane` binary as operator `id` of the serve on `port`.
pub fn cli_as(pki: &Path, port: u16, id: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("CITYPLANE_SERVER", format!("127.0.0.1:{port}"))
        .env("CITYPLANE_PKI", pki)
        .env("CITYPLANE_ID", id)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null());
    cmd
}

/// The stdout of a run of `what` that must have succeeded; a failure
/// panics with both of its streams.
pub fn stdout_of_success(what: impl std::fmt::Debug, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `n` simulated devices (`dev0001`…, certificates already issued) against
/// serve on `port`, reconnecting quickly after a server restart; returns
/// once all are online.
pub async fn online_fleet(
    pki: &Path,
    port: u16,
    n: usize,
    within: Duration,
) -> cityplane_agent_sim::Fleet {
    let mut sim = cityplane_agent_sim::SimConfig::new(pki, format!("localhost:{port}"), "dev", n);
    sim.presence = cityplane_agent_sim::PresenceMode::Skip;
    sim.backoff = cityplane_agent_sim::Backoff {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(400),
        multiplier: 2.0,
    };
    let fleet = cityplane_agent_sim::Fleet::start(sim).await.expect("fleet");
    assert!(fleet.wait_online(n, within).await, "fleet online");
    fleet
}

/// Runs a command that must succeed; its standard output.
/// Runs `cmd`, which must fail; what it said on stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(!out.status.success(), "{cmd:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An operator command with `--output json`; its answer.
pub fn json_of(pki: &Path, port: u16, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let out = ok(&mut cli(pki, port, &args));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

pub fn wait_up(pki: &Path, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli(pki, port, &["status", "--timeout", "2"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(Instant::now() < deadline, "serve did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `check` every 100 ms for up to 60 s.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "{what} within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
