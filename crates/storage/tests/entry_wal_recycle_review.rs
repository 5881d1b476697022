//! Hostile review of 3712ba7 / 016e663: retired entry WAL files kept as `entries-<seq>.free` and
//! written over by the next WAL files (new salt). Attacks on: nothing acknowledged lost and
//! nothing refused back after a power cut at any step (across several checkpoints with
//! recycling); no record of a file's earlier life replayed; the engine always opens; at most
//! two free files; a full disk or a failed step of a recycle does not wedge the WAL.

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use meridian_storage::{CrashMode, Log, SimIo, Storage, StorageError};
use support::entry_wal::*;

const MODES: [CrashMode; 3] = [
    CrashMode::LoseUnsynced,
    CrashMode::TornPrefix,
    CrashMode::TornWithGarbage,
];

fn free_files(io: &SimIo) -> Vec<String> {
    wal_files(io)
        .into_iter()
        .filter(|name| name.ends_with(".free"))
        .collect()
}

/// What the workload appended, per log, in order: (payload, acknowledged, refused).
#[derive(Default, Clone)]
struct History {
    /// (log number, payload, steps done when acknowledged or refused, outcome)
    appends: Vec<(usize, Bytes, u64, Outcome)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Acknowledged,
    Refused,
}

impl History {
    fn group(&mut self, io: &SimIo, storage: &Storage, logs: &[Arc<Log>], count: u64, tag: &str) {
        for (number, index, append) in append_together(storage, logs, count, tag) {
            let outcome = match append.wait() {
                Ok(_) => Outcome::Acknowledged,
                Err(StorageError::DiskFull { .. }) => Outcome::Refused,
                Err(error) => panic!("t{number}:{index}:{tag}: {error}"),
            };
            self.appends.push((
                number,
                payload(number, index, tag),
                io.operation_count(),
                outcome,
            ));
        }
    }

    fn refused(&self) -> usize {
        self.appends
            .iter()
            .filter(|(_, _, _, outcome)| *outcome == Outcome::Refused)
            .count()
    }
}

/// Checks the logs of a crashed image: the engine opens, each log holds a prefix of what was
/// appended to it (refused appends left out) that includes every append acknowledged before
/// the crash point, and nothing refused.
fn verify(crashed: &SimIo, history: &History, crash_point: u64, logs: usize, what: &str) {
    let storage = open_with(crashed, config())
        .unwrap_or_else(|error| panic!("{what}: the engine does not open: {error}"));
    for number in 0..logs {
        let log = storage
            .open_log(&format!("t{number}"))
            .unwrap_or_else(|error| panic!("{what}: log t{number} does not open: {error}"));
        // A group refused after the power cut was still under way at it: may be there.
        let entries: Vec<Bytes> = all(&log)
            .into_iter()
            .filter(|entry| {
                !history.appends.iter().any(|(_, payload, done, outcome)| {
                    *outcome == Outcome::Refused && *done > crash_point && payload == entry
                })
            })
            .collect();
        let expected: Vec<&Bytes> = history
            .appends
            .iter()
            .filter(|(log, _, _, outcome)| *log == number && *outcome == Outcome::Acknowledged)
            .map(|(_, payload, _, _)| payload)
            .collect();
        let must: usize = history
            .appends
            .iter()
            .filter(|(log, _, done, outcome)| {
                *log == number && *outcome == Outcome::Acknowledged && *done <= crash_point
            })
            .count();
        for (_, refused, done, outcome) in &history.appends {
            if *outcome == Outcome::Refused && *done <= crash_point {
                assert!(
                    !entries.contains(refused),
                    "{what}: log t{number}: refused append {:?} came back",
                    String::from_utf8_lossy(&refused[..12])
                );
            }
        }
        // Entries beyond the acknowledged ones (an unfinished group) may be there; the
        // acknowledged ones must form a prefix, in order.
        let known = entries.len().min(expected.len());
        for (at, entry) in entries.iter().take(known).enumerate() {
            assert_eq!(
                entry, expected[at],
                "{what}: log t{number}: entry {at} is not what was appended there"
            );
        }
        assert!(
            entries.len() >= must,
            "{what}: log t{number}: {} entries, but {must} were acknowledged before the power cut",
            entries.len()
        );
    }
    storage.close().expect("close");
    assert_eq!(
        wal_files(crashed),
        Vec::<String>::new(),
        "{what}: a clean close leaves no WAL file"
    );
}

/// Asserts that log `t<number>`'s `entries` begin with `want`, in order (`what`: the crash).
fn assert_begins_with(entries: &[Bytes], want: &[&Bytes], what: &str, number: usize) {
    assert!(
        entries.len() >= want.len() && entries.iter().zip(want).all(|(entry, want)| entry == *want),
        "{what}: t{number}: {:?}",
        entries
            .iter()
            .map(|entry| String::from_utf8_lossy(&entry[..10]).into_owned())
            .collect::<Vec<_>>()
    );
}

/// Several groups and three checkpoints (the second and third write the next WAL file over a
/// retired one), then a clean close. With `refuse`, a group larger than the recycled file is
/// refused with a full disk in the middle of the WAL's write into the recycled file, and the
/// WAL is started again (from `usable()`, after `broken`) for the next group.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// A group refused by a full disk in the middle of its write into a recycled file.
    Refuse,
    /// The directory fsync after the second checkpoint's recycle rename fails.
    RecycleDirSync,
    /// The second checkpoint's recycle header write fails.
    RecycleHeaderWrite,
    /// The second checkpoint's retire fails (its directory fsync).
    RetireDirSync,
}

fn workload(io: &SimIo, fault: Fault) -> History {
    let refuse = fault == Fault::Refuse;
    let mut history = History::default();
    let storage = open(io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    history.group(io, &storage, &logs, 1, "r0");
    history.group(io, &storage, &logs, 1, "r1");
    for round in 1..=3 {
        if round == 2 {
            match fault {
                Fault::RecycleDirSync => io.fail_nth_dir_sync(1),
                Fault::RecycleHeaderWrite => io.fail_writes(1),
                Fault::RetireDirSync => io.fail_nth_dir_sync(2),
                Fault::None | Fault::Refuse => {}
            }
        }
        let checkpoint = storage.checkpoint_entries();
        if fault == Fault::None || round != 2 {
            checkpoint.expect("checkpoint");
        }
        if fault != Fault::RetireDirSync {
            assert!(
                free_files(io).len() <= 2,
                "at most two free files: {:?}",
                wal_files(io)
            );
        }
        history.group(io, &storage, &logs, 1, &format!("c{round}"));
        if refuse && round == 2 {
            // The current file (3) is file 1 written over: a group larger than it grows it.
            let segments = 2 * 3 * RECORD_BYTES;
            io.set_capacity(Some(io.used_bytes() + segments + 3 * RECORD_BYTES));
            history.group(io, &storage, &logs, 3, "refused");
            io.set_capacity(None);
            assert_eq!(history.refused(), 6, "the big group is refused");
        }
        history.group(io, &storage, &logs, 1, &format!("d{round}"));
    }
    drop(logs);
    storage.close().expect("close");
    assert_eq!(wal_files(io), Vec::<String>::new());
    history
}

fn crash_loop(fault: Fault, second_every: u64) {
    let steps = {
        let io = SimIo::new();
        workload(&io, fault);
        io.operation_count()
    };
    eprintln!("{steps} steps");
    for crash_point in 0..=steps {
        for mode in MODES {
            let io = SimIo::new();
            io.crash_before_operation(crash_point, mode, crash_point);
            let history = workload(&io, fault);
            let crashed = io
                .take_crashed()
                .unwrap_or_else(|| io.crash(mode, crash_point));
            let before_recovery = crashed.crash(CrashMode::LoseUnsynced, 0);
            let what = format!("power cut before step {crash_point} of {steps} ({mode:?})");
            verify(&crashed, &history, crash_point, 2, &what);
            if second_every == 0 || crash_point % second_every != 0 {
                continue;
            }
            let recovery_steps = {
                let probe = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                verify(&probe, &history, crash_point, 2, &what);
                probe.operation_count()
            };
            for second in 0..=recovery_steps {
                let copy = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                copy.crash_before_operation(second, mode, crash_point * 1000 + second);
                // The recovery itself is the first verify (opens, reads, closes).
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    verify(&copy, &history, crash_point, 2, &what)
                }));
                let twice = copy
                    .take_crashed()
                    .unwrap_or_else(|| copy.crash(mode, crash_point + second));
                verify(
                    &twice,
                    &history,
                    crash_point,
                    2,
                    &format!(
                        "{what}, then before step {second} of {recovery_steps} of the recovery"
                    ),
                );
            }
        }
    }
}

/// ATTACK 1: a power cut before every step (every crash mode) of a run with three checkpoints,
/// two of which recycle a retired file, and a clean close.
#[test]
fn recycle_crash_loop_across_three_checkpoints() {
    crash_loop(Fault::None, 1);
}

/// ATTACK 2: as attack 1, with a group refused by a full disk in the middle of its WAL write
/// into a recycled file (the cut shortens the recycled file below its earlier life), the WAL
/// started again from `usable()` after `broken` for the next group.
#[test]
fn recycle_crash_loop_with_a_refused_group_in_a_recycled_file() {
    crash_loop(Fault::Refuse, 1);
}

/// Two logs with a durable group each in WAL file 1, then `checkpoints` checkpoints, each
/// followed by a durable group.
fn recycling_setup(io: &SimIo, checkpoints: u64) -> (Storage, Vec<Arc<Log>>, History) {
    let storage = open(io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    let mut history = History::default();
    history.group(io, &storage, &logs, 1, "first");
    history.group(io, &storage, &logs, 1, "a");
    for round in 0..checkpoints {
        storage.checkpoint_entries().expect("checkpoint");
        history.group(io, &storage, &logs, 1, &format!("k{round}"));
    }
    (storage, logs, history)
}

fn verify_crashes(io: &SimIo, history: &History) {
    let point = io.operation_count();
    for (name, crashed) in crashes(io, 12) {
        verify(&crashed, history, point, 2, &name);
    }
}

/// ATTACK 3: the recycle's header write fails: the next file is created instead; the
/// checkpoint and later groups go on, and a power cut loses nothing.
#[test]
fn a_failed_header_write_while_recycling_falls_back_to_a_new_file() {
    let io = SimIo::new();
    let (storage, logs, mut history) = recycling_setup(&io, 1);
    assert_eq!(free_files(&io).len(), 1);
    io.fail_writes(1);
    storage
        .checkpoint_entries()
        .expect("the checkpoint creates the file instead");
    history.group(&io, &storage, &logs, 2, "after");
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "later");
    assert!(free_files(&io).len() <= 2, "{:?}", wal_files(&io));
    verify_crashes(&io, &history);
}

/// ATTACK 4: the recycle's header fsync fails.
#[test]
fn a_failed_header_fsync_while_recycling_falls_back_to_a_new_file() {
    let io = SimIo::new();
    let (storage, logs, mut history) = recycling_setup(&io, 1);
    io.fail_syncs(1);
    storage
        .checkpoint_entries()
        .expect("the checkpoint creates the file instead");
    history.group(&io, &storage, &logs, 2, "after");
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "later");
    verify_crashes(&io, &history);
}

/// ATTACK 5: the directory fsync after the recycle's rename fails: the file already has its
/// new name (the fallback must not trip over it), and the rename may not survive a power cut.
#[test]
fn a_failed_directory_fsync_after_the_recycle_rename() {
    let io = SimIo::new();
    let (storage, logs, mut history) = recycling_setup(&io, 1);
    io.fail_nth_dir_sync(1);
    let _ = storage.checkpoint_entries();
    // Whatever happened, appends are durable, and later checkpoints work.
    history.group(&io, &storage, &logs, 2, "after");
    verify_crashes(&io, &history);
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "later");
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "later2");
    assert!(free_files(&io).len() <= 2, "{:?}", wal_files(&io));
    verify_crashes(&io, &history);
}

/// ATTACK 6: a checkpoint whose retire fails midway (its directory fsync fails after the rename
/// of a retired file to `.free`), twice: the free files must stay bounded (at most two).
#[test]
fn a_retire_failing_midway_does_not_leak_free_files() {
    let io = SimIo::new();
    let (storage, logs, mut history) = recycling_setup(&io, 1);
    // Files: entries-1.free, entries-2.wal (current).
    for _ in 0..2 {
        // The first directory fsync is the rotate's (recycle or create), the second the
        // retire's.
        io.fail_nth_dir_sync(2);
        assert!(
            storage.checkpoint_entries().is_err(),
            "the retire's directory fsync fails"
        );
        history.group(&io, &storage, &logs, 1, "between");
    }
    for round in 0..3 {
        storage.checkpoint_entries().expect("checkpoint");
        history.group(&io, &storage, &logs, 1, &format!("after{round}"));
        assert!(
            free_files(&io).len() <= 2,
            "checkpoint {round} after two failed retires: at most two free files, found {:?}",
            wal_files(&io)
        );
    }
    verify_crashes(&io, &history);
}

/// ATTACK 7: a WAL fsync fails in a recycled file (the group is cut off it, which cuts the
/// recycled file's preallocation too); the next group starts the WAL again from `usable()`
/// over another retired file. A power cut then: the replay reads the cut file and the recycled
/// one fine, and nothing acknowledged is lost.
#[test]
fn a_failed_wal_fsync_in_a_recycled_file_then_a_rotate_from_usable() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..4)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    let (pair, other) = logs.split_at(2);
    let mut history = History::default();
    for tag in ["first", "a", "b"] {
        history.group(&io, &storage, &logs, 1, tag);
    }
    // Retires 1, then writes 3 over 1 and retires 2: entries-2.free, entries-3.wal (recycled).
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "c");
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "d");
    let files_before = wal_files(&io);
    // The WAL's fsync fails: the pair's logs are poisoned; the group is cut off file 3.
    io.fail_syncs(1);
    for (_, _, append) in append_together(&storage, pair, 1, "failed") {
        assert!(append.wait().is_err());
    }
    // The other two logs' next group: the WAL starts again over entries-2.free.
    let mut later = History::default();
    for tag in ["e", "f"] {
        for (number, index, append) in append_together(&storage, other, 1, tag) {
            append.wait().expect("durable");
            later.appends.push((
                number + 2,
                payload(number, index, tag),
                io.operation_count(),
                Outcome::Acknowledged,
            ));
        }
    }
    eprintln!("{files_before:?} -> {:?}", wal_files(&io));
    let point = io.operation_count();
    for (name, crashed) in crashes(&io, 12) {
        let storage = open_with(&crashed, config())
            .unwrap_or_else(|error| panic!("{name}: the engine does not open: {error}"));
        for number in 0..4 {
            let log = storage.open_log(&format!("t{number}")).expect("log");
            let entries = all(&log);
            let mut want: Vec<Bytes> = ["first", "a", "b", "c", "d"]
                .iter()
                .map(|tag| payload(number, 0, tag))
                .collect();
            if number >= 2 {
                want.extend(
                    later
                        .appends
                        .iter()
                        .filter(|(log, _, done, _)| *log == number && *done <= point)
                        .map(|(_, payload, _, _)| payload.clone()),
                );
            }
            assert_begins_with(&entries, &want.iter().collect::<Vec<_>>(), &name, number);
        }
        storage.close().expect("close");
    }
}

/// ATTACK 8: a full disk while no group fails (a rotate from `usable()` after a refused group
/// must be able to start the WAL again once space is back); the free files are released, and
/// the WAL is used again afterwards (not wedged).
#[test]
fn a_full_disk_then_space_back_uses_the_wal_again() {
    let io = SimIo::new();
    let (storage, logs, mut history) = recycling_setup(&io, 3);
    assert!(!free_files(&io).is_empty());
    // A group larger than the recycled current file, with no room for the growth.
    let segments = 2 * 4 * RECORD_BYTES;
    io.set_capacity(Some(io.used_bytes() + segments + 50));
    history.group(&io, &storage, &logs, 4, "refused");
    assert!(history.refused() > 0, "the big group is refused");
    assert!(
        free_files(&io).is_empty(),
        "free files released: {:?}",
        wal_files(&io)
    );
    io.set_capacity(None);
    let wal_before = wal_bytes(&io);
    history.group(&io, &storage, &logs, 2, "again");
    assert!(
        wal_bytes(&io) > wal_before,
        "the WAL is used again once there is room: {:?}",
        wal_files(&io)
    );
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "later");
    storage.checkpoint_entries().expect("checkpoint");
    history.group(&io, &storage, &logs, 1, "later2");
    verify_crashes(&io, &history);
}

/// ATTACK 9: crash loops with a failed step of the second checkpoint's recycle or retire (one
/// power cut each: attacks 1 and 2 cover a second one during recovery).
#[test]
fn recycle_crash_loop_with_a_failed_recycle_directory_fsync() {
    crash_loop(Fault::RecycleDirSync, 0);
}

#[test]
fn recycle_crash_loop_with_a_failed_recycle_header_write() {
    crash_loop(Fault::RecycleHeaderWrite, 0);
}

#[test]
fn recycle_crash_loop_with_a_failed_retire() {
    crash_loop(Fault::RetireDirSync, 0);
}

/// ATTACK 10: rotates racing with the leader's encode: two flush threads, four appenders, a
/// thread running entry checkpoints back to back (each recycling a retired file, so the salt
/// changes under the leader). A power cut at a random step: every acknowledged entry must be
/// there (a record written with the wrong salt ends the replay of its file early).
#[test]
fn checkpoints_racing_with_groups_then_a_power_cut() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    let config = meridian_storage::StorageConfig {
        flush_threads: 2,
        ..config()
    };
    for seed in 0..6u64 {
        let io = SimIo::new();
        // Somewhere in the middle of the run.
        io.crash_before_operation(400 + seed * 250, CrashMode::LoseUnsynced, seed);
        let storage = Arc::new(open_with(&io, config.clone()).expect("open"));
        let acks: Arc<Mutex<Vec<(usize, Bytes, u64)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = {
            let (storage, stop) = (storage.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut done = 0;
                while !stop.load(Ordering::SeqCst) {
                    storage.checkpoint_entries().expect("checkpoint");
                    done += 1;
                    std::thread::yield_now();
                }
                done
            })
        };
        let mut appenders = Vec::new();
        for number in 0..4usize {
            let (storage, acks, io) = (storage.clone(), acks.clone(), io.clone());
            appenders.push(std::thread::spawn(move || {
                let log = storage.open_log(&format!("t{number}")).expect("log");
                for round in 0..60u64 {
                    let count = 1 + (round + number as u64) % 3;
                    let pending: Vec<_> = (0..count)
                        .map(|index| {
                            let data = payload(number, round * 10 + index, "x");
                            (
                                data.clone(),
                                log.append(data, round * 10 + index).expect("append"),
                            )
                        })
                        .collect();
                    for (data, append) in pending {
                        append.wait().expect("durable");
                        acks.lock()
                            .expect("lock")
                            .push((number, data, io.operation_count()));
                    }
                }
            }));
        }
        for appender in appenders {
            appender.join().expect("appender");
        }
        stop.store(true, Ordering::SeqCst);
        let checkpoints = checkpointer.join().expect("checkpointer");
        let crashed = io
            .take_crashed()
            .unwrap_or_else(|| io.crash(CrashMode::LoseUnsynced, seed));
        let point = 400 + seed * 250;
        let acks = acks.lock().expect("lock").clone();
        eprintln!(
            "seed {seed}: {checkpoints} checkpoints, {} steps, {} acks",
            io.operation_count(),
            acks.len()
        );
        let reopened = open_with(&crashed, config.clone()).expect("opens");
        for number in 0..4usize {
            let log = reopened.open_log(&format!("t{number}")).expect("log");
            let entries = all(&log);
            for (log_number, data, done) in &acks {
                if *log_number == number && *done <= point {
                    assert!(
                        entries.contains(data),
                        "seed {seed}: t{number}: acknowledged {:?} (step {done} <= {point}) lost",
                        String::from_utf8_lossy(&data[..10])
                    );
                }
            }
        }
        reopened.close().expect("close");
        drop(storage);
    }
}

/// The scenario of attack 7 as a workload: a failed WAL fsync in a recycled file (the pair's
/// logs are poisoned), then the other logs' groups start the WAL again over a free file from
/// `usable()`, another checkpoint recycles, and a clean close. Returns the acknowledged
/// appends (log, payload, steps done).
fn failed_fsync_workload(io: &SimIo) -> Vec<(usize, Bytes, u64)> {
    let storage = open(io);
    let logs: Vec<Arc<Log>> = (0..4)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    let mut acks = Vec::new();
    let group = |logs: &[Arc<Log>], first: usize, tag: &str, acks: &mut Vec<_>| {
        for (number, index, append) in append_together(&storage, logs, 1, tag) {
            append.wait().expect("durable");
            acks.push((
                first + number,
                payload(number, index, tag),
                io.operation_count(),
            ));
        }
    };
    for tag in ["first", "a", "b"] {
        group(&logs, 0, tag, &mut acks);
    }
    storage.checkpoint_entries().expect("checkpoint");
    group(&logs, 0, "c", &mut acks);
    storage.checkpoint_entries().expect("checkpoint");
    group(&logs, 0, "d", &mut acks);
    io.fail_syncs(1);
    for (_, _, append) in append_together(&storage, &logs[..2], 1, "failed") {
        assert!(append.wait().is_err());
    }
    group(&logs[2..], 2, "e", &mut acks);
    group(&logs[2..], 2, "f", &mut acks);
    storage.checkpoint_entries().expect("checkpoint");
    group(&logs[2..], 2, "g", &mut acks);
    drop(logs);
    let _ = storage.close();
    acks
}

/// ATTACK 11: a power cut before every step of `failed_fsync_workload`, every mode.
#[test]
fn recycle_crash_loop_with_a_failed_wal_fsync_in_a_recycled_file() {
    let steps = {
        let io = SimIo::new();
        failed_fsync_workload(&io);
        io.operation_count()
    };
    eprintln!("{steps} steps");
    for crash_point in 0..=steps {
        for mode in MODES {
            let io = SimIo::new();
            io.crash_before_operation(crash_point, mode, crash_point);
            let acks = failed_fsync_workload(&io);
            let crashed = io
                .take_crashed()
                .unwrap_or_else(|| io.crash(mode, crash_point));
            let what = format!("power cut before step {crash_point} of {steps} ({mode:?})");
            let storage = open_with(&crashed, config())
                .unwrap_or_else(|error| panic!("{what}: the engine does not open: {error}"));
            for number in 0..4 {
                let log = storage
                    .open_log(&format!("t{number}"))
                    .unwrap_or_else(|error| panic!("{what}: t{number} does not open: {error}"));
                let entries = all(&log);
                let want: Vec<&Bytes> = acks
                    .iter()
                    .filter(|(log, _, done)| *log == number && *done <= crash_point)
                    .map(|(_, payload, _)| payload)
                    .collect();
                assert_begins_with(&entries, &want, &what, number);
            }
            storage.close().expect("close");
        }
    }
}

/// ATTACK 12: a restart on a full disk after a power cut that left a retired file: the replay
/// of the WAL is deferred (no room in the segments), and the start returns before it removes
/// the crashed run's free files, which hold exactly the space the deferred replay needs. The
/// docs: free files are "removed at start, at a clean shutdown and on a full disk".
#[test]
fn a_restart_on_a_full_disk_removes_the_crashed_runs_free_files() {
    let io = SimIo::new();
    let (storage, logs, _) = recycling_setup(&io, 2);
    // Files: entries-2.free (one group of two records), entries-3.wal (recycled).
    for (_, _, append) in append_together(&storage, &logs, 1, "acked") {
        append.wait().expect("durable");
    }
    assert_eq!(free_files(&io).len(), 1, "{:?}", wal_files(&io));
    let crashed = io.crash(CrashMode::LoseUnsynced, 1);
    drop(logs);
    drop(storage);
    let full = crashed.used_bytes();
    crashed.set_capacity(Some(full));
    // The same image without the free file: t0 opens (the free file's space is enough).
    {
        let without = crashed.crash(CrashMode::LoseUnsynced, 0);
        for name in free_files(&without) {
            meridian_storage::Io::remove_file(&without, &Path::new("/data").join(name))
                .expect("remove");
        }
        without.set_capacity(Some(full));
        let storage = open_with(&without, config()).expect("opens");
        let log = storage
            .open_log("t0")
            .expect("t0 opens once the free file is gone");
        assert_eq!(all(&log).last(), Some(&payload(0, 0, "acked")));
    }
    let storage = open_with(&crashed, config()).expect("the engine opens on a full disk");
    let leftover = free_files(&crashed);
    let opened = storage.open_log("t0").map(|log| all(&log));
    assert!(
        leftover.is_empty(),
        "the start keeps the crashed run's free files {leftover:?} on a full disk \
         (t0 opens: {:?})",
        opened.as_ref().map(|entries| entries.len())
    );
}
