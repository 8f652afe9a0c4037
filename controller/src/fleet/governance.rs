//! Organisations, the security policy, its exceptions and the fleet's
//! compliance, on the fleet. No I/O: the runtime commits what these
//! produce, and feeds the clock in.
//!
//! - Scope: a document or rollout applies only to devices its author's
//!   organisation sees (checked when a device's desired state is computed,
//!   so a device that leaves a contractor's scope leaves its documents too);
//!   writes reaching outside are refused with the count.
//! - Compliance: every report (and every registry change, policy change and
//!   compliance tick for the time-based rules) evaluates the rules that
//!   apply to the device; a device's record keeps the rules it breaks with
//!   the time each violation started.
//! - Admission: a desired value that would break a rule is refused unless
//!   an unexpired exception covers the rule and the device.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use cityplane_proto::messages::{State, Target};
use cityplane_proto::policy::{Facts, Mode, Outcome, Policy};
use cityplane_proto::topics;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Fleet, Outgoing};
use crate::delta::selects;
use crate::input::Rejection;
use crate::model::{rfc3339, DeviceRecord, Millis, Violation};
use crate::orgs::{Access, OrgRecord, ADMIN_ORG};
use crate::store::StoreError;

/// Samples of compliance over time kept per organisation (the chart);
/// beyond it the older half is thinned.
const HISTORY_KEPT: usize = 2_000;
/// A sample is taken when compliance changed, or at least this often.
const SAMPLE_EVERY_MS: Millis = 60_000;

/// One published version of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub version: u64,
    /// The policy as published (validated JSON).
    pub policy: Value,
    pub published_by: String,
    #[serde(default)]
    pub org: Option<String>,
    pub published_at: Millis,
}

impl PolicyRecord {
    pub fn key(version: u64) -> String {
        format!("policy/{version:016x}")
    }
}

/// A rule waived for some devices until a time: granted by the policy
/// owner, audited, and never open-ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionRecord {
    pub id: String,
    pub rule: String,
    /// `None`: every device the rule applies to.
    pub target: Option<Target>,
    pub reason: String,
    pub granted_by: String,
    #[serde(default)]
    pub org: Option<String>,
    pub granted_at: Millis,
    pub expires_at: Millis,
    #[serde(default)]
    pub revoked: bool,
}

impl ExceptionRecord {
    pub fn key(id: &str) -> String {
        format!("exception/{id}")
    }

    pub fn active(&self, now: Millis) -> bool {
        !self.revoked && now < self.expires_at
    }

    fn covers(&self, rule: &str, d: &DeviceRecord, now: Millis) -> bool {
        self.rule == rule
            && self.active(now)
            && self
                .target
                .as_ref()
                .is_none_or(|t| selects(t, &d.id, &d.attrs))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at: Millis,
    pub total: usize,
    pub compliant: usize,
}

#[derive(Default)]
pub struct Governance {
    pub orgs: BTreeMap<String, OrgRecord>,
    /// The current policy, parsed.
    pub policy: Option<(PolicyRecord, Arc<Policy>)>,
    pub versions: BTreeMap<u64, PolicyRecord>,
    pub exceptions: BTreeMap<String, ExceptionRecord>,
    /// Compliance over time, per organisation (`city`: the whole fleet).
    pub history: HashMap<String, VecDeque<Sample>>,
    /// The retained summaries last published, by topic.
    published: HashMap<String, Value>,
    /// Organisations or the registry changed: the broker's scope table is
    /// stale.
    pub scopes_dirty: bool,
    /// Why enforcement last failed, by rollout name: said once, not every tick.
    pub enforce_errors: HashMap<String, String>,
    /// Compliance samples to store with the next commit (key, JSON or
    /// delete): the auditor's chart survives a restart.
    pending: Vec<(String, Option<Vec<u8>>)>,
}

impl Governance {
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// What the next commit writes. A commit that fails loses these samples
    /// (derived data: the next ones follow), never anything acknowledged.
    pub fn take_pending(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        std::mem::take(&mut self.pending)
    }
}

fn history_key(org: &str, at: Millis) -> String {
    format!("history/{org}/{at:016x}")
}

/// The reported keys these rules read, parsed (a rule's key `a.b` reads
/// `a.b` or `a`, see [`cityplane_proto::policy::lookup`]).
fn reported_for<'r>(
    dev: &DeviceRecord,
    rules: impl Iterator<Item = &'r cityplane_proto::policy::Rule>,
) -> State {
    // Once per device: the rules' selectors are not matched again per key.
    let keys: Vec<&str> = rules.filter_map(|r| r.reported_key()).collect();
    if keys.is_empty() {
        return State::new();
    }
    dev.reported.pick(|k| {
        keys.iter()
            .any(|key| *key == k || key.split_once('.').is_some_and(|(first, _)| first == k))
    })
}

fn facts<'a>(dev: &'a DeviceRecord, reported: &'a State, now: Millis) -> Facts<'a> {
    Facts {
        id: &dev.id,
        attrs: &dev.attrs,
        reported,
        cert_not_after_ms: dev.cert_not_after,
        last_seen_ms: (dev.last_seen > 0).then_some(dev.last_seen),
        now_ms: now,
    }
}

/// How many devices a change would put out of compliance, per rule.
struct Breach {
    rule: String,
    severity: String,
    description: String,
    example: String,
    devices: usize,
}

impl Fleet {
    /// Takes the stored organisations, policy versions and exceptions.
    pub fn load_governance(
        &mut self,
        records: Vec<(String, Vec<u8>)>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let corrupt = |key: &str, reason: String| StoreError::Corrupt {
            tree: "governance",
            key: key.to_owned(),
            reason,
        };
        for (key, bytes) in records {
            let what = key.split('/').next().unwrap_or_default();
            match what {
                "org" => {
                    let org: OrgRecord =
                        serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e.to_string()))?;
                    self.gov.orgs.insert(org.name.clone(), org);
                }
                "policy" => {
                    let rec: PolicyRecord =
                        serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e.to_string()))?;
                    self.gov.versions.insert(rec.version, rec);
                }
                "exception" => {
                    let rec: ExceptionRecord =
                        serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e.to_string()))?;
                    self.gov.exceptions.insert(rec.id.clone(), rec);
                }
                "history" => {
                    let org = key.split('/').nth(1).unwrap_or_default().to_owned();
                    let sample: Sample =
                        serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e.to_string()))?;
                    // Keys sort by time within an organisation.
                    self.gov.history.entry(org).or_default().push_back(sample);
                }
                _ => return Err(corrupt(&key, "unknown kind of record".into())),
            }
        }
        if let Some(rec) = self.gov.versions.values().next_back().cloned() {
            let text = serde_json::to_vec(&rec.policy).unwrap_or_default();
            let parsed = cityplane_proto::policy::parse_policy(&text)
                .map_err(|e| corrupt(&PolicyRecord::key(rec.version), e.to_string()))?;
            self.gov.policy = Some((rec, Arc::new(parsed)));
        }
        self.gov.scopes_dirty = true;
        // Scopes decide which documents and rollouts reach a device.
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        self.recompute_desired(ids);
        self.evaluate_all(now);
        Ok(())
    }

    /// Sharded, not leading: the organisations, policy and exceptions the
    /// leader stored ([`crate::store::Store::governance`]), in place of
    /// those held; the devices this controller owns are judged again.
    pub fn follow_governance(
        &mut self,
        records: Vec<(String, Vec<u8>)>,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.gov.orgs.clear();
        self.gov.versions.clear();
        self.gov.exceptions.clear();
        self.gov.policy = None;
        self.load_governance(records, now)
    }

    /// What the operator behind `who` may do.
    pub fn access(&self, who: &cityplane_proto::Identity) -> Access {
        Access::resolve(&who.id, who.org.as_deref(), &self.gov.orgs)
    }

    /// Whether something owned by `org` (a document, a rollout) may reach
    /// this device.
    pub fn org_sees(&self, org: Option<&str>, d: &DeviceRecord) -> bool {
        match org {
            None | Some(ADMIN_ORG) => true,
            Some(o) => self
                .gov
                .orgs
                .get(o)
                .and_then(|r| r.scope.as_ref())
                .is_some_and(|s| s.matches(&d.id, &d.attrs)),
        }
    }

    /// Each organisation's devices, for the broker's topic rules.
    pub fn scope_table(&self) -> HashMap<String, HashSet<String>> {
        self.gov
            .orgs
            .values()
            .map(|o| {
                let ids = self
                    .devices
                    .values()
                    .filter(|d| self.org_sees(Some(&o.name), d))
                    .map(|d| d.id.clone())
                    .collect();
                (o.name.clone(), ids)
            })
            .collect()
    }

    /// Refuses a target that reaches devices outside the operator's scope,
    /// counting them (a contractor learns how many, not which).
    pub fn check_reach(&self, access: &Access, target: &Target) -> Result<(), Rejection> {
        if access.is_admin() {
            return Ok(());
        }
        check_scope(access, &self.targeted(target))
    }

    /// Is this rule waived for this device now?
    pub fn excepted(&self, rule: &str, d: &DeviceRecord, now: Millis) -> bool {
        !self.gov.exceptions.is_empty()
            && self.gov.exceptions.values().any(|e| e.covers(rule, d, now))
    }

    /// Admission: refuses `state` on `devices` when it would break a rule
    /// of the policy on any of them (an exception covering the rule and the
    /// device lets it through). Says which rule and how many devices.
    pub fn admit_state(
        &self,
        devices: &[&DeviceRecord],
        state: &State,
        now: Millis,
    ) -> Result<(), Rejection> {
        let Some((rec, policy)) = &self.gov.policy else {
            return Ok(());
        };
        let mut breaches: Vec<Breach> = Vec::new();
        for rule in &policy.rules {
            let forbidden: Vec<(String, String)> = state
                .iter()
                .filter_map(|(k, v)| rule.forbids(k, v).map(|why| (k.clone(), why)))
                .collect();
            let Some((_, why)) = forbidden.first() else {
                continue;
            };
            let devices = devices
                .iter()
                .filter(|d| rule.applies_to(&d.id, &d.attrs))
                .filter(|d| !self.excepted(&rule.id, d, now))
                .count();
            if devices > 0 {
                breaches.push(Breach {
                    rule: rule.id.clone(),
                    severity: format!("{:?}", rule.severity).to_lowercase(),
                    description: rule.description.clone(),
                    example: why.clone(),
                    devices,
                });
            }
        }
        let Some(worst) = breaches.iter().max_by_key(|b| b.devices) else {
            return Ok(());
        };
        let others = if breaches.len() > 1 {
            format!(" ({} rules in all)", breaches.len())
        } else {
            String::new()
        };
        Err(Rejection::new(
            "policy_violation",
            format!(
                "policy v{} rule {:?} ({}: {}) forbids this: {}; it would put {} device(s) out of \
                 compliance{others}. The policy owner can grant an expiring exception \
                 (cityplane policy except --rule {} ...)",
                rec.version,
                worst.rule,
                worst.severity,
                worst.description,
                worst.example,
                worst.devices,
                worst.rule
            ),
        ))
    }

    /// Evaluates the policy on one device, noting what changed.
    pub(super) fn evaluate(&mut self, id: &str, now: Millis) {
        self.evaluate_with(id, now, None);
    }

    /// [`Fleet::evaluate`], given the device's reported state already
    /// parsed (a report just taken) instead of parsing the keys it needs.
    pub(super) fn evaluate_with(&mut self, id: &str, now: Millis, parsed: Option<&State>) {
        let Some(dev) = self.devices.get(id).filter(|_| self.owns(id)) else {
            return;
        };
        let mut found = BTreeMap::new();
        if let Some((_, policy)) = &self.gov.policy {
            let applies: Vec<&cityplane_proto::policy::Rule> = policy
                .rules
                .iter()
                .filter(|r| r.applies_to(&dev.id, &dev.attrs))
                .collect();
            let picked;
            let reported = match parsed {
                Some(state) => state,
                None => {
                    picked = reported_for(dev, applies.iter().copied());
                    &picked
                }
            };
            let facts = facts(dev, reported, now);
            for rule in applies {
                if let Outcome::Fail(reason) = rule.evaluate(&facts) {
                    let since = dev.violations.get(&rule.id).map_or(now, |v| v.since);
                    found.insert(rule.id.clone(), Violation { since, reason });
                }
            }
        }
        if found != dev.violations {
            if let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) {
                dev.violations = found;
            }
            self.dirty.insert(id.to_owned());
        }
    }

    /// The rules over time (last seen, certificate expiry) judged again on
    /// every device; the others keep the verdict of the last report or
    /// registry change. Only a verdict that flips changes a record: a
    /// standing violation keeps its first words ("last seen 11 minutes
    /// ago"), as its `since` already says how long it has lasted, so a
    /// silent fleet is not rewritten every tick.
    pub fn evaluate_timed(&mut self, now: Millis) {
        let Some((_, policy)) = self.gov.policy.clone() else {
            return;
        };
        let timed: Vec<&cityplane_proto::policy::Rule> =
            policy.rules.iter().filter(|r| r.is_time_based()).collect();
        if timed.is_empty() {
            return;
        }
        let mut flipped: Vec<(String, String, Option<Violation>)> = Vec::new();
        for dev in self.devices.values().filter(|d| self.owns(&d.id)) {
            let applies: Vec<&cityplane_proto::policy::Rule> = timed
                .iter()
                .copied()
                .filter(|r| r.applies_to(&dev.id, &dev.attrs))
                .collect();
            let reported = reported_for(dev, applies.iter().copied());
            let facts = facts(dev, &reported, now);
            for rule in applies {
                match (rule.evaluate(&facts), dev.violations.contains_key(&rule.id)) {
                    (Outcome::Pass, true) => flipped.push((dev.id.clone(), rule.id.clone(), None)),
                    (Outcome::Fail(reason), false) => flipped.push((
                        dev.id.clone(),
                        rule.id.clone(),
                        Some(Violation { since: now, reason }),
                    )),
                    _ => {}
                }
            }
        }
        for (id, rule, violation) in flipped {
            if let Some(dev) = self.devices.get_mut(&id).map(Arc::make_mut) {
                match violation {
                    Some(v) => dev.violations.insert(rule, v),
                    None => dev.violations.remove(&rule),
                };
                self.dirty.insert(id);
            }
        }
    }

    pub fn evaluate_all(&mut self, now: Millis) {
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        for id in ids {
            self.evaluate(&id, now);
        }
    }

    /// A created or changed organisation (already committed): its scope
    /// decides which devices its documents and rollouts reach. Returns how
    /// many devices it sees.
    pub fn apply_org(&mut self, org: OrgRecord) -> usize {
        let name = org.name.clone();
        self.gov.orgs.insert(name.clone(), org);
        self.gov.scopes_dirty = true;
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        self.recompute_desired(ids);
        self.devices
            .values()
            .filter(|d| self.org_sees(Some(&name), d))
            .count()
    }

    /// Certificate expiry per device, from the PKI's issuance record.
    pub fn set_cert_expiry(&mut self, expiry: &[(String, Millis)]) {
        for (id, at) in expiry {
            if let Some(dev) = self.devices.get(id).filter(|_| self.owns(id)) {
                if dev.cert_not_after != Some(*at) {
                    if let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) {
                        dev.cert_not_after = Some(*at);
                    }
                    self.dirty.insert(id.clone());
                }
            }
        }
    }

    /// Publishes `policy` as the new current version (already committed).
    pub fn apply_policy(&mut self, rec: PolicyRecord, policy: Policy, now: Millis) {
        self.gov.versions.insert(rec.version, rec.clone());
        self.gov.policy = Some((rec, Arc::new(policy)));
        self.evaluate_all(now);
    }

    /// The periodic compliance work: rules over time (last seen,
    /// certificate expiry) evaluated again, a sample of compliance per
    /// organisation, and the retained summaries that changed.
    pub fn compliance_tick(&mut self, now: Millis) -> Vec<Outgoing> {
        self.evaluate_timed(now);
        let mut out = Vec::new();
        let orgs: Vec<Option<String>> = std::iter::once(None)
            .chain(self.gov.orgs.keys().cloned().map(Some))
            .collect();
        for org in orgs {
            let access = Access::resolve(
                "",
                Some(org.as_deref().unwrap_or(ADMIN_ORG)),
                &self.gov.orgs,
            );
            let tally = self.tally(&access, now);
            let key = access.org.clone();
            let history = self.gov.history.entry(key).or_default();
            let changed = history
                .back()
                .is_none_or(|s| s.total != tally.total || s.compliant != tally.compliant);
            if changed
                || history
                    .back()
                    .is_some_and(|s| now >= s.at + SAMPLE_EVERY_MS)
            {
                let sample = Sample {
                    at: now,
                    total: tally.total,
                    compliant: tally.compliant,
                };
                history.push_back(sample);
                self.gov.pending.push((
                    history_key(&access.org, now),
                    serde_json::to_vec(&sample).ok(),
                ));
                if history.len() > HISTORY_KEPT {
                    // Thin the older half (every second sample goes) rather
                    // than drop the oldest: the chart keeps its whole span,
                    // coarser the further back it looks.
                    let half = history.len() / 2;
                    let mut kept = VecDeque::with_capacity(history.len());
                    for (i, s) in history.drain(..).enumerate() {
                        if i < half && i % 2 == 1 {
                            self.gov
                                .pending
                                .push((history_key(&access.org, s.at), None));
                        } else {
                            kept.push_back(s);
                        }
                    }
                    *history = kept;
                }
            }
            let topic = match &org {
                None => topics::FLEET_COMPLIANCE.to_owned(),
                Some(o) => topics::compliance(o),
            };
            let summary = json!({
                "policy_version": self.gov.policy.as_ref().map(|(r, _)| r.version),
                "org": access.org,
                "total": tally.total,
                "compliant": tally.compliant,
                "compliant_pct": pct(tally.compliant, tally.total),
                "violations_by_rule": tally.by_rule.iter().map(|(r, n)| (r.clone(), json!(n.0))).collect::<serde_json::Map<_, _>>(),
            });
            if self.gov.published.get(&topic) != Some(&summary) {
                let mut body = summary.clone();
                body["evaluated_at"] = json!(rfc3339(now));
                out.push(Outgoing {
                    topic: topic.clone(),
                    payload: serde_json::to_vec(&body).unwrap_or_default(),
                    retain: true,
                    unanswered: false,
                });
                self.gov.published.insert(topic, summary);
            }
        }
        out
    }

    fn tally(&self, access: &Access, now: Millis) -> Tally {
        let mut t = Tally::default();
        for d in self
            .devices
            .values()
            .filter(|d| access.sees(&d.id, &d.attrs))
        {
            t.total += 1;
            let mut broken = 0;
            for rule in d.violations.keys() {
                let entry = t.by_rule.entry(rule.clone()).or_default();
                if self.excepted(rule, d, now) {
                    entry.1 += 1;
                } else {
                    entry.0 += 1;
                    broken += 1;
                }
            }
            if broken == 0 && d.quarantine.is_none() {
                t.compliant += 1;
            }
        }
        t
    }

    /// `compliance`: the report for one operator's scope.
    pub fn compliance_report(&self, access: &Access, limit: usize, now: Millis) -> Value {
        let policy = self.gov.policy.as_ref();
        // One pass over the scope; lookups by hash, keys borrowed: at
        // 100,000 devices breaking 16 rules each this is the whole cost.
        let rules: HashMap<&str, &cityplane_proto::policy::Rule> = policy
            .map(|(_, p)| p.rules.iter().map(|r| (r.id.as_str(), r)).collect())
            .unwrap_or_default();
        let default_mode = policy.map_or(Mode::Report, |(_, p)| p.mode);
        let any_exception = !self.gov.exceptions.is_empty();
        let excepted = |rule: &str, d: &DeviceRecord| any_exception && self.excepted(rule, d, now);
        let mut tally = Tally::default();
        let mut by_rule: HashMap<&str, (usize, usize)> = HashMap::new();
        let mut by: [BTreeMap<&str, (usize, usize)>; 3] = Default::default();
        let mut worst: Vec<(u32, &DeviceRecord)> = Vec::new();
        let mut rows: Vec<Value> = Vec::new();
        let mut violations_total = 0usize;
        let mut excepted_devices = 0usize;
        let mut quarantined: Vec<Value> = Vec::new();
        let mut devices: Vec<&DeviceRecord> = self
            .devices
            .values()
            .map(|d| &**d)
            .filter(|d| access.sees(&d.id, &d.attrs))
            .collect();
        devices.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        for d in &devices {
            tally.total += 1;
            let mut score = 0;
            let mut any_excepted = false;
            for (rule, v) in &d.violations {
                let excepted = excepted(rule, d);
                any_excepted |= excepted;
                let counts = by_rule.entry(rule.as_str()).or_default();
                if excepted {
                    counts.1 += 1;
                } else {
                    counts.0 += 1;
                    score += rules.get(rule.as_str()).map_or(1, |r| r.severity.weight());
                    violations_total += 1;
                }
                if rows.len() < limit {
                    rows.push(json!({
                        "id": d.id, "rule": rule,
                        "severity": rules.get(rule.as_str()).map(|r| r.severity),
                        "since": rfc3339(v.since), "reason": v.reason, "excepted": excepted,
                    }));
                }
            }
            // A quarantined device is cut off for a reason: it is never
            // counted compliant, whatever its last report said.
            if let Some(q) = &d.quarantine {
                quarantined.push(json!({
                    "id": d.id, "incident": q.incident, "since": rfc3339(q.since),
                    "reason": q.reason,
                }));
            }
            let clean = score == 0 && d.quarantine.is_none();
            if clean {
                tally.compliant += 1;
            }
            if any_excepted && score == 0 {
                excepted_devices += 1;
            }
            let keys = [
                d.attrs.class.as_deref().unwrap_or("(none)"),
                d.attrs.labels.get("zone").map_or("(none)", String::as_str),
                d.attrs.owner.as_deref().unwrap_or("(none)"),
            ];
            for (map, key) in by.iter_mut().zip(keys) {
                let e = map.entry(key).or_default();
                e.0 += 1;
                if clean {
                    e.1 += 1;
                }
            }
            if score > 0 {
                worst.push((score, d));
            }
        }
        worst.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.id.cmp(&b.1.id)));
        let worst: Vec<Value> = worst
            .into_iter()
            .take(10)
            .map(|(score, d)| {
                json!({
                    "id": d.id, "class": d.attrs.class, "zone": d.attrs.labels.get("zone"),
                    "owner": d.attrs.owner, "score": score,
                    "violations": d.violations.iter().map(|(rule, v)| json!({
                        "rule": rule, "severity": rules.get(rule.as_str()).map(|r| r.severity),
                        "since": rfc3339(v.since), "reason": v.reason,
                        "excepted": self.excepted(rule, d, now),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let group = |name: &str, map: &BTreeMap<&str, (usize, usize)>| -> Vec<Value> {
            map.iter()
                .map(|(k, (total, ok))| {
                    json!({name: k, "total": total, "compliant": ok, "compliant_pct": pct(*ok, *total)})
                })
                .collect()
        };
        let by_rule: Vec<Value> = rules
            .values()
            .map(|r| {
                let (n, ex) = by_rule.get(r.id.as_str()).copied().unwrap_or_default();
                json!({
                    "rule": r.id, "severity": r.severity, "description": r.description,
                    "mode": r.effective_mode(default_mode), "violations": n, "excepted": ex,
                    "remediation": r.remediation.is_some(),
                })
            })
            .collect();
        let history: Vec<Value> = self
            .gov
            .history
            .get(&access.org)
            .into_iter()
            .flatten()
            .map(|s| {
                json!({"at": rfc3339(s.at), "total": s.total, "compliant": s.compliant,
                       "compliant_pct": pct(s.compliant, s.total)})
            })
            .collect();
        json!({
            "policy_version": policy.map(|(r, _)| r.version),
            "evaluated_at": rfc3339(now),
            "org": access.org,
            "scope": match &access.scope {
                None => "the whole fleet".to_owned(),
                Some(s) => serde_json::to_string(s).unwrap_or_default(),
            },
            "total": tally.total,
            "compliant": tally.compliant,
            "compliant_pct": pct(tally.compliant, tally.total),
            "excepted": excepted_devices,
            "quarantined": quarantined.len(),
            "quarantined_devices": quarantined.into_iter().take(limit).collect::<Vec<_>>(),
            "by_rule": by_rule,
            "by_class": group("class", &by[0]),
            "by_zone": group("zone", &by[1]),
            "by_owner": group("owner", &by[2]),
            "worst": worst,
            "violations": rows,
            "violations_total": violations_total,
            "history": history,
        })
    }

    /// Enforcement: for each rule in `enforce` mode with a remediation and
    /// devices breaking it, a rollout spec that remediates them (in waves,
    /// with the usual gates and abort), unless one is still running for
    /// that rule. Never fleet-wide: it lists the devices that break the rule.
    pub fn remediation_specs(&self, now: Millis) -> Vec<serde_json::Value> {
        let Some((_, policy)) = &self.gov.policy else {
            return Vec::new();
        };
        let mut specs = Vec::new();
        // A certificate expiry rule's remediation is built in: a rotation
        // (each device makes a new key; the server signs its CSR), when
        // this server holds the CA.
        let rotation = cityplane_proto::policy::Remediation::default();
        for rule in &policy.rules {
            let expiry = rule.check.certificate_valid_days.is_some();
            let Some(fix) = rule.remediation.as_ref().or(expiry.then_some(&rotation)) else {
                continue;
            };
            let rotate = expiry && fix.set.is_none() && fix.firmware.is_none();
            if rule.effective_mode(policy.mode) != Mode::Enforce
                || (rotate && self.cannot_rotate().is_some())
            {
                continue;
            }
            let prefix = remediation_prefix(&rule.id);
            if self
                .rollouts
                .iter()
                .any(|(n, r)| n.starts_with(&prefix) && r.phase.is_live())
            {
                continue;
            }
            let mut ids: Vec<&str> = self
                .devices
                .values()
                .filter(|d| !d.revoked && d.violations.contains_key(&rule.id))
                .filter(|d| d.quarantine.is_none() && !self.excepted(&rule.id, d, now))
                .map(|d| d.id.as_str())
                .collect();
            if ids.is_empty() {
                continue;
            }
            ids.sort_unstable();
            // A rollout record lists its target: keep it well under the
            // store's record limit; the rest go in the next one.
            ids.truncate(5_000);
            let n = self
                .rollouts
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .count()
                + 1;
            // Staged by default: 10 %, then up to half, then the rest.
            let shares = match &fix.waves {
                None => vec![10.0, 40.0, 50.0],
                Some(_) => fix
                    .wave_percents()
                    .unwrap_or_else(|_| vec![10.0, 40.0, 50.0]),
            };
            let waves: Vec<Value> = shares.iter().map(|p| json!({"percent": p})).collect();
            let mut spec = json!({
                "name": format!("{prefix}{n}"),
                "target": {"ids": ids},
                "waves": waves,
            });
            if let Some(set) = &fix.set {
                spec["state"] = Value::Object(set.clone());
            }
            if rotate {
                let name = format!("{prefix}{n}");
                spec["state"] = json!({
                    cityplane_proto::messages::CertificateState::KEY: super::rotation_state(&name)
                });
                // A device that cannot rotate is rolled back on its own.
                spec["success_threshold"] = json!(90.0);
            }
            if let Some(fw) = &fix.firmware {
                spec["firmware"] = json!(fw);
            }
            specs.push(spec);
        }
        specs
    }
}

/// Refuses when any of `devices` lies outside the operator's scope: a
/// count, never ids (a contractor learns nothing of other parties).
pub fn check_scope(access: &Access, devices: &[&DeviceRecord]) -> Result<(), Rejection> {
    let outside = devices
        .iter()
        .filter(|d| !access.sees(&d.id, &d.attrs))
        .count();
    if outside > 0 {
        return Err(Rejection::new(
            "out_of_scope",
            format!(
                "the target reaches {outside} device(s) outside organisation {:?}'s scope; \
                 narrow the selector to your own devices",
                access.org
            ),
        ));
    }
    Ok(())
}

/// Rollouts that remediate `rule` are named `fix-<rule>-<n>` (an id, so
/// the rule's id is cut to fit).
pub fn remediation_prefix(rule: &str) -> String {
    let cut: String = rule.chars().take(48).collect();
    format!("fix-{cut}-")
}

#[derive(Default)]
struct Tally {
    total: usize,
    compliant: usize,
    /// Rule → (violations, excepted).
    by_rule: BTreeMap<String, (usize, usize)>,
}

fn pct(part: usize, total: usize) -> f64 {
    if total == 0 {
        return 100.0;
    }
    (part as f64 * 1000.0 / total as f64).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet_with(policy: Value, n: usize) -> Fleet {
        let devices = (0..n)
            .map(|i| {
                let mut d = DeviceRecord::new(&format!("d{i}"));
                d.attrs.class = Some("lamp".into());
                d
            })
            .collect();
        let mut fleet = Fleet::for_tests(devices);
        let text = serde_json::to_vec(&policy).expect("json");
        let parsed = cityplane_proto::policy::parse_policy(&text).expect("policy");
        let rec = PolicyRecord {
            version: 1,
            policy,
            published_by: "op".into(),
            org: None,
            published_at: 0,
        };
        fleet.apply_policy(rec, parsed, 0);
        fleet
    }

    fn report(fleet: &mut Fleet, id: &str, version: u64, state: Value, now: Millis) {
        let body = json!({"version": version, "state": state}).to_string();
        fleet.on_device_message(id, "reported", body.as_bytes(), now);
    }

    const MIN: Millis = 60_000;

    /// Sharded: an owner follows the organisations and policy the leader
    /// stored and judges its own devices only; a later version replaces
    /// the one it held.
    #[test]
    fn a_sharded_owner_follows_the_leaders_policy_for_its_own_devices() {
        let record = |version: u64, at_most: u64| {
            let rec = PolicyRecord {
                version,
                policy: json!({"rules": [{"id": "dim", "description": "dim", "severity": "low",
                                          "selector": {"all": true},
                                          "check": {"reported": "dimming", "at_most": at_most}}]}),
                published_by: "op".into(),
                org: None,
                published_at: 0,
            };
            (
                PolicyRecord::key(version),
                serde_json::to_vec(&rec).expect("json"),
            )
        };
        let devices = (0..20)
            .map(|i| {
                let mut d = DeviceRecord::new(&format!("d{i}"));
                d.reported = json!({"dimming": 30})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
                    .into();
                d.reported_version = 1;
                d
            })
            .collect();
        let mut owner = Fleet::for_tests(devices);
        owner.shard(4);
        owner.hold_shards([0, 1].into());
        owner.take_dirty();
        owner
            .follow_governance(vec![record(1, 10)], 0)
            .expect("follows");
        let written: Vec<String> = owner.take_dirty().iter().map(|d| d.id.clone()).collect();
        let mine: Vec<String> = (0..20)
            .map(|i| format!("d{i}"))
            .filter(|id| owner.owns(id))
            .collect();
        assert!(!mine.is_empty() && mine.len() < 20);
        let mut sorted = written.clone();
        sorted.sort();
        let mut expected = mine.clone();
        expected.sort();
        assert_eq!(
            sorted, expected,
            "its own devices judged and written, no copy"
        );
        assert!(mine
            .iter()
            .all(|id| owner.devices[id].violations.contains_key("dim")));
        // Version 2 allows 50: the violations end.
        owner
            .follow_governance(vec![record(1, 10), record(2, 50)], 0)
            .expect("follows");
        assert_eq!(owner.gov.policy.as_ref().map(|(r, _)| r.version), Some(2));
        assert!(mine
            .iter()
            .all(|id| owner.devices[id].violations.is_empty()));
    }

    #[test]
    fn silence_is_caught_by_the_tick_and_a_violation_keeps_its_start() {
        let mut fleet = fleet_with(
            json!({"rules": [
                {"id": "seen", "description": "seen lately", "severity": "medium",
                 "selector": {"all": true}, "check": {"seen_within_minutes": 10}},
                {"id": "dim", "description": "dim", "severity": "low",
                 "selector": {"class": "lamp"}, "check": {"reported": "dimming", "at_most": 50}}
            ]}),
            2,
        );
        // Never reported: unknown is not compliant.
        assert!(fleet.devices["d0"].violations.contains_key("dim"));
        report(&mut fleet, "d0", 1, json!({"dimming": 10}), 99 * MIN);
        assert!(fleet.devices["d0"].violations.is_empty());
        report(&mut fleet, "d0", 2, json!({"dimming": 80}), 100 * MIN);
        report(&mut fleet, "d1", 1, json!({"dimming": 10}), 100 * MIN);
        let v = &fleet.devices["d0"].violations;
        assert_eq!(v.keys().collect::<Vec<_>>(), ["dim"], "{v:?}");
        assert_eq!(v["dim"].since, 100 * MIN);
        assert!(fleet.devices["d1"].violations.is_empty());
        // Time passes without a word from either: only the tick can tell.
        fleet.compliance_tick(105 * MIN);
        assert!(!fleet.devices["d1"].violations.contains_key("seen"));
        fleet.compliance_tick(111 * MIN);
        assert!(fleet.devices["d1"].violations.contains_key("seen"));
        let v = &fleet.devices["d0"].violations;
        assert_eq!(
            v["dim"].since,
            100 * MIN,
            "the tick keeps what a report said"
        );
        assert_eq!(v["seen"].since, 111 * MIN);
        // d0 speaks again, still too bright: the violation keeps its start.
        report(&mut fleet, "d0", 3, json!({"dimming": 90}), 112 * MIN);
        let v = &fleet.devices["d0"].violations;
        assert_eq!(v.keys().collect::<Vec<_>>(), ["dim"]);
        assert_eq!(v["dim"].since, 100 * MIN);
        report(&mut fleet, "d0", 4, json!({"dimming": 40}), 113 * MIN);
        assert!(fleet.devices["d0"].violations.is_empty());
    }

    #[test]
    fn a_full_history_is_thinned_keeping_its_span_and_the_store_follows() {
        let mut fleet = fleet_with(
            json!({"rules": [{"id": "dim", "description": "dim", "severity": "low",
                              "selector": {"all": true},
                              "check": {"reported": "dimming", "at_most": 50}}]}),
            1,
        );
        let mut stored = std::collections::BTreeSet::new();
        for i in 0..2_500u64 {
            fleet.compliance_tick(i * MIN);
            for (k, v) in fleet.gov.take_pending() {
                match v {
                    Some(_) => stored.insert(k),
                    None => stored.remove(&k),
                };
            }
        }
        let h = &fleet.gov.history[ADMIN_ORG];
        assert!(h.len() <= HISTORY_KEPT, "{}", h.len());
        assert_eq!(h.front().map(|s| s.at), Some(0), "the first sample stays");
        assert_eq!(h.back().map(|s| s.at), Some(2_499 * MIN));
        assert_eq!(
            stored.len(),
            h.len(),
            "the store holds exactly what is kept"
        );
    }

    #[test]
    fn an_expiring_certificate_is_remediated_by_a_rotation_when_the_server_can_sign_and_confirm() {
        const DAY: Millis = 86_400_000;
        let now = 1_000 * DAY;
        let mut fleet = fleet_with(
            json!({"mode": "enforce", "rules": [{"id": "cert-30d", "severity": "high", "description": "renew in time",
                   "selector": {"all": true}, "check": {"certificate_valid_days": 30}}]}),
            2,
        );
        fleet.set_cert_expiry(&[
            ("d0".into(), now + 10 * DAY),
            ("d1".into(), now + 100 * DAY),
        ]);
        fleet.compliance_tick(now);
        assert!(fleet.devices["d0"].violations.contains_key("cert-30d"));
        assert!(!fleet.devices["d1"].violations.contains_key("cert-30d"));
        assert!(
            fleet.remediation_specs(now).is_empty(),
            "without the CA the server cannot rotate"
        );
        fleet.can_sign = true;
        fleet.sees_session_serials = false;
        assert!(
            fleet.remediation_specs(now).is_empty(),
            "on a broker that does not say which certificate a device uses, a rotation \
             could never be confirmed"
        );
        fleet.sees_session_serials = true;
        let specs = fleet.remediation_specs(now);
        assert_eq!(specs.len(), 1, "{specs:?}");
        assert_eq!(specs[0]["target"], json!({"ids": ["d0"]}));
        assert_eq!(
            specs[0]["state"],
            json!({"certificate": {"rotation": "fix-cert-30d-1"}})
        );
    }
}
