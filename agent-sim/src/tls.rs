//! rustls client configurations: one per identity, sharing what can be shared
//! (`cityplane_certs::client_tls::Trust`: the provider and the parsed CA).
//!
//! Session resumption is disabled: rustls' default in-memory ticket cache
//! pre-allocates room for 32 servers per config, several KiB per device for a
//! saving (an abbreviated handshake on reconnect) that a simulator does not
//! need.

use std::path::Path;
use std::sync::Arc;

use cityplane_certs::client_tls::{self, ClientCert, Trust};
use rustls::client::Resumption;
use rustls::ClientConfig;

use crate::SimError;

impl From<client_tls::Error> for SimError {
    fn from(e: client_tls::Error) -> SimError {
        SimError::Pki(e.to_string())
    }
}

/// What every identity's config shares.
#[derive(Clone)]
pub struct TlsBase {
    trust: Trust,
}

impl TlsBase {
    /// Trusts the CA certificate(s) in the PEM file `ca`.
    pub fn from_ca_file(ca: &Path) -> Result<TlsBase, SimError> {
        Ok(TlsBase {
            trust: Trust::from_ca_file(ca)?,
        })
    }

    /// A client config presenting the certificate and key in `cert`/`key`
    /// (PEM). Also returns the certificate's notAfter (RFC 3339).
    pub fn identity(&self, cert: &Path, key: &Path) -> Result<Identity, SimError> {
        self.identity_of(ClientCert::from_pem_files(cert, key)?)
    }

    /// [`identity`](Self::identity) from PEM held in memory (a rotated
    /// certificate and the key the device generated for it).
    pub fn identity_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Identity, SimError> {
        self.identity_of(ClientCert::from_pem(cert_pem, key_pem)?)
    }

    fn identity_of(&self, cert: ClientCert) -> Result<Identity, SimError> {
        let not_after = not_after(cert.leaf().as_ref()).unwrap_or_default();
        let serial = cityplane_certs::peer_cert(cert.leaf().as_ref())
            .map(|p| p.serial)
            .unwrap_or_default();
        let mut config = self.trust.client(Some(cert))?;
        config.resumption = Resumption::disabled();
        Ok(Identity {
            config: Arc::new(config),
            not_after,
            serial,
        })
    }
}

/// One identity's TLS client config.
pub struct Identity {
    pub config: Arc<ClientConfig>,
    /// The certificate's notAfter, RFC 3339 (empty if unreadable).
    pub not_after: String,
    /// The certificate's serial as `cityplane_certs` writes it (empty if
    /// unreadable).
    pub serial: String,
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
