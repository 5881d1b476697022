//! Recycled segment files: a trimmed segment's file is kept (`*.free`) and the log's next
//! segment is written into it. What must hold: the records of the file's earlier life, still on
//! disk beyond the new ones, never pass for entries (not after a crash, not even where they
//! carry the very entry ids the new segment expects next); only the newest segment ever holds
//! bytes beyond its records; a log keeps at most `recycled_segments_max` free files and none
//! once it is closed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use meridian_storage::{CrashMode, Log, SimIo, Storage, StorageConfig};

const HEADER_LEN: u64 = 64;
/// Record framing (8) + entry header (16).
const RECORD_OVERHEAD: u64 = 24;
const PAYLOAD_LEN: usize = 100;

fn config() -> StorageConfig {
    StorageConfig {
        // Ten records of 100-byte payloads per segment.
        segment_max_bytes: HEADER_LEN + 10 * (RECORD_OVERHEAD + PAYLOAD_LEN as u64),
        entry_max_bytes: 1024,
        ..StorageConfig::default()
    }
}

fn open(io: &SimIo, config: StorageConfig) -> Storage {
    Storage::open_with_io(Path::new("/data"), config, Arc::new(io.clone())).expect("open")
}

/// Entry `index` of run `run`, `len` bytes.
fn payload(run: &str, index: u64, len: usize) -> Bytes {
    let mut bytes = format!("{run}:{index}:").into_bytes();
    bytes.resize(len, b'.');
    Bytes::from(bytes)
}

fn append(log: &Arc<Log>, run: &str, indexes: std::ops::Range<u64>, len: usize) {
    for index in indexes {
        log.append(payload(run, index, len), index)
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

fn files_ending(io: &SimIo, suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = io
        .paths()
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

#[test]
fn records_of_a_recycled_files_earlier_life_never_pass_for_entries_after_a_crash() {
    let io = SimIo::new();
    let storage = open(&io, config());
    let log = storage.open_log("t").expect("log");
    // Three segments of ledger 1: entries 0..10, 10..20, 20..30.
    append(&log, "first", 0..30, PAYLOAD_LEN);
    // No cursor: everything but the newest segment is trimmed, into two free files.
    log.trim().expect("trim");
    assert_eq!(files_ending(&io, ".free").len(), 2, "{:?}", io.paths());

    // The machine loses power; the restarted log adopts the free files and starts ledger 2 at
    // entry 0.
    let crashed = io.crash(CrashMode::LoseUnsynced, 1);
    drop(log);
    drop(storage);
    let storage = open(&crashed, config());
    let log = storage.open_log("t").expect("log after the crash");
    // Entries 0..10 of ledger 2 fill the segment the open created; entry 10 rolls into the
    // newest free file: the segment that held ledger 1's entries 10..20, at these very
    // offsets, with these very entry ids.
    append(&log, "second", 0..12, PAYLOAD_LEN);
    assert_eq!(
        files_ending(&crashed, ".free").len(),
        1,
        "{:?}",
        crashed.paths()
    );

    // Power is lost again with two entries in the recycled file.
    let crashed_again = crashed.crash(CrashMode::LoseUnsynced, 2);
    drop(log);
    drop(storage);
    let storage = open(&crashed_again, config());
    let log = storage.open_log("t").expect("log after the second crash");
    let expected: Vec<Bytes> = (20..30)
        .map(|index| payload("first", index, PAYLOAD_LEN))
        .chain((0..12).map(|index| payload("second", index, PAYLOAD_LEN)))
        .collect();
    assert_eq!(read_all(&log), expected);
    // Appending goes on after the last real entry.
    append(&log, "third", 0..3, PAYLOAD_LEN);
    assert_eq!(read_all(&log).len(), expected.len() + 3);
}

#[test]
fn only_the_newest_segment_holds_bytes_beyond_its_records() {
    let io = SimIo::new();
    let storage = open(&io, config());
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..30, PAYLOAD_LEN);
    log.trim().expect("trim");
    // Smaller entries: a recycled file fills up before its old end (14 records of 84 bytes),
    // leaving bytes of its earlier life behind its last record, cut off when the next segment
    // starts; the next 6 go into the other free file.
    append(&log, "second", 0..20, 60);
    assert!(
        files_ending(&io, ".free").is_empty(),
        "both free files were written into: {:?}",
        io.paths()
    );
    let expected: Vec<Bytes> = (20..30)
        .map(|index| payload("first", index, PAYLOAD_LEN))
        .chain((0..20).map(|index| payload("second", index, 60)))
        .collect();
    assert_eq!(read_all(&log), expected);
    drop(log);
    storage.close().expect("close");
    let lengths: Vec<usize> = files_ending(&io, ".segment")
        .iter()
        .map(|path| io.read_file(path).expect("read").len())
        .collect();
    let small_record = RECORD_OVERHEAD as usize + 60;
    assert_eq!(
        lengths,
        vec![
            HEADER_LEN as usize + 10 * (RECORD_OVERHEAD as usize + PAYLOAD_LEN),
            HEADER_LEN as usize + 14 * small_record,
            // The newest, sealed by the close: cut after its seal.
            HEADER_LEN as usize + 6 * small_record + 24,
        ]
    );

    // Every older segment ends at its last record, or the open would find the damage and
    // refuse the log.
    let storage = open(&io, config());
    let log = storage.open_log("t").expect("reopened after a clean close");
    assert_eq!(read_all(&log), expected);

    // The same after a power cut instead of a close.
    append(&log, "third", 0..5, 60);
    let crashed = io.crash(CrashMode::LoseUnsynced, 3);
    let storage = open(&crashed, config());
    let log = storage.open_log("t").expect("log after the crash");
    let mut after = expected.clone();
    after.extend((0..5).map(|index| payload("third", index, 60)));
    assert_eq!(read_all(&log), after);
}

#[test]
fn a_log_keeps_at_most_the_configured_free_files_and_none_once_closed() {
    for max in [0, 1, 2] {
        let io = SimIo::new();
        let config = StorageConfig {
            recycled_segments_max: max,
            ..config()
        };
        let storage = open(&io, config.clone());
        let log = storage.open_log("t").expect("log");
        append(&log, "first", 0..60, PAYLOAD_LEN);
        log.trim().expect("trim");
        assert_eq!(files_ending(&io, ".segment").len(), 1, "max {max}");
        assert_eq!(files_ending(&io, ".free").len(), max, "max {max}");
        drop(log);
        storage.close_log("t").expect("close");
        assert!(files_ending(&io, ".free").is_empty(), "max {max}");
    }
}

#[test]
fn a_free_file_a_crash_left_behind_is_adopted_and_the_extra_ones_removed() {
    let io = SimIo::new();
    let storage = open(&io, config());
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..40, PAYLOAD_LEN);
    log.trim().expect("trim");
    assert_eq!(files_ending(&io, ".free").len(), 2);
    let crashed = io.crash(CrashMode::LoseUnsynced, 4);
    drop(log);
    drop(storage);
    let one = StorageConfig {
        recycled_segments_max: 1,
        ..config()
    };
    let storage = open(&crashed, one);
    let log = storage.open_log("t").expect("log after the crash");
    assert_eq!(files_ending(&crashed, ".free").len(), 1);
    // The adopted file is written into at the next roll.
    append(&log, "second", 0..11, PAYLOAD_LEN);
    assert!(files_ending(&crashed, ".free").is_empty());
    assert_eq!(read_all(&log).len(), 10 + 11);
}

#[test]
fn a_full_disk_takes_back_the_space_of_every_logs_free_files() {
    let io = SimIo::new();
    let storage = open(&io, config());
    let kept = storage.open_log("kept").expect("log");
    append(&kept, "kept", 0..30, PAYLOAD_LEN);
    kept.trim().expect("trim");
    assert_eq!(files_ending(&io, ".free").len(), 2);
    let full = storage.open_log("full").expect("log");
    // Room for four more entries, not for the fifth.
    io.set_capacity(Some(
        io.used_bytes() + 4 * (RECORD_OVERHEAD + PAYLOAD_LEN as u64) + 50,
    ));
    append(&full, "full", 0..4, PAYLOAD_LEN);
    let refused = full
        .append(payload("full", 4, PAYLOAD_LEN), 4)
        .expect("append")
        .wait();
    assert!(
        matches!(
            refused,
            Err(meridian_storage::StorageError::DiskFull { .. })
        ),
        "{refused:?}"
    );
    // The other log's kept files were given back, and the append goes through when retried.
    assert!(files_ending(&io, ".free").is_empty(), "{:?}", io.paths());
    append(&full, "full", 4..8, PAYLOAD_LEN);
    assert_eq!(read_all(&full).len(), 8);
    assert_eq!(read_all(&kept).len(), 10);
}
