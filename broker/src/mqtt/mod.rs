//! Strict MQTT 3.1.1 framing and validation.
//!
//! Every byte from the network is checked here before anything else sees it.
//! Only frames that pass are decoded by rumqttd's v4 codec (the router's own
//! types; `Publish`'s QoS and packet id can only be set through that decoder)
//! and handed to the router. What the edge sends back is built in `outbound`.

mod frame;
mod inbound;
pub(crate) mod outbound;

pub use frame::{next_frame, Frame, FrameError};
pub use inbound::{parse, AckKind, Inbound, ProtocolError, Will};
pub use outbound::{
    connack, encode_publish, encode_remaining_length, suback_failure, Outbound,
    CONNACK_BAD_CLIENT_ID, CONNACK_BAD_PROTOCOL, CONNACK_NOT_AUTHORIZED, CONNACK_UNAVAILABLE,
    PINGRESP,
};
