//! The operator protocol for organisations, the security policy, its
//! exceptions and compliance: checked, committed with an audit line, then
//! applied to the fleet.

use std::collections::BTreeSet;

use cityplane_proto::messages::{Selector, Target};
use cityplane_proto::policy::parse_policy;

use super::operator::commit_write;
use super::*;
use crate::fleet::{ExceptionRecord, PolicyRecord};
use crate::orgs::{check_org_name, parse_rights, Access, OrgRecord, Right};

/// `org-create` and `org-grant`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct OrgRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    scope: Option<Selector>,
    #[serde(default)]
    rights: Option<Vec<String>>,
}

/// `policy-apply`: the whole policy, as JSON.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct PolicyApply {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    policy: Value,
}

/// `exception-grant`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct ExceptionGrant {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    rule: String,
    #[serde(default)]
    target: Option<Target>,
    reason: String,
    /// Seconds from now; an exception always ends.
    expires_in_s: u64,
}

/// `exception-revoke`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct ExceptionRevoke {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    id: String,
}

cityplane_proto::object_only!(OrgRequest, PolicyApply, ExceptionGrant, ExceptionRevoke);

/// The longest an exception may run: a waiver is a decision to revisit.
const MAX_EXCEPTION_S: u64 = 90 * 24 * 3600;

fn json_bytes<T: serde::Serialize>(v: &T) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(v).unwrap_or_default())
}

pub(super) async fn write(
    fleet: &mut Fleet,
    store: &Arc<Store>,
    access: &Access,
    verb: &str,
    payload: &[u8],
    now: Millis,
) -> Result<Value, Rejection> {
    let who = access.operator.as_str();
    match verb {
        "org-create" | "org-grant" => {
            if !access.is_admin() {
                return Err(Rejection::new(
                    "forbidden",
                    format!(
                        "only the city's administrators (organisation {:?}) manage organisations",
                        crate::orgs::ADMIN_ORG
                    ),
                ));
            }
            let req = input::parse::<OrgRequest>(payload, fleet.limits)?;
            check_org_name(&req.name)?;
            if let Some(scope) = &req.scope {
                if scope.is_empty() {
                    return Err(Rejection::new(
                        "bad_target",
                        r#"empty scope; an organisation's scope selects its devices, e.g. {"owner": "lighting-co"}"#,
                    ));
                }
            }
            let rights = req.rights.as_deref().map(parse_rights).transpose()?;
            let existing = fleet.gov.orgs.get(&req.name).cloned();
            let record = match (verb, existing) {
                ("org-create", Some(_)) => {
                    return Err(Rejection::new(
                        "conflict",
                        format!(
                            "organisation {:?} exists; change it with org-grant",
                            req.name
                        ),
                    ))
                }
                ("org-create", None) => OrgRecord {
                    name: req.name.clone(),
                    description: req.description.clone().unwrap_or_default(),
                    scope: Some(req.scope.clone().ok_or_else(|| {
                        Rejection::new(
                            "bad_schema",
                            r#"an organisation needs a "scope" (a selector over registry attributes, e.g. {"owner": "lighting-co"})"#,
                        )
                    })?),
                    rights: rights.unwrap_or_else(|| BTreeSet::from([Right::Read])),
                    created_by: who.to_owned(),
                    created_at: now,
                    updated_by: who.to_owned(),
                    updated_at: now,
                    generation: 1,
                },
                (_, None) => {
                    return Err(Rejection::new(
                        "not_found",
                        format!("no organisation named {:?}", req.name),
                    ))
                }
                (_, Some(old)) => OrgRecord {
                    description: req.description.clone().unwrap_or(old.description.clone()),
                    scope: req.scope.clone().or(old.scope.clone()),
                    rights: rights.unwrap_or(old.rights.clone()),
                    updated_by: who.to_owned(),
                    updated_at: now,
                    generation: old.generation + 1,
                    ..old
                },
            };
            let rights: Vec<&str> = record.rights.iter().map(|r| r.as_str()).collect();
            let audit = fleet.audit_entry(
                who,
                verb,
                &record.name,
                &format!(
                    "accepted: scope {}, rights {}",
                    serde_json::to_string(&record.scope).unwrap_or_default(),
                    rights.join(",")
                ),
                now,
            );
            let changes = Changes {
                governance: vec![(OrgRecord::key(&record.name), json_bytes(&record))],
                audit: vec![audit],
                ..Default::default()
            };
            commit_write(store, changes).await?;
            let devices = fleet.apply_org(record.clone());
            tracing::info!(operator = who, org = %record.name, devices, "organisation {verb}");
            Ok(json!({"name": record.name, "generation": record.generation,
                      "scope": record.scope, "rights": record.rights, "devices": devices}))
        }
        "policy-apply" => {
            access.require(Right::Policy, "publish the security policy")?;
            let req = input::parse::<PolicyApply>(payload, fleet.limits)?;
            let text = serde_json::to_vec(&req.policy).unwrap_or_default();
            let policy =
                parse_policy(&text).map_err(|e| Rejection::new("bad_policy", e.to_string()))?;
            let version = fleet.gov.versions.keys().next_back().map_or(0, |v| *v) + 1;
            let diff = match &fleet.gov.policy {
                Some((_, old)) => cityplane_proto::policy::diff(old, &policy).to_string(),
                None => format!("first version, {} rules", policy.rules.len()),
            };
            let record = PolicyRecord {
                version,
                policy: req.policy,
                published_by: who.to_owned(),
                org: Some(access.org.clone()),
                published_at: now,
            };
            let audit = fleet.audit_entry(
                who,
                "policy-apply",
                &format!("v{version}"),
                &format!("accepted: {}", diff.replace('\n', "; ")),
                now,
            );
            let changes = Changes {
                governance: vec![(PolicyRecord::key(version), json_bytes(&record))],
                audit: vec![audit],
                ..Default::default()
            };
            commit_write(store, changes).await?;
            let rules = policy.rules.len();
            fleet.apply_policy(record, policy, now);
            tracing::info!(operator = who, version, rules, "security policy published");
            Ok(json!({"version": version, "rules": rules, "diff": diff}))
        }
        "exception-grant" => {
            access.require(Right::Policy, "grant policy exceptions")?;
            let req = input::parse::<ExceptionGrant>(payload, fleet.limits)?;
            let known = fleet
                .gov
                .policy
                .as_ref()
                .is_some_and(|(_, p)| p.rules.iter().any(|r| r.id == req.rule));
            if !known {
                return Err(Rejection::new(
                    "not_found",
                    format!("the current policy has no rule {:?}", req.rule),
                ));
            }
            super::incidents::check_reason("an exception", &req.reason)?;
            if req.expires_in_s == 0 || req.expires_in_s > MAX_EXCEPTION_S {
                return Err(Rejection::new(
                    "bad_schema",
                    format!(
                        "expires_in_s must be 1 to {MAX_EXCEPTION_S} (90 days): exceptions end"
                    ),
                ));
            }
            if let Some(Target::Selector(s)) = &req.target {
                if s.is_empty() {
                    return Err(Rejection::new(
                        "bad_target",
                        "empty selector; leave \"target\" out to cover every device the rule applies to",
                    ));
                }
            }
            // Exceptions are never deleted (a revoked one stays, for the
            // record), so the count names the next one.
            let id = format!("ex-{}", fleet.gov.exceptions.len() + 1);
            let record = ExceptionRecord {
                id: id.clone(),
                rule: req.rule.clone(),
                target: req.target,
                reason: req.reason,
                granted_by: who.to_owned(),
                org: Some(access.org.clone()),
                granted_at: now,
                expires_at: now + req.expires_in_s * 1000,
                revoked: false,
            };
            let audit = fleet.audit_entry(
                who,
                "exception-grant",
                &id,
                &format!(
                    "accepted: rule {} until {} because {:?}",
                    record.rule,
                    crate::model::rfc3339(record.expires_at),
                    record.reason
                ),
                now,
            );
            let changes = Changes {
                governance: vec![(ExceptionRecord::key(&id), json_bytes(&record))],
                audit: vec![audit],
                ..Default::default()
            };
            commit_write(store, changes).await?;
            fleet.gov.exceptions.insert(id.clone(), record.clone());
            Ok(json!({"id": id, "rule": record.rule,
                      "expires_at": crate::model::rfc3339(record.expires_at)}))
        }
        "exception-revoke" => {
            access.require(Right::Policy, "revoke policy exceptions")?;
            let req = input::parse::<ExceptionRevoke>(payload, fleet.limits)?;
            let mut record =
                fleet.gov.exceptions.get(&req.id).cloned().ok_or_else(|| {
                    Rejection::new("not_found", format!("no exception {:?}", req.id))
                })?;
            record.revoked = true;
            let audit = fleet.audit_entry(who, "exception-revoke", &req.id, "accepted", now);
            let changes = Changes {
                governance: vec![(ExceptionRecord::key(&req.id), json_bytes(&record))],
                audit: vec![audit],
                ..Default::default()
            };
            commit_write(store, changes).await?;
            fleet.gov.exceptions.insert(req.id.clone(), record);
            Ok(json!({"id": req.id, "revoked": true}))
        }
        other => Err(Rejection::new("unknown_verb", other.to_owned())),
    }
}

fn org_row(fleet: &Fleet, o: &OrgRecord) -> Value {
    let devices = fleet
        .devices
        .values()
        .filter(|d| fleet.org_sees(Some(&o.name), d))
        .count();
    json!({
        "name": o.name, "description": o.description, "scope": o.scope,
        "rights": o.rights, "devices": devices, "generation": o.generation,
        "updated_by": o.updated_by, "updated_at": crate::model::rfc3339(o.updated_at),
    })
}

pub(super) fn query(
    fleet: &Fleet,
    access: &Access,
    verb: &str,
    name: Option<&str>,
    version: Option<u64>,
    limit: Option<usize>,
    now: Millis,
) -> Result<Value, Rejection> {
    match verb {
        "get-orgs" => {
            let city = OrgRecord::city();
            let rows: Vec<Value> = std::iter::once(&city)
                .chain(fleet.gov.orgs.values())
                .filter(|o| access.is_admin() || o.name == access.org)
                .map(|o| org_row(fleet, o))
                .collect();
            Ok(json!({"total": rows.len(), "orgs": rows}))
        }
        "describe-org" => {
            let name = name.unwrap_or(access.org.as_str());
            let city = OrgRecord::city();
            let org = if name == crate::orgs::ADMIN_ORG {
                Some(&city)
            } else {
                fleet.gov.orgs.get(name)
            }
            .filter(|o| access.is_admin() || o.name == access.org)
            .ok_or_else(|| {
                Rejection::new("not_found", format!("no organisation named {name:?}"))
            })?;
            let mut row = org_row(fleet, org);
            let owned = |o: Option<&str>| o.unwrap_or(crate::orgs::ADMIN_ORG) == org.name;
            row["documents"] = json!(fleet
                .docs
                .values()
                .filter(|d| owned(d.org.as_deref()))
                .map(|d| d.name.clone())
                .collect::<Vec<_>>());
            row["rollouts"] = json!(fleet
                .rollouts
                .values()
                .filter(|r| owned(r.org.as_deref()))
                .map(|r| r.spec.name.clone())
                .collect::<Vec<_>>());
            row["created_by"] = json!(org.created_by);
            row["created_at"] = json!(crate::model::rfc3339(org.created_at));
            Ok(row)
        }
        "get-policy" => {
            let rec = match version {
                Some(v) => fleet.gov.versions.get(&v),
                None => fleet.gov.versions.values().next_back(),
            }
            .ok_or_else(|| {
                Rejection::new(
                    "not_found",
                    match version {
                        Some(v) => format!("no policy version {v}"),
                        None => "no security policy is published yet (cityplane policy apply -f)"
                            .to_owned(),
                    },
                )
            })?;
            Ok(json!({
                "version": rec.version, "published_by": rec.published_by,
                "published_at": crate::model::rfc3339(rec.published_at), "policy": rec.policy,
            }))
        }
        "get-policy-history" => {
            let rows: Vec<Value> = fleet
                .gov
                .versions
                .values()
                .map(|r| {
                    json!({
                        "version": r.version, "published_by": r.published_by,
                        "published_at": crate::model::rfc3339(r.published_at),
                        "rules": r.policy.get("rules").and_then(Value::as_array).map_or(0, Vec::len),
                    })
                })
                .collect();
            Ok(json!({"total": rows.len(), "versions": rows}))
        }
        "get-exceptions" => {
            let rows: Vec<Value> = fleet
                .gov
                .exceptions
                .values()
                .map(|e| {
                    json!({
                        "id": e.id, "rule": e.rule, "target": e.target, "reason": e.reason,
                        "granted_by": e.granted_by,
                        "granted_at": crate::model::rfc3339(e.granted_at),
                        "expires_at": crate::model::rfc3339(e.expires_at),
                        "active": e.active(now), "revoked": e.revoked,
                    })
                })
                .collect();
            Ok(json!({"total": rows.len(), "exceptions": rows}))
        }
        "compliance" => Ok(fleet.compliance_report(access, limit.unwrap_or(200).min(5000), now)),
        other => Err(Rejection::new("unknown_verb", other.to_owned())),
    }
}

/// Who the audit log names for what enforcement does.
pub const POLICY_ACTOR: &str = "policy-enforcement";

/// Enforcement: a remediation rollout for each rule in `enforce` mode that
/// devices break (see `Fleet::remediation_specs`), created as the city's
/// administrators would, with the same admission and audit.
pub(super) async fn enforce(fleet: &mut Fleet, store: &Arc<Store>, now: Millis) {
    for spec in fleet.remediation_specs(now) {
        let bytes = serde_json::to_vec(&spec).unwrap_or_default();
        let name = spec["name"].as_str().unwrap_or_default().to_owned();
        let result = match input::parse::<crate::rollout::RolloutSpec>(&bytes, fleet.limits) {
            Ok(parsed) => {
                let access =
                    Access::resolve(POLICY_ACTOR, Some(crate::orgs::ADMIN_ORG), &fleet.gov.orgs);
                fleet.acting_org = Some(access.org.clone());
                let r = super::operator::create_rollout(fleet, store, &access, parsed, now).await;
                fleet.acting_org = None;
                r
            }
            Err(r) => Err(r),
        };
        match result {
            Ok(v) => {
                fleet.gov.enforce_errors.remove(&name);
                tracing::info!(rollout = %name, devices = %v["devices"], "policy enforcement: remediation rollout created");
            }
            Err(r) => {
                // Tried again every tick (another rollout may hold the key
                // for now); said once per reason.
                let why = r.to_string();
                if fleet.gov.enforce_errors.get(&name) != Some(&why) {
                    tracing::warn!(rollout = %name, %r, "policy enforcement: could not create the remediation rollout; trying again");
                    fleet.gov.enforce_errors.insert(name, why);
                }
            }
        }
    }
}
