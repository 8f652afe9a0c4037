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

    /// The operator's answer for this refusal.
    pub fn response(&self, request_id: String) -> cityplane_proto::messages::Response {
        cityplane_proto::messages::Response::Rejected {
            request_id,
            code: self.code.to_owned(),
            reason: self.reason.clone(),
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
    let scan = scan(payload);
    if scan.depth > limits.max_depth {
        // Deep and malformed is reported as malformed.
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(payload) {
            return Err(bad_json(&e));
        }
        return Err(Rejection::new(
            "too_deep",
            format!(
                "nesting depth {} exceeds the limit of {}",
                scan.depth, limits.max_depth
            ),
        ));
    }
    // serde_json reads `-0` as the float -0.0 (to keep its sign), which every
    // integer field refuses; in JSON it is the integer 0. Blanking the sign
    // keeps byte offsets, so error positions still point into the original.
    let owned;
    let payload = if scan.negative_zeros.is_empty() {
        payload
    } else {
        let mut copy = payload.to_vec();
        for at in scan.negative_zeros {
            copy[at] = b' ';
        }
        owned = copy;
        &owned[..]
    };
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

struct Scan {
    /// Deepest nesting of objects and arrays.
    depth: usize,
    /// Where the `-` of each number token `-0` (no fraction, no exponent) is.
    negative_zeros: Vec<usize>,
}

/// One pass over the bytes, brackets and numbers inside strings not counted.
fn scan(json: &[u8]) -> Scan {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut negative_zeros = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    // The byte before, outside strings: a number token starts after one of these.
    let mut token_may_start = true;
    for (i, &b) in json.iter().enumerate() {
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
            b'-' if token_may_start
                && json.get(i + 1) == Some(&b'0')
                && !json
                    .get(i + 2)
                    .is_some_and(|n| n.is_ascii_digit() || matches!(n, b'.' | b'e' | b'E')) =>
            {
                negative_zeros.push(i);
            }
            _ => {}
        }
        token_may_start = matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b':' | b',' | b'[');
    }
    Scan {
        depth: max,
        negative_zeros,
    }
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

    #[test]
    fn arrays_in_place_of_objects_are_bad_schema() {
        let l = InputLimits::default();
        let code = |p: &[u8]| parse::<DesiredDoc>(p, l).expect_err("refused").code;
        assert_eq!(
            code(br#"["n", {"ids": ["a"]}, 3, {"x": 1}, null, "r-1"]"#),
            "bad_schema"
        );
        assert_eq!(
            code(br#"{"name": "n", "target": [["a"]], "state": {}}"#),
            "bad_schema"
        );
        assert_eq!(
            code(br#"{"name": "n", "target": {"ids": ["a"]}, "state": []}"#),
            "bad_schema"
        );
        let r = parse::<Reported>(br#"[3, {"a": 1}]"#, l).expect_err("refused");
        assert_eq!(r.code, "bad_schema", "{r}");
    }

    #[test]
    fn minus_zero_is_the_integer_zero() {
        let l = InputLimits::default();
        let doc = parse::<DesiredDoc>(
            br#"{"name":"n","target":{"ids":["a"]},"priority":-0,"if_generation": -0,"state":{"a":[-0,-0.5,-0e1,1e-0,"-0"]}}"#,
            l,
        )
        .expect("-0 is an integer");
        assert_eq!((doc.priority, doc.if_generation), (0, Some(0)));
        // Only the integer token changes; floats, exponents and strings do not.
        assert_eq!(
            serde_json::Value::Object(doc.state),
            serde_json::json!({"a": [0, -0.5, -0.0, 1.0, "-0"]})
        );
        let r = parse::<Reported>(b"{\"version\":\n-0,\"state\":{}}", l).expect("accepted");
        assert_eq!(r.version, 0);
        // Still not a licence for malformed numbers.
        assert_eq!(
            parse::<Reported>(br#"{"version": -01, "state": {}}"#, l)
                .expect_err("refused")
                .code,
            "bad_json"
        );
    }
}
