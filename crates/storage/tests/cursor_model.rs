//! Acknowledgements checked against a model: the set of the log's entries acknowledged so far.
//!
//! The log has several ledgers (a gap of entry ids after each one's end) and small segments
//! (rolls within a ledger); acknowledgements come one by one, in runs, cumulatively, with
//! positions that are not entries among them, under a small and a large range limit, and with
//! power cuts after a persistence pass in between. After every step each entry must be
//! acknowledged exactly when the model says so, the backlog must count the others, the
//! mark-delete position must sit at the end of the acknowledged prefix, and the cursor must
//! hold no position that is not an entry.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_storage::{
    ChangeKind, CrashMode, InitialPosition, Position, SimIo, Storage, StorageConfig, StorageError,
};
use proptest::prelude::*;
use support::cursors::append;

fn config(max_ranges: usize) -> StorageConfig {
    StorageConfig {
        // Four entries of 200 bytes per segment: rolls within a ledger.
        segment_max_bytes: 1024,
        entry_max_bytes: 512,
        flush_threads: 1,
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        cursor_max_ranges: max_ranges,
        ..StorageConfig::default()
    }
}

fn open(io: &SimIo, max_ranges: usize) -> Storage {
    Storage::open_with_io(Path::new("/data"), config(max_ranges), Arc::new(io.clone()))
        .expect("open")
}

#[derive(Debug, Clone)]
enum Step {
    /// Positions picked among the candidates (entries and positions around them).
    Acknowledge(Vec<usize>),
    /// Entries picked, acknowledged as runs in log order.
    AcknowledgeRuns(Vec<usize>),
    /// Everything up to a candidate.
    Cumulative(usize),
    /// A persistence pass, then a power cut and a restart.
    PowerCut,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => prop::collection::vec(any::<usize>(), 0..8).prop_map(Step::Acknowledge),
        2 => prop::collection::vec(any::<usize>(), 0..8).prop_map(Step::AcknowledgeRuns),
        1 => any::<usize>().prop_map(Step::Cumulative),
        1 => Just(Step::PowerCut),
    ]
}

/// The last entry of the acknowledged prefix of `entries`.
fn model_mark_delete(entries: &[Position], acknowledged: &BTreeSet<Position>) -> Option<Position> {
    entries
        .iter()
        .take_while(|entry| acknowledged.contains(entry))
        .last()
        .copied()
}

/// The positions refused by `result`, or the error it is not a refusal.
fn refused_by(result: Result<(), StorageError>) -> Vec<Position> {
    match result {
        Ok(()) => Vec::new(),
        Err(StorageError::TooManyAcknowledgedRanges { refused, .. }) => refused,
        Err(error) => panic!("acknowledgement failed: {error}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn acknowledgements_match_the_model(
        ledgers in prop::collection::vec(0..9_u64, 1..4),
        steps in prop::collection::vec(step(), 1..40),
        max_ranges in prop_oneof![Just(1_usize), Just(2), Just(3), Just(100_000)],
    ) {
        let mut io = SimIo::new();
        let mut entries: Vec<Position> = Vec::new();
        // A new ledger at each open.
        for count in &ledgers {
            let storage = open(&io, max_ranges);
            let log = storage.open_log("t").expect("log");
            entries.extend(append(&log, *count));
            storage.close().expect("close");
        }
        let mut storage = open(&io, max_ranges);
        let mut log = storage.open_log("t").expect("log");
        entries.extend(append(&log, 5));
        log.open_cursor("sub", InitialPosition::Earliest).expect("cursor");
        let held: BTreeSet<Position> = entries.iter().copied().collect();
        // Entries, the two ids after each (in a ledger's gap after its last one), the same id
        // in the next ledger, and the very first position.
        let mut candidates = entries.clone();
        for entry in &entries {
            candidates.push(Position::new(entry.ledger_id, entry.entry_id + 1));
            candidates.push(Position::new(entry.ledger_id, entry.entry_id + 2));
            candidates.push(Position::new(entry.ledger_id + 1, entry.entry_id));
        }
        candidates.push(Position::new(0, 0));
        let last = *entries.last().expect("entries");
        let mut acknowledged: BTreeSet<Position> = BTreeSet::new();
        for step in steps {
            match step {
                Step::Acknowledge(picks) => {
                    let positions: Vec<Position> =
                        picks.iter().map(|pick| candidates[pick % candidates.len()]).collect();
                    let before = acknowledged.len();
                    let result = log.acknowledge_changed("sub", &positions, ChangeKind::Own);
                    let changed = result.as_ref().ok().copied();
                    let refused = refused_by(result.map(|_| ()));
                    for position in &positions {
                        if held.contains(position) && !refused.contains(position) {
                            acknowledged.insert(*position);
                        }
                    }
                    for position in &refused {
                        prop_assert!(!log.is_acknowledged("sub", *position), "{:?} refused yet acknowledged", position);
                    }
                    if let Some(changed) = changed {
                        prop_assert_eq!(changed, acknowledged.len() > before, "changed");
                    }
                }
                Step::AcknowledgeRuns(picks) => {
                    let mut positions: Vec<Position> =
                        picks.iter().map(|pick| entries[pick % entries.len()]).collect();
                    positions.sort();
                    positions.dedup();
                    let before = acknowledged.clone();
                    let refused = refused_by(log.acknowledge_runs("sub", &positions).map(|_| ()));
                    for position in positions {
                        if !refused.contains(&position) || before.contains(&position) {
                            acknowledged.insert(position);
                        }
                    }
                }
                Step::Cumulative(pick) => {
                    let target = candidates[pick % candidates.len()].min(last);
                    acknowledged.extend(entries.iter().filter(|entry| **entry <= target));
                    log.acknowledge_cumulative("sub", target).expect("cumulative");
                }
                Step::PowerCut => {
                    log.persist_cursors().expect("persist");
                    let persisted = log.cursor("sub").expect("cursor");
                    io = io.crash(CrashMode::LoseUnsynced, 0);
                    drop(log);
                    drop(storage);
                    storage = open(&io, max_ranges);
                    log = storage.open_log("t").expect("log");
                    prop_assert_eq!(log.cursor("sub"), Some(persisted), "cursor after the power cut");
                }
            }
            for entry in &entries {
                prop_assert_eq!(
                    log.is_acknowledged("sub", *entry),
                    acknowledged.contains(entry),
                    "entry {:?}",
                    entry
                );
            }
            let backlog = entries.len() - acknowledged.len();
            prop_assert_eq!(log.backlog_entries("sub"), Some(backlog as u64));
            prop_assert!(log.acknowledged_range_count("sub") <= max_ranges);
            let cursor = log.cursor("sub").expect("cursor");
            // A cumulative acknowledgement of a position in a gap may leave the mark-delete
            // position there, past the prefix's last entry but before the next entry.
            let expected = model_mark_delete(&entries, &acknowledged);
            prop_assert!(cursor.mark_delete >= expected, "mark-delete {:?} behind {:?}", cursor.mark_delete, expected);
            if let Some(next) = entries.iter().find(|entry| Some(**entry) > expected) {
                prop_assert!(cursor.mark_delete < Some(*next), "mark-delete {:?} past {:?}", cursor.mark_delete, next);
            }
            for (ledger_id, first, end) in cursor.acknowledged.iter() {
                for entry_id in first..=end {
                    prop_assert!(
                        held.contains(&Position::new(ledger_id, entry_id)),
                        "{}:{} is no entry",
                        ledger_id,
                        entry_id
                    );
                }
            }
        }
    }
}
