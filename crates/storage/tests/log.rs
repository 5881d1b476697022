//! Appends, reads, positions, segments, the publish-time index and restarts, on the real file
//! system.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{Position, Storage, StorageConfig, StorageError};

fn small_segments() -> StorageConfig {
    StorageConfig {
        segment_max_bytes: 4096,
        entry_max_bytes: 1024,
        pending_max_bytes_per_log: 1 << 20,
        ..StorageConfig::default()
    }
}

fn append_all(
    log: &std::sync::Arc<meridian_storage::Log>,
    payloads: &[Bytes],
    publish_time_ms: u64,
) -> Vec<Position> {
    let pending: Vec<_> = payloads
        .iter()
        .map(|payload| {
            log.append(payload.clone(), publish_time_ms)
                .expect("append")
        })
        .collect();
    pending
        .into_iter()
        .map(|append| append.wait().expect("durable"))
        .collect()
}

#[test]
fn entries_come_back_byte_exact_in_order_across_segments_and_restarts() {
    let directory = tempfile::tempdir().expect("tempdir");
    let payloads: Vec<Bytes> = (0..200u32)
        .map(|index| {
            Bytes::from(format!(
                "entry {index} {}",
                "x".repeat(index as usize % 300)
            ))
        })
        .collect();
    let first_ledger;
    let positions;
    {
        let storage = Storage::open(directory.path(), small_segments()).expect("open");
        let log = storage
            .open_log("persistent://public/default/t")
            .expect("log");
        first_ledger = log.current_ledger_id();
        positions = append_all(&log, &payloads, 1_000);
        assert!(
            log.stats().segments > 5,
            "small segments roll: {:?}",
            log.stats()
        );
        // Positions are dense within the ledger.
        for (index, position) in positions.iter().enumerate() {
            assert_eq!(*position, Position::new(first_ledger, index as u64));
        }
        let read = log
            .read_from(positions[0], usize::MAX, usize::MAX)
            .expect("read");
        assert_eq!(
            read.iter()
                .map(|entry| entry.data.clone())
                .collect::<Vec<_>>(),
            payloads
        );
        storage.close().expect("close");
    }
    let storage = Storage::open(directory.path(), small_segments()).expect("reopen");
    let log = storage
        .open_log("persistent://public/default/t")
        .expect("log");
    assert!(
        log.current_ledger_id() > first_ledger,
        "a new ledger on every open"
    );
    // Cold reads (nothing cached after a restart), one by one and as ranges.
    for (position, payload) in positions.iter().zip(&payloads) {
        assert_eq!(&log.read(*position).expect("read").data, payload);
    }
    let mut gathered = Vec::new();
    let mut next = log.first_position().expect("first");
    loop {
        let batch = log.read_from(next, 7, 2_000).expect("read range");
        let Some(last) = batch.last() else { break };
        next = log.next_position(last.position);
        gathered.extend(batch.into_iter().map(|entry| entry.data));
    }
    assert_eq!(gathered, payloads);
    // New appends continue after the old ones, in the new ledger.
    let more = append_all(&log, &[Bytes::from_static(b"after restart")], 2_000);
    assert_eq!(more[0], Position::new(log.current_ledger_id(), 0));
    assert_eq!(log.next_position(*positions.last().expect("last")), more[0]);
    assert_eq!(log.previous_position(more[0]), positions.last().copied());
    assert_eq!(log.last_position(), Some(more[0]));
    assert_eq!(
        storage.log_names().expect("names"),
        vec!["persistent://public/default/t".to_string()]
    );
}

#[test]
fn limits_are_enforced_with_clear_errors() {
    let directory = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(directory.path(), small_segments()).expect("open");
    let log = storage.open_log("limits").expect("log");
    let error = log
        .append(Bytes::from(vec![0u8; 1025]), 0)
        .expect_err("too large");
    assert!(
        matches!(
            error,
            StorageError::EntryTooLarge {
                size: 1025,
                max: 1024
            }
        ),
        "{error}"
    );
    assert!(log
        .append(Bytes::from(vec![0u8; 1024]), 0)
        .expect("fits")
        .wait()
        .is_ok());
    let error = storage.open_log("").expect_err("empty name");
    assert!(matches!(error, StorageError::InvalidName { .. }), "{error}");
    let error = storage.open_log(&"n/".repeat(100)).expect_err("long name");
    assert!(matches!(error, StorageError::InvalidName { .. }), "{error}");
    let bad = StorageConfig {
        segment_max_bytes: 100,
        ..StorageConfig::default()
    };
    let error = Storage::open(directory.path().join("bad"), bad)
        .err()
        .expect("invalid config");
    assert!(error.to_string().contains("segment_max_bytes"), "{error}");
}

#[test]
fn seek_by_publish_time_finds_the_first_entry_at_or_after() {
    let directory = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(directory.path(), small_segments()).expect("open");
    let log = storage.open_log("times").expect("log");
    let mut positions = Vec::new();
    for index in 0..300u64 {
        // Publish times rise by 10 ms per entry, with a little disorder like real clients.
        let time = 10_000 + index * 10 - if index % 7 == 3 { 15 } else { 0 };
        positions.push(
            log.append(Bytes::from(vec![1u8; 50]), time)
                .expect("append"),
        );
    }
    let positions: Vec<Position> = positions
        .into_iter()
        .map(|append| append.wait().expect("durable"))
        .collect();
    let times: Vec<u64> = (0..300u64)
        .map(|index| 10_000 + index * 10 - if index % 7 == 3 { 15 } else { 0 })
        .collect();
    for target in [
        0, 9_999, 10_000, 10_001, 10_995, 11_000, 12_345, 12_990, 12_991,
    ] {
        let expected = times
            .iter()
            .position(|time| *time >= target)
            .map(|index| positions[index]);
        assert_eq!(
            log.find_by_publish_time(target).expect("find"),
            expected,
            "target {target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailing_readers_wake_up_when_entries_land() {
    let directory = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(directory.path(), StorageConfig::default()).expect("open");
    let log = storage.open_log("tail").expect("log");
    let waiter = {
        let log = log.clone();
        tokio::spawn(async move {
            log.wait_for_entry_after(None).await;
            log.read_from(log.first_position().expect("first"), 10, usize::MAX)
                .expect("read")
        })
    };
    let position = log
        .append(Bytes::from_static(b"hello"), 1)
        .expect("append")
        .await
        .expect("durable");
    let entries = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("woken")
        .expect("task");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].position, position);
    assert_eq!(&entries[0].data[..], b"hello");
    // Served from memory: the entry is in the cache.
    assert_eq!(log.stats().entries_cached, 1);
}

#[test]
fn concurrent_appenders_share_fsyncs() {
    let directory = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(directory.path(), StorageConfig::default()).expect("open");
    let log = storage.open_log("group-commit").expect("log");
    let threads: Vec<_> = (0..16)
        .map(|thread| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut positions = Vec::new();
                for index in 0..50 {
                    let payload = Bytes::from(format!("{thread}-{index}"));
                    positions.push(
                        log.append(payload, 0)
                            .expect("append")
                            .wait()
                            .expect("durable"),
                    );
                }
                positions
            })
        })
        .collect();
    let mut all: Vec<Position> = threads
        .into_iter()
        .flat_map(|thread| thread.join().expect("join"))
        .collect();
    let stats = log.stats();
    assert_eq!(stats.entries_appended, 800);
    assert!(
        stats.flushes < 800,
        "group commit: {} flushes for 800 appends",
        stats.flushes
    );
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 800, "every append got its own position");
}

#[test]
fn a_log_created_again_never_reuses_a_position_of_its_deleted_predecessor() {
    let root = tempfile::tempdir().expect("tempdir");
    let payloads: Vec<Bytes> = (0..20u8)
        .map(|index| Bytes::from(vec![index; 300]))
        .collect();
    let old_last = {
        let storage = Storage::open(root.path(), small_segments()).expect("open");
        // Several opens: the log's ledger ids climb.
        for _ in 0..3 {
            let log = storage.open_log("topic").expect("log");
            append_all(&log, &payloads, 1);
            storage.close_log("topic").expect("close");
        }
        let last = storage
            .open_log("topic")
            .expect("log")
            .last_position()
            .expect("entries");
        storage.delete_log("topic").expect("delete");
        storage.close().expect("close");
        last
    };
    // Created again, after a restart too: its positions start above every old one.
    let storage = Storage::open(root.path(), small_segments()).expect("reopen");
    let log = storage.open_log("topic").expect("log");
    let first_new = append_all(&log, &payloads[..1], 1)[0];
    assert!(
        first_new > old_last,
        "new position {first_new} does not follow the deleted log's {old_last}"
    );
    storage.close().expect("close");
}

#[test]
fn concurrent_opens_of_one_log_share_one_recovery_and_other_logs_open_meanwhile() {
    // Opens no longer hold the engine-wide registry lock while recovering; opens of the same
    // log must still be serialized (one recovery, one `Log`), and opens of others must work.
    let root = tempfile::tempdir().expect("tempdir");
    let payloads: Vec<Bytes> = (0..50u8)
        .map(|index| Bytes::from(vec![index; 300]))
        .collect();
    {
        let storage = Storage::open(root.path(), small_segments()).expect("open");
        append_all(&storage.open_log("shared").expect("log"), &payloads, 1);
        storage.close().expect("close");
    }
    let storage = Arc::new(Storage::open(root.path(), small_segments()).expect("reopen"));
    let start = Arc::new(std::sync::Barrier::new(8));
    let openers: Vec<_> = (0..8)
        .map(|index| {
            let (storage, start) = (storage.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let other = storage
                    .open_log(&format!("other-{index}"))
                    .expect("other log");
                (storage.open_log("shared").expect("shared log"), other)
            })
        })
        .collect();
    let logs: Vec<_> = openers
        .into_iter()
        .map(|opener| opener.join().expect("opener"))
        .collect();
    for (shared, _) in &logs {
        assert!(Arc::ptr_eq(shared, &logs[0].0), "one log for all openers");
    }
    let ledger_id = logs[0].0.current_ledger_id();
    assert_eq!(
        logs[0].0.ledgers().last().map(|ledger| ledger.0),
        Some(ledger_id),
        "recovered once: one new ledger"
    );
    assert_eq!(
        logs[0].0.ledgers().len(),
        2,
        "the old ledger and one new one"
    );
    assert_eq!(storage.log_names().expect("names").len(), 9);
}

#[test]
fn a_log_with_the_longest_accepted_name_can_be_deleted() {
    // The tombstone a deleted log's directory is renamed to must itself fit a file name
    // (255 bytes on ext4, xfs, tmpfs), or such a log could be created but never deleted.
    let root = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(root.path(), small_segments()).expect("open");
    for length in [240, 250] {
        let name = "x".repeat(length);
        let log = storage.open_log(&name).expect("the name is accepted");
        append_all(&log, &[Bytes::from_static(b"entry")], 0);
        drop(log);
        storage.delete_log(&name).expect("delete_log");
        assert!(!storage.log_names().expect("names").contains(&name));
    }
}

#[test]
fn a_second_engine_cannot_open_a_data_directory_in_use() {
    // Two engines on one data directory would each start ledgers, append and trim on their
    // own: the second is refused with a clear error until the first is closed.
    let root = tempfile::tempdir().expect("tempdir");
    let first = Storage::open(root.path(), small_segments()).expect("open");
    let second = Storage::open(root.path(), small_segments());
    assert!(
        matches!(second, Err(StorageError::DirectoryInUse { .. })),
        "{:?}",
        second.err()
    );
    first.close().expect("close");
    let again = Storage::open(root.path(), small_segments()).expect("open once it is free");
    again.close().expect("close");
}

/// Payload `index`: mostly small, some larger than the sparse index's byte step (64 KiB).
fn mixed_payload(index: u64) -> Bytes {
    let size = match index % 97 {
        0 => 150_000,
        1 => 70_000,
        other => (other * 37 % 900) as usize,
    };
    let mut bytes = format!("entry-{index}-").into_bytes();
    bytes.resize(bytes.len() + size, (index % 251) as u8);
    Bytes::from(bytes)
}

#[test]
fn sealed_segments_keep_a_sparse_index_and_serve_every_read_as_before() {
    // Memory per retained entry must not stay at one offset per entry: a sealed segment keeps
    // one offset per 64 entries (or 64 KiB), and reads scan forward from it. Every read (any
    // start, any entry and byte budget) returns exactly the entries the budget allows: while
    // the log is written (sealed segments and the dense active one, no cache) and after a
    // restart (every segment sealed).
    let directory = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig {
        segment_max_bytes: 2 * 1024 * 1024,
        entry_max_bytes: 200_000,
        pending_max_bytes_per_log: 64 << 20,
        cache_max_bytes: 0,
        ..StorageConfig::default()
    };
    let payloads: Vec<Bytes> = (0..3_000).map(mixed_payload).collect();
    let reads: Vec<(usize, usize, usize)> = (0..3_000)
        .step_by(7)
        .map(|start| {
            (
                start,
                1 + start % 150,
                [1, 900, 70_000, usize::MAX][start % 4],
            )
        })
        .collect();
    // What a read must return: entries from `start` until the entry budget is used or the
    // bytes read (records: 8 bytes of framing, 16 of entry header, the data) reach the limit.
    let expected = |positions: &[Position],
                    (start, max_entries, max_bytes): (usize, usize, usize)| {
        let mut bytes = 0usize;
        let mut entries = Vec::new();
        for index in start..payloads.len() {
            if entries.len() >= max_entries || (!entries.is_empty() && bytes >= max_bytes) {
                break;
            }
            bytes += 24 + payloads[index].len();
            entries.push((positions[index], payloads[index].clone()));
        }
        entries
    };
    let check = |log: &Arc<meridian_storage::Log>, positions: &[Position], when: &str| {
        for read in &reads {
            let actual: Vec<(Position, Bytes)> = log
                .read_from(positions[read.0], read.1, read.2)
                .expect("read")
                .into_iter()
                .map(|entry| (entry.position, entry.data))
                .collect();
            assert!(
                actual == expected(positions, *read),
                "read {read:?} {when}: {} entries, expected {}",
                actual.len(),
                expected(positions, *read).len()
            );
        }
    };
    let positions = {
        let storage = Storage::open(directory.path(), config.clone()).expect("open");
        let log = storage.open_log("t").expect("log");
        let positions = append_all(&log, &payloads, 1_000);
        check(&log, &positions, "while written");
        positions
    };
    let storage = Storage::open(directory.path(), config).expect("reopen");
    let log = storage.open_log("t").expect("log");
    let stats = log.stats();
    assert!(stats.segments > 3, "{stats:?}");
    check(&log, &positions, "after a restart");
    // Less than one byte of index per retained entry (it was 4, plus 0.25 of publish times).
    assert!(
        stats.index_bytes < payloads.len(),
        "index of {} bytes for {} entries",
        stats.index_bytes,
        payloads.len()
    );
}

#[test]
fn backlog_bytes_are_exact_from_any_entry_of_a_sealed_segment() {
    // A sealed segment keeps one offset per 64 entries or 64 KiB; the backlog in bytes after a
    // mark-delete position inside such a group must still count exactly the records after it
    // (backlog quotas refuse producers and evict entries by it). The old code counted from the
    // group's first entry: up to 64 KiB of acknowledged entries too. Entries of every size,
    // some whose record is exactly 64 KiB, so that groups end at both limits.
    let directory = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig {
        segment_max_bytes: 1024 * 1024,
        entry_max_bytes: 200_000,
        pending_max_bytes_per_log: 64 << 20,
        // No cursor: trimming would remove what is being measured.
        trim_interval: Duration::from_secs(3600),
        ..StorageConfig::default()
    };
    let record_len = |payload: &Bytes| 24 + payload.len() as u64;
    let payloads: Vec<Bytes> = (0..600u64)
        .map(|index| match index % 150 {
            // A record of exactly 64 KiB, and one more, so that a group ends at exactly 64
            // KiB and right after it.
            3 | 4 => Bytes::from(vec![7u8; 64 * 1024 - 24]),
            _ => mixed_payload(index),
        })
        .collect();
    let check = |log: &Arc<meridian_storage::Log>, positions: &[Position], when: &str| {
        let mut after: u64 = payloads.iter().map(record_len).sum();
        assert_eq!(log.bytes_after(None), after, "everything, {when}");
        for (index, position) in positions.iter().enumerate() {
            after -= record_len(&payloads[index]);
            assert_eq!(
                log.bytes_after(Some(*position)),
                after,
                "after entry {index}, {when}"
            );
        }
    };
    let positions = {
        let storage = Storage::open(directory.path(), config.clone()).expect("open");
        let log = storage.open_log("t").expect("log");
        let positions = append_all(&log, &payloads, 1_000);
        check(&log, &positions, "while written");
        positions
    };
    let storage = Storage::open(directory.path(), config).expect("reopen");
    let log = storage.open_log("t").expect("log");
    assert!(log.stats().segments > 3, "{:?}", log.stats());
    check(&log, &positions, "after a restart");
}

/// Entry `index` of a batch mixing small entries (copied into the write batch) with large ones
/// (written from the appended bytes) and empty ones.
fn batch_entry(index: u64) -> Bytes {
    let size = match index % 5 {
        0 => 0,
        1 => 4096,
        2 => 4097,
        3 => 9_000 + index as usize,
        _ => (index * 13 % 300) as usize,
    };
    Bytes::from(
        (0..size)
            .map(|offset| (offset as u64 * 31 + index) as u8)
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn batches_of_thousands_of_small_and_large_entries_are_stored_byte_exact() {
    // Appended without waiting, these form batches that mix entries copied into the batch
    // with entries written from the appended bytes: every entry must land whole, in order,
    // and pass its checksum on the way back from the file after a restart.
    let directory = tempfile::tempdir().expect("tempdir");
    let config = StorageConfig {
        pending_max_bytes_per_log: 64 << 20,
        ..StorageConfig::default()
    };
    let payloads: Vec<Bytes> = (0..3000).map(batch_entry).collect();
    let first;
    {
        let storage = Storage::open(directory.path(), config.clone()).expect("open");
        let log = storage
            .open_log("persistent://public/default/b")
            .expect("log");
        first = append_all(&log, &payloads, 7)[0];
        assert!(
            log.stats().flushes < payloads.len() as u64 / 10,
            "appends share batches: {:?}",
            log.stats()
        );
        storage.close().expect("close");
    }
    let storage = Storage::open(directory.path(), config).expect("reopen");
    let log = storage
        .open_log("persistent://public/default/b")
        .expect("log");
    let read = log.read_from(first, usize::MAX, usize::MAX).expect("read");
    assert_eq!(read.len(), payloads.len());
    for (entry, payload) in read.iter().zip(&payloads) {
        assert_eq!(&entry.data, payload, "entry {}", entry.position);
        assert_eq!(entry.publish_time_ms, 7);
    }
    storage.close().expect("close");
}

#[test]
fn a_checksum_handed_over_with_an_entry_is_stored_as_if_computed_and_a_wrong_one_is_caught() {
    use meridian_storage::KnownChecksum;
    let directory = tempfile::tempdir().expect("tempdir");
    let entry = |index: u8| Bytes::from(vec![index; 10_000 + usize::from(index)]);
    let known = |data: &Bytes, offset: usize| KnownChecksum {
        offset,
        crc32c: crc32c::crc32c(&data[offset..]),
    };
    let first;
    {
        let storage = Storage::open(directory.path(), StorageConfig::default()).expect("open");
        let good = storage
            .open_log("persistent://public/default/good")
            .expect("log");
        let mut pending = Vec::new();
        for (index, offset) in [0usize, 6, 9_999].into_iter().enumerate() {
            let data = entry(index as u8);
            let checksum = known(&data, offset);
            pending.push(
                good.append_with_checksum(data, 5, Some(checksum))
                    .expect("append"),
            );
        }
        first = pending
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect::<Vec<_>>()[0];
        let bad = storage
            .open_log("persistent://public/default/bad")
            .expect("log");
        let data = entry(1);
        let wrong = KnownChecksum {
            offset: 6,
            crc32c: known(&data, 6).crc32c ^ 1,
        };
        bad.append_with_checksum(data, 5, Some(wrong))
            .expect("append")
            .wait()
            .expect("durable");
        storage.close().expect("close");
    }
    let storage = Storage::open(directory.path(), StorageConfig::default()).expect("reopen");
    let good = storage
        .open_log("persistent://public/default/good")
        .expect("log");
    let read = good.read_from(first, usize::MAX, usize::MAX).expect("read");
    assert_eq!(
        read.iter()
            .map(|entry| entry.data.clone())
            .collect::<Vec<_>>(),
        (0..3).map(entry).collect::<Vec<_>>()
    );
    let bad = storage.open_log("persistent://public/default/bad");
    let read = bad.and_then(|bad| {
        let first = Position::new(bad.current_ledger_id(), 0);
        bad.read_from(first, usize::MAX, usize::MAX)
    });
    assert!(
        !matches!(&read, Ok(entries) if !entries.is_empty()),
        "a record whose checksum does not match its bytes is never served: {read:?}"
    );
    storage.close().expect("close");
}
