//! Review of the cache-only reads (`Log::read_from_cached`, `Log::read_positions_cached`), which
//! the dispatcher makes on an async worker: whenever one returns entries they must be exactly
//! what the ordinary read returns, and whenever an entry would come from a file it must read
//! nothing and say so. Ranges across segments and ledgers, starts before the first entry and
//! after the last, byte budgets, reads ending in entries not yet durable, replay sets with gaps,
//! duplicates and several ledgers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{Log, Position, SimIo, Storage, StorageConfig};
use support::gated_io::GatedIo;

const ENTRY_BYTES: usize = 1000;
/// Entries the cache has room for (the newest).
const CACHED: usize = 8;

fn config() -> StorageConfig {
    StorageConfig {
        // About five entries a segment: every range crosses segments.
        segment_max_bytes: 5 * (ENTRY_BYTES as u64 + 64),
        entry_max_bytes: 2 * ENTRY_BYTES,
        cache_max_bytes: (CACHED * ENTRY_BYTES) as u64,
        // No cursor: retention would trim the entries while the test reads them.
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    }
}

fn payload(index: usize) -> Bytes {
    let mut bytes = format!("entry-{index}-").into_bytes();
    bytes.resize(ENTRY_BYTES, (index % 251) as u8);
    Bytes::from(bytes)
}

fn append_each(log: &Arc<Log>, indexes: std::ops::Range<usize>) -> Vec<Position> {
    indexes
        .map(|index| {
            log.append(payload(index), 1_000 + index as u64)
                .expect("append")
                .wait()
                .expect("durable")
        })
        .collect()
}

/// Every range read the cache-only way is the ordinary read when it returns entries, reads no
/// file when it does not, and returns entries for every range within the cached entries.
fn check_ranges(io: &GatedIo, log: &Log, starts: &[Position], cached_from: usize) {
    for (at, &start) in starts.iter().enumerate() {
        for max_entries in [1, 3, 100] {
            for max_bytes in [1, ENTRY_BYTES * 5 / 2, usize::MAX] {
                let before = io.bytes_read();
                let cached = log
                    .read_from_cached(start, max_entries, max_bytes)
                    .expect("cache-only read");
                assert_eq!(io.bytes_read(), before, "a cache-only read read a file");
                let read = log.read_from(start, max_entries, max_bytes).expect("read");
                match cached {
                    Some(cached) => assert_eq!(
                        cached, read,
                        "from {start} ({max_entries} entries, {max_bytes} bytes)"
                    ),
                    None => assert!(
                        at < cached_from,
                        "from {start}, every entry cached, and the cache-only read gave up"
                    ),
                }
            }
        }
    }
}

#[test]
fn cache_only_reads_are_the_ordinary_reads_whenever_they_return_entries() {
    let io = GatedIo::new(SimIo::new());
    // Two ledgers: the first written before a reopen (nothing of it cached), the second after.
    let first_ledger = {
        let storage = Storage::open_with_io("/data", config(), io.clone()).expect("open");
        let log = storage.open_log("t").expect("log");
        let positions = append_each(&log, 0..12);
        drop(log);
        storage.close().expect("close");
        positions
    };
    let storage = Storage::open_with_io("/data", config(), io.clone()).expect("reopen");
    let log = storage.open_log("t").expect("log");
    // Empty range: nothing after the last entry yet.
    let end = log.end_position();
    assert_eq!(
        log.read_from_cached(end, 100, usize::MAX).expect("read"),
        Some(Vec::new())
    );
    let second_ledger = append_each(&log, 12..32);
    assert!(log.stats().segments >= 6, "{:?}", log.stats());
    let positions: Vec<Position> = first_ledger.iter().chain(&second_ledger).copied().collect();
    let cached_from = positions.len() - CACHED;

    // Every start: before the first entry, each entry, the end of each ledger, after the last.
    let mut starts = vec![Position::new(0, 0)];
    starts.extend(positions.iter().copied());
    let after_first_ledger = first_ledger[first_ledger.len() - 1];
    starts.insert(
        first_ledger.len() + 1,
        Position::new(
            after_first_ledger.ledger_id,
            after_first_ledger.entry_id + 1,
        ),
    );
    let last = positions[positions.len() - 1];
    starts.push(Position::new(last.ledger_id, last.entry_id + 1));
    // (`starts[at]` for at >= cached_from + 2 is cached or past the end.)
    check_ranges(&io, &log, &starts, cached_from + 2);

    // Replay sets: runs, gaps, duplicates, within the cached entries and across ledgers.
    let cached = &positions[cached_from..];
    let sets: Vec<Vec<Position>> = vec![
        cached.to_vec(),
        vec![cached[0], cached[2], cached[3], cached[7]],
        vec![cached[1], cached[1], cached[2]],
        vec![cached[7], Position::new(last.ledger_id, last.entry_id + 5)],
        vec![positions[0], cached[0]],
        vec![first_ledger[11], second_ledger[0], cached[5]],
        vec![Position::new(0, 0), cached[4]],
        Vec::new(),
    ];
    for set in &sets {
        let before = io.bytes_read();
        let from_cache = log.read_positions_cached(set).expect("cache-only read");
        assert_eq!(io.bytes_read(), before, "a cache-only read read a file");
        let read = log.read_positions(set).expect("read");
        // (A position before the first entry reads the first entry, from its file, to find
        // that it does not exist.)
        let all_cached = set
            .iter()
            .all(|position| cached.contains(position) || *position > last);
        match from_cache {
            Some(from_cache) => assert_eq!(from_cache, read, "{set:?}"),
            None => assert!(!all_cached, "{set:?}: every entry cached, and it gave up"),
        }
    }

    // Entries appended and cached but not durable yet: a read stops before them, both ways.
    let (reached, release) = io.arm("write", "");
    let pending: Vec<_> = (32..35)
        .map(|index| log.append(payload(index), 1_000).expect("append"))
        .collect();
    reached.recv().expect("the flush reached its write");
    assert_eq!(log.last_position(), Some(last));
    let newest = &positions[positions.len() - 3..];
    for start in newest {
        let cached = log
            .read_from_cached(*start, 100, usize::MAX)
            .expect("cache-only read")
            .expect("cached");
        assert_eq!(
            cached,
            log.read_from(*start, 100, usize::MAX).expect("read")
        );
        assert_eq!(cached.last().map(|entry| entry.position), Some(last));
    }
    let past = pending[0].position();
    assert_eq!(
        log.read_from_cached(past, 100, usize::MAX).expect("read"),
        Some(Vec::new())
    );
    assert_eq!(
        log.read_positions_cached(&[last, past])
            .expect("read")
            .expect("cached"),
        log.read_positions(&[last, past]).expect("read")
    );
    drop(release);
    for append in pending {
        append.wait().expect("durable");
    }
}
