//! Meridian's async client for the Apache Pulsar binary protocol.
//!
//! The broker uses it to replicate, and the CLI and benchmarks use it to
//! produce and consume. It speaks protocol version 20 to any
//! Pulsar-compatible broker, not only Meridian: lookups with redirects,
//! producers with batching, compression, send timeouts and
//! reconnect-and-resend, consumers of all four subscription types, readers,
//! partitioned topics and keep-alive.
//!
//! ```no_run
//! # async fn example() -> meridian_client::Result<()> {
//! use meridian_client::{Client, Compression, ProducerMessage, SubscriptionType};
//! use std::time::Duration;
//!
//! let client = Client::builder("pulsar://127.0.0.1:6650").build().await?;
//! let producer = client
//!     .producer("orders")
//!     .batching(100, 128 * 1024, Duration::from_millis(5))
//!     .compression(Compression::Lz4)
//!     .create()
//!     .await?;
//! let id = producer.send_and_wait(ProducerMessage::new("hello").with_key("customer-7")).await?;
//!
//! let consumer = client
//!     .consumer("orders")
//!     .subscription("billing")
//!     .sub_type(SubscriptionType::Shared)
//!     .subscribe()
//!     .await?;
//! let message = consumer.receive().await?;
//! consumer.ack(&message).await?;
//! # let _ = id;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! The modules follow a message from the application to the socket and back:
//!
//! - `client`: [`Client`], its settings, the builders, and the state that
//!   producers and consumers share (the pool, id counters, backoff settings).
//! - `producer`: [`Producer`] handles and one engine task per partition
//!   (batching, sequence ids, the in-flight queue, receipts, send timeouts,
//!   reconnect-and-resend). `routing` picks a partition per message.
//! - `batch`: encoding messages into an entry's metadata and payload, and
//!   decoding a delivered entry back into messages (sans I/O, unit tested);
//!   `compression`: the four codecs.
//! - `consumer`: [`Consumer`] handles and one engine task per partition
//!   (flow control, decoding, batch acknowledgement tracking, negative acks,
//!   seek, resubscription); `queue`: the receiver queue between an engine
//!   and the application; `reader`: [`Reader`], a consumer on a
//!   non-durable subscription.
//! - `pool`: the connection pool and lookup (PARTITIONED_METADATA, LOOKUP
//!   with redirects). `connection`: one TCP (or TLS) connection, its handshake, its
//!   reader and writer tasks, request ids and keep-alive. Frames themselves
//!   are encoded and decoded by [`meridian_wire`]; nothing here touches
//!   protocol bytes directly except the batch record layout.
//! - `subscription_state`: Meridian's REPLICATED_SUBSCRIPTION_STATE command (not Pulsar),
//!   sent by a broker's subscription sync to the broker that owns a topic in another cluster,
//!   if that broker announced it ([`StateAnswer`]).
//! - `tls`: [`TlsOptions`] for `pulsar+ssl://` connections (tokio-rustls) and, through
//!   [`HttpsConnector`] / [`http_agent`], for the `https://` calls of the broker and the CLI.
//! - `backoff`, `topic`, `message_id` ([`MessageId`]), `error` ([`Error`]):
//!   small shared pieces.
//!
//! # Invariants
//!
//! - **Ordering.** A producer assigns sequence ids in the order messages
//!   reach its engine, sends entries in that order, and completes receipts
//!   in that order. A receipt for a later sequence id than the oldest
//!   pending one closes the connection and resends (as Pulsar's C++ client
//!   does). A consumer delivers each partition's messages in the order the
//!   broker sent them.
//! - **Every queue is bounded.** A producer's pending messages by
//!   `max_pending` (a semaphore: `send` waits for room, which is the
//!   back-pressure); its command and receipt channels by the same number; a
//!   connection's outgoing frames by `outbound_queue` (senders wait); a
//!   consumer's incoming events by its receiver queue size plus a margin
//!   (a broker that sends beyond the granted permits has its connection
//!   closed); a consumer's receiver queue by flow control (see `queue`);
//!   requests per connection by `max_pending_requests`; acknowledgements held
//!   while disconnected by a fixed cap; incoming frames by the broker's
//!   `max_message_size` plus padding, and decompressed payloads by the same.
//! - **Resend with original sequence ids.** Each entry is encoded once, at
//!   its first send, and kept until its receipt; after any reconnection the
//!   producer is re-created with the same producer id and name and every
//!   pending frame is resent byte for byte, so a deduplicating broker stores
//!   each message once. A new producer continues from the broker's
//!   `last_sequence_id`.
//! - **No panics on network bytes.** Everything from the socket goes through
//!   [`meridian_wire`]'s checked decoders; sizes from metadata are checked
//!   before they are used; nothing on those paths unwraps.
//! - **Locks are never held across an await.** Shared maps sit behind
//!   `std` mutexes taken for single operations.
//!
//! # Tests
//!
//! Unit tests sit next to the code (batch encoding and decoding, the four
//! codecs, routing, ids, URLs). `tests/fake_broker.rs` scripts brokers that
//! misbehave on demand (redirects, out-of-order receipts, SEND_ERROR,
//! silence). `tests/meridian_broker.rs` runs a real `meridian standalone`
//! per test: build it first with `cargo build -p meridian`, or point
//! `MERIDIAN_BIN` at it. `tests/pulsar_lite.rs` runs against the third-party
//! pulsar-lite broker when `PULSAR_LITE_BIN` is set (see that file).
//!
//! # Not implemented
//!
//! Authentication other than tokens, schemas,
//! encryption (encrypted payloads are delivered as they are), chunking,
//! transactions, batch-index acknowledgements, regex subscriptions.

mod backoff;
mod batch;
mod client;
mod compression;
mod connection;
mod consumer;
mod error;
mod message;
mod message_id;
mod pool;
mod producer;
mod queue;
mod reader;
mod routing;
mod subscription_state;
mod tls;
mod topic;

pub use client::{Client, ClientBuilder};
pub use compression::Compression;
pub use consumer::{Consumer, ConsumerBuilder, InitialPosition, SeekTarget, SubscriptionType};
pub use error::{Error, Result};
pub use message::{Message, ProducerMessage};
pub use message_id::MessageId;
pub use pool::BrokerUrls;
pub use producer::{
    AccessMode, BatchingPolicy, ConnectionWatch, Producer, ProducerBuilder, SendReceipt,
};
pub use reader::{Reader, ReaderBuilder};
pub use routing::{key_hash, key_partition};
pub use subscription_state::{StateAnswer, StateFormat};
pub use tls::{http_agent, HttpsConnector, TlsError, TlsOptions};
pub use topic::{normalize_topic, partition_topic};

/// The protobuf types, for callers that fill in [`ProducerMessage::metadata`]
/// or read [`Message::metadata`].
pub use meridian_wire::proto;
pub use meridian_wire::{MessageMetadata, ServerError};
