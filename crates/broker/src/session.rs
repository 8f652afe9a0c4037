//! One client connection: TLS handshake, CONNECT, then packets both ways
//! between the socket and the client's link into rumqttd's router.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cityplane_proto::{topics, Identity, Role};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Packet, Protocol};
use rumqttd::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout, Instant};
use tokio_rustls::server::TlsStream;

use crate::mqtt::{self, Frame, Inbound, ProtocolError, Will};
use crate::{acl, Shared};

type Stream = TlsStream<TcpStream>;

/// Why a session ended; decides whether the will is published.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client: the will is discarded.
    Graceful,
    /// The router dropped the link (the same client id connected again).
    TakenOver,
    /// Anything else: the will is published.
    Abrupt(String),
}

pub(crate) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    // Without NODELAY every small MQTT packet waits for a delayed ACK (~40 ms).
    let _ = tcp.set_nodelay(true);
    let limits = &shared.config.limits;
    let stream = match timeout(limits.handshake_timeout, shared.acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::warn!(%peer, reason = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, timeout_ms = limits.handshake_timeout.as_millis() as u64, "TLS handshake timed out");
            return;
        }
    };
    let Some(peer_cert) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| cityplane_certs::peer_cert(der.as_ref()).ok())
    else {
        // The verifier already insisted on a readable identity; be defensive anyway.
        tracing::warn!(%peer, "no usable client certificate after handshake");
        return;
    };
    let session = Session {
        shared: shared.clone(),
        peer,
        who: peer_cert.identity,
        serial: peer_cert.serial,
        stream,
        rbuf: BytesMut::with_capacity(1024),
        wbuf: BytesMut::with_capacity(1024),
    };
    session.run().await;
}

struct Session {
    shared: Arc<Shared>,
    peer: SocketAddr,
    who: Identity,
    serial: String,
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

struct Connected {
    keep_alive: u16,
    clean_session: bool,
    will: Option<Will>,
}

impl Session {
    async fn run(mut self) {
        let connect_timeout = self.shared.config.limits.connect_timeout;
        let connect = match timeout(connect_timeout, self.read_connect()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => return,
            Ok(Err(reason)) => {
                tracing::warn!(peer = %self.peer, who = %self.who, %reason, "connection refused before CONNECT");
                return;
            }
            Err(_) => {
                tracing::warn!(peer = %self.peer, who = %self.who, "no CONNECT within {connect_timeout:?}; closing");
                return;
            }
        };

        let registration = self.shared.registry.register(&self.who, &self.serial);
        if !self.shared.revocation.is_allowed(&self.serial) {
            tracing::warn!(who = %self.who, "certificate revoked during connect");
            let _ = self
                .write_raw(&mqtt::connack(false, mqtt::CONNACK_NOT_AUTHORIZED))
                .await;
            return;
        }

        let router_tx = self.shared.router_tx.clone();
        let id = self.who.id.clone();
        let clean = connect.clean_session;
        // No will is given to the router: the edge publishes wills itself.
        // Building a link blocks until the router answers.
        let built = tokio::task::spawn_blocking(move || router_tx(&id, clean)).await;
        let (mut tx, mut rx, connack) = match built {
            Ok(Ok(link)) => link,
            other => {
                tracing::error!(who = %self.who, error = ?other.err(), "router refused the connection");
                let _ = self
                    .write_raw(&mqtt::connack(false, mqtt::CONNACK_UNAVAILABLE))
                    .await;
                return;
            }
        };
        if let Some(packet) = Option::<Packet>::from(connack) {
            if self.write_packets([packet]).await.is_err() {
                let _ = tx.send(disconnect_packet()).await;
                return;
            }
        }
        tracing::info!(peer = %self.peer, who = %self.who, keep_alive = connect.keep_alive, clean_session = clean, "connected");
        // Presence comes from the connection itself: the broker announces a
        // device online at CONNECT and offline when the session ends.
        let is_device = self.who.role == Role::Device;
        if is_device {
            send_presence(&mut tx, &self.who.id, true).await;
        }

        let end = self
            .pump(&connect, &mut tx, &mut rx, &registration.kill)
            .await;
        match &end {
            End::Graceful => tracing::info!(who = %self.who, "disconnected"),
            End::TakenOver => {
                tracing::info!(who = %self.who, "session taken over by a new connection")
            }
            End::Abrupt(reason) => tracing::warn!(who = %self.who, %reason, "connection closed"),
        }
        if !matches!(end, End::TakenOver) {
            let will = match (&end, &connect.will) {
                (End::Abrupt(_), Some(will)) => Some(will),
                _ => None,
            };
            // Queue the last packets together and wake the router once: a
            // second wake-up after DISCONNECT would find the link gone.
            {
                let mut last = tx.buffer();
                if let Some(will) = will {
                    let frame = mqtt::encode_publish(
                        &will.topic,
                        &will.payload,
                        will.qos,
                        will.retain,
                        u16::MAX,
                    );
                    last.extend(decode(&frame));
                }
                // A device's will is its presence; without one, say it ourselves.
                if is_device && will.is_none_or(|w| w.topic != topics::presence(&self.who.id)) {
                    last.extend(presence_packet(&self.who.id, false));
                }
            }
            let _ = tx.send(disconnect_packet()).await;
        }
        let _ = self.stream.shutdown().await;
        drop(registration);
    }

    /// Reads and checks the first packet. `Ok(None)` means the client was
    /// answered with a refusal (or left) and the connection is done.
    async fn read_connect(&mut self) -> Result<Option<Connected>, String> {
        let frame = match self.read_frame().await? {
            Some(frame) => frame,
            None => return Ok(None),
        };
        let max_payload = self.shared.config.limits.max_payload;
        let (client_id, keep_alive, clean_session, will) = match mqtt::parse(&frame, max_payload) {
            Ok(Inbound::Connect {
                client_id,
                keep_alive,
                clean_session,
                will,
            }) => (client_id, keep_alive, clean_session, will),
            Ok(other) => return Err(format!("first packet must be CONNECT, got {other:?}")),
            Err(e @ ProtocolError::UnsupportedVersion { .. }) => {
                let _ = self
                    .write_raw(&mqtt::connack(false, mqtt::CONNACK_BAD_PROTOCOL))
                    .await;
                return Err(e.to_string());
            }
            Err(e) => return Err(format!("invalid CONNECT: {e}")),
        };
        if client_id != self.who.id {
            tracing::warn!(peer = %self.peer, who = %self.who, client_id = %client_id, "client id does not match the certificate: not authorized");
            let _ = self
                .write_raw(&mqtt::connack(false, mqtt::CONNACK_NOT_AUTHORIZED))
                .await;
            return Ok(None);
        }
        if let Some(will) = &will {
            if !acl::may_set_will(&self.who, &will.topic) {
                tracing::warn!(who = %self.who, topic = %will.topic, "will topic not authorized");
                let _ = self
                    .write_raw(&mqtt::connack(false, mqtt::CONNACK_NOT_AUTHORIZED))
                    .await;
                return Ok(None);
            }
        }
        Ok(Some(Connected {
            keep_alive,
            clean_session,
            will,
        }))
    }

    /// Reads until one whole frame is buffered. `Ok(None)` on a clean EOF.
    async fn read_frame(&mut self) -> Result<Option<Frame>, String> {
        let max_frame = self.shared.config.limits.max_frame();
        loop {
            if let Some(frame) =
                mqtt::next_frame(&mut self.rbuf, max_frame).map_err(|e| e.to_string())?
            {
                return Ok(Some(frame));
            }
            match self.stream.read_buf(&mut self.rbuf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }

    async fn pump(
        &mut self,
        connect: &Connected,
        tx: &mut LinkTx,
        rx: &mut LinkRx,
        kill: &tokio::sync::Notify,
    ) -> End {
        let keep_alive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut deadline = keep_alive.map_or(far_future, |ka| Instant::now() + ka);
        // Devices get their commands from the edge's dispatcher, not the router.
        let (commands_tx, mut commands_rx) = tokio::sync::mpsc::channel(crate::dispatch::QUEUE);
        let mut state = PumpState {
            subscriptions: std::collections::HashSet::new(),
            tokens: Bucket::new(self.shared.config.limits.max_publishes_per_sec),
            commands_tx,
            route: None,
            command_qos: 0,
            next_pkid: 0,
        };
        let max_frame = self.shared.config.limits.max_frame();
        loop {
            tokio::select! {
                _ = kill.notified() => {
                    return End::Abrupt("certificate revoked or broker shutting down".into());
                }
                Some(command) = commands_rx.recv() => {
                    state.next_pkid = state.next_pkid.checked_add(1).unwrap_or(1);
                    let topic = topics::commands(&self.who.id);
                    let frame = mqtt::encode_publish(&topic, &command, state.command_qos, false, state.next_pkid);
                    if let Err(e) = self.write_raw(&frame).await {
                        return End::Abrupt(format!("write failed: {e}"));
                    }
                }
                read = self.stream.read_buf(&mut self.rbuf) => {
                    match read {
                        Ok(0) => return End::Abrupt("closed by peer without DISCONNECT".into()),
                        Ok(_) => {}
                        Err(e) => return End::Abrupt(format!("read failed: {e}")),
                    }
                    if let Some(ka) = keep_alive {
                        deadline = Instant::now() + ka;
                    }
                    loop {
                        let frame = match mqtt::next_frame(&mut self.rbuf, max_frame) {
                            Ok(Some(frame)) => frame,
                            Ok(None) => break,
                            Err(e) => return End::Abrupt(format!("protocol violation: {e}")),
                        };
                        match self.handle(frame, tx, &mut state).await {
                            Ok(true) => {}
                            Ok(false) => return End::Graceful,
                            Err(reason) => return End::Abrupt(reason),
                        }
                    }
                }
                note = rx.next() => {
                    match note {
                        Ok(first) => {
                            if let Err(e) = self.forward(first, rx).await {
                                return End::Abrupt(e);
                            }
                        }
                        Err(_) => return End::TakenOver,
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return End::Abrupt(format!("keep-alive of {}s expired (1.5 x interval)", connect.keep_alive));
                }
            }
        }
    }

    /// Handles one client packet. `Ok(false)` ends the session gracefully.
    async fn handle(
        &mut self,
        frame: Frame,
        tx: &mut LinkTx,
        state: &mut PumpState,
    ) -> Result<bool, String> {
        let limits = &self.shared.config.limits;
        let inbound = mqtt::parse(&frame, limits.max_payload)
            .map_err(|e| format!("protocol violation: {e}"))?;
        match inbound {
            Inbound::Connect { .. } => return Err("protocol violation: second CONNECT".into()),
            Inbound::Publish {
                ref topic,
                payload_len,
                ..
            } => {
                if !acl::may_publish(&self.who, topic) {
                    return Err(format!("not authorized to publish to {topic:?}"));
                }
                if let Some(tap) = self.shared.tap.get() {
                    if self.who.role == Role::Operator
                        && crate::TAPPED_PREFIXES.iter().any(|p| topic.starts_with(p))
                    {
                        let payload = frame.raw.slice(frame.raw.len() - payload_len..);
                        let message = crate::OperatorMessage {
                            from: self.who.clone(),
                            topic: topic.clone(),
                            payload,
                        };
                        if tap.send(message).await.is_err() {
                            tracing::warn!(who = %self.who, "operator tap closed; request not delivered to the controller");
                        }
                    }
                }
                if self.who.role != Role::Controller && !state.tokens.take() {
                    return Err(format!(
                        "publish rate above {} per second",
                        limits.max_publishes_per_sec
                    ));
                }
            }
            Inbound::Subscribe { pkid, ref filters } => {
                let refused: Vec<&str> = filters
                    .iter()
                    .map(|(f, _)| f.as_str())
                    .filter(|f| !acl::may_subscribe(&self.who, f))
                    .collect();
                let new = filters
                    .iter()
                    .filter(|(f, _)| !state.subscriptions.contains(f))
                    .count();
                let over = state.subscriptions.len() + new > limits.max_subscriptions;
                if !refused.is_empty() || over {
                    if over {
                        tracing::warn!(who = %self.who, limit = limits.max_subscriptions, "subscription limit reached; SUBSCRIBE refused");
                    } else {
                        tracing::warn!(who = %self.who, filters = ?refused, "SUBSCRIBE not authorized");
                    }
                    self.write_raw(&mqtt::suback_failure(pkid, filters.len()))
                        .await
                        .map_err(|e| e.to_string())?;
                    return Ok(true);
                }
                state
                    .subscriptions
                    .extend(filters.iter().map(|(f, _)| f.clone()));
                if self.who.role == Role::Device {
                    // The ACL left only the device's own commands topic.
                    let granted = filters.iter().map(|(_, q)| (*q).min(1)).max().unwrap_or(0);
                    state.command_qos = granted;
                    if state.route.is_none() {
                        self.shared
                            .dispatch
                            .register(&self.who.id, state.commands_tx.clone());
                        state.route = Some(crate::dispatch::Route {
                            dispatch: self.shared.dispatch.clone(),
                            device: self.who.id.clone(),
                            tx: state.commands_tx.clone(),
                        });
                    }
                    let mut suback = vec![0x90];
                    mqtt::encode_remaining_length(2 + filters.len(), &mut suback);
                    suback.extend_from_slice(&pkid.to_be_bytes());
                    suback.extend(filters.iter().map(|(_, q)| (*q).min(1)));
                    self.write_raw(&suback).await.map_err(|e| e.to_string())?;
                    return Ok(true);
                }
            }
            Inbound::Unsubscribe { pkid, ref filters } => {
                for f in filters {
                    state.subscriptions.remove(f);
                }
                if self.who.role == Role::Device {
                    state.route = None;
                    let mut unsuback = vec![0xB0, 0x02];
                    unsuback.extend_from_slice(&pkid.to_be_bytes());
                    self.write_raw(&unsuback).await.map_err(|e| e.to_string())?;
                    return Ok(true);
                }
            }
            Inbound::PingReq => {
                self.write_raw(&mqtt::PINGRESP)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(true);
            }
            Inbound::Disconnect => return Ok(false),
            // The router never sends to a device (its commands come from the
            // dispatcher), so a device's PUBACK/PUBREC/PUBCOMP answer the
            // edge; forwarding them would make the router drop the link.
            Inbound::Ack { kind, .. } if self.who.role == Role::Device && kind != 6 => {
                return Ok(true)
            }
            Inbound::Ack { .. } => {}
        }
        let packet =
            decode(&frame.raw).ok_or_else(|| "packet rejected by the MQTT decoder".to_owned())?;
        tx.send(packet)
            .await
            .map_err(|e| format!("router gone: {e}"))?;
        Ok(true)
    }

    /// Writes one notification and whatever else the router already queued.
    async fn forward(
        &mut self,
        first: Option<Notification>,
        rx: &mut LinkRx,
    ) -> Result<(), String> {
        let mut packets = Vec::new();
        let mut unscheduled = false;
        let mut next = first;
        loop {
            match next {
                Some(Notification::Unschedule) => unscheduled = true,
                Some(note) => packets.extend(Option::<Packet>::from(note)),
                None => {}
            }
            // Drain what is already buffered without waiting for more.
            // (`timeout(ZERO, …)` would round up to the next 1 ms timer tick.)
            let ready = tokio::select! {
                biased;
                note = rx.next() => note,
                _ = std::future::ready(()) => break,
            };
            match ready {
                Ok(Some(note)) => next = Some(note),
                _ => break,
            }
        }
        self.write_packets(packets)
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        if unscheduled {
            // The router pauses a link that drained its buffer until told it is ready.
            rx.wake().await.map_err(|e| format!("router gone: {e}"))?;
        }
        Ok(())
    }

    async fn write_packets(
        &mut self,
        packets: impl IntoIterator<Item = Packet>,
    ) -> std::io::Result<()> {
        self.wbuf.clear();
        for packet in packets {
            V4.write(packet, &mut self.wbuf)
                .map_err(|e| std::io::Error::other(format!("encode: {e:?}")))?;
        }
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.stream.write_all(&self.wbuf).await?;
        self.stream.flush().await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

struct PumpState {
    subscriptions: std::collections::HashSet<String>,
    tokens: Bucket,
    commands_tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    /// Set while a device is subscribed to its commands.
    route: Option<crate::dispatch::Route>,
    command_qos: u8,
    next_pkid: u16,
}

/// Token bucket: `rate` tokens a second, holding at most one second's worth.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// rumqttd's decoder is the only way to build its `Publish` with a QoS and
/// packet id, so validated frames go through it.
fn decode(raw: &[u8]) -> Option<Packet> {
    let mut buf = BytesMut::from(raw);
    V4.read_mut(&mut buf, usize::MAX).ok()
}

/// `{"online": …}`, retained, on the device's presence topic. QoS 0: it goes
/// through the device's own link, and a QoS 1 PUBACK from the router would
/// reach the device as an unsolicited ack.
async fn send_presence(tx: &mut LinkTx, device: &str, online: bool) {
    if let Some(packet) = presence_packet(device, online) {
        let _ = tx.send(packet).await;
    }
}

fn presence_packet(device: &str, online: bool) -> Option<Packet> {
    let body = if online {
        &br#"{"online":true}"#[..]
    } else {
        &br#"{"online":false}"#[..]
    };
    crate::link_publish(&topics::presence(device), body, false, true, 0)
}

fn disconnect_packet() -> Packet {
    use rumqttd::protocol::{Disconnect, DisconnectReasonCode};
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}
