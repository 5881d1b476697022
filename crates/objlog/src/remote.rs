//! A [`TopicLog`] behind the local engine's log-store seam ([`meridian_storage::RemoteLog`]):
//! in cluster mode each topic's `meridian_storage::Log` is the broker's working copy, and an
//! append is acknowledged only once this engine committed it (object stored, index committed
//! in etcd under the bundle owner's epoch).

use std::sync::Arc;

use bytes::Bytes;
use meridian_storage::{RemoteCommit, RemoteLog, StorageError};

use crate::topic::{PendingAppend, TopicLog};
use crate::ObjectLogError;

/// `log`'s entries committed through `topic`. Entry ids match on both sides: the local log's
/// entry `n` is this log's entry `n` (the broker rebuilds the local copy from this log before
/// attaching it), and a mismatch is refused.
pub struct RemoteTopic {
    topic: Arc<TopicLog>,
}

impl RemoteTopic {
    pub fn new(topic: Arc<TopicLog>) -> RemoteTopic {
        RemoteTopic { topic }
    }

    pub fn topic(&self) -> &Arc<TopicLog> {
        &self.topic
    }
}

/// An object-store log failure as the local engine reports it: back-pressure and size limits
/// keep their meaning (nothing was appended, the log stays usable); anything else is a failed
/// remote commit, which poisons the local log.
pub fn storage_error(error: ObjectLogError) -> StorageError {
    match error {
        ObjectLogError::TooManyPendingBytes {
            topic,
            pending_bytes,
            limit,
            ..
        } => StorageError::TooManyPendingBytes {
            log: topic,
            pending_bytes,
            limit,
        },
        ObjectLogError::EntryTooLarge { size, max, .. } => {
            StorageError::EntryTooLarge { size, max }
        }
        ObjectLogError::NotOwner { ref topic, .. } => {
            StorageError::remote(topic, true, error.to_string())
        }
        other => {
            let topic = match &other {
                ObjectLogError::Unavailable { topic, .. }
                | ObjectLogError::CommitUncertain { topic, .. }
                | ObjectLogError::WriteFailed { topic, .. }
                | ObjectLogError::RolledBack { topic, .. }
                | ObjectLogError::PositionNotFound { topic, .. }
                | ObjectLogError::ReadFailed { topic, .. }
                | ObjectLogError::Metadata { topic, .. }
                | ObjectLogError::AlreadyOpen { topic }
                | ObjectLogError::Closed { topic } => topic.clone(),
                _ => String::new(),
            };
            StorageError::remote(&topic, false, other.to_string())
        }
    }
}

struct Commit(PendingAppend);

impl RemoteCommit for Commit {
    fn wait(self: Box<Self>) -> meridian_storage::Result<()> {
        self.0.wait().map(|_| ()).map_err(storage_error)
    }
}

impl RemoteLog for RemoteTopic {
    fn append(
        &self,
        entry_id: u64,
        data: Bytes,
        publish_time_ms: u64,
    ) -> meridian_storage::Result<Box<dyn RemoteCommit>> {
        let pending = self
            .topic
            .append(data, publish_time_ms)
            .map_err(storage_error)?;
        let remote_id = pending.position().entry_id;
        if remote_id != entry_id {
            // The two sides no longer number entries alike (a rollback on one side only):
            // nothing more may be acknowledged until the topic is reopened and rebuilt.
            return Err(StorageError::remote(
                self.topic.name(),
                false,
                format!(
                    "entry ids diverged: the local log appends entry {entry_id}, the object-store log entry {remote_id}"
                ),
            ));
        }
        Ok(Box::new(Commit(pending)))
    }

    /// The local log trimmed its entries before `entry_id`: their refs leave the index too
    /// (by the flusher, fenced), so a new owner no longer copies them.
    fn trim_before(&self, entry_id: u64) {
        self.topic.request_trim(entry_id);
    }
}
