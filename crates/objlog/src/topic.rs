//! One topic's log on the object store: appends, the tail cache, reads, the committed index.
//!
//! The method names follow `meridian_storage::Log` (append → a future completing with the
//! position once durable, `read`/`read_from`, `last_position`, `end_position`,
//! `watch_durable`, `rollbacks`) so that the broker's log-store seam can put either behind it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use meridian_etcd::Ownership;
use meridian_objstore::{read_topic, TopicRange};
use tokio::sync::{oneshot, watch};

use crate::engine::EngineShared;
use crate::keys::{self, Head, ManifestRef, ObjectRef};
use crate::{Entry, ObjectLogError, Position, Result};

/// An append that has its position and waits for its commit. Await it, or call
/// [`PendingAppend::wait`] outside an async runtime.
#[derive(Debug)]
pub struct PendingAppend {
    position: Position,
    topic: String,
    receiver: oneshot::Receiver<Result<()>>,
}

impl PendingAppend {
    pub fn position(&self) -> Position {
        self.position
    }

    fn outcome(
        position: Position,
        topic: &str,
        received: std::result::Result<Result<()>, oneshot::error::RecvError>,
    ) -> Result<Position> {
        match received {
            Ok(result) => result.map(|()| position),
            Err(_) => Err(ObjectLogError::Closed {
                topic: topic.to_string(),
            }),
        }
    }

    /// Blocks until the append is committed or failed. Must not be called from async code.
    pub fn wait(self) -> Result<Position> {
        Self::outcome(self.position, &self.topic, self.receiver.blocking_recv())
    }
}

impl std::future::Future for PendingAppend {
    type Output = Result<Position>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let position = self.position;
        let poll = std::pin::Pin::new(&mut self.receiver).poll(context);
        poll.map(|received| Self::outcome(position, &self.topic, received))
    }
}

/// An appended entry waiting for its commit.
pub(crate) struct Queued {
    pub(crate) entry_id: u64,
    pub(crate) publish_time_ms: u64,
    pub(crate) data: Bytes,
    done: oneshot::Sender<Result<()>>,
}

/// Entries the flusher took from one topic for one object.
pub(crate) struct Batch {
    pub(crate) topic: Arc<TopicLog>,
    pub(crate) first_entry: u64,
    pub(crate) entries: Vec<Queued>,
    pub(crate) bytes: u64,
}

impl Batch {
    /// Committed as `reference` at etcd revision `revision`: the entries become readable and
    /// their appends complete.
    pub(crate) fn succeed(self, reference: ObjectRef, revision: u64) {
        let topic = self.topic.clone();
        topic.committed(self, reference, revision);
    }

    /// Not committed: these appends fail with `error`, and so does every append queued behind
    /// them (the topic rolls back to its last committed entry). `permanent`: the topic refuses
    /// every later append with `error` too.
    pub(crate) fn fail(self, error: ObjectLogError, permanent: bool) {
        let topic = self.topic.clone();
        topic.failed(self, error, permanent);
    }
}

struct TopicState {
    /// The id the next append gets.
    next_entry: u64,
    /// `head.next_entry` as last committed (or read at open).
    committed_next: u64,
    committed_bytes: u64,
    /// `mod_revision` of `logs/<topic>/head` as this owner last wrote or read it (0: absent).
    head_revision: u64,
    /// The head's epoch as last written or read (a compaction writes it unchanged).
    head_epoch: u64,
    /// The head's newest manifest, as last written or read.
    manifest: Option<ManifestRef>,
    /// The head's first entry (entries before it were trimmed).
    first_entry: u64,
    /// Refs wholly before this entry are to be dropped from the index (asked by the local
    /// log, whose segments before it are gone); done by the flusher.
    trim_before: u64,
    /// The committed index, in entry order (every committed id is in exactly one): first the
    /// refs held by manifests, then, from `keyed_from`, those with an `objects/` key in etcd.
    refs: Vec<ObjectRef>,
    keyed_from: usize,
    /// The most recently committed entries, oldest first, within `tail_cache_bytes_per_topic`.
    cache: VecDeque<Entry>,
    cache_bytes: u64,
    queued: VecDeque<Queued>,
    /// Bytes queued or in flight.
    pending_bytes: u64,
    /// Set once the topic refuses appends for good (not owner, closed).
    failure: Option<ObjectLogError>,
    rollbacks: u64,
}

/// A trim of the index: drop the first `keep_from` refs, delete the `objects/` keys of
/// entries `keys.0..keys.1`, write `head` (compared at `head_revision`).
pub(crate) struct TrimPlan {
    pub(crate) keep_from: usize,
    pub(crate) keys: Option<(u64, u64)>,
    pub(crate) head: Head,
    pub(crate) head_revision: u64,
}

/// One topic's log. Obtained from [`ObjectLog::open_topic`](crate::ObjectLog::open_topic).
pub struct TopicLog {
    name: String,
    ownership: Ownership,
    engine: Arc<EngineShared>,
    state: Mutex<TopicState>,
    durable: watch::Sender<Option<Position>>,
}

impl TopicLog {
    /// Reads the head and the object index of `topic` from etcd.
    pub(crate) fn open(
        engine: Arc<EngineShared>,
        topic: &str,
        ownership: &Ownership,
    ) -> Result<TopicLog> {
        let metadata = |operation: &'static str, cause: String| ObjectLogError::Metadata {
            topic: topic.to_string(),
            operation,
            cause,
        };
        let client = engine.cluster.client();
        let head_key = engine.cluster.key(&keys::head_key(topic));
        let found = client
            .get(&head_key)
            .map_err(|error| metadata("reading the head", error.to_string()))?;
        let (head, head_revision) = match found {
            Some(kv) => (
                keys::decode::<Head>(&head_key, &kv.value)
                    .map_err(|error| metadata("reading the head", error))?,
                kv.mod_revision,
            ),
            None => {
                // A new log, or one created again after a deletion: it starts after the
                // deleted one's entries.
                let deleted_key = engine.cluster.key(&keys::deleted_key(topic));
                let start = client
                    .get(&deleted_key)
                    .map_err(|error| metadata("reading the deletion record", error.to_string()))?
                    .map(|kv| keys::decode::<keys::Deleted>(&deleted_key, &kv.value))
                    .transpose()
                    .map_err(|error| metadata("reading the deletion record", error))?
                    .map_or(0, |deleted| deleted.next_entry);
                (
                    Head {
                        epoch: 0,
                        next_entry: start,
                        committed_bytes: 0,
                        manifest: None,
                        first_entry: start,
                    },
                    0,
                )
            }
        };
        if head.epoch > ownership.epoch() {
            return Err(ObjectLogError::NotOwner {
                topic: topic.to_string(),
                bundle: ownership.bundle().to_string(),
                epoch: ownership.epoch(),
                detail: format!(
                    "the head was committed under the later epoch {}",
                    head.epoch
                ),
            });
        }
        let mut refs = crate::manifest::load_chain(
            &engine.store,
            topic,
            head.manifest.as_ref(),
            head.first_entry,
        )
        .map_err(|error| metadata("reading the manifests", error))?;
        let keyed_from = refs.len();
        let mut bad = None;
        client
            .scan_prefix(
                &engine.cluster.key(&keys::objects_prefix(topic)),
                1000,
                false,
                |page| {
                    for kv in page {
                        match keys::decode::<ObjectRef>(&kv.key, &kv.value) {
                            Ok(reference) => refs.push(reference),
                            Err(error) => {
                                bad.get_or_insert(error);
                            }
                        }
                    }
                },
            )
            .map_err(|error| metadata("reading the object index", error.to_string()))?;
        if let Some(error) = bad {
            return Err(metadata("reading the object index", error));
        }
        // The refs must cover first_entry..next_entry exactly, one after the other.
        let mut expected_first = head.first_entry;
        for reference in &refs {
            if reference.first_entry != expected_first
                || reference.last_entry < reference.first_entry
            {
                return Err(metadata(
                    "checking the object index",
                    format!(
                        "entries {}..={} in {} do not follow entry {expected_first}",
                        reference.first_entry, reference.last_entry, reference.object
                    ),
                ));
            }
            expected_first = reference.last_entry + 1;
        }
        if expected_first != head.next_entry {
            return Err(metadata(
                "checking the object index",
                format!(
                    "the index ends before entry {expected_first} but the head says {}",
                    head.next_entry
                ),
            ));
        }
        let last = refs
            .last()
            .map(|reference| Position::new(reference.epoch, reference.last_entry));
        tracing::info!(
            topic,
            epoch = ownership.epoch(),
            next_entry = head.next_entry,
            objects = refs.len(),
            in_manifests = keyed_from,
            "topic opened"
        );
        Ok(TopicLog {
            name: topic.to_string(),
            ownership: ownership.clone(),
            engine,
            state: Mutex::new(TopicState {
                next_entry: head.next_entry,
                committed_next: head.next_entry,
                committed_bytes: head.committed_bytes,
                head_revision,
                head_epoch: head.epoch,
                manifest: head.manifest,
                first_entry: head.first_entry,
                trim_before: 0,
                refs,
                keyed_from,
                cache: VecDeque::new(),
                cache_bytes: 0,
                queued: VecDeque::new(),
                pending_bytes: 0,
                failure: None,
                rollbacks: 0,
            }),
            durable: watch::channel(last).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bundle(&self) -> &str {
        self.ownership.bundle()
    }

    /// The etcd session whose fenced commits this topic's appends go through.
    pub fn session(&self) -> &std::sync::Arc<meridian_etcd::Session> {
        &self.engine.session
    }

    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// The ledger id new entries get: the bundle epoch of this owner.
    pub fn current_ledger_id(&self) -> u64 {
        self.ownership.epoch()
    }

    /// `false` once this broker learned it no longer owns the topic's bundle (or the engine
    /// closed): appends fail with the reason [`TopicLog::failure`] gives.
    pub fn is_owner(&self) -> bool {
        self.lock().failure.is_none()
    }

    /// Why the topic refuses appends, if it does.
    pub fn failure(&self) -> Option<ObjectLogError> {
        self.lock().failure.clone()
    }

    pub(crate) fn not_owner(&self, detail: &str) -> ObjectLogError {
        ObjectLogError::NotOwner {
            topic: self.name.clone(),
            bundle: self.bundle().to_string(),
            epoch: self.ownership.epoch(),
            detail: detail.to_string(),
        }
    }

    /// Appends one entry. Returns at once with its position; the [`PendingAppend`] completes
    /// once the entry (and everything before it) is stored and committed in etcd, or fails.
    /// Appends beyond the pending-bytes limits fail at once with `TooManyPendingBytes`.
    pub fn append(self: &Arc<Self>, data: Bytes, publish_time_ms: u64) -> Result<PendingAppend> {
        let config = &self.engine.config;
        if data.len() > config.max_entry_bytes {
            return Err(ObjectLogError::EntryTooLarge {
                topic: self.name.clone(),
                size: data.len(),
                max: config.max_entry_bytes,
            });
        }
        let size = data.len() as u64;
        self.engine.reserve(&self.name, size)?;
        let (done, receiver) = oneshot::channel();
        let mut state = self.lock();
        let refused = if let Some(failure) = &state.failure {
            Some(failure.clone())
        } else if state.pending_bytes + size > config.max_pending_bytes_per_topic {
            Some(ObjectLogError::TooManyPendingBytes {
                topic: self.name.clone(),
                scope: "in this topic",
                pending_bytes: state.pending_bytes,
                limit: config.max_pending_bytes_per_topic,
            })
        } else {
            None
        };
        if let Some(error) = refused {
            drop(state);
            self.engine.release(size);
            return Err(error);
        }
        let entry_id = state.next_entry;
        state.next_entry += 1;
        state.pending_bytes += size;
        state.queued.push_back(Queued {
            entry_id,
            publish_time_ms,
            data,
            done,
        });
        drop(state);
        if let Err(error) = self.engine.mark_dirty(self, size) {
            self.fail_queued(error.clone(), true);
            return Err(error);
        }
        Ok(PendingAppend {
            position: Position::new(self.ownership.epoch(), entry_id),
            topic: self.name.clone(),
            receiver,
        })
    }

    pub(crate) fn has_queued(&self) -> bool {
        !self.lock().queued.is_empty()
    }

    /// Takes queued entries from the front: at least one, then while within `max_bytes` and
    /// `max_entries`.
    pub(crate) fn take_batch(self: &Arc<Self>, max_bytes: u64, max_entries: u64) -> Option<Batch> {
        let mut state = self.lock();
        let first_entry = state.queued.front()?.entry_id;
        debug_assert_eq!(first_entry, state.committed_next);
        let mut entries = Vec::new();
        let mut bytes = 0;
        while let Some(next) = state.queued.front() {
            let size = next.data.len() as u64;
            if !entries.is_empty()
                && (bytes + size > max_bytes || entries.len() as u64 >= max_entries)
            {
                break;
            }
            bytes += size;
            entries.extend(state.queued.pop_front());
        }
        Some(Batch {
            topic: self.clone(),
            first_entry,
            entries,
            bytes,
        })
    }

    /// The head as this owner last wrote or read it, and its `mod_revision` (for the next
    /// commit's compare).
    pub(crate) fn head_state(&self) -> (Head, u64) {
        let state = self.lock();
        (Self::head_of(&state), state.head_revision)
    }

    fn head_of(state: &TopicState) -> Head {
        Head {
            epoch: state.head_epoch,
            next_entry: state.committed_next,
            committed_bytes: state.committed_bytes,
            manifest: state.manifest.clone(),
            first_entry: state.first_entry,
        }
    }

    /// How many refs of this topic have an `objects/` key in etcd.
    pub fn index_keys(&self) -> usize {
        let state = self.lock();
        state.refs.len() - state.keyed_from
    }

    /// The first entry of the log (entries before it were trimmed).
    pub fn first_entry(&self) -> u64 {
        self.lock().first_entry
    }

    /// What a compaction of every `objects/` key would write: the refs to move, the head as it
    /// is (to compare and to carry over) and its revision. `None` without such keys.
    pub(crate) fn compaction_plan(&self) -> Option<(Vec<ObjectRef>, Head, u64)> {
        let state = self.lock();
        if state.keyed_from == state.refs.len() {
            return None;
        }
        Some((
            state.refs[state.keyed_from..].to_vec(),
            Self::head_of(&state),
            state.head_revision,
        ))
    }

    /// Asks for the refs wholly before entry `before` to leave the index (the local log
    /// trimmed its segments before it). Does not block: the flusher does it with a fenced
    /// commit after its next commit, or at once when idle.
    pub fn request_trim(self: &Arc<Self>, before: u64) {
        {
            let mut state = self.lock();
            // Asked again at every local trim while refs before `before` remain, so a trim
            // that failed is tried again.
            let wholly_before = state.refs.first().is_some_and(|r| r.last_entry < before);
            if !wholly_before || state.failure.is_some() {
                return;
            }
            state.trim_before = state.trim_before.max(before);
        }
        self.engine.request_maintenance(self);
    }

    /// What trimming the requested refs would write, if any refs are to go.
    pub(crate) fn trim_plan(&self) -> Option<TrimPlan> {
        let state = self.lock();
        let keep_from = state
            .refs
            .partition_point(|r| r.last_entry < state.trim_before);
        if keep_from == 0 {
            return None;
        }
        let first_entry = state
            .refs
            .get(keep_from)
            .map_or(state.committed_next, |r| r.first_entry);
        // Keyed refs among those that go: their keys are deleted.
        let keys = (keep_from > state.keyed_from)
            .then(|| (state.refs[state.keyed_from].first_entry, first_entry));
        // The chain stays only while some of its refs remain.
        let manifest = if state.keyed_from > keep_from {
            state.manifest.clone()
        } else {
            None
        };
        Some(TrimPlan {
            keep_from,
            keys,
            head: Head {
                manifest,
                first_entry,
                ..Self::head_of(&state)
            },
            head_revision: state.head_revision,
        })
    }

    /// A trim committed at `revision`: the first `keep_from` refs left the index.
    pub(crate) fn trimmed(&self, plan: &TrimPlan, revision: u64) {
        let mut state = self.lock();
        state.refs.drain(..plan.keep_from);
        state.keyed_from = state.keyed_from.saturating_sub(plan.keep_from);
        state.manifest = plan.head.manifest.clone();
        state.first_entry = plan.head.first_entry;
        state.head_revision = revision;
    }

    /// A compaction committed at `revision`: the `refs` first keyed refs are in `manifest`.
    pub(crate) fn compacted(&self, manifest: ManifestRef, revision: u64) {
        let mut state = self.lock();
        state.keyed_from += manifest.refs as usize;
        debug_assert!(state.keyed_from <= state.refs.len());
        state.manifest = Some(manifest);
        state.head_revision = revision;
    }

    /// Moves every `objects/` key of this topic into one new manifest (one PUT and one fenced
    /// etcd transaction), as the flusher does by itself past `manifest_threshold`. Returns the
    /// new manifest, or `None` when there were no keys. Fails with `NotOwner` when the bundle
    /// has another owner (nothing in etcd changes; the manifest object is left for the orphan
    /// sweep). Blocks on the object store and etcd, and waits for a commit in flight.
    pub fn compact(&self) -> Result<Option<ManifestRef>> {
        let _commits = self.engine.commit_lock();
        let deadline = std::time::Instant::now() + self.engine.config.commit_deadline;
        crate::manifest::compact(&self.engine, self, deadline)
    }

    fn committed(&self, batch: Batch, reference: ObjectRef, revision: u64) {
        let epoch = reference.epoch;
        let last = Position::new(epoch, reference.last_entry);
        let mut senders = Vec::with_capacity(batch.entries.len());
        {
            let mut state = self.lock();
            debug_assert_eq!(reference.first_entry, state.committed_next);
            state.committed_next = reference.last_entry + 1;
            state.committed_bytes += reference.length;
            state.head_revision = revision;
            state.head_epoch = epoch;
            state.pending_bytes -= batch.bytes;
            state.refs.push(reference);
            let limit = self.engine.config.tail_cache_bytes_per_topic;
            for queued in batch.entries {
                state.cache_bytes += queued.data.len() as u64;
                state.cache.push_back(Entry {
                    position: Position::new(epoch, queued.entry_id),
                    publish_time_ms: queued.publish_time_ms,
                    data: queued.data,
                });
                senders.push(queued.done);
            }
            while state.cache_bytes > limit {
                match state.cache.pop_front() {
                    Some(evicted) => state.cache_bytes -= evicted.data.len() as u64,
                    None => break,
                }
            }
        }
        self.engine.release(batch.bytes);
        self.durable.send_replace(Some(last));
        for sender in senders {
            let _ = sender.send(Ok(()));
        }
    }

    fn failed(&self, batch: Batch, error: ObjectLogError, permanent: bool) {
        {
            let mut state = self.lock();
            state.pending_bytes -= batch.bytes;
        }
        self.engine.release(batch.bytes);
        for queued in batch.entries {
            let _ = queued.done.send(Err(error.clone()));
        }
        self.fail_queued(error, permanent);
    }

    /// Fails every queued append and rolls the next id back to the last committed one;
    /// `permanent` makes the topic refuse every later append with `error`.
    pub(crate) fn fail_queued(&self, error: ObjectLogError, permanent: bool) {
        let (queued, bytes) = {
            let mut state = self.lock();
            if permanent && state.failure.is_none() {
                state.failure = Some(error.clone());
            }
            let queued: Vec<Queued> = state.queued.drain(..).collect();
            let bytes: u64 = queued.iter().map(|queued| queued.data.len() as u64).sum();
            state.pending_bytes -= bytes;
            if state.next_entry != state.committed_next {
                state.rollbacks += 1;
                state.next_entry = state.committed_next;
            }
            (queued, bytes)
        };
        self.engine.release(bytes);
        for queued in queued {
            let error = if permanent {
                error.clone()
            } else {
                ObjectLogError::RolledBack {
                    topic: self.name.clone(),
                    cause: error.to_string(),
                }
            };
            let _ = queued.done.send(Err(error));
        }
    }

    /// How many times failed appends were rolled back: a position handed out before a
    /// rollback may be handed out again after it, to another entry (as `Log::rollbacks`).
    pub fn rollbacks(&self) -> u64 {
        self.lock().rollbacks
    }

    /// The position of the last committed entry, if any.
    pub fn last_position(&self) -> Option<Position> {
        *self.durable.borrow()
    }

    /// The position the next append will get.
    pub fn end_position(&self) -> Position {
        Position::new(self.ownership.epoch(), self.lock().next_entry)
    }

    /// A receiver of the last committed position; it changes whenever entries become readable.
    pub fn watch_durable(&self) -> watch::Receiver<Option<Position>> {
        self.durable.subscribe()
    }

    /// Waits until an entry after `position` (or any, for `None`) is committed.
    pub async fn wait_for_entry_after(&self, position: Option<Position>) {
        let mut receiver = self.durable.subscribe();
        let _ = receiver.wait_for(|last| *last > position).await;
    }

    /// Reads the committed entry at `position`.
    pub fn read(&self, position: Position) -> Result<Entry> {
        let mut entries = self.read_from(position, 1, 1)?;
        match entries.pop() {
            Some(entry) if entry.position == position => Ok(entry),
            _ => Err(ObjectLogError::PositionNotFound {
                topic: self.name.clone(),
                position,
            }),
        }
    }

    /// Reads committed entries at or after `start`, in order: at most `max_entries`, and
    /// stopping once `max_bytes` of data are gathered (at least one entry if any exists).
    /// Recent entries come from the tail cache; older ones from their data objects, one
    /// ranged GET per object, every record's CRC checked. Blocks on the object store.
    pub fn read_from(
        &self,
        start: Position,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let full = |entries: &Vec<Entry>, bytes: usize| {
            entries.len() >= max_entries || (!entries.is_empty() && bytes >= max_bytes)
        };
        // Refs are in position order: (epoch, last entry) grows with the index.
        let (mut next_id, refs, cache, cache_first) = {
            let state = self.lock();
            let index = state
                .refs
                .partition_point(|r| Position::new(r.epoch, r.last_entry) < start);
            let Some(first_ref) = state.refs.get(index) else {
                return Ok(entries);
            };
            let next_id = if first_ref.epoch > start.ledger_id {
                first_ref.first_entry
            } else {
                start.entry_id.max(first_ref.first_entry)
            };
            let cache_first = state
                .cache
                .front()
                .map_or(u64::MAX, |entry| entry.position.entry_id);
            let cache: Vec<Entry> = if next_id >= cache_first {
                let skip = (next_id - cache_first) as usize;
                state
                    .cache
                    .iter()
                    .skip(skip)
                    .take(max_entries)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            let refs: Vec<ObjectRef> = if next_id < cache_first {
                state.refs[index..]
                    .iter()
                    .take_while(|r| r.first_entry < cache_first)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            };
            (next_id, refs, cache, cache_first)
        };
        for reference in &refs {
            if full(&entries, bytes) {
                return Ok(entries);
            }
            let range = TopicRange {
                topic: self.name.clone(),
                first_entry_id: reference.first_entry,
                last_entry_id: reference.last_entry,
                offset: reference.offset,
                length: reference.length,
            };
            let read =
                read_topic(&self.engine.store, &reference.object, &range).map_err(|error| {
                    ObjectLogError::ReadFailed {
                        topic: self.name.clone(),
                        cause: error.to_string(),
                    }
                })?;
            for entry in read {
                if entry.entry_id < next_id {
                    continue;
                }
                if full(&entries, bytes) {
                    return Ok(entries);
                }
                bytes += entry.data.len();
                next_id = entry.entry_id + 1;
                entries.push(Entry {
                    position: Position::new(reference.epoch, entry.entry_id),
                    publish_time_ms: entry.publish_time_ms,
                    data: entry.data,
                });
            }
        }
        if !refs.is_empty() && next_id >= cache_first {
            // The objects reached the cache: continue from it (it may have moved on since).
            if !full(&entries, bytes) {
                let position = entries.last().map(|entry| entry.position);
                let rest = match position {
                    Some(last) => self.read_from(
                        Position::new(last.ledger_id, last.entry_id + 1),
                        max_entries - entries.len(),
                        max_bytes.saturating_sub(bytes).max(1),
                    )?,
                    None => Vec::new(),
                };
                entries.extend(rest);
            }
            return Ok(entries);
        }
        for entry in cache {
            if full(&entries, bytes) {
                break;
            }
            bytes += entry.data.len();
            entries.push(entry);
        }
        Ok(entries)
    }
}
