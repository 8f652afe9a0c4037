//! The operator side of the protocol: connect with an operator certificate,
//! send a request, wait for the controller's answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cityplane_certs::client_tls;
use cityplane_proto::messages::Response;
use cityplane_proto::topics;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::Value;

/// How every client subcommand finds the server and proves who it is.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Server address (host:port)
    #[arg(long, env = "CITYPLANE_SERVER", default_value = "127.0.0.1:8883")]
    pub server: String,
    /// PKI directory holding ca.crt and ID.crt/ID.key
    #[arg(long, env = "CITYPLANE_PKI", default_value = "pki")]
    pub pki: PathBuf,
    /// Identity to connect as (an operator certificate's id)
    #[arg(long, env = "CITYPLANE_ID", default_value = "operator")]
    pub id: String,
    /// Seconds to wait for an answer. A write the controller takes up more
    /// than 60 s after this runs out (it waited in a broker's queue) is
    /// refused with `expired`, not done behind your back
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    /// The server is an external broker (a RabbitMQ cluster, with
    /// `cityplane controller` behind it): requests name their sender in
    /// the topic (fleet/by/<id>/...), which only the broker's permissions
    /// for this certificate allow
    #[arg(long, env = "CITYPLANE_CLUSTER")]
    pub cluster: bool,
}

/// The client config of identity `id` in the PKI directory `pki`.
pub fn tls_config(pki: &Path, id: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    match client_tls::config(pki, id) {
        Ok(config) => Ok(Arc::new(config)),
        Err(e @ client_tls::Error::Read { .. }) if !pki.join(format!("{id}.crt")).exists() => {
            Err(anyhow::Error::new(e).context(format!(
                "no certificate for {id:?} (issue it with `cityplane certs issue --role operator --id {id} --org city`, or the contractor's organisation)"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Why a request went unanswered. A query may be asked again after
/// either (it changes nothing); a write may have been done, so the
/// caller says so instead.
#[derive(Debug)]
pub enum Unanswered {
    /// No answer within the timeout: the answer, or the request, may be
    /// lost (an external broker drops what a controller publishes on a
    /// connection it loses) or the controller is slow or down.
    Silent(Duration),
    /// The connection to the server went away.
    Lost(String),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unanswered::Silent(t) => write!(
                f,
                "no answer within {t:?}: is `cityplane serve` running? (a busy cluster may need a longer --timeout)"
            ),
            Unanswered::Lost(e) => write!(f, "connection to the server lost: {e}"),
        }
    }
}

impl std::error::Error for Unanswered {}

pub struct Operator {
    client: AsyncClient,
    eventloop: EventLoop,
    id: String,
    timeout: Duration,
    next: u64,
    /// Requests go to `fleet/by/<id>/...` (see [`ConnectArgs::cluster`]).
    cluster: bool,
}

/// What [`Operator::register`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// Devices new to the registry.
    pub registered: u64,
    /// Registered devices whose attributes changed.
    pub updated: u64,
    /// Devices in the registry afterwards.
    pub total: u64,
}

impl Operator {
    /// [`Operator::connect`], retried every 100 ms for `within` (a server
    /// that is still starting).
    pub async fn connect_retrying(
        args: &ConnectArgs,
        within: Duration,
    ) -> anyhow::Result<Operator> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Operator::connect(args).await {
                Ok(op) => return Ok(op),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    pub async fn connect(args: &ConnectArgs) -> anyhow::Result<Operator> {
        let (host, port) = split_server(&args.server)?;
        // A session of its own (`<id>:<session>`): the same operator may
        // run a `get devices --watch` and an `apply` at once, and MQTT lets
        // one client id hold one connection (the second takes it over).
        static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let client_id = format!("{}:cli-{}-{n}", args.id, std::process::id());
        let mut opts = MqttOptions::new(client_id, host.clone(), port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(4 * 1024 * 1024, 256 * 1024);
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls_config(&args.pki, &args.id)?,
        )));
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(args.timeout);
        eventloop.set_network_options(net);
        let timeout = Duration::from_secs(args.timeout);
        let connected = tokio::time::timeout(timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("cannot connect to {} as {:?}: {e}", args.server, args.id),
            Err(_) => bail!("no answer from {} within {timeout:?}", args.server),
        }
        let mut op = Operator {
            client,
            eventloop,
            id: args.id.clone(),
            timeout,
            next: 0,
            cluster: args.cluster,
        };
        op.subscribe_answers().await?;
        Ok(op)
    }

    async fn wait(&mut self, mut done: impl FnMut(&Event) -> bool) -> anyhow::Result<Event> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async {
            loop {
                let event = self
                    .eventloop
                    .poll()
                    .await
                    .map_err(|e| anyhow::Error::new(Unanswered::Lost(e.to_string())))?;
                if done(&event) {
                    return Ok(event);
                }
            }
        })
        .await
        .map_err(|_| anyhow::Error::new(Unanswered::Silent(timeout)))?
    }

    /// After [`Unanswered::Lost`]: subscribes to the answers again, which
    /// a clean session forgot, connecting again first if nothing has yet
    /// (the event loop does, on its next poll). Whoever polled since may
    /// have seen the CONNACK already, so this does not wait for one.
    /// `Lost` again while the broker is still away.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        self.subscribe_answers().await
    }

    /// Subscribes to this operator's answers and waits for the SUBACK.
    async fn subscribe_answers(&mut self) -> anyhow::Result<()> {
        self.client
            .subscribe(topics::responses_filter(&self.id), QoS::AtLeastOnce)
            .await?;
        self.wait(|e| matches!(e, Event::Incoming(Packet::SubAck(_))))
            .await?;
        Ok(())
    }

    /// Publishes `body` (with a fresh request id) to `topic` and returns the answer.
    pub async fn request(&mut self, topic: &str, mut body: Value) -> anyhow::Result<Value> {
        self.next += 1;
        let now = cityplane_controller::model::now_ms();
        let rid = format!("{}-{}-{now}", std::process::id(), self.next);
        if let Some(obj) = body.as_object_mut() {
            obj.insert("request_id".into(), Value::from(rid.clone()));
            // Past it this command has stopped waiting: a write the
            // controller takes up later (queued in an external broker while
            // no controller read) is refused, not done behind our back.
            let stop = now.saturating_add(self.timeout.as_millis() as u64);
            obj.insert(
                "expires_at".into(),
                Value::from(cityplane_controller::model::rfc3339(stop)),
            );
        }
        let topic = match self.cluster {
            true => topics::by(&self.id, topic).unwrap_or_else(|| topic.to_owned()),
            false => topic.to_owned(),
        };
        self.client
            .publish(topic, QoS::AtLeastOnce, false, serde_json::to_vec(&body)?)
            .await?;
        let want = topics::response(&self.id, &rid);
        let event = self
            .wait(|e| matches!(e, Event::Incoming(Packet::Publish(p)) if p.topic == want))
            .await?;
        let Event::Incoming(Packet::Publish(p)) = event else {
            bail!("unexpected event");
        };
        serde_json::from_slice(&p.payload).context("controller answered with invalid JSON")
    }

    /// A query or registry write under `fleet/ops/<verb>`; its result, or an
    /// error when the controller refuses it.
    pub async fn query(&mut self, verb: &str, body: Value) -> anyhow::Result<Value> {
        let answer = self.request(&topics::ops(verb), body).await?;
        match serde_json::from_value::<Response>(answer.clone()) {
            Ok(Response::Ok { result, .. }) => Ok(result),
            Ok(Response::Rejected { code, reason, .. }) => bail!("{code}: {reason}"),
            _ => bail!("the controller answered {verb} with {answer}"),
        }
    }

    /// Registers a manifest in batches of `batch` (each stored and audited
    /// before its answer); `progress` gets the devices sent so far. On a
    /// refusal, the error says how many were registered before it.
    pub async fn register(
        &mut self,
        devices: &[Value],
        batch: usize,
        mut progress: impl FnMut(usize),
    ) -> anyhow::Result<Registered> {
        let mut out = Registered::default();
        let mut sent = 0;
        for chunk in devices.chunks(batch.max(1)) {
            let r = self
                .query("register", serde_json::json!({"devices": chunk}))
                .await
                .with_context(|| {
                    format!(
                        "registered {sent} of {} devices before this batch was refused; \
                         the rest were not sent",
                        devices.len()
                    )
                })?;
            out.registered += r["registered"].as_u64().unwrap_or(0);
            out.updated += r["updated"].as_u64().unwrap_or(0);
            out.total = r["total"].as_u64().unwrap_or(0);
            sent += chunk.len();
            progress(sent);
        }
        Ok(out)
    }

    /// Uploads a signed release and its image in chunks of `chunk` bytes
    /// (`publish-firmware`); `progress` gets the bytes sent so far. The
    /// answer of the last chunk (`complete: true`), or of the first when
    /// the server already has this exact release.
    pub async fn publish_release(
        &mut self,
        release: &cityplane_proto::firmware::SignedRelease,
        image: &Path,
        chunk: usize,
        mut progress: impl FnMut(u64),
    ) -> anyhow::Result<Value> {
        use base64::Engine as _;
        use std::io::Read as _;
        let mut file =
            std::fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
        let mut buf = vec![0u8; chunk.max(1)];
        let mut offset = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", image.display()))?;
            let body = serde_json::json!({
                "release": release,
                "offset": offset,
                "data": base64::engine::general_purpose::STANDARD.encode(&buf[..n]),
            });
            let r = self.query("publish-firmware", body).await?;
            if r["complete"] == true {
                return Ok(r);
            }
            if n == 0 {
                bail!("the image ended at byte {offset} but the server expects more: is it the image that was signed?");
            }
            offset += n as u64;
            progress(offset);
        }
    }

    /// Sends DISCONNECT (so the broker does not publish a will) and waits for it to go out.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = self.eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

pub fn split_server(server: &str) -> anyhow::Result<(String, u16)> {
    if let Ok(addr) = server.parse::<SocketAddr>() {
        // The broker certificate names localhost and 127.0.0.1.
        let host = if addr.ip().is_loopback() {
            "localhost".to_owned()
        } else {
            addr.ip().to_string()
        };
        return Ok((host, addr.port()));
    }
    let (host, port) = server
        .rsplit_once(':')
        .with_context(|| format!("--server {server:?} must be HOST:PORT"))?;
    Ok((
        host.to_owned(),
        port.parse()
            .with_context(|| format!("bad port in {server:?}"))?,
    ))
}
