//! A message id from another cluster, read as the origin position of a replicated entry here.
//!
//! A reader that moves to another cluster (a tenant migration's `TOPIC_MIGRATED`, or a failover
//! of geo-replication) subscribes there with the last message id it received, which is in the
//! first cluster's numbering. Every replicated entry carries its origin position
//! ([`super::chain::ORIGIN_PROPERTY`]), so the entry that carries that id as its origin
//! position is where the reader was. [`reader_start`] finds it: a binary search over the log,
//! because the entries of one origin are stored in origin order; the work is bounded by
//! [`WINDOW`] entries read per step and about `log2(entries)` steps.
//!
//! An id whose ledger is one of this log's own ledgers keeps its local meaning (ledger ids are
//! per cluster, so a foreign id could match a local one by chance: the local one wins).

use meridian_storage::{Log, Position};

use super::chain;
use crate::error::Result;

/// Entries read at one step of the search, looking for a replicated entry among local ones.
pub const WINDOW: usize = 32;
/// Bytes read at one step at most.
const WINDOW_BYTES: usize = 1024 * 1024;

/// A replicated entry found by its origin position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Its position in this log.
    pub position: Position,
    /// Messages in it (1 for an entry that is not a batch).
    pub messages: i32,
}

/// Where a reader that asks to start at `id` (with `batch_index`, -1 when none) starts in
/// this log: `None` when the id is a position of this log, or no replicated entry here has it
/// as its origin position (the caller then reads it as a local position, as before).
///
/// The reader continues *after* the message `id` names, as a Pulsar broker reads a
/// non-durable subscription's start id: after the entry, or, for a message in the middle of
/// a batch, at that batch (its messages up to `batch_index` are delivered again: the client
/// skips them only by their own id, which differs here).
pub fn reader_start(log: &Log, id: Position, batch_index: i32) -> Result<Option<Position>> {
    let Some(found) = foreign(log, id)? else {
        return Ok(None);
    };
    if batch_index >= 0 && batch_index + 1 < found.messages {
        return Ok(Some(found.position));
    }
    Ok(Some(log.next_position(found.position)))
}

/// Where a seek to message id `id` goes in this log: the entry that came from `id` (a seek
/// delivers the message it names again), or `None` as for [`reader_start`].
pub fn seek_position(log: &Log, id: Position) -> Result<Option<Position>> {
    Ok(foreign(log, id)?.map(|found| found.position))
}

/// The replicated entry that came from `id`, unless `id` is in one of this log's own ledgers.
fn foreign(log: &Log, id: Position) -> Result<Option<Found>> {
    let ledgers = log.ledgers();
    if ledgers.iter().any(|(ledger, _, _)| *ledger == id.ledger_id) {
        return Ok(None);
    }
    find_origin(log, id)
}

/// The ledgers of `log` as `(ledger, first entry id, entries)`, in order.
fn spans(log: &Log) -> Result<Vec<(u64, u64, u64)>> {
    let mut spans = Vec::new();
    for (ledger, entries, _) in log.ledgers() {
        if entries == 0 {
            continue;
        }
        let first = log.read_from(Position::new(ledger, 0), 1, 1)?;
        if let Some(first) = first
            .first()
            .filter(|entry| entry.position.ledger_id == ledger)
        {
            spans.push((ledger, first.position.entry_id, entries));
        }
    }
    Ok(spans)
}

/// The position of the `index`-th entry of the log described by `spans`.
fn position_at(spans: &[(u64, u64, u64)], mut index: u64) -> Option<Position> {
    for (ledger, first, entries) in spans {
        if index < *entries {
            return Some(Position::new(*ledger, first + index));
        }
        index -= entries;
    }
    None
}

/// The first replicated entry at or after `from`, within [`WINDOW`] entries:
/// `(its position, its origin position, messages in it)`.
fn first_replicated(log: &Log, from: Position) -> Result<Option<(Position, Position, i32)>> {
    for entry in log.read_from(from, WINDOW, WINDOW_BYTES)? {
        let Ok(metadata) = meridian_wire::entry_metadata(entry.data) else {
            continue;
        };
        if metadata.marker_type.is_some() {
            continue;
        }
        if let Some(origin) = chain::origin_of(&metadata) {
            let messages = metadata.num_messages_in_batch.unwrap_or(1);
            return Ok(Some((entry.position, origin.position, messages)));
        }
    }
    Ok(None)
}

/// The entry of `log` whose origin position is `origin`, if any.
pub fn find_origin(log: &Log, origin: Position) -> Result<Option<Found>> {
    let spans = spans(log)?;
    let total: u64 = spans.iter().map(|(_, _, entries)| entries).sum();
    // The first index whose next replicated entry (within the window) comes from at or after
    // `origin`; an index with no replicated entry in its window counts as "after" (local
    // entries follow the replicated ones once a tenant moved).
    let (mut low, mut high) = (0, total);
    while low < high {
        let middle = low + (high - low) / 2;
        let Some(position) = position_at(&spans, middle) else {
            break;
        };
        match first_replicated(log, position)? {
            Some((_, at, _)) if at < origin => low = middle + 1,
            _ => high = middle,
        }
    }
    let Some(position) = position_at(&spans, low) else {
        return Ok(None);
    };
    Ok(match first_replicated(log, position)? {
        Some((position, at, messages)) if at == origin => Some(Found { position, messages }),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use meridian_storage::{Storage, StorageConfig};
    use meridian_wire::proto::KeyValue;
    use meridian_wire::MessageMetadata;

    /// Appends an entry stored here (`origin` `None`) or replicated from cluster `a` at
    /// `origin`, holding `messages` messages.
    fn append(log: &Arc<Log>, origin: Option<Position>, messages: i32) -> Position {
        let metadata = MessageMetadata {
            producer_name: "p".into(),
            replicated_from: origin.map(|_| "a".to_string()),
            properties: origin
                .map(|origin| KeyValue {
                    key: chain::ORIGIN_PROPERTY.to_string(),
                    value: chain::format_position(origin),
                })
                .into_iter()
                .collect(),
            num_messages_in_batch: (messages > 1).then_some(messages),
            ..MessageMetadata::default()
        };
        let entry = meridian_wire::encode_entry(&metadata, b"payload").expect("encodes");
        log.append(entry, 1)
            .expect("appends")
            .wait()
            .expect("durable")
    }

    #[test]
    fn an_origin_position_names_the_entry_that_came_from_it_and_a_local_one_keeps_its_meaning() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let storage = Storage::open(directory.path(), StorageConfig::default()).expect("opens");
        let log = storage.open_log("t").expect("log");
        let local_before = append(&log, None, 1);
        // The origin's topic was reopened once: its entries are in two of its ledgers.
        let mut here = Vec::new();
        for entry in 0..150 {
            here.push(append(&log, Some(Position::new(9001, entry)), 1));
        }
        let batch = append(&log, Some(Position::new(9002, 0)), 3);
        for entry in 1..150 {
            here.push(append(&log, Some(Position::new(9002, entry)), 1));
        }
        let local_after = append(&log, None, 1);
        append(&log, None, 1);

        // After the entry that came from the id (what a reader that moved asks for).
        let start =
            |id: Position, batch_index: i32| reader_start(&log, id, batch_index).expect("reads");
        assert_eq!(start(Position::new(9001, 0), -1), Some(here[1]));
        assert_eq!(start(Position::new(9001, 77), -1), Some(here[78]));
        assert_eq!(start(Position::new(9001, 149), -1), Some(batch));
        assert_eq!(
            start(Position::new(9002, 149), -1),
            Some(local_after),
            "after the last replicated entry come the local ones"
        );
        // A message in the middle of a batch: that batch again; its last message: after it.
        assert_eq!(start(Position::new(9002, 0), 1), Some(batch));
        assert_eq!(start(Position::new(9002, 0), 2), Some(here[150]));
        // A miss: no entry came from that position.
        assert_eq!(start(Position::new(9002, 150), -1), None);
        assert_eq!(start(Position::new(9003, 0), -1), None);
        // An id in one of this log's own ledgers is a local position, whatever came from where.
        assert_eq!(start(local_before, -1), None);
        // A seek names the message delivered next: the entry that came from it.
        let seek = |id: Position| seek_position(&log, id).expect("reads");
        assert_eq!(seek(Position::new(9001, 77)), Some(here[77]));
        assert_eq!(seek(Position::new(9002, 150)), None);
        assert_eq!(seek(local_before), None);
        assert_eq!(
            find_origin(&log, Position::new(9001, 5)).expect("reads"),
            Some(Found {
                position: here[5],
                messages: 1
            })
        );
    }
}
