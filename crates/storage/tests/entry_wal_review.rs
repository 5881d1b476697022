//! Hostile review of the entry WAL (commit 24eeb79): attacks on "an acknowledged append is never
//! lost, a refused one never comes back, no log refuses to open, no hang". Six of them failed
//! on that commit and pass since `5df7280` and the deferred replay (a failed WAL write is cut
//! off the WAL; the WAL is replayed at every start, into any segment lacking its bytes; a
//! segment that cannot take them refuses only its log); where the fix changed what a test
//! can expect, the test says so.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{
    CrashMode, FlushPolicy, Log, PendingAppend, Position, SimIo, Storage, StorageConfig,
    StorageError,
};
use support::entry_wal::*;

/// ATTACK 1. DiskFull in the middle of the WAL write: the group is rolled back (segments cut
/// back and fsynced) and every append reported `DiskFull`. Nothing more is appended. A power
/// cut that keeps the unsynced WAL record (the broken WAL file is never truncated) lets the
/// replay write the refused batch at the segment's end: refused entries come back.
#[test]
fn review_a_refused_group_stays_refused_after_a_power_cut_with_no_later_append() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs = a_group_refused_midway_through_the_wal(&io, &storage);
    // Reads right after the refusal: only the kept entries.
    for (number, log) in logs.iter().enumerate() {
        assert_eq!(
            all(log),
            vec![payload(number, 0, "kept"), payload(number, 1, "kept")]
        );
    }
    drop(logs);
    let crashes = crashes(&io, 16);
    drop(storage);
    let mut resurrected = Vec::new();
    for (mode, crashed) in &crashes {
        let storage = open(crashed);
        for number in 0..3 {
            let log = storage.open_log(&format!("t{number}")).expect("log");
            let entries = all(&log);
            if entries != vec![payload(number, 0, "kept"), payload(number, 1, "kept")] {
                resurrected.push(format!("{mode} t{number}: {} entries", entries.len()));
            }
        }
    }
    assert!(
        resurrected.is_empty(),
        "appends refused with DiskFull came back after a power cut: {resurrected:?}"
    );
}

/// ATTACK 2. As attack 1, but the client retries the first refused entry (same bytes, same
/// publish time) and it is acknowledged through the log's own fsync. The replay finds the
/// segment's valid bytes equal to the refused record's prefix and writes the rest of the
/// refused batch after it.
#[test]
fn review_retrying_a_prefix_of_a_refused_batch_does_not_bring_the_rest_back() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs = a_group_refused_midway_through_the_wal(&io, &storage);
    logs[0]
        .append(payload(0, 0, "refused"), 0)
        .expect("append")
        .wait()
        .expect("durable");
    drop(logs);
    let crashes = crashes(&io, 16);
    drop(storage);
    let mut resurrected = Vec::new();
    for (mode, crashed) in &crashes {
        let storage = open(crashed);
        let log = storage.open_log("t0").expect("log");
        let entries = all(&log);
        let expected = vec![
            payload(0, 0, "kept"),
            payload(0, 1, "kept"),
            payload(0, 0, "refused"),
        ];
        if entries != expected {
            resurrected.push(format!("{mode}: {} entries", entries.len()));
        }
    }
    assert!(
        resurrected.is_empty(),
        "the refused entry 1 came back after its retried entry 0: {resurrected:?}"
    );
}

/// Two logs with one acknowledged entry each through the WAL, then a power cut.
fn acknowledged_group_then_power_cut() -> SimIo {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    let syncs = io.sync_count();
    for (_, _, append) in append_together(&storage, &logs, 1, "acked") {
        append.wait().expect("durable");
    }
    assert_eq!(
        io.sync_count() - syncs,
        1,
        "made durable by the WAL's fsync alone"
    );
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop(logs);
    drop(storage);
    crashed
}

/// ATTACK 3. `entry_wal` is a user setting (meridian's `[storage] entry_wal`), and the relaxed
/// policy is too: a restart with either changed skips `EntryWal::recover` entirely
/// (engine.rs:278), so what only the WAL made durable is lost and the WAL files are left behind.
#[test]
fn review_acknowledged_appends_survive_a_restart_with_the_entry_wal_disabled() {
    for (what, restart) in [
        (
            "entry_wal = false",
            StorageConfig {
                entry_wal: false,
                ..config()
            },
        ),
        (
            "relaxed policy",
            StorageConfig {
                flush_policy: FlushPolicy::RelaxedWriteOnly {
                    fsync_interval: Duration::from_secs(3600),
                },
                ..config()
            },
        ),
    ] {
        let crashed = acknowledged_group_then_power_cut();
        let storage = open_with(&crashed, restart).expect("open");
        for number in 0..2 {
            let log = storage.open_log(&format!("t{number}")).expect("log");
            assert_eq!(
                all(&log),
                vec![payload(number, 0, "acked")],
                "restart with {what}: log t{number} lost its acknowledged entry"
            );
        }
    }
}

fn segment_path(log: &Log, ledger_id: u64, first_entry_id: u64) -> PathBuf {
    log.directory()
        .join(format!("{ledger_id:020}-{first_entry_id:020}.segment"))
}

/// ATTACK 4. The close's segment fsync fails: the log is poisoned and the WAL pinned "until the
/// next start replays it". The log is opened again in the same run (what a poisoned log needs),
/// which starts a new ledger segment. The replay only writes into a log's NEWEST segment
/// (entry_wal.rs `redo`), so the pinned records for the old segment are ignored.
///
/// The SimIo's later fsync writes everything; Linux's does not (the pages were marked clean by
/// the failed fsync, docs/durability.md 5: "a later fsync is never trusted"). That is emulated
/// by putting back, after the power cut, the bytes the segment had durably when its fsync
/// failed.
#[test]
fn review_a_pinned_wal_restores_a_log_reopened_after_its_close_fsync_failed() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (_, _, append) in append_together(&storage, &logs, 1, "acked") {
        append.wait().expect("durable");
    }
    let old_segment = segment_path(&logs[0], logs[0].current_ledger_id(), 0);
    drop(logs);
    io.fail_syncs(1);
    assert!(storage.close_log("t0").is_err(), "the close's fsync failed");
    // What the segment holds durably now; the failed fsync's pages are clean but not written.
    let durable_at_failure = io
        .crash(CrashMode::LoseUnsynced, 0)
        .read_file(&old_segment)
        .expect("segment");
    let log = storage.open_log("t0").expect("opens again");
    assert_eq!(
        all(&log),
        vec![payload(0, 0, "acked")],
        "served after the reopen"
    );
    drop(log);
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop(storage);
    // Linux: the reopen's fsync of the old segment (recover_segment) wrote nothing.
    crashed
        .write_file(&old_segment, durable_at_failure)
        .expect("emulate the clean pages");
    let storage = open(&crashed);
    let log = storage
        .open_log("t0")
        .unwrap_or_else(|error| panic!("t0 refuses to open after the power cut: {error}"));
    assert_eq!(
        all(&log),
        vec![payload(0, 0, "acked")],
        "t0 lost an entry acknowledged through the WAL"
    );
}

/// ATTACK 4b (no emulation): a close whose segment fsync fails and a reopen whose recovery
/// fsync fails too, then a power cut. The engine must open and t0 must hold its entry.
#[test]
fn review_close_and_reopen_fsyncs_failing_then_power_cut() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (_, _, append) in append_together(&storage, &logs, 1, "acked") {
        append.wait().expect("durable");
    }
    drop(logs);
    io.fail_syncs(2);
    assert!(storage.close_log("t0").is_err());
    let _ = storage.open_log("t0");
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop(storage);
    let storage = open(&crashed);
    let log = storage.open_log("t0").expect("t0 opens");
    assert_eq!(all(&log), vec![payload(0, 0, "acked")]);
}

/// ATTACK 5. A restart on a full disk with records to replay. The contract (durability.md 6,
/// and the cursor WAL's test `a_restart_on_a_full_disk_opens_the_engine_even_if_the_wal_cannot_
/// be_replayed_into_a_journal`) is that the engine opens; `EntryWal::recover` returns the
/// redo's write error and `Storage::open` fails for every log.
#[test]
fn review_a_restart_on_a_full_disk_with_entry_wal_records_to_replay_opens_the_engine() {
    let crashed = acknowledged_group_then_power_cut();
    crashed.set_capacity(Some(crashed.used_bytes()));
    let storage = open_with(&crashed, config())
        .unwrap_or_else(|error| panic!("the engine refuses to open on a full disk: {error}"));
    // (Since the review: a log whose replay the full disk stopped refuses to open until there
    // is space, then opens with what the WAL held.)
    match storage.open_log("t0") {
        Err(StorageError::DiskFull { .. }) => {}
        other => panic!("expected DiskFull, got {other:?}"),
    }
    crashed.set_capacity(None);
    for number in 0..2 {
        let log = storage
            .open_log(&format!("t{number}"))
            .expect("opens once there is space");
        assert_eq!(all(&log), vec![payload(number, 0, "acked")]);
    }
    drop(storage);
    // The WAL files were kept for it; the next start replays them again, harmlessly.
    let storage = open_with(&crashed, config()).expect("opens again");
    let log = storage.open_log("t0").expect("t0");
    assert_eq!(all(&log), vec![payload(0, 0, "acked")]);
}

// ---------------------------------------------------------------------------------------------
// ATTACK 6: a crash loop focused on the entry WAL: groups across rolls, a solo flush, an entry
// checkpoint, a log closed and opened again while the WAL holds its records, trimming with
// recycled segment files (WAL batches written into a recycled file), a log deleted while the
// WAL holds its records and created again under the same name, a clean close. A power cut
// before every step, in every mode, then a second power cut before every step of recovery.
// (No DiskFull here: attack 1 already breaks that.)
// ---------------------------------------------------------------------------------------------

mod crash_loop {
    use super::*;
    use std::collections::HashMap;

    #[allow(dead_code)]
    const MODES: [CrashMode; 3] = [
        CrashMode::LoseUnsynced,
        CrashMode::TornPrefix,
        CrashMode::TornWithGarbage,
    ];

    pub fn config() -> StorageConfig {
        StorageConfig {
            segment_max_bytes: 1024,
            entry_max_bytes: 256,
            flush_threads: 1,
            recycled_segments_max: 2,
            cursor_persist_interval: Duration::from_secs(3600),
            trim_interval: Duration::from_secs(3600),
            ..StorageConfig::default()
        }
    }

    pub fn open(io: &SimIo) -> meridian_storage::Result<Storage> {
        Storage::open_with_io(Path::new("/data"), config(), Arc::new(io.clone()))
    }

    fn payload(tag: &str, index: u64) -> Bytes {
        let mut bytes = format!("{tag}:{index}:").into_bytes();
        bytes.resize(100, b'.');
        Bytes::from(bytes)
    }

    fn parse(data: &[u8]) -> (String, u64) {
        let text = String::from_utf8_lossy(data);
        let mut parts = text.split(':');
        let tag = parts.next().unwrap_or_default().to_string();
        let index = parts
            .next()
            .and_then(|index| index.parse().ok())
            .unwrap_or_else(|| panic!("malformed entry {text}"));
        assert_eq!(
            data,
            &payload(&tag, index)[..],
            "entry {tag}:{index} byte-exact"
        );
        (tag, index)
    }

    #[derive(Default)]
    pub struct History {
        /// (steps done when acknowledged, log name, tag, index, position)
        acknowledged: Vec<(u64, &'static str, &'static str, u64, Position)>,
        /// Steps done when delete_log("c") was called / returned.
        c_delete_started: Option<u64>,
        c_deleted: Option<u64>,
        next: HashMap<&'static str, u64>,
    }

    impl History {
        fn together(
            &mut self,
            io: &SimIo,
            storage: &Storage,
            logs: &[(&Arc<Log>, &'static str, &'static str)],
            count: u64,
        ) {
            storage.pause_flushes();
            let mut appends = Vec::new();
            for _ in 0..count {
                for (log, name, tag) in logs {
                    let next = self.next.entry(tag).or_insert(0);
                    let index = *next;
                    *next += 1;
                    let append = log.append(payload(tag, index), index).expect("append");
                    appends.push((*name, *tag, index, append));
                }
            }
            storage.resume_flushes();
            for (name, tag, index, append) in appends {
                let position = append.wait().expect("durable");
                self.acknowledged
                    .push((io.operation_count(), name, tag, index, position));
            }
        }

        fn solo(
            &mut self,
            io: &SimIo,
            log: &Arc<Log>,
            name: &'static str,
            tag: &'static str,
            count: u64,
        ) {
            for _ in 0..count {
                let next = self.next.entry(tag).or_insert(0);
                let index = *next;
                *next += 1;
                let position = log
                    .append(payload(tag, index), index)
                    .expect("append")
                    .wait()
                    .expect("durable");
                self.acknowledged
                    .push((io.operation_count(), name, tag, index, position));
            }
        }
    }

    pub fn workload(io: &SimIo) -> History {
        let mut h = History::default();
        let storage = open(io).expect("open");
        let a = storage.open_log("a").expect("a");
        let b = storage.open_log("b").expect("b");
        let c = storage.open_log("c").expect("c");
        h.together(
            io,
            &storage,
            &[(&a, "a", "a"), (&b, "b", "b"), (&c, "c", "c1")],
            5,
        );
        // Rolls inside the group.
        h.together(
            io,
            &storage,
            &[(&a, "a", "a"), (&b, "b", "b"), (&c, "c", "c1")],
            7,
        );
        h.solo(io, &a, "a", "a", 2);
        storage.checkpoint_entries().expect("checkpoint");
        h.together(io, &storage, &[(&a, "a", "a"), (&b, "b", "b")], 4);
        // b closed and opened again while the WAL holds its records.
        drop(b);
        storage.close_log("b").expect("close b");
        let b = storage.open_log("b").expect("b again");
        h.together(io, &storage, &[(&a, "a", "a"), (&b, "b", "b")], 3);
        // Trim a (no cursor: every sealed segment goes; large ones are kept as free files).
        a.trim().expect("trim");
        // a rolls into recycled files; its WAL batches land in them.
        h.together(io, &storage, &[(&a, "a", "a"), (&c, "c", "c1")], 8);
        // Single-entry groups: WAL batches into the (recycled) segment a just rolled into.
        for _ in 0..3 {
            h.together(io, &storage, &[(&a, "a", "a"), (&c, "c", "c1")], 1);
        }
        if std::env::var("REVIEW_DEBUG").is_ok() {
            for path in io.paths() {
                let len = io.read_file(&path).map(|bytes| bytes.len()).unwrap_or(0);
                eprintln!("{} {len}", path.display());
            }
        }
        // c deleted while the WAL holds its records, then created again under its name.
        drop(c);
        h.c_delete_started = Some(io.operation_count());
        storage.delete_log("c").expect("delete c");
        h.c_deleted = Some(io.operation_count());
        let c = storage.open_log("c").expect("c again");
        h.together(
            io,
            &storage,
            &[(&a, "a", "a"), (&c, "c", "c2"), (&b, "b", "b")],
            4,
        );
        a.trim().expect("trim");
        h.together(io, &storage, &[(&a, "a", "a"), (&c, "c", "c2")], 8);
        drop((a, b, c));
        storage.close().expect("close");
        h
    }

    pub fn verify(crashed: &SimIo, h: &History, crash_point: u64) {
        let storage = open(crashed).expect("the data directory opens");
        let names = storage.log_names().expect("names");
        let deleted = h.c_deleted.is_some_and(|done| done <= crash_point);
        let delete_started = h.c_delete_started.is_some_and(|start| start <= crash_point);
        for name in &names {
            assert!(
                ["a", "b", "c"].contains(&name.as_str()),
                "unknown log {name}"
            );
            let log = storage
                .open_log(name)
                .unwrap_or_else(|error| panic!("log {name} refuses to open: {error}"));
            let entries = match log.first_position() {
                Some(first) => log.read_from(first, usize::MAX, usize::MAX).expect("read"),
                None => Vec::new(),
            };
            let mut found: HashMap<(String, u64), Position> = HashMap::new();
            let mut previous: Option<(String, u64)> = None;
            for entry in &entries {
                let (tag, index) = parse(&entry.data);
                if name == "c" && deleted {
                    assert_ne!(tag, "c1", "deleted log c came back (entry {index})");
                }
                if let Some((previous_tag, previous_index)) = &previous {
                    if *previous_tag == tag {
                        assert_eq!(
                            previous_index + 1,
                            index,
                            "log {name}: gap after {tag}:{previous_index}"
                        );
                    }
                }
                previous = Some((tag.clone(), index));
                found.insert((tag, index), entry.position);
            }
            let first_a = entries
                .first()
                .map(|entry| parse(&entry.data).1)
                .unwrap_or(u64::MAX);
            for (done, log_name, tag, index, position) in &h.acknowledged {
                if *log_name != name.as_str() || *done > crash_point {
                    continue;
                }
                if *tag == "c1" && delete_started {
                    continue;
                }
                // a was trimmed: only a prefix may be gone.
                if *tag == "a" && *index < first_a {
                    continue;
                }
                assert_eq!(
                    found.get(&(tag.to_string(), *index)),
                    Some(position),
                    "acknowledged {name} {tag}:{index} at {position} lost"
                );
            }
        }
        for (done, log_name, tag, index, _) in &h.acknowledged {
            if *done <= crash_point && !(*tag == "c1" && delete_started) {
                assert!(
                    names.iter().any(|name| name == log_name),
                    "log {log_name} with acknowledged {tag}:{index} is gone"
                );
            }
        }
        storage.close().expect("close");
    }

    pub fn recover(io: &SimIo) {
        let Ok(storage) = open(io) else {
            return;
        };
        for name in storage.log_names().unwrap_or_default() {
            let _ = storage.open_log(&name);
        }
        let _ = storage.close();
    }
}

#[test]
fn review_entry_wal_crash_loop_with_recycling_reopen_delete_and_second_crash() {
    use crash_loop::*;
    let steps = {
        let io = SimIo::new();
        workload(&io);
        io.operation_count()
    };
    let second_every: u64 = std::env::var("REVIEW_SECOND_EVERY")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1);
    eprintln!("{steps} steps");
    for crash_point in 0..=steps {
        for mode in [
            CrashMode::LoseUnsynced,
            CrashMode::TornPrefix,
            CrashMode::TornWithGarbage,
        ] {
            let io = SimIo::new();
            io.crash_before_operation(crash_point, mode, crash_point);
            let history = workload(&io);
            let crashed = io
                .take_crashed()
                .unwrap_or_else(|| io.crash(mode, crash_point));
            let before_recovery = crashed.crash(CrashMode::LoseUnsynced, 0);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                verify(&crashed, &history, crash_point)
            }));
            if let Err(panic) = outcome {
                eprintln!("power cut before step {crash_point} of {steps} ({mode:?})");
                std::panic::resume_unwind(panic);
            }
            if crash_point % second_every != 0 {
                continue;
            }
            let recovery_steps = {
                let probe = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                recover(&probe);
                probe.operation_count()
            };
            for second in 0..=recovery_steps {
                let copy = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                copy.crash_before_operation(second, mode, crash_point + second);
                recover(&copy);
                let twice = copy
                    .take_crashed()
                    .unwrap_or_else(|| copy.crash(mode, crash_point + second));
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    verify(&twice, &history, crash_point)
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

// ---------------------------------------------------------------------------------------------
// ATTACK 7: concurrency. Two flush threads; appenders on four logs; a thread closing logs (the
// appenders open them again); a thread running entry checkpoints back to back; a thread
// creating, appending to and deleting log "d"; trims of l0 (recycling). A watchdog fails the
// test on a hang; a power cut at a random step; every acknowledged entry must be there.
// ---------------------------------------------------------------------------------------------

mod stress {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    pub fn config() -> StorageConfig {
        StorageConfig {
            segment_max_bytes: 2048,
            entry_max_bytes: 256,
            flush_threads: 2,
            recycled_segments_max: 2,
            cursor_persist_interval: Duration::from_secs(3600),
            trim_interval: Duration::from_secs(3600),
            ..StorageConfig::default()
        }
    }

    pub fn open(io: &SimIo) -> meridian_storage::Result<Storage> {
        Storage::open_with_io(Path::new("/data"), config(), Arc::new(io.clone()))
    }

    pub fn payload(name: &str, index: u64) -> Bytes {
        let mut bytes = format!("{name}:{index}:").into_bytes();
        bytes.resize(90, b'.');
        Bytes::from(bytes)
    }

    pub const LOGS: [&str; 4] = ["l0", "l1", "l2", "l3"];

    /// (steps done when acknowledged, log, index, position)
    pub type Acks = Vec<(u64, &'static str, u64, Position)>;

    fn log_of(storage: &Storage, name: &str) -> Arc<Log> {
        loop {
            match storage.open_log(name) {
                Ok(log) => return log,
                Err(StorageError::Closed { .. }) => panic!("engine closed"),
                Err(_) => std::thread::yield_now(),
            }
        }
    }

    pub fn workload(io: &SimIo, seed: u64, rounds: u64) -> Acks {
        let storage = Arc::new(open(io).expect("open"));
        let acks = Arc::new(Mutex::new(Acks::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        #[allow(clippy::needless_range_loop)]
        for owner in 0..4usize {
            let (storage, acks, io) = (storage.clone(), acks.clone(), io.clone());
            threads.push(std::thread::spawn(move || {
                let mut random = SmallRng::seed_from_u64(seed * 31 + owner as u64);
                let mut next = [0u64; 1];
                for _ in 0..rounds {
                    let which = 0;
                    let name = LOGS[owner];
                    let count = random.gen_range(1..4);
                    let mut pending = Vec::new();
                    let mut log = log_of(&storage, name);
                    while pending.len() < count {
                        let index = next[which];
                        match log.append(payload(name, index), index) {
                            Ok(append) => {
                                next[which] += 1;
                                pending.push((index, append));
                            }
                            Err(_) => log = log_of(&storage, name),
                        }
                    }
                    for (index, append) in pending {
                        let position = append
                            .wait()
                            .unwrap_or_else(|error| panic!("{name}:{index} failed: {error}"));
                        acks.lock().expect("lock").push((
                            io.operation_count(),
                            name,
                            index,
                            position,
                        ));
                    }
                }
            }));
        }
        let mut helpers = Vec::new();
        {
            let (storage, stop) = (storage.clone(), stop.clone());
            helpers.push(std::thread::spawn(move || {
                let mut random = SmallRng::seed_from_u64(seed ^ 0xc105e);
                while !stop.load(Ordering::SeqCst) {
                    let name = LOGS[random.gen_range(0..LOGS.len())];
                    storage.close_log(name).expect("close");
                    std::thread::sleep(Duration::from_micros(random.gen_range(3000..15000)));
                }
            }));
        }
        {
            // Holds the flush threads now and then, so that several logs wait together.
            let (storage, stop) = (storage.clone(), stop.clone());
            helpers.push(std::thread::spawn(move || {
                let mut random = SmallRng::seed_from_u64(seed ^ 0x9a05e);
                while !stop.load(Ordering::SeqCst) {
                    storage.pause_flushes();
                    std::thread::sleep(Duration::from_micros(random.gen_range(50..400)));
                    storage.resume_flushes();
                    std::thread::sleep(Duration::from_micros(random.gen_range(0..300)));
                }
                storage.resume_flushes();
            }));
        }
        {
            let (storage, stop) = (storage.clone(), stop.clone());
            helpers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    storage.checkpoint_entries().expect("checkpoint");
                    std::thread::sleep(Duration::from_millis(2));
                }
            }));
        }
        {
            let (storage, stop) = (storage.clone(), stop.clone());
            helpers.push(std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let log = log_of(&storage, "d");
                    let appends: Vec<PendingAppend> = (0..3)
                        .filter_map(|index| log.append(payload("d", round * 3 + index), 0).ok())
                        .collect();
                    for append in appends {
                        let _ = append.wait();
                    }
                    drop(log);
                    storage.delete_log("d").expect("delete d");
                    round += 1;
                }
            }));
        }
        {
            let (storage, stop) = (storage.clone(), stop.clone());
            helpers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(log) = storage.get_log("l0") {
                        let _ = log.trim();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }));
        }
        for thread in threads {
            thread.join().expect("appender");
        }
        stop.store(true, Ordering::SeqCst);
        for helper in helpers {
            helper.join().expect("helper");
        }
        if std::env::var("REVIEW_DEBUG").is_ok() {
            eprintln!(
                "syncs {} acks {}",
                io.sync_count(),
                acks.lock().expect("lock").len()
            );
        }
        let storage = Arc::try_unwrap(storage).unwrap_or_else(|_| panic!("storage still shared"));
        storage.close().expect("close");
        let acks = acks.lock().expect("lock").clone();
        acks
    }

    pub fn verify(crashed: &SimIo, acks: &Acks, crash_point: u64) {
        let storage = open(crashed).expect("the data directory opens");
        for name in LOGS {
            if !storage
                .log_names()
                .expect("names")
                .iter()
                .any(|n| n == name)
            {
                assert!(
                    !acks
                        .iter()
                        .any(|(done, log, ..)| *log == name && *done <= crash_point),
                    "log {name} with acknowledged entries is gone"
                );
                continue;
            }
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
                let text = String::from_utf8_lossy(&entry.data).to_string();
                let index: u64 = text
                    .split(':')
                    .nth(1)
                    .and_then(|index| index.parse().ok())
                    .expect("entry index");
                assert_eq!(
                    entry.data,
                    payload(name, index),
                    "{name}:{index} byte-exact"
                );
                if let Some(previous) = previous {
                    assert_eq!(previous + 1, index, "log {name}: gap after {previous}");
                }
                previous = Some(index);
                found.insert(index, entry.position);
            }
            let first = entries
                .first()
                .map(|entry| {
                    String::from_utf8_lossy(&entry.data)
                        .split(':')
                        .nth(1)
                        .and_then(|index| index.parse::<u64>().ok())
                        .expect("entry index")
                })
                .unwrap_or(u64::MAX);
            for (done, log_name, index, position) in acks {
                if *log_name != name || *done > crash_point {
                    continue;
                }
                if name == "l0" && *index < first {
                    continue; // trimmed
                }
                assert_eq!(
                    found.get(index),
                    Some(position),
                    "acknowledged {name}:{index} at {position} lost ({} entries present)",
                    entries.len()
                );
            }
        }
        let _ = storage.open_log("d").expect("d opens");
        storage.close().expect("close");
    }
}

/// Waits for `receiver`, failing on a hang: no step of the simulated file system for 20 s.
fn watch<T>(io: &SimIo, receiver: std::sync::mpsc::Receiver<T>, what: &str) -> T {
    let mut last = io.operation_count();
    loop {
        match receiver.recv_timeout(Duration::from_secs(20)) {
            Ok(value) => return value,
            Err(_) => {
                let now = io.operation_count();
                if now == last {
                    if std::env::var("REVIEW_HANG_WAIT").is_ok() {
                        eprintln!("HANG {what} pid {}", std::process::id());
                        std::thread::sleep(Duration::from_secs(900));
                    }
                    panic!("{what}: hang (no file-system step for 20 s)");
                }
                last = now;
            }
        }
    }
}

#[test]
fn review_concurrent_groups_closes_deletes_checkpoints_then_power_cut() {
    use stress::*;
    let iterations: u64 = std::env::var("REVIEW_STRESS_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(12);
    let rounds = 150;
    let start: u64 = std::env::var("REVIEW_STRESS_START")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(0);
    for iteration in start..start + iterations {
        let probe_steps = {
            let io = SimIo::new();
            let (sender, receiver) = std::sync::mpsc::channel();
            let probe = io.clone();
            std::thread::spawn(move || {
                workload(&probe, iteration, rounds);
                let _ = sender.send(());
            });
            watch(&io, receiver, &format!("iteration {iteration} (probe run)"));
            io.operation_count()
        };
        let mode = [
            CrashMode::LoseUnsynced,
            CrashMode::TornPrefix,
            CrashMode::TornWithGarbage,
        ][(iteration % 3) as usize];
        let crash_point = (iteration * 7919 + 101) % probe_steps.max(1);
        let io = SimIo::new();
        io.crash_before_operation(crash_point, mode, iteration);
        let (sender, receiver) = std::sync::mpsc::channel();
        let run = io.clone();
        std::thread::spawn(move || {
            let acks = workload(&run, iteration, rounds);
            let _ = sender.send(acks);
        });
        let acks = watch(&io, receiver, &format!("iteration {iteration}"));
        let crashed = io
            .take_crashed()
            .unwrap_or_else(|| io.crash(mode, iteration));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            verify(&crashed, &acks, crash_point)
        }));
        if let Err(panic) = outcome {
            eprintln!(
                "iteration {iteration}: power cut before step {crash_point} of ~{probe_steps} ({mode:?})"
            );
            std::panic::resume_unwind(panic);
        }
    }
}

/// ATTACK 5b. Blast radius of `redo`'s errors: one log's newest segment with a flipped byte in
/// a record its own fsync made durable, between two batches the WAL made durable. Before the
/// WAL, only that log refused to open (damage followed by a valid record). Now the redo finds a
/// WAL record starting after the segment's valid end, returns `Corrupted`, and `EntryWal::
/// recover`'s `?` makes `Storage::open` fail: no log of the engine opens.
#[test]
fn review_one_corrupted_segment_does_not_stop_the_whole_engine_from_opening() {
    let io = SimIo::new();
    let storage = open(&io);
    let logs: Vec<Arc<Log>> = (0..2)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (_, _, append) in append_together(&storage, &logs, 1, "wal-0") {
        append.wait().expect("durable");
    }
    // Alone in the queue: its own write and fsync.
    logs[0]
        .append(payload(0, 1, "solo"), 1)
        .expect("append")
        .wait()
        .expect("durable");
    let segment = segment_path(&logs[0], logs[0].current_ledger_id(), 0);
    for (_, _, append) in append_together(&storage, &logs, 1, "wal-2") {
        append.wait().expect("durable");
    }
    drop(logs);
    let crashed = io.crash(CrashMode::LoseUnsynced, 0);
    drop(storage);
    // Bit rot in the solo record (the second record of the segment).
    let mut bytes = crashed.read_file(&segment).expect("segment");
    let header = bytes.len() - 2 * RECORD_BYTES as usize; // header + WAL-0 record
    let flip = header + RECORD_BYTES as usize + 100;
    assert!(flip < bytes.len(), "segment holds the solo record");
    bytes[flip] ^= 0xff;
    crashed.write_file(&segment, bytes).expect("damage");
    let storage = open_with(&crashed, config())
        .unwrap_or_else(|error| panic!("the whole engine refuses to open: {error}"));
    assert!(
        storage.open_log("t0").is_err(),
        "the damaged log is refused"
    );
    let t1 = storage.open_log("t1").expect("the other log opens");
    assert_eq!(all(&t1).len(), 2);
}

/// ATTACK 8. A full disk at every byte of a group flush (segments' writes, then the WAL's
/// write), then a later group that succeeds, then power cuts in every mode. Checks: the engine
/// and every log open, no gap, every acknowledged entry at its position. Refused entries that
/// come back are counted and reported (attack 1 is the assertion for them).
#[test]
fn review_disk_full_at_every_byte_of_a_group_flush() {
    let mut resurrections = 0;
    let mut cases = 0;
    for room in (0..3 * 2 * RECORD_BYTES + 3 * (2 * RECORD_BYTES + 100)).step_by(37) {
        let io = SimIo::new();
        let storage = open(&io);
        let logs: Vec<Arc<Log>> = (0..3)
            .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
            .collect();
        let mut acked: Vec<(usize, Bytes, Position)> = Vec::new();
        for (number, index, append) in append_together(&storage, &logs, 2, "kept") {
            acked.push((
                number,
                payload(number, index, "kept"),
                append.wait().expect("durable"),
            ));
        }
        io.set_capacity(Some(io.used_bytes() + room));
        let mut refused = Vec::new();
        for (number, index, append) in append_together(&storage, &logs, 2, "maybe") {
            match append.wait() {
                Ok(position) => acked.push((number, payload(number, index, "maybe"), position)),
                Err(StorageError::DiskFull { .. }) => refused.push(payload(number, index, "maybe")),
                Err(error) => panic!("room {room}: unexpected {error}"),
            }
        }
        io.set_capacity(None);
        for (number, index, append) in append_together(&storage, &logs, 1, "after") {
            acked.push((
                number,
                payload(number, index, "after"),
                append.wait().expect("durable"),
            ));
        }
        drop(logs);
        let crashes = crashes(&io, 16);
        drop(storage);
        for (mode, crashed) in &crashes {
            cases += 1;
            let storage = open_with(crashed, config())
                .unwrap_or_else(|error| panic!("room {room} {mode}: engine refuses: {error}"));
            for number in 0..3 {
                let log = storage
                    .open_log(&format!("t{number}"))
                    .unwrap_or_else(|error| panic!("room {room} {mode}: t{number}: {error}"));
                let entries: Vec<(Position, Bytes)> = match log.first_position() {
                    Some(first) => log
                        .read_from(first, usize::MAX, usize::MAX)
                        .expect("read")
                        .into_iter()
                        .map(|entry| (entry.position, entry.data))
                        .collect(),
                    None => Vec::new(),
                };
                for (log_number, data, position) in &acked {
                    if *log_number == number {
                        assert!(
                            entries.contains(&(*position, data.clone())),
                            "room {room} {mode}: t{number} lost {position}"
                        );
                    }
                }
                if entries.iter().any(|(_, data)| refused.contains(data)) {
                    resurrections += 1;
                }
            }
        }
    }
    eprintln!("{resurrections} of {cases} (log, power cut) cases brought refused entries back");
}
