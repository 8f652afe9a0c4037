//! One client connection: TLS handshake, CONNECT, then packets both ways.
//!
//! Operators and the controller get a router link of their own (they
//! subscribe through the router). Devices do not: their commands come from
//! [`crate::dispatch`], and what they publish (and their wills and presence)
//! enters the router through the broker's one shared link
//! ([`crate::ingress`]). For devices the edge therefore answers everything
//! itself: CONNACK (session present 0, see below), PUBACK once a QoS 1
//! publish is handed to the router, the QoS 2 handshake (PUBREC, PUBCOMP),
//! SUBACK, UNSUBACK and PINGRESP. Session takeover is done by the
//! [`crate::registry`].
//!
//! Contract notes for devices:
//! - A device always gets a clean session. One that asks for
//!   `clean_session = false` gets `session present = 0` and no queued
//!   messages; commands are not queued for offline devices anyway (the
//!   controller re-sends when the device is back).
//! - QoS 2 from devices is delivered at least once: within one connection a
//!   re-sent PUBLISH whose packet id awaits PUBREL is not routed again, but
//!   nothing is remembered across connections.

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
use tokio::time::{timeout, Instant};
use tokio_rustls::server::TlsStream;

use crate::handshake::Pending;
use crate::mqtt::{self, Frame, Inbound, ProtocolError, Will};
use crate::quota::IdentityQuota;
use crate::registry::{Kill, Registration};
use crate::{acl, Shared};

type Stream = TlsStream<TcpStream>;

/// Why a session ended; decides whether the will is published.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client: the will is discarded.
    Graceful,
    /// A new connection with the same client id took the session over
    /// (for devices: the registry; otherwise the router dropped the link).
    TakenOver,
    /// The certificate was revoked: no will (a revoked client must not get
    /// the last word); a device's offline presence is still published.
    Revoked,
    /// The certificate's validity ended during the session; as `Revoked`.
    Expired,
    /// Anything else: the will is published.
    Abrupt(String),
}

/// The whole life of one connection: this future is the connection's tokio
/// task, and its size (the largest state it can be in) is paid by every
/// connection for as long as it lives. Hence: the handshake boxed (its state
/// is only needed for a moment), the session boxed and passed down by
/// reference (a value moved into a nested future is stored once per level),
/// and rare or bulky paths boxed.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, pending: Pending) {
    let Some(mut session) = Box::pin(handshake(shared, tcp, peer, pending)).await else {
        return;
    };
    // Authenticated now: a place among this identity's connections and
    // among all connections, or nothing.
    let limits = &session.shared.config.limits;
    let Some(_place) = session.quota.connect(limits.max_connections_per_identity) else {
        tracing::warn!(%peer, who = %session.who, limit = limits.max_connections_per_identity, "too many connections of this identity; closing new connection");
        let _ = session.stream.shutdown().await;
        return;
    };
    let Ok(_slot) = session.shared.slots.clone().try_acquire_owned() else {
        tracing::warn!(%peer, who = %session.who, limit = session.shared.config.limits.max_connections, "connection limit reached; closing new connection");
        let _ = session.stream.shutdown().await;
        return;
    };
    session.run().await;
}

async fn handshake(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: Pending,
) -> Option<Box<Session>> {
    // Without NODELAY every small MQTT packet waits for a delayed ACK (~40 ms).
    let _ = tcp.set_nodelay(true);
    let limits = &shared.config.limits;
    let accept = timeout(limits.handshake_timeout, shared.acceptor.accept(tcp));
    let stream = tokio::select! {
        accepted = accept => match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                // Anyone who can reach the port can cause this: at most one
                // line a second, with how many were not logged.
                if let Some(unlogged) = shared.refusal_log.admit() {
                    tracing::warn!(%peer, reason = %e, unlogged, "TLS handshake refused");
                }
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, timeout_ms = limits.handshake_timeout.as_millis() as u64, "TLS handshake timed out");
                return None;
            }
        },
        () = pending.evicted() => {
            tracing::debug!(%peer, "handshake dropped: all handshake places taken by newer sockets");
            return None;
        }
    };
    drop(pending);
    let Some(peer_cert) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| cityplane_certs::peer_cert(der.as_ref()).ok())
    else {
        // The verifier already insisted on a readable identity; be defensive anyway.
        tracing::warn!(%peer, "no usable client certificate after handshake");
        return None;
    };
    let quota = shared.quotas.of(&peer_cert.identity.id, limits);
    // The verifier checked validity at the handshake; the session ends when
    // the certificate does.
    let valid_for = peer_cert
        .not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let expires = Instant::now() + valid_for.min(Duration::from_secs(86_400 * 365 * 100));
    Some(Box::new(Session {
        quota,
        shared,
        peer,
        who: peer_cert.identity,
        serial: peer_cert.serial,
        expires,
        stream,
        // Both grow on demand and are released when empty (see `pump`): an
        // idle connection should cost as little as possible.
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
    }))
}

struct Session {
    shared: Arc<Shared>,
    /// This identity's rates and quotas, shared with its other connections.
    quota: Arc<IdentityQuota>,
    peer: SocketAddr,
    who: Identity,
    serial: String,
    /// When the client certificate stops being valid.
    expires: Instant,
    stream: Stream,
    rbuf: BytesMut,
    /// Bytes for the client not yet written (answers are written once per
    /// batch of packets read).
    wbuf: BytesMut,
}

/// A router link of the session's own (operators and the controller).
struct Link {
    tx: LinkTx,
    rx: LinkRx,
}

struct Connected {
    keep_alive: u16,
    clean_session: bool,
    will: Option<Will>,
}

impl Session {
    async fn run(&mut self) {
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
        if self.who.role == Role::Device {
            self.run_device(connect, registration).await;
        } else {
            // Boxed: few sessions take this path, and its larger future
            // would otherwise make every device's task larger.
            Box::pin(self.run_linked(connect, registration)).await;
        }
    }

    /// A device session: no router link; see the module documentation.
    async fn run_device(&mut self, connect: Connected, mut registration: Registration) {
        let shared = self.shared.clone();
        // Take the id over and announce the device online in one step under
        // the registry's lock, so that the old session's last words (if it
        // is ending right now) cannot come after this session's online.
        match shared.ingress.reserve_one().await {
            Ok(permit) => shared.registry.claim(&mut registration, &self.who.id, || {
                if let Some(online) = presence_packet(&self.who.id, true) {
                    permit.send(online);
                }
            }),
            Err(e) => {
                tracing::error!(who = %self.who, error = %e, "router unavailable");
                let _ = self
                    .write_raw(&mqtt::connack(false, mqtt::CONNACK_UNAVAILABLE))
                    .await;
                return;
            }
        }
        if !connect.clean_session {
            tracing::debug!(who = %self.who, "device asked for a persistent session; it gets a clean one");
        }
        let end = match self.write_raw(&mqtt::connack(false, 0)).await {
            Ok(()) => {
                tracing::info!(peer = %self.peer, who = %self.who, keep_alive = connect.keep_alive, clean_session = connect.clean_session, "connected");
                self.pump(&connect, None, &registration.kill).await
            }
            Err(e) => End::Abrupt(format!("write failed: {e}")),
        };
        self.log_end(&end);
        if !matches!(end, End::TakenOver) {
            let will = match (&end, &connect.will) {
                (End::Abrupt(_), Some(will)) => Some(will),
                _ => None,
            };
            let mut last = Vec::with_capacity(2);
            last.extend(will.and_then(will_packet));
            // A device's will is its presence; without one, say it ourselves.
            if will.is_none_or(|w| w.topic != topics::presence(&self.who.id)) {
                last.extend(presence_packet(&self.who.id, false));
            }
            if let Ok(permits) = shared.ingress.reserve(last.len()).await {
                // Nothing if a newer session took over meanwhile: its online
                // presence must stay the last word.
                shared.registry.if_current(&registration, || {
                    for (permit, packet) in permits.zip(last) {
                        permit.send(packet);
                    }
                });
            }
        }
        let _ = self.stream.shutdown().await;
        drop(registration);
    }

    /// An operator or controller session, on a router link of its own.
    async fn run_linked(&mut self, connect: Connected, registration: Registration) {
        let clean = connect.clean_session;
        // A stored router session keeps the subscriptions its creator was
        // authorized for; only the same certificate may resume it.
        let stale = {
            let mut persisted = self
                .shared
                .persisted
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let stale = persisted
                .get(&self.who.id)
                .is_some_and(|serial| *serial != self.serial);
            if clean {
                persisted.remove(&self.who.id);
            } else {
                persisted.insert(self.who.id.clone(), self.serial.clone());
            }
            stale
        };
        if stale && !clean {
            tracing::info!(who = %self.who, "stored session belongs to another certificate; discarded");
            if self.open_link(true).await.is_err() {
                return;
            }
        }
        let router_tx = self.shared.router_tx.clone();
        let id = self.who.id.clone();
        // No will is given to the router: the edge publishes wills itself.
        // Building a link blocks until the router answers.
        let built = tokio::task::spawn_blocking(move || router_tx(&id, clean)).await;
        let (tx, rx, connack) = match built {
            Ok(Ok(link)) => link,
            other => {
                tracing::error!(who = %self.who, error = ?other.err(), "router refused the connection");
                let _ = self
                    .write_raw(&mqtt::connack(false, mqtt::CONNACK_UNAVAILABLE))
                    .await;
                return;
            }
        };
        let mut link = Link { tx, rx };
        if let Some(packet) = Option::<Packet>::from(connack) {
            if self.write_packets([packet]).await.is_err() {
                let _ = link.tx.send(disconnect_packet()).await;
                return;
            }
        }
        tracing::info!(peer = %self.peer, who = %self.who, keep_alive = connect.keep_alive, clean_session = clean, "connected");

        let end = self
            .pump(&connect, Some(&mut link), &registration.kill)
            .await;
        self.log_end(&end);
        if !matches!(end, End::TakenOver) {
            let will = match (&end, &connect.will) {
                (End::Abrupt(_), Some(will)) => Some(will),
                _ => None,
            };
            // Queue the last packets together and wake the router once: a
            // second wake-up after DISCONNECT would find the link gone.
            link.tx.buffer().extend(will.and_then(will_packet));
            let _ = link.tx.send(disconnect_packet()).await;
        }
        let _ = self.stream.shutdown().await;
        drop(registration);
    }

    /// Opens and closes a clean router link with this session's id, which
    /// makes the router discard the session it stored for the id.
    async fn open_link(&mut self, clean: bool) -> Result<(), ()> {
        let router_tx = self.shared.router_tx.clone();
        let id = self.who.id.clone();
        match tokio::task::spawn_blocking(move || router_tx(&id, clean)).await {
            Ok(Ok((mut tx, _rx, _))) => {
                let _ = tx.send(disconnect_packet()).await;
                Ok(())
            }
            other => {
                tracing::error!(who = %self.who, error = ?other.err(), "router refused the connection");
                let _ = self
                    .write_raw(&mqtt::connack(false, mqtt::CONNACK_UNAVAILABLE))
                    .await;
                Err(())
            }
        }
    }

    fn log_end(&self, end: &End) {
        match end {
            End::Graceful => tracing::info!(who = %self.who, "disconnected"),
            End::TakenOver => {
                tracing::info!(who = %self.who, "session taken over by a new connection")
            }
            End::Revoked => {
                tracing::warn!(who = %self.who, "certificate revoked: session cut, no will")
            }
            End::Expired => {
                tracing::warn!(who = %self.who, "certificate expired: session cut, no will")
            }
            End::Abrupt(reason) => tracing::warn!(who = %self.who, %reason, "connection closed"),
        }
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
            let refusal = if !acl::may_set_will(&self.who, &will.topic) {
                Some("will topic not authorized")
            } else if self.who.role == Role::Device && !acl::is_offline_presence(&will.payload) {
                Some(r#"a device's will must be {"online":false}"#)
            } else if will.retain
                && !acl::may_retain(&self.who, &will.topic)
                && self.who.role != Role::Device
            {
                Some("RETAIN not allowed on the will topic")
            } else if will.payload.is_empty() {
                Some("empty will payload (it would delete the retained message)")
            } else {
                None
            };
            if let Some(reason) = refusal {
                tracing::warn!(who = %self.who, topic = %will.topic, reason, "will refused");
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

    async fn pump(&mut self, connect: &Connected, mut link: Option<&mut Link>, kill: &Kill) -> End {
        let keep_alive = (connect.keep_alive > 0)
            .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
        let far_future = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut deadline = keep_alive.map_or(far_future, |ka| Instant::now() + ka);
        // Devices get their commands from the edge's dispatcher, not the router.
        let inbox = Arc::new(crate::dispatch::Inbox::default());
        let mut state = PumpState {
            subscriptions: std::collections::HashSet::new(),
            acks: AckTrack::default(),
            inbox: inbox.clone(),
            route: None,
            command_qos: 0,
            next_pkid: 0,
            qos2_pending: Vec::new(),
        };
        // Packets the client sent right behind its CONNECT.
        if let Some(end) = self
            .take_frames(link.as_deref_mut().map(|l| &mut l.tx), &mut state)
            .await
        {
            return end;
        }
        loop {
            tokio::select! {
                _ = kill.notified() => {
                    if kill.taken_over() {
                        return End::TakenOver;
                    }
                    if kill.revoked() {
                        return End::Revoked;
                    }
                    return End::Abrupt("broker shutting down".into());
                }
                command = inbox.next() => {
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
                    if let Some(end) = self.take_frames(link.as_deref_mut().map(|l| &mut l.tx), &mut state).await {
                        return end;
                    }
                }
                note = next_notification(link.as_deref_mut()) => {
                    let Some(link) = link.as_deref_mut() else { continue };
                    match note {
                        Ok(first) => {
                            // Boxed: only sessions with a link get here.
                            if let Err(e) = Box::pin(self.forward(first.map(|n| *n), &mut link.rx, &mut state.acks)).await {
                                return End::Abrupt(e);
                            }
                        }
                        Err(_) => return End::TakenOver,
                    }
                }
                // One timer for both: a second one would be armed per packet.
                _ = tokio::time::sleep_until(deadline.min(self.expires)) => {
                    if self.expires <= deadline {
                        return End::Expired;
                    }
                    return End::Abrupt(format!("keep-alive of {}s expired (1.5 x interval)", connect.keep_alive));
                }
            }
        }
    }

    /// Handles every whole packet in `rbuf`, then writes the answers
    /// together. `Some` ends the session.
    async fn take_frames(
        &mut self,
        mut tx: Option<&mut LinkTx>,
        state: &mut PumpState,
    ) -> Option<End> {
        let max_frame = self.shared.config.limits.max_frame();
        let mut go_on = Ok(true);
        loop {
            let frame = match mqtt::next_frame(&mut self.rbuf, max_frame) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Some(End::Abrupt(format!("protocol violation: {e}"))),
            };
            go_on = self.handle(frame, tx.as_deref_mut(), state).await;
            if !matches!(go_on, Ok(true)) {
                break;
            }
        }
        if let Err(e) = self.flush().await {
            return Some(End::Abrupt(format!("write failed: {e}")));
        }
        match go_on {
            Ok(true) => {}
            Ok(false) => return Some(End::Graceful),
            Err(reason) => return Some(End::Abrupt(reason)),
        }
        if self.rbuf.is_empty() {
            // Nothing half-read: give the memory back while idle (the next
            // read allocates a little, and `next_frame` reserves what a
            // packet needs once its length is in).
            self.rbuf = BytesMut::new();
        }
        None
    }

    /// Handles one client packet; answers are queued in `wbuf`. `Ok(false)`
    /// ends the session gracefully. `tx` is the session's own router link
    /// (`None` for devices).
    async fn handle(
        &mut self,
        frame: Frame,
        tx: Option<&mut LinkTx>,
        state: &mut PumpState,
    ) -> Result<bool, String> {
        let limits = &self.shared.config.limits;
        let is_device = self.who.role == Role::Device;
        let inbound = mqtt::parse(&frame, limits.max_payload)
            .map_err(|e| format!("protocol violation: {e}"))?;
        match inbound {
            Inbound::Connect { .. } => return Err("protocol violation: second CONNECT".into()),
            Inbound::Publish {
                ref topic,
                qos,
                retain,
                pkid,
                payload_len,
            } => {
                // Every check before anything is carried out: a refused
                // publish must have no effect at all.
                if !acl::may_publish(&self.who, topic) {
                    return Err(format!("not authorized to publish to {topic:?}"));
                }
                if self.who.role != Role::Controller && !self.quota.take_publish() {
                    return Err(format!(
                        "publish rate above {} per second",
                        limits.max_publishes_per_sec
                    ));
                }
                if retain {
                    if !acl::may_retain(&self.who, topic) {
                        return Err(format!("RETAIN not allowed on {topic:?}"));
                    }
                    self.shared
                        .retained
                        .set(&self.who.id, topic, payload_len, limits)
                        .map_err(|e| format!("retained publish to {topic:?} refused: {e}"))?;
                } else if payload_len == 0 {
                    // rumqttd deletes the retained message of any topic that
                    // gets an empty payload, RETAIN or not.
                    return Err(format!(
                        "empty payload without RETAIN on {topic:?} (would delete its retained message)"
                    ));
                }
                if let Some(tap) = self.shared.tap.get() {
                    if self.who.role == Role::Operator
                        && crate::TAPPED_PREFIXES.iter().any(|p| topic.starts_with(p))
                    {
                        match tap.reserve().await {
                            Ok(permit) => permit.send(crate::OperatorMessage {
                                from: self.who.clone(),
                                topic: topic.clone(),
                                payload: frame.raw.slice(frame.raw.len() - payload_len..),
                            }),
                            Err(_) => {
                                tracing::warn!(who = %self.who, "operator tap closed; request not delivered to the controller")
                            }
                        }
                    }
                }
                if is_device {
                    self.device_publish(&frame, qos, pkid, state).await?;
                    return Ok(true);
                }
            }
            Inbound::Subscribe { pkid, ref filters } => {
                if !self.quota.take_control() {
                    return Err(format!(
                        "SUBSCRIBE/UNSUBSCRIBE/PINGREQ rate above {} per second",
                        limits.max_subscribes_per_sec
                    ));
                }
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
                // Devices never make the router create a filter.
                let too_many_filters = refused.is_empty()
                    && !over
                    && !is_device
                    && !self.quota.admit_filters(
                        filters.iter().map(|(f, _)| f.as_str()),
                        limits.max_filters_per_identity,
                    );
                if !refused.is_empty() || over || too_many_filters {
                    if over {
                        tracing::warn!(who = %self.who, limit = limits.max_subscriptions, "subscription limit reached; SUBSCRIBE refused");
                    } else if too_many_filters {
                        tracing::warn!(who = %self.who, limit = limits.max_filters_per_identity, "distinct filter limit of this identity reached; SUBSCRIBE refused");
                    } else {
                        tracing::warn!(who = %self.who, filters = ?refused, "SUBSCRIBE not authorized");
                    }
                    self.wbuf
                        .extend_from_slice(&mqtt::suback_failure(pkid, filters.len()));
                    return Ok(true);
                }
                state
                    .subscriptions
                    .extend(filters.iter().map(|(f, _)| f.clone()));
                if is_device {
                    // The ACL left only the device's own commands topic.
                    let granted = filters.iter().map(|(_, q)| (*q).min(1)).max().unwrap_or(0);
                    state.command_qos = granted;
                    if state.route.is_none() {
                        self.shared
                            .dispatch
                            .register(&self.who.id, state.inbox.clone());
                        state.route = Some(crate::dispatch::Route {
                            dispatch: self.shared.dispatch.clone(),
                            device: self.who.id.clone(),
                            inbox: state.inbox.clone(),
                        });
                    }
                    let mut suback = Vec::with_capacity(4 + filters.len() + 4);
                    suback.push(0x90);
                    mqtt::encode_remaining_length(2 + filters.len(), &mut suback);
                    suback.extend_from_slice(&pkid.to_be_bytes());
                    suback.extend(filters.iter().map(|(_, q)| (*q).min(1)));
                    self.wbuf.extend_from_slice(&suback);
                    return Ok(true);
                }
            }
            Inbound::Unsubscribe { pkid, ref filters } => {
                if !self.quota.take_control() {
                    return Err(format!(
                        "SUBSCRIBE/UNSUBSCRIBE/PINGREQ rate above {} per second",
                        limits.max_subscribes_per_sec
                    ));
                }
                for f in filters {
                    state.subscriptions.remove(f);
                }
                if is_device {
                    state.route = None;
                    self.wbuf.extend_from_slice(&ack(UNSUBACK, pkid));
                    return Ok(true);
                }
            }
            Inbound::PingReq => {
                if !self.quota.take_control() {
                    return Err(format!(
                        "SUBSCRIBE/UNSUBSCRIBE/PINGREQ rate above {} per second",
                        limits.max_subscribes_per_sec
                    ));
                }
                self.wbuf.extend_from_slice(&mqtt::PINGRESP);
                return Ok(true);
            }
            Inbound::Disconnect => return Ok(false),
            // The second half of a device's QoS 2 publish (see `device_publish`).
            Inbound::Ack { kind: 6, pkid } if is_device => {
                state.qos2_pending.retain(|p| *p != pkid);
                // PUBCOMP even for an unknown id: the id is free either way.
                self.wbuf.extend_from_slice(&ack(PUBCOMP, pkid));
                return Ok(true);
            }
            // The router never sends to a device (its commands come from the
            // dispatcher), so a device's PUBACK/PUBREC/PUBCOMP answer the edge.
            Inbound::Ack { .. } if is_device => return Ok(true),
            // rumqttd logs an ERROR for an ack it did not expect: any client
            // could fill the log on demand. Pass on only what it awaits.
            Inbound::Ack { kind, pkid } => {
                if !state.acks.take(kind, pkid) {
                    tracing::debug!(who = %self.who, kind, pkid, "unexpected ack dropped");
                    return Ok(true);
                }
            }
        }
        let Some(tx) = tx else {
            return Err("internal: packet for a router link the session does not have".into());
        };
        let mut packet =
            decode(&frame.raw).ok_or_else(|| "packet rejected by the MQTT decoder".to_owned())?;
        self.scope_shared_groups(&mut packet);
        if let Inbound::Publish { qos: 2, pkid, .. } = inbound {
            state.acks.awaiting_pubrel(pkid);
        }
        // Boxed: `LinkTx::send`'s future holds a whole `Packet`.
        Box::pin(tx.send(packet))
            .await
            .map_err(|e| format!("router gone: {e}"))?;
        Ok(true)
    }

    /// Shared-subscription groups are per identity: `$share/g/f` becomes
    /// `$share/<id>:g/f` (`:` is in no id), so one operator cannot join
    /// another's group and take a share of its messages.
    fn scope_shared_groups(&self, packet: &mut Packet) {
        let scoped = |f: &mut String| {
            if let Some(rest) = f.strip_prefix(topics::SHARE_PREFIX) {
                *f = format!("{}{}:{rest}", topics::SHARE_PREFIX, self.who.id);
            }
        };
        match packet {
            Packet::Subscribe(sub, _) => sub.filters.iter_mut().for_each(|f| scoped(&mut f.path)),
            Packet::Unsubscribe(unsub, _) => unsub.filters.iter_mut().for_each(scoped),
            _ => {}
        }
    }

    /// A device's PUBLISH, already authorized: into the router through the
    /// shared ingress link, then answered by the edge.
    async fn device_publish(
        &mut self,
        frame: &Frame,
        qos: u8,
        pkid: u16,
        state: &mut PumpState,
    ) -> Result<(), String> {
        // Room in the queue first, then the packet: a future holding a
        // `Packet` across the wait would make every device's task larger.
        let ingress = &self.shared.ingress;
        match qos {
            0 | 1 => {
                let permit = ingress.reserve_one().await.map_err(|e| e.to_string())?;
                let packet = decode(&frame.raw)
                    .ok_or_else(|| "packet rejected by the MQTT decoder".to_owned())?;
                permit.send(packet);
                if qos == 1 {
                    self.wbuf.extend_from_slice(&ack(PUBACK, pkid));
                }
            }
            _ => {
                // Routed on the first PUBLISH, as QoS 1 (the router would
                // hold a QoS 2 publish under a packet id that other devices
                // reuse on the shared link); a re-send before PUBREL is only
                // answered again.
                if !state.qos2_pending.contains(&pkid) {
                    if state.qos2_pending.len() >= MAX_QOS2_PENDING {
                        return Err(format!(
                            "more than {MAX_QOS2_PENDING} QoS 2 publishes awaiting PUBREL"
                        ));
                    }
                    let permit = ingress.reserve_one().await.map_err(|e| e.to_string())?;
                    let mut raw = BytesMut::from(&frame.raw[..]);
                    raw[0] = (raw[0] & !0b0110) | 0b0010;
                    let packet = V4
                        .read_mut(&mut raw, usize::MAX)
                        .map_err(|_| "packet rejected by the MQTT decoder".to_owned())?;
                    permit.send(packet);
                    state.qos2_pending.push(pkid);
                }
                self.wbuf.extend_from_slice(&ack(PUBREC, pkid));
            }
        }
        Ok(())
    }

    /// Writes one notification and whatever else the router already queued.
    async fn forward(
        &mut self,
        first: Option<Notification>,
        rx: &mut LinkRx,
        acks: &mut AckTrack,
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
        for packet in packets {
            let at = self.wbuf.len();
            V4.write(packet, &mut self.wbuf)
                .map_err(|e| format!("encode: {e:?}"))?;
            acks.sent(&self.wbuf[at..]);
        }
        self.flush()
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
        for packet in packets {
            V4.write(packet, &mut self.wbuf)
                .map_err(|e| std::io::Error::other(format!("encode: {e:?}")))?;
        }
        self.flush().await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.wbuf.extend_from_slice(bytes);
        self.flush().await
    }

    /// Writes what `wbuf` holds.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let written = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        if self.wbuf.capacity() > WBUF_KEEP {
            self.wbuf = BytesMut::new();
        }
        written?;
        self.stream.flush().await
    }
}

/// `wbuf` capacity kept between writes; a larger one is released.
const WBUF_KEEP: usize = 4096;
/// QoS 2 publishes of one device awaiting PUBREL; more is misbehaviour.
const MAX_QOS2_PENDING: usize = 1024;

const PUBACK: u8 = 0x40;
const PUBREC: u8 = 0x50;
const PUBCOMP: u8 = 0x70;
const UNSUBACK: u8 = 0xB0;

/// PUBACK, PUBREC, PUBCOMP or UNSUBACK for `pkid`.
fn ack(header: u8, pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [header, 0x02, hi, lo]
}

/// The next notification on the session's link; never resolves without one.
/// Boxed, and the error reduced to "gone": both would otherwise take room in
/// every session's task (`LinkError` alone is ~800 bytes).
async fn next_notification(link: Option<&mut Link>) -> Result<Option<Box<Notification>>, ()> {
    match link {
        Some(link) => Box::pin(link.rx.next())
            .await
            .map(|note| note.map(Box::new))
            .map_err(|_| ()),
        None => std::future::pending().await,
    }
}

struct PumpState {
    subscriptions: std::collections::HashSet<String>,
    acks: AckTrack,
    inbox: Arc<crate::dispatch::Inbox>,
    /// Set while a device is subscribed to its commands.
    route: Option<crate::dispatch::Route>,
    command_qos: u8,
    next_pkid: u16,
    /// Packet ids of a device's QoS 2 publishes that await PUBREL.
    qos2_pending: Vec<u16>,
}

/// Packet ids a linked client may acknowledge: those of the QoS 1/2
/// publishes and PUBRELs the router sent it, and of its own QoS 2 publishes
/// (for PUBREL). Empty for devices, whose acks the edge answers itself.
#[derive(Default)]
struct AckTrack {
    puback: std::collections::HashSet<u16>,
    pubrec: std::collections::HashSet<u16>,
    pubcomp: std::collections::HashSet<u16>,
    pubrel: std::collections::HashSet<u16>,
}

impl AckTrack {
    /// Whether an ack of `kind` (the packet type) for `pkid` is awaited;
    /// if so it is no longer.
    fn take(&mut self, kind: u8, pkid: u16) -> bool {
        match kind {
            4 => self.puback.remove(&pkid),
            5 => self.pubrec.remove(&pkid),
            6 => self.pubrel.remove(&pkid),
            7 => self.pubcomp.remove(&pkid),
            _ => false,
        }
    }

    fn awaiting_pubrel(&mut self, pkid: u16) {
        self.pubrel.insert(pkid);
    }

    /// Notes what an encoded packet written to the client will be answered with.
    fn sent(&mut self, wire: &[u8]) {
        let Some(&first) = wire.first() else { return };
        let mut len = 0usize;
        let mut at = 1;
        for (i, b) in wire.iter().skip(1).take(4).enumerate() {
            len |= usize::from(b & 0x7F) << (7 * i);
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let body = &wire[at.min(wire.len())..(at + len).min(wire.len())];
        let u16_at = |i: usize| body.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        match first >> 4 {
            3 => {
                let qos = (first >> 1) & 3;
                let pkid = u16_at(0).and_then(|tl| u16_at(2 + usize::from(tl)));
                match (qos, pkid) {
                    (1, Some(p)) => {
                        self.puback.insert(p);
                    }
                    (2, Some(p)) => {
                        self.pubrec.insert(p);
                    }
                    _ => {}
                }
            }
            6 => {
                if let Some(p) = u16_at(0) {
                    self.pubcomp.insert(p);
                }
            }
            _ => {}
        }
    }
}

/// rumqttd's decoder is the only way to build its `Publish` with a QoS and
/// packet id, so validated frames go through it.
fn decode(raw: &[u8]) -> Option<Packet> {
    let mut buf = BytesMut::from(raw);
    V4.read_mut(&mut buf, usize::MAX).ok()
}

/// `{"online": …}`, retained, QoS 0, on the device's presence topic.
fn presence_packet(device: &str, online: bool) -> Option<Packet> {
    let body = if online {
        &br#"{"online":true}"#[..]
    } else {
        &br#"{"online":false}"#[..]
    };
    crate::link_publish(&topics::presence(device), body, false, true, 0)
}

/// A will as the router's packet. QoS 2 is sent as QoS 1: the router holds a
/// QoS 2 publish until a PUBREL that a will never gets.
fn will_packet(will: &Will) -> Option<Packet> {
    let frame = mqtt::encode_publish(
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
