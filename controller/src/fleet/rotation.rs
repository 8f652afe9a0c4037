//! Certificate rotation as a rollout, no I/O. A rotation rollout sets
//! desired `certificate: {"rotation": R}`; each device it admits makes a
//! key of its own and sends a CSR (`devices/D/csr`). Here:
//!
//! - [`Fleet::on_csr`] checks the device is in live rotation R and queues
//!   the CSR for the CA ([`Fleet::take_sign_requests`]; the runtime signs);
//! - [`Fleet::on_signed`] records the new certificate, lets the broker
//!   accept both serials (the pin), and delivers the certificate on the
//!   device's own commands topic;
//! - an online presence with the new serial confirms it: the device is
//!   pinned to the new serial alone and the old one is queued for the CA's
//!   revocation list ([`Fleet::take_revocations`]);
//! - a device that does not come back with the new certificate within
//!   [`Fleet::rotation_deadline_ms`] of the delivery fails; in a rotation
//!   rollout a failed device is rolled back on its own: pinned back to its
//!   old serial, the new one revoked, `certificate` desired as before. An
//!   aborted rotation rolls back every device not yet confirmed; a
//!   completed one lets its last devices finish within the deadline.

use std::sync::Arc;

use cityplane_proto::messages::{self, CertificateDelivery, CertificateState, CsrRequest};
use serde_json::{json, Value};

use super::*;
use crate::model::CertRotation;
use crate::rollout::{DeviceStatus, Stage};

/// A CSR for the CA to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignRequest {
    pub id: String,
    pub rotation: String,
    pub csr: String,
}

/// What the CA made of a [`SignRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub id: String,
    pub rotation: String,
    /// `(serial, pem, not_after ms)`, or why it was refused.
    pub result: Result<(String, String, Option<Millis>), String>,
}

/// A device asks again for the same rotation at most this often (a CSR
/// costs the CA a signature and a record).
const CSR_EVERY_MS: Millis = 10_000;

/// The desired value that makes a device rotate to `rotation`.
pub fn rotation_state(rotation: &str) -> Value {
    json!({ "rotation": rotation })
}

/// At most this many devices in a rotation that lists its devices (one
/// picked by expiry): a rollout record holds its target.
pub const MAX_LISTED_ROTATION: usize = 5_000;

impl Fleet {
    /// The rollout that rotates the certificates of the devices `target`
    /// picks in the scope of `sees`, optionally only those expiring within
    /// `before_days` (then listed by id). `extra` carries the operator's
    /// waves and thresholds. Refused when this server cannot sign.
    pub fn rotation_spec(
        &self,
        name: Option<String>,
        target: &cityplane_proto::messages::Target,
        before_days: Option<u32>,
        sees: impl Fn(&DeviceRecord) -> bool,
        extra: serde_json::Map<String, Value>,
        now: Millis,
    ) -> Result<Value, Rejection> {
        if let Some(why) = self.cannot_rotate() {
            return Err(why);
        }
        let name = match name {
            Some(n) => n,
            None => {
                let n = self
                    .rollouts
                    .keys()
                    .filter(|k| k.starts_with("rotate-"))
                    .count()
                    + 1;
                format!("rotate-{n}")
            }
        };
        let target = match before_days {
            None => serde_json::to_value(target).unwrap_or(Value::Null),
            Some(days) => {
                let horizon = now + u64::from(days) * 86_400_000;
                let mut ids: Vec<&str> = self
                    .targeted(target)
                    .into_iter()
                    .filter(|d| !d.revoked && sees(d))
                    .filter(|d| d.cert_not_after.is_some_and(|t| t < horizon))
                    .map(|d| d.id.as_str())
                    .collect();
                if ids.is_empty() {
                    return Err(Rejection::new(
                        "bad_target",
                        format!("no targeted device's certificate expires within {days} days: nothing to rotate"),
                    ));
                }
                if ids.len() > MAX_LISTED_ROTATION {
                    return Err(Rejection::new(
                        "too_large",
                        format!(
                            "{} devices expire within {days} days; one rotation by expiry lists at most {MAX_LISTED_ROTATION}: narrow the selector",
                            ids.len()
                        ),
                    ));
                }
                ids.sort_unstable();
                json!({ "ids": ids })
            }
        };
        let mut spec = json!({
            "name": name,
            "target": target,
            "state": { CertificateState::KEY: rotation_state(&name) },
            // A device that fails is rolled back on its own (it keeps its
            // old certificate); the wave goes on without it.
            "success_threshold": 90.0,
        });
        if let Some(obj) = spec.as_object_mut() {
            obj.extend(extra);
        }
        Ok(spec)
    }

    /// Why this controller cannot run a certificate rotation, if it
    /// cannot: a rotation that could never be confirmed would fail and
    /// roll back every device, so it is refused before it starts.
    pub fn cannot_rotate(&self) -> Option<Rejection> {
        if !self.sees_session_serials {
            return Some(Rejection::new(
                "unavailable",
                "certificate rotation needs a broker that tells the controller which \
                 certificate each device connected with (to confirm the new one, then refuse \
                 the old): the embedded broker (`cityplane serve`) does; RabbitMQ and mosquitto \
                 do not, so every device would be rolled back. Rotate on the embedded broker, \
                 or reissue with `cityplane certs issue --rotate` (docs/DEPLOYMENT.md)",
            ));
        }
        if !self.can_sign {
            return Some(Rejection::new(
                "no_ca",
                "this server holds no CA key, so it cannot sign the devices' new certificates: \
                 run serve from the CA's directory (--pki DIR with ca.key) to rotate",
            ));
        }
        None
    }

    /// Whether a rollout rotates certificates (its change is `certificate`).
    pub fn is_rotation(patch: &State) -> bool {
        patch.contains_key(CertificateState::KEY)
    }

    /// How long a device has, from the delivery of its new certificate, to
    /// connect with it: three command timeouts.
    pub fn rotation_deadline_ms(&self) -> Millis {
        u64::try_from(self.policy.command_timeout.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_mul(3)
    }

    pub(super) fn on_csr(
        &mut self,
        id: &str,
        req: CsrRequest,
        now: Millis,
    ) -> Result<(), Rejection> {
        let in_rotation = self.devices.get(id).is_some_and(|d| {
            d.rollouts
                .get(&req.rotation)
                .is_some_and(|e| e.stage == Stage::Admitted)
                && self.rollouts.get(&req.rotation).is_some_and(|r| {
                    r.phase.is_live()
                        && r.patch.get(CertificateState::KEY)
                            == Some(&rotation_state(&req.rotation))
                })
        });
        if !in_rotation {
            return Err(Rejection::new(
                "no_rotation",
                format!(
                    "device {id:?} is not in a live certificate rotation {:?}",
                    req.rotation
                ),
            ));
        }
        if !self.can_sign {
            return Err(Rejection::new(
                "no_ca",
                "this server holds no CA key: it cannot sign certificates",
            ));
        }
        let dev = self.device(id, now);
        if let Some(r) = &dev.cert_rotation {
            if r.rotation == req.rotation && r.requested_at + CSR_EVERY_MS > now {
                return Ok(());
            }
        }
        let old_serial = dev.cert_serial.clone();
        dev.cert_rotation = Some(CertRotation {
            rotation: req.rotation.clone(),
            old_serial,
            requested_at: now,
            new_serial: None,
            pem: None,
            not_after: None,
            delivered_at: None,
        });
        self.rotating.insert(id.to_owned());
        self.sign_queue.push(SignRequest {
            id: id.to_owned(),
            rotation: req.rotation,
            csr: req.csr,
        });
        self.dirty.insert(id.to_owned());
        Ok(())
    }

    /// CSRs waiting for the CA.
    pub fn take_sign_requests(&mut self) -> Vec<SignRequest> {
        std::mem::take(&mut self.sign_queue)
    }

    /// Serials to revoke in the CA's list (replaced, or never confirmed).
    pub fn take_revocations(&mut self) -> Vec<String> {
        std::mem::take(&mut self.revoke_queue)
    }

    /// Certificate deliveries to publish once the records are durable.
    pub fn take_deliveries(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.deliveries)
    }

    /// The CA's answers: each device still waiting for that rotation gets
    /// its certificate, and may now connect with either serial.
    pub fn on_signed(&mut self, results: Vec<Signed>, now: Millis) {
        for s in results {
            let Some(dev) = self.devices.get_mut(&s.id).map(Arc::make_mut) else {
                continue;
            };
            let Some(rot) = dev
                .cert_rotation
                .as_mut()
                .filter(|r| r.rotation == s.rotation)
            else {
                // Rolled back or superseded while the CA signed.
                if let Ok((serial, _, _)) = s.result {
                    self.revoke_queue.push(serial);
                }
                continue;
            };
            match s.result {
                Ok((serial, pem, not_after)) => {
                    // A second CSR for the same rotation replaces the first
                    // certificate: that one is never to be used.
                    if let Some(previous) = rot.new_serial.replace(serial.clone()) {
                        dev.cert_pin.retain(|p| p != &previous);
                        self.revoke_queue.push(previous);
                    }
                    rot.pem = Some(pem.clone());
                    rot.not_after = not_after;
                    rot.delivered_at = Some(now);
                    let old = rot.old_serial.clone();
                    if !dev.cert_pin.is_empty() || old.is_some() {
                        for s in old.into_iter().chain([serial.clone()]) {
                            if !dev.cert_pin.contains(&s) {
                                dev.cert_pin.push(s);
                            }
                        }
                        self.pins_dirty = true;
                    }
                    self.next_command += 1;
                    let body = messages::Command {
                        id: format!("{}-cert-{}", self.boot, self.next_command),
                        generation: dev.desired_generation,
                        state: State::new(),
                        release: None,
                        certificate: Some(CertificateDelivery {
                            rotation: s.rotation.clone(),
                            pem,
                        }),
                        secrets: Default::default(),
                    };
                    dev.log_command(
                        &body.id,
                        body.generation,
                        now,
                        format!("certificate {serial} delivered"),
                    );
                    self.deliveries.push(Outgoing {
                        topic: topics::commands(&s.id),
                        payload: serde_json::to_vec(&body).unwrap_or_default(),
                        retain: false,
                        unanswered: false,
                    });
                }
                Err(why) => {
                    dev.failed = Some(format!("certificate rotation: the CSR was refused: {why}"));
                    dev.cert_rotation = None;
                    self.rotating.remove(&s.id);
                }
            }
            self.dirty.insert(s.id.clone());
            self.touch(&s.id);
        }
    }

    /// An online presence's serial: recorded, and a rotation waiting for it
    /// is confirmed (the old serial is refused from now on).
    pub(super) fn on_session_serial(&mut self, id: &str, serial: &str) {
        let Some(serial) = crate::fleet::canonical_serial(serial) else {
            return;
        };
        let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        dev.cert_serial = Some(serial.clone());
        let confirmed = dev
            .cert_rotation
            .as_ref()
            .is_some_and(|r| r.new_serial.as_deref() == Some(serial.as_str()));
        if !confirmed {
            return;
        }
        if let Some(rot) = dev.cert_rotation.take() {
            dev.cert_pin = vec![serial.clone()];
            dev.cert_not_after = rot.not_after.or(dev.cert_not_after);
            if let Some(old) = rot.old_serial.filter(|o| o != &serial) {
                self.revoke_queue.push(old);
            }
            dev.log_command(
                "-",
                dev.desired_generation,
                dev.last_seen,
                format!("now on certificate {serial}"),
            );
        }
        self.rotating.remove(id);
        self.pins_dirty = true;
    }

    /// Rotations that ran out of time fail; failed devices of rotation
    /// rollouts, and devices whose rotation rollout ended, are rolled back
    /// to their old certificate. Runs with the rollout step.
    pub(super) fn settle_rotations(&mut self, now: Millis) {
        if self.rotating.is_empty() {
            return;
        }
        let deadline = self.rotation_deadline_ms();
        let ids: Vec<String> = self.rotating.iter().cloned().collect();
        let mut back = Vec::new();
        for id in ids {
            let Some(dev) = self.devices.get(&id) else {
                self.rotating.remove(&id);
                continue;
            };
            let Some(rot) = dev.cert_rotation.clone() else {
                self.rotating.remove(&id);
                continue;
            };
            // A rotation that completed lets its last devices finish (the
            // deadline still holds); one aborted or gone takes them back.
            let going = self
                .rollouts
                .get(&rot.rotation)
                .is_some_and(|r| r.phase != crate::rollout::Phase::Aborted);
            let admitted = dev
                .rollouts
                .get(&rot.rotation)
                .is_some_and(|e| e.stage == Stage::Admitted);
            let late = rot.delivered_at.is_some_and(|at| at + deadline <= now);
            if late && dev.failed.is_none() {
                let dev = self
                    .devices
                    .get_mut(&id)
                    .map(Arc::make_mut)
                    .expect("present");
                dev.failed = Some(format!(
                    "certificate rotation: did not connect with its new certificate within {} s of its delivery",
                    deadline / 1000
                ));
                self.dirty.insert(id.clone());
            }
            let failed = self.devices.get(&id).is_some_and(|d| d.failed.is_some());
            if !going || !admitted || failed {
                back.push(id);
            }
        }
        for id in back {
            self.roll_back_rotation(&id);
        }
    }

    /// Puts one device back on the certificate it had: the new serial (if
    /// any) refused and revoked, `certificate` desired as before.
    fn roll_back_rotation(&mut self, id: &str) {
        self.rotating.remove(id);
        let Some(dev) = self.devices.get_mut(id).map(Arc::make_mut) else {
            return;
        };
        let Some(rot) = dev.cert_rotation.take() else {
            return;
        };
        if let Some(new) = &rot.new_serial {
            dev.cert_pin.retain(|s| s != new);
            self.revoke_queue.push(new.clone());
            self.pins_dirty = true;
        }
        let why = dev.failed.clone();
        if let Some(entry) = dev.rollouts.get_mut(&rot.rotation) {
            if entry.stage == Stage::Admitted {
                entry.stage = Stage::RolledBack;
                // What counted against the rollout, kept after the device's
                // own `failed` is cleared by the change of desired state.
                entry.failed = entry.failed.take().or(why);
            }
        }
        dev.log_command(
            "-",
            dev.desired_generation,
            rot.requested_at,
            "certificate rotation rolled back",
        );
        self.dirty.insert(id.to_owned());
        self.recompute_desired([id.to_owned()]);
    }

    /// Failed members of live rotation rollouts, for [`Fleet::settle_rotations`]
    /// (a device that failed before it sent a CSR has no rotation record).
    pub(super) fn failed_rotation_members(&self) -> Vec<(String, String)> {
        self.rollouts
            .values()
            .filter(|r| r.phase.is_live() && Fleet::is_rotation(&r.patch))
            .flat_map(|r| {
                self.members(r)
                    .filter(|(_, e, s, _)| e.stage == Stage::Admitted && *s == DeviceStatus::Failed)
                    .map(|(d, _, _, _)| (d.id.clone(), r.spec.name.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Rolls back, one by one, failed devices of rotation rollouts that
    /// never got as far as a CSR.
    pub(super) fn roll_back_failed_rotations(&mut self) {
        for (id, name) in self.failed_rotation_members() {
            if self
                .devices
                .get(&id)
                .is_some_and(|d| d.cert_rotation.is_some())
            {
                self.roll_back_rotation(&id);
                continue;
            }
            if let Some(dev) = self.devices.get_mut(&id).map(Arc::make_mut) {
                if let Some(entry) = dev.rollouts.get_mut(&name) {
                    entry.stage = Stage::RolledBack;
                }
                self.dirty.insert(id.clone());
            }
            self.recompute_desired([id]);
        }
    }
}
