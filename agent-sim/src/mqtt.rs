//! A small MQTT 3.1.1 client over mutual TLS: just what a device needs.
//!
//! CONNECT/CONNACK (clean session, will, keep-alive), SUBSCRIBE/SUBACK,
//! PUBLISH with QoS 0 and 1 (PUBACK both ways), PINGREQ/PINGRESP and
//! DISCONNECT. No QoS 2, no session resumption, no retransmission: with a
//! clean session nothing survives a reconnect anyway, and a device re-sends
//! its full state on every connect.
//!
//! Why not rumqttc: it costs ~55 KiB per client (request channel, inflight
//! array, 10 KiB buffers). This one keeps one TLS stream and one read buffer
//! that is released when empty, so a connected client costs little more than
//! rustls' own per-connection state.
//!
//! The [`codec`] functions are also what the rogue mode uses to build
//! deliberately bad packets next to good ones.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
        }
    }
}

/// Encoding and decoding of the packets above.
pub mod codec {
    use super::{Packet, Publish, Will};

    pub const PINGREQ: [u8; 2] = [0xC0, 0];
    pub const DISCONNECT: [u8; 2] = [0xE0, 0];

    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum DecodeError {
        #[error("malformed remaining length")]
        RemainingLength,
        #[error("packet of {0} bytes exceeds the limit")]
        TooLarge(usize),
        #[error("malformed {0} packet")]
        Malformed(&'static str),
        #[error("unexpected packet type {0:#04x}")]
        Unexpected(u8),
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

    fn put_str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn frame(header: u8, body: &[u8], out: &mut Vec<u8>) {
        out.reserve(body.len() + 5);
        out.push(header);
        encode_remaining_length(body.len(), out);
        out.extend_from_slice(body);
    }

    /// CONNECT, MQTT 3.1.1, without username or password (identity is the
    /// client certificate).
    pub fn connect(
        client_id: &str,
        keep_alive: u16,
        clean_session: bool,
        will: Option<&Will>,
        out: &mut Vec<u8>,
    ) {
        let mut body = Vec::with_capacity(
            16 + client_id.len() + will.map_or(0, |w| w.topic.len() + w.payload.len() + 4),
        );
        body.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
        let mut flags = 0u8;
        if clean_session {
            flags |= 0x02;
        }
        if let Some(w) = will {
            flags |= 0x04 | ((w.qos & 0x03) << 3);
            if w.retain {
                flags |= 0x20;
            }
        }
        body.push(flags);
        body.extend_from_slice(&keep_alive.to_be_bytes());
        put_str(&mut body, client_id.as_bytes());
        if let Some(w) = will {
            put_str(&mut body, w.topic.as_bytes());
            put_str(&mut body, &w.payload);
        }
        frame(0x10, &body, out);
    }

    /// PUBLISH. `pkid` is ignored for QoS 0.
    pub fn publish(
        topic: &str,
        payload: &[u8],
        qos: u8,
        retain: bool,
        dup: bool,
        pkid: u16,
        out: &mut Vec<u8>,
    ) {
        let mut header = 0x30 | ((qos & 0x03) << 1);
        if retain {
            header |= 0x01;
        }
        if dup {
            header |= 0x08;
        }
        let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
        out.reserve(len + 5);
        out.push(header);
        encode_remaining_length(len, out);
        put_str(out, topic.as_bytes());
        if qos > 0 {
            out.extend_from_slice(&pkid.to_be_bytes());
        }
        out.extend_from_slice(payload);
    }

    pub fn puback(pkid: u16, out: &mut Vec<u8>) {
        let [hi, lo] = pkid.to_be_bytes();
        out.extend_from_slice(&[0x40, 2, hi, lo]);
    }

    pub fn subscribe(pkid: u16, filters: &[(&str, u8)], out: &mut Vec<u8>) {
        let mut body =
            Vec::with_capacity(2 + filters.iter().map(|(f, _)| f.len() + 3).sum::<usize>());
        body.extend_from_slice(&pkid.to_be_bytes());
        for (filter, qos) in filters {
            put_str(&mut body, filter.as_bytes());
            body.push(*qos);
        }
        frame(0x82, &body, out);
    }

    /// Reads a remaining length at `buf[1..]`: `Ok(None)` if incomplete,
    /// else `(length, bytes used by the length field)`.
    pub(crate) fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
        let mut len = 0usize;
        for i in 0..4 {
            let Some(&byte) = buf.get(1 + i) else {
                return Ok(None);
            };
            len |= usize::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(Some((len, i + 1)));
            }
        }
        Err(DecodeError::RemainingLength)
    }

    fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16, DecodeError> {
        match b.get(at..at + 2) {
            Some(&[hi, lo]) => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err(DecodeError::Malformed(what)),
        }
    }

    /// Takes one whole packet off the front of `buf`, or `Ok(None)` if more
    /// bytes are needed.
    pub fn decode(buf: &mut Vec<u8>, max_packet: usize) -> Result<Option<Packet>, DecodeError> {
        let Some(&header) = buf.first() else {
            return Ok(None);
        };
        let Some((len, len_bytes)) = remaining_length(buf)? else {
            return Ok(None);
        };
        let total = 1 + len_bytes + len;
        if total > max_packet {
            return Err(DecodeError::TooLarge(total));
        }
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[1 + len_bytes..total];
        let packet = match header >> 4 {
            2 => {
                if body.len() != 2 {
                    return Err(DecodeError::Malformed("CONNACK"));
                }
                Packet::ConnAck {
                    session_present: body[0] & 1 == 1,
                    code: body[1],
                }
            }
            3 => {
                let qos = (header >> 1) & 0x03;
                if qos == 3 {
                    return Err(DecodeError::Malformed("PUBLISH"));
                }
                let tlen = usize::from(u16_at(body, 0, "PUBLISH")?);
                let topic_bytes = body
                    .get(2..2 + tlen)
                    .ok_or(DecodeError::Malformed("PUBLISH"))?;
                let topic = std::str::from_utf8(topic_bytes)
                    .map_err(|_| DecodeError::Malformed("PUBLISH"))?
                    .to_owned();
                let mut at = 2 + tlen;
                let pkid = if qos > 0 {
                    let p = u16_at(body, at, "PUBLISH")?;
                    at += 2;
                    p
                } else {
                    0
                };
                Packet::Publish(Publish {
                    topic,
                    payload: body[at..].to_vec(),
                    qos,
                    retain: header & 0x01 == 1,
                    dup: header & 0x08 != 0,
                    pkid,
                })
            }
            4 => Packet::PubAck(u16_at(body, 0, "PUBACK")?),
            9 => {
                let pkid = u16_at(body, 0, "SUBACK")?;
                Packet::SubAck {
                    pkid,
                    codes: body[2..].to_vec(),
                }
            }
            11 => Packet::UnsubAck(u16_at(body, 0, "UNSUBACK")?),
            13 => Packet::PingResp,
            _ => return Err(DecodeError::Unexpected(header)),
        };
        buf.drain(..total);
        Ok(Some(packet))
    }
}

/// A TLS connection to the broker, before or after CONNECT.
pub struct Client {
    stream: TlsStream<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
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
            rbuf: Vec::new(),
            wbuf: Vec::new(),
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

    pub async fn send_connect(&mut self, opts: &ConnectOptions<'_>) -> Result<(), ClientError> {
        codec::connect(
            opts.client_id,
            opts.keep_alive,
            opts.clean_session,
            opts.will,
            &mut self.wbuf,
        );
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

    /// Queues a PUBLISH (sent by [`flush`](Self::flush)); returns its packet
    /// id (0 for QoS 0).
    pub fn queue_publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> u16 {
        let pkid = if qos > 0 { self.next_pkid() } else { 0 };
        codec::publish(topic, payload, qos, retain, false, pkid, &mut self.wbuf);
        pkid
    }

    /// Queues a SUBSCRIBE with one filter; returns its packet id.
    pub fn queue_subscribe(&mut self, filter: &str, qos: u8) -> u16 {
        let pkid = self.next_pkid();
        codec::subscribe(pkid, &[(filter, qos)], &mut self.wbuf);
        pkid
    }

    pub fn queue_puback(&mut self, pkid: u16) {
        codec::puback(pkid, &mut self.wbuf);
    }

    pub fn queue_ping(&mut self) {
        self.wbuf.extend_from_slice(&codec::PINGREQ);
    }

    /// Queues arbitrary bytes (for hand-made packets).
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.wbuf.extend_from_slice(bytes);
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes everything queued as few TLS records as possible.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
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
            self.wbuf = Vec::new();
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
            match codec::decode(&mut self.rbuf, self.max_inbound) {
                Ok(Some(packet)) => {
                    if self.rbuf.is_empty() && self.rbuf.capacity() > 1024 {
                        // Idle connections should not keep a large buffer.
                        self.rbuf = Vec::new();
                    }
                    return Ok(packet);
                }
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
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
        self.wbuf.extend_from_slice(&codec::DISCONNECT);
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
    use super::codec::*;
    use super::*;

    #[test]
    fn remaining_length_round_trips() {
        for len in [
            0usize,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut out = vec![0x30];
            encode_remaining_length(len, &mut out);
            assert_eq!(
                remaining_length(&out),
                Ok(Some((len, out.len() - 1))),
                "{len}"
            );
        }
    }

    #[test]
    fn publish_qos1_decodes_back() {
        let mut out = Vec::new();
        publish(
            "devices/d1/commands",
            b"{\"a\":1}",
            1,
            false,
            true,
            42,
            &mut out,
        );
        let mut buf = out.clone();
        buf.extend_from_slice(&[0xD0, 0]); // PINGRESP right after
        let got = decode(&mut buf, 1 << 20).expect("ok").expect("whole");
        assert_eq!(
            got,
            Packet::Publish(Publish {
                topic: "devices/d1/commands".into(),
                payload: b"{\"a\":1}".to_vec(),
                qos: 1,
                retain: false,
                dup: true,
                pkid: 42,
            })
        );
        assert_eq!(decode(&mut buf, 1 << 20), Ok(Some(Packet::PingResp)));
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_packets_wait_for_more_bytes() {
        let mut out = Vec::new();
        publish("t", &[7u8; 300], 0, false, false, 0, &mut out);
        for cut in [0, 1, 2, 3, 10, out.len() - 1] {
            let mut part = out[..cut].to_vec();
            assert_eq!(decode(&mut part, 1 << 20), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn suback_connack_puback_decode() {
        let mut buf = vec![0x90, 3, 0, 5, 0x80, 0x20, 2, 0, 5, 0x40, 2, 1, 2];
        assert_eq!(
            decode(&mut buf, 100),
            Ok(Some(Packet::SubAck {
                pkid: 5,
                codes: vec![0x80]
            }))
        );
        assert_eq!(
            decode(&mut buf, 100),
            Ok(Some(Packet::ConnAck {
                session_present: false,
                code: 5
            }))
        );
        assert_eq!(decode(&mut buf, 100), Ok(Some(Packet::PubAck(0x0102))));
    }

    #[test]
    fn oversized_and_malformed_are_errors() {
        let mut out = Vec::new();
        publish("t", &[0u8; 1000], 0, false, false, 0, &mut out);
        assert!(matches!(
            decode(&mut out, 100),
            Err(DecodeError::TooLarge(_))
        ));
        let mut bad = vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01];
        assert_eq!(decode(&mut bad, 1 << 30), Err(DecodeError::RemainingLength));
        let mut unexpected = vec![0x10, 0];
        assert_eq!(
            decode(&mut unexpected, 100),
            Err(DecodeError::Unexpected(0x10))
        );
    }

    #[test]
    fn connect_encodes_will_and_flags() {
        let will = Will {
            topic: "devices/d1/presence".into(),
            payload: br#"{"online":false}"#.to_vec(),
            qos: 1,
            retain: true,
        };
        let mut out = Vec::new();
        connect("d1", 30, true, Some(&will), &mut out);
        assert_eq!(out[0], 0x10);
        // Variable header starts after the 1-byte length (packet < 128 bytes).
        assert_eq!(&out[2..9], &[0, 4, b'M', b'Q', b'T', b'T', 4]);
        assert_eq!(out[9], 0x02 | 0x04 | 0x08 | 0x20);
        assert_eq!(&out[10..12], &30u16.to_be_bytes());
    }
}
