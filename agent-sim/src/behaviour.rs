//! What a device decides, apart from the socket that feeds it: the command
//! rules of docs/PROTOCOL.md (replays and stale generations ignored,
//! invalid values rejected, desired keys applied, reported, then
//! acknowledged) and the firmware update state machine (downloading →
//! verifying → installing → rebooting → health-check → done, or failed).
//!
//! A device provisioned with a release key ([`Env::release_key`]) installs
//! only signed releases (docs/PROTOCOL.md, "Firmware"): the command's
//! `release` is checked (signature, version, model, floor) before anything
//! starts, the image is downloaded for real in chunks (`fetch` out, blobs
//! in, resumed from the bytes it has after a dropped connection), its size
//! and SHA-256 checked, and the floor raised once the new image runs.
//! Without a key the download is a timer, as it always was.
//!
//! Certificate rotation (docs/PROTOCOL.md): a command setting
//! `certificate` to `{"rotation": R}` for another R than the certificate
//! in use asks the session loop for a CSR ([`Actions::csr`]) and is
//! acknowledged (the reported `certificate` changes only once the device
//! has connected with the new certificate); a command carrying a
//! certificate ([`Command::certificate`]) is handed to the session loop
//! ([`Actions::install`]), which holds the keys and acknowledges it.
//!
//! No clock and no I/O: time comes in as an argument and what the device
//! must send comes out as [`Actions`], which the session loop in
//! `device.rs` carries out. Randomness (failure injection, power loss during
//! an update) is the device's seeded [`Rng`], passed in.

use std::time::Duration;

use cityplane_certs::firmware::{check_release, floor_after, hex, ReleaseError};
use cityplane_proto::firmware::{BlobHeader, FetchRequest, ReleaseManifest, MAX_CHUNK};
use cityplane_proto::messages::{AckStatus, CertificateDelivery, CertificateState, Command, State};
use cityplane_proto::secrets::{fingerprint, SecretRef};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::classes::{self, Class};
use crate::fleet::DeviceView;
use crate::rng::{fnv1a, Rng};
use crate::stats::Counters;
use crate::FirmwareSim;

/// Command ids remembered to recognise replays.
pub(crate) const REPLAY_WINDOW: usize = 64;

/// Commands acknowledged together when one update ends (the first and the
/// retries of the same change that arrived meanwhile), at most.
const UPDATE_ACKS_KEPT: usize = 16;

/// Shortest time between two fetches: 40 a second, well under the broker's
/// default budget of 100 publishes a second per identity (which fetches
/// spend too), so reports and acks always have room.
const MIN_FETCH_INTERVAL: Duration = Duration::from_millis(25);

/// A fetch without an answer is sent again after this long (a blob is QoS
/// 0), at most [`FETCH_RETRIES`] times in a row.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const FETCH_RETRIES: u32 = 5;

/// The state key holding the oldest version the device still accepts.
pub(crate) const FLOOR_KEY: &str = "firmware_floor";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
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

/// A signed release being downloaded: what it declares and what came in.
struct Download {
    manifest: ReleaseManifest,
    received: u64,
    hash: ring::digest::Context,
    /// When the transfer started: fetches are paced at the simulated link
    /// speed ([`FirmwareSim::download_kib_per_s`]).
    started: Instant,
    last_fetch: Instant,
    /// A fetch is out and its blob has not come.
    awaiting: bool,
    /// Fetches sent again without an answer, in a row.
    retries: u32,
    /// Every byte is in and the hash matched: the step ends at the deadline.
    complete: bool,
}

impl Download {
    fn request(&self) -> FetchRequest {
        FetchRequest {
            sha256: self.manifest.sha256.clone(),
            offset: self.received,
            length: MAX_CHUNK,
        }
    }
}

struct UpdateJob {
    target: String,
    from: String,
    /// A signed release (the device has a release key): downloaded for real.
    download: Option<Box<Download>>,
    /// The floor once this release runs.
    floor_after: Option<String>,
    generation: u64,
    /// Commands to acknowledge when the update ends.
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

/// One acknowledgement to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AckOut {
    pub id: String,
    pub status: AckStatus,
    pub reason: Option<String>,
}

impl UpdateJob {
    /// A fetch for the bytes still missing; its answer is awaited until
    /// [`FETCH_TIMEOUT`] (then asked for again).
    fn fetch(&mut self, now: Instant) -> Option<FetchRequest> {
        let dl = self.download.as_mut()?;
        dl.awaiting = true;
        dl.last_fetch = now;
        self.deadline = now + FETCH_TIMEOUT;
        Some(dl.request())
    }
}

/// A delivered certificate for the session loop to check and install.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Install {
    /// The command's id: the ack names it.
    pub id: String,
    pub delivery: CertificateDelivery,
}

/// Longest rotation name a device takes (rollout names are shorter).
const MAX_ROTATION_LEN: usize = 128;

/// The rotation a `certificate` value names: `{"rotation": R}`, R a
/// non-empty printable string.
fn rotation_of(value: &Value) -> Result<String, String> {
    serde_json::from_value::<CertificateState>(value.clone())
        .ok()
        .map(|c| c.rotation)
        .filter(|r| {
            !r.is_empty() && r.len() <= MAX_ROTATION_LEN && !r.chars().any(char::is_control)
        })
        .ok_or_else(|| {
            format!("certificate must be {{\"rotation\": name}} (1..{MAX_ROTATION_LEN} characters)")
        })
}

/// The rotation of the certificate the device uses (its reported
/// `certificate`).
pub(crate) fn current_rotation(v: &DeviceView) -> Option<String> {
    v.state
        .get(CertificateState::KEY)
        .and_then(|c| rotation_of(c).ok())
}

/// What the device sends after an event, in this order: the full state
/// ([`report`]), a CSR, the acks, a fetch, then it reboots (the session
/// ends). An install is carried out (and acknowledged) by the session loop.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Actions {
    pub report: bool,
    /// Send a CSR for this rotation (before the acks: the ack of the
    /// command that asked for it means "CSR sent").
    pub csr: Option<String>,
    pub install: Option<Install>,
    pub acks: Vec<AckOut>,
    /// Image bytes to ask for on `devices/D/fetch`.
    pub fetch: Option<FetchRequest>,
    pub reboot: bool,
}

impl Actions {
    fn report() -> Actions {
        Actions {
            report: true,
            ..Actions::default()
        }
    }

    fn ack(ack: AckOut) -> Actions {
        Actions {
            acks: vec![ack],
            ..Actions::default()
        }
    }
}

/// The fleet's settings and counters the rules read and count into.
pub(crate) struct Env<'a> {
    pub class: Class,
    pub firmware: &'a FirmwareSim,
    /// Probability that an update is cut by a power loss.
    pub reboot_during_update: f64,
    pub counters: &'a Counters,
    /// The release public key the device is provisioned with: with one it
    /// installs only signed releases, downloaded from the broker.
    pub release_key: Option<&'a [u8; 32]>,
}

/// The refusal kinds counted in the statistics, by check.
fn refusal_kind(e: &ReleaseError) -> &'static str {
    match e {
        ReleaseError::BadSignature => "signature",
        ReleaseError::WrongModel { .. } => "model",
        ReleaseError::Downgrade { .. } => "downgrade",
        ReleaseError::VersionMismatch { .. } => "version mismatch",
        ReleaseError::BadManifest(_) => "manifest",
        _ => "other",
    }
}

/// The version below which the device refuses releases: its `firmware_floor`,
/// else (never updated through a release) the firmware it runs.
fn floor_of(v: &DeviceView) -> String {
    v.state
        .get(FLOOR_KEY)
        .or_else(|| v.state.get("firmware"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

#[derive(Serialize)]
struct ReportedRef<'a> {
    version: u64,
    state: &'a State,
}

/// Bumps the version and encodes the full state for `reported`.
pub(crate) fn report(v: &mut DeviceView) -> serde_json::Result<Vec<u8>> {
    v.version += 1;
    serde_json::to_vec(&ReportedRef {
        version: v.version,
        state: &v.state,
    })
}

/// A command's secrets against the references its state sets: each
/// reference needs its plaintext, whose fingerprint must be the
/// reference's, and no plaintext may come without a reference. The reason
/// names keys and fingerprints, never a plaintext.
fn check_secrets(cmd: &Command) -> Option<String> {
    for (k, val) in &cmd.state {
        let Some(r) = SecretRef::of(val) else {
            continue;
        };
        match cmd.secrets.get(k) {
            None => {
                return Some(format!(
                    "secret missing: {k} refers to a secret the command does not carry"
                ))
            }
            Some(plain) if fingerprint(plain) != r.fingerprint => {
                return Some(format!(
                    "secret mismatch: {k}'s secret does not have fingerprint {}",
                    r.fingerprint
                ))
            }
            Some(_) => {}
        }
    }
    cmd.secrets
        .keys()
        .find(|k| cmd.state.get(*k).and_then(SecretRef::of).is_none())
        .map(|k| format!("secret unexpected: {k} is not a secret reference in the command's state"))
}

/// What only the device task remembers between events.
pub(crate) struct Behaviour {
    replay: ReplayWindow,
    update: Option<Box<UpdateJob>>,
    /// A command for another firmware that came while the new image was
    /// being checked after its reboot: taken once that check ends (a
    /// rollback, say, must not be refused for arriving a moment early).
    pending: Option<Box<Command>>,
}

impl Behaviour {
    pub(crate) fn new() -> Behaviour {
        Behaviour {
            replay: ReplayWindow::new(),
            update: None,
            pending: None,
        }
    }

    /// When the update in progress moves on ([`Behaviour::advance_update`]).
    pub(crate) fn update_due(&self) -> Option<Instant> {
        self.update.as_ref().map(|j| j.deadline)
    }

    /// The contract's command rules: replays and stale generations are
    /// ignored; invalid values reject the whole command; otherwise keys are
    /// set (null deletes), the new state reported, then the ack sent. A new
    /// `firmware` starts an update, acknowledged when it ends.
    pub(crate) fn on_command(
        &mut self,
        env: &Env,
        rng: &mut Rng,
        v: &mut DeviceView,
        cmd: Command,
        now: Instant,
    ) -> Actions {
        let counters = env.counters;
        Counters::inc(&counters.commands_received);
        v.commands_received += 1;
        if self.replay.contains(&cmd.id) {
            Counters::inc(&counters.ignored_replays);
            return Actions::default();
        }
        self.replay.insert(&cmd.id);
        if cmd.generation < v.last_generation {
            Counters::inc(&counters.ignored_stale);
            return Actions::default();
        }
        self.apply_command(env, rng, v, cmd, now)
    }

    /// A new command's effect (replays and stale generations are already
    /// out).
    fn apply_command(
        &mut self,
        env: &Env,
        rng: &mut Rng,
        v: &mut DeviceView,
        cmd: Command,
        now: Instant,
    ) -> Actions {
        let counters = env.counters;
        if let Some(delivery) = cmd.certificate {
            v.last_generation = v.last_generation.max(cmd.generation);
            if !cmd.state.is_empty() {
                let reason = "a certificate delivery sets no state".to_owned();
                Counters::inc(&counters.commands_rejected);
                counters.failure(format!("command rejected: {reason}"));
                return Actions::ack(AckOut {
                    id: cmd.id,
                    status: AckStatus::Rejected,
                    reason: Some(reason),
                });
            }
            return Actions {
                install: Some(Install {
                    id: cmd.id,
                    delivery,
                }),
                ..Actions::default()
            };
        }
        let mut reason = cmd
            .state
            .iter()
            .find_map(|(k, val)| {
                if k == CertificateState::KEY {
                    rotation_of(val).err()
                } else {
                    classes::validate(env.class, k, val, &v.state).err()
                }
            })
            .or_else(|| check_secrets(&cmd));
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
        let mut defer = false;
        if let (None, Some(fw), Some(job)) = (&reason, &new_fw, &self.update) {
            if *fw == job.target {
                // The release of the update in progress was checked when it
                // started: a retry (new id, same version) only joins it.
                joins_update = true;
            } else if job.step == Step::HealthCheck {
                defer = true;
            } else {
                reason = Some(format!(
                    "firmware update to {} in progress ({})",
                    job.target,
                    job.step.name()
                ));
            }
        }
        if defer {
            self.pending = Some(Box::new(cmd));
            return Actions::default();
        }
        let mut manifest = None;
        if let (None, Some(fw), false, Some(key)) =
            (&reason, &new_fw, joins_update, env.release_key)
        {
            let model = v
                .state
                .get("hardware_model")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let checked = match &cmd.release {
                None => Err((
                    "unsigned",
                    "unsigned: the command carries no signed release".to_owned(),
                )),
                Some(release) => check_release(key, release, fw, model, &floor_of(v))
                    .map_err(|e| (refusal_kind(&e), e.to_string())),
            };
            match checked {
                Ok(m) => manifest = Some(m),
                Err((kind, why)) => {
                    counters.fw_refusal(kind);
                    reason = Some(why);
                }
            }
        }
        if let Some(reason) = reason {
            Counters::inc(&counters.commands_rejected);
            counters.failure(format!("command rejected: {reason}"));
            return Actions::ack(AckOut {
                id: cmd.id,
                status: AckStatus::Rejected,
                reason: Some(reason),
            });
        }
        // A new rotation is only asked for here: `certificate` keeps naming
        // the certificate in use until the device connects with the new one.
        let csr = cmd
            .state
            .get(CertificateState::KEY)
            .and_then(|c| rotation_of(c).ok())
            .filter(|r| current_rotation(v).as_ref() != Some(r));
        for (k, val) in &cmd.state {
            if k != "firmware" && k != CertificateState::KEY {
                classes::apply(env.class, &mut v.state, k, val);
            }
            // Checked above: a reference comes with its plaintext.
            match cmd.secrets.get(k) {
                Some(plain) if SecretRef::of(val).is_some() => {
                    v.secrets.insert(k.clone(), plain.to_owned());
                }
                _ => {
                    v.secrets.remove(k);
                }
            }
        }
        v.last_change = Some(now);
        let mut actions = match new_fw {
            None => {
                v.last_generation = v.last_generation.max(cmd.generation);
                Counters::inc(&counters.commands_applied);
                Actions {
                    report: true,
                    acks: vec![AckOut {
                        id: cmd.id,
                        status: AckStatus::Applied,
                        reason: None,
                    }],
                    reboot: false,
                    fetch: None,
                    ..Actions::default()
                }
            }
            Some(_) if joins_update => {
                if let Some(job) = self.update.as_mut() {
                    if job.command_ids.len() < UPDATE_ACKS_KEPT {
                        job.command_ids.push(cmd.id);
                    }
                    job.generation = job.generation.max(cmd.generation);
                }
                Actions::report()
            }
            Some(target) => {
                let fw = env.firmware;
                let interrupt_at = rng
                    .chance(env.reboot_during_update)
                    .then(|| *rng.pick(&[Step::Downloading, Step::Verifying, Step::Installing]));
                let mut job = UpdateJob {
                    from: current_fw,
                    download: None,
                    floor_after: None,
                    generation: cmd.generation,
                    command_ids: vec![cmd.id],
                    step: Step::Downloading,
                    deadline: now + fw.download_time(),
                    interrupt_at,
                    interrupted: None,
                    target,
                };
                let mut actions = Actions::report();
                match manifest {
                    Some(m) => {
                        job.floor_after = Some(floor_after(&m, &floor_of(v)));
                        v.state.insert(
                            "update".into(),
                            json!({"state": "downloading", "target": job.target, "from": job.from, "received": 0, "size": m.size}),
                        );
                        job.download = Some(Box::new(Download {
                            hash: ring::digest::Context::new(&ring::digest::SHA256),
                            received: 0,
                            started: now,
                            last_fetch: now,
                            awaiting: false,
                            retries: 0,
                            complete: false,
                            manifest: m,
                        }));
                        actions.fetch = job.fetch(now);
                    }
                    None => {
                        v.state.insert(
                            "update".into(),
                            json!({"state": "downloading", "target": job.target, "from": job.from, "size_kib": fw.size_kib}),
                        );
                    }
                }
                self.update = Some(Box::new(job));
                Counters::inc(&counters.fw_started);
                actions
            }
        };
        actions.csr = csr;
        actions
    }

    /// Moves the update on when its step's time is up; a step may fail (at
    /// the firmware's failure rates) or the power may go (planned when the
    /// update started).
    pub(crate) fn advance_update(
        &mut self,
        env: &Env,
        rng: &mut Rng,
        v: &mut DeviceView,
        now: Instant,
    ) -> Actions {
        let Some(job) = self.update.as_mut() else {
            return Actions::default();
        };
        if now < job.deadline {
            return Actions::default();
        }
        if let Some(dl) = job.download.as_mut().filter(|d| !d.complete) {
            // The transfer is under way: the deadline is the next fetch's
            // (paced) or an unanswered one's timeout.
            if dl.awaiting {
                dl.retries += 1;
                if dl.retries > FETCH_RETRIES {
                    let reason = format!("download failed: no answer to {FETCH_RETRIES} fetches");
                    return self.fail_download(env, v, now, reason);
                }
            }
            return Actions {
                fetch: job.fetch(now),
                ..Actions::default()
            };
        }
        if job.interrupt_at == Some(job.step) {
            // Power loss: nothing more is sent; the will announces it.
            job.interrupted = Some(job.step);
            job.interrupt_at = None;
            return Actions {
                reboot: true,
                ..Actions::default()
            };
        }
        let fw = env.firmware;
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
                std::time::Duration::ZERO,
            ),
            Step::HealthCheck => (
                fw.failure.health_check,
                "health check failed after reboot; rolled back",
                Step::HealthCheck,
                std::time::Duration::ZERO,
            ),
            Step::Rebooting => return Actions::default(),
        };
        let step = job.step;
        if rng.chance(fail_p) {
            let acks = self.finish_update(
                env,
                v,
                now,
                Err(Failure {
                    step,
                    reason: failure.to_owned(),
                    interrupted: false,
                }),
            );
            return self.then_pending(env, rng, v, now, acks);
        }
        if step == Step::HealthCheck {
            let acks = self.finish_update(env, v, now, Ok(()));
            return self.then_pending(env, rng, v, now, acks);
        }
        if step == Step::Installing {
            // The image is written: one install, whatever happens next.
            v.firmware_installs += 1;
            Counters::inc(&env.counters.fw_installs);
        }
        job.step = next;
        job.deadline = now + next_time;
        set_update_state(v, job);
        Actions {
            report: true,
            // The planned reboot into the new image.
            reboot: next == Step::Rebooting,
            ..Actions::default()
        }
    }

    /// A blob on the device's blob topic: the next chunk of the download in
    /// progress, or nothing this device waits for (ignored).
    pub(crate) fn on_blob(
        &mut self,
        env: &Env,
        v: &mut DeviceView,
        header: BlobHeader,
        bytes: &[u8],
        now: Instant,
    ) -> Actions {
        let Some(job) = self.update.as_mut() else {
            return Actions::default();
        };
        let Some(dl) = job.download.as_mut() else {
            return Actions::default();
        };
        // Only the answer to the fetch that is out (a late copy of an
        // earlier one would be bytes at the wrong place).
        if dl.complete
            || !dl.awaiting
            || header.sha256 != dl.manifest.sha256
            || header.offset != dl.received
        {
            return Actions::default();
        }
        dl.awaiting = false;
        dl.retries = 0;
        let size = dl.manifest.size;
        if let Some(error) = header.error {
            return self.fail_download(env, v, now, format!("download failed: {error}"));
        }
        if header.total != size {
            env.counters.fw_refusal("size");
            let reason = format!(
                "size: the image is {} bytes, the release declares {size}",
                header.total
            );
            return self.fail_download(env, v, now, reason);
        }
        let received = dl.received + bytes.len() as u64;
        if received > size {
            env.counters.fw_refusal("size");
            let reason = format!("size: more than the {size} bytes the release declares came");
            return self.fail_download(env, v, now, reason);
        }
        if bytes.is_empty() && received < size {
            let reason = format!("download failed: the image ended at {received} of {size} bytes");
            return self.fail_download(env, v, now, reason);
        }
        dl.hash.update(bytes);
        dl.received = received;
        v.firmware_bytes += bytes.len() as u64;
        env.counters
            .fw_bytes
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(update) = v.state.get_mut("update").and_then(Value::as_object_mut) {
            update.insert("received".into(), json!(received));
        }
        if received < size {
            // The next chunk, no faster than the simulated link and the
            // broker's publish budget allow.
            let link = env.firmware.download_kib_per_s;
            let by_link = if link > 0.0 {
                dl.started + Duration::from_secs_f64(received as f64 / 1024.0 / link)
            } else {
                now
            };
            let next = by_link.max(dl.last_fetch + MIN_FETCH_INTERVAL);
            if next <= now {
                return Actions {
                    fetch: job.fetch(now),
                    ..Actions::default()
                };
            }
            job.deadline = next;
            return Actions::default();
        }
        let digest = hex(dl.hash.clone().finish().as_ref());
        if digest != dl.manifest.sha256 {
            env.counters.fw_refusal("hash");
            let reason = format!(
                "hash mismatch: the image's SHA-256 is {digest}, the release declares {}",
                dl.manifest.sha256
            );
            return self.fail_download(env, v, now, reason);
        }
        // All in and intact: the download step ends now (where a power
        // loss or an injected failure may still cut it).
        dl.complete = true;
        job.deadline = now;
        Actions::default()
    }

    fn fail_download(
        &mut self,
        env: &Env,
        v: &mut DeviceView,
        now: Instant,
        reason: String,
    ) -> Actions {
        let failure = Failure {
            step: Step::Downloading,
            reason,
            interrupted: false,
        };
        Actions {
            report: true,
            acks: self.finish_update(env, v, now, Err(failure)),
            ..Actions::default()
        }
    }

    /// The device loses power: an update in progress (other than its own
    /// planned reboot) failed, which the device reports once it is back.
    pub(crate) fn power_lost(&mut self) {
        if let Some(job) = self.update.as_mut() {
            if job.step != Step::Rebooting {
                job.interrupted = Some(job.step);
            }
        }
    }

    /// After (re)connecting, before the first report: a planned reboot of an
    /// update continues with the health check on the new image; an
    /// interrupted update failed.
    pub(crate) fn on_boot(&mut self, env: &Env, v: &mut DeviceView, now: Instant) -> Actions {
        let Some(job) = self.update.as_mut() else {
            return Actions::report();
        };
        if let Some(step) = job.interrupted.take() {
            let reason = format!("interrupted by a reboot during {}", step.name());
            let acks = self.finish_update(
                env,
                v,
                now,
                Err(Failure {
                    step,
                    reason,
                    interrupted: true,
                }),
            );
            return Actions {
                report: true,
                acks,
                reboot: false,
                fetch: None,
                ..Actions::default()
            };
        }
        if job.download.as_ref().is_some_and(|d| !d.complete) {
            // Back after a dropped connection: ask again from the bytes it
            // has (the fetch that was out died with the old connection).
            return Actions {
                report: true,
                fetch: job.fetch(now),
                ..Actions::default()
            };
        }
        if job.step == Step::Rebooting {
            job.step = Step::HealthCheck;
            job.deadline = now + env.firmware.health_check_time;
            v.state.insert("firmware".into(), json!(job.target));
            set_update_state(v, job);
        }
        Actions::report()
    }

    /// After an update ended (with these acks): the command that waited for
    /// it, if one did.
    fn then_pending(
        &mut self,
        env: &Env,
        rng: &mut Rng,
        v: &mut DeviceView,
        now: Instant,
        mut acks: Vec<AckOut>,
    ) -> Actions {
        let Some(cmd) = self.pending.take() else {
            return Actions {
                report: true,
                acks,
                reboot: false,
                fetch: None,
                ..Actions::default()
            };
        };
        let next = self.apply_command(env, rng, v, *cmd, now);
        acks.extend(next.acks);
        Actions {
            report: true,
            acks,
            reboot: next.reboot,
            fetch: next.fetch,
            csr: next.csr,
            install: next.install,
        }
    }

    /// Ends the update job: success switches nothing more (the new image
    /// already runs), failure keeps or restores the old firmware.
    fn finish_update(
        &mut self,
        env: &Env,
        v: &mut DeviceView,
        now: Instant,
        outcome: Result<(), Failure>,
    ) -> Vec<AckOut> {
        let Some(job) = self.update.take() else {
            return Vec::new();
        };
        let counters = env.counters;
        v.last_change = Some(now);
        match outcome {
            Ok(()) => {
                v.state.insert("firmware".into(), json!(job.target));
                if let Some(floor) = &job.floor_after {
                    v.state.insert(FLOOR_KEY.into(), json!(floor));
                }
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
}

fn set_update_state(v: &mut DeviceView, job: &UpdateJob) {
    v.state.insert(
        "update".into(),
        json!({"state": job.step.name(), "target": job.target, "from": job.from}),
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::StepFailures;
    use cityplane_proto::firmware::SignedRelease;

    const OLD_FW: &str = "1.3.9";

    /// A streetlight on the old firmware, dimmed to 30.
    fn streetlight() -> DeviceView {
        let mut state = classes::initial_state(Class::Streetlight, &mut Rng::new(1), "");
        state.insert("firmware".into(), json!(OLD_FW));
        state.insert("dimming".into(), json!(30));
        DeviceView {
            state,
            connected: true,
            online: true,
            connects: 1,
            ..DeviceView::default()
        }
    }

    fn command(id: &str, generation: u64, state: Value) -> Command {
        let Value::Object(state) = state else {
            panic!("a command's state is an object")
        };
        Command {
            id: id.into(),
            generation,
            state,
            release: None,
            certificate: None,
            secrets: Default::default(),
        }
    }

    #[test]
    fn a_new_rotation_asks_for_a_csr_and_keeps_reporting_the_certificate_in_use() {
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        let issued = json!({"rotation": "issued"});
        sim.view.state.insert("certificate".into(), issued.clone());
        // The rotation in use: nothing to do.
        assert_eq!(
            sim.command("c1", 1, json!({"certificate": issued})),
            report_and(vec![applied("c1")])
        );
        // Another one: a CSR, then the ack; the state still names the old.
        let got = sim.command(
            "c2",
            2,
            json!({"certificate": {"rotation": "r1"}, "dimming": 50}),
        );
        assert_eq!(
            got,
            Actions {
                csr: Some("r1".into()),
                ..report_and(vec![applied("c2")])
            }
        );
        assert_eq!(sim.view.state["certificate"], issued);
        assert_eq!(sim.view.state["dimming"], json!(50));
        for (i, bad) in [
            json!(null),
            json!("r1"),
            json!({"rotation": ""}),
            json!({"rotation": "r1", "key": "k"}),
            json!({"rotation": "a\nb"}),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("bad{i}");
            let got = sim.command(&id, 3, json!({"certificate": bad, "dimming": 60}));
            assert_eq!(got.acks.len(), 1, "{bad}");
            assert_eq!(got.acks[0].status, AckStatus::Rejected, "{bad}");
            assert!(got.csr.is_none(), "{bad}");
            assert_eq!(
                sim.view.state["dimming"],
                json!(50),
                "{bad}: nothing applied"
            );
        }
        assert_eq!(sim.view.state["certificate"], issued);
    }

    #[test]
    fn a_certificate_delivery_goes_to_the_session_loop_and_sets_no_state() {
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        let delivery = CertificateDelivery {
            rotation: "r1".into(),
            pem: "PEM".into(),
        };
        let mut cmd = command("c1", 1, json!({}));
        cmd.certificate = Some(delivery.clone());
        let env = sim.settings.env();
        let got = sim
            .core
            .on_command(&env, &mut sim.rng, &mut sim.view, cmd.clone(), sim.now);
        assert_eq!(
            got,
            Actions {
                install: Some(Install {
                    id: "c1".into(),
                    delivery: delivery.clone(),
                }),
                ..Actions::default()
            }
        );
        // A replay is ignored like any other.
        let got = sim
            .core
            .on_command(&env, &mut sim.rng, &mut sim.view, cmd, sim.now);
        assert_eq!(got, Actions::default());
        let mut with_state = command("c2", 2, json!({"dimming": 10}));
        with_state.certificate = Some(delivery);
        let got = sim
            .core
            .on_command(&env, &mut sim.rng, &mut sim.view, with_state, sim.now);
        assert_eq!(
            got,
            acks(vec![rejected("c2", "a certificate delivery sets no state")])
        );
        assert_eq!(sim.view.state["dimming"], json!(30));
    }

    fn applied(id: &str) -> AckOut {
        AckOut {
            id: id.into(),
            status: AckStatus::Applied,
            reason: None,
        }
    }

    fn rejected(id: &str, reason: &str) -> AckOut {
        AckOut {
            id: id.into(),
            status: AckStatus::Rejected,
            reason: Some(reason.into()),
        }
    }

    fn acks(acks: Vec<AckOut>) -> Actions {
        Actions {
            acks,
            ..Actions::default()
        }
    }

    fn report_and(acks: Vec<AckOut>) -> Actions {
        Actions {
            report: true,
            acks,
            reboot: false,
            fetch: None,
            ..Actions::default()
        }
    }

    fn reboot(report: bool) -> Actions {
        Actions {
            report,
            acks: Vec::new(),
            reboot: true,
            fetch: None,
            ..Actions::default()
        }
    }

    /// The fleet settings and counters the rules read.
    struct Settings {
        firmware: FirmwareSim,
        reboot_during_update: f64,
        counters: Counters,
        release_key: Option<[u8; 32]>,
    }

    impl Settings {
        fn env(&self) -> Env<'_> {
            Env {
                class: Class::Streetlight,
                firmware: &self.firmware,
                reboot_during_update: self.reboot_during_update,
                counters: &self.counters,
                release_key: self.release_key.as_ref(),
            }
        }
    }

    /// One device and its rules, driven by hand.
    struct Sim {
        core: Behaviour,
        view: DeviceView,
        rng: Rng,
        settings: Settings,
        now: Instant,
    }

    impl Sim {
        fn new(firmware: FirmwareSim, reboot_during_update: f64) -> Sim {
            Sim {
                core: Behaviour::new(),
                view: streetlight(),
                rng: Rng::new(7),
                settings: Settings {
                    firmware,
                    reboot_during_update,
                    counters: Counters::default(),
                    release_key: None,
                },
                now: Instant::now(),
            }
        }

        fn command(&mut self, id: &str, generation: u64, state: Value) -> Actions {
            self.release(id, generation, state, None)
        }

        fn release(
            &mut self,
            id: &str,
            generation: u64,
            state: Value,
            release: Option<SignedRelease>,
        ) -> Actions {
            let mut cmd = command(id, generation, state);
            cmd.release = release;
            let env = self.settings.env();
            self.core
                .on_command(&env, &mut self.rng, &mut self.view, cmd, self.now)
        }

        fn blob(&mut self, header: BlobHeader, bytes: &[u8]) -> Actions {
            let env = self.settings.env();
            self.core
                .on_blob(&env, &mut self.view, header, bytes, self.now)
        }

        /// Waits for the update's next step and takes it.
        fn next_step(&mut self) -> Actions {
            let due = self.core.update_due().expect("an update in progress");
            let early = self.advance_at(due - Duration::from_millis(1));
            assert_eq!(early, Actions::default(), "a step ended before its time");
            self.advance_at(due)
        }

        fn advance_at(&mut self, now: Instant) -> Actions {
            self.now = now;
            let env = self.settings.env();
            self.core
                .advance_update(&env, &mut self.rng, &mut self.view, now)
        }

        fn boot(&mut self) -> Actions {
            self.now += Duration::from_secs(3);
            let env = self.settings.env();
            self.core.on_boot(&env, &mut self.view, self.now)
        }

        fn update_state(&self) -> Value {
            self.view.state["update"]["state"].clone()
        }

        fn firmware(&self) -> Value {
            self.view.state["firmware"].clone()
        }
    }

    /// A secret command: `state` sets `key` to the reference of `refers`,
    /// `secrets` carries `carries`.
    fn secret_cmd(id: &str, gen: u64, refers: &str, carries: &[(&str, &str)]) -> Command {
        let reference = SecretRef {
            fingerprint: fingerprint(refers),
            rotated_at: "2026-11-30T19:00:00Z".into(),
        };
        let mut cmd = command(id, gen, json!({"admin_password": reference.to_value()}));
        for (k, p) in carries {
            cmd.secrets.insert((*k).into(), (*p).into());
        }
        cmd
    }

    #[test]
    fn a_secret_is_taken_only_with_its_plaintext_matching_the_fingerprint() {
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        let cases = [
            // (what, command, the ack, the secret held after)
            (
                "missing",
                secret_cmd("c1", 1, "pw-a", &[]),
                rejected(
                    "c1",
                    "secret missing: admin_password refers to a secret the command does not carry",
                ),
                None,
            ),
            (
                "mismatch",
                secret_cmd("c2", 2, "pw-a", &[("admin_password", "pw-b")]),
                rejected(
                    "c2",
                    &format!(
                        "secret mismatch: admin_password's secret does not have fingerprint {}",
                        fingerprint("pw-a")
                    ),
                ),
                None,
            ),
            (
                "unexpected",
                secret_cmd(
                    "c3",
                    3,
                    "pw-a",
                    &[("admin_password", "pw-a"), ("other", "x")],
                ),
                rejected(
                    "c3",
                    "secret unexpected: other is not a secret reference in the command's state",
                ),
                None,
            ),
            (
                "good",
                secret_cmd("c4", 4, "pw-a", &[("admin_password", "pw-a")]),
                applied("c4"),
                Some("pw-a"),
            ),
        ];
        for (what, cmd, ack, held) in cases {
            let env = sim.settings.env();
            let got = sim
                .core
                .on_command(&env, &mut sim.rng, &mut sim.view, cmd, sim.now);
            assert_eq!(got.acks, vec![ack], "{what}");
            assert_eq!(
                sim.view.secrets.get("admin_password").map(String::as_str),
                held,
                "{what}"
            );
        }
        // It reports the reference, never the plaintext.
        let reported = String::from_utf8(report(&mut sim.view).expect("report")).expect("utf-8");
        assert!(reported.contains(&fingerprint("pw-a")), "{reported}");
        assert!(!reported.contains("pw-a\""), "{reported}");
        // null deletes the key and forgets the secret.
        sim.command("c5", 5, json!({"admin_password": null}));
        assert!(sim.view.secrets.is_empty());
    }

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

    /// Each case: commands sent in order (id, generation, state), what the
    /// last one makes the device send, and the dimming it ends with.
    #[test]
    fn command_rules() {
        type Case = (&'static str, Vec<(&'static str, u64, Value)>, Actions, u64);
        let cases: Vec<Case> = vec![
            (
                "a valid change is applied, reported, then acknowledged",
                vec![("c1", 1, json!({"dimming": 70}))],
                report_and(vec![applied("c1")]),
                70,
            ),
            (
                "an invalid value rejects the whole command",
                vec![(
                    "c1",
                    1,
                    json!({"schedule": {"on": "18:00", "off": "06:00"}, "dimming": 400}),
                )],
                acks(vec![rejected("c1", "dimming must be 0..100")]),
                30,
            ),
            (
                "a read-only key cannot change",
                vec![("c1", 1, json!({"lamp_power_w": 1}))],
                acks(vec![rejected("c1", "lamp_power_w is read-only")]),
                30,
            ),
            (
                "a replayed command id is ignored",
                vec![
                    ("c1", 1, json!({"dimming": 70})),
                    ("c1", 2, json!({"dimming": 50})),
                ],
                Actions::default(),
                70,
            ),
            (
                "a stale generation is ignored",
                vec![
                    ("c1", 5, json!({"dimming": 70})),
                    ("c2", 4, json!({"dimming": 50})),
                ],
                Actions::default(),
                70,
            ),
            (
                "the same generation again is applied",
                vec![
                    ("c1", 5, json!({"dimming": 70})),
                    ("c2", 5, json!({"dimming": 50})),
                ],
                report_and(vec![applied("c2")]),
                50,
            ),
            (
                "a new firmware starts an update, acknowledged when it ends",
                vec![("c1", 1, json!({"firmware": "1.4.2", "dimming": 50}))],
                Actions::report(),
                50,
            ),
            (
                "the firmware it already runs is no update",
                vec![("c1", 1, json!({"firmware": OLD_FW}))],
                report_and(vec![applied("c1")]),
                30,
            ),
            (
                "a retry of the update in progress joins it",
                vec![
                    ("c1", 1, json!({"firmware": "1.4.2"})),
                    ("c2", 1, json!({"firmware": "1.4.2"})),
                ],
                Actions::report(),
                30,
            ),
            (
                "another firmware during an update is rejected",
                vec![
                    ("c1", 1, json!({"firmware": "1.4.2"})),
                    ("c2", 2, json!({"firmware": "1.5.0"})),
                ],
                acks(vec![rejected(
                    "c2",
                    "firmware update to 1.4.2 in progress (downloading)",
                )]),
                30,
            ),
        ];
        for (name, commands, want, dimming) in cases {
            let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
            let mut last = Actions::default();
            for (id, generation, state) in commands {
                last = sim.command(id, generation, state);
            }
            assert_eq!(last, want, "{name}");
            assert_eq!(sim.view.state["dimming"], json!(dimming), "{name}");
        }
    }

    #[test]
    fn another_firmware_during_the_health_check_is_taken_after_it() {
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        sim.command("c1", 1, json!({"firmware": "1.4.2"}));
        for _ in 0..10 {
            if sim
                .core
                .update
                .as_ref()
                .is_some_and(|j| j.step == Step::HealthCheck)
            {
                break;
            }
            if sim.next_step().reboot {
                sim.boot();
            }
        }
        // The new image runs and is being checked: a rollback waits for it.
        let early = sim.command("c2", 2, json!({"firmware": "1.3.9"}));
        assert_eq!(early, Actions::default());
        let done = sim.next_step();
        assert_eq!(done.acks, vec![applied("c1")]);
        assert_eq!(
            sim.core.update.as_ref().map(|j| j.target.as_str()),
            Some("1.3.9"),
            "c2's update starts once c1's has ended"
        );
    }

    #[test]
    fn an_applied_command_bumps_the_reported_version_and_generation() {
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        sim.command("c1", 3, json!({"dimming": 70}));
        assert_eq!(sim.view.last_generation, 3);
        assert_eq!(sim.view.state["lamp_power_w"], json!(84));
        assert_eq!(sim.view.last_change, Some(sim.now));
        let body: Value =
            serde_json::from_slice(&report(&mut sim.view).expect("report")).expect("json");
        assert_eq!(body["version"], json!(1));
        assert_eq!(body["state"]["dimming"], json!(70));
        assert_eq!(sim.view.version, 1);
    }

    #[test]
    fn an_update_runs_through_its_states_and_acknowledges_every_joined_command() {
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        assert_eq!(
            sim.command("c1", 1, json!({"firmware": "1.4.2"})),
            Actions::report()
        );
        assert_eq!(sim.update_state(), json!("downloading"));
        assert_eq!(
            sim.command("c2", 2, json!({"firmware": "1.4.2"})),
            Actions::report()
        );
        assert_eq!(sim.next_step(), Actions::report());
        assert_eq!(sim.update_state(), json!("verifying"));
        assert_eq!(sim.next_step(), Actions::report());
        assert_eq!(sim.update_state(), json!("installing"));
        assert_eq!(sim.next_step(), reboot(true));
        assert_eq!(sim.update_state(), json!("rebooting"));
        assert_eq!(sim.firmware(), json!(OLD_FW));
        // The planned reboot is not an interruption.
        sim.core.power_lost();
        assert_eq!(sim.boot(), Actions::report());
        assert_eq!(sim.update_state(), json!("health-check"));
        assert_eq!(sim.firmware(), json!("1.4.2"));
        assert_eq!(
            sim.next_step(),
            report_and(vec![applied("c1"), applied("c2")])
        );
        assert_eq!(sim.update_state(), json!("done"));
        assert_eq!(sim.view.last_generation, 2);
        assert_eq!(sim.core.update_due(), None);
        assert_eq!(
            sim.settings
                .counters
                .fw_succeeded
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    /// Failure injection: each step failing (probability 1) ends the update
    /// there, on the old firmware, with the step's reason.
    #[test]
    fn a_failing_step_rejects_the_update_and_keeps_the_old_firmware() {
        // (step, how it fails, steps taken before it, the reason given)
        type Case = (&'static str, fn(&mut StepFailures), usize, &'static str);
        let cases: [Case; 4] = [
            (
                "download",
                |f| f.download = 1.0,
                0,
                "download failed: image checksum mismatch",
            ),
            (
                "verify",
                |f| f.verify = 1.0,
                1,
                "verification failed: bad image signature",
            ),
            (
                "install",
                |f| f.install = 1.0,
                2,
                "install failed: flash write error",
            ),
            (
                "health check",
                |f| f.health_check = 1.0,
                3,
                "health check failed after reboot; rolled back",
            ),
        ];
        for (name, fail, steps_before, why) in cases {
            let mut firmware = FirmwareSim::fast();
            fail(&mut firmware.failure);
            let mut sim = Sim::new(firmware, 0.0);
            sim.command("c1", 1, json!({"firmware": "1.4.2"}));
            for _ in 0..steps_before {
                if sim.next_step().reboot {
                    assert_eq!(sim.boot(), Actions::report(), "{name}");
                }
            }
            assert_eq!(
                sim.next_step(),
                report_and(vec![rejected("c1", why)]),
                "{name}"
            );
            assert_eq!(sim.update_state(), json!("failed"), "{name}");
            assert_eq!(sim.firmware(), json!(OLD_FW), "{name}");
            assert_eq!(sim.view.state["update"]["reason"], json!(why), "{name}");
        }
    }

    #[test]
    fn a_power_loss_mid_update_is_reported_as_failed_after_the_reboot() {
        // Planned at the start (probability 1): the power goes at the end of
        // one of the first three steps, without a report.
        let mut sim = Sim::new(FirmwareSim::fast(), 1.0);
        sim.command("c1", 1, json!({"firmware": "1.4.2"}));
        let mut steps = 0;
        let cut_during = loop {
            let during = sim.update_state();
            let actions = sim.next_step();
            if actions == reboot(false) {
                break during;
            }
            assert_eq!(actions, Actions::report());
            steps += 1;
            assert!(steps < 3, "no power loss");
        };
        let cut_during = cut_during.as_str().expect("a step name").to_owned();
        let why = format!("interrupted by a reboot during {cut_during}");
        assert_eq!(sim.boot(), report_and(vec![rejected("c1", &why)]));
        assert_eq!(sim.firmware(), json!(OLD_FW));
        assert_eq!(sim.view.state["update"]["step"], json!(cut_during));

        // A reboot from outside does the same.
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        sim.command("c1", 1, json!({"firmware": "1.4.2"}));
        sim.core.power_lost();
        assert_eq!(
            sim.boot(),
            report_and(vec![rejected(
                "c1",
                "interrupted by a reboot during downloading"
            )])
        );
        assert_eq!(sim.update_state(), json!("failed"));
    }

    /// Signed releases (a device with a release key).
    mod signed {
        use super::*;
        use cityplane_certs::firmware::sign_manifest;
        use ring::signature::{Ed25519KeyPair, KeyPair};

        const MODEL: &str = "LumiNode SL-200";
        const SIZE: usize = 100_000;

        fn key() -> (Ed25519KeyPair, [u8; 32]) {
            let pkcs8 =
                Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("pkcs8");
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
            let public = pair.public_key().as_ref().try_into().expect("32 bytes");
            (pair, public)
        }

        fn image() -> Vec<u8> {
            (0..SIZE).map(|i| (i % 251) as u8).collect()
        }

        fn manifest(version: &str, bytes: &[u8]) -> ReleaseManifest {
            ReleaseManifest {
                version: version.into(),
                models: vec![MODEL.into()],
                size: bytes.len() as u64,
                sha256: hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref()),
                floor: None,
                downgrade: false,
                fetch: "mqtt".into(),
            }
        }

        /// A streetlight of model [`MODEL`] with a release key, and a
        /// release of [`image`] signed by it.
        fn signed_sim() -> (Sim, Ed25519KeyPair, SignedRelease) {
            let (pair, public) = key();
            let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
            sim.settings.release_key = Some(public);
            sim.view.state.insert("hardware_model".into(), json!(MODEL));
            sim.view.state.insert(FLOOR_KEY.into(), json!(OLD_FW));
            let release = sign_manifest(&pair, &manifest("1.5.0", &image())).expect("sign");
            (sim, pair, release)
        }

        fn fetch(offset: u64) -> Actions {
            Actions {
                fetch: Some(FetchRequest {
                    sha256: manifest("1.5.0", &image()).sha256,
                    offset,
                    length: MAX_CHUNK,
                }),
                ..Actions::default()
            }
        }

        fn header(offset: u64, total: u64) -> BlobHeader {
            BlobHeader {
                sha256: manifest("1.5.0", &image()).sha256,
                offset,
                total,
                error: None,
            }
        }

        const CHUNK: usize = MAX_CHUNK as usize;

        #[test]
        fn a_release_is_downloaded_in_paced_chunks_resumed_checked_and_installed_once() {
            let (mut sim, _, release) = signed_sim();
            let bytes = image();
            let fw = json!({"firmware": "1.5.0"});
            let started = sim.release("c1", 1, fw.clone(), Some(release.clone()));
            assert_eq!(
                started,
                Actions {
                    report: true,
                    ..fetch(0)
                }
            );
            assert_eq!(
                sim.view.state["update"],
                json!({"state": "downloading", "target": "1.5.0", "from": OLD_FW, "received": 0, "size": SIZE})
            );
            // A retry with a new id joins; the chunk that answers the fetch
            // is taken, a copy of it is not.
            assert_eq!(sim.release("c2", 1, fw, Some(release)), Actions::report());
            assert_eq!(
                sim.blob(header(0, SIZE as u64), &bytes[..CHUNK]),
                Actions::default()
            );
            assert_eq!(
                sim.blob(header(0, SIZE as u64), &bytes[..CHUNK]),
                Actions::default()
            );
            // The next fetch waits its turn (pacing), then goes out.
            assert_eq!(sim.next_step(), fetch(CHUNK as u64));
            // The connection drops: back online, it asks from where it was.
            assert_eq!(
                sim.boot(),
                Actions {
                    report: true,
                    ..fetch(CHUNK as u64)
                }
            );
            assert_eq!(sim.view.state["update"]["received"], json!(CHUNK));
            assert_eq!(
                sim.blob(header(CHUNK as u64, SIZE as u64), &bytes[CHUNK..]),
                Actions::default()
            );
            assert_eq!(sim.next_step(), Actions::report());
            assert_eq!(sim.update_state(), json!("verifying"));
            assert_eq!(sim.next_step(), Actions::report());
            assert_eq!(sim.next_step(), reboot(true));
            assert_eq!(sim.view.firmware_installs, 1);
            assert_eq!(sim.boot(), Actions::report());
            assert_eq!(
                sim.next_step(),
                report_and(vec![applied("c1"), applied("c2")])
            );
            assert_eq!(sim.firmware(), json!("1.5.0"));
            assert_eq!(sim.view.state[FLOOR_KEY], json!("1.5.0"));
            // The version it runs, under a new id: applied, no install.
            assert_eq!(
                sim.command("c3", 2, json!({"firmware": "1.5.0"})),
                report_and(vec![applied("c3")])
            );
            assert_eq!(sim.view.firmware_installs, 1);
        }

        #[test]
        fn bad_images_are_refused_by_size_and_hash() {
            let bytes = image();
            let mut other = bytes.clone();
            other[SIZE - 1] ^= 1;
            let total = SIZE as u64;
            // (what, blobs sent, the reason's start)
            type Case = (&'static str, Vec<(BlobHeader, Vec<u8>)>, &'static str);
            let cases: Vec<Case> = vec![
                (
                    "a larger image",
                    vec![(header(0, total + 1), bytes[..CHUNK].to_vec())],
                    "size: ",
                ),
                (
                    "a smaller image",
                    vec![(header(0, total - 1), bytes[..CHUNK].to_vec())],
                    "size: ",
                ),
                (
                    "more bytes than declared",
                    vec![
                        (header(0, total), bytes[..CHUNK].to_vec()),
                        (header(CHUNK as u64, total), vec![0; CHUNK]),
                    ],
                    "size: ",
                ),
                (
                    "other bytes",
                    vec![
                        (header(0, total), other[..CHUNK].to_vec()),
                        (header(CHUNK as u64, total), other[CHUNK..].to_vec()),
                    ],
                    "hash mismatch: ",
                ),
                (
                    "an error from the broker",
                    vec![(
                        BlobHeader {
                            error: Some("not_found".into()),
                            ..header(0, 0)
                        },
                        vec![],
                    )],
                    "download failed: not_found",
                ),
            ];
            for (what, blobs, reason) in cases {
                let (mut sim, _, release) = signed_sim();
                sim.release("c1", 1, json!({"firmware": "1.5.0"}), Some(release));
                let mut last = Actions::default();
                for (i, (h, b)) in blobs.into_iter().enumerate() {
                    if i > 0 {
                        assert!(sim.next_step().fetch.is_some(), "{what}");
                    }
                    last = sim.blob(h, &b);
                }
                let ack = last.acks.first().expect("an ack");
                assert_eq!(ack.status, AckStatus::Rejected, "{what}");
                let why = ack.reason.as_deref().unwrap_or_default();
                assert!(why.starts_with(reason), "{what}: {why}");
                assert_eq!(sim.firmware(), json!(OLD_FW), "{what}");
                assert_eq!(sim.update_state(), json!("failed"), "{what}");
            }
        }

        #[test]
        fn a_release_is_checked_before_anything_starts() {
            let (other, _) = key();
            let bytes = image();
            let sign = |pair: &Ed25519KeyPair, m: ReleaseManifest| {
                Some(sign_manifest(pair, &m).expect("sign"))
            };
            // (what, asked version, the release from the right key or not, reason, kind)
            type Case = (
                &'static str,
                &'static str,
                Option<ReleaseManifest>,
                bool,
                &'static str,
                &'static str,
            );
            let mut wrong_model = manifest("1.5.0", &bytes);
            wrong_model.models = vec!["Orbis LX-4".into()];
            let mut rollback = manifest("1.0.0", &bytes);
            rollback.downgrade = true;
            let cases: Vec<Case> = vec![
                (
                    "unsigned",
                    "1.5.0",
                    None,
                    true,
                    "unsigned: the command carries no signed release",
                    "unsigned",
                ),
                (
                    "another key",
                    "1.5.0",
                    Some(manifest("1.5.0", &bytes)),
                    false,
                    "bad signature: ",
                    "signature",
                ),
                (
                    "another model",
                    "1.5.0",
                    Some(wrong_model),
                    true,
                    "wrong model: ",
                    "model",
                ),
                (
                    "below the floor",
                    "1.0.0",
                    Some(manifest("1.0.0", &bytes)),
                    true,
                    "downgrade: ",
                    "downgrade",
                ),
                (
                    "another version",
                    "1.6.0",
                    Some(manifest("1.5.0", &bytes)),
                    true,
                    "release is for 1.5.0",
                    "version mismatch",
                ),
            ];
            for (what, version, m, right_key, reason, kind) in cases {
                let (mut sim, pair, _) = signed_sim();
                let release = m.and_then(|m| sign(if right_key { &pair } else { &other }, m));
                let got = sim.release("c1", 1, json!({"firmware": version, "dimming": 5}), release);
                assert_eq!(got.acks.len(), 1, "{what}");
                let why = got.acks[0].reason.as_deref().unwrap_or_default();
                assert!(why.starts_with(reason), "{what}: {why}");
                assert_eq!((got.report, got.fetch), (false, None), "{what}");
                assert_eq!(
                    sim.view.state["dimming"],
                    json!(30),
                    "{what}: nothing applied"
                );
                let refused = sim
                    .settings
                    .counters
                    .fw_refused
                    .lock()
                    .expect("lock")
                    .clone();
                assert_eq!(refused.get(kind), Some(&1), "{what}: {refused:?}");
            }
            // Signed as a downgrade, it starts.
            let (mut sim, pair, _) = signed_sim();
            let got = sim.release("c1", 1, json!({"firmware": "1.0.0"}), sign(&pair, rollback));
            assert!(got.fetch.is_some());
        }
    }

    #[test]
    fn without_an_update_a_boot_only_reports() {
        let mut sim = Sim::new(FirmwareSim::fast(), 0.0);
        assert_eq!(sim.boot(), Actions::report());
        assert_eq!(sim.advance_at(sim.now), Actions::default());
    }
}
