//! One TCP connection to one broker, shared by every producer, consumer and
//! lookup that talks to that broker.
//!
//! A connection is two tasks and a registry:
//!
//! - the **writer** drains a bounded queue of encoded frames into the socket
//!   (callers wait for room: that is the back-pressure towards producers);
//! - the **reader** decodes frames ([`meridian_wire::decode_frame`], bounded
//!   by the broker's `max_message_size` plus padding) and routes each one:
//!   replies by `request_id` to the oneshot of the caller waiting for them,
//!   receipts by `producer_id` and messages by `consumer_id` to the bounded
//!   channel of that producer or consumer, PING answered with PONG. It also
//!   sends a PING every keep-alive interval and closes the connection when
//!   nothing at all arrived for two intervals;
//! - the **registry** (behind a `std` mutex that is never held across an
//!   await) maps those ids to their channels.
//!
//! When the connection closes, for any reason, every waiting request fails
//! with [`Error::Disconnected`] and every producer and consumer channel is
//! dropped, which is how their tasks learn that they must reconnect.
//! Dropping the last `Arc<Connection>` closes it too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meridian_wire::proto::{
    AuthData, CommandAuthResponse, CommandConnect, CommandMessage, CommandPing, CommandPong,
    CommandSendError, CommandSendReceipt, FeatureFlags,
};
use meridian_wire::{
    command_type, decode_frame, encode_command, BaseCommand, CommandType, EntryError, Frame,
    FrameError, PayloadFrame, DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_MESSAGE_SIZE, FRAME_SIZE_PADDING,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::error::{Error, Result};

/// The protocol version this client speaks (TOPIC_MIGRATED and everything before).
pub(crate) const PROTOCOL_VERSION: i32 = 20;

/// `client_version` sent in CONNECT.
pub(crate) const CLIENT_VERSION: &str = concat!("meridian-client/", env!("CARGO_PKG_VERSION"));

/// The receiving half of a connection's stream (TCP, or TLS over TCP).
type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// The sending half of a connection's stream.
type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

/// Bytes the reader asks the socket for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Where a connection goes: the broker that owns the topics (`logical`) and
/// the address the TCP connection is opened to (`physical`), which differ
/// only when a lookup says to go through the service URL (a proxy).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct BrokerAddress {
    pub(crate) logical: String,
    pub(crate) physical: String,
}

impl BrokerAddress {
    pub(crate) fn direct(address: String) -> BrokerAddress {
        BrokerAddress {
            logical: address.clone(),
            physical: address,
        }
    }
}

impl std::fmt::Display for BrokerAddress {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.logical == self.physical {
            formatter.write_str(&self.logical)
        } else {
            write!(formatter, "{} via {}", self.logical, self.physical)
        }
    }
}

/// Connection settings, from the client builder.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionSettings {
    pub(crate) connect_timeout: Duration,
    pub(crate) operation_timeout: Duration,
    pub(crate) keep_alive_interval: Duration,
    /// Frames queued for the writer before callers wait.
    pub(crate) outbound_queue: usize,
    /// Requests awaiting a reply before new ones are refused.
    pub(crate) max_pending_requests: usize,
    /// Token sent in CONNECT (`auth_method_name` "token") and in answer to AUTH_CHALLENGE.
    pub(crate) auth_token: Option<AuthToken>,
    /// TLS (`pulsar+ssl://`): every connection is TLS with this configuration, and the
    /// broker's certificate must name the host connected to.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// A token, kept out of `Debug` output.
#[derive(Clone)]
pub(crate) struct AuthToken(pub(crate) Arc<str>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(****)")
    }
}

impl std::ops::Deref for AuthToken {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// CONNECT's or AUTH_RESPONSE's credentials: a token, or "none".
fn credentials(token: Option<&str>) -> (String, bytes::Bytes) {
    match token {
        Some(token) => (
            "token".to_string(),
            bytes::Bytes::copy_from_slice(token.as_bytes()),
        ),
        None => ("none".to_string(), bytes::Bytes::new()),
    }
}

/// What the reader hands a producer.
#[derive(Debug)]
pub(crate) enum ProducerEvent {
    Receipt(CommandSendReceipt),
    SendError(CommandSendError),
    /// The broker closed the producer (unload, migration): reconnect.
    Closed,
}

/// What the reader hands a consumer.
#[derive(Debug)]
pub(crate) enum ConsumerEvent {
    /// Boxed: a decoded entry is several hundred bytes and events are moved
    /// through channels.
    Message(Box<(CommandMessage, meridian_wire::ParsedEntry)>),
    /// A MESSAGE whose entry could not be parsed.
    InvalidEntry {
        command: CommandMessage,
        error: EntryError,
    },
    ActiveChange(bool),
    EndOfTopic,
    /// The broker closed the consumer (unload, seek, migration): reconnect.
    Closed,
}

enum Outbound {
    Frame(Bytes),
    Payload(PayloadFrame),
}

type Responder = oneshot::Sender<Result<BaseCommand>>;

#[derive(Default)]
struct Registry {
    requests: HashMap<u64, Responder>,
    producers: HashMap<u64, mpsc::Sender<ProducerEvent>>,
    consumers: HashMap<u64, mpsc::Sender<ConsumerEvent>>,
    /// Set once, when the connection closes.
    closed: Option<Error>,
}

/// State shared by the handle and the two tasks.
struct Shared {
    address: BrokerAddress,
    registry: Mutex<Registry>,
    /// Flips to `true` once; both tasks stop on it.
    shutdown: watch::Sender<bool>,
    auth_token: Option<AuthToken>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the maps inconsistent
        // (every update is a single insert or remove), so poisoning is ignored.
        self.registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn disconnected(&self) -> Error {
        Error::Disconnected {
            address: self.address.to_string(),
        }
    }

    /// Closes the connection: fails waiting requests, drops producer and
    /// consumer channels, stops both tasks. Only the first call does anything.
    fn close(&self, reason: Error) {
        let (requests, producers, consumers) = {
            let mut registry = self.registry();
            if registry.closed.is_some() {
                return;
            }
            registry.closed = Some(reason.clone());
            (
                std::mem::take(&mut registry.requests),
                std::mem::take(&mut registry.producers),
                std::mem::take(&mut registry.consumers),
            )
        };
        match &reason {
            Error::Disconnected { .. } => {
                tracing::debug!(address = %self.address, "connection closed")
            }
            _ => tracing::warn!(address = %self.address, error = %reason, "connection closed"),
        }
        for (_, responder) in requests {
            let _ = responder.send(Err(self.disconnected()));
        }
        drop((producers, consumers));
        self.shutdown.send_replace(true);
    }
}

/// An open, handshaken connection to a broker.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    outbound: mpsc::Sender<Outbound>,
    next_request_id: AtomicU64,
    settings: ConnectionSettings,
    /// The broker's limit on one message (entry), from CONNECTED.
    max_message_size: usize,
    /// The broker announced Meridian's REPLICATED_SUBSCRIPTION_STATE command in CONNECTED.
    takes_subscription_states: bool,
    /// It announced version 2 of the state encoding: it takes the compact form too.
    takes_compact_subscription_states: bool,
}

impl Connection {
    /// Opens a TCP connection and performs the CONNECT/CONNECTED handshake.
    pub(crate) async fn connect(
        address: BrokerAddress,
        settings: ConnectionSettings,
    ) -> Result<Arc<Connection>> {
        let span = tracing::info_span!("connection", address = %address);
        async move {
            let stream = tokio::time::timeout(
                settings.connect_timeout,
                TcpStream::connect(address.physical.as_str()),
            )
            .await
            .map_err(|_| Error::Timeout {
                operation: "TCP connect",
                timeout: settings.connect_timeout,
            })?
            .map_err(|source| Error::Connect {
                address: address.to_string(),
                source: Arc::new(source),
            })?;
            // Small frames (acks, flow) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let (mut read_half, mut write_half) = match &settings.tls {
                None => {
                    let (read, write) = stream.into_split();
                    (Box::new(read) as ReadHalf, Box::new(write) as WriteHalf)
                }
                Some(config) => {
                    let stream = tokio::time::timeout(
                        settings.connect_timeout,
                        tls_handshake(&address, config.clone(), stream),
                    )
                    .await
                    .map_err(|_| Error::Timeout {
                        operation: "TLS handshake",
                        timeout: settings.connect_timeout,
                    })??;
                    let (read, write) = tokio::io::split(stream);
                    (Box::new(read) as ReadHalf, Box::new(write) as WriteHalf)
                }
            };
            let (connected, buffer) = tokio::time::timeout(
                settings.connect_timeout,
                handshake(
                    &address,
                    settings.auth_token.as_deref(),
                    &mut read_half,
                    &mut write_half,
                ),
            )
            .await
            .map_err(|_| Error::Timeout {
                operation: "CONNECT handshake",
                timeout: settings.connect_timeout,
            })??;

            let max_message_size = connected
                .max_message_size
                .and_then(|size| usize::try_from(size).ok())
                .filter(|size| *size > 0)
                .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
            let takes_subscription_states = connected
                .feature_flags
                .as_ref()
                .is_some_and(|flags| flags.meridian_replicated_subscription_state());
            let takes_compact_subscription_states = takes_subscription_states
                && connected.feature_flags.as_ref().is_some_and(|flags| {
                    flags.meridian_replicated_subscription_state_version()
                        >= meridian_wire::SUBSCRIPTION_STATE_COMPACT_VERSION
                });
            let protocol_version = connected.protocol_version();
            tracing::debug!(
                server_version = %connected.server_version,
                protocol_version,
                max_message_size,
                "connected"
            );

            let (shutdown, _) = watch::channel(false);
            let shared = Arc::new(Shared {
                address: address.clone(),
                registry: Mutex::new(Registry::default()),
                shutdown,
                auth_token: settings.auth_token.clone(),
            });
            let (outbound, outbound_queue) = mpsc::channel(settings.outbound_queue.max(1));
            tokio::spawn(
                write_loop(write_half, outbound_queue, shared.clone())
                    .instrument(tracing::Span::current()),
            );
            tokio::spawn(
                read_loop(
                    read_half,
                    buffer,
                    shared.clone(),
                    outbound.clone(),
                    settings.keep_alive_interval,
                    // What a broker may store: the padding, and what geo-replication adds
                    // to the metadata of entries that came from another cluster.
                    max_message_size
                        .saturating_add(FRAME_SIZE_PADDING)
                        .saturating_add(meridian_wire::REPLICATION_METADATA_ALLOWANCE),
                )
                .instrument(tracing::Span::current()),
            );
            Ok(Arc::new(Connection {
                shared,
                outbound,
                next_request_id: AtomicU64::new(0),
                settings,
                max_message_size,
                takes_subscription_states,
                takes_compact_subscription_states,
            }))
        }
        .instrument(span)
        .await
    }

    pub(crate) fn address(&self) -> &BrokerAddress {
        &self.shared.address
    }

    pub(crate) fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    pub(crate) fn operation_timeout(&self) -> Duration {
        self.settings.operation_timeout
    }

    /// Whether the broker takes Meridian's REPLICATED_SUBSCRIPTION_STATE command.
    pub(crate) fn takes_subscription_states(&self) -> bool {
        self.takes_subscription_states
    }

    /// Whether it takes that command's state in the compact form too.
    pub(crate) fn takes_compact_subscription_states(&self) -> bool {
        self.takes_compact_subscription_states
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.shared.registry().closed.is_some()
    }

    /// Closes the connection; everyone using it reconnects.
    pub(crate) fn close(&self, reason: Error) {
        self.shared.close(reason);
    }

    /// Sends a command that expects no reply.
    pub(crate) async fn send_command(&self, command: &BaseCommand) -> Result<()> {
        let frame = encode(command)?;
        self.outbound
            .send(Outbound::Frame(frame))
            .await
            .map_err(|_| self.shared.disconnected())
    }

    /// Asks the broker to close producer `producer_id`, without waiting for the reply.
    pub(crate) async fn close_producer(&self, producer_id: u64) -> Result<()> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        self.send_command(&BaseCommand {
            close_producer: Some(Box::new(meridian_wire::proto::CommandCloseProducer {
                producer_id,
                request_id,
                ..Default::default()
            })),
            ..command(CommandType::CloseProducer)
        })
        .await
    }

    /// Sends a SEND frame.
    pub(crate) async fn send_payload(&self, frame: PayloadFrame) -> Result<()> {
        self.outbound
            .send(Outbound::Payload(frame))
            .await
            .map_err(|_| self.shared.disconnected())
    }

    /// Sends the command built for a fresh request id and waits for the reply
    /// with that id: `Ok` for a success reply, `Err(Error::Server)` for ERROR.
    /// `timeout: None` waits as long as the connection lives (an exclusive
    /// producer queued behind another).
    pub(crate) async fn request(
        &self,
        operation: &'static str,
        timeout: Option<Duration>,
        build: impl FnOnce(u64) -> BaseCommand,
    ) -> Result<BaseCommand> {
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let command = build(request_id);
        let frame = encode(&command)?;
        let (responder, reply) = oneshot::channel();
        {
            let mut registry = self.shared.registry();
            if registry.closed.is_some() {
                return Err(self.shared.disconnected());
            }
            if registry.requests.len() >= self.settings.max_pending_requests {
                return Err(Error::NotAllowed(format!(
                    "{} requests already await replies from {}",
                    registry.requests.len(),
                    self.shared.address
                )));
            }
            registry.requests.insert(request_id, responder);
        }
        if self.outbound.send(Outbound::Frame(frame)).await.is_err() {
            self.shared.registry().requests.remove(&request_id);
            return Err(self.shared.disconnected());
        }
        let reply = match timeout {
            Some(timeout) => match tokio::time::timeout(timeout, reply).await {
                Ok(reply) => reply,
                Err(_) => {
                    self.shared.registry().requests.remove(&request_id);
                    return Err(Error::Timeout { operation, timeout });
                }
            },
            None => reply.await,
        };
        reply.unwrap_or_else(|_| Err(self.shared.disconnected()))
    }

    /// Routes SEND_RECEIPT, SEND_ERROR and CLOSE_PRODUCER for `producer_id`
    /// to the returned channel of `capacity` events.
    pub(crate) fn register_producer(
        &self,
        producer_id: u64,
        capacity: usize,
    ) -> Result<mpsc::Receiver<ProducerEvent>> {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let mut registry = self.shared.registry();
        if registry.closed.is_some() {
            return Err(self.shared.disconnected());
        }
        registry.producers.insert(producer_id, sender);
        Ok(receiver)
    }

    pub(crate) fn unregister_producer(&self, producer_id: u64) {
        self.shared.registry().producers.remove(&producer_id);
    }

    /// Routes MESSAGE and the consumer notifications for `consumer_id` to the
    /// returned channel of `capacity` events.
    pub(crate) fn register_consumer(
        &self,
        consumer_id: u64,
        capacity: usize,
    ) -> Result<mpsc::Receiver<ConsumerEvent>> {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        let mut registry = self.shared.registry();
        if registry.closed.is_some() {
            return Err(self.shared.disconnected());
        }
        registry.consumers.insert(consumer_id, sender);
        Ok(receiver)
    }

    pub(crate) fn unregister_consumer(&self, consumer_id: u64) {
        self.shared.registry().consumers.remove(&consumer_id);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.close(self.shared.disconnected());
    }
}

/// A command with its type set from a body.
pub(crate) fn command(kind: CommandType) -> BaseCommand {
    BaseCommand {
        r#type: kind as i32,
        ..BaseCommand::default()
    }
}

fn encode(command: &BaseCommand) -> Result<Bytes> {
    let mut buffer = BytesMut::new();
    encode_command(command, &mut buffer).map_err(Error::encode)?;
    Ok(buffer.freeze())
}

/// The TLS handshake on `stream`, verifying the certificate against the host of the address
/// connected to (`physical`: a proxy's own certificate when going through one).
async fn tls_handshake(
    address: &BrokerAddress,
    config: Arc<rustls::ClientConfig>,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tls_error = |reason: String| Error::Tls {
        address: address.to_string(),
        reason,
    };
    let name = crate::tls::server_name(crate::tls::host_of(&address.physical))
        .map_err(|error| tls_error(error.0))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|error| tls_error(format!("handshake failed: {error}")))
}

/// Sends CONNECT and reads frames until CONNECTED. Returns it and whatever
/// was read past it.
async fn handshake(
    address: &BrokerAddress,
    auth_token: Option<&str>,
    reader: &mut ReadHalf,
    writer: &mut WriteHalf,
) -> Result<(meridian_wire::proto::CommandConnected, BytesMut)> {
    let io_error = |source| Error::Io {
        address: address.to_string(),
        source: Arc::new(source),
    };
    let (auth_method_name, auth_data) = credentials(auth_token);
    let connect = BaseCommand {
        connect: Some(Box::new(CommandConnect {
            client_version: CLIENT_VERSION.to_string(),
            protocol_version: Some(PROTOCOL_VERSION),
            auth_method_name: Some(auth_method_name),
            auth_data: Some(auth_data),
            // Only a proxy reads this: which broker to forward to.
            proxy_to_broker_url: (address.logical != address.physical)
                .then(|| address.logical.clone()),
            feature_flags: Some(FeatureFlags {
                supports_auth_refresh: Some(auth_token.is_some()),
                ..FeatureFlags::default()
            }),
            ..CommandConnect::default()
        })),
        ..command(CommandType::Connect)
    };
    writer
        .write_all(&encode(&connect)?)
        .await
        .map_err(io_error)?;
    let mut buffer = BytesMut::with_capacity(1024);
    loop {
        let frame =
            decode_frame(&mut buffer, DEFAULT_MAX_FRAME_SIZE).map_err(|source| Error::Frame {
                address: address.to_string(),
                source: Arc::new(source),
            })?;
        match frame {
            Some(frame) => {
                let reply = frame.command().clone();
                match (command_type(&reply), reply.connected, reply.error) {
                    (Some(CommandType::Connected), Some(connected), _) => {
                        return Ok((*connected, buffer))
                    }
                    (Some(CommandType::Error), _, Some(error)) => {
                        return Err(Error::server(error.error, error.message))
                    }
                    _ => {
                        return Err(Error::Protocol {
                            address: address.to_string(),
                            reason: format!("CONNECT answered with command type {}", reply.r#type),
                        })
                    }
                }
            }
            None => {
                buffer.reserve(1024);
                let read = reader.read_buf(&mut buffer).await.map_err(io_error)?;
                if read == 0 {
                    return Err(Error::Disconnected {
                        address: address.to_string(),
                    });
                }
            }
        }
    }
}

async fn write_loop(writer: WriteHalf, mut queue: mpsc::Receiver<Outbound>, shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut writer = BufWriter::with_capacity(64 * 1024, writer);
    loop {
        let item = tokio::select! {
            item = queue.recv() => item,
            _ = shutdown.wait_for(|stopped| *stopped) => None,
        };
        let Some(mut item) = item else { break };
        // Write everything queued, then flush once.
        let result = async {
            loop {
                match item {
                    Outbound::Frame(frame) => writer.write_all(&frame).await?,
                    Outbound::Payload(frame) => {
                        writer.write_all(&frame.header).await?;
                        writer.write_all(&frame.entry).await?;
                    }
                }
                match queue.try_recv() {
                    Ok(next) => item = next,
                    Err(_) => break,
                }
            }
            writer.flush().await
        }
        .await;
        if let Err(source) = result {
            shared.close(Error::Io {
                address: shared.address.to_string(),
                source: Arc::new(source),
            });
            break;
        }
    }
    let _ = writer.shutdown().await;
}

async fn read_loop(
    mut reader: ReadHalf,
    mut buffer: BytesMut,
    shared: Arc<Shared>,
    outbound: mpsc::Sender<Outbound>,
    keep_alive_interval: Duration,
    max_frame_size: usize,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut keep_alive = tokio::time::interval(keep_alive_interval);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keep_alive.tick().await;
    let mut last_received = Instant::now();
    let reason = loop {
        match decode_frame(&mut buffer, max_frame_size) {
            Ok(Some(frame)) => {
                last_received = Instant::now();
                if let Err(error) = dispatch(&shared, &outbound, frame) {
                    break error;
                }
                continue;
            }
            Ok(None) => {}
            Err(FrameError::InvalidEntry { command, source }) => {
                // The frame boundaries held; only the entry inside is bad.
                last_received = Instant::now();
                match command.message {
                    Some(message) => {
                        let consumer_id = message.consumer_id;
                        let event = ConsumerEvent::InvalidEntry {
                            command: message,
                            error: source,
                        };
                        if let Err(error) = deliver_to_consumer(&shared, consumer_id, event) {
                            break error;
                        }
                    }
                    None => {
                        tracing::warn!(error = %source, "ignoring a payload frame with an invalid entry")
                    }
                }
                continue;
            }
            Err(source) => {
                break Error::Frame {
                    address: shared.address.to_string(),
                    source: Arc::new(source),
                }
            }
        }
        if buffer.capacity() - buffer.len() < READ_CHUNK / 4 {
            buffer.reserve(READ_CHUNK);
        }
        tokio::select! {
            read = reader.read_buf(&mut buffer) => match read {
                Ok(0) => break shared.disconnected(),
                Ok(_) => {}
                Err(source) => break Error::Io {
                    address: shared.address.to_string(),
                    source: Arc::new(source),
                },
            },
            _ = keep_alive.tick() => {
                if last_received.elapsed() > keep_alive_interval * 2 {
                    break Error::Timeout {
                        operation: "keep-alive",
                        timeout: keep_alive_interval * 2,
                    };
                }
                let ping = BaseCommand { ping: Some(CommandPing {}), ..command(CommandType::Ping) };
                if let Ok(frame) = encode(&ping) {
                    // A full queue means traffic is flowing; the ping can wait a round.
                    let _ = outbound.try_send(Outbound::Frame(frame));
                }
            }
            _ = shutdown.wait_for(|stopped| *stopped) => break shared.disconnected(),
        }
    };
    shared.close(reason);
}

/// The request id of a reply, for the reply types that carry one.
fn reply_request_id(command: &BaseCommand, kind: CommandType) -> Option<u64> {
    match kind {
        CommandType::Success => command.success.as_ref().map(|body| body.request_id),
        CommandType::Error => command.error.as_ref().map(|body| body.request_id),
        CommandType::ProducerSuccess => command
            .producer_success
            .as_ref()
            .map(|body| body.request_id),
        CommandType::PartitionedMetadataResponse => command
            .partitioned_metadata_response
            .as_ref()
            .map(|body| body.request_id),
        CommandType::LookupResponse => command.lookup_response.as_ref().map(|body| body.request_id),
        CommandType::GetLastMessageIdResponse => command
            .get_last_message_id_response
            .as_ref()
            .map(|body| body.request_id),
        CommandType::GetTopicsOfNamespaceResponse => command
            .get_topics_of_namespace_response
            .as_ref()
            .map(|body| body.request_id),
        CommandType::GetSchemaResponse => command
            .get_schema_response
            .as_ref()
            .map(|body| body.request_id),
        CommandType::GetOrCreateSchemaResponse => command
            .get_or_create_schema_response
            .as_ref()
            .map(|body| body.request_id),
        CommandType::ConsumerStatsResponse => command
            .consumer_stats_response
            .as_ref()
            .map(|body| body.request_id),
        CommandType::AckResponse => command
            .ack_response
            .as_ref()
            .and_then(|body| body.request_id),
        CommandType::ReplicatedSubscriptionStateResponse => command
            .replicated_subscription_state_response
            .as_ref()
            .map(|body| body.request_id),
        _ => None,
    }
}

fn complete(shared: &Shared, request_id: u64, reply: Result<BaseCommand>) {
    let responder = shared.registry().requests.remove(&request_id);
    match responder {
        Some(responder) => {
            let _ = responder.send(reply);
        }
        // The caller timed out and left; the late reply has nobody to go to.
        None => tracing::debug!(request_id, "reply to a request nobody waits for"),
    }
}

fn deliver_to_producer(shared: &Shared, producer_id: u64, event: ProducerEvent) -> Result<()> {
    let sender = shared.registry().producers.get(&producer_id).cloned();
    let Some(sender) = sender else {
        tracing::debug!(producer_id, "event for an unknown producer");
        return Ok(());
    };
    match sender.try_send(event) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        // Receipts are bounded by the producer's pending sends; more means
        // the broker is answering sends that were never made.
        Err(mpsc::error::TrySendError::Full(_)) => Err(Error::Protocol {
            address: shared.address.to_string(),
            reason: format!(
                "producer {producer_id} received more receipts than it has pending sends"
            ),
        }),
    }
}

fn deliver_to_consumer(shared: &Shared, consumer_id: u64, event: ConsumerEvent) -> Result<()> {
    let sender = shared.registry().consumers.get(&consumer_id).cloned();
    let Some(sender) = sender else {
        tracing::debug!(consumer_id, "event for an unknown consumer");
        return Ok(());
    };
    match sender.try_send(event) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        // Messages are bounded by the permits the consumer granted; more
        // means the broker ignores flow control.
        Err(mpsc::error::TrySendError::Full(_)) => Err(Error::Protocol {
            address: shared.address.to_string(),
            reason: format!("consumer {consumer_id} received more messages than its permits"),
        }),
    }
}

/// Routes one frame. An error closes the connection.
fn dispatch(shared: &Shared, outbound: &mpsc::Sender<Outbound>, frame: Frame) -> Result<()> {
    let missing_body = |kind: CommandType| Error::Protocol {
        address: shared.address.to_string(),
        reason: format!("{} without its body", kind.as_str_name()),
    };
    let payload = match frame {
        Frame::Payload(payload) => payload,
        Frame::Simple(command) => {
            return dispatch_command(shared, outbound, *command, missing_body)
        }
    };
    let payload = *payload;
    let Some(message) = payload.command.message else {
        tracing::warn!(
            command_type = payload.command.r#type,
            "ignoring a payload frame that is not a MESSAGE"
        );
        return Ok(());
    };
    let consumer_id = message.consumer_id;
    deliver_to_consumer(
        shared,
        consumer_id,
        ConsumerEvent::Message(Box::new((message, payload.entry))),
    )
}

fn dispatch_command(
    shared: &Shared,
    outbound: &mpsc::Sender<Outbound>,
    base: BaseCommand,
    missing_body: impl Fn(CommandType) -> Error,
) -> Result<()> {
    let Some(kind) = command_type(&base) else {
        tracing::debug!(
            command_type = base.r#type,
            "ignoring a command of unknown type"
        );
        return Ok(());
    };
    match kind {
        CommandType::Ping => {
            let pong = BaseCommand {
                pong: Some(CommandPong {}),
                ..command(CommandType::Pong)
            };
            // If the queue is full the connection is visibly alive anyway.
            let _ = outbound.try_send(Outbound::Frame(encode(&pong)?));
            Ok(())
        }
        CommandType::Pong => Ok(()),
        CommandType::Error => {
            let error = base.error.ok_or_else(|| missing_body(kind))?;
            complete(
                shared,
                error.request_id,
                Err(Error::server(error.error, error.message)),
            );
            Ok(())
        }
        CommandType::ProducerSuccess
            if base
                .producer_success
                .as_ref()
                .is_some_and(|success| !success.producer_ready()) =>
        {
            // An exclusive producer queued behind another; a second
            // PRODUCER_SUCCESS with the same request id follows when it is ready.
            tracing::info!("producer waits for exclusive access");
            Ok(())
        }
        CommandType::Success
        | CommandType::ProducerSuccess
        | CommandType::PartitionedMetadataResponse
        | CommandType::LookupResponse
        | CommandType::GetLastMessageIdResponse
        | CommandType::GetTopicsOfNamespaceResponse
        | CommandType::GetSchemaResponse
        | CommandType::GetOrCreateSchemaResponse
        | CommandType::ConsumerStatsResponse
        | CommandType::ReplicatedSubscriptionStateResponse => {
            let request_id = reply_request_id(&base, kind).ok_or_else(|| missing_body(kind))?;
            complete(shared, request_id, Ok(base));
            Ok(())
        }
        CommandType::AckResponse => {
            if let Some(request_id) = reply_request_id(&base, kind) {
                complete(shared, request_id, Ok(base));
            }
            Ok(())
        }
        CommandType::SendReceipt => {
            let receipt = base.send_receipt.ok_or_else(|| missing_body(kind))?;
            deliver_to_producer(shared, receipt.producer_id, ProducerEvent::Receipt(receipt))
        }
        CommandType::SendError => {
            let error = base.send_error.ok_or_else(|| missing_body(kind))?;
            deliver_to_producer(shared, error.producer_id, ProducerEvent::SendError(*error))
        }
        CommandType::CloseProducer => {
            let close = base.close_producer.ok_or_else(|| missing_body(kind))?;
            deliver_to_producer(shared, close.producer_id, ProducerEvent::Closed)
        }
        CommandType::CloseConsumer => {
            let close = base.close_consumer.ok_or_else(|| missing_body(kind))?;
            deliver_to_consumer(shared, close.consumer_id, ConsumerEvent::Closed)
        }
        CommandType::ActiveConsumerChange => {
            let change = base
                .active_consumer_change
                .ok_or_else(|| missing_body(kind))?;
            deliver_to_consumer(
                shared,
                change.consumer_id,
                ConsumerEvent::ActiveChange(change.is_active()),
            )
        }
        CommandType::ReachedEndOfTopic => {
            let end = base
                .reached_end_of_topic
                .ok_or_else(|| missing_body(kind))?;
            deliver_to_consumer(shared, end.consumer_id, ConsumerEvent::EndOfTopic)
        }
        CommandType::TopicMigrated => {
            let migrated = base.topic_migrated.ok_or_else(|| missing_body(kind))?;
            tracing::info!(
                resource_id = migrated.resource_id,
                broker_service_url = migrated.broker_service_url.as_deref().unwrap_or(""),
                "topic migrated; reconnecting through a new lookup"
            );
            // Resource type 0 is a producer, 1 a consumer.
            if migrated.resource_type == 0 {
                deliver_to_producer(shared, migrated.resource_id, ProducerEvent::Closed)
            } else {
                deliver_to_consumer(shared, migrated.resource_id, ConsumerEvent::Closed)
            }
        }
        CommandType::AuthChallenge => {
            // Answer with the client's credentials (the empty "none" ones without a token).
            let (auth_method_name, auth_data) = credentials(shared.auth_token.as_deref());
            let response = BaseCommand {
                auth_response: Some(Box::new(CommandAuthResponse {
                    client_version: Some(CLIENT_VERSION.to_string()),
                    response: Some(AuthData {
                        auth_method_name: Some(auth_method_name),
                        auth_data: Some(auth_data),
                    }),
                    protocol_version: Some(PROTOCOL_VERSION),
                })),
                ..command(CommandType::AuthResponse)
            };
            let _ = outbound.try_send(Outbound::Frame(encode(&response)?));
            Ok(())
        }
        other => {
            tracing::debug!(
                command = other.as_str_name(),
                "ignoring an unexpected command"
            );
            Ok(())
        }
    }
}
