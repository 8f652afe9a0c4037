//! `store-torture`: the writer and checker behind `durability.rs`, a helper
//! process re-executed from this test binary
//! (`cityplane_testkit::process::helper_command`).
//!
//! ```text
//! store-torture write  <dir> [--stock [--fsync] [--segment-size B]]
//!                            [--max N] [--devices D] [--pad BYTES]
//! store-torture verify <dir> [--stock | --segment-size B]
//! ```
//!
//! `write` opens the store at `<dir>`, prints `ready <seq>`, then commits in a
//! loop: commit `s` writes device `dev-{s % D}` with `reported_version = s`
//! (and a `pad` of BYTES in its reported state), audit entry `s` and meta seq
//! `s`. After each commit returns it prints `s` on its own line and flushes:
//! that line is the acknowledgement. It stops after N commits (default: never,
//! it waits to be killed).
//!
//! By default it writes through `Store::commit`. `--stock` writes the same
//! records with the same key layout through sled directly and acknowledges
//! after sled's own `flush()` only: the control group. For experiments,
//! `--fsync` adds `Store`'s fsyncs to the sled-direct writer (fsync of `conf`,
//! `db`, the directory and its parent at open, `sync_data` of `db` after each
//! flush) and `--segment-size` sets sled's segment size (it is persisted, so
//! `verify` needs the same value, and then reads through sled directly).
//!
//! `verify` opens the store with `Store::open` (with `--stock` or
//! `--segment-size`, through sled directly with that configuration: sled
//! refuses to open a database with another segment size than it was created
//! with, so reading a stock store through `Store` would only ever report
//! that), loads it and prints one JSON
//! line `{"seq", "audit_contiguous", "audit_len", "audit_first", "audit_last",
//! "devices": {id: reported_version}}`; any error is printed to stderr with
//! exit status 2 (a panic exits 101).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use cityplane_controller::model::{AuditEntry, DeviceRecord};
use cityplane_controller::store::{Changes, Store};
use serde_json::{json, Value};
use sled::Transactional;

const CACHE_BYTES: u64 = 16 * 1024 * 1024;
const USAGE: &str = "usage: store-torture write <dir> [--stock [--fsync] [--segment-size B]] \
                     [--max N] [--devices D] [--pad BYTES] [--device-only] | \
                     store-torture verify <dir> [--stock | --segment-size B]";

#[derive(Default)]
struct Opts {
    stock: bool,
    fsync: bool,
    segment_size: Option<usize>,
    max: Option<u64>,
    devices: Option<u64>,
    pad: Option<usize>,
    /// Commits without an audit entry, like the controller's for reports.
    device_only: bool,
}

/// The helper's entry: a no-op in a normal test run.
#[test]
fn entry() {
    if let Some(args) = cityplane_testkit::process::helper_args(ENTRY) {
        std::process::exit(run(&args));
    }
}

pub const ENTRY: &str = "store_torture::entry";

fn run(args: &[String]) -> i32 {
    let result = match (args.first().map(String::as_str), args.get(1)) {
        (Some(cmd @ ("write" | "verify")), Some(dir)) => {
            parse(&args[2..]).and_then(|opts| match cmd {
                "write" => write(Path::new(dir), &opts),
                _ => verify(Path::new(dir), &opts),
            })
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("store-torture: {e}");
            2
        }
    }
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut opts = Opts::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        let size = |n: u64| usize::try_from(n).map_err(|e| e.to_string());
        match arg.as_str() {
            "--stock" => opts.stock = true,
            "--device-only" => opts.device_only = true,
            "--fsync" => opts.fsync = true,
            "--segment-size" => opts.segment_size = Some(size(value(arg)?)?),
            "--max" => opts.max = Some(value(arg)?),
            "--devices" => opts.devices = Some(value(arg)?.max(1)),
            "--pad" => opts.pad = Some(size(value(arg)?)?),
            other => return Err(format!("unknown option {other}; {USAGE}")),
        }
    }
    Ok(opts)
}

fn records(seq: u64, opts: &Opts) -> (DeviceRecord, AuditEntry) {
    let devices = opts.devices.unwrap_or(16);
    let mut device = DeviceRecord::new(&format!("dev-{:03}", seq % devices));
    device.reported_version = seq;
    device.desired_generation = seq;
    device.online = true;
    let mut reported = serde_json::Map::new();
    reported.insert("seq".to_owned(), json!(seq));
    reported.insert(
        "pad".to_owned(),
        Value::String("x".repeat(opts.pad.unwrap_or(64))),
    );
    device.reported = reported.into();
    let audit = AuditEntry {
        seq,
        at: String::new(),
        who: "store-torture".to_owned(),
        action: "report".to_owned(),
        name: device.id.clone(),
        result: "ok".to_owned(),
        org: None,
        devices: Vec::new(),
        prev: String::new(),
        hash: String::new(),
    };
    (device, audit)
}

fn ack(out: &mut impl Write, line: &str) -> Result<(), String> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

fn write(dir: &Path, opts: &Opts) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    if opts.stock {
        return write_sled(dir, opts, &mut out);
    }
    let store = Store::open(dir, CACHE_BYTES).map_err(|e| e.to_string())?;
    let mut seq = store.load().map_err(|e| e.to_string())?.seq;
    ack(&mut out, &format!("ready {seq}"))?;
    for _ in 0..opts.max.unwrap_or(u64::MAX) {
        seq += 1;
        let (device, audit) = records(seq, opts);
        let changes = Changes {
            devices: vec![std::sync::Arc::new(device)],
            audit: if opts.device_only {
                Vec::new()
            } else {
                vec![audit]
            },
            seq: Some(seq),
            ..Changes::default()
        };
        store
            .commit(&changes)
            .map_err(|e| format!("commit {seq}: {e}"))?;
        ack(&mut out, &seq.to_string())?;
    }
    Ok(())
}

fn open_sled(dir: &Path, opts: &Opts) -> Result<sled::Db, String> {
    let mut config = sled::Config::new().path(dir).cache_capacity(CACHE_BYTES);
    if let Some(size) = opts.segment_size {
        config = config.segment_size(size);
    }
    config.open().map_err(|e| format!("open: {e}"))
}

fn fsync(path: &Path) -> Result<(), String> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("fsync {}: {e}", path.display()))
}

/// The same commits through sled directly: one transaction over the trees,
/// then `Db::flush()` (and with `--fsync`, `sync_data` of sled's file).
fn write_sled(dir: &Path, opts: &Opts, out: &mut impl Write) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let db = open_sled(dir, opts)?;
    let tree = |name: &str| db.open_tree(name).map_err(|e| e.to_string());
    let (devices, audit, meta) = (tree("devices")?, tree("audit")?, tree("meta")?);
    let data = File::open(dir.join("db")).map_err(|e| e.to_string())?;
    if opts.fsync {
        db.flush().map_err(|e| e.to_string())?;
        for path in [dir.join("db"), dir.join("conf"), dir.to_path_buf()] {
            fsync(&path)?;
        }
        if let Some(parent) = dir.parent() {
            fsync(parent)?;
        }
    }
    let mut seq = match meta.get("seq").map_err(|e| e.to_string())? {
        Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| "bad meta seq")?),
        None => 0,
    };
    ack(out, &format!("ready {seq}"))?;
    for _ in 0..opts.max.unwrap_or(u64::MAX) {
        seq += 1;
        let (device, entry) = records(seq, opts);
        let device_json = serde_json::to_vec(&device).map_err(|e| e.to_string())?;
        let audit_json = serde_json::to_vec(&entry).map_err(|e| e.to_string())?;
        (&devices, &audit, &meta)
            .transaction(|(devices_t, audit_t, meta_t)| {
                devices_t.insert(device.id.as_bytes(), device_json.as_slice())?;
                audit_t.insert(&seq.to_be_bytes(), audit_json.as_slice())?;
                meta_t.insert("seq", &seq.to_be_bytes())?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| format!("commit {seq}: {e:?}"))?;
        db.flush().map_err(|e| format!("flush {seq}: {e}"))?;
        if opts.fsync {
            data.sync_data().map_err(|e| format!("sync {seq}: {e}"))?;
        }
        ack(out, &seq.to_string())?;
    }
    Ok(())
}

struct Seen {
    seq: u64,
    audit: Vec<u64>,
    devices: Vec<(String, u64)>,
}

fn verify(dir: &Path, opts: &Opts) -> Result<(), String> {
    let seen = if opts.stock || opts.segment_size.is_some() {
        read_sled(dir, opts)?
    } else {
        read_store(dir)?
    };
    let first = seen.audit.first().copied();
    let contiguous = seen
        .audit
        .iter()
        .zip(first.unwrap_or(0)..)
        .all(|(a, want)| *a == want);
    let devices: serde_json::Map<String, Value> = seen
        .devices
        .into_iter()
        .map(|(id, v)| (id, json!(v)))
        .collect();
    let report = json!({
        "seq": seen.seq,
        "audit_contiguous": contiguous,
        "audit_len": seen.audit.len(),
        "audit_first": first,
        "audit_last": seen.audit.last(),
        "devices": devices,
    });
    println!("{report}");
    Ok(())
}

/// Through our `Store`: what the controller would see at start.
fn read_store(dir: &Path) -> Result<Seen, String> {
    let store = Store::open(dir, CACHE_BYTES).map_err(|e| format!("open: {e}"))?;
    let loaded = store.load().map_err(|e| format!("load: {e}"))?;
    let audit = store
        .audit_tail(usize::MAX)
        .map_err(|e| format!("audit: {e}"))?;
    if audit.len() != loaded.audit_len {
        return Err(format!(
            "audit_len {} but {} entries read",
            loaded.audit_len,
            audit.len()
        ));
    }
    Ok(Seen {
        seq: loaded.seq,
        audit: audit.iter().map(|a| a.seq).collect(),
        devices: loaded
            .devices
            .iter()
            .map(|d| (d.id.clone(), d.reported_version))
            .collect(),
    })
}

/// Through sled directly, with the configuration the store was written with.
fn read_sled(dir: &Path, opts: &Opts) -> Result<Seen, String> {
    let db = open_sled(dir, opts)?;
    let tree = |name: &str| db.open_tree(name).map_err(|e| format!("open tree: {e}"));
    let seq = match tree("meta")?.get("seq").map_err(|e| format!("load: {e}"))? {
        Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| "bad meta seq")?),
        None => 0,
    };
    let mut audit = Vec::new();
    for item in tree("audit")?.iter() {
        let (_, v) = item.map_err(|e| format!("load: {e}"))?;
        let entry: AuditEntry = serde_json::from_slice(&v).map_err(|e| format!("corrupt: {e}"))?;
        audit.push(entry.seq);
    }
    let mut devices = Vec::new();
    for item in tree("devices")?.iter() {
        let (_, v) = item.map_err(|e| format!("load: {e}"))?;
        let d: DeviceRecord = serde_json::from_slice(&v).map_err(|e| format!("corrupt: {e}"))?;
        devices.push((d.id, d.reported_version));
    }
    Ok(Seen {
        seq,
        audit,
        devices,
    })
}
