//! The operator protocol for incident response: `quarantine` and `release`
//! (writes: checked against the `incident` right and the operator's scope,
//! committed with an audit entry naming every device, then applied and
//! pushed to the broker before the answer), and `get-quarantined`.

use std::collections::BTreeMap;

use cityplane_proto::messages::Target;

use super::operator::{audited, write_devices};
use super::*;
use crate::fleet::{check_scope, IntentKind, MAX_INCIDENT_DEVICES};
use crate::model::Quarantine;
use crate::orgs::{Access, Right};

/// `quarantine`.
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct QuarantineRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    target: Target,
    reason: String,
}

/// `release`: each device with the serial of the certificate it was given
/// (the CLI issues them with the CA, which this server does not hold).
#[derive(Deserialize)]
#[serde(remote = "Self", deny_unknown_fields)]
struct ReleaseRequest {
    #[serde(default, rename = "request_id")]
    _request_id: Option<String>,
    /// Read before the schema ([`super::operator::expired`]).
    #[serde(default, rename = "expires_at")]
    _expires_at: Option<Value>,
    serials: BTreeMap<String, String>,
    #[serde(default)]
    reason: Option<String>,
}

cityplane_proto::object_only!(QuarantineRequest, ReleaseRequest);

/// A reason an auditor reads: 1 to 1,000 bytes, not blank (`what` needs it).
pub(super) fn check_reason(what: &str, reason: &str) -> Result<(), Rejection> {
    if reason.trim().is_empty() || reason.len() > 1000 {
        return Err(Rejection::new(
            "bad_schema",
            format!("{what} needs a reason (1 to 1000 bytes): it is what an auditor reads"),
        ));
    }
    Ok(())
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
        "quarantine" => {
            access.require(Right::Incident, "quarantine devices")?;
            let req = input::parse::<QuarantineRequest>(payload, fleet.limits)?;
            check_reason("a quarantine", &req.reason)?;
            if let Target::Selector(s) = &req.target {
                if s.is_empty() {
                    return Err(Rejection::new(
                        "bad_target",
                        r#"empty selector; name the devices (ids) or select them, e.g. {"class": "camera", "labels": {"zone": "north"}}"#,
                    ));
                }
            }
            let named = fleet.incident_targets(&req.target);
            check_scope(access, &named)?;
            if let Target::Ids(list) = &req.target {
                if let Some(missing) = list.ids.iter().find(|id| !fleet.devices.contains_key(*id)) {
                    return Err(Rejection::new(
                        "not_found",
                        format!("no device {missing:?} is registered"),
                    ));
                }
            }
            if named.is_empty() {
                return Err(Rejection::new(
                    "bad_target",
                    "the selector matches no device: nothing was quarantined",
                ));
            }
            if named.len() > MAX_INCIDENT_DEVICES {
                return Err(Rejection::new(
                    "too_large",
                    format!(
                        "the target names {} devices; one quarantine takes at most {MAX_INCIDENT_DEVICES}",
                        named.len()
                    ),
                ));
            }
            let mut ids: Vec<String> = named.iter().map(|d| d.id.clone()).collect();
            ids.sort();
            let incident = fleet.next_incident();
            let mark = Quarantine {
                incident: incident.clone(),
                since: now,
                by: who.to_owned(),
                org: access.org.clone(),
                reason: req.reason.clone(),
            };
            let (records, already) = fleet.quarantined_records(&ids, &mark);
            let cut: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            let mut audit = fleet.audit_entry(
                who,
                "quarantine",
                &incident,
                &format!(
                    "accepted: {} device(s) cut off because {:?}{}",
                    cut.len(),
                    req.reason,
                    if already.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} already quarantined)", already.len())
                    }
                ),
                now,
            );
            audit.devices = cut.clone();
            write_devices(
                fleet,
                store,
                records,
                IntentKind::Incident,
                audited(audit),
                now,
            )
            .await?;
            tracing::warn!(operator = who, %incident, devices = cut.len(), reason = %req.reason, "devices quarantined");
            Ok(json!({
                "incident": incident, "quarantined": cut.len(), "already": already.len(),
                "ids": cut, "already_ids": already, "reason": req.reason,
                "at": crate::model::rfc3339(now),
            }))
        }
        "release" => {
            access.require(Right::Incident, "release quarantined devices")?;
            let req = input::parse::<ReleaseRequest>(payload, fleet.limits)?;
            if req.serials.is_empty() || req.serials.len() > MAX_INCIDENT_DEVICES {
                return Err(Rejection::new(
                    "bad_schema",
                    format!("a release names 1 to {MAX_INCIDENT_DEVICES} devices, each with its new certificate's serial"),
                ));
            }
            if let Some(reason) = &req.reason {
                check_reason("a release", reason)?;
            }
            let ids: Vec<String> = req.serials.keys().cloned().collect();
            let named = fleet.incident_targets(&Target::Ids(cityplane_proto::messages::IdList {
                ids: ids.clone(),
            }));
            // Outside the scope reads as unknown, as everywhere.
            if let Some(missing) = ids.iter().find(|id| {
                !named
                    .iter()
                    .any(|d| &d.id == *id && access.sees(&d.id, &d.attrs))
            }) {
                return Err(Rejection::new(
                    "not_found",
                    format!("no device {missing:?} is registered"),
                ));
            }
            let records = fleet.released_records(&req.serials, now)?;
            let mut audit = fleet.audit_entry(
                who,
                "release",
                &format!("{} devices", records.len()),
                &format!(
                    "accepted: {} device(s) back, each pinned to its new certificate{}",
                    records.len(),
                    req.reason
                        .as_deref()
                        .map(|r| format!(" because {r:?}"))
                        .unwrap_or_default()
                ),
                now,
            );
            audit.devices = ids.clone();
            let pins: BTreeMap<String, String> = records
                .iter()
                .map(|r| (r.id.clone(), r.cert_pin.join(",")))
                .collect();
            write_devices(
                fleet,
                store,
                records,
                IntentKind::Incident,
                audited(audit),
                now,
            )
            .await?;
            tracing::info!(operator = who, devices = ids.len(), "devices released");
            Ok(json!({"released": ids.len(), "ids": ids, "serials": pins}))
        }
        other => Err(Rejection::new("unknown_verb", other.to_owned())),
    }
}

/// `get-quarantined`: the quarantined devices of the operator's scope
/// (optionally only those a selector picks).
pub(super) fn query(fleet: &Fleet, access: &Access, selector: Option<&Selector>) -> Value {
    let rows = fleet.quarantined_rows(|d| {
        access.sees(&d.id, &d.attrs)
            && selector.is_none_or(|s| selects(&Target::Selector(s.clone()), &d.id, &d.attrs))
    });
    json!({"total": rows.len(), "devices": rows})
}
