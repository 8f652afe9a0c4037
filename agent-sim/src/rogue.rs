//! Rogue devices: holders of a valid device certificate who try what the
//! contract forbids. Each attempt uses a fresh connection (the broker closes
//! a connection on a refused PUBLISH), and counts as refused when the broker
//! answers as docs/PROTOCOL.md says:
//!
//! - a refused CONNECT (spoofed client id, will on another device's presence)
//!   gets CONNACK 0x05 (or the connection is closed before any CONNACK);
//! - a refused PUBLISH closes the connection before its PUBACK;
//! - a refused SUBSCRIBE gets SUBACK 0x80 (or the connection is closed);
//! - a malformed or oversized packet closes the connection (checked with a
//!   PINGREQ sent right behind it).
//!
//! Anything else (a PUBACK, a granted SUBACK, a PINGRESP) is "accepted": a
//! hole in the broker. No answer within the probe timeout is "unanswered".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use cityplane_proto::topics;
use rumqttc::mqttbytes::{v4, QoS};
use rustls::ClientConfig;
use serde::Serialize;
use serde_json::json;

use crate::fleet::{next_node, FleetShared};
use crate::mqtt::{self, Client, ClientError, ConnectOptions, Packet, Will};

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Counts for one kind of rogue action.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RogueActionStats {
    pub attempted: u64,
    pub refused: u64,
    /// How the broker refused: `connack 5`, `connection closed`, `suback 0x80`.
    pub how: BTreeMap<String, u64>,
}

/// What rogue devices attempted and how much of it the broker refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RogueStats {
    pub attempted: u64,
    pub refused: u64,
    /// The broker let it through.
    pub accepted: u64,
    /// No answer within the probe timeout, or the attempt could not be made
    /// (e.g. TLS failed): neither refused nor accepted.
    pub unanswered: u64,
    pub by_action: BTreeMap<String, RogueActionStats>,
    /// One line per accepted attempt: `rogue id: action`.
    pub accepted_details: Vec<String>,
}

impl RogueStats {
    pub fn merge(&mut self, other: &RogueStats) {
        self.attempted += other.attempted;
        self.refused += other.refused;
        self.accepted += other.accepted;
        self.unanswered += other.unanswered;
        for (k, v) in &other.by_action {
            let e = self.by_action.entry(k.clone()).or_default();
            e.attempted += v.attempted;
            e.refused += v.refused;
            for (how, n) in &v.how {
                *e.how.entry(how.clone()).or_insert(0) += n;
            }
        }
        self.accepted_details
            .extend(other.accepted_details.iter().cloned());
    }

    /// True when something was attempted and all of it was refused.
    pub fn all_refused(&self) -> bool {
        self.attempted > 0 && self.refused == self.attempted
    }

    fn record(&mut self, rogue: &str, action: &str, outcome: Outcome) {
        self.attempted += 1;
        let e = self.by_action.entry(action.to_owned()).or_default();
        e.attempted += 1;
        match outcome {
            Outcome::Refused(how) => {
                self.refused += 1;
                e.refused += 1;
                *e.how.entry(how).or_insert(0) += 1;
            }
            Outcome::Accepted => {
                self.accepted += 1;
                self.accepted_details.push(format!("{rogue}: {action}"));
            }
            Outcome::Unanswered(why) => {
                self.unanswered += 1;
                *e.how.entry(format!("unanswered: {why}")).or_insert(0) += 1;
            }
        }
    }
}

#[derive(Debug)]
enum Outcome {
    Refused(String),
    Accepted,
    Unanswered(String),
}

fn closed(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Closed | ClientError::Io(_) | ClientError::Protocol(_)
    )
}

struct Attacker {
    fleet: Arc<FleetShared>,
    id: String,
    tls: Arc<ClientConfig>,
    /// The broker node its next connection goes to.
    node: AtomicUsize,
}

/// The node did not answer at all (as opposed to refusing): another node
/// may, and the attempt is only worth counting if one does.
fn unreachable(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Tcp(_) | ClientError::Tls(_) | ClientError::Timeout
    )
}

impl Attacker {
    /// Connects as `client_id` (spoofed or not) with an optional will. A
    /// node out of reach passes the attempt to the next one, each node
    /// tried at most once; the next attempt starts where this one ended.
    async fn connect(&self, client_id: &str, will: Option<&Will>) -> Result<Client, Outcome> {
        let _permit = self.fleet.connecting.acquire().await;
        let opts = ConnectOptions {
            client_id,
            keep_alive: 30,
            clean_session: true,
            will,
        };
        let nodes = self.fleet.nodes.len();
        let mut result = Err(ClientError::Timeout);
        for _ in 0..nodes {
            let at = self.node.load(Ordering::Relaxed);
            let node = &self.fleet.nodes[at];
            result = Client::connect(
                node.addr,
                node.server_name.clone(),
                self.tls.clone(),
                &opts,
                PROBE_TIMEOUT,
            )
            .await;
            match &result {
                Err(e) if unreachable(e) => {
                    self.node.store(next_node(at, nodes), Ordering::Relaxed);
                }
                _ => break,
            }
        }
        match result {
            Ok(c) => Ok(c),
            Err(ClientError::Refused(code)) => Err(Outcome::Refused(format!("connack {code}"))),
            Err(e) if closed(&e) => Err(Outcome::Refused("closed before connack".into())),
            Err(e) => Err(Outcome::Unanswered(e.label())),
        }
    }

    /// A CONNECT the broker must refuse.
    async fn probe_connect(&self, client_id: &str, will: Option<&Will>) -> Outcome {
        match self.connect(client_id, will).await {
            Ok(mut c) => {
                c.disconnect().await;
                Outcome::Accepted
            }
            Err(outcome) => outcome,
        }
    }

    /// A QoS 1 PUBLISH the broker must refuse: closed before its PUBACK.
    async fn probe_publish(&self, topic: &str, payload: &[u8], retain: bool) -> Outcome {
        let mut c = match self.connect(&self.id, None).await {
            Ok(c) => c,
            Err(o) => return Outcome::Unanswered(format!("own connect failed: {o:?}")),
        };
        let pkid = c.queue_publish(topic, payload, 1, retain);
        if let Err(e) = c.flush().await {
            return if closed(&e) {
                Outcome::Refused("connection closed".into())
            } else {
                Outcome::Unanswered(e.label())
            };
        }
        let got = c
            .recv_until(PROBE_TIMEOUT, |p| {
                matches!(p, Packet::PubAck(id) if *id == pkid).then_some(())
            })
            .await;
        match got {
            Ok(()) => {
                c.disconnect().await;
                Outcome::Accepted
            }
            Err(e) if closed(&e) => Outcome::Refused("connection closed".into()),
            Err(e) => Outcome::Unanswered(e.label()),
        }
    }

    /// A SUBSCRIBE the broker must refuse: SUBACK 0x80 (or close).
    async fn probe_subscribe(&self, filter: &str) -> Outcome {
        let mut c = match self.connect(&self.id, None).await {
            Ok(c) => c,
            Err(o) => return Outcome::Unanswered(format!("own connect failed: {o:?}")),
        };
        let pkid = match c.subscribe(filter, 1).await {
            Ok(p) => p,
            Err(e) if closed(&e) => return Outcome::Refused("connection closed".into()),
            Err(e) => return Outcome::Unanswered(e.label()),
        };
        let got = c
            .recv_until(PROBE_TIMEOUT, |p| match p {
                Packet::SubAck { pkid: id, codes } if *id == pkid => Some(codes.clone()),
                _ => None,
            })
            .await;
        match got {
            Ok(codes) if codes.iter().all(|c| *c == mqtt::SUBACK_FAILURE) => {
                c.disconnect().await;
                Outcome::Refused("suback 0x80".into())
            }
            Ok(_) => {
                c.disconnect().await;
                Outcome::Accepted
            }
            Err(e) if closed(&e) => Outcome::Refused("connection closed".into()),
            Err(e) => Outcome::Unanswered(e.label()),
        }
    }

    /// Raw bytes the broker must answer by closing the connection; a PINGREQ
    /// follows so that "still open" shows as a PINGRESP.
    async fn probe_raw(&self, bytes: Result<BytesMut, ClientError>) -> Outcome {
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => return Outcome::Unanswered(e.label()),
        };
        let mut c = match self.connect(&self.id, None).await {
            Ok(c) => c,
            Err(o) => return Outcome::Unanswered(format!("own connect failed: {o:?}")),
        };
        c.queue_raw(&bytes);
        c.queue_ping();
        if let Err(e) = c.flush().await {
            return if closed(&e) {
                Outcome::Refused("connection closed".into())
            } else {
                Outcome::Unanswered(e.label())
            };
        }
        match c
            .recv_until(PROBE_TIMEOUT, |p| {
                matches!(p, Packet::PingResp).then_some(())
            })
            .await
        {
            Ok(()) => {
                c.disconnect().await;
                Outcome::Accepted
            }
            Err(e) if closed(&e) => Outcome::Refused("connection closed".into()),
            Err(e) => Outcome::Unanswered(e.label()),
        }
    }
}

/// Every forbidden action once, in turn.
pub(crate) async fn attack(
    fleet: Arc<FleetShared>,
    id: String,
    tls: Arc<ClientConfig>,
    home: usize,
    victim: String,
) -> RogueStats {
    let a = Attacker {
        fleet,
        id,
        tls,
        node: AtomicUsize::new(home),
    };
    let me = a.id.clone();
    let mut stats = RogueStats::default();
    let mut rec = |action: &str, outcome: Outcome| {
        tracing::debug!(rogue = %me, action, ?outcome, "rogue attempt");
        stats.record(&me, action, outcome);
    };

    // Identity: be someone else.
    rec("spoof-client-id", a.probe_connect(&victim, None).await);
    let will = Will {
        topic: topics::presence(&victim),
        payload: br#"{"online":false}"#.to_vec(),
        qos: 1,
        retain: true,
    };
    rec(
        "will-on-other-presence",
        a.probe_connect(&a.id, Some(&will)).await,
    );

    // Speak for another device.
    let fake_report = json!({"version": u64::MAX / 2, "state": {"class": "streetlight", "dimming": 0, "firmware": "6.6.6"}});
    rec(
        "publish-other-reported",
        a.probe_publish(
            &topics::reported(&victim),
            fake_report.to_string().as_bytes(),
            false,
        )
        .await,
    );
    rec(
        "publish-other-presence",
        a.probe_publish(&topics::presence(&victim), br#"{"online":false}"#, true)
            .await,
    );
    rec(
        "publish-other-acks",
        a.probe_publish(
            &topics::acks(&victim),
            br#"{"id":"c-forged","status":"applied"}"#,
            false,
        )
        .await,
    );
    rec(
        "publish-bad-own-topic",
        a.probe_publish(&format!("{}/extra", topics::reported(&a.id)), b"{}", false)
            .await,
    );

    // Command injection and replay: only the controller may publish commands.
    let replayed = json!({"id": "c-replayed-0001", "generation": 1, "state": {"dimming": 0, "security": {"services": {"telnet": true}}}});
    rec(
        "inject-command-other",
        a.probe_publish(
            &topics::commands(&victim),
            replayed.to_string().as_bytes(),
            false,
        )
        .await,
    );
    rec(
        "replay-command-own",
        a.probe_publish(
            &topics::commands(&a.id),
            replayed.to_string().as_bytes(),
            false,
        )
        .await,
    );
    let desired =
        json!({"name": "evil", "target": {"ids": [victim]}, "state": {"firmware": "6.6.6"}});
    rec(
        "publish-fleet-desired",
        a.probe_publish(
            &topics::desired("evil"),
            desired.to_string().as_bytes(),
            false,
        )
        .await,
    );
    rec(
        "publish-fleet-status",
        a.probe_publish(topics::FLEET_STATUS, br#"{"total":0}"#, true)
            .await,
    );

    // Eavesdrop.
    rec(
        "subscribe-other-commands",
        a.probe_subscribe(&topics::commands(&victim)).await,
    );
    rec(
        "subscribe-wildcard-commands",
        a.probe_subscribe(&topics::all_devices(topics::DEVICE_SUBSCRIBE_LEAF))
            .await,
    );
    rec("subscribe-all", a.probe_subscribe("#").await);
    rec(
        "subscribe-other-reported",
        a.probe_subscribe(&topics::reported(&victim)).await,
    );
    rec(
        "subscribe-fleet",
        a.probe_subscribe(topics::FLEET_ALL).await,
    );
    rec("subscribe-sys", a.probe_subscribe(topics::SYS_ALL).await);

    // Broken packets.
    let own_report = v4::Publish::new(topics::reported(&a.id), QoS::AtMostOnce, "{}");
    let bad_qos = mqtt::encode(&v4::Packet::Publish(own_report)).map(|mut b| {
        b[0] = 0x36; // QoS 3 does not exist
        b
    });
    rec("malformed-publish-qos3", a.probe_raw(bad_qos).await);
    let bad_length = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..]);
    rec(
        "malformed-remaining-length",
        a.probe_raw(Ok(bad_length)).await,
    );
    let wildcard = v4::Publish::new(topics::all_devices("reported"), QoS::AtMostOnce, "{}");
    rec(
        "publish-wildcard-topic",
        a.probe_raw(mqtt::encode(&v4::Packet::Publish(wildcard)))
            .await,
    );
    let mut second = v4::Connect::new(a.id.as_str());
    second.keep_alive = 30;
    rec(
        "second-connect",
        a.probe_raw(mqtt::encode(&v4::Packet::Connect(second)))
            .await,
    );
    let big = vec![b'x'; 200 * 1024];
    rec(
        "oversized-payload",
        a.probe_publish(&topics::reported(&a.id), &big, false).await,
    );
    stats
}
