//! Child processes killed with their parent, and what /proc says about a
//! process (memory, CPU time).

use std::ops::{Deref, DerefMut};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Result};

/// Pids of live [`ChildGuard`]s, for [`kill_registered_children`].
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// SIGKILLs every child still guarded: on an early exit (Ctrl-C, error),
/// where destructors do not run.
pub fn kill_registered_children() {
    let pids = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
    }
}

/// A child process, killed (SIGKILL) and reaped when dropped, also while
/// unwinding from a failed assertion. Derefs to the [`Child`].
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        ChildGuard { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err` when the child has exited; `name` says who in the message.
    pub fn check_alive(&mut self, name: &str) -> Result<()> {
        match self.child.try_wait()? {
            Some(status) => bail!("{name} exited early: {status}"),
            None => Ok(()),
        }
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = self.child.id();
        let _ = self.child.kill();
        let _ = self.child.wait();
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
    }
}

/// The first number of a field of `/proc/<pid>/status` (`"VmRSS:"` in kB,
/// `"Uid:"`'s real uid, `"Threads:"`); `None` when unreadable. `pid` may be
/// `"self"`.
pub fn status_field(pid: impl std::fmt::Display, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A `kB` field of `/proc/<pid>/status` (`"VmRSS:"`, `"VmHWM:"`; also a
/// plain number such as `"Threads:"`); 0 when unreadable. `pid` may be
/// `"self"`.
pub fn status_kib(pid: impl std::fmt::Display, field: &str) -> u64 {
    status_field(pid, field).unwrap_or(0)
}

/// Resident memory (VmRSS) of a process in KiB; 0 when unreadable.
pub fn rss_kib(pid: impl std::fmt::Display) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// User + system CPU time of a process (`pid` may be `"self"`); zero when
/// unreadable.
pub fn cpu_time(pid: impl std::fmt::Display) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // CLK_TCK is 100 on every Linux we run on.
    Duration::from_millis(ticks * 10)
}

/// Machine-wide CPU time from /proc/stat: (user + nice + system + irq +
/// softirq, steal); zero when unreadable. Interrupt time is in: a process's
/// system time can include the loopback traffic's softirq work, which
/// /proc/stat books apart.
pub fn machine_cpu() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let t = |i: usize| ticks.get(i).copied().unwrap_or(0);
    // CLK_TCK is 100, as in `cpu_time`.
    (
        Duration::from_millis((t(0) + t(1) + t(2) + t(5) + t(6)) * 10),
        Duration::from_millis(t(7) * 10),
    )
}

/// The environment variable that marks a re-executed test binary; its value
/// is the one test the child runs.
const ALONE: &str = "CITYPLANE_TEST_ALONE";

/// For a test that needs a process of its own (it installs a process-wide
/// log subscriber, say) inside a crate's single test binary: re-runs this
/// binary with only `test` (its full path, `module::name`) and asserts it
/// passed. Returns `true` in the parent, which should return at once, and
/// `false` in the child, which runs the test's body.
pub fn run_alone(test: &str) -> bool {
    if std::env::var(ALONE).as_deref() == Ok(test) {
        return false;
    }
    let exe = std::env::current_exe().expect("current test binary");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, test)
        .output()
        .expect("re-run the test binary");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{test} in its own process: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// A re-executed helper process (a writer killed mid-commit, say) in a
/// crate's single test binary: the command runs this binary's test `entry`
/// (which calls [`helper_args`] first) with `args`.
pub fn helper_command(entry: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("current test binary"));
    cmd.args([entry, "--exact", "--nocapture", "--test-threads=1", "-q"])
        .env(ALONE, entry)
        .env(
            HELPER_ARGS,
            serde_json::to_string(args).expect("args to JSON"),
        );
    cmd
}

const HELPER_ARGS: &str = "CITYPLANE_TEST_HELPER_ARGS";

/// In the test `entry` behind a [`helper_command`]: its arguments, or `None`
/// when the test binary runs normally (the entry then does nothing).
pub fn helper_args(entry: &str) -> Option<Vec<String>> {
    if std::env::var(ALONE).as_deref() != Ok(entry) {
        return None;
    }
    let raw = std::env::var(HELPER_ARGS).ok()?;
    Some(serde_json::from_str(&raw).expect("helper args are JSON"))
}
