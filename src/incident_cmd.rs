//! `cityplane quarantine …` and `cityplane release …`: incident response
//! through the operator API (the `incident` right), with release's new
//! certificates issued here, by whoever holds the CA.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use cityplane::client::ConnectArgs;
use cityplane_certs::Pki;
use cityplane_proto::Role;
use serde_json::{json, Value};

use crate::governance_cmd::{ask, print_json, selector_of};
use crate::ops_cmd::Output;

const QUARANTINE_HELP: &str = "\
A quarantine takes effect before the command returns: the broker refuses every \
certificate the devices hold and cuts their sessions, rollouts and documents pass \
them by, compliance counts them apart, and the audit log records the incident \
(who, when, why, which devices). It needs the incident right.

Examples:
  cityplane quarantine --ids cam-0042 --reason \"sends to an unknown host\"
  cityplane quarantine --selector class=camera,zone=north --reason \"CVE-2026-1234\"
  cityplane quarantine list
  cityplane audit --action quarantine
  cityplane release cam-0042 --out ./installer     # new certificate, old ones revoked";

const RELEASE_HELP: &str = "\
Each device gets a new certificate (new key, new serial), issued here with the CA \
(--ca: the directory holding ca.key); every older certificate of the device is \
revoked in the CA's list, and the server pins the device to the new serial, so the \
old one never comes back. The files go to OUT/<id>/ (ca.crt, <id>.crt, <id>.key \
0600) for the installer to put on the device.

Examples:
  cityplane release cam-0042 --out ./installer
  cityplane release --incident inc-17 --out ./installer --reason \"reflashed on site\"
  cityplane release --selector class=camera --ca ./pki --server-pki ./server-pki --out ./installer";

/// `cityplane quarantine …`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, after_help = QUARANTINE_HELP)]
pub struct QuarantineArgs {
    #[command(subcommand)]
    pub cmd: Option<QuarantineCommand>,
    #[command(flatten)]
    pub cut: CutArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum QuarantineCommand {
    /// The quarantined devices (of your scope): incident, since, by whom, why
    List(ListArgs),
}

#[derive(clap::Args, Debug)]
pub struct CutArgs {
    /// These devices (comma-separated ids)
    #[arg(long, value_delimiter = ',', conflicts_with = "selector")]
    pub ids: Vec<String>,
    /// The devices matching KEY=VALUE pairs (class=…, owner=…, id_prefix=…, any label)
    #[arg(long, value_delimiter = ',')]
    pub selector: Vec<String>,
    /// Why (the incident record; what an auditor reads)
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Only devices matching KEY=VALUE pairs
    #[arg(long, value_delimiter = ',')]
    pub selector: Vec<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
#[command(after_help = RELEASE_HELP)]
pub struct ReleaseArgs {
    /// Quarantined devices to bring back
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Instead of ids: the quarantined devices matching KEY=VALUE pairs
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["ids", "incident"])]
    pub selector: Vec<String>,
    /// Instead of ids: every device still quarantined by this incident (inc-N)
    #[arg(long, conflicts_with = "ids")]
    pub incident: Option<String>,
    /// Where the installer's files go: OUT/<id>/{ca.crt,<id>.crt,<id>.key}
    #[arg(long)]
    pub out: PathBuf,
    /// The CA directory (holds ca.key) that issues the new certificates
    /// [default: the --pki directory]
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// A server directory (certs export-server) to copy the CA's revocation list into
    #[arg(long)]
    pub server_pki: Option<PathBuf>,
    /// Why (recorded in the audit log)
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn quarantine(args: QuarantineArgs) -> anyhow::Result<()> {
    if let Some(QuarantineCommand::List(a)) = args.cmd {
        return list(a).await;
    }
    let a = args.cut;
    let target = match (a.ids.is_empty(), a.selector.is_empty()) {
        (false, true) => json!({"ids": a.ids}),
        (true, false) => selector_of(&a.selector)?,
        _ => bail!("name the devices: --ids ID,… or --selector KEY=VALUE,… (see --help)"),
    };
    let Some(reason) = a.reason else {
        bail!("--reason is required: it is the incident's record (what an auditor reads)");
    };
    let r = ask(
        &a.connect,
        "quarantine",
        json!({"target": target, "reason": reason}),
    )
    .await
    .context("the quarantine was refused; nothing was cut off")?;
    if a.output == Output::Json {
        return print_json(&r);
    }
    let ids = strings(&r["ids"]);
    println!(
        "incident {}: {} device(s) quarantined, sessions cut, certificates refused{}",
        r["incident"].as_str().unwrap_or(""),
        ids.len(),
        match r["already"].as_u64() {
            Some(n) if n > 0 => format!(" ({n} already quarantined)"),
            _ => String::new(),
        }
    );
    const SHOWN: usize = 20;
    for id in ids.iter().take(SHOWN) {
        println!("  {id}");
    }
    if ids.len() > SHOWN {
        println!(
            "  … and {} more (--output json lists all)",
            ids.len() - SHOWN
        );
    }
    println!("bring them back with: cityplane release ID… --out DIR (a new certificate each)");
    Ok(())
}

async fn list(a: ListArgs) -> anyhow::Result<()> {
    let mut body = json!({});
    if !a.selector.is_empty() {
        body["selector"] = selector_of(&a.selector)?;
    }
    let r = ask(&a.connect, "get-quarantined", body).await?;
    if a.output == Output::Json {
        return print_json(&r);
    }
    println!(
        "{:<20} {:<10} {:<22} {:<12} REASON",
        "DEVICE", "INCIDENT", "SINCE", "BY"
    );
    for d in r["devices"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:<10} {:<22} {:<12} {}",
            d["id"].as_str().unwrap_or(""),
            d["incident"].as_str().unwrap_or(""),
            d["since"].as_str().unwrap_or(""),
            d["by"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or("")
        );
    }
    println!("{} quarantined", r["total"].as_u64().unwrap_or(0));
    Ok(())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

pub async fn release(a: ReleaseArgs) -> anyhow::Result<()> {
    let ca_dir = a.ca.clone().unwrap_or_else(|| a.connect.pki.clone());
    let pki =
        Pki::open(&ca_dir).with_context(|| format!("opening the CA in {}", ca_dir.display()))?;
    if !pki.ca_key_path().exists() {
        bail!(
            "{} holds no ca.key: release issues new certificates, so it runs where the CA is (--ca DIR)",
            ca_dir.display()
        );
    }
    // What is quarantined now, in this operator's scope: a release names
    // only those (the server refuses anything else too).
    let mut body = json!({});
    if !a.selector.is_empty() {
        body["selector"] = selector_of(&a.selector)?;
    }
    let listed = ask(&a.connect, "get-quarantined", body).await?;
    let quarantined: BTreeMap<String, String> = listed["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            Some((
                d["id"].as_str()?.to_owned(),
                d["incident"].as_str().unwrap_or("").to_owned(),
            ))
        })
        .collect();
    let ids: Vec<String> = if !a.ids.is_empty() {
        if let Some(not) = a.ids.iter().find(|id| !quarantined.contains_key(*id)) {
            bail!("{not} is not quarantined (cityplane quarantine list shows who is)");
        }
        a.ids.clone()
    } else if let Some(incident) = &a.incident {
        quarantined
            .iter()
            .filter(|(_, inc)| *inc == incident)
            .map(|(id, _)| id.clone())
            .collect()
    } else if !a.selector.is_empty() {
        quarantined.keys().cloned().collect()
    } else {
        bail!("name the devices: ID…, --incident inc-N or --selector KEY=VALUE,… (see --help)");
    };
    if ids.is_empty() {
        bail!("no quarantined device matches: nothing to release");
    }
    create_private_dir(&a.out)?;
    let ca_pem = std::fs::read(pki.ca_cert_path())
        .with_context(|| format!("reading {}", pki.ca_cert_path().display()))?;
    let mut serials = BTreeMap::new();
    let mut revoked = 0usize;
    for (n, id) in ids.iter().enumerate() {
        let rotated = pki
            .rotate_reporting(Role::Device, id)
            .with_context(|| format!("issuing {id}'s new certificate"))?;
        revoked += rotated.revoked.len();
        let dir = a.out.join(id);
        create_private_dir(&dir)?;
        write_file(&dir.join("ca.crt"), &ca_pem, 0o644)?;
        write_file(
            &dir.join(format!("{id}.crt")),
            &std::fs::read(pki.cert_path(id))?,
            0o644,
        )?;
        write_file(
            &dir.join(format!("{id}.key")),
            &std::fs::read(pki.key_path(id))?,
            0o600,
        )?;
        serials.insert(id.clone(), rotated.cert.serial);
        if a.output == Output::Table && ids.len() > 20 && (n + 1) % 100 == 0 {
            eprintln!("issued {}/{}", n + 1, ids.len());
        }
    }
    if let Some(server) = &a.server_pki {
        pki.publish_revocations(server)
            .with_context(|| format!("copying the revocation list to {}", server.display()))?;
    }
    let mut body = json!({"serials": serials});
    if let Some(reason) = &a.reason {
        body["reason"] = json!(reason);
    }
    let r = ask(&a.connect, "release", body).await.with_context(|| {
        format!(
            "the server refused the release; the new certificates are in {} and the old ones \
             are revoked, so the devices stay cut off: run the release again",
            a.out.display()
        )
    })?;
    if a.output == Output::Json {
        return print_json(&json!({
            "released": r["released"], "ids": ids, "serials": serials,
            "revoked_old_certificates": revoked, "out": a.out,
        }));
    }
    println!(
        "{} device(s) released: each pinned to its new certificate, {} old certificate(s) revoked",
        ids.len(),
        revoked
    );
    println!(
        "installer files: {}/<id>/ (ca.crt, <id>.crt, <id>.key)",
        a.out.display()
    );
    Ok(())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// Written with its mode from the start (a key is never readable by others,
/// not even for an instant).
fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}
