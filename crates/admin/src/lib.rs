//! Meridian's HTTP API on the web port: Pulsar's `/admin/v2` REST resources, HTTP lookup, and
//! Prometheus `/metrics`.
//!
//! Handlers are thin: they parse the path and body, call the broker, and turn a
//! [`BrokerError`] into Pulsar's status code with a JSON `{"reason": ...}` body (the one place
//! where that mapping lives is [`ApiError`]).
//!
//! # Layout
//!
//! - [`clusters`], [`tenants`], [`namespaces`]: records and namespace policies;
//! - [`topics`]: topics, partitions, subscriptions, stats, topic-level policies, lookup;
//! - `cluster`: in cluster mode, 307 to the owner of a topic's bundle for topic-level calls
//!   and `/lookup/v2`;
//! - [`brokers`]: `/admin/v2/brokers/...` (health with the topics that cannot be served,
//!   active brokers, version, configuration), `/admin/v2/broker-stats/topics`, `/status.html`;
//! - [`metrics`]: the Prometheus text exposition;
//! - [`migration`]: a tenant's migration to another cluster (start, status, abort);
//! - [`console`]: the read-only web console at `/console` (static files drawn from this API).
//! - [`auth`]: bearer-token authentication and authorization of every request, and the audit
//!   of mutations;
//! - [`permissions`]: grants of produce/consume on namespaces and topics.

pub mod auth;
mod brokers;
mod cluster;
mod clusters;
mod console;
mod deadlines;
mod metrics;
mod migration;
mod namespaces;
mod permissions;
mod propagate;
mod tenants;
mod topics;

use std::sync::Arc;
use std::time::Duration;

pub use brokers::set_runtime_configuration;

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use meridian_auth::Security;
use meridian_broker::{Broker, BrokerError};
use meridian_server::listener::{accept_loop, ConnectionLimits};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// State shared by every handler.
pub type AppState = Arc<Broker>;

/// An error response: Pulsar's status code and `{"reason": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    reason: String,
}

impl ApiError {
    pub fn new(status: StatusCode, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            reason: reason.into(),
        }
    }

    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, reason)
    }
}

impl From<BrokerError> for ApiError {
    fn from(error: BrokerError) -> Self {
        let status = match &error {
            BrokerError::NotFound(_)
            | BrokerError::TopicNotFound(_)
            | BrokerError::SubscriptionNotFound { .. } => StatusCode::NOT_FOUND,
            BrokerError::AlreadyExists(_) | BrokerError::Conflict(_) => StatusCode::CONFLICT,
            BrokerError::PreconditionFailed(_)
            | BrokerError::InvalidTopicName { .. }
            | BrokerError::ConsumerBusy(_)
            | BrokerError::ProducerBusy(_) => StatusCode::PRECONDITION_FAILED,
            BrokerError::BadRequest(_)
            | BrokerError::NotAllowed(_)
            | BrokerError::IncompatibleSchema(_) => StatusCode::BAD_REQUEST,
            BrokerError::ShuttingDown
            | BrokerError::BeingCreatedOrDeleted(_)
            | BrokerError::TenantMigrated(_)
            | BrokerError::NotServedHere(_)
            | BrokerError::TooManyLoadedTopics { .. } => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // An unavailable topic was logged once when it failed; its reason is in the reply.
        if status == StatusCode::INTERNAL_SERVER_ERROR
            && !matches!(error, BrokerError::TopicUnavailable { .. })
        {
            tracing::error!(%error, "admin request failed");
        }
        ApiError::new(status, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "reason": self.reason })),
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Parses a JSON body, turning a malformed one into 400 with the parser's reason.
pub fn body<T: DeserializeOwned>(payload: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    payload.map(|Json(value)| value).map_err(|rejection| {
        ApiError::bad_request(format!("invalid request body: {}", rejection.body_text()))
    })
}

/// The HTTP routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::metrics))
        .route("/metrics/", get(metrics::metrics))
        .merge(brokers::routes())
        .merge(clusters::routes())
        .merge(tenants::routes())
        .merge(migration::routes())
        .merge(namespaces::routes())
        .merge(permissions::routes())
        .merge(topics::routes())
        .merge(console::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            broker.clone(),
            cluster::redirect_to_owner,
        ))
        .with_state(broker)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such resource")
}

/// Limits of the HTTP server, so that idle or slow clients cannot hold it.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Connections served at once from one IP address; more are closed at once (0: no limit).
    pub max_connections_per_ip: usize,
    /// Time a client has to send a request's headers, counted from the first byte of the
    /// request or, between requests of a kept-alive connection, from the previous response:
    /// an idle or dribbling connection is closed after it.
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body, from the end of its headers: a body that
    /// never ends is answered 408 and its connection closed.
    pub body_timeout: Duration,
    /// Time a response write may make no progress (the client reads nothing) before the
    /// connection is closed.
    pub write_stall_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 2048,
            max_connections_per_ip: 256,
            header_read_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            write_stall_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves the HTTP API until `shutdown` is cancelled and the requests in progress are done.
///
/// One task per connection (hyper's HTTP/1 with the header timeout, a body deadline and a
/// write-stall timeout, see [`deadlines`]), accepted by the same loop
/// as the protocol port ([`meridian_server::listener::accept_loop`]: a bound on connections, a
/// bound per IP address, a backoff when accepting fails).
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    limits: HttpLimits,
    security: Arc<Security>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_tls(listener, broker, limits, security, None, shutdown).await
}

/// Serves the HTTP API on `listener`, over TLS (HTTPS) when `tls` is given; see [`serve`].
pub async fn serve_with_tls(
    listener: TcpListener,
    broker: Arc<Broker>,
    limits: HttpLimits,
    security: Arc<Security>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let audit = security.clone();
    let router = router(broker.clone())
        .layer(axum::middleware::from_fn_with_state(
            (security, broker),
            auth::authenticate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits.body_timeout,
            deadlines::body_deadline,
        ));
    let write_stall_timeout = limits.write_stall_timeout;
    let connection_limits = ConnectionLimits {
        max_connections: limits.max_connections,
        max_connections_per_ip: limits.max_connections_per_ip,
    };
    let header_read_timeout = limits.header_read_timeout;
    let token = shutdown.clone();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let over_tls = acceptor.is_some();
    accept_loop(
        if acceptor.is_some() { "https" } else { "http" },
        listener,
        connection_limits,
        shutdown,
        move |stream, peer| {
            let router = router.clone();
            let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
                request.extensions_mut().insert(auth::PeerAddress(peer));
                if over_tls {
                    request.extensions_mut().insert(auth::OverTls);
                }
                tower_service::Service::call(&mut router.clone(), request)
            });
            let shutdown = token.clone();
            let acceptor = acceptor.clone();
            let audit = audit.clone();
            async move {
                let timeouts = (header_read_timeout, write_stall_timeout);
                match acceptor {
                    None => serve_connection(stream, service, timeouts, shutdown).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(header_read_timeout, acceptor.accept(stream));
                        match handshake.await {
                            Ok(Ok(stream)) => {
                                serve_connection(stream, service, timeouts, shutdown).await
                            }
                            Ok(Err(error)) => {
                                audit.audit_tls_failure(peer, &error);
                                tracing::debug!(peer = %peer, %error, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out"),
                        }
                    }
                }
            }
        },
    )
    .await;
    Ok(())
}

/// Serves one HTTP/1 connection (plain or TLS) until it ends or the server shuts down (then
/// the request in progress is finished first).
async fn serve_connection<IO, S>(
    io: IO,
    service: S,
    (header_read_timeout, write_stall_timeout): (Duration, Duration),
    shutdown: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<hyper::Request<hyper::body::Incoming>, Response = Response>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(
            deadlines::StallGuardedIo::new(TokioIo::new(io), write_stall_timeout),
            service,
        );
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
