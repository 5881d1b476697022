//! The broker: the registry of loaded topics, partitioned-topic metadata, topic creation
//! rules, and the shared services (storage, metadata, schemas) every topic uses.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use meridian_metadata::{ExpectedVersion, MetadataStore};
use meridian_storage::Storage;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::config::{AutoTopicCreationType, BrokerConfig};
use crate::context::TopicContext;
use crate::error::{BrokerError, Result};
use crate::health::{FailureKind, TopicHealth};
use crate::replication::remote::{RemoteClients, RemoteCluster};
use crate::resources::{EffectivePolicies, Resources};
use crate::schema::SchemaRegistry;
use crate::topic::{ReplicationPlan, Topic};
use crate::topic_name::TopicName;

#[derive(Debug, Serialize, Deserialize)]
struct PartitionedTopicMetadata {
    partitions: u32,
}

pub struct Broker {
    shared: Arc<TopicContext>,
    metadata: Arc<dyn MetadataStore>,
    schemas: SchemaRegistry,
    resources: Resources,
    topics: Mutex<HashMap<String, Arc<OnceCell<Arc<Topic>>>>>,
    /// Every topic (or partition) that has a log.
    known_topics: Mutex<BTreeSet<String>>,
    /// Topics being created or deleted by an admin call: nothing loads them until it is over.
    deleting: Mutex<BTreeSet<String>>,
    /// One lock per topic name that creation and deletion take, so that racing requests on
    /// one topic run one after the other and each meets the outcome of the one before
    /// (exists: 409, gone: 404) instead of half of a storage operation.
    lifecycle: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    next_key: AtomicU64,
    /// The tenant migrations this broker drives (`crate::migration`).
    migrations: crate::migration::Drivers,
    /// Counts changes of what authorization reads (see [`Broker::authorization_changes`]).
    authorization_changes: std::sync::OnceLock<tokio::sync::watch::Sender<u64>>,
    /// Cluster mode (`meridian broker`): bundle ownership on etcd. Unset in standalone.
    cluster: std::sync::OnceLock<Arc<crate::cluster::ClusterMode>>,
}

/// How long a client's use of a topic waits for an admin creation or deletion of its name to end
/// before it is told to retry (`ServiceNotReady`).
const LIFECYCLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A topic name claimed by an admin creation or deletion; released when dropped.
struct Claim<'a> {
    broker: &'a Broker,
    key: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.broker
            .deleting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.key);
    }
}

/// Holds a topic name's creation/deletion lock; forgets the name once nobody else wants it.
struct LifecycleGuard<'a> {
    broker: &'a Broker,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for LifecycleGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self
            .broker
            .lifecycle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Two references: the map's and ours. More means someone else holds or awaits it.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.key);
        }
    }
}

fn terminated_key(topic: &TopicName) -> String {
    format!(
        "/terminated-topics/{}/{}/{}",
        topic.tenant, topic.namespace, topic.local
    )
}

fn partitioned_key(topic: &TopicName) -> String {
    let base = topic.base();
    format!(
        "/partitioned-topics/{}/{}/{}",
        base.tenant, base.namespace, base.local
    )
}

impl Broker {
    pub fn new(
        config: BrokerConfig,
        storage: Storage,
        metadata: Arc<dyn MetadataStore>,
    ) -> Result<Arc<Broker>> {
        let known_topics: BTreeSet<String> = storage.log_names()?.into_iter().collect();
        let instance = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0);
        let remote_clients = Arc::new(RemoteClients::new(config.replication_max_memory_bytes));
        Ok(Arc::new(Broker {
            shared: Arc::new(TopicContext::new(
                config,
                storage,
                format!("{instance:x}"),
                remote_clients,
            )),
            schemas: SchemaRegistry::new(metadata.clone()),
            resources: Resources::new(metadata.clone()),
            metadata,
            topics: Mutex::new(HashMap::new()),
            known_topics: Mutex::new(known_topics),
            deleting: Mutex::new(BTreeSet::new()),
            lifecycle: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            migrations: crate::migration::Drivers::default(),
            authorization_changes: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
        }))
    }

    /// Puts the broker in cluster mode: from now on it serves a topic only while it owns the
    /// topic's bundle (`crate::cluster`). Set once, before serving.
    pub fn set_cluster(&self, mode: Arc<crate::cluster::ClusterMode>) {
        let _ = self.shared.cluster.set(mode.clone());
        let _ = self.cluster.set(mode);
    }

    /// The cluster membership in cluster mode; `None` in standalone.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::ClusterMode>> {
        self.cluster.get()
    }

    /// The tenant migrations this broker drives.
    pub(crate) fn migration_drivers(&self) -> &crate::migration::Drivers {
        &self.migrations
    }

    /// Topics the broker cannot serve now, and its failure counters.
    pub fn health(&self) -> &TopicHealth {
        &self.shared.health
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    pub fn schemas(&self) -> &SchemaRegistry {
        &self.schemas
    }

    pub fn metadata(&self) -> &Arc<dyn MetadataStore> {
        &self.metadata
    }

    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// Changes whenever a record that authorization reads is written or deleted: a tenant
    /// (its admin roles), a namespace's policies or a topic's policies (their grants).
    /// Connections re-check their producers and consumers then, so a revocation takes effect
    /// at once, as in Pulsar. The first call (inside the runtime) starts the watch.
    pub fn authorization_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.authorization_changes
            .get_or_init(|| {
                let (sender, _) = tokio::sync::watch::channel(0u64);
                let notify = sender.clone();
                let mut changes = self.metadata.watch();
                tokio::spawn(async move {
                    use tokio::sync::broadcast::error::RecvError;
                    loop {
                        match changes.recv().await {
                            Ok(change)
                                if !change.is_missed() && !affects_authorization(&change.key) => {}
                            // Missed changes may have been grants.
                            Ok(_) | Err(RecvError::Lagged(_)) => {
                                notify.send_modify(|count| *count = count.wrapping_add(1));
                            }
                            Err(RecvError::Closed) => return,
                        }
                    }
                });
                sender
            })
            .subscribe()
    }

    /// Whether topics of `namespace` may be auto-created, and as partitioned with how many
    /// partitions (`None`: non-partitioned): the namespace override, else the broker settings.
    fn auto_creation(&self, name: &TopicName) -> Result<(bool, Option<u32>)> {
        let config = &self.shared.config;
        let broker_default = (
            config.allow_auto_topic_creation,
            (config.auto_topic_creation_type == AutoTopicCreationType::Partitioned)
                .then_some(config.default_num_partitions.max(1)),
        );
        let policies = match self.resources.policies(&name.tenant, &name.namespace) {
            Ok(policies) => policies,
            Err(BrokerError::NotFound(_)) => return Ok((false, None)),
            Err(error) => return Err(error),
        };
        Ok(match policies.auto_topic_creation_override {
            Some(rule) => {
                let partitioned = rule.topic_type.as_deref() == Some("partitioned");
                (
                    rule.allow_auto_topic_creation,
                    partitioned.then(|| {
                        rule.default_num_partitions
                            .unwrap_or(config.default_num_partitions)
                            .max(1)
                    }),
                )
            }
            None => broker_default,
        })
    }

    /// A broker-wide unique key for a producer or consumer.
    pub fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
    }

    fn topic_exists(&self, name: &TopicName) -> bool {
        let known = self
            .known_topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&name.to_string());
        known
            || name.partition_index().is_some_and(|index| {
                self.partition_count(&name.base())
                    .is_ok_and(|partitions| partitions.is_some_and(|count| index < count))
            })
    }

    /// The loaded topic, loading it (and creating it if allowed) on first use.
    pub async fn topic(&self, name: &TopicName, create_if_missing: bool) -> Result<Arc<Topic>> {
        let key = name.to_string();
        if self.is_being_deleted(&key) {
            self.await_lifecycle(&key).await?;
        }
        if let Some(cluster) = self.cluster.get() {
            cluster.ensure_owned(self, name).await?;
        }
        let cell = {
            let mut topics = self
                .topics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let limit = self.shared.config.max_loaded_topics;
            if limit > 0 && !topics.contains_key(&key) {
                let loaded = topics.values().filter(|cell| cell.initialized()).count();
                if loaded >= limit {
                    return Err(BrokerError::TooManyLoadedTopics { topic: key, limit });
                }
            }
            topics.entry(key.clone()).or_default().clone()
        };
        let loaded = cell
            .get_or_try_init(|| async {
                if !self
                    .resources
                    .namespace_exists(&name.tenant, &name.namespace)?
                {
                    return Err(BrokerError::TopicNotFound(format!(
                        "topic {key} does not exist: namespace {} does not exist",
                        name.namespace_name()
                    )));
                }
                if !self.topic_exists(name) {
                    let (allowed, _) = self.auto_creation(name)?;
                    if !(create_if_missing && allowed) {
                        return Err(BrokerError::TopicNotFound(format!(
                            "topic {key} does not exist and automatic topic creation is disabled"
                        )));
                    }
                    if self.partition_count(&name.base())?.is_some() {
                        return Err(BrokerError::NotAllowed(format!(
                            "{key} is a partitioned topic or a partition beyond its count; use its partitions"
                        )));
                    }
                    self.check_namespace_room(name, 1)?;
                }
                let policies = self.resources.effective_policies(name)?;
                let terminated = self.metadata.get(&terminated_key(name))?.is_some();
                let shared = self.shared.clone();
                let name = name.clone();
                let health = self.shared.clone();
                let topic = tokio::task::spawn_blocking(move || {
                    Topic::load(shared, name, &policies, terminated)
                })
                .await
                .map_err(|error| {
                    BrokerError::Unknown(format!("topic load task failed: {error}"))
                })?
                .map_err(|error| match error {
                    BrokerError::Storage(cause) => {
                        let reason = format!("its log cannot be opened: {cause}");
                        health.health.record(&key, FailureKind::LoadFailed, &reason);
                        BrokerError::TopicUnavailable {
                            topic: key.clone(),
                            reason,
                        }
                    }
                    other => other,
                })?;
                health.health.recovered(&key);
                self.known_topics
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(key.clone());
                self.update_replication(&topic);
                Ok(topic)
            })
            .await;
        match loaded {
            Ok(topic) => Ok(topic.clone()),
            Err(error) => {
                self.forget_failed_slot(&key, &cell);
                Err(error)
            }
        }
    }

    /// A load that failed leaves its slot empty; it is removed unless another request waits on
    /// it, so that requests for names that do not exist (or cannot load) leave nothing behind.
    fn forget_failed_slot(&self, key: &str, cell: &Arc<OnceCell<Arc<Topic>>>) {
        let mut topics = self
            .topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Under the map's lock only the map and this request can hold the slot when the
        // count is two: no one else is loading through it, and no one can start to.
        if topics.get(key).is_some_and(|slot| {
            Arc::ptr_eq(slot, cell) && !slot.initialized() && Arc::strong_count(slot) == 2
        }) {
            topics.remove(key);
        }
    }

    /// Topic slots held: loaded topics and loads under way (for tests of what failed loads
    /// leave behind).
    #[doc(hidden)]
    pub fn topic_slots(&self) -> usize {
        self.topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Starts and stops the topic's replicators to match its replication policy and the
    /// cluster registry. Problems are logged: local traffic does not depend on them.
    pub fn update_replication(&self, topic: &Arc<Topic>) {
        if let Err(error) = self
            .plan_replication(topic)
            .and_then(|plan| topic.set_replication(plan))
        {
            tracing::warn!(topic = %topic.name, %error, "updating replication failed");
        }
        if topic.needs_subscription_sync() {
            topic.ensure_subscription_sync();
        }
    }

    /// The remote clusters a topic with these policies replicates to. A cluster replicates a
    /// topic only if its own name is in the topic's clusters.
    fn replication_remotes(&self, policies: &EffectivePolicies) -> Vec<String> {
        let local = &self.shared.config.cluster_name;
        if !policies.replication_clusters.contains(local) {
            return Vec::new();
        }
        policies
            .replication_clusters
            .iter()
            .filter(|cluster| *cluster != local)
            .cloned()
            .collect()
    }

    fn plan_replication(&self, topic: &Topic) -> Result<ReplicationPlan> {
        let local = &self.shared.config.cluster_name;
        let policies = self.resources.effective_policies(&topic.name)?;
        let configured = self.replication_remotes(&policies);
        let mut remotes = Vec::new();
        for name in &configured {
            let data = match self.resources.cluster(name) {
                Ok(data) => data,
                Err(BrokerError::NotFound(_)) => {
                    tracing::warn!(topic = %topic.name, cluster = %name, "replication cluster is not registered; not replicating to it");
                    continue;
                }
                Err(error) => return Err(error),
            };
            match RemoteCluster::from_data(name, &data) {
                Some(remote) => remotes.push(remote),
                None => {
                    tracing::warn!(topic = %topic.name, cluster = %name, "replication cluster has no brokerServiceUrl (brokerServiceUrlTls with brokerClientTlsEnabled); not replicating to it")
                }
            }
        }
        let partitions = match topic.name.partition_index() {
            Some(_) => self.partition_count(&topic.name.base())?,
            None => None,
        };
        let mut registered = Vec::new();
        for name in self.resources.clusters()? {
            if name == *local {
                continue;
            }
            if let Ok(data) = self.resources.cluster(&name) {
                registered.extend(RemoteCluster::from_data(&name, &data));
            }
        }
        Ok(ReplicationPlan {
            registered,
            configured,
            remotes,
            partitions,
            rate: policies
                .replicator_dispatch_rate
                .get(local)
                .filter(|rate| rate.is_limited())
                .cloned(),
            start_at_earliest: self.shared.config.replication_start_earliest,
            earliest_remotes: crate::migration::earliest_remotes(&self.metadata, &topic.name),
        })
    }

    /// Loads the topics of `tenant` (and `namespace`, if given; everything for `None`) that
    /// replicate to another cluster and are not loaded yet, so that their replicators run
    /// without waiting for a client, as Pulsar loads a bundle's topics when it takes the bundle.
    pub async fn load_replicated_topics(&self, scope: Option<(&str, Option<&str>)>) {
        for topic in self.all_topics() {
            let Ok(name) = TopicName::parse(&topic) else {
                continue;
            };
            let in_scope = scope.is_none_or(|(tenant, namespace)| {
                name.tenant == tenant
                    && namespace.is_none_or(|namespace| name.namespace == namespace)
            });
            if !in_scope || self.loaded_topic(&name).is_some() {
                continue;
            }
            let replicated = self
                .resources
                .effective_policies(&name)
                .is_ok_and(|policies| !self.replication_remotes(&policies).is_empty());
            if replicated {
                if let Err(error) = self.topic(&name, false).await {
                    tracing::warn!(topic = %name, %error, "loading a replicated topic failed");
                }
            }
        }
    }

    /// The cluster registry changed: re-plan every loaded topic's replicators, and close the
    /// clients of remotes whose registration changed.
    pub async fn clusters_changed(&self) {
        for topic in self.loaded_topics() {
            self.update_replication(&topic);
        }
        let mut current = Vec::new();
        for name in self.resources.clusters().unwrap_or_default() {
            if let Ok(data) = self.resources.cluster(&name) {
                current.extend(RemoteCluster::from_data(&name, &data));
            }
        }
        self.shared.remote_clients.retain(&current).await;
    }

    /// The storage engine, for read-only uses (stats of topics that are not loaded).
    pub fn storage(&self) -> &Storage {
        &self.shared.storage
    }

    /// The loaded topic, if it is loaded.
    pub fn loaded_topic(&self, name: &TopicName) -> Option<Arc<Topic>> {
        let topics = self
            .topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        topics
            .get(&name.to_string())
            .and_then(|cell| cell.get().cloned())
    }

    /// Partition count of a partitioned topic; `None` if it is not partitioned.
    pub fn partition_count(&self, name: &TopicName) -> Result<Option<u32>> {
        // A partition is a plain topic, never partitioned itself (its base may be).
        if name.partition_index().is_some() {
            return Ok(None);
        }
        let Some(stored) = self.metadata.get(&partitioned_key(name))? else {
            return Ok(None);
        };
        let metadata: PartitionedTopicMetadata =
            serde_json::from_slice(&stored.value).map_err(|error| {
                BrokerError::Metadata(format!("partitioned metadata of {name}: {error}"))
            })?;
        Ok(Some(metadata.partitions))
    }

    /// Takes the creation/deletion lock of one topic name. The map keeps only names whose lock
    /// is held or awaited.
    async fn lifecycle_lock(&self, key: &str) -> LifecycleGuard<'_> {
        let lock = self
            .lifecycle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        LifecycleGuard {
            broker: self,
            key: key.to_string(),
            lock,
            guard: Some(guard),
        }
    }

    /// Refuses a partition count above `max_num_partitions_per_partitioned_topic`.
    fn check_partition_limit(&self, name: &TopicName, partitions: u32) -> Result<()> {
        let limit = self.shared.config.max_num_partitions_per_partitioned_topic;
        if limit > 0 && partitions > limit {
            return Err(BrokerError::PreconditionFailed(format!(
                "{name}: {partitions} partitions exceed the limit of {limit} (max_num_partitions_per_partitioned_topic)"
            )));
        }
        Ok(())
    }

    /// Refuses `adding` more topics (partitions count one each) to a namespace that would then
    /// hold more than `max_topics_per_namespace`.
    fn check_namespace_room(&self, name: &TopicName, adding: usize) -> Result<()> {
        let limit = self.shared.config.max_topics_per_namespace;
        if limit == 0 {
            return Ok(());
        }
        let existing = self.topics_of_namespace(&name.namespace_name())?.len();
        if existing + adding > limit {
            return Err(BrokerError::PreconditionFailed(format!(
                "namespace {} holds {existing} topics; {adding} more would exceed the limit of {limit} (max_topics_per_namespace)",
                name.namespace_name()
            )));
        }
        Ok(())
    }

    /// Creates a partitioned topic with `partitions` partitions.
    pub fn create_partitioned_topic(&self, name: &TopicName, partitions: u32) -> Result<()> {
        if partitions == 0 {
            return Err(BrokerError::NotAllowed(
                "a partitioned topic needs at least one partition".into(),
            ));
        }
        if name.partition_index().is_some() {
            return Err(BrokerError::NotAllowed(format!(
                "{name} is a partition name"
            )));
        }
        name.check_partition_names(partitions)?;
        self.check_partition_limit(name, partitions)?;
        self.check_namespace_room(name, partitions as usize)?;
        let value = serde_json::to_vec(&PartitionedTopicMetadata { partitions })
            .map_err(|error| BrokerError::Metadata(error.to_string()))?;
        self.metadata
            .put(&partitioned_key(name), &value, ExpectedVersion::Absent)
            .map_err(|error| match error {
                meridian_metadata::MetadataError::BadVersion { .. } => {
                    BrokerError::AlreadyExists(format!("partitioned topic {name} already exists"))
                }
                other => other.into(),
            })?;
        Ok(())
    }

    /// What PARTITIONED_METADATA answers: the partition count (0: not partitioned). With
    /// `allow_create`, an unknown topic is auto-created as partitioned if the broker is
    /// configured that way.
    pub fn partitioned_metadata(&self, name: &TopicName, allow_create: bool) -> Result<u32> {
        // A partition is a plain topic, never partitioned itself.
        if name.partition_index().is_some() {
            return Ok(0);
        }
        if let Some(partitions) = self.partition_count(name)? {
            return Ok(partitions);
        }
        if !allow_create || name.partition_index().is_some() || self.topic_exists(name) {
            return Ok(0);
        }
        if let (true, Some(partitions)) = self.auto_creation(name)? {
            match self.create_partitioned_topic(name, partitions) {
                Ok(()) | Err(BrokerError::AlreadyExists(_)) => {}
                Err(error) => return Err(error),
            }
            return Ok(self.partition_count(name)?.unwrap_or(0));
        }
        Ok(0)
    }

    /// Every persistent topic of a namespace (`tenant/namespace`), partitions included.
    pub fn topics_of_namespace(&self, namespace: &str) -> Result<Vec<String>> {
        let prefix = format!("persistent://{namespace}/");
        let mut topics: BTreeSet<String> = self
            .known_topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|topic| topic.starts_with(&prefix))
            .cloned()
            .collect();
        if let Some((tenant, local_namespace)) = namespace.split_once('/') {
            for base in self
                .metadata
                .children(&format!("/partitioned-topics/{tenant}/{local_namespace}"))?
            {
                if let Ok(name) = TopicName::parse(&format!("{prefix}{base}")) {
                    if let Some(partitions) = self.partition_count(&name)? {
                        topics
                            .extend((0..partitions).map(|index| name.partition(index).to_string()));
                    }
                }
            }
        }
        Ok(topics.into_iter().collect())
    }

    /// All topics (and partitions) that exist, loaded or not.
    pub fn all_topics(&self) -> Vec<String> {
        self.known_topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Whether a non-partitioned topic or partition exists.
    pub fn exists(&self, name: &TopicName) -> bool {
        self.topic_exists(name)
    }

    /// Loaded topics.
    pub fn loaded_topics(&self) -> Vec<Arc<Topic>> {
        let topics = self
            .topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        topics
            .values()
            .filter_map(|cell| cell.get().cloned())
            .collect()
    }

    /// Grows a partitioned topic to `partitions` partitions (never shrinks).
    pub fn update_partitions(&self, name: &TopicName, partitions: u32) -> Result<()> {
        let current = self.partition_count(name)?.ok_or_else(|| {
            BrokerError::NotFound(format!("partitioned topic {name} does not exist"))
        })?;
        if partitions <= current {
            return Err(BrokerError::PreconditionFailed(format!(
                "{name} has {current} partitions; the count can only grow"
            )));
        }
        name.check_partition_names(partitions)?;
        self.check_partition_limit(name, partitions)?;
        self.check_namespace_room(name, (partitions - current) as usize)?;
        let value = serde_json::to_vec(&PartitionedTopicMetadata { partitions })
            .map_err(|error| BrokerError::Metadata(error.to_string()))?;
        self.metadata
            .put(&partitioned_key(name), &value, ExpectedVersion::Any)?;
        Ok(())
    }

    /// Closes a loaded topic's producers and consumers (they reconnect and the topic is loaded
    /// again, with current policies).
    pub async fn unload(&self, name: &TopicName) {
        let cell = {
            let mut topics = self
                .topics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            topics.remove(&name.to_string())
        };
        let Some(topic) = cell.and_then(|cell| cell.get().cloned()) else {
            return;
        };
        let shared = self.shared.clone();
        let full_name = topic.full_name().to_string();
        let closed = tokio::task::spawn_blocking(move || {
            topic.unload();
            shared.close_log(&full_name, Some(topic.log()))
        })
        .await;
        match closed {
            Ok(Ok(())) => tracing::info!(topic = %name, "topic unloaded"),
            Ok(Err(error)) => {
                tracing::warn!(topic = %name, %error, "closing the topic's log failed")
            }
            Err(error) => tracing::warn!(topic = %name, %error, "unload task failed"),
        }
    }

    /// Waits (at most [`LIFECYCLE_WAIT`]) for the admin creation or deletion of `key` that is
    /// running to end. A client that subscribes or produces meanwhile is served once it ends
    /// instead of being told to retry at once: the C++ client (Python's, too) does not always
    /// retry a SUBSCRIBE that fails with `ServiceNotReady`, and times out.
    async fn await_lifecycle(&self, key: &str) -> Result<()> {
        match tokio::time::timeout(LIFECYCLE_WAIT, self.lifecycle_lock(key)).await {
            Ok(guard) => drop(guard),
            Err(_) => return Err(BrokerError::BeingCreatedOrDeleted(key.to_string())),
        }
        if self.is_being_deleted(key) {
            // Another creation or deletion began right after: the client retries.
            return Err(BrokerError::BeingCreatedOrDeleted(key.to_string()));
        }
        Ok(())
    }

    fn is_being_deleted(&self, topic: &str) -> bool {
        self.deleting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(topic)
    }

    /// Deletes a non-partitioned topic (or one partition) with its data; refused with
    /// `PreconditionFailed` while it has clients unless `force`. Clients that reconnect
    /// meanwhile are told to retry (`ServiceNotReady`) instead of loading the topic again
    /// while its log is being removed.
    pub async fn delete_topic(&self, name: &TopicName, force: bool) -> Result<()> {
        self.claimed(name, self.delete_topic_now(name, force)).await
    }

    /// Runs an admin creation or deletion of `name` with the name claimed (clients loading it
    /// meanwhile get `BeingCreatedOrDeleted`), so that two never overlap on one name: storage would see
    /// a directory vanish under a creation. The second one gets `Conflict` (HTTP 409).
    async fn claimed<T>(
        &self,
        name: &TopicName,
        change: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let key = name.to_string();
        let _lifecycle = self.lifecycle_lock(&key).await;
        if !self
            .deleting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key.clone())
        {
            return Err(BrokerError::Conflict(format!(
                "topic {key} is being created or deleted by another request"
            )));
        }
        // Released however this ends: an HTTP client that gives up drops the request's future
        // here, and a claim left behind would make the topic unloadable for good.
        let _claim = Claim {
            broker: self,
            key: key.clone(),
        };
        change.await
    }

    async fn delete_topic_now(&self, name: &TopicName, force: bool) -> Result<()> {
        if !self.topic_exists(name) {
            return Err(BrokerError::NotFound(format!(
                "topic {name} does not exist"
            )));
        }
        if let Some(topic) = self.loaded_topic(name) {
            if topic.has_clients() && !force {
                return Err(BrokerError::PreconditionFailed(format!(
                    "topic {name} has active producers or consumers; use force=true"
                )));
            }
        }
        self.unload(name).await;
        let shared = self.shared.clone();
        let full_name = name.to_string();
        tokio::task::spawn_blocking(move || shared.delete_log(&full_name))
            .await
            .map_err(|error| BrokerError::Unknown(error.to_string()))??;
        self.known_topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&name.to_string());
        self.shared.health.forget(&name.to_string());
        self.metadata
            .delete(&terminated_key(name), ExpectedVersion::Any)?;
        Ok(())
    }

    /// Deletes a namespace with every topic in it (their logs too), whatever clients they have.
    pub async fn delete_namespace(&self, tenant: &str, namespace: &str) -> Result<()> {
        for topic in self.topics_of_namespace(&format!("{tenant}/{namespace}"))? {
            let name = TopicName::parse(&topic)?;
            if name.partition_index().is_some() && self.partition_count(&name.base())?.is_some() {
                continue;
            }
            self.delete_topic(&name, true).await?;
        }
        for base in self
            .metadata
            .children(&format!("/partitioned-topics/{tenant}/{namespace}"))?
        {
            let name = TopicName::parse(&format!("persistent://{tenant}/{namespace}/{base}"))?;
            self.delete_partitioned_topic(&name, true).await?;
        }
        self.resources().delete_namespace(tenant, namespace)
    }

    /// Deletes a partitioned topic: its partitions, then its metadata.
    pub async fn delete_partitioned_topic(&self, name: &TopicName, force: bool) -> Result<()> {
        let partitions = self.partition_count(name)?.ok_or_else(|| {
            BrokerError::NotFound(format!("partitioned topic {name} does not exist"))
        })?;
        for index in 0..partitions {
            let partition = name.partition(index);
            if let Some(topic) = self.loaded_topic(&partition) {
                if topic.has_clients() && !force {
                    return Err(BrokerError::PreconditionFailed(format!(
                        "partition {partition} has active producers or consumers; use force=true"
                    )));
                }
            }
        }
        for index in 0..partitions {
            match self.delete_topic(&name.partition(index), true).await {
                Ok(()) | Err(BrokerError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
        self.metadata
            .delete(&partitioned_key(name), ExpectedVersion::Any)?;
        Ok(())
    }

    /// Terminates a topic for good (it survives restarts); returns its last message's position.
    pub async fn terminate(&self, name: &TopicName) -> Result<Option<meridian_storage::Position>> {
        if !self.topic_exists(name) {
            return Err(BrokerError::NotFound(format!(
                "topic {name} does not exist"
            )));
        }
        let topic = self.topic(name, false).await?;
        self.metadata
            .put(&terminated_key(name), b"{}", ExpectedVersion::Any)?;
        Ok(topic.terminate())
    }

    /// Creates a non-partitioned topic (its log) without a client.
    pub async fn create_topic(&self, name: &TopicName) -> Result<()> {
        self.claimed(name, self.create_topic_now(name)).await
    }

    async fn create_topic_now(&self, name: &TopicName) -> Result<()> {
        if self.topic_exists(name) {
            return Err(BrokerError::AlreadyExists(format!(
                "topic {name} already exists"
            )));
        }
        if self.partition_count(&name.base())?.is_some() {
            return Err(BrokerError::AlreadyExists(format!(
                "{name} is a partitioned topic or one of its partitions"
            )));
        }
        self.check_namespace_room(name, 1)?;
        if !self
            .resources
            .namespace_exists(&name.tenant, &name.namespace)?
        {
            return Err(BrokerError::NotFound(format!(
                "namespace {} does not exist",
                name.namespace_name()
            )));
        }
        self.check_namespace_room(name, 1)?;
        let shared = self.shared.clone();
        let full_name = name.to_string();
        tokio::task::spawn_blocking(move || shared.storage.open_log(&full_name).map(|_| ()))
            .await
            .map_err(|error| BrokerError::Unknown(error.to_string()))??;
        self.known_topics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.to_string());
        Ok(())
    }

    /// Re-reads the policies of every loaded topic (after an admin change): retention at once,
    /// a de-duplication change by unloading the topic, TTL and quotas at the next check.
    pub async fn policies_changed(&self, tenant: &str, namespace: Option<&str>) {
        for topic in self.loaded_topics() {
            let name = &topic.name;
            if name.tenant != tenant
                || namespace.is_some_and(|namespace| name.namespace != namespace)
            {
                continue;
            }
            let Ok(policies) = self.resources.effective_policies(name) else {
                continue;
            };
            let deduplication = policies
                .deduplication_enabled
                .unwrap_or(self.shared.config.deduplication_enabled);
            if deduplication != topic.deduplication_enabled() {
                self.unload(&name.clone()).await;
            } else {
                topic.enforce_policies(&policies);
                self.update_replication(&topic);
            }
        }
        self.load_replicated_topics(Some((tenant, namespace))).await;
    }

    /// Runs TTL expiry, backlog quotas and retention on every loaded topic.
    pub fn enforce_policies(&self) {
        for topic in self.loaded_topics() {
            match self.resources.effective_policies(&topic.name) {
                Ok(policies) => topic.enforce_policies(&policies),
                Err(error) => {
                    tracing::warn!(topic = %topic.name, %error, "reading policies failed")
                }
            }
        }
    }

    /// Updates every rate (messages and bytes per second) from the counters.
    pub fn sample_rates(&self) {
        for topic in self.loaded_topics() {
            topic.sample_rates();
        }
    }

    /// Stops dispatch on every topic and closes storage (flushing and persisting cursors).
    pub async fn close(self: &Arc<Self>) {
        let topics: Vec<Arc<Topic>> = {
            let mut topics = self
                .topics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            topics
                .drain()
                .filter_map(|(_, cell)| cell.get().cloned())
                .collect()
        };
        let broker = self.clone();
        let closed = tokio::task::spawn_blocking(move || {
            for topic in topics {
                topic.close();
            }
            for name in broker.shared.storage.log_names().unwrap_or_default() {
                if let Err(error) = broker.shared.close_log(&name, None) {
                    tracing::error!(log = %name, %error, "closing log failed");
                }
            }
        })
        .await;
        if let Err(error) = closed {
            tracing::error!(%error, "closing topics failed");
        }
    }
}

/// Whether a metadata record holds what authorization reads (tenants' admin roles, namespace
/// and topic grants).
fn affects_authorization(key: &str) -> bool {
    ["/tenants/", "/namespaces/", "/topic-policies/"]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

/// For unit tests: a broker on `storage` with its metadata under `directory`, and namespace
/// `t/n`.
#[cfg(test)]
pub(crate) fn test_broker(directory: &std::path::Path, storage: Storage) -> Arc<Broker> {
    let metadata =
        meridian_metadata::EmbeddedStore::open(&directory.join("metadata")).expect("metadata");
    let broker = Broker::new(BrokerConfig::default(), storage, metadata).expect("broker");
    let resources = broker.resources();
    resources
        .create_tenant("t", &crate::resources::TenantInfo::default())
        .expect("tenant");
    resources
        .create_namespace("t", "n", &crate::resources::Policies::default())
        .expect("namespace");
    broker
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_arriving_during_an_admin_creation_is_served_once_it_ends() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = Storage::open(
            directory.path().join("storage"),
            meridian_storage::StorageConfig::default(),
        )
        .expect("storage");
        let broker = test_broker(directory.path(), storage);
        let name = TopicName::parse("persistent://t/n/created").expect("name");
        // An admin creation that holds the name until the test lets it go on.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (claimed_tx, claimed) = tokio::sync::oneshot::channel::<()>();
        let creation = {
            let (broker, name) = (broker.clone(), name.clone());
            tokio::spawn(async move {
                broker
                    .claimed(&name, async {
                        let _ = claimed_tx.send(());
                        let _ = released.await;
                        broker.create_topic_now(&name).await
                    })
                    .await
            })
        };
        claimed.await.expect("the creation holds the name");
        let mut client = {
            let (broker, name) = (broker.clone(), name.clone());
            tokio::spawn(async move { broker.topic(&name, false).await.map(|_| ()) })
        };
        // The client's load waits for the creation instead of failing at once (before the
        // change it was refused with ServiceNotReady right away).
        if let Ok(answer) =
            tokio::time::timeout(std::time::Duration::from_millis(500), &mut client).await
        {
            panic!("the client was answered while the creation ran: {answer:?}");
        }
        release.send(()).expect("release");
        creation.await.expect("creation task").expect("created");
        client
            .await
            .expect("client task")
            .expect("the topic, once created, is served to the client that came meanwhile");
    }
}
