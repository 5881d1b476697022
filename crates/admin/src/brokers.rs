//! Pulsar's `/admin/v2/brokers` resources on a single broker.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/admin/v2/brokers/health", get(health))
}

#[derive(Deserialize, Default)]
struct HealthQuery {
    /// Meridian's extension: answer JSON with the topics the broker cannot serve.
    #[serde(default)]
    details: bool,
}

/// Pulsar's health check answers `ok` when the broker serves (pulsar-admin checks for that
/// text). `?details=true` answers JSON instead: `status` is `ok`, or `degraded` while some
/// topics cannot be served, and `unavailableTopics` lists them with their reason. A broken
/// topic does not fail the check: the broker still serves every other topic.
async fn health(State(broker): State<AppState>, Query(query): Query<HealthQuery>) -> Response {
    if !query.details {
        return "ok".into_response();
    }
    let failures = broker.health().failures();
    let status = if failures.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    Json(json!({
        "status": status,
        "unavailableTopics": failures,
        "topicLoadFailuresTotal": broker.health().load_failures_total(),
        "topicPoisonedTotal": broker.health().poisoned_total(),
    }))
    .into_response()
}
