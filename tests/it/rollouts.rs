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
            "certs", "issue", "--pki", p, "--role", "operator", "--id", "op", "--org", "city",
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
        common::fails(&mut cli(&self.pki, self.port, args))
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

    /// Simulated devices from `config`, once all of them are online.
    pub async fn online(
        &self,
        config: cityplane_agent_sim::SimConfig,
    ) -> cityplane_agent_sim::Fleet {
        let n = config.ids.len();
        let fleet = cityplane_agent_sim::Fleet::start(config)
            .await
            .expect("fleet");
        assert!(
            fleet
                .wait_online(n, std::time::Duration::from_secs(120))
                .await,
            "{n} devices online"
        );
        fleet
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
    let fleet = s.online(sim(&s.pki, s.port, 40)).await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_gate_halts_the_rollout_until_an_operator_decides() {
    let s = Setup::new(10);
    let _server = s.serve();
    s.zones(10);
    let fleet = s.online(sim(&s.pki, s.port, 10)).await;
    // The canary takes the change, then fails the rule the rollout names.
    let spec = s.file(
        "gate.json",
        &json!({"name": "gated", "target": {"class": "streetlight"}, "state": {"dimming": 20},
                "waves": [{"count": 2}, {"percent": 100}], "success_threshold": 100,
                "health": {"soak_s": 30, "rules": [{"key": "dimming", "op": ">", "value": 50}]}}),
    );
    s.json(&["rollout", "create", "-f", &spec]);
    let halted = s.until_phase("gated", "halted").await;
    assert!(
        halted["reason"]
            .as_str()
            .is_some_and(|r| r.contains("health gate: 2 of 2") && r.contains("fails dimming > 50")),
        "{halted}"
    );
    assert_eq!(
        halted["totals"],
        json!({"succeeded": 2, "queued": 8}),
        "{halted}"
    );
    // Resuming judges the wave again: still unhealthy, halted again; the
    // second wave never starts.
    s.json(&["rollout", "resume", "gated"]);
    let again = s.until_phase("gated", "halted").await;
    assert_eq!(again["totals"]["queued"], 8, "{again}");
    let out = cli(&s.pki, s.port, &["rollout", "status", "gated", "--watch"])
        .output()
        .expect("runs");
    assert!(
        !out.status.success(),
        "watching a halted rollout ends with an error"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("halted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.json(&["rollout", "abort", "gated"]);
    assert_eq!(s.devices_of("gated", Some("cancelled")).len(), 8);
    fleet.shutdown().await;
}

/// A release key, images and releases signed with it, in the test's directory.
struct Releases<'a> {
    s: &'a Setup,
    key_dir: PathBuf,
}

const LAMP_MODELS: [&str; 3] = ["LumiNode SL-200", "LumiNode SL-300", "Orbis LX-4"];

impl<'a> Releases<'a> {
    fn new(s: &'a Setup, name: &str) -> Releases<'a> {
        let key_dir = s.dir.path().join(name);
        ok(Command::new(BIN)
            .args(["firmware", "keygen", "--dir"])
            .arg(&key_dir));
        Releases { s, key_dir }
    }

    fn public_key(&self) -> [u8; 32] {
        cityplane_certs::firmware::read_public_key(&self.key_dir.join("release.pub"))
            .expect("release.pub")
    }

    /// Signs an image of `size` bytes as `version` for `models` (extra
    /// `sign` flags after); returns (release file, image file).
    fn sign(
        &self,
        version: &str,
        size: usize,
        models: &[&str],
        extra: &[&str],
    ) -> (String, String) {
        let image = self.s.dir.path().join(format!("img-{version}.bin"));
        // Each version its own bytes (equal images would share one stored file).
        let seed: usize = version.bytes().map(usize::from).sum();
        let bytes: Vec<u8> = (0..size)
            .map(|i| ((i * 31 + seed * 7) % 251) as u8)
            .collect();
        std::fs::write(&image, bytes).expect("image");
        let release = self
            .s
            .dir
            .path()
            .join(format!("img-{version}.release.json"));
        let mut cmd = Command::new(BIN);
        cmd.args(["firmware", "sign"])
            .arg(&image)
            .args(["--version", version, "--key"])
            .arg(self.key_dir.join("release.key"))
            .arg("--out")
            .arg(&release);
        for m in models {
            cmd.args(["--model", m]);
        }
        cmd.args(extra);
        ok(&mut cmd);
        (
            release.to_str().expect("utf-8").to_owned(),
            image.to_str().expect("utf-8").to_owned(),
        )
    }

    /// Signs and publishes; returns the image's SHA-256.
    fn publish(&self, version: &str, size: usize, models: &[&str], extra: &[&str]) -> String {
        let (release, image) = self.sign(version, size, models, extra);
        let r = self
            .s
            .json(&["firmware", "publish", &release, "--image", &image]);
        assert_eq!(r["complete"], true, "{r}");
        r["sha256"].as_str().expect("sha256").to_owned()
    }
}

fn firmware_sim(
    s: &Setup,
    prefix: &str,
    n: usize,
    key: [u8; 32],
) -> cityplane_agent_sim::SimConfig {
    let mut c = sim(&s.pki, s.port, n);
    c.ids = (1..=n).map(|i| format!("{prefix}{i:04}")).collect();
    c.release_key = Some(key);
    c.firmware = cityplane_agent_sim::FirmwareSim::fast();
    // Steps slow enough that a wave is in flight for a while.
    c.firmware.install_time = std::time::Duration::from_millis(300);
    c.firmware.health_check_time = std::time::Duration::from_millis(200);
    c.faults.reboot_time = (
        std::time::Duration::from_millis(20),
        std::time::Duration::from_millis(60),
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firmware_rollout_survives_sigkill_picks_up_new_devices_and_installs_once_each() {
    const N: usize = 500;
    let s = Setup::new(N);
    // Ten more, issued without attributes: no streetlight rollout targets them yet.
    ok(Command::new(BIN)
        .args(["certs", "issue", "--pki", s.pki.to_str().expect("utf-8")])
        .args(["--role", "device", "--count", "10", "--prefix", "new"]));
    let server = s.serve();
    s.zones(N);
    let releases = Releases::new(&s, "release");
    releases.publish("2.0.0", 200 * 1024, &LAMP_MODELS, &[]);
    let fleet =
        cityplane_agent_sim::Fleet::start(firmware_sim(&s, "dev", N, releases.public_key()))
            .await
            .expect("fleet");
    let newcomers =
        cityplane_agent_sim::Fleet::start(firmware_sim(&s, "new", 10, releases.public_key()))
            .await
            .expect("newcomers");
    assert!(
        fleet
            .wait_online(N, std::time::Duration::from_secs(120))
            .await
    );

    let spec = s.file(
        "fw.json",
        &json!({"name": "lamps-2-0-0", "target": {"class": "streetlight"}, "firmware": "2.0.0",
                "waves": [{"count": 10}, {"percent": 10}, {"percent": 100}],
                "success_threshold": 100, "health": {"soak_s": 1}}),
    );
    let created = s.json(&["rollout", "create", "-f", &spec]);
    assert_eq!(created["waves"], json!([10, 50, 440]), "{created}");

    // SIGKILL while the third wave is on its way: devices told, downloading,
    // installing or rebooting.
    let mut at_kill = Value::Null;
    eventually("the third wave under way", || {
        at_kill = s.status("lamps-2-0-0");
        let busy: u64 = [
            "notified",
            "downloading",
            "installing",
            "rebooting",
            "verifying",
        ]
        .iter()
        .map(|k| at_kill["totals"][*k].as_u64().unwrap_or(0))
        .sum();
        at_kill["wave"] == 3 && busy >= 100
    })
    .await;
    server.kill();
    assert_eq!(at_kill["phase"], "active", "{at_kill}");
    let _server = s.serve();
    // Registered while the rollout runs: picked up.
    let joiners: Vec<Value> = (1..=10)
        .map(|i| json!({"id": format!("new{i:04}"), "class": "streetlight", "labels": {"zone": "east"}}))
        .collect();
    let f = s.file("joiners.json", &json!(joiners));
    s.json(&["devices", "register", "-f", &f]);

    let done = s.until_phase("lamps-2-0-0", "completed").await;
    eventually("every device on 2.0.0", || {
        s.status("lamps-2-0-0")["totals"] == json!({"succeeded": N + 10})
    })
    .await;
    for (sim, prefix, n) in [(&fleet, "dev", N), (&newcomers, "new", 10)] {
        for i in 1..=n {
            let id = format!("{prefix}{i:04}");
            let d = sim.device(&id).expect("device");
            assert_eq!(
                d.firmware_installs, 1,
                "{id} installed {} times",
                d.firmware_installs
            );
            assert_eq!(
                sim.value_of(&id, "firmware"),
                Some(Some(json!("2.0.0"))),
                "{id}"
            );
        }
    }
    assert!(
        done["history"].to_string().contains("wave 3 done"),
        "{done}"
    );
    fleet.shutdown().await;
    newcomers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_refuses_every_bad_release_and_the_rollout_says_why() {
    const N: usize = 6;
    let s = Setup::new(N);
    let _server = s.serve();
    s.zones(N);
    let releases = Releases::new(&s, "release");
    let stranger = Releases::new(&s, "stranger");
    let fleet = s
        .online(firmware_sim(&s, "dev", N, releases.public_key()))
        .await;
    let firmware = s.data.join("firmware");

    // What each release gets wrong, and the words the devices' refusals use.
    stranger.publish("2.1.0", 4096, &LAMP_MODELS, &[]);
    releases.publish("2.2.0", 4096, &["Nope X-1"], &[]);
    let tampered = releases.publish("2.3.0", 100_000, &LAMP_MODELS, &[]);
    let mut bytes = std::fs::read(firmware.join(&tampered)).expect("stored image");
    bytes[50_000] ^= 0xff;
    std::fs::write(firmware.join(&tampered), bytes).expect("tamper");
    let grown = releases.publish("2.4.0", 4096, &LAMP_MODELS, &[]);
    let mut bytes = std::fs::read(firmware.join(&grown)).expect("stored image");
    bytes.extend_from_slice(&[0u8; 70_000]);
    std::fs::write(firmware.join(&grown), bytes).expect("grow");
    releases.publish("1.0.0", 4096, &LAMP_MODELS, &[]);
    let cases = [
        ("2.1.0", "bad signature"),
        ("2.2.0", "wrong model"),
        ("2.3.0", "hash mismatch"),
        ("2.4.0", "size"),
        ("1.0.0", "downgrade"),
    ];
    for (version, words) in cases {
        let name = format!("bad-{}", version.replace('.', "-"));
        let spec = s.file(
            &format!("{name}.json"),
            &json!({"name": name, "target": {"class": "streetlight"}, "firmware": version,
                    "waves": [{"percent": 100}]}),
        );
        s.json(&["rollout", "create", "-f", &spec]);
        let mut last = Value::Null;
        let refused = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            loop {
                last = s.status(&name);
                if last["totals"] == json!({"failed": N}) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(refused.is_ok(), "{name}: every device refused: {last}");
        let failed = s.devices_of(&name, Some("failed"));
        assert_eq!(failed.len(), N);
        for d in &failed {
            assert!(
                d["reason"].as_str().is_some_and(|r| r.contains(words)),
                "{version}: {d}"
            );
        }
        let st = s.status(&name);
        assert!(
            st["failures"].to_string().contains(words),
            "rollout status shows it: {st}"
        );
        s.json(&["rollout", "abort", &name]);
    }
    // No release at all: a rollout is refused at create; a document that
    // sets firmware anyway reaches devices unsigned, and they refuse it.
    let missing = s.file(
        "missing.json",
        &json!({"name": "missing", "target": {"class": "streetlight"}, "firmware": "9.9.9"}),
    );
    let refused = s.fails(&["rollout", "create", "-f", &missing]);
    assert!(
        refused.contains("no release 9.9.9 is published"),
        "{refused}"
    );
    let doc = s.file(
        "doc.json",
        &json!({"name": "sneaky", "target": {"ids": ["dev0001"]}, "state": {"firmware": "9.9.9"}}),
    );
    s.json(&["apply", "-f", &doc]);
    eventually("dev0001 refuses an unsigned firmware change", || {
        s.json(&["describe", "device", "dev0001"])["failed"]
            .as_str()
            .is_some_and(|f| f.contains("unsigned"))
    })
    .await;
    for i in 1..=N {
        let d = fleet.device(&format!("dev{i:04}")).expect("device");
        assert_eq!(d.firmware_installs, 0, "nothing bad was installed");
    }
    // Images are under a quota (4 MiB for these tests): a release that
    // would pass it is refused before a byte is stored.
    let (release, image) = releases.sign("3.0.0", 5 << 20, &LAMP_MODELS, &[]);
    let refused = s.fails(&["firmware", "publish", &release, "--image", &image]);
    assert!(
        refused.contains("quota") && refused.contains("limit of 4 MiB"),
        "{refused}"
    );
    let listed = s.json(&["firmware", "list"]);
    assert_eq!(listed["total"], 5, "{listed}");
    let partial = std::fs::read_dir(&firmware)
        .expect("firmware dir")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(".upload-"));
    assert!(!partial, "nothing of the refused image was stored");
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firmware_rollout_whose_failures_trip_the_abort_rolls_back_with_a_signed_downgrade() {
    const N: usize = 12;
    let s = Setup::new(N);
    let _server = s.serve();
    s.zones(N);
    let releases = Releases::new(&s, "release");
    // The 2.0.0 build leaves the Orbis LX-4 out; the rollback releases may
    // go below the floor 2.0.0 sets.
    releases.publish("2.0.0", 8192, &LAMP_MODELS[..2], &[]);
    for old in ["1.4.2", "1.3.9"] {
        releases.publish(old, 8192, &LAMP_MODELS, &["--downgrade"]);
    }
    let fleet = s
        .online(firmware_sim(&s, "dev", N, releases.public_key()))
        .await;
    let before: Vec<(String, Value)> = (1..=N)
        .map(|i| {
            let id = format!("dev{i:04}");
            let fw = fleet.value_of(&id, "firmware").flatten().expect("firmware");
            (id, fw)
        })
        .collect();
    let lx4 = (1..=N)
        .filter(|i| {
            fleet.value_of(&format!("dev{i:04}"), "hardware_model")
                == Some(Some(json!("Orbis LX-4")))
        })
        .count();
    assert!(lx4 > 0 && lx4 < N, "the fleet mixes models ({lx4} LX-4)");

    let spec = s.file(
        "fw.json",
        &json!({"name": "lamps-2-0-0", "target": {"class": "streetlight"}, "firmware": "2.0.0",
                "waves": [{"percent": 100}], "success_threshold": 100,
                "abort": [{"failure": "rejected", "threshold_percent": 10, "min_executed": N}],
                "rollback": true}),
    );
    s.json(&["rollout", "create", "-f", &spec]);
    let aborted = s.until_phase("lamps-2-0-0", "aborted").await;
    assert!(
        aborted["reason"]
            .as_str()
            .is_some_and(|r| r.contains("(rejected)") && r.contains("wrong model")),
        "{aborted}"
    );
    // Every device is back on what it ran, the ones that installed 2.0.0
    // through the signed downgrade.
    eventually("every device rolled back", || {
        s.status("lamps-2-0-0")["totals"] == json!({"rolled_back": N})
    })
    .await;
    for (id, fw) in &before {
        assert_eq!(
            fleet.value_of(id, "firmware"),
            Some(Some(fw.clone())),
            "{id}"
        );
    }
    let installed_twice = (1..=N)
        .filter_map(|i| fleet.device(&format!("dev{i:04}")))
        .filter(|d| d.firmware_installs == 2)
        .count();
    assert_eq!(
        installed_twice,
        N - lx4,
        "2.0.0 then the rollback, on every model it fits"
    );
    fleet.shutdown().await;
}
