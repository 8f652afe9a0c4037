//! `cityplane`: the operator binary.

mod audit_cmd;
mod broker_cmd;
mod certs_cmd;
mod cluster_cmd;
mod controller_cmd;
mod dashboard;
mod dashboard_cmd;

mod demo_cmd;
mod firmware_cmd;
mod governance_cmd;
mod incident_cmd;
mod ops_cmd;
mod policy_cmd;
mod rollout_cmd;
mod rotate_cmd;
mod secrets_cmd;
mod serve_cmd;
mod standby;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// cityplane keeps fleets of smart-city devices configured, patched and secure.
///
/// Every device, operator and controller holds its own X.509 certificate from
/// the project CA; the embedded MQTT broker (mutual TLS) lets each identity
/// publish and subscribe only where its role allows.
#[derive(Parser, Debug)]
#[command(name = "cityplane", version, propagate_version = true)]
#[command(
    after_help = "Start here (README.md walks through it):\n  cityplane certs init --pki ./pki\n  cityplane certs issue --pki ./pki --role operator --id operator --org city\n  cityplane certs issue --pki ./pki --role device --count 100 --prefix lamp --class streetlight --label zone=north\n  cityplane certs export-server --pki ./pki --out ./server-pki   # no ca.key\n  cityplane serve --pki ./server-pki --data ./data --listen 127.0.0.1:8883\n  cityplane get devices --pki ./pki      # the registry: every issued device\n  cityplane apply --pki ./pki -f desired.json --dry-run\n  cityplane firmware keygen --dir ./release   # then firmware sign, publish\n  cityplane rollout create --pki ./pki -f rollout.json --watch   # in waves, health-gated\n  cityplane secrets rotate --pki ./pki --name admin_password --selector '{\"class\": \"camera\"}'\n  cityplane policy validate -f policy.toml   # the city's security policy\n\nLogs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the CA and issue, list and revoke identities.
    #[command(subcommand)]
    Certs(certs_cmd::CertsCommand),
    /// Run the mTLS MQTT broker alone (in the foreground, until Ctrl-C).
    Broker(broker_cmd::BrokerArgs),
    /// Run everything on a throwaway CA: broker, controller, 1,000 simulated devices converging.
    Demo(demo_cmd::DemoArgs),
    /// Run broker + controller in one process (the embedded default).
    Serve(serve_cmd::ServeArgs),
    /// Run the controller alone, on an external broker (a RabbitMQ cluster).
    Controller(controller_cmd::ControllerArgs),
    /// Declare desired state for one device or a selector.
    Apply(ops_cmd::ApplyArgs),
    /// List devices or documents (`cityplane get devices`, `cityplane get documents`).
    Get(ops_cmd::GetArgs),
    /// Show one device (desired, reported, delta, conditions) or one document (history, status).
    Describe(ops_cmd::DescribeArgs),
    /// Fleet counts: total, online, converged, pending, failed, drifted.
    Status(ops_cmd::StatusArgs),
    /// The audit log of operator writes: filtered, verified through its hash chain, exported signed.
    Audit(audit_cmd::AuditArgs),
    /// The device registry: register devices from a manifest, set their attributes.
    #[command(subcommand)]
    Devices(ops_cmd::DevicesCommand),
    /// Delete a desired document (`cityplane delete document NAME`).
    Delete(ops_cmd::DeleteArgs),
    /// Change many devices in waves: firmware or configuration, health-gated, with abort and rollback.
    #[command(subcommand)]
    Rollout(rollout_cmd::RolloutCommand),
    /// Device secrets (admin passwords, API secrets): rotate them in waves, list their fingerprints.
    #[command(subcommand)]
    Secrets(secrets_cmd::SecretsCommand),
    /// Signed firmware: the release key, signing images, checking releases.
    #[command(
        subcommand,
        after_help = "The release key is not the CA: keep release.key offline, apart from ca.key.\n\nExamples:\n  cityplane firmware keygen --dir ./release\n  cityplane firmware sign sl200.bin --version 2.1.0 --model SL-200 --key ./release/release.key\n  cityplane firmware verify sl200.bin.release.json --image sl200.bin --key ./release/release.pub"
    )]
    Firmware(firmware_cmd::FirmwareCommand),
    /// Organisations: who may see and change which devices (the city's administrators manage them).
    #[command(subcommand)]
    Orgs(governance_cmd::OrgsCommand),
    /// How the fleet complies with the security policy: by rule, class, zone, owner; the worst devices.
    Compliance(governance_cmd::ComplianceArgs),
    /// The city's security policy: publish it, grant exceptions, sign and share it, check devices offline.
    #[command(
        subcommand,
        after_help = "The policy key is not the CA: keep policy.key offline; give policy.pub to every party.\n\nExamples:\n  cityplane policy validate -f policy.toml     # offline, see docs/examples/policy.toml\n  cityplane policy apply -f policy.toml        # to the server: evaluated on every report\n  cityplane compliance                         # who breaks which rule\n  cityplane policy keygen --dir ./policy-key\n  cityplane policy export --key ./policy-key/policy.key --out policy-v3.json\n  cityplane policy verify --file policy-v3.json --key ./policy-key/policy.pub\n  cityplane policy check --policy policy-v3.json --key ./policy-key/policy.pub --reported devices.json"
    )]
    Policy(policy_cmd::PolicyCommand),
    /// Cut devices off at once: certificates refused, sessions cut, out of rollouts, an incident audited.
    Quarantine(incident_cmd::QuarantineArgs),
    /// Bring quarantined devices back, each with a new certificate for the installer.
    Release(incident_cmd::ReleaseArgs),
    /// The operator dashboard in a browser: `cityplane dashboard login` prints a sign-in link.
    #[command(subcommand)]
    Dashboard(dashboard_cmd::DashboardCommand),
    /// Beyond one machine: a RabbitMQ cluster (mTLS, certificate login) and its users from the PKI.
    #[command(
        subcommand,
        after_help = "Examples:\n  cityplane cluster up --dir ./rabbit --pki ./pki          # 3 nodes on 127.0.0.1\n  cityplane cluster sync --dir ./rabbit --pki ./pki        # users + permissions from issued.jsonl\n  cityplane cluster status --dir ./rabbit\n  cityplane cluster stop-node --dir ./rabbit --node 2      # and start-node: one node down and back\n  cityplane cluster down --dir ./rabbit\n\nWhat holds on RabbitMQ and what does not: docs/DEPLOYMENT.md."
    )]
    Cluster(cluster_cmd::ClusterCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One-shot commands speak through their own output; servers log.
    init_tracing(match cli.command {
        Command::Broker(_) | Command::Serve(_) | Command::Controller(_) => "info,rumqttd=warn",
        Command::Certs(_) => "warn",
        // The demo draws progress bars; only errors may interrupt them.
        Command::Demo(_) => "error",
        _ => "warn",
    });
    let result = match cli.command {
        Command::Certs(cmd) => certs_cmd::run(cmd),
        Command::Broker(args) => {
            block_on_threads(args.worker_threads.unwrap_or(1), broker_cmd::run(args))
        }
        Command::Serve(args) => match args.broker.worker_threads {
            Some(n) => block_on_threads(n, serve_cmd::run(args)),
            None => block_on(serve_cmd::run(args)),
        },
        Command::Controller(args) => block_on(controller_cmd::run(args)),
        Command::Demo(args) => block_on(demo_cmd::run(args)),
        Command::Apply(args) => block_on(ops_cmd::apply(args)),
        Command::Get(args) => block_on(ops_cmd::get(args)),
        Command::Describe(args) => block_on(ops_cmd::describe(args)),
        Command::Status(args) => block_on(ops_cmd::status(args)),
        Command::Audit(args) => block_on(audit_cmd::run(args)),
        Command::Devices(cmd) => block_on(ops_cmd::devices(cmd)),
        Command::Delete(args) => block_on(ops_cmd::delete(args)),
        Command::Rollout(cmd) => block_on(rollout_cmd::run(cmd)),
        Command::Secrets(cmd) => block_on(secrets_cmd::run(cmd)),
        Command::Firmware(cmd) => firmware_cmd::run(cmd),
        Command::Orgs(cmd) => block_on(governance_cmd::orgs(cmd)),
        Command::Compliance(args) => block_on(governance_cmd::compliance(args)),
        Command::Quarantine(args) => block_on(incident_cmd::quarantine(args)),
        Command::Release(args) => block_on(incident_cmd::release(args)),
        Command::Dashboard(cmd) => block_on(dashboard_cmd::run(cmd)),
        Command::Cluster(cmd) => block_on(cluster_cmd::run(cmd)),
        // Its own exit statuses: 1 for violations, 2 for invalid input.
        Command::Policy(cmd) => match policy_cmd::run(cmd) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(work)
}

fn block_on_threads(
    threads: u16,
    work: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(threads))
        .enable_all()
        .build()?
        .block_on(work)
}

fn init_tracing(default: &str) {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned());
    // Colours for a terminal only: a log file should not hold escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    cityplane_broker::logging::init_stderr(&directives, ansi);
}

#[cfg(test)]
mod tests {
    /// clap checks a command's definition only when it is parsed: every
    /// subcommand's, here, so a clash (two `--version`s) fails the tests
    /// rather than a user's first run.
    #[test]
    fn every_command_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
