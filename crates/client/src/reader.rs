//! Readers: consumers on a non-durable subscription (an in-memory cursor the
//! broker drops when the reader goes), positioned by message id rather than
//! by acknowledgements.
//!
//! A reader acknowledges each entry cumulatively as the application reads
//! it, as Pulsar's Java reader does, so brokers that limit unacknowledged
//! messages per consumer never stall it. After a reconnection it resumes
//! after the last message read.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use crate::client::Client;
use crate::consumer::{Consumer, SeekTarget, SubscriptionType};
use crate::error::Result;
use crate::message::Message;
use crate::message_id::MessageId;

/// Settings of a [`Reader`].
pub struct ReaderBuilder {
    client: Client,
    topic: String,
    start: MessageId,
    inclusive: bool,
    receiver_queue_size: u32,
    name: Option<String>,
    subscription: Option<String>,
}

impl ReaderBuilder {
    pub(crate) fn new(client: Client, topic: String) -> ReaderBuilder {
        ReaderBuilder {
            client,
            topic,
            start: MessageId::LATEST,
            inclusive: false,
            receiver_queue_size: 1000,
            name: None,
            subscription: None,
        }
    }

    /// Where to start: [`MessageId::EARLIEST`], [`MessageId::LATEST`]
    /// (the default) or a message id.
    pub fn start_message_id(mut self, id: MessageId) -> Self {
        self.start = id;
        self
    }

    /// Whether the start message itself is read. Default `false`.
    pub fn start_message_id_inclusive(mut self, inclusive: bool) -> Self {
        self.inclusive = inclusive;
        self
    }

    /// Messages buffered ahead of `read_next`. Default 1000.
    pub fn receiver_queue_size(mut self, size: u32) -> Self {
        self.receiver_queue_size = size;
        self
    }

    /// The reader's consumer name.
    pub fn reader_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The name of its non-durable subscription. Default `reader-<random>`.
    pub fn subscription_name(mut self, name: impl Into<String>) -> Self {
        self.subscription = Some(name.into());
        self
    }

    /// Subscribes.
    pub async fn create(self) -> Result<Reader> {
        let subscription = self.subscription.unwrap_or_else(|| {
            format!(
                "reader-{:012x}",
                RandomState::new().build_hasher().finish() & 0xffff_ffff_ffff
            )
        });
        let mut builder = self
            .client
            .consumer(self.topic)
            .subscription(subscription)
            .sub_type(SubscriptionType::Exclusive)
            .receiver_queue_size(self.receiver_queue_size)
            .non_durable(self.start, self.inclusive);
        if let Some(name) = self.name {
            builder = builder.consumer_name(name);
        }
        Ok(Reader {
            consumer: builder.subscribe().await?,
        })
    }
}

/// Reads a topic from a position; see the module documentation.
pub struct Reader {
    consumer: Consumer,
}

impl Reader {
    /// The full topic name.
    pub fn topic(&self) -> &str {
        self.consumer.topic()
    }

    /// Waits for the next message.
    pub async fn read_next(&self) -> Result<Message> {
        let message = self.consumer.receive().await?;
        // Acknowledge once per entry: at its last member, or a whole entry.
        let last_of_entry = message.id.batch_index < 0
            || u32::try_from(message.id.batch_index)
                .is_ok_and(|index| index + 1 >= message.batch_size);
        if last_of_entry {
            self.consumer.ack_cumulative_id(message.id).await?;
        }
        Ok(message)
    }

    /// Whether [`Reader::read_next`] would return a message without waiting
    /// for a new one to be published.
    pub async fn has_message_available(&self) -> Result<bool> {
        self.consumer.has_message_available().await
    }

    /// Moves the reader: the next message read is `target`'s.
    pub async fn seek(&self, target: SeekTarget) -> Result<()> {
        self.consumer.seek(target).await
    }

    /// Closes the reader (the broker drops its subscription).
    pub async fn close(&self) -> Result<()> {
        self.consumer.close().await
    }
}
