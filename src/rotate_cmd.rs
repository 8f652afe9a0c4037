//! `cityplane certs rotate --selector …`: the fleet's certificates rotated
//! as a rollout, through the operator API (each device makes its new key
//! and sends a CSR; the server signs, delivers, and revokes the old serial
//! once the device is back with the new one).

use anyhow::{bail, Context};
use cityplane::client::ConnectArgs;
use serde_json::{json, Value};

use crate::governance_cmd::{ask, print_json, selector_of};
use crate::ops_cmd::Output;

/// What `certs rotate` takes to rotate devices' certificates on a server.
#[derive(clap::Args, Debug, Default)]
pub struct FleetRotateArgs {
    /// Rotate the fleet's devices matching KEY=VALUE pairs, on the server, as a rollout
    /// (class=…, owner=…, any label; all=true for every device)
    #[arg(long, value_delimiter = ',', conflicts_with = "devices")]
    pub selector: Vec<String>,
    /// Rotate these devices (comma-separated ids), on the server, as a rollout
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// With --selector/--devices: only devices whose certificate expires within this long (30d, 12h)
    #[arg(long, value_name = "DURATION")]
    pub before: Option<String>,
    /// With --selector/--devices: the rotation's (rollout's) name [default: rotate-N]
    #[arg(long)]
    pub name: Option<String>,
    /// With --selector/--devices: wave sizes in percent, comma-separated [default: 1,10,89]
    #[arg(long, value_delimiter = ',')]
    pub waves: Vec<f64>,
    /// With --selector/--devices: percent of a wave that must succeed before the next [default: 90]
    #[arg(long)]
    pub success_threshold: Option<f64>,
    /// With --selector/--devices: the server (host:port)
    #[arg(long, env = "CITYPLANE_SERVER", default_value = "127.0.0.1:8883")]
    pub address: String,
    /// With --selector/--devices: the operator identity to connect as (its certificate in --pki)
    #[arg(long, env = "CITYPLANE_ID", default_value = "operator")]
    pub operator: String,
    /// With --selector/--devices: the server is an external broker (a RabbitMQ cluster or
    /// mosquitto, with `cityplane controller` behind it); requests name their sender in the topic
    #[arg(long, env = "CITYPLANE_CLUSTER")]
    pub cluster: bool,
    /// With --selector/--devices: `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl FleetRotateArgs {
    pub fn is_set(&self) -> bool {
        !self.selector.is_empty() || !self.devices.is_empty()
    }
}

/// Rotates the fleet's certificates: `pki` holds the operator's certificate.
pub async fn run(a: FleetRotateArgs, pki: std::path::PathBuf) -> anyhow::Result<()> {
    let connect = ConnectArgs {
        server: a.address.clone(),
        pki,
        id: a.operator.clone(),
        timeout: 30,
        cluster: a.cluster,
    };
    let output = a.output;
    let target = if !a.devices.is_empty() {
        json!({"ids": a.devices})
    } else if a.selector.iter().any(|s| s == "all=true") {
        json!({"all": true})
    } else {
        selector_of(&a.selector)?
    };
    let mut body = json!({"target": target});
    if let Some(b) = &a.before {
        let seconds = crate::governance_cmd::parse_duration(b)?;
        body["before_days"] = json!(seconds.div_ceil(86_400));
    }
    if let Some(n) = &a.name {
        body["name"] = json!(n);
    }
    if !a.waves.is_empty() {
        body["waves"] = Value::Array(a.waves.iter().map(|p| json!({"percent": p})).collect());
    }
    if let Some(t) = a.success_threshold {
        body["success_threshold"] = json!(t);
    }
    if a.waves.iter().any(|p| *p <= 0.0) {
        bail!("--waves are percents above 0, e.g. 10,90");
    }
    let r = ask(&connect, "cert-rotate", body)
        .await
        .context("the rotation was refused; no certificate changed")?;
    if output == Output::Json {
        return print_json(&r);
    }
    let name = r["name"].as_str().unwrap_or("");
    println!(
        "rotation {name}: {} devices in waves of {}; each makes a new key, the server signs it, \
         and revokes the old certificate once the device is back with the new one",
        r["devices"], r["waves"]
    );
    println!("follow it with: cityplane rollout status {name} --watch");
    Ok(())
}
