use std::path::PathBuf;

use anyhow::Context;
use cityplane_broker::Broker;
use cityplane_controller::store::StoreLocation;
use cityplane_controller::{Controller, ControllerConfig, StoreUrl};

use crate::broker_cmd::{self, BrokerArgs};

/// Broker and controller in one process: the embedded default.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  cityplane certs init --pki ./pki && cityplane certs issue --pki ./pki --role operator --id operator\n  cityplane certs export-server --pki ./pki --out ./server-pki   # no ca.key\n  cityplane serve --pki ./server-pki --data ./data --listen 127.0.0.1:8883\n  cityplane apply -f desired.json --wait"
)]
pub struct ServeArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub controller: ControllerOpts,
    /// Serve the operator dashboard on this address (loopback only, e.g.
    /// 127.0.0.1:8080; port 0 picks one). Operators sign in with a link
    /// from `cityplane dashboard login`. Default: no dashboard
    #[arg(long, env = "CITYPLANE_DASHBOARD", value_name = "ADDR")]
    pub dashboard: Option<std::net::SocketAddr>,
    /// Serve the dashboard over HTTPS with this certificate chain (PEM),
    /// which lets it listen beyond loopback (the server's broker.crt will
    /// do for browsers that trust the CA)
    #[arg(long, env = "CITYPLANE_DASHBOARD_TLS_CERT", value_name = "FILE", requires_all = ["dashboard", "dashboard_tls_key"])]
    pub dashboard_tls_cert: Option<PathBuf>,
    /// The key of --dashboard-tls-cert (PEM)
    #[arg(
        long,
        env = "CITYPLANE_DASHBOARD_TLS_KEY",
        value_name = "FILE",
        requires = "dashboard_tls_cert"
    )]
    pub dashboard_tls_key: Option<PathBuf>,
    /// The address browsers use for the dashboard, e.g.
    /// https://dashboard.city.example:8443 (needed when it listens on
    /// 0.0.0.0): the only Host answered and the sign-in links' base.
    /// Default: the address it listens on
    #[arg(
        long,
        env = "CITYPLANE_DASHBOARD_URL",
        value_name = "URL",
        requires = "dashboard"
    )]
    pub dashboard_url: Option<String>,
}

/// The controller's own settings, the same for `serve` and `controller`.
#[derive(clap::Args, Debug)]
pub struct ControllerOpts {
    /// The controller's data directory (created if missing): firmware
    /// images, the secrets key and, without --store, the database (sled)
    #[arg(long, env = "CITYPLANE_DATA", default_value = "data")]
    pub data: PathBuf,
    /// Keep the controller's state in PostgreSQL (15 or later) instead of
    /// sled under --data: postgres://USER[:PASSWORD]@HOST:PORT/DATABASE,
    /// e.g. postgres://cityplane@127.0.0.1:5432/cityplane (a unix socket:
    /// postgres://cityplane@%2Frun%2Fpostgresql/cityplane). The database
    /// must exist; its table is created at first start. No TLS: loopback or
    /// a unix socket only. Refused if the server runs with fsync=off or
    /// synchronous_commit=off. The password never appears in logs or
    /// errors. ?socket_timeout=SECONDS (default 30): how long a statement
    /// waits for a database that stopped answering before it counts as
    /// unavailable. Default: sled under --data
    #[arg(long, env = "CITYPLANE_STORE", value_name = "URL", value_parser = parse_store_url)]
    pub store: Option<StoreUrl>,
    /// Page cache of the controller's sled database, in MiB. A larger cache
    /// makes big fleets faster (100,000 devices: ~35,000 reports/s at 64,
    /// ~42,000 at 256) and barely changes memory there; the process needs
    /// roughly 9 KiB per device whatever the cache (see docs/BENCHMARKS.md)
    #[arg(long, env = "CITYPLANE_STORE_CACHE_MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub store_cache_mib: u64,
    /// How often rollouts are evaluated (devices started, waves gated,
    /// abort rules checked), in milliseconds
    #[arg(long, env = "CITYPLANE_ROLLOUT_TICK_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub rollout_tick_ms: u64,
    /// How often compliance is sampled and published on fleet/compliance,
    /// time-based policy rules (last seen, certificate expiry) evaluated
    /// again, and enforcement considered, in milliseconds
    #[arg(long, env = "CITYPLANE_COMPLIANCE_TICK_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub compliance_tick_ms: u64,
    /// Firmware images the server stores at most, in MiB (published and
    /// uploading); a release beyond it is refused with `quota`
    #[arg(long, env = "CITYPLANE_MAX_FIRMWARE_MIB", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub max_firmware_mib: u64,
    /// Sharded controllers: how long the leader keeps an operator write
    /// about devices (label, register, quarantine, release, a rollout's
    /// waves) after every device's owner applied it, in seconds. Copies of
    /// other shards show it until they read the owner's record, seconds
    /// later: keep it well above that lag
    #[arg(long, env = "CITYPLANE_INTENT_KEEP_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub intent_keep_secs: u64,
    /// The key device secrets (`cityplane secrets rotate`) are sealed with:
    /// 32 random bytes, created 0600 on first start; refused if group or
    /// others may read it. Default: secrets.key in --data. Keep it on
    /// another disk than the data, and a copy of the data directory
    /// reveals no secret
    #[arg(long, env = "CITYPLANE_SECRETS_KEY")]
    pub secrets_key: Option<PathBuf>,
    /// How long a command may go without effect (no report showing it)
    /// before it is sent again, in seconds; re-sends then also wait a
    /// backoff (1 s doubling each time, at most 60 s). Raise it where round
    /// trips are slow: on a RabbitMQ cluster that shares small machines, a
    /// fleet-wide change can take longer than 10 s to come back, and every
    /// early re-send is more load (docs/DEPLOYMENT.md)
    #[arg(long, env = "CITYPLANE_COMMAND_TIMEOUT_SECS", value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub command_timeout_secs: u64,
    /// Sends of one change (the first included) before a device that shows
    /// no effect is marked Failed
    #[arg(long, env = "CITYPLANE_COMMAND_ATTEMPTS", value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub command_attempts: u32,
}

impl ControllerOpts {
    /// The controller's configuration from these settings.
    pub fn config(&self) -> ControllerConfig {
        let mut cc = ControllerConfig::new(self.data.clone());
        cc.store_url = self.store.clone();
        cc.cache_bytes = self.store_cache_mib * 1024 * 1024;
        cc.rollout_every = std::time::Duration::from_millis(self.rollout_tick_ms);
        cc.compliance_every = std::time::Duration::from_millis(self.compliance_tick_ms);
        cc.max_firmware_bytes = self.max_firmware_mib << 20;
        cc.secrets_key = self.secrets_key.clone();
        cc.intent_keep = std::time::Duration::from_secs(self.intent_keep_secs);
        cc.retry.command_timeout = std::time::Duration::from_secs(self.command_timeout_secs);
        cc.retry.max_attempts = self.command_attempts;
        cc
    }

    /// The `--print-config` lines of these settings.
    pub fn print(&self) {
        println!(
            "\n# controller (flags or environment)\n# data = {:?}   # CITYPLANE_DATA\n# store = {:?}   # CITYPLANE_STORE\n# store_cache_mib = {}   # CITYPLANE_STORE_CACHE_MIB\n# rollout_tick_ms = {}   # CITYPLANE_ROLLOUT_TICK_MS\n# compliance_tick_ms = {}   # CITYPLANE_COMPLIANCE_TICK_MS\n# max_firmware_mib = {}   # CITYPLANE_MAX_FIRMWARE_MIB\n# intent_keep_secs = {}   # CITYPLANE_INTENT_KEEP_SECS\n# secrets_key = {:?}   # CITYPLANE_SECRETS_KEY\n# command_timeout_secs = {}   # CITYPLANE_COMMAND_TIMEOUT_SECS\n# command_attempts = {}   # CITYPLANE_COMMAND_ATTEMPTS",
            self.data.display().to_string(),
            self.store.as_ref().map(|u| u.to_string()).unwrap_or_default(),
            self.store_cache_mib,
            self.rollout_tick_ms,
            self.compliance_tick_ms,
            self.max_firmware_mib,
            self.intent_keep_secs,
            self.secrets_key
                .clone()
                .unwrap_or_else(|| cityplane_controller::secrets::default_key_path(&self.data))
                .display()
                .to_string(),
            self.command_timeout_secs,
            self.command_attempts,
        );
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = broker_cmd::load_config(&args.broker)?;
    if args.broker.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        args.controller.print();
        println!(
            "# dashboard = {:?}   # CITYPLANE_DASHBOARD",
            args.dashboard.map(|a| a.to_string()).unwrap_or_default()
        );
        return Ok(());
    }
    if let Some(url) = &args.controller.store {
        StoreLocation::from_url(&url.0)?;
    }
    broker_cmd::warn_if_ca_key(&config.pki);
    // The controller refuses reports from ids without a <id>.crt; only a CA
    // directory holds those. A server directory (certs export-server) has
    // none, and there the broker's mTLS, with CN = client id and the
    // revocation list, already proves every device is one we issued.
    let pki = broker_cmd::holds_ca_key(&config.pki).then(|| config.pki.clone());
    let registry_source = config.pki.clone();
    // The controller stores published images in its data directory; the
    // broker's edge serves devices from there.
    let mut config = config;
    config.firmware_dir = Some(cityplane_controller::runtime::firmware_dir(
        &args.controller.data,
    ));
    // Another `serve` or `controller` on the same PostgreSQL store acts:
    // stand by until it stops (see `crate::standby`).
    let mut lease = crate::standby::take_if_shared(args.controller.store.as_ref(), "serve").await?;
    // Bound before anything starts: a wrong address fails the start, and
    // the controller needs the dashboard's sign-in table.
    let dashboard = match args.dashboard {
        Some(addr) => {
            let options = crate::dashboard::Options {
                tls: args
                    .dashboard_tls_cert
                    .clone()
                    .zip(args.dashboard_tls_key.clone()),
                url: args.dashboard_url.clone(),
            };
            Some(crate::dashboard::Dashboard::bind(addr, &options).await?)
        }
        None => None,
    };
    let broker = Broker::start_closed(config)
        .await
        .context("starting the broker")?;
    let mut cc = args.controller.config();
    // The registry learns of devices issued with this CA from issued.jsonl.
    cc.registry_source = Some(registry_source);
    cc.pki = pki;
    cc.sign_ins = dashboard.as_ref().map(|d| d.sign_ins());
    cc.fence = lease.as_ref().map(|l| l.generation);
    cc.lease_holder = lease.as_ref().map(|l| l.holder.clone());
    let store = cc.store_location();
    let controller = Controller::start_in_process(&broker, cc)
        .await
        .with_context(|| format!("starting the controller on {store}"))?;
    eprintln!(
        "cityplane serving on {} (broker + controller, data in {}, store: {store}). Ctrl-C stops it.",
        broker.local_addr(),
        args.controller.data.display()
    );
    let (stop_dashboard, dashboard_stopped) = tokio::sync::oneshot::channel::<()>();
    let dashboard_task = dashboard.map(|d| {
        eprintln!(
            "dashboard on {} (sign in: cityplane dashboard login)",
            d.origin()
        );
        let api = controller.operator_api();
        tokio::spawn(async move {
            if let Err(e) = d
                .serve(api, async {
                    let _ = dashboard_stopped.await;
                })
                .await
            {
                tracing::error!(error = %format!("{e:#}"), "the dashboard stopped");
            }
        })
    });
    if let Some(why) = crate::standby::until_stopped(&mut lease).await? {
        anyhow::bail!("stopping: {why}; start it again to stand by");
    }
    eprintln!("shutting down");
    let _ = stop_dashboard.send(());
    if let Some(task) = dashboard_task {
        // Open live-update streams would hold a graceful stop forever.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
    }
    cityplane_broker::logging::stopping();
    controller.shutdown().await?;
    broker.shutdown().await;
    if let Some(held) = lease {
        held.release().await;
    }
    Ok(())
}

/// `--store`: taken as given and checked in [`run`], because clap's own
/// error for a refused value quotes it, password and all.
fn parse_store_url(url: &str) -> Result<StoreUrl, String> {
    Ok(StoreUrl(url.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cityplane_controller::reconcile::RetryPolicy;
    use clap::Parser;

    #[derive(Parser)]
    struct Opts {
        #[command(flatten)]
        controller: super::ControllerOpts,
    }

    fn retry(args: &[&str]) -> Result<RetryPolicy, clap::Error> {
        let args = std::iter::once("cityplane").chain(args.iter().copied());
        Opts::try_parse_from(args).map(|o| o.controller.config().retry)
    }

    #[test]
    fn the_command_timeout_and_attempts_come_from_the_flags() {
        let set =
            retry(&["--command-timeout-secs", "45", "--command-attempts", "8"]).expect("valid");
        assert_eq!(set.command_timeout, Duration::from_secs(45));
        assert_eq!(set.max_attempts, 8);
        // The backoff is not a setting.
        assert_eq!(set.backoff_base, RetryPolicy::default().backoff_base);
        assert_eq!(retry(&[]).expect("defaults"), RetryPolicy::default());
        for bad in [
            ["--command-timeout-secs", "0"],
            ["--command-timeout-secs", "3601"],
            ["--command-attempts", "0"],
        ] {
            let err = retry(&bad).expect_err("out of range").to_string();
            assert!(err.contains(bad[0]), "{bad:?}: {err}");
        }
    }
}
