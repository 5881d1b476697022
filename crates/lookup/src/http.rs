//! The front door's HTTP listener, for clients configured with an `http://` service URL:
//!
//! - `GET /lookup/v2/topic/{persistent|non-persistent}/{tenant}/{namespace}/{topic}` →
//!   `{"brokerUrl", "brokerUrlTls", "httpUrl", "httpUrlTls", "nativeUrl"}` (Pulsar's shape),
//!   the broker's URLs from the LOOKUP forwarded to the home (the TLS one empty if it has
//!   none), `httpUrl`/`httpUrlTls` the home's registered `serviceUrl`/`serviceUrlTls`;
//! - `GET /admin/v2/{persistent|non-persistent}/{tenant}/{namespace}/{topic}/partitions` →
//!   `{"partitions": N}` from the home's PARTITIONED_METADATA.
//!
//! Errors are `{"reason": ...}` with 503 for a cluster that did not answer (retriable), 404
//! for a tenant no cluster has, 400 for a bad name. Only GET requests without a body are
//! served, so there is no body to bound; connections are bounded by the shared accept loop and
//! their headers by a read deadline.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use meridian_server::listener::{accept_loop, ConnectionLimits};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{FrontDoor, LookupConfig, LookupError};

type TopicPath = Path<(String, String, String, String)>;

fn router(front_door: Arc<FrontDoor>) -> Router {
    Router::new()
        .route(
            "/lookup/v2/topic/{domain}/{tenant}/{namespace}/{topic}",
            get(lookup),
        )
        .route(
            "/admin/v2/{domain}/{tenant}/{namespace}/{topic}/partitions",
            get(partitions),
        )
        .with_state(front_door)
}

/// An error as the admin API answers one.
struct Failure(LookupError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(json!({ "reason": self.0.to_string() }))).into_response()
    }
}

fn topic_name(
    (domain, tenant, namespace, topic): (String, String, String, String),
) -> Result<String, Failure> {
    if domain != "persistent" && domain != "non-persistent" {
        return Err(Failure(LookupError::InvalidTopic {
            topic: format!("{domain}://{tenant}/{namespace}/{topic}"),
            reason: "the domain must be persistent or non-persistent".into(),
        }));
    }
    Ok(format!("{domain}://{tenant}/{namespace}/{topic}"))
}

async fn lookup(
    State(front_door): State<Arc<FrontDoor>>,
    Path(path): TopicPath,
) -> Result<Json<serde_json::Value>, Failure> {
    let topic = topic_name(path)?;
    let answer = front_door.lookup(&topic).await.map_err(Failure)?;
    let home = answer.home;
    Ok(Json(json!({
        "brokerUrl": answer.broker_url.clone().unwrap_or_default(),
        "brokerUrlTls": answer.broker_url_tls.clone().unwrap_or_default(),
        "httpUrl": home.service_url.unwrap_or(home.web_url),
        "httpUrlTls": home.service_url_tls.unwrap_or_default(),
        "nativeUrl": answer.broker_url.or(answer.broker_url_tls).unwrap_or_default(),
    })))
}

async fn partitions(
    State(front_door): State<Arc<FrontDoor>>,
    Path(path): TopicPath,
) -> Result<Json<serde_json::Value>, Failure> {
    let topic = topic_name(path)?;
    let partitions = front_door.partitions(&topic).await.map_err(Failure)?;
    Ok(Json(json!({ "partitions": partitions })))
}

pub async fn serve(
    listener: TcpListener,
    front_door: Arc<FrontDoor>,
    config: Arc<LookupConfig>,
    shutdown: CancellationToken,
) {
    let router = router(front_door);
    let limits = ConnectionLimits {
        max_connections: config.http_max_connections,
        max_connections_per_ip: config.max_connections_per_ip,
    };
    let header_read_timeout = config.http_header_read_timeout;
    let token = shutdown.clone();
    accept_loop(
        "lookup-http",
        listener,
        limits,
        shutdown,
        move |stream, _peer| {
            let service = TowerToHyperService::new(router.clone());
            let shutdown = token.clone();
            async move {
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => {}
                    _ = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            }
        },
    )
    .await;
}
