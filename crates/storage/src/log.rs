//! One append-only log (a topic partition): segments, group commit, reads and recovery.
//!
//! # Invariants
//!
//! - Positions are assigned under the state lock in append order; bytes reach the file in the
//!   same order because a log has at most one flush in flight (`flush_scheduled`).
//! - `last_durable` only moves forward, and only after the bytes up to it are fsynced (or
//!   written, under the relaxed policy). Readers never see a position beyond it, so under
//!   `Fsync` nothing a consumer receives can vanish in a crash (under the relaxed policy a power
//!   cut can erase what was read, as `docs/durability.md` says).
//! - A failed fsync, or a failed write other than "disk full", poisons the log: every pending
//!   and later append fails. Disk full rolls the failed appends back instead, so appends
//!   resume once space is freed.
//! - No I/O happens while the state lock is held, except in `open` (nobody else has the log).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::cache::EntryCache;
use crate::config::{FlushPolicy, Retention};
use crate::cursor::{CursorJournal, CursorSlot};
use crate::engine::{ScheduledFlush, Shared};
use crate::error::{Result, StorageError};
use crate::format::{self, FileHeader, FileKind, ScanEnd, HEADER_LEN, RECORD_FRAMING_LEN};
use crate::io::IoFile;
use crate::remote::{RemoteCommit, RemoteLog};
use crate::Position;

/// Bytes of an entry record's body before the entry's data: entry id and publish time.
pub const ENTRY_HEADER_LEN: u64 = 16;
/// Entries per block of the publish-time index.
const TIME_BLOCK: usize = 32;
/// A sealed segment keeps the offset of one entry in this many (at most)...
const SPARSE_INDEX_ENTRIES: u32 = 64;
/// ...and at least one per this many bytes of records; a read scans forward from the nearest
/// kept offset, so it reads at most this much (plus one record) more than it returns.
const SPARSE_INDEX_BYTES: u32 = 64 * 1024;
/// The least a read of a sealed segment fetches (unless the records end sooner): past what the
/// read expected to need, its walk over the records goes on in reads of at least this size.
const MIN_READ_BYTES: u64 = 16 * 1024;
/// The most a read of a sealed segment fetches ahead of the record it needs, whatever the
/// read's byte budget.
const MAX_READ_AHEAD_BYTES: u64 = 8 * 1024 * 1024;

/// An entry read back from a log: exactly the bytes that were appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub position: Position,
    pub publish_time_ms: u64,
    pub data: Bytes,
}

/// Counters of one log, for stats and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    pub entries_appended: u64,
    pub bytes_appended: u64,
    /// Write batches flushed; each is one write call and (under `Fsync`) one fsync.
    pub flushes: u64,
    pub bytes_flushed: u64,
    /// Bytes of all segment files.
    pub storage_bytes: u64,
    pub segments: usize,
    pub entries_cached: usize,
    /// Bytes of memory the segments' indexes (entry offsets, publish-time marks) hold.
    pub index_bytes: usize,
}

/// An append that has been given its position and waits to become durable. Await it, or call
/// [`PendingAppend::wait`] outside an async runtime.
#[derive(Debug)]
pub struct PendingAppend {
    position: Position,
    receiver: oneshot::Receiver<Result<()>>,
}

impl PendingAppend {
    pub fn position(&self) -> Position {
        self.position
    }

    /// Blocks until the append is durable. Must not be called from async code.
    pub fn wait(self) -> Result<Position> {
        let position = self.position;
        match self.receiver.blocking_recv() {
            Ok(result) => result.map(|()| position),
            Err(_) => Err(StorageError::Poisoned {
                log: String::new(),
                cause: "the flush was abandoned".into(),
            }),
        }
    }
}

impl std::future::Future for PendingAppend {
    type Output = Result<Position>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let position = self.position;
        std::pin::Pin::new(&mut self.receiver)
            .poll(context)
            .map(|received| match received {
                Ok(result) => result.map(|()| position),
                Err(_) => Err(StorageError::Poisoned {
                    log: String::new(),
                    cause: "the flush was abandoned".into(),
                }),
            })
    }
}

/// A segment's file, as far as the log holds it.
enum SegmentFile {
    /// Not created yet: the flusher creates it with the segment's first batch.
    NotCreated,
    /// Open: the segment appends go to (or went to, until its successor exists).
    Open(Arc<dyn IoFile>),
    /// Sealed and durable; opened again for each read, so that a log holds one file descriptor
    /// however many segments it retains.
    Closed,
}

pub(crate) struct Segment {
    pub(crate) path: PathBuf,
    file: SegmentFile,
    pub(crate) ledger_id: u64,
    pub(crate) first_entry_id: u64,
    /// Where each entry's record starts in the file.
    index: EntryIndex,
    /// Running maximum publish time at the end of each block of `TIME_BLOCK` entries.
    time_marks: Vec<u64>,
    /// File length including appended records that are not flushed yet.
    end: u64,
    /// File length that is flushed (written and, under `Fsync`, synced).
    flushed_end: u64,
    /// File length known to be fsynced (differs from `flushed_end` only under the relaxed policy).
    synced_end: u64,
    /// The position this segment continues, from its header: the previous segment's ledger id
    /// and the entry id after its last entry. `None` in files written before it was recorded.
    continues: Option<Position>,
    /// Wall-clock time of the last append, for time-based retention.
    last_write_ms: u64,
    /// Seeds the checksums of this segment's records (its header's salt; 0 in a file that was
    /// not recycled).
    salt: u32,
    /// A trimmed segment's file (`*.free`) this segment is to be written into; taken when the
    /// segment's file is created.
    recycle_from: Option<PathBuf>,
}

impl Segment {
    fn new(directory: &Path, ledger_id: u64, first_entry_id: u64) -> Segment {
        Segment {
            path: directory.join(segment_file_name(ledger_id, first_entry_id)),
            file: SegmentFile::NotCreated,
            ledger_id,
            first_entry_id,
            index: EntryIndex::Dense(Vec::new()),
            time_marks: Vec::new(),
            end: HEADER_LEN,
            flushed_end: 0,
            synced_end: 0,
            continues: None,
            last_write_ms: now_ms(),
            salt: 0,
            recycle_from: None,
        }
    }

    /// A segment to be written into the trimmed segment file at `free`: its records get a
    /// random non-zero salt, so that those of the file's earlier life never pass for its own.
    fn recycling(directory: &Path, ledger_id: u64, first_entry_id: u64, free: PathBuf) -> Segment {
        let mut segment = Segment::new(directory, ledger_id, first_entry_id);
        segment.salt = format::fresh_salt();
        segment.recycle_from = Some(free);
        segment
    }

    /// The file, if the log holds it open.
    fn open_file(&self) -> Option<Arc<dyn IoFile>> {
        match &self.file {
            SegmentFile::Open(file) => Some(file.clone()),
            SegmentFile::NotCreated | SegmentFile::Closed => None,
        }
    }

    pub(crate) fn entry_count(&self) -> u64 {
        self.index.len() as u64
    }

    fn first_position(&self) -> Option<Position> {
        (self.index.len() > 0).then(|| Position::new(self.ledger_id, self.first_entry_id))
    }

    pub(crate) fn last_position(&self) -> Option<Position> {
        let count = self.entry_count();
        (count > 0).then(|| Position::new(self.ledger_id, self.first_entry_id + count - 1))
    }

    fn contains(&self, position: Position) -> bool {
        position.ledger_id == self.ledger_id
            && position.entry_id >= self.first_entry_id
            && position.entry_id < self.first_entry_id + self.entry_count()
    }

    fn push_entry(&mut self, offset: u64, publish_time_ms: u64) {
        let index = self.index.len();
        match &mut self.index {
            EntryIndex::Dense(offsets) => offsets.push(offset as u32),
            EntryIndex::Sparse { .. } => {
                debug_assert!(false, "append to a sealed segment");
                return;
            }
        }
        if index.is_multiple_of(TIME_BLOCK) {
            let previous = self.time_marks.last().copied().unwrap_or(0);
            self.time_marks.push(previous.max(publish_time_ms));
        } else if let Some(mark) = self.time_marks.last_mut() {
            *mark = (*mark).max(publish_time_ms);
        }
    }

    /// Drops entries from index `keep` on (used when rolling back after a full disk; only a
    /// segment not sealed yet, whose index is dense, has entries to drop).
    fn truncate_entries(&mut self, keep: usize) {
        if let EntryIndex::Dense(offsets) = &mut self.index {
            if let Some(offset) = offsets.get(keep) {
                self.end = u64::from(*offset);
            }
            offsets.truncate(keep);
            self.time_marks.truncate(keep.div_ceil(TIME_BLOCK));
        }
    }

    /// Byte range of entry `index`'s record in the file, if the index has it (dense).
    fn record_range(&self, index: usize) -> Option<(u64, u64)> {
        let EntryIndex::Dense(offsets) = &self.index else {
            return None;
        };
        let start = u64::from(*offsets.get(index)?);
        let end = offsets
            .get(index + 1)
            .map(|offset| u64::from(*offset))
            .unwrap_or(self.end);
        Some((start, end))
    }

    /// The nearest entry at or before `index` whose offset the index keeps: (its index, its
    /// offset).
    fn indexed_at_or_before(&self, index: usize) -> (usize, u64) {
        match &self.index {
            EntryIndex::Dense(offsets) => (
                index,
                offsets
                    .get(index)
                    .map(|offset| u64::from(*offset))
                    .unwrap_or(self.end),
            ),
            EntryIndex::Sparse { points, .. } => {
                let at = points.partition_point(|(entry, _)| *entry as usize <= index);
                points
                    .get(at.wrapping_sub(1))
                    .map(|(entry, offset)| (*entry as usize, u64::from(*offset)))
                    .unwrap_or((0, HEADER_LEN))
            }
        }
    }

    /// Where the record of entry `index` ends at the latest, by the index alone. A sparse
    /// index keeps the offset of every entry that starts `SPARSE_INDEX_BYTES` or more after
    /// the last kept one, so an entry it does not keep starts less than that after the kept one
    /// before it.
    fn record_end_at_most(&self, index: usize) -> u64 {
        match &self.index {
            EntryIndex::Dense(offsets) => offsets
                .get(index + 1)
                .map(|offset| u64::from(*offset))
                .unwrap_or(self.end),
            EntryIndex::Sparse { count, points } => {
                if index + 1 >= *count {
                    return self.end;
                }
                let at = points.partition_point(|(entry, _)| *entry as usize <= index);
                match points.get(at) {
                    Some((entry, offset)) if *entry as usize == index + 1 => u64::from(*offset),
                    next => {
                        // Entry `index + 1` is not kept: it starts within the group of
                        // the kept entry at or before `index`.
                        let (_, group_start) = points[at - 1];
                        let bound = u64::from(group_start) + u64::from(SPARSE_INDEX_BYTES);
                        next.map_or(self.end, |(_, offset)| u64::from(*offset))
                            .min(bound)
                    }
                }
            }
        }
    }

    /// Keeps only a sparse index: the segment is sealed (no entry is appended or rolled back
    /// any more), so the offsets of its other entries are found by reading forward.
    fn seal_index(&mut self) {
        let EntryIndex::Dense(offsets) = &self.index else {
            return;
        };
        let mut points: Vec<(u32, u32)> = Vec::new();
        for (entry, offset) in offsets.iter().enumerate() {
            let keep = points.last().is_none_or(|(last_entry, last_offset)| {
                entry as u32 - last_entry >= SPARSE_INDEX_ENTRIES
                    || offset - last_offset >= SPARSE_INDEX_BYTES
            });
            if keep {
                points.push((entry as u32, *offset));
            }
        }
        points.shrink_to_fit();
        self.index = EntryIndex::Sparse {
            count: offsets.len(),
            points,
        };
        self.time_marks.shrink_to_fit();
    }

    /// Bytes of memory the segment's indexes hold.
    fn index_bytes(&self) -> usize {
        let index = match &self.index {
            EntryIndex::Dense(offsets) => offsets.capacity() * 4,
            EntryIndex::Sparse { points, .. } => points.capacity() * 8,
        };
        index + self.time_marks.capacity() * 8
    }

    /// Number of entries whose records end at or before byte `length` of the file.
    fn entries_within(&self, length: u64) -> usize {
        let count = self.index.len();
        if count == 0 || self.end <= length {
            return count;
        }
        match &self.index {
            // Entry i ends where entry i + 1 starts (the last one at `end`).
            EntryIndex::Dense(offsets) => {
                offsets[1..].partition_point(|start| u64::from(*start) <= length)
            }
            // Only a segment with unsynced bytes is asked, and sealing synced them; counting
            // up to the last kept offset within `length` is a safe lower bound.
            EntryIndex::Sparse { points, .. } => points
                .iter()
                .take_while(|(_, offset)| u64::from(*offset) <= length)
                .last()
                .map(|(entry, _)| *entry as usize)
                .unwrap_or(0),
        }
    }

    fn size_bytes(&self) -> u64 {
        self.flushed_end.max(HEADER_LEN)
    }
}

/// Where a segment's records start in its file.
enum EntryIndex {
    /// Every entry's offset, by `entry_id - first_entry_id`: the segment being appended to.
    Dense(Vec<u32>),
    /// A sealed segment: `count` entries; the offsets of entry 0 and then of one entry at least
    /// every `SPARSE_INDEX_ENTRIES` entries and every `SPARSE_INDEX_BYTES` bytes, as (entry
    /// index, offset), ascending. Memory per retained entry: about 8 / 64 bytes instead of 4.
    Sparse {
        count: usize,
        points: Vec<(u32, u32)>,
    },
}

impl EntryIndex {
    fn len(&self) -> usize {
        match self {
            EntryIndex::Dense(offsets) => offsets.len(),
            EntryIndex::Sparse { count, .. } => *count,
        }
    }
}

pub(crate) fn segment_file_name(ledger_id: u64, first_entry_id: u64) -> String {
    format!("{ledger_id:020}-{first_entry_id:020}.segment")
}

pub(crate) fn parse_segment_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".segment")?;
    let (ledger, entry) = stem.split_once('-')?;
    Some((ledger.parse().ok()?, entry.parse().ok()?))
}

/// Suffix of a trimmed segment's file kept for reuse (`<segment name without .segment>.free`).
const FREE_SUFFIX: &str = ".free";

/// Where a trimmed segment's file waits to be written into again.
fn free_file_path(segment_path: &Path) -> PathBuf {
    segment_path.with_extension(&FREE_SUFFIX[1..])
}

/// The CRC32C of an entry's bytes from `offset` to the end, computed (and checked) by whoever
/// hands the entry to [`Log::append_with_checksum`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownChecksum {
    pub offset: usize,
    pub crc32c: u32,
}

/// What a flush thread does with a log after [`Log::flush`].
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFlush {
    /// Nothing is pending, or the log failed: another append schedules it again.
    Idle,
    /// More is pending and the log is still this thread's to flush: it queues the log again
    /// (behind the other logs waiting) without waking another thread, and takes the queue's
    /// next log itself (issue 16: handing every flush of a busy log to another thread cost a
    /// futex wake and a task switch per flush).
    Again,
}

/// Appended records waiting for the flusher, all for one segment.
struct PendingBatch {
    ledger_id: u64,
    segment_first_entry_id: u64,
    /// The segment file does not exist yet; the flusher creates it first.
    create: bool,
    file_offset: u64,
    /// The batch's bytes, in file order: see [`BatchBytes`].
    bytes: BatchBytes,
    first: Position,
    last: Position,
    waiters: Vec<oneshot::Sender<Result<()>>>,
    /// With a remote log: each entry's remote commit, waited for before the batch is durable.
    remote: Vec<Box<dyn RemoteCommit>>,
}

impl PendingBatch {
    /// Whether the batch is flushed whole, with its own fsync, instead of through the entry
    /// WAL: a batch that starts a segment, or that a remote log commits too.
    fn flushed_whole(&self) -> bool {
        self.create || !self.remote.is_empty()
    }
}

/// A pending batch taken by the thread that holds the log's flush role, with what writing it
/// needs.
struct TakenBatch {
    batch: PendingBatch,
    /// The segment's file, `None` if the batch creates it.
    file: Option<Arc<dyn IoFile>>,
    path: PathBuf,
    new_segment: NewSegment,
}

/// What [`Log::flush_unsynced`] did.
// Returned once per flush and moved on at once: a box would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Flushing {
    /// Nothing to make durable through the WAL: the flush is over (or there was none).
    Done(AfterFlush),
    /// Written into the segment, not fsynced: the entry WAL makes it durable.
    Written(WrittenBatch),
}

/// A batch written into its segment and waiting for the entry WAL's fsync. The log's flush
/// role stays with the thread holding this until [`Log::finish_written`].
pub(crate) struct WrittenBatch {
    batch: PendingBatch,
    path: PathBuf,
    file: Arc<dyn IoFile>,
}

impl WrittenBatch {
    /// The segment this batch went into: its ledger id and first entry id (its file name).
    pub(crate) fn segment(&self) -> (u64, u64) {
        (self.batch.ledger_id, self.batch.segment_first_entry_id)
    }

    /// Where in the segment's file the batch starts.
    pub(crate) fn file_offset(&self) -> u64 {
        self.batch.file_offset
    }

    /// Bytes of the batch.
    pub(crate) fn len(&self) -> u64 {
        self.batch.bytes.len()
    }

    /// The batch's bytes, as written into the segment.
    pub(crate) fn slices(&self) -> Vec<&[u8]> {
        self.batch.bytes.slices()
    }

    /// Makes the batch durable with its segment's own fsync (no entry WAL to use).
    pub(crate) fn sync_segment(&self) -> std::result::Result<(), (FlushStage, StorageError)> {
        self.file.sync().map_err(|error| {
            (
                FlushStage::Sync,
                StorageError::io("fsync", &self.path, error),
            )
        })
    }
}

/// Entries of at most this many bytes are copied into a batch; larger ones are written from
/// the bytes the caller handed over (the received frame), without a copy.
const INLINE_ENTRY_MAX_BYTES: usize = 4096;
/// A flushed batch's buffers are kept for the log's next batch if they are at most this large.
const SPARE_BATCH_MAX_BYTES: usize = 1024 * 1024;

/// A pending batch's bytes: record framings and small entries copied into `inline`, large
/// entries referenced as they were appended. Written with one vectored write.
#[derive(Default)]
struct BatchBytes {
    inline: Vec<u8>,
    parts: Vec<BatchPart>,
    len: u64,
}

enum BatchPart {
    /// `inline[start..end]`.
    Inline {
        start: usize,
        end: usize,
    },
    Shared(Bytes),
}

impl BatchBytes {
    fn len(&self) -> u64 {
        self.len
    }

    /// Appends one record: `framing`, `header`, then `data` (copied if small).
    fn push_record(&mut self, framing: &[u8], header: &[u8], data: &Bytes) {
        let start = self.inline.len();
        self.inline.extend_from_slice(framing);
        self.inline.extend_from_slice(header);
        if data.len() <= INLINE_ENTRY_MAX_BYTES {
            self.inline.extend_from_slice(data);
        }
        let end = self.inline.len();
        match self.parts.last_mut() {
            Some(BatchPart::Inline { end: last_end, .. }) if *last_end == start => *last_end = end,
            _ => self.parts.push(BatchPart::Inline { start, end }),
        }
        if data.len() > INLINE_ENTRY_MAX_BYTES {
            self.parts.push(BatchPart::Shared(data.clone()));
        }
        self.len += (framing.len() + header.len() + data.len()) as u64;
    }

    /// The batch's bytes as slices, in order.
    fn slices(&self) -> Vec<&[u8]> {
        self.parts
            .iter()
            .map(|part| match part {
                BatchPart::Inline { start, end } => &self.inline[*start..*end],
                BatchPart::Shared(bytes) => &bytes[..],
            })
            .collect()
    }

    /// Empties the batch, keeping its buffers if they are small enough to be worth keeping.
    fn recycle(mut self) -> Option<BatchBytes> {
        if self.inline.capacity() > SPARE_BATCH_MAX_BYTES {
            return None;
        }
        self.inline.clear();
        self.parts.clear();
        self.len = 0;
        Some(self)
    }
}

pub(crate) struct LogState {
    pub(crate) segments: Vec<Segment>,
    ledger_id: u64,
    next_entry_id: u64,
    last_durable: Option<Position>,
    /// How many times failed appends were rolled back (their positions are then given again).
    rollbacks: u64,
    pending: VecDeque<PendingBatch>,
    pending_bytes: u64,
    /// Emptied buffers of the last flushed batch, reused by the next one.
    spare_batch: Option<BatchBytes>,
    flush_scheduled: bool,
    /// Set when the log is poisoned: appends fail with this error.
    failure: Option<StorageError>,
    /// Under the relaxed policy, a periodic fsync failed: the written but unsynced bytes must
    /// be cut off the files (by whoever holds the flush role next, so that no write lands
    /// after the cut).
    unsynced_cut_pending: bool,
    /// Set when a read found corrupted bytes: reads and appends fail with this error.
    corruption: Option<StorageError>,
    pub(crate) closed: bool,
    pub(crate) cache: EntryCache,
    pub(crate) cursors: std::collections::BTreeMap<String, CursorSlot>,
    /// Cursors deleted since the last persist, to be written as tombstones.
    pub(crate) deleted_cursors: Vec<String>,
    /// Persisted mark-delete position of each durable cursor deleted since the last successful
    /// persist. Trimming still counts them: a crash before the tombstone is durable brings the
    /// cursor back, and it must find its data.
    pub(crate) deletions_in_flight: std::collections::BTreeMap<String, Option<Position>>,
    pub(crate) retention: Retention,
    stats: LogStats,
    /// Where appends are also committed (cluster mode); `None` for the local engine alone.
    remote: Option<Arc<dyn RemoteLog>>,
    /// Trimmed segment files (`*.free`) that the next segments are written into, at most
    /// `recycled_segments_max`.
    free_files: Vec<PathBuf>,
}

/// Told once, with the `StorageError::Poisoned` error, when a log is poisoned, and once, with
/// the `StorageError::Corrupted` error, when a read finds corrupted data in a loaded log.
pub type PoisonListener = Box<dyn Fn(&StorageError) + Send + Sync>;

/// An append-only log of entries with durable cursors. Cheap to share: `Arc<Log>`.
pub struct Log {
    name: String,
    directory: PathBuf,
    pub(crate) shared: Arc<Shared>,
    pub(crate) state: Mutex<LogState>,
    /// Signalled whenever a flush finishes, so `close` can wait for the pending ones.
    flush_finished: Condvar,
    durable: watch::Sender<Option<Position>>,
    pub(crate) cursor_journal: Mutex<CursorJournal>,
    /// Who reports this log's poisoning (the broker, naming the topic); without one the log
    /// logs it itself. Either way it is reported once, where it is handled.
    poison_listener: OnceLock<PoisonListener>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Log")
            .field("name", &self.name)
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// What a read has gathered, and its limits.
struct ReadBudget {
    entries: Vec<Entry>,
    /// Bytes counted against `max_bytes`: data of cached entries, records read from disk.
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

/// Room reserved up front for the entries of one read (and for the parts of one plan), so
/// that a dispatch round of hundreds of small entries does not grow its lists from one entry
/// up; larger reads grow past it. Small enough that neither list starts beyond glibc's mmap
/// threshold (a mapping, and its page faults, per read).
const READ_ENTRIES_RESERVED: usize = 256;

impl ReadBudget {
    /// Entries a read may still gather, as far as room is reserved for them.
    fn room(&self) -> usize {
        self.max_entries
            .saturating_sub(self.entries.len())
            .min(READ_ENTRIES_RESERVED)
    }

    fn exhausted(&self) -> bool {
        self.entries.len() >= self.max_entries
            || (!self.entries.is_empty() && self.bytes >= self.max_bytes)
    }
}

/// Where a read may take its entries from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Anywhere,
    /// The entry cache alone: a read that would touch a file is not made.
    CacheOnly,
}

/// One step of a read, planned under the log's lock and done after it is released.
enum ReadPart {
    Cached(Entry),
    /// Consecutive records of a segment whose index has every offset.
    Dense {
        /// `None` for a sealed segment: opened for this read.
        file: Option<Arc<dyn IoFile>>,
        path: PathBuf,
        ledger_id: u64,
        salt: u32,
        first_entry_id: u64,
        ranges: Vec<(u64, u64)>,
    },
    /// Entries `wanted_index..=last_index` of a sealed segment (sparse index), found by
    /// reading its records forward from entry `from_index` at `from_offset`.
    Scan {
        file: Option<Arc<dyn IoFile>>,
        path: PathBuf,
        ledger_id: u64,
        salt: u32,
        /// The segment's first entry id.
        first_entry_id: u64,
        from_index: usize,
        from_offset: u64,
        wanted_index: usize,
        last_index: usize,
        /// Where the segment's records end.
        end_offset: u64,
        /// The segment's mean record size (from its first indexed record to its end).
        mean_record: u64,
        /// Where the records `wanted_index..=last_index` end at the latest (by the index): the
        /// read-ahead never goes past it, however large the mean record is.
        last_end_bound: u64,
    },
}

/// A run of consecutive entries of one segment that are not cached, being planned.
#[derive(Default)]
struct DiskRun {
    /// Index of its first entry in the segment.
    first: Option<usize>,
    /// Their byte ranges (dense index only).
    ranges: Vec<(u64, u64)>,
}

impl DiskRun {
    /// Ends the run before entry index `end` of `segment`, adding its part. Returns the
    /// position after it if it is a scan (its size is unknown until read).
    fn close(
        &mut self,
        parts: &mut Vec<ReadPart>,
        segment: &Segment,
        end: usize,
    ) -> Option<Position> {
        let first = self.first.take()?;
        if !self.ranges.is_empty() {
            parts.push(ReadPart::Dense {
                file: segment.open_file(),
                path: segment.path.clone(),
                ledger_id: segment.ledger_id,
                salt: segment.salt,
                first_entry_id: segment.first_entry_id + first as u64,
                ranges: std::mem::take(&mut self.ranges),
            });
            return None;
        }
        let (from_index, from_offset) = segment.indexed_at_or_before(first);
        parts.push(ReadPart::Scan {
            file: segment.open_file(),
            path: segment.path.clone(),
            ledger_id: segment.ledger_id,
            salt: segment.salt,
            first_entry_id: segment.first_entry_id,
            from_index,
            from_offset,
            wanted_index: first,
            last_index: end - 1,
            end_offset: segment.end,
            mean_record: {
                let (_, first_offset) = segment.indexed_at_or_before(0);
                segment.end.saturating_sub(first_offset) / segment.entry_count().max(1)
            },
            last_end_bound: segment.record_end_at_most(end - 1),
        });
        Some(Position::new(
            segment.ledger_id,
            segment.first_entry_id + end as u64,
        ))
    }
}

/// The offset of the record `records` records after the one at `from_offset` in a sealed
/// segment, found by reading record headers.
struct OffsetLookup {
    file: Option<Arc<dyn IoFile>>,
    path: PathBuf,
    from_offset: u64,
    records: usize,
    /// Where the segment's records end.
    end: u64,
}

impl OffsetLookup {
    fn find(self, io: &dyn crate::io::Io) -> Result<u64> {
        let file = match self.file {
            Some(file) => file,
            None => io
                .open(&self.path)
                .map_err(|error| StorageError::io("open", &self.path, error))?,
        };
        let mut offset = self.from_offset;
        for _ in 0..self.records {
            let mut length = [0u8; 4];
            file.read_exact_at(&mut length, offset)
                .map_err(|error| StorageError::io("read", &self.path, error))?;
            offset += RECORD_FRAMING_LEN + u64::from(u32::from_le_bytes(length));
            if offset > self.end {
                return Err(StorageError::corrupted(
                    &self.path,
                    offset,
                    "a record runs past the end of the segment's records",
                ));
            }
        }
        Ok(offset)
    }
}

/// How many bytes a read of a sealed segment's records `from..=last` wants from record
/// `from` on: the records before `wanted` (walked to find it), then as many as the budget still
/// takes, both estimated at the segment's mean record size, and the next framing.
fn read_ahead(read: &ReadBudget, from: usize, wanted: usize, last: usize, mean_record: u64) -> u64 {
    let skipped = mean_record * (wanted.saturating_sub(from) as u64);
    let records_left = (last + 1).saturating_sub(wanted) as u64;
    let entries_left =
        (read.max_entries.saturating_sub(read.entries.len()) as u64).min(records_left);
    // The budget always admits one entry, however large.
    let bytes_left = (read.max_bytes.saturating_sub(read.bytes) as u64).max(mean_record);
    let wanted_bytes = mean_record.saturating_mul(entries_left).min(bytes_left);
    skipped
        .saturating_add(wanted_bytes)
        .saturating_add(RECORD_FRAMING_LEN)
        .min(MAX_READ_AHEAD_BYTES)
}

/// Reads a segment's records forward in chunks.
struct ChunkReader<'a> {
    file: &'a dyn IoFile,
    path: &'a Path,
    /// Where the records end.
    end: u64,
    /// File offset of `buffer`.
    start: u64,
    buffer: Bytes,
    /// Up to where the reader expects to need the records (by the read's budget): the first
    /// read fetches up to there, so that a run of records comes in one read.
    until: u64,
}

impl ChunkReader<'_> {
    /// Bytes `offset..offset + len` of the file, which must lie within the records.
    fn get(&mut self, offset: u64, len: u64) -> Result<Bytes> {
        if offset + len > self.end {
            return Err(StorageError::corrupted(
                self.path,
                offset,
                format!("record of {len} bytes runs past the end of the segment's records"),
            ));
        }
        let buffered_end = self.start + self.buffer.len() as u64;
        if offset < self.start || offset + len > buffered_end {
            let read_len = len
                .max(self.until.saturating_sub(offset))
                .max(MIN_READ_BYTES)
                .min(self.end - offset);
            // What is already buffered from `offset` on (typically the head of a record whose
            // framing was read at the end of the previous chunk) is kept, not read again.
            let kept = if (self.start..buffered_end).contains(&offset) {
                &self.buffer[(offset - self.start) as usize..]
            } else {
                &[]
            };
            let mut buffer = Vec::with_capacity(read_len as usize);
            buffer.extend_from_slice(kept);
            let missing = read_len as usize - kept.len();
            self.file
                .read_exact_at_into(&mut buffer, missing, offset + kept.len() as u64)
                .map_err(|error| StorageError::io("read", self.path, error))?;
            self.start = offset;
            self.buffer = Bytes::from(buffer);
        }
        let at = (offset - self.start) as usize;
        Ok(self.buffer.slice(at..at + len as usize))
    }
}

#[derive(Clone, Copy)]
pub(crate) enum FlushStage {
    Create,
    Write,
    Sync,
    /// The fsync of the segment before the one the batch starts failed (the log is poisoned
    /// already; the batch's own file holds nothing to cut).
    SyncPrevious,
    /// The remote log did not commit the batch.
    Remote,
}

impl Log {
    /// The corruption a read found, if one did: the log then refuses reads and appends until
    /// it is reopened.
    pub fn corruption(&self) -> Option<StorageError> {
        self.lock().corruption.clone()
    }

    /// Sets who reports this log's poisoning or a corruption a read finds (once; later calls
    /// are ignored). The listener may be called with the log's state locked: it must not call
    /// back into the log. A panic in it is caught and logged.
    pub fn on_poisoned(&self, listener: PoisonListener) {
        let _ = self.poison_listener.set(listener);
    }

    /// The error of a log poisoned by `cause`, reported once: to the listener, else in an
    /// ERROR line.
    fn poisoned(&self, cause: String) -> StorageError {
        let error = StorageError::Poisoned {
            log: self.name.clone(),
            cause,
        };
        if !self.tell_listener(&error) {
            tracing::error!(log = %self.name, %error, "log poisoned; appends refused until it is reopened");
        }
        error
    }

    /// Tells the poison listener about `error`; false without one. The listener runs on the
    /// thread that found the error, often a flush thread that also leads an entry WAL group
    /// for other logs: a listener that panics is logged here rather than unwinding through
    /// that group.
    fn tell_listener(&self, error: &StorageError) -> bool {
        let Some(listener) = self.poison_listener.get() else {
            return false;
        };
        let told = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener(error)));
        if told.is_err() {
            tracing::error!(log = %self.name, %error, "the log's poison listener panicked");
        }
        true
    }

    /// Opens (recovering if needed) or creates the log in `directory` and starts a new ledger
    /// (at least `min_ledger_id`).
    pub(crate) fn open(
        shared: Arc<Shared>,
        name: String,
        directory: PathBuf,
        min_ledger_id: u64,
    ) -> Result<Arc<Log>> {
        let io = shared.io.clone();
        crate::io::create_dir_durable(io.as_ref(), &directory)
            .map_err(|error| StorageError::io("create directory", &directory, error))?;
        let names = io
            .list_dir(&directory)
            .map_err(|error| StorageError::io("list directory", &directory, error))?;
        let mut segment_keys: Vec<(u64, u64)> = names
            .iter()
            .filter_map(|name| parse_segment_file_name(name))
            .collect();
        segment_keys.sort_unstable();
        // Trimmed files kept for reuse (what they hold does not matter): the newest few stay.
        let mut free_files: Vec<PathBuf> = names
            .iter()
            .filter(|name| name.ends_with(FREE_SUFFIX))
            .map(|name| directory.join(name))
            .collect();
        free_files.sort_unstable();
        let extra = free_files
            .len()
            .saturating_sub(shared.config.recycled_segments_max);
        for path in free_files.drain(..extra) {
            // Not a reason to refuse the log: the next open or close tries again.
            if let Err(error) = io.remove_file(&path) {
                tracing::warn!(log = %name, path = %path.display(), %error, "could not remove a recycled segment file");
            }
        }

        let mut segments = Vec::with_capacity(segment_keys.len() + 1);
        let last_index = segment_keys.len().checked_sub(1);
        for (index, (ledger_id, first_entry_id)) in segment_keys.iter().copied().enumerate() {
            let is_tail = Some(index) == last_index;
            if let Some(segment) =
                recover_segment(&shared, &directory, ledger_id, first_entry_id, is_tail)?
            {
                segments.push(segment);
            }
        }

        check_continuity(&segments)?;

        // A fresh ledger id for this open: larger than every id ever used, because the newest
        // segment file (which holds the largest id) is only ever deleted once a newer one is
        // durable.
        let ledger_id = segment_keys
            .last()
            .map(|(ledger, _)| ledger + 1)
            .unwrap_or(1)
            .max(shared.ledger_floor.load(Ordering::SeqCst) + 1)
            .max(min_ledger_id);
        let mut active = Segment::new(&directory, ledger_id, 0);
        // The new ledger's first segment records where the previous ledger ended, so that a
        // lost last segment of that ledger is detected as a gap.
        let continues = segments
            .iter()
            .rev()
            .find_map(Segment::last_position)
            .map(|last| [last.ledger_id, last.entry_id + 1])
            .unwrap_or([0, 0]);
        if continues != [0, 0] {
            active.continues = Some(Position::new(continues[0], continues[1]));
        }
        let header = FileHeader {
            kind: FileKind::Segment,
            fields: [ledger_id, 0, now_ms(), continues[0], continues[1]],
            salt: 0,
        };
        match format::create_file(io.as_ref(), &active.path, header) {
            Ok(file) => {
                active.file = SegmentFile::Open(file);
                active.flushed_end = HEADER_LEN;
                active.synced_end = HEADER_LEN;
            }
            Err(StorageError::DiskFull { .. }) => {
                // The log still opens for reading: the first append creates the segment (and
                // fails with `DiskFull` until there is space). No position of this ledger
                // exists until then.
                tracing::warn!(log = %name, path = %active.path.display(), "disk full: the log opens without its new segment; appends create it once there is space");
                if io.exists(&active.path) {
                    io.remove_file(&active.path)
                        .and_then(|()| io.sync_dir(&directory))
                        .map_err(|error| StorageError::io("remove", &active.path, error))?;
                }
            }
            Err(error) => return Err(error),
        }

        // Segments of earlier ledgers that hold no entries are useless once a newer segment
        // is durable.
        let mut removed_empty = false;
        let newer_durable = !matches!(active.file, SegmentFile::NotCreated);
        segments.retain(|segment: &Segment| {
            if segment.entry_count() > 0 || !newer_durable {
                return true;
            }
            removed_empty |= io.remove_file(&segment.path).is_ok();
            false
        });
        if removed_empty {
            io.sync_dir(&directory)
                .map_err(|error| StorageError::io("fsync directory", &directory, error))?;
        }
        segments.push(active);

        let last_durable = segments.iter().rev().find_map(Segment::last_position);
        let cursor_journal = CursorJournal::open(&shared, &directory)?;
        let mut cursors = cursor_journal.recovered_cursors();
        // Acknowledgements of entries after the last one (relaxed mode: a power cut lost them,
        // the cursor was persisted first) name positions that never exist again (the new
        // ledger is above): kept, they would count against the backlog of the entries to come.
        for slot in cursors.values_mut() {
            slot.state.acknowledged.remove_after(last_durable);
        }
        let (durable, _) = watch::channel(last_durable);
        let log = Arc::new(Log {
            name,
            directory,
            state: Mutex::new(LogState {
                segments,
                ledger_id,
                next_entry_id: 0,
                last_durable,
                pending: VecDeque::new(),
                spare_batch: None,
                rollbacks: 0,
                pending_bytes: 0,
                flush_scheduled: false,
                failure: None,
                unsynced_cut_pending: false,
                corruption: None,
                closed: false,
                cache: EntryCache::default(),
                cursors,
                deleted_cursors: Vec::new(),
                deletions_in_flight: std::collections::BTreeMap::new(),
                retention: Retention::default(),
                stats: LogStats::default(),
                remote: None,
                free_files,
            }),
            shared,
            flush_finished: Condvar::new(),
            durable,
            cursor_journal: Mutex::new(cursor_journal),
            poison_listener: OnceLock::new(),
        });
        tracing::debug!(log = %log.name, ledger_id, ?last_durable, "log opened");
        log.shared.register_live_log(&log);
        Ok(log)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn directory(&self) -> &Path {
        &self.directory
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LogState> {
        // Nothing panics while holding this lock except on broken invariants; recover the
        // guard so that one bug does not take every later caller down with it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The ledger id of this open of the log; new entries get positions in it.
    pub fn current_ledger_id(&self) -> u64 {
        self.lock().ledger_id
    }

    /// Makes every later append also commit through `remote` (cluster mode; see
    /// [`crate::remote`]). `remote` must continue at [`Log::end_position`]'s entry id. Refused
    /// while appends are pending (they would be durable without it).
    pub fn attach_remote(&self, remote: Arc<dyn RemoteLog>) -> Result<()> {
        let mut state = self.lock();
        if !state.pending.is_empty() || state.flush_scheduled {
            return Err(StorageError::InvalidConfig(format!(
                "log {}: a remote log is attached only while no append is pending",
                self.name
            )));
        }
        state.remote = Some(remote);
        Ok(())
    }

    /// Makes an empty log's first entry id `entry_id` instead of 0 (cluster mode: a new
    /// owner's copy of a topic whose entries before `entry_id` were trimmed, so that local
    /// entry `n` stays the object-store log's entry `n`). Refused once anything was appended.
    pub fn start_at(&self, entry_id: u64) -> Result<()> {
        let replaced = {
            let mut state = self.lock();
            let empty = state.next_entry_id == 0
                && state.pending.is_empty()
                && state
                    .segments
                    .iter()
                    .all(|segment| segment.entry_count() == 0);
            if !empty {
                return Err(StorageError::InvalidConfig(format!(
                    "log {}: only an empty log can start at entry {entry_id}",
                    self.name
                )));
            }
            if entry_id == 0 {
                return Ok(());
            }
            let ledger_id = state.ledger_id;
            let Some(active) = state.segments.last_mut() else {
                return Err(StorageError::Closed {
                    log: self.name.clone(),
                });
            };
            // The empty file made at open names entry 0; the first append creates the new one.
            let fresh = Segment::new(&self.directory, ledger_id, entry_id);
            let replaced = std::mem::replace(active, fresh);
            state.next_entry_id = entry_id;
            replaced
        };
        if !matches!(replaced.file, SegmentFile::NotCreated) {
            let io = self.shared.io.as_ref();
            io.remove_file(&replaced.path)
                .map_err(|error| StorageError::io("remove segment", &replaced.path, error))?;
            io.sync_dir(&self.directory)
                .map_err(|error| StorageError::io("fsync directory", &self.directory, error))?;
        }
        Ok(())
    }

    /// Appends one entry. Returns at once with its position; the returned [`PendingAppend`]
    /// completes once the entry and everything before it are durable.
    pub fn append(self: &Arc<Self>, data: Bytes, publish_time_ms: u64) -> Result<PendingAppend> {
        self.append_with_checksum(data, publish_time_ms, None)
    }

    /// [`Log::append`], given the CRC32C of most of the entry's bytes (the producer's checksum,
    /// verified on receipt): the record's checksum is then derived from it, and only the bytes
    /// before `known.offset` are read again. A `known` checksum that does not describe the
    /// bytes makes the record fail its check when read, never pass it.
    pub fn append_with_checksum(
        self: &Arc<Self>,
        data: Bytes,
        publish_time_ms: u64,
        known: Option<KnownChecksum>,
    ) -> Result<PendingAppend> {
        let config = &self.shared.config;
        if data.len() > config.entry_max_bytes {
            return Err(StorageError::EntryTooLarge {
                size: data.len(),
                max: config.entry_max_bytes,
            });
        }
        let record_len = RECORD_FRAMING_LEN + ENTRY_HEADER_LEN + data.len() as u64;
        let (sender, receiver) = oneshot::channel();
        let mut guard = self.lock();
        let state = &mut *guard;
        if let Some(error) = state.corruption.as_ref().or(state.failure.as_ref()) {
            return Err(error.clone());
        }
        if state.closed {
            return Err(StorageError::Closed {
                log: self.name.clone(),
            });
        }
        if state.pending_bytes + record_len > config.pending_max_bytes_per_log {
            return Err(StorageError::TooManyPendingBytes {
                log: self.name.clone(),
                pending_bytes: state.pending_bytes,
                limit: config.pending_max_bytes_per_log,
            });
        }
        let ledger_id = state.ledger_id;
        let entry_id = state.next_entry_id;
        let position = Position::new(ledger_id, entry_id);
        // Handed to the remote log first: if it refuses, nothing changed here.
        let remote_commit = match &state.remote {
            None => None,
            Some(remote) => match remote.append(entry_id, data.clone(), publish_time_ms) {
                Ok(commit) => Some(commit),
                Err(error) => {
                    if matches!(error, StorageError::Remote { .. }) && state.failure.is_none() {
                        state.failure = Some(error.clone());
                    }
                    return Err(error);
                }
            },
        };
        let mut rolled = false;
        let needs_roll = state.segments.last().is_some_and(|active| {
            active.entry_count() > 0 && active.end + record_len > config.segment_max_bytes
        });
        if needs_roll {
            let next = match state.free_files.pop() {
                Some(free) => Segment::recycling(&self.directory, ledger_id, entry_id, free),
                None => Segment::new(&self.directory, ledger_id, entry_id),
            };
            state.segments.push(next);
            rolled = true;
        }
        let Some(active) = state.segments.last_mut() else {
            return Err(StorageError::Closed {
                log: self.name.clone(),
            });
        };
        // The first segment of this open's ledger has no file yet if the disk was full when
        // the log opened (or a full disk rolled its creation back).
        let create =
            rolled || (matches!(active.file, SegmentFile::NotCreated) && active.entry_count() == 0);
        let offset = active.end;
        active.push_entry(offset, publish_time_ms);
        active.end += record_len;
        active.last_write_ms = now_ms();
        let segment_first_entry_id = active.first_entry_id;
        let salt = active.salt;
        let joins_last_batch = !create
            && state.pending.back().is_some_and(|batch| {
                batch.ledger_id == ledger_id
                    && batch.segment_first_entry_id == segment_first_entry_id
            });
        if !joins_last_batch {
            state.pending.push_back(PendingBatch {
                ledger_id,
                segment_first_entry_id,
                create,
                file_offset: offset,
                bytes: state.spare_batch.take().unwrap_or_default(),
                first: position,
                last: position,
                waiters: Vec::new(),
                remote: Vec::new(),
            });
        }
        let Some(batch) = state.pending.back_mut() else {
            return Err(StorageError::Closed {
                log: self.name.clone(),
            });
        };
        let mut header = [0u8; ENTRY_HEADER_LEN as usize];
        header[..8].copy_from_slice(&entry_id.to_le_bytes());
        header[8..].copy_from_slice(&publish_time_ms.to_le_bytes());
        let header_checksum = crc32c::crc32c_append(salt, &header);
        let checksum = match known.filter(|known| known.offset <= data.len()) {
            Some(known) => format::crc32c_combine(
                crc32c::crc32c_append(header_checksum, &data[..known.offset]),
                known.crc32c,
                data.len() - known.offset,
            ),
            None => crc32c::crc32c_append(header_checksum, &data),
        };
        let framing = format::record_framing(header.len() + data.len(), checksum);
        batch.bytes.push_record(&framing, &header, &data);
        batch.last = position;
        batch.waiters.push(sender);
        batch.remote.extend(remote_commit);
        // What the flush this append may schedule has to do: see `Shared::schedule_flush`.
        let flush = ScheduledFlush {
            bytes: record_len,
            whole: batch.flushed_whole(),
        };
        state.next_entry_id += 1;
        state.pending_bytes += record_len;
        state.stats.entries_appended += 1;
        state.stats.bytes_appended += data.len() as u64;
        state.cache.insert(
            Entry {
                position,
                publish_time_ms,
                data,
            },
            &self.shared.cache_used_bytes,
            self.shared.config.cache_max_bytes,
        );
        let schedule = !state.flush_scheduled;
        state.flush_scheduled = true;
        drop(guard);
        if schedule {
            self.shared.schedule_flush(self.clone(), flush);
        }
        Ok(PendingAppend { position, receiver })
    }

    /// Writes (and fsyncs) the oldest pending batch. Runs on a flush thread; at most one call
    /// per log is active (guarded by `flush_scheduled`). [`AfterFlush::Again`] if more batches
    /// are pending: the log is still the calling thread's to flush, and the thread queues it
    /// again behind the other logs waiting for a flush thread, so that a busy log cannot keep
    /// a thread to itself while other logs' appends wait.
    pub(crate) fn flush(self: &Arc<Self>) -> AfterFlush {
        match self.take_batch() {
            Ok(taken) => self.flush_taken(taken),
            Err(after) => after,
        }
    }

    /// Writes the oldest pending batch into its segment without an fsync, for the entry WAL
    /// to make durable ([`Log::finish_written`] once it did or failed). A batch that starts a
    /// segment, or that a remote log commits too, is flushed whole here instead (with its own
    /// fsync): the WAL covers only appends to a segment whose file exists.
    pub(crate) fn flush_unsynced(self: &Arc<Self>) -> Flushing {
        let taken = match self.take_batch() {
            Ok(taken) => taken,
            Err(after) => return Flushing::Done(after),
        };
        if taken.batch.flushed_whole() {
            return Flushing::Done(self.flush_taken(taken));
        }
        let TakenBatch {
            batch,
            file,
            path,
            new_segment,
        } = taken;
        match self.write_batch(&batch, file, &path, new_segment, false) {
            Ok(file) => Flushing::Written(WrittenBatch { batch, path, file }),
            Err(error) => Flushing::Done(self.finish_flush(batch, &path, Err(error), false)),
        }
    }

    /// Completes a batch [`Log::flush_unsynced`] wrote, once the entry WAL made it durable (or
    /// failed to: then as if the segment's own write or fsync had failed).
    /// `synced`: the segment's own fsync made it durable ([`WrittenBatch::sync_segment`]).
    pub(crate) fn finish_written(
        self: &Arc<Self>,
        written: WrittenBatch,
        outcome: std::result::Result<(), (FlushStage, StorageError)>,
        synced: bool,
    ) -> AfterFlush {
        let WrittenBatch { batch, path, file } = written;
        self.finish_flush(batch, &path, outcome.map(|()| file), synced)
    }

    /// The name of the log's directory under `logs/`.
    pub(crate) fn directory_name(&self) -> &str {
        self.directory
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or_default()
    }

    /// The flush role is this thread's (`flush_scheduled`): takes the oldest pending batch
    /// with what writing it needs, or says what the thread does with the log instead.
    fn take_batch(self: &Arc<Self>) -> std::result::Result<TakenBatch, AfterFlush> {
        let (batch, file, path, new_segment) = {
            let mut state = self.lock();
            if let Some(error) = state.failure.clone() {
                let abandoned: Vec<PendingBatch> = state.pending.drain(..).collect();
                state.pending_bytes = 0;
                let cut = std::mem::take(&mut state.unsynced_cut_pending);
                drop(state);
                if cut {
                    self.cut_back_to_synced();
                }
                self.lock().flush_scheduled = false;
                self.flush_finished.notify_all();
                for batch in abandoned {
                    complete(batch.waiters, Err(error.clone()));
                }
                return Err(AfterFlush::Idle);
            }
            let Some(batch) = state.pending.pop_front() else {
                state.flush_scheduled = false;
                drop(state);
                self.flush_finished.notify_all();
                return Err(AfterFlush::Idle);
            };
            let index = state.segment_index_for_batch(&batch);
            // The segment before a new one: its file may be a recycled one, longer than its
            // records (cut to them before the new segment exists).
            let previous = index
                .filter(|_| batch.create)
                .and_then(|index| index.checked_sub(1))
                .and_then(|previous| {
                    let segment = &state.segments[previous];
                    Some((segment.open_file()?, segment.flushed_end))
                });
            let segment = index.map(|index| &mut state.segments[index]);
            let (file, path, new_segment) = match segment {
                Some(segment) => (
                    segment.open_file(),
                    segment.path.clone(),
                    NewSegment {
                        continues: segment.continues,
                        salt: segment.salt,
                        recycle_from: segment.recycle_from.take(),
                        previous,
                    },
                ),
                None => (None, self.directory.clone(), NewSegment::default()),
            };
            (batch, file, path, new_segment)
        };

        Ok(TakenBatch {
            batch,
            file,
            path,
            new_segment,
        })
    }

    /// Writes, fsyncs (and with a remote log, commits there) a taken batch, then completes it.
    fn flush_taken(self: &Arc<Self>, taken: TakenBatch) -> AfterFlush {
        let TakenBatch {
            mut batch,
            file,
            path,
            new_segment,
        } = taken;
        let outcome = self.write_batch(&batch, file, &path, new_segment, true);
        // With a remote log the batch is durable only once every entry of it is committed
        // there too (waited for off the lock; the log's next flush waits behind this one).
        let outcome = match outcome {
            Ok(file) if !batch.remote.is_empty() => {
                match crate::remote::wait_all(std::mem::take(&mut batch.remote)) {
                    Ok(()) => Ok(file),
                    Err(error) => Err((FlushStage::Remote, error)),
                }
            }
            outcome => outcome,
        };
        self.finish_flush(batch, &path, outcome, true)
    }

    /// Records the outcome of a batch's flush: on success the log's durable end moves and the
    /// batch's appends complete; on failure they fail (rolled back on a full disk, else the log
    /// is poisoned). `synced`: the segment's fsync covered the batch (not so when the entry WAL
    /// made it durable).
    fn finish_flush(
        self: &Arc<Self>,
        batch: PendingBatch,
        path: &Path,
        outcome: std::result::Result<Arc<dyn IoFile>, (FlushStage, StorageError)>,
        synced: bool,
    ) -> AfterFlush {
        let mut state = self.lock();
        let outcome = match (outcome, state.failure.clone()) {
            // A relaxed periodic fsync failed while this batch was being written: it is not
            // acknowledged, and its bytes are cut off with the other unsynced ones.
            (Ok(file), Some(failure)) => {
                if let Some(segment) = state.segment_for_batch_mut(&batch) {
                    segment.file = SegmentFile::Open(file);
                    segment.flushed_end = batch.file_offset + batch.bytes.len();
                }
                Err((FlushStage::Sync, failure))
            }
            (outcome, _) => outcome,
        };
        // Whether more is pending and the log is still this thread's to flush.
        let more = match outcome {
            Ok(file) => {
                let fsynced =
                    synced && matches!(self.shared.config.flush_policy, FlushPolicy::Fsync);
                if let Some(segment) = state.segment_for_batch_mut(&batch) {
                    segment.file = SegmentFile::Open(file);
                    segment.flushed_end = batch.file_offset + batch.bytes.len();
                    if fsynced {
                        segment.synced_end = segment.flushed_end;
                    }
                }
                // Closed once the lock is released (a close is a system call, which may wait
                // for the file system; readers wait for this lock, some on async workers).
                let closed_files = if batch.create {
                    state.close_sealed_files()
                } else {
                    Vec::new()
                };
                debug_assert!(state.last_durable < Some(batch.first));
                state.last_durable = Some(batch.last);
                state.pending_bytes -= batch.bytes.len();
                state.stats.flushes += 1;
                state.stats.bytes_flushed += batch.bytes.len();
                let more = !state.pending.is_empty();
                if !more {
                    state.flush_scheduled = false;
                }
                // Only `close` waits for flushes, and only after setting `closed` under this
                // lock: without it, nobody is waiting (a notification is a system call).
                let closing = state.closed;
                drop(state);
                drop(closed_files);
                if !more && closing {
                    self.flush_finished.notify_all();
                }
                self.durable.send_replace(Some(batch.last));
                let PendingBatch { bytes, waiters, .. } = batch;
                complete(waiters, Ok(()));
                if let Some(spare) = bytes.recycle() {
                    let mut state = self.lock();
                    if state.spare_batch.is_none() {
                        state.spare_batch = Some(spare);
                    }
                }
                more
            }
            Err((stage, error)) => {
                let rolled_back = matches!(stage, FlushStage::Create | FlushStage::Write)
                    && matches!(error, StorageError::DiskFull { .. })
                    && self.undo_partial_write(&batch, path);
                let mut failed = vec![batch];
                if rolled_back {
                    tracing::warn!(log = %self.name, %error, "append failed, disk full; rolled back");
                    failed.extend(state.pending.drain(..));
                    state.rollback_to(failed[0].first, &self.shared.cache_used_bytes);
                } else if matches!(stage, FlushStage::Remote) {
                    // Not the local files' fault: no poison report (the caller reopens the
                    // log, rebuilt from the remote side). Its bytes stay beyond
                    // `last_durable`, never read.
                    if state.failure.is_none() {
                        state.failure = Some(error.clone());
                    }
                    failed.extend(state.pending.drain(..));
                    state.pending_bytes = 0;
                } else {
                    if matches!(stage, FlushStage::Sync)
                        && matches!(self.shared.config.flush_policy, FlushPolicy::Fsync)
                    {
                        self.cut_back_unsynced(&failed[0], path);
                    }
                    if state.failure.is_none() {
                        state.failure = Some(self.poisoned(error.to_string()));
                    }
                    failed.extend(state.pending.drain(..));
                    state.pending_bytes = 0;
                }
                let cut = std::mem::take(&mut state.unsynced_cut_pending);
                drop(state);
                if cut {
                    self.cut_back_to_synced();
                }
                if rolled_back {
                    // Files kept for reuse hold disk that appends now need.
                    self.shared.release_free_files();
                }
                // After a rollback the log takes appends again, and one made since the lock
                // was dropped above found the flush role taken and queued nothing: this
                // thread keeps the role and queues the log for it.
                let more = {
                    let mut state = self.lock();
                    state.flush_scheduled = !state.pending.is_empty();
                    state.flush_scheduled
                };
                if !more {
                    self.flush_finished.notify_all();
                }
                for batch in failed {
                    complete(batch.waiters, Err(error.clone()));
                }
                more
            }
        };
        if more {
            AfterFlush::Again
        } else {
            AfterFlush::Idle
        }
    }

    /// Writes `batch` into its segment (creating the file first if the batch starts it), and
    /// fsyncs it if `sync` (under the `Fsync` policy).
    fn write_batch(
        &self,
        batch: &PendingBatch,
        file: Option<Arc<dyn IoFile>>,
        path: &Path,
        new_segment: NewSegment,
        sync: bool,
    ) -> std::result::Result<Arc<dyn IoFile>, (FlushStage, StorageError)> {
        let io = self.shared.io.as_ref();
        let file = match file {
            Some(file) => file,
            None => {
                debug_assert!(batch.create, "batch for a segment without a file");
                // Under the relaxed policy the segment being sealed may hold unsynced bytes.
                // Sync them before its successor exists: recovery allows a torn tail only in
                // the newest segment, so a sealed one must never be torn.
                if matches!(
                    self.shared.config.flush_policy,
                    FlushPolicy::RelaxedWriteOnly { .. }
                ) {
                    self.sync_written()
                        .map_err(|error| (FlushStage::Sync, error))?;
                } else if self.shared.entry_wal.is_some() {
                    // Likewise for the bytes the entry WAL made durable: its replay writes
                    // only into a log's newest segment.
                    self.sync_for_wal()
                        .map_err(|error| (FlushStage::SyncPrevious, error))?;
                }
                // Only the newest segment may hold bytes beyond its records (a recycled file's
                // earlier life): recovery reads an older one to its end.
                if let Some((previous, records_end)) = &new_segment.previous {
                    cut_to_records(previous.as_ref(), *records_end).map_err(|error| {
                        (
                            FlushStage::Create,
                            StorageError::io("truncate", path, error),
                        )
                    })?;
                }
                // A roll continues the same ledger at the entry it starts with; the first segment
                // of a ledger, where the previous ledger ended.
                let continues = new_segment
                    .continues
                    .unwrap_or(Position::new(batch.ledger_id, batch.segment_first_entry_id));
                let header = FileHeader {
                    kind: FileKind::Segment,
                    fields: [
                        batch.ledger_id,
                        batch.segment_first_entry_id,
                        now_ms(),
                        continues.ledger_id,
                        continues.entry_id,
                    ],
                    salt: new_segment.salt,
                };
                let recycled = new_segment
                    .recycle_from
                    .and_then(|free| self.recycle_file(&free, path, header));
                match recycled {
                    Some(file) => file,
                    None => format::create_file(io, path, header)
                        .map_err(|error| (FlushStage::Create, error))?,
                }
            }
        };
        file.write_all_vectored_at(&batch.bytes.slices(), batch.file_offset)
            .map_err(|error| (FlushStage::Write, StorageError::io("write", path, error)))?;
        if sync && matches!(self.shared.config.flush_policy, FlushPolicy::Fsync) {
            file.sync()
                .map_err(|error| (FlushStage::Sync, StorageError::io("fsync", path, error)))?;
        }
        Ok(file)
    }

    /// Makes the trimmed segment file `free` the segment file `path` with `header`
    /// ([`format::recycle_file`]). `None` (with a WARN) if any step failed: the caller creates
    /// a new file.
    fn recycle_file(
        &self,
        free: &Path,
        path: &Path,
        header: FileHeader,
    ) -> Option<Arc<dyn IoFile>> {
        format::recycle_file(self.shared.io.as_ref(), free, path, header)
            .inspect_err(|error| {
                tracing::warn!(log = %self.name, free = %free.display(), %error, "could not write a segment into a recycled file; creating a new one");
            })
            .ok()
    }

    /// After a "disk full" failure, removes the failed batch's bytes from the file so that the
    /// file again ends at its last flushed record, durably: the part of the batch that fit may
    /// already be on disk (writeback), and a power cut must not bring it back. Returns false if
    /// that was not possible (the caller then poisons the log).
    fn undo_partial_write(&self, batch: &PendingBatch, path: &Path) -> bool {
        let io = self.shared.io.as_ref();
        if batch.create {
            // The new segment held nothing yet: remove whatever part of it was created.
            let removed = match io.remove_file(path) {
                Ok(()) => true,
                Err(error) => error.kind() == std::io::ErrorKind::NotFound,
            };
            return removed && io.sync_dir(&self.directory).is_ok();
        }
        match io.open(path) {
            Ok(file) => file
                .set_len(batch.file_offset)
                .and_then(|()| file.sync())
                .is_ok(),
            Err(_) => false,
        }
    }

    /// After a failed fsync of `batch`, cuts its bytes off the file (durably), so that reopening
    /// the log in this process, which reads the file through the page cache, does not serve
    /// appends that failed. Failures are logged; the log is poisoned either way.
    fn cut_back_unsynced(&self, batch: &PendingBatch, path: &Path) {
        let cut = self
            .shared
            .io
            .open(path)
            .and_then(|file| file.set_len(batch.file_offset).and_then(|()| file.sync()));
        if let Err(error) = cut {
            tracing::error!(log = %self.name, path = %path.display(), %error, "could not cut back the appends whose fsync failed; a reopen may serve them until a power cut");
        }
    }

    /// Under the relaxed policy, fsyncs every segment with written but unsynced bytes. A
    /// failure poisons the log (and is logged here): after a failed fsync the unsynced bytes
    /// may or may not be on disk (Linux marks the pages clean either way, so a later fsync
    /// succeeds without writing them), so they are treated as lost at once, as a power cut
    /// would lose them: nothing beyond the last synced entry is served or can be acknowledged
    /// by a cursor from then on, and the bytes are cut off the files (truncate, fsync) so that
    /// a reopen does not serve them either.
    pub(crate) fn sync_written(&self) -> Result<()> {
        struct SyncTarget {
            ledger_id: u64,
            first_entry_id: u64,
            flushed_end: u64,
            file: Arc<dyn IoFile>,
            path: PathBuf,
        }
        let targets: Vec<SyncTarget> = {
            let state = self.lock();
            if let Some(failure) = &state.failure {
                // A sync after a failed one proves nothing (see above).
                return Err(failure.clone());
            }
            state
                .segments
                .iter()
                .filter(|segment| segment.synced_end < segment.flushed_end)
                .filter_map(|segment| {
                    Some(SyncTarget {
                        ledger_id: segment.ledger_id,
                        first_entry_id: segment.first_entry_id,
                        flushed_end: segment.flushed_end,
                        file: segment.open_file()?,
                        path: segment.path.clone(),
                    })
                })
                .collect()
        };
        for target in targets {
            if let Err(error) = target.file.sync() {
                let error = StorageError::io("fsync", &target.path, error);
                self.lose_unsynced(&error);
                return Err(error);
            }
            let mut state = self.lock();
            if let Some(segment) = state.segments.iter_mut().find(|segment| {
                segment.ledger_id == target.ledger_id
                    && segment.first_entry_id == target.first_entry_id
            }) {
                segment.synced_end = segment.synced_end.max(target.flushed_end);
            }
        }
        Ok(())
    }

    /// With the entry WAL: fsyncs every segment file the log holds open, so that the WAL's
    /// records for them are no longer needed (a checkpoint, a close, a roll). A failure poisons
    /// the log and pins the WAL: its files stay until the next start replays them, which
    /// restores what the failed fsync may not have written. Nothing is cut back: the appends
    /// are durable in the WAL.
    pub(crate) fn sync_for_wal(&self) -> Result<()> {
        let targets: Vec<(Arc<dyn IoFile>, PathBuf, u64)> = self
            .lock()
            .segments
            .iter()
            .filter_map(|segment| {
                Some((
                    segment.open_file()?,
                    segment.path.clone(),
                    segment.flushed_end,
                ))
            })
            .collect();
        for (file, path, flushed_end) in targets {
            if let Err(error) = file.sync() {
                let error = StorageError::io("fsync", &path, error);
                if let Some(wal) = &self.shared.entry_wal {
                    wal.pin();
                }
                let mut state = self.lock();
                if state.failure.is_none() {
                    state.failure = Some(self.poisoned(error.to_string()));
                }
                return Err(error);
            }
            let mut state = self.lock();
            if let Some(segment) = state
                .segments
                .iter_mut()
                .find(|segment| segment.path == path)
            {
                segment.synced_end = segment.synced_end.max(flushed_end);
            }
        }
        Ok(())
    }

    /// After a failed relaxed fsync: poisons the log, serves nothing beyond the last synced
    /// entry, and cuts the unsynced bytes off (now if no flush is in flight, else by the flush
    /// thread when it finishes, so that no write of it lands after the cut).
    fn lose_unsynced(&self, error: &StorageError) {
        let mut state = self.lock();
        let last_synced = state.last_synced();
        if state.failure.is_none() {
            let lost = match (last_synced, state.last_durable) {
                (Some(synced), Some(written)) if synced < written => {
                    format!("those after {synced} up to {written}")
                }
                (None, Some(written)) => format!("all up to {written}"),
                _ => "none".to_string(),
            };
            state.failure = Some(self.poisoned(format!(
                "{error}; acknowledged entries lost (relaxed mode), no longer served: {lost}"
            )));
        }
        state.last_durable = state.last_durable.min(last_synced);
        self.durable.send_replace(state.last_durable);
        // The lost entries' acknowledgements no longer count (see `Log::open`).
        let last_durable = state.last_durable;
        for slot in state.cursors.values_mut() {
            slot.state.acknowledged.remove_after(last_durable);
        }
        let used_bytes = &self.shared.cache_used_bytes;
        match state.last_durable {
            Some(last) => {
                let after = Position::new(last.ledger_id, last.entry_id + 1);
                state.cache.truncate_from(after, used_bytes);
            }
            None => state.cache.clear(used_bytes),
        }
        if state.flush_scheduled {
            state.unsynced_cut_pending = true;
            return;
        }
        // Take the flush role, so that no append is written while the files are cut.
        state.flush_scheduled = true;
        drop(state);
        self.cut_back_to_synced();
        self.lock().flush_scheduled = false;
        self.flush_finished.notify_all();
    }

    /// Truncates every segment file to its synced length (durably). Only with the flush role.
    fn cut_back_to_synced(&self) {
        let targets: Vec<(PathBuf, u64)> = self
            .lock()
            .segments
            .iter()
            .filter(|segment| !matches!(segment.file, SegmentFile::NotCreated))
            .filter(|segment| segment.flushed_end > segment.synced_end.max(HEADER_LEN))
            .map(|segment| (segment.path.clone(), segment.synced_end.max(HEADER_LEN)))
            .collect();
        for (path, length) in targets {
            let cut = self
                .shared
                .io
                .open(&path)
                .and_then(|file| file.set_len(length).and_then(|()| file.sync()));
            match cut {
                Ok(()) => {
                    let mut state = self.lock();
                    if let Some(segment) = state
                        .segments
                        .iter_mut()
                        .find(|segment| segment.path == path)
                    {
                        segment.flushed_end = length;
                    }
                }
                Err(error) => {
                    tracing::error!(log = %self.name, path = %path.display(), %error, "could not cut off the appends whose fsync failed; a reopen may serve them until a power cut");
                }
            }
        }
    }

    /// Reads the durable entries at `positions` (ascending), leaving out those that do not
    /// exist (trimmed): consecutive positions of a ledger are read together, as `read_from`
    /// reads a range, not one `read` each (a dispatcher's replay set is mostly such runs).
    pub fn read_positions(&self, positions: &[Position]) -> Result<Vec<Entry>> {
        self.read_positions_from(positions, Source::Anywhere)
            .map(|entries| entries.unwrap_or_default())
    }

    /// [`Log::read_positions`] if every entry it reads is in the entry cache, without touching
    /// the files: `None` if one would be read from a file. (A caller on an async runtime reads
    /// cached entries in place and sends only file reads to a blocking thread.)
    pub fn read_positions_cached(&self, positions: &[Position]) -> Result<Option<Vec<Entry>>> {
        self.read_positions_from(positions, Source::CacheOnly)
    }

    fn read_positions_from(
        &self,
        positions: &[Position],
        source: Source,
    ) -> Result<Option<Vec<Entry>>> {
        let mut entries = Vec::with_capacity(positions.len());
        let mut rest = positions;
        while let Some(&first) = rest.first() {
            let run = 1 + rest
                .windows(2)
                .take_while(|pair| {
                    pair[1].ledger_id == pair[0].ledger_id
                        && pair[1].entry_id == pair[0].entry_id + 1
                })
                .count();
            let (wanted, after) = rest.split_at(run);
            let Some(read) = self.read_range(first, run, usize::MAX, source)? else {
                return Ok(None);
            };
            entries.extend(
                read.into_iter()
                    .filter(|entry| wanted.binary_search(&entry.position).is_ok()),
            );
            rest = after;
        }
        Ok(Some(entries))
    }

    /// Reads the entry at `position`.
    pub fn read(&self, position: Position) -> Result<Entry> {
        let mut entries = self.read_from(position, 1, 1)?;
        match entries.pop() {
            Some(entry) if entry.position == position => Ok(entry),
            _ => Err(StorageError::PositionNotFound {
                log: self.name.clone(),
                position,
            }),
        }
    }

    /// Reads durable entries at or after `start`, in order: at most `max_entries`, and stopping
    /// once `max_bytes` of data are gathered (at least one entry is returned if any exists).
    /// `start` need not be the position of an existing entry.
    pub fn read_from(
        &self,
        start: Position,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>> {
        self.read_range(start, max_entries, max_bytes, Source::Anywhere)
            .map(|entries| entries.unwrap_or_default())
    }

    /// [`Log::read_from`] if every entry it reads is in the entry cache, without touching the
    /// files: `None` if one would be read from a file.
    pub fn read_from_cached(
        &self,
        start: Position,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<Entry>>> {
        self.read_range(start, max_entries, max_bytes, Source::CacheOnly)
    }

    /// `None` only for [`Source::CacheOnly`], when a planned part is not in the cache (checked
    /// before any part is read: nothing of the range is read then).
    fn read_range(
        &self,
        start: Position,
        max_entries: usize,
        max_bytes: usize,
        source: Source,
    ) -> Result<Option<Vec<Entry>>> {
        let mut read = ReadBudget {
            entries: Vec::with_capacity(max_entries.min(READ_ENTRIES_RESERVED)),
            bytes: 0,
            max_entries,
            max_bytes,
        };
        let mut next = Some(start);
        // A plan ends after a run of a sealed segment (sparse index: its records' sizes are
        // known only once read); the next plan continues after it while the budget lasts.
        while let Some(start) = next.take() {
            if read.exhausted() {
                break;
            }
            let Some((parts, resume)) = self.plan_read(start, &read, source)? else {
                return Ok(None);
            };
            debug_assert!(
                matches!(source, Source::Anywhere)
                    || parts.iter().all(|part| matches!(part, ReadPart::Cached(_)))
            );
            for part in parts {
                self.read_part(part, &mut read)?;
            }
            next = resume;
        }
        Ok(Some(read.entries))
    }

    /// Under the lock: what to read from where, starting at `start`, within what is left of
    /// the budget. Returns the parts and, if the plan stopped after a run of a sealed segment,
    /// the position after that run. `None` ([`Source::CacheOnly`] only) at the first entry that
    /// is not cached: no file handle is taken, so none is ever closed by the caller (on an async
    /// worker) after the log let go of it.
    fn plan_read(
        &self,
        start: Position,
        read: &ReadBudget,
        source: Source,
    ) -> Result<Option<(Vec<ReadPart>, Option<Position>)>> {
        // A plan from the cache has a part per entry; one from the files a part per run.
        let mut parts = match source {
            Source::CacheOnly => Vec::with_capacity(read.room()),
            Source::Anywhere => Vec::new(),
        };
        let state = self.lock();
        if let Some(error) = &state.corruption {
            return Err(error.clone());
        }
        let Some(last_durable) = state.last_durable else {
            return Ok(Some((parts, None)));
        };
        let mut count = read.entries.len();
        let mut bytes = read.bytes;
        let first_segment = state
            .segments
            .partition_point(|segment| segment.last_position().is_some_and(|last| last < start));
        for segment in &state.segments[first_segment..] {
            if segment.entry_count() == 0 {
                continue;
            }
            let first_index = if segment.contains(start) {
                (start.entry_id - segment.first_entry_id) as usize
            } else {
                0
            };
            let mut run = DiskRun::default();
            for index in first_index..segment.index.len() {
                let position =
                    Position::new(segment.ledger_id, segment.first_entry_id + index as u64);
                if position > last_durable
                    || count >= read.max_entries
                    || (count > 0 && bytes >= read.max_bytes)
                {
                    let resume = run.close(&mut parts, segment, index);
                    return Ok(Some((parts, resume)));
                }
                if let Some(entry) = state.cache.get(position) {
                    if let Some(resume) = run.close(&mut parts, segment, index) {
                        // The run's size is unknown until it is read: plan again after it.
                        return Ok(Some((parts, Some(resume))));
                    }
                    count += 1;
                    bytes += entry.data.len();
                    parts.push(ReadPart::Cached(entry.clone()));
                    continue;
                }
                if matches!(source, Source::CacheOnly) {
                    return Ok(None);
                }
                count += 1;
                run.first.get_or_insert(index);
                if let Some(range) = segment.record_range(index) {
                    bytes += (range.1 - range.0) as usize;
                    run.ranges.push(range);
                }
            }
            if let Some(resume) = run.close(&mut parts, segment, segment.index.len()) {
                return Ok(Some((parts, Some(resume))));
            }
        }
        Ok(Some((parts, None)))
    }

    /// Reads one planned part into `read`, within its budget.
    fn read_part(&self, part: ReadPart, read: &mut ReadBudget) -> Result<()> {
        match part {
            ReadPart::Cached(entry) => {
                read.bytes += entry.data.len();
                read.entries.push(entry);
                Ok(())
            }
            ReadPart::Dense {
                file,
                path,
                ledger_id,
                salt,
                first_entry_id,
                ranges,
            } => {
                let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
                    return Ok(());
                };
                let (start_offset, end_offset) = (first.0, last.1);
                let file = self.segment_file(file, &path)?;
                let mut buffer = Vec::new();
                file.read_exact_at_into(
                    &mut buffer,
                    (end_offset - start_offset) as usize,
                    start_offset,
                )
                .map_err(|error| StorageError::io("read", &path, error))?;
                let buffer = Bytes::from(buffer);
                for (index, (record_start, record_end)) in ranges.iter().enumerate() {
                    let entry_id = first_entry_id + index as u64;
                    let at = (record_start - start_offset) as usize;
                    let record = buffer.slice(at..(record_end - start_offset) as usize);
                    let at = (ledger_id, salt, entry_id, *record_start);
                    self.push_decoded(read, &path, at, record)?;
                }
                Ok(())
            }
            ReadPart::Scan {
                file,
                path,
                ledger_id,
                salt,
                first_entry_id,
                from_index,
                from_offset,
                wanted_index,
                last_index,
                end_offset,
                mean_record,
                last_end_bound,
            } => {
                let file = self.segment_file(file, &path)?;
                let mut chunks = ChunkReader {
                    file: file.as_ref(),
                    path: &path,
                    end: end_offset,
                    start: from_offset,
                    buffer: Bytes::new(),
                    // The mean misleads where small and huge records mix: the run's records
                    // are known to end by `last_end_bound`.
                    until: (from_offset
                        + read_ahead(read, from_index, wanted_index, last_index, mean_record))
                    .min(last_end_bound),
                };
                let mut offset = from_offset;
                for index in from_index..=last_index {
                    if index >= wanted_index && read.exhausted() {
                        break;
                    }
                    let entry_id = first_entry_id + index as u64;
                    // A recycled file's bytes may be anything here (see `bad_record`).
                    let bad = |error| self.bad_record(&path, (ledger_id, entry_id), error);
                    let framing = chunks.get(offset, RECORD_FRAMING_LEN).map_err(bad)?;
                    let body_len = u64::from(u32::from_le_bytes([
                        framing[0], framing[1], framing[2], framing[3],
                    ]));
                    let record_len = RECORD_FRAMING_LEN + body_len;
                    if index >= wanted_index {
                        let record = chunks.get(offset, record_len).map_err(bad)?;
                        let at = (ledger_id, salt, entry_id, offset);
                        self.push_decoded(read, &path, at, record)?;
                    }
                    offset += record_len;
                }
                Ok(())
            }
        }
    }

    /// The file of a segment being read: the open one, or (sealed) opened for this read.
    fn segment_file(&self, file: Option<Arc<dyn IoFile>>, path: &Path) -> Result<Arc<dyn IoFile>> {
        match file {
            Some(file) => Ok(file),
            None => self
                .shared
                .io
                .open(path)
                .map_err(|error| StorageError::io("open", path, error)),
        }
    }

    /// Decodes the record of entry `entry_id` (of ledger `ledger_id`, in a segment with salt
    /// `salt`, at `offset`) into `read`; a bad record marks the log corrupted, unless its
    /// segment was trimmed while it was being read (its file may then have been recycled).
    fn push_decoded(
        &self,
        read: &mut ReadBudget,
        path: &Path,
        (ledger_id, salt, entry_id, offset): (u64, u32, u64, u64),
        record: Bytes,
    ) -> Result<()> {
        match decode_entry(&record, entry_id, salt) {
            Ok((publish_time_ms, data_start)) => {
                read.bytes += record.len();
                read.entries.push(Entry {
                    position: Position::new(ledger_id, entry_id),
                    publish_time_ms,
                    data: record.slice(data_start..),
                });
                Ok(())
            }
            Err(reason) => Err(self.bad_record(
                path,
                (ledger_id, entry_id),
                StorageError::corrupted(path, offset, reason),
            )),
        }
    }

    /// The error of a read that found a bad record (or record framing) of entry `entry_id` of
    /// ledger `ledger_id` in `path`: NotFound if the entry was trimmed while it was being read
    /// (its segment's file may have been recycled: written into by a newer segment), else
    /// `error`, which marks the log corrupted.
    fn bad_record(
        &self,
        path: &Path,
        (ledger_id, entry_id): (u64, u64),
        error: StorageError,
    ) -> StorageError {
        let position = Position::new(ledger_id, entry_id);
        if self.first_position().is_none_or(|first| position < first) {
            return StorageError::io(
                "read",
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the segment was trimmed while it was being read",
                ),
            );
        }
        self.refuse_corrupted(error)
    }

    /// A read found corrupted bytes: the log refuses reads and appends from now on. Reported
    /// once, when first found: to the listener, else in an ERROR line.
    fn refuse_corrupted(&self, error: StorageError) -> StorageError {
        if matches!(error, StorageError::Corrupted { .. }) {
            let first = {
                let mut state = self.lock();
                let first = state.corruption.is_none();
                if first {
                    state.corruption = Some(error.clone());
                }
                first
            };
            if first && !self.tell_listener(&error) {
                tracing::error!(log = %self.name, %error, "read found corrupted data; log refuses service");
            }
        }
        error
    }

    /// The first durable entry's position at or after which `publish_time_ms` is reached: the
    /// first entry whose publish time is `>= publish_time_ms`. `None` if there is none.
    pub fn find_by_publish_time(&self, publish_time_ms: u64) -> Result<Option<Position>> {
        let start = {
            let state = self.lock();
            let mut start = None;
            for segment in &state.segments {
                let Some(block) = segment
                    .time_marks
                    .iter()
                    .position(|mark| *mark >= publish_time_ms)
                else {
                    continue;
                };
                start = Some(Position::new(
                    segment.ledger_id,
                    segment.first_entry_id + (block * TIME_BLOCK) as u64,
                ));
                break;
            }
            start
        };
        let Some(mut position) = start else {
            return Ok(None);
        };
        loop {
            let entries = self.read_from(position, TIME_BLOCK, usize::MAX)?;
            let Some(last) = entries.last() else {
                return Ok(None);
            };
            if let Some(found) = entries
                .iter()
                .find(|entry| entry.publish_time_ms >= publish_time_ms)
            {
                return Ok(Some(found.position));
            }
            position = self.next_position(last.position);
        }
    }

    /// Position of the first durable entry, if any.
    pub fn first_position(&self) -> Option<Position> {
        let state = self.lock();
        let last_durable = state.last_durable?;
        state
            .segments
            .iter()
            .find_map(Segment::first_position)
            .filter(|first| *first <= last_durable)
    }

    /// Position of the last durable entry, if any.
    pub fn last_position(&self) -> Option<Position> {
        self.lock().last_durable
    }

    /// How many times failed appends were rolled back (disk full): a position handed out
    /// before a rollback may be handed out again after it, to another entry. Read before an
    /// append and compared later, it tells whether that append's position can still be trusted
    /// to hold its entry.
    pub fn rollbacks(&self) -> u64 {
        self.lock().rollbacks
    }

    /// [`Log::last_position`] and [`Log::rollbacks`], read together.
    pub fn last_position_and_rollbacks(&self) -> (Option<Position>, u64) {
        let state = self.lock();
        (state.last_durable, state.rollbacks)
    }

    /// The position the next append will get.
    pub fn end_position(&self) -> Position {
        let state = self.lock();
        Position::new(state.ledger_id, state.next_entry_id)
    }

    /// The position that follows `position` in this log: the next entry, or where the next
    /// append will go if none follows yet.
    pub fn next_position(&self, position: Position) -> Position {
        self.lock().next_position(position)
    }

    /// The entry before `position` (`None` if `position` is at or before the first entry).
    pub fn previous_position(&self, position: Position) -> Option<Position> {
        let state = self.lock();
        state
            .segments
            .iter()
            .rev()
            .filter_map(|segment| {
                let first = segment.first_position()?;
                let last = segment.last_position()?;
                if first >= position {
                    return None;
                }
                Some(if last < position {
                    last
                } else {
                    Position::new(position.ledger_id, position.entry_id - 1)
                })
            })
            .next()
    }

    /// A receiver of the last durable position, for tailing reads: it changes whenever new
    /// entries become readable.
    pub fn watch_durable(&self) -> watch::Receiver<Option<Position>> {
        self.durable.subscribe()
    }

    /// Waits until an entry after `position` (or any entry, for `None`) is durable.
    pub async fn wait_for_entry_after(&self, position: Option<Position>) {
        let mut receiver = self.durable.subscribe();
        // The sender lives as long as the log, so this cannot fail while `self` exists.
        let _ = receiver.wait_for(|last| *last > position).await;
    }

    /// Number of durable entries after `position` (all of them for `None`).
    pub fn entries_after(&self, position: Option<Position>) -> u64 {
        self.lock().entries_after(position)
    }

    /// Bytes of the durable entries after `position` (all of them for `None`), framing included.
    ///
    /// Exact: where a sealed segment's sparse index lacks the offset of a boundary entry, its
    /// record headers are read forward from the nearest kept offset (at most
    /// `SPARSE_INDEX_ENTRIES` small reads, outside the log's lock). Were the estimate used
    /// instead, a backlog quota would count up to `SPARSE_INDEX_BYTES` of entries already
    /// acknowledged, refusing producers or evicting entries that are within it.
    pub fn bytes_after(&self, position: Option<Position>) -> u64 {
        let mut total: u64 = 0;
        // Boundaries to find by reading: (offset counted, whether it starts the bytes, how).
        let mut lookups: Vec<(u64, bool, OffsetLookup)> = Vec::new();
        {
            let state = self.lock();
            let Some(last_durable) = state.last_durable else {
                return 0;
            };
            for segment in &state.segments {
                let (Some(first), Some(last)) = (segment.first_position(), segment.last_position())
                else {
                    continue;
                };
                if position.is_some_and(|position| last <= position) || first > last_durable {
                    continue;
                }
                let start_index = match position {
                    Some(position) if segment.contains(position) => {
                        (position.entry_id + 1 - segment.first_entry_id) as usize
                    }
                    _ => 0,
                };
                let end_index =
                    (last.min(last_durable).entry_id + 1 - segment.first_entry_id) as usize;
                if start_index >= end_index {
                    continue;
                }
                let mut boundary = |index: usize, starts: bool| {
                    if index >= segment.index.len() {
                        return segment.end;
                    }
                    let (from_index, from_offset) = segment.indexed_at_or_before(index);
                    if from_index < index {
                        lookups.push((
                            from_offset,
                            starts,
                            OffsetLookup {
                                file: segment.open_file(),
                                path: segment.path.clone(),
                                from_offset,
                                records: index - from_index,
                                end: segment.end,
                            },
                        ));
                    }
                    from_offset
                };
                let start = boundary(start_index, true);
                let end = boundary(end_index, false);
                total += end - start;
            }
        }
        for (counted, starts, lookup) in lookups {
            match lookup.find(self.shared.io.as_ref()) {
                Ok(exact) if starts => total = total.saturating_sub(exact - counted),
                Ok(exact) => total += exact - counted,
                // Trimmed meanwhile, or unreadable: the estimate stands.
                Err(error) => {
                    tracing::debug!(log = %self.name, %error, "backlog bytes estimated")
                }
            }
        }
        total
    }

    /// Every ledger still in the log: (ledger id, entries, bytes).
    pub fn ledgers(&self) -> Vec<(u64, u64, u64)> {
        let state = self.lock();
        let mut ledgers: Vec<(u64, u64, u64)> = Vec::new();
        for segment in &state.segments {
            match ledgers.last_mut() {
                Some(last) if last.0 == segment.ledger_id => {
                    last.1 += segment.entry_count();
                    last.2 += segment.size_bytes();
                }
                _ => ledgers.push((
                    segment.ledger_id,
                    segment.entry_count(),
                    segment.size_bytes(),
                )),
            }
        }
        ledgers
    }

    /// Sets how much acknowledged data is kept.
    pub fn set_retention(&self, retention: Retention) {
        self.lock().retention = retention;
    }

    pub fn stats(&self) -> LogStats {
        let state = self.lock();
        LogStats {
            storage_bytes: state.segments.iter().map(Segment::size_bytes).sum(),
            segments: state.segments.len(),
            entries_cached: state.cache.len(),
            index_bytes: state.segments.iter().map(Segment::index_bytes).sum(),
            ..state.stats
        }
    }

    /// Deletes segments that every cursor has passed and that retention no longer needs.
    /// Returns the number of bytes freed. A remote log is then told the first entry kept
    /// ([`RemoteLog::trim_before`]), at every trim, so that one that failed is asked again.
    pub fn trim(&self) -> Result<u64> {
        let (remote, freed) = self.trim_segments()?;
        if let Some((remote, first_kept)) = remote {
            remote.trim_before(first_kept);
        }
        Ok(freed)
    }

    /// Removes the segments [`Log::trim`] may; returns the remote to tell and the first entry
    /// kept (with a remote log), and the bytes freed.
    fn trim_segments(&self) -> Result<(Option<RemoteTrim>, u64)> {
        let now = now_ms();
        let mut remote = None;
        let removed: Vec<Segment> = {
            let mut state = self.lock();
            // Read before anything is removed: the remote hears of the removal once the files
            // are gone (or at the next trim, if removing them fails).
            let first_kept = |state: &LogState| {
                state
                    .segments
                    .iter()
                    .find(|segment| segment.entry_count() > 0)
                    .map(|segment| segment.first_entry_id)
            };
            // A cursor counts with the lower of its persisted and its current mark-delete
            // position: the persisted one, so that a crash never leaves a cursor pointing
            // before data that no longer exists; the current one, because after a backward
            // seek whose persistence failed the cursor needs the earlier data again.
            let mut durable_cursors = state
                .cursors
                .values()
                .filter(|cursor| cursor.durable)
                .map(|cursor| cursor.persisted_mark_delete.min(cursor.state.mark_delete))
                .chain(state.deletions_in_flight.values().copied())
                .peekable();
            let slowest = if durable_cursors.peek().is_none() {
                state.last_durable
            } else {
                durable_cursors.min().flatten()
            };
            let Some(slowest) = slowest else {
                return Ok((None, 0));
            };
            let retention = state.retention;
            let total: u64 = state.segments.iter().map(Segment::size_bytes).sum();
            let mut size_to_delete = 0u64;
            let mut count = 0usize;
            // Never the newest segment that has a file, nor any after it. Right after a roll
            // the last segment has no file yet; the newest file is then the only record on disk
            // of the current ledger id, which the next open must start above.
            let newest_file = state
                .segments
                .iter()
                .rposition(|segment| !matches!(segment.file, SegmentFile::NotCreated))
                .unwrap_or(0);
            for segment in &state.segments[..newest_file] {
                if segment.last_position().is_some_and(|last| last > slowest) {
                    break;
                }
                // Unlike Pulsar, which may delete one segment too many, at least `limit`
                // bytes of acknowledged data stay.
                let over_size = retention
                    .size_bytes
                    .is_some_and(|limit| total - size_to_delete - segment.size_bytes() >= limit);
                let expired = retention.time.is_some_and(|limit| {
                    now.saturating_sub(segment.last_write_ms) >= limit.as_millis() as u64
                });
                if !over_size && !expired {
                    break;
                }
                size_to_delete += segment.size_bytes();
                count += 1;
            }
            let removed: Vec<Segment> = state.segments.drain(..count).collect();
            if let Some(last) = removed.iter().rev().find_map(Segment::last_position) {
                state.cache.evict_up_to(last, &self.shared.cache_used_bytes);
            }
            if let (Some(log), Some(first)) = (state.remote.clone(), first_kept(&state)) {
                remote = Some((log, first));
            }
            removed
        };
        if removed.is_empty() {
            return Ok((remote, 0));
        }
        // Oldest first, each removal durable before the next: a crash part-way leaves a log
        // that starts at a later segment, never one with a hole in the middle. A large file is
        // kept (renamed `*.free`) while the log has room for one more to write into again.
        let mut freed = 0;
        let io = self.shared.io.as_ref();
        for segment in &removed {
            let recycle = segment.size_bytes() >= self.shared.config.segment_max_bytes / 2
                && self.lock().free_files.len() < self.shared.config.recycled_segments_max;
            let free = free_file_path(&segment.path);
            if recycle {
                io.rename(&segment.path, &free)
            } else {
                io.remove_file(&segment.path)
            }
            .map_err(|error| StorageError::io("remove segment", &segment.path, error))?;
            io.sync_dir(&self.directory)
                .map_err(|error| StorageError::io("fsync directory", &self.directory, error))?;
            if recycle {
                self.lock().free_files.push(free);
            }
            freed += segment.size_bytes();
            tracing::debug!(log = %self.name, path = %segment.path.display(), recycle, "segment trimmed");
        }
        Ok((remote, freed))
    }

    /// Stops accepting appends, waits for pending ones to finish and persists cursors.
    pub fn close(&self) -> Result<()> {
        {
            let mut state = self.lock();
            state.closed = true;
            while state.flush_scheduled {
                state = self
                    .flush_finished
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.cache.clear(&self.shared.cache_used_bytes);
        }
        let synced = match self.shared.config.flush_policy {
            FlushPolicy::RelaxedWriteOnly { .. } => self.sync_written(),
            // The entry WAL's records for this log are needed only until its segments are
            // fsynced: after the close, no checkpoint sees the log.
            FlushPolicy::Fsync if self.shared.entry_wal.is_some() => self.sync_for_wal(),
            FlushPolicy::Fsync => Ok(()),
        };
        if synced.is_ok() {
            self.seal();
        }
        self.remove_free_files();
        let persisted = self.persist_cursors();
        // The last write to this log's journal: a handle that outlives the close (the log may
        // be deleted and created again under the same name) must not write into its successor.
        let mut journal = self
            .cursor_journal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        journal.retired = true;
        let unwritten = journal.unwritten_bytes();
        drop(journal);
        if let Some((path, bytes)) = unwritten {
            // An open of this log later in this run writes them before it reads the journal.
            self.shared
                .unwritten_journal_bytes
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(path, bytes);
            // Only the cursor WAL holds some of this journal's bytes (the write above failed):
            // keep its files until the next start replays them. (Not under the journal's lock:
            // a pass holds the WAL's while it waits for journals.)
            self.shared.pin_cursor_wal();
        }
        // From now on a checkpoint no longer sees this log: its journal holds every byte, or
        // the WAL files are pinned.
        self.shared.unregister_live_log(self);
        synced.and(persisted)
    }

    /// Ends the newest segment file with a seal record (fsynced) once everything is durable,
    /// so that the next open takes damage in it for corruption rather than a torn write: after
    /// a clean close nothing was in flight. Best effort: an unsealed segment is recovered as
    /// after a crash.
    fn seal(&self) {
        let target = {
            let state = self.lock();
            if state.failure.is_some() || state.corruption.is_some() {
                return;
            }
            state.segments.iter().rev().find_map(|segment| {
                let file = segment.open_file()?;
                Some((
                    file,
                    segment.path.clone(),
                    segment.flushed_end,
                    segment.synced_end,
                    segment.salt,
                ))
            })
        };
        let Some((file, path, flushed_end, synced_end, salt)) = target else {
            return;
        };
        if flushed_end != synced_end || flushed_end < HEADER_LEN {
            return;
        }
        // The seal must be the file's last bytes: a recycled file is cut after it.
        let sealed = file
            .write_all_at(&encode_seal(flushed_end, salt), flushed_end)
            .and_then(|()| {
                let sealed_len = flushed_end + SEAL_RECORD_LEN;
                if file.size()? > sealed_len {
                    file.set_len(sealed_len)?;
                }
                file.sync()
            });
        if let Err(error) = sealed {
            tracing::warn!(log = %self.name, path = %path.display(), %error, "could not seal the newest segment; it will be recovered as after a crash");
            let _ = file.set_len(flushed_end);
        }
    }

    /// Removes the trimmed files kept for reuse (a closed log holds no disk it does not use).
    /// Best effort: one left behind is adopted or removed by the next open.
    pub(crate) fn remove_free_files(&self) {
        {
            let mut state = self.lock();
            state.free_files.clear();
            for segment in &mut state.segments {
                segment.recycle_from = None;
            }
        }
        // Every one the directory holds: one that a roll took and failed before writing into
        // it (a failed sync of the segment before) is in neither list.
        let names = match self.shared.io.list_dir(&self.directory) {
            Ok(names) => names,
            Err(error) => {
                tracing::warn!(log = %self.name, %error, "could not list the log's directory to remove its recycled segment files");
                return;
            }
        };
        for name in names.iter().filter(|name| name.ends_with(FREE_SUFFIX)) {
            let path = self.directory.join(name);
            if let Err(error) = self.shared.io.remove_file(&path) {
                tracing::warn!(log = %self.name, path = %path.display(), %error, "could not remove a recycled segment file");
            }
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub(crate) fn evict_consumed_cache(&self) {
        let mut state = self.lock();
        let slowest = state
            .cursors
            .values()
            .map(|cursor| cursor.state.mark_delete)
            .min()
            .flatten();
        if let Some(slowest) = slowest {
            state
                .cache
                .evict_up_to(slowest, &self.shared.cache_used_bytes);
        }
    }
}

impl LogState {
    /// Index in `segments` of the segment `batch` is written to.
    fn segment_index_for_batch(&self, batch: &PendingBatch) -> Option<usize> {
        self.segments.iter().rposition(|segment| {
            segment.ledger_id == batch.ledger_id
                && segment.first_entry_id == batch.segment_first_entry_id
        })
    }

    fn segment_for_batch_mut(&mut self, batch: &PendingBatch) -> Option<&mut Segment> {
        let index = self.segment_index_for_batch(batch)?;
        Some(&mut self.segments[index])
    }

    /// Forgets every entry at or after `first_removed` (all of them in the current ledger and
    /// not yet flushed).
    fn rollback_to(&mut self, first_removed: Position, cache_used_bytes: &AtomicU64) {
        debug_assert_eq!(first_removed.ledger_id, self.ledger_id);
        while let Some(segment) = self.segments.last_mut() {
            if matches!(segment.file, SegmentFile::NotCreated) && segment.first_entry_id > 0 {
                // A roll never created, so it holds only entries of failed batches. (The first
                // segment of the ledger stays, empty: the next append creates it.) The free
                // file it was to be written into is the log's again.
                if let Some(free) = segment.recycle_from.take() {
                    self.free_files.push(free);
                }
                self.segments.pop();
                continue;
            }
            let keep = first_removed
                .entry_id
                .saturating_sub(segment.first_entry_id);
            segment.truncate_entries(keep as usize);
            break;
        }
        self.next_entry_id = first_removed.entry_id;
        self.rollbacks += 1;
        self.pending_bytes = 0;
        self.cache.truncate_from(first_removed, cache_used_bytes);
    }

    /// Closes the files of sealed segments, once a newer segment exists and every byte of
    /// theirs is durable (under the relaxed policy, sealing syncs them): returns the log's
    /// handles of them, for the caller to drop once it released the lock.
    #[must_use]
    fn close_sealed_files(&mut self) -> Vec<Arc<dyn IoFile>> {
        let sealed = self.segments.len().saturating_sub(1);
        let mut closed = Vec::new();
        for segment in &mut self.segments[..sealed] {
            if matches!(segment.file, SegmentFile::Open(_))
                && segment.synced_end == segment.flushed_end
                && segment.flushed_end == segment.end
            {
                if let SegmentFile::Open(file) =
                    std::mem::replace(&mut segment.file, SegmentFile::Closed)
                {
                    closed.push(file);
                }
                segment.seal_index();
            }
        }
        closed
    }

    /// Whether an entry of this log is at `position` (durable or not yet): not in a gap
    /// between ledgers, not trimmed, not beyond the end.
    pub(crate) fn holds_entry(&self, position: Position) -> bool {
        self.segment_at(position)
            .is_some_and(|at| self.segments[at].contains(position))
    }

    /// The index of the last segment that starts at or before `position`: the only one that
    /// may hold it, since segments are in log order. `None` if every segment starts after it.
    fn segment_at(&self, position: Position) -> Option<usize> {
        let after = self.segments.partition_point(|segment| {
            Position::new(segment.ledger_id, segment.first_entry_id) <= position
        });
        after.checked_sub(1)
    }

    pub(crate) fn next_position(&self, position: Position) -> Position {
        // Segments are in log order: those before the last one that starts at or before
        // `position` end before it, so the walk starts there (an in-order acknowledgement asks
        // this for each entry, whatever the number of segments the log retains).
        let from = self.segment_at(position).unwrap_or(0);
        for segment in &self.segments[from..] {
            let Some(last) = segment.last_position() else {
                continue;
            };
            if last <= position {
                continue;
            }
            if segment.contains(position) {
                return Position::new(position.ledger_id, position.entry_id + 1);
            }
            if let Some(first) = segment.first_position() {
                if first > position {
                    return first;
                }
            }
        }
        Position::new(self.ledger_id, self.next_entry_id)
    }

    pub(crate) fn last_durable(&self) -> Option<Position> {
        self.last_durable
    }

    /// The last entry whose record lies entirely within the synced part of its file.
    fn last_synced(&self) -> Option<Position> {
        self.segments.iter().rev().find_map(|segment| {
            let synced = segment.entries_within(segment.synced_end);
            (synced > 0).then(|| {
                Position::new(
                    segment.ledger_id,
                    segment.first_entry_id + synced as u64 - 1,
                )
            })
        })
    }

    /// Number of durable entries after `position` (all of them for `None`).
    pub(crate) fn entries_after(&self, position: Option<Position>) -> u64 {
        let Some(last_durable) = self.last_durable else {
            return 0;
        };
        self.segments
            .iter()
            .filter_map(|segment| {
                let first = segment.first_position()?;
                let last = segment.last_position()?.min(last_durable);
                if last < first || position.is_some_and(|position| last <= position) {
                    return Some(0);
                }
                let start = match position {
                    Some(position) if segment.contains(position) => position.entry_id + 1,
                    _ => first.entry_id,
                };
                Some(last.entry_id + 1 - start)
            })
            .sum()
    }
}

fn complete(waiters: Vec<oneshot::Sender<Result<()>>>, result: Result<()>) {
    for waiter in waiters {
        // The appender may have stopped waiting; that is fine.
        let _ = waiter.send(result.clone());
    }
}

/// Validates an entry record read from a segment and returns its publish time and the offset
/// of its data within the record.
fn decode_entry(
    record: &[u8],
    expected_entry_id: u64,
    salt: u32,
) -> std::result::Result<(u64, usize), String> {
    let body = format::decode_salted_record(record, salt)?;
    if body.len() < ENTRY_HEADER_LEN as usize {
        return Err("entry record shorter than its header".into());
    }
    let mut reader = format::ByteReader::new(body);
    let entry_id = reader.u64()?;
    let publish_time_ms = reader.u64()?;
    if entry_id != expected_entry_id {
        return Err(format!(
            "expected entry {expected_entry_id}, found entry {entry_id}"
        ));
    }
    Ok((
        publish_time_ms,
        (RECORD_FRAMING_LEN + ENTRY_HEADER_LEN) as usize,
    ))
}

/// Entry id of a seal record, which no entry has.
const SEAL_ENTRY_ID: u64 = u64::MAX;
/// A seal record: framing, then its entry id and its own file offset.
pub(crate) const SEAL_RECORD_LEN: u64 = RECORD_FRAMING_LEN + 16;

fn encode_seal(entries_end: u64, salt: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SEAL_RECORD_LEN as usize);
    format::encode_salted_record(
        &mut bytes,
        salt,
        &[&SEAL_ENTRY_ID.to_le_bytes(), &entries_end.to_le_bytes()],
    );
    bytes
}

/// Where the entries of a segment sealed by a clean close end: the offset of the seal record
/// that makes up its last bytes (`None`: not sealed, or the seal itself is damaged).
fn sealed_end(file: &dyn IoFile, path: &Path, file_len: u64, salt: u32) -> Result<Option<u64>> {
    let Some(at) = file_len
        .checked_sub(SEAL_RECORD_LEN)
        .filter(|at| *at >= HEADER_LEN)
    else {
        return Ok(None);
    };
    let mut bytes = [0u8; SEAL_RECORD_LEN as usize];
    file.read_exact_at(&mut bytes, at)
        .map_err(|error| StorageError::io("read", path, error))?;
    Ok(is_seal_at(&bytes, at, salt).then_some(at))
}

/// Whether `bytes` (the last `SEAL_RECORD_LEN` bytes of a segment file, at offset `at`) are a
/// valid seal record naming its own offset, checksummed with `salt`.
pub(crate) fn is_seal_at(bytes: &[u8], at: u64, salt: u32) -> bool {
    let Ok(body) = format::decode_salted_record(bytes, salt) else {
        return false;
    };
    let mut reader = format::ByteReader::new(body);
    let (Ok(entry_id), Ok(offset)) = (reader.u64(), reader.u64()) else {
        return false;
    };
    entry_id == SEAL_ENTRY_ID && offset == at && reader.is_empty()
}

/// What the flush that creates a segment's file needs of it.
#[derive(Default)]
struct NewSegment {
    /// The position the segment continues (its header's fields 3 and 4).
    continues: Option<Position>,
    salt: u32,
    /// A trimmed segment file to write the segment into.
    recycle_from: Option<PathBuf>,
    /// The previous segment's open file and the end of its records.
    previous: Option<(Arc<dyn IoFile>, u64)>,
}

/// Cuts a file that is longer than its records (a recycled one) to their end, durably.
fn cut_to_records(file: &dyn IoFile, records_end: u64) -> std::io::Result<()> {
    if file.size()? > records_end {
        file.set_len(records_end)?;
        file.sync()?;
    }
    Ok(())
}

/// A remote log and the first entry its local log still holds after a trim.
type RemoteTrim = (Arc<dyn RemoteLog>, u64);

/// Checks that each segment continues the one before it: within a ledger, a segment starts
/// with the entry after the previous one's last; a later ledger starts at entry 0. Only the
/// oldest segment may start anywhere (trimming deletes from the front). A missing segment in
/// the middle would otherwise make the log serve around a hole.
fn check_continuity(segments: &[Segment]) -> Result<()> {
    // Where a segment says its predecessor ended must be where the last non-empty segment
    // before it ends: this finds a missing last segment of a ledger, which starts no gap in
    // entry ids.
    let mut last_end: Option<(&Segment, Position)> = None;
    for next in segments {
        if let (Some((previous, end)), Some(continues)) = (last_end, next.continues) {
            if continues != end {
                return Err(StorageError::corrupted(
                    &next.path,
                    0,
                    format!(
                        "gap in the log: this segment continues ledger {} at entry {}, but the \
                         segment before it, {}, ends before ledger {} entry {}; a segment file \
                         is missing",
                        continues.ledger_id,
                        continues.entry_id,
                        previous.path.display(),
                        end.ledger_id,
                        end.entry_id
                    ),
                ));
            }
        }
        if let Some(last) = next.last_position() {
            last_end = Some((next, Position::new(last.ledger_id, last.entry_id + 1)));
        }
    }
    for pair in segments.windows(2) {
        let (previous, next) = (&pair[0], &pair[1]);
        let expected = if next.ledger_id == previous.ledger_id {
            previous.first_entry_id + previous.entry_count()
        } else {
            0
        };
        if next.first_entry_id != expected {
            return Err(StorageError::corrupted(
                &next.path,
                0,
                format!(
                    "gap in the log: expected ledger {} to continue at entry {expected} after {}, \
                     but this segment starts at entry {}; a segment file is missing",
                    next.ledger_id,
                    previous.path.display(),
                    next.first_entry_id
                ),
            ));
        }
    }
    Ok(())
}

/// Opens one segment file and indexes its entries. For the tail segment (the newest file,
/// which was being appended to when the log was last closed or crashed), damage at the end is
/// a torn write and is truncated; anywhere else it is corruption. Returns `None` for a tail
/// segment that was torn while being created (it never held an entry).
fn recover_segment(
    shared: &Shared,
    directory: &Path,
    ledger_id: u64,
    first_entry_id: u64,
    is_tail: bool,
) -> Result<Option<Segment>> {
    let io = shared.io.as_ref();
    let mut segment = Segment::new(directory, ledger_id, first_entry_id);
    let path = segment.path.clone();
    let file = io
        .open(&path)
        .map_err(|error| StorageError::io("open", &path, error))?;
    let file_len = file
        .size()
        .map_err(|error| StorageError::io("stat", &path, error))?;
    let header = match FileHeader::read(file.as_ref(), &path, FileKind::Segment) {
        Ok(header) => header,
        Err(StorageError::Corrupted { .. }) if is_tail && file_len <= HEADER_LEN => {
            // Created but never completed (a crash before its header was fsynced); entries are
            // only ever written after that, so it held none.
            tracing::warn!(path = %path.display(), "removing a segment torn while being created");
            io.remove_file(&path)
                .map_err(|error| StorageError::io("remove", &path, error))?;
            // Durably, before a newer segment is created: were the removal lost in a power cut
            // that kept the newer file, the torn one would no longer be the newest and would
            // refuse the log.
            io.sync_dir(directory)
                .map_err(|error| StorageError::io("fsync directory", directory, error))?;
            return Ok(None);
        }
        Err(error) => return Err(error),
    };
    if header.fields[0] != ledger_id || header.fields[1] != first_entry_id {
        return Err(StorageError::corrupted(
            &path,
            0,
            format!(
                "header says ledger {} entry {}, file name says ledger {ledger_id} entry {first_entry_id}",
                header.fields[0], header.fields[1]
            ),
        ));
    }
    segment.last_write_ms = header.fields[2];
    segment.salt = header.salt;
    if header.fields[3] != 0 {
        segment.continues = Some(Position::new(header.fields[3], header.fields[4]));
    }
    // A clean close sealed the newest segment: its records end before the seal, and damage in
    // them is corruption, never a torn write. (A sealed segment is no longer the newest only if
    // the file created after it was torn while being created and removed just now.)
    let sealed = sealed_end(file.as_ref(), &path, file_len, header.salt)?;
    let scan = format::scan_records(
        file.as_ref(),
        &path,
        HEADER_LEN,
        sealed.unwrap_or(file_len),
        header.salt,
        |offset, body| {
            let mut reader = format::ByteReader::new(body);
            let entry_id = reader.u64()?;
            let publish_time_ms = reader.u64()?;
            let expected = first_entry_id + segment.entry_count();
            if entry_id != expected {
                return Err(format!("expected entry {expected}, found entry {entry_id}"));
            }
            segment.push_entry(offset, publish_time_ms);
            Ok(())
        },
    )?;
    let valid_end = match scan {
        // The newest segment may hold bytes written but never fsynced (a process killed
        // between the two; the page cache kept them). Make them durable before serving them:
        // a reader must never see an entry that a power cut can still erase.
        ScanEnd::Clean if is_tail || sealed.is_some() => {
            // The seal is cut off again before this log creates a newer segment: only the
            // newest segment ever ends in one.
            let end = sealed.unwrap_or(file_len);
            if end < file_len {
                file.set_len(end)
                    .map_err(|error| StorageError::io("truncate", &path, error))?;
            }
            file.sync()
                .map_err(|error| StorageError::io("fsync", &path, error))?;
            end
        }
        ScanEnd::Clean => file_len,
        ScanEnd::Damaged { offset, reason } => {
            if !is_tail {
                return Err(StorageError::corrupted(&path, offset, reason));
            }
            if sealed.is_some() {
                return Err(StorageError::corrupted(
                    &path,
                    offset,
                    format!("{reason}, in a segment sealed by a clean close: not a torn write"),
                ));
            }
            let next_entry = first_entry_id + segment.entry_count();
            // A recycled file (salted) is written over its earlier life, not appended to: a
            // power cut may keep the pages of its last writes that lie past its old end, or any
            // other of them, and lose those before: valid records after the damage are then a
            // torn write, not corruption. (Nothing after the first damage was acknowledged
            // under the fsync policy: every acknowledged batch was synced whole before the
            // next one was written.) Nor is its earlier life searched, up to a whole segment.
            let follows = if header.salt != 0 {
                None
            } else {
                format::valid_record_follows(file.as_ref(), &path, offset, file_len, |body| {
                    body.len() >= ENTRY_HEADER_LEN as usize
                        && body[..8]
                            .try_into()
                            .map(u64::from_le_bytes)
                            .is_ok_and(|entry_id| {
                                entry_id >= next_entry && entry_id < next_entry + (1 << 20)
                            })
                })?
            };
            if let Some(valid_at) = follows {
                return Err(StorageError::corrupted(
                    &path,
                    offset,
                    format!("{reason}, but a valid record follows at offset {valid_at}: not a torn write"),
                ));
            }
            tracing::warn!(
                path = %path.display(),
                offset,
                discarded_bytes = file_len - offset,
                %reason,
                "truncating torn tail of segment"
            );
            file.set_len(offset)
                .map_err(|error| StorageError::io("truncate", &path, error))?;
            file.sync()
                .map_err(|error| StorageError::io("fsync", &path, error))?;
            offset
        }
    };
    if let Some(mark) = segment.time_marks.iter().max() {
        segment.last_write_ms = segment.last_write_ms.max(*mark);
    }
    segment.end = valid_end;
    segment.flushed_end = valid_end;
    segment.synced_end = valid_end;
    // Every recovered segment is sealed: the open that recovers it starts a new one.
    drop(file);
    segment.file = SegmentFile::Closed;
    segment.seal_index();
    Ok(Some(segment))
}
