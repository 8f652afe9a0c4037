//! Counters shared by all devices, and the snapshot [`SimStats`] built from them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use crate::rogue::RogueStats;

/// Live counters (atomics; devices update them without locks).
#[derive(Default)]
pub(crate) struct Counters {
    pub connected: AtomicI64,
    pub online: AtomicI64,
    pub ever_online: AtomicU64,
    pub connect_attempts: AtomicU64,
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub sessions_lost: AtomicU64,
    pub publishes_offered: AtomicU64,
    pub publishes_received: AtomicU64,
    pub bytes_offered: AtomicU64,
    pub pubacks_received: AtomicU64,
    pub reports_offered: AtomicU64,
    pub telemetry_offered: AtomicU64,
    pub acks_offered: AtomicU64,
    pub commands_received: AtomicU64,
    pub commands_applied: AtomicU64,
    pub commands_rejected: AtomicU64,
    pub ignored_replays: AtomicU64,
    pub ignored_stale: AtomicU64,
    pub commands_malformed: AtomicU64,
    pub subscribe_refused: AtomicU64,
    pub reboots: AtomicU64,
    pub offline_episodes: AtomicU64,
    pub fw_started: AtomicU64,
    pub fw_succeeded: AtomicU64,
    pub fw_failed: AtomicU64,
    /// Images written to flash (the install step done).
    pub fw_installs: AtomicU64,
    /// Image bytes downloaded (each chunk counted once, when taken).
    pub fw_bytes: AtomicU64,
    /// Signed releases refused, by check.
    pub fw_refused: Mutex<BTreeMap<String, u64>>,
    pub failures: Mutex<BTreeMap<String, u64>>,
    pub fw_outcomes: Mutex<BTreeMap<String, u64>>,
    /// Durations of successful connects (TCP + TLS + CONNACK), in µs.
    pub connect_latency_us: Mutex<Vec<u32>>,
    pub csrs_offered: AtomicU64,
    pub rot_completed: AtomicU64,
    pub rot_rejected: AtomicU64,
    pub rot_fallbacks: AtomicU64,
    pub rot_keys_lost: AtomicU64,
}

/// Samples kept for latency percentiles (beyond this, new samples are dropped).
const MAX_SAMPLES: usize = 1_000_000;

impl Counters {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failure(&self, reason: impl Into<String>) {
        let mut m = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(reason.into()).or_insert(0) += 1;
    }

    pub fn fw_outcome(&self, outcome: impl Into<String>) {
        let mut m = self.fw_outcomes.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(outcome.into()).or_insert(0) += 1;
    }

    pub fn fw_refusal(&self, kind: &str) {
        let mut m = self.fw_refused.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(kind.to_owned()).or_insert(0) += 1;
    }

    pub fn connect_latency(&self, d: Duration) {
        let mut v = self
            .connect_latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if v.len() < MAX_SAMPLES {
            v.push(d.as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn from_durations(mut v: Vec<Duration>) -> Percentiles {
        v.sort_unstable();
        let ms = |d: &Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let at = |q: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            ms(&v[idx])
        };
        Percentiles {
            count: v.len(),
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            max_ms: v.last().map_or(0.0, ms),
        }
    }
}

/// Firmware updates by outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FirmwareStats {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Images written to flash: at most one per update, none for a command
    /// naming the version a device already runs or is installing.
    pub installs: u64,
    /// Image bytes downloaded: the size of each image once when downloads
    /// resume where they stopped.
    pub bytes_downloaded: u64,
    /// Releases refused before anything started, and downloads refused,
    /// by check: `signature`, `model`, `downgrade`, `version mismatch`,
    /// `manifest`, `unsigned` (no release), `size`, `hash`.
    pub refused: BTreeMap<String, u64>,
    /// `succeeded`, `failed: download`, `failed: verify`, `failed: install`,
    /// `failed: health-check`, `interrupted: reboot during …`.
    pub by_outcome: BTreeMap<String, u64>,
}

/// Certificate rotations (docs/PROTOCOL.md, "Certificate rotation").
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RotationStats {
    /// CSRs queued on `devices/D/csr` (offered; a repeat for the same
    /// pending key counts again).
    pub csrs_offered: u64,
    /// Devices that connected with a delivered certificate (one per
    /// rotation completed; per device: [`crate::DeviceSnapshot::rotations`]).
    pub completed: u64,
    /// Deliveries refused (`rejected` ack): wrong key, CA, identity, …
    pub rejected: u64,
    /// New certificates the broker refused, after which the device went
    /// back to its old one.
    pub fallbacks: u64,
    /// Deliveries whose key the device had lost (the `rotation_lost_key`
    /// fault).
    pub keys_lost: u64,
}

/// One broker node of the fleet's list (`SimConfig::broker`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NodeStats {
    /// The node's entry in the list, as given.
    pub addr: String,
    /// Devices with a live MQTT session on it now (after CONNACK).
    pub connected: usize,
    /// Successful connects to it so far, reconnects included.
    pub connects: u64,
}

/// A snapshot of the whole fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SimStats {
    pub devices: usize,
    /// Live MQTT sessions (after CONNACK).
    pub connected: usize,
    /// The same per broker node, in the order of `SimConfig::broker`
    /// (one entry for a single broker).
    pub per_node: Vec<NodeStats>,
    /// Sessions that finished the on-connect sequence (presence, SUBACK of
    /// the commands subscription, first report).
    pub online: usize,
    /// Devices that were online at least once.
    pub ever_online: usize,
    pub connect_attempts: u64,
    pub connects: u64,
    /// Connects after a device's first.
    pub reconnects: u64,
    pub connect_failures: u64,
    /// Sessions that ended other than by shutdown.
    pub sessions_lost: u64,
    /// PUBLISH packets devices queued (reports, acks, telemetry, presence).
    /// Offered load: counted when queued, not when written to the socket nor
    /// when the broker acknowledged it (a session lost in between loses them).
    pub publishes_offered: u64,
    /// PUBLISH packets devices received (commands): received.
    pub publishes_received: u64,
    /// Payload bytes of `publishes_offered` (offered, counted when queued).
    pub bytes_offered: u64,
    /// PUBACKs devices received from the broker: QoS 1 publishes the broker
    /// acknowledged (received; telemetry is QoS 0 and never acknowledged).
    pub pubacks_received: u64,
    /// Reports queued (offered).
    pub reports_offered: u64,
    /// Telemetry samples queued (offered, QoS 0).
    pub telemetry_offered: u64,
    /// Command acks queued (offered).
    pub acks_offered: u64,
    pub commands_received: u64,
    pub commands_applied: u64,
    pub commands_rejected: u64,
    pub ignored_replays: u64,
    pub ignored_stale: u64,
    pub commands_malformed: u64,
    /// SUBACK 0x80 for a device's own commands topic (should stay 0).
    pub subscribe_refused: u64,
    pub reboots: u64,
    pub offline_episodes: u64,
    pub firmware: FirmwareStats,
    pub rotations: RotationStats,
    /// Failures by reason: connect errors, lost sessions, rejected commands.
    pub failures: BTreeMap<String, u64>,
    /// TCP + TLS + CONNECT/CONNACK of successful connects.
    pub connect_latency: Percentiles,
    /// What rogue devices tried and how much the broker refused.
    pub rogue: RogueStats,
    /// Who announces devices online: `devices` (they publish presence) or
    /// `broker` (devices only set their will).
    pub presence: String,
}

impl Counters {
    pub fn snapshot(&self, devices: usize) -> SimStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let gauge = |c: &AtomicI64| c.load(Ordering::Relaxed).max(0) as usize;
        let latencies: Vec<Duration> = self
            .connect_latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|us| Duration::from_micros(u64::from(*us)))
            .collect();
        SimStats {
            devices,
            connected: gauge(&self.connected),
            // Filled by the fleet, which owns the nodes.
            per_node: Vec::new(),
            online: gauge(&self.online),
            ever_online: g(&self.ever_online) as usize,
            connect_attempts: g(&self.connect_attempts),
            connects: g(&self.connects),
            reconnects: g(&self.reconnects),
            connect_failures: g(&self.connect_failures),
            sessions_lost: g(&self.sessions_lost),
            publishes_offered: g(&self.publishes_offered),
            publishes_received: g(&self.publishes_received),
            bytes_offered: g(&self.bytes_offered),
            pubacks_received: g(&self.pubacks_received),
            reports_offered: g(&self.reports_offered),
            telemetry_offered: g(&self.telemetry_offered),
            acks_offered: g(&self.acks_offered),
            commands_received: g(&self.commands_received),
            commands_applied: g(&self.commands_applied),
            commands_rejected: g(&self.commands_rejected),
            ignored_replays: g(&self.ignored_replays),
            ignored_stale: g(&self.ignored_stale),
            commands_malformed: g(&self.commands_malformed),
            subscribe_refused: g(&self.subscribe_refused),
            reboots: g(&self.reboots),
            offline_episodes: g(&self.offline_episodes),
            firmware: FirmwareStats {
                started: g(&self.fw_started),
                succeeded: g(&self.fw_succeeded),
                failed: g(&self.fw_failed),
                installs: g(&self.fw_installs),
                bytes_downloaded: g(&self.fw_bytes),
                refused: self
                    .fw_refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
                by_outcome: self
                    .fw_outcomes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            },
            rotations: RotationStats {
                csrs_offered: g(&self.csrs_offered),
                completed: g(&self.rot_completed),
                rejected: g(&self.rot_rejected),
                fallbacks: g(&self.rot_fallbacks),
                keys_lost: g(&self.rot_keys_lost),
            },
            failures: self
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            connect_latency: Percentiles::from_durations(latencies),
            rogue: RogueStats::default(),
            presence: String::new(),
        }
    }
}

/// Resident set size of this process in KiB (`VmRSS` in /proc/self/status).
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_1_to_100_ms() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let p = Percentiles::from_durations(v);
        assert_eq!(
            (p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms),
            (100, 50.0, 90.0, 99.0, 100.0)
        );
        assert_eq!(Percentiles::from_durations(vec![]).count, 0);
    }

    #[test]
    fn rss_is_readable_on_linux() {
        assert!(rss_kib().is_some_and(|k| k > 0));
    }
}
