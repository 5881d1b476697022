//! Injected faults on the crash-simulating file system: power cuts at random moments under
//! concurrent load, failing writes and fsyncs, and a full disk.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{
    CrashMode, InitialPosition, Io, Position, SimIo, Storage, StorageConfig, StorageError,
};
use support::gated_io::GatedIo;

const LOG: &str = "persistent://public/default/faults";

fn config() -> StorageConfig {
    StorageConfig {
        segment_max_bytes: 16 * 1024,
        entry_max_bytes: 2048,
        flush_threads: 2,
        ..StorageConfig::default()
    }
}

fn open(io: &SimIo) -> Storage {
    open_with(io, config())
}

fn open_with(io: &SimIo, config: StorageConfig) -> Storage {
    Storage::open_with_io(Path::new("/data"), config, Arc::new(io.clone())).expect("open storage")
}

/// The relaxed flush policy with fsyncs (and cursor persistence) left to the test.
fn relaxed() -> StorageConfig {
    StorageConfig {
        flush_policy: meridian_storage::FlushPolicy::RelaxedWriteOnly {
            fsync_interval: Duration::from_secs(3600),
        },
        cursor_persist_interval: Duration::from_secs(3600),
        ..config()
    }
}

fn payload(writer: u64, sequence: u64) -> Bytes {
    let mut bytes = format!("{writer}:{sequence}:").into_bytes();
    bytes.resize(20 + ((writer * 7 + sequence * 13) % 500) as usize, b'#');
    Bytes::from(bytes)
}

fn parse(data: &[u8]) -> (u64, u64) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split(':');
    let writer = parts
        .next()
        .and_then(|part| part.parse().ok())
        .expect("writer");
    let sequence = parts
        .next()
        .and_then(|part| part.parse().ok())
        .expect("sequence");
    (writer, sequence)
}

/// Appends writer 0's entries `sequences` one at a time, each awaited, and returns them as
/// acknowledged (position, writer, sequence).
fn append_acknowledged(
    log: &Arc<meridian_storage::Log>,
    sequences: std::ops::Range<u64>,
) -> Vec<(Position, u64, u64)> {
    sequences
        .map(|sequence| {
            let position = log
                .append(payload(0, sequence), 0)
                .expect("append")
                .wait()
                .expect("durable");
            (position, 0, sequence)
        })
        .collect()
}

/// Every entry of the log, in order, as (position, writer, sequence).
fn read_everything(storage: &Storage) -> Vec<(Position, u64, u64)> {
    let log = storage.open_log(LOG).expect("log");
    let Some(first) = log.first_position() else {
        return Vec::new();
    };
    log.read_from(first, usize::MAX, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|entry| {
            let (writer, sequence) = parse(&entry.data);
            (entry.position, writer, sequence)
        })
        .collect()
}

/// Checks the promise after a crash: every acknowledged append is present, at its position,
/// exactly once; every writer's entries are in its order; nothing appears twice.
fn check_history(entries: &[(Position, u64, u64)], acknowledged: &[(Position, u64, u64)]) {
    let mut seen = HashSet::new();
    let mut last_sequence: std::collections::HashMap<u64, u64> = Default::default();
    for (position, writer, sequence) in entries {
        assert!(
            seen.insert((*writer, *sequence)),
            "duplicate entry {writer}:{sequence} at {position}"
        );
        if let Some(previous) = last_sequence.insert(*writer, *sequence) {
            assert!(
                previous < *sequence,
                "writer {writer} out of order: {previous} then {sequence}"
            );
        }
    }
    let by_position: std::collections::HashMap<Position, (u64, u64)> = entries
        .iter()
        .map(|(position, writer, sequence)| (*position, (*writer, *sequence)))
        .collect();
    for (position, writer, sequence) in acknowledged {
        assert_eq!(
            by_position.get(position),
            Some(&(*writer, *sequence)),
            "acknowledged append {writer}:{sequence} at {position} lost"
        );
    }
}

#[test]
fn power_cuts_under_concurrent_load_lose_no_acknowledged_append() {
    // Models a power cut at an arbitrary moment while 4 writers append concurrently; the
    // unsynced tail is lost, torn, or torn with garbage.
    for seed in 0..12u64 {
        let mode = [
            CrashMode::LoseUnsynced,
            CrashMode::TornPrefix,
            CrashMode::TornWithGarbage,
        ][seed as usize % 3];
        let io = SimIo::new();
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        // Two rounds per seed: crash, recover, append more, crash again.
        let mut io_now = io;
        let mut all_acknowledged = Vec::new();
        for round in 0..2u64 {
            let storage = open(&io_now);
            let log = storage.open_log(LOG).expect("log");
            let writers: Vec<_> = (0..4u64)
                .map(|writer| {
                    let log = log.clone();
                    let acknowledged = acknowledged.clone();
                    std::thread::spawn(move || {
                        for sequence in 0..u64::MAX {
                            let writer_id = round * 10 + writer;
                            let Ok(append) = log.append(payload(writer_id, sequence), sequence)
                            else {
                                return;
                            };
                            match append.wait() {
                                Ok(position) => acknowledged
                                    .lock()
                                    .expect("lock")
                                    .push((position, writer_id, sequence)),
                                Err(_) => return,
                            }
                        }
                    })
                })
                .collect();
            // Let some appends land, then cut the power: the acknowledgements counted before
            // the snapshot are the ones that must survive it.
            while acknowledged.lock().expect("lock").len() < 200 + seed as usize * 37 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let survivors: Vec<_> = acknowledged.lock().expect("lock").drain(..).collect();
            let crashed = io_now.crash(mode, seed * 100 + round);
            // The old engine keeps running on the old file system until it is stopped.
            storage.close().ok();
            for writer in writers {
                writer.join().expect("writer");
            }
            acknowledged.lock().expect("lock").clear();
            all_acknowledged.extend(survivors);
            io_now = crashed;
            let recovered = open(&io_now);
            check_history(&read_everything(&recovered), &all_acknowledged);
            recovered.close().expect("close");
        }
    }
}

#[test]
fn a_failed_fsync_poisons_the_log_and_nothing_after_it_is_acknowledged() {
    let io = SimIo::new();
    let storage = open(&io);
    let log = storage.open_log(LOG).expect("log");
    let before = log
        .append(payload(0, 0), 0)
        .expect("append")
        .wait()
        .expect("durable");
    io.fail_syncs(1);
    let error = log
        .append(payload(0, 1), 0)
        .expect("queued")
        .wait()
        .expect_err("fsync failed");
    assert!(error.to_string().contains("fsync"), "{error}");
    // Poisoned: later appends are refused at once, even though fsync works again.
    let error = log.append(payload(0, 2), 0).expect_err("poisoned");
    assert!(matches!(error, StorageError::Poisoned { .. }), "{error}");
    // Reads of what was durable continue.
    assert_eq!(parse(&log.read(before).expect("read").data), (0, 0));
    storage.close().ok();

    // After a power cut and reopen, the log serves again and holds the acknowledged entry.
    let crashed = io.crash(CrashMode::LoseUnsynced, 1);
    let storage = open(&crashed);
    let entries = read_everything(&storage);
    check_history(&entries, &[(before, 0, 0)]);
    let log = storage.open_log(LOG).expect("log");
    log.append(payload(0, 3), 0)
        .expect("append")
        .wait()
        .expect("appends work after reopen");
}

#[test]
fn a_failed_write_poisons_the_log() {
    let io = SimIo::new();
    let storage = open(&io);
    let log = storage.open_log(LOG).expect("log");
    log.append(payload(0, 0), 0)
        .expect("append")
        .wait()
        .expect("durable");
    io.fail_writes(1);
    let error = log
        .append(payload(0, 1), 0)
        .expect("queued")
        .wait()
        .expect_err("write failed");
    assert!(error.to_string().contains("write"), "{error}");
    assert!(matches!(
        log.append(payload(0, 2), 0),
        Err(StorageError::Poisoned { .. })
    ));
}

#[test]
fn a_full_disk_fails_appends_promptly_keeps_reads_and_recovers_when_space_is_freed() {
    let io = SimIo::new();
    let storage = open(&io);
    let log = storage.open_log(LOG).expect("log");
    let mut acknowledged = append_acknowledged(&log, 0..20);
    io.set_capacity(Some(io.used_bytes() + 3_000));
    let mut full = None;
    for sequence in 20..200 {
        match log.append(payload(0, sequence), 0).expect("queued").wait() {
            Ok(position) => acknowledged.push((position, 0, sequence)),
            Err(error) => {
                full = Some((sequence, error));
                break;
            }
        }
    }
    let (failed_sequence, error) = full.expect("the disk filled up");
    assert!(matches!(error, StorageError::DiskFull { .. }), "{error}");
    // Reads continue while the disk is full.
    check_history(&read_everything(&storage), &acknowledged);
    // The same append fails again while there is no room for it, without poisoning the log...
    let error = log
        .append(payload(0, failed_sequence), 0)
        .expect("queued")
        .wait()
        .expect_err("still full");
    assert!(matches!(error, StorageError::DiskFull { .. }), "{error}");
    // ...and succeed again once space is freed.
    io.set_capacity(None);
    acknowledged.extend(append_acknowledged(&log, 501..510));
    let entries = read_everything(&storage);
    check_history(&entries, &acknowledged);
    assert_eq!(
        entries.len(),
        acknowledged.len(),
        "failed appends left nothing behind"
    );
    storage.close().expect("close");
    let storage = open(&io.crash(CrashMode::LoseUnsynced, 7));
    check_history(&read_everything(&storage), &acknowledged);
}

#[test]
fn a_new_log_survives_a_power_cut_once_an_append_to_it_is_acknowledged() {
    // Models a power cut right after the first acknowledged append to a new log: the log's
    // directory entry must have been made durable in `logs/`, or the log vanishes with it.
    let io = SimIo::new();
    let storage = open(&io);
    let log = storage.open_log(LOG).expect("log");
    let acknowledged = append_acknowledged(&log, 0..1);
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    storage.close().ok();
    let storage = open(&crashed);
    assert_eq!(storage.log_names().expect("names"), vec![LOG.to_string()]);
    check_history(&read_everything(&storage), &acknowledged);
}

#[test]
fn relaxed_mode_a_power_cut_after_a_segment_roll_leaves_a_log_that_opens() {
    // Models a power cut under the relaxed policy after the log rolled to a new segment: the
    // sealed segment's unsynced tail must not be torn, because recovery accepts a torn tail only
    // in the newest segment.
    for seed in 0..20 {
        let io = SimIo::new();
        let storage = open_with(&io, relaxed());
        let log = storage.open_log(LOG).expect("log");
        for sequence in 0..300 {
            log.append(payload(0, sequence), 0)
                .expect("append")
                .wait()
                .expect("written");
        }
        assert!(log.stats().segments > 2, "the log rolled");
        let crashed = io.crash(CrashMode::TornWithGarbage, seed);
        storage.close().ok();
        let storage = open_with(&crashed, relaxed());
        let sequences: Vec<u64> = read_everything(&storage)
            .into_iter()
            .map(|(_, _, sequence)| sequence)
            .collect();
        let expected: Vec<u64> = (0..sequences.len() as u64).collect();
        assert_eq!(
            sequences, expected,
            "a prefix of the appends, without gaps (seed {seed})"
        );
    }
}

#[test]
fn a_power_cut_while_a_log_is_deleted_never_brings_part_of_it_back() {
    // Models a power cut at each step of `delete_log`: afterwards the log is either gone or
    // whole, never a remnant missing some of its entries.
    let write = |io: &SimIo| -> (Storage, Vec<(Position, u64, u64)>) {
        let storage = open(io);
        let log = storage.open_log(LOG).expect("log");
        let acknowledged = append_acknowledged(&log, 0..60);
        (storage, acknowledged)
    };
    let (deletion_starts, deletion_ends) = {
        let io = SimIo::new();
        let (storage, _) = write(&io);
        let starts = io.operation_count();
        storage.delete_log(LOG).expect("delete");
        (starts, io.operation_count())
    };
    for step in deletion_starts..deletion_ends {
        for mode in [CrashMode::LoseUnsynced, CrashMode::TornPrefix] {
            let io = SimIo::new();
            io.crash_before_operation(step, mode, step);
            let (storage, acknowledged) = write(&io);
            storage.delete_log(LOG).expect("delete");
            storage.close().ok();
            let crashed = io.take_crashed().expect("crashed during the deletion");
            let storage = open(&crashed);
            if storage.log_names().expect("names").is_empty() {
                continue;
            }
            let entries = read_everything(&storage);
            check_history(&entries, &acknowledged);
            assert_eq!(entries.len(), acknowledged.len(), "step {step} ({mode:?})");
        }
    }
}

#[test]
fn concurrent_deletes_all_succeed_and_keep_the_highest_ledger_floor() {
    // Models several topics deleted at once: each raises the persisted ledger floor, and none
    // may persist a lower floor over a higher one (positions would repeat after re-creation).
    let io = SimIo::new();
    let storage = open(&io);
    let names: Vec<String> = (0..16).map(|index| format!("{LOG}-{index}")).collect();
    let mut highest = None;
    for (index, name) in names.iter().enumerate() {
        // Each log's ledger id is larger than the previous one's, by a different number of opens.
        for _ in 0..=index {
            storage.open_log(name).expect("log");
            storage.close_log(name).expect("close");
        }
        let log = storage.open_log(name).expect("log");
        let position = log
            .append(payload(0, 0), 0)
            .expect("append")
            .wait()
            .expect("durable");
        highest = highest.max(Some(position));
    }
    let storage = Arc::new(storage);
    let start = Arc::new(std::sync::Barrier::new(names.len()));
    let deleters: Vec<_> = names
        .iter()
        .map(|name| {
            let storage = storage.clone();
            let start = start.clone();
            let name = name.clone();
            std::thread::spawn(move || {
                start.wait();
                storage.delete_log(&name)
            })
        })
        .collect();
    for deleter in deleters {
        deleter.join().expect("deleter").expect("delete succeeds");
    }
    drop(storage);
    let storage = open(&io.crash(CrashMode::LoseUnsynced, 0));
    let log = storage.open_log(&names[0]).expect("created again");
    let position = log
        .append(payload(0, 1), 0)
        .expect("append")
        .wait()
        .expect("durable");
    assert!(
        Some(position) > highest,
        "position {position} is not above every deleted log's ({highest:?})"
    );
}

#[test]
fn relaxed_mode_completes_appends_before_fsync_and_a_clean_close_makes_them_durable() {
    // Relaxed mode end to end: appends complete once written (no fsync per append), a process
    // that closes cleanly leaves everything durable, and a power cut before the periodic fsync
    // loses only a tail of the appends, never the log.
    let open_relaxed = |io: &SimIo| {
        open_with(
            io,
            StorageConfig {
                segment_max_bytes: 1 << 20,
                ..relaxed()
            },
        )
    };
    let io = SimIo::new();
    let storage = open_relaxed(&io);
    let log = storage.open_log(LOG).expect("log");
    let syncs_before = io.sync_count();
    let acknowledged = append_acknowledged(&log, 0..50);
    assert_eq!(io.sync_count(), syncs_before, "no fsync per append");

    // A power cut now loses the unsynced appends, but the log opens and holds a prefix.
    let power_cut = open_relaxed(&io.crash(CrashMode::TornWithGarbage, 9));
    let survivors = read_everything(&power_cut);
    assert!(
        survivors.len() < acknowledged.len(),
        "nothing was synced yet"
    );
    check_history(&survivors, &acknowledged[..survivors.len()]);
    drop(power_cut);

    // A clean close fsyncs: then a power cut loses nothing.
    storage.close().expect("close");
    let storage = open_relaxed(&io.crash(CrashMode::LoseUnsynced, 0));
    let entries = read_everything(&storage);
    check_history(&entries, &acknowledged);
    assert_eq!(entries.len(), acknowledged.len());
}

#[test]
fn a_log_keeps_one_segment_file_open_however_many_segments_it_retains() {
    // File descriptors must not grow with retained data: sealed segments are closed and
    // opened again only to be read.
    let io = SimIo::new();
    let storage = open(&io);
    let log = storage.open_log(LOG).expect("log");
    let acknowledged = append_acknowledged(&log, 0..400);
    assert!(
        log.stats().segments > 5,
        "{} segments",
        log.stats().segments
    );
    // The engine's cursor WAL and entry WAL, and the log's active segment.
    assert_eq!(io.open_files(), 3, "only the active segment is open");
    check_history(&read_everything(&storage), &acknowledged);
    assert_eq!(
        io.open_files(),
        3,
        "files opened for reading are closed again"
    );
    storage.close().expect("close");
    drop(log);

    let storage = open(&io);
    check_history(&read_everything(&storage), &acknowledged);
    assert_eq!(io.open_files(), 3, "after recovery too");
}

// ---------------------------------------------------------------------------------------------
// Interleavings: an `Io` that delegates to `SimIo` but stops one operation on one path until the
// test lets it go, so that a flush thread and the test's calls run in a chosen order.
// ---------------------------------------------------------------------------------------------

/// Record framing (8) + entry header (16) + payload (100), with [`stepwise_payload`].
const STEPWISE_RECORD_LEN: u64 = 124;
/// Entries that fit one segment under [`stepwise_config`]: 64 + 7 * 124 = 932 bytes.
const STEPWISE_PER_SEGMENT: u64 = 7;

/// Small segments and one flush thread; the tests persist and trim themselves, so every step
/// happens in a known order.
fn stepwise_config() -> StorageConfig {
    StorageConfig {
        segment_max_bytes: 1024,
        entry_max_bytes: 256,
        flush_threads: 1,
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn open_stepwise(sim: &SimIo) -> meridian_storage::Result<Storage> {
    Storage::open_with_io("/data", stepwise_config(), Arc::new(sim.clone()))
}

fn stepwise_payload(index: u64) -> Bytes {
    let mut bytes = format!("entry-{index}-").into_bytes();
    bytes.resize((STEPWISE_RECORD_LEN - 24) as usize, b'.');
    Bytes::from(bytes)
}

fn segment_name(ledger_id: u64, first_entry_id: u64) -> String {
    format!("{ledger_id:020}-{first_entry_id:020}.segment")
}

/// Appends entries `indexes` to `log` and waits until each is durable.
fn append_all(log: &Arc<meridian_storage::Log>, indexes: std::ops::Range<u64>) -> Vec<Position> {
    indexes
        .map(|index| {
            log.append(stepwise_payload(index), 1_000 + index)
                .expect("append")
                .wait()
                .expect("durable")
        })
        .collect()
}

/// A log whose first segment (entries 0..7) is full and acknowledged by cursor `sub`
/// (persisted), and whose flush thread is stopped right before it creates the file of the
/// segment that entry 7 rolled to.
struct RollInFlight {
    // Declared first so that it is dropped first: a failing test must let the flush thread go
    // before the storage waits for it.
    release: Sender<()>,
    sim: SimIo,
    storage: Storage,
    log: Arc<meridian_storage::Log>,
    ledger: u64,
    acknowledged: Vec<Position>,
    append: std::thread::JoinHandle<meridian_storage::Result<Position>>,
}

fn roll_in_flight() -> RollInFlight {
    let sim = SimIo::new();
    let gated = GatedIo::new(sim.clone());
    let storage = Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open");
    let log = storage.open_log("t").expect("log");
    let ledger = log.current_ledger_id();
    let acknowledged = append_all(&log, 0..STEPWISE_PER_SEGMENT);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    log.acknowledge_cumulative("sub", acknowledged[acknowledged.len() - 1])
        .expect("ack");
    log.persist_cursors().expect("persist");
    let (reached, release) = gated.arm("create", &segment_name(ledger, STEPWISE_PER_SEGMENT));
    let appender = log.clone();
    let append = std::thread::spawn(move || {
        appender
            .append(
                stepwise_payload(STEPWISE_PER_SEGMENT),
                1_000 + STEPWISE_PER_SEGMENT,
            )
            .expect("append")
            .wait()
    });
    reached
        .recv()
        .expect("the flush thread reaches the creation of the rolled segment");
    RollInFlight {
        release,
        sim,
        storage,
        log,
        ledger,
        acknowledged,
        append,
    }
}

#[test]
fn trimming_during_a_roll_keeps_the_newest_segment_file_so_positions_are_never_reused() {
    // Models the maintenance thread trimming while a roll is in flight (the new segment has no
    // file yet), then a power cut. The sealed segment is the only file that names the current
    // ledger: were it trimmed, the next open would start that ledger again, and the persisted
    // cursor would count the new entries as acknowledged.
    let run = roll_in_flight();
    run.log.trim().expect("trim");
    let crashed = run.sim.crash(CrashMode::LoseUnsynced, 0);
    run.release.send(()).expect("release");
    run.append
        .join()
        .expect("appender")
        .expect("entry 7 durable");
    run.storage.close().expect("close");

    let storage = open_stepwise(&crashed).expect("the data directory opens");
    let log = storage.open_log("t").expect("log opens");
    let new_ledger = log.current_ledger_id();
    let position = append_all(&log, 100..101)[0];
    assert!(
        new_ledger > run.ledger,
        "reopened log starts ledger {new_ledger}, not above ledger {} used before the crash \
         (positions {:?} were acknowledged); the new entry got position {position}",
        run.ledger,
        run.acknowledged
    );
    assert!(
        !log.is_acknowledged("sub", position),
        "a new, never-delivered entry at {position} looks acknowledged to cursor 'sub'"
    );
}

#[test]
fn a_full_disk_on_a_roll_while_trimming_leaves_a_log_that_accepts_appends_again() {
    // Models trimming during a roll whose segment creation then fails with "no space left on
    // device": the rollback must leave the log a segment to append to once space is freed.
    let run = roll_in_flight();
    run.log.trim().expect("trim");
    let rollbacks = run.log.rollbacks();
    run.sim.set_capacity(Some(run.sim.used_bytes()));
    run.release.send(()).expect("release");
    let outcome = run.append.join().expect("appender");
    assert!(
        matches!(outcome, Err(StorageError::DiskFull { .. })),
        "append during a full disk: {outcome:?}"
    );
    // The failed append's position is given again: the log says so (replicated subscriptions
    // drop what they noted of entries appended before a rollback).
    assert_eq!(run.log.rollbacks(), rollbacks + 1);
    run.sim.set_capacity(None);
    let again = run
        .log
        .append(stepwise_payload(200), 1)
        .and_then(|pending| pending.wait());
    assert!(
        again.is_ok(),
        "appends must succeed again once there is space; got {again:?}"
    );
}

#[test]
fn after_a_kill_between_write_and_fsync_the_restart_makes_what_it_serves_durable() {
    // Models a process killed after writing a batch and before its fsync (the page cache keeps
    // the bytes; the append was never acknowledged), a restart that serves the entry, then a
    // power cut: an entry a reader has seen must not disappear.
    let sim = SimIo::new();
    let gated = GatedIo::new(sim.clone());
    let first = Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open");
    let log = first.open_log("t").expect("log");
    append_all(&log, 0..2);
    let segment = segment_name(log.current_ledger_id(), 0);
    // The process dies before the fsync of entry 2 (its flush thread never runs again).
    let (reached, _never_released) = gated.arm("sync", &segment);
    let pending = log.append(stepwise_payload(2), 2).expect("append");
    let unsynced = pending.position();
    reached.recv().expect("the flush thread reaches the fsync");

    let second = open_stepwise(&sim).expect("restart");
    let log2 = second.open_log("t").expect("log");
    let read = log2
        .read(unsynced)
        .expect("the restarted engine serves entry 2");
    assert_eq!(read.data, stepwise_payload(2));
    let crashed = sim.crash(CrashMode::LoseUnsynced, 0);
    let third = open_stepwise(&crashed).expect("open");
    let log3 = third.open_log("t").expect("log");
    assert!(
        log3.read(unsynced).is_ok(),
        "entry {unsynced} was served to readers after the restart, then erased by a power cut"
    );
    // The first engine's flush thread is parked at the gate for good: never wait for it.
    std::mem::forget(pending);
    std::mem::forget(log);
    std::mem::forget(first);
}

#[test]
fn an_append_whose_fsync_failed_is_not_served_after_the_log_is_reopened() {
    // Models a failed fsync whose bytes stay in the page cache, then a reopen of the log in the
    // same process (a topic reload): the failed append must not come back as a durable entry.
    let sim = SimIo::new();
    let storage = open_stepwise(&sim).expect("open");
    let log = storage.open_log("t").expect("log");
    let acknowledged = append_all(&log, 0..2);
    sim.fail_syncs(1);
    let pending = log.append(stepwise_payload(2), 2).expect("append");
    let failed_position = pending.position();
    assert!(
        pending.wait().is_err(),
        "the fsync failure fails the append"
    );
    drop(log);
    let _ = storage.close_log("t");
    let log = storage.open_log("t").expect("reopen");
    let served = log.read(failed_position);
    assert!(
        served.is_err(),
        "the append that failed (never durable) is served after the reopen: {:?}",
        served.map(|entry| entry.position)
    );
    for position in acknowledged {
        assert!(log.read(position).is_ok(), "{position} lost");
    }
}

#[test]
fn appends_that_failed_with_a_full_disk_stay_gone_after_a_power_cut() {
    // Models a full disk in the middle of a batch: the part that fit was written, and reached
    // the disk by writeback before the engine cut it off. A power cut must not bring the failed
    // appends back as valid entries.
    let sim = SimIo::new();
    let gated = GatedIo::new(sim.clone());
    let storage = Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open");
    let log = storage.open_log("t").expect("log");
    let directory = log.directory().to_path_buf();
    let segment = segment_name(log.current_ledger_id(), 0);
    // Hold the flush thread before it writes entry 0, so entries 1..4 gather into one batch.
    let (reached, release) = gated.arm("write", &segment);
    let first = log.append(stepwise_payload(0), 0).expect("append 0");
    reached.recv().expect("the flush thread reaches the write");
    let failing: Vec<_> = (1..4)
        .map(|index| log.append(stepwise_payload(index), index).expect("append"))
        .collect();
    let failing_positions: Vec<Position> =
        failing.iter().map(|pending| pending.position()).collect();
    // Room for entry 0, entry 1 and half of entry 2.
    sim.set_capacity(Some(
        sim.used_bytes() + 2 * STEPWISE_RECORD_LEN + STEPWISE_RECORD_LEN / 2,
    ));
    let (failed, writeback_done) = gated.arm("write_failed", &segment);
    release.send(()).expect("release");
    failed.recv().expect("the batch's write fails");
    // Writeback of the dirty pages happens now, before the engine cuts them off.
    sim.open(&directory.join(&segment))
        .expect("open")
        .sync()
        .expect("writeback");
    writeback_done.send(()).expect("release");
    first.wait().expect("entry 0 durable");
    for pending in failing {
        let outcome = pending.wait();
        assert!(
            matches!(outcome, Err(StorageError::DiskFull { .. })),
            "{outcome:?}"
        );
    }
    sim.set_capacity(None);
    storage.close().expect("close");
    let crashed = sim.crash(CrashMode::LoseUnsynced, 0);

    let storage = open_stepwise(&crashed).expect("open");
    let log = storage.open_log("t").expect("log");
    let back: Vec<Position> = failing_positions
        .iter()
        .copied()
        .filter(|position| log.read(*position).is_ok())
        .collect();
    assert!(
        back.is_empty(),
        "appends that failed with DiskFull are served after the power cut: {back:?}"
    );
}

#[test]
fn open_log_during_delete_log_is_refused_and_the_log_created_afterwards_keeps_its_appends() {
    // Models a producer reconnecting (and re-creating its topic) while the topic is deleted: an
    // open in the middle of the deletion would create a log inside the directory about to be
    // removed, stay registered, and acknowledge appends that vanish at the next restart.
    let sim = SimIo::new();
    let gated = GatedIo::new(sim.clone());
    let storage =
        Arc::new(Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open"));
    let log = storage.open_log("t").expect("log");
    append_all(&log, 0..2);
    let directory = log.directory().to_path_buf();
    drop(log);
    // Stop `delete_log` right after it closed the log, when it lists the directory.
    let (reached, release) = gated.arm("list_dir", &directory.to_string_lossy());
    let deleter = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.delete_log("t"))
    };
    reached.recv().expect("delete_log lists the directory");
    let during = storage.open_log("t");
    release.send(()).expect("release");
    deleter.join().expect("deleter").expect("delete_log");
    assert!(
        matches!(during, Err(StorageError::BeingDeleted { .. })),
        "open_log during delete_log: {during:?}"
    );
    drop(during);

    // The topic is used again after its deletion.
    let log = storage.open_log("t").expect("open after delete");
    let acknowledged = append_all(&log, 10..13);
    drop(log);
    match Arc::try_unwrap(storage) {
        Ok(storage) => storage.close().expect("close"),
        Err(_) => panic!("storage still shared"),
    }
    let storage = open_stepwise(&sim).expect("reopen");
    let log = storage.open_log("t").expect("log");
    let missing: Vec<Position> = acknowledged
        .iter()
        .copied()
        .filter(|position| log.read(*position).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "appends acknowledged after delete_log returned are gone after a restart: {missing:?}"
    );
}

#[test]
fn after_a_restart_on_a_full_disk_logs_open_for_reading_and_accept_appends_once_there_is_space() {
    // Models a broker restarted while its disk is full: opening a log must not need space
    // (the new ledger's segment is created by its first append), so consumers keep reading.
    let sim = SimIo::new();
    let storage = open_stepwise(&sim).expect("open");
    let log = storage.open_log("t").expect("log");
    let before = append_all(&log, 0..3);
    storage.close().expect("close");
    sim.set_capacity(Some(sim.used_bytes()));

    let storage = open_stepwise(&sim).expect("the storage opens on a full disk");
    let log = storage.open_log("t").expect("the log opens on a full disk");
    for (index, position) in before.iter().enumerate() {
        assert_eq!(
            log.read(*position).expect("reads continue").data,
            stepwise_payload(index as u64)
        );
    }
    let full = log.append(stepwise_payload(3), 3).expect("queued").wait();
    assert!(
        matches!(full, Err(StorageError::DiskFull { .. })),
        "{full:?}"
    );
    sim.set_capacity(None);
    let after = append_all(&log, 3..5);
    assert!(after[0] > before[2], "{after:?} after {before:?}");
    storage.close().expect("close");

    let storage = open_stepwise(&sim).expect("reopen");
    let log = storage.open_log("t").expect("log");
    for (index, position) in before.iter().chain(&after).enumerate() {
        assert_eq!(
            log.read(*position).expect("durable").data,
            stepwise_payload(index as u64)
        );
    }
}

/// What a restart does: opens the data directory and every log in it, then closes it.
fn recover(sim: &SimIo) -> meridian_storage::Result<()> {
    let storage = open_stepwise(sim)?;
    for name in storage.log_names()? {
        storage.open_log(&name)?;
    }
    storage.close()
}

#[test]
fn a_segment_torn_while_being_created_after_a_clean_close_survives_a_power_cut_during_recovery() {
    // Models a power cut while an open created its new segment (the name durable, the header
    // not), after a clean close had sealed the segment before it; then a second power cut before
    // each step of the recovery that removes the torn file. The log must open every time.
    let sim = SimIo::new();
    let storage = open_stepwise(&sim).expect("open");
    let log = storage.open_log("t").expect("log");
    let acknowledged = append_all(&log, 0..3);
    let ledger = log.current_ledger_id();
    let directory = log.directory().to_path_buf();
    storage.close().expect("close");
    let torn = sim
        .create(&directory.join(segment_name(ledger + 1, 0)))
        .expect("create");
    torn.write_all_at(b"MRD", 0).expect("write");
    torn.sync().expect("sync");
    sim.sync_dir(&directory).expect("sync dir");

    let steps = {
        let probe = sim.crash(CrashMode::LoseUnsynced, 0);
        recover(&probe).expect("a single recovery succeeds");
        probe.operation_count()
    };
    for step in 0..=steps {
        for mode in [
            CrashMode::LoseUnsynced,
            CrashMode::TornPrefix,
            CrashMode::TornWithGarbage,
        ] {
            let copy = sim.crash(CrashMode::LoseUnsynced, 0);
            copy.crash_before_operation(step, mode, step);
            let _ = recover(&copy);
            let twice = copy
                .take_crashed()
                .unwrap_or_else(|| copy.crash(mode, step));
            let storage = open_stepwise(&twice).expect("storage opens");
            let log = storage.open_log("t").unwrap_or_else(|error| {
                panic!("power cut before recovery step {step} ({mode:?}): {error}")
            });
            for position in &acknowledged {
                assert!(log.read(*position).is_ok(), "{position} lost");
            }
        }
    }
}

/// This thread's id, from the `/proc/thread-self` link (`<pid>/task/<tid>`).
fn current_thread_id() -> String {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|link| {
            link.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .expect("/proc/thread-self")
}

/// Waits until `thread_id` (a thread of this process) sleeps (blocked on a lock or a channel)
/// or `finished` says it is done; true if it finished. Reads its state from
/// `/proc/self/task/<tid>/stat`, so no timing is involved.
fn await_blocked_or_finished(thread_id: &str, finished: &Receiver<()>) -> bool {
    loop {
        if finished.try_recv().is_ok() {
            return true;
        }
        let stat = std::fs::read_to_string(format!("/proc/self/task/{thread_id}/stat"))
            .unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if state == Some('S') && finished.try_recv().is_err() {
            return false;
        }
        std::thread::yield_now();
    }
}

/// Opens logs `low` and `high` (a larger ledger id: opened three times) with one acknowledged
/// entry each, and returns high's ledger id.
fn two_logs_with_different_ledgers(storage: &Storage) -> u64 {
    storage.open_log("low").expect("low");
    for _ in 0..3 {
        storage.close_log("high").expect("close");
        storage.open_log("high").expect("high");
    }
    let mut ledger = 0;
    for name in ["low", "high"] {
        let log = storage.open_log(name).expect("log");
        append_all(&log, 0..1);
        ledger = log.current_ledger_id();
    }
    ledger
}

/// After a power cut, a log created again under a deleted name starts above `deleted_ledger`.
fn assert_new_ledgers_start_above(sim: &SimIo, deleted_ledger: u64) {
    let storage = open_stepwise(&sim.crash(CrashMode::LoseUnsynced, 0)).expect("reopen");
    let log = storage.open_log("high").expect("created again");
    assert!(
        log.current_ledger_id() > deleted_ledger,
        "the log created again uses ledger {} although a deleted log used {deleted_ledger}: positions repeat",
        log.current_ledger_id()
    );
}

#[test]
fn deleting_a_log_of_a_lower_ledger_after_a_higher_one_keeps_the_higher_floor() {
    // The floor is only ever raised: the second deletion must not persist its lower ledger.
    let sim = SimIo::new();
    let storage = open_stepwise(&sim).expect("open");
    let high = two_logs_with_different_ledgers(&storage);
    storage.delete_log("high").expect("delete high");
    storage.delete_log("low").expect("delete low");
    drop(storage);
    assert_new_ledgers_start_above(&sim, high);
}

#[test]
fn a_deletion_that_raises_the_floor_while_another_is_writing_it_keeps_the_higher_floor() {
    // Two topics deleted at once. The deletion of the lower ledger is stopped inside its floor
    // update, after it compared its ledger with the floor and before it wrote the file; the
    // deletion of the higher ledger then runs. If floor updates were not serialized, the higher
    // floor would be written first and then overwritten by the lower one.
    let sim = SimIo::new();
    let gated = GatedIo::new(sim.clone());
    let storage =
        Arc::new(Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open"));
    let high = two_logs_with_different_ledgers(&storage);
    let (reached, release) = gated.arm("create", "ledger-floor.tmp");
    let low_deleter = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.delete_log("low"))
    };
    reached
        .recv()
        .expect("the deletion of low reaches its floor update");
    let (finished_tx, finished_rx) = channel();
    let (thread_id_tx, thread_id_rx) = channel();
    let high_deleter = {
        let storage = storage.clone();
        std::thread::spawn(move || {
            let _ = thread_id_tx.send(current_thread_id());
            let result = storage.delete_log("high");
            let _ = finished_tx.send(());
            result
        })
    };
    let thread_id = thread_id_rx.recv().expect("thread id");
    // Either the deletion of high waits for the floor update under way (serialized), or it
    // finished before the lower one wrote the floor.
    await_blocked_or_finished(&thread_id, &finished_rx);
    release.send(()).expect("release");
    low_deleter.join().expect("low").expect("delete low");
    high_deleter.join().expect("high").expect("delete high");
    drop(storage);
    assert_new_ledgers_start_above(&sim, high);
}

#[test]
fn a_log_being_recovered_holds_up_no_other_log() {
    // One large log's recovery (reading and checksumming every segment) must not stall the
    // other logs: their opens, appends, cursor persistence, trimming and deletions. The
    // recovery is stopped at its first step; everything else must complete meanwhile. (Were
    // the engine's registry lock held across the open, the other operations would wait for
    // the release, which comes only after the deadlock guard below gives up.)
    let sim = SimIo::new();
    {
        let storage = open_stepwise(&sim).expect("open");
        for name in ["slow", "other", "doomed"] {
            let log = storage.open_log(name).expect("log");
            append_all(&log, 0..3);
            log.open_cursor("sub", InitialPosition::Earliest)
                .expect("cursor");
        }
        storage.close().expect("close");
    }
    let gated = GatedIo::new(sim.clone());
    let storage =
        Arc::new(Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open"));
    let (reached, release) = gated.arm("list_dir", "/logs/slow");
    let slow = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.open_log("slow").map(|_| ()))
    };
    reached.recv().expect("the recovery of slow starts");
    let (done_tx, done_rx) = channel();
    let others = {
        let storage = storage.clone();
        std::thread::spawn(move || {
            let other = storage.open_log("other").expect("open other");
            let appended = append_all(&other, 3..5);
            other
                .acknowledge_cumulative("sub", appended[1])
                .expect("ack");
            storage.persist_cursors();
            other.trim().expect("trim");
            storage.open_log("fresh").expect("create fresh");
            storage.delete_log("doomed").expect("delete doomed");
            let _ = done_tx.send(());
            other.mark_delete_position("sub")
        })
    };
    // Only a guard against a hang: the operations need no time bound to pass.
    let completed = done_rx.recv_timeout(Duration::from_secs(120)).is_ok();
    release.send(()).expect("release");
    slow.join().expect("slow").expect("open slow");
    let mark_delete = others.join().expect("others");
    assert!(
        completed,
        "other logs' operations waited for the recovery of another log"
    );
    assert!(mark_delete.flatten().is_some());
}

#[test]
fn relaxed_mode_a_failed_periodic_fsync_poisons_the_log_and_serves_nothing_it_did_not_sync() {
    // Relaxed mode acknowledges appends once written. When the periodic fsync then fails, the
    // unsynced appends may never reach the disk: from then on the log must neither accept
    // appends nor serve (or let a cursor acknowledge) anything beyond its last synced entry,
    // and a reopen must not serve them either. The entries synced before stay.
    let config = StorageConfig {
        flush_policy: meridian_storage::FlushPolicy::RelaxedWriteOnly {
            fsync_interval: Duration::from_millis(5),
        },
        ..relaxed()
    };
    let io = SimIo::new();
    let synced = {
        let storage = open_with(&io, config.clone());
        let log = storage.open_log(LOG).expect("log");
        let synced = append_acknowledged(&log, 0..3);
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        storage.close().expect("close syncs");
        synced
    };
    let last_synced = synced.last().map(|(position, _, _)| *position);

    let storage = open_with(&io, config.clone());
    let log = storage.open_log(LOG).expect("log");
    io.fail_syncs(1);
    // Appends complete once written, until the maintenance thread's fsync fails.
    let mut written = Vec::new();
    for sequence in 100.. {
        match log.append(payload(0, sequence), 0) {
            Ok(pending) => match pending.wait() {
                Ok(position) => {
                    // Acknowledged individually (the synced entries before it are not):
                    // lost with it if it was not synced.
                    let _ = log.acknowledge("sub", &[position]);
                    written.push(position);
                }
                Err(_) => break,
            },
            Err(StorageError::Poisoned { .. }) => break,
            Err(error) => panic!("unexpected append error: {error}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!written.is_empty(), "an append completed before the fsync");
    // The acknowledgements of the lost entries no longer count against the backlog.
    assert_eq!(log.backlog_entries("sub"), Some(synced.len() as u64));
    assert_eq!(log.acknowledged_range_count("sub"), 0);
    let error = log.append(payload(0, 1), 0).expect_err("poisoned");
    assert!(matches!(error, StorageError::Poisoned { .. }), "{error}");
    assert_eq!(log.last_position(), last_synced);
    check_history(&read_everything(&storage), &synced);
    assert_eq!(read_everything(&storage).len(), synced.len());
    let served: Vec<Position> = written
        .iter()
        .copied()
        .filter(|position| log.read(*position).is_ok())
        .collect();
    assert!(served.is_empty(), "unsynced appends served: {served:?}");
    let mark_delete = log
        .acknowledge_cumulative("sub", *written.last().expect("written"))
        .expect("ack");
    assert_eq!(
        mark_delete, last_synced,
        "a cursor acknowledged entries that may be lost"
    );
    drop(log);
    let _ = storage.close();

    // A restart of the process (the page cache survives) and a power cut serve the same.
    for io in [io.clone(), io.crash(CrashMode::LoseUnsynced, 0)] {
        let storage = open_with(&io, config.clone());
        let entries = read_everything(&storage);
        check_history(&entries, &synced);
        assert_eq!(entries.len(), synced.len(), "after a reopen: {entries:?}");
        let log = storage.open_log(LOG).expect("log");
        log.append(payload(0, 2), 0)
            .expect("append")
            .wait()
            .expect("appends work after the reopen");
    }
}

#[test]
fn relaxed_mode_a_failed_fsync_of_a_segment_being_sealed_loses_only_what_was_not_synced() {
    // A roll syncs the segment it seals before creating the next one. If that fsync fails, the
    // appends written since the last fsync are lost as in a power cut: the log is poisoned,
    // serves only what was synced, and opens again without a gap or corruption.
    let config = StorageConfig {
        segment_max_bytes: 4096,
        ..relaxed()
    };
    let io = SimIo::new();
    let synced = {
        let storage = open_with(&io, config.clone());
        let log = storage.open_log(LOG).expect("log");
        let synced = append_acknowledged(&log, 0..2);
        storage.close().expect("close syncs");
        synced
    };
    let storage = open_with(&io, config.clone());
    let log = storage.open_log(LOG).expect("log");
    io.fail_syncs(1);
    // Written without an fsync until one append rolls the segment; that roll's fsync fails.
    let mut written = Vec::new();
    for sequence in 100..200 {
        match log.append(payload(0, sequence), 0).expect("append").wait() {
            Ok(position) => written.push(position),
            Err(_) => break,
        }
    }
    assert!(!written.is_empty() && written.len() < 100, "{written:?}");
    let error = log.append(payload(0, 1), 0).expect_err("poisoned");
    assert!(matches!(error, StorageError::Poisoned { .. }), "{error}");
    let last_synced = synced.last().map(|(position, _, _)| *position);
    assert_eq!(log.last_position(), last_synced);
    drop(log);
    let _ = storage.close();
    for io in [io.clone(), io.crash(CrashMode::LoseUnsynced, 0)] {
        let storage = open_with(&io, config.clone());
        let entries = read_everything(&storage);
        check_history(&entries, &synced);
        assert_eq!(entries.len(), synced.len(), "after a reopen: {entries:?}");
    }
}

#[test]
fn a_checkpoint_during_a_close_keeps_the_wal_bytes_that_close_has_not_written_yet() {
    // A log leaves the registry before its close writes its journal. A checkpoint in between
    // must still write (or keep) the WAL bytes of that log: the old checkpoint looked at the
    // registry only and removed the WAL file, and a power cut before the close's journal
    // write lost the cursor a completed persistence pass had made durable.
    let sim = SimIo::new();
    let gated = GatedIo::new(sim.clone());
    let storage =
        Arc::new(Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open"));
    let log = storage.open_log("t").expect("log");
    let positions = append_all(&log, 0..5);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    log.acknowledge_cumulative("sub", positions[3])
        .expect("ack");
    // A completed pass: durable in the WAL only.
    storage.persist_cursors();
    drop(log);
    // The close stops at its seal, before it writes the journal.
    let (reached, release) = gated.arm("write", ".segment");
    let closing = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.close_log("t"))
    };
    reached.recv().expect("the close seals the segment");
    storage.checkpoint_cursors().expect("checkpoint");
    let crashed = sim.crash(CrashMode::LoseUnsynced, 0);
    drop(release);
    closing.join().expect("close thread").expect("close");

    let storage = open_stepwise(&crashed).expect("open after the power cut");
    let log = storage.open_log("t").expect("log");
    assert_eq!(
        log.mark_delete_position("sub"),
        Some(Some(positions[3])),
        "the cursor is where its last completed pass persisted it"
    );
}

#[test]
fn open_log_during_close_log_waits_and_gets_the_state_the_close_persisted() {
    // Models a topic unloaded (its log closed) while a client reconnects (the log opened
    // again). The old open did not wait: a second instance of the log read the journal
    // before the close had written the last acknowledgements into it (they came back), and
    // both instances then wrote the same journal and segments.
    let sim = SimIo::new();
    let gated = GatedIo::new(sim.clone());
    let storage =
        Arc::new(Storage::open_with_io("/data", stepwise_config(), gated.clone()).expect("open"));
    let log = storage.open_log("t").expect("log");
    let positions = append_all(&log, 0..5);
    log.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    log.acknowledge_cumulative("sub", positions[1])
        .expect("ack");
    storage.persist_cursors();
    // Only the close persists this one.
    log.acknowledge_cumulative("sub", positions[3])
        .expect("ack");
    drop(log);
    // The close stops right before it writes the journal.
    let (reached, release) = gated.arm("write", "cursors.journal");
    let closing = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.close_log("t"))
    };
    reached.recv().expect("the close writes the journal");
    let opening = {
        let storage = storage.clone();
        std::thread::spawn(move || {
            storage
                .open_log("t")
                .map(|log| log.mark_delete_position("sub"))
        })
    };
    // The open either waits for the close (the close and the open both use the name's lock)
    // or, as the old code did, finishes while the close is stopped.
    while storage.name_lock_users("t") < 2 && !opening.is_finished() {
        std::thread::yield_now();
    }
    drop(release);
    closing.join().expect("close thread").expect("close");
    let seen = opening.join().expect("open thread").expect("open");
    assert_eq!(
        seen,
        Some(Some(positions[3])),
        "the log opened again has the cursor its close persisted"
    );
}
