//! Pulsar's `/admin/v2/brokers` and `/admin/v2/broker-stats` resources, and `/status.html`,
//! for a single broker: the active-broker list holds this broker only (in cluster mode, every
//! broker registered in etcd).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use meridian_broker::BrokerError;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::{ApiError, ApiResult, AppState};

/// The effective configuration, as `key = value` strings, that `meridian standalone` started
/// with (`/brokers/configuration/runtime`). Set once, before the HTTP server starts.
static RUNTIME_CONFIGURATION: OnceLock<BTreeMap<String, String>> = OnceLock::new();

/// Records the effective configuration that `/brokers/configuration/runtime` reports.
pub fn set_runtime_configuration(values: BTreeMap<String, String>) {
    let _ = RUNTIME_CONFIGURATION.set(values);
}

/// The bundle range every namespace has here: Meridian does not split namespaces into bundles.
const FULL_BUNDLE: &str = "0x00000000_0xffffffff";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/v2/brokers/health", get(health))
        .route("/admin/v2/brokers/ready", get(ready))
        .route("/admin/v2/brokers/version", get(version))
        .route("/admin/v2/brokers/leaderBroker", get(leader_broker))
        .route("/admin/v2/brokers/configuration", get(dynamic_names))
        .route(
            "/admin/v2/brokers/configuration/values",
            get(dynamic_values),
        )
        .route("/admin/v2/brokers/configuration/runtime", get(runtime))
        .route("/admin/v2/brokers", get(local_brokers))
        .route("/admin/v2/brokers/{cluster}", get(active_brokers))
        .route("/admin/v2/broker-stats/topics", get(topic_stats))
        .route("/status.html", get(status))
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

/// Answers `ok` once the broker serves (it starts serving HTTP only when it is ready).
async fn ready() -> &'static str {
    "ok"
}

/// `status.html` for load balancers: `OK` while the broker serves.
async fn status() -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], "OK").into_response()
}

async fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// This broker's web service address as Pulsar lists brokers: `host:port`.
fn broker_id(broker: &AppState) -> String {
    let url = &broker.config().web_service_url;
    url.split_once("://")
        .map_or(url.as_str(), |(_, rest)| rest)
        .trim_end_matches('/')
        .to_string()
}

async fn local_brokers(State(broker): State<AppState>) -> Json<Vec<String>> {
    Json(vec![broker_id(&broker)])
}

/// The active brokers of `cluster`: for the local cluster this broker, or in cluster mode every
/// broker registered in etcd; another registered cluster's are listed by that cluster (307 to
/// its web service URL, as Pulsar redirects).
async fn active_brokers(
    State(broker): State<AppState>,
    Path(cluster): Path<String>,
) -> ApiResult<Response> {
    if cluster == broker.config().cluster_name {
        if let Some(mode) = broker.cluster().cloned() {
            let registered = tokio::task::spawn_blocking(move || mode.registered_brokers())
                .await
                .map_err(|error| BrokerError::Unknown(error.to_string()))??;
            return Ok(Json(registered).into_response());
        }
        return Ok(Json(vec![broker_id(&broker)]).into_response());
    }
    let data = broker.resources().cluster(&cluster)?;
    match data.service_url.as_deref() {
        Some(url) if !url.is_empty() => Ok((
            StatusCode::TEMPORARY_REDIRECT,
            [(
                header::LOCATION,
                format!("{}/admin/v2/brokers/{cluster}", url.trim_end_matches('/')),
            )],
        )
            .into_response()),
        _ => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("cluster {cluster} has no serviceUrl to ask for its brokers"),
        )),
    }
}

async fn leader_broker(State(broker): State<AppState>) -> Json<Value> {
    let id = broker_id(&broker);
    Json(json!({ "brokerId": id, "serviceUrl": broker.config().web_service_url }))
}

/// Names of the settings that can be changed at runtime through
/// `/brokers/configuration/{name}/{value}`: none in Meridian (every setting is read at start).
async fn dynamic_names() -> Json<Vec<String>> {
    Json(Vec::new())
}

/// Values of dynamic settings overridden at runtime: none, as there are no dynamic settings.
async fn dynamic_values() -> Json<Map<String, Value>> {
    Json(Map::new())
}

async fn runtime() -> Json<BTreeMap<String, String>> {
    Json(RUNTIME_CONFIGURATION.get().cloned().unwrap_or_default())
}

/// Stats of every loaded topic, as Pulsar nests them: namespace → bundle → `persistent` →
/// topic → TopicStats.
async fn topic_stats(State(broker): State<AppState>) -> ApiResult<Json<Value>> {
    let mut namespaces: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for topic in broker.loaded_topics() {
        let policies = broker.resources().effective_policies(&topic.name)?;
        let stats = serde_json::to_value(topic.stats(&policies))
            .map_err(|error| BrokerError::Unknown(error.to_string()))?;
        namespaces
            .entry(topic.name.namespace_name())
            .or_default()
            .insert(topic.full_name().to_string(), stats);
    }
    let body: Map<String, Value> = namespaces
        .into_iter()
        .map(|(namespace, topics)| {
            (
                namespace,
                json!({ FULL_BUNDLE: { "persistent": Value::Object(topics) } }),
            )
        })
        .collect();
    Ok(Json(Value::Object(body)))
}
