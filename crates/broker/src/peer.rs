//! HTTP requests to a peer cluster's admin API with the credentials and TLS settings of its
//! registration.
//!
//! Every call a cluster makes to another one goes through [`Peer::request`]: replicators
//! creating the remote topic, configure-once propagation, replicated-subscription state posts,
//! tenant migration; so does the lookup front door with its own token. A registration's
//! credentials are Pulsar's cluster-data fields (`authenticationParameters`, read as the
//! `AuthenticationToken` plugin reads them); the token goes as `Authorization: Bearer`.
//!
//! TLS: with `brokerClientTlsEnabled` the peer is called at its `serviceUrlTls`, trusting
//! `brokerClientTrustCertsFilePath` (or everything, with `tlsAllowInsecureConnection`) and
//! presenting `brokerClientCertificateFilePath` / `brokerClientKeyFilePath` if set, as Pulsar's
//! brokers do. A `serviceUrl` that is itself `https://` is called with the same settings.
//! One `ureq` agent per caller ([`PeerAgent`]) keeps a TLS variant per set of settings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meridian_client::TlsOptions;

use crate::resources::ClusterData;

/// A peer's admin API, the token it is called with and the TLS settings of `https://`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// `http://host:port` or `https://host:port`, without a trailing `/`.
    pub service_url: String,
    pub auth_token: Option<String>,
    /// Used when `service_url` is `https://`.
    pub tls: TlsOptions,
}

impl Peer {
    pub fn new(service_url: &str, auth_token: Option<String>) -> Peer {
        Peer {
            service_url: service_url.trim_end_matches('/').to_string(),
            auth_token,
            tls: TlsOptions::default(),
        }
    }

    /// The same peer, with these TLS settings for `https://`.
    pub fn with_tls(mut self, tls: TlsOptions) -> Peer {
        self.tls = tls;
        self
    }

    /// The peer as `data` registers cluster `name`; `None` without a `serviceUrl` (or without
    /// a `serviceUrlTls` when `brokerClientTlsEnabled`).
    pub fn of(name: &str, data: &ClusterData) -> Option<Peer> {
        let tls = ClusterTls::of(data);
        let service_url = tls.service_url(data)?;
        Some(Peer::new(&service_url, auth_token_of(name, data)).with_tls(tls.options))
    }

    /// The full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.service_url)
    }

    /// `method path` on the peer, with its credentials, on `agent`'s variant for its TLS
    /// settings.
    pub fn request(&self, agent: &PeerAgent, method: &str, path: &str) -> ureq::Request {
        let request = agent.agent(self).request(method, &self.url(path));
        match &self.auth_token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
    }
}

/// Redirects (307/308) a peer call follows.
const MAX_REDIRECTS: usize = 3;

impl Peer {
    /// `method path` with `body` (content type and text) if any, following 307 and 308 with the
    /// same method, body and credentials: a cluster-mode peer answers a call only the bundle's
    /// owner serves (topic calls, a replicated subscription's state) with a redirect to the
    /// owner, which ureq follows for GET only. Blocking. Answers as ureq's `call` does, so that
    /// callers match refusals as `ureq::Error::Status`.
    #[allow(clippy::result_large_err)]
    pub fn call(
        &self,
        agent: &PeerAgent,
        method: &str,
        path: &str,
        body: Option<(&str, &str)>,
    ) -> Result<ureq::Response, ureq::Error> {
        let mut url = self.url(path);
        for _ in 0..=MAX_REDIRECTS {
            let target = Peer {
                service_url: origin_of(&url).to_string(),
                ..self.clone()
            };
            let mut request = agent.agent(&target).request(method, &url);
            if let Some(token) = &self.auth_token {
                request = request.set("Authorization", &format!("Bearer {token}"));
            }
            let response = match body {
                Some((content_type, text)) => request
                    .set("Content-Type", content_type)
                    .send_string(text)?,
                None => request.call()?,
            };
            match response.header("Location") {
                Some(location) if matches!(response.status(), 307 | 308) => {
                    if !keeps_tls(&url, location) {
                        // The token (and the body) would cross the network in the clear.
                        let refusal = format!("refused a redirect from HTTPS to {location}");
                        return Err(ureq::Error::Status(
                            502,
                            ureq::Response::new(502, "Bad Gateway", &refusal)?,
                        ));
                    }
                    url = location.to_string();
                }
                _ => return Ok(response),
            }
        }
        Err(ureq::Error::Status(
            508,
            ureq::Response::new(508, "Loop Detected", "more than 3 redirects")?,
        ))
    }
}

/// Whether a redirect from `url` to `location` keeps TLS when `url` had it: a call made over
/// HTTPS is never sent on over plain HTTP.
fn keeps_tls(url: &str, location: &str) -> bool {
    let https = |url: &str| {
        url.get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    };
    !https(url) || https(location)
}

/// `scheme://host:port` of a URL.
fn origin_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    match url[after_scheme..].find('/') {
        Some(slash) => &url[..after_scheme + slash],
        None => url,
    }
}

/// The TLS part of a cluster registration (Pulsar's cluster-data fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterTls {
    /// `brokerClientTlsEnabled`: reach the cluster at its TLS URLs.
    pub enabled: bool,
    /// `brokerClientTrustCertsFilePath`, `tlsAllowInsecureConnection`,
    /// `brokerClientCertificateFilePath`, `brokerClientKeyFilePath`.
    pub options: TlsOptions,
}

impl ClusterTls {
    pub fn of(data: &ClusterData) -> ClusterTls {
        let flag = |field: &str| match data.other.get(field) {
            Some(serde_json::Value::Bool(value)) => *value,
            Some(serde_json::Value::String(value)) => value.eq_ignore_ascii_case("true"),
            _ => false,
        };
        let path = |field: &str| {
            data.other
                .get(field)
                .and_then(serde_json::Value::as_str)
                .map(str::trim)
                .filter(|path| !path.is_empty())
                .map(std::path::PathBuf::from)
        };
        ClusterTls {
            enabled: flag("brokerClientTlsEnabled"),
            options: TlsOptions {
                trust_certs_file: path("brokerClientTrustCertsFilePath"),
                allow_insecure: flag("tlsAllowInsecureConnection"),
                certificate_file: path("brokerClientCertificateFilePath"),
                key_file: path("brokerClientKeyFilePath"),
            },
        }
    }

    /// The admin URL to call: `serviceUrlTls` when enabled, `serviceUrl` otherwise.
    pub fn service_url(&self, data: &ClusterData) -> Option<String> {
        non_empty(match self.enabled {
            true => &data.service_url_tls,
            false => &data.service_url,
        })
    }

    /// The broker URL to replicate to: `brokerServiceUrlTls` when enabled, else `brokerServiceUrl`.
    pub fn broker_service_url(&self, data: &ClusterData) -> Option<String> {
        non_empty(match self.enabled {
            true => &data.broker_service_url_tls,
            false => &data.broker_service_url,
        })
    }
}

fn non_empty(value: &Option<String>) -> Option<String> {
    value.clone().filter(|url| !url.is_empty())
}

/// How many TLS variants one [`PeerAgent`] keeps (one per distinct set of settings in use;
/// beyond this the oldest are dropped and rebuilt when needed).
const MAX_TLS_AGENTS: usize = 64;

type Configure = dyn Fn(ureq::AgentBuilder) -> ureq::AgentBuilder + Send + Sync;

/// The HTTP client of calls to peers: one `ureq` agent for plain `http://` and one per set of
/// TLS settings for `https://`, all configured alike (timeouts, redirects, idle connections)
/// and each keeping its connections for reuse. A TLS variant whose files do not load is not
/// kept: its requests fail with the reason, and the next request tries the files again.
pub struct PeerAgent {
    configure: Box<Configure>,
    plain: ureq::Agent,
    tls: Mutex<HashMap<TlsOptions, ureq::Agent>>,
}

impl PeerAgent {
    /// `configure` sets up every agent (`|builder| builder.timeout(...)`).
    pub fn new(
        configure: impl Fn(ureq::AgentBuilder) -> ureq::AgentBuilder + Send + Sync + 'static,
    ) -> PeerAgent {
        PeerAgent {
            plain: configure(ureq::AgentBuilder::new()).build(),
            configure: Box::new(configure),
            tls: Mutex::default(),
        }
    }

    fn agent(&self, peer: &Peer) -> ureq::Agent {
        if !peer.service_url.starts_with("https://") {
            return self.plain.clone();
        }
        let mut agents = self
            .tls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(agent) = agents.get(&peer.tls) {
            return agent.clone();
        }
        match peer.tls.https_connector() {
            Ok(connector) => {
                let agent =
                    (self.configure)(ureq::AgentBuilder::new().tls_connector(connector)).build();
                if agents.len() >= MAX_TLS_AGENTS {
                    agents.clear();
                }
                agents.insert(peer.tls.clone(), agent.clone());
                agent
            }
            Err(error) => (self.configure)(
                ureq::AgentBuilder::new().tls_connector(Arc::new(Unusable(error.to_string()))),
            )
            .build(),
        }
    }
}

/// TLS settings that do not load: every connection fails with why.
struct Unusable(String);

impl ureq::TlsConnector for Unusable {
    fn connect(
        &self,
        _dns_name: &str,
        _io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, self.0.clone()).into())
    }
}

/// The token in a cluster registration's `authenticationParameters`, if any (an unreadable one
/// is logged and ignored: the peer then refuses the calls, which their callers report).
pub fn auth_token_of(name: &str, data: &ClusterData) -> Option<String> {
    let parameters = data
        .other
        .get("authenticationParameters")
        .and_then(serde_json::Value::as_str)
        .filter(|parameters| !parameters.trim().is_empty())?;
    match meridian_auth::token_from_parameters(parameters) {
        Ok(token) => Some(token),
        Err(error) => {
            tracing::warn!(cluster = %name, %error, "cannot read the cluster's authenticationParameters");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_never_takes_a_call_from_https_to_http() {
        let from = "https://a.example:8443/admin/v2/persistent/t/ns/x";
        assert!(keeps_tls(
            from,
            "https://b.example:8443/admin/v2/persistent/t/ns/x"
        ));
        assert!(keeps_tls(from, "HTTPS://b.example:8443/x"));
        assert!(!keeps_tls(
            from,
            "http://b.example:8080/admin/v2/persistent/t/ns/x"
        ));
        assert!(keeps_tls(
            "http://a.example:8080/x",
            "http://b.example:8080/x"
        ));
        assert!(keeps_tls(
            "http://a.example:8080/x",
            "https://b.example:8443/x"
        ));
    }

    fn registration(fields: serde_json::Value) -> ClusterData {
        serde_json::from_value(fields).expect("cluster data")
    }

    #[test]
    fn tls_registrations_are_reached_at_their_tls_urls() {
        let data = registration(serde_json::json!({
            "serviceUrl": "http://west:8080", "serviceUrlTls": "https://west:8443",
            "brokerServiceUrl": "pulsar://west:6650", "brokerServiceUrlTls": "pulsar+ssl://west:6651",
            "brokerClientTlsEnabled": true,
            "brokerClientTrustCertsFilePath": "/etc/ca.pem",
            "brokerClientCertificateFilePath": "/etc/client.pem",
            "brokerClientKeyFilePath": "/etc/client.key"
        }));
        let tls = ClusterTls::of(&data);
        assert!(tls.enabled);
        assert_eq!(
            tls.broker_service_url(&data).as_deref(),
            Some("pulsar+ssl://west:6651")
        );
        let peer = Peer::of("west", &data).expect("peer");
        assert_eq!(peer.service_url, "https://west:8443");
        assert_eq!(
            peer.tls,
            TlsOptions {
                trust_certs_file: Some("/etc/ca.pem".into()),
                allow_insecure: false,
                certificate_file: Some("/etc/client.pem".into()),
                key_file: Some("/etc/client.key".into()),
            }
        );

        // Without the flag, the plain URLs, as Pulsar does.
        let plain = registration(serde_json::json!({
            "serviceUrl": "http://west:8080", "serviceUrlTls": "https://west:8443",
            "brokerServiceUrl": "pulsar://west:6650", "brokerServiceUrlTls": "pulsar+ssl://west:6651",
            "tlsAllowInsecureConnection": "true"
        }));
        let tls = ClusterTls::of(&plain);
        assert!(!tls.enabled && tls.options.allow_insecure);
        assert_eq!(
            Peer::of("west", &plain).map(|peer| peer.service_url),
            Some("http://west:8080".to_string())
        );

        // Enabled without TLS URLs: nothing to call.
        let missing = registration(serde_json::json!({
            "serviceUrl": "http://west:8080", "brokerServiceUrl": "pulsar://west:6650",
            "brokerClientTlsEnabled": true
        }));
        assert_eq!(Peer::of("west", &missing), None);
        assert_eq!(ClusterTls::of(&missing).broker_service_url(&missing), None);
    }

    #[test]
    fn unusable_tls_settings_fail_the_request_with_the_reason() {
        // A listener that never answers: the TCP connection opens, TLS is where it stops.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let agent = PeerAgent::new(|builder| builder);
        let peer = Peer::new(&format!("https://{address}"), None).with_tls(TlsOptions {
            trust_certs_file: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        });
        let error = peer.request(&agent, "GET", "/admin/v2/clusters").call();
        let error = error
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
        assert!(agent
            .tls
            .lock()
            .map(|agents| agents.is_empty())
            .unwrap_or(false));
    }
}
