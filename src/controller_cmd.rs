//! `cityplane controller`: the controller alone, as a client of an external
//! broker (a RabbitMQ cluster from `cityplane cluster up`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cityplane::cluster::provision::{Desired, Provisioner, ShardQueues, QUARANTINE_FILE};
use cityplane::cluster::rabbit::Cluster;
use cityplane_controller::runtime::external::ExternalBroker;
use cityplane_controller::runtime::sharding::Sharding;
use cityplane_controller::store::ShardKeeper;
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
their commands. With --store postgres://… several controllers (same identity, secrets key and \
firmware directory) may run: one acts, the others stand by and take over within ~7 s of it \
stopping; one that loses the store's lease writes nothing and exits (docs/DEPLOYMENT.md).",
    after_help = "Example:\n  cityplane certs issue --pki ./pki --role controller --id controller\n  cityplane cluster up --dir ./cluster --pki ./pki\n  cityplane cluster sync --dir ./cluster --pki ./pki\n  cityplane controller --broker localhost:28830,localhost:28831,localhost:28832 --pki ./pki --data ./data --cluster-dir ./cluster\n  CITYPLANE_CLUSTER=true cityplane status --server localhost:28831 --pki ./pki --id op"
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
    /// The directory of `cityplane cluster up` (its management API and
    /// admin secret): the controller then keeps the broker's users what the
    /// PKI and its quarantine say, checked twice a second, so a revoked or
    /// quarantined identity's sessions are cut cluster-wide within a
    /// second, with no `cluster sync` by hand; and it closes the connection
    /// of an online device whose command timed out, so it subscribes again
    /// (RabbitMQ 3.10 can strand a subscription after a node dies)
    #[arg(long, env = "CITYPLANE_CLUSTER_DIR", value_name = "DIR")]
    pub cluster_dir: Option<PathBuf>,
    /// Receive device messages through N shard sessions (client ids
    /// <id>.shard-0 …), one queue each, instead of one session for the
    /// whole fleet (the controller binds each device to its shard's queue
    /// through --cluster-dir, which it needs, before they connect). With
    /// --store postgres://… the controllers on that store share the fleet:
    /// each acts on the shards the store assigns it (their sessions and
    /// their devices' records), one of them also leads (operators,
    /// documents), and a stopped or killed one's shards move to the others
    /// within ~7 s. The first sharded controller fixes the store's N; so
    /// far sharded controllers take every operator write but certificate
    /// rotation (docs/DESIGN-SHARDING.md).
    /// Without --store: one controller holds all N
    #[arg(long, env = "CITYPLANE_SHARDS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024), requires = "cluster_dir")]
    pub shards: Option<u32>,
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
    // Sharded: several controllers act at once, each on its shards; the
    // one that holds the store's lease leads (operators, documents).
    let sharded = match (&args.controller.store, args.shards) {
        (Some(url), Some(wanted)) => Some(join_shards(&url.0, &args.id, wanted).await?),
        _ => None,
    };
    let shards = match &sharded {
        Some(keeper) => Some(keeper.shards()),
        None => args.shards,
    };
    // Before anything is loaded or connected: a standby neither reads a
    // store that is still being written nor takes the broker session (the
    // same client id) from the controller that acts.
    let mut lease = match sharded {
        Some(_) => None,
        None => crate::standby::take_if_shared(args.controller.store.as_ref(), &args.id).await?,
    };
    let pins = cityplane_broker::Pins::default();
    // Sharded, only the leader keeps the broker's users: the others' would
    // triple the management API's load, and one that has not yet heard of
    // a quarantine would let the device back in.
    let (leading_tx, leading) = tokio::sync::watch::channel(sharded.is_none());
    let mut unanswered = None;
    let follower = match &args.cluster_dir {
        Some(dir) => {
            let cluster =
                Cluster::open(dir).with_context(|| format!("--cluster-dir {}", dir.display()))?;
            let provisioner = Provisioner::new(cluster.mgmt()?, &cluster.info.admin_user);
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            unanswered = Some(tx);
            let resubscriber = tokio::spawn(resubscribe(provisioner.clone(), rx));
            let shards = shards.map(|shards| ShardQueues {
                controller: args.id.clone(),
                shards,
            });
            if shards.is_some() {
                // Before the shard sessions connect: devices already
                // online (users from an earlier sync) must have their
                // bindings, or their reports would be routed nowhere. The
                // quarantine is the one this controller last wrote.
                let mut desired = Desired::from_pki_and_cluster(&args.pki, dir)?;
                desired.shards = shards.clone();
                provisioner
                    .sync(&desired, false)
                    .await
                    .context("binding the devices to their shard queues (--shards)")?;
            }
            let follower = tokio::spawn(follow(
                provisioner,
                args.pki.clone(),
                dir.clone(),
                pins.clone(),
                shards,
                leading,
            ));
            Some((follower, resubscriber))
        }
        None => None,
    };
    let broker = ExternalBroker {
        nodes,
        id: args.id.clone(),
        tls,
        identities: args.pki.clone(),
        firmware: Some(cityplane_controller::runtime::firmware_dir(
            &args.controller.data,
        )),
        pins,
        unanswered,
        shard_sessions: shards,
        member: None,
    };
    let mut cc = args.controller.config();
    cc.fence = lease.as_ref().map(|l| l.generation);
    cc.lease_holder = lease.as_ref().map(|l| l.holder.clone());
    cc.registry_source = Some(args.pki.clone());
    cc.pki = crate::broker_cmd::holds_ca_key(&args.pki).then(|| args.pki.clone());
    let sharding = match (sharded, &args.controller.store) {
        (Some(keeper), Some(url)) => Some(Sharding {
            url: url.0.clone(),
            keeper,
        }),
        _ => None,
    };
    let is_sharded = sharding.is_some();
    let controller = Controller::start_external(broker, cc, sharding)
        .await
        .with_context(|| {
            format!(
                "starting the controller on {}",
                args.controller.data.display()
            )
        })?;
    eprintln!(
        "cityplane controller for {} (data in {}{}). Ctrl-C stops it.",
        args.broker.join(","),
        args.controller.data.display(),
        if is_sharded {
            format!(
                "; sharded: {} shards shared with the other controllers on the store",
                shards.unwrap_or_default()
            )
        } else {
            String::new()
        }
    );
    if let (true, Some(url)) = (is_sharded, &args.controller.store) {
        // Leads once it holds the store's lease: at once if no other
        // controller does, else when the leader stops renewing it.
        let took = tokio::select! {
            signal = tokio::signal::ctrl_c() => {
                signal.context("waiting for Ctrl-C")?;
                None
            }
            held = crate::standby::take_as(
                &url.0,
                &args.id,
                "another controller leads (operators, documents); this one acts on its shards and leads when that one stops",
            ) => Some(held?),
        };
        if let Some(held) = &took {
            controller
                .lead(held.generation, held.holder.clone())
                .await
                .context("leading")?;
            leading_tx.send_replace(true);
        }
        lease = took;
        if lease.is_none() {
            // Ctrl-C before it led.
            return stop(controller, lease, follower).await;
        }
    }
    let lost = crate::standby::until_stopped(&mut lease).await?;
    if let Some((follower, resubscriber)) = follower {
        follower.abort();
        resubscriber.abort();
    }
    if let Some(why) = lost {
        anyhow::bail!("stopping: {why}; start it again to stand by");
    }
    stop(controller, lease, None).await
}

/// A clean stop: the last commit, then the store's lease and (sharded)
/// the shards are given up, so the others take over at once.
async fn stop(
    controller: Controller,
    lease: Option<crate::standby::Held>,
    follower: Option<(tokio::task::JoinHandle<()>, tokio::task::JoinHandle<()>)>,
) -> anyhow::Result<()> {
    if let Some((follower, resubscriber)) = follower {
        follower.abort();
        resubscriber.abort();
    }
    eprintln!("shutting down");
    controller.shutdown().await?;
    if let Some(held) = lease {
        held.release().await;
    }
    Ok(())
}

/// Joins the controllers that share the store at `url`: connects this
/// one's shard keeper and checks the store's shard count (the first
/// sharded controller fixes it).
async fn join_shards(url: &str, id: &str, wanted: u32) -> anyhow::Result<ShardKeeper> {
    let member = crate::standby::holder(id);
    let url = url.to_owned();
    let keeper = tokio::task::spawn_blocking(move || {
        let mut keeper = ShardKeeper::connect(&url, &member)?;
        keeper.fix_shards(wanted)?;
        Ok::<_, cityplane_controller::store::StoreError>(keeper)
    })
    .await
    .context("shard keeper task")?
    .context("joining the sharded controllers on the store")?;
    if keeper.shards() != wanted {
        anyhow::bail!(
            "the store is split into {} shards, fixed when its first sharded controller started: \
             start this one with --shards {} (and `cluster sync --shards {}`)",
            keeper.shards(),
            keeper.shards(),
            keeper.shards()
        );
    }
    Ok(keeper)
}

/// How often the broker's users are compared with the PKI and quarantine.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Keeps the cluster's users what the PKI and the controller's quarantine
/// say: a sync whenever either changed (and at start), retried until it
/// succeeds. The quarantine is also written to the cluster directory, so a
/// `cluster sync` by hand keeps quarantined devices out too. Sharded, only
/// while this controller leads (`leading`).
async fn follow(
    provisioner: Provisioner,
    pki: PathBuf,
    dir: PathBuf,
    pins: cityplane_broker::Pins,
    shards: Option<ShardQueues>,
    mut leading: tokio::sync::watch::Receiver<bool>,
) {
    let mut applied: Option<Desired> = None;
    let mut warned = false;
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        let desired = Desired::from_pki(&pki).map(|mut d| {
            d.quarantined = pins.refused();
            d.shards = shards.clone();
            d
        });
        let result = match desired {
            Ok(desired) if applied.as_ref() == Some(&desired) => Ok(()),
            Ok(desired) => apply(&provisioner, &dir, &desired).await.map(|()| {
                applied = Some(desired);
            }),
            Err(e) => Err(anyhow::Error::from(e)),
        };
        match result {
            Ok(()) => warned = false,
            // Once per outage: the broker's API may be down for a while.
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %format!("{e:#}"), "could not bring the broker's users in line with the PKI and quarantine; retrying");
            }
            Err(_) => {}
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

/// Closes the connections of a device at most this often per command: a
/// closed connection brings the device back online, which re-drives the
/// command from attempt 1, so a device that ignores commands would
/// otherwise be cut every timeout for ever. More than once, because a
/// device cut while the survivors still clean up after a dead node can be
/// stranded again.
const CLOSES_PER_COMMAND: u32 = 3;

/// Closes the connections of devices whose commands go unanswered while
/// they are online (`ExternalBroker::unanswered`), so they subscribe
/// afresh. Whatever arrived meanwhile is handled in one go: after a node
/// dies hundreds time out together.
async fn resubscribe(
    provisioner: Provisioner,
    mut unanswered: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    // Per device: the last command it was cut for, and how often.
    let mut closes: std::collections::HashMap<String, (String, u32)> = Default::default();
    while let Some(first) = unanswered.recv().await {
        let mut ids = std::collections::BTreeSet::new();
        let mut next = Some(first);
        while let Some((device, command)) = next {
            if may_close(&mut closes, &device, command) {
                ids.insert(device);
            }
            next = unanswered.try_recv().ok();
        }
        if ids.is_empty() {
            continue;
        }
        // A subscription is stranded only after a node loss; otherwise the
        // commands are slow (an overloaded cluster), and cutting the devices
        // would add reconnects and queue declarations to that load.
        if let Ok(false) = provisioner.node_lost_lately().await {
            tracing::info!(
                unanswered = ids.len(),
                "commands to online devices had no effect, but no broker node was lost lately: their connections are left open (re-sent as usual)"
            );
            continue;
        }
        // How long each step takes is in the log line below: under load the
        // management API's answers, not the broker, can be the slow part.
        let started = std::time::Instant::now();
        tracing::info!(
            unanswered = ids.len(),
            "commands to online devices had no effect: their connections will be closed once the cluster has settled"
        );
        settle(&provisioner).await;
        let settled = started.elapsed();
        while let Ok((device, command)) = unanswered.try_recv() {
            if may_close(&mut closes, &device, command) {
                ids.insert(device);
            }
        }
        match provisioner.close_connections(&ids).await {
            // Only a close counts: a device the API did not list yet is
            // tried again at its next timeout.
            Ok(closed) => {
                for device in &closed {
                    if let Some(entry) = closes.get_mut(device) {
                        entry.1 += 1;
                    }
                }
                tracing::info!(
                    unanswered = ids.len(),
                    closed = closed.len(),
                    settle_ms = settled.as_millis() as u64,
                    close_ms = (started.elapsed() - settled).as_millis() as u64,
                    "closed the connections of online devices whose commands had no effect, so they subscribe again"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, unanswered = ids.len(), after_ms = started.elapsed().as_millis() as u64, "could not close the connections of devices whose commands had no effect")
            }
        }
    }
}

/// Whether `device` may be cut for `command` (fewer than
/// [`CLOSES_PER_COMMAND`] closes so far; a new command starts again).
fn may_close(
    closes: &mut std::collections::HashMap<String, (String, u32)>,
    device: &str,
    command: String,
) -> bool {
    let entry = closes
        .entry(device.to_owned())
        .or_insert_with(|| (command.clone(), 0));
    if entry.0 != command {
        *entry = (command, 0);
    }
    entry.1 < CLOSES_PER_COMMAND
}

/// How long to wait after a dead node's last transient queue is gone:
/// the routing-table cleanup that strands subscriptions runs after it.
const SETTLE_MARGIN: Duration = Duration::from_secs(5);
/// The longest a close waits for that cleanup.
const SETTLE_AT_MOST: Duration = Duration::from_secs(120);

/// Waits until no transient queue is recorded on a node that is down (see
/// `Provisioner::transient_queues_on_down_nodes`), plus [`SETTLE_MARGIN`]
/// if there were any: a device cut before then could subscribe into the
/// same trap.
async fn settle(provisioner: &Provisioner) {
    let started = std::time::Instant::now();
    let mut waited = false;
    while started.elapsed() < SETTLE_AT_MOST {
        match provisioner.transient_queues_on_down_nodes().await {
            Ok(0) => break,
            Ok(left) => {
                if !waited {
                    tracing::info!(
                        left,
                        "waiting for the cluster to drop a dead node's queues before closing connections"
                    );
                }
                waited = true;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not list the cluster's queues");
                break;
            }
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
    if waited {
        tokio::time::sleep(SETTLE_MARGIN).await;
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn apply(provisioner: &Provisioner, dir: &Path, desired: &Desired) -> anyhow::Result<()> {
    let path = dir.join(QUARANTINE_FILE);
    let list = serde_json::to_vec(&desired.quarantined)?;
    // Before the sync: a sync by hand racing this one must not let a
    // device that is being quarantined back in.
    write_atomic(&path, &list).with_context(|| format!("writing {}", path.display()))?;
    let report = provisioner.sync(desired, false).await?;
    if report.changed() {
        tracing::info!(
            created = report.created.len(),
            updated = report.updated.len(),
            revoked = ?report.revoked,
            quarantined = ?report.quarantined,
            "broker users brought in line with the PKI and quarantine"
        );
    }
    for refused in &report.refused {
        tracing::warn!(id = %refused.id, reason = %refused.reason, "identity gets no broker user");
    }
    Ok(())
}
