//! Operator writes about devices when controllers are sharded
//! (docs/DESIGN-SHARDING.md, "Operator writes"). Each device's record has
//! one writer, its shard's owner, so the leading controller does not write
//! it: it commits an [`IntentRecord`] (the registry fields `register` or
//! `label` computed for each device), and every controller applies the
//! intents it reads to the devices it owns whose record has not passed
//! them yet (`DeviceRecord::intent_seq`). The number travels with the
//! record, so an intent is applied once per device, whoever owns it when.
//! The records of other controllers' devices (copies) show the intents
//! at once, without passing them, so queries and the next write see what
//! was answered.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::model::{Intent, IntentRecord};

/// How long a passed intent is kept before it is pruned, by default: the
/// owner of a device marks it passed before its commit of the record is
/// durable, and copies show it until they read that record (they lag by
/// seconds).
pub const DEFAULT_INTENT_KEEP: Millis = 60_000;

/// Which intents [`Fleet::intents_of`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntentKind<'a> {
    /// `register`, `label`: the registry fields.
    Registry,
    /// `quarantine` (the mark) or `release` (the serial pinned).
    Incident,
    /// `rollout-create`: each device's wave in this rollout.
    Enrol(&'a str),
}

/// Shows `what` on a copy of another controller's device (its owner
/// writes the rest: rollouts cancelled, commands logged). Returns whether
/// what the broker enforces changed.
fn show(dev: &mut DeviceRecord, what: &Intent) -> bool {
    match what {
        Intent::Registry {
            attrs,
            registered_by,
            ..
        } => {
            dev.attrs = attrs.clone();
            dev.registered_by = registered_by.clone();
            false
        }
        Intent::Quarantine { mark } => {
            let changed = dev.quarantine.is_none();
            if changed {
                dev.quarantine = Some(mark.clone());
                dev.online = false;
            }
            changed
        }
        Intent::Release { serial } => {
            let changed = dev.quarantine.is_some();
            if changed {
                dev.quarantine = None;
                dev.cert_pin = vec![serial.clone()];
                dev.failed = None;
            }
            changed
        }
        Intent::Enrol { rollout, wave } => {
            // Queued only: a device already in it keeps its part.
            dev.rollouts
                .entry(rollout.clone())
                .or_insert_with(|| crate::rollout::DeviceRollout::queued(*wave));
            false
        }
    }
}

/// Largest intent written, in bytes of JSON: under the store's record
/// limit with room to spare.
const INTENT_BYTES: usize = crate::store::MAX_RECORD / 2;

impl Fleet {
    /// The intents that apply `records` (made by
    /// [`Fleet::registered_records`], [`Fleet::labelled_records`],
    /// [`Fleet::quarantined_records`] or [`Fleet::released_records`]),
    /// numbered after the last one given and cut to fit the store's
    /// record limit. Only the leading controller makes them.
    pub fn intents_of(
        &mut self,
        records: &[Arc<DeviceRecord>],
        what: IntentKind<'_>,
        now: Millis,
    ) -> Vec<IntentRecord> {
        let mut out: Vec<IntentRecord> = Vec::new();
        let mut bytes = 0;
        for r in records {
            let intent = match what {
                IntentKind::Registry => Intent::Registry {
                    attrs: r.attrs.clone(),
                    registered_by: r.registered_by.clone(),
                    registered_at: r.registered_at,
                },
                IntentKind::Incident => match (&r.quarantine, r.cert_pin.first()) {
                    (Some(mark), _) => Intent::Quarantine { mark: mark.clone() },
                    (None, Some(serial)) => Intent::Release {
                        serial: serial.clone(),
                    },
                    (None, None) => continue,
                },
                IntentKind::Enrol(rollout) => match r.rollouts.get(rollout) {
                    Some(entry) => Intent::Enrol {
                        rollout: rollout.to_owned(),
                        wave: entry.wave,
                    },
                    None => continue,
                },
            };
            let size = r.id.len() + serde_json::to_vec(&intent).map_or(0, |v| v.len()) + 8;
            if out.is_empty() || bytes + size > INTENT_BYTES {
                self.intent_last += 1;
                out.push(IntentRecord {
                    seq: self.intent_last,
                    at: now,
                    devices: BTreeMap::new(),
                });
                bytes = 0;
            }
            bytes += size;
            if let Some(last) = out.last_mut() {
                last.devices.insert(r.id.clone(), intent);
            }
        }
        out
    }

    /// Takes what the store keeps: every intent (in order, pruned ones
    /// gone) and the highest number given. Applies them where they have
    /// not been. Returns (devices new, devices whose attributes changed).
    pub fn take_intents(&mut self, stored: Vec<IntentRecord>, last: u64) -> (usize, usize) {
        self.intent_last = self
            .intent_last
            .max(last)
            .max(stored.iter().map(|i| i.seq).max().unwrap_or(0));
        // Those numbered after `last` were committed after the store was
        // read (this controller's own, as leader): still to come.
        self.intents.retain(|seq, _| *seq > last);
        self.intents
            .extend(stored.into_iter().map(|i| (i.seq, Arc::new(i))));
        self.reapply_intents()
    }

    /// Takes intents this controller just committed (the leader): applied
    /// now, as [`Fleet::take_intents`] would once it reads them.
    pub fn took_intents(&mut self, committed: Vec<IntentRecord>) -> (usize, usize) {
        let committed: Vec<Arc<IntentRecord>> = committed.into_iter().map(Arc::new).collect();
        for intent in &committed {
            self.intent_last = self.intent_last.max(intent.seq);
            self.intents.insert(intent.seq, intent.clone());
        }
        self.apply_intents(committed)
    }

    pub(super) fn reapply_intents(&mut self) -> (usize, usize) {
        let intents: Vec<Arc<IntentRecord>> = self.intents.values().cloned().collect();
        self.apply_intents(intents)
    }

    /// [`Fleet::apply_intent`] each, in order; the counts added up.
    fn apply_intents(&mut self, intents: Vec<Arc<IntentRecord>>) -> (usize, usize) {
        intents.iter().fold((0, 0), |(new, updated), intent| {
            let (n, u) = self.apply_intent(intent);
            (new + n, updated + u)
        })
    }

    /// One intent: written to the devices this controller owns that have
    /// not passed it; shown on the others' copies.
    fn apply_intent(&mut self, intent: &IntentRecord) -> (usize, usize) {
        let (mut new, mut updated) = (0, 0);
        let (mut registry, mut incidents) = (Vec::new(), Vec::new());
        for (id, what) in &intent.devices {
            let current = self.devices.get(id);
            if current.is_some_and(|d| d.intent_seq >= intent.seq) {
                continue;
            }
            if !self.owns(id) {
                match self.devices.get_mut(id).map(Arc::make_mut) {
                    Some(dev) => {
                        let before = dev.attrs.clone();
                        if show(dev, what) {
                            self.pins_dirty = true;
                        }
                        updated += usize::from(dev.attrs != before);
                    }
                    None => {
                        if let Intent::Registry { registered_at, .. } = what {
                            let mut rec = DeviceRecord::new(id);
                            rec.registered_at = *registered_at;
                            show(&mut rec, what);
                            self.devices.insert(id.clone(), Arc::new(rec));
                            new += 1;
                        }
                    }
                }
                continue;
            }
            match what {
                Intent::Registry {
                    attrs,
                    registered_by,
                    registered_at,
                } => {
                    let mut rec = DeviceRecord::new(id);
                    rec.attrs = attrs.clone();
                    rec.registered_by = registered_by.clone();
                    rec.registered_at = *registered_at;
                    rec.intent_seq = intent.seq;
                    registry.push(Arc::new(rec));
                    continue;
                }
                Intent::Quarantine { mark } => {
                    let (records, _already) =
                        self.quarantined_records(std::slice::from_ref(id), mark);
                    incidents.extend(records);
                }
                Intent::Enrol { .. } => {
                    if let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) {
                        show(dev, what);
                    }
                }
                Intent::Release { serial } => {
                    let serials = [(id.clone(), serial.clone())].into();
                    // Not quarantined (any more): nothing to release.
                    incidents.extend(
                        self.released_records(&serials, intent.at)
                            .unwrap_or_default(),
                    );
                }
            }
            // Passed, whatever it changed: the number is written with the
            // record.
            if let Some(dev) = self.devices.get_mut(id) {
                Arc::make_mut(dev).intent_seq = intent.seq;
                self.dirty.insert(id.clone());
            }
        }
        for rec in &mut incidents {
            Arc::make_mut(rec).intent_seq = intent.seq;
        }
        if !incidents.is_empty() {
            // Judged as of the leader's write; the next compliance tick
            // judges again.
            self.apply_incident(incidents, intent.at);
        }
        let (n, u) = self.apply_registry(registry);
        (new + n, updated + u)
    }

    /// Shows on a copy just read from the store the intents its owner
    /// has not applied yet.
    pub(super) fn overlay_intents(&self, record: &mut DeviceRecord) {
        for intent in self.intents.range(record.intent_seq + 1..).map(|(_, i)| i) {
            if let Some(what) = intent.devices.get(&record.id) {
                show(record, what);
            }
        }
    }

    /// The intents every device they name has passed, made at least
    /// `keep` ago (long enough that the owners' records saying so are
    /// durable and copies have read them): the leader prunes them.
    pub fn passed_intents(&self, now: Millis, keep: Millis) -> Vec<u64> {
        self.intents
            .values()
            .filter(|i| i.at + keep <= now)
            .filter(|i| {
                i.devices
                    .keys()
                    .all(|id| self.devices.get(id).is_some_and(|d| d.intent_seq >= i.seq))
            })
            .map(|i| i.seq)
            .collect()
    }

    /// Forgets pruned intents (their commit is durable).
    pub fn pruned_intents(&mut self, pruned: &[u64]) {
        for seq in pruned {
            self.intents.remove(seq);
        }
    }
}
