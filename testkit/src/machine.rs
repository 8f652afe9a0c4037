//! What machine a benchmark ran on.

use serde_json::{json, Value};

/// The CPU's "model name" from /proc/cpuinfo.
pub fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    })
}

/// Cores this process may use (1 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `date` (RFC 3339, UTC), `cpu_model`, `nproc`, `mem_total_kib`, `kernel`,
/// `os`, `mosquitto` (its version) and `open_files_limit`; "unknown" (or 0)
/// for what cannot be read.
pub fn describe() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_owned(), |s| s.trim().to_owned());
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let open_files = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .unwrap_or_else(|| "?".into());
    let mem_total_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    json!({
        "date": date,
        "cpu_model": cpu_model().unwrap_or_else(|| "unknown".into()),
        "nproc": cores(),
        "mem_total_kib": mem_total_kib,
        "kernel": kernel,
        "os": os,
        "mosquitto": crate::mosquitto::version(),
        "open_files_limit": open_files,
    })
}
