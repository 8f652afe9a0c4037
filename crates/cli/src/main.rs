//! `cityplane`: the operator binary.

mod broker_cmd;
mod certs_cmd;

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
    after_help = "Start here:\n  cityplane certs init --pki ./pki\n  cityplane certs issue --pki ./pki --role device --count 100 --prefix lamp\n  cityplane broker --pki ./pki --listen 127.0.0.1:8883\n\nLogs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One-shot commands speak through their own output; servers log.
    init_tracing(match cli.command {
        Command::Certs(_) => "warn",
        _ => "info,rumqttd=warn",
    });
    let result = match cli.command {
        Command::Certs(cmd) => certs_cmd::run(cmd),
        Command::Broker(args) => runtime().and_then(|rt| rt.block_on(broker_cmd::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
