//! Certificate rotation as a rollout, through the binary against simulated
//! devices over real mTLS: every device makes a key of its own, the server
//! signs its CSR and delivers the certificate on the device's own topic,
//! the device comes back with it and its old serial is refused from then
//! on; a device that cannot come back is rolled back, on its old
//! certificate.

use crate::common;
use crate::incidents::publishes;
use crate::rollouts::{sim, Setup};

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use common::eventually;
use serde_json::Value;

/// The serials `certs list` shows revoked.
pub(crate) fn revoked_serials(s: &Setup) -> BTreeSet<String> {
    let out = common::ok(Command::new(common::BIN).args([
        "certs",
        "list",
        "--pki",
        s.pki.to_str().expect("utf-8"),
        "--output",
        "json",
    ]));
    let v: Value = serde_json::from_str(&out).expect("json");
    v.as_array()
        .expect("certificates")
        .iter()
        .filter(|c| c["revoked"] == true)
        .filter_map(|c| c["serial"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_moves_every_device_to_a_key_of_its_own_and_rolls_back_one_that_cannot_come_back(
) {
    const N: usize = 500;
    let s = Setup::new(N);
    let _server = s.serve();
    let lost = "dev0321";
    let mut config = sim(&s.pki, s.port, N);
    config.faults.rotation_lost_key.insert(lost.to_owned());
    let fleet = s.online(config).await;
    let ids: Vec<String> = (1..=N).map(|i| format!("dev{i:04}")).collect();
    let before: HashMap<String, String> = ids
        .iter()
        .map(|id| (id.clone(), fleet.cert_serial(id).expect("serial")))
        .collect();
    let old_of_lost = before[lost].clone();

    // Refusals: an empty selector, and a window that matches nobody.
    let err = s.fails(&[
        "certs",
        "rotate",
        "--before",
        "1d",
        "--selector",
        "class=streetlight",
    ]);
    assert!(err.contains("nothing to rotate"), "{err}");

    let r = s.json(&[
        "certs",
        "rotate",
        "--selector",
        "class=streetlight",
        "--name",
        "rot-1",
        "--waves",
        "10,90",
    ]);
    assert_eq!(r["devices"], N, "{r}");
    let status = s.until_phase("rot-1", "completed").await;
    // The device that lost its key is rolled back on its own; everyone else
    // is on a certificate made for its own new key.
    eventually("the lost-key device rolled back", || {
        s.devices_of("rot-1", Some("rolled_back"))
            .iter()
            .any(|d| d["id"] == lost)
    })
    .await;
    let succeeded: BTreeSet<String> = s
        .devices_of("rot-1", Some("succeeded"))
        .iter()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(succeeded.len(), N - 1, "{status}");
    assert!(!succeeded.contains(lost));
    for id in &succeeded {
        assert_eq!(fleet.rotations(id), Some(1), "{id}");
        let now = fleet.cert_serial(id).expect("serial");
        assert_ne!(now, before[id], "{id} still on its old certificate");
    }
    assert_eq!(fleet.rotations(lost), Some(0));
    assert_eq!(
        fleet.cert_serial(lost).as_deref(),
        Some(old_of_lost.as_str())
    );

    // Every replaced serial is in the CA's revocation list, the lost-key
    // device's old one is not (it still uses it) and its unused new one is.
    // (The CA's list is written by the server's CA worker, after the fact.)
    let mut revoked = BTreeSet::new();
    eventually("every replaced serial revoked in the CA's list", || {
        revoked = revoked_serials(&s);
        succeeded.iter().all(|id| revoked.contains(&before[id]))
    })
    .await;
    assert!(!revoked.contains(&old_of_lost));
    let described = s.json(&["describe", "device", lost]);
    assert!(described["certificate_pin"]
        .as_array()
        .is_some_and(|p| p.iter().all(|s| s == old_of_lost.as_str())));

    // The old certificates are refused at the broker (a sample: each is a
    // mosquitto_pub), the lost-key device's is not.
    for id in succeeded.iter().step_by(50) {
        let cert = s.pki.join(format!("{id}.crt"));
        let key = s.pki.join(format!("{id}.key"));
        assert!(
            !publishes(&s, id, &cert, &key),
            "{id}'s old certificate got in"
        );
    }
    assert!(publishes(
        &s,
        lost,
        &s.pki.join(format!("{lost}.crt")),
        &s.pki.join(format!("{lost}.key"))
    ));
    // Everyone is connected, on the certificate the controller expects.
    eventually("all connected again", || {
        fleet.device_states().iter().all(|d| d.connected)
    })
    .await;
    fleet.shutdown().await;
}
