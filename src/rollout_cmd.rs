//! `cityplane rollout …` and `cityplane firmware publish`: bulk changes in
//! waves, and the releases they install.

use std::io::{IsTerminal, Read};

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use cityplane::client::{ConnectArgs, Operator};
use cityplane_proto::firmware::{ReleaseManifest, SignedRelease};

use crate::ops_cmd::Output;

const SPEC_HELP: &str = "FILE is JSON, for example:
  {\"name\": \"lamps-2-0\", \"target\": {\"class\": \"streetlight\"}, \"firmware\": \"2.0.0\",
   \"waves\": [{\"count\": 5}, {\"percent\": 10}, {\"percent\": 100}],
   \"success_threshold\": 95,
   \"health\": {\"soak_s\": 60, \"rules\": [{\"key\": \"healthy\", \"op\": \"==\", \"value\": true}],
              \"max_reboots\": 2},
   \"abort\": [{\"failure\": \"any\", \"threshold_percent\": 10, \"min_executed\": 20}],
   \"rollback\": true,
   \"window\": {\"start\": \"01:00\", \"end\": \"04:00\", \"tz\": \"Europe/Paris\"}, \"jitter_s\": 600,
   \"rate\": {\"per_minute\": 50, \"increase_factor\": 2, \"every_succeeded\": 100, \"max_per_minute\": 1000}}
\"firmware\" names a published release (cityplane firmware publish); \"state\" is a configuration
change (keys as in a desired document). A rollout has one or both, or instead
\"secret\": \"admin_password\", a new server-made secret per device (cityplane secrets rotate). Waves are spread over the
\"zone\" label (\"spread_by\"); the last wave takes every device left. A wave moves on when
\"success_threshold\"% of it succeeded and its updated devices stayed healthy for soak_s seconds
(online, fewer than max_reboots reconnects, every rule true on their reported state); a failed
health gate halts the rollout. An abort rule that holds aborts it, and with \"rollback\" every
device it reached gets its previous value back. Devices that join the target while it runs are
included. \"rate\" caps how many devices start a minute, growing while they succeed.";

/// `cityplane rollout …`.
#[derive(clap::Subcommand, Debug)]
pub enum RolloutCommand {
    /// Start a rollout from a JSON spec (validated; refused with the reason)
    #[command(after_help = SPEC_HELP)]
    Create(CreateArgs),
    /// Every rollout, newest first
    List(ListArgs),
    /// A rollout's waves, counts per device status, health gate and what it waits for
    Status(StatusArgs),
    /// Stop admitting devices (those already started go on)
    Pause(ControlArgs),
    /// Go on after a pause, or after a halted health gate (the wave soaks again)
    Resume(ControlArgs),
    /// End it: queued devices are cancelled; with "rollback", devices reached get their previous value back
    Abort(ControlArgs),
    /// One row per device (status, wave, reason), e.g. --status failed
    Devices(DevicesArgs),
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Rollout spec (JSON); `-` reads standard input
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Then follow it live until it ends (exit 1 unless it completes)
    #[arg(short = 'w', long)]
    pub watch: bool,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Rollout name
    pub name: String,
    /// Follow it live (a progress bar per wave) until it ends; exit 1 unless it completes.
    /// With --output json: one JSON object per refresh
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Seconds between refreshes with --watch
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ControlArgs {
    /// Rollout name
    pub name: String,
    /// Why (kept in the rollout's history and the audit log)
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct DevicesArgs {
    /// Rollout name
    pub name: String,
    /// Only devices with this status (queued, notified, downloading, installing, rebooting,
    /// verifying, succeeded, skipped, offline, failed, rolling_back, rolled_back,
    /// rollback_failed, cancelled)
    #[arg(long)]
    pub status: Option<String>,
    /// Rows per page fetched from the controller
    #[arg(long, default_value_t = 500)]
    pub page: usize,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(cmd: RolloutCommand) -> anyhow::Result<()> {
    match cmd {
        RolloutCommand::Create(a) => create(a).await,
        RolloutCommand::List(a) => list(a).await,
        RolloutCommand::Status(a) => {
            let mut op = Operator::connect(&a.connect).await?;
            let result = status(&mut op, &a.name, a.watch, a.interval, a.output).await;
            op.disconnect().await;
            result
        }
        RolloutCommand::Pause(a) => control("rollout-pause", a).await,
        RolloutCommand::Resume(a) => control("rollout-resume", a).await,
        RolloutCommand::Abort(a) => control("rollout-abort", a).await,
        RolloutCommand::Devices(a) => devices(a).await,
    }
}

fn read_json(path: &PathBuf) -> anyhow::Result<Value> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

async fn create(args: CreateArgs) -> anyhow::Result<()> {
    let spec = read_json(&args.file)?;
    if !spec.is_object() {
        bail!(
            "{} must hold a JSON object (see --help)",
            args.file.display()
        );
    }
    let mut op = Operator::connect(&args.connect).await?;
    let result = op.query("rollout-create", spec).await;
    let outcome = match result {
        Ok(r) => {
            match args.output {
                Output::Json if !args.watch => println!("{}", serde_json::to_string_pretty(&r)?),
                Output::Json => {}
                Output::Table => println!(
                    "rollout {} created: {} devices in waves of {}",
                    r["name"].as_str().unwrap_or(""),
                    r["devices"],
                    r["waves"]
                ),
            }
            if args.watch {
                let name = r["name"].as_str().unwrap_or_default().to_owned();
                status(&mut op, &name, true, 1.0, args.output).await
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e.context("the rollout was refused; nothing was changed")),
    };
    op.disconnect().await;
    outcome
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let r = op.query("get-rollouts", json!({})).await;
    op.disconnect().await;
    let r = r?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let rows = r["rollouts"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no rollouts (create one with `cityplane rollout create -f rollout.json`)");
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<8} {:<10} {:>8} {:>10} {:>7}  CREATED",
        "NAME", "PHASE", "WAVE", "FIRMWARE", "DEVICES", "SUCCEEDED", "FAILED"
    );
    for row in rows {
        let c = &row["counts"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        println!(
            "{:<24} {:<10} {:<8} {:<10} {:>8} {:>10} {:>7}  {}",
            row["name"].as_str().unwrap_or(""),
            row["phase"].as_str().unwrap_or(""),
            format!("{}/{}", row["wave"], row["waves"]),
            row["firmware"].as_str().unwrap_or("-"),
            row["devices"].as_u64().unwrap_or(0),
            n("succeeded") + n("skipped"),
            n("failed") + n("rollback_failed"),
            row["created"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

async fn control(verb: &str, args: ControlArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let r = op
        .query(verb, json!({"name": args.name, "reason": args.reason}))
        .await;
    op.disconnect().await;
    let r = r?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Table => println!(
            "rollout {} is now {}",
            args.name,
            r["phase"].as_str().unwrap_or("?")
        ),
    }
    Ok(())
}

async fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let mut rows = Vec::new();
    let mut offset = 0;
    let result = loop {
        let r = op
            .query(
                "rollout-devices",
                json!({"name": args.name, "status": args.status, "offset": offset, "limit": args.page}),
            )
            .await;
        match r {
            Ok(r) => {
                let page = r["devices"].as_array().cloned().unwrap_or_default();
                let total = r["total"].as_u64().unwrap_or(0) as usize;
                offset += page.len();
                rows.extend(page);
                if offset >= total || rows.is_empty() {
                    break Ok(total);
                }
            }
            Err(e) => break Err(e),
        }
    };
    op.disconnect().await;
    let total = result?;
    if args.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"total": total, "devices": rows}))?
        );
        return Ok(());
    }
    println!(
        "{:<20} {:>4} {:<16} {:<8} {:<10} REASON",
        "ID", "WAVE", "STATUS", "ZONE", "FIRMWARE"
    );
    for r in &rows {
        println!(
            "{:<20} {:>4} {:<16} {:<8} {:<10} {}",
            r["id"].as_str().unwrap_or(""),
            r["wave"].as_u64().unwrap_or(0),
            r["status"].as_str().unwrap_or(""),
            r["zone"].as_str().unwrap_or("-"),
            r["firmware"].as_str().unwrap_or("-"),
            r["reason"].as_str().unwrap_or("")
        );
    }
    println!("{total} devices");
    Ok(())
}

/// Counts of one wave or the whole rollout, biggest first, as `a 3, b 2`.
fn counts_line(c: &Value) -> String {
    let mut v: Vec<(String, u64)> = c
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn done_of(c: &Value) -> u64 {
    ["succeeded", "skipped"]
        .iter()
        .map(|k| c[*k].as_u64().unwrap_or(0))
        .sum()
}

/// The status as text (what a terminal shows without --watch, and under the bars).
fn summary_lines(s: &Value) -> Vec<String> {
    let mut out = vec![format!(
        "rollout {} ({}) {} — wave {} of {}, {} devices",
        s["name"].as_str().unwrap_or(""),
        match s["firmware"].as_str() {
            Some(fw) => format!("firmware {fw}"),
            None => format!("keys {}", s["keys"]),
        },
        s["phase"].as_str().unwrap_or(""),
        s["wave"],
        s["waves"],
        s["devices"]
    )];
    out.push(format!("  devices: {}", counts_line(&s["totals"])));
    let h = &s["health"];
    out.push(format!(
        "  health: {} updated, {} unhealthy; soak {} s; rules: {}",
        h["checked"],
        h["unhealthy"],
        h["soak_s"],
        h["rules"]
            .as_array()
            .map(|r| r
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "online, no reboot loop".into())
    ));
    for e in h["examples"].as_array().into_iter().flatten() {
        out.push(format!(
            "    unhealthy {}: {}",
            e["id"].as_str().unwrap_or(""),
            e["why"].as_str().unwrap_or("")
        ));
    }
    for f in s["failures"].as_array().into_iter().flatten().take(5) {
        out.push(format!(
            "    failed {}: {}",
            f["id"].as_str().unwrap_or(""),
            f["reason"].as_str().unwrap_or("")
        ));
    }
    if let Some(w) = s["window"].as_str() {
        out.push(format!("  window: {w}"));
    }
    let waiting = s["waiting"].as_str().unwrap_or("");
    if !waiting.is_empty() {
        out.push(format!(
            "  {}: {waiting}",
            if s["phase"] == "active" {
                "waiting"
            } else {
                "why"
            }
        ));
    }
    out
}

fn print_waves(s: &Value) {
    for w in s["wave_rows"].as_array().into_iter().flatten() {
        println!(
            "  wave {:<3} {:>6}/{:<6} {:<12} {}",
            w["wave"].as_u64().unwrap_or(0),
            done_of(&w["counts"]),
            w["devices"].as_u64().unwrap_or(0),
            w["state"].as_str().unwrap_or(""),
            counts_line(&w["counts"])
        );
    }
}

/// Shows a rollout once, or follows it until it ends.
pub async fn status(
    op: &mut Operator,
    name: &str,
    watch: bool,
    interval: f64,
    output: Output,
) -> anyhow::Result<()> {
    status_until(op, name, watch, interval, output, None).await
}

/// [`status`], giving up (with an error) once `deadline` has passed.
pub async fn status_until(
    op: &mut Operator,
    name: &str,
    watch: bool,
    interval: f64,
    output: Output,
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<()> {
    let every = Duration::from_secs_f64(interval.clamp(0.2, 3600.0));
    let live = watch && output == Output::Table && std::io::stdout().is_terminal();
    let multi = MultiProgress::new();
    let mut bars: Vec<ProgressBar> = Vec::new();
    let footer = ProgressBar::new_spinner();
    let mut last_line: Option<String> = None;
    loop {
        let s = op.query("rollout-status", json!({"name": name})).await?;
        let phase = s["phase"].as_str().unwrap_or("").to_owned();
        let ended = !matches!(phase.as_str(), "active" | "paused");
        match output {
            Output::Json => println!("{}", serde_json::to_string(&s)?),
            Output::Table if live => {
                let waves = s["wave_rows"].as_array().cloned().unwrap_or_default();
                if bars.is_empty() {
                    let style = ProgressStyle::with_template(
                        "  wave {prefix:<3} [{bar:30}] {pos:>6}/{len:<6} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
                    for w in &waves {
                        let b = multi.add(ProgressBar::new(0).with_style(style.clone()));
                        b.set_prefix(w["wave"].to_string());
                        bars.push(b);
                    }
                    multi.add(footer.clone());
                }
                for (b, w) in bars.iter().zip(&waves) {
                    b.set_length(w["devices"].as_u64().unwrap_or(0));
                    b.set_position(done_of(&w["counts"]));
                    b.set_message(format!(
                        "{} {}",
                        w["state"].as_str().unwrap_or(""),
                        counts_line(&w["counts"])
                    ));
                }
                footer.set_message(summary_lines(&s).join("\n"));
            }
            Output::Table if watch => {
                // Not a terminal (a log, a pipe): a line when something changed.
                let line = format!(
                    "{} wave {}/{}: {}{}",
                    phase,
                    s["wave"],
                    s["waves"],
                    counts_line(&s["totals"]),
                    s["waiting"]
                        .as_str()
                        .filter(|w| !w.is_empty() && !w.contains(" s left"))
                        .map(|w| format!(" ({w})"))
                        .unwrap_or_default()
                );
                if last_line.as_deref() != Some(line.as_str()) {
                    println!("{line}");
                    last_line = Some(line);
                }
            }
            Output::Table => {
                let lines = summary_lines(&s);
                println!("{}", lines[0]);
                print_waves(&s);
                for l in &lines[1..] {
                    println!("{l}");
                }
            }
        }
        if !watch {
            return Ok(());
        }
        if ended {
            for b in &bars {
                b.finish();
            }
            footer.finish();
            if phase == "completed" {
                return Ok(());
            }
            bail!(
                "rollout {name} is {phase}: {}",
                s["reason"].as_str().unwrap_or("")
            );
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            for b in &bars {
                b.abandon();
            }
            footer.abandon();
            bail!("rollout {name} is still {phase} at the deadline");
        }
        tokio::time::sleep(every).await;
    }
}

/// `cityplane firmware publish`.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Upload a signed release and its image to the server, which stores the image \
(checked against the manifest's size and SHA-256) and serves it to devices in chunks over their \
own mTLS connections. The server does not need the release key: devices verify the signature.",
    after_help = "Example:\n  cityplane firmware sign lamp-2.0.0.bin --version 2.0.0 --model 'LumiNode SL-200'\n  cityplane firmware publish lamp-2.0.0.bin.release.json --image lamp-2.0.0.bin"
)]
pub struct PublishArgs {
    /// The signed release (from `cityplane firmware sign`)
    pub release: PathBuf,
    /// The image file the release describes
    #[arg(long)]
    pub image: PathBuf,
    /// Image bytes per request
    #[arg(long, default_value_t = 32 * 1024, value_parser = clap::value_parser!(u64).range(1024..=40_000))]
    pub chunk: u64,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let release: SignedRelease = serde_json::from_value(read_json(&args.release)?)
        .with_context(|| format!("{} is not a signed release", args.release.display()))?;
    let manifest: ReleaseManifest = serde_json::from_str(&release.manifest)
        .with_context(|| format!("the manifest in {} is not valid", args.release.display()))?;
    let size = std::fs::metadata(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?
        .len();
    if size != manifest.size {
        bail!(
            "{} is {size} bytes but the release says {}: is it the image that was signed?",
            args.image.display(),
            manifest.size
        );
    }
    let mut op = Operator::connect(&args.connect).await?;
    let bar = if args.output == Output::Table && std::io::stderr().is_terminal() {
        ProgressBar::new(size).with_style(
            ProgressStyle::with_template(
                "{spinner} uploading [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        )
    } else {
        ProgressBar::hidden()
    };
    let result = op
        .publish_release(&release, &args.image, args.chunk as usize, |n| {
            bar.set_position(n)
        })
        .await;
    bar.finish_and_clear();
    op.disconnect().await;
    let r = result?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&r)?),
        Output::Table if r["already_published"] == true => {
            println!("release {} was already published (image {})", r["version"].as_str().unwrap_or(""), r["sha256"].as_str().unwrap_or(""))
        }
        Output::Table => println!(
            "published release {} ({} bytes, sha256 {}); roll it out with `cityplane rollout create`",
            r["version"].as_str().unwrap_or(""),
            r["size"],
            r["sha256"].as_str().unwrap_or("")
        ),
    }
    Ok(())
}

/// `cityplane firmware list`.
#[derive(clap::Args, Debug)]
pub struct ReleasesArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn releases(args: ReleasesArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&args.connect).await?;
    let r = op.query("get-releases", json!({})).await;
    op.disconnect().await;
    let r = r?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let rows = r["releases"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no releases (sign one with `cityplane firmware sign`, then `cityplane firmware publish`)");
        return Ok(());
    }
    println!(
        "{:<12} {:>10}  {:<16} {:<24} MODELS",
        "VERSION", "BYTES", "SHA256", "PUBLISHED"
    );
    for row in rows {
        println!(
            "{:<12} {:>10}  {:<16} {:<24} {}",
            row["version"].as_str().unwrap_or(""),
            row["size"].as_u64().unwrap_or(0),
            row["sha256"].as_str().unwrap_or("").get(..16).unwrap_or(""),
            row["published"].as_str().unwrap_or(""),
            row["models"]
                .as_array()
                .map(|m| m
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
    }
    Ok(())
}
