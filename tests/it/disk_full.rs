//! A full disk, as a user of `cityplane serve` sees it: the real binary with
//! its `--data` on a small ext4 image (attached to a loop device), the PKI on
//! the normal disk, simulated devices and an operator over mutual TLS.
//!
//! While the data filesystem is full, a write (`apply`) is refused with code
//! `storage_unavailable` and a reason that says the disk is full, queries
//! keep being answered from memory, and the server neither dies nor panics.
//! Once space is freed it accepts writes again without a restart, and after a
//! restart the accepted documents are there and the refused one is not.
//! The audit is answered on the full disk too, the refused writes appear in
//! it once space is back, and it keeps every accepted write, in order,
//! across the restart.
//!
//! Needs root, `losetup`, `mkfs.ext4` (e2fsprogs) and a free loop device.
//! Without them the test is skipped with a message, unless
//! `CITYPLANE_REQUIRE_LOOP=1` (CI), where it fails.

use crate::common;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use cityplane::client::{ConnectArgs, Operator};
use cityplane_agent_sim::Fleet;
use cityplane_certs::Pki;
use cityplane_proto::Role;
use cityplane_testkit::loopdev::{self, make_ext4_image, LoopMount};
use common::{free_port, online_fleet, Server};
use serde_json::{json, Value};

pub(crate) const DEVICES: usize = 5;
/// The key every document sets (any device class accepts it).
pub(crate) const KEY: &str = "maintenance_window";
/// Bound on every wait; nothing here should take more than a few seconds.
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The data filesystem.

/// Writes `path` until the filesystem has no block left (ENOSPC), then
/// fsyncs it. Returns the bytes written.
fn fill_up(path: &Path) -> u64 {
    let mut f = File::create(path).expect("filler file");
    let chunk = vec![0xa5_u8; 1 << 20];
    let mut written = 0_u64;
    // Smaller and smaller writes take the last partial block too.
    for size in [1 << 20, 64 << 10, 4 << 10, 1 << 10, 1] {
        loop {
            match f.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    f.sync_all().expect("fsync of the filler file");
    written
}

// ---------------------------------------------------------------------------
// The server and the operator.

/// Connects the operator, retrying while the server is still starting.
pub(crate) async fn operator(pki: &Path, port: u16, server: &mut Server, log: &Path) -> Operator {
    let args = ConnectArgs {
        server: format!("127.0.0.1:{port}"),
        pki: pki.to_path_buf(),
        id: "op".into(),
        timeout: 10,
        cluster: false,
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        match Operator::connect(&args).await {
            Ok(op) => return op,
            Err(e) => {
                assert!(server.alive(), "serve exited: {}", read(log));
                assert!(
                    Instant::now() < deadline,
                    "operator cannot connect: {e:#}; log: {}",
                    read(log)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub(crate) fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// A desired document setting [`KEY`] on every device.
pub(crate) fn doc(name: &str, priority: i64, value: &str) -> Value {
    json!({"name": name, "target": {"all": true}, "priority": priority, "state": {KEY: value}})
}

/// [`doc`] with 16 KiB more: storing it needs new blocks, not just the
/// slack at the end of the database file's last allocated block (a small
/// write that fits there succeeds on a full filesystem, durably).
fn big_doc(name: &str, priority: i64, value: &str) -> Value {
    let mut d = doc(name, priority, value);
    d["state"]["note"] = json!("x".repeat(16 << 10));
    d
}

pub(crate) async fn apply(op: &mut Operator, doc: Value) -> Value {
    let name = doc["name"].as_str().expect("name").to_owned();
    op.request(&format!("fleet/desired/{name}"), doc)
        .await
        .unwrap_or_else(|e| panic!("apply {name}: no answer: {e:#}"))
}

pub(crate) async fn query(op: &mut Operator, verb: &str, body: Value) -> Value {
    op.query(verb, body)
        .await
        .unwrap_or_else(|e| panic!("{verb}: {e:#}"))
}

/// Every device reports `KEY = value` and the controller counts all of them
/// converged.
pub(crate) async fn wait_converged(op: &mut Operator, fleet: &Fleet, value: &str, what: &str) {
    let want = json!(value);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (have, total) = fleet.count_with(KEY, &want, None);
        let st = query(op, "status", json!({})).await;
        if have == total && st["total"] == DEVICES && st["converged"] == DEVICES {
            assert_eq!(st["failed"], 0, "{what}: {st}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {have}/{total} devices report {KEY}={value}; controller: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The audit as `(name, result)`, oldest first; `Err` when refused.
pub(crate) async fn audit(op: &mut Operator) -> anyhow::Result<Vec<(String, String)>> {
    let result = op.query("audit", json!({"limit": 100})).await?;
    let entries = result["entries"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no entries in {result}"))?;
    Ok(entries
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["result"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// The accepted writes in the audit, in its order: `(name, generation)`.
pub(crate) fn accepted(entries: &[(String, String)]) -> Vec<(&str, u64)> {
    entries
        .iter()
        .filter_map(|(name, result)| {
            let generation = result.strip_prefix("accepted generation ")?;
            Some((name.as_str(), generation.parse().ok()?))
        })
        .collect()
}

/// `a` is `b` with items (refusals, entries written by others) left out.
fn is_subsequence<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    let mut b = b.iter();
    a.iter().all(|x| b.any(|y| y == x))
}

pub(crate) async fn assert_not_found(op: &mut Operator, name: &str, context: &str) {
    let refused = op.query("status", json!({"name": name})).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().starts_with("not_found")),
        "{context}: the refused document {name:?} exists: {refused:?}"
    );
}

/// A PKI in `work/pki` with operator `op` and [`DEVICES`] devices `dev…`.
pub(crate) fn pki_with_devices(work: &Path) -> std::path::PathBuf {
    let pki_dir = work.join("pki");
    let pki = Pki::init(&pki_dir, false).expect("pki");
    pki.issue(Role::Operator, "op").expect("operator");
    pki.issue_bulk(Role::Device, "dev", DEVICES, |_| {})
        .expect("devices");
    pki_dir
}

// ---------------------------------------------------------------------------

async fn disk_full_story(test: &str) {
    // `kill` stops the server (SIGINT).
    if !loopdev::available(test, &["kill"]) {
        return;
    }
    // Dropped in reverse order: devices, server, mount, then the files.
    let work = tempfile::Builder::new()
        .prefix("cityplane-diskfull-e2e-")
        .tempdir()
        .expect("tempdir");
    let image = work.path().join("data.img");
    make_ext4_image(&image, 64);
    let mnt = LoopMount::mount(&image, &work.path().join("mnt")).unwrap_or_else(|e| panic!("{e}"));
    let data = mnt.dir.join("data");
    let filler = mnt.dir.join("filler");
    let log = work.path().join("serve.log");

    let pki_dir = pki_with_devices(work.path());

    let port = free_port();
    let mut server = Server::start(&pki_dir, &data, port, &log, "info");
    let mut op = operator(&pki_dir, port, &mut server, &log).await;

    let fleet = online_fleet(&pki_dir, port, DEVICES, DEADLINE).await;

    // 1. A document, applied and converged on a healthy disk.
    let answer = apply(&mut op, doc("baseline", 0, "02:00-04:00")).await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    assert_eq!(answer["generation"], 1, "{answer}");
    wait_converged(&mut op, &fleet, "02:00-04:00", "baseline").await;

    // 2. The data filesystem fills up.
    let filled = fill_up(&filler);
    let probe = mnt.dir.join("probe");
    let err = std::fs::write(&probe, [0_u8; 4096]).expect_err("the filesystem is full");
    assert_eq!(err.raw_os_error(), Some(28), "{err}");
    let _ = std::fs::remove_file(&probe);
    eprintln!("filled the data filesystem with {} KiB", filled >> 10);

    // 3. A write is refused, clearly, and nothing of it is visible.
    let answer = apply(&mut op, big_doc("while-full", 20, "full-disk")).await;
    eprintln!("apply on a full disk: {answer}");
    assert_eq!(
        answer["status"], "rejected",
        "a write on a full disk: {answer}"
    );
    assert_eq!(answer["code"], "storage_unavailable", "{answer}");
    let reason = answer["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        ["no space left", "disk full", "disk is full"]
            .iter()
            .any(|w| reason.contains(w)),
        "the reason must say the disk is full: {answer}"
    );
    // Also a change to an existing document.
    let answer = apply(&mut op, big_doc("baseline", 0, "full-disk")).await;
    assert_eq!(answer["status"], "rejected", "{answer}");
    assert_eq!(answer["code"], "storage_unavailable", "{answer}");

    // 4. Reads keep being answered, with the right data.
    for _ in 0..3 {
        let st = query(&mut op, "status", json!({})).await;
        assert_eq!(
            (
                &st["total"],
                &st["converged"],
                &st["pending"],
                &st["failed"]
            ),
            (&json!(DEVICES), &json!(DEVICES), &json!(0), &json!(0)),
            "status on a full disk: {st}"
        );
        let st = query(&mut op, "status", json!({"name": "baseline"})).await;
        assert_eq!(st["converged"], DEVICES, "{st}");
        assert_not_found(&mut op, "while-full", "on a full disk").await;
        let rows = query(&mut op, "get-devices", json!({})).await;
        let ids: Vec<&str> = rows["devices"]
            .as_array()
            .expect("rows")
            .iter()
            .filter_map(|r| r["id"].as_str())
            .collect();
        assert_eq!(ids, fleet.ids(), "get-devices on a full disk: {rows}");
        let dev = query(&mut op, "describe", json!({"id": "dev0001"})).await;
        assert_eq!(dev["desired"][KEY], "02:00-04:00", "{dev}");
        assert_eq!(dev["reported"][KEY], "02:00-04:00", "{dev}");
        assert_eq!(dev["converged"], true, "{dev}");
        let entries = audit(&mut op)
            .await
            .unwrap_or_else(|e| panic!("audit on a full disk: {e:#}"));
        assert_eq!(accepted(&entries), [("baseline", 1)], "{entries:?}");
    }
    assert!(server.alive(), "serve died on a full disk: {}", read(&log));
    assert_eq!(
        fleet.count_with(KEY, &json!("full-disk"), None).0,
        0,
        "a refused write reached devices"
    );

    // 5. Space is freed: the next write is accepted, without a restart.
    std::fs::remove_file(&filler).expect("remove filler");
    let answer = apply(&mut op, doc("recovered", 10, "03:00-05:00")).await;
    assert_eq!(
        answer["status"], "accepted",
        "the first write after space was freed: {answer}"
    );
    wait_converged(&mut op, &fleet, "03:00-05:00", "recovered").await;
    let entries = audit(&mut op).await.expect("audit");
    eprintln!("audit after recovery: {entries:?}");
    assert_eq!(
        accepted(&entries),
        [("baseline", 1), ("recovered", 1)],
        "{entries:?}"
    );
    // The refusals are audited too, written with the first commit that
    // succeeds once space is back.
    let refusals: Vec<_> = entries
        .iter()
        .filter(|(_, r)| r.starts_with("rejected (storage_unavailable)"))
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(refusals, ["while-full", "baseline"], "{entries:?}");

    assert!(server.alive(), "{}", read(&log));

    // 6. Restart on the same data: what was accepted is there, the refused
    //    writes are not (nothing half-applied).
    op.disconnect().await;
    let exit = server.stop(DEADLINE);
    assert!(exit.success(), "serve exited with {exit}: {}", read(&log));
    let mut server = Server::start(&pki_dir, &data, port, &log, "info");
    let mut op = operator(&pki_dir, port, &mut server, &log).await;
    assert!(fleet.wait_online(DEVICES, DEADLINE).await, "fleet back");
    wait_converged(&mut op, &fleet, "03:00-05:00", "after restart").await;
    for name in ["baseline", "recovered"] {
        let st = query(&mut op, "status", json!({"name": name})).await;
        assert_eq!(st["converged"], DEVICES, "{name} after restart: {st}");
    }
    assert_not_found(&mut op, "while-full", "after restart").await;
    let dev = query(&mut op, "describe", json!({"id": "dev0001"})).await;
    assert_eq!(dev["desired"][KEY], "03:00-05:00", "{dev}");
    assert!(dev["desired"].get("note").is_none(), "{dev}");
    // The refused change to `baseline` was not stored: it is still at
    // generation 1 (a write conditional on generation 1 is accepted).
    let mut next = doc("baseline", 0, "02:00-04:00");
    next["if_generation"] = json!(1);
    let answer = apply(&mut op, next).await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    assert_eq!(answer["generation"], 2, "{answer}");
    assert_eq!(fleet.count_with(KEY, &json!("full-disk"), None).0, 0);

    // Two more writes: the audit holds every accepted write, in order.
    let answer = apply(&mut op, doc("after-restart", 0, "02:00-04:00")).await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    let entries = audit(&mut op).await.expect("audit");
    eprintln!("audit after restart: {entries:?}");
    let want = [
        ("baseline", 1),
        ("recovered", 1),
        ("baseline", 2),
        ("after-restart", 1),
    ];
    assert!(
        is_subsequence(&want, &accepted(&entries)),
        "the audit lost or reordered accepted writes: want {want:?} in {entries:?}"
    );

    assert!(server.alive(), "{}", read(&log));
    let log_text = read(&log);
    assert!(!log_text.contains("panicked"), "serve panicked: {log_text}");
    op.disconnect().await;
    fleet.shutdown().await;
    let exit = server.stop(DEADLINE);
    assert!(exit.success(), "serve exited with {exit}: {}", read(&log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_keeps_serving_reads_and_recovers() {
    disk_full_story("a_full_disk_refuses_writes_clearly_keeps_serving_reads_and_recovers").await;
}
