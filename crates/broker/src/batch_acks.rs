//! Batch-index acknowledgements (Pulsar's `acknowledgmentAtBatchIndexLevelEnabled`): a consumer
//! may acknowledge some messages of a batch entry and not others.
//!
//! An acknowledgement carries the batch's `ack_set`: little-endian 64-bit words in which bit `i`
//! set means message `i` of the batch is still **not** acknowledged (Pulsar's convention). Per
//! subscription, the entries acknowledged in part are kept in the cursor property
//! [`PROPERTY`], so they are persisted and recovered with the cursor; an entry whose every
//! message is acknowledged becomes an ordinary acknowledged entry and leaves the property. A
//! dispatched entry carries its words in `CommandMessage.ack_set` and the client skips the
//! messages already acknowledged.
//!
//! At most [`MAX_PARTIAL_BATCHES`] entries per subscription are kept in part; beyond that a
//! new partial acknowledgement is dropped (the batch is redelivered whole: a duplicate, never
//! a loss).

use std::collections::BTreeMap;

use meridian_storage::{Log, Position};

use crate::error::Result;

/// The cursor property with the entries acknowledged in part.
pub const PROPERTY: &str = "meridian.batch-acks";

/// Entries acknowledged in part kept per subscription at most.
pub const MAX_PARTIAL_BATCHES: usize = 10_000;

/// Per entry, its batch's unacknowledged messages (bit `i` set: message `i` not acknowledged).
pub type Partial = BTreeMap<Position, Vec<u64>>;

/// The words of an `ack_set` as sent on the wire.
pub fn from_wire(ack_set: &[i64]) -> Vec<u64> {
    ack_set.iter().map(|word| *word as u64).collect()
}

/// The words as sent on the wire.
pub fn to_wire(words: &[u64]) -> Vec<i64> {
    words.iter().map(|word| *word as i64).collect()
}

/// Whether an `ack_set` says every message of its batch is acknowledged.
pub fn is_complete(words: &[u64]) -> bool {
    words.iter().all(|word| *word == 0)
}

/// What is left unacknowledged when `more` is acknowledged on top of `known`: a message stays
/// unacknowledged only if both say so. A word one side lacks says nothing: the other decides.
pub fn merge(known: Option<&[u64]>, more: &[u64]) -> Vec<u64> {
    let Some(known) = known else {
        return more.to_vec();
    };
    (0..known.len().max(more.len()))
        .map(|index| match (known.get(index), more.get(index)) {
            (Some(a), Some(b)) => a & b,
            (Some(word), None) | (None, Some(word)) => *word,
            (None, None) => 0,
        })
        .collect()
}

/// The entries of a cursor acknowledged in part, as kept in its properties.
pub fn decode(properties: &BTreeMap<String, String>) -> Partial {
    let mut partial = Partial::new();
    let Some(text) = properties.get(PROPERTY) else {
        return partial;
    };
    for item in text.split(';').filter(|item| !item.is_empty()) {
        let Some((position, words)) = item.split_once('=') else {
            continue;
        };
        let Some(position) = crate::replication::chain::parse_position(position) else {
            continue;
        };
        let words: Option<Vec<u64>> = words
            .split('.')
            .map(|word| u64::from_str_radix(word, 16).ok())
            .collect();
        if let Some(words) = words {
            partial.insert(position, words);
        }
    }
    partial
}

/// The entries acknowledged in part of a cursor restored into a cluster-mode copy whose one
/// ledger is `ledger_id` (`crates/broker/src/cluster/logs.rs`): an entry kept under an earlier
/// copy's ledger is the entry with the same id in this one, so it is kept under `ledger_id`.
pub fn in_copy(
    mut properties: BTreeMap<String, String>,
    ledger_id: u64,
) -> BTreeMap<String, String> {
    let partial: Partial = decode(&properties)
        .into_iter()
        .map(|(position, words)| {
            let position = crate::cluster::logs::in_copy_ledger(ledger_id, position);
            (position, words)
        })
        .collect();
    match encode(&partial) {
        Some(text) => properties.insert(PROPERTY.to_string(), text),
        None => properties.remove(PROPERTY),
    };
    properties
}

/// `ledger:entry=word.word;…`, words in hexadecimal; `None` when nothing is kept.
fn encode(partial: &Partial) -> Option<String> {
    if partial.is_empty() {
        return None;
    }
    let items: Vec<String> = partial
        .iter()
        .map(|(position, words)| {
            let words: Vec<String> = words.iter().map(|word| format!("{word:x}")).collect();
            format!(
                "{}:{}={}",
                position.ledger_id,
                position.entry_id,
                words.join(".")
            )
        })
        .collect();
    Some(items.join(";"))
}

/// Records partial acknowledgements `(entry, unacknowledged words)` for `cursor`: merged with
/// what is kept, entries no longer in the log or acknowledged whole are dropped. Returns what
/// is kept now and the entries that became acknowledged whole (for the caller to acknowledge).
/// The caller holds the topic's cursor-properties lock.
pub fn record(
    log: &Log,
    cursor: &str,
    acks: &[(Position, Vec<u64>)],
) -> Result<(Partial, Vec<Position>)> {
    let Some(state) = log.cursor(cursor) else {
        return Ok((Partial::new(), Vec::new()));
    };
    let mut partial = decode(&state.properties);
    let before = partial.clone();
    let first = log.first_position();
    let exists = |position: Position| {
        first.is_some_and(|first| position >= first)
            && log.last_position().is_some_and(|last| position <= last)
    };
    // Entries acknowledged whole since (a cumulative or an individual acknowledgement) leave
    // first, so that they never take the place of a new one under the cap.
    partial.retain(|position, _| exists(*position) && !state.is_acknowledged(*position));
    let mut complete = Vec::new();
    for (position, unacked) in acks {
        if !exists(*position) || state.is_acknowledged(*position) {
            continue;
        }
        let merged = merge(partial.get(position).map(Vec::as_slice), unacked);
        if is_complete(&merged) {
            partial.remove(position);
            complete.push(*position);
        } else if partial.contains_key(position) || partial.len() < MAX_PARTIAL_BATCHES {
            partial.insert(*position, merged);
        }
    }
    if partial != before {
        let mut properties = state.properties;
        match encode(&partial) {
            Some(text) => properties.insert(PROPERTY.to_string(), text),
            None => properties.remove(PROPERTY),
        };
        log.set_cursor_properties(cursor, properties)?;
    }
    Ok((partial, complete))
}

/// Forgets every partial acknowledgement of `cursor` (the subscription moved back: those
/// messages are to be delivered again). The caller holds the cursor-properties lock.
pub fn clear(log: &Log, cursor: &str) -> Result<()> {
    let Some(state) = log.cursor(cursor) else {
        return Ok(());
    };
    if state.properties.contains_key(PROPERTY) {
        let mut properties = state.properties;
        properties.remove(PROPERTY);
        log.set_cursor_properties(cursor, properties)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_mode_copy_keeps_an_earlier_copys_partial_batches_under_its_ledger() {
        let floor = crate::replication::chain::COPY_LEDGER_FLOOR;
        let kept: Partial = [
            (Position::new(floor, 3), vec![0b10]),
            (Position::new(floor * 2, 5), vec![0b100, 1]),
        ]
        .into_iter()
        .collect();
        let properties = BTreeMap::from([
            (PROPERTY.to_string(), encode(&kept).expect("kept")),
            ("other".to_string(), "1:2".to_string()),
        ]);
        let moved = in_copy(properties, floor * 3);
        let expected: Partial = [
            (Position::new(floor * 3, 3), vec![0b10]),
            (Position::new(floor * 3, 5), vec![0b100, 1]),
        ]
        .into_iter()
        .collect();
        assert_eq!(decode(&moved), expected);
        assert_eq!(moved["other"], "1:2", "other properties are left alone");
        // Standalone's ledgers (below the floor) are never moved.
        let standalone = Partial::from([(Position::new(7, 1), vec![1])]);
        let properties =
            BTreeMap::from([(PROPERTY.to_string(), encode(&standalone).expect("kept"))]);
        assert_eq!(decode(&in_copy(properties, floor * 3)), standalone);
    }

    #[test]
    fn entries_acknowledged_whole_since_do_not_count_against_the_cap() {
        use meridian_storage::{FlushPolicy, InitialPosition, Storage, StorageConfig};
        let directory = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            flush_policy: FlushPolicy::RelaxedWriteOnly {
                fsync_interval: std::time::Duration::from_secs(1),
            },
            ..StorageConfig::default()
        };
        let storage = Storage::open(directory.path(), config).expect("storage");
        let log = storage.open_log("persistent://t/n/cap").expect("log");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        let data = bytes::Bytes::from_static(b"batch");
        let pending: Vec<_> = (0..=MAX_PARTIAL_BATCHES)
            .map(|_| log.append(data.clone(), 2).expect("append"))
            .collect();
        let positions: Vec<Position> = pending
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect();
        // Every batch but the last acknowledged in part (message 0 of 2), up to the cap...
        let first_halves: Vec<(Position, Vec<u64>)> = positions[..MAX_PARTIAL_BATCHES]
            .iter()
            .map(|position| (*position, vec![0b10]))
            .collect();
        let (kept, _) = record(&log, "sub", &first_halves).expect("record");
        assert_eq!(kept.len(), MAX_PARTIAL_BATCHES);
        // ...then all of them acknowledged whole by a cumulative acknowledgement.
        log.acknowledge_cumulative("sub", positions[MAX_PARTIAL_BATCHES - 1])
            .expect("ack");
        // A new partial acknowledgement is kept: nothing else is acknowledged in part now.
        let last = positions[MAX_PARTIAL_BATCHES];
        let (kept, _) = record(&log, "sub", &[(last, vec![0b10])]).expect("record");
        assert_eq!(kept, Partial::from([(last, vec![0b10])]));
    }

    #[test]
    fn acknowledgements_add_up_and_round_trip() {
        // Messages 0..4 of a batch of 5: first 1 and 3 acknowledged, then 0.
        let first = merge(None, &[0b10101]);
        let second = merge(Some(&first), &[0b11110]);
        assert_eq!(second, vec![0b10100]);
        assert!(!is_complete(&second));
        assert!(is_complete(&merge(Some(&second), &[0b01011])));
        let partial = Partial::from([(Position::new(3, 7), vec![0b10100, u64::MAX])]);
        let properties =
            BTreeMap::from([(PROPERTY.to_string(), encode(&partial).expect("not empty"))]);
        assert_eq!(decode(&properties), partial);
    }
}
