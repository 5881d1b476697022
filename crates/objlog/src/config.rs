//! The engine's settings, each with its default and the reason for it.

use std::time::Duration;

use crate::{ObjectLogError, Result};

/// Settings of an [`ObjectLog`](crate::ObjectLog).
#[derive(Debug, Clone)]
pub struct ObjectLogConfig {
    /// The broker's id: data objects are written under `data/<broker-id>/...`.
    pub broker_id: String,
    /// How long the flusher waits for more appends after the first one arrives at an idle
    /// engine. Appends that arrive while a commit is in flight are taken as soon as it ends.
    /// Default 2 ms.
    pub linger: Duration,
    /// The flusher starts a commit once this many bytes wait, and puts at most this many
    /// bytes of entries (plus one entry) in one object; the rest goes into the next. Default
    /// 1 MiB: PUTs run at about 80-90 MB/s on the SeaweedFS measured here, so a full object
    /// costs about 12 ms.
    pub max_object_bytes: u64,
    /// The largest entry accepted. Default 5 MiB + 10 KiB (as the local engine).
    pub max_entry_bytes: usize,
    /// Bytes one topic may have waiting for commit (queued or in flight); appends beyond fail
    /// at once with `TooManyPendingBytes`. Default 16 MiB.
    pub max_pending_bytes_per_topic: u64,
    /// Bytes all topics together may have waiting; appends beyond fail at once. Default 64 MiB.
    pub max_pending_bytes: u64,
    /// How long a PUT or an etcd commit that fails with a retryable error (store or etcd
    /// unreachable, 5xx, outcome unknown) is retried, counted from the start of the commit;
    /// then the commit's appends fail with `Unavailable`. One attempt may overrun it by its
    /// client's own request timeout. Default 10 s.
    pub commit_deadline: Duration,
    /// The pause between two attempts. Default 100 ms.
    pub retry_pause: Duration,
    /// Bytes of recently committed entries each topic keeps in memory for tailing readers.
    /// Default 4 MiB.
    pub tail_cache_bytes_per_topic: u64,
    /// Once a topic has this many `logs/<topic>/objects/` keys in etcd, the flusher writes
    /// their refs to one manifest object and replaces them by it in the head (one fenced
    /// transaction), so etcd holds at most this many keys per topic plus its head. 0: never
    /// (etcd then grows by one key per commit of the topic). Default 1,000 (about 200 KB per
    /// manifest).
    pub manifest_threshold: usize,
    /// A data object or manifest is deleted by the orphan sweep only once it is older than
    /// this (by the object store's clock) and no topic's index references it. It must exceed
    /// the longest a commit can take between its PUT and its etcd transaction (the commit
    /// deadline plus one attempt's overrun), plus the clock skew between brokers and the store:
    /// an object younger than that may belong to a commit still under way. Default 1 hour; at
    /// least twice `commit_deadline`.
    pub orphan_grace: Duration,
    /// How often the engine runs the orphan sweep (when this broker holds the sweeper key;
    /// see [`crate::sweep`]). `None`: only when asked ([`crate::ObjectLog::sweep`]). Default
    /// 10 minutes.
    pub sweep_interval: Option<Duration>,
}

impl ObjectLogConfig {
    pub fn new(broker_id: &str) -> ObjectLogConfig {
        ObjectLogConfig {
            broker_id: broker_id.to_string(),
            linger: Duration::from_millis(2),
            max_object_bytes: 1 << 20,
            max_entry_bytes: 5 * 1024 * 1024 + 10 * 1024,
            max_pending_bytes_per_topic: 16 << 20,
            max_pending_bytes: 64 << 20,
            commit_deadline: Duration::from_secs(10),
            retry_pause: Duration::from_millis(100),
            tail_cache_bytes_per_topic: 4 << 20,
            manifest_threshold: 1000,
            orphan_grace: Duration::from_secs(3600),
            sweep_interval: Some(Duration::from_secs(600)),
        }
    }

    /// Checks the settings; the message names the offending one.
    pub fn validate(&self) -> Result<()> {
        let problem = if self.broker_id.is_empty() || self.broker_id.contains('/') {
            Some("broker_id must be non-empty and hold no '/'".to_string())
        } else if self.max_object_bytes == 0 {
            Some("max_object_bytes must be above 0".to_string())
        } else if self.max_pending_bytes_per_topic < self.max_entry_bytes as u64 {
            Some("max_pending_bytes_per_topic must be at least max_entry_bytes".to_string())
        } else if self.max_pending_bytes < self.max_pending_bytes_per_topic {
            Some("max_pending_bytes must be at least max_pending_bytes_per_topic".to_string())
        } else if self.max_entry_bytes as u64
            >= meridian_objstore::data_object::MAX_OBJECT_BYTES / 2
        {
            Some("max_entry_bytes must be below half the data-object format's maximum".to_string())
        } else if self.orphan_grace < self.commit_deadline * 2 {
            Some("orphan_grace must be at least twice commit_deadline".to_string())
        } else if self
            .sweep_interval
            .is_some_and(|interval| interval.is_zero())
        {
            Some("sweep_interval must be above 0".to_string())
        } else {
            None
        };
        match problem {
            Some(problem) => Err(ObjectLogError::Config(problem)),
            None => Ok(()),
        }
    }
}
