//! rustls client configurations (ring) from the PEM files of a PKI, through
//! `cityplane_certs::client_tls` like every other client.

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use cityplane_certs::client_tls::{self, ClientCert, Trust};
use rustls::{ClientConfig, RootCertStore};

/// The certificates of a CA file, as trust roots.
pub fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    Ok(Arc::new(client_tls::roots(ca)?))
}

/// A client trusting the CA file `ca` that presents `identity` (certificate
/// chain and key files), or no certificate at all.
pub fn client_config(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientConfig> {
    let identity = identity
        .map(|(cert, key)| ClientCert::from_pem_files(cert, key))
        .transpose()?;
    Ok(Trust::from_ca_file(ca)?.client(identity)?)
}

/// A client of the PKI in `dir` (`ca.crt`) as identity `id` (`{id}.crt`,
/// `{id}.key`), or without a certificate.
pub fn pki_client(dir: &Path, id: Option<&str>) -> Result<Arc<ClientConfig>> {
    let config = match id {
        Some(id) => client_tls::config(dir, id)?,
        None => Trust::from_ca_file(&dir.join(cityplane_certs::CA_CERT_FILE))?.client(None)?,
    };
    Ok(Arc::new(config))
}
