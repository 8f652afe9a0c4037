//! `cityplane policy …`: the city's security policy, offline. The policy key
//! (not the CA), checking a policy file, verifying a signed export, and
//! checking devices against a policy without a server (a contractor's
//! or an auditor's laptop).
//!
//! The rules themselves are `cityplane_proto::policy`; signing is
//! `cityplane_certs::policy`. Online verbs (apply, get, diff, export,
//! exceptions) talk to the controller and live elsewhere; they reuse
//! [`read_policy_file`] and [`sign_export`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use cityplane_certs::policy::{
    generate_policy_key, parse_policy_version, read_policy_key, read_policy_public_key,
    sign_policy, verify_policy, PolicyExportError, SignedPolicy, POLICY_PUB_FILE,
};
use cityplane_proto::messages::Attributes;
use cityplane_proto::policy::{parse_policy, Facts, Outcome, Policy};
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::certs_cmd::print_out;
use crate::ops_cmd::{print_json, Output};

/// Exit status of `check` when a device violates a rule (1), and of
/// `validate`/`check` when the input itself is wrong (2): scripts can tell
/// "not compliant" from "could not tell".
const EXIT_VIOLATIONS: u8 = 1;
const EXIT_INVALID: u8 = 2;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Create the policy key (policy.key, 0600) and its public half (policy.pub)
    #[command(
        long_about = "Create the Ed25519 key that signs the city's security policy: \
DIR/policy.key (PKCS#8 PEM, mode 0600) and DIR/policy.pub (the public key, base64, one line). \
Give policy.pub to every party that must follow the policy (contractors, integrators, \
auditors): with it they check that a policy export is the city's.\n\n\
The policy key is not the CA: keep policy.key offline with the city's security office. \
Refuses to replace an existing key unless --force.",
        after_help = "Examples:\n  \
cityplane policy keygen                       # ./policy-key/policy.key, ./policy-key/policy.pub\n  \
cityplane policy keygen --dir /secure/policy-key"
    )]
    Keygen(KeygenArgs),

    /// Check a policy file (TOML or JSON) and list its rules
    #[command(
        long_about = "Read a policy (TOML or JSON, by extension or content), check every rule \
(one subject and one test each, sensible numbers, versions that parse, enforced rules with a \
remediation that passes the rule, no two rules that contradict each other) and list the \
rules. Exit status 2 with the first error, naming the rule, otherwise 0.\n\n\
--output json prints the policy as JSON: the form the controller and exports use.",
        after_help = "Examples:\n  \
cityplane policy validate -f policy.toml\n  \
cityplane policy validate -f policy.toml --output json > policy.json   # TOML to JSON\n\n\
A rule (TOML):\n  \
[[rules]]\n  \
id = \"camera-firmware\"\n  \
description = \"Cameras run firmware 4.2 or later (CVE-2026-1234)\"\n  \
severity = \"high\"                            # low | medium | high | critical\n  \
selector = { class = \"camera\" }              # or { all = true }\n  \
check = { reported = \"firmware\", version_at_least = \"4.2\" }\n  \
mode = \"enforce\"                             # report (default) | enforce\n  \
remediation = { firmware = \"4.2.0\", waves = [\"10%\", \"100%\"] }\n\n\
docs/examples/policy.toml has one of each kind; docs/PROTOCOL.md lists every subject and test."
    )]
    Validate(ValidateArgs),

    /// Check a signed policy export with the policy public key
    #[command(
        long_about = "Verify a policy export (`policy export` on the server) with the city's \
policy public key: the signature over the exact policy text, the format, that the version \
outside matches the signed one, and that the policy inside is valid. Prints the version and \
the number of rules; exits 1 with the reason if anything does not hold.",
        after_help = "Examples:\n  \
cityplane policy verify --file policy-v3.json --key policy.pub\n  \
cityplane policy verify --file policy-v3.json --key policy.pub --output json | jq .rules"
    )]
    Verify(VerifyArgs),

    /// Check devices against a policy, offline: who violates which rule
    #[command(
        long_about = "Evaluate every rule of a policy on every device of a file, without a \
server, as the controller does on every report. The policy is a signed export checked with \
--key, or (without --key, with a warning) a plain policy file. Prints each violation (device, \
rule, severity, reason) and a summary; exit status 0 if every device is compliant, 1 if any \
violates a rule, 2 if the policy or the device file cannot be used.\n\n\
The device file is JSON: an array (or {\"devices\": [...]}) of\n  \
{\"id\": \"cam-1\", \"attributes\": {\"class\": \"camera\", \"labels\": {\"zone\": \"north\"}, \
\"owner\": \"camera-int\"},\n   \"reported\": {\"firmware\": \"4.1\", \"telnet\": false}, \
\"last_seen\": \"2026-11-30T11:58:00Z\", \"certificate_not_after\": \"2027-06-01T00:00:00Z\"}\n\
class, labels and owner may also be top-level fields, so rows of `cityplane describe device \
ID --output json` work as they are; rows of `cityplane get devices --output json` carry only \
`firmware` of the reported state. Without last_seen or certificate_not_after, rules on them \
fail (unknown is not compliant).",
        after_help = "Examples:\n  \
cityplane policy check --policy policy-v3.json --key policy.pub --reported devices.json\n  \
cityplane policy check --policy policy.toml --reported devices.json --output json | jq .compliant\n  \
cityplane policy check --policy policy-v3.json --key policy.pub --reported devices.json --at 2027-01-01T00:00:00Z"
    )]
    Check(CheckArgs),

    /// Publish a new version of the policy to the server (the policy right)
    #[command(
        after_help = "Every report is then evaluated against it (cityplane compliance). \
Rules in enforce mode with a remediation open remediation rollouts, in waves, for the devices \
that break them. Every later desired-state write and rollout is checked against it first.\n\n\
Examples:\n  cityplane policy apply -f policy.toml\n  cityplane policy diff -f policy.toml   # before applying"
    )]
    Apply(crate::governance_cmd::ApplyArgs),
    /// Show the current version (or --policy-version N) from the server
    Get(crate::governance_cmd::GetArgs),
    /// Every published version: when, by whom, how many rules
    History(crate::governance_cmd::PlainArgs),
    /// What changed between two versions, or between a local file and the current one
    #[command(
        after_help = "Examples:\n  cityplane policy diff                 # the current version against the one before\n  cityplane policy diff --from 1 --to 3\n  cityplane policy diff -f policy.toml  # a draft against the current version"
    )]
    Diff(crate::governance_cmd::DiffArgs),
    /// Write a version signed with the city's policy key, for every party to verify
    #[command(
        after_help = "Examples:\n  cityplane policy export --key ./policy-key/policy.key --out policy-v3.json\n  cityplane policy verify --file policy-v3.json --key ./policy-key/policy.pub"
    )]
    Export(crate::governance_cmd::ExportArgs),
    /// Waive a rule for some devices until a time (the policy right; audited, always expiring)
    #[command(
        after_help = "Examples:\n  cityplane policy except --rule lamp-dim-cap --ids lamp-0007 --reason \"night market\" --for 12h\n  cityplane policy except --rule camera-firmware --selector zone=east --reason \"vendor fix due\" --for 14d"
    )]
    Except(crate::governance_cmd::ExceptArgs),
    /// Every exception, active or not
    Exceptions(crate::governance_cmd::PlainArgs),
    /// End an exception now
    Unexcept(crate::governance_cmd::RevokeArgs),
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Directory for policy.key and policy.pub (created with mode 0700 if
    /// missing). Example: --dir /secure/policy-key
    #[arg(long, value_name = "DIR", default_value = "policy-key")]
    dir: PathBuf,
    /// Replace an existing policy key: exports signed with the old key no
    /// longer verify with the new policy.pub.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct ValidateArgs {
    /// The policy file: TOML (.toml) or JSON. Example: -f policy.toml
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: PathBuf,
    /// `table` for people, `json` for scripts (the policy as JSON)
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The signed export. Example: --file policy-v3.json
    #[arg(long = "file", short = 'f', value_name = "FILE")]
    file: PathBuf,
    /// The city's policy public key.
    #[arg(long, value_name = "FILE", default_value = "policy-key/policy.pub")]
    key: PathBuf,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// A signed export (with --key) or a plain policy file, TOML or JSON
    /// (without --key: unverified).
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// The city's policy public key; without it the policy is not verified.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The devices: JSON (see above). Example: --reported devices.json
    #[arg(long, value_name = "FILE")]
    reported: PathBuf,
    /// Evaluate as of this time (RFC 3339) instead of now: "which
    /// certificates will be too close to expiry on the 1st?"
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Runs one offline `policy` subcommand; the exit status says compliant
/// (0), violations (1) or invalid input (2).
pub fn run(cmd: PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Keygen(args) => keygen(args).map(|()| ExitCode::SUCCESS),
        PolicyCommand::Validate(args) => Ok(invalid_is_2(validate(args))),
        PolicyCommand::Verify(args) => verify(args).map(|()| ExitCode::SUCCESS),
        PolicyCommand::Check(args) => Ok(match check(args) {
            Ok(code) => code,
            Err(e) => invalid_is_2(Err(e)),
        }),
        PolicyCommand::Apply(a) => online(crate::governance_cmd::policy_apply(a)),
        PolicyCommand::Get(a) => online(crate::governance_cmd::policy_get(a)),
        PolicyCommand::History(a) => online(crate::governance_cmd::policy_history(a)),
        PolicyCommand::Diff(a) => online(crate::governance_cmd::policy_diff(a)),
        PolicyCommand::Export(a) => online(crate::governance_cmd::policy_export(a)),
        PolicyCommand::Except(a) => online(crate::governance_cmd::policy_except(a)),
        PolicyCommand::Exceptions(a) => online(crate::governance_cmd::policy_exceptions(a)),
        PolicyCommand::Unexcept(a) => online(crate::governance_cmd::policy_revoke(a)),
    }
}

/// A verb that talks to the server: its errors are the usual exit 1.
fn online(work: impl std::future::Future<Output = Result<()>>) -> Result<ExitCode> {
    crate::block_on(work).map(|()| ExitCode::SUCCESS)
}

fn invalid_is_2(r: Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// Reads a policy file, TOML or JSON (by extension, else by content), as
/// the JSON the controller stores, and checks it with `parse_policy`.
pub fn read_policy_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the policy file {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let value = match ext {
        "toml" => toml_to_json(&text, path)?,
        "json" => serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?,
        // No telling extension: JSON starts with `{`, TOML does not.
        _ if text.trim_start().starts_with('{') => serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?,
        _ => toml_to_json(&text, path)?,
    };
    parse_policy(value.to_string().as_bytes())
        .with_context(|| format!("{} is not a valid policy", path.display()))?;
    Ok(value)
}

fn toml_to_json(text: &str, path: &Path) -> Result<Value> {
    let t: toml::Value =
        toml::from_str(text).with_context(|| format!("{} is not TOML", path.display()))?;
    Ok(toml_value(t))
}

/// TOML's dates become strings: serde would turn them into a private
/// marker object.
fn toml_value(t: toml::Value) -> Value {
    match t {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_value).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_value(v))).collect())
        }
    }
}

/// Signs a policy version's exact text with the key in `key_path`.
// Called by the online `policy export`, which lives in its own module.
#[allow(dead_code)]
pub fn sign_export(key_path: &Path, version_text: &str) -> Result<SignedPolicy> {
    let key = read_policy_key(key_path).context("cannot sign the policy")?;
    sign_policy(&key, version_text).context("cannot sign the policy")
}

fn keygen(args: KeygenArgs) -> Result<()> {
    let key = generate_policy_key(&args.dir, args.force)
        .with_context(|| format!("cannot create a policy key in {}", args.dir.display()))?;
    let public = args.dir.join(POLICY_PUB_FILE);
    let mut out = String::new();
    if args.force {
        out += "Replaced the policy key: exports signed with the old key no longer verify with \
                the new policy.pub.\n";
    }
    out += &format!(
        "Wrote the policy key:\n  \
         {key}  private (mode 0600): keep it offline, apart from the CA (ca.key);\n  \
         {pad}  whoever holds it can publish the city's security policy\n  \
         {public}  public: give it to every party that must follow the policy\n\
         Next: cityplane policy validate -f policy.toml\n",
        key = key.display(),
        pad = " ".repeat(key.display().to_string().len()),
        public = public.display(),
    );
    print_out(&out)
}

fn validate(args: ValidateArgs) -> Result<()> {
    let value = read_policy_file(&args.file)?;
    let policy = parse_policy(value.to_string().as_bytes())?;
    if args.output == Output::Json {
        return print_json(&value);
    }
    let mut out = format!(
        "{}: valid, {} rules (default mode {})\n",
        args.file.display(),
        policy.rules.len(),
        policy.mode
    );
    out += &rules_table(&policy);
    print_out(&out)
}

fn rules_table(policy: &Policy) -> String {
    if policy.rules.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "{:<24} {:<9} {:<8} {:<28} CHECK\n",
        "ID", "SEVERITY", "MODE", "SELECTOR"
    );
    for r in &policy.rules {
        out += &format!(
            "{:<24} {:<9} {:<8} {:<28} {}\n",
            r.id,
            r.severity,
            r.effective_mode(policy.mode),
            compact(&r.selector),
            compact(&r.check),
        );
    }
    out
}

fn compact(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A policy export file as read: the export, then what verifies it.
fn read_export(path: &Path) -> Result<SignedPolicy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the policy export {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a policy export (made by `cityplane policy export`)",
            path.display()
        )
    })
}

fn read_public(key: &Path) -> Result<[u8; 32]> {
    read_policy_public_key(key).map_err(|e| {
        if std::fs::read_to_string(key).is_ok_and(|t| t.contains("PRIVATE KEY")) {
            anyhow!(
                "{} is a private key: pass the public half, {POLICY_PUB_FILE}",
                key.display()
            )
        } else {
            anyhow!("cannot use {} as the policy public key: {e}", key.display())
        }
    })
}

/// Verifies an export file; the version, the policy and the signed text.
fn verified(file: &Path, key: &Path) -> Result<(u64, Policy, Value)> {
    let public = read_public(key)?;
    let export = read_export(file)?;
    let (version, policy) = verify_policy(&public, &export)
        .map_err(|e| match e {
            PolicyExportError::BadSignature => anyhow!(
                "bad signature: not signed by the policy key whose public half is in {}, or \
                 changed after signing",
                key.display()
            ),
            e => e.into(),
        })
        .with_context(|| format!("{} does not verify with {}", file.display(), key.display()))?;
    let text: Value = serde_json::from_str(&export.policy).unwrap_or(Value::Null);
    Ok((version, policy, text))
}

fn verify(args: VerifyArgs) -> Result<()> {
    let result = verified(&args.file, &args.key);
    if args.output == Output::Json {
        let verdict = match &result {
            Ok((version, policy, text)) => json!({
                "ok": true, "file": args.file, "version": version,
                "published_at": text["published_at"], "published_by": text["published_by"],
                "rules": policy.rules.len(),
            }),
            Err(e) => json!({"ok": false, "file": args.file, "error": format!("{e:#}")}),
        };
        print_json(&verdict)?;
        return result.map(|_| ());
    }
    let (version, policy, text) = result?;
    let enforced = policy
        .rules
        .iter()
        .filter(|r| r.effective_mode(policy.mode) == cityplane_proto::policy::Mode::Enforce)
        .count();
    print_out(&format!(
        "ok: {} is signed by the policy key in {}\n  \
         version       {version}\n  \
         published     {} by {}\n  \
         rules         {} ({enforced} enforced)\n",
        args.file.display(),
        args.key.display(),
        text["published_at"].as_str().unwrap_or("—"),
        text["published_by"].as_str().unwrap_or("—"),
        policy.rules.len(),
    ))
}

/// The policy `check` evaluates, and what is known of where it came from.
struct Loaded {
    policy: Policy,
    version: Option<u64>,
    verified: bool,
}

fn load_for_check(path: &Path, key: Option<&Path>) -> Result<Loaded> {
    if let Some(key) = key {
        let (version, policy, _) = verified(path, key)?;
        return Ok(Loaded {
            policy,
            version: Some(version),
            verified: true,
        });
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the policy {}", path.display()))?;
    let as_json: Option<Value> = serde_json::from_str(&text).ok();
    let warn = |what: &str| {
        eprintln!(
            "warning: {} is {what}, not verified (pass --key policy.pub to check it is the city's)",
            path.display()
        )
    };
    // An export or a bare policy version, unverified: their inner policy.
    if let Some(Value::Object(o)) = &as_json {
        if o.contains_key("signature") {
            let export = read_export(path)?;
            let (version, policy) = parse_policy_version(&export.policy)?;
            warn("a signed export whose signature was not checked");
            return Ok(Loaded {
                policy,
                version: Some(version),
                verified: false,
            });
        }
        if o.contains_key("published_at") {
            let (version, policy) = parse_policy_version(&text)?;
            warn("a policy version");
            return Ok(Loaded {
                policy,
                version: Some(version),
                verified: false,
            });
        }
    }
    let value = read_policy_file(path)?;
    warn("a plain policy file");
    Ok(Loaded {
        policy: parse_policy(value.to_string().as_bytes())?,
        version: None,
        verified: false,
    })
}

/// One device of the `--reported` file.
struct Device {
    id: String,
    attrs: Attributes,
    reported: Map<String, Value>,
    last_seen_ms: Option<u64>,
    cert_not_after_ms: Option<u64>,
}

fn read_devices(path: &Path) -> Result<Vec<Device>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the device file {}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let rows = match value {
        Value::Array(rows) => rows,
        Value::Object(mut o) => match o.remove("devices") {
            Some(Value::Array(rows)) => rows,
            _ => bail!(
                "{}: a device file is an array of devices or {{\"devices\": [...]}}",
                path.display()
            ),
        },
        _ => bail!(
            "{}: a device file is an array of devices or {{\"devices\": [...]}}",
            path.display()
        ),
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            device(row).with_context(|| format!("{}: device {}", path.display(), i + 1))
        })
        .collect()
}

fn device(row: &Value) -> Result<Device> {
    let id = row["id"]
        .as_str()
        .ok_or_else(|| anyhow!("no \"id\" string"))?
        .to_owned();
    // `attributes` as in the registry, or top-level as `describe` prints them.
    let from = if row["attributes"].is_object() {
        &row["attributes"]
    } else {
        row
    };
    let string = |v: &Value, field: &str| -> Result<Option<String>> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            _ => bail!("{field} must be a string"),
        }
    };
    let labels = match &from["labels"] {
        Value::Null => Default::default(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| Ok((k.clone(), string(v, "a label")?.unwrap_or_default())))
            .collect::<Result<_>>()?,
        _ => bail!("labels must be an object of strings"),
    };
    let attrs = Attributes {
        class: string(&from["class"], "class")?,
        labels,
        owner: string(&from["owner"], "owner")?,
    };
    let reported = match &row["reported"] {
        Value::Object(m) => m.clone(),
        // `get devices` rows: only the firmware of the reported state.
        Value::Null => match &row["firmware"] {
            Value::Null => Map::new(),
            fw => Map::from_iter([("firmware".to_owned(), fw.clone())]),
        },
        _ => bail!("reported must be an object"),
    };
    Ok(Device {
        id,
        attrs,
        reported,
        last_seen_ms: time_ms(&row["last_seen"], "last_seen")?,
        cert_not_after_ms: time_ms(&row["certificate_not_after"], "certificate_not_after")?,
    })
}

/// An RFC 3339 time in ms since the epoch; null or "never" is unknown.
fn time_ms(v: &Value, field: &str) -> Result<Option<u64>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s == "never" => Ok(None),
        Value::String(s) => parse_time(s)
            .map(Some)
            .with_context(|| format!("{field} {s:?} is not an RFC 3339 time")),
        _ => bail!("{field} must be an RFC 3339 time"),
    }
}

fn parse_time(s: &str) -> Result<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).map_err(|_| anyhow!("before 1970"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn check(args: CheckArgs) -> Result<ExitCode> {
    let loaded = load_for_check(&args.policy, args.key.as_deref())?;
    let devices = read_devices(&args.reported)?;
    let now = match &args.at {
        Some(at) => {
            parse_time(at).with_context(|| format!("--at {at:?} is not an RFC 3339 time"))?
        }
        None => now_ms(),
    };
    let policy = &loaded.policy;
    let mut violations = Vec::new();
    let mut compliant = 0usize;
    for d in &devices {
        let facts = Facts {
            id: &d.id,
            attrs: &d.attrs,
            reported: &d.reported,
            cert_not_after_ms: d.cert_not_after_ms,
            last_seen_ms: d.last_seen_ms,
            now_ms: now,
        };
        let before = violations.len();
        for rule in policy
            .rules
            .iter()
            .filter(|r| r.applies_to(&d.id, &d.attrs))
        {
            if let Outcome::Fail(reason) = rule.evaluate(&facts) {
                violations.push(json!({
                    "id": d.id, "rule": rule.id, "severity": rule.severity,
                    "mode": rule.effective_mode(policy.mode), "reason": reason,
                }));
            }
        }
        if violations.len() == before {
            compliant += 1;
        }
    }
    let total = devices.len();
    let pct = if total == 0 {
        100.0
    } else {
        (compliant as f64 * 1000.0 / total as f64).round() / 10.0
    };
    let code = if violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_VIOLATIONS)
    };
    if args.output == Output::Json {
        print_json(&json!({
            "policy_version": loaded.version, "verified": loaded.verified,
            "rules": policy.rules.len(), "total": total, "compliant": compliant,
            "compliant_pct": pct, "violations_total": violations.len(),
            "violations": violations,
        }))?;
        return Ok(code);
    }
    let mut out = String::new();
    if !violations.is_empty() {
        out += &format!("{:<24} {:<24} {:<9} REASON\n", "DEVICE", "RULE", "SEVERITY");
        for v in &violations {
            out += &format!(
                "{:<24} {:<24} {:<9} {}\n",
                v["id"].as_str().unwrap_or_default(),
                v["rule"].as_str().unwrap_or_default(),
                v["severity"].as_str().unwrap_or_default(),
                v["reason"].as_str().unwrap_or_default(),
            );
        }
    }
    let version = loaded.version.map_or_else(
        || "an unversioned policy".to_owned(),
        |v| format!("policy version {v}"),
    );
    out += &format!(
        "{compliant} of {total} devices compliant ({pct}%) with {version} ({} rules{}); {} \
         violations\n",
        policy.rules.len(),
        if loaded.verified { "" } else { ", unverified" },
        violations.len(),
    );
    print_out(&out)?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs/examples")
            .join(name)
    }

    #[test]
    fn the_example_policy_parses_and_expresses_every_requirement() {
        let value = read_policy_file(&example("policy.toml")).expect("valid");
        let policy = parse_policy(value.to_string().as_bytes()).expect("valid");
        let checks: Vec<Value> = policy
            .rules
            .iter()
            .map(|r| serde_json::to_value(&r.check).expect("json"))
            .collect();
        for want in [
            json!({"reported": "firmware", "version_at_least": "4.2"}),
            json!({"reported": "telnet", "equals": false}),
            json!({"reported": "onvif_discovery", "equals": false}),
            json!({"reported": "default_password", "equals": false}),
            json!({"reported": "ntp", "subset_of": ["ntp1.city.example", "ntp2.city.example"]}),
            json!({"certificate_valid_days": 30}),
            json!({"seen_within_minutes": 10}),
            json!({"reported": "services", "subset_of": ["https", "mqtts", "ssh-tls"]}),
        ] {
            assert!(checks.contains(&want), "no rule checks {want}");
        }
    }

    #[test]
    fn toml_dates_become_strings_and_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "[[rules]]\nid = \"a\"\ndescription = \"d\"\nseverity = \"low\"\nselector = { all = true }\ncheck = { reported = \"since\", equals = 2026-01-01T00:00:00Z }\n",
        )
        .expect("write");
        let v = read_policy_file(&path).expect("valid");
        assert_eq!(v["rules"][0]["check"]["equals"], "2026-01-01T00:00:00Z");
        std::fs::write(&path, "rules = 3\n").expect("write");
        let e = format!("{:#}", read_policy_file(&path).expect_err("invalid"));
        assert!(e.contains("p.toml is not a valid policy"), "{e}");
    }
}
