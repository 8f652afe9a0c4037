//! rustls client configurations from the files of a PKI directory: the one
//! way every client (operators, simulated devices, tests, benchmarks) trusts
//! the CA and presents an identity.
//!
//! What does not depend on the identity, the crypto provider (ring) and the
//! verifier of the broker's certificate (the parsed CA), is built once in a
//! [`Trust`] and shared through `Arc`s by every config made from it: a
//! simulator holds one config per device.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::pki::CA_CERT_FILE;

/// Why a client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Rustls {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the crypto provider: {0}")]
    Provider(rustls::Error),
    #[error("CA {}: {source}", path.display())]
    Verifier {
        path: PathBuf,
        source: rustls::client::VerifierBuilderError,
    },
}

/// The certificates of the PEM file `ca`, as trust roots.
pub fn roots(ca: &Path) -> Result<RootCertStore, Error> {
    let read = |source| Error::Read {
        path: ca.to_owned(),
        source,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(read)? {
        roots
            .add(cert.map_err(read)?)
            .map_err(|source| Error::Rustls {
                path: ca.to_owned(),
                source,
            })?;
    }
    Ok(roots)
}

/// A client certificate chain and its private key, read from PEM files.
pub struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    path: PathBuf,
}

impl ClientCert {
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<ClientCert, Error> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|source| Error::Read {
                path: cert.to_owned(),
                source,
            })?;
        if chain.is_empty() {
            return Err(Error::NoCertificate {
                path: cert.to_owned(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|source| Error::Read {
            path: key.to_owned(),
            source,
        })?;
        Ok(ClientCert {
            chain,
            key,
            path: cert.to_owned(),
        })
    }

    /// A chain and key held in memory (PEM), such as a certificate a
    /// device received in a rotation with the key it generated for it.
    /// Errors name the path `(memory)`.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<ClientCert, Error> {
        let path = PathBuf::from("(memory)");
        let read = |source| Error::Read {
            path: path.clone(),
            source,
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(read)?;
        if chain.is_empty() {
            return Err(Error::NoCertificate { path });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(read)?;
        Ok(ClientCert { chain, key, path })
    }

    /// The end-entity certificate (the chain's first; never empty).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// Trust in one CA, shared by every client config made from it.
#[derive(Clone)]
pub struct Trust {
    provider: Arc<CryptoProvider>,
    verifier: Arc<WebPkiServerVerifier>,
}

impl Trust {
    /// Trusts the CA certificate(s) in the PEM file `ca`.
    pub fn from_ca_file(ca: &Path) -> Result<Trust, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca)?), provider.clone())
                .build()
                .map_err(|source| Error::Verifier {
                    path: ca.to_owned(),
                    source,
                })?;
        Ok(Trust { provider, verifier })
    }

    /// A client presenting `identity`, or no certificate at all (`None`).
    /// rustls' defaults otherwise (session resumption included).
    pub fn client(&self, identity: Option<ClientCert>) -> Result<ClientConfig, Error> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(Error::Provider)?
            .with_webpki_verifier(self.verifier.clone());
        match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain, id.key)
                .map_err(|source| Error::Rustls {
                    path: id.path,
                    source,
                }),
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

/// A client of the PKI in `pki_dir` (trusting its `ca.crt`) as identity `id`
/// (`<id>.crt`, `<id>.key`).
pub fn config(pki_dir: &Path, id: &str) -> Result<ClientConfig, Error> {
    let identity = ClientCert::from_pem_files(
        &pki_dir.join(format!("{id}.crt")),
        &pki_dir.join(format!("{id}.key")),
    )?;
    Trust::from_ca_file(&pki_dir.join(CA_CERT_FILE))?.client(Some(identity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Pki;
    use cityplane_proto::Role;

    #[test]
    fn a_config_is_built_for_an_issued_identity_and_refused_for_a_missing_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::init(dir.path(), false).expect("init");
        pki.issue(Role::Operator, "op1").expect("issue");
        let config = config(dir.path(), "op1").expect("config");
        assert!(config.client_auth_cert_resolver.has_certs());
        let err = config_err(dir.path(), "nobody");
        assert!(
            matches!(&err, Error::Read { path, .. } if path.ends_with("nobody.crt")),
            "{err}"
        );
        let anonymous = Trust::from_ca_file(&dir.path().join(CA_CERT_FILE))
            .and_then(|t| t.client(None))
            .expect("anonymous");
        assert!(!anonymous.client_auth_cert_resolver.has_certs());
    }

    fn config_err(dir: &Path, id: &str) -> Error {
        match config(dir, id) {
            Ok(_) => panic!("a config for {id} without a certificate"),
            Err(e) => e,
        }
    }
}
