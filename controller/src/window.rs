//! STUB: replaced by the maintenance-window module (branch fwcli).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: String,
    pub end: String,
    pub tz: String,
}

impl Window {
    pub fn validate(&self) -> Result<(), String> {
        Ok(())
    }
    pub fn is_open(&self, _now_ms: u64) -> bool {
        true
    }
    pub fn next_open(&self, now_ms: u64) -> u64 {
        now_ms
    }
    pub fn describe(&self) -> String {
        format!("{}–{} {}", self.start, self.end, self.tz)
    }
}

pub fn jitter_ms(device_id: &str, salt: u64, spread_ms: u64) -> u64 {
    if spread_ms == 0 {
        return 0;
    }
    let mut h: u64 = 0xcbf29ce484222325 ^ salt;
    for b in device_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h % spread_ms
}
