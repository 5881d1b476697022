//! Attacks on recycled segment files (a trimmed segment's file kept as `*.free` and written
//! into again): power cuts that keep part of what was written into a recycled file, the
//! summary of a log that is not open, and reads racing a trim that recycles the file they read.

mod support;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meridian_storage::{CrashMode, FlushPolicy, Io, Log, Position, SimIo, Storage, StorageConfig};
use support::gated_io::GatedIo;

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
    append_sized(log, run, indexes, PAYLOAD_LEN);
}

fn append_sized(log: &Arc<Log>, run: &str, indexes: std::ops::Range<u64>, len: usize) {
    for index in indexes {
        let mut data = payload(run, index).to_vec();
        data.resize(len, b'.');
        log.append(Bytes::from(data), index)
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

    // After a clean close that cut the newest segment, a recycled one, after its seal: its
    // earlier life is gone, and a seal ends the walk.
    append(&log, "third", 0..30);
    log.trim().expect("trim");
    append(&log, "fourth", 0..5);
    assert_eq!(count_files(&crashed_again, ".free"), 1);
    let expected = read_all(&log).len() as u64;
    drop(log);
    storage.close().expect("close");
    let root = tempfile::tempdir().expect("tempdir");
    copy_to_disk(&crashed_again, root.path());
    let summary = meridian_storage::closed_log::summarize_closed_log(root.path(), "t")
        .expect("summary")
        .expect("the log exists");
    assert_eq!(summary.entries, expected, "{summary:?}");
}

fn gated_storage(config: StorageConfig) -> (SimIo, Arc<GatedIo>, Storage) {
    let sim = SimIo::new();
    let gate = GatedIo::new(sim.clone());
    let storage = Storage::open_with_io(Path::new("/data"), config, gate.clone()).expect("open");
    (sim, gate, storage)
}

fn segment_files(io: &SimIo) -> Vec<PathBuf> {
    let mut segments: Vec<PathBuf> = io
        .paths()
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(".segment"))
        .collect();
    segments.sort();
    segments
}

/// A read of a sealed segment that opened its file just before a trim kept the file for reuse
/// and the log wrote a new segment into it reads that new segment's bytes. It must fail as a
/// read of trimmed entries does, and the log must not take those bytes for corruption (which
/// refuses every read and append until the log is reopened).
#[test]
fn a_read_of_a_segment_recycled_meanwhile_does_not_mark_the_log_corrupted() {
    // No cache: reads go to the files.
    let (sim, gate, storage) = gated_storage(StorageConfig {
        cache_max_bytes: 0,
        ..config(10)
    });
    let log = storage.open_log("t").expect("log");
    // Entries 0..10, 10..20, 20..30: the first two segments are sealed.
    append(&log, "first", 0..30);
    let (reached, release) = gate.arm_exactly("read", &segment_files(&sim)[0]);
    let ledger = log.current_ledger_id();
    // From entry 5: the read walks the record headers of entries 0..5 first.
    let reader = {
        let log = log.clone();
        std::thread::spawn(move || log.read_from(Position::new(ledger, 5), 5, usize::MAX))
    };
    // (A bound only so that a failure cannot hang the test run.)
    reached
        .recv_timeout(Duration::from_secs(60))
        .expect("the read opened the first segment");
    // Both sealed segments are trimmed into free files; smaller entries fill the one that was
    // 10..20 (14 of them) and the 15th starts a segment in the file being read.
    log.trim().expect("trim");
    append_sized(&log, "second", 30..45, 60);
    assert_eq!(count_files(&sim, ".free"), 0, "{:?}", sim.paths());
    release.send(()).expect("release");
    let read = reader.join().expect("reader");
    assert!(
        read.as_ref().map_or(true, |entries| entries.is_empty()),
        "trimmed entries served: {read:?}"
    );
    assert!(log.corruption().is_none(), "{:?}", log.corruption());
    append_sized(&log, "third", 0..1, 60);
    assert_eq!(read_all(&log).len(), 10 + 15 + 1);
}

/// The payload size of entry `index` of the crash workload (smaller, then larger entries than
/// the ones whose files they are written into).
fn workload_len(index: u64) -> usize {
    match index {
        0..30 => 100,
        30..50 => 60,
        50..60 => 140,
        _ => 100,
    }
}

fn workload_payload(index: u64) -> Bytes {
    let mut bytes = format!("{index}:").into_bytes();
    bytes.resize(workload_len(index), b'.');
    Bytes::from(bytes)
}

#[derive(Default)]
struct Told {
    /// (steps done when acknowledged, index)
    acknowledged: Vec<(u64, u64)>,
    /// (steps done when a trim began, the last index appended before it)
    trims: Vec<(u64, u64)>,
}

fn crash_config(flush_policy: FlushPolicy) -> StorageConfig {
    StorageConfig {
        flush_policy,
        ..config(10)
    }
}

/// Appends across rolls into free files, trims into free files twice, closes (seal, cut),
/// opens again and appends.
fn crash_workload(io: &SimIo, flush_policy: FlushPolicy) -> Told {
    let mut told = Told::default();
    let append = |told: &mut Told, log: &Arc<Log>, indexes: std::ops::Range<u64>| {
        for index in indexes {
            log.append(workload_payload(index), index)
                .expect("append")
                .wait()
                .expect("durable");
            told.acknowledged.push((io.operation_count(), index));
        }
    };
    let storage = open(io, crash_config(flush_policy));
    let log = storage.open_log("t").expect("log");
    append(&mut told, &log, 0..30);
    told.trims.push((io.operation_count(), 29));
    log.trim().expect("trim");
    assert_eq!(count_files(io, ".free"), 2);
    append(&mut told, &log, 30..50);
    assert_eq!(count_files(io, ".free"), 0, "both free files written into");
    told.trims.push((io.operation_count(), 49));
    log.trim().expect("trim");
    assert_eq!(count_files(io, ".free"), 2);
    append(&mut told, &log, 50..60);
    assert_eq!(count_files(io, ".free"), 1);
    drop(log);
    storage.close().expect("close");
    assert_eq!(count_files(io, ".free"), 0);
    let storage = open(io, crash_config(flush_policy));
    let log = storage.open_log("t").expect("log again");
    append(&mut told, &log, 60..70);
    drop(log);
    storage.close().expect("close");
    told
}

fn verify_crash(crashed: &SimIo, told: &Told, crash_point: u64, flush_policy: FlushPolicy) {
    let storage = Storage::open_with_io(
        Path::new("/data"),
        crash_config(flush_policy),
        Arc::new(crashed.clone()),
    )
    .expect("the data directory opens");
    let log = storage
        .open_log("t")
        .unwrap_or_else(|error| panic!("the log refuses to open: {error}"));
    let entries = read_all(&log);
    let mut previous: Option<u64> = None;
    let mut found = Vec::new();
    for data in &entries {
        let text = String::from_utf8_lossy(data);
        let index: u64 = text
            .split(':')
            .next()
            .and_then(|index| index.parse().ok())
            .unwrap_or_else(|| panic!("not an entry of the workload: {text}"));
        assert_eq!(*data, workload_payload(index), "entry {index} byte-exact");
        if let Some(previous) = previous {
            assert_eq!(previous + 1, index, "a gap after entry {previous}");
        }
        previous = Some(index);
        found.push(index);
    }
    if matches!(flush_policy, FlushPolicy::Fsync) {
        let trimmable = told
            .trims
            .iter()
            .filter(|(began, _)| *began <= crash_point)
            .map(|(_, last)| *last)
            .max();
        for (done, index) in &told.acknowledged {
            if *done <= crash_point && trimmable.is_none_or(|last| *index > last) {
                assert!(found.contains(index), "acknowledged entry {index} lost");
            }
        }
    }
    // The log goes on: appends, a clean close, an open.
    let next = previous.map_or(1000, |last| last + 1);
    log.append(workload_payload(next), 0)
        .expect("append after recovery")
        .wait()
        .expect("durable after recovery");
    drop(log);
    storage.close().expect("close");
    let storage = open(crashed, crash_config(flush_policy));
    let log = storage.open_log("t").expect("reopened");
    assert_eq!(read_all(&log).len(), entries.len() + 1);
    drop(log);
    storage.close().expect("close");
}

fn recycling_crash_at_every_step(flush_policy: FlushPolicy) {
    let steps = {
        let io = SimIo::new();
        crash_workload(&io, flush_policy);
        io.operation_count()
    };
    for crash_point in 0..=steps {
        for mode in [
            CrashMode::LoseUnsynced,
            CrashMode::TornPrefix,
            CrashMode::TornWithGarbage,
        ] {
            let io = SimIo::new();
            io.crash_before_operation(crash_point, mode, crash_point);
            let told = crash_workload(&io, flush_policy);
            let crashed = io
                .take_crashed()
                .unwrap_or_else(|| io.crash(mode, crash_point));
            // `verify_crash` changes what it opens; an exact copy for the second power cut.
            let before_recovery = crashed.crash(CrashMode::LoseUnsynced, 0);
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                verify_crash(&crashed, &told, crash_point, flush_policy)
            }));
            if let Err(panic) = outcome {
                eprintln!("power cut before step {crash_point} of {steps} ({mode:?})");
                std::panic::resume_unwind(panic);
            }
            // A second power cut before each step of the recovery (truncating a recycled
            // tail, cutting a seal off, removing extra free files).
            let recovery_steps = {
                let probe = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                recover(&probe, flush_policy);
                probe.operation_count()
            };
            for second in 0..=recovery_steps {
                let copy = before_recovery.crash(CrashMode::LoseUnsynced, 0);
                copy.crash_before_operation(second, mode, crash_point + second);
                recover(&copy, flush_policy);
                let twice = copy
                    .take_crashed()
                    .unwrap_or_else(|| copy.crash(mode, crash_point + second));
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    verify_crash(&twice, &told, crash_point, flush_policy)
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

/// What a restart does: opens the log, then closes the data directory; errors are
/// `verify_crash`'s business.
fn recover(io: &SimIo, flush_policy: FlushPolicy) {
    let Ok(storage) = Storage::open_with_io(
        Path::new("/data"),
        crash_config(flush_policy),
        Arc::new(io.clone()),
    ) else {
        return;
    };
    let _ = storage.open_log("t");
    let _ = storage.close();
}

/// A power cut before any step of trimming into free files, rolling into them, sealing and
/// cutting them: the log opens with every acknowledged entry that was not trimmed, no gap, no
/// byte of a file's earlier life.
#[test]
fn a_power_cut_at_any_step_of_recycling_loses_nothing_acknowledged() {
    recycling_crash_at_every_step(FlushPolicy::Fsync);
}

#[test]
fn a_power_cut_at_any_step_of_recycling_in_relaxed_mode_leaves_a_log_without_gaps() {
    recycling_crash_at_every_step(FlushPolicy::RelaxedWriteOnly {
        fsync_interval: Duration::from_secs(3600),
    });
}

/// Appends that fail for want of space are rolled back, and with them a roll into a free file
/// that was not made yet: the free file is still the log's, written into by a later roll or
/// removed when the log closes, never left behind holding a segment's worth of disk.
#[test]
fn a_roll_into_a_free_file_rolled_back_for_want_of_space_leaves_no_file_behind() {
    let (sim, gate, storage) = gated_storage(config(10));
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..25);
    log.trim().expect("trim");
    assert_eq!(count_files(&sim, ".free"), 2);
    // Entry 25 is being synced while 26..30 wait behind it, and 30 rolls into a free file.
    let active = segment_files(&sim).pop().expect("the active segment");
    let (reached, release) = gate.arm_exactly("sync", &active);
    let first = log.append(payload("first", 25), 25).expect("append");
    reached
        .recv_timeout(Duration::from_secs(60))
        .expect("the flush syncs entry 25");
    let pending: Vec<_> = (26..31)
        .map(|index| log.append(payload("first", index), index).expect("append"))
        .collect();
    // The disk is full: the batch of 26..30 fails, and the roll with it.
    sim.set_capacity(Some(sim.used_bytes()));
    release.send(()).expect("release");
    first.wait().expect("entry 25 is durable");
    for append in pending {
        assert!(append.wait().is_err(), "appended on a full disk");
    }
    sim.set_capacity(None);
    append(&log, "second", 0..3);
    drop(log);
    storage.close_log("t").expect("close");
    assert_eq!(count_files(&sim, ".free"), 0, "{:?}", sim.paths());
}

/// A roll into a free file that fails before the file is written into (here the sync of the
/// earlier segments, relaxed mode) poisons the log; closing it still removes the free file.
#[test]
fn a_free_file_taken_by_a_roll_that_failed_is_removed_when_the_log_closes() {
    let io = SimIo::new();
    let storage = open(&io, relaxed(config(10)));
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..30);
    log.trim().expect("trim");
    assert_eq!(count_files(&io, ".free"), 2);
    io.fail_syncs(1);
    let rolled = log.append(payload("first", 30), 30).expect("append");
    assert!(rolled.wait().is_err(), "the roll's sync failed");
    drop(log);
    let _ = storage.close_log("t");
    assert_eq!(count_files(&io, ".free"), 0, "{:?}", io.paths());
}

/// A full disk while writing into a recycled file: the records that fit within the file's old
/// length need no space, the first that would grow it fails with `DiskFull` and is rolled
/// back (never a poisoned log); once there is space appends go on, and a power cut keeps
/// every acknowledged entry.
#[test]
fn a_full_disk_while_writing_into_a_recycled_file_rolls_back_and_recovers() {
    let free = short_free_files();
    let io = free.crash(CrashMode::LoseUnsynced, 0);
    let storage = open(&io, config(10));
    let log = storage.open_log("t").expect("log");
    append(&log, "second", 0..10);
    io.set_capacity(Some(io.used_bytes()));
    // Entry 10 rolls into a free file of 684 bytes: five records fit in it.
    append(&log, "second", 10..15);
    let error = log
        .append(payload("second", 15), 15)
        .expect("append")
        .wait()
        .expect_err("the file would grow on a full disk");
    assert!(
        matches!(error, meridian_storage::StorageError::DiskFull { .. }),
        "{error}"
    );
    io.set_capacity(None);
    append(&log, "second", 15..25);
    let expected: Vec<Bytes> = (10..15)
        .map(|index| payload("first", index))
        .chain((0..25).map(|index| payload("second", index)))
        .collect();
    assert_eq!(read_all(&log), expected);
    let crashed = io.crash(CrashMode::TornWithGarbage, 5);
    drop(log);
    drop(storage);
    let storage = open(&crashed, config(10));
    let log = storage.open_log("t").expect("log after the crash");
    assert_eq!(read_all(&log), expected);
}

/// The same tear under the fsync policy: a batch of several entries written into a recycled
/// file across its old end, and the power cut comes before its fsync.
#[test]
fn a_recycled_segment_torn_before_a_batchs_fsync_opens_with_every_acknowledged_entry() {
    for seed in 0..8 {
        let sim = short_free_files();
        let gate = GatedIo::new(sim.clone());
        let storage =
            Storage::open_with_io(Path::new("/data"), config(10), gate.clone()).expect("open");
        let log = storage.open_log("t").expect("log");
        // Entry 10 rolls into a free file of 684 bytes: the newest one (its handle keeps
        // the name it was opened under).
        let mut free: Vec<PathBuf> = sim
            .paths()
            .into_iter()
            .filter(|path| path.to_string_lossy().ends_with(".free"))
            .collect();
        free.sort();
        let recycled = free.pop().expect("a free file");
        append(&log, "second", 0..11);
        let (reached, release) = gate.arm_exactly("sync", &recycled);
        let eleven = log.append(payload("second", 11), 11).expect("append");
        let wait = |reached: &Receiver<()>| {
            reached
                .recv_timeout(Duration::from_secs(60))
                .expect("the flush syncs");
        };
        wait(&reached);
        // Entries 12..20 wait behind it: one batch, written over 312..1304.
        let batch: Vec<_> = (12..20)
            .map(|index| log.append(payload("second", index), index).expect("append"))
            .collect();
        let (reached_batch, release_batch) = gate.arm_exactly("sync", &recycled);
        release.send(()).expect("release");
        eleven.wait().expect("entry 11 is durable");
        wait(&reached_batch);
        let crashed = sim.crash(CrashMode::TornPrefix, seed);
        release_batch.send(()).expect("release");
        for append in batch {
            append.wait().expect("durable");
        }
        drop(log);
        drop(storage);

        let storage = open(&crashed, config(10));
        let log = storage
            .open_log("t")
            .unwrap_or_else(|error| panic!("seed {seed}: the log refuses to open: {error}"));
        let expected: Vec<Bytes> = (10..15)
            .map(|index| payload("first", index))
            .chain((0..12).map(|index| payload("second", index)))
            .collect();
        assert_eq!(read_all(&log), expected, "seed {seed}");
    }
}

/// The directory sync after a free file took its segment's name fails: the append fails (the
/// log is poisoned, as when creating a new file fails), and the log opens again, with or
/// without a power cut, holding every acknowledged entry.
#[test]
fn a_failed_directory_sync_while_recycling_fails_the_append_and_the_log_opens_again() {
    for crash in [false, true] {
        let io = SimIo::new();
        let storage = open(&io, config(10));
        let log = storage.open_log("t").expect("log");
        append(&log, "first", 0..30);
        log.trim().expect("trim");
        io.fail_nth_dir_sync(1);
        let rolled = log.append(payload("first", 30), 30).expect("append");
        assert!(rolled.wait().is_err(), "the roll's directory sync failed");
        let reopened = if crash {
            io.crash(CrashMode::TornPrefix, 7)
        } else {
            drop(log);
            let _ = storage.close_log("t");
            io.clone()
        };
        let storage = open(&reopened, config(10));
        let log = storage.open_log("t").expect("the log opens again");
        let expected: Vec<Bytes> = (20..30).map(|index| payload("first", index)).collect();
        assert_eq!(read_all(&log), expected, "crash: {crash}");
        append(&log, "second", 0..12);
        assert_eq!(read_all(&log).len(), 22, "crash: {crash}");
    }
}

/// A log emptied by trimming, reopened after a power cut with its free files, started at a
/// later entry (cluster mode) and rolled into them: the log and the summary of it agree.
#[test]
fn a_log_started_at_a_later_entry_writes_into_adopted_free_files() {
    let io = SimIo::new();
    let storage = open(&io, config(10));
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..30);
    log.trim().expect("trim");
    let crashed = io.crash(CrashMode::LoseUnsynced, 3);
    drop(log);
    drop(storage);
    // The crashed log still holds entries 20..30; a new directory is what `start_at` needs.
    let fresh = SimIo::new();
    for path in crashed.paths() {
        if path.to_string_lossy().ends_with(".free") {
            let bytes = crashed.read_file(&path).expect("read");
            let directory = path.parent().expect("parent");
            fresh.create_dir_all(directory).expect("mkdir");
            let file = fresh.create(&path).expect("create");
            file.write_all_at(&bytes, 0).expect("write");
            file.sync().expect("sync");
            for ancestor in path.ancestors().skip(1) {
                fresh.sync_dir(ancestor).expect("sync dir");
            }
        }
    }
    let storage = open(&fresh, config(10));
    let log = storage.open_log("t").expect("log");
    log.start_at(1_000).expect("start at 1000");
    append(&log, "second", 0..25);
    assert_eq!(count_files(&fresh, ".free"), 0, "{:?}", fresh.paths());
    let again = fresh.crash(CrashMode::TornWithGarbage, 9);
    drop(log);
    drop(storage);
    let root = tempfile::tempdir().expect("tempdir");
    copy_to_disk(&again, root.path());
    let summary = meridian_storage::closed_log::summarize_closed_log(root.path(), "t")
        .expect("summary")
        .expect("the log exists");
    let storage = open(&again, config(10));
    let log = storage.open_log("t").expect("log after the crash");
    let entries = read_all(&log);
    let expected: Vec<Bytes> = (0..25).map(|index| payload("second", index)).collect();
    assert_eq!(entries, expected);
    assert_eq!(summary.entries, 25);
    assert_eq!(
        log.first_position().map(|position| position.entry_id),
        Some(1_000)
    );
}

/// The broker hands appends the producer's checksum of most of the entry; the record's
/// checksum is derived from it. In a recycled (salted) segment the derived checksum must be
/// the salted one: the entries read back, after a reopen too.
#[test]
fn entries_appended_with_a_known_checksum_into_a_recycled_segment_read_back() {
    let io = SimIo::new();
    let storage = open(&io, config(10));
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..30);
    log.trim().expect("trim");
    for index in 0..15u64 {
        let data = payload("second", index);
        let offset = (index % 7) as usize;
        let known = meridian_storage::KnownChecksum {
            offset,
            crc32c: crc32c::crc32c(&data[offset..]),
        };
        log.append_with_checksum(data, index, Some(known))
            .expect("append")
            .wait()
            .expect("durable");
    }
    assert_eq!(count_files(&io, ".free"), 0, "both free files written into");
    let expected: Vec<Bytes> = (20..30)
        .map(|index| payload("first", index))
        .chain((0..15).map(|index| payload("second", index)))
        .collect();
    assert_eq!(read_all(&log), expected);
    assert!(log.corruption().is_none());
    drop(log);
    storage.close().expect("close");
    let storage = open(&io, config(10));
    let log = storage.open_log("t").expect("reopened");
    assert_eq!(read_all(&log), expected);
}

/// Free files a crash left in any state (shorter than a header, a damaged header, garbage):
/// what they hold does not matter, they are written into like any other.
#[test]
fn damaged_or_short_free_files_are_written_into_like_any_other() {
    let io = SimIo::new();
    let storage = open(&io, config(10));
    let log = storage.open_log("t").expect("log");
    append(&log, "first", 0..10);
    drop(log);
    storage.close().expect("close");
    let directory = Path::new("/data/logs/t");
    let name = |entry: u64| directory.join(format!("{:020}-{entry:020}.free", 0));
    let mut garbage = vec![0xA5u8; 3000];
    garbage[..8].copy_from_slice(b"MRDNSEG\0");
    for (path, bytes) in [(name(1), vec![7u8; 10]), (name(2), garbage)] {
        let file = io.create(&path).expect("create");
        file.write_all_at(&bytes, 0).expect("write");
        file.sync().expect("sync");
    }
    io.sync_dir(directory).expect("sync dir");

    let storage = open(&io, config(10));
    let log = storage.open_log("t").expect("log with odd free files");
    append(&log, "second", 0..25);
    assert_eq!(count_files(&io, ".free"), 0, "{:?}", io.paths());
    let expected: Vec<Bytes> = (0..10)
        .map(|index| payload("first", index))
        .chain((0..25).map(|index| payload("second", index)))
        .collect();
    assert_eq!(read_all(&log), expected);
    let crashed = io.crash(CrashMode::TornWithGarbage, 11);
    drop(log);
    drop(storage);
    let storage = open(&crashed, config(10));
    let log = storage.open_log("t").expect("log after the crash");
    assert_eq!(read_all(&log), expected);
}
