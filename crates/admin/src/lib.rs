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
//! - [`metrics`]: the Prometheus text exposition.

mod clusters;
mod metrics;
mod namespaces;
mod propagate;
mod tenants;
mod topics;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use meridian_broker::{Broker, BrokerError};
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
            | BrokerError::BeingDeleted(_)
            | BrokerError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
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
        .route("/admin/v2/brokers/health", get(health))
        .route("/metrics", get(metrics::metrics))
        .route("/metrics/", get(metrics::metrics))
        .merge(clusters::routes())
        .merge(tenants::routes())
        .merge(namespaces::routes())
        .merge(topics::routes())
        .fallback(not_found)
        .with_state(broker)
}

/// Pulsar's health check answers `ok` when the broker serves.
async fn health() -> &'static str {
    "ok"
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such resource")
}

/// Serves the HTTP API until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(broker))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
