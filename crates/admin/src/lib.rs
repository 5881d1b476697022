//! Meridian's HTTP API on the web port: today the broker health check; the `/admin/v2`
//! resources and `/metrics` grow here.

use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use meridian_broker::Broker;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The HTTP routes.
pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/admin/v2/brokers/health", get(health))
        .with_state(broker)
}

/// Pulsar's health check answers `ok` when the broker serves.
async fn health() -> &'static str {
    "ok"
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
