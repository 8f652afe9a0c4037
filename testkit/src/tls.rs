//! rustls client configurations (ring) from the PEM files of a PKI.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// The certificates of a CA file, as trust roots.
pub fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))? {
        roots.add(cert?)?;
    }
    Ok(Arc::new(roots))
}

/// A client trusting `roots` that presents `identity` (certificate chain and
/// key files), or no certificate at all.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig> {
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    Ok(match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("{}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key =
                PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// A client of the PKI in `dir` (`ca.crt`) as identity `id` (`{id}.crt`,
/// `{id}.key`), or without a certificate.
pub fn pki_client(dir: &Path, id: Option<&str>) -> Result<Arc<ClientConfig>> {
    let files = id.map(|id| (dir.join(format!("{id}.crt")), dir.join(format!("{id}.key"))));
    let identity = files.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    Ok(Arc::new(client_config(
        roots(&dir.join("ca.crt"))?,
        identity,
    )?))
}
