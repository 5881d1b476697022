//! What the entry WAL's tests share (`tests/entry_wal.rs`, `tests/entry_wal_review.rs`,
//! `tests/entry_wal_recycle_review.rs`).

use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{
    CrashMode, Log, PendingAppend, Position, SimIo, Storage, StorageConfig, StorageError,
};

use super::gated_io::GatedIo;

pub fn config() -> StorageConfig {
    StorageConfig {
        flush_threads: 1,
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

pub fn open_with(io: &SimIo, config: StorageConfig) -> meridian_storage::Result<Storage> {
    Storage::open_with_io(Path::new("/data"), config, Arc::new(io.clone()))
}

pub fn open(io: &SimIo) -> Storage {
    open_with(io, config()).expect("open")
}

/// Entry bytes in a segment and in the WAL: the entry, its 16-byte header and 8-byte framing.
pub const RECORD_BYTES: u64 = 500 + 16 + 8;

pub fn payload(log: usize, index: u64, tag: &str) -> Bytes {
    let mut bytes = format!("{log}:{index}:{tag}:").into_bytes();
    bytes.resize(500, b'.');
    Bytes::from(bytes)
}

/// Appends `count` entries to each log in turn while the flush thread is held, so that it
/// flushes them together.
pub fn append_together(
    storage: &Storage,
    logs: &[Arc<Log>],
    count: u64,
    tag: &str,
) -> Vec<(usize, u64, PendingAppend)> {
    storage.pause_flushes();
    let mut appends = Vec::new();
    for index in 0..count {
        for (number, log) in logs.iter().enumerate() {
            let append = log
                .append(payload(number, index, tag), index)
                .expect("append");
            appends.push((number, index, append));
        }
    }
    storage.resume_flushes();
    appends
}

pub fn all(log: &Log) -> Vec<Bytes> {
    match log.first_position() {
        Some(first) => log
            .read_from(first, usize::MAX, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|entry| entry.data)
            .collect(),
        None => Vec::new(),
    }
}

/// The names of the entry WAL's files under the storage root, sorted.
pub fn wal_files(io: &SimIo) -> Vec<String> {
    let mut names: Vec<String> = meridian_storage::Io::list_dir(io, Path::new("/data"))
        .expect("list")
        .into_iter()
        .filter(|name| name.starts_with("entries-"))
        .collect();
    names.sort();
    names
}

/// The power cuts a test's storage is tried after, each with its name: losing what was not
/// synced, and `seeds` torn writes of each kind.
pub fn crashes(io: &SimIo, seeds: u64) -> Vec<(String, SimIo)> {
    let mut crashes = vec![(
        "LoseUnsynced".to_string(),
        io.crash(CrashMode::LoseUnsynced, 0),
    )];
    for seed in 0..seeds {
        crashes.push((
            format!("TornPrefix/{seed}"),
            io.crash(CrashMode::TornPrefix, seed),
        ));
        crashes.push((
            format!("TornWithGarbage/{seed}"),
            io.crash(CrashMode::TornWithGarbage, seed),
        ));
    }
    crashes
}

pub fn wal_bytes(io: &SimIo) -> u64 {
    let storage_root = Path::new("/data");
    let mut total = 0;
    for name in meridian_storage::Io::list_dir(io, storage_root).expect("list") {
        if name.starts_with("entries-") {
            total += io.read_file(&storage_root.join(name)).expect("read").len() as u64;
        }
    }
    total
}

/// Three logs with two durable entries each, whose next group of two entries each fails with
/// a full disk in the middle of the WAL's write: the first log's WAL record is written whole,
/// the second's in part. Every append of the group fails, and is rolled back; the records are
/// cut off the WAL again, durably.
pub fn a_group_refused_midway_through_the_wal(io: &SimIo, storage: &Storage) -> Vec<Arc<Log>> {
    let logs: Vec<Arc<Log>> = (0..3)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (_, _, append) in append_together(storage, &logs, 2, "kept") {
        append.wait().expect("durable");
    }
    let wal_before = wal_bytes(io);
    // Room for the segments' writes and one log's WAL record (its head: under 100 bytes).
    let segments = 3 * 2 * RECORD_BYTES;
    let one_record = 2 * RECORD_BYTES + 100;
    io.set_capacity(Some(io.used_bytes() + segments + one_record));
    for (_, _, append) in append_together(storage, &logs, 2, "refused") {
        match append.wait() {
            Err(StorageError::DiskFull { .. }) => {}
            other => panic!("expected DiskFull, got {other:?}"),
        }
    }
    io.set_capacity(None);
    assert_eq!(
        wal_bytes(io),
        wal_before,
        "the refused group's records are cut off the WAL"
    );
    logs
}

/// An entry of `len` bytes that starts like [`payload`]`(log, 0, tag)`.
pub fn entry_of(log: usize, tag: &str, len: usize) -> Bytes {
    let mut bytes = payload(log, 0, tag).to_vec();
    bytes.resize(len, b'.');
    Bytes::from(bytes)
}

/// An engine on a gated view of `sim` (at `/data`) with `flush_threads` and the entry WAL's
/// group wait `group_wait` (also its idle limit: a group waits `group_wait` however long no
/// batch joins it).
pub fn open_gated(
    sim: &SimIo,
    flush_threads: usize,
    group_wait: Duration,
) -> (Arc<GatedIo>, Storage) {
    let config = StorageConfig {
        flush_threads,
        entry_wal_group_wait: group_wait,
        entry_wal_group_idle: group_wait,
        ..config()
    };
    open_gated_with(sim, config)
}

/// An engine on a gated view of `sim` (at `/data`) with `config`.
pub fn open_gated_with(sim: &SimIo, config: StorageConfig) -> (Arc<GatedIo>, Storage) {
    let io = GatedIo::new(sim.clone());
    let storage = Storage::open_with_io("/data", config, io.clone()).expect("open");
    (io, storage)
}

/// Opens `count` logs `t0`, `t1`, ... and makes one append to each, one at a time (each alone:
/// it creates the segment, with its own fsync).
pub fn logs_with_segments(storage: &Storage, count: usize) -> Vec<Arc<Log>> {
    let logs: Vec<Arc<Log>> = (0..count)
        .map(|number| storage.open_log(&format!("t{number}")).expect("log"))
        .collect();
    for (number, log) in logs.iter().enumerate() {
        log.append(payload(number, 0, "first"), 0)
            .expect("append")
            .wait()
            .expect("durable");
    }
    logs
}

/// `t0`'s next batch, alone, takes its segment's own fsync, held here until the returned
/// sender sends or is dropped: meanwhile no batch is alone (another fsync is under way), so
/// the next ones go to the WAL path.
pub fn hold_t0_fsync(io: &GatedIo, logs: &[Arc<Log>]) -> (PendingAppend, Sender<()>) {
    let (reached, release) = io.arm_containing("sync", "/logs/t0/");
    let held = logs[0].append(payload(0, 1, "held"), 0).expect("append");
    reached
        .recv_timeout(Duration::from_secs(60))
        .expect("t0's own fsync reached");
    (held, release)
}

/// Runs `work` on its own thread: `None` if it has not finished within `limit` (a flush that
/// waits for a group that never comes is what the group wait's tests look for).
pub fn within<T: Send + 'static>(
    limit: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    finished.recv_timeout(limit).ok()
}

/// Fails the test without running the engine's close, which would wait for a stuck flush (or
/// a fsync the test still holds): leaks `storage` and `logs`, then panics. A panic keeps the
/// other tests of the file running, where an abort would take them down.
pub fn fail_leaking<S>(storage: S, logs: Vec<Arc<Log>>, message: &str) -> ! {
    std::mem::forget(logs);
    std::mem::forget(storage);
    panic!("{message}");
}

/// Waits for `append` within `limit`: the engine back, with the append's result. A wait past
/// `limit` (a group leader stuck) fails the test by [`fail_leaking`].
pub fn settle_within<S>(
    limit: Duration,
    storage: S,
    logs: &[Arc<Log>],
    append: PendingAppend,
    what: &str,
) -> (S, meridian_storage::Result<Position>) {
    match within(limit, move || append.wait()) {
        Some(result) => (storage, result),
        None => fail_leaking(
            storage,
            logs.to_vec(),
            &format!("{what}: not completed within {limit:?} (a group leader is stuck)"),
        ),
    }
}

/// Each engine `crashed` left (see [`crashes`]), reopened, holds exactly the logs `expected`
/// names, each with exactly its entries.
pub fn assert_logs_after_power_cuts(
    crashed: Vec<(String, SimIo)>,
    expected: &[(&str, Vec<Bytes>)],
) {
    let mut names: Vec<String> = expected.iter().map(|(name, _)| name.to_string()).collect();
    names.sort();
    for (cut, crashed) in crashed {
        let storage = open(&crashed);
        let mut found = storage.log_names().expect("names");
        found.sort();
        assert_eq!(found, names, "{cut}: the logs");
        for (name, entries) in expected {
            let log = storage.open_log(name).expect("log");
            assert_eq!(&all(&log), entries, "{cut}: log {name}");
        }
    }
}

/// A log deleted while its batch waits in a WAL group: with `t0`'s own fsync held (so the next
/// batches go to the WAL), `t1` hands over `doomed`, its deletion starts, then `t2` hands over
/// `kept`. Within `limit` both batches are durable and the deletion is done; after power cuts
/// (`seeds` of each crash mode) `t1` stays deleted (its WAL record replays into nothing) and
/// `t0` and `t2` hold what they acknowledged.
pub fn assert_a_log_deleted_while_its_batch_waits(
    sim: &SimIo,
    io: &GatedIo,
    storage: Storage,
    (doomed, kept): (Bytes, Bytes),
    seeds: u64,
    limit: Duration,
) {
    let logs = logs_with_segments(&storage, 3);
    let (held, release) = hold_t0_fsync(io, &logs);
    let doomed = logs[1].append(doomed, 0).expect("append");
    let storage = Arc::new(storage);
    let deleting = {
        let storage = storage.clone();
        std::thread::spawn(move || storage.delete_log("t1"))
    };
    let kept_append = logs[2].append(kept.clone(), 0).expect("append");
    let outcome = within(limit, move || {
        let kept = kept_append.wait();
        let doomed = doomed.wait();
        (kept, doomed, deleting.join().expect("delete thread"))
    });
    let Some((kept_result, doomed, deleted)) = outcome else {
        fail_leaking(
            storage,
            logs,
            &format!("a deletion while its log's batch waited in a group: not done in {limit:?}"),
        );
    };
    kept_result.expect("t2's batch durable");
    doomed.expect("t1's batch durable before its deletion");
    deleted.expect("t1 deleted");
    drop(release);
    held.wait().expect("t0's held batch");
    let Ok(storage) = Arc::try_unwrap(storage) else {
        panic!("the storage is still shared");
    };
    drop(logs);
    let crashed = crashes(sim, seeds);
    drop(storage);
    assert_logs_after_power_cuts(
        crashed,
        &[
            ("t0", vec![payload(0, 0, "first"), payload(0, 1, "held")]),
            ("t2", vec![payload(2, 0, "first"), kept]),
        ],
    );
}
