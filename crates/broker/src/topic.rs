//! A topic (or one partition of a partitioned topic): its log, producers, subscriptions and
//! de-duplication state.
//!
//! Lock order: a topic's state lock may be held while taking a subscription's or the log's
//! lock, never the other way round.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use meridian_storage::{InitialPosition, Log, Position};
use tokio::sync::oneshot;

use crate::clock::{now_ms, now_rfc3339};
use crate::context::TopicContext;
use crate::dedup::{
    highest_sequence, is_replication_key, position_sequence, replication_key, sequence_position,
    Dedup, Sequence, Verdict, DEDUP_CURSOR,
};
use crate::error::{BrokerError, Result};
use crate::health::FailureKind;
use crate::outbound::{command_frame, OutboundSender};
use crate::replication::remote::RemoteCluster;
use crate::replication::replicated_subscriptions;
use crate::replication::replicator::{self, Replicator, ReplicatorSpec};
use crate::replication::subscription_sync::SubscriptionSync;
use crate::resources::{BacklogQuotaPolicy, DispatchRate, EffectivePolicies, RetentionPolicies};
use crate::stats::{
    self, Meter, PublisherStats, ReplicatorStats, SubscriptionStats, TopicStats, Traffic,
};
use crate::subscription::{NewConsumer, StartPosition, Subscription, SubscriptionType};
use crate::topic_name::TopicName;
use meridian_wire::proto::{
    base_command, command_topic_migrated, BaseCommand, CommandCloseProducer, CommandTopicMigrated,
};

/// Pulsar's producer access modes (wire values 0..=3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    Shared,
    Exclusive,
    WaitForExclusive,
    ExclusiveWithFencing,
}

impl AccessMode {
    pub fn from_wire(value: i32) -> AccessMode {
        match value {
            1 => AccessMode::Exclusive,
            2 => AccessMode::WaitForExclusive,
            3 => AccessMode::ExclusiveWithFencing,
            _ => AccessMode::Shared,
        }
    }

    fn is_exclusive(self) -> bool {
        !matches!(self, AccessMode::Shared)
    }
}

/// A producer admitted to the topic.
#[derive(Debug)]
pub struct ProducerGrant {
    pub key: u64,
    pub name: String,
    pub last_sequence_id: i64,
    /// For `WaitForExclusive` when another producer holds the topic: resolves when this one
    /// gets it.
    pub ready: Option<oneshot::Receiver<()>>,
}

/// A request to add a producer.
pub struct NewProducer {
    pub name: Option<String>,
    pub mode: AccessMode,
    /// The client's id of the producer on its connection.
    pub producer_id: u64,
    /// The connection's outbound queue, for CLOSE_PRODUCER.
    pub sink: OutboundSender,
    /// Set when the broker closes the producer itself (unload, backlog quota).
    pub closed: Arc<AtomicBool>,
    pub address: String,
    pub client_version: String,
    /// The protocol version the client's connection negotiated (TOPIC_MIGRATED needs 20).
    pub protocol_version: i32,
}

/// The replicators a topic should run.
pub(crate) struct ReplicationPlan {
    /// Remote clusters in the replication policy (whether or not they are registered).
    pub configured: Vec<String>,
    /// The ones to replicate to.
    pub remotes: Vec<RemoteCluster>,
    /// The partition count of the topic this partition belongs to.
    pub partitions: Option<u32>,
    pub rate: Option<DispatchRate>,
    /// A new replicator cursor starts at the earliest message instead of the latest.
    pub start_at_earliest: bool,
    /// Remotes whose new replicator cursor starts at the earliest message whatever
    /// `start_at_earliest` says: the target of a tenant migration (`crate::migration`).
    pub earliest_remotes: Vec<String>,
    /// Every registered cluster but this one, replicated to or not: replicated subscriptions
    /// also send their state to the origins of the entries they hold.
    pub registered: Vec<RemoteCluster>,
}

/// One SEND to append.
pub struct Publish {
    /// Messages in the entry (more than one for a batch).
    pub messages: u64,
    pub sequence_id: u64,
    pub highest_sequence_id: u64,
    /// The entry exactly as the producer sent it (metadata and payload).
    pub entry: Bytes,
    pub publish_time_ms: u64,
    /// For an entry a replicator brought: where it comes from.
    pub origin: Option<replicator::Origin>,
    /// For an entry of this cluster's own (no origin, not a marker): its replication list, so
    /// that replicated subscriptions learn it as written instead of reading it back. `None`:
    /// not known (the entry is read when a walk needs its origin).
    pub local_replicate_to: Option<Vec<String>>,
    /// The producer's CRC32C of most of `entry`, verified on receipt (storage derives its own
    /// checksum from it).
    pub checksum: Option<meridian_storage::KnownChecksum>,
}

/// An entry whose origin replicated subscriptions learn as it is written.
enum Written {
    /// Brought by a replicator from its origin.
    Replicated(replicator::Origin),
    /// This cluster's own, with its replication list.
    Local(Vec<String>),
}

/// A future that completes when a publish is durable: `Some(position)`, or `None` for a
/// duplicate that was not stored again.
pub type PublishFuture = Pin<Box<dyn Future<Output = Result<Option<Position>>> + Send>>;

/// Why a name cannot be a subscription's (`Err` with the reason): empty, a control character (a NUL would cut the
/// name short in C-based clients and tools), or a name the broker keeps for its own cursors.
pub(crate) fn check_subscription_name(name: &str) -> std::result::Result<(), String> {
    let limit = meridian_storage::cursor::CURSOR_NAME_MAX_BYTES;
    if name.len() > limit {
        // Checked here, not by storage: a clear refusal instead of "storage failure".
        return Err(format!(
            "invalid subscription name of {} bytes: at most {limit} bytes",
            name.len()
        ));
    }
    let reason = if name.is_empty() {
        "a subscription name cannot be empty"
    } else if name.chars().any(char::is_control) {
        "a subscription name cannot contain control characters"
    } else if is_system_cursor(name) || is_replicator_cursor(name) {
        "the name is reserved for the broker's own cursors"
    } else {
        return Ok(());
    };
    Err(format!("invalid subscription name {name:?}: {reason}"))
}

/// Awaits a stored append and then does the topic's bookkeeping for it (de-duplication
/// state, the in-flight set that bounds dedup snapshots). The bookkeeping runs on storage
/// completion whatever happens to the caller: dropped early (a connection that went away with
/// sends in flight), it hands the append to a task that finishes the job.
struct AppendCompletion {
    topic: Arc<Topic>,
    persisted: Vec<(String, Sequence)>,
    pending: Option<meridian_storage::PendingAppend>,
}

impl Future for AppendCompletion {
    type Output = Result<Option<Position>>;

    fn poll(
        mut self: Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(pending) = self.pending.as_mut() else {
            panic!("AppendCompletion polled after it completed");
        };
        let position = pending.position();
        let std::task::Poll::Ready(result) = Pin::new(pending).poll(context) else {
            return std::task::Poll::Pending;
        };
        self.pending = None;
        let persisted = std::mem::take(&mut self.persisted);
        self.topic
            .append_completed(persisted, position, result.is_ok());
        std::task::Poll::Ready(
            result
                .map(Some)
                .map_err(|error| self.topic.storage_failure(error)),
        )
    }
}

impl Drop for AppendCompletion {
    fn drop(&mut self) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let topic = self.topic.clone();
        let persisted = std::mem::take(&mut self.persisted);
        let position = pending.position();
        let finish = async move {
            let result = pending.await;
            topic.append_completed(persisted, position, result.is_ok());
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(finish);
            }
            // Outside a runtime (only when the broker is being torn down) nobody is left to
            // need the bookkeeping: the dedup state is rebuilt from the log at the next load.
            Err(_) => {
                tracing::debug!(topic = %self.topic.full_name, "append bookkeeping dropped outside a runtime")
            }
        }
    }
}

struct ProducerEntry {
    name: String,
    mode: AccessMode,
    producer_id: u64,
    sink: OutboundSender,
    closed: Arc<AtomicBool>,
    address: String,
    client_version: String,
    connected_since: String,
    meter: Arc<Meter>,
    protocol_version: i32,
    /// Its name is one whose entries were replicated here: it moved here with its tenant and
    /// resumes that sequence, de-duplicated even where the namespace does not de-duplicate.
    resumes: bool,
}

/// The topic's producers that are not replicators.
fn local_producer_count(state: &TopicState) -> usize {
    state
        .producers
        .values()
        .filter(|producer| !is_replication_key(&producer.name))
        .count()
}

struct Waiting {
    key: u64,
    entry: ProducerEntry,
    ready: oneshot::Sender<()>,
}

struct TopicState {
    producers: HashMap<u64, ProducerEntry>,
    waiting_for_exclusive: VecDeque<Waiting>,
    subscriptions: HashMap<String, Arc<Subscription>>,
    dedup: Option<Dedup>,
    /// Appended entries whose completion has not been processed yet (bounds dedup snapshots).
    in_flight: BTreeSet<Position>,
    /// Messages expired by TTL or evicted by a backlog quota, per subscription.
    expired: BTreeMap<String, u64>,
    /// Running replicators by remote cluster.
    replicators: BTreeMap<String, Replicator>,
    /// Every registered cluster but this one (as of the last replication plan).
    registered_clusters: Vec<RemoteCluster>,
}

pub struct Topic {
    pub name: TopicName,
    full_name: String,
    partition_index: i32,
    log: Arc<Log>,
    shared: Arc<TopicContext>,
    state: Mutex<TopicState>,
    meter_in: Meter,
    /// Whether de-duplication is on for this load of the topic.
    deduplication: bool,
    /// Terminated topics accept no more messages; shared with the subscriptions, which tell
    /// their consumers when they have read everything.
    terminated: Arc<AtomicBool>,
    closed: AtomicBool,
    /// Entries appended since the topic was loaded.
    entries_added: AtomicU64,
    /// The replicated-subscription sync task, started once the topic needs it.
    subscription_sync: std::sync::OnceLock<SubscriptionSync>,
    /// Held while a subscription's cursor properties are read, changed and written back (the
    /// replicated mark, resets, states from other clusters), so that no change is lost.
    cursor_properties: Arc<Mutex<()>>,
    /// How often replicated subscriptions sync (namespace policy or broker default), in ms.
    sync_interval_ms: AtomicU64,
    /// The log is a cluster-mode local copy (`--storage`): message ids of the topic's earlier
    /// copies (from before a move) are translated ([`crate::cluster::logs::position_in_copy`]).
    copy_entry_ids: bool,
}

/// The replicated-subscription sync interval in ms: the namespace's, else the broker's.
fn sync_interval_ms(policies: &EffectivePolicies, config: &crate::config::BrokerConfig) -> u64 {
    policies
        .replicated_subscription_sync_interval_ms
        .unwrap_or(config.replicated_subscriptions_sync_interval.as_millis() as u64)
}

/// Cursor names the broker uses for itself; never shown or usable as subscriptions.
pub fn is_system_cursor(name: &str) -> bool {
    name == DEDUP_CURSOR || name.starts_with("__reader-")
}

/// A replicator's cursor (`pulsar.repl.<remote>`): not a subscription, but it holds a backlog
/// that quotas count and that the admin API may skip or reset.
pub fn is_replicator_cursor(name: &str) -> bool {
    is_replication_key(name)
}

/// What clients, the health check and the ERROR line say of a topic whose log is poisoned
/// (the same text wherever it is found first, so it is recorded and logged once).
fn poisoned_reason(cause: &str) -> String {
    format!("its log is poisoned by a failed write or fsync: {cause}")
}

/// What clients, the health check and the ERROR line say of a loaded topic whose log refuses
/// service because a read found corrupted data (the same text wherever it is met first).
fn corrupted_reason(error: &meridian_storage::StorageError) -> String {
    format!("its log refuses service: {error}; unload the topic once the damage is repaired")
}

/// The reason a storage error makes the topic unavailable, if it does: a poisoned log or
/// corruption found by a read. Other errors concern one request only.
fn unavailable_reason(error: &meridian_storage::StorageError) -> Option<String> {
    use meridian_storage::StorageError;
    match error {
        StorageError::Poisoned { cause, .. } => Some(poisoned_reason(cause)),
        StorageError::Corrupted { .. } => Some(corrupted_reason(error)),
        _ => None,
    }
}

/// A name clients may give a subscription: not empty, no control characters (NUL included),
/// and not a cursor the broker keeps for itself.
impl Topic {
    /// Opens the topic's log and recovers its de-duplication state. Blocking: call it off the
    /// async runtime.
    pub(crate) fn load(
        shared: Arc<TopicContext>,
        name: TopicName,
        policies: &EffectivePolicies,
        terminated: bool,
    ) -> Result<Arc<Topic>> {
        let full_name = name.to_string();
        let log = shared.open_log(&full_name)?;
        // A log poisoned in the background (a relaxed-mode fsync) is reported at once, with
        // the topic's name: one ERROR line, from the health registry (weak: the storage that
        // holds the log is held by the context).
        log.on_poisoned(Box::new({
            let context = Arc::downgrade(&shared);
            let topic = full_name.clone();
            move |error| {
                if let (Some(context), Some(reason)) =
                    (context.upgrade(), unavailable_reason(error))
                {
                    context
                        .health
                        .record(&topic, FailureKind::Poisoned, &reason);
                }
            }
        }));
        log.set_retention(retention_of(policies.retention));
        let deduplication = policies
            .deduplication_enabled
            .unwrap_or(shared.config.deduplication_enabled);
        let copy_entry_ids = shared
            .cluster
            .get()
            .is_some_and(|mode| mode.logs().is_some());
        let dedup = if deduplication {
            Some(recover_dedup(&log)?)
        } else if log.cursor(DEDUP_CURSOR).is_some() || copy_entry_ids {
            // De-duplication is off: only replicated entries still need it. Without them its
            // cursor must not hold back trimming. In cluster mode a cursor created since the
            // last persistence to etcd is not here after a move: the log (just copied, so
            // read once already) tells whether replicated entries are in it.
            let mut recovered = recover_dedup(&log)?;
            recovered.retain_replication();
            if recovered.tracks_replication() {
                Some(recovered)
            } else {
                log.delete_cursor(DEDUP_CURSOR)?;
                None
            }
        } else {
            None
        };
        let partition_index = name.partition_index().map_or(-1, |index| index as i32);
        let sync_interval_ms = sync_interval_ms(policies, &shared.config);
        tracing::debug!(topic = %full_name, "topic loaded");
        Ok(Arc::new(Topic {
            name,
            full_name,
            partition_index,
            log,
            shared,
            state: Mutex::new(TopicState {
                producers: HashMap::new(),
                waiting_for_exclusive: VecDeque::new(),
                subscriptions: HashMap::new(),
                dedup,
                in_flight: BTreeSet::new(),
                expired: BTreeMap::new(),
                replicators: BTreeMap::new(),
                registered_clusters: Vec::new(),
            }),
            meter_in: Meter::default(),
            deduplication,
            terminated: Arc::new(AtomicBool::new(terminated)),
            closed: AtomicBool::new(false),
            subscription_sync: std::sync::OnceLock::new(),
            cursor_properties: Arc::new(Mutex::new(())),
            sync_interval_ms: AtomicU64::new(sync_interval_ms),
            entries_added: AtomicU64::new(0),
            copy_entry_ids,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn full_name(&self) -> &str {
        &self.full_name
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// Turns a failed append into the broker's error. A write or fsync failure poisons the
    /// log: the topic is recorded as unavailable (logged once, counted, listed in the health
    /// check) and the client gets the cause.
    fn storage_failure(&self, error: meridian_storage::StorageError) -> BrokerError {
        use meridian_storage::StorageError;
        let reason = match &error {
            // Cluster mode: the object-store log did not commit (no longer the owner, store or
            // etcd unreachable). The client retries through a new lookup; the broker unloads
            // the topic (`cluster::logs`), so the next load rebuilds it from the object store.
            StorageError::Remote { .. } => return BrokerError::NotServedHere(error.to_string()),
            StorageError::Io { .. } => poisoned_reason(&error.to_string()),
            _ => match unavailable_reason(&error) {
                Some(reason) => reason,
                None => return error.into(),
            },
        };
        self.shared
            .health
            .record(&self.full_name, FailureKind::Poisoned, &reason);
        BrokerError::TopicUnavailable {
            topic: self.full_name.clone(),
            reason,
        }
    }

    /// Admits a producer, enforcing unique names and access modes.
    pub fn add_producer(&self, key: u64, request: NewProducer) -> Result<ProducerGrant> {
        if self.is_terminated() {
            return Err(BrokerError::TopicTerminated(self.full_name.clone()));
        }
        if let Some(failure) = self.shared.health.failure(&self.full_name) {
            return Err(BrokerError::TopicUnavailable {
                topic: self.full_name.clone(),
                reason: format!("{}; unload the topic to reopen its log", failure.reason),
            });
        }
        let mut state = self.lock();
        let name = match request.name {
            Some(name) if !name.is_empty() => name,
            _ => self.shared.generate_producer_name(),
        };
        if state
            .producers
            .values()
            .any(|producer| producer.name == name)
            || state
                .waiting_for_exclusive
                .iter()
                .any(|waiting| waiting.entry.name == name)
        {
            return Err(BrokerError::ProducerBusy(format!(
                "producer with name '{name}' is already connected to topic {}",
                self.full_name
            )));
        }
        let replicator = is_replication_key(&name);
        if replicator && state.dedup.is_none() {
            // Replicated entries are de-duplicated by origin position even when the namespace
            // does not de-duplicate: start tracking them from here, durably.
            self.log
                .open_cursor(DEDUP_CURSOR, InitialPosition::Latest)?;
            self.log.persist_cursors()?;
            state.dedup = Some(Dedup::default());
        }
        let resumes = !replicator && state.dedup.as_mut().is_some_and(|dedup| dedup.adopt(&name));
        let last_sequence_id = match &state.dedup {
            Some(dedup) if !replicator => dedup.last_sequence_id(&name),
            _ => -1,
        };
        // Access modes are between the topic's own producers: a replicator (a geo-replicated
        // topic, or a tenant migration's) neither needs nor blocks exclusive access.
        let exclusive_holder = state
            .producers
            .values()
            .find(|producer| producer.mode.is_exclusive());
        let local_producers = local_producer_count(&state);
        let mut ready = None;
        match request.mode {
            AccessMode::Shared => {
                if exclusive_holder.is_some() && !replicator {
                    return Err(BrokerError::ProducerBusy(format!(
                        "topic {} has an exclusive producer",
                        self.full_name
                    )));
                }
            }
            AccessMode::Exclusive | AccessMode::ExclusiveWithFencing => {
                if local_producers > 0 {
                    return Err(BrokerError::ProducerFenced(format!(
                        "topic {} already has {local_producers} producer(s); exclusive access refused",
                        self.full_name,
                    )));
                }
            }
            AccessMode::WaitForExclusive => {}
        }
        let entry = ProducerEntry {
            name: name.clone(),
            mode: request.mode,
            producer_id: request.producer_id,
            sink: request.sink,
            closed: request.closed,
            address: request.address,
            client_version: request.client_version,
            connected_since: now_rfc3339(),
            meter: Arc::new(Meter::default()),
            protocol_version: request.protocol_version,
            resumes,
        };
        if request.mode == AccessMode::WaitForExclusive && local_producers > 0 {
            let (sender, receiver) = oneshot::channel();
            state.waiting_for_exclusive.push_back(Waiting {
                key,
                entry,
                ready: sender,
            });
            ready = Some(receiver);
        } else {
            state.producers.insert(key, entry);
        }
        Ok(ProducerGrant {
            key,
            name,
            last_sequence_id,
            ready,
        })
    }

    /// Removes a producer (or a waiting one); the next waiting exclusive producer takes over.
    pub fn remove_producer(&self, key: u64) {
        let mut state = self.lock();
        state
            .waiting_for_exclusive
            .retain(|waiting| waiting.key != key);
        if state.producers.remove(&key).is_none() || local_producer_count(&state) > 0 {
            return;
        }
        while let Some(next) = state.waiting_for_exclusive.pop_front() {
            if next.ready.send(()).is_ok() {
                state.producers.insert(next.key, next.entry);
                return;
            }
        }
    }

    /// Appends an entry (exactly the bytes the producer sent after the command) unless
    /// de-duplication recognises it.
    pub fn publish(
        self: &Arc<Self>,
        producer_key: u64,
        producer_name: &str,
        mut request: Publish,
    ) -> Result<PublishFuture> {
        if self.is_terminated() {
            return Err(BrokerError::TopicTerminated(self.full_name.clone()));
        }
        // Replicated entries are always de-duplicated by origin position; local ones by
        // sequence id when the namespace asks for it, or when the producer moved here.
        let resumes = self
            .lock()
            .producers
            .get(&producer_key)
            .is_some_and(|producer| producer.resumes);
        let dedup_key = match &request.origin {
            Some(origin) => {
                let sequence =
                    position_sequence(origin.position.ledger_id, origin.position.entry_id);
                Some((replication_key(&origin.cluster), sequence, sequence))
            }
            None if self.deduplication || resumes => {
                let highest = request.sequence_id.max(request.highest_sequence_id);
                Some((
                    producer_name.to_string(),
                    Sequence::from(request.sequence_id),
                    Sequence::from(highest),
                ))
            }
            None => None,
        };
        // A replicated entry also teaches the last sequence id of its producer.
        let learned = request
            .origin
            .as_ref()
            .and_then(|origin| origin.learned.clone());
        let pending = {
            let mut state = self.lock();
            // Checked under the lock the fence takes (`fence_producers`): once the fence is in
            // place, nothing a fenced producer sent is stored, even a SEND the connection let
            // through just before.
            if state
                .producers
                .get(&producer_key)
                .is_some_and(|producer| producer.closed.load(Ordering::SeqCst))
            {
                return Err(BrokerError::TenantMigrated(format!(
                    "producer {producer_name} of {} is fenced: it resends where it reconnects",
                    self.full_name
                )));
            }
            let verdict = match (&dedup_key, state.dedup.as_mut()) {
                (Some((key, sequence, highest)), Some(dedup)) => match &request.origin {
                    Some(origin) => replicator::check_chain(dedup, key, origin),
                    None => dedup.check(key, *sequence, *highest),
                },
                _ => Verdict::New,
            };
            match verdict {
                Verdict::Duplicate => return Ok(Box::pin(std::future::ready(Ok(None)))),
                Verdict::Unknown => {
                    return Err(BrokerError::Unknown(format!(
                        "message {} of producer {producer_name} may still be in flight; retry",
                        request.sequence_id
                    )))
                }
                Verdict::Gap { last } => {
                    let origin = request
                        .origin
                        .as_ref()
                        .expect("a gap is in a replicated chain");
                    return Err(BrokerError::NotAllowed(replicator::gap_message(
                        origin,
                        last.map(sequence_position),
                    )));
                }
                Verdict::New => {}
            }
            let entry_bytes = request.entry.len() as u64;
            // Replicated subscriptions learn the origins of entries as they are written: a
            // replicated entry's from the replicator, this cluster's own as themselves (only
            // once a replicated subscription is being walked: nothing is kept otherwise).
            let noted = match (request.origin.take(), self.subscription_sync()) {
                (Some(origin), Some(_)) => Some(Written::Replicated(origin)),
                (None, Some(sync)) if sync.records_written() => {
                    request.local_replicate_to.take().map(Written::Local)
                }
                _ => None,
            };
            // Read before the append (for an entry whose origin is noted): a rollback after
            // it makes the noted origin untrusted.
            let rollbacks = noted.as_ref().map_or(0, |_| self.log.rollbacks());
            match self.log.append_with_checksum(
                request.entry,
                request.publish_time_ms,
                request.checksum,
            ) {
                Ok(pending) => {
                    self.meter_in.record(request.messages, entry_bytes);
                    self.entries_added.fetch_add(1, Ordering::Relaxed);
                    if let Some(producer) = state.producers.get(&producer_key) {
                        producer.meter.record(request.messages, entry_bytes);
                    }
                    if state.dedup.is_some() {
                        state.in_flight.insert(pending.position());
                    }
                    // Replicated subscriptions learn the entry's origin here, not by reading
                    // it back.
                    if let (Some(noted), Some(sync)) = (noted, self.subscription_sync()) {
                        let origin = match noted {
                            Written::Replicated(origin) => origin,
                            Written::Local(replicate_to) => replicator::Origin {
                                cluster: self.shared.config.cluster_name.clone(),
                                position: crate::replication::chain::origin_position(
                                    pending.position(),
                                ),
                                previous: None,
                                learned: None,
                                replicate_to,
                                marker: false,
                            },
                        };
                        sync.note_written(pending.position(), rollbacks, origin);
                    }
                    pending
                }
                Err(error) => {
                    if let Some(dedup) = state.dedup.as_mut() {
                        dedup.reset_pushed();
                    }
                    drop(state);
                    return Err(self.storage_failure(error));
                }
            }
        };
        Ok(Box::pin(AppendCompletion {
            topic: self.clone(),
            persisted: dedup_key
                .map(|(key, _, highest)| (key, highest))
                .into_iter()
                .chain(learned)
                .collect(),
            pending: Some(pending),
        }))
    }

    /// Records a finished append: `persisted` is its de-duplication key and sequence.
    fn append_completed(
        &self,
        persisted: Vec<(String, Sequence)>,
        position: Position,
        succeeded: bool,
    ) {
        if !succeeded {
            if let Some(sync) = self.subscription_sync() {
                sync.forget_written();
            }
        }
        let mut state = self.lock();
        state.in_flight.remove(&position);
        let first_in_flight = state.in_flight.first().copied();
        let Some(dedup) = state.dedup.as_mut() else {
            return;
        };
        if !succeeded {
            dedup.reset_pushed();
            return;
        }
        for (key, sequence) in persisted {
            dedup.persisted(&key, sequence);
        }
        dedup.entries_since_snapshot += 1;
        if dedup.entries_since_snapshot < self.shared.config.deduplication_snapshot_interval_entries
        {
            return;
        }
        // The snapshot covers only entries before anything still in flight, so that recovery
        // replays every entry whose completion the snapshot may not include.
        let covered = match first_in_flight {
            Some(first) => self.log.previous_position(first),
            None => Some(position),
        };
        let Some(covered) = covered else {
            return;
        };
        dedup.entries_since_snapshot = 0;
        let snapshot = dedup.snapshot();
        let result = self
            .log
            .set_cursor_properties(DEDUP_CURSOR, snapshot)
            .and_then(|()| {
                self.log
                    .acknowledge_cumulative(DEDUP_CURSOR, covered)
                    .map(|_| ())
            });
        if let Err(error) = result {
            tracing::error!(topic = %self.full_name, %error, "de-duplication snapshot failed");
        }
    }

    /// Subscribes a consumer, creating the subscription if needed.
    pub fn subscribe(
        self: &Arc<Self>,
        subscription: &str,
        durable: bool,
        start: StartPosition,
        key: u64,
        consumer: NewConsumer,
    ) -> Result<Arc<Subscription>> {
        if let Err(reason) = check_subscription_name(subscription) {
            return Err(BrokerError::NotAllowed(reason));
        }
        // A log that refuses reads would give the consumer nothing, silently: refuse it here,
        // with the reason. (A poisoned log still serves what it holds to consumers.)
        if let Some(error) = self.log.corruption() {
            return Err(BrokerError::TopicUnavailable {
                topic: self.full_name.clone(),
                reason: corrupted_reason(&error),
            });
        }
        let mut state = self.lock();
        let (existing, created) = match state.subscriptions.get(subscription) {
            Some(existing) => (existing.clone(), false),
            None => {
                let cursor = if durable {
                    subscription.to_string()
                } else {
                    format!("__reader-{key}")
                };
                let created = Subscription::open(
                    subscription.to_string(),
                    cursor,
                    durable,
                    consumer.kind,
                    start,
                    self.full_name.clone(),
                    self.partition_index,
                    self.log.clone(),
                    self.shared.config.clone(),
                    self.terminated.clone(),
                    self.cursor_properties.clone(),
                    self.copy_entry_ids,
                )?;
                state
                    .subscriptions
                    .insert(subscription.to_string(), created.clone());
                (created, true)
            }
        };
        let replicate = consumer.replicate_state && durable;
        if let Err(error) = existing.add_consumer(key, consumer) {
            if created {
                self.drop_subscription(&mut state, subscription);
            }
            return Err(error);
        }
        drop(state);
        // A consumer can switch replication on (as in Pulsar), never off: that is the admin
        // API's job, so that one old client cannot stop what the others rely on.
        if replicate {
            self.set_subscription_replicated(subscription, true)?;
        }
        Ok(existing)
    }

    /// Where a reader asking to start at message id `id` (`batch_index` -1 when none) starts,
    /// or (`seek`) where a seek to it goes: `id` itself, unless it is not a position of this
    /// log but the origin position of a replicated entry here (a client that moved from
    /// another cluster): then right after that entry, or at it for a seek
    /// ([`crate::replication::origin_position`]).
    pub fn start_of_message_id(&self, id: Position, batch_index: i32, seek: bool) -> Position {
        use crate::replication::origin_position;
        // A message id of an earlier copy of this topic (cluster mode): this copy's position
        // of the same entry, used as a local message id is.
        let here = self.position_here(id);
        if here != id {
            return here;
        }
        let translated = if seek {
            origin_position::seek_position(&self.log, id)
        } else {
            origin_position::reader_start(&self.log, id, batch_index)
        };
        match translated {
            Ok(Some(translated)) => {
                tracing::debug!(topic = %self.full_name, ?id, ?translated, "message id translated from its origin position");
                translated
            }
            Ok(None) => id,
            Err(error) => {
                tracing::warn!(topic = %self.full_name, %error, "could not look up a message id as an origin position");
                id
            }
        }
    }

    /// Removes a consumer; a reader's subscription goes with its last consumer.
    pub fn remove_consumer(&self, subscription: &str, key: u64) {
        let mut state = self.lock();
        let Some(existing) = state.subscriptions.get(subscription).cloned() else {
            return;
        };
        existing.remove_consumer(key);
        if !existing.is_durable() && existing.consumer_count() == 0 {
            self.drop_subscription(&mut state, subscription);
        }
        drop(state);
        // A consumer that leaves may be failing over to another cluster: send its
        // acknowledgements now rather than at the next tick.
        if let Some(sync) = self.subscription_sync.get() {
            sync.now();
        }
    }

    fn drop_subscription(&self, state: &mut TopicState, subscription: &str) {
        if let Some(removed) = state.subscriptions.remove(subscription) {
            removed.stop();
            if let Err(error) = self.log.delete_cursor(removed.cursor_name()) {
                tracing::warn!(topic = %self.full_name, %error, "deleting cursor failed");
            }
        }
    }

    /// A durable subscription's cursor (not the broker's own cursors).
    fn subscription_cursor(&self, subscription: &str) -> Result<meridian_storage::CursorState> {
        self.log
            .cursor(subscription)
            .filter(|_| !is_system_cursor(subscription) && !is_replicator_cursor(subscription))
            .ok_or_else(|| BrokerError::SubscriptionNotFound {
                topic: self.full_name.clone(),
                subscription: subscription.to_string(),
            })
    }

    /// Whether a subscription is replicated.
    pub fn is_subscription_replicated(&self, subscription: &str) -> Result<bool> {
        let cursor = self.subscription_cursor(subscription)?;
        Ok(replicated_subscriptions::is_replicated(&cursor))
    }

    /// Marks a durable subscription replicated or not (Pulsar's
    /// `replicatedSubscriptionStatus`); the mark is a cursor property, so it lasts.
    pub fn set_subscription_replicated(
        self: &Arc<Self>,
        subscription: &str,
        replicated: bool,
    ) -> Result<()> {
        let _properties = self.lock_cursor_properties();
        let cursor = self.subscription_cursor(subscription)?;
        if replicated_subscriptions::is_replicated(&cursor) == replicated {
            return Ok(());
        }
        let mut properties = cursor.properties;
        replicated_subscriptions::mark(&mut properties, replicated);
        self.log.set_cursor_properties(subscription, properties)?;
        tracing::info!(topic = %self.full_name, subscription, replicated, "replicated subscription status changed");
        if replicated {
            self.ensure_subscription_sync();
        }
        Ok(())
    }

    /// Takes the namespace's replicated-subscription sync interval, or the broker's.
    fn set_sync_interval(&self, policies: &EffectivePolicies) {
        let interval = sync_interval_ms(policies, &self.shared.config);
        self.sync_interval_ms.store(interval, Ordering::Relaxed);
    }

    /// How often replicated subscriptions sync now.
    pub(crate) fn sync_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.sync_interval_ms.load(Ordering::Relaxed))
    }

    /// Serializes read-change-write cycles of subscriptions' cursor properties.
    pub(crate) fn lock_cursor_properties(&self) -> MutexGuard<'_, ()> {
        self.cursor_properties
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the task if it is not running, or wakes it (a subscription just became
    /// replicated, or a state arrived).
    pub(crate) fn ensure_subscription_sync(self: &Arc<Self>) {
        let mut started = false;
        let sync = self.subscription_sync.get_or_init(|| {
            started = true;
            SubscriptionSync::start(
                Arc::downgrade(self),
                self.name.clone(),
                self.shared.config.cluster_name.clone(),
            )
        });
        if !started {
            sync.now();
        }
    }

    /// The replicated-subscription sync task, if it runs.
    pub(crate) fn subscription_sync(&self) -> Option<&SubscriptionSync> {
        self.subscription_sync.get()
    }

    /// Whether the topic has replicators or replicated subscriptions (it needs the sync task).
    pub(crate) fn needs_subscription_sync(&self) -> bool {
        !self.lock().replicators.is_empty()
            || self.log.cursor_names().iter().any(|name| {
                self.log
                    .cursor(name)
                    .is_some_and(|cursor| replicated_subscriptions::is_replicated(&cursor))
            })
    }

    /// The remote clusters this topic's replicators send to now.
    pub(crate) fn replication_remotes_running(&self) -> Vec<RemoteCluster> {
        self.lock()
            .replicators
            .values()
            .map(|replicator| replicator.remote().clone())
            .collect()
    }

    /// The clients of remote clusters the broker's replicators share (the subscription sync
    /// sends states on them too).
    pub(crate) fn remote_clients(&self) -> Arc<crate::replication::remote::RemoteClients> {
        self.shared.remote_clients.clone()
    }

    /// The registered cluster `name` (not this one), whether or not this topic replicates to it.
    pub(crate) fn registered_cluster(&self, name: &str) -> Option<RemoteCluster> {
        self.lock()
            .registered_clusters
            .iter()
            .find(|cluster| cluster.name == name)
            .cloned()
    }

    /// Whether batch-index acknowledgements are kept (`acknowledgmentAtBatchIndexLevelEnabled`).
    pub(crate) fn batch_index_ack_enabled(&self) -> bool {
        self.shared.config.batch_index_ack_enabled
    }

    /// Whether any cluster but this one is registered.
    pub(crate) fn has_registered_clusters(&self) -> bool {
        !self.lock().registered_clusters.is_empty()
    }

    /// Deletes a subscription and its cursor; refused while other consumers are connected.
    pub fn unsubscribe(&self, subscription: &str, key: u64) -> Result<()> {
        let mut state = self.lock();
        let Some(existing) = state.subscriptions.get(subscription).cloned() else {
            return Err(BrokerError::SubscriptionNotFound {
                topic: self.full_name.clone(),
                subscription: subscription.to_string(),
            });
        };
        if existing.consumer_count() > 1 {
            return Err(BrokerError::ConsumerBusy(format!(
                "subscription {subscription} has other connected consumers"
            )));
        }
        existing.remove_consumer(key);
        self.drop_subscription(&mut state, subscription);
        Ok(())
    }

    /// Resets a subscription to a message id (delivery restarts at it) or to a publish time.
    pub fn seek(&self, subscription: &str, target: SeekTarget) -> Result<()> {
        let existing = self
            .lock()
            .subscriptions
            .get(subscription)
            .cloned()
            .ok_or_else(|| BrokerError::SubscriptionNotFound {
                topic: self.full_name.clone(),
                subscription: subscription.to_string(),
            })?;
        existing.seek(self.mark_delete_for(target)?)?;
        self.note_reset(subscription)
    }

    /// The mark-delete position that makes delivery (re)start at `target`: everything before a
    /// message id, or everything published before a time, counts as acknowledged.
    pub fn mark_delete_for(&self, target: SeekTarget) -> Result<Option<Position>> {
        Ok(match target {
            SeekTarget::Earliest => None,
            SeekTarget::Latest => self.log.last_position(),
            SeekTarget::Position(position) => {
                self.log.previous_position(self.position_here(position))
            }
            SeekTarget::PublishTime(time) => match self.log.find_by_publish_time(time)? {
                Some(position) => self.log.previous_position(position),
                None => self.log.last_position(),
            },
        })
    }

    /// A position a client sent, in this log: in cluster mode, one of an earlier copy of the
    /// topic (a message id from before a move) becomes this copy's position of the same entry.
    fn position_here(&self, position: Position) -> Position {
        crate::cluster::logs::position_in_copy(&self.log, self.copy_entry_ids, position)
    }

    /// The last entry's position and, if it is a batch, the index of its last message.
    pub fn last_message_id(&self) -> Result<Option<(Position, i32)>> {
        let Some(last) = self.log.last_position() else {
            return Ok(None);
        };
        let entry = self.log.read(last)?;
        let batch_index = match meridian_wire::entry_metadata(entry.data) {
            Ok(metadata) => match metadata.num_messages_in_batch {
                Some(count) => count.max(1) - 1,
                None => -1,
            },
            Err(_) => -1,
        };
        Ok(Some((last, batch_index)))
    }

    pub fn partition_index(&self) -> i32 {
        self.partition_index
    }

    /// Stops every dispatcher and persists the de-duplication snapshot.
    pub(crate) fn close(&self) {
        let replicators = std::mem::take(&mut self.lock().replicators);
        for replicator in replicators.values() {
            replicator.stop();
        }
        let subscriptions: Vec<Arc<Subscription>> =
            self.lock().subscriptions.drain().map(|(_, s)| s).collect();
        for subscription in subscriptions {
            subscription.stop();
            if !subscription.is_durable() {
                let _ = self.log.delete_cursor(subscription.cursor_name());
            }
        }
        let state = self.lock();
        if let Some(dedup) = &state.dedup {
            if let (Some(last), true) = (self.log.last_position(), state.in_flight.is_empty()) {
                let _ = self
                    .log
                    .set_cursor_properties(DEDUP_CURSOR, dedup.snapshot())
                    .and_then(|()| {
                        self.log
                            .acknowledge_cumulative(DEDUP_CURSOR, last)
                            .map(|_| ())
                    });
            }
        }
    }

    /// Names of the subscriptions (durable cursors), loaded or not.
    pub fn subscription_names(&self) -> Vec<String> {
        self.log
            .cursor_names()
            .into_iter()
            .filter(|name| !is_system_cursor(name) && !is_replicator_cursor(name))
            .collect()
    }

    pub fn subscription(&self, name: &str) -> Option<Arc<Subscription>> {
        self.lock().subscriptions.get(name).cloned()
    }

    pub fn producer_count(&self) -> usize {
        self.lock().producers.len()
    }

    pub fn subscription_type(&self, name: &str) -> Option<SubscriptionType> {
        self.subscription(name)
            .map(|subscription| subscription.kind())
    }
}

/// Where a seek moves a subscription.
#[derive(Debug, Clone, Copy)]
pub enum SeekTarget {
    Earliest,
    Latest,
    Position(Position),
    PublishTime(u64),
}

/// Rebuilds de-duplication state: the last snapshot, then every entry after it.
fn recover_dedup(log: &Arc<Log>) -> Result<Dedup> {
    let cursor = log.open_cursor(DEDUP_CURSOR, InitialPosition::Earliest)?;
    let mut dedup = Dedup::from_snapshot(&cursor.properties);
    let mut next = match cursor.mark_delete {
        Some(position) => log.next_position(position),
        None => match log.first_position() {
            Some(first) => first,
            None => return Ok(dedup),
        },
    };
    loop {
        let entries = log.read_from(next, 1000, 16 * 1024 * 1024)?;
        let Some(last) = entries.last().map(|entry| entry.position) else {
            break;
        };
        for entry in entries {
            let Ok(metadata) = meridian_wire::entry_metadata(entry.data) else {
                continue;
            };
            if let Some(origin) = crate::replication::chain::origin_of(&metadata) {
                dedup.persisted(
                    &replication_key(&origin.cluster),
                    position_sequence(origin.position.ledger_id, origin.position.entry_id),
                );
                if let Some((key, highest)) = origin.learned {
                    dedup.persisted(&key, highest);
                }
                continue;
            }
            dedup.persisted(&metadata.producer_name, highest_sequence(&metadata));
        }
        next = log.next_position(last);
    }
    Ok(dedup)
}

/// Storage retention from Pulsar's retention policies (-1 unlimited; none set: keep nothing
/// that every cursor acknowledged).
fn close_producer(producer_id: u64) -> BaseCommand {
    BaseCommand {
        r#type: base_command::Type::CloseProducer as i32,
        close_producer: Some(Box::new(CommandCloseProducer {
            producer_id,
            request_id: 0,
            ..CommandCloseProducer::default()
        })),
        ..BaseCommand::default()
    }
}

/// PIP-188's TOPIC_MIGRATED: the producer or consumer `resource_id` is to reconnect at
/// `broker_service_url`.
pub(crate) fn topic_migrated(
    resource_id: u64,
    resource_type: command_topic_migrated::ResourceType,
    broker_service_url: &str,
) -> BaseCommand {
    BaseCommand {
        r#type: base_command::Type::TopicMigrated as i32,
        topic_migrated: Some(Box::new(CommandTopicMigrated {
            resource_id,
            resource_type: resource_type as i32,
            broker_service_url: Some(broker_service_url.to_string()),
            broker_service_url_tls: None,
        })),
        ..BaseCommand::default()
    }
}

pub fn retention_of(policies: Option<RetentionPolicies>) -> meridian_storage::Retention {
    let Some(policies) = policies else {
        return meridian_storage::Retention::default();
    };
    meridian_storage::Retention {
        time: (policies.retention_time_in_minutes >= 0).then(|| {
            std::time::Duration::from_secs(policies.retention_time_in_minutes as u64 * 60)
        }),
        size_bytes: (policies.retention_size_in_mb >= 0)
            .then(|| policies.retention_size_in_mb as u64 * 1024 * 1024),
    }
}

fn format_position(position: Option<Position>) -> String {
    match position {
        Some(position) => format!("{}:{}", position.ledger_id, position.entry_id),
        None => "-1:-1".to_string(),
    }
}

/// What a backlog-quota check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaBreach {
    pub policy: BacklogQuotaPolicy,
    pub by_size: bool,
}

impl Topic {
    pub fn is_terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }

    /// Terminates the topic: no more messages are accepted, producers are closed, and
    /// consumers are told once they have read everything. Returns the last message's position.
    /// The caller persists the termination.
    pub fn terminate(&self) -> Option<Position> {
        self.terminated.store(true, Ordering::SeqCst);
        self.close_producers();
        for subscription in self.lock().subscriptions.values() {
            subscription.wake();
        }
        self.log.last_position()
    }

    pub fn deduplication_enabled(&self) -> bool {
        self.deduplication
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Durable cursors that count for backlog: subscriptions (and, later, replicators).
    fn backlog_cursors(&self) -> Vec<String> {
        self.log
            .cursor_names()
            .into_iter()
            .filter(|name| !is_system_cursor(name))
            .collect()
    }

    /// Whether the topic's backlog exceeds a quota, and which policy applies.
    pub fn backlog_quota_breach(&self, policies: &EffectivePolicies) -> Option<QuotaBreach> {
        let cursors = self.backlog_cursors();
        if let Some(quota) = policies.backlog_quotas.get("destination_storage") {
            if quota.limit_size >= 0 {
                let largest = cursors
                    .iter()
                    .filter_map(|cursor| self.log.mark_delete_position(cursor))
                    .map(|mark_delete| self.log.bytes_after(mark_delete))
                    .max()
                    .unwrap_or(0);
                if largest > quota.limit_size as u64 {
                    return Some(QuotaBreach {
                        policy: quota.policy,
                        by_size: true,
                    });
                }
            }
        }
        if let Some(quota) = policies.backlog_quotas.get("message_age") {
            if quota.limit_time >= 0 {
                let oldest = self.oldest_unacknowledged_publish_time(&cursors);
                if oldest.is_some_and(|time| {
                    now_ms().saturating_sub(time) > quota.limit_time as u64 * 1000
                }) {
                    return Some(QuotaBreach {
                        policy: quota.policy,
                        by_size: false,
                    });
                }
            }
        }
        None
    }

    fn oldest_unacknowledged_publish_time(&self, cursors: &[String]) -> Option<u64> {
        cursors
            .iter()
            .filter_map(|cursor| {
                let mark_delete = self.log.mark_delete_position(cursor)?;
                let next = match mark_delete {
                    Some(position) => self.log.next_position(position),
                    None => self.log.first_position()?,
                };
                self.log.read(next).ok().map(|entry| entry.publish_time_ms)
            })
            .min()
    }

    /// The error a producer gets while a quota with a producer policy is exceeded.
    pub fn quota_error(&self, breach: QuotaBreach) -> Option<BrokerError> {
        let what = if breach.by_size { "size" } else { "time" };
        let message = format!(
            "backlog quota ({what}) exceeded on topic {}",
            self.full_name
        );
        match breach.policy {
            BacklogQuotaPolicy::ProducerRequestHold => {
                Some(BrokerError::ProducerBlockedQuotaExceededError(message))
            }
            BacklogQuotaPolicy::ProducerException => {
                Some(BrokerError::ProducerBlockedQuotaExceededException(message))
            }
            BacklogQuotaPolicy::ConsumerBacklogEviction => None,
        }
    }

    /// Applies time- and quota-based policies: TTL expiry, backlog quotas (disconnecting
    /// producers or evicting backlog), retention.
    pub fn enforce_policies(&self, policies: &EffectivePolicies) {
        self.log.set_retention(retention_of(policies.retention));
        self.set_sync_interval(policies);
        if let Some(ttl) = policies.message_ttl_seconds.filter(|ttl| *ttl > 0) {
            self.expire_older_than(now_ms().saturating_sub(ttl as u64 * 1000));
        }
        let Some(breach) = self.backlog_quota_breach(policies) else {
            return;
        };
        match breach.policy {
            BacklogQuotaPolicy::ConsumerBacklogEviction => {
                if breach.by_size {
                    if let Some(quota) = policies.backlog_quotas.get("destination_storage") {
                        self.evict_to_size(quota.limit_size.max(0) as u64 * 9 / 10);
                    }
                } else if let Some(quota) = policies.backlog_quotas.get("message_age") {
                    self.expire_older_than(
                        now_ms().saturating_sub(quota.limit_time.max(0) as u64 * 1000),
                    );
                }
            }
            BacklogQuotaPolicy::ProducerRequestHold | BacklogQuotaPolicy::ProducerException => {
                tracing::info!(topic = %self.full_name, ?breach, "backlog quota exceeded; disconnecting producers");
                self.close_producers();
            }
        }
    }

    /// Acknowledges, on every subscription, the messages published before `cutoff_ms`.
    pub fn expire_older_than(&self, cutoff_ms: u64) {
        let last_expired = match self.mark_delete_for(SeekTarget::PublishTime(cutoff_ms)) {
            Ok(last_expired) => last_expired,
            Err(error) => {
                tracing::warn!(topic = %self.full_name, %error, "message expiry failed");
                return;
            }
        };
        let Some(last_expired) = last_expired else {
            return;
        };
        for cursor in self.backlog_cursors() {
            self.advance_cursor(&cursor, last_expired);
        }
    }

    /// Acknowledges, on one subscription, the messages published before `cutoff_ms` (the admin
    /// API's expire-messages).
    pub fn expire_subscription(&self, subscription: &str, cutoff_ms: u64) -> Result<()> {
        if is_system_cursor(subscription) || self.log.cursor(subscription).is_none() {
            return Err(BrokerError::NotFound(format!(
                "subscription {subscription} does not exist on {}",
                self.full_name
            )));
        }
        if let Some(last_expired) = self.mark_delete_for(SeekTarget::PublishTime(cutoff_ms))? {
            self.advance_cursor(subscription, last_expired);
        }
        Ok(())
    }

    /// Moves every cursor forward until its backlog is at most `target_bytes`.
    fn evict_to_size(&self, target_bytes: u64) {
        for cursor in self.backlog_cursors() {
            while let Some(mark_delete) = self.log.mark_delete_position(&cursor) {
                if self.log.bytes_after(mark_delete) <= target_bytes {
                    break;
                }
                let next = match mark_delete {
                    Some(position) => self.log.next_position(position),
                    None => match self.log.first_position() {
                        Some(first) => first,
                        None => break,
                    },
                };
                let Ok(entries) = self.log.read_from(next, 100, usize::MAX) else {
                    break;
                };
                let Some(last) = entries.last() else {
                    break;
                };
                self.advance_cursor(&cursor, last.position);
            }
        }
    }

    fn advance_cursor(&self, cursor: &str, to: Position) {
        let before = self.log.mark_delete_position(cursor).flatten();
        if before.is_some_and(|before| before >= to) {
            return;
        }
        let backlog_before = self.log.backlog_entries(cursor).unwrap_or(0);
        if let Err(error) = self.log.acknowledge_cumulative(cursor, to) {
            tracing::warn!(topic = %self.full_name, cursor, %error, "advancing cursor failed");
            return;
        }
        let expired = backlog_before.saturating_sub(self.log.backlog_entries(cursor).unwrap_or(0));
        if expired > 0 && is_replicator_cursor(cursor) {
            // The remote will never get these: a policy skipped them, never silently.
            tracing::warn!(topic = %self.full_name, cursor, expired, through = %to, "replication backlog expired by policy (message TTL or backlog quota); the remote will not receive these entries");
        }
        *self.lock().expired.entry(cursor.to_string()).or_insert(0) += expired;
    }

    /// Sends CLOSE_PRODUCER to every producer; the clients reconnect (and meet the quota or
    /// the reloaded topic).
    pub fn close_producers(&self) {
        let mut state = self.lock();
        for (_, producer) in state.producers.drain() {
            producer.closed.store(true, Ordering::SeqCst);
            let _ = producer
                .sink
                .try_send(command_frame(&close_producer(producer.producer_id)));
        }
        // A producer waiting for exclusive access is told too: it would wait forever.
        for waiting in state.waiting_for_exclusive.drain(..) {
            waiting.entry.closed.store(true, Ordering::SeqCst);
            let _ = waiting
                .entry
                .sink
                .try_send(command_frame(&close_producer(waiting.entry.producer_id)));
        }
    }

    /// Tenant migration fence (`crate::migration`): the SENDs of this topic's producers are
    /// dropped from now on, unanswered (their clients resend them where they reconnect);
    /// replicators keep writing. Returns how many producers it fenced now (not fenced before).
    pub(crate) fn fence_producers(&self) -> usize {
        let state = self.lock();
        state
            .producers
            .values()
            .chain(
                state
                    .waiting_for_exclusive
                    .iter()
                    .map(|waiting| &waiting.entry),
            )
            .filter(|producer| {
                !is_replication_key(&producer.name) && !producer.closed.swap(true, Ordering::SeqCst)
            })
            .count()
    }

    /// Tells this topic's producers (not replicators) to move to `broker_service_url`:
    /// TOPIC_MIGRATED to clients of protocol 20 or later, then CLOSE_PRODUCER to every one.
    pub(crate) fn migrate_producers(&self, broker_service_url: &str) {
        let mut state = self.lock();
        let moving: Vec<u64> = state
            .producers
            .iter()
            .filter(|(_, producer)| !is_replication_key(&producer.name))
            .map(|(key, _)| *key)
            .collect();
        // Producers waiting for exclusive access move too (they would wait here forever).
        let (waiting, kept): (Vec<Waiting>, Vec<Waiting>) = state
            .waiting_for_exclusive
            .drain(..)
            .partition(|waiting| !is_replication_key(&waiting.entry.name));
        state.waiting_for_exclusive.extend(kept);
        let removed = moving
            .into_iter()
            .filter_map(|key| state.producers.remove(&key))
            .chain(waiting.into_iter().map(|waiting| waiting.entry));
        for producer in removed {
            producer.closed.store(true, Ordering::SeqCst);
            if producer.protocol_version >= 20 {
                let _ = producer.sink.try_send(command_frame(&topic_migrated(
                    producer.producer_id,
                    command_topic_migrated::ResourceType::Producer,
                    broker_service_url,
                )));
            }
            let _ = producer
                .sink
                .try_send(command_frame(&close_producer(producer.producer_id)));
        }
    }

    /// The producers (not replicators) and consumers connected to this topic.
    pub(crate) fn client_counts(&self) -> (usize, usize) {
        let state = self.lock();
        let producers = state
            .producers
            .values()
            .filter(|producer| !is_replication_key(&producer.name))
            .count();
        let consumers = state
            .subscriptions
            .values()
            .map(|subscription| subscription.consumer_count())
            .sum();
        (producers, consumers)
    }

    /// The subscriptions of this topic.
    pub(crate) fn subscriptions(&self) -> Vec<Arc<Subscription>> {
        self.lock().subscriptions.values().cloned().collect()
    }

    /// Closes every producer and consumer (they reconnect) and stops dispatch: an unload.
    pub(crate) fn unload(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.close_producers();
        self.close();
    }

    pub fn has_clients(&self) -> bool {
        let state = self.lock();
        !state.producers.is_empty()
            || !state.waiting_for_exclusive.is_empty()
            || state
                .subscriptions
                .values()
                .any(|subscription| subscription.consumer_count() > 0)
    }

    pub(crate) fn sample_rates(&self) {
        self.meter_in.sample();
        let state = self.lock();
        for replicator in state.replicators.values() {
            replicator.sample_rates();
        }
        for producer in state.producers.values() {
            producer.meter.sample();
        }
        for subscription in state.subscriptions.values() {
            subscription.sample_rates();
        }
    }

    /// Messages and bytes published to the topic and dispatched from its subscriptions since
    /// it was loaded (counters, not rates): the load balancer's measure of its traffic.
    pub fn traffic(&self) -> Traffic {
        let state = self.lock();
        let mut traffic = Traffic {
            messages_in: self.meter_in.messages(),
            bytes_in: self.meter_in.bytes(),
            ..Traffic::default()
        };
        for subscription in state.subscriptions.values() {
            let (messages, bytes) = subscription.dispatched();
            traffic.messages_out += messages;
            traffic.bytes_out += bytes;
        }
        traffic
    }

    /// Pulsar's `TopicStats`.
    pub fn stats(&self, policies: &EffectivePolicies) -> TopicStats {
        let (msg_rate_in, msg_throughput_in) = self.meter_in.rates();
        let state = self.lock();
        let publishers = state
            .producers
            .values()
            .map(|producer| {
                let (rate, throughput) = producer.meter.rates();
                PublisherStats {
                    producer_id: producer.producer_id,
                    producer_name: producer.name.clone(),
                    msg_rate_in: rate,
                    msg_throughput_in: throughput,
                    average_msg_size: if rate > 0.0 { throughput / rate } else { 0.0 },
                    address: producer.address.clone(),
                    connected_since: producer.connected_since.clone(),
                    client_version: producer.client_version.clone(),
                    access_mode: format!("{:?}", producer.mode),
                    metadata: BTreeMap::new(),
                }
            })
            .collect();
        let mut subscriptions = BTreeMap::new();
        let mut totals_out = (0.0, 0.0, 0u64, 0u64);
        let mut backlog_size = 0u64;
        for cursor in self.backlog_cursors() {
            let mark_delete = self.log.mark_delete_position(&cursor).flatten();
            let backlog_bytes = self.log.bytes_after(mark_delete);
            backlog_size = backlog_size.max(backlog_bytes);
            if is_replicator_cursor(&cursor) {
                continue;
            }
            let mut subscription_stats = match state.subscriptions.get(&cursor) {
                Some(subscription) => subscription.stats(),
                None => SubscriptionStats {
                    kind: "Exclusive".into(),
                    is_durable: true,
                    ..SubscriptionStats::default()
                },
            };
            let cursor_state = self.log.cursor(&cursor);
            subscription_stats.msg_backlog = self.log.backlog_entries(&cursor).unwrap_or(0);
            subscription_stats.msg_backlog_no_delayed = subscription_stats
                .msg_backlog
                .saturating_sub(subscription_stats.msg_delayed);
            subscription_stats.backlog_size = backlog_bytes;
            subscription_stats.total_msg_expired = state.expired.get(&cursor).copied().unwrap_or(0);
            subscription_stats.is_replicated = cursor_state
                .as_ref()
                .is_some_and(replicated_subscriptions::is_replicated);
            if let (true, Some(sync), Some(state)) = (
                subscription_stats.is_replicated,
                self.subscription_sync.get(),
                cursor_state.as_ref(),
            ) {
                subscription_stats.replicated_subscription_sync = sync.stats(&cursor, state);
            }
            subscription_stats.non_contiguous_deleted_messages_ranges = cursor_state
                .map(|cursor| cursor.acknowledged.range_count() as u64)
                .unwrap_or(0);
            totals_out.0 += subscription_stats.msg_rate_out;
            totals_out.1 += subscription_stats.msg_throughput_out;
            totals_out.2 += subscription_stats.msg_out_counter;
            totals_out.3 += subscription_stats.bytes_out_counter;
            subscriptions.insert(cursor, subscription_stats);
        }
        let quota = policies.backlog_quotas.get("destination_storage");
        let age_quota = policies.backlog_quotas.get("message_age");
        TopicStats {
            msg_rate_in,
            msg_throughput_in,
            msg_rate_out: totals_out.0,
            msg_throughput_out: totals_out.1,
            bytes_in_counter: self.meter_in.bytes(),
            msg_in_counter: self.meter_in.messages(),
            bytes_out_counter: totals_out.3,
            msg_out_counter: totals_out.2,
            average_msg_size: if msg_rate_in > 0.0 {
                msg_throughput_in / msg_rate_in
            } else {
                0.0
            },
            storage_size: self.log.stats().storage_bytes,
            backlog_size,
            offloaded_storage_size: 0,
            backlog_quota_limit_size: quota.map_or(-1, |quota| quota.limit_size),
            backlog_quota_limit_time: age_quota.map_or(-1, |quota| quota.limit_time),
            deduplication_status: if self.deduplication {
                "Enabled"
            } else {
                "Disabled"
            }
            .into(),
            publishers,
            waiting_publishers: state.waiting_for_exclusive.len() as u64,
            subscriptions,
            replication: self.replication_stats(&state),
        }
    }

    /// Per remote cluster: what this topic's replicator sends there and what that cluster's
    /// replicator producer brings here.
    fn replication_stats(&self, state: &TopicState) -> BTreeMap<String, ReplicatorStats> {
        let mut replication: BTreeMap<String, ReplicatorStats> = state
            .replicators
            .iter()
            .map(|(remote, replicator)| (remote.clone(), replicator.stats()))
            .collect();
        for producer in state.producers.values() {
            // As in Pulsar, the inbound side is shown for clusters this topic also replicates to.
            let Some(stats) = replicator::source_cluster(&producer.name)
                .and_then(|source| replication.get_mut(source))
            else {
                continue;
            };
            let (rate, throughput) = producer.meter.rates();
            stats.msg_rate_in += rate;
            stats.msg_throughput_in += throughput;
            stats.msg_in_count += producer.meter.messages();
            stats.bytes_in_count += producer.meter.bytes();
            stats.inbound_connection = Some(producer.address.clone());
            stats.inbound_connected_since = Some(producer.connected_since.clone());
        }
        replication
    }

    /// Starts and stops replicators to match `remotes` (the clusters this topic replicates to
    /// now). A cluster no longer `configured` for replication loses its cursor; one that is
    /// configured but cannot be reached keeps it, and its backlog.
    pub(crate) fn set_replication(&self, plan: ReplicationPlan) -> Result<()> {
        let mut state = self.lock();
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        state.registered_clusters = plan.registered;
        let wanted: BTreeMap<String, RemoteCluster> = plan
            .remotes
            .into_iter()
            .map(|remote| (remote.name.clone(), remote))
            .collect();
        let stale: Vec<String> = state
            .replicators
            .iter()
            .filter(|(name, replicator)| wanted.get(*name) != Some(replicator.remote()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(replicator) = state.replicators.remove(&name) {
                replicator.stop();
                tracing::info!(topic = %self.full_name, remote = %name, "replicator removed");
            }
        }
        for cursor in self.log.cursor_names() {
            let Some(remote) = cursor.strip_prefix(crate::dedup::REPLICATOR_PREFIX) else {
                continue;
            };
            if !plan.configured.iter().any(|name| name == remote) {
                self.log.delete_cursor(&cursor)?;
            }
        }
        for (name, remote) in wanted {
            if let Some(existing) = state.replicators.get(&name) {
                existing.set_rate(plan.rate.clone());
                continue;
            }
            let cursor = replicator::cursor_name(&name);
            if self.log.cursor(&cursor).is_none() {
                let initial = if plan.start_at_earliest || plan.earliest_remotes.contains(&name) {
                    InitialPosition::Earliest
                } else {
                    InitialPosition::Latest
                };
                self.log.open_cursor(&cursor, initial)?;
                // Where replication starts must survive a crash right after this.
                self.log.persist_cursors()?;
            }
            tracing::info!(topic = %self.full_name, remote = %name, "replicator added");
            let replicator = Replicator::start(ReplicatorSpec {
                topic: self.name.clone(),
                log: self.log.clone(),
                local_cluster: self.shared.config.cluster_name.clone(),
                remote,
                partitions: plan.partitions,
                rate: plan.rate.clone(),
                clients: self.shared.remote_clients.clone(),
            });
            state.replicators.insert(name, replicator);
        }
        Ok(())
    }

    /// How far replication to `remote` is: `None` while the topic has no replicator to it.
    /// The backlog is exact (the replication cursor's), not the backlog task's last count.
    pub(crate) fn replication_progress(
        &self,
        remote: &str,
    ) -> Option<crate::migration::ReplicationProgress> {
        let connected = self.lock().replicators.get(remote)?.stats().connected;
        let cursor = replicator::cursor_name(remote);
        let mark_delete = self.log.mark_delete_position(&cursor)?;
        Some(crate::migration::ReplicationProgress {
            connected,
            backlog_entries: self.log.backlog_entries(&cursor).unwrap_or(0),
            backlog_bytes: self.log.bytes_after(mark_delete),
        })
    }

    /// The durable subscriptions (not replication cursors), each with whether it is
    /// replicated and whether its latest state has reached `remote` (something sent, nothing
    /// waiting to be sent).
    /// `lag`: how long the state may have been changing since the remote last confirmed one
    /// (consumers still acknowledging) for the subscription to count as synced.
    pub(crate) fn subscriptions_synced_to(
        &self,
        remote: &str,
        lag: std::time::Duration,
    ) -> Vec<(String, bool, bool)> {
        let lag_ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
        self.backlog_cursors()
            .into_iter()
            .filter(|cursor| !is_replicator_cursor(cursor))
            .map(|name| {
                let state = self.log.cursor(&name);
                let replicated = state
                    .as_ref()
                    .is_some_and(replicated_subscriptions::is_replicated);
                let synced = match (replicated, self.subscription_sync.get(), state.as_ref()) {
                    (true, Some(sync), Some(state)) => {
                        sync.stats(&name, state).get(remote).is_some_and(|stats| {
                            stats.last_sent_timestamp.is_some() && stats.unsent_for_ms <= lag_ms
                        })
                    }
                    _ => false,
                };
                (name, replicated, synced)
            })
            .collect()
    }

    /// Pulsar's `PersistentTopicInternalStats`.
    pub fn internal_stats(&self) -> stats::InternalStats {
        let ledgers: Vec<stats::LedgerInfo> = self
            .log
            .ledgers()
            .into_iter()
            .map(|(ledger_id, entries, size)| stats::LedgerInfo {
                ledger_id,
                entries,
                size,
                offloaded: false,
            })
            .collect();
        let current_ledger = self.log.current_ledger_id();
        let current = ledgers
            .iter()
            .find(|ledger| ledger.ledger_id == current_ledger);
        let mut cursors = BTreeMap::new();
        let loaded: Vec<String> = self.lock().subscriptions.keys().cloned().collect();
        for name in self.log.cursor_names() {
            let Some(cursor) = self.log.cursor(&name) else {
                continue;
            };
            let ranges: Vec<String> = cursor
                .acknowledged
                .iter()
                .map(|(ledger, first, last)| {
                    format!("({ledger}:{}..{ledger}:{last}]", first.saturating_sub(1))
                })
                .collect();
            let read_position = match cursor.mark_delete {
                Some(position) => self.log.next_position(position),
                None => self
                    .log
                    .first_position()
                    .unwrap_or_else(|| self.log.end_position()),
            };
            cursors.insert(
                name.clone(),
                stats::CursorStats {
                    mark_delete_position: format_position(cursor.mark_delete),
                    read_position: format_position(Some(read_position)),
                    messages_consumed_counter: 0,
                    individually_deleted_messages: format!("[{}]", ranges.join(", ")),
                    total_non_contiguous_deleted_messages_range: ranges.len() as u64,
                    properties: cursor.properties.clone(),
                    state: "Open".into(),
                    active: loaded.contains(&name),
                },
            );
        }
        let stats = self.log.stats();
        stats::InternalStats {
            entries_added_counter: self.entries_added.load(Ordering::Relaxed),
            // Durable entries only, as `lastConfirmedEntry` (Pulsar counts an entry once its add
            // completed): a client that sees N entries and subscribes at Latest is past all N.
            number_of_entries: self.log.entries_after(None),
            total_size: stats.storage_bytes,
            current_ledger_entries: current.map_or(0, |ledger| ledger.entries),
            current_ledger_size: current.map_or(0, |ledger| ledger.size),
            last_confirmed_entry: format_position(self.log.last_position()),
            state: if self.is_closed() {
                "Closed"
            } else {
                "LedgerOpened"
            }
            .into(),
            pending_add_entries_count: stats
                .entries_appended
                .saturating_sub(self.entries_added.load(Ordering::Relaxed)),
            ledgers,
            cursors,
        }
    }

    /// Creates a durable subscription at a position (the admin API's create-subscription).
    pub fn create_subscription(
        &self,
        name: &str,
        mark_delete: Option<Option<Position>>,
    ) -> Result<()> {
        if let Err(reason) = check_subscription_name(name) {
            return Err(BrokerError::PreconditionFailed(reason));
        }
        if self.log.cursor(name).is_some() {
            return Err(BrokerError::AlreadyExists(format!(
                "subscription {name} already exists"
            )));
        }
        self.log.open_cursor(name, InitialPosition::Latest)?;
        if let Some(mark_delete) = mark_delete {
            self.log.reset_cursor(name, mark_delete)?;
        }
        Ok(())
    }

    /// Deletes a subscription; refused while it has consumers unless `force`.
    pub fn delete_subscription(&self, name: &str, force: bool) -> Result<()> {
        if self.log.cursor(name).is_none() || is_system_cursor(name) || is_replicator_cursor(name) {
            return Err(BrokerError::NotFound(format!(
                "subscription {name} does not exist on {}",
                self.full_name
            )));
        }
        let mut state = self.lock();
        if let Some(subscription) = state.subscriptions.get(name).cloned() {
            if subscription.consumer_count() > 0 && !force {
                return Err(BrokerError::PreconditionFailed(format!(
                    "subscription {name} has active consumers"
                )));
            }
            state.subscriptions.remove(name);
            subscription.stop();
        }
        drop(state);
        self.log.delete_cursor(name)?;
        Ok(())
    }

    /// Moves a subscription's mark-delete position (reset-cursor, skip); connected consumers
    /// are disconnected so they restart from the new position. A replicated subscription's other
    /// clusters follow.
    pub fn reset_subscription(&self, name: &str, mark_delete: Option<Position>) -> Result<()> {
        if is_replicator_cursor(name) {
            return self.reset_subscription_here(name, mark_delete);
        }
        // The move and the note of it under one lock: a replicated-subscription state applied
        // between the two (it acknowledges under this lock, and only while the states it read
        // are still held) would acknowledge again part of what the move made unacknowledged.
        let _properties = self.lock_cursor_properties();
        self.reset_subscription_here(name, mark_delete)?;
        self.note_reset(name)
    }

    /// Records that a replicated subscription was moved back by a user here (seek, reset), so
    /// that its other clusters reset their copies too instead of adding acknowledgements up.
    /// Partial batch acknowledgements are dropped: those batches are delivered again whole.
    /// The caller holds the cursor-properties lock.
    fn note_reset(&self, subscription: &str) -> Result<()> {
        crate::batch_acks::clear(&self.log, subscription)?;
        let Some(cursor) = self.log.cursor(subscription) else {
            return Ok(());
        };
        if !replicated_subscriptions::is_replicated(&cursor) {
            return Ok(());
        }
        let mut properties = cursor.properties;
        replicated_subscriptions::note_reset(&mut properties);
        self.log.set_cursor_properties(subscription, properties)?;
        if let Some(loaded) = self.subscription(subscription) {
            loaded.set_acknowledged_elsewhere(Vec::new());
        }
        Ok(())
    }

    /// [`Topic::reset_subscription`] without telling other clusters (it follows one of theirs).
    pub(crate) fn reset_subscription_here(
        &self,
        name: &str,
        mark_delete: Option<Position>,
    ) -> Result<()> {
        if self.log.cursor(name).is_none() || is_system_cursor(name) {
            return Err(BrokerError::NotFound(format!(
                "subscription {name} does not exist on {}",
                self.full_name
            )));
        }
        if is_replicator_cursor(name) {
            let state = self.lock();
            let replicator = state
                .replicators
                .values()
                .find(|replicator| replicator.cursor() == name);
            return Ok(replicator::reset_cursor(
                &self.log,
                replicator,
                name,
                mark_delete,
            )?);
        }
        match self.subscription(name) {
            Some(subscription) => subscription.seek(mark_delete),
            None => Ok(self.log.reset_cursor(name, mark_delete)?),
        }
    }
}
