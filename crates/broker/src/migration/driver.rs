//! The background task that drives one tenant's migration on the source cluster.
//!
//! Each step reads the durable record, does what its phase needs (every action idempotent), and
//! writes the next phase; so a restart, which runs the task again from the record
//! ([`super::resume_all`]), simply repeats the step it was in. A failing step pauses the
//! migration (the reason is in the record, so in the status) and is retried with backoff.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use meridian_metadata::{ExpectedVersion, MetadataError};
use tokio::sync::watch;

use super::target::{self, Created, TargetMetadata};
use super::{now_ms, progress, record, update_record, MigrationRecord, Phase, Redirect};
use crate::broker::Broker;
use crate::error::{BrokerError, Result};
use crate::peer::Peer;
use crate::resources::TenantInfo;
use crate::topic_name::TopicName;

/// How often a replicating migration looks at its progress.
const TICK: Duration = Duration::from_millis(500);
/// How long the consumer phase waits for the acknowledgements of what the source delivered
/// before it moves the consumers anyway (what is still unacknowledged is delivered again on
/// the target, as on any reconnect).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// How long a cleanup waits for the target's replicators to the source to stop before it
/// pauses (and retries).
const REPLICATORS_GONE_WAIT: Duration = Duration::from_secs(10);
/// How often a finished migration looks for clients left on the source.
const DONE_TICK: Duration = Duration::from_secs(5);
/// Retry delays of a paused migration.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A running driver.
pub(super) struct Handle {
    /// Held for the whole of a step, and by an abort: they never interleave.
    pub step: tokio::sync::Mutex<()>,
    stop: watch::Sender<bool>,
}

/// The tenant's driver, started if it is not running.
pub(super) fn spawn(broker: &Arc<Broker>, tenant: &str) -> Arc<Handle> {
    let mut running = broker.migration_drivers().lock();
    if let Some(handle) = running.get(tenant) {
        return handle.clone();
    }
    let (stop, stopped) = watch::channel(false);
    let handle = Arc::new(Handle {
        step: tokio::sync::Mutex::new(()),
        stop,
    });
    running.insert(tenant.to_string(), handle.clone());
    tokio::spawn(run(
        Arc::downgrade(broker),
        tenant.to_string(),
        handle.clone(),
        stopped,
    ));
    handle
}

async fn run(
    broker: Weak<Broker>,
    tenant: String,
    handle: Arc<Handle>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        if *stopped.borrow() {
            break;
        }
        let Some(strong) = broker.upgrade() else {
            return;
        };
        let delay = {
            let _step = handle.step.lock().await;
            match record(strong.metadata(), &tenant) {
                Ok(None) => break,
                Ok(Some(record)) => match step(&strong, record).await {
                    Ok(delay) => {
                        failures = 0;
                        delay
                    }
                    Err(reason) => {
                        tracing::warn!(%tenant, %reason, "tenant migration paused; will retry");
                        let _ = update_record(strong.metadata(), &tenant, |record| {
                            record.paused_reason = Some(reason.clone());
                        });
                        failures = failures.saturating_add(1);
                        BACKOFF_MIN
                            .saturating_mul(1 << failures.min(5))
                            .min(BACKOFF_MAX)
                    }
                },
                Err(error) => {
                    tracing::warn!(%tenant, %error, "reading the migration record failed");
                    BACKOFF_MAX
                }
            }
        };
        drop(strong);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped.changed() => {}
        }
    }
    if let Some(broker) = broker.upgrade() {
        let mut running = broker.migration_drivers().lock();
        if running
            .get(&tenant)
            .is_some_and(|current| Arc::ptr_eq(current, &handle))
        {
            running.remove(&tenant);
        }
    }
}

/// One step of the migration; `Ok` with the delay before the next, `Err` with why it paused.
async fn step(
    broker: &Arc<Broker>,
    record: MigrationRecord,
) -> std::result::Result<Duration, String> {
    let tenant = record.tenant.clone();
    match record.phase {
        Phase::Aborting => {
            finish_abort(broker, &record)
                .await
                .map_err(|error| format!("aborting: {error}"))?;
            Ok(Duration::ZERO)
        }
        Phase::CopyingMetadata => {
            copy_metadata(broker, &record).await?;
            set_phase(broker, &tenant, Phase::Replicating)?;
            tracing::info!(%tenant, target = %record.target_cluster, "tenant migration: metadata copied, topics replicating");
            Ok(Duration::ZERO)
        }
        Phase::ProducersRedirected => redirect_consumers(broker, &record),
        Phase::ConsumersRedirected | Phase::Done => {
            // Stragglers (a client that reached the source in a race) are moved too.
            let url = install_redirect(broker, &record);
            for topic in tenant_topics(broker, &tenant) {
                topic.migrate_producers(&url);
                for subscription in topic.subscriptions() {
                    subscription.pause_dispatch();
                    subscription.migrate_consumers(&url);
                }
            }
            if record.cleaning_up {
                finish_cleanup(broker, &record)
                    .await
                    .map_err(|error| format!("cleaning up: {error}"))?;
                return Ok(Duration::ZERO);
            }
            let progress = progress(broker, &record);
            if record.phase == Phase::ConsumersRedirected
                && progress.producers_on_source + progress.consumers_on_source == 0
            {
                set_phase(broker, &tenant, Phase::Done)?;
                tracing::info!(%tenant, target = %record.target_cluster, "tenant migration done: no client of the tenant left on the source");
                return Ok(Duration::ZERO);
            }
            Ok(if record.phase == Phase::Done {
                DONE_TICK
            } else {
                TICK
            })
        }
        Phase::Replicating | Phase::CaughtUp | Phase::SubscriptionsSynced => {
            // A namespace or partitioned topic created (or grown) since the start must be
            // copied (and replicated) too, before any client is sent to the target.
            if lacking_namespaces(broker, &record) > 0 || lacks_partitioned(broker, &record) {
                copy_metadata(broker, &record).await?;
            }
            if record.phase >= Phase::CaughtUp {
                mark_subscriptions_replicated(broker, &record)?;
            }
            let progress = progress(broker, &record);
            if record.phase == Phase::SubscriptionsSynced {
                return redirect_producers(broker, &record, &progress);
            }
            if record.phase == Phase::CaughtUp
                && progress.subscriptions_synced == progress.subscriptions_total
            {
                set_phase(broker, &tenant, Phase::SubscriptionsSynced)?;
                tracing::info!(%tenant, target = %record.target_cluster, subscriptions = progress.subscriptions_total, "tenant migration: subscription state synced");
            } else if record.phase == Phase::Replicating && progress.caught_up() {
                set_phase(broker, &tenant, Phase::CaughtUp)?;
                tracing::info!(%tenant, target = %record.target_cluster, topics = progress.topics_total, "tenant migration: replication caught up");
            } else if record.paused_reason.is_some() {
                update_record(broker.metadata(), &tenant, |record| {
                    record.paused_reason = None
                })
                .map_err(|error| error.to_string())?;
            }
            Ok(TICK)
        }
    }
}

/// The loaded topics (partitions one by one) of a tenant.
fn tenant_topics(broker: &Broker, tenant: &str) -> Vec<Arc<crate::topic::Topic>> {
    let mut topics = Vec::new();
    for namespace in broker.resources().namespaces(tenant).unwrap_or_default() {
        for topic in broker.topics_of_namespace(&namespace).unwrap_or_default() {
            if let Some(loaded) = TopicName::parse(&topic)
                .ok()
                .and_then(|name| broker.loaded_topic(&name))
            {
                topics.push(loaded);
            }
        }
    }
    topics
}

/// Puts the tenant's redirect in force (lookups, new producers; new consumers once the
/// consumers moved); returns the target's binary protocol URL.
pub(super) fn install_redirect(broker: &Broker, record: &MigrationRecord) -> String {
    let data = broker.resources().cluster(&record.target_cluster).ok();
    let broker_service_url = data
        .as_ref()
        .and_then(|data| data.broker_service_url.clone())
        .unwrap_or_default();
    let redirect = Redirect {
        broker_service_url: broker_service_url.clone(),
        service_url: data.and_then(|data| data.service_url),
        producers: record.phase >= Phase::ProducersRedirected && record.phase != Phase::Aborting,
        consumers: record.phase >= Phase::ConsumersRedirected && record.phase != Phase::Aborting,
    };
    broker
        .migration_drivers()
        .redirects()
        .insert(record.tenant.clone(), redirect);
    broker_service_url
}

/// Phase 5, from "subscriptions synced": the fence (durable first), then, once the target
/// holds everything the source stored, the producers are told to move.
fn redirect_producers(
    broker: &Arc<Broker>,
    record: &MigrationRecord,
    progress: &super::Progress,
) -> std::result::Result<Duration, String> {
    let tenant = &record.tenant;
    if record.fenced_at_ms.is_none() {
        if record.hold_before_redirect {
            return Ok(TICK);
        }
        // Subscriptions need not be synced again here: consumers keep acknowledging on the
        // source, and the consumer phase waits for their final state on the target.
        update_record(broker.metadata(), tenant, |record| {
            record.fenced_at_ms.get_or_insert_with(now_ms);
        })
        .map_err(|error| error.to_string())?;
        tracing::info!(%tenant, target = %record.target_cluster, "tenant migration: producers fenced");
        return Ok(Duration::ZERO);
    }
    let fenced_before = broker.migration_drivers().redirects().contains_key(tenant);
    let url = install_redirect(broker, record);
    let topics = tenant_topics(broker, tenant);
    let fenced_now: usize = topics.iter().map(|topic| topic.fence_producers()).sum();
    if !fenced_before || fenced_now > 0 {
        // `progress` was read before this fence: a producer could still write after it. Read
        // it again at the next step, when every producer was fenced before it is read.
        return Ok(TICK);
    }
    if !progress.caught_up() {
        // Bounded: the fence stops new local messages. A target that is down holds it here
        // (producers wait, none is pointed at a cluster that lacks its data).
        let reason = (progress.topics_replicating != progress.topics_total).then(|| {
            format!(
                "producers fenced; waiting for every topic to replicate to {} ({}/{})",
                record.target_cluster, progress.topics_replicating, progress.topics_total
            )
        });
        if reason != record.paused_reason {
            update_record(broker.metadata(), tenant, |record| {
                record.paused_reason = reason.clone()
            })
            .map_err(|error| error.to_string())?;
        }
        return Ok(TICK);
    }
    // Lookups redirect from here on (the phase is durable first).
    let record = enter_redirect_phase(broker, tenant, Phase::ProducersRedirected)?;
    for topic in &topics {
        topic.migrate_producers(&url);
    }
    tracing::info!(%tenant, target = %record.target_cluster, "tenant migration: producers redirected");
    Ok(Duration::ZERO)
}

/// Phase 6: dispatch stops on the source, the acknowledgements of what it delivered come back
/// (bounded wait), the final subscription state reaches the target, then the consumers are
/// told to move.
fn redirect_consumers(
    broker: &Arc<Broker>,
    record: &MigrationRecord,
) -> std::result::Result<Duration, String> {
    let tenant = &record.tenant;
    let url = install_redirect(broker, record);
    mark_subscriptions_replicated(broker, record)?;
    let topics = tenant_topics(broker, tenant);
    for topic in &topics {
        topic.migrate_producers(&url);
    }
    let Some(stopped_at) = record.dispatch_stopped_at_ms else {
        update_record(broker.metadata(), tenant, |record| {
            record.dispatch_stopped_at_ms.get_or_insert_with(now_ms);
        })
        .map_err(|error| error.to_string())?;
        return Ok(Duration::ZERO);
    };
    for topic in &topics {
        for subscription in topic.subscriptions() {
            subscription.pause_dispatch();
        }
    }
    let progress = progress(broker, record);
    let now = now_ms();
    let Some(settled_at) = record.acks_settled_at_ms else {
        let waited = Duration::from_millis(now.saturating_sub(stopped_at));
        if progress.unacknowledged_on_source == 0 || waited >= ACK_WAIT {
            if progress.unacknowledged_on_source > 0 {
                tracing::warn!(%tenant, unacknowledged = progress.unacknowledged_on_source, "tenant migration: acknowledgements still missing after the wait; those messages are delivered again on the target");
            }
            update_record(broker.metadata(), tenant, |record| {
                record.acks_settled_at_ms.get_or_insert(now);
            })
            .map_err(|error| error.to_string())?;
            // Send the final states now rather than at the next sync tick.
            for topic in &topics {
                if let Some(sync) = topic.subscription_sync() {
                    sync.now();
                }
            }
            return Ok(Duration::ZERO);
        }
        return Ok(TICK);
    };
    // The final state is what the sync task sends after the acknowledgements settled: wait
    // two sync intervals (so it looked at least once since), and until every subscription's
    // latest state was accepted by the target.
    let interval = topics
        .iter()
        .map(|topic| topic.sync_interval())
        .max()
        .unwrap_or_default();
    let since = Duration::from_millis(now.saturating_sub(settled_at));
    if since < interval.saturating_mul(2)
        || progress.subscriptions_synced != progress.subscriptions_total
        || !progress.caught_up()
    {
        return Ok(TICK);
    }
    let record = enter_redirect_phase(broker, tenant, Phase::ConsumersRedirected)?;
    for topic in &topics {
        for subscription in topic.subscriptions() {
            subscription.migrate_consumers(&url);
        }
    }
    tracing::info!(%tenant, target = %record.target_cluster, "tenant migration: consumers redirected");
    Ok(Duration::ZERO)
}

/// Phase 4: every durable subscription of the tenant's topics becomes replicated, so its
/// whole acknowledgement state goes to the target (docs/replication.md). Each one is written to
/// the record before it is marked, so an abort can take the mark back.
fn mark_subscriptions_replicated(
    broker: &Arc<Broker>,
    record: &MigrationRecord,
) -> std::result::Result<(), String> {
    for namespace in broker
        .resources()
        .namespaces(&record.tenant)
        .map_err(|error| error.to_string())?
    {
        for topic in broker.topics_of_namespace(&namespace).unwrap_or_default() {
            let Ok(name) = TopicName::parse(&topic) else {
                continue;
            };
            let Some(loaded) = broker.loaded_topic(&name) else {
                continue;
            };
            for (subscription, replicated, _) in
                loaded.subscriptions_synced_to(&record.target_cluster, Duration::ZERO)
            {
                if replicated {
                    continue;
                }
                let entry = (topic.clone(), subscription.clone());
                update_record(broker.metadata(), &record.tenant, |record| {
                    if !record.marked_replicated.contains(&entry) {
                        record.marked_replicated.push(entry.clone());
                    }
                })
                .map_err(|error| error.to_string())?;
                loaded
                    .set_subscription_replicated(&subscription, true)
                    .map_err(|error| {
                        format!("marking {topic} {subscription} replicated: {error}")
                    })?;
            }
        }
    }
    Ok(())
}

fn set_phase(broker: &Broker, tenant: &str, phase: Phase) -> std::result::Result<(), String> {
    update_record(broker.metadata(), tenant, |record| {
        record.phase = phase;
        record.phase_changed_at_ms = now_ms();
        record.paused_reason = None;
    })
    .map(|_| ())
    .map_err(|error| error.to_string())
}

/// Writes a redirect phase, then puts its redirect in force (durable first); returns the record.
fn enter_redirect_phase(
    broker: &Broker,
    tenant: &str,
    phase: Phase,
) -> std::result::Result<MigrationRecord, String> {
    set_phase(broker, tenant, phase)?;
    let record = record(broker.metadata(), tenant)
        .map_err(|error| error.to_string())?
        .ok_or_else(|| "the migration record vanished".to_string())?;
    install_redirect(broker, &record);
    Ok(record)
}

/// Namespaces of the tenant whose replication list on the source lacks the target.
fn lacking_namespaces(broker: &Broker, record: &MigrationRecord) -> usize {
    broker
        .resources()
        .namespaces(&record.tenant)
        .unwrap_or_default()
        .iter()
        .filter(|namespace| {
            let local = namespace.split_once('/').map_or("", |(_, local)| local);
            broker
                .resources()
                .policies(&record.tenant, local)
                .is_ok_and(|policies| {
                    !policies
                        .replication_clusters
                        .contains(&record.target_cluster)
                })
        })
        .count()
}

/// The partitioned topics of namespace `local` of `tenant` on the source, with their counts.
fn partitioned_topics(
    broker: &Broker,
    tenant: &str,
    local: &str,
) -> std::result::Result<Vec<(String, u32)>, String> {
    let mut partitioned = Vec::new();
    for topic in broker
        .metadata()
        .children(&format!("/partitioned-topics/{tenant}/{local}"))
        .map_err(|error| error.to_string())?
    {
        let name = TopicName::parse(&format!("persistent://{tenant}/{local}/{topic}"))
            .map_err(|error| error.to_string())?;
        if let Some(count) = broker
            .partition_count(&name)
            .map_err(|error| error.to_string())?
        {
            partitioned.push((topic, count));
        }
    }
    Ok(partitioned)
}

/// Whether a partitioned topic of the tenant lacks on the target, or has fewer partitions there
/// than here, as far as the record knows (a failed read counts as lacking: copying is
/// idempotent, and it reports the failure).
fn lacks_partitioned(broker: &Broker, record: &MigrationRecord) -> bool {
    let tenant = &record.tenant;
    broker
        .resources()
        .namespaces(tenant)
        .unwrap_or_default()
        .iter()
        .any(|namespace| {
            let local = namespace.split_once('/').map_or("", |(_, local)| local);
            partitioned_topics(broker, tenant, local).map_or(true, |topics| {
                topics.iter().any(|(topic, count)| {
                    record
                        .partitioned_on_target
                        .get(&format!("persistent://{tenant}/{local}/{topic}"))
                        != Some(count)
                })
            })
        })
}

/// Phase 1: the tenant and its namespaces (with their policies) on the target, then the target
/// added to each namespace's replication clusters here (its replicators start at the earliest
/// message: [`super::earliest_remotes`]).
async fn copy_metadata(
    broker: &Arc<Broker>,
    record: &MigrationRecord,
) -> std::result::Result<(), String> {
    let resources = broker.resources();
    let tenant = &record.tenant;
    let target = &record.target_cluster;
    let fail = |error: BrokerError| error.to_string();
    // The source's tenant must allow the target before a namespace may name it.
    let mut info = resources.tenant(tenant).map_err(fail)?;
    if !info.allowed_clusters.contains(target) {
        info.allowed_clusters.push(target.clone());
        resources.update_tenant(tenant, &info).map_err(fail)?;
    }
    let mut namespaces = Vec::new();
    let mut partitioned = Vec::new();
    let mut clusters: BTreeSet<String> = [record.source_cluster.clone(), target.clone()].into();
    for namespace in resources.namespaces(tenant).map_err(fail)? {
        let local = namespace
            .split_once('/')
            .map_or(namespace.as_str(), |(_, local)| local)
            .to_string();
        let mut policies = resources.policies(tenant, &local).map_err(fail)?;
        if !policies.replication_clusters.contains(target) {
            policies.replication_clusters.push(target.clone());
        }
        clusters.extend(policies.replication_clusters.iter().cloned());
        for (topic, count) in partitioned_topics(broker, tenant, &local)? {
            partitioned.push((local.clone(), topic, count));
        }
        namespaces.push((local, policies));
    }
    let mut registry = Vec::new();
    for name in &clusters {
        if let Ok(mut data) = resources.cluster(name) {
            data.proxy_service_url = None;
            data.proxy_protocol = None;
            registry.push((name.clone(), data));
        }
    }
    let mut tenant_info = info.clone();
    for cluster in &clusters {
        if !tenant_info.allowed_clusters.contains(cluster) {
            tenant_info.allowed_clusters.push(cluster.clone());
        }
    }
    let target_peer = Peer::of(target, &resources.cluster(target).map_err(fail)?)
        .ok_or_else(|| format!("cluster {target} has no serviceUrl in this cluster's registry"))?;
    let wanted = TargetMetadata {
        local_cluster: record.source_cluster.clone(),
        target: target_peer,
        registry,
        tenant: tenant.clone(),
        tenant_info,
        namespaces: namespaces.clone(),
        partitioned: partitioned.clone(),
    };
    let metadata = broker.metadata().clone();
    let owner = tenant.clone();
    tokio::task::spawn_blocking(move || {
        let note = |created: Created| {
            update_record(&metadata, &owner, |record| match &created {
                Created::Tenant => record.created_tenant_on_target = true,
                Created::Namespace(namespace) => {
                    if !record.created_namespaces_on_target.contains(namespace) {
                        record.created_namespaces_on_target.push(namespace.clone());
                    }
                }
            })
            .map(|_| ())
            .map_err(|error| error.to_string())
        };
        target::push(&wanted, &note)
    })
    .await
    .map_err(|error| error.to_string())??;
    update_record(broker.metadata(), tenant, |record| {
        for (local, topic, count) in &partitioned {
            record
                .partitioned_on_target
                .insert(format!("persistent://{tenant}/{local}/{topic}"), *count);
        }
    })
    .map_err(fail)?;
    // The target holds the namespaces: replicate to it.
    for (local, _) in namespaces {
        let mut policies = resources.policies(tenant, &local).map_err(fail)?;
        if policies.replication_clusters.contains(target) {
            continue;
        }
        let original = policies.replication_clusters.clone();
        // Durable before the change, so an abort after a crash knows what to put back.
        update_record(broker.metadata(), tenant, |record| {
            record
                .original_replication
                .entry(format!("{tenant}/{local}"))
                .or_insert_with(|| original.clone());
        })
        .map_err(fail)?;
        policies.replication_clusters.push(target.clone());
        resources
            .set_replication_clusters(tenant, &local, policies.replication_clusters)
            .map_err(fail)?;
        broker.policies_changed(tenant, Some(&local)).await;
    }
    Ok(())
}

/// `--cleanup` (every step idempotent): the source leaves the target's replication lists, the
/// target leaves the source's (the replicators stop), then the tenant's topics, namespaces and
/// the tenant are deleted here, then the record.
pub(super) async fn finish_cleanup(broker: &Arc<Broker>, record: &MigrationRecord) -> Result<()> {
    let resources = broker.resources();
    let tenant = &record.tenant;
    let locals: Vec<String> = resources
        .namespaces(tenant)
        .unwrap_or_default()
        .iter()
        .map(|namespace| {
            namespace
                .split_once('/')
                .map_or(namespace.as_str(), |(_, local)| local)
                .to_string()
        })
        .collect();
    let target = resources
        .cluster(&record.target_cluster)
        .ok()
        .and_then(|data| Peer::of(&record.target_cluster, &data));
    match target {
        Some(target) => {
            let (source, owner, namespaces) = (
                record.source_cluster.clone(),
                tenant.clone(),
                locals.clone(),
            );
            tokio::task::spawn_blocking(move || {
                target::forget_source(&target, &source, &owner, &namespaces)
            })
            .await
            .map_err(|error| BrokerError::Metadata(error.to_string()))?
            .map_err(|reason| {
                BrokerError::Metadata(format!(
                    "removing {} from the replication lists on {}: {reason}",
                    record.source_cluster, record.target_cluster
                ))
            })?;
        }
        None => {
            tracing::warn!(%tenant, target = %record.target_cluster, "the target is no longer registered: its replication lists are left as they are");
        }
    }
    // The target's replicators stop by themselves once it no longer lists the source; delete
    // nothing under them (a replicator mid-write would meet a closing log).
    let deadline = tokio::time::Instant::now() + REPLICATORS_GONE_WAIT;
    while tenant_topics(broker, tenant)
        .iter()
        .any(|topic| topic.producer_count() > 0)
    {
        if tokio::time::Instant::now() >= deadline {
            return Err(BrokerError::Conflict(format!(
                "{} still replicates the tenant to this cluster",
                record.target_cluster
            )));
        }
        tokio::time::sleep(TICK / 5).await;
    }
    for local in &locals {
        let mut changed = false;
        match resources.update_policies(tenant, local, |policies| {
            let before = policies.replication_clusters.len();
            policies
                .replication_clusters
                .retain(|cluster| cluster == &record.source_cluster);
            changed = policies.replication_clusters.len() != before;
            Ok(())
        }) {
            Ok(_) | Err(BrokerError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
        if changed {
            broker.policies_changed(tenant, Some(local)).await;
        }
        match broker.delete_namespace(tenant, local).await {
            Ok(()) | Err(BrokerError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
    }
    match resources.delete_tenant(tenant) {
        Ok(()) | Err(BrokerError::NotFound(_)) => {}
        Err(error) => return Err(error),
    }
    broker
        .metadata()
        .delete(&super::record_key(tenant), ExpectedVersion::Any)?;
    broker.migration_drivers().redirects().remove(tenant);
    let handle = broker.migration_drivers().lock().remove(tenant);
    if let Some(handle) = handle {
        let _ = handle.stop.send(true);
    }
    Ok(())
}

/// Puts the source's settings back as they were before the migration and removes the record:
/// the target leaves each namespace's replication list (its replicators and their cursors go),
/// and the tenant's allowed clusters are the original ones. The target's copies are left there.
pub(super) async fn finish_abort(broker: &Arc<Broker>, record: &MigrationRecord) -> Result<()> {
    let resources = broker.resources();
    let tenant = &record.tenant;
    let target = &record.target_cluster;
    for (namespace, original) in &record.original_replication {
        if original.contains(target) {
            continue;
        }
        let local = namespace
            .split_once('/')
            .map_or(namespace.as_str(), |(_, local)| local);
        let mut changed = false;
        match resources.update_policies(tenant, local, |policies| {
            let before = policies.replication_clusters.len();
            policies
                .replication_clusters
                .retain(|cluster| cluster != target);
            changed = policies.replication_clusters.len() != before;
            Ok(())
        }) {
            Ok(_) | Err(BrokerError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
        if changed {
            broker.policies_changed(tenant, Some(local)).await;
        }
    }
    for (topic, subscription) in &record.marked_replicated {
        let Ok(name) = TopicName::parse(topic) else {
            continue;
        };
        match broker.topic(&name, false).await {
            Ok(loaded) => match loaded.set_subscription_replicated(subscription, false) {
                Ok(()) | Err(BrokerError::SubscriptionNotFound { .. }) => {}
                Err(error) => return Err(error),
            },
            Err(BrokerError::TopicNotFound(_)) | Err(BrokerError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
    }
    if !record.original_allowed_clusters.contains(target) {
        // Written directly: the usual update refuses to narrow a tenant that has namespaces,
        // but here it only takes back what the migration added.
        let key = format!("/tenants/{tenant}");
        while let Some(stored) = broker.metadata().get(&key)? {
            let mut info: TenantInfo = serde_json::from_slice(&stored.value)
                .map_err(|error| BrokerError::Metadata(format!("record {key}: {error}")))?;
            info.allowed_clusters.retain(|cluster| cluster != target);
            let bytes = serde_json::to_vec(&info)
                .map_err(|error| BrokerError::Metadata(error.to_string()))?;
            match broker
                .metadata()
                .put(&key, &bytes, ExpectedVersion::Exactly(stored.version))
            {
                Ok(_) => break,
                Err(MetadataError::BadVersion { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }
    // Then what the migration created on the target (nothing replicates there any more).
    if record.created_tenant_on_target || !record.created_namespaces_on_target.is_empty() {
        let peer = resources
            .cluster(target)
            .ok()
            .and_then(|data| Peer::of(target, &data));
        match peer {
            Some(peer) => {
                let (local, owner, namespaces, tenant_created) = (
                    record.source_cluster.clone(),
                    tenant.clone(),
                    record.created_namespaces_on_target.clone(),
                    record.created_tenant_on_target,
                );
                tokio::task::spawn_blocking(move || {
                    target::remove(&peer, &local, &owner, &namespaces, tenant_created)
                })
                .await
                .map_err(|error| BrokerError::Metadata(error.to_string()))?
                .map_err(|reason| {
                    BrokerError::Metadata(format!("removing the copies on {target}: {reason}"))
                })?;
            }
            None => {
                tracing::warn!(%tenant, %target, "the target is no longer registered: its copies of the tenant are left there");
            }
        }
    }
    broker
        .metadata()
        .delete(&super::record_key(tenant), ExpectedVersion::Any)?;
    let handle = broker.migration_drivers().lock().remove(tenant);
    if let Some(handle) = handle {
        let _ = handle.stop.send(true);
    }
    Ok(())
}
