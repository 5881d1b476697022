//! Hostile review of the entry WAL's group wait (a group waits up to `entry_wal_group_wait`
//! or 512 KiB before its write and fsync; a lone batch keeps its segment's own fsync unless a
//! group of several logs went through the WAL within the last group wait). The first three
//! tests failed on the change as first written (`86d63d0`) and pass since `50b2310`.
//!
//! Every wait that could hang is bounded ([`within`]). On a timeout the test fails by leaking
//! the engine and its logs, then panicking (`fail_leaking`): a panic that unwound into the
//! engine's close would wait for the stuck flush, and an abort would take the other tests of
//! this file down with it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use meridian_storage::{Log, PendingAppend, Position, SimIo, Storage, StorageConfig};
use support::entry_wal::*;
use support::gated_io::GatedIo;

/// Far longer than anything these tests do when nothing is stuck.
const LIMIT: Duration = Duration::from_secs(20);

fn wait_durable(
    storage: Storage,
    logs: &[Arc<Log>],
    append: PendingAppend,
    what: &str,
) -> (Storage, Position) {
    let (storage, result) = settle_within(LIMIT, storage, logs, append, what);
    (
        storage,
        result.unwrap_or_else(|error| panic!("{what}: {error}")),
    )
}

/// A batch this large fills a group alone (`GROUP_FULL_BYTES`, 512 KiB): it goes at once,
/// however long the group wait.
const FULL: usize = 600 * 1024;

/// A log written alone never waits for groups that do not come. One group goes through the
/// WAL; then only `t1` is written, one append at a time: at most its first batch joins the
/// WAL. (At first a group of one lone batch also counted as "a group went through the WAL",
/// so each of t1's batches led a group of one and waited the whole group wait, at every
/// append, for as long as its appends followed each other within the wait.)
#[test]
fn review_a_log_written_alone_after_a_group_goes_back_to_its_own_fsync() {
    let sim = SimIo::new();
    let group_wait = Duration::from_millis(300);
    let (io, storage) = open_gated(&sim, 2, group_wait);
    let logs = logs_with_segments(&storage, 2);
    let (held, release) = hold_t0_fsync(&io, &logs);
    let wal_before_group = wal_bytes(&sim);
    let grouped = logs[1].append(payload(1, 1, "grouped"), 0).expect("append");
    let (storage, _) = wait_durable(storage, &logs, grouped, "t1's grouped batch");
    assert!(
        wal_bytes(&sim) > wal_before_group,
        "t1's batch went through the WAL"
    );
    drop(release);
    let (storage, _) = wait_durable(storage, &logs, held, "t0's held batch");

    // Only t1 from now on, each append waited for before the next.
    let wal_before = wal_bytes(&sim);
    let mut storage = storage;
    for index in 2..7 {
        let append = logs[1]
            .append(payload(1, index, "alone"), 0)
            .expect("append");
        storage = wait_durable(storage, &logs, append, "t1's lone batch").0;
    }
    let through_wal = (wal_bytes(&sim) - wal_before) / RECORD_BYTES;
    assert!(
        through_wal <= 1,
        "a log written alone (nothing else written since the group) went through the WAL \
         {through_wal} times out of 5, each time after waiting the group wait ({group_wait:?}) \
         for other logs: its own group of one keeps `grouped` fresh"
    );
    drop(logs);
    storage.close().expect("close");
}

/// The WAL is pinned (a close could not fsync its segment): every group is flushed log by log,
/// nothing goes through the WAL for the rest of the run. A log written alone afterwards takes
/// its own fsync at once. (At first such a group counted as one that went through the WAL, so
/// the lone log led a group of one and waited the whole group wait, here an hour.)
#[test]
fn review_a_log_written_alone_never_waits_after_groups_that_did_not_go_through_the_wal() {
    let sim = SimIo::new();
    let (io, storage) = open_gated(&sim, 3, Duration::from_secs(3600));
    let logs = logs_with_segments(&storage, 3);
    // Pins the WAL: t2's close cannot fsync its segment.
    sim.fail_syncs(1);
    assert!(storage.close_log("t2").is_err(), "t2's close fsync failed");
    let logs: Vec<Arc<Log>> = logs[..2].to_vec();
    let wal_before = wal_bytes(&sim);

    // A group (t1's batch, full: it goes at once) while t0's own fsync is under way.
    let (held, release) = hold_t0_fsync(&io, &logs);
    let grouped = logs[1]
        .append(entry_of(1, "grouped", FULL), 0)
        .expect("append");
    let (storage, _) = wait_durable(storage, &logs, grouped, "t1's full group");
    drop(release);
    let (storage, _) = wait_durable(storage, &logs, held, "t0's held batch");
    assert_eq!(wal_bytes(&sim), wal_before, "the pinned WAL took nothing");

    // t1 alone: nothing else is written, and no group went through the WAL.
    let alone = logs[1].append(payload(1, 2, "alone"), 0).expect("append");
    let (storage, _) = wait_durable(
        storage,
        &logs,
        alone,
        "a log written alone after a group that was flushed log by log (pinned WAL) waited \
         for a group: its batch should have taken its segment's own fsync at once",
    );
    drop(logs);
    let _ = storage.close();
}

/// A group wait the clock cannot add to an `Instant` (`Duration::MAX`, a library user's "wait
/// until the group is full") is refused, or at least never stalls a full group. (At first it
/// was accepted, and the first leader panicked on `since + group_wait` with `leader` still set
/// and its batches waiting: no thread wrote them, nor any batch handed over after them.)
#[test]
fn review_a_group_wait_too_long_for_the_clock_is_refused_or_never_stalls_a_full_group() {
    let sim = SimIo::new();
    let io = GatedIo::new(sim.clone());
    let config = StorageConfig {
        flush_threads: 3,
        entry_wal_group_wait: Duration::MAX,
        ..config()
    };
    let storage = match Storage::open_with_io("/data", config, io.clone()) {
        Ok(storage) => storage,
        // Refusing the setting is a fix.
        Err(meridian_storage::StorageError::InvalidConfig(_)) => return,
        Err(error) => panic!("open: {error}"),
    };
    let logs = logs_with_segments(&storage, 2);
    let (held, release) = hold_t0_fsync(&io, &logs);
    let full = logs[1]
        .append(entry_of(1, "full", FULL), 0)
        .expect("append");
    let (storage, _) = wait_durable(
        storage,
        &logs,
        full,
        "a full group under a group wait of Duration::MAX (the leader panicked: \
         `since + group_wait` overflows an Instant; leader left set, batch left waiting)",
    );
    drop(release);
    let (storage, _) = wait_durable(storage, &logs, held, "t0's held batch");
    drop(logs);
    storage.close().expect("close");
}

/// Held (kept as a regression test): a checkpoint runs while a group waits to fill; the
/// group then goes to the new WAL file, and after a power cut every acknowledged append is
/// there.
#[test]
fn review_a_checkpoint_while_a_group_waits_loses_nothing_acknowledged() {
    let sim = SimIo::new();
    let (io, storage) = open_gated(&sim, 3, Duration::from_secs(3600));
    let logs = logs_with_segments(&storage, 3);
    let (held, release) = hold_t0_fsync(&io, &logs);
    // Two half groups: whichever is handed over first waits (an hour) for the other, which
    // fills the group. The checkpoint runs in between.
    let half = 300 * 1024;
    let first = logs[1]
        .append(entry_of(1, "half", half), 0)
        .expect("append");
    storage.checkpoint_entries().expect("checkpoint");
    let second = logs[2]
        .append(entry_of(2, "half", half), 0)
        .expect("append");
    let (storage, _) = wait_durable(storage, &logs, first, "t1's half group");
    let (storage, _) = wait_durable(storage, &logs, second, "t2's half group");
    drop(release);
    let (storage, _) = wait_durable(storage, &logs, held, "t0's held batch");
    drop(logs);
    let crashed = crashes(&sim, 4);
    drop(storage);
    assert_logs_after_power_cuts(
        crashed,
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            (
                "t1",
                vec![payload(1, 0, "first"), entry_of(1, "half", half)],
            ),
            (
                "t2",
                vec![payload(2, 0, "first"), entry_of(2, "half", half)],
            ),
        ],
    );
}

/// Held (kept as a regression test): a log deleted while its batch waits in a group: the
/// deletion waits for the group, which another log's batch fills; both appends are durable,
/// and after a power cut the deleted log's WAL record is replayed into nothing (the log stays
/// deleted) and the other log holds its entry.
#[test]
fn review_a_log_deleted_while_its_batch_waits_in_a_group() {
    let sim = SimIo::new();
    let (io, storage) = open_gated(&sim, 3, Duration::from_secs(3600));
    let half = 300 * 1024;
    let halves = (entry_of(1, "half", half), entry_of(2, "half", half));
    assert_a_log_deleted_while_its_batch_waits(&sim, &io, storage, halves, 4, LIMIT);
}

/// The group wait's bound (and its idle limit's) is an hour: an hour is accepted, a nanosecond
/// more refused.
#[test]
fn a_group_wait_of_an_hour_is_accepted_and_one_nanosecond_more_refused() {
    let with_wait: fn(Duration) -> StorageConfig = |group_wait| StorageConfig {
        entry_wal_group_wait: group_wait,
        ..config()
    };
    let with_idle: fn(Duration) -> StorageConfig = |group_idle| StorageConfig {
        entry_wal_group_idle: group_idle,
        ..config()
    };
    let hour = Duration::from_secs(3600);
    for with in [with_wait, with_idle] {
        assert_eq!(with(hour).validate(), Ok(()));
        assert!(with(hour + Duration::from_nanos(1)).validate().is_err());
    }
}
