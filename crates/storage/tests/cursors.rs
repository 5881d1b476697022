//! Durable cursors (mark-delete, individual acks, properties) across restarts and crashes, and
//! trimming that really frees disk space.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{
    CrashMode, InitialPosition, Position, Retention, SimIo, Storage, StorageConfig,
};

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

fn append(log: &Arc<meridian_storage::Log>, count: u64) -> Vec<Position> {
    let pending: Vec<_> = (0..count)
        .map(|index| {
            log.append(Bytes::from(vec![index as u8; 200]), index)
                .expect("append")
        })
        .collect();
    pending
        .into_iter()
        .map(|append| append.wait().expect("durable"))
        .collect()
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
    let storage = Storage::open(root.path(), config()).expect("open");
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
    let root = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(root.path(), config()).expect("open");
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, 400);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
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
    let storage = Storage::open(root.path(), config()).expect("open");
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
    let storage = Storage::open(root.path(), config()).expect("reopen");
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
    let storage =
        Storage::open_with_io(Path::new("/data"), config(), Arc::new(io.clone())).expect("open");
    let log = storage.open_log("t").expect("log");
    let positions = append(&log, 200);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
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
