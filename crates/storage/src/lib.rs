//! Meridian's storage engine: one append-only, segmented log per topic partition, with group
//! commit, durable cursors, retention and crash recovery.
//!
//! This crate knows nothing of topics, sockets or async runtimes: it stores entries (opaque
//! bytes) at positions `(ledger_id, entry_id)` and remembers what each cursor acknowledged.
//! Appends complete through a channel that works from both threads and async code.
//!
//! # Layout
//!
//! - [`engine`]: [`Storage`], the registry of logs, the flush threads and the maintenance thread.
//! - [`log`]: [`Log`]: appends, group commit, reads, the publish-time index, trimming, recovery.
//! - [`cursor`]: durable cursors and their journal file.
//! - [`range_set`]: the compact set of individually acknowledged positions.
//! - [`cache`]: recent entries in memory.
//! - [`format`]: the bytes on disk (headers, checksummed records); see `docs/storage-format.md`.
//! - [`io`]: the file-system seam, with [`RealIo`] and the crash-simulating [`SimIo`].
//! - [`config`]: every limit, with its default.
//! - [`remote`]: the seam to a remote log ([`RemoteLog`]) that cluster mode commits through.
//!
//! The durability contract is in `docs/durability.md`.

mod cache;
pub mod closed_log;
pub mod config;
pub mod cursor;
mod cursor_wal;
pub mod engine;
mod entry_wal;
mod error;
pub mod format;
pub mod io;
pub mod log;
mod position;
pub mod range_set;
pub mod remote;
mod sim;
mod wal_files;

pub use config::{FlushPolicy, Retention, StorageConfig, ENTRY_WAL_GROUP_LIMIT_MAX};
pub use cursor::{ChangeKind, CursorState, InitialPosition};
pub use engine::Storage;
pub use error::{Result, StorageError};
pub use io::{Io, IoFile, RealIo};
pub use log::{Entry, KnownChecksum, Log, LogStats, PendingAppend, PoisonListener};
pub use position::Position;
pub use range_set::RangeSet;
pub use remote::{RemoteCommit, RemoteLog};
pub use sim::{CrashMode, SimIo};
