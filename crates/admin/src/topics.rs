//! `/admin/v2/persistent/...`: topics, partitions, subscriptions, stats, topic-level policies,
//! and `/lookup/v2` for clients configured with an `http://` service URL.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, StringRejection};
use axum::extract::DefaultBodyLimit;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use meridian_broker::replication::received_state;
use meridian_broker::replication::replicated_subscriptions::is_replicated;
use meridian_broker::resources::EffectivePolicies;
use meridian_broker::resources::{BacklogQuota, RetentionPolicies};
use meridian_broker::stats::{SubscriptionStats, TopicStats};
use meridian_broker::topic::{is_replicator_cursor, is_system_cursor};
use meridian_broker::{BrokerError, SeekTarget, Topic, TopicName};
use meridian_storage::closed_log::{closed_log_cursors, summarize_closed_log};
use meridian_storage::Position;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::namespaces::{quota_type, validate_retention, QuotaType};
use crate::{body, ApiError, ApiResult, AppState};

type TopicPath = Path<(String, String, String)>;
type SubscriptionPath = Path<(String, String, String, String)>;

pub fn routes() -> Router<AppState> {
    let base = "/admin/v2/persistent/{tenant}/{namespace}";
    Router::new()
        .route(base, get(list))
        .route(&format!("{base}/partitioned"), get(list_partitioned))
        .route(&format!("{base}/{{topic}}"), put(create).delete(delete))
        .route(
            &format!("{base}/{{topic}}/partitions"),
            get(get_partitions)
                .put(create_partitioned)
                .post(update_partitions)
                .delete(delete_partitioned),
        )
        .route(&format!("{base}/{{topic}}/stats"), get(stats))
        .route(
            &format!("{base}/{{topic}}/partitioned-stats"),
            get(partitioned_stats),
        )
        .route(
            &format!("{base}/{{topic}}/internalStats"),
            get(internal_stats),
        )
        .route(
            &format!("{base}/{{topic}}/lastMessageId"),
            get(last_message_id),
        )
        .route(&format!("{base}/{{topic}}/unload"), put(unload))
        .route(&format!("{base}/{{topic}}/terminate"), post(terminate))
        .route(
            &format!("{base}/{{topic}}/subscriptions"),
            get(subscriptions),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}"),
            put(create_subscription).delete(delete_subscription),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/resetcursor/{{timestamp}}"),
            post(reset_cursor_by_time),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/resetcursor"),
            post(reset_cursor_by_id),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/skip/{{count}}"),
            post(skip),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/skip_all"),
            post(skip_all),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/replicatedSubscriptionStatus"),
            get(get_replicated_status).post(set_replicated_status),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/replicatedSubscriptionState"),
            // A subscription with many out-of-order acknowledgements has a large state.
            post(receive_replicated_state).layer(DefaultBodyLimit::max(SYNCED_STATE_MAX_BYTES)),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/expireMessages/{{seconds}}"),
            post(expire_messages),
        )
        .route(
            &format!("{base}/{{topic}}/subscription/{{subscription}}/position/{{position}}"),
            get(peek),
        )
        .route(
            &format!("{base}/{{topic}}/retention"),
            get(get_retention)
                .post(set_retention)
                .delete(remove_retention),
        )
        .route(
            &format!("{base}/{{topic}}/messageTTL"),
            get(get_ttl).post(set_ttl).delete(remove_ttl),
        )
        .route(
            &format!("{base}/{{topic}}/backlogQuota"),
            post(set_backlog_quota).delete(remove_backlog_quota),
        )
        .route(
            &format!("{base}/{{topic}}/backlogQuotaMap"),
            get(get_backlog_quotas),
        )
        .route(
            &format!("{base}/{{topic}}/deduplicationEnabled"),
            get(get_deduplication)
                .post(set_deduplication)
                .delete(remove_deduplication),
        )
        .route(
            &format!("{base}/{{topic}}/replication"),
            get(get_replication)
                .post(set_replication)
                .delete(remove_replication),
        )
        .route(
            "/lookup/v2/topic/persistent/{tenant}/{namespace}/{topic}",
            get(lookup),
        )
}

fn topic_name(tenant: &str, namespace: &str, topic: &str) -> ApiResult<TopicName> {
    Ok(TopicName::parse(&format!(
        "persistent://{tenant}/{namespace}/{topic}"
    ))?)
}

fn require_namespace(broker: &AppState, name: &TopicName) -> ApiResult<()> {
    broker.resources().policies(&name.tenant, &name.namespace)?;
    Ok(())
}

/// The loaded topic, loading an existing one; 404 if it does not exist.
async fn existing_topic(broker: &AppState, name: &TopicName) -> ApiResult<Arc<Topic>> {
    if !broker.exists(name) {
        return Err(BrokerError::NotFound(format!("topic {name} does not exist")).into());
    }
    Ok(broker.topic(name, false).await?)
}

/// The partition count if `name` is a partitioned topic. A partition's name (`t-partition-0`)
/// is a topic of its own here, as in Pulsar: every topic-level call works on one partition
/// (the broker's `partition_count` answers for the partitioned topic a partition belongs to).
fn partitions_of(broker: &AppState, name: &TopicName) -> ApiResult<Option<u32>> {
    if name.partition_index().is_some() {
        return Ok(None);
    }
    Ok(broker.partition_count(name)?)
}

/// The topics a request about `name` covers: its partitions for a partitioned topic.
fn covered_topics(broker: &AppState, name: &TopicName) -> ApiResult<Vec<TopicName>> {
    match partitions_of(broker, name)? {
        Some(partitions) => Ok((0..partitions).map(|index| name.partition(index)).collect()),
        None => Ok(vec![name.clone()]),
    }
}

#[derive(Deserialize, Default)]
struct Force {
    #[serde(default)]
    force: bool,
}

async fn list(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    broker.resources().policies(&tenant, &namespace)?;
    Ok(Json(
        broker.topics_of_namespace(&format!("{tenant}/{namespace}"))?,
    ))
}

async fn list_partitioned(
    State(broker): State<AppState>,
    Path((tenant, namespace)): Path<(String, String)>,
) -> ApiResult<Json<Vec<String>>> {
    broker.resources().policies(&tenant, &namespace)?;
    let names = broker
        .metadata()
        .children(&format!("/partitioned-topics/{tenant}/{namespace}"))
        .map_err(BrokerError::from)?;
    Ok(Json(
        names
            .into_iter()
            .map(|name| format!("persistent://{tenant}/{namespace}/{name}"))
            .collect(),
    ))
}

async fn create(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    require_namespace(&broker, &name)?;
    broker.create_topic(&name).await?;
    Ok(())
}

async fn delete(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    Query(query): Query<Force>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    if partitions_of(&broker, &name)?.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("{name} is a partitioned topic; delete it through /partitions"),
        ));
    }
    broker.delete_topic(&name, query.force).await?;
    Ok(())
}

fn partitions_body(payload: Bytes) -> ApiResult<u32> {
    let value: i64 = serde_json::from_slice(&payload).map_err(|error| {
        ApiError::bad_request(format!("expected the number of partitions: {error}"))
    })?;
    if !(1..=100_000).contains(&value) {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!("the number of partitions must be between 1 and 100000, not {value}"),
        ));
    }
    Ok(value as u32)
}

async fn create_partitioned(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    payload: Bytes,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    require_namespace(&broker, &name)?;
    let partitions = partitions_body(payload)?;
    if broker.exists(&name) {
        return Err(BrokerError::AlreadyExists(format!(
            "{name} exists as a non-partitioned topic"
        ))
        .into());
    }
    broker.create_partitioned_topic(&name, partitions)?;
    Ok(())
}

async fn update_partitions(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    payload: Bytes,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    broker.update_partitions(&name, partitions_body(payload)?)?;
    Ok(())
}

async fn get_partitions(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    require_namespace(&broker, &name)?;
    let partitions = partitions_of(&broker, &name)?.unwrap_or(0);
    Ok(Json(json!({ "partitions": partitions })))
}

async fn delete_partitioned(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    Query(query): Query<Force>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    broker.delete_partitioned_topic(&name, query.force).await?;
    Ok(())
}

async fn stats(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let loaded = existing_topic(&broker, &name).await?;
    let policies = broker.resources().effective_policies(&name)?;
    let stats = serde_json::to_value(loaded.stats(&policies))
        .map_err(|error| BrokerError::Unknown(error.to_string()))?;
    Ok(Json(stats))
}

/// Adds numbers, concatenates lists and merges objects key by key (Pulsar's aggregation of
/// partition stats).
fn merge_stats(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (key, value) in from {
                match into.get_mut(key) {
                    // A replication delay is an age: the partitioned topic's is the oldest.
                    Some(existing) if key == "replicationDelayInSeconds" => {
                        if value.as_u64() > existing.as_u64() {
                            *existing = value.clone();
                        }
                    }
                    // Connected only if every partition's replicator is.
                    Some(Value::Bool(existing)) if key == "connected" => {
                        *existing = *existing && value.as_bool().unwrap_or(false);
                    }
                    Some(existing) => merge_stats(existing, value),
                    None => {
                        into.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (Value::Array(into), Value::Array(from)) => into.extend(from.iter().cloned()),
        (into @ Value::Number(_), Value::Number(from)) => {
            let sum = match (into.as_i64(), from.as_i64()) {
                (Some(a), Some(b)) => json!(a.saturating_add(b)),
                _ => json!(into.as_f64().unwrap_or(0.0) + from.as_f64().unwrap_or(0.0)),
            };
            *into = sum;
        }
        _ => {}
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PerPartition {
    #[serde(default = "yes")]
    per_partition: bool,
}

fn yes() -> bool {
    true
}

async fn partitioned_stats(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    Query(query): Query<PerPartition>,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let partitions = partitions_of(&broker, &name)?
        .ok_or_else(|| BrokerError::NotFound(format!("partitioned topic {name} does not exist")))?;
    let mut aggregate = Value::Object(Map::new());
    let mut per_partition = Map::new();
    // Nothing is created or loaded: a loaded partition reports its live stats, one that is not
    // loaded what its files hold, one never used is empty (a topic of 100,000 partitions would
    // otherwise open them all, and each would take a place in the loaded-topic budget).
    let created: std::collections::HashSet<String> = broker.all_topics().into_iter().collect();
    for index in 0..partitions {
        let partition = name.partition(index);
        // A partition the broker cannot serve fails the whole answer with its reason, as its
        // own stats do: a sum without it would understate the topic's backlog and storage.
        if let Some(failure) = broker.health().failure(&partition.to_string()) {
            return Err(BrokerError::TopicUnavailable {
                topic: failure.topic,
                reason: failure.reason,
            }
            .into());
        }
        let stats = if let Some(loaded) = broker.loaded_topic(&partition) {
            loaded.stats(&broker.resources().effective_policies(&partition)?)
        } else if created.contains(&partition.to_string()) {
            let policies = broker.resources().effective_policies(&partition)?;
            stats_from_disk(&broker, &partition, &policies).await?
        } else {
            TopicStats::default()
        };
        let stats =
            serde_json::to_value(stats).map_err(|error| BrokerError::Unknown(error.to_string()))?;
        merge_stats(&mut aggregate, &stats);
        per_partition.insert(partition.to_string(), stats);
    }
    if let Value::Object(object) = &mut aggregate {
        object.insert("metadata".into(), json!({ "partitions": partitions }));
        if query.per_partition {
            object.insert("partitions".into(), Value::Object(per_partition));
        }
    }
    Ok(Json(aggregate))
}

/// Summaries of logs that are not open (stats from disk) computed at once, at most.
static DISK_SUMMARIES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The stats of a topic that is not loaded, from its files: storage size, backlogs and
/// subscriptions (no consumers, producers or rates: nothing is connected to it).
async fn stats_from_disk(
    broker: &AppState,
    name: &TopicName,
    policies: &EffectivePolicies,
) -> ApiResult<TopicStats> {
    // A few at a time: a flood of stats requests queues here instead of taking every
    // blocking thread (and the disk) from the rest of the broker.
    let _turn = DISK_SUMMARIES
        .acquire()
        .await
        .map_err(|error| BrokerError::Unknown(error.to_string()))?;
    let root = broker.storage().root().to_path_buf();
    let full_name = name.to_string();
    let summary = tokio::task::spawn_blocking(move || summarize_closed_log(&root, &full_name))
        .await
        .map_err(|error| BrokerError::Unknown(error.to_string()))?
        .map_err(BrokerError::from)?;
    let Some(summary) = summary else {
        return Ok(TopicStats::default());
    };
    let mut stats = TopicStats {
        storage_size: summary.storage_bytes,
        backlog_quota_limit_size: policies
            .backlog_quotas
            .get("destination_storage")
            .map_or(-1, |quota| quota.limit_size),
        backlog_quota_limit_time: policies
            .backlog_quotas
            .get("message_age")
            .map_or(-1, |quota| quota.limit_time),
        deduplication_status: if policies
            .deduplication_enabled
            .unwrap_or(broker.config().deduplication_enabled)
        {
            "Enabled"
        } else {
            "Disabled"
        }
        .into(),
        ..TopicStats::default()
    };
    for (cursor, state) in summary.cursors {
        if is_system_cursor(&cursor) {
            continue;
        }
        stats.backlog_size = stats.backlog_size.max(state.backlog_bytes);
        if is_replicator_cursor(&cursor) {
            continue;
        }
        let subscription = SubscriptionStats {
            kind: "Exclusive".into(),
            is_durable: true,
            msg_backlog: state.backlog_entries,
            msg_backlog_no_delayed: state.backlog_entries,
            backlog_size: state.backlog_bytes,
            is_replicated: is_replicated(&state.state),
            non_contiguous_deleted_messages_ranges: state.state.acknowledged.range_count() as u64,
            ..SubscriptionStats::default()
        };
        stats.subscriptions.insert(cursor, subscription);
    }
    Ok(stats)
}

async fn internal_stats(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let loaded = existing_topic(&broker, &name).await?;
    Ok(Json(
        serde_json::to_value(loaded.internal_stats())
            .map_err(|error| BrokerError::Unknown(error.to_string()))?,
    ))
}

async fn last_message_id(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let loaded = existing_topic(&broker, &name).await?;
    let partition_index = loaded.partition_index();
    Ok(Json(match loaded.last_message_id()? {
        Some((position, batch_index)) => json!({
            "ledgerId": position.ledger_id,
            "entryId": position.entry_id,
            "partitionIndex": partition_index,
            "batchIndex": batch_index,
        }),
        None => json!({
            "ledgerId": loaded.log().current_ledger_id(),
            "entryId": -1,
            "partitionIndex": partition_index,
        }),
    }))
}

async fn unload(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    for topic in covered_topics(&broker, &name)? {
        broker.unload(&topic).await;
    }
    Ok(())
}

async fn terminate(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    if partitions_of(&broker, &name)?.is_some() {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{name} is a partitioned topic; terminate its partitions"),
        ));
    }
    let last = broker.terminate(&name).await?;
    let partition_index = name.partition_index().map_or(-1, i64::from);
    Ok(Json(match last {
        Some(position) => json!({
            "ledgerId": position.ledger_id,
            "entryId": position.entry_id,
            "partitionIndex": partition_index,
        }),
        None => json!({ "ledgerId": -1, "entryId": -1, "partitionIndex": partition_index }),
    }))
}

async fn subscriptions(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Vec<String>>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let mut names = std::collections::BTreeSet::new();
    let partitioned = partitions_of(&broker, &name)?.is_some();
    for covered in covered_topics(&broker, &name)? {
        if partitioned && !broker.exists(&covered) {
            continue;
        }
        if partitioned && broker.loaded_topic(&covered).is_none() {
            // A partition not loaded answers from its cursor journal: listing a partitioned
            // topic's subscriptions loads none of its partitions.
            let root = broker.storage().root().to_path_buf();
            let full_name = covered.to_string();
            let cursors =
                tokio::task::spawn_blocking(move || closed_log_cursors(&root, &full_name))
                    .await
                    .map_err(|error| BrokerError::Unknown(error.to_string()))?
                    .map_err(BrokerError::from)?;
            names.extend(
                cursors
                    .into_keys()
                    .filter(|cursor| !is_system_cursor(cursor) && !is_replicator_cursor(cursor)),
            );
            continue;
        }
        names.extend(
            existing_topic(&broker, &covered)
                .await?
                .subscription_names(),
        );
    }
    Ok(Json(names.into_iter().collect()))
}

/// Pulsar's `MessageIdImpl` JSON body.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageIdBody {
    ledger_id: i64,
    entry_id: i64,
    #[serde(default)]
    #[allow(dead_code)]
    partition_index: Option<i64>,
}

impl MessageIdBody {
    /// Earliest (-1:-1), latest (i64::MAX), or a position.
    fn target(&self) -> SeekTarget {
        if self.ledger_id < 0 || self.entry_id < 0 {
            SeekTarget::Earliest
        } else if self.ledger_id == i64::MAX {
            SeekTarget::Latest
        } else {
            SeekTarget::Position(Position::new(self.ledger_id as u64, self.entry_id as u64))
        }
    }
}

#[derive(Deserialize, Default)]
struct CreateSubscription {
    /// Pulsar's `replicated`: the new subscription is a replicated one.
    #[serde(default)]
    replicated: bool,
}

async fn create_subscription(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription)): SubscriptionPath,
    Query(query): Query<CreateSubscription>,
    payload: Bytes,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let target = if payload.iter().all(u8::is_ascii_whitespace) {
        SeekTarget::Latest
    } else {
        serde_json::from_slice::<MessageIdBody>(&payload)
            .map_err(|error| ApiError::bad_request(format!("invalid MessageId body: {error}")))?
            .target()
    };
    for covered in covered_topics(&broker, &name)? {
        let loaded = broker.topic(&covered, true).await?;
        let mark_delete = loaded.mark_delete_for(target)?;
        loaded.create_subscription(&subscription, Some(mark_delete))?;
        if query.replicated {
            loaded.set_subscription_replicated(&subscription, true)?;
        }
    }
    Ok(())
}

/// Pulsar's `replicatedSubscriptionStatus`: `true` or `false` for the subscription on the topic
/// (on every partition of a partitioned topic).
async fn set_replicated_status(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription)): SubscriptionPath,
    payload: Result<Json<bool>, JsonRejection>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let replicated = body(payload)?;
    for covered in covered_topics(&broker, &name)? {
        existing_topic(&broker, &covered)
            .await?
            .set_subscription_replicated(&subscription, replicated)?;
    }
    Ok(())
}

/// The largest replicated-subscription state accepted from another cluster.
const SYNCED_STATE_MAX_BYTES: usize = 64 * 1024 * 1024;

/// Another cluster's acknowledgements of a replicated subscription (Meridian's sync between
/// clusters; see `replication::subscription_sync`).
async fn receive_replicated_state(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription)): SubscriptionPath,
    payload: Result<String, StringRejection>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    // Kept as it came: the receiver stores the text itself rather than encoding the decoded
    // state again.
    let raw = payload.map_err(|rejection| {
        ApiError::bad_request(format!("invalid request body: {}", rejection.body_text()))
    })?;
    received_state::receive_from_cluster(&broker, &name, subscription, raw).await?;
    Ok(())
}

/// Whether the subscription is replicated, per topic (each partition of a partitioned one).
async fn get_replicated_status(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription)): SubscriptionPath,
) -> ApiResult<Json<BTreeMap<String, bool>>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let mut statuses = BTreeMap::new();
    for covered in covered_topics(&broker, &name)? {
        let loaded = existing_topic(&broker, &covered).await?;
        statuses.insert(
            covered.to_string(),
            loaded.is_subscription_replicated(&subscription)?,
        );
    }
    Ok(Json(statuses))
}

async fn delete_subscription(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription)): SubscriptionPath,
    Query(query): Query<Force>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    for covered in covered_topics(&broker, &name)? {
        existing_topic(&broker, &covered)
            .await?
            .delete_subscription(&subscription, query.force)?;
    }
    Ok(())
}

async fn reset(
    broker: &AppState,
    name: &TopicName,
    subscription: &str,
    target: SeekTarget,
) -> ApiResult<()> {
    for covered in covered_topics(broker, name)? {
        let loaded = existing_topic(broker, &covered).await?;
        let mark_delete = loaded.mark_delete_for(target)?;
        loaded.reset_subscription(subscription, mark_delete)?;
    }
    Ok(())
}

async fn reset_cursor_by_time(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription, timestamp)): Path<(
        String,
        String,
        String,
        String,
        u64,
    )>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    reset(
        &broker,
        &name,
        &subscription,
        SeekTarget::PublishTime(timestamp),
    )
    .await
}

async fn reset_cursor_by_id(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription)): SubscriptionPath,
    payload: Result<Json<MessageIdBody>, JsonRejection>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let target = body(payload)?.target();
    reset(&broker, &name, &subscription, target).await
}

/// Runs `work` on a blocking thread: calls that read many entries from a log (skip, expire,
/// peek far into a backlog) must not hold up the server's worker threads and every connection
/// they serve.
async fn on_blocking_thread<T: Send + 'static>(
    work: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| BrokerError::Unknown(error.to_string()))?
}

/// Acknowledges the next `count` unacknowledged entries of a subscription (all with `None`).
fn skip_entries(topic: &Topic, subscription: &str, count: Option<u64>) -> ApiResult<()> {
    let log = topic.log();
    let Some(mark_delete) = log.mark_delete_position(subscription) else {
        return Err(
            BrokerError::NotFound(format!("subscription {subscription} does not exist")).into(),
        );
    };
    if count.is_none() {
        if let Some(last) = log.last_position() {
            log.acknowledge_cumulative(subscription, last)
                .map_err(BrokerError::from)?;
        }
        return Ok(());
    }
    let mut remaining = count.unwrap_or(0);
    let mut next = match mark_delete {
        Some(position) => log.next_position(position),
        None => match log.first_position() {
            Some(first) => first,
            None => return Ok(()),
        },
    };
    while remaining > 0 {
        let entries = log
            .read_from(next, 1000, 16 * 1024 * 1024)
            .map_err(BrokerError::from)?;
        let Some(last) = entries.last().map(|entry| entry.position) else {
            break;
        };
        let skipped: Vec<Position> = entries
            .iter()
            .map(|entry| entry.position)
            .filter(|position| !log.is_acknowledged(subscription, *position))
            .take(remaining as usize)
            .collect();
        remaining -= skipped.len() as u64;
        log.acknowledge(subscription, &skipped)
            .map_err(BrokerError::from)?;
        next = log.next_position(last);
    }
    Ok(())
}

async fn skip(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription, count)): Path<(
        String,
        String,
        String,
        String,
        u64,
    )>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    for covered in covered_topics(&broker, &name)? {
        let loaded = existing_topic(&broker, &covered).await?;
        let subscription = subscription.clone();
        on_blocking_thread(move || skip_entries(&loaded, &subscription, Some(count))).await?;
    }
    Ok(())
}

async fn skip_all(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription)): SubscriptionPath,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    for covered in covered_topics(&broker, &name)? {
        let loaded = existing_topic(&broker, &covered).await?;
        let subscription = subscription.clone();
        on_blocking_thread(move || skip_entries(&loaded, &subscription, None)).await?;
    }
    Ok(())
}

async fn expire_messages(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription, seconds)): Path<(
        String,
        String,
        String,
        String,
        u64,
    )>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let cutoff = meridian_broker::clock::now_ms().saturating_sub(seconds * 1000);
    for covered in covered_topics(&broker, &name)? {
        let loaded = existing_topic(&broker, &covered).await?;
        let subscription = subscription.clone();
        on_blocking_thread(move || Ok(loaded.expire_subscription(&subscription, cutoff)?)).await?;
    }
    Ok(())
}

/// The `position`-th (1-based) unacknowledged message of a subscription, with Pulsar's
/// `X-Pulsar-*` headers (peek-messages).
async fn peek(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic, subscription, position)): Path<(
        String,
        String,
        String,
        String,
        u64,
    )>,
) -> ApiResult<Response> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let loaded = existing_topic(&broker, &name).await?;
    on_blocking_thread(move || peek_entry(&loaded, &subscription, position)).await
}

fn peek_entry(loaded: &Topic, subscription: &str, position: u64) -> ApiResult<Response> {
    let log = loaded.log();
    let Some(mark_delete) = log.mark_delete_position(subscription) else {
        return Err(
            BrokerError::NotFound(format!("subscription {subscription} does not exist")).into(),
        );
    };
    let mut next = match mark_delete {
        Some(position) => log.next_position(position),
        None => log.first_position().unwrap_or_else(|| log.end_position()),
    };
    let mut remaining = position.max(1);
    loop {
        let entries = log
            .read_from(next, 1000, 16 * 1024 * 1024)
            .map_err(BrokerError::from)?;
        let Some(last) = entries.last().map(|entry| entry.position) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no message at that position",
            ));
        };
        for entry in entries {
            if log.is_acknowledged(subscription, entry.position) {
                continue;
            }
            remaining -= 1;
            if remaining == 0 {
                return message_response(entry);
            }
        }
        next = log.next_position(last);
    }
}

fn message_response(entry: meridian_storage::Entry) -> ApiResult<Response> {
    let parsed = meridian_wire::parse_entry(entry.data).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("stored entry does not parse: {error}"),
        )
    })?;
    let metadata = parsed.metadata;
    let mut headers = HeaderMap::new();
    let mut add = |key: String, value: String| {
        if let (Ok(key), Ok(value)) = (
            axum::http::HeaderName::try_from(key),
            HeaderValue::from_str(&value),
        ) {
            headers.insert(key, value);
        }
    };
    add(
        "X-Pulsar-Message-ID".into(),
        format!("{}:{}", entry.position.ledger_id, entry.position.entry_id),
    );
    add(
        "X-Pulsar-publish-time".into(),
        metadata.publish_time.to_string(),
    );
    add(
        "X-Pulsar-producer-name".into(),
        metadata.producer_name.clone(),
    );
    add(
        "X-Pulsar-sequence-id".into(),
        metadata.sequence_id.to_string(),
    );
    if let Some(key) = &metadata.partition_key {
        add("X-Pulsar-partition-key".into(), key.clone());
    }
    if let Some(count) = metadata.num_messages_in_batch {
        add("X-Pulsar-num-batch-message".into(), count.to_string());
    }
    for property in &metadata.properties {
        add(
            format!("X-Pulsar-PROPERTY-{}", property.key),
            property.value.clone(),
        );
    }
    Ok((StatusCode::OK, headers, Body::from(parsed.payload)).into_response())
}

// Topic-level policies.

async fn get_retention(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Option<RetentionPolicies>>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    Ok(Json(
        broker.resources().topic_policies(&name)?.retention_policies,
    ))
}

async fn change_topic_policies(
    broker: &AppState,
    name: &TopicName,
    apply: impl FnMut(&mut meridian_broker::resources::TopicPolicies),
) -> ApiResult<()> {
    require_namespace(broker, name)?;
    broker.resources().update_topic_policies(name, apply)?;
    broker
        .policies_changed(&name.tenant, Some(&name.namespace))
        .await;
    Ok(())
}

async fn set_retention(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    payload: Result<Json<RetentionPolicies>, JsonRejection>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let retention = validate_retention(body(payload)?)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.retention_policies = Some(retention)
    })
    .await
}

async fn remove_retention(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.retention_policies = None
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TtlQuery {
    #[serde(rename = "messageTTL")]
    message_ttl: Option<i64>,
}

async fn get_ttl(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Option<i64>>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    Ok(Json(
        broker
            .resources()
            .topic_policies(&name)?
            .message_ttl_in_seconds,
    ))
}

async fn set_ttl(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    Query(query): Query<TtlQuery>,
    payload: Bytes,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let seconds = match query.message_ttl {
        Some(seconds) => seconds,
        None => serde_json::from_slice(&payload).map_err(|error| {
            ApiError::bad_request(format!("expected messageTTL seconds: {error}"))
        })?,
    };
    if seconds < 0 {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            "message TTL must not be negative",
        ));
    }
    change_topic_policies(&broker, &name, |policies| {
        policies.message_ttl_in_seconds = Some(seconds)
    })
    .await
}

async fn remove_ttl(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.message_ttl_in_seconds = None
    })
    .await
}

async fn get_backlog_quotas(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<BTreeMap<String, BacklogQuota>>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    Ok(Json(
        broker.resources().topic_policies(&name)?.backlog_quota_map,
    ))
}

async fn set_backlog_quota(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    Query(query): Query<QuotaType>,
    payload: Result<Json<BacklogQuota>, JsonRejection>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let kind = quota_type(&query)?;
    let quota = body(payload)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.backlog_quota_map.insert(kind.clone(), quota);
    })
    .await
}

async fn remove_backlog_quota(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    Query(query): Query<QuotaType>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let kind = quota_type(&query)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.backlog_quota_map.remove(&kind);
    })
    .await
}

async fn get_deduplication(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Option<bool>>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    Ok(Json(
        broker
            .resources()
            .topic_policies(&name)?
            .deduplication_enabled,
    ))
}

async fn set_deduplication(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    payload: Result<Json<bool>, JsonRejection>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let enabled = body(payload)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.deduplication_enabled = Some(enabled)
    })
    .await
}

async fn remove_deduplication(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.deduplication_enabled = None
    })
    .await
}

async fn get_replication(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Option<Vec<String>>>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    Ok(Json(
        broker
            .resources()
            .topic_policies(&name)?
            .replication_clusters,
    ))
}

async fn set_replication(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
    payload: Result<Json<Vec<String>>, JsonRejection>,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    let clusters = body(payload)?;
    let known = broker.resources().clusters()?;
    if let Some(unknown) = clusters.iter().find(|cluster| !known.contains(cluster)) {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!("cluster {unknown} does not exist"),
        ));
    }
    change_topic_policies(&broker, &name, |policies| {
        policies.replication_clusters = Some(clusters.clone())
    })
    .await
}

async fn remove_replication(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<()> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    change_topic_policies(&broker, &name, |policies| {
        policies.replication_clusters = None
    })
    .await
}

async fn lookup(
    State(broker): State<AppState>,
    Path((tenant, namespace, topic)): TopicPath,
) -> ApiResult<Json<Value>> {
    let name = topic_name(&tenant, &namespace, &topic)?;
    require_namespace(&broker, &name)?;
    // Pulsar's shape, every field present: the C++ client (and the Python one on it) takes an
    // answer without `brokerUrlTls` for malformed. A URL this broker does not know is "".
    // A tenant that moved (or is moving) to another cluster: that cluster's URLs.
    if let Some(redirect) = meridian_broker::migration::redirect(&broker, &name) {
        return Ok(Json(json!({
            "brokerUrl": redirect.broker_service_url,
            "brokerUrlTls": "",
            "httpUrl": redirect.service_url.unwrap_or_default(),
            "httpUrlTls": "",
            "nativeUrl": redirect.broker_service_url,
        })));
    }
    let config = broker.config();
    Ok(Json(json!({
        "brokerUrl": config.broker_service_url,
        "brokerUrlTls": config.broker_service_url_tls.clone().unwrap_or_default(),
        "httpUrl": config.web_service_url,
        "httpUrlTls": config.web_service_url_tls.clone().unwrap_or_default(),
        "nativeUrl": config.broker_service_url,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_stats_add_up_and_replication_ages_do_not() {
        let mut total = Value::Object(Map::new());
        for (backlog, delay, connected) in [(3, 7, true), (4, 2, false), (5, 0, true)] {
            let partition = json!({
                "msgInCounter": backlog * 10,
                "replication": { "b": {
                    "replicationBacklog": backlog,
                    "replicationDelayInSeconds": delay,
                    "connected": connected,
                }},
            });
            merge_stats(&mut total, &partition);
        }
        assert_eq!(total["msgInCounter"], 120);
        let replication = &total["replication"]["b"];
        assert_eq!(replication["replicationBacklog"], 12);
        assert_eq!(replication["replicationDelayInSeconds"], 7);
        assert_eq!(replication["connected"], false);
    }
}
