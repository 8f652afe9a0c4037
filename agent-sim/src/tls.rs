//! rustls client configurations: one per identity, sharing what can be shared.
//!
//! A `ClientConfig` carries the client certificate, so every device needs its
//! own. What does not depend on the identity is built once and shared through
//! `Arc`s: the crypto provider (ring) and the verifier of the broker's
//! certificate (the parsed CA). Session resumption is disabled: rustls'
//! default in-memory ticket cache pre-allocates room for 32 servers per
//! config, several KiB per device for a saving (an abbreviated handshake on
//! reconnect) that a simulator does not need.

use std::path::Path;
use std::sync::Arc;

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;

use crate::SimError;

/// What every identity's config shares.
#[derive(Clone)]
pub struct TlsBase {
    provider: Arc<CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
}

impl TlsBase {
    /// Trusts the CA certificate(s) in the PEM file `ca`.
    pub fn from_ca_file(ca: &Path) -> Result<TlsBase, SimError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(ca)
            .map_err(|e| SimError::Pki(format!("{}: {e}", ca.display())))?;
        for cert in certs {
            let cert = cert.map_err(|e| SimError::Pki(format!("{}: {e}", ca.display())))?;
            roots
                .add(cert)
                .map_err(|e| SimError::Pki(format!("{}: {e}", ca.display())))?;
        }
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| SimError::Pki(format!("CA {}: {e}", ca.display())))?;
        Ok(TlsBase { provider, verifier })
    }

    /// A client config presenting the certificate and key in `cert`/`key`
    /// (PEM). Also returns the certificate's notAfter (RFC 3339).
    pub fn identity(&self, cert: &Path, key: &Path) -> Result<Identity, SimError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| SimError::Pki(format!("{}: {e}", cert.display())))?;
        let first = chain
            .first()
            .ok_or_else(|| SimError::Pki(format!("{}: no certificate", cert.display())))?;
        let not_after = not_after(first.as_ref()).unwrap_or_default();
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| SimError::Pki(format!("{}: {e}", key.display())))?;
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| SimError::Pki(e.to_string()))?
            .with_webpki_verifier(self.verifier.clone())
            .with_client_auth_cert(chain, key)
            .map_err(|e| SimError::Pki(format!("{}: {e}", cert.display())))?;
        config.resumption = Resumption::disabled();
        Ok(Identity {
            config: Arc::new(config),
            not_after,
        })
    }
}

/// One identity's TLS client config.
pub struct Identity {
    pub config: Arc<ClientConfig>,
    /// The certificate's notAfter, RFC 3339 (empty if unreadable).
    pub not_after: String,
}

fn not_after(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    cert.validity()
        .not_after
        .to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}
