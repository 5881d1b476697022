//! Cluster mode's topic storage (`meridian broker --storage s3://...`): every owned topic's
//! entries are committed through the object-store log (`meridian_objlog`), its cursors are
//! persisted to etcd, and a new owner rebuilds both.
//!
//! The seam: each topic still has a local `meridian_storage::Log` (reads, the cache, cursors,
//! trimming, de-duplication recovery all stay the local engine's), with the topic's
//! `meridian_objlog::TopicLog` attached as its [`RemoteLog`]: an append completes only once
//! the object-store log committed it (object stored, index committed in etcd under this
//! broker's bundle epoch). The local files are a working copy:
//!
//! - **Load** ([`ClusterLogs::open`]): the local log is deleted and opened fresh, every
//!   committed entry is copied into it from the object store in order (so local entry `n` is
//!   the object-store log's entry `n`, in the local log's one ledger, which starts at the
//!   object-store log's first entry: 0, or where it was trimmed), the cursors are read
//!   from `cursors/<topic>/<subscription>` and restored, and only then is the object-store log
//!   attached.
//! - **Cursors** ([`persist_cursors`]): every `cursor_persist_interval` each loaded topic's
//!   durable cursors (mark-delete entry, individually acknowledged ranges up to
//!   `cursor_max_persisted_ranges`, properties: de-duplication snapshots included) that changed
//!   are written to etcd with one fenced transaction per topic (owner compare: a broker that
//!   lost the bundle cannot move a cursor), and once more when the topic is closed.
//! - **Trimming**: when the local log trims segments (every cursor passed them, retention let
//!   them go), the object-store log drops the refs wholly before the first entry kept
//!   (`RemoteLog::trim_before`, a fenced etcd commit by the engine's flusher), so the next
//!   owner copies only what is left; the unreferenced objects go to the orphan sweep.
//! - **Failures**: a failed remote commit poisons the local log ([`StorageError::Remote`]); the
//!   publish fails with `ServiceNotReady` and [`watch_failures`] unloads the topic, or, when
//!   the commit was fenced (another owner), forgets the bundle and unloads all its topics, so
//!   the clients look them up again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use meridian_etcd::{Cluster, Op, Ownership, Session};
use meridian_objlog::{keys, ObjectLog, ObjectLogConfig, RemoteTopic, TopicLog};
use meridian_objstore::ObjectStore;
use meridian_storage::{
    CursorState, Log, Position, RangeSet, RemoteCommit, RemoteLog, Storage, StorageError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::error::{BrokerError, Result};

/// Entries copied per read while a new owner rebuilds its local copy.
const REBUILD_BATCH_ENTRIES: usize = 1000;
const REBUILD_BATCH_BYTES: usize = 4 << 20;
/// etcd's transaction limit is 128 operations; cursor writes of one topic go in chunks.
const CURSOR_OPERATIONS_PER_COMMIT: usize = 100;

/// A cursor as stored in etcd, in the object-store log's entry ids (which every owner shares).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredCursor {
    /// The subscription (cursor) name, also in the key; kept here so that any name round-trips.
    name: String,
    /// The last entry of the acknowledged prefix; `None` before the first entry.
    mark_delete: Option<u64>,
    /// Individually acknowledged entries after it, as `[first, last]` ranges.
    #[serde(default)]
    acknowledged: Vec<[u64; 2]>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

fn cursors_prefix(topic: &str) -> String {
    format!("cursors/{topic}/")
}

fn cursor_key(topic: &str, cursor: &str) -> String {
    format!("{}{cursor}", cursors_prefix(topic))
}

/// One loaded topic of this broker.
struct LoadedTopic {
    log: Arc<Log>,
    remote: Arc<TopicLog>,
    ownership: Ownership,
    /// The local log's ledger: its entry `n` is the object-store log's entry `n`.
    ledger_id: u64,
    /// What was last written to etcd per cursor (held while writing: one writer per topic).
    written: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Set when the topic is closed here: the failures of appends cut short by the close are
    /// not reported (the topic is being unloaded already).
    closed: Arc<AtomicBool>,
}

/// Topics whose remote commits failed, for [`watch_failures`]: bounded by the loaded topics.
#[derive(Default)]
struct Failures {
    topics: Mutex<BTreeMap<String, bool>>,
    notify: Notify,
}

impl Failures {
    fn report(&self, topic: &str, not_owner: bool) {
        let mut topics = lock(&self.topics);
        let entry = topics.entry(topic.to_string()).or_insert(false);
        *entry |= not_owner;
        drop(topics);
        self.notify.notify_one();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The object-store side of this broker: the log engine of the current etcd session and the
/// topics loaded on it.
pub struct ClusterLogs {
    store: Arc<ObjectStore>,
    config: ObjectLogConfig,
    /// Restarted with each etcd session (its fenced commits go through that session).
    engine: Mutex<Option<Arc<ObjectLog>>>,
    topics: Mutex<HashMap<String, Arc<LoadedTopic>>>,
    failures: Arc<Failures>,
}

impl ClusterLogs {
    pub fn new(store: Arc<ObjectStore>, config: ObjectLogConfig) -> Result<ClusterLogs> {
        config
            .validate()
            .map_err(|error| BrokerError::Unknown(error.to_string()))?;
        Ok(ClusterLogs {
            store,
            config,
            engine: Mutex::new(None),
            topics: Mutex::new(HashMap::new()),
            failures: Arc::new(Failures::default()),
        })
    }

    /// Starts the engine of a new session (the previous one, if any, is closed: its session is
    /// gone, so it could commit nothing more). Blocking.
    pub(crate) fn start_engine(
        &self,
        cluster: Cluster,
        session: Arc<Session>,
    ) -> std::result::Result<(), String> {
        let engine = ObjectLog::start(self.config.clone(), cluster, session, self.store.clone())
            .map_err(|error| error.to_string())?;
        let previous = lock(&self.engine).replace(Arc::new(engine));
        if let Some(previous) = previous {
            previous.close();
        }
        Ok(())
    }

    fn engine(&self) -> Result<Arc<ObjectLog>> {
        lock(&self.engine).clone().ok_or_else(|| {
            BrokerError::NotServedHere(
                "no live etcd session: the object-store log is not running".into(),
            )
        })
    }

    /// Opens `topic`'s log for an owner of its bundle: the local copy rebuilt from the object
    /// store, the cursors restored from etcd, the object-store log attached. Blocking.
    pub(crate) fn open(
        &self,
        storage: &Storage,
        cluster: &Cluster,
        topic: &str,
        ownership: Ownership,
    ) -> Result<Arc<Log>> {
        let engine = self.engine()?;
        // A topic still open from an earlier load (unloaded after a failure) starts over.
        engine.close_topic(topic);
        let remote = engine.open_topic(topic, &ownership).map_err(|error| {
            match meridian_objlog::remote::storage_error(error) {
                StorageError::Remote { cause, .. } => BrokerError::NotServedHere(cause),
                other => BrokerError::Storage(other),
            }
        })?;
        let opened = self.rebuild(storage, topic, &remote);
        let log = match opened {
            Ok(log) => log,
            Err(error) => {
                engine.close_topic(topic);
                return Err(error);
            }
        };
        let ledger_id = log.current_ledger_id();
        let closed = Arc::new(AtomicBool::new(false));
        let reporting = ReportingRemote {
            inner: RemoteTopic::new(remote.clone()),
            topic: topic.to_string(),
            failures: self.failures.clone(),
            closed: closed.clone(),
        };
        log.attach_remote(Arc::new(reporting))?;
        let written = self.restore_cursors(cluster, topic, &log, ledger_id)?;
        lock(&self.topics).insert(
            topic.to_string(),
            Arc::new(LoadedTopic {
                log: log.clone(),
                remote,
                ownership,
                ledger_id,
                written: Mutex::new(written),
                closed,
            }),
        );
        Ok(log)
    }

    /// A fresh local log holding every committed entry of `remote`, numbered alike.
    fn rebuild(&self, storage: &Storage, topic: &str, remote: &Arc<TopicLog>) -> Result<Arc<Log>> {
        // Whatever an earlier ownership left here is stale: the object store is the truth.
        storage.delete_log(topic)?;
        let log =
            storage.open_log_with_ledger_floor(topic, ledger_floor(remote.current_ledger_id()))?;
        // Entries before the object-store log's first were trimmed: the copy starts there too.
        let first = remote.first_entry();
        log.start_at(first)?;
        let mut next = Position::new(0, first);
        let mut copied = 0u64;
        loop {
            let entries = remote
                .read_from(next, REBUILD_BATCH_ENTRIES, REBUILD_BATCH_BYTES)
                .map_err(|error| {
                    BrokerError::NotServedHere(format!(
                        "rebuilding {topic} from the object store: {error}"
                    ))
                })?;
            let Some(last) = entries.last().map(|entry| entry.position) else {
                break;
            };
            let mut pending = Vec::with_capacity(entries.len());
            for entry in entries {
                if log.end_position().entry_id != entry.position.entry_id {
                    return Err(BrokerError::Metadata(format!(
                        "rebuilding {topic}: the object-store log's entry {} does not follow local entry {}",
                        entry.position.entry_id,
                        log.end_position().entry_id
                    )));
                }
                pending.push(log.append(entry.data, entry.publish_time_ms)?);
            }
            for append in pending {
                append.wait()?;
            }
            copied += (last.entry_id + 1).saturating_sub(next.entry_id.max(first));
            next = Position::new(last.ledger_id, last.entry_id + 1);
        }
        let remote_next = remote.end_position().entry_id;
        if log.end_position().entry_id != remote_next {
            return Err(BrokerError::Metadata(format!(
                "rebuilding {topic}: copied up to entry {} but the object-store log continues at {remote_next}",
                log.end_position().entry_id
            )));
        }
        tracing::info!(
            topic,
            entries = copied,
            "local copy rebuilt from the object store"
        );
        Ok(log)
    }

    /// Restores the cursors etcd holds for `topic` into `log`; returns what was read (as
    /// written, so unchanged cursors are not written again).
    fn restore_cursors(
        &self,
        cluster: &Cluster,
        topic: &str,
        log: &Arc<Log>,
        ledger_id: u64,
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        let prefix = cluster.key(&cursors_prefix(topic));
        let mut found = Vec::new();
        cluster
            .client()
            .scan_prefix(&prefix, 1000, false, |page| {
                found.extend(page.iter().map(|kv| (kv.key.clone(), kv.value.clone())));
            })
            .map_err(|error| {
                BrokerError::NotServedHere(format!("reading the cursors of {topic}: {error}"))
            })?;
        let mut written = BTreeMap::new();
        for (key, value) in found {
            let stored: StoredCursor = serde_json::from_slice(&value).map_err(|error| {
                BrokerError::Metadata(format!("{key} holds no cursor: {error}"))
            })?;
            let mut acknowledged = RangeSet::new();
            for [first, last] in &stored.acknowledged {
                acknowledged.insert_range(ledger_id, *first, *last);
            }
            let state = CursorState {
                mark_delete: stored
                    .mark_delete
                    .map(|entry| Position::new(ledger_id, entry)),
                acknowledged,
                // Entries acknowledged in part are named by position: an earlier copy's.
                properties: crate::batch_acks::in_copy(stored.properties.clone(), ledger_id),
            };
            log.restore_cursor(&stored.name, state)?;
            written.insert(stored.name, value);
        }
        Ok(written)
    }

    /// Writes the changed cursors of every loaded topic to etcd. Blocking.
    pub(crate) fn persist_all(&self, max_ranges: usize) {
        let topics: Vec<(String, Arc<LoadedTopic>)> = lock(&self.topics)
            .iter()
            .map(|(name, topic)| (name.clone(), topic.clone()))
            .collect();
        for (name, topic) in topics {
            match persist_topic(&name, &topic, max_ranges) {
                Ok(()) => {}
                Err(PersistError::Fenced(error)) => {
                    // Another owner holds the bundle: stop serving it (reads included).
                    tracing::warn!(topic = %name, %error, "persisting cursors was fenced: the bundle has another owner");
                    if !topic.closed.load(Ordering::SeqCst) {
                        self.failures.report(&name, true);
                    }
                }
                Err(PersistError::Other(error)) => {
                    tracing::warn!(topic = %name, %error, "persisting cursors to etcd failed; retried at the next interval");
                }
            }
        }
    }

    /// Before the topic's local log closes (unload, shutdown): its cursors are written one
    /// last time and its object-store log is closed. `log`: the log being closed, if known; a
    /// topic loaded again meanwhile (another log) is left alone. Blocking.
    pub(crate) fn close(&self, topic: &str, log: Option<&Arc<Log>>, max_ranges: usize) {
        let loaded = {
            let mut topics = lock(&self.topics);
            let ours = topics
                .get(topic)
                .is_some_and(|loaded| log.is_none_or(|log| Arc::ptr_eq(log, &loaded.log)));
            if !ours {
                return;
            }
            topics.remove(topic)
        };
        let Some(loaded) = loaded else {
            return;
        };
        loaded.closed.store(true, Ordering::SeqCst);
        if loaded.remote.is_owner() {
            if let Err(error) = persist_topic(topic, &loaded, max_ranges) {
                tracing::warn!(topic, %error, "persisting cursors at close failed; the next owner redelivers what was acknowledged since the last persistence");
            }
        }
        if let Ok(engine) = self.engine() {
            engine.close_topic(topic);
        }
    }

    /// Deletes `topic`'s object-store log and cursors from etcd (its index: the head last, so
    /// that an interrupted deletion leaves a log that refuses to load, never a shorter one that
    /// loads; deleting again finishes it). The data objects stay, unreferenced, for the orphan
    /// sweeper (not built). The topic must be closed. Blocking.
    pub(crate) fn delete(
        &self,
        cluster: &Cluster,
        session: &Session,
        topic: &str,
        ownership: &Ownership,
    ) -> Result<()> {
        if let Ok(engine) = self.engine() {
            engine.close_topic(topic);
        }
        let mut keys = Vec::new();
        for prefix in [
            meridian_objlog::keys::objects_prefix(topic),
            cursors_prefix(topic),
        ] {
            let full = cluster.key(&prefix);
            let root = cluster.key("");
            cluster
                .client()
                .scan_prefix(&full, 1000, true, |page| {
                    keys.extend(
                        page.iter()
                            .filter_map(|kv| kv.key.strip_prefix(&root).map(str::to_string)),
                    );
                })
                .map_err(|error| {
                    BrokerError::NotServedHere(format!("listing the index of {topic}: {error}"))
                })?;
        }
        // A topic created again under this name starts after this life's entries.
        let read = |key: String| -> Result<Option<Vec<u8>>> {
            let full = cluster.key(&key);
            let found = cluster
                .client()
                .get(&full)
                .map_err(|error| BrokerError::NotServedHere(format!("reading {full}: {error}")))?;
            Ok(found.map(|kv| kv.value))
        };
        let (head_key, deleted_key) = (
            meridian_objlog::keys::head_key(topic),
            meridian_objlog::keys::deleted_key(topic),
        );
        let head = read(head_key.clone())?
            .and_then(|value| keys::decode::<keys::Head>(&head_key, &value).ok())
            .map(|head| head.next_entry);
        let deleted = read(deleted_key.clone())?
            .and_then(|value| keys::decode::<keys::Deleted>(&deleted_key, &value).ok())
            .map(|deleted| deleted.next_entry);
        let next_entry = head.max(deleted).unwrap_or(0);
        let operations: Vec<Op> = keys.into_iter().map(Op::Delete).collect();
        // The head last, with the deletion record in the same commit.
        let last = [
            Op::Delete(meridian_objlog::keys::head_key(topic)),
            Op::Put {
                key: meridian_objlog::keys::deleted_key(topic),
                value: serde_json::to_vec(&meridian_objlog::keys::Deleted { next_entry })
                    .unwrap_or_default(),
                lease: 0,
            },
        ];
        for chunk in operations
            .chunks(CURSOR_OPERATIONS_PER_COMMIT)
            .chain(std::iter::once(&last[..]))
        {
            session
                .fenced_commit(ownership, &[], chunk)
                .map_err(|error| {
                    BrokerError::NotServedHere(format!("deleting the index of {topic}: {error}"))
                })?;
        }
        tracing::info!(topic, "object-store log deleted (index and cursors)");
        Ok(())
    }

    /// Names of the loaded topics of `bundle`.
    pub(crate) fn topics_of_bundle(&self, bundle: &str) -> Vec<String> {
        lock(&self.topics)
            .iter()
            .filter(|(_, topic)| topic.ownership.bundle() == bundle)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The bundle a loaded topic was opened under.
    pub(crate) fn bundle_of_loaded(&self, topic: &str) -> Option<String> {
        lock(&self.topics)
            .get(topic)
            .map(|topic| topic.ownership.bundle().to_string())
    }

    /// Stops the engine (shutdown), after the topics were closed. Blocking.
    pub fn shutdown(&self) {
        if let Some(engine) = lock(&self.engine).take() {
            engine.close();
        }
    }
}

/// The lowest local ledger id of a topic's copy under bundle epoch `epoch`: epochs grow with
/// each owner, so message ids (ledger, entry) keep growing across moves. The local engine's own
/// floor (its start time in ms, below 2^41 until 2039, raised by each reload) stays under the
/// next epoch's floor.
fn ledger_floor(epoch: u64) -> u64 {
    epoch.saturating_mul(crate::replication::chain::COPY_LEDGER_FLOOR)
}

/// The position in `log`, a local copy of cluster mode with `--storage`, of the entry a client
/// names with `position` (a message id it received, perhaps from an earlier owner).
///
/// Every local copy of a topic (each owner's, each reload's) holds one ledger, at least
/// `ledger_floor(epoch)` with the bundle's epoch (which starts at 1 and never goes back, also
/// across splits), whose entry `n` is the object-store log's entry `n`. So a position whose
/// ledger lies in `[ledger_floor(1), this copy's ledger)` names an entry of an earlier copy:
/// the same entry as this copy's position with that entry id. Any other position (this
/// copy's, a later or unknown ledger) is returned as it is, and so is every position when
/// `copy_entry_ids` is false (standalone, whose ledgers carry no global entry ids).
pub(crate) fn position_in_copy(log: &Log, copy_entry_ids: bool, position: Position) -> Position {
    if !copy_entry_ids || position.ledger_id < ledger_floor(1) {
        return position;
    }
    in_copy_ledger(log.current_ledger_id(), position)
}

/// `position` as the copy whose one ledger is `here` names it: a position of an earlier copy
/// (a ledger in `[ledger_floor(1), here)`) is the entry with the same id in this one; any other
/// is returned as it is.
pub(crate) fn in_copy_ledger(here: u64, position: Position) -> Position {
    if position.ledger_id >= ledger_floor(1) && position.ledger_id < here {
        Position::new(here, position.entry_id)
    } else {
        position
    }
}

/// One cursor in etcd's form, as the local copy (one ledger, `ledger_id`) understands it.
///
/// A mark-delete position in an earlier ledger comes from a message id of an earlier owner (a
/// client acknowledging cumulatively, after the move, a message it received before it, while
/// nothing of this copy was acknowledged yet): it lies before every entry of this copy, so the
/// cursor acknowledges nothing here, and is stored so. `None` for a position in a later ledger
/// (not expected): the caller then keeps what etcd holds.
fn stored_cursor(
    name: &str,
    state: &CursorState,
    ledger_id: u64,
    max_ranges: usize,
) -> Option<StoredCursor> {
    let mark_delete = match state.mark_delete {
        None => None,
        Some(position) if position.ledger_id == ledger_id => Some(position.entry_id),
        Some(position) if position.ledger_id < ledger_id => None,
        Some(_) => return None,
    };
    let acknowledged = state
        .acknowledged
        .iter()
        .filter(|(ledger, _, _)| *ledger == ledger_id)
        .take(max_ranges)
        .map(|(_, first, last)| [first, last])
        .collect();
    Some(StoredCursor {
        name: name.to_string(),
        mark_delete,
        acknowledged,
        properties: state.properties.clone(),
    })
}

/// Why cursors could not be written.
#[derive(Debug, thiserror::Error)]
enum PersistError {
    /// The bundle has another owner (or none): this broker must stop serving it.
    #[error("{0}")]
    Fenced(String),
    #[error("{0}")]
    Other(String),
}

fn persist_topic(
    name: &str,
    topic: &LoadedTopic,
    max_ranges: usize,
) -> std::result::Result<(), PersistError> {
    let mut written = lock(&topic.written);
    let cursors = topic.log.durable_cursors();
    let mut operations = Vec::new();
    let mut now: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (cursor, state) in &cursors {
        let Some(stored) = stored_cursor(cursor, state, topic.ledger_id, max_ranges) else {
            // Not expressible in entry ids: etcd keeps the cursor as last written (a cursor
            // missing from `now` would be deleted from etcd, and a later owner would lose it).
            if let Some(value) = written.get(cursor) {
                now.insert(cursor.clone(), value.clone());
            }
            continue;
        };
        let value = serde_json::to_vec(&stored).unwrap_or_default();
        if written.get(cursor) != Some(&value) {
            operations.push(Op::Put {
                key: cursor_key(name, cursor),
                value: value.clone(),
                lease: 0,
            });
        }
        now.insert(cursor.clone(), value);
    }
    for gone in written.keys().filter(|cursor| !now.contains_key(*cursor)) {
        operations.push(Op::Delete(cursor_key(name, gone)));
    }
    if operations.is_empty() {
        return Ok(());
    }
    let session = topic.remote.session();
    for chunk in operations.chunks(CURSOR_OPERATIONS_PER_COMMIT) {
        session
            .fenced_commit(&topic.ownership, &[], chunk)
            .map_err(|error| {
                let text = format!("cursors of {name}: {error}");
                match error {
                    meridian_etcd::EtcdError::Fenced { .. } => PersistError::Fenced(text),
                    _ => PersistError::Other(text),
                }
            })?;
    }
    *written = now;
    Ok(())
}

/// The topic's object-store log as its local log's remote side, reporting failed commits to
/// [`watch_failures`].
struct ReportingRemote {
    inner: RemoteTopic,
    topic: String,
    failures: Arc<Failures>,
    closed: Arc<AtomicBool>,
}

/// One entry's remote commit. `inner` is taken when a flush thread waits for it; one dropped
/// unwaited means the local log failed that batch before asking (a local write, fsync or
/// segment creation failed, or a full disk rolled it back) although the object-store log may
/// commit it: the local copy no longer matches the object-store log, so the topic is reported
/// like a failed remote commit and reloaded from the object store at its next use.
struct ReportingCommit {
    inner: Option<Box<dyn RemoteCommit>>,
    topic: String,
    failures: Arc<Failures>,
    closed: Arc<AtomicBool>,
}

impl Drop for ReportingCommit {
    fn drop(&mut self) {
        if self.inner.is_some() && !self.closed.load(Ordering::SeqCst) {
            self.failures.report(&self.topic, false);
        }
    }
}

fn report(failures: &Failures, closed: &AtomicBool, topic: &str, error: &StorageError) {
    if let StorageError::Remote { not_owner, .. } = error {
        if !closed.load(Ordering::SeqCst) {
            failures.report(topic, *not_owner);
        }
    }
}

impl RemoteLog for ReportingRemote {
    fn append(
        &self,
        entry_id: u64,
        data: Bytes,
        publish_time_ms: u64,
    ) -> meridian_storage::Result<Box<dyn RemoteCommit>> {
        match self.inner.append(entry_id, data, publish_time_ms) {
            Ok(inner) => Ok(Box::new(ReportingCommit {
                inner: Some(inner),
                topic: self.topic.clone(),
                failures: self.failures.clone(),
                closed: self.closed.clone(),
            })),
            Err(error) => {
                report(&self.failures, &self.closed, &self.topic, &error);
                Err(error)
            }
        }
    }

    fn trim_before(&self, entry_id: u64) {
        self.inner.trim_before(entry_id);
    }
}

impl RemoteCommit for ReportingCommit {
    fn wait(mut self: Box<Self>) -> meridian_storage::Result<()> {
        let Some(inner) = self.inner.take() else {
            return Err(StorageError::remote(
                &self.topic,
                false,
                "the remote commit was already waited for",
            ));
        };
        inner
            .wait()
            .inspect_err(|error| report(&self.failures, &self.closed, &self.topic, error))
    }
}

/// Unloads the topics whose remote commits failed (their local logs are poisoned), so that
/// the next use reloads them from the object store; a fenced commit (another owner) also
/// makes this broker forget the bundle and unload all its topics.
pub async fn watch_failures(broker: Arc<crate::Broker>, mode: Arc<super::ClusterMode>) {
    let Some(logs) = mode.logs().cloned() else {
        return;
    };
    loop {
        logs.failures.notify.notified().await;
        let failed = std::mem::take(&mut *lock(&logs.failures.topics));
        for (topic, not_owner) in failed {
            let mut names = vec![topic.clone()];
            if not_owner {
                if let Some(bundle) = logs.bundle_of_loaded(&topic) {
                    mode.forget_bundle(&bundle);
                    names = logs.topics_of_bundle(&bundle);
                    tracing::warn!(
                        bundle,
                        topics = names.len(),
                        "bundle fenced by a newer owner: no longer serving it"
                    );
                }
            } else {
                tracing::warn!(topic, "a commit failed (object store, or the local copy): unloading the topic (reloaded from the object store at its next use)");
            }
            for name in names {
                if let Ok(name) = crate::topic_name::TopicName::parse(&name) {
                    broker.unload(&name).await;
                }
            }
        }
    }
}

/// Writes changed cursors to etcd every `interval` (until the broker stops).
pub async fn persist_cursors(
    mode: Arc<super::ClusterMode>,
    interval: std::time::Duration,
    max_ranges: usize,
) {
    let Some(logs) = mode.logs().cloned() else {
        return;
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let logs = logs.clone();
        let _ = tokio::task::spawn_blocking(move || logs.persist_all(max_ranges)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_is_stored_in_entry_ids_with_its_ranges_bounded() {
        let ledger = ledger_floor(2) + 5;
        let mut acknowledged = RangeSet::new();
        acknowledged.insert_range(ledger, 12, 14);
        acknowledged.insert_range(ledger, 20, 20);
        acknowledged.insert_range(ledger, 30, 31);
        let state = CursorState {
            mark_delete: Some(Position::new(ledger, 9)),
            acknowledged,
            properties: BTreeMap::from([("k".to_string(), "v".to_string())]),
        };
        let stored = stored_cursor("s", &state, ledger, 2).expect("same ledger");
        assert_eq!(stored.mark_delete, Some(9));
        // Beyond the bound, ranges are cut (redelivered after a move, never lost).
        assert_eq!(stored.acknowledged, vec![[12, 14], [20, 20]]);
        assert_eq!(stored.properties.get("k").map(String::as_str), Some("v"));
        // A mark-delete in an earlier ledger (an earlier owner's message id) is before every
        // entry of this copy: nothing is acknowledged, and the cursor is still stored.
        let earlier = stored_cursor("s", &state, ledger + 1, 2).expect("an earlier ledger");
        assert_eq!(earlier.mark_delete, None);
        assert!(earlier.acknowledged.is_empty());
        // A later ledger is not expected: nothing is stored for it (etcd keeps its value).
        assert!(stored_cursor("s", &state, ledger - 1, 2).is_none());
        let fresh = CursorState::default();
        assert_eq!(
            stored_cursor("s", &fresh, ledger, 2).map(|c| c.mark_delete),
            Some(None)
        );
    }

    #[test]
    fn each_epochs_ledgers_are_above_the_previous_epochs() {
        let now_ms = 1_800_000_000_000u64; // 2027, below 2^41 as every time floor until 2039
        assert!(ledger_floor(1) > now_ms);
        assert!(ledger_floor(2) > ledger_floor(1) + now_ms);
    }
}
