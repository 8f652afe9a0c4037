//! `cityplane controller`: the controller alone, as a client of an external
//! broker (a RabbitMQ cluster from `cityplane cluster up`).

use std::path::PathBuf;

use anyhow::Context;
use cityplane_controller::runtime::external::ExternalBroker;
use cityplane_controller::Controller;

use crate::serve_cmd::ControllerOpts;

/// The controller alone, connected to an external MQTT broker over mTLS.
#[derive(clap::Args, Debug)]
#[command(
    long_about = "Runs the controller as a client of an external MQTT broker, for fleets \
beyond one machine (see docs/DEPLOYMENT.md). The broker enforces identities and topic rules \
(provision it with `cityplane cluster sync`); the controller holds one persistent QoS 1 \
session and acknowledges each device message only once what it changed is stored, so a crash \
or a lost node loses nothing the broker accepted. Operators reach it with `--cluster` on \
their commands.",
    after_help = "Example:\n  cityplane certs issue --pki ./pki --role controller --id controller\n  cityplane cluster up --dir ./cluster --pki ./pki\n  cityplane cluster sync --dir ./cluster --pki ./pki\n  cityplane controller --broker localhost:18883,localhost:18884,localhost:18885 --pki ./pki --data ./data"
)]
pub struct ControllerArgs {
    /// The broker's nodes as HOST:PORT (MQTT over TLS), comma-separated.
    /// Tried in this order; when the connected one is lost the session
    /// moves to the next
    #[arg(
        long,
        env = "CITYPLANE_BROKER",
        value_delimiter = ',',
        required = true,
        value_name = "HOST:PORT,..."
    )]
    pub broker: Vec<String>,
    /// The PKI (or server) directory: ca.crt, the controller's <id>.crt and
    /// <id>.key, and issued.jsonl (the devices and operators it knows)
    #[arg(long, env = "CITYPLANE_PKI", default_value = "pki")]
    pub pki: PathBuf,
    /// The controller's identity: a certificate of role controller in --pki
    #[arg(long, env = "CITYPLANE_CONTROLLER_ID", default_value = "controller")]
    pub id: String,
    #[command(flatten)]
    pub controller: ControllerOpts,
}

pub async fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let nodes = args
        .broker
        .iter()
        .map(|node| cityplane::client::split_server(node))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tls = cityplane::client::tls_config(&args.pki, &args.id).with_context(|| {
        format!(
            "the controller's certificate (issue one with `cityplane certs issue --pki {} --role controller --id {}`)",
            args.pki.display(),
            args.id
        )
    })?;
    let broker = ExternalBroker {
        nodes,
        id: args.id.clone(),
        tls,
        identities: args.pki.clone(),
        firmware: Some(cityplane_controller::runtime::firmware_dir(
            &args.controller.data,
        )),
    };
    let mut cc = args.controller.config();
    cc.registry_source = Some(args.pki.clone());
    cc.pki = crate::broker_cmd::holds_ca_key(&args.pki).then(|| args.pki.clone());
    let controller = Controller::start_external(broker, cc)
        .await
        .with_context(|| {
            format!(
                "starting the controller on {}",
                args.controller.data.display()
            )
        })?;
    eprintln!(
        "cityplane controller for {} (data in {}). Ctrl-C stops it.",
        args.broker.join(","),
        args.controller.data.display()
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    eprintln!("shutting down");
    controller.shutdown().await?;
    Ok(())
}
