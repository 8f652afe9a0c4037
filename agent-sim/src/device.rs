//! One simulated device's session loop: connect, subscribe, feed what
//! arrives and what falls due to the device's rules
//! ([`crate::behaviour`]) and send what they decide; and the faults it
//! suffers.
//!
//! Certificate rotation happens here too, since it is about keys and
//! connections: the device makes a new key pair and sends its CSR when its
//! rules ask ([`Actions::csr`]), checks a delivered certificate against
//! the CA and that key ([`Actions::install`]), reconnects with it, and goes
//! back to the old certificate if the broker refuses the new one. Keys stay
//! in memory (the device's flash): a restarted simulator starts again from
//! the PKI directory's files.
//!
//! Each device is one tokio task holding one [`Client`]. Its state lives in
//! [`DeviceShared`] (behind a mutex the fleet reads for snapshots); what only
//! the task needs (replay window, update job, RNG) lives in [`Device`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cityplane_certs::rotation::{check_delivery, device_csr, DeviceCsr};
use cityplane_proto::firmware::decode_blob;
use cityplane_proto::messages::{Ack, AckStatus, CertificateState, Command, CsrRequest};
use cityplane_proto::topics;
use rustls::ClientConfig;
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};

use crate::behaviour::{self, AckOut, Actions, Behaviour, Env, Install};
use crate::classes;
use crate::fleet::{Attempt, Control, DeviceShared, FleetShared, ATTEMPTS_KEPT};
use crate::mqtt::{Client, ClientError, ConnectOptions, Packet, Publish, Will, SUBACK_FAILURE};
use crate::rng::Rng;
use crate::stats::Counters;
use crate::tls::Identity;
use crate::PresenceMode;

const PRESENCE_ONLINE: &[u8] = br#"{"online":true}"#;
const PRESENCE_OFFLINE: &[u8] = br#"{"online":false}"#;

/// Why a session ended.
enum End {
    Shutdown,
    /// Lost connection; reconnect with backoff.
    Lost(String),
    /// Away on purpose (reboot, offline episode); reconnect after `0`.
    Pause(Duration),
    /// Reconnect at once, to the same node (a new certificate to use).
    Reconnect,
}

/// A certificate (and key) the device can connect with.
#[derive(Clone)]
struct InUse {
    /// The rotation it came from (`issued` for the provisioned one).
    rotation: String,
    serial: String,
    not_after: String,
    tls: Arc<ClientConfig>,
}

/// A key pair made for a rotation, waiting for its certificate.
struct PendingKey {
    rotation: String,
    csr: DeviceCsr,
}

struct Device {
    dev: Arc<DeviceShared>,
    fleet: Arc<FleetShared>,
    /// The certificate it connects with.
    current: InUse,
    /// Set while `current` is a delivered certificate not yet accepted by
    /// the broker: what to go back to if it is refused.
    fallback: Option<InUse>,
    pending_key: Option<PendingKey>,
    rng: Rng,
    core: Behaviour,
    /// Failed connects or lost sessions since the device was last online.
    lost_in_row: u32,
    /// The broker node it tries first (`fleet::home_node`).
    home: usize,
    /// The node it connects to next, or is connected to.
    node: usize,
}

pub(crate) async fn run(
    dev: Arc<DeviceShared>,
    fleet: Arc<FleetShared>,
    identity: Identity,
    home: usize,
    rng: Rng,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut device = Device {
        dev,
        fleet,
        current: InUse {
            rotation: CertificateState::ISSUED.to_owned(),
            serial: identity.serial,
            not_after: identity.not_after,
            tls: identity.config,
        },
        fallback: None,
        pending_key: None,
        rng,
        core: Behaviour::new(),
        lost_in_row: 0,
        home,
        node: home,
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
                        End::Pause(d) => {
                            // A device that was away on purpose starts over
                            // like a freshly powered one: its first node,
                            // which keeps the fleet spread after a recovery.
                            self.node = self.home;
                            d
                        }
                        End::Reconnect => Duration::ZERO,
                        End::Lost(reason) => {
                            Counters::inc(&self.counters().sessions_lost);
                            self.counters().failure(format!("session lost: {reason}"));
                            self.fail_over();
                            self.lost_in_row += 1;
                            self.fleet
                                .config
                                .backoff
                                .delay(self.lost_in_row - 1, &mut self.rng)
                        }
                    }
                }
                Err(e) if self.fallback.is_some() && refused(&e) => {
                    // The broker will not take the new certificate (revoked,
                    // not from its CA, the key lost): back to the old one,
                    // at once, and keep reporting it.
                    self.attempt_ended();
                    Counters::inc(&self.counters().connect_failures);
                    Counters::inc(&self.counters().rot_fallbacks);
                    self.counters()
                        .failure(format!("rotated certificate refused: {}", e.label()));
                    tracing::warn!(id = %self.dev.id, rotation = %self.current.rotation, error = %e, "new certificate refused; back to the old one");
                    if let Some(old) = self.fallback.take() {
                        self.current = old;
                    }
                    // As after any failed attempt: the refusal may have been
                    // the node's rather than the certificate's.
                    self.fail_over();
                    Duration::ZERO
                }
                Err(e) => {
                    self.attempt_ended();
                    Counters::inc(&self.counters().connect_failures);
                    self.counters().failure(format!("connect: {}", e.label()));
                    tracing::debug!(id = %self.dev.id, error = %e, "connect failed");
                    self.fail_over();
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

    /// The node failed this device (no connection, or it lost the session):
    /// the next attempt goes to the next node. Whether the node is down or
    /// only this link is, another node is the better bet, and each device
    /// moving on by itself spreads a dead node's devices over the others.
    fn fail_over(&mut self) {
        self.node = crate::fleet::next_node(self.node, self.fleet.nodes.len());
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
        let node = &self.fleet.nodes[self.node];
        let client = Client::connect(
            node.addr,
            node.server_name.clone(),
            self.current.tls.clone(),
            &opts,
            self.fleet.config.connect_timeout,
        )
        .await?;
        if self.fallback.take().is_some() {
            self.rotation_completed();
        }
        let c = self.counters();
        c.connect_latency(started.elapsed());
        Counters::inc(&c.connects);
        c.connected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        node.connected();
        let mut v = self.dev.lock();
        if v.connects > 0 {
            Counters::inc(&c.reconnects);
        }
        v.connects += 1;
        v.connected = true;
        v.pending = None;
        Ok(client)
    }

    /// The broker took the delivered certificate: from now on the device
    /// reports it (the on-connect report carries it, with a new version).
    fn rotation_completed(&self) {
        Counters::inc(&self.counters().rot_completed);
        let mut v = self.dev.lock();
        v.state.insert(
            CertificateState::KEY.into(),
            serde_json::json!({"rotation": self.current.rotation}),
        );
        if !self.current.not_after.is_empty() {
            v.state.insert(
                "cert_not_after".into(),
                self.current.not_after.clone().into(),
            );
        }
        v.cert_serial = self.current.serial.clone();
        v.rotations += 1;
        tracing::info!(id = %self.dev.id, rotation = %self.current.rotation, serial = %self.current.serial, "connected with the rotated certificate");
    }

    /// Queues a CSR for `rotation`: for the key already made for it if
    /// there is one (a repeated request must not orphan the first key's
    /// certificate), else for a new key pair.
    fn queue_csr(&mut self, c: &mut Client, rotation: String) -> Result<(), String> {
        if self
            .pending_key
            .as_ref()
            .is_none_or(|p| p.rotation != rotation)
        {
            let csr = device_csr(&self.dev.id).map_err(|e| format!("no key pair: {e}"))?;
            self.pending_key = Some(PendingKey { rotation, csr });
        }
        let Some(pending) = &self.pending_key else {
            return Err("no key pair".into());
        };
        let body = CsrRequest {
            rotation: pending.rotation.clone(),
            csr: pending.csr.csr_pem.clone(),
        };
        let payload = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        self.queue_publish(c, topics::csr(&self.dev.id), payload, 1, false);
        Counters::inc(&self.counters().csrs_offered);
        Ok(())
    }

    /// A delivered certificate: checked, acknowledged, and if good the
    /// session ends so the device reconnects with it (`Some`).
    fn install(&mut self, c: &mut Client, install: Install) -> Option<End> {
        let Install { id, delivery } = install;
        let verdict = self.check_install(&delivery.rotation, &delivery.pem);
        let (status, reason, next) = match verdict {
            Ok(next) => (AckStatus::Applied, None, next),
            Err(reason) => {
                Counters::inc(&self.counters().rot_rejected);
                self.counters()
                    .failure(format!("certificate delivery rejected: {reason}"));
                (AckStatus::Rejected, Some(reason), None)
            }
        };
        let counters = self.counters();
        Counters::inc(if status == AckStatus::Applied {
            &counters.commands_applied
        } else {
            &counters.commands_rejected
        });
        self.queue_ack(c, AckOut { id, status, reason });
        let next = next?;
        self.fallback = Some(std::mem::replace(&mut self.current, next));
        // Reconnect at once: no DISCONNECT, as for any session end here.
        Some(End::Reconnect)
    }

    /// `Ok(Some)`: the certificate to reconnect with; `Ok(None)`: nothing
    /// to do (already in use, or the key was lost); `Err`: the reason to
    /// reject the delivery.
    fn check_install(&mut self, rotation: &str, pem: &str) -> Result<Option<InUse>, String> {
        if rotation == self.current.rotation && self.fallback.is_none() {
            return Ok(None);
        }
        let pending = self
            .pending_key
            .as_ref()
            .filter(|p| p.rotation == rotation)
            .ok_or_else(|| format!("no key pair waiting for rotation {rotation:?}"))?;
        let checked = check_delivery(
            &self.fleet.ca_pem,
            &self.dev.id,
            &pending.csr.public_key,
            pem,
        )
        .map_err(|e| e.to_string())?;
        let lost = self
            .fleet
            .config
            .faults
            .rotation_lost_key
            .contains(&self.dev.id);
        let Some(pending) = self.pending_key.take() else {
            return Err(format!("no key pair waiting for rotation {rotation:?}"));
        };
        if lost {
            // The fault: the certificate is fine, the key that goes with it
            // is gone, so it can never be used.
            Counters::inc(&self.counters().rot_keys_lost);
            self.counters().failure("rotation key lost");
            tracing::warn!(id = %self.dev.id, %rotation, "rotation key lost; keeping the old certificate");
            return Ok(None);
        }
        let identity = self
            .fleet
            .tls_base
            .identity_pem(pem.as_bytes(), pending.csr.key_pem.as_bytes())
            .map_err(|e| format!("unusable with its key: {e}"))?;
        Ok(Some(InUse {
            rotation: rotation.to_owned(),
            serial: checked.serial,
            not_after: checked.not_after,
            tls: identity.config,
        }))
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
            // Still the node of that session: the main loop moves on after.
            self.fleet.nodes[self.node].disconnected();
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

    fn queue_publish(
        &self,
        c: &mut Client,
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    ) {
        let counters = self.counters();
        Counters::inc(&counters.publishes_offered);
        counters
            .bytes_offered
            .fetch_add(payload.len() as u64, std::sync::atomic::Ordering::Relaxed);
        c.queue_publish_owned(topic, payload, qos, retain);
    }

    /// Bumps the version and queues the full state on `reported`.
    fn queue_report(&self, c: &mut Client) {
        let payload = behaviour::report(&mut self.dev.lock());
        let Ok(payload) = payload else { return };
        let retain = self.fleet.config.retain_reported;
        self.queue_publish(c, topics::reported(&self.dev.id), payload, 1, retain);
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
        self.queue_publish(c, topics::acks(&self.dev.id), payload, 1, false);
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
            self.queue_publish(c, topics::presence(&id), PRESENCE_ONLINE.to_vec(), 1, true);
        }
        let commands_topic = topics::commands(&id);
        let sub_pkid = c.queue_subscribe(&commands_topic, self.fleet.config.commands_qos.min(1));
        // Image chunks come on the blob topic; only devices that download
        // real images (a release key) subscribe, so that without one the
        // device does exactly what it did before (also on other brokers).
        let blob_topic = topics::blob(&id);
        let blob_pkid = self
            .fleet
            .config
            .release_key
            .is_some()
            .then(|| c.queue_subscribe(&blob_topic, 0));
        let actions = {
            let env = env(&self.fleet, self.dev.class);
            self.core
                .on_boot(&env, &mut self.dev.lock(), Instant::now())
        };
        self.perform(c, actions);
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
            let update_at = self.core.update_due().unwrap_or(far);
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
                        // Refused: updates will fail for want of blobs; the
                        // rest of the device works.
                        Packet::SubAck { pkid, codes }
                            if Some(pkid) == blob_pkid
                                && codes.first().is_none_or(|c| *c == SUBACK_FAILURE) =>
                        {
                            Counters::inc(&self.counters().subscribe_refused);
                            self.counters().failure(format!("SUBSCRIBE {blob_topic} refused"));
                        }
                        Packet::Publish(p) if p.topic == blob_topic => {
                            Counters::inc(&self.counters().publishes_received);
                            self.on_blob(c, &p.payload);
                        }
                        Packet::Publish(p) => {
                            Counters::inc(&self.counters().publishes_received);
                            if let Some(end) = self.on_publish(c, p, &commands_topic) {
                                // What it answered (an ack) goes out first.
                                let _ = c.flush().await;
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
                        let actions = {
                            let env = env(&self.fleet, self.dev.class);
                            self.core
                                .advance_update(&env, &mut self.rng, &mut self.dev.lock(), now)
                        };
                        if let Some(end) = self.perform(c, actions) {
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
                self.core.power_lost();
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
            self.queue_publish(c, topics::telemetry(&self.dev.id), payload, 0, false);
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
            let end = match serde_json::from_slice::<Command>(&p.payload) {
                Ok(cmd) => self.on_command(c, cmd),
                Err(e) => {
                    Counters::inc(&self.counters().commands_malformed);
                    self.counters().failure("malformed command");
                    tracing::warn!(id = %self.dev.id, error = %e, "malformed command ignored");
                    None
                }
            };
            if p.qos == 1 {
                c.queue_puback(p.pkid);
            }
            return end;
        }
        if p.qos == 1 {
            c.queue_puback(p.pkid);
        }
        None
    }

    /// A chunk of the image being downloaded (QoS 0: nothing to acknowledge).
    fn on_blob(&mut self, c: &mut Client, payload: &[u8]) {
        let (header, bytes) = match decode_blob(payload) {
            Ok(blob) => blob,
            Err(e) => {
                self.counters().failure("malformed blob");
                tracing::warn!(id = %self.dev.id, error = %e, "malformed blob ignored");
                return;
            }
        };
        let actions = {
            let env = env(&self.fleet, self.dev.class);
            self.core
                .on_blob(&env, &mut self.dev.lock(), header, bytes, Instant::now())
        };
        let _ = self.perform(c, actions);
    }

    /// `Some` when the session ends because of it (a certificate installed).
    fn on_command(&mut self, c: &mut Client, cmd: Command) -> Option<End> {
        let actions = {
            let env = env(&self.fleet, self.dev.class);
            self.core.on_command(
                &env,
                &mut self.rng,
                &mut self.dev.lock(),
                cmd,
                Instant::now(),
            )
        };
        self.perform(c, actions)
    }

    /// Queues what the device's rules decided; `Some` if the session ends
    /// (a reboot, or a new certificate to connect with).
    fn perform(&mut self, c: &mut Client, mut actions: Actions) -> Option<End> {
        if actions.report {
            self.queue_report(c);
        }
        if let Some(rotation) = actions.csr {
            if let Err(reason) = self.queue_csr(c, rotation) {
                // Not sent, so not "applied": the ack says why.
                self.counters().failure(format!("csr: {reason}"));
                for ack in &mut actions.acks {
                    ack.status = AckStatus::Rejected;
                    ack.reason = Some(reason.clone());
                }
            }
        }
        for ack in actions.acks {
            self.queue_ack(c, ack);
        }
        if let Some(install) = actions.install {
            if let Some(end) = self.install(c, install) {
                return Some(end);
            }
        }
        if let Some(req) = actions.fetch {
            if let Ok(payload) = serde_json::to_vec(&req) {
                // QoS 0: an unanswered fetch is sent again (behaviour.rs).
                self.queue_publish(c, topics::fetch(&self.dev.id), payload, 0, false);
            }
        }
        if actions.reboot {
            Counters::inc(&self.counters().reboots);
            return Some(End::Pause(self.reboot_time()));
        }
        None
    }
}

/// A refusal of the certificate itself (TLS alert, CONNACK refusal, the
/// connection closed before CONNACK), as opposed to the broker being out
/// of reach, which says nothing about the certificate.
fn refused(e: &ClientError) -> bool {
    !matches!(e, ClientError::Tcp(_) | ClientError::Timeout)
}

/// What the device's rules read from the fleet.
fn env(fleet: &FleetShared, class: classes::Class) -> Env<'_> {
    Env {
        class,
        firmware: &fleet.config.firmware,
        reboot_during_update: fleet.config.faults.reboot_during_update,
        counters: &fleet.counters,
        release_key: fleet.config.release_key.as_ref(),
    }
}
