use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cityplane_broker::{Broker, BrokerConfig};

/// Runs the broker until Ctrl-C.
///
/// Settings come from, lowest to highest priority: built-in defaults, the
/// `--config` file (TOML, see `--print-config`), environment variables, flags.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  cityplane certs export-server --pki ./pki --out ./server-pki\n  cityplane broker --pki ./server-pki --listen 127.0.0.1:8883\n  mosquitto_sub -h localhost -p 8883 --cafile pki/ca.crt --cert pki/op1.crt --key pki/op1.key -i op1 -t 'devices/+/reported'"
)]
pub struct BrokerArgs {
    /// PKI directory written by `cityplane certs init` [default: ./pki]
    #[arg(long, env = "CITYPLANE_PKI")]
    pub pki: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8883]; port 0 picks a free port.
    #[arg(long, env = "CITYPLANE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Threads that run the connections (and, for `serve`, the
    /// controller's loop) [default: 1 for `broker`, the number of cores for
    /// `serve`]. One thread wakes the router's thread and its subscribers'
    /// tasks without waking another worker: ~16 % less broker CPU at
    /// steady rates, for ~5 % fewer TLS handshakes per second in a storm
    /// (docs/BENCHMARKS.md, issue 15).
    #[arg(long, env = "CITYPLANE_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: Option<u16>,
    /// TOML file with broker settings and limits.
    #[arg(long, env = "CITYPLANE_BROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn load_config(args: &BrokerArgs) -> anyhow::Result<BrokerConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading broker config {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("parsing broker config {}", path.display()))?
        }
        None => BrokerConfig::default(),
    };
    if let Some(pki) = &args.pki {
        config.pki = pki.clone();
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    Ok(config)
}

/// Whether `pki` holds the CA's signing key. A server should not: whoever
/// breaks into it could mint any identity.
pub fn holds_ca_key(pki: &Path) -> bool {
    pki.join(cityplane_certs::CA_KEY_FILE).exists()
}

/// One line on stderr when the directory a server runs from holds `ca.key`.
pub fn warn_if_ca_key(pki: &Path) {
    if holds_ca_key(pki) {
        tracing::warn!(
            "{} holds ca.key, the CA's signing key: a server needs only ca.crt, broker.crt, \
             broker.key, revoked.json and crl.pem. Create such a directory with \
             `cityplane certs export-server --pki {} --out ./server-pki`, serve from it with \
             --pki ./server-pki, and keep ca.key elsewhere",
            pki.display(),
            pki.display()
        );
    }
}

pub async fn run(args: BrokerArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    warn_if_ca_key(&config.pki);
    let broker = Broker::start(config).await.context("starting the broker")?;
    eprintln!(
        "cityplane broker listening on {} (mutual TLS). Ctrl-C stops it.",
        broker.local_addr()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("shutting down");
    cityplane_broker::logging::stopping();
    broker.shutdown().await;
    Ok(())
}
