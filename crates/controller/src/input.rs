//! Untrusted bytes in, typed messages out: size, depth and schema checks for
//! everything the controller receives.

use serde::de::DeserializeOwned;

/// Why an input was refused; `code` is the stable machine-readable part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Rejection {
    pub code: &'static str,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Rejection {
            code,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    pub max_bytes: usize,
    pub max_depth: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_bytes: 64 * 1024,
            max_depth: 16,
        }
    }
}

/// Parses a JSON document of type `T`, refusing oversize, overly nested,
/// malformed, mistyped and unknown-field input with a precise reason.
pub fn parse<T: DeserializeOwned>(payload: &[u8], limits: InputLimits) -> Result<T, Rejection> {
    if payload.len() > limits.max_bytes {
        return Err(Rejection::new(
            "too_large",
            format!(
                "document of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                limits.max_bytes
            ),
        ));
    }
    // The depth is checked on the bytes, so a document is parsed once,
    // straight into its type (reports arrive tens of thousands a second).
    let depth = nesting_depth(payload);
    if depth > limits.max_depth {
        // Deep and malformed is reported as malformed.
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
            return Err(bad_json(&e));
        }
        return Err(Rejection::new(
            "too_deep",
            format!(
                "nesting depth {depth} exceeds the limit of {}",
                limits.max_depth
            ),
        ));
    }
    serde_json::from_slice(payload).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            let msg = e.to_string();
            let code = if msg.contains("unknown field") {
                "unknown_field"
            } else {
                "bad_schema"
            };
            Rejection::new(code, msg)
        }
        _ => bad_json(&e),
    })
}

fn bad_json(e: &serde_json::Error) -> Rejection {
    Rejection::new("bad_json", format!("not valid JSON: {e}"))
}

/// Deepest nesting of objects and arrays, brackets inside strings not counted.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;
    use cityplane_proto::messages::{DesiredDoc, Reported};

    #[test]
    fn every_kind_of_bad_input_has_its_code() {
        let l = InputLimits {
            max_bytes: 200,
            max_depth: 4,
        };
        let code = |p: &[u8]| parse::<Reported>(p, l).expect_err("refused").code;
        assert_eq!(code(b"{not json"), "bad_json");
        assert_eq!(code(br#"{"version": "one", "state": {}}"#), "bad_schema");
        assert_eq!(
            code(br#"{"version": 1, "state": {}, "extra": 1}"#),
            "unknown_field"
        );
        assert_eq!(
            code(br#"{"version": 1, "state": {"a": [[[[1]]]]}}"#),
            "too_deep"
        );
        assert_eq!(code(&[b' '; 201]), "too_large");
        assert_eq!(
            code(br#"{"version": 1, "state": {"a": [[[[1]]]"#),
            "bad_json"
        );
        // Brackets inside strings are text, not nesting.
        assert!(parse::<Reported>(br#"{"version": 1, "state": {"a": "[[[[\"{{{{"}}"#, l).is_ok());
        assert!(parse::<Reported>(br#"{"version": 1, "state": {"a": 1}}"#, l).is_ok());
        let doc = br#"{"name": "x", "target": {"class": "camera", "colour": "red"}, "state": {}}"#;
        assert!(parse::<DesiredDoc>(doc, InputLimits::default()).is_err());
    }
}
