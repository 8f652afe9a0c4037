//! `agent-sim`: fleets of simulated cityplane devices for demos and load tests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cityplane_agent_sim::scenario::{self, Progress, Scenario, ScenarioOptions};
use cityplane_agent_sim::{
    device_ids, Backoff, Class, ClassMix, Faults, FirmwareSim, PresenceMode, SimConfig,
    StepFailures,
};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

/// Simulated smart-city devices, each with its own X.509 certificate and
/// its own MQTT 3.1.1 connection over mutual TLS.
///
/// Devices speak the device side of docs/PROTOCOL.md: presence and will,
/// full reported state, commands applied (or rejected) and acknowledged,
/// firmware updates with a reboot. Works against any MQTT 3.1.1 broker that
/// trusts the PKI's CA (the cityplane broker, mosquitto, …).
#[derive(Parser, Debug)]
#[command(name = "agent-sim", version)]
#[command(
    after_help = "Example:\n  cityplane certs issue --pki ./pki --role device --count 1000 --prefix lamp\n  agent-sim run --pki ./pki --broker 127.0.0.1:8883 --devices 1000 --prefix lamp --scenario connect-storm --report storm.json\n  agent-sim run --pki ./pki --broker rmq1:8883,rmq2:8883,rmq3:8883 --devices 1000 --prefix lamp\n\nLogs go to stderr (RUST_LOG=debug for more); the summary goes to stdout."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a fleet, run a scenario, print a report.
    Run(Box<RunArgs>),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// PKI directory with ca.crt and <id>.crt/<id>.key per device.
    #[arg(long, env = "CITYPLANE_PKI")]
    pki: PathBuf,
    /// Broker address, HOST:PORT, or the nodes of a cluster as a
    /// comma-separated list HOST:PORT,HOST:PORT,…
    ///
    /// With a list, device number i (from 0, in id order) connects to node
    /// i mod N first, so the fleet starts evenly spread. After a failed
    /// connect (refused, TLS, CONNACK refusal, timeout) or a lost session a
    /// device tries the next node in the list, round-robin, with the usual
    /// backoff; after a reboot or an offline episode it tries its first
    /// node again. Rogue devices do the same. Every entry must resolve. The
    /// report counts the devices connected to each node.
    #[arg(
        long,
        env = "CITYPLANE_SERVER",
        default_value = "127.0.0.1:8883",
        value_name = "HOST:PORT[,HOST:PORT…]"
    )]
    broker: String,
    /// Name every node's certificate must carry (default: the HOST of each
    /// --broker entry).
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Number of devices: ids PREFIX0001 … PREFIX{N:04}.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Id prefix of the devices (as in `cityplane certs issue --prefix`).
    #[arg(long, default_value = "dev")]
    prefix: String,
    /// Device classes and their weights.
    #[arg(
        long,
        default_value = "streetlight=60,waste-bin=20,camera=15,air-sensor=5"
    )]
    mix: ClassMix,
    /// What to do once the fleet is up.
    #[arg(long, value_enum, default_value = "connect-storm")]
    scenario: Scenario,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Issue missing device (and operator) certificates first; needs ca.key.
    #[arg(long)]
    issue_missing: bool,
    /// Seed of every random choice (classes, states, jitter, faults).
    #[arg(long, default_value_t = 1)]
    seed: u64,

    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    scenario_args: ScenarioArgs,
    #[command(flatten)]
    faults: FaultArgs,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Connections")]
struct ConnectArgs {
    /// New connections per second across the fleet (0 = unpaced).
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Connections in the TCP/TLS/CONNECT phase at once.
    #[arg(long, default_value_t = 100)]
    max_in_flight: usize,
    /// MQTT keep-alive, seconds.
    #[arg(long, default_value_t = 30)]
    keep_alive: u16,
    /// Per-device telemetry interval in ms (default: off; 5000 for steady).
    #[arg(long)]
    telemetry_ms: Option<u64>,
    /// Who announces a device online: `publish` (devices publish
    /// {"online": true} on devices/D/presence, per the contract), `skip`
    /// (only the will; the broker announces), `auto` (probe the broker once).
    #[arg(long, default_value = "auto", value_parser = ["auto", "publish", "skip"])]
    presence: String,
    /// Publish reported state with the retain flag.
    #[arg(long)]
    retain_reported: bool,
    /// QoS of the commands subscription. Use 0 against RabbitMQ 3.10: its
    /// QoS 1 subscription queues are homed on one node, and devices of a
    /// dead node could not subscribe elsewhere until it is back. The
    /// controller re-sends a command until the device reports it, so 0
    /// loses nothing.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    commands_qos: u8,
    /// First reconnect delay, ms (doubles per failure, jittered).
    #[arg(long, default_value_t = 500)]
    backoff_initial_ms: u64,
    /// Largest reconnect delay, ms.
    #[arg(long, default_value_t = 30_000)]
    backoff_max_ms: u64,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Scenarios")]
struct ScenarioArgs {
    /// Bound on every wait (connecting, converging, coming back), seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// steady: seconds to run once everyone is online.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Operator identity (its certificate in --pki). Once the fleet is up it
    /// registers every device's class and zone with the controller (selectors
    /// match the registry, never what devices report); converge also
    /// publishes the desired document with it.
    #[arg(long)]
    operator: Option<String>,
    /// converge: KEY=VALUE to set (VALUE as JSON, else a string); default dimming=<random>.
    #[arg(long)]
    set: Option<String>,
    /// converge: device class to target.
    #[arg(long, default_value = "streetlight")]
    class: Class,
    /// reboot-wave: share of devices to reboot.
    #[arg(long, default_value_t = 1.0)]
    reboot_fraction: f64,
    /// reboot-wave: spread the reboots over this many seconds.
    #[arg(long, default_value_t = 5.0)]
    wave_s: f64,
    /// rogue: number of rogue devices (ids ROGUE_PREFIX0001…, device certificates).
    #[arg(long, default_value_t = 0)]
    rogue: usize,
    /// rogue: id prefix of the rogue devices.
    #[arg(long, default_value = "rogue")]
    rogue_prefix: String,
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Faults and firmware")]
struct FaultArgs {
    /// Random link drops per device per hour (reconnect with backoff).
    #[arg(long, default_value_t = 0.0)]
    link_drops_per_hour: f64,
    /// Offline episodes per device per hour (5–60 s each).
    #[arg(long, default_value_t = 0.0)]
    offline_per_hour: f64,
    /// Probability that a power loss interrupts a firmware update.
    #[arg(long, default_value_t = 0.0)]
    reboot_during_update: f64,
    /// rotation_lost_key: this device (repeat for more) loses the key of a
    /// certificate rotation before its certificate arrives, so it keeps
    /// its old certificate.
    #[arg(long, value_name = "ID")]
    rotation_lost_key: Vec<String>,
    /// Firmware image size, KiB.
    #[arg(long, default_value_t = 8192)]
    fw_size_kib: u64,
    /// Firmware download speed, KiB/s.
    #[arg(long, default_value_t = 2048.0)]
    fw_kib_per_s: f64,
    /// Failure probability of each update step (download, verify, install, health-check).
    #[arg(long, default_value_t = 0.0)]
    fw_fail: f64,
    /// The release public key (release.pub) devices are provisioned with:
    /// they then install only signed releases, downloading the image from
    /// the broker and checking its size and SHA-256. Without it, updates
    /// are simulated.
    #[arg(long, value_name = "PATH")]
    release_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
            .and_then(|rt| rt.block_on(run(*args))),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_set(s: &str) -> anyhow::Result<(String, serde_json::Value)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("--set {s:?}: expected KEY=VALUE"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.into()));
    Ok((k.trim().to_owned(), value))
}

fn issue_missing(args: &RunArgs) -> anyhow::Result<()> {
    use cityplane_certs::Pki;
    use cityplane_proto::Role;
    let pki = Pki::open(&args.pki)?;
    let issued = pki.issue_bulk(Role::Device, &args.prefix, args.devices, |_| {})?;
    if args.scenario_args.rogue > 0 {
        pki.issue_bulk(
            Role::Device,
            &args.scenario_args.rogue_prefix,
            args.scenario_args.rogue,
            |_| {},
        )?;
    }
    if let Some(op) = &args.scenario_args.operator {
        if pki.current_cert(op)?.is_none_or(|c| c.revoked) {
            pki.issue(Role::Operator, op)?;
        }
    }
    eprintln!(
        "certificates: {} issued, {} already there",
        issued.issued.len(),
        issued.skipped.len()
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    if args.issue_missing {
        issue_missing(&args)?;
    }
    let sa = &args.scenario_args;
    let c = &args.connect;
    let f = &args.faults;
    let telemetry = match (c.telemetry_ms, args.scenario) {
        (Some(0), _) => None,
        (Some(ms), _) => Some(Duration::from_millis(ms)),
        (None, Scenario::Steady) => Some(Duration::from_secs(5)),
        (None, _) => None,
    };
    let mut config = SimConfig::new(&args.pki, &args.broker, &args.prefix, args.devices);
    config.tls_server_name = args.tls_server_name.clone();
    config.rogue_ids = device_ids(&sa.rogue_prefix, sa.rogue);
    config.mix = args.mix.clone();
    config.seed = args.seed;
    config.connect_rate = c.connect_rate;
    config.max_connecting = c.max_in_flight;
    config.keep_alive = c.keep_alive;
    config.presence = match c.presence.as_str() {
        "publish" => PresenceMode::Publish,
        "skip" => PresenceMode::Skip,
        _ => PresenceMode::Auto,
    };
    config.retain_reported = c.retain_reported;
    config.commands_qos = c.commands_qos;
    config.telemetry_interval = telemetry;
    config.backoff = Backoff {
        initial: Duration::from_millis(c.backoff_initial_ms),
        max: Duration::from_millis(c.backoff_max_ms),
        multiplier: 2.0,
    };
    config.faults = Faults {
        link_drops_per_hour: f.link_drops_per_hour,
        offline_per_hour: f.offline_per_hour,
        reboot_during_update: f.reboot_during_update,
        rotation_lost_key: f.rotation_lost_key.iter().cloned().collect(),
        ..Faults::default()
    };
    config.release_key = f
        .release_key
        .as_deref()
        .map(cityplane_certs::firmware::read_public_key)
        .transpose()
        .context("--release-key")?;
    config.firmware = FirmwareSim {
        size_kib: f.fw_size_kib,
        download_kib_per_s: f.fw_kib_per_s,
        failure: StepFailures::all(f.fw_fail),
        ..FirmwareSim::default()
    };

    let mut opts = ScenarioOptions::new(args.scenario);
    opts.timeout = Duration::from_secs(sa.timeout_s);
    opts.duration = Duration::from_secs(sa.duration_s);
    opts.operator = sa.operator.clone();
    opts.set = sa.set.as_deref().map(parse_set).transpose()?;
    opts.class = sa.class;
    opts.id_prefix = Some(args.prefix.clone());
    opts.reboot_fraction = sa.reboot_fraction;
    opts.wave = Duration::from_secs_f64(sa.wave_s.max(0.0));

    let pb = progress_bar();
    let draw = |p: Progress<'_>| match p {
        Progress::Phase { what, len } => {
            pb.set_length(len);
            pb.set_position(0);
            pb.set_message(what.to_owned());
        }
        Progress::At(n) => pb.set_position(n),
        Progress::Done => pb.finish_and_clear(),
    };
    let report = scenario::run(config, opts, &draw).await?;
    print!("{report}");
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report.ok)
}

/// A scenario's progress bar on stderr.
fn progress_bar() -> ProgressBar {
    let pb = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg:<22} [{bar:40}] {pos}/{len} ({elapsed})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}
