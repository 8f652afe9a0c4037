//! Certificate rotation end to end against the real broker (mTLS), with
//! the test playing the controller's part: it reads CSRs on
//! `devices/+/csr` with a controller certificate, signs them with
//! `Pki::sign_device_csr` and delivers the certificates as commands.

use crate::common;

use std::time::Duration;

use cityplane_agent_sim::Fleet;
use cityplane_certs::rotation::device_csr;
use cityplane_certs::{Pki, RevocationList};
use cityplane_proto::messages::CsrRequest;
use cityplane_proto::{topics, Role};
use common::{Env, TestClient, WAIT};
use serde_json::{json, Value};

const FILTERS: [&str; 4] = [
    "devices/+/csr",
    "devices/+/acks",
    "devices/+/presence",
    "devices/+/reported",
];

/// Longer than a few revocation polls of the broker (200 ms by default).
const REVOCATION_SETTLES: Duration = Duration::from_millis(1500);

fn ask_rotation(ctl: &TestClient, id: &str, cmd: &str, generation: u64, rotation: &str) {
    let body = json!({"id": cmd, "generation": generation, "state": {"certificate": {"rotation": rotation}}});
    ctl.publish(&topics::commands(id), body.to_string());
}

fn deliver(ctl: &TestClient, id: &str, cmd: &str, generation: u64, rotation: &str, pem: &str) {
    let body = json!({"id": cmd, "generation": generation, "state": {},
        "certificate": {"rotation": rotation, "pem": pem}});
    ctl.publish(&topics::commands(id), body.to_string());
}

/// The CSR `id` sends.
async fn csr_of(ctl: &mut TestClient, id: &str) -> CsrRequest {
    let want = topics::csr(id);
    ctl.expect(&format!("{id}'s CSR"), |t, v| {
        (t == want).then(|| serde_json::from_value::<CsrRequest>(v.clone()).expect("a CSR body"))
    })
    .await
}

/// `(status, reason)` of the ack of command `cmd` from `id`.
async fn ack_of(ctl: &mut TestClient, id: &str, cmd: &str) -> (String, String) {
    let want = topics::acks(id);
    ctl.expect(&format!("{id}'s ack of {cmd}"), |t, v| {
        (t == want && v["id"] == json!(cmd)).then(|| {
            (
                v["status"].as_str().unwrap_or_default().to_owned(),
                v["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
    })
    .await
}

/// The next presence of `id`: `Some(serial)` online, `None` offline.
async fn presence_of(ctl: &mut TestClient, id: &str) -> Option<String> {
    let want = topics::presence(id);
    ctl.expect(&format!("{id}'s presence"), |t, v| {
        (t == want).then(|| {
            (v["online"] == json!(true))
                .then(|| v["serial"].as_str().unwrap_or_default().to_owned())
        })
    })
    .await
}

/// The serial of `id`'s next online presence, after a reconnect. The old
/// session's offline presence may come first, or not at all: when the new
/// connection claims the id before the broker has seen the old socket close,
/// the old session is taken over, and a taken-over session says nothing
/// (`broker/src/registry.rs`), so that the retained presence ends online.
async fn online_again(ctl: &mut TestClient, id: &str) -> String {
    loop {
        if let Some(serial) = presence_of(ctl, id).await {
            return serial;
        }
    }
}

/// The `certificate` of `id`'s next report.
async fn reported_certificate(ctl: &mut TestClient, id: &str) -> Value {
    let want = topics::reported(id);
    ctl.expect(&format!("{id}'s report"), |t, v| {
        (t == want).then(|| v["state"]["certificate"].clone())
    })
    .await
}

fn serial_on_file(pki: &Pki, id: &str) -> String {
    pki.current_cert(id).expect("read").expect("issued").serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_rotates_to_a_key_of_its_own_and_one_that_loses_it_keeps_the_old() {
    let env = Env::start("rot", 2, &[(Role::Controller, "ctl")]).await;
    let (good, lossy) = ("rot0001", "rot0002");
    let mut ctl = env.client("ctl", &FILTERS).await;
    let mut config = env.sim("rot", 2);
    config.faults.rotation_lost_key.insert(lossy.to_owned());
    let fleet = Fleet::start(config).await.expect("fleet");
    assert!(fleet.wait_online(2, WAIT).await);

    // Both report their certificate from the first report on.
    let issued = json!({"rotation": "issued"});
    let mut first = std::collections::BTreeMap::new();
    while first.len() < 2 {
        let (id, certificate) = ctl
            .expect("first reports", |t, v| {
                let (id, leaf) = topics::split_device_topic(t)?;
                (leaf == "reported").then(|| (id.to_owned(), v["state"]["certificate"].clone()))
            })
            .await;
        first.entry(id).or_insert(certificate);
    }
    let mut old = Vec::new();
    for id in [good, lossy] {
        assert_eq!(first[id], issued, "{id}");
        let serial = serial_on_file(&env.pki, id);
        assert_eq!(fleet.cert_serial(id), Some(serial.clone()));
        old.push(serial);
    }

    // The rotation's desired state: each device sends a CSR, then the ack.
    let mut signed = Vec::new();
    for id in [good, lossy] {
        ask_rotation(&ctl, id, "c1", 1, "r1");
        let csr = csr_of(&mut ctl, id).await;
        assert_eq!(csr.rotation, "r1");
        // Refused unless its subject is the device's own (CN = id, OU = device).
        let cert = env.pki.sign_device_csr(id, &csr.csr).expect("sign");
        assert_eq!(
            ack_of(&mut ctl, id, "c1").await,
            ("applied".into(), String::new())
        );
        signed.push(cert);
    }
    // Still on the old certificate until it has connected with the new one.
    assert_eq!(
        fleet.value_of(good, "certificate"),
        Some(Some(issued.clone()))
    );

    // (One device at a time: `expect` skips what it is not waiting for.)
    deliver(&ctl, good, "c2", 2, "r1", &signed[0].pem);
    assert_eq!(
        ack_of(&mut ctl, good, "c2").await,
        ("applied".into(), String::new())
    );
    // The good device is back with the new certificate, and says so.
    assert_eq!(
        online_again(&mut ctl, good).await,
        signed[0].cert.serial,
        "online again with the new serial"
    );
    assert_eq!(
        reported_certificate(&mut ctl, good).await,
        json!({"rotation": "r1"})
    );
    assert_eq!(fleet.cert_serial(good), Some(signed[0].cert.serial.clone()));
    assert_eq!(fleet.rotations(good), Some(1));

    // The old serial revoked: the broker cuts sessions using it; none is.
    let connects = fleet.device(good).expect("good").connects;
    env.pki
        .revoke_serials(std::slice::from_ref(&old[0]))
        .expect("revoke");
    assert!(RevocationList::load(&env.pki.revocation_path())
        .expect("list")
        .is_revoked(&old[0]));
    tokio::time::sleep(REVOCATION_SETTLES).await;
    let after = fleet.device(good).expect("good");
    assert!(after.online, "still connected");
    assert_eq!(after.connects, connects, "never cut");

    // The device that lost its key: acknowledged, but nothing changed.
    deliver(&ctl, lossy, "c2", 2, "r1", &signed[1].pem);
    assert_eq!(
        ack_of(&mut ctl, lossy, "c2").await,
        ("applied".into(), String::new())
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fleet.cert_serial(lossy), Some(old[1].clone()));
    assert_eq!(fleet.rotations(lossy), Some(0));
    assert_eq!(fleet.value_of(lossy, "certificate"), Some(Some(issued)));
    assert_eq!(fleet.device(lossy).expect("lossy").connects, 1);

    let stats = fleet.shutdown().await;
    assert_eq!(stats.rotations.completed, 1);
    assert_eq!(stats.rotations.keys_lost, 1);
    assert_eq!(stats.rotations.csrs_offered, 2);
    env.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_key_is_rejected_and_a_refused_one_falls_back() {
    let env = Env::start("neg", 1, &[(Role::Controller, "ctl")]).await;
    let id = "neg0001";
    let mut ctl = env.client("ctl", &FILTERS).await;
    let fleet = Fleet::start(env.sim("neg", 1)).await.expect("fleet");
    assert!(fleet.wait_online(1, WAIT).await);
    let old = serial_on_file(&env.pki, id);
    assert_eq!(presence_of(&mut ctl, id).await, Some(old.clone()));

    ask_rotation(&ctl, id, "c1", 1, "r1");
    let csr = csr_of(&mut ctl, id).await;
    assert_eq!(ack_of(&mut ctl, id, "c1").await.0, "applied");
    // Asked again (a retry of the desired state): the same key's CSR.
    ask_rotation(&ctl, id, "c1b", 1, "r1");
    assert_eq!(csr_of(&mut ctl, id).await, csr, "one key per rotation");

    // A valid certificate of the CA for this device, but not for its key.
    let stranger = device_csr(id).expect("another key");
    let wrong = env
        .pki
        .sign_device_csr(id, &stranger.csr_pem)
        .expect("sign");
    deliver(&ctl, id, "c2", 2, "r1", &wrong.pem);
    let (status, reason) = ack_of(&mut ctl, id, "c2").await;
    assert_eq!(status, "rejected");
    assert!(reason.contains("public key"), "{reason}");
    // And junk is rejected, with a reason, without harm.
    deliver(
        &ctl,
        id,
        "c3",
        3,
        "r1",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let (status, reason) = ack_of(&mut ctl, id, "c3").await;
    assert_eq!(status, "rejected");
    assert!(!reason.is_empty());
    assert_eq!(fleet.cert_serial(id), Some(old.clone()));
    assert_eq!(fleet.device(id).expect("dev").connects, 1);

    // The right key, but the broker will not take the certificate (revoked
    // before it arrives): the device tries it, then goes back to the old.
    let right = env.pki.sign_device_csr(id, &csr.csr).expect("sign");
    env.pki
        .revoke_serials(std::slice::from_ref(&right.cert.serial))
        .expect("revoke");
    tokio::time::sleep(REVOCATION_SETTLES).await;
    deliver(&ctl, id, "c4", 4, "r1", &right.pem);
    assert_eq!(ack_of(&mut ctl, id, "c4").await.0, "applied");
    assert_eq!(
        online_again(&mut ctl, id).await,
        old,
        "back online with the old certificate"
    );
    assert_eq!(
        reported_certificate(&mut ctl, id).await,
        json!({"rotation": "issued"})
    );
    assert_eq!(fleet.cert_serial(id), Some(old));
    assert_eq!(fleet.rotations(id), Some(0));
    let stats = fleet.shutdown().await;
    assert_eq!(stats.rotations.fallbacks, 1);
    assert_eq!(stats.rotations.rejected, 2);
    assert_eq!(stats.rotations.completed, 0);
    env.broker.shutdown().await;
}
