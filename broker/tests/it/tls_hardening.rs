//! Findings of the TLS security review (issue 8), end to end over real mTLS:
//! no way around the client-certificate checks through session resumption,
//! intermediate CAs or a missing clientAuth EKU, and no revocation change
//! the watcher can miss.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cityplane_certs::{IssueOptions, Pki};
use cityplane_proto::Role;
use common::tls_assert::*;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::AlertDescription;
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

/// Full MQTT connect as `id` with `tls`; returns the live stream. Reading the
/// CONNACK also makes the client take the session tickets sent before it.
async fn connects(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    id: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut s = raw_tls(addr, tls).await.expect("tls");
    s.write_all(&connect_packet(id, 0x02, 30, &[]))
        .await
        .expect("write CONNECT");
    assert_eq!(
        read_exact(&mut s, 4).await.expect("CONNACK"),
        [0x20, 2, 0, 0],
        "{id} must be accepted"
    );
    s
}

/// A name with exactly these parts (rcgen's default params carry a CN of their own).
fn dn(parts: &[(DnType, &str)]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (ty, value) in parts {
        dn.push(ty.clone(), *value);
    }
    dn
}

fn project_ca_key(pki: &Path) -> KeyPair {
    let pem = std::fs::read_to_string(pki.join(cityplane_certs::CA_KEY_FILE)).expect("ca.key");
    KeyPair::from_pem(&pem).expect("CA key")
}

fn project_ca_issuer(pki: &Path) -> Issuer<'static, KeyPair> {
    let pem = std::fs::read_to_string(pki.join(cityplane_certs::CA_CERT_FILE)).expect("ca.crt");
    Issuer::from_ca_cert_pem(&pem, project_ca_key(pki)).expect("CA issuer")
}

/// Replaces `ca.crt` by a CA certificate with the same name and key but no
/// pathLen constraint, as CAs created before pathLen=0 was set look. Every
/// certificate the PKI issued still chains to it.
fn make_legacy_ca_without_path_len(pki: &Path) {
    let key = project_ca_key(pki);
    let mut params = CertificateParams::default();
    // Same name as the real CA, so what it issued (broker.crt) chains here.
    params.distinguished_name = dn(&[
        (DnType::OrganizationName, "cityplane"),
        (DnType::CommonName, "cityplane CA"),
    ]);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365);
    let cert = params.self_signed(&key).expect("legacy CA");
    std::fs::write(pki.join(cityplane_certs::CA_CERT_FILE), cert.pem()).expect("write ca.crt");
}

/// A device leaf for `id` with the given EKUs, signed by `issuer`.
fn device_leaf(
    id: &str,
    ekus: Vec<ExtendedKeyUsagePurpose>,
    issuer: &Issuer<'_, KeyPair>,
) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&[
        (DnType::OrganizationName, "cityplane"),
        (DnType::OrganizationalUnitName, "device"),
        (DnType::CommonName, id),
    ]);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(30);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert, key)
}

/// A client presenting `chain` (PEM, leaf first) and `key`, trusting the PKI's CA.
fn client_presenting(
    pki: &Path,
    scratch: &Path,
    name: &str,
    chain: &str,
    key: &KeyPair,
) -> Arc<rustls::ClientConfig> {
    let cert_path = scratch.join(format!("{name}.crt"));
    let key_path = scratch.join(format!("{name}.key"));
    std::fs::write(&cert_path, chain).expect("write chain");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    tls_config_with_ca(
        &pki.join(cityplane_certs::CA_CERT_FILE),
        Some((cert_path, key_path)),
    )
}

fn issue_device(pki: &Pki, id: &str, not_after: OffsetDateTime) {
    pki.issue_with(
        Role::Device,
        id,
        &IssueOptions {
            not_before: OffsetDateTime::now_utc() - time::Duration::minutes(5),
            not_after,
            client_auth: true,
            org: None,
        },
    )
    .expect("issue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_cannot_resume_a_tls_session() {
    let t = TestPki::new();
    let not_after = OffsetDateTime::now_utc() + time::Duration::seconds(4);
    issue_device(&t.pki, "shortlived", not_after);
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    // One ClientConfig for both connects: rustls' default client keeps the
    // session tickets it was given in memory and offers them next time.
    let tls = tls_config(t.path(), Some("shortlived"));
    drop(connects(addr, tls.clone(), "shortlived").await);

    let until_expired = not_after - OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    tokio::time::sleep(until_expired.try_into().unwrap_or_default()).await;
    // Several times: a resumed session hands out fresh tickets, so one
    // lucky resumption would otherwise chain into the next.
    for _ in 0..3 {
        assert_eq!(
            refused_with_alert(addr, tls.clone(), "shortlived").await,
            AlertDescription::CertificateExpired
        );
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_cannot_resume_a_tls_session() {
    let t = TestPki::new();
    t.issue(Role::Device, "revokee");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    let tls = tls_config(t.path(), Some("revokee"));
    let mut live = connects(addr, tls.clone(), "revokee").await;
    t.pki.revoke("revokee").expect("revoke");
    // Cut means the broker has loaded the new list.
    assert_eq!(read_until_closed(&mut live).await, Some(vec![]));

    assert_eq!(
        refused_with_alert(addr, tls, "revokee").await,
        AlertDescription::CertificateRevoked
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_signed_by_an_intermediate_ca_is_refused_even_without_path_len() {
    let t = TestPki::new();
    make_legacy_ca_without_path_len(t.path());
    t.issue(Role::Device, "direct");
    let scratch = tempfile::tempdir().expect("tempdir");

    // An intermediate CA the project CA signed (as a leaked CA key, or a
    // careless `openssl ca`, could produce), and a device leaf under it.
    let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut inter = CertificateParams::default();
    inter.distinguished_name = dn(&[
        (DnType::OrganizationName, "cityplane"),
        (DnType::CommonName, "rogue intermediate"),
    ]);
    inter.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    inter.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    inter.not_before = now - time::Duration::days(1);
    inter.not_after = now + time::Duration::days(30);
    inter.use_authority_key_identifier_extension = true;
    let inter_cert = inter
        .signed_by(&inter_key, &project_ca_issuer(t.path()))
        .expect("sign intermediate");
    let inter_issuer = Issuer::new(inter, inter_key);
    let (leaf, leaf_key) = device_leaf(
        "via-intermediate",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        &inter_issuer,
    );

    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    // Positive control: the legacy CA itself is trusted.
    drop(connects(addr, tls_config(t.path(), Some("direct")), "direct").await);

    // Also a positive control: the leaf followed by a copy of the CA, as
    // OpenSSL clients (mosquitto_pub) send it.
    let direct_with_ca = format!(
        "{}{}",
        std::fs::read_to_string(t.path().join("direct.crt")).expect("direct.crt"),
        std::fs::read_to_string(t.path().join(cityplane_certs::CA_CERT_FILE)).expect("ca.crt"),
    );
    let direct_key =
        KeyPair::from_pem(&std::fs::read_to_string(t.path().join("direct.key")).expect("key"))
            .expect("direct key");
    let tls = client_presenting(
        t.path(),
        scratch.path(),
        "direct-with-ca",
        &direct_with_ca,
        &direct_key,
    );
    drop(connects(addr, tls, "direct").await);

    let chain = format!("{}{}", leaf.pem(), inter_cert.pem());
    let tls = client_presenting(t.path(), scratch.path(), "inter", &chain, &leaf_key);
    assert_eq!(
        refused_with_alert(addr, tls, "via-intermediate").await,
        AlertDescription::CertificateUnknown
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_without_the_client_auth_eku_is_refused() {
    let t = TestPki::new();
    let scratch = tempfile::tempdir().expect("tempdir");
    let ca = project_ca_issuer(t.path());
    let (no_eku, no_eku_key) = device_leaf("no-eku", vec![], &ca);
    let (with_eku, with_eku_key) =
        device_leaf("with-eku", vec![ExtendedKeyUsagePurpose::ClientAuth], &ca);

    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    // Positive control: the same hand-made leaf with the EKU gets in.
    let tls = client_presenting(
        t.path(),
        scratch.path(),
        "with-eku",
        &with_eku.pem(),
        &with_eku_key,
    );
    drop(connects(addr, tls, "with-eku").await);

    let tls = client_presenting(
        t.path(),
        scratch.path(),
        "no-eku",
        &no_eku.pem(),
        &no_eku_key,
    );
    assert_eq!(
        refused_with_alert(addr, tls, "no-eku").await,
        AlertDescription::UnsupportedCertificate
    );
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_length_rewrite_of_the_revocation_list_with_its_mtime_kept_is_seen() {
    let t = TestPki::new();
    t.issue(Role::Device, "d1");
    t.issue(Role::Device, "d2");
    // d2's entry is the placeholder the rewrite turns into d1's.
    t.pki.revoke("d2").expect("revoke d2");
    let serial = |id: &str| {
        t.pki
            .current_cert(id)
            .expect("read")
            .expect("issued")
            .serial
    };
    let (d1_serial, d2_serial) = (serial("d1"), serial("d2"));
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    // The watcher's baseline is the hash of the bytes loaded at start.
    let mut d1 = raw_connected(addr, t.path(), "d1").await;

    let path = t.pki.revocation_path();
    let before = std::fs::read_to_string(&path).expect("list");
    let meta = std::fs::metadata(&path).expect("stat");
    let after = before
        .replace(&d2_serial, &d1_serial)
        .replace("\"d2\"", "\"d1\"");
    assert_eq!(after.len(), before.len());
    assert_ne!(after, before);
    // In place, without truncating: the file never looks shorter or empty.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open list");
    std::io::Write::write_all(&mut file, after.as_bytes()).expect("rewrite list");
    file.set_modified(meta.modified().expect("mtime"))
        .expect("restore mtime");
    drop(file);
    let now = std::fs::metadata(&path).expect("stat");
    assert_eq!(
        (now.len(), now.modified().ok()),
        (meta.len(), meta.modified().ok())
    );

    assert_eq!(
        read_until_closed(&mut d1).await,
        Some(vec![]),
        "d1 was revoked by the rewrite: its session must be cut"
    );
    broker.shutdown().await;
}

/// Connect-rate cost of refusing resumption: N sequential connects (TLS +
/// CONNECT/CONNACK) with a fresh client config each (full handshakes, as
/// agent-sim devices and CLI invocations connect) against N with one shared
/// config (resumption whenever the server allows it). Numbers only; run
/// with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn measure_full_vs_resumed_handshakes() {
    const N: usize = 500;
    let t = TestPki::new();
    t.issue(Role::Device, "m");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();

    let fresh: Vec<_> = (0..N).map(|_| tls_config(t.path(), Some("m"))).collect();
    let shared = tls_config(t.path(), Some("m"));
    for (what, configs) in [
        ("fresh config each", fresh),
        ("one shared config", vec![shared; N]),
    ] {
        let mut resumed = 0;
        let started = Instant::now();
        for tls in configs {
            let s = connects(addr, tls, "m").await;
            if s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                resumed += 1;
            }
        }
        let took = started.elapsed();
        println!(
            "{what}: {N} connects in {took:?} ({:?} each, {:.0}/s), {resumed} resumed",
            took / N as u32,
            N as f64 / took.as_secs_f64()
        );
    }
    broker.shutdown().await;
}

/// The server's CPU per handshake, in memory (no sockets, no broker): a
/// rustls server like the broker's (webpki client verifier, P-256 keys)
/// with resumption as rustls ships it, against one without. One shared
/// client config, so the client resumes whenever it can. Numbers only; run
/// with `--ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn measure_server_cpu_full_vs_resumed_handshakes() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    const N: u32 = 2000;
    let t = TestPki::new();
    t.issue(Role::Device, "m");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = cityplane_testkit::tls::roots(&t.pki.ca_cert_path()).expect("roots");
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .expect("verifier");
    let server = |resumption: bool| {
        let chain = CertificateDer::pem_file_iter(t.pki.server_cert_path())
            .expect("broker.crt")
            .collect::<Result<Vec<_>, _>>()
            .expect("broker.crt");
        let key = PrivateKeyDer::from_pem_file(t.pki.server_key_path()).expect("broker.key");
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain, key)
            .expect("server config");
        if !resumption {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Arc::new(config)
    };
    for (what, config) in [
        ("resumption on (rustls default)", server(true)),
        ("resumption off (cityplane)", server(false)),
    ] {
        let client = tls_config(t.path(), Some("m"));
        let (mut server_time, mut resumed) = (Duration::ZERO, 0);
        for _ in 0..N {
            let (took, kind) = in_memory_handshake(client.clone(), config.clone());
            server_time += took;
            resumed += u32::from(kind == Some(rustls::HandshakeKind::Resumed));
        }
        println!(
            "{what}: server {:?} per handshake over {N}, {resumed} resumed",
            server_time / N
        );
    }
}

/// One handshake between in-memory connections, until the session tickets
/// (if any) have reached the client; returns the time spent in the server.
fn in_memory_handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> (Duration, Option<rustls::HandshakeKind>) {
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut client = rustls::ClientConnection::new(client, name).expect("client");
    let mut server_conn = rustls::ServerConnection::new(server).expect("server");
    let mut in_server = Duration::ZERO;
    loop {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).expect("client write");
        }
        let started = Instant::now();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            server_conn.read_tls(&mut rd).expect("server read");
            server_conn.process_new_packets().expect("server");
        }
        let mut back = Vec::new();
        while server_conn.wants_write() {
            server_conn.write_tls(&mut back).expect("server write");
        }
        in_server += started.elapsed();
        let mut rd = &back[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).expect("client read");
            client.process_new_packets().expect("client");
        }
        if wire.is_empty() && back.is_empty() && !client.is_handshaking() {
            return (in_server, server_conn.handshake_kind());
        }
    }
}

/// A client of identity `id` that speaks only TLS `version`.
fn client_speaking(
    pki: &Path,
    id: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let roots = cityplane_testkit::tls::roots(&pki.join("ca.crt")).expect("roots");
    let chain = CertificateDer::pem_file_iter(pki.join(format!("{id}.crt")))
        .expect("certificate file")
        .collect::<Result<Vec<_>, _>>()
        .expect("certificate");
    let key = PrivateKeyDer::from_pem_file(pki.join(format!("{id}.key"))).expect("key");
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_protocol_versions(&[version])
    .expect("version")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client config");
    Arc::new(config)
}

/// The edge's TLS layer (rustls' unbuffered API, `broker/src/tls_stream.rs`)
/// with either protocol version a client may choose: a message spanning
/// several TLS records arrives whole, from a device and to a subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_clients_exchange_messages_of_many_records() {
    let t = TestPki::new();
    t.issue(Role::Device, "big-dev");
    t.issue(Role::Operator, "watcher");
    let broker = start(t.path(), test_limits()).await;
    let addr = broker.local_addr();
    // ~100 KiB: seven records of at most 16 KiB.
    let payload =
        serde_json::to_vec(&serde_json::json!({"blob": "x".repeat(100 * 1024)})).expect("json");
    let big = |o: &mut rumqttc::MqttOptions| {
        o.set_max_packet_size(256 * 1024, 256 * 1024);
    };
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let what = format!("{:?}", version.version);
        let (w, w_loop) = mqtt_with(
            addr,
            client_speaking(t.path(), "watcher", version),
            "watcher",
            big,
        );
        let (_watcher, mut seen) = subscribed(w, w_loop, &["devices/+/reported"]).await;
        let (d, d_loop) = mqtt_with(
            addr,
            client_speaking(t.path(), "big-dev", version),
            "big-dev",
            big,
        );
        let (device, _) = subscribed(d, d_loop, &[]).await;
        device
            .publish(
                "devices/big-dev/reported",
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.clone(),
            )
            .await
            .expect("publish");
        let (topic, got) = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: the report did not arrive"))
            .expect("watcher's loop");
        assert_eq!(topic, "devices/big-dev/reported", "{what}");
        assert!(
            got == payload,
            "{what}: {} bytes arrived, {} sent",
            got.len(),
            payload.len()
        );
    }
    broker.shutdown().await;
}
