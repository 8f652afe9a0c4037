//! Guards in the controller that no other test held (issue 14): each test
//! here fails when its guard is removed.

mod common;

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
