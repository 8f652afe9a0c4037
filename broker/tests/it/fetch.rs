//! The image path: a device asks for firmware bytes on `devices/D/fetch`
//! and the edge answers on `devices/D/blob` from `firmware_dir`; nothing on
//! either topic goes through the router, and only the device itself may
//! ask (docs/PROTOCOL.md, "Firmware").

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cityplane_proto::firmware::{decode_blob, BlobHeader, FetchRequest, MAX_CHUNK};
use cityplane_proto::{topics, Role};
use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS, SubscribeReasonCode};

const WAIT: Duration = Duration::from_secs(10);

/// An image name. The edge serves by name and never hashes what it serves
/// (the device checks the SHA-256), so any 64 hex digits do here.
fn name(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// `len` bytes that differ at every offset that matters.
fn image(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

struct Firmware {
    dir: tempfile::TempDir,
}

impl Firmware {
    fn new() -> Firmware {
        Firmware {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    fn store(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.dir.path().join(name), bytes).expect("write image");
    }
}

/// A device (or any client) driven by hand: every wait is for one packet.
struct Client {
    id: String,
    client: AsyncClient,
    events: EventLoop,
}

impl Client {
    async fn connect(addr: SocketAddr, pki: &Path, id: &str) -> Client {
        let (client, mut events) = mqtt_with(addr, tls_config(pki, Some(id)), id, |o| {
            // A blob is up to 64 KiB of image plus its header.
            o.set_max_packet_size(MAX_CHUNK as usize + 4096, 8192);
        });
        connack(&mut events).await.expect("connects");
        Client {
            id: id.into(),
            client,
            events,
        }
    }

    async fn next(&mut self) -> Result<Packet, rumqttc::ConnectionError> {
        loop {
            match tokio::time::timeout(WAIT, self.events.poll()).await {
                Ok(Ok(Event::Incoming(packet))) => return Ok(packet),
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => panic!("{}: nothing within {WAIT:?}", self.id),
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queued");
        loop {
            if let Packet::SubAck(ack) = self.next().await.expect("suback") {
                return ack.return_codes[0];
            }
        }
    }

    async fn subscribe_blob(&mut self) {
        let blob = topics::blob(&self.id);
        assert_eq!(
            self.subscribe(&blob).await,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            "a device's blob subscription is granted at QoS 0"
        );
    }

    fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .expect("queued");
    }

    /// Sends `payload` on the device's fetch topic; the blob that answers it.
    async fn fetch_raw(&mut self, payload: Vec<u8>) -> (BlobHeader, Vec<u8>) {
        let blob = topics::blob(&self.id);
        self.publish(&topics::fetch(&self.id), payload);
        loop {
            match self.next().await.expect("a blob") {
                Packet::Publish(p) if p.topic == blob => {
                    assert_eq!(p.qos, QoS::AtMostOnce, "blobs are QoS 0");
                    let (header, bytes) = decode_blob(&p.payload).expect("a blob payload");
                    return (header, bytes.to_vec());
                }
                Packet::Publish(p) => panic!("unexpected publish on {}", p.topic),
                _ => {}
            }
        }
    }

    async fn fetch(&mut self, sha256: &str, offset: u64, length: u32) -> (BlobHeader, Vec<u8>) {
        let req = FetchRequest {
            sha256: sha256.into(),
            offset,
            length,
        };
        self.fetch_raw(serde_json::to_vec(&req).expect("json"))
            .await
    }

    /// Waits for the broker to close the connection.
    async fn closed(&mut self) -> bool {
        loop {
            if self.next().await.is_err() {
                return true;
            }
        }
    }
}

/// Fetches `[from, end)` of an image in chunks of `MAX_CHUNK`, as a device
/// would, checking every header.
async fn download(d: &mut Client, sha256: &str, from: u64, total: u64) -> Vec<u8> {
    let mut got = Vec::new();
    let mut offset = from;
    loop {
        let (header, bytes) = d.fetch(sha256, offset, MAX_CHUNK).await;
        assert_eq!(
            header,
            BlobHeader {
                sha256: sha256.into(),
                offset,
                total,
                error: None
            }
        );
        if bytes.is_empty() {
            return got;
        }
        assert!(bytes.len() <= MAX_CHUNK as usize);
        offset += bytes.len() as u64;
        got.extend(bytes);
    }
}

fn error_of(header: &BlobHeader) -> &str {
    header.error.as_deref().unwrap_or("(none)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_fetches_an_image_in_chunks_and_resumes_on_a_new_connection() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Controller, "ctl");
    let fw = Firmware::new();
    let bytes = image(200 * 1024);
    let sha = name(0xab);
    fw.store(&sha, &bytes);
    let broker = start_serving(t.path(), test_limits(), Some(fw.path())).await;
    let addr = broker.local_addr();
    // The controller may subscribe to everything: it sees neither the
    // fetches nor the blobs (they never enter the router).
    let (_ctl, mut ctl_rx) = connected(addr, t.path(), "ctl", &["devices/#"]).await;

    let mut d1 = Client::connect(addr, t.path(), "d1").await;
    d1.subscribe_blob().await;
    let total = bytes.len() as u64;
    assert_eq!(download(&mut d1, &sha, 0, total).await, bytes);

    // A length above the limit is clamped to it, and to the end.
    let (_, chunk) = d1.fetch(&sha, 10, u32::MAX).await;
    assert_eq!(chunk, &bytes[10..10 + MAX_CHUNK as usize]);
    let (_, tail) = d1.fetch(&sha, total - 5, MAX_CHUNK).await;
    assert_eq!(tail, &bytes[bytes.len() - 5..]);

    // The connection drops after the first chunk; a new one resumes from
    // the offset the device has.
    let (_, first) = d1.fetch(&sha, 0, MAX_CHUNK).await;
    drop(d1);
    let mut again = Client::connect(addr, t.path(), "d1").await;
    again.subscribe_blob().await;
    let rest = download(&mut again, &sha, first.len() as u64, total).await;
    assert_eq!([first, rest].concat(), bytes);

    let routed: Vec<String> = drain(&mut ctl_rx, Duration::from_millis(300))
        .await
        .into_iter()
        .map(|(topic, _)| topic)
        .filter(|topic| topics::split_device_topic(topic).is_some_and(|(_, l)| l != "presence"))
        .collect();
    assert!(routed.is_empty(), "routed: {routed:?}");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_an_error_header_and_the_session_goes_on() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let fw = Firmware::new();
    let bytes = image(1000);
    let sha = name(0x01);
    fw.store(&sha, &bytes);
    let broker = start_serving(t.path(), test_limits(), Some(fw.path())).await;
    let mut d1 = Client::connect(broker.local_addr(), t.path(), "d1").await;
    d1.subscribe_blob().await;

    let bad: [(&str, Vec<u8>, &str); 5] = [
        (
            "not JSON",
            b"fetch please".to_vec(),
            "bad_request: not JSON",
        ),
        (
            "an array",
            format!(r#"["{sha}", 0, 10]"#).into_bytes(),
            "bad_request: bad_schema",
        ),
        (
            "a missing field",
            format!(r#"{{"sha256": "{sha}", "offset": 0}}"#).into_bytes(),
            "bad_request: bad_schema",
        ),
        (
            "a path for a name",
            br#"{"sha256": "../../../etc/passwd", "offset": 0, "length": 10}"#.to_vec(),
            "bad_request: sha256 must be 64 lowercase hex digits",
        ),
        (
            "length 0",
            format!(r#"{{"sha256": "{sha}", "offset": 0, "length": 0}}"#).into_bytes(),
            "bad_request: length must be above 0",
        ),
    ];
    for (what, payload, error) in bad {
        let (header, got) = d1.fetch_raw(payload).await;
        assert!(
            error_of(&header).starts_with(error),
            "{what}: {header:?}, wanted {error}"
        );
        assert!(got.is_empty(), "{what}: bytes with an error");
    }
    let (header, got) = d1.fetch(&name(0x02), 0, 10).await;
    assert_eq!(
        (error_of(&header), header.total, got.len()),
        ("not_found", 0, 0)
    );
    let (header, got) = d1.fetch(&sha, 1001, 10).await;
    assert_eq!(
        (error_of(&header), header.total, got.len()),
        ("out_of_range", 1000, 0)
    );
    // The session still serves.
    let (header, got) = d1.fetch(&sha, 990, 100).await;
    assert_eq!((header.error, got), (None, bytes[990..].to_vec()));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_firmware_dir_every_fetch_is_answered_no_firmware_store() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    let broker = start(t.path(), test_limits()).await;
    let mut d1 = Client::connect(broker.local_addr(), t.path(), "d1").await;
    d1.subscribe_blob().await;
    let (header, bytes) = d1.fetch(&name(0xab), 0, 10).await;
    assert_eq!((error_of(&header), bytes.len()), ("no_firmware_store", 0));
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_fetch_for_another_nor_read_its_blobs() {
    let t = TestPki::new();
    for id in ["d1", "d2"] {
        t.issue(Role::Device, id);
    }
    let fw = Firmware::new();
    fw.store(&name(0xab), &image(10));
    let broker = start_serving(t.path(), test_limits(), Some(fw.path())).await;
    let addr = broker.local_addr();
    let mut d1 = Client::connect(addr, t.path(), "d1").await;
    assert_eq!(
        d1.subscribe(&topics::blob("d2")).await,
        SubscribeReasonCode::Failure
    );
    assert_eq!(
        d1.subscribe("devices/+/blob").await,
        SubscribeReasonCode::Failure
    );
    let req = serde_json::to_vec(&FetchRequest {
        sha256: name(0xab),
        offset: 0,
        length: 10,
    })
    .expect("json");
    d1.publish(&topics::fetch("d2"), req);
    assert!(
        d1.closed().await,
        "a fetch in another device's name is refused"
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_and_the_controller_cannot_publish_a_fetch() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Operator, "op1");
    t.issue(Role::Controller, "ctl");
    let fw = Firmware::new();
    fw.store(&name(0xab), &image(10));
    let broker = start_serving(t.path(), test_limits(), Some(fw.path())).await;
    let addr = broker.local_addr();
    let req = serde_json::to_vec(&FetchRequest {
        sha256: name(0xab),
        offset: 0,
        length: 10,
    })
    .expect("json");
    for who in ["op1", "ctl"] {
        let mut c = Client::connect(addr, t.path(), who).await;
        c.publish(&topics::fetch("d1"), req.clone());
        assert!(c.closed().await, "{who}: a fetch is a device's own request");
    }
    broker.shutdown().await;
}
