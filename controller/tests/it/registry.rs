//! The device registry end to end over real mTLS: devices exist from
//! registration, operators' attributes (not devices' claims) decide which
//! documents target them, and documents can be listed, described, tried
//! and deleted.

use crate::common;

use common::*;
use serde_json::{json, Value};

async fn register(op: &mut Client, devices: Value) -> Value {
    op.query("register", json!({ "devices": devices })).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_device_that_never_connected_converges_on_first_connect() {
    let mut s = Server::start().await;
    s.devices("lamp", 2);
    let mut op = s.operator().await;
    let r = register(
        &mut op,
        json!([{"id": "lamp0001", "class": "streetlight", "labels": {"zone": "north"}},
               {"id": "lamp0002", "class": "streetlight", "labels": {"zone": "south"}}]),
    )
    .await;
    assert_eq!(r["registered"], 2, "{r}");
    // Known before it ever connected.
    let d = op.query("describe", json!({"id": "lamp0001"})).await;
    assert_eq!(d["class"], "streetlight", "{d}");
    assert_eq!(d["last_seen"], "never", "{d}");
    assert_eq!(d["reported"], Value::Null, "{d}");
    assert!(
        d["registered"].as_str().is_some_and(|t| !t.is_empty()),
        "{d}"
    );

    // One by id, one by selector: both count as targeted now.
    let by_id = op
        .apply(json!({"name": "one", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    assert_eq!(by_id["devices"], 1, "{by_id}");
    let by_selector = op
        .apply(json!({"name": "south", "target": {"class": "streetlight", "labels": {"zone": "south"}}, "state": {"dimming": 20}}))
        .await;
    assert_eq!(by_selector["devices"], 1, "{by_selector}");

    // After a restart the documents and the registry are still there.
    op.close().await;
    s.stop().await;
    s.boot().await;
    let mut op = s.operator().await;
    let docs = op.query("get-documents", json!({})).await;
    assert_eq!(docs["total"], 2, "{docs}");

    // Their first reports carry no class and no labels; the broker's
    // presence creates nothing that hides them from their documents.
    let mut a = Device::new(&s, "lamp0001", json!({"dimming": 100}));
    let mut b = Device::new(&s, "lamp0002", json!({"dimming": 100}));
    a.connect(s.addr).await;
    b.connect(s.addr).await;
    op.eventually_device("lamp0001", "converged", |v| v["converged"] == true)
        .await;
    op.eventually_device("lamp0002", "converged", |v| v["converged"] == true)
        .await;
    assert_eq!(a.get("dimming"), Some(json!(40)));
    assert_eq!(b.get("dimming"), Some(json!(20)));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_device_reports_of_itself_moves_it_nowhere_and_labels_do() {
    let mut s = Server::start().await;
    s.devices("cam", 1);
    let mut op = s.operator().await;
    register(
        &mut op,
        json!([{"id": "cam0001", "class": "camera", "labels": {"zone": "north"}}]),
    )
    .await;
    // A compromised camera claims to be a streetlight in the south.
    let mut cam = Device::new(
        &s,
        "cam0001",
        json!({"class": "streetlight", "labels": {"zone": "south"}, "dimming": 100, "retention_days": 7}),
    );
    cam.connect(s.addr).await;
    op.eventually_device("cam0001", "reported", |v| v["reported_version"] != 0)
        .await;
    let lights = op
        .apply(
            json!({"name": "lights", "target": {"class": "streetlight"}, "state": {"dimming": 1}}),
        )
        .await;
    assert_eq!(
        lights["devices"], 0,
        "a device's claim selected it: {lights}"
    );
    let cams = op
        .apply(json!({"name": "cams", "target": {"class": "camera", "labels": {"zone": "north"}}, "state": {"retention_days": 30}}))
        .await;
    assert_eq!(cams["devices"], 1, "{cams}");
    let d = op
        .eventually_device("cam0001", "converged", |v| v["converged"] == true)
        .await;
    assert_eq!(d["desired"], json!({"retention_days": 30}), "{d}");
    assert_eq!(d["class"], "camera", "{d}");
    assert_eq!(
        d["reported"]["class"], "streetlight",
        "kept as reported: {d}"
    );

    // An operator moves it south: the north document lets go of it.
    let moved = op
        .query(
            "label",
            json!({"ids": ["cam0001"], "change": {"set": {"zone": "south"}}}),
        )
        .await;
    assert_eq!(moved["changed"], 1, "{moved}");
    let d = op
        .eventually_device("cam0001", "desired follows the label", |v| {
            v["desired"] == json!({})
        })
        .await;
    assert_eq!(d["labels"], json!({"zone": "south"}), "{d}");
    // A selector label (and a class) make it a streetlight.
    op.query(
        "label",
        json!({"selector": {"labels": {"zone": "south"}}, "change": {"class": "streetlight"}}),
    )
    .await;
    op.eventually_device("cam0001", "now a streetlight", |v| {
        v["converged"] == true && v["desired"]["dimming"] == 1
    })
    .await;

    // Labelling an unknown id is refused, and the refusal is audited.
    let refused = op
        .request(
            "fleet/ops/label",
            json!({"ids": ["nobody"], "change": {"set": {"zone": "x"}}}),
        )
        .await;
    assert_eq!(refused["code"], "not_found", "{refused}");
    let audit = op.query("audit", json!({})).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"register") && actions.contains(&"label"),
        "{audit}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_are_listed_described_tried_and_deleted() {
    let mut s = Server::start().await;
    s.devices("lamp", 3);
    let mut op = s.operator().await;
    register(
        &mut op,
        json!([{"id": "lamp0001", "class": "streetlight"}, {"id": "lamp0002", "class": "streetlight"},
               {"id": "lamp0003", "class": "streetlight"}]),
    )
    .await;
    let mut devices = Vec::new();
    for id in ["lamp0001", "lamp0002", "lamp0003"] {
        let mut d = Device::new(&s, id, json!({"dimming": 100}));
        d.connect(s.addr).await;
        devices.push(d);
    }
    let base = json!({"name": "base", "target": {"class": "streetlight"}, "priority": 1,
                      "state": {"dimming": 10, "schedule": "dusk"}});
    op.apply(base.clone()).await;
    op.apply(json!({"name": "one", "target": {"ids": ["lamp0001"]}, "priority": 5, "state": {"dimming": 90}}))
        .await;
    op.eventually_status(json!({}), "all converged", |v| v["converged"] == 3)
        .await;

    // Dry run: nothing stored, counts per key; a stale if_generation is
    // refused as a real apply would be.
    let mut next = base.clone();
    next["state"] = json!({"dimming": 20, "schedule": "dusk"});
    let dry = op.query("dry-run", json!({"document": next})).await;
    assert_eq!(
        (
            dry["devices"].as_u64(),
            dry["changing"].as_u64(),
            dry["generation"].as_u64()
        ),
        (Some(3), Some(2), Some(2)),
        "lamp0001 keeps 90 from the higher priority: {dry}"
    );
    assert_eq!(dry["keys"], json!({"dimming": 2}), "{dry}");
    let mut stale = next.clone();
    stale["if_generation"] = json!(5);
    let refused = op
        .request("fleet/ops/dry-run", json!({"document": stale}))
        .await;
    assert_eq!(refused["code"], "conflict", "{refused}");
    let d = op.query("describe", json!({"id": "lamp0002"})).await;
    assert_eq!(
        d["desired"]["dimming"], 10,
        "a dry run changed nothing: {d}"
    );

    op.apply(next).await;
    let docs = op.query("get-documents", json!({})).await;
    let row = docs["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .find(|d| d["name"] == "base")
        .cloned()
        .expect("base listed");
    assert_eq!(
        (row["generation"].as_u64(), row["targeted"].as_u64()),
        (Some(2), Some(3)),
        "{row}"
    );
    assert_eq!(row["author"], "op", "{row}");
    let described = op.query("describe-document", json!({"name": "base"})).await;
    let generations: Vec<u64> = described["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["generation"].as_u64())
        .collect();
    assert_eq!(generations, vec![1, 2], "{described}");

    // Delete: its keys leave desired state unless another document sets
    // them; a stale if_generation is refused.
    let stale = op
        .request(
            "fleet/ops/delete-document",
            json!({"name": "base", "if_generation": 1}),
        )
        .await;
    assert_eq!(stale["code"], "conflict", "{stale}");
    let deleted = op
        .query(
            "delete-document",
            json!({"name": "base", "if_generation": 2}),
        )
        .await;
    assert_eq!(deleted["devices_changed"], 3, "{deleted}");
    let d1 = op
        .eventually_device("lamp0001", "base gone", |v| {
            v["desired"] == json!({"dimming": 90})
        })
        .await;
    assert_eq!(d1["converged"], true, "{d1}");
    let d2 = op.query("describe", json!({"id": "lamp0002"})).await;
    assert_eq!(d2["desired"], json!({}), "{d2}");
    assert_eq!(
        d2["reported"]["dimming"], 20,
        "devices keep their values: {d2}"
    );
    let missing = op
        .request("fleet/ops/describe-document", json!({"name": "base"}))
        .await;
    assert_eq!(missing["code"], "not_found", "{missing}");

    // Still deleted after a restart.
    op.close().await;
    s.stop().await;
    s.boot().await;
    let mut op = s.operator().await;
    let docs = op.query("get-documents", json!({})).await;
    assert_eq!(docs["total"], 1, "{docs}");
    assert_eq!(docs["documents"][0]["name"], "one", "{docs}");
    s.stop().await;
}

/// A certificate the registry has not heard of (issued elsewhere, no
/// manifest): the broker's presence message registers it at first contact,
/// and that must not hide it from a document that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_first_seen_through_presence_still_gets_its_document() {
    let mut s = Server::start().await;
    s.devices("lamp", 1);
    let mut op = s.operator().await;
    let answer = op
        .apply(json!({"name": "dim", "target": {"ids": ["lamp0001"]}, "state": {"dimming": 40}}))
        .await;
    assert_eq!(answer["devices"], 0, "not registered yet: {answer}");
    let mut d = Device::new(&s, "lamp0001", json!({"dimming": 100}));
    d.connect(s.addr).await;
    let described = op
        .eventually_device("lamp0001", "converged", |v| v["converged"] == true)
        .await;
    assert_eq!(described["registered_by"], "first-contact", "{described}");
    assert_eq!(d.get("dimming"), Some(json!(40)));
    s.stop().await;
}
