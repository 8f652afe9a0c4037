use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything the broker needs to start. `Default` gives the documented
/// defaults with a listener on 127.0.0.1:8883 and the PKI in `./pki`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where to listen. Port 0 picks a free port (see `RunningBroker::local_addr`).
    pub listen: SocketAddr,
    /// The directory `cityplane certs init` wrote (ca.crt, broker.crt/key, revoked.json).
    pub pki: PathBuf,
    pub limits: Limits,
    /// Where published firmware images are, one file per image named by
    /// its lowercase hex SHA-256 (the controller writes them there). The
    /// edge serves devices' `devices/D/fetch` requests from it; `None`
    /// answers every fetch with the error `no_firmware_store`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub firmware_dir: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8883)),
            pki: PathBuf::from("pki"),
            limits: Limits::default(),
            firmware_dir: None,
        }
    }
}

/// Per-connection and broker-wide limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest PUBLISH payload accepted, in bytes (AWS IoT Core uses 128 KiB).
    pub max_payload: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// PUBLISH packets per second one device or operator connection may send
    /// (a burst of one second's worth is allowed). Exceeding it disconnects
    /// the client: silently dropping QoS 1 traffic would lose data. The
    /// controller identity is exempt.
    pub max_publishes_per_sec: u32,
    /// SUBSCRIBE, UNSUBSCRIBE and PINGREQ packets per second one identity
    /// may send, over all its connections (a burst of `max_subscriptions`
    /// is allowed). Exceeding it disconnects the client.
    pub max_subscribes_per_sec: u32,
    /// Distinct topic filters one operator or controller identity may
    /// subscribe to over the broker's lifetime. rumqttd keeps a log for
    /// every filter it has seen until the process exits, so filter churn
    /// would otherwise grow memory without bound; over the cap SUBSCRIBE
    /// is refused (0x80). Devices subscribe only to their own commands.
    pub max_filters_per_identity: usize,
    /// Retained messages the broker holds (excluding the presence it
    /// publishes itself, one per device), and their total payload bytes.
    /// A retained publish over either limit is refused.
    pub max_retained: usize,
    pub max_retained_bytes: usize,
    /// Retained messages and bytes one identity may hold.
    pub max_retained_per_identity: usize,
    pub max_retained_bytes_per_identity: usize,
    /// Authenticated connections (a client certificate verified).
    pub max_connections: usize,
    /// Sockets still in the TLS handshake: they have their own budget, so
    /// certificate-less sockets cannot take the slots of authenticated
    /// clients. When it is full the oldest pending handshake is dropped to
    /// admit the new one.
    pub max_handshakes: usize,
    /// Sockets in the TLS handshake from one source address; more are
    /// closed at once.
    pub max_handshakes_per_addr: usize,
    /// Connections one identity may hold at once, counted from the end of
    /// the handshake (a new CONNECT takes a session over, so more than one
    /// is only ever transient): one stolen certificate cannot fill
    /// `max_connections` with sockets that never send CONNECT.
    pub max_connections_per_identity: usize,
    /// Time allowed for the TLS handshake.
    #[serde(with = "millis", rename = "handshake_timeout_ms")]
    pub handshake_timeout: Duration,
    /// Time allowed between the end of the handshake and a complete CONNECT.
    #[serde(with = "millis", rename = "connect_timeout_ms")]
    pub connect_timeout: Duration,
    /// How often the revocation list is checked for changes.
    #[serde(with = "millis", rename = "revocation_poll_ms")]
    pub revocation_poll: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 128 * 1024,
            max_subscriptions: 50,
            max_publishes_per_sec: 100,
            max_subscribes_per_sec: 10,
            max_filters_per_identity: 1_000,
            max_retained: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            max_retained_per_identity: 1_000,
            max_retained_bytes_per_identity: 16 * 1024 * 1024,
            // The process may hold at most ~20,000 descriptors here:
            // connections plus handshakes stay below it.
            max_connections: 15_000,
            max_handshakes: 1_024,
            max_handshakes_per_addr: 256,
            max_connections_per_identity: 4,
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            revocation_poll: Duration::from_millis(200),
        }
    }
}

impl Limits {
    /// Largest frame accepted: the payload limit plus 4 KiB for the topic and
    /// headers. A declared length above it is refused before the body is read.
    pub fn max_frame(&self) -> usize {
        self.max_payload + 4096
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
