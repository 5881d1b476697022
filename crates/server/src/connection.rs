//! One client connection: reads frames, runs commands against the broker, writes responses.
//!
//! Three pieces per connection:
//! - the read loop (this task): decodes frames from a bounded buffer and handles each command;
//! - the writer task: drains the connection's bounded outbound queue into the socket, so a slow
//!   client slows down only the senders to it;
//! - one receipt task per producer: awaits its publishes in order and sends the receipts, so
//!   receipts leave strictly in the order of the SENDs; a CLOSE_PRODUCER is answered once that
//!   task has sent the receipts of every SEND before it (as Pulsar does).
//!
//! Any frame error (too large, truncated, undecodable) closes this connection only.
//!
//! Inbound budget: a frame larger than 64 KiB is read only once its whole size is reserved
//! from a budget all connections share (`max_inbound_frame_buffer_bytes`), so connections
//! that send parts of large frames and stop hold at most that much memory together; while the
//! budget is taken, connections needing it stop reading (small frames are never held up).
//!
//! Handshake deadline: a connection that has not completed CONNECT within `connect_timeout` is
//! closed, however many bytes it sends (a partial CONNECT holds no slot for long).
//!
//! Keep-alive (every `keep_alive_interval`): a connection that sent no *complete* frame for an interval is pinged (without waiting for
//! room in its queue), and closed after two. Handling one command is bounded by the same two
//! intervals, so a client that does not read its answers cannot hold the read loop either.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use meridian_broker::batch_acks;
use meridian_broker::dedup::is_replication_key;
use meridian_broker::outbound::{
    command_frame, outbound_queue, Outbound, OutboundReceiver, OutboundSender,
};
use meridian_broker::replication::chain;
use meridian_broker::replication::received_state;
use meridian_broker::schema::{decode_version, encode_version};
use meridian_broker::{
    AccessMode, Broker, BrokerError, NewConsumer, NewProducer, Publish, PublishFuture, SeekTarget,
    StartPosition, Subscription, SubscriptionType, Topic, TopicName,
};
use meridian_storage::{InitialPosition, KnownChecksum, Position};
use meridian_wire::proto::{
    base_command::Type, command_ack, command_lookup_topic_response,
    command_partitioned_topic_metadata_response, BaseCommand, CommandAck, CommandAckResponse,
    CommandCloseConsumer, CommandCloseProducer, CommandConnected, CommandError, CommandFlow,
    CommandGetLastMessageId, CommandGetLastMessageIdResponse, CommandGetOrCreateSchema,
    CommandGetOrCreateSchemaResponse, CommandGetSchema, CommandGetSchemaResponse,
    CommandGetTopicsOfNamespace, CommandGetTopicsOfNamespaceResponse, CommandLookupTopic,
    CommandLookupTopicResponse, CommandPartitionedTopicMetadata,
    CommandPartitionedTopicMetadataResponse, CommandPing, CommandPong, CommandProducerSuccess,
    CommandRedeliverUnacknowledgedMessages, CommandSeek, CommandSend, CommandSendError,
    CommandSendReceipt, CommandSubscribe, CommandSuccess, CommandUnsubscribe, CompressionType,
    FeatureFlags, KeySharedMode, MessageIdData, MessageMetadata, ServerError,
    SingleMessageMetadata,
};
use meridian_wire::{command_type, ChecksumStatus, Decoded, Frame, FrameError};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::ServerConfig;
use meridian_auth::TopicAction::{Consume, Lookup, Produce};

mod auth;

/// Highest protocol version this broker speaks.
pub const PROTOCOL_VERSION: i32 = 20;
const SERVER_VERSION: &str = concat!("Meridian ", env!("CARGO_PKG_VERSION"));

/// The outcome of a SEND, queued in order for the producer's receipt task.
enum Receipt {
    Pending {
        sequence_id: u64,
        highest_sequence_id: u64,
        publish: PublishFuture,
    },
    Failed {
        sequence_id: u64,
        error: ServerError,
        message: String,
    },
}

struct ProducerSlot {
    key: u64,
    topic: Arc<Topic>,
    name: String,
    receipts: mpsc::Sender<Receipt>,
    /// The task sending the receipts; it ends once `receipts` is dropped and every receipt
    /// queued before has been sent.
    receipt_loop: tokio::task::JoinHandle<()>,
    /// Set when the broker closed the producer (unload, backlog quota); the client re-creates it.
    closed: Arc<AtomicBool>,
}

struct ConsumerSlot {
    key: u64,
    topic: Arc<Topic>,
    subscription: Arc<Subscription>,
    closed: Arc<AtomicBool>,
}

pub(crate) struct Connection {
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    peer: SocketAddr,
    outbound: OutboundSender,
    protocol_version: Option<i32>,
    client_version: String,
    producers: IdMap<ProducerSlot>,
    consumers: IdMap<ConsumerSlot>,
    /// When the last complete frame arrived: single bytes do not keep a connection alive.
    last_frame: Instant,
    /// Who the connection speaks for, and its credentials' refresh (see `auth`).
    auth: auth::AuthState,
    /// The last ACK handled, given back to the decoder to decode the next one into (its list
    /// of message ids reused: about one ACK per delivered message).
    spare_ack: Option<CommandAck>,
    /// The last frame of this read, if it was an individual ACK of one whole entry without a
    /// request id. See [`Connection::handle_at_once`].
    last_whole_ack: Option<RememberedAck>,
}

/// An individual ACK of one whole entry, remembered for the next frame of the same read.
#[derive(Clone, Copy)]
struct RememberedAck {
    /// `(consumer id, position)`.
    whole: (u64, Position),
    /// Whether the entry is known to be acknowledged since: looked up at the first repeat,
    /// not at each ACK (most clients send one per entry, and repeat none).
    acknowledged: bool,
}

/// Why a connection ends early.
struct Close(String);

/// A connection's producers or consumers by the id its client gave them. Looked up for every
/// SEND and ACK, so with a hash of one multiplication instead of SipHash (about 140
/// instructions a lookup, issue 16): the ids are the client's own, and a client that picks
/// colliding ones slows down only its own connection.
type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Hashes a `u64` id with one full multiplication by 2^64 divided by the golden ratio, the two
/// halves of the 128-bit product folded together: every bit of the hash depends on the id's
/// low bits and on its high bits, so ids that differ only in their high bits (say `n << 40`)
/// still spread over the buckets (picked by the low bits) and tags (the high bits).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, id: u64) {
        let product = u128::from(self.0 ^ id) * 0x9e37_79b9_7f4a_7c15;
        // Truncations meant: the low and the high half of the product.
        self.0 = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn command(kind: Type) -> BaseCommand {
    BaseCommand {
        r#type: kind as i32,
        ..BaseCommand::default()
    }
}

fn message_id_of(id: &MessageIdData) -> Position {
    Position::new(id.ledger_id, id.entry_id)
}

/// `(consumer id, position)` if `ack` acknowledges one entry whole, individually, without
/// asking for a response: what the `pulsar` crate sends for each message of a batch.
fn whole_entry_ack(ack: &CommandAck) -> Option<(u64, Position)> {
    match &ack.message_id[..] {
        [id] if ack.ack_type == command_ack::AckType::Individual as i32
            && ack.request_id.is_none()
            && id.ack_set.iter().all(|word| *word == 0) =>
        {
            Some((ack.consumer_id, message_id_of(id)))
        }
        _ => None,
    }
}

/// Runs one plain TCP connection until the client leaves, a frame is bad, or the server shuts
/// down.
pub(crate) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
    inbound_budget: Arc<Semaphore>,
) {
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    run_halves(
        (reader, writer),
        None,
        peer,
        broker,
        config,
        shutdown,
        inbound_budget,
    )
    .await;
}

/// Runs one connection over a TLS stream (see [`run`]).
pub(crate) async fn run_tls(
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
    inbound_budget: Arc<Semaphore>,
) {
    // The role a verified client certificate names (mutual TLS), for CONNECT with method tls.
    let certificate_role = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| meridian_auth::certificate::common_name(leaf.as_ref()));
    let (reader, writer) = tokio::io::split(stream);
    run_halves(
        (reader, writer),
        certificate_role,
        peer,
        broker,
        config,
        shutdown,
        inbound_budget,
    )
    .await;
}

async fn run_halves<R, W>(
    (mut reader, writer): (R, W),
    certificate_role: Option<String>,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
    inbound_budget: Arc<Semaphore>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (outbound, outbound_receiver) = outbound_queue(config.max_outbound_bytes);
    let writer_failed = CancellationToken::new();
    let writer_task = tokio::spawn(write_loop(writer, outbound_receiver, writer_failed.clone()));
    let mut connection = Connection {
        broker,
        config: config.clone(),
        peer,
        outbound,
        protocol_version: None,
        client_version: String::new(),
        producers: IdMap::default(),
        consumers: IdMap::default(),
        last_frame: Instant::now(),
        auth: auth::AuthState::with_certificate_role(certificate_role),
        spare_ack: None,
        last_whole_ack: None,
    };
    let mut buffer = BytesMut::with_capacity(UNRESERVED_FRAME_BYTES);
    // The small-frame buffer, kept while a large frame is read into a buffer of its own, and
    // taken back once that frame is handled: a stream of large frames allocates each frame's
    // bytes once (they become the stored and cached entry), and nothing else per frame.
    let mut small_frames: Option<BytesMut> = None;
    let mut keep_alive = tokio::time::interval(config.keep_alive_interval);
    keep_alive.tick().await;
    let mut credentials_check = tokio::time::interval(config.security.refresh_check_interval());
    credentials_check.tick().await;
    // A grant revoked or a tenant's admin roles changed: producers and consumers re-checked
    // at once (Pulsar re-checks on policy change), not only at the periodic check.
    let mut authorization_changes = connection.broker.authorization_changes();
    let mut watching_authorization = config.security.authorization_enabled();
    let connect_deadline = tokio::time::sleep(config.connect_timeout);
    tokio::pin!(connect_deadline);
    // The part of the inbound budget held for the large frame at the head of the buffer.
    let mut reservation: Option<(usize, OwnedSemaphorePermit)> = None;
    let reason = loop {
        let needed = incomplete_large_frame(&buffer);
        if reservation
            .as_ref()
            .is_some_and(|(held, _)| needed.is_none_or(|needed| *held < needed))
        {
            reservation = None;
        }
        let to_reserve = needed.filter(|_| reservation.is_none());
        tokio::select! {
            permit = inbound_budget
                .clone()
                .acquire_many_owned(u32::try_from(to_reserve.unwrap_or(0)).unwrap_or(u32::MAX)),
                if to_reserve.is_some() =>
            {
                let Ok(permit) = permit else {
                    break "inbound budget closed".to_string();
                };
                let length = to_reserve.unwrap_or(0);
                // Everything buffered is the head of this frame (it is incomplete): it moves
                // to a buffer of exactly the frame's size, so the reads stop at the frame's end
                // and the buffer is never grown (copied) as the frame arrives.
                let mut large = BytesMut::with_capacity(length);
                large.extend_from_slice(&buffer);
                buffer.clear();
                small_frames = Some(std::mem::replace(&mut buffer, large));
                reservation = Some((length, permit));
            }
            read = reader.read_buf(&mut buffer), if to_reserve.is_none() => {
                match read {
                    Ok(0) => break "client closed the connection".to_string(),
                    Ok(_) => {}
                    Err(error) => break format!("read failed: {error}"),
                }
                match connection.handle_buffered(&mut buffer).await {
                    Ok(()) => {}
                    Err(Close(reason)) => break reason,
                }
                // A large frame's room goes once it is handled (its bytes live on as the
                // entry, or are freed): an idle connection holds little.
                if buffer.is_empty() {
                    if let Some(small) = small_frames.take() {
                        buffer = small;
                    } else if buffer.capacity() > UNRESERVED_FRAME_BYTES {
                        buffer = BytesMut::with_capacity(UNRESERVED_FRAME_BYTES);
                    }
                }
            }
            _ = &mut connect_deadline, if connection.protocol_version.is_none() => {
                break format!(
                    "no CONNECT within {} s (connect_timeout_seconds)",
                    config.connect_timeout.as_secs()
                );
            }
            _ = keep_alive.tick() => {
                let idle = connection.last_frame.elapsed();
                if idle > config.keep_alive_interval * 2 {
                    break format!("no complete frame for {} s; keep-alive timed out", idle.as_secs());
                }
                if idle >= config.keep_alive_interval && connection.protocol_version.is_some() {
                    // Never waits: a full queue must not stop this check from running again.
                    let ping = BaseCommand { ping: Some(CommandPing {}), ..command(Type::Ping) };
                    let _ = connection.outbound.try_send(command_frame(&ping));
                }
            }
            changed = authorization_changes.changed(), if watching_authorization => {
                match changed {
                    Ok(()) => connection.enforce_revocations().await,
                    Err(_) => watching_authorization = false,
                }
            }
            _ = credentials_check.tick(), if config.security.authentication_enabled() => {
                if let Err(Close(reason)) = connection.check_credentials().await {
                    break reason;
                }
            }
            _ = writer_failed.cancelled() => break "writing to the client failed".to_string(),
            _ = shutdown.cancelled() => break "broker shutting down".to_string(),
        }
    };
    tracing::debug!(peer = %peer, %reason, "connection closing");
    connection.release();
    drop(connection);
    // What is queued goes out, unless the client does not read it within the keep-alive
    // interval (a second when the broker shuts down): then the socket is closed with the rest.
    let drain = if shutdown.is_cancelled() {
        SHUTDOWN_DRAIN.min(config.keep_alive_interval)
    } else {
        config.keep_alive_interval
    };
    let mut writer_task = writer_task;
    if tokio::time::timeout(drain, &mut writer_task).await.is_err() {
        writer_task.abort();
    }
}

/// Longest producer or consumer name a client may give, and the part of its version string
/// kept: each is copied into stats per producer or consumer, so a frame full of name must not
/// become megabytes per producer.
const CLIENT_NAME_MAX_BYTES: usize = 1024;

/// Why a client-chosen name is refused: longer than [`CLIENT_NAME_MAX_BYTES`].
fn too_long(what: &str, name: Option<&str>) -> Option<String> {
    let length = name.map_or(0, str::len);
    (length > CLIENT_NAME_MAX_BYTES)
        .then(|| format!("{what} of {length} bytes: at most {CLIENT_NAME_MAX_BYTES} bytes"))
}

/// `text` cut to at most `limit` bytes, at a character boundary.
fn truncated(text: &str, limit: usize) -> String {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The most message ids a handled ACK may have room for to be kept for the next one.
const MAX_SPARE_ACK_IDS: usize = 64;

/// Frames up to this size are read without a reservation from the inbound budget; a larger
/// one is read only once its whole size is reserved.
const UNRESERVED_FRAME_BYTES: usize = 64 * 1024;

/// The length of the frame at the head of `buffer` if it is larger than
/// [`UNRESERVED_FRAME_BYTES`] and not complete yet. (A frame beyond the maximum is refused by
/// the decoder before this is asked.)
fn incomplete_large_frame(buffer: &[u8]) -> Option<usize> {
    let size: [u8; 4] = buffer.get(..4)?.try_into().ok()?;
    let length = u32::from_be_bytes(size) as usize + 4;
    (length > UNRESERVED_FRAME_BYTES && length > buffer.len()).then_some(length)
}

/// Time a closing connection's queue has to reach the client when the broker shuts down.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

/// Runs `future` (handling one command) with the keep-alive timeout: a command whose answer
/// cannot be queued because the client does not read must not hold the connection forever.
async fn within_keep_alive<T>(
    config: &ServerConfig,
    future: impl std::future::Future<Output = Result<T, Close>>,
) -> Result<T, Close> {
    let timeout = config.keep_alive_interval * 2;
    tokio::time::timeout(timeout, future)
        .await
        .unwrap_or_else(|_| {
            Err(Close(format!(
                "a command could not be answered within {} s: the client does not read",
                timeout.as_secs()
            )))
        })
}

/// Slices gathered into one vectored write at most (Linux allows 1024 per `writev`; a queued
/// run of MESSAGE frames takes at most `2 × MAX_STAGED_FRAMES` = 256).
const MAX_WRITE_SLICES: usize = 512;
/// Bytes gathered into one vectored write at most (unless its one frame or run is larger):
/// the queue's room is freed after each write.
const MAX_WRITE_BYTES: usize = 1024 * 1024;

/// Drains the outbound queue into the socket: whatever is queued (up to the limits above) goes
/// out in one vectored write, headers and stored entries as they are, without copying them
/// into a buffer first.
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: OutboundReceiver,
    failed: CancellationToken,
) {
    // Grown as the connection's writes need it and kept: an idle connection holds none.
    let mut batch: Vec<Outbound> = Vec::new();
    // An item received that did not fit in the previous write: the next one starts with it.
    let mut carried: Option<Outbound> = None;
    loop {
        let first = match carried.take() {
            Some(frame) => frame,
            None => {
                let Some(frame) = frames.recv().await else {
                    break;
                };
                // Let the tasks that are ready now queue their frames first (issue 16): the
                // receipts of one flush come from as many producers' receipt tasks, each of
                // which wakes this writer, and tokio runs the task woken last right after the
                // one that woke it; without the yield most of those receipts went out in a
                // `writev` of their own. The yield lasts until this worker's run queue is
                // empty, or 61 tasks at the most.
                tokio::task::yield_now().await;
                frame
            }
        };
        let mut bytes = 0;
        let mut charged = 0;
        let mut slices = 0;
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            if !batch.is_empty()
                && (slices + frame.slices() > MAX_WRITE_SLICES
                    || bytes + frame.len() > MAX_WRITE_BYTES)
            {
                carried = Some(frame);
                break;
            }
            bytes += frame.len();
            charged += frame.charge();
            slices += frame.slices();
            batch.push(frame);
            if slices >= MAX_WRITE_SLICES || bytes >= MAX_WRITE_BYTES {
                break;
            }
            next = frames.try_recv();
        }
        if write_all_vectored(&mut writer, &batch, slices)
            .await
            .is_err()
        {
            failed.cancel();
            return;
        }
        frames.written(charged);
        batch.clear();
    }
    let _ = writer.shutdown().await;
}

/// Writes every frame, in order, with as few `writev` calls as the socket allows; `parts` is
/// how many slices the frames make ([`Outbound::slices`], counted by the caller as it
/// gathered them).
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frames: &[Outbound],
    parts: usize,
) -> std::io::Result<()> {
    // Sized first: collected from a filter, the list would grow step by step.
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts);
    for frame in frames {
        match frame {
            Outbound::Frame(frame) => slices.push(IoSlice::new(frame)),
            Outbound::Payloads(run) => {
                for message in run.frames() {
                    slices.push(IoSlice::new(&message.header));
                    slices.push(IoSlice::new(&message.entry));
                }
            }
        }
    }
    slices.retain(|slice| !slice.is_empty());
    let mut remaining = &mut slices[..];
    while !remaining.is_empty() {
        let written = writer.write_vectored(remaining).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut remaining, written);
    }
    Ok(())
}

impl Connection {
    async fn send(&self, frame: Outbound) {
        // Fails only if the writer is gone, and then the connection is closing anyway.
        let _ = self.outbound.send(frame).await;
    }

    /// Encodes `command` at once and returns the future that queues it: an `async fn` would
    /// keep the `BaseCommand` (about 1 KiB) in its state, and so in every handler's future that
    /// awaits it, which is moved whole for every frame (issue 16). Callers bind the returned
    /// future in a statement of its own (`let sending = self.send_command(…); sending.await;`):
    /// written as one statement, the `BaseCommand` temporary would live across the await.
    fn send_command(&self, command: BaseCommand) -> impl std::future::Future<Output = ()> + '_ {
        self.send(command_frame(&command))
    }

    async fn success(&self, request_id: u64) {
        let sending = self.send_command(BaseCommand {
            success: Some(Box::new(CommandSuccess {
                request_id,
                schema: None,
            })),
            ..command(Type::Success)
        });
        sending.await;
    }

    async fn error(&self, request_id: u64, error: ServerError, message: impl Into<String>) {
        let sending = self.send_command(BaseCommand {
            error: Some(Box::new(CommandError {
                request_id,
                error: error as i32,
                message: message.into(),
            })),
            ..command(Type::Error)
        });
        sending.await;
    }

    async fn broker_error(&self, request_id: u64, error: &BrokerError) {
        self.error(request_id, error.server_error(), error.to_string())
            .await;
    }

    /// Handles every complete frame in the buffer.
    async fn handle_buffered(&mut self, buffer: &mut BytesMut) -> Result<(), Close> {
        // The frames of one read arrived together: the clock is read once for them, not once
        // per frame (about one ACK per delivered message; issue 16).
        let mut stamped = false;
        self.last_whole_ack = None;
        loop {
            match meridian_wire::decode_frame_or_ack_reusing(
                buffer,
                self.config.max_frame_size,
                &mut self.spare_ack,
            ) {
                Ok(Some(decoded)) => {
                    if !stamped {
                        self.last_frame = Instant::now();
                        stamped = true;
                    }
                    // ACK and FLOW (about one per message) without a future; for the other
                    // commands `handle`'s future is moved once, into a box, and kept small
                    // (about 2 KiB; see `handle`).
                    match self.handle_at_once(decoded) {
                        Ok(None) => {}
                        Ok(Some(response)) => {
                            within_keep_alive(&self.config, async {
                                self.send(response).await;
                                Ok(())
                            })
                            .await?
                        }
                        Err(frame) => {
                            // `handle` borrows the connection mutably.
                            let config = self.config.clone();
                            within_keep_alive(&config, Box::pin(self.handle(frame))).await?;
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(FrameError::InvalidEntry { command, source }) => {
                    self.last_frame = Instant::now();
                    self.last_whole_ack = None;
                    // A SEND whose entry does not parse: refuse that message, keep the order.
                    if let Some(send) = command.send.as_ref() {
                        if let Some(producer) = self.producers.get(&send.producer_id) {
                            let refusal = producer.receipts.send(Receipt::Failed {
                                sequence_id: send.sequence_id,
                                error: ServerError::NotAllowedError,
                                message: format!("malformed message: {source}"),
                            });
                            within_keep_alive(&self.config, async {
                                let _ = refusal.await;
                                Ok(())
                            })
                            .await?;
                            continue;
                        }
                    }
                    return Err(Close(format!("malformed frame: {source}")));
                }
                Err(error) => {
                    tracing::warn!(peer = %self.peer, %error, "closing connection after a bad frame");
                    return Err(Close(format!("bad frame: {error}")));
                }
            }
        }
    }

    /// ACK and FLOW, about one per delivered message, handled without creating and boxing
    /// `handle`'s future: `Ok` with the response to send, if any; `Err` gives any other frame
    /// back (and every frame before CONNECT, which `handle` refuses).
    fn handle_at_once(&mut self, decoded: Decoded) -> Result<Option<Outbound>, Frame> {
        // Remembered only from one frame to the next: every other frame forgets it.
        let remembered = self.last_whole_ack.take();
        if self.protocol_version.is_none() {
            return Err(decoded.into_frame());
        }
        let frame = match decoded {
            // Most ACK frames: decoded without a `BaseCommand` (`decode_frame_or_ack_reusing`).
            Decoded::Ack(ack) => {
                // The `pulsar` crate acknowledges a batch message by message, each ACK naming
                // the batch's entry whole: the first acknowledges the entry, and the next ones,
                // read with it, change nothing. They are settled here, as if handled at the
                // same instant as the first (this read, with nothing awaited in between),
                // without the subscription's and the log's locks.
                // Only once the entry is acknowledged: one refused (at `cursor_max_ranges`) or
                // not written yet is tried again by the next ACK naming it.
                let whole = whole_entry_ack(&ack);
                let settled = remembered.filter(|remembered| {
                    whole == Some(remembered.whole)
                        && (remembered.acknowledged || self.acknowledged(remembered.whole))
                });
                let response = match settled {
                    Some(remembered) => {
                        self.last_whole_ack = Some(RememberedAck {
                            acknowledged: true,
                            ..remembered
                        });
                        None
                    }
                    None => {
                        let response = self.handle_ack(&ack);
                        self.last_whole_ack = whole.map(|whole| RememberedAck {
                            whole,
                            acknowledged: false,
                        });
                        response
                    }
                };
                // Kept only if small: an ACK of many ids (a frame may hold hundreds of
                // thousands) is not held for the life of the connection.
                if ack.message_id.capacity() <= MAX_SPARE_ACK_IDS {
                    self.spare_ack = Some(ack);
                }
                return Ok(response);
            }
            Decoded::Frame(frame) => frame,
        };
        match frame {
            Frame::Simple(mut command) => match command_type(&command) {
                Some(Type::Ack) if command.ack.is_some() => {
                    Ok(self.handle_ack(command.ack.as_ref().expect("checked above")))
                }
                Some(Type::Flow) if command.flow.is_some() => {
                    self.handle_flow(command.flow.take().expect("checked above"));
                    Ok(None)
                }
                _ => Err(Frame::Simple(command)),
            },
            frame => Err(frame),
        }
    }

    /// Handles one frame (ACK and FLOW come here only when [`Self::handle_at_once`] could not
    /// take them). SEND and pings are handled here, the others in [`Self::handle_other`]
    /// behind a box: this future is created for every frame, and its size is the union of
    /// what the handlers it awaits keep across their awaits — with every handler and a
    /// `BaseCommand` (4 KiB before its large commands were boxed) held by value in it, creating
    /// it cost a memmove of that size per frame, a third of the broker's CPU per delivered
    /// message (issue 16).
    async fn handle(&mut self, frame: Frame) -> Result<(), Close> {
        let kind = command_type(frame.command());
        if self.protocol_version.is_none() && kind != Some(Type::Connect) {
            self.audit_before_connect(kind);
            self.error(
                0,
                ServerError::NotAllowedError,
                "the first command must be CONNECT",
            )
            .await;
            return Err(Close("command before CONNECT".into()));
        }
        match (kind, frame) {
            (Some(Type::Send), Frame::Payload(mut payload)) => match payload.command.send.take() {
                Some(send) => self.handle_send(send, payload.entry).await,
                None => Err(Close("SEND without its body".into())),
            },
            (Some(Type::Ping), _) => {
                let sending = self.send_command(BaseCommand {
                    pong: Some(CommandPong {}),
                    ..command(Type::Pong)
                });
                sending.await;
                Ok(())
            }
            (Some(Type::Pong), _) => Ok(()),
            (kind, frame) => Box::pin(self.handle_other(kind, frame)).await,
        }
    }

    /// Every command but those [`Self::handle`] takes on itself.
    async fn handle_other(&mut self, kind: Option<Type>, frame: Frame) -> Result<(), Close> {
        let base = match frame {
            Frame::Simple(command) => *command,
            Frame::Payload(payload) => payload.command,
        };
        match (kind, base) {
            (Some(Type::Connect), base) => self.handle_connect(base).await,
            // A SEND frame without an entry (or an entry without its SEND).
            (Some(Type::Send), _) => Err(Close("SEND without its body".into())),
            (
                Some(Type::PartitionedMetadata),
                BaseCommand {
                    partitioned_metadata: Some(request),
                    ..
                },
            ) => self.handle_partitioned_metadata(*request).await,
            (
                Some(Type::Lookup),
                BaseCommand {
                    lookup: Some(request),
                    ..
                },
            ) => self.handle_lookup(*request).await,
            (Some(Type::Producer), base) => self.handle_producer(base).await,
            (
                Some(Type::CloseProducer),
                BaseCommand {
                    close_producer: Some(request),
                    ..
                },
            ) => self.handle_close_producer(*request).await,
            (
                Some(Type::Subscribe),
                BaseCommand {
                    subscribe: Some(request),
                    ..
                },
            ) => {
                self.handle_subscribe(*request).await;
                Ok(())
            }
            (
                Some(Type::RedeliverUnacknowledgedMessages),
                BaseCommand {
                    redeliver_unacknowledged_messages: Some(request),
                    ..
                },
            ) => {
                self.handle_redeliver_unacknowledged_messages(*request)
                    .await
            }
            (
                Some(Type::Unsubscribe),
                BaseCommand {
                    unsubscribe: Some(request),
                    ..
                },
            ) => self.handle_unsubscribe(request).await,
            (
                Some(Type::CloseConsumer),
                BaseCommand {
                    close_consumer: Some(request),
                    ..
                },
            ) => self.handle_close_consumer(*request).await,
            (
                Some(Type::Seek),
                BaseCommand {
                    seek: Some(request),
                    ..
                },
            ) => self.handle_seek(*request).await,
            (
                Some(Type::GetLastMessageId),
                BaseCommand {
                    get_last_message_id: Some(request),
                    ..
                },
            ) => self.handle_get_last_message_id(request).await,
            (
                Some(Type::GetTopicsOfNamespace),
                BaseCommand {
                    get_topics_of_namespace: Some(request),
                    ..
                },
            ) => self.handle_get_topics_of_namespace(*request).await,
            (
                Some(Type::GetSchema),
                BaseCommand {
                    get_schema: Some(request),
                    ..
                },
            ) => self.handle_get_schema(*request).await,
            (
                Some(Type::GetOrCreateSchema),
                BaseCommand {
                    get_or_create_schema: Some(request),
                    ..
                },
            ) => self.handle_get_or_create_schema(*request).await,
            (Some(Type::AuthResponse), base) => self.handle_auth_response(base).await,
            (
                Some(Type::ReplicatedSubscriptionState),
                BaseCommand {
                    replicated_subscription_state: Some(request),
                    ..
                },
            ) => {
                // Meridian's extension: another cluster's replicated subscription state; the
                // permission is the admin endpoint's (a replicating role).
                match self.authorize_replication("REPLICATED_SUBSCRIPTION_STATE", &request.topic) {
                    Ok(()) => {
                        let (broker, outbound) = (self.broker.clone(), self.outbound.clone());
                        received_state::take_command(broker, *request, outbound).await;
                    }
                    Err(reason) => {
                        let refusal = received_state::refusal(
                            request.request_id,
                            ServerError::AuthorizationError,
                            reason,
                            None,
                        );
                        self.send(received_state::answer(refusal)).await;
                    }
                }
                Ok(())
            }
            (kind, base) => {
                let request_id = request_id_of(&base);
                let message = match kind {
                    // A command handled above whose body did not match: it is missing.
                    Some(kind) if HANDLED_WITH_BODY.contains(&kind) => {
                        format!("command {} without its body", kind.as_str_name())
                    }
                    Some(kind) => format!("command {} is not supported", kind.as_str_name()),
                    None => format!("command type {} is not supported", base.r#type),
                };
                self.error(request_id, ServerError::NotAllowedError, message)
                    .await;
                Ok(())
            }
        }
    }

    async fn handle_partitioned_metadata(
        &mut self,
        request: CommandPartitionedTopicMetadata,
    ) -> Result<(), Close> {
        if let Err(reason) = self.authorize("PARTITIONED_METADATA", &request.topic, Lookup) {
            self.deny_partitioned_metadata(request.request_id, reason)
                .await;
            return Ok(());
        }
        let response = match TopicName::parse(&request.topic).and_then(|name| {
            self.broker
                .partitioned_metadata(&name, request.metadata_auto_creation_enabled())
        }) {
            Ok(partitions) => CommandPartitionedTopicMetadataResponse {
                partitions: Some(partitions),
                request_id: request.request_id,
                response: Some(
                    command_partitioned_topic_metadata_response::LookupType::Success as i32,
                ),
                ..Default::default()
            },
            Err(error) => CommandPartitionedTopicMetadataResponse {
                request_id: request.request_id,
                response: Some(
                    command_partitioned_topic_metadata_response::LookupType::Failed as i32,
                ),
                error: Some(error.server_error() as i32),
                message: Some(error.to_string()),
                ..Default::default()
            },
        };
        let sending = self.send_command(BaseCommand {
            partitioned_metadata_response: Some(Box::new(response)),
            ..command(Type::PartitionedMetadataResponse)
        });
        sending.await;
        Ok(())
    }

    async fn handle_lookup(&mut self, request: CommandLookupTopic) -> Result<(), Close> {
        if let Err(reason) = self.authorize("LOOKUP", &request.topic, Lookup) {
            self.deny_lookup(request.request_id, reason).await;
            return Ok(());
        }
        let response = match TopicName::parse(&request.topic) {
            // The topic's tenant moved (or is moving) to another cluster: send the client there.
            Ok(name) if meridian_broker::migration::redirect(&self.broker, &name).is_some() => {
                CommandLookupTopicResponse {
                    broker_service_url: meridian_broker::migration::redirect(&self.broker, &name)
                        .map(|urls| urls.broker_service_url),
                    response: Some(command_lookup_topic_response::LookupType::Redirect as i32),
                    request_id: request.request_id,
                    authoritative: Some(true),
                    ..Default::default()
                }
            }
            // Cluster mode: the bundle's owner (this broker takes an unowned bundle).
            Ok(name) if self.broker.cluster().is_some() => {
                lookup_in_cluster(&self.broker, &name, request.request_id).await
            }
            Ok(_) => CommandLookupTopicResponse {
                broker_service_url: Some(self.broker.config().broker_service_url.clone()),
                broker_service_url_tls: self.broker.config().broker_service_url_tls.clone(),
                response: Some(command_lookup_topic_response::LookupType::Connect as i32),
                request_id: request.request_id,
                authoritative: Some(true),
                ..Default::default()
            },
            Err(error) => CommandLookupTopicResponse {
                response: Some(command_lookup_topic_response::LookupType::Failed as i32),
                request_id: request.request_id,
                error: Some(error.server_error() as i32),
                message: Some(error.to_string()),
                ..Default::default()
            },
        };
        let sending = self.send_command(BaseCommand {
            lookup_response: Some(Box::new(response)),
            ..command(Type::LookupResponse)
        });
        sending.await;
        Ok(())
    }

    async fn handle_close_producer(&mut self, request: CommandCloseProducer) -> Result<(), Close> {
        let Some(producer) = self.producers.remove(&request.producer_id) else {
            self.success(request.request_id).await;
            return Ok(());
        };
        producer.topic.remove_producer(producer.key);
        // As from Pulsar, the close is answered after the receipts of the sends before it: a
        // client fails the sends still without a receipt when its close succeeds, so a receipt
        // sent after the SUCCESS would report a stored message as failed. Awaited on a task of
        // its own, so that this connection's other producers and consumers go on meanwhile.
        let ProducerSlot {
            receipts,
            receipt_loop,
            ..
        } = producer;
        drop(receipts);
        let outbound = self.outbound.clone();
        let success = command_frame(&BaseCommand {
            success: Some(Box::new(CommandSuccess {
                request_id: request.request_id,
                schema: None,
            })),
            ..command(Type::Success)
        });
        tokio::spawn(async move {
            let _ = receipt_loop.await;
            let _ = outbound.send(success).await;
        });
        Ok(())
    }

    fn handle_flow(&mut self, request: CommandFlow) {
        if let Some(consumer) = self.live_consumer(request.consumer_id) {
            consumer
                .subscription
                .flow(consumer.key, request.message_permits);
        }
    }

    async fn handle_redeliver_unacknowledged_messages(
        &mut self,
        request: CommandRedeliverUnacknowledgedMessages,
    ) -> Result<(), Close> {
        if let Some(consumer) = self.live_consumer(request.consumer_id) {
            let positions = (!request.message_ids.is_empty())
                .then(|| request.message_ids.iter().map(message_id_of).collect());
            consumer.subscription.redeliver(consumer.key, positions);
        }
        Ok(())
    }

    async fn handle_unsubscribe(&mut self, request: CommandUnsubscribe) -> Result<(), Close> {
        match self.consumers.get(&request.consumer_id) {
            None => {
                self.error(
                    request.request_id,
                    ServerError::ConsumerNotFound,
                    "no such consumer",
                )
                .await
            }
            Some(consumer) => match consumer
                .topic
                .unsubscribe(&consumer.subscription.name, consumer.key)
            {
                Ok(()) => {
                    self.consumers.remove(&request.consumer_id);
                    self.success(request.request_id).await;
                }
                Err(error) => self.broker_error(request.request_id, &error).await,
            },
        }
        Ok(())
    }

    async fn handle_close_consumer(&mut self, request: CommandCloseConsumer) -> Result<(), Close> {
        if let Some(consumer) = self.consumers.remove(&request.consumer_id) {
            consumer
                .topic
                .remove_consumer(&consumer.subscription.name, consumer.key);
        }
        self.success(request.request_id).await;
        Ok(())
    }

    async fn handle_seek(&mut self, request: CommandSeek) -> Result<(), Close> {
        let Some(consumer) = self.consumers.get(&request.consumer_id) else {
            self.error(
                request.request_id,
                ServerError::ConsumerNotFound,
                "no such consumer",
            )
            .await;
            return Ok(());
        };
        let target = match (&request.message_id, request.message_publish_time) {
            (Some(id), _) if id.ledger_id == u64::MAX => SeekTarget::Earliest,
            (Some(id), _) if id.ledger_id == i64::MAX as u64 => SeekTarget::Latest,
            (Some(id), _) => SeekTarget::Position(consumer.topic.start_of_message_id(
                message_id_of(id),
                id.batch_index(),
                true,
            )),
            (None, Some(time)) => SeekTarget::PublishTime(time),
            (None, None) => {
                self.error(
                    request.request_id,
                    ServerError::NotAllowedError,
                    "seek needs a message id or a time",
                )
                .await;
                return Ok(());
            }
        };
        match consumer.topic.seek(&consumer.subscription.name, target) {
            Ok(()) => self.success(request.request_id).await,
            Err(error) => self.broker_error(request.request_id, &error).await,
        }
        Ok(())
    }

    async fn handle_get_last_message_id(
        &mut self,
        request: CommandGetLastMessageId,
    ) -> Result<(), Close> {
        let Some(consumer) = self.consumers.get(&request.consumer_id) else {
            self.error(
                request.request_id,
                ServerError::ConsumerNotFound,
                "no such consumer",
            )
            .await;
            return Ok(());
        };
        let partition = Some(consumer.topic.partition_index());
        let log = consumer.topic.log();
        let last = match consumer.topic.last_message_id() {
            Ok(last) => last,
            Err(error) => {
                self.broker_error(request.request_id, &error).await;
                return Ok(());
            }
        };
        let last_message_id = match last {
            Some((position, batch_index)) => MessageIdData {
                ledger_id: position.ledger_id,
                entry_id: position.entry_id,
                partition,
                batch_index: Some(batch_index),
                ..Default::default()
            },
            None => MessageIdData {
                ledger_id: log.current_ledger_id(),
                entry_id: u64::MAX,
                partition,
                batch_index: Some(-1),
                ..Default::default()
            },
        };
        let mark_delete = log
            .mark_delete_position(consumer.subscription.cursor_name())
            .flatten()
            .map(|position| MessageIdData {
                ledger_id: position.ledger_id,
                entry_id: position.entry_id,
                partition,
                ..Default::default()
            });
        let sending = self.send_command(BaseCommand {
            get_last_message_id_response: Some(Box::new(CommandGetLastMessageIdResponse {
                last_message_id,
                request_id: request.request_id,
                consumer_mark_delete_position: mark_delete,
            })),
            ..command(Type::GetLastMessageIdResponse)
        });
        sending.await;
        Ok(())
    }

    async fn handle_get_topics_of_namespace(
        &mut self,
        request: CommandGetTopicsOfNamespace,
    ) -> Result<(), Close> {
        if let Err(reason) = self.authorize_namespace("GET_TOPICS_OF_NAMESPACE", &request.namespace)
        {
            self.deny(request.request_id, reason).await;
            return Ok(());
        }
        match self.broker.topics_of_namespace(&request.namespace) {
            Ok(topics) => {
                self.send_command(BaseCommand {
                    get_topics_of_namespace_response: Some(Box::new(
                        CommandGetTopicsOfNamespaceResponse {
                            request_id: request.request_id,
                            topics,
                            filtered: Some(false),
                            topics_hash: None,
                            changed: Some(true),
                        },
                    )),
                    ..command(Type::GetTopicsOfNamespaceResponse)
                })
                .await
            }
            Err(error) => self.broker_error(request.request_id, &error).await,
        }
        Ok(())
    }

    async fn handle_get_schema(&mut self, request: CommandGetSchema) -> Result<(), Close> {
        if let Err(reason) = self.authorize("GET_SCHEMA", &request.topic, Lookup) {
            self.deny(request.request_id, reason).await;
            return Ok(());
        }
        let version = request.schema_version.as_deref().and_then(decode_version);
        let result = TopicName::parse(&request.topic)
            .and_then(|name| self.broker.schemas().get(&name, version));
        let response = match result {
            Ok(Some((version, schema))) => CommandGetSchemaResponse {
                request_id: request.request_id,
                schema: Some(schema),
                schema_version: Some(encode_version(version).into()),
                ..Default::default()
            },
            Ok(None) => CommandGetSchemaResponse {
                request_id: request.request_id,
                error_code: Some(ServerError::TopicNotFound as i32),
                error_message: Some("topic has no schema".into()),
                ..Default::default()
            },
            Err(error) => CommandGetSchemaResponse {
                request_id: request.request_id,
                error_code: Some(error.server_error() as i32),
                error_message: Some(error.to_string()),
                ..Default::default()
            },
        };
        let sending = self.send_command(BaseCommand {
            get_schema_response: Some(Box::new(response)),
            ..command(Type::GetSchemaResponse)
        });
        sending.await;
        Ok(())
    }

    async fn handle_get_or_create_schema(
        &mut self,
        request: CommandGetOrCreateSchema,
    ) -> Result<(), Close> {
        if let Err(reason) = self.authorize("GET_OR_CREATE_SCHEMA", &request.topic, Produce) {
            self.deny(request.request_id, reason).await;
            return Ok(());
        }
        let result = TopicName::parse(&request.topic)
            .and_then(|name| self.broker.schemas().get_or_create(&name, &request.schema));
        let response = match result {
            Ok(version) => CommandGetOrCreateSchemaResponse {
                request_id: request.request_id,
                schema_version: Some(encode_version(version).into()),
                ..Default::default()
            },
            Err(error) => CommandGetOrCreateSchemaResponse {
                request_id: request.request_id,
                error_code: Some(error.server_error() as i32),
                error_message: Some(error.to_string()),
                ..Default::default()
            },
        };
        let sending = self.send_command(BaseCommand {
            get_or_create_schema_response: Some(Box::new(response)),
            ..command(Type::GetOrCreateSchemaResponse)
        });
        sending.await;
        Ok(())
    }

    async fn handle_connect(&mut self, base: BaseCommand) -> Result<(), Close> {
        if self.protocol_version.is_some() {
            self.error(0, ServerError::NotAllowedError, "already connected")
                .await;
            return Ok(());
        }
        let Some(connect) = base.connect else {
            return Err(Close("CONNECT without its body".into()));
        };
        self.authenticate_connect(&connect).await?;
        let version = connect.protocol_version().clamp(0, PROTOCOL_VERSION);
        self.protocol_version = Some(version);
        // Informational, and copied into every producer's and consumer's stats: kept short.
        self.client_version = truncated(&connect.client_version, CLIENT_NAME_MAX_BYTES);
        tracing::debug!(peer = %self.peer, client = %connect.client_version, version, "client connected");
        let sending = self.send_command(BaseCommand {
            connected: Some(Box::new(CommandConnected {
                server_version: SERVER_VERSION.into(),
                protocol_version: Some(version),
                max_message_size: Some(self.broker.config().max_message_size as i32),
                feature_flags: Some(FeatureFlags {
                    supports_get_partitioned_metadata_without_auto_creation: Some(true),
                    meridian_replicated_subscription_state: Some(
                        self.broker.config().replicated_subscriptions_state_command,
                    ),
                    // The compact form only where the setting allows; 1: the JSON text only.
                    meridian_replicated_subscription_state_version: Some(
                        if self.broker.config().replicated_subscriptions_state_compact {
                            meridian_wire::SUBSCRIPTION_STATE_COMPACT_VERSION
                        } else {
                            1
                        },
                    ),
                    ..Default::default()
                }),
            })),
            ..command(Type::Connected)
        });
        sending.await;
        Ok(())
    }

    async fn handle_producer(&mut self, base: BaseCommand) -> Result<(), Close> {
        let Some(request) = base.producer else {
            return Err(Close("PRODUCER without its body".into()));
        };
        if self
            .producers
            .get(&request.producer_id)
            .is_some_and(|existing| existing.closed.load(Ordering::SeqCst))
        {
            self.producers.remove(&request.producer_id);
        }
        if let Some(existing) = self.producers.get(&request.producer_id) {
            if existing.topic.full_name()
                == TopicName::parse(&request.topic)
                    .map(|name| name.to_string())
                    .unwrap_or_default()
            {
                let response = CommandProducerSuccess {
                    request_id: request.request_id,
                    producer_name: existing.name.clone(),
                    ..Default::default()
                };
                let sending = self.send_command(BaseCommand {
                    producer_success: Some(Box::new(response)),
                    ..command(Type::ProducerSuccess)
                });
                sending.await;
            } else {
                self.error(
                    request.request_id,
                    ServerError::ProducerBusy,
                    "producer id already in use",
                )
                .await;
            }
            return Ok(());
        }
        let limit = self.config.max_producers_per_connection;
        let open = || {
            self.producers
                .values()
                .filter(|producer| !producer.closed.load(Ordering::SeqCst))
                .count()
        };
        if limit > 0 && self.producers.len() >= limit && open() >= limit {
            self.error(
                request.request_id,
                ServerError::NotAllowedError,
                format!(
                    "this connection holds {limit} producers, the maximum \
                     (max_producers_per_connection)"
                ),
            )
            .await;
            return Ok(());
        }
        if let Some(reason) = too_long("producer name", request.producer_name.as_deref()) {
            self.error(request.request_id, ServerError::NotAllowedError, reason)
                .await;
            return Ok(());
        }
        let replicator = request
            .producer_name
            .as_deref()
            .is_some_and(is_replication_key);
        let allowed = self
            .authorize("PRODUCER", &request.topic, Produce)
            .and_then(|()| match replicator {
                true => self.authorize_replication("PRODUCER", &request.topic),
                false => Ok(()),
            });
        if let Err(reason) = allowed {
            self.deny(request.request_id, reason).await;
            return Ok(());
        }
        let name = match TopicName::parse(&request.topic) {
            Ok(name) => name,
            Err(error) => {
                self.broker_error(request.request_id, &error).await;
                return Ok(());
            }
        };
        if let Err(error) = meridian_broker::migration::admit_producer(&self.broker, &name) {
            self.broker_error(request.request_id, &error).await;
            return Ok(());
        }
        let topic = match self.broker.topic(&name, true).await {
            Ok(topic) => topic,
            Err(error) => {
                self.broker_error(request.request_id, &error).await;
                return Ok(());
            }
        };
        let schema_version = match &request.schema {
            Some(schema) => match self.broker.schemas().get_or_create(&name, schema) {
                Ok(version) => Some(encode_version(version)),
                Err(error) => {
                    self.broker_error(request.request_id, &error).await;
                    return Ok(());
                }
            },
            None => None,
        };
        match self.broker.resources().effective_policies(&name) {
            Ok(policies) => {
                let refusal = topic
                    .backlog_quota_breach(&policies)
                    .and_then(|breach| topic.quota_error(breach));
                if let Some(error) = refusal {
                    self.broker_error(request.request_id, &error).await;
                    return Ok(());
                }
            }
            Err(error) => {
                self.broker_error(request.request_id, &error).await;
                return Ok(());
            }
        }
        let key = self.broker.next_key();
        let user_name = request
            .producer_name
            .clone()
            .filter(|name| !name.is_empty());
        let closed = Arc::new(AtomicBool::new(false));
        let grant = match topic.add_producer(
            key,
            NewProducer {
                name: user_name,
                mode: AccessMode::from_wire(request.producer_access_mode.unwrap_or(0)),
                producer_id: request.producer_id,
                sink: self.outbound.clone(),
                closed: closed.clone(),
                address: self.peer.to_string(),
                client_version: self.client_version.clone(),
                protocol_version: self.protocol_version.unwrap_or(0),
            },
        ) {
            Ok(grant) => grant,
            Err(error) => {
                self.broker_error(request.request_id, &error).await;
                return Ok(());
            }
        };
        let (receipts, receipt_queue) = mpsc::channel(self.config.max_pending_sends_per_producer);
        let receipt_loop = tokio::spawn(receipt_loop(
            request.producer_id,
            topic.name.to_string(),
            receipt_queue,
            self.outbound.clone(),
        ));
        self.producers.insert(
            request.producer_id,
            ProducerSlot {
                key,
                topic,
                name: grant.name.clone(),
                receipts,
                receipt_loop,
                closed,
            },
        );
        let success = |ready: bool| BaseCommand {
            producer_success: Some(Box::new(CommandProducerSuccess {
                request_id: request.request_id,
                producer_name: grant.name.clone(),
                last_sequence_id: Some(grant.last_sequence_id),
                schema_version: schema_version.clone().map(Into::into),
                topic_epoch: None,
                producer_ready: Some(ready),
            })),
            ..command(Type::ProducerSuccess)
        };
        match grant.ready {
            None => self.send_command(success(true)).await,
            Some(ready) => {
                self.send_command(success(false)).await;
                let outbound = self.outbound.clone();
                let frame = command_frame(&success(true));
                tokio::spawn(async move {
                    if ready.await.is_ok() {
                        let _ = outbound.send(frame).await;
                    }
                });
            }
        }
        Ok(())
    }

    async fn handle_send(
        &mut self,
        send: CommandSend,
        entry: meridian_wire::entry::ParsedEntry,
    ) -> Result<(), Close> {
        let Some(producer) = self.producers.get(&send.producer_id) else {
            let sending = self.send_command(BaseCommand {
                send_error: Some(Box::new(CommandSendError {
                    producer_id: send.producer_id,
                    sequence_id: send.sequence_id,
                    error: ServerError::NotAllowedError as i32,
                    message: "no producer with this id on this connection".into(),
                })),
                ..command(Type::SendError)
            });
            sending.await;
            return Ok(());
        };
        if producer.closed.load(Ordering::SeqCst) {
            // The broker closed this producer; the client resends after re-creating it.
            return Ok(());
        }
        let failure = if let ChecksumStatus::Mismatch { stored, computed } = entry.checksum {
            Some((
                ServerError::ChecksumError,
                format!("checksum mismatch: sent {stored:#x}, computed {computed:#x}"),
            ))
        } else if entry.payload.len() > self.broker.config().max_message_size {
            // The limit is on the payload, as the client cuts chunks by it: metadata rides in the
            // frame padding on top (`FRAME_SIZE_PADDING`), as in Pulsar.
            Some((
                ServerError::NotAllowedError,
                format!(
                    "payload of {} bytes exceeds the maximum message size of {}",
                    entry.payload.len(),
                    self.broker.config().max_message_size
                ),
            ))
        } else if send.message_id.is_some() {
            Some((
                ServerError::NotAllowedError,
                "SEND with a message id is only for shadow topics".into(),
            ))
        } else if let Err(reason) =
            self.authorize_replicated_send(&send, &entry.metadata, producer.topic.full_name())
        {
            Some((ServerError::AuthorizationError, reason))
        } else if let Err(reason) = check_batch_metadata(
            &entry.metadata,
            &entry.payload,
            self.broker.config().max_message_size,
        ) {
            Some((
                ServerError::NotAllowedError,
                format!("invalid message metadata: {reason}"),
            ))
        } else {
            None
        };
        let receipt = match failure {
            Some((error, message)) => Receipt::Failed {
                sequence_id: send.sequence_id,
                error,
                message,
            },
            None => {
                let messages = u64::try_from(send.num_messages.unwrap_or(1).max(1)).unwrap_or(1);
                let highest = send
                    .highest_sequence_id
                    .unwrap_or(0)
                    .max(send.sequence_id.saturating_add(messages - 1));
                // A replicator's entries are de-duplicated by the position they come from.
                let origin = is_replication_key(&producer.name)
                    .then(|| chain::origin_of(&entry.metadata))
                    .flatten();
                let checksum = entry
                    .verified_checksum()
                    .map(|(offset, crc32c)| KnownChecksum { offset, crc32c });
                // This cluster's own entry (not a replicator's, nor a marker): its replication
                // list, for replicated subscriptions to learn it as written.
                let local_replicate_to = (origin.is_none()
                    && entry.metadata.replicated_from.is_none()
                    && entry.metadata.marker_type.is_none())
                .then(|| entry.metadata.replicate_to.clone());
                let publish = Publish {
                    checksum,
                    local_replicate_to,
                    messages,
                    sequence_id: send.sequence_id,
                    highest_sequence_id: highest,
                    entry: entry.bytes,
                    publish_time_ms: entry.metadata.publish_time,
                    origin,
                };
                match producer
                    .topic
                    .publish(producer.key, &producer.name, publish)
                {
                    // Fenced between the check above and the publish (a tenant migration):
                    // dropped unanswered like the ones after it; the client resends it.
                    Err(BrokerError::TenantMigrated(_)) => return Ok(()),
                    Ok(publish) => Receipt::Pending {
                        sequence_id: send.sequence_id,
                        highest_sequence_id: send.highest_sequence_id.unwrap_or(highest),
                        publish,
                    },
                    Err(error) => Receipt::Failed {
                        sequence_id: send.sequence_id,
                        error: error.server_error(),
                        message: error.to_string(),
                    },
                }
            }
        };
        if matches!(receipt, Receipt::Failed { .. }) && is_replication_key(&producer.name) {
            // A replicator's later sends must not be stored before this one: drop the producer
            // so they are ignored; the replicator re-creates it and resends from here.
            producer.closed.store(true, Ordering::SeqCst);
            producer.topic.remove_producer(producer.key);
            tracing::info!(producer = %producer.name, topic = %producer.topic.full_name(), "replicator send failed; producer closed");
        }
        // Waiting here when the producer has too many sends in flight is the back-pressure:
        // this connection stops reading until receipts drain.
        let _ = producer.receipts.send(receipt).await;
        Ok(())
    }

    async fn handle_subscribe(&mut self, request: CommandSubscribe) {
        if let Some(existing) = self.consumers.get(&request.consumer_id) {
            if existing.closed.load(Ordering::SeqCst) {
                self.consumers.remove(&request.consumer_id);
            } else if existing.subscription.name == request.subscription {
                self.success(request.request_id).await;
                return;
            } else {
                self.error(
                    request.request_id,
                    ServerError::ConsumerBusy,
                    "consumer id already in use",
                )
                .await;
                return;
            }
        }
        let limit = self.config.max_consumers_per_connection;
        let open = || {
            self.consumers
                .values()
                .filter(|consumer| !consumer.closed.load(Ordering::SeqCst))
                .count()
        };
        if limit > 0 && self.consumers.len() >= limit && open() >= limit {
            self.error(
                request.request_id,
                ServerError::NotAllowedError,
                format!(
                    "this connection holds {limit} consumers, the maximum \
                     (max_consumers_per_connection)"
                ),
            )
            .await;
            return;
        }
        if let Some(reason) = too_long("consumer name", request.consumer_name.as_deref()) {
            self.error(request.request_id, ServerError::NotAllowedError, reason)
                .await;
            return;
        }
        if let Err(reason) = self.authorize("SUBSCRIBE", &request.topic, Consume) {
            self.deny(request.request_id, reason).await;
            return;
        }
        let name = match TopicName::parse(&request.topic) {
            Ok(name) => name,
            Err(error) => {
                self.broker_error(request.request_id, &error).await;
                return;
            }
        };
        let Some(kind) = SubscriptionType::from_wire(request.sub_type) else {
            self.error(
                request.request_id,
                ServerError::NotAllowedError,
                "unknown subscription type",
            )
            .await;
            return;
        };
        let topic = match self
            .broker
            .topic(&name, request.force_topic_creation())
            .await
        {
            Ok(topic) => topic,
            Err(error) => {
                self.broker_error(request.request_id, &error).await;
                return;
            }
        };
        if let Some(schema) = &request.schema {
            if let Err(error) = self.broker.schemas().get_or_create(&name, schema) {
                self.broker_error(request.request_id, &error).await;
                return;
            }
        }
        let durable = request.durable();
        let limit = self.config.max_subscriptions_per_topic;
        if durable && limit > 0 {
            let existing = topic.subscription_names();
            if existing.len() >= limit && !existing.contains(&request.subscription) {
                self.error(
                    request.request_id,
                    ServerError::NotAllowedError,
                    format!(
                        "topic {name} has {limit} subscriptions, the maximum \
                         (max_subscriptions_per_topic)"
                    ),
                )
                .await;
                return;
            }
        }
        let initial = if request.initial_position()
            == meridian_wire::proto::command_subscribe::InitialPosition::Earliest
        {
            InitialPosition::Earliest
        } else {
            InitialPosition::Latest
        };
        let start = match (&request.start_message_id, durable) {
            (Some(id), false) if id.ledger_id == u64::MAX => {
                StartPosition::Initial(InitialPosition::Earliest)
            }
            (Some(id), false) if id.ledger_id == i64::MAX as u64 => {
                StartPosition::Initial(InitialPosition::Latest)
            }
            (Some(id), false) => StartPosition::At(topic.start_of_message_id(
                message_id_of(id),
                id.batch_index(),
                false,
            )),
            _ => StartPosition::Initial(initial),
        };
        let (sticky_ranges, allow_out_of_order) = match &request.key_shared_meta {
            Some(meta) => (
                if meta.key_shared_mode == KeySharedMode::Sticky as i32 {
                    meta.hash_ranges.clone()
                } else {
                    Vec::new()
                },
                meta.allow_out_of_order_delivery(),
            ),
            None => (Vec::new(), false),
        };
        let key = self.broker.next_key();
        let closed = Arc::new(AtomicBool::new(false));
        let consumer = NewConsumer {
            consumer_id: request.consumer_id,
            name: request.consumer_name.clone().unwrap_or_default(),
            priority: request.priority_level.unwrap_or(0),
            kind,
            sink: self.outbound.clone(),
            closed: closed.clone(),
            sticky_ranges,
            allow_out_of_order,
            replicate_state: request.replicate_subscription_state.unwrap_or(false),
            address: self.peer.to_string(),
            client_version: self.client_version.clone(),
            protocol_version: self.protocol_version.unwrap_or(0),
        };
        if let Err(error) = meridian_broker::migration::admit_consumer(&self.broker, &topic.name) {
            self.broker_error(request.request_id, &error).await;
            return;
        }
        match topic.subscribe(&request.subscription, durable, start, key, consumer) {
            Ok(subscription) => {
                self.consumers.insert(
                    request.consumer_id,
                    ConsumerSlot {
                        key,
                        topic,
                        subscription,
                        closed,
                    },
                );
                self.success(request.request_id).await;
            }
            Err(error) => self.broker_error(request.request_id, &error).await,
        }
    }

    /// Applies an acknowledgement at once; returns the ACK_RESPONSE to send if the client asked
    /// for one (a request id).
    fn handle_ack(&mut self, request: &CommandAck) -> Option<Outbound> {
        let result = match self.live_consumer(request.consumer_id) {
            None => Err((
                ServerError::ConsumerNotFound,
                "no such consumer".to_string(),
            )),
            Some(consumer) => {
                let subscription = &consumer.subscription;
                // A batch entry whose ack set still has unacknowledged messages stays unacked;
                // with batch-index acknowledgements enabled, its acknowledged messages are kept.
                let fully_acked = |id: &MessageIdData| id.ack_set.iter().all(|word| *word == 0);
                if request.ack_type == command_ack::AckType::Cumulative as i32 {
                    if matches!(
                        subscription.kind(),
                        SubscriptionType::Shared | SubscriptionType::KeyShared
                    ) {
                        Err((
                            ServerError::NotAllowedError,
                            "cumulative acknowledgement is not allowed on Shared and Key_Shared subscriptions".to_string(),
                        ))
                    } else {
                        let target = request.message_id.first().and_then(|id| {
                            let position = message_id_of(id);
                            if fully_acked(id) {
                                Some(position)
                            } else {
                                consumer.topic.log().previous_position(position)
                            }
                        });
                        // A cumulative acknowledgement that ends inside a batch: the batch's
                        // first messages are acknowledged (batch-index acknowledgements).
                        let inside_batch: Vec<(Position, Vec<u64>)> = request
                            .message_id
                            .first()
                            .filter(|id| !fully_acked(id))
                            .map(|id| (message_id_of(id), batch_acks::from_wire(&id.ack_set)))
                            .into_iter()
                            .collect();
                        match target {
                            Some(position) => subscription.acknowledge_cumulative(position),
                            None => Ok(()),
                        }
                        .and_then(|()| subscription.acknowledge_batch_indexes(&inside_batch))
                        .map_err(|error| (error.server_error(), error.to_string()))
                    }
                } else {
                    // Clients mostly acknowledge one message per ACK: its position without a
                    // `Vec` (an allocation per acknowledged message otherwise).
                    let one: [Position; 1];
                    let several: Vec<Position>;
                    let positions: &[Position] = match &request.message_id[..] {
                        [id] if fully_acked(id) => {
                            one = [message_id_of(id)];
                            &one
                        }
                        [_] => &[],
                        ids => {
                            several = ids
                                .iter()
                                .filter(|id| fully_acked(id))
                                .map(message_id_of)
                                .collect();
                            &several
                        }
                    };
                    let in_part: Vec<(Position, Vec<u64>)> = request
                        .message_id
                        .iter()
                        .filter(|id| !fully_acked(id))
                        .map(|id| (message_id_of(id), batch_acks::from_wire(&id.ack_set)))
                        .collect();
                    subscription
                        .acknowledge(positions)
                        .and_then(|()| subscription.acknowledge_batch_indexes(&in_part))
                        .map_err(|error| (error.server_error(), error.to_string()))
                }
            }
        };
        if let Err((_, message)) = &result {
            tracing::debug!(peer = %self.peer, %message, "acknowledgement refused");
        }
        let request_id = request.request_id?;
        let (error, message) = match result {
            Ok(()) => (None, None),
            Err((error, message)) => (Some(error as i32), Some(message)),
        };
        Some(command_frame(&BaseCommand {
            ack_response: Some(Box::new(CommandAckResponse {
                consumer_id: request.consumer_id,
                error,
                message,
                request_id: Some(request_id),
                ..Default::default()
            })),
            ..command(Type::AckResponse)
        }))
    }

    /// Whether the subscription of consumer `consumer_id` has acknowledged the entry at
    /// `position` (false without such a consumer).
    fn acknowledged(&self, (consumer_id, position): (u64, Position)) -> bool {
        self.live_consumer(consumer_id)
            .is_some_and(|consumer| consumer.subscription.is_acknowledged(position))
    }

    /// The consumer with this id, unless the broker closed it (seek, unload).
    fn live_consumer(&self, consumer_id: u64) -> Option<&ConsumerSlot> {
        self.consumers
            .get(&consumer_id)
            .filter(|consumer| !consumer.closed.load(Ordering::SeqCst))
    }

    /// Detaches every producer and consumer of this connection from their topics.
    fn release(&mut self) {
        for (_, producer) in self.producers.drain() {
            producer.topic.remove_producer(producer.key);
        }
        for (_, consumer) in self.consumers.drain() {
            consumer
                .topic
                .remove_consumer(&consumer.subscription.name, consumer.key);
        }
    }
}

/// Commands handled by [`Connection::handle`] only with their body.
const HANDLED_WITH_BODY: &[Type] = &[
    Type::ReplicatedSubscriptionState,
    Type::PartitionedMetadata,
    Type::Lookup,
    Type::CloseProducer,
    Type::Subscribe,
    Type::Flow,
    Type::Ack,
    Type::RedeliverUnacknowledgedMessages,
    Type::Unsubscribe,
    Type::CloseConsumer,
    Type::Seek,
    Type::GetLastMessageId,
    Type::GetTopicsOfNamespace,
    Type::GetSchema,
    Type::GetOrCreateSchema,
];

/// Smallest batched message: a 4-byte size and a `SingleMessageMetadata` with its required
/// `payload_size` (2 bytes at least).
const MIN_BATCHED_MESSAGE_BYTES: usize = 6;

/// Checks what consumers will trust in a message's metadata, so that a message no consumer
/// could decode is refused instead of stored for every consumer of the topic. Consumers treat
/// any `num_messages_in_batch` as a batch and allocate `uncompressed_size` bytes to decompress.
fn check_batch_metadata(
    metadata: &MessageMetadata,
    payload: &[u8],
    max_message_size: usize,
) -> Result<(), String> {
    let compressed = metadata.compression.unwrap_or(0) != CompressionType::None as i32;
    let encrypted = !metadata.encryption_keys.is_empty();
    let chunked = metadata
        .num_chunks_from_msg
        .is_some_and(|chunks| chunks > 1);
    let uncompressed_size = metadata.uncompressed_size.unwrap_or(0) as usize;
    if compressed && !chunked && uncompressed_size > max_message_size {
        return Err(format!(
            "uncompressed size {uncompressed_size} exceeds the maximum message size of {max_message_size}"
        ));
    }
    if compressed && uncompressed_size == 0 && !payload.is_empty() {
        return Err("a compressed payload without its uncompressed size".into());
    }
    let Some(count) = metadata.num_messages_in_batch else {
        return Ok(());
    };
    let count =
        usize::try_from(count).map_err(|_| format!("num_messages_in_batch {count} is negative"))?;
    let batch_bytes = if compressed {
        uncompressed_size
    } else {
        payload.len()
    };
    if count.saturating_mul(MIN_BATCHED_MESSAGE_BYTES) > batch_bytes.max(MIN_BATCHED_MESSAGE_BYTES)
    {
        return Err(format!(
            "num_messages_in_batch {count} cannot fit in a batch of {batch_bytes} bytes"
        ));
    }
    if compressed || encrypted || chunked {
        // The batch cannot be read before it is decompressed, decrypted or reassembled.
        return Ok(());
    }
    // A plain batch: every message's metadata and payload must lie within it.
    let mut rest = payload;
    for index in 0..count {
        let size = rest
            .get(..4)
            .map(|bytes| u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize)
            .ok_or_else(|| format!("batched message {index} of {count} is missing"))?;
        let single = rest
            .get(4..4 + size)
            .and_then(|bytes| SingleMessageMetadata::decode(bytes).ok())
            .ok_or_else(|| format!("batched message {index} has no valid metadata"))?;
        let payload_size = usize::try_from(single.payload_size)
            .map_err(|_| format!("batched message {index} has a negative payload size"))?;
        rest = rest
            .get(4 + size + payload_size..)
            .ok_or_else(|| format!("batched message {index} runs past the end of the batch"))?;
    }
    Ok(())
}

/// The request id of a command we refuse, so the client can match the error to its request.
fn request_id_of(base: &BaseCommand) -> u64 {
    base.consumer_stats
        .as_ref()
        .map(|request| request.request_id)
        .unwrap_or(0)
}

/// Sends a producer's receipts in the order of its SENDs. Every publish is awaited even after
/// the connection is gone: completing it records it for de-duplication, without which a resent
/// copy would be answered "may still be in flight" for ever.
async fn receipt_loop(
    producer_id: u64,
    topic: String,
    mut receipts: mpsc::Receiver<Receipt>,
    outbound: OutboundSender,
) {
    let mut connected = true;
    while let Some(receipt) = receipts.recv().await {
        let frame = match receipt {
            Receipt::Pending {
                sequence_id,
                highest_sequence_id,
                publish,
            } => match publish.await {
                Ok(stored) => {
                    // A duplicate that was not stored again is acknowledged with (-1, -1).
                    let (ledger_id, entry_id) = stored
                        .map(|position| (position.ledger_id, position.entry_id))
                        .unwrap_or((u64::MAX, u64::MAX));
                    BaseCommand {
                        send_receipt: Some(CommandSendReceipt {
                            producer_id,
                            sequence_id,
                            message_id: Some(MessageIdData {
                                ledger_id,
                                entry_id,
                                ..Default::default()
                            }),
                            highest_sequence_id: Some(highest_sequence_id),
                        }),
                        ..command(Type::SendReceipt)
                    }
                }
                Err(error) => {
                    // An unavailable topic is logged once, where it is recorded.
                    if !matches!(error, BrokerError::TopicUnavailable { .. }) {
                        tracing::warn!(%topic, producer_id, %error, "publish failed");
                    }
                    send_error(
                        producer_id,
                        sequence_id,
                        error.server_error(),
                        error.to_string(),
                    )
                }
            },
            Receipt::Failed {
                sequence_id,
                error,
                message,
            } => send_error(producer_id, sequence_id, error, message),
        };
        if connected && outbound.send(command_frame(&frame)).await.is_err() {
            connected = false;
        }
    }
}

fn send_error(
    producer_id: u64,
    sequence_id: u64,
    error: ServerError,
    message: String,
) -> BaseCommand {
    BaseCommand {
        send_error: Some(Box::new(CommandSendError {
            producer_id,
            sequence_id,
            error: error as i32,
            message,
        })),
        ..command(Type::SendError)
    }
}

/// How long the broker waits between keep-alive checks by default (Pulsar's 30 s).
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long a new connection has to complete CONNECT by default (Pulsar closes such a
/// connection at its first keep-alive check instead, after 30 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// LOOKUP in cluster mode: `Connect` here when this broker owns (or has just taken) the topic's
/// bundle, else an authoritative `Redirect` to the owner's URLs, as Pulsar answers.
async fn lookup_in_cluster(
    broker: &Broker,
    name: &TopicName,
    request_id: u64,
) -> CommandLookupTopicResponse {
    use meridian_broker::cluster::Owner;
    let Some(cluster) = broker.cluster() else {
        return CommandLookupTopicResponse::default();
    };
    let (urls, kind) = match cluster.lookup(broker, name).await {
        Ok(Owner::This) => (
            (
                broker.config().broker_service_url.clone(),
                broker.config().broker_service_url_tls.clone(),
            ),
            command_lookup_topic_response::LookupType::Connect,
        ),
        Ok(Owner::Other { registration, .. }) => (
            (
                registration.broker_service_url,
                registration.broker_service_url_tls,
            ),
            command_lookup_topic_response::LookupType::Redirect,
        ),
        Err(error) => {
            return CommandLookupTopicResponse {
                response: Some(command_lookup_topic_response::LookupType::Failed as i32),
                request_id,
                error: Some(error.server_error() as i32),
                message: Some(error.to_string()),
                ..Default::default()
            }
        }
    };
    CommandLookupTopicResponse {
        broker_service_url: Some(urls.0),
        broker_service_url_tls: urls.1,
        response: Some(kind as i32),
        request_id,
        authoritative: Some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_broker::outbound::{outbound_queue, OutboundSender, Staged, MAX_STAGED_FRAMES};
    use meridian_wire::PayloadFrame;

    fn batch(messages: &[&[u8]]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for payload in messages {
            let single = SingleMessageMetadata {
                payload_size: payload.len() as i32,
                ..Default::default()
            }
            .encode_to_vec();
            bytes.extend_from_slice(&(single.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&single);
            bytes.extend_from_slice(payload);
        }
        bytes
    }

    fn metadata(count: Option<i32>) -> MessageMetadata {
        MessageMetadata {
            num_messages_in_batch: count,
            ..Default::default()
        }
    }

    /// Ids a client may pick (counting up, or counting in a high field) spread over the buckets
    /// at least as well as random hashes would: the low 10 bits of 1,024 such ids' hashes take
    /// 658–961 distinct values (1,024 random values take about 647).
    #[test]
    fn ids_counting_in_any_bits_spread_over_the_buckets() {
        use std::hash::BuildHasher;
        let hasher = BuildHasherDefault::<IdHasher>::default();
        for shift in [0, 20, 40, 54] {
            let buckets: std::collections::HashSet<u64> = (0..1024u64)
                .map(|n| hasher.hash_one(n << shift) & 1023)
                .collect();
            assert!(
                buckets.len() >= 600,
                "shift {shift}: {} buckets",
                buckets.len()
            );
        }
    }

    /// What a [`Trickle`] socket was given.
    #[derive(Default)]
    struct Seen {
        written: Vec<u8>,
        most_slices: usize,
        /// The most bytes one vectored write was offered.
        most_bytes: usize,
    }

    /// A socket that takes at most `chunk` bytes per write and remembers how many slices each
    /// vectored write was given.
    struct Trickle {
        seen: Arc<std::sync::Mutex<Seen>>,
        chunk: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buffer: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let length = buffer.len().min(self.chunk);
            let mut seen = self.seen.lock().expect("not poisoned");
            seen.written.extend_from_slice(&buffer[..length]);
            std::task::Poll::Ready(Ok(length))
        }

        fn poll_write_vectored(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut seen = self.seen.lock().expect("not poisoned");
            seen.most_slices = seen.most_slices.max(slices.len());
            let offered = slices.iter().map(|slice| slice.len()).sum();
            seen.most_bytes = seen.most_bytes.max(offered);
            let mut written = 0;
            for slice in slices {
                let length = slice.len().min(self.chunk - written);
                seen.written.extend_from_slice(&slice[..length]);
                written += length;
                if written == self.chunk {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(written))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A MESSAGE frame for entry `sequence` of `length` bytes.
    fn message_frame(sequence: u64, length: usize) -> PayloadFrame {
        let command = meridian_wire::proto::CommandMessage {
            consumer_id: sequence,
            message_id: MessageIdData {
                ledger_id: 1,
                entry_id: sequence,
                ..Default::default()
            },
            ..Default::default()
        };
        let entry = bytes::Bytes::from(vec![sequence as u8; length]);
        meridian_wire::encode_message_frame(command, entry).expect("encodes")
    }

    /// Runs the writer over `receiver` into a socket taking 1,000 bytes per write until the
    /// queue's count is back to nothing (bytes leave it once written) and every sender is
    /// gone; what the socket saw.
    async fn written_through(sender: OutboundSender, receiver: OutboundReceiver) -> Seen {
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let socket = Trickle {
            seen: seen.clone(),
            chunk: 1000,
        };
        let writer = tokio::spawn(write_loop(socket, receiver, CancellationToken::new()));
        tokio::time::timeout(Duration::from_secs(60), async {
            while sender.queued_bytes() != 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("everything queued is written");
        drop(sender);
        writer.await.expect("the writer ends with its queue");
        let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
        seen
    }

    /// Dispatch rounds' runs of MESSAGE frames, one-frame runs between them, and runs that do
    /// not fit in the write begun: everything reaches the socket byte for byte, in the order
    /// queued, no write is given more slices than the limit, and the queue's count goes back
    /// to nothing.
    #[tokio::test]
    async fn runs_of_messages_reach_the_socket_in_order_within_the_slice_limit() {
        let (sender, receiver) = outbound_queue(64 * 1024 * 1024);
        let mut expected = Vec::new();
        let mut sequence = 0u64;
        let mut message = |expected: &mut Vec<u8>| {
            sequence += 1;
            let frame = message_frame(sequence, (1 + sequence % 7) as usize * 50);
            expected.extend_from_slice(&frame.to_bytes());
            frame
        };
        let command = |expected: &mut Vec<u8>| {
            let frame = command_frame(&BaseCommand {
                ping: Some(CommandPing {}),
                ..command(Type::Ping)
            });
            let Outbound::Frame(bytes) = &frame else {
                unreachable!("a command is one frame")
            };
            expected.extend_from_slice(bytes);
            frame
        };
        sender.push(command(&mut expected)).expect("queued");
        for run in [
            MAX_STAGED_FRAMES + 3,
            1,
            MAX_STAGED_FRAMES,
            MAX_STAGED_FRAMES,
            40,
        ] {
            let mut staged = Staged::new(&sender);
            for _ in 0..run {
                staged.push(message(&mut expected));
            }
            drop(staged);
            Staged::new(&sender).push(message(&mut expected));
        }
        sender.push(command(&mut expected)).expect("queued");
        assert!(sender.queued_bytes() > expected.len());

        let seen = written_through(sender, receiver).await;
        assert_eq!(seen.written.len(), expected.len());
        assert!(seen.written == expected, "the bytes differ");
        assert!(seen.most_slices <= MAX_WRITE_SLICES, "{}", seen.most_slices);
    }

    /// A round of large messages (64 KiB each, up to the default 8 MiB limit) goes out in
    /// writes of at most about 1 MiB, each of which frees its room: a slow but reading
    /// client's answers wait for room for about 1 MiB of writing, not for the whole round.
    /// (From a hostile review: a round's frames in one run were offered whole to one write.)
    #[tokio::test]
    async fn a_round_of_large_messages_frees_room_write_by_write() {
        let (sender, receiver) = outbound_queue(8 * 1024 * 1024);
        let mut staged = Staged::new(&sender);
        let (mut sequence, mut queued) = (0, 0);
        while sender.has_room() {
            sequence += 1;
            let frame = message_frame(sequence, 64 * 1024);
            queued += frame.frame_length();
            staged.push(frame);
        }
        drop(staged);
        let seen = written_through(sender, receiver).await;
        assert_eq!(seen.written.len(), queued);
        assert!(
            seen.most_bytes <= MAX_WRITE_BYTES,
            "one write was offered {} bytes",
            seen.most_bytes
        );
    }

    #[test]
    fn batches_are_checked_against_their_payload() {
        let limit = 1024 * 1024;
        let payload = batch(&[b"one", b"two", b""]);
        assert!(check_batch_metadata(&metadata(Some(3)), &payload, limit).is_ok());
        assert!(check_batch_metadata(&metadata(None), b"not a batch", limit).is_ok());
        assert!(check_batch_metadata(&metadata(Some(4)), &payload, limit).is_err());
        assert!(check_batch_metadata(&metadata(Some(i32::MAX)), b"plain", limit).is_err());
        assert!(check_batch_metadata(&metadata(Some(-1)), &payload, limit).is_err());
        assert!(check_batch_metadata(&metadata(Some(1)), b"plain payload", limit).is_err());
        let truncated = &payload[..payload.len() - 2];
        assert!(check_batch_metadata(&metadata(Some(3)), truncated, limit).is_err());
    }

    #[test]
    fn compressed_payloads_need_a_plausible_uncompressed_size() {
        let limit = 1024;
        let compressed = |uncompressed_size, count| MessageMetadata {
            compression: Some(CompressionType::Lz4 as i32),
            uncompressed_size: Some(uncompressed_size),
            num_messages_in_batch: count,
            ..Default::default()
        };
        assert!(check_batch_metadata(&compressed(600, Some(100)), b"lz4", limit).is_ok());
        assert!(check_batch_metadata(&compressed(2048, None), b"lz4", limit).is_err());
        assert!(check_batch_metadata(&compressed(0, None), b"lz4", limit).is_err());
        assert!(check_batch_metadata(&compressed(600, Some(1000)), b"lz4", limit).is_err());
    }
}
