//! Review of the sealed-segment read-ahead (a read fetches what its budget is expected to need,
//! estimated at the segment's mean record size): reads whose estimate the mean misleads must
//! still return exactly the entries asked for and not fetch megabytes they do not return.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{Position, SimIo, Storage, StorageConfig};
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
    let io = GatedIo::new(SimIo::new());
    let positions = {
        let storage = Storage::open_with_io("/data", config(), io.clone()).expect("open");
        let log = storage.open_log("t").expect("log");
        let appends: Vec<_> = (0..HUGE_ENTRIES + TINY_ENTRIES)
            .map(|index| log.append(payload(index), 1_000).expect("append"))
            .collect();
        let positions = appends
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect();
        drop(log);
        storage.close().expect("close");
        positions
    };
    let storage = Storage::open_with_io("/data", config(), io.clone()).expect("reopen");
    (io, storage, positions)
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
