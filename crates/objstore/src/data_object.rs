//! Data objects: one object per group commit of a broker, holding one batch of entries of each
//! of many topics, with an index and a footer at the end so that a reader fetches the index
//! with one ranged GET (from the end) and then only the topic it wants.
//!
//! The layout is specified byte by byte in `docs/cluster.md` ("Built: object storage client and
//! data objects"); keep the two in step. All integers are little-endian, CRC32C is Castagnoli.
//!
//! ```text
//! object: [records of topic 1][records of topic 2]...[index][footer (32 bytes)]
//! record: the local engine's segment record (docs/storage-format.md):
//!         body_len:u32 crc32c(body):u32 body = entry_id:u64 publish_time_ms:u64 entry
//! index:  topic_count:u32, then per topic: name_len:u16 name first_entry_id:u64
//!         last_entry_id:u64 offset:u64 length:u64
//! footer: index_offset:u64 index_len:u32 crc32c(index):u32 version:u16 footer_len:u16
//!         crc32c(footer bytes 0..20):u32 magic "MRDNOBJ\x01"
//! ```
//!
//! Limits: a builder enforces the configured [`DataObjectLimits`]; a reader enforces only the
//! format's own maxima (`MAX_*` below), so an object valid when written stays readable whatever
//! is configured later.

use std::collections::HashSet;

use bytes::Bytes;
use meridian_storage::format::{decode_record, encode_record, RECORD_FRAMING_LEN};
use thiserror::Error;

use crate::client::ObjectStore;
use crate::error::Result;

/// The last 8 bytes of every data object.
pub const MAGIC: [u8; 8] = *b"MRDNOBJ\x01";
/// The data-object format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Length of the footer.
pub const FOOTER_LEN: u64 = 32;
/// The largest data object of format version 1.
pub const MAX_OBJECT_BYTES: u64 = 1 << 30;
/// The largest index of format version 1.
pub const MAX_INDEX_BYTES: u64 = 16 << 20;
/// The most topics one data object holds.
pub const MAX_TOPICS_PER_OBJECT: usize = 65_536;
/// The most entries one data object holds (all topics together).
pub const MAX_ENTRIES_PER_OBJECT: u64 = 1 << 20;
/// The longest topic name in an index, in bytes.
pub const MAX_TOPIC_NAME_BYTES: usize = 4096;

/// Framing plus entry id and publish time: the bytes a record adds to its entry.
const RECORD_OVERHEAD: u64 = RECORD_FRAMING_LEN + 16;
/// Index bytes per topic besides its name.
const INDEX_ENTRY_FIXED_BYTES: u64 = 2 + 4 * 8;
/// How much of an object's end the reader fetches first: the footer and, usually, the whole
/// index (about 400 topics of 128-byte names).
const INDEX_READ_AHEAD_BYTES: u64 = 64 * 1024;

/// The name of the data object of a broker's group commit: `data/<broker>/<epoch>/<sequence>.seg`
/// with both numbers zero-padded to 20 digits so that keys list in commit order
/// (`docs/cluster.md`, "Object storage").
pub fn data_object_key(broker_id: &str, broker_epoch: u64, sequence: u64) -> String {
    format!("data/{broker_id}/{broker_epoch:020}/{sequence:020}.seg")
}

/// Where one topic's batch lies in a data object: what the index holds, and what a commit
/// records in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRange {
    pub topic: String,
    pub first_entry_id: u64,
    pub last_entry_id: u64,
    /// Offset of the batch's first record in the object.
    pub offset: u64,
    /// Bytes of the batch's records.
    pub length: u64,
}

impl TopicRange {
    pub fn entry_count(&self) -> u64 {
        self.last_entry_id - self.first_entry_id + 1
    }
}

/// One entry given to [`DataObjectBuilder::add_topic`].
#[derive(Debug, Clone, Copy)]
pub struct NewEntry<'a> {
    pub publish_time_ms: u64,
    /// The entry, byte-exact as appended (for a topic: the producer's
    /// `[checksum][metadata][payload]`).
    pub data: &'a [u8],
}

/// One entry read back from a data object; `data` shares the fetched buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEntry {
    pub entry_id: u64,
    pub publish_time_ms: u64,
    pub data: Bytes,
}

/// The limits a builder enforces; each must be within the format's maxima.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataObjectLimits {
    /// Largest object, index and footer included. Default 64 MiB.
    pub max_object_bytes: u64,
    /// Most entries, all topics together. Default 100,000.
    pub max_entries: u64,
    /// Most topics. Default 10,000.
    pub max_topics: usize,
}

impl Default for DataObjectLimits {
    fn default() -> Self {
        DataObjectLimits {
            max_object_bytes: 64 << 20,
            max_entries: 100_000,
            max_topics: 10_000,
        }
    }
}

/// Why a batch or an object could not be built. The builder is unchanged after an error, so a
/// caller whose batch does not fit finishes this object and starts the next one with it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("data object limits: {0}")]
    InvalidLimits(String),
    #[error("topic `{topic}`: an empty batch")]
    EmptyBatch { topic: String },
    #[error("topic `{topic}` is already in this data object")]
    DuplicateTopic { topic: String },
    #[error("topic name `{topic}`: {detail}")]
    BadTopicName { topic: String, detail: String },
    #[error("topic `{topic}`: entry ids from {first_entry_id} overflow for {count} entries")]
    EntryIdOverflow {
        topic: String,
        first_entry_id: u64,
        count: usize,
    },
    #[error("topic `{topic}` does not fit in this data object: {detail}")]
    Full { topic: String, detail: String },
    #[error("a data object needs at least one topic")]
    EmptyObject,
}

/// Assembles one data object in memory.
#[derive(Debug)]
pub struct DataObjectBuilder {
    limits: DataObjectLimits,
    bytes: Vec<u8>,
    index: Vec<TopicRange>,
    names: HashSet<String>,
    entries: u64,
    index_bytes: u64,
}

/// A finished data object: its bytes (to PUT) and its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataObject {
    pub bytes: Vec<u8>,
    pub index: Vec<TopicRange>,
}

impl DataObjectBuilder {
    pub fn new(limits: DataObjectLimits) -> std::result::Result<DataObjectBuilder, BuildError> {
        let problem = if !(1..=MAX_OBJECT_BYTES).contains(&limits.max_object_bytes) {
            Some(format!(
                "max_object_bytes must be within 1..={MAX_OBJECT_BYTES}"
            ))
        } else if !(1..=MAX_ENTRIES_PER_OBJECT).contains(&limits.max_entries) {
            Some(format!(
                "max_entries must be within 1..={MAX_ENTRIES_PER_OBJECT}"
            ))
        } else if !(1..=MAX_TOPICS_PER_OBJECT).contains(&limits.max_topics) {
            Some(format!(
                "max_topics must be within 1..={MAX_TOPICS_PER_OBJECT}"
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(BuildError::InvalidLimits(problem));
        }
        Ok(DataObjectBuilder {
            limits,
            bytes: Vec::new(),
            index: Vec::new(),
            names: HashSet::new(),
            entries: 0,
            index_bytes: 4,
        })
    }

    /// Topics added so far.
    pub fn topics(&self) -> &[TopicRange] {
        &self.index
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Size of the object if it were finished now.
    pub fn object_bytes(&self) -> u64 {
        self.bytes.len() as u64 + self.index_bytes + FOOTER_LEN
    }

    /// Adds one topic's batch: `entries` get consecutive ids from `first_entry_id`. Fails,
    /// leaving the builder unchanged, when a limit would be passed.
    pub fn add_topic(
        &mut self,
        topic: &str,
        first_entry_id: u64,
        entries: &[NewEntry<'_>],
    ) -> std::result::Result<&TopicRange, BuildError> {
        check_topic_name(topic).map_err(|detail| BuildError::BadTopicName {
            topic: topic.to_string(),
            detail,
        })?;
        if entries.is_empty() {
            return Err(BuildError::EmptyBatch {
                topic: topic.to_string(),
            });
        }
        if self.names.contains(topic) {
            return Err(BuildError::DuplicateTopic {
                topic: topic.to_string(),
            });
        }
        let last_entry_id = first_entry_id
            .checked_add(entries.len() as u64 - 1)
            .filter(|last| *last != u64::MAX)
            .ok_or_else(|| BuildError::EntryIdOverflow {
                topic: topic.to_string(),
                first_entry_id,
                count: entries.len(),
            })?;
        let full = |detail: String| BuildError::Full {
            topic: topic.to_string(),
            detail,
        };
        if self.index.len() >= self.limits.max_topics {
            return Err(full(format!(
                "it holds {} topics already",
                self.index.len()
            )));
        }
        let entries_after = self.entries + entries.len() as u64;
        if entries_after > self.limits.max_entries {
            return Err(full(format!(
                "{entries_after} entries would pass the limit of {}",
                self.limits.max_entries
            )));
        }
        let records_bytes: u64 = entries
            .iter()
            .map(|entry| RECORD_OVERHEAD + entry.data.len() as u64)
            .sum();
        let index_bytes_after = self.index_bytes + INDEX_ENTRY_FIXED_BYTES + topic.len() as u64;
        let object_bytes_after =
            self.bytes.len() as u64 + records_bytes + index_bytes_after + FOOTER_LEN;
        if object_bytes_after > self.limits.max_object_bytes || index_bytes_after > MAX_INDEX_BYTES
        {
            return Err(full(format!(
                "{object_bytes_after} bytes would pass the limit of {}",
                self.limits.max_object_bytes
            )));
        }

        let offset = self.bytes.len() as u64;
        self.bytes.reserve(records_bytes as usize);
        for (entry_id, entry) in (first_entry_id..).zip(entries) {
            encode_record(
                &mut self.bytes,
                &[
                    &entry_id.to_le_bytes(),
                    &entry.publish_time_ms.to_le_bytes(),
                    entry.data,
                ],
            );
        }
        debug_assert_eq!(self.bytes.len() as u64, offset + records_bytes);
        self.entries = entries_after;
        self.index_bytes = index_bytes_after;
        self.names.insert(topic.to_string());
        self.index.push(TopicRange {
            topic: topic.to_string(),
            first_entry_id,
            last_entry_id,
            offset,
            length: records_bytes,
        });
        Ok(&self.index[self.index.len() - 1])
    }

    /// Appends the index and the footer.
    pub fn finish(self) -> std::result::Result<DataObject, BuildError> {
        if self.index.is_empty() {
            return Err(BuildError::EmptyObject);
        }
        let mut bytes = self.bytes;
        let index_offset = bytes.len() as u64;
        bytes.extend_from_slice(&(self.index.len() as u32).to_le_bytes());
        for range in &self.index {
            bytes.extend_from_slice(&(range.topic.len() as u16).to_le_bytes());
            bytes.extend_from_slice(range.topic.as_bytes());
            for value in [
                range.first_entry_id,
                range.last_entry_id,
                range.offset,
                range.length,
            ] {
                bytes.extend_from_slice(&value.to_le_bytes());
            }
        }
        let index_len = bytes.len() as u64 - index_offset;
        debug_assert_eq!(index_len, self.index_bytes);
        let index_crc = crc32c::crc32c(&bytes[index_offset as usize..]);
        bytes.extend_from_slice(&encode_footer(index_offset, index_len as u32, index_crc));
        debug_assert!(bytes.len() as u64 <= self.limits.max_object_bytes);
        // Paired check: what was written reads back as the index built.
        debug_assert_eq!(
            decode_footer(
                &bytes[bytes.len() - FOOTER_LEN as usize..],
                bytes.len() as u64
            )
            .and_then(|footer| decode_index(
                &bytes[index_offset as usize..(index_offset + index_len) as usize],
                &footer
            ))
            .as_ref(),
            Ok(&self.index)
        );
        Ok(DataObject {
            bytes,
            index: self.index,
        })
    }
}

fn check_topic_name(topic: &str) -> std::result::Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_NAME_BYTES {
        return Err(format!("must be 1 to {MAX_TOPIC_NAME_BYTES} bytes"));
    }
    Ok(())
}

/// The footer's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub index_offset: u64,
    pub index_len: u32,
    pub index_crc: u32,
}

fn encode_footer(index_offset: u64, index_len: u32, index_crc: u32) -> [u8; FOOTER_LEN as usize] {
    let mut footer = [0u8; FOOTER_LEN as usize];
    footer[0..8].copy_from_slice(&index_offset.to_le_bytes());
    footer[8..12].copy_from_slice(&index_len.to_le_bytes());
    footer[12..16].copy_from_slice(&index_crc.to_le_bytes());
    footer[16..18].copy_from_slice(&VERSION.to_le_bytes());
    footer[18..20].copy_from_slice(&(FOOTER_LEN as u16).to_le_bytes());
    let crc = crc32c::crc32c(&footer[..20]);
    footer[20..24].copy_from_slice(&crc.to_le_bytes());
    footer[24..32].copy_from_slice(&MAGIC);
    footer
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Checks the last [`FOOTER_LEN`] bytes of an object of `object_size` bytes.
pub fn decode_footer(footer: &[u8], object_size: u64) -> std::result::Result<Footer, String> {
    if footer.len() as u64 != FOOTER_LEN || object_size < FOOTER_LEN {
        return Err(format!(
            "{object_size} bytes: shorter than a data-object footer (truncated?)"
        ));
    }
    if footer[24..32] != MAGIC {
        return Err(format!(
            "no data-object footer at the end of its {object_size} bytes \
             (truncated, or not a data object)"
        ));
    }
    if crc32c::crc32c(&footer[..20]) != u32_at(footer, 20) {
        return Err("footer checksum mismatch".to_string());
    }
    let version = u16_at(footer, 16);
    if version != VERSION {
        return Err(format!(
            "data-object format version {version}, this build reads {VERSION}"
        ));
    }
    if u64::from(u16_at(footer, 18)) != FOOTER_LEN {
        return Err(format!(
            "footer length {} is not {FOOTER_LEN}",
            u16_at(footer, 18)
        ));
    }
    let parsed = Footer {
        index_offset: u64_at(footer, 0),
        index_len: u32_at(footer, 8),
        index_crc: u32_at(footer, 12),
    };
    if object_size > MAX_OBJECT_BYTES || u64::from(parsed.index_len) > MAX_INDEX_BYTES {
        return Err(format!(
            "object of {object_size} bytes or index of {} bytes is past the format's limits",
            parsed.index_len
        ));
    }
    if parsed
        .index_offset
        .checked_add(u64::from(parsed.index_len) + FOOTER_LEN)
        != Some(object_size)
    {
        return Err(format!(
            "the index ({} bytes at {}) does not end where the footer starts in an object of \
             {object_size} bytes (truncated or damaged)",
            parsed.index_len, parsed.index_offset
        ));
    }
    Ok(parsed)
}

/// Checks and parses the index described by `footer`.
pub fn decode_index(index: &[u8], footer: &Footer) -> std::result::Result<Vec<TopicRange>, String> {
    if index.len() != footer.index_len as usize {
        return Err(format!(
            "index is {} bytes, the footer says {}",
            index.len(),
            footer.index_len
        ));
    }
    if crc32c::crc32c(index) != footer.index_crc {
        return Err("index checksum mismatch".to_string());
    }
    let mut at = 0usize;
    let mut take = |count: usize| -> std::result::Result<&[u8], String> {
        let slice = index
            .get(at..at + count)
            .ok_or_else(|| format!("index ends inside a field at byte {at}"))?;
        at += count;
        Ok(slice)
    };
    let topic_count = u32_at(take(4)?, 0) as usize;
    if topic_count == 0 || topic_count > MAX_TOPICS_PER_OBJECT {
        return Err(format!(
            "{topic_count} topics is not within 1..={MAX_TOPICS_PER_OBJECT}"
        ));
    }
    let mut ranges = Vec::with_capacity(topic_count.min(index.len() / 34));
    let mut names = HashSet::new();
    let mut next_offset = 0u64;
    let mut entries = 0u64;
    for _ in 0..topic_count {
        let name_len = u16_at(take(2)?, 0) as usize;
        let topic = std::str::from_utf8(take(name_len)?)
            .map_err(|_| "a topic name is not UTF-8".to_string())?
            .to_string();
        check_topic_name(&topic).map_err(|detail| format!("topic name `{topic}`: {detail}"))?;
        let fields = take(32)?;
        let range = TopicRange {
            topic,
            first_entry_id: u64_at(fields, 0),
            last_entry_id: u64_at(fields, 8),
            offset: u64_at(fields, 16),
            length: u64_at(fields, 24),
        };
        if range.last_entry_id < range.first_entry_id || range.last_entry_id == u64::MAX {
            return Err(format!(
                "topic `{}`: entries {}..={} are not a range",
                range.topic, range.first_entry_id, range.last_entry_id
            ));
        }
        entries = entries.saturating_add(range.entry_count());
        if entries > MAX_ENTRIES_PER_OBJECT {
            return Err(format!("more than {MAX_ENTRIES_PER_OBJECT} entries"));
        }
        if range.offset != next_offset
            || range.length < range.entry_count() * RECORD_OVERHEAD
            || range.offset.saturating_add(range.length) > footer.index_offset
        {
            return Err(format!(
                "topic `{}`: {} bytes at {} do not follow the previous topic (at {next_offset}) \
                 within the {} bytes of records, or cannot hold {} entries",
                range.topic,
                range.length,
                range.offset,
                footer.index_offset,
                range.entry_count()
            ));
        }
        next_offset = range.offset + range.length;
        if !names.insert(range.topic.clone()) {
            return Err(format!("topic `{}` appears twice", range.topic));
        }
        ranges.push(range);
    }
    if at != index.len() || next_offset != footer.index_offset {
        return Err(format!(
            "index has {} bytes after its topics, or the topics' records end at {next_offset}, \
             not at the index ({})",
            index.len() - at,
            footer.index_offset
        ));
    }
    Ok(ranges)
}

/// Checks every record of one topic's batch (`bytes`, fetched from `range.offset`) and returns
/// its entries.
pub fn decode_topic(
    bytes: &Bytes,
    range: &TopicRange,
) -> std::result::Result<Vec<ObjectEntry>, String> {
    if range.last_entry_id < range.first_entry_id || range.last_entry_id == u64::MAX {
        return Err(format!(
            "topic `{}`: entries {}..={} are not a range",
            range.topic, range.first_entry_id, range.last_entry_id
        ));
    }
    if bytes.len() as u64 != range.length {
        return Err(format!(
            "topic `{}`: read {} of its {} bytes at {} (truncated)",
            range.topic,
            bytes.len(),
            range.length,
            range.offset
        ));
    }
    let capacity = range.entry_count().min(range.length / RECORD_OVERHEAD);
    let mut entries = Vec::with_capacity(capacity as usize);
    let mut at = 0usize;
    let mut expected_id = range.first_entry_id;
    while at < bytes.len() {
        let damaged = |reason: String| {
            format!(
                "topic `{}`: record at object offset {}: {reason}",
                range.topic,
                range.offset + at as u64
            )
        };
        let body = decode_record(&bytes[at..]).map_err(damaged)?;
        if body.len() < 16 {
            return Err(damaged(format!(
                "body of {} bytes has no entry header",
                body.len()
            )));
        }
        let entry_id = u64_at(body, 0);
        if entry_id != expected_id || entry_id > range.last_entry_id {
            return Err(damaged(format!(
                "entry id {entry_id}, expected {expected_id} (the batch holds {}..={})",
                range.first_entry_id, range.last_entry_id
            )));
        }
        let data_start = at + RECORD_OVERHEAD as usize;
        let record_end = at + RECORD_FRAMING_LEN as usize + body.len();
        entries.push(ObjectEntry {
            entry_id,
            publish_time_ms: u64_at(body, 8),
            data: bytes.slice(data_start..record_end),
        });
        expected_id += 1;
        at = record_end;
    }
    if expected_id != range.last_entry_id + 1 {
        return Err(format!(
            "topic `{}`: {} entries, the index says {}",
            range.topic,
            entries.len(),
            range.entry_count()
        ));
    }
    Ok(entries)
}

/// A data object in the store whose index has been read and checked.
#[derive(Debug)]
pub struct DataObjectReader<'a> {
    store: &'a ObjectStore,
    key: String,
    object_size: u64,
    index: Vec<TopicRange>,
}

impl<'a> DataObjectReader<'a> {
    /// Fetches the footer and the index: one ranged GET of the object's last 64 KiB, and one
    /// more when the index is larger. A truncated or damaged object fails with `Corrupt`.
    pub fn open(store: &'a ObjectStore, key: &str) -> Result<DataObjectReader<'a>> {
        let tail = store.get_tail(key, INDEX_READ_AHEAD_BYTES)?;
        let object_size = tail.object_size;
        if (tail.bytes.len() as u64) < FOOTER_LEN {
            return Err(store.corrupt(
                key,
                format!("{object_size} bytes: shorter than a data-object footer (truncated?)"),
            ));
        }
        let footer_bytes = &tail.bytes[tail.bytes.len() - FOOTER_LEN as usize..];
        let footer = decode_footer(footer_bytes, object_size)
            .map_err(|detail| store.corrupt(key, detail))?;
        let tail_start = object_size - tail.bytes.len() as u64;
        let index_end = footer.index_offset + u64::from(footer.index_len);
        let index = if footer.index_offset >= tail_start {
            let from = (footer.index_offset - tail_start) as usize;
            decode_index(
                &tail.bytes[from..(index_end - tail_start) as usize],
                &footer,
            )
        } else {
            let index = store.get_range(key, footer.index_offset, u64::from(footer.index_len))?;
            decode_index(&index, &footer)
        }
        .map_err(|detail| store.corrupt(key, detail))?;
        Ok(DataObjectReader {
            store,
            key: key.to_string(),
            object_size,
            index,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn object_size(&self) -> u64 {
        self.object_size
    }

    /// The topics of the object, in the order of their records.
    pub fn topics(&self) -> &[TopicRange] {
        &self.index
    }

    /// The range of `topic`, if the object holds it.
    pub fn range(&self, topic: &str) -> Option<&TopicRange> {
        self.index.iter().find(|range| range.topic == topic)
    }

    /// Fetches and checks `topic`'s entries; `None` if the object does not hold the topic.
    pub fn read(&self, topic: &str) -> Result<Option<Vec<ObjectEntry>>> {
        match self.range(topic) {
            Some(range) => read_topic(self.store, &self.key, range).map(Some),
            None => Ok(None),
        }
    }
}

/// Fetches one topic's batch with one ranged GET and checks every record, for a caller that
/// knows the range already (from the index, or from the commit recorded in etcd).
pub fn read_topic(store: &ObjectStore, key: &str, range: &TopicRange) -> Result<Vec<ObjectEntry>> {
    if range.length == 0 || range.offset.saturating_add(range.length) > MAX_OBJECT_BYTES {
        return Err(store.invalid(
            "read topic",
            key,
            format!(
                "topic `{}`: {} bytes at {} is not a range of a data object",
                range.topic, range.length, range.offset
            ),
        ));
    }
    let bytes = Bytes::from(store.get_range(key, range.offset, range.length)?);
    decode_topic(&bytes, range).map_err(|detail| store.corrupt(key, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(count: usize, seed: u8) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| vec![seed.wrapping_add(i as u8); 10 + i * 7])
            .collect()
    }

    fn build(topics: &[(&str, u64, &[Vec<u8>])]) -> DataObject {
        let mut builder = DataObjectBuilder::new(DataObjectLimits::default()).expect("limits");
        for (topic, first, data) in topics {
            let batch: Vec<NewEntry<'_>> = data
                .iter()
                .enumerate()
                .map(|(i, data)| NewEntry {
                    publish_time_ms: 1_700_000_000_000 + i as u64,
                    data,
                })
                .collect();
            builder.add_topic(topic, *first, &batch).expect("add");
        }
        builder.finish().expect("finish")
    }

    /// Decodes every topic of an object held in memory, as the reader does over S3.
    fn decode_all(bytes: &[u8]) -> std::result::Result<Vec<Vec<ObjectEntry>>, String> {
        let size = bytes.len() as u64;
        let footer_at = bytes
            .len()
            .checked_sub(FOOTER_LEN as usize)
            .ok_or("too short")?;
        let footer = decode_footer(&bytes[footer_at..], size)?;
        let index_end = footer.index_offset as usize + footer.index_len as usize;
        let index = decode_index(&bytes[footer.index_offset as usize..index_end], &footer)?;
        index
            .iter()
            .map(|range| {
                let start = range.offset as usize;
                let slice = Bytes::copy_from_slice(&bytes[start..start + range.length as usize]);
                decode_topic(&slice, range)
            })
            .collect()
    }

    #[test]
    fn topics_round_trip_with_their_ids_times_and_bytes() {
        let (a, b) = (entries(3, 1), entries(1, 50));
        let object = build(&[("persistent://t/n/a", 7, &a), ("persistent://t/n/b", 0, &b)]);
        assert_eq!(object.index.len(), 2);
        assert_eq!(object.index[0].first_entry_id, 7);
        assert_eq!(object.index[0].last_entry_id, 9);
        assert_eq!(object.index[1].offset, object.index[0].length);
        let decoded = decode_all(&object.bytes).expect("decode");
        let ids: Vec<u64> = decoded[0].iter().map(|entry| entry.entry_id).collect();
        assert_eq!(ids, [7, 8, 9]);
        for (entry, data) in decoded[0].iter().zip(&a) {
            assert_eq!(&entry.data[..], &data[..]);
        }
        assert_eq!(decoded[0][2].publish_time_ms, 1_700_000_000_002);
        assert_eq!(&decoded[1][0].data[..], &b[0][..]);
        assert_eq!(&object.bytes[object.bytes.len() - 8..], &MAGIC);
    }

    #[test]
    fn every_damaged_byte_and_every_truncation_is_refused() {
        let (a, b) = (entries(2, 1), entries(2, 9));
        let object = build(&[("a", 0, &a), ("b", 100, &b)]);
        for at in 0..object.bytes.len() {
            let mut damaged = object.bytes.clone();
            damaged[at] ^= 0x10;
            assert!(
                decode_all(&damaged).is_err(),
                "flipped bit at byte {at} was accepted"
            );
        }
        for length in 0..object.bytes.len() {
            assert!(
                decode_all(&object.bytes[..length]).is_err(),
                "object cut to {length} bytes was accepted"
            );
        }
    }

    #[test]
    fn a_topic_range_read_short_is_refused_as_truncated() {
        let a = entries(2, 1);
        let object = build(&[("a", 0, &a)]);
        let range = &object.index[0];
        let short = Bytes::copy_from_slice(&object.bytes[..range.length as usize - 1]);
        let error = decode_topic(&short, range).expect_err("short");
        assert!(error.contains("truncated"), "{error}");
    }

    #[test]
    fn limits_are_enforced_and_leave_the_builder_unchanged() {
        let limits = DataObjectLimits {
            max_object_bytes: 400,
            max_entries: 3,
            max_topics: 2,
        };
        let mut builder = DataObjectBuilder::new(limits).expect("limits");
        let small = [NewEntry {
            publish_time_ms: 0,
            data: &[1u8; 10],
        }];
        builder.add_topic("a", 0, &small).expect("a");
        let before = builder.object_bytes();
        let big = [NewEntry {
            publish_time_ms: 0,
            data: &[0u8; 400],
        }];
        assert!(matches!(
            builder.add_topic("b", 0, &big),
            Err(BuildError::Full { .. })
        ));
        assert_eq!(builder.object_bytes(), before);
        let three = [small[0]; 3];
        assert!(matches!(
            builder.add_topic("b", 0, &three),
            Err(BuildError::Full { .. })
        ));
        assert!(matches!(
            builder.add_topic("a", 5, &small),
            Err(BuildError::DuplicateTopic { .. })
        ));
        assert!(matches!(
            builder.add_topic("b", 0, &[]),
            Err(BuildError::EmptyBatch { .. })
        ));
        assert!(matches!(
            builder.add_topic("b", u64::MAX - 1, &[small[0]; 2]),
            Err(BuildError::EntryIdOverflow { .. })
        ));
        builder.add_topic("b", 0, &small).expect("b");
        assert!(matches!(
            builder.add_topic("c", 0, &small),
            Err(BuildError::Full { .. })
        ));
        let object = builder.finish().expect("finish");
        assert!(object.bytes.len() as u64 <= limits.max_object_bytes);
        assert_eq!(decode_all(&object.bytes).expect("decode").len(), 2);
        assert_eq!(
            DataObjectBuilder::new(DataObjectLimits::default())
                .expect("limits")
                .finish(),
            Err(BuildError::EmptyObject)
        );
        assert!(DataObjectBuilder::new(DataObjectLimits {
            max_object_bytes: MAX_OBJECT_BYTES + 1,
            ..DataObjectLimits::default()
        })
        .is_err());
    }

    #[test]
    fn keys_sort_in_commit_order() {
        assert_eq!(
            data_object_key("b1", 3, 12),
            "data/b1/00000000000000000003/00000000000000000012.seg"
        );
        assert!(data_object_key("b1", 3, 9) < data_object_key("b1", 3, 10));
    }
}
