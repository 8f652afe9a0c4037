//! Topic names of the cityplane contract (see docs/PROTOCOL.md).

/// Everything about one device lives under `devices/<id>/`.
pub const DEVICES: &str = "devices";

pub fn reported(device: &str) -> String {
    format!("{DEVICES}/{device}/reported")
}

pub fn telemetry(device: &str) -> String {
    format!("{DEVICES}/{device}/telemetry")
}

pub fn acks(device: &str) -> String {
    format!("{DEVICES}/{device}/acks")
}

pub fn presence(device: &str) -> String {
    format!("{DEVICES}/{device}/presence")
}

pub fn commands(device: &str) -> String {
    format!("{DEVICES}/{device}/commands")
}

/// A device asks for image bytes here (answered by the broker's edge).
pub fn fetch(device: &str) -> String {
    format!("{DEVICES}/{device}/fetch")
}

/// Image bytes for a device (published by the broker's edge, QoS 0).
pub fn blob(device: &str) -> String {
    format!("{DEVICES}/{device}/blob")
}

/// A device's certificate signing request during a rotation (read by the
/// controller only).
pub fn csr(device: &str) -> String {
    format!("{DEVICES}/{device}/{DEVICE_CSR_LEAF}")
}

/// The leaf a device asks for image chunks on, and the one they come on.
pub const DEVICE_FETCH_LEAF: &str = "fetch";
pub const DEVICE_BLOB_LEAF: &str = "blob";

/// The leaf a device sends its certificate signing requests on.
pub const DEVICE_CSR_LEAF: &str = "csr";

/// The per-device leaves a device may publish to (besides `fetch`, which the
/// edge answers itself). Publishing is all this grants: who may read each
/// leaf is a separate rule (operators never read `csr`).
pub const DEVICE_PUBLISH_LEAVES: [&str; 4] = ["reported", "telemetry", "acks", DEVICE_CSR_LEAF];
/// The leaf a device's will must use.
pub const DEVICE_WILL_LEAF: &str = "presence";
/// The leaf a device may subscribe to.
pub const DEVICE_SUBSCRIBE_LEAF: &str = "commands";

/// Operators write desired state here.
pub const FLEET_DESIRED: &str = "fleet/desired";
/// Operators ask questions and give orders here.
pub const FLEET_OPS: &str = "fleet/ops";
/// Retained fleet summary.
pub const FLEET_STATUS: &str = "fleet/status";
/// The controller answers operators under here.
pub const FLEET_RESPONSES: &str = "fleet/responses";
/// Retained compliance summaries: the whole fleet's here, one
/// organisation's under `fleet/compliance/<org>` ([`compliance`]).
pub const FLEET_COMPLIANCE: &str = "fleet/compliance";
/// The audit log's chain head (retained): sequence and hash of the last
/// entry, for auditors to hold the log to.
pub const FLEET_AUDIT_HEAD: &str = "fleet/audit/head";

/// What operator publishes the controller reads start with.
pub const FLEET_DESIRED_PREFIX: &str = "fleet/desired/";
pub const FLEET_OPS_PREFIX: &str = "fleet/ops/";
/// Where operators may publish: documents and queries.
pub const FLEET_DESIRED_ALL: &str = "fleet/desired/#";
pub const FLEET_OPS_ALL: &str = "fleet/ops/#";
/// Everything under `fleet/` (status, responses): what operators may read.
pub const FLEET_ALL: &str = "fleet/#";
/// Operators' requests on an external broker, which cannot tell the
/// controller who published: `fleet/by/<operator>/ops/<verb>` and
/// `fleet/by/<operator>/desired/<name>`. The broker's per-user topic
/// permission is what makes the `<operator>` level true (RabbitMQ:
/// `cityplane cluster sync`); the embedded broker never accepts them.
pub const FLEET_BY: &str = "fleet/by";
/// What an external controller subscribes to for operators' requests.
pub const FLEET_BY_ALL: [&str; 2] = ["fleet/by/+/ops/#", "fleet/by/+/desired/#"];
/// The prefix of a shared subscription, `$share/<group>/<filter>`.
pub const SHARE_PREFIX: &str = "$share/";
/// The broker's own topics: nobody may use them (refusal tests need the name).
pub const SYS_ALL: &str = "$SYS/#";

/// `fleet/desired/<name>`: an operator writes document `name`.
pub fn desired(name: &str) -> String {
    format!("{FLEET_DESIRED}/{name}")
}

/// `fleet/ops/<verb>`: an operator query or order.
pub fn ops(verb: &str) -> String {
    format!("{FLEET_OPS}/{verb}")
}

/// `fleet/responses/<operator>/<request id>`: the controller's answer.
pub fn response(operator: &str, request_id: &str) -> String {
    format!("{FLEET_RESPONSES}/{operator}/{request_id}")
}

/// Every answer for one operator.
pub fn responses_filter(operator: &str) -> String {
    format!("{FLEET_RESPONSES}/{operator}/#")
}

/// `fleet/compliance/<org>`: the retained compliance summary of one
/// organisation's scope.
pub fn compliance(org: &str) -> String {
    format!("{FLEET_COMPLIANCE}/{org}")
}

/// The organisation of `fleet/compliance/<org>` (one non-empty level).
pub fn compliance_org(topic: &str) -> Option<&str> {
    let org = topic.strip_prefix(FLEET_COMPLIANCE)?.strip_prefix('/')?;
    (!org.is_empty() && !org.contains('/')).then_some(org)
}

/// The levels after `fleet/by/<operator>/` where an operator writes.
pub const BY_OPERATOR_LEAVES: [&str; 2] = ["ops", "desired"];

/// `devices/+/<leaf>`: one leaf of every device.
pub fn all_devices(leaf: &str) -> String {
    format!("{DEVICES}/+/{leaf}")
}

/// The document name of `fleet/desired/<name>`: the whole rest of the topic,
/// so `fleet/desired/a/b/n1` names `a/b/n1` (which no valid name equals),
/// not `n1`.
pub fn desired_name(topic: &str) -> Option<&str> {
    topic.strip_prefix(FLEET_DESIRED)?.strip_prefix('/')
}

/// The verb of `fleet/ops/<verb>`: the whole rest of the topic, so
/// `fleet/ops/x/status` is the verb `x/status` (unknown), not `status`.
pub fn ops_verb(topic: &str) -> Option<&str> {
    topic.strip_prefix(FLEET_OPS)?.strip_prefix('/')
}

/// `fleet/ops/<verb>` or `fleet/desired/<name>` as `operator` publishes it
/// on an external broker (see [`FLEET_BY`]); `None` for any other topic.
pub fn by(operator: &str, topic: &str) -> Option<String> {
    let rest = topic.strip_prefix("fleet/")?;
    (rest.starts_with("ops/") || rest.starts_with("desired/"))
        .then(|| format!("{FLEET_BY}/{operator}/{rest}"))
}

/// Splits `fleet/by/<operator>/<rest>` into the operator and the topic the
/// embedded broker would have carried (`fleet/<rest>`); only `ops/` and
/// `desired/` requests, from a non-empty operator level.
pub fn split_by(topic: &str) -> Option<(&str, String)> {
    let rest = topic.strip_prefix(FLEET_BY)?.strip_prefix('/')?;
    let (operator, inner) = rest.split_once('/')?;
    if operator.is_empty() || !(inner.starts_with("ops/") || inner.starts_with("desired/")) {
        return None;
    }
    Some((operator, format!("fleet/{inner}")))
}

/// Splits `devices/<id>/<leaf>` into `(id, leaf)`.
pub fn split_device_topic(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(DEVICES)?.strip_prefix('/')?;
    let (id, leaf) = rest.split_once('/')?;
    if leaf.contains('/') {
        return None;
    }
    Some((id, leaf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_topics_split_back_into_id_and_leaf() {
        assert_eq!(
            split_device_topic(&reported("d1")),
            Some(("d1", "reported"))
        );
        assert_eq!(split_device_topic("devices/d1/a/b"), None);
        assert_eq!(split_device_topic("devicesX/d1/a"), None);
        assert_eq!(split_device_topic("devices/d1"), None);
    }

    #[test]
    fn requests_by_name_round_trip_and_nothing_else_passes() {
        let t = by("alice", &ops("status")).unwrap();
        assert_eq!(t, "fleet/by/alice/ops/status");
        assert_eq!(split_by(&t), Some(("alice", ops("status"))));
        let d = by("alice", &desired("dim")).unwrap();
        assert_eq!(split_by(&d), Some(("alice", desired("dim"))));
        assert_eq!(by("alice", FLEET_STATUS), None);
        for bad in [
            "fleet/by//ops/status",
            "fleet/by/alice",
            "fleet/by/alice/responses/x",
            "fleet/byx/alice/ops/status",
            "fleet/ops/status",
        ] {
            assert_eq!(split_by(bad), None, "{bad}");
        }
    }

    #[test]
    fn fleet_topics_keep_every_level_after_the_prefix() {
        assert_eq!(desired_name("fleet/desired/n1"), Some("n1"));
        assert_eq!(desired_name("fleet/desired/a/b/n1"), Some("a/b/n1"));
        assert_eq!(desired_name("fleet/desiredx/n1"), None);
        assert_eq!(ops_verb("fleet/ops/status"), Some("status"));
        assert_eq!(ops_verb("fleet/ops/x/status"), Some("x/status"));
        assert_eq!(ops_verb("fleet/desired/status"), None);
        assert_eq!(
            compliance_org(&compliance("lighting-co")),
            Some("lighting-co")
        );
        for bad in [
            "fleet/compliance",
            "fleet/compliance/",
            "fleet/compliance/a/b",
            "fleet/compliancex/a",
        ] {
            assert_eq!(compliance_org(bad), None, "{bad}");
        }
    }
}
