//! `cityplane demo`, the README's first command, as a new user runs it:
//! one process, a throwaway CA, everything on 127.0.0.1.

use std::process::Command;

use crate::common::BIN;

/// The whole story converges, the audit chain verifies, the auditor's
/// report is written, and nothing on the terminal looks like a failure:
/// no ERROR or WARN line from us or a library (rumqttd's shutdown lines
/// included), no panic.
#[test]
fn the_demo_converges_and_reports_without_alarming_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(BIN)
        .args(["demo", "--devices", "200", "--report", "auditor.html"])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("cityplane demo runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let all = format!("--- stdout\n{stdout}\n--- stderr\n{stderr}");
    assert!(out.status.success(), "the demo failed:\n{all}");
    for says in [
        "200 of 200 devices converged (0 failed)",
        "hash chain verified",
        "is cut off: quarantined by incident",
        "Compliance after enforcement:",
        "Where to look next:",
    ] {
        assert!(
            stdout.contains(says),
            "the demo should say {says:?}:\n{all}"
        );
    }
    for alarm in ["ERROR", "WARN", "panicked", "BROKEN"] {
        assert!(
            !stdout.contains(alarm) && !stderr.contains(alarm),
            "{alarm:?} on the terminal:\n{all}"
        );
    }
    let report = std::fs::read_to_string(dir.path().join("auditor.html")).expect("the report");
    assert!(
        report.starts_with("<!DOCTYPE html>"),
        "an HTML report: {}",
        &report[..report.len().min(200)]
    );
}
