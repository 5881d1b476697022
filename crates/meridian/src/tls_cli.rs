//! TLS options of `meridian admin`, `meridian client` and `meridian perf` for `https://` and
//! `pulsar+ssl://` URLs, named as pulsar-admin and pulsar-client name them.

use std::path::PathBuf;

use clap::Args;
use meridian_client::TlsOptions;

/// `--tls-trust-cert-path`, `--tls-allow-insecure`, `--tls-cert-file` / `--tls-key-file`.
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM file of the CA certificates trusted to sign the server's certificate (Pulsar's
    /// tlsTrustCertsFilePath). Default: the system's CA bundle.
    #[arg(long, global = true, env = "MERIDIAN_TLS_TRUST_CERT_PATH")]
    tls_trust_cert_path: Option<PathBuf>,
    /// Accept any server certificate (no check of who the server is; the connection is
    /// still encrypted). For tests only.
    #[arg(long, global = true, env = "MERIDIAN_TLS_ALLOW_INSECURE")]
    tls_allow_insecure: bool,
    /// PEM certificate presented to the server (mutual TLS), with --tls-key-file.
    #[arg(
        long,
        global = true,
        env = "MERIDIAN_TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(
        long,
        global = true,
        env = "MERIDIAN_TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    tls_key_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The client's TLS settings.
    pub fn options(&self) -> TlsOptions {
        TlsOptions {
            trust_certs_file: self.tls_trust_cert_path.clone(),
            allow_insecure: self.tls_allow_insecure,
            certificate_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
        }
    }
}

/// A hint for an error message about a server certificate that was not accepted (empty for
/// other errors).
pub fn hint(error: &str) -> &'static str {
    // rustls's words for a server certificate this client did not accept.
    if error.contains("not valid for name") || error.contains("NotValidForName") {
        " (the server's certificate does not name the host of the URL: use a name it carries, \
         or skip the check with --tls-allow-insecure)"
    } else if error.contains("invalid peer certificate") {
        " (trust the server's CA with --tls-trust-cert-path, or skip the check with --tls-allow-insecure)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_certificates_get_a_hint_and_other_errors_none() {
        assert!(hint("invalid peer certificate: UnknownIssuer").contains("--tls-trust-cert-path"));
        assert!(hint(
            "invalid peer certificate: certificate not valid for name \"127.0.0.1\"; \
             certificate is only valid for DnsName(\"localhost\")"
        )
        .contains("use a name it carries"));
        assert_eq!(hint("tls_certificate_file_path: no PEM certificate"), "");
        assert_eq!(hint("Connection refused (os error 111)"), "");
    }
}
