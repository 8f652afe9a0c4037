//! The controller end to end over real mTLS: operators declare, devices
//! converge, and the controller proves it.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn lamp(zone: &str) -> Value {
    json!({"class": "streetlight", "labels": {"zone": zone}, "firmware": "1.0.0", "dimming": 100})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_converges_and_describe_proves_it() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut d = Device::new(&s, "lamp0001", lamp("north"));
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "known", |v| v["online"] == true)
        .await;

    let answer = op
        .apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    assert_eq!(answer["generation"], 1);
    let described = op
        .eventually_device("lamp0001", "converged", |v| v["converged"] == true)
        .await;
    assert_eq!(described["desired"]["dimming"], 40);
    assert_eq!(described["reported"]["dimming"], 40);
    assert_eq!(d.get("dimming"), Some(json!(40)));
    assert_eq!(described["delta"], json!({}));
    let converged = described["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Converged")
        .expect("Converged condition");
    assert_eq!(converged["status"], "True");
    let audit = op.query("audit", json!({})).await;
    let entry = &audit["entries"][0];
    assert_eq!(
        (entry["who"].as_str(), entry["name"].as_str()),
        (Some("op"), Some("dim"))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selector_reaches_exactly_the_matching_devices_of_100() {
    let mut s = Server::start().await;
    let ids = s.devices("dev", 100);
    let mut devices = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        // 60 streetlights (30 north, 30 south) and 40 cameras.
        let state = if i < 60 {
            lamp(if i % 2 == 0 { "north" } else { "south" })
        } else {
            json!({"class": "camera", "labels": {"zone": "north"}, "retention_days": 7})
        };
        let mut d = Device::new(&s, id, state);
        d.connect(s.addr).await;
        devices.push(d);
    }
    let mut op = s.operator().await;
    op.register(&devices.iter().collect::<Vec<_>>()).await;
    op.eventually_status(json!({}), "100 devices known", |v| v["total"] == 100)
        .await;
    let answer = op
        .apply(json!({"name": "north-dim", "target": {"class": "streetlight", "labels": {"zone": "north"}}, "state": {"dimming": 30}}))
        .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    assert_eq!(answer["devices"], 30);
    op.eventually_status(json!({"name": "north-dim"}), "30 converged", |v| {
        v["converged"] == 30 && v["total"] == 30
    })
    .await;
    for (i, d) in devices.iter().enumerate() {
        let want = if i < 60 && i % 2 == 0 {
            json!(30)
        } else if i < 60 {
            json!(100)
        } else {
            Value::Null
        };
        assert_eq!(d.get("dimming").unwrap_or(Value::Null), want, "{}", d.id);
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_documents_merge_by_priority_then_recency() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut d = Device::new(&s, "lamp0001", lamp("north"));
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.register(&[&d]).await;
    op.eventually_device("lamp0001", "known", |v| v["online"] == true)
        .await;
    let all = json!({"class": "streetlight"});
    for doc in [
        json!({"name": "base", "target": all, "priority": 1, "state": {"dimming": 10, "schedule": "dusk-dawn"}}),
        json!({"name": "urgent", "target": {"ids": ["lamp0001"]}, "priority": 9, "state": {"dimming": 90}}),
        json!({"name": "late", "target": all, "priority": 1, "state": {"schedule": "always"}}),
    ] {
        assert_eq!(op.apply(doc).await["status"], "accepted");
    }
    let v = op
        .eventually_device("lamp0001", "converged", |v| {
            v["converged"] == true && v["desired"]["schedule"] == "always"
        })
        .await;
    assert_eq!(v["reported"]["dimming"], 90, "priority 9 beats priority 1");
    assert_eq!(
        v["reported"]["schedule"], "always",
        "newest wins a priority tie"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_converges_when_it_returns() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut d = Device::new(&s, "lamp0001", lamp("north"));
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "known", |v| v["online"] == true)
        .await;
    d.disconnect_abruptly();
    op.eventually_device("lamp0001", "offline (will)", |v| v["online"] == false)
        .await;

    op.apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 5}}))
        .await;
    let v = op
        .eventually_device("lamp0001", "pending while offline", |v| {
            v["desired"]["dimming"] == 5
        })
        .await;
    assert_eq!(v["converged"], false);
    assert_eq!(
        d.get("dimming"),
        Some(json!(100)),
        "nothing reaches an offline device"
    );

    d.connect(s.addr).await;
    op.eventually_device("lamp0001", "converged after reconnect", |v| {
        v["converged"] == true
    })
    .await;
    assert_eq!(d.get("dimming"), Some(json!(5)));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_corrected_and_counted() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut d = Device::new(&s, "lamp0001", lamp("north"));
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "known", |v| v["online"] == true)
        .await;
    op.apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    op.eventually_device("lamp0001", "converged", |v| v["converged"] == true)
        .await;

    // Someone changes the lamp by hand.
    d.tamper("dimming", json!(77)).await;
    let v = op
        .eventually_device("lamp0001", "corrected", |v| {
            v["drift_count"] == 1 && v["converged"] == true
        })
        .await;
    assert_eq!(v["reported"]["dimming"], 40);
    let status = op.query("status", json!({})).await;
    assert_eq!(status["drifted"], 1);
    assert!(status["counters"]["drift_corrected"].as_u64() >= Some(1));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_fail_and_a_reconnect_re_drives() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut d = Device::new(&s, "lamp0001", lamp("north"));
    d.set_mode(Mode::Ignore);
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "known", |v| v["online"] == true)
        .await;
    op.apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 1}}))
        .await;
    let v = op
        .eventually_device("lamp0001", "failed", |v| v["failed"].is_string())
        .await;
    let sent = d.commands.lock().expect("lock").clone();
    assert_eq!(
        sent.len(),
        fast_retry().max_attempts as usize,
        "one send plus retries, then stop: {v:#}"
    );
    assert!(
        sent.iter().all(|c| c.id == sent[0].id),
        "a retry re-sends the same command id"
    );

    // The device comes back (reboot) and now applies: re-driven without the operator.
    d.disconnect_abruptly();
    op.eventually_device("lamp0001", "offline", |v| v["online"] == false)
        .await;
    d.set_mode(Mode::Apply);
    d.connect(s.addr).await;
    op.eventually_device("lamp0001", "converged after re-drive", |v| {
        v["converged"] == true && v["failed"].is_null()
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejecting_device_is_marked_failed_with_its_reason() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut d = Device::new(&s, "lamp0001", lamp("north"));
    d.set_mode(Mode::Reject);
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "known", |v| v["online"] == true)
        .await;
    op.apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 1}}))
        .await;
    let v = op
        .eventually_device("lamp0001", "failed", |v| v["failed"].is_string())
        .await;
    assert!(
        v["failed"].as_str().expect("reason").contains("not today"),
        "{v:#}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_survives_a_restart_and_still_converges() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut op = s.operator().await;
    // Registered, never connected: targeted all the same.
    op.query(
        "register",
        json!({"devices": [{"id": "lamp0001", "class": "streetlight"}]}),
    )
    .await;
    let answer = op
        .apply(json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 33}}))
        .await;
    assert_eq!(answer["status"], "accepted");
    assert_eq!(answer["devices"], 1, "{answer}");
    op.close().await;
    s.stop().await;
    s.boot().await;

    let mut d = Device::new(&s, "lamp0001", lamp("north"));
    d.connect(s.addr).await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "converged after restart", |v| {
        v["converged"] == true
    })
    .await;
    assert_eq!(d.get("dimming"), Some(json!(33)));
    // The stored generation continues.
    let again = op
        .apply(json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 34}, "if_generation": 1}))
        .await;
    assert_eq!(again["generation"], 2, "{again}");
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.stop().await;
}
