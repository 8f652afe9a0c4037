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

/// The per-device leaves a device may publish to.
pub const DEVICE_PUBLISH_LEAVES: [&str; 3] = ["reported", "telemetry", "acks"];
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
}
