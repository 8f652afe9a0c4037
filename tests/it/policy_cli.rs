//! `cityplane policy keygen|validate|verify|check` as a city's security
//! office, a contractor and an auditor run them: offline, on files.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use cityplane_certs::policy::{read_policy_key, sign_policy};
use serde_json::{json, Value};

use crate::common::BIN;

fn cityplane(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("cityplane runs")
}

/// Runs and insists on exit status `code`, with `says` in stdout or stderr;
/// returns stdout.
fn exits(dir: &Path, args: &[&str], code: i32, says: &str) -> String {
    let out = cityplane(dir, args);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(code), "{args:?}:\n{stdout}{stderr}");
    assert!(
        stdout.contains(says) || stderr.contains(says),
        "{args:?} should say {says:?}, said:\n{stdout}{stderr}"
    );
    stdout.into_owned()
}

fn example_policy() -> Value {
    json!({
        "description": "test policy",
        "rules": [
            {"id": "telnet-off", "description": "Telnet is off", "severity": "critical",
             "selector": {"all": true}, "check": {"reported": "telnet", "equals": false},
             "mode": "enforce", "remediation": {"set": {"telnet": false}}},
            {"id": "camera-firmware", "description": "Cameras run 4.2 or later", "severity": "high",
             "selector": {"class": "camera"}, "check": {"reported": "firmware", "version_at_least": "4.2"}},
            {"id": "seen", "description": "Seen in the last 10 minutes", "severity": "low",
             "selector": {"labels": {"zone": "north"}}, "check": {"seen_within_minutes": 10}},
        ]
    })
}

/// What `policy export` will write: the version text signed with `policy.key`.
fn write_export(dir: &Path, key: &Path, version: u64, policy: &Value) -> String {
    let text = json!({
        "version": version, "published_at": "2026-11-30T12:00:00Z",
        "published_by": "ciso", "policy": policy,
    })
    .to_string();
    let signed = sign_policy(&read_policy_key(key).expect("key"), &text).expect("signs");
    let path = dir.join("export.json");
    std::fs::write(&path, serde_json::to_string_pretty(&signed).expect("json")).expect("write");
    path.display().to_string()
}

const AT: &str = "2026-11-30T12:00:00Z";

fn devices() -> Value {
    json!([
        // Compliant everywhere.
        {"id": "cam-1", "attributes": {"class": "camera", "labels": {"zone": "north"}},
         "reported": {"telnet": false, "firmware": "4.2.1"}, "last_seen": "2026-11-30T11:58:00Z"},
        // Telnet on and old firmware: two violations.
        {"id": "cam-2", "attributes": {"class": "camera", "labels": {"zone": "south"}},
         "reported": {"telnet": true, "firmware": "4.1"}},
        // Top-level attributes (as `describe` prints them); silent for an hour.
        {"id": "lamp-1", "class": "streetlight", "labels": {"zone": "north"},
         "reported": {"telnet": false}, "last_seen": "2026-11-30T11:00:00Z"},
        // Lamps are not cameras: the firmware rule does not apply.
        {"id": "lamp-2", "class": "streetlight", "reported": {"telnet": false, "firmware": "1.0"}},
    ])
}

#[test]
fn keygen_sign_verify_check_and_tampering() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let out = exits(dir, &["policy", "keygen"], 0, "policy-key/policy.pub");
    assert!(out.contains("offline"), "{out}");
    let key = dir.join("policy-key/policy.key");
    let mode = std::fs::metadata(&key).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    exits(
        dir,
        &["policy", "keygen"],
        1,
        "refusing to replace the policy key",
    );
    let export = write_export(dir, &key, 3, &example_policy());
    let public = "policy-key/policy.pub";

    let out = exits(
        dir,
        &["policy", "verify", "--file", &export, "--key", public],
        0,
        "version       3",
    );
    assert!(out.contains("rules         3 (1 enforced)"), "{out}");
    exits(
        dir,
        &[
            "policy",
            "verify",
            "--file",
            &export,
            "--key",
            "policy-key/policy.key",
        ],
        1,
        "is a private key",
    );

    std::fs::write(dir.join("devices.json"), devices().to_string()).expect("write");
    let check = |policy: &str, extra: &[&str], code: i32, says: &str| {
        let mut args = vec![
            "policy",
            "check",
            "--policy",
            policy,
            "--reported",
            "devices.json",
            "--at",
            AT,
        ];
        args.extend_from_slice(extra);
        exits(dir, &args, code, says)
    };
    let table = check(
        &export,
        &["--key", public],
        1,
        "2 of 4 devices compliant (50%) with policy version 3 (3 rules); 3 violations",
    );
    for says in [
        "cam-2                    telnet-off               critical  telnet is true, must be false",
        "cam-2                    camera-firmware          high      firmware is \"4.1\", must be at least 4.2",
        "lamp-1                   seen                     low       last seen 60 minutes ago, must be within 10",
    ] {
        assert!(table.contains(says), "{says:?} in\n{table}");
    }
    let json: Value = serde_json::from_str(&check(
        &export,
        &["--key", public, "--output", "json"],
        1,
        "",
    ))
    .expect("json");
    assert_eq!(json["total"], 4);
    assert_eq!(json["compliant"], 2);
    assert_eq!(json["violations_total"], 3);
    assert_eq!(json["verified"], true);
    assert_eq!(json["policy_version"], 3);

    // Every device compliant: exit 0.
    let mut fixed = devices();
    fixed[1]["reported"] = json!({"telnet": false, "firmware": "4.3"});
    fixed[2]["last_seen"] = json!("2026-11-30T11:55:00Z");
    std::fs::write(dir.join("devices.json"), fixed.to_string()).expect("write");
    check(
        &export,
        &["--key", public],
        0,
        "4 of 4 devices compliant (100%)",
    );

    // One byte of the signed text changed: verify and check both refuse.
    let mut signed: Value =
        serde_json::from_str(&std::fs::read_to_string(&export).expect("read")).expect("json");
    let text = signed["policy"]
        .as_str()
        .expect("text")
        .replacen("\"critical\"", "\"low\"     ", 1);
    signed["policy"] = json!(text);
    std::fs::write(&export, signed.to_string()).expect("write");
    exits(
        dir,
        &["policy", "verify", "--file", &export, "--key", public],
        1,
        "bad signature",
    );
    check(&export, &["--key", public], 2, "bad signature");
    // Without --key it is read, with a warning.
    check(&export, &[], 0, "not verified");
}

#[test]
fn a_plain_policy_file_is_checked_unverified() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("policy.json"), example_policy().to_string()).expect("write");
    std::fs::write(dir.join("devices.json"), devices().to_string()).expect("write");
    let out = exits(
        dir,
        &[
            "policy",
            "check",
            "--policy",
            "policy.json",
            "--reported",
            "devices.json",
            "--at",
            AT,
        ],
        1,
        "warning: policy.json is a plain policy file, not verified",
    );
    assert!(out.contains("unverified"), "{out}");
    exits(
        dir,
        &[
            "policy",
            "check",
            "--policy",
            "policy.json",
            "--reported",
            "nope.json",
        ],
        2,
        "cannot read the device file",
    );
}

#[test]
fn validate_lists_rules_and_names_the_broken_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/examples/policy.toml");
    let out = exits(
        dir,
        &["policy", "validate", "-f", example],
        0,
        "valid, 8 rules (default mode report)",
    );
    assert!(out.contains("camera-firmware"), "{out}");
    let json: Value = serde_json::from_str(&exits(
        dir,
        &["policy", "validate", "-f", example, "--output", "json"],
        0,
        "",
    ))
    .expect("json");
    assert_eq!(json["rules"][0]["id"], "camera-firmware");

    for (toml, says) in [
        (
            "[[rules]]\nid = \"fw\"\ndescription = \"d\"\nseverity = \"high\"\nselector = { class = \"camera\" }\ncheck = { reported = \"firmware\", version_at_least = \"four\" }\n",
            "rule fw: version_at_least \"four\" is not a version",
        ),
        (
            "[[rules]]\nid = \"t\"\ndescription = \"d\"\nseverity = \"high\"\nselector = { all = true }\ncheck = { reported = \"telnet\", equals = false }\nmode = \"enforce\"\n",
            "rule t: mode is enforce but there is no remediation",
        ),
        (
            "[[rules]]\nid = \"t\"\ndescription = \"d\"\nseverity = \"high\"\nselector = { all = true }\ncheck = { reported = \"telnet\", equals = false, colour = 1 }\n",
            "unknown field `colour`",
        ),
    ] {
        std::fs::write(dir.join("bad.toml"), toml).expect("write");
        exits(dir, &["policy", "validate", "-f", "bad.toml"], 2, says);
    }
}
