//! `crl.pem` is for brokers other than ours: mosquitto, given it as its
//! `crlfile`, must refuse a revoked client certificate at the TLS handshake
//! and still accept a valid one. Skips without `/usr/sbin/mosquitto` unless
//! CITYPLANE_REQUIRE_MOSQUITTO=1 (CI sets it so this cannot silently skip).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use cityplane_certs::Pki;
use cityplane_proto::Role;
use cityplane_testkit::mosquitto;
use rustls::AlertDescription;

fn available() -> bool {
    if mosquitto::installed() {
        return true;
    }
    assert!(
        std::env::var_os("CITYPLANE_REQUIRE_MOSQUITTO").is_none(),
        "mosquitto is required ({} not found; apt-get install mosquitto)",
        mosquitto::MOSQUITTO
    );
    eprintln!("skipping: {} not installed", mosquitto::MOSQUITTO);
    false
}

/// TLS as `id`, then an MQTT CONNECT with that client id: the 4 bytes
/// mosquitto answers, or the error that ended the connection.
fn connect(addr: SocketAddr, pki: &Path, id: &str) -> std::io::Result<[u8; 4]> {
    let config =
        cityplane_testkit::tls::pki_client(pki, Some(id)).map_err(std::io::Error::other)?;
    let name = "localhost".try_into().map_err(std::io::Error::other)?;
    let mut conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut tcp = TcpStream::connect(addr)?;
    // Guards against a hang only; either answer comes at once.
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut packet = vec![0x10, (12 + id.len()) as u8];
    packet.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30]);
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id.as_bytes());
    tls.write_all(&packet)?;
    tls.flush()?;
    // TLS 1.3: a refused client certificate shows on the first read.
    let mut connack = [0u8; 4];
    tls.read_exact(&mut connack)?;
    Ok(connack)
}

#[test]
fn mosquitto_with_the_crl_refuses_a_revoked_certificate_and_accepts_a_valid_one() {
    if !available() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), false).expect("init");
    pki.issue(Role::Device, "valid").expect("issue");
    pki.issue(Role::Device, "revoked").expect("issue");
    pki.revoke("revoked").expect("revoke");

    let crlfile = format!("crlfile {}\n", pki.crl_path().display());
    let (_mosquitto, addr) =
        mosquitto::start_with("crl_mosquitto test", &pki, tmp.path(), "", &crlfile)
            .expect("mosquitto starts with crl.pem");

    assert_eq!(
        connect(addr, pki.dir(), "valid").expect("valid certificate connects"),
        [0x20, 2, 0, 0],
        "CONNACK accepted"
    );

    let err = connect(addr, pki.dir(), "revoked").expect_err("revoked certificate must be refused");
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => assert_eq!(
            *alert,
            AlertDescription::CertificateRevoked,
            "refused for another reason than the CRL"
        ),
        _ => panic!("expected a TLS alert at the handshake, got {err}"),
    }
}
