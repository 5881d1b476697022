//! Crash at every step: a workload that appends across segment rolls, persists a cursor, trims,
//! and creates and deletes a log runs on the crash-simulating file system once per crash point,
//! and each time the machine loses power just before that step (every creation, write, fsync,
//! truncation, removal, rename and directory fsync is a step). Unsynced directory changes and
//! file bytes survive or not as `SimIo` decides. After each crash the data directory must open,
//! every log in it must open, nothing acknowledged may be missing, no log may have a gap, a
//! deleted log must not come back (in part or whole), and logs can be deleted and created again.
//! The same holds after a second power cut before any step of the recovery from the first.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{
    CrashMode, FlushPolicy, InitialPosition, Log, Position, SimIo, Storage, StorageConfig,
};

const MODES: [CrashMode; 3] = [
    CrashMode::LoseUnsynced,
    CrashMode::TornPrefix,
    CrashMode::TornWithGarbage,
];

fn config(flush_policy: FlushPolicy) -> StorageConfig {
    StorageConfig {
        flush_policy,
        // About eight entries per segment, so the workload rolls segments several times.
        segment_max_bytes: 1024,
        entry_max_bytes: 256,
        flush_threads: 1,
        // The workload persists and trims itself, so every step happens in a known order.
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn relaxed() -> FlushPolicy {
    FlushPolicy::RelaxedWriteOnly {
        fsync_interval: Duration::from_secs(3600),
    }
}

fn open(io: &SimIo, flush_policy: FlushPolicy) -> meridian_storage::Result<Storage> {
    Storage::open_with_io(
        Path::new("/data"),
        config(flush_policy),
        Arc::new(io.clone()),
    )
}

fn payload(log: &str, index: u64) -> Bytes {
    let mut bytes = format!("{log}:{index}:").into_bytes();
    bytes.resize(100, b'.');
    Bytes::from(bytes)
}

fn index_of(log: &str, data: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(data);
    let rest = text
        .strip_prefix(&format!("{log}:"))
        .unwrap_or_else(|| panic!("entry of another log in {log}: {text}"));
    rest.split(':')
        .next()
        .and_then(|index| index.parse().ok())
        .unwrap_or_else(|| panic!("malformed entry in {log}: {text}"))
}

/// What the workload was told, with the step count at which it was told.
#[derive(Default)]
struct History {
    /// (steps done when the append was acknowledged, log, index, position)
    acknowledged: Vec<(u64, &'static str, u64, Position)>,
    /// (steps done when the engine's persistence pass returned, mark-delete position of
    /// cursor `sub` of log `a` it persisted)
    cursor: Vec<(u64, Position)>,
    /// Steps done when `delete_log` returned, per log.
    deleted: HashMap<&'static str, u64>,
}

impl History {
    fn append(
        &mut self,
        io: &SimIo,
        log: &Arc<Log>,
        name: &'static str,
        indexes: std::ops::Range<u64>,
    ) {
        for index in indexes {
            let position = log
                .append(payload(name, index), index)
                .expect("append")
                .wait()
                .expect("durable");
            self.acknowledged
                .push((io.operation_count(), name, index, position));
        }
    }

    /// Appends `indexes` to each of `logs` in turn while the flush thread is held, so that it
    /// finds them all waiting and flushes them together (through the entry WAL under `Fsync`).
    fn append_together(
        &mut self,
        io: &SimIo,
        storage: &Storage,
        logs: &[(&Arc<Log>, &'static str)],
        indexes: std::ops::Range<u64>,
    ) {
        storage.pause_flushes();
        let mut appends = Vec::new();
        for index in indexes {
            for (log, name) in logs {
                let append = log.append(payload(name, index), index).expect("append");
                appends.push((*name, index, append));
            }
        }
        storage.resume_flushes();
        for (name, index, append) in appends {
            let position = append.wait().expect("durable");
            self.acknowledged
                .push((io.operation_count(), name, index, position));
        }
    }
}

fn workload(io: &SimIo, flush_policy: FlushPolicy) -> History {
    let mut history = History::default();
    let storage = open(io, flush_policy).expect("open");
    let a = storage.open_log("a").expect("log a");
    history.append(io, &a, "a", 0..20);
    a.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    let consumed = history.acknowledged[11].3;
    a.acknowledge_cumulative("sub", consumed).expect("ack");
    // The engine's pass: through the cursor WAL.
    storage.persist_cursors();
    history.cursor.push((io.operation_count(), consumed));
    // Closed and opened again while the WAL still holds the bytes of its earlier life.
    drop(a);
    storage.close_log("a").expect("close a");
    let a = storage.open_log("a").expect("log a again");
    a.trim().expect("trim");
    // Two logs flushed together, across segment rolls, before and after an entry WAL
    // checkpoint.
    let c = storage.open_log("c").expect("log c");
    history.append_together(io, &storage, &[(&a, "a"), (&c, "c")], 20..24);
    storage.checkpoint_entries().expect("entry checkpoint");
    history.append_together(io, &storage, &[(&a, "a"), (&c, "c")], 24..28);
    drop(c);
    let b = storage.open_log("b").expect("log b");
    history.append(io, &b, "b", 0..20);
    // Deleted while the WAL holds bytes of its journal.
    b.open_cursor("sub", InitialPosition::Earliest)
        .expect("cursor");
    b.acknowledge_cumulative("sub", history.acknowledged[25].3)
        .expect("ack");
    storage.persist_cursors();
    drop(b);
    storage.delete_log("b").expect("delete b");
    history.deleted.insert("b", io.operation_count());
    let consumed = history.acknowledged[15].3;
    a.acknowledge_cumulative("sub", consumed).expect("ack");
    storage.persist_cursors();
    history.cursor.push((io.operation_count(), consumed));
    // The WAL's bytes go into the journal, a new WAL file starts, the old one is removed.
    storage.checkpoint_cursors().expect("checkpoint");
    history.append(io, &a, "a", 28..30);
    storage.close().expect("close");
    history
}

/// Checks the data directory a power cut before step `crash_point` left behind.
fn verify(crashed: &SimIo, history: &History, crash_point: u64, flush_policy: FlushPolicy) {
    let durable = matches!(flush_policy, FlushPolicy::Fsync);
    let storage = open(crashed, flush_policy).expect("the data directory opens");
    let names = storage.log_names().expect("log names");
    for name in &names {
        assert!(
            name == "a" || name == "b" || name == "c",
            "unknown log {name:?}"
        );
    }
    if history
        .deleted
        .get("b")
        .is_some_and(|done| *done <= crash_point)
    {
        assert!(!names.contains(&"b".to_string()), "deleted log b came back");
    }
    if durable {
        for (done, name, index, _) in &history.acknowledged {
            let deleted = history.deleted.contains_key(name);
            assert!(
                *done > crash_point || deleted || names.iter().any(|listed| listed == name),
                "log {name} with acknowledged entry {index} is gone"
            );
        }
    }
    for name in &names {
        let log = storage
            .open_log(name)
            .unwrap_or_else(|error| panic!("log {name} refuses to open: {error}"));
        let entries = match log.first_position() {
            Some(first) => log.read_from(first, usize::MAX, usize::MAX).expect("read"),
            None => Vec::new(),
        };
        let mut found = HashMap::new();
        let mut previous: Option<u64> = None;
        for entry in &entries {
            let index = index_of(name, &entry.data);
            assert_eq!(
                entry.data,
                payload(name, index),
                "entry {name}:{index} byte-exact"
            );
            if let Some(previous) = previous {
                assert_eq!(
                    previous + 1,
                    index,
                    "log {name} has a gap after entry {previous}"
                );
            }
            previous = Some(index);
            found.insert(index, entry.position);
        }
        let consumed = log.mark_delete_position("sub").flatten();
        if name == "a" {
            // The cursor is where the last completed pass persisted it, or where a later
            // acknowledgement had moved it: never before, never beyond.
            let persisted = history
                .cursor
                .iter()
                .filter(|(done, _)| *done <= crash_point)
                .map(|(_, position)| *position)
                .max();
            let acknowledged = history.cursor.iter().map(|(_, position)| *position).max();
            assert!(
                consumed >= persisted && consumed <= acknowledged,
                "cursor at {consumed:?}; persisted {persisted:?}, acknowledged up to {acknowledged:?}"
            );
        }
        if !durable {
            continue;
        }
        // Entries the cursor consumed may have been trimmed; nothing else may be missing.
        for (done, log_name, index, position) in &history.acknowledged {
            if *log_name == name.as_str() && *done <= crash_point && Some(*position) > consumed {
                assert_eq!(
                    found.get(index),
                    Some(position),
                    "acknowledged {name}:{index} at {position} lost"
                );
            }
        }
    }
    // Deleting works, and a log created again starts above every earlier position.
    for name in &names {
        storage.delete_log(name).expect("delete after recovery");
    }
    let again = storage.open_log("a").expect("log created again");
    let position = again
        .append(payload("a", 0), 0)
        .expect("append")
        .wait()
        .expect("durable");
    let durable_before = history
        .acknowledged
        .iter()
        .filter(|(done, ..)| *done <= crash_point)
        .map(|(.., position)| *position)
        .max();
    if durable {
        assert!(
            Some(position) > durable_before,
            "position {position} reused after re-creation"
        );
    }
    storage.close().expect("close");
}

/// What a restart does: opens the data directory and every log in it, then closes it. Errors
/// are `verify`'s business.
fn recover(io: &SimIo, flush_policy: FlushPolicy) {
    let Ok(storage) = open(io, flush_policy) else {
        return;
    };
    for name in storage.log_names().unwrap_or_default() {
        let _ = storage.open_log(&name);
    }
    let _ = storage.close();
}

fn crash_at_every_step(flush_policy: FlushPolicy) {
    let steps = {
        let io = SimIo::new();
        workload(&io, flush_policy);
        io.operation_count()
    };
    for crash_point in 0..=steps {
        for mode in MODES {
            let io = SimIo::new();
            io.crash_before_operation(crash_point, mode, crash_point);
            let history = workload(&io, flush_policy);
            let crashed = io
                .take_crashed()
                .unwrap_or_else(|| io.crash(mode, crash_point));
            // `verify` changes what it opens; keep an exact copy for the second power cut.
            let before_recovery = crashed.crash(CrashMode::LoseUnsynced, 0);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                verify(&crashed, &history, crash_point, flush_policy)
            }));
            if let Err(panic) = outcome {
                eprintln!("power cut before step {crash_point} of {steps} ({mode:?})");
                std::panic::resume_unwind(panic);
            }
            // A second power cut before each step of the recovery from the first.
            let recovery_steps = {
                let probe = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                recover(&probe, flush_policy);
                probe.operation_count()
            };
            for second in 0..=recovery_steps {
                let copy = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                copy.crash_before_operation(second, mode, crash_point + second);
                recover(&copy, flush_policy);
                let twice = copy
                    .take_crashed()
                    .unwrap_or_else(|| copy.crash(mode, crash_point + second));
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    verify(&twice, &history, crash_point, flush_policy)
                }));
                if let Err(panic) = outcome {
                    eprintln!(
                        "power cut before step {crash_point} of {steps} ({mode:?}), then before \
                         step {second} of {recovery_steps} of the recovery"
                    );
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

#[test]
fn a_power_cut_at_any_step_leaves_a_data_directory_that_opens_with_every_acknowledged_entry() {
    crash_at_every_step(FlushPolicy::Fsync);
}

#[test]
fn a_power_cut_at_any_step_in_relaxed_mode_leaves_logs_that_open_without_gaps() {
    crash_at_every_step(relaxed());
}
