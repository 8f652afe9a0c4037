//! Incident response through the binary against simulated devices over real
//! mTLS: a quarantine cuts exactly the devices it names (and keeps them
//! out), leaves the others connected and converging, is recorded as an
//! incident; a release brings devices back on a new certificate only.

use crate::common;
use crate::rollouts::{sim, Setup};

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{eventually, ok, BIN};
use serde_json::{json, Value};

/// Whether `mosquitto_pub` with this certificate gets a QoS 1 publish
/// through as device `id` (CONNACK accepted, PUBACK received).
pub(crate) fn publishes(s: &Setup, id: &str, cert: &Path, key: &Path) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", &s.port.to_string(), "-i", id])
        .arg("--cafile")
        .arg(s.pki.join("ca.crt"))
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args([
            "-t",
            &format!("devices/{id}/telemetry"),
            "-m",
            r#"{"t": 1}"#,
            "-q",
            "1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("mosquitto_pub runs (CI installs it)")
        .success()
}

fn ids(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_str().or(x["id"].as_str()).expect("id").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_cuts_exactly_its_devices_and_a_release_brings_them_back_on_a_new_certificate_only(
) {
    const N: usize = 5000;
    let s = Setup::new(N);
    let _server = s.serve();
    // Every fifth lamp comes from the suspect lot: 1,000 of 5,000.
    let devices: Vec<Value> = (1..=N)
        .map(|i| {
            let lot = if i % 5 == 0 { "L-7" } else { "L-1" };
            json!({"id": format!("dev{i:04}"), "class": "streetlight", "labels": {"lot": lot}})
        })
        .collect();
    let manifest = s.file("lots.json", &json!(devices));
    s.json(&["devices", "register", "-f", &manifest]);
    let suspect: BTreeSet<String> = (1..=N)
        .filter(|i| i % 5 == 0)
        .map(|i| format!("dev{i:04}"))
        .collect();
    let fleet = s.online(sim(&s.pki, s.port, N)).await;

    // Refusals first: a reason is required, and an organisation without
    // the incident right (or reaching outside its scope) cuts nothing.
    let err = s.fails(&["quarantine", "--selector", "lot=L-7"]);
    assert!(err.contains("--reason"), "{err}");
    ok(Command::new(BIN).args([
        "certs",
        "issue",
        "--pki",
        s.pki.to_str().expect("utf-8"),
        "--role",
        "operator",
        "--id",
        "lc",
        "--org",
        "lighting-co",
    ]));
    s.json(&[
        "orgs",
        "create",
        "lighting-co",
        "--scope",
        "lot=L-1",
        "--rights",
        "read",
    ]);
    let as_lc = |args: &[&str]| {
        common::cli_as(&s.pki, s.port, "lc", args)
            .output()
            .expect("runs")
    };
    let out = as_lc(&["quarantine", "--ids", "dev0001", "--reason", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("incident"), "{err}");
    s.json(&["orgs", "grant", "lighting-co", "--rights", "read,incident"]);
    let out = as_lc(&[
        "quarantine",
        "--selector",
        "class=streetlight",
        "--reason",
        "x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("1000 device(s) outside"),
        "{err}"
    );
    assert_eq!(s.json(&["quarantine", "list"])["total"], 0);

    // One command cuts the suspect lot.
    let r = s.json(&[
        "quarantine",
        "--selector",
        "lot=L-7",
        "--reason",
        "lot L-7 ships a backdoored image",
    ]);
    assert_eq!(r["quarantined"], 1000, "{r}");
    assert_eq!(ids(&r["ids"]), suspect);
    let incident = r["incident"].as_str().expect("incident").to_owned();

    // Every suspect device is cut off and stays off; every other one stays
    // connected (the same session: its connect count does not move).
    let before: std::collections::HashMap<String, u32> = fleet
        .device_states()
        .into_iter()
        .map(|d| (d.id, d.connects))
        .collect();
    eventually("the 1,000 cut off", || {
        fleet
            .device_states()
            .iter()
            .filter(|d| suspect.contains(&d.id))
            .all(|d| !d.connected)
    })
    .await;
    // Long enough for each cut device to retry several times (backoff ≤ 400 ms).
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for d in fleet.device_states() {
        if suspect.contains(&d.id) {
            assert!(!d.connected, "{} got back in", d.id);
            assert_eq!(d.connects, before[&d.id], "{} reconnected", d.id);
        } else {
            assert!(d.connected, "{} was cut", d.id);
            assert_eq!(d.connects, before[&d.id], "{} lost its session", d.id);
        }
    }
    // A quarantine of devices already quarantined cuts nothing new.
    let again = s.json(&["quarantine", "--ids", "dev0005", "--reason", "again"]);
    assert_eq!(
        (&again["quarantined"], &again["already"]),
        (&json!(0), &json!(1))
    );

    // The others converge on a new document; the quarantined are not targeted.
    let doc = s.file(
        "dim.json",
        &json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 30}}),
    );
    ok(&mut common::cli(
        &s.pki,
        s.port,
        &["apply", "-f", &doc, "--wait"],
    ));
    let docs = s.json(&["get", "documents"]);
    let row = &docs[0];
    assert_eq!(
        (&row["targeted"], &row["converged"]),
        (&json!(4000), &json!(4000)),
        "{docs}"
    );

    // The registry, compliance and the audit log say so.
    let listed = s.json(&["quarantine", "list"]);
    assert_eq!(ids(&listed["devices"]), suspect);
    let described = s.json(&["describe", "device", "dev0005"]);
    assert_eq!(described["quarantine"]["incident"], incident.as_str());
    assert_eq!(described["desired"], json!({}), "nothing desired of it");
    let compliance = s.json(&["compliance"]);
    assert_eq!(compliance["quarantined"], 1000, "{compliance}");
    let audit = s.json(&["audit", "--action", "quarantine"]);
    let entry = audit
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["name"] == incident.as_str())
        .expect("the incident is audited");
    assert_eq!(ids(&entry["devices"]), suspect);
    assert!(entry["result"]
        .as_str()
        .is_some_and(|r| r.contains("backdoored")));
    assert_eq!(entry["who"], "op");
    let by_device = s.json(&["audit", "--device", "dev0010"]);
    assert!(by_device
        .as_array()
        .expect("entries")
        .iter()
        .any(|e| e["name"] == incident.as_str()));
    // The server holds the CA here: the certificates they connected with
    // are revoked in its list too (for brokers that read the CRL).
    let serial = fleet.cert_serial("dev0015").expect("serial");
    eventually("dev0015's certificate in the CA's list", || {
        crate::rotation::revoked_serials(&s).contains(&serial)
    })
    .await;
    // lighting-co's scope holds none of them: it sees no quarantined device.
    let out = as_lc(&["quarantine", "list", "--output", "json"]);
    let theirs: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(theirs["total"], 0);

    // A release brings two back on new certificates; the old ones stay refused.
    let old = s.dir.path().join("old");
    std::fs::create_dir(&old).expect("dir");
    for id in ["dev0005", "dev0010"] {
        for ext in ["crt", "key"] {
            std::fs::copy(
                s.pki.join(format!("{id}.{ext}")),
                old.join(format!("{id}.{ext}")),
            )
            .expect("copy");
        }
    }
    let err = s.fails(&["release", "dev0001", "--out", "/nonexistent"]);
    assert!(err.contains("not quarantined"), "{err}");
    let out_dir = s.dir.path().join("installer");
    let released = s.json(&[
        "release",
        "dev0005",
        "dev0010",
        "--out",
        out_dir.to_str().expect("utf-8"),
        "--reason",
        "reflashed on site",
    ]);
    assert_eq!(released["released"], 2, "{released}");
    let key = out_dir.join("dev0005").join("dev0005.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
        0o600
    );
    for id in ["dev0005", "dev0010"] {
        let new_cert = out_dir.join(id).join(format!("{id}.crt"));
        let new_key = out_dir.join(id).join(format!("{id}.key"));
        assert!(
            publishes(&s, id, &new_cert, &new_key),
            "{id} with its new certificate"
        );
        assert!(
            !publishes(
                &s,
                id,
                &old.join(format!("{id}.crt")),
                &old.join(format!("{id}.key"))
            ),
            "{id} with its old certificate"
        );
    }
    // Still quarantined: refused whatever it shows.
    assert!(!publishes(
        &s,
        "dev0015",
        &s.pki.join("dev0015.crt"),
        &s.pki.join("dev0015.key")
    ));
    assert_eq!(s.json(&["quarantine", "list"])["total"], 998);
    let described = s.json(&["describe", "device", "dev0005"]);
    assert!(described["quarantine"].is_null(), "{described}");
    assert_eq!(
        described["certificate_pin"].as_array().map(Vec::len),
        Some(1)
    );
    fleet.shutdown().await;
}
