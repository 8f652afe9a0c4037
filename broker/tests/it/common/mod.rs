//! Harness for broker tests: a throwaway PKI, a broker on 127.0.0.1:0, and
//! clients that speak real mTLS (rumqttc for well-behaved clients, raw TLS
//! streams for the malformed ones).
#![allow(dead_code)]

pub mod tls_assert;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cityplane_broker::{Broker, BrokerConfig, Limits, RunningBroker};
use cityplane_certs::Pki;
use cityplane_proto::Role;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
}

impl TestPki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::init(dir.path(), false).expect("init pki");
        TestPki { dir, pki }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn issue(&self, role: Role, id: &str) {
        self.pki.issue(role, id).expect("issue");
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "cityplane_broker=debug,rumqttd=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn test_limits() -> Limits {
    Limits {
        revocation_poll: Duration::from_millis(100),
        ..Limits::default()
    }
}

pub async fn start(pki: &Path, limits: Limits) -> RunningBroker {
    start_serving(pki, limits, None).await
}

/// [`start`] with firmware images served from `firmware_dir`.
pub async fn start_serving(
    pki: &Path,
    limits: Limits,
    firmware_dir: Option<PathBuf>,
) -> RunningBroker {
    init_tracing();
    let config = BrokerConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        pki: pki.to_path_buf(),
        limits,
        firmware_dir,
    };
    Broker::start(config).await.expect("broker starts")
}

pub fn tls_config(pki: &Path, id: Option<&str>) -> Arc<rustls::ClientConfig> {
    cityplane_testkit::tls::pki_client(pki, id).expect("client TLS config")
}

pub fn tls_config_with_ca(
    ca: &Path,
    identity: Option<(PathBuf, PathBuf)>,
) -> Arc<rustls::ClientConfig> {
    let identity = identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let config = cityplane_testkit::tls::client_config(ca, identity).expect("client config");
    Arc::new(config)
}

/// A rumqttc client for identity `id` with its certificate from the PKI.
pub fn mqtt(addr: SocketAddr, pki: &Path, id: &str, client_id: &str) -> (AsyncClient, EventLoop) {
    mqtt_with(addr, tls_config(pki, Some(id)), client_id, |_| {})
}

pub fn mqtt_with(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    client_id: &str,
    tweak: impl FnOnce(&mut MqttOptions),
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, "localhost", addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    tweak(&mut opts);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(5);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// Polls until CONNACK; returns the error if the connection is refused.
pub async fn connack(eventloop: &mut EventLoop) -> Result<(), rumqttc::ConnectionError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no CONNACK within 10 s"),
        }
    }
}

/// Connects and keeps the event loop running in the background; received
/// publishes arrive on the returned channel as (topic, payload).
pub async fn connected(
    addr: SocketAddr,
    pki: &Path,
    id: &str,
    subscribe: &[&str],
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let (client, eventloop) = mqtt(addr, pki, id, id);
    subscribed(client, eventloop, subscribe).await
}

/// Waits for `client`'s CONNACK, subscribes it to `subscribe` and forwards
/// every message it receives as (topic, payload).
pub async fn subscribed(
    client: AsyncClient,
    eventloop: EventLoop,
    subscribe: &[&str],
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let (client, mut full) = watching(client, eventloop, subscribe).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(p) = full.recv().await {
            if !p.topic.is_empty() && tx.send((p.topic, p.payload.to_vec())).is_err() {
                return;
            }
        }
    });
    (client, rx)
}

/// [`subscribed`] (one SUBSCRIBE per filter, at QoS 1, each granted), with
/// every PUBLISH as rumqttc saw it: QoS, RETAIN, packet id. An UNSUBACK
/// comes as an empty publish on the empty topic, in the order it came.
pub async fn watching(
    client: AsyncClient,
    mut eventloop: EventLoop,
    subscribe: &[&str],
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
) {
    connack(&mut eventloop).await.expect("connects");
    for filter in subscribe {
        client
            .subscribe(*filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut pending_subacks = subscribe.len();
    while pending_subacks > 0 {
        match eventloop.poll().await.expect("suback") {
            Event::Incoming(Packet::SubAck(ack)) => {
                assert!(
                    ack.return_codes
                        .iter()
                        .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                    "subscription refused: {ack:?}"
                );
                pending_subacks -= 1;
            }
            // A retained message for an earlier filter may come before the
            // SUBACK of a later one (the edge and the router answer apart).
            Event::Incoming(Packet::Publish(p)) => {
                let _ = tx.send(p);
            }
            _ => {}
        }
    }
    forward_publishes(eventloop, tx);
    (client, rx)
}

/// [`watching`] with every filter in one SUBSCRIBE, each at its own QoS;
/// also returns the SUBACK's codes.
pub async fn watching_at_once(
    client: AsyncClient,
    mut eventloop: EventLoop,
    filters: &[(&str, QoS)],
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    Vec<rumqttc::SubscribeReasonCode>,
) {
    connack(&mut eventloop).await.expect("connects");
    client
        .subscribe_many(
            filters
                .iter()
                .map(|(f, q)| rumqttc::SubscribeFilter::new((*f).to_owned(), *q)),
        )
        .await
        .expect("subscribe");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let codes = loop {
        match eventloop.poll().await.expect("suback") {
            Event::Incoming(Packet::SubAck(ack)) => break ack.return_codes,
            Event::Incoming(Packet::Publish(p)) => {
                let _ = tx.send(p);
            }
            _ => {}
        }
    };
    forward_publishes(eventloop, tx);
    (client, rx, codes)
}

/// Hands every PUBLISH the client gets to `tx`, and each UNSUBACK as an
/// empty publish on topic "".
fn forward_publishes(
    mut eventloop: EventLoop,
    tx: tokio::sync::mpsc::UnboundedSender<rumqttc::Publish>,
) {
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            match event {
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(p);
                }
                Event::Incoming(Packet::UnsubAck(_)) => {
                    let _ = tx.send(rumqttc::Publish::new("", QoS::AtMostOnce, ""));
                }
                _ => {}
            }
        }
    });
}

/// Reads until `n` items arrived (10 s at most each), then 300 ms more
/// for extras.
pub async fn gather<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let mut got = Vec::new();
    loop {
        let wait = if got.len() < n {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(300)
        };
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            Ok(None) | Err(_) => return got,
        }
    }
}

/// Raw TLS connection for hand-made packets.
pub async fn raw_tls(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = ServerName::try_from("localhost").expect("name");
    let mut stream = connector.connect(name, tcp).await?;
    // With TLS 1.3 a refused client certificate only shows on the first read.
    stream.flush().await?;
    Ok(stream)
}

/// A CONNECT packet with the given client id, flags and keep-alive.
pub fn connect_packet(
    client_id: &str,
    flags: u8,
    keep_alive: u16,
    extra_payload: &[u8],
) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    body.extend_from_slice(extra_payload);
    frame(0x10, &body)
}

/// Length-prefixed string or bytes, as in CONNECT and SUBSCRIBE payloads.
pub fn field(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

pub fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    cityplane_broker::mqtt::encode_remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    cityplane_broker::mqtt::encode_publish(topic, payload, 0, false, 0)
}

/// Reads whatever comes until the server closes the stream; `None` if the
/// stream is still open after 10 s (the server failed to close it).
pub async fn read_until_closed(stream: &mut TlsStream<TcpStream>) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Reads exactly `n` bytes (e.g. a CONNACK).
pub async fn read_exact(stream: &mut TlsStream<TcpStream>, n: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(buf)
}

/// Connects with a raw stream and completes CONNECT; returns the stream.
pub async fn raw_connected(addr: SocketAddr, pki: &Path, id: &str) -> TlsStream<TcpStream> {
    let mut s = raw_tls(addr, tls_config(pki, Some(id))).await.expect("tls");
    s.write_all(&connect_packet(id, 0x02, 30, &[]))
        .await
        .expect("write");
    assert_eq!(
        read_exact(&mut s, 4).await.expect("connack"),
        [0x20, 2, 0, 0]
    );
    s
}

/// Collects what a receiver gets within `quiet` of silence.
pub async fn drain(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    quiet: Duration,
) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(quiet, rx.recv()).await {
        got.push(item);
    }
    got
}
