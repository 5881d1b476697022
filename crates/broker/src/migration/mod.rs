//! Tenant migration between clusters (`docs/migration.md`): the durable migration record, the
//! start/status/abort operations behind `/admin/v2/tenants/{tenant}/migration`, and the
//! background task on the source cluster that drives a migration through its phases.
//!
//! Built so far: metadata copied to the target, the tenant's namespaces replicating to the
//! target from each topic's earliest message, and "caught up" once the target lacks nothing.
//! Subscription sync, redirection and cleanup are the next phases (planned, see the doc).
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

/// The phases a migration goes through, in order. Only the first three are built.
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

/// The drivers running in this broker, one per migrating tenant.
#[derive(Default)]
pub struct Drivers {
    running: Mutex<HashMap<String, Arc<driver::Handle>>>,
}

impl Drivers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<driver::Handle>>> {
        self.running
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
pub fn start(broker: &Arc<Broker>, tenant: &str, target: &str) -> Result<MigrationStatus> {
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

fn not_migrating(tenant: &str) -> BrokerError {
    BrokerError::NotFound(format!("tenant {tenant} has no migration under way"))
}

/// Aborts a migration before its redirect phase (`DELETE …/migration`): the source's tenant
/// and namespace settings are put back and the record is removed. Returns the last status.
pub async fn abort(broker: &Arc<Broker>, tenant: &str) -> Result<MigrationStatus> {
    if record(broker.metadata(), tenant)?.is_none() {
        return Err(not_migrating(tenant));
    }
    // Every phase built so far comes before the redirect, so every one can be aborted.
    let handle = driver::spawn(broker, tenant);
    let _step = handle.step.lock().await;
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
        let reason = format!("aborting: {error}");
        tracing::warn!(%tenant, %reason, "tenant migration abort paused; will retry");
        let record = update_record(broker.metadata(), tenant, |record| {
            record.paused_reason = Some(reason.clone())
        })?
        .unwrap_or(record);
        return Ok(status_of(broker, &record));
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
        driver::spawn(broker, &tenant);
    }
}

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
            for (_, _, synced) in loaded.subscriptions_synced_to(target) {
                progress.subscriptions_total += 1;
                progress.subscriptions_synced += usize::from(synced);
            }
        }
    }
    progress
}

fn status_of(broker: &Broker, record: &MigrationRecord) -> MigrationStatus {
    let progress = progress(broker, record);
    let phase = record.phase;
    let state_of = |phase_reached: bool, running: bool| {
        if phase_reached {
            "done"
        } else if running {
            "running"
        } else {
            "pending"
        }
    };
    let mut phases = vec![
        PhaseLine {
            name: "metadataCopied",
            state: state_of(
                phase >= Phase::Replicating && phase != Phase::Aborting,
                phase == Phase::CopyingMetadata,
            ),
            progress: format!(
                "namespaces replicating to {} {}/{}",
                record.target_cluster, progress.namespaces_replicating, progress.namespaces_total
            ),
        },
        PhaseLine {
            name: "replicating",
            state: state_of(
                phase >= Phase::CaughtUp && phase != Phase::Aborting,
                phase == Phase::Replicating,
            ),
            progress: format!(
                "topics replicating {}/{}",
                progress.topics_replicating, progress.topics_total
            ),
        },
        PhaseLine {
            name: "caughtUp",
            state: state_of(phase >= Phase::CaughtUp && phase != Phase::Aborting, false),
            progress: format!(
                "backlog {} bytes ({} entries) left",
                progress.backlog_bytes, progress.backlog_entries
            ),
        },
        PhaseLine {
            name: "subscriptionsSynced",
            state: state_of(
                phase == Phase::SubscriptionsSynced,
                phase == Phase::CaughtUp,
            ),
            progress: format!(
                "subscriptions synced {}/{}",
                progress.subscriptions_synced, progress.subscriptions_total
            ),
        },
    ];
    for name in ["producersRedirected", "consumersRedirected", "done"] {
        phases.push(PhaseLine {
            name,
            state: "notBuilt",
            progress: "not built in this version".into(),
        });
    }
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
