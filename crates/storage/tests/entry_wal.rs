//! The entry write-ahead log: logs a flush thread finds waiting together are made durable with
//! one write and one fsync of the WAL, and what it made durable survives a power cut, also
//! after the WAL failed in the middle of a group (a full disk, a failed fsync).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meridian_storage::{CrashMode, Log, Position, SimIo, Storage, StorageConfig};
use support::entry_wal::*;

#[test]
fn logs_waiting_together_share_one_fsync_and_survive_a_power_cut() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..8)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    // Their first appends create their segments (each with its own fsync).
    for (_, _, append) in append_together(&storage, &logs, 1, "first") {
        append.wait().expect("durable");
    }
    let syncs = io.sync_count();
    let wal_before = wal_bytes(&io);
    let appends = append_together(&storage, &logs, 1, "second");
    let positions: Vec<Position> = appends
        .into_iter()
        .map(|(_, _, append)| append.wait().expect("durable"))
        .collect();
    assert_eq!(
        io.sync_count() - syncs,
        1,
        "eight logs' appends made durable with one fsync"
    );
    assert!(wal_bytes(&io) > wal_before + 8 * 500, "the WAL holds them");

    let crashed = io.crash(CrashMode::LoseUnsynced, 1);
    drop(logs);
    drop(storage);
    let storage = open(&crashed);
    for (number, position) in positions.iter().enumerate() {
        let log = storage.open_log(&format!("t{number}")).expect("log");
        assert_eq!(
            all(&log),
            vec![payload(number, 0, "first"), payload(number, 0, "second")],
            "log t{number} after the power cut"
        );
        assert_eq!(log.last_position(), Some(*position));
    }
    storage.close().expect("close");
    assert_eq!(wal_bytes(&crashed), 0, "a clean close leaves no WAL file");
}

/// After a power cut that keeps any part of what was not fsynced, each log holds its
/// acknowledged entries (and `rewritten` ones after them, if any) and nothing refused.
fn assert_after_power_cuts(io: &SimIo, storage: Storage, logs: Vec<Arc<Log>>, rewritten: bool) {
    drop(logs);
    let mut crashes = vec![io.crash(CrashMode::LoseUnsynced, 0)];
    for seed in 0..16 {
        crashes.push(io.crash(CrashMode::TornPrefix, seed));
        crashes.push(io.crash(CrashMode::TornWithGarbage, seed));
    }
    drop(storage);
    for (crash, crashed) in crashes.iter().enumerate() {
        let storage = open(crashed);
        for number in 0..3 {
            let log = storage.open_log(&format!("t{number}")).expect("log");
            let mut expected = vec![payload(number, 0, "kept"), payload(number, 1, "kept")];
            if rewritten {
                expected.push(payload(number, 0, "rewritten"));
            }
            assert_eq!(
                all(&log),
                expected,
                "power cut {crash}, log t{number}: nothing refused comes back, nothing \
                 acknowledged is lost"
            );
        }
    }
}

#[test]
fn a_group_the_wal_refused_stays_refused_after_a_power_cut() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs = a_group_refused_midway_through_the_wal(&io, &storage);
    assert_after_power_cuts(&io, storage, logs, false);
}

#[test]
fn a_group_the_wal_refused_stays_refused_after_its_positions_went_through_the_wal_again() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs = a_group_refused_midway_through_the_wal(&io, &storage);
    // The positions are given again, to other bytes, made durable by the WAL's next file.
    for (_, _, append) in append_together(&storage, &logs, 1, "rewritten") {
        append.wait().expect("durable");
    }
    assert_after_power_cuts(&io, storage, logs, true);
}

#[test]
fn a_group_the_wal_refused_stays_refused_after_its_positions_were_synced_log_by_log() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs = a_group_refused_midway_through_the_wal(&io, &storage);
    // Each log alone: its own write and fsync, shorter than the refused batch the WAL holds.
    for (number, log) in logs.iter().enumerate() {
        log.append(payload(number, 0, "rewritten"), 0)
            .expect("append")
            .wait()
            .expect("durable");
    }
    assert_after_power_cuts(&io, storage, logs, true);
}

#[test]
fn a_failed_wal_fsync_fails_the_group_and_loses_nothing_acknowledged() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..3)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (_, _, append) in append_together(&storage, &logs, 2, "kept") {
        append.wait().expect("durable");
    }
    io.fail_syncs(1);
    for (_, _, append) in append_together(&storage, &logs, 2, "failed") {
        assert!(append.wait().is_err(), "an append whose fsync failed fails");
    }
    // Poisoned: appends are refused until the log is opened again.
    assert!(logs[0].append(payload(0, 9, "late"), 0).is_err());
    drop(logs);
    for number in 0..3 {
        storage.close_log(&format!("t{number}")).expect("close");
    }
    let log = storage.open_log("t0").expect("opens again");
    log.append(payload(0, 0, "after"), 0)
        .expect("append")
        .wait()
        .expect("durable");
    drop(log);
    let crashed = io.crash(CrashMode::LoseUnsynced, 3);
    drop(storage);
    let storage = open(&crashed);
    for number in 0..3 {
        let log = storage.open_log(&format!("t{number}")).expect("log");
        let entries = all(&log);
        assert_eq!(
            entries[..2],
            [payload(number, 0, "kept"), payload(number, 1, "kept")],
            "log t{number}: the acknowledged entries"
        );
        // The failed appends may or may not have reached the disk (as with a log's own failed
        // fsync); an acknowledged one after them is there.
        if number == 0 {
            assert_eq!(entries.last(), Some(&payload(0, 0, "after")));
        }
    }
}

#[test]
fn a_wal_file_written_over_replays_only_its_own_records_after_a_power_cut() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    // The first appends create the segments; "a" and "b" go through the first WAL file, one
    // record per log each, all of one size.
    for tag in ["first", "a", "b"] {
        for (_, _, append) in append_together(&storage, &logs, 1, tag) {
            append.wait().expect("durable");
        }
    }
    let first_file_bytes = wal_bytes(&io);
    // The first checkpoint starts a new file and retires the first; the second writes the
    // next file over the first one.
    storage.checkpoint_entries().expect("checkpoint");
    storage.checkpoint_entries().expect("checkpoint");
    assert_eq!(
        wal_files(&io),
        vec![
            "entries-00000000000000000002.free".to_string(),
            "entries-00000000000000000003.wal".to_string(),
        ],
        "the second file retired and kept, the first written over as the third"
    );
    assert_eq!(
        wal_bytes(&io)
            - io.read_file(Path::new("/data/entries-00000000000000000002.free"))
                .expect("read")
                .len() as u64,
        first_file_bytes,
        "the third file is the first, its size unchanged"
    );
    // "new" lands where "a" was in the file, and is followed by the records of "b": same
    // segments, earlier positions. Only the segments' writes are unsynced.
    for (_, _, append) in append_together(&storage, &logs, 1, "new") {
        append.wait().expect("durable");
    }
    drop(logs);
    let mut crashes = vec![io.crash(CrashMode::LoseUnsynced, 0)];
    for seed in 0..8 {
        crashes.push(io.crash(CrashMode::TornPrefix, seed));
        crashes.push(io.crash(CrashMode::TornWithGarbage, seed));
    }
    drop(storage);
    for (crash, crashed) in crashes.iter().enumerate() {
        let storage = open(crashed);
        for number in 0..2 {
            let log = storage.open_log(&format!("t{number}")).expect("log");
            assert_eq!(
                all(&log),
                ["first", "a", "b", "new"].map(|tag| payload(number, 0, tag)),
                "power cut {crash}, log t{number}: the records of the file's earlier life are \
                 not replayed over its own"
            );
        }
        storage.close().expect("close");
        assert_eq!(
            wal_files(crashed),
            Vec::<String>::new(),
            "the start removes the crashed run's retired file, a clean close every WAL file"
        );
    }
}

#[test]
fn a_full_disk_removes_the_retired_wal_files_kept_to_be_written_over() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for tag in ["first", "a"] {
        for (_, _, append) in append_together(&storage, &logs, 1, tag) {
            append.wait().expect("durable");
        }
    }
    storage.checkpoint_entries().expect("checkpoint");
    storage.checkpoint_entries().expect("checkpoint");
    assert!(wal_files(&io).iter().any(|name| name.ends_with(".free")));
    io.set_capacity(Some(io.used_bytes() + 100));
    for (_, _, append) in append_together(&storage, &logs, 1, "refused") {
        assert!(matches!(
            append.wait(),
            Err(meridian_storage::StorageError::DiskFull { .. })
        ));
    }
    assert_eq!(
        wal_files(&io),
        vec!["entries-00000000000000000003.wal".to_string()],
        "the retired file is removed: appends need the space"
    );
    io.set_capacity(None);
    for (_, _, append) in append_together(&storage, &logs, 1, "b") {
        append.wait().expect("durable");
    }
    for (number, log) in logs.iter().enumerate() {
        assert_eq!(
            all(log),
            ["first", "a", "b"].map(|tag| payload(number, 0, tag))
        );
    }
}

#[test]
fn a_restart_without_the_entry_wal_still_replays_what_an_earlier_run_made_durable_in_it() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..4)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (_, _, append) in append_together(&storage, &logs, 1, "first") {
        append.wait().expect("durable");
    }
    for (_, _, append) in append_together(&storage, &logs, 1, "second") {
        append.wait().expect("durable");
    }
    let crashed = io.crash(CrashMode::LoseUnsynced, 5);
    drop(logs);
    drop(storage);
    let without = StorageConfig {
        entry_wal: false,
        ..config()
    };
    let storage = Storage::open_with_io(Path::new("/data"), without, Arc::new(crashed.clone()))
        .expect("open");
    for number in 0..4 {
        let log = storage.open_log(&format!("t{number}")).expect("log");
        assert_eq!(
            all(&log),
            vec![payload(number, 0, "first"), payload(number, 0, "second")],
            "log t{number}"
        );
    }
    assert_eq!(wal_bytes(&crashed), 0, "replayed and removed");
}

#[test]
fn a_log_whose_close_could_not_fsync_its_segment_keeps_its_appends_after_reopening_and_a_power_cut()
{
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..3)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (_, _, append) in append_together(&storage, &logs, 1, "first") {
        append.wait().expect("durable");
    }
    // Only in the WAL: the segments are not fsynced yet.
    for (_, _, append) in append_together(&storage, &logs, 1, "second") {
        append.wait().expect("durable");
    }
    drop(logs);
    io.fail_syncs(1);
    assert!(storage.close_log("t0").is_err(), "the close's fsync failed");
    // Opened again in this run: a new ledger, a new segment after the one that lacks its tail.
    let log = storage.open_log("t0").expect("opens again");
    log.append(payload(0, 0, "third"), 0)
        .expect("append")
        .wait()
        .expect("durable");
    drop(log);
    let crashed = io.crash(CrashMode::LoseUnsynced, 6);
    drop(storage);
    let storage = open(&crashed);
    let log = storage.open_log("t0").expect("opens after the power cut");
    assert_eq!(
        all(&log),
        vec![
            payload(0, 0, "first"),
            payload(0, 0, "second"),
            payload(0, 0, "third")
        ]
    );
}

/// Runs `work` on its own thread and fails the test if it has not finished within `limit`
/// (a wait that never ends is the failure these tests look for). Fails by aborting the test
/// process: a panic would unwind into the engine's close, which waits for the stuck flush.
fn finishes_within<T: Send + 'static>(
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    within(limit, work).unwrap_or_else(|| {
        eprintln!("not finished within {limit:?}: a flush waited for a group that never came");
        std::process::abort();
    })
}

#[test]
fn a_group_waits_for_the_batches_other_logs_write_meanwhile_and_shares_one_fsync() {
    // A third flush thread is free to write the batches and hand them over.
    seven_batches_fill_one_group(3);
}

#[test]
fn a_waiting_leader_writes_the_batches_appended_meanwhile_itself() {
    // One thread is stuck in t0's fsync and the other leads the group: only the leader can
    // write the batches appended while it waits. Without that, they would wait for a flush
    // thread until its hour has passed.
    seven_batches_fill_one_group(2);
}

/// With `flush_threads` (at least two): t0's fsync held, t1's batch starts a WAL group that
/// only a full group (512 KiB) ends in the test's time, and six more logs' batches, appended
/// once its leader waits, fill it. The seven share one fsync and survive a power cut.
fn seven_batches_fill_one_group(flush_threads: usize) {
    let sim = SimIo::new();
    let (io, storage) = open_gated(&sim, flush_threads, Duration::from_secs(3600));
    let logs = logs_with_segments(&storage, 8);
    let (held, release) = hold_t0_fsync(&io, &logs);
    let syncs = sim.sync_count();
    // Seven batches of 80 KiB, one after the other: the group fills (512 KiB) with the last.
    let size = 80 * 1024;
    let mut appends = vec![logs[1]
        .append(entry_of(1, "grouped", size), 0)
        .expect("append")];
    let storage = Arc::new(storage);
    let gathering = storage.clone();
    finishes_within(Duration::from_secs(60), move || {
        while !gathering.entry_wal_leader_gathering() {
            std::thread::yield_now();
        }
    });
    for (number, log) in logs.iter().enumerate().skip(2) {
        appends.push(
            log.append(entry_of(number, "grouped", size), 0)
                .expect("append"),
        );
    }
    let positions = finishes_within(Duration::from_secs(60), move || {
        appends
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect::<Vec<Position>>()
    });
    assert_eq!(
        sim.sync_count() - syncs,
        1,
        "seven logs written one after the other made durable with one fsync"
    );
    drop(release);
    held.wait().expect("t0's batch durable");

    drop(logs);
    let crashed = sim.crash(CrashMode::LoseUnsynced, 0);
    drop(storage);
    let storage = open(&crashed);
    for (number, position) in positions.iter().enumerate() {
        let number = number + 1;
        let log = storage.open_log(&format!("t{number}")).expect("log");
        assert_eq!(
            all(&log),
            vec![
                payload(number, 0, "first"),
                entry_of(number, "grouped", size)
            ],
            "log t{number} after the power cut"
        );
        assert_eq!(log.last_position(), Some(*position));
    }
}

#[test]
fn a_batch_that_starts_a_segment_is_flushed_by_a_free_thread_not_a_waiting_leader() {
    // Creating a segment takes an fsync of its own: a leader that did it would keep its
    // group waiting for it.
    let sim = SimIo::new();
    let config = StorageConfig {
        flush_threads: 3,
        entry_wal_group_wait: Duration::from_secs(3600),
        entry_wal_group_idle: Duration::from_secs(3600),
        entry_max_bytes: 700 * 1024,
        segment_max_bytes: 1024 * 1024,
        ..config()
    };
    let (io, storage) = open_gated_with(&sim, config);
    let logs = logs_with_segments(&storage, 4);
    // t3's segment has room for no second batch this large: the next one starts a segment.
    let large = 600 * 1024;
    logs[3]
        .append(entry_of(3, "first large", large), 0)
        .expect("append")
        .wait()
        .expect("durable");
    let (held, release) = hold_t0_fsync(&io, &logs);
    let grouped = logs[1].append(payload(1, 1, "grouped"), 0).expect("append");
    let storage = Arc::new(storage);
    let gathering = storage.clone();
    finishes_within(Duration::from_secs(60), move || {
        while !gathering.entry_wal_leader_gathering() {
            std::thread::yield_now();
        }
    });
    let (reached, release_rolled) = io.arm_containing("sync", "/logs/t3/");
    let rolled = logs[3]
        .append(entry_of(3, "rolls", large), 0)
        .expect("append");
    // The third thread creates the segment while the leader still waits (an hour, or a full
    // group): a leader that had taken it would not reach this fsync.
    if reached.recv_timeout(Duration::from_secs(60)).is_err() {
        eprintln!("the new segment's fsync was not reached: a waiting leader took its batch");
        std::process::abort();
    }
    assert!(
        storage.entry_wal_leader_gathering(),
        "the group still waits"
    );
    drop(release_rolled);
    finishes_within(Duration::from_secs(60), move || rolled.wait())
        .expect("the new segment's entry durable");
    // A batch that fills the group ends its wait.
    let filling = logs[2]
        .append(entry_of(2, "fills", large), 0)
        .expect("append");
    finishes_within(Duration::from_secs(60), move || {
        grouped.wait().expect("t1's batch durable");
        filling.wait().expect("t2's batch durable");
    });
    drop(release);
    held.wait().expect("t0's batch durable");
}

#[test]
fn a_log_written_alone_never_waits_for_a_group_and_a_group_that_never_fills_is_written() {
    let io = SimIo::new();
    let long_wait = StorageConfig {
        flush_threads: 2,
        entry_wal_group_wait: Duration::from_secs(3600),
        entry_wal_group_idle: Duration::from_secs(3600),
        ..config()
    };
    let storage = open_with(&io, long_wait).expect("open");
    let log = storage.open_log("alone").expect("log");
    let wal_before = wal_bytes(&io);
    // One append at a time, each waited for: each batch is alone, with its segment's fsync.
    finishes_within(Duration::from_secs(60), move || {
        for index in 0..50 {
            log.append(payload(0, index, "alone"), 0)
                .expect("append")
                .wait()
                .expect("durable");
        }
    });
    assert_eq!(wal_bytes(&io), wal_before, "nothing went through the WAL");

    // A group that nothing else fills is written once its wait has passed.
    a_group_nothing_joins_is_written(StorageConfig {
        flush_threads: 2,
        entry_wal_group_wait: Duration::from_millis(50),
        entry_wal_group_idle: Duration::from_millis(50),
        ..config()
    });
}

/// A batch that goes to the WAL (another log's fsync is under way) starts a group that nothing
/// else joins: it is written, through the WAL, under `config`'s limits (a hang is the failure).
fn a_group_nothing_joins_is_written(config: StorageConfig) {
    let sim = SimIo::new();
    let (io, storage) = open_gated_with(&sim, config);
    let logs = logs_with_segments(&storage, 2);
    let (held, release) = hold_t0_fsync(&io, &logs);
    let wal_before = wal_bytes(&sim);
    let grouped = logs[1].append(payload(1, 1, "grouped"), 0).expect("append");
    finishes_within(Duration::from_secs(60), move || {
        grouped.wait().expect("durable")
    });
    assert!(
        wal_bytes(&sim) > wal_before,
        "the group went through the WAL"
    );
    drop(release);
    held.wait().expect("t0's batch durable");
}

#[test]
fn a_group_no_batch_joins_is_written_once_idle_however_long_its_wait() {
    // Without the idle limit it would wait its hour.
    a_group_nothing_joins_is_written(StorageConfig {
        flush_threads: 2,
        entry_wal_group_wait: Duration::from_secs(3600),
        entry_wal_group_idle: Duration::from_millis(20),
        ..config()
    });
}
