//! Incident response: quarantine cuts devices off (the broker refuses every
//! certificate they hold, rollouts and documents pass them by), release
//! brings them back pinned to a new certificate. Pure: the runtime checks
//! rights, commits the records this computes, then applies them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use cityplane_broker::Pin;
use cityplane_proto::messages::Target;
use serde_json::{json, Value};

use super::*;
use crate::model::Quarantine;
use crate::rollout::Stage;

/// How many devices one quarantine or release may name (one answer, one
/// audit entry).
pub const MAX_INCIDENT_DEVICES: usize = 10_000;

impl Fleet {
    /// The known devices `target` names, quarantined ones included
    /// ([`Fleet::targeted`] leaves those out).
    pub fn incident_targets(&self, target: &Target) -> Vec<&DeviceRecord> {
        self.selected(target, true)
    }

    /// The records of `ids` quarantined under `mark`: offline, out of
    /// every live rollout. Ids already quarantined are left as they are
    /// and returned apart.
    pub fn quarantined_records(
        &self,
        ids: &[String],
        mark: &Quarantine,
    ) -> (Vec<Arc<DeviceRecord>>, Vec<String>) {
        let (mut records, mut already) = (Vec::new(), Vec::new());
        for id in ids {
            let Some(dev) = self.devices.get(id) else {
                continue;
            };
            if dev.quarantine.is_some() {
                already.push(id.clone());
                continue;
            }
            let mut rec = (**dev).clone();
            rec.quarantine = Some(mark.clone());
            rec.online = false;
            for (name, entry) in rec.rollouts.iter_mut() {
                // Its part ends here: a cut-off device can neither succeed
                // nor fail, and must not hold a wave back or trip an abort.
                let live = self.rollouts.get(name).is_some_and(|r| r.phase.is_live());
                if live && matches!(entry.stage, Stage::Queued | Stage::Admitted) {
                    entry.stage = Stage::Cancelled;
                }
            }
            rec.log_command("-", rec.desired_generation, mark.since, "quarantined");
            records.push(Arc::new(rec));
        }
        (records, already)
    }

    /// The records of quarantined devices released, each pinned to the
    /// serial of the certificate it was given. Refuses an id that is not
    /// quarantined (a release must name what the incident cut off).
    pub fn released_records(
        &self,
        serials: &BTreeMap<String, String>,
        now: Millis,
    ) -> Result<Vec<Arc<DeviceRecord>>, Rejection> {
        let mut records = Vec::with_capacity(serials.len());
        for (id, serial) in serials {
            let dev = self
                .devices
                .get(id)
                .filter(|d| d.quarantine.is_some())
                .ok_or_else(|| {
                    Rejection::new("not_found", format!("device {id:?} is not quarantined"))
                })?;
            let serial = canonical_serial(serial).ok_or_else(|| {
                Rejection::new(
                    "bad_schema",
                    format!("{serial:?} (for {id}) is not a certificate serial (hex)"),
                )
            })?;
            let mut rec = (**dev).clone();
            rec.quarantine = None;
            rec.cert_pin = vec![serial];
            rec.failed = None;
            rec.log_command("-", rec.desired_generation, now, "released");
            records.push(Arc::new(rec));
        }
        Ok(records)
    }

    /// Puts committed quarantine or release records in place: desired
    /// state follows (nothing while quarantined), the broker's pins change.
    pub fn apply_incident(&mut self, records: Vec<Arc<DeviceRecord>>, now: Millis) {
        let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
        // A server holding the CA also revokes, in the CA's list, the
        // certificate each quarantined device last connected with: brokers
        // that read the CRL refuse it too (ours already does, by the pins).
        if self.can_sign {
            self.revoke_queue.extend(
                records
                    .iter()
                    .filter(|r| r.quarantine.is_some())
                    .filter_map(|r| r.cert_serial.clone()),
            );
        }
        for record in records {
            self.devices.insert(record.id.clone(), record);
        }
        self.recompute_desired(ids.iter().cloned());
        for id in &ids {
            self.evaluate(id, now);
        }
        let names: Vec<String> = self
            .rollouts
            .values()
            .filter(|r| r.phase.is_live())
            .map(|r| r.spec.name.clone())
            .collect();
        self.mark_rollouts_dirty(names);
        self.dirty.extend(ids);
        self.pins_dirty = true;
    }

    /// What the broker must enforce: quarantined devices refused, pinned
    /// ones held to their serials.
    pub fn pin_table(&self) -> HashMap<String, Pin> {
        self.devices
            .values()
            .filter_map(|d| {
                if d.quarantine.is_some() {
                    Some((d.id.clone(), Pin::Refused))
                } else if !d.cert_pin.is_empty() {
                    Some((d.id.clone(), Pin::Only(d.cert_pin.clone())))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Quarantined devices in the scope of `sees`, oldest incident first.
    pub fn quarantined_rows(&self, sees: impl Fn(&DeviceRecord) -> bool) -> Vec<Value> {
        let mut rows: Vec<(&DeviceRecord, &Quarantine)> = self
            .devices
            .values()
            .filter(|d| sees(d))
            .filter_map(|d| Some((&**d, d.quarantine.as_ref()?)))
            .collect();
        rows.sort_by(|a, b| (a.1.since, &a.0.id).cmp(&(b.1.since, &b.0.id)));
        rows.into_iter()
            .map(|(d, q)| {
                json!({
                    "id": d.id, "class": d.attrs.class, "owner": d.attrs.owner,
                    "incident": q.incident, "since": crate::model::rfc3339(q.since),
                    "by": q.by, "org": q.org, "reason": q.reason,
                })
            })
            .collect()
    }

    /// The next incident's name: the sequence of the audit entry that will
    /// record it, so names are unique and survive restarts.
    pub fn next_incident(&self) -> String {
        format!("inc-{}", self.audit_seq + 1)
    }
}

/// A serial as the broker compares it (`cityplane_certs`' spelling:
/// lowercase hex, no colons, no leading zero bytes), at most 20 octets.
pub fn canonical_serial(serial: &str) -> Option<String> {
    cityplane_certs::normalize_serial(serial).filter(|s| s.len() <= 40)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cityplane_proto::messages::{IdList, Selector};

    fn mark() -> Quarantine {
        Quarantine {
            incident: "inc-1".into(),
            since: 1000,
            by: "op".into(),
            org: "city".into(),
            reason: "rogue".into(),
        }
    }

    #[test]
    fn quarantined_devices_leave_documents_and_pins_refuse_them() {
        let mut fleet = Fleet::for_tests(
            ["d1", "d2", "d3"]
                .into_iter()
                .map(DeviceRecord::new)
                .collect(),
        );
        let all = Target::Selector(Selector {
            all: true,
            ..Default::default()
        });
        let (records, already) = fleet.quarantined_records(&["d1".into(), "d9".into()], &mark());
        assert_eq!((records.len(), already.len()), (1, 0));
        fleet.apply_incident(records, 1);
        assert_eq!(fleet.targeted(&all).len(), 2, "documents pass d1 by");
        assert_eq!(fleet.incident_targets(&all).len(), 3);
        assert_eq!(fleet.pin_table().get("d1"), Some(&Pin::Refused));
        assert_eq!(fleet.next_incident(), "inc-1");
        let (_, already) = fleet.quarantined_records(&["d1".into()], &mark());
        assert_eq!(already, vec!["d1".to_owned()]);

        // A release names quarantined devices only, and pins the new serial.
        let refused = fleet.released_records(&BTreeMap::from([("d2".into(), "ab".into())]), 2);
        assert_eq!(refused.unwrap_err().code, "not_found");
        let released = fleet
            .released_records(&BTreeMap::from([("d1".into(), "00:AB:CD".into())]), 2)
            .unwrap();
        fleet.apply_incident(released, 2);
        assert_eq!(
            fleet.pin_table().get("d1"),
            Some(&Pin::Only(vec!["abcd".into()]))
        );
        let ids = Target::Ids(IdList {
            ids: vec!["d1".into()],
        });
        assert_eq!(fleet.targeted(&ids).len(), 1, "released: targeted again");
    }

    #[test]
    fn serials_are_compared_in_one_spelling() {
        assert_eq!(canonical_serial("00:0A:ff").as_deref(), Some("0aff"));
        assert_eq!(canonical_serial(&"ab".repeat(21)), None);
        assert_eq!(canonical_serial("xyz"), None);
        assert_eq!(canonical_serial(""), None);
    }
}
