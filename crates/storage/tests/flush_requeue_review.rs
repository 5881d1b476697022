//! Review of issue 16's flush-thread change: a flush thread that finishes a log's batch while
//! the log has more pending appends queues the log again *without waking another thread*,
//! because it pops the queue itself right after. These tests try to lose that flush: with one
//! flush thread and many, with one log and many, while logs are closed or deleted and the
//! engine stops, and after failed flushes (a full disk, a failed fsync). Each waits for the
//! outcome of appends with a generous timeout that only a real stall exceeds.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{Log, PendingAppend, Position, SimIo, Storage, StorageConfig, StorageError};
use support::engine::Engine;
use support::entry_wal::within;
use support::gated_io::GatedIo;

/// Long enough that only a stall (a log nobody will flush) exceeds it.
const STALL: Duration = Duration::from_secs(60);

fn config(flush_threads: usize) -> StorageConfig {
    StorageConfig {
        segment_max_bytes: 64 * 1024,
        entry_max_bytes: 4096,
        flush_threads,
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn entry(log: u64, sequence: u64) -> Bytes {
    let mut bytes = format!("{log}:{sequence}:").into_bytes();
    bytes.resize(32 + (sequence % 200) as usize, b'.');
    Bytes::from(bytes)
}

/// The outcome of `pending`, delivered once it completes (waited for on a thread of its own,
/// so that a test can bound the wait).
fn outcome(pending: PendingAppend) -> Receiver<meridian_storage::Result<Position>> {
    let (sender, receiver) = channel();
    std::thread::spawn(move || {
        let _ = sender.send(pending.wait());
    });
    receiver
}

/// Waits for an append's outcome; fails the test if it never comes (a lost flush).
fn settled(
    receiver: &Receiver<meridian_storage::Result<Position>>,
    what: &str,
) -> meridian_storage::Result<Position> {
    receiver
        .recv_timeout(STALL)
        .unwrap_or_else(|_| panic!("{what}: the append never completed (its flush was lost)"))
}

fn gated(flush_threads: usize) -> (SimIo, Arc<GatedIo>, Engine) {
    gated_with(config(flush_threads))
}

fn gated_with(config: StorageConfig) -> (SimIo, Arc<GatedIo>, Engine) {
    let sim = SimIo::new();
    let io = GatedIo::new(sim.clone());
    let storage = Storage::open_with_io("/data", config, io.clone()).expect("open storage");
    (sim, io, Engine::new(storage))
}

/// Appends `count` entries to `log` at once (one batch if no flush runs meanwhile) and returns
/// their outcomes.
fn append_many(
    log: &Arc<Log>,
    tag: u64,
    sequences: std::ops::Range<u64>,
) -> Vec<Receiver<meridian_storage::Result<Position>>> {
    sequences
        .map(|sequence| outcome(log.append(entry(tag, sequence), 0).expect("append")))
        .collect()
}

/// The core of the change: a flush thread finishes a batch while the log has another one
/// pending (appended during the fsync), queues the log quietly, and must flush it itself —
/// no other append, log or timer comes to wake anyone. With one flush thread and with several
/// (the others asleep).
#[test]
fn a_batch_appended_during_the_fsync_of_the_previous_one_is_flushed_with_any_thread_count() {
    for flush_threads in [1, 2, 4] {
        let (_sim, io, storage) = gated(flush_threads);
        let log = storage.open_log("busy").expect("log");
        let (reached, release) = io.arm_containing("sync", "/logs/busy/");
        let first = append_many(&log, 0, 0..3);
        reached
            .recv_timeout(STALL)
            .expect("the first batch reaches its fsync");
        // Appended while the first batch's fsync runs: a second batch, which nobody schedules
        // (the log's flush is in flight).
        let second = append_many(&log, 0, 3..10);
        drop(release);
        for (index, receiver) in first.iter().chain(&second).enumerate() {
            let position = settled(receiver, &format!("{flush_threads} threads, entry {index}"))
                .expect("durable");
            assert_eq!(position.entry_id, index as u64);
        }
        storage.close().expect("close");
    }
}

/// Fairness with the quiet requeue: a busy log that has more to flush goes behind the log that
/// was waiting, with a single flush thread. The busy log's second fsync is held: if the thread
/// took the busy log again before the quiet one, the quiet log's append would wait for it.
#[test]
fn a_busy_log_requeued_quietly_still_lets_the_waiting_log_flush_first() {
    // Each log with its own fsync, as without the entry WAL: with it, the thread takes both
    // logs at once and one WAL fsync makes both batches durable (`tests/entry_wal.rs`).
    let (_sim, io, storage) = gated_with(StorageConfig {
        entry_wal: false,
        ..config(1)
    });
    let busy = storage.open_log("busy").expect("busy log");
    let quiet = storage.open_log("quiet").expect("quiet log");
    // The segment files exist: from now on each batch is one write and one fsync.
    for (tag, log) in [&busy, &quiet].into_iter().enumerate() {
        for receiver in append_many(log, tag as u64, 0..1) {
            settled(&receiver, "warm-up").expect("durable");
        }
    }
    // One entry: the flush thread takes it as a batch of its own at once.
    let (reached, release) = io.arm_containing("sync", "/logs/busy/");
    let first = append_many(&busy, 0, 1..2);
    reached
        .recv_timeout(STALL)
        .expect("the busy log's first batch reaches its fsync");
    let second = append_many(&busy, 0, 2..6);
    let waiting = append_many(&quiet, 1, 1..2);
    // Hold the busy log's next fsync too: the quiet log must not need it.
    let (second_reached, second_release) = io.arm_containing("sync", "/logs/busy/");
    drop(release);
    for receiver in &first {
        settled(receiver, "busy log, first batch").expect("durable");
    }
    settled(&waiting[0], "quiet log waiting behind the busy one").expect("durable");
    // Only now may the busy log's second batch get its turn.
    second_reached
        .recv_timeout(STALL)
        .expect("the busy log's second batch reaches its fsync");
    drop(second_release);
    for receiver in &second {
        settled(receiver, "busy log, second batch").expect("durable");
    }
    storage.close().expect("close");
}

/// Disk full: the failed batch is rolled back and the log accepts appends again at once. The
/// flush thread still holds the log's flush role while it removes the recycled segment files
/// (`release_free_files`, after it dropped the log's lock): an append made then finds the
/// flush "scheduled", so it schedules nothing; the thread must not drop the role with that
/// append left pending. (Pre-existing: not introduced by issue 16's change, but one of the
/// promises it was to keep.)
#[test]
fn an_append_made_while_a_full_disk_rollback_finishes_is_flushed() {
    for flush_threads in [1, 3] {
        let (sim, io, storage) = gated(flush_threads);
        let log = storage.open_log("full").expect("log");
        for receiver in append_many(&log, 0, 0..3) {
            settled(&receiver, "before the disk fills").expect("durable");
        }
        sim.set_capacity(Some(sim.used_bytes()));
        // The rollback lists the log's directory to remove its recycled files: stop there.
        let (reached, release) = io.arm_containing("list_dir", "/logs/full");
        let failed = append_many(&log, 0, 3..4);
        reached
            .recv_timeout(STALL)
            .expect("the failed flush reaches the removal of recycled files");
        sim.set_capacity(None);
        let after = append_many(&log, 0, 3..5);
        drop(release);
        let error =
            settled(&failed[0], "the append that filled the disk").expect_err("the disk was full");
        assert!(matches!(error, StorageError::DiskFull { .. }), "{error}");
        for (index, receiver) in after.iter().enumerate() {
            let position = settled(
                receiver,
                &format!("{flush_threads} threads: append {index} made during the rollback"),
            )
            .expect("durable once there is space");
            assert_eq!(position.entry_id, 3 + index as u64);
        }
        storage.close().expect("close");
    }
}

/// A failed fsync poisons the busy log and fails its pending batch (no requeue), while the log
/// waiting behind it is still flushed and later appends to it succeed.
#[test]
fn a_failed_fsync_of_a_busy_log_with_more_pending_does_not_hold_up_the_others() {
    for flush_threads in [1, 2] {
        let (sim, io, storage) = gated(flush_threads);
        let busy = storage.open_log("busy").expect("busy log");
        let other = storage.open_log("other").expect("other log");
        let (reached, release) = io.arm_containing("sync", "/logs/busy/");
        let first = append_many(&busy, 0, 0..3);
        reached
            .recv_timeout(STALL)
            .expect("the busy log's first batch reaches its fsync");
        let second = append_many(&busy, 0, 3..6);
        sim.fail_syncs(1);
        drop(release);
        for receiver in first.iter().chain(&second) {
            settled(receiver, "busy log after the failed fsync").expect_err("the fsync failed");
        }
        for receiver in append_many(&other, 1, 0..5) {
            settled(&receiver, "other log after the failure").expect("durable");
        }
        assert!(
            busy.append(entry(0, 9), 0).is_err(),
            "a poisoned log refuses appends"
        );
        drop(storage);
    }
}

/// Closing one busy log, deleting another and stopping the engine while writers keep appending
/// to every log: each append either is refused at once or completes (durable or failed);
/// none is left waiting for a flush that no thread will do — in particular none behind a stop
/// marker a flush thread popped right after it requeued a log quietly.
#[test]
fn closing_deleting_and_stopping_under_load_leaves_no_append_waiting() {
    for flush_threads in [1, 2, 3] {
        let sim = SimIo::new();
        let storage = Engine::new(
            Storage::open_with_io("/data", config(flush_threads), Arc::new(sim.clone()))
                .expect("open storage"),
        );
        let logs: Vec<Arc<Log>> = ["a", "b", "c", "d"]
            .iter()
            .map(|name| storage.open_log(name).expect("log"))
            .collect();
        let (outcomes_tx, outcomes_rx) = channel();
        let (warm_tx, warm_rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = logs
            .iter()
            .enumerate()
            .map(|(tag, log)| {
                let log = log.clone();
                let outcomes = outcomes_tx.clone();
                let warm = warm_tx.clone();
                let stop = stop.clone();
                // Waits for this writer's appends in order, off the writer, so that the
                // writer appends as fast as it can (batches form during flushes).
                let (pending_tx, pending_rx) = channel::<PendingAppend>();
                std::thread::spawn(move || {
                    for (index, pending) in pending_rx.into_iter().enumerate() {
                        let result = pending.wait();
                        if index == 200 {
                            let _ = warm.send(());
                        }
                        let _ = outcomes.send(result);
                    }
                });
                std::thread::spawn(move || {
                    let mut accepted = 0u64;
                    for sequence in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match log.append(entry(tag as u64, sequence), 0) {
                            Ok(pending) => {
                                accepted += 1;
                                let _ = pending_tx.send(pending);
                            }
                            // Refused at once: too much pending (retried), or closed/deleted.
                            Err(StorageError::TooManyPendingBytes { .. }) => {
                                std::thread::yield_now()
                            }
                            Err(_) => break,
                        }
                    }
                    accepted
                })
            })
            .collect();
        drop(outcomes_tx);
        drop(warm_tx);
        // Every log has made appends durable and keeps appending: the operations below meet
        // logs with a flush in flight and more pending.
        for _ in &logs {
            warm_rx
                .recv_timeout(STALL)
                .expect("every log makes its first 200 entries durable");
        }
        let engine = storage.get();
        within(STALL, move || engine.close_log("a"))
            .expect("closing a busy log finishes (it waits for no lost flush)")
            .expect("close a busy log");
        let engine = storage.get();
        within(STALL, move || engine.delete_log("b"))
            .expect("deleting a busy log finishes (it waits for no lost flush)")
            .expect("delete a busy log");
        storage.close().expect("close");
        stop.store(true, Ordering::Relaxed);
        let accepted: u64 = writers
            .into_iter()
            .map(|writer| writer.join().expect("writer"))
            .sum();
        let mut durable = 0u64;
        for index in 0..accepted {
            let result = outcomes_rx.recv_timeout(STALL).unwrap_or_else(|_| {
                panic!("{flush_threads} threads: append {index} of {accepted} never completed")
            });
            durable += u64::from(result.is_ok());
        }
        assert!(durable >= 4 * 200, "{durable} durable");
        let stats: Vec<_> = logs.iter().map(|log| log.stats()).collect();
        // Batches of several entries formed: appends came in while flushes ran, so flushes
        // ended with more pending and requeued their log quietly.
        assert!(
            stats
                .iter()
                .any(|stats| stats.flushes < stats.entries_appended),
            "{stats:?}"
        );
    }
}
