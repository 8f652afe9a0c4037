//! Signed releases: devices provisioned with a release key check the
//! command's `release`, download the image from the broker's edge
//! (`devices/D/fetch` → `devices/D/blob`), check its size and SHA-256, and
//! only then install (docs/PROTOCOL.md, "Firmware"). The test plays the
//! controller with a `controller` certificate and stores images where the
//! broker serves them, as the controller does.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use cityplane_agent_sim::{FirmwareSim, Fleet, SimConfig};
use cityplane_certs::firmware::{
    generate_release_key, read_public_key, read_release_key, sign_manifest, RELEASE_PUB_FILE,
};
use cityplane_proto::firmware::{ReleaseManifest, SignedRelease};
use cityplane_proto::messages::{Ack, AckStatus, Reported};
use cityplane_proto::{topics, Role};
use common::{Env, TestClient};
use ring::signature::Ed25519KeyPair;
use serde_json::{json, Value};

/// A release key made in `dir`: its pair and the public half devices get.
fn release_key(dir: &Path) -> (Ed25519KeyPair, [u8; 32]) {
    let key = generate_release_key(dir, false).expect("release key");
    let pair = read_release_key(&key).expect("read key");
    let public = read_public_key(&dir.join(RELEASE_PUB_FILE)).expect("public key");
    (pair, public)
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `len` bytes of an image, different for each `seed`.
fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn manifest(version: &str, model: &str, bytes: &[u8]) -> ReleaseManifest {
    ReleaseManifest {
        version: version.into(),
        models: vec![model.into()],
        size: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        floor: None,
        downgrade: false,
        fetch: "mqtt".into(),
    }
}

/// Stores `bytes` under `name` the way the controller does: a temporary
/// file renamed into place.
fn store(env: &Env, name: &str, bytes: &[u8]) {
    let dir = env.firmware_dir();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write image");
    std::fs::rename(&tmp, dir.join(name)).expect("rename image");
}

/// Stores an image under its own hash and signs its manifest.
fn publish(env: &Env, key: &Ed25519KeyPair, m: &ReleaseManifest, bytes: &[u8]) -> SignedRelease {
    store(env, &m.sha256, bytes);
    sign_manifest(key, m).expect("sign")
}

fn command(id: &str, generation: u64, version: &str, release: Option<&SignedRelease>) -> String {
    let mut cmd = json!({"id": id, "generation": generation, "state": {"firmware": version}});
    if let Some(release) = release {
        cmd["release"] = serde_json::to_value(release).expect("release json");
    }
    cmd.to_string()
}

fn config(env: &Env, prefix: &str, devices: usize, key: [u8; 32]) -> SimConfig {
    let mut c = env.sim(prefix, devices);
    c.mix = "camera=1".parse().expect("mix");
    c.firmware = FirmwareSim::fast();
    c.faults.reboot_time = (Duration::from_millis(50), Duration::from_millis(100));
    c.backoff.initial = Duration::from_millis(50);
    c.release_key = Some(key);
    c
}

/// What one device said, in order: its reports and its acks.
#[derive(Default)]
struct Heard {
    reports: Vec<Reported>,
    acks: Vec<Ack>,
}

/// Reads until every `(device, command id)` in `want` is acknowledged;
/// everything each device reported meanwhile comes too.
async fn until_acked(ctl: &mut TestClient, want: &[(&str, &str)]) -> HashMap<String, Heard> {
    let mut heard: HashMap<String, Heard> = HashMap::new();
    let acked = |heard: &HashMap<String, Heard>| {
        want.iter().all(|(dev, id)| {
            heard
                .get(*dev)
                .is_some_and(|h| h.acks.iter().any(|a| a.id == *id))
        })
    };
    while !acked(&heard) {
        let (dev, seen) = ctl
            .expect("reports and acks", |t, v| {
                let (dev, leaf) = topics::split_device_topic(t)?;
                Some((dev.to_owned(), (leaf.to_owned(), v.clone())))
            })
            .await;
        let h = heard.entry(dev).or_default();
        match seen.0.as_str() {
            "reported" => h
                .reports
                .push(serde_json::from_value(seen.1).expect("report")),
            "acks" => h.acks.push(serde_json::from_value(seen.1).expect("ack")),
            _ => {}
        }
    }
    heard
}

fn ack_of<'h>(heard: &'h HashMap<String, Heard>, dev: &str, id: &str) -> &'h Ack {
    heard[dev]
        .acks
        .iter()
        .find(|a| a.id == id)
        .expect("acknowledged")
}

/// The update states a device reported, without repeats.
fn update_states(h: &Heard) -> Vec<String> {
    let mut states: Vec<String> = Vec::new();
    for r in &h.reports {
        if let Some(s) = r.state.get("update").and_then(|u| u["state"].as_str()) {
            if states.last().map(String::as_str) != Some(s) {
                states.push(s.to_owned());
            }
        }
    }
    states
}

fn model_of(fleet: &Fleet, id: &str) -> String {
    fleet.device(id).expect("device").state["hardware_model"]
        .as_str()
        .expect("a model")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_release_is_downloaded_checked_installed_once_and_raises_the_floor() {
    let env = Env::start("rel", 1, &[(Role::Controller, "ctl")]).await;
    let (key, public) = release_key(&env.dir.path().join("release"));
    let mut ctl = env
        .client("ctl", &["devices/+/reported", "devices/+/acks"])
        .await;
    let fleet = Fleet::start(config(&env, "rel", 1, public))
        .await
        .expect("fleet");
    assert!(fleet.wait_online(1, common::WAIT).await);
    let id = "rel0001";
    let before = fleet.device(id).expect("device");
    assert_eq!(
        before.state["firmware_floor"], before.state["firmware"],
        "a device's first floor is the firmware it came with"
    );
    ctl.drain(Duration::from_millis(200)).await;

    // 200 KiB: four chunks.
    let bytes = image(200 * 1024, 1);
    let mut m = manifest("9.0.0", &model_of(&fleet, id), &bytes);
    m.floor = Some("8.0".into());
    let release = publish(&env, &key, &m, &bytes);
    let cmd = topics::commands(id);
    ctl.publish(&cmd, command("c1", 1, "9.0.0", Some(&release)));
    // A retry with a new id joins the update (or, if it comes after the
    // update, finds the version running): no second install either way.
    ctl.publish(&cmd, command("c2", 1, "9.0.0", Some(&release)));
    let heard = until_acked(&mut ctl, &[(id, "c1"), (id, "c2")]).await;
    for c in ["c1", "c2"] {
        assert_eq!(ack_of(&heard, id, c).status, AckStatus::Applied, "{c}");
    }
    let h = &heard[id];
    assert_eq!(update_states(h), common::UPDATE_STATES);
    let start = h
        .reports
        .iter()
        .find(|r| r.state["update"]["state"] == "downloading")
        .expect("a downloading report");
    assert_eq!(start.state["update"]["target"], "9.0.0");
    assert_eq!(start.state["update"]["received"], 0);
    assert_eq!(start.state["update"]["size"], bytes.len());
    let last = h.reports.last().expect("reports");
    assert_eq!(last.state["firmware"], "9.0.0");
    assert_eq!(
        last.state["firmware_floor"], "8.0",
        "the release's floor, above the device's old one"
    );

    // A new command id for the version it runs: applied, nothing installed.
    ctl.publish(&cmd, command("c3", 2, "9.0.0", Some(&release)));
    let heard = until_acked(&mut ctl, &[(id, "c3")]).await;
    assert_eq!(ack_of(&heard, id, "c3").status, AckStatus::Applied);
    // The same id again: ignored (a replay).
    ctl.publish(&cmd, command("c1", 3, "9.0.0", Some(&release)));
    ctl.drain(Duration::from_millis(200)).await;

    let after = fleet.device(id).expect("device");
    assert_eq!(after.firmware_installs, 1);
    assert_eq!(after.firmware_bytes, bytes.len() as u64, "downloaded once");
    let stats = fleet.stats();
    assert_eq!((stats.firmware.installs, stats.firmware.succeeded), (1, 1));
    assert!(
        stats.firmware.refused.is_empty(),
        "{:?}",
        stats.firmware.refused
    );
    fleet.shutdown().await;
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_release_is_refused_with_a_reason_that_names_the_check() {
    let env = Env::start("bad", 8, &[(Role::Controller, "ctl")]).await;
    let (key, public) = release_key(&env.dir.path().join("release"));
    let (other_key, _) = release_key(&env.dir.path().join("other"));
    let mut ctl = env
        .client("ctl", &["devices/+/reported", "devices/+/acks"])
        .await;
    let fleet = Fleet::start(config(&env, "bad", 8, public))
        .await
        .expect("fleet");
    assert!(fleet.wait_online(8, common::WAIT).await);
    ctl.drain(Duration::from_millis(200)).await;
    let bytes = image(100 * 1024, 2);

    // One device per check: (device, version asked, release, what the
    // reason starts with, the refusal kind counted).
    let mut cases: Vec<(&str, &str, Option<SignedRelease>, &str, &str)> = Vec::new();
    let m = manifest("9.0.0", &model_of(&fleet, "bad0001"), &bytes);
    cases.push((
        "bad0001",
        "9.0.0",
        Some(publish(&env, &other_key, &m, &bytes)),
        "bad signature: ",
        "signature",
    ));
    let m = manifest("9.0.0", "Nope X-1", &bytes);
    cases.push((
        "bad0002",
        "9.0.0",
        Some(publish(&env, &key, &m, &bytes)),
        "wrong model: ",
        "model",
    ));
    // The bytes on disk under the manifest's hash are not the image it
    // describes (same size).
    // (Its own image: a name always means the same bytes, as with the
    // controller, so the broker may keep the file it opened.)
    let m = manifest(
        "9.0.0",
        &model_of(&fleet, "bad0003"),
        &image(bytes.len(), 6),
    );
    store(&env, &m.sha256, &image(bytes.len(), 3));
    cases.push((
        "bad0003",
        "9.0.0",
        Some(sign_manifest(&key, &m).expect("sign")),
        "hash mismatch: ",
        "hash",
    ));
    // The image is larger than the manifest declares.
    let big = image(bytes.len() + 1, 4);
    let mut m = manifest("9.0.0", &model_of(&fleet, "bad0004"), &big);
    m.size = bytes.len() as u64;
    cases.push((
        "bad0004",
        "9.0.0",
        Some(publish(&env, &key, &m, &big)),
        "size: ",
        "size",
    ));
    // Below the floor (every camera starts at 5.x).
    let m = manifest("1.0.0", &model_of(&fleet, "bad0005"), &bytes);
    cases.push((
        "bad0005",
        "1.0.0",
        Some(publish(&env, &key, &m, &bytes)),
        "downgrade: ",
        "downgrade",
    ));
    cases.push((
        "bad0006",
        "9.0.0",
        None,
        "unsigned: the command carries no signed release",
        "unsigned",
    ));
    // A release for another version than the command asks for.
    let m = manifest("9.1.0", &model_of(&fleet, "bad0007"), &bytes);
    cases.push((
        "bad0007",
        "9.2.0",
        Some(publish(&env, &key, &m, &bytes)),
        "release is for 9.1.0, the command asks for 9.2.0",
        "version mismatch",
    ));

    let before: HashMap<String, Value> = cases
        .iter()
        .map(|(dev, ..)| {
            let s = fleet.device(dev).expect("device").state;
            (dev.to_string(), s["firmware"].clone())
        })
        .collect();
    for (dev, version, release, ..) in &cases {
        ctl.publish(
            &topics::commands(dev),
            command("c-bad", 1, version, release.as_ref()),
        );
    }
    let want: Vec<(&str, &str)> = cases.iter().map(|(dev, ..)| (*dev, "c-bad")).collect();
    let heard = until_acked(&mut ctl, &want).await;
    for (dev, _, _, reason, _) in &cases {
        let ack = ack_of(&heard, dev, "c-bad");
        assert_eq!(ack.status, AckStatus::Rejected, "{dev}");
        let why = ack.reason.as_deref().unwrap_or_default();
        assert!(why.starts_with(reason), "{dev}: {why:?}, wanted {reason:?}");
        let now = fleet.device(dev).expect("device");
        assert_eq!(now.state["firmware"], before[*dev], "{dev}: firmware kept");
        assert_eq!(now.firmware_installs, 0, "{dev}");
    }
    let refused = fleet.stats().firmware.refused;
    for (dev, _, _, _, kind) in &cases {
        assert_eq!(refused.get(*kind), Some(&1), "{dev}: {refused:?}");
    }

    // The operator's explicit rollback: signed with `downgrade`, it installs
    // below the floor, and the floor follows it down.
    let dev = "bad0005";
    let old = image(bytes.len(), 7);
    let mut m = manifest("1.0.0", &model_of(&fleet, dev), &old);
    m.downgrade = true;
    let release = publish(&env, &key, &m, &old);
    ctl.publish(
        &topics::commands(dev),
        command("c-rollback", 2, "1.0.0", Some(&release)),
    );
    let heard = until_acked(&mut ctl, &[(dev, "c-rollback")]).await;
    assert_eq!(ack_of(&heard, dev, "c-rollback").status, AckStatus::Applied);
    let now = fleet.device(dev).expect("device");
    assert_eq!(
        (&now.state["firmware"], &now.state["firmware_floor"]),
        (&json!("1.0.0"), &json!("1.0.0"))
    );
    assert_eq!(now.firmware_installs, 1);
    fleet.shutdown().await;
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_resumes_from_the_bytes_it_has_after_the_link_drops() {
    let env = Env::start("res", 1, &[(Role::Controller, "ctl")]).await;
    let (key, public) = release_key(&env.dir.path().join("release"));
    let mut ctl = env
        .client("ctl", &["devices/+/reported", "devices/+/acks"])
        .await;
    let mut config = config(&env, "res", 1, public);
    // 1 MiB at 512 KiB/s: two seconds of download to cut into.
    config.firmware.download_kib_per_s = 512.0;
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(1, common::WAIT).await);
    let id = "res0001";
    ctl.drain(Duration::from_millis(200)).await;
    let bytes = image(1024 * 1024, 5);
    let m = manifest("9.0.0", &model_of(&fleet, id), &bytes);
    let release = publish(&env, &key, &m, &bytes);
    ctl.publish(
        &topics::commands(id),
        command("c1", 1, "9.0.0", Some(&release)),
    );

    // Cut the link once some bytes are in.
    let received = |fleet: &Fleet| {
        fleet.device(id).expect("device").state["update"]["received"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while received(&fleet) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no bytes came");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let connects = fleet.device(id).expect("device").connects;
    assert!(fleet.drop_link(id));

    let heard = until_acked(&mut ctl, &[(id, "c1")]).await;
    assert_eq!(ack_of(&heard, id, "c1").status, AckStatus::Applied);
    // The first report after reconnecting says how much it already had.
    let resumed = heard[id]
        .reports
        .iter()
        .map(|r| &r.state["update"])
        .find(|u| u["state"] == "downloading" && u["received"].as_u64().is_some_and(|n| n > 0))
        .expect("a report of the download resumed");
    assert!(resumed["received"].as_u64() < Some(bytes.len() as u64));
    let after = fleet.device(id).expect("device");
    assert!(after.connects >= connects + 2, "dropped, then the reboot");
    assert_eq!(after.state["firmware"], "9.0.0");
    assert_eq!(after.firmware_installs, 1);
    assert_eq!(
        after.firmware_bytes,
        bytes.len() as u64,
        "no byte downloaded twice"
    );
    fleet.shutdown().await;
    env.broker.shutdown().await;
}
