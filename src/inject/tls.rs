//! The webhook's certificate: PEM loading with ring, reloaded when cert-manager rotates the
//! mounted files, and the rustls server configuration around it. Calls nothing else of the
//! injector but its errors.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::error::{InjectError, TlsDefect};

/// Loads a PEM chain and key into a [`CertifiedKey`] signed with ring (the provider async-nats
/// already links, so the binary carries one TLS crypto library).
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, InjectError> {
    let cert_pem = std::fs::read(cert).map_err(|source| InjectError::ReadTls { path: cert.into(), source })?;
    let key_pem = std::fs::read(key).map_err(|source| InjectError::ReadTls { path: key.into(), source })?;
    let bad_cert = |defect| InjectError::BadTls { path: cert.into(), defect };
    let bad_key = |defect| InjectError::BadTls { path: key.into(), defect };
    let chain = CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| bad_cert(TlsDefect::Pem(e)))?;
    if chain.is_empty() {
        return Err(bad_cert(TlsDefect::NoCertificate));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| bad_key(TlsDefect::Pem(e)))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| bad_key(TlsDefect::UnusableKey(e)))?;
    Ok(CertifiedKey::new(chain, signer))
}

/// Serves the certificate from files and re-reads them when their mtime changes: cert-manager
/// rotates the Secret in place and the kubelet swaps the mounted files, and a webhook still
/// presenting the old certificate would fail every admission once it expires.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<(Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ReloadingCert {
    /// Loads the files once; a failure here is fatal, later failures keep the last good pair.
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, InjectError> {
        let loaded = Arc::new(load_certified_key(&cert, &key)?);
        let stamp = Self::stamp(&cert, &key);
        Ok(Self { cert, key, state: Mutex::new((stamp, loaded)) })
    }

    fn stamp(cert: &Path, key: &Path) -> Option<SystemTime> {
        let c = std::fs::metadata(cert).and_then(|m| m.modified()).ok()?;
        let k = std::fs::metadata(key).and_then(|m| m.modified()).ok()?;
        Some(c.max(k))
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = Self::stamp(&self.cert, &self.key);
        if stamp.is_some() && stamp != state.0 {
            match load_certified_key(&self.cert, &self.key) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "inject: reloaded TLS certificate");
                    *state = (stamp, Arc::new(k));
                }
                // Mid-rotation the key may not match the cert yet; keep serving the old pair.
                Err(e) => {
                    tracing::warn!(error = %e, "inject: TLS reload failed, keeping the previous certificate")
                }
            }
        }
        state.1.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Builds the server TLS configuration (ring, HTTP/1.1 ALPN) over a reloading certificate.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, InjectError> {
    let resolver = ReloadingCert::new(cert.into(), key.into())?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // Only HTTP/1.1 is served; advertising it keeps the API server's Go client from trying h2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
