//! Device classes: their initial state, which commands they accept, and
//! their telemetry.
//!
//! Every class reports:
//!
//! | key | what | settable |
//! |---|---|---|
//! | `class` | `streetlight`, `waste-bin`, `camera`, `air-sensor` | no |
//! | `hardware_model` | vendor model | no |
//! | `firmware` | running version; setting it starts a firmware update | yes (update) |
//! | `labels` | object of strings, always with `zone` (north/south/east/west/center) | yes |
//! | `security` | `{"services": {name: bool}, "default_password_changed": bool, "ntp": host}` | yes (whole) |
//! | `cert_not_after` | notAfter of the device certificate (RFC 3339) | no |
//! | `certificate` | `{"rotation": R}`: the rotation of the certificate in use (`issued` at first); setting another R starts a rotation (docs/PROTOCOL.md), the value changes once the new certificate is in use | yes (rotation) |
//! | `update` | firmware update sub-state: `{"state": "idle" \| "downloading" \| … }` | no |
//! | `firmware_floor` | with a release key: the oldest version it accepts (rises with each signed release) | no |
//!
//! Class keys: streetlight `dimming` (0..100), `schedule` ({"on","off"} as
//! "HH:MM"), `lamp_power_w` and `fault` (read-only); waste-bin `fill_level`
//! and `lid_sensor` (read-only), `pickup_threshold` (1..100); camera
//! `stream_profile`, `retention_days` (1..365), `admin_password_hash`
//! (setting it marks `security.default_password_changed`); air-sensor
//! `sample_interval_s` (1..3600); its `pm25` and `no2` are telemetry only.
//!
//! Unknown keys are stored as given (a device does not know every setting an
//! operator may want to record); `manifest` (a signed firmware manifest, not
//! verified yet) is one of them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use cityplane_proto::messages::State;
use serde_json::{json, Map, Value};

use crate::rng::Rng;

pub const ZONES: [&str; 5] = ["north", "south", "east", "west", "center"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Streetlight,
    WasteBin,
    Camera,
    AirSensor,
}

impl Class {
    pub const ALL: [Class; 4] = [
        Class::Streetlight,
        Class::WasteBin,
        Class::Camera,
        Class::AirSensor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Streetlight => "streetlight",
            Class::WasteBin => "waste-bin",
            Class::Camera => "camera",
            Class::AirSensor => "air-sensor",
        }
    }

    fn models(self) -> &'static [&'static str] {
        match self {
            Class::Streetlight => &["LumiNode SL-200", "LumiNode SL-300", "Orbis LX-4"],
            Class::WasteBin => &["BinSense B2", "BinSense B3"],
            Class::Camera => &["Vista IPC-3265", "Vista IPC-5120"],
            Class::AirSensor => &["AeroQ AQ-10", "AeroQ AQ-12"],
        }
    }

    /// Firmware most devices of the class run, and an older one some still run.
    pub fn firmware_versions(self) -> (&'static str, &'static str) {
        match self {
            Class::Streetlight => ("1.4.2", "1.3.9"),
            Class::WasteBin => ("2.1.0", "2.0.3"),
            Class::Camera => ("5.7.1", "5.6.0"),
            Class::AirSensor => ("0.9.4", "0.9.1"),
        }
    }

    fn services(self) -> &'static [&'static str] {
        match self {
            Class::Camera => &["onvif", "ssh", "telnet"],
            _ => &["ssh", "telnet"],
        }
    }

    /// Keys only the device sets.
    fn read_only(self, key: &str) -> bool {
        matches!(
            key,
            "class" | "hardware_model" | "cert_not_after" | "update" | "firmware_floor"
        ) || match self {
            Class::Streetlight => matches!(key, "lamp_power_w" | "fault"),
            Class::WasteBin => matches!(key, "fill_level" | "lid_sensor"),
            Class::Camera | Class::AirSensor => false,
        }
    }

    /// Keys a command may not delete (besides the read-only ones).
    fn required(key: &str) -> bool {
        matches!(key, "firmware" | "labels" | "security")
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Class, String> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown class {s:?}: expected streetlight, waste-bin, camera or air-sensor"
                )
            })
    }
}

/// How many devices of each class, as weights: `streetlight=60,waste-bin=20,…`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMix(pub Vec<(Class, u32)>);

impl Default for ClassMix {
    fn default() -> Self {
        ClassMix(vec![
            (Class::Streetlight, 60),
            (Class::WasteBin, 20),
            (Class::Camera, 15),
            (Class::AirSensor, 5),
        ])
    }
}

impl FromStr for ClassMix {
    type Err = String;
    fn from_str(s: &str) -> Result<ClassMix, String> {
        let mut mix = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected class=weight"))?;
            let class: Class = name.trim().parse()?;
            let weight: u32 = weight
                .trim()
                .parse()
                .map_err(|_| format!("{part:?}: weight must be a whole number"))?;
            if mix.iter().any(|(c, _)| *c == class) {
                return Err(format!("{class} appears twice"));
            }
            mix.push((class, weight));
        }
        if mix.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() == 0 {
            return Err("the mix needs at least one class with a weight above 0".into());
        }
        Ok(ClassMix(mix))
    }
}

impl fmt::Display for ClassMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(c, w)| format!("{c}={w}")).collect();
        f.write_str(&parts.join(","))
    }
}

impl ClassMix {
    /// Classes for `n` devices in the mix's proportions (largest remainder),
    /// shuffled deterministically by `seed`.
    pub fn assign(&self, n: usize, seed: u64) -> Vec<Class> {
        let total: u64 = self.0.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut counts: Vec<(Class, usize, u64)> = self
            .0
            .iter()
            .map(|(c, w)| {
                let exact = n as u64 * u64::from(*w);
                (*c, (exact / total) as usize, exact % total)
            })
            .collect();
        let mut missing = n - counts.iter().map(|(_, k, _)| k).sum::<usize>();
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|a, b| counts[*b].2.cmp(&counts[*a].2));
        for i in order {
            if missing == 0 {
                break;
            }
            counts[i].1 += 1;
            missing -= 1;
        }
        let mut classes: Vec<Class> = counts
            .iter()
            .flat_map(|(c, k, _)| std::iter::repeat_n(*c, *k))
            .collect();
        Rng::new(seed ^ 0x05EE_DC1A_55E5_u64).shuffle(&mut classes);
        classes
    }
}

/// A realistic initial state for a device of `class`.
pub fn initial_state(class: Class, rng: &mut Rng, cert_not_after: &str) -> State {
    let mut s = Map::new();
    s.insert("class".into(), json!(class.as_str()));
    s.insert("hardware_model".into(), json!(rng.pick(class.models())));
    let (current, old) = class.firmware_versions();
    let firmware = if rng.chance(0.1) { old } else { current };
    s.insert("firmware".into(), json!(firmware));
    s.insert("labels".into(), json!({"zone": rng.pick(&ZONES)}));
    let mut services = Map::new();
    for svc in class.services() {
        // A few devices still ship with telnet or ssh enabled: drift to find.
        let on = match *svc {
            "onvif" => true,
            "ssh" => rng.chance(0.05),
            _ => rng.chance(0.02),
        };
        services.insert((*svc).into(), json!(on));
    }
    s.insert(
        "security".into(),
        json!({
            "services": services,
            "default_password_changed": !rng.chance(0.08),
            "ntp": if rng.chance(0.9) { "ntp.city.local" } else { "pool.ntp.org" },
        }),
    );
    s.insert("cert_not_after".into(), json!(cert_not_after));
    s.insert("update".into(), json!({"state": "idle"}));
    match class {
        Class::Streetlight => {
            let dimming = *rng.pick(&[0u64, 30, 50, 70, 100]);
            s.insert("dimming".into(), json!(dimming));
            s.insert("schedule".into(), json!({"on": "18:30", "off": "06:30"}));
            s.insert("lamp_power_w".into(), json!(lamp_power(dimming)));
            let fault = if rng.chance(0.01) {
                "lamp_failure"
            } else {
                "none"
            };
            s.insert("fault".into(), json!(fault));
        }
        Class::WasteBin => {
            s.insert("fill_level".into(), json!(rng.below(80)));
            s.insert("lid_sensor".into(), json!("closed"));
            s.insert("pickup_threshold".into(), json!(80));
        }
        Class::Camera => {
            s.insert("stream_profile".into(), json!("h264-1080p"));
            s.insert("retention_days".into(), json!(30));
            s.insert(
                "admin_password_hash".into(),
                json!(format!(
                    "$argon2id$v=19$m=19456,t=2,p=1${:016x}",
                    rng.next_u64()
                )),
            );
        }
        Class::AirSensor => {
            s.insert("sample_interval_s".into(), json!(60));
        }
    }
    s
}

const LAMP_RATED_W: f64 = 120.0;

fn lamp_power(dimming: u64) -> u64 {
    (LAMP_RATED_W * dimming as f64 / 100.0).round() as u64
}

pub const STREAM_PROFILES: [&str; 4] = ["h264-1080p", "h264-720p", "h265-4k", "mjpeg-480p"];

fn int_in(v: &Value, lo: u64, hi: u64) -> bool {
    v.as_u64().is_some_and(|n| (lo..=hi).contains(&n))
}

fn is_hhmm(v: Option<&Value>) -> bool {
    let Some(s) = v.and_then(Value::as_str) else {
        return false;
    };
    let b = s.as_bytes();
    b.len() == 5
        && b[2] == b':'
        && s[..2].parse::<u8>().is_ok_and(|h| h < 24)
        && s[3..].parse::<u8>().is_ok_and(|m| m < 60)
}

/// Checks one key of a command against the class. `current` is the present
/// state (read-only keys may be "set" to the value they already have).
pub fn validate(class: Class, key: &str, value: &Value, current: &State) -> Result<(), String> {
    if class.read_only(key) {
        if current.get(key) == Some(value) {
            return Ok(());
        }
        return Err(format!("{key} is read-only"));
    }
    if value.is_null() {
        if Class::required(key) {
            return Err(format!("{key} cannot be deleted"));
        }
        return Ok(());
    }
    let ok = match (key, class) {
        ("firmware", _) => value.as_str().is_some_and(|s| {
            !s.is_empty()
                && s.len() <= 32
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-+_".contains(c))
        }),
        ("labels", _) => value.as_object().is_some_and(|m| {
            m.values().all(Value::is_string)
                && m.get("zone")
                    .and_then(Value::as_str)
                    .is_some_and(|z| ZONES.contains(&z))
        }),
        ("security", _) => value.as_object().is_some_and(|m| {
            m.keys()
                .all(|k| matches!(k.as_str(), "services" | "default_password_changed" | "ntp"))
                && m.get("services").is_none_or(|s| {
                    s.as_object()
                        .is_some_and(|s| s.values().all(Value::is_boolean))
                })
                && m.get("default_password_changed")
                    .is_none_or(Value::is_boolean)
                && m.get("ntp")
                    .is_none_or(|n| n.as_str().is_some_and(|n| !n.is_empty()))
        }),
        ("dimming", Class::Streetlight) => int_in(value, 0, 100),
        ("schedule", Class::Streetlight) => value
            .as_object()
            .is_some_and(|m| m.len() == 2 && is_hhmm(m.get("on")) && is_hhmm(m.get("off"))),
        ("pickup_threshold", Class::WasteBin) => int_in(value, 1, 100),
        ("stream_profile", Class::Camera) => {
            value.as_str().is_some_and(|p| STREAM_PROFILES.contains(&p))
        }
        ("retention_days", Class::Camera) => int_in(value, 1, 365),
        ("admin_password_hash", Class::Camera) => value
            .as_str()
            .is_some_and(|h| h.starts_with('$') && h.len() >= 16),
        ("sample_interval_s", Class::AirSensor) => int_in(value, 1, 3600),
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(match key {
            "firmware" => "firmware must be a version string ([A-Za-z0-9.+_-], 1..32)".into(),
            "labels" => format!(
                "labels must be an object of strings with zone one of {}",
                ZONES.join("/")
            ),
            "security" => "security must be {\"services\": {name: bool}, \"default_password_changed\": bool, \"ntp\": host}".into(),
            "dimming" => "dimming must be 0..100".into(),
            "schedule" => "schedule must be {\"on\": \"HH:MM\", \"off\": \"HH:MM\"}".into(),
            "pickup_threshold" => "pickup_threshold must be 1..100".into(),
            "stream_profile" => format!("stream_profile must be one of {}", STREAM_PROFILES.join(", ")),
            "retention_days" => "retention_days must be 1..365".into(),
            "admin_password_hash" => "admin_password_hash must be a crypt-style hash ($…)".into(),
            "sample_interval_s" => "sample_interval_s must be 1..3600".into(),
            _ => format!("invalid value for {key}"),
        })
    }
}

/// Sets (or with `null` deletes) one key, with the side effects a real device
/// has: lamp power follows dimming; a new admin password hash means the
/// default password was changed.
pub fn apply(class: Class, state: &mut State, key: &str, value: &Value) {
    if class.read_only(key) {
        return; // validated as unchanged
    }
    if value.is_null() {
        state.remove(key);
    } else {
        state.insert(key.to_owned(), value.clone());
    }
    match (class, key) {
        (Class::Streetlight, "dimming") => {
            let w = value.as_u64().map_or(0, lamp_power);
            state.insert("lamp_power_w".into(), json!(w));
        }
        (Class::Camera, "admin_password_hash") if !value.is_null() => {
            if let Some(sec) = state.get_mut("security").and_then(Value::as_object_mut) {
                sec.insert("default_password_changed".into(), json!(true));
            }
        }
        _ => {}
    }
}

/// One telemetry sample (`devices/D/telemetry`), with slowly changing state
/// (a bin fills up) applied to `state`. Returns `None` for classes without
/// telemetry of their own beyond a heartbeat.
pub fn telemetry(class: Class, state: &mut State, rng: &mut Rng, unix_ms: u64) -> Value {
    match class {
        Class::Streetlight => {
            let dimming = state.get("dimming").and_then(Value::as_u64).unwrap_or(0);
            json!({"ts": unix_ms, "lamp_power_w": lamp_power(dimming), "lux": 2 + rng.below(40)})
        }
        Class::WasteBin => {
            let fill = state.get("fill_level").and_then(Value::as_u64).unwrap_or(0);
            let fill = if fill >= 100 {
                0
            } else {
                (fill + rng.below(3)).min(100)
            };
            state.insert("fill_level".into(), json!(fill));
            json!({"ts": unix_ms, "fill_level": fill, "temperature_c": 8 + rng.below(15)})
        }
        Class::Camera => {
            json!({"ts": unix_ms, "bitrate_kbps": 3500 + rng.below(1500), "motion": rng.chance(0.1)})
        }
        Class::AirSensor => {
            let pm25 = (5.0 + rng.f64() * 30.0 * 10.0).round() / 10.0;
            let no2 = (10.0 + rng.f64() * 40.0 * 10.0).round() / 10.0;
            json!({"ts": unix_ms, "pm25": pm25, "no2": no2})
        }
    }
}

/// Classes in a fleet and how many devices each has.
pub fn census(classes: &[Class]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in classes {
        *m.entry(c.as_str().to_owned()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_assigns_proportionally() {
        let mix: ClassMix = "streetlight=60,waste-bin=20,camera=15,air-sensor=5"
            .parse()
            .expect("mix");
        assert_eq!(mix, ClassMix::default());
        let classes = mix.assign(50, 1);
        let c = census(&classes);
        assert_eq!(c["streetlight"], 30);
        assert_eq!(c["waste-bin"], 10);
        assert_eq!(c.values().sum::<usize>(), 50);
        assert!("lamp=3".parse::<ClassMix>().is_err());
        assert!("camera=0".parse::<ClassMix>().is_err());
        assert!("camera".parse::<ClassMix>().is_err());
    }

    #[test]
    fn streetlight_validation() {
        let mut rng = Rng::new(1);
        let state = initial_state(Class::Streetlight, &mut rng, "2027-01-01T00:00:00Z");
        let v = |k: &str, val: Value| validate(Class::Streetlight, k, &val, &state);
        assert!(v("dimming", json!(40)).is_ok());
        assert_eq!(
            v("dimming", json!(101)),
            Err("dimming must be 0..100".into())
        );
        assert!(v("dimming", json!(-1)).is_err());
        assert!(v("dimming", json!("50")).is_err());
        assert!(v("schedule", json!({"on": "19:00", "off": "05:45"})).is_ok());
        assert!(v("schedule", json!({"on": "25:00", "off": "05:45"})).is_err());
        assert!(v("schedule", Value::Null).is_ok());
        assert!(v("firmware", Value::Null).is_err());
        assert!(v("lamp_power_w", json!(3)).is_err());
        assert!(v("class", json!("streetlight")).is_ok());
        assert!(v("class", json!("camera")).is_err());
        assert!(v("labels", json!({"zone": "north", "street": "main"})).is_ok());
        assert!(v("labels", json!({"zone": "up"})).is_err());
        assert!(v("whatever", json!([1, 2])).is_ok());
    }

    #[test]
    fn applying_has_side_effects() {
        let mut rng = Rng::new(2);
        let mut state = initial_state(Class::Streetlight, &mut rng, "");
        apply(Class::Streetlight, &mut state, "dimming", &json!(50));
        assert_eq!(state["lamp_power_w"], json!(60));
        apply(Class::Streetlight, &mut state, "schedule", &Value::Null);
        assert!(!state.contains_key("schedule"));
        let mut cam = initial_state(Class::Camera, &mut rng, "");
        cam["security"]["default_password_changed"] = json!(false);
        apply(
            Class::Camera,
            &mut cam,
            "admin_password_hash",
            &json!("$argon2id$new-hash-123"),
        );
        assert_eq!(cam["security"]["default_password_changed"], json!(true));
    }
}
