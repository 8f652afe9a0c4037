//! Where a refusal happens. A refused certificate must be stopped at the TLS
//! handshake with an alert, before any MQTT; a session cut later (revocation
//! of a live client) is a close of an MQTT session that was working. Reading
//! "any error or EOF" as "refused" cannot tell these apart, nor from a
//! CONNACK refusal or a close after CONNECT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{connect_packet, raw_tls, read_exact};

/// Connects as `id` (CONNECT with that client id) and returns the alert the
/// server refused the client certificate with. Anything else (MQTT bytes, a
/// plain close, a non-alert error) fails the test.
pub async fn refused_with_alert(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    id: &str,
) -> AlertDescription {
    let err = match raw_tls(addr, tls).await {
        Err(e) => e,
        Ok(mut stream) => {
            let _ = stream.write_all(&connect_packet(id, 0x02, 30, &[])).await;
            let mut buf = [0u8; 16];
            // TLS 1.3: the client learns of the refusal on its first read.
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{id}: the server neither answered nor closed"));
            match read {
                Err(e) => e,
                Ok(n) => panic!(
                    "{id}: not refused at the TLS layer: got {n} bytes {:?} \
                     (0 bytes: closed after CONNECT; CONNACK 0 is 20 02 00 00)",
                    &buf[..n]
                ),
            }
        }
    };
    match err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => *alert,
        _ => panic!("{id}: expected a TLS alert from the server, got {err}"),
    }
}

/// `stream` is a live MQTT session (CONNACK already read): proves it still
/// answers a PINGREQ, so a later close is the end of a working session.
pub async fn assert_session_live(stream: &mut TlsStream<TcpStream>, what: &str) {
    stream
        .write_all(&[0xC0, 0])
        .await
        .unwrap_or_else(|e| panic!("{what}: PINGREQ: {e}"));
    let got = read_exact(stream, 2)
        .await
        .unwrap_or_else(|e| panic!("{what}: no PINGRESP: {e}"));
    assert_eq!(got, [0xD0, 0], "{what}: not a PINGRESP");
}

/// The server ends the established session `stream`: a TLS close_notify
/// (clean EOF) with no MQTT bytes before it, not an alert and not silence.
pub async fn assert_session_cut(stream: &mut TlsStream<TcpStream>, what: &str) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: session still open after 10 s"));
    match read {
        Ok(0) => {}
        Ok(n) => panic!("{what}: got MQTT bytes {:?} instead of a close", &buf[..n]),
        Err(e) => panic!("{what}: expected the session closed with close_notify, got {e}"),
    }
}
