//! One simulated device: the device side of docs/PROTOCOL.md, its firmware
//! update state machine and the faults it suffers.
//!
//! Each device is one tokio task holding one [`Client`]. Its state lives in
//! [`DeviceShared`] (behind a mutex the fleet reads for snapshots); what only
//! the task needs (replay window, update job, RNG) lives in [`Device`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cityplane_proto::messages::{Ack, AckStatus, Command, State};
use cityplane_proto::topics;
use rustls::ClientConfig;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::classes;
use crate::fleet::{Attempt, Control, DeviceShared, FleetShared, ATTEMPTS_KEPT};
use crate::mqtt::{Client, ClientError, ConnectOptions, Packet, Publish, Will, SUBACK_FAILURE};
use crate::rng::{fnv1a, Rng};
use crate::stats::Counters;
use crate::PresenceMode;

const PRESENCE_ONLINE: &[u8] = br#"{"online":true}"#;
const PRESENCE_OFFLINE: &[u8] = br#"{"online":false}"#;

/// Command ids remembered to recognise replays.
pub(crate) const REPLAY_WINDOW: usize = 64;

/// The last [`REPLAY_WINDOW`] command ids, as 64-bit hashes (8 bytes each
/// instead of a String).
pub(crate) struct ReplayWindow {
    ids: [u64; REPLAY_WINDOW],
    next: usize,
    len: usize,
}

impl ReplayWindow {
    pub(crate) fn new() -> ReplayWindow {
        ReplayWindow {
            ids: [0; REPLAY_WINDOW],
            next: 0,
            len: 0,
        }
    }

    pub(crate) fn contains(&self, id: &str) -> bool {
        let h = fnv1a(id.as_bytes());
        self.ids[..self.len].contains(&h)
    }

    pub(crate) fn insert(&mut self, id: &str) {
        self.ids[self.next] = fnv1a(id.as_bytes());
        self.next = (self.next + 1) % REPLAY_WINDOW;
        self.len = (self.len + 1).min(REPLAY_WINDOW);
    }
}

/// Why a session ended.
enum End {
    Shutdown,
    /// Lost connection; reconnect with backoff.
    Lost(String),
    /// Away on purpose (reboot, offline episode); reconnect after `0`.
    Pause(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Downloading,
    Verifying,
    Installing,
    Rebooting,
    HealthCheck,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Downloading => "downloading",
            Step::Verifying => "verifying",
            Step::Installing => "installing",
            Step::Rebooting => "rebooting",
            Step::HealthCheck => "health-check",
        }
    }
}

struct UpdateJob {
    target: String,
    from: String,
    generation: u64,
    /// Commands to acknowledge when the update ends (the first, and retries
    /// of the same change that arrived meanwhile).
    command_ids: Vec<String>,
    step: Step,
    deadline: Instant,
    /// A power loss planned for the end of this step.
    interrupt_at: Option<Step>,
    /// Set when a reboot cut the update short; reported after reconnecting.
    interrupted: Option<Step>,
}

struct Failure {
    step: Step,
    reason: String,
    /// A reboot cut the update short (as opposed to a step failing).
    interrupted: bool,
}

struct AckOut {
    id: String,
    status: AckStatus,
    reason: Option<String>,
}

#[derive(Serialize)]
struct ReportedRef<'a> {
    version: u64,
    state: &'a State,
}

struct Device {
    dev: Arc<DeviceShared>,
    fleet: Arc<FleetShared>,
    tls: Arc<ClientConfig>,
    rng: Rng,
    replay: ReplayWindow,
    update: Option<Box<UpdateJob>>,
    /// Failed connects or lost sessions since the device was last online.
    lost_in_row: u32,
}

pub(crate) async fn run(
    dev: Arc<DeviceShared>,
    fleet: Arc<FleetShared>,
    tls: Arc<ClientConfig>,
    rng: Rng,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut device = Device {
        dev,
        fleet,
        tls,
        rng,
        replay: ReplayWindow::new(),
        update: None,
        lost_in_row: 0,
    };
    device.main(&mut shutdown).await;
}

/// Sleeps; true if shutdown came first.
async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.changed() => true,
        _ = tokio::time::sleep(d) => *shutdown.borrow(),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Device {
    fn counters(&self) -> &Counters {
        &self.fleet.counters
    }

    async fn main(&mut self, shutdown: &mut watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let connected = tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                // Boxed: the TLS handshake's state only lives while connecting,
                // instead of enlarging every device's task for its lifetime.
                r = Box::pin(self.connect()) => r,
            };
            let pause = match connected {
                Ok(mut client) => {
                    let end = self.session(&mut client, shutdown).await;
                    // No DISCONNECT: to the broker this is a lost device, so
                    // its will (presence offline) is published.
                    client.drop_abruptly().await;
                    drop(client);
                    self.set_disconnected();
                    self.attempt_ended();
                    match end {
                        End::Shutdown => return,
                        End::Pause(d) => d,
                        End::Lost(reason) => {
                            Counters::inc(&self.counters().sessions_lost);
                            self.counters().failure(format!("session lost: {reason}"));
                            self.lost_in_row += 1;
                            self.fleet
                                .config
                                .backoff
                                .delay(self.lost_in_row - 1, &mut self.rng)
                        }
                    }
                }
                Err(e) => {
                    self.attempt_ended();
                    Counters::inc(&self.counters().connect_failures);
                    self.counters().failure(format!("connect: {}", e.label()));
                    tracing::debug!(id = %self.dev.id, error = %e, "connect failed");
                    self.lost_in_row += 1;
                    self.fleet
                        .config
                        .backoff
                        .delay(self.lost_in_row - 1, &mut self.rng)
                }
            };
            if sleep_or_shutdown(pause, shutdown).await {
                return;
            }
        }
    }

    async fn connect(&mut self) -> Result<Client, ClientError> {
        {
            let mut v = self.dev.lock();
            if v.attempts.len() >= ATTEMPTS_KEPT {
                v.attempts.pop_front();
            }
            v.attempts.push_back(Attempt {
                started: Instant::now(),
                ended: None,
                online: false,
            });
        }
        self.fleet.pacer.wait(&mut self.rng).await;
        let _permit = self.fleet.connecting.acquire().await;
        Counters::inc(&self.counters().connect_attempts);
        let will = Will {
            topic: topics::presence(&self.dev.id),
            payload: PRESENCE_OFFLINE.to_vec(),
            qos: 1,
            retain: true,
        };
        let opts = ConnectOptions {
            client_id: &self.dev.id,
            keep_alive: self.fleet.config.keep_alive,
            clean_session: true,
            will: Some(&will),
        };
        let started = Instant::now();
        let client = Client::connect(
            self.fleet.addr,
            self.fleet.server_name.clone(),
            self.tls.clone(),
            &opts,
            self.fleet.config.connect_timeout,
        )
        .await?;
        let c = self.counters();
        c.connect_latency(started.elapsed());
        Counters::inc(&c.connects);
        c.connected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut v = self.dev.lock();
        if v.connects > 0 {
            Counters::inc(&c.reconnects);
        }
        v.connects += 1;
        v.connected = true;
        v.pending = None;
        Ok(client)
    }

    /// Records the end of the current attempt (failed connect or session).
    fn attempt_ended(&self) {
        let mut v = self.dev.lock();
        if let Some(a) = v.attempts.back_mut() {
            a.ended.get_or_insert_with(Instant::now);
        }
    }

    fn set_disconnected(&self) {
        let mut v = self.dev.lock();
        use std::sync::atomic::Ordering::Relaxed;
        if v.connected {
            self.counters().connected.fetch_sub(1, Relaxed);
        }
        if v.online {
            self.counters().online.fetch_sub(1, Relaxed);
        }
        v.connected = false;
        v.online = false;
        v.online_since = None;
    }

    fn set_online(&mut self) {
        self.lost_in_row = 0;
        let now = Instant::now();
        let mut v = self.dev.lock();
        if !v.online {
            self.counters()
                .online
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        v.online = true;
        v.online_since = Some(now);
        if let Some(a) = v.attempts.back_mut() {
            a.online = true;
        }
        if v.first_online.is_none() {
            v.first_online = Some(now);
            Counters::inc(&self.counters().ever_online);
        }
    }

    fn queue_publish(&self, c: &mut Client, topic: &str, payload: &[u8], qos: u8, retain: bool) {
        c.queue_publish(topic, payload, qos, retain);
        let counters = self.counters();
        Counters::inc(&counters.publishes_offered);
        counters
            .bytes_offered
            .fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bumps the version and queues the full state on `reported`.
    fn queue_report(&self, c: &mut Client) {
        let payload = {
            let mut v = self.dev.lock();
            v.version += 1;
            serde_json::to_vec(&ReportedRef {
                version: v.version,
                state: &v.state,
            })
        };
        let Ok(payload) = payload else { return };
        let retain = self.fleet.config.retain_reported;
        self.queue_publish(c, &topics::reported(&self.dev.id), &payload, 1, retain);
        Counters::inc(&self.counters().reports_offered);
    }

    fn queue_ack(&self, c: &mut Client, ack: AckOut) {
        let body = Ack {
            id: ack.id,
            status: ack.status,
            reason: ack.reason,
        };
        let Ok(payload) = serde_json::to_vec(&body) else {
            return;
        };
        self.queue_publish(c, &topics::acks(&self.dev.id), &payload, 1, false);
        Counters::inc(&self.counters().acks_offered);
    }

    /// The next random fault of this session: (when, what).
    fn next_fault(&mut self) -> Option<(Instant, Control)> {
        let f = &self.fleet.config.faults;
        let now = Instant::now();
        let drop = self
            .rng
            .exp_wait(f.link_drops_per_hour)
            .map(|w| (now + w, Control::DropLink));
        let offline = self.rng.exp_wait(f.offline_per_hour).map(|w| {
            let dur = self.rng.duration_between(f.offline_for.0, f.offline_for.1);
            (now + w, Control::Offline(dur))
        });
        match (drop, offline) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    fn reboot_time(&mut self) -> Duration {
        let (lo, hi) = self.fleet.config.faults.reboot_time;
        self.rng.duration_between(lo, hi)
    }

    async fn session(&mut self, c: &mut Client, shutdown: &mut watch::Receiver<bool>) -> End {
        let announced = self.fleet.announce_presence.load(Ordering::Relaxed);
        let end = self.session_inner(c, shutdown).await;
        let online = self.dev.lock().online;
        if announced
            && !online
            && matches!(end, End::Lost(_))
            && self.fleet.config.presence == PresenceMode::Auto
            && self.fleet.announce_presence.swap(false, Ordering::Relaxed)
        {
            tracing::warn!(
                id = %self.dev.id,
                "the broker closed the session right after the device's presence publish; \
                 devices will only set their will and leave presence to the broker"
            );
        }
        end
    }

    async fn session_inner(&mut self, c: &mut Client, shutdown: &mut watch::Receiver<bool>) -> End {
        let id = self.dev.id.clone();
        // The on-connect sequence of the contract.
        if self.fleet.announce_presence.load(Ordering::Relaxed) {
            self.queue_publish(c, &topics::presence(&id), PRESENCE_ONLINE, 1, true);
        }
        let commands_topic = topics::commands(&id);
        let sub_pkid = c.queue_subscribe(&commands_topic, 1);
        let acks = self.on_boot();
        self.queue_report(c);
        for ack in acks {
            self.queue_ack(c, ack);
        }
        if let Err(e) = c.flush().await {
            return End::Lost(e.label());
        }

        let keep_alive = (self.fleet.config.keep_alive > 0)
            .then(|| Duration::from_secs(u64::from(self.fleet.config.keep_alive)));
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut next_ping = keep_alive.map_or(far, |ka| Instant::now() + ka);
        let mut ping_outstanding = false;
        let telemetry = self.fleet.config.telemetry_interval;
        let mut next_telemetry = match telemetry {
            Some(t) if !t.is_zero() => Instant::now() + t.mul_f64(self.rng.f64()),
            _ => far,
        };
        let fault = self.next_fault();

        loop {
            let update_at = self.update.as_ref().map_or(far, |j| j.deadline);
            let fault_at = fault.map_or(far, |f| f.0);
            let next = next_ping.min(next_telemetry).min(update_at).min(fault_at);
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    return End::Shutdown;
                }
                _ = self.dev.control.notified() => {
                    let pending = self.dev.lock().pending.take();
                    if let Some(control) = pending {
                        return self.on_control(control);
                    }
                }
                packet = c.recv() => {
                    let packet = match packet {
                        Ok(p) => p,
                        Err(e) => return End::Lost(e.label()),
                    };
                    match packet {
                        Packet::SubAck { pkid, codes } if pkid == sub_pkid => {
                            if codes.first().is_none_or(|c| *c == SUBACK_FAILURE) {
                                Counters::inc(&self.counters().subscribe_refused);
                                return End::Lost(format!("SUBSCRIBE {commands_topic} refused"));
                            }
                            self.set_online();
                        }
                        Packet::Publish(p) => {
                            Counters::inc(&self.counters().publishes_received);
                            if let Some(end) = self.on_publish(c, p, &commands_topic) {
                                return end;
                            }
                        }
                        Packet::PubAck(_) => Counters::inc(&self.counters().pubacks_received),
                        Packet::PingResp => ping_outstanding = false,
                        _ => {}
                    }
                }
                _ = sleep_until(next) => {
                    let now = Instant::now();
                    if now >= next_ping {
                        if ping_outstanding {
                            return End::Lost("no PINGRESP within the keep-alive".into());
                        }
                        c.queue_ping();
                        ping_outstanding = true;
                        next_ping = keep_alive.map_or(far, |ka| now + ka);
                    }
                    if now >= next_telemetry {
                        self.queue_telemetry(c);
                        next_telemetry = telemetry.map_or(far, |t| now + t);
                    }
                    if now >= update_at {
                        if let Some(end) = self.advance_update(c) {
                            let _ = c.flush().await;
                            return end;
                        }
                    }
                    if let Some((at, control)) = fault {
                        if now >= at {
                            return self.on_control(control);
                        }
                    }
                }
            }
            if c.queued() > 0 {
                if let Err(e) = c.flush().await {
                    return End::Lost(e.label());
                }
            }
        }
    }

    fn on_control(&mut self, control: Control) -> End {
        match control {
            Control::Reboot => {
                Counters::inc(&self.counters().reboots);
                if let Some(job) = self.update.as_mut() {
                    if job.step != Step::Rebooting {
                        job.interrupted = Some(job.step);
                    }
                }
                End::Pause(self.reboot_time())
            }
            Control::Offline(d) => {
                Counters::inc(&self.counters().offline_episodes);
                End::Pause(d)
            }
            Control::DropLink => End::Lost("link dropped".into()),
        }
    }

    fn queue_telemetry(&mut self, c: &mut Client) {
        let sample = {
            let mut v = self.dev.lock();
            classes::telemetry(self.dev.class, &mut v.state, &mut self.rng, unix_ms())
        };
        if let Ok(payload) = serde_json::to_vec(&sample) {
            self.queue_publish(c, &topics::telemetry(&self.dev.id), &payload, 0, false);
            Counters::inc(&self.counters().telemetry_offered);
        }
    }

    /// Handles one PUBLISH; `Some` if the session ends because of it (a
    /// reboot armed by [`Fleet::reboot_on_next_command`](crate::Fleet)).
    fn on_publish(&mut self, c: &mut Client, p: Publish, commands_topic: &str) -> Option<End> {
        if p.topic == commands_topic {
            let reboot = {
                let mut v = self.dev.lock();
                let armed = std::mem::take(&mut v.reboot_on_command);
                if armed {
                    v.commands_received += 1;
                    v.reboots_before_applying += 1;
                }
                armed
            };
            if reboot {
                // Power cut on receipt: neither applied nor acknowledged
                // (no PUBACK), so the change is still pending at the controller.
                Counters::inc(&self.counters().commands_received);
                Counters::inc(&self.counters().reboots);
                return Some(End::Pause(self.reboot_time()));
            }
            match serde_json::from_slice::<Command>(&p.payload) {
                Ok(cmd) => self.on_command(c, cmd),
                Err(e) => {
                    Counters::inc(&self.counters().commands_malformed);
                    self.counters().failure("malformed command");
                    tracing::warn!(id = %self.dev.id, error = %e, "malformed command ignored");
                }
            }
        }
        if p.qos == 1 {
            c.queue_puback(p.pkid);
        }
        None
    }

    /// The contract's command rules: replays and stale generations are
    /// ignored; invalid values reject the whole command; otherwise keys are
    /// set (null deletes), the new state reported, then the ack sent. A new
    /// `firmware` starts an update, acknowledged when it ends.
    fn on_command(&mut self, c: &mut Client, cmd: Command) {
        Counters::inc(&self.counters().commands_received);
        self.dev.lock().commands_received += 1;
        if self.replay.contains(&cmd.id) {
            Counters::inc(&self.counters().ignored_replays);
            return;
        }
        self.replay.insert(&cmd.id);
        let class = self.dev.class;
        let mut v = self.dev.lock();
        if cmd.generation < v.last_generation {
            drop(v);
            Counters::inc(&self.counters().ignored_stale);
            return;
        }
        let mut reason = cmd
            .state
            .iter()
            .find_map(|(k, val)| classes::validate(class, k, val, &v.state).err());
        let current_fw = v
            .state
            .get("firmware")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let new_fw = cmd
            .state
            .get("firmware")
            .and_then(Value::as_str)
            .filter(|fw| *fw != current_fw)
            .map(str::to_owned);
        let mut joins_update = false;
        if let (None, Some(fw), Some(job)) = (&reason, &new_fw, &self.update) {
            if *fw == job.target {
                joins_update = true;
            } else {
                reason = Some(format!(
                    "firmware update to {} in progress ({})",
                    job.target,
                    job.step.name()
                ));
            }
        }
        if let Some(reason) = reason {
            drop(v);
            Counters::inc(&self.counters().commands_rejected);
            self.counters()
                .failure(format!("command rejected: {reason}"));
            self.queue_ack(
                c,
                AckOut {
                    id: cmd.id,
                    status: AckStatus::Rejected,
                    reason: Some(reason),
                },
            );
            return;
        }
        for (k, val) in &cmd.state {
            if k != "firmware" {
                classes::apply(class, &mut v.state, k, val);
            }
        }
        v.last_change = Some(Instant::now());
        match new_fw {
            None => {
                v.last_generation = v.last_generation.max(cmd.generation);
                drop(v);
                self.queue_report(c);
                Counters::inc(&self.counters().commands_applied);
                self.queue_ack(
                    c,
                    AckOut {
                        id: cmd.id,
                        status: AckStatus::Applied,
                        reason: None,
                    },
                );
            }
            Some(_) if joins_update => {
                drop(v);
                if let Some(job) = self.update.as_mut() {
                    if job.command_ids.len() < 16 {
                        job.command_ids.push(cmd.id);
                    }
                    job.generation = job.generation.max(cmd.generation);
                }
                self.queue_report(c);
            }
            Some(target) => {
                let fw = &self.fleet.config.firmware;
                let now = Instant::now();
                let interrupt_at = self
                    .rng
                    .chance(self.fleet.config.faults.reboot_during_update)
                    .then(|| {
                        *self
                            .rng
                            .pick(&[Step::Downloading, Step::Verifying, Step::Installing])
                    });
                let job = UpdateJob {
                    from: current_fw,
                    generation: cmd.generation,
                    command_ids: vec![cmd.id],
                    step: Step::Downloading,
                    deadline: now + fw.download_time(),
                    interrupt_at,
                    interrupted: None,
                    target,
                };
                v.state.insert(
                    "update".into(),
                    json!({"state": "downloading", "target": job.target, "from": job.from, "size_kib": fw.size_kib}),
                );
                drop(v);
                self.update = Some(Box::new(job));
                Counters::inc(&self.counters().fw_started);
                self.queue_report(c);
            }
        }
    }

    fn set_update_state(&self, step: Step) {
        let Some(job) = &self.update else { return };
        let mut v = self.dev.lock();
        v.state.insert(
            "update".into(),
            json!({"state": step.name(), "target": job.target, "from": job.from}),
        );
    }

    /// Moves the update on when its step's time is up. Returns how the
    /// session ends if the device reboots.
    fn advance_update(&mut self, c: &mut Client) -> Option<End> {
        let now = Instant::now();
        let job = self.update.as_mut()?;
        if now < job.deadline {
            return None;
        }
        if job.interrupt_at == Some(job.step) {
            // Power loss: nothing more is sent; the will announces it.
            job.interrupted = Some(job.step);
            job.interrupt_at = None;
            Counters::inc(&self.fleet.counters.reboots);
            return Some(End::Pause(self.reboot_time()));
        }
        let fw = self.fleet.config.firmware.clone();
        let (fail_p, failure, next, next_time) = match job.step {
            Step::Downloading => (
                fw.failure.download,
                "download failed: image checksum mismatch",
                Step::Verifying,
                fw.verify_time,
            ),
            Step::Verifying => (
                fw.failure.verify,
                "verification failed: bad image signature",
                Step::Installing,
                fw.install_time,
            ),
            Step::Installing => (
                fw.failure.install,
                "install failed: flash write error",
                Step::Rebooting,
                Duration::ZERO,
            ),
            Step::HealthCheck => (
                fw.failure.health_check,
                "health check failed after reboot; rolled back",
                Step::HealthCheck,
                Duration::ZERO,
            ),
            Step::Rebooting => return None,
        };
        let step = job.step;
        if self.rng.chance(fail_p) {
            let acks = self.finish_update(Err(Failure {
                step,
                reason: failure.to_owned(),
                interrupted: false,
            }));
            self.queue_report(c);
            for ack in acks {
                self.queue_ack(c, ack);
            }
            return None;
        }
        if step == Step::HealthCheck {
            let acks = self.finish_update(Ok(()));
            self.queue_report(c);
            for ack in acks {
                self.queue_ack(c, ack);
            }
            return None;
        }
        if let Some(job) = self.update.as_mut() {
            job.step = next;
            job.deadline = now + next_time;
        }
        self.set_update_state(next);
        self.queue_report(c);
        if next == Step::Rebooting {
            // The planned reboot into the new image.
            Counters::inc(&self.fleet.counters.reboots);
            return Some(End::Pause(self.reboot_time()));
        }
        None
    }

    /// Ends the update job: success switches nothing more (the new image
    /// already runs), failure keeps or restores the old firmware.
    fn finish_update(&mut self, outcome: Result<(), Failure>) -> Vec<AckOut> {
        let Some(job) = self.update.take() else {
            return Vec::new();
        };
        let counters = &self.fleet.counters;
        let mut v = self.dev.lock();
        v.last_change = Some(Instant::now());
        match outcome {
            Ok(()) => {
                v.state.insert("firmware".into(), json!(job.target));
                v.state.insert(
                    "update".into(),
                    json!({"state": "done", "target": job.target, "from": job.from}),
                );
                v.last_generation = v.last_generation.max(job.generation);
                Counters::inc(&counters.fw_succeeded);
                counters.fw_outcome("succeeded");
                for _ in &job.command_ids {
                    Counters::inc(&counters.commands_applied);
                }
                job.command_ids
                    .into_iter()
                    .map(|id| AckOut {
                        id,
                        status: AckStatus::Applied,
                        reason: None,
                    })
                    .collect()
            }
            Err(Failure {
                step,
                reason,
                interrupted,
            }) => {
                v.state.insert("firmware".into(), json!(job.from));
                v.state.insert(
                    "update".into(),
                    json!({"state": "failed", "target": job.target, "from": job.from, "step": step.name(), "reason": reason}),
                );
                Counters::inc(&counters.fw_failed);
                let kind = if interrupted { "interrupted" } else { "failed" };
                counters.fw_outcome(format!("{kind}: {}", step.name()));
                counters.failure(format!("firmware update failed: {reason}"));
                for _ in &job.command_ids {
                    Counters::inc(&counters.commands_rejected);
                }
                job.command_ids
                    .into_iter()
                    .map(|id| AckOut {
                        id,
                        status: AckStatus::Rejected,
                        reason: Some(reason.clone()),
                    })
                    .collect()
            }
        }
    }

    /// After (re)connecting: a planned reboot of an update continues with the
    /// health check on the new image; an interrupted update failed.
    fn on_boot(&mut self) -> Vec<AckOut> {
        let Some(job) = self.update.as_mut() else {
            return Vec::new();
        };
        if let Some(step) = job.interrupted.take() {
            let reason = format!("interrupted by a reboot during {}", step.name());
            return self.finish_update(Err(Failure {
                step,
                reason,
                interrupted: true,
            }));
        }
        if job.step == Step::Rebooting {
            job.step = Step::HealthCheck;
            job.deadline = Instant::now() + self.fleet.config.firmware.health_check_time;
            let target = job.target.clone();
            self.dev
                .lock()
                .state
                .insert("firmware".into(), json!(target));
            self.set_update_state(Step::HealthCheck);
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_remembers_the_last_64() {
        let mut w = ReplayWindow::new();
        for i in 0..100 {
            w.insert(&format!("c-{i}"));
        }
        assert!(w.contains("c-99"));
        assert!(w.contains("c-36"));
        assert!(!w.contains("c-35"));
        assert!(!w.contains("c-100"));
    }
}
