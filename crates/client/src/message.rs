//! Messages: what a producer sends ([`ProducerMessage`]) and what a consumer
//! receives ([`Message`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meridian_wire::MessageMetadata;

use crate::message_id::MessageId;

/// A message to send. Build it with [`ProducerMessage::new`] and the `with_*`
/// methods, or convert a payload with `into()`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProducerMessage {
    /// The payload.
    pub payload: Bytes,
    /// The partition key: routes the message to a partition and, on a
    /// Key_Shared subscription, to a consumer.
    pub key: Option<String>,
    /// Key_Shared routing key that takes precedence over `key`.
    pub ordering_key: Option<Bytes>,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
    /// Application event time, milliseconds since the epoch.
    pub event_time: Option<u64>,
    /// An explicit sequence id; the producer assigns the next one otherwise.
    /// Explicit ids must increase.
    pub sequence_id: Option<u64>,
    /// Deliver no earlier than this time (milliseconds since the epoch) on a
    /// Shared or Key_Shared subscription. Such messages are never batched.
    pub deliver_at: Option<u64>,
    /// For replicators: the cluster this message was replicated from.
    pub replicated_from: Option<String>,
    /// Restricts replication to these clusters (empty: the namespace's).
    pub replicate_to: Vec<String>,
    /// Further entry metadata, for replicators. Its fields are kept except
    /// the ones the producer owns (`producer_name`, `sequence_id`,
    /// `num_messages_in_batch`, `compression`, `uncompressed_size`,
    /// `highest_sequence_id`); a non-zero `publish_time` is kept too. Only
    /// messages with equal templates share a batch.
    pub metadata: Option<Box<MessageMetadata>>,
    /// For replicators: a whole stored entry, sent as it is. Its metadata
    /// goes out unchanged (the original producer name, sequence id, publish
    /// time, batch size and compression) and `payload` is the entry's payload
    /// as stored (compressed, possibly a batch). Such a message is never
    /// batched; the producer's own sequence id only tags the SEND.
    pub entry: Option<Box<MessageMetadata>>,
}

impl ProducerMessage {
    /// A message with this payload and nothing else.
    pub fn new(payload: impl Into<Bytes>) -> ProducerMessage {
        ProducerMessage {
            payload: payload.into(),
            ..ProducerMessage::default()
        }
    }

    /// A stored entry to send unchanged (see [`ProducerMessage::entry`]).
    pub fn entry(metadata: MessageMetadata, payload: impl Into<Bytes>) -> ProducerMessage {
        ProducerMessage {
            payload: payload.into(),
            entry: Some(Box::new(metadata)),
            ..ProducerMessage::default()
        }
    }

    /// Sets the partition key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<Bytes>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Adds a property.
    pub fn with_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// Sets the event time (milliseconds since the epoch).
    pub fn with_event_time(mut self, event_time_ms: u64) -> Self {
        self.event_time = Some(event_time_ms);
        self
    }

    /// Sets an explicit sequence id.
    pub fn with_sequence_id(mut self, sequence_id: u64) -> Self {
        self.sequence_id = Some(sequence_id);
        self
    }

    /// Delivers at an absolute time (milliseconds since the epoch).
    pub fn with_deliver_at(mut self, deliver_at_ms: u64) -> Self {
        self.deliver_at = Some(deliver_at_ms);
        self
    }

    /// Delivers after a delay from now.
    pub fn with_deliver_after(self, delay: Duration) -> Self {
        let at = now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        self.with_deliver_at(at)
    }

    /// Marks the message as replicated from `cluster`.
    pub fn with_replicated_from(mut self, cluster: impl Into<String>) -> Self {
        self.replicated_from = Some(cluster.into());
        self
    }

    /// Restricts replication to these clusters.
    pub fn with_replicate_to(mut self, clusters: Vec<String>) -> Self {
        self.replicate_to = clusters;
        self
    }

    /// Sets the metadata template (see [`ProducerMessage::metadata`]).
    pub fn with_metadata(mut self, metadata: MessageMetadata) -> Self {
        self.metadata = Some(Box::new(metadata));
        self
    }
}

impl From<Bytes> for ProducerMessage {
    fn from(payload: Bytes) -> Self {
        ProducerMessage::new(payload)
    }
}

impl From<Vec<u8>> for ProducerMessage {
    fn from(payload: Vec<u8>) -> Self {
        ProducerMessage::new(payload)
    }
}

impl From<&'static [u8]> for ProducerMessage {
    fn from(payload: &'static [u8]) -> Self {
        ProducerMessage::new(payload)
    }
}

impl From<&'static str> for ProducerMessage {
    fn from(payload: &'static str) -> Self {
        ProducerMessage::new(payload)
    }
}

impl From<String> for ProducerMessage {
    fn from(payload: String) -> Self {
        ProducerMessage::new(payload)
    }
}

/// A received message.
#[derive(Clone, Debug)]
pub struct Message {
    /// The topic it came from (the partition's name for a partitioned topic).
    pub topic: Arc<str>,
    /// Its id, with the partition index and, for a batch, the batch index.
    pub id: MessageId,
    /// The payload (decompressed, cut out of its batch).
    pub payload: Bytes,
    /// The partition key.
    pub key: Option<String>,
    /// The ordering key.
    pub ordering_key: Option<Bytes>,
    /// Application properties.
    pub properties: BTreeMap<String, String>,
    /// Publish time stamped by the producer, milliseconds since the epoch.
    pub publish_time: u64,
    /// The application event time, if the producer set one.
    pub event_time: Option<u64>,
    /// The producer's sequence id for this message.
    pub sequence_id: u64,
    /// The name of the producer that sent it.
    pub producer_name: String,
    /// How many times the broker delivered it before.
    pub redelivery_count: u32,
    /// Number of messages in its batch entry (1 when not batched).
    pub batch_size: u32,
    /// The entry's metadata as stored (shared by all messages of a batch).
    pub metadata: Arc<MessageMetadata>,
}

/// Milliseconds since the Unix epoch, by the local clock.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
