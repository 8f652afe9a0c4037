//! Certificate serial numbers and their one canonical spelling.
//!
//! A serial is shown, stored and compared as lowercase hex without colons and
//! without leading zero bytes (so the DER sign-padding byte `00` never shows).

use crate::CertError;

/// Length of the serials this CA issues.
pub(crate) const SERIAL_LEN: usize = 16;

/// A random positive 16-byte serial whose first byte is never zero, so its DER
/// encoding is exactly these 16 bytes and its canonical hex is 32 characters.
pub(crate) fn random_serial() -> Result<[u8; SERIAL_LEN], CertError> {
    let mut bytes = [0u8; SERIAL_LEN];
    getrandom::getrandom(&mut bytes).map_err(|e| CertError::Random(e.to_string()))?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 1;
    }
    Ok(bytes)
}

/// Canonical hex of the bytes of a DER INTEGER (as x509-parser's `raw_serial`
/// returns them).
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    to_hex(strip_leading_zeros(raw))
}

fn strip_leading_zeros(mut raw: &[u8]) -> &[u8] {
    while raw.len() > 1 && raw[0] == 0 {
        raw = &raw[1..];
    }
    raw
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Decodes a serial the way a human may type it (`0A:1b:…`, `00a1…`, odd
/// length) into its bytes, without leading zero bytes.
pub(crate) fn parse_serial(input: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = input
        .trim()
        .bytes()
        .filter(|b| *b != b':')
        .map(|b| {
            char::from(b)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        })
        .collect::<Option<_>>()?;
    if digits.is_empty() || digits.len() > 64 {
        return None;
    }
    let mut padded = Vec::with_capacity(digits.len() + 1);
    if digits.len() % 2 == 1 {
        padded.push(0);
    }
    padded.extend(digits);
    let bytes: Vec<u8> = padded.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    Some(strip_leading_zeros(&bytes).to_vec())
}

/// Returns the canonical spelling of a serial (lowercase hex, no colons, no
/// leading zero bytes), or `None` if `input` is not hexadecimal.
///
/// `normalize_serial("00:A1:02") == Some("a102".into())`
pub fn normalize_serial(input: &str) -> Option<String> {
    parse_serial(input).map(|b| to_hex(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_have_one_spelling() {
        assert_eq!(normalize_serial("00:A1:02").as_deref(), Some("a102"));
        assert_eq!(normalize_serial("a102").as_deref(), Some("a102"));
        assert_eq!(normalize_serial("abc").as_deref(), Some("0abc"));
        assert_eq!(normalize_serial("0").as_deref(), Some("00"));
        assert_eq!(normalize_serial(""), None);
        assert_eq!(normalize_serial("dev0001"), None);
        assert_eq!(serial_hex(&[0, 0x80, 1]), "8001");
    }

    #[test]
    fn random_serials_are_positive_and_full_length() {
        for _ in 0..1000 {
            let s = random_serial().expect("rng");
            assert!(s[0] != 0 && s[0] < 0x80);
            assert_eq!(serial_hex(&s).len(), 32);
        }
    }
}
