//! The cityplane broker alone, for measuring the simulator in a separate
//! process: `cargo run --release -p cityplane-agent-sim --example broker -- PKI_DIR [ADDR]`
//! (creates the PKI if PKI_DIR has no CA yet).

use std::time::Duration;

use cityplane_broker::{Broker, BrokerConfig, Limits};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into());
    cityplane_broker::logging::init_stderr(&directives, true);
    let mut args = std::env::args().skip(1);
    let pki = args.next().ok_or("usage: broker PKI_DIR [ADDR]")?;
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8883".into());
    if !std::path::Path::new(&pki).join("ca.crt").exists() {
        cityplane_certs::Pki::init(pki.as_ref(), false)?;
        eprintln!("initialised a new PKI in {pki}");
    }
    let broker = Broker::start(BrokerConfig {
        listen: listen.parse()?,
        pki: pki.into(),
        limits: Limits {
            handshake_timeout: Duration::from_secs(10),
            ..Limits::default()
        },
    })
    .await?;
    eprintln!("broker listening on {}", broker.local_addr());
    tokio::signal::ctrl_c().await?;
    broker.shutdown().await;
    Ok(())
}
