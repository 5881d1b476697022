//! Recovery from damaged files on the real file system: torn tails are truncated, corruption
//! anywhere else makes that log refuse to open (and only that log).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use meridian_storage::{InitialPosition, Storage, StorageConfig, StorageError};

const PAYLOAD_LEN: usize = 100;
/// Record framing (8) + entry header (16) + payload.
const RECORD_LEN: u64 = 24 + PAYLOAD_LEN as u64;
const HEADER_LEN: u64 = 64;

fn config() -> StorageConfig {
    StorageConfig {
        // Ten records per segment.
        segment_max_bytes: HEADER_LEN + 10 * RECORD_LEN,
        entry_max_bytes: 1024,
        ..StorageConfig::default()
    }
}

fn payload(index: u64) -> Bytes {
    let mut bytes = format!("entry-{index:06}-").into_bytes();
    bytes.resize(PAYLOAD_LEN, b'.');
    Bytes::from(bytes)
}

/// Writes `count` entries to log `name` and closes the engine. Returns the log's directory.
fn write_entries(root: &Path, name: &str, count: u64) -> PathBuf {
    let storage = Storage::open(root, config()).expect("open");
    let log = storage.open_log(name).expect("log");
    let pending: Vec<_> = (0..count)
        .map(|index| log.append(payload(index), 1_000 + index).expect("append"))
        .collect();
    for append in pending {
        append.wait().expect("durable");
    }
    let directory = log.directory().to_path_buf();
    storage.close().expect("close");
    directory
}

fn segment_files(directory: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(directory)
        .expect("list")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "segment")
        })
        .collect();
    files.sort();
    files
}

fn read_all(storage: &Storage, name: &str) -> Vec<Bytes> {
    let log = storage.open_log(name).expect("log");
    let Some(first) = log.first_position() else {
        return Vec::new();
    };
    log.read_from(first, usize::MAX, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|entry| entry.data)
        .collect()
}

/// Removes the 24-byte seal a clean close ends the newest segment with, as the next open does
/// before anything is appended again: the file then looks like the tail of a running log.
/// Returns the new length.
fn cut_seal(path: &Path) -> u64 {
    let length = fs::metadata(path).expect("stat").len() - 24;
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .set_len(length)
        .expect("cut the seal");
    length
}

fn flip_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).expect("read file");
    bytes[offset as usize] ^= 0x40;
    fs::write(path, bytes).expect("write file");
}

#[test]
fn a_torn_tail_is_truncated_and_every_acknowledged_entry_survives() {
    // Models a crash in the middle of writing a batch: the last record is cut short.
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "torn", 25);
    let tail = segment_files(&directory).pop().expect("tail segment");
    let clean_length = cut_seal(&tail);
    let mut partial_record = Vec::new();
    partial_record.extend_from_slice(&(16 + PAYLOAD_LEN as u32).to_le_bytes());
    partial_record.extend_from_slice(&[0xAB; 4]);
    partial_record.extend_from_slice(&25u64.to_le_bytes());
    OpenOptions::new()
        .append(true)
        .open(&tail)
        .expect("open tail")
        .write_all(&partial_record)
        .expect("tear");

    let storage = Storage::open(root.path(), config()).expect("reopen");
    assert_eq!(
        read_all(&storage, "torn"),
        (0..25).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(
        fs::metadata(&tail).expect("stat").len(),
        clean_length,
        "torn bytes truncated"
    );
    let log = storage.open_log("torn").expect("log");
    log.append(payload(25), 0)
        .expect("append")
        .wait()
        .expect("appends continue");
}

#[test]
fn garbage_after_the_last_record_is_truncated() {
    // Models a crash that left unsynced garbage after the last complete record.
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "garbage", 13);
    let tail = segment_files(&directory).pop().expect("tail segment");
    cut_seal(&tail);
    OpenOptions::new()
        .append(true)
        .open(&tail)
        .expect("open tail")
        .write_all(&[0x5A; 300])
        .expect("garbage");
    let storage = Storage::open(root.path(), config()).expect("reopen");
    assert_eq!(
        read_all(&storage, "garbage"),
        (0..13).map(payload).collect::<Vec<_>>()
    );
}

#[test]
fn a_bit_flip_in_a_sealed_segment_refuses_that_log_only() {
    // Models bit rot in data that was durable long ago.
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "rotten", 25);
    write_entries(root.path(), "healthy", 5);
    let sealed = segment_files(&directory).remove(0);
    let offset = HEADER_LEN + 3 * RECORD_LEN + 40;
    flip_byte(&sealed, offset);

    let storage = Storage::open(root.path(), config()).expect("engine opens");
    let error = storage
        .open_log("rotten")
        .expect_err("corrupted log refuses to open");
    match &error {
        StorageError::Corrupted {
            path, offset: at, ..
        } => {
            assert_eq!(path, &sealed);
            assert_eq!(
                *at,
                HEADER_LEN + 3 * RECORD_LEN,
                "offset of the damaged record"
            );
        }
        other => panic!("expected Corrupted, got {other}"),
    }
    let message = error.to_string();
    assert!(message.contains(&sealed.display().to_string()), "{message}");
    assert_eq!(
        read_all(&storage, "healthy"),
        (0..5).map(payload).collect::<Vec<_>>()
    );
}

#[test]
fn damage_followed_by_valid_records_in_the_tail_is_corruption_not_a_torn_write() {
    // Models bit rot inside the last segment: valid records after the damage prove that the
    // damaged bytes were once durable.
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "tail-rot", 25);
    let tail = segment_files(&directory).pop().expect("tail segment");
    cut_seal(&tail);
    flip_byte(&tail, HEADER_LEN + RECORD_LEN + 30);
    let storage = Storage::open(root.path(), config()).expect("engine opens");
    let error = storage.open_log("tail-rot").expect_err("refuses");
    assert!(
        matches!(&error, StorageError::Corrupted { reason, .. } if reason.contains("valid record follows")),
        "{error}"
    );
}

#[test]
fn a_damaged_segment_header_refuses_the_log() {
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "header", 25);
    let sealed = segment_files(&directory).remove(0);
    flip_byte(&sealed, 17);
    let storage = Storage::open(root.path(), config()).expect("engine opens");
    let error = storage.open_log("header").expect_err("refuses");
    assert!(error.to_string().contains("header checksum"), "{error}");
}

#[test]
fn a_corrupted_record_read_at_runtime_is_an_error_never_wrong_bytes() {
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "runtime", 25);
    let storage = Storage::open(root.path(), config()).expect("open");
    let log = storage.open_log("runtime").expect("log");
    let first = log.first_position().expect("first");
    // Damage a payload byte after the log was opened (nothing of it is cached).
    let sealed = segment_files(&directory).remove(0);
    flip_byte(&sealed, HEADER_LEN + 2 * RECORD_LEN + 50);
    let error = log
        .read_from(first, 100, usize::MAX)
        .expect_err("checksum catches it");
    assert!(matches!(error, StorageError::Corrupted { .. }), "{error}");
    // The log now refuses service instead of serving around the hole.
    assert!(log.read(first).is_err());
    assert!(log.append(payload(99), 0).is_err());
}

#[test]
fn a_corrupted_cursor_journal_refuses_the_log() {
    let root = tempfile::tempdir().expect("tempdir");
    let directory = {
        let storage = Storage::open(root.path(), config()).expect("open");
        let log = storage.open_log("cursors").expect("log");
        for index in 0..5 {
            log.append(payload(index), 0)
                .expect("append")
                .wait()
                .expect("durable");
        }
        log.open_cursor("a", InitialPosition::Earliest)
            .expect("cursor");
        log.persist_cursors().expect("persist");
        log.acknowledge_cumulative("a", log.last_position().expect("last"))
            .expect("ack");
        log.persist_cursors().expect("persist");
        let directory = log.directory().to_path_buf();
        storage.close().expect("close");
        directory
    };
    // Damage the first snapshot record; later records are intact, so this is not a torn write.
    flip_byte(&directory.join("cursors.journal"), HEADER_LEN + 10);
    let storage = Storage::open(root.path(), config()).expect("engine opens");
    let error = storage.open_log("cursors").expect_err("refuses");
    assert!(error.to_string().contains("cursors.journal"), "{error}");
}

#[test]
fn records_written_under_a_larger_entry_limit_survive_a_restart_with_a_smaller_one() {
    // Models an operator lowering `max_message_size` (and with it `entry_max_bytes`) and
    // restarting: records that were valid when written must still be served, in the newest
    // segment (not mistaken for a torn tail) and in older ones (not mistaken for corruption).
    let root = tempfile::tempdir().expect("tempdir");
    write_entries(root.path(), "one-segment", 5);
    write_entries(root.path(), "three-segments", 25);
    let smaller_limit = StorageConfig {
        entry_max_bytes: PAYLOAD_LEN / 2,
        ..config()
    };
    let storage = Storage::open(root.path(), smaller_limit).expect("reopen");
    assert_eq!(
        read_all(&storage, "one-segment"),
        (0..5).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(
        read_all(&storage, "three-segments"),
        (0..25).map(payload).collect::<Vec<_>>()
    );
}

#[test]
fn a_leftover_ledger_floor_update_does_not_wedge_the_engine() {
    // Models a kill between creating `ledger-floor.tmp` and renaming it over the floor: once in
    // a data directory that has logs, once in a brand-new one.
    let root = tempfile::tempdir().expect("tempdir");
    write_entries(root.path(), "doomed", 5);
    fs::write(root.path().join("ledger-floor.tmp"), b"half").expect("leftover");
    let storage = Storage::open(root.path(), config()).expect("reopen");
    storage.delete_log("doomed").expect("delete still works");
    assert!(storage.log_names().expect("names").is_empty());
    storage.close().expect("close");

    let fresh = tempfile::tempdir().expect("tempdir");
    fs::write(fresh.path().join("ledger-floor.tmp"), b"").expect("leftover");
    let storage = Storage::open(fresh.path(), config()).expect("a fresh start opens");
    storage.close().expect("close");
}

#[test]
fn an_empty_or_torn_cursor_journal_is_replaced_not_refused() {
    // Models a crash while a log's cursor journal was being created: its name became durable
    // (another file's creation synced the directory) but not its header.
    let root = tempfile::tempdir().expect("tempdir");
    let empty = write_entries(root.path(), "empty-journal", 5);
    let torn = write_entries(root.path(), "torn-journal", 5);
    fs::write(empty.join("cursors.journal"), b"").expect("empty journal");
    let journal = torn.join("cursors.journal");
    let header = fs::read(&journal).expect("journal");
    fs::write(&journal, &header[..30]).expect("torn journal");

    let storage = Storage::open(root.path(), config()).expect("reopen");
    for name in ["empty-journal", "torn-journal"] {
        assert_eq!(
            read_all(&storage, name),
            (0..5).map(payload).collect::<Vec<_>>()
        );
        let log = storage.open_log(name).expect("log");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        log.acknowledge_cumulative("sub", log.last_position().expect("last"))
            .expect("ack");
        log.persist_cursors().expect("the journal works again");
    }
    storage.close().expect("close");
    let storage = Storage::open(root.path(), config()).expect("reopen");
    let log = storage.open_log("torn-journal").expect("log");
    assert_eq!(
        log.mark_delete_position("sub"),
        Some(log.last_position()),
        "the cursor persisted into the new journal survives"
    );
}

#[test]
fn a_missing_middle_segment_refuses_the_log_naming_the_gap() {
    // Models a segment file lost or deleted by hand between two others: serving the log would
    // silently skip its entries.
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "holed", 30);
    let middle = segment_files(&directory).remove(1);
    fs::remove_file(&middle).expect("remove middle segment");
    assert_refused_for_a_gap(root.path(), "holed", &["entry 10", "entry 20"]);
}

/// Asserts that log `name` refuses to open with a gap, naming each of `named` in the error.
fn assert_refused_for_a_gap(root: &Path, name: &str, named: &[&str]) {
    let storage = Storage::open(root, config()).expect("engine opens");
    let error = storage.open_log(name).expect_err("refuses");
    let message = error.to_string();
    assert!(
        matches!(error, StorageError::Corrupted { .. }) && message.contains("gap"),
        "{message}"
    );
    for text in named {
        assert!(message.contains(text), "names {text}: {message}");
    }
}

#[test]
fn a_missing_last_segment_of_a_ledger_refuses_the_log_naming_the_gap() {
    // Models the loss of the last segment of an earlier ledger: entry ids show no gap (the next
    // ledger starts at entry 0), only the next segment's record of where its predecessor ended.
    let root = tempfile::tempdir().expect("tempdir");
    // Ledger L: two segments (entries 0..10 and 10..13); then ledger L+1: three entries.
    let directory = write_entries(root.path(), "holed", 13);
    write_entries(root.path(), "holed", 3);
    let files = segment_files(&directory);
    assert_eq!(files.len(), 3, "{files:?}");
    fs::remove_file(&files[1]).expect("remove the last segment of the first ledger");
    assert_refused_for_a_gap(root.path(), "holed", &["entry 13"]);
}

#[test]
fn a_torn_entry_whose_payload_embeds_a_record_is_still_a_torn_tail() {
    // Models a power cut while writing an entry whose payload (chosen by the producer) holds a
    // complete, valid record frame for its own position: the torn prefix must be truncated as a
    // torn tail, not taken for a valid record after damage (which would refuse the log).
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "embedded", 2);
    let mut inner_body = Vec::new();
    inner_body.extend_from_slice(&2u64.to_le_bytes());
    inner_body.extend_from_slice(&0u64.to_le_bytes());
    inner_body.extend_from_slice(b"hello");
    let mut payload_bytes = b"prefix".to_vec();
    payload_bytes.extend_from_slice(&(inner_body.len() as u32).to_le_bytes());
    payload_bytes.extend_from_slice(&crc32c::crc32c(&inner_body).to_le_bytes());
    payload_bytes.extend_from_slice(&inner_body);
    let embedded_end = payload_bytes.len() as u64;
    payload_bytes.extend_from_slice(&[b'.'; 40]);
    {
        let storage = Storage::open(root.path(), config()).expect("open");
        let log = storage.open_log("embedded").expect("log");
        log.append(Bytes::from(payload_bytes), 5)
            .expect("append")
            .wait()
            .expect("durable");
        storage.close().expect("close");
    }
    // The torn write kept a prefix of the entry's record (the first in the newest segment)
    // that ends after the embedded record.
    let segment = segment_files(&directory).pop().expect("newest segment");
    let file = OpenOptions::new().write(true).open(&segment).expect("open");
    file.set_len(HEADER_LEN + 8 + 16 + embedded_end + 10)
        .expect("tear");
    drop(file);
    let storage = Storage::open(root.path(), config()).expect("open");
    let entries = read_all(&storage, "embedded");
    assert_eq!(entries, vec![payload(0), payload(1)]);
}

#[test]
fn a_bit_flip_in_the_last_record_after_a_clean_close_refuses_the_log() {
    // Models bit rot at rest in the newest segment after a clean close: nothing was being
    // written, so the damage is corruption, not a torn write, and truncating it would silently
    // delete an acknowledged entry.
    let root = tempfile::tempdir().expect("tempdir");
    let directory = write_entries(root.path(), "rotten", 3);
    let newest = segment_files(&directory).pop().expect("newest segment");
    let length = fs::metadata(&newest).expect("stat").len();
    // Inside the body of the last record (the file ends with the 24-byte seal).
    flip_byte(&newest, length - 24 - 10);
    let storage = Storage::open(root.path(), config()).expect("engine opens");
    let error = storage.open_log("rotten").expect_err("refuses");
    assert!(
        matches!(error, StorageError::Corrupted { .. }) && error.to_string().contains("sealed"),
        "{error}"
    );
}

#[test]
fn a_sealed_segment_is_unsealed_on_open_and_serves_every_entry_across_reopens() {
    // The seal a clean close writes is cut off again on open (only the newest segment of a
    // closed log ends in one), and closing again seals again.
    let root = tempfile::tempdir().expect("tempdir");
    write_entries(root.path(), "sealed", 5);
    let storage = Storage::open(root.path(), config()).expect("open");
    assert_eq!(
        read_all(&storage, "sealed"),
        (0..5).map(payload).collect::<Vec<_>>()
    );
    storage.close().expect("close");
    let storage = Storage::open(root.path(), config()).expect("open again");
    assert_eq!(
        read_all(&storage, "sealed"),
        (0..5).map(payload).collect::<Vec<_>>()
    );
}
