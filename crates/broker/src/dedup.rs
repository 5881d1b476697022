//! Message de-duplication by `(producer_name, sequence_id)`, as Pulsar does it.
//!
//! Two maps per producer name: the highest sequence id *pushed* (accepted for appending) and
//! *persisted* (durable). A message whose sequence id is at or below the pushed one is a
//! duplicate if it is also at or below the persisted one; otherwise its original is still in
//! flight and the outcome is unknown (the client is told to retry). The persisted map survives
//! restarts as properties of the topic's `pulsar.dedup` cursor, snapshotted every N entries by
//! a mark-delete at the snapshot position; on load the entries after it are replayed.
//!
//! Entries that replicators bring from other clusters are de-duplicated the same way, keyed by
//! origin cluster (`pulsar.repl.<cluster>`) with the origin position `(ledger, entry)` as the
//! sequence: [`position_sequence`] packs it into one ordered number. That key is tracked even
//! when de-duplication is off for the namespace, because replication depends on it.
//!
//! A replicated entry also names the origin position of the entry its replicator sent before
//! it to this cluster (the *chain*, see `replication/chain.rs`). [`Dedup::check_replicated`] stores a
//! new entry only if that previous position is the last one stored from its origin, so a gap in
//! what a replicator sends is refused ([`Verdict::Gap`]) instead of being papered over by a
//! high-water mark: the remote proves it holds every entry meant for it.

use std::collections::{BTreeMap, HashMap};

/// Name of the cursor that holds de-duplication snapshots.
pub const DEDUP_CURSOR: &str = "pulsar.dedup";

/// Prefix of replicator producer names and of the de-duplication keys of replicated entries.
pub const REPLICATOR_PREFIX: &str = "pulsar.repl.";

/// Prefix of the keys that remember, per producer name, the highest sequence id of the entries
/// replicated here from other clusters: a producer that moves here with its tenant
/// (`docs/migration.md`) resumes from it, so a message it sends again after the move is not
/// stored twice.
pub const LEARNED_PREFIX: &str = "pulsar.learned.";

/// The key under which a replicated producer's last sequence id is remembered.
pub fn learned_key(producer_name: &str) -> String {
    format!("{LEARNED_PREFIX}{producer_name}")
}

/// The highest sequence id an entry carries (the last message of a batch).
pub fn highest_sequence(metadata: &meridian_wire::proto::MessageMetadata) -> Sequence {
    let messages = u64::try_from(metadata.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1);
    let batch_last = metadata.sequence_id.saturating_add(messages - 1);
    Sequence::from(batch_last.max(metadata.highest_sequence_id.unwrap_or(0)))
}

/// What a replicated entry teaches about its producer: `(learned key, highest sequence id)`;
/// `None` for the broker's own entries (markers, replicators).
pub fn learned_from(
    metadata: &meridian_wire::proto::MessageMetadata,
) -> Option<(String, Sequence)> {
    let name = &metadata.producer_name;
    if name.is_empty() || name.starts_with("pulsar.") {
        return None;
    }
    Some((learned_key(name), highest_sequence(metadata)))
}

/// A de-duplication sequence: a producer's sequence id, or a packed origin position.
pub type Sequence = u128;

/// Packs an origin position so that positions compare as their sequences do.
pub fn position_sequence(ledger_id: u64, entry_id: u64) -> Sequence {
    (u128::from(ledger_id) << 64) | u128::from(entry_id)
}

/// The de-duplication key of entries replicated from `cluster`.
pub fn replication_key(cluster: &str) -> String {
    format!("{REPLICATOR_PREFIX}{cluster}")
}

/// The origin position `(ledger, entry)` a sequence packs.
pub fn sequence_position(sequence: Sequence) -> (u64, u64) {
    // Truncation is the unpacking: the high half is the ledger, the low half the entry.
    ((sequence >> 64) as u64, sequence as u64)
}

/// Whether a key or producer name belongs to replication.
pub fn is_replication_key(name: &str) -> bool {
    name.starts_with(REPLICATOR_PREFIX)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
    /// The original may still be in flight.
    Unknown,
    /// A replicated entry that does not continue its chain: the last entry stored from its
    /// origin (`None`: nothing) is not the one it names as previous.
    Gap {
        last: Option<Sequence>,
    },
}

#[derive(Debug, Default)]
pub struct Dedup {
    pushed: HashMap<String, Sequence>,
    persisted: HashMap<String, Sequence>,
    pub(crate) entries_since_snapshot: u64,
}

impl Dedup {
    /// State recovered from a snapshot's cursor properties.
    pub fn from_snapshot(properties: &BTreeMap<String, String>) -> Dedup {
        let persisted: HashMap<String, Sequence> = properties
            .iter()
            .filter_map(|(name, value)| Some((name.clone(), value.parse().ok()?)))
            .collect();
        Dedup {
            pushed: persisted.clone(),
            persisted,
            entries_since_snapshot: 0,
        }
    }

    pub fn check(
        &mut self,
        producer_name: &str,
        sequence_id: Sequence,
        highest_sequence_id: Sequence,
    ) -> Verdict {
        let highest = sequence_id.max(highest_sequence_id);
        if let Some(pushed) = self.pushed.get(producer_name) {
            if sequence_id <= *pushed {
                let persisted = self.persisted.get(producer_name).copied();
                return if persisted.is_some_and(|persisted| highest <= persisted) {
                    Verdict::Duplicate
                } else {
                    Verdict::Unknown
                };
            }
        }
        self.pushed.insert(producer_name.to_string(), highest);
        Verdict::New
    }

    /// Checks an entry replicated from another cluster under `key`: `sequence` is its origin
    /// position, `previous` the origin position of the entry its replicator sent before it
    /// (`None`: it starts a chain, as after a new or reset replication cursor). A duplicate is
    /// recognised first; a new entry must continue the chain.
    pub fn check_replicated(
        &mut self,
        key: &str,
        sequence: Sequence,
        previous: Option<Sequence>,
    ) -> Verdict {
        let last = self.pushed.get(key).copied();
        let seen = last.is_some_and(|last| sequence <= last);
        if !seen && previous.is_some() && previous != last {
            return Verdict::Gap { last };
        }
        self.check(key, sequence, sequence)
    }

    /// Records a durable entry (also used when replaying entries on load).
    pub fn persisted(&mut self, producer_name: &str, highest_sequence_id: Sequence) {
        for map in [&mut self.persisted, &mut self.pushed] {
            let entry = map
                .entry(producer_name.to_string())
                .or_insert(highest_sequence_id);
            *entry = (*entry).max(highest_sequence_id);
        }
    }

    /// After a failed append, nothing in flight will become durable.
    pub fn reset_pushed(&mut self) {
        self.pushed = self.persisted.clone();
    }

    /// The last sequence id to report to a producer with this name (-1: none).
    pub fn last_sequence_id(&self, producer_name: &str) -> i64 {
        self.pushed
            .get(producer_name)
            .and_then(|sequence| i64::try_from(*sequence).ok())
            .unwrap_or(-1)
    }

    /// A local producer named like one whose entries were replicated here takes over its
    /// sequence (it moved here with its tenant): returns whether there was one to take over.
    pub fn adopt(&mut self, producer_name: &str) -> bool {
        let Some(learned) = self.persisted.get(&learned_key(producer_name)).copied() else {
            return false;
        };
        self.persisted(producer_name, learned);
        true
    }

    /// Keeps only the replication keys (de-duplication is off for the namespace).
    pub fn retain_replication(&mut self) {
        let keep = |name: &String| is_replication_key(name) || name.starts_with(LEARNED_PREFIX);
        self.pushed.retain(|name, _| keep(name));
        self.persisted.retain(|name, _| keep(name));
    }

    /// Whether any replication key is tracked.
    pub fn tracks_replication(&self) -> bool {
        self.persisted.keys().any(|name| is_replication_key(name))
    }

    pub fn snapshot(&self) -> BTreeMap<String, String> {
        self.persisted
            .iter()
            .map(|(name, sequence)| (name.clone(), sequence.to_string()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_unknowns_and_snapshots() {
        let mut dedup = Dedup::default();
        assert_eq!(dedup.check("p", 0, 0), Verdict::New);
        assert_eq!(
            dedup.check("p", 0, 0),
            Verdict::Unknown,
            "original still in flight"
        );
        dedup.persisted("p", 0);
        assert_eq!(dedup.check("p", 0, 0), Verdict::Duplicate);
        assert_eq!(dedup.check("p", 1, 4), Verdict::New);
        dedup.persisted("p", 4);
        assert_eq!(dedup.last_sequence_id("p"), 4);
        let restored = Dedup::from_snapshot(&dedup.snapshot());
        assert_eq!(restored.last_sequence_id("p"), 4);
        assert_eq!(restored.last_sequence_id("q"), -1);
    }

    #[test]
    fn a_replicated_entry_must_continue_its_chain() {
        let mut dedup = Dedup::default();
        let key = replication_key("east");
        let (first, second, third) = (
            position_sequence(3, 0),
            position_sequence(3, 4),
            position_sequence(5, 0),
        );
        assert_eq!(
            dedup.check_replicated(&key, second, Some(first)),
            Verdict::Gap { last: None },
            "nothing stored yet, so nothing to continue"
        );
        assert_eq!(dedup.check_replicated(&key, first, None), Verdict::New);
        dedup.persisted(&key, first);
        assert_eq!(
            dedup.check_replicated(&key, third, Some(second)),
            Verdict::Gap { last: Some(first) },
            "the entry in between is missing"
        );
        assert_eq!(
            dedup.check_replicated(&key, second, Some(first)),
            Verdict::New
        );
        dedup.persisted(&key, second);
        assert_eq!(
            dedup.check_replicated(&key, first, Some(third)),
            Verdict::Duplicate,
            "a resent entry is a duplicate whatever it names as previous"
        );
        assert_eq!(sequence_position(third), (5, 0));
    }

    #[test]
    fn a_producer_that_moved_here_resumes_its_replicated_sequence() {
        let mut dedup = Dedup::default();
        assert!(!dedup.adopt("orders"), "nothing replicated from it");
        dedup.persisted(&learned_key("orders"), 41);
        let mut restored = Dedup::from_snapshot(&dedup.snapshot());
        restored.retain_replication();
        assert!(restored.adopt("orders"));
        assert_eq!(restored.last_sequence_id("orders"), 41);
        assert_eq!(restored.check("orders", 41, 41), Verdict::Duplicate);
        assert_eq!(restored.check("orders", 42, 42), Verdict::New);
    }

    #[test]
    fn origin_positions_order_like_positions() {
        let mut dedup = Dedup::default();
        let key = replication_key("east");
        let first = position_sequence(3, u64::MAX);
        let next = position_sequence(4, 0);
        assert!(first < next);
        assert_eq!(dedup.check(&key, first, first), Verdict::New);
        dedup.persisted(&key, first);
        assert_eq!(dedup.check(&key, next, next), Verdict::New);
        dedup.persisted(&key, next);
        assert_eq!(dedup.check(&key, first, first), Verdict::Duplicate);
        let mut restored = Dedup::from_snapshot(&dedup.snapshot());
        dedup.persisted("local-producer", 7);
        restored.persisted("local-producer", 7);
        restored.retain_replication();
        assert!(restored.tracks_replication());
        assert_eq!(restored.last_sequence_id("local-producer"), -1);
        assert_eq!(restored.check(&key, next, next), Verdict::Duplicate);
    }
}
