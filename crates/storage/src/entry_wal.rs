//! The engine's entry write-ahead log: one file that the appends of many logs are made durable
//! in together, so that a flush thread serving many logs at once pays one write request and one
//! `fdatasync` for all of them instead of one of each per log (issue 16: with 100 topics the
//! per-log fsyncs cost three times the CPU per message of one topic).
//!
//! A flush thread that finds several logs waiting takes them as a group: it writes each log's
//! pending batch into its segment without an fsync and hands the batches to [`GroupCommit`],
//! whose leader appends one WAL record per batch (the log's directory name, the segment's
//! ledger and first entry ids, the file offset and the batch's bytes) with one vectored write,
//! fsyncs the WAL once and completes every batch. A lone batch (no other fsync under way) is flushed as before: its own write and fsync. A failed WAL
//! write or fsync fails the group and is cut off the WAL, so that no replay brings it back.
//!
//! A checkpoint (once the WAL holds [`ENTRY_WAL_CHECKPOINT_BYTES`]) starts a new WAL file,
//! fsyncs every segment file the live logs hold open and retires the older WAL files: up to
//! [`FREE_FILES_MAX`] of them are kept, and the next files are written over them (with a new
//! salt), so that a WAL fsync writes the records alone, not a grown file's metadata as well. A log
//! fsyncs its segments when it closes and before it starts a new segment, so a WAL record is
//! normally needed only for the newest segment of its log.
//!
//! At every start, before any log opens, the WAL files are replayed: for each segment that
//! still exists, the records for it, in the order they were written (a record at or before an
//! earlier one's end supersedes it from there on: its log rolled appends back after a failed
//! flush and wrote the same positions again), are written where the segment's valid records
//! end. A record whose bytes the segment already holds is skipped; one whose start the
//! segment's valid bytes cover with other bytes is stale (a failed flush's that could not be
//! cut off the WAL, replaced by a durable write) and skipped.
//! See `docs/durability.md` and `docs/storage-format.md`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, StorageError};
use crate::format::{self, ByteReader, ByteWriter, FileHeader, FileKind, ScanEnd, HEADER_LEN};
use crate::io::{Io, IoFile};
use crate::log::{AfterFlush, FlushStage, Flushing, Log, WrittenBatch};
use crate::wal_files::{ReplayFile, WalFiles};

const RECORD_BATCH: u8 = 1;

/// A checkpoint starts once the WAL file holds this much.
pub(crate) const ENTRY_WAL_CHECKPOINT_BYTES: u64 = 64 << 20;

/// Past this (a checkpoint that cannot keep up), groups are flushed log by log until one has
/// retired the WAL's older files: the WAL, and what a replay reads, stays bounded.
const ENTRY_WAL_MAX_BYTES: u64 = 4 * ENTRY_WAL_CHECKPOINT_BYTES;

/// Retired WAL files kept to be written over by the next ones, at most.
const FREE_FILES_MAX: usize = 2;

/// Logs a flush thread takes from the queue at once, at most.
pub(crate) const GROUP_MAX_LOGS: usize = 64;

const FILES: WalFiles = WalFiles {
    prefix: "entries",
    kind: FileKind::EntryWal,
};

/// An older WAL file still needed: its sequence and length.
type OlderFile = (u64, u64);

/// The WAL files of an engine: the one groups append to, and older ones whose checkpoint has
/// not finished.
pub(crate) struct EntryWal {
    root: PathBuf,
    sequence: u64,
    /// `None` if it could not be created (then `broken`).
    file: Option<Arc<dyn IoFile>>,
    length: u64,
    /// The current file's salt (0 in a new file; see [`WalFiles::recycle`]).
    salt: u32,
    older: Vec<OlderFile>,
    /// Retired files kept to be written over (see [`WalFiles::recycle`]), at most
    /// [`FREE_FILES_MAX`]; removed at a clean shutdown and at start.
    free: Vec<PathBuf>,
    /// A write or fsync failed (or the file could not be created): its tail is unknown, so
    /// nothing more is appended to it. The next group starts a new file; until one can be
    /// created, groups are flushed log by log.
    broken: bool,
    /// A segment's fsync failed after its WAL records were written (a checkpoint's, or a
    /// close's): only the WAL holds those bytes for sure. Every WAL file is kept until the next
    /// start replays it, and groups are flushed log by log for the rest of this run.
    pinned: bool,
}

impl EntryWal {
    /// Replays every WAL file under `root` into the segments, makes them durable and removes
    /// the files. Runs at every start before any log is opened, whether the WAL is used in
    /// this run or not (an earlier run may have used it). A segment that cannot take its bytes
    /// (a full disk, damage) does not stop the engine: its log's replay is deferred to its
    /// open, which fails until the replay succeeds, and the WAL files are kept until the next
    /// start.
    pub(crate) fn recover(io: &dyn Io, root: &Path) -> Result<Recovered> {
        // An earlier run's retired files (it crashed) are never replayed, and this run keeps
        // its own. Removed first: a replay may need their space.
        FILES.remove_free(io, root)?;
        let sequences = FILES.sequences(io, root)?;
        let mut files = Vec::with_capacity(sequences.len());
        let mut plans: BTreeMap<SegmentKey, Vec<Planned>> = BTreeMap::new();
        for sequence in &sequences {
            let Some(ReplayFile {
                path,
                file,
                length,
                salt,
            }) = FILES.open(io, root, *sequence)?
            else {
                continue;
            };
            let index = files.len();
            let scan = format::scan_records(
                file.as_ref(),
                &path,
                HEADER_LEN,
                length,
                salt,
                |at, body| {
                    let record = decode(body)?;
                    let body_start = at + format::RECORD_FRAMING_LEN;
                    let planned = Planned {
                        start: record.offset,
                        end: record.offset + record.bytes.len() as u64,
                        file: index,
                        at: body_start + (body.len() - record.bytes.len()) as u64,
                    };
                    plan(plans.entry(record.key).or_default(), planned);
                    Ok(())
                },
            )?;
            match scan {
                // A file written over ends where the records of its earlier life start.
                ScanEnd::Damaged { offset, .. } if salt != 0 => {
                    tracing::debug!(path = %path.display(), offset, "the entry WAL's records end");
                }
                // The unsynced end of the last write: a group whose fsync never returned (or
                // failed), so no append relied on it.
                ScanEnd::Damaged { offset, reason } => {
                    tracing::warn!(path = %path.display(), offset, %reason, "ignoring the torn tail of the entry WAL");
                }
                ScanEnd::Clean => {}
            }
            files.push((path, file));
        }
        let files = Arc::new(files);
        let mut deferred: HashMap<String, DeferredReplay> = HashMap::new();
        for (key, planned) in plans {
            if let Err(error) = redo(io, root, &key, &planned, &files) {
                tracing::error!(log_directory = %key.0, %error, "could not replay the entry WAL into this log's segment; the log refuses to open until it can");
                let replay = deferred
                    .entry(key.0.clone())
                    .or_insert_with(|| DeferredReplay {
                        segments: Vec::new(),
                        files: files.clone(),
                    });
                replay.segments.push((key, planned));
            }
        }
        if !deferred.is_empty() {
            // Kept until the next start: the deferred logs need them.
            let next_sequence = sequences.last().map_or(1, |last| last + 1);
            return Ok(Recovered {
                deferred,
                next_sequence,
            });
        }
        drop(files);
        // A crash before they are gone replays them again, which writes nothing new (the
        // segments hold every record's bytes by then).
        FILES.remove(io, root, &sequences)?;
        Ok(Recovered {
            deferred,
            next_sequence: 1,
        })
    }

    /// Starts an empty WAL (after [`EntryWal::recover`]) at file `sequence`.
    pub(crate) fn start(io: &dyn Io, root: &Path, sequence: u64) -> Result<EntryWal> {
        let (file, broken) = match FILES.create(io, root, sequence) {
            Ok(file) => (Some(file), false),
            Err(StorageError::DiskFull { .. }) => {
                tracing::warn!(root = %root.display(), "disk full: no entry WAL; logs are flushed one by one until one can be created");
                (None, true)
            }
            Err(error) => return Err(error),
        };
        Ok(EntryWal {
            root: root.to_path_buf(),
            sequence,
            file,
            length: HEADER_LEN,
            salt: 0,
            older: Vec::new(),
            free: Vec::new(),
            broken,
            pinned: false,
        })
    }

    /// Whether groups can go through the WAL now (else they are flushed log by log).
    fn usable(&mut self, io: &dyn Io) -> bool {
        let older_bytes: u64 = self.older.iter().map(|(_, length)| length).sum();
        if self.pinned || self.length + older_bytes > ENTRY_WAL_MAX_BYTES {
            return false;
        }
        if self.broken {
            match self.rotate(io) {
                Ok(_) => {
                    tracing::info!(sequence = self.sequence, "entry WAL in use again");
                    self.broken = false;
                }
                Err(error) => {
                    tracing::debug!(%error, "the entry WAL cannot be started again yet");
                    return false;
                }
            }
        }
        true
    }

    /// Appends the group's records and fsyncs: once this returns `Ok`, the batches survive a
    /// crash. A failure breaks the file (see `broken`).
    fn append(
        &mut self,
        group: &mut EncodedGroup,
        batches: &[(Arc<Log>, WrittenBatch)],
    ) -> Result<()> {
        let path = FILES.path(&self.root, self.sequence);
        if group.salt != self.salt {
            // A new file was started since the group was encoded.
            *group = encode_group(batches, self.salt);
        }
        let Some(file) = &self.file else {
            self.broken = true;
            return Err(StorageError::io(
                "append",
                path,
                std::io::Error::other("no entry WAL file"),
            ));
        };
        let mut parts: Vec<&[u8]> = Vec::with_capacity(batches.len() * 4);
        for ((start, end), (_, batch)) in group.heads.iter().zip(batches) {
            parts.push(&group.bytes[*start..*end]);
            parts.extend(batch.slices());
        }
        match WalFiles::append(file.as_ref(), &path, &parts, self.length) {
            Ok(()) => {
                self.length += group.len;
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "the entry WAL failed; a new WAL file is started for the next group");
                self.broken = true;
                // The group's records, whole or in part, may be on disk: cut them off durably,
                // so that no replay brings back appends that are reported failed (and whose
                // positions a rollback gives again).
                let cut = file.set_len(self.length).and_then(|()| file.sync());
                match cut {
                    Ok(()) => Err(error),
                    Err(cut_error) => {
                        tracing::error!(%cut_error, path = %path.display(), "could not cut the failed group off the entry WAL; its logs are poisoned rather than rolled back");
                        // Not `DiskFull`: the group's logs must not give these positions again.
                        Err(StorageError::io("truncate", &path, cut_error))
                    }
                }
            }
        }
    }

    /// Starts a new file for the groups to come; returns the sequence of the one it replaces,
    /// which stays until [`EntryWal::retire`].
    fn rotate(&mut self, io: &dyn Io) -> Result<u64> {
        let sequence = self.sequence + 1;
        let recycled = self.free.pop().and_then(|free| {
            let salt = format::fresh_salt();
            FILES
                .recycle(io, &self.root, &free, sequence, salt)
                .inspect_err(|error| {
                    tracing::warn!(free = %free.display(), %error, "could not write the entry WAL over a retired file; creating a new one");
                })
                .ok()
                .map(|file| (file, salt))
        });
        let (file, salt) = match recycled {
            Some(recycled) => recycled,
            None => (FILES.create(io, &self.root, sequence)?, 0),
        };
        let previous = self.sequence;
        self.older.push((previous, self.length));
        self.sequence = sequence;
        self.file = Some(file);
        self.salt = salt;
        self.length = HEADER_LEN;
        Ok(previous)
    }

    /// Retires every older file up to and including `sequence` (durably): a checkpoint made
    /// their records durable in the segments. Up to [`FREE_FILES_MAX`] are kept to be written
    /// over, the others removed. Nothing while pinned.
    fn retire(&mut self, io: &dyn Io, sequence: u64) -> Result<()> {
        if self.pinned {
            return Ok(());
        }
        let (done, kept): (Vec<OlderFile>, Vec<OlderFile>) =
            self.older.iter().partition(|(older, _)| *older <= sequence);
        let mut freed = Vec::new();
        let mut removed = Vec::new();
        for (older, _) in done {
            let (path, free) = (
                FILES.path(&self.root, older),
                FILES.free_path(&self.root, older),
            );
            // A call that failed after its renames (at the directory's fsync) left free files
            // not counted yet: this one counts them, or removes them over the limit.
            let renamed_before = io.exists(&free);
            if self.free.len() + freed.len() >= FREE_FILES_MAX {
                if renamed_before {
                    io.remove_file(&free)
                        .map_err(|error| StorageError::io("remove", &free, error))?;
                }
                removed.push(older);
                continue;
            }
            match io.rename(&path, &free) {
                Ok(()) => freed.push(free),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound && renamed_before => {
                    freed.push(free)
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(StorageError::io("rename", &path, error)),
            }
        }
        // Also makes the renames durable: a free file is written over only once its old name
        // is gone for good.
        FILES.remove(io, &self.root, &removed)?;
        self.free.extend(freed);
        self.older = kept;
        Ok(())
    }

    /// Removes the retired files kept to be written over (durably): the disk is full, or the
    /// engine stops.
    fn remove_free(&mut self, io: &dyn Io) -> Result<()> {
        self.free.clear();
        FILES.remove_free(io, &self.root)
    }

    /// Keeps every WAL file until the next start, and stops using the WAL (see `pinned`).
    pub(crate) fn pin(&mut self) {
        if !self.pinned {
            tracing::error!(root = %self.root.display(), "a segment's fsync failed after its entry WAL records were written: the WAL files are kept until the next start replays them, and logs are flushed one by one until then");
        }
        self.pinned = true;
    }

    /// Whether a checkpoint is due.
    pub(crate) fn checkpoint_due(&self) -> bool {
        !self.pinned && self.length > ENTRY_WAL_CHECKPOINT_BYTES
    }
}

/// The heads of a group's WAL records (framing, then what the batch is for), each followed in
/// the file by its batch's bytes; encoded before the WAL's lock is taken (the checksums cover
/// every byte of the batches), for the file whose salt is `salt`.
struct EncodedGroup {
    salt: u32,
    bytes: Vec<u8>,
    heads: Vec<(usize, usize)>,
    /// Bytes of the records together.
    len: u64,
}

fn encode_group(batches: &[(Arc<Log>, WrittenBatch)], salt: u32) -> EncodedGroup {
    let mut group = EncodedGroup {
        salt,
        bytes: Vec::with_capacity(batches.len() * 64),
        heads: Vec::with_capacity(batches.len()),
        len: 0,
    };
    for (log, batch) in batches {
        let (ledger_id, first_entry_id) = batch.segment();
        let mut head = ByteWriter::default();
        head.u8(RECORD_BATCH);
        head.bytes(log.directory_name().as_bytes());
        head.u64(ledger_id);
        head.u64(first_entry_id);
        head.u64(batch.file_offset());
        let mut checksum = crc32c::crc32c_append(salt, &head.bytes);
        let mut body_len = head.bytes.len();
        for slice in batch.slices() {
            checksum = crc32c::crc32c_append(checksum, slice);
            body_len += slice.len();
        }
        let start = group.bytes.len();
        group
            .bytes
            .extend_from_slice(&format::record_framing(body_len, checksum));
        group.bytes.extend_from_slice(&head.bytes);
        group.heads.push((start, group.bytes.len()));
        group.len += format::RECORD_FRAMING_LEN + body_len as u64;
    }
    group
}

/// The entry WAL with the batches waiting for it: flush threads hand their written batches
/// over and go back to the flush queue; one of them at a time (the leader) writes everything
/// handed over with one write and one fsync, completes it, and goes on while more was handed
/// over meanwhile. So the batches written while one fsync runs share the next.
///
/// Before it writes, the leader lets the group fill: until `group_wait` has passed since its
/// oldest batch was handed over, or `group_idle` since its newest (no more are coming: the
/// producers are waiting for these receipts), or until it holds [`GROUP_FULL_BYTES`] (as a
/// bookie waits up to its `journalMaxGroupWaitMSec` or `journalBufferedWritesThreshold`). The
/// waits count from the hand-overs, so batches handed over during an fsync wait only what is
/// left of them after the fsync (nothing once the fsync took as long). Each fsync costs tens
/// of microseconds of CPU on top of the disk's time, so with many logs fewer, larger groups
/// cost less per message. A log written alone never waits: its batches take their segment's
/// own fsync, unless a group went through the WAL, with batches of several logs, within the
/// last `group_wait` (other logs are busy: it joins their group, rather than adding an fsync
/// beside theirs).
pub(crate) struct GroupCommit {
    wal: Mutex<EntryWal>,
    waiting: Mutex<Waiting>,
    /// Wakes a leader letting its group fill once the group is full.
    full: Condvar,
    /// How long a group may wait to fill (zero: it is written at once).
    group_wait: Duration,
    /// How long a waiting group may go without a new batch.
    group_idle: Duration,
    /// Segment fsyncs of lone batches under way (see [`GroupCommit::flush_group`]).
    syncing: AtomicUsize,
}

/// A group this large is written at once, however young.
const GROUP_FULL_BYTES: u64 = 512 * 1024;

#[derive(Default)]
struct Waiting {
    batches: Vec<(Arc<Log>, WrittenBatch)>,
    /// Bytes of `batches`.
    bytes: u64,
    /// When the oldest of `batches` was handed over.
    since: Option<Instant>,
    /// When the newest of `batches` was handed over.
    latest: Option<Instant>,
    /// When the last group of several batches went through the WAL.
    grouped: Option<Instant>,
    /// A thread is writing and completing batches: others only add theirs.
    leader: bool,
    /// The leader is waiting for its group to fill: logs that need a flush meanwhile are
    /// left in `absorbed` for it, instead of waking a flush thread each.
    gathering: bool,
    /// Logs whose oldest pending batch the leader writes into its segment when it wakes up.
    absorbed: Vec<Arc<Log>>,
    /// The bytes appended to `absorbed`'s logs when each was left there.
    absorbed_bytes: u64,
}

impl GroupCommit {
    pub(crate) fn new(wal: EntryWal, group_wait: Duration, group_idle: Duration) -> GroupCommit {
        GroupCommit {
            wal: Mutex::new(wal),
            waiting: Mutex::new(Waiting::default()),
            full: Condvar::new(),
            group_wait,
            group_idle,
            syncing: AtomicUsize::new(0),
        }
    }

    fn wal(&self) -> std::sync::MutexGuard<'_, EntryWal> {
        self.wal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// See [`EntryWal::pin`].
    pub(crate) fn pin(&self) {
        self.wal().pin();
    }

    pub(crate) fn checkpoint_due(&self) -> bool {
        self.wal().checkpoint_due()
    }

    /// Starts a new WAL file and returns the sequence of the previous one, for
    /// [`GroupCommit::retire`] once every segment file the live logs hold open is fsynced.
    pub(crate) fn start_checkpoint(&self, io: &dyn Io) -> Result<u64> {
        self.wal().rotate(io)
    }

    /// Removes the WAL files up to `sequence` (see [`EntryWal::retire`]).
    pub(crate) fn retire(&self, io: &dyn Io, sequence: u64) -> Result<()> {
        self.wal().retire(io, sequence)
    }

    /// At a clean shutdown, once every log closed (and fsynced its segments): removes every
    /// WAL file, the current one too. Nothing while pinned.
    pub(crate) fn retire_all(&self, io: &dyn Io) -> Result<()> {
        let mut wal = self.wal();
        if wal.pinned {
            return Ok(());
        }
        let current = (wal.sequence, wal.length);
        wal.older.push(current);
        wal.file = None;
        wal.broken = true;
        wal.retire(io, current.0)?;
        wal.remove_free(io)
    }

    /// Removes the retired files kept to be written over: the disk is full, and appends need
    /// the space more than the WAL needs the files.
    pub(crate) fn release_free_files(&self, io: &dyn Io) {
        if let Err(error) = self.wal().remove_free(io) {
            tracing::warn!(%error, "could not remove the entry WAL's retired files");
        }
    }

    /// Flushes `logs` (each with its flush role taken): each one's oldest pending batch is
    /// written into its segment; then a lone batch gets its segment's own fsync if no other
    /// fsync is under way and no group of several logs went through the WAL within the group
    /// wait (it costs what the WAL's would, without writing the bytes twice), and otherwise
    /// the batches go to the WAL, where the ones written meanwhile join them. Logs with more
    /// pending are handed to `again`.
    pub(crate) fn flush_group(&self, io: &dyn Io, logs: Vec<Arc<Log>>, again: &impl Fn(Arc<Log>)) {
        let mut written = write_unsynced(logs, again);
        let mut waiting = self.waiting();
        let alone = written.len() == 1
            && !waiting.leader
            && waiting.batches.is_empty()
            && self.syncing.load(Ordering::SeqCst) == 0
            && waiting
                .grouped
                .is_none_or(|grouped| grouped.elapsed() >= self.group_wait);
        if alone {
            // Counted before the lock is released, so that a flush deciding meanwhile goes to
            // the WAL. Not counted while the appends complete: a log appended to one batch at
            // a time takes the same path every time.
            self.syncing.fetch_add(1, Ordering::SeqCst);
            drop(waiting);
            let (log, batch) = written.pop().expect("one batch");
            let synced = batch.sync_segment();
            self.syncing.fetch_sub(1, Ordering::SeqCst);
            if log.finish_written(batch, synced, true) == AfterFlush::Again {
                again(log);
            }
            return;
        }
        if !written.is_empty() {
            let now = Instant::now();
            waiting.since.get_or_insert(now);
            waiting.latest = Some(now);
            waiting.bytes += written.iter().map(|(_, batch)| batch.len()).sum::<u64>();
            waiting.batches.append(&mut written);
            if waiting.leader && waiting.bytes >= GROUP_FULL_BYTES {
                self.full.notify_one();
            }
        }
        let lead = !waiting.batches.is_empty() && !std::mem::replace(&mut waiting.leader, true);
        drop(waiting);
        if lead {
            self.lead(io, again);
        }
    }

    /// Leaves `log` (whose flush role the caller holds) to the leader if one is waiting for
    /// its group to fill and has room for it (see `Shared::schedule_flush`); gives it back
    /// otherwise. `bytes`, what was appended, counts toward a full group, and the group's idle
    /// deadline moves on as for a batch handed over.
    pub(crate) fn absorb(&self, log: Arc<Log>, bytes: u64) -> std::result::Result<(), Arc<Log>> {
        let mut waiting = self.waiting();
        if !waiting.gathering || waiting.absorbed.len() >= GROUP_MAX_LOGS {
            return Err(log);
        }
        waiting.absorbed.push(log);
        waiting.absorbed_bytes += bytes;
        waiting.latest = Some(Instant::now());
        if waiting.bytes + waiting.absorbed_bytes >= GROUP_FULL_BYTES {
            self.full.notify_one();
        }
        Ok(())
    }

    /// See `Storage::entry_wal_leader_gathering`.
    pub(crate) fn gathering(&self) -> bool {
        self.waiting().gathering
    }

    /// When the waiting group is to be written unless it fills first: `group_wait` after its
    /// oldest batch or `group_idle` after its newest, whichever comes first. `validate`
    /// bounds both; a limit past the clock's range leaves the other one, and with neither
    /// (`None`) the group is written at once.
    fn deadline(&self, waiting: &Waiting) -> Option<Instant> {
        let oldest = waiting.since?.checked_add(self.group_wait);
        let newest = waiting.latest?.checked_add(self.group_idle);
        match (oldest, newest) {
            (Some(oldest), Some(newest)) => Some(oldest.min(newest)),
            (oldest, newest) => oldest.or(newest),
        }
    }

    /// Writes and completes the batches handed over until none is left.
    fn lead(&self, io: &dyn Io, again: &impl Fn(Arc<Log>)) {
        let _role = LeaderRole(self);
        loop {
            let batches = {
                let mut waiting = self.waiting();
                if waiting.batches.is_empty() {
                    waiting.leader = false;
                    return;
                }
                // Batches handed over or absorbed meanwhile move the idle deadline on: checked
                // again after each wake-up.
                loop {
                    if !waiting.absorbed.is_empty() {
                        let logs = std::mem::take(&mut waiting.absorbed);
                        waiting.absorbed_bytes = 0;
                        drop(waiting);
                        let mut written = write_unsynced(logs, again);
                        waiting = self.waiting();
                        waiting.bytes += written.iter().map(|(_, batch)| batch.len()).sum::<u64>();
                        waiting.batches.append(&mut written);
                    }
                    let Some(deadline) = self.deadline(&waiting) else {
                        break;
                    };
                    let now = Instant::now();
                    if waiting.bytes >= GROUP_FULL_BYTES || now >= deadline {
                        break;
                    }
                    waiting.gathering = true;
                    waiting = self
                        .full
                        .wait_timeout(waiting, deadline - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                    waiting.gathering = false;
                }
                waiting.since = None;
                waiting.latest = None;
                waiting.bytes = 0;
                std::mem::take(&mut waiting.batches)
            };
            let salt = self.wal().salt;
            let mut encoded = encode_group(&batches, salt);
            let outcome = {
                let mut wal = self.wal();
                if wal.usable(io) {
                    Some(wal.append(&mut encoded, &batches).map_err(|error| {
                        let stage = match error {
                            StorageError::DiskFull { .. } => FlushStage::Write,
                            _ => FlushStage::Sync,
                        };
                        (stage, error)
                    }))
                } else {
                    None
                }
            };
            // Other logs are being written: lone batches join the groups for a while. Not
            // for a group of one (a log written alone would keep itself waiting), nor for
            // a group the WAL did not take.
            if outcome.is_some() && batches.len() > 1 {
                self.waiting().grouped = Some(Instant::now());
            }
            for (log, batch) in batches {
                let after = match &outcome {
                    Some(outcome) => log.finish_written(batch, outcome.clone(), false),
                    // No WAL to use: each segment's own fsync.
                    None => {
                        let synced = batch.sync_segment();
                        log.finish_written(batch, synced, true)
                    }
                };
                if after == AfterFlush::Again {
                    again(log);
                }
            }
        }
    }
}

/// The leader's role while [`GroupCommit::lead`] runs. A panic there (a bug in the engine's
/// own code; a poison listener's panic is caught where it is called) loses what the leader
/// had taken: the batches it was completing, whose appends then fail, and the absorbed logs
/// it was writing, whose flushes stop. But it gives the role up, so that the next batch handed
/// over leads what is left, instead of every later group waiting for a leader that is gone.
struct LeaderRole<'a>(&'a GroupCommit);

impl Drop for LeaderRole<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut waiting = self.0.waiting();
            waiting.leader = false;
            waiting.gathering = false;
        }
    }
}

/// Writes each log's oldest pending batch into its segment without an fsync (the caller holds
/// each one's flush role); logs with more pending go to `again`.
fn write_unsynced(logs: Vec<Arc<Log>>, again: &impl Fn(Arc<Log>)) -> Vec<(Arc<Log>, WrittenBatch)> {
    let mut written = Vec::with_capacity(logs.len());
    for log in logs {
        match log.flush_unsynced() {
            Flushing::Done(AfterFlush::Again) => again(log),
            Flushing::Done(AfterFlush::Idle) => {}
            Flushing::Written(batch) => written.push((log, batch)),
        }
    }
    written
}

/// The segment a record is for: the log's directory name, the ledger id and the first entry id.
type SegmentKey = (String, u64, u64);

/// What a start's replay left: the logs whose replay is deferred to their open, by directory
/// name, and the sequence the WAL of this run starts at (after the files kept for them).
pub(crate) struct Recovered {
    pub(crate) deferred: HashMap<String, DeferredReplay>,
    pub(crate) next_sequence: u64,
}

/// A log's replay that failed at start: tried again when the log opens.
pub(crate) struct DeferredReplay {
    segments: Vec<(SegmentKey, Vec<Planned>)>,
    files: Arc<Vec<(PathBuf, Arc<dyn IoFile>)>>,
}

impl DeferredReplay {
    /// Writes the log's WAL bytes into its segments; an error leaves it to be tried again.
    pub(crate) fn retry(&mut self, io: &dyn Io, root: &Path) -> Result<()> {
        while let Some((key, planned)) = self.segments.last() {
            redo(io, root, key, planned, &self.files)?;
            self.segments.pop();
        }
        Ok(())
    }
}

struct Decoded<'a> {
    key: SegmentKey,
    offset: u64,
    bytes: &'a [u8],
}

fn decode(body: &[u8]) -> std::result::Result<Decoded<'_>, String> {
    let mut reader = ByteReader::new(body);
    let kind = reader.u8()?;
    if kind != RECORD_BATCH {
        return Err(format!("unknown entry WAL record kind {kind}"));
    }
    let directory =
        String::from_utf8(reader.bytes()?.to_vec()).map_err(|_| "directory name is not UTF-8")?;
    let ledger_id = reader.u64()?;
    let first_entry_id = reader.u64()?;
    let offset = reader.u64()?;
    Ok(Decoded {
        key: (directory, ledger_id, first_entry_id),
        offset,
        bytes: reader.rest(),
    })
}

/// A record's bytes for one segment: `[start, end)` of the segment file, found at `at` in the
/// WAL file `file`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Planned {
    start: u64,
    end: u64,
    file: usize,
    at: u64,
}

/// Adds a record to a segment's plan: it supersedes what earlier records said from its start
/// on (their log rolled those appends back and wrote the positions again).
fn plan(planned: &mut Vec<Planned>, record: Planned) {
    planned.retain(|earlier| earlier.start < record.start);
    if let Some(last) = planned.last_mut() {
        last.end = last.end.min(record.start);
    }
    planned.push(record);
}

/// Writes a segment's planned records where its valid records end, and fsyncs it. A segment
/// that is gone was trimmed, or its log deleted. (Usually only a log's newest segment lacks
/// bytes the WAL holds; an older one does if its fsync at a roll, close or checkpoint failed,
/// which pinned the WAL, and its log was opened again and rolled on.)
fn redo(
    io: &dyn Io,
    root: &Path,
    key: &SegmentKey,
    planned: &[Planned],
    files: &[(PathBuf, Arc<dyn IoFile>)],
) -> Result<()> {
    let (directory_name, ledger_id, first_entry_id) = key;
    let path = root
        .join("logs")
        .join(directory_name)
        .join(crate::log::segment_file_name(*ledger_id, *first_entry_id));
    if !io.exists(&path) {
        return Ok(());
    }
    let segment = io
        .open(&path)
        .map_err(|error| StorageError::io("open", &path, error))?;
    let header = match FileHeader::read(segment.as_ref(), &path, FileKind::Segment) {
        Ok(header) => header,
        // Torn while being created: no batch was written into it (recovery removes it).
        Err(StorageError::Corrupted { .. }) => return Ok(()),
        Err(error) => return Err(error),
    };
    let Some(first) = planned.first() else {
        return Ok(());
    };
    let length = segment
        .size()
        .map_err(|error| StorageError::io("stat", &path, error))?;
    if first.start > length {
        // Everything before a record's start was durable before it was written.
        return Err(StorageError::corrupted(
            &path,
            length,
            format!(
                "the entry WAL holds bytes for offset {} of this segment, which ends at {length}",
                first.start
            ),
        ));
    }
    // Where the segment's valid records end, from the first record's start on (a batch starts
    // where a record does).
    let mut valid_end = match format::scan_records(
        segment.as_ref(),
        &path,
        first.start,
        length,
        header.salt,
        |_, _| Ok(()),
    )? {
        ScanEnd::Clean => length,
        ScanEnd::Damaged { offset, .. } => offset,
    };
    let mut wrote = false;
    for record in planned {
        if record.end <= valid_end {
            // The segment holds it (or durable bytes that replaced it).
            continue;
        }
        if record.start > valid_end {
            return Err(StorageError::corrupted(
                &path,
                valid_end,
                format!(
                    "the entry WAL's bytes for this segment start at {}, after where its records end",
                    record.start
                ),
            ));
        }
        let (wal_path, wal) = &files[record.file];
        let mut bytes = vec![0u8; (record.end - record.start) as usize];
        wal.read_exact_at(&mut bytes, record.at)
            .map_err(|error| StorageError::io("read", wal_path, error))?;
        // The segment's valid bytes from the record's start on must be the record's own (the
        // part of the batch that reached the disk); other bytes replaced a failed flush's.
        let held = (valid_end - record.start) as usize;
        if held > 0 {
            let mut existing = vec![0u8; held];
            segment
                .read_exact_at(&mut existing, record.start)
                .map_err(|error| StorageError::io("read", &path, error))?;
            if existing != bytes[..held] {
                continue;
            }
        }
        segment
            .write_all_at(&bytes[held..], valid_end)
            .map_err(|error| StorageError::io("write", &path, error))?;
        valid_end = record.end;
        wrote = true;
    }
    if wrote {
        tracing::info!(path = %path.display(), "restored appends from the entry WAL");
        segment
            .sync()
            .map_err(|error| StorageError::io("fsync", &path, error))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(start: u64, end: u64) -> Planned {
        Planned {
            start,
            end,
            file: 0,
            at: 0,
        }
    }

    #[test]
    fn a_record_supersedes_earlier_ones_from_its_start_on() {
        let mut planned = Vec::new();
        plan(&mut planned, record(64, 100));
        plan(&mut planned, record(100, 150));
        plan(&mut planned, record(150, 200));
        // Rolled back to 100 and written again, shorter.
        plan(&mut planned, record(100, 120));
        assert_eq!(planned, vec![record(64, 100), record(100, 120)]);
        // Rolled back into the middle of a record's span is cut there.
        plan(&mut planned, record(110, 130));
        assert_eq!(
            planned,
            vec![record(64, 100), record(100, 110), record(110, 130)]
        );
    }
}
