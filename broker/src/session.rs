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
//! Two shortcuts skip the router thread: a clean linked session's device
//! messages come from the edge ([`crate::direct`]; the edge answers the
//! SUBSCRIBE and UNSUBSCRIBE of a clean session whose filters
//! are all on a device's own leaves, numbers its QoS 1 deliveries from 101
//! and keeps the client's PUBACKs for them), and a controller's commands
//! go straight to the device's session (`Action::Command`).
//!
//! Contract notes for devices:
//! - A device always gets a clean session. One that asks for
//!   `clean_session = false` gets `session present = 0` and no queued
//!   messages; commands are not queued for offline devices anyway (the
//!   controller re-sends when the device is back).
//! - QoS 2 from devices is delivered at least once: within one connection a
//!   re-sent PUBLISH whose packet id awaits PUBREL is not routed again, but
//!   nothing is remembered across connections.
//!
//! What a packet may do is decided by [`core`], a state machine without
//! I/O; this module is the pump around it: it reads and validates frames,
//! feeds them to the core and carries out the actions it returns (writes,
//! router sends, the operator tap, dispatch routes).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cityplane_proto::firmware::BlobHeader;
use cityplane_proto::{topics, Identity, Role};
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{Packet, Protocol};
use rumqttd::Notification;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use self::core::{Action, Core, Delivery, End, Env, Fetch, Note};
use crate::handshake::Pending;
use crate::interest::is_edge_filter;
use crate::mqtt::outbound::{self, disconnect_packet, presence_packet, will_packet};
use crate::mqtt::{self, Frame, Inbound, ProtocolError, Will};
use crate::quota::IdentityQuota;
use crate::registry::{Kill, Registration};
use crate::Shared;

mod core;

type Stream = crate::tls_stream::TlsStream;

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
    let accept = timeout(
        limits.handshake_timeout,
        crate::tls_stream::TlsStream::accept(shared.tls.clone(), tcp),
    );
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
    /// This session's filters in the edge's table of what the router must
    /// see ([`crate::interest`]).
    holder: crate::interest::Holder,
    /// A clean session's QoS 0 device messages from the edge ([`crate::direct`]).
    sink: Option<Arc<crate::direct::Sink>>,
}

struct Connected {
    /// The identity's id, or an operator's `<id>:<session>`: the router
    /// session's name.
    client_id: String,
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
        // Checked after registering: a revocation or pin change from now on
        // finds this session in the registry, and one before it is seen here.
        let pinned_out =
            self.who.role == Role::Device && !self.shared.pins.allows(&self.who.id, &self.serial);
        if !self.shared.revocation.is_allowed(&self.serial) || pinned_out {
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
                if let Some(online) = presence_packet(&self.who.id, Some(&self.serial)) {
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
            let will = end.will(connect.will.as_ref());
            let mut last = Vec::with_capacity(2);
            last.extend(will.and_then(will_packet));
            if core::says_offline_itself(&self.who.id, will) {
                last.extend(presence_packet(&self.who.id, None));
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
                .get(&connect.client_id)
                .is_some_and(|serial| *serial != self.serial);
            if clean {
                persisted.remove(&connect.client_id);
            } else {
                persisted.insert(connect.client_id.clone(), self.serial.clone());
            }
            stale
        };
        if stale && !clean {
            tracing::info!(who = %self.who, "stored session belongs to another certificate; discarded");
            if self.open_link(&connect.client_id, true).await.is_err() {
                return;
            }
        }
        let router_tx = self.shared.router_tx.clone();
        let id = connect.client_id.clone();
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
        let routing = self.shared.routing.clone();
        let (holder, sink) = routing.interest.session(&connect.client_id, clean);
        let mut link = Link {
            tx,
            rx,
            holder,
            sink,
        };
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
            let will = end.will(connect.will.as_ref());
            // Every send wakes the router once, and one wake-up takes all
            // that is queued: a DISCONNECT taken with earlier packets leaves
            // their wake-ups behind, and rumqttd logs each as an ERROR ("no-
            // connection id N is already gone": one per operator CLI call).
            // So the link is drained first, and the last packets go together
            // with a single wake-up.
            drained(&link.tx).await;
            if let Some(will) = will.and_then(will_packet) {
                // The router does not hold the edge's own subscriptions.
                routing.at_edge(&will);
                link.tx.buffer().push_back(will);
            }
            let _ = link.tx.send(disconnect_packet()).await;
        }
        routing.interest.end(link.holder, &connect.client_id, clean);
        let _ = self.stream.shutdown().await;
        drop(registration);
    }

    /// Opens and closes a clean router link with this session's id, which
    /// makes the router discard the session it stored for the id.
    async fn open_link(&mut self, client_id: &str, clean: bool) -> Result<(), ()> {
        let router_tx = self.shared.router_tx.clone();
        let id = client_id.to_owned();
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
        if !self.who.may_use_client_id(&client_id) {
            tracing::warn!(peer = %self.peer, who = %self.who, client_id = %client_id, "client id does not match the certificate: not authorized");
            let _ = self
                .write_raw(&mqtt::connack(false, mqtt::CONNACK_NOT_AUTHORIZED))
                .await;
            return Ok(None);
        }
        let refusal = will
            .as_ref()
            .and_then(|w| Some((&w.topic, core::will_refusal(&self.who, w)?)));
        if let Some((topic, reason)) = refusal {
            tracing::warn!(who = %self.who, %topic, reason, "will refused");
            let _ = self
                .write_raw(&mqtt::connack(false, mqtt::CONNACK_NOT_AUTHORIZED))
                .await;
            return Ok(None);
        }
        Ok(Some(Connected {
            client_id,
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
        let mut state = PumpState {
            core: Core::new(connect.keep_alive, self.expires, Instant::now()),
            inbox: Arc::new(crate::dispatch::Inbox::default()),
            route: None,
            holder: link.as_ref().map(|l| l.holder),
            router_pubacks: 0,
            edge_acks: None,
            edge_subscriptions: link.as_ref().is_some_and(|l| l.sink.is_some()),
            split_subacks: Default::default(),
        };
        // Devices get their commands from the edge's dispatcher, not the router.
        let inbox = state.inbox.clone();
        let sink = link.as_ref().and_then(|l| l.sink.clone());
        // Packets the client sent right behind its CONNECT.
        let tx = link.as_deref_mut().map(|l| &mut l.tx);
        // Boxed here and below: its future (~1.5 KiB, the packet handlers'
        // states) would otherwise be part of every idle device's task.
        if let Some(end) = Box::pin(self.take_frames(tx, &mut state, Instant::now())).await {
            return end;
        }
        loop {
            tokio::select! {
                _ = kill.notified() => return Core::on_kill(kill.taken_over(), kill.revoked()),
                command = inbox.next() => {
                    let (qos, pkid) = state.core.on_command();
                    let topic = topics::commands(&self.who.id);
                    let frame = mqtt::encode_publish(&topic, &command, qos, false, pkid);
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
                    // One clock read for the whole batch: its packets came in together.
                    let now = Instant::now();
                    state.core.on_read(now);
                    let tx = link.as_deref_mut().map(|l| &mut l.tx);
                    if let Some(end) = Box::pin(self.take_frames(tx, &mut state, now)).await {
                        return end;
                    }
                }
                taken = next_direct(sink.as_deref(), state.edge_free()) => {
                    // Boxed: only clean linked sessions get here.
                    if let Err(e) = Box::pin(self.deliver_direct(taken, &mut state)).await {
                        return End::Abrupt(e);
                    }
                }
                note = next_notification(link.as_deref_mut()) => {
                    let Some(link) = link.as_deref_mut() else { continue };
                    match note {
                        Ok(first) => {
                            // Boxed: only sessions with a link get here.
                            if let Err(e) = Box::pin(self.forward(first.map(|n| *n), link, &mut state)).await {
                                return End::Abrupt(e);
                            }
                        }
                        Err(_) => return End::TakenOver,
                    }
                }
                _ = tokio::time::sleep_until(state.core.wake_at()) => {
                    if let Some(end) = state.core.on_timer(Instant::now()) {
                        return end;
                    }
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
        now: Instant,
    ) -> Option<End> {
        let max_frame = self.shared.config.limits.max_frame();
        let mut end = None;
        while end.is_none() {
            let frame = match mqtt::next_frame(&mut self.rbuf, max_frame) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Some(End::Abrupt(format!("protocol violation: {e}"))),
            };
            end = self.handle(frame, tx.as_deref_mut(), state, now).await;
        }
        if let Err(e) = self.flush().await {
            return Some(End::Abrupt(format!("write failed: {e}")));
        }
        if end.is_none() && self.rbuf.is_empty() {
            // Nothing half-read: give the memory back while idle (the next
            // read allocates a little, and `next_frame` reserves what a
            // packet needs once its length is in).
            self.rbuf = BytesMut::new();
        }
        end
    }

    /// One client packet: the core decides, this carries out its actions
    /// (answers are queued in `wbuf`). `tx` is the session's own router link
    /// (`None` for devices). `Some` ends the session.
    async fn handle(
        &mut self,
        frame: Frame,
        mut tx: Option<&mut LinkTx>,
        state: &mut PumpState,
        now: Instant,
    ) -> Option<End> {
        let limits = &self.shared.config.limits;
        let inbound = match mqtt::parse(&frame, limits.max_payload) {
            Ok(inbound) => inbound,
            Err(e) => return Some(End::Abrupt(format!("protocol violation: {e}"))),
        };
        let actions = {
            let env = Env {
                who: &self.who,
                limits,
                quota: &self.quota,
                retained: &self.shared.retained,
                scopes: &self.shared.scopes,
            };
            state.core.on_packet(&frame, inbound, now, &env)
        };
        for action in actions {
            if let Err(end) = self.perform(action, &frame, tx.as_deref_mut(), state).await {
                return Some(end);
            }
        }
        None
    }

    async fn perform(
        &mut self,
        action: Action,
        frame: &Frame,
        tx: Option<&mut LinkTx>,
        state: &mut PumpState,
    ) -> Result<(), End> {
        let rejected = || End::Abrupt("packet rejected by the MQTT decoder".into());
        match action {
            Action::Send(packet) => packet.encode(&mut self.wbuf),
            Action::Ingress { as_qos1 } => {
                // Room in the queue first, then the packet: a future holding
                // a `Packet` across the wait would make every device's task
                // larger.
                let permit = self
                    .shared
                    .ingress
                    .reserve_one()
                    .await
                    .map_err(|e| End::Abrupt(e.to_string()))?;
                let packet = if as_qos1 {
                    outbound::decode_as_qos1(&frame.raw)
                } else {
                    outbound::decode(&frame.raw)
                };
                permit.send(packet.ok_or_else(rejected)?);
            }
            Action::Command {
                device,
                ack,
                payload_len,
            } => {
                let topic = topics::commands(&device);
                if state.router_pubacks == 0 && !self.shared.routing.interest.wanted(&topic) {
                    // Only the device wants it: no router crossing (see
                    // `crate::dispatch`).
                    let payload = frame.raw.slice(frame.raw.len() - payload_len..);
                    self.shared.dispatch.deliver(&device, payload);
                    if let Some(pkid) = ack {
                        mqtt::Outbound::Ack(mqtt::AckKind::PubAck, pkid).encode(&mut self.wbuf);
                    }
                    return Ok(());
                }
                let packet = outbound::decode(&frame.raw).ok_or_else(rejected)?;
                if ack.is_some() {
                    state.router_pubacks += 1;
                }
                to_link(tx, packet)?.await.map_err(router_gone)?;
            }
            Action::Link => {
                let packet = outbound::decode(&frame.raw).ok_or_else(rejected)?;
                if let Packet::Publish(..) = packet {
                    if frame.raw[0] & 0b0110 == 0b0010 {
                        state.router_pubacks += 1;
                    }
                }
                // A controller-role client reporting for a device (the ACL
                // lets it) reaches the in-process controller as a device's
                // own report would; the router no longer carries those to it.
                if let Some((tap, delivery)) = self.shared.routing.tapped(&packet) {
                    let _ = tap.send(vec![delivery]).await;
                }
                // The router does not hold the edge's own subscriptions.
                self.shared.routing.at_edge(&packet);
                to_link(tx, packet)?.await.map_err(router_gone)?;
            }
            Action::LinkPacket(packet) => {
                // Wanted before the router holds the filter, and no longer
                // only once it dropped it: the table may err only towards
                // "wanted" (see `crate::interest`).
                let interest = &self.shared.routing.interest;
                let holder = state.holder.unwrap_or_default();
                let unsubscribed = match &*packet {
                    Packet::Subscribe(sub, props) => {
                        let filters: Vec<(&str, u8)> = sub
                            .filters
                            .iter()
                            .map(|f| (f.path.as_str(), f.qos as u8))
                            .collect();
                        let edge: Vec<(&str, u8)> = filters
                            .iter()
                            .copied()
                            .filter(|(f, _)| is_edge_filter(f))
                            .collect();
                        if state.edge_subscriptions
                            && !edge.is_empty()
                            && interest.subscribe_at_edge(holder, &edge)
                        {
                            if edge.len() == filters.len() {
                                // Granted as asked, as the router grants.
                                let codes = filters.iter().map(|(_, q)| *q).collect();
                                mqtt::Outbound::SubAck {
                                    pkid: sub.pkid,
                                    codes,
                                }
                                .encode(&mut self.wbuf);
                                return Ok(());
                            }
                            // Device filters beside others (`mosquitto_sub
                            // -t devices/+/reported -t fleet/status` is one
                            // SUBSCRIBE): the edge keeps the device ones, so
                            // a device's messages keep their order across its
                            // topics, and the router takes the rest and
                            // answers for them; `forward` puts the edge's
                            // codes back in their places in that SUBACK.
                            let codes = filters
                                .iter()
                                .map(|(f, q)| is_edge_filter(f).then_some(*q))
                                .collect();
                            state.split_subacks.insert(sub.pkid, codes);
                            let rest: Vec<_> = sub
                                .filters
                                .iter()
                                .filter(|f| !is_edge_filter(&f.path))
                                .cloned()
                                .collect();
                            interest.add(holder, rest.iter().map(|f| f.path.as_str()));
                            let rest = rumqttd::protocol::Subscribe {
                                pkid: sub.pkid,
                                filters: rest,
                            };
                            to_link(tx, Packet::Subscribe(rest, props.clone()))?
                                .await
                                .map_err(router_gone)?;
                            return Ok(());
                        }
                        // A filter the edge held moves to the router, which
                        // then serves it alone (no copy both ways).
                        let paths: Vec<&str> = filters.iter().map(|(f, _)| *f).collect();
                        interest.unsubscribe_at_edge(holder, &paths);
                        interest.add(holder, paths);
                        None
                    }
                    Packet::Unsubscribe(unsub, _) => {
                        let filters: Vec<&str> = unsub.filters.iter().map(String::as_str).collect();
                        let router_free = interest.unsubscribe_at_edge(holder, &filters);
                        // rumqttd answers an UNSUBSCRIBE once per filter it
                        // held, and not at all when it held none: the edge
                        // answers it, once, and drops the router's answers
                        // (`forward`).
                        mqtt::Outbound::UnsubAck(unsub.pkid).encode(&mut self.wbuf);
                        if router_free && state.edge_subscriptions {
                            return Ok(());
                        }
                        Some(unsub.filters.clone())
                    }
                    _ => None,
                };
                to_link(tx, *packet)?.await.map_err(router_gone)?;
                if let Some(filters) = unsubscribed {
                    interest.remove(holder, filters.iter().map(String::as_str));
                }
            }
            Action::EdgeAcked(pkid) => {
                if let Some(acks) = &mut state.edge_acks {
                    acks.acked(pkid);
                }
            }
            Action::RouterAcks(pkids) => {
                if let Some(last) = queue_pubacks(tx.as_deref(), &pkids) {
                    to_link(tx, last)?.await.map_err(router_gone)?;
                }
            }
            Action::Tap { topic, payload_len } => {
                let Some(tap) = self.shared.tap.get() else {
                    return Ok(());
                };
                match tap.reserve().await {
                    Ok(permit) => permit.send(crate::OperatorMessage {
                        from: self.who.clone(),
                        topic,
                        payload: frame.raw.slice(frame.raw.len() - payload_len..),
                    }),
                    Err(_) => {
                        tracing::warn!(who = %self.who, "operator tap closed; request not delivered to the controller")
                    }
                }
            }
            Action::RegisterDispatch => {
                let dispatch = &self.shared.dispatch;
                dispatch.register(&self.who.id, state.inbox.clone());
                state.route = Some(crate::dispatch::Route {
                    dispatch: dispatch.clone(),
                    device: self.who.id.clone(),
                    inbox: state.inbox.clone(),
                });
            }
            Action::Fetch(fetch) => {
                self.write_blob(*fetch);
                // Written out now rather than with the rest of the batch: a
                // device pipelining fetches would otherwise have many chunks
                // waiting in `wbuf`.
                self.flush()
                    .await
                    .map_err(|e| End::Abrupt(format!("write failed: {e}")))?;
            }
            Action::UnregisterDispatch => state.route = None,
            Action::Log(note) => self.log_note(note),
            Action::Close(end) => return Err(end),
        }
        Ok(())
    }

    /// Queues the answer to a fetch: the chunk, or a header saying why not.
    fn write_blob(&mut self, fetch: Fetch) {
        let req = match fetch {
            Fetch::Serve(req) => req,
            Fetch::Refuse(header) => return self.write_blob_error(header),
        };
        let device = &self.who.id;
        let written = self.shared.blobs.locate(&req).and_then(|chunk| {
            let header = BlobHeader {
                sha256: req.sha256.clone(),
                offset: chunk.offset,
                total: chunk.image.total(),
                error: None,
            };
            outbound::blob_publish(&mut self.wbuf, device, &header, chunk.len, |buf| {
                chunk.image.read_into(chunk.offset, buf)
            })
            .map_err(crate::blobs::BlobError::Io)
        });
        if let Err(e) = written {
            if matches!(e, crate::blobs::BlobError::Io(_)) {
                if let Some(unlogged) = self.shared.blob_log.admit() {
                    tracing::warn!(who = %self.who, sha256 = %req.sha256, error = %e, unlogged, "cannot read a firmware image");
                }
            }
            self.write_blob_error(BlobHeader {
                total: e.total(),
                error: Some(e.to_string()),
                sha256: req.sha256,
                offset: req.offset,
            });
        }
    }

    fn write_blob_error(&mut self, header: BlobHeader) {
        // Without bytes nothing can fail.
        let _ = outbound::blob_publish(&mut self.wbuf, &self.who.id, &header, 0, |_| Ok(()));
    }

    fn log_note(&self, note: Note) {
        match note {
            Note::SubscriptionLimit { limit } => {
                tracing::warn!(who = %self.who, limit, "subscription limit reached; SUBSCRIBE refused")
            }
            Note::FilterLimit { limit } => {
                tracing::warn!(who = %self.who, limit, "distinct filter limit of this identity reached; SUBSCRIBE refused")
            }
            Note::SubscribeNotAuthorized { filters } => {
                tracing::warn!(who = %self.who, ?filters, "SUBSCRIBE not authorized")
            }
            Note::UnexpectedAck { kind, pkid } => {
                tracing::debug!(who = %self.who, ?kind, pkid, "unexpected ack dropped")
            }
            Note::FetchWithoutBlobSubscription => {
                tracing::debug!(who = %self.who, "fetch without a blob subscription: not answered")
            }
        }
    }

    /// Writes one notification and whatever else the router already queued,
    /// except the deliveries the core drops (acknowledging those to the
    /// router as it says).
    async fn forward(
        &mut self,
        first: Option<Notification>,
        link: &mut Link,
        state: &mut PumpState,
    ) -> Result<(), String> {
        let core = &mut state.core;
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
                note = link.rx.next() => note,
                _ = std::future::ready(()) => break,
            };
            match ready {
                Ok(Some(note)) => next = Some(note),
                _ => break,
            }
        }
        let mut router_acks = Vec::new();
        for packet in packets {
            match packet {
                Packet::PubAck(..) => state.router_pubacks = state.router_pubacks.saturating_sub(1),
                // The edge answered the UNSUBSCRIBE (`perform`).
                Packet::UnsubAck(..) => continue,
                Packet::SubAck(ack, _) if state.split_subacks.contains_key(&ack.pkid) => {
                    let split = state.split_subacks.remove(&ack.pkid).unwrap_or_default();
                    let codes = merge_suback(split, &ack.return_codes);
                    mqtt::Outbound::SubAck {
                        pkid: ack.pkid,
                        codes,
                    }
                    .encode(&mut self.wbuf);
                    continue;
                }
                _ => {}
            }
            let at = self.wbuf.len();
            V4.write(packet, &mut self.wbuf)
                .map_err(|e| format!("encode: {e:?}"))?;
            if core::in_edge_pkids(&self.wbuf[at..]) {
                return Err(
                    "internal: the router numbered a delivery in the edge's packet ids".into(),
                );
            }
            match core.on_delivery(&self.wbuf[at..], &self.who, &self.shared.scopes) {
                Delivery::Write => core.on_sent(&self.wbuf[at..]),
                Delivery::Drop { acks } => {
                    self.wbuf.truncate(at);
                    router_acks.extend_from_slice(&acks);
                }
                Delivery::Close(End::Abrupt(reason)) => return Err(reason),
                Delivery::Close(end) => return Err(format!("{end:?}")),
            }
        }
        if let Some(last) = queue_pubacks(Some(&link.tx), &router_acks) {
            link.tx
                .send(last)
                .await
                .map_err(|e| format!("router gone: {e}"))?;
        }
        self.flush()
            .await
            .map_err(|e| format!("write failed: {e}"))?;
        if unscheduled {
            // The router pauses a link that drained its buffer until told it is ready.
            link.rx
                .wake()
                .await
                .map_err(|e| format!("router gone: {e}"))?;
        }
        Ok(())
    }

    /// Writes device messages the edge handed over ([`crate::direct`]),
    /// through the same scope check as the router's deliveries.
    async fn deliver_direct(
        &mut self,
        taken: crate::direct::Taken,
        state: &mut PumpState,
    ) -> Result<(), String> {
        if taken.dropped > 0 {
            tracing::warn!(who = %self.who, dropped = taken.dropped, budget_bytes = crate::direct::BUDGET, "client is not reading fast enough: device messages dropped");
        }
        for delivery in taken.deliveries {
            let at = self.wbuf.len();
            let pkid = match delivery.qos {
                0 => 0,
                _ => state.edge_acks.get_or_insert_default().next(),
            };
            outbound::write_publish(
                &mut self.wbuf,
                &delivery.topic,
                &delivery.payload,
                delivery.qos,
                delivery.retain,
                pkid,
            );
            let core = &mut state.core;
            match core.on_delivery(&self.wbuf[at..], &self.who, &self.shared.scopes) {
                Delivery::Write => core.on_sent(&self.wbuf[at..]),
                // Out of a scoped operator's scope: never sent, so its
                // packet id is free again and nobody else is told.
                Delivery::Drop { .. } => {
                    self.wbuf.truncate(at);
                    if let Some(acks) = &mut state.edge_acks {
                        acks.acked(pkid);
                    }
                }
                Delivery::Close(end) => return Err(format!("{end:?}")),
            }
        }
        self.flush().await.map_err(|e| format!("write failed: {e}"))
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

/// Sends `packet` on the session's own router link. Not an async fn: the
/// packet goes straight into the boxed future (`LinkTx::send`'s holds a
/// whole `Packet`) instead of into every session's task.
fn to_link(
    tx: Option<&mut LinkTx>,
    packet: Packet,
) -> Result<Pin<Box<impl Future<Output = Result<usize, LinkError>> + '_>>, End> {
    // The core sends nothing to a link a device session does not have:
    // `None` is a bug, not input.
    let tx = tx.ok_or_else(|| {
        End::Abrupt("internal: packet for a router link the session does not have".into())
    })?;
    Ok(Box::pin(tx.send(packet)))
}

/// Queues PUBACKs for `pkids` on the router link but the last, which is
/// returned: sending it wakes the router once for all of them.
fn queue_pubacks(tx: Option<&LinkTx>, pkids: &[u16]) -> Option<Packet> {
    let puback = |pkid| {
        Packet::PubAck(
            rumqttd::protocol::PubAck {
                pkid,
                reason: rumqttd::protocol::PubAckReason::Success,
            },
            None,
        )
    };
    let (last, before) = pkids.split_last()?;
    if let Some(tx) = tx {
        tx.buffer().extend(before.iter().copied().map(puback));
    }
    Some(puback(*last))
}

fn router_gone(e: LinkError) -> End {
    End::Abrupt(format!("router gone: {e}"))
}

/// `wbuf` capacity kept between writes; a larger one is released.
const WBUF_KEEP: usize = 4096;

/// Direct deliveries written per turn of a session's loop, at most, so one
/// busy subscriber's writes do not hold its other work back for long.
const DIRECT_BATCH: usize = 256;

/// The next notification on the session's link; never resolves without one.
/// Boxed, and the error reduced to "gone": both would otherwise take room in
/// every session's task (`LinkError` alone is ~800 bytes).
/// What the edge queued for a clean linked session, at most `free` (the
/// room left for its unacknowledged QoS 1 deliveries); never for others.
async fn next_direct(sink: Option<&crate::direct::Sink>, free: usize) -> crate::direct::Taken {
    match sink {
        Some(sink) if free > 0 => Box::pin(sink.take(DIRECT_BATCH.min(free))).await,
        _ => std::future::pending().await,
    }
}

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
    core: Core,
    inbox: Arc<crate::dispatch::Inbox>,
    /// Set while a device is subscribed to its commands.
    route: Option<crate::dispatch::Route>,
    /// A linked session's filters in [`crate::interest`].
    holder: Option<crate::interest::Holder>,
    /// QoS 1 publishes this session handed to the router that the router
    /// has not acknowledged yet: while there are any, the edge answers no
    /// PUBACK itself (MQTT 4.6: PUBACKs go out in the order of the
    /// publishes).
    router_pubacks: u32,
    /// The edge's own QoS 1 deliveries awaiting PUBACK ([`crate::direct`]);
    /// boxed and made on the first: most sessions never get one.
    edge_acks: Option<Box<EdgeAcks>>,
    /// Whether the edge may hold this session's device subscriptions
    /// itself (clean: [`crate::interest`]).
    edge_subscriptions: bool,
    /// SUBSCRIBEs split between the edge and the router, by packet id: the
    /// code the edge granted each filter it kept, `None` where the router's
    /// SUBACK has the code. At most one per packet id.
    split_subacks: std::collections::HashMap<u16, Vec<Option<u8>>>,
}

/// The SUBACK codes of a split SUBSCRIBE, in the order of its filters: the
/// edge's where it kept the filter, the router's in turn for the others (a
/// failure should the router answer fewer, as a client reusing a packet id
/// too early could make it).
fn merge_suback(
    split: Vec<Option<u8>>,
    router: &[rumqttd::protocol::SubscribeReasonCode],
) -> Box<[u8]> {
    use rumqttd::protocol::{QoS, SubscribeReasonCode as Code};
    let mut router = router.iter().map(|code| match code {
        Code::QoS0 | Code::Success(QoS::AtMostOnce) => 0,
        Code::QoS1 | Code::Success(QoS::AtLeastOnce) => 1,
        Code::QoS2 | Code::Success(QoS::ExactlyOnce) => 2,
        _ => 0x80,
    });
    split
        .into_iter()
        .map(|edge| edge.or_else(|| router.next()).unwrap_or(0x80))
        .collect()
}

impl PumpState {
    fn edge_free(&self) -> usize {
        self.edge_acks
            .as_ref()
            .map_or(crate::direct::INFLIGHT, |a| {
                crate::direct::INFLIGHT.saturating_sub(a.unacked.len())
            })
    }
}

/// Packet ids of the edge's QoS 1 deliveries to a session, not yet
/// acknowledged (at most [`crate::direct::INFLIGHT`]).
#[derive(Debug, Default)]
struct EdgeAcks {
    unacked: Vec<u16>,
    last: u16,
}

impl EdgeAcks {
    /// The next free id at or above [`crate::direct::FIRST_PKID`].
    fn next(&mut self) -> u16 {
        loop {
            self.last = match self.last {
                u16::MAX => crate::direct::FIRST_PKID,
                last => last.max(crate::direct::FIRST_PKID - 1) + 1,
            };
            if !self.unacked.contains(&self.last) {
                self.unacked.push(self.last);
                return self.last;
            }
        }
    }

    fn acked(&mut self, pkid: u16) {
        if let Some(at) = self.unacked.iter().position(|p| *p == pkid) {
            self.unacked.swap_remove(at);
        }
    }
}

/// Waits (at most ~100 ms) until the router has taken everything queued on
/// this link, so wake-ups still in its channel find the connection alive.
async fn drained(tx: &rumqttd::local::LinkTx) {
    for _ in 0..100 {
        if tx.buffer().is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}
