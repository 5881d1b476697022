//! Message de-duplication by `(producer_name, sequence_id)`, as Pulsar does it.
//!
//! Two maps per producer name: the highest sequence id *pushed* (accepted for appending) and
//! *persisted* (durable). A message whose sequence id is at or below the pushed one is a
//! duplicate if it is also at or below the persisted one; otherwise its original is still in
//! flight and the outcome is unknown (the client is told to retry). The persisted map survives
//! restarts as properties of the topic's `pulsar.dedup` cursor, snapshotted every N entries by
//! a mark-delete at the snapshot position; on load the entries after it are replayed.

use std::collections::{BTreeMap, HashMap};

/// Name of the cursor that holds de-duplication snapshots.
pub const DEDUP_CURSOR: &str = "pulsar.dedup";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
    /// The original may still be in flight.
    Unknown,
}

#[derive(Debug, Default)]
pub struct Dedup {
    pushed: HashMap<String, u64>,
    persisted: HashMap<String, u64>,
    pub(crate) entries_since_snapshot: u64,
}

impl Dedup {
    /// State recovered from a snapshot's cursor properties.
    pub fn from_snapshot(properties: &BTreeMap<String, String>) -> Dedup {
        let persisted: HashMap<String, u64> = properties
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
        sequence_id: u64,
        highest_sequence_id: u64,
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

    /// Records a durable entry (also used when replaying entries on load).
    pub fn persisted(&mut self, producer_name: &str, highest_sequence_id: u64) {
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
            .map(|sequence| *sequence as i64)
            .unwrap_or(-1)
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
}
