//! Durable cursors: what each subscription has acknowledged.
//!
//! A cursor is a mark-delete position (everything at or before it is acknowledged), the
//! individually acknowledged positions beyond it (a [`RangeSet`]), and string properties.
//! Acknowledgements change the in-memory state at once; the engine's maintenance thread
//! persists changed cursors every `cursor_persist_interval` (and `Log::close` persists them
//! too), so a crash forgets at most the acknowledgements of the last interval: those entries
//! are delivered again, and nothing unacknowledged is ever skipped.
//!
//! Each log keeps its cursors in one journal file, `cursors.journal`: a header, then records,
//! each a full snapshot of one cursor or a tombstone for a deleted one. The last valid record of
//! a cursor wins. When the journal grows large it is rewritten with one snapshot per live cursor
//! (written to `cursors.journal.new`, fsynced, renamed over the old one).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::cursor_wal::WalRecord;
use crate::engine::Shared;
use crate::error::{Result, StorageError};
use crate::format::{self, ByteReader, ByteWriter, FileHeader, FileKind, ScanEnd, HEADER_LEN};
use crate::log::{Log, LogState};
use crate::range_set::RangeSet;
use crate::Position;

pub(crate) const JOURNAL_FILE: &str = "cursors.journal";
const JOURNAL_REWRITE_FILE: &str = "cursors.journal.new";
const RECORD_SNAPSHOT: u8 = 1;
const RECORD_DELETED: u8 = 2;
/// Journals smaller than this are never rewritten.
const JOURNAL_REWRITE_MIN_BYTES: u64 = 1 << 20;
/// Longest cursor name accepted.
pub const CURSOR_NAME_MAX_BYTES: usize = 1024;

/// Where a new cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitialPosition {
    /// Before the first entry still in the log.
    Earliest,
    /// After the last durable entry.
    Latest,
}

/// The acknowledged state of one cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CursorState {
    /// Every entry at or before this position is acknowledged. `None`: nothing is, not even the
    /// first entry still in the log.
    pub mark_delete: Option<Position>,
    /// Acknowledged entries after the mark-delete position.
    pub acknowledged: RangeSet,
    pub properties: BTreeMap<String, String>,
}

impl CursorState {
    pub fn is_acknowledged(&self, position: Position) -> bool {
        self.mark_delete
            .is_some_and(|mark_delete| position <= mark_delete)
            || self.acknowledged.contains(position)
    }
}

pub(crate) struct CursorSlot {
    pub(crate) state: CursorState,
    /// Durable cursors are persisted and hold back trimming; non-durable ones (readers) live in
    /// memory only.
    pub(crate) durable: bool,
    /// Changed since it was last persisted.
    pub(crate) dirty: bool,
    /// Mark-delete position as last persisted; trimming goes by this one.
    pub(crate) persisted_mark_delete: Option<Position>,
    /// Changes with each [`ChangeKind::Own`] change (see [`Log::cursor_versioned`]).
    pub(crate) version: u64,
}

/// Who a change to a cursor is for, as [`Log::cursor_versioned`] tells them apart: the
/// cursor's own users (consumers, seeks, expiry, an operator), or a copy of acknowledgements
/// made elsewhere (another cluster's, mirrored by replicated-subscription sync, and that sync's
/// notes about them), which a caller that mirrors them back out does not need to notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Own,
    Mirrored,
}

/// A version no cursor had before: unique across logs and across a cursor deleted and created
/// again, so that an equal version always means an unchanged cursor.
pub(crate) fn new_cursor_version() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What one snapshot record holds, copied out of the log's state under its lock; the encoding,
/// which takes longer for a cursor of many ranges, happens after the lock is released.
struct SnapshotCopy {
    name: String,
    mark_delete: Option<Position>,
    /// (ledger id, first entry id, last entry id), at most `cursor_max_persisted_ranges`.
    ranges: Vec<(u64, u64, u64)>,
    properties: BTreeMap<String, String>,
}

impl SnapshotCopy {
    fn of(name: &str, state: &CursorState, max_ranges: usize) -> SnapshotCopy {
        SnapshotCopy {
            name: name.to_string(),
            mark_delete: state.mark_delete,
            ranges: state.acknowledged.iter().take(max_ranges).collect(),
            properties: state.properties.clone(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut writer = ByteWriter::default();
        writer.u8(RECORD_SNAPSHOT);
        writer.bytes(self.name.as_bytes());
        match self.mark_delete {
            Some(position) => {
                writer.u8(1);
                writer.varint(position.ledger_id);
                writer.varint(position.entry_id);
            }
            None => writer.u8(0),
        }
        writer.varint(self.ranges.len() as u64);
        // Delta-encoded: ledger ids as increments; within a ledger, each range's first entry as
        // the gap after the previous range's last entry.
        let mut previous: Option<(u64, u64)> = None;
        for &(ledger_id, first, last) in &self.ranges {
            match previous {
                Some((previous_ledger, previous_last)) if previous_ledger == ledger_id => {
                    writer.varint(0);
                    writer.varint(first - previous_last);
                }
                Some((previous_ledger, _)) => {
                    writer.varint(ledger_id - previous_ledger);
                    writer.varint(first);
                }
                None => {
                    writer.varint(ledger_id);
                    writer.varint(first);
                }
            }
            writer.varint(last - first);
            previous = Some((ledger_id, last));
        }
        writer.varint(self.properties.len() as u64);
        for (key, value) in &self.properties {
            writer.bytes(key.as_bytes());
            writer.bytes(value.as_bytes());
        }
        writer.bytes
    }
}

fn encode_tombstone(name: &str) -> Vec<u8> {
    let mut writer = ByteWriter::default();
    writer.u8(RECORD_DELETED);
    writer.bytes(name.as_bytes());
    writer.bytes
}

/// Decodes a journal record into the cursor name and its state (`None`: deleted).
pub(crate) fn decode_record(
    body: &[u8],
) -> std::result::Result<(String, Option<CursorState>), String> {
    let mut reader = ByteReader::new(body);
    let kind = reader.u8()?;
    let name =
        String::from_utf8(reader.bytes()?.to_vec()).map_err(|_| "cursor name is not UTF-8")?;
    match kind {
        RECORD_DELETED => return Ok((name, None)),
        RECORD_SNAPSHOT => {}
        other => return Err(format!("unknown cursor record kind {other}")),
    }
    let mut state = CursorState::default();
    if reader.u8()? == 1 {
        state.mark_delete = Some(Position::new(reader.varint()?, reader.varint()?));
    }
    let ranges = reader.varint()?;
    let mut previous: Option<(u64, u64)> = None;
    for _ in 0..ranges {
        let ledger_step = reader.varint()?;
        let first_value = reader.varint()?;
        let length = reader.varint()?;
        let (ledger_id, first) = match previous {
            Some((previous_ledger, previous_last)) if ledger_step == 0 => (
                previous_ledger,
                previous_last
                    .checked_add(first_value)
                    .ok_or("range overflow")?,
            ),
            Some((previous_ledger, _)) => (
                previous_ledger
                    .checked_add(ledger_step)
                    .ok_or("ledger overflow")?,
                first_value,
            ),
            None => (ledger_step, first_value),
        };
        let last = first.checked_add(length).ok_or("range overflow")?;
        state.acknowledged.insert_range(ledger_id, first, last);
        previous = Some((ledger_id, last));
    }
    let properties = reader.varint()?;
    for _ in 0..properties {
        let key =
            String::from_utf8(reader.bytes()?.to_vec()).map_err(|_| "property key is not UTF-8")?;
        let value = String::from_utf8(reader.bytes()?.to_vec())
            .map_err(|_| "property value is not UTF-8")?;
        state.properties.insert(key, value);
    }
    if !reader.is_empty() {
        return Err("trailing bytes after cursor snapshot".into());
    }
    Ok((name, Some(state)))
}

/// The cursor journal file of one log. It is opened only while being written, so that an idle
/// log holds a single file descriptor (its active segment) however many cursors it has.
pub(crate) struct CursorJournal {
    directory: PathBuf,
    path: PathBuf,
    /// Names this file instance (header field 0), so that the cursor WAL's bytes for it are
    /// never replayed into a journal rewritten or created again since.
    generation: u64,
    /// Length including `pending`.
    length: u64,
    /// Length of the part written to the file and fsynced.
    durable_length: u64,
    /// Bytes made durable by the cursor WAL but not written to the file yet (a checkpoint or
    /// the next direct write does), from `durable_length` on.
    pending: Vec<u8>,
    /// Length right after the last rewrite; the journal is rewritten when it grows well past it.
    length_after_rewrite: u64,
    /// A write or fsync failed: the file's tail is unknown, so the next persist rewrites it.
    needs_rewrite: bool,
    /// The log was closed: its journal is never written again (by path, it may be another
    /// log's by now).
    pub(crate) retired: bool,
    recovered: BTreeMap<String, CursorState>,
}

impl CursorJournal {
    pub(crate) fn open(shared: &Shared, directory: &Path) -> Result<CursorJournal> {
        let io = shared.io.as_ref();
        let path = directory.join(JOURNAL_FILE);
        let rewrite_path = directory.join(JOURNAL_REWRITE_FILE);
        if io.exists(&rewrite_path) {
            // A rewrite that did not finish; the old journal is still complete.
            io.remove_file(&rewrite_path)
                .map_err(|error| StorageError::io("remove", &rewrite_path, error))?;
        }
        write_unwritten_bytes(shared, &path)?;
        if !io.exists(&path) {
            return CursorJournal::create(shared, directory, path);
        }
        let file = io
            .open(&path)
            .map_err(|error| StorageError::io("open", &path, error))?;
        let file_len = file
            .size()
            .map_err(|error| StorageError::io("stat", &path, error))?;
        let generation = match FileHeader::read(file.as_ref(), &path, FileKind::CursorJournal) {
            Ok(header) => header.fields[0],
            Err(StorageError::Corrupted { .. }) if file_len <= HEADER_LEN => {
                // Created but never completed (a crash before its header was fsynced, while its
                // name was made durable by another file's creation in the directory). Records
                // are only ever appended after the header is durable, so it held none.
                tracing::warn!(path = %path.display(), "replacing a cursor journal torn while being created");
                drop(file);
                io.remove_file(&path)
                    .map_err(|error| StorageError::io("remove", &path, error))?;
                return CursorJournal::create(shared, directory, path);
            }
            Err(error) => return Err(error),
        };
        let mut recovered = BTreeMap::new();
        let scan =
            format::scan_records(file.as_ref(), &path, HEADER_LEN, file_len, 0, |_, body| {
                let (name, state) = decode_record(body)?;
                match state {
                    Some(state) => recovered.insert(name, state),
                    None => recovered.remove(&name),
                };
                Ok(())
            })?;
        let length = match scan {
            // Records written but never fsynced (a process killed in between) become durable
            // before the cursors they describe are used to trim or to skip entries.
            ScanEnd::Clean => {
                file.sync()
                    .map_err(|error| StorageError::io("fsync", &path, error))?;
                file_len
            }
            ScanEnd::Damaged { offset, reason } => {
                let follows =
                    format::valid_record_follows(file.as_ref(), &path, offset, file_len, |body| {
                        matches!(body.first(), Some(&RECORD_SNAPSHOT) | Some(&RECORD_DELETED))
                    })?;
                if let Some(valid_at) = follows {
                    return Err(StorageError::corrupted(
                        &path,
                        offset,
                        format!("{reason}, but a valid record follows at offset {valid_at}: not a torn write"),
                    ));
                }
                tracing::warn!(path = %path.display(), offset, %reason, "truncating torn tail of cursor journal");
                file.set_len(offset)
                    .map_err(|error| StorageError::io("truncate", &path, error))?;
                file.sync()
                    .map_err(|error| StorageError::io("fsync", &path, error))?;
                offset
            }
        };
        Ok(CursorJournal {
            directory: directory.to_path_buf(),
            path,
            generation,
            length,
            durable_length: length,
            pending: Vec::new(),
            length_after_rewrite: length,
            needs_rewrite: false,
            retired: false,
            recovered,
        })
    }

    /// Creates an empty journal at `path` (durably, directory entry included).
    fn create(shared: &Shared, directory: &Path, path: PathBuf) -> Result<CursorJournal> {
        let generation = fresh_generation();
        let header = FileHeader {
            kind: FileKind::CursorJournal,
            fields: [generation, 0, 0, 0, 0],
            salt: 0,
        };
        format::create_file(shared.io.as_ref(), &path, header)?;
        Ok(CursorJournal {
            directory: directory.to_path_buf(),
            path,
            generation,
            length: HEADER_LEN,
            durable_length: HEADER_LEN,
            pending: Vec::new(),
            length_after_rewrite: HEADER_LEN,
            needs_rewrite: false,
            retired: false,
            recovered: BTreeMap::new(),
        })
    }

    pub(crate) fn recovered_cursors(&self) -> BTreeMap<String, CursorSlot> {
        self.recovered
            .iter()
            .map(|(name, state)| {
                (
                    name.clone(),
                    CursorSlot {
                        state: state.clone(),
                        durable: true,
                        dirty: false,
                        persisted_mark_delete: state.mark_delete,
                        version: new_cursor_version(),
                    },
                )
            })
            .collect()
    }

    fn should_rewrite(&self) -> bool {
        self.needs_rewrite
            || (self.length > JOURNAL_REWRITE_MIN_BYTES
                && self.length > 4 * self.length_after_rewrite)
    }

    /// Writes the pending bytes and `records` to the file and fsyncs it.
    fn append(&mut self, shared: &Shared, records: &[Vec<u8>]) -> Result<()> {
        let mut bytes = std::mem::take(&mut self.pending);
        for record in records {
            format::encode_record(&mut bytes, &[record]);
        }
        let written = self.write_durably(shared, &bytes);
        match written {
            Ok(()) => {
                self.durable_length += bytes.len() as u64;
                self.length = self.durable_length;
                Ok(())
            }
            Err(error) => {
                // Still durable in the WAL; the rewrite that follows a failure supersedes them.
                let pending_len = (self.length - self.durable_length) as usize;
                bytes.truncate(pending_len);
                self.pending = bytes;
                Err(error)
            }
        }
    }

    fn write_durably(&self, shared: &Shared, bytes: &[u8]) -> Result<()> {
        let file = shared
            .io
            .open(&self.path)
            .map_err(|error| StorageError::io("open", &self.path, error))?;
        file.write_all_at(bytes, self.durable_length)
            .map_err(|error| StorageError::io("write", &self.path, error))?;
        file.sync()
            .map_err(|error| StorageError::io("fsync", &self.path, error))
    }

    /// For a checkpoint: (path, generation, offset, bytes) of the bytes the cursor WAL holds
    /// for this journal, to be written outside the journal's lock.
    fn pending_copy(&self) -> Option<(PathBuf, u64, u64, Vec<u8>)> {
        (!self.pending.is_empty() && !self.retired).then(|| {
            (
                self.path.clone(),
                self.generation,
                self.durable_length,
                self.pending.clone(),
            )
        })
    }

    /// The file of generation `generation` is durable up to `end`.
    fn pending_written(&mut self, generation: u64, end: u64) {
        if self.generation == generation && end > self.durable_length {
            let written = (end - self.durable_length) as usize;
            self.pending.drain(..written.min(self.pending.len()));
            self.durable_length = end;
        }
    }

    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// At a close whose journal write failed: the bytes only the cursor WAL holds, for the
    /// next open of this journal in this run (see `Shared::unwritten_journal_bytes`).
    pub(crate) fn unwritten_bytes(&self) -> Option<(PathBuf, UnwrittenJournalBytes)> {
        (!self.pending.is_empty()).then(|| {
            (
                self.path.clone(),
                UnwrittenJournalBytes {
                    generation: self.generation,
                    offset: self.durable_length,
                    bytes: self.pending.clone(),
                },
            )
        })
    }

    /// Replaces the journal with one holding exactly `records` (a snapshot of every live cursor).
    fn rewrite(&mut self, shared: &Shared, records: &[Vec<u8>]) -> Result<()> {
        let io = shared.io.as_ref();
        let rewrite_path = self.directory.join(JOURNAL_REWRITE_FILE);
        if io.exists(&rewrite_path) {
            io.remove_file(&rewrite_path)
                .map_err(|error| StorageError::io("remove", &rewrite_path, error))?;
        }
        let generation = fresh_generation();
        let header = FileHeader {
            kind: FileKind::CursorJournal,
            fields: [generation, 0, 0, 0, 0],
            salt: 0,
        };
        let file = format::create_file(io, &rewrite_path, header)?;
        let mut bytes = Vec::new();
        for record in records {
            format::encode_record(&mut bytes, &[record]);
        }
        file.write_all_at(&bytes, HEADER_LEN)
            .map_err(|error| StorageError::io("write", &rewrite_path, error))?;
        file.sync()
            .map_err(|error| StorageError::io("fsync", &rewrite_path, error))?;
        io.rename(&rewrite_path, &self.path)
            .map_err(|error| StorageError::io("rename", &rewrite_path, error))?;
        io.sync_dir(&self.directory)
            .map_err(|error| StorageError::io("fsync directory", &self.directory, error))?;
        drop(file);
        self.generation = generation;
        self.length = HEADER_LEN + bytes.len() as u64;
        self.durable_length = self.length;
        self.pending.clear();
        self.length_after_rewrite = self.length;
        self.needs_rewrite = false;
        Ok(())
    }
}

/// Journal bytes made durable by the cursor WAL that a closed log could not write into its
/// journal: `bytes` belong at `offset` of the journal of generation `generation`.
pub(crate) struct UnwrittenJournalBytes {
    pub(crate) generation: u64,
    pub(crate) offset: u64,
    pub(crate) bytes: Vec<u8>,
}

/// Before a journal is read: writes (and fsyncs) the bytes its log could not write into it when
/// it closed, if it is still that journal (same generation), so that it holds every change a
/// completed persistence pass made durable. (The WAL replay at the next start would write them,
/// but the log reads its journal now, and its writes from now on go after what the file holds.)
/// On failure the bytes are kept and the open fails.
fn write_unwritten_bytes(shared: &Shared, path: &Path) -> Result<()> {
    let unwritten = || {
        shared
            .unwritten_journal_bytes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    // Not held across the I/O: opens of one name are serialized by the engine.
    let Some(bytes) = unwritten().remove(path) else {
        return Ok(());
    };
    let io = shared.io.as_ref();
    let written = (|| {
        if !io.exists(path) {
            // The log was deleted since.
            return Ok(());
        }
        let file = io
            .open(path)
            .map_err(|error| StorageError::io("open", path, error))?;
        match FileHeader::read(file.as_ref(), path, FileKind::CursorJournal) {
            Ok(header) if header.fields[0] == bytes.generation => {}
            // Another journal by now (rewritten, or the log deleted and created again): it is
            // complete without these bytes.
            Ok(_) | Err(StorageError::Corrupted { .. }) => return Ok(()),
            Err(error) => return Err(error),
        }
        let length = file
            .size()
            .map_err(|error| StorageError::io("stat", path, error))?;
        if length < bytes.offset {
            return Err(StorageError::corrupted(
                path,
                length,
                format!(
                    "the cursor WAL holds bytes for offset {} of this journal, which ends at {length}",
                    bytes.offset
                ),
            ));
        }
        file.write_all_at(&bytes.bytes, bytes.offset)
            .map_err(|error| StorageError::io("write", path, error))?;
        file.sync()
            .map_err(|error| StorageError::io("fsync", path, error))
    })();
    if written.is_err() {
        unwritten().insert(path.to_path_buf(), bytes);
    }
    written
}

/// The first entry id of `ledger`, from `first` on, after `mark_delete`; `None` when the whole
/// ledger is at or before it.
fn after_in_ledger(mark_delete: Option<Position>, ledger: u64, first: u64) -> Option<u64> {
    match mark_delete {
        Some(mark) if mark.ledger_id > ledger => None,
        Some(mark) if mark.ledger_id == ledger => Some(first.max(mark.entry_id.checked_add(1)?)),
        _ => Some(first),
    }
}

/// A generation for a new journal file: random (the hasher state of `RandomState` is seeded
/// per process), never 0 (the generation of journals written before generations existed).
pub(crate) fn fresh_generation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos())
                .unwrap_or(0),
        );
        let generation = hasher.finish();
        if generation != 0 {
            return generation;
        }
    }
}

fn validate_cursor_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.len() > CURSOR_NAME_MAX_BYTES {
        "longer than 1024 bytes"
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidName {
        what: "cursor",
        name: name.chars().take(64).collect(),
        reason,
    })
}

impl LogState {
    /// The first position after `mark_delete` (or the first entry, for `None`).
    fn position_after(&self, mark_delete: Option<Position>) -> Position {
        match mark_delete {
            Some(position) => self.next_position(position),
            None => self
                .segments
                .iter()
                .find_map(|segment| {
                    (segment.entry_count() > 0)
                        .then(|| Position::new(segment.ledger_id, segment.first_entry_id))
                })
                .unwrap_or_else(|| self.next_position(Position::new(0, 0))),
        }
    }

    /// Moves the mark-delete position over individually acknowledged entries that directly
    /// follow it.
    fn advance_mark_delete(&self, cursor: &mut CursorState) {
        loop {
            let next = self.position_after(cursor.mark_delete);
            let Some((start, last)) = cursor.acknowledged.range_containing(next) else {
                return;
            };
            let new_mark_delete = Position::new(start.ledger_id, last);
            debug_assert!(Some(new_mark_delete) > cursor.mark_delete);
            cursor.mark_delete = Some(new_mark_delete);
            cursor.acknowledged.remove_up_to(new_mark_delete);
        }
    }

    fn update_cursor<T>(
        &mut self,
        log: &str,
        (name, kind): (&str, ChangeKind),
        change: impl FnOnce(&LogState, &mut CursorState) -> T,
    ) -> Result<T> {
        if self.closed {
            return Err(StorageError::Closed {
                log: log.to_string(),
            });
        }
        let not_found = || StorageError::CursorNotFound {
            log: log.to_string(),
            cursor: name.to_string(),
        };
        // The state is taken out of its slot for `change`, which reads the rest of the log's
        // state beside it (taking the slot out of the map instead would cost the name's
        // allocation for putting it back, on every acknowledgement).
        // Should `change` panic (a lock recovered after a panic is used again), the state goes
        // back as `change` left it, not as the empty one the slot holds meanwhile.
        let mut cursor =
            std::mem::take(&mut self.cursors.get_mut(name).ok_or_else(not_found)?.state);
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| change(self, &mut cursor)));
        let slot = self.cursors.get_mut(name).ok_or_else(not_found)?;
        slot.state = cursor;
        let result = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        slot.dirty = true;
        if kind == ChangeKind::Own {
            slot.version = new_cursor_version();
        }
        Ok(result)
    }
}

impl Log {
    /// Opens the durable cursor `name`, creating it at `initial` if it does not exist.
    pub fn open_cursor(&self, name: &str, initial: InitialPosition) -> Result<CursorState> {
        self.open_cursor_with(name, initial, true)
    }

    /// Opens the cursor `name`, creating it at `initial` if it does not exist. A non-durable
    /// cursor (a reader's) is never persisted and does not hold back trimming.
    pub fn open_cursor_with(
        &self,
        name: &str,
        initial: InitialPosition,
        durable: bool,
    ) -> Result<CursorState> {
        validate_cursor_name(name)?;
        let mut state = self.lock();
        if let Some(slot) = state.cursors.get(name) {
            return Ok(slot.state.clone());
        }
        let cursor = CursorState {
            mark_delete: match initial {
                InitialPosition::Earliest => None,
                InitialPosition::Latest => state.last_durable(),
            },
            ..CursorState::default()
        };
        state.cursors.insert(
            name.to_string(),
            CursorSlot {
                state: cursor.clone(),
                durable,
                dirty: durable,
                // Until it is persisted, the new cursor holds back trimming from where it starts.
                persisted_mark_delete: cursor.mark_delete,
                version: new_cursor_version(),
            },
        );
        if durable {
            state.deleted_cursors.retain(|deleted| deleted != name);
        }
        Ok(cursor)
    }

    /// Whether cursor `name` has acknowledged `position` (false if the cursor does not exist).
    pub fn is_acknowledged(&self, name: &str, position: Position) -> bool {
        self.lock()
            .cursors
            .get(name)
            .is_some_and(|slot| slot.state.is_acknowledged(position))
    }

    /// For each of `positions`, whether cursor `name` has acknowledged it, under one lock
    /// (all false if the cursor does not exist).
    pub fn acknowledged_each(&self, name: &str, positions: &[Position]) -> Vec<bool> {
        let state = self.lock();
        match state.cursors.get(name) {
            Some(slot) => positions
                .iter()
                .map(|position| slot.state.is_acknowledged(*position))
                .collect(),
            None => vec![false; positions.len()],
        }
    }

    /// The mark-delete position of cursor `name` as last made durable (what a crash would
    /// bring back, and what trimming goes by); `None` if the cursor does not exist.
    pub fn persisted_mark_delete_position(&self, name: &str) -> Option<Option<Position>> {
        self.lock()
            .cursors
            .get(name)
            .map(|slot| slot.persisted_mark_delete)
    }

    /// The mark-delete position of cursor `name`; `None` if the cursor does not exist.
    pub fn mark_delete_position(&self, name: &str) -> Option<Option<Position>> {
        self.lock()
            .cursors
            .get(name)
            .map(|slot| slot.state.mark_delete)
    }

    /// Number of entries after the cursor's mark-delete position that it has not acknowledged
    /// (its backlog, in entries).
    pub fn backlog_entries(&self, name: &str) -> Option<u64> {
        let state = self.lock();
        let slot = state.cursors.get(name)?;
        let total = state.entries_after(slot.state.mark_delete);
        Some(total.saturating_sub(slot.state.acknowledged.position_count()))
    }

    /// The state of cursor `name`, if it exists.
    pub fn cursor(&self, name: &str) -> Option<CursorState> {
        self.lock().cursors.get(name).map(|slot| slot.state.clone())
    }

    /// The state of cursor `name` and its version, read at once. The version changes with
    /// every [`ChangeKind::Own`] change and never with a [`ChangeKind::Mirrored`] one: an
    /// unchanged version means that whatever changed since came from elsewhere.
    pub fn cursor_versioned(&self, name: &str) -> Option<(CursorState, u64)> {
        self.lock()
            .cursors
            .get(name)
            .map(|slot| (slot.state.clone(), slot.version))
    }

    /// Calls `look` with the state of cursor `name`, if it exists, without copying it (under
    /// the log's lock: `look` must not call the log).
    pub fn with_cursor<T>(&self, name: &str, look: impl FnOnce(&CursorState) -> T) -> Option<T> {
        self.lock().cursors.get(name).map(|slot| look(&slot.state))
    }

    /// The mark-delete position and individually acknowledged entries of cursor `name`: a copy
    /// of those two only, not of its properties.
    pub fn cursor_acknowledged(&self, name: &str) -> Option<(Option<Position>, RangeSet)> {
        self.with_cursor(name, |state| {
            (state.mark_delete, state.acknowledged.clone())
        })
    }

    pub fn cursor_names(&self) -> Vec<String> {
        self.lock().cursors.keys().cloned().collect()
    }

    /// Every durable cursor (not readers) with its state, in name order: what cluster mode
    /// persists outside the log.
    pub fn durable_cursors(&self) -> Vec<(String, CursorState)> {
        self.lock()
            .cursors
            .iter()
            .filter(|(_, slot)| slot.durable)
            .map(|(name, slot)| (name.clone(), slot.state.clone()))
            .collect()
    }

    /// Creates (or replaces) the durable cursor `name` with `cursor` as its whole state: a
    /// cursor carried over from elsewhere (cluster mode: loaded from etcd by a new owner).
    pub fn restore_cursor(&self, name: &str, cursor: CursorState) -> Result<()> {
        validate_cursor_name(name)?;
        let mut state = self.lock();
        if state.closed {
            return Err(StorageError::Closed {
                log: self.name().to_string(),
            });
        }
        let persisted_mark_delete = cursor.mark_delete;
        state.cursors.insert(
            name.to_string(),
            CursorSlot {
                state: cursor,
                durable: true,
                dirty: true,
                persisted_mark_delete,
                version: new_cursor_version(),
            },
        );
        state.deleted_cursors.retain(|deleted| deleted != name);
        Ok(())
    }

    /// Deletes cursor `name`; its entries no longer hold back trimming.
    pub fn delete_cursor(&self, name: &str) -> Result<()> {
        let mut state = self.lock();
        let Some(slot) = state.cursors.remove(name) else {
            return Err(StorageError::CursorNotFound {
                log: self.name().to_string(),
                cursor: name.to_string(),
            });
        };
        if slot.durable {
            // Until its tombstone is durable a crash brings the cursor back as persisted, so
            // trimming keeps counting that position.
            let held = slot.persisted_mark_delete.min(slot.state.mark_delete);
            let earlier = state.deletions_in_flight.get(name).copied().unwrap_or(held);
            state
                .deletions_in_flight
                .insert(name.to_string(), held.min(earlier));
        }
        state.deleted_cursors.push(name.to_string());
        Ok(())
    }

    /// Acknowledges individual entries. Positions at or before the mark-delete position,
    /// beyond the last durable entry, or where the log holds no entry (a gap between ledgers,
    /// a trimmed entry) are ignored. Returns the new mark-delete position.
    ///
    /// The cursor holds at most `cursor_max_ranges` ranges of individually acknowledged
    /// entries: an acknowledgement that would start another one (it neither extends a range
    /// nor follows the mark-delete position) is refused, the others are applied, and the call
    /// fails with `TooManyAcknowledgedRanges` listing the refused positions, which stay
    /// unacknowledged.
    pub fn acknowledge(&self, name: &str, positions: &[Position]) -> Result<Option<Position>> {
        self.acknowledge_as(name, positions, ChangeKind::Own)
    }

    /// [`Log::acknowledge`], for the users `kind` names.
    pub fn acknowledge_as(
        &self,
        name: &str,
        positions: &[Position],
        kind: ChangeKind,
    ) -> Result<Option<Position>> {
        self.acknowledge_telling(name, positions, kind)
            .map(|(mark_delete, _)| mark_delete)
    }

    /// [`Log::acknowledge_as`], telling whether the cursor changed: `false` if every position
    /// was acknowledged already (then the cursor is left as it was, not even marked for
    /// persistence) or is not an entry of the log. One hold of the log's lock.
    pub fn acknowledge_changed(
        &self,
        name: &str,
        positions: &[Position],
        kind: ChangeKind,
    ) -> Result<bool> {
        self.acknowledge_telling(name, positions, kind)
            .map(|(_, changed)| changed)
    }

    fn acknowledge_telling(
        &self,
        name: &str,
        positions: &[Position],
        kind: ChangeKind,
    ) -> Result<(Option<Position>, bool)> {
        let max_ranges = self.shared.config.cursor_max_ranges;
        let mut state = self.lock();
        let last_durable = state.last_durable();
        // Acknowledgements that change nothing (a client acknowledging again, or message by
        // message a batch whose entry is acknowledged, or a bad message id) leave the cursor
        // untouched: neither its version nor its journal changes.
        if !state.closed {
            if let Some(slot) = state.cursors.get(name) {
                let unchanged = |position: &Position| {
                    slot.state.is_acknowledged(*position)
                        || Some(*position) > last_durable
                        || !state.holds_entry(*position)
                };
                if positions.iter().all(unchanged) {
                    return Ok((slot.state.mark_delete, false));
                }
            }
        }
        let (mark_delete, refused, applied) =
            state.update_cursor(self.name(), (name, kind), |log, cursor| {
                let mut refused = Vec::new();
                let mut applied = 0_usize;
                let mut ignored = 0_usize;
                // The mark-delete position moves once, at the end (finding the entry after it
                // costs a walk over the segments): until then, the range starting at `next`
                // is in the set, but it is not counted, since the end absorbs it. Only the
                // entry right after it, with nothing acknowledged beyond, moves it at once:
                // acknowledgements in order, the common case, then leave the set alone. (So an
                // in-order run never counts toward `cursor_max_ranges`, even one that crosses
                // into the next ledger, where a range of the set would end.)
                let mut next = log.position_after(cursor.mark_delete);
                for position in positions {
                    if cursor.is_acknowledged(*position) {
                        continue;
                    }
                    if Some(*position) > last_durable || !log.holds_entry(*position) {
                        ignored += 1;
                        continue;
                    }
                    applied += 1;
                    if *position == next && cursor.acknowledged.is_empty() {
                        cursor.mark_delete = Some(next);
                        next = log.next_position(next);
                        continue;
                    }
                    let joins = *position == next
                        || (position.entry_id > 0
                            && cursor.acknowledged.contains(Position::new(
                                position.ledger_id,
                                position.entry_id - 1,
                            )))
                        || cursor
                            .acknowledged
                            .contains(Position::new(position.ledger_id, position.entry_id + 1));
                    let ranges = cursor.acknowledged.range_count()
                        - usize::from(cursor.acknowledged.contains(next));
                    if !joins && ranges >= max_ranges {
                        applied -= 1;
                        refused.push(*position);
                        continue;
                    }
                    cursor.acknowledged.insert(*position);
                }
                if ignored > 0 {
                    tracing::debug!(log = %self.name(), cursor = name, ignored, "acknowledgement of entries the log does not hold ignored");
                }
                log.advance_mark_delete(cursor);
                // A position given twice may have been refused, then joined a range that a
                // position between its two mentions extended.
                refused.retain(|position| !cursor.is_acknowledged(*position));
                refused.sort_unstable();
                refused.dedup();
                (cursor.mark_delete, refused, applied)
            })?;
        self.unless_refused(name, mark_delete, refused, max_ranges)
            .map(|mark_delete| (mark_delete, applied > 0))
    }

    /// [`Log::acknowledge`] for positions that come mostly in runs of consecutive entries (in
    /// log order): each run is added to the set at once instead of entry by entry (see
    /// [`Log::acknowledge_ranges`]).
    pub fn acknowledge_runs(&self, name: &str, positions: &[Position]) -> Result<Option<Position>> {
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for position in positions {
            match runs.last_mut() {
                Some((ledger, _, last))
                    if *ledger == position.ledger_id
                        && last.checked_add(1) == Some(position.entry_id) =>
                {
                    *last = position.entry_id;
                }
                _ => runs.push((position.ledger_id, position.entry_id, position.entry_id)),
            }
        }
        self.acknowledge_ranges(name, &runs, ChangeKind::Own)
    }

    /// [`Log::acknowledge`] for runs of consecutive entries, each `(ledger id, first entry
    /// id, last entry id)`, in log order (as the replicated-subscription sync finds them):
    /// each run is one insertion. Same outcome, except that at `cursor_max_ranges` a run that
    /// would add a range is refused whole (and one that only overlaps a range in its middle
    /// counts as adding one).
    pub fn acknowledge_ranges(
        &self,
        name: &str,
        runs: &[(u64, u64, u64)],
        kind: ChangeKind,
    ) -> Result<Option<Position>> {
        let max_ranges = self.shared.config.cursor_max_ranges;
        let mut state = self.lock();
        let last_durable = state.last_durable();
        let (mark_delete, refused) =
            state.update_cursor(self.name(), (name, kind), |log, cursor| {
                let mut refused = Vec::new();
                let next = log.position_after(cursor.mark_delete);
                for &(ledger, first, last) in runs {
                    debug_assert!(first <= last, "empty run {ledger}:{first}..={last}");
                    // Only what is durable and not acknowledged below the mark-delete position.
                    let Some(start) = after_in_ledger(cursor.mark_delete, ledger, first) else {
                        continue;
                    };
                    let end = match last_durable {
                        Some(durable) if durable.ledger_id > ledger => last,
                        Some(durable) if durable.ledger_id == ledger => last.min(durable.entry_id),
                        _ => continue,
                    };
                    if start > end {
                        continue;
                    }
                    // Below the limit (the usual case) nothing is looked up: whether the run joins
                    // a range matters only at it.
                    let at_limit = cursor.acknowledged.range_count() >= max_ranges && {
                        let touches = |entry_id: Option<u64>| {
                            entry_id.is_some_and(|entry_id| {
                                cursor
                                    .acknowledged
                                    .contains(Position::new(ledger, entry_id))
                            })
                        };
                        let joins = Position::new(ledger, start) == next
                            || touches(start.checked_sub(1))
                            || touches(Some(start))
                            || touches(Some(end))
                            || touches(end.checked_add(1));
                        let ranges = cursor.acknowledged.range_count()
                            - usize::from(cursor.acknowledged.contains(next));
                        !joins && ranges >= max_ranges
                    };
                    if at_limit {
                        refused
                            .extend((start..=end).map(|entry_id| Position::new(ledger, entry_id)));
                        continue;
                    }
                    cursor.acknowledged.insert_range(ledger, start, end);
                }
                log.advance_mark_delete(cursor);
                (cursor.mark_delete, refused)
            })?;
        self.unless_refused(name, mark_delete, refused, max_ranges)
    }

    /// An acknowledgement's outcome: the new mark-delete position, or the positions refused
    /// because the cursor holds `max_ranges` ranges already.
    fn unless_refused(
        &self,
        name: &str,
        mark_delete: Option<Position>,
        refused: Vec<Position>,
        max_ranges: usize,
    ) -> Result<Option<Position>> {
        if refused.is_empty() {
            Ok(mark_delete)
        } else {
            Err(StorageError::TooManyAcknowledgedRanges {
                log: self.name().to_string(),
                cursor: name.to_string(),
                limit: max_ranges,
                refused,
            })
        }
    }

    /// Number of ranges of individually acknowledged entries cursor `name` holds (0 if it does
    /// not exist); at most `cursor_max_ranges` unless more were recovered.
    pub fn acknowledged_range_count(&self, name: &str) -> usize {
        self.acknowledged_ranges(name).0
    }

    /// Number of ranges of individually acknowledged entries of cursor `name`, and the last
    /// entry of the last one.
    pub fn acknowledged_ranges(&self, name: &str) -> (usize, Option<Position>) {
        self.lock().cursors.get(name).map_or((0, None), |slot| {
            (
                slot.state.acknowledged.range_count(),
                slot.state.acknowledged.last(),
            )
        })
    }

    /// The engine's `cursor_max_ranges`.
    pub fn cursor_max_ranges(&self) -> usize {
        self.shared.config.cursor_max_ranges
    }

    /// Acknowledges every entry up to and including `position`.
    pub fn acknowledge_cumulative(
        &self,
        name: &str,
        position: Position,
    ) -> Result<Option<Position>> {
        let mut state = self.lock();
        let last_durable = state.last_durable();
        state.update_cursor(self.name(), (name, ChangeKind::Own), |log, cursor| {
            let position = match last_durable {
                Some(last) => position.min(last),
                None => return cursor.mark_delete,
            };
            if Some(position) > cursor.mark_delete {
                cursor.mark_delete = Some(position);
                cursor.acknowledged.remove_up_to(position);
                log.advance_mark_delete(cursor);
            }
            cursor.mark_delete
        })
    }

    /// Moves the cursor so that everything after `mark_delete` is unacknowledged (seek, reset).
    /// A position beyond the last durable entry means the end: entries appended later are never
    /// acknowledged in advance.
    pub fn reset_cursor(&self, name: &str, mark_delete: Option<Position>) -> Result<()> {
        let mut state = self.lock();
        let mark_delete = mark_delete.min(state.last_durable());
        state.update_cursor(self.name(), (name, ChangeKind::Own), |_, cursor| {
            cursor.mark_delete = mark_delete;
            cursor.acknowledged = RangeSet::new();
        })
    }

    /// Replaces the cursor's properties.
    pub fn set_cursor_properties(
        &self,
        name: &str,
        properties: BTreeMap<String, String>,
    ) -> Result<()> {
        self.set_cursor_properties_as(name, properties, ChangeKind::Own)
    }

    /// [`Log::set_cursor_properties`], for the users `kind` names.
    pub fn set_cursor_properties_as(
        &self,
        name: &str,
        properties: BTreeMap<String, String>,
        kind: ChangeKind,
    ) -> Result<()> {
        let mut state = self.lock();
        state.update_cursor(self.name(), (name, kind), |_, cursor| {
            cursor.properties = properties
        })
    }

    /// Whether [`Log::persist_cursors`] has anything to write: a changed durable cursor or a
    /// deleted one. (A failed persist marks its cursors changed again.)
    pub(crate) fn cursors_changed(&self) -> bool {
        let state = self.lock();
        !state.deleted_cursors.is_empty()
            || state
                .cursors
                .values()
                .any(|slot| slot.durable && slot.dirty)
    }

    /// Writes and fsyncs every cursor changed since the last call (and the bytes the cursor
    /// WAL holds for this journal), straight into the log's journal.
    pub fn persist_cursors(&self) -> Result<()> {
        let mut journal = self
            .cursor_journal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if journal.retired {
            return Err(StorageError::Closed {
                log: self.name().to_string(),
            });
        }
        let rewrite = journal.should_rewrite();
        let Some(changes) = self.take_cursor_changes(rewrite || journal.has_pending()) else {
            return Ok(());
        };
        let mut records: Vec<Vec<u8>> =
            changes.snapshots.iter().map(SnapshotCopy::encode).collect();
        if !rewrite {
            records.extend(changes.tombstones.iter().map(|name| encode_tombstone(name)));
        }
        let written = if rewrite {
            journal.rewrite(&self.shared, &records)
        } else {
            journal.append(&self.shared, &records)
        };
        self.settle_cursor_changes(changes, rewrite, written.is_ok(), &mut journal);
        written
    }

    /// For the engine's WAL pass: this log's changed cursors encoded as journal records, with
    /// the journal held until [`StagedCursors::settle`]. `None` if there is nothing to write,
    /// the log is closed, or its journal needs a rewrite (done here, directly).
    pub(crate) fn stage_cursors(&self) -> Option<StagedCursors<'_>> {
        let journal = self
            .cursor_journal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if journal.retired {
            return None;
        }
        if journal.should_rewrite() {
            drop(journal);
            match self.persist_cursors() {
                Ok(()) | Err(StorageError::Closed { .. }) => {}
                Err(error) => {
                    tracing::error!(log = %self.name(), %error, "persisting cursors failed; will retry")
                }
            }
            return None;
        }
        let changes = self.take_cursor_changes(false)?;
        let mut bytes = Vec::new();
        for snapshot in &changes.snapshots {
            format::encode_record(&mut bytes, &[&snapshot.encode()]);
        }
        for name in &changes.tombstones {
            format::encode_record(&mut bytes, &[&encode_tombstone(name)]);
        }
        let record = WalRecord {
            directory: self
                .directory()
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default(),
            generation: journal.generation,
            offset: journal.length,
            bytes,
        };
        Some(StagedCursors {
            log: self,
            journal,
            changes,
            record,
        })
    }

    /// Checkpoint of the cursor WAL: writes and fsyncs the bytes it holds for this journal,
    /// without holding the journal's lock across the I/O (a pass would wait for it). The file
    /// is checked to be the same generation through the descriptor that writes it, so a
    /// journal rewritten meanwhile (renamed over) is never written with the old one's bytes.
    pub(crate) fn write_pending_cursors(&self) -> Result<()> {
        let lock = || {
            self.cursor_journal
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let copy = {
            let journal = lock();
            if journal.retired && journal.has_pending() {
                // Closed, and its close could not write them: they stay in the WAL (its files
                // are pinned until the next start).
                return Err(StorageError::Closed {
                    log: self.name().to_string(),
                });
            }
            journal.pending_copy()
        };
        let Some((path, generation, offset, bytes)) = copy else {
            return Ok(());
        };
        let io = self.shared.io.as_ref();
        let written = io
            .open(&path)
            .map_err(|error| StorageError::io("open", &path, error))
            .and_then(|file| {
                let header = FileHeader::read(file.as_ref(), &path, FileKind::CursorJournal)?;
                if header.fields[0] != generation {
                    // Rewritten since (see below).
                    return Ok(false);
                }
                file.write_all_at(&bytes, offset)
                    .map_err(|error| StorageError::io("write", &path, error))?;
                file.sync()
                    .map_err(|error| StorageError::io("fsync", &path, error))?;
                Ok(true)
            });
        let mut journal = lock();
        match written {
            Ok(true) => {
                journal.pending_written(generation, offset + bytes.len() as u64);
                Ok(())
            }
            // Rewritten since, and the rewrite completed (its rename is durable); or the log
            // closed meanwhile (its close wrote these bytes, or kept the WAL files for them)
            // and the name may hold another log's journal by now.
            Ok(false) if journal.generation != generation || journal.retired => Ok(()),
            Ok(false) => {
                // Another file under the journal's name, but no rewrite completed: one that
                // failed after its rename, which may not survive a power cut. The WAL files
                // stay until the rewrite that follows the failure completes.
                journal.needs_rewrite = true;
                Err(StorageError::io(
                    "checkpoint",
                    &path,
                    std::io::Error::other(
                        "the journal was replaced by a rewrite that did not complete",
                    ),
                ))
            }
            Err(error) => {
                journal.needs_rewrite = true;
                Err(error)
            }
        }
    }

    /// Takes the changed durable cursors (all of them if `force`) and the deleted ones, marking
    /// them clean; `None` if there is nothing to write.
    fn take_cursor_changes(&self, force: bool) -> Option<CursorChanges> {
        let max_ranges = self.shared.config.cursor_max_persisted_ranges;
        let mut state = self.lock();
        let dirty = state
            .cursors
            .values()
            .any(|slot| slot.durable && slot.dirty);
        if !dirty && state.deleted_cursors.is_empty() && !force {
            return None;
        }
        let tombstones = std::mem::take(&mut state.deleted_cursors);
        let mut snapshots = Vec::new();
        let mut persisted = Vec::new();
        for (name, slot) in state.cursors.iter_mut().filter(|(_, slot)| slot.durable) {
            if slot.dirty || force {
                snapshots.push(SnapshotCopy::of(name, &slot.state, max_ranges));
                persisted.push((name.clone(), slot.state.mark_delete));
                slot.dirty = false;
            }
        }
        Some(CursorChanges {
            snapshots,
            persisted,
            tombstones,
        })
    }

    /// After the changes were written (`durable`) or not: trimming may rely on the persisted
    /// positions, or the cursors are changed again and the journal rewritten next time.
    fn settle_cursor_changes(
        &self,
        changes: CursorChanges,
        rewrite: bool,
        durable: bool,
        journal: &mut CursorJournal,
    ) {
        let mut state = self.lock();
        if durable {
            // A deleted cursor's tombstone (or a snapshot of the cursor created again under
            // its name) is durable: a crash can no longer bring the old cursor back.
            for name in changes
                .tombstones
                .iter()
                .chain(changes.persisted.iter().map(|(name, _)| name))
            {
                state.deletions_in_flight.remove(name);
            }
            for (name, mark_delete) in changes.persisted {
                if let Some(slot) = state.cursors.get_mut(&name) {
                    slot.persisted_mark_delete = mark_delete;
                }
            }
            return;
        }
        // Try again next time, into a fresh file.
        journal.needs_rewrite = true;
        for (name, _) in changes.persisted {
            if let Some(slot) = state.cursors.get_mut(&name) {
                slot.dirty = true;
            }
        }
        if !rewrite {
            state.deleted_cursors.extend(changes.tombstones);
        }
    }
}

/// Cursor changes taken from a log's state to be written.
struct CursorChanges {
    snapshots: Vec<SnapshotCopy>,
    /// (cursor, mark-delete position) of each snapshot.
    persisted: Vec<(String, Option<Position>)>,
    tombstones: Vec<String>,
}

/// One log's part of a WAL pass (see [`Log::stage_cursors`]).
pub(crate) struct StagedCursors<'a> {
    log: &'a Log,
    journal: std::sync::MutexGuard<'a, CursorJournal>,
    changes: CursorChanges,
    pub(crate) record: WalRecord,
}

impl StagedCursors<'_> {
    /// The WAL write succeeded (`durable`) or failed.
    pub(crate) fn settle(mut self, durable: bool) {
        if durable {
            let journal = &mut *self.journal;
            journal.pending.extend_from_slice(&self.record.bytes);
            journal.length += self.record.bytes.len() as u64;
        }
        self.log
            .settle_cursor_changes(self.changes, false, durable, &mut self.journal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip() {
        let mut state = CursorState {
            mark_delete: Some(Position::new(3, 17)),
            ..CursorState::default()
        };
        state.acknowledged.insert_range(3, 19, 25);
        state.acknowledged.insert_range(3, 40, 40);
        state.acknowledged.insert_range(5, 0, 2);
        state.acknowledged.insert_range(9, 1_000_000, 2_000_000);
        state.properties.insert("replicated".into(), "true".into());
        let body = SnapshotCopy::of("sub/ü", &state, usize::MAX).encode();
        assert_eq!(
            decode_record(&body).expect("decode"),
            ("sub/ü".to_string(), Some(state.clone()))
        );

        let capped = SnapshotCopy::of("sub", &state, 2).encode();
        let (_, decoded) = decode_record(&capped).expect("decode capped");
        assert_eq!(decoded.expect("snapshot").acknowledged.range_count(), 2);

        assert_eq!(
            decode_record(&encode_tombstone("gone")).expect("decode"),
            ("gone".to_string(), None)
        );
        for cut in 0..body.len() {
            assert!(
                decode_record(&body[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
    }
}
