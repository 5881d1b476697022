//! What a read of sealed segments costs in bytes read from disk: a consumer catching up on a
//! backlog of large entries (a full batch of 128 messages of 1 KiB is a 132 KiB entry) should
//! read each record once, not once for its framing and again for its body.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{Position, Storage, StorageConfig};
use support::gated_io::GatedIo;

const ENTRY_BYTES: usize = 132 * 1024;
const ENTRIES: u64 = 60;

fn config() -> StorageConfig {
    StorageConfig {
        segment_max_bytes: 4 * 1024 * 1024,
        entry_max_bytes: 200_000,
        pending_max_bytes_per_log: 64 << 20,
        // Nothing cached: every read goes to the files.
        cache_max_bytes: 0,
        // No cursor: retention would trim the entries while the test reads them.
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn payload(index: u64) -> Bytes {
    let mut bytes = format!("entry-{index}-").into_bytes();
    bytes.resize(ENTRY_BYTES, (index % 251) as u8);
    Bytes::from(bytes)
}

/// A log of `ENTRIES` large entries written and the engine reopened (every segment sealed):
/// the gated file system, the reopened engine and the entries' positions.
fn sealed_log() -> (Arc<GatedIo>, Storage, Vec<Position>) {
    support::gated_io::sealed_log(config(), "t", (0..ENTRIES).map(payload))
}

#[test]
fn a_catch_up_read_reads_each_record_of_a_sealed_segment_once() {
    let (io, storage, positions) = sealed_log();
    let log = storage.open_log("t").expect("log");
    assert!(log.stats().segments >= 2, "{:?}", log.stats());
    // As the dispatcher reads: up to 100 entries and 5 MiB at a time, or fewer entries when
    // the consumer's permits take fewer (8 batches for 1,000 permits), or one.
    for max_entries in [100, 8, 1] {
        let before = io.bytes_read();
        let mut next = positions[0];
        let mut read = Vec::new();
        while read.len() < positions.len() {
            let entries = log
                .read_from(next, max_entries, 5 * 1024 * 1024)
                .expect("read");
            let last = entries.last().expect("entries left").position;
            read.extend(entries);
            next = Position::new(last.ledger_id, last.entry_id + 1);
            if !positions.contains(&next) {
                // The next segment starts a ledger of its own.
                next = positions[read.len().min(positions.len() - 1)];
            }
        }
        for (index, entry) in read.iter().enumerate() {
            assert_eq!(entry.position, positions[index]);
            assert!(entry.data == payload(index as u64), "entry {index}");
        }
        let bytes_read = io.bytes_read() - before;
        let records = ENTRIES * (ENTRY_BYTES as u64 + 24);
        assert!(
            bytes_read < records + records / 10,
            "{bytes_read} bytes read for {records} bytes of records, {max_entries} entries a read"
        );
    }
}

#[test]
fn a_read_of_one_entry_reads_about_one_record() {
    let (io, storage, positions) = sealed_log();
    let log = storage.open_log("t").expect("log");
    for index in [0, 1, 17, 30, 59] {
        let before = io.bytes_read();
        let entry = log.read(positions[index]).expect("read");
        assert!(entry.data == payload(index as u64), "entry {index}");
        let bytes_read = io.bytes_read() - before;
        assert!(
            bytes_read < (ENTRY_BYTES + ENTRY_BYTES / 2) as u64,
            "{bytes_read} bytes read for entry {index} of {ENTRY_BYTES} bytes"
        );
    }
}

/// A sealed log of 2,000 unbatched messages of about 1 KiB: the file system, the reopened
/// engine and the positions.
fn sealed_log_of_small_entries() -> (Arc<GatedIo>, Storage, Vec<Position>) {
    let messages = (0..2_000u64).map(|index| {
        let mut bytes = format!("message-{index}-").into_bytes();
        bytes.resize(1_000, (index % 251) as u8);
        Bytes::from(bytes)
    });
    support::gated_io::sealed_log(config(), "small", messages)
}

#[test]
fn redelivered_runs_of_small_entries_are_read_together() {
    // A dispatcher's replay set (messages of a consumer that left, negatively acknowledged,
    // or read beyond the permits) is read by position: 100 consecutive small entries must not
    // cost 100 reads of a large chunk each.
    let (io, storage, positions) = sealed_log_of_small_entries();
    let log = storage.open_log("small").expect("log");
    let wanted: Vec<Position> = positions[500..600]
        .iter()
        .chain(&positions[1200..1210])
        .copied()
        .collect();
    let before = io.bytes_read();
    let entries = log.read_positions(&wanted).expect("read");
    let bytes_read = io.bytes_read() - before;
    let read: Vec<Position> = entries.iter().map(|entry| entry.position).collect();
    assert_eq!(read, wanted);
    let records = wanted.len() as u64 * (1_000 + 24);
    assert!(
        bytes_read < 2 * records + 64 * 1024,
        "{bytes_read} bytes read for {records} bytes of records"
    );
    // One small entry alone: not a chunk of 128 KiB.
    let before = io.bytes_read();
    let entry = log.read(positions[1_500]).expect("read");
    assert!(entry.data.starts_with(b"message-1500-"));
    let bytes_read = io.bytes_read() - before;
    assert!(
        bytes_read <= 64 * 1024,
        "{bytes_read} bytes read for one entry of 1 KiB"
    );
}

/// The dispatcher takes cached entries on its own thread and sends only reads from the files
/// to a blocking thread: a cache-only read must return exactly what a read returns when every
/// entry it reads is cached, and touch no file otherwise.
#[test]
fn a_cache_only_read_returns_cached_entries_and_never_reads_a_file() {
    let io = GatedIo::new(meridian_storage::SimIo::new());
    let storage = Storage::open_with_io(
        "/data",
        StorageConfig {
            // Room for the newest 8 entries only.
            cache_max_bytes: 8 * (ENTRY_BYTES as u64 + 64),
            ..config()
        },
        io.clone(),
    )
    .expect("open");
    let log = storage.open_log("t").expect("log");
    let appends: Vec<_> = (0..20)
        .map(|index| log.append(payload(index), 1_000).expect("append"))
        .collect();
    let positions: Vec<Position> = appends
        .into_iter()
        .map(|append| append.wait().expect("durable"))
        .collect();
    let before = io.bytes_read();

    // The newest entries are cached: the same entries as a read, without reading a file.
    let newest = &positions[14..];
    let cached = log
        .read_from_cached(newest[0], 100, usize::MAX)
        .expect("read")
        .expect("all cached");
    assert_eq!(
        cached
            .iter()
            .map(|entry| entry.position)
            .collect::<Vec<_>>(),
        newest
    );
    assert!(cached
        .iter()
        .zip(14..)
        .all(|(entry, index)| entry.data == payload(index)));
    let replayed = log
        .read_positions_cached(&[newest[0], newest[2], newest[3]])
        .expect("read")
        .expect("all cached");
    assert_eq!(replayed.len(), 3);
    assert_eq!(io.bytes_read(), before, "a cached read read a file");

    // The oldest were evicted: a cache-only read of a range or of positions that includes one
    // of them reads nothing, and says so; the ordinary read then reads them from the file.
    assert!(log
        .read_from_cached(positions[0], 100, usize::MAX)
        .expect("read")
        .is_none());
    assert!(log
        .read_positions_cached(&[positions[0], newest[0]])
        .expect("read")
        .is_none());
    assert_eq!(io.bytes_read(), before, "a cache-only read read a file");
    let all = log.read_from(positions[0], 100, usize::MAX).expect("read");
    assert_eq!(all.len(), positions.len());
    assert!(io.bytes_read() > before);
}
