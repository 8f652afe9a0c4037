//! A small MQTT 3.1.1 client over mutual TLS: just what a device needs.
//!
//! CONNECT/CONNACK (clean session, will, keep-alive), SUBSCRIBE/SUBACK,
//! PUBLISH with QoS 0 and 1 (PUBACK both ways), PINGREQ/PINGRESP and
//! DISCONNECT. No QoS 2, no session resumption, no retransmission: with a
//! clean session nothing survives a reconnect anyway, and a device re-sends
//! its full state on every connect.
//!
//! The packets are rumqttc's codec (`mqttbytes::v4`); the client around it
//! is our own. Why not rumqttc's client: it costs ~55 KiB per client
//! (request channel, inflight array, 10 KiB buffers). This one keeps one TLS
//! stream and one read buffer that is released when empty, so a connected
//! client costs little more than rustls' own per-connection state.
//!
//! Hand-made bytes go through [`Client::queue_raw`]: the rogue mode's
//! deliberately bad packets.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, v4};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
pub const CONNACK_ACCEPTED: u8 = 0;
pub const CONNACK_NOT_AUTHORIZED: u8 = 5;
/// SUBACK return code of a refused filter.
pub const SUBACK_FAILURE: u8 = 0x80;

/// Largest packet a client accepts from the broker (the cityplane payload
/// limit plus room for the topic and headers).
pub const DEFAULT_MAX_INBOUND: usize = 128 * 1024 + 4096;

/// The last will a client registers in CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

/// What goes into CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectOptions<'a> {
    pub client_id: &'a str,
    /// Seconds; 0 disables keep-alive.
    pub keep_alive: u16,
    pub clean_session: bool,
    pub will: Option<&'a Will>,
}

/// An inbound PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// 0 for QoS 0.
    pub pkid: u16,
}

/// Packets a client can receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    ConnAck { session_present: bool, code: u8 },
    Publish(Publish),
    PubAck(u16),
    SubAck { pkid: u16, codes: Vec<u8> },
    UnsubAck(u16),
    PingResp,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("timed out")]
    Timeout,
    #[error("TCP connect failed: {0}")]
    Tcp(io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("CONNACK refused the connection with return code {0}")]
    Refused(u8),
    #[error("connection closed by the broker")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A packet this client was asked to send cannot be encoded (a QoS
    /// above 2, a packet over 256 MiB): reported by the next flush.
    #[error("cannot encode a packet: {0}")]
    Encode(mqttbytes::Error),
}

impl ClientError {
    /// A short, stable label for counting failures by reason.
    pub fn label(&self) -> String {
        match self {
            ClientError::Timeout => "timeout".into(),
            ClientError::Tcp(e) => format!("tcp: {}", e.kind()),
            ClientError::Tls(e) => format!("tls: {e}"),
            ClientError::Refused(code) => format!("connack refused ({code})"),
            ClientError::Closed => "closed by broker".into(),
            ClientError::Io(e) => format!("io: {}", e.kind()),
            ClientError::Protocol(_) => "protocol error".into(),
            ClientError::Encode(_) => "encode error".into(),
        }
    }
}

/// Takes one whole packet off the front of `buf`, or `Ok(None)` if more
/// bytes are needed. A packet longer than `max_packet` (remaining length)
/// or one a broker never sends a client is an error.
fn decode(buf: &mut BytesMut, max_packet: usize) -> Result<Option<Packet>, String> {
    let packet = match v4::Packet::read(buf, max_packet) {
        Ok(packet) => packet,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    Ok(Some(match packet {
        v4::Packet::ConnAck(ack) => Packet::ConnAck {
            session_present: ack.session_present,
            code: ack.code as u8,
        },
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            topic: p.topic,
            payload: p.payload.to_vec(),
            qos: p.qos as u8,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
        }),
        v4::Packet::PubAck(ack) => Packet::PubAck(ack.pkid),
        v4::Packet::SubAck(ack) => Packet::SubAck {
            pkid: ack.pkid,
            codes: ack
                .return_codes
                .into_iter()
                .map(|code| match code {
                    v4::SubscribeReasonCode::Success(qos) => qos as u8,
                    v4::SubscribeReasonCode::Failure => SUBACK_FAILURE,
                })
                .collect(),
        },
        v4::Packet::UnsubAck(ack) => Packet::UnsubAck(ack.pkid),
        v4::Packet::PingResp => Packet::PingResp,
        other => return Err(format!("unexpected packet from the broker: {other:?}")),
    }))
}

/// The bytes of one well-formed packet, for a caller that sends them with
/// [`Client::queue_raw`] (the rogue mode spoils some of them).
pub fn encode(packet: &v4::Packet) -> Result<BytesMut, ClientError> {
    let mut buf = BytesMut::new();
    packet
        .write(&mut buf, usize::MAX)
        .map_err(ClientError::Encode)?;
    Ok(buf)
}

/// CONNECT, MQTT 3.1.1, without username or password (identity is the
/// client certificate).
fn connect_packet(opts: &ConnectOptions<'_>) -> Result<v4::Connect, mqttbytes::Error> {
    let last_will = match opts.will {
        Some(w) => Some(v4::LastWill {
            topic: w.topic.clone(),
            message: Bytes::copy_from_slice(&w.payload),
            qos: mqttbytes::qos(w.qos)?,
            retain: w.retain,
        }),
        None => None,
    };
    Ok(v4::Connect {
        protocol: mqttbytes::Protocol::V4,
        keep_alive: opts.keep_alive,
        client_id: opts.client_id.to_owned(),
        clean_session: opts.clean_session,
        last_will,
        login: None,
    })
}

/// A TLS connection to the broker, before or after CONNECT.
pub struct Client {
    stream: TlsStream<TcpStream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// The first packet since the last flush that could not be encoded.
    unencodable: Option<mqttbytes::Error>,
    max_inbound: usize,
    next_pkid: u16,
}

/// The TLS name to check the broker's certificate against: the host part of
/// `host:port` (an IP address or a DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("invalid TLS server name {host:?}: {e}"))
}

impl Client {
    /// TCP (with TCP_NODELAY) and the TLS handshake; no MQTT yet.
    pub async fn connect_tls(
        addr: SocketAddr,
        server_name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Client, ClientError> {
        let tcp = TcpStream::connect(addr).await.map_err(ClientError::Tcp)?;
        tcp.set_nodelay(true).map_err(ClientError::Tcp)?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(server_name, tcp)
            .await
            .map_err(ClientError::Tls)?;
        Ok(Client {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            unencodable: None,
            max_inbound: DEFAULT_MAX_INBOUND,
            next_pkid: 0,
        })
    }

    /// TCP, TLS, CONNECT and CONNACK, all within `timeout`. A CONNACK with a
    /// non-zero code is [`ClientError::Refused`].
    pub async fn connect(
        addr: SocketAddr,
        server_name: ServerName<'static>,
        tls: Arc<rustls::ClientConfig>,
        opts: &ConnectOptions<'_>,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let work = async {
            let mut client = Client::connect_tls(addr, server_name, tls).await?;
            client.send_connect(opts).await?;
            match client.recv().await? {
                Packet::ConnAck {
                    code: CONNACK_ACCEPTED,
                    ..
                } => Ok(client),
                Packet::ConnAck { code, .. } => Err(ClientError::Refused(code)),
                other => Err(ClientError::Protocol(format!(
                    "expected CONNACK, got {other:?}"
                ))),
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Sends CONNECT (see [`ConnectOptions`]).
    pub async fn send_connect(&mut self, opts: &ConnectOptions<'_>) -> Result<(), ClientError> {
        self.queue_packet(|buf| connect_packet(opts)?.write(buf));
        self.flush().await
    }

    /// The next packet id (1..=65535, wrapping).
    pub fn next_pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1);
        if self.next_pkid == 0 {
            self.next_pkid = 1;
        }
        self.next_pkid
    }

    /// Encodes one packet at the end of the write buffer. A packet that
    /// cannot be encoded leaves nothing behind and fails the next flush.
    fn queue_packet(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>,
    ) {
        let before = self.wbuf.len();
        if let Err(e) = write(&mut self.wbuf) {
            self.wbuf.truncate(before);
            self.unencodable.get_or_insert(e);
        }
    }

    /// Queues a PUBLISH (sent by [`flush`](Self::flush)); returns its packet
    /// id (0 for QoS 0). Copies topic and payload; a caller that has them
    /// as owned buffers passes them to
    /// [`queue_publish_owned`](Self::queue_publish_owned) instead.
    pub fn queue_publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> u16 {
        self.queue_publish_owned(topic.to_owned(), payload.to_vec(), qos, retain)
    }

    /// [`queue_publish`](Self::queue_publish) taking the topic and payload
    /// the caller built: encoded without copying them first.
    pub fn queue_publish_owned(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        qos: u8,
        retain: bool,
    ) -> u16 {
        let pkid = if qos > 0 { self.next_pkid() } else { 0 };
        self.queue_packet(|buf| {
            v4::Publish {
                dup: false,
                qos: mqttbytes::qos(qos)?,
                retain,
                topic,
                pkid,
                // Exact size (a shrink in place), so `Bytes` takes the
                // buffer over without allocating a shared header.
                payload: Bytes::from(payload.into_boxed_slice()),
            }
            .write(buf)
        });
        pkid
    }

    /// Queues a SUBSCRIBE with one filter; returns its packet id.
    pub fn queue_subscribe(&mut self, filter: &str, qos: u8) -> u16 {
        let pkid = self.next_pkid();
        self.queue_packet(|buf| {
            let filter = v4::SubscribeFilter::new(filter.to_owned(), mqttbytes::qos(qos)?);
            v4::Subscribe {
                pkid,
                filters: vec![filter],
            }
            .write(buf)
        });
        pkid
    }

    pub fn queue_puback(&mut self, pkid: u16) {
        self.queue_packet(|buf| v4::PubAck::new(pkid).write(buf));
    }

    pub fn queue_ping(&mut self) {
        self.queue_packet(|buf| v4::PingReq.write(buf));
    }

    /// Queues arbitrary bytes (for hand-made packets).
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// Bytes queued and not yet written (non-zero too when a packet could
    /// not be encoded, so that the next flush reports it).
    pub fn queued(&self) -> usize {
        self.wbuf.len() + usize::from(self.unencodable.is_some())
    }

    /// Writes everything queued as few TLS records as possible.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if let Some(e) = self.unencodable.take() {
            self.wbuf.clear();
            return Err(ClientError::Encode(e));
        }
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let result = async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        }
        .await;
        self.wbuf.clear();
        if self.wbuf.capacity() > 4096 {
            self.wbuf = BytesMut::new();
        }
        result.map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof => ClientError::Closed,
            _ => ClientError::Io(e),
        })
    }

    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
    ) -> Result<u16, ClientError> {
        let pkid = self.queue_publish(topic, payload, qos, retain);
        self.flush().await?;
        Ok(pkid)
    }

    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> Result<u16, ClientError> {
        let pkid = self.queue_subscribe(filter, qos);
        self.flush().await?;
        Ok(pkid)
    }

    /// Receives the next packet. Cancel-safe: bytes already read stay
    /// buffered for the next call.
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            match decode(&mut self.rbuf, self.max_inbound) {
                Ok(Some(packet)) => {
                    // Idle connections should not keep a large buffer.
                    // The decoded packet holds no part of it any more, so
                    // `try_reclaim` sees the whole allocation: it succeeds
                    // only if that is over 1 KiB (it never allocates).
                    if self.rbuf.is_empty() && self.rbuf.try_reclaim(1025) {
                        self.rbuf = BytesMut::new();
                    }
                    return Ok(packet);
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e)),
            }
            self.rbuf.reserve(256);
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Err(ClientError::Closed),
                Ok(_) => {}
                Err(e) => {
                    return Err(match e.kind() {
                        io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::UnexpectedEof => ClientError::Closed,
                        _ => ClientError::Io(e),
                    })
                }
            }
        }
    }

    /// Receives until `want` returns `Some`, within `timeout`; other packets
    /// are dropped (QoS 1 publishes are acknowledged).
    pub async fn recv_until<T>(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(timeout, async {
            loop {
                let packet = self.recv().await?;
                if let Some(t) = want(&packet) {
                    return Ok(t);
                }
                if let Packet::Publish(p) = &packet {
                    if p.qos == 1 {
                        self.queue_puback(p.pkid);
                        self.flush().await?;
                    }
                }
            }
        })
        .await
        .map_err(|_| ClientError::Timeout)?
    }

    /// Sends DISCONNECT (the broker discards the will) and closes TLS.
    pub async fn disconnect(&mut self) {
        self.queue_packet(|buf| v4::Disconnect.write(buf));
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }

    /// Closes TLS and TCP without DISCONNECT: to the broker this is a lost
    /// connection, so it publishes the will (like a device losing power).
    pub async fn drop_abruptly(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::QoS;

    fn encoded(packet: v4::Packet) -> BytesMut {
        encode(&packet).expect("encodes")
    }

    #[test]
    fn a_publish_then_a_pingresp_decode_in_turn() {
        let mut publish = v4::Publish::new("devices/d1/commands", QoS::AtLeastOnce, "{\"a\":1}");
        publish.pkid = 42;
        publish.dup = true;
        let mut buf = encoded(v4::Packet::Publish(publish));
        buf.extend_from_slice(&[0xD0, 0]); // PINGRESP right after
        assert_eq!(
            decode(&mut buf, 1 << 20),
            Ok(Some(Packet::Publish(Publish {
                topic: "devices/d1/commands".into(),
                payload: b"{\"a\":1}".to_vec(),
                qos: 1,
                retain: false,
                dup: true,
                pkid: 42,
            })))
        );
        assert_eq!(decode(&mut buf, 1 << 20), Ok(Some(Packet::PingResp)));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_packets_wait_for_more_bytes() {
        let whole = encoded(v4::Packet::Publish(v4::Publish::new(
            "t",
            QoS::AtMostOnce,
            vec![7u8; 300],
        )));
        for cut in [0, 1, 2, 3, 10, whole.len() - 1] {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut part, 1 << 20), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing taken at {cut}");
        }
    }

    #[test]
    fn suback_connack_puback_decode() {
        let mut buf = BytesMut::from(&[0x90, 3, 0, 5, 0x80, 0x20, 2, 0, 5, 0x40, 2, 1, 2][..]);
        assert_eq!(
            decode(&mut buf, 100),
            Ok(Some(Packet::SubAck {
                pkid: 5,
                codes: vec![SUBACK_FAILURE]
            }))
        );
        assert_eq!(
            decode(&mut buf, 100),
            Ok(Some(Packet::ConnAck {
                session_present: false,
                code: CONNACK_NOT_AUTHORIZED
            }))
        );
        assert_eq!(decode(&mut buf, 100), Ok(Some(Packet::PubAck(0x0102))));
    }

    #[test]
    fn oversized_malformed_and_unexpected_are_errors() {
        let mut big = encoded(v4::Packet::Publish(v4::Publish::new(
            "t",
            QoS::AtMostOnce,
            vec![0u8; 1000],
        )));
        assert!(decode(&mut big, 100).is_err());
        let mut bad = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(decode(&mut bad, 1 << 30).is_err());
        let mut connect = encoded(v4::Packet::Connect(v4::Connect::new("d1")));
        assert!(decode(&mut connect, 100).is_err());
    }

    #[test]
    fn connect_encodes_will_and_flags() {
        let will = Will {
            topic: "devices/d1/presence".into(),
            payload: br#"{"online":false}"#.to_vec(),
            qos: 1,
            retain: true,
        };
        let opts = ConnectOptions {
            client_id: "d1",
            keep_alive: 30,
            clean_session: true,
            will: Some(&will),
        };
        let out = encoded(v4::Packet::Connect(connect_packet(&opts).expect("valid")));
        assert_eq!(out[0], 0x10);
        // Variable header starts after the 1-byte length (packet < 128 bytes).
        assert_eq!(&out[2..9], &[0, 4, b'M', b'Q', b'T', b'T', 4]);
        assert_eq!(out[9], 0x02 | 0x04 | 0x08 | 0x20);
        assert_eq!(&out[10..12], &30u16.to_be_bytes());
        let bad_will = Will {
            qos: 3,
            ..will.clone()
        };
        let opts = ConnectOptions {
            will: Some(&bad_will),
            ..opts
        };
        assert!(connect_packet(&opts).is_err());
    }
}
