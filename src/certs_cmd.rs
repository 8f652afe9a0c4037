//! `cityplane certs …`: create the CA, issue, revoke and list certificates.
//!
//! Every party on the broker (device, operator, controller) proves who it is
//! with its own X.509 certificate: CN = identity, OU = role. These commands
//! manage the PKI directory holding them (see `cityplane_certs`).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use cityplane_certs::{
    CertError, CertInfo, Pki, CRL_VALIDITY_DAYS, DEFAULT_VALIDITY_DAYS, MAX_OVERLAP_DAYS,
};
use cityplane_proto::messages::Attributes;
use cityplane_proto::Role;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

/// Where the PKI lives. Shared by every `certs` subcommand.
#[derive(Args, Debug, Clone)]
pub struct PkiDir {
    /// PKI directory: the CA (ca.crt, ca.key), the broker's certificate
    /// (broker.crt, broker.key), one <id>.crt/<id>.key per identity, and the
    /// revocation list (revoked.json, crl.pem). Example: --pki /etc/cityplane/pki
    #[arg(
        long = "pki",
        value_name = "DIR",
        env = "CITYPLANE_PKI",
        default_value = "./pki"
    )]
    pub dir: PathBuf,
}

/// Registry attributes recorded with device certificates.
#[derive(Args, Debug, Clone, Default)]
pub struct AttributeArgs {
    /// Device class (registry attribute). Example: --class streetlight
    #[arg(long, value_name = "CLASS")]
    pub class: Option<String>,
    /// Label KEY=VALUE (registry attribute), repeatable. Example: --label zone=north
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Owning organisation (registry attribute). Example: --owner lighting-co
    #[arg(long, value_name = "ORG")]
    pub owner: Option<String>,
}

impl AttributeArgs {
    fn into_attributes(self, role: RoleArg) -> Result<Attributes> {
        let attributes = Attributes {
            class: self.class,
            labels: self.labels.into_iter().collect(),
            owner: self.owner,
        };
        if attributes != Attributes::default() && role != RoleArg::Device {
            anyhow::bail!("--class, --label and --owner describe devices; this is --role {role:?}");
        }
        Ok(attributes)
    }
}

/// `KEY=VALUE`, both non-empty.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} must be KEY=VALUE, both non-empty")),
    }
}

/// Server directories that get copies of the revocation list.
#[derive(Args, Debug, Clone, Default)]
pub struct AlsoDirs {
    /// Also copy revoked.json, crl.pem and issued.jsonl into this server
    /// directory (made by `certs export-server` from this PKI); repeat for
    /// several servers.
    /// Example: --also /etc/cityplane/server-pki
    #[arg(long = "also", value_name = "SERVER_DIR")]
    pub dirs: Vec<PathBuf>,
}

/// What a certificate holder may do on the broker.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleArg {
    /// A field device: publishes its own state and telemetry, receives its own commands.
    Device,
    /// A human or script: sets desired state and reads fleet status.
    Operator,
    /// The reconciling controller service.
    Controller,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Device => Role::Device,
            RoleArg::Operator => Role::Operator,
            RoleArg::Controller => Role::Controller,
        }
    }
}

/// How `certs list` prints.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// A JSON array of {id, role, serial, not_after, revoked, cert_path, org,
    /// revoked_from} for scripts (revoked_from: a revocation recorded for a
    /// later instant; the certificate works until then).
    Json,
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the CA, the broker's certificate and an empty revocation list
    #[command(
        long_about = "Create a new PKI: a CA (ECDSA P-256, valid 10 years), the broker's server \
certificate (for localhost and 127.0.0.1), an empty revocation list (revoked.json) and an \
empty CRL (crl.pem). The directory is created with mode 0700 if missing; an existing one \
that group or others can write to is refused. Private keys are written with mode 0600. Keep \
ca.key secret: whoever holds it can mint any identity; servers run from a directory made by \
`certs export-server`, without it.",
        after_help = "Examples:\n  \
cityplane certs init --pki ./pki\n  \
CITYPLANE_PKI=/etc/cityplane/pki cityplane certs init"
    )]
    Init {
        #[command(flatten)]
        pki: PkiDir,
        /// Replace an existing CA. Every certificate the old CA issued stops
        /// working and its files are deleted; all devices need new certificates.
        /// Default: refuse if DIR already holds ca.crt or ca.key.
        #[arg(long)]
        force: bool,
    },

    /// Issue a certificate for one identity (--id) or many (--count/--prefix)
    #[command(
        long_about = "Issue client certificates signed by the CA in DIR. Each identity gets \
<id>.crt and <id>.key (mode 0600) in DIR: CN = id, OU = role, a random serial, valid from one \
hour ago (clock skew) for --days days.\n\n\
With --id, refuses if the identity already has a valid certificate: pass --rotate to issue a \
new key and certificate and revoke the old one. An identity whose certificate was revoked can \
simply be issued again.\n\n\
With --count N --prefix P, issues P0001 … PNNNN (4 digits, more past 9999). Identities that \
already have a valid certificate are skipped and keep it, so a run can be repeated or extended.\n\n\
Identities use lowercase letters, digits, '.', '_' and '-', start with a letter or digit, and \
are at most 64 characters; 'ca' and 'broker' are reserved.",
        after_help = "Examples:\n  \
cityplane certs issue --role device --id streetlight-0042\n  \
cityplane certs issue --role operator --id alice --org city --days 90\n  \
cityplane certs issue --role operator --id bob --org lighting-co   # a contractor: sees its scope\n  \
cityplane certs issue --role device --id streetlight-0042 --rotate\n  \
cityplane certs issue --role device --count 10000 --prefix dev   # dev0001 … dev10000\n  \
cityplane certs issue --role device --id lamp-0001 --class streetlight --label zone=north --owner lighting-co\n\n\
--class, --label and --owner are registry attributes: they go into issued.jsonl, from which a \
server reading this directory (or a server directory kept current with --also) registers a new \
device. Selectors in desired documents match them; what a device reports never does.\n\n\
An operator belongs to an organisation (--org, written as the certificate's O): --org city for \
the city's own administrators, who see every device; any other organisation (a contractor) \
sees only the devices the controller puts in its scope.",
        group(ArgGroup::new("who").required(true).args(["id", "count"]))
    )]
    Issue {
        #[command(flatten)]
        pki: PkiDir,
        /// Role written into the certificate (its OU); the broker grants
        /// permissions by role.
        #[arg(long, value_enum, value_name = "ROLE")]
        role: RoleArg,
        /// Identity to issue for: becomes the certificate CN, the MQTT client
        /// id and the file names <ID>.crt/<ID>.key. Example: --id dev0001
        #[arg(long, value_name = "ID", conflicts_with_all = ["count", "prefix"])]
        id: Option<String>,
        /// Issue this many certificates, named by --prefix plus a 4-digit
        /// number starting at 0001. Example: --count 500 --prefix lamp
        #[arg(
            long,
            value_name = "N",
            requires = "prefix",
            value_parser = clap::value_parser!(u32).range(1..=1_000_000)
        )]
        count: Option<u32>,
        /// Prefix of the identities --count creates. Example: --prefix lamp
        /// gives lamp0001, lamp0002, …
        #[arg(long, value_name = "P", requires = "count")]
        prefix: Option<String>,
        /// Replace the identity's current certificate: issue a new key and
        /// serial, and revoke the old serial at once. Only with --id. Default:
        /// refuse if a valid certificate exists. To keep the old one working
        /// while the new one is deployed: `certs rotate --id ID --overlap 24h`.
        #[arg(long, conflicts_with = "count")]
        rotate: bool,
        /// The operator's organisation, written as the certificate's O.
        /// Required for operators, refused for devices and controllers.
        /// `city` is the city's own administrators (every device); any other
        /// organisation sees only its scope. Example: --org lighting-co
        #[arg(long, value_name = "ORG")]
        org: Option<String>,
        /// How many days the new certificates are valid (1 to 3650). They
        /// start one hour in the past to tolerate clock skew. Example: --days 90
        #[arg(
            long,
            value_name = "D",
            default_value_t = DEFAULT_VALIDITY_DAYS,
            value_parser = clap::value_parser!(u32).range(1..=3650)
        )]
        days: u32,
        #[command(flatten)]
        attributes: AttributeArgs,
        #[command(flatten)]
        also: AlsoDirs,
    },

    /// Revoke a certificate, by identity or by serial
    #[command(
        long_about = "Revoke a certificate: its serial is added to revoked.json (written durably \
before this command returns) and to crl.pem, which is re-signed by the CA. The broker refuses \
revoked certificates. The identity can later get a new certificate with `certs issue`.\n\n\
Works without the certificate file: --id finds the identity's serials in issued.jsonl, and any \
serial can be revoked (even one this directory never issued). Revoking something already revoked \
re-signs crl.pem and copies the list to the --also directories again, so re-running after a \
failure completes the job.\n\n\
A broker serving from a server directory (see `certs export-server`) reads that directory's \
revoked.json: name it with --also so the revocation reaches it.",
        after_help = "Examples:\n  \
cityplane certs revoke --pki ./pki --id dev0001\n  \
cityplane certs revoke --pki ./pki --serial 3f2a…   # serial as shown by `certs list`\n  \
cityplane certs revoke --pki ./pki --id dev0001 --also /etc/cityplane/server-pki",
        group(ArgGroup::new("which").required(true).args(["id", "serial"]))
    )]
    Revoke {
        #[command(flatten)]
        pki: PkiDir,
        /// Revoke every valid certificate of this identity: DIR/<ID>.crt and
        /// any recorded in DIR/issued.jsonl whose file is gone.
        /// Example: --id dev0001
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Revoke the certificate with this serial number: hex, as `certs
        /// list` shows it (case and ':' separators do not matter).
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        #[command(flatten)]
        also: AlsoDirs,
    },

    /// Replace a certificate, the old one working for an overlap; or the server's own
    #[command(
        long_about = "Replace a certificate before it is compromised or expires.\n\n\
With --id: issue a new key and certificate for the identity, with the role and organisation of \
its current certificate, and record its old serial(s) in revoked.json as revoked from now + \
--overlap. Until then both certificates work, so the new files can be deployed without cutting \
the holder off (an operator's machine, a controller, a service); from then on the broker cuts \
every session of the old certificate and refuses it at the handshake. A stolen old certificate \
works during the overlap too: keep it short, and to cut a certificate at once use `certs revoke` \
(which also ends a running overlap). --overlap 0 (the default) revokes at once, as \
`certs issue --rotate`.\n\n\
crl.pem lists an old serial only once its overlap is over: brokers that read the CRL \
(mosquitto) learn of it from the next command that writes the CRL after that instant, e.g. \
`certs crl`. Our broker reads revoked.json and needs nothing more than the copy --also makes.\n\n\
With --server: write a new broker.key and broker.crt signed by the same CA, for the names of \
the current certificate or those given with --dns-name. Devices trust the CA, so they accept it \
at their next connection. A running server keeps the certificate it started with: copy the new \
files with `certs export-server` and restart it.",
        after_help = "Examples:\n  \
cityplane certs rotate --pki ./pki --id alice --overlap 24h --also /etc/cityplane/server-pki\n  \
cityplane certs rotate --pki ./pki --id controller --overlap 30m\n  \
cityplane certs rotate --pki ./pki --id lamp0042                 # no overlap: revoked at once\n  \
cityplane certs rotate --pki ./pki --server --dns-name broker.city.example --dns-name 10.0.0.5\n  \
cityplane certs rotate --selector class=camera --before 30d        # the fleet's devices, as a rollout\n  \
cityplane certs export-server --pki ./pki --out /etc/cityplane/server-pki   # then restart serve",
        group(ArgGroup::new("what").required(true).args(["id", "server", "selector", "devices"]))
    )]
    Rotate {
        #[command(flatten)]
        pki: PkiDir,
        #[command(flatten)]
        fleet: crate::rotate_cmd::FleetRotateArgs,
        /// Identity whose certificate to replace; keeps its role and, for an
        /// operator, its organisation. Example: --id alice
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// How long the old certificate keeps working: 90s, 30m, 24h, 7d (a
        /// bare number is minutes), at most 30 days. Default 0: revoked at once.
        #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_overlap, conflicts_with = "server")]
        overlap: u64,
        /// How many days the new certificate is valid (1 to 3650).
        #[arg(
            long,
            value_name = "D",
            default_value_t = DEFAULT_VALIDITY_DAYS,
            value_parser = clap::value_parser!(u32).range(1..=3650),
            conflicts_with = "server"
        )]
        days: u32,
        /// Replace the broker's own certificate (broker.crt, broker.key)
        /// instead of an identity's.
        #[arg(long, conflicts_with = "id")]
        server: bool,
        /// A name the new server certificate is valid for, DNS name or IP
        /// address; repeatable. Default: the names of the current broker.crt.
        /// Example: --dns-name broker.city.example
        #[arg(long = "dns-name", value_name = "NAME", requires = "server")]
        dns_names: Vec<String>,
        #[command(flatten)]
        also: AlsoDirs,
    },

    /// Re-sign crl.pem (nextUpdate is 30 days out): run it from cron
    #[command(
        long_about = "Re-sign crl.pem from revoked.json with a fresh nextUpdate (30 days from \
now). Clients and brokers that read the CRL (mosquitto's crlfile) refuse everyone once \
nextUpdate has passed, so run this regularly, e.g. weekly from cron. Our own broker reads \
revoked.json and does not depend on it.",
        after_help = "Examples:\n  \
cityplane certs crl --pki ./pki\n  \
cityplane certs crl --pki ./pki --also /etc/cityplane/server-pki   # e.g. weekly from cron"
    )]
    Crl {
        #[command(flatten)]
        pki: PkiDir,
        #[command(flatten)]
        also: AlsoDirs,
    },

    /// Copy what a server needs (never ca.key) into its own directory
    #[command(
        name = "export-server",
        long_about = "Create (or refresh) a server directory: ca.crt, broker.crt, broker.key \
(mode 0600), revoked.json and crl.pem, copied from the CA directory. Never ca.key: a server \
that can be broken into must not be able to mint identities. Run `cityplane serve` or \
`cityplane broker` with --pki pointing at it, and keep the CA directory on another host or \
offline. Revocations reach the server directory through `certs revoke --also OUT` (or by \
running this command again).",
        after_help = "Examples:\n  \
cityplane certs export-server --pki ./pki --out /etc/cityplane/server-pki\n  \
cityplane serve --pki /etc/cityplane/server-pki --data ./data"
    )]
    ExportServer {
        #[command(flatten)]
        pki: PkiDir,
        /// Server directory to write (created with mode 0700 if missing).
        /// Example: --out /etc/cityplane/server-pki
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },

    /// List issued certificates, revoked ones included
    #[command(
        long_about = "List every identity certificate in DIR, and revoked certificates that \
were since replaced by a newer one. Sorted by identity.",
        after_help = "Examples:\n  \
cityplane certs list\n  \
cityplane certs list --role operator\n  \
cityplane certs list --output json | jq '.[] | select(.revoked)'"
    )]
    List {
        #[command(flatten)]
        pki: PkiDir,
        /// Show only certificates of this role. Default: all roles.
        #[arg(long, value_enum, value_name = "ROLE")]
        role: Option<RoleArg>,
        /// Output format.
        #[arg(long, value_enum, value_name = "FORMAT", default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
}

/// Runs one `certs` subcommand. Blocking (bulk issue uses its own threads).
pub fn run(cmd: CertsCommand) -> Result<()> {
    match cmd {
        CertsCommand::Init { pki, force } => init(&pki.dir, force),
        CertsCommand::Issue {
            pki,
            role,
            id,
            count,
            prefix,
            rotate,
            org,
            days,
            attributes,
            also,
        } => {
            let attributes = attributes.into_attributes(role)?;
            let mut pki = open(&pki.dir)?
                .with_validity_days(days)?
                .with_attributes(attributes);
            match (role, org) {
                (RoleArg::Operator, Some(org)) => pki = pki.with_org(&org)?,
                (RoleArg::Operator, None) => anyhow::bail!(
                    "an operator belongs to an organisation: --org city for the city's own \
                     administrators, or the contractor's organisation, e.g. --org lighting-co"
                ),
                (_, None) => {}
                (role, Some(_)) => anyhow::bail!(
                    "--org is for operators; a {} belongs to no organisation",
                    Role::from(role)
                ),
            }
            match (id, count, prefix) {
                (Some(id), _, _) => issue_one(&pki, role.into(), &id, rotate),
                (None, Some(count), Some(prefix)) => issue_many(&pki, role.into(), &prefix, count),
                // clap's argument groups make this unreachable; say so if not.
                _ => anyhow::bail!("pass either --id ID or --count N --prefix P"),
            }?;
            publish(&pki, &also.dirs)
        }
        CertsCommand::Revoke {
            pki,
            id,
            serial,
            also,
        } => revoke(&pki.dir, id, serial, &also.dirs),
        CertsCommand::Rotate { pki, fleet, .. } if fleet.is_set() => {
            crate::block_on(crate::rotate_cmd::run(fleet, pki.dir))
        }
        CertsCommand::Rotate {
            pki,
            id,
            overlap,
            days,
            server: _,
            dns_names,
            also,
            fleet: _,
        } => match id {
            Some(id) => rotate_id(&pki.dir, &id, overlap, days, &also.dirs),
            None => rotate_server(&pki.dir, &dns_names, &also.dirs),
        },
        CertsCommand::Crl { pki, also } => crl(&pki.dir, &also.dirs),
        CertsCommand::ExportServer { pki, out } => export_server(&pki.dir, &out),
        CertsCommand::List { pki, role, output } => list(&pki.dir, role.map(Role::from), output),
    }
}

fn open(dir: &Path) -> Result<Pki> {
    Pki::open(dir).with_context(|| format!("cannot use the PKI in {}", dir.display()))
}

fn init(dir: &Path, force: bool) -> Result<()> {
    let replaced = if force {
        Pki::open(dir).and_then(|p| p.list()).map_or(0, |l| l.len())
    } else {
        0
    };
    let pki = Pki::init(dir, force)
        .with_context(|| format!("cannot initialise a PKI in {}", dir.display()))?;
    let d = pki.dir().display();
    let mut out = String::new();
    if force {
        out += &format!(
            "Replaced the CA in {d}; removed {replaced} certificate(s) issued by the old one.\n"
        );
    }
    out += &format!(
        "Initialised PKI in {d}:\n  \
         ca.crt, ca.key          the CA (keep ca.key secret: it can mint any identity)\n  \
         broker.crt, broker.key  the broker's server certificate (localhost, 127.0.0.1)\n  \
         revoked.json, crl.pem   revocation list and CRL (empty; re-sign the CRL within \
         {CRL_VALIDITY_DAYS} days: `cityplane certs crl`)\n\
         Next: cityplane certs issue --pki {d} --role device --id dev0001\n\
         Servers: cityplane certs export-server --pki {d} --out ./server-pki  (no ca.key)\n"
    );
    print_out(&out)
}

fn issue_one(pki: &Pki, role: Role, id: &str, rotate: bool) -> Result<()> {
    let ctx = || {
        format!(
            "cannot issue a certificate for {id:?} in {}",
            pki.dir().display()
        )
    };
    let info = if rotate {
        let rotated = pki.rotate_reporting(role, id).with_context(ctx)?;
        let mut out = format!("rotated {role} certificate of {id}\n");
        for old in &rotated.revoked {
            out += &format!("  revoked    {} (old)\n", old.serial);
        }
        if rotated.revoked.is_empty() {
            out += "  (no valid certificate to revoke)\n";
        } else {
            out += &format!(
                "  (a server directory learns of it with `cityplane certs crl --pki {} --also \
                 SERVER_DIR`)\n",
                pki.dir().display()
            );
        }
        print_out(&out)?;
        rotated.cert
    } else {
        let info = pki.issue(role, id).with_context(ctx)?;
        print_out(&format!("issued {role} certificate for {id}\n"))?;
        info
    };
    print_out(&format!(
        "  serial     {}\n  not after  {}\n  cert       {}\n  key        {} \
         (mode 0600: install it on {id} only, keep it secret)\n  ca         {}\n",
        info.serial,
        info.not_after,
        info.cert_path.display(),
        pki.key_path(id).display(),
        pki.ca_cert_path().display(),
    ))
}

fn issue_many(pki: &Pki, role: Role, prefix: &str, count: u32) -> Result<()> {
    let count = usize::try_from(count).context("--count is too large for this machine")?;
    let bar = ProgressBar::new(u64::try_from(count).unwrap_or(u64::MAX));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} certs ({per_sec}, ETA {eta})",
        )
        .context("bad progress bar template")?,
    );
    let start = Instant::now();
    let result = pki.issue_bulk(role, prefix, count, |done| {
        bar.set_position(u64::try_from(done).unwrap_or(u64::MAX));
    });
    bar.finish_and_clear();
    let out = result.with_context(|| {
        format!(
            "cannot issue {count} {role} certificates with prefix {prefix:?} in {} \
             (certificates written so far are kept; re-running skips them)",
            pki.dir().display()
        )
    })?;
    let secs = start.elapsed().as_secs_f64();
    print_out(&format!(
        "issued {} {role} certificate(s), skipped {} already issued, in {secs:.1} s; files under {}\n",
        out.issued.len(),
        out.skipped.len(),
        pki.dir().display()
    ))
}

fn revoke(dir: &Path, id: Option<String>, serial: Option<String>, also: &[PathBuf]) -> Result<()> {
    let pki = open(dir)?;
    let (result, what) = match (id, serial) {
        (Some(id), _) => (pki.revoke_id_all(&id), format!("identity {id:?}")),
        (None, Some(serial)) => (
            pki.revoke_serial(&serial).map(|e| vec![e]),
            format!("serial {serial}"),
        ),
        (None, None) => anyhow::bail!("pass --id ID or --serial HEX"),
    };
    let mut out = String::new();
    match result {
        Ok(entries) => {
            for e in entries {
                let whose = if e.id.is_empty() {
                    "(no record of it here: revoked anyway)".to_owned()
                } else {
                    format!("of {}", e.id)
                };
                out += &format!(
                    "revoked certificate {} {whose} at {}\n",
                    e.serial, e.revoked_at
                );
            }
        }
        // Re-running after a crash or a failed --also: the CRL was re-signed
        // from revoked.json, and the copies below are made again.
        Err(CertError::AlreadyRevoked { serial, id }) => {
            out +=
                &format!("certificate {serial} of {id} was already revoked; crl.pem re-signed\n");
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot revoke {what} in {}", dir.display()))
        }
    }
    out += &format!(
        "  updated {} and {}\n",
        pki.revocation_path().display(),
        pki.crl_path().display()
    );
    print_out(&out)?;
    publish(&pki, also)
}

/// `--overlap`: seconds, at most [`MAX_OVERLAP_DAYS`].
fn parse_overlap(text: &str) -> Result<u64, String> {
    let secs = crate::governance_cmd::parse_duration(text).map_err(|e| e.to_string())?;
    if secs > u64::from(MAX_OVERLAP_DAYS) * 86_400 {
        return Err(format!(
            "at most {MAX_OVERLAP_DAYS} days: during the overlap a stolen old certificate works \
             too (revoke at once with `certs revoke`)"
        ));
    }
    Ok(secs)
}

fn rotate_id(dir: &Path, id: &str, overlap: u64, days: u32, also: &[PathBuf]) -> Result<()> {
    let pki = open(dir)?.with_validity_days(days)?;
    let overlap_secs = i64::try_from(overlap).context("--overlap is too long")?;
    let rotated = pki
        .rotate_overlapping(id, time::Duration::seconds(overlap_secs))
        .with_context(|| {
            format!(
                "cannot rotate the certificate of {id:?} in {}",
                dir.display()
            )
        })?;
    let info = &rotated.cert;
    let org = info
        .org
        .as_deref()
        .map(|o| format!(" of organisation {o}"))
        .unwrap_or_default();
    let mut out = format!(
        "rotated {} certificate of {id}{org}\n  serial     {}\n  not after  {}\n  cert       {}\n  \
         key        {} (mode 0600: install it on {id} only, keep it secret)\n  ca         {}\n",
        info.role,
        info.serial,
        info.not_after,
        info.cert_path.display(),
        pki.key_path(id).display(),
        pki.ca_cert_path().display(),
    );
    let mut until = None;
    for old in &rotated.revoked {
        match &old.effective_at {
            Some(at) => {
                out += &format!(
                    "  old        {} works until {at}, revoked from then on\n",
                    old.serial
                );
                until = Some(at.clone());
            }
            None => out += &format!("  old        {} revoked now\n", old.serial),
        }
    }
    let d = dir.display();
    match until {
        Some(at) => {
            out += &format!(
                "Deploy the new files on {id} before {at}: the old certificate stops working then.\n\
                 Servers: our broker cuts it at that instant by itself once its directory has this \
                 revoked.json ({}). Brokers reading crl.pem (mosquitto) learn of it only from a CRL \
                 written after {at}: run `cityplane certs crl --pki {d} --also SERVER_DIR` then.\n",
                if also.is_empty() {
                    format!("pass --also SERVER_DIR, or `cityplane certs crl --pki {d} --also SERVER_DIR`")
                } else {
                    "copied below".to_owned()
                }
            );
        }
        None if rotated.revoked.is_empty() => {}
        None => {
            if also.is_empty() {
                out += &format!(
                    "A server directory learns of it with `cityplane certs crl --pki {d} --also SERVER_DIR`.\n"
                );
            }
        }
    }
    print_out(&out)?;
    publish(&pki, also)
}

fn rotate_server(dir: &Path, names: &[String], also: &[PathBuf]) -> Result<()> {
    let pki = open(dir)?;
    let r = pki.rotate_server(names).with_context(|| {
        format!(
            "cannot rotate the broker's certificate in {}",
            dir.display()
        )
    })?;
    let was = r
        .old_serial
        .as_deref()
        .map(|s| format!(" (was {s})"))
        .unwrap_or_default();
    print_out(&format!(
        "rotated the broker's certificate in {d} for {names}\n  serial     {serial}{was}\n  \
         not after  {not_after}\n  cert       {crt}\n  key        {key} (mode 0600)\n\
         Devices trust the CA, so they accept it at their next connection. A running server keeps \
         the certificate it started with:\n  \
         cityplane certs export-server --pki {d} --out SERVER_DIR\n  \
         then restart `cityplane serve` (or `cityplane broker`) on SERVER_DIR.\n",
        d = dir.display(),
        names = r.names.join(", "),
        serial = r.serial,
        not_after = r.not_after,
        crt = pki.server_cert_path().display(),
        key = pki.server_key_path().display(),
    ))?;
    if !also.is_empty() {
        print_out(
            "  (--also copies revocations only; the server's certificate needs export-server)\n",
        )?;
    }
    Ok(())
}

fn crl(dir: &Path, also: &[PathBuf]) -> Result<()> {
    let pki = open(dir)?;
    let info = pki
        .refresh_crl()
        .with_context(|| format!("cannot re-sign the CRL in {}", dir.display()))?;
    print_out(&format!(
        "re-signed {} ({} revoked serial(s)); next update {}: run this again before then\n",
        info.path.display(),
        info.revoked,
        info.next_update
    ))?;
    if let Some(at) = &info.pending_until {
        print_out(&format!(
            "  a revocation recorded for later takes effect at {at}: the CRL lists it only \
             when re-signed after then\n"
        ))?;
    }
    publish(&pki, also)
}

/// Copies the revocation list into each server directory.
fn publish(pki: &Pki, also: &[PathBuf]) -> Result<()> {
    for dir in also {
        pki.publish_revocations(dir).with_context(|| {
            format!(
                "{} is updated but the server directory {} is NOT: fix the error and re-run \
                 the same command",
                pki.dir().display(),
                dir.display()
            )
        })?;
        print_out(&format!(
            "  copied revoked.json, crl.pem and issued.jsonl to {}\n",
            dir.display()
        ))?;
    }
    Ok(())
}

fn export_server(dir: &Path, out: &Path) -> Result<()> {
    let pki = open(dir)?;
    let written = pki.export_server(out).with_context(|| {
        format!(
            "cannot export a server directory from {} to {}",
            dir.display(),
            out.display()
        )
    })?;
    let mut text = format!(
        "exported a server directory to {} (no ca.key):\n",
        out.display()
    );
    for path in written {
        text += &format!("  {}\n", path.display());
    }
    text += &format!(
        "Serve from it: cityplane serve --pki {o}\n\
         Revoke with:   cityplane certs revoke --pki {d} --id ID --also {o}\n\
         Keep {d} (it holds ca.key) off the server.\n",
        o = out.display(),
        d = dir.display()
    );
    print_out(&text)
}

fn list(dir: &Path, role: Option<Role>, output: OutputFormat) -> Result<()> {
    let pki = open(dir)?;
    let mut certs = pki
        .list()
        .with_context(|| format!("cannot list the certificates in {}", dir.display()))?;
    if let Some(role) = role {
        certs.retain(|c| c.role == role);
    }
    match output {
        OutputFormat::Json => {
            let json = serde_json::to_string_pretty(&certs).context("cannot encode JSON")?;
            print_out(&format!("{json}\n"))
        }
        OutputFormat::Table => {
            if certs.is_empty() {
                eprintln!(
                    "no certificates in {}{}; issue one with `cityplane certs issue --pki {} --role device --id dev0001`",
                    dir.display(),
                    role.map(|r| format!(" with role {r}")).unwrap_or_default(),
                    dir.display()
                );
                return Ok(());
            }
            print_out(&table(&certs))
        }
    }
}

fn table(certs: &[CertInfo]) -> String {
    let header = ["ID", "ROLE", "ORG", "SERIAL", "NOT-AFTER", "REVOKED"];
    let pending: Vec<Option<String>> = certs
        .iter()
        .map(|c| c.revoked_from.as_ref().map(|t| format!("revoked from {t}")))
        .collect();
    let rows: Vec<[&str; 6]> = certs
        .iter()
        .zip(&pending)
        .map(|(c, pending)| {
            [
                c.id.as_str(),
                c.role.as_str(),
                c.org.as_deref().unwrap_or("-"),
                c.serial.as_str(),
                if c.not_after.is_empty() {
                    "-"
                } else {
                    &c.not_after
                },
                match (pending, c.revoked) {
                    (Some(from), _) => from.as_str(),
                    (None, true) => "yes",
                    (None, false) => "no",
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

/// Prints to stdout; a closed pipe (`… | head`) is not an error.
pub(crate) fn print_out(s: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(s.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}
