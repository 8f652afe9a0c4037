//! The audit log is tamper-evident, through the binary: every entry is
//! hash-chained by the server as it is written; `audit verify` walks the
//! server's log; an export signed with the city's key verifies offline,
//! and an edited, a removed (middle or end) and a moved entry are each
//! named. Queries filter by operator, organisation, action, name and time.

use crate::common;
use crate::rollouts::Setup;

use std::process::Command;

use common::{ok, BIN};
use serde_json::{json, Value};

fn verify_file(file: &str, key: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["audit", "verify", "--file", file, "--key", key])
        .output()
        .expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_is_hash_chained_verified_exported_signed_and_queried() {
    let s = Setup::new(4);
    let _server = s.serve();
    s.zones(4);
    for i in 0..5 {
        let doc = s.file(
            &format!("d{i}.json"),
            &json!({"name": format!("doc{i}"), "target": {"class": "streetlight"},
                    "state": {"dimming": 10 + i}}),
        );
        s.json(&["apply", "-f", &doc]);
    }
    s.json(&[
        "orgs",
        "create",
        "lighting-co",
        "--scope",
        "owner=lighting-co",
        "--rights",
        "read",
    ]);
    // A refusal is audited too.
    s.fails(&["delete", "document", "nope"]);

    let v = s.json(&["audit", "verify"]);
    assert_eq!(v["ok"], true, "{v}");
    let entries = v["head"]["entries"].as_u64().expect("entries");
    assert!(entries >= 8, "{v}");
    assert_eq!(v["head"]["hash"], v["stored_head"]["hash"], "{v}");

    // Queries by action, name, operator, organisation and time.
    let applies = s.json(&["audit", "--action", "apply"]);
    assert_eq!(applies.as_array().map(Vec::len), Some(5), "{applies}");
    let one = s.json(&["audit", "--name", "doc3"]);
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(s.json(&["audit", "--who", "nobody"]), json!([]));
    let city = s.json(&["audit", "--org", "city", "--limit", "500"]);
    assert_eq!(
        city.as_array().map(Vec::len),
        Some(entries as usize),
        "{city}"
    );
    let future = s.json(&["audit", "--since", "2100-01-01T00:00:00Z"]);
    assert_eq!(future, json!([]));
    let past = s.json(&["audit", "--until", "2100-01-01T00:00:00Z", "--limit", "3"]);
    assert_eq!(past.as_array().map(Vec::len), Some(3), "{past}");
    assert!(s
        .fails(&["audit", "--since", "yesterday"])
        .contains("RFC 3339"));

    // The head is retained for auditors (published once stored).
    let want = v["head"]["hash"].clone();
    let mut retained = Value::Null;
    for _ in 0..50 {
        let lines = crate::governance::mosquitto_lines(&s, "op", "fleet/audit/head", 1, 10).await;
        retained = lines
            .first()
            .and_then(|l| l.split_once(' '))
            .and_then(|(_, p)| serde_json::from_str(p).ok())
            .expect("a retained head");
        if retained["hash"] == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(retained["hash"], want, "{retained}");

    // Exported and signed with the city's key; verified offline.
    let kd = s.dir.path().join("key");
    let kd = kd.to_str().expect("utf-8");
    ok(Command::new(BIN).args(["policy", "keygen", "--dir", kd]));
    let (key, public) = (format!("{kd}/policy.key"), format!("{kd}/policy.pub"));
    let export = s.dir.path().join("audit.json");
    let ex = export.to_str().expect("utf-8");
    s.json(&["audit", "export", "--out", ex, "--key", &key]);
    assert_eq!(verify_file(ex, &public), (true, String::new()));
    let original: Value =
        serde_json::from_str(&std::fs::read_to_string(&export).expect("export")).expect("json");

    let tampered = |f: &dyn Fn(&mut Vec<Value>)| -> String {
        let mut doc = original.clone();
        let entries = doc["entries"].as_array_mut().expect("entries");
        f(entries);
        std::fs::write(&export, doc.to_string()).expect("write");
        let (ok, err) = verify_file(ex, &public);
        assert!(!ok, "a tampered export verified");
        err
    };
    let seq = |i: usize| original["entries"][i]["seq"].as_u64().expect("seq");
    // Edited: a refusal made to look accepted.
    let e = tampered(&|es| es[2]["result"] = json!("accepted"));
    assert!(
        e.contains(&format!("entry {}", seq(2))) && e.contains("changed"),
        "{e}"
    );
    // Removed from the middle: the next one no longer follows.
    let e = tampered(&|es| {
        es.remove(3);
    });
    assert!(
        e.contains(&format!("entry {}", seq(4))) && e.contains("removed"),
        "{e}"
    );
    // Moved.
    let e = tampered(&|es| es.swap(4, 5));
    assert!(e.contains(&format!("entry {}", seq(5))), "{e}");
    // Cut off at the end: only the signed head shows it.
    let e = tampered(&|es| {
        es.pop();
    });
    assert!(e.contains("removed from its end"), "{e}");
    // A head rewritten to match the cut is not the signed one.
    let mut doc = original.clone();
    doc["entries"].as_array_mut().expect("entries").pop();
    let last = doc["entries"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .expect("last");
    doc["head"] = json!({"seq": last["seq"], "hash": last["hash"], "entries": entries - 1});
    std::fs::write(&export, doc.to_string()).expect("write");
    let (ok, err) = verify_file(ex, &public);
    assert!(!ok && err.contains("not signed by this key"), "{err}");
}
