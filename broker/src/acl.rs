//! Who may publish and subscribe to what. The identity comes from the
//! verified client certificate, never from anything the client says.
//!
//! - device `D`: publish `devices/D/{reported,telemetry,acks,csr,fetch}`,
//!   will on `devices/D/presence`, subscribe exactly `devices/D/commands`
//!   and `devices/D/blob`;
//! - operator: publish under `fleet/desired/#` and `fleet/ops/#` (the
//!   controller checks what each organisation may write). Subscribe, also
//!   as `$share/<group>/<filter>`: an operator of the city's own
//!   organisation ([`ADMIN_ORG`]) to filters inside
//!   `devices/+/{reported,telemetry,presence}` or `fleet/#`; any other
//!   operator (scoped: see [`scoped_org`]) to filters inside
//!   `devices/+/{reported,telemetry,presence}` whose device level, unless a
//!   wildcard, names a device of its scope, inside its own
//!   `fleet/responses/<id>/#`, and to `fleet/compliance/<its org>`. What
//!   a wildcard matches outside the scope is dropped per delivery
//!   (`session::core`), not here. No operator reads `devices/+/csr`: a
//!   CSR is the device's request to the CA, for the controller only;
//! - controller: every publish except on `$`-topics (rumqttd neither routes
//!   a publish to one nor accepts a subscription to one) and on the image
//!   path (`devices/+/fetch`, `devices/+/blob`: see [`is_image_path`]);
//!   every subscription except to `$`-topics.
//!
//! RETAIN is allowed only where docs/PROTOCOL.md says a topic is retained
//! ([`may_retain`]); wills only where the publisher owns the topic and the
//! controller does not read it through the operator tap ([`may_set_will`]).

use cityplane_proto::{topics, Identity, Role, ADMIN_ORG};

const OPERATOR_PUBLISH: [&str; 2] = [topics::FLEET_DESIRED_ALL, topics::FLEET_OPS_ALL];
/// What every operator may read of devices. Built once: proto spells the
/// topics, and `may_subscribe` runs per SUBSCRIBE.
static OPERATOR_DEVICE_SUBSCRIBE: std::sync::LazyLock<[String; 3]> =
    std::sync::LazyLock::new(|| {
        [
            topics::all_devices("reported"),
            topics::all_devices("telemetry"),
            topics::all_devices(topics::DEVICE_WILL_LEAF),
        ]
    });

/// The organisation whose scope limits what `who` may read, if any: every
/// operator's but the city's own ([`ADMIN_ORG`]). Devices and controllers
/// are not limited by scopes. An operator identity without an
/// organisation (no certificate yields one: the O is required) is limited
/// to the empty name, which no scope holds: it sees no device.
pub fn scoped_org(who: &Identity) -> Option<&str> {
    match (who.role, who.org.as_deref()) {
        (Role::Operator, Some(ADMIN_ORG)) => None,
        (Role::Operator, org) => Some(org.unwrap_or("")),
        (Role::Device | Role::Controller, _) => None,
    }
}

pub fn may_publish(who: &Identity, topic: &str) -> bool {
    if topic.starts_with('$') {
        return false;
    }
    match who.role {
        Role::Controller => !is_image_path(topic),
        Role::Device => matches!(
            topics::split_device_topic(topic),
            Some((id, leaf)) if id == who.id
                && (topics::DEVICE_PUBLISH_LEAVES.contains(&leaf) || leaf == topics::DEVICE_FETCH_LEAF)
        ),
        // `fleet/desired/#` also matches bare `fleet/desired`, which names
        // no document and would get no answer.
        Role::Operator => OPERATOR_PUBLISH
            .iter()
            .any(|p| covers(p, topic) && topic.len() > p.len() - 1),
    }
}

/// `devices/<id>/fetch` and `devices/<id>/blob`: a device's requests for
/// firmware image bytes and the edge's answers. The edge answers a fetch
/// itself and writes blobs straight to the device's connection, so nothing
/// on either topic goes through the router. A fetch is the device's own
/// request: from anyone else (the controller included) it would be a
/// request in the device's name, and a blob from anyone but the edge would
/// be image bytes nobody asked for; both are refused.
pub fn is_image_path(topic: &str) -> bool {
    matches!(
        topics::split_device_topic(topic),
        Some((_, leaf)) if leaf == topics::DEVICE_FETCH_LEAF || leaf == topics::DEVICE_BLOB_LEAF
    )
}

/// Whether `who` may publish `topic` with RETAIN set (an empty retained
/// payload deletes the retained message). Only the topics the protocol
/// marks retained: a device's own `reported` (optional), `fleet/status`
/// and the compliance summaries (`fleet/compliance`,
/// `fleet/compliance/<org>`) from the controller, and presence, which only
/// the broker and device wills write. Operators never retain: nothing they
/// write is retained.
/// The leaves of its own topics on which a device may publish with RETAIN.
/// The edge routes every message on them through the router (which stores
/// retained ones), so retained and live ones keep their order
/// ([`crate::direct`]).
pub const DEVICE_RETAINABLE_LEAVES: [&str; 1] = ["reported"];

pub fn may_retain(who: &Identity, topic: &str) -> bool {
    if !may_publish(who, topic) {
        return false;
    }
    match who.role {
        Role::Device => topics::split_device_topic(topic)
            .is_some_and(|(_, leaf)| DEVICE_RETAINABLE_LEAVES.contains(&leaf)),
        Role::Operator => false,
        Role::Controller => {
            topic == topics::FLEET_STATUS
                || topic == topics::FLEET_AUDIT_HEAD
                || topic == topics::FLEET_COMPLIANCE
                || topics::compliance_org(topic).is_some()
                || matches!(
                    topics::split_device_topic(topic),
                    Some((_, "reported" | "presence"))
                )
        }
    }
}

/// Where `who` may leave a will. A device: only its own presence (the
/// session also checks the payload). An operator: nowhere, since everything
/// it may publish goes to the controller through the tap, which a will
/// published by the broker would bypass. The controller: wherever it may
/// publish.
pub fn may_set_will(who: &Identity, topic: &str) -> bool {
    match who.role {
        Role::Device => matches!(
            topics::split_device_topic(topic),
            Some((id, leaf)) if id == who.id && leaf == topics::DEVICE_WILL_LEAF
        ),
        Role::Operator => false,
        Role::Controller => may_publish(who, topic),
    }
}

/// A device will must say exactly what the broker would: the device is
/// offline. Anything else (online, empty, junk) would let a device fake its
/// own presence after it is gone.
pub fn is_offline_presence(payload: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    // (Checked to start with `{` too: serde fills a struct from an array.)
    struct Presence {
        online: bool,
    }
    matches!(
        serde_json::from_slice::<Presence>(payload),
        Ok(Presence { online: false })
    ) && payload.trim_ascii_start().first() == Some(&b'{')
}

/// Whether `who` may subscribe to `filter`. `in_scope(device)` says
/// whether a scoped operator's organisation may see `device`; it is asked
/// only for a filter naming one device (the caller holds the scope table,
/// so this stays a function of its arguments).
pub fn may_subscribe(who: &Identity, filter: &str, in_scope: impl Fn(&str) -> bool) -> bool {
    match who.role {
        // rumqttd drops the connection on a `$` filter other than `$share`.
        Role::Controller => match filter.strip_prefix(topics::SHARE_PREFIX) {
            Some(rest) => matches!(
                rest.split_once('/'),
                Some((group, inner)) if !group.is_empty() && !inner.starts_with('$')
            ),
            None => !filter.starts_with('$'),
        },
        // Exactly its own commands and blob topics (a wildcard is no id).
        Role::Device => matches!(
            topics::split_device_topic(filter),
            Some((id, leaf)) if id == who.id
                && (leaf == topics::DEVICE_SUBSCRIBE_LEAF || leaf == topics::DEVICE_BLOB_LEAF)
        ),
        Role::Operator => {
            let inner = match filter.strip_prefix(topics::SHARE_PREFIX) {
                Some(rest) => match rest.split_once('/') {
                    Some((group, inner)) if !group.is_empty() => inner,
                    _ => return false,
                },
                None => filter,
            };
            let device_read = OPERATOR_DEVICE_SUBSCRIBE.iter().any(|p| covers(p, inner));
            match scoped_org(who) {
                None => device_read || covers(topics::FLEET_ALL, inner),
                // Neither `fleet/#` nor `fleet/status` (the whole fleet's
                // summary) nor anyone else's answers or compliance.
                Some(org) if !device_read => {
                    covers(&topics::responses_filter(&who.id), inner)
                        || (!org.is_empty() && inner == topics::compliance(org))
                }
                // A wildcard device level is filtered per delivery; a named
                // device is refused here unless the scope holds it.
                Some(_) => match topics::split_device_topic(inner) {
                    Some((id, _)) if id != "+" => in_scope(id),
                    _ => true,
                },
            }
        }
    }
}

/// True when every topic matched by `filter` is also matched by `pattern`.
/// A plain topic name is a filter without wildcards, so this also answers
/// "does `pattern` match this topic".
fn covers(pattern: &str, filter: &str) -> bool {
    // `$`-topics are never matched by a leading wildcard (MQTT 3.1.1 §4.7.2).
    if filter.starts_with('$') && !pattern.starts_with('$') {
        return false;
    }
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(fl)) if fl != "#" => {}
            (Some(pl), Some(fl)) if pl == fl && fl != "+" && fl != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Operators are the city's own administrators unless said.
    fn who(role: Role, id: &str) -> Identity {
        Identity {
            id: id.into(),
            role,
            org: (role == Role::Operator).then(|| ADMIN_ORG.to_owned()),
        }
    }

    fn operator_of(org: Option<&str>, id: &str) -> Identity {
        Identity {
            id: id.into(),
            role: Role::Operator,
            org: org.map(str::to_owned),
        }
    }

    /// Unscoped identities never consult the scope.
    fn may_subscribe(who: &Identity, filter: &str) -> bool {
        super::may_subscribe(who, filter, |d| {
            assert!(
                scoped_org(who).is_some(),
                "{who} consulted the scope for {d}"
            );
            false
        })
    }

    #[test]
    fn a_device_speaks_only_for_itself() {
        let d = who(Role::Device, "d1");
        for ok in [
            "devices/d1/reported",
            "devices/d1/telemetry",
            "devices/d1/acks",
            "devices/d1/csr",
            "devices/d1/fetch",
        ] {
            assert!(may_publish(&d, ok), "{ok}");
        }
        assert!(!may_retain(&d, "devices/d1/csr"));
        for bad in [
            "devices/d2/reported",
            "devices/d2/csr",
            "devices/+/csr",
            "devices/d2/fetch",
            "devices/d1/blob",
            "devices/d1/commands",
            "devices/d1/presence",
            "devices/d1/reported/x",
            "fleet/desired/x",
            "devices/d1",
            "$SYS/x",
        ] {
            assert!(!may_publish(&d, bad), "{bad}");
        }
        assert!(may_set_will(&d, "devices/d1/presence"));
        assert!(!may_set_will(&d, "devices/d2/presence"));
        assert!(may_subscribe(&d, "devices/d1/commands"));
        assert!(may_subscribe(&d, "devices/d1/blob"));
        for bad in [
            "devices/d2/commands",
            "devices/d2/blob",
            "devices/+/blob",
            "devices/d1/fetch",
            "devices/+/commands",
            "devices/d1/#",
            "#",
            "$share/g/devices/d1/commands",
            "$SYS/#",
        ] {
            assert!(!may_subscribe(&d, bad), "{bad}");
        }
    }

    #[test]
    fn operators_write_fleet_topics_and_read_device_reports() {
        let o = who(Role::Operator, "alice");
        assert!(may_publish(&o, "fleet/desired/lights"));
        assert!(may_publish(&o, "fleet/ops/get"));
        assert!(!may_publish(&o, "devices/d1/commands"));
        assert!(!may_publish(&o, "devices/d1/fetch"));
        assert!(!may_subscribe(&o, "devices/d1/blob"));
        assert!(!may_publish(&o, "fleet/status"));
        assert!(!may_publish(&o, "fleet/desired"));
        assert!(!may_publish(&o, "fleet/ops"));
        assert!(!may_set_will(&o, "fleet/desired/x"));
        for topic in ["fleet/desired/x", "fleet/ops/status"] {
            assert!(!may_retain(&o, topic), "{topic}");
        }
        for ok in [
            "devices/+/reported",
            "devices/d1/reported",
            "devices/+/presence",
            "fleet/#",
            "fleet/status",
            "fleet/+/x",
            "$share/dash/devices/+/telemetry",
        ] {
            assert!(may_subscribe(&o, ok), "{ok}");
        }
        for bad in [
            "#",
            "devices/#",
            "devices/+/commands",
            "devices/+/csr",
            "devices/d1/csr",
            "$share/g/devices/+/csr",
            "devices/+/+",
            "+/+/reported",
            "$SYS/#",
            "$share//fleet/#",
        ] {
            assert!(!may_subscribe(&o, bad), "{bad}");
        }
    }

    #[test]
    fn a_scoped_operator_reads_only_its_scope_its_answers_and_its_compliance() {
        let o = operator_of(Some("lighting-co"), "bob");
        let in_scope = |d: &str| d == "lamp1";
        let sub = |f: &str| super::may_subscribe(&o, f, in_scope);
        for ok in [
            "devices/+/reported",
            "devices/+/telemetry",
            "devices/+/presence",
            "devices/lamp1/reported",
            "devices/lamp1/presence",
            "$share/dash/devices/+/telemetry",
            "$share/dash/devices/lamp1/telemetry",
            "fleet/responses/bob/#",
            "fleet/responses/bob/r1",
            "fleet/responses/bob/+",
            "fleet/compliance/lighting-co",
        ] {
            assert!(sub(ok), "{ok}");
        }
        for bad in [
            "devices/cam1/reported",
            "$share/dash/devices/cam1/telemetry",
            "devices/lamp1/commands",
            "devices/lamp1/csr",
            "devices/+/csr",
            "devices/#",
            "devices/+/+",
            "fleet/#",
            "fleet/+",
            "fleet/status",
            "fleet/compliance",
            "fleet/compliance/#",
            "fleet/compliance/+",
            "fleet/compliance/camera-int",
            "fleet/responses/#",
            "fleet/responses/+/r1",
            "fleet/responses/alice/#",
            "fleet/responses/bobby/#",
            "fleet/+/bob/#",
            "#",
            "+/+/reported",
            "+/lamp1/reported",
            "$share/dash/fleet/#",
            "$SYS/#",
        ] {
            assert!(!sub(bad), "{bad}");
        }
        // Publishing is unchanged: the controller checks the scope of writes.
        assert!(may_publish(&o, "fleet/desired/x"));
        assert!(may_publish(&o, "fleet/ops/get"));
        assert!(!may_retain(&o, "fleet/compliance/lighting-co"));
        // An operator without an organisation reads no device by name and
        // no compliance; a legacy `cityplane` certificate is a scoped org.
        let none = operator_of(None, "eve");
        assert_eq!(scoped_org(&none), Some(""));
        assert!(!super::may_subscribe(
            &none,
            "devices/lamp1/reported",
            |_| false
        ));
        assert!(!super::may_subscribe(&none, "fleet/compliance/", |_| true));
        assert!(super::may_subscribe(&none, "fleet/responses/eve/#", |_| {
            false
        }));
        assert_eq!(
            scoped_org(&operator_of(Some("cityplane"), "old")),
            Some("cityplane")
        );
        assert_eq!(scoped_org(&who(Role::Operator, "alice")), None);
        assert_eq!(scoped_org(&who(Role::Controller, "ctl")), None);
        assert_eq!(scoped_org(&who(Role::Device, "d1")), None);
    }

    #[test]
    fn the_controller_may_do_anything_but_dollar_topics() {
        let c = who(Role::Controller, "ctl");
        assert!(may_publish(&c, "devices/d1/commands"));
        assert!(may_subscribe(&c, "#"));
        assert!(may_subscribe(&c, "devices/+/csr"));
        assert!(may_subscribe(&c, "$share/g/devices/+/reported"));
        for bad in [
            "$TopicA/B",
            "$SYS/#",
            "$share/g/$SYS/x",
            "$share//x",
            "$share/g",
        ] {
            assert!(!may_subscribe(&c, bad), "{bad}");
        }
        assert!(!may_publish(&c, "$TopicA/B"));
        // The image path is between a device and the edge only.
        assert!(!may_publish(&c, "devices/d1/fetch"));
        assert!(!may_publish(&c, "devices/d1/blob"));
        assert!(may_retain(&c, "fleet/status"));
        assert!(may_retain(&c, "fleet/audit/head"));
        assert!(!may_retain(&c, "fleet/audit/other"));
        assert!(may_retain(&c, "fleet/compliance"));
        assert!(may_retain(&c, "fleet/compliance/lighting-co"));
        assert!(!may_retain(&c, "fleet/compliance/a/b"));
        assert!(!may_retain(&c, "fleet/compliance/"));
        assert!(!may_retain(&c, "devices/d1/commands"));
        assert!(!may_retain(&c, "fleet/responses/op/r1"));
    }

    #[test]
    fn retain_only_where_the_protocol_retains() {
        let d = who(Role::Device, "d1");
        assert!(may_retain(&d, "devices/d1/reported"));
        for bad in [
            "devices/d1/telemetry",
            "devices/d1/acks",
            "devices/d1/fetch",
            "devices/d2/reported",
        ] {
            assert!(!may_retain(&d, bad), "{bad}");
        }
    }

    #[test]
    fn a_device_will_may_only_say_offline() {
        assert!(is_offline_presence(br#"{"online":false}"#));
        assert!(is_offline_presence(br#"{ "online" : false }"#));
        for bad in [
            &br#"{"online":true}"#[..],
            b"",
            b"null",
            br#"{"online":false,"x":1}"#,
            // Only the edge says which certificate a device uses.
            br#"{"online":false,"serial":"0a"}"#,
            br#"{"online":false,"serial":null}"#,
            br#"[false]"#,
            b"junk",
        ] {
            assert!(
                !is_offline_presence(bad),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Commands carry device secrets: only the device itself reads its
    /// commands topic, whatever the operator's organisation or filter.
    #[test]
    fn nobody_but_the_device_reads_its_commands() {
        let device = who(Role::Device, "d1");
        let others = [
            who(Role::Device, "d2"),
            operator_of(Some("city"), "alice"),
            operator_of(Some("lighting-co"), "bob"),
        ];
        let filters = [
            "devices/d1/commands",
            "devices/+/commands",
            "devices/d1/+",
            "devices/d1/#",
            "+/d1/commands",
            "#",
            "$share/g/devices/d1/commands",
            "$share/g/devices/+/commands",
        ];
        assert!(super::may_subscribe(&device, "devices/d1/commands", |_| {
            true
        }));
        for o in &others {
            for f in filters {
                assert!(!super::may_subscribe(o, f, |_| true), "{:?} {f}", o.id);
            }
        }
    }
}
