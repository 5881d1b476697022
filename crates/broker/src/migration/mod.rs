//! Tenant migration between clusters (`docs/migration.md`): the durable migration record, the
//! start/status/abort operations behind `/admin/v2/tenants/{tenant}/migration`, and the
//! background task on the source cluster that drives a migration through its phases.
//!
//! Built: metadata copied to the target, the tenant's namespaces replicating to the target
//! from each topic's earliest message, "caught up" once the target lacks nothing, subscription
//! state synced, producers redirected behind a fence, consumers redirected once their final
//! state is on the target, done. Cleanup and the lookup front door are not here yet.
//!
//! # Layout
//!
//! - this file: the record (metadata key [`record_key`]), phases, status and progress, and the
//!   operations the admin API calls;
//! - `driver`: the per-tenant background task (resumed at startup by [`resume_all`]);
//! - `target`: the idempotent admin calls that create the tenant's metadata on the target.

mod driver;
mod target;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use meridian_metadata::{ExpectedVersion, MetadataError, MetadataStore};
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::error::{BrokerError, Result};
use crate::topic_name::TopicName;

/// Where a tenant's migration record lives in the source cluster's metadata store.
pub fn record_key(tenant: &str) -> String {
    format!("{RECORDS}/{tenant}")
}

const RECORDS: &str = "/meridian/migrations";

/// The phases a migration goes through, in order (`Aborting` is not one of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Creating the tenant, its namespaces and policies on the target; then adding the target
    /// to each namespace's replication clusters on the source.
    CopyingMetadata,
    /// Every topic of the tenant replicates to the target, from its earliest message.
    Replicating,
    /// The target held everything the source stores for the tenant at one observation (the
    /// source still takes writes, so this is "caught up so far", see the doc).
    CaughtUp,
    /// Every durable subscription of the tenant is replicated and the target has its latest
    /// state (as of one observation: consumers still acknowledge on the source).
    SubscriptionsSynced,
    /// The tenant's producers were told to move to the target (behind the fence, once the
    /// target held everything); lookups redirect there. Consumers are still on the source.
    ProducersRedirected,
    /// The tenant's consumers were told to move too (after their final state reached the
    /// target).
    ConsumersRedirected,
    /// No producer or consumer of the tenant is left on the source.
    Done,
    /// An abort is under way: the source's settings are being put back.
    Aborting,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::CopyingMetadata => "copyingMetadata",
            Phase::Replicating => "replicating",
            Phase::CaughtUp => "caughtUp",
            Phase::SubscriptionsSynced => "subscriptionsSynced",
            Phase::ProducersRedirected => "producersRedirected",
            Phase::ConsumersRedirected => "consumersRedirected",
            Phase::Done => "done",
            Phase::Aborting => "aborting",
        }
    }
}

/// The durable record of a running migration (JSON in the source's metadata store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    pub tenant: String,
    pub source_cluster: String,
    pub target_cluster: String,
    pub phase: Phase,
    pub started_at_ms: u64,
    pub phase_changed_at_ms: u64,
    /// Why the migration does not move on (the target unreachable, a refused call); `None`
    /// while it makes progress.
    #[serde(default)]
    pub paused_reason: Option<String>,
    /// The tenant's allowed clusters before the migration, put back by an abort.
    pub original_allowed_clusters: Vec<String>,
    /// Each namespace's replication clusters before the migration added the target (recorded
    /// when the migration first changes it), put back by an abort.
    #[serde(default)]
    pub original_replication: BTreeMap<String, Vec<String>>,
    /// Subscriptions the migration made replicated (`topic` and `subscription`), written
    /// before each is marked; an abort takes the mark back.
    #[serde(default)]
    pub marked_replicated: Vec<(String, String)>,
    /// Whether the migration created the tenant on the target (noted before creating it).
    #[serde(default)]
    pub created_tenant_on_target: bool,
    /// Namespaces (without the tenant) the migration created on the target, noted before.
    #[serde(default)]
    pub created_namespaces_on_target: Vec<String>,
    /// Partitioned topics (full names) the target holds with their partition count, noted
    /// after each copy: one created (or grown) on the source later is copied again.
    #[serde(default)]
    pub partitioned_on_target: BTreeMap<String, u32>,
    /// Stop before the redirect (after "subscriptions synced") until an operator releases it
    /// (`POST …/migration/redirect`): the switch happens when the operator chooses.
    #[serde(default)]
    pub hold_before_redirect: bool,
    /// `--cleanup` was asked for (written first): a restart finishes it.
    #[serde(default)]
    pub cleaning_up: bool,
    /// When the source fenced the tenant's producers (written before any is refused): from
    /// here on the source stores no message of theirs and redirects lookups to the target.
    #[serde(default)]
    pub fenced_at_ms: Option<u64>,
    /// When the source stopped dispatching to the tenant's consumers (written before).
    #[serde(default)]
    pub dispatch_stopped_at_ms: Option<u64>,
    /// When the acknowledgements of what was delivered came back (or the wait for them ended).
    #[serde(default)]
    pub acks_settled_at_ms: Option<u64>,
}

/// How far replication of one topic to the target is.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicationProgress {
    pub connected: bool,
    pub backlog_entries: u64,
    pub backlog_bytes: u64,
}

/// Progress figures, computed when asked (not stored).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Namespaces of the tenant whose replication clusters include the target on the source.
    pub namespaces_replicating: usize,
    pub namespaces_total: usize,
    /// Topics (partitions counted one by one) with a connected replicator to the target.
    pub topics_replicating: usize,
    pub topics_total: usize,
    /// What the target still lacks, summed over the topics that replicate to it.
    pub backlog_entries: u64,
    pub backlog_bytes: u64,
    /// Durable subscriptions of the tenant's topics whose latest state the target has.
    pub subscriptions_synced: usize,
    pub subscriptions_total: usize,
    /// The tenant's producers (not replicators) and consumers still connected to the source.
    pub producers_on_source: usize,
    pub consumers_on_source: usize,
    /// Messages the source delivered to the tenant's consumers that are not acknowledged yet.
    pub unacknowledged_on_source: usize,
}

impl Progress {
    /// The target held everything: every topic replicates to it and no backlog is left.
    fn caught_up(&self) -> bool {
        self.namespaces_replicating == self.namespaces_total
            && self.topics_replicating == self.topics_total
            && self.backlog_entries == 0
    }
}

/// One line of the phase-by-phase view.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PhaseLine {
    pub name: &'static str,
    /// `done`, `running`, `pending`, or `notBuilt` (a planned phase this version lacks).
    pub state: &'static str,
    pub progress: String,
}

/// `GET /admin/v2/tenants/{tenant}/migration`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    pub tenant: String,
    pub source_cluster: String,
    pub target_cluster: String,
    pub phase: &'static str,
    pub paused: bool,
    pub paused_reason: Option<String>,
    pub started_at_ms: u64,
    pub phase_changed_at_ms: u64,
    pub progress: Progress,
    pub phases: Vec<PhaseLine>,
}

/// The drivers running in this broker, one per migrating tenant, and the redirects in force.
#[derive(Default)]
pub struct Drivers {
    running: Mutex<HashMap<String, Arc<driver::Handle>>>,
    /// Tenants whose clients go to another cluster (fenced or moved), by tenant.
    redirects: Mutex<HashMap<String, Redirect>>,
}

impl Drivers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<driver::Handle>>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn redirects(&self) -> std::sync::MutexGuard<'_, HashMap<String, Redirect>> {
        self.redirects
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where a fenced or moved tenant's clients are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The target's binary protocol URL (`pulsar://…`).
    pub broker_service_url: String,
    /// The target's HTTP URL, for `/lookup/v2`.
    pub service_url: Option<String>,
    /// Producers were redirected: the target holds everything the source stored, and lookups
    /// go there. Before (fenced only), lookups stay here and new producers are refused.
    pub producers: bool,
    /// Consumers were redirected too: the source takes no new subscription of the tenant.
    pub consumers: bool,
}

/// Where to send a client that looks `topic` up here: `Some` once its tenant's producers were
/// redirected (LOOKUP answers Redirect, authoritative, to the target).
pub fn redirect(broker: &Broker, topic: &TopicName) -> Option<Redirect> {
    fence(broker, topic).filter(|redirect| redirect.producers)
}

/// The tenant's fence, from the moment its producers are fenced.
fn fence(broker: &Broker, topic: &TopicName) -> Option<Redirect> {
    broker
        .migration_drivers()
        .redirects()
        .get(&topic.tenant)
        .cloned()
}

/// Refuses a new producer of a fenced tenant (retriable: the client looks the topic up again
/// and is redirected to the target).
pub fn admit_producer(broker: &Broker, topic: &TopicName) -> Result<()> {
    match fence(broker, topic) {
        Some(redirect) => Err(BrokerError::TenantMigrated(format!(
            "tenant {} is moving to {}: look the topic up again",
            topic.tenant, redirect.broker_service_url
        ))),
        None => Ok(()),
    }
}

/// Refuses a new consumer of a tenant whose consumers were redirected (retriable, as above).
pub fn admit_consumer(broker: &Broker, topic: &TopicName) -> Result<()> {
    match redirect(broker, topic) {
        Some(redirect) if redirect.consumers => Err(BrokerError::TenantMigrated(format!(
            "tenant {} moved to {}: look the topic up again",
            topic.tenant, redirect.broker_service_url
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads a tenant's migration record.
pub fn record(metadata: &Arc<dyn MetadataStore>, tenant: &str) -> Result<Option<MigrationRecord>> {
    let key = record_key(tenant);
    match metadata.get(&key)? {
        Some(stored) => serde_json::from_slice(&stored.value)
            .map(Some)
            .map_err(|error| BrokerError::Metadata(format!("record {key} is unreadable: {error}"))),
        None => Ok(None),
    }
}

/// Changes a tenant's record, retrying if it changed concurrently; `Ok(None)` if it is gone.
pub(crate) fn update_record(
    metadata: &Arc<dyn MetadataStore>,
    tenant: &str,
    mut change: impl FnMut(&mut MigrationRecord),
) -> Result<Option<MigrationRecord>> {
    let key = record_key(tenant);
    loop {
        let Some(stored) = metadata.get(&key)? else {
            return Ok(None);
        };
        let mut value: MigrationRecord =
            serde_json::from_slice(&stored.value).map_err(|error| {
                BrokerError::Metadata(format!("record {key} is unreadable: {error}"))
            })?;
        change(&mut value);
        let bytes =
            serde_json::to_vec(&value).map_err(|error| BrokerError::Metadata(error.to_string()))?;
        match metadata.put(&key, &bytes, ExpectedVersion::Exactly(stored.version)) {
            Ok(_) => return Ok(Some(value)),
            Err(MetadataError::BadVersion { .. }) => continue,
            Err(error) => return Err(error.into()),
        }
    }
}

/// The remotes whose new replication cursors for `topic` start at the earliest message: the
/// target of its tenant's migration, if one is under way (so existing messages are copied).
pub(crate) fn earliest_remotes(
    metadata: &Arc<dyn MetadataStore>,
    topic: &TopicName,
) -> Vec<String> {
    match record(metadata, &topic.tenant) {
        Ok(Some(record)) if record.phase != Phase::Aborting => vec![record.target_cluster],
        _ => Vec::new(),
    }
}

/// Starts migrating `tenant` to `target` (`POST …/migration`): validates, stores the record,
/// and starts the driver.
pub fn start(
    broker: &Arc<Broker>,
    tenant: &str,
    target: &str,
    hold_before_redirect: bool,
) -> Result<MigrationStatus> {
    let local = broker.config().cluster_name.clone();
    let target = target.trim();
    if target.is_empty() {
        return Err(BrokerError::BadRequest(
            "targetCluster is required: the name of a registered cluster".into(),
        ));
    }
    if target == local {
        return Err(BrokerError::BadRequest(format!(
            "tenant {tenant} is already on cluster {local}: the target must be another cluster"
        )));
    }
    let info = broker.resources().tenant(tenant)?;
    let data = match broker.resources().cluster(target) {
        Ok(data) => data,
        Err(BrokerError::NotFound(_)) => {
            return Err(BrokerError::PreconditionFailed(format!(
                "cluster {target} is not registered on cluster {local}: register it first (PUT /admin/v2/clusters/{target})"
            )))
        }
        Err(error) => return Err(error),
    };
    let has = |url: &Option<String>| url.as_deref().is_some_and(|url| !url.is_empty());
    if !has(&data.service_url) || !has(&data.broker_service_url) {
        return Err(BrokerError::PreconditionFailed(format!(
            "cluster {target} needs both serviceUrl and brokerServiceUrl in this cluster's registry to take a tenant"
        )));
    }
    let now = now_ms();
    let record = MigrationRecord {
        tenant: tenant.to_string(),
        source_cluster: local,
        target_cluster: target.to_string(),
        phase: Phase::CopyingMetadata,
        started_at_ms: now,
        phase_changed_at_ms: now,
        paused_reason: None,
        original_allowed_clusters: info.allowed_clusters,
        original_replication: BTreeMap::new(),
        marked_replicated: Vec::new(),
        created_tenant_on_target: false,
        created_namespaces_on_target: Vec::new(),
        partitioned_on_target: BTreeMap::new(),
        hold_before_redirect,
        cleaning_up: false,
        fenced_at_ms: None,
        dispatch_stopped_at_ms: None,
        acks_settled_at_ms: None,
    };
    let bytes =
        serde_json::to_vec(&record).map_err(|error| BrokerError::Metadata(error.to_string()))?;
    match broker
        .metadata()
        .put(&record_key(tenant), &bytes, ExpectedVersion::Absent)
    {
        Ok(_) => {}
        Err(MetadataError::BadVersion { .. }) => {
            let existing = self::record(broker.metadata(), tenant)?;
            let what = existing.map_or_else(String::new, |existing| {
                format!(
                    " to cluster {} (phase {})",
                    existing.target_cluster,
                    existing.phase.name()
                )
            });
            return Err(BrokerError::Conflict(format!(
                "tenant {tenant} is already migrating{what}; abort it first (DELETE /admin/v2/tenants/{tenant}/migration)"
            )));
        }
        Err(error) => return Err(error.into()),
    }
    tracing::info!(%tenant, target = %target, "tenant migration started");
    driver::spawn(broker, tenant);
    Ok(status_of(broker, &record))
}

/// The status of a tenant's migration (`GET …/migration`).
pub fn status(broker: &Arc<Broker>, tenant: &str) -> Result<MigrationStatus> {
    match record(broker.metadata(), tenant)? {
        Some(record) => Ok(status_of(broker, &record)),
        None => Err(not_migrating(tenant)),
    }
}

impl MigrationRecord {
    /// Whether the source fenced the tenant: from here on its clients are sent to the target,
    /// and the migration cannot be aborted.
    pub fn redirecting(&self) -> bool {
        self.phase != Phase::Aborting
            && (self.fenced_at_ms.is_some() || self.phase >= Phase::ProducersRedirected)
    }
}

fn not_migrating(tenant: &str) -> BrokerError {
    BrokerError::NotFound(format!("tenant {tenant} has no migration under way"))
}

/// Releases a migration held before its redirect (`POST …/migration/redirect`): the driver
/// goes on with the fence and the redirect. Returns the status.
pub fn release(broker: &Arc<Broker>, tenant: &str) -> Result<MigrationStatus> {
    match update_record(broker.metadata(), tenant, |record| {
        record.hold_before_redirect = false
    })? {
        Some(record) => {
            tracing::info!(%tenant, "tenant migration: redirect released");
            Ok(status_of(broker, &record))
        }
        None => Err(not_migrating(tenant)),
    }
}

/// Removes a migrated tenant from the source (`POST …/migration/cleanup`) once the migration
/// is done and no client of the tenant is left here: the source leaves the target's
/// replication lists, then the tenant's topics (their logs), namespaces and the tenant are
/// deleted here, then the migration record. Returns the last status.
pub async fn cleanup(broker: &Arc<Broker>, tenant: &str) -> Result<MigrationStatus> {
    let Some(current) = record(broker.metadata(), tenant)? else {
        return Err(not_migrating(tenant));
    };
    if current.phase != Phase::Done {
        return Err(BrokerError::Conflict(format!(
            "tenant {tenant}'s migration to {} is in phase {}: cleanup needs phase done",
            current.target_cluster,
            current.phase.name()
        )));
    }
    let handle = driver::spawn(broker, tenant);
    let _step = handle.step.lock().await;
    let clients = {
        let progress = progress(broker, &current);
        progress.producers_on_source + progress.consumers_on_source
    };
    if clients > 0 {
        return Err(BrokerError::Conflict(format!(
            "{clients} producer(s) or consumer(s) of tenant {tenant} are still connected to cluster {}; they are being redirected, try again",
            current.source_cluster
        )));
    }
    let Some(record) = update_record(broker.metadata(), tenant, |record| {
        record.cleaning_up = true
    })?
    else {
        return Err(not_migrating(tenant));
    };
    let status = status_of(broker, &record);
    if let Err(error) = driver::finish_cleanup(broker, &record).await {
        return paused(broker, record, format!("cleaning up: {error}"));
    }
    tracing::info!(%tenant, target = %record.target_cluster, "tenant migration cleaned up: the tenant is gone from this cluster");
    Ok(status)
}

/// An abort or cleanup that could not finish now: the reason goes to the record (the driver
/// retries with backoff) and the status says why it waits.
fn paused(
    broker: &Arc<Broker>,
    record: MigrationRecord,
    reason: String,
) -> Result<MigrationStatus> {
    tracing::warn!(tenant = %record.tenant, %reason, "tenant migration paused; will retry");
    let record = update_record(broker.metadata(), &record.tenant, |stored| {
        stored.paused_reason = Some(reason.clone())
    })?
    .unwrap_or(record);
    Ok(status_of(broker, &record))
}

/// Aborts a migration before its redirect phase (`DELETE …/migration`): the source's tenant
/// and namespace settings are put back and the record is removed. Returns the last status.
pub async fn abort(broker: &Arc<Broker>, tenant: &str) -> Result<MigrationStatus> {
    if record(broker.metadata(), tenant)?.is_none() {
        return Err(not_migrating(tenant));
    }
    let handle = driver::spawn(broker, tenant);
    let _step = handle.step.lock().await;
    // Read again under the step lock: the driver may have fenced meanwhile.
    let Some(current) = record(broker.metadata(), tenant)? else {
        return Err(not_migrating(tenant));
    };
    if current.redirecting() {
        return Err(BrokerError::Conflict(format!(
            "tenant {tenant} is being redirected to cluster {} (phase {}): a migration cannot be aborted once its producers are fenced; migrate the tenant back instead",
            current.target_cluster,
            current.phase.name()
        )));
    }
    let Some(record) = update_record(broker.metadata(), tenant, |record| {
        record.phase = Phase::Aborting;
        record.phase_changed_at_ms = now_ms();
    })?
    else {
        return Err(not_migrating(tenant));
    };
    let status = status_of(broker, &record);
    if let Err(error) = driver::finish_abort(broker, &record).await {
        // Typically the target unreachable while its copies are removed: the abort is recorded
        // and the driver finishes it (with backoff); the status says why it waits.
        return paused(broker, record, format!("aborting: {error}"));
    }
    tracing::info!(%tenant, target = %record.target_cluster, "tenant migration aborted");
    Ok(status)
}

/// Starts a driver for every migration recorded in this cluster's metadata (at startup, so a
/// restart resumes them).
pub fn resume_all(broker: &Arc<Broker>) {
    let tenants = match broker.metadata().children(RECORDS) {
        Ok(tenants) => tenants,
        Err(error) => {
            tracing::error!(%error, "reading tenant migrations failed; none resumed");
            return;
        }
    };
    for tenant in tenants {
        tracing::info!(%tenant, "resuming tenant migration");
        // The redirect is in force before any client can reach the restarted broker.
        match record(broker.metadata(), &tenant) {
            Ok(Some(record)) if record.redirecting() => {
                driver::install_redirect(broker, &record);
            }
            Ok(_) => {}
            Err(error) => tracing::error!(%tenant, %error, "reading a tenant migration failed"),
        }
        driver::spawn(broker, &tenant);
    }
}

/// How many sync intervals a subscription's state may lag behind the target before the
/// consumers are moved (see [`progress`]).
const SYNCED_LAG_INTERVALS: u32 = 5;

/// Live progress of a migration.
pub fn progress(broker: &Broker, record: &MigrationRecord) -> Progress {
    let mut progress = Progress::default();
    let target = &record.target_cluster;
    // A partition nothing was ever written to has no log: nothing to copy.
    let with_log: std::collections::BTreeSet<String> = broker.all_topics().into_iter().collect();
    for namespace in broker
        .resources()
        .namespaces(&record.tenant)
        .unwrap_or_default()
    {
        progress.namespaces_total += 1;
        let local = namespace.split_once('/').map_or("", |(_, local)| local);
        if broker
            .resources()
            .policies(&record.tenant, local)
            .is_ok_and(|policies| policies.replication_clusters.contains(target))
        {
            progress.namespaces_replicating += 1;
        }
        for topic in broker.topics_of_namespace(&namespace).unwrap_or_default() {
            progress.topics_total += 1;
            if !with_log.contains(&topic) {
                progress.topics_replicating += 1;
                continue;
            }
            let Ok(name) = TopicName::parse(&topic) else {
                continue;
            };
            let Some(loaded) = broker.loaded_topic(&name) else {
                continue;
            };
            if let Some(replication) = loaded.replication_progress(target) {
                if replication.connected {
                    progress.topics_replicating += 1;
                }
                progress.backlog_entries += replication.backlog_entries;
                progress.backlog_bytes += replication.backlog_bytes;
            }
            // Before the consumers are moved they still acknowledge, so the state keeps
            // changing: phase 4 counts a subscription synced when the target confirmed a state
            // and the newer one is at most a few sync intervals old. Once dispatch stopped
            // (phase 6) the state settles and must be confirmed as it is.
            let lag = if record.phase < Phase::ProducersRedirected {
                loaded.sync_interval().saturating_mul(SYNCED_LAG_INTERVALS)
            } else {
                std::time::Duration::ZERO
            };
            for (_, _, synced) in loaded.subscriptions_synced_to(target, lag) {
                progress.subscriptions_total += 1;
                progress.subscriptions_synced += usize::from(synced);
            }
            let (producers, consumers) = loaded.client_counts();
            progress.producers_on_source += producers;
            progress.consumers_on_source += consumers;
            progress.unacknowledged_on_source += loaded
                .subscriptions()
                .iter()
                .map(|subscription| subscription.delivered_unacknowledged())
                .sum::<usize>();
        }
    }
    progress
}

fn status_of(broker: &Broker, record: &MigrationRecord) -> MigrationStatus {
    let progress = progress(broker, record);
    let phase = record.phase;
    // The migration reached `reached` (an abort reaches nothing).
    let past = |reached: Phase| phase >= reached && phase != Phase::Aborting;
    let state_of = |phase_reached: bool, running: bool| {
        if phase_reached {
            "done"
        } else if running {
            "running"
        } else {
            "pending"
        }
    };
    let phases = vec![
        PhaseLine {
            name: "metadataCopied",
            state: state_of(past(Phase::Replicating), phase == Phase::CopyingMetadata),
            progress: format!(
                "namespaces replicating to {} {}/{}",
                record.target_cluster, progress.namespaces_replicating, progress.namespaces_total
            ),
        },
        PhaseLine {
            name: "replicating",
            state: state_of(past(Phase::CaughtUp), phase == Phase::Replicating),
            progress: format!(
                "topics replicating {}/{}",
                progress.topics_replicating, progress.topics_total
            ),
        },
        PhaseLine {
            name: "caughtUp",
            state: state_of(past(Phase::CaughtUp), false),
            progress: format!(
                "backlog {} bytes ({} entries) left",
                progress.backlog_bytes, progress.backlog_entries
            ),
        },
        PhaseLine {
            name: "subscriptionsSynced",
            state: state_of(past(Phase::SubscriptionsSynced), phase == Phase::CaughtUp),
            progress: format!(
                "subscriptions synced {}/{}",
                progress.subscriptions_synced, progress.subscriptions_total
            ),
        },
        PhaseLine {
            name: "producersRedirected",
            state: state_of(
                past(Phase::ProducersRedirected),
                phase == Phase::SubscriptionsSynced,
            ),
            progress: match record.fenced_at_ms {
                None if record.hold_before_redirect && phase <= Phase::SubscriptionsSynced => {
                    format!(
                        "held before the redirect (release: POST /admin/v2/tenants/{}/migration/redirect)",
                        record.tenant
                    )
                }
                Some(_) if phase == Phase::SubscriptionsSynced => format!(
                    "producers fenced, backlog {} entries left",
                    progress.backlog_entries
                ),
                _ => format!(
                    "producers on {} {}",
                    record.source_cluster, progress.producers_on_source
                ),
            },
        },
        PhaseLine {
            name: "consumersRedirected",
            state: state_of(
                past(Phase::ConsumersRedirected),
                phase == Phase::ProducersRedirected,
            ),
            progress: format!(
                "consumers on {} {}, delivered and unacknowledged {}",
                record.source_cluster,
                progress.consumers_on_source,
                progress.unacknowledged_on_source
            ),
        },
        PhaseLine {
            name: "done",
            state: state_of(phase == Phase::Done, phase == Phase::ConsumersRedirected),
            progress: format!(
                "clients on {} {}{}",
                record.source_cluster,
                progress.producers_on_source + progress.consumers_on_source,
                if record.cleaning_up {
                    "; cleaning up"
                } else {
                    ""
                }
            ),
        },
    ];
    MigrationStatus {
        tenant: record.tenant.clone(),
        source_cluster: record.source_cluster.clone(),
        target_cluster: record.target_cluster.clone(),
        phase: phase.name(),
        paused: record.paused_reason.is_some(),
        paused_reason: record.paused_reason.clone(),
        started_at_ms: record.started_at_ms,
        phase_changed_at_ms: record.phase_changed_at_ms,
        progress,
        phases,
    }
}
