//! Review of the sealed-segment read-ahead (a read fetches what its budget is expected to need,
//! estimated at the segment's mean record size): reads whose estimate the mean misleads must
//! still return exactly the entries asked for and not fetch megabytes they do not return.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{Log, Position, SimIo, Storage, StorageConfig};
use support::gated_io::GatedIo;

/// A huge entry: the largest a producer may send (5 MiB).
const HUGE_BYTES: usize = 5 * 1024 * 1024;
const HUGE_ENTRIES: u64 = 5;
const TINY_BYTES: usize = 100;
const TINY_ENTRIES: u64 = 1000;
/// Framing of a record (length, checksum, entry id, publish time).
const FRAMING: u64 = 24;
/// The chunk a forward scan reads at least (twice the sparse index's byte spacing).
const CHUNK: u64 = 128 * 1024;

fn config() -> StorageConfig {
    StorageConfig {
        // Every entry of the test in one segment.
        segment_max_bytes: 64 * 1024 * 1024,
        pending_max_bytes_per_log: 64 << 20,
        // Nothing cached: every read goes to the files.
        cache_max_bytes: 0,
        // No cursor: retention would trim the entries while the test reads them.
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn payload(index: u64) -> Bytes {
    let len = if index < TINY_ENTRIES {
        TINY_BYTES
    } else {
        HUGE_BYTES
    };
    let mut bytes = format!("entry-{index}-").into_bytes();
    bytes.resize(len, (index % 251) as u8);
    Bytes::from(bytes)
}

/// One sealed segment of many tiny entries followed by a few huge ones: its mean record size
/// (25 KiB) is 200 times that of the tiny records.
fn mixed_log() -> (Arc<GatedIo>, Storage, Vec<Position>) {
    support::gated_io::sealed_log(config(), "t", (0..HUGE_ENTRIES + TINY_ENTRIES).map(payload))
}

#[test]
fn a_catch_up_over_tiny_entries_does_not_read_ahead_by_the_huge_ones_mean() {
    let (io, storage, positions) = mixed_log();
    let log = storage.open_log("t").expect("log");
    assert_eq!(log.stats().segments, 2, "{:?}", log.stats());
    // As the dispatcher reads (100 entries, 5 MiB), and as it reads for 1,000 permits of
    // batches of 128 (8 entries).
    for max_entries in [100, 8] {
        let mut next = positions[0];
        let mut read = Vec::new();
        while read.len() < TINY_ENTRIES as usize {
            let before = io.bytes_read();
            let entries = log
                .read_from(next, max_entries, 5 * 1024 * 1024)
                .expect("read");
            let bytes_read = io.bytes_read() - before;
            let returned: u64 = entries
                .iter()
                .map(|entry| entry.data.len() as u64 + FRAMING)
                .sum();
            // A scan walks from the nearest indexed record (at most 64 tiny ones before) and
            // reads at least one chunk: anything beyond that is read for nothing.
            assert!(
                bytes_read <= returned + 64 * (TINY_BYTES as u64 + FRAMING) + CHUNK,
                "{bytes_read} bytes read to return {} entries ({returned} bytes) from {next}",
                entries.len()
            );
            let last = entries.last().expect("entries left").position;
            read.extend(entries);
            next = Position::new(last.ledger_id, last.entry_id + 1);
        }
        for (index, entry) in read.iter().enumerate() {
            assert_eq!(entry.position, positions[index]);
            assert!(entry.data == payload(index as u64), "entry {index}");
        }
    }
}

#[test]
fn a_read_of_one_tiny_entry_reads_at_most_a_chunk() {
    let (io, storage, positions) = mixed_log();
    let log = storage.open_log("t").expect("log");
    // Entries at, just after and well after an indexed record (one every 64 records here).
    for index in [0, 1, 63, 64, 65, 100, 500, 998, 999] {
        let before = io.bytes_read();
        let entry = log.read(positions[index as usize]).expect("read");
        assert!(entry.data == payload(index), "entry {index}");
        let bytes_read = io.bytes_read() - before;
        assert!(
            bytes_read <= CHUNK,
            "{bytes_read} bytes read for entry {index} of {TINY_BYTES} bytes"
        );
    }
}

#[test]
fn a_read_from_the_middle_of_a_huge_run_returns_each_huge_entry_whole() {
    let (io, storage, positions) = mixed_log();
    let log = storage.open_log("t").expect("log");
    for (start, max_entries, max_bytes) in [
        (1001, 2, usize::MAX),
        (1003, 100, 1),
        (1004, 3, 5 * 1024 * 1024),
        (1002, 10, 12 * 1024 * 1024),
        (990, 100, 5 * 1024 * 1024),
        (999, 3, usize::MAX),
    ] {
        let before = io.bytes_read();
        let entries = log
            .read_from(positions[start], max_entries, max_bytes)
            .expect("read");
        let bytes_read = io.bytes_read() - before;
        let mut expected = Vec::new();
        let mut bytes = 0;
        for index in start as u64..TINY_ENTRIES + HUGE_ENTRIES {
            if expected.len() >= max_entries || (!expected.is_empty() && bytes >= max_bytes) {
                break;
            }
            bytes += payload(index).len() + FRAMING as usize;
            expected.push(index);
        }
        let got: Vec<Position> = entries.iter().map(|entry| entry.position).collect();
        let want: Vec<Position> = expected
            .iter()
            .map(|index| positions[*index as usize])
            .collect();
        assert_eq!(
            got, want,
            "read from {start}: {max_entries} entries, {max_bytes} bytes"
        );
        for (entry, index) in entries.iter().zip(&expected) {
            assert!(entry.data == payload(*index), "entry {index}");
        }
        // Each huge record is read once (the walk from the indexed record before `start` is
        // at most one more), and no more than 8 MiB beyond.
        let returned = bytes as u64;
        assert!(
            bytes_read <= returned + (HUGE_BYTES as u64 + FRAMING) + 8 * 1024 * 1024,
            "{bytes_read} bytes read to return {returned}"
        );
    }
}

#[test]
fn an_empty_budget_reads_nothing() {
    let (io, storage, positions) = mixed_log();
    let log = storage.open_log("t").expect("log");
    let before = io.bytes_read();
    let entries = log.read_from(positions[100], 0, usize::MAX).expect("read");
    assert!(entries.is_empty());
    assert_eq!(io.bytes_read(), before);
}

/// Segment files under `root`, oldest first (by name: ledger, then first entry).
fn segment_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut directories = vec![root.to_path_buf()];
    while let Some(directory) = directories.pop() {
        for item in std::fs::read_dir(&directory).expect("list") {
            let path = item.expect("item").path();
            if path.is_dir() {
                directories.push(path);
            } else if path
                .extension()
                .is_some_and(|extension| extension == "segment")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn real_config() -> StorageConfig {
    StorageConfig {
        // Ten records of 1,000-byte payloads per segment.
        segment_max_bytes: 64 + 10 * (1000 + 24),
        entry_max_bytes: 1000,
        cache_max_bytes: 0,
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

/// Appends each payload and waits until it is durable before the next: their positions.
fn append_each(log: &Arc<Log>, payloads: impl Iterator<Item = Bytes>) -> Vec<Position> {
    payloads
        .map(|payload| {
            log.append(payload, 1_000)
                .expect("append")
                .wait()
                .expect("durable")
        })
        .collect()
}

fn labelled(run: &str, index: u64, len: usize) -> Bytes {
    let mut bytes = format!("{run}:{index}:").into_bytes();
    bytes.resize(len, b'.');
    Bytes::from(bytes)
}

/// On real files (reads into spare capacity): a sealed segment written into a recycled file
/// holds its earlier life's records past its own; no read, whatever its budget, returns them.
#[test]
fn reads_of_a_sealed_segment_in_a_recycled_file_return_only_its_own_records() {
    let directory = tempfile::tempdir().expect("tempdir");
    let new_positions: Vec<Position> = {
        let storage = Storage::open(directory.path(), real_config()).expect("open");
        let log = storage.open_log("t").expect("log");
        append_each(&log, (0..30).map(|index| labelled("old", index, 1000)));
        // No cursor: all but the newest segment are trimmed into free files.
        log.trim().expect("trim");
        let positions = append_each(&log, (0..20).map(|index| labelled("new", index, 100)));
        drop(log);
        storage.close().expect("close");
        positions
    };
    let storage = Storage::open(directory.path(), real_config()).expect("reopen");
    let log = storage.open_log("t").expect("log");
    let new = |index: usize| labelled("new", index as u64, 100);
    for (start, max_entries, max_bytes) in [
        (0, usize::MAX, usize::MAX),
        (0, 100, 5 * 1024 * 1024),
        (5, 1, 1),
        (19, 100, usize::MAX),
        (10, 8, 1000),
    ] {
        let entries = log
            .read_from(new_positions[start], max_entries, max_bytes)
            .expect("read");
        let mut expected = Vec::new();
        let mut bytes = 0;
        for index in start..new_positions.len() {
            if expected.len() >= max_entries || (!expected.is_empty() && bytes >= max_bytes) {
                break;
            }
            bytes += 100 + 24;
            expected.push(index);
        }
        let got: Vec<(Position, Bytes)> = entries
            .into_iter()
            .map(|entry| (entry.position, entry.data))
            .collect();
        let want: Vec<(Position, Bytes)> = expected
            .iter()
            .map(|index| (new_positions[*index], new(*index)))
            .collect();
        assert_eq!(
            got, want,
            "read from {start}: {max_entries} entries, {max_bytes} bytes"
        );
    }
}

/// On real files: a sealed segment cut short under the log (by hand, or a failing disk) makes
/// the reads of what it lost fail (once: the log then refuses service); they neither wait for
/// bytes that never come nor return others.
#[test]
fn a_read_of_a_segment_cut_short_fails() {
    let directory = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig {
        segment_max_bytes: 64 * 1024 * 1024,
        entry_max_bytes: HUGE_BYTES,
        ..real_config()
    };
    let positions: Vec<Position> = {
        let storage = Storage::open(directory.path(), config.clone()).expect("open");
        let log = storage.open_log("t").expect("log");
        let positions = append_each(
            &log,
            (0..300).map(|index| {
                let len = if index % 100 == 99 { 300_000 } else { 1000 };
                labelled("e", index, len)
            }),
        );
        drop(log);
        storage.close().expect("close");
        positions
    };
    let storage = Storage::open(directory.path(), config).expect("reopen");
    let log = storage.open_log("t").expect("log");
    let sealed = segment_files(directory.path())
        .into_iter()
        .find(|path| std::fs::metadata(path).expect("metadata").len() > 1_000_000)
        .expect("the sealed segment");
    let length = std::fs::metadata(&sealed).expect("metadata").len();
    // Cut in the middle of the record of entry 150: 99 records of 1,024 bytes, a huge one and
    // 50 more come before.
    let cut = 64 + 99 * 1024 + 300_024 + 50 * 1024 + 500;
    assert!(cut < length);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&sealed)
        .expect("open the segment")
        .set_len(cut)
        .expect("cut");
    // Well before the cut (more than a read's 128 KiB chunk): whole.
    let entries = log.read_from(positions[20], 20, usize::MAX).expect("read");
    assert_eq!(entries.len(), 20);
    for (offset, entry) in entries.iter().enumerate() {
        assert_eq!(entry.data, labelled("e", 20 + offset as u64, 1000));
    }
    // Across the cut: an error, whatever the budget.
    assert!(log.read_from(positions[140], 100, usize::MAX).is_err());
    assert!(log.read(positions[200]).is_err());
}

/// A read that kept the head of a huge record from its first chunk and reads the rest of it
/// after a trim recycled the file (a new segment written over it) must not serve the record
/// (head of one life, tail of another) nor take it for corruption: it fails as a read of
/// trimmed entries does.
#[test]
fn the_rest_of_a_record_read_after_its_file_was_recycled_is_not_served() {
    const SMALL: usize = 100;
    const LARGE: usize = 300 * 1024;
    const FILLER: usize = 50 * 1024;
    let config = StorageConfig {
        // Segment 1's entries fill 324 KiB of it, and six filler entries fill a segment.
        segment_max_bytes: 340 * 1024,
        entry_max_bytes: LARGE,
        cache_max_bytes: 0,
        flush_threads: 1,
        trim_interval: Duration::from_secs(3600),
        cursor_persist_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    };
    let sim = SimIo::new();
    let gate = GatedIo::new(sim.clone());
    let storage = Storage::open_with_io("/data", config, gate.clone()).expect("open");
    let log = storage.open_log("t").expect("log");
    let append = |data: Bytes| {
        log.append(data, 1_000)
            .expect("append")
            .wait()
            .expect("durable")
    };
    // Segment 1: 200 small entries, then a large one (the mean record, 1.6 KiB, says nothing
    // of it); the next entry starts segment 2 and seals segment 1.
    let mut positions: Vec<Position> = (0..200)
        .map(|index| append(labelled("small", index, SMALL)))
        .collect();
    positions.push(append(labelled("large", 200, LARGE)));
    append(labelled("filler", 0, FILLER));
    let first_segment = {
        let mut segments: Vec<std::path::PathBuf> = sim
            .paths()
            .into_iter()
            .filter(|path| path.to_string_lossy().ends_with(".segment"))
            .collect();
        segments.sort();
        segments[0].clone()
    };
    // The read of the large entry: its first read (a chunk from the indexed entry 192 on) gets
    // the head of the large record; its second read gets the rest.
    let (first_reached, first_release) = gate.arm_exactly("read", &first_segment);
    let reader = {
        let log = log.clone();
        let position = positions[200];
        std::thread::spawn(move || log.read_from(position, 1, usize::MAX))
    };
    // (Bounds only so that a failure cannot hang the test run.)
    first_reached
        .recv_timeout(Duration::from_secs(60))
        .expect("the first read");
    let (second_reached, second_release) = gate.arm_exactly("read", &first_segment);
    first_release.send(()).expect("release the first read");
    second_reached
        .recv_timeout(Duration::from_secs(60))
        .expect("the second read: the record's rest");
    // Segment 1 is trimmed into a free file; segment 2 fills, and segment 3 is written into
    // segment 1's file, over the large record.
    log.trim().expect("trim");
    for index in 1..16 {
        append(labelled("filler", index, FILLER));
    }
    assert!(
        !sim.paths()
            .iter()
            .any(|path| path.to_string_lossy().ends_with(".free")),
        "the free file was reused: {:?}",
        sim.paths()
    );
    second_release.send(()).expect("release the second read");
    let read = reader.join().expect("reader");
    match &read {
        Ok(entries) => assert!(entries.is_empty(), "trimmed entries served: {entries:?}"),
        Err(error) => assert!(
            error.to_string().contains("trimmed"),
            "not the error of a trimmed read: {error}"
        ),
    }
    assert!(log.corruption().is_none(), "{:?}", log.corruption());
}
