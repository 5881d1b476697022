//! Entry payloads, with no I/O: how a producer turns messages into the
//! metadata and payload of one SEND, and how a consumer turns a delivered
//! entry back into messages.
//!
//! One message is sent as a plain entry. Several are sent as a batch: one
//! [`MessageMetadata`] for the entry (`num_messages_in_batch = N`, the first
//! message's sequence id, `highest_sequence_id` the last's) and a payload of
//! N `[u32 size][SingleMessageMetadata][payload]` records. Compression
//! applies to the whole payload, with `uncompressed_size` recording the size
//! before it. The record layout itself is read by [`meridian_wire::batch_messages`].

use bytes::{BufMut, Bytes, BytesMut};
use meridian_wire::proto::command_ack::ValidationError;
use meridian_wire::proto::KeyValue;
use meridian_wire::{batch_messages, MessageMetadata, SingleMessageMetadata};
use prost::Message as _;

use crate::compression::Compression;
use crate::error::{Error, Result};
use crate::message::ProducerMessage;

/// A message whose sequence id has been assigned.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SequencedMessage {
    pub(crate) sequence_id: u64,
    pub(crate) message: ProducerMessage,
}

/// The metadata and (compressed) payload of one SEND.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct EncodedEntry {
    pub(crate) metadata: MessageMetadata,
    pub(crate) payload: Bytes,
    /// Sequence id of the first message.
    pub(crate) sequence_id: u64,
    /// Sequence id of the last message.
    pub(crate) highest_sequence_id: u64,
    /// Messages in the entry.
    pub(crate) num_messages: usize,
    /// Whether the entry is a batch (`num_messages_in_batch` is set).
    pub(crate) batched: bool,
}

/// Whether `next` may join a batch that holds `first`: entry-level fields
/// (replication routing, the metadata template) must agree, and delayed
/// messages always travel alone, as Pulsar's clients send them.
pub(crate) fn batch_compatible(first: &ProducerMessage, next: &ProducerMessage) -> bool {
    first.deliver_at.is_none()
        && next.deliver_at.is_none()
        && first.entry.is_none()
        && next.entry.is_none()
        && first.replicated_from == next.replicated_from
        && first.replicate_to == next.replicate_to
        && first.metadata == next.metadata
}

fn key_values(properties: &std::collections::BTreeMap<String, String>) -> Vec<KeyValue> {
    properties
        .iter()
        .map(|(key, value)| KeyValue {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

/// The entry metadata every message of an entry shares, from `first`.
fn entry_metadata(
    first: &SequencedMessage,
    producer_name: &str,
    publish_time_ms: u64,
) -> MessageMetadata {
    let message = &first.message;
    let mut metadata = message.metadata.as_deref().cloned().unwrap_or_default();
    metadata.producer_name = producer_name.to_string();
    metadata.sequence_id = first.sequence_id;
    if metadata.publish_time == 0 {
        metadata.publish_time = publish_time_ms;
    }
    if let Some(from) = &message.replicated_from {
        metadata.replicated_from = Some(from.clone());
    }
    if !message.replicate_to.is_empty() {
        metadata.replicate_to = message.replicate_to.clone();
    }
    // Like Pulsar's default batcher, the entry carries the first message's
    // keys: that is what brokers route Key_Shared deliveries by.
    if let Some(key) = &message.key {
        metadata.partition_key = Some(key.clone());
    }
    if let Some(key) = &message.ordering_key {
        metadata.ordering_key = Some(key.clone());
    }
    metadata.num_messages_in_batch = None;
    metadata.highest_sequence_id = None;
    metadata.compression = None;
    metadata.uncompressed_size = None;
    metadata
}

/// Encodes `messages` (at least one) as one entry: a plain entry for one
/// message, a batch for more.
pub(crate) fn encode_entry(
    messages: &[SequencedMessage],
    producer_name: &str,
    compression: Compression,
    publish_time_ms: u64,
) -> Result<EncodedEntry> {
    let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
        return Err(Error::InvalidConfiguration(
            "an entry needs at least one message".to_string(),
        ));
    };
    if let Some(stored) = &first.message.entry {
        if messages.len() > 1 {
            return Err(Error::InvalidConfiguration(
                "a stored entry is sent on its own".to_string(),
            ));
        }
        let num_messages = stored.num_messages_in_batch.unwrap_or(1).max(1);
        return Ok(EncodedEntry {
            metadata: (**stored).clone(),
            payload: first.message.payload.clone(),
            sequence_id: first.sequence_id,
            highest_sequence_id: first.sequence_id,
            num_messages: usize::try_from(num_messages).unwrap_or(1),
            batched: false,
        });
    }
    let mut metadata = entry_metadata(first, producer_name, publish_time_ms);
    let batched = messages.len() > 1;
    let uncompressed = if batched {
        metadata.num_messages_in_batch = Some(i32::try_from(messages.len()).unwrap_or(i32::MAX));
        metadata.highest_sequence_id = Some(last.sequence_id);
        batch_payload(messages)?
    } else {
        let message = &first.message;
        metadata.properties.extend(key_values(&message.properties));
        metadata.event_time = message.event_time;
        metadata.deliver_at_time = message
            .deliver_at
            .map(|at| i64::try_from(at).unwrap_or(i64::MAX));
        message.payload.clone()
    };
    let uncompressed_size = uncompressed.len();
    let payload = compression.compress(uncompressed)?;
    if compression != Compression::None {
        metadata.compression = Some(compression.wire() as i32);
        metadata.uncompressed_size =
            Some(
                u32::try_from(uncompressed_size).map_err(|_| Error::MessageTooLarge {
                    size: uncompressed_size,
                    max_size: u32::MAX as usize,
                })?,
            );
    }
    Ok(EncodedEntry {
        metadata,
        payload,
        sequence_id: first.sequence_id,
        highest_sequence_id: last.sequence_id,
        num_messages: messages.len(),
        batched,
    })
}

/// `[u32 size][SingleMessageMetadata][payload]` for every message.
fn batch_payload(messages: &[SequencedMessage]) -> Result<Bytes> {
    let mut buffer = BytesMut::new();
    for sequenced in messages {
        let message = &sequenced.message;
        let payload_size =
            i32::try_from(message.payload.len()).map_err(|_| Error::MessageTooLarge {
                size: message.payload.len(),
                max_size: i32::MAX as usize,
            })?;
        let single = SingleMessageMetadata {
            properties: key_values(&message.properties),
            partition_key: message.key.clone(),
            payload_size,
            event_time: message.event_time,
            ordering_key: message.ordering_key.clone(),
            sequence_id: Some(sequenced.sequence_id),
            ..SingleMessageMetadata::default()
        };
        let length = single.encoded_len();
        buffer.reserve(4 + length + message.payload.len());
        buffer.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
        single
            .encode(&mut buffer)
            .map_err(|error| Error::encode(error.into()))?;
        buffer.extend_from_slice(&message.payload);
    }
    Ok(buffer.freeze())
}

/// One message taken out of a delivered entry.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DecodedMessage {
    /// Index in the batch, or -1 for an entry that is not a batch.
    pub(crate) batch_index: i32,
    /// The per-message metadata of a batch member.
    pub(crate) single: Option<SingleMessageMetadata>,
    pub(crate) payload: Bytes,
}

/// Why an entry could not be decoded: the validation error a consumer
/// reports when it acknowledges (and so drops) the entry, and the error.
pub(crate) type DecodeFailure = (ValidationError, Error);

/// Decompresses and un-batches a delivered entry's payload.
///
/// An encrypted payload cannot be read without its key; it is returned
/// whole, as one message, for the application to decrypt.
pub(crate) fn decode_entry(
    topic: &str,
    metadata: &MessageMetadata,
    payload: Bytes,
    max_size: usize,
) -> std::result::Result<Vec<DecodedMessage>, DecodeFailure> {
    if !metadata.encryption_keys.is_empty() {
        return Ok(vec![DecodedMessage {
            batch_index: -1,
            single: None,
            payload,
        }]);
    }
    let compression_number = metadata.compression.unwrap_or(0);
    let Some(compression) = Compression::from_wire(compression_number) else {
        return Err((
            ValidationError::DecompressionError,
            Error::Compression {
                codec: "unknown",
                reason: format!("compression type {compression_number}"),
            },
        ));
    };
    let payload = if compression == Compression::None {
        payload
    } else {
        let size = metadata.uncompressed_size.unwrap_or(0) as usize;
        if size > max_size {
            return Err((
                ValidationError::UncompressedSizeCorruption,
                Error::Compression {
                    codec: compression.name(),
                    reason: format!("uncompressed size {size} exceeds {max_size} bytes"),
                },
            ));
        }
        compression
            .decompress(payload, size, max_size)
            .map_err(|error| (ValidationError::DecompressionError, error))?
    };
    if metadata.num_messages_in_batch.is_none() {
        return Ok(vec![DecodedMessage {
            batch_index: -1,
            single: None,
            payload,
        }]);
    }
    let uncompressed = MessageMetadata {
        compression: None,
        ..metadata.clone()
    };
    let entry_error = |source| {
        (
            ValidationError::BatchDeSerializeError,
            Error::Entry {
                topic: topic.to_string(),
                source: std::sync::Arc::new(source),
            },
        )
    };
    let records = batch_messages(&uncompressed, payload).map_err(entry_error)?;
    let mut messages = Vec::with_capacity(records.size_hint().1.unwrap_or(0).min(1024));
    for (index, record) in records.enumerate() {
        let record = record.map_err(entry_error)?;
        messages.push(DecodedMessage {
            batch_index: i32::try_from(index).unwrap_or(i32::MAX),
            single: Some(record.metadata),
            payload: record.payload,
        });
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequenced(sequence_id: u64, payload: &'static str) -> SequencedMessage {
        SequencedMessage {
            sequence_id,
            message: ProducerMessage::new(payload)
                .with_key(format!("key-{sequence_id}"))
                .with_property("index", sequence_id.to_string())
                .with_event_time(1_000 + sequence_id),
        }
    }

    #[test]
    fn one_message_is_a_plain_entry() {
        let entry =
            encode_entry(&[sequenced(7, "hello")], "p", Compression::None, 42).expect("encode");
        assert!(!entry.batched);
        assert_eq!(entry.metadata.num_messages_in_batch, None);
        assert_eq!(entry.metadata.sequence_id, 7);
        assert_eq!(entry.metadata.publish_time, 42);
        assert_eq!(entry.metadata.partition_key.as_deref(), Some("key-7"));
        assert_eq!(entry.metadata.event_time, Some(1_007));
        let decoded = decode_entry("t", &entry.metadata, entry.payload, 1 << 20).expect("decode");
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].batch_index, -1);
        assert_eq!(&decoded[0].payload[..], b"hello");
    }

    #[test]
    fn a_batch_round_trips_through_every_codec() {
        let messages = vec![
            sequenced(10, "alpha"),
            sequenced(11, ""),
            sequenced(12, "gamma"),
        ];
        for compression in [
            Compression::None,
            Compression::Lz4,
            Compression::Zlib,
            Compression::Zstd,
            Compression::Snappy,
        ] {
            let entry = encode_entry(&messages, "producer-a", compression, 99).expect("encode");
            assert!(entry.batched);
            assert_eq!(entry.num_messages, 3);
            assert_eq!((entry.sequence_id, entry.highest_sequence_id), (10, 12));
            assert_eq!(entry.metadata.num_messages_in_batch, Some(3));
            assert_eq!(entry.metadata.highest_sequence_id, Some(12));
            assert_eq!(entry.metadata.producer_name, "producer-a");
            // The entry-level key is the first message's, as in Pulsar's batcher.
            assert_eq!(entry.metadata.partition_key.as_deref(), Some("key-10"));
            if compression == Compression::None {
                assert_eq!(entry.metadata.compression, None);
            } else {
                assert_eq!(entry.metadata.compression, Some(compression.wire() as i32));
                assert!(entry.metadata.uncompressed_size.is_some());
            }
            let decoded =
                decode_entry("t", &entry.metadata, entry.payload.clone(), 1 << 20).expect("decode");
            let payloads: Vec<&[u8]> = decoded.iter().map(|m| &m.payload[..]).collect();
            assert_eq!(
                payloads,
                vec![&b"alpha"[..], b"", b"gamma"],
                "{compression:?}"
            );
            for (index, message) in decoded.iter().enumerate() {
                let single = message.single.as_ref().expect("batch member metadata");
                let sequence_id = 10 + index as u64;
                assert_eq!(message.batch_index, index as i32);
                assert_eq!(single.sequence_id, Some(sequence_id));
                assert_eq!(single.partition_key, Some(format!("key-{sequence_id}")));
                assert_eq!(single.event_time, Some(1_000 + sequence_id));
                assert_eq!(single.properties[0].value, sequence_id.to_string());
            }
        }
    }

    #[test]
    fn replication_fields_and_templates_reach_the_entry() {
        let template = MessageMetadata {
            publish_time: 5,
            properties: vec![KeyValue {
                key: "__MSG_PROP_REPL_SOURCE_POSITION".into(),
                value: "3:4".into(),
            }],
            ..MessageMetadata::default()
        };
        let message = ProducerMessage::new("x")
            .with_replicated_from("east")
            .with_replicate_to(vec!["west".into()])
            .with_metadata(template)
            .with_deliver_at(77);
        let entry = encode_entry(
            &[SequencedMessage {
                sequence_id: 1,
                message,
            }],
            "pulsar.repl.east",
            Compression::None,
            1_000,
        )
        .expect("encode");
        assert_eq!(
            entry.metadata.publish_time, 5,
            "a template's publish time is kept"
        );
        assert_eq!(entry.metadata.replicated_from.as_deref(), Some("east"));
        assert_eq!(entry.metadata.replicate_to, vec!["west".to_string()]);
        assert_eq!(entry.metadata.deliver_at_time, Some(77));
        assert_eq!(entry.metadata.properties.len(), 1);
    }

    #[test]
    fn batching_keeps_entry_level_fields_apart() {
        let plain = ProducerMessage::new("a");
        assert!(batch_compatible(
            &plain,
            &ProducerMessage::new("b").with_key("k")
        ));
        assert!(!batch_compatible(
            &plain,
            &ProducerMessage::new("b").with_replicated_from("east")
        ));
        assert!(!batch_compatible(
            &plain,
            &ProducerMessage::new("b").with_deliver_at(1)
        ));
        assert!(!batch_compatible(
            &plain,
            &ProducerMessage::new("b").with_metadata(MessageMetadata::default())
        ));
    }

    #[test]
    fn corrupt_entries_are_reported_with_a_validation_error() {
        let entry = encode_entry(
            &[
                sequenced(1, "aaaaaaaaaaaaaaaa"),
                sequenced(2, "bbbbbbbbbbbbbbbbbb"),
            ],
            "p",
            Compression::Lz4,
            1,
        )
        .expect("encode");
        let mut lying = entry.metadata.clone();
        lying.uncompressed_size = Some(1 << 30);
        let (validation, _) =
            decode_entry("t", &lying, entry.payload.clone(), 1 << 20).expect_err("too large");
        assert_eq!(validation, ValidationError::UncompressedSizeCorruption);

        let truncated = entry.payload.slice(..entry.payload.len() / 2);
        let (validation, _) =
            decode_entry("t", &entry.metadata, truncated, 1 << 20).expect_err("truncated");
        assert_eq!(validation, ValidationError::DecompressionError);

        let plain = encode_entry(
            &[sequenced(1, "x"), sequenced(2, "y")],
            "p",
            Compression::None,
            1,
        )
        .expect("encode");
        let mut wrong_count = plain.metadata.clone();
        wrong_count.num_messages_in_batch = Some(5);
        let (validation, _) =
            decode_entry("t", &wrong_count, plain.payload, 1 << 20).expect_err("short batch");
        assert_eq!(validation, ValidationError::BatchDeSerializeError);
    }
}
