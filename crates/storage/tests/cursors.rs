//! Durable cursors (mark-delete, individual acks, properties) across restarts and crashes, and
//! trimming that really frees disk space.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{
    ChangeKind, CrashMode, InitialPosition, Position, Retention, SimIo, Storage, StorageConfig,
};
use support::cursors::append;

fn config() -> StorageConfig {
    StorageConfig {
        segment_max_bytes: 8 * 1024,
        entry_max_bytes: 1024,
        // Persistence is driven by the tests themselves.
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

/// A fresh engine in a temporary directory (kept alive by the first value) with log `t` of
/// `count` entries and cursor `sub` at its start.
fn log_with_cursor(
    count: u64,
) -> (
    tempfile::TempDir,
    Storage,
    Arc<meridian_storage::Log>,
    Vec<Position>,
) {
    let root = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(root.path(), config()).expect("open");
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, count);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    (root, storage, log, positions)
}

#[test]
fn cursor_state_survives_a_restart() {
    let root = tempfile::tempdir().expect("tempdir");
    let expected;
    let positions;
    {
        let storage = Storage::open(root.path(), config()).expect("open");
        let log = storage.open_log("t").expect("log");
        positions = append(&log, 100);
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        log.open_cursor("latest", InitialPosition::Latest)
            .expect("cursor");
        // Out-of-order individual acks: 0..=9 (advances mark-delete), then 20, 22, 23, 40..50.
        let mut acks: Vec<Position> = positions[0..10].to_vec();
        acks.reverse();
        acks.extend([positions[20], positions[23], positions[22]]);
        acks.extend(&positions[40..=50]);
        let mark_delete = log.acknowledge("sub", &acks).expect("ack");
        assert_eq!(mark_delete, Some(positions[9]));
        let mut properties = BTreeMap::new();
        properties.insert("replicated".to_string(), "true".to_string());
        log.set_cursor_properties("sub", properties)
            .expect("properties");
        expected = log.cursor("sub").expect("state");
        assert_eq!(expected.acknowledged.range_count(), 3);
        storage.close().expect("close persists cursors");
    }
    let storage = Storage::open(root.path(), config()).expect("reopen");
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.cursor("sub"), Some(expected));
    assert_eq!(
        log.cursor("latest").expect("latest").mark_delete,
        Some(positions[99])
    );
    // Acknowledging the gaps moves mark-delete over the individually acked ranges.
    let mark_delete = log.acknowledge("sub", &positions[10..20]).expect("ack");
    assert_eq!(mark_delete, Some(positions[20]));
    log.acknowledge("sub", &[positions[21]]).expect("ack");
    assert_eq!(
        log.cursor("sub").expect("state").mark_delete,
        Some(positions[23])
    );
    let mark_delete = log
        .acknowledge_cumulative("sub", positions[60])
        .expect("cumulative");
    assert_eq!(mark_delete, Some(positions[60]));
    assert!(log.cursor("sub").expect("state").acknowledged.is_empty());
}

#[test]
fn a_crash_between_ack_and_persistence_redelivers_but_never_skips() {
    // Models a crash after acknowledgements changed the cursor in memory but before the next
    // persistence interval wrote them.
    let io = SimIo::new();
    let open = |io: &SimIo| {
        Storage::open_with_io(Path::new("/data"), config(), Arc::new(io.clone())).expect("open")
    };
    let storage = open(&io);
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, 50);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    log.acknowledge("sub", &positions[0..10]).expect("ack");
    log.acknowledge("sub", &[positions[15]]).expect("ack");
    log.persist_cursors().expect("persist");
    let persisted = log.cursor("sub").expect("state");
    // Not persisted before the crash:
    log.acknowledge("sub", &positions[10..30]).expect("ack");
    let crashed = io.crash(CrashMode::TornWithGarbage, 3);
    drop(storage);

    let storage = open(&crashed);
    let log = storage.open_log("t").expect("log");
    let recovered = log.cursor("sub").expect("cursor survives");
    assert_eq!(recovered, persisted, "back to the last persisted state");
    // Every unacknowledged entry is still unacknowledged: redelivery starts right after the
    // mark-delete position, and nothing acknowledged before the persist comes back.
    for (index, position) in positions.iter().enumerate() {
        let acknowledged = index < 10 || index == 15;
        assert_eq!(
            recovered.is_acknowledged(*position),
            acknowledged,
            "entry {index}"
        );
    }
}

#[test]
fn deleted_cursors_stay_deleted() {
    let root = tempfile::tempdir().expect("tempdir");
    {
        let storage = Storage::open(root.path(), config()).expect("open");
        let log = storage.open_log("t").expect("log");
        log.open_cursor("gone", InitialPosition::Earliest)
            .expect("cursor");
        log.open_cursor("kept", InitialPosition::Earliest)
            .expect("cursor");
        log.persist_cursors().expect("persist");
        log.delete_cursor("gone").expect("delete");
        assert!(log.delete_cursor("gone").is_err());
        storage.close().expect("close");
    }
    let storage = Storage::open(root.path(), config()).expect("reopen");
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.cursor_names(), vec!["kept".to_string()]);
}

fn directory_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .expect("list")
        .map(|entry| entry.expect("entry").metadata().expect("stat").len())
        .sum()
}

#[test]
fn trimming_deletes_consumed_segments_and_frees_disk() {
    let root = tempfile::tempdir().expect("tempdir");
    // Trimmed files are deleted, not kept for reuse (tests/recycling.rs).
    let config = StorageConfig {
        recycled_segments_max: 0,
        ..config()
    };
    let storage = Storage::open(root.path(), config).expect("open");
    let log = storage.open_log("t").expect("log");
    log.open_cursor("slow", InitialPosition::Earliest)
        .expect("cursor");
    log.open_cursor("fast", InitialPosition::Earliest)
        .expect("cursor");
    let positions = append(&log, 400);
    let full = directory_bytes(log.directory());
    assert!(full > 80_000, "{full}");

    // One cursor at the end is not enough: the slow one still needs everything.
    log.acknowledge_cumulative("fast", positions[399])
        .expect("ack");
    log.persist_cursors().expect("persist");
    assert_eq!(log.trim().expect("trim"), 0);

    // Acknowledged but not yet persisted does not count.
    log.acknowledge_cumulative("slow", positions[299])
        .expect("ack");
    assert_eq!(log.trim().expect("trim"), 0);

    log.persist_cursors().expect("persist");
    let freed = log.trim().expect("trim");
    assert!(freed > 50_000, "freed {freed}");
    let after = directory_bytes(log.directory());
    assert!(
        after < full - 50_000,
        "disk usage shrank from {full} to {after}"
    );
    // Unconsumed entries are all still there; consumed ones are gone.
    let first = log.first_position().expect("first");
    assert!(
        first > positions[250] && first <= positions[300],
        "first is {first}"
    );
    assert_eq!(
        log.read(positions[300]).expect("read").data[0],
        300u16 as u8
    );
}

#[test]
fn retention_keeps_consumed_data_by_size_and_time() {
    let (_root, _storage, log, positions) = log_with_cursor(400);
    log.acknowledge_cumulative("sub", positions[399])
        .expect("ack");
    log.persist_cursors().expect("persist");

    // Unlimited time: nothing goes.
    log.set_retention(Retention {
        time: None,
        size_bytes: None,
    });
    assert_eq!(log.trim().expect("trim"), 0);
    // Size limit: the newest ~40 KB stay.
    log.set_retention(Retention {
        time: None,
        size_bytes: Some(40_000),
    });
    log.trim().expect("trim");
    let stored = log.stats().storage_bytes;
    assert!((40_000..60_000).contains(&stored), "kept {stored} bytes");
    // No retention: everything but the active segment goes.
    log.set_retention(Retention::default());
    log.trim().expect("trim");
    assert_eq!(log.stats().segments, 1);
}

#[test]
fn a_million_out_of_order_acks_stay_compact_and_persist() {
    let root = tempfile::tempdir().expect("tempdir");
    // 333,333 ranges: above the default limit of ranges held in memory.
    let config = StorageConfig {
        cursor_max_ranges: 1_000_000,
        ..config()
    };
    let storage = Storage::open(root.path(), config.clone()).expect("open");
    let log = storage.open_log("t").expect("log");
    let ledger = log.current_ledger_id();
    // Entries are tiny; what matters is the number of acknowledgements.
    let pending: Vec<_> = (0..1_000_000u64)
        .map(|_| log.append(Bytes::from_static(b"x"), 0).expect("append"))
        .collect();
    drop(pending);
    while log.last_position() != Some(Position::new(ledger, 999_999)) {
        std::thread::sleep(Duration::from_millis(5));
    }
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    // Every third entry in a scrambled order, then the rest.
    let mut order: Vec<u64> = (0..1_000_000u64).filter(|entry| entry % 3 == 1).collect();
    order.sort_by_key(|entry| entry.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let acks: Vec<Position> = order
        .iter()
        .map(|entry| Position::new(ledger, *entry))
        .collect();
    log.acknowledge("sub", &acks).expect("ack");
    assert_eq!(
        log.cursor("sub").expect("state").acknowledged.range_count(),
        333_333
    );
    log.persist_cursors().expect("persist large snapshot");
    let rest: Vec<Position> = (0..1_000_000u64)
        .filter(|entry| entry % 3 != 1)
        .map(|entry| Position::new(ledger, entry))
        .collect();
    log.acknowledge("sub", &rest).expect("ack");
    let state = log.cursor("sub").expect("state");
    assert_eq!(state.mark_delete, Some(Position::new(ledger, 999_999)));
    assert!(state.acknowledged.is_empty());
    storage.close().expect("close");
    let storage = Storage::open(root.path(), config).expect("reopen");
    let log = storage.open_log("t").expect("log");
    assert_eq!(
        log.cursor("sub").expect("state").mark_delete,
        Some(Position::new(ledger, 999_999))
    );
}

#[test]
fn trimming_after_a_backward_seek_keeps_what_the_cursor_needs_even_if_persisting_failed() {
    // Models a `reset_cursor` to an earlier position whose persistence then fails (a failed
    // fsync of the journal): the cursor needs the earlier entries again, so trimming must not
    // go by the stale, later persisted position.
    let io = SimIo::new();
    let (_storage, log, positions) = sim_log_with_cursor(&io, config(), 200);
    log.acknowledge_cumulative("sub", positions[149])
        .expect("ack");
    log.persist_cursors().expect("persist");
    log.reset_cursor("sub", Some(positions[9]))
        .expect("seek back");
    io.fail_syncs(1);
    log.persist_cursors()
        .expect_err("persisting the seek fails");
    log.trim().expect("trim");
    let entries = log
        .read_from(positions[10], usize::MAX, usize::MAX)
        .expect("read");
    assert_eq!(
        entries.first().map(|entry| entry.position),
        Some(positions[10]),
        "the entries after the cursor's position are still there"
    );
    assert_eq!(entries.len(), 190);
}

fn open_sim(io: &SimIo, config: StorageConfig) -> Storage {
    Storage::open_with_io(Path::new("/data"), config, Arc::new(io.clone())).expect("open")
}

/// An engine on `io` with `config`, log `t` of `count` entries and cursor `sub` at its start.
fn sim_log_with_cursor(
    io: &SimIo,
    config: StorageConfig,
    count: u64,
) -> (Storage, Arc<meridian_storage::Log>, Vec<Position>) {
    let storage = open_sim(io, config);
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, count);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    (storage, log, positions)
}

/// A log of 100 entries on `io` whose cursor `sub` has persisted acknowledging the first ten.
fn log_with_a_persisted_cursor(io: &SimIo) -> (Storage, Arc<meridian_storage::Log>, Vec<Position>) {
    let (storage, log, positions) = sim_log_with_cursor(io, config(), 100);
    log.acknowledge_cumulative("sub", positions[9])
        .expect("ack");
    log.persist_cursors().expect("persist");
    (storage, log, positions)
}

/// Acknowledges every other entry of `positions` from `from` on: one range per acknowledgement.
fn acknowledge_every_other(log: &meridian_storage::Log, positions: &[Position], from: usize) {
    let acks: Vec<Position> = positions[from..].iter().step_by(2).copied().collect();
    log.acknowledge("sub", &acks).expect("ack");
}

#[test]
fn a_large_journal_is_rewritten_and_its_cursors_survive_a_restart() {
    // Exercises the rewrite path: many large snapshots grow the journal past its rewrite
    // threshold, the next persist replaces it with one snapshot per live cursor.
    let io = SimIo::new();
    let storage = open_sim(&io, config());
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, 6_000);
    let journal = log.directory().join("cursors.journal");
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    log.open_cursor("gone", InitialPosition::Earliest)
        .expect("cursor");
    acknowledge_every_other(&log, &positions, 1);
    let mut largest = 0;
    let mut rewritten = false;
    for (index, position) in positions.iter().take(400).enumerate() {
        log.acknowledge_cumulative("sub", *position).expect("ack");
        if index == 10 {
            log.delete_cursor("gone").expect("delete cursor");
        }
        log.persist_cursors().expect("persist");
        let length = io.read_file(&journal).expect("journal").len();
        if length < largest {
            rewritten = true;
            break;
        }
        largest = length;
    }
    assert!(
        rewritten,
        "the journal was rewritten (it reached {largest} bytes)"
    );
    assert!(largest > 1 << 20, "rewritten only past 1 MiB, at {largest}");
    let expected = log.cursor("sub").expect("state");
    storage.close().expect("close");

    let storage = open_sim(&io.crash(CrashMode::LoseUnsynced, 0), config());
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.cursor_names(), vec!["sub".to_string()]);
    assert_eq!(log.cursor("sub").expect("state"), expected);
}

#[test]
fn after_a_failed_journal_write_the_next_persist_rewrites_it_and_a_crash_recovers_that_state() {
    // Models a journal write that fails (I/O error) and leaves an unknown tail: the next persist
    // must not append after it, but write a fresh journal, and a power cut afterwards recovers
    // exactly the state that persist wrote.
    let io = SimIo::new();
    let (storage, log, positions) = log_with_a_persisted_cursor(&io);
    log.acknowledge_cumulative("sub", positions[19])
        .expect("ack");
    io.fail_writes(1);
    log.persist_cursors().expect_err("the journal write fails");
    log.acknowledge("sub", &[positions[30]]).expect("ack");
    log.persist_cursors().expect("persisting works again");
    let expected = log.cursor("sub").expect("state");
    assert_eq!(expected.mark_delete, Some(positions[19]));

    let storage_crashed = open_sim(&io.crash(CrashMode::TornWithGarbage, 5), config());
    drop(storage);
    let log = storage_crashed.open_log("t").expect("log");
    assert_eq!(log.cursor("sub").expect("state"), expected);
}

#[test]
fn a_torn_journal_tail_is_truncated_and_the_last_complete_snapshot_wins() {
    // Models a power cut between writing a snapshot to the journal and its fsync, in each way
    // the unsynced bytes can survive: none, a prefix, a prefix ending in garbage.
    for (seed, mode) in [
        CrashMode::LoseUnsynced,
        CrashMode::TornPrefix,
        CrashMode::TornWithGarbage,
    ]
    .into_iter()
    .enumerate()
    {
        let io = SimIo::new();
        let (storage, log, positions) = log_with_a_persisted_cursor(&io);
        let persisted = log.cursor("sub").expect("state");
        acknowledge_every_other(&log, &positions, 21);
        // The next step writes the snapshot; the one after it would fsync it.
        io.crash_before_operation(io.operation_count() + 1, mode, seed as u64);
        log.persist_cursors().expect("persist");
        let crashed = io.take_crashed().expect("crashed before the fsync");
        storage.close().expect("close");

        let storage = open_sim(&crashed, config());
        let log = storage.open_log("t").expect("log opens");
        assert_eq!(
            log.cursor("sub").expect("state"),
            persisted,
            "{mode:?}: back to the last complete snapshot"
        );
        // The journal keeps working after the truncation.
        log.acknowledge_cumulative("sub", positions[50])
            .expect("ack");
        log.persist_cursors().expect("persist after recovery");
    }
}

#[test]
fn acknowledgements_beyond_the_persisted_range_cap_are_redelivered_after_a_restart() {
    // `cursor_max_persisted_ranges` bounds each snapshot: the ranges beyond it are kept in
    // memory only, so after a restart those entries are delivered again, and nothing that was
    // not acknowledged looks acknowledged.
    let capped = StorageConfig {
        cursor_max_persisted_ranges: 10,
        ..config()
    };
    let io = SimIo::new();
    let (storage, log, positions) = sim_log_with_cursor(&io, capped.clone(), 100);
    // Entries 1, 3, 5, ... 59: thirty ranges.
    acknowledge_every_other(&log, &positions[..60], 1);
    assert_eq!(
        log.cursor("sub").expect("state").acknowledged.range_count(),
        30
    );
    storage.close().expect("close");

    let storage = open_sim(&io, capped);
    let log = storage.open_log("t").expect("log");
    let recovered = log.cursor("sub").expect("state");
    assert_eq!(recovered.mark_delete, None);
    assert_eq!(recovered.acknowledged.range_count(), 10);
    for (index, position) in positions.iter().enumerate() {
        let persisted = index % 2 == 1 && index < 20;
        assert_eq!(
            recovered.is_acknowledged(*position),
            persisted,
            "entry {index}"
        );
    }
}

#[test]
fn one_persistence_pass_makes_the_cursors_of_every_open_log_durable() {
    // The engine-wide pass (the maintenance thread's) persists many logs' journals at once;
    // after it, a power cut keeps every acknowledgement it covered.
    let io = SimIo::new();
    let storage = open_sim(&io, config());
    let mut expected = Vec::new();
    for index in 0..100 {
        let log = storage.open_log(&format!("t-{index}")).expect("log");
        let positions = append(&log, 3);
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        let acknowledged = positions[index % 3];
        log.acknowledge_cumulative("sub", acknowledged)
            .expect("ack");
        expected.push(acknowledged);
    }
    storage.persist_cursors();
    let storage = open_sim(&io.crash(CrashMode::LoseUnsynced, 0), config());
    for (index, acknowledged) in expected.into_iter().enumerate() {
        let log = storage.open_log(&format!("t-{index}")).expect("log");
        assert_eq!(
            log.mark_delete_position("sub"),
            Some(Some(acknowledged)),
            "log t-{index}"
        );
    }
}

#[test]
fn a_deleted_cursor_holds_back_trimming_until_its_deletion_is_durable() {
    // Models a power cut after `delete_cursor` returned but before its tombstone was persisted:
    // the cursor comes back from the journal as last persisted, so trimming must not have
    // deleted the entries it had not acknowledged.
    let sim = SimIo::new();
    let storage = open_sim(&sim, config());
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, 50);
    assert!(log.stats().segments > 1, "the test needs a sealed segment");
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    log.persist_cursors().expect("persist");
    log.delete_cursor("sub").expect("delete cursor");
    assert_eq!(
        log.trim().expect("trim"),
        0,
        "the deletion is not durable yet"
    );
    let crashed = sim.crash(CrashMode::LoseUnsynced, 0);
    // Once the tombstone is durable, the cursor no longer holds anything back.
    log.persist_cursors().expect("persist the deletion");
    assert!(
        log.trim().expect("trim") > 0,
        "the consumed segment is trimmed"
    );
    drop(storage);

    let storage = open_sim(&crashed, config());
    let log = storage.open_log("t").expect("log");
    let cursor = log
        .cursor("sub")
        .expect("the deletion was lost with the power cut");
    let first = log.first_position();
    let skipped: Vec<Position> = positions
        .iter()
        .copied()
        .filter(|position| !cursor.is_acknowledged(*position))
        .filter(|position| first.is_none_or(|first| *position < first))
        .collect();
    assert!(
        skipped.is_empty(),
        "cursor 'sub' is back after the crash but its unacknowledged entries {skipped:?} were \
         trimmed: they will never be delivered"
    );
}

#[test]
fn a_stale_handle_of_a_deleted_log_cannot_touch_the_journal_of_the_log_created_again() {
    // Models a handle that outlived `delete_log` (a maintenance pass that took its list just
    // before, or a topic object that outlived its unload): its cursor calls must not write the
    // old log's cursors into the journal of the new log under the same name.
    let sim = SimIo::new();
    let storage = open_sim(&sim, config());
    let old = storage.open_log("t").expect("log");
    let positions = append(&old, 5);
    for index in 0..40 {
        old.open_cursor(&format!("subscription-{index}"), InitialPosition::Earliest)
            .expect("cursor");
    }
    old.persist_cursors().expect("persist");
    storage.delete_log("t").expect("delete");
    let new = storage.open_log("t").expect("created again");
    append(&new, 1);
    assert!(
        old.acknowledge("subscription-0", &[positions[0]]).is_err(),
        "an acknowledgement on a closed log is refused"
    );
    assert!(
        old.persist_cursors().is_err(),
        "persisting through a closed log is refused"
    );
    drop(new);
    storage.close().expect("close");

    let storage = open_sim(&sim, config());
    let log = storage.open_log("t").expect("the re-created log opens");
    assert!(
        log.cursor_names().is_empty(),
        "cursors of the deleted log appear in the new one: {:?}",
        log.cursor_names()
    );
}

#[test]
fn a_reset_beyond_the_end_never_acknowledges_entries_appended_later() {
    // A seek to a position past the last entry means "the end": the entries appended after it
    // must still be delivered.
    let sim = SimIo::new();
    let storage = open_sim(&sim, config());
    let log = storage.open_log("t").expect("log");
    let before = append(&log, 3);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    let beyond = Position::new(before[2].ledger_id, before[2].entry_id + 1_000);
    log.reset_cursor("sub", Some(beyond)).expect("reset");
    assert_eq!(log.mark_delete_position("sub"), Some(Some(before[2])));
    let after = append(&log, 2);
    for position in after {
        assert!(
            !log.is_acknowledged("sub", position),
            "entry {position}, appended after the reset, looks acknowledged"
        );
    }
}

#[test]
fn acknowledgements_that_would_exceed_the_range_limit_are_refused_and_stay_unacknowledged() {
    // `cursor_max_ranges` bounds a cursor's memory: an acknowledgement that would start one
    // more range is refused and reported (never dropped silently), acknowledgements that extend
    // a range or advance the mark-delete position are always taken, and after a restart exactly
    // the taken ones count.
    let limited = StorageConfig {
        cursor_max_ranges: 4,
        ..config()
    };
    let io = SimIo::new();
    let (storage, log, positions) = sim_log_with_cursor(&io, limited.clone(), 20);
    let ranges = |log: &Arc<meridian_storage::Log>| log.acknowledged_range_count("sub");
    // 1, 3, 5, 7 start four ranges; 9 would start a fifth.
    let every_other: Vec<Position> = [1, 3, 5, 7, 9]
        .iter()
        .map(|index| positions[*index])
        .collect();
    match log.acknowledge("sub", &every_other) {
        Err(meridian_storage::StorageError::TooManyAcknowledgedRanges {
            refused, limit, ..
        }) => {
            assert_eq!(refused, vec![positions[9]]);
            assert_eq!(limit, 4);
        }
        other => panic!("the fifth range was not refused: {other:?}"),
    }
    assert_eq!(ranges(&log), 4);
    assert!(!log.is_acknowledged("sub", positions[9]));
    assert!(log.is_acknowledged("sub", positions[7]));
    // Extending a range (8 joins 7) and advancing the mark-delete position (0) are taken.
    log.acknowledge("sub", &[positions[8]])
        .expect("extends a range");
    assert_eq!(
        log.acknowledge("sub", &[positions[0]]).expect("advances"),
        Some(positions[1])
    );
    assert_eq!(ranges(&log), 3);
    // Now 9 extends 7..=8, and 11 fits as the fourth range; 13 does not.
    log.acknowledge("sub", &[positions[9], positions[11]])
        .expect("fits");
    assert!(log.acknowledge("sub", &[positions[13]]).is_err());
    assert_eq!(ranges(&log), 4);
    storage.close().expect("close");

    let storage = open_sim(&io.crash(CrashMode::LoseUnsynced, 0), limited);
    let log = storage.open_log("t").expect("log");
    let acknowledged: Vec<usize> = (0..positions.len())
        .filter(|index| log.is_acknowledged("sub", positions[*index]))
        .collect();
    assert_eq!(acknowledged, vec![0, 1, 3, 5, 7, 8, 9, 11]);
}

#[test]
fn a_log_deleted_and_created_again_never_gets_its_predecessors_cursors_from_the_wal() {
    // The cursor WAL still holds the deleted log's journal bytes (no checkpoint ran) when a
    // log of the same name is created; replaying them after a power cut must not give the
    // new log the old one's cursor (its journal is another generation).
    let io = SimIo::new();
    let (storage, log, positions) = sim_log_with_cursor(&io, config(), 10);
    log.acknowledge_cumulative("sub", positions[9])
        .expect("ack");
    storage.persist_cursors();
    drop(log);
    storage.delete_log("t").expect("delete");
    let again = storage.open_log("t").expect("created again");
    append(&again, 3);
    drop(again);
    drop(storage);

    let storage = open_sim(&io.crash(CrashMode::LoseUnsynced, 0), config());
    let log = storage.open_log("t").expect("log");
    assert_eq!(
        log.cursor_names(),
        Vec::<String>::new(),
        "the deleted log's cursor came back in the new log"
    );
}

#[test]
fn a_log_whose_close_failed_to_write_its_journal_reopens_with_every_persisted_cursor() {
    // A persistence pass made two cursors durable in the cursor WAL only; the log's close
    // cannot write them into its journal (failing writes). Opened again in the same run, the
    // log must still have them (a completed pass is durable), and after a power cut the WAL
    // replay must not mix the journal bytes of the two lives: the old code reopened the log
    // without the cursors, wrote the new life's records at the same journal offset, and the
    // replay then lost cursor "b" altogether.
    let io = SimIo::new();
    let storage = open_sim(&io, config());
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, 40);
    log.open_cursor("a", InitialPosition::Earliest)
        .expect("cursor");
    log.open_cursor("b", InitialPosition::Earliest)
        .expect("cursor");
    let acks: Vec<Position> = positions[1..].iter().step_by(2).copied().collect();
    log.acknowledge("a", &acks).expect("ack");
    log.acknowledge_cumulative("b", positions[5]).expect("ack");
    storage.persist_cursors();
    let expected_b = log.cursor("b").expect("b");
    drop(log);
    // The seal and the journal write of the close.
    io.fail_writes(2);
    storage
        .close_log("t")
        .expect_err("the close cannot write the journal");

    let log = storage.open_log("t").expect("opened again");
    assert_eq!(
        log.cursor_names(),
        vec!["a".to_string(), "b".to_string()],
        "the cursors a completed pass made durable are there after the log is opened again"
    );
    assert_eq!(log.cursor("b").expect("b"), expected_b);
    log.acknowledge_cumulative("a", positions[0]).expect("ack");
    storage.persist_cursors();
    let expected_a = log.cursor("a").expect("a");
    drop(log);
    drop(storage);

    let storage = open_sim(&io.crash(CrashMode::LoseUnsynced, 0), config());
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.cursor("a").expect("a"), expected_a);
    assert_eq!(
        log.cursor("b"),
        Some(expected_b),
        "cursor b survives the restart"
    );
}

#[test]
fn a_checkpoint_after_a_journal_rewrite_whose_directory_sync_failed_keeps_the_wal() {
    // A rewrite renamed the new journal over the old one but the directory fsync failed: the
    // rename may not survive a power cut. A checkpoint must not take the new file it finds
    // under the journal's name for a completed rewrite and remove the WAL file holding the
    // bytes the old journal lacks: the old code did, and after a power cut the cursor was
    // back before its last completed persistence pass.
    let io = SimIo::new();
    let (storage, log, positions) = sim_log_with_cursor(&io, config(), 30);
    log.acknowledge_cumulative("sub", positions[9])
        .expect("ack");
    // A completed pass: durable through the WAL only.
    storage.persist_cursors();
    log.acknowledge_cumulative("sub", positions[14])
        .expect("ack");
    // A direct persist whose write fails: the journal is rewritten next time...
    io.fail_writes(1);
    log.persist_cursors().expect_err("the journal write fails");
    log.acknowledge_cumulative("sub", positions[19])
        .expect("ack");
    // ...and that rewrite's rename is not made durable (the new file's creation syncs the
    // directory once, the rename a second time).
    io.fail_nth_dir_sync(2);
    log.persist_cursors()
        .expect_err("the rewrite's directory sync fails");
    storage.checkpoint_cursors().expect("checkpoint");

    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop(log);
    drop(storage);
    let storage = open_sim(&crashed, config());
    let log = storage.open_log("t").expect("log");
    let recovered = log.mark_delete_position("sub").flatten();
    assert!(
        recovered >= Some(positions[9]),
        "cursor at {recovered:?}, before its last completed pass ({:?})",
        positions[9]
    );
}

#[test]
fn a_restart_that_skips_wal_bytes_for_a_rewritten_journal_makes_the_rewrite_durable_first() {
    // The process dies between a journal rewrite's rename and its directory fsync (modelled by
    // a failing directory sync and an engine that never closes). The restart finds the new
    // journal under the name, skips the WAL bytes of the old one, and removes the WAL: unless
    // it makes the rename durable first, a power cut afterwards brings back the old journal
    // without those bytes (the old code: the cursor was gone).
    let io = SimIo::new();
    let (storage, log, positions) = sim_log_with_cursor(&io, config(), 30);
    log.acknowledge_cumulative("sub", positions[9])
        .expect("ack");
    storage.persist_cursors();
    io.fail_writes(1);
    log.persist_cursors().expect_err("the journal write fails");
    log.acknowledge_cumulative("sub", positions[19])
        .expect("ack");
    io.fail_nth_dir_sync(2);
    log.persist_cursors()
        .expect_err("the rewrite's directory sync fails");
    // Killed: nothing more of this engine runs.
    std::mem::forget(log);
    std::mem::forget(storage);

    let restarted = open_sim(&io, config());
    drop(restarted.open_log("other").expect("another log"));
    restarted.close().expect("close");
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    let storage = open_sim(&crashed, config());
    let log = storage.open_log("t").expect("log");
    let recovered = log.mark_delete_position("sub").flatten();
    assert!(
        recovered >= Some(positions[9]),
        "cursor at {recovered:?}, before its last completed pass ({:?})",
        positions[9]
    );
}

#[test]
fn an_acknowledgement_of_the_next_entry_leaves_room_for_one_more_range_in_the_same_call() {
    // Limit 2, one range held: acknowledging the entry after the mark-delete position together
    // with an isolated one ends with two ranges, within the limit. The old code counted the
    // range the first one starts (absorbed into the mark-delete position at the end of the
    // call) and refused the second.
    let limited = StorageConfig {
        cursor_max_ranges: 2,
        ..config()
    };
    let io = SimIo::new();
    let (_storage, log, positions) = sim_log_with_cursor(&io, limited, 20);
    log.acknowledge("sub", &[positions[5]]).expect("ack");
    log.acknowledge("sub", &[positions[0], positions[10]])
        .expect("within the limit: nothing refused");
    assert!(log.is_acknowledged("sub", positions[10]));
    assert_eq!(log.mark_delete_position("sub"), Some(Some(positions[0])));
    assert_eq!(log.acknowledged_range_count("sub"), 2);
    // At the limit now: one more isolated entry is refused.
    log.acknowledge("sub", &[positions[15]])
        .expect_err("a third range is refused");
    assert!(!log.is_acknowledged("sub", positions[15]));
}

#[test]
fn a_restart_on_a_full_disk_opens_the_engine_even_if_the_wal_cannot_be_replayed_into_a_journal() {
    // After a power cut the cursor WAL holds bytes a journal lacks, and the disk is full: the
    // replay cannot write them. The old code refused to open the whole engine (DiskFull), so
    // no log could be read or trimmed to free space. Now the engine opens, a log whose journal
    // needs no bytes opens and reads, the log whose journal does is refused with DiskFull
    // until there is space, and then opens with its cursor where the last pass persisted it
    // (also after another power cut).
    // Without the entry WAL: removing its files at start would free the bytes this test
    // needs the disk to lack.
    let config = || StorageConfig {
        entry_wal: false,
        ..config()
    };
    let io = SimIo::new();
    let (storage, log, positions) = sim_log_with_cursor(&io, config(), 30);
    let other = storage.open_log("u").expect("log");
    append(&other, 3);
    log.acknowledge_cumulative("sub", positions[9])
        .expect("ack");
    storage.persist_cursors();
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop((log, other));
    drop(storage);

    crashed.set_capacity(Some(crashed.used_bytes()));
    let storage = Storage::open_with_io(Path::new("/data"), config(), Arc::new(crashed.clone()))
        .expect("the engine opens on a full disk");
    let other = storage
        .open_log("u")
        .expect("a log with nothing to replay opens");
    assert_eq!(
        other
            .read_from(other.first_position().expect("entries"), 10, usize::MAX)
            .expect("read")
            .len(),
        3
    );
    match storage.open_log("t") {
        Err(meridian_storage::StorageError::DiskFull { .. }) => {}
        other => panic!("expected DiskFull, got {other:?}"),
    }
    crashed.set_capacity(None);
    let log = storage.open_log("t").expect("opens once there is space");
    assert_eq!(log.mark_delete_position("sub"), Some(Some(positions[9])));
    drop((log, other));
    let again = crashed.crash(CrashMode::LoseUnsynced, 0);
    drop(storage);
    let storage = open_sim(&again, config());
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.mark_delete_position("sub"), Some(Some(positions[9])));
}

#[test]
fn after_a_failed_wal_fsync_the_passes_go_through_a_new_wal_file_again() {
    // One failed fsync of the cursor WAL must not leave the engine on one fsync per changed
    // journal for the rest of its life (at 10,000 topics the persistence bound would not
    // hold): a later pass starts a new WAL file and is again one fsync for every log. The
    // old code wrote each journal until the engine was reopened.
    let io = SimIo::new();
    let storage = open_sim(&io, config());
    let names: Vec<String> = (0..20).map(|index| format!("t{index}")).collect();
    let logs: Vec<_> = names
        .iter()
        .map(|name| {
            let log = storage.open_log(name).expect("log");
            let positions = append(&log, 5);
            log.open_cursor("sub", InitialPosition::Earliest)
                .expect("cursor");
            (log, positions)
        })
        .collect();
    let acknowledge_all = |index: usize| {
        for (log, positions) in &logs {
            log.acknowledge_cumulative("sub", positions[index])
                .expect("ack");
        }
    };
    acknowledge_all(0);
    io.fail_syncs(1);
    storage.persist_cursors();
    // The journals of the failed pass are rewritten (one fsync each, whatever the path).
    acknowledge_all(1);
    storage.persist_cursors();
    acknowledge_all(2);
    let before = io.sync_count();
    storage.persist_cursors();
    assert_eq!(
        io.sync_count() - before,
        1,
        "one fsync for the pass over {} changed logs",
        logs.len()
    );
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop(logs);
    drop(storage);
    let storage = open_sim(&crashed, config());
    for name in &names {
        let log = storage.open_log(name).expect("log");
        let mark_delete = log.mark_delete_position("sub").flatten();
        assert_eq!(
            mark_delete.map(|position| position.entry_id),
            Some(2),
            "{name}"
        );
    }
}

#[test]
fn relaxed_mode_acknowledgements_of_entries_a_power_cut_lost_do_not_hide_the_backlog() {
    // Relaxed mode: the cursor (with individual acknowledgements of entries not synced yet) is
    // persisted, then a power cut loses those entries. The old code kept the acknowledgements
    // of positions that no longer exist and subtracted them from the backlog of the entries
    // appended afterwards: 3 unconsumed messages showed a backlog of 0.
    let relaxed = StorageConfig {
        flush_policy: meridian_storage::FlushPolicy::RelaxedWriteOnly {
            fsync_interval: Duration::from_secs(3600),
        },
        ..config()
    };
    let io = SimIo::new();
    let storage = open_sim(&io, relaxed.clone());
    let log = storage.open_log("t").expect("log");
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    let positions = append(&log, 10);
    let acks: Vec<Position> = positions[5..].iter().step_by(2).copied().collect();
    log.acknowledge("sub", &acks).expect("ack");
    storage.persist_cursors();
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop(log);
    drop(storage);

    let storage = open_sim(&crashed, relaxed);
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.entries_after(None), 0, "the unsynced entries are lost");
    append(&log, 3);
    assert_eq!(log.backlog_entries("sub"), Some(3));
    assert_eq!(log.acknowledged_range_count("sub"), 0);
}

#[test]
fn the_wal_replay_holds_a_bounded_number_of_journals_open() {
    // After a power cut the WAL holds bytes for every log whose cursors changed since the last
    // checkpoint; the replay wrote them all and kept every journal open until its final fsync:
    // one file descriptor per log (the old code: 600 here), at a start where no log is open.
    let io = SimIo::new();
    let storage = open_sim(&io, config());
    let logs: Vec<_> = (0..600)
        .map(|index| {
            let log = storage.open_log(&format!("t{index}")).expect("log");
            let position = append(&log, 1)[0];
            log.open_cursor("sub", InitialPosition::Earliest)
                .expect("cursor");
            log.acknowledge_cumulative("sub", position).expect("ack");
            (log, position)
        })
        .collect();
    storage.persist_cursors();
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    let expected: Vec<Position> = logs.iter().map(|(_, position)| *position).collect();
    drop(logs);
    drop(storage);

    let storage = open_sim(&crashed, config());
    assert!(
        crashed.peak_open_files() < 600 / 2,
        "{} files open at once during the replay",
        crashed.peak_open_files()
    );
    for (index, position) in expected.iter().enumerate() {
        let log = storage.open_log(&format!("t{index}")).expect("log");
        assert_eq!(log.mark_delete_position("sub"), Some(Some(*position)));
        drop(log);
        storage.close_log(&format!("t{index}")).expect("close");
    }
}

#[test]
fn acknowledging_runs_leaves_the_cursor_as_acknowledging_entry_by_entry_does() {
    // `acknowledge_runs` (the replicated-subscription sync's path) inserts runs of consecutive
    // entries at once; whatever the batches (runs, single entries, repeats, entries below the
    // mark-delete position, several ledgers), the cursor must end as `acknowledge` leaves it.
    let root = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(root.path(), config()).expect("open");
    let log = storage.open_log("t").expect("log");
    let mut positions = append(&log, 150);
    storage.close().expect("close");
    // A second ledger (a new one after each open).
    let storage = Storage::open(root.path(), config()).expect("reopen");
    let log = storage.open_log("t").expect("log");
    positions.extend(append(&log, 150));
    log.open_cursor("one", InitialPosition::Earliest)
        .expect("cursor");
    log.open_cursor("runs", InitialPosition::Earliest)
        .expect("cursor");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut random = |bound: usize| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) as usize % bound
    };
    for _ in 0..200 {
        let mut batch = Vec::new();
        for _ in 0..1 + random(4) {
            let start = random(positions.len());
            let length = 1 + random(12);
            batch.extend(positions.iter().skip(start).take(length).copied());
        }
        batch.sort();
        let one = log.acknowledge("one", &batch).expect("acknowledge");
        let runs = log
            .acknowledge_runs("runs", &batch)
            .expect("acknowledge runs");
        assert_eq!(one, runs, "mark-delete position after {batch:?}");
        let (one, runs) = (
            log.cursor("one").expect("one"),
            log.cursor("runs").expect("runs"),
        );
        assert_eq!(one.acknowledged, runs.acknowledged, "after {batch:?}");
    }
    assert_eq!(
        log.cursor("runs").expect("runs").mark_delete,
        Some(positions[positions.len() - 1]),
        "the batches covered every entry in the end"
    );
}

#[test]
fn a_run_that_would_exceed_the_range_limit_is_refused_whole() {
    let limited = StorageConfig {
        cursor_max_ranges: 2,
        ..config()
    };
    let root = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(root.path(), limited).expect("open");
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, 30);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    log.acknowledge_runs("sub", &[positions[2], positions[3], positions[6]])
        .expect("two ranges");
    match log.acknowledge_runs("sub", &[positions[4], positions[10], positions[11]]) {
        Err(meridian_storage::StorageError::TooManyAcknowledgedRanges { refused, .. }) => {
            assert_eq!(refused, vec![positions[10], positions[11]]);
        }
        other => panic!("the third range was not refused: {other:?}"),
    }
    // 4 joined 2..=3 (and 6 follows 5, not acknowledged), so two ranges still.
    assert_eq!(log.acknowledged_range_count("sub"), 2);
    assert!(log.is_acknowledged("sub", positions[4]));
    assert!(!log.is_acknowledged("sub", positions[10]));
}

#[test]
fn acknowledged_each_answers_for_every_position_given() {
    let (_root, _storage, log, positions) = log_with_cursor(10);
    // 0..=2 below the mark-delete position, 5 acknowledged on its own.
    log.acknowledge(
        "sub",
        &[positions[0], positions[1], positions[2], positions[5]],
    )
    .expect("ack");
    assert_eq!(
        log.acknowledged_each(
            "sub",
            &[positions[1], positions[3], positions[5], positions[6]]
        ),
        [true, false, true, false]
    );
    assert_eq!(
        log.acknowledged_each("missing", &[positions[0], positions[1]]),
        [false, false]
    );
}

#[test]
fn a_cursor_version_changes_with_its_own_changes_only() {
    let (_root, _storage, log, positions) = log_with_cursor(10);
    let version = |log: &meridian_storage::Log| log.cursor_versioned("sub").expect("cursor").1;
    let start = version(&log);

    // Mirrored changes (acknowledgements copied from elsewhere, and properties) keep it.
    log.acknowledge_as("sub", &[positions[0], positions[5]], ChangeKind::Mirrored)
        .expect("ack");
    log.acknowledge_ranges(
        "sub",
        &[(positions[7].ledger_id, 7, 8)],
        ChangeKind::Mirrored,
    )
    .expect("ack runs");
    let mut properties = BTreeMap::new();
    properties.insert("state".to_string(), "from elsewhere".to_string());
    log.set_cursor_properties_as("sub", properties.clone(), ChangeKind::Mirrored)
        .expect("properties");
    let (state, mirrored) = log.cursor_versioned("sub").expect("cursor");
    assert_eq!(mirrored, start);
    assert_eq!(state.mark_delete, Some(positions[0]));
    assert!(state.is_acknowledged(positions[8]));

    // Every change of the cursor's own moves it, each time to a version never seen before.
    let mut seen = vec![start];
    let mut changed = |log: &meridian_storage::Log| {
        let now = version(log);
        assert!(!seen.contains(&now), "version {now} seen before: {seen:?}");
        seen.push(now);
    };
    log.acknowledge("sub", &[positions[2]]).expect("ack");
    changed(&log);
    log.acknowledge_runs("sub", &[positions[3]]).expect("ack");
    changed(&log);
    log.acknowledge_cumulative("sub", positions[4])
        .expect("cumulative");
    changed(&log);
    log.set_cursor_properties("sub", properties)
        .expect("properties");
    changed(&log);
    log.reset_cursor("sub", None).expect("reset");
    changed(&log);
    // A cursor deleted and created again under the same name never repeats a version.
    log.delete_cursor("sub").expect("delete");
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    changed(&log);
}

#[test]
fn acknowledgements_of_positions_the_log_does_not_hold_change_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(root.path(), config()).expect("open");
    let log = storage.open_log("t").expect("log");
    let first = append(&log, 10);
    storage.close().expect("close");
    // A second ledger (a new one after each open): the ids after the first one's end are a gap.
    let storage = Storage::open(root.path(), config()).expect("reopen");
    let log = storage.open_log("t").expect("log");
    let second = append(&log, 10);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    let in_gap = Position::new(first[9].ledger_id, first[9].entry_id + 1);
    let beyond_end = Position::new(second[9].ledger_id, second[9].entry_id + 1);

    log.acknowledge("sub", &[in_gap, beyond_end])
        .expect("ignored, not refused");
    assert!(!log.is_acknowledged("sub", in_gap));
    assert_eq!(log.acknowledged_range_count("sub"), 0);
    assert_eq!(log.mark_delete_position("sub"), Some(None));

    // In order, the gap's position among them: the mark-delete position follows the entries.
    let mut batch = first.clone();
    batch.push(in_gap);
    log.acknowledge("sub", &batch).expect("ack");
    assert_eq!(log.mark_delete_position("sub"), Some(Some(first[9])));
    assert_eq!(log.acknowledged_range_count("sub"), 0);
    // Across the ledgers, then out of order.
    log.acknowledge("sub", &[second[0], second[2]])
        .expect("ack");
    assert_eq!(log.mark_delete_position("sub"), Some(Some(second[0])));
    assert_eq!(log.acknowledged_range_count("sub"), 1);
    log.acknowledge("sub", &[second[1]]).expect("ack");
    assert_eq!(log.mark_delete_position("sub"), Some(Some(second[2])));
    assert_eq!(log.acknowledged_range_count("sub"), 0);
    assert_eq!(log.backlog_entries("sub"), Some(7));
    // A later entry appended at the end position is not acknowledged by the earlier attempt.
    let third = append(&log, 1);
    assert_eq!(third[0], beyond_end);
    assert!(!log.is_acknowledged("sub", beyond_end));
}

#[test]
fn an_acknowledgement_that_changes_nothing_leaves_the_cursor_untouched() {
    let (_root, _storage, log, positions) = log_with_cursor(10);
    assert!(log
        .acknowledge_changed("sub", &[positions[0], positions[5]], ChangeKind::Own)
        .expect("ack"));
    let (_, version) = log.cursor_versioned("sub").expect("cursor");
    // Again, below the mark-delete position, none at all: nothing changes, not even the
    // version (which replicated-subscription sync watches), and the cursor is not marked for
    // persistence.
    log.persist_cursors().expect("persist");
    let persisted = directory_bytes(log.directory());
    // A position the log does not hold (a client's bad message id) changes nothing either.
    let beyond = Position::new(positions[9].ledger_id, positions[9].entry_id + 5);
    for again in [
        &[positions[5]][..],
        &[positions[0], positions[5]],
        &[],
        &[beyond],
        &[positions[5], beyond],
    ] {
        assert!(!log
            .acknowledge_changed("sub", again, ChangeKind::Own)
            .expect("ack"));
    }
    assert_eq!(log.cursor_versioned("sub").expect("cursor").1, version);
    log.persist_cursors().expect("persist");
    assert_eq!(
        directory_bytes(log.directory()),
        persisted,
        "nothing to persist"
    );
    // One new among them changes it.
    assert!(log
        .acknowledge_changed("sub", &[positions[5], positions[1]], ChangeKind::Own)
        .expect("ack"));
    assert_eq!(log.mark_delete_position("sub"), Some(Some(positions[1])));
    assert_ne!(log.cursor_versioned("sub").expect("cursor").1, version);
    log.persist_cursors().expect("persist");
    assert!(
        directory_bytes(log.directory()) > persisted,
        "the change is persisted"
    );
    assert!(log
        .acknowledge_changed("missing", &[positions[0]], ChangeKind::Own)
        .is_err());
}

#[test]
fn a_position_given_twice_is_refused_only_if_it_stays_unacknowledged() {
    let limited = StorageConfig {
        cursor_max_ranges: 1,
        ..config()
    };
    let io = SimIo::new();
    let (_storage, log, positions) = sim_log_with_cursor(&io, limited, 10);
    log.acknowledge("sub", &[positions[2]]).expect("one range");
    // 4 would start a second range, but 3 joins 2 and then 4 joins them: taken.
    log.acknowledge("sub", &[positions[4], positions[3], positions[4]])
        .expect("every position taken");
    assert!(log.is_acknowledged("sub", positions[4]));
    assert_eq!(log.acknowledged_range_count("sub"), 1);
    // 6 and 8 start ranges whatever the order: each is refused, and named once.
    match log.acknowledge("sub", &[positions[8], positions[6], positions[8]]) {
        Err(meridian_storage::StorageError::TooManyAcknowledgedRanges { refused, .. }) => {
            assert_eq!(refused, vec![positions[6], positions[8]]);
        }
        other => panic!("expected a refusal: {other:?}"),
    }
    assert!(!log.is_acknowledged("sub", positions[6]));
    assert!(!log.is_acknowledged("sub", positions[8]));
}

/// A change that panics (here a debug assertion on a reversed run, a caller's mistake) leaves
/// the cursor as it was: the log's lock is recovered and used again, and the next change must
/// not persist an empty cursor in its place.
#[cfg(debug_assertions)]
#[test]
fn a_cursor_change_that_panics_leaves_the_cursor_as_it_was() {
    let io = SimIo::new();
    let (storage, log, positions) = sim_log_with_cursor(&io, config(), 10);
    log.acknowledge_cumulative("sub", positions[7])
        .expect("ack");
    let before = log.cursor("sub").expect("cursor");
    let ledger = positions[8].ledger_id;
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = log.acknowledge_ranges("sub", &[(ledger, 9, 8)], ChangeKind::Own);
    }));
    assert!(panicked.is_err(), "a reversed run is a debug assertion");
    assert_eq!(log.cursor("sub"), Some(before));
    log.acknowledge("sub", &[positions[8]]).expect("ack");
    log.persist_cursors().expect("persist");
    drop(log);
    storage.close().expect("close");
    let storage = open_sim(&io.crash(CrashMode::LoseUnsynced, 0), config());
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.mark_delete_position("sub"), Some(Some(positions[8])));
}
