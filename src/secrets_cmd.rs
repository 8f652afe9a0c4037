//! `cityplane secrets …`: server-generated device secrets (admin passwords,
//! API secrets). `rotate` is a rollout whose change is a new secret per
//! device; `list` shows fingerprints and rotation times, never a secret.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use cityplane::client::{ConnectArgs, Operator};

use crate::ops_cmd::{parse_selector, Output};

const ROTATE_HELP: &str =
    "Each device gets a new random secret of its own, made by the server, sealed at rest with
the server's secrets key (serve --secrets-key), and sent only on that device's own commands
topic. Desired and reported state, describe, rollout status, the audit log and this tool show
only its fingerprint and rotation time. The rotation is a rollout: waves, gates, pause, abort.
Aborting it (with rollback, the default here) gives every device it reached its previous secret
back.

Examples:
  cityplane secrets rotate --name admin_password --selector '{\"class\": \"streetlight\"}'
  cityplane secrets rotate --name admin_password --ids lamp-0001 lamp-0002 --waves 1,100% --watch
  cityplane rollout status rotate-admin-password-1764529200
  cityplane rollout abort rotate-admin-password-1764529200 --reason 'wrong key'   # rolls back
  cityplane secrets list --selector '{\"labels\": {\"zone\": \"north\"}}'";

/// `cityplane secrets …`.
#[derive(clap::Subcommand, Debug)]
pub enum SecretsCommand {
    /// Rotate a secret-valued key on the devices a selector or ids pick, as a rollout
    #[command(after_help = ROTATE_HELP)]
    Rotate(RotateArgs),
    /// Per device and key: the fingerprint and rotation time desired and reported (no secrets)
    #[command(
        after_help = "Examples:\n  cityplane secrets list\n  cityplane secrets list --selector '{\"class\": \"camera\"}' --output json"
    )]
    List(ListArgs),
}

#[derive(clap::Args, Debug)]
pub struct RotateArgs {
    /// The state key that holds the secret, e.g. admin_password
    #[arg(long)]
    pub name: String,
    /// The devices a selector picks (JSON, as in documents)
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    pub selector: Option<String>,
    /// These devices
    #[arg(long, num_args = 1..)]
    pub ids: Vec<String>,
    /// Wave sizes in order, each a count or a percentage of the devices
    /// targeted: `1,10%,100%`; the last wave takes every device left
    #[arg(long, value_delimiter = ',', default_value = "10%,100%")]
    pub waves: Vec<String>,
    /// The rollout's name (default: rotate-<key>-<unix time>)
    #[arg(long)]
    pub rollout: Option<String>,
    /// On abort, leave devices on their new secret instead of giving the old one back
    #[arg(long)]
    pub no_rollback: bool,
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
    /// Only the devices a selector picks (JSON, as in documents)
    #[arg(long)]
    pub selector: Option<String>,
    /// Rows per page fetched from the controller
    #[arg(long, default_value_t = 500)]
    pub page: usize,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(cmd: SecretsCommand) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::Rotate(a) => rotate(a).await,
        SecretsCommand::List(a) => list(a).await,
    }
}

/// `10%` → `{"percent": 10}`, `5` → `{"count": 5}`.
fn wave(text: &str) -> anyhow::Result<Value> {
    let t = text.trim();
    if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .with_context(|| format!("wave {t:?}: a percentage like 10%"))?;
        return Ok(json!({"percent": p}));
    }
    let n: u64 = t
        .parse()
        .with_context(|| format!("wave {t:?}: a device count or a percentage like 10%"))?;
    Ok(json!({"count": n}))
}

/// A rollout name from a key: ids allow `[a-z0-9._-]`.
fn default_name(key: &str) -> String {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let key: String = key
        .chars()
        .map(|c| if c == '_' { '-' } else { c })
        .take(40)
        .collect();
    format!("rotate-{key}-{at}")
}

fn spec(args: &RotateArgs) -> anyhow::Result<Value> {
    let target = match (&args.selector, args.ids.is_empty()) {
        (Some(sel), true) => parse_selector(sel)?,
        (None, false) => json!({"ids": args.ids}),
        _ => bail!("pass --selector or --ids (one of them)"),
    };
    let waves = args
        .waves
        .iter()
        .map(|w| wave(w))
        .collect::<anyhow::Result<Vec<Value>>>()?;
    Ok(json!({
        "name": args.rollout.clone().unwrap_or_else(|| default_name(&args.name)),
        "target": target,
        "secret": args.name,
        "waves": waves,
        "rollback": !args.no_rollback,
    }))
}

async fn rotate(args: RotateArgs) -> anyhow::Result<()> {
    let spec = spec(&args)?;
    let mut op = Operator::connect(&args.connect).await?;
    let outcome = match op.query("rollout-create", spec).await {
        Ok(r) => {
            match args.output {
                Output::Json if !args.watch => println!("{}", serde_json::to_string_pretty(&r)?),
                Output::Json => {}
                Output::Table => println!(
                    "rotating {} on {} devices: rollout {} (waves of {}); follow it with `cityplane rollout status {}`",
                    args.name,
                    r["devices"],
                    r["name"].as_str().unwrap_or(""),
                    r["waves"],
                    r["name"].as_str().unwrap_or("")
                ),
            }
            if args.watch {
                let name = r["name"].as_str().unwrap_or_default().to_owned();
                crate::rollout_cmd::status(&mut op, &name, true, 1.0, args.output).await
            } else {
                Ok(())
            }
        }
        Err(e) => Err(e.context("the rotation was refused; nothing was changed")),
    };
    op.disconnect().await;
    outcome
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut q = json!({});
    if let Some(sel) = &args.selector {
        q["selector"] = parse_selector(sel)?;
    }
    let mut op = Operator::connect(&args.connect).await?;
    let mut rows: Vec<Value> = Vec::new();
    let fetched = async {
        loop {
            q["offset"] = json!(rows.len());
            q["limit"] = json!(args.page.clamp(1, 2000));
            let r = op.query("get-secrets", q.clone()).await?;
            let page = r["secrets"].as_array().cloned().unwrap_or_default();
            let total = r["total"].as_u64().unwrap_or(0) as usize;
            let empty = page.is_empty();
            rows.extend(page);
            if empty || rows.len() >= total {
                return anyhow::Ok(());
            }
        }
    }
    .await;
    op.disconnect().await;
    fetched?;
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({"total": rows.len(), "secrets": rows}))?
        ),
        Output::Table => {
            println!(
                "{:<24} {:<20} {:<17} {:<21} {:<17} CONVERGED",
                "DEVICE", "KEY", "DESIRED", "ROTATED AT", "REPORTED"
            );
            let fp = |v: &Value| v["fingerprint"].as_str().unwrap_or("-").to_owned();
            for r in &rows {
                println!(
                    "{:<24} {:<20} {:<17} {:<21} {:<17} {}",
                    r["id"].as_str().unwrap_or(""),
                    r["key"].as_str().unwrap_or(""),
                    fp(&r["desired"]),
                    r["desired"]["rotated_at"].as_str().unwrap_or("-"),
                    fp(&r["reported"]),
                    if r["converged"].as_bool() == Some(true) {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
        }
    }
    Ok(())
}
