//! What one connection may do after CONNECT, decided without I/O.
//!
//! The pump (`super::Session::pump`) reads frames, validates them, hands
//! each to [`Core::on_packet`] and carries out the [`Actions`] it returns,
//! in order: bytes for the client, packets for the router, the operator tap,
//! dispatch routes, log lines, the end of the session. Everything that
//! decides (ACL, rates, subscription and retained limits, the QoS 2
//! handshake, `$share` scoping, keep-alive) lives here and is tested by
//! feeding packets (`tests` below). The core awaits nothing and reads no
//! clock: time comes in as an argument. The per-identity quotas, the
//! retained accounting and the scope table are shared by all connections,
//! so the core calls them through [`Env`] (plain mutexes, no I/O).
//!
//! What the router delivers to a scoped operator (any organisation but the
//! city's own, see [`acl::scoped_org`]) passes [`Core::on_delivery`]: a
//! message on a device's topic is written only while the scope holds the
//! device, so wildcard and `$share` subscriptions and retained messages
//! never show a device outside it, and a device leaving the scope stops
//! being delivered at once.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use cityplane_proto::firmware::{BlobHeader, FetchRequest};
use cityplane_proto::{topics, Identity, Role};
use rumqttd::protocol::{Packet, QoS};
use tokio::time::Instant;

use crate::mqtt::{outbound, AckKind, Frame, Inbound, Outbound, Will};
use crate::quota::{IdentityQuota, Retained};
use crate::scopes::{ScopeCache, Scopes};
use crate::{acl, Limits, TAPPED_PREFIXES};

/// Why a session ended; decides whether the will is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
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

impl End {
    /// The will published for a session that ended this way, if any: only
    /// an abrupt end publishes one. (A takeover publishes nothing at all,
    /// not even presence: the new session's must stay the last word.)
    pub(crate) fn will<'w>(&self, will: Option<&'w Will>) -> Option<&'w Will> {
        match self {
            End::Abrupt(_) => will,
            _ => None,
        }
    }
}

/// Whether the edge must publish a device's offline presence itself: a
/// device's will is its presence, so only when no will says it.
pub(crate) fn says_offline_itself(device: &str, will: Option<&Will>) -> bool {
    will.is_none_or(|w| w.topic != topics::presence(device))
}

/// One effect of a packet, for the pump to carry out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// To the client, written with the answers to the rest of the batch.
    Send(Outbound),
    /// The packet being handled, into the router through the shared ingress
    /// link (devices). `as_qos1`: a QoS 2 publish routed as QoS 1.
    Ingress {
        as_qos1: bool,
    },
    /// The packet being handled, as the client sent it, to the session's
    /// own router link.
    Link,
    /// A controller's command for a device (QoS 0 or 1, not retained): the
    /// edge hands it to the device's connection itself and answers the
    /// PUBACK (`ack`), unless another subscriber wants it or the router
    /// still owes this session a PUBACK (they must go out in order), in
    /// which case it is [`Action::Link`].
    /// Its payload is the frame's last `payload_len` bytes.
    Command {
        device: String,
        ack: Option<u16>,
        payload_len: usize,
    },
    /// A packet the core rewrote (`$share` scoping) for the session's own link.
    LinkPacket(Box<Packet>),
    /// PUBACKs for the router, in this order, for QoS 1 deliveries the
    /// scope filter dropped (see [`Delivery::Drop`]).
    RouterAcks(Box<[u16]>),
    /// The client acknowledged a QoS 1 delivery of the edge's own
    /// ([`crate::direct`]); the router never sent it and must not hear of it.
    EdgeAcked(u16),
    /// An operator request also goes to the in-process controller, with the
    /// certificate identity (the router does not carry who published); its
    /// payload is the frame's last `payload_len` bytes.
    Tap {
        topic: String,
        payload_len: usize,
    },
    /// A device's request on its own fetch topic: the pump answers it with
    /// a blob on the device's blob topic (never routed; boxed: rare, and
    /// every session's task holds room for a few actions).
    Fetch(Box<Fetch>),
    /// The device is subscribed to its commands: route them to this session.
    RegisterDispatch,
    UnregisterDispatch,
    /// Worth a log line; the session goes on.
    Log(Note),
    /// The session ends, after the actions before this one.
    Close(End),
}

/// A device's fetch, checked (docs/PROTOCOL.md, "Firmware").
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fetch {
    /// Send these bytes (the pump finds the image and clamps the length).
    Serve(FetchRequest),
    /// Not a request that can be served: answer with this header, no bytes.
    Refuse(BlobHeader),
}

impl Fetch {
    /// Reads a fetch payload. A bad request is answered, not punished: the
    /// session goes on (it cost the device a publish of its budget).
    fn read(payload: &[u8]) -> Fetch {
        match cityplane_proto::firmware::read_fetch(payload) {
            Ok(req) => Fetch::Serve(req),
            Err(header) => Fetch::Refuse(header),
        }
    }
}

/// What [`Action::Log`] reports.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Note {
    SubscriptionLimit {
        limit: usize,
    },
    FilterLimit {
        limit: usize,
    },
    SubscribeNotAuthorized {
        filters: Box<[String]>,
    },
    UnexpectedAck {
        kind: AckKind,
        pkid: u16,
    },
    /// A fetch from a device not subscribed to its blob topic: the answer
    /// would be a message it did not subscribe to, so there is none.
    FetchWithoutBlobSubscription,
}

/// Room for the effects of one packet, inline: it is made for every
/// PUBLISH, so it must not allocate. No packet has more than two effects
/// today; the spare slots are headroom.
#[derive(Debug, Default)]
pub(crate) struct Actions {
    slots: [Option<Action>; SLOTS],
}

const SLOTS: usize = 4;

impl Actions {
    fn push(&mut self, action: Action) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.is_none()) {
            *slot = Some(action);
        } else {
            debug_assert!(false, "more actions than slots");
            // Closing is safe where carrying out a partial list is not.
            self.slots[SLOTS - 1] = Some(close("internal: too many actions for one packet"));
        }
    }

    fn one(action: Action) -> Self {
        let mut actions = Actions::default();
        actions.push(action);
        actions
    }
}

impl IntoIterator for Actions {
    type Item = Action;
    type IntoIter = std::iter::Flatten<std::array::IntoIter<Option<Action>, SLOTS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.slots.into_iter().flatten()
    }
}

fn close(reason: impl Into<String>) -> Action {
    Action::Close(End::Abrupt(reason.into()))
}

/// What the core consults but does not own: the connection's identity, the
/// broker's limits and the state shared with other connections.
pub(crate) struct Env<'a> {
    pub(crate) who: &'a Identity,
    pub(crate) limits: &'a Limits,
    /// This identity's rates and quotas, shared with its other connections.
    pub(crate) quota: &'a IdentityQuota,
    pub(crate) retained: &'a Retained,
    /// Which devices each organisation may see (the controller's table).
    pub(crate) scopes: &'a Scopes,
}

/// What the pump does with a packet the router sent for the client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Write it to the client (and report it with [`Core::on_sent`]).
    Write,
    /// Not for this client: the scope does not hold the device. A QoS 1
    /// delivery must still be acknowledged to the router, which otherwise
    /// keeps it in flight and stops delivering when its window is full;
    /// these packet ids are to be acknowledged now, in order. rumqttd
    /// accepts acks only in the order it sent, so one dropped behind a
    /// delivery the client has not acknowledged yet waits for that ack
    /// (it then comes as [`Action::RouterAcks`]). The client never sees
    /// the packet id.
    Drop { acks: Box<[u16]> },
    /// A QoS 2 delivery the client may not see: its PUBREL would reach the
    /// client. Cannot happen (a scoped operator's subscriptions are granted
    /// QoS 1 at most); should it, the session ends rather than leak.
    Close(End),
}

/// Why a will in CONNECT is refused, if it is (the connection then ends
/// with CONNACK "not authorized").
pub(crate) fn will_refusal(who: &Identity, will: &Will) -> Option<&'static str> {
    if !acl::may_set_will(who, &will.topic) {
        Some("will topic not authorized")
    } else if who.role == Role::Device && !acl::is_offline_presence(&will.payload) {
        Some(r#"a device's will must be {"online":false}"#)
    } else if will.retain && !acl::may_retain(who, &will.topic) && who.role != Role::Device {
        Some("RETAIN not allowed on the will topic")
    } else if will.payload.is_empty() {
        Some("empty will payload (it would delete the retained message)")
    } else {
        None
    }
}

/// QoS 2 publishes of one device awaiting PUBREL; more is misbehaviour.
const MAX_QOS2_PENDING: usize = 1024;

/// One connection's state after CONNECT.
#[derive(Debug)]
pub(crate) struct Core {
    /// Seconds, as the client asked; 0 = off.
    keep_alive: u16,
    /// When the client must have sent something (far ahead without keep-alive).
    deadline: Instant,
    /// When the client certificate stops being valid.
    expires: Instant,
    subscriptions: HashSet<String>,
    /// Boxed and made on first use: four hash sets are ~200 bytes that
    /// device sessions (most of them) never use.
    acks: Option<Box<AckTrack>>,
    /// Whether the device's commands are routed to this session.
    dispatching: bool,
    /// Whether the device subscribed to its blob topic (fetches answered).
    blob_subscribed: bool,
    command_qos: u8,
    next_pkid: u16,
    /// Packet ids of a device's QoS 2 publishes that await PUBREL.
    qos2_pending: Vec<u16>,
    /// A scoped operator's view of its scope and unacknowledged deliveries
    /// (made on its first delivery; `None` for everyone else).
    scope: Option<Box<ScopeState>>,
}

/// What [`Core::on_delivery`] keeps for a scoped operator.
#[derive(Debug, Default)]
struct ScopeState {
    cache: ScopeCache,
    /// QoS 1 deliveries not yet acknowledged to the router, in the order
    /// it sent them; `true`: dropped, acknowledged by the edge as soon as
    /// everything before it is. The front is never a dropped one.
    unacked: VecDeque<(u16, bool)>,
}

impl ScopeState {
    /// A dropped QoS 1 delivery: its id if it can be acknowledged now.
    fn dropped(&mut self, pkid: u16) -> Option<u16> {
        if self.unacked.is_empty() {
            return Some(pkid);
        }
        self.unacked.push_back((pkid, true));
        None
    }

    /// The client acknowledged `pkid`: the dropped deliveries now at the
    /// front, to acknowledge after it.
    fn acked(&mut self, pkid: u16) -> Vec<u16> {
        if let Some(at) = self.unacked.iter().position(|&(p, d)| p == pkid && !d) {
            self.unacked.remove(at);
        }
        let mut release = Vec::new();
        while let Some(&(p, true)) = self.unacked.front() {
            release.push(p);
            self.unacked.pop_front();
        }
        release
    }
}

impl Core {
    pub(crate) fn new(keep_alive: u16, expires: Instant, now: Instant) -> Self {
        let mut core = Core {
            keep_alive,
            deadline: now + Duration::from_secs(86_400 * 365),
            expires,
            subscriptions: HashSet::new(),
            acks: None,
            dispatching: false,
            blob_subscribed: false,
            command_qos: 0,
            next_pkid: 0,
            qos2_pending: Vec::new(),
            scope: None,
        };
        core.on_read(now);
        core
    }

    /// 1.5 × the interval the client asked for (MQTT 3.1.1 §3.1.2.10).
    fn keep_alive_period(&self) -> Option<Duration> {
        (self.keep_alive > 0).then(|| Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    /// Bytes came in at `now`.
    pub(crate) fn on_read(&mut self, now: Instant) {
        if let Some(period) = self.keep_alive_period() {
            self.deadline = now + period;
        }
    }

    /// When [`Core::on_timer`] has something to say; one timer covers both
    /// keep-alive and expiry (a second one would be armed per packet).
    pub(crate) fn wake_at(&self) -> Instant {
        self.deadline.min(self.expires)
    }

    pub(crate) fn on_timer(&self, now: Instant) -> Option<End> {
        if now < self.wake_at() {
            return None;
        }
        Some(if self.expires <= self.deadline {
            End::Expired
        } else {
            End::Abrupt(format!(
                "keep-alive of {}s expired (1.5 x interval)",
                self.keep_alive
            ))
        })
    }

    /// The registry told the session to end.
    pub(crate) fn on_kill(taken_over: bool, revoked: bool) -> End {
        if taken_over {
            End::TakenOver
        } else if revoked {
            End::Revoked
        } else {
            End::Abrupt("broker shutting down".into())
        }
    }

    /// QoS and packet id of the next command written to the device.
    pub(crate) fn on_command(&mut self) -> (u8, u16) {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        (self.command_qos, self.next_pkid)
    }

    /// A packet from the router, encoded for the client (rumqttd keeps a
    /// `Publish`'s QoS and packet id private, so the core reads the wire
    /// form): whether the client may see it. Everything is written except,
    /// for a scoped operator, a PUBLISH on a device's topic whose device is
    /// outside its organisation's scope at this moment.
    pub(crate) fn on_delivery(&mut self, wire: &[u8], who: &Identity, scopes: &Scopes) -> Delivery {
        let Some(org) = acl::scoped_org(who) else {
            return Delivery::Write;
        };
        let Some(publish) = WirePublish::read(wire) else {
            return Delivery::Write;
        };
        // Topics in the router came from validated (UTF-8) publishes; a
        // topic that is not is no device's.
        let topic = std::str::from_utf8(publish.topic).unwrap_or_default();
        let (qos, pkid) = (publish.qos, publish.pkid.unwrap_or_default());
        let state = self.scope.get_or_insert_default();
        let visible = match topics::split_device_topic(topic) {
            Some((device, _)) => state.cache.allows(scopes, org, device),
            None => true,
        };
        // The edge's own QoS 1 deliveries ([`crate::direct`]) owe the
        // router nothing: one out of scope is simply not sent.
        let edge = pkid >= crate::direct::FIRST_PKID;
        match (visible, qos) {
            (true, 0) => Delivery::Write,
            (true, 1) if edge => Delivery::Write,
            (false, 1) if edge => Delivery::Drop { acks: Box::new([]) },
            (true, _) => {
                state.unacked.push_back((pkid, false));
                Delivery::Write
            }
            (false, 0) => Delivery::Drop { acks: Box::new([]) },
            (false, 1) => Delivery::Drop {
                acks: state.dropped(pkid).into_iter().collect(),
            },
            (false, _) => Delivery::Close(End::Abrupt(format!(
                "internal: a QoS 2 delivery on {topic:?} outside the scope"
            ))),
        }
    }

    /// An encoded packet from the router was written to the client: note
    /// what the client may answer it with.
    pub(crate) fn on_sent(&mut self, wire: &[u8]) {
        self.acks.get_or_insert_default().sent(wire);
    }

    /// One validated client packet (`inbound` is `frame` parsed).
    pub(crate) fn on_packet(
        &mut self,
        frame: &Frame,
        inbound: Inbound,
        now: Instant,
        env: &Env<'_>,
    ) -> Actions {
        let device = env.who.role == Role::Device;
        match inbound {
            Inbound::Connect { .. } => Actions::one(close("protocol violation: second CONNECT")),
            Inbound::Publish {
                topic,
                qos,
                retain,
                pkid,
                payload_len,
            } => self.on_publish(frame, topic, qos, retain, pkid, payload_len, now, env),
            Inbound::Subscribe { pkid, filters } => {
                self.on_subscribe(frame, pkid, filters, now, env)
            }
            Inbound::Unsubscribe { pkid, filters } => {
                if !env.quota.take_control(now) {
                    return Actions::one(over_control_rate(env.limits));
                }
                for f in &filters {
                    self.subscriptions.remove(f);
                }
                if !device {
                    return Actions::one(scoped(frame, env.who));
                }
                let mut actions = Actions::default();
                for f in &filters {
                    let own_leaf = topics::split_device_topic(f)
                        .filter(|(id, _)| *id == env.who.id)
                        .map(|(_, leaf)| leaf);
                    if own_leaf == Some(topics::DEVICE_SUBSCRIBE_LEAF)
                        && std::mem::take(&mut self.dispatching)
                    {
                        actions.push(Action::UnregisterDispatch);
                    }
                    if own_leaf == Some(topics::DEVICE_BLOB_LEAF) {
                        self.blob_subscribed = false;
                    }
                }
                actions.push(Action::Send(Outbound::UnsubAck(pkid)));
                actions
            }
            Inbound::PingReq => Actions::one(if env.quota.take_control(now) {
                Action::Send(Outbound::PingResp)
            } else {
                over_control_rate(env.limits)
            }),
            Inbound::Disconnect => Actions::one(Action::Close(End::Graceful)),
            // The second half of a device's QoS 2 publish (see `on_publish`).
            Inbound::Ack {
                kind: AckKind::PubRel,
                pkid,
            } if device => {
                self.qos2_pending.retain(|p| *p != pkid);
                // PUBCOMP even for an unknown id: the id is free either way.
                Actions::one(Action::Send(Outbound::Ack(AckKind::PubComp, pkid)))
            }
            // The router never sends to a device (its commands come from the
            // dispatcher), so a device's PUBACK/PUBREC/PUBCOMP answer the edge.
            Inbound::Ack { .. } if device => Actions::default(),
            // rumqttd logs an ERROR for an ack it did not expect: any client
            // could fill the log on demand. Pass on only what it awaits.
            Inbound::Ack { kind, pkid } => {
                if !self.acks.as_mut().is_some_and(|a| a.take(kind, pkid)) {
                    return Actions::one(Action::Log(Note::UnexpectedAck { kind, pkid }));
                }
                if kind == AckKind::PubAck && pkid >= crate::direct::FIRST_PKID {
                    return Actions::one(Action::EdgeAcked(pkid));
                }
                let mut actions = Actions::one(Action::Link);
                let release = match (&mut self.scope, kind) {
                    (Some(scope), AckKind::PubAck) => scope.acked(pkid),
                    _ => Vec::new(),
                };
                if !release.is_empty() {
                    actions.push(Action::RouterAcks(release.into()));
                }
                actions
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_publish(
        &mut self,
        frame: &Frame,
        topic: String,
        qos: u8,
        retain: bool,
        pkid: u16,
        payload_len: usize,
        now: Instant,
        env: &Env<'_>,
    ) -> Actions {
        let (who, limits) = (env.who, env.limits);
        // Every check before anything is carried out: a refused publish
        // must have no effect at all.
        if !acl::may_publish(who, &topic) {
            return Actions::one(close(format!("not authorized to publish to {topic:?}")));
        }
        if who.role != Role::Controller && !env.quota.take_publish(now) {
            return Actions::one(close(format!(
                "publish rate above {} per second",
                limits.max_publishes_per_sec
            )));
        }
        if retain {
            if !acl::may_retain(who, &topic) {
                return Actions::one(close(format!("RETAIN not allowed on {topic:?}")));
            }
            if let Err(e) = env.retained.set(&who.id, &topic, payload_len, limits) {
                return Actions::one(close(format!("retained publish to {topic:?} refused: {e}")));
            }
        } else if payload_len == 0 {
            // rumqttd deletes the retained message of any topic that gets an
            // empty payload, RETAIN or not.
            return Actions::one(close(format!(
                "empty payload without RETAIN on {topic:?} (would delete its retained message)"
            )));
        }
        if who.role == Role::Device
            && topics::split_device_topic(&topic)
                .is_some_and(|(_, leaf)| leaf == topics::DEVICE_FETCH_LEAF)
        {
            return self.on_fetch(frame, qos, pkid, payload_len);
        }
        let command = topics::split_device_topic(&topic)
            .filter(|(_, leaf)| *leaf == topics::DEVICE_SUBSCRIBE_LEAF)
            .filter(|_| who.role == Role::Controller && qos < 2 && !retain)
            .map(|(device, _)| device.to_owned());
        let mut actions = Actions::default();
        if who.role == Role::Operator && TAPPED_PREFIXES.iter().any(|p| topic.starts_with(p)) {
            actions.push(Action::Tap { topic, payload_len });
        }
        if who.role != Role::Device {
            if qos == 2 {
                self.acks.get_or_insert_default().awaiting_pubrel(pkid);
            }
            actions.push(match command {
                Some(device) => Action::Command {
                    device,
                    ack: (qos == 1).then_some(pkid),
                    payload_len,
                },
                None => Action::Link,
            });
            return actions;
        }
        // A device's publish enters the router through the shared ingress
        // link and is answered by the edge.
        match qos {
            0 => actions.push(Action::Ingress { as_qos1: false }),
            1 => {
                actions.push(Action::Ingress { as_qos1: false });
                actions.push(Action::Send(Outbound::Ack(AckKind::PubAck, pkid)));
            }
            _ => {
                // Routed on the first PUBLISH, as QoS 1 (the router would
                // hold a QoS 2 publish under a packet id that other devices
                // reuse on the shared link); a re-send before PUBREL is only
                // answered again.
                if !self.qos2_pending.contains(&pkid) {
                    if self.qos2_pending.len() >= MAX_QOS2_PENDING {
                        return Actions::one(close(format!(
                            "more than {MAX_QOS2_PENDING} QoS 2 publishes awaiting PUBREL"
                        )));
                    }
                    self.qos2_pending.push(pkid);
                    actions.push(Action::Ingress { as_qos1: true });
                }
                actions.push(Action::Send(Outbound::Ack(AckKind::PubRec, pkid)));
            }
        }
        actions
    }

    /// A device's own fetch (the ACL and the publish budget passed it): the
    /// edge answers it and the router never sees it.
    fn on_fetch(&mut self, frame: &Frame, qos: u8, pkid: u16, payload_len: usize) -> Actions {
        let mut actions = Actions::default();
        match qos {
            0 => {}
            1 => actions.push(Action::Send(Outbound::Ack(AckKind::PubAck, pkid))),
            // A request answered once and at once needs no exactly-once.
            _ => return Actions::one(close("a fetch must be QoS 0 or 1")),
        }
        actions.push(if self.blob_subscribed {
            let payload = &frame.raw[frame.raw.len().saturating_sub(payload_len)..];
            Action::Fetch(Box::new(Fetch::read(payload)))
        } else {
            Action::Log(Note::FetchWithoutBlobSubscription)
        });
        actions
    }

    fn on_subscribe(
        &mut self,
        frame: &Frame,
        pkid: u16,
        filters: Vec<(String, u8)>,
        now: Instant,
        env: &Env<'_>,
    ) -> Actions {
        let (who, limits) = (env.who, env.limits);
        let device = who.role == Role::Device;
        if !env.quota.take_control(now) {
            return Actions::one(over_control_rate(limits));
        }
        // Checked against the table as it is now; a device leaving the
        // scope later is stopped per delivery.
        let in_scope =
            |device: &str| acl::scoped_org(who).is_none_or(|org| env.scopes.allows(org, device));
        let refused: Vec<String> = filters
            .iter()
            .map(|(f, _)| f)
            .filter(|f| !acl::may_subscribe(who, f, in_scope))
            .cloned()
            .collect();
        let new = filters
            .iter()
            .filter(|(f, _)| !self.subscriptions.contains(f))
            .count();
        let over = self.subscriptions.len() + new > limits.max_subscriptions;
        // Devices never make the router create a filter.
        let too_many_filters = refused.is_empty()
            && !over
            && !device
            && !env.quota.admit_filters(
                filters.iter().map(|(f, _)| f.as_str()),
                limits.max_filters_per_identity,
            );
        if !refused.is_empty() || over || too_many_filters {
            let note = if over {
                Note::SubscriptionLimit {
                    limit: limits.max_subscriptions,
                }
            } else if too_many_filters {
                Note::FilterLimit {
                    limit: limits.max_filters_per_identity,
                }
            } else {
                Note::SubscribeNotAuthorized {
                    filters: refused.into(),
                }
            };
            let mut actions = Actions::one(Action::Log(note));
            actions.push(Action::Send(Outbound::SubAck {
                pkid,
                codes: vec![outbound::SUBACK_FAILURE; filters.len()].into(),
            }));
            return actions;
        }
        if !device {
            self.subscriptions
                .extend(filters.into_iter().map(|(f, _)| f));
            return Actions::one(scoped(frame, who));
        }
        // The ACL left only the device's own commands and blob topics.
        // Blobs are sent at QoS 0 (a lost chunk is asked for again), so that
        // is what a blob subscription is granted.
        let is_blob = |f: &str| {
            topics::split_device_topic(f).is_some_and(|(_, l)| l == topics::DEVICE_BLOB_LEAF)
        };
        let codes: Box<[u8]> = filters
            .iter()
            .map(|(f, q)| if is_blob(f) { 0 } else { (*q).min(1) })
            .collect();
        let mut commands = None;
        for ((f, _), code) in filters.iter().zip(codes.iter()) {
            if is_blob(f) {
                self.blob_subscribed = true;
            } else {
                commands = Some(commands.unwrap_or(0).max(*code));
            }
        }
        if let Some(qos) = commands {
            self.command_qos = qos;
        }
        self.subscriptions
            .extend(filters.into_iter().map(|(f, _)| f));
        let mut actions = Actions::default();
        if commands.is_some() && !std::mem::replace(&mut self.dispatching, true) {
            actions.push(Action::RegisterDispatch);
        }
        actions.push(Action::Send(Outbound::SubAck { pkid, codes }));
        actions
    }
}

fn over_control_rate(limits: &Limits) -> Action {
    close(format!(
        "SUBSCRIBE/UNSUBSCRIBE/PINGREQ rate above {} per second",
        limits.max_subscribes_per_sec
    ))
}

/// A linked session's SUBSCRIBE or UNSUBSCRIBE for its router link, with
/// its shared-subscription groups made per identity: `$share/g/f` becomes
/// `$share/<id>:g/f` (`:` is in no id), so one operator cannot join
/// another's group and take a share of its messages. A scoped operator's
/// subscriptions are granted QoS 1 at most: a QoS 2 delivery the scope
/// filter drops would leave the router's PUBREL to reach the client.
fn scoped(frame: &Frame, who: &Identity) -> Action {
    let Some(mut packet) = outbound::decode(&frame.raw) else {
        return close("packet rejected by the MQTT decoder");
    };
    let scope = |f: &mut String| {
        if let Some(rest) = f.strip_prefix(topics::SHARE_PREFIX) {
            *f = format!("{}{}:{rest}", topics::SHARE_PREFIX, who.id);
        }
    };
    match &mut packet {
        Packet::Subscribe(sub, _) => {
            let cap = acl::scoped_org(who).is_some();
            for f in &mut sub.filters {
                scope(&mut f.path);
                if cap && f.qos == QoS::ExactlyOnce {
                    f.qos = QoS::AtLeastOnce;
                }
            }
        }
        Packet::Unsubscribe(unsub, _) => unsub.filters.iter_mut().for_each(scope),
        _ => {}
    }
    Action::LinkPacket(Box::new(packet))
}

/// Packet ids a linked client may acknowledge: those of the QoS 1/2
/// publishes and PUBRELs the router sent it, and of its own QoS 2 publishes
/// (for PUBREL). Empty for devices, whose acks the edge answers itself.
#[derive(Debug, Default)]
struct AckTrack {
    puback: HashSet<u16>,
    pubrec: HashSet<u16>,
    pubcomp: HashSet<u16>,
    pubrel: HashSet<u16>,
}

impl AckTrack {
    /// Whether an ack of `kind` for `pkid` is awaited; if so it is no longer.
    fn take(&mut self, kind: AckKind, pkid: u16) -> bool {
        match kind {
            AckKind::PubAck => self.puback.remove(&pkid),
            AckKind::PubRec => self.pubrec.remove(&pkid),
            AckKind::PubRel => self.pubrel.remove(&pkid),
            AckKind::PubComp => self.pubcomp.remove(&pkid),
        }
    }

    fn awaiting_pubrel(&mut self, pkid: u16) {
        self.pubrel.insert(pkid);
    }

    /// Notes what an encoded packet written to the client will be answered with.
    fn sent(&mut self, wire: &[u8]) {
        if let Some(publish) = WirePublish::read(wire) {
            match (publish.qos, publish.pkid) {
                (1, Some(p)) => {
                    self.puback.insert(p);
                }
                (2, Some(p)) => {
                    self.pubrec.insert(p);
                }
                _ => {}
            }
        } else if let Some((6, body)) = packet_body(wire) {
            if let Some(p) = u16_at(body, 0) {
                self.pubcomp.insert(p);
            }
        }
    }
}

/// An encoded packet's type and body (after the fixed header).
fn packet_body(wire: &[u8]) -> Option<(u8, &[u8])> {
    let first = *wire.first()?;
    let mut len = 0usize;
    let mut at = 1;
    for (i, b) in wire.iter().skip(1).take(4).enumerate() {
        len |= usize::from(b & 0x7F) << (7 * i);
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    Some((
        first >> 4,
        &wire[at.min(wire.len())..(at + len).min(wire.len())],
    ))
}

fn u16_at(body: &[u8], i: usize) -> Option<u16> {
    body.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Whether `wire`, a PUBLISH from the router, carries a packet id in the
/// range the edge numbers its own deliveries from ([`crate::direct`]): a
/// rumqttd that numbered further would make PUBACKs ambiguous.
pub(crate) fn in_edge_pkids(wire: &[u8]) -> bool {
    WirePublish::read(wire)
        .and_then(|p| p.pkid)
        .is_some_and(|p| p >= crate::direct::FIRST_PKID)
}

/// The header fields of an encoded PUBLISH.
struct WirePublish<'a> {
    qos: u8,
    topic: &'a [u8],
    /// `None` at QoS 0 (or when cut short).
    pkid: Option<u16>,
}

impl<'a> WirePublish<'a> {
    fn read(wire: &'a [u8]) -> Option<WirePublish<'a>> {
        let (3, body) = packet_body(wire)? else {
            return None;
        };
        let qos = (wire[0] >> 1) & 3;
        let topic_len = usize::from(u16_at(body, 0)?);
        let topic = body.get(2..2 + topic_len)?;
        let pkid = (qos > 0).then(|| u16_at(body, 2 + topic_len)).flatten();
        Some(WirePublish { qos, topic, pkid })
    }
}

#[cfg(test)]
mod tests {
    //! The session's rules as tables: packets in, actions out, no sockets.

    use std::sync::Arc;

    use bytes::BytesMut;
    use cityplane_proto::topics;

    use super::*;
    use crate::mqtt::{encode_publish, encode_remaining_length, next_frame, parse};
    use crate::quota::Quotas;

    /// Operators are the city's own administrators unless said.
    fn who(id: &str, role: Role) -> Identity {
        Identity {
            id: id.into(),
            role,
            org: (role == Role::Operator).then(|| cityplane_proto::ADMIN_ORG.to_owned()),
        }
    }

    fn operator_of(org: &str, id: &str) -> Identity {
        Identity {
            org: Some(org.into()),
            ..who(id, Role::Operator)
        }
    }

    fn publish(topic: &str, payload: &[u8], qos: u8, retain: bool, pkid: u16) -> Vec<u8> {
        encode_publish(topic, payload, qos, retain, pkid)
    }

    fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        for (f, q) in filters {
            body.extend((f.len() as u16).to_be_bytes());
            body.extend(f.as_bytes());
            body.push(*q);
        }
        with_header(0x82, body)
    }

    fn unsubscribe(pkid: u16, filters: &[&str]) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        for f in filters {
            body.extend((f.len() as u16).to_be_bytes());
            body.extend(f.as_bytes());
        }
        with_header(0xA2, body)
    }

    fn with_header(first: u8, body: Vec<u8>) -> Vec<u8> {
        let mut out = vec![first];
        encode_remaining_length(body.len(), &mut out);
        out.extend(body);
        out
    }

    fn ack(kind: AckKind, pkid: u16) -> Vec<u8> {
        let [hi, lo] = pkid.to_be_bytes();
        vec![kind.header(), 2, hi, lo]
    }

    const PINGREQ: [u8; 2] = [0xC0, 0];

    fn send(packet: Outbound) -> Action {
        Action::Send(packet)
    }

    fn refused(reason: String) -> Action {
        Action::Close(End::Abrupt(reason))
    }

    fn suback_failure(pkid: u16, filters: usize) -> Action {
        send(Outbound::SubAck {
            pkid,
            codes: vec![outbound::SUBACK_FAILURE; filters].into(),
        })
    }

    /// What happens, in order, to one session.
    enum Step {
        /// A client packet and the actions it must produce.
        In(Vec<u8>, Vec<Action>),
        /// A packet from the router written to the client.
        Out(Vec<u8>),
        /// A packet from the router for the client: what becomes of it
        /// (written ones are then reported with `on_sent`).
        Deliver(Vec<u8>, Delivery),
        /// The controller replaces the scope table.
        Scope(&'static [(&'static str, &'static [&'static str])]),
        /// Time passes.
        Wait(Duration),
        /// The session's timer fires: what it says.
        Timer(Option<End>),
    }
    use Step::{Deliver, In, Out, Scope, Timer, Wait};

    struct Case {
        name: &'static str,
        who: Identity,
        limits: Limits,
        keep_alive: u16,
        steps: Vec<Step>,
    }

    fn case(name: &'static str, who: Identity, steps: Vec<Step>) -> Case {
        Case {
            name,
            who,
            limits: Limits::default(),
            keep_alive: 0,
            steps,
        }
    }

    /// One connection's core with everything it consults.
    struct Conn {
        who: Identity,
        limits: Limits,
        quota: Arc<IdentityQuota>,
        retained: Retained,
        scopes: Scopes,
        core: Core,
        now: Instant,
    }

    impl Conn {
        /// `quotas` is the broker's: connections of one identity share theirs.
        fn new(who: Identity, limits: Limits, keep_alive: u16, quotas: &Quotas) -> Self {
            let now = Instant::now();
            Conn {
                quota: quotas.of(&who.id, &limits),
                who,
                limits,
                retained: Retained::default(),
                scopes: Scopes::default(),
                core: Core::new(keep_alive, now + Duration::from_secs(3_600), now),
                now,
            }
        }

        /// One client packet, as the pump hands it over.
        fn feed(&mut self, bytes: &[u8]) -> Vec<Action> {
            let mut buf = BytesMut::from(bytes);
            let frame = next_frame(&mut buf, self.limits.max_frame())
                .expect("a valid frame")
                .expect("a whole frame");
            let inbound = parse(&frame, self.limits.max_payload).expect("a valid packet");
            let env = Env {
                who: &self.who,
                limits: &self.limits,
                quota: &self.quota,
                retained: &self.retained,
                scopes: &self.scopes,
            };
            self.core.on_read(self.now);
            self.core
                .on_packet(&frame, inbound, self.now, &env)
                .into_iter()
                .collect()
        }
    }

    /// Runs a case; every step's actions must be exactly the expected ones.
    fn check(case: Case) {
        let Case {
            name,
            who,
            limits,
            keep_alive,
            steps,
        } = case;
        let mut conn = Conn::new(who, limits, keep_alive, &Quotas::default());
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                In(bytes, expected) => assert_eq!(conn.feed(&bytes), expected, "{name}, step {i}"),
                Out(bytes) => conn.core.on_sent(&bytes),
                Deliver(bytes, expected) => {
                    let got = conn.core.on_delivery(&bytes, &conn.who, &conn.scopes);
                    if got == Delivery::Write {
                        conn.core.on_sent(&bytes);
                    }
                    assert_eq!(got, expected, "{name}, step {i}");
                }
                Scope(table) => conn.scopes.replace(
                    table
                        .iter()
                        .map(|(org, devices)| {
                            let devices = devices.iter().map(|d| (*d).to_owned()).collect();
                            ((*org).to_owned(), devices)
                        })
                        .collect(),
                ),
                Wait(d) => conn.now += d,
                Timer(expected) => {
                    assert_eq!(conn.core.on_timer(conn.now), expected, "{name}, step {i}")
                }
            }
        }
    }

    #[test]
    fn session_table() {
        let d1 = || who("d1", Role::Device);
        let op = || who("op1", Role::Operator);
        let reported = topics::reported("d1");
        let telemetry = topics::telemetry("d1");
        let commands = topics::commands("d1");
        let desired = topics::desired("lamps");
        let fetch = topics::fetch("d1");
        let blob = topics::blob("d1");
        let sha = "ab".repeat(32);
        let fetch_body = |offset: u64, length: u32| {
            serde_json::to_vec(&FetchRequest {
                sha256: sha.clone(),
                offset,
                length,
            })
            .expect("json")
        };
        let serve = |offset, length| {
            Action::Fetch(Box::new(Fetch::Serve(FetchRequest {
                sha256: sha.clone(),
                offset,
                length,
            })))
        };
        let bad_fetch = |sha256: &str, offset, reason: &str| {
            Action::Fetch(Box::new(Fetch::Refuse(BlobHeader {
                sha256: sha256.into(),
                offset,
                total: 0,
                error: Some(format!("bad_request: {reason}")),
            })))
        };
        let cases = vec![
            case(
                "a device's own report is routed through ingress and acknowledged",
                d1(),
                vec![
                    In(publish(&reported, b"{}", 1, false, 1), vec![
                        Action::Ingress { as_qos1: false },
                        send(Outbound::Ack(AckKind::PubAck, 1)),
                    ]),
                    In(publish(&telemetry, b"{}", 0, false, 0), vec![Action::Ingress { as_qos1: false }]),
                ],
            ),
            case(
                "a device publishing to another device's topic is refused and closed",
                d1(),
                vec![In(publish(&topics::reported("d2"), b"{}", 1, false, 1), vec![refused(
                    format!("not authorized to publish to {:?}", topics::reported("d2")),
                )])],
            ),
            case(
                "an empty payload without RETAIN is refused (it would delete the retained message)",
                d1(),
                vec![In(publish(&reported, b"", 0, false, 0), vec![refused(format!(
                    "empty payload without RETAIN on {reported:?} (would delete its retained message)"
                ))])],
            ),
            case(
                "RETAIN is refused on telemetry and allowed on reported",
                d1(),
                vec![
                    In(publish(&reported, b"{}", 0, true, 0), vec![Action::Ingress { as_qos1: false }]),
                    In(publish(&telemetry, b"{}", 0, true, 0), vec![refused(format!(
                        "RETAIN not allowed on {telemetry:?}"
                    ))]),
                ],
            ),
            Case {
                limits: Limits {
                    max_publishes_per_sec: 2,
                    ..Limits::default()
                },
                ..case("a publish over the rate closes the session, a second later one is fine", d1(), vec![
                    In(publish(&telemetry, b"1", 0, false, 0), vec![Action::Ingress { as_qos1: false }]),
                    In(publish(&telemetry, b"2", 0, false, 0), vec![Action::Ingress { as_qos1: false }]),
                    Wait(Duration::from_millis(500)),
                    In(publish(&telemetry, b"3", 0, false, 0), vec![Action::Ingress { as_qos1: false }]),
                    In(publish(&telemetry, b"4", 0, false, 0), vec![refused(
                        "publish rate above 2 per second".into(),
                    )]),
                ])
            },
            Case {
                limits: Limits {
                    max_subscribes_per_sec: 1,
                    max_subscriptions: 1,
                    ..Limits::default()
                },
                ..case("a SUBSCRIBE over the rate closes the session", d1(), vec![
                    In(subscribe(1, &[(&commands, 1)]), vec![
                        Action::RegisterDispatch,
                        send(Outbound::SubAck { pkid: 1, codes: Box::new([1]) }),
                    ]),
                    In(subscribe(2, &[(&commands, 1)]), vec![refused(
                        "SUBSCRIBE/UNSUBSCRIBE/PINGREQ rate above 1 per second".into(),
                    )]),
                ])
            },
            case(
                "a device's commands are routed to it once, granted at most QoS 1, until it unsubscribes",
                d1(),
                vec![
                    In(subscribe(1, &[(&commands, 2)]), vec![
                        Action::RegisterDispatch,
                        send(Outbound::SubAck { pkid: 1, codes: Box::new([1]) }),
                    ]),
                    In(subscribe(2, &[(&commands, 0)]), vec![send(Outbound::SubAck { pkid: 2, codes: Box::new([0]) })]),
                    In(unsubscribe(3, &[&commands]), vec![
                        Action::UnregisterDispatch,
                        send(Outbound::UnsubAck(3)),
                    ]),
                    In(unsubscribe(4, &[&commands]), vec![send(Outbound::UnsubAck(4))]),
                    In(PINGREQ.to_vec(), vec![send(Outbound::PingResp)]),
                ],
            ),
            case(
                "a device's fetch is answered by the edge once it subscribed to its blobs, never routed",
                d1(),
                vec![
                    In(publish(&fetch, &fetch_body(0, 10), 1, false, 3), vec![
                        send(Outbound::Ack(AckKind::PubAck, 3)),
                        Action::Log(Note::FetchWithoutBlobSubscription),
                    ]),
                    In(subscribe(1, &[(&blob, 1), (&commands, 1)]), vec![
                        Action::RegisterDispatch,
                        send(Outbound::SubAck { pkid: 1, codes: Box::new([0, 1]) }),
                    ]),
                    In(publish(&fetch, &fetch_body(0, 10), 1, false, 4), vec![
                        send(Outbound::Ack(AckKind::PubAck, 4)),
                        serve(0, 10),
                    ]),
                    In(publish(&fetch, &fetch_body(70_000, 1), 0, false, 0), vec![serve(70_000, 1)]),
                    In(publish(&fetch, b"fetch please", 0, false, 0), vec![bad_fetch(
                        "", 0, "not JSON: expected ident at line 1 column 2",
                    )]),
                    In(publish(&fetch, br#"{"sha256":"ab","offset":0}"#, 0, false, 0), vec![bad_fetch(
                        "", 0, "bad_schema: missing field `length` at line 1 column 26",
                    )]),
                    In(publish(&fetch, br#"{"sha256":"../x","offset":5,"length":1}"#, 0, false, 0), vec![bad_fetch(
                        "", 5, "sha256 must be 64 lowercase hex digits",
                    )]),
                    In(publish(&fetch, &fetch_body(8, 0), 0, false, 0), vec![bad_fetch(
                        &sha, 8, "length must be above 0",
                    )]),
                    In(publish(&fetch, &fetch_body(0, 1), 2, false, 5), vec![refused(
                        "a fetch must be QoS 0 or 1".into(),
                    )]),
                ],
            ),
            case(
                "unsubscribing from blobs stops the answers, not the commands",
                d1(),
                vec![
                    In(subscribe(1, &[(&commands, 1)]), vec![
                        Action::RegisterDispatch,
                        send(Outbound::SubAck { pkid: 1, codes: Box::new([1]) }),
                    ]),
                    In(subscribe(2, &[(&blob, 0)]), vec![send(Outbound::SubAck { pkid: 2, codes: Box::new([0]) })]),
                    In(unsubscribe(3, &[&blob]), vec![send(Outbound::UnsubAck(3))]),
                    In(publish(&fetch, &fetch_body(0, 1), 0, false, 0), vec![
                        Action::Log(Note::FetchWithoutBlobSubscription),
                    ]),
                ],
            ),
            case(
                "a device may not fetch for another device nor read its blobs",
                d1(),
                vec![
                    In(subscribe(1, &[(&topics::blob("d2"), 0)]), vec![
                        Action::Log(Note::SubscribeNotAuthorized {
                            filters: Box::new([topics::blob("d2")]),
                        }),
                        suback_failure(1, 1),
                    ]),
                    In(publish(&topics::fetch("d2"), &fetch_body(0, 1), 0, false, 0), vec![refused(
                        format!("not authorized to publish to {:?}", topics::fetch("d2")),
                    )]),
                ],
            ),
            case(
                "an operator may not publish a fetch",
                op(),
                vec![In(publish(&fetch, &fetch_body(0, 1), 1, false, 1), vec![refused(format!(
                    "not authorized to publish to {fetch:?}"
                ))])],
            ),
            case(
                "nor may the controller: a fetch is a device's own request",
                who("ctl", Role::Controller),
                vec![In(publish(&fetch, &fetch_body(0, 1), 1, false, 1), vec![refused(format!(
                    "not authorized to publish to {fetch:?}"
                ))])],
            ),
            case(
                "the controller's commands are the edge's to deliver, unless QoS 2",
                who("ctl", Role::Controller),
                vec![
                    In(publish(&topics::commands("d1"), b"{}", 1, false, 7), vec![Action::Command {
                        device: "d1".into(),
                        ack: Some(7),
                        payload_len: 2,
                    }]),
                    In(publish(&topics::commands("d1"), b"{}", 0, false, 0), vec![Action::Command {
                        device: "d1".into(),
                        ack: None,
                        payload_len: 2,
                    }]),
                    In(publish(&topics::commands("d1"), b"{}", 2, false, 8), vec![Action::Link]),
                    In(publish(&topics::reported("d1"), b"{}", 1, false, 10), vec![Action::Link]),
                ],
            ),
            case(
                "a fetch with RETAIN is refused",
                d1(),
                vec![In(publish(&fetch, &fetch_body(0, 1), 1, true, 1), vec![refused(format!(
                    "RETAIN not allowed on {fetch:?}"
                ))])],
            ),
            Case {
                limits: Limits {
                    max_publishes_per_sec: 1,
                    ..Limits::default()
                },
                ..case("fetches spend the publish budget", d1(), vec![
                    In(subscribe(1, &[(&blob, 0)]), vec![send(Outbound::SubAck { pkid: 1, codes: Box::new([0]) })]),
                    In(publish(&fetch, &fetch_body(0, 1), 0, false, 0), vec![serve(0, 1)]),
                    In(publish(&fetch, &fetch_body(0, 1), 0, false, 0), vec![refused(
                        "publish rate above 1 per second".into(),
                    )]),
                ])
            },
            case(
                "a device subscribing to another device's commands gets 0x80 and no route",
                d1(),
                vec![In(subscribe(5, &[(&topics::commands("d2"), 1)]), vec![
                    Action::Log(Note::SubscribeNotAuthorized {
                        filters: Box::new([topics::commands("d2")]),
                    }),
                    suback_failure(5, 1),
                ])],
            ),
            Case {
                limits: Limits {
                    max_subscriptions: 1,
                    ..Limits::default()
                },
                ..case("subscriptions over the per-connection limit are refused as a whole", op(), vec![In(
                    subscribe(1, &[(&topics::all_devices("reported"), 1), (topics::FLEET_STATUS, 1)]),
                    vec![Action::Log(Note::SubscriptionLimit { limit: 1 }), suback_failure(1, 2)],
                )])
            },
            case(
                "a device's QoS 2 publish is routed once as QoS 1 until PUBREL frees its id",
                d1(),
                vec![
                    In(publish(&reported, b"{}", 2, false, 7), vec![
                        Action::Ingress { as_qos1: true },
                        send(Outbound::Ack(AckKind::PubRec, 7)),
                    ]),
                    In(publish(&reported, b"{}", 2, false, 7), vec![send(Outbound::Ack(AckKind::PubRec, 7))]),
                    In(ack(AckKind::PubRel, 7), vec![send(Outbound::Ack(AckKind::PubComp, 7))]),
                    In(publish(&reported, b"{}", 2, false, 7), vec![
                        Action::Ingress { as_qos1: true },
                        send(Outbound::Ack(AckKind::PubRec, 7)),
                    ]),
                    // A device's other acks answer the edge, never the router.
                    In(ack(AckKind::PubAck, 9), vec![]),
                    In(ack(AckKind::PubComp, 9), vec![]),
                ],
            ),
            case(
                "a linked client's QoS 2 acks reach the router only when the router awaits them",
                op(),
                vec![
                    // Delivery to the client: PUBLISH, PUBREC, PUBREL, PUBCOMP.
                    Out(publish(topics::FLEET_STATUS, b"{}", 2, false, 5)),
                    In(ack(AckKind::PubRec, 5), vec![Action::Link]),
                    In(ack(AckKind::PubRec, 5), vec![Action::Log(Note::UnexpectedAck {
                        kind: AckKind::PubRec,
                        pkid: 5,
                    })]),
                    Out(ack(AckKind::PubRel, 5)),
                    In(ack(AckKind::PubComp, 5), vec![Action::Link]),
                    // The client's own QoS 2 publish: its PUBREL is awaited.
                    In(publish(&desired, b"{}", 2, false, 9), vec![
                        Action::Tap { topic: desired.clone(), payload_len: 2 },
                        Action::Link,
                    ]),
                    In(ack(AckKind::PubRel, 9), vec![Action::Link]),
                    In(ack(AckKind::PubRel, 9), vec![Action::Log(Note::UnexpectedAck {
                        kind: AckKind::PubRel,
                        pkid: 9,
                    })]),
                ],
            ),
            case(
                "a stray ack from a linked client is dropped before rumqttd logs it",
                op(),
                vec![
                    Out(publish(topics::FLEET_STATUS, b"{}", 1, false, 3)),
                    In(ack(AckKind::PubAck, 4), vec![Action::Log(Note::UnexpectedAck {
                        kind: AckKind::PubAck,
                        pkid: 4,
                    })]),
                    In(ack(AckKind::PubAck, 3), vec![Action::Link]),
                ],
            ),
            case(
                "operators may not retain and may not publish outside their prefixes",
                op(),
                vec![
                    In(publish(&desired, b"{}", 1, true, 1), vec![refused(format!(
                        "RETAIN not allowed on {desired:?}"
                    ))]),
                    In(publish(topics::FLEET_DESIRED, b"{}", 0, false, 0), vec![refused(format!(
                        "not authorized to publish to {:?}",
                        topics::FLEET_DESIRED
                    ))]),
                ],
            ),
            Case {
                keep_alive: 10,
                ..case("keep-alive is 1.5 x the interval, counted from the last packet", d1(), vec![
                    Wait(Duration::from_secs(14)),
                    Timer(None),
                    In(PINGREQ.to_vec(), vec![send(Outbound::PingResp)]),
                    Wait(Duration::from_secs(14)),
                    Timer(None),
                    Wait(Duration::from_secs(1)),
                    Timer(Some(End::Abrupt("keep-alive of 10s expired (1.5 x interval)".into()))),
                ])
            },
            case(
                "the certificate's end ends the session; DISCONNECT is graceful, a second CONNECT is not",
                d1(),
                vec![
                    In(vec![0xE0, 0], vec![Action::Close(End::Graceful)]),
                    In(
                        with_header(0x10, b"\0\x04MQTT\x04\x02\0\0\0\x02d1".to_vec()),
                        vec![refused("protocol violation: second CONNECT".into())],
                    ),
                    Wait(Duration::from_secs(3_600)),
                    Timer(Some(End::Expired)),
                ],
            ),
        ];
        for c in cases {
            check(c);
        }
    }

    /// `$share/<group>/…` from a linked client is rewritten to
    /// `$share/<id>:<group>/…` both ways, so operators cannot share groups.
    #[test]
    fn shared_groups_are_scoped_to_the_identity() {
        let op = who("op1", Role::Operator);
        let filter = format!("{}g/{}", topics::SHARE_PREFIX, topics::FLEET_STATUS);
        let scoped = format!("{}op1:g/{}", topics::SHARE_PREFIX, topics::FLEET_STATUS);
        let mut conn = Conn::new(op, Limits::default(), 0, &Quotas::default());
        let mut rewritten = |packet: &[u8]| match conn.feed(packet).pop() {
            Some(Action::LinkPacket(packet)) => match *packet {
                Packet::Subscribe(sub, _) => sub.filters.into_iter().map(|f| f.path).collect(),
                Packet::Unsubscribe(unsub, _) => unsub.filters,
                other => panic!("{other:?}"),
            },
            other => panic!("not a packet for the link: {other:?}"),
        };
        let plain = topics::FLEET_STATUS.to_owned();
        assert_eq!(
            rewritten(&subscribe(1, &[(&filter, 1), (&plain, 0)])),
            vec![scoped.clone(), plain.clone()]
        );
        assert_eq!(rewritten(&unsubscribe(2, &[&filter])), vec![scoped]);
    }

    /// What the router delivers to a scoped operator: only its scope's
    /// devices, whatever the subscription; dropped QoS 1 deliveries are
    /// acknowledged to the router in the order it sent them.
    #[test]
    fn deliveries_to_a_scoped_operator_stay_inside_its_scope() {
        let bob = || operator_of("lighting-co", "bob");
        let lamp = |qos, pkid| publish(&topics::reported("lamp1"), b"{}", qos, false, pkid);
        let cam = |qos, pkid| publish(&topics::telemetry("cam1"), b"{}", qos, false, pkid);
        let drop = |acks: &[u16]| Delivery::Drop { acks: acks.into() };
        let puback = |pkid| ack(AckKind::PubAck, pkid);
        let lighting: &[(&str, &[&str])] = &[("lighting-co", &["lamp1"])];
        let cases = vec![
            case(
                "nothing of a device before the controller gives a scope",
                bob(),
                vec![
                    Deliver(lamp(0, 0), drop(&[])),
                    Deliver(
                        publish(&topics::presence("lamp1"), b"{}", 1, true, 1),
                        drop(&[1]),
                    ),
                    // Its own answers are no device's.
                    Deliver(
                        publish(&topics::response("bob", "r1"), b"{}", 1, false, 2),
                        Delivery::Write,
                    ),
                    In(puback(2), vec![Action::Link]),
                ],
            ),
            case(
                "inside the scope written, outside dropped; acks to the router keep its order",
                bob(),
                vec![
                    Scope(lighting),
                    Deliver(lamp(0, 0), Delivery::Write),
                    Deliver(cam(0, 0), drop(&[])),
                    // Nothing in flight: a dropped delivery is acknowledged at once.
                    Deliver(cam(1, 1), drop(&[1])),
                    Deliver(lamp(1, 2), Delivery::Write),
                    // Behind 2, which the client has not acknowledged yet.
                    Deliver(cam(1, 3), drop(&[])),
                    Deliver(cam(1, 4), drop(&[])),
                    Deliver(lamp(1, 5), Delivery::Write),
                    Deliver(cam(1, 6), drop(&[])),
                    In(
                        puback(2),
                        vec![Action::Link, Action::RouterAcks(Box::new([3, 4]))],
                    ),
                    In(
                        puback(5),
                        vec![Action::Link, Action::RouterAcks(Box::new([6]))],
                    ),
                    Deliver(cam(1, 7), drop(&[7])),
                    // The client cannot acknowledge what it never saw.
                    In(
                        puback(3),
                        vec![Action::Log(Note::UnexpectedAck {
                            kind: AckKind::PubAck,
                            pkid: 3,
                        })],
                    ),
                ],
            ),
            case(
                "the edge's own QoS 1 deliveries: outside the scope not sent and owed to nobody",
                bob(),
                vec![
                    Scope(lighting),
                    Deliver(lamp(1, 2), Delivery::Write),
                    Deliver(cam(1, 101), drop(&[])),
                    Deliver(lamp(1, 102), Delivery::Write),
                    // The router's delivery before still waits for its PUBACK.
                    Deliver(cam(1, 3), drop(&[])),
                    In(puback(102), vec![Action::EdgeAcked(102)]),
                    In(
                        puback(2),
                        vec![Action::Link, Action::RouterAcks(Box::new([3]))],
                    ),
                    In(
                        puback(101),
                        vec![Action::Log(Note::UnexpectedAck {
                            kind: AckKind::PubAck,
                            pkid: 101,
                        })],
                    ),
                ],
            ),
            case(
                "a scope change applies to the next delivery",
                bob(),
                vec![
                    Scope(lighting),
                    Deliver(cam(0, 0), drop(&[])),
                    Scope(&[("lighting-co", &["lamp1", "cam1"])]),
                    Deliver(cam(0, 0), Delivery::Write),
                    Scope(&[("camera-int", &["lamp1", "cam1"])]),
                    Deliver(cam(0, 0), drop(&[])),
                    Deliver(lamp(0, 0), drop(&[])),
                ],
            ),
            case(
                "a QoS 2 delivery outside the scope ends the session rather than leak",
                bob(),
                vec![Deliver(
                    cam(2, 9),
                    Delivery::Close(End::Abrupt(format!(
                        "internal: a QoS 2 delivery on {:?} outside the scope",
                        topics::telemetry("cam1")
                    ))),
                )],
            ),
            case(
                "the city's operators and the controller see every device",
                who("alice", Role::Operator),
                vec![
                    Deliver(cam(1, 1), Delivery::Write),
                    Deliver(lamp(0, 0), Delivery::Write),
                    In(puback(1), vec![Action::Link]),
                ],
            ),
            case(
                "a PUBACK for the edge's own delivery stays at the edge; the router's go on",
                who("op1", Role::Operator),
                vec![
                    Deliver(lamp(1, 2), Delivery::Write),
                    Deliver(lamp(1, 101), Delivery::Write),
                    In(puback(101), vec![Action::EdgeAcked(101)]),
                    In(
                        puback(101),
                        vec![Action::Log(Note::UnexpectedAck {
                            kind: AckKind::PubAck,
                            pkid: 101,
                        })],
                    ),
                    In(puback(2), vec![Action::Link]),
                ],
            ),
            case(
                "the controller is not scoped",
                who("ctl", Role::Controller),
                vec![Deliver(cam(1, 1), Delivery::Write)],
            ),
            case(
                "a scoped operator names only devices of its scope at SUBSCRIBE",
                bob(),
                vec![
                    Scope(lighting),
                    In(
                        subscribe(1, &[(&topics::reported("cam1"), 1)]),
                        vec![
                            Action::Log(Note::SubscribeNotAuthorized {
                                filters: Box::new([topics::reported("cam1")]),
                            }),
                            suback_failure(1, 1),
                        ],
                    ),
                    In(
                        subscribe(2, &[(topics::FLEET_STATUS, 0)]),
                        vec![
                            Action::Log(Note::SubscribeNotAuthorized {
                                filters: Box::new([topics::FLEET_STATUS.into()]),
                            }),
                            suback_failure(2, 1),
                        ],
                    ),
                ],
            ),
        ];
        for c in cases {
            check(c);
        }
        // Granted QoS 1 at most: a dropped QoS 2 delivery cannot be hidden.
        let mut conn = Conn::new(bob(), Limits::default(), 0, &Quotas::default());
        conn.scopes
            .replace([("lighting-co".to_owned(), ["lamp1".to_owned()].into())].into());
        let wildcard = topics::all_devices("reported");
        let Some(Action::LinkPacket(packet)) = conn
            .feed(&subscribe(
                3,
                &[(&wildcard, 2), (&topics::reported("lamp1"), 0)],
            ))
            .pop()
        else {
            panic!("not for the link");
        };
        let Packet::Subscribe(sub, _) = *packet else {
            panic!("not a SUBSCRIBE: {packet:?}");
        };
        let granted: Vec<_> = sub
            .filters
            .iter()
            .map(|f| (f.path.as_str(), f.qos))
            .collect();
        assert_eq!(
            granted,
            [
                (wildcard.as_str(), QoS::AtLeastOnce),
                (topics::reported("lamp1").as_str(), QoS::AtMostOnce)
            ]
        );
    }

    #[test]
    fn a_device_will_must_be_its_own_offline_presence() {
        let d1 = who("d1", Role::Device);
        let will = |topic: String, payload: &[u8], retain| Will {
            topic,
            payload: payload.to_vec(),
            qos: 1,
            retain,
        };
        let offline = br#"{"online":false}"#;
        let table = [
            (will(topics::presence("d1"), offline, true), None),
            (
                will(topics::presence("d2"), offline, true),
                Some("will topic not authorized"),
            ),
            (
                will(topics::presence("d1"), br#"{"online":true}"#, true),
                Some(r#"a device's will must be {"online":false}"#),
            ),
        ];
        for (w, expected) in table {
            assert_eq!(will_refusal(&d1, &w), expected, "{w:?}");
        }
        let op = who("op1", Role::Operator);
        assert_eq!(
            will_refusal(&op, &will(topics::desired("x"), b"{}", false)),
            Some("will topic not authorized")
        );
    }

    #[test]
    fn only_an_abrupt_end_publishes_the_will() {
        let presence = Will {
            topic: topics::presence("d1"),
            payload: br#"{"online":false}"#.to_vec(),
            qos: 1,
            retain: true,
        };
        let abrupt = End::Abrupt("read failed".into());
        for (end, published) in [
            (&abrupt, true),
            (&End::Graceful, false),
            (&End::Revoked, false),
            (&End::Expired, false),
        ] {
            assert_eq!(end.will(Some(&presence)).is_some(), published, "{end:?}");
            // Without its will a device's offline presence comes from the edge.
            let will = end.will(Some(&presence));
            assert_eq!(says_offline_itself("d1", will), !published, "{end:?}");
        }
        assert!(says_offline_itself("d2", Some(&presence)));
    }

    /// The core is pure: no clock, no sockets, no awaiting, no logging
    /// (the pump logs what [`Action::Log`] and [`Action::Close`] report).
    #[test]
    fn the_session_core_reads_no_clock_and_does_no_io() {
        let source = include_str!("core.rs");
        let shipped = source.split("#[cfg(test)]").next().unwrap_or_default();
        let forbidden = [
            "::now(",
            "SystemTime",
            ".await",
            "async ",
            "std::net",
            "std::fs",
            "tokio::net",
            "tokio::io",
            "tokio::sync",
            "tracing::",
        ];
        for (n, line) in shipped.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for word in forbidden {
                // Whole words only (`.await` is not `.awaiting_pubrel`).
                let found = line.match_indices(word).any(|(at, _)| {
                    !line[at + word.len()..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                assert!(!found, "core.rs:{}: {word} in {line:?}", n + 1);
            }
        }
    }

    #[test]
    fn quota_is_shared_across_connections() {
        // Two connections of one identity spend the same PINGREQ budget.
        let limits = Limits {
            max_subscribes_per_sec: 1,
            max_subscriptions: 1,
            ..Limits::default()
        };
        let quotas = Quotas::default();
        let mut a = Conn::new(who("d1", Role::Device), limits.clone(), 0, &quotas);
        let mut b = Conn::new(who("d1", Role::Device), limits, 0, &quotas);
        assert_eq!(a.feed(&PINGREQ), vec![send(Outbound::PingResp)]);
        assert!(matches!(
            b.feed(&PINGREQ)[..],
            [Action::Close(End::Abrupt(_))]
        ));
    }
}
