//! Simulated cityplane devices: each with its own certificate, its own MQTT
//! connection and the device side of the contract in `docs/PROTOCOL.md`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cityplane_agent_sim::SimError> {
//! use cityplane_agent_sim::{Fleet, SimConfig};
//! let config = SimConfig::new("pki", "127.0.0.1:8883", "lamp", 100);
//! let fleet = Fleet::start(config).await?;
//! fleet.wait_online(100, std::time::Duration::from_secs(60)).await;
//! println!("{:?}", fleet.stats());
//! let (have, of) = fleet.count_with("dimming", &serde_json::json!(40), Some(cityplane_agent_sim::Class::Streetlight));
//! println!("{have}/{of} streetlights at 40 %");
//! fleet.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Nothing here is specific to the cityplane broker: devices speak plain MQTT
//! 3.1.1 over mutual TLS, so any broker trusting the same CA works
//! (mosquitto with `require_certificate true` and
//! `use_identity_as_username true`, for instance).

mod behaviour;
pub mod classes;
mod device;
mod fleet;
pub mod mqtt;
pub mod rng;
mod rogue;
pub mod scenario;
pub mod stats;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

pub use classes::{Class, ClassMix};
pub use fleet::{Attempt, DeviceSnapshot, Fleet, ATTEMPTS_KEPT};
pub use rogue::{RogueActionStats, RogueStats};
pub use stats::{rss_kib, FirmwareStats, NodeStats, Percentiles, RotationStats, SimStats};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("PKI: {0}")]
    Pki(String),
    #[error("broker address {addr:?}: {reason}")]
    Broker { addr: String, reason: String },
    #[error("configuration: {0}")]
    Config(String),
    #[error("MQTT: {0}")]
    Mqtt(#[from] mqtt::ClientError),
    #[error("{0}")]
    Other(String),
}

/// Reconnect delays: `initial × multiplier^n`, capped at `max`, each drawn
/// uniformly from its upper half (jitter spreads a reconnect storm).
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

impl Backoff {
    /// Delay before reconnect attempt `n` (0 = the first after a loss).
    pub fn delay(&self, n: u32, rng: &mut rng::Rng) -> Duration {
        let factor = self.multiplier.max(1.0).powi(n.min(30) as i32);
        let base = self.initial.mul_f64(factor).min(self.max);
        rng.duration_between(base / 2, base)
    }
}

/// Things that go wrong in the field. Rates are per device.
#[derive(Debug, Clone, PartialEq)]
pub struct Faults {
    /// Flaky links: connections dropped at random, followed by a reconnect
    /// with [`Backoff`].
    pub link_drops_per_hour: f64,
    /// Devices going dark (no connection at all) for `offline_for`.
    pub offline_per_hour: f64,
    pub offline_for: (Duration, Duration),
    /// Probability that a firmware update is interrupted by a power loss
    /// (during download, verification or installation).
    pub reboot_during_update: f64,
    /// How long a reboot keeps a device away (also used for the planned
    /// reboot of a firmware update).
    pub reboot_time: (Duration, Duration),
    /// `rotation_lost_key`: these devices send their CSR and acknowledge a
    /// rotation as usual, but lose the new private key before the
    /// certificate arrives, so they acknowledge the delivery and keep
    /// using (and reporting) their old certificate: the rotation can never
    /// complete, and only the reported `certificate` shows it.
    pub rotation_lost_key: std::collections::BTreeSet<String>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            link_drops_per_hour: 0.0,
            offline_per_hour: 0.0,
            offline_for: (Duration::from_secs(5), Duration::from_secs(60)),
            reboot_during_update: 0.0,
            reboot_time: (Duration::from_secs(2), Duration::from_secs(5)),
            rotation_lost_key: std::collections::BTreeSet::new(),
        }
    }
}

/// Failure probabilities of each firmware update step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepFailures {
    pub download: f64,
    pub verify: f64,
    pub install: f64,
    pub health_check: f64,
}

impl StepFailures {
    /// The same probability for every step.
    pub fn all(p: f64) -> StepFailures {
        StepFailures {
            download: p,
            verify: p,
            install: p,
            health_check: p,
        }
    }
}

/// How firmware updates behave: downloading → verifying → installing →
/// rebooting → health-check → done.
#[derive(Debug, Clone, PartialEq)]
pub struct FirmwareSim {
    /// Image size; download time is `size_kib / download_kib_per_s`.
    pub size_kib: u64,
    pub download_kib_per_s: f64,
    pub verify_time: Duration,
    pub install_time: Duration,
    pub health_check_time: Duration,
    pub failure: StepFailures,
}

impl Default for FirmwareSim {
    fn default() -> Self {
        FirmwareSim {
            size_kib: 8 * 1024,
            download_kib_per_s: 2048.0,
            verify_time: Duration::from_millis(500),
            install_time: Duration::from_secs(2),
            health_check_time: Duration::from_secs(1),
            failure: StepFailures::default(),
        }
    }
}

impl FirmwareSim {
    pub fn download_time(&self) -> Duration {
        if self.download_kib_per_s <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.size_kib as f64 / self.download_kib_per_s)
    }

    /// Every step a few milliseconds: for tests.
    pub fn fast() -> FirmwareSim {
        FirmwareSim {
            size_kib: 64,
            download_kib_per_s: 6400.0,
            verify_time: Duration::from_millis(5),
            install_time: Duration::from_millis(5),
            health_check_time: Duration::from_millis(5),
            failure: StepFailures::default(),
        }
    }
}

/// Who announces a device online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceMode {
    /// Devices publish `{"online": true}` (retained, QoS 1) on
    /// `devices/D/presence` after CONNECT, as docs/PROTOCOL.md says.
    Publish,
    /// Devices only set their will; the broker announces them online (the
    /// cityplane broker does, and refuses a device's own presence publish).
    Skip,
    /// [`Fleet::start`] probes once with the first device: publish if the
    /// broker accepts a device's presence publish, else skip. If the probe is
    /// inconclusive (publish) and the broker then closes a session right
    /// after a device's presence publish, the fleet switches to skip. The
    /// choice is in [`SimStats::presence`].
    Auto,
}

/// Everything [`Fleet::start`] needs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// PKI directory: `ca.crt` and `<id>.crt`/`<id>.key` for every device.
    pub pki: PathBuf,
    /// `host:port` of the MQTT broker (mutual TLS), or of several nodes of
    /// one cluster: `host:port,host:port,…`. Device number `i` (in `ids`,
    /// from 0) connects to node `i % n` first; a failed connect or a lost
    /// session sends its next attempt to the next node in the list
    /// (round-robin, with the usual backoff), while a device back from a
    /// reboot or an offline episode tries its first node again. Every
    /// entry must resolve.
    pub broker: String,
    /// Name to verify every node's certificate against (default: the host
    /// part of each entry of `broker`).
    pub tls_server_name: Option<String>,
    /// Honest devices (certificate CN = client id = device id).
    pub ids: Vec<String>,
    /// Devices that only misbehave, on [`Fleet::run_rogues`]. They need
    /// device certificates of their own.
    pub rogue_ids: Vec<String>,
    pub mix: ClassMix,
    /// Seeds every random choice (classes, initial state, jitter, faults).
    pub seed: u64,
    /// New connections per second across the fleet (reconnects included);
    /// 0 disables pacing.
    pub connect_rate: f64,
    /// Connections in the TCP/TLS/CONNECT phase at once.
    pub max_connecting: usize,
    pub connect_timeout: Duration,
    /// MQTT keep-alive in seconds (0 disables it).
    pub keep_alive: u16,
    /// Whether devices publish `{"online": true}` on their presence topic
    /// after connecting (docs/PROTOCOL.md, device side, step 2).
    pub presence: PresenceMode,
    /// Publish reports with the retain flag (the contract makes it optional).
    pub retain_reported: bool,
    /// The QoS of the commands subscription: 1 (default), or 0 on RabbitMQ
    /// 3.10, where a QoS 1 subscription is a durable queue homed on one
    /// node, and a device whose node died cannot subscribe anywhere until
    /// that node is back (docs/DEPLOYMENT.md). Commands are re-sent by the
    /// controller until reported, so QoS 0 loses nothing.
    pub commands_qos: u8,
    /// Telemetry interval per device; `None` = no telemetry.
    pub telemetry_interval: Option<Duration>,
    pub backoff: Backoff,
    pub faults: Faults,
    pub firmware: FirmwareSim,
    /// The release public key devices are provisioned with
    /// (`release.pub`, see `cityplane_certs::firmware::read_public_key`).
    /// With one, a command that changes `firmware` must carry a signed
    /// release for the device's model, not below its `firmware_floor`, and
    /// the image is downloaded from the broker (`devices/D/fetch` →
    /// `devices/D/blob`) and its size and SHA-256 checked before it is
    /// installed. Without one, updates are simulated ([`FirmwareSim`]).
    pub release_key: Option<[u8; 32]>,
}

impl SimConfig {
    /// `count` devices `{prefix}0001…` with the default mix and settings.
    pub fn new(
        pki: impl Into<PathBuf>,
        broker: impl Into<String>,
        prefix: &str,
        count: usize,
    ) -> SimConfig {
        SimConfig {
            pki: pki.into(),
            broker: broker.into(),
            tls_server_name: None,
            ids: device_ids(prefix, count),
            rogue_ids: Vec::new(),
            mix: ClassMix::default(),
            seed: 1,
            connect_rate: 500.0,
            max_connecting: 100,
            connect_timeout: Duration::from_secs(10),
            keep_alive: 30,
            presence: PresenceMode::Skip,
            retain_reported: false,
            commands_qos: 1,
            telemetry_interval: None,
            backoff: Backoff::default(),
            faults: Faults::default(),
            firmware: FirmwareSim::default(),
            release_key: None,
        }
    }
}

/// `{prefix}0001` … `{prefix}{count:04}`: the ids `cityplane certs issue
/// --prefix P --count N` creates.
pub fn device_ids(prefix: &str, count: usize) -> Vec<String> {
    (1..=count).map(|n| format!("{prefix}{n:04}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            multiplier: 2.0,
        };
        let mut rng = rng::Rng::new(3);
        for n in 0..40 {
            let d = b.delay(n, &mut rng);
            let base = (Duration::from_millis(100) * 2u32.pow(n.min(10))).min(b.max);
            assert!(d >= base / 2 && d <= base, "attempt {n}: {d:?} vs {base:?}");
        }
    }

    #[test]
    fn ids_match_certs_issue_bulk() {
        assert_eq!(device_ids("lamp", 2), ["lamp0001", "lamp0002"]);
        assert_eq!(
            device_ids("x", 10_000).last().map(String::as_str),
            Some("x10000")
        );
    }
}
