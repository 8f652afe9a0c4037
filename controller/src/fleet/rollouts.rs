//! Rollouts on the fleet: planning one (validated, its waves spread over a
//! label), operator controls, the periodic step that admits devices, gates
//! waves and aborts, and the views `rollout status` and `rollout devices`
//! read. Decisions over one device are in [`crate::rollout`].

use super::*;
use crate::rollout::{
    check_spec, count, device_status, failure_is, holds, short_reason, spread_order, wave_sizes,
    Counts, DeviceRollout, DeviceStatus, Phase, RolloutSpec, FIRMWARE_KEY,
};

/// What an operator does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Abort,
}

impl Control {
    pub fn parse(verb: &str) -> Option<Control> {
        match verb {
            "rollout-pause" => Some(Control::Pause),
            "rollout-resume" => Some(Control::Resume),
            "rollout-abort" => Some(Control::Abort),
            _ => None,
        }
    }
}

/// Per device of a rollout: (id, its entry, its status, why).
type Member<'a> = (
    &'a DeviceRecord,
    &'a DeviceRollout,
    DeviceStatus,
    Option<String>,
);

impl Fleet {
    /// Rollouts and releases from the store; desired state is derived again
    /// with their layers (a rollout step may have been committed just
    /// before a crash, before the device records it changed).
    pub fn restore_rollouts(&mut self, rollouts: Vec<RolloutRecord>, releases: Vec<ReleaseRecord>) {
        self.rollouts = rollouts
            .into_iter()
            .map(|r| (r.spec.name.clone(), r))
            .collect();
        self.releases = releases
            .into_iter()
            .map(|r| (r.version.clone(), r))
            .collect();
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        self.recompute_desired(ids);
    }

    /// A release made durable: later commands setting its version carry it.
    pub fn add_release(&mut self, release: ReleaseRecord) {
        self.releases.insert(release.version.clone(), release);
    }

    pub(super) fn members<'a>(
        &'a self,
        r: &'a RolloutRecord,
    ) -> impl Iterator<Item = Member<'a>> + 'a {
        let name = r.spec.name.as_str();
        self.devices.values().filter_map(move |d| {
            let entry = d.rollouts.get(name)?;
            let (status, why) = device_status(d, entry, r);
            Some((&**d, entry, status, why))
        })
    }

    /// Validates a rollout and plans it: which devices, in which wave.
    /// Nothing changes until [`Fleet::apply_rollout`] after the commit.
    pub fn plan_rollout(
        &self,
        spec: RolloutSpec,
        who: &str,
        now: Millis,
    ) -> Result<(RolloutRecord, Vec<Arc<DeviceRecord>>), Rejection> {
        let patch = check_spec(&spec, |v| self.releases.contains_key(v))?;
        if let Some(old) = self.rollouts.get(&spec.name) {
            return Err(Rejection::new(
                "conflict",
                format!(
                    "a rollout named {:?} exists ({:?}); pick another name",
                    spec.name, old.phase
                ),
            ));
        }
        let targeted: Vec<&DeviceRecord> = self
            .targeted(&spec.target)
            .into_iter()
            .filter(|d| !d.revoked)
            .collect();
        // Two live rollouts may not set the same key on the same device:
        // which would win would depend on timing.
        for other in self.rollouts.values().filter(|r| r.phase.is_live()) {
            let shared: Vec<&String> = other
                .patch
                .keys()
                .filter(|k| patch.contains_key(*k))
                .collect();
            if shared.is_empty() {
                continue;
            }
            let overlap: Vec<&str> = targeted
                .iter()
                .filter(|d| {
                    d.rollouts
                        .get(&other.spec.name)
                        .is_some_and(|e| matches!(e.stage, Stage::Queued | Stage::Admitted))
                })
                .map(|d| d.id.as_str())
                .collect();
            if let Some(first) = overlap.first() {
                return Err(Rejection::new(
                    "conflict",
                    format!(
                        "rollout {:?} ({:?}) holds {} on {} of these devices (e.g. {first}): \
                         wait for it, or abort it first",
                        other.spec.name,
                        other.phase,
                        shared
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        overlap.len()
                    ),
                ));
            }
        }
        let order = spread_order(&targeted, &spec.spread_by);
        let sizes = wave_sizes(&spec.waves, order.len());
        let mut records = Vec::with_capacity(order.len());
        let mut ids = order.iter();
        for (wave, size) in sizes.iter().enumerate() {
            for id in ids.by_ref().take(*size) {
                let Some(dev) = self.devices.get(id) else {
                    continue;
                };
                let mut dev = (**dev).clone();
                dev.rollouts
                    .insert(spec.name.clone(), DeviceRollout::queued(wave));
                records.push(Arc::new(dev));
            }
        }
        let mut record = RolloutRecord {
            org: None,
            patch,
            seq: self.seq + 1,
            author: who.to_owned(),
            created_at: now,
            phase: Phase::Active,
            reason: String::new(),
            wave: 0,
            wave_sizes: sizes.clone(),
            wave_started_at: now,
            soak_from: None,
            history: Vec::new(),
            spec,
        };
        record.log(
            now,
            who,
            format!(
                "created: {} devices in waves of {:?}",
                order.len(),
                record.wave_sizes
            ),
        );
        Ok((record, records))
    }

    /// A planned rollout made durable.
    pub fn apply_rollout(&mut self, record: RolloutRecord, devices: Vec<Arc<DeviceRecord>>) {
        self.seq = self.seq.max(record.seq);
        let name = record.spec.name.clone();
        self.rollouts.insert(name.clone(), record);
        self.adopt_entries(&name, devices);
    }

    /// Takes `name`'s entries from `devices` (planned from the records as
    /// they were) into the live records, which may have changed meanwhile.
    pub fn adopt_entries(&mut self, name: &str, devices: Vec<Arc<DeviceRecord>>) {
        let mut changed = Vec::new();
        for planned in devices {
            let Some(entry) = planned.rollouts.get(name) else {
                continue;
            };
            if let Some(dev) = self.devices.get_mut(&planned.id).map(Arc::make_mut) {
                dev.rollouts.insert(name.to_owned(), entry.clone());
                self.dirty.insert(planned.id.clone());
                changed.push(planned.id.clone());
            }
        }
        self.recompute_desired(changed);
    }

    /// Pause, resume or abort: the new record and the device records it
    /// changes, for the commit; applied by [`Fleet::apply_rollout_change`].
    pub fn control_rollout(
        &self,
        name: &str,
        control: Control,
        who: &str,
        reason: &str,
        now: Millis,
    ) -> Result<(RolloutRecord, Vec<Arc<DeviceRecord>>), Rejection> {
        let r = self
            .rollouts
            .get(name)
            .ok_or_else(|| Rejection::new("not_found", format!("no rollout named {name:?}")))?;
        let mut r = r.clone();
        let why = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        match (control, r.phase) {
            (_, Phase::Aborted | Phase::Completed) => Err(Rejection::new(
                "conflict",
                format!("rollout {name:?} has ended ({:?})", r.phase),
            )),
            (Control::Pause, Phase::Paused) | (Control::Resume, Phase::Active) => {
                Err(Rejection::new(
                    "conflict",
                    format!("rollout {name:?} is already {:?}", r.phase),
                ))
            }
            (Control::Pause, _) => {
                r.phase = Phase::Paused;
                r.reason = format!("paused by {who}{why}");
                r.log(now, who, format!("paused{why}"));
                Ok((r, Vec::new()))
            }
            (Control::Resume, _) => {
                r.phase = Phase::Active;
                r.reason.clear();
                // A halted wave soaks again from now: its health is judged anew.
                r.soak_from = None;
                r.log(now, who, format!("resumed{why}"));
                Ok((r, Vec::new()))
            }
            (Control::Abort, _) => {
                let records =
                    self.abort_records(&mut r, now, who, &format!("aborted by {who}{why}"));
                Ok((r, records))
            }
        }
    }

    /// Ends `r` as aborted; the device records that change with it:
    /// queued devices are cancelled; with `rollback`, every device the
    /// rollout reached gets back what it had (those already at the target
    /// before keep it), without, the devices not yet done are cancelled.
    fn abort_records(
        &self,
        r: &mut RolloutRecord,
        now: Millis,
        who: &str,
        reason: &str,
    ) -> Vec<Arc<DeviceRecord>> {
        r.phase = Phase::Aborted;
        r.reason = reason.to_owned();
        let mut records = Vec::new();
        let mut rolled = 0;
        for (dev, entry, status, _) in self.members(r) {
            let Some(stage) = aborted_stage(entry, status, r.spec.rollback) else {
                continue;
            };
            rolled += usize::from(stage == Stage::RolledBack);
            let mut dev = dev.clone();
            if let Some(e) = dev.rollouts.get_mut(&r.spec.name) {
                e.stage = stage;
            }
            records.push(Arc::new(dev));
        }
        let what = if r.spec.rollback {
            format!("{reason}; rolling back {rolled} devices")
        } else {
            reason.to_owned()
        };
        r.log(now, who, what);
        records
    }

    /// Sharded: the devices this controller owns in a rollout the leader
    /// aborted end their part as [`Fleet::control_rollout`] would have
    /// ended it (level-triggered: the leader writes only the record).
    fn settle_aborted(&mut self) {
        if self.owner.is_none() {
            return;
        }
        let mut changed = Vec::new();
        for r in self.rollouts.values().filter(|r| r.phase == Phase::Aborted) {
            for (dev, entry, status, _) in self.members(r) {
                if !self.owns(&dev.id) {
                    continue;
                }
                if let Some(stage) = aborted_stage(entry, status, r.spec.rollback) {
                    changed.push((dev.id.clone(), r.spec.name.clone(), stage));
                }
            }
        }
        let mut ids = Vec::new();
        for (id, name, stage) in changed {
            if let Some(dev) = self.devices.get_mut(&id).map(Arc::make_mut) {
                if let Some(e) = dev.rollouts.get_mut(&name) {
                    e.stage = stage;
                }
                self.dirty.insert(id.clone());
                ids.push(id);
            }
        }
        self.recompute_desired(ids);
    }

    /// A control made durable.
    pub fn apply_rollout_change(&mut self, record: RolloutRecord, devices: Vec<Arc<DeviceRecord>>) {
        let name = record.spec.name.clone();
        self.rollouts.insert(name.clone(), record);
        self.adopt_entries(&name, devices);
    }

    /// Rollout records changed by steps since the last commit. Sharded,
    /// only the leader writes them (the others follow its records).
    pub fn take_dirty_rollouts(&mut self) -> Vec<RolloutRecord> {
        if !self.leading {
            self.dirty_rollouts.clear();
            return Vec::new();
        }
        self.dirty_rollouts
            .drain()
            .filter_map(|n| self.rollouts.get(&n).cloned())
            .collect()
    }

    /// Sharded, not leading: the rollouts and releases the leader stored.
    /// The devices this controller owns that take part in a rollout whose
    /// record changed get their desired state again.
    pub fn follow_rollouts(&mut self, rollouts: Vec<RolloutRecord>, releases: Vec<ReleaseRecord>) {
        let stored: BTreeMap<String, RolloutRecord> = rollouts
            .into_iter()
            .map(|r| (r.spec.name.clone(), r))
            .collect();
        let changed: HashSet<&String> = stored
            .iter()
            .filter(|(n, r)| self.rollouts.get(*n) != Some(r))
            .map(|(n, _)| n)
            .chain(self.rollouts.keys().filter(|n| !stored.contains_key(*n)))
            .collect();
        let ids: Vec<String> = self
            .devices
            .values()
            .filter(|d| d.rollouts.keys().any(|n| changed.contains(n)))
            .map(|d| d.id.clone())
            .collect();
        if let Some(seq) = stored.values().map(|r| r.seq).max() {
            self.seq = self.seq.max(seq);
        }
        self.rollouts = stored;
        self.releases = releases
            .into_iter()
            .map(|r| (r.version.clone(), r))
            .collect();
        self.recompute_desired(ids);
    }

    /// Rollout records whose commit failed: the next commit writes them.
    pub fn mark_rollouts_dirty(&mut self, names: impl IntoIterator<Item = String>) {
        self.dirty_rollouts.extend(names);
    }

    pub fn has_dirty_rollouts(&self) -> bool {
        !self.dirty_rollouts.is_empty()
    }

    /// Moves every live rollout on (level-triggered: it looks at the
    /// devices as they are, so a restart simply steps again).
    pub fn step_rollouts(&mut self, now: Millis) {
        self.settle_aborted();
        // A rotation that failed is undone device by device before its
        // wave is judged (the device is back on its old certificate).
        self.settle_rotations(now);
        self.roll_back_failed_rotations();
        let live: Vec<String> = self
            .rollouts
            .iter()
            .filter(|(_, r)| r.phase.is_live())
            .map(|(n, _)| n.clone())
            .collect();
        for name in live {
            let wave = self.rollouts.get(&name).map(|r| r.wave);
            self.step_rollout(&name, now);
            // A wave that just moved on starts its devices now, not a tick later.
            if self.rollouts.get(&name).map(|r| r.wave) != wave {
                self.step_rollout(&name, now);
            }
        }
    }

    fn step_rollout(&mut self, name: &str, now: Millis) {
        let Some(r) = self.rollouts.get(name).cloned() else {
            return;
        };
        let active = r.phase == Phase::Active;
        // Devices that joined the target while the rollout runs: into the
        // wave in progress.
        if active {
            let joining: Vec<String> = self
                .targeted(&r.spec.target)
                .into_iter()
                .filter(|d| self.owns(&d.id))
                .filter(|d| !d.revoked && !d.rollouts.contains_key(name))
                .filter(|d| self.org_sees(r.org.as_deref(), d))
                .map(|d| d.id.clone())
                .collect();
            let wave = r.wave.min(r.wave_sizes.len().saturating_sub(1));
            for id in joining {
                if let Some(dev) = self.devices.get_mut(&id).map(Arc::make_mut) {
                    dev.rollouts
                        .insert(name.to_owned(), DeviceRollout::queued(wave));
                    self.dirty.insert(id);
                }
            }
        }
        // Bookkeeping: who succeeded (and when, for the reboot count), whose
        // failure counts.
        let mut notes: Vec<(String, Option<Millis>, Option<String>)> = Vec::new();
        let mut admit: Vec<(usize, String)> = Vec::new();
        let (mut started_last_minute, mut succeeded) = (0u64, 0u64);
        let starts_from = r.starts_from(now);
        // Sharded, each owner admits its own devices and takes its share
        // of the rate (by the shards it holds); the leader gates the waves
        // with every device's record, its copies included.
        let mut share = 1.0;
        if let Some(o) = &self.owner {
            share = o.held().len() as f64 / f64::from(o.shards().max(1));
        }
        for (dev, entry, status, why) in self.members(&r) {
            let mine = self.owns(&dev.id);
            match entry.stage {
                Stage::Admitted => {
                    // Fleet-wide: the rate grows with every success.
                    succeeded += u64::from(status.is_success());
                    if !mine {
                        continue;
                    }
                    started_last_minute += u64::from(entry.admitted_at + 60_000 > now);
                    if status.is_success() && entry.succeeded_at.is_none() {
                        notes.push((dev.id.clone(), Some(now), None));
                    } else if status == DeviceStatus::Failed && entry.failed.is_none() {
                        notes.push((dev.id.clone(), None, why));
                    }
                }
                Stage::Queued
                    if mine
                        && active
                        && entry.wave <= r.wave
                        && starts_from.is_some_and(|base| r.start_at(base, &dev.id) <= now) =>
                {
                    admit.push((entry.wave, dev.id.clone()))
                }
                _ => {}
            }
        }
        for (id, succeeded, failed) in notes {
            if let Some(dev) = self.devices.get_mut(&id).map(Arc::make_mut) {
                let connects = dev.connects;
                if let Some(e) = dev.rollouts.get_mut(name) {
                    if succeeded.is_some() {
                        e.succeeded_at = succeeded;
                        e.connects_at_success = connects;
                        e.failed = None;
                    } else {
                        e.failed = failed;
                    }
                }
                self.dirty.insert(id);
            }
        }
        if let Some(rate) = &r.spec.rate {
            // Earlier waves first, then by id: the order the plan spread.
            admit.sort_unstable();
            let budget = ((rate.per_minute_after(succeeded) as f64 * share).ceil() as u64)
                .saturating_sub(started_last_minute);
            admit.truncate(usize::try_from(budget).unwrap_or(usize::MAX));
        }
        let admit: Vec<String> = admit.into_iter().map(|(_, id)| id).collect();
        for id in &admit {
            self.admit(&r, id, now);
        }
        self.recompute_desired(admit);
        if !self.leading {
            return;
        }
        let Some(r) = self.rollouts.get(name).cloned() else {
            return;
        };
        if let Some(reason) = self.abort_reason(&r) {
            let mut r = r;
            let records = self.abort_records(&mut r, now, "controller", &reason);
            tracing::warn!(rollout = name, %reason, "rollout aborted");
            self.apply_rollout_change(r, records);
            self.dirty_rollouts.insert(name.to_owned());
            return;
        }
        if active {
            if let Some(next) = self.gate(&r, now) {
                self.rollouts.insert(name.to_owned(), next);
                self.dirty_rollouts.insert(name.to_owned());
            }
        }
    }

    /// Admits device `id` into `r`: its previous values are kept for a
    /// rollback, entries of ended rollouts this one supersedes are dropped.
    fn admit(&mut self, r: &RolloutRecord, id: &str, now: Millis) {
        let superseded: Vec<String> = self
            .rollouts
            .values()
            .filter(|o| {
                o.spec.name != r.spec.name
                    && !o.phase.is_live()
                    && o.patch.keys().all(|k| r.patch.contains_key(k))
            })
            .map(|o| o.spec.name.clone())
            .collect();
        // A secret rotation: this device's own new secret, kept by the
        // minter; the device's change is the reference to it.
        let mut values = State::new();
        if let Some(name) = &r.spec.secret {
            let Some(dev) = self.devices.get(id) else {
                return;
            };
            let keep = dev
                .reported
                .get(name)
                .as_ref()
                .and_then(cityplane_proto::secrets::SecretRef::of)
                .map(|s| s.fingerprint);
            let minted = match &self.secrets {
                Some(m) => m.mint(id, name, keep.as_deref(), now),
                None => Err("this controller keeps no secrets".to_owned()),
            };
            match minted {
                Ok(reference) => {
                    values.insert(name.clone(), reference.to_value());
                }
                Err(e) => {
                    // Stays queued: admitted on a later step.
                    tracing::error!(rollout = %r.spec.name, device = id, error = %e, "could not make a secret");
                    return;
                }
            }
        }
        let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        let mut have = dev.reported.pick_keys_of(&r.patch);
        let previous: State = r
            .patch
            .keys()
            .map(|k| (k.clone(), have.remove(k).unwrap_or(Value::Null)))
            .collect();
        let patch = if values.is_empty() { &r.patch } else { &values };
        let skipped = dev.reported_version > 0 && holds(&dev.reported, patch);
        for old in superseded {
            dev.rollouts.remove(&old);
        }
        if let Some(e) = dev.rollouts.get_mut(&r.spec.name) {
            e.stage = Stage::Admitted;
            e.admitted_at = now;
            e.previous = previous;
            e.skipped = skipped;
            e.values = values;
        }
        self.dirty.insert(id.to_owned());
    }

    /// The first abort rule that holds, as a reason.
    fn abort_reason(&self, r: &RolloutRecord) -> Option<String> {
        if r.spec.abort.is_empty() {
            return None;
        }
        let mut succeeded = 0usize;
        let mut failures: Vec<String> = Vec::new();
        for (_, entry, status, why) in self.members(r) {
            if entry.stage != Stage::Admitted || entry.skipped {
                continue;
            }
            match status {
                DeviceStatus::Succeeded => succeeded += 1,
                DeviceStatus::Failed => failures.push(why.unwrap_or_default()),
                _ => {}
            }
        }
        let executed = succeeded + failures.len();
        r.spec.abort.iter().find_map(|rule| {
            let failed = failures
                .iter()
                .filter(|f| failure_is(rule.failure, f))
                .count();
            (executed >= rule.min_executed
                && executed > 0
                && (failed as f64) * 100.0 >= rule.threshold_percent * executed as f64)
                .then(|| {
                    format!(
                        "abort rule: {failed} of {executed} devices that finished failed \
                         ({}), at or above {}% (e.g. {})",
                        rule.failure.as_str(),
                        rule.threshold_percent,
                        failures
                            .iter()
                            .find(|f| failure_is(rule.failure, f))
                            .map_or("", |f| short_reason(f))
                    )
                })
        })
    }

    /// The wave's gate: threshold, then health for the soak time, then the
    /// next wave. Returns the record when it changed.
    fn gate(&self, r: &RolloutRecord, now: Millis) -> Option<RolloutRecord> {
        let mut next = r.clone();
        if r.wave >= r.wave_sizes.len() {
            next.phase = Phase::Completed;
            next.log(now, "controller", "completed");
            return Some(next);
        }
        let (size, ok) = self
            .members(r)
            .filter(|(_, e, _, _)| e.wave == r.wave && e.stage != Stage::Cancelled)
            .fold((0usize, 0usize), |(n, ok), (_, _, s, _)| {
                (n + 1, ok + usize::from(s.is_success()))
            });
        let threshold_holds = (ok as f64) * 100.0 >= r.spec.success_threshold * size as f64;
        if !threshold_holds {
            if r.soak_from.is_some() {
                next.soak_from = None;
                return Some(next);
            }
            return None;
        }
        let soak_from = *next.soak_from.get_or_insert(now);
        let health = self.health(r);
        if health.failing(&r.spec.health) {
            next.phase = Phase::Halted;
            next.reason = format!(
                "health gate: {} of {} updated devices unhealthy ({})",
                health.unhealthy.len(),
                health.checked,
                health
                    .unhealthy
                    .iter()
                    .take(5)
                    .map(|(id, why)| format!("{id}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            let reason = next.reason.clone();
            next.log(
                now,
                "controller",
                format!("halted wave {}: {reason}", r.wave + 1),
            );
            tracing::warn!(rollout = %r.spec.name, %reason, "rollout halted");
            return Some(next);
        }
        if now < soak_from + r.spec.health.soak_s * 1000 {
            return (r.soak_from.is_none()).then_some(next);
        }
        next.log(
            now,
            "controller",
            format!("wave {} done: {ok} of {size} succeeded", r.wave + 1),
        );
        next.wave += 1;
        next.wave_started_at = now;
        next.soak_from = None;
        if next.wave >= r.wave_sizes.len() {
            next.phase = Phase::Completed;
            next.log(now, "controller", "completed");
            tracing::info!(rollout = %r.spec.name, "rollout completed");
        }
        Some(next)
    }

    /// The health of every device the rollout updated so far.
    fn health(&self, r: &RolloutRecord) -> Health {
        let gate = &r.spec.health;
        let mut h = Health::default();
        for (dev, entry, status, _) in self.members(r) {
            if entry.stage != Stage::Admitted || status != DeviceStatus::Succeeded {
                continue;
            }
            h.checked += 1;
            let reboots = dev.connects.saturating_sub(entry.connects_at_success);
            let why = if gate.require_online && !dev.online {
                Some("offline".to_owned())
            } else if reboots > gate.max_reboots {
                Some(format!(
                    "{reboots} reconnects since it updated (reboot loop)"
                ))
            } else {
                let reported = dev.reported.pick(|k| {
                    gate.rules
                        .iter()
                        .any(|r| r.key.split('.').next() == Some(k))
                });
                gate.rules
                    .iter()
                    .find(|rule| !rule.check(&reported))
                    .map(|rule| format!("fails {}", rule.describe()))
            };
            if let Some(why) = why {
                h.unhealthy.push((dev.id.clone(), why));
            }
        }
        h.unhealthy.sort();
        h
    }

    /// Rollouts, newest first.
    pub fn rollout_rows(&self) -> Vec<Value> {
        let mut all: Vec<&RolloutRecord> = self.rollouts.values().collect();
        all.sort_by_key(|r| Reverse(r.seq));
        all.into_iter().map(|r| self.rollout_row(r)).collect()
    }

    fn rollout_row(&self, r: &RolloutRecord) -> Value {
        let mut counts = Counts::new();
        let mut total = 0;
        for (_, _, s, _) in self.members(r) {
            total += 1;
            count(&mut counts, s);
        }
        json!({
            "name": r.spec.name, "phase": r.phase, "reason": r.reason,
            "firmware": r.spec.firmware, "secret": r.spec.secret, "keys": r.patch.keys().collect::<Vec<_>>(),
            "wave": (r.wave + 1).min(r.wave_sizes.len()), "waves": r.wave_sizes.len(),
            "devices": total, "counts": counts,
            "author": r.author, "created": rfc3339(r.created_at),
        })
    }

    /// `rollout status`: per wave and in total, the gate's figures, and
    /// what it waits for.
    pub fn rollout_status(&self, name: &str, now: Millis) -> Result<Value, Rejection> {
        let r = self
            .rollouts
            .get(name)
            .ok_or_else(|| Rejection::new("not_found", format!("no rollout named {name:?}")))?;
        let mut waves: Vec<(usize, Counts)> = vec![(0, Counts::new()); r.wave_sizes.len()];
        let mut totals = Counts::new();
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut queued_later = 0;
        let mut queued_now = 0;
        let starts_from = r.starts_from(now);
        for (dev, e, s, why) in self.members(r) {
            if let Some((n, c)) = waves.get_mut(e.wave) {
                *n += 1;
                count(c, s);
            }
            count(&mut totals, s);
            if matches!(s, DeviceStatus::Failed | DeviceStatus::RollbackFailed)
                && failures.len() < 10
            {
                let why = why.unwrap_or_default();
                failures.push((dev.id.clone(), short_reason(&why).to_owned()));
            }
            let later = starts_from.is_some_and(|base| r.start_at(base, &dev.id) > now);
            if s == DeviceStatus::Queued && e.wave <= r.wave && later {
                queued_later += 1;
            } else if s == DeviceStatus::Queued && e.wave <= r.wave {
                queued_now += 1;
            }
        }
        let health = self.health(r);
        let succeeded_now = waves
            .get(r.wave)
            .map(|(n, c)| {
                let ok = c.get("succeeded").copied().unwrap_or(0)
                    + c.get("skipped").copied().unwrap_or(0);
                (ok, *n)
            })
            .unwrap_or((0, 0));
        let waiting = match r.phase {
            Phase::Paused | Phase::Halted | Phase::Aborted => r.reason.clone(),
            Phase::Completed => String::new(),
            Phase::Active => {
                let closed = r.spec.window.as_ref().filter(|w| !w.is_open(now));
                if let Some(w) = closed {
                    format!(
                        "maintenance window {} is closed; it opens at {}",
                        w.describe(),
                        rfc3339(w.next_open(now))
                    )
                } else if let Some(from) = r.soak_from {
                    let left = (from + r.spec.health.soak_s * 1000).saturating_sub(now);
                    format!(
                        "wave {}: soaking, {} s left; {} of {} updated devices unhealthy",
                        r.wave + 1,
                        left.div_ceil(1000),
                        health.unhealthy.len(),
                        health.checked
                    )
                } else if let Some(rate) = r.spec.rate.as_ref().filter(|_| queued_now > 0) {
                    let ok = totals.get("succeeded").copied().unwrap_or(0) as u64;
                    format!(
                        "wave {}: starting at most {} devices a minute ({queued_now} queued)",
                        r.wave + 1,
                        rate.per_minute_after(ok)
                    )
                } else if queued_later > 0 {
                    format!(
                        "wave {}: {queued_later} devices start later (jitter)",
                        r.wave + 1
                    )
                } else {
                    let (ok, n) = succeeded_now;
                    format!(
                        "wave {}: {ok} of {n} succeeded, {}% needed",
                        r.wave + 1,
                        r.spec.success_threshold
                    )
                }
            }
        };
        let wave_rows: Vec<Value> = waves
            .into_iter()
            .enumerate()
            .map(|(i, (n, c))| {
                let state = if i < r.wave {
                    "done"
                } else if i == r.wave && r.phase.is_live() {
                    "in progress"
                } else if r.phase.is_live() {
                    "pending"
                } else {
                    "ended"
                };
                json!({"wave": i + 1, "planned": r.wave_sizes[i], "devices": n, "state": state, "counts": c})
            })
            .collect();
        let abort: Vec<Value> = r
            .spec
            .abort
            .iter()
            .map(|rule| json!({"failure": rule.failure, "threshold_percent": rule.threshold_percent, "min_executed": rule.min_executed}))
            .collect();
        let mut row = self.rollout_row(r);
        if let Some(obj) = row.as_object_mut() {
            obj.insert("waiting".into(), json!(waiting));
            obj.insert("wave_rows".into(), json!(wave_rows));
            obj.insert("totals".into(), json!(totals));
            obj.insert(
                "health".into(),
                json!({
                    "soak_s": r.spec.health.soak_s,
                    "rules": r.spec.health.rules.iter().map(|x| x.describe()).collect::<Vec<_>>(),
                    "checked": health.checked,
                    "unhealthy": health.unhealthy.len(),
                    "examples": health.unhealthy.iter().take(5).map(|(id, why)| json!({"id": id, "why": why})).collect::<Vec<_>>(),
                }),
            );
            obj.insert("abort".into(), json!(abort));
            obj.insert("rollback".into(), json!(r.spec.rollback));
            obj.insert(
                "failures".into(),
                json!(failures
                    .iter()
                    .map(|(id, why)| json!({"id": id, "reason": why}))
                    .collect::<Vec<_>>()),
            );
            obj.insert(
                "window".into(),
                json!(r.spec.window.as_ref().map(|w| w.describe())),
            );
            obj.insert(
                "history".into(),
                json!(r
                    .history
                    .iter()
                    .map(|h| json!({"at": rfc3339(h.at), "who": h.who, "what": h.what}))
                    .collect::<Vec<_>>()),
            );
        }
        Ok(row)
    }

    /// `rollout devices`: one row per device, optionally of one status.
    pub fn rollout_devices(
        &self,
        name: &str,
        status: Option<&str>,
        offset: usize,
        limit: usize,
    ) -> Result<Value, Rejection> {
        let r = self
            .rollouts
            .get(name)
            .ok_or_else(|| Rejection::new("not_found", format!("no rollout named {name:?}")))?;
        let want = match status {
            Some(s) => Some(DeviceStatus::parse(s).ok_or_else(|| {
                Rejection::new(
                    "bad_schema",
                    format!(
                        "unknown status {s:?}; one of {}",
                        crate::rollout::ALL_STATUSES
                            .map(DeviceStatus::as_str)
                            .join(", ")
                    ),
                )
            })?),
            None => None,
        };
        let mut rows: Vec<Member> = self
            .members(r)
            .filter(|(_, _, s, _)| want.is_none_or(|w| w == *s))
            .collect();
        rows.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        let total = rows.len();
        let page: Vec<Value> = rows
            .into_iter()
            .skip(offset)
            .take(limit)
            .map(|(d, e, s, why)| {
                json!({
                    "id": d.id, "wave": e.wave + 1, "status": s.as_str(),
                    "reason": why.as_deref().map(short_reason),
                    "zone": d.attrs.labels.get(&r.spec.spread_by),
                    FIRMWARE_KEY: d.reported.get(FIRMWARE_KEY),
                    "online": d.online,
                })
            })
            .collect();
        Ok(json!({"total": total, "offset": offset, "devices": page}))
    }
}

#[derive(Default)]
struct Health {
    checked: usize,
    unhealthy: Vec<(String, String)>,
}

impl Health {
    fn failing(&self, gate: &crate::rollout::HealthGate) -> bool {
        self.checked > 0
            && (self.unhealthy.len() as f64) * 100.0
                > gate.max_unhealthy_percent * self.checked as f64
    }
}

/// What an abort makes of a device's part: queued ones are cancelled;
/// with `rollback`, every device the rollout reached gets back what it had
/// (those already at the target before keep it), without, the devices not
/// yet done are cancelled. `None`: it stays as it is.
fn aborted_stage(entry: &DeviceRollout, status: DeviceStatus, rollback: bool) -> Option<Stage> {
    match entry.stage {
        Stage::Queued => Some(Stage::Cancelled),
        Stage::Admitted if entry.skipped => None,
        Stage::Admitted if rollback => Some(Stage::RolledBack),
        Stage::Admitted if status.is_success() => None,
        Stage::Admitted => Some(Stage::Cancelled),
        Stage::RolledBack | Stage::Cancelled => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet_of(devices: Vec<DeviceRecord>) -> Fleet {
        Fleet::for_tests(devices)
    }

    fn lamps(n: usize) -> Vec<DeviceRecord> {
        (0..n)
            .map(|i| {
                let mut d = DeviceRecord::new(&format!("d{i:02}"));
                d.attrs.class = Some("lamp".into());
                d.attrs
                    .labels
                    .insert("zone".into(), ["n", "s"][i % 2].to_owned());
                d.reported = json!({"dimming": 0})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
                    .into();
                d.reported_version = 1;
                d.online = true;
                d
            })
            .collect()
    }

    fn report(fleet: &mut Fleet, id: &str, dimming: u64, version: u64, now: Millis) {
        let body = json!({"version": version, "state": {"dimming": dimming}}).to_string();
        fleet.on_device_message(id, "reported", body.as_bytes(), now);
        fleet.on_device_message(id, "presence", br#"{"online": true}"#, now);
    }

    /// Plans and applies a rollout, as a committed `rollout-create` does.
    fn start(fleet: &mut Fleet, spec: RolloutSpec, now: Millis) {
        let (record, devices) = fleet.plan_rollout(spec, "op", now).expect("planned");
        fleet.apply_rollout(record, devices);
    }

    fn spec(v: Value) -> RolloutSpec {
        serde_json::from_value(v).expect("spec")
    }

    fn admitted(fleet: &Fleet, name: &str) -> Vec<String> {
        let mut ids: Vec<String> = fleet
            .devices
            .values()
            .filter(|d| {
                d.rollouts
                    .get(name)
                    .is_some_and(|e| e.stage == Stage::Admitted)
            })
            .map(|d| d.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// What a restart sees: the records as stored.
    fn restarted(fleet: &Fleet) -> Fleet {
        let devices = fleet.devices.values().map(|d| (**d).clone()).collect();
        let mut again = fleet_of(devices);
        again.restore_rollouts(fleet.rollouts.values().cloned().collect(), Vec::new());
        again
    }

    /// Sharded: the leader plans and gates, each owner admits and ends
    /// its own devices' part; the leader's copies carry the counts.
    #[test]
    fn sharded_owners_run_their_devices_part_and_the_leader_gates_the_waves() {
        const SHARDS: u32 = 4;
        let shard = |id: &str| crate::shard::shard_of(id, SHARDS);
        let sharded = |held: std::collections::BTreeSet<u32>, leading: bool| {
            let mut f = fleet_of(lamps(20));
            f.shard(SHARDS);
            f.hold_shards(held);
            f.leading = leading;
            f
        };
        let mut leader = sharded([0, 1].into(), true);
        let mut other = sharded([2, 3].into(), false);
        let (record, devices) = leader
            .plan_rollout(
                spec(
                    json!({"name": "r", "target": {"class": "lamp"}, "state": {"dimming": 50},
                            "waves": [{"percent": 50}, {"percent": 100}],
                            "success_threshold": 100, "rollback": true}),
                ),
                "op",
                1_000,
            )
            .expect("planned");
        let intents = leader.intents_of(&devices, IntentKind::Enrol("r"), 1_000);
        leader.apply_rollout(record.clone(), Vec::new());
        leader.took_intents(intents.clone());
        other.follow_rollouts(vec![record.clone()], Vec::new());
        other.take_intents(intents.clone(), intents.len() as u64);
        let first_wave = |f: &Fleet, mine: bool| -> Vec<String> {
            let mut ids: Vec<String> = f
                .devices
                .values()
                .filter(|d| d.rollouts.get("r").is_some_and(|e| e.wave == 0))
                .filter(|d| f.owns(&d.id) == mine)
                .map(|d| d.id.clone())
                .collect();
            ids.sort();
            ids
        };
        let (mine, theirs) = (first_wave(&leader, true), first_wave(&other, true));
        assert!(
            !mine.is_empty() && !theirs.is_empty(),
            "{mine:?} {theirs:?}"
        );
        leader.take_dirty();
        other.take_dirty();

        // Each admits its own first wave, and only that.
        leader.step_rollouts(1_000);
        other.step_rollouts(1_000);
        assert_eq!(admitted(&leader, "r"), mine);
        assert_eq!(admitted(&other, "r"), theirs);
        assert!(other.take_dirty().iter().all(|d| shard(&d.id) >= 2));
        assert!(
            other.take_dirty_rollouts().is_empty(),
            "only the leader writes rollouts"
        );

        // They apply it; the leader sees the others' through its copies,
        // and only then moves the wave on.
        for id in &mine {
            report(&mut leader, id, 50, 2, 2_000);
        }
        for id in &theirs {
            report(&mut other, id, 50, 2, 2_000);
        }
        other.step_rollouts(2_000);
        leader.step_rollouts(2_000);
        assert_eq!(
            leader.rollouts["r"].wave, 0,
            "the others' devices not seen yet"
        );
        let copies: Vec<DeviceRecord> = theirs
            .iter()
            .map(|id| (*other.devices[id]).clone())
            .collect();
        leader.follow_devices(copies);
        leader.step_rollouts(3_000);
        assert_eq!(leader.rollouts["r"].wave, 1);
        assert_eq!(leader.take_dirty_rollouts().len(), 1);

        // Aborted by the leader: the others' devices are rolled back by
        // their owner when it reads the record.
        let (aborted, _) = leader
            .control_rollout("r", Control::Abort, "op", "bad batch", 4_000)
            .expect("aborted");
        other.follow_rollouts(vec![aborted], Vec::new());
        other.step_rollouts(4_000);
        for id in &theirs {
            assert_eq!(
                other.devices[id].rollouts["r"].stage,
                Stage::RolledBack,
                "{id}"
            );
            assert_eq!(
                other.devices[id].desired.get("dimming"),
                Some(&json!(0)),
                "{id}"
            );
        }
        assert!(other
            .devices
            .values()
            .filter(|d| other.owns(&d.id))
            .all(|d| d.rollouts["r"].stage != Stage::Queued));
    }

    #[test]
    fn a_restart_goes_on_from_the_stored_wave_without_admitting_anyone_twice() {
        let mut fleet = fleet_of(lamps(10));
        start(
            &mut fleet,
            spec(
                json!({"name": "r", "target": {"class": "lamp"}, "state": {"dimming": 50},
                            "waves": [{"count": 2}, {"percent": 100}], "success_threshold": 100}),
            ),
            1_000,
        );
        fleet.step_rollouts(1_000);
        let canary = admitted(&fleet, "r");
        assert_eq!(canary.len(), 2, "{canary:?}");
        assert_eq!(
            fleet.devices["d00"].desired.get("dimming"),
            Some(&json!(50)),
            "the first in its zone starts"
        );
        // The canary takes the change; the wave moves on.
        for id in &canary {
            report(&mut fleet, id, 50, 2, 2_000);
        }
        fleet.step_rollouts(2_000);
        assert_eq!(fleet.rollouts["r"].wave, 1);
        let at: Vec<Millis> = canary
            .iter()
            .map(|id| fleet.devices[id].rollouts["r"].admitted_at)
            .collect();

        // Crash: the records as stored; the next step goes on with wave 2.
        let mut fleet = restarted(&fleet);
        assert_eq!(fleet.rollouts["r"].wave, 1);
        fleet.step_rollouts(3_000);
        assert_eq!(admitted(&fleet, "r").len(), 10);
        let again: Vec<Millis> = canary
            .iter()
            .map(|id| fleet.devices[id].rollouts["r"].admitted_at)
            .collect();
        assert_eq!(at, again, "the canary is not admitted again");
        for id in canary {
            assert!(fleet.devices[&id].is_converged(), "{id}");
        }
    }

    #[test]
    fn a_contractors_rollout_takes_no_joiner_outside_its_scope() {
        let mut devices = lamps(4);
        for d in &mut devices {
            d.attrs.owner = Some("lighting-co".into());
        }
        let mut fleet = fleet_of(devices);
        fleet.apply_org(crate::orgs::OrgRecord {
            name: "lighting-co".into(),
            scope: Some(cityplane_proto::messages::Selector {
                owner: Some("lighting-co".into()),
                ..Default::default()
            }),
            ..crate::orgs::OrgRecord::city()
        });
        let (mut record, devices) = fleet
            .plan_rollout(
                spec(
                    json!({"name": "r", "target": {"class": "lamp"}, "state": {"dimming": 50},
                            "waves": [{"percent": 100}]}),
                ),
                "lc",
                1_000,
            )
            .expect("planned");
        record.org = Some("lighting-co".into());
        fleet.apply_rollout(record, devices);
        // A lamp of someone else's joins the target while the rollout runs.
        let mut other = DeviceRecord::new("x01");
        other.attrs.class = Some("lamp".into());
        other.attrs.owner = Some("camera-int".into());
        fleet.apply_registry(vec![Arc::new(other)]);
        fleet.step_rollouts(2_000);
        assert_eq!(admitted(&fleet, "r").len(), 4);
        assert!(!fleet.devices["x01"].rollouts.contains_key("r"));
        assert_eq!(fleet.devices["x01"].desired.get("dimming"), None);
    }

    #[test]
    fn an_abort_with_rollback_puts_back_what_each_device_had() {
        let mut fleet = fleet_of(lamps(4));
        report(&mut fleet, "d01", 7, 2, 500);
        start(
            &mut fleet,
            spec(
                json!({"name": "r", "target": {"class": "lamp"}, "state": {"dimming": 50},
                            "waves": [{"count": 2}, {"percent": 100}], "rollback": true}),
            ),
            1_000,
        );
        fleet.step_rollouts(1_000);
        let canary = admitted(&fleet, "r");
        let (record, devices) = fleet
            .control_rollout("r", Control::Abort, "op", "testing", 2_000)
            .expect("abort");
        fleet.apply_rollout_change(record, devices);
        assert_eq!(fleet.rollouts["r"].phase, Phase::Aborted);
        for id in &canary {
            let before = if id == "d01" { 7 } else { 0 };
            assert_eq!(
                fleet.devices[id].desired.get("dimming"),
                Some(&json!(before)),
                "{id}"
            );
        }
        let cancelled = fleet
            .devices
            .values()
            .filter(|d| d.rollouts["r"].stage == Stage::Cancelled)
            .count();
        assert_eq!(cancelled, 2);
        // An ended rollout takes no more orders.
        assert!(fleet
            .control_rollout("r", Control::Resume, "op", "", 3_000)
            .is_err());
    }
    /// Counts the secrets it makes: `s<n>` for the nth, fingerprinted so.
    struct CountingMinter(std::sync::atomic::AtomicU64);

    impl crate::secrets::Minter for CountingMinter {
        fn mint(
            &self,
            _device: &str,
            _name: &str,
            _keep: Option<&str>,
            now: Millis,
        ) -> Result<cityplane_proto::secrets::SecretRef, String> {
            let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(cityplane_proto::secrets::SecretRef {
                fingerprint: format!("s{n}"),
                rotated_at: rfc3339(now),
            })
        }
    }

    #[test]
    fn a_secret_rotation_gives_each_device_its_own_secret_and_a_rollback_the_old_one() {
        let mut fleet = fleet_of(lamps(4));
        // d01 holds a secret already; without a minter nobody is admitted.
        let old = json!({"secret": {"fingerprint": "old", "rotated_at": "t"}});
        let body = json!({"version": 2, "state": {"admin_password": old}}).to_string();
        fleet.on_device_message("d01", "reported", body.as_bytes(), 500);
        let rotation = json!({"name": "rot", "target": {"class": "lamp"}, "secret": "admin_password",
                              "waves": [{"count": 2}, {"percent": 100}], "rollback": true});
        start(&mut fleet, spec(rotation), 1_000);
        fleet.step_rollouts(1_000);
        assert!(
            admitted(&fleet, "rot").is_empty(),
            "admitted without secrets"
        );
        fleet.secrets = Some(Arc::new(CountingMinter(0.into())));
        fleet.step_rollouts(1_100);
        let canary = admitted(&fleet, "rot");
        assert_eq!(canary.len(), 2);
        let fingerprints: BTreeSet<String> = canary
            .iter()
            .map(|id| {
                let v = &fleet.devices[id].desired["admin_password"];
                let r = cityplane_proto::secrets::SecretRef::of(v).expect("a reference");
                r.fingerprint
            })
            .collect();
        assert_eq!(fingerprints.len(), 2, "one secret per device");
        // Nothing but references: neither the spec's placeholder nor a value.
        for d in fleet.devices.values() {
            assert!(d.desired.get("admin_password").is_none_or(|v| {
                cityplane_proto::secrets::SecretRef::of(v)
                    .is_some_and(|r| r.fingerprint.starts_with('s'))
            }));
        }
        let (record, devices) = fleet
            .control_rollout("rot", Control::Abort, "op", "testing", 2_000)
            .expect("abort");
        fleet.apply_rollout_change(record, devices);
        for id in &canary {
            let before = if id == "d01" {
                old.clone()
            } else {
                Value::Null
            };
            let now = fleet.devices[id].desired.get("admin_password").cloned();
            assert_eq!(now.unwrap_or(Value::Null), before, "{id}");
        }
    }

    fn at(utc: &str) -> Millis {
        let t: jiff::Timestamp = utc.parse().expect("timestamp");
        t.as_millisecond() as Millis
    }

    #[test]
    fn a_window_defers_starts_and_jitter_spreads_them_from_its_opening() {
        let mut fleet = fleet_of(lamps(40));
        // Created at 23:30 in Paris; the window opens at 01:00 (00:00 UTC).
        let created = at("2026-11-30T22:30:00Z");
        start(
            &mut fleet,
            spec(
                json!({"name": "night", "target": {"class": "lamp"}, "state": {"dimming": 5},
                            "waves": [{"percent": 100}], "jitter_s": 600,
                            "window": {"start": "01:00", "end": "04:00", "tz": "Europe/Paris"}}),
            ),
            created,
        );
        fleet.step_rollouts(at("2026-11-30T23:59:59Z"));
        assert!(admitted(&fleet, "night").is_empty());
        let waiting = fleet
            .rollout_status("night", at("2026-11-30T23:59:59Z"))
            .expect("status");
        assert!(
            waiting["waiting"].as_str().is_some_and(
                |w| w.contains("01:00–04:00 Europe/Paris") && w.contains("2026-12-01T00:00:00")
            ),
            "{waiting}"
        );
        // Spread over the 10 minutes after the opening, not at once.
        fleet.step_rollouts(at("2026-12-01T00:00:01Z"));
        let early = admitted(&fleet, "night").len();
        fleet.step_rollouts(at("2026-12-01T00:05:00Z"));
        let half = admitted(&fleet, "night").len();
        fleet.step_rollouts(at("2026-12-01T00:10:00Z"));
        let all = admitted(&fleet, "night").len();
        assert!(
            early < 5 && (10..=30).contains(&half) && all == 40,
            "{early} {half} {all}"
        );
        for id in admitted(&fleet, "night") {
            let admitted_at = fleet.devices[&id].rollouts["night"].admitted_at;
            assert!(admitted_at >= at("2026-12-01T00:00:00Z"), "{id}");
        }
    }

    #[test]
    fn a_rate_starts_so_many_devices_a_minute_and_grows_with_successes() {
        let mut fleet = fleet_of(lamps(40));
        start(
            &mut fleet,
            spec(
                json!({"name": "r", "target": {"class": "lamp"}, "state": {"dimming": 9},
                            "waves": [{"percent": 100}],
                            "rate": {"per_minute": 4, "increase_factor": 2, "every_succeeded": 4}}),
            ),
            0,
        );
        fleet.step_rollouts(1_000);
        fleet.step_rollouts(2_000);
        let first = admitted(&fleet, "r");
        assert_eq!(first.len(), 4, "4 a minute: {first:?}");
        // They succeed: the rate doubles, but the minute still counts them.
        for (i, id) in first.iter().enumerate() {
            report(&mut fleet, id, 9, 2 + i as u64, 3_000);
        }
        fleet.step_rollouts(4_000);
        assert_eq!(
            admitted(&fleet, "r").len(),
            8,
            "8 a minute after 4 succeeded"
        );
        fleet.step_rollouts(62_000);
        assert_eq!(
            admitted(&fleet, "r").len(),
            12,
            "the first 4 left the minute"
        );
    }
}
