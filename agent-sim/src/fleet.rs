//! The fleet: starts one task per device, paces their connects, and lets
//! callers look at and poke the devices.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cityplane_certs::Pki;
use cityplane_proto::messages::{CertificateState, State};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde_json::Value;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::classes::{self, Class};
use crate::mqtt::{Client, ClientError, ConnectOptions, Packet};
use crate::rng::Rng;
use crate::rogue::{self, RogueStats};
use crate::stats::{Counters, NodeStats, SimStats};
use crate::tls::TlsBase;
use crate::{device, PresenceMode, SimConfig, SimError};

/// Spreads connection attempts: at most `rate` per second, each slot
/// jittered within its interval.
pub(crate) struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        let interval = if rate > 0.0 && rate.is_finite() {
            Duration::from_secs_f64(1.0 / rate)
        } else {
            Duration::ZERO
        };
        Pacer {
            interval,
            next: Mutex::new(Instant::now()),
        }
    }

    pub(crate) async fn wait(&self, rng: &mut Rng) {
        if self.interval.is_zero() {
            return;
        }
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        let jitter = self.interval.mul_f64(rng.f64());
        tokio::time::sleep_until(slot + jitter).await;
    }
}

/// One broker node of `SimConfig::broker`, and who is on it.
pub(crate) struct Node {
    /// The entry as configured (`HOST:PORT`), for reports.
    pub entry: String,
    pub addr: SocketAddr,
    pub server_name: ServerName<'static>,
    /// Devices with a live session on this node (after CONNACK).
    pub connected: AtomicI64,
    /// Successful connects to this node, reconnects included.
    pub connects: AtomicU64,
}

impl Node {
    pub(crate) fn connected(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn disconnected(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What all device tasks share.
pub(crate) struct FleetShared {
    pub config: SimConfig,
    /// Never empty: [`resolve_brokers`] refuses an empty list.
    pub nodes: Vec<Node>,
    pub counters: Counters,
    pub pacer: Pacer,
    pub connecting: Semaphore,
    pub started: Instant,
    pub rogue: Mutex<RogueStats>,
    /// Builds client configs for rotated certificates.
    pub tls_base: TlsBase,
    /// `ca.crt` (PEM): a delivered certificate must chain to it.
    pub ca_pem: Vec<u8>,
    /// Devices publish presence online themselves (see [`PresenceMode`]).
    /// In `Auto` mode it turns off if the broker closes a session right
    /// after a presence publish.
    pub announce_presence: std::sync::atomic::AtomicBool,
}

/// Something the fleet asks one device to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Control {
    /// Power-cycle: drop the connection (the will fires), stay away for the
    /// reboot time, reconnect.
    Reboot,
    /// Go dark for a while.
    Offline(Duration),
    /// Lose the link and reconnect with backoff.
    DropLink,
}

/// One device as the fleet sees it; the device task owns the rest.
pub(crate) struct DeviceShared {
    pub id: String,
    pub class: Class,
    pub view: Mutex<DeviceView>,
    pub control: Notify,
}

impl DeviceShared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, DeviceView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
pub(crate) struct DeviceView {
    pub state: State,
    pub version: u64,
    pub connected: bool,
    pub online: bool,
    pub connects: u32,
    pub commands_received: u32,
    pub last_generation: u64,
    /// When the device last changed its state because of a command.
    pub last_change: Option<Instant>,
    /// When the current session became online.
    pub online_since: Option<Instant>,
    pub first_online: Option<Instant>,
    pub pending: Option<Control>,
    /// The last [`ATTEMPTS_KEPT`] connection attempts.
    pub attempts: VecDeque<Attempt>,
    /// Armed by [`Fleet::reboot_on_next_command`].
    pub reboot_on_command: bool,
    /// Commands received and not applied because the device rebooted first.
    pub reboots_before_applying: u32,
    /// Firmware images this device wrote to flash.
    pub firmware_installs: u32,
    /// Image bytes it downloaded, over all its connections.
    pub firmware_bytes: u64,
    /// The serial of the certificate it connects with.
    pub cert_serial: String,
    /// Certificate rotations completed (connected with the new certificate).
    pub rotations: u32,
    /// The secrets it was given (`admin_password` → plaintext), in memory
    /// only; its state reports their references.
    pub secrets: std::collections::BTreeMap<String, String>,
}

/// Connection attempts each device remembers (the oldest are dropped).
pub const ATTEMPTS_KEPT: usize = 32;

/// One connection attempt as the device recorded it, from its own clock.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attempt {
    /// The device starts connecting (after any reconnect wait, before pacing).
    pub started: Instant,
    /// The connect failed or the session ended (`None`: still going).
    pub ended: Option<Instant>,
    /// The session got online (SUBACK of its commands subscription).
    pub online: bool,
}

/// A copy of one device's state.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSnapshot {
    pub id: String,
    pub class: Class,
    /// The version of the last report sent (the next one is above it).
    pub version: u64,
    pub state: State,
    pub connected: bool,
    pub online: bool,
    /// Successful connects so far.
    pub connects: u32,
    pub commands_received: u32,
    /// Generation of the last applied command.
    pub last_generation: u64,
    pub last_change: Option<Instant>,
    pub online_since: Option<Instant>,
    pub first_online: Option<Instant>,
    /// The last [`ATTEMPTS_KEPT`] connection attempts, oldest first: the
    /// wait before attempt `i + 1` is `attempts[i + 1].started -
    /// attempts[i].ended`.
    pub attempts: Vec<Attempt>,
    /// Commands this device received and did not apply because it rebooted
    /// first ([`Fleet::reboot_on_next_command`]).
    pub reboots_before_applying: u32,
    /// Firmware images this device wrote to flash (one per update that got
    /// through its install step).
    pub firmware_installs: u32,
    /// Image bytes this device downloaded, over all its connections (a
    /// download resumed after a dropped connection fetches no byte twice).
    pub firmware_bytes: u64,
    /// The serial of the certificate it connects with (as `cityplane_certs`
    /// writes serials): the one it was provisioned with until a rotation
    /// completes.
    pub cert_serial: String,
    /// Certificate rotations it completed (connected with the new
    /// certificate).
    pub rotations: u32,
}

/// A running fleet of simulated devices.
pub struct Fleet {
    shared: Arc<FleetShared>,
    devices: Vec<Arc<DeviceShared>>,
    index: HashMap<String, usize>,
    rogues: Vec<(String, Arc<ClientConfig>)>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
}

impl Fleet {
    /// Loads every device's certificate, then starts all devices; they
    /// connect in the background, paced by `connect_rate`.
    pub async fn start(config: SimConfig) -> Result<Fleet, SimError> {
        if config.ids.is_empty() && config.rogue_ids.is_empty() {
            return Err(SimError::Config("no devices to simulate".into()));
        }
        for id in config.ids.iter().chain(&config.rogue_ids) {
            cityplane_proto::validate_id(id).map_err(|e| SimError::Config(e.to_string()))?;
        }
        let nodes = resolve_brokers(&config).await?;

        // Certificates: file reads and key parsing, off the async threads.
        let load_config = config.clone();
        let (identities, rogues, base, ca_pem) = tokio::task::spawn_blocking(move || {
            let pki = Pki::open(&load_config.pki).map_err(|e| SimError::Pki(e.to_string()))?;
            let base = TlsBase::from_ca_file(&pki.ca_cert_path())?;
            let ca_pem = std::fs::read(pki.ca_cert_path())
                .map_err(|e| SimError::Pki(format!("{}: {e}", pki.ca_cert_path().display())))?;
            let load = |id: &String| base.identity(&pki.cert_path(id), &pki.key_path(id));
            let identities = load_config
                .ids
                .iter()
                .map(load)
                .collect::<Result<Vec<_>, _>>()?;
            let rogues = load_config
                .rogue_ids
                .iter()
                .map(|id| load(id).map(|i| (id.clone(), i.config)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, SimError>((identities, rogues, base, ca_pem))
        })
        .await
        .map_err(|e| SimError::Other(e.to_string()))??;

        let announce_presence = match config.presence {
            PresenceMode::Publish => true,
            PresenceMode::Skip => false,
            PresenceMode::Auto => {
                // The first device, and if that is inconclusive the last one.
                let mut verdict = None;
                let last = config.ids.len().saturating_sub(1);
                for i in [0, last] {
                    if let (Some(id), Some(identity)) = (config.ids.get(i), identities.get(i)) {
                        // On the node the device will use first, as it would.
                        let node = &nodes[home_node(i, nodes.len())];
                        verdict = probe_presence(
                            node.addr,
                            &node.server_name,
                            identity.config.clone(),
                            id,
                            &config,
                        )
                        .await;
                    }
                    if verdict.is_some() || last == 0 {
                        break;
                    }
                }
                verdict.unwrap_or_else(|| {
                    tracing::warn!("presence probe inconclusive; devices will publish presence");
                    true
                })
            }
        };
        let shared = Arc::new(FleetShared {
            announce_presence: std::sync::atomic::AtomicBool::new(announce_presence),
            pacer: Pacer::new(config.connect_rate),
            connecting: Semaphore::new(config.max_connecting.max(1)),
            started: Instant::now(),
            counters: Counters::default(),
            rogue: Mutex::new(RogueStats::default()),
            tls_base: base,
            ca_pem,
            nodes,
            config,
        });
        let config = &shared.config;
        let classes = config.mix.assign(config.ids.len(), config.seed);
        let (shutdown, shutdown_rx) = watch::channel(false);
        // A version above anything an earlier run of the same devices sent.
        let first_version = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let mut devices = Vec::with_capacity(config.ids.len());
        let mut tasks = Vec::with_capacity(config.ids.len());
        let mut index = HashMap::with_capacity(config.ids.len());
        for (i, ((id, class), identity)) in
            config.ids.iter().zip(classes).zip(identities).enumerate()
        {
            let mut rng = Rng::for_name(config.seed, id);
            let mut state = classes::initial_state(class, &mut rng, &identity.not_after);
            state.insert(
                CertificateState::KEY.into(),
                serde_json::json!({"rotation": CertificateState::ISSUED}),
            );
            if config.release_key.is_some() {
                // A device that checks releases starts with its own firmware
                // as the floor (it refuses anything older unless signed as a
                // downgrade).
                if let Some(firmware) = state.get("firmware").cloned() {
                    state.insert(crate::behaviour::FLOOR_KEY.into(), firmware);
                }
            }
            let dev = Arc::new(DeviceShared {
                id: id.clone(),
                class,
                view: Mutex::new(DeviceView {
                    state,
                    version: first_version,
                    connected: false,
                    online: false,
                    connects: 0,
                    commands_received: 0,
                    last_generation: 0,
                    last_change: None,
                    online_since: None,
                    first_online: None,
                    pending: None,
                    attempts: VecDeque::new(),
                    reboot_on_command: false,
                    secrets: Default::default(),
                    reboots_before_applying: 0,
                    firmware_installs: 0,
                    firmware_bytes: 0,
                    cert_serial: identity.serial.clone(),
                    rotations: 0,
                }),
                control: Notify::new(),
            });
            index.insert(id.clone(), devices.len());
            devices.push(dev.clone());
            let home = home_node(i, shared.nodes.len());
            let fut = device::run(
                dev,
                shared.clone(),
                identity,
                home,
                rng,
                shutdown_rx.clone(),
            );
            tasks.push(tokio::spawn(fut));
        }
        Ok(Fleet {
            shared,
            devices,
            index,
            rogues,
            tasks,
            shutdown,
        })
    }

    /// Device ids, in configuration order.
    pub fn ids(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.id.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// When [`Fleet::start`] started the devices.
    pub fn started_at(&self) -> Instant {
        self.shared.started
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    pub fn stats(&self) -> SimStats {
        let mut stats = self.shared.counters.snapshot(self.devices.len());
        stats.rogue = self
            .shared
            .rogue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        stats.presence = self.presence_source().into();
        stats.per_node = self
            .shared
            .nodes
            .iter()
            .map(|n| NodeStats {
                addr: n.entry.clone(),
                connected: n.connected.load(Ordering::Relaxed).max(0) as usize,
                connects: n.connects.load(Ordering::Relaxed),
            })
            .collect();
        stats
    }

    /// `devices` if devices publish their presence, `broker` if they leave it
    /// to the broker (and their will).
    pub fn presence_source(&self) -> &'static str {
        if self
            .shared
            .announce_presence
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            "devices"
        } else {
            "broker"
        }
    }

    fn snapshot(d: &DeviceShared) -> DeviceSnapshot {
        let v = d.lock();
        DeviceSnapshot {
            id: d.id.clone(),
            class: d.class,
            version: v.version,
            state: v.state.clone(),
            connected: v.connected,
            online: v.online,
            connects: v.connects,
            commands_received: v.commands_received,
            last_generation: v.last_generation,
            last_change: v.last_change,
            online_since: v.online_since,
            first_online: v.first_online,
            attempts: v.attempts.iter().copied().collect(),
            reboots_before_applying: v.reboots_before_applying,
            firmware_installs: v.firmware_installs,
            firmware_bytes: v.firmware_bytes,
            cert_serial: v.cert_serial.clone(),
            rotations: v.rotations,
        }
    }

    pub fn device(&self, id: &str) -> Option<DeviceSnapshot> {
        self.index
            .get(id)
            .map(|i| Fleet::snapshot(&self.devices[*i]))
    }

    /// The value of one key of a device's state (`None` inside if the key is
    /// absent; `None` outside for an unknown device). Cheaper than
    /// [`device`](Self::device): nothing else is copied.
    pub fn value_of(&self, id: &str, key: &str) -> Option<Option<Value>> {
        self.index
            .get(id)
            .map(|i| self.devices[*i].lock().state.get(key).cloned())
    }

    /// The serial of the certificate the device connects with (`None` for
    /// an unknown id): the provisioned one's until a rotation completes,
    /// the old one's again after a refused new certificate.
    pub fn cert_serial(&self, id: &str) -> Option<String> {
        self.index
            .get(id)
            .map(|i| self.devices[*i].lock().cert_serial.clone())
    }

    /// Certificate rotations the device completed (`None`: unknown id).
    /// The fleet's totals are in [`SimStats::rotations`].
    pub fn rotations(&self, id: &str) -> Option<u32> {
        self.index
            .get(id)
            .map(|i| self.devices[*i].lock().rotations)
    }

    /// The plaintext secrets a device holds, by key. For tests that check
    /// a secret appears nowhere else; a real device never tells.
    pub fn secrets_of(&self, id: &str) -> std::collections::BTreeMap<String, String> {
        self.index
            .get(id)
            .map(|i| self.devices[*i].lock().secrets.clone())
            .unwrap_or_default()
    }

    /// When the device's current session became online (`None`: offline).
    pub fn online_since(&self, id: &str) -> Option<Instant> {
        self.index
            .get(id)
            .and_then(|i| self.devices[*i].lock().online_since)
    }

    /// Every device, in configuration order.
    pub fn device_states(&self) -> Vec<DeviceSnapshot> {
        self.devices.iter().map(|d| Fleet::snapshot(d)).collect()
    }

    /// The fleet as a provisioning manifest (`cityplane devices register`,
    /// the `register` operator request): each device's id, class and the
    /// labels it was installed with. The installer's knowledge, which is
    /// what a registry holds, not what the devices claim later.
    pub fn manifest(&self) -> Vec<Value> {
        self.devices
            .iter()
            .map(|d| {
                let labels = d.lock().state.get("labels").cloned().unwrap_or(Value::Null);
                let mut entry = serde_json::json!({"id": d.id, "class": d.class.as_str()});
                if labels.is_object() {
                    entry["labels"] = labels;
                }
                entry
            })
            .collect()
    }

    /// The class of a device.
    pub fn class_of(&self, id: &str) -> Option<Class> {
        self.index.get(id).map(|i| self.devices[*i].class)
    }

    /// How many devices (of `class`, if given) have `key` = `value` in their
    /// state: `(matching, considered)`. Cheap: no state is copied.
    pub fn count_with(&self, key: &str, value: &Value, class: Option<Class>) -> (usize, usize) {
        let mut matching = 0;
        let mut considered = 0;
        for d in &self.devices {
            if class.is_some_and(|c| c != d.class) {
                continue;
            }
            considered += 1;
            if d.lock().state.get(key) == Some(value) {
                matching += 1;
            }
        }
        (matching, considered)
    }

    /// True if every device (of `class`, if given) has `key` = `value`.
    pub fn all_have(&self, key: &str, value: &Value, class: Option<Class>) -> bool {
        let (matching, considered) = self.count_with(key, value, class);
        matching == considered
    }

    /// Polls [`stats`](Self::stats) every 20 ms until `done` holds; false on
    /// timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&SimStats) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.stats()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `n` devices are online at once.
    pub async fn wait_online(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |s| s.online >= n).await
    }

    fn control(&self, id: &str, control: Control) -> bool {
        let Some(i) = self.index.get(id) else {
            return false;
        };
        let dev = &self.devices[*i];
        dev.lock().pending = Some(control);
        dev.control.notify_one();
        true
    }

    /// Power-cycles a device (abrupt disconnect: the broker publishes its
    /// will); it reconnects after [`Faults::reboot_time`](crate::Faults).
    /// A firmware update in progress is interrupted. False for an unknown id.
    pub fn reboot(&self, id: &str) -> bool {
        self.control(id, Control::Reboot)
    }

    /// Arms a power cut on the device's next command: it receives the
    /// command, then reboots before applying or acknowledging it (no PUBACK
    /// either), and reconnects after [`Faults::reboot_time`](crate::Faults).
    /// Counted in [`DeviceSnapshot::reboots_before_applying`]. False for an
    /// unknown id.
    pub fn reboot_on_next_command(&self, id: &str) -> bool {
        let Some(i) = self.index.get(id) else {
            return false;
        };
        self.devices[*i].lock().reboot_on_command = true;
        true
    }

    /// Takes a device off the network for `duration`.
    pub fn take_offline(&self, id: &str, duration: Duration) -> bool {
        self.control(id, Control::Offline(duration))
    }

    /// Drops a device's link; it reconnects with backoff.
    pub fn drop_link(&self, id: &str) -> bool {
        self.control(id, Control::DropLink)
    }

    /// Someone with local access changes a setting (a technician turns
    /// telnet back on): the state changes without a command, and the
    /// device reports it when it reconnects, at once (its link is dropped).
    /// False for an unknown id.
    pub fn tamper(&self, id: &str, key: &str, value: Value) -> bool {
        let Some(i) = self.index.get(id) else {
            return false;
        };
        self.devices[*i].lock().state.insert(key.to_owned(), value);
        self.control(id, Control::DropLink)
    }

    /// The rogue devices' ids.
    pub fn rogue_ids(&self) -> Vec<String> {
        self.rogues.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Lets every rogue device try every forbidden action once (each on a
    /// fresh connection, against honest devices' topics), and returns what
    /// was attempted and refused. Also added to [`SimStats::rogue`].
    pub async fn run_rogues(&self) -> RogueStats {
        let victims: Vec<String> = if self.devices.is_empty() {
            vec!["nobody0001".to_owned()]
        } else {
            self.devices.iter().map(|d| d.id.clone()).collect()
        };
        let mut handles = Vec::new();
        for (i, (id, tls)) in self.rogues.iter().enumerate() {
            let victim = victims[(i * 7919) % victims.len()].clone();
            handles.push(tokio::spawn(rogue::attack(
                self.shared.clone(),
                id.clone(),
                tls.clone(),
                home_node(i, self.shared.nodes.len()),
                victim,
            )));
        }
        let mut total = RogueStats::default();
        for h in handles {
            if let Ok(stats) = h.await {
                total.merge(&stats);
            }
        }
        self.shared
            .rogue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .merge(&total);
        total
    }

    /// Stops every device (connections are dropped without DISCONNECT, so
    /// the broker publishes each device's will: presence offline) and
    /// returns the final statistics.
    pub async fn shutdown(mut self) -> SimStats {
        let _ = self.shutdown.send(true);
        for task in self.tasks.iter_mut() {
            let _ = task.await;
        }
        self.stats()
    }
}

/// Does the broker accept a device's PUBLISH to its own presence topic?
/// Connects once as `id`, publishes `{"online": true}` (QoS 1, retained) and
/// waits for the PUBACK; a closed connection means no. Unclear outcomes
/// (connect failure, timeout) fall back to the contract: publish.
async fn probe_presence(
    addr: SocketAddr,
    server_name: &ServerName<'static>,
    tls: Arc<ClientConfig>,
    id: &str,
    config: &SimConfig,
) -> Option<bool> {
    let will = crate::mqtt::Will {
        topic: cityplane_proto::topics::presence(id),
        payload: br#"{"online":false}"#.to_vec(),
        qos: 1,
        retain: true,
    };
    let opts = ConnectOptions {
        client_id: id,
        keep_alive: config.keep_alive,
        clean_session: true,
        will: Some(&will),
    };
    let mut client = match Client::connect(
        addr,
        server_name.clone(),
        tls,
        &opts,
        // Short: an inconclusive probe only costs a few lost sessions (see
        // the fallback in the device task), a slow one delays every device.
        config.connect_timeout.min(Duration::from_secs(3)),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%id, error = %e, "presence probe could not connect");
            return None;
        }
    };
    let accepted = async {
        let pkid = client
            .publish(&will.topic, br#"{"online":true}"#, 1, true)
            .await?;
        client
            .recv_until(Duration::from_secs(5), |p| {
                matches!(p, Packet::PubAck(id) if *id == pkid).then_some(())
            })
            .await
    }
    .await;
    match accepted {
        Ok(()) => {
            client.disconnect().await;
            Some(true)
        }
        Err(ClientError::Closed | ClientError::Io(_)) => {
            tracing::warn!(
                %id,
                "the broker refuses a device's publish to its own presence topic (docs/PROTOCOL.md asks \
                 devices to publish it); devices will only set their will and leave presence to the broker"
            );
            Some(false)
        }
        Err(e) => {
            tracing::info!(%id, error = %e, "presence probe inconclusive");
            None
        }
    }
}

/// The node device number `i` tries first: consecutive devices on
/// consecutive nodes, so a fleet starts spread evenly over the cluster.
pub(crate) fn home_node(i: usize, nodes: usize) -> usize {
    i % nodes.max(1)
}

/// The node after `node`: where a device goes when `node` failed it, so
/// that a dead node costs each of its devices one attempt, not all of them.
pub(crate) fn next_node(node: usize, nodes: usize) -> usize {
    (node + 1) % nodes.max(1)
}

/// Every entry of `SimConfig::broker` (`HOST:PORT[,HOST:PORT…]`), resolved,
/// in order, each with the TLS name to verify it against
/// (`tls_server_name`, else its own host). One bad entry fails the whole
/// list: a fleet silently spread over fewer nodes than asked for would
/// load the others more than the test meant.
pub(crate) async fn resolve_brokers(config: &SimConfig) -> Result<Vec<Node>, SimError> {
    let entries: Vec<&str> = config.broker.split(',').map(str::trim).collect();
    let mut nodes = Vec::with_capacity(entries.len());
    for entry in entries {
        let bad = |reason: String| SimError::Broker {
            addr: entry.to_owned(),
            reason: if config.broker.contains(',') {
                format!("{reason} (in the list {:?})", config.broker)
            } else {
                reason
            },
        };
        if entry.is_empty() {
            return Err(bad("empty entry: expected HOST:PORT".into()));
        }
        let (host, _) = entry
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name =
            crate::mqtt::server_name(config.tls_server_name.as_deref().unwrap_or(host))
                .map_err(SimError::Config)?;
        let addr = tokio::net::lookup_host(entry)
            .await
            .map_err(|e| bad(e.to_string()))?
            .next()
            .ok_or_else(|| bad("does not resolve".into()))?;
        nodes.push(Node {
            entry: entry.to_owned(),
            addr,
            server_name,
            connected: AtomicI64::new(0),
            connects: AtomicU64::new(0),
        });
    }
    Ok(nodes)
}
