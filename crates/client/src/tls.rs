//! TLS for connections Meridian opens: `pulsar+ssl://` brokers (this client) and `https://`
//! admin APIs (the HTTP calls of replication, the CLI and the lookup front door, through
//! [`HttpsConnector`], which plugs the same rustls configuration into `ureq`).
//!
//! Trust is one of: the CA certificates of a PEM file (`trust_certs_file`, Pulsar's
//! `tlsTrustCertsFilePath`), the system's CA bundle when no file is given, or nothing at all
//! (`allow_insecure`, Pulsar's `tlsAllowInsecureConnection`: any certificate is accepted, so
//! the connection is encrypted but the peer is not authenticated). Unless insecure, the
//! server's certificate must name the host of the URL (a DNS name, or an IP address in its
//! subject alternative names). A client certificate and key (PEM) make it mutual TLS.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Where system CA bundles usually are, tried in order when no trust file is given (after
/// `SSL_CERT_FILE`).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// TLS settings of a client: what to trust, and an optional client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsOptions {
    /// PEM file of the CA certificates that may sign the server's certificate.
    pub trust_certs_file: Option<PathBuf>,
    /// Accepts any server certificate, for any host (no authentication of the server).
    pub allow_insecure: bool,
    /// PEM certificate chain presented to the server (mutual TLS), with `key_file`.
    pub certificate_file: Option<PathBuf>,
    /// PEM private key of `certificate_file`.
    pub key_file: Option<PathBuf>,
}

/// A TLS setting that cannot be used (a file missing or unreadable, a key without certificate).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

fn file_error(path: &Path, error: impl std::fmt::Display) -> TlsError {
    TlsError(format!("{}: {error}", path.display()))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = std::fs::File::open(path).map_err(|error| file_error(path, error))?;
    let certificates = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(path, error))?;
    if certificates.is_empty() {
        return Err(file_error(path, "no PEM certificate in it"));
    }
    Ok(certificates)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsOptions {
    /// The rustls configuration these settings describe; reads the files now.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError(error.to_string()))?;
        let builder = if self.allow_insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        } else {
            builder.with_root_certificates(self.roots()?)
        };
        let config = match (&self.certificate_file, &self.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(certificate), Some(key)) => {
                let chain = read_certificates(certificate)?;
                let file = std::fs::File::open(key).map_err(|error| file_error(key, error))?;
                let private_key = rustls_pemfile::private_key(&mut BufReader::new(file))
                    .map_err(|error| file_error(key, error))?
                    .ok_or_else(|| file_error(key, "no PEM private key in it"))?;
                builder
                    .with_client_auth_cert(chain, private_key)
                    .map_err(|error| file_error(key, error))?
            }
            _ => {
                return Err(TlsError(
                    "a client certificate needs both its certificate file and its key file".into(),
                ))
            }
        };
        Ok(Arc::new(config))
    }

    /// The trusted CAs: the trust file's, or the system's.
    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let path = match &self.trust_certs_file {
            Some(path) => path.clone(),
            None => system_ca_bundle().ok_or_else(|| {
                TlsError(
                    "no trust certificate file given and no system CA bundle found \
                     (set the trust certificate file, or SSL_CERT_FILE)"
                        .into(),
                )
            })?,
        };
        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_certificates(&path)? {
            roots
                .add(certificate)
                .map_err(|error| file_error(&path, error))?;
        }
        Ok(roots)
    }

    /// A `ureq` TLS connector with these settings (for `https://`).
    pub fn https_connector(&self) -> Result<Arc<HttpsConnector>, TlsError> {
        Ok(Arc::new(HttpsConnector {
            config: self.client_config()?,
        }))
    }
}

fn system_ca_bundle() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(SYSTEM_CA_BUNDLES.iter().map(PathBuf::from))
        .find(|path| path.is_file())
}

/// The name a server's certificate must carry for `host` (a `host:port`'s host part, an IPv6
/// address with or without its brackets).
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host
        .strip_prefix('[')
        .and_then(|host| host.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(host.to_string())
        .map_err(|_| TlsError(format!("{host:?} is not a valid host name for TLS")))
}

/// The host part of `host:port` (brackets of an IPv6 address kept).
pub(crate) fn host_of(address: &str) -> &str {
    match address.rfind(':') {
        Some(colon) if !address[colon..].contains(']') => &address[..colon],
        _ => address,
    }
}

/// `allow_insecure`: every certificate is accepted; the handshake's signatures are still
/// checked (they prove the peer holds the key of the certificate it sent, nothing more).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `https://` for `ureq` with a rustls configuration: give it to
/// `ureq::AgentBuilder::tls_connector`.
pub struct HttpsConnector {
    config: Arc<rustls::ClientConfig>,
}

impl ureq::TlsConnector for HttpsConnector {
    fn connect(
        &self,
        dns_name: &str,
        mut io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let invalid = |message: String| {
            ureq::Error::from(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                message,
            ))
        };
        let name = server_name(dns_name).map_err(|error| invalid(error.to_string()))?;
        let mut connection = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(|error| invalid(format!("TLS: {error}")))?;
        while connection.is_handshaking() {
            connection.complete_io(&mut io).map_err(|error| {
                ureq::Error::from(std::io::Error::new(
                    error.kind(),
                    format!("TLS handshake with {dns_name} failed: {error}"),
                ))
            })?;
        }
        Ok(Box::new(HttpsStream(rustls::StreamOwned::new(
            connection, io,
        ))))
    }
}

struct HttpsStream(rustls::StreamOwned<rustls::ClientConnection, Box<dyn ureq::ReadWrite>>);

impl std::fmt::Debug for HttpsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HttpsStream").field(&self.0.sock).finish()
    }
}

impl ureq::ReadWrite for HttpsStream {
    fn socket(&self) -> Option<&std::net::TcpStream> {
        self.0.sock.socket()
    }
}

impl Read for HttpsStream {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buffer) {
            // A peer that closes without close_notify ends the body as a plain EOF would.
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}

impl Write for HttpsStream {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        self.0.write(buffer)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// A `ureq` agent for `url`: with TLS from `tls` when it is `https://` (the settings are read
/// now, so a bad file fails here), plain otherwise. `configure` sets everything else.
pub fn http_agent(
    url: &str,
    tls: &TlsOptions,
    configure: impl FnOnce(ureq::AgentBuilder) -> ureq::AgentBuilder,
) -> Result<ureq::Agent, TlsError> {
    let builder = ureq::AgentBuilder::new();
    let builder = if url.starts_with("https://") {
        builder.tls_connector(tls.https_connector()?)
    } else {
        builder
    };
    Ok(configure(builder).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_taken_from_addresses() {
        assert_eq!(host_of("broker.example:6651"), "broker.example");
        assert_eq!(host_of("127.0.0.1:6651"), "127.0.0.1");
        assert_eq!(host_of("[::1]:6651"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(matches!(
            server_name("broker.example"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(server_name("not a host").is_err());
    }

    #[test]
    fn unusable_settings_are_refused_with_the_file_named() {
        let missing = TlsOptions {
            trust_certs_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsOptions::default()
        };
        let error = missing.client_config().err().map(|error| error.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|error| error.contains("/nonexistent/ca.pem")),
            "{error:?}"
        );

        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let not_pem = TlsOptions {
            trust_certs_file: Some(empty),
            ..TlsOptions::default()
        };
        assert!(not_pem
            .client_config()
            .is_err_and(|error| error.0.contains("no PEM certificate")));

        let half_pair = TlsOptions {
            allow_insecure: true,
            certificate_file: Some(PathBuf::from("/tmp/cert.pem")),
            ..TlsOptions::default()
        };
        assert!(half_pair
            .client_config()
            .is_err_and(|error| error.0.contains("both")));
    }

    #[test]
    fn insecure_needs_no_file() {
        let insecure = TlsOptions {
            allow_insecure: true,
            ..TlsOptions::default()
        };
        assert!(insecure.client_config().is_ok());
        assert!(http_agent("https://127.0.0.1:8443", &insecure, |builder| builder).is_ok());
        // A plain URL does not read the TLS settings at all.
        let broken = TlsOptions {
            trust_certs_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..TlsOptions::default()
        };
        assert!(http_agent("http://127.0.0.1:8080", &broken, |builder| builder).is_ok());
    }
}
