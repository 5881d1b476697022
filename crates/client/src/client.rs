//! The client: settings, the connection pool, and the builders of producers,
//! consumers and readers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::connection::{AuthToken, ConnectionSettings};
use crate::consumer::ConsumerBuilder;
use crate::error::Result;
use crate::pool::{parse_service_url, ConnectionPool};
use crate::producer::ProducerBuilder;
use crate::reader::ReaderBuilder;
use crate::tls::TlsOptions;
use crate::topic::normalize_topic;

/// A Pulsar client: cheap to clone, and every clone shares one connection
/// pool. Producers, consumers and readers keep the pool alive while they run.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

/// What producers and consumers share.
pub(crate) struct ClientInner {
    pub(crate) pool: ConnectionPool,
    /// Producer and consumer ids: unique across the client, so an id stays
    /// the same for the life of its producer or consumer on every connection.
    next_id: AtomicU64,
    pub(crate) operation_timeout: Duration,
    pub(crate) backoff_initial: Duration,
    pub(crate) backoff_max: Duration,
    /// The owners of the topics replicated-subscription states went to.
    pub(crate) state_owners: crate::subscription_state::Owners,
}

impl ClientInner {
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Settings of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    service_url: String,
    operation_timeout: Duration,
    connect_timeout: Duration,
    keep_alive_interval: Duration,
    max_lookup_redirects: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
    outbound_queue: usize,
    max_pending_requests: usize,
    proxy_url: Option<String>,
    auth_token: Option<AuthToken>,
    tls: TlsOptions,
}

impl ClientBuilder {
    /// How long a request (lookup, subscribe, create producer, seek, ...)
    /// waits for its reply. Default 30 s.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// How long opening a TCP connection and its handshake may take. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// PING interval; a connection silent for two intervals is closed. Default 30 s.
    pub fn keep_alive_interval(mut self, interval: Duration) -> Self {
        self.keep_alive_interval = interval;
        self
    }

    /// Lookup redirects followed before giving up. Default 20.
    pub fn max_lookup_redirects(mut self, redirects: u32) -> Self {
        self.max_lookup_redirects = redirects;
        self
    }

    /// Reconnection backoff: first delay and cap. Default 100 ms and 30 s.
    pub fn reconnect_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff_initial = initial;
        self.backoff_max = max;
        self
    }

    /// Frames queued per connection before senders wait. Default 1024.
    pub fn outbound_queue(mut self, frames: usize) -> Self {
        self.outbound_queue = frames;
        self
    }

    /// Requests awaiting a reply per connection before new ones are refused.
    /// Default 50,000 (Pulsar's `maxLookupRequest`).
    pub fn max_pending_requests(mut self, requests: usize) -> Self {
        self.max_pending_requests = requests;
        self
    }

    /// Sends every connection through a proxy at `url` (`pulsar://host:port`),
    /// telling it which broker each connection is for (CONNECT's
    /// `proxy_to_broker_url`), as Pulsar clients do with a proxy. Replicators
    /// use it for a cluster registered with a `proxyServiceUrl`.
    pub fn proxy_url(mut self, url: impl Into<String>) -> Self {
        self.proxy_url = Some(url.into());
        self
    }

    /// Authenticates every connection with this token (Pulsar's `AuthenticationToken`):
    /// sent in CONNECT and again when the broker challenges for a refresh.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(AuthToken(Arc::from(token.into().trim())));
        self
    }

    /// TLS settings for a `pulsar+ssl://` service URL (what to trust, a client certificate);
    /// unused with `pulsar://`. Default: the system's CA bundle, no client certificate.
    pub fn tls(mut self, options: TlsOptions) -> Self {
        self.tls = options;
        self
    }

    /// Checks the settings and creates the client. Connections open lazily,
    /// on the first lookup.
    pub async fn build(self) -> Result<Client> {
        let service = parse_service_url(&self.service_url)?;
        let proxy = match &self.proxy_url {
            Some(url) => {
                let mut proxy = parse_service_url(url)?;
                if proxy.addresses.len() != 1 {
                    return Err(crate::error::Error::InvalidServiceUrl {
                        url: url.clone(),
                        reason: "a proxy URL names exactly one host:port",
                    });
                }
                if proxy.tls != service.tls {
                    return Err(crate::error::Error::InvalidServiceUrl {
                        url: url.clone(),
                        reason: "a proxy URL must be TLS (pulsar+ssl://) exactly when the service URL is",
                    });
                }
                proxy.addresses.pop()
            }
            None => None,
        };
        let tls = match service.tls {
            true => Some(
                self.tls
                    .client_config()
                    .map_err(|error| crate::error::Error::Tls {
                        address: self.service_url.clone(),
                        reason: error.0,
                    })?,
            ),
            false => None,
        };
        let settings = ConnectionSettings {
            connect_timeout: self.connect_timeout,
            operation_timeout: self.operation_timeout,
            keep_alive_interval: self.keep_alive_interval.max(Duration::from_millis(100)),
            outbound_queue: self.outbound_queue.max(1),
            max_pending_requests: self.max_pending_requests.max(1),
            auth_token: self.auth_token.clone(),
            tls,
        };
        Ok(Client {
            inner: Arc::new(ClientInner {
                pool: ConnectionPool::new(
                    settings,
                    service.addresses,
                    self.max_lookup_redirects,
                    proxy,
                ),
                next_id: AtomicU64::new(0),
                operation_timeout: self.operation_timeout,
                backoff_initial: self.backoff_initial,
                backoff_max: self.backoff_max,
                state_owners: Default::default(),
            }),
        })
    }
}

impl Client {
    /// Settings for a client of the broker(s) at `service_url`
    /// (`pulsar://host:port`, or several `host:port` separated by commas; `pulsar+ssl://` for
    /// TLS, see [`ClientBuilder::tls`]).
    pub fn builder(service_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            service_url: service_url.into(),
            operation_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(30),
            max_lookup_redirects: 20,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            outbound_queue: 1024,
            max_pending_requests: 50_000,
            proxy_url: None,
            auth_token: None,
            tls: TlsOptions::default(),
        }
    }

    /// A producer for `topic` (short names are expanded as Pulsar does).
    pub fn producer(&self, topic: impl Into<String>) -> ProducerBuilder {
        ProducerBuilder::new(self.clone(), topic.into())
    }

    /// A consumer of `topic`.
    pub fn consumer(&self, topic: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder::new(self.clone(), topic.into())
    }

    /// A reader of `topic`: a consumer on a non-durable subscription.
    pub fn reader(&self, topic: impl Into<String>) -> ReaderBuilder {
        ReaderBuilder::new(self.clone(), topic.into())
    }

    /// The number of partitions of `topic`; 0 for a topic that is not partitioned.
    pub async fn partitions(&self, topic: &str) -> Result<u32> {
        let topic = normalize_topic(topic)?;
        self.inner.pool.partitions(&topic).await
    }

    /// The `host:port` of the broker that serves `topic`, after redirects.
    pub async fn lookup(&self, topic: &str) -> Result<String> {
        let topic = normalize_topic(topic)?;
        Ok(self.inner.pool.lookup(&topic).await?.logical)
    }

    /// The URLs of the broker that serves `topic` as its final lookup answer names them
    /// (`pulsar://` and, if it has one, `pulsar+ssl://`).
    pub async fn lookup_urls(&self, topic: &str) -> Result<crate::pool::BrokerUrls> {
        let topic = normalize_topic(topic)?;
        let (_, mut urls) = self.inner.pool.lookup_answer(&topic).await?;
        for url in [
            &mut urls.broker_service_url,
            &mut urls.broker_service_url_tls,
        ] {
            if url.as_deref().is_some_and(str::is_empty) {
                *url = None;
            }
        }
        Ok(urls)
    }

    /// Closes every connection. Producers and consumers still open will try
    /// to reconnect; close them first.
    pub async fn close(&self) {
        self.inner.pool.close_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[tokio::test]
    async fn tls_settings_are_checked_when_the_client_is_built() {
        let missing_trust = TlsOptions {
            trust_certs_file: Some("/nonexistent/ca.pem".into()),
            ..TlsOptions::default()
        };
        let built = Client::builder("pulsar+ssl://127.0.0.1:6651")
            .tls(missing_trust.clone())
            .build()
            .await;
        assert!(
            matches!(&built, Err(Error::Tls { reason, .. }) if reason.contains("/nonexistent/ca.pem")),
            "{:?}",
            built.err()
        );
        // A plain service URL does not use (or read) the TLS settings.
        assert!(Client::builder("pulsar://127.0.0.1:6650")
            .tls(missing_trust)
            .build()
            .await
            .is_ok());

        // A proxy must speak what the service URL speaks.
        let insecure = TlsOptions {
            allow_insecure: true,
            ..TlsOptions::default()
        };
        let mixed = Client::builder("pulsar+ssl://127.0.0.1:6651")
            .tls(insecure.clone())
            .proxy_url("pulsar://127.0.0.1:6650")
            .build()
            .await;
        assert!(matches!(mixed, Err(Error::InvalidServiceUrl { .. })));
        assert!(Client::builder("pulsar+ssl://127.0.0.1:6651")
            .tls(insecure)
            .proxy_url("pulsar+ssl://127.0.0.1:7651")
            .build()
            .await
            .is_ok());
    }
}
