//! The scenarios `agent-sim run --scenario …` (and `cityplane demo`) run,
//! and the report each ends with.
//!
//! | scenario | what it does | ok when |
//! |---|---|---|
//! | `connect-storm` | connects every device as fast as pacing allows | all online within the timeout |
//! | `steady` | connects, then runs for `duration` (telemetry if enabled) | all online at the end |
//! | `converge` | as an operator, writes a desired document (e.g. `dimming` for streetlights) and times each device until it applied it (needs the controller) | every targeted device converged |
//! | `reboot-wave` | power-cycles a fraction of the fleet, spread over `wave`, and times their return | all rebooted devices back online |
//! | `rogue` | rogue devices try every forbidden action while honest devices run | refused == attempted, honest devices undisturbed |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::str::FromStr;
use std::time::Duration;

use cityplane_certs::Pki;
use cityplane_proto::topics;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::mqtt::{Client, ConnectOptions, Packet};
use crate::rng::Rng;
use crate::stats::{rss_kib, NodeStats, Percentiles, SimStats};
use crate::tls::TlsBase;
use crate::{classes, Class, Fleet, RogueStats, SimConfig, SimError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Connect every device as fast as pacing allows.
    ConnectStorm,
    /// Connect, then run for --duration (telemetry on).
    Steady,
    /// Write a desired document as an operator; time each device's convergence.
    Converge,
    /// Power-cycle a fraction of the fleet; time their return.
    RebootWave,
    /// Rogue devices try forbidden actions; all must be refused.
    Rogue,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::ConnectStorm => "connect-storm",
            Scenario::Steady => "steady",
            Scenario::Converge => "converge",
            Scenario::RebootWave => "reboot-wave",
            Scenario::Rogue => "rogue",
        }
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Scenario, String> {
        <Scenario as clap::ValueEnum>::from_str(s, false)
    }
}

/// Scenario parameters beyond the fleet's [`SimConfig`].
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    pub scenario: Scenario,
    /// Bound on every wait (connecting, converging, coming back).
    pub timeout: Duration,
    /// `steady`: how long to run after everyone is online.
    pub duration: Duration,
    /// `converge`: the operator identity (certificate in the PKI, role operator).
    pub operator: Option<String>,
    /// `converge`: the key and value to set (default `dimming` = a random
    /// value from the seed).
    pub set: Option<(String, Value)>,
    /// `converge`: the class to target (default streetlight).
    pub class: Class,
    /// `converge`: the target's `id_prefix` (the fleet's id prefix).
    pub id_prefix: Option<String>,
    /// `reboot-wave`: share of devices to reboot (0..=1).
    pub reboot_fraction: f64,
    /// `reboot-wave`: reboots are spread evenly over this time.
    pub wave: Duration,
}

impl ScenarioOptions {
    pub fn new(scenario: Scenario) -> ScenarioOptions {
        ScenarioOptions {
            scenario,
            timeout: Duration::from_secs(300),
            duration: Duration::from_secs(30),
            operator: None,
            set: None,
            class: Class::Streetlight,
            id_prefix: None,
            reboot_fraction: 1.0,
            wave: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectReport {
    pub all_online: bool,
    pub online: usize,
    /// From the start of the fleet to the last device online.
    pub seconds: f64,
    /// Devices online per second over `seconds`.
    pub rate_per_s: f64,
    /// Start of the fleet → each device's first time online (includes pacing).
    pub time_to_online: Percentiles,
    /// TCP + TLS + CONNECT/CONNACK of each successful connect.
    pub handshake: Percentiles,
    /// Devices connected to each broker node once the fleet was up (the
    /// end of the connect phase), in the order of `--broker`.
    pub per_node: Vec<NodeStats>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MessageReport {
    pub window_s: f64,
    /// PUBLISH packets devices queued (reports, acks, telemetry, presence):
    /// offered load, counted when queued, not when sent or acknowledged.
    pub offered: u64,
    /// PUBLISH packets devices received (commands).
    pub received: u64,
    /// PUBACKs devices received: their QoS 1 publishes the broker
    /// acknowledged (received; QoS 0 telemetry has none).
    pub pubacks_received: u64,
    pub offered_per_s: f64,
    pub received_per_s: f64,
    pub pubacks_received_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConvergenceReport {
    pub name: String,
    pub key: String,
    pub value: Value,
    pub class: String,
    pub targeted: usize,
    pub converged: usize,
    /// The controller's answer on `fleet/responses/<operator>/<request id>`.
    pub response: Option<Value>,
    /// Desired document published → device applied it.
    pub time: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RebootReport {
    pub rebooted: usize,
    pub back_online: usize,
    /// Reboot → online again.
    pub time: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReport {
    pub rss_before_kib: u64,
    pub rss_online_kib: u64,
    /// (RSS with the fleet online − RSS before) / devices.
    pub kib_per_device: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HonestReport {
    pub devices: usize,
    pub still_online: usize,
    pub reconnected: usize,
    pub received_commands: usize,
    pub state_changed: usize,
}

impl HonestReport {
    pub fn unaffected(&self) -> bool {
        self.still_online == self.devices
            && self.reconnected == 0
            && self.received_commands == 0
            && self.state_changed == 0
    }
}

/// What a scenario measured. `Display` gives the human summary; serialize
/// for JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub broker: String,
    pub devices: usize,
    pub classes: BTreeMap<String, usize>,
    /// Whether the scenario's goal was met (see the module table).
    pub ok: bool,
    pub notes: Vec<String>,
    pub connect: ConnectReport,
    pub messages: MessageReport,
    pub convergence: Option<ConvergenceReport>,
    pub reboot: Option<RebootReport>,
    pub rogue: Option<RogueStats>,
    pub honest: Option<HonestReport>,
    /// Failures by reason (connects, lost sessions, rejected commands, failed updates).
    pub failures: BTreeMap<String, u64>,
    pub memory: MemoryReport,
    pub stats: SimStats,
}

/// How far a scenario got, for whoever shows it (the binary draws a
/// progress bar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress<'a> {
    /// A phase of `len` steps begins.
    Phase { what: &'a str, len: u64 },
    /// This many steps of the current phase are done.
    At(u64),
    /// Every phase is over.
    Done,
}

/// Receives a scenario's [`Progress`]; `&|_| {}` ignores it.
pub type OnProgress<'a> = &'a (dyn Fn(Progress<'_>) + Send + Sync);

fn phase(progress: OnProgress<'_>, len: usize, what: &str) {
    progress(Progress::Phase {
        what,
        len: len as u64,
    });
}

/// Waits until `count` (re-evaluated every 50 ms) reaches `len`; updates the bar.
async fn wait_progress(
    progress: OnProgress<'_>,
    len: usize,
    timeout: Duration,
    mut count: impl FnMut() -> usize,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let n = count();
        progress(Progress::At(n as u64));
        if n >= len {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the fleet, runs the scenario, shuts the fleet down and reports.
pub async fn run(
    config: SimConfig,
    opts: ScenarioOptions,
    progress: OnProgress<'_>,
) -> Result<Report, SimError> {
    let mut report = Report {
        scenario: opts.scenario.as_str().into(),
        broker: config.broker.clone(),
        devices: config.ids.len(),
        classes: classes::census(&config.mix.assign(config.ids.len(), config.seed)),
        ..Report::default()
    };
    if opts.scenario == Scenario::Rogue && config.rogue_ids.is_empty() {
        return Err(SimError::Config(
            "the rogue scenario needs rogue devices (--rogue N)".into(),
        ));
    }
    // Fail early, before the fleet connects, if the operator cannot.
    let operator = match (opts.scenario, &opts.operator) {
        (Scenario::Converge, _) | (_, Some(_)) => Some(operator_client_config(&config, &opts)?),
        _ => None,
    };
    let rss_before = rss_kib().unwrap_or(0);
    let n = config.ids.len();
    let fleet = Fleet::start(config).await?;

    if fleet.presence_source() == "broker" {
        report.notes.push(
            "the broker refused a device's publish to its own presence topic (docs/PROTOCOL.md \
             asks devices to publish it): devices set only their will and leave presence to the broker"
                .into(),
        );
    }
    phase(progress, n, "connecting");
    let all_online = wait_progress(progress, n, opts.timeout, || fleet.stats().online).await;
    let stats = fleet.stats();
    let rss_online = rss_kib().unwrap_or(0);
    report.memory = MemoryReport {
        rss_before_kib: rss_before,
        rss_online_kib: rss_online,
        kib_per_device: if n > 0 {
            (rss_online.saturating_sub(rss_before)) as f64 / n as f64
        } else {
            0.0
        },
    };
    // With an operator, the controller's registry learns what was installed
    // (class, zone): selectors match that, never what devices report.
    if let (Some((tls, operator_id)), false) = (&operator, opts.scenario == Scenario::Converge) {
        let mut op =
            operator_session(fleet.config(), tls.clone(), operator_id, &mut report.notes).await?;
        register_fleet(&mut op, &fleet, operator_id, &mut report.notes).await?;
        op.disconnect().await;
    }
    let snapshots = fleet.device_states();
    let firsts: Vec<Duration> = snapshots
        .iter()
        .filter_map(|d| d.first_online.map(|t| t - fleet.started_at()))
        .collect();
    let last = firsts.iter().max().copied().unwrap_or_default();
    report.connect = ConnectReport {
        all_online,
        online: stats.online,
        seconds: last.as_secs_f64(),
        rate_per_s: if last.is_zero() {
            0.0
        } else {
            firsts.len() as f64 / last.as_secs_f64()
        },
        time_to_online: Percentiles::from_durations(firsts),
        handshake: stats.connect_latency.clone(),
        per_node: stats.per_node.clone(),
    };
    if !all_online {
        report.notes.push(format!(
            "only {}/{n} devices online after {:?}",
            stats.online, opts.timeout
        ));
    }

    let window_start = (
        Instant::now(),
        stats.publishes_offered,
        stats.publishes_received,
        stats.pubacks_received,
    );
    report.ok = all_online;
    match opts.scenario {
        Scenario::ConnectStorm => {}
        Scenario::Steady => {
            phase(
                progress,
                opts.duration.as_secs() as usize,
                "steady (seconds)",
            );
            let end = Instant::now() + opts.duration;
            while Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(250).min(end - Instant::now())).await;
                progress(Progress::At(
                    (opts.duration - (end - Instant::now())).as_secs(),
                ));
            }
            let s = fleet.stats();
            report.ok = s.online == n;
            if s.online < n {
                report
                    .notes
                    .push(format!("{}/{n} online at the end", s.online));
            }
        }
        Scenario::Converge => {
            let (base, operator_id) =
                operator.ok_or_else(|| SimError::Config("no operator".into()))?;
            let conv = converge(
                &fleet,
                &opts,
                base,
                &operator_id,
                progress,
                &mut report.notes,
            )
            .await?;
            report.ok = all_online && conv.targeted > 0 && conv.converged == conv.targeted;
            report.convergence = Some(conv);
        }
        Scenario::RebootWave => {
            let r = reboot_wave(&fleet, &opts, progress).await;
            report.ok = all_online && r.back_online == r.rebooted;
            report.reboot = Some(r);
        }
        Scenario::Rogue => {
            let before = fleet.device_states();
            phase(progress, fleet.rogue_ids().len(), "rogue attempts");
            let rogue = fleet.run_rogues().await;
            progress(Progress::At(fleet.rogue_ids().len() as u64));
            // Anything the broker wrongly forwarded has had time to arrive.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = fleet.device_states();
            let honest = honest_report(&before, &after);
            if !rogue.all_refused() {
                report.notes.push(format!(
                    "refused {} of {} rogue attempts; accepted: {:?}",
                    rogue.refused, rogue.attempted, rogue.accepted_details
                ));
            }
            if !honest.unaffected() {
                report
                    .notes
                    .push("honest devices were disturbed during the rogue run".into());
            }
            report.ok = all_online && rogue.all_refused() && honest.unaffected();
            report.rogue = Some(rogue);
            report.honest = Some(honest);
        }
    }
    let s = fleet.stats();
    let window = if opts.scenario == Scenario::Steady {
        window_start.0.elapsed()
    } else {
        fleet.started_at().elapsed()
    };
    let (offered, received, pubacks) = if opts.scenario == Scenario::Steady {
        (
            s.publishes_offered - window_start.1,
            s.publishes_received - window_start.2,
            s.pubacks_received - window_start.3,
        )
    } else {
        (
            s.publishes_offered,
            s.publishes_received,
            s.pubacks_received,
        )
    };
    report.messages = MessageReport {
        window_s: window.as_secs_f64(),
        offered,
        received,
        pubacks_received: pubacks,
        offered_per_s: per_s(offered, window),
        received_per_s: per_s(received, window),
        pubacks_received_per_s: per_s(pubacks, window),
    };
    progress(Progress::Done);
    let stats = fleet.shutdown().await;
    report.failures = stats.failures.clone();
    report.stats = stats;
    Ok(report)
}

fn per_s(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        (n as f64 / d.as_secs_f64() * 10.0).round() / 10.0
    }
}

fn honest_report(
    before: &[crate::DeviceSnapshot],
    after: &[crate::DeviceSnapshot],
) -> HonestReport {
    let mut r = HonestReport {
        devices: after.len(),
        ..HonestReport::default()
    };
    for (b, a) in before.iter().zip(after) {
        r.still_online += usize::from(a.online);
        r.reconnected += usize::from(a.connects != b.connects);
        r.received_commands += usize::from(a.commands_received != b.commands_received);
        r.state_changed += usize::from(a.version != b.version);
    }
    r
}

fn operator_client_config(
    config: &SimConfig,
    opts: &ScenarioOptions,
) -> Result<(std::sync::Arc<rustls::ClientConfig>, String), SimError> {
    let op = opts.operator.clone().ok_or_else(|| {
        SimError::Config("the converge scenario needs an operator identity (--operator ID)".into())
    })?;
    let pki = Pki::open(&config.pki).map_err(|e| SimError::Pki(e.to_string()))?;
    let base = TlsBase::from_ca_file(&pki.ca_cert_path())?;
    let identity = base.identity(&pki.cert_path(&op), &pki.key_path(&op))?;
    Ok((identity.config, op))
}

/// An operator connection subscribed to its responses.
async fn operator_session(
    config: &SimConfig,
    tls: std::sync::Arc<rustls::ClientConfig>,
    operator: &str,
    notes: &mut Vec<String>,
) -> Result<Client, SimError> {
    let opts = ConnectOptions {
        client_id: operator,
        keep_alive: 60,
        clean_session: true,
        will: None,
    };
    // Any node of the cluster will do; the first that takes the operator.
    let mut connected = Err(SimError::Other("no broker node".into()));
    for node in crate::fleet::resolve_brokers(config).await? {
        connected = Client::connect(
            node.addr,
            node.server_name,
            tls.clone(),
            &opts,
            config.connect_timeout,
        )
        .await
        .map_err(SimError::from);
        if connected.is_ok() {
            break;
        }
    }
    let mut op = connected?;
    let responses = topics::responses_filter(operator);
    let sub = op.subscribe(&responses, 1).await?;
    let codes = op
        .recv_until(Duration::from_secs(10), |p| match p {
            Packet::SubAck { pkid, codes } if *pkid == sub => Some(codes.clone()),
            _ => None,
        })
        .await?;
    if codes
        .first()
        .is_none_or(|c| *c == crate::mqtt::SUBACK_FAILURE)
    {
        notes.push(format!(
            "the broker refused the operator's SUBSCRIBE to {responses}"
        ));
    }
    Ok(op)
}

/// Registers the fleet's class and zone (what the simulator installed; the
/// `register` request of docs/PROTOCOL.md, idempotent). Without a
/// controller (another broker) nobody answers: noted, not fatal.
async fn register_fleet(
    op: &mut Client,
    fleet: &Fleet,
    operator: &str,
    notes: &mut Vec<String>,
) -> Result<(), SimError> {
    let manifest = fleet.manifest();
    for (n, chunk) in manifest.chunks(250).enumerate() {
        let rid = format!("r-{}-register-{n}", now_ms());
        let body = json!({"request_id": rid, "devices": chunk});
        let payload = serde_json::to_vec(&body).map_err(|e| SimError::Other(e.to_string()))?;
        op.publish(&topics::ops("register"), &payload, 1, false)
            .await?;
        let topic = topics::response(operator, &rid);
        let answer = op
            .recv_until(Duration::from_secs(10), |p| match p {
                Packet::Publish(p) if p.topic == topic => {
                    serde_json::from_slice::<Value>(&p.payload).ok()
                }
                _ => None,
            })
            .await;
        match answer {
            Ok(a) if a["status"] == "ok" => {}
            Ok(a) => {
                notes.push(format!("registering the fleet was refused: {a}"));
                break;
            }
            Err(crate::mqtt::ClientError::Timeout) => {
                notes.push("no controller answered the fleet's registration within 10 s".into());
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn converge(
    fleet: &Fleet,
    opts: &ScenarioOptions,
    tls: std::sync::Arc<rustls::ClientConfig>,
    operator: &str,
    progress: OnProgress<'_>,
    notes: &mut Vec<String>,
) -> Result<ConvergenceReport, SimError> {
    let config = fleet.config();
    let (key, value) = match &opts.set {
        Some(kv) => kv.clone(),
        None => {
            let mut rng = Rng::new(config.seed ^ crate::rng::fnv1a(b"converge") ^ now_ms());
            ("dimming".to_owned(), json!(5 + rng.below(91)))
        }
    };
    let class = opts.class;
    let prefix = opts.id_prefix.clone().unwrap_or_default();
    let name = format!(
        "agent-sim-{}-{}",
        if prefix.is_empty() { "all" } else { &prefix },
        key
    )
    .to_lowercase()
    .replace(|c: char| !(c.is_ascii_alphanumeric() || c == '-'), "-");
    let request_id = format!("r-{}", now_ms());
    // Built as JSON from the contract (docs/PROTOCOL.md), not from the Rust
    // types, so the simulator only depends on the wire format.
    let mut target = serde_json::Map::new();
    target.insert("class".into(), json!(class.as_str()));
    if !prefix.is_empty() {
        target.insert("id_prefix".into(), json!(prefix));
    }
    let doc = json!({
        "name": name,
        "target": target,
        "priority": 0,
        "state": {key.clone(): value.clone()},
        "request_id": request_id,
    });
    let targeted: Vec<String> = fleet
        .ids()
        .into_iter()
        .filter(|id| fleet.class_of(id) == Some(class) && id.starts_with(&prefix))
        .collect();

    // The operator: subscribe to its responses, register what was installed
    // (selectors match the registry), then publish the document.
    let mut op = operator_session(config, tls, operator, notes).await?;
    register_fleet(&mut op, fleet, operator, notes).await?;
    let payload = serde_json::to_vec(&doc).map_err(|e| SimError::Other(e.to_string()))?;
    let t0 = Instant::now();
    let pkid = op
        .publish(
            &format!("{}/{name}", topics::FLEET_DESIRED),
            &payload,
            1,
            false,
        )
        .await?;
    op.recv_until(Duration::from_secs(10), |p| {
        matches!(p, Packet::PubAck(id) if *id == pkid).then_some(())
    })
    .await?;

    // The controller's answer arrives while devices converge; read it on the side.
    let response_topic = topics::response(operator, &request_id);
    let response = tokio::spawn(async move {
        let got = op
            .recv_until(Duration::from_secs(30), |p| match p {
                Packet::Publish(p) if p.topic == response_topic => {
                    serde_json::from_slice::<Value>(&p.payload).ok()
                }
                _ => None,
            })
            .await
            .ok();
        op.disconnect().await;
        got
    });

    phase(progress, targeted.len(), &format!("converging {key}"));
    let mut done: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = t0 + opts.timeout;
    loop {
        for id in &targeted {
            if done.contains_key(id) {
                continue;
            }
            if let Some(d) = fleet.device(id) {
                if d.state.get(&key) == Some(&value) {
                    let at = d
                        .last_change
                        .filter(|t| *t >= t0)
                        .unwrap_or_else(Instant::now);
                    done.insert(id.clone(), at - t0);
                }
            }
        }
        progress(Progress::At(done.len() as u64));
        if done.len() == targeted.len() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Converged (or timed out): give a late answer a few more seconds.
    let mut response = response;
    let response = match tokio::time::timeout(Duration::from_secs(5), &mut response).await {
        Ok(r) => r.ok().flatten(),
        Err(_) => {
            response.abort();
            None
        }
    };
    match &response {
        None => notes.push(
            "no answer from the controller on fleet/responses (is a controller running?)".into(),
        ),
        Some(r) if r.get("status").and_then(Value::as_str) != Some("accepted") => {
            notes.push(format!("the controller did not accept the document: {r}"))
        }
        _ => {}
    }
    if done.len() < targeted.len() {
        notes.push(format!(
            "{}/{} targeted devices converged within {:?}",
            done.len(),
            targeted.len(),
            opts.timeout
        ));
    }
    Ok(ConvergenceReport {
        name,
        key,
        value,
        class: class.as_str().into(),
        targeted: targeted.len(),
        converged: done.len(),
        response,
        time: Percentiles::from_durations(done.into_values().collect()),
    })
}

async fn reboot_wave(
    fleet: &Fleet,
    opts: &ScenarioOptions,
    progress: OnProgress<'_>,
) -> RebootReport {
    let mut ids = fleet.ids();
    Rng::new(fleet.config().seed ^ 0xBEEF).shuffle(&mut ids);
    let count = ((ids.len() as f64) * opts.reboot_fraction.clamp(0.0, 1.0)).round() as usize;
    ids.truncate(count);
    phase(progress, count, "rebooting");
    let step = if count > 1 {
        opts.wave / (count as u32 - 1).max(1)
    } else {
        Duration::ZERO
    };
    let start = Instant::now();
    let mut rebooted_at = Vec::with_capacity(count);
    for (i, id) in ids.iter().enumerate() {
        let at = start + step * i as u32;
        tokio::time::sleep_until(at).await;
        let t = Instant::now();
        fleet.reboot(id);
        rebooted_at.push((id.clone(), t));
        progress(Progress::At(i as u64 + 1));
    }
    phase(progress, count, "back online");
    let mut back: BTreeMap<String, Duration> = BTreeMap::new();
    let deadline = Instant::now() + opts.timeout;
    loop {
        for (id, t) in &rebooted_at {
            if back.contains_key(id) {
                continue;
            }
            if let Some(since) = fleet.online_since(id) {
                if since > *t {
                    back.insert(id.clone(), since - *t);
                }
            }
        }
        progress(Progress::At(back.len() as u64));
        if back.len() == count || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    RebootReport {
        rebooted: count,
        back_online: back.len(),
        time: Percentiles::from_durations(back.into_values().collect()),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn pct(p: &Percentiles) -> String {
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={})",
        p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms, p.count
    )
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "agent-sim {} against {}: {}",
            self.scenario,
            self.broker,
            if self.ok { "OK" } else { "NOT OK" }
        );
        let classes: Vec<String> = self
            .classes
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        let _ = writeln!(s, "  devices     {} ({})", self.devices, classes.join(", "));
        let c = &self.connect;
        let _ = writeln!(
            s,
            "  connect     {}/{} online in {:.2} s = {:.0} devices/s",
            c.online, self.devices, c.seconds, c.rate_per_s
        );
        let _ = writeln!(s, "  online at   {}", pct(&c.time_to_online));
        let _ = writeln!(s, "  handshake   {}", pct(&c.handshake));
        // One node says nothing the connect line does not.
        if c.per_node.len() > 1 {
            let nodes: Vec<String> = c
                .per_node
                .iter()
                .map(|n| format!("{} {} connected", n.addr, n.connected))
                .collect();
            let _ = writeln!(s, "  nodes       {}", nodes.join(", "));
        }
        let m = &self.messages;
        let _ = writeln!(
            s,
            "  messages    offered {} ({:.1}/s, queued by devices), received {} ({:.1}/s, commands), PUBACKs received {} ({:.1}/s) over {:.1} s",
            m.offered,
            m.offered_per_s,
            m.received,
            m.received_per_s,
            m.pubacks_received,
            m.pubacks_received_per_s,
            m.window_s
        );
        let st = &self.stats;
        let _ = writeln!(
            s,
            "  commands    received {}, applied {}, rejected {}, ignored replays {}, ignored stale {}",
            st.commands_received,
            st.commands_applied,
            st.commands_rejected,
            st.ignored_replays,
            st.ignored_stale
        );
        let _ = writeln!(
            s,
            "  connects    {} ok, {} reconnects, {} failed, {} sessions lost",
            st.connects, st.reconnects, st.connect_failures, st.sessions_lost
        );
        if st.firmware.started > 0 {
            let _ = writeln!(
                s,
                "  firmware    started {}, succeeded {}, failed {}, installs {} {:?}",
                st.firmware.started,
                st.firmware.succeeded,
                st.firmware.failed,
                st.firmware.installs,
                st.firmware.by_outcome
            );
        }
        if !st.firmware.refused.is_empty() {
            let _ = writeln!(s, "  releases    refused {:?}", st.firmware.refused);
        }
        if let Some(conv) = &self.convergence {
            let _ = writeln!(
                s,
                "  converge    {} = {} on {}: {}/{} converged; {}",
                conv.key,
                conv.value,
                conv.class,
                conv.converged,
                conv.targeted,
                pct(&conv.time)
            );
            if let Some(r) = &conv.response {
                let _ = writeln!(s, "  controller  {r}");
            }
        }
        if let Some(r) = &self.reboot {
            let _ = writeln!(
                s,
                "  reboot      {}/{} back online; {}",
                r.back_online,
                r.rebooted,
                pct(&r.time)
            );
        }
        if let Some(r) = &self.rogue {
            let _ = writeln!(
                s,
                "  rogue       refused {} of {} attempts (refused == attempted: {}); accepted {}, unanswered {}",
                r.refused,
                r.attempted,
                if r.all_refused() { "yes" } else { "NO" },
                r.accepted,
                r.unanswered
            );
            for (action, a) in &r.by_action {
                let how: Vec<String> = a.how.iter().map(|(h, n)| format!("{h} ×{n}")).collect();
                let _ = writeln!(
                    s,
                    "    {action:<30} {}/{} refused ({})",
                    a.refused,
                    a.attempted,
                    how.join(", ")
                );
            }
        }
        if let Some(h) = &self.honest {
            let _ = writeln!(
                s,
                "  honest      {}/{} still online, {} reconnected, {} got commands, {} changed state",
                h.still_online, h.devices, h.reconnected, h.received_commands, h.state_changed
            );
        }
        if !self.failures.is_empty() {
            let _ = writeln!(s, "  failures");
            for (reason, n) in &self.failures {
                let _ = writeln!(s, "    {n:>6}  {reason}");
            }
        }
        let mem = &self.memory;
        let _ = writeln!(
            s,
            "  memory      RSS {} KiB before, {} KiB online = {:.1} KiB per device",
            mem.rss_before_kib, mem.rss_online_kib, mem.kib_per_device
        );
        for note in &self.notes {
            let _ = writeln!(s, "  note: {note}");
        }
        f.write_str(&s)
    }
}
