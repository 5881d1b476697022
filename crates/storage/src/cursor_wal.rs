//! The engine's cursor write-ahead log: one file that every log's cursor changes go through, so
//! that a persistence pass over many logs costs one write and one fsync instead of one fsync
//! per log's journal.
//!
//! A pass encodes each changed log's journal records as usual, appends one WAL record per log
//! (the log's directory name, its journal's generation, the journal offset the records belong
//! at, and the records' bytes) and fsyncs the WAL once: from then on the changes are durable.
//! The journals receive those bytes later, at a checkpoint (write and fsync), after which the
//! WAL file that covered them is removed; passes meanwhile go to the next WAL file. At start,
//! before any log opens, every WAL file is replayed into the journals whose generation matches
//! (a journal rewritten or created again since has another one), the journals are fsynced and
//! the WAL files removed. See `docs/durability.md` and `docs/storage-format.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cursor::UnwrittenJournalBytes;
use crate::error::{Result, StorageError};
use crate::format::{self, ByteReader, ByteWriter, FileHeader, FileKind, ScanEnd, HEADER_LEN};
use crate::io::{Io, IoFile};
use crate::wal_files::{ReplayFile, WalFiles};

const RECORD_JOURNAL_BYTES: u8 = 1;

/// Journal bytes of one log, as one WAL record.
pub(crate) struct WalRecord {
    /// The log's directory name under `logs/`.
    pub(crate) directory: String,
    pub(crate) generation: u64,
    pub(crate) offset: u64,
    pub(crate) bytes: Vec<u8>,
}

impl WalRecord {
    fn encode(&self) -> Vec<u8> {
        let mut writer = ByteWriter::default();
        writer.u8(RECORD_JOURNAL_BYTES);
        writer.bytes(self.directory.as_bytes());
        writer.u64(self.generation);
        writer.u64(self.offset);
        writer.bytes(&self.bytes);
        writer.bytes
    }

    fn decode(body: &[u8]) -> std::result::Result<WalRecord, String> {
        let mut reader = ByteReader::new(body);
        let kind = reader.u8()?;
        if kind != RECORD_JOURNAL_BYTES {
            return Err(format!("unknown cursor WAL record kind {kind}"));
        }
        let directory = String::from_utf8(reader.bytes()?.to_vec())
            .map_err(|_| "directory name is not UTF-8")?;
        let generation = reader.u64()?;
        let offset = reader.u64()?;
        let bytes = reader.bytes()?.to_vec();
        if !reader.is_empty() {
            return Err("trailing bytes after cursor WAL record".into());
        }
        Ok(WalRecord {
            directory,
            generation,
            offset,
            bytes,
        })
    }
}

const FILES: WalFiles = WalFiles {
    prefix: "cursors",
    kind: FileKind::CursorWal,
};

fn wal_path(root: &Path, sequence: u64) -> PathBuf {
    FILES.path(root, sequence)
}

/// The WAL files of an engine: the one passes append to, and older ones whose checkpoint has
/// not finished.
pub(crate) struct CursorWal {
    root: PathBuf,
    sequence: u64,
    /// `None` only if it could not be created (then `broken`).
    file: Option<Arc<dyn IoFile>>,
    length: u64,
    /// Earlier files, oldest first, still needed until a checkpoint made their bytes durable
    /// in the journals.
    older: Vec<u64>,
    /// A write or fsync of the WAL failed (or it could not be created): its tail is unknown,
    /// so passes no longer append to it. Each pass tries to start a new file
    /// ([`CursorWal::restart`]); until one can be created, passes write and fsync each journal,
    /// as without a WAL.
    pub(crate) broken: bool,
    /// Set by `recover` on a full disk: the bytes it could not write into journals, by journal
    /// path (written when the log opens), and the last WAL file holding them, which is kept
    /// (with every earlier one) until the next start.
    pub(crate) unwritten: BTreeMap<PathBuf, UnwrittenJournalBytes>,
    pub(crate) pinned: u64,
}

impl CursorWal {
    /// Replays every WAL file under `root` into the journals, makes them durable, and starts
    /// an empty WAL. Runs before any log is opened.
    pub(crate) fn recover(io: &dyn Io, root: &Path) -> Result<CursorWal> {
        let sequences = FILES.sequences(io, root)?;
        let mut touched: BTreeMap<PathBuf, (Arc<dyn IoFile>, u64)> = BTreeMap::new();
        // Directories of journals whose bytes were skipped because another generation is
        // under the name (see `redo`).
        let mut superseded: BTreeSet<PathBuf> = BTreeSet::new();
        let mut unwritten: BTreeMap<PathBuf, UnwrittenJournalBytes> = BTreeMap::new();
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
            let mut records = Vec::new();
            let scan =
                format::scan_records(file.as_ref(), &path, HEADER_LEN, length, salt, |_, body| {
                    records.push(WalRecord::decode(body)?);
                    Ok(())
                })?;
            if let ScanEnd::Damaged { offset, reason } = scan {
                // The unsynced end of the last write: a pass whose fsync never returned, so
                // nothing relied on it.
                tracing::warn!(path = %path.display(), offset, %reason, "ignoring the torn tail of the cursor WAL");
            }
            for record in &records {
                redo(
                    io,
                    root,
                    record,
                    &mut touched,
                    &mut superseded,
                    &mut unwritten,
                )?;
            }
        }
        sync_touched(&touched)?;
        for directory in &superseded {
            io.sync_dir(directory)
                .map_err(|error| StorageError::io("fsync directory", directory, error))?;
        }
        // The new file first: a crash before the old ones are gone replays them again, which
        // writes the same bytes again.
        let sequence = sequences.last().map_or(1, |last| last + 1);
        let (file, length, broken) = match FILES.create(io, root, sequence) {
            Ok(file) => (Some(file), HEADER_LEN, false),
            Err(StorageError::DiskFull { .. }) => {
                // Cursors are then persisted journal by journal (their appends fail until
                // there is space, and are retried); the engine still opens.
                tracing::warn!(root = %root.display(), "disk full: no cursor WAL; cursors are persisted journal by journal until one can be created");
                (None, HEADER_LEN, true)
            }
            Err(error) => return Err(error),
        };
        let (removed, pinned): (&[u64], u64) = if unwritten.is_empty() {
            (&sequences, 0)
        } else {
            // A full disk: some journals lack bytes only these files hold.
            tracing::warn!(journals = unwritten.len(), "disk full: cursor WAL bytes not written into their journals yet; the logs concerned open once there is space");
            (&[], sequences.last().copied().unwrap_or(0))
        };
        FILES.remove(io, root, removed)?;
        Ok(CursorWal {
            root: root.to_path_buf(),
            sequence,
            file,
            length,
            older: Vec::new(),
            broken,
            unwritten,
            pinned,
        })
    }

    /// Bytes in the current file.
    pub(crate) fn length(&self) -> u64 {
        self.length
    }

    /// Appends `records` and fsyncs: once this returns, they survive a crash. A failure
    /// breaks the WAL (see `broken`).
    pub(crate) fn append(&mut self, records: &[&WalRecord]) -> Result<()> {
        if self.broken {
            return Err(StorageError::io(
                "append",
                wal_path(&self.root, self.sequence),
                std::io::Error::other("the cursor WAL failed earlier"),
            ));
        }
        let mut bytes = Vec::new();
        for record in records {
            format::encode_record(&mut bytes, &[&record.encode()]);
        }
        let path = wal_path(&self.root, self.sequence);
        let Some(file) = &self.file else {
            self.broken = true;
            return Err(StorageError::io(
                "append",
                path,
                std::io::Error::other("no cursor WAL file"),
            ));
        };
        match WalFiles::append(file.as_ref(), &path, &[&bytes], self.length) {
            Ok(()) => {
                self.length += bytes.len() as u64;
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "the cursor WAL failed; cursors are persisted journal by journal until a new WAL file can be created");
                self.broken = true;
                Err(error)
            }
        }
    }

    /// Starts a new file for the passes to come; returns the sequence of the one it replaces,
    /// which stays until [`CursorWal::retire`] (after the journals were made durable).
    pub(crate) fn rotate(&mut self, io: &dyn Io) -> Result<u64> {
        let file = FILES.create(io, &self.root, self.sequence + 1)?;
        let length = HEADER_LEN;
        let previous = self.sequence;
        self.older.push(previous);
        self.sequence += 1;
        self.file = Some(file);
        self.length = length;
        Ok(previous)
    }

    /// After a failure: starts a new file for the passes (the failed one stays until a
    /// checkpoint wrote its bytes into the journals, like any older file; the records of the
    /// failed pass in it are superseded, since each journal they were for is rewritten).
    /// Returns whether the WAL can be used again.
    pub(crate) fn restart(&mut self, io: &dyn Io) -> bool {
        match self.rotate(io) {
            Ok(_) => {
                tracing::info!(sequence = self.sequence, "cursor WAL in use again");
                self.broken = false;
                true
            }
            Err(error) => {
                tracing::debug!(%error, "the cursor WAL cannot be started again yet");
                false
            }
        }
    }

    /// The sequence number of the file passes append to.
    pub(crate) fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Removes every file up to and including `sequence`, except those up to `pinned`
    /// (durably): a checkpoint made their bytes durable in the journals.
    pub(crate) fn retire(&mut self, io: &dyn Io, sequence: u64, pinned: u64) -> Result<()> {
        let (done, kept): (Vec<u64>, Vec<u64>) = self
            .older
            .iter()
            .partition(|older| **older <= sequence && **older > pinned);
        // (One never created: a full disk at start.)
        FILES.remove(io, &self.root, &done)?;
        self.older = kept;
        Ok(())
    }
}

/// Journals a replay holds open at once, at most.
const REPLAY_OPEN_JOURNALS_MAX: usize = 256;

fn sync_touched(touched: &BTreeMap<PathBuf, (Arc<dyn IoFile>, u64)>) -> Result<()> {
    for (path, (file, _)) in touched {
        file.sync()
            .map_err(|error| StorageError::io("fsync", path, error))?;
    }
    Ok(())
}

/// Writes one record's bytes into its journal, if that journal is still the one (generation)
/// the record was written for.
fn redo(
    io: &dyn Io,
    root: &Path,
    record: &WalRecord,
    touched: &mut BTreeMap<PathBuf, (Arc<dyn IoFile>, u64)>,
    superseded: &mut BTreeSet<PathBuf>,
    unwritten: &mut BTreeMap<PathBuf, UnwrittenJournalBytes>,
) -> Result<()> {
    let path = root
        .join("logs")
        .join(&record.directory)
        .join(crate::cursor::JOURNAL_FILE);
    if let Some(held) = unwritten.get_mut(&path) {
        // A full disk stopped the writes into this journal: its later bytes are held too.
        if record.generation != held.generation {
            return Ok(());
        }
        let at = record.offset.checked_sub(held.offset).map(|at| at as usize);
        match at {
            Some(at) if at <= held.bytes.len() => {
                let end = at + record.bytes.len();
                if end > held.bytes.len() {
                    held.bytes.resize(end, 0);
                }
                held.bytes[at..end].copy_from_slice(&record.bytes);
                return Ok(());
            }
            _ => {
                return Err(StorageError::corrupted(
                    &path,
                    record.offset,
                    "the cursor WAL's bytes for this journal do not continue each other",
                ))
            }
        }
    }
    let file = match touched.get(&path) {
        Some((file, generation)) if *generation == record.generation => file.clone(),
        _ => {
            if !io.exists(&path) {
                // The log was deleted since.
                return Ok(());
            }
            let file = io
                .open(&path)
                .map_err(|error| StorageError::io("open", &path, error))?;
            match FileHeader::read(file.as_ref(), &path, FileKind::CursorJournal) {
                Ok(header) if header.fields[0] == record.generation => {}
                // Rewritten or created again since (another generation): not this record's
                // journal. A rewrite's rename may not be durable yet (the process died before
                // its directory fsync): the directory is fsynced before the WAL files are
                // removed, else a power cut could bring back the journal these bytes are for.
                Ok(_) => {
                    superseded.insert(crate::io::parent_dir(&path));
                    return Ok(());
                }
                // Torn while being created: it never held records.
                Err(StorageError::Corrupted { .. }) => return Ok(()),
                Err(error) => return Err(error),
            }
            file
        }
    };
    let length = file
        .size()
        .map_err(|error| StorageError::io("stat", &path, error))?;
    if length < record.offset {
        return Err(StorageError::corrupted(
            &path,
            length,
            format!(
                "the cursor WAL holds bytes for offset {} of this journal, which ends at {length}",
                record.offset
            ),
        ));
    }
    match file
        .write_all_at(&record.bytes, record.offset)
        .map_err(|error| StorageError::io("write", &path, error))
    {
        Ok(()) => {}
        Err(StorageError::DiskFull { .. }) => {
            // The engine still opens: this journal gets the bytes when its log opens.
            unwritten.insert(
                path.clone(),
                UnwrittenJournalBytes {
                    generation: record.generation,
                    offset: record.offset,
                    bytes: record.bytes.clone(),
                },
            );
        }
        Err(error) => return Err(error),
    }
    if touched.len() >= REPLAY_OPEN_JOURNALS_MAX && !touched.contains_key(&path) {
        // Bounds the file descriptors a replay holds: the journals written so far are made
        // durable and closed (a later record for one opens it again).
        sync_touched(touched)?;
        touched.clear();
    }
    touched.insert(path, (file, record.generation));
    Ok(())
}
