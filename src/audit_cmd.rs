//! `cityplane audit`: the audit log of operator writes, filtered; `audit
//! verify` walks its hash chain (on the server, or an export offline);
//! `audit export` writes it whole, signed, for an external auditor.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use cityplane::client::{ConnectArgs, Operator};
use cityplane_certs::policy::POLICY_KEY;
use cityplane_certs::signing;
use cityplane_controller::audit::{verify, Head};
use cityplane_controller::model::AuditEntry;

use crate::ops_cmd::Output;

const FORMAT: &str = "cityplane-audit/1";

const HELP: &str = "Every entry carries the hash of the one before it: `audit verify` names the \
first entry that was changed, removed or moved. The head (last sequence and hash) is retained \
on fleet/audit/head.

Examples:
  cityplane audit --limit 20
  cityplane audit --who lc-ops --action rollout-create --since 2026-11-01T00:00:00Z
  cityplane audit --org lighting-co --name lamp-0007
  cityplane audit verify                                   # the server's whole log
  cityplane audit export --out audit.json --key ./policy-key/policy.key
  cityplane audit verify --file audit.json --key ./policy-key/policy.pub   # offline";

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, after_help = HELP)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub cmd: Option<AuditCommand>,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk the hash chain: the server's whole log, or an export (--file) offline
    Verify(VerifyArgs),
    /// Write the whole log with its head, signed with --key, for an auditor
    Export(ExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// How many of the newest (matching) entries
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Only entries by this operator id
    #[arg(long)]
    pub who: Option<String>,
    /// Only entries of this organisation (a contractor reads its own only)
    #[arg(long)]
    pub org: Option<String>,
    /// Only this action: apply, delete, register, label, rollout-create, policy-apply, …
    #[arg(long)]
    pub action: Option<String>,
    /// Only entries naming this (a device, document, rollout or organisation)
    #[arg(long)]
    pub name: Option<String>,
    /// Only entries about this device (by name, or among an incident's devices)
    #[arg(long)]
    pub device: Option<String>,
    /// Only entries at or after this time (RFC 3339)
    #[arg(long)]
    pub since: Option<String>,
    /// Only entries before this time (RFC 3339)
    #[arg(long)]
    pub until: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// An export to verify offline (without it: the server's log)
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The public key the export was signed with (policy.pub)
    #[arg(long, requires = "file")]
    pub key: Option<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Where to write the export (JSON)
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Sign the head with this Ed25519 key (the city's policy.key)
    #[arg(long, visible_alias = "signed", value_name = "KEY")]
    pub key: Option<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    match args.cmd {
        None => show(args.show).await,
        Some(AuditCommand::Verify(a)) => match &a.file {
            Some(file) => verify_file(file, a.key.as_ref(), a.output),
            None => verify_server(a).await,
        },
        Some(AuditCommand::Export(a)) => export(a).await,
    }
}

async fn show(a: ShowArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&a.connect).await?;
    let r = op
        .query(
            "audit",
            json!({"limit": a.limit, "who": a.who, "org": a.org, "action": a.action,
                   "name": a.name, "device": a.device, "since": a.since, "until": a.until}),
        )
        .await;
    op.disconnect().await;
    let r = r?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&r["entries"])?);
        return Ok(());
    }
    println!(
        "{:<6} {:<24} {:<16} {:<16} {:<20} RESULT",
        "SEQ", "AT", "WHO", "ACTION", "NAME"
    );
    for e in r["entries"].as_array().into_iter().flatten() {
        println!(
            "{:<6} {:<24} {:<16} {:<16} {:<20} {}",
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

async fn verify_server(a: VerifyArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&a.connect).await?;
    let r = op.query("audit-verify", json!({})).await;
    op.disconnect().await;
    let r = r?;
    if a.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    if r["ok"] == true {
        if a.output == Output::Table {
            println!(
                "the audit log verifies: {} entries, head {} {}",
                r["head"]["entries"],
                r["head"]["seq"],
                r["head"]["hash"].as_str().unwrap_or("")
            );
        }
        Ok(())
    } else {
        bail!(
            "the audit log does not verify at entry {}: {}",
            r["seq"],
            r["reason"].as_str().unwrap_or("")
        )
    }
}

/// What the signature covers: the format and the head.
fn signed_text(head: &Head) -> String {
    format!("{FORMAT} {} {} {}", head.seq, head.hash, head.entries)
}

async fn export(a: ExportArgs) -> anyhow::Result<()> {
    let key = a
        .key
        .as_ref()
        .map(|k| signing::read_private_key(k, POLICY_KEY))
        .transpose()?;
    let mut op = Operator::connect(&a.connect).await?;
    let mut entries: Vec<Value> = Vec::new();
    let result = async {
        let mut after = 0u64;
        loop {
            let page = op
                .query("audit-export", json!({"after": after, "limit": 2000}))
                .await?;
            let batch = page["entries"].as_array().cloned().unwrap_or_default();
            let Some(last) = batch.last() else {
                break;
            };
            after = last["seq"]
                .as_u64()
                .context("an entry without a sequence")?;
            entries.extend(batch);
        }
        anyhow::Ok(())
    }
    .await;
    op.disconnect().await;
    result?;
    let parsed: Vec<AuditEntry> = entries
        .iter()
        .map(|v| serde_json::from_value(v.clone()))
        .collect::<Result<_, _>>()
        .context("the server sent an audit entry this CLI cannot read")?;
    // An export that does not verify is not signed.
    let head =
        verify(&parsed).map_err(|b| anyhow::anyhow!("the server's log does not verify: {b}"))?;
    let mut doc = json!({"format": FORMAT, "head": head, "entries": entries});
    if let Some(key) = &key {
        doc["signature"] = json!(signing::sign_text(key, &signed_text(&head)));
    }
    std::fs::write(&a.out, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"file": a.out, "head": head, "signed": key.is_some()})
            )?
        ),
        Output::Table => println!(
            "{} entries written to {}, head {} {}{}",
            head.entries,
            a.out.display(),
            head.seq,
            head.hash,
            if key.is_some() { ", signed" } else { "" }
        ),
    }
    Ok(())
}

fn verify_file(file: &PathBuf, key: Option<&PathBuf>, output: Output) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    if doc["format"] != FORMAT {
        bail!("{} is not an audit export ({FORMAT})", file.display());
    }
    let entries: Vec<AuditEntry> = serde_json::from_value(doc["entries"].clone())
        .context("the export's entries cannot be read")?;
    let claimed: Head =
        serde_json::from_value(doc["head"].clone()).context("the export has no head")?;
    if let Some(key) = key {
        let public = signing::read_public_key(key, POLICY_KEY)?;
        let signature = doc["signature"]
            .as_str()
            .context("the export is not signed (export it with --key)")?;
        signing::verify_text(&public, &signed_text(&claimed), signature)
            .context("the export's head is not signed by this key")?;
    }
    let head = verify(&entries).map_err(|b| anyhow::anyhow!("the export does not verify: {b}"))?;
    // The chain alone cannot show its end cut off: the (signed) head does.
    if head != claimed {
        bail!(
            "the export does not verify: its entries end at {} {} ({} entries) but its head says {} {} ({} entries): entries were removed from its end",
            head.seq, head.hash, head.entries, claimed.seq, claimed.hash, claimed.entries
        );
    }
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"ok": true, "head": head, "signed": key.is_some()})
            )?
        ),
        Output::Table => println!(
            "the export verifies{}: {} entries, head {} {}",
            if key.is_some() {
                " and its head is signed by that key"
            } else {
                " (head not checked against a key)"
            },
            head.entries,
            head.seq,
            head.hash
        ),
    }
    Ok(())
}
