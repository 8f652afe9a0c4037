//! Operator verbs that talk to a running server over MQTT.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use cityplane::client::{ConnectArgs, Operator};

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
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// What to list (only `devices` today)
    #[arg(value_parser = ["devices"])]
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
    /// Rows per page fetched from the controller
    #[arg(long, default_value_t = 500)]
    pub page: usize,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    /// What to describe (only `device` today)
    #[arg(value_parser = ["device"])]
    pub what: String,
    /// Device id
    #[arg(value_name = "DEVICE")]
    pub device: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
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
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// How many of the newest entries
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} must be KEY=VALUE"))
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
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
    let answer = op
        .request(&cityplane_proto::topics::desired(&name), doc)
        .await?;
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
    loop {
        let status = op.query("status", json!({"name": name})).await?;
        let (total, converged, failed) = counts(&status);
        bar.set_length(total);
        bar.set_position(converged);
        bar.set_message(format!("{failed} failed, {} online", status["online"]));
        if converged + failed >= total && total > 0 {
            bar.finish();
            return Ok(status);
        }
        if start.elapsed() >= deadline {
            bar.abandon_with_message(format!("deadline of {deadline:?} passed"));
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let mut selector = serde_json::Map::new();
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
    let mut rows = Vec::new();
    loop {
        let mut q = json!({"offset": rows.len(), "limit": args.page});
        if !selector.is_empty() {
            q["selector"] = Value::Object(selector.clone());
        }
        let page = op.query("get-devices", q).await?;
        let batch = page["devices"].as_array().cloned().unwrap_or_default();
        let total = page["total"].as_u64().unwrap_or(0) as usize;
        let empty = batch.is_empty();
        rows.extend(batch);
        if rows.len() >= total || empty {
            break;
        }
    }
    op.disconnect().await;
    if args.output == Output::Json {
        return print_json(&Value::Array(rows));
    }
    println!(
        "{:<20} {:<12} {:<7} {:<10} {:<11} LAST-SEEN",
        "ID", "CLASS", "ONLINE", "CONVERGED", "GENERATION"
    );
    for r in &rows {
        let converged = if r["failed"] == true {
            "failed".to_owned()
        } else {
            yes(&r["converged"])
        };
        println!(
            "{:<20} {:<12} {:<7} {:<10} {:<11} {}",
            r["id"].as_str().unwrap_or(""),
            r["class"].as_str().unwrap_or("-"),
            yes(&r["online"]),
            converged,
            r["generation"].to_string(),
            r["last_seen"].as_str().unwrap_or("")
        );
    }
    println!("{} devices", rows.len());
    Ok(())
}

fn yes(v: &Value) -> String {
    if v == true { "yes" } else { "no" }.to_owned()
}

pub async fn describe(args: DescribeArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let d = op.query("describe", json!({"id": args.device})).await?;
    op.disconnect().await;
    if args.output == Output::Json {
        return print_json(&d);
    }
    println!("Device:     {}", d["id"].as_str().unwrap_or(""));
    println!("Class:      {}", d["class"].as_str().unwrap_or("-"));
    println!("Labels:     {}", d["labels"]);
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
    if let Some(f) = d["failed"].as_str() {
        println!("Failed:     {f}");
    }
    println!("Desired:    {}", d["desired"]);
    println!("Reported:   {}", d["reported"]);
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
    Ok(())
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let a = op.query("audit", json!({"limit": args.limit})).await?;
    op.disconnect().await;
    if args.output == Output::Json {
        return print_json(&a["entries"]);
    }
    println!(
        "{:<6} {:<22} {:<16} {:<8} {:<20} RESULT",
        "SEQ", "AT", "WHO", "ACTION", "NAME"
    );
    for e in a["entries"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<22} {:<16} {:<8} {:<20} {}",
            e["seq"].to_string(),
            e["at"].as_str().unwrap_or(""),
            e["who"].as_str().unwrap_or(""),
            e["action"].as_str().unwrap_or(""),
            e["name"].as_str().unwrap_or(""),
            e["result"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
