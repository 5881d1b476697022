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
use crate::error::{BrokerError, Result};
use crate::schema::SchemaRegistry;
use crate::topic::Topic;
use crate::topic_name::TopicName;

/// What every topic shares.
pub(crate) struct BrokerShared {
    pub(crate) config: Arc<BrokerConfig>,
    pub(crate) storage: Storage,
    producer_names: AtomicU64,
    /// Makes generated producer names unique across restarts (they key de-duplication state).
    instance: String,
}

impl BrokerShared {
    pub(crate) fn generate_producer_name(&self) -> String {
        let counter = self.producer_names.fetch_add(1, Ordering::Relaxed);
        format!("{}-{}-{counter}", self.config.cluster_name, self.instance)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct PartitionedTopicMetadata {
    partitions: u32,
}

pub struct Broker {
    shared: Arc<BrokerShared>,
    metadata: Arc<dyn MetadataStore>,
    schemas: SchemaRegistry,
    topics: Mutex<HashMap<String, Arc<OnceCell<Arc<Topic>>>>>,
    /// Every topic (or partition) that has a log.
    known_topics: Mutex<BTreeSet<String>>,
    next_key: AtomicU64,
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
        Ok(Arc::new(Broker {
            shared: Arc::new(BrokerShared {
                config: Arc::new(config),
                storage,
                producer_names: AtomicU64::new(0),
                instance: format!("{instance:x}"),
            }),
            schemas: SchemaRegistry::new(metadata.clone()),
            metadata,
            topics: Mutex::new(HashMap::new()),
            known_topics: Mutex::new(known_topics),
            next_key: AtomicU64::new(1),
        }))
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
        let cell = {
            let mut topics = self
                .topics
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            topics.entry(key.clone()).or_default().clone()
        };
        let topic = cell
            .get_or_try_init(|| async {
                if !self.topic_exists(name) {
                    let allowed = create_if_missing && self.shared.config.allow_auto_topic_creation;
                    if !allowed {
                        return Err(BrokerError::TopicNotFound(key.clone()));
                    }
                    if self.partition_count(name)?.is_some() {
                        return Err(BrokerError::NotAllowed(format!(
                            "{key} is a partitioned topic; use its partitions"
                        )));
                    }
                }
                let shared = self.shared.clone();
                let name = name.clone();
                let topic = tokio::task::spawn_blocking(move || Topic::load(shared, name))
                    .await
                    .map_err(|error| {
                        BrokerError::Unknown(format!("topic load task failed: {error}"))
                    })??;
                self.known_topics
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(key.clone());
                Ok(topic)
            })
            .await?;
        Ok(topic.clone())
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
        let Some(stored) = self.metadata.get(&partitioned_key(name))? else {
            return Ok(None);
        };
        let metadata: PartitionedTopicMetadata =
            serde_json::from_slice(&stored.value).map_err(|error| {
                BrokerError::Metadata(format!("partitioned metadata of {name}: {error}"))
            })?;
        Ok(Some(metadata.partitions))
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
        let value = serde_json::to_vec(&PartitionedTopicMetadata { partitions })
            .map_err(|error| BrokerError::Metadata(error.to_string()))?;
        self.metadata
            .put(&partitioned_key(name), &value, ExpectedVersion::Absent)
            .map_err(|error| match error {
                meridian_metadata::MetadataError::BadVersion { .. } => {
                    BrokerError::NotAllowed(format!("partitioned topic {name} already exists"))
                }
                other => other.into(),
            })?;
        Ok(())
    }

    /// What PARTITIONED_METADATA answers: the partition count (0: not partitioned). With
    /// `allow_create`, an unknown topic is auto-created as partitioned if the broker is
    /// configured that way.
    pub fn partitioned_metadata(&self, name: &TopicName, allow_create: bool) -> Result<u32> {
        if let Some(partitions) = self.partition_count(name)? {
            return Ok(partitions);
        }
        let config = &self.shared.config;
        let creates_partitioned = allow_create
            && config.allow_auto_topic_creation
            && config.auto_topic_creation_type == AutoTopicCreationType::Partitioned
            && name.partition_index().is_none()
            && !self.topic_exists(name);
        if creates_partitioned {
            match self.create_partitioned_topic(name, config.default_num_partitions.max(1)) {
                Ok(()) | Err(BrokerError::NotAllowed(_)) => {}
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
                if let Err(error) = broker.shared.storage.close_log(&name) {
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
