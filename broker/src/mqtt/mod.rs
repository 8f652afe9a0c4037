//! Strict MQTT 3.1.1 framing and validation.
//!
//! Every byte from the network is checked here before anything else sees it.
//! Only frames that pass are decoded by rumqttd's v4 codec (the router's own
//! types; `Publish`'s QoS and packet id can only be set through that decoder)
//! and handed to the router.

mod frame;
mod inbound;

pub use frame::{next_frame, Frame, FrameError};
pub use inbound::{parse, Inbound, ProtocolError, Will};

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

/// SUBACK refusing every filter of a SUBSCRIBE (return code 0x80).
pub fn suback_failure(pkid: u16, filters: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + filters + 4);
    out.push(0x90);
    encode_remaining_length(2 + filters, &mut out);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend(std::iter::repeat_n(0x80, filters));
    out
}

/// Builds the wire bytes of a PUBLISH (used for wills, which we publish ourselves).
pub fn encode_publish(topic: &str, payload: &[u8], qos: u8, retain: bool, pkid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + 2 + topic.len() + 2 + payload.len());
    out.push(0x30 | (qos << 1) | u8::from(retain));
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    encode_remaining_length(len, &mut out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

pub fn encode_remaining_length(mut len: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}
