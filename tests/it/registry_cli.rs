//! The registry through the binary, as an operator uses it: devices issued
//! with attributes exist before they connect, a CSV manifest registers and
//! relabels, documents are tried, listed and deleted, and all of it
//! survives a SIGKILL of `cityplane serve`.

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{cli, eventually, free_port, json_of, ok, wait_up, Server, BIN};
use serde_json::{json, Value};

fn device<'a>(rows: &'a Value, id: &str) -> &'a Value {
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {rows}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_survives_sigkill_and_its_devices_converge_on_first_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pki, data, log) = (
        dir.path().join("pki"),
        dir.path().join("data"),
        dir.path().join("serve.log"),
    );
    let p = pki.to_str().expect("utf-8");
    ok(Command::new(BIN).args(["certs", "init", "--pki", p]));
    ok(Command::new(BIN).args([
        "certs", "issue", "--pki", p, "--role", "operator", "--id", "op", "--org", "city",
    ]));
    ok(Command::new(BIN).args([
        "certs",
        "issue",
        "--pki",
        p,
        "--role",
        "device",
        "--count",
        "3",
        "--prefix",
        "dev",
        "--class",
        "streetlight",
        "--label",
        "zone=north",
    ]));
    // Attributes describe devices only.
    let refused = Command::new(BIN)
        .args([
            "certs", "issue", "--pki", p, "--role", "operator", "--id", "op2", "--org", "city",
            "--class", "x",
        ])
        .output()
        .expect("runs");
    assert!(!refused.status.success());

    let port = free_port();
    let server = Server::start(&pki, &data, port, &log, "warn");
    wait_up(&pki, port);

    // Issued with attributes: registered before any of them connects.
    let rows = json_of(&pki, port, &["get", "devices"]);
    assert_eq!(rows.as_array().map(Vec::len), Some(3), "{rows}");
    let d1 = device(&rows, "dev0001");
    assert_eq!(
        (&d1["class"], &d1["labels"], &d1["last_seen"]),
        (
            &json!("streetlight"),
            &json!({"zone": "north"}),
            &json!("never")
        ),
        "{d1}"
    );

    // A CSV manifest relabels one and registers a device whose keys were
    // made elsewhere.
    let csv = dir.path().join("devices.csv");
    std::fs::write(
        &csv,
        "id,class,labels,owner\ndev0003,streetlight,zone=south;street=elm,lighting-co\ngw-0001,gateway,,city-it\n",
    )
    .expect("csv");
    let r = json_of(
        &pki,
        port,
        &["devices", "register", "-f", csv.to_str().expect("utf-8")],
    );
    assert_eq!(
        (r["registered"].as_u64(), r["updated"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "id,colour\nx1,red\n").expect("csv");
    let out = cli(
        &pki,
        port,
        &["devices", "register", "-f", bad.to_str().expect("utf-8")],
    )
    .output()
    .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown CSV column"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let north = dir.path().join("north.json");
    std::fs::write(
        &north,
        json!({"name": "north-dimming", "target": {"class": "streetlight", "labels": {"zone": "north"}},
               "priority": 10, "state": {"dimming": 40}})
        .to_string(),
    )
    .expect("doc");
    let n = north.to_str().expect("utf-8");
    let dry = json_of(&pki, port, &["apply", "--dry-run", "-f", n]);
    assert_eq!(
        (&dry["devices"], &dry["changing"], &dry["keys"]),
        (&json!(2), &json!(2), &json!({"dimming": 2})),
        "{dry}"
    );
    assert_eq!(
        json_of(&pki, port, &["get", "documents"]),
        json!([]),
        "a dry run stored nothing"
    );
    let applied = json_of(&pki, port, &["apply", "-f", n]);
    assert_eq!(
        applied["devices"], 2,
        "never-connected devices are targeted: {applied}"
    );

    // Power cut: everything acknowledged above is still there.
    server.kill();
    let _server = Server::start(&pki, &data, port, &log, "warn");
    wait_up(&pki, port);
    let docs = json_of(&pki, port, &["get", "documents"]);
    assert_eq!(docs[0]["name"], "north-dimming", "{docs}");
    assert_eq!(docs[0]["targeted"], 2, "{docs}");
    let gw = json_of(&pki, port, &["describe", "device", "gw-0001"]);
    assert_eq!(
        (&gw["class"], &gw["owner"]),
        (&json!("gateway"), &json!("city-it")),
        "{gw}"
    );
    assert_eq!(gw["reported"], Value::Null, "{gw}");

    // The devices connect for the first time; they report a random zone of
    // their own, which moves nothing.
    let mut sim = cityplane_agent_sim::SimConfig::new(&pki, format!("localhost:{port}"), "dev", 3);
    sim.presence = cityplane_agent_sim::PresenceMode::Skip;
    sim.mix = "streetlight=1".parse().expect("mix");
    let fleet = cityplane_agent_sim::Fleet::start(sim).await.expect("fleet");
    let dimmed = |id: &str| fleet.value_of(id, "dimming") == Some(Some(json!(40)));
    eventually("dev0001 and dev0002 dimmed", || {
        dimmed("dev0001") && dimmed("dev0002")
    })
    .await;
    let d3 = json_of(&pki, port, &["describe", "device", "dev0003"]);
    assert_eq!(
        d3["desired"].get("dimming"),
        None,
        "zone=south is not targeted: {d3}"
    );
    assert!(!dimmed("dev0003"));

    // Watching the north devices: the list, then each row that changes,
    // while the same operator goes on with other commands (each CLI call
    // is its own MQTT session, `op:<session>`).
    let mut watch = cityplane_testkit::process::ChildGuard::new(
        cli(
            &pki,
            port,
            &[
                "get",
                "devices",
                "--watch",
                "--interval",
                "0.2",
                "--output",
                "json",
                "--selector",
                r#"{"labels": {"zone": "north"}}"#,
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("watch"),
    );
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stdout = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    let next = || {
        rx.recv_timeout(Duration::from_secs(30))
            .expect("a watched row")
    };
    let mut first: Vec<String> = (0..2)
        .map(|_| next()["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    first.sort();
    assert_eq!(first, ["dev0001", "dev0002"]);

    // A label moves it (the watch shows it arrive); a delete lets go of all.
    let moved = json_of(&pki, port, &["devices", "label", "dev0003", "zone=north"]);
    assert_eq!(moved["changed"], 1, "{moved}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = next();
        if row["id"] == "dev0003" {
            assert_eq!(row["labels"]["zone"], "north", "{row}");
            break;
        }
        assert!(Instant::now() < deadline, "the watch never showed dev0003");
    }
    drop(watch);
    eventually("dev0003 dimmed after its label", || dimmed("dev0003")).await;
    let deleted = json_of(&pki, port, &["delete", "document", "north-dimming"]);
    assert_eq!(deleted["devices_changed"], 3, "{deleted}");
    let audit = json_of(&pki, port, &["audit"]);
    let actions: Vec<&str> = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for want in ["register", "apply", "label", "delete"] {
        assert!(actions.contains(&want), "{want} not audited: {actions:?}");
    }

    // A revoked device stays listed, as revoked.
    ok(Command::new(BIN).args(["certs", "revoke", "--pki", p, "--id", "dev0002"]));
    eventually("dev0002 listed as revoked", || {
        let rows = json_of(&pki, port, &["get", "devices"]);
        device(&rows, "dev0002")["revoked"] == true && device(&rows, "dev0001")["revoked"] == false
    })
    .await;
    fleet.shutdown().await;

    // Some 20 operator calls, a restart, first connects, a revocation: none
    // of it is an error in the server's log (each CLI call used to leave
    // rumqttd's "no-connection id N is already gone").
    let log = std::fs::read_to_string(&log).expect("log");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(errors.is_empty(), "{errors:#?}");
}
