//! The promises a user relies on, run unchanged on every deployment (see
//! `common::deploy`): identity and topic rules both ways, converge, drift
//! correction, re-drive of a device that was offline, a rollout of signed
//! firmware, revocation and quarantine. What
//! a deployment cannot promise is asserted as the documented gap it is
//! (docs/DEPLOYMENT.md), so a change on either side fails here.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use cityplane_agent_sim::Fleet;
use serde_json::{json, Value};

use crate::common::deploy::{Deployment, Kind};
use crate::common::{eventually, ok, BIN};

const DEVICES: usize = 12;
/// The models agent-sim's streetlights are.
const LAMP_MODELS: [&str; 3] = ["LumiNode SL-200", "LumiNode SL-300", "Orbis LX-4"];

/// The rogue's attempts that `kind` lets through: docs/DEPLOYMENT.md's gaps.
fn accepted_by(kind: Kind) -> BTreeSet<&'static str> {
    match kind {
        Kind::Embedded => BTreeSet::new(),
        // Not asked: mosquitto answers a publish its ACL refuses with a
        // PUBACK and drops it (MQTT 3.1.1 has no way to say no), so a
        // refusal cannot be told from a delivery by the sender.
        Kind::Mosquitto => unreachable!("mosquitto's refusals are silent"),
        // Measured on 3.10.8 (docs/DEPLOYMENT.md): any client id is taken
        // (it evicts the victim, whose commands subscription is QoS 0 there;
        // with a QoS 1 one the spoof failed on that queue's permission), a
        // will on another's topic is checked only when it is published, a
        // second CONNECT is ignored, and the size limit is RabbitMQ's.
        Kind::Rabbit => [
            "spoof-client-id",
            "will-on-other-presence",
            "second-connect",
            "oversized-payload",
        ]
        .into(),
    }
}

/// The rogue's attempts that `kind` neither refuses nor accepts.
fn unanswered_by(kind: Kind) -> BTreeSet<&'static str> {
    match kind {
        // RabbitMQ waits for the rest of a packet whose length field
        // promises more than 256 MiB, until the probe gives up.
        Kind::Rabbit => ["malformed-remaining-length"].into(),
        _ => BTreeSet::new(),
    }
}

/// `id` loses its session and its reconnects (50–400 ms apart) are refused.
pub(crate) async fn stays_out(fleet: &Fleet, id: &str, connects_before: u32, kind: Kind) {
    eventually(&format!("{kind:?}: {id} cut"), || {
        fleet.device(id).is_some_and(|s| !s.connected)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = fleet.device(id).expect("device");
    assert!(
        !after.connected && after.connects == connects_before,
        "{kind:?}: {id} got back in: {after:?}"
    );
}

fn row<'a>(rows: &'a Value, id: &str) -> &'a Value {
    rows.as_array()
        .expect("rows")
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {rows}"))
}

async fn the_promises_hold_on(kind: Kind, test: &str) {
    let Some(mut d) = Deployment::start(kind, test, DEVICES) else {
        return;
    };
    let mut sim = d.sim(DEVICES);
    sim.rogue_ids = vec!["rogue01".to_owned()];
    let release_key = d.dir.path().join("release");
    ok(Command::new(BIN)
        .args(["firmware", "keygen", "--dir"])
        .arg(&release_key));
    sim.release_key = Some(
        cityplane_certs::firmware::read_public_key(&release_key.join("release.pub"))
            .expect("release.pub"),
    );
    sim.firmware = cityplane_agent_sim::FirmwareSim::fast();
    let fleet = Fleet::start(sim).await.expect("fleet starts");
    assert!(
        fleet.wait_online(DEVICES, Duration::from_secs(60)).await,
        "{kind:?}: the fleet came online"
    );

    // Identity and topic rules, both ways: a device holding a valid
    // certificate tries to be, speak for, and listen to another.
    if kind != Kind::Mosquitto {
        let rogues = fleet.run_rogues().await;
        let accepted: BTreeSet<&str> = rogues
            .accepted_details
            .iter()
            .filter_map(|l| l.split_once(": ").map(|(_, action)| action))
            .collect();
        assert_eq!(
            accepted,
            accepted_by(kind),
            "{kind:?}: what the broker let through: {rogues:#?}"
        );
        let unanswered: BTreeSet<&str> = rogues
            .by_action
            .iter()
            .filter(|(_, a)| a.how.keys().any(|how| how.starts_with("unanswered")))
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(unanswered, unanswered_by(kind), "{kind:?}: {rogues:#?}");
    }

    // Converge: one document, every device, acknowledged by the CLI's --wait.
    let dim30 = d.file(
        "dim30.json",
        &json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 30}}),
    );
    ok(&mut d.cli(&["apply", "-f", &dim30, "--wait", "--timeout", "60"]));
    assert!(
        fleet.all_have("dimming", &json!(30), None),
        "{kind:?}: --wait returned before every device was dimmed"
    );
    let docs = d.json(&["get", "documents"]);
    assert_eq!(
        (&docs[0]["targeted"], &docs[0]["converged"]),
        (&json!(DEVICES), &json!(DEVICES)),
        "{kind:?}: {docs}"
    );

    // Drift: a device changes by itself; the controller puts it back.
    assert!(fleet.tamper("dev0002", "dimming", json!(99)));
    eventually(&format!("{kind:?}: dev0002's drift corrected"), || {
        fleet.value_of("dev0002", "dimming") == Some(Some(json!(30)))
    })
    .await;

    // Offline re-drive: a change made while a device is away reaches it
    // when it is back.
    assert!(fleet.take_offline("dev0003", Duration::from_secs(3)));
    eventually(&format!("{kind:?}: dev0003 offline"), || {
        fleet.device("dev0003").is_some_and(|s| !s.connected)
    })
    .await;
    let dim40 = d.file(
        "dim40.json",
        &json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 40}}),
    );
    ok(&mut d.cli(&["apply", "-f", &dim40]));
    eventually(
        &format!("{kind:?}: every device at 40, dev0003 too"),
        || fleet.all_have("dimming", &json!(40), None),
    )
    .await;

    // A rollout of signed firmware: every device fetches the image's bytes
    // in chunks through the broker, verifies and installs it once.
    let image = d.dir.path().join("image.bin");
    std::fs::write(
        &image,
        (0..200 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .expect("image");
    let release = d.dir.path().join("image.release.json");
    let mut sign = Command::new(BIN);
    sign.args(["firmware", "sign"])
        .arg(&image)
        .args(["--version", "2.0.0", "--key"])
        .arg(release_key.join("release.key"))
        .arg("--out")
        .arg(&release);
    for model in LAMP_MODELS {
        sign.args(["--model", model]);
    }
    ok(&mut sign);
    let published = d.json(&[
        "firmware",
        "publish",
        release.to_str().expect("utf-8"),
        "--image",
        image.to_str().expect("utf-8"),
    ]);
    assert_eq!(published["complete"], true, "{kind:?}: {published}");
    let spec = d.file(
        "rollout.json",
        &json!({"name": "lamps-2", "target": {"class": "streetlight"}, "firmware": "2.0.0",
                "waves": [{"percent": 100}], "success_threshold": 100, "health": {"soak_s": 1}}),
    );
    d.json(&["rollout", "create", "-f", &spec]);
    let mut status = Value::Null;
    let completed = tokio::time::timeout(Duration::from_secs(60), async {
        while status["phase"] != "completed" {
            tokio::time::sleep(Duration::from_millis(200)).await;
            status = d.json(&["rollout", "status", "lamps-2"]);
        }
    })
    .await;
    assert!(completed.is_ok(), "{kind:?}: the rollout: {status:#}");
    for id in fleet.ids() {
        let device = fleet.device(&id).expect("device");
        assert_eq!(device.firmware_installs, 1, "{kind:?}: {id}");
        assert_eq!(
            fleet.value_of(&id, "firmware"),
            Some(Some(json!("2.0.0"))),
            "{kind:?}: {id}"
        );
    }

    // Certificate rotation is confirmed only by a broker that says which
    // certificate a device connected with (ours); elsewhere it would roll
    // every device back, so it is refused before any device starts, also
    // as a plain rollout of the `certificate` key. (It runs on the
    // embedded broker in `rotation.rs`.)
    if d.external() {
        let why = d.fails(&["certs", "rotate", "--selector", "class=streetlight"]);
        assert!(
            why.contains("unavailable")
                && why.contains("which certificate each device connected with"),
            "{kind:?}: {why}"
        );
        let spec = d.file(
            "rotate.json",
            &json!({"name": "rot", "target": {"class": "streetlight"},
                    "state": {"certificate": {"rotation": "rot"}}}),
        );
        let why = d.fails(&["rollout", "create", "-f", &spec]);
        assert!(why.contains("unavailable"), "{kind:?}: {why}");
        for name in ["rot", "rotate-1"] {
            let why = d.fails(&["rollout", "status", name]);
            assert!(
                why.contains("no rollout named"),
                "{kind:?}: a refused rotation was stored: {why}"
            );
        }
    }

    // Revocation: the certificate's live session is cut and stays out.
    let before = fleet.device("dev0004").expect("dev0004").connects;
    d.revoke("dev0004");
    if d.cuts_sessions() {
        stays_out(&fleet, "dev0004", before, kind).await;
    }
    eventually(&format!("{kind:?}: dev0004 listed as revoked"), || {
        let rows = d.json(&["get", "devices"]);
        row(&rows, "dev0004")["revoked"] == true && row(&rows, "dev0001")["revoked"] == false
    })
    .await;

    // Quarantine: the controller cuts a device whose certificate is valid.
    let before = fleet.device("dev0005").expect("dev0005").connects;
    let quarantined = d.json(&["quarantine", "--ids", "dev0005", "--reason", "tampered"]);
    assert_eq!(quarantined["quarantined"], 1, "{kind:?}: {quarantined}");
    if d.cuts_sessions() {
        stays_out(&fleet, "dev0005", before, kind).await;
    }

    fleet.shutdown().await;
    assert!(d.alive(), "{kind:?}: the server or controller died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promises_hold_on_the_embedded_server() {
    the_promises_hold_on(Kind::Embedded, "the_promises_hold_on_the_embedded_server").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promises_hold_on_mosquitto_with_an_external_controller() {
    the_promises_hold_on(
        Kind::Mosquitto,
        "the_promises_hold_on_mosquitto_with_an_external_controller",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promises_hold_on_a_rabbitmq_cluster() {
    the_promises_hold_on(Kind::Rabbit, "the_promises_hold_on_a_rabbitmq_cluster").await;
}

/// Issue 13's fault test: one of three RabbitMQ nodes (the one the
/// controller and a third of the devices are on) is killed while 2,000
/// devices converge; sessions move to the survivors and every device
/// converges, the controller's acknowledged work included.
///
/// RabbitMQ 3.10.8 strands some of the dead node's devices: re-subscribed
/// on a survivor while the dead node's transient queues are being cleaned
/// up, their binding stays listed but leaves the topic exchange's routing
/// table, so commands to them are dropped (without the repair, 46 of 300
/// and 181 of 2,000 never converged). It holds because `controller
/// --cluster-dir` closes the connection of a device whose command went
/// unanswered twice once that cleanup is over (docs/DEPLOYMENT.md, "a node
/// lost").
///
/// In CI since 2026-12-03 (~160 s beside the other tests; 448 s for the
/// suite with it against 367 s without): it had passed beside them in 3
/// runs of 3 since the closes were flagged later and made 16 at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_converges_when_a_rabbitmq_node_dies_mid_change() {
    const N: usize = 2000;
    let test = "every_device_converges_when_a_rabbitmq_node_dies_mid_change";
    let Some(d) = Deployment::start(Kind::Rabbit, test, N) else {
        return;
    };
    let fleet = Fleet::start(d.sim(N)).await.expect("fleet starts");
    assert!(
        fleet.wait_online(N, Duration::from_secs(180)).await,
        "{N} devices online"
    );
    let dim = d.file(
        "dim.json",
        &json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 30}}),
    );
    ok(&mut d.cli(&["apply", "-f", &dim]));
    // Mid-change: some devices have it, most do not yet.
    eventually("the first devices dimmed", || {
        fleet.count_with("dimming", &json!(30), None).0 > 0
    })
    .await;
    let cluster = d.cluster().expect("a cluster");
    cluster.kill_node(0);
    let killed = std::time::Instant::now();
    let mut last = 0;
    let converged = tokio::time::timeout(Duration::from_secs(180), async {
        while !fleet.all_have("dimming", &json!(30), None) {
            last = fleet.count_with("dimming", &json!(30), None).0;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if converged.is_err() {
        let errors: Vec<String> = (2..=3)
            .flat_map(|n| {
                let log = cluster
                    .dir()
                    .join(format!("rabbit{n}/log/rabbit{n}@localhost.log"));
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("[error]") && !l.contains("<<"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let tail = &errors[errors.len().saturating_sub(40)..];
        let states = fleet.device_states();
        let connected = states.iter().filter(|s| s.connected).count();
        // Connected and never commanded is the stranded subscription's mark.
        let behind: Vec<String> = states
            .iter()
            .filter(|s| s.state.get("dimming") != Some(&json!(30)))
            .take(10)
            .map(|s| {
                format!(
                    "{}: connected {}, connects {}, commands received {}",
                    s.id, s.connected, s.connects, s.commands_received
                )
            })
            .collect();
        panic!(
            "{last} of {N} devices dimmed 180 s after the node died, {connected} connected\n{}\n{}\nRabbitMQ's errors:\n{}",
            behind.join("\n"),
            d.log(),
            tail.join("\n")
        );
    }
    // How close to the limit it came (`--nocapture`).
    eprintln!(
        "{test}: every device converged within {:?} of the node's death",
        killed.elapsed()
    );
    // The controller says so too, asked through a surviving node.
    let out = ok(&mut d.cli_at(1, &["get", "documents", "--output", "json"]));
    let docs: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (&docs[0]["targeted"], &docs[0]["converged"]),
        (&json!(N), &json!(N)),
        "{docs}"
    );
    fleet.shutdown().await;
}

/// `apply --wait` polls the document's status; a poll that goes
/// unanswered (the controller paused here; on a loaded RabbitMQ cluster,
/// an answer lost with the connection it was published on) is asked
/// again, with a warning, until the fleet converges or the wait's own
/// deadline passes: the write was acknowledged, and the fleet converges
/// whether or not this command hears about it. Found at 10,000 devices on
/// the cluster, where every `apply --wait` failed on fleets that
/// converged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_asks_again_when_a_status_query_goes_unanswered() {
    const N: usize = 3;
    let test = "apply_wait_asks_again_when_a_status_query_goes_unanswered";
    let Some(mut d) = Deployment::start(Kind::Mosquitto, test, N) else {
        return;
    };
    // The devices are offline, so the wait cannot end before the pause.
    let mut apply = Watched::spawn(apply_dim_and_wait(&d));
    apply.until(Stream::Stdout, "accepted \"dim\"");
    d.signal_controller(0, "STOP");
    // The old behaviour: the first unanswered poll ended the command.
    apply.until(Stream::Stderr, "warning: status: no answer within 2s");
    d.signal_controller(0, "CONT");
    let fleet = Fleet::start(d.sim(N)).await.expect("fleet starts");
    apply.converged(N).await;
    assert!(fleet.all_have("dimming", &json!(40), None));
    fleet.shutdown().await;
}

/// The same when the connection itself goes: the broker restarts while
/// `apply --wait` polls, and stays away for longer than a poll. The
/// command connects again, subscribes to its answers again (the new
/// clean session has forgotten them), and ends when the fleet converged.
/// Asked on a session without the subscription, every answer would go
/// nowhere until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_wait_connects_again_when_the_broker_restarts_mid_wait() {
    const N: usize = 3;
    let test = "apply_wait_connects_again_when_the_broker_restarts_mid_wait";
    let Some(mut d) = Deployment::start(Kind::Mosquitto, test, N) else {
        return;
    };
    let mut apply = Watched::spawn(apply_dim_and_wait(&d));
    apply.until(Stream::Stdout, "accepted \"dim\"");
    d.restart_broker(Duration::from_secs(3));
    apply.until(Stream::Stderr, "asking again");
    // The devices once the controller has its subscriptions again: this
    // mosquitto keeps no sessions across a restart, so a device's first
    // report before then would be lost, and the controller commands no
    // device it has no report of (docs/DEPLOYMENT.md, mosquitto).
    eventually("the controller answers again", || {
        d.cli(&["get", "documents"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .await;
    let fleet = Fleet::start(d.sim(N)).await.expect("fleet starts");
    apply.converged(N).await;
    assert!(fleet.all_have("dimming", &json!(40), None));
    fleet.shutdown().await;
}

/// `apply -f dim.json --wait` (dimming 40 for every streetlight), each
/// poll given 2 s, the whole wait 120 s.
fn apply_dim_and_wait(d: &Deployment) -> Command {
    let dim = d.file(
        "dim.json",
        &json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 40}}),
    );
    d.cli(&[
        "apply",
        "-f",
        &dim,
        "--wait",
        "--timeout",
        "2",
        "--wait-timeout",
        "120",
    ])
}

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// A command under way whose output is read line by line as it comes.
struct Watched {
    child: std::process::Child,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
    said: Vec<String>,
}

impl Watched {
    fn spawn(mut cmd: Command) -> Watched {
        use std::io::BufRead;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("command runs");
        let lines = |stream: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = std::sync::mpsc::channel::<String>();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().expect("stdout")));
        let stderr = lines(Box::new(child.stderr.take().expect("stderr")));
        Watched {
            child,
            stdout,
            stderr,
            said: Vec::new(),
        }
    }

    /// Reads `stream` until a line contains `want` (at most a minute).
    fn until(&mut self, stream: Stream, want: &str) {
        let rx = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
            self.said.push(line.clone());
            if line.contains(want) {
                return;
            }
        }
        panic!("never said {want:?}; said:\n{}", self.said.join("\n"));
    }

    /// Waits for the end: a success that says all `n` devices converged.
    async fn converged(self, n: usize) {
        let Watched {
            child,
            stdout,
            stderr,
            mut said,
        } = self;
        let status = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("joins")
            .expect("command ends");
        // Both senders go at the end of their streams.
        said.extend(stdout.iter().chain(stderr.iter()));
        let said = said.join("\n");
        assert!(status.status.success(), "{}\n{said}", status.status);
        assert!(
            said.lines()
                .any(|l| l == format!("all {n} targeted devices converged")),
            "{said}"
        );
    }
}
