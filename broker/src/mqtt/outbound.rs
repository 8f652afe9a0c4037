//! What the edge sends: packets it writes to clients itself (CONNACK, acks,
//! SUBACK, PINGRESP, commands to devices) and the router packets it makes (wills,
//! presence, DISCONNECT). rumqttd's `Publish` keeps QoS and packet id
//! private, so a router packet with either is built as wire bytes and read
//! back through rumqttd's own decoder.

use bytes::BytesMut;
use cityplane_proto::firmware::{encode_blob, BlobHeader};
use cityplane_proto::messages::Presence;
use cityplane_proto::topics;
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Packet, Protocol};

use super::{AckKind, Will};

/// Return code 0x05 in CONNACK: "connection refused, not authorized".
pub const CONNACK_NOT_AUTHORIZED: u8 = 0x05;
/// Return code 0x01 in CONNACK: unacceptable protocol version.
pub const CONNACK_BAD_PROTOCOL: u8 = 0x01;
/// Return code 0x02 in CONNACK: identifier rejected.
pub const CONNACK_BAD_CLIENT_ID: u8 = 0x02;
/// Return code 0x03 in CONNACK: server unavailable.
pub const CONNACK_UNAVAILABLE: u8 = 0x03;

pub fn connack(session_present: bool, code: u8) -> [u8; 4] {
    [0x20, 0x02, u8::from(session_present && code == 0), code]
}

pub const PINGRESP: [u8; 2] = [0xD0, 0x00];

const SUBACK: u8 = 0x90;
const UNSUBACK: u8 = 0xB0;
/// SUBACK return code of a refused filter.
pub const SUBACK_FAILURE: u8 = 0x80;

/// SUBACK refusing every filter of a SUBSCRIBE (return code 0x80).
pub fn suback_failure(pkid: u16, filters: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + filters + 4);
    suback(pkid, std::iter::repeat_n(SUBACK_FAILURE, filters), &mut out);
    out
}

/// SUBACK with one return code per filter.
fn suback(pkid: u16, codes: impl ExactSizeIterator<Item = u8>, out: &mut impl Extend<u8>) {
    out.extend([SUBACK]);
    encode_remaining_length(2 + codes.len(), out);
    out.extend(pkid.to_be_bytes());
    out.extend(codes);
}

/// `header` (PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK) for `pkid`.
fn ack(header: u8, pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [header, 0x02, hi, lo]
}

/// Builds the wire bytes of a PUBLISH (used for wills, which we publish ourselves).
pub fn encode_publish(topic: &str, payload: &[u8], qos: u8, retain: bool, pkid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + 2 + topic.len() + 2 + payload.len());
    write_publish(&mut out, topic.as_bytes(), payload, qos, retain, pkid);
    out
}

/// [`encode_publish`] appended to `out`. `topic` must be at most 65,535
/// bytes (the length prefix), as every topic the broker accepted is.
pub(crate) fn write_publish<B: bytes::BufMut + Extend<u8>>(
    out: &mut B,
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
) {
    out.put_u8(0x30 | (qos << 1) | u8::from(retain));
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    encode_remaining_length(len, out);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

/// A blob for `device`: a QoS 0 PUBLISH on `devices/<device>/blob` whose
/// payload is `encode_blob(header, bytes)`, appended to `out`. The `len`
/// image bytes are written by `fill` straight into `out` (read from the
/// image file), so a chunk is copied once; if `fill` fails nothing is left
/// in `out`.
pub(crate) fn blob_publish(
    out: &mut BytesMut,
    device: &str,
    header: &BlobHeader,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let topic = topics::blob(device);
    // The header line and its `\n`: `encode_blob` without bytes, so the
    // payload format stays defined in one place.
    let head = encode_blob(header, &[]);
    let start = out.len();
    out.reserve(5 + 2 + topic.len() + head.len() + len);
    out.extend_from_slice(&[0x30]);
    encode_remaining_length(2 + topic.len() + head.len() + len, out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&head);
    let at = out.len();
    out.resize(at + len, 0);
    fill(&mut out[at..]).inspect_err(|_| out.truncate(start))
}

pub fn encode_remaining_length(mut len: usize, out: &mut impl Extend<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.extend([byte]);
        if len == 0 {
            break;
        }
    }
}

/// A packet the edge writes to a client on its own (not one the router sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Ack(AckKind, u16),
    UnsubAck(u16),
    PingResp,
    /// One return code per filter of the SUBSCRIBE. (A boxed slice, not a
    /// `Vec`: every session's task holds room for one of these.)
    SubAck {
        pkid: u16,
        codes: Box<[u8]>,
    },
}

impl Outbound {
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Outbound::Ack(kind, pkid) => out.extend_from_slice(&ack(kind.header(), *pkid)),
            Outbound::UnsubAck(pkid) => out.extend_from_slice(&ack(UNSUBACK, *pkid)),
            Outbound::PingResp => out.extend_from_slice(&PINGRESP),
            Outbound::SubAck { pkid, codes } => suback(*pkid, codes.iter().copied(), out),
        }
    }
}

/// rumqttd's decoder is the only way to build its `Publish` with a QoS and
/// packet id, so validated frames go through it.
pub fn decode(raw: &[u8]) -> Option<Packet> {
    let mut buf = BytesMut::from(raw);
    V4.read_mut(&mut buf, usize::MAX).ok()
}

/// Whether `publish` is QoS 0. rumqttd keeps the QoS private; its public
/// `len` counts a packet id exactly when there is one (QoS 1 and 2).
/// `tests::qos0_is_told_from_qos1_and_2` holds this against a rumqttd upgrade.
pub(crate) fn is_qos0(publish: &rumqttd::protocol::Publish) -> bool {
    publish.len() == 2 + publish.topic.len() + publish.payload.len()
}

/// A validated QoS 2 PUBLISH frame decoded as QoS 1 (see `session::core`:
/// device QoS 2 is routed at least once).
pub(crate) fn decode_as_qos1(raw: &[u8]) -> Option<Packet> {
    let mut buf = BytesMut::from(raw);
    let first = buf.first_mut()?;
    *first = (*first & !0b0110) | 0b0010;
    V4.read_mut(&mut buf, usize::MAX).ok()
}

/// A PUBLISH for an in-process link (see `crate::link_publish`).
pub(crate) fn link_publish(
    topic: &str,
    payload: &[u8],
    qos1: bool,
    retain: bool,
    pkid: u16,
) -> Option<Packet> {
    decode(&encode_publish(
        topic,
        payload,
        u8::from(qos1),
        retain,
        pkid.max(1),
    ))
}

/// Presence, retained, QoS 0, on the device's presence topic:
/// `{"online":true,"serial":"<hex>"}` with the serial of the certificate the
/// session authenticated with (`Some`), so readers learn which certificate a
/// device uses (a rotation is done when the new serial comes online), or
/// `{"online":false}` (`None`), which is also all a device's will may say.
pub(crate) fn presence_packet(device: &str, online_serial: Option<&str>) -> Option<Packet> {
    let body = Presence {
        online: online_serial.is_some(),
        serial: online_serial.map(str::to_owned),
    };
    let body = serde_json::to_vec(&body).ok()?;
    link_publish(&topics::presence(device), &body, false, true, 0)
}

/// A will as the router's packet. QoS 2 is sent as QoS 1: the router holds a
/// QoS 2 publish until a PUBREL that a will never gets.
pub(crate) fn will_packet(will: &Will) -> Option<Packet> {
    let frame = encode_publish(
        &will.topic,
        &will.payload,
        will.qos.min(1),
        will.retain,
        u16::MAX,
    );
    decode(&frame)
}

pub(crate) fn disconnect_packet() -> Packet {
    use rumqttd::protocol::{Disconnect, DisconnectReasonCode};
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos0_is_told_from_qos1_and_2() {
        for qos in 0..=2u8 {
            let frame = encode_publish("devices/d1/telemetry", b"{}", qos, false, 7);
            let Some(Packet::Publish(publish, _)) = decode(&frame) else {
                panic!("not decoded");
            };
            assert_eq!(is_qos0(&publish), qos == 0, "QoS {qos}");
        }
    }

    fn wire(packet: Outbound) -> Vec<u8> {
        let mut out = BytesMut::new();
        packet.encode(&mut out);
        out.to_vec()
    }

    #[test]
    fn acks_carry_their_type_and_packet_id() {
        assert_eq!(
            wire(Outbound::Ack(AckKind::PubAck, 0x0102)),
            [0x40, 2, 1, 2]
        );
        assert_eq!(wire(Outbound::Ack(AckKind::PubRec, 7)), [0x50, 2, 0, 7]);
        assert_eq!(wire(Outbound::Ack(AckKind::PubRel, 7)), [0x62, 2, 0, 7]);
        assert_eq!(wire(Outbound::Ack(AckKind::PubComp, 7)), [0x70, 2, 0, 7]);
        assert_eq!(wire(Outbound::UnsubAck(9)), [0xB0, 2, 0, 9]);
        assert_eq!(wire(Outbound::PingResp), PINGRESP);
    }

    #[test]
    fn subacks_list_one_code_per_filter() {
        let granted = wire(Outbound::SubAck {
            pkid: 3,
            codes: Box::new([1, 0]),
        });
        assert_eq!(granted, [0x90, 4, 0, 3, 1, 0]);
        assert_eq!(suback_failure(3, 2), [0x90, 4, 0, 3, 0x80, 0x80]);
    }

    #[test]
    fn a_blob_is_a_qos0_publish_of_encode_blob() {
        let header = BlobHeader {
            sha256: "ab".repeat(32),
            offset: 7,
            total: 300,
            error: None,
        };
        let bytes = vec![0x0A; 200];
        let mut out = BytesMut::from(&b"before"[..]);
        blob_publish(&mut out, "d1", &header, bytes.len(), |buf| {
            buf.copy_from_slice(&bytes);
            Ok(())
        })
        .expect("filled");
        let payload = encode_blob(&header, &bytes);
        assert_eq!(
            &out[6..],
            &encode_publish(&topics::blob("d1"), &payload, 0, false, 0)[..]
        );
        let failed = blob_publish(&mut out, "d1", &header, 10, |_| {
            Err(std::io::Error::other("disk gone"))
        });
        assert!(failed.is_err());
        assert_eq!(
            out.len(),
            6 + encode_publish(&topics::blob("d1"), &payload, 0, false, 0).len()
        );
    }

    #[test]
    fn a_qos2_publish_is_decoded_as_qos1() {
        let frame = encode_publish("t", b"x", 2, false, 5);
        let packet = decode_as_qos1(&frame).expect("decodes");
        let mut again = BytesMut::new();
        V4.write(packet, &mut again).expect("encodes");
        let mut qos1 = encode_publish("t", b"x", 1, false, 5);
        qos1[0] = 0x32;
        assert_eq!(again.to_vec(), qos1);
    }
}
