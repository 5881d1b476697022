//! Meridian's lookup front door (`meridian lookup`): one service URL for a set of clusters.
//!
//! Clients configured with the front door's URL send it CONNECT, PARTITIONED_METADATA and
//! LOOKUP (or HTTP `/lookup/v2/...` and `/admin/v2/.../partitions`); it answers each topic at
//! its tenant's current home cluster, so the clients follow their tenant through a migration
//! (`docs/migration.md`) without a change of configuration. It holds no data and no state
//! besides a small cache: several copies can run side by side and answer alike.
//!
//! # Layout
//!
//! - [`clusters`]: the member clusters (named by their web URLs), every admin call made to
//!   them, and the forwarding clients (one [`meridian_client::Client`] per binary URL);
//! - [`home`]: the rule that picks a tenant's home (asking its questions through a
//!   `Directory` seam, so the rule is unit-tested without a network), and the bounded cache
//!   of homes;
//! - [`FrontDoor`] (here): a topic's home, then the LOOKUP or PARTITIONED_METADATA forwarded to
//!   it, shared by both listeners;
//! - `binary`: the Pulsar protocol listener (CONNECT/CONNECTED, PING/PONG, LOOKUP,
//!   PARTITIONED_METADATA; any other command gets an ERROR naming what the front door serves);
//! - `http`: `/lookup/v2/topic/...` and `/admin/v2/{domain}/.../partitions`;
//! - [`error`]: [`LookupError`] and its mapping to `ServerError` codes and HTTP statuses.
//!
//! # Why forward instead of answering from the registry
//!
//! A LOOKUP is answered with the answer of the home cluster itself, after following its
//! redirects, as `Connect` with `authoritative = true`. So the broker URL is the one the home
//! advertises for that topic (a cluster with several brokers would name the owner), the home
//! checks the topic name and namespace as it does for its own clients, a home that has just
//! moved the tenant on redirects the lookup to the target even before the cache notices, and a
//! home that is down gives `ServiceNotReady` here instead of a URL the client cannot reach. The
//! cost is one round trip on a connection kept open per cluster.
//!
//! # Limits
//!
//! Connections (total and per IP address) by the accept loop shared with the broker
//! ([`meridian_server::listener`]); frames by `max_frame_size`; requests in flight per
//! connection by `max_pending_lookups_per_connection` (more stop the reading, and the replies
//! queue is sized to match); the cache by `max_cached_tenants`; every call to a cluster by
//! `request_timeout`.

pub mod clusters;
pub mod error;
pub mod home;

mod binary;
mod http;

use std::sync::Arc;
use std::time::Duration;

use meridian_broker::topic_name::is_valid_entity_name;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use clusters::{Cluster, Clusters};
pub use error::LookupError;

/// Settings of `meridian lookup` (each is a command-line flag, `docs/lookup.md`).
#[derive(Debug, Clone)]
pub struct LookupConfig {
    /// Web URLs of the member clusters, in tie-breaking order.
    pub clusters: Vec<String>,
    /// How long a tenant's home is used before it is checked again.
    pub home_fresh_for: Duration,
    /// Tenants whose home is cached at once.
    pub max_cached_tenants: usize,
    /// Deadline of every admin call and forwarded request to a cluster.
    pub request_timeout: Duration,
    /// Binary connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Connections (binary, and HTTP) served at once from one IP address (0: no limit).
    pub max_connections_per_ip: usize,
    /// LOOKUP and PARTITIONED_METADATA requests of one connection being answered at once.
    pub max_pending_lookups_per_connection: usize,
    /// Largest frame accepted; a larger one closes the connection.
    pub max_frame_size: usize,
    /// Idle time before the front door pings a client; twice this without traffic closes it.
    pub keep_alive_interval: Duration,
    /// Time a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// HTTP connections served at once.
    pub http_max_connections: usize,
    /// Time an HTTP client has to send a request's headers (also closes idle connections).
    pub http_header_read_timeout: Duration,
    /// Token the front door's calls to the clusters authenticate with (a super-user's on each
    /// secured cluster: it reads their configuration, tenants and migration records).
    pub auth_token: Option<String>,
    /// TLS settings of the calls to clusters named by `https://` URLs.
    pub tls: meridian_client::TlsOptions,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig {
            clusters: Vec::new(),
            home_fresh_for: Duration::from_millis(500),
            max_cached_tenants: 10_000,
            request_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            max_pending_lookups_per_connection: 1_000,
            max_frame_size: 64 * 1024,
            keep_alive_interval: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            http_max_connections: 2_048,
            http_header_read_timeout: Duration::from_secs(30),
            auth_token: None,
            tls: meridian_client::TlsOptions::default(),
        }
    }
}

/// What both listeners share: the clusters and the homes.
pub struct FrontDoor {
    clusters: Clusters,
    homes: home::HomeCache,
}

/// Where a LOOKUP sends the client.
#[derive(Debug, Clone)]
pub struct Answer {
    /// `pulsar://host:port` of the broker serving the topic (None: it has only a TLS URL).
    pub broker_url: Option<String>,
    /// `pulsar+ssl://host:port` of the broker serving the topic, if it serves TLS.
    pub broker_url_tls: Option<String>,
    /// The home cluster the lookup was forwarded to.
    pub home: Cluster,
}

impl FrontDoor {
    pub fn new(config: &LookupConfig) -> FrontDoor {
        FrontDoor {
            clusters: Clusters::new(
                &config.clusters,
                config.request_timeout,
                config.auth_token.clone(),
                config.tls.clone(),
            ),
            homes: home::HomeCache::new(config.max_cached_tenants, config.home_fresh_for),
        }
    }

    /// The full name of `topic` and its tenant's home.
    pub async fn home_of(&self, topic: &str) -> Result<(String, Cluster), LookupError> {
        let (topic, tenant) = topic_and_tenant(topic)?;
        let home = self
            .homes
            .home(&tenant, |known| {
                home::resolve(&self.clusters, &tenant, known)
            })
            .await?;
        Ok((topic, home))
    }

    /// LOOKUP of `topic`, forwarded to its home.
    pub async fn lookup(&self, topic: &str) -> Result<Answer, LookupError> {
        let (topic, home) = self.home_of(topic).await?;
        let client = self.clusters.client(&home).await?;
        let urls = client
            .lookup_urls(&topic)
            .await
            .map_err(|error| forwarded(&home, error))?;
        Ok(Answer {
            broker_url: urls.broker_service_url,
            broker_url_tls: urls.broker_service_url_tls,
            home,
        })
    }

    /// PARTITIONED_METADATA of `topic`, forwarded to its home.
    pub async fn partitions(&self, topic: &str) -> Result<u32, LookupError> {
        let (topic, home) = self.home_of(topic).await?;
        let client = self.clusters.client(&home).await?;
        client
            .partitions(&topic)
            .await
            .map_err(|error| forwarded(&home, error))
    }
}

/// A forwarded request's failure: the home's own error code, or the home unreachable.
fn forwarded(home: &Cluster, error: meridian_client::Error) -> LookupError {
    match error.server_error() {
        Some(code) => LookupError::Home {
            cluster: home.name.clone(),
            code,
            message: error.to_string(),
        },
        None => LookupError::Unreachable {
            cluster: format!("{} ({})", home.name, home.broker_url),
            reason: error.to_string(),
        },
    }
}

/// The normalised name of `topic` and its tenant.
fn topic_and_tenant(topic: &str) -> Result<(String, String), LookupError> {
    let invalid = |reason: String| LookupError::InvalidTopic {
        topic: topic.chars().take(256).collect(),
        reason,
    };
    let full =
        meridian_client::normalize_topic(topic).map_err(|error| invalid(error.to_string()))?;
    let tenant = full
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .unwrap_or_default()
        .to_string();
    if !is_valid_entity_name(&tenant) {
        return Err(invalid(format!("invalid tenant name {tenant:?}")));
    }
    Ok((full, tenant))
}

/// Locks `mutex`, whose holders never leave its data half-changed, even if one panicked.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Serves the binary protocol on `binary` and HTTP on `web` until `shutdown` is cancelled and
/// the connections in progress are done.
pub async fn serve(
    config: LookupConfig,
    binary: TcpListener,
    web: TcpListener,
    shutdown: CancellationToken,
) {
    let front_door = Arc::new(FrontDoor::new(&config));
    let config = Arc::new(config);
    tokio::join!(
        binary::serve(binary, front_door.clone(), config.clone(), shutdown.clone()),
        http::serve(web, front_door, config, shutdown),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_names_its_tenant_in_every_form() {
        for (topic, tenant) in [
            ("orders", "public"),
            ("acme/ns/orders", "acme"),
            ("persistent://acme/ns/orders-partition-3", "acme"),
            ("non-persistent://acme/ns/orders", "acme"),
        ] {
            assert_eq!(topic_and_tenant(topic).expect(topic).1, tenant);
        }
        for topic in ["", "a/b", "persistent://ac%me/ns/t", "http://a/b/c"] {
            assert!(topic_and_tenant(topic).is_err(), "{topic}");
        }
    }
}
