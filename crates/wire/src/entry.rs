//! Entries: the bytes that follow the command in a SEND frame, which are also
//! exactly what a broker stores and later sends after a MESSAGE command.
//!
//! ```text
//! [u16 0x0e02][u32 size][BrokerEntryMetadata]   optional, added by a broker
//! [u16 0x0e01][u32 crc32c]                      optional, added by the producer
//! [u32 metadata_size][MessageMetadata][payload]
//! ```
//!
//! A payload with `num_messages_in_batch` set is a batch of
//! `[u32 size][SingleMessageMetadata][payload_size bytes]` repeated; see
//! [`batch_messages`].
//!
//! Everything here slices the input [`Bytes`]; nothing is copied.

use std::ops::Range;

use bytes::Bytes;
use prost::Message;

use crate::error::EntryError;
use crate::proto::{BrokerEntryMetadata, CompressionType, MessageMetadata, SingleMessageMetadata};
use crate::read;
use crate::{BROKER_ENTRY_METADATA_MAGIC, CHECKSUM_MAGIC};

/// Size of the checksum block: magic and CRC.
const CHECKSUM_BLOCK_LENGTH: usize = 2 + 4;

/// What the checksum block of an entry said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumStatus {
    /// The entry has no 0x0e01 block (producers before protocol v6).
    Absent,
    /// The stored CRC32C matches the metadata and payload.
    Verified,
    /// The stored CRC32C does not match: the metadata or payload is corrupt.
    Mismatch { stored: u32, computed: u32 },
}

impl ChecksumStatus {
    /// Whether the entry carried a checksum block at all.
    pub fn is_present(self) -> bool {
        !matches!(self, ChecksumStatus::Absent)
    }

    /// Whether a checksum was present and matched.
    pub fn is_verified(self) -> bool {
        matches!(self, ChecksumStatus::Verified)
    }
}

/// An entry taken apart.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedEntry {
    /// The broker entry metadata, if the bytes began with a 0x0e02 block.
    pub broker_entry_metadata: Option<BrokerEntryMetadata>,
    /// The entry without any 0x0e02 block, byte for byte:
    /// `[0x0e01 crc][metadata_size][metadata][payload]`. This is what a broker
    /// stores for a SEND.
    pub bytes: Bytes,
    /// The checksum block's verdict.
    pub checksum: ChecksumStatus,
    /// The decoded message metadata.
    pub metadata: MessageMetadata,
    /// The payload after the metadata (a whole batch for a batch entry; still
    /// compressed or encrypted if the metadata says so).
    pub payload: Bytes,
}

impl ParsedEntry {
    /// Where the bytes the producer's checksum covers start in [`ParsedEntry::bytes`], and
    /// that CRC32C, if it was verified: storage derives its record checksum from it instead of
    /// reading the whole entry once more.
    pub fn verified_checksum(&self) -> Option<(usize, u32)> {
        if self.checksum != ChecksumStatus::Verified {
            return None;
        }
        read::u32_at(&self.bytes, 2).map(|crc| (CHECKSUM_BLOCK_LENGTH, crc))
    }
}

/// Takes an entry apart: an optional 0x0e02 block, an optional 0x0e01
/// checksum block (verified here), the metadata and the payload.
///
/// A checksum mismatch is not an error: it is reported in
/// [`ParsedEntry::checksum`] so that the caller can answer with Pulsar's
/// `ChecksumError`. Metadata that does not decode is an error.
pub fn parse_entry(entry: Bytes) -> Result<ParsedEntry, EntryError> {
    let parts = split_entry(entry)?;
    let checksum = match parts.stored_checksum {
        None => ChecksumStatus::Absent,
        Some(stored) => {
            let computed = crc32c::crc32c(&parts.checksummed);
            if computed == stored {
                ChecksumStatus::Verified
            } else {
                ChecksumStatus::Mismatch { stored, computed }
            }
        }
    };
    Ok(ParsedEntry {
        broker_entry_metadata: parts.broker_entry_metadata,
        bytes: parts.bytes,
        checksum,
        metadata: parts.metadata,
        payload: parts.payload,
    })
}

/// An entry's metadata and payload, **without** verifying its checksum (for entries read back
/// from storage, like [`entry_metadata`]).
pub fn entry_parts(entry: Bytes) -> Result<(MessageMetadata, Bytes), EntryError> {
    split_entry(entry).map(|parts| (parts.metadata, parts.payload))
}

/// Decodes only an entry's metadata, **without** verifying its checksum: for entries read back
/// from storage, which verified them when they were published (and checks its own CRC on
/// every record it reads). Saves a pass over the payload per dispatched entry.
pub fn entry_metadata(entry: Bytes) -> Result<MessageMetadata, EntryError> {
    split_entry(entry).map(|parts| parts.metadata)
}

/// An entry cut into its parts, checksum not yet verified.
struct EntryParts {
    broker_entry_metadata: Option<BrokerEntryMetadata>,
    bytes: Bytes,
    stored_checksum: Option<u32>,
    /// What the checksum covers: `[metadata_size][metadata][payload]`.
    checksummed: Bytes,
    metadata: MessageMetadata,
    payload: Bytes,
}

fn split_entry(entry: Bytes) -> Result<EntryParts, EntryError> {
    let sections = sections(entry)?;
    let metadata =
        MessageMetadata::decode(sections.metadata()).map_err(EntryError::InvalidMetadata)?;
    let payload = sections.checksummed.slice(sections.metadata_end..);
    Ok(EntryParts {
        broker_entry_metadata: sections.broker_entry_metadata,
        bytes: sections.bytes,
        stored_checksum: sections.stored_checksum,
        checksummed: sections.checksummed,
        metadata,
        payload,
    })
}

/// Decodes only the fields of an entry's metadata that `M` declares (a message with some of
/// [`MessageMetadata`]'s fields, same tags), **without** verifying its checksum: for a reader
/// that needs a few fields of many entries and should not pay for the others' allocations.
/// Reads the entry in place: nothing of it is sliced, decoded or counted but the metadata.
pub fn entry_metadata_fields<M: Message + Default>(entry: &[u8]) -> Result<M, EntryError> {
    let layout = layout(entry)?;
    M::decode(&entry[layout.metadata]).map_err(EntryError::InvalidMetadata)
}

/// Where an entry's parts lie, its metadata not decoded yet.
struct Sections {
    broker_entry_metadata: Option<BrokerEntryMetadata>,
    bytes: Bytes,
    stored_checksum: Option<u32>,
    /// What the checksum covers: `[metadata_size][metadata][payload]`.
    checksummed: Bytes,
    /// Where the metadata ends in `checksummed`.
    metadata_end: usize,
}

impl Sections {
    fn metadata(&self) -> Bytes {
        self.checksummed.slice(4..self.metadata_end)
    }
}

fn sections(entry: Bytes) -> Result<Sections, EntryError> {
    let layout = layout(&entry)?;
    let broker_entry_metadata = layout
        .broker_entry_metadata
        .map(|block| {
            BrokerEntryMetadata::decode(&entry[block])
                .map_err(EntryError::InvalidBrokerEntryMetadata)
        })
        .transpose()?;
    let checksummed = entry.slice(layout.checksummed..);
    Ok(Sections {
        broker_entry_metadata,
        bytes: entry.slice(layout.after_broker_entry_metadata..),
        stored_checksum: layout.stored_checksum,
        metadata_end: layout.metadata.end - layout.checksummed,
        checksummed,
    })
}

/// Where an entry's parts lie, as offsets into it; nothing decoded.
struct Layout {
    /// The 0x0e02 block's `BrokerEntryMetadata`, if there is one.
    broker_entry_metadata: Option<Range<usize>>,
    /// Where what follows that block starts (0 without it).
    after_broker_entry_metadata: usize,
    stored_checksum: Option<u32>,
    /// Where what the checksum covers starts: `[metadata_size][metadata][payload]`.
    checksummed: usize,
    /// The `MessageMetadata`.
    metadata: Range<usize>,
}

fn layout(entry: &[u8]) -> Result<Layout, EntryError> {
    let broker_entry_metadata = broker_entry_metadata_block(entry)?;
    let after_broker_entry_metadata = broker_entry_metadata.as_ref().map_or(0, |block| block.end);
    let bytes = &entry[after_broker_entry_metadata..];

    let (stored_checksum, checksummed) = if read::u16_at(bytes, 0) == Some(CHECKSUM_MAGIC) {
        let stored = read::u32_at(bytes, 2).ok_or(EntryError::Truncated {
            section: "checksum block",
            needed: CHECKSUM_BLOCK_LENGTH,
            available: bytes.len(),
        })?;
        (
            Some(stored),
            after_broker_entry_metadata + CHECKSUM_BLOCK_LENGTH,
        )
    } else {
        (None, after_broker_entry_metadata)
    };

    let covered = &entry[checksummed..];
    let metadata_size = read::u32_at(covered, 0).ok_or(EntryError::Truncated {
        section: "metadata size",
        needed: 4,
        available: covered.len(),
    })?;
    let after_size = covered.len() - 4;
    let metadata_length = read::size(metadata_size);
    if metadata_length > after_size {
        return Err(EntryError::MetadataSizeOutOfBounds {
            metadata_size,
            available: after_size,
        });
    }
    // 4 + metadata_length <= covered.len(), so neither bound overflows.
    let metadata_start = checksummed + 4;
    Ok(Layout {
        broker_entry_metadata,
        after_broker_entry_metadata,
        stored_checksum,
        checksummed,
        metadata: metadata_start..metadata_start + metadata_length,
    })
}

/// The entry without its 0x0e02 block, for a consumer that did not announce
/// `supports_broker_entry_metadata`. Returns the input unchanged (same
/// allocation) when there is no such block.
pub fn strip_broker_entry_metadata(entry: Bytes) -> Result<Bytes, EntryError> {
    split_broker_entry_metadata(entry).map(|(_, rest)| rest)
}

/// Splits off and decodes a leading 0x0e02 block, if there is one.
fn split_broker_entry_metadata(
    entry: Bytes,
) -> Result<(Option<BrokerEntryMetadata>, Bytes), EntryError> {
    let Some(block) = broker_entry_metadata_block(&entry)? else {
        return Ok((None, entry));
    };
    let metadata = BrokerEntryMetadata::decode(&entry[block.clone()])
        .map_err(EntryError::InvalidBrokerEntryMetadata)?;
    Ok((Some(metadata), entry.slice(block.end..)))
}

/// Where a leading 0x0e02 block's `BrokerEntryMetadata` lies, if there is such a block.
fn broker_entry_metadata_block(entry: &[u8]) -> Result<Option<Range<usize>>, EntryError> {
    if read::u16_at(entry, 0) != Some(BROKER_ENTRY_METADATA_MAGIC) {
        return Ok(None);
    }
    let size = read::u32_at(entry, 2).ok_or(EntryError::Truncated {
        section: "broker entry metadata block",
        needed: 6,
        available: entry.len(),
    })?;
    let available = entry.len() - 6;
    let length = read::size(size);
    if length > available {
        return Err(EntryError::BrokerEntryMetadataSizeOutOfBounds { size, available });
    }
    Ok(Some(6..6 + length))
}

/// One message of a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchMessage {
    /// Its per-message metadata (key, properties, event time, ...).
    pub metadata: SingleMessageMetadata,
    /// Its payload, sliced from the batch payload.
    pub payload: Bytes,
}

/// Iterates the messages of an uncompressed, unencrypted batch payload.
///
/// `metadata` is the entry's [`MessageMetadata`] and `payload` the payload
/// that follows it ([`ParsedEntry::payload`]). Fails at once if the entry is
/// not a batch, or if its payload is compressed or encrypted (a broker cannot
/// look inside those; decompress first and pass the result).
pub fn batch_messages(
    metadata: &MessageMetadata,
    payload: Bytes,
) -> Result<BatchMessages, EntryError> {
    let count = metadata
        .num_messages_in_batch
        .ok_or(EntryError::NotABatch)?;
    let count = u32::try_from(count).map_err(|_| EntryError::InvalidBatchCount { count })?;
    // Compare raw numbers: the generated `compression()` accessor would report
    // an unknown compression number as NONE.
    let compression = metadata.compression.unwrap_or(CompressionType::None as i32);
    if compression != CompressionType::None as i32 {
        return Err(EntryError::CompressedBatch { compression });
    }
    if !metadata.encryption_keys.is_empty() {
        return Err(EntryError::EncryptedBatch);
    }
    Ok(BatchMessages {
        payload,
        offset: 0,
        next_index: 0,
        count,
        failed: false,
    })
}

/// Iterator over the messages of a batch; see [`batch_messages`].
///
/// Yields `num_messages_in_batch` items, or stops after the first error.
/// Bytes left over after the last message are ignored, as Pulsar does.
#[derive(Clone, Debug)]
pub struct BatchMessages {
    payload: Bytes,
    /// Where the next message starts; never beyond `payload.len()`.
    offset: usize,
    next_index: u32,
    count: u32,
    /// Set after an error, so that iteration stops there.
    failed: bool,
}

impl BatchMessages {
    fn read_next(&mut self) -> Result<BatchMessage, EntryError> {
        let index = self.next_index;
        let rest = self.payload.slice(self.offset..);

        let metadata_size = read::u32_at(&rest, 0).ok_or(EntryError::BatchMessageOutOfBounds {
            index,
            section: "metadata size field",
            declared_size: 4,
            available: rest.len(),
        })?;
        let after_size = rest.len() - 4;
        let metadata_length = read::size(metadata_size);
        if metadata_length > after_size {
            return Err(EntryError::BatchMessageOutOfBounds {
                index,
                section: "metadata",
                declared_size: i64::from(metadata_size),
                available: after_size,
            });
        }
        let metadata_end = 4 + metadata_length;
        let metadata = SingleMessageMetadata::decode(rest.slice(4..metadata_end))
            .map_err(|source| EntryError::InvalidSingleMessageMetadata { index, source })?;

        let after_metadata = rest.len() - metadata_end;
        let payload_length = usize::try_from(metadata.payload_size).unwrap_or(usize::MAX);
        if payload_length > after_metadata {
            return Err(EntryError::BatchMessageOutOfBounds {
                index,
                section: "payload",
                declared_size: i64::from(metadata.payload_size),
                available: after_metadata,
            });
        }
        let payload_end = metadata_end + payload_length;
        let payload = rest.slice(metadata_end..payload_end);

        // payload_end <= rest.len(), so the new offset stays within the payload.
        self.offset += payload_end;
        Ok(BatchMessage { metadata, payload })
    }
}

impl Iterator for BatchMessages {
    type Item = Result<BatchMessage, EntryError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next_index >= self.count {
            return None;
        }
        let result = self.read_next();
        self.next_index += 1;
        if result.is_err() {
            self.failed = true;
        }
        Some(result)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.failed {
            return (0, Some(0));
        }
        let remaining = usize::try_from(self.count - self.next_index).unwrap_or(usize::MAX);
        (0, Some(remaining))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{
        encode_entry, encode_entry_without_checksum, prepend_broker_entry_metadata,
    };
    use crate::proto::KeyValue;

    fn metadata(sequence_id: u64) -> MessageMetadata {
        MessageMetadata {
            producer_name: "producer-a".to_owned(),
            sequence_id,
            publish_time: 1_700_000_000_000,
            properties: vec![KeyValue {
                key: "colour".to_owned(),
                value: "blue".to_owned(),
            }],
            ..MessageMetadata::default()
        }
    }

    fn batch_payload(messages: &[(&str, &[u8])]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (key, body) in messages {
            let single = SingleMessageMetadata {
                partition_key: Some((*key).to_owned()),
                payload_size: i32::try_from(body.len()).expect("test payload fits i32"),
                ..SingleMessageMetadata::default()
            };
            let encoded = single.encode_to_vec();
            payload.extend_from_slice(
                &u32::try_from(encoded.len())
                    .expect("test metadata fits u32")
                    .to_be_bytes(),
            );
            payload.extend_from_slice(&encoded);
            payload.extend_from_slice(body);
        }
        payload
    }

    #[test]
    fn crc32c_is_the_castagnoli_polynomial() {
        // The standard check value of CRC-32C (iSCSI) for "123456789".
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn entry_round_trip_with_checksum() {
        let entry = encode_entry(&metadata(7), b"hello").expect("encode");
        assert_eq!(read::u16_at(&entry, 0), Some(CHECKSUM_MAGIC));
        let parsed = parse_entry(entry.clone()).expect("parse");
        assert_eq!(parsed.metadata, metadata(7));
        assert_eq!(&parsed.payload[..], b"hello");
        assert_eq!(parsed.checksum, ChecksumStatus::Verified);
        assert!(parsed.checksum.is_present());
        assert_eq!(parsed.bytes, entry);
        assert_eq!(parsed.broker_entry_metadata, None);
    }

    #[test]
    fn entry_round_trip_without_checksum() {
        let entry = encode_entry_without_checksum(&metadata(8), b"").expect("encode");
        let parsed = parse_entry(entry).expect("parse");
        assert_eq!(parsed.checksum, ChecksumStatus::Absent);
        assert!(!parsed.checksum.is_present());
        assert!(!parsed.checksum.is_verified());
        assert!(parsed.payload.is_empty());
    }

    #[test]
    fn corrupted_payload_is_a_checksum_mismatch_not_an_error() {
        let entry = encode_entry(&metadata(9), b"payload").expect("encode");
        let mut corrupted = entry.to_vec();
        let last = corrupted.len() - 1;
        corrupted[last] ^= 0x01;
        let parsed = parse_entry(Bytes::from(corrupted)).expect("parse");
        assert!(matches!(parsed.checksum, ChecksumStatus::Mismatch { .. }));
        assert!(parsed.checksum.is_present());
        assert!(!parsed.checksum.is_verified());
        // The metadata-only decoder does not look at the checksum at all.
        let metadata_only = entry_metadata(Bytes::from(corrupted_copy(&entry))).expect("metadata");
        assert_eq!(metadata_only, parse_entry(entry).expect("parse").metadata);
    }

    fn corrupted_copy(entry: &Bytes) -> Vec<u8> {
        let mut corrupted = entry.to_vec();
        let last = corrupted.len() - 1;
        corrupted[last] ^= 0x01;
        corrupted
    }

    #[test]
    fn corrupted_checksum_is_a_mismatch() {
        let entry = encode_entry(&metadata(9), b"payload").expect("encode");
        let mut corrupted = entry.to_vec();
        corrupted[2] ^= 0x80;
        let parsed = parse_entry(Bytes::from(corrupted)).expect("parse");
        let ChecksumStatus::Mismatch { stored, computed } = parsed.checksum else {
            panic!("expected a mismatch, got {:?}", parsed.checksum);
        };
        assert_ne!(stored, computed);
    }

    #[test]
    fn broker_entry_metadata_is_split_off_and_stripped() {
        let entry = encode_entry(&metadata(1), b"body").expect("encode");
        let broker_metadata = BrokerEntryMetadata {
            broker_timestamp: Some(1234),
            index: Some(99),
        };
        let stored = prepend_broker_entry_metadata(&broker_metadata, &entry).expect("prepend");
        assert_eq!(read::u16_at(&stored, 0), Some(BROKER_ENTRY_METADATA_MAGIC));

        let parsed = parse_entry(stored.clone()).expect("parse");
        assert_eq!(parsed.broker_entry_metadata, Some(broker_metadata));
        assert_eq!(parsed.bytes, entry);
        assert_eq!(parsed.checksum, ChecksumStatus::Verified);

        assert_eq!(strip_broker_entry_metadata(stored).expect("strip"), entry);
        assert_eq!(
            strip_broker_entry_metadata(entry.clone()).expect("strip"),
            entry
        );
    }

    #[test]
    fn metadata_size_beyond_the_entry_is_rejected() {
        let mut entry = vec![0, 0, 0, 10];
        entry.extend_from_slice(&[0; 5]);
        let error = parse_entry(Bytes::from(entry)).expect_err("must fail");
        assert!(matches!(
            error,
            EntryError::MetadataSizeOutOfBounds {
                metadata_size: 10,
                available: 5
            }
        ));

        let huge = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 1, 2]);
        assert!(matches!(
            parse_entry(huge),
            Err(EntryError::MetadataSizeOutOfBounds { .. })
        ));
    }

    #[test]
    fn truncated_entries_are_rejected() {
        for bytes in [
            &[][..],
            &[0, 0, 1][..],
            &[0x0e, 0x01, 0, 0][..],
            &[0x0e, 0x01, 0, 0, 0, 0, 0][..],
            &[0x0e, 0x02, 0, 0][..],
        ] {
            let error = parse_entry(Bytes::copy_from_slice(bytes)).expect_err("must fail");
            assert!(
                matches!(error, EntryError::Truncated { .. }),
                "{bytes:?}: {error:?}"
            );
        }
    }

    #[test]
    fn invalid_metadata_protobuf_is_rejected() {
        // A field header with wire type 7, which does not exist.
        let entry = Bytes::from_static(&[0, 0, 0, 1, 0x0f]);
        assert!(matches!(
            parse_entry(entry),
            Err(EntryError::InvalidMetadata(_))
        ));
    }

    #[test]
    fn batch_messages_are_iterated_in_order() {
        let payload = batch_payload(&[("k1", b"one"), ("k2", b""), ("k3", b"three")]);
        let mut batch_metadata = metadata(1);
        batch_metadata.num_messages_in_batch = Some(3);
        let messages: Vec<BatchMessage> = batch_messages(&batch_metadata, Bytes::from(payload))
            .expect("a batch")
            .collect::<Result<_, _>>()
            .expect("valid batch");
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[0].metadata.partition_key.as_deref(), Some("k1"));
        assert_eq!(&messages[0].payload[..], b"one");
        assert!(messages[1].payload.is_empty());
        assert_eq!(&messages[2].payload[..], b"three");
    }

    #[test]
    fn batch_iteration_stops_at_the_first_error() {
        let mut payload = batch_payload(&[("k1", b"one")]);
        payload.extend_from_slice(&[0, 0, 0, 200]);
        let mut batch_metadata = metadata(1);
        batch_metadata.num_messages_in_batch = Some(i32::MAX);
        let mut messages = batch_messages(&batch_metadata, Bytes::from(payload)).expect("a batch");
        assert!(messages.next().expect("first").is_ok());
        assert!(matches!(
            messages.next(),
            Some(Err(EntryError::BatchMessageOutOfBounds { index: 1, .. }))
        ));
        assert!(messages.next().is_none());
    }

    #[test]
    fn batch_payload_size_beyond_the_payload_is_rejected() {
        let single = SingleMessageMetadata {
            payload_size: 1_000,
            ..SingleMessageMetadata::default()
        };
        let encoded = single.encode_to_vec();
        let mut payload = u32::try_from(encoded.len())
            .expect("fits")
            .to_be_bytes()
            .to_vec();
        payload.extend_from_slice(&encoded);
        payload.extend_from_slice(b"short");
        let mut batch_metadata = metadata(1);
        batch_metadata.num_messages_in_batch = Some(1);
        let result: Result<Vec<_>, _> = batch_messages(&batch_metadata, Bytes::from(payload))
            .expect("a batch")
            .collect();
        assert!(matches!(
            result,
            Err(EntryError::BatchMessageOutOfBounds {
                section: "payload",
                ..
            })
        ));
    }

    #[test]
    fn negative_payload_size_is_rejected() {
        let single = SingleMessageMetadata {
            payload_size: -1,
            ..SingleMessageMetadata::default()
        };
        let encoded = single.encode_to_vec();
        let mut payload = u32::try_from(encoded.len())
            .expect("fits")
            .to_be_bytes()
            .to_vec();
        payload.extend_from_slice(&encoded);
        let mut batch_metadata = metadata(1);
        batch_metadata.num_messages_in_batch = Some(1);
        let first = batch_messages(&batch_metadata, Bytes::from(payload))
            .expect("a batch")
            .next();
        assert!(matches!(
            first,
            Some(Err(EntryError::BatchMessageOutOfBounds {
                declared_size: -1,
                ..
            }))
        ));
    }

    #[test]
    fn non_batches_and_opaque_batches_are_refused() {
        let plain = metadata(1);
        assert!(matches!(
            batch_messages(&plain, Bytes::new()),
            Err(EntryError::NotABatch)
        ));

        let mut negative = metadata(1);
        negative.num_messages_in_batch = Some(-3);
        assert!(matches!(
            batch_messages(&negative, Bytes::new()),
            Err(EntryError::InvalidBatchCount { count: -3 })
        ));

        let mut compressed = metadata(1);
        compressed.num_messages_in_batch = Some(2);
        compressed.compression = Some(CompressionType::Lz4 as i32);
        assert!(matches!(
            batch_messages(&compressed, Bytes::new()),
            Err(EntryError::CompressedBatch { compression: 1 })
        ));

        let mut encrypted = metadata(1);
        encrypted.num_messages_in_batch = Some(2);
        encrypted
            .encryption_keys
            .push(crate::proto::EncryptionKeys {
                key: "key".to_owned(),
                value: Bytes::from_static(b"secret"),
                metadata: Vec::new(),
            });
        assert!(matches!(
            batch_messages(&encrypted, Bytes::new()),
            Err(EntryError::EncryptedBatch)
        ));
    }

    #[test]
    fn slices_share_the_entry_allocation() {
        let entry = encode_entry(&metadata(1), b"zero-copy payload").expect("encode");
        let parsed = parse_entry(entry.clone()).expect("parse");
        let entry_range = entry.as_ptr_range();
        let payload_start = parsed.payload.as_ptr();
        assert!(entry_range.contains(&payload_start));
    }
}
