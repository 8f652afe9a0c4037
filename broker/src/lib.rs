//! cityplane's embedded MQTT broker.
//!
//! We own the edge and keep rumqttd's router: connections are accepted in our
//! own loop (rustls config built once, each handshake in its own task under a
//! timeout), the client's identity comes from its verified certificate, every
//! packet is validated strictly and authorized ([`acl`]), and only then handed
//! to rumqttd's `Router` through its link API: operators and the controller
//! on a link each, devices all through one shared link (`ingress`), since a
//! router link per connection would be most of a connection's memory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cityplane_broker::BrokerError> {
//! let mut config = cityplane_broker::BrokerConfig::default();
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! let broker = cityplane_broker::Broker::start(config).await?;
//! println!("listening on {}", broker.local_addr());
//! broker.shutdown().await;
//! # Ok(()) }
//! ```

pub mod acl;
pub mod backlog;
pub mod blobs;
mod config;
mod direct;
mod dispatch;
mod handshake;
mod ingress;
mod interest;
pub mod link;
pub mod logging;
pub mod mqtt;
pub mod pins;
mod quota;
mod registry;
mod revocation;
pub mod scopes;
mod session;
mod tls;
mod tls_stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cityplane_certs::Pki;
pub use config::{BrokerConfig, Limits};
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::{Router, RouterConfig};

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

pub use crate::pins::{Pin, Pins};
use crate::registry::Registry;
use crate::revocation::RevocationState;
pub use crate::scopes::Scopes;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("PKI file {path}: {reason}")]
    Pki { path: PathBuf, reason: String },
    #[error("PKI: {0}")]
    Certs(#[from] cityplane_certs::CertError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("router link: {0}")]
    Link(String),
}

/// A PUBLISH from an operator under `fleet/desired/` or `fleet/ops/`, with the
/// identity proven by its certificate. The in-process controller reads these
/// instead of subscribing, because the router does not carry the publisher's
/// identity and the controller must know who wrote what (audit, responses).
#[derive(Debug, Clone)]
pub struct OperatorMessage {
    pub from: cityplane_proto::Identity,
    pub topic: String,
    pub payload: bytes::Bytes,
}

/// The router link of the in-process controller ([`RunningBroker::link`]).
pub const CONTROLLER_LINK_ID: &str = "_cityplane-controller";
/// Every router link the broker or the controller opens for itself. All
/// start with `_`, which no certificate identity can (see
/// `cityplane_proto::validate_id`): a client holding one of these ids would
/// take the link over (rumqttd drops the older link of a duplicate id).
pub const INTERNAL_LINK_IDS: [&str; 3] = [CONTROLLER_LINK_ID, ingress::LINK_ID, dispatch::LINK_ID];

/// Batches of device messages (each at most the ingress's batch, 512) the
/// controller's tap may hold unread before devices wait.
const DEVICE_TAP_QUEUE: usize = 64;

/// Topic prefixes whose operator publishes are handed to the tap.
pub const TAPPED_PREFIXES: [&str; 2] = [
    cityplane_proto::topics::FLEET_DESIRED_PREFIX,
    cityplane_proto::topics::FLEET_OPS_PREFIX,
];

/// State every connection task shares.
pub(crate) struct Shared {
    pub(crate) dispatch: Arc<dispatch::Dispatch>,
    /// The router link every device session publishes through.
    pub(crate) ingress: ingress::Ingress,
    pub(crate) backlog: Arc<backlog::Backlog>,
    /// Which device messages need the router, and the controller's tap.
    pub(crate) routing: Arc<ingress::Routing>,
    pub(crate) tap: std::sync::OnceLock<tokio::sync::mpsc::Sender<OperatorMessage>>,
    pub(crate) config: BrokerConfig,
    pub(crate) tls: Arc<rustls::ServerConfig>,
    pub(crate) router_tx: RouterTx,
    pub(crate) registry: Arc<Registry>,
    pub(crate) revocation: Arc<RevocationState>,
    /// Authenticated connections (see `Limits::max_connections`).
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) handshakes: handshake::Handshakes,
    pub(crate) quotas: quota::Quotas,
    pub(crate) retained: quota::Retained,
    /// Operator and controller ids whose router session is persistent
    /// (clean session 0), with the certificate serial that created it: a
    /// session is resumed only by the same certificate, so a revoked,
    /// re-issued or re-roled id never inherits the old subscriptions.
    pub(crate) persisted: std::sync::Mutex<HashMap<String, String>>,
    pub(crate) refusal_log: quota::LogBudget,
    /// Firmware images for devices' fetches (`BrokerConfig::firmware_dir`).
    pub(crate) blobs: blobs::Blobs,
    /// Image read errors are logged at most once a second (one per fetch
    /// could flood the log when a disk fails).
    pub(crate) blob_log: quota::LogBudget,
    /// Which devices each organisation's operators may see (filled by the
    /// controller; see [`scopes`]).
    pub(crate) scopes: Scopes,
    /// Quarantined devices and the serials others are pinned to (filled
    /// by the controller; see [`pins`]).
    pub(crate) pins: Pins,
}

/// Opens a link into the router: `(client id, clean session)`.
///
/// `Router::spawn` returns a channel whose item type rumqttd does not export,
/// so the sender lives inside this closure instead of being named.
pub(crate) type RouterTx = Arc<
    dyn Fn(&str, bool) -> Result<(LinkTx, LinkRx, rumqttd::Notification), String> + Send + Sync,
>;

pub struct Broker;

/// A started broker. Dropping it does not stop it; call [`RunningBroker::shutdown`].
pub struct RunningBroker {
    /// Accepting starts when this turns true (see [`Broker::start_closed`]).
    gate: watch::Sender<bool>,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Broker {
    /// Loads the PKI, binds the listener and starts serving.
    pub async fn start(config: BrokerConfig) -> Result<RunningBroker, BrokerError> {
        let broker = Broker::start_closed(config).await?;
        broker.open();
        Ok(broker)
    }

    /// Like [`Broker::start`], but connections wait in the listen backlog
    /// until [`RunningBroker::open`]: in-process subscribers (the controller)
    /// attach first, so no device report is routed before anyone listens.
    pub async fn start_closed(config: BrokerConfig) -> Result<RunningBroker, BrokerError> {
        let pki = Pki::open(&config.pki)?;
        let revocation = RevocationState::load(pki.revocation_path());
        let registry = Arc::new(Registry::default());
        let pins = Pins::new(registry.clone());
        let tls = tls::server_config(&pki, revocation.clone(), pins.clone())?;
        let listener = bind(config.listen).map_err(|source| BrokerError::Bind {
            addr: config.listen,
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: config.listen,
            source,
        })?;
        let router = Router::new(0, router_config(&config.limits)).spawn();
        let router_tx: RouterTx = Arc::new(move |id: &str, clean: bool| {
            LinkBuilder::new(id, router.clone())
                .clean_session(clean)
                .dynamic_filters(true)
                .build()
                .map_err(|e| e.to_string())
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let dispatch = Arc::new(dispatch::Dispatch::default());
        let dispatch_link = {
            let router_tx = router_tx.clone();
            // Not a valid client id, so no client can take this link over.
            tokio::task::spawn_blocking(move || router_tx(dispatch::LINK_ID, true))
                .await
                .map_err(|e| BrokerError::Link(e.to_string()))?
                .map_err(BrokerError::Link)?
        };
        let (mut dispatch_tx, dispatch_rx, _) = dispatch_link;
        dispatch_tx
            .subscribe(format!(
                "{}/+/{}",
                cityplane_proto::topics::DEVICES,
                cityplane_proto::topics::DEVICE_SUBSCRIBE_LEAF
            ))
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let backlog = Arc::new(backlog::Backlog::default());
        let routing = Arc::new(ingress::Routing::default());
        let ingress =
            ingress::Ingress::start(router_tx.clone(), backlog.clone(), routing.clone()).await?;
        let shared = Arc::new(Shared {
            dispatch: dispatch.clone(),
            ingress,
            backlog,
            routing,
            tap: std::sync::OnceLock::new(),
            tls,
            router_tx,
            registry: registry.clone(),
            revocation: revocation.clone(),
            slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            handshakes: handshake::Handshakes::default(),
            quotas: quota::Quotas::default(),
            retained: quota::Retained::default(),
            persisted: std::sync::Mutex::new(HashMap::new()),
            refusal_log: quota::LogBudget::default(),
            blobs: blobs::Blobs::new(config.firmware_dir.clone()),
            blob_log: quota::LogBudget::default(),
            scopes: Scopes::default(),
            pins,
            config,
        });
        let (gate, gate_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn({
                let shutdown = shutdown_rx.clone();
                async move {
                    // Keeps the dispatch link's sending half alive with the broker.
                    let _tx = dispatch_tx;
                    dispatch::run(dispatch, dispatch_rx, shutdown).await;
                }
            }),
            tokio::spawn(accept_loop(
                listener,
                shared.clone(),
                shutdown_rx.clone(),
                gate_rx,
            )),
            tokio::spawn(revocation::watch(
                revocation,
                registry,
                shared.config.limits.revocation_poll,
                shutdown_rx,
            )),
        ];
        tracing::info!(addr = %local_addr, pki = %shared.config.pki.display(), "broker listening (mutual TLS, MQTT 3.1.1)");
        Ok(RunningBroker {
            gate,
            local_addr,
            shared,
            shutdown,
            tasks,
        })
    }
}

impl RunningBroker {
    /// Starts accepting connections (a no-op once open).
    pub fn open(&self) {
        let _ = self.gate.send(true);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// An in-process link to the router with full rights, for the controller.
    /// It bypasses TLS and the ACL: only trusted code in this process gets one.
    /// `client_id` must start with `_` (e.g. [`CONTROLLER_LINK_ID`]), so no
    /// client certificate can hold it and take the link over. The edge cannot
    /// see what such a link subscribes to, so while the broker runs every
    /// device message enters the router; [`RunningBroker::open_link`] names
    /// its filters and costs nothing for topics nobody wants.
    pub async fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        let link = self.raw_link(client_id).await?;
        let interest = &self.shared.routing.interest;
        interest.add(interest.permanent(), ["#"]);
        Ok(link)
    }

    async fn raw_link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), BrokerError> {
        if !client_id.starts_with('_') {
            return Err(BrokerError::Link(format!(
                "internal link id {client_id:?} must start with '_' (a client could take it over)"
            )));
        }
        let router_tx = self.shared.router_tx.clone();
        let id = client_id.to_owned();
        tokio::task::spawn_blocking(move || {
            router_tx(&id, true)
                .map(|(tx, rx, _ack)| (tx, rx))
                .map_err(BrokerError::Link)
        })
        .await
        .map_err(|e| BrokerError::Link(e.to_string()))?
    }

    /// [`RunningBroker::link`] with typed halves, subscribed to `filters`:
    /// what the controller uses.
    pub async fn open_link(
        &self,
        client_id: &str,
        filters: &[String],
    ) -> Result<(link::LinkSender, link::LinkReceiver), BrokerError> {
        let (tx, rx) = self.raw_link(client_id).await?;
        let interest = &self.shared.routing.interest;
        interest.add(interest.permanent(), filters.iter().map(String::as_str));
        link::typed(tx, rx, filters)
    }

    /// Hands every device message on `devices/+/<leaf>` for `leaves` to the
    /// returned receiver straight from the edge, in each device's order,
    /// without the router (which still gets a copy when a subscription or
    /// the retain flag needs one). Only one tap can exist. A receiver that
    /// falls behind slows every device down (TCP backpressure); nothing the
    /// edge acknowledged is dropped.
    pub fn tap_device_messages(&self, leaves: &[&'static str]) -> Option<link::DeviceTap> {
        let (tx, rx) = tokio::sync::mpsc::channel(DEVICE_TAP_QUEUE);
        self.shared
            .routing
            .device_tap
            .set(ingress::DeviceTapTx {
                leaves: leaves.to_vec(),
                tx,
            })
            .ok()
            .map(|()| link::DeviceTap::new(rx))
    }

    /// Commands to devices from in-process code, handed to the device's
    /// connection without the router (see [`link::Commands`]).
    pub fn commands(&self) -> link::Commands {
        link::Commands::new(self.shared.dispatch.clone(), self.shared.routing.clone())
    }

    /// Hands every operator PUBLISH under [`TAPPED_PREFIXES`] to the returned
    /// receiver (they are still routed as usual). Only one tap can exist;
    /// a full receiver slows the publishing operators down, nothing is dropped.
    pub fn tap_operator_messages(&self) -> Option<tokio::sync::mpsc::Receiver<OperatorMessage>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        self.shared.tap.set(tx).ok().map(|()| rx)
    }

    /// Flow control for an in-process reader of device messages (the
    /// controller): device publishes on `devices/+/<leaf>` for `leaves` wait
    /// for credit before entering the router, and the reader gives it back
    /// with [`backlog::Credit::consumed`] for each one it reads, so a reader
    /// that falls behind slows devices down instead of losing messages (see
    /// [`backlog`]). Only one reader can hold it; dropping it lifts the limit.
    pub fn limit_device_backlog(&self, leaves: &[&'static str]) -> Option<backlog::Credit> {
        self.shared.backlog.limit(leaves)
    }

    /// The scope table of this broker: the controller replaces it when the
    /// registry or the organisations change; every connection reads it.
    /// Nobody else fills it: without a controller, operators of any
    /// organisation but `city` see no device (fail closed).
    pub fn scopes(&self) -> Scopes {
        self.shared.scopes.clone()
    }

    /// The pin table of this broker: the controller replaces it when a
    /// device is quarantined, released or given a new certificate.
    pub fn pins(&self) -> Pins {
        self.shared.pins.clone()
    }

    /// Live MQTT sessions (after CONNECT).
    pub fn sessions(&self) -> usize {
        self.shared.registry.len()
    }

    /// Stops accepting, cuts every session and waits for the background tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.shared.registry.shutdown_all();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Binds with a deep accept backlog: mio's default of 128 overflows under a
/// connect storm and each overflowed client waits a 1 s SYN retransmit.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

fn router_config(limits: &Limits) -> RouterConfig {
    // A full filter log drops its oldest segment even if a reader still
    // needs it; size the logs generously so a fan-in burst is not lost
    // (the in-process controller's unread backlog is also capped, at half
    // of these, by `backlog`).
    let mut custom = HashMap::new();
    // CSRs too: a rotation of the whole fleet is a burst of them (~600 B
    // each) that the controller must not lose.
    for leaf in [
        "reported",
        "acks",
        "presence",
        "telemetry",
        cityplane_proto::topics::DEVICE_CSR_LEAF,
    ] {
        custom.insert(
            cityplane_proto::topics::all_devices(leaf),
            rumqttd::SegmentConfig {
                max_segment_size: 4 * 1024 * 1024,
                max_segment_count: 4,
            },
        );
    }
    RouterConfig {
        // Our own limit triggers first; the router's is a backstop.
        max_connections: limits.max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 3,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    mut gate: watch::Receiver<bool>,
) {
    tokio::select! {
        _ = gate.wait_for(|open| *open) => {}
        _ = shutdown.changed() => return,
    }
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors; back off instead of spinning.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let pending = shared.handshakes.admit(peer.ip(), &shared.config.limits);
        tokio::spawn(session::serve(shared.clone(), tcp, peer, pending));
    }
}
