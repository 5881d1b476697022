//! Hostile review of the entry WAL group's idle limit (`0c9f173`): a waiting group is written
//! once no batch has been handed over for `entry_wal_group_idle`, or once `entry_wal_group_wait`
//! has passed since its oldest batch, or once it holds 512 KiB; whichever comes first.
//!
//! Every wait that could hang is bounded ([`within`]). On a timeout the test fails by leaking
//! the engine and its logs, then panicking (`fail_leaking`); any other failure leaks the
//! engine too ([`Engine`]): a panic that unwound into the engine's close would wait for the
//! stuck flush, or for a fsync the test still holds.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use meridian_storage::{
    CrashMode, Log, PendingAppend, Position, SimIo, StorageConfig, StorageError,
};
use support::engine::Engine;
use support::entry_wal::*;

/// Far longer than anything these tests do when nothing is stuck.
const LIMIT: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);

/// A batch this large fills a group alone (512 KiB).
const FULL: usize = 600 * 1024;

fn open_gated_engine(
    sim: &SimIo,
    config: StorageConfig,
) -> (Arc<support::gated_io::GatedIo>, Engine) {
    let (io, storage) = open_gated_with(sim, config);
    (io, Engine::new(storage))
}

/// Waits for `append` (bounded by [`LIMIT`]): the engine back, and the append's result.
fn settle<S>(
    storage: S,
    logs: &[Arc<Log>],
    append: PendingAppend,
    what: &str,
) -> (S, meridian_storage::Result<Position>) {
    settle_within(LIMIT, storage, logs, append, what)
}

fn durable<S>(storage: S, logs: &[Arc<Log>], append: PendingAppend, what: &str) -> S {
    let (storage, result) = settle(storage, logs, append, what);
    result.unwrap_or_else(|error| panic!("{what}: {error}"));
    storage
}

fn with(flush_threads: usize, group_wait: Duration, group_idle: Duration) -> StorageConfig {
    StorageConfig {
        flush_threads,
        entry_wal_group_wait: group_wait,
        entry_wal_group_idle: group_idle,
        ..config()
    }
}

/// Every combination of the two limits the promises name (idle zero, a nanosecond, longer than
/// the wait, a wait of zero with a long idle limit, both near the hour's bound) writes a group
/// nothing joins, and releases the leader role: the groups after it go too.
#[test]
fn review_every_combination_of_wait_and_idle_writes_a_group_nothing_joins() {
    let cases = [
        (HOUR, Duration::ZERO),
        (HOUR, Duration::from_nanos(1)),
        (HOUR, Duration::from_millis(20)),
        (Duration::from_millis(20), HOUR),
        (Duration::ZERO, HOUR),
        (Duration::ZERO, Duration::ZERO),
        (HOUR - Duration::from_nanos(1), Duration::from_millis(5)),
        (Duration::from_millis(5), HOUR - Duration::from_nanos(1)),
    ];
    for (group_wait, group_idle) in cases {
        let case = format!("group_wait {group_wait:?}, group_idle {group_idle:?}");
        let sim = SimIo::new();
        let (io, storage) = open_gated_engine(&sim, with(2, group_wait, group_idle));
        let logs = logs_with_segments(&storage, 2);
        let (held, release) = hold_t0_fsync(&io, &logs);
        let wal_before = wal_bytes(&sim);
        // t0's own fsync is under way: each of t1's batches leads a group of one in the WAL.
        let mut storage = storage;
        for index in 1..4 {
            let append = logs[1]
                .append(payload(1, index, "grouped"), 0)
                .expect("append");
            storage = durable(
                storage,
                &logs,
                append,
                &format!("{case}: t1's group {index}"),
            );
        }
        assert!(
            wal_bytes(&sim) >= wal_before + 3 * RECORD_BYTES,
            "{case}: t1's groups went through the WAL"
        );
        drop(release);
        let storage = durable(storage, &logs, held, &format!("{case}: t0's held batch"));
        drop(logs);
        storage.close().expect("close");
    }
}

/// Both limits at the hour's bound: a full group goes at once, and a group that two half
/// batches fill goes once the second is handed over (the 512 KiB hand-over wakes the leader;
/// neither deadline is anywhere near).
#[test]
fn review_at_the_hours_bound_a_full_group_goes_at_once() {
    let sim = SimIo::new();
    let (io, storage) = open_gated_engine(&sim, with(3, HOUR, HOUR));
    let logs = logs_with_segments(&storage, 3);
    let (held, release) = hold_t0_fsync(&io, &logs);
    let full = logs[1]
        .append(entry_of(1, "full", FULL), 0)
        .expect("append");
    let storage = durable(storage, &logs, full, "a full group");
    let half = 300 * 1024;
    let first = logs[1]
        .append(entry_of(1, "half", half), 0)
        .expect("append");
    let second = logs[2]
        .append(entry_of(2, "half", half), 0)
        .expect("append");
    let storage = durable(storage, &logs, first, "t1's half");
    let storage = durable(storage, &logs, second, "t2's half");
    drop(release);
    let storage = durable(storage, &logs, held, "t0's held batch");
    drop(logs);
    storage.close().expect("close");
}

/// Hand-overs that keep coming, each within the idle limit of the one before, move the idle
/// deadline on, but never past the group wait: the group is written while they still come.
/// (A deadline from the newest hand-over alone would keep t1's group waiting until the feeder
/// ran out of logs.)
#[test]
fn review_hand_overs_within_the_idle_limit_do_not_extend_the_group_past_its_wait() {
    const FEEDER_LOGS: usize = 300;
    let sim = SimIo::new();
    let (io, storage) = open_gated_engine(
        &sim,
        with(3, Duration::from_millis(500), Duration::from_millis(250)),
    );
    // t0 (held), t1 (the leader), then the feeder's logs: each with its segment, so that their
    // batches are handed over (a batch that creates a segment is flushed whole by its log).
    let logs = logs_with_segments(&storage, FEEDER_LOGS + 2);
    let (held, release) = hold_t0_fsync(&io, &logs);
    let first = logs[1].append(payload(1, 1, "first"), 0).expect("append");
    let stop = Arc::new(AtomicBool::new(false));
    let fed = Arc::new(AtomicUsize::new(0));
    let feeder = {
        let logs = logs[2..].to_vec();
        let stop = stop.clone();
        let fed = fed.clone();
        std::thread::spawn(move || {
            let mut appends = Vec::new();
            for (number, log) in logs.iter().enumerate() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                appends.push(
                    log.append(payload(number + 2, 1, "fed"), 0)
                        .expect("append"),
                );
                fed.fetch_add(1, Ordering::SeqCst);
                // Well within the idle limit: the group never goes idle while this runs.
                std::thread::sleep(Duration::from_millis(20));
            }
            appends
        })
    };
    let (storage, result) = settle(storage, &logs, first, "t1's first batch");
    let fed_when_written = fed.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    result.expect("t1's batch durable");
    let appends = feeder.join().expect("feeder");
    assert!(
        fed_when_written < FEEDER_LOGS,
        "t1's group was written only after the feeder stopped ({fed_when_written} hand-overs, \
         one every 20 ms): the idle deadline moved past the 500 ms group wait"
    );
    let mut storage = storage;
    for append in appends {
        storage = durable(storage, &logs, append, "a fed batch");
    }
    drop(release);
    let storage = durable(storage, &logs, held, "t0's held batch");
    drop(logs);
    storage.close().expect("close");
}

/// A batch handed over while the leader fsyncs the WAL is written after that fsync, once idle
/// (its wait counts from its hand-over), however long the group wait; `latest` of the group
/// before does not carry over (nor `since`).
#[test]
fn review_a_batch_handed_over_while_the_wal_fsyncs_goes_once_idle() {
    for group_idle in [Duration::ZERO, Duration::from_millis(20)] {
        let sim = SimIo::new();
        let (io, storage) = open_gated_engine(&sim, with(3, HOUR, group_idle));
        let logs = logs_with_segments(&storage, 3);
        let (held, release) = hold_t0_fsync(&io, &logs);
        let (wal_sync, release_wal) = io.arm_containing("sync", "/entries-");
        let first = logs[1].append(payload(1, 1, "first"), 0).expect("append");
        if wal_sync.recv_timeout(LIMIT).is_err() {
            fail_leaking(storage, logs, "t1's group never reached the WAL's fsync");
        }
        // The leader is in the WAL's fsync: t2's batch is handed over meanwhile.
        let during = logs[2].append(payload(2, 1, "during"), 0).expect("append");
        drop(release_wal);
        let storage = durable(storage, &logs, first, "t1's group");
        let storage = durable(
            storage,
            &logs,
            during,
            &format!("t2's batch handed over during the WAL's fsync (idle {group_idle:?})"),
        );
        drop(release);
        let storage = durable(storage, &logs, held, "t0's held batch");
        for (number, log) in logs.iter().enumerate().skip(1) {
            let tag = if number == 1 { "first" } else { "during" };
            assert_eq!(
                all(log),
                vec![payload(number, 0, "first"), payload(number, 1, tag)]
            );
        }
        drop(logs);
        storage.close().expect("close");
    }
}

/// An engine with three logs, `t0`'s own fsync held (see [`hold_t0_fsync`]), and a group
/// that goes to the WAL alone: `t1`'s next batch, `tag`, handed over once `fault` is set up
/// (under an idle limit of 10 ms and a wait of an hour). Returns the engine, the logs, `t0`'s
/// held batch and its release, and the group's result.
fn a_lone_group_after(sim: &SimIo, fault: impl FnOnce(&SimIo), tag: &str) -> HeldGroup {
    let (io, storage) = open_gated_engine(sim, with(3, HOUR, Duration::from_millis(10)));
    let logs = logs_with_segments(&storage, 3);
    let (held, release) = hold_t0_fsync(&io, &logs);
    fault(sim);
    let append = logs[1].append(payload(1, 1, tag), 0).expect("append");
    let (storage, result) = settle(storage, &logs, append, "t1's group");
    HeldGroup {
        storage,
        logs,
        held,
        release,
        result,
    }
}

struct HeldGroup {
    storage: Engine,
    logs: Vec<Arc<Log>>,
    held: PendingAppend,
    release: std::sync::mpsc::Sender<()>,
    result: meridian_storage::Result<Position>,
}

impl HeldGroup {
    /// Releases `t0`'s held fsync, waits for its batch, and takes power cuts (three of each
    /// crash mode) of what the engine then holds.
    fn power_cuts(self, sim: &SimIo) -> Vec<(String, SimIo)> {
        let HeldGroup {
            storage,
            logs,
            held,
            release,
            ..
        } = self;
        drop(release);
        let storage = durable(storage, &logs, held, "t0's held batch");
        drop(logs);
        let crashed = crashes(sim, 3);
        drop(storage);
        crashed
    }
}

/// A group whose WAL fsync fails, under an idle limit and a wait of an hour: its append fails,
/// the leader role is released (the next group is written), and after power cuts nothing
/// acknowledged is lost.
#[test]
fn review_a_failed_wal_fsync_in_an_idle_group_releases_the_leader() {
    let sim = SimIo::new();
    let mut group = a_lone_group_after(&sim, |sim| sim.fail_syncs(1), "failed");
    assert!(
        group.result.is_err(),
        "an append whose WAL fsync failed fails"
    );
    let after = group.logs[2]
        .append(payload(2, 1, "after"), 0)
        .expect("append");
    group.storage = durable(
        group.storage,
        &group.logs,
        after,
        "the group after a failed WAL fsync",
    );
    for (name, crashed) in group.power_cuts(&sim) {
        let storage = open(&crashed);
        let t0 = all(&storage.open_log("t0").expect("log"));
        assert_eq!(
            t0,
            vec![payload(0, 0, "first"), payload(0, 1, "held")],
            "{name}: t0"
        );
        let t1 = all(&storage.open_log("t1").expect("log"));
        assert_eq!(t1[0], payload(1, 0, "first"), "{name}: t1");
        let t2 = all(&storage.open_log("t2").expect("log"));
        assert_eq!(
            t2,
            vec![payload(2, 0, "first"), payload(2, 1, "after")],
            "{name}: t2"
        );
    }
}

/// A group refused by a full disk (its WAL record does not fit), under an idle limit and a
/// wait of an hour: its append fails with `DiskFull`, the leader role is released, and once
/// there is space the logs are written again, durably.
#[test]
fn review_a_full_disk_in_an_idle_group_releases_the_leader() {
    let sim = SimIo::new();
    // Room for t1's segment write, not for its WAL record as well.
    let fill = |sim: &SimIo| sim.set_capacity(Some(sim.used_bytes() + RECORD_BYTES + 16));
    let mut group = a_lone_group_after(&sim, fill, "refused");
    match &group.result {
        Err(StorageError::DiskFull { .. }) => {}
        other => panic!("expected DiskFull, got {other:?}"),
    }
    sim.set_capacity(None);
    for number in 1..3 {
        let append = group.logs[number]
            .append(payload(number, 1, "after"), 0)
            .expect("append");
        group.storage = durable(
            group.storage,
            &group.logs,
            append,
            "a group after the full disk",
        );
    }
    assert_logs_after_power_cuts(
        group.power_cuts(&sim),
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            ("t1", vec![payload(1, 0, "first"), payload(1, 1, "after")]),
            ("t2", vec![payload(2, 0, "first"), payload(2, 1, "after")]),
        ],
    );
}

/// A log deleted while its batch waits in a group that only the idle limit ends (a wait of an
/// hour, nothing fills it): the deletion finishes, and after power cuts the log stays deleted
/// and the other logs keep what was acknowledged.
#[test]
fn review_a_log_deleted_while_its_batch_waits_for_the_idle_limit() {
    let sim = SimIo::new();
    let (io, storage) = open_gated_with(&sim, with(3, HOUR, Duration::from_millis(200)));
    let batches = (payload(1, 1, "doomed"), payload(2, 1, "kept"));
    assert_a_log_deleted_while_its_batch_waits(&sim, &io, storage, batches, 3, LIMIT);
}

/// A checkpoint between two hand-overs of a group that the idle limit ends: the group goes to
/// the new WAL file, and after power cuts everything acknowledged is there.
#[test]
fn review_a_checkpoint_while_an_idle_group_waits_loses_nothing_acknowledged() {
    let sim = SimIo::new();
    let (io, storage) = open_gated_engine(&sim, with(3, HOUR, Duration::from_millis(200)));
    let logs = logs_with_segments(&storage, 3);
    let (held, release) = hold_t0_fsync(&io, &logs);
    let first = logs[1].append(payload(1, 1, "a"), 0).expect("append");
    storage.checkpoint_entries().expect("checkpoint");
    let second = logs[2].append(payload(2, 1, "a"), 0).expect("append");
    storage.checkpoint_entries().expect("checkpoint");
    let storage = durable(storage, &logs, first, "t1's batch");
    let storage = durable(storage, &logs, second, "t2's batch");
    drop(release);
    let storage = durable(storage, &logs, held, "t0's held batch");
    drop(logs);
    let crashed = crashes(&sim, 3);
    drop(storage);
    assert_logs_after_power_cuts(
        crashed,
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            ("t1", vec![payload(1, 0, "first"), payload(1, 1, "a")]),
            ("t2", vec![payload(2, 0, "first"), payload(2, 1, "a")]),
        ],
    );
}

/// Durability under load with the idle limit: four writers append to eight logs, one append
/// at a time per log (so groups form and end by idleness, by their wait, or as the fsyncs
/// allow), while power cuts are taken mid-run. Every append acknowledged before a power cut
/// is in what that power cut left, in order.
#[test]
fn review_power_cuts_mid_run_lose_nothing_acknowledged_with_the_idle_limit() {
    const LOGS: usize = 8;
    const APPENDS: u64 = 200;
    let sim = SimIo::new();
    let storage = Engine::new(
        open_with(
            &sim,
            with(3, Duration::from_millis(2), Duration::from_micros(100)),
        )
        .expect("open"),
    );
    let logs: Vec<Arc<Log>> = (0..LOGS)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    let acknowledged: Arc<Vec<AtomicU64>> =
        Arc::new((0..LOGS).map(|_| AtomicU64::new(0)).collect());
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let mine: Vec<(usize, Arc<Log>)> = (0..LOGS)
                .filter(|number| number % 4 == writer)
                .map(|number| (number, logs[number].clone()))
                .collect();
            let acknowledged = acknowledged.clone();
            std::thread::spawn(move || {
                for index in 0..APPENDS {
                    let pending: Vec<_> = mine
                        .iter()
                        .map(|(number, log)| {
                            (
                                *number,
                                log.append(payload(*number, index, "w"), 0).expect("append"),
                            )
                        })
                        .collect();
                    for (number, append) in pending {
                        append.wait().expect("durable");
                        acknowledged[number].store(index + 1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    let mut cuts = Vec::new();
    let outcome = within(LIMIT, {
        let acknowledged = acknowledged.clone();
        let sim = sim.clone();
        move || {
            let mut cuts = Vec::new();
            let mut seed = 0;
            while writers.iter().any(|writer| !writer.is_finished()) {
                std::thread::sleep(Duration::from_millis(3));
                let counts: Vec<u64> = acknowledged
                    .iter()
                    .map(|count| count.load(Ordering::SeqCst))
                    .collect();
                let mode = match seed % 3 {
                    0 => CrashMode::LoseUnsynced,
                    1 => CrashMode::TornPrefix,
                    _ => CrashMode::TornWithGarbage,
                };
                cuts.push((format!("{mode:?}/{seed}"), counts, sim.crash(mode, seed)));
                seed += 1;
            }
            for writer in writers {
                writer.join().expect("writer");
            }
            cuts
        }
    });
    match outcome {
        Some(taken) => {
            // At least one power cut each sleep of 3 ms while the writers ran.
            assert!(!taken.is_empty(), "power cuts taken mid-run");
            eprintln!("{} power cuts mid-run", taken.len());
            cuts.extend(taken);
        }
        None => fail_leaking(storage, logs, "the writers did not finish"),
    }
    drop(logs);
    let crashed = crashes(&sim, 2);
    storage.close().expect("close");
    for (name, crashed) in crashed {
        cuts.push((format!("end/{name}"), vec![APPENDS; LOGS], crashed));
    }
    for (name, counts, crashed) in cuts {
        let storage = open(&crashed);
        for (number, count) in counts.iter().enumerate() {
            let log = storage.open_log(&format!("t{number}")).expect("log");
            let entries = all(&log);
            let expected: Vec<_> = (0..*count)
                .map(|index| payload(number, index, "w"))
                .collect();
            assert!(
                entries.len() >= expected.len() && entries[..expected.len()] == expected[..],
                "{name}: t{number} lost acknowledged appends: {} of {count} kept",
                entries.len()
            );
        }
    }
}

/// The idle limit's bound, as the group wait's: an hour is accepted (also with the wait at an
/// hour), anything longer refused, by `validate` and by the engine's open.
#[test]
fn review_an_idle_limit_past_an_hour_is_refused_by_validate_and_open() {
    assert_eq!(with(2, HOUR, HOUR).validate(), Ok(()));
    for too_long in [HOUR + Duration::from_nanos(1), Duration::MAX] {
        assert!(with(2, Duration::ZERO, too_long).validate().is_err());
        match open_with(&SimIo::new(), with(2, Duration::ZERO, too_long)) {
            Err(StorageError::InvalidConfig(_)) => {}
            Err(other) => panic!("{too_long:?}: expected InvalidConfig, got {other}"),
            Ok(_) => panic!("{too_long:?}: an idle limit past an hour was accepted"),
        }
    }
}
