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

/// A `kB` field of `/proc/<pid>/status` (`"VmRSS:"`, `"VmHWM:"`; also a
/// plain number such as `"Threads:"`); 0 when unreadable. `pid` may be
/// `"self"`.
pub fn status_kib(pid: impl std::fmt::Display, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
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
