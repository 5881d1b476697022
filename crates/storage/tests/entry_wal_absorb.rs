//! A WAL group's waiting leader absorbs the logs that need a flush meanwhile
//! (`Shared::schedule_flush` → `GroupCommit::absorb`) and writes their batches into their
//! segments itself when it wakes up: what goes wrong in such a write stays with its own log,
//! and nothing absorbed is stranded by a close, a deletion or the engine's shutdown.
//! (From a hostile review of the change; the timing-only findings are in ARCHITECTURE.md.)
//!
//! Every wait that could hang is bounded. On a timeout or failure the engine is leaked (never
//! closed: its close could wait for a stuck flush), then the test panics.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_storage::{
    FlushPolicy, Log, PendingAppend, PoisonListener, Position, SimIo, StorageConfig, StorageError,
};
use support::engine::Engine;
use support::entry_wal::*;
use support::gated_io::GatedIo;

const LIMIT: Duration = Duration::from_secs(30);
const HOUR: Duration = Duration::from_secs(3600);
/// Fills a group alone (512 KiB).
const FULL: usize = 600 * 1024;

fn with(flush_threads: usize, group_wait: Duration, group_idle: Duration) -> StorageConfig {
    StorageConfig {
        flush_threads,
        entry_wal_group_wait: group_wait,
        entry_wal_group_idle: group_idle,
        entry_max_bytes: 700 * 1024,
        ..config()
    }
}

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        if start.elapsed() > LIMIT {
            panic!("{what}: not within {LIMIT:?}");
        }
        std::thread::yield_now();
    }
}

fn result_within(
    limit: Duration,
    append: PendingAppend,
) -> Option<meridian_storage::Result<Position>> {
    within(limit, move || append.wait())
}

fn leak_and_fail(logs: &[Arc<Log>], message: &str) -> ! {
    std::mem::forget(logs.to_vec());
    panic!("{message}");
}

/// `count` logs with a segment each; `t0`'s next fsync held (one flush thread stuck there);
/// `t1`'s next batch handed over to a group whose leader is now gathering.
struct Gathering {
    io: Arc<GatedIo>,
    engine: Engine,
    logs: Vec<Arc<Log>>,
    held: PendingAppend,
    release_t0: Sender<()>,
    t1: PendingAppend,
}

fn gathering(sim: &SimIo, config: StorageConfig, count: usize) -> Gathering {
    let (io, storage) = open_gated_with(sim, config);
    let engine = Engine::new(storage);
    let logs = logs_with_segments(&engine, count);
    let (held, release_t0) = hold_t0_fsync(&io, &logs);
    let t1 = logs[1].append(payload(1, 1, "grouped"), 0).expect("append");
    wait_until("the leader gathers", || engine.entry_wal_leader_gathering());
    Gathering {
        io,
        engine,
        logs,
        held,
        release_t0,
        t1,
    }
}

/// Lets `t0`'s held fsync go; its append is durable.
fn release_t0(release: Sender<()>, held: PendingAppend) {
    drop(release);
    result_within(LIMIT, held)
        .expect("t0 in time")
        .expect("t0 durable");
}

/// Engines after power cuts of the running one (see `crashes`), which is then dropped.
fn power_cuts(sim: &SimIo, engine: Engine, logs: Vec<Arc<Log>>) -> Vec<(String, SimIo)> {
    let storage = engine.into_storage();
    let crashed = crashes(sim, 3);
    drop(logs);
    drop(storage);
    crashed
}

/// An absorbed log whose segment write fails (I/O error, in the leader): that append fails,
/// the log is poisoned; the group's other batches (handed over and absorbed) are durable, a
/// later group gets its leader, and after power cuts the logs hold exactly what was
/// acknowledged.
#[test]
fn a_failed_absorbed_write_fails_its_append_and_the_group_completes() {
    a_failed_absorbed_write(2, None);
}

/// The same with a poison listener that panics (on the leader, which finds the failure): the
/// panic is caught where the listener is called, so it neither unwinds through the group nor
/// leaves later groups without a leader. (Three flush threads: one held in `t0`'s fsync, the
/// leader, and one free.)
#[test]
fn a_poison_listener_that_panics_in_the_leader_strands_no_group() {
    a_failed_absorbed_write(
        3,
        Some(Box::new(|_| panic!("poison listener panics (test)"))),
    );
}

fn a_failed_absorbed_write(flush_threads: usize, listener: Option<PoisonListener>) {
    let sim = SimIo::new();
    let g = gathering(&sim, with(flush_threads, HOUR, HOUR), 4);
    if let Some(listener) = listener {
        g.logs[2].on_poisoned(listener);
    }
    let (reached, release_write) = g.io.arm_containing("write", "/logs/t2/");
    let t2 = g.logs[2].append(payload(2, 1, "fails"), 0).expect("append");
    assert!(
        g.engine.entry_wal_leader_gathering(),
        "t2 absorbed, leader still waits"
    );
    let t3 = g.logs[3]
        .append(entry_of(3, "fills", FULL), 0)
        .expect("append");
    if reached.recv_timeout(LIMIT).is_err() {
        leak_and_fail(&g.logs, "the leader never wrote t2's absorbed batch");
    }
    sim.fail_writes(1);
    drop(release_write);
    let logs = g.logs.clone();
    let Some((r1, r2, r3)) = within(LIMIT, move || (g.t1.wait(), t2.wait(), t3.wait())) else {
        leak_and_fail(
            &logs,
            "the group with a failed absorbed write did not complete",
        );
    };
    r1.expect("t1 durable");
    r3.expect("t3 durable");
    assert!(
        r2.is_err(),
        "t2's failed write must fail its append, got {r2:?}"
    );
    assert!(
        g.logs[2].append(payload(2, 2, "after"), 0).is_err(),
        "t2 poisoned"
    );
    let later = g.logs[3]
        .append(entry_of(3, "later", FULL), 0)
        .expect("append");
    result_within(LIMIT, later)
        .expect("a later group in time")
        .expect("a later group durable");
    release_t0(g.release_t0, g.held);
    let crashed = power_cuts(&sim, g.engine, logs);
    assert_logs_after_power_cuts(
        crashed,
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            ("t1", vec![payload(1, 0, "first"), payload(1, 1, "grouped")]),
            ("t2", vec![payload(2, 0, "first")]),
            (
                "t3",
                vec![
                    payload(3, 0, "first"),
                    entry_of(3, "fills", FULL),
                    entry_of(3, "later", FULL),
                ],
            ),
        ],
    );
}

/// An absorbed log whose segment write finds the disk full (in the leader): that append fails
/// with `DiskFull` and is rolled back, the group's other batches are durable, and the log
/// takes appends again.
#[test]
fn an_absorbed_write_on_a_full_disk_is_rolled_back_and_the_group_completes() {
    let sim = SimIo::new();
    let g = gathering(&sim, with(2, HOUR, HOUR), 4);
    let (reached, release_write) = g.io.arm_containing("write", "/logs/t2/");
    let t2 = g.logs[2]
        .append(payload(2, 1, "refused"), 0)
        .expect("append");
    let t3 = g.logs[3]
        .append(entry_of(3, "fills", FULL), 0)
        .expect("append");
    if reached.recv_timeout(LIMIT).is_err() {
        leak_and_fail(&g.logs, "the leader never wrote t2's absorbed batch");
    }
    sim.set_capacity(Some(sim.used_bytes()));
    let (failed, release_failed) = g.io.arm_containing("write_failed", "/logs/t2/");
    drop(release_write);
    if failed.recv_timeout(LIMIT).is_err() {
        leak_and_fail(&g.logs, "t2's write did not fail");
    }
    sim.set_capacity(None);
    drop(release_failed);
    let logs = g.logs.clone();
    let Some((r1, r2, r3)) = within(LIMIT, move || (g.t1.wait(), t2.wait(), t3.wait())) else {
        leak_and_fail(
            &logs,
            "the group with a refused absorbed write did not complete",
        );
    };
    r1.expect("t1 durable");
    r3.expect("t3 durable");
    assert!(
        matches!(r2, Err(StorageError::DiskFull { .. })),
        "t2 refused with DiskFull, got {r2:?}"
    );
    release_t0(g.release_t0, g.held);
    // A full batch: a lone small one would wait for a group (the hour) after a group of
    // several logs went through the WAL.
    let again = g.logs[2]
        .append(entry_of(2, "again", FULL), 0)
        .expect("append");
    result_within(LIMIT, again)
        .expect("t2's next append in time")
        .expect("t2's next append durable");
    let crashed = power_cuts(&sim, g.engine, logs);
    assert_logs_after_power_cuts(
        crashed,
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            ("t1", vec![payload(1, 0, "first"), payload(1, 1, "grouped")]),
            (
                "t2",
                vec![payload(2, 0, "first"), entry_of(2, "again", FULL)],
            ),
            (
                "t3",
                vec![payload(3, 0, "first"), entry_of(3, "fills", FULL)],
            ),
        ],
    );
}

/// A log closed (and one deleted) while it sits in `absorbed`: the close waits for the
/// leader, which writes the batch; the close and the deletion finish once a full batch ends
/// the group; after power cuts the closed log holds its entry, the deleted one is gone.
#[test]
fn absorbed_logs_can_be_closed_and_deleted() {
    let sim = SimIo::new();
    let g = gathering(&sim, with(2, HOUR, HOUR), 5);
    let t2 = g.logs[2]
        .append(payload(2, 1, "closed"), 0)
        .expect("append");
    let t3 = g.logs[3]
        .append(payload(3, 1, "deleted"), 0)
        .expect("append");
    assert!(g.engine.entry_wal_leader_gathering(), "t2 and t3 absorbed");
    let closing = {
        let storage = g.engine.get();
        std::thread::spawn(move || storage.close_log("t2"))
    };
    let deleting = {
        let storage = g.engine.get();
        std::thread::spawn(move || storage.delete_log("t3"))
    };
    wait_until("close and delete wait", || {
        g.engine.name_lock_users("t2") > 0 && g.engine.name_lock_users("t3") > 0
    });
    let t4 = g.logs[4]
        .append(entry_of(4, "fills", FULL), 0)
        .expect("append");
    let logs = g.logs.clone();
    let t1 = g.t1;
    let Some(results) = within(LIMIT, move || {
        (
            t1.wait(),
            t2.wait(),
            t3.wait(),
            t4.wait(),
            closing.join().expect("close thread"),
            deleting.join().expect("delete thread"),
        )
    }) else {
        leak_and_fail(&logs, "close/delete of absorbed logs did not finish");
    };
    results.0.expect("t1");
    results.1.expect("t2");
    results.2.expect("t3");
    results.3.expect("t4");
    results.4.expect("close t2");
    results.5.expect("delete t3");
    release_t0(g.release_t0, g.held);
    let crashed = power_cuts(&sim, g.engine, logs);
    assert_logs_after_power_cuts(
        crashed,
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            ("t1", vec![payload(1, 0, "first"), payload(1, 1, "grouped")]),
            ("t2", vec![payload(2, 0, "first"), payload(2, 1, "closed")]),
            (
                "t4",
                vec![payload(4, 0, "first"), entry_of(4, "fills", FULL)],
            ),
        ],
    );
}

/// The engine closed while a log sits in `absorbed` (group ended by its idle limit).
#[test]
fn the_engine_closes_with_a_log_absorbed() {
    let sim = SimIo::new();
    let g = gathering(&sim, with(2, HOUR, Duration::from_millis(300)), 3);
    let t2 = g.logs[2]
        .append(payload(2, 1, "absorbed"), 0)
        .expect("append");
    assert!(g.engine.entry_wal_leader_gathering(), "t2 absorbed");
    drop(g.release_t0);
    let storage = g.engine.into_storage();
    let logs = g.logs;
    let held = g.held;
    let t1 = g.t1;
    let Some((closed, r0, r1, r2)) = within(LIMIT, move || {
        let closed = storage.close();
        (closed, held.wait(), t1.wait(), t2.wait())
    }) else {
        leak_and_fail(&logs, "engine close with an absorbed log hung");
    };
    closed.expect("close");
    r0.expect("t0");
    r1.expect("t1");
    r2.expect("t2");
    drop(logs);
    let crashed = crashes(&sim, 2);
    assert_logs_after_power_cuts(
        crashed,
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            ("t1", vec![payload(1, 0, "first"), payload(1, 1, "grouped")]),
            (
                "t2",
                vec![payload(2, 0, "first"), payload(2, 1, "absorbed")],
            ),
        ],
    );
}

/// Many producers on many logs with the default group limits and several flush threads (so
/// the leader absorbs constantly): every append completes, in order per log, and after power
/// cuts taken at random moments every acknowledged entry is there. Also with relaxed
/// durability and with the entry WAL off (no absorbing at all).
#[test]
fn many_logs_absorbed_lose_and_strand_nothing() {
    for (name, config) in [
        (
            "wal",
            StorageConfig {
                flush_threads: 4,
                ..config()
            },
        ),
        (
            "wal, long idle",
            StorageConfig {
                flush_threads: 3,
                entry_wal_group_wait: Duration::from_millis(20),
                entry_wal_group_idle: Duration::from_millis(20),
                ..config()
            },
        ),
        (
            "no wal",
            StorageConfig {
                flush_threads: 4,
                entry_wal: false,
                ..config()
            },
        ),
        (
            "relaxed",
            StorageConfig {
                flush_threads: 4,
                flush_policy: FlushPolicy::RelaxedWriteOnly {
                    fsync_interval: Duration::from_millis(5),
                },
                ..config()
            },
        ),
    ] {
        let sim = SimIo::new();
        let storage = Arc::new(open_with(&sim, config).expect("open"));
        let logs: Vec<Arc<Log>> = (0..16)
            .map(|n| storage.open_log(&format!("t{n}")).expect("log"))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Vec<Arc<AtomicU64>> = (0..16).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let mut producers = Vec::new();
        for (n, log) in logs.iter().enumerate() {
            let log = log.clone();
            let stop = stop.clone();
            let acked = acked[n].clone();
            producers.push(std::thread::spawn(move || {
                let mut index = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let burst = 1 + (index % 4);
                    let appends: Vec<_> = (0..burst)
                        .map(|k| log.append(payload(n, index + k, "p"), 0).expect("append"))
                        .collect();
                    for append in appends {
                        append.wait().expect("durable");
                    }
                    index += burst;
                    acked.store(index, Ordering::SeqCst);
                }
                index
            }));
        }
        // Load for a while: until each log has 50 acknowledged entries.
        wait_until(name, || {
            acked.iter().all(|a| a.load(Ordering::SeqCst) >= 50)
        });
        // A power cut now: everything acknowledged so far must be there (relaxed excepted).
        let snapshot: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let cut = sim.crash(meridian_storage::CrashMode::TornPrefix, 7);
        stop.store(true, Ordering::SeqCst);
        let joined = within(LIMIT, move || {
            producers
                .into_iter()
                .map(|p| p.join().expect("producer"))
                .collect::<Vec<u64>>()
        });
        let Some(_) = joined else {
            leak_and_fail(
                &logs,
                &format!("{name}: a producer's append never completed"),
            );
        };
        drop(logs);
        let Ok(storage) = Arc::try_unwrap(storage) else {
            panic!("shared")
        };
        storage.close().expect("close");
        if name == "relaxed" {
            continue;
        }
        let reopened = open(&cut);
        for (n, count) in snapshot.iter().enumerate() {
            let entries = all(&reopened.open_log(&format!("t{n}")).expect("log"));
            assert!(
                entries.len() as u64 >= *count,
                "{name}: t{n} lost acknowledged entries: {} < {count}",
                entries.len()
            );
            for (i, entry) in entries.iter().take(*count as usize).enumerate() {
                assert_eq!(entry, &payload(n, i as u64, "p"), "{name}: t{n}[{i}]");
            }
        }
    }
}
