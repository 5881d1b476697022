//! Meridian's Pulsar protocol server: the TCP listener and one task per connection.
//!
//! The listener is [`listener::accept_loop`] (shared with the HTTP server): a bound on
//! connections, a bound per IP address, and a backoff when accepting fails (out of file
//! descriptors). Shutdown is a cancellation token: the listener stops accepting, every
//! connection stops reading, releases its producers and consumers and drains its outbound
//! queue, and [`serve`] returns once all are done.

mod connection;
pub mod listener;

use std::sync::Arc;
use std::time::Duration;

use meridian_broker::Broker;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use connection::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEP_ALIVE, PROTOCOL_VERSION};
pub use listener::ConnectionLimits;

/// Limits of the protocol server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest frame accepted; a larger one closes the connection (Pulsar: max message size
    /// plus 10 KiB of padding).
    pub max_frame_size: usize,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Connections served at once from one IP address; more are closed at once (0: no limit).
    pub max_connections_per_ip: usize,
    /// Idle time before the broker pings a client; twice this without traffic closes it.
    pub keep_alive_interval: Duration,
    /// Time a new connection has to complete its CONNECT handshake; then it is closed.
    pub connect_timeout: Duration,
    /// Bytes queued for one connection's socket before senders wait and dispatchers skip it.
    pub max_outbound_bytes: usize,
    /// SENDs of one producer awaiting their receipt before the connection stops reading.
    pub max_pending_sends_per_producer: usize,
    /// Producers one connection may hold at once; more are refused (0: no limit).
    pub max_producers_per_connection: usize,
    /// Consumers (readers included) one connection may hold at once; more are refused (0: no
    /// limit).
    pub max_consumers_per_connection: usize,
    /// Durable subscriptions of one topic; a SUBSCRIBE creating one more is refused (0: no
    /// limit).
    pub max_subscriptions_per_topic: usize,
    /// Bytes of large frames (over 64 KiB) all connections may be receiving at once; must be
    /// at least `max_frame_size`.
    pub max_inbound_frame_buffer_bytes: usize,
    /// Authentication, authorization and audit (off by default).
    pub security: Arc<meridian_auth::Security>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame_size: meridian_wire::DEFAULT_MAX_FRAME_SIZE,
            max_connections: 10_000,
            max_connections_per_ip: 1_000,
            keep_alive_interval: DEFAULT_KEEP_ALIVE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_outbound_bytes: 8 * 1024 * 1024,
            max_pending_sends_per_producer: 1000,
            max_producers_per_connection: 10_000,
            max_consumers_per_connection: 10_000,
            max_subscriptions_per_topic: 10_000,
            max_inbound_frame_buffer_bytes: 256 * 1024 * 1024,
            security: Arc::new(meridian_auth::Security::disabled()),
        }
    }
}

/// Serves Pulsar clients on `listener` until `shutdown` is cancelled and every connection has
/// closed.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    serve_with(listener, broker, config, None, shutdown).await;
}

/// Serves Pulsar clients over TLS (`pulsar+ssl://`) on `listener`, as [`serve`] does over
/// plain TCP; a client whose TLS handshake fails or does not finish within `connect_timeout`
/// is dropped.
pub async fn serve_tls(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: ServerConfig,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_with(listener, broker, config, Some(acceptor), shutdown).await;
}

async fn serve_with(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: ServerConfig,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let limits = ConnectionLimits {
        max_connections: config.max_connections,
        max_connections_per_ip: config.max_connections_per_ip,
    };
    let token = shutdown.clone();
    let inbound_budget = Arc::new(Semaphore::new(config.max_inbound_frame_buffer_bytes));
    let name = if acceptor.is_some() {
        "protocol-tls"
    } else {
        "protocol"
    };
    listener::accept_loop(name, listener, limits, shutdown, move |stream, peer| {
        let (acceptor, broker, config, token, budget) = (
            acceptor.clone(),
            broker.clone(),
            config.clone(),
            token.clone(),
            inbound_budget.clone(),
        );
        async move {
            let Some(acceptor) = acceptor else {
                return connection::run(stream, peer, broker, config, token, budget).await;
            };
            let _ = stream.set_nodelay(true);
            let handshake = tokio::time::timeout(config.connect_timeout, acceptor.accept(stream));
            match handshake.await {
                Ok(Ok(stream)) => {
                    connection::run_tls(stream, peer, broker, config, token, budget).await
                }
                Ok(Err(error)) => {
                    config.security.audit_tls_failure(peer, &error);
                    tracing::debug!(peer = %peer, %error, "TLS handshake failed")
                }
                Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
            }
        }
    })
    .await;
}
