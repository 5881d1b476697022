//! HTTP requests to a peer cluster's admin API with the credentials of its registration.
//!
//! Every call a cluster makes to another one goes through [`Peer::request`]: replicators
//! creating the remote topic, configure-once propagation, replicated-subscription state posts,
//! tenant migration; so does the lookup front door with its own token. A registration's
//! credentials are Pulsar's cluster-data fields (`authenticationParameters`, read as the
//! `AuthenticationToken` plugin reads them); the token goes as `Authorization: Bearer`.

use crate::resources::ClusterData;

/// A peer's admin API and the token it is called with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    /// `http://host:port`, without a trailing `/`.
    pub service_url: String,
    pub auth_token: Option<String>,
}

impl Peer {
    pub fn new(service_url: &str, auth_token: Option<String>) -> Peer {
        Peer {
            service_url: service_url.trim_end_matches('/').to_string(),
            auth_token,
        }
    }

    /// The peer as `data` registers cluster `name`; `None` without a `serviceUrl`.
    pub fn of(name: &str, data: &ClusterData) -> Option<Peer> {
        let service_url = data.service_url.as_deref().filter(|url| !url.is_empty())?;
        Some(Peer::new(service_url, auth_token_of(name, data)))
    }

    /// The full URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.service_url)
    }

    /// `method path` on the peer, with its credentials.
    pub fn request(&self, agent: &ureq::Agent, method: &str, path: &str) -> ureq::Request {
        let request = agent.request(method, &self.url(path));
        match &self.auth_token {
            Some(token) => request.set("Authorization", &format!("Bearer {token}")),
            None => request,
        }
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
