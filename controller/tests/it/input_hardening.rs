//! Findings of the outside security review (issue 8), end to end: operator
//! and device messages through the broker over mTLS to the controller.

use crate::common;

use common::*;
use serde_json::{json, Value};

/// An operator request with a hand-written body, answered under `rid`.
async fn raw(op: &mut Client, topic: &str, body: &str, rid: &str) -> Value {
    op.raw_request(topic, body.as_bytes(), rid).await
}

fn assert_rejected(answer: &Value, code: &str, what: &str) {
    assert_eq!(answer["status"], "rejected", "{what}: {answer}");
    assert_eq!(answer["code"], code, "{what}: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arrays_where_objects_are_required_are_bad_schema() {
    let mut s = Server::start().await;
    s.devices("fz", 50);
    let mut op = s.operator().await;
    let fz0002 = Client::connect(s.addr, s.pki_path(), "fz0002", &[], None).await;
    fz0002
        .publish(
            "devices/fz0002/reported",
            r#"{"version": 1, "state": {"class": "streetlight"}}"#,
        )
        .await;
    op.eventually_device("fz0002", "known", |v| v["reported_version"] == 1)
        .await;

    // A whole document as an array of its fields in order. Its request id
    // cannot be read from an array, so the answer comes under the topic's name.
    let answer = raw(
        &mut op,
        "fleet/desired/fzarr",
        r#"["fzarr", {"ids": ["fz0050"]}, 3, {"arr": 1}, null, "arr-1"]"#,
        "fzarr",
    )
    .await;
    assert_rejected(&answer, "bad_schema", "document as an array");
    let answer = raw(
        &mut op,
        "fleet/desired/fzarr",
        r#"{"name": "fzarr", "target": [["fz0050"]], "state": {"arr": 2}, "request_id": "arr-2"}"#,
        "arr-2",
    )
    .await;
    assert_rejected(&answer, "bad_schema", "target as an array");
    let answer = raw(
        &mut op,
        "fleet/ops/get-devices",
        r#"{"selector": [], "request_id": "arr-3"}"#,
        "arr-3",
    )
    .await;
    assert_rejected(&answer, "bad_schema", "selector as an array");
    let answer = raw(
        &mut op,
        "fleet/ops/describe",
        r#"["arr-4", "fz0002"]"#,
        "describe",
    )
    .await;
    assert_rejected(&answer, "bad_schema", "query as an array");

    // A report as an array, from the device itself: refused and counted
    // like any malformed report; the device is known (online, from its
    // presence) but has reported nothing.
    let fz0050 = Client::connect(s.addr, s.pki_path(), "fz0050", &[], None).await;
    fz0050
        .publish(
            "devices/fz0050/reported",
            r#"[7, {"class": "streetlight", "arr": 3}]"#,
        )
        .await;
    let status = op
        .eventually_status(json!({}), "the array report counted", |v| {
            v["counters"]["rejected_inputs"]["reported:bad_schema"] == 1
        })
        .await;
    assert_eq!(status["counters"]["reports"], 1, "only fz0002's: {status}");
    let d = op.query("describe", json!({"id": "fz0050"})).await;
    assert_eq!(d["reported_version"], 0, "{d}");
    assert_eq!(d["reported"], Value::Null, "{d}");

    // Nothing of the refused documents was stored.
    let answer = op
        .request("fleet/ops/status", json!({"name": "fzarr"}))
        .await;
    assert_rejected(&answer, "not_found", "fzarr");
    let rejected = &status["counters"]["rejected_inputs"];
    assert_eq!(rejected["desired:bad_schema"], 2, "{rejected}");
    fz0002.close().await;
    fz0050.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minus_zero_is_the_integer_zero() {
    let mut s = Server::start().await;
    s.devices("mz", 1);
    let mut op = s.operator().await;
    let answer = raw(
        &mut op,
        "fleet/desired/mz",
        r#"{"name": "mz", "target": {"ids": ["mz0001"]}, "priority": -0, "if_generation": -0, "state": {"dimming": 5}, "request_id": "mz-1"}"#,
        "mz-1",
    )
    .await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    assert_eq!(answer["generation"], 1, "{answer}");
    let answer = raw(
        &mut op,
        "fleet/ops/get-devices",
        r#"{"limit": -0, "offset": -0, "request_id": "mz-2"}"#,
        "mz-2",
    )
    .await;
    assert_eq!(answer["status"], "ok", "{answer}");

    let device = Client::connect(s.addr, s.pki_path(), "mz0001", &[], None).await;
    // Version -0 is version 0: not above "never reported", so stale, not malformed.
    device
        .publish("devices/mz0001/reported", r#"{"version": -0, "state": {}}"#)
        .await;
    device
        .publish(
            "devices/mz0001/reported",
            r#"{"version": 1, "state": {"dimming": -0}}"#,
        )
        .await;
    let d = op
        .eventually_device("mz0001", "reported", |v| v["reported_version"] == 1)
        .await;
    assert_eq!(d["reported"]["dimming"], json!(0), "{d}");
    let status = op.query("status", json!({})).await;
    assert_eq!(status["counters"]["stale_reports"], 1, "{status}");
    assert_eq!(status["counters"]["rejected_inputs"], json!({}), "{status}");
    device.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_topic_after_the_prefix_names_the_document_and_the_verb() {
    let mut s = Server::start().await;
    let mut op = s.operator().await;
    let answer = raw(
        &mut op,
        "fleet/desired/a/b/n1",
        r#"{"name": "n1", "target": {"class": "streetlight"}, "state": {"dimming": 1}, "request_id": "nested"}"#,
        "nested",
    )
    .await;
    assert_rejected(&answer, "bad_name", "fleet/desired/a/b/n1");
    let answer = op.request("fleet/ops/status", json!({"name": "n1"})).await;
    assert_rejected(&answer, "not_found", "n1 was not stored");

    let answer = raw(
        &mut op,
        "fleet/ops/x/status",
        r#"{"request_id": "nested-verb"}"#,
        "nested-verb",
    )
    .await;
    assert_rejected(&answer, "unknown_verb", "fleet/ops/x/status");
    s.stop().await;
}
