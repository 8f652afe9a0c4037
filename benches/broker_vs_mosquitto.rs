//! cityplane's broker against mosquitto, same load, same machine, one run.
//!
//! ```text
//! cargo bench -p cityplane --bench broker_vs_mosquitto [-- --clients N]
//! ```
//!
//! Both brokers run as separate child processes (memory is per process): our
//! broker is the real binary, `cityplane broker` on a server directory
//! exported from the bench PKI, with the default limits
//! (`testkit::bench::start_cityplane_broker`); mosquitto is
//! `/usr/sbin/mosquitto` with a generated configuration on the same PKI. The
//! load generator is a small hand-rolled MQTT 3.1.1 client over tokio-rustls
//! (mutual TLS, ring), one real TLS connection per device.
//!
//! Phases, for each broker:
//! 1. connects: N devices connect (TCP + mTLS + CONNECT/CONNACK), at most 200
//!    in flight; connects/s and CONNACK latency from TCP connect start;
//! 2. memory: broker VmRSS before connecting and with every device connected
//!    and subscribed to its `devices/<id>/commands`;
//! 3. command round trip: a controller identity publishes commands (QoS 1) to
//!    the devices, each device answers on `devices/<id>/acks` (QoS 1); after a
//!    warm-up of one command per device, commands are paced at 1,000/s for 5 s;
//! 4. fan-in: every device publishes 20 reports (QoS 1, 200 bytes, 50/s per
//!    device) to `devices/<id>/reported`; the controller counts arrivals.
//!    Three rounds; the median round's rate is reported, losses of all.
//!
//! Options (also as environment variables): `--clients N`
//! (`CITYPLANE_BENCH_CLIENTS`, default 2000), `--only cityplane|mosquitto`
//! (`CITYPLANE_BENCH_ONLY`), `--cmd-secs S` (default 5), `--fanin-msgs M`
//! (default 20). `CITYPLANE_BENCH_LOG` sets our broker's log filter (default
//! `warn`), `CITYPLANE_BENCH_BROKER_WRAP` a command prefix for our broker
//! (e.g. `heaptrack -o /tmp/hp`). Results: a table on stdout, one `BENCH_JSON
//! {...}` line, and `target/bench/broker_vs_mosquitto.json`; broker logs in
//! `target/bench/`.
//! A missed target is reported, never a failure of the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BytesMut};
use cityplane_broker::mqtt::{encode_publish, encode_remaining_length};
use cityplane_certs::client_tls::{ClientCert, Trust};
use cityplane_certs::Pki;
use cityplane_testkit::mosquitto::{self, MOSQUITTO};
use cityplane_testkit::process;
use cityplane_testkit::{bench, machine};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_rustls::client::TlsStream;

type Stream = TlsStream<TcpStream>;

/// Our broker: the `cityplane` binary of this package.
const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
/// Its `--config`: the default limits, as a deployment starts with.
const BROKER_CONFIG: &str = "# broker_vs_mosquitto: cityplane's default limits\n";

const DEVICE_PREFIX: &str = "bench";
const CONTROLLER_ID: &str = "bench-ctl";
const CONNECT_CONCURRENCY: usize = 200;
const WARMUP_WINDOW: usize = 200;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
const CMD_PAYLOAD: usize = 64;
const FANIN_PAYLOAD: usize = 200;
/// Sequence numbers of measured commands start here; below are warm-up ones.
const MEASURED_BASE: u64 = 1 << 32;
const FANIN_ROUNDS: u32 = 3;

// ---------------------------------------------------------------------------
// Options

#[derive(Debug, Clone, Serialize)]
struct Opts {
    clients: usize,
    cmd_rate: u32,
    cmd_secs: u64,
    fanin_msgs: u32,
    fanin_interval_ms: u64,
    only: Option<String>,
}

fn opts() -> Result<Opts> {
    let env = |k: &str| std::env::var(k).ok();
    let mut o = Opts {
        clients: env("CITYPLANE_BENCH_CLIENTS").map_or(Ok(2000), |v| v.parse())?,
        cmd_rate: 1000,
        cmd_secs: env("CITYPLANE_BENCH_CMD_SECS").map_or(Ok(5), |v| v.parse())?,
        fanin_msgs: env("CITYPLANE_BENCH_FANIN_MSGS").map_or(Ok(20), |v| v.parse())?,
        fanin_interval_ms: 20,
        only: env("CITYPLANE_BENCH_ONLY"),
    };
    bench::parse_args(std::env::args().skip(1), |key, value| {
        match key {
            "--clients" => o.clients = value()?.parse()?,
            "--cmd-secs" => o.cmd_secs = value()?.parse()?,
            "--fanin-msgs" => o.fanin_msgs = value()?.parse()?,
            "--only" => o.only = Some(value()?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    if o.clients == 0 {
        bail!("--clients must be at least 1");
    }
    // Each device answers every command with a publish; keep each device well
    // under the broker's 100 publishes/s when there are few devices.
    o.cmd_rate = o.cmd_rate.min((o.clients as u32).saturating_mul(50)).max(1);
    Ok(o)
}

// ---------------------------------------------------------------------------
// Entry points

fn main() {
    let result = opts().and_then(|opts| bench::block_on(run(opts)));
    bench::finish("broker_vs_mosquitto", result);
}

// ---------------------------------------------------------------------------
// /proc

/// TcpExt ListenOverflows: connections dropped because an accept queue was
/// full (machine-wide; the client retries its SYN after ~1 s).
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Minimal MQTT 3.1.1 client pieces

fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(header);
    encode_remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

fn connect_packet(client_id: &str, keep_alive: u16) -> Vec<u8> {
    // Protocol "MQTT" level 4, flags: clean session only.
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    frame(0x10, &body)
}

fn subscribe_packet(pkid: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    for f in filters {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(1); // QoS 1
    }
    frame(0x82, &body)
}

fn puback(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x40, 0x02, hi, lo]
}

const PINGREQ: [u8; 2] = [0xC0, 0x00];
const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// One whole packet: the first header byte and the body.
struct Frame {
    header: u8,
    body: BytesMut,
}

fn next_frame(buf: &mut BytesMut) -> Result<Option<Frame>> {
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            bail!("malformed remaining length");
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let header = buf[0];
    buf.advance(i);
    let body = buf.split_to(len);
    Ok(Some(Frame { header, body }))
}

struct Publish<'a> {
    topic: &'a [u8],
    pkid: Option<u16>,
    payload: &'a [u8],
}

fn parse_publish(f: &Frame) -> Result<Publish<'_>> {
    let b = &f.body[..];
    let qos = (f.header >> 1) & 3;
    let tlen = usize::from(u16::from_be_bytes([
        *b.first().context("short")?,
        *b.get(1).context("short")?,
    ]));
    let topic = b.get(2..2 + tlen).context("short topic")?;
    let mut at = 2 + tlen;
    let pkid = if qos > 0 {
        let p = u16::from_be_bytes([
            *b.get(at).context("short")?,
            *b.get(at + 1).context("short")?,
        ]);
        at += 2;
        Some(p)
    } else {
        None
    };
    Ok(Publish {
        topic,
        pkid,
        payload: &b[at..],
    })
}

struct Conn {
    stream: Stream,
    rbuf: BytesMut,
}

impl Conn {
    async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = next_frame(&mut self.rbuf)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn subscribe(&mut self, filters: &[&str]) -> Result<()> {
        self.send(&subscribe_packet(1, filters)).await?;
        loop {
            let f = self.read_frame().await?;
            if f.header == 0x90 {
                let codes = f.body.get(2..).unwrap_or_default();
                if f.body.get(..2) != Some(&[0, 1][..])
                    || codes.len() != filters.len()
                    || codes.contains(&0x80)
                {
                    bail!("SUBSCRIBE refused: SUBACK body {:02x?}", &f.body[..]);
                }
                return Ok(());
            }
        }
    }
}

/// TCP connect (NODELAY), mTLS handshake, CONNECT, CONNACK. Returns the
/// connection and the time from the start of the TCP connect to CONNACK.
async fn mqtt_connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    id: &str,
) -> Result<(Conn, Duration)> {
    let t0 = Instant::now();
    let tcp = TcpStream::connect(addr).await.context("TCP connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let mut conn = Conn {
        stream,
        rbuf: BytesMut::with_capacity(2048),
    };
    conn.send(&connect_packet(id, 60))
        .await
        .context("send CONNECT")?;
    let f = conn.read_frame().await.context("wait for CONNACK")?;
    if f.header != 0x20 || f.body.len() != 2 || f.body[1] != 0 {
        bail!(
            "CONNACK refused: header {:#04x} body {:02x?}",
            f.header,
            &f.body[..]
        );
    }
    Ok((conn, t0.elapsed()))
}

fn client_tls(trust: &Trust, pki: &Pki, id: &str) -> Result<Arc<rustls::ClientConfig>> {
    let identity = ClientCert::from_pem_files(&pki.cert_path(id), &pki.key_path(id))?;
    let mut config = trust.client(Some(identity))?;
    // Every connect is a full mutual-TLS handshake, on both brokers.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------
// Devices

enum DevCmd {
    FanIn {
        round: u32,
        count: u32,
        interval: Duration,
        delay: Duration,
    },
    Disconnect(oneshot::Sender<()>),
}

#[derive(Default)]
struct DevStats {
    commands: AtomicU64,
    fanin_sent: AtomicU64,
    fanin_acked: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl DevStats {
    fn error(&self, e: String) {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }
}

struct FanIn {
    index: u32,
    round: u32,
    count: u32,
    sent: u32,
    next_at: tokio::time::Instant,
    interval: Duration,
}

async fn device_task(
    index: u32,
    id: String,
    conn: Conn,
    cmds: mpsc::UnboundedReceiver<DevCmd>,
    stats: Arc<DevStats>,
) {
    if let Err(e) = device_loop(index, &id, conn, cmds, &stats).await {
        stats.error(format!("{id}: {e:#}"));
    }
}

async fn device_loop(
    index: u32,
    id: &str,
    mut conn: Conn,
    mut cmds: mpsc::UnboundedReceiver<DevCmd>,
    stats: &DevStats,
) -> Result<()> {
    let ack_topic = format!("devices/{id}/acks");
    let report_topic = format!("devices/{id}/reported");
    let mut pkid: u16 = 0;
    let mut next_pkid = move || {
        pkid = pkid.checked_add(1).unwrap_or(1);
        pkid
    };
    let mut report_pkids = std::collections::HashSet::new();
    let mut fanin: Option<FanIn> = None;
    let mut wbuf = Vec::with_capacity(512);
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    let ping_every = Duration::from_secs(30);
    let mut last_write = tokio::time::Instant::now();
    loop {
        let publish_at = fanin
            .as_ref()
            .filter(|f| f.sent < f.count)
            .map(|f| f.next_at);
        tokio::select! {
            read = conn.stream.read_buf(&mut conn.rbuf) => {
                if read.context("read")? == 0 {
                    bail!("connection closed by the broker");
                }
                while let Some(f) = next_frame(&mut conn.rbuf)? {
                    match f.header >> 4 {
                        3 => {
                            // A command: PUBACK it (in order), then answer on our acks topic.
                            let p = parse_publish(&f)?;
                            if let Some(pk) = p.pkid {
                                wbuf.extend_from_slice(&puback(pk));
                            }
                            stats.commands.fetch_add(1, Ordering::Relaxed);
                            wbuf.extend(encode_publish(&ack_topic, p.payload, 1, false, next_pkid()));
                        }
                        4 if f.body.len() >= 2 => {
                            let pk = u16::from_be_bytes([f.body[0], f.body[1]]);
                            if report_pkids.remove(&pk) {
                                stats.fanin_acked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {}
                    }
                }
            }
            cmd = cmds.recv() => match cmd {
                None => return Ok(()),
                Some(DevCmd::FanIn {
                    round,
                    count,
                    interval,
                    delay,
                }) => {
                    fanin = Some(FanIn {
                        index,
                        round,
                        count,
                        sent: 0,
                        next_at: tokio::time::Instant::now() + delay,
                        interval,
                    });
                }
                Some(DevCmd::Disconnect(done)) => {
                    let _ = conn.send(&DISCONNECT).await;
                    let _ = conn.stream.shutdown().await;
                    let _ = done.send(());
                    return Ok(());
                }
            },
            _ = tokio::time::sleep_until(publish_at.unwrap_or(far)), if publish_at.is_some() => {
                if let Some(f) = fanin.as_mut() {
                    let mut payload = vec![b'x'; FANIN_PAYLOAD];
                    payload[..4].copy_from_slice(&f.index.to_le_bytes());
                    payload[4..8].copy_from_slice(&f.sent.to_le_bytes());
                    payload[8..12].copy_from_slice(&f.round.to_le_bytes());
                    let pk = next_pkid();
                    report_pkids.insert(pk);
                    wbuf.extend(encode_publish(&report_topic, &payload, 1, false, pk));
                    f.sent += 1;
                    f.next_at += f.interval;
                    stats.fanin_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = tokio::time::sleep_until(last_write + ping_every) => {
                wbuf.extend_from_slice(&PINGREQ);
            }
        }
        if !wbuf.is_empty() {
            conn.send(&wbuf).await.context("write")?;
            wbuf.clear();
            last_write = tokio::time::Instant::now();
        }
    }
}

// ---------------------------------------------------------------------------
// Controller: publishes commands, receives acks and reports.

enum Out {
    /// A command; its send time is taken just before it is written.
    Command {
        seq: u64,
        frame: Vec<u8>,
    },
    Raw(Vec<u8>),
    Disconnect(oneshot::Sender<()>),
}

struct Ack {
    seq: u64,
    sent_at: Instant,
    recv_at: Instant,
}

#[derive(Default)]
struct FanInSeen {
    round: u32,
    per_device: u32,
    seen: Vec<bool>,
    unique: u64,
    duplicates: u64,
    /// Copies from an earlier round.
    late: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

struct CtlState {
    sent: Mutex<HashMap<u64, Instant>>,
    acks: Mutex<Vec<Ack>>,
    unknown_acks: AtomicU64,
    window: Semaphore,
    fanin: Mutex<FanInSeen>,
    pubacks: AtomicU64,
    /// The connection failed: nothing more will arrive.
    dead: std::sync::atomic::AtomicBool,
    /// Set once we sent DISCONNECT: the broker closing is then expected.
    closing: std::sync::atomic::AtomicBool,
    errors: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CtlState {
    fn on_ack(&self, payload: &[u8], now: Instant) {
        let Some(seq) = payload
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        else {
            self.unknown_acks.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match lock(&self.sent).remove(&seq) {
            Some(sent_at) => {
                lock(&self.acks).push(Ack {
                    seq,
                    sent_at,
                    recv_at: now,
                });
                if seq < MEASURED_BASE {
                    self.window.add_permits(1);
                }
            }
            None => {
                self.unknown_acks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_report(&self, payload: &[u8], now: Instant) {
        let mut s = lock(&self.fanin);
        let (Some(i), Some(k), Some(round)) =
            (payload.get(..4), payload.get(4..8), payload.get(8..12))
        else {
            return;
        };
        if u32::from_le_bytes(round.try_into().unwrap_or_default()) != s.round {
            s.late += 1;
            return;
        }
        let i = u32::from_le_bytes(i.try_into().unwrap_or_default()) as usize;
        let k = u32::from_le_bytes(k.try_into().unwrap_or_default()) as usize;
        let slot = i * s.per_device as usize + k;
        match s.seen.get_mut(slot) {
            Some(seen) if !*seen => {
                *seen = true;
                s.unique += 1;
            }
            _ => s.duplicates += 1,
        }
        s.first.get_or_insert(now);
        s.last = Some(now);
    }

    fn error(&self, e: String) {
        self.dead.store(true, Ordering::Relaxed);
        if !self.closing.load(Ordering::Relaxed) {
            lock(&self.errors).push(e);
        }
    }
}

struct Controller {
    out: mpsc::UnboundedSender<Out>,
    state: Arc<CtlState>,
}

async fn start_controller(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<Controller> {
    let (mut conn, _) = mqtt_connect(addr, tls, CONTROLLER_ID)
        .await
        .context("controller connect")?;
    conn.subscribe(&["devices/+/acks", "devices/+/reported"])
        .await
        .context("controller subscribe")?;
    let state = Arc::new(CtlState {
        sent: Mutex::new(HashMap::new()),
        acks: Mutex::new(Vec::new()),
        unknown_acks: AtomicU64::new(0),
        window: Semaphore::new(WARMUP_WINDOW),
        fanin: Mutex::new(FanInSeen::default()),
        pubacks: AtomicU64::new(0),
        closing: std::sync::atomic::AtomicBool::new(false),
        dead: std::sync::atomic::AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
    });
    let Conn { stream, rbuf } = conn;
    let (rh, wh) = tokio::io::split(stream);
    let (out, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(ctl_reader(rh, rbuf, out.clone(), state.clone()));
    tokio::spawn(ctl_writer(wh, out_rx, state.clone()));
    Ok(Controller { out, state })
}

async fn ctl_reader(
    mut rh: ReadHalf<Stream>,
    mut rbuf: BytesMut,
    out: mpsc::UnboundedSender<Out>,
    st: Arc<CtlState>,
) {
    let mut acks = Vec::new();
    loop {
        match rh.read_buf(&mut rbuf).await {
            Ok(0) => return st.error("controller: connection closed by the broker".into()),
            Ok(_) => {}
            Err(e) => return st.error(format!("controller: read: {e}")),
        }
        let now = Instant::now();
        loop {
            let f = match next_frame(&mut rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return st.error(format!("controller: {e}")),
            };
            match f.header >> 4 {
                3 => {
                    let p = match parse_publish(&f) {
                        Ok(p) => p,
                        Err(e) => return st.error(format!("controller: bad PUBLISH: {e}")),
                    };
                    if let Some(pk) = p.pkid {
                        acks.extend_from_slice(&puback(pk));
                    }
                    if p.topic.ends_with(b"/acks") {
                        st.on_ack(p.payload, now);
                    } else if p.topic.ends_with(b"/reported") {
                        st.on_report(p.payload, now);
                    }
                }
                4 => {
                    st.pubacks.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if !acks.is_empty() && out.send(Out::Raw(std::mem::take(&mut acks))).is_err() {
            return;
        }
    }
}

async fn ctl_writer(
    mut wh: WriteHalf<Stream>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    st: Arc<CtlState>,
) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut seqs = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut disconnect = None;
        while let Some(item) = next.take() {
            match item {
                Out::Command { seq, frame } => {
                    seqs.push(seq);
                    buf.extend_from_slice(&frame);
                }
                Out::Raw(bytes) => buf.extend_from_slice(&bytes),
                Out::Disconnect(done) => {
                    st.closing.store(true, Ordering::Relaxed);
                    buf.extend_from_slice(&DISCONNECT);
                    disconnect = Some(done);
                    break;
                }
            }
            if buf.len() < 64 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if !seqs.is_empty() {
            let now = Instant::now();
            let mut sent = lock(&st.sent);
            for seq in seqs.drain(..) {
                sent.insert(seq, now);
            }
        }
        let written = async {
            wh.write_all(&buf).await?;
            wh.flush().await
        }
        .await;
        buf.clear();
        if let Err(e) = written {
            return st.error(format!("controller: write: {e}"));
        }
        if let Some(done) = disconnect {
            let _ = wh.shutdown().await;
            let _ = done.send(());
            return;
        }
    }
}

fn command_frame(device: &str, seq: u64) -> Vec<u8> {
    let mut payload = vec![b' '; CMD_PAYLOAD];
    payload[..8].copy_from_slice(&seq.to_le_bytes());
    let pkid = (seq % 65_535) as u16 + 1;
    encode_publish(
        &format!("devices/{device}/commands"),
        &payload,
        1,
        false,
        pkid,
    )
}

// ---------------------------------------------------------------------------
// Results

#[derive(Debug, Default, Clone, Serialize)]
struct BrokerResult {
    broker: String,
    clients: usize,
    connected: usize,
    connect_failures: usize,
    connect_wall_s: f64,
    connects_per_sec: f64,
    connack_p50_ms: f64,
    connack_p99_ms: f64,
    connack_max_ms: f64,
    broker_cpu_ms_per_connect: f64,
    listen_overflows: u64,
    subscribe_failures: usize,
    broker_threads: u64,
    rss_after_connect_kib: u64,
    rss_idle_kib: u64,
    rss_connected_kib: u64,
    rss_end_kib: u64,
    rss_peak_kib: u64,
    kib_per_connection: f64,
    kib_per_connection_before_subscribe: f64,
    warmup_commands: usize,
    warmup_ms: f64,
    warmup_p50_ms: f64,
    warmup_p99_ms: f64,
    warmup_lost: usize,
    cmd_rate_per_sec: u32,
    cmd_sent: usize,
    cmd_send_span_s: f64,
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
    rtt_max_ms: f64,
    rtt_lost: usize,
    unknown_acks: u64,
    fanin_sent: u64,
    fanin_pubacked: u64,
    fanin_received: u64,
    fanin_duplicates: u64,
    fanin_lost: i64,
    fanin_msgs_per_sec: f64,
    fanin_s: f64,
    broker_cpu_us_per_fanin_msg: f64,
    fanin_rounds: Vec<FanInRound>,
    generator_cpu_s: f64,
    broker_cpu_s: f64,
    errors: Vec<String>,
    error_count: usize,
}

#[derive(Debug, Default, Clone, Serialize)]
struct FanInRound {
    sent: u64,
    pubacked: u64,
    received: u64,
    duplicates: u64,
    late: u64,
    lost: i64,
    seconds: f64,
    msgs_per_sec: f64,
    broker_cpu_us_per_msg: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

// ---------------------------------------------------------------------------
// The run

struct Setup {
    ids: Vec<String>,
    tls: Vec<Arc<rustls::ClientConfig>>,
    ctl_tls: Arc<rustls::ClientConfig>,
}

async fn run(opts: Opts) -> Result<()> {
    let started = Instant::now();
    let target = bench::target_dir();
    let bench_dir = target.join("bench");
    std::fs::create_dir_all(&bench_dir)?;
    let machine = machine::describe();
    println!(
        "broker_vs_mosquitto: {} clients; machine {machine}",
        opts.clients
    );

    let pki = bench::prepare_pki_verbose(
        &bench_dir.join("pki"),
        DEVICE_PREFIX,
        opts.clients,
        CONTROLLER_ID,
    )?;
    let setup = {
        let trust = Trust::from_ca_file(&pki.ca_cert_path())?;
        let ids: Vec<String> = (1..=opts.clients)
            .map(|n| format!("{DEVICE_PREFIX}{n:04}"))
            .collect();
        let tls = ids
            .iter()
            .map(|id| client_tls(&trust, &pki, id))
            .collect::<Result<Vec<_>>>()?;
        let ctl_tls = client_tls(&trust, &pki, CONTROLLER_ID)?;
        Setup { ids, tls, ctl_tls }
    };

    let want = |name: &str| opts.only.as_deref().is_none_or(|o| o == name);
    let mut results: Vec<BrokerResult> = Vec::new();
    if want("cityplane") {
        let (guard, addr) =
            bench::start_cityplane_broker(Path::new(BIN), &pki, &bench_dir, "", BROKER_CONFIG)?;
        println!("\n== cityplane (pid {}, {addr}) ==", guard.pid());
        let r = bench_broker("cityplane", addr, guard.pid(), &setup, &opts).await;
        drop(guard);
        results.push(r?);
    }
    let mosquitto_available = mosquitto::installed();
    if want("mosquitto") && mosquitto_available {
        let (guard, addr) = mosquitto::start("broker_vs_mosquitto", &pki, &bench_dir, "")?;
        println!("\n== mosquitto (pid {}, {addr}) ==", guard.pid());
        let r = bench_broker("mosquitto", addr, guard.pid(), &setup, &opts).await;
        drop(guard);
        results.push(r?);
    } else if want("mosquitto") {
        println!("\n{MOSQUITTO} not found: mosquitto skipped");
    }

    let c = results.iter().find(|r| r.broker == "cityplane");
    let m = results.iter().find(|r| r.broker == "mosquitto");
    let targets = print_summary(c, m);
    let log_notes = broker_log_notes(&bench_dir.join("cityplane-broker.log"));
    if !log_notes.is_empty() {
        println!("\ncityplane broker log (target/bench/cityplane-broker.log), warnings/errors by message:");
        for n in &log_notes {
            println!("  {n}");
        }
    }
    let json = serde_json::json!({
        "bench": "broker_vs_mosquitto",
        "machine": machine,
        "options": opts,
        "results": results,
        "targets": targets,
        "cityplane_log_notes": log_notes,
        "total_run_s": started.elapsed().as_secs_f64(),
    });
    bench::write_result(&bench_dir, "broker_vs_mosquitto", &json, started)
}

async fn bench_broker(
    name: &str,
    addr: SocketAddr,
    pid: u32,
    setup: &Setup,
    opts: &Opts,
) -> Result<BrokerResult> {
    let pid_s = pid.to_string();
    let mut r = BrokerResult {
        broker: name.to_owned(),
        clients: opts.clients,
        ..Default::default()
    };
    let gen_cpu0 = process::cpu_time("self");
    let broker_cpu0 = process::cpu_time(&pid_s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.rss_idle_kib = process::status_kib(pid, "VmRSS:");

    // 1. Connects.
    let cpu0 = process::cpu_time(&pid_s);
    let overflows0 = listen_overflows();
    let sem = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, (id, tls)) in setup.ids.iter().zip(&setup.tls).enumerate() {
        let (sem, tls, id) = (sem.clone(), tls.clone(), id.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let res = tokio::time::timeout(CONNECT_TIMEOUT, mqtt_connect(addr, tls, &id))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no CONNACK within {CONNECT_TIMEOUT:?}")));
            (i, res)
        });
    }
    let mut conns: Vec<(usize, Conn)> = Vec::with_capacity(opts.clients);
    let mut latencies = Vec::with_capacity(opts.clients);
    let mut errors: Vec<String> = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, Ok((conn, lat)))) => {
                conns.push((i, conn));
                latencies.push(lat);
            }
            Ok((i, Err(e))) => errors.push(format!("connect {}: {e:#}", setup.ids[i])),
            Err(e) => errors.push(format!("connect task: {e}")),
        }
    }
    let wall = t0.elapsed();
    r.listen_overflows = listen_overflows().saturating_sub(overflows0);
    r.rss_after_connect_kib = process::status_kib(pid, "VmRSS:");
    r.broker_cpu_ms_per_connect =
        ms(process::cpu_time(&pid_s).saturating_sub(cpu0)) / conns.len().max(1) as f64;
    latencies.sort();
    r.connected = conns.len();
    r.connect_failures = opts.clients - conns.len();
    r.connect_wall_s = wall.as_secs_f64();
    r.connects_per_sec = conns.len() as f64 / wall.as_secs_f64();
    r.connack_p50_ms = ms(percentile(&latencies, 0.50));
    r.connack_p99_ms = ms(percentile(&latencies, 0.99));
    r.connack_max_ms = ms(percentile(&latencies, 1.0));
    println!(
        "connects: {}/{} in {:.2} s = {:.0}/s; CONNACK p50 {:.1} ms p99 {:.1} ms; broker CPU {:.2} ms/connect; listen queue overflows {}",
        r.connected, opts.clients, r.connect_wall_s, r.connects_per_sec, r.connack_p50_ms, r.connack_p99_ms, r.broker_cpu_ms_per_connect, r.listen_overflows
    );

    // 2. Subscribe everyone, then memory.
    conns.sort_by_key(|(i, _)| *i);
    let mut set = tokio::task::JoinSet::new();
    for (i, mut conn) in conns {
        let sem = sem.clone();
        let id = setup.ids[i].clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let filter = format!("devices/{id}/commands");
            let res = tokio::time::timeout(CONNECT_TIMEOUT, conn.subscribe(&[filter.as_str()]))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no SUBACK")));
            (i, conn, res)
        });
    }
    let mut devices: Vec<(usize, Conn)> = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, conn, Ok(()))) => devices.push((i, conn)),
            Ok((i, _, Err(e))) => {
                r.subscribe_failures += 1;
                errors.push(format!("subscribe {}: {e:#}", setup.ids[i]));
            }
            Err(e) => errors.push(format!("subscribe task: {e}")),
        }
    }
    devices.sort_by_key(|(i, _)| *i);
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.rss_connected_kib = process::status_kib(pid, "VmRSS:");
    r.broker_threads = process::status_kib(pid, "Threads:");
    r.kib_per_connection =
        (r.rss_connected_kib as f64 - r.rss_idle_kib as f64) / devices.len().max(1) as f64;
    r.kib_per_connection_before_subscribe =
        (r.rss_after_connect_kib as f64 - r.rss_idle_kib as f64) / r.connected.max(1) as f64;
    println!(
        "memory: RSS {} KiB idle -> {} KiB connected -> {} KiB with {} subscribed = {:.1} KiB/connection; {} threads",
        r.rss_idle_kib,
        r.rss_after_connect_kib,
        r.rss_connected_kib,
        devices.len(),
        r.kib_per_connection,
        r.broker_threads
    );

    // Device tasks from here on.
    let stats = Arc::new(DevStats::default());
    let mut device_ids = Vec::with_capacity(devices.len());
    let mut device_tx = Vec::with_capacity(devices.len());
    for (index, (i, conn)) in devices.into_iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = setup.ids[i].clone();
        tokio::spawn(device_task(
            index as u32,
            id.clone(),
            conn,
            rx,
            stats.clone(),
        ));
        device_ids.push(id);
        device_tx.push(tx);
    }
    let n = device_ids.len();

    // 3. Command round trip.
    let ctl = start_controller(addr, setup.ctl_tls.clone()).await?;
    if n > 0 {
        // Warm-up: one command per device, at most WARMUP_WINDOW awaiting their ack.
        let t0 = Instant::now();
        let mut windowed = true;
        for (i, id) in device_ids.iter().enumerate() {
            if windowed {
                match tokio::time::timeout(ACK_TIMEOUT, ctl.state.window.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => {
                        errors.push("warm-up: no ack for 5 s with the window full; sending the rest unpaced".into());
                        windowed = false;
                    }
                }
            }
            let _ = ctl.out.send(Out::Command {
                seq: i as u64,
                frame: command_frame(id, i as u64),
            });
        }
        wait_acks(&ctl.state, |s| s < MEASURED_BASE, n).await;
        let acks = take_acks(&ctl.state, |s| s < MEASURED_BASE);
        let mut rtts: Vec<Duration> = acks.iter().map(|a| a.recv_at - a.sent_at).collect();
        rtts.sort();
        r.warmup_commands = n;
        r.warmup_ms = acks
            .iter()
            .map(|a| a.recv_at)
            .max()
            .map_or(0.0, |end| ms(end - t0));
        r.warmup_p50_ms = ms(percentile(&rtts, 0.5));
        r.warmup_p99_ms = ms(percentile(&rtts, 0.99));
        r.warmup_lost = n - rtts.iter().filter(|d| **d <= ACK_TIMEOUT).count();
        drop_pending(&ctl.state, |s| s < MEASURED_BASE);
        println!(
            "first command to every device: {} commands in {:.0} ms (p50 {:.2} ms, p99 {:.2} ms, lost {})",
            n, r.warmup_ms, r.warmup_p50_ms, r.warmup_p99_ms, r.warmup_lost
        );

        // Measured: paced commands spread over the devices.
        let total = opts.cmd_rate as usize * opts.cmd_secs as usize;
        let step = Duration::from_secs(1) / opts.cmd_rate;
        let start = tokio::time::Instant::now();
        for k in 0..total {
            tokio::time::sleep_until(start + step * k as u32).await;
            let seq = MEASURED_BASE + k as u64;
            let _ = ctl.out.send(Out::Command {
                seq,
                frame: command_frame(&device_ids[k % n], seq),
            });
        }
        r.cmd_send_span_s = start.elapsed().as_secs_f64();
        wait_acks(&ctl.state, |s| s >= MEASURED_BASE, total).await;
        let acks = take_acks(&ctl.state, |s| s >= MEASURED_BASE);
        let mut rtts: Vec<Duration> = acks.iter().map(|a| a.recv_at - a.sent_at).collect();
        rtts.sort();
        r.cmd_rate_per_sec = opts.cmd_rate;
        r.cmd_sent = total;
        r.rtt_p50_ms = ms(percentile(&rtts, 0.5));
        r.rtt_p99_ms = ms(percentile(&rtts, 0.99));
        r.rtt_max_ms = ms(percentile(&rtts, 1.0));
        r.rtt_lost = total - rtts.iter().filter(|d| **d <= ACK_TIMEOUT).count();
        drop_pending(&ctl.state, |s| s >= MEASURED_BASE);
        println!(
            "command round trip: {} offered at {}/s over {:.2} s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, lost {}",
            total, opts.cmd_rate, r.cmd_send_span_s, r.rtt_p50_ms, r.rtt_p99_ms, r.rtt_max_ms, r.rtt_lost
        );
    }
    r.unknown_acks = ctl.state.unknown_acks.load(Ordering::Relaxed);

    // 4. Fan-in, FANIN_ROUNDS times; the median round is reported.
    if n > 0 {
        let per = opts.fanin_msgs;
        let interval = Duration::from_millis(opts.fanin_interval_ms);
        let expected = n as u64 * u64::from(per);
        for round in 0..FANIN_ROUNDS {
            *lock(&ctl.state.fanin) = FanInSeen {
                round,
                per_device: per,
                seen: vec![false; n * per as usize],
                ..Default::default()
            };
            let sent0 = stats.fanin_sent.load(Ordering::Relaxed);
            let acked0 = stats.fanin_acked.load(Ordering::Relaxed);
            let cpu0 = process::cpu_time(&pid_s);
            let t0 = Instant::now();
            for (i, tx) in device_tx.iter().enumerate() {
                // Starts staggered over one interval.
                let delay = interval * i as u32 / n as u32;
                let _ = tx.send(DevCmd::FanIn {
                    round,
                    count: per,
                    interval,
                    delay,
                });
            }
            let hard_deadline = Instant::now() + Duration::from_secs(60);
            let mut last = (0u64, 0u64, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let got = lock(&ctl.state.fanin).unique;
                let sent = stats.fanin_sent.load(Ordering::Relaxed);
                if got >= expected || ctl.state.dead.load(Ordering::Relaxed) {
                    break;
                }
                if (got, sent) != (last.0, last.1) {
                    last = (got, sent, Instant::now());
                }
                // Nothing sent or received for 5 s: the rest is lost.
                if last.2.elapsed() > ACK_TIMEOUT || Instant::now() > hard_deadline {
                    break;
                }
            }
            let f = {
                let s = lock(&ctl.state.fanin);
                let elapsed = (s.last.unwrap_or(t0) - t0).as_secs_f64();
                let sent = stats.fanin_sent.load(Ordering::Relaxed) - sent0;
                FanInRound {
                    sent,
                    pubacked: stats.fanin_acked.load(Ordering::Relaxed) - acked0,
                    received: s.unique,
                    duplicates: s.duplicates,
                    late: s.late,
                    lost: sent as i64 - s.unique as i64,
                    seconds: elapsed,
                    msgs_per_sec: s.unique as f64 / elapsed.max(1e-9),
                    broker_cpu_us_per_msg: process::cpu_time(&pid_s)
                        .saturating_sub(cpu0)
                        .as_secs_f64()
                        * 1e6
                        / s.unique.max(1) as f64,
                }
            };
            println!(
                "fan-in round {}: {} offered ({} PUBACKs received), {} received by the subscriber in {:.2} s = {:.0} msg/s received, lost {}, duplicates {}; broker CPU {:.1} us/msg",
                round + 1,
                f.sent,
                f.pubacked,
                f.received,
                f.seconds,
                f.msgs_per_sec,
                f.lost,
                f.duplicates,
                f.broker_cpu_us_per_msg
            );
            r.fanin_rounds.push(f);
            // Let stragglers (acks, late copies) settle between rounds.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut by_rate: Vec<&FanInRound> = r.fanin_rounds.iter().collect();
        by_rate.sort_by(|a, b| a.msgs_per_sec.total_cmp(&b.msgs_per_sec));
        let median = by_rate[by_rate.len() / 2].clone();
        r.fanin_msgs_per_sec = median.msgs_per_sec;
        r.fanin_s = median.seconds;
        r.broker_cpu_us_per_fanin_msg = median.broker_cpu_us_per_msg;
        r.fanin_sent = r.fanin_rounds.iter().map(|f| f.sent).sum();
        r.fanin_pubacked = r.fanin_rounds.iter().map(|f| f.pubacked).sum();
        r.fanin_received = r.fanin_rounds.iter().map(|f| f.received).sum();
        r.fanin_duplicates = r.fanin_rounds.iter().map(|f| f.duplicates + f.late).sum();
        r.fanin_lost = r.fanin_rounds.iter().map(|f| f.lost).sum();
    }
    r.rss_end_kib = process::status_kib(pid, "VmRSS:");
    r.rss_peak_kib = process::status_kib(pid, "VmHWM:");
    r.broker_cpu_s = process::cpu_time(&pid_s)
        .saturating_sub(broker_cpu0)
        .as_secs_f64();
    r.generator_cpu_s = process::cpu_time("self")
        .saturating_sub(gen_cpu0)
        .as_secs_f64();

    // Goodbye: DISCONNECT everyone (bounded), then the caller kills the broker.
    let mut waits = Vec::with_capacity(device_tx.len() + 1);
    for tx in &device_tx {
        let (done, wait) = oneshot::channel();
        if tx.send(DevCmd::Disconnect(done)).is_ok() {
            waits.push(wait);
        }
    }
    let (done, wait) = oneshot::channel();
    let _ = ctl.out.send(Out::Disconnect(done));
    waits.push(wait);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        for w in waits {
            let _ = w.await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    errors.extend(lock(&stats.errors).drain(..));
    errors.extend(lock(&ctl.state.errors).drain(..));
    r.error_count = errors.len();
    if !errors.is_empty() {
        println!("{} client-side errors, first ones:", errors.len());
        for e in errors.iter().take(5) {
            println!("  {e}");
        }
    }
    errors.truncate(20);
    r.errors = errors;
    Ok(r)
}

/// Waits until `expected` acks matching `pick` arrived, or nothing is pending
/// anymore, or the oldest pending command is older than the ack timeout.
async fn wait_acks(st: &CtlState, pick: impl Fn(u64) -> bool, expected: usize) {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let got = lock(&st.acks).iter().filter(|a| pick(a.seq)).count();
        if got >= expected || st.dead.load(Ordering::Relaxed) {
            return;
        }
        let oldest = lock(&st.sent)
            .iter()
            .filter(|(s, _)| pick(**s))
            .map(|(_, t)| *t)
            .min();
        match oldest {
            Some(t) if t.elapsed() > ACK_TIMEOUT => return,
            _ if Instant::now() > give_up => return,
            // Commands still queued in the writer are not in `sent` yet.
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

fn take_acks(st: &CtlState, pick: impl Fn(u64) -> bool) -> Vec<Ack> {
    let mut acks = lock(&st.acks);
    let (taken, kept): (Vec<Ack>, Vec<Ack>) = acks.drain(..).partition(|a| pick(a.seq));
    *acks = kept;
    taken
}

fn drop_pending(st: &CtlState, pick: impl Fn(u64) -> bool) {
    lock(&st.sent).retain(|s, _| !pick(*s));
}

/// Warnings and errors in our broker's log, counted by message (numbers
/// masked so "id 17" and "id 18" count together), most frequent first.
fn broker_log_notes(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut counts: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let Some(level) = [" ERROR ", " WARN "].into_iter().find(|l| line.contains(l)) else {
            continue;
        };
        // The message: after the target's ": ", without the key=value fields.
        let msg = line.split_once(": ").map_or(line, |(_, m)| m);
        let msg = msg.split(" peer=").next().unwrap_or(msg).trim();
        let mut key = format!("{}{}", level.trim(), " ");
        let mut in_number = false;
        for c in msg.chars().take(160) {
            if c.is_ascii_digit() {
                if !in_number {
                    key.push('N');
                }
                in_number = true;
            } else {
                in_number = false;
                key.push(c);
            }
        }
        *counts.entry(key).or_default() += 1;
    }
    let mut counts: Vec<(String, usize)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(15);
    counts
        .into_iter()
        .map(|(k, c)| format!("{c} x {k}"))
        .collect()
}

// ---------------------------------------------------------------------------
// Summary

fn print_summary(c: Option<&BrokerResult>, m: Option<&BrokerResult>) -> serde_json::Value {
    let d = BrokerResult::default();
    let (cv, mv) = (c.unwrap_or(&d), m.unwrap_or(&d));
    let have_m = m.is_some();
    let ratio = |a: f64, b: f64| {
        if have_m && b > 0.0 {
            format!("{:.2}x", a / b)
        } else {
            "-".into()
        }
    };
    type Row<'a> = (&'a str, String, String, String, &'a str);
    let num = |v: f64, p: usize| format!("{v:.p$}");
    let row =
        |name: &'static str, a: f64, b: f64, p: usize, target: &'static str| -> Row<'static> {
            (
                name,
                num(a, p),
                if have_m { num(b, p) } else { "-".into() },
                ratio(a, b),
                target,
            )
        };
    #[rustfmt::skip]
    let rows: Vec<Row> = vec![
        row("connects/s", cv.connects_per_sec, mv.connects_per_sec, 0, ">= 1500/s and >= 2x mosquitto"),
        row("CONNACK p50 (ms)", cv.connack_p50_ms, mv.connack_p50_ms, 1, ""),
        row("CONNACK p99 (ms)", cv.connack_p99_ms, mv.connack_p99_ms, 1, ""),
        row("connect failures", cv.connect_failures as f64, mv.connect_failures as f64, 0, "0"),
        row("listen queue overflows (SYN retried)", cv.listen_overflows as f64, mv.listen_overflows as f64, 0, ""),
        row("broker CPU per connect (ms)", cv.broker_cpu_ms_per_connect, mv.broker_cpu_ms_per_connect, 2, ""),
        row("RSS idle (KiB)", cv.rss_idle_kib as f64, mv.rss_idle_kib as f64, 0, ""),
        row("RSS N connected (KiB)", cv.rss_after_connect_kib as f64, mv.rss_after_connect_kib as f64, 0, ""),
        row("RSS N connected+subscribed (KiB)", cv.rss_connected_kib as f64, mv.rss_connected_kib as f64, 0, ""),
        row("  per connection, before SUBSCRIBE (KiB)", cv.kib_per_connection_before_subscribe, mv.kib_per_connection_before_subscribe, 1, ""),
        row("memory per connection (KiB)", cv.kib_per_connection, mv.kib_per_connection, 1, "<= 1.5x mosquitto"),
        row("RSS peak (KiB)", cv.rss_peak_kib as f64, mv.rss_peak_kib as f64, 0, ""),
        row("broker threads when connected", cv.broker_threads as f64, mv.broker_threads as f64, 0, ""),
        row("first command to every device (ms)", cv.warmup_ms, mv.warmup_ms, 0, ""),
        row("  warm-up round trip p99 (ms)", cv.warmup_p99_ms, mv.warmup_p99_ms, 2, ""),
        row("command round trip p50 (ms)", cv.rtt_p50_ms, mv.rtt_p50_ms, 2, ""),
        row("command round trip p99 (ms)", cv.rtt_p99_ms, mv.rtt_p99_ms, 2, "<= 5 ms"),
        row("command round trip max (ms)", cv.rtt_max_ms, mv.rtt_max_ms, 2, ""),
        row("commands lost (> 5 s)", cv.rtt_lost as f64, mv.rtt_lost as f64, 0, "0"),
        row("fan-in received, median of 3 rounds (msg/s)", cv.fanin_msgs_per_sec, mv.fanin_msgs_per_sec, 0, ">= mosquitto"),
        row("fan-in lost, all rounds (offered - received)", cv.fanin_lost as f64, mv.fanin_lost as f64, 0, "0"),
        row("RSS after the run (KiB)", cv.rss_end_kib as f64, mv.rss_end_kib as f64, 0, ""),
        row("broker CPU per fan-in msg (us)", cv.broker_cpu_us_per_fanin_msg, mv.broker_cpu_us_per_fanin_msg, 1, ""),
        row("broker CPU total (s)", cv.broker_cpu_s, mv.broker_cpu_s, 1, ""),
        row("load generator CPU (s)", cv.generator_cpu_s, mv.generator_cpu_s, 1, ""),
        row("client-side errors", cv.error_count as f64, mv.error_count as f64, 0, "0"),
    ];
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!(
        "\n{:<w0$} | {:>10} | {:>10} | {:>6} | target",
        "metric", "cityplane", "mosquitto", "ratio"
    );
    println!("{}", "-".repeat(w0 + 60));
    for (name, a, b, r, t) in &rows {
        println!("{name:<w0$} | {a:>10} | {b:>10} | {r:>6} | {t}");
    }

    let mut targets = Vec::new();
    let mut check = |name: &str, ok: Option<bool>, detail: String| {
        let verdict = match ok {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "N/A",
        };
        println!("{verdict:<4}  {name}: {detail}");
        targets.push(serde_json::json!({"target": name, "result": verdict, "detail": detail}));
    };
    println!();
    let cm = |f: &dyn Fn() -> bool| (c.is_some() && have_m).then(f);
    check(
        "connects >= 1500/s",
        c.map(|c| c.connects_per_sec >= 1500.0),
        format!("{:.0}/s", cv.connects_per_sec),
    );
    check(
        "connects >= 2x mosquitto",
        cm(&|| cv.connects_per_sec >= 2.0 * mv.connects_per_sec),
        format!(
            "{:.0}/s vs {:.0}/s",
            cv.connects_per_sec, mv.connects_per_sec
        ),
    );
    check(
        "memory/connection <= 1.5x mosquitto",
        cm(&|| cv.kib_per_connection <= 1.5 * mv.kib_per_connection),
        format!(
            "{:.1} KiB vs {:.1} KiB",
            cv.kib_per_connection, mv.kib_per_connection
        ),
    );
    check(
        "command round trip p99 <= 5 ms",
        c.map(|c| c.rtt_p99_ms <= 5.0 && c.rtt_lost == 0),
        format!("p99 {:.2} ms, lost {}", cv.rtt_p99_ms, cv.rtt_lost),
    );
    check(
        "fan-in >= mosquitto",
        cm(&|| cv.fanin_msgs_per_sec >= mv.fanin_msgs_per_sec),
        format!(
            "{:.0} msg/s vs {:.0} msg/s",
            cv.fanin_msgs_per_sec, mv.fanin_msgs_per_sec
        ),
    );
    check(
        "fan-in without silent drops",
        c.map(|c| c.fanin_lost == 0 && c.fanin_sent > 0),
        format!(
            "sent {}, received {}, lost {}",
            cv.fanin_sent, cv.fanin_received, cv.fanin_lost
        ),
    );
    serde_json::Value::Array(targets)
}
