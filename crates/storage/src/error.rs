//! The storage layer's error type.
//!
//! Every variant names the log, file or position involved so that an operator reading the log
//! line knows where to look. Errors are `Clone` because one failed flush completes many waiting
//! appends with the same error.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::Position;

/// Result alias for the storage layer.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    /// An I/O call failed. `operation` says which one (`"write"`, `"fsync"`, `"open"`, ...).
    #[error("{operation} failed on {}: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },

    /// The device has no space left. The failed appends were rolled back; the log stays usable
    /// and later appends succeed once space is freed.
    #[error("no space left on device writing {}", path.display())]
    DiskFull { path: PathBuf },

    /// Bytes on disk failed validation somewhere other than a torn tail. The log refuses to serve.
    #[error("corrupted data in {} at byte offset {offset}: {reason}", path.display())]
    Corrupted {
        path: PathBuf,
        offset: u64,
        reason: String,
    },

    /// A file was written by an unknown version of the storage format.
    #[error("{} has storage format version {found}; this build reads version {supported}", path.display())]
    UnsupportedFormat {
        path: PathBuf,
        found: u16,
        supported: u16,
    },

    /// A write or fsync failed earlier; the log accepts no more appends until it is reopened,
    /// because the state of the unsynced bytes on disk is unknown.
    #[error("log {log} is poisoned by an earlier failure: {cause}")]
    Poisoned { log: String, cause: String },

    #[error("entry of {size} bytes exceeds the maximum entry size of {max} bytes")]
    EntryTooLarge { size: usize, max: usize },

    /// Back-pressure: the log already holds the configured maximum of bytes waiting for fsync.
    #[error("log {log} has {pending_bytes} bytes waiting to be flushed, the limit is {limit}")]
    TooManyPendingBytes {
        log: String,
        pending_bytes: u64,
        limit: u64,
    },

    /// Acknowledgements that would have started more individually acknowledged ranges than
    /// `cursor_max_ranges` were refused (the others in the same call were applied): those
    /// entries stay unacknowledged.
    #[error("cursor {cursor} of log {log} holds the maximum of {limit} acknowledged ranges; {} acknowledgements refused", refused.len())]
    TooManyAcknowledgedRanges {
        log: String,
        cursor: String,
        limit: usize,
        refused: Vec<Position>,
    },

    #[error("position {position} is not in log {log}")]
    PositionNotFound { log: String, position: Position },

    #[error("cursor {cursor} does not exist in log {log}")]
    CursorNotFound { log: String, cursor: String },

    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },

    #[error("invalid storage configuration: {0}")]
    InvalidConfig(String),

    #[error("log {log} is closed")]
    Closed { log: String },

    /// `open_log` (or a second `delete_log`) while the log is being deleted; try again once the
    /// deletion is done.
    #[error("log {log} is being deleted")]
    BeingDeleted { log: String },

    /// The log's remote side (cluster mode: the object-store log) did not commit an append.
    /// The log is poisoned with it: appends fail until it is reopened. `not_owner`: the
    /// broker no longer owns the topic (a newer owner fenced the commit).
    #[error("log {log}: remote commit failed{}: {cause}", if *not_owner { " (no longer the owner)" } else { "" })]
    Remote {
        log: String,
        not_owner: bool,
        cause: String,
    },

    /// Another engine (in this process or another) has the data directory open.
    #[error("data directory {} is in use by another storage engine (lock file {} is locked)", directory.display(), directory.join("lock").display())]
    DirectoryInUse { directory: PathBuf },
}

impl StorageError {
    pub(crate) fn io(operation: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::StorageFull {
            return StorageError::DiskFull { path };
        }
        StorageError::Io {
            operation,
            path,
            source: Arc::new(source),
        }
    }

    pub(crate) fn corrupted(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        StorageError::Corrupted {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }
}
