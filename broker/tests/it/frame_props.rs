//! Property tests of `mqtt::next_frame` and `mqtt::parse`, the first code
//! every byte from the network meets: arbitrary input never panics, a
//! declared length over the limit is refused before the body is there, a
//! frame is exactly what its fixed header declares, and `parse` answers
//! Ok or Err for any frame.
//!
//! The default run is 2,000 cases per property (well under a second). The
//! long fuzz run repeats every property with fresh random seeds for
//! `CITYPLANE_FUZZ_SECS` seconds (default 300):
//!
//! ```sh
//! cargo test -p cityplane-broker --test it frame_props -- --ignored --nocapture
//! ```

use bytes::BytesMut;
use cityplane_broker::mqtt::{encode_remaining_length, next_frame, parse, FrameError, Inbound};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const CI_CASES: u32 = 2_000;
const LONG_ROUND_CASES: u32 = 20_000;
/// Limits small enough that arbitrary lengths often exceed them.
const MAX_FRAME: std::ops::RangeInclusive<usize> = 0..=300;
const MAX_PAYLOAD: usize = 64;

/// What the fixed header of `data` declares, decoded here independently of
/// `next_frame`: `None` while the length bytes are incomplete, `Err` for a
/// fifth length byte, else (length, bytes of fixed header).
fn declared(data: &[u8]) -> Option<Result<(usize, usize), ()>> {
    let mut len = 0usize;
    for i in 0..4 {
        let byte = *data.get(1 + i)?;
        len += usize::from(byte & 0x7F) * 128usize.pow(i as u32);
        if byte & 0x80 == 0 {
            return Some(Ok((len, 2 + i)));
        }
    }
    // Four length bytes, the fourth still says "more follows".
    Some(Err(()))
}

/// `next_frame` on arbitrary bytes agrees with the fixed header they carry.
fn next_frame_agrees_with_the_header(
    (data, max_frame): (Vec<u8>, usize),
) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(&data[..]);
    let got = next_frame(&mut buf, max_frame);
    let Some(decl) = declared(&data) else {
        prop_assert!(matches!(got, Ok(None)), "incomplete header: {got:?}");
        prop_assert_eq!(&buf[..], &data[..], "nothing consumed while waiting");
        return Ok(());
    };
    let Ok((len, head)) = decl else {
        prop_assert_eq!(got.err(), Some(FrameError::MalformedLength));
        return Ok(());
    };
    if len > max_frame {
        prop_assert_eq!(
            got.err(),
            Some(FrameError::TooLarge {
                declared: len,
                limit: max_frame
            })
        );
    } else if data.len() < head + len {
        prop_assert!(matches!(got, Ok(None)), "incomplete body: {got:?}");
        prop_assert_eq!(&buf[..], &data[..], "nothing consumed while waiting");
    } else {
        let frame = got
            .map_err(|e| TestCaseError::fail(format!("complete frame refused: {e}")))?
            .ok_or_else(|| TestCaseError::fail("complete frame not returned"))?;
        prop_assert_eq!(frame.header, data[0]);
        prop_assert_eq!(&frame.raw[..], &data[..head + len]);
        prop_assert_eq!(frame.body().len(), len);
        prop_assert_eq!(&buf[..], &data[head + len..], "the rest stays buffered");
    }
    Ok(())
}

/// A declared length over the limit is refused as soon as the length bytes
/// are in, whatever part of the body (none, some, all) has arrived.
fn oversized_is_refused_before_the_body(
    (header, extra, max_frame, body_part): (u8, usize, usize, Vec<u8>),
) -> Result<(), TestCaseError> {
    let len = max_frame + 1 + extra;
    let mut data = vec![header];
    encode_remaining_length(len, &mut data);
    data.extend_from_slice(&body_part[..body_part.len().min(len)]);
    let mut buf = BytesMut::from(&data[..]);
    prop_assert_eq!(
        next_frame(&mut buf, max_frame).err(),
        Some(FrameError::TooLarge {
            declared: len,
            limit: max_frame
        })
    );
    Ok(())
}

/// Well-formed frames back to back, delivered in arbitrary pieces, come out
/// one by one, each exactly as declared, never early.
fn frames_in_pieces_come_out_whole(
    (frames, cuts): (Vec<(u8, Vec<u8>)>, Vec<usize>),
) -> Result<(), TestCaseError> {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for (header, body) in &frames {
        let start = wire.len();
        wire.push(*header);
        encode_remaining_length(body.len(), &mut wire);
        wire.extend_from_slice(body);
        expected.push(wire[start..].to_vec());
    }
    let max_frame = frames.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut fed = 0;
    let mut cuts = cuts.into_iter();
    while fed < wire.len() {
        let step = cuts.next().unwrap_or(wire.len()).clamp(1, wire.len() - fed);
        buf.extend_from_slice(&wire[fed..fed + step]);
        fed += step;
        while let Some(frame) = next_frame(&mut buf, max_frame)
            .map_err(|e| TestCaseError::fail(format!("valid frame refused: {e}")))?
        {
            got.push(frame.raw.to_vec());
        }
    }
    prop_assert_eq!(got, expected);
    prop_assert!(buf.is_empty());
    Ok(())
}

/// `parse` answers any frame, and what it accepts obeys the rules callers
/// rely on.
fn parse_answers_any_frame((header, body): (u8, Vec<u8>)) -> Result<(), TestCaseError> {
    let mut wire = vec![header];
    encode_remaining_length(body.len(), &mut wire);
    wire.extend_from_slice(&body);
    let mut buf = BytesMut::from(&wire[..]);
    let frame = next_frame(&mut buf, usize::MAX)
        .map_err(|e| TestCaseError::fail(format!("{e}")))?
        .ok_or_else(|| TestCaseError::fail("complete frame not returned"))?;
    match parse(&frame, MAX_PAYLOAD) {
        Err(_) => {}
        Ok(Inbound::Publish {
            topic,
            qos,
            payload_len,
            ..
        }) => {
            prop_assert!(!topic.is_empty() && !topic.contains(['+', '#', '\0']));
            prop_assert!(qos <= 2);
            prop_assert!(payload_len <= MAX_PAYLOAD);
        }
        Ok(Inbound::Subscribe { filters, .. }) => {
            prop_assert!(!filters.is_empty());
            prop_assert!(filters.iter().all(|(f, q)| !f.is_empty() && *q <= 2));
        }
        Ok(Inbound::Unsubscribe { filters, .. }) => prop_assert!(!filters.is_empty()),
        Ok(_) => {}
    }
    Ok(())
}

/// Arbitrary headers and bodies, and bodies that start like each packet
/// type's variable header so the parser gets past its first checks.
fn frame_bodies() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let any_body = prop::collection::vec(any::<u8>(), 0..200);
    let prefixed = |prefix: &'static [u8]| {
        prop::collection::vec(any::<u8>(), 0..120).prop_map(move |tail| {
            let mut body = prefix.to_vec();
            body.extend(tail);
            body
        })
    };
    prop_oneof![
        (any::<u8>(), any_body),
        (Just(0x10), prefixed(&[0, 4, b'M', b'Q', b'T', b'T', 4])),
        ((0x30u8..=0x3F), prefixed(&[0, 3, b'a', b'/', b'b'])),
        (Just(0x82), prefixed(&[0, 1, 0, 3])),
        (Just(0xA2), prefixed(&[0, 1, 0, 3])),
    ]
}

fn run<S: Strategy>(
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, property) {
        panic!("{e}");
    }
}

fn all_properties(cases: u32) {
    // Short inputs with a 0x80-heavy alphabet reach every branch of the
    // length decoding; long ones complete frames.
    let bytes = prop_oneof![
        prop::collection::vec(prop_oneof![Just(0x80u8), Just(0xFF), any::<u8>()], 0..8),
        prop::collection::vec(any::<u8>(), 0..400),
    ];
    run(cases, (bytes, MAX_FRAME), next_frame_agrees_with_the_header);
    run(
        cases,
        (
            any::<u8>(),
            0usize..100_000_000,
            MAX_FRAME,
            prop::collection::vec(any::<u8>(), 0..400),
        ),
        oversized_is_refused_before_the_body,
    );
    run(
        cases,
        (
            prop::collection::vec(
                (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)),
                1..6,
            ),
            prop::collection::vec(1usize..64, 0..40),
        ),
        frames_in_pieces_come_out_whole,
    );
    run(cases, frame_bodies(), parse_answers_any_frame);
}

#[test]
fn framing_and_parsing_hold_for_arbitrary_bytes() {
    all_properties(CI_CASES);
}

/// The long fuzz run (see the module doc).
#[test]
#[ignore = "long fuzz run, minutes"]
fn long_fuzz_of_framing_and_parsing() {
    let secs: u64 = std::env::var("CITYPLANE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut rounds = 0u64;
    while std::time::Instant::now() < until {
        // Each round draws a fresh random seed.
        all_properties(LONG_ROUND_CASES);
        rounds += 1;
    }
    println!("{rounds} rounds of {LONG_ROUND_CASES} cases per property");
}
