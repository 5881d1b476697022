//! The log-store seam's second half: a [`RemoteLog`] that makes a [`Log`](crate::Log)'s
//! entries durable somewhere else (cluster mode: the object-store log of `crates/objlog`,
//! committed in etcd under the bundle owner's epoch).
//!
//! A log without one is the local engine, unchanged: an append is durable once its batch is
//! written and fsynced. A log given one with [`Log::attach_remote`](crate::Log::attach_remote)
//! hands every append to it as well (in position order, under the log's lock, so both sides
//! number entries alike), and a batch becomes durable (readable, cursors may acknowledge it,
//! its appends complete) only once the local write **and** the remote commit of every entry
//! in it succeeded. The local files are then the broker's working copy of the remote log:
//! reads, the cache, cursors, trimming and recovery stay the local engine's, shared by both
//! modes. Trimming tells the remote which entries the local log no longer holds
//! ([`RemoteLog::trim_before`]). A remote failure poisons the log with [`StorageError::Remote`]: nothing after it is
//! ever acknowledged, and the caller reopens the log (rebuilt from the remote side).
//!
//! Entry ids must match on both sides: a remote log continues at the local log's next entry
//! id; [`RemoteLog::append`] is told the local id and refuses a mismatch.

use bytes::Bytes;

use crate::error::{Result, StorageError};

/// Where a log's entries are committed besides its local files.
pub trait RemoteLog: Send + Sync {
    /// Starts committing the entry the local log numbered `entry_id`. Called under the log's
    /// lock, in position order, so it must not block. Returns what the flush waits on.
    fn append(
        &self,
        entry_id: u64,
        data: Bytes,
        publish_time_ms: u64,
    ) -> Result<Box<dyn RemoteCommit>>;

    /// The local log holds no entry before `entry_id` any more (its segments were trimmed:
    /// every cursor passed them and retention let them go), so the remote may drop them too.
    /// Called after every trim, off the log's lock; it must not block. The default keeps
    /// everything.
    fn trim_before(&self, entry_id: u64) {
        let _ = entry_id;
    }
}

/// One entry's commit in a [`RemoteLog`], waited for by a flush thread (off every lock).
pub trait RemoteCommit: Send {
    /// Blocks until the entry is committed; an error names why it was not (or may not be).
    fn wait(self: Box<Self>) -> Result<()>;
}

/// Waits for every commit of a batch, in order; the first failure is the batch's.
pub(crate) fn wait_all(commits: Vec<Box<dyn RemoteCommit>>) -> Result<()> {
    let mut outcome = Ok(());
    for commit in commits {
        // Waited even after a failure, so that no commit is left behind unobserved.
        let result = commit.wait();
        if outcome.is_ok() {
            outcome = result;
        }
    }
    outcome
}

impl StorageError {
    /// A remote-log failure as the storage layer reports it.
    pub fn remote(log: &str, not_owner: bool, cause: impl Into<String>) -> StorageError {
        StorageError::Remote {
            log: log.to_string(),
            not_owner,
            cause: cause.into(),
        }
    }
}
