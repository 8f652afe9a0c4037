//! Every kind of bad input gets a clear rejection and leaves nothing stored.

use crate::common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operator_writes_are_rejected_with_a_reason_and_nothing_is_stored() {
    let mut s = Server::start().await;
    let mut op = s.operator().await;
    let good = json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 1}, "request_id": "ok"});
    assert_eq!(
        op.raw_request("fleet/desired/dim", good.to_string().as_bytes(), "ok")
            .await["status"],
        "accepted"
    );

    let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
    let big = "x".repeat(70 * 1024);
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed", r#"{"name": "dim", "request_id": "malformed", "#.to_owned(), "bad_json"),
        ("wrongtype", r#"{"name": "dim", "target": {"class": "streetlight"}, "state": {}, "priority": "high", "request_id": "wrongtype"}"#.to_owned(), "bad_schema"),
        ("unknown", r#"{"name": "dim", "target": {"class": "streetlight"}, "state": {}, "colour": 1, "request_id": "unknown"}"#.to_owned(), "unknown_field"),
        ("badtarget", r#"{"name": "dim", "target": {"colour": "x"}, "state": {}, "request_id": "badtarget"}"#.to_owned(), "bad_target"),
        ("emptysel", r#"{"name": "dim", "target": {}, "state": {}, "request_id": "emptysel"}"#.to_owned(), "bad_target"),
        ("deep", format!(r#"{{"name": "dim", "target": {{"class": "x"}}, "state": {{"a": {deep}}}, "request_id": "deep"}}"#), "too_deep"),
        ("big", format!(r#"{{"name": "dim", "target": {{"class": "x"}}, "state": {{"a": "{big}"}}, "request_id": "big"}}"#), "too_large"),
        ("conflict", r#"{"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 2}, "if_generation": 7, "request_id": "conflict"}"#.to_owned(), "conflict"),
        ("mismatch", r#"{"name": "other", "target": {"class": "streetlight"}, "state": {}, "request_id": "mismatch"}"#.to_owned(), "bad_name"),
    ];
    for (rid, payload, code) in &cases {
        let answer = op
            .raw_request("fleet/desired/dim", payload.as_bytes(), rid)
            .await;
        assert_eq!(answer["status"], "rejected", "{rid}: {answer}");
        assert_eq!(answer["code"], *code, "{rid}: {answer}");
        assert!(
            answer["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{rid}: a reason is given"
        );
    }
    // Nothing was half-applied: still generation 1 with the original state.
    let next = op
        .apply(json!({"name": "dim", "target": {"class": "streetlight"}, "state": {"dimming": 1}, "if_generation": 1}))
        .await;
    assert_eq!(next["generation"], 2, "{next}");
    let status = op.query("status", json!({})).await;
    let rejected = &status["counters"]["rejected_inputs"];
    assert_eq!(rejected["desired:conflict"], 1, "{rejected}");
    assert_eq!(rejected["desired:bad_json"], 1, "{rejected}");
    // The audit log has every write, accepted or not.
    let audit = op.query("audit", json!({"limit": 100})).await;
    assert_eq!(
        audit["entries"].as_array().map(Vec::len),
        Some(cases.len() + 2)
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_device_messages_are_counted_and_ignored() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut op = s.operator().await;
    // The controller identity may publish anywhere: use it to fake reports.
    let spy = Client::connect(s.addr, s.pki_path(), "spy", &[], None).await;
    spy.publish(
        "devices/ghost/reported",
        r#"{"version": 1, "state": {"class": "streetlight"}}"#,
    )
    .await;
    spy.publish(
        "devices/lamp0001/reported",
        r#"{"version": "x", "state": {}}"#,
    )
    .await;
    spy.publish(
        "devices/lamp0001/reported",
        r#"{"version": 1, "state": {}, "extra": true}"#,
    )
    .await;
    spy.publish("devices/lamp0001/reported", "not json").await;
    spy.publish("devices/lamp0001/acks", r#"{"id": 5}"#).await;
    spy.publish(
        "devices/lamp0001/reported",
        r#"{"version": 5, "state": {"class": "streetlight", "dimming": 1}}"#,
    )
    .await;
    spy.publish(
        "devices/lamp0001/reported",
        r#"{"version": 4, "state": {"class": "streetlight", "dimming": 99}}"#,
    )
    .await;
    let status = op
        .eventually_status(json!({}), "all counted", |v| {
            v["counters"]["stale_reports"] == 1
        })
        .await;
    let rejected = &status["counters"]["rejected_inputs"];
    assert_eq!(rejected["reported:unknown_device"], 1, "{rejected}");
    assert_eq!(rejected["reported:bad_schema"], 1, "{rejected}");
    assert_eq!(rejected["reported:unknown_field"], 1, "{rejected}");
    assert_eq!(rejected["reported:bad_json"], 1, "{rejected}");
    assert_eq!(rejected["acks:bad_schema"], 1, "{rejected}");
    assert_eq!(status["total"], 1, "the ghost was not stored");
    let d = op.query("describe", json!({"id": "lamp0001"})).await;
    assert_eq!(d["reported"]["dimming"], 1, "the older report was ignored");
    assert_eq!(d["reported_version"], 5);
    s.stop().await;
}
