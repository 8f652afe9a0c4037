//! Device secrets through the binary, against simulated devices over real
//! mTLS: rotated per device as a rollout, rolled back, carried across a
//! SIGKILL of the server, and never shown anywhere but on the device's own
//! commands topic (the server's log, the audit log, describe, rollout
//! views, compliance, `secrets list` and the raw bytes of the data
//! directory are searched for every secret a device received).

use crate::common;
use crate::rollouts::{sim, Setup};

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{eventually, wait_up, Server};
use serde_json::{json, Value};

const KEY: &str = "admin_password";
const N: usize = 20;

/// Every device's (fingerprint it reports, fingerprint of what it holds,
/// the plaintext it holds).
fn held(fleet: &cityplane_agent_sim::Fleet) -> BTreeMap<String, (Value, String, String)> {
    fleet
        .ids()
        .into_iter()
        .map(|id| {
            let reported = fleet
                .value_of(&id, KEY)
                .flatten()
                .map(|v| v["secret"]["fingerprint"].clone())
                .unwrap_or(Value::Null);
            let plain = fleet.secrets_of(&id).remove(KEY).unwrap_or_default();
            let fp = cityplane_proto::secrets::fingerprint(&plain);
            (id, (reported, fp, plain))
        })
        .collect()
}

/// Every device holds a secret whose fingerprint it reports and the
/// server wants (`secrets list`); all of them different. Returns each
/// device's fingerprint and plaintext.
async fn converged(
    s: &Setup,
    fleet: &cityplane_agent_sim::Fleet,
) -> BTreeMap<String, (String, String)> {
    let mut last = BTreeMap::new();
    let mut listed = Value::Null;
    eventually("every device holds the secret the server wants", || {
        last = held(fleet);
        if !last
            .values()
            .all(|(reported, fp, plain)| !plain.is_empty() && reported == &json!(fp))
        {
            return false;
        }
        listed = s.json(&["secrets", "list"]);
        let rows = listed["secrets"].as_array().cloned().unwrap_or_default();
        rows.len() == N
            && rows.iter().all(|row| {
                let id = row["id"].as_str().unwrap_or_default();
                row["converged"] == true
                    && last
                        .get(id)
                        .is_some_and(|(_, fp, _)| row["desired"]["fingerprint"] == json!(fp))
            })
    })
    .await;
    for row in listed["secrets"].as_array().into_iter().flatten() {
        let at = row["desired"]["rotated_at"].as_str().unwrap_or_default();
        assert!(at.ends_with('Z'), "{row}");
    }
    let out: BTreeMap<String, (String, String)> = last
        .into_iter()
        .map(|(id, (_, fp, plain))| (id, (fp, plain)))
        .collect();
    let distinct: BTreeSet<&String> = out.values().map(|(fp, _)| fp).collect();
    assert_eq!(distinct.len(), N, "every device has a secret of its own");
    out
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_secrets_reach_only_their_devices_roll_back_survive_sigkill_and_appear_nowhere_else(
) {
    let s = Setup::new(N);
    // Debug: every line the server would log while tracking a problem.
    let start = || {
        let server = Server::start(&s.pki, &s.data, s.port, &s.log, "debug");
        wait_up(&s.pki, s.port);
        server
    };
    let server = start();
    s.zones(N);
    let fleet = s.online(sim(&s.pki, s.port, N)).await;
    let mut seen: BTreeSet<String> = BTreeSet::new();

    // A rotation for a selector, in two waves: every device converges on
    // a secret of its own.
    let created = s.json(&[
        "secrets",
        "rotate",
        "--name",
        KEY,
        "--selector",
        r#"{"class": "streetlight"}"#,
        "--waves",
        "5,100%",
        "--rollout",
        "rot-1",
    ]);
    assert_eq!(created["devices"], N, "{created}");
    s.until_phase("rot-1", "completed").await;
    let first = converged(&s, &fleet).await;
    seen.extend(first.values().map(|(_, p)| p.clone()));

    // A second rotation changes every fingerprint.
    let ids = fleet.ids();
    let mut args = vec![
        "secrets",
        "rotate",
        "--name",
        KEY,
        "--rollout",
        "rot-2",
        "--ids",
    ];
    args.extend(ids.iter().map(String::as_str));
    s.json(&args);
    s.until_phase("rot-2", "completed").await;
    let second = converged(&s, &fleet).await;
    for (id, (fp, _)) in &second {
        assert_ne!(&first[id].0, fp, "{id} kept its fingerprint");
    }
    seen.extend(second.values().map(|(_, p)| p.clone()));

    // A third one holds its first wave (a long soak) and is aborted: the
    // devices it reached get the second secret back, plaintext included
    // (they check it against the fingerprint), the others never moved.
    let spec = s.file(
        "rot-3.json",
        &json!({"name": "rot-3", "target": {"class": "streetlight"}, "secret": KEY,
                "waves": [{"count": 4}, {"percent": 100}], "rollback": true,
                "success_threshold": 100, "health": {"soak_s": 3600}}),
    );
    s.json(&["rollout", "create", "-f", &spec]);
    let mut reached: Vec<String> = Vec::new();
    eventually("the first wave takes its new secrets", || {
        reached = held(&fleet)
            .into_iter()
            .filter(|(id, (reported, _, _))| reported != &json!(second[id].0))
            .map(|(id, _)| id)
            .collect();
        reached.len() == 4
            && reached
                .iter()
                .all(|id| held(&fleet)[id].0 == json!(held(&fleet)[id].1))
    })
    .await;
    seen.extend(held(&fleet).into_values().map(|(_, _, p)| p));
    s.json(&["rollout", "abort", "rot-3", "--reason", "test rollback"]);
    let back = converged(&s, &fleet).await;
    assert_eq!(back, second, "the rollback restores every previous secret");
    assert_eq!(s.devices_of("rot-3", Some("rolled_back")).len(), 4);

    // SIGKILL mid-rotation: some devices reboot on their command (so it
    // stays in flight and is re-sent with its id), others are offline
    // until after the restart (their commands are first sent by the new
    // server): either way the secret comes from the store, and must be
    // the one the device's reference names.
    let ids = fleet.ids();
    for id in &ids[..5] {
        fleet.reboot_on_next_command(id);
    }
    for id in &ids[N - 5..] {
        fleet.take_offline(id, std::time::Duration::from_secs(4));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    s.json(&[
        "secrets",
        "rotate",
        "--name",
        KEY,
        "--selector",
        r#"{"all": true}"#,
        "--waves",
        "100%",
        "--rollout",
        "rot-4",
    ]);
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    server.kill();
    let server = start();
    s.until_phase("rot-4", "completed").await;
    let fourth = converged(&s, &fleet).await;
    for (id, (fp, _)) in &fourth {
        assert_ne!(&second[id].0, fp, "{id} was not rotated by rot-4");
    }
    for id in &ids[..5] {
        let d = fleet.device(id).expect("device");
        assert!(
            d.reboots_before_applying >= 1,
            "{id} never rebooted on a command"
        );
    }
    seen.extend(fourth.values().map(|(_, p)| p.clone()));
    assert!(seen.len() >= 3 * N + 4, "{} secrets seen", seen.len());

    // Nowhere but on the devices: what operators see, the audit log
    // (queried and exported), and the server's log.
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut show = |what: &str, args: &[&str]| {
        outputs.push((what.to_owned(), s.json(args).to_string()));
    };
    show("get devices", &["get", "devices"]);
    show("status", &["status"]);
    show("audit", &["audit", "--limit", "1000"]);
    show("compliance", &["compliance"]);
    show("secrets list", &["secrets", "list"]);
    show("rollouts", &["rollout", "list"]);
    for r in ["rot-1", "rot-2", "rot-3", "rot-4"] {
        show(r, &["rollout", "status", r]);
        show(r, &["rollout", "devices", r]);
    }
    for id in fleet.ids() {
        show(&id, &["describe", "device", &id]);
    }
    let export = s.dir.path().join("audit-export.json");
    show(
        "audit export",
        &["audit", "export", "--out", export.to_str().expect("utf-8")],
    );
    outputs.push((
        "audit export file".into(),
        std::fs::read_to_string(&export).expect("export"),
    ));
    // Fingerprints are there (so the search would find a secret in them).
    let described = outputs
        .iter()
        .find(|(w, _)| w == "secrets list")
        .map(|(_, o)| o.clone())
        .unwrap_or_default();
    assert!(described.contains(&fourth["dev0001"].0), "{described}");

    server.stop(std::time::Duration::from_secs(20));
    let sim_stats = fleet.shutdown().await;
    assert_eq!(sim_stats.commands_rejected, 0, "a device refused a secret");
    outputs.push((
        "server log".into(),
        std::fs::read_to_string(&s.log).expect("log"),
    ));
    let mut files = Vec::new();
    files_under(&s.data, &mut files);
    assert!(files.len() > 3, "{files:?}");
    for secret in &seen {
        for (what, text) in &outputs {
            assert!(
                !text.contains(secret.as_str()),
                "a device's secret is in {what}"
            );
        }
        for file in &files {
            let bytes = std::fs::read(file).expect("read");
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a device's secret is in {}",
                file.display()
            );
        }
    }

    // The key: 0600 from the start; loosened, the server refuses to start.
    use std::os::unix::fs::PermissionsExt;
    let key = s.data.join("secrets.key");
    let mode = std::fs::metadata(&key)
        .expect("secrets.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let serve = || {
        let mut cmd = std::process::Command::new(common::BIN);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", s.port)])
            .arg("--pki")
            .arg(&s.pki)
            .arg("--data")
            .arg(&s.data)
            .env("RUST_LOG", "error");
        cmd
    };
    let refused = serve().output().expect("serve runs");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("0600"), "{said}");

    // Another key (a standby or a restore given the wrong file): refused
    // before the server acts, saying so, rather than failing every secret
    // command later.
    let other = s.dir.path().join("other.key");
    cityplane_controller::secrets::Vault::open_or_create(&other).expect("another key");
    std::fs::copy(&other, &key).expect("replace the key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let err = s.dir.path().join("wrong-key.err");
    let mut serve = cityplane_testkit::process::ChildGuard::new(
        serve()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("serve runs"),
    );
    // Bounded: a server that accepted the key would serve for ever.
    let mut exited = None;
    for _ in 0..600 {
        exited = serve.try_wait().expect("try_wait");
        if exited.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let said = std::fs::read_to_string(&err).unwrap_or_default();
    assert!(
        exited.is_some_and(|s| !s.success()) && said.contains("sealed with another key"),
        "serve with another key: {exited:?}: {said}"
    );
}
