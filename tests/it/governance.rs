//! One security policy for every party, through the binary against
//! simulated devices over real mTLS: organisations see and touch exactly
//! their scope (CLI and raw MQTT), the policy's compliance counts exactly
//! the devices that break it, enforcement remediates them through
//! rollouts, drift is caught, admission refuses forbidden changes unless an
//! unexpired exception covers them, and the signed export verifies.

use crate::common;
use crate::rollouts::{sim, Setup};

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use common::{eventually, ok, BIN};
use serde_json::{json, Value};

/// The CLI as operator `id`.
fn as_op(s: &Setup, id: &str, args: &[&str]) -> std::process::Output {
    common::cli_as(&s.pki, s.port, id, args)
        .output()
        .expect("cityplane runs")
}

fn json_as(s: &Setup, id: &str, args: &[&str]) -> Value {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--output", "json"]);
    let out = as_op(s, id, &all);
    assert!(
        out.status.success(),
        "{id} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn refused_as(s: &Setup, id: &str, args: &[&str]) -> String {
    let out = as_op(s, id, args);
    assert!(!out.status.success(), "{id} {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Registers `dev0001…dev{n}`: odd ids are the lighting contractor's lamps,
/// even ids the camera integrator's cameras (the registry is the
/// operators' word), the first half in zone north. Their ids: (lamps, cameras).
pub(crate) fn register_contractors_devices(
    s: &Setup,
    n: usize,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let manifest: Vec<Value> = (1..=n)
        .map(|i| {
            let (class, owner) = if i % 2 == 1 {
                ("streetlight", "lighting-co")
            } else {
                ("camera", "camera-int")
            };
            json!({"id": format!("dev{i:04}"), "class": class, "owner": owner,
                   "labels": {"zone": if i <= n / 2 { "north" } else { "south" }}})
        })
        .collect();
    let f = s.file("manifest.json", &json!(manifest));
    s.json(&["devices", "register", "-f", &f]);
    let lamps = (1..=n).step_by(2).map(|i| format!("dev{i:04}")).collect();
    let cameras = (2..=n).step_by(2).map(|i| format!("dev{i:04}")).collect();
    (lamps, cameras)
}

pub(crate) fn issue_operator(s: &Setup, id: &str, org: &str) {
    ok(Command::new(BIN).args([
        "certs",
        "issue",
        "--pki",
        s.pki.to_str().expect("utf-8"),
        "--role",
        "operator",
        "--id",
        id,
        "--org",
        org,
    ]));
}

fn ids_of(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_owned())
        .collect()
}

/// What `mosquitto_sub` with operator `id`'s certificate receives on
/// `filter` (at most `count` messages, for up to `seconds`).
async fn mosquitto_sub(
    s: &Setup,
    id: &str,
    filter: &str,
    count: usize,
    seconds: u64,
) -> Vec<String> {
    mosquitto_lines(s, id, filter, count, seconds)
        .await
        .iter()
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect()
}

/// `topic payload` lines.
pub(crate) async fn mosquitto_lines(
    s: &Setup,
    id: &str,
    filter: &str,
    count: usize,
    seconds: u64,
) -> Vec<String> {
    let out = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &s.port.to_string(),
            "-i",
            id,
            "--cafile",
        ])
        .arg(s.pki.join("ca.crt"))
        .arg("--cert")
        .arg(s.pki.join(format!("{id}.crt")))
        .arg("--key")
        .arg(s.pki.join(format!("{id}.key")))
        .args([
            "-t",
            filter,
            "-v",
            "-C",
            &count.to_string(),
            "-W",
            &seconds.to_string(),
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .expect("mosquitto_sub runs (CI installs it)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_organisation_sees_and_touches_exactly_its_scope() {
    let s = Setup::new(12);
    issue_operator(&s, "lc", "lighting-co");
    issue_operator(&s, "ci", "camera-int");
    issue_operator(&s, "stranger", "nobody");
    let _server = s.serve();
    let (lamps, cameras) = register_contractors_devices(&s, 12);
    let fleet = s.online(sim(&s.pki, s.port, 12)).await;

    // Before the city creates it, an organisation can do nothing.
    let e = refused_as(&s, "lc", &["get", "devices"]);
    assert!(
        e.contains("forbidden") && e.contains("does not exist"),
        "{e}"
    );
    s.json(&[
        "orgs",
        "create",
        "lighting-co",
        "--scope",
        "owner=lighting-co",
        "--rights",
        "read,write,rollout",
    ]);
    s.json(&[
        "orgs",
        "create",
        "camera-int",
        "--scope",
        "owner=camera-int",
        "--rights",
        "read,rollout",
    ]);
    // Only the city manages organisations.
    let e = refused_as(
        &s,
        "lc",
        &[
            "orgs",
            "grant",
            "lighting-co",
            "--rights",
            "read,write,rollout,policy",
        ],
    );
    assert!(e.contains("forbidden"), "{e}");
    let orgs = json_as(&s, "lc", &["orgs", "list"]);
    assert_eq!(orgs["total"], 1, "{orgs}");

    // Reads: exactly the scope.
    assert_eq!(ids_of(&json_as(&s, "lc", &["get", "devices"])), lamps);
    assert_eq!(ids_of(&json_as(&s, "ci", &["get", "devices"])), cameras);
    assert_eq!(ids_of(&json_as(&s, "op", &["get", "devices"])).len(), 12);
    assert!(refused_as(&s, "lc", &["describe", "device", "dev0002"]).contains("no device"));
    json_as(&s, "lc", &["describe", "device", "dev0001"]);
    assert!(refused_as(&s, "stranger", &["get", "devices"]).contains("forbidden"));

    // Writes: a selector reaching outside is refused with the count only.
    let wide = s.file(
        "wide.json",
        &json!({"name": "lc-wide", "target": {"all": true}, "state": {"note": "lc"}}),
    );
    let e = refused_as(&s, "lc", &["apply", "-f", &wide]);
    assert!(
        e.contains("out_of_scope") && e.contains("6 device(s)"),
        "{e}"
    );
    assert!(!e.contains("dev0002"), "{e}");
    // Every streetlight is the contractor's now, so this selector is in scope.
    let mine = s.file(
        "mine.json",
        &json!({"name": "lc-note", "target": {"class": "streetlight"}, "state": {"note": "lc"}}),
    );
    json_as(&s, "lc", &["apply", "-f", &mine]);
    // The camera integrator may read and run rollouts, not write documents.
    let e = refused_as(&s, "ci", &["apply", "-f", &mine]);
    assert!(e.contains("forbidden") && e.contains("write"), "{e}");
    let ci_all = s.file(
        "ci-all.json",
        &json!({"name": "ci-all", "target": {"all": true}, "state": {"tag": "ci"},
                "waves": [{"percent": 100}]}),
    );
    let e = refused_as(&s, "ci", &["rollout", "create", "-f", &ci_all]);
    assert!(
        e.contains("out_of_scope") && e.contains("6 device(s)"),
        "{e}"
    );
    let ci_own = s.file(
        "ci-own.json",
        &json!({"name": "ci-tag", "target": {"owner": "camera-int"}, "state": {"tag": "ci"},
                "waves": [{"percent": 100}]}),
    );
    let created = json_as(&s, "ci", &["rollout", "create", "-f", &ci_own]);
    assert_eq!(created["devices"], 6, "{created}");
    // Another party's rollout is as good as absent.
    assert!(refused_as(&s, "lc", &["rollout", "status", "ci-tag"]).contains("no rollout"));
    assert_eq!(json_as(&s, "lc", &["rollout", "list"])["total"], 0);
    // Labels cannot move a device into or out of a scope.
    let e = refused_as(
        &s,
        "lc",
        &["devices", "label", "dev0001", "--owner", "camera-int"],
    );
    assert!(e.contains("out_of_scope"), "{e}");
    assert!(
        refused_as(&s, "lc", &["devices", "label", "dev0002", "zone=east"]).contains("no device")
    );

    // Each change reached exactly its own devices.
    eventually("lamps noted, cameras tagged", || {
        lamps
            .iter()
            .all(|id| fleet.value_of(id, "note") == Some(Some(json!("lc"))))
            && cameras
                .iter()
                .all(|id| fleet.value_of(id, "tag") == Some(Some(json!("ci"))))
    })
    .await;
    assert!(cameras
        .iter()
        .all(|id| fleet.value_of(id, "note") == Some(None)));
    assert!(lamps
        .iter()
        .all(|id| fleet.value_of(id, "tag") == Some(None)));
    // A camera-int device that comes to match the contractor's selector
    // (the city calls it a streetlight) stays out of its document: scope
    // holds where desired state is made, not only when a write is checked.
    s.json(&["devices", "label", "dev0002", "--class", "streetlight"]);
    let d = json_as(&s, "op", &["describe", "device", "dev0002"]);
    assert!(d["desired"].get("note").is_none(), "{d}");
    assert_eq!(d["desired"]["tag"], "ci", "{d}");

    // Compliance, the audit and status: the scope only.
    assert_eq!(json_as(&s, "lc", &["compliance"])["total"], 6);
    assert_eq!(json_as(&s, "lc", &["status"])["total"], 6);
    let audit = json_as(&s, "lc", &["audit"]);
    let entries = audit.as_array().expect("entries");
    assert!(!entries.is_empty(), "{audit}");
    assert!(entries.iter().all(|e| e["org"] == "lighting-co"), "{audit}");

    // Raw MQTT with the contractor's certificate: presence is retained for
    // all 12 devices; it gets its 6 and nothing else.
    let seen = mosquitto_sub(&s, "lc", "devices/+/presence", 7, 8).await;
    let seen: BTreeSet<String> = seen
        .iter()
        .map(|t| t.split('/').nth(1).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(seen, lamps, "lighting-co's subscription");
    assert!(mosquitto_sub(&s, "lc", "fleet/#", 1, 2).await.is_empty());
    // Its organisation's retained compliance summary: its 6 devices.
    let summary = mosquitto_lines(&s, "lc", "fleet/compliance/lighting-co", 1, 10).await;
    let body: Value = summary
        .first()
        .and_then(|l| l.split_once(' '))
        .and_then(|(_, p)| serde_json::from_str(p).ok())
        .expect("a retained summary");
    assert_eq!(
        (&body["org"], &body["total"]),
        (&json!("lighting-co"), &json!(6)),
        "{body}"
    );
    assert!(mosquitto_sub(&s, "lc", "fleet/compliance/camera-int", 1, 2)
        .await
        .is_empty());
    assert!(mosquitto_sub(&s, "lc", "devices/dev0002/presence", 1, 2)
        .await
        .is_empty());
    assert!(mosquitto_sub(&s, "stranger", "devices/+/presence", 1, 2)
        .await
        .is_empty());
    assert_eq!(
        mosquitto_sub(&s, "op", "devices/+/presence", 12, 8)
            .await
            .len(),
        12
    );
}

/// Lamps dim to at most 50; NTP is the city's. Both enforced with a
/// remediation.
fn policy(mode: &str) -> Value {
    json!({
        "description": "test city",
        "mode": mode,
        "rules": [
            {"id": "dim-cap", "description": "Lamps dim to 50 or less", "severity": "medium",
             "selector": {"class": "streetlight"},
             "check": {"reported": "dimming", "at_most": 50},
             "remediation": {"set": {"dimming": 40}, "waves": ["50%", "100%"]}},
            {"id": "city-ntp", "description": "Devices take time from the city's NTP servers",
             "severity": "high", "selector": {"all": true},
             "check": {"reported": "security.ntp", "one_of": ["ntp.city.local"]},
             "remediation": {"set": {"security": {"services": {"ssh": false, "telnet": false},
                                                  "default_password_changed": true,
                                                  "ntp": "ntp.city.local"}}}}
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compliance_counts_enforcement_remediates_drift_is_caught_and_admission_holds() {
    let n = 40;
    let s = Setup::new(n);
    let server = s.serve();
    s.zones(n);
    let fleet = s.online(sim(&s.pki, s.port, n)).await;
    let ids: Vec<String> = (1..=n).map(|i| format!("dev{i:04}")).collect();
    // Which devices start out of line, from the devices themselves.
    let over: BTreeSet<&String> = ids
        .iter()
        .filter(|id| {
            fleet
                .value_of(id, "dimming")
                .flatten()
                .and_then(|v| v.as_u64())
                .is_some_and(|d| d > 50)
        })
        .collect();
    let bad_ntp: BTreeSet<&String> = ids
        .iter()
        .filter(|id| {
            fleet
                .value_of(id, "security")
                .flatten()
                .map(|v| v["ntp"].clone())
                != Some(json!("ntp.city.local"))
        })
        .collect();
    assert!(
        !over.is_empty(),
        "the seed gives some lamps a dimming above 50"
    );

    // Report mode: counted exactly, nothing changed.
    let f = s.file("policy-v1.json", &policy("report"));
    let applied = s.json(&["policy", "apply", "-f", &f]);
    assert_eq!(applied["version"], 1, "{applied}");
    let mut report = Value::Null;
    eventually("compliance evaluated", || {
        report = s.json(&["compliance", "--violations", "500"]);
        report["total"] == n
    })
    .await;
    let violating = |report: &Value, rule: &str| -> BTreeSet<String> {
        report["violations"]
            .as_array()
            .expect("violations")
            .iter()
            .filter(|v| v["rule"] == rule && v["excepted"] == false)
            .map(|v| v["id"].as_str().expect("id").to_owned())
            .collect()
    };
    let owned =
        |set: &BTreeSet<&String>| set.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(violating(&report, "dim-cap"), owned(&over), "{report}");
    assert_eq!(violating(&report, "city-ntp"), owned(&bad_ntp), "{report}");
    let compliant = ids
        .iter()
        .filter(|i| !over.contains(i) && !bad_ntp.contains(i))
        .count();
    assert_eq!(report["compliant"], compliant, "{report}");
    assert_eq!(
        json_as(&s, "op", &["rollout", "list"])["total"],
        0,
        "report mode opens no rollout"
    );

    // The page for the auditor.
    let html = s.dir.path().join("compliance.html");
    s.json(&[
        "compliance",
        "report",
        "--html",
        html.to_str().expect("utf-8"),
    ]);
    let page = std::fs::read_to_string(&html).expect("report written");
    assert!(page.contains("<svg") && page.contains("dim-cap"), "{page}");

    // Enforce: remediation rollouts, in waves, until everything complies.
    let f = s.file("policy-v2.json", &policy("enforce"));
    // The draft against the current version, then published and versioned.
    let draft = s.json(&["policy", "diff", "-f", &f]);
    assert_eq!(draft["policy"][0]["field"], "mode", "{draft}");
    s.json(&["policy", "apply", "-f", &f]);
    assert_eq!(s.json(&["policy", "history"])["total"], 2);
    assert_eq!(s.json(&["policy", "get"])["policy"]["mode"], "enforce");
    assert_eq!(
        s.json(&["policy", "get", "--policy-version", "1"])["policy"]["mode"],
        "report"
    );
    let d = s.json(&["policy", "diff"]);
    assert_eq!(d, draft, "v1 → v2 is what the draft said");
    eventually("100 % compliant", || {
        let r = s.json(&["compliance"]);
        let _ = std::fs::copy(&s.log, "/tmp/gov-serve.log");
        r["compliant"] == n && r["total"] == n
    })
    .await;
    let rollouts = s.json(&["rollout", "list"]);
    let names: BTreeSet<&str> = rollouts["rollouts"]
        .as_array()
        .expect("rollouts")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(names.contains("fix-dim-cap-1"), "{rollouts}");
    let fixed = s.status("fix-dim-cap-1");
    assert_eq!(
        fixed["devices"],
        over.len(),
        "only the devices that broke the rule: {fixed}"
    );
    for id in &over {
        assert_eq!(fleet.value_of(id, "dimming"), Some(Some(json!(40))), "{id}");
    }

    // Drift: a technician points a compliant device's clock elsewhere. It
    // is caught and remediated by a second rollout naming it alone.
    let victim = ids
        .iter()
        .find(|i| !bad_ntp.contains(i))
        .expect("a compliant device");
    let mut security = fleet
        .value_of(victim, "security")
        .flatten()
        .expect("security");
    security["ntp"] = json!("pool.ntp.org");
    assert!(fleet.tamper(victim, "security", security));
    eventually("the drift is remediated by fix-city-ntp-2", || {
        let r = s.json(&["rollout", "list"]);
        r["rollouts"].as_array().is_some_and(|rows| {
            rows.iter().any(|r| {
                r["name"] == "fix-city-ntp-2" && r["devices"] == 1 && r["phase"] == "completed"
            })
        })
    })
    .await;
    assert_eq!(
        fleet
            .value_of(victim, "security")
            .flatten()
            .map(|v| v["ntp"].clone()),
        Some(json!("ntp.city.local"))
    );

    // Admission: a document that would break dim-cap is refused, naming
    // the rule and counting the devices, for the city's operators too.
    let bright = s.file(
        "bright.json",
        &json!({"name": "bright", "target": {"class": "streetlight"}, "state": {"dimming": 80}}),
    );
    let e = s.fails(&["apply", "-f", &bright]);
    assert!(
        e.contains("policy_violation") && e.contains("dim-cap") && e.contains("40 device(s)"),
        "{e}"
    );
    let spec = s.file(
        "bright-rollout.json",
        &json!({"name": "bright", "target": {"class": "streetlight"}, "state": {"dimming": 90}}),
    );
    assert!(s
        .fails(&["rollout", "create", "-f", &spec])
        .contains("dim-cap"));
    assert!(s
        .fails(&["apply", "-f", &bright, "--dry-run"])
        .contains("policy_violation"));
    // Under an exception for one device, until it expires.
    let one = s.file(
        "bright-one.json",
        &json!({"name": "bright-one", "target": {"ids": ["dev0001"]}, "state": {"dimming": 80}}),
    );
    assert!(s.fails(&["apply", "-f", &one]).contains("policy_violation"));
    let ex = s.json(&[
        "policy",
        "except",
        "--rule",
        "dim-cap",
        "--ids",
        "dev0001",
        "--reason",
        "night market on the square",
        "--for",
        "3s",
    ]);
    assert_eq!(ex["rule"], "dim-cap", "{ex}");
    s.json(&["apply", "-f", &one]);
    eventually(
        "the exception expires and the change is refused again",
        || {
            let out = common::cli(&s.pki, s.port, &["apply", "-f", &one])
                .output()
                .expect("runs");
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("policy_violation")
        },
    )
    .await;
    let audit = s.json(&["audit", "--limit", "200"]);
    let actions: Vec<&str> = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"policy-apply") && actions.contains(&"exception-grant"),
        "{actions:?}"
    );

    // The shared policy: signed with the city's key, verified by anyone,
    // and a tampered copy fails.
    let key_dir = s.dir.path().join("policy-key");
    let kd = key_dir.to_str().expect("utf-8");
    ok(Command::new(BIN).args(["policy", "keygen", "--dir", kd]));
    let export = s.dir.path().join("policy.signed.json");
    let ex = export.to_str().expect("utf-8");
    s.json(&[
        "policy",
        "export",
        "--key",
        &format!("{kd}/policy.key"),
        "--out",
        ex,
    ]);
    ok(Command::new(BIN).args([
        "policy",
        "verify",
        "--file",
        ex,
        "--key",
        &format!("{kd}/policy.pub"),
    ]));
    let text = std::fs::read_to_string(&export).expect("export");
    std::fs::write(&export, text.replacen("dim-cap", "dim-cat", 1)).expect("tamper");
    let out = Command::new(BIN)
        .args([
            "policy",
            "verify",
            "--file",
            ex,
            "--key",
            &format!("{kd}/policy.pub"),
        ])
        .output()
        .expect("runs");
    assert!(!out.status.success(), "a tampered export must not verify");

    // A SIGKILL loses none of it: the policy, its exceptions and the
    // compliance over time (the auditor's chart) come back.
    let before = s.json(&["compliance"]);
    let first = before["history"][0].clone();
    assert!(first.is_object(), "{before}");
    server.kill();
    let _server = s.serve();
    let after = s.json(&["compliance"]);
    assert_eq!(after["policy_version"], 2, "{after}");
    assert_eq!(after["history"][0], first, "{after}");
    assert_eq!(s.json(&["policy", "exceptions"])["total"], 1);
}
