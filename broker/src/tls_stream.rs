//! A server-side TLS connection on rustls' unbuffered API, holding no buffer
//! while the connection is idle.
//!
//! Why not tokio-rustls: rustls' buffered `ServerConnection` keeps a 4 KiB
//! read buffer for the life of a connection once it has read anything
//! (`DeframerVecBuffer::prepare_read`), 40 MB at 10,000 idle devices. Here
//! the ciphertext buffer is ours: it grows when the socket is readable and is
//! released as soon as it holds no partial record, so an idle device costs
//! its socket, its keys and nothing else.
//!
//! Every await point keeps its progress in the struct (bytes read are in
//! `incoming`, bytes written are counted in `sent`), so a read can be
//! abandoned in a `select!` without losing or repeating a byte.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What one socket read asks for. Records are at most ~16.7 KiB; a larger
/// one simply takes several reads.
const READ_SIZE: usize = 4096;

/// The most ciphertext held without a whole message in it: a handshake
/// message may span records up to 64 KiB (rustls' own limit for the buffered
/// API), plus one record being read.
const MAX_INCOMING: usize = 0xffff + 16 * 1024 + 2048 + 5;

pub(crate) struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read from the socket and not yet consumed by rustls.
    incoming: Vec<u8>,
    /// TLS bytes for the peer, in order; the first `sent` are written.
    outgoing: Vec<u8>,
    sent: usize,
    /// Application data decrypted when nobody was reading (right behind the
    /// handshake, or while making room to write): handed out first.
    early: BytesMut,
    /// The peer sent close_notify: no more application data will come.
    peer_closed: bool,
}

/// Where processing the buffered records stopped.
enum Step {
    /// rustls needs more bytes from the peer.
    NeedRead,
    /// Handshake done, nothing left to process: application data may flow.
    Open,
    /// The peer closed the TLS session.
    Closed,
}

impl TlsStream {
    /// The server side of a handshake on `tcp`. On a refusal the alert
    /// rustls chose is sent before the error is returned.
    pub(crate) async fn accept(
        config: Arc<rustls::ServerConfig>,
        tcp: TcpStream,
    ) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            early: BytesMut::new(),
            peer_closed: false,
        };
        loop {
            let step = match stream.process(None) {
                Ok(step) => step,
                Err(e) => return Err(stream.fail(e).await),
            };
            stream.send_pending().await?;
            match step {
                Step::Open if !stream.conn.is_handshaking() => return Ok(stream),
                Step::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ))
                }
                _ => {
                    if !stream.fill().await? {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed during the TLS handshake",
                        ));
                    }
                }
            }
        }
    }

    /// The client's certificate chain, leaf first.
    pub(crate) fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Appends the application data that is available (waiting for some if
    /// there is none) to `buf`. `Ok(0)` once the peer has closed the TLS
    /// session; an error if it closed the socket without doing so.
    /// Cancel-safe.
    pub(crate) async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            self.send_pending().await?;
            if !self.early.is_empty() {
                let n = self.early.len();
                buf.extend_from_slice(&self.early);
                self.early = BytesMut::new();
                return Ok(n);
            }
            if self.peer_closed {
                return Ok(0);
            }
            let before = buf.len();
            let step = match self.process(Some(buf)) {
                Ok(step) => step,
                Err(e) => return Err(self.fail(e).await),
            };
            if buf.len() > before {
                // Anything rustls queued to send (a key update) goes out on
                // the next read or write: returning now keeps the data this
                // call took from being stranded if the caller stops waiting.
                return Ok(buf.len() - before);
            }
            if let Step::Closed = step {
                self.peer_closed = true;
                return Ok(0);
            }
            if self.sent < self.outgoing.len() {
                continue;
            }
            if !self.fill().await? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                ));
            }
        }
    }

    /// Encrypts all of `data` and writes it to the socket.
    pub(crate) async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        if !data.is_empty() {
            self.encrypt(|traffic, out| traffic.encrypt(data, out), data.len())?;
        }
        self.send_pending().await
    }

    /// Everything is written by `write_all`; kept for the callers' symmetry
    /// with `AsyncWrite`.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        self.send_pending().await
    }

    /// Sends close_notify and closes the sending side of the socket.
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        self.encrypt(|traffic, out| traffic.queue_close_notify(out), 0)?;
        self.send_pending().await?;
        self.tcp.shutdown().await
    }

    /// Runs rustls over the buffered ciphertext until it needs the network.
    /// Application data goes to `into`, or to `early` when there is none.
    fn process(&mut self, mut into: Option<&mut BytesMut>) -> Result<Step, rustls::Error> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let step = match state {
                Err(e) => {
                    discard_front(&mut self.incoming, discard);
                    return Err(e);
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        match into.as_deref_mut() {
                            Some(buf) => buf.extend_from_slice(record.payload),
                            None => self.early.extend_from_slice(record.payload),
                        }
                    }
                    None
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut self.outgoing, &mut data)?;
                    None
                }
                // The bytes are queued in `outgoing`, which is written in
                // order before anything encrypted after them.
                Ok(ConnectionState::TransmitTlsData(data)) => {
                    data.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Step::NeedRead),
                Ok(ConnectionState::WriteTraffic(_)) => Some(Step::Open),
                Ok(ConnectionState::PeerClosed) | Ok(ConnectionState::Closed) => Some(Step::Closed),
                // Early data is never enabled (`max_early_data_size` is 0).
                Ok(other) => {
                    return Err(rustls::Error::General(format!(
                        "unexpected TLS state {other:?}"
                    )))
                }
            };
            discard_front(&mut self.incoming, discard);
            if let Some(step) = step {
                if self.incoming.is_empty() && self.incoming.capacity() > 0 {
                    self.incoming = Vec::new();
                }
                return Ok(step);
            }
        }
    }

    /// Encrypts with `write` once rustls allows application data, into
    /// `outgoing` after what is already queued. `hint` sizes the first try.
    fn encrypt(
        &mut self,
        mut write: impl FnMut(
            &mut WriteTraffic<'_, ServerConnectionData>,
            &mut [u8],
        ) -> Result<usize, EncryptError>,
        hint: usize,
    ) -> io::Result<()> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let done = match state.map_err(invalid)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    // TLS 1.3: 5 bytes of header, 1 of type and 16 of tag per
                    // record of at most 16 KiB.
                    let guess = hint + 22 * (hint / 16_384 + 1) + 64;
                    let mut encrypt = |out: &mut [u8]| match write(&mut traffic, out) {
                        Ok(n) => Ok(n),
                        Err(EncryptError::InsufficientSize(size)) => Err(Refused::Grow(size)),
                        Err(EncryptError::EncryptExhausted) => Err(Refused::KeysExhausted),
                    };
                    append(&mut self.outgoing, guess, &mut encrypt)
                        .map_err(|e| io::Error::other(format!("TLS: cannot encrypt: {e}")))?;
                    true
                }
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        self.early.extend_from_slice(record.payload);
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    encode(&mut self.outgoing, &mut data).map_err(invalid)?;
                    false
                }
                ConnectionState::TransmitTlsData(data) => {
                    data.done();
                    false
                }
                // The peer's close_notify is seen by the next read.
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    false
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        format!("TLS: cannot send in state {other:?}"),
                    ))
                }
            };
            discard_front(&mut self.incoming, discard);
            if done {
                return Ok(());
            }
        }
    }

    /// Writes what `outgoing` holds. Cancel-safe: what was written is
    /// counted before the next await.
    async fn send_pending(&mut self) -> io::Result<()> {
        while self.sent < self.outgoing.len() {
            let n = self.tcp.write(&self.outgoing[self.sent..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.sent += n;
        }
        // Released, not kept: an idle connection holds no buffer.
        self.outgoing = Vec::new();
        self.sent = 0;
        Ok(())
    }

    /// Reads once from the socket into `incoming`. `false` on EOF.
    /// Cancel-safe: memory is taken only once the socket is readable, and
    /// the read itself does not wait.
    async fn fill(&mut self) -> io::Result<bool> {
        loop {
            if self.incoming.len() >= MAX_INCOMING {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS: message too large",
                ));
            }
            self.tcp.readable().await?;
            self.incoming.reserve(READ_SIZE);
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After rustls refused the peer: sends the alert it queued (best
    /// effort, briefly) and turns the refusal into the error to return.
    async fn fail(&mut self, e: rustls::Error) -> io::Error {
        // One turn brings out the alert (queued records come out before any
        // new input is looked at). A second could read the bad record again
        // and try to send a second fatal alert, which rustls forbids. The
        // buffer is the same one: rustls may hold positions in it (a
        // handshake message being joined).
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut data)) = state {
            let _ = encode(&mut self.outgoing, &mut data);
        }
        discard_front(&mut self.incoming, discard);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.send_pending()).await;
        invalid(e)
    }
}

/// Why rustls wrote nothing into the buffer offered.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// Too small: how large it must be.
    #[error("TLS output of {} bytes refused", .0.required_size)]
    Grow(InsufficientSizeError),
    /// The connection's keys may encrypt no more records.
    #[error("the connection's keys are exhausted")]
    KeysExhausted,
}

impl From<Refused> for rustls::Error {
    fn from(e: Refused) -> Self {
        rustls::Error::General(e.to_string())
    }
}

/// Appends a handshake or alert record rustls has ready.
fn encode(
    out: &mut Vec<u8>,
    data: &mut EncodeTlsData<'_, ServerConnectionData>,
) -> Result<(), rustls::Error> {
    let mut write = |buf: &mut [u8]| match data.encode(buf) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(size)) => Err(Refused::Grow(size)),
        Err(EncodeError::AlreadyEncoded) => Ok(0),
    };
    Ok(append(out, 0, &mut write)?)
}

/// Lets `write` put its bytes at the end of `out`, growing it to the size it
/// asks for (once). `guess` is the room offered on the first try.
fn append(
    out: &mut Vec<u8>,
    guess: usize,
    write: &mut impl FnMut(&mut [u8]) -> Result<usize, Refused>,
) -> Result<(), Refused> {
    let start = out.len();
    out.resize(start + guess, 0);
    let n = match write(&mut out[start..]) {
        Ok(n) => n,
        Err(Refused::Grow(size)) if size.required_size <= MAX_OUTGOING => {
            out.resize(start + size.required_size, 0);
            match write(&mut out[start..]) {
                Ok(n) => n,
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
        }
        Err(e) => {
            out.truncate(start);
            return Err(e);
        }
    };
    out.truncate(start + n);
    Ok(())
}

/// No single write of ours comes near this (the largest is a firmware chunk
/// with its header); past it something is wrong, not big.
const MAX_OUTGOING: usize = 64 * 1024 * 1024;

fn discard_front(buf: &mut Vec<u8>, n: usize) {
    if n > 0 {
        buf.drain(..n);
    }
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A server configuration for a fresh self-signed certificate, and
    /// that certificate.
    fn server_config() -> (rustls::ServerConfig, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        // As the broker's (`tls.rs`): no tickets for the client to leave unread.
        server.send_tls13_tickets = 0;
        (server, cert.der().clone())
    }

    /// A server `TlsStream` and a tokio-rustls client connected to it.
    async fn pair() -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let (server, cert) = server_config();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(Arc::new(server), tcp).await
        });
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let client = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("client handshake");
        let server = accepting.await.expect("task").expect("server handshake");
        (server, client)
    }

    async fn read_server(server: &mut TlsStream, want: usize) -> BytesMut {
        let mut got = BytesMut::new();
        while got.len() < want {
            assert!(server.read_buf(&mut got).await.expect("read") > 0, "EOF");
        }
        got
    }

    /// What the module is for: once the bytes that came in are handed out
    /// and the bytes for the peer are written, the connection holds no
    /// buffer, whatever it carried before (here several records each way).
    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer_after_carrying_records_both_ways() {
        let (mut server, mut client) = pair().await;
        let sent: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.expect("client write");
        assert_eq!(read_server(&mut server, sent.len()).await, sent[..]);
        server.write_all(&sent).await.expect("server write");
        let mut back = vec![0u8; sent.len()];
        client.read_exact(&mut back).await.expect("client read");
        assert_eq!(back, sent);
        assert_eq!(
            (
                server.incoming.capacity(),
                server.outgoing.capacity(),
                server.early.capacity()
            ),
            (0, 0, 0),
            "buffers held while idle"
        );

        // A clean close reads as EOF, and the server's close_notify reaches the client.
        client.shutdown().await.expect("client close");
        let mut rest = BytesMut::new();
        assert_eq!(server.read_buf(&mut rest).await.expect("EOF"), 0);
        server.shutdown().await.expect("server close");
        assert_eq!(client.read(&mut [0u8; 8]).await.expect("close_notify"), 0);
    }

    /// A peer that drops the socket without close_notify may have been cut
    /// off: an error, not a clean end.
    #[tokio::test]
    async fn a_socket_closed_without_close_notify_is_an_error() {
        let (mut server, client) = pair().await;
        drop(client);
        let err = server
            .read_buf(&mut BytesMut::new())
            .await
            .expect_err("not clean");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// Bytes that are not TLS are refused with an alert, not a panic or a
    /// hang; the refusal says why.
    #[tokio::test]
    async fn plain_mqtt_on_the_tls_port_is_refused_with_an_alert() {
        let (server, _) = server_config();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            TlsStream::accept(Arc::new(server), tcp).await.map(|_| ())
        });
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        // An MQTT CONNECT, as a client configured without TLS sends it.
        tcp.write_all(&[0x10, 0x0c, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 0])
            .await
            .expect("write");
        let err = accepting.await.expect("task").expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        let mut alert = Vec::new();
        tcp.read_to_end(&mut alert).await.expect("read");
        // An alert record: content type 21.
        assert_eq!(alert.first(), Some(&21), "got {alert:?}");
    }
}
