//! The broker-wide engine: open topics and the flusher thread.
//!
//! One flusher per broker takes the pending entries of every topic, lays them out as ONE data
//! object (`meridian_objstore::DataObjectBuilder`), PUTs it, then commits each topic's batch in
//! etcd: per bundle, one fenced transaction (`Session::fenced_commit`) that compares the owner
//! record and each topic's head `mod_revision`, and puts `logs/<topic>/objects/<first>` and the
//! new `logs/<topic>/head`. A bundle with more than [`TOPICS_PER_TXN`] topics in the object
//! takes several transactions (etcd accepts 128 operations per branch). Appends complete only
//! after their transaction succeeded.
//!
//! When does the flusher start a commit? At once when the previous commit ended and entries
//! arrived meanwhile; else `linger` after the first entry reaches an idle engine, or as soon as
//! `max_object_bytes` wait.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meridian_etcd::{Cluster, Compare, EtcdError, Op, Ownership, Session};
use meridian_objstore::data_object::{
    MAX_ENTRIES_PER_OBJECT, MAX_OBJECT_BYTES, MAX_TOPICS_PER_OBJECT,
};
use meridian_objstore::{
    data_object_key, DataObjectBuilder, DataObjectLimits, NewEntry, ObjectStore, TopicRange,
};

use crate::keys::{self, Head, ObjectRef};
use crate::topic::{Batch, TopicLog};
use crate::{ObjectLogConfig, ObjectLogError, Result};

/// Topics per commit transaction: the owner compare plus one head compare each stays within
/// etcd's 128 compares, and two puts each within its 128 operations.
pub const TOPICS_PER_TXN: usize = 63;
/// Most entries the flusher puts in one object (within the format's 2^20).
const MAX_ENTRIES_PER_COMMIT: u64 = 100_000;
/// Most topics in one object (within the format's 65,536).
const MAX_TOPICS_PER_COMMIT: usize = 10_000;

/// The broker-wide object-store log engine. Cheap to share behind an `Arc`; dropping it stops
/// the flusher after it committed (or failed) what was pending.
pub struct ObjectLog {
    shared: Arc<EngineShared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    sweeper: Mutex<Option<JoinHandle<()>>>,
}

pub(crate) struct EngineShared {
    pub(crate) config: ObjectLogConfig,
    pub(crate) cluster: Cluster,
    pub(crate) session: Arc<Session>,
    pub(crate) store: Arc<ObjectStore>,
    /// Distinguishes this engine's objects from those of an earlier run of the same broker id
    /// (`data/<broker>/<writer_epoch>/<sequence>.seg`): nanoseconds since the Unix epoch at
    /// start, so that a restarted broker never overwrites an object it committed before.
    writer_epoch: u64,
    /// `<cluster name>/`: every object this engine writes is under it ([`keys::cluster_prefix`]).
    pub(crate) object_prefix: String,
    /// Bytes appended and not yet committed or failed, all topics together.
    pending_bytes: AtomicU64,
    state: Mutex<EngineState>,
    wake: Condvar,
    /// Wakes the sweeper thread when the engine stops.
    sweep_wake: Condvar,
    /// Held by the flusher for each commit and its compactions, and by an explicit
    /// compaction: a topic's head is written by one of them at a time.
    commits: Mutex<()>,
}

#[derive(Default)]
struct EngineState {
    topics: HashMap<String, Arc<TopicLog>>,
    /// Topics that may have queued entries, in the order they got them.
    dirty: Vec<Arc<TopicLog>>,
    dirty_names: HashSet<String>,
    /// Topics with index maintenance asked for (a trim), done by the flusher between commits.
    maintenance: Vec<Arc<TopicLog>>,
    /// Bytes queued and not yet taken by the flusher (the size trigger).
    queued_bytes: u64,
    first_queued_at: Option<Instant>,
    stopping: bool,
}

impl ObjectLog {
    /// Starts the engine and its flusher thread. `session` is this broker's etcd session (its
    /// fenced commits are the only way the engine writes to etcd); `store` the bucket of data
    /// objects.
    pub fn start(
        config: ObjectLogConfig,
        cluster: Cluster,
        session: Arc<Session>,
        store: Arc<ObjectStore>,
    ) -> Result<ObjectLog> {
        config.validate()?;
        let writer_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_nanos() as u64)
            .unwrap_or_default();
        let object_prefix = keys::cluster_prefix(&cluster);
        let shared = Arc::new(EngineShared {
            config,
            object_prefix,
            cluster,
            session,
            store,
            writer_epoch,
            pending_bytes: AtomicU64::new(0),
            state: Mutex::new(EngineState::default()),
            wake: Condvar::new(),
            sweep_wake: Condvar::new(),
            commits: Mutex::new(()),
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("objlog-flusher-{}", shared.config.broker_id))
                .spawn(move || flusher_loop(&shared))
                .map_err(|error| {
                    ObjectLogError::Config(format!("starting the flusher thread: {error}"))
                })?
        };
        let sweeper = match shared.config.sweep_interval {
            Some(interval) => {
                let sweeping = shared.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("objlog-sweeper-{}", shared.config.broker_id))
                    .spawn(move || sweeper_loop(&sweeping, interval))
                    .map_err(|error| {
                        ObjectLogError::Config(format!("starting the sweeper thread: {error}"))
                    });
                match thread {
                    Ok(thread) => Some(thread),
                    Err(error) => {
                        shared.lock().stopping = true;
                        shared.wake.notify_all();
                        let _ = flusher.join();
                        return Err(error);
                    }
                }
            }
            None => None,
        };
        Ok(ObjectLog {
            shared,
            flusher: Mutex::new(Some(flusher)),
            sweeper: Mutex::new(sweeper),
        })
    }

    /// Runs one orphan sweep now, on this thread (see [`crate::sweep`]): when this broker
    /// holds the sweeper key, deletes this cluster's data objects and manifests that no
    /// topic's index references and that are older than `orphan_grace`. Blocking.
    pub fn sweep(&self) -> Result<crate::SweepReport> {
        crate::sweep::sweep(&self.shared)
    }

    /// Opens `topic` of the bundle held by `ownership`: reads `logs/<topic>/head` and the
    /// object index from etcd; new entries continue after the last committed one, under
    /// `ownership`'s epoch. Entries an earlier owner stored but never committed are not
    /// referenced anywhere, so they are never read.
    pub fn open_topic(&self, topic: &str, ownership: &Ownership) -> Result<Arc<TopicLog>> {
        if self.shared.lock().topics.contains_key(topic) {
            return Err(ObjectLogError::AlreadyOpen {
                topic: topic.to_string(),
            });
        }
        let log = Arc::new(TopicLog::open(self.shared.clone(), topic, ownership)?);
        let mut state = self.shared.lock();
        if state.stopping {
            return Err(ObjectLogError::Closed {
                topic: topic.to_string(),
            });
        }
        if state.topics.contains_key(topic) {
            return Err(ObjectLogError::AlreadyOpen {
                topic: topic.to_string(),
            });
        }
        state.topics.insert(topic.to_string(), log.clone());
        Ok(log)
    }

    /// Closes `topic` (an unload): appends still queued fail with `Closed` and later ones too;
    /// a commit in flight finishes. The topic can then be opened again (by this engine or, after
    /// the bundle moved, by another owner's).
    pub fn close_topic(&self, topic: &str) {
        let removed = self.shared.lock().topics.remove(topic);
        if let Some(log) = removed {
            let error = ObjectLogError::Closed {
                topic: topic.to_string(),
            };
            log.fail_queued(error, true);
        }
    }

    /// Bytes waiting for commit, all topics together.
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }

    /// Commits (or fails) what is pending, stops the flusher, and closes every topic: later
    /// appends fail with `Closed`.
    pub fn close(&self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        self.shared.sweep_wake.notify_all();
        for thread in [&self.sweeper, &self.flusher] {
            let handle = thread
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(handle) = handle {
                let _ = handle.join();
            }
        }
        let topics: Vec<Arc<TopicLog>> = self.shared.lock().topics.drain().map(|t| t.1).collect();
        for topic in topics {
            let error = ObjectLogError::Closed {
                topic: topic.name().to_string(),
            };
            topic.fail_queued(error, true);
        }
    }
}

impl Drop for ObjectLog {
    fn drop(&mut self) {
        self.close();
    }
}

impl EngineShared {
    fn lock(&self) -> MutexGuard<'_, EngineState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves `bytes` of the broker-wide pending budget for an append to `topic`.
    pub(crate) fn reserve(&self, topic: &str, bytes: u64) -> Result<()> {
        let limit = self.config.max_pending_bytes;
        let before = self.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > limit {
            self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(ObjectLogError::TooManyPendingBytes {
                topic: topic.to_string(),
                scope: "in this broker",
                pending_bytes: before,
                limit,
            });
        }
        Ok(())
    }

    /// Whether the engine is closing (a long sweep stops early then).
    pub(crate) fn stopping(&self) -> bool {
        self.lock().stopping
    }

    pub(crate) fn commit_lock(&self) -> MutexGuard<'_, ()> {
        self.commits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn release(&self, bytes: u64) {
        self.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Tells the flusher that `topic` queued `bytes` more.
    pub(crate) fn mark_dirty(&self, topic: &Arc<TopicLog>, bytes: u64) -> Result<()> {
        let mut state = self.lock();
        if state.stopping {
            return Err(ObjectLogError::Closed {
                topic: topic.name().to_string(),
            });
        }
        if state.dirty_names.insert(topic.name().to_string()) {
            state.dirty.push(topic.clone());
        }
        state.queued_bytes += bytes;
        state.first_queued_at.get_or_insert_with(Instant::now);
        drop(state);
        self.wake.notify_all();
        Ok(())
    }

    /// Asks the flusher to trim `topic`'s index after its current commit (or at once).
    pub(crate) fn request_maintenance(&self, topic: &Arc<TopicLog>) {
        let mut state = self.lock();
        if !state
            .maintenance
            .iter()
            .any(|waiting| Arc::ptr_eq(waiting, topic))
        {
            state.maintenance.push(topic.clone());
        }
        drop(state);
        self.wake.notify_all();
    }

    /// The bundle is no longer ours: every topic of it fails its queued appends and refuses
    /// later ones.
    pub(crate) fn fence_bundle(&self, bundle: &str, detail: &str) {
        let topics: Vec<Arc<TopicLog>> = self
            .lock()
            .topics
            .values()
            .filter(|topic| topic.bundle() == bundle)
            .cloned()
            .collect();
        for topic in topics {
            let error = topic.not_owner(detail);
            topic.fail_queued(error, true);
        }
    }
}

/// The sweeper thread: one sweep every `interval` (the first one an interval after the
/// start), until the engine stops. A sweep that fails is logged and tried again next time.
fn sweeper_loop(shared: &Arc<EngineShared>, interval: Duration) {
    loop {
        let deadline = Instant::now() + interval;
        let mut state = shared.lock();
        while !state.stopping {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = shared
                .sweep_wake
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        if state.stopping {
            return;
        }
        drop(state);
        if let Err(error) = crate::sweep::sweep(shared) {
            tracing::warn!(%error, "orphan sweep failed; tried again at the next interval");
        }
    }
}

/// The flusher thread: wait for entries, take them, commit them; until stopped and drained.
fn flusher_loop(shared: &Arc<EngineShared>) {
    let config = &shared.config;
    let mut sequence: u64 = 0;
    let mut just_committed = false;
    loop {
        let (dirty, maintenance) = {
            let mut state = shared.lock();
            loop {
                if state.dirty.is_empty() {
                    if !state.maintenance.is_empty() {
                        break;
                    }
                    if state.stopping {
                        return;
                    }
                    just_committed = false;
                    state = shared
                        .wake
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    continue;
                }
                if just_committed || state.stopping || state.queued_bytes >= config.max_object_bytes
                {
                    break;
                }
                let waited = state
                    .first_queued_at
                    .map_or(Duration::ZERO, |at| at.elapsed());
                let Some(remaining) = config.linger.checked_sub(waited).filter(|r| !r.is_zero())
                else {
                    break;
                };
                state = shared
                    .wake
                    .wait_timeout(state, remaining)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            state.dirty_names.clear();
            state.first_queued_at = None;
            (
                std::mem::take(&mut state.dirty),
                std::mem::take(&mut state.maintenance),
            )
        };
        let batches = take_batches(shared, dirty);
        let _commits = shared.commit_lock();
        trim_requested(shared, &maintenance);
        if batches.is_empty() {
            just_committed = false;
            continue;
        }
        sequence += 1;
        let topics: Vec<Arc<TopicLog>> = batches.iter().map(|batch| batch.topic.clone()).collect();
        commit(shared, sequence, batches);
        compact_past_threshold(shared, &topics);
        just_committed = true;
    }
}

/// Takes queued entries from `dirty` topics, in order, until the object is full; topics with
/// entries left are marked dirty again for the next object.
fn take_batches(shared: &EngineShared, dirty: Vec<Arc<TopicLog>>) -> Vec<Batch> {
    let config = &shared.config;
    let mut batches = Vec::new();
    let mut object_bytes: u64 = 0;
    let mut entries: u64 = 0;
    let mut left = Vec::new();
    for topic in dirty {
        let full = object_bytes >= config.max_object_bytes
            || entries >= MAX_ENTRIES_PER_COMMIT
            || batches.len() >= MAX_TOPICS_PER_COMMIT;
        if full {
            left.push(topic);
            continue;
        }
        let budget_bytes = config.max_object_bytes - object_bytes;
        let budget_entries = MAX_ENTRIES_PER_COMMIT - entries;
        if let Some(batch) = topic.take_batch(budget_bytes, budget_entries) {
            object_bytes += batch.bytes;
            entries += batch.entries.len() as u64;
            batches.push(batch);
        }
        if topic.has_queued() {
            left.push(topic);
        }
    }
    let taken: u64 = batches.iter().map(|batch| batch.bytes).sum();
    let mut state = shared.lock();
    state.queued_bytes = state.queued_bytes.saturating_sub(taken);
    if !left.is_empty() {
        state.first_queued_at.get_or_insert_with(Instant::now);
    }
    for topic in left {
        if state.dirty_names.insert(topic.name().to_string()) {
            state.dirty.push(topic);
        }
    }
    batches
}

/// Trims the index of each of `topics` as asked. A failure is logged; the local log asks
/// again at its next trim.
fn trim_requested(shared: &EngineShared, topics: &[Arc<TopicLog>]) {
    for topic in topics.iter().filter(|topic| topic.is_owner()) {
        if let Err(error) = crate::manifest::trim(shared, topic) {
            tracing::warn!(topic = topic.name(), %error, "trimming the index failed");
        }
    }
}

/// Moves the `objects/` keys of each of `topics` that has `manifest_threshold` of them into a
/// manifest. A failure is logged and changes nothing in etcd: the next commit tries again.
fn compact_past_threshold(shared: &EngineShared, topics: &[Arc<TopicLog>]) {
    let threshold = shared.config.manifest_threshold;
    if threshold == 0 {
        return;
    }
    for topic in topics {
        if topic.index_keys() < threshold || !topic.is_owner() {
            continue;
        }
        let deadline = Instant::now() + shared.config.commit_deadline;
        if let Err(error) = crate::manifest::compact(shared, topic, deadline) {
            tracing::warn!(topic = topic.name(), %error, "moving index keys into a manifest failed; retried after the next commit");
        }
    }
}

/// Retries `attempt` while it fails with an error `retryable` accepts, pausing between
/// attempts, until `deadline`.
pub(crate) fn retry<T, E>(
    shared: &EngineShared,
    deadline: Instant,
    mut attempt: impl FnMut() -> std::result::Result<T, E>,
    retryable: impl Fn(&E) -> bool,
) -> std::result::Result<T, E> {
    loop {
        match attempt() {
            Err(error)
                if retryable(&error) && Instant::now() + shared.config.retry_pause < deadline =>
            {
                std::thread::sleep(shared.config.retry_pause);
            }
            outcome => return outcome,
        }
    }
}

/// One group commit: build, PUT, commit per bundle, resolve.
fn commit(shared: &EngineShared, sequence: u64, batches: Vec<Batch>) {
    let config = &shared.config;
    let started = Instant::now();
    let deadline = started + config.commit_deadline;
    let key = format!(
        "{}{}",
        shared.object_prefix,
        data_object_key(&config.broker_id, shared.writer_epoch, sequence)
    );
    let limits = DataObjectLimits {
        max_object_bytes: MAX_OBJECT_BYTES,
        max_entries: MAX_ENTRIES_PER_OBJECT,
        max_topics: MAX_TOPICS_PER_OBJECT,
    };
    let built = DataObjectBuilder::new(limits).and_then(|mut builder| {
        for batch in &batches {
            let entries: Vec<NewEntry<'_>> = batch
                .entries
                .iter()
                .map(|entry| NewEntry {
                    publish_time_ms: entry.publish_time_ms,
                    data: &entry.data,
                })
                .collect();
            builder.add_topic(batch.topic.name(), batch.first_entry, &entries)?;
        }
        builder.finish()
    });
    let object = match built {
        Ok(object) => object,
        Err(error) => {
            // The take loop keeps objects within the format's limits; this is a bug.
            tracing::error!(%error, "building a data object failed");
            for batch in batches {
                let error = ObjectLogError::WriteFailed {
                    topic: batch.topic.name().to_string(),
                    operation: "building the data object",
                    cause: error.to_string(),
                };
                batch.fail(error, false);
            }
            return;
        }
    };

    let put = retry(
        shared,
        deadline,
        // Each attempt within what is left of the deadline: a store that accepts connections
        // and never answers would otherwise hold it for the client's whole request timeout.
        || {
            let left = deadline.saturating_duration_since(Instant::now());
            shared.store.put_within(&key, &object.bytes, left)
        },
        |error| error.is_retryable(),
    );
    if let Err(error) = put {
        tracing::warn!(object = %key, %error, "data object not stored; its appends fail");
        for batch in batches {
            let topic = batch.topic.name().to_string();
            let cause = error.to_string();
            let error = if error.is_retryable() {
                ObjectLogError::Unavailable {
                    topic,
                    operation: "object store PUT",
                    waited_ms: started.elapsed().as_millis() as u64,
                    deadline_ms: config.commit_deadline.as_millis() as u64,
                    cause,
                }
            } else {
                ObjectLogError::WriteFailed {
                    topic,
                    operation: "object store PUT",
                    cause,
                }
            };
            batch.fail(error, false);
        }
        return;
    }

    // Group by bundle; the builder kept the batches' order, so index i is batch i.
    let mut bundles: BTreeMap<String, Vec<(Batch, TopicRange)>> = BTreeMap::new();
    for (batch, range) in batches.into_iter().zip(object.index) {
        debug_assert_eq!(batch.topic.name(), range.topic);
        bundles
            .entry(batch.topic.bundle().to_string())
            .or_default()
            .push((batch, range));
    }
    for (bundle, mut members) in bundles {
        while !members.is_empty() {
            let rest = members.split_off(members.len().min(TOPICS_PER_TXN));
            commit_chunk(shared, &key, &bundle, members, started, deadline);
            members = rest;
        }
    }
}

/// One fenced transaction for up to [`TOPICS_PER_TXN`] topics of one bundle.
fn commit_chunk(
    shared: &EngineShared,
    object: &str,
    bundle: &str,
    members: Vec<(Batch, TopicRange)>,
    started: Instant,
    deadline: Instant,
) {
    let config = &shared.config;
    let ownership = members[0].0.topic.ownership().clone();
    let mut compares = Vec::with_capacity(members.len());
    let mut operations = Vec::with_capacity(members.len() * 2);
    let mut expected = Vec::with_capacity(members.len());
    for (batch, range) in &members {
        let topic = batch.topic.name();
        let (current, head_revision) = batch.topic.head_state();
        let reference = ObjectRef {
            object: object.to_string(),
            offset: range.offset,
            length: range.length,
            first_entry: range.first_entry_id,
            last_entry: range.last_entry_id,
            epoch: ownership.epoch(),
        };
        let head = Head {
            epoch: ownership.epoch(),
            next_entry: range.last_entry_id + 1,
            committed_bytes: current.committed_bytes + range.length,
            ..current
        };
        let head_key = keys::head_key(topic);
        compares.push(Compare::ModRevision(head_key.clone(), head_revision));
        operations.push(Op::Put {
            key: keys::object_ref_key(topic, range.first_entry_id),
            value: keys::encode(&reference),
            lease: 0,
        });
        operations.push(Op::Put {
            key: head_key,
            value: keys::encode(&head),
            lease: 0,
        });
        expected.push((head_revision, head, reference));
    }

    // Whether an attempt may have applied without our knowing (a lost answer not yet
    // resolved by reading the heads back).
    let mut uncertain = false;
    let outcome: std::result::Result<u64, ObjectLogError> = loop {
        let error = match shared
            .session
            .fenced_commit(&ownership, &compares, &operations)
        {
            Ok(revision) => break Ok(revision),
            Err(EtcdError::Fenced { current, .. }) => {
                let detail = format!("a commit was fenced; the bundle is now owned by {current:?}");
                shared.fence_bundle(bundle, &detail);
                break Err(members[0].0.topic.not_owner(&detail));
            }
            Err(error @ (EtcdError::OutcomeUnknown { .. } | EtcdError::CompareFailed { .. })) => {
                // Did it apply? Read the heads back.
                match resync(shared, &members, &expected) {
                    Ok(Resync::Applied(revision)) => break Ok(revision),
                    Ok(Resync::NotApplied) => {
                        uncertain = false;
                        error
                    }
                    Ok(Resync::Moved(detail)) => {
                        shared.fence_bundle(bundle, &detail);
                        break Err(members[0].0.topic.not_owner(&detail));
                    }
                    Ok(Resync::Stale(detail)) => {
                        break Err(ObjectLogError::CommitUncertain {
                            topic: members[0].0.topic.name().to_string(),
                            waited_ms: started.elapsed().as_millis() as u64,
                            cause: detail,
                        });
                    }
                    Err(read_error) => {
                        uncertain = true;
                        read_error
                    }
                }
            }
            Err(error @ EtcdError::Unavailable { .. }) => error,
            Err(error) => {
                break Err(ObjectLogError::WriteFailed {
                    topic: members[0].0.topic.name().to_string(),
                    operation: "etcd commit",
                    cause: error.to_string(),
                })
            }
        };
        if Instant::now() + config.retry_pause >= deadline {
            if uncertain {
                break Err(ObjectLogError::CommitUncertain {
                    topic: members[0].0.topic.name().to_string(),
                    waited_ms: started.elapsed().as_millis() as u64,
                    cause: error.to_string(),
                });
            }
            break Err(ObjectLogError::Unavailable {
                topic: members[0].0.topic.name().to_string(),
                operation: "etcd commit",
                waited_ms: started.elapsed().as_millis() as u64,
                deadline_ms: config.commit_deadline.as_millis() as u64,
                cause: error.to_string(),
            });
        }
        tracing::debug!(bundle, %error, "etcd commit failed; retrying");
        std::thread::sleep(config.retry_pause);
    };

    match outcome {
        Ok(revision) => {
            for ((batch, _), (_, _, reference)) in members.into_iter().zip(expected) {
                batch.succeed(reference, revision);
            }
        }
        Err(error) => {
            let permanent = matches!(
                error,
                ObjectLogError::NotOwner { .. } | ObjectLogError::CommitUncertain { .. }
            );
            if !permanent {
                tracing::warn!(bundle, object, %error, "commit failed; its appends fail (the object stays unreferenced)");
            }
            for (batch, _) in members {
                let error = retarget(&error, batch.topic.name());
                batch.fail(error, permanent);
            }
        }
    }
}

enum Resync {
    /// The transaction applied (at this revision).
    Applied(u64),
    /// It did not; the heads are as before.
    NotApplied,
    /// A head holds something this owner did not write.
    Moved(String),
    /// A head holds another commit under this owner's epoch: one this engine made for an
    /// earlier open of the topic (still in flight when the topic was reopened) or an attempt
    /// that etcd applied late. The bundle is still ours, but this open of the topic no longer
    /// knows its log: it must be reopened.
    Stale(String),
}

/// After an unknown outcome or a failed head compare: reads the heads of the chunk's topics to
/// learn whether the transaction applied (they are written together, so all or none).
fn resync(
    shared: &EngineShared,
    members: &[(Batch, TopicRange)],
    expected: &[(u64, Head, ObjectRef)],
) -> std::result::Result<Resync, EtcdError> {
    let mut applied = None;
    let mut unchanged = 0;
    for ((batch, _), (revision, head, reference)) in members.iter().zip(expected) {
        let topic = batch.topic.name();
        let key = shared.cluster.key(&keys::head_key(topic));
        let found = shared.cluster.client().get(&key)?;
        let found_revision = found.as_ref().map_or(0, |kv| kv.mod_revision);
        if found_revision == *revision {
            unchanged += 1;
            continue;
        }
        let found_head = found.and_then(|kv| keys::decode::<Head>(&key, &kv.value).ok());
        // An equal head is not proof: another commit of as many entries and bytes under this
        // epoch writes the same one. Only this commit's own reference is.
        if found_head.as_ref() == Some(head) && reference_committed(shared, topic, head, reference)?
        {
            applied = Some(found_revision);
        } else if found_head
            .as_ref()
            .is_some_and(|found| found.epoch == head.epoch)
        {
            return Ok(Resync::Stale(format!(
                "the head of topic {topic} holds another commit of this owner ({found_head:?}): \
                 an earlier open's commit landed after the topic was reopened"
            )));
        } else {
            return Ok(Resync::Moved(format!(
                "head of topic {topic} was written by someone else ({found_head:?})"
            )));
        }
    }
    Ok(match applied {
        Some(revision) if unchanged == 0 => Resync::Applied(revision),
        Some(_) => Resync::Moved("a commit applied to only some of its topics".to_string()),
        None => Resync::NotApplied,
    })
}

/// Whether `topic`'s index holds `reference` (this commit's): etcd's `objects/<first entry>`
/// key, or, once a compaction moved it, the manifests of `head`.
fn reference_committed(
    shared: &EngineShared,
    topic: &str,
    head: &Head,
    reference: &ObjectRef,
) -> std::result::Result<bool, EtcdError> {
    let key = shared
        .cluster
        .key(&keys::object_ref_key(topic, reference.first_entry));
    let found = shared.cluster.client().get(&key)?;
    if let Some(kv) = found {
        return Ok(
            keys::decode::<ObjectRef>(&key, &kv.value).is_ok_and(|found| &found == reference)
        );
    }
    // A manifest that cannot be read proves nothing: the commit counts as not applied.
    Ok(
        crate::manifest::chain_holds(&shared.store, topic, head.manifest.as_ref(), reference)
            .unwrap_or(false),
    )
}

/// The same error, naming `topic`.
fn retarget(error: &ObjectLogError, topic: &str) -> ObjectLogError {
    let mut error = error.clone();
    match &mut error {
        ObjectLogError::NotOwner { topic: named, .. }
        | ObjectLogError::Unavailable { topic: named, .. }
        | ObjectLogError::WriteFailed { topic: named, .. }
        | ObjectLogError::CommitUncertain { topic: named, .. } => *named = topic.to_string(),
        _ => {}
    }
    error
}
