//! Guards in the controller that no other test held (issue 14): each test
//! here fails when its guard is removed.

use crate::common;

use common::*;
use serde_json::{json, Value};

/// Waits until the controller has read `n` reports (stale ones included),
/// so what follows sees the effect of each of them.
async fn reports_read(op: &mut Client, n: u64) -> Value {
    op.eventually_status(json!({}), "reports read", |v| {
        v["counters"]["reports"].as_u64() >= Some(n)
    })
    .await
}

/// A report is accepted only with a version above the last one: a second,
/// different report under the same version (a replay, or a device that
/// reset its counter) must not overwrite what the first said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_repeating_the_last_version_is_ignored() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let lamp = Client::connect(s.addr, s.pki_path(), "lamp0001", &[], None).await;
    let mut op = s.operator().await;
    let report = |version: u64, dimming: u64| {
        json!({"version": version, "state": {"dimming": dimming}}).to_string()
    };
    lamp.publish("devices/lamp0001/reported", report(5, 10))
        .await;
    reports_read(&mut op, 1).await;
    lamp.publish("devices/lamp0001/reported", report(5, 99))
        .await;
    let status = reports_read(&mut op, 2).await;
    let v = op.query("describe", json!({"id": "lamp0001"})).await;
    assert_eq!(
        (&v["reported"]["dimming"], &v["reported_version"]),
        (&json!(10), &json!(5)),
        "the second report under version 5 was taken: {v:#}"
    );
    assert_eq!(status["counters"]["stale_reports"], 1, "{status:#}");

    // The next version is taken.
    lamp.publish("devices/lamp0001/reported", report(6, 99))
        .await;
    op.eventually_device("lamp0001", "at version 6", |v| {
        v["reported_version"] == 6 && v["reported"]["dimming"] == 99
    })
    .await;
    s.stop().await;
}

/// `if_generation` must equal the stored generation: a write based on an
/// older read (a stale generation) is a conflict, not a silent overwrite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_naming_a_stale_generation_is_a_conflict() {
    let mut s = Server::start().await;
    let mut op = s.operator().await;
    let doc = |dimming: u64, if_generation: Option<u64>| {
        let mut d = json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": dimming}});
        if let Some(g) = if_generation {
            d["if_generation"] = json!(g);
        }
        d
    };
    for (want, if_generation) in [(1, None), (2, Some(1))] {
        let answer = op.apply(doc(want * 10, if_generation)).await;
        assert_eq!(answer["generation"], want, "{answer}");
    }
    let stale = op.apply(doc(99, Some(1))).await;
    assert_eq!(
        (&stale["status"], &stale["code"]),
        (&json!("rejected"), &json!("conflict")),
        "a write based on generation 1 overwrote generation 2: {stale}"
    );
    // Nothing was stored: the current generation is still 2.
    let next = op.apply(doc(30, Some(2))).await;
    assert_eq!(next["generation"], 3, "{next}");
    s.stop().await;
}

/// An ack changes only the command it names: a late or replayed ack for
/// another command (here a rejection) must not fail the command in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_for_another_command_changes_nothing() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let commands = "devices/lamp0001/commands";
    let mut lamp = Client::connect(s.addr, s.pki_path(), "lamp0001", &[commands], None).await;
    lamp.publish(
        "devices/lamp0001/reported",
        json!({"version": 1, "state": {"dimming": 100}}).to_string(),
    )
    .await;
    let mut op = s.operator().await;
    op.eventually_device("lamp0001", "known", |v| v["reported_version"] == 1)
        .await;
    op.apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    let cmd: cityplane_proto::messages::Command =
        serde_json::from_slice(&lamp.next_on(commands).await).expect("command");
    // Same topic, so the controller reads them in this order.
    for (id, reason) in [("c-old-1", "stale"), (cmd.id.as_str(), "current")] {
        let ack = json!({"id": id, "status": "rejected", "reason": reason});
        lamp.publish("devices/lamp0001/acks", ack.to_string()).await;
    }
    let v = op
        .eventually_device("lamp0001", "failed", |v| v["failed"].is_string())
        .await;
    let failed = v["failed"].as_str().unwrap_or_default();
    assert!(
        failed.contains(&cmd.id) && failed.contains("current"),
        "failed by the ack of another command: {v:#}"
    );
    s.stop().await;
}

/// A write taken up after its `expires_at` (plus the clock skew allowed)
/// is refused and audited, not carried out: one that waited in a broker's
/// queue while no controller read it must not change the fleet long after
/// its sender stopped waiting. In time it is done; a query is answered
/// either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_taken_up_after_it_expired_is_refused_not_done() {
    use cityplane_controller::model::{now_ms, rfc3339};
    const PAST: &str = "2020-01-01T00:00:00Z";
    let mut s = Server::start().await;
    let mut op = s.operator().await;
    let doc = |name: &str, expires_at: &str| {
        json!({"name": name, "target": {"class": "streetlight"},
               "state": {"dimming": 10}, "expires_at": expires_at})
    };
    let late = op.apply(doc("late", PAST)).await;
    assert_eq!(
        (&late["status"], &late["code"]),
        (&json!("rejected"), &json!("expired")),
        "{late}"
    );
    let register =
        json!({"devices": [{"id": "lamp9", "class": "streetlight"}], "expires_at": PAST});
    let late = op.request("fleet/ops/register", register).await;
    assert_eq!(late["code"], "expired", "{late}");

    let in_time = rfc3339(now_ms() + 60_000);
    let done = op.apply(doc("fresh", &in_time)).await;
    assert_eq!(done["status"], "accepted", "{done}");
    let docs = op.query("get-documents", json!({"expires_at": PAST})).await;
    let names: Vec<&str> = docs["documents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(names, ["fresh"], "{docs}");
    let lamp9 = op
        .request("fleet/ops/describe", json!({"id": "lamp9"}))
        .await;
    assert_eq!(lamp9["status"], "rejected", "registered late: {lamp9}");
    let audit = op.query("audit", json!({})).await.to_string();
    assert_eq!(audit.matches("rejected (expired)").count(), 2, "{audit}");
    s.stop().await;
}
