//! `/admin/v2/namespaces`: namespaces and the policies the broker enforces.

use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use meridian_broker::cluster::{bundles, Owner};
use meridian_broker::resources::{
    AutoTopicCreationOverride, BacklogQuota, DispatchRate, Policies, RetentionPolicies,
};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

use crate::auth::OverTls;
use crate::{body, propagate, ApiError, ApiResult, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin/v2/namespaces/{tenant}", get(list))
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}",
            get(get_policies).put(create).delete(delete),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/replication",
            get(get_replication).post(set_replication),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/retention",
            get(get_retention)
                .post(set_retention)
                .delete(remove_retention),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/backlogQuotaMap",
            get(get_backlog_quotas),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/backlogQuota",
            post(set_backlog_quota).delete(remove_backlog_quota),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/deduplication",
            get(get_deduplication)
                .post(set_deduplication)
                .delete(remove_deduplication),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/messageTTL",
            get(get_ttl).post(set_ttl).delete(remove_ttl),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/autoTopicCreation",
            get(get_auto_creation)
                .post(set_auto_creation)
                .delete(remove_auto_creation),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/replicatorDispatchRate",
            get(get_replicator_rate)
                .post(set_replicator_rate)
                .delete(remove_replicator_rate),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/replicatedSubscriptionSyncInterval",
            get(get_sync_interval)
                .post(set_sync_interval)
                .delete(remove_sync_interval),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/unload",
            put(unload).post(unload),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/{bundle}/unload",
            put(unload_bundle),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/{bundle}/split",
            put(split_bundle),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/bundles",
            get(get_bundles),
        )
        .route(
            "/admin/v2/namespaces/{tenant}/{namespace}/topics",
            get(topics),
        )
}

#[derive(Deserialize)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn list(
    State(broker): State<AppState>,
    Path(tenant): Path<String>,
) -> ApiResult<Json<Vec<String>>> {
    broker.resources().tenant(&tenant)?;
    Ok(Json(broker.resources().namespaces(&tenant)?))
}

async fn create(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    payload: Bytes,
) -> ApiResult<()> {
    let mut policies: Policies = if payload.iter().all(u8::is_ascii_whitespace) {
        Policies::default()
    } else {
        serde_json::from_slice(&payload)
            .map_err(|error| ApiError::bad_request(format!("invalid Policies body: {error}")))?
    };
    if policies.replication_clusters.is_empty() {
        policies.replication_clusters = vec![broker.config().cluster_name.clone()];
    }
    broker
        .resources()
        .create_namespace(&tenant, &namespace, &policies)?;
    Ok(())
}

async fn get_policies(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Policies>> {
    Ok(Json(broker.resources().policies(&tenant, &namespace)?))
}

async fn delete(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    Query(query): Query<Force>,
) -> ApiResult<()> {
    broker.resources().policies(&tenant, &namespace)?;
    let topics = broker.topics_of_namespace(&format!("{tenant}/{namespace}"))?;
    if !topics.is_empty() && !query.force {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            format!(
                "namespace {tenant}/{namespace} still has {} topic(s); use force=true",
                topics.len()
            ),
        ));
    }
    broker.delete_namespace(&tenant, &namespace).await?;
    Ok(())
}

/// Applies a change to a namespace's policies and lets loaded topics pick it up.
async fn change(
    broker: &AppState,
    tenant: &str,
    namespace: &str,
    mut apply: impl FnMut(&mut Policies),
) -> ApiResult<()> {
    broker
        .resources()
        .update_policies(tenant, namespace, |policies| {
            apply(policies);
            Ok(())
        })?;
    broker.policies_changed(tenant, Some(namespace)).await;
    Ok(())
}

async fn get_replication(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(
        broker
            .resources()
            .policies(&tenant, &namespace)?
            .replication_clusters,
    ))
}

async fn set_replication(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    payload: Result<Json<Vec<String>>, JsonRejection>,
) -> ApiResult<()> {
    let clusters = body(payload)?;
    if clusters.is_empty() {
        return Err(ApiError::new(
            axum::http::StatusCode::PRECONDITION_FAILED,
            "replication clusters cannot be empty",
        ));
    }
    let previous = broker
        .resources()
        .policies(&tenant, &namespace)?
        .replication_clusters;
    broker
        .resources()
        .set_replication_clusters(&tenant, &namespace, clusters)?;
    broker.policies_changed(&tenant, Some(&namespace)).await;
    if !headers.contains_key(propagate::PROPAGATED_HEADER) {
        propagate::spawn(&broker, &tenant, &namespace, previous);
    }
    Ok(())
}

/// The replicator dispatch rate in force on this cluster (`null`: unlimited).
async fn get_replicator_rate(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Option<DispatchRate>>> {
    let mut policies = broker.resources().policies(&tenant, &namespace)?;
    Ok(Json(
        policies
            .replicator_dispatch_rate
            .remove(&broker.config().cluster_name),
    ))
}

async fn set_replicator_rate(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    payload: Result<Json<DispatchRate>, JsonRejection>,
) -> ApiResult<()> {
    let rate = body(payload)?;
    if rate.rate_period_in_second == 0 {
        return Err(ApiError::bad_request(
            "ratePeriodInSecond must be at least 1",
        ));
    }
    let cluster = broker.config().cluster_name.clone();
    change(&broker, &tenant, &namespace, |policies| {
        policies
            .replicator_dispatch_rate
            .insert(cluster.clone(), rate.clone());
    })
    .await
}

async fn remove_replicator_rate(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<()> {
    let cluster = broker.config().cluster_name.clone();
    change(&broker, &tenant, &namespace, |policies| {
        policies.replicator_dispatch_rate.remove(&cluster);
    })
    .await
}

/// The namespace's replicated-subscription sync interval in ms (`null`: the broker's default).
async fn get_sync_interval(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Option<u64>>> {
    Ok(Json(
        broker
            .resources()
            .policies(&tenant, &namespace)?
            .replicated_subscription_sync_interval_ms,
    ))
}

async fn set_sync_interval(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    payload: Result<Json<u64>, JsonRejection>,
) -> ApiResult<()> {
    let interval = body(payload)?;
    if !(10..=60_000).contains(&interval) {
        return Err(ApiError::bad_request(
            "the sync interval must be between 10 and 60000 ms",
        ));
    }
    change(&broker, &tenant, &namespace, |policies| {
        policies.replicated_subscription_sync_interval_ms = Some(interval);
    })
    .await
}

async fn remove_sync_interval(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<()> {
    change(&broker, &tenant, &namespace, |policies| {
        policies.replicated_subscription_sync_interval_ms = None;
    })
    .await
}

async fn get_retention(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Option<RetentionPolicies>>> {
    Ok(Json(
        broker
            .resources()
            .policies(&tenant, &namespace)?
            .retention_policies,
    ))
}

async fn set_retention(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    payload: Result<Json<RetentionPolicies>, JsonRejection>,
) -> ApiResult<()> {
    let retention = validate_retention(body(payload)?)?;
    change(&broker, &tenant, &namespace, |policies| {
        policies.retention_policies = Some(retention)
    })
    .await
}

pub fn validate_retention(retention: RetentionPolicies) -> ApiResult<RetentionPolicies> {
    if retention.retention_time_in_minutes < -1 || retention.retention_size_in_mb < -1 {
        return Err(ApiError::new(
            axum::http::StatusCode::PRECONDITION_FAILED,
            "retention time and size must be -1 (unlimited), 0 (none) or positive",
        ));
    }
    Ok(retention)
}

async fn remove_retention(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<()> {
    change(&broker, &tenant, &namespace, |policies| {
        policies.retention_policies = None
    })
    .await
}

async fn get_backlog_quotas(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<std::collections::BTreeMap<String, BacklogQuota>>> {
    Ok(Json(
        broker
            .resources()
            .policies(&tenant, &namespace)?
            .backlog_quota_map,
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaType {
    backlog_quota_type: Option<String>,
}

pub fn quota_type(query: &QuotaType) -> ApiResult<String> {
    let kind = query
        .backlog_quota_type
        .clone()
        .unwrap_or_else(|| "destination_storage".into());
    if kind != "destination_storage" && kind != "message_age" {
        return Err(ApiError::bad_request(format!(
            "backlogQuotaType must be destination_storage or message_age, not {kind:?}"
        )));
    }
    Ok(kind)
}

async fn set_backlog_quota(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    Query(query): Query<QuotaType>,
    payload: Result<Json<BacklogQuota>, JsonRejection>,
) -> ApiResult<()> {
    let kind = quota_type(&query)?;
    let quota = body(payload)?;
    change(&broker, &tenant, &namespace, |policies| {
        policies.backlog_quota_map.insert(kind.clone(), quota);
    })
    .await
}

async fn remove_backlog_quota(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    Query(query): Query<QuotaType>,
) -> ApiResult<()> {
    let kind = quota_type(&query)?;
    change(&broker, &tenant, &namespace, |policies| {
        policies.backlog_quota_map.remove(&kind);
    })
    .await
}

async fn get_deduplication(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Option<bool>>> {
    Ok(Json(
        broker
            .resources()
            .policies(&tenant, &namespace)?
            .deduplication_enabled,
    ))
}

async fn set_deduplication(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    payload: Result<Json<bool>, JsonRejection>,
) -> ApiResult<()> {
    let enabled = body(payload)?;
    change(&broker, &tenant, &namespace, |policies| {
        policies.deduplication_enabled = Some(enabled)
    })
    .await
}

async fn remove_deduplication(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<()> {
    change(&broker, &tenant, &namespace, |policies| {
        policies.deduplication_enabled = None
    })
    .await
}

async fn get_ttl(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Option<i64>>> {
    Ok(Json(
        broker
            .resources()
            .policies(&tenant, &namespace)?
            .message_ttl_in_seconds,
    ))
}

async fn set_ttl(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    payload: Result<Json<i64>, JsonRejection>,
) -> ApiResult<()> {
    let seconds = body(payload)?;
    if seconds < 0 {
        return Err(ApiError::new(
            axum::http::StatusCode::PRECONDITION_FAILED,
            "message TTL must be 0 (none) or positive seconds",
        ));
    }
    change(&broker, &tenant, &namespace, |policies| {
        policies.message_ttl_in_seconds = Some(seconds)
    })
    .await
}

async fn remove_ttl(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<()> {
    change(&broker, &tenant, &namespace, |policies| {
        policies.message_ttl_in_seconds = None
    })
    .await
}

async fn get_auto_creation(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Option<AutoTopicCreationOverride>>> {
    Ok(Json(
        broker
            .resources()
            .policies(&tenant, &namespace)?
            .auto_topic_creation_override,
    ))
}

async fn set_auto_creation(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    payload: Result<Json<AutoTopicCreationOverride>, JsonRejection>,
) -> ApiResult<()> {
    let rule = body(payload)?;
    if let Some(kind) = &rule.topic_type {
        if kind != "partitioned" && kind != "non-partitioned" {
            return Err(ApiError::bad_request(format!(
                "topicType must be partitioned or non-partitioned, not {kind:?}"
            )));
        }
    }
    change(&broker, &tenant, &namespace, |policies| {
        policies.auto_topic_creation_override = Some(rule.clone())
    })
    .await
}

async fn remove_auto_creation(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<()> {
    change(&broker, &tenant, &namespace, |policies| {
        policies.auto_topic_creation_override = None
    })
    .await
}

/// Unloads the namespace. Standalone: every loaded topic of it (clients reconnect). Cluster
/// mode: every bundle of it that has an owner, wherever: those this broker owns here, the
/// others forwarded to their owners' bundle unload (as Pulsar's broker does through its admin
/// client); each owner closes the bundle's topics and releases it.
async fn unload(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<()> {
    broker.resources().policies(&tenant, &namespace)?;
    let Some(cluster) = broker.cluster() else {
        for topic in broker.loaded_topics() {
            if topic.name.tenant == tenant && topic.name.namespace == namespace {
                broker.unload(&topic.name.clone()).await;
            }
        }
        return Ok(());
    };
    for bundle in cluster.bundles_of_namespace(&tenant, &namespace).await? {
        match cluster.bundle_owner(&bundle).await? {
            None => {}
            Some(Owner::This) => {
                cluster.unload_bundle(&broker, &bundle).await?;
            }
            Some(Owner::Other { registration, .. }) => {
                forward_unload(&registration.web_service_url, &bundle, &headers).await?
            }
        }
    }
    Ok(())
}

/// Unloads one bundle (`0x00000000_0x40000000`, Pulsar's bundle unload). Cluster mode: the
/// owner unloads it; another broker answers `307 Temporary Redirect` to the owner's web
/// service URL (as Pulsar does); a bundle nobody owns has nothing to unload. Standalone: the
/// loaded topics of the namespace that hash into the range.
async fn unload_bundle(
    State(broker): State<AppState>,
    Path((tenant, namespace, range)): Path<(String, String, String)>,
    over_tls: Option<Extension<OverTls>>,
    uri: Uri,
) -> ApiResult<Response> {
    broker.resources().policies(&tenant, &namespace)?;
    let bounds = bundles::parse_range(&range).ok_or_else(|| {
        ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("invalid bundle range {range}: expected 0xLLLLLLLL_0xUUUUUUUU"),
        )
    })?;
    let Some(cluster) = broker.cluster() else {
        for topic in broker.loaded_topics() {
            if topic.name.tenant == tenant
                && topic.name.namespace == namespace
                && bundles::range_holds(&topic.name, bounds)
            {
                broker.unload(&topic.name.clone()).await;
            }
        }
        return Ok(().into_response());
    };
    let bundle = existing_bundle(cluster, &tenant, &namespace, &range).await?;
    match cluster.bundle_owner(&bundle).await? {
        None => {}
        Some(Owner::This) => {
            cluster.unload_bundle(&broker, &bundle).await?;
        }
        Some(Owner::Other { registration, .. }) => {
            return Ok(redirect(registration.web_url(over_tls.is_some()), &uri));
        }
    }
    Ok(().into_response())
}

/// `tenant/namespace/range` when `range` is one of the namespace's bundles now; 404 naming
/// them otherwise.
async fn existing_bundle(
    cluster: &std::sync::Arc<meridian_broker::cluster::ClusterMode>,
    tenant: &str,
    namespace: &str,
    range: &str,
) -> ApiResult<String> {
    let bundle = format!("{tenant}/{namespace}/{range}");
    let all = cluster.bundles_of_namespace(tenant, namespace).await?;
    if all.contains(&bundle) {
        return Ok(bundle);
    }
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "bundle {range} does not exist in namespace {tenant}/{namespace} (its bundles: {})",
            all.iter()
                .filter_map(|name| name.rsplit('/').next())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

/// `307 Temporary Redirect` to the same path and query on the owner.
fn redirect(web_service_url: &str, uri: &Uri) -> Response {
    let path_and_query = uri
        .path_and_query()
        .map_or(uri.path(), |value| value.as_str());
    let location = format!("{}{path_and_query}", web_service_url.trim_end_matches('/'));
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, location)],
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SplitQuery {
    #[serde(default)]
    split_algorithm_name: Option<String>,
}

/// Splits one bundle in two equal halves (Pulsar's `range_equally_divide`, the only algorithm
/// accepted). Cluster mode only: the owner (or this broker, taking a bundle nobody owns)
/// closes the bundle's topics, writes the namespace's new boundaries and releases the bundle;
/// the next lookups assign the halves. Its topics are always unloaded, whatever `unload`
/// says: each topic's commits are fenced by its bundle's owner key. Another owner: 307.
async fn split_bundle(
    State(broker): State<AppState>,
    Path((tenant, namespace, range)): Path<(String, String, String)>,
    Query(query): Query<SplitQuery>,
    over_tls: Option<Extension<OverTls>>,
    uri: Uri,
) -> ApiResult<Response> {
    broker.resources().policies(&tenant, &namespace)?;
    if let Some(algorithm) = query
        .split_algorithm_name
        .filter(|name| name != "range_equally_divide")
    {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("unsupported split algorithm {algorithm}: only range_equally_divide"),
        ));
    }
    let Some(cluster) = broker.cluster() else {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "bundle split needs cluster mode (meridian broker); standalone's bundles are fixed",
        ));
    };
    let bundle = existing_bundle(cluster, &tenant, &namespace, &range).await?;
    if let Some(Owner::Other { registration, .. }) = cluster.bundle_owner(&bundle).await? {
        return Ok(redirect(registration.web_url(over_tls.is_some()), &uri));
    }
    cluster.split_bundle(&broker, &bundle).await?;
    Ok(().into_response())
}

/// Pulsar's `BundlesData`: the namespace's boundaries (`0x00000000` ... `0xffffffff`) and
/// the number of bundles. Standalone: Pulsar's default 4 equal bundles.
async fn get_bundles(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    broker.resources().policies(&tenant, &namespace)?;
    let names = match broker.cluster() {
        Some(cluster) => cluster.bundles_of_namespace(&tenant, &namespace).await?,
        None => bundles::bundle_names(&tenant, &namespace, &bundles::default_boundaries(4)),
    };
    let mut boundaries: Vec<String> = Vec::with_capacity(names.len() + 1);
    for name in &names {
        let range = name.rsplit('/').next().unwrap_or_default();
        if let Some((lower, upper)) = range.split_once('_') {
            if boundaries.is_empty() {
                boundaries.push(lower.to_string());
            }
            boundaries.push(upper.to_string());
        }
    }
    Ok(Json(serde_json::json!({
        "boundaries": boundaries,
        "numBundles": names.len(),
    })))
}

/// How long a forwarded bundle unload may take (the owner closes the bundle's topics and
/// persists their cursors before it answers).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the owner at `web_service_url` to unload `bundle` (`tenant/ns/range`), with the
/// caller's credentials. A redirect (the bundle moved meanwhile) is not followed: the caller
/// retries.
async fn forward_unload(web_service_url: &str, bundle: &str, headers: &HeaderMap) -> ApiResult<()> {
    let url = format!(
        "{}/admin/v2/namespaces/{bundle}/unload",
        web_service_url.trim_end_matches('/')
    );
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let agent = ureq::AgentBuilder::new()
            .timeout(FORWARD_TIMEOUT)
            .redirects(0)
            .build();
        let mut request = agent.put(&url);
        if let Some(value) = &authorization {
            request = request.set("Authorization", value);
        }
        match request.call() {
            Ok(response) if response.status() < 300 => Ok(()),
            Ok(response) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{url} answered {}: the bundle moved meanwhile; retry",
                    response.status()
                ),
            )),
            Err(ureq::Error::Status(status, response)) => Err(ApiError::new(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                format!(
                    "the bundle's owner ({url}) answered {status}: {}",
                    response.into_string().unwrap_or_default()
                ),
            )),
            Err(error) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot reach the bundle's owner at {url}: {error}"),
            )),
        }
    })
    .await
    .map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("forwarding task failed: {error}"),
        )
    })?
}

async fn topics(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    broker.resources().policies(&tenant, &namespace)?;
    Ok(Json(Value::from(
        broker.topics_of_namespace(&format!("{tenant}/{namespace}"))?,
    )))
}
