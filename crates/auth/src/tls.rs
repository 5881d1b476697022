//! TLS for both ports: a rustls server configuration whose certificate and key come from PEM
//! files and are reloaded when either file changes (checked at each handshake by modification
//! time; a pair that does not load is logged and the previous one kept).

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::AuthError;

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
}

/// Reads a certificate chain and its private key (PEM) into a rustls key.
pub fn load_certified_key(certificate: &Path, key: &Path) -> Result<CertifiedKey, AuthError> {
    let open = |path: &Path| {
        std::fs::File::open(path)
            .map(BufReader::new)
            .map_err(|error| AuthError::Key(format!("{}: {error}", path.display())))
    };
    let certificates = rustls_pemfile::certs(&mut open(certificate)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| AuthError::Key(format!("{}: {error}", certificate.display())))?;
    if certificates.is_empty() {
        return Err(AuthError::Key(format!(
            "{}: no PEM certificate",
            certificate.display()
        )));
    }
    let private_key = rustls_pemfile::private_key(&mut open(key)?)
        .map_err(|error| AuthError::Key(format!("{}: {error}", key.display())))?
        .ok_or_else(|| AuthError::Key(format!("{}: no PEM private key", key.display())))?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&private_key)
        .map_err(|error| AuthError::Key(format!("{}: {error}", key.display())))?;
    Ok(CertifiedKey::new(certificates, signing_key))
}

/// The current certificate, reloaded when its files change.
#[derive(Debug)]
struct ReloadingCertificate {
    certificate: PathBuf,
    key: PathBuf,
    current: Mutex<(Option<SystemTime>, Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let stamps = (modified(&self.certificate), modified(&self.key));
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if (current.0, current.1) != stamps {
            match load_certified_key(&self.certificate, &self.key) {
                Ok(key) => {
                    tracing::info!(certificate = %self.certificate.display(), "TLS certificate reloaded");
                    *current = (stamps.0, stamps.1, Arc::new(key));
                }
                Err(error) => {
                    // Keep serving the previous pair; try again at the next change.
                    tracing::warn!(%error, "TLS certificate changed but does not load; keeping the previous one");
                    current.0 = stamps.0;
                    current.1 = stamps.1;
                }
            }
        }
        Some(current.2.clone())
    }
}

/// A rustls server configuration for these PEM files (loaded now, so a bad pair fails at
/// startup), offering `alpn` protocols if any. With `client_ca` (PEM certificates), every client
/// must present a certificate issued by one of them (mutual TLS).
pub fn server_config(
    certificate: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, AuthError> {
    let loaded = load_certified_key(certificate, key)?;
    let resolver = ReloadingCertificate {
        certificate: certificate.to_path_buf(),
        key: key.to_path_buf(),
        current: Mutex::new((modified(certificate), modified(key), Arc::new(loaded))),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| AuthError::Key(format!("TLS: {error}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let file = std::fs::File::open(path)
                .map_err(|error| AuthError::Key(format!("{}: {error}", path.display())))?;
            for certificate in rustls_pemfile::certs(&mut BufReader::new(file)) {
                let certificate = certificate
                    .map_err(|error| AuthError::Key(format!("{}: {error}", path.display())))?;
                roots
                    .add(certificate)
                    .map_err(|error| AuthError::Key(format!("{}: {error}", path.display())))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|error| AuthError::Key(format!("{}: {error}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Why a failed TLS handshake refused the client's credentials: no client certificate, or one
/// not issued by the trusted CAs, where mutual TLS requires one. None for other failures (a
/// client that does not trust this server, a port scan, a timeout): not the client's
/// credentials.
pub fn client_certificate_refusal(error: &std::io::Error) -> Option<String> {
    let error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    match error {
        rustls::Error::NoCertificatesPresented => {
            Some("no client certificate (mutual TLS requires one)".into())
        }
        rustls::Error::InvalidCertificate(_) => {
            Some(format!("client certificate refused: {error}"))
        }
        _ => None,
    }
}
