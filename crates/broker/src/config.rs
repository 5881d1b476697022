//! Broker settings, with Pulsar's defaults where Pulsar has one.

use serde::{Deserialize, Serialize};

/// How topics are auto-created on first use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoTopicCreationType {
    NonPartitioned,
    Partitioned,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Name of this cluster (`standalone` by default).
    pub cluster_name: String,
    /// `pulsar://host:port` that lookups return.
    pub broker_service_url: String,
    /// `http://host:port` of the web service.
    pub web_service_url: String,
    /// `pulsar+ssl://host:port` that lookups return too, when the TLS port is enabled.
    pub broker_service_url_tls: Option<String>,
    /// `https://host:port` of the web service, when its TLS port is enabled.
    pub web_service_url_tls: Option<String>,
    /// Topics are created on first use (Pulsar's `allowAutoTopicCreation`, default true).
    pub allow_auto_topic_creation: bool,
    pub auto_topic_creation_type: AutoTopicCreationType,
    /// Partitions of an auto-created partitioned topic (`defaultNumPartitions`, default 1).
    pub default_num_partitions: u32,
    /// Largest message (entry) accepted (`maxMessageSize`, 5 MiB).
    pub max_message_size: usize,
    /// Topics loaded at once: loading one more is refused (ServiceNotReady, HTTP 503) until
    /// others are unloaded. Every loaded topic holds open files and memory.
    pub max_loaded_topics: usize,
    /// Broker-wide de-duplication switch (`brokerDeduplicationEnabled`, default false).
    pub deduplication_enabled: bool,
    /// Dedup state is snapshotted into the topic's `pulsar.dedup` cursor every this many entries.
    pub deduplication_snapshot_interval_entries: u64,
    /// Entries read from storage per dispatch round.
    pub dispatch_max_entries_per_read: usize,
    /// Bytes read from storage per dispatch round (at least one entry is read).
    pub dispatch_max_bytes_per_read: usize,
    /// Dispatch to a consumer pauses while it has this many unacknowledged messages
    /// (`maxUnackedMessagesPerConsumer`, 50,000).
    pub max_unacked_messages_per_consumer: u64,
    /// Messages waiting for redelivery per subscription before reading new entries pauses.
    pub max_redelivery_backlog: usize,
    /// Delayed messages tracked per subscription before reading new entries pauses.
    pub max_delayed_messages: usize,
    /// Delayed delivery is honoured (`delayedDeliveryEnabled`, default true).
    pub delayed_delivery_enabled: bool,
    /// Acknowledgements of single messages inside a batch are kept (with the cursor) instead of
    /// being ignored until the whole batch is acknowledged
    /// (`acknowledgmentAtBatchIndexLevelEnabled`, default false).
    pub batch_index_ack_enabled: bool,
    /// How often a replicated subscription's acknowledgements are sent to the topic's other
    /// clusters (and at once when a consumer closes).
    pub replicated_subscriptions_sync_interval: std::time::Duration,
    /// Announce (in CONNECTED) and take Meridian's REPLICATED_SUBSCRIPTION_STATE command, so
    /// that other clusters send replicated subscriptions' states on the binary protocol; off,
    /// they post them to the admin API.
    pub replicated_subscriptions_state_command: bool,
    /// With the command, announce that its state may come in the compact (protobuf) form, so
    /// that other clusters send that instead of the JSON text; off, they send JSON.
    pub replicated_subscriptions_state_compact: bool,
    /// A topic's new replicator starts at its earliest message (back-fill) instead of the
    /// latest, Pulsar's default.
    pub replication_start_earliest: bool,
    /// Partitions of one partitioned topic at most (`maxNumPartitionsPerPartitionedTopic`;
    /// 0: no limit).
    pub max_num_partitions_per_partitioned_topic: u32,
    /// Topics of one namespace at most, partitions counted (`maxTopicsPerNamespace`; 0: no
    /// limit).
    pub max_topics_per_namespace: usize,
    /// Bytes of replicated entries held in memory (read and not yet confirmed by the remote)
    /// across every replicator.
    pub replication_max_memory_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            cluster_name: "standalone".into(),
            broker_service_url: "pulsar://127.0.0.1:6650".into(),
            web_service_url: "http://127.0.0.1:8080".into(),
            broker_service_url_tls: None,
            web_service_url_tls: None,
            allow_auto_topic_creation: true,
            auto_topic_creation_type: AutoTopicCreationType::NonPartitioned,
            default_num_partitions: 1,
            max_message_size: meridian_wire::DEFAULT_MAX_MESSAGE_SIZE,
            max_loaded_topics: 10_000,
            deduplication_enabled: false,
            deduplication_snapshot_interval_entries: 1000,
            dispatch_max_entries_per_read: 100,
            dispatch_max_bytes_per_read: 5 * 1024 * 1024,
            max_unacked_messages_per_consumer: 50_000,
            max_redelivery_backlog: 10_000,
            max_delayed_messages: 1_000_000,
            delayed_delivery_enabled: true,
            batch_index_ack_enabled: false,
            replication_start_earliest: false,
            replicated_subscriptions_sync_interval: std::time::Duration::from_millis(100),
            replicated_subscriptions_state_command: true,
            replicated_subscriptions_state_compact: true,
            max_num_partitions_per_partitioned_topic: 10_000,
            max_topics_per_namespace: 0,
            replication_max_memory_bytes: 128 * 1024 * 1024,
        }
    }
}
