//! Meridian's cluster-mode log engine (issue 17, `docs/cluster.md`, "Built: the object-store
//! log"): topics' entries are group-committed by one broker-wide flusher into one data object on
//! S3-compatible storage, and each topic's index (which object holds which entries) is committed
//! in etcd by a transaction fenced on the bundle owner's epoch. Only then do appends complete.
//!
//! # Layout
//!
//! - [`config`]: [`ObjectLogConfig`], every limit and its default.
//! - [`keys`]: the etcd records of a topic's log, `logs/<topic>/head` ([`Head`]) and
//!   `logs/<topic>/objects/<first-entry>` ([`ObjectRef`]), and the [`Manifest`] objects.
//! - `manifest`: compaction of a topic's `objects/` keys into a manifest (etcd stays small),
//!   and reading a head's chain of manifests back.
//! - [`sweep`]: the orphan sweep (unreferenced data objects and manifests past a grace period).
//! - [`engine`]: [`ObjectLog`], the broker-wide engine: open topics, the flusher thread (build
//!   one object, PUT it, commit per bundle, resolve appends), retries, fencing.
//! - [`remote`]: [`RemoteTopic`], a [`TopicLog`] as the local engine's `RemoteLog` (the broker's
//!   log-store seam in cluster mode).
//! - [`topic`]: [`TopicLog`], one topic's log: append (a future that completes once committed),
//!   reads by position from the tail cache or from objects, the last durable position.
//!
//! # Invariants
//!
//! - An append completes successfully only after its object was stored *and* its index entry
//!   committed in etcd under the bundle epoch of this owner. Nothing else is ever readable.
//! - Entry ids of a topic are consecutive across owners: a new owner continues at the head's
//!   `next_entry`. Positions are `(epoch of the bundle when committed, entry id)`, so they grow.
//! - Once a commit of a bundle is refused as fenced, every pending and later append of that
//!   bundle's topics fails ([`ObjectLogError::NotOwner`]); there is never a success after it.
//! - A failed batch rolls its topic back: every append queued behind it fails too (their ids
//!   would leave a gap), and the next append gets the first uncommitted id again.
//! - The engine calls the blocking etcd and S3 clients only from its flusher thread (writes)
//!   and from the caller's thread (reads, open); no lock is held across I/O.

pub mod config;
pub mod engine;
pub mod keys;
mod manifest;
pub mod remote;
pub mod sweep;
pub mod topic;

pub use config::ObjectLogConfig;
pub use engine::ObjectLog;
pub use keys::{Head, Manifest, ManifestRef, ObjectRef};
pub use meridian_storage::{Entry, Position};
pub use remote::RemoteTopic;
pub use sweep::SweepReport;
pub use topic::{PendingAppend, TopicLog};

/// What went wrong in the object-store log. Errors are `Clone` because one failed commit
/// completes many waiting appends with the same error. Every message names the topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectLogError {
    /// This broker no longer owns the topic's bundle (a commit was fenced by a newer owner, or
    /// the bundle was released): the client must look the topic up again.
    #[error("topic {topic}: not the owner: bundle {bundle} epoch {epoch}: {detail}")]
    NotOwner {
        topic: String,
        bundle: String,
        epoch: u64,
        detail: String,
    },
    /// The object store or etcd kept failing with retryable errors until the commit deadline:
    /// the append was not committed (an object already stored stays unreferenced).
    #[error("topic {topic}: {operation} kept failing for {waited_ms} ms (deadline {deadline_ms} ms), append not committed: {cause}")]
    Unavailable {
        topic: String,
        operation: &'static str,
        waited_ms: u64,
        deadline_ms: u64,
        cause: String,
    },
    /// etcd did not answer whether a commit applied before the deadline (it may have): the
    /// append is reported failed, and the topic refuses appends until it is opened again, which
    /// reads the head and learns the truth. A client that resends is de-duplicated as usual.
    #[error("topic {topic}: the outcome of its etcd commit is unknown after {waited_ms} ms; the topic must be reopened: {cause}")]
    CommitUncertain {
        topic: String,
        waited_ms: u64,
        cause: String,
    },
    /// The object store or etcd refused the write for a reason retrying cannot fix.
    #[error("topic {topic}: {operation} failed, append not committed: {cause}")]
    WriteFailed {
        topic: String,
        operation: &'static str,
        cause: String,
    },
    /// An earlier append of the same topic failed; this one, queued behind it, fails too so
    /// that no entry id is skipped.
    #[error("topic {topic}: an earlier append failed, so this one was not committed: {cause}")]
    RolledBack { topic: String, cause: String },
    /// Back-pressure: appends beyond the pending-bytes limits fail at once (they never wait).
    #[error("topic {topic}: {pending_bytes} bytes already wait for commit {scope}, the limit is {limit}")]
    TooManyPendingBytes {
        topic: String,
        scope: &'static str,
        pending_bytes: u64,
        limit: u64,
    },
    #[error("topic {topic}: entry of {size} bytes exceeds the maximum entry size of {max} bytes")]
    EntryTooLarge {
        topic: String,
        size: usize,
        max: usize,
    },
    #[error("topic {topic}: position {position} is not in the log")]
    PositionNotFound { topic: String, position: Position },
    /// Reading committed entries failed (object store unreachable, or an object failed its
    /// checks: never served).
    #[error("topic {topic}: read failed: {cause}")]
    ReadFailed { topic: String, cause: String },
    /// etcd could not be read while opening a topic, or holds a record this engine cannot use.
    #[error("topic {topic}: {operation}: {cause}")]
    Metadata {
        topic: String,
        operation: &'static str,
        cause: String,
    },
    #[error("topic {topic} is already open in this engine")]
    AlreadyOpen { topic: String },
    #[error("topic {topic}: the log engine is closed")]
    Closed { topic: String },
    #[error("object log configuration: {0}")]
    Config(String),
    /// The orphan sweep stopped (before deleting anything it was unsure of).
    #[error("orphan sweep: {0}")]
    Sweep(String),
}

pub type Result<T, E = ObjectLogError> = std::result::Result<T, E>;
