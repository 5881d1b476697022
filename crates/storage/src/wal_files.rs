//! What the engine's two write-ahead logs (cursors, entries) share about their files: each is a
//! series `<root>/<prefix>-<20-digit sequence>.wal` of files with a header of their kind,
//! replayed in sequence order at start, removed once what they hold is durable elsewhere. A
//! retired file may instead be kept as `<prefix>-<sequence>.free` and written over by a later
//! file of the series ([`WalFiles::recycle`]): its records get a new salt, so that the bytes of
//! its earlier life end the replay instead of passing for records.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Result, StorageError};
use crate::format::{self, FileHeader, FileKind, HEADER_LEN};
use crate::io::{Io, IoFile};

/// The name's end of a retired file kept to be written over.
const FREE_SUFFIX: &str = ".free";

/// The files of one write-ahead log.
#[derive(Clone, Copy)]
pub(crate) struct WalFiles {
    pub(crate) prefix: &'static str,
    pub(crate) kind: FileKind,
}

/// A WAL file opened for replay.
pub(crate) struct ReplayFile {
    pub(crate) path: PathBuf,
    pub(crate) file: Arc<dyn IoFile>,
    pub(crate) length: u64,
    /// The header's salt: the records' checksums are seeded with it (see [`WalFiles::recycle`]).
    pub(crate) salt: u32,
}

impl WalFiles {
    pub(crate) fn path(self, root: &Path, sequence: u64) -> PathBuf {
        root.join(format!("{}-{sequence:020}.wal", self.prefix))
    }

    /// Where retired file `sequence` is kept to be written over (see [`WalFiles::recycle`]).
    pub(crate) fn free_path(self, root: &Path, sequence: u64) -> PathBuf {
        root.join(format!("{}-{sequence:020}{FREE_SUFFIX}", self.prefix))
    }

    fn parse(self, name: &str, suffix: &str) -> Option<u64> {
        name.strip_prefix(self.prefix)?
            .strip_prefix('-')?
            .strip_suffix(suffix)?
            .parse()
            .ok()
    }

    /// The sequences of the files under `root`, oldest first.
    pub(crate) fn sequences(self, io: &dyn Io, root: &Path) -> Result<Vec<u64>> {
        self.list(io, root, ".wal")
    }

    fn list(self, io: &dyn Io, root: &Path, suffix: &str) -> Result<Vec<u64>> {
        let names = io
            .list_dir(root)
            .map_err(|error| StorageError::io("list directory", root, error))?;
        let mut sequences: Vec<u64> = names
            .iter()
            .filter_map(|name| self.parse(name, suffix))
            .collect();
        sequences.sort_unstable();
        Ok(sequences)
    }

    /// Removes the retired files kept to be written over (an earlier run's, at start: each run
    /// keeps its own), then fsyncs `root`.
    pub(crate) fn remove_free(self, io: &dyn Io, root: &Path) -> Result<()> {
        for sequence in self.list(io, root, FREE_SUFFIX)? {
            let path = self.free_path(root, sequence);
            io.remove_file(&path)
                .map_err(|error| StorageError::io("remove", &path, error))?;
        }
        io.sync_dir(root)
            .map_err(|error| StorageError::io("fsync directory", root, error))
    }

    /// Opens file `sequence` for replay; `None` if it was torn while being created (records
    /// are appended only after the header is durable, so it held none).
    pub(crate) fn open(
        self,
        io: &dyn Io,
        root: &Path,
        sequence: u64,
    ) -> Result<Option<ReplayFile>> {
        let path = self.path(root, sequence);
        let file = io
            .open(&path)
            .map_err(|error| StorageError::io("open", &path, error))?;
        let length = file
            .size()
            .map_err(|error| StorageError::io("stat", &path, error))?;
        match FileHeader::read(file.as_ref(), &path, self.kind) {
            Ok(header) => Ok(Some(ReplayFile {
                path,
                file,
                length,
                salt: header.salt,
            })),
            Err(StorageError::Corrupted { .. }) if length <= HEADER_LEN => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Creates file `sequence` (replacing a leftover one) with its header, durably.
    pub(crate) fn create(self, io: &dyn Io, root: &Path, sequence: u64) -> Result<Arc<dyn IoFile>> {
        let path = self.path(root, sequence);
        if io.exists(&path) {
            io.remove_file(&path)
                .map_err(|error| StorageError::io("remove", &path, error))?;
        }
        format::create_file(io, &path, self.header(0))
    }

    /// Makes the retired file `free` file `sequence`, its records' checksums seeded with
    /// `salt` ([`format::recycle_file`]: a crash midway leaves a free file, which the next start
    /// removes; a replay ends at the first record of the file's earlier life). An append that
    /// writes over allocated blocks leaves the file's size alone, so its fsync writes the data
    /// alone, not the file's metadata too (issue 16).
    pub(crate) fn recycle(
        self,
        io: &dyn Io,
        root: &Path,
        free: &Path,
        sequence: u64,
        salt: u32,
    ) -> Result<Arc<dyn IoFile>> {
        format::recycle_file(io, free, &self.path(root, sequence), self.header(salt))
    }

    /// The header of a file of this WAL whose records' checksums are seeded with `salt`.
    fn header(self, salt: u32) -> FileHeader {
        FileHeader {
            kind: self.kind,
            fields: [0; 5],
            salt,
        }
    }

    /// Removes the files `sequences` (one never created is fine), then fsyncs `root`.
    pub(crate) fn remove(self, io: &dyn Io, root: &Path, sequences: &[u64]) -> Result<()> {
        for sequence in sequences {
            let path = self.path(root, *sequence);
            match io.remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(StorageError::io("remove", &path, error)),
            }
        }
        io.sync_dir(root)
            .map_err(|error| StorageError::io("fsync directory", root, error))
    }

    /// Writes `parts` at `offset` of a WAL file and fsyncs it: what survives a crash once this
    /// returns `Ok`.
    pub(crate) fn append(
        file: &dyn IoFile,
        path: &Path,
        parts: &[&[u8]],
        offset: u64,
    ) -> Result<()> {
        file.write_all_vectored_at(parts, offset)
            .map_err(|error| StorageError::io("write", path, error))?;
        file.sync()
            .map_err(|error| StorageError::io("fsync", path, error))
    }
}
