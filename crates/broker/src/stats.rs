//! Counters and rates, and the stats shapes of Pulsar's admin API (`TopicStats`,
//! `SubscriptionStats`, `PersistentTopicInternalStats`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// A message and byte counter with rates computed between samples.
#[derive(Debug)]
pub struct Meter {
    messages: AtomicU64,
    bytes: AtomicU64,
    sample: Mutex<Sample>,
}

#[derive(Debug)]
struct Sample {
    at: Instant,
    messages: u64,
    bytes: u64,
    message_rate: f64,
    byte_rate: f64,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            sample: Mutex::new(Sample {
                at: Instant::now(),
                messages: 0,
                bytes: 0,
                message_rate: 0.0,
                byte_rate: 0.0,
            }),
        }
    }
}

impl Meter {
    pub fn record(&self, messages: u64, bytes: u64) {
        self.messages.fetch_add(messages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Rates (per second) since the previous sample; sampled by the broker's stats loop.
    pub fn sample(&self) {
        let mut sample = self
            .sample
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let elapsed = sample.at.elapsed().as_secs_f64();
        if elapsed <= 0.0 {
            return;
        }
        let (messages, bytes) = (self.messages(), self.bytes());
        sample.message_rate = (messages - sample.messages) as f64 / elapsed;
        sample.byte_rate = (bytes - sample.bytes) as f64 / elapsed;
        sample.messages = messages;
        sample.bytes = bytes;
        sample.at = Instant::now();
    }

    /// (messages per second, bytes per second) as of the last sample.
    pub fn rates(&self) -> (f64, f64) {
        let sample = self
            .sample
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (sample.message_rate, sample.byte_rate)
    }
}

/// A topic's traffic counters since it was loaded ([`crate::topic::Topic::traffic`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublisherStats {
    pub producer_id: u64,
    pub producer_name: String,
    pub msg_rate_in: f64,
    pub msg_throughput_in: f64,
    pub average_msg_size: f64,
    pub address: String,
    pub connected_since: String,
    pub client_version: String,
    pub access_mode: String,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerStats {
    pub consumer_name: String,
    pub msg_rate_out: f64,
    pub msg_throughput_out: f64,
    pub bytes_out_counter: u64,
    pub msg_out_counter: u64,
    pub available_permits: i64,
    pub unacked_messages: u64,
    pub blocked_consumer_on_unacked_msgs: bool,
    pub address: String,
    pub connected_since: String,
    pub client_version: String,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionStats {
    pub msg_rate_out: f64,
    pub msg_throughput_out: f64,
    pub bytes_out_counter: u64,
    pub msg_out_counter: u64,
    pub msg_rate_redeliver: f64,
    pub msg_rate_expired: f64,
    pub total_msg_expired: u64,
    pub msg_backlog: u64,
    pub backlog_size: u64,
    pub msg_backlog_no_delayed: u64,
    pub msg_delayed: u64,
    pub msg_in_replay: u64,
    pub unacked_messages: u64,
    pub blocked_subscription_on_unacked_msgs: bool,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_consumer_name: Option<String>,
    pub consumers: Vec<ConsumerStats>,
    pub is_durable: bool,
    pub is_replicated: bool,
    pub non_contiguous_deleted_messages_ranges: u64,
    /// Meridian's replicated-subscription sync, per other cluster.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub replicated_subscription_sync: BTreeMap<String, SubscriptionSyncStats>,
}

/// How a replicated subscription's sync with one other cluster stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscriptionSyncStats {
    /// When this cluster last sent the subscription's state there (ms since the epoch).
    pub last_sent_timestamp: Option<u64>,
    /// How long this cluster's current state has waited to be sent there (0: it has it).
    pub unsent_for_ms: u64,
    /// When a state from there was last received and applied here (ms since the epoch).
    pub last_received_timestamp: Option<u64>,
    /// Posts of the state there that failed in a row (0 once one succeeds); the next is tried
    /// after a wait that doubles with each.
    pub failed_attempts: u32,
    /// The last failed post's error, until one succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// How the last state the cluster there confirmed travelled: `binary` (Meridian's
    /// REPLICATED_SUBSCRIPTION_STATE command) or `http` (a post to its admin API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<&'static str>,
    /// That state's encoding: `compact` (the protobuf form, on the binary protocol to a broker
    /// that announced it) or `json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoding: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicStats {
    pub msg_rate_in: f64,
    pub msg_throughput_in: f64,
    pub msg_rate_out: f64,
    pub msg_throughput_out: f64,
    pub bytes_in_counter: u64,
    pub msg_in_counter: u64,
    pub bytes_out_counter: u64,
    pub msg_out_counter: u64,
    pub average_msg_size: f64,
    pub storage_size: u64,
    pub backlog_size: u64,
    pub offloaded_storage_size: u64,
    pub backlog_quota_limit_size: i64,
    pub backlog_quota_limit_time: i64,
    pub deduplication_status: String,
    pub publishers: Vec<PublisherStats>,
    pub waiting_publishers: u64,
    pub subscriptions: BTreeMap<String, SubscriptionStats>,
    pub replication: BTreeMap<String, ReplicatorStats>,
}

/// Pulsar's `ReplicatorStats` for one remote cluster, in topic stats.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatorStats {
    pub msg_rate_in: f64,
    pub msg_throughput_in: f64,
    pub msg_rate_out: f64,
    pub msg_throughput_out: f64,
    pub msg_in_count: u64,
    pub bytes_in_count: u64,
    pub msg_out_count: u64,
    pub bytes_out_count: u64,
    pub msg_rate_expired: f64,
    pub replication_backlog: u64,
    pub connected: bool,
    pub replication_delay_in_seconds: u64,
    pub inbound_connection: Option<String>,
    pub inbound_connected_since: Option<String>,
    pub outbound_connection: Option<String>,
    pub outbound_connected_since: Option<String>,
    /// Meridian: what the replicator is doing (`Started`, `Connecting`, or why it is stopped).
    pub state: String,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerInfo {
    pub ledger_id: u64,
    pub entries: u64,
    pub size: u64,
    pub offloaded: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CursorStats {
    pub mark_delete_position: String,
    pub read_position: String,
    pub messages_consumed_counter: u64,
    pub individually_deleted_messages: String,
    pub total_non_contiguous_deleted_messages_range: u64,
    pub properties: BTreeMap<String, String>,
    pub state: String,
    pub active: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InternalStats {
    pub entries_added_counter: u64,
    pub number_of_entries: u64,
    pub total_size: u64,
    pub current_ledger_entries: u64,
    pub current_ledger_size: u64,
    pub last_confirmed_entry: String,
    pub state: String,
    pub pending_add_entries_count: u64,
    pub ledgers: Vec<LedgerInfo>,
    pub cursors: BTreeMap<String, CursorStats>,
}
