//! The operator protocol on `fleet/desired/` and `fleet/ops/`: documents,
//! queries, and registry writes (committed and audited before answered).

use super::event_loop::commit;
use super::firmware::{publish_chunk, releases, Uploads};
use super::*;
use crate::fleet::{Control, IntentKind};
use crate::orgs::{Access, Right};
use crate::rollout::RolloutSpec;
use cityplane_proto::messages::{CertificateState, Response};

/// Like every body, a JSON object only (see `cityplane_proto::messages`).
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct Query {
    /// Accepted so `deny_unknown_fields` lets it through; read leniently elsewhere.
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    selector: Option<Selector>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    offset: Option<usize>,
    /// `dry-run`: the document an `apply` would send.
    #[serde(default)]
    document: Option<Value>,
    /// `rollout-devices`: only devices with this status.
    #[serde(default)]
    status: Option<String>,
    /// `get-policy`: this version (default: the current one).
    #[serde(default)]
    version: Option<u64>,
    /// `audit`: only entries by this operator id.
    #[serde(default)]
    who: Option<String>,
    /// `audit`: only entries of this organisation.
    #[serde(default)]
    org: Option<String>,
    /// `audit`: only this action (`apply`, `rollout-create`, …).
    #[serde(default)]
    action: Option<String>,
    /// `audit`: only entries about this device (named, or among the
    /// devices an incident action touched).
    #[serde(default)]
    device: Option<String>,
    /// `audit`: only entries at or after this time (RFC 3339).
    #[serde(default)]
    since: Option<String>,
    /// `audit`: only entries before this time (RFC 3339).
    #[serde(default)]
    until: Option<String>,
    /// `audit-export`: entries after this sequence.
    #[serde(default)]
    after: Option<u64>,
}

/// `register`: a provisioning manifest (or part of one).
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RegisterRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    devices: Vec<Registration>,
}

/// `label`: these ids, or the devices a selector picks, get `change`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct LabelRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    selector: Option<Selector>,
    change: LabelChange,
}

/// `delete-document`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct DeleteRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    name: String,
    #[serde(default)]
    if_generation: Option<u64>,
}

/// `rollout-pause`, `rollout-resume`, `rollout-abort`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RolloutControl {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    name: String,
    #[serde(default)]
    reason: String,
}

/// `cert-rotate`: a certificate rotation rollout.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct RotateRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    #[serde(default)]
    name: Option<String>,
    target: Target,
    /// Only devices whose certificate expires within this many days.
    #[serde(default)]
    before_days: Option<u32>,
    /// As a rollout's `waves`.
    #[serde(default)]
    waves: Option<Value>,
    #[serde(default)]
    success_threshold: Option<f64>,
}

cityplane_proto::object_only!(
    RotateRequest,
    Query,
    RegisterRequest,
    LabelRequest,
    DeleteRequest,
    RolloutControl
);

/// Verbs on `fleet/ops/` that change state: committed before answered, and
/// audited (refusals too).
pub(super) const WRITE_VERBS: [&str; 17] = [
    "dashboard-login",
    "register",
    "label",
    "delete-document",
    "rollout-create",
    "rollout-pause",
    "rollout-resume",
    "rollout-abort",
    "publish-firmware",
    "org-create",
    "org-grant",
    "policy-apply",
    "exception-grant",
    "exception-revoke",
    "quarantine",
    "release",
    "cert-rotate",
];

/// What the operator protocol keeps between requests, apart from the
/// fleet: firmware uploads in progress, and the dashboard's sign-in table
/// (`None`: no dashboard, `dashboard-login` is refused).
pub(super) struct OperatorSide {
    pub(super) uploads: Uploads,
    pub(super) sign_ins: Option<Arc<crate::signin::SignIns>>,
    /// On a shared store, which controller acts (`status`'s `controller`):
    /// the lease's holder and generation.
    pub(super) acting: Option<Value>,
    /// Sharded: the store's shard count and who holds which shards.
    pub(super) shards: Option<Value>,
    /// Sharded: the counters of every live controller added up (each
    /// counts only its own shards' messages), as of the last round.
    pub(super) fleet_counters: Option<crate::fleet::Counters>,
}

/// Longest class, owner, label key or value the registry takes.
const MAX_ATTRIBUTE: usize = 128;

fn check_attribute(what: &str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() || value.len() > MAX_ATTRIBUTE || value.chars().any(char::is_control) {
        return Err(Rejection::new(
            "bad_attribute",
            format!(
                "{what} {value:?} must be 1 to {MAX_ATTRIBUTE} bytes without control characters"
            ),
        ));
    }
    Ok(())
}

fn check_attributes(a: &Attributes) -> Result<(), Rejection> {
    for c in a.class.iter() {
        check_attribute("class", c)?;
    }
    for o in a.owner.iter() {
        check_attribute("owner", o)?;
    }
    for (k, v) in &a.labels {
        check_attribute("label key", k)?;
        check_attribute("label value", v)?;
    }
    Ok(())
}

/// Commits the device records an operator write made (`register`,
/// `label`: the registry; `quarantine`, `release`: an incident), with its
/// audit line, then applies them. Sharded, the leader writes no device's
/// record: it commits them as intents, which each device's owner applies
/// (`fleet/intents.rs`), and shows them on its copies at once (the
/// broker's pins follow). `with` is the rest of the commit (the audit
/// line, a rollout's record). Returns (devices new, devices whose
/// attributes changed).
pub(super) async fn write_devices(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    records: Vec<Arc<crate::model::DeviceRecord>>,
    kind: IntentKind<'_>,
    with: Changes,
    now: Millis,
) -> Result<(usize, usize), Rejection> {
    if fleet.owner.is_none() {
        let changes = Changes {
            devices: records.clone(),
            ..with
        };
        commit_write(store, changes).await?;
        return Ok(match kind {
            IntentKind::Registry => fleet.apply_registry(records),
            IntentKind::Incident => {
                fleet.apply_incident(records, now);
                (0, 0)
            }
            IntentKind::Enrol(name) => {
                fleet.adopt_entries(name, records);
                (0, 0)
            }
        });
    }
    let intents = fleet.intents_of(&records, kind, now);
    let changes = Changes {
        intents: intents.clone(),
        ..with
    };
    commit_write(store, changes).await?;
    Ok(fleet.took_intents(intents))
}

/// Whether a request on `topic` (below `fleet/by/<operator>/`) changes
/// anything: a document, or one of [`WRITE_VERBS`].
pub(super) fn is_write(topic: &str) -> bool {
    topics::desired_name(topic).is_some()
        || topics::ops_verb(topic).is_some_and(|v| WRITE_VERBS.contains(&v))
}

/// The refusal of a write the broker delivered a second time. The first
/// delivery may already have been carried out or refused, and answered
/// (its acknowledgement was lost with the connection, or the session
/// moved to a controller that took over): doing it now could apply a
/// write the operator was told was refused, or one they gave up on. So
/// it is refused, saying so; asking again is safe. Writes are idempotent
/// for an operator who asks again after reading the fleet: `get` shows
/// what the first delivery did.
pub(super) fn redelivered() -> Rejection {
    Rejection::new(
        "redelivered",
        "the broker delivered this request again (the controller's connection or the acting \
         controller changed while it was in flight); it was not carried out now, and may or \
         may not have been before: check with `get` and ask again"
            .to_owned(),
    )
}

/// Refuses a write before looking at it ([`redelivered`], [`expired`]),
/// audited like any refusal.
pub(super) async fn refuse_unread(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    msg: &OperatorMessage,
    refusal: Rejection,
    now: Millis,
) -> Vec<Outgoing> {
    let (verb, name, refusal, answer) = refusal_answer(msg, refusal);
    audit_refusal(fleet, store, &msg.from.id, verb, name, &refusal, now).await;
    vec![answer]
}

/// A write refused before it was looked at: the audit's verb and name,
/// the refusal, and the answer to the operator.
pub(super) fn refusal_answer(
    msg: &OperatorMessage,
    refusal: Rejection,
) -> (&str, &str, Rejection, Outgoing) {
    let (verb, name) = match topics::desired_name(&msg.topic) {
        Some(name) => ("apply", name),
        None => (topics::ops_verb(&msg.topic).unwrap_or_default(), ""),
    };
    let rid = fleet::request_id_of(&msg.payload)
        .unwrap_or_else(|| if name.is_empty() { verb } else { name }.to_owned());
    // "redelivered": delivered again by the broker; "expired": taken up
    // after its sender stopped waiting.
    tracing::warn!(operator = %msg.from.id, topic = %msg.topic, request_id = %rid, code = %refusal.code, "an operator's write refused unread: not carried out");
    let answer = fleet::response_to(&msg.from.id, &refusal.response(rid));
    (verb, name, refusal, answer)
}

/// How far the controller's clock may run ahead of an operator's before
/// a request counts as expired that was not.
pub(super) const CLOCK_SKEW: Millis = 60_000;

/// A write's `expires_at` (RFC 3339; the CLI sets it to when it stops
/// waiting for the answer) has passed, by more than [`CLOCK_SKEW`], when
/// the controller takes it up: the refusal. A request can wait that long
/// in an external broker's queue while no controller reads it; carried
/// out then, it would change the fleet long after its operator was told
/// it timed out (and may have asked again, or given up on it). A request
/// without the field is not judged; one whose field is not a time is
/// refused.
pub(super) fn expired(payload: &[u8], now: Millis) -> Option<Rejection> {
    #[derive(Deserialize)]
    struct Envelope {
        #[serde(default)]
        expires_at: Option<Value>,
    }
    // A body that does not parse is refused by its schema later.
    let at = serde_json::from_slice::<Envelope>(payload)
        .ok()?
        .expires_at?;
    let parsed = at.as_str().and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    let Some(parsed) = parsed else {
        return Some(Rejection::new(
            "bad_schema",
            format!("expires_at: {at} is not an RFC 3339 time"),
        ));
    };
    let deadline = (parsed.unix_timestamp_nanos() / 1_000_000).max(0) as u128;
    if u128::from(now) <= deadline + u128::from(CLOCK_SKEW) {
        return None;
    }
    Some(Rejection::new(
        "expired",
        format!(
            "this request expired at {} and reached the controller at {} (its clock): it was \
             not carried out. Its sender had stopped waiting; check with `get` and ask again \
             (if the clocks disagree, set the operator's and the controller's by NTP)",
            at.as_str().unwrap_or_default(),
            crate::model::rfc3339(now)
        ),
    ))
}

/// Just an operator write's audit line, for [`write_devices`].
pub(super) fn audited(audit: crate::model::AuditEntry) -> Changes {
    Changes {
        audit: vec![audit],
        ..Default::default()
    }
}

/// Commits an operator write; a failure becomes the operator's refusal.
pub(super) async fn commit_write(store: &Arc<Store>, changes: Changes) -> Result<(), Rejection> {
    let (changes, result) = commit(store, changes).await;
    result.map_err(|e| {
        tracing::error!(error = %e, disk_full = e.is_disk_full(), unavailable = e.is_unavailable(), "could not store an operator write");
        // The refusal's audit line waits for the next commit that works.
        store.defer_audit(changes.audit.into_iter().map(|a| crate::model::AuditEntry {
            result: "rejected (storage_unavailable)".to_owned(),
            ..a
        }));
        storage_rejection(&e)
    })
}

fn storage_rejection(e: &StoreError) -> Rejection {
    let reason = if e.is_disk_full() {
        "the controller's data disk is full (no space left on device): \
         the write was not stored; free space on the server and retry"
            .to_owned()
    } else if e.is_unavailable() {
        format!(
            "the controller's database is unavailable, the write was not stored; \
             retry once it is back ({e})"
        )
    } else {
        format!("the controller could not store the write: {e}")
    };
    Rejection::new("storage_unavailable", reason)
}

/// `register`, `label`, `delete-document`: validated, committed with their
/// audit line, then applied in memory.
async fn operator_write(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    side: &mut OperatorSide,
    access: &Access,
    verb: &str,
    payload: &[u8],
    now: Millis,
) -> Result<Value, Rejection> {
    let who = access.operator.as_str();
    match verb {
        "dashboard-login" => {
            // Reading is the least a dashboard shows: an operator of an
            // unknown organisation gets no link at all.
            access.require(Right::Read, "sign in to the dashboard")?;
            input::parse::<Query>(payload, fleet.limits)?;
            let sign_ins = side.sign_ins.as_deref().ok_or_else(|| {
                Rejection::new(
                    "dashboard_off",
                    "this server runs no dashboard (cityplane serve --dashboard 127.0.0.1:8080)",
                )
            })?;
            let identity = cityplane_proto::Identity {
                id: access.operator.clone(),
                role: cityplane_proto::Role::Operator,
                org: Some(access.org.clone()),
            };
            let token = sign_ins
                .issue(&identity, now)
                .map_err(|e| Rejection::new("unavailable", format!("no sign-in link: {e}")))?;
            // The audit line names who signed in, never the token.
            let audit = fleet.audit_entry(
                who,
                "dashboard-login",
                "",
                &format!(
                    "accepted, a sign-in link valid {} s",
                    sign_ins.ttl_ms() / 1000
                ),
                now,
            );
            commit_write(
                store,
                Changes {
                    audit: vec![audit],
                    ..Default::default()
                },
            )
            .await?;
            tracing::info!(operator = who, org = %access.org, "dashboard sign-in link issued");
            Ok(json!({
                "url": format!("{}/login?token={token}", sign_ins.base_url()),
                "expires_in_s": sign_ins.ttl_ms() / 1000,
                "operator": access.operator, "org": access.org,
            }))
        }
        "publish-firmware" => {
            access.require(Right::Rollout, "publish firmware")?;
            publish_chunk(fleet, store, &mut side.uploads, who, payload, now).await
        }
        "org-create" | "org-grant" | "policy-apply" | "exception-grant" | "exception-revoke" => {
            super::governance::write(fleet, store, access, verb, payload, now).await
        }
        "cert-rotate" => {
            access.require(Right::Rollout, "rotate certificates")?;
            let req = input::parse::<RotateRequest>(payload, fleet.limits)?;
            if let Target::Selector(sel) = &req.target {
                if sel.is_empty() {
                    return Err(Rejection::new(
                        "bad_target",
                        r#"empty selector; select the devices, e.g. {"class": "camera"} or {"all": true}"#,
                    ));
                }
            }
            let mut extra = serde_json::Map::new();
            if let Some(w) = req.waves {
                extra.insert("waves".into(), w);
            }
            if let Some(t) = req.success_threshold {
                extra.insert("success_threshold".into(), json!(t));
            }
            let spec = fleet.rotation_spec(
                req.name,
                &req.target,
                req.before_days,
                |d| access.sees(&d.id, &d.attrs),
                extra,
                now,
            )?;
            let spec = input::parse::<RolloutSpec>(spec.to_string().as_bytes(), fleet.limits)?;
            create_rollout(fleet, store, access, spec, now).await
        }
        "quarantine" | "release" => {
            super::incidents::write(fleet, store, access, verb, payload, now).await
        }
        "rollout-create" => {
            access.require(Right::Rollout, "run rollouts")?;
            let spec = input::parse::<RolloutSpec>(payload, fleet.limits)?;
            create_rollout(fleet, store, access, spec, now).await
        }
        "rollout-pause" | "rollout-resume" | "rollout-abort" => {
            access.require(Right::Rollout, "control rollouts")?;
            let req = input::parse::<RolloutControl>(payload, fleet.limits)?;
            if !fleet
                .rollouts
                .get(&req.name)
                .is_some_and(|r| access.owns(r.org.as_deref()))
            {
                return Err(Rejection::new(
                    "not_found",
                    format!("no rollout named {:?}", req.name),
                ));
            }
            let control =
                Control::parse(verb).ok_or_else(|| Rejection::new("unknown_verb", verb))?;
            let (record, mut devices) =
                fleet.control_rollout(&req.name, control, who, &req.reason, now)?;
            if fleet.owner.is_some() {
                // Sharded, the owners end their devices' part of an
                // aborted rollout when they read its record.
                devices.clear();
            }
            let phase = record.phase;
            let audit = fleet.audit_entry(
                who,
                verb,
                &req.name,
                &format!("accepted, now {phase:?}"),
                now,
            );
            let changes = Changes {
                devices: devices.clone(),
                rollouts: vec![record.clone()],
                audit: vec![audit],
                ..Default::default()
            };
            commit_write(store, changes).await?;
            fleet.apply_rollout_change(record, devices);
            fleet.step_rollouts(now);
            tracing::info!(operator = who, rollout = %req.name, ?phase, "rollout {verb}");
            Ok(json!({"name": req.name, "phase": phase}))
        }
        "register" => {
            access.require(Right::Write, "register devices")?;
            let req = input::parse::<RegisterRequest>(payload, fleet.limits)?;
            for r in &req.devices {
                cityplane_proto::validate_id(&r.id)
                    .map_err(|e| Rejection::new("bad_id", format!("{:?}: {e}", r.id)))?;
                check_attributes(&r.attributes())?;
            }
            let records = fleet.registered_records(&req.devices, who, Overwrite::Always, now);
            check_registry_reach(fleet, access, &records)?;
            let audit = fleet.audit_entry(
                who,
                "register",
                &format!("{} devices", req.devices.len()),
                &format!("accepted, {} records written", records.len()),
                now,
            );
            let (new, updated) = write_devices(
                fleet,
                store,
                records,
                IntentKind::Registry,
                audited(audit),
                now,
            )
            .await?;
            tracing::info!(operator = who, new, updated, "devices registered");
            Ok(json!({"registered": new, "updated": updated, "total": fleet.devices.len()}))
        }
        "label" => {
            access.require(Right::Write, "label devices")?;
            let req = input::parse::<LabelRequest>(payload, fleet.limits)?;
            if req.change.is_empty() {
                return Err(Rejection::new(
                    "bad_schema",
                    "the change sets and removes nothing",
                ));
            }
            let probe = Attributes {
                class: req.change.class.clone().filter(|c| !c.is_empty()),
                owner: req.change.owner.clone().filter(|o| !o.is_empty()),
                labels: req.change.set.clone(),
            };
            check_attributes(&probe)?;
            let ids: Vec<String> = match (&req.selector, req.ids.is_empty()) {
                (Some(sel), true) if !sel.is_empty() => fleet
                    .targeted(&Target::Selector(sel.clone()))
                    .into_iter()
                    .filter(|d| access.sees(&d.id, &d.attrs))
                    .map(|d| d.id.clone())
                    .collect(),
                (None, false) => {
                    // Outside the scope is the same as unknown: a
                    // contractor learns nothing of other parties' devices.
                    if let Some(missing) = req.ids.iter().find(|id| {
                        !fleet
                            .devices
                            .get(*id)
                            .is_some_and(|d| access.sees(&d.id, &d.attrs))
                    }) {
                        return Err(Rejection::new(
                            "not_found",
                            format!("no device {missing:?} is registered"),
                        ));
                    }
                    req.ids.clone()
                }
                _ => {
                    return Err(Rejection::new(
                        "bad_target",
                        "label needs either \"ids\" or a non-empty \"selector\"",
                    ))
                }
            };
            let records = fleet.labelled_records(&ids, &req.change);
            check_registry_reach(fleet, access, &records)?;
            let audit = fleet.audit_entry(
                who,
                "label",
                &format!("{} devices", ids.len()),
                &format!("accepted, {} changed", records.len()),
                now,
            );
            let (_, changed) = write_devices(
                fleet,
                store,
                records,
                IntentKind::Registry,
                audited(audit),
                now,
            )
            .await?;
            Ok(json!({"matched": ids.len(), "changed": changed}))
        }
        "delete-document" => {
            access.require(Right::Write, "delete documents")?;
            let req = input::parse::<DeleteRequest>(payload, fleet.limits)?;
            let doc = fleet
                .docs
                .get(&req.name)
                .filter(|d| access.owns(d.org.as_deref()))
                .ok_or_else(|| {
                    Rejection::new(
                        "not_found",
                        format!("no desired document named {:?}", req.name),
                    )
                })?;
            if let Some(want) = req.if_generation {
                if want != doc.generation {
                    return Err(Rejection::new(
                        "conflict",
                        format!(
                            "if_generation is {want} but the stored generation of {:?} is {}",
                            req.name, doc.generation
                        ),
                    ));
                }
            }
            let previous = doc.clone();
            let audit = fleet.audit_entry(
                who,
                "delete",
                &req.name,
                &format!("deleted generation {}", previous.generation),
                now,
            );
            let changes = Changes {
                deleted_docs: vec![req.name.clone()],
                audit: vec![audit],
                ..Default::default()
            };
            if let Err(r) = commit_write(store, changes).await {
                // The failed commit may have reached the disk anyway.
                store.defer_restore_doc(&req.name, Some(previous));
                return Err(r);
            }
            let (old, changed) = fleet
                .delete_doc(&req.name)
                .ok_or_else(|| Rejection::new("not_found", "deleted meanwhile"))?;
            tracing::info!(operator = who, name = %old.name, devices_changed = changed, "desired document deleted");
            Ok(json!({"name": old.name, "generation": old.generation, "devices_changed": changed}))
        }
        other => Err(Rejection::new(
            "unknown_verb",
            format!("{other:?} is not a write"),
        )),
    }
}

/// A scoped organisation's registry write may touch only devices in its
/// scope and must leave them there (a contractor cannot take a device
/// over by labelling it, nor give one away by accident).
fn check_registry_reach(
    fleet: &Fleet,
    access: &Access,
    records: &[Arc<crate::model::DeviceRecord>],
) -> Result<(), Rejection> {
    if access.is_admin() {
        return Ok(());
    }
    let outside = records
        .iter()
        .filter(|r| {
            let before = fleet
                .devices
                .get(&r.id)
                .is_none_or(|d| access.sees(&d.id, &d.attrs));
            !before || !access.sees(&r.id, &r.attrs)
        })
        .count();
    if outside > 0 {
        return Err(Rejection::new(
            "out_of_scope",
            format!(
                "{outside} device(s) would be outside organisation {:?}'s scope before or after \
                 this change; an organisation registers and labels only its own devices",
                access.org
            ),
        ));
    }
    Ok(())
}

/// `rollout-create`, from an operator or from the policy's enforcement:
/// scope, admission, plan, commit, then the first devices start at once.
pub(super) async fn create_rollout(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    access: &Access,
    mut spec: RolloutSpec,
    now: Millis,
) -> Result<Value, Rejection> {
    // Judged already (`expired`); the stored rollout keeps what it is.
    spec.expires_at = None;
    let who = access.operator.as_str();
    fleet.check_reach(access, &spec.target)?;
    if spec.state.contains_key(CertificateState::KEY) {
        if let Some(why) = fleet.cannot_rotate() {
            return Err(why);
        }
    }
    let (mut record, devices) = fleet.plan_rollout(spec, who, now)?;
    record.org = Some(access.org.clone());
    {
        let targeted: Vec<&crate::model::DeviceRecord> = devices.iter().map(|d| &**d).collect();
        fleet.admit_state(&targeted, &record.patch, now)?;
    }
    let name = record.spec.name.clone();
    let sizes = record.wave_sizes.clone();
    let audit = fleet.audit_entry(
        who,
        "rollout-create",
        &name,
        &format!("accepted, {} devices in waves of {sizes:?}", devices.len()),
        now,
    );
    let with = Changes {
        rollouts: vec![record.clone()],
        audit: vec![audit],
        seq: Some(record.seq),
        ..Default::default()
    };
    let total = devices.len();
    write_devices(fleet, store, devices, IntentKind::Enrol(&name), with, now).await?;
    fleet.apply_rollout(record, Vec::new());
    // The first devices start now, not at the next tick.
    fleet.step_rollouts(now);
    tracing::info!(operator = who, rollout = %name, devices = total, "rollout created");
    Ok(json!({"name": name, "devices": total, "waves": sizes}))
}

/// What a request leaves to do after its answer is on its way: a stored
/// document's effect on every device it targets (30 ms for 10,000 devices
/// here) need not delay the answer, since the answer says only that the
/// document is durable, and desired state is derived from the stored
/// documents after a restart anyway. The loop applies it before it looks
/// at the next event, so nothing reads the fleet in between.
#[must_use = "the document is stored but not yet in force: call apply"]
pub(super) struct Deferred(Option<crate::model::DocRecord>);

impl Deferred {
    pub(super) fn apply(self, fleet: &mut Fleet) {
        if let Some(doc) = self.0 {
            let (name, generation) = (doc.name.clone(), doc.generation);
            let changed = fleet.apply_doc(doc);
            tracing::info!(%name, generation, devices_changed = changed, "desired state in force");
        }
    }
}

/// Operator writes commit immediately (they are rare and must be durable
/// before they are answered); queries are answered from memory.
pub(super) async fn handle_operator(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    side: &mut OperatorSide,
    msg: OperatorMessage,
    now: u64,
) -> (Vec<Outgoing>, Deferred) {
    let access = fleet.access(&msg.from);
    fleet.acting_org = Some(access.org.clone());
    let mut deferred = Deferred(None);
    let out = handle(fleet, store, side, &access, msg, now, &mut deferred).await;
    fleet.acting_org = None;
    (out, deferred)
}

/// Scope, ownership and admission of a document the fleet found valid.
fn govern_doc(
    fleet: &Fleet,
    access: &Access,
    doc: &mut crate::model::DocRecord,
    now: Millis,
) -> Result<(), Rejection> {
    access.require(Right::Write, "write desired state")?;
    if let Some(old) = fleet.docs.get(&doc.name) {
        if !access.owns(old.org.as_deref()) {
            return Err(Rejection::new(
                "forbidden",
                format!(
                    "document {:?} belongs to another organisation; pick another name",
                    doc.name
                ),
            ));
        }
    }
    fleet.check_reach(access, &doc.target)?;
    let devices = fleet.targeted(&doc.target);
    fleet.admit_state(&devices, &doc.state, now)?;
    doc.org = Some(access.org.clone());
    Ok(())
}

async fn handle(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    side: &mut OperatorSide,
    access: &Access,
    msg: OperatorMessage,
    now: u64,
    deferred: &mut Deferred,
) -> Vec<Outgoing> {
    let who = msg.from.id.clone();
    if let Some(name) = topics::desired_name(&msg.topic) {
        let name = name.to_owned();
        let (response, result) = fleet.on_desired(&who, &msg.topic, &msg.payload, now);
        let (response, result) = match result {
            Ok(mut doc) => match govern_doc(fleet, access, &mut doc, now) {
                Ok(()) => (response, Ok(doc)),
                Err(r) => {
                    tracing::warn!(operator = %who, %r, "desired state refused");
                    let rid = fleet::request_id_of(&msg.payload).unwrap_or(name.clone());
                    (fleet::response_to(&who, &r.response(rid)), Err(r))
                }
            },
            Err(r) => (response, Err(r)),
        };
        match result {
            Ok(doc) => {
                let audit = fleet.audit_entry(
                    &who,
                    "apply",
                    &doc.name,
                    &format!("accepted generation {}", doc.generation),
                    now,
                );
                let changes = fleet.doc_changes(&doc, audit.clone());
                let (_, result) = commit(store, changes).await;
                match result {
                    Ok(()) => {
                        tracing::info!(operator = %who, name = %doc.name, generation = doc.generation, "desired state accepted");
                        deferred.0 = Some(doc);
                        vec![response]
                    }
                    Err(e) => {
                        tracing::error!(error = %e, disk_full = e.is_disk_full(), unavailable = e.is_unavailable(), "could not store desired state");
                        let refusal = storage_rejection(&e);
                        // The failed commit may have reached the disk anyway:
                        // the next commit that succeeds puts back what was.
                        store.defer_restore_doc(&doc.name, fleet.docs.get(&doc.name).cloned());
                        // The refusal is audited (under the entry's sequence)
                        // once a commit succeeds again.
                        store.defer_audit([crate::model::AuditEntry {
                            result: format!("rejected (storage_unavailable): {}", refusal.reason),
                            ..audit
                        }]);
                        let rid = fleet::request_id_of(&msg.payload).unwrap_or(name);
                        vec![fleet::response_to(&who, &refusal.response(rid))]
                    }
                }
            }
            Err(r) => {
                audit_refusal(fleet, store, &who, "apply", &name, &r, now).await;
                vec![response]
            }
        }
    } else if let Some(verb) = topics::ops_verb(&msg.topic) {
        let verb = verb.to_owned();
        let rid = fleet::request_id_of(&msg.payload).unwrap_or_else(|| verb.clone());
        let result = if WRITE_VERBS.contains(&verb.as_str()) {
            let result = operator_write(fleet, store, side, access, &verb, &msg.payload, now).await;
            if let Err(r) = &result {
                if r.code != "storage_unavailable" {
                    audit_refusal(fleet, store, &who, &verb, "", r, now).await;
                }
            }
            result
        } else {
            input::parse::<Query>(&msg.payload, fleet.limits)
                .and_then(|q| answer(fleet, store, access, &verb, q, now))
                .map(|mut result| {
                    if let (Some(acting), "status") = (&side.acting, verb.as_str()) {
                        result["controller"] = acting.clone();
                        if let Some(shards) = &side.shards {
                            result["controller"]["shards"] = shards.clone();
                        }
                        // Only a fleet-wide answer is a fleet's count.
                        if let (Some(all), true) =
                            (&side.fleet_counters, result.get("counters").is_some())
                        {
                            result["controller"]["own_counters"] = result["counters"].clone();
                            result["counters"] = json!(all);
                        }
                    }
                    result
                })
        };
        let response = match result {
            Ok(result) => Response::Ok {
                request_id: rid,
                result,
            },
            Err(r) => {
                tracing::warn!(operator = %who, verb, %r, "operator request refused");
                r.response(rid)
            }
        };
        vec![fleet::response_to(&who, &response)]
    } else {
        Vec::new()
    }
}

/// A refused write is audited like an accepted one.
async fn audit_refusal(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    who: &str,
    verb: &str,
    name: &str,
    r: &Rejection,
    now: Millis,
) {
    let audit = fleet.audit_entry(
        who,
        verb,
        name,
        &format!("rejected ({}): {}", r.code, r.reason),
        now,
    );
    let changes = Changes {
        audit: vec![audit],
        ..Default::default()
    };
    if let (changes, Err(e)) = commit(store, changes).await {
        tracing::error!(error = %e, "could not append to the audit log; written with the next commit that succeeds");
        store.defer_audit(changes.audit);
    }
}

fn answer(
    fleet: &Fleet,
    store: &Arc<Store>,
    access: &Access,
    verb: &str,
    q: Query,
    now: Millis,
) -> Result<Value, Rejection> {
    access.require(Right::Read, "read the fleet")?;
    let name_of = |q: &Query| {
        q.name
            .clone()
            .ok_or_else(|| Rejection::new("bad_schema", format!("{verb} needs \"name\"")))
    };
    // Another organisation's rollout or document is as good as absent.
    let own_rollout = |name: String| -> Result<String, Rejection> {
        if fleet
            .rollouts
            .get(&name)
            .is_some_and(|r| access.owns(r.org.as_deref()))
        {
            Ok(name)
        } else {
            Err(Rejection::new(
                "not_found",
                format!("no rollout named {name:?}"),
            ))
        }
    };
    let own_doc = |name: &str| {
        fleet
            .docs
            .get(name)
            .filter(|d| access.owns(d.org.as_deref()))
            .ok_or_else(|| {
                Rejection::new("not_found", format!("no desired document named {name:?}"))
            })
    };
    let sees = |d: &&crate::model::DeviceRecord| access.sees(&d.id, &d.attrs);
    match verb {
        "get-rollouts" => {
            let rows: Vec<Value> = fleet
                .rollout_rows()
                .into_iter()
                .filter(|row| {
                    row.get("name")
                        .and_then(Value::as_str)
                        .and_then(|n| fleet.rollouts.get(n))
                        .is_some_and(|r| access.owns(r.org.as_deref()))
                })
                .collect();
            Ok(json!({"total": rows.len(), "rollouts": rows}))
        }
        "rollout-status" => fleet.rollout_status(&own_rollout(name_of(&q)?)?, now),
        "rollout-devices" => fleet.rollout_devices(
            &own_rollout(name_of(&q)?)?,
            q.status.as_deref(),
            q.offset.unwrap_or(0),
            q.limit.unwrap_or(500).min(2000),
        ),
        "get-releases" => Ok(releases(fleet)),
        "get-orgs" | "describe-org" | "get-policy" | "get-policy-history" | "get-exceptions"
        | "compliance" => super::governance::query(
            fleet,
            access,
            verb,
            q.name.as_deref(),
            q.version,
            q.limit,
            now,
        ),
        "get-documents" => {
            let docs: Vec<Value> = fleet
                .docs
                .values()
                .filter(|d| access.owns(d.org.as_deref()))
                .map(|d| fleet::document_row(fleet, d))
                .collect();
            Ok(json!({"total": docs.len(), "documents": docs}))
        }
        "describe-document" => {
            let name = q
                .name
                .ok_or_else(|| Rejection::new("bad_schema", "describe-document needs \"name\""))?;
            Ok(fleet::describe_document(fleet, own_doc(&name)?))
        }
        "dry-run" => {
            let doc = q
                .document
                .ok_or_else(|| Rejection::new("bad_schema", "dry-run needs \"document\""))?;
            let bytes = serde_json::to_vec(&doc).unwrap_or_default();
            let parsed =
                input::parse::<cityplane_proto::messages::DesiredDoc>(&bytes, fleet.limits)?;
            let mut probe = crate::model::DocRecord {
                name: parsed.name,
                target: parsed.target,
                priority: parsed.priority,
                state: parsed.state,
                generation: 0,
                seq: 0,
                author: access.operator.clone(),
                org: None,
                written_at: now,
                history: Vec::new(),
            };
            govern_doc(fleet, access, &mut probe, now)?;
            fleet.dry_run(&access.operator, &bytes)
        }
        "status" => {
            let in_scope = || fleet.devices.values().map(|d| &**d).filter(sees);
            let summary = match &q.name {
                Some(name) => {
                    let doc = own_doc(name)?;
                    let targeted = || fleet.targeted(&doc.target).into_iter().filter(sees);
                    let mut s = Fleet::summary_of(targeted());
                    // Converged for a document means: at or past the
                    // generation that document produced.
                    s.converged = targeted()
                        .filter(|d| d.is_converged() && d.desired_generation >= doc.seq)
                        .count();
                    s.pending = s.total - s.converged - s.failed;
                    s
                }
                None if access.is_admin() => fleet.summary(),
                None => Fleet::summary_of(in_scope()),
            };
            Ok(json!({
                "total": summary.total, "online": summary.online, "converged": summary.converged,
                "pending": summary.pending, "failed": summary.failed, "drifted": summary.drifted,
                "counters": fleet.counters,
            }))
        }
        "overview" => Ok(fleet::overview(
            fleet.devices.values().map(|d| &**d).filter(sees),
            q.limit.unwrap_or(50).min(500),
        )),
        "get-devices" => {
            let mut rows: Vec<&crate::model::DeviceRecord> = fleet
                .devices
                .values()
                .map(|d| &**d)
                .filter(sees)
                .filter(|d| {
                    q.selector
                        .as_ref()
                        .is_none_or(|s| selects(&Target::Selector(s.clone()), &d.id, &d.attrs))
                })
                .collect();
            rows.sort_by(|a, b| a.id.cmp(&b.id));
            let total = rows.len();
            let offset = q.offset.unwrap_or(0);
            let limit = q.limit.unwrap_or(500).min(2000);
            let page: Vec<Value> = rows
                .into_iter()
                .skip(offset)
                .take(limit)
                .map(fleet::device_row)
                .collect();
            Ok(json!({"total": total, "offset": offset, "devices": page}))
        }
        "describe" => {
            let id =
                q.id.ok_or_else(|| Rejection::new("bad_schema", "describe needs \"id\""))?;
            let dev = fleet
                .devices
                .get(&id)
                .map(|d| &**d)
                .filter(sees)
                .ok_or_else(|| {
                    Rejection::new(
                        "not_found",
                        format!("no device {id:?} is registered (cityplane devices register, or certs issue)"),
                    )
                })?;
            Ok(fleet::describe(dev))
        }
        "get-secrets" => Ok(crate::secrets::listing(
            fleet
                .devices
                .values()
                .map(|d| &**d)
                .filter(sees)
                .filter(|d| {
                    q.selector
                        .as_ref()
                        .is_none_or(|s| selects(&Target::Selector(s.clone()), &d.id, &d.attrs))
                }),
            q.offset.unwrap_or(0),
            q.limit.unwrap_or(500).min(2000),
        )),
        "audit" => audit_query(store, access, &q),
        "get-quarantined" => Ok(super::incidents::query(fleet, access, q.selector.as_ref())),
        "audit-verify" => {
            let (seq, hash) = store.audit_head();
            match store.audit_verify() {
                Ok(Ok(head)) => {
                    Ok(json!({"ok": true, "head": head, "stored_head": {"seq": seq, "hash": hash}}))
                }
                Ok(Err(broken)) => {
                    Ok(json!({"ok": false, "seq": broken.seq, "reason": broken.reason}))
                }
                Err(e) => Err(storage_rejection(&e)),
            }
        }
        "audit-export" => {
            if !access.is_admin() {
                return Err(Rejection::new(
                    "forbidden",
                    "the whole audit log is exported by the city's administrators only",
                ));
            }
            let limit = q.limit.unwrap_or(1000).min(5000);
            let entries = store
                .audit_page(q.after.unwrap_or(0), limit)
                .map_err(|e| storage_rejection(&e))?;
            let (seq, hash) = store.audit_head();
            Ok(json!({"entries": entries, "head": {"seq": seq, "hash": hash}}))
        }
        other => Err(Rejection::new(
            "unknown_verb",
            format!(
                "unknown operation {other:?}; expected status, overview, get-devices, describe, audit, \
                 get-documents, describe-document, dry-run, get-rollouts, rollout-status, \
                 rollout-devices, get-releases, get-orgs, describe-org, get-policy, \
                 get-policy-history, get-exceptions, compliance, audit-verify, audit-export, \
                 get-quarantined, get-secrets, register, label, \
                 delete-document, rollout-create, rollout-pause, rollout-resume, rollout-abort, \
                 publish-firmware, org-create, org-grant, policy-apply, exception-grant, \
                 exception-revoke, quarantine, release, cert-rotate or dashboard-login"
            ),
        )),
    }
}

/// `audit`: the newest entries, filtered. A scoped organisation reads its
/// own entries only. Without filters the answer comes from memory (it
/// works on a full disk); with them from the whole stored log, or from
/// memory when the disk cannot be read.
fn audit_query(store: &Arc<Store>, access: &Access, q: &Query) -> Result<Value, Rejection> {
    let limit = q.limit.unwrap_or(50).clamp(1, 5000);
    let time = |field: &str, v: &Option<String>| -> Result<Option<jiff::Timestamp>, Rejection> {
        v.as_deref()
            .map(|t| {
                t.parse::<jiff::Timestamp>().map_err(|e| {
                    Rejection::new(
                        "bad_schema",
                        format!("{field} {t:?} is not an RFC 3339 time: {e}"),
                    )
                })
            })
            .transpose()
    };
    let (since, until) = (time("since", &q.since)?, time("until", &q.until)?);
    let org = if access.is_admin() {
        q.org.clone()
    } else {
        Some(access.org.clone())
    };
    let keep = |e: &crate::model::AuditEntry| {
        let at = e.at.parse::<jiff::Timestamp>().ok();
        q.who.as_ref().is_none_or(|w| &e.who == w)
            && org
                .as_ref()
                .is_none_or(|o| e.org.as_deref() == Some(o.as_str()))
            && q.action.as_ref().is_none_or(|a| &e.action == a)
            && q.name.as_ref().is_none_or(|n| &e.name == n)
            && q.device
                .as_ref()
                .is_none_or(|d| &e.name == d || e.devices.contains(d))
            && since.is_none_or(|s| at.is_some_and(|at| at >= s))
            && until.is_none_or(|u| at.is_some_and(|at| at < u))
    };
    let filtered = q.who.is_some()
        || org.is_some()
        || q.action.is_some()
        || q.name.is_some()
        || q.device.is_some()
        || since.is_some()
        || until.is_some();
    let entries = if filtered {
        store.audit_find(keep, limit).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "audit: the stored log cannot be read; answering from memory");
            let mine: Vec<_> = store
                .recent_audit(crate::store::AUDIT_KEPT)
                .into_iter()
                .filter(|e| keep(e))
                .collect();
            let skip = mine.len().saturating_sub(limit);
            mine.into_iter().skip(skip).collect()
        })
    } else {
        store.recent_audit(limit.min(crate::store::AUDIT_KEPT))
    };
    Ok(json!({"entries": entries}))
}

#[cfg(test)]
mod query_tests {
    use super::*;

    #[test]
    fn a_write_is_judged_by_its_expiry_with_room_for_clock_skew() {
        let at = |t: &str| {
            format!(
                r#"{{"request_id": "r", "expires_at": {t}, "data": "{}"}}"#,
                "x".repeat(64)
            )
        };
        // 2026-12-02T12:00:00Z
        let noon: Millis = 1_796_212_800_000;
        let code = |body: String, now: Millis| expired(body.as_bytes(), now).map(|r| r.code);
        let deadline = r#""2026-12-02T12:00:00Z""#;
        assert_eq!(code(at(deadline), noon - 5_000), None, "before");
        assert_eq!(
            code(at(deadline), noon + CLOCK_SKEW),
            None,
            "within the skew"
        );
        assert_eq!(code(at(deadline), noon + CLOCK_SKEW + 1), Some("expired"));
        assert_eq!(
            code(at(r#""2026-12-02T13:00:00+01:00""#), noon + CLOCK_SKEW + 1),
            Some("expired"),
            "an offset"
        );
        assert_eq!(
            code(at(r#""2026-12-02T12:00:00.500Z""#), noon + CLOCK_SKEW + 400),
            None,
            "milliseconds"
        );
        for bad in [r#""tomorrow""#, "1796212800000", r#"{"at": 1}"#] {
            assert_eq!(code(at(bad), noon), Some("bad_schema"), "{bad}");
        }
        // Not judged: no field (or null), or a body its schema will refuse.
        assert_eq!(code(r#"{"request_id": "r"}"#.into(), noon), None);
        assert_eq!(code(at("null"), noon), None);
        assert_eq!(code("not json".into(), noon), None);
        let refusal = expired(at(deadline).as_bytes(), noon + 3_600_000).expect("expired");
        assert!(
            refusal.reason.contains("2026-12-02T12:00:00Z")
                && refusal.reason.contains("2026-12-02T13:00:00"),
            "{}",
            refusal.reason
        );
    }

    #[test]
    fn a_query_is_an_object_only() {
        let l = InputLimits::default();
        let q = input::parse::<Query>(br#"{"request_id": "r", "id": "d1", "limit": -0}"#, l)
            .expect("object");
        assert_eq!((q.id.as_deref(), q.limit), (Some("d1"), Some(0)));
        for bad in [
            &br#"["r", "d1"]"#[..],
            br#"{"selector": []}"#,
            br#"{"selector": ["lamp"]}"#,
            b"null",
        ] {
            let r = input::parse::<Query>(bad, l).err().expect("refused");
            assert_eq!(
                r.code,
                "bad_schema",
                "{}: {r}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
