//! Durability of `Store` on a real filesystem: simulated power loss and a
//! full disk, on ext4 images attached to loop devices.
//!
//! Power-loss model: the `store-torture` writer commits on ext4 mounted from
//! a loop device and prints each acknowledged sequence. It is SIGKILLed at a
//! random moment and, as soon as it has exited, the loop device's backing
//! image is copied. The loop driver writes into its backing file only what
//! the filesystem above it submitted as I/O, so whatever is still dirty in
//! the page cache of the mounted filesystem (data written but not synced,
//! uncommitted journal transactions) is not in the copy. What the model
//! loses is exactly that page cache: a missing or ineffective fsync (sled's
//! `sync_file_range`) shows up as lost commits. It does not model a disk's
//! volatile write cache: every write already submitted to the loop device
//! is in the copy, whole and in any order, whether or not a cache flush
//! (FLUSH/FUA) followed it; so a filesystem or device that relies on
//! flushes to order writes is not tested here (dm-log-writes, replaying up
//! to each flush, would; the kernel here has no device-mapper). Writeback
//! the kernel submits between the kill and the end of the copy lands in it
//! too. The copy is then mounted (the ext4 journal is replayed, as on a
//! reboot) and opened with `Store::open` (stock sled stores: with sled's
//! own configuration): every acknowledged commit must be there, and the
//! state must be exactly that after some prefix of the commits.
//!
//! Needs root, `losetup`, `mkfs.ext4` (e2fsprogs) and free loop devices.
//! Without them the tests are skipped with a message, unless
//! `CITYPLANE_REQUIRE_LOOP=1` (CI), where they fail.
//!
//! Knobs: `CITYPLANE_DURABILITY_RUNS` / `CITYPLANE_DURABILITY_STOCK_RUNS`
//! (run counts), `CITYPLANE_DURABILITY_SEED` (replay a seed printed by a run),
//! `CITYPLANE_DURABILITY_PAD` (bytes of padding per device record),
//! `CITYPLANE_DURABILITY_IMAGE_MIB` (size of the power-loss image, 64).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cityplane_controller::model::{AuditEntry, DeviceRecord};
use cityplane_controller::store::{Changes, Store, StoreError};
use cityplane_testkit::loopdev::{self, make_ext4_image, path_str, run, LoopMount};
use cityplane_testkit::process::ChildGuard;
use serde_json::Value;

/// The `store-torture` helper: this test binary, re-executed.
fn torture(args: Vec<String>) -> Command {
    cityplane_testkit::process::helper_command(crate::store_torture::ENTRY, &args)
}
/// Devices the writer cycles through: commit `s` writes `dev-{s % DEVICES}`.
const DEVICES: u64 = 16;

/// True when a loop-device test may run; skips (false) or fails per
/// CITYPLANE_REQUIRE_LOOP (see [`loopdev::available`]).
fn loop_devices_available(test: &str) -> bool {
    loopdev::available(test, &["sync"])
}

/// A generator seeded from CITYPLANE_DURABILITY_SEED, or at random; the seed
/// is printed so a failing run can be replayed.
fn seeded_rng(name: &str) -> fastrand::Rng {
    let seed = std::env::var("CITYPLANE_DURABILITY_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{name}: CITYPLANE_DURABILITY_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------
// Power loss.

/// What to write with and how to read it back.
struct Scenario {
    name: &'static str,
    /// Extra `store-torture write` options (none = through `Store::commit`).
    write_args: Vec<String>,
    /// Extra `store-torture verify` options.
    verify_args: Vec<String>,
    /// Padding per device record, one picked at random per run.
    pads: Vec<u64>,
    /// Every commit carries an audit entry (checked to be contiguous).
    audited: bool,
}

impl Scenario {
    fn new(name: &'static str, write_args: &[&str], pads: &[u64]) -> Scenario {
        let pads = match std::env::var("CITYPLANE_DURABILITY_PAD") {
            Ok(v) => vec![v.parse().expect("CITYPLANE_DURABILITY_PAD")],
            Err(_) => pads.to_vec(),
        };
        Scenario {
            name,
            write_args: write_args.iter().map(|a| a.to_string()).collect(),
            verify_args: Vec::new(),
            audited: !write_args.contains(&"--device-only"),
            pads,
        }
    }
}

#[derive(Debug)]
enum Outcome {
    /// Every acknowledged commit was found, in a prefix-consistent state.
    Intact,
    /// Opened and loaded, but acknowledged commits were missing.
    Lost(String),
    /// Opened and loaded, but the state is no prefix of the commits.
    Inconsistent(String),
    /// Open or load failed, panicked or hung.
    Unusable(String),
}

#[derive(Default)]
struct Tally {
    runs: u64,
    intact: u64,
    lost: u64,
    inconsistent: u64,
    unusable: u64,
    acked: u64,
    details: Vec<String>,
}

impl Tally {
    fn failed(&self) -> u64 {
        self.lost + self.inconsistent + self.unusable
    }
}

fn torture_write(dir: &Path, scenario: &Scenario, pad: u64, max: Option<u64>) -> Command {
    let mut args = vec![
        "write".to_owned(),
        path_str(dir).to_owned(),
        "--devices".to_owned(),
        DEVICES.to_string(),
        "--pad".to_owned(),
        pad.to_string(),
    ];
    args.extend(scenario.write_args.iter().cloned());
    if let Some(max) = max {
        args.extend(["--max".to_owned(), max.to_string()]);
    }
    torture(args)
}

/// Runs `store-torture verify` on a store; its JSON report or why it failed.
fn torture_verify(dir: &Path, scenario: &Scenario) -> Result<Value, String> {
    let mut child = ChildGuard::new(
        torture(
            ["verify".to_owned(), path_str(dir).to_owned()]
                .into_iter()
                .chain(scenario.verify_args.iter().cloned())
                .collect(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    // Both outputs are small: reading them after exit cannot deadlock.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            return Err("verify hung for 30 s".to_owned());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    if !status.success() {
        let err: Vec<&str> = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(3)
            .collect();
        return Err(format!("{status}: {}", err.join(" | ")));
    }
    // The test harness prints its own lines around the helper's one JSON line.
    let report = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(report).map_err(|e| format!("bad verify output {out:?}: {e}"))
}

/// Judges a recovered store against the last acknowledged sequence.
fn judge(report: &Value, acked: u64, audited: bool) -> Outcome {
    let seq = report["seq"].as_u64().unwrap();
    if seq < acked {
        return Outcome::Lost(format!("acked {acked}, recovered seq {seq}"));
    }
    // Only the one commit in flight at the kill may be there unacknowledged.
    if seq > acked + 1 {
        return Outcome::Inconsistent(format!("acked {acked}, recovered seq {seq}"));
    }
    let (first, last) = (
        report["audit_first"].as_u64(),
        report["audit_last"].as_u64(),
    );
    let audit_ok = !audited
        || report["audit_len"].as_u64() == Some(seq)
            && report["audit_contiguous"] == Value::Bool(true)
            && (seq == 0 || (first == Some(1) && last == Some(seq)));
    if !audit_ok {
        return Outcome::Inconsistent(format!(
            "acked {acked}, seq {seq} but audit len {} first {first:?} last {last:?} contiguous {}",
            report["audit_len"], report["audit_contiguous"]
        ));
    }
    let mut expected = BTreeMap::new();
    for s in seq.saturating_sub(DEVICES - 1).max(1)..=seq {
        expected.insert(format!("dev-{:03}", s % DEVICES), s);
    }
    let found: BTreeMap<String, u64> = report["devices"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    if found != expected {
        let wrong: Vec<String> = expected
            .iter()
            .filter(|(k, v)| found.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k} has {:?}, want {v}", found.get(k)))
            .collect();
        return Outcome::Inconsistent(format!(
            "acked {acked}, seq {seq}, but device records are older: {}",
            wrong.join(", ")
        ));
    }
    Outcome::Intact
}

/// One simulated power loss; `fresh` = the killed writer also creates the store.
fn power_loss_once(
    work: &Path,
    base: &Path,
    scenario: &Scenario,
    fresh: bool,
    pad: u64,
    rng: &mut fastrand::Rng,
) -> (Outcome, u64) {
    let (image, copy) = (work.join("run.img"), work.join("copy.img"));
    std::fs::copy(base, &image).unwrap();
    let live = LoopMount::mount(&image, &work.join("live")).unwrap();
    let store = live.path("store");

    // A store that existed before: written, closed and synced, so only the
    // killed run's commits are at risk.
    let mut acked = 0;
    if !fresh {
        acked = rng.u64(1..=40);
        let out = torture_write(&store, scenario, pad, Some(acked))
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "setup writer failed: {}", out.status);
        run("sync", &["-f", path_str(&live.dir)]);
    }

    let log = work.join("writer.stderr");
    let mut child = ChildGuard::new(
        torture_write(&store, scenario, pad, None)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(seq) = line.trim().parse() {
                if tx.send(seq).is_err() {
                    break;
                }
            }
        }
    });

    // Kill after a random number of acknowledgements plus a random delay, so
    // the cut falls anywhere: between commits, mid-write, mid-fsync.
    let want = acked + rng.u64(3..=120);
    let delay = Duration::from_micros(rng.u64(0..=3000));
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked < want {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(seq) => acked = acked.max(seq),
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!(
                        "writer exited early ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
            Err(e) => panic!(
                "writer stalled at ack {acked} ({e:?}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }
    std::thread::sleep(delay);
    child.kill().unwrap();
    child.wait().unwrap();
    // Power off: the image as the loop device left it, before anything else
    // (umount, writeback, journal commits) reaches it.
    std::fs::copy(&image, &copy).unwrap();

    drop(child);
    reader.join().unwrap();
    acked = acked.max(rx.try_iter().max().unwrap_or(0));
    drop(live);

    // Reboot: mount the copy (journal replay) and open the store.
    let outcome = match LoopMount::mount(&copy, &work.join("after")) {
        Err(e) => Outcome::Unusable(format!("filesystem did not mount: {e}")),
        Ok(after) => {
            let verdict = match torture_verify(&after.path("store"), scenario) {
                Err(e) => Outcome::Unusable(e),
                Ok(report) => judge(&report, acked, scenario.audited),
            };
            drop(after);
            verdict
        }
    };
    (outcome, acked)
}

fn power_loss_series(scenario: &Scenario, runs: u64) -> Tally {
    let mut rng = seeded_rng(scenario.name);
    let work = tempfile::Builder::new()
        .prefix("cityplane-durability-")
        .tempdir()
        .unwrap();
    let base = work.path().join("base.img");
    // 16 MiB sled segments and 150 KB records need room to grow.
    let default_mib = if scenario.pads.iter().any(|p| *p > 20_000) {
        192
    } else {
        64
    };
    make_ext4_image(
        &base,
        env_u64("CITYPLANE_DURABILITY_IMAGE_MIB", default_mib),
    );
    let mut tally = Tally {
        runs,
        ..Tally::default()
    };
    let started = Instant::now();
    for i in 0..runs {
        let fresh = i % 2 == 0;
        let pad = scenario.pads[rng.usize(..scenario.pads.len())];
        let (outcome, acked) = power_loss_once(work.path(), &base, scenario, fresh, pad, &mut rng);
        tally.acked += acked;
        let kind = if fresh { "fresh" } else { "existing" };
        let detail = |d: &str| format!("run {i} ({kind} store, pad {pad}): {d}");
        match outcome {
            Outcome::Intact => tally.intact += 1,
            Outcome::Lost(d) => {
                tally.lost += 1;
                tally.details.push(detail(&format!("LOST {d}")));
            }
            Outcome::Inconsistent(d) => {
                tally.inconsistent += 1;
                tally.details.push(detail(&format!("INCONSISTENT {d}")));
            }
            Outcome::Unusable(d) => {
                tally.unusable += 1;
                tally.details.push(detail(&format!("UNUSABLE {d}")));
            }
        }
    }
    eprintln!(
        "{}: {} power losses in {:.1} s, {} commits acknowledged: intact {}, \
         lost acknowledged commits {}, unusable {}, inconsistent {}",
        scenario.name,
        tally.runs,
        started.elapsed().as_secs_f64(),
        tally.acked,
        tally.intact,
        tally.lost,
        tally.unusable,
        tally.inconsistent
    );
    for d in &tally.details {
        eprintln!("  {d}");
    }
    tally
}

/// Record sizes that stay below sled's blob threshold (see
/// `large_records_survive_power_loss`); 4 KiB records make a run span
/// several of sled's 512 KiB log segments.
const PADS: [u64; 3] = [64, 1024, 4096];

/// Issue acceptance: at least 50 simulated power losses, no acknowledged
/// commit lost, the store always opens and is always a prefix of the commits.
#[test]
fn acknowledged_commits_survive_power_loss() {
    if !loop_devices_available("acknowledged_commits_survive_power_loss") {
        return;
    }
    let runs = env_u64("CITYPLANE_DURABILITY_RUNS", 50);
    let t = power_loss_series(
        &Scenario::new("power loss, Store::commit", &[], &PADS),
        runs,
    );
    assert_eq!(
        t.failed(),
        0,
        "acknowledged commits must survive power loss: {:#?}",
        t.details
    );
}

/// The same for commits that hold only device records and the sequence (no
/// audit entry): what the controller writes for reports, acks and reconciles.
#[test]
fn device_only_commits_survive_power_loss() {
    if !loop_devices_available("device_only_commits_survive_power_loss") {
        return;
    }
    let runs = env_u64("CITYPLANE_DURABILITY_DEVICE_ONLY_RUNS", 20);
    let t = power_loss_series(
        &Scenario::new(
            "power loss, Store::commit, device records only",
            &["--device-only"],
            &PADS,
        ),
        runs,
    );
    assert_eq!(t.failed(), 0, "{:#?}", t.details);
}

/// The control group: the same harness against stock sled (flush() only)
/// must find acknowledged commits missing from a store that opens, or it
/// simulates no power loss and the tests above prove nothing. The copy is
/// read back with sled's own default segment size (`verify --stock`): read
/// through `Store::open`, which asks for 16 MiB, sled refuses every existing
/// stock store ("cannot change the io buffer size"), and counting that as a
/// failure made this test pass whatever the disk held.
///
/// Measured here (2026-11-30, 50 runs): 32 lost acknowledged commits (24 of
/// 25 fresh stores, 8 of 25 existing ones), 0 unusable, 0 inconsistent.
#[test]
fn the_power_loss_harness_catches_stock_sled() {
    if !loop_devices_available("the_power_loss_harness_catches_stock_sled") {
        return;
    }
    let runs = env_u64("CITYPLANE_DURABILITY_STOCK_RUNS", 20);
    let mut scenario = Scenario::new("power loss, stock sled flush()", &["--stock"], &PADS);
    scenario.verify_args = vec!["--stock".to_owned()];
    let t = power_loss_series(&scenario, runs);
    assert!(
        t.lost + t.inconsistent > 0,
        "stock sled lost no acknowledged commit in {runs} simulated power losses \
         (unusable {}): the harness does not simulate power loss",
        t.unusable
    );
}

/// Regression: sled writes any log item larger than about a quarter of its
/// segment to a separate file under `<db>/blobs/` that it never fsyncs. With
/// sled's default 512 KiB segments, records of ~8 KiB (a leaf holds up to 16)
/// lost acknowledged commits in most runs; `Store` now uses 16 MiB segments
/// and refuses records above `MAX_RECORD`.
#[test]
fn large_records_survive_power_loss() {
    if !loop_devices_available("large_records_survive_power_loss") {
        return;
    }
    let runs = env_u64("CITYPLANE_DURABILITY_LARGE_RUNS", 10);
    let scenario = Scenario::new(
        "power loss, Store::commit, large records",
        &[],
        &[12_000, 150_000],
    );
    let t = power_loss_series(&scenario, runs);
    assert_eq!(t.failed(), 0, "{:#?}", t.details);
}

/// For experiments: `CITYPLANE_DURABILITY_WRITE_ARGS` / `_VERIFY_ARGS` are
/// passed to `store-torture write` / `verify` (e.g. `--stock --fsync
/// --segment-size 8388608` and `--segment-size 8388608`).
#[test]
#[ignore = "experiment, configured by environment variables"]
fn power_loss_experiment() {
    if !loop_devices_available("power_loss_experiment") {
        return;
    }
    let args = |name: &str| -> Vec<String> {
        std::env::var(name)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let mut scenario = Scenario::new("power loss, experiment", &[], &PADS);
    scenario.write_args = args("CITYPLANE_DURABILITY_WRITE_ARGS");
    scenario.verify_args = args("CITYPLANE_DURABILITY_VERIFY_ARGS");
    eprintln!(
        "write {:?}, verify {:?}",
        scenario.write_args, scenario.verify_args
    );
    let t = power_loss_series(&scenario, env_u64("CITYPLANE_DURABILITY_RUNS", 20));
    assert_eq!(t.failed(), 0, "{:#?}", t.details);
}

// ---------------------------------------------------------------------------
// Disk full.

fn device(id: String, version: u64, pad: usize) -> DeviceRecord {
    let mut d = DeviceRecord::new(&id);
    d.reported_version = version;
    let mut reported = serde_json::Map::new();
    reported.insert("pad".to_owned(), Value::String("x".repeat(pad)));
    d.reported = reported.into();
    d
}

/// Commit `seq`: 8 new devices of ~2 KiB each, one audit entry, meta seq.
fn fill_changes(seq: u64) -> Changes {
    Changes {
        devices: (0..8)
            .map(|k| std::sync::Arc::new(device(format!("fill-{seq:05}-{k}"), seq, 2048)))
            .collect(),
        audit: vec![AuditEntry {
            seq,
            at: String::new(),
            who: "durability".to_owned(),
            action: "fill".to_owned(),
            name: format!("commit-{seq}"),
            result: "ok".to_owned(),
            org: None,
            devices: Vec::new(),
            prev: String::new(),
            hash: String::new(),
        }],
        seq: Some(seq),
        ..Changes::default()
    }
}

/// Everything acknowledged up to `acked` is there; returns the stored seq.
fn assert_has_all(store: &Store, acked: u64, context: &str) -> u64 {
    let loaded = store
        .load()
        .unwrap_or_else(|e| panic!("{context}: load failed: {e}"));
    assert!(
        loaded.seq >= acked,
        "{context}: seq {} < acknowledged {acked}",
        loaded.seq
    );
    let versions: BTreeMap<&str, u64> = loaded
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.reported_version))
        .collect();
    for seq in 1..=acked {
        for k in 0..8 {
            let id = format!("fill-{seq:05}-{k}");
            assert_eq!(
                versions.get(id.as_str()),
                Some(&seq),
                "{context}: acknowledged device {id} missing"
            );
        }
    }
    assert!(
        loaded.audit_len as u64 >= acked,
        "{context}: audit has {} entries, {acked} acknowledged",
        loaded.audit_len
    );
    loaded.seq
}

/// Commits until one fails; the last acknowledged sequence and the error.
fn fill(store: &Store, from: u64) -> (u64, StoreError) {
    let mut seq = from;
    loop {
        assert!(seq < from + 20_000, "the disk never filled up");
        match store.commit(&fill_changes(seq + 1)) {
            Ok(()) => seq += 1,
            Err(e) => return (seq, e),
        }
    }
}

/// `Store::open`, waiting out the file lock a just-dropped handle's sled
/// threads may still hold for some milliseconds.
fn reopen(dir: &Path) -> Result<Store, StoreError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(dir, 4 << 20) {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => return other,
        }
    }
}

/// A small ext4 with a 3 MiB ballast file to delete later.
fn small_fs(work: &Path) -> (LoopMount, PathBuf) {
    let image = work.join("small.img");
    make_ext4_image(&image, 96);
    let mnt = LoopMount::mount(&image, &work.join("mnt")).unwrap();
    let ballast = mnt.path("ballast");
    std::fs::write(&ballast, vec![0x5a_u8; 40 << 20]).unwrap();
    std::fs::File::open(&ballast).unwrap().sync_all().unwrap();
    (mnt, ballast)
}

/// A full disk is a clear, classified error (also when restarting on it),
/// nothing acknowledged is lost, and commits work again once space is freed.
#[test]
fn a_full_disk_is_a_clear_error_and_recoverable() {
    if !loop_devices_available("a_full_disk_is_a_clear_error_and_recoverable") {
        return;
    }
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("cityplane-diskfull-")
        .tempdir()
        .unwrap();
    let (mnt, ballast) = small_fs(work.path());
    let dir = mnt.path("store");

    let store = Store::open(&dir, 4 << 20).unwrap();
    let (acked, err) = fill(&store, 0);
    eprintln!("disk full after {acked} commits: {err}");
    assert!(acked > 10, "filled up suspiciously early: {err}");
    assert!(err.is_disk_full(), "a full disk must say so: {err:?}");
    drop(store);

    // Restarting on the full disk: a clear error too (or, if sled needs no
    // new space to open, everything is there and the next commit says so).
    let mut fillers = 0;
    while std::fs::write(mnt.path(&format!("filler-{fillers}")), [0_u8; 4096]).is_ok() {
        fillers += 1;
    }
    match reopen(&dir) {
        Err(e) => assert!(e.is_disk_full(), "open on a full disk: {e} ({e:?})"),
        Ok(store) => {
            assert_has_all(&store, acked, "reopened on a full disk");
            let e = store.commit(&fill_changes(acked + 1)).unwrap_err();
            assert!(e.is_disk_full(), "{e:?}");
        }
    }

    // Free space: the store opens with everything acknowledged and commits.
    std::fs::remove_file(&ballast).unwrap();
    for n in 0..=fillers {
        let _ = std::fs::remove_file(mnt.path(&format!("filler-{n}")));
    }
    let store = reopen(&dir).unwrap();
    let seq = assert_has_all(&store, acked, "reopened after freeing space");
    store.commit(&fill_changes(seq + 1)).unwrap();
    store.commit(&fill_changes(seq + 2)).unwrap();
    drop(store);
    let store = reopen(&dir).unwrap();
    assert_has_all(&store, acked, "reopened at the end");
    assert_eq!(store.load().unwrap().seq, seq + 2);
    drop(store);
    drop(mnt);
    eprintln!(
        "disk-full test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// KNOWN BUG (store.rs, via sled): after a commit fails with disk full, sled
/// records a global error on the handle. Every later write fails even once
/// space is freed (the runtime's retry loop never recovers without a
/// restart), and reads (`load()`) fail too, intermittently, because sled
/// reads can write (node consolidation).
#[test]
#[ignore = "reads from the store on a full disk fail (sled writes while reading); the controller answers queries from memory instead"]
fn the_same_handle_reads_and_recovers_after_disk_full() {
    if !loop_devices_available("the_same_handle_reads_and_recovers_after_disk_full") {
        return;
    }
    let work = tempfile::Builder::new()
        .prefix("cityplane-diskfull-")
        .tempdir()
        .unwrap();
    let (mnt, ballast) = small_fs(work.path());
    let store = Store::open(&mnt.path("store"), 4 << 20).unwrap();
    let (acked, err) = fill(&store, 0);
    assert!(err.is_disk_full(), "{err:?}");
    for _ in 0..5 {
        assert_has_all(&store, acked, "same handle, disk full");
    }
    std::fs::remove_file(&ballast).unwrap();
    let seq = store.load().unwrap().seq;
    store
        .commit(&fill_changes(seq + 1))
        .expect("a commit on the same handle once space is free");
    drop(store);
    drop(mnt);
}
