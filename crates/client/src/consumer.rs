//! Consumers.
//!
//! A [`Consumer`] is a handle over one engine task per partition (one for a
//! topic that is not partitioned), each with its own [`ReceiverQueue`];
//! [`Consumer::receive`] takes from them in turn, so messages of one
//! partition arrive in order. Each engine:
//!
//! - subscribes (lookup, SUBSCRIBE) and grants `receiver_queue_size` permits
//!   with FLOW, then grants more each time the application has received half
//!   that many;
//! - decodes each delivered entry (checksum, decompression, batch), skipping
//!   batch members that are already acknowledged or that precede a reader's
//!   start; a corrupt entry is acknowledged with its validation error (as
//!   Pulsar's C++ client does) so it is not delivered again and again;
//! - acknowledges entries, not batch members: an individually acknowledged
//!   member is remembered until every member of its entry is acknowledged,
//!   then the entry is acknowledged (no batch-index acknowledgements);
//! - sends negative acknowledgements as REDELIVER_UNACKNOWLEDGED_MESSAGES
//!   after the configured delay: the message ids on Shared and Key_Shared
//!   subscriptions, "everything unacknowledged" on Exclusive and Failover
//!   (whose broker-side dispatchers can only rewind);
//! - on a lost connection or a broker CLOSE_CONSUMER, empties its queue
//!   (the broker redelivers everything unacknowledged), reconnects with
//!   capped exponential backoff and subscribes again — a reader resuming
//!   after the last message the application received.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meridian_wire::proto::command_ack::{AckType, ValidationError};
use meridian_wire::proto::command_subscribe::{
    InitialPosition as WireInitialPosition, SubType as WireSubType,
};
use meridian_wire::proto::{
    CommandAck, CommandCloseConsumer, CommandFlow, CommandGetLastMessageId, CommandMessage,
    CommandRedeliverUnacknowledgedMessages, CommandSeek, CommandSubscribe, CommandUnsubscribe,
    KeySharedMeta, KeySharedMode, KeyValue, MessageIdData,
};
use meridian_wire::{BaseCommand, ChecksumStatus, CommandType, ParsedEntry};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::batch::decode_entry;
use crate::client::{Client, ClientInner};
use crate::connection::{command, Connection, ConsumerEvent};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::message_id::MessageId;
use crate::producer::is_transient;
use crate::queue::{Popped, ReceiverQueue};
use crate::topic::{normalize_topic, partition_topic};

/// How a subscription shares messages among its consumers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SubscriptionType {
    /// One consumer; a second is refused.
    #[default]
    Exclusive,
    /// Round robin over all consumers.
    Shared,
    /// One active consumer, others standing by.
    Failover,
    /// Shared, but each key sticks to one consumer.
    KeyShared,
}

impl SubscriptionType {
    fn wire(self) -> i32 {
        match self {
            SubscriptionType::Exclusive => WireSubType::Exclusive as i32,
            SubscriptionType::Shared => WireSubType::Shared as i32,
            SubscriptionType::Failover => WireSubType::Failover as i32,
            SubscriptionType::KeyShared => WireSubType::KeyShared as i32,
        }
    }

    fn is_shared(self) -> bool {
        matches!(self, SubscriptionType::Shared | SubscriptionType::KeyShared)
    }
}

/// Where a new durable subscription starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialPosition {
    /// After the last message published so far.
    #[default]
    Latest,
    /// At the first message still stored.
    Earliest,
}

/// Where to move a subscription with [`Consumer::seek`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekTarget {
    /// Delivery restarts at this message.
    MessageId(MessageId),
    /// Delivery restarts at the first message published at or after this
    /// time (milliseconds since the epoch).
    PublishTime(u64),
}

#[derive(Clone, Debug)]
pub(crate) struct ConsumerConfig {
    pub(crate) subscription: String,
    pub(crate) sub_type: SubscriptionType,
    pub(crate) initial_position: InitialPosition,
    pub(crate) receiver_queue_size: u32,
    pub(crate) consumer_name: Option<String>,
    pub(crate) priority: Option<i32>,
    /// `false` for readers: an in-memory cursor that starts at `start`.
    pub(crate) durable: bool,
    pub(crate) start: Option<MessageId>,
    pub(crate) start_inclusive: bool,
    pub(crate) negative_ack_delay: Duration,
    /// How long individual acknowledgements wait to go out together; zero sends each at once.
    pub(crate) ack_group_time: Duration,
    pub(crate) read_compacted: bool,
    pub(crate) replicate_subscription_state: Option<bool>,
    pub(crate) properties: BTreeMap<String, String>,
    /// Readers do not track batch acknowledgements.
    pub(crate) track_batch_acks: bool,
}

/// Settings of a [`Consumer`].
pub struct ConsumerBuilder {
    client: Client,
    topic: String,
    config: ConsumerConfig,
}

impl ConsumerBuilder {
    pub(crate) fn new(client: Client, topic: String) -> ConsumerBuilder {
        ConsumerBuilder {
            client,
            topic,
            config: ConsumerConfig {
                subscription: String::new(),
                sub_type: SubscriptionType::Exclusive,
                initial_position: InitialPosition::Latest,
                receiver_queue_size: 1000,
                consumer_name: None,
                priority: None,
                durable: true,
                start: None,
                start_inclusive: false,
                negative_ack_delay: Duration::from_secs(60),
                ack_group_time: Duration::from_millis(100),
                read_compacted: false,
                replicate_subscription_state: None,
                properties: BTreeMap::new(),
                track_batch_acks: true,
            },
        }
    }

    /// The subscription name (required).
    pub fn subscription(mut self, name: impl Into<String>) -> Self {
        self.config.subscription = name.into();
        self
    }

    /// The subscription type. Default [`SubscriptionType::Exclusive`].
    pub fn sub_type(mut self, sub_type: SubscriptionType) -> Self {
        self.config.sub_type = sub_type;
        self
    }

    /// Where a new subscription starts. Default [`InitialPosition::Latest`].
    pub fn initial_position(mut self, position: InitialPosition) -> Self {
        self.config.initial_position = position;
        self
    }

    /// Messages buffered ahead of `receive` (the permits granted). Default 1000.
    pub fn receiver_queue_size(mut self, size: u32) -> Self {
        self.config.receiver_queue_size = size;
        self
    }

    /// The consumer name (Failover orders consumers by it).
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.config.consumer_name = Some(name.into());
        self
    }

    /// Priority level: lower is served first on Shared subscriptions.
    pub fn priority(mut self, priority: i32) -> Self {
        self.config.priority = Some(priority);
        self
    }

    /// Delay before negatively acknowledged messages are redelivered. Default 60 s.
    pub fn negative_ack_redelivery_delay(mut self, delay: Duration) -> Self {
        self.config.negative_ack_delay = delay;
        self
    }

    /// How long individual acknowledgements wait to be sent together, in one ACK frame (sent
    /// at once when it acknowledges 1000 messages). Default 100 ms, as the official
    /// Java and C++ clients do; zero sends each acknowledgement at once. Cumulative
    /// acknowledgements, seeks, negative acknowledgements and the consumer's close send the
    /// waiting ones first. A process that ends without closing the consumer loses them, and
    /// the broker delivers those messages again (at-least-once is kept).
    pub fn ack_group_time(mut self, time: Duration) -> Self {
        self.config.ack_group_time = time;
        self
    }

    /// Reads the compacted view of the topic.
    pub fn read_compacted(mut self, read_compacted: bool) -> Self {
        self.config.read_compacted = read_compacted;
        self
    }

    /// Replicates the subscription's position to other clusters (PIP-33).
    pub fn replicate_subscription_state(mut self, replicate: bool) -> Self {
        self.config.replicate_subscription_state = Some(replicate);
        self
    }

    /// A consumer property, shown in the broker's stats.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.properties.insert(key.into(), value.into());
        self
    }

    pub(crate) fn non_durable(mut self, start: MessageId, inclusive: bool) -> Self {
        self.config.durable = false;
        self.config.start = Some(start);
        self.config.start_inclusive = inclusive;
        self.config.track_batch_acks = false;
        self
    }

    /// Subscribes to the topic (to every partition of a partitioned topic).
    pub async fn subscribe(self) -> Result<Consumer> {
        let topic = normalize_topic(&self.topic)?;
        if self.config.subscription.is_empty() {
            return Err(Error::InvalidConfiguration(
                "a subscription name is required".into(),
            ));
        }
        if self.config.receiver_queue_size == 0 {
            return Err(Error::InvalidConfiguration(
                "receiver_queue_size must be at least 1".into(),
            ));
        }
        let inner = self.client.inner.clone();
        let partitions = inner.pool.partitions(&topic).await?;
        if partitions > 0
            && self
                .config
                .start
                .is_some_and(|start| !start.is_earliest() && !start.is_latest())
        {
            return Err(Error::InvalidConfiguration(format!(
                "{topic} is partitioned: a reader of it starts at earliest or latest; \
                 read one partition by its name to start at a message id"
            )));
        }
        let config = Arc::new(self.config);
        let ready = Arc::new(Notify::new());
        let mut handles = Vec::new();
        let targets: Vec<(String, i32)> = if partitions == 0 {
            vec![(topic.clone(), -1)]
        } else {
            (0..partitions)
                .map(|index| {
                    (
                        partition_topic(&topic, index),
                        i32::try_from(index).unwrap_or(i32::MAX),
                    )
                })
                .collect()
        };
        for (partition_topic, partition) in targets {
            match PartitionConsumer::subscribe(
                inner.clone(),
                partition_topic,
                partition,
                config.clone(),
                ready.clone(),
            )
            .await
            {
                Ok(handle) => handles.push(handle),
                Err(error) => {
                    for handle in &handles {
                        let _ = handle.request(ConsumerCommand::Close).await;
                    }
                    return Err(error);
                }
            }
        }
        Ok(Consumer {
            topic,
            config,
            partitions: handles,
            ready,
            next: AtomicUsize::new(0),
        })
    }
}

/// Receives messages from a subscription; see the module documentation.
pub struct Consumer {
    topic: String,
    config: Arc<ConsumerConfig>,
    partitions: Vec<PartitionConsumer>,
    ready: Arc<Notify>,
    /// Where the next `receive` starts looking, for fairness across partitions.
    next: AtomicUsize,
}

impl Consumer {
    /// The full topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The subscription name.
    pub fn subscription(&self) -> &str {
        &self.config.subscription
    }

    /// Waits for the next message.
    ///
    /// Fails with [`Error::EndOfTopic`] once a terminated topic is fully
    /// received, and with the cause once the consumer is closed or failed.
    pub async fn receive(&self) -> Result<Message> {
        let count = self.partitions.len().max(1);
        loop {
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let mut ended = 0;
            for offset in 0..count {
                let Some(partition) = self.partitions.get((start + offset) % count) else {
                    continue;
                };
                match partition.queue.pop() {
                    Popped::Message(message) => return Ok(message),
                    Popped::Closed(error) => return Err(error),
                    Popped::EndOfTopic => ended += 1,
                    Popped::Empty => {}
                }
            }
            if ended == count {
                return Err(Error::EndOfTopic {
                    topic: self.topic.clone(),
                });
            }
            notified.await;
        }
    }

    fn partition_of(&self, id: &MessageId) -> Result<&PartitionConsumer> {
        let index = usize::try_from(id.partition).unwrap_or(0);
        self.partitions
            .get(if self.partitions.len() == 1 { 0 } else { index })
            .ok_or_else(|| Error::NotAllowed(format!("{id} names no partition of {}", self.topic)))
    }

    /// Acknowledges a message.
    pub async fn ack(&self, message: &Message) -> Result<()> {
        self.ack_id(message.id).await
    }

    /// Acknowledges a message by id.
    pub async fn ack_id(&self, id: MessageId) -> Result<()> {
        self.partition_of(&id)?.send(ConsumerCommand::Ack(id)).await
    }

    /// Acknowledges a message and everything before it (Exclusive and
    /// Failover subscriptions only).
    pub async fn ack_cumulative(&self, message: &Message) -> Result<()> {
        self.ack_cumulative_id(message.id).await
    }

    /// Acknowledges everything up to and including `id`.
    pub async fn ack_cumulative_id(&self, id: MessageId) -> Result<()> {
        if self.config.sub_type.is_shared() {
            return Err(Error::NotAllowed(
                "cumulative acknowledgement on a Shared or Key_Shared subscription".into(),
            ));
        }
        self.partition_of(&id)?
            .send(ConsumerCommand::AckCumulative(id))
            .await
    }

    /// Asks for the message to be delivered again after the negative-ack delay.
    pub async fn negative_ack(&self, message: &Message) -> Result<()> {
        self.negative_ack_id(message.id).await
    }

    /// Negative acknowledgement by id.
    pub async fn negative_ack_id(&self, id: MessageId) -> Result<()> {
        self.partition_of(&id)?
            .send(ConsumerCommand::Nack(id))
            .await
    }

    /// Moves the subscription. A message id with a partition index moves that
    /// partition; one without (and a publish time) moves every partition.
    pub async fn seek(&self, target: SeekTarget) -> Result<()> {
        for partition in &self.partitions {
            let applies = match target {
                SeekTarget::MessageId(id) => {
                    id.partition < 0
                        || self.partitions.len() == 1
                        || id.partition == partition.partition
                }
                SeekTarget::PublishTime(_) => true,
            };
            if applies {
                partition
                    .request(|responder| ConsumerCommand::Seek(target, responder))
                    .await?;
            }
        }
        Ok(())
    }

    /// Whether this consumer is the active one of a Failover or Exclusive
    /// subscription, as the broker last said (ACTIVE_CONSUMER_CHANGE):
    /// `Some(true)` if it is active on at least one partition, `None` before
    /// the broker said anything.
    pub fn is_active(&self) -> Option<bool> {
        let mut known = false;
        for partition in &self.partitions {
            match partition.state.active.load(Ordering::Relaxed) {
                ACTIVE => return Some(true),
                INACTIVE => known = true,
                _ => {}
            }
        }
        known.then_some(false)
    }

    /// Whether every partition reported REACHED_END_OF_TOPIC.
    pub fn has_reached_end_of_topic(&self) -> bool {
        self.partitions
            .iter()
            .all(|partition| partition.state.end_of_topic.load(Ordering::Relaxed))
    }

    /// Whether a message is buffered or the broker holds one after the last
    /// one received (GET_LAST_MESSAGE_ID).
    pub async fn has_message_available(&self) -> Result<bool> {
        for partition in &self.partitions {
            if partition
                .request_value(ConsumerCommand::HasMessageAvailable)
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The id of the last message stored in the topic (per partition, in
    /// partition order). An empty topic reports entry -1.
    pub async fn last_message_ids(&self) -> Result<Vec<MessageId>> {
        let mut ids = Vec::with_capacity(self.partitions.len());
        for partition in &self.partitions {
            ids.push(
                partition
                    .request_value(ConsumerCommand::LastMessageId)
                    .await?,
            );
        }
        Ok(ids)
    }

    /// Deletes the subscription and closes the consumer.
    pub async fn unsubscribe(&self) -> Result<()> {
        for partition in &self.partitions {
            partition.request(ConsumerCommand::Unsubscribe).await?;
        }
        Ok(())
    }

    /// Closes the consumer; unacknowledged messages go to other consumers.
    pub async fn close(&self) -> Result<()> {
        for partition in &self.partitions {
            match partition.request(ConsumerCommand::Close).await {
                Ok(()) | Err(Error::ConsumerClosed { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }
}

// 0: the broker has not said.
const ACTIVE: u8 = 1;
const INACTIVE: u8 = 2;

/// What a partition's handle and engine share besides the queue.
#[derive(Default)]
struct PartitionState {
    active: AtomicU8,
    end_of_topic: AtomicBool,
}

enum ConsumerCommand {
    Ack(MessageId),
    AckCumulative(MessageId),
    Nack(MessageId),
    Seek(SeekTarget, oneshot::Sender<Result<()>>),
    LastMessageId(oneshot::Sender<Result<MessageId>>),
    HasMessageAvailable(oneshot::Sender<Result<bool>>),
    Unsubscribe(oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<Result<()>>),
}

/// The handle of one partition's engine.
struct PartitionConsumer {
    topic: Arc<str>,
    partition: i32,
    commands: mpsc::Sender<ConsumerCommand>,
    queue: Arc<ReceiverQueue>,
    state: Arc<PartitionState>,
}

/// Commands queued per consumer before `ack` and friends wait.
const COMMAND_QUEUE: usize = 1024;

impl PartitionConsumer {
    async fn subscribe(
        client: Arc<ClientInner>,
        topic: String,
        partition: i32,
        config: Arc<ConsumerConfig>,
        ready: Arc<Notify>,
    ) -> Result<PartitionConsumer> {
        let consumer_id = client.next_id();
        let queue = Arc::new(ReceiverQueue::new(ready, config.receiver_queue_size));
        let request = SubscribeRequest {
            client: client.clone(),
            topic: topic.clone(),
            consumer_id,
            config: config.clone(),
            start: config.start.map(|start| (start, config.start_inclusive)),
            epoch: 0,
        };
        let deadline = Instant::now() + client.operation_timeout;
        let mut backoff = Backoff::new(client.backoff_initial, client.backoff_max);
        let link = loop {
            match subscribe_once(request.clone()).await {
                Ok(link) => break link,
                Err(error) if is_transient(&error) && Instant::now() < deadline => {
                    tracing::debug!(%topic, %error, "subscribing failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(error) => return Err(error),
            }
        };
        let state = Arc::new(PartitionState::default());
        let (commands, command_queue) = mpsc::channel(COMMAND_QUEUE);
        let topic: Arc<str> = topic.into();
        let span = tracing::info_span!(
            "consumer",
            topic = %topic,
            subscription = %config.subscription,
            consumer_id
        );
        let mut engine = ConsumerEngine {
            client: client.clone(),
            topic: topic.clone(),
            partition,
            consumer_id,
            start: request.start,
            config,
            queue: queue.clone(),
            state: state.clone(),
            commands: command_queue,
            link: None,
            reconnecting: None,
            retry_at: None,
            backoff: Backoff::new(client.backoff_initial, client.backoff_max),
            epoch: 0,
            trackers: BTreeMap::new(),
            nacks: VecDeque::new(),
            unsent_acks: Vec::new(),
            grouped_acks: Vec::new(),
            grouped_messages: 0,
            grouped_until: None,
            unsent_cumulative: None,
            max_message_size: link.connection.max_message_size(),
        };
        tokio::spawn(
            async move {
                engine.on_subscribed(link).await;
                engine.run().await;
            }
            .instrument(span),
        );
        Ok(PartitionConsumer {
            topic,
            partition,
            commands,
            queue,
            state,
        })
    }

    fn closed(&self) -> Error {
        Error::ConsumerClosed {
            topic: self.topic.to_string(),
        }
    }

    async fn send(&self, command: ConsumerCommand) -> Result<()> {
        self.commands.send(command).await.map_err(|_| self.closed())
    }

    async fn request(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<()>>) -> ConsumerCommand,
    ) -> Result<()> {
        self.request_value(build).await
    }

    async fn request_value<T>(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<T>>) -> ConsumerCommand,
    ) -> Result<T> {
        let (responder, receiver) = oneshot::channel();
        self.send(build(responder)).await?;
        receiver.await.map_err(|_| self.closed())?
    }
}

/// Everything needed to (re-)subscribe.
#[derive(Clone)]
struct SubscribeRequest {
    client: Arc<ClientInner>,
    topic: String,
    consumer_id: u64,
    config: Arc<ConsumerConfig>,
    /// For a non-durable subscription: where to start, and whether inclusive.
    start: Option<(MessageId, bool)>,
    epoch: u64,
}

struct ConsumerLink {
    connection: Arc<Connection>,
    events: mpsc::Receiver<ConsumerEvent>,
}

/// The start id as sent in SUBSCRIBE. Pulsar's brokers start a non-durable
/// cursor *after* a plain entry id, but *at* the entry of an id with a batch
/// index; so an inclusive start is sent with a batch index, and the exact
/// position is enforced on the client by the start filter either way.
fn start_message_data(start: MessageId, inclusive: bool) -> MessageIdData {
    if start.is_earliest() || start.is_latest() {
        return start.entry_data();
    }
    let batch_index = if inclusive {
        start.batch_index.max(0)
    } else {
        start.batch_index
    };
    MessageIdData {
        batch_index: (batch_index >= 0).then_some(batch_index),
        ..start.entry_data()
    }
}

async fn subscribe_once(request: SubscribeRequest) -> Result<ConsumerLink> {
    let pool = &request.client.pool;
    let address = pool.lookup(&request.topic).await?;
    let connection = pool.get(&address).await?;
    let config = &request.config;
    let events = connection.register_consumer(
        request.consumer_id,
        (config.receiver_queue_size as usize).saturating_add(64),
    )?;
    let reply = connection
        .request(
            "subscribe",
            Some(connection.operation_timeout()),
            |request_id| BaseCommand {
                subscribe: Some(Box::new(CommandSubscribe {
                    topic: request.topic.clone(),
                    subscription: config.subscription.clone(),
                    sub_type: config.sub_type.wire(),
                    consumer_id: request.consumer_id,
                    request_id,
                    consumer_name: config.consumer_name.clone(),
                    priority_level: config.priority,
                    durable: Some(config.durable),
                    start_message_id: if config.durable {
                        None
                    } else {
                        request
                            .start
                            .map(|(start, inclusive)| start_message_data(start, inclusive))
                    },
                    metadata: config
                        .properties
                        .iter()
                        .map(|(key, value)| KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                        })
                        .collect(),
                    read_compacted: config.read_compacted.then_some(true),
                    initial_position: Some(match config.initial_position {
                        InitialPosition::Latest => WireInitialPosition::Latest as i32,
                        InitialPosition::Earliest => WireInitialPosition::Earliest as i32,
                    }),
                    replicate_subscription_state: config.replicate_subscription_state,
                    force_topic_creation: Some(true),
                    key_shared_meta: (config.sub_type == SubscriptionType::KeyShared).then(|| {
                        KeySharedMeta {
                            key_shared_mode: KeySharedMode::AutoSplit as i32,
                            ..KeySharedMeta::default()
                        }
                    }),
                    consumer_epoch: Some(request.epoch),
                    ..CommandSubscribe::default()
                })),
                ..command(CommandType::Subscribe)
            },
        )
        .await;
    if let Err(error) = reply {
        connection.unregister_consumer(request.consumer_id);
        return Err(error);
    }
    Ok(ConsumerLink { connection, events })
}

/// Acknowledged members of one delivered batch entry.
struct BatchTracker {
    size: u32,
    acked: Vec<bool>,
    remaining: u32,
}

impl BatchTracker {
    fn new(size: u32) -> BatchTracker {
        BatchTracker {
            size,
            acked: vec![false; size as usize],
            remaining: size,
        }
    }

    fn is_acked(&self, index: i32) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|index| self.acked.get(index))
            .copied()
            .unwrap_or(false)
    }

    fn ack(&mut self, index: i32) {
        if let Some(slot) = usize::try_from(index)
            .ok()
            .and_then(|index| self.acked.get_mut(index))
        {
            if !*slot {
                *slot = true;
                self.remaining -= 1;
            }
        }
    }

    fn ack_through(&mut self, index: i32) {
        for member in 0..=index.min(i32::try_from(self.size).unwrap_or(i32::MAX) - 1) {
            self.ack(member);
        }
    }

    fn is_complete(&self) -> bool {
        self.remaining == 0
    }
}

type Resubscribe = Pin<Box<dyn Future<Output = Result<ConsumerLink>> + Send>>;

/// The task behind one partition's consumer.
struct ConsumerEngine {
    client: Arc<ClientInner>,
    topic: Arc<str>,
    partition: i32,
    consumer_id: u64,
    config: Arc<ConsumerConfig>,
    queue: Arc<ReceiverQueue>,
    state: Arc<PartitionState>,
    commands: mpsc::Receiver<ConsumerCommand>,
    link: Option<ConsumerLink>,
    reconnecting: Option<Resubscribe>,
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// Bumped when everything unacknowledged is redelivered; messages the
    /// broker stamps with an older epoch were dispatched before and are dropped.
    epoch: u64,
    /// Messages at or before this position are dropped (a reader's start,
    /// the target of a seek), and a non-durable subscription restarts here.
    start: Option<(MessageId, bool)>,
    /// Delivered batch entries with some members acknowledged, by entry.
    trackers: BTreeMap<(i64, i64), BatchTracker>,
    /// Negative acknowledgements waiting for their delay, oldest first.
    nacks: VecDeque<(Instant, MessageId)>,
    /// Acknowledgements made while disconnected, sent after resubscribing.
    unsent_acks: Vec<MessageIdData>,
    unsent_cumulative: Option<MessageIdData>,
    /// Individual acknowledgements waiting to go out together (`ack_group_time`), and when
    /// they go at the latest.
    grouped_acks: Vec<MessageIdData>,
    /// The messages `grouped_acks` stand for (a batch entry's acknowledgement, all of them).
    grouped_messages: usize,
    grouped_until: Option<Instant>,
    max_message_size: usize,
}

/// Acknowledgements kept while disconnected; beyond this the oldest are
/// dropped (the broker redelivers them: at-least-once is kept).
const MAX_UNSENT_ACKS: usize = 10_000;

/// Grouped acknowledgements go out at once when they stand for this many messages (1000
/// unbatched messages, as the official clients' limit of ids; fewer entries of a batched
/// topic, so that a group never holds back a consumer that the broker's limit of
/// unacknowledged messages per consumer would stop).
const MAX_GROUPED_MESSAGES: usize = 1000;

async fn next_event(link: &mut Option<ConsumerLink>) -> Option<ConsumerEvent> {
    match link {
        Some(link) => link.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn resubscribed(reconnecting: &mut Option<Resubscribe>) -> Result<ConsumerLink> {
    match reconnecting {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

impl ConsumerEngine {
    async fn run(mut self) {
        let outcome = self.event_loop().await;
        let error = match outcome {
            Ok(()) => self.closed_error(),
            Err(error) => {
                tracing::warn!(%error, "consumer failed for good");
                error
            }
        };
        if let Some(link) = self.link.take() {
            link.connection.unregister_consumer(self.consumer_id);
        }
        self.queue.reset();
        self.queue.close(error.clone());
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            respond_closed(command, &error);
        }
        tracing::debug!("consumer closed");
    }

    fn closed_error(&self) -> Error {
        Error::ConsumerClosed {
            topic: self.topic.to_string(),
        }
    }

    async fn event_loop(&mut self) -> Result<()> {
        loop {
            let nack_deadline = self.nacks.front().map(|(deadline, _)| *deadline);
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => {
                        if self.on_command(command).await {
                            return Ok(());
                        }
                    }
                    // Every handle is gone.
                    None => {
                        self.close_on_broker().await;
                        return Ok(());
                    }
                },
                event = next_event(&mut self.link) => match event {
                    Some(event) => self.on_event(event).await,
                    None => self.disconnected("the connection closed"),
                },
                result = resubscribed(&mut self.reconnecting) => {
                    self.reconnecting = None;
                    match result {
                        Ok(link) => {
                            tracing::info!("consumer reconnected");
                            self.backoff.reset();
                            self.on_subscribed(link).await;
                        }
                        Err(error) if error.is_retryable() => {
                            tracing::info!(%error, "resubscribing failed; will retry");
                            self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                        }
                        Err(error) => return Err(error),
                    }
                },
                () = sleep_until(self.retry_at) => {
                    self.retry_at = None;
                    self.reconnecting = Some(Box::pin(subscribe_once(self.subscribe_request())));
                },
                () = sleep_until(nack_deadline) => self.redeliver_due().await,
                () = sleep_until(self.grouped_until) => self.send_grouped_acks().await,
                () = self.queue.flow.notified() => self.send_flow().await,
            }
        }
    }

    fn subscribe_request(&self) -> SubscribeRequest {
        SubscribeRequest {
            client: self.client.clone(),
            topic: self.topic.to_string(),
            consumer_id: self.consumer_id,
            config: self.config.clone(),
            start: self.start,
            epoch: self.epoch,
        }
    }

    /// A subscription is established: send held acknowledgements and grant
    /// the full queue as permits.
    async fn on_subscribed(&mut self, link: ConsumerLink) {
        self.max_message_size = link.connection.max_message_size();
        self.queue.reset();
        self.link = Some(link);
        if let Some(cumulative) = self.unsent_cumulative.take() {
            self.send_ack(AckType::Cumulative, vec![cumulative], None)
                .await;
        }
        let unsent = std::mem::take(&mut self.unsent_acks);
        if !unsent.is_empty() {
            self.send_ack(AckType::Individual, unsent, None).await;
        }
        let permits = self.config.receiver_queue_size;
        self.send_to_broker(BaseCommand {
            flow: Some(CommandFlow {
                consumer_id: self.consumer_id,
                message_permits: permits,
            }),
            ..command(CommandType::Flow)
        })
        .await;
    }

    async fn send_to_broker(&mut self, command: BaseCommand) {
        let Some(link) = &self.link else { return };
        if let Err(error) = link.connection.send_command(&command).await {
            self.disconnected(&error.to_string());
        }
    }

    async fn send_flow(&mut self) {
        if self.link.is_none() {
            return;
        }
        let permits = self.queue.take_consumed();
        if permits > 0 {
            self.send_to_broker(BaseCommand {
                flow: Some(CommandFlow {
                    consumer_id: self.consumer_id,
                    message_permits: permits,
                }),
                ..command(CommandType::Flow)
            })
            .await;
        }
    }

    /// Counts messages dropped without reaching the queue as consumed.
    async fn return_permits(&mut self, count: u32) {
        if count > 0 && self.queue.add_consumed(count) {
            self.send_flow().await;
        }
    }

    fn disconnected(&mut self, reason: &str) {
        if let Some(link) = self.link.take() {
            link.connection.unregister_consumer(self.consumer_id);
        }
        // The broker redelivers whatever was unacknowledged; what is queued
        // would arrive twice.
        self.queue.reset();
        if !self.config.durable {
            if let Some(last) = self.queue.last_dequeued() {
                self.start = Some((last, false));
            }
        }
        if self.reconnecting.is_none() && self.retry_at.is_none() {
            let delay = self.backoff.next_delay();
            tracing::info!(
                reason,
                retry_in_ms = delay.as_millis() as u64,
                "consumer disconnected"
            );
            self.retry_at = Some(Instant::now() + delay);
        }
    }

    /// Handles a command; returns `true` when the consumer is done.
    async fn on_command(&mut self, command: ConsumerCommand) -> bool {
        // What the broker is asked next comes after the acknowledgements made before it; a
        // question about the topic's last message does not need them.
        if !matches!(
            command,
            ConsumerCommand::Ack(_)
                | ConsumerCommand::LastMessageId(_)
                | ConsumerCommand::HasMessageAvailable(_)
        ) {
            self.send_grouped_acks().await;
        }
        match command {
            ConsumerCommand::Ack(id) => self.ack(id).await,
            ConsumerCommand::AckCumulative(id) => self.ack_cumulative(id).await,
            ConsumerCommand::Nack(id) => {
                self.nacks
                    .push_back((Instant::now() + self.config.negative_ack_delay, id));
            }
            ConsumerCommand::Seek(target, responder) => {
                let result = self.seek(target).await;
                let _ = responder.send(result);
            }
            ConsumerCommand::LastMessageId(responder) => {
                let result = self.last_message_id().await.map(|(last, _)| last);
                let _ = responder.send(result);
            }
            ConsumerCommand::HasMessageAvailable(responder) => {
                let result = self.has_message_available().await;
                let _ = responder.send(result);
            }
            ConsumerCommand::Unsubscribe(responder) => {
                let result = self.unsubscribe().await;
                let done = result.is_ok();
                if done {
                    self.stop_receiving();
                }
                let _ = responder.send(result);
                return done;
            }
            ConsumerCommand::Close(responder) => {
                self.close_on_broker().await;
                self.stop_receiving();
                let _ = responder.send(Ok(()));
                return true;
            }
        }
        false
    }

    /// Empties and closes the queue, before a close is confirmed, so that
    /// nothing is received after it.
    fn stop_receiving(&self) {
        // Queued messages are not for this consumer any more: the broker
        // gives them to others, or to it again after it resubscribes.
        self.queue.reset();
        self.queue.close(self.closed_error());
    }

    async fn send_ack(
        &mut self,
        ack_type: AckType,
        ids: Vec<MessageIdData>,
        validation: Option<ValidationError>,
    ) {
        if ids.is_empty() {
            return;
        }
        if self.link.is_none() {
            match ack_type {
                AckType::Cumulative => {
                    if let Some(id) = ids.into_iter().last() {
                        self.unsent_cumulative = Some(id);
                    }
                }
                AckType::Individual => {
                    self.unsent_acks.extend(ids);
                    let excess = self.unsent_acks.len().saturating_sub(MAX_UNSENT_ACKS);
                    self.unsent_acks.drain(..excess);
                }
            }
            return;
        }
        self.send_to_broker(BaseCommand {
            ack: Some(CommandAck {
                consumer_id: self.consumer_id,
                ack_type: ack_type as i32,
                message_id: ids,
                validation_error: validation.map(|error| error as i32),
                ..CommandAck::default()
            }),
            ..command(CommandType::Ack)
        })
        .await;
    }

    fn forget_nacks(&mut self, acked: impl Fn(&MessageId) -> bool) {
        self.nacks.retain(|(_, id)| !acked(id));
    }

    async fn ack(&mut self, id: MessageId) {
        // The messages the entry's acknowledgement stands for.
        let mut messages = 1;
        if id.batch_index >= 0 {
            if let Some(tracker) = self.trackers.get_mut(&id.entry_key()) {
                tracker.ack(id.batch_index);
                if !tracker.is_complete() {
                    return;
                }
                messages = tracker.size as usize;
                self.trackers.remove(&id.entry_key());
            }
        }
        self.forget_nacks(|nacked| nacked.entry_key() == id.entry_key());
        if self.config.ack_group_time.is_zero() {
            self.send_ack(AckType::Individual, vec![id.entry_data()], None)
                .await;
            return;
        }
        self.grouped_acks.push(id.entry_data());
        self.grouped_messages += messages;
        if self.grouped_messages >= MAX_GROUPED_MESSAGES {
            self.send_grouped_acks().await;
        } else if self.grouped_until.is_none() {
            self.grouped_until = Some(Instant::now() + self.config.ack_group_time);
        }
    }

    /// Sends the individual acknowledgements waiting to go out together, in one ACK frame.
    async fn send_grouped_acks(&mut self) {
        self.grouped_until = None;
        self.grouped_messages = 0;
        let ids = std::mem::take(&mut self.grouped_acks);
        self.send_ack(AckType::Individual, ids, None).await;
    }

    async fn ack_cumulative(&mut self, id: MessageId) {
        let key = id.entry_key();
        let entry_complete = match (id.batch_index >= 0, self.trackers.get_mut(&key)) {
            (true, Some(tracker)) => {
                tracker.ack_through(id.batch_index);
                tracker.is_complete()
            }
            _ => true,
        };
        // Entries before this one are acknowledged whatever their members.
        self.trackers = self.trackers.split_off(&key);
        self.forget_nacks(|nacked| nacked.entry_key() < key);
        if entry_complete {
            self.trackers.remove(&key);
            self.forget_nacks(|nacked| nacked.entry_key() == key);
            self.send_ack(AckType::Cumulative, vec![id.entry_data()], None)
                .await;
        } else if key.1 > 0 {
            // The entry is partly acknowledged: everything before it is done.
            let previous = MessageIdData {
                entry_id: id.entry_id - 1,
                ..id.entry_data()
            };
            self.send_ack(AckType::Cumulative, vec![previous], None)
                .await;
        }
    }

    async fn redeliver_due(&mut self) {
        let now = Instant::now();
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        while self
            .nacks
            .front()
            .is_some_and(|(deadline, _)| *deadline <= now)
        {
            if let Some((_, id)) = self.nacks.pop_front() {
                if seen.insert(id.entry_key()) {
                    entries.push(id.entry_data());
                }
            }
        }
        if entries.is_empty() || self.link.is_none() {
            // Disconnected: the broker redelivers everything on resubscribe.
            return;
        }
        let message_ids = if self.config.sub_type.is_shared() {
            entries
        } else {
            // Exclusive and Failover dispatchers can only rewind: redeliver
            // everything, and drop what is queued (it will come again).
            self.epoch += 1;
            self.queue.clear();
            Vec::new()
        };
        tracing::debug!(
            count = message_ids.len(),
            epoch = self.epoch,
            "redelivering negatively acknowledged messages"
        );
        self.send_to_broker(BaseCommand {
            redeliver_unacknowledged_messages: Some(Box::new(
                CommandRedeliverUnacknowledgedMessages {
                    consumer_id: self.consumer_id,
                    message_ids,
                    consumer_epoch: Some(self.epoch),
                },
            )),
            ..command(CommandType::RedeliverUnacknowledgedMessages)
        })
        .await;
        if self.queue.add_consumed(0) {
            self.send_flow().await;
        }
    }

    fn connection(&self) -> Result<Arc<Connection>> {
        self.link
            .as_ref()
            .map(|link| link.connection.clone())
            .ok_or_else(|| Error::Disconnected {
                address: "(reconnecting)".to_string(),
            })
    }

    async fn seek(&mut self, target: SeekTarget) -> Result<()> {
        let connection = self.connection()?;
        let consumer_id = self.consumer_id;
        connection
            .request("seek", Some(connection.operation_timeout()), |request_id| {
                BaseCommand {
                    seek: Some(Box::new(CommandSeek {
                        consumer_id,
                        request_id,
                        message_id: match target {
                            SeekTarget::MessageId(id) => Some(id.entry_data()),
                            SeekTarget::PublishTime(_) => None,
                        },
                        message_publish_time: match target {
                            SeekTarget::MessageId(_) => None,
                            SeekTarget::PublishTime(time) => Some(time),
                        },
                    })),
                    ..command(CommandType::Seek)
                }
            })
            .await?;
        // What is queued belongs to the old position. (A Pulsar broker also
        // closes the consumer, which then resubscribes; others reset in
        // place.) That includes messages that reached the connection before
        // the reply, which are still in the event channel: the reader routes
        // frames in order, so everything there now was sent before the seek.
        self.queue.clear();
        let mut stale_permits = 0u32;
        let mut other_events = Vec::new();
        if let Some(link) = &mut self.link {
            while let Ok(event) = link.events.try_recv() {
                match event {
                    ConsumerEvent::Message(message) => {
                        stale_permits = stale_permits.saturating_add(entry_permits(&message.1));
                    }
                    ConsumerEvent::InvalidEntry { .. } => {
                        stale_permits = stale_permits.saturating_add(1);
                    }
                    other => other_events.push(other),
                }
            }
        }
        self.queue.set_last_dequeued(None);
        self.trackers.clear();
        self.nacks.clear();
        self.start = match target {
            SeekTarget::MessageId(id) => Some((id, true)),
            SeekTarget::PublishTime(_) => None,
        };
        if self.queue.add_consumed(stale_permits) {
            self.send_flow().await;
        }
        for event in other_events {
            self.on_event(event).await;
        }
        Ok(())
    }

    /// GET_LAST_MESSAGE_ID: the last stored message and the subscription's
    /// mark-delete position, if the broker sent it.
    async fn last_message_id(&mut self) -> Result<(MessageId, Option<MessageId>)> {
        let connection = self.connection()?;
        let consumer_id = self.consumer_id;
        let reply = connection
            .request(
                "get last message id",
                Some(connection.operation_timeout()),
                |request_id| BaseCommand {
                    get_last_message_id: Some(CommandGetLastMessageId {
                        consumer_id,
                        request_id,
                    }),
                    ..command(CommandType::GetLastMessageId)
                },
            )
            .await?;
        let response = reply
            .get_last_message_id_response
            .ok_or_else(|| Error::Protocol {
                address: connection.address().to_string(),
                reason: "GET_LAST_MESSAGE_ID_RESPONSE without its body".into(),
            })?;
        Ok((
            MessageId::from_data(&response.last_message_id, self.partition),
            response
                .consumer_mark_delete_position
                .as_ref()
                .map(|data| MessageId::from_data(data, self.partition)),
        ))
    }

    async fn has_message_available(&mut self) -> Result<bool> {
        if !self.queue.is_empty() {
            return Ok(true);
        }
        let (last, mark_delete) = self.last_message_id().await?;
        if last.entry_id == u64::MAX {
            // Entry -1: nothing stored.
            return Ok(false);
        }
        let after = |reference: &MessageId, inclusive: bool| {
            let ordering = if reference.batch_index < 0 || last.batch_index < 0 {
                last.entry_key().cmp(&reference.entry_key())
            } else {
                last.position_cmp(reference)
            };
            ordering.is_gt() || (inclusive && ordering.is_eq())
        };
        if let Some(dequeued) = self.queue.last_dequeued() {
            return Ok(after(&dequeued, false));
        }
        match self.start {
            // A reader started at an id: compare with the id itself (brokers
            // differ in whether the cursor starts at or after it).
            Some((start, inclusive)) if !start.is_earliest() && !start.is_latest() => {
                Ok(after(&start, inclusive))
            }
            // Otherwise the subscription's own position says what is left.
            start => Ok(match mark_delete {
                Some(mark_delete) => last.entry_key() > mark_delete.entry_key(),
                None => !start.is_some_and(|(start, _)| start.is_latest()),
            }),
        }
    }

    async fn unsubscribe(&mut self) -> Result<()> {
        let connection = self.connection()?;
        let consumer_id = self.consumer_id;
        connection
            .request(
                "unsubscribe",
                Some(connection.operation_timeout()),
                |request_id| BaseCommand {
                    unsubscribe: Some(CommandUnsubscribe {
                        consumer_id,
                        request_id,
                        force: None,
                    }),
                    ..command(CommandType::Unsubscribe)
                },
            )
            .await?;
        if let Some(link) = self.link.take() {
            link.connection.unregister_consumer(consumer_id);
        }
        Ok(())
    }

    async fn close_on_broker(&mut self) {
        self.send_grouped_acks().await;
        let Some(link) = self.link.take() else { return };
        let consumer_id = self.consumer_id;
        let closed = link
            .connection
            .request(
                "close consumer",
                Some(link.connection.operation_timeout()),
                |request_id| BaseCommand {
                    close_consumer: Some(Box::new(CommandCloseConsumer {
                        consumer_id,
                        request_id,
                        ..CommandCloseConsumer::default()
                    })),
                    ..command(CommandType::CloseConsumer)
                },
            )
            .await;
        if let Err(error) = closed {
            tracing::debug!(%error, "closing the consumer on the broker failed");
        }
        link.connection.unregister_consumer(consumer_id);
    }

    async fn on_event(&mut self, event: ConsumerEvent) {
        match event {
            ConsumerEvent::Message(message) => {
                let (command, entry) = *message;
                self.on_message(command, entry).await
            }
            ConsumerEvent::InvalidEntry { command, error } => {
                tracing::warn!(%error, "dropping an undecodable entry");
                let id = MessageId::from_data(&command.message_id, self.partition);
                self.send_ack(
                    AckType::Individual,
                    vec![id.entry_data()],
                    Some(ValidationError::BatchDeSerializeError),
                )
                .await;
                self.return_permits(1).await;
            }
            ConsumerEvent::ActiveChange(active) => {
                tracing::info!(active, "active consumer changed");
                self.state
                    .active
                    .store(if active { ACTIVE } else { INACTIVE }, Ordering::Relaxed);
            }
            ConsumerEvent::EndOfTopic => {
                tracing::info!("reached the end of the topic");
                self.state.end_of_topic.store(true, Ordering::Relaxed);
                self.queue.set_end_of_topic();
            }
            ConsumerEvent::Closed => {
                self.disconnected("closed by the broker");
            }
        }
    }

    /// Whether the start filter drops `id`.
    fn before_start(&self, id: &MessageId) -> bool {
        let Some((start, inclusive)) = self.start else {
            return false;
        };
        if start.is_earliest() || start.is_latest() {
            return false;
        }
        let ordering = if start.batch_index < 0 {
            // A whole-entry start covers every member of the entry.
            id.entry_key().cmp(&start.entry_key())
        } else {
            id.entry_key()
                .cmp(&start.entry_key())
                .then(id.batch_index.max(0).cmp(&start.batch_index))
        };
        ordering.is_lt() || (ordering.is_eq() && !inclusive)
    }

    async fn on_message(&mut self, command: CommandMessage, entry: ParsedEntry) {
        let permits = entry_permits(&entry);
        if command
            .consumer_epoch
            .is_some_and(|epoch| epoch < self.epoch)
        {
            // Dispatched before a redeliver-all; it will come again.
            self.return_permits(permits).await;
            return;
        }
        let entry_id =
            MessageId::from_data(&command.message_id, self.partition).with_batch_index(-1);
        if let ChecksumStatus::Mismatch { stored, computed } = entry.checksum {
            tracing::warn!(%entry_id, stored, computed, "checksum mismatch; dropping the entry");
            self.send_ack(
                AckType::Individual,
                vec![entry_id.entry_data()],
                Some(ValidationError::ChecksumMismatch),
            )
            .await;
            self.return_permits(permits).await;
            return;
        }
        let decoded = match decode_entry(
            &self.topic,
            &entry.metadata,
            entry.payload,
            self.max_message_size,
        ) {
            Ok(decoded) => decoded,
            Err((validation, error)) => {
                tracing::warn!(%entry_id, %error, "dropping an undecodable entry");
                self.send_ack(
                    AckType::Individual,
                    vec![entry_id.entry_data()],
                    Some(validation),
                )
                .await;
                self.return_permits(permits).await;
                return;
            }
        };
        let metadata = Arc::new(entry.metadata);
        let batched = metadata.num_messages_in_batch.is_some();
        let batch_size = u32::try_from(decoded.len()).unwrap_or(u32::MAX).max(1);
        if batched && batch_size > 1 && self.config.track_batch_acks {
            self.trackers
                .entry(entry_id.entry_key())
                .or_insert_with(|| BatchTracker::new(batch_size));
        }
        let tracker = self.trackers.get(&entry_id.entry_key());
        let redelivery_count = command.redelivery_count();
        let mut messages = Vec::with_capacity(decoded.len());
        for decoded in decoded {
            let id = entry_id.with_batch_index(decoded.batch_index);
            let index = usize::try_from(decoded.batch_index).unwrap_or(0);
            // ack_set: bit i set means member i is still unacknowledged.
            let acked_on_broker = !command.ack_set.is_empty()
                && command
                    .ack_set
                    .get(index / 64)
                    .is_none_or(|word| word & (1 << (index % 64)) == 0);
            let acked_here = tracker.is_some_and(|tracker| tracker.is_acked(decoded.batch_index));
            let compacted_out = decoded
                .single
                .as_ref()
                .is_some_and(|single| single.compacted_out());
            if acked_on_broker || acked_here || compacted_out || self.before_start(&id) {
                continue;
            }
            let single = decoded.single.as_ref();
            let properties = single
                .map_or(&metadata.properties, |single| &single.properties)
                .iter()
                .map(|property| (property.key.clone(), property.value.clone()))
                .collect();
            let sequence_id = single
                .and_then(|single| single.sequence_id)
                .unwrap_or_else(|| metadata.sequence_id.saturating_add(index as u64));
            messages.push(Message {
                topic: self.topic.clone(),
                id,
                payload: decoded.payload,
                key: match single {
                    Some(single) => single.partition_key.clone(),
                    None => metadata.partition_key.clone(),
                },
                ordering_key: match single {
                    Some(single) => single.ordering_key.clone(),
                    None => metadata.ordering_key.clone(),
                },
                properties,
                publish_time: metadata.publish_time,
                event_time: single
                    .map_or(metadata.event_time, |single| single.event_time)
                    .filter(|time| *time != 0),
                sequence_id,
                producer_name: metadata.producer_name.clone(),
                redelivery_count,
                batch_size,
                metadata: metadata.clone(),
            });
        }
        let skipped = permits.saturating_sub(u32::try_from(messages.len()).unwrap_or(u32::MAX));
        self.queue.push(messages);
        self.return_permits(skipped).await;
    }
}

/// The permits a delivered entry used: its message count.
fn entry_permits(entry: &ParsedEntry) -> u32 {
    u32::try_from(entry.metadata.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1)
}

fn respond_closed(command: ConsumerCommand, error: &Error) {
    match command {
        ConsumerCommand::Ack(_) | ConsumerCommand::AckCumulative(_) | ConsumerCommand::Nack(_) => {}
        ConsumerCommand::Seek(_, responder)
        | ConsumerCommand::Unsubscribe(responder)
        | ConsumerCommand::Close(responder) => {
            let _ = responder.send(Err(error.clone()));
        }
        ConsumerCommand::LastMessageId(responder) => {
            let _ = responder.send(Err(error.clone()));
        }
        ConsumerCommand::HasMessageAvailable(responder) => {
            let _ = responder.send(Err(error.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_trackers_complete_when_every_member_is_acked() {
        let mut tracker = BatchTracker::new(3);
        tracker.ack(1);
        tracker.ack(1);
        assert!(!tracker.is_complete());
        assert!(tracker.is_acked(1) && !tracker.is_acked(0));
        tracker.ack_through(2);
        assert!(tracker.is_complete());
        tracker.ack(7);
        tracker.ack(-1);
        assert!(tracker.is_complete());
    }

    #[test]
    fn inclusive_starts_are_sent_with_a_batch_index() {
        let id = MessageId::new(3, 4);
        assert_eq!(start_message_data(id, true).batch_index, Some(0));
        assert_eq!(start_message_data(id, false).batch_index, None);
        assert_eq!(
            start_message_data(id.with_batch_index(2), false).batch_index,
            Some(2)
        );
        assert_eq!(
            start_message_data(MessageId::EARLIEST, true).ledger_id,
            u64::MAX
        );
    }
}
