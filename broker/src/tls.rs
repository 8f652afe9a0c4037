//! The rustls server configuration, built once at start: mutual TLS against
//! the project CA, plus our own checks on the verified client certificate
//! (issued directly by the CA, clientAuth EKU, identity readable, serial not
//! revoked). Session resumption is off so every connection is verified.

use std::sync::Arc;

use cityplane_certs::Pki;
use cityplane_proto::Role;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

use crate::pins::Pins;
use crate::revocation::RevocationState;
use crate::BrokerError;

pub(crate) fn server_config(
    pki: &Pki,
    revocation: Arc<RevocationState>,
    pins: Pins,
) -> Result<Arc<rustls::ServerConfig>, BrokerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let read = |path: std::path::PathBuf| {
        std::fs::read(&path).map_err(|source| BrokerError::Pki {
            path: path.clone(),
            reason: source.to_string(),
        })
    };
    let pem_certs =
        |path: std::path::PathBuf| -> Result<Vec<CertificateDer<'static>>, BrokerError> {
            let bytes = read(path.clone())?;
            rustls_pemfile_certs(&bytes).map_err(|reason| BrokerError::Pki { path, reason })
        };

    let cas = pem_certs(pki.ca_cert_path())?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in &cas {
        roots.add(ca.clone()).map_err(|e| BrokerError::Pki {
            path: pki.ca_cert_path(),
            reason: e.to_string(),
        })?;
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
    let verifier = Arc::new(IdentityVerifier {
        inner: webpki,
        cas,
        revocation,
        pins,
    });

    let chain = pem_certs(pki.server_cert_path())?;
    let key_path = pki.server_key_path();
    let key_pem = read(key_path.clone())?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| BrokerError::Pki {
        path: key_path,
        reason: e.to_string(),
    })?;

    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![];
    // No session resumption: a resumed session brings back the client's
    // chain without calling the verifier, so a certificate that has expired
    // (or been revoked) since would still get in. Full handshakes cost
    // little here: devices connect once and stay, and a broker restart
    // empties the in-memory cache anyway.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    if config.ticketer.enabled() {
        return Err(BrokerError::Tls(
            "stateless session tickets must stay off (resumption skips client verification)".into(),
        ));
    }
    Ok(Arc::new(config))
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in file".into());
    }
    Ok(certs)
}

/// Signature, validity and key usage are webpki's job; on top we insist the
/// certificate was issued directly by the CA, says clientAuth, names a valid
/// cityplane identity and is not revoked, so a refused certificate is
/// refused at the handshake with a TLS alert.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// The trusted CA certificates, as in `ca.crt`.
    cas: Vec<CertificateDer<'static>>,
    revocation: Arc<RevocationState>,
    /// The controller's quarantine and certificate pins (devices only).
    pins: Pins,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the client sent {intermediates} intermediate certificate(s); only certificates \
     issued directly by the cityplane CA are accepted"
)]
struct NotIssuedDirectly {
    intermediates: usize,
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ClientCertVerifier for IdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // cityplane issues leaves directly from the CA. An intermediate could
        // only come from someone holding the CA key outside our tooling, and
        // webpki would accept it unless the CA says pathLen=0, which CAs
        // created before that was set do not. A copy of the CA itself is
        // harmless and OpenSSL clients (mosquitto_pub) send one: they
        // complete the chain from their CA file.
        let intermediates = intermediates
            .iter()
            .filter(|cert| !self.cas.contains(cert))
            .count();
        if intermediates > 0 {
            return Err(other(NotIssuedDirectly { intermediates }));
        }
        self.inner.verify_client_cert(end_entity, &[], now)?;
        let peer = cityplane_certs::peer_cert(end_entity.as_ref()).map_err(other)?;
        // webpki treats a certificate without the EKU extension as good for
        // any purpose; ours must say clientAuth.
        if !peer.client_auth {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            ));
        }
        self.revocation.check(&peer.serial)?;
        if peer.identity.role == Role::Device && !self.pins.allows(&peer.identity.id, &peer.serial)
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
