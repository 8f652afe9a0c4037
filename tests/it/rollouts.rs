//! Rollouts through the binary, against simulated devices over real mTLS:
//! waves spread over zones, gates, abort and rollback, windows, conflicts,
//! and (with signed firmware) installs that survive a SIGKILL of the server.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{cli, eventually, free_port, json_of, ok, wait_up, Server, BIN};
use serde_json::{json, Value};

/// A PKI with operator `op` and `n` streetlights `dev0001…` registered
/// alternately in zones north and south.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub pki: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    pub port: u16,
}

impl Setup {
    pub fn new(n: usize) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, data, log) = (
            dir.path().join("pki"),
            dir.path().join("data"),
            dir.path().join("serve.log"),
        );
        let p = pki.to_str().expect("utf-8");
        ok(Command::new(BIN).args(["certs", "init", "--pki", p]));
        ok(Command::new(BIN).args([
            "certs", "issue", "--pki", p, "--role", "operator", "--id", "op",
        ]));
        let count = n.to_string();
        ok(Command::new(BIN).args([
            "certs",
            "issue",
            "--pki",
            p,
            "--role",
            "device",
            "--count",
            &count,
            "--prefix",
            "dev",
            "--class",
            "streetlight",
        ]));
        Setup {
            dir,
            pki,
            data,
            log,
            port: free_port(),
        }
    }

    pub fn serve(&self) -> Server {
        let s = Server::start(&self.pki, &self.data, self.port, &self.log, "warn");
        wait_up(&self.pki, self.port);
        s
    }

    pub fn json(&self, args: &[&str]) -> Value {
        json_of(&self.pki, self.port, args)
    }

    /// The CLI's exit and its standard error, for refusals.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = cli(&self.pki, self.port, args).output().expect("runs");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn file(&self, name: &str, v: &Value) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, v.to_string()).expect("write");
        path.to_str().expect("utf-8").to_owned()
    }

    /// Registers `dev0001…dev{n}` in zones north (odd) and south (even).
    pub fn zones(&self, n: usize) {
        let devices: Vec<Value> = (1..=n)
            .map(|i| {
                json!({"id": format!("dev{i:04}"), "class": "streetlight",
                       "labels": {"zone": if i % 2 == 1 { "north" } else { "south" }}})
            })
            .collect();
        let f = self.file("zones.json", &json!(devices));
        self.json(&["devices", "register", "-f", &f]);
    }

    pub fn status(&self, name: &str) -> Value {
        self.json(&["rollout", "status", name])
    }

    pub async fn until_phase(&self, name: &str, phase: &str) -> Value {
        let mut last = Value::Null;
        eventually(&format!("rollout {name} {phase}"), || {
            last = self.status(name);
            last["phase"] == phase
        })
        .await;
        last
    }

    pub fn devices_of(&self, name: &str, status: Option<&str>) -> Vec<Value> {
        let mut args = vec!["rollout", "devices", name];
        if let Some(s) = status {
            args.extend(["--status", s]);
        }
        self.json(&args)["devices"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

pub fn sim(pki: &Path, port: u16, n: usize) -> cityplane_agent_sim::SimConfig {
    let mut sim = cityplane_agent_sim::SimConfig::new(pki, format!("localhost:{port}"), "dev", n);
    sim.presence = cityplane_agent_sim::PresenceMode::Skip;
    sim.mix = "streetlight=1".parse().expect("mix");
    sim.backoff = cityplane_agent_sim::Backoff {
        initial: std::time::Duration::from_millis(50),
        max: std::time::Duration::from_millis(400),
        multiplier: 2.0,
    };
    sim
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_rollout_moves_in_waves_and_a_failing_one_aborts_and_rolls_back() {
    let s = Setup::new(40);
    let _server = s.serve();
    s.zones(40);
    let fleet = cityplane_agent_sim::Fleet::start(sim(&s.pki, s.port, 40))
        .await
        .expect("fleet");
    assert!(
        fleet
            .wait_online(40, std::time::Duration::from_secs(60))
            .await
    );

    // Three waves; each moves on only once all of it took the change.
    let spec = s.file(
        "dim.json",
        &json!({"name": "dim-33", "target": {"class": "streetlight"}, "state": {"dimming": 33},
                "waves": [{"count": 4}, {"percent": 25}, {"percent": 100}],
                "success_threshold": 100, "health": {"soak_s": 1}}),
    );
    let created = s.json(&["rollout", "create", "-f", &spec]);
    assert_eq!(
        (&created["devices"], &created["waves"]),
        (&json!(40), &json!([4, 10, 26])),
        "{created}"
    );
    // The canary is representative: both zones, not the first 4 ids.
    let canary: Vec<Value> = s
        .devices_of("dim-33", None)
        .into_iter()
        .filter(|d| d["wave"] == 1)
        .collect();
    let north = canary.iter().filter(|d| d["zone"] == "north").count();
    assert_eq!((canary.len(), north), (4, 2), "{canary:?}");
    let done = s.until_phase("dim-33", "completed").await;
    assert_eq!(done["totals"], json!({"succeeded": 40}), "{done}");
    let history: Vec<&str> = done["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["what"].as_str())
        .collect();
    assert!(
        history.iter().any(|h| h.starts_with("wave 1 done"))
            && history.iter().any(|h| h.starts_with("wave 3 done")),
        "{history:?}"
    );
    for i in 1..=40 {
        assert_eq!(
            fleet.value_of(&format!("dev{i:04}"), "dimming"),
            Some(Some(json!(33)))
        );
    }

    // A value every device refuses: the canary's refusals trip the abort
    // rule, the rest never hear of it, the canary gets 33 back.
    let bad = s.file(
        "bad.json",
        &json!({"name": "dim-150", "target": {"class": "streetlight"}, "state": {"dimming": 150},
                "waves": [{"count": 4}, {"percent": 100}],
                "abort": [{"failure": "rejected", "threshold_percent": 50, "min_executed": 2}],
                "rollback": true}),
    );
    s.json(&["rollout", "create", "-f", &bad]);
    let aborted = s.until_phase("dim-150", "aborted").await;
    assert!(
        aborted["reason"]
            .as_str()
            .is_some_and(|r| r.contains("abort rule") && r.contains("dimming")),
        "{aborted}"
    );
    assert_eq!(s.devices_of("dim-150", Some("cancelled")).len(), 36);
    eventually("the canary rolled back", || {
        s.devices_of("dim-150", Some("rolled_back")).len() == 4
    })
    .await;
    for i in 1..=40 {
        assert_eq!(
            fleet.value_of(&format!("dev{i:04}"), "dimming"),
            Some(Some(json!(33))),
            "dev{i:04}"
        );
    }

    // A rollout deferred to a window that is closed now holds its key:
    // another on the same key is refused, naming it.
    let now = time::OffsetDateTime::now_utc();
    let later = now + time::Duration::hours(3);
    let window = json!({"start": format!("{:02}:{:02}", later.hour(), later.minute()),
                        "end": format!("{:02}:{:02}", (later.hour() + 1) % 24, later.minute()),
                        "tz": "UTC"});
    let night = s.file(
        "night.json",
        &json!({"name": "night", "target": {"class": "streetlight"}, "state": {"dimming": 10},
                "window": window}),
    );
    s.json(&["rollout", "create", "-f", &night]);
    let other = s.file(
        "other.json",
        &json!({"name": "other", "target": {"labels": {"zone": "north"}}, "state": {"dimming": 5}}),
    );
    let refused = s.fails(&["rollout", "create", "-f", &other]);
    assert!(
        refused.contains("conflict")
            && refused.contains("\"night\"")
            && refused.contains("dimming"),
        "{refused}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let deferred = s.status("night");
    assert_eq!(deferred["totals"], json!({"queued": 40}), "{deferred}");
    assert!(
        deferred["waiting"]
            .as_str()
            .is_some_and(|w| w.contains("maintenance window") && w.contains("UTC")),
        "{deferred}"
    );
    // Abort without rollback: nothing had started, nothing changes.
    s.json(&["rollout", "abort", "night", "--reason", "not tonight"]);
    let list = s.json(&["rollout", "list"]);
    let phases: Vec<(&str, &str)> = list["rollouts"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or(""),
                r["phase"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        phases,
        [
            ("night", "aborted"),
            ("dim-150", "aborted"),
            ("dim-33", "completed")
        ]
    );
    let audit = s.json(&["audit"]);
    assert!(audit.to_string().contains("rollout-abort"), "{audit}");
    assert_eq!(fleet.value_of("dev0001", "dimming"), Some(Some(json!(33))));
    fleet.shutdown().await;
}
