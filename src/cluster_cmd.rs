//! `cityplane cluster`: a RabbitMQ cluster on loopback for the fleet, and
//! its users from the PKI.

use std::path::PathBuf;

use anyhow::{Context, Result};
use cityplane::cluster::provision::{Desired, Provisioner, ShardQueues, SyncReport};
use cityplane::cluster::rabbit::{self, Cluster, ClusterSpec, ClusterStatus};
use clap::{Args, Subcommand, ValueEnum};

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Lines for people.
    Text,
    /// One JSON object for scripts.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Start a RabbitMQ cluster on 127.0.0.1 with mTLS from the PKI and wait until it is healthy.
    ///
    /// Each node listens for MQTTS only (no AMQP, no plain MQTT), logs in
    /// clients by their certificate's CN, and serves the management API on
    /// loopback. Needs `apt-get install rabbitmq-server`; as root the nodes
    /// run as the `rabbitmq` user. Takes 20 to 60 s. Ports for base P and
    /// node i: MQTTS P+i, management P+10+i, distribution P+20+i, epmd P+30.
    /// Nobody can connect until `cluster sync` creates the users.
    Up(UpArgs),
    /// Stop the cluster's nodes and remove their state (RabbitMQ's logs stay in DIR/rabbitN/log).
    Down(DirArgs),
    /// Each node: process alive, running in the cluster, MQTTS listening, memory.
    Status(StatusArgs),
    /// Make the broker's users what the PKI says: one per issued, unrevoked identity.
    ///
    /// Devices may publish only their own reported, telemetry, acks,
    /// presence, csr and fetch topics and read their own commands and blob;
    /// operators publish only under fleet/by/<their id>/ops/ and
    /// fleet/by/<their id>/desired/ and read their own responses; the
    /// controller may do everything. Users of revoked identities are
    /// deleted, which cuts their live connections on every node. An id
    /// containing anything but [a-z0-9_-] (a '.', say) gets no user.
    /// Idempotent and resumable: run it after every `certs issue` and
    /// `certs revoke`.
    Sync(SyncArgs),
    /// Stop one node cleanly, keeping its state, so `cluster start-node` brings it back.
    ///
    /// Its clients are disconnected and reconnect to another node. The
    /// others keep serving while a majority of the nodes runs (2 of 3): new
    /// connections need that majority.
    StopNode(NodeArgs),
    /// Start one stopped or crashed node again and wait until it runs in the cluster.
    ///
    /// It comes back with the configuration and state `cluster up` gave it
    /// and rejoins the nodes still running. Refused if it is running.
    StartNode(NodeArgs),
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  cityplane cluster stop-node --dir ./rabbit --node 2    # rabbit2@localhost\n  cityplane cluster start-node --dir ./rabbit --node 2"
)]
pub struct NodeArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// Which node: N of rabbitN@localhost, as `cluster status` names them (1 is the first).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub node: u16,
}

#[derive(Args, Debug)]
pub struct DirArgs {
    /// The cluster's directory (state, TLS copies, logs).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  cityplane cluster up --dir ./rabbit --pki ./pki\n  cityplane cluster sync --dir ./rabbit --pki ./pki\n  mosquitto_pub -h localhost -p 28830 --cafile pki/ca.crt --cert pki/lamp0001.crt --key pki/lamp0001.key -i lamp0001 -t devices/lamp0001/reported -m '{}'"
)]
pub struct UpArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// The PKI (or a server directory from `certs export-server`): ca.crt, broker.crt, broker.key.
    #[arg(long, value_name = "DIR")]
    pub pki: PathBuf,
    /// How many nodes (a majority must stay up for clients to connect: 3 survives one loss).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// The first port; see above for the layout.
    #[arg(long, value_name = "P", default_value_t = rabbit::DEFAULT_BASE_PORT)]
    pub base_port: u16,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  cityplane certs revoke --pki ./pki --id lamp0042\n  cityplane cluster sync --dir ./rabbit --pki ./pki   # lamp0042's sessions are cut\n  cityplane cluster sync --dir ./rabbit --pki ./pki --prune   # also delete users the PKI never issued"
)]
pub struct SyncArgs {
    #[command(flatten)]
    pub dir: DirArgs,
    /// The PKI or server directory whose issued.jsonl and revoked.json are the truth.
    #[arg(long, value_name = "DIR")]
    pub pki: PathBuf,
    /// Delete users the PKI never issued (otherwise only reported as drift).
    #[arg(long)]
    pub prune: bool,
    /// For sharded controllers: make one session queue per shard and bind
    /// each device's leaves to its shard's queue, before the device gets a
    /// user (so its first report has somewhere to go). N must be the
    /// store's shard count: 16 unless it was created otherwise. Sharded
    /// controllers are not released yet (docs/DESIGN-SHARDING.md)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub shards: Option<u32>,
    /// With --shards: the controllers' identity (their certificate's CN),
    /// whose shard sessions the queues are for
    #[arg(
        long,
        value_name = "ID",
        default_value = "controller",
        requires = "shards"
    )]
    pub controller_id: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

pub async fn run(cmd: ClusterCommand) -> Result<()> {
    match cmd {
        ClusterCommand::Up(args) => up(args).await,
        ClusterCommand::Down(args) => {
            let cluster = Cluster::open(&args.dir)?;
            cluster.down().await?;
            eprintln!(
                "stopped {} node(s); RabbitMQ's logs stay in {}/rabbitN/log",
                cluster.info.nodes.len(),
                args.dir.display()
            );
            Ok(())
        }
        ClusterCommand::Status(args) => status(args).await,
        ClusterCommand::Sync(args) => sync(args).await,
        ClusterCommand::StopNode(args) => {
            let cluster = Cluster::open(&args.dir.dir)?;
            cluster.stop_node(usize::from(args.node) - 1).await?;
            eprintln!("stopped rabbit{}@localhost; its state stays", args.node);
            Ok(())
        }
        ClusterCommand::StartNode(args) => {
            let cluster = Cluster::open(&args.dir.dir)?;
            cluster
                .start_node(usize::from(args.node) - 1, |line| eprintln!("{line}"))
                .await
                .with_context(|| format!("starting rabbit{}@localhost", args.node))?;
            Ok(())
        }
    }
}

async fn up(args: UpArgs) -> Result<()> {
    let spec = ClusterSpec {
        dir: args.dir.dir.clone(),
        pki: args.pki,
        nodes: args.nodes,
        base_port: args.base_port,
    };
    // Progress goes to stderr so `--output json` stays one object on stdout.
    let cluster = rabbit::up(&spec, |line| eprintln!("{line}"))
        .await
        .context("starting the RabbitMQ cluster")?;
    let addrs = cluster.mqtts_addrs();
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "dir": cluster.dir,
                "mqtts": addrs,
                "nodes": cluster.info.nodes,
            })
        ),
        Output::Text => {
            println!("MQTTS: {}", list(&addrs));
            println!(
                "next: cityplane cluster sync --dir {} --pki PKI   (creates the users; until then nobody can log in)",
                args.dir.dir.display()
            );
        }
    }
    Ok(())
}

async fn status(args: StatusArgs) -> Result<()> {
    let cluster = Cluster::open(&args.dir.dir)?;
    let status: ClusterStatus = cluster.status().await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&status)?),
        Output::Text => {
            for n in &status.nodes {
                println!(
                    "{:<20} {}  process {}  cluster {}  mqtts {}  memory {}",
                    n.name,
                    n.mqtts,
                    yes_no(n.process),
                    if n.running { "running" } else { "down" },
                    if n.mqtt_listening { "listening" } else { "no" },
                    n.mem_used
                        .map(|b| format!("{} MiB", b / (1024 * 1024)))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            println!(
                "{}",
                if status.healthy {
                    "healthy"
                } else {
                    "NOT healthy"
                }
            );
        }
    }
    if !status.healthy {
        anyhow::bail!("the cluster in {} is not healthy", args.dir.dir.display());
    }
    Ok(())
}

async fn sync(args: SyncArgs) -> Result<()> {
    let cluster = Cluster::open(&args.dir.dir)?;
    let mut desired = Desired::from_pki_and_cluster(&args.pki, &args.dir.dir)?;
    desired.shards = args.shards.map(|shards| ShardQueues {
        controller: args.controller_id.clone(),
        shards,
    });
    let provisioner = Provisioner::new(cluster.mgmt()?, &cluster.info.admin_user).with_progress(
        std::sync::Arc::new(|done, total| {
            eprintln!("binding devices to their shard's queue: {done}/{total}");
        }),
    );
    let report: SyncReport = provisioner.sync(&desired, args.prune).await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&report)?),
        Output::Text => print_report(&report, args.prune),
    }
    Ok(())
}

fn print_report(r: &SyncReport, prune: bool) {
    if !r.changed() {
        println!("no change: {} user(s) already as the PKI says", r.unchanged);
    } else {
        println!(
            "created {}, updated {}, revoked {}, pruned {}, unchanged {} ({} ms)",
            r.created.len(),
            r.updated.len(),
            r.revoked.len(),
            r.pruned.len(),
            r.unchanged,
            r.took_ms
        );
        if !r.revoked.is_empty() {
            println!("revoked (sessions cut): {}", list(&r.revoked));
        }
        if !r.quarantined.is_empty() {
            println!("quarantined (sessions cut): {}", list(&r.quarantined));
        }
    }
    if !r.queues_created.is_empty() {
        println!("shard queues created: {}", r.queues_created.len());
    }
    if !r.bound.is_empty() {
        println!("devices bound to their shard's queue: {}", r.bound.len());
    }
    for refused in &r.refused {
        println!("refused {}: {}", refused.id, refused.reason);
    }
    if !r.drift.is_empty() && !prune {
        println!(
            "drift: {} user(s) the PKI never issued: {} (--prune deletes them)",
            r.drift.len(),
            list(&r.drift)
        );
    } else if !r.pruned.is_empty() {
        println!("pruned: {}", list(&r.pruned));
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}
