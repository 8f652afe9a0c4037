//! ext4 images attached to loop devices and mounted, for tests of a real
//! filesystem (power loss, a full disk). Needs root, `losetup`, `mkfs.ext4`
//! (e2fsprogs) and a free loop device; [`available`] skips a test without
//! them, or fails it when `CITYPLANE_REQUIRE_LOOP=1` (CI).
//!
//! Test helpers: they panic where a test cannot go on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `Some(reason)` when loop-device tests cannot run here: not root, a tool
/// missing (`losetup`, `mkfs.ext4`, `mount`, `umount` and `extra_tools`),
/// or no free loop device.
pub fn missing_prerequisite(extra_tools: &[&str]) -> Option<String> {
    let uid = crate::process::status_field("self", "Uid:");
    if uid != Some(0) {
        return Some(format!("not running as root (effective uid {uid:?})"));
    }
    let tools = ["losetup", "mkfs.ext4", "mount", "umount"];
    for tool in tools.iter().chain(extra_tools) {
        if tool_path(tool).is_none() {
            let hint = if *tool == "mkfs.ext4" {
                " (apt-get install e2fsprogs)"
            } else {
                ""
            };
            return Some(format!("`{tool}` not found{hint}"));
        }
    }
    try_run("losetup", &["--find"])
        .err()
        .map(|e| format!("no free loop device: {e}"))
}

/// True when `test` may run; false (after saying why) when it is skipped;
/// panics when it cannot run and `CITYPLANE_REQUIRE_LOOP=1`.
#[track_caller]
pub fn available(test: &str, extra_tools: &[&str]) -> bool {
    let Some(reason) = missing_prerequisite(extra_tools) else {
        return true;
    };
    if std::env::var("CITYPLANE_REQUIRE_LOOP").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: needs root, losetup, mkfs.ext4 and loop devices, and \
             CITYPLANE_REQUIRE_LOOP=1 requires it to run: {reason}"
        );
    }
    eprintln!("SKIPPED {test}: {reason} (set CITYPLANE_REQUIRE_LOOP=1 to make this an error)");
    false
}

/// A tool on PATH or in the usual system directories.
pub fn tool_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

/// Runs a tool: its trimmed stdout, or `Err` with its stderr.
pub fn try_run(tool: &str, args: &[&str]) -> Result<String, String> {
    let exe = tool_path(tool).ok_or_else(|| format!("`{tool}` not found"))?;
    let out = Command::new(exe)
        .args(args)
        .output()
        .map_err(|e| format!("{tool}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{tool} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`try_run`] that panics on failure.
#[track_caller]
pub fn run(tool: &str, args: &[&str]) -> String {
    match try_run(tool, args) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// A path as a tool argument.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A fresh ext4 image file of `mib` MiB (no lazy init: nothing writes behind
/// our back after mount; no reserved blocks: root sees the same free space
/// as anyone).
#[track_caller]
pub fn make_ext4_image(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(mib << 20))
        .expect("image file");
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            path_str(path),
        ],
    );
}

/// An image attached to a loop device and mounted. Dropping it unmounts
/// (retrying for 5 s while a process still exits, then lazily) and
/// detaches, also while unwinding from a failed assertion.
pub struct LoopMount {
    pub device: String,
    pub dir: PathBuf,
    mounted: bool,
}

impl LoopMount {
    /// Attaches `image` and mounts it on `dir` (created if missing).
    pub fn mount(image: &Path, dir: &Path) -> Result<LoopMount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let device = try_run("losetup", &["--find", "--show", path_str(image)])?;
        let mut m = LoopMount {
            device,
            dir: dir.to_path_buf(),
            mounted: false,
        };
        try_run("mount", &["-t", "ext4", &m.device, path_str(dir)])?;
        m.mounted = true;
        Ok(m)
    }

    /// `name` inside the mounted filesystem.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let dir = path_str(&self.dir);
            let mut last = String::new();
            let unmounted = (0..50).any(|_| match try_run("umount", &[dir]) {
                Ok(_) => true,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(100));
                    false
                }
            });
            if !unmounted {
                eprintln!("umount {dir} failed ({last}); detaching lazily");
                let _ = try_run("umount", &["-l", dir]);
            }
        }
        if let Err(e) = try_run("losetup", &["-d", &self.device]) {
            eprintln!("{e}");
        }
    }
}
