//! A throwaway PostgreSQL 15 (Debian's binaries in [`BIN_DIR`]) for the
//! store's tests: `initdb` into a temporary directory, `postgres` on a free
//! port of 127.0.0.1 (and a unix socket in the same directory), stopped,
//! restarted and killed on drop. PostgreSQL refuses to run as root, so as
//! root it runs as the `postgres` user, which owns the directory.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::ChildGuard;

pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Whether a test can run PostgreSQL. When it cannot, says why and
/// returns false (the test returns, skipped), unless
/// `CITYPLANE_REQUIRE_POSTGRES=1` (CI), where it panics.
pub fn available(test: &str) -> bool {
    let missing = ["initdb", "postgres", "pg_isready", "psql"]
        .into_iter()
        .find(|tool| !Path::new(BIN_DIR).join(tool).exists());
    let Some(tool) = missing else {
        return true;
    };
    let reason = format!("{BIN_DIR}/{tool} is not installed (Debian: apt-get install postgresql)");
    if std::env::var("CITYPLANE_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: needs PostgreSQL 15, and CITYPLANE_REQUIRE_POSTGRES=1 requires it: {reason}"
        );
    }
    eprintln!("SKIPPED {test}: {reason} (set CITYPLANE_REQUIRE_POSTGRES=1 to make this an error)");
    false
}

/// A running (or stopped) PostgreSQL server of its own.
pub struct Postgres {
    /// Removed on drop, after the server is gone.
    dir: tempfile::TempDir,
    port: u16,
    /// `-c name=value` settings it is started with.
    settings: Vec<String>,
    /// `None` while stopped.
    server: Option<ChildGuard>,
    /// Every process stopped by [`Postgres::freeze`].
    frozen: bool,
}

impl Postgres {
    /// A fresh cluster, started; superuser `postgres`, trust
    /// authentication, database `postgres`.
    pub fn start() -> Result<Postgres> {
        Postgres::start_with(&[])
    }

    /// [`Postgres::start`] with server settings (`("fsync", "off")`).
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Postgres> {
        let dir = tempfile::Builder::new()
            .prefix("cityplane-postgres-")
            .tempdir()?;
        if let Some((uid, gid)) = run_as()? {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("chown {} to postgres", dir.path().display()))?;
        }
        let data = dir.path().join("data");
        // --no-sync: the cluster's files need not survive this machine
        // crashing; the server itself runs with fsync on (the store refuses
        // anything else).
        let out = command("initdb")?
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .arg("--no-instructions")
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut pg = Postgres {
            dir,
            port,
            settings: settings.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            server: None,
            frozen: false,
        };
        pg.start_again()?;
        Ok(pg)
    }

    /// The superuser's URL over TCP (trust: no password asked).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log (stderr), appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// Starts the stopped server on the same port and data; returns once
    /// it accepts connections (at most 30 s).
    pub fn start_again(&mut self) -> Result<()> {
        if self.server.is_some() {
            bail!("PostgreSQL is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = command("postgres")?;
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // A test's cluster is small: no 128 MiB of shared buffers each.
            .args(["-c", "shared_buffers=16MB", "-c", "max_connections=20"]);
        for setting in &self.settings {
            cmd.args(["-c", setting]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning postgres")?;
        let mut guard = ChildGuard::new(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            guard
                .check_alive("postgres")
                .with_context(|| self.log_tail())?;
            let ready = Command::new(Path::new(BIN_DIR).join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                self.server = Some(guard);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("PostgreSQL not ready after 30 s: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fast shutdown (SIGINT: sessions are ended, as when an administrator
    /// stops the server); returns once the server has exited.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut server) = self.server.take() else {
            return Ok(());
        };
        signal(server.pid(), "-INT")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.check_alive("postgres").is_ok() {
            if Instant::now() > deadline {
                bail!("PostgreSQL did not stop within 30 s of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops every process of the server (SIGSTOP: the postmaster and
    /// its backends) without closing a connection: the kernel still
    /// accepts connections and data, nothing answers, as with a server
    /// whose disk hangs. [`Postgres::thaw`] lets it go on.
    pub fn freeze(&mut self) -> Result<()> {
        self.frozen = true;
        self.signal_all("-STOP")
    }

    /// Undoes [`Postgres::freeze`].
    pub fn thaw(&mut self) -> Result<()> {
        self.frozen = false;
        self.signal_all("-CONT")
    }

    /// The postmaster, then its children (a child may have exited since
    /// it was listed: only the postmaster must take the signal).
    fn signal_all(&self, sig: &str) -> Result<()> {
        let mut pids = self.processes()?.into_iter();
        if let Some(postmaster) = pids.next() {
            signal(postmaster, sig)?;
        }
        for pid in pids {
            let _ = Command::new("kill")
                .args([sig, &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        Ok(())
    }

    /// The postmaster's pid, then its children's.
    fn processes(&self) -> Result<Vec<u32>> {
        let Some(server) = &self.server else {
            bail!("PostgreSQL is not running");
        };
        let postmaster = server.pid();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if crate::process::status_field(pid, "PPid:") == Some(u64::from(postmaster)) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// [`Postgres::stop`], then [`Postgres::start_again`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Runs SQL through `psql` as the superuser; its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(Path::new(BIN_DIR).join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-X", "-q", "-t", "-A"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown (SIGQUIT) takes the backends down with the
        // postmaster; a SIGKILL (the guard's) would leave them behind for
        // a while. Then the guard reaps it. A frozen server is let go
        // first: a stopped process handles no signal but SIGKILL.
        if self.frozen {
            let _ = self.thaw();
        }
        if let Some(server) = self.server.take() {
            let _ = signal(server.pid(), "-QUIT");
            let mut server = server;
            let deadline = Instant::now() + Duration::from_secs(5);
            while server.check_alive("postgres").is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A PostgreSQL binary, run as `postgres` when we are root.
fn command(tool: &str) -> Result<Command> {
    let mut cmd = Command::new(Path::new(BIN_DIR).join(tool));
    if let Some((uid, gid)) = run_as()? {
        cmd.uid(uid).gid(gid);
    }
    Ok(cmd)
}

/// The `postgres` user's uid and gid when we are root (PostgreSQL refuses
/// to run as root); `None` otherwise.
fn run_as() -> Result<Option<(u32, u32)>> {
    let me = crate::process::status_field("self", "Uid:").unwrap_or(u64::MAX);
    if me != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let ids = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    });
    match ids {
        Some(ids) => Ok(Some(ids)),
        None => bail!("running as root, and there is no `postgres` user to run PostgreSQL as"),
    }
}

fn signal(pid: u32, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill {sig} {pid} failed: {status}");
    }
    Ok(())
}
