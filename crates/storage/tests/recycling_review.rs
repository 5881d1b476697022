//! Attacks on recycled segment files (a trimmed segment's file kept as `*.free` and written
//! into again): power cuts that keep part of what was written into a recycled file, the
//! summary of a log that is not open, and reads racing a trim that recycles the file they read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{CrashMode, FlushPolicy, Log, SimIo, Storage, StorageConfig};

const HEADER_LEN: u64 = 64;
/// Record framing (8) + entry header (16).
const RECORD_OVERHEAD: u64 = 24;
const PAYLOAD_LEN: usize = 100;
const RECORD_LEN: u64 = RECORD_OVERHEAD + PAYLOAD_LEN as u64;

/// Segments of `records` records of `PAYLOAD_LEN`-byte payloads.
fn config(records: u64) -> StorageConfig {
    StorageConfig {
        segment_max_bytes: HEADER_LEN + records * RECORD_LEN,
        entry_max_bytes: 256,
        flush_threads: 1,
        cursor_persist_interval: Duration::from_secs(3600),
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn relaxed(config: StorageConfig) -> StorageConfig {
    StorageConfig {
        flush_policy: FlushPolicy::RelaxedWriteOnly {
            fsync_interval: Duration::from_secs(3600),
        },
        ..config
    }
}

fn open(io: &SimIo, config: StorageConfig) -> Storage {
    Storage::open_with_io(Path::new("/data"), config, Arc::new(io.clone())).expect("open")
}

fn payload(run: &str, index: u64) -> Bytes {
    let mut bytes = format!("{run}:{index}:").into_bytes();
    bytes.resize(PAYLOAD_LEN, b'.');
    Bytes::from(bytes)
}

fn append(log: &Arc<Log>, run: &str, indexes: std::ops::Range<u64>) {
    for index in indexes {
        log.append(payload(run, index), index)
            .expect("append")
            .wait()
            .expect("durable");
    }
}

fn read_all(log: &Arc<Log>) -> Vec<Bytes> {
    let Some(first) = log.first_position() else {
        return Vec::new();
    };
    log.read_from(first, usize::MAX, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|entry| entry.data)
        .collect()
}

fn count_files(io: &SimIo, suffix: &str) -> usize {
    io.paths()
        .iter()
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .count()
}

/// A data directory whose log "t" has two free files of five records (684 bytes) and, after
/// a power cut, is opened again with segments of ten records (1,304 bytes): a segment written
/// into a free file runs 620 bytes past the file's old end.
fn short_free_files() -> SimIo {
    let io = SimIo::new();
    let storage = open(&io, config(5));
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..15);
    log.trim().expect("trim");
    assert_eq!(count_files(&io, ".free"), 2, "{:?}", io.paths());
    io.crash(CrashMode::LoseUnsynced, 0)
}

/// Overwriting the blocks of a recycled file is not appending: a power cut may keep the new
/// records written past the file's old end (the file grew) and lose the ones written over its
/// earlier life before them. What is left is a torn write, not corruption: the log must open,
/// with the entries before the tear.
#[test]
fn a_recycled_segment_torn_around_its_old_end_opens_after_a_power_cut() {
    let free = short_free_files();
    for seed in 0..16 {
        let io = free.crash(CrashMode::LoseUnsynced, 0);
        let storage = open(&io, relaxed(config(10)));
        let log = storage.open_log("t").expect("log");
        // Ten entries fill the segment the open created (synced at the roll); the next ten go
        // into a free file of 684 bytes, five of them past its old end, none synced.
        append(&log, "second", 0..20);
        assert_eq!(count_files(&io, ".free"), 1);
        let crashed = io.crash(CrashMode::TornPrefix, seed);
        drop(log);
        drop(storage);

        let storage = open(&crashed, config(10));
        let log = storage
            .open_log("t")
            .unwrap_or_else(|error| panic!("seed {seed}: the log refuses to open: {error}"));
        let entries = read_all(&log);
        let expected: Vec<Bytes> = (10..15)
            .map(|index| payload("first", index))
            .chain((0..20).map(|index| payload("second", index)))
            .collect();
        assert!(
            entries.len() >= 15 && expected.starts_with(&entries),
            "seed {seed}: {} entries, not a prefix of what was appended",
            entries.len()
        );
        // Appends go on after the last entry left.
        append(&log, "third", 0..3);
        assert_eq!(read_all(&log).len(), entries.len() + 3, "seed {seed}");
    }
}

/// Copies the simulated file system's files under `/data` into `root` (a real directory), for
/// what reads the files without the engine.
fn copy_to_disk(io: &SimIo, root: &Path) {
    for path in io.paths() {
        let Ok(bytes) = io.read_file(&path) else {
            continue; // a directory
        };
        let Ok(relative) = path.strip_prefix("/data") else {
            continue;
        };
        let target = root.join(relative);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::write(&target, bytes).expect("write");
    }
}

/// The stats of a log that is not open come from walking its files without checksums. After
/// a power cut, the newest segment may be a recycled file whose earlier life holds, right
/// after the new records, the very entry ids that come next (the same offsets in an earlier
/// ledger): they must not be counted as entries.
#[test]
fn the_summary_of_a_log_that_is_not_open_does_not_count_a_recycled_files_earlier_life() {
    let io = SimIo::new();
    let storage = open(&io, config(10));
    let log = storage.open_log("t").expect("log");
    // Ledger 1: entries 0..10, 10..20, 20..30; the first two segments become free files.
    append(&log, "first", 0..30);
    log.trim().expect("trim");
    let crashed = io.crash(CrashMode::LoseUnsynced, 1);
    drop(log);
    drop(storage);
    // Ledger 2: entries 0..10 in the segment the open created, 10 and 11 in the free file
    // that held ledger 1's entries 10..20, at the same offsets.
    let storage = open(&crashed, config(10));
    let log = storage.open_log("t").expect("log");
    append(&log, "second", 0..12);
    let crashed_again = crashed.crash(CrashMode::LoseUnsynced, 2);
    drop(log);
    drop(storage);

    let root = tempfile::tempdir().expect("tempdir");
    copy_to_disk(&crashed_again, root.path());
    let summary = meridian_storage::closed_log::summarize_closed_log(root.path(), "t")
        .expect("summary")
        .expect("the log exists");
    // What an open finds: ledger 1's last ten entries and ledger 2's twelve.
    let storage = open(&crashed_again, config(10));
    let log = storage.open_log("t").expect("log");
    assert_eq!(read_all(&log).len(), 22);
    assert_eq!(summary.entries, 22, "{summary:?}");
}
