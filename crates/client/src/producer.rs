//! Producers.
//!
//! A [`Producer`] is a handle over one engine task per partition (one for a
//! topic that is not partitioned). The handle routes each message to a
//! partition, waits for room in that partition's pending queue (a semaphore
//! of `max_pending` permits: the back-pressure) and hands the message to the
//! engine, which:
//!
//! 1. assigns the next sequence id (or keeps an explicit one);
//! 2. adds the message to the open batch, or sends it alone; a batch is
//!    flushed when it reaches `max_messages` or `max_bytes`, when its first
//!    message is `max_delay` old, or when the next message cannot join it;
//! 3. encodes the entry once (compressed, checksummed) and keeps the SEND
//!    frame in the FIFO of in-flight sends until its receipt arrives;
//! 4. completes receipts in order. A receipt for a later sequence id than the
//!    head's means the broker lost something: the producer is closed on the
//!    broker and re-created, and everything resent. An earlier one is a
//!    late receipt for a message that timed out, and is ignored;
//! 5. on a lost connection, a broker CLOSE_PRODUCER, or a SEND_ERROR other
//!    than `ChecksumError`: looks the topic up again with capped exponential
//!    backoff, re-creates the producer (same producer id, same name, the
//!    epoch bumped) and resends every in-flight frame byte for byte, so each
//!    message keeps its original sequence id and a deduplicating broker
//!    stores it once. A SEND_ERROR closes only this producer (CLOSE_PRODUCER
//!    first): the connection, shared with other producers, stays up. With
//!    `stop_on_failure` a failed message fails everything after it instead
//!    of being resent;
//! 6. fails messages older than the send timeout with [`Error::SendTimeout`].
//!
//! A message's permit is released when its send completes, whichever way.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use meridian_wire::proto::{CommandCloseProducer, CommandProducer, CommandSend, KeyValue};
use meridian_wire::{encode_payload_frame, BaseCommand, CommandType, PayloadFrame, ServerError};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::batch::{batch_compatible, encode_entry, SequencedMessage};
use crate::client::{Client, ClientInner};
use crate::compression::Compression;
use crate::connection::{command, Connection, ProducerEvent};
use crate::error::{Error, Result};
use crate::message::{now_ms, ProducerMessage};
use crate::message_id::MessageId;
use crate::routing::Router;
use crate::topic::{normalize_topic, partition_topic};

/// Who may produce to the topic alongside this producer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessMode {
    /// Any number of producers.
    #[default]
    Shared,
    /// Fail if another producer is connected.
    Exclusive,
    /// Wait until no other producer is connected.
    WaitForExclusive,
    /// Take exclusive access, fencing out the current holder.
    ExclusiveWithFencing,
}

impl AccessMode {
    fn wire(self) -> i32 {
        use meridian_wire::proto::ProducerAccessMode as Wire;
        match self {
            AccessMode::Shared => Wire::Shared as i32,
            AccessMode::Exclusive => Wire::Exclusive as i32,
            AccessMode::WaitForExclusive => Wire::WaitForExclusive as i32,
            AccessMode::ExclusiveWithFencing => Wire::ExclusiveWithFencing as i32,
        }
    }
}

/// When a batch is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchingPolicy {
    /// At most this many messages per batch.
    pub max_messages: usize,
    /// At most about this many payload bytes per batch.
    pub max_bytes: usize,
    /// A batch is sent at the latest this long after its first message.
    pub max_delay: Duration,
}

#[derive(Clone, Debug)]
struct ProducerConfig {
    name: Option<String>,
    batching: Option<BatchingPolicy>,
    compression: Compression,
    send_timeout: Option<Duration>,
    max_pending: usize,
    access_mode: AccessMode,
    initial_sequence_id: Option<u64>,
    properties: BTreeMap<String, String>,
    stop_on_failure: bool,
}

/// Settings of a [`Producer`].
pub struct ProducerBuilder {
    client: Client,
    topic: String,
    config: ProducerConfig,
}

impl ProducerBuilder {
    pub(crate) fn new(client: Client, topic: String) -> ProducerBuilder {
        ProducerBuilder {
            client,
            topic,
            config: ProducerConfig {
                name: None,
                batching: None,
                compression: Compression::None,
                send_timeout: Some(Duration::from_secs(30)),
                max_pending: 1000,
                access_mode: AccessMode::Shared,
                initial_sequence_id: None,
                properties: BTreeMap::new(),
                stop_on_failure: false,
            },
        }
    }

    /// The producer name (deduplication is keyed by it). Default: the broker picks one.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = Some(name.into());
        self
    }

    /// Sends messages in batches. Default: every message in its own entry.
    pub fn batching(mut self, max_messages: usize, max_bytes: usize, max_delay: Duration) -> Self {
        self.config.batching = Some(BatchingPolicy {
            max_messages,
            max_bytes,
            max_delay,
        });
        self
    }

    /// Compresses every entry payload. Default: none.
    pub fn compression(mut self, compression: Compression) -> Self {
        self.config.compression = compression;
        self
    }

    /// Fails a message not acknowledged this long after it was queued;
    /// `Duration::ZERO` waits for ever. Default 30 s.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.config.send_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// Messages queued or in flight per partition before `send` waits. Default 1000.
    pub fn max_pending(mut self, messages: usize) -> Self {
        self.config.max_pending = messages;
        self
    }

    /// Producer access mode. Default [`AccessMode::Shared`].
    pub fn access_mode(mut self, mode: AccessMode) -> Self {
        self.config.access_mode = mode;
        self
    }

    /// The sequence id before the first message's; the broker's
    /// `last_sequence_id` is ignored when this is set.
    pub fn initial_sequence_id(mut self, sequence_id: u64) -> Self {
        self.config.initial_sequence_id = Some(sequence_id);
        self
    }

    /// Once a send fails (rejected here, refused by the broker, timed out), every message
    /// queued or in flight after it fails too, and so does every later `send`: nothing is
    /// sent after a message that was not stored. For callers that must not leave gaps, such
    /// as geo-replication; they close the producer and start again from the failed message.
    /// Default: off (a failed message is dropped and the next ones go on).
    pub fn stop_on_failure(mut self) -> Self {
        self.config.stop_on_failure = true;
        self
    }

    /// A producer property, shown in the broker's stats.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.properties.insert(key.into(), value.into());
        self
    }

    /// Looks the topic up and creates the producer on every partition.
    pub async fn create(self) -> Result<Producer> {
        let topic = normalize_topic(&self.topic)?;
        let config = &self.config;
        if config.max_pending == 0 {
            return Err(Error::InvalidConfiguration(
                "max_pending must be at least 1".into(),
            ));
        }
        if let Some(batching) = config.batching {
            if batching.max_messages == 0 || batching.max_bytes == 0 {
                return Err(Error::InvalidConfiguration(
                    "batching needs max_messages and max_bytes of at least 1".into(),
                ));
            }
        }
        let config = Arc::new(self.config);
        let inner = self.client.inner.clone();
        let partitions = inner.pool.partitions(&topic).await?;
        let mut producers = Vec::new();
        if partitions == 0 {
            producers
                .push(PartitionProducer::create(inner.clone(), topic.clone(), -1, config).await?);
        } else {
            for index in 0..partitions {
                let created = PartitionProducer::create(
                    inner.clone(),
                    partition_topic(&topic, index),
                    i32::try_from(index).unwrap_or(i32::MAX),
                    config.clone(),
                )
                .await;
                match created {
                    Ok(producer) => producers.push(producer),
                    Err(error) => {
                        for producer in &producers {
                            let _ = producer.close().await;
                        }
                        return Err(error);
                    }
                }
            }
        }
        // Start the round robin at a different partition for each producer.
        let start = usize::try_from(inner.next_id()).unwrap_or(0);
        Ok(Producer {
            router: Router::new(producers.len(), start),
            topic,
            partitioned: partitions > 0,
            producers,
        })
    }
}

/// Tells whether a producer is connected (see [`Producer::connection_watch`]);
/// once the producer is closed it reports its last state.
#[derive(Clone, Debug)]
pub struct ConnectionWatch(Vec<Arc<AtomicBool>>);

impl ConnectionWatch {
    pub fn is_connected(&self) -> bool {
        self.0.iter().all(|flag| flag.load(Ordering::Relaxed))
    }
}

/// Sends messages to a topic; see the module documentation.
pub struct Producer {
    topic: String,
    partitioned: bool,
    producers: Vec<PartitionProducer>,
    router: Router,
}

impl Producer {
    /// The full topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Number of partitions (0 for a topic that is not partitioned).
    pub fn partitions(&self) -> usize {
        if self.partitioned {
            self.producers.len()
        } else {
            0
        }
    }

    /// The producer's name: the one given, or the one the broker assigned
    /// (to the first partition's producer, for a partitioned topic).
    pub fn name(&self) -> String {
        self.producers
            .first()
            .map(|producer| producer.shared.name())
            .unwrap_or_default()
    }

    /// Whether every partition's producer is connected to its broker now (it
    /// reconnects on its own after a lost connection).
    pub fn is_connected(&self) -> bool {
        self.connection_watch().is_connected()
    }

    /// A handle that tells whether the producer is connected, for monitoring.
    pub fn connection_watch(&self) -> ConnectionWatch {
        ConnectionWatch(
            self.producers
                .iter()
                .map(|producer| producer.shared.connected.clone())
                .collect(),
        )
    }

    /// The highest sequence id the broker has acknowledged (at creation, the
    /// broker's `last_sequence_id`; -1 when none). For a partitioned topic,
    /// the highest over the partitions.
    pub fn last_sequence_id(&self) -> i64 {
        self.producers
            .iter()
            .map(|producer| producer.shared.last_sequence_id.load(Ordering::Relaxed))
            .max()
            .unwrap_or(-1)
    }

    /// Queues a message, waiting while its partition has `max_pending`
    /// messages outstanding. The returned [`SendReceipt`] resolves to the
    /// message's id once the broker has stored it.
    pub async fn send(&self, message: impl Into<ProducerMessage>) -> Result<SendReceipt> {
        let message = message.into();
        let index = if self.producers.len() == 1 {
            0
        } else {
            self.router.choose(message.key.as_deref())
        };
        match self.producers.get(index) {
            Some(producer) => producer.send(message).await,
            None => Err(Error::ProducerClosed {
                topic: self.topic.clone(),
            }),
        }
    }

    /// Sends a message and waits for the broker to store it.
    pub async fn send_and_wait(&self, message: impl Into<ProducerMessage>) -> Result<MessageId> {
        self.send(message).await?.await
    }

    /// Sends any open batch and waits until every message queued before the
    /// call has completed (successfully or not).
    pub async fn flush(&self) -> Result<()> {
        for producer in &self.producers {
            producer.request(ProducerCommand::Flush).await?;
        }
        Ok(())
    }

    /// Sends what is queued, waits for it to complete, and closes the
    /// producer on the broker. Later sends fail with [`Error::ProducerClosed`].
    pub async fn close(&self) -> Result<()> {
        let mut result = Ok(());
        for producer in &self.producers {
            if let Err(error) = producer.close().await {
                result = Err(error);
            }
        }
        result
    }
}

impl Producer {
    /// Fails whatever is queued or in flight with [`Error::ProducerClosed`] (without waiting
    /// for receipts) and closes the producer on the broker, waiting at most the operation
    /// timeout for its answer.
    pub async fn close_now(&self) -> Result<()> {
        let mut result = Ok(());
        for producer in &self.producers {
            if let Err(error) = producer.close_with(ProducerCommand::CloseNow).await {
                result = Err(error);
            }
        }
        result
    }
}

/// Resolves to the id of a sent message, or to why it was not sent.
#[must_use = "a receipt tells whether the message was stored"]
pub struct SendReceipt {
    receiver: oneshot::Receiver<Result<MessageId>>,
    topic: Arc<str>,
}

impl Future for SendReceipt {
    type Output = Result<MessageId>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.receiver).poll(context) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::ProducerClosed {
                topic: self.topic.to_string(),
            })),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What the handle and the engine share.
struct ProducerShared {
    name: Mutex<String>,
    last_sequence_id: AtomicI64,
    /// Whether the producer is registered on a live connection now.
    connected: Arc<AtomicBool>,
}

impl ProducerShared {
    fn name(&self) -> String {
        self.name
            .lock()
            .map(|name| name.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn set_name(&self, name: &str) {
        let mut guard = self
            .name
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = name.to_string();
    }
}

enum ProducerCommand {
    Send {
        /// Boxed: a message with its metadata template is large.
        message: Box<ProducerMessage>,
        responder: oneshot::Sender<Result<MessageId>>,
        permit: OwnedSemaphorePermit,
    },
    Flush(oneshot::Sender<Result<()>>),
    Close(oneshot::Sender<Result<()>>),
    /// Close without waiting for what is in flight.
    CloseNow(oneshot::Sender<Result<()>>),
}

/// The handle of one partition's engine.
struct PartitionProducer {
    topic: Arc<str>,
    commands: mpsc::Sender<ProducerCommand>,
    semaphore: Arc<Semaphore>,
    shared: Arc<ProducerShared>,
}

impl PartitionProducer {
    async fn create(
        client: Arc<ClientInner>,
        topic: String,
        partition: i32,
        config: Arc<ProducerConfig>,
    ) -> Result<PartitionProducer> {
        let producer_id = client.next_id();
        let request = ConnectRequest {
            client: client.clone(),
            topic: topic.clone(),
            producer_id,
            name: config.name.clone(),
            user_provided_name: config.name.is_some(),
            epoch: 0,
            access_mode: config.access_mode,
            properties: config.properties.clone(),
            event_capacity: config.max_pending.saturating_add(16),
        };
        // Transient failures (no broker ready yet, a connection refused while
        // a broker restarts) are retried until the operation timeout.
        let deadline = Instant::now() + client.operation_timeout;
        let mut backoff = Backoff::new(client.backoff_initial, client.backoff_max);
        let established = loop {
            match connect_producer(request.clone()).await {
                Ok(established) => break established,
                Err(error) if is_transient(&error) && Instant::now() < deadline => {
                    tracing::debug!(%topic, %error, "creating the producer failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(error) => return Err(error),
            }
        };
        let next_sequence_id = match config.initial_sequence_id {
            Some(initial) => initial.saturating_add(1),
            None => u64::try_from(established.last_sequence_id.saturating_add(1)).unwrap_or(0),
        };
        let shared = Arc::new(ProducerShared {
            name: Mutex::new(established.producer_name.clone()),
            last_sequence_id: AtomicI64::new(
                i64::try_from(next_sequence_id)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(1),
            ),
            connected: Arc::new(AtomicBool::new(true)),
        });
        let semaphore = Arc::new(Semaphore::new(config.max_pending));
        let (commands, command_queue) = mpsc::channel(config.max_pending.saturating_add(16));
        let span = tracing::info_span!(
            "producer",
            topic = %topic,
            producer_id,
            name = %established.producer_name
        );
        tracing::debug!(parent: &span, next_sequence_id, "producer created");
        let engine = ProducerEngine {
            topic: topic.clone().into(),
            partition,
            producer_id,
            backoff: Backoff::new(client.backoff_initial, client.backoff_max),
            client,
            shared: shared.clone(),
            semaphore: semaphore.clone(),
            commands: command_queue,
            commands_open: true,
            max_message_size: established.max_message_size,
            producer_name: established.producer_name,
            link: Some(established.link),
            reconnecting: None,
            retry_at: None,
            epoch: 0,
            next_sequence_id,
            batch: OpenBatch::default(),
            pending: VecDeque::new(),
            flush_waiters: Vec::new(),
            close_waiters: Vec::new(),
            closing: false,
            failed: None,
            config,
        };
        tokio::spawn(engine.run().instrument(span));
        Ok(PartitionProducer {
            topic: topic.into(),
            commands,
            semaphore,
            shared,
        })
    }

    fn closed(&self) -> Error {
        Error::ProducerClosed {
            topic: self.topic.to_string(),
        }
    }

    async fn send(&self, message: ProducerMessage) -> Result<SendReceipt> {
        let permit = self
            .semaphore
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.closed())?;
        let (responder, receiver) = oneshot::channel();
        self.commands
            .send(ProducerCommand::Send {
                message: Box::new(message),
                responder,
                permit,
            })
            .await
            .map_err(|_| self.closed())?;
        Ok(SendReceipt {
            receiver,
            topic: self.topic.clone(),
        })
    }

    async fn request(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<()>>) -> ProducerCommand,
    ) -> Result<()> {
        let (responder, receiver) = oneshot::channel();
        self.commands
            .send(build(responder))
            .await
            .map_err(|_| self.closed())?;
        receiver.await.map_err(|_| self.closed())?
    }

    async fn close(&self) -> Result<()> {
        self.close_with(ProducerCommand::Close).await
    }

    async fn close_with(
        &self,
        build: impl FnOnce(oneshot::Sender<Result<()>>) -> ProducerCommand,
    ) -> Result<()> {
        match self.request(build).await {
            // Already closed is closed.
            Err(Error::ProducerClosed { .. }) => Ok(()),
            other => other,
        }
    }
}

/// Errors worth retrying while a producer or consumer is first created.
pub(crate) fn is_transient(error: &Error) -> bool {
    match error {
        Error::Server { code, .. } => {
            matches!(
                code,
                ServerError::ServiceNotReady | ServerError::TooManyRequests
            )
        }
        other => other.is_retryable(),
    }
}

/// Everything needed to (re-)create the producer on a broker.
#[derive(Clone)]
struct ConnectRequest {
    client: Arc<ClientInner>,
    topic: String,
    producer_id: u64,
    name: Option<String>,
    user_provided_name: bool,
    epoch: u64,
    access_mode: AccessMode,
    properties: BTreeMap<String, String>,
    event_capacity: usize,
}

/// A connection with this producer registered on it.
struct Link {
    connection: Arc<Connection>,
    events: mpsc::Receiver<ProducerEvent>,
}

struct Established {
    link: Link,
    producer_name: String,
    last_sequence_id: i64,
    max_message_size: usize,
}

/// Lookup, connection, PRODUCER, PRODUCER_SUCCESS.
async fn connect_producer(request: ConnectRequest) -> Result<Established> {
    let pool = &request.client.pool;
    let address = pool.lookup(&request.topic).await?;
    let connection = pool.get(&address).await?;
    let events = connection.register_producer(request.producer_id, request.event_capacity)?;
    // An exclusive producer may wait as long as the current holder lives.
    let timeout = (request.access_mode != AccessMode::WaitForExclusive)
        .then(|| connection.operation_timeout());
    let reply = connection
        .request("create producer", timeout, |request_id| BaseCommand {
            producer: Some(Box::new(CommandProducer {
                topic: request.topic.clone(),
                producer_id: request.producer_id,
                request_id,
                producer_name: request.name.clone(),
                epoch: Some(request.epoch),
                user_provided_producer_name: Some(request.user_provided_name),
                producer_access_mode: Some(request.access_mode.wire()),
                metadata: request
                    .properties
                    .iter()
                    .map(|(key, value)| KeyValue {
                        key: key.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                ..CommandProducer::default()
            })),
            ..command(CommandType::Producer)
        })
        .await;
    let success = match reply.map(|reply| reply.producer_success) {
        Ok(Some(success)) => success,
        Ok(None) => {
            connection.unregister_producer(request.producer_id);
            return Err(Error::Protocol {
                address: connection.address().to_string(),
                reason: "PRODUCER answered without PRODUCER_SUCCESS".into(),
            });
        }
        Err(error) => {
            connection.unregister_producer(request.producer_id);
            return Err(error);
        }
    };
    Ok(Established {
        max_message_size: connection.max_message_size(),
        producer_name: success.producer_name.clone(),
        last_sequence_id: success.last_sequence_id(),
        link: Link { connection, events },
    })
}

/// One user message waiting for its receipt.
struct PendingSend {
    sequence_id: u64,
    responder: oneshot::Sender<Result<MessageId>>,
    /// Released when the send completes: this is the back-pressure.
    _permit: OwnedSemaphorePermit,
}

/// One SEND: a batch or a single message.
struct InFlight {
    sequence_id: u64,
    highest_sequence_id: u64,
    /// Encoded once; resent byte for byte after a reconnection.
    frame: PayloadFrame,
    batched: bool,
    sends: Vec<PendingSend>,
    /// When its oldest message was queued (send timeouts count from here).
    queued_at: Instant,
}

/// The batch being filled.
#[derive(Default)]
struct OpenBatch {
    messages: Vec<SequencedMessage>,
    sends: Vec<PendingSend>,
    bytes: usize,
    started_at: Option<Instant>,
}

impl OpenBatch {
    fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }
}

type Reconnect = Pin<Box<dyn Future<Output = Result<Established>> + Send>>;

/// The task behind one partition's producer.
struct ProducerEngine {
    client: Arc<ClientInner>,
    topic: Arc<str>,
    partition: i32,
    producer_id: u64,
    config: Arc<ProducerConfig>,
    shared: Arc<ProducerShared>,
    semaphore: Arc<Semaphore>,
    commands: mpsc::Receiver<ProducerCommand>,
    commands_open: bool,
    /// The connection, while connected.
    link: Option<Link>,
    /// A reconnection under way.
    reconnecting: Option<Reconnect>,
    /// When the next reconnection starts, while disconnected.
    retry_at: Option<Instant>,
    backoff: Backoff,
    /// Bumped on every reconnection (CommandProducer.epoch).
    epoch: u64,
    producer_name: String,
    next_sequence_id: u64,
    max_message_size: usize,
    batch: OpenBatch,
    /// SENDs awaiting receipts, in sequence order.
    pending: VecDeque<InFlight>,
    /// Flushes waiting for every sequence id up to theirs to complete.
    flush_waiters: Vec<(u64, oneshot::Sender<Result<()>>)>,
    close_waiters: Vec<oneshot::Sender<Result<()>>>,
    closing: bool,
    /// With `stop_on_failure`: why sends fail from now on.
    failed: Option<Error>,
}

async fn next_event(link: &mut Option<Link>) -> Option<ProducerEvent> {
    match link {
        Some(link) => link.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn reconnected(reconnecting: &mut Option<Reconnect>) -> Result<Established> {
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

impl ProducerEngine {
    async fn run(mut self) {
        let outcome = self.event_loop().await;
        self.finish(outcome).await;
    }

    /// Runs until the producer is closed (`Ok`) or fails for good (`Err`).
    async fn event_loop(&mut self) -> Result<()> {
        loop {
            if self.closing && self.batch.is_empty() && self.pending.is_empty() {
                return Ok(());
            }
            let batch_deadline = match (self.config.batching, self.batch.started_at) {
                (Some(policy), Some(started)) => Some(started + policy.max_delay),
                _ => None,
            };
            let timeout_deadline = self.timeout_deadline();
            tokio::select! {
                command = self.commands.recv(), if self.commands_open => match command {
                    Some(command) => self.on_command(command).await,
                    None => {
                        // Every handle is gone: send what is queued, then stop.
                        self.commands_open = false;
                        self.start_closing().await;
                    }
                },
                event = next_event(&mut self.link) => match event {
                    Some(event) => self.on_event(event).await,
                    None => self.disconnected("the connection closed"),
                },
                result = reconnected(&mut self.reconnecting) => {
                    self.reconnecting = None;
                    match result {
                        Ok(established) => self.on_reconnected(established).await,
                        Err(error) if error.is_retryable() => {
                            tracing::info!(%error, "reconnecting the producer failed; will retry");
                            self.retry_at = Some(Instant::now() + self.backoff.next_delay());
                        }
                        Err(error) => return Err(error),
                    }
                },
                () = sleep_until(self.retry_at) => {
                    self.retry_at = None;
                    self.epoch += 1;
                    self.reconnecting = Some(Box::pin(connect_producer(self.connect_request())));
                },
                () = sleep_until(batch_deadline) => self.flush_batch().await,
                () = sleep_until(timeout_deadline) => self.fail_expired(),
            }
        }
    }

    fn connect_request(&self) -> ConnectRequest {
        ConnectRequest {
            client: self.client.clone(),
            topic: self.topic.to_string(),
            producer_id: self.producer_id,
            // After the first success the name is the broker's if the user
            // gave none; keeping it keeps deduplication working.
            name: Some(self.producer_name.clone()),
            user_provided_name: self.config.name.is_some(),
            epoch: self.epoch,
            access_mode: self.config.access_mode,
            properties: self.config.properties.clone(),
            event_capacity: self.config.max_pending.saturating_add(16),
        }
    }

    fn timeout_deadline(&self) -> Option<Instant> {
        let timeout = self.config.send_timeout?;
        let oldest = match (self.pending.front(), self.batch.started_at) {
            (Some(front), Some(batch)) => front.queued_at.min(batch),
            (Some(front), None) => front.queued_at,
            (None, batch) => batch?,
        };
        Some(oldest + timeout)
    }

    async fn on_command(&mut self, command: ProducerCommand) {
        match command {
            ProducerCommand::Send {
                message,
                responder,
                permit,
            } => {
                if self.closing {
                    let _ = responder.send(Err(self.closed_error()));
                    return;
                }
                if let Some(earlier) = &self.failed {
                    let _ = responder.send(Err(earlier.clone()));
                    return;
                }
                self.enqueue(*message, responder, permit).await;
            }
            ProducerCommand::Flush(responder) => {
                self.flush_batch().await;
                match self.pending.back() {
                    Some(last) => {
                        self.flush_waiters
                            .push((last.highest_sequence_id, responder));
                    }
                    None => {
                        let _ = responder.send(Ok(()));
                    }
                }
            }
            ProducerCommand::Close(responder) => {
                self.close_waiters.push(responder);
                self.start_closing().await;
            }
            ProducerCommand::CloseNow(responder) => {
                self.close_waiters.push(responder);
                self.start_closing().await;
                let closed = self.closed_error();
                self.fail_everything(&closed);
            }
        }
    }

    async fn start_closing(&mut self) {
        self.closing = true;
        // No more sends: waiting `send` calls fail at once.
        self.semaphore.close();
        self.flush_batch().await;
    }

    fn closed_error(&self) -> Error {
        Error::ProducerClosed {
            topic: self.topic.to_string(),
        }
    }

    async fn enqueue(
        &mut self,
        message: ProducerMessage,
        responder: oneshot::Sender<Result<MessageId>>,
        permit: OwnedSemaphorePermit,
    ) {
        let size = message.payload.len();
        if size > self.max_message_size {
            let error = Error::MessageTooLarge {
                size,
                max_size: self.max_message_size,
            };
            let _ = responder.send(Err(error.clone()));
            self.send_failed(&error, Failed::Newest);
            return;
        }
        let sequence_id = message.sequence_id.unwrap_or(self.next_sequence_id);
        self.next_sequence_id = self.next_sequence_id.max(sequence_id.saturating_add(1));
        let send = PendingSend {
            sequence_id,
            responder,
            _permit: permit,
        };
        let sequenced = SequencedMessage {
            sequence_id,
            message,
        };
        let now = Instant::now();
        let batchable = self.config.batching.is_some()
            && sequenced.message.deliver_at.is_none()
            && sequenced.message.entry.is_none();
        if !batchable {
            // Keep the order: whatever is batched goes first.
            self.flush_batch().await;
            self.send_entry(vec![sequenced], vec![send], now).await;
            return;
        }
        let policy = self.config.batching.unwrap_or(BatchingPolicy {
            max_messages: 1,
            max_bytes: usize::MAX,
            max_delay: Duration::ZERO,
        });
        // Per-message overhead in a batch: size field and small metadata.
        let cost = size + 16;
        let fits = self.batch.messages.first().is_none_or(|first| {
            batch_compatible(&first.message, &sequenced.message)
                && self.batch.bytes + cost <= self.max_message_size
        });
        if !fits {
            self.flush_batch().await;
        }
        self.batch.bytes += cost;
        self.batch.started_at.get_or_insert(now);
        self.batch.messages.push(sequenced);
        self.batch.sends.push(send);
        if self.batch.messages.len() >= policy.max_messages || self.batch.bytes >= policy.max_bytes
        {
            self.flush_batch().await;
        }
    }

    async fn flush_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let queued_at = batch.started_at.unwrap_or_else(Instant::now);
        self.send_entry(batch.messages, batch.sends, queued_at)
            .await;
    }

    /// Encodes one entry, adds it to the in-flight queue and, if connected,
    /// writes it.
    async fn send_entry(
        &mut self,
        messages: Vec<SequencedMessage>,
        sends: Vec<PendingSend>,
        queued_at: Instant,
    ) {
        // An entry handed over whole (geo-replication) may carry the metadata the replicator
        // adds on top of what its producer sent.
        let allowance = if messages.iter().any(|sent| sent.message.entry.is_some()) {
            meridian_wire::REPLICATION_METADATA_ALLOWANCE
        } else {
            0
        };
        let encoded = encode_entry(
            &messages,
            &self.producer_name,
            self.config.compression,
            now_ms(),
        )
        .and_then(|entry| {
            let send = CommandSend {
                producer_id: self.producer_id,
                sequence_id: entry.sequence_id,
                num_messages: Some(i32::try_from(entry.num_messages).unwrap_or(i32::MAX)),
                highest_sequence_id: Some(entry.highest_sequence_id),
                ..CommandSend::default()
            };
            let command = BaseCommand {
                send: Some(send),
                ..command(CommandType::Send)
            };
            let payload = meridian_wire::encode_entry(&entry.metadata, &entry.payload)
                .map_err(Error::encode)?;
            let frame = encode_payload_frame(&command, payload).map_err(Error::encode)?;
            Ok((entry, frame))
        });
        let (entry, frame) = match encoded {
            Ok(encoded) => encoded,
            Err(error) => {
                tracing::warn!(%error, "could not encode an entry; failing its messages");
                fail_sends(sends, &error);
                self.send_failed(&error, Failed::Newest);
                return;
            }
        };
        let frame_size = frame.frame_length();
        if frame_size > self.max_message_size + meridian_wire::FRAME_SIZE_PADDING + allowance {
            let error = Error::MessageTooLarge {
                size: frame_size,
                max_size: self.max_message_size,
            };
            fail_sends(sends, &error);
            self.send_failed(&error, Failed::Newest);
            return;
        }
        self.pending.push_back(InFlight {
            sequence_id: entry.sequence_id,
            highest_sequence_id: entry.highest_sequence_id,
            batched: entry.batched,
            frame: frame.clone(),
            sends,
            queued_at,
        });
        if let Some(link) = &self.link {
            if let Err(error) = link.connection.send_payload(frame).await {
                self.disconnected(&error.to_string());
            }
        }
    }

    async fn on_event(&mut self, event: ProducerEvent) {
        match event {
            ProducerEvent::Receipt(receipt) => {
                let Some(head) = self.pending.front() else {
                    tracing::debug!(
                        sequence_id = receipt.sequence_id,
                        "receipt with nothing pending"
                    );
                    return;
                };
                if receipt.sequence_id < head.sequence_id {
                    // A late receipt for a message that already timed out.
                    tracing::debug!(
                        sequence_id = receipt.sequence_id,
                        head = head.sequence_id,
                        "ignoring an old receipt"
                    );
                    return;
                }
                if receipt.sequence_id > head.sequence_id {
                    tracing::warn!(
                        sequence_id = receipt.sequence_id,
                        expected = head.sequence_id,
                        "receipt out of order; re-creating the producer to resend"
                    );
                    self.recreate("out-of-order receipt").await;
                    return;
                }
                let Some(in_flight) = self.pending.pop_front() else {
                    return;
                };
                let id = receipt
                    .message_id
                    .as_ref()
                    .map(|data| MessageId::from_data(data, self.partition))
                    .unwrap_or(MessageId::EARLIEST.with_partition(self.partition))
                    .with_partition(self.partition);
                self.shared.last_sequence_id.store(
                    i64::try_from(in_flight.highest_sequence_id).unwrap_or(i64::MAX),
                    Ordering::Relaxed,
                );
                for (index, send) in in_flight.sends.into_iter().enumerate() {
                    let batch_index = if in_flight.batched {
                        i32::try_from(index).unwrap_or(i32::MAX)
                    } else {
                        -1
                    };
                    let _ = send.responder.send(Ok(id.with_batch_index(batch_index)));
                }
                self.complete_flushes();
            }
            ProducerEvent::SendError(error) => {
                let server_error = Error::server(error.error, error.message.clone());
                let checksum = error.error == ServerError::ChecksumError as i32;
                let head_matches = self
                    .pending
                    .front()
                    .is_some_and(|head| head.sequence_id == error.sequence_id);
                if checksum && head_matches {
                    // The entry was corrupted on the way; resending the same
                    // bytes cannot help, so only this one fails.
                    tracing::warn!(
                        sequence_id = error.sequence_id,
                        "broker reported a checksum error"
                    );
                    if let Some(in_flight) = self.pending.pop_front() {
                        fail_sends(in_flight.sends, &server_error);
                    }
                    self.send_failed(&server_error, Failed::OldestInFlight);
                    self.complete_flushes();
                } else if error.error == ServerError::TopicTerminatedError as i32 {
                    tracing::warn!("topic terminated; failing pending messages");
                    self.fail_everything(&server_error);
                } else if self.config.stop_on_failure && head_matches {
                    tracing::warn!(sequence_id = error.sequence_id, error = %server_error, "send failed; failing what follows it");
                    if let Some(in_flight) = self.pending.pop_front() {
                        fail_sends(in_flight.sends, &server_error);
                    }
                    self.send_failed(&server_error, Failed::OldestInFlight);
                    self.recreate("send error").await;
                } else {
                    tracing::warn!(sequence_id = error.sequence_id, error = %server_error, "send failed; re-creating the producer to resend");
                    self.recreate("send error").await;
                }
            }
            ProducerEvent::Closed => {
                tracing::info!("broker closed the producer; reconnecting");
                self.disconnected("closed by the broker");
            }
        }
    }

    /// Closes this producer on the broker and creates it again (after the
    /// backoff), resending what is in flight. Only this producer: the
    /// connection, which other producers and consumers share, stays up.
    async fn recreate(&mut self, reason: &str) {
        if let Some(link) = &self.link {
            // Written before the PRODUCER of the re-creation, on the same connection, so the
            // broker handles it first; its reply is not awaited.
            let _ = link.connection.close_producer(self.producer_id).await;
        }
        self.disconnected(reason);
    }

    /// With `stop_on_failure`, a send failed: every later send fails. Messages queued before
    /// it (the open batch, the in-flight queue) go on, unless `after` says the failed one was
    /// the oldest in flight, so that all of them came after it.
    fn send_failed(&mut self, error: &Error, after: Failed) {
        if !self.config.stop_on_failure {
            return;
        }
        let earlier = Error::NotAllowed(format!(
            "not sent: an earlier message of this producer failed ({error})"
        ));
        if after == Failed::OldestInFlight {
            self.fail_everything(&earlier);
        }
        self.failed = Some(earlier);
    }

    fn disconnected(&mut self, reason: &str) {
        self.shared.connected.store(false, Ordering::Relaxed);
        if let Some(link) = self.link.take() {
            link.connection.unregister_producer(self.producer_id);
        }
        if self.reconnecting.is_none() && self.retry_at.is_none() {
            let delay = self.backoff.next_delay();
            tracing::info!(
                reason,
                retry_in_ms = delay.as_millis() as u64,
                "producer disconnected"
            );
            self.retry_at = Some(Instant::now() + delay);
        }
    }

    async fn on_reconnected(&mut self, established: Established) {
        if established.producer_name != self.producer_name {
            tracing::warn!(
                assigned = %established.producer_name,
                "broker assigned another producer name on reconnection"
            );
            self.shared.set_name(&established.producer_name);
        }
        self.max_message_size = established.max_message_size;
        self.backoff.reset();
        tracing::info!(
            resending = self.pending.len(),
            epoch = self.epoch,
            "producer reconnected"
        );
        let connection = established.link.connection.clone();
        self.link = Some(established.link);
        self.shared.connected.store(true, Ordering::Relaxed);
        // Resend in order, original sequence ids and all.
        let frames: Vec<PayloadFrame> = self
            .pending
            .iter()
            .map(|in_flight| in_flight.frame.clone())
            .collect();
        for frame in frames {
            if let Err(error) = connection.send_payload(frame).await {
                self.disconnected(&error.to_string());
                return;
            }
        }
    }

    fn fail_expired(&mut self) {
        let Some(timeout) = self.config.send_timeout else {
            return;
        };
        let now = Instant::now();
        let topic = self.topic.to_string();
        let timed_out = |sequence_id| Error::SendTimeout {
            topic: topic.clone(),
            sequence_id,
            timeout,
        };
        let mut failed = 0usize;
        let mut first_failure = None;
        while self
            .pending
            .front()
            .is_some_and(|front| front.queued_at + timeout <= now)
        {
            if let Some(in_flight) = self.pending.pop_front() {
                failed += in_flight.sends.len();
                first_failure.get_or_insert(timed_out(in_flight.sequence_id));
                for send in in_flight.sends {
                    let _ = send.responder.send(Err(timed_out(send.sequence_id)));
                }
            }
        }
        if self
            .batch
            .started_at
            .is_some_and(|started| started + timeout <= now)
        {
            let batch = std::mem::take(&mut self.batch);
            failed += batch.sends.len();
            if let Some(first) = batch.sends.first() {
                first_failure.get_or_insert(timed_out(first.sequence_id));
            }
            for send in batch.sends {
                let _ = send.responder.send(Err(timed_out(send.sequence_id)));
            }
        }
        if failed > 0 {
            tracing::warn!(
                failed,
                timeout_ms = timeout.as_millis() as u64,
                "sends timed out"
            );
        }
        if let Some(error) = first_failure {
            self.send_failed(&error, Failed::OldestInFlight);
        }
        self.complete_flushes();
    }

    fn fail_everything(&mut self, error: &Error) {
        let batch = std::mem::take(&mut self.batch);
        fail_sends(batch.sends, error);
        for in_flight in std::mem::take(&mut self.pending) {
            fail_sends(in_flight.sends, error);
        }
        self.complete_flushes();
    }

    /// Answers flushes whose messages have all completed.
    fn complete_flushes(&mut self) {
        let oldest_pending = self.pending.front().map(|front| front.sequence_id);
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flush_waiters)
            .into_iter()
            .partition(|(sequence_id, _)| {
                oldest_pending.is_none_or(|oldest| oldest > *sequence_id)
            });
        self.flush_waiters = waiting;
        for (_, waiter) in done {
            let _ = waiter.send(Ok(()));
        }
    }

    async fn finish(&mut self, outcome: Result<()>) {
        self.semaphore.close();
        self.commands.close();
        if let Err(error) = &outcome {
            tracing::warn!(%error, "producer failed for good");
            self.fail_everything(error);
            // Sends that were already queued when it failed.
            while let Ok(command) = self.commands.try_recv() {
                match command {
                    ProducerCommand::Send { responder, .. } => {
                        let _ = responder.send(Err(error.clone()));
                    }
                    ProducerCommand::Flush(responder)
                    | ProducerCommand::Close(responder)
                    | ProducerCommand::CloseNow(responder) => {
                        let _ = responder.send(Err(error.clone()));
                    }
                }
            }
        }
        if let Some(link) = self.link.take() {
            let producer_id = self.producer_id;
            let timeout = link.connection.operation_timeout();
            let closed = link
                .connection
                .request("close producer", Some(timeout), |request_id| BaseCommand {
                    close_producer: Some(Box::new(CommandCloseProducer {
                        producer_id,
                        request_id,
                        ..CommandCloseProducer::default()
                    })),
                    ..command(CommandType::CloseProducer)
                })
                .await;
            if let Err(error) = closed {
                tracing::debug!(%error, "closing the producer on the broker failed");
            }
            link.connection.unregister_producer(producer_id);
        }
        for (_, waiter) in self.flush_waiters.drain(..) {
            let _ = waiter.send(outcome.clone());
        }
        for waiter in self.close_waiters.drain(..) {
            let _ = waiter.send(outcome.clone());
        }
        tracing::debug!("producer closed");
    }
}

/// Which message failed, for `stop_on_failure`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failed {
    /// The one being queued: everything queued before it goes on.
    Newest,
    /// The oldest in flight: everything queued or in flight came after it.
    OldestInFlight,
}

fn fail_sends(sends: Vec<PendingSend>, error: &Error) {
    for send in sends {
        let _ = send.responder.send(Err(error.clone()));
    }
}
