//! The controller as a client of an external MQTT broker (a RabbitMQ
//! cluster, `cityplane cluster`): what feeds the loop and carries its
//! output when the broker is not in this process.
//!
//! - One persistent session (clean session off, QoS 1) under the
//!   controller's certificate: what arrives while the controller is away
//!   waits in the broker's queue.
//! - Deliveries are acknowledged by hand, only once the commit covering
//!   them is durable ([`Ack`], released by the loop): a crash before that
//!   makes the broker deliver them again, so nothing the broker
//!   acknowledged to a device is lost. Reports and acks are idempotent,
//!   so a redelivery is harmless.
//! - Nodes are tried in turn: when one dies the session moves to the next.
//! - Operators name themselves in the topic (`fleet/by/<operator>/...`):
//!   the broker's per-user topic permission is what makes that true; their
//!   organisation is read from the PKI's issuance record.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cityplane_broker::OperatorMessage;
use cityplane_certs::registry::IssuedIdentity;
use cityplane_proto::{topics, Identity, Role};
use rumqttc::{
    AsyncClient, Event as MqttEvent, EventLoop, MqttOptions, Packet, Publish, QoS, SubscribeFilter,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use super::{Event, DEVICE_LEAVES};
use crate::fleet::Outgoing;

/// Where and as whom the controller connects.
#[derive(Clone)]
pub struct ExternalBroker {
    /// `(host, port)` of each node, tried in this order and round again.
    pub nodes: Vec<(String, u16)>,
    /// The controller's identity: its certificate's CN, and the MQTT
    /// client id of its persistent session.
    pub id: String,
    pub tls: Arc<rustls::ClientConfig>,
    /// The PKI (or server) directory whose `issued.jsonl` says which
    /// operators exist and their organisations.
    pub identities: PathBuf,
    /// Where the controller stores firmware images
    /// ([`super::firmware_dir`]): devices' fetches are answered from it,
    /// since an external broker has no edge of ours to answer them.
    pub firmware: Option<PathBuf>,
    /// The controller's pin table, filled as on the embedded broker; here
    /// nothing in this process enforces it: whoever provisions the broker
    /// reads the quarantined devices from it (`cityplane controller
    /// --cluster-dir` deletes their users).
    pub pins: cityplane_broker::Pins,
    /// Told `(device, command id)` of each command re-sent after a second timeout
    /// ([`Outgoing::unanswered`]), for whoever can act on the broker.
    /// RabbitMQ 3.10 can leave a device that reconnected right after a node
    /// died subscribed with no route to its queue: `list_bindings` shows
    /// the binding, the topic exchange's routing table lost it, and every
    /// command is dropped until the queue is made again (rabbitmq-server
    /// issues 5075, 6271). `cityplane controller --cluster-dir` closes such
    /// a device's connection, so it subscribes afresh.
    pub unanswered: Option<mpsc::UnboundedSender<(String, String)>>,
    /// Device messages arrive through this many shard sessions (client ids
    /// `<id>.shard-<k>`) instead of the main session's subscriptions: each
    /// a persistent session of its own, subscribing to nothing, whose
    /// queue `cluster sync --shards N` binds each device's leaves to
    /// (docs/DESIGN-SHARDING.md). `None`: one session for everything.
    pub shard_sessions: Option<u32>,
    /// Sharded (several controllers, docs/DESIGN-SHARDING.md): this
    /// controller's name among them (`id@host:pid`). It then publishes
    /// through a session of its own (client id `<id>.out-<member>`, clean),
    /// holds the shard sessions of the shards it holds, and the main
    /// session only while it leads; `shard_sessions` is ignored.
    pub member: Option<String>,
}

impl std::fmt::Debug for ExternalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalBroker")
            .field("nodes", &self.nodes)
            .field("id", &self.id)
            .field("identities", &self.identities)
            .field("firmware", &self.firmware)
            .finish_non_exhaustive()
    }
}

/// Unacknowledged deliveries the broker may hand the controller at once:
/// they wait for the commit that covers them, so this bounds a batch.
const INFLIGHT: u16 = 1000;
/// Wait after a failed connection before the next node, doubling to the
/// maximum.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How long a node may take to answer CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Every session's keep-alive (see [`options`]).
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Fetches waiting for their answer. A device asks again when an answer
/// does not come, so past this a fetch is dropped rather than let a
/// rollout's fetches hold up reports and operators' requests.
const FETCHES_QUEUED: usize = 256;

/// One delivery's acknowledgement, given by the loop once what it changed
/// is durable.
pub(crate) struct Ack {
    acks: mpsc::UnboundedSender<(u64, u16)>,
    connection: u64,
    pkid: u16,
}

impl Ack {
    pub(crate) fn release(self) {
        let _ = self.acks.send((self.connection, self.pkid));
    }
}

#[cfg(test)]
impl Ack {
    /// An acknowledgement of delivery `pkid` that arrives on `acks`.
    pub(crate) fn for_tests(acks: mpsc::UnboundedSender<(u64, u16)>, pkid: u16) -> Ack {
        Ack {
            acks,
            connection: 0,
            pkid,
        }
    }
}

/// Which connection acknowledgements belong to. A packet id is only
/// meaningful on the connection it arrived on (the broker numbers its
/// deliveries per connection and requeues unacknowledged ones when a
/// connection ends), so an acknowledgement from an earlier connection is
/// dropped: it could acknowledge another message that reused the id.
struct Connection {
    generation: Mutex<u64>,
}

/// Which of the controller's sessions a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    /// Client id `<id>`: operators' requests, devices' fetches, everything
    /// published, and device messages unless there are shard sessions.
    Main { device_messages: bool },
    /// Client id `<id>.shard-<k>`: device messages of shard k only.
    Shard(u32),
    /// Sharded, client id `<id>.out-<member>`: what this controller
    /// publishes. A clean session that subscribes to nothing: each
    /// controller has its own, so none evicts another's.
    Publisher,
}

impl Session {
    fn client_id(self, broker: &ExternalBroker) -> String {
        let id = &broker.id;
        match self {
            Session::Main { .. } => id.to_owned(),
            Session::Shard(k) => format!("{id}.shard-{k}"),
            Session::Publisher => {
                let member: String = broker
                    .member
                    .as_deref()
                    .unwrap_or_default()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                    .collect();
                format!("{id}.out-{member}")
            }
        }
    }
}

/// Which sessions a sharded controller holds, as the keeper and the
/// leader's lease say (see [`ExternalBroker::member`]).
pub(super) struct Steering {
    /// The shards held, with their lease generations.
    pub(super) shards: tokio::sync::watch::Receiver<std::collections::BTreeMap<u32, i64>>,
    pub(super) lead: tokio::sync::watch::Receiver<bool>,
}

pub(super) fn spawn(
    broker: ExternalBroker,
    events: mpsc::Sender<Event>,
    out: mpsc::Receiver<Outgoing>,
    secrets: Arc<crate::secrets::Secrets>,
    steering: Option<Steering>,
) {
    let (fetch_tx, fetch_rx) = mpsc::channel(FETCHES_QUEUED);
    let blobs = cityplane_broker::blobs::Blobs::new(broker.firmware.clone());
    if let Some(steering) = steering {
        let (client, tasks) = connect(&broker, Session::Publisher, &events, &fetch_tx);
        tasks.detach();
        tokio::spawn(serve_fetches(client.clone(), blobs, fetch_rx));
        tokio::spawn(publish(client, out, secrets, broker.unanswered.clone()));
        tokio::spawn(steer(broker, steering, events, fetch_tx));
        return;
    }
    let main = Session::Main {
        device_messages: broker.shard_sessions.is_none(),
    };
    let (client, tasks) = connect(&broker, main, &events, &fetch_tx);
    tasks.detach();
    tokio::spawn(serve_fetches(client.clone(), blobs, fetch_rx));
    tokio::spawn(publish(client, out, secrets, broker.unanswered.clone()));
    for k in 0..broker.shard_sessions.unwrap_or(0) {
        let (_, tasks) = connect(&broker, Session::Shard(k), &events, &fetch_tx);
        tasks.detach();
    }
}

/// A session's tasks: dropping them ends the session's connection (the
/// broker then requeues what it delivered and was not acknowledged, for
/// whoever holds the session next).
struct SessionTasks(Vec<tokio::task::JoinHandle<()>>);

impl SessionTasks {
    /// For the life of the process: the tasks run on, their handles
    /// dropped (which detaches a tokio task; only `Drop` here aborts).
    fn detach(mut self) {
        self.0.clear();
    }
}

impl Drop for SessionTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Holds the shard sessions of the shards the keeper says, and the main
/// session while this controller leads.
async fn steer(
    broker: ExternalBroker,
    mut steering: Steering,
    events: mpsc::Sender<Event>,
    fetches: mpsc::Sender<(String, bytes::Bytes)>,
) {
    let mut shards: std::collections::BTreeMap<u32, (i64, SessionTasks)> = Default::default();
    let mut main: Option<SessionTasks> = None;
    loop {
        let want = steering.shards.borrow_and_update().clone();
        // A shard given up, or held again under a new lease since: its
        // session ends, and with it what the loop left unacknowledged
        // (deliveries for devices it did not own at the time) goes back
        // to the queue. A session kept across would sit on them.
        shards.retain(|k, (generation, _)| want.get(k) == Some(generation));
        for (k, generation) in want {
            shards.entry(k).or_insert_with(|| {
                (
                    generation,
                    connect(&broker, Session::Shard(k), &events, &fetches).1,
                )
            });
        }
        if *steering.lead.borrow_and_update() && main.is_none() {
            let session = Session::Main {
                device_messages: false,
            };
            main = Some(connect(&broker, session, &events, &fetches).1);
        }
        tokio::select! {
            changed = steering.shards.changed() => if changed.is_err() { return },
            changed = steering.lead.changed() => if changed.is_err() { return },
        }
    }
}

/// Starts `session`'s connection, its receiver and its acknowledgements;
/// returns its client and its tasks.
fn connect(
    broker: &ExternalBroker,
    session: Session,
    events: &mpsc::Sender<Event>,
    fetches: &mpsc::Sender<(String, bytes::Bytes)>,
) -> (AsyncClient, SessionTasks) {
    let (client, mut eventloop) =
        AsyncClient::new(options(broker, session, 0), usize::from(INFLIGHT) * 4);
    // A node that just lost a peer answers late: it re-elects the leaders
    // of the session's replicated queue and takes over the dead node's
    // clients. Giving up sooner only moves the wait to the next node.
    eventloop
        .network_options
        .set_connection_timeout(CONNECT_TIMEOUT.as_secs());
    let connection = Arc::new(Connection {
        generation: Mutex::new(0),
    });
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let acks = tokio::spawn(acknowledge(client.clone(), connection.clone(), ack_rx));
    let receiver = tokio::spawn(receive(
        broker.clone(),
        session,
        client.clone(),
        eventloop,
        connection,
        events.clone(),
        ack_tx,
        fetches.clone(),
    ));
    (client, SessionTasks(vec![acks, receiver]))
}

/// Answers devices' fetches with blobs (docs/PROTOCOL.md, "Firmware"), as
/// the embedded broker's edge does: on the device's own blob topic, QoS 0.
async fn serve_fetches(
    client: AsyncClient,
    blobs: cityplane_broker::blobs::Blobs,
    mut fetches: mpsc::Receiver<(String, bytes::Bytes)>,
) {
    while let Some((device, payload)) = fetches.recv().await {
        let answer = match cityplane_proto::firmware::read_fetch(&payload) {
            // A page-cache read of at most 64 KiB (see the broker's blobs).
            Ok(req) => blobs.answer(&req),
            Err(header) => cityplane_proto::firmware::encode_blob(&header, &[]),
        };
        if client
            .publish(topics::blob(&device), QoS::AtMostOnce, false, answer)
            .await
            .is_err()
        {
            return;
        }
    }
}

fn options(broker: &ExternalBroker, session: Session, node: usize) -> MqttOptions {
    let (host, port) = &broker.nodes[node % broker.nodes.len()];
    let mut options = MqttOptions::new(session.client_id(broker), host.clone(), *port);
    // Persistent, so what arrives while the controller is away waits for
    // it; the publisher receives nothing, so nothing waits.
    options.set_clean_session(session == Session::Publisher);
    options.set_manual_acks(true);
    // RabbitMQ stops reading a connection that publishes faster than its
    // queues take (credit flow), PINGREQ included, and rumqttc gives up
    // when a PINGRESP is a keep-alive late: with 10 s every controller's
    // publisher lost its node at the start of each 10,000-device
    // converge, and what it had published at QoS 0 with it (operators'
    // answers, commands re-sent 30 s later). The receiving sessions lost
    // theirs too, in bursts (49 times in one 10,000-device run), when a
    // busy node or a loop behind on its commits kept a PINGRESP unread
    // for 10 s: each loss sends what was in flight round again. A node
    // that dies closes its sockets, so this is only how long a silent,
    // hung node goes unnoticed.
    options.set_keep_alive(KEEP_ALIVE);
    options.set_inflight(INFLIGHT);
    options.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        broker.tls.clone(),
    )));
    options
}

/// What a session subscribes to: the main session the devices' fetches,
/// the operators' requests and (without shard sessions) the device leaves
/// the controller reads. A shard session's device bindings are
/// provisioned, not subscribed; it subscribes to one topic nobody
/// publishes, only so that the MQTT plugin declares its queue and consumes
/// it even when the session connects before `cluster sync --shards` made
/// the queue (bindings made later then deliver at once).
fn filters(session: Session) -> Vec<SubscribeFilter> {
    let device_messages = match session {
        Session::Main { device_messages } => device_messages,
        Session::Publisher => return Vec::new(),
        Session::Shard(k) => {
            return vec![SubscribeFilter::new(
                format!("cityplane/shards/{k}"),
                QoS::AtLeastOnce,
            )]
        }
    };
    let leaves: &[&str] = if device_messages { &DEVICE_LEAVES } else { &[] };
    leaves
        .iter()
        .chain([&topics::DEVICE_FETCH_LEAF])
        .map(|leaf| topics::all_devices(leaf))
        .chain(topics::FLEET_BY_ALL.iter().map(|f| f.to_string()))
        .map(|path| SubscribeFilter::new(path, QoS::AtLeastOnce))
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn receive(
    broker: ExternalBroker,
    session: Session,
    client: AsyncClient,
    mut eventloop: EventLoop,
    connection: Arc<Connection>,
    events: mpsc::Sender<Event>,
    acks: mpsc::UnboundedSender<(u64, u16)>,
    fetches: mpsc::Sender<(String, bytes::Bytes)>,
) {
    let mut node = 0;
    let mut wait = RECONNECT_FIRST;
    let mut operators = Operators::new(&broker.identities);
    loop {
        match eventloop.poll().await {
            Ok(MqttEvent::Incoming(Packet::ConnAck(ack))) => {
                wait = RECONNECT_FIRST;
                let (host, port) = &broker.nodes[node % broker.nodes.len()];
                tracing::info!(node = %format!("{host}:{port}"), session = ?session, session_present = ack.session_present, "controller connected to the broker");
                // A resumed session keeps its subscriptions; subscribing
                // again is harmless and covers a session the broker lost.
                let filters = filters(session);
                if !filters.is_empty() {
                    if let Err(e) = client.try_subscribe_many(filters) {
                        tracing::error!(error = %e, "could not queue the subscriptions");
                    }
                }
                if session
                    == (Session::Main {
                        device_messages: false,
                    })
                {
                    // A session that once read device messages itself
                    // (before --shards) would go on receiving copies of
                    // what the shard sessions receive.
                    for leaf in DEVICE_LEAVES {
                        let _ = client.try_unsubscribe(topics::all_devices(leaf));
                    }
                }
            }
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                // Only this task moves the generation on, so it is the
                // connection this delivery came on.
                let generation = *connection
                    .generation
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let ack = (p.qos != QoS::AtMostOnce).then(|| Ack {
                    acks: acks.clone(),
                    connection: generation,
                    pkid: p.pkid,
                });
                if let Some(device) = fetcher(&p.topic) {
                    // Nothing to make durable: answered (or dropped, and
                    // asked again by the device) and acknowledged at once.
                    let _ = fetches.try_send((device.to_owned(), p.payload.clone()));
                    if let Some(ack) = ack {
                        ack.release();
                    }
                    continue;
                }
                match route(&p, &mut operators) {
                    Some(event) => {
                        let event = with_ack(redelivered(event, p.dup), ack);
                        if events.send(event).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        if let Some(ack) = ack {
                            ack.release();
                        }
                    }
                }
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(suback))) => {
                let refused = suback
                    .return_codes
                    .iter()
                    .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    .count();
                if refused > 0 {
                    tracing::error!(
                        refused,
                        "the broker refused subscriptions: is the controller's user provisioned (`cityplane cluster sync`)?"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                {
                    // Acknowledgements queued for the connection that just
                    // ended must not reach the next one.
                    let mut current = connection
                        .generation
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    *current += 1;
                    eventloop.clean();
                }
                let (host, port) = &broker.nodes[node % broker.nodes.len()];
                tracing::warn!(node = %format!("{host}:{port}"), session = ?session, error = %e, retry_in = ?wait, "lost the broker; trying the next node");
                node += 1;
                eventloop.mqtt_options = options(&broker, session, node);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RECONNECT_MAX);
            }
        }
    }
}

/// The device of `devices/<id>/fetch`, when `<id>` is a valid id.
fn fetcher(topic: &str) -> Option<&str> {
    let (id, leaf) = topics::split_device_topic(topic)?;
    (leaf == topics::DEVICE_FETCH_LEAF && cityplane_proto::validate_id(id).is_ok()).then_some(id)
}

/// An operator's write delivered again (`dup`: the broker re-sends what a
/// connection it lost had not acknowledged) is not carried out: see
/// [`super::operator::redelivered`]. Device messages and queries
/// are idempotent and go on as they are.
fn redelivered(event: Event, dup: bool) -> Event {
    match event {
        Event::Operator(msg, ack) if dup && super::operator::is_write(&msg.topic) => {
            Event::Redelivered(msg, ack)
        }
        other => other,
    }
}

fn with_ack(event: Event, ack: Option<Ack>) -> Event {
    match event {
        Event::Device {
            id, leaf, payload, ..
        } => Event::Device {
            id,
            leaf,
            payload,
            ack,
        },
        Event::Operator(msg, _) => Event::Operator(msg, ack),
        Event::Redelivered(msg, _) => Event::Redelivered(msg, ack),
        other => other,
    }
}

/// A delivery as the loop's event: a device's message, or an operator's
/// request from an operator the PKI knows. `None`: nothing the controller
/// reads (acknowledged and dropped).
fn route(p: &Publish, operators: &mut Operators) -> Option<Event> {
    let topic = p.topic.as_str();
    if let Some((id, leaf)) = topics::split_device_topic(topic) {
        if !DEVICE_LEAVES.contains(&leaf) || cityplane_proto::validate_id(id).is_err() {
            return None;
        }
        return Some(Event::Device {
            id: id.to_owned(),
            leaf: leaf.to_owned(),
            payload: p.payload.clone(),
            ack: None,
        });
    }
    let (operator, inner) = topics::split_by(topic)?;
    let Some(from) = operators.get(operator) else {
        tracing::warn!(
            operator,
            "request from an identity the PKI does not know as an operator: dropped"
        );
        return None;
    };
    Some(Event::Operator(
        OperatorMessage {
            from,
            topic: inner,
            payload: p.payload.clone(),
        },
        None,
    ))
}

/// The operators the PKI has issued (not revoked), with their
/// organisations; read again when an unknown name asks, at most once a
/// second.
struct Operators {
    dir: PathBuf,
    known: HashMap<String, Option<String>>,
    read_at: Option<std::time::Instant>,
}

impl Operators {
    /// Read at the first request (`get`), not here: shard sessions never
    /// see an operator, and need not each read `issued.jsonl` at start.
    fn new(dir: &Path) -> Operators {
        Operators {
            dir: dir.to_path_buf(),
            known: HashMap::new(),
            read_at: None,
        }
    }

    fn reload(&mut self) {
        self.read_at = Some(std::time::Instant::now());
        match cityplane_certs::registry::issued_identities(
            &self.dir,
            time::OffsetDateTime::now_utc(),
        ) {
            Ok(all) => self.known = operators_of(all),
            Err(e) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "could not read the operators from the PKI's issuance record")
            }
        }
    }

    fn get(&mut self, id: &str) -> Option<Identity> {
        let stale = self
            .read_at
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
        if !self.known.contains_key(id) && stale {
            self.reload();
        }
        let org = self.known.get(id)?.clone();
        Some(Identity {
            id: id.to_owned(),
            role: Role::Operator,
            org,
        })
    }
}

fn operators_of(all: Vec<IssuedIdentity>) -> HashMap<String, Option<String>> {
    all.into_iter()
        .filter(|i| i.role == Role::Operator && i.usable && !i.conflicting_roles)
        .map(|i| (i.id, i.org))
        .collect()
}

/// Forwards the loop's acknowledgements to the connection they belong to.
async fn acknowledge(
    client: AsyncClient,
    connection: Arc<Connection>,
    mut acks: mpsc::UnboundedReceiver<(u64, u16)>,
) {
    while let Some((generation, pkid)) = acks.recv().await {
        loop {
            let sent = {
                let current = connection
                    .generation
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if *current != generation {
                    break;
                }
                let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
                p.pkid = pkid;
                // Never wait while holding the lock: the receiver takes it
                // to move on to the next connection.
                client.try_ack(&p)
            };
            match sent {
                Ok(()) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
}

/// Publishes what the loop produces, in order, at QoS 0. Commands get
/// their secrets' plaintexts here, at the last moment.
///
/// Not QoS 1: RabbitMQ 3.10's MQTT plugin closes a publisher's connection
/// when a QoS 1 publish is routed to a queue it cannot reach (a subscriber's
/// queue on a node that just died: `mqtt_unexpected_msg` on `basic.nack`,
/// measured), so every command of a converge would cut the controller off
/// again and again. Nothing here needs the broker's acknowledgement: a
/// command is re-sent until the device reports it, an operator asks again
/// when an answer does not come, and retained summaries are republished.
async fn publish(
    client: AsyncClient,
    mut out: mpsc::Receiver<Outgoing>,
    secrets: Arc<crate::secrets::Secrets>,
    unanswered: Option<mpsc::UnboundedSender<(String, String)>>,
) {
    while let Some(mut out) = out.recv().await {
        if let Some(tell) = unanswered.as_ref().filter(|_| out.unanswered) {
            let device = topics::split_device_topic(&out.topic).map(|(d, _)| d.to_owned());
            let command =
                serde_json::from_slice::<cityplane_proto::messages::Command>(&out.payload);
            if let (Some(device), Ok(command)) = (device, command) {
                let _ = tell.send((device, command.id));
            }
        }
        secrets.fill_if_command(&out.topic, &mut out.payload);
        if client
            .publish(out.topic, QoS::AtMostOnce, out.retain, out.payload)
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write the broker delivers again is answered with a refusal, not
    /// carried out: its first delivery may have been refused and answered
    /// already (found with a hung database under two controllers: the
    /// standby that took over the session did a write the operator had
    /// been told was refused). Queries and first deliveries go on.
    #[test]
    fn an_operators_write_delivered_again_is_refused_not_done() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut operators = Operators::new(dir.path());
        operators.known.insert("alice".into(), Some("city".into()));
        operators.read_at = Some(std::time::Instant::now());
        let mut delivery = |topic: &str, dup: bool| {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, r#"{"request_id":"r-7"}"#);
            p.dup = dup;
            let event = route(&p, &mut operators).expect("routed");
            redelivered(event, p.dup)
        };
        let kind = |e: &Event| match e {
            Event::Operator(..) => "operator",
            Event::Redelivered(..) => "redelivered",
            _ => "other",
        };
        for (topic, dup, want) in [
            ("fleet/by/alice/desired/dim", true, "redelivered"),
            ("fleet/by/alice/ops/label", true, "redelivered"),
            ("fleet/by/alice/ops/quarantine", true, "redelivered"),
            ("fleet/by/alice/ops/status", true, "operator"),
            ("fleet/by/alice/desired/dim", false, "operator"),
            ("fleet/by/alice/ops/label", false, "operator"),
        ] {
            assert_eq!(kind(&delivery(topic, dup)), want, "{topic} dup={dup}");
        }
        let Event::Redelivered(msg, _) = delivery("fleet/by/alice/desired/dim", true) else {
            panic!("not refused");
        };
        let (verb, name, _, answer) =
            super::super::operator::refusal_answer(&msg, super::super::operator::redelivered());
        assert_eq!((verb, name), ("apply", "dim"), "audited as");
        assert_eq!(answer.topic, topics::response("alice", "r-7"));
        let body: serde_json::Value = serde_json::from_slice(&answer.payload).expect("json");
        assert_eq!(body["code"], "redelivered", "{body}");
    }

    #[test]
    fn only_usable_unambiguous_operators_ask() {
        let id = |id: &str, role, org: Option<&str>, usable, conflicting_roles| IssuedIdentity {
            id: id.into(),
            role,
            org: org.map(Into::into),
            usable,
            conflicting_roles,
        };
        let known = operators_of(vec![
            id("alice", Role::Operator, Some("city"), true, false),
            id("bob", Role::Operator, Some("lighting-co"), false, false),
            id("lamp-1", Role::Device, None, true, false),
            id("mallory", Role::Operator, Some("city"), true, true),
        ]);
        assert_eq!(known.get("alice"), Some(&Some("city".to_owned())));
        assert!(!known.contains_key("bob"));
        assert!(!known.contains_key("lamp-1"));
        assert!(!known.contains_key("mallory"));
    }
}
