//! Who may publish and subscribe to what. The identity comes from the
//! verified client certificate, never from anything the client says.
//!
//! - device `D`: publish `devices/D/{reported,telemetry,acks}`, will on
//!   `devices/D/presence`, subscribe exactly `devices/D/commands`;
//! - operator: publish under `fleet/desired/#` and `fleet/ops/#`; subscribe to
//!   filters inside `devices/+/{reported,telemetry,presence}` or `fleet/#`
//!   (also as `$share/<group>/<filter>`);
//! - controller: everything.

use cityplane_proto::{topics, Identity, Role};

const OPERATOR_PUBLISH: [&str; 2] = ["fleet/desired/#", "fleet/ops/#"];
const OPERATOR_SUBSCRIBE: [&str; 4] = [
    "devices/+/reported",
    "devices/+/telemetry",
    "devices/+/presence",
    "fleet/#",
];

pub fn may_publish(who: &Identity, topic: &str) -> bool {
    match who.role {
        Role::Controller => true,
        Role::Device => matches!(
            topics::split_device_topic(topic),
            Some((id, leaf)) if id == who.id && topics::DEVICE_PUBLISH_LEAVES.contains(&leaf)
        ),
        Role::Operator => OPERATOR_PUBLISH.iter().any(|p| covers(p, topic)),
    }
}

pub fn may_set_will(who: &Identity, topic: &str) -> bool {
    match who.role {
        Role::Device => matches!(
            topics::split_device_topic(topic),
            Some((id, leaf)) if id == who.id && leaf == topics::DEVICE_WILL_LEAF
        ),
        _ => may_publish(who, topic),
    }
}

pub fn may_subscribe(who: &Identity, filter: &str) -> bool {
    match who.role {
        Role::Controller => true,
        Role::Device => filter == topics::commands(&who.id),
        Role::Operator => {
            let inner = match filter.strip_prefix("$share/") {
                Some(rest) => match rest.split_once('/') {
                    Some((group, inner)) if !group.is_empty() => inner,
                    _ => return false,
                },
                None => filter,
            };
            OPERATOR_SUBSCRIBE.iter().any(|p| covers(p, inner))
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

    fn who(role: Role, id: &str) -> Identity {
        Identity {
            id: id.into(),
            role,
        }
    }

    #[test]
    fn a_device_speaks_only_for_itself() {
        let d = who(Role::Device, "d1");
        for ok in [
            "devices/d1/reported",
            "devices/d1/telemetry",
            "devices/d1/acks",
        ] {
            assert!(may_publish(&d, ok), "{ok}");
        }
        for bad in [
            "devices/d2/reported",
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
        for bad in [
            "devices/d2/commands",
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
        assert!(!may_publish(&o, "fleet/status"));
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
            "devices/+/+",
            "+/+/reported",
            "$SYS/#",
            "$share//fleet/#",
        ] {
            assert!(!may_subscribe(&o, bad), "{bad}");
        }
    }

    #[test]
    fn the_controller_may_do_anything() {
        let c = who(Role::Controller, "ctl");
        assert!(may_publish(&c, "devices/d1/commands"));
        assert!(may_subscribe(&c, "#"));
    }
}
