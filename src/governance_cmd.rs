//! `cityplane orgs …`, `cityplane compliance …` and the online half of
//! `cityplane policy …` (apply, get, history, diff, export, exceptions):
//! organisations and the city's security policy, through the operator API.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use cityplane::client::{ConnectArgs, Operator};

use crate::ops_cmd::Output;

const SCOPE_HELP: &str =
    "A scope is a selector over registry attributes, given as KEY=VALUE pairs \
(all must match): class=…, owner=…, id_prefix=…, and any other key is a label (zone=north). \
Rights: read (queries), write (documents, registration, labels), rollout (rollouts, firmware), \
policy (the security policy and its exceptions), incident (incident response).

Examples:
  cityplane orgs create lighting-co --scope owner=lighting-co --rights read,write,rollout
  cityplane orgs create camera-int --scope class=camera --rights read,rollout
  cityplane orgs grant lighting-co --rights read,write
  cityplane orgs describe lighting-co

An operator belongs to the organisation in its certificate (subject O):
  cityplane certs issue --pki ./pki --role operator --id lc-ops --org lighting-co";

/// `cityplane orgs …`.
#[derive(clap::Subcommand, Debug)]
pub enum OrgsCommand {
    /// Create an organisation with its scope and rights (the city's administrators only)
    #[command(after_help = SCOPE_HELP)]
    Create(OrgArgs),
    /// Change an organisation's scope or rights (the city's administrators only)
    #[command(after_help = SCOPE_HELP)]
    Grant(OrgArgs),
    /// Every organisation (a contractor sees its own)
    List(PlainArgs),
    /// One organisation: scope, rights, devices in scope, its documents and rollouts
    Describe(DescribeArgs),
}

#[derive(clap::Args, Debug)]
pub struct OrgArgs {
    /// Organisation name (as in its operators' certificates, subject O)
    pub name: String,
    /// Scope as KEY=VALUE (repeat, or comma-separated): owner=lighting-co, class=camera, zone=north
    #[arg(long, value_delimiter = ',')]
    pub scope: Vec<String>,
    /// Rights, comma-separated: read, write, rollout, policy, incident
    #[arg(long, value_delimiter = ',')]
    pub rights: Vec<String>,
    /// What the organisation is (kept in the registry of organisations)
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct DescribeArgs {
    /// Organisation name (default: your own)
    pub name: Option<String>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `KEY=VALUE` pairs as a selector: known keys are fields, others labels.
pub fn selector_of(pairs: &[String]) -> anyhow::Result<Value> {
    let mut sel = serde_json::Map::new();
    let mut labels = serde_json::Map::new();
    for pair in pairs.iter().filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("{pair:?} is not KEY=VALUE (e.g. owner=lighting-co, zone=north)");
        };
        match k {
            "class" | "owner" | "id_prefix" => {
                sel.insert(k.to_owned(), json!(v));
            }
            "all" if v == "true" => {
                sel.insert("all".to_owned(), json!(true));
            }
            _ => {
                labels.insert(k.to_owned(), json!(v));
            }
        }
    }
    if !labels.is_empty() {
        sel.insert("labels".to_owned(), Value::Object(labels));
    }
    Ok(Value::Object(sel))
}

pub async fn ask(connect: &ConnectArgs, verb: &str, body: Value) -> anyhow::Result<Value> {
    let mut op = Operator::connect(connect).await?;
    let r = op.query(verb, body).await;
    op.disconnect().await;
    r
}

pub fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn rights_of(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn scope_of(v: &Value) -> String {
    match v {
        Value::Null => "the whole fleet".to_owned(),
        other => other.to_string(),
    }
}

pub async fn orgs(cmd: OrgsCommand) -> anyhow::Result<()> {
    match cmd {
        OrgsCommand::Create(a) | OrgsCommand::Grant(a) if a.name.is_empty() => {
            bail!("an organisation needs a name")
        }
        OrgsCommand::Create(a) => org_write("org-create", a).await,
        OrgsCommand::Grant(a) => org_write("org-grant", a).await,
        OrgsCommand::List(a) => {
            let r = ask(&a.connect, "get-orgs", json!({})).await?;
            if a.output == Output::Json {
                return print_json(&r);
            }
            println!("{:<20} {:>8}  {:<32} SCOPE", "NAME", "DEVICES", "RIGHTS");
            for o in r["orgs"].as_array().into_iter().flatten() {
                println!(
                    "{:<20} {:>8}  {:<32} {}",
                    o["name"].as_str().unwrap_or(""),
                    o["devices"].as_u64().unwrap_or(0),
                    rights_of(&o["rights"]),
                    scope_of(&o["scope"])
                );
            }
            Ok(())
        }
        OrgsCommand::Describe(a) => {
            let r = ask(&a.connect, "describe-org", json!({"name": a.name})).await?;
            if a.output == Output::Json {
                return print_json(&r);
            }
            println!("organisation {}", r["name"].as_str().unwrap_or(""));
            if let Some(d) = r["description"].as_str().filter(|d| !d.is_empty()) {
                println!("  {d}");
            }
            println!("  scope:      {}", scope_of(&r["scope"]));
            println!("  devices:    {}", r["devices"]);
            println!("  rights:     {}", rights_of(&r["rights"]));
            println!("  documents:  {}", r["documents"]);
            println!("  rollouts:   {}", r["rollouts"]);
            println!(
                "  updated by {} at {} (generation {})",
                r["updated_by"].as_str().unwrap_or(""),
                r["updated_at"].as_str().unwrap_or(""),
                r["generation"]
            );
            Ok(())
        }
    }
}

async fn org_write(verb: &str, a: OrgArgs) -> anyhow::Result<()> {
    let mut body = json!({"name": a.name});
    if !a.scope.is_empty() {
        body["scope"] = selector_of(&a.scope)?;
    }
    if !a.rights.is_empty() {
        body["rights"] = json!(a.rights);
    }
    if let Some(d) = &a.description {
        body["description"] = json!(d);
    }
    if verb == "org-create" && a.scope.is_empty() {
        bail!("an organisation needs --scope (e.g. --scope owner={}): the devices it may see and change", a.name);
    }
    let r = ask(&a.connect, verb, body)
        .await
        .with_context(|| format!("{verb} {} was refused; nothing changed", a.name))?;
    match a.output {
        Output::Json => print_json(&r),
        Output::Table => {
            println!(
                "organisation {}: scope {}, rights {}, {} devices in scope",
                r["name"].as_str().unwrap_or(""),
                scope_of(&r["scope"]),
                rights_of(&r["rights"]),
                r["devices"]
            );
            Ok(())
        }
    }
}

// ---------------------------------------------------------------- compliance

const COMPLIANCE_HELP: &str = "Each party sees its own scope: a contractor's operator gets the \
compliance of its devices only.

Examples:
  cityplane compliance                       # compliant %, by rule, class, zone, owner; worst devices
  cityplane compliance --output json
  cityplane compliance report --html compliance.html   # a page to hand to an auditor";

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, after_help = COMPLIANCE_HELP)]
pub struct ComplianceArgs {
    #[command(subcommand)]
    pub cmd: Option<ComplianceSub>,
    #[command(flatten)]
    pub show: ShowArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum ComplianceSub {
    /// Write a self-contained HTML report (chart over time, violations table)
    Report(ReportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// Violations listed (most severe devices first in "worst")
    #[arg(long, default_value_t = 20)]
    pub violations: usize,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Where to write the page
    #[arg(long)]
    pub html: PathBuf,
    /// Violations listed in the page's table
    #[arg(long, default_value_t = 2000)]
    pub violations: usize,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts (what was written)
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn compliance(args: ComplianceArgs) -> anyhow::Result<()> {
    match args.cmd {
        Some(ComplianceSub::Report(a)) => {
            let r = ask(&a.connect, "compliance", json!({"limit": a.violations})).await?;
            let page = cityplane::compliance_html::render_html(&r);
            std::fs::write(&a.html, page.as_bytes())
                .with_context(|| format!("writing {}", a.html.display()))?;
            match a.output {
                Output::Json => print_json(&json!({
                    "html": a.html, "total": r["total"], "compliant": r["compliant"],
                    "compliant_pct": r["compliant_pct"],
                })),
                Output::Table => {
                    println!(
                        "wrote {} ({} of {} devices compliant, {}%)",
                        a.html.display(),
                        r["compliant"],
                        r["total"],
                        r["compliant_pct"]
                    );
                    Ok(())
                }
            }
        }
        None => {
            let a = args.show;
            let r = ask(&a.connect, "compliance", json!({"limit": a.violations})).await?;
            if a.output == Output::Json {
                return print_json(&r);
            }
            print!("{}", compliance_table(&r));
            Ok(())
        }
    }
}

/// The compliance report as text (also what the demo prints).
pub fn compliance_table(r: &Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let Some(version) = r["policy_version"].as_u64() else {
        return "no security policy is published yet (cityplane policy apply -f policy.toml)\n"
            .to_owned();
    };
    let _ = writeln!(
        s,
        "policy v{version} · {} · {} of {} devices compliant ({}%){}",
        scope_line(r),
        r["compliant"],
        r["total"],
        r["compliant_pct"],
        match r["excepted"].as_u64() {
            Some(n) if n > 0 => format!(", {n} by exception"),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        s,
        "\n{:<28} {:<9} {:<8} {:>10} {:>9}",
        "RULE", "SEVERITY", "MODE", "VIOLATING", "EXCEPTED"
    );
    for row in r["by_rule"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<28} {:<9} {:<8} {:>10} {:>9}",
            row["rule"].as_str().unwrap_or(""),
            row["severity"].as_str().unwrap_or(""),
            row["mode"].as_str().unwrap_or(""),
            row["violations"].as_u64().unwrap_or(0),
            row["excepted"].as_u64().unwrap_or(0)
        );
    }
    for (key, title) in [
        ("by_class", "CLASS"),
        ("by_zone", "ZONE"),
        ("by_owner", "OWNER"),
    ] {
        let field = &key[3..];
        let _ = writeln!(
            s,
            "\n{:<28} {:>8} {:>10} {:>7}",
            title, "DEVICES", "COMPLIANT", "%"
        );
        for row in r[key].as_array().into_iter().flatten() {
            let _ = writeln!(
                s,
                "{:<28} {:>8} {:>10} {:>7}",
                row[field].as_str().unwrap_or(""),
                row["total"].as_u64().unwrap_or(0),
                row["compliant"].as_u64().unwrap_or(0),
                row["compliant_pct"]
            );
        }
    }
    let worst = r["worst"].as_array().cloned().unwrap_or_default();
    if !worst.is_empty() {
        let _ = writeln!(s, "\nWORST DEVICES");
        for d in worst {
            let rules: Vec<String> = d["violations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v["rule"].as_str().unwrap_or("").to_owned())
                .collect();
            let _ = writeln!(
                s,
                "  {:<20} score {:>3}  {}",
                d["id"].as_str().unwrap_or(""),
                d["score"],
                rules.join(", ")
            );
        }
    }
    s
}

fn scope_line(r: &Value) -> String {
    match r["org"].as_str() {
        Some(cityplane_proto::ADMIN_ORG) | None => "the whole fleet".to_owned(),
        Some(org) => format!("organisation {org}'s devices"),
    }
}

// ---------------------------------------------------------- policy (online)

#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// The policy (TOML or JSON; see docs/examples/policy.toml)
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// A version (default: the current one)
    #[arg(long, value_name = "N")]
    pub policy_version: Option<u64>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// Compare this local policy file with the current version
    #[arg(short = 'f', long = "file", conflicts_with_all = ["from", "to"])]
    pub file: Option<PathBuf>,
    /// Older version (default: the one before --to)
    #[arg(long)]
    pub from: Option<u64>,
    /// Newer version (default: the current one)
    #[arg(long)]
    pub to: Option<u64>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The city's policy signing key (policy.key from `cityplane policy keygen`)
    #[arg(long)]
    pub key: PathBuf,
    /// Where to write the signed export
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// A version (default: the current one)
    #[arg(long, value_name = "N")]
    pub policy_version: Option<u64>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct ExceptArgs {
    /// The rule waived
    #[arg(long)]
    pub rule: String,
    /// Only these devices (comma-separated ids)
    #[arg(long, value_delimiter = ',', conflicts_with = "selector")]
    pub ids: Vec<String>,
    /// Only devices matching KEY=VALUE pairs (as for orgs --scope)
    #[arg(long, value_delimiter = ',')]
    pub selector: Vec<String>,
    /// Why (what an auditor reads)
    #[arg(long)]
    pub reason: String,
    /// How long: 30m, 12h, 7d (at most 90d)
    #[arg(long = "for", value_name = "DURATION")]
    pub duration: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct RevokeArgs {
    /// Exception id (ex-N)
    #[arg(value_name = "ID")]
    pub exception: String,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(clap::Args, Debug)]
pub struct PlainArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `30m`, `12h`, `7d`, `90s` as seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = n
        .parse()
        .with_context(|| format!("{text:?} is not a duration like 30m, 12h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" | "" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("{text:?}: the unit must be s, m, h or d"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("{text:?} is too long a duration"))
}

pub async fn policy_apply(a: ApplyArgs) -> anyhow::Result<()> {
    let policy = crate::policy_cmd::read_policy_file(&a.file)?;
    let r = ask(&a.connect, "policy-apply", json!({"policy": policy}))
        .await
        .context("the policy was refused; the current version stays")?;
    match a.output {
        Output::Json => print_json(&r),
        Output::Table => {
            println!(
                "policy v{} published: {} rules\n{}",
                r["version"],
                r["rules"],
                r["diff"].as_str().unwrap_or("")
            );
            Ok(())
        }
    }
}

pub async fn policy_get(a: GetArgs) -> anyhow::Result<()> {
    let r = ask(
        &a.connect,
        "get-policy",
        json!({"version": a.policy_version}),
    )
    .await?;
    if a.output == Output::Json {
        return print_json(&r);
    }
    println!(
        "policy v{} published by {} at {}",
        r["version"],
        r["published_by"].as_str().unwrap_or(""),
        r["published_at"].as_str().unwrap_or("")
    );
    println!(
        "\n{:<28} {:<9} {:<8} {:<28} CHECK",
        "RULE", "SEVERITY", "MODE", "SELECTOR"
    );
    let default_mode = r["policy"]["mode"].as_str().unwrap_or("report").to_owned();
    for rule in r["policy"]["rules"].as_array().into_iter().flatten() {
        println!(
            "{:<28} {:<9} {:<8} {:<28} {}",
            rule["id"].as_str().unwrap_or(""),
            rule["severity"].as_str().unwrap_or(""),
            rule["mode"].as_str().unwrap_or(&default_mode),
            rule["selector"].to_string(),
            rule["check"]
        );
    }
    Ok(())
}

pub async fn policy_history(a: PlainArgs) -> anyhow::Result<()> {
    let r = ask(&a.connect, "get-policy-history", json!({})).await?;
    if a.output == Output::Json {
        return print_json(&r);
    }
    println!("{:>8} {:>6}  {:<24} BY", "VERSION", "RULES", "PUBLISHED");
    for v in r["versions"].as_array().into_iter().flatten() {
        println!(
            "{:>8} {:>6}  {:<24} {}",
            v["version"],
            v["rules"],
            v["published_at"].as_str().unwrap_or(""),
            v["published_by"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn policy_diff(a: DiffArgs) -> anyhow::Result<()> {
    let mut op = Operator::connect(&a.connect).await?;
    let result = async {
        let newer = match &a.file {
            Some(f) => crate::policy_cmd::read_policy_file(f)?,
            None => op.query("get-policy", json!({"version": a.to})).await?["policy"].take(),
        };
        let to_version = match (&a.file, a.to) {
            (Some(_), _) => None,
            (None, Some(v)) => Some(v),
            (None, None) => op.query("get-policy", json!({})).await?["version"].as_u64(),
        };
        let from = match (&a.file, a.from) {
            (Some(_), _) => None,
            (None, Some(v)) => Some(v),
            (None, None) => to_version.and_then(|v| v.checked_sub(1)).filter(|v| *v > 0),
        };
        let older = match (&a.file, from) {
            (_, Some(v)) => op.query("get-policy", json!({"version": v})).await?["policy"].take(),
            (Some(_), None) => op.query("get-policy", json!({})).await?["policy"].take(),
            (None, None) => bail!("there is no earlier version to compare with"),
        };
        anyhow::Ok((older, newer))
    }
    .await;
    op.disconnect().await;
    let (older, newer) = result?;
    let parse = |v: &Value| {
        cityplane_proto::policy::parse_policy(&serde_json::to_vec(v).unwrap_or_default())
            .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let d = cityplane_proto::policy::diff(&parse(&older)?, &parse(&newer)?);
    match a.output {
        Output::Json => print_json(&serde_json::to_value(&d)?),
        Output::Table => {
            if d.is_empty() {
                println!("no differences");
            } else {
                println!("{d}");
            }
            Ok(())
        }
    }
}

pub async fn policy_export(a: ExportArgs) -> anyhow::Result<()> {
    let r = ask(
        &a.connect,
        "get-policy",
        json!({"version": a.policy_version}),
    )
    .await?;
    let version = r["version"]
        .as_u64()
        .context("the answer carries no version")?;
    // The exact text that is signed: what a verifier reads back.
    let text = serde_json::to_string(&json!({
        "version": version,
        "published_at": r["published_at"],
        "published_by": r["published_by"],
        "policy": r["policy"],
    }))?;
    let signed = crate::policy_cmd::sign_export(&a.key, &text)?;
    let body = serde_json::to_vec_pretty(&signed)?;
    std::fs::write(&a.out, body).with_context(|| format!("writing {}", a.out.display()))?;
    match a.output {
        Output::Json => print_json(&json!({"version": version, "file": a.out})),
        Output::Table => {
            println!(
                "policy v{version} signed and written to {} (check it: cityplane policy verify --file {} --key policy.pub)",
                a.out.display(),
                a.out.display()
            );
            Ok(())
        }
    }
}

pub async fn policy_except(a: ExceptArgs) -> anyhow::Result<()> {
    let seconds = parse_duration(&a.duration)?;
    let mut body = json!({"rule": a.rule, "reason": a.reason, "expires_in_s": seconds});
    if !a.ids.is_empty() {
        body["target"] = json!({"ids": a.ids});
    } else if !a.selector.is_empty() {
        body["target"] = selector_of(&a.selector)?;
    }
    let r = ask(&a.connect, "exception-grant", body)
        .await
        .context("the exception was refused")?;
    match a.output {
        Output::Json => print_json(&r),
        Output::Table => {
            println!(
                "exception {} granted on rule {} until {}",
                r["id"].as_str().unwrap_or(""),
                r["rule"].as_str().unwrap_or(""),
                r["expires_at"].as_str().unwrap_or("")
            );
            Ok(())
        }
    }
}

pub async fn policy_exceptions(a: PlainArgs) -> anyhow::Result<()> {
    let r = ask(&a.connect, "get-exceptions", json!({})).await?;
    if a.output == Output::Json {
        return print_json(&r);
    }
    println!(
        "{:<8} {:<24} {:<8} {:<22} {:<12} REASON",
        "ID", "RULE", "ACTIVE", "EXPIRES", "BY"
    );
    for e in r["exceptions"].as_array().into_iter().flatten() {
        println!(
            "{:<8} {:<24} {:<8} {:<22} {:<12} {}",
            e["id"].as_str().unwrap_or(""),
            e["rule"].as_str().unwrap_or(""),
            if e["active"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            e["expires_at"].as_str().unwrap_or(""),
            e["granted_by"].as_str().unwrap_or(""),
            e["reason"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn policy_revoke(a: RevokeArgs) -> anyhow::Result<()> {
    let r = ask(&a.connect, "exception-revoke", json!({"id": a.exception})).await?;
    match a.output {
        Output::Json => print_json(&r),
        Output::Table => {
            println!("exception {} revoked", a.exception);
            Ok(())
        }
    }
}
