//! Operator verbs that talk to a running server over MQTT.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use cityplane::client::{ConnectArgs, Operator, Registered, Unanswered};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "FILE is JSON, for example:\n  {\"name\": \"north-dimming\", \"target\": {\"class\": \"streetlight\", \"labels\": {\"zone\": \"north\"}},\n   \"priority\": 10, \"state\": {\"dimming\": 40}}\nTarget either {\"ids\": [...]} or a selector (class, labels, id_prefix, or {\"all\": true}).\nAdd \"if_generation\": N to write only if the stored document is at generation N."
)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Desired-state document (JSON); `-` reads standard input
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Wait until every targeted device has converged; exit 1 if not by the deadline
    #[arg(long)]
    pub wait: bool,
    /// Deadline for --wait, in seconds
    #[arg(long, default_value_t = 120)]
    pub wait_timeout: u64,
    /// Change nothing: show which devices the document would target and,
    /// per key, how many devices would change (refusals as a real apply)
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// What to list: `devices` (the registry) or `documents` (desired state)
    #[arg(value_parser = ["devices", "documents"])]
    pub what: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Only devices of this class
    #[arg(long)]
    pub class: Option<String>,
    /// Only devices with this label (KEY=VALUE, repeatable)
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Only ids starting with this prefix
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Only devices of this owner
    #[arg(long)]
    pub owner: Option<String>,
    /// A selector as in documents (JSON), e.g. '{"class": "streetlight", "labels": {"zone": "north"}}'
    #[arg(long, conflicts_with_all = ["class", "labels", "id_prefix", "owner"])]
    pub selector: Option<String>,
    /// Rows per page fetched from the controller
    #[arg(long, default_value_t = 500)]
    pub page: usize,
    /// Keep watching: after the list, print each device whose row changes
    /// (one JSON object per line with --output json), until Ctrl-C
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch
    #[arg(long, default_value_t = 2.0, requires = "watch", value_parser = parse_interval)]
    pub interval: f64,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    /// What to describe: `device` or `document`
    #[arg(value_parser = ["device", "document"])]
    pub what: String,
    /// Device id or document name
    #[arg(value_name = "NAME")]
    pub device: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Counts for the devices one desired document targets
    #[arg(long)]
    pub name: Option<String>,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

use crate::certs_cmd::parse_label;

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.2..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?}: seconds from 0.2 to 3600")),
    }
}

pub(crate) fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `cityplane delete document NAME`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Delete a desired document. The keys it set leave the desired state of the devices \
it targeted, unless another document sets them (then that document's value is sent). Devices keep \
the values they hold: nothing is sent to undo a setting. Audited."
)]
pub struct DeleteArgs {
    /// What to delete (`document`)
    #[arg(value_parser = ["document"])]
    pub what: String,
    /// Document name
    pub name: String,
    /// Delete only if the stored document is at this generation
    #[arg(long)]
    pub if_generation: Option<u64>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `cityplane devices …`: the registry.
#[derive(clap::Subcommand, Debug)]
pub enum DevicesCommand {
    /// Register devices from a manifest (keys made elsewhere) or set their attributes
    #[command(
        long_about = "Register devices from a provisioning manifest: JSON (an array of \
{\"id\", \"class\", \"labels\": {...}, \"owner\"}) or CSV with a header line \
`id,class,labels,owner` where labels are `key=value;key=value`. A device already registered gets \
the manifest's attributes. Sent in batches; each batch is stored durably and audited before it \
is answered.",
        after_help = "Example:\n  printf 'id,class,labels,owner\\nlamp-0001,streetlight,zone=north;street=elm,lighting-co\\n' > devices.csv\n  cityplane devices register -f devices.csv"
    )]
    Register(RegisterArgs),
    /// Set or remove attributes (class, labels, owner) of devices by id or selector
    #[command(
        after_help = "Examples:\n  cityplane devices label lamp-0001 zone=south\n  cityplane devices label --selector '{\"labels\": {\"zone\": \"north\"}}' street=elm --remove old\n  cityplane devices label cam-0007 --class camera --owner camera-co"
    )]
    Label(LabelArgs),
}

#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    /// Manifest file (.json or .csv); `-` reads JSON from standard input
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Devices per request
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..=2000))]
    pub batch: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct LabelArgs {
    /// Device ids, then KEY=VALUE labels to set (ids have no '=')
    #[arg(value_name = "ID|KEY=VALUE")]
    pub items: Vec<String>,
    /// Instead of ids: the devices a selector picks (JSON, as in documents)
    #[arg(long)]
    pub selector: Option<String>,
    /// Label keys to remove (repeatable)
    #[arg(long = "remove", value_name = "KEY")]
    pub remove: Vec<String>,
    /// Set the class ("" clears it)
    #[arg(long)]
    pub class: Option<String>,
    /// Set the owner ("" clears it)
    #[arg(long)]
    pub owner: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn devices(cmd: DevicesCommand) -> anyhow::Result<()> {
    match cmd {
        DevicesCommand::Register(args) => register(args).await,
        DevicesCommand::Label(args) => label(args).await,
    }
}

/// Reads a manifest: JSON array (or `{"devices": [...]}`) or CSV.
fn read_manifest(path: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if !csv {
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not valid JSON (use a .csv name for CSV)",
                path.display()
            )
        })?;
        let list = match v {
            Value::Array(a) => a,
            Value::Object(mut o) => match o.remove("devices") {
                Some(Value::Array(a)) => a,
                _ => bail!("a JSON manifest is an array of devices or {{\"devices\": [...]}}"),
            },
            _ => bail!("a JSON manifest is an array of devices or {{\"devices\": [...]}}"),
        };
        return Ok(list);
    }
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let header: Vec<String> = match lines.next() {
        Some((_, h)) => h
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .collect(),
        None => return Ok(Vec::new()),
    };
    if header.first().map(String::as_str) != Some("id") {
        bail!("the CSV header must start with id (id,class,labels,owner); got {header:?}");
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() > header.len() {
            bail!(
                "line {}: {} cells, the header has {}",
                n + 1,
                cells.len(),
                header.len()
            );
        }
        let mut device = serde_json::Map::new();
        for (name, cell) in header.iter().zip(&cells) {
            if cell.is_empty() {
                continue;
            }
            match name.as_str() {
                "id" | "class" | "owner" => {
                    device.insert(name.clone(), json!(cell));
                }
                "labels" => {
                    let mut labels = serde_json::Map::new();
                    for pair in cell.split(';').filter(|p| !p.is_empty()) {
                        let (k, v) = parse_label(pair)
                            .map_err(|e| anyhow::anyhow!("line {}: {e}", n + 1))?;
                        labels.insert(k, json!(v));
                    }
                    device.insert("labels".into(), Value::Object(labels));
                }
                other => bail!("unknown CSV column {other:?} (id,class,labels,owner)"),
            }
        }
        out.push(Value::Object(device));
    }
    Ok(out)
}

async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let devices = read_manifest(&args.file)?;
    let mut op = Operator::connect(&args.connect).await?;
    let bar = if args.output == Output::Table && devices.len() > args.batch as usize {
        ProgressBar::new(devices.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    let done = op
        .register(&devices, args.batch as usize, |n| {
            bar.set_position(n as u64)
        })
        .await;
    op.disconnect().await;
    let Registered {
        registered: new,
        updated,
        total,
    } = match done {
        Ok(r) => r,
        Err(e) => {
            bar.abandon();
            return Err(e);
        }
    };
    bar.finish_and_clear();
    let result = json!({"registered": new, "updated": updated, "sent": devices.len(), "registry_total": total});
    if args.output == Output::Json {
        return print_json(&result);
    }
    println!(
        "{} devices sent: {new} registered, {updated} updated; the registry holds {total}",
        devices.len()
    );
    Ok(())
}

async fn label(args: LabelArgs) -> anyhow::Result<()> {
    let (sets, ids): (Vec<&String>, Vec<&String>) =
        args.items.iter().partition(|i| i.contains('='));
    let mut set = serde_json::Map::new();
    for s in sets {
        let (k, v) = parse_label(s).map_err(anyhow::Error::msg)?;
        set.insert(k, json!(v));
    }
    let mut change = json!({"set": set, "remove": args.remove});
    if let Some(c) = &args.class {
        change["class"] = json!(c);
    }
    if let Some(o) = &args.owner {
        change["owner"] = json!(o);
    }
    let mut body = json!({"change": change});
    match (&args.selector, ids.is_empty()) {
        (Some(sel), true) => body["selector"] = parse_selector(sel)?,
        (None, false) => body["ids"] = json!(ids),
        _ => bail!("name device ids or pass --selector (not both)"),
    }
    let mut op = Operator::connect(&args.connect).await?;
    let r = op.query("label", body).await;
    op.disconnect().await;
    let r = r?;
    if args.output == Output::Json {
        return print_json(&r);
    }
    println!("{} devices matched, {} changed", r["matched"], r["changed"]);
    Ok(())
}

pub(crate) fn parse_selector(text: &str) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_str(text)
        .context("--selector is JSON, e.g. '{\"class\": \"streetlight\"}'")?;
    if !v.is_object() {
        bail!("--selector is a JSON object, e.g. '{{\"class\": \"streetlight\"}}'");
    }
    Ok(v)
}

pub async fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let mut body = json!({"name": args.name});
    if let Some(g) = args.if_generation {
        body["if_generation"] = json!(g);
    }
    let mut op = Operator::connect(&args.connect).await?;
    let r = op.query("delete-document", body).await;
    op.disconnect().await;
    let r = r?;
    if args.output == Output::Json {
        return print_json(&r);
    }
    println!(
        "deleted {:?} (generation {}); desired state changed on {} devices",
        args.name, r["generation"], r["devices_changed"]
    );
    Ok(())
}

async fn get_documents(args: &GetArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let r = op.query("get-documents", json!({})).await;
    op.disconnect().await;
    let r = r?;
    if args.output == Output::Json {
        return print_json(&r["documents"]);
    }
    println!(
        "{:<28} {:>8} {:>4} {:>9} {:>9} {:>8} {:>7} {:<12} {:<20} TARGET",
        "NAME",
        "PRIORITY",
        "GEN",
        "TARGETED",
        "CONVERGED",
        "PENDING",
        "FAILED",
        "AUTHOR",
        "UPDATED"
    );
    let docs = r["documents"].as_array().cloned().unwrap_or_default();
    for d in &docs {
        println!(
            "{:<28} {:>8} {:>4} {:>9} {:>9} {:>8} {:>7} {:<12} {:<20} {}",
            d["name"].as_str().unwrap_or(""),
            d["priority"].to_string(),
            d["generation"].to_string(),
            d["targeted"].to_string(),
            d["converged"].to_string(),
            d["pending"].to_string(),
            d["failed"].to_string(),
            d["author"].as_str().unwrap_or(""),
            d["updated"].as_str().unwrap_or(""),
            d["target"]
        );
    }
    println!("{} documents", docs.len());
    Ok(())
}

async fn describe_document(args: &DescribeArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let d = op
        .query("describe-document", json!({"name": args.device}))
        .await;
    op.disconnect().await;
    let d = d?;
    if args.output == Output::Json {
        return print_json(&d);
    }
    println!("Document:   {}", d["name"].as_str().unwrap_or(""));
    println!("Target:     {}", d["target"]);
    println!(
        "Priority:   {}   Generation: {}",
        d["priority"], d["generation"]
    );
    println!("State:      {}", d["state"]);
    println!(
        "Devices:    {} targeted, {} converged, {} pending, {} failed, {} online",
        d["targeted"], d["converged"], d["pending"], d["failed"], d["online"]
    );
    println!("History:");
    for h in d["history"].as_array().into_iter().flatten() {
        println!(
            "  gen {:<4} {:<20} {:<16} priority {} target {}",
            h["generation"].to_string(),
            h["written_at"].as_str().unwrap_or(""),
            h["author"].as_str().unwrap_or(""),
            h["priority"],
            h["target"]
        );
    }
    Ok(())
}

pub async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let doc: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", args.file.display()))?;
    let name = doc["name"]
        .as_str()
        .context("the document needs a \"name\"")?
        .to_owned();
    let mut op = Operator::connect(&args.connect).await?;
    if args.dry_run {
        let r = op.query("dry-run", json!({"document": doc})).await;
        op.disconnect().await;
        let r = r?;
        if args.output == Output::Json {
            return print_json(&r);
        }
        println!(
            "dry run: {name:?} would be generation {}, target {} devices; desired state would change on {}",
            r["generation"], r["devices"], r["changing"]
        );
        for (key, n) in r["keys"].as_object().into_iter().flatten() {
            println!("  {key:<24} {n} devices");
        }
        return Ok(());
    }
    let answer = op
        .request(&cityplane_proto::topics::desired(&name), doc)
        .await
        .map_err(|e| match e.downcast_ref::<Unanswered>() {
            // Not asked again: a write may have been done.
            Some(_) => e.context(format!(
                "apply {name:?} unanswered: it may still be taken up; `cityplane get documents` says whether it was"
            )),
            None => e,
        })?;
    if answer["status"] != "accepted" {
        if args.output == Output::Json {
            print_json(&answer)?;
        }
        bail!(
            "rejected ({}): {}",
            answer["code"].as_str().unwrap_or("?"),
            answer["reason"].as_str().unwrap_or("")
        );
    }
    if args.output == Output::Json && !args.wait {
        print_json(&answer)?;
    } else if args.output == Output::Table {
        println!(
            "accepted {name:?} at generation {} ({} devices targeted now)",
            answer["generation"], answer["devices"]
        );
    }
    if args.wait {
        let status = wait_converged(&mut op, &name, Duration::from_secs(args.wait_timeout)).await;
        op.disconnect().await;
        let status = status?;
        if args.output == Output::Json {
            print_json(&json!({"apply": answer, "status": status}))?;
        }
        let (total, converged, failed) = counts(&status);
        if failed > 0 || converged < total {
            bail!("{converged} of {total} devices converged, {failed} failed (see `cityplane get devices` and `cityplane describe device ID`)");
        }
        if args.output == Output::Table {
            println!("all {total} targeted devices converged");
        }
    } else {
        op.disconnect().await;
    }
    Ok(())
}

fn counts(status: &Value) -> (u64, u64, u64) {
    let n = |k: &str| status[k].as_u64().unwrap_or(0);
    (n("total"), n("converged"), n("failed"))
}

/// Polls the document's status with a progress bar until every targeted
/// device converged or failed, or the deadline passes.
pub async fn wait_converged(
    op: &mut Operator,
    name: &str,
    deadline: Duration,
) -> anyhow::Result<Value> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{spinner} converged {pos}/{len} [{bar:40}] {msg} ({elapsed})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let start = Instant::now();
    let mut last: Option<Value> = None;
    // Set by a lost connection, until the answers are subscribed again: a
    // query on a new clean session before that would never be answered.
    let mut resubscribe = false;
    loop {
        let asked = if resubscribe {
            // The broker may still be away: then this fails as `Lost`
            // again, and the next turn tries again.
            op.resume().await.map(|()| resubscribe = false)
        } else {
            Ok(())
        };
        // A status query changes nothing, so one that went unanswered is
        // asked again: on a loaded cluster an answer can be lost with the
        // connection it was published on, and the fleet converges anyway.
        let asked = match asked {
            Ok(()) => op.query("status", json!({"name": name})).await,
            Err(e) => Err(e),
        };
        match asked {
            Ok(status) => {
                let (total, converged, failed) = counts(&status);
                bar.set_length(total);
                bar.set_position(converged);
                bar.set_message(format!("{failed} failed, {} online", status["online"]));
                if converged + failed >= total && total > 0 {
                    bar.finish();
                    return Ok(status);
                }
                last = Some(status);
            }
            Err(e) => {
                let Some(why) = e.downcast_ref::<Unanswered>() else {
                    return Err(e);
                };
                // Said on stderr, not only in the bar: `--output json`
                // and a pipe hide the bar.
                bar.suspend(|| eprintln!("warning: status: {why}; asking again"));
                resubscribe |= matches!(why, Unanswered::Lost(_));
            }
        }
        if start.elapsed() >= deadline {
            bar.abandon_with_message(format!("deadline of {deadline:?} passed"));
            return last.with_context(|| {
                format!(
                    "the controller answered no status query within the deadline of {deadline:?}"
                )
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    if args.what == "documents" {
        return get_documents(&args).await;
    }
    let mut selector = serde_json::Map::new();
    if let Some(o) = &args.owner {
        selector.insert("owner".into(), json!(o));
    }
    if let Some(text) = &args.selector {
        if let Value::Object(m) = parse_selector(text)? {
            selector = m;
        }
    }
    if let Some(c) = &args.class {
        selector.insert("class".into(), json!(c));
    }
    if !args.labels.is_empty() {
        selector.insert(
            "labels".into(),
            json!(args
                .labels
                .iter()
                .cloned()
                .collect::<std::collections::BTreeMap<_, _>>()),
        );
    }
    if let Some(p) = &args.id_prefix {
        selector.insert("id_prefix".into(), json!(p));
    }
    let mut op = Operator::connect(&args.connect).await?;
    let rows = fetch_devices(&mut op, &selector, args.page).await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            op.disconnect().await;
            return Err(e);
        }
    };
    if !args.watch {
        op.disconnect().await;
        if args.output == Output::Json {
            return print_json(&Value::Array(rows));
        }
        print_device_header();
        for r in &rows {
            print_device_row(r);
        }
        println!("{} devices", rows.len());
        return Ok(());
    }
    // Like `kubectl get -w`: everything once, then a line per device whose
    // row changed (`--output json`: one JSON object per line).
    let mut last: std::collections::BTreeMap<String, Value> = std::collections::BTreeMap::new();
    let interval = Duration::from_millis((args.interval * 1000.0) as u64);
    if args.output == Output::Table {
        print_device_header();
    }
    let mut rows = rows;
    loop {
        for r in rows {
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            if last.get(&id) != Some(&r) {
                if args.output == Output::Json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    print_device_row(&r);
                }
                last.insert(id, r);
            }
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(interval) => {}
        }
        rows = fetch_devices(&mut op, &selector, args.page).await?;
    }
    op.disconnect().await;
    Ok(())
}

/// Every device the selector picks, page by page.
async fn fetch_devices(
    op: &mut Operator,
    selector: &serde_json::Map<String, Value>,
    page: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut rows = Vec::new();
    loop {
        let mut q = json!({"offset": rows.len(), "limit": page});
        if !selector.is_empty() {
            q["selector"] = Value::Object(selector.clone());
        }
        let page = op.query("get-devices", q).await?;
        let batch = page["devices"].as_array().cloned().unwrap_or_default();
        let total = page["total"].as_u64().unwrap_or(0) as usize;
        let empty = batch.is_empty();
        rows.extend(batch);
        if rows.len() >= total || empty {
            return Ok(rows);
        }
    }
}

fn print_device_header() {
    println!(
        "{:<20} {:<12} {:<24} {:<7} {:<10} {:<11} LAST-SEEN",
        "ID", "CLASS", "LABELS", "ONLINE", "CONVERGED", "GENERATION"
    );
}

fn print_device_row(r: &Value) {
    let converged = if r["revoked"] == true {
        "revoked".to_owned()
    } else if r["failed"] == true {
        "failed".to_owned()
    } else {
        yes(&r["converged"])
    };
    let labels: Vec<String> = r["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    println!(
        "{:<20} {:<12} {:<24} {:<7} {:<10} {:<11} {}",
        r["id"].as_str().unwrap_or(""),
        r["class"].as_str().unwrap_or("-"),
        if labels.is_empty() {
            "-".to_owned()
        } else {
            labels.join(",")
        },
        yes(&r["online"]),
        converged,
        r["generation"].to_string(),
        r["last_seen"].as_str().unwrap_or("")
    );
}

fn yes(v: &Value) -> String {
    if v == true { "yes" } else { "no" }.to_owned()
}

pub async fn describe(args: DescribeArgs) -> anyhow::Result<()> {
    if args.what == "document" {
        return describe_document(&args).await;
    }
    let mut op = Operator::connect(&args.connect).await?;
    let d = op.query("describe", json!({"id": args.device})).await?;
    op.disconnect().await;
    if args.output == Output::Json {
        return print_json(&d);
    }
    println!("Device:     {}", d["id"].as_str().unwrap_or(""));
    println!("Class:      {}", d["class"].as_str().unwrap_or("-"));
    println!("Labels:     {}", d["labels"]);
    println!("Owner:      {}", d["owner"].as_str().unwrap_or("-"));
    println!(
        "Registered: {} by {}{}",
        d["registered"].as_str().unwrap_or(""),
        d["registered_by"].as_str().unwrap_or(""),
        if d["revoked"] == true {
            "   REVOKED"
        } else {
            ""
        }
    );
    println!(
        "Online:     {}   Last seen: {}",
        yes(&d["online"]),
        d["last_seen"].as_str().unwrap_or("-")
    );
    println!(
        "Converged:  {}   Desired generation: {}   Reported version: {}",
        yes(&d["converged"]),
        d["desired_generation"],
        d["reported_version"]
    );
    match d["violations"].as_object() {
        Some(v) if !v.is_empty() => {
            println!("Violations: (of the security policy; cityplane compliance)");
            for (rule, why) in v {
                println!(
                    "  {rule:<28} since {}  {}",
                    why["since"].as_str().unwrap_or(""),
                    why["reason"].as_str().unwrap_or("")
                );
            }
        }
        _ => {}
    }
    if let Some(f) = d["failed"].as_str() {
        println!("Failed:     {f}");
    }
    println!("Desired:    {}", d["desired"]);
    match &d["reported"] {
        Value::Null => println!("Reported:   (none yet)"),
        r => println!("Reported:   {r}"),
    }
    println!("Delta:      {}", d["delta"]);
    println!("Conditions:");
    for c in d["conditions"].as_array().into_iter().flatten() {
        println!(
            "  {:<10} {:<6} {:<16} {} {}",
            c["type"].as_str().unwrap_or(""),
            c["status"].as_str().unwrap_or(""),
            c["reason"].as_str().unwrap_or(""),
            c["last_transition_time"].as_str().unwrap_or(""),
            c["message"].as_str().unwrap_or("")
        );
    }
    println!("Recent commands:");
    for c in d["recent_commands"].as_array().into_iter().flatten() {
        println!(
            "  {} gen {} {}",
            c["id"].as_str().unwrap_or(""),
            c["generation"],
            c["event"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let mut q = json!({});
    if let Some(n) = &args.name {
        q["name"] = json!(n);
    }
    let s = op.query("status", q).await?;
    op.disconnect().await;
    if args.output == Output::Json {
        return print_json(&s);
    }
    println!(
        "{:<8} {:<8} {:<10} {:<8} {:<7} DRIFTED",
        "TOTAL", "ONLINE", "CONVERGED", "PENDING", "FAILED"
    );
    let n = |k: &str| s[k].to_string();
    println!(
        "{:<8} {:<8} {:<10} {:<8} {:<7} {}",
        n("total"),
        n("online"),
        n("converged"),
        n("pending"),
        n("failed"),
        n("drifted")
    );
    if let Some(holder) = s["controller"]["holder"].as_str() {
        let shards = &s["controller"]["shards"];
        let role = if shards.is_object() {
            "leading controller"
        } else {
            "acting controller"
        };
        println!(
            "{role}: {holder} (lease generation {})",
            s["controller"]["lease_generation"]
        );
        if let Some(held) = shards["held"].as_object() {
            println!(
                "shards: {} over {} controllers",
                shards["count"],
                held.len()
            );
            for (member, list) in held {
                let list: Vec<String> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(Value::to_string)
                    .collect();
                println!("  {member}: {}", list.join(","));
            }
        }
    }
    Ok(())
}
