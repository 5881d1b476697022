//! Geo-replication: one replicator per topic (or partition) per remote cluster.
//!
//! A replicator reads the topic through its durable cursor `pulsar.repl.<remote>` and publishes
//! every locally produced entry to the same topic on the remote cluster, with Meridian's own
//! client, as a producer named `pulsar.repl.<local>--><remote>` (all replicators to one remote
//! share one client, `RemoteClients`, so one connection per remote broker):
//!
//! - an entry is sent whole and unchanged (a batch stays one batch, compression, keys,
//!   properties, producer name, sequence id and publish time are kept), with `replicated_from`
//!   set to the local cluster and the properties naming its origin position and the previous
//!   link of the chain (`crate::replication::chain`);
//! - entries that came from another cluster (`replicated_from` set), entries whose
//!   `replicate_to` list leaves this remote out, and markers are acknowledged and skipped, so a
//!   full mesh has no loops;
//! - the source entry is acknowledged when the remote's receipt arrives, so the cursor's
//!   mark-delete follows what the remote has made durable, and the backlog of an unreachable
//!   remote stays on disk: at most [`MAX_IN_FLIGHT_ENTRIES`] entries (and
//!   [`MAX_IN_FLIGHT_BYTES`]) are read ahead, and all replicators together stay within one
//!   memory bound, shared fairly between remote clusters (`crate::replication::memory`);
//! - the remote de-duplicates by origin position (see `dedup.rs`) and stores a new entry only
//!   if it continues the chain; it closes a replicator's producer on any failed send, and the
//!   replicator's producer sends nothing after a failed entry (`stop_on_failure`): the next
//!   session resends from the cursor, in order. So rewinds, reconnections and restarts on
//!   either side never store a second copy, and a gap is refused, never acknowledged;
//! - an entry the remote refuses for good (too large, a gap, a terminated topic), or a remote
//!   that refuses the producer itself for good, stops this replicator (`Stopped: ...`), retried
//!   every 10 s; every wait on the remote is bounded and ends on stop;
//! - before producing, the replicator makes the remote topic exist with the same partition
//!   count (through the remote's admin API). A mismatch stops that replicator with a clear
//!   status instead of replicating into the wrong shape;
//! - failures back off from 100 ms to 10 s (reset once the remote confirmed something) and
//!   retry; an optional rate limit (`replicatorDispatchRate`) caps messages and bytes per
//!   period;
//! - stats count what the remote stored (`msgOutCount`, each entry once) and what it still has
//!   to store (`replicationBacklog`, `replicationDelayInSeconds`: a small task per replicator
//!   counts them with `crate::replication::backlog`, so stats never read storage).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meridian_client::{Client, ConnectionWatch, MessageId, Producer, ProducerMessage, SendReceipt};
use meridian_storage::{Entry, Log, Position};
use meridian_wire::proto::KeyValue;
use meridian_wire::ServerError;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::clock::{now_ms, now_rfc3339};
use crate::replication::backlog::{meant_for, BacklogIndex};
pub(crate) use crate::replication::chain::check_chain;
use crate::replication::chain::{
    format_position, is_replication_property, origin_position, parse_position,
};
pub use crate::replication::chain::{
    gap_message, origin_of, without_origin, Origin, CHAIN_CURSOR_PROPERTY, ORIGIN_PROPERTY,
    PREVIOUS_PROPERTY,
};
use crate::replication::memory::{Held, RemoteShare};
use crate::replication::remote::{
    prepare_remote_topic, Prepare, RemoteClients, RemoteCluster, BACKOFF_INITIAL, BACKOFF_MAX,
};
use crate::resources::DispatchRate;
use crate::stats::{Meter, ReplicatorStats};
use crate::topic_name::TopicName;

/// Entries sent and not yet confirmed, per replicator (Pulsar's `replicationProducerQueueSize`).
pub const MAX_IN_FLIGHT_ENTRIES: usize = 1000;
/// Bytes sent and not yet confirmed, per replicator.
pub const MAX_IN_FLIGHT_BYTES: usize = 16 * 1024 * 1024;
const READ_MAX_ENTRIES: usize = 100;
const READ_MAX_BYTES: usize = 4 * 1024 * 1024;
/// A send the remote has not answered this long fails, and the session starts again.
const SEND_TIMEOUT: Duration = Duration::from_secs(120);

/// The cursor of the replicator to `remote`.
pub fn cursor_name(remote: &str) -> String {
    format!("{}{remote}", crate::dedup::REPLICATOR_PREFIX)
}

/// The producer name a replicator from `local` to `remote` uses on the remote cluster.
pub fn producer_name(local: &str, remote: &str) -> String {
    format!("{}{local}-->{remote}", crate::dedup::REPLICATOR_PREFIX)
}

/// The cluster a replicator producer name says it replicates from.
pub fn source_cluster(producer_name: &str) -> Option<&str> {
    let rest = producer_name.strip_prefix(crate::dedup::REPLICATOR_PREFIX)?;
    Some(rest.split_once("-->").map_or(rest, |(source, _)| source))
}

/// What a running replicator shares with stats.
#[derive(Debug, Default)]
struct Status {
    /// The current session's producer connection, if a session runs.
    connection: Mutex<Option<ConnectionWatch>>,
    connected_since: Mutex<Option<String>>,
    /// What the remote still has to store (`backlog.rs`), kept by the backlog task.
    lacking_entries: AtomicU64,
    /// Publish time of the oldest entry the remote still has to store (0: none).
    oldest_lacking_publish_ms: AtomicU64,
    /// Wakes the backlog task: the cursor moved.
    cursor_moved: Notify,
    out: Meter,
    state: Mutex<String>,
}

impl Status {
    fn set_state(&self, state: impl Into<String>) {
        *self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = state.into();
    }

    /// A session's producer was created (`Some`) or closed (`None`).
    fn set_connection(&self, connection: Option<ConnectionWatch>) {
        *self
            .connected_since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            connection.is_some().then(now_rfc3339);
        *self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = connection;
    }

    /// Whether replication to the remote is connected now: a session runs and its producer
    /// is on a live connection (it reconnects by itself after a cut).
    fn is_connected(&self) -> bool {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_some_and(ConnectionWatch::is_connected)
    }
}

/// A running replicator; stops when dropped.
pub struct Replicator {
    remote: RemoteCluster,
    cursor: String,
    status: Arc<Status>,
    stop: watch::Sender<bool>,
    rate: watch::Sender<Option<DispatchRate>>,
    /// Bumped when an admin moves the cursor: the session starts again from there.
    resets: watch::Sender<u64>,
    /// Held while the cursor is read at a session's start, moved by an admin, or acknowledged
    /// with its chain property, so that these never interleave.
    cursor_lock: Arc<Mutex<()>>,
}

/// What a replicator needs to start.
pub(crate) struct ReplicatorSpec {
    pub topic: TopicName,
    pub log: Arc<Log>,
    pub local_cluster: String,
    pub remote: RemoteCluster,
    /// The partition count of the topic this partition belongs to (`None`: not partitioned).
    pub partitions: Option<u32>,
    pub rate: Option<DispatchRate>,
    pub clients: Arc<RemoteClients>,
}

impl Replicator {
    /// Starts replicating to `spec.remote`. The cursor already exists (the caller created it
    /// where replication starts).
    pub(crate) fn start(spec: ReplicatorSpec) -> Replicator {
        let (stop, stopped) = watch::channel(false);
        let (rate, rates) = watch::channel(spec.rate);
        let (resets, reset_seen) = watch::channel(0);
        let cursor_lock = Arc::new(Mutex::new(()));
        let status = Arc::new(Status::default());
        status.set_state("Starting");
        let cursor = cursor_name(&spec.remote.name);
        let worker = Worker {
            producer_name: producer_name(&spec.local_cluster, &spec.remote.name),
            cursor: cursor.clone(),
            topic: spec.topic,
            log: spec.log.clone(),
            local_cluster: spec.local_cluster,
            remote: spec.remote.clone(),
            partitions: spec.partitions,
            status: status.clone(),
            stopped,
            rates,
            throttle: Throttle::default(),
            chain: None,
            confirmed: false,
            counted_through: None,
            resets: reset_seen,
            cursor_lock: cursor_lock.clone(),
            memory: spec.clients.memory().join(&spec.remote.name),
            clients: spec.clients,
        };
        tokio::spawn(worker.run());
        tokio::spawn(count_backlog(
            spec.log,
            cursor.clone(),
            spec.remote.name.clone(),
            status.clone(),
            stop.subscribe(),
        ));
        Replicator {
            remote: spec.remote,
            cursor,
            status,
            stop,
            rate,
            resets,
            cursor_lock,
        }
    }

    /// The name of its cursor.
    pub fn cursor(&self) -> &str {
        &self.cursor
    }

    pub fn remote(&self) -> &RemoteCluster {
        &self.remote
    }

    /// Applies a new `replicatorDispatchRate` (None: unlimited).
    pub fn set_rate(&self, rate: Option<DispatchRate>) {
        self.rate.send_if_modified(|current| {
            let changed = *current != rate;
            *current = rate.clone();
            changed
        });
    }

    /// Stops the replicator (its producer closes; its cursor stays).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Out rates and backlog; the caller adds the inbound side.
    pub fn stats(&self) -> ReplicatorStats {
        let (msg_rate_out, msg_throughput_out) = self.status.out.rates();
        // What the remote still has to store (entries after the cursor that will be sent,
        // not those that will be skipped) and the age of the oldest of them, as the backlog
        // task last counted them: no storage read here, under the topic's lock.
        let lacking = self.status.lacking_entries.load(Ordering::Relaxed);
        let oldest = self
            .status
            .oldest_lacking_publish_ms
            .load(Ordering::Relaxed);
        let connected = self.status.is_connected();
        ReplicatorStats {
            msg_rate_out,
            msg_throughput_out,
            msg_out_count: self.status.out.messages(),
            bytes_out_count: self.status.out.bytes(),
            replication_backlog: lacking,
            connected,
            replication_delay_in_seconds: if oldest == 0 {
                0
            } else {
                now_ms().saturating_sub(oldest) / 1000
            },
            outbound_connection: connected.then(|| self.remote.broker_service_url.clone()),
            outbound_connected_since: self
                .status
                .connected_since
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            state: self
                .status
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            ..ReplicatorStats::default()
        }
    }

    /// Samples the out rates (the broker's stats loop calls this every few seconds).
    pub fn sample_rates(&self) {
        self.status.out.sample();
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Moves a replication cursor (admin `resetCursor` on `pulsar.repl.<remote>`) and
/// restarts its running replicator from there. The chain starts again too: the next entry sent
/// names no previous one, so moving the cursor is how an operator explicitly lets a remote
/// accept a gap (or resends what a remote lost).
pub(crate) fn reset_cursor(
    log: &Log,
    replicator: Option<&Replicator>,
    cursor: &str,
    mark_delete: Option<Position>,
) -> meridian_storage::Result<()> {
    let lock = replicator.map(|replicator| replicator.cursor_lock.clone());
    let _held = lock
        .as_ref()
        .map(|lock| lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    if let Some(replicator) = replicator {
        replicator.resets.send_modify(|resets| *resets += 1);
    }
    log.reset_cursor(cursor, mark_delete)?;
    if let Some(replicator) = replicator {
        replicator.status.cursor_moved.notify_one();
    }
    log.set_cursor_properties(cursor, BTreeMap::new())
}

/// The shortest time between two counts of the backlog: bursts of appends and
/// acknowledgements are counted together.
const BACKLOG_COUNT_INTERVAL: Duration = Duration::from_millis(500);
/// How often the backlog is counted anyway (cursor moves by an admin or a policy wake nobody).
const BACKLOG_COUNT_FALLBACK: Duration = Duration::from_secs(1);

/// Keeps `status`'s count of what the remote still has to store (`backlog.rs`) current: counts
/// again when entries are appended or the cursor moves, off the async runtime, until stopped.
async fn count_backlog(
    log: Arc<Log>,
    cursor: String,
    remote: String,
    status: Arc<Status>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut tail = log.watch_durable();
    let mut index = BacklogIndex::default();
    // The cursor position and log end last counted, so an idle topic costs nothing.
    let mut counted = None;
    loop {
        if *stopped.borrow_and_update() {
            return;
        }
        let now = (log.mark_delete_position(&cursor), log.last_position());
        if counted != Some(now) {
            let (log, remote) = (log.clone(), remote.clone());
            let work = tokio::task::spawn_blocking(move || {
                let backlog = now
                    .0
                    .map(|mark_delete| index.remote_backlog(&log, &remote, mark_delete));
                (index, backlog)
            });
            let Ok((returned, backlog)) = work.await else {
                return;
            };
            index = returned;
            let backlog = backlog.unwrap_or_default();
            status
                .lacking_entries
                .store(backlog.entries, Ordering::Relaxed);
            status.oldest_lacking_publish_ms.store(
                backlog.oldest_publish_time_ms.map_or(0, |ms| ms.max(1)),
                Ordering::Relaxed,
            );
            // A count that has not scanned everything yet goes on at once.
            counted = (!backlog.scanning).then_some(now);
            if backlog.scanning {
                continue;
            }
        }
        tokio::select! {
            _ = stopped.changed() => return,
            changed = tail.changed() => if changed.is_err() {
                return;
            },
            () = status.cursor_moved.notified() => {}
            () = tokio::time::sleep(BACKLOG_COUNT_FALLBACK) => {}
        }
        tokio::select! {
            _ = stopped.changed() => return,
            () = tokio::time::sleep(BACKLOG_COUNT_INTERVAL) => {}
        }
    }
}

/// Why a replication session ended.
enum Ended {
    Stopped,
    /// Retry after a backoff.
    Failed(String),
    /// Configuration that retrying cannot fix (a partition-count mismatch): wait for a change.
    Refused(String),
}

/// A fixed-window limiter of messages and bytes per period.
#[derive(Default)]
struct Throttle {
    window_start: Option<Instant>,
    messages: u64,
    bytes: u64,
}

impl Throttle {
    /// How long to wait before sending more under `rate` (None: go on).
    fn wait(&mut self, rate: Option<&DispatchRate>) -> Option<Duration> {
        let rate = rate?;
        let period = Duration::from_secs(u64::from(rate.rate_period_in_second.max(1)));
        let now = Instant::now();
        let start = *self.window_start.get_or_insert(now);
        if now >= start + period {
            self.window_start = Some(now);
            self.messages = 0;
            self.bytes = 0;
            return None;
        }
        let over_messages = rate.dispatch_throttling_rate_in_msg > 0
            && self.messages >= rate.dispatch_throttling_rate_in_msg as u64;
        let over_bytes = rate.dispatch_throttling_rate_in_byte > 0
            && self.bytes >= rate.dispatch_throttling_rate_in_byte as u64;
        (over_messages || over_bytes).then(|| start + period - now)
    }

    /// Messages and bytes the current period still allows (unlimited: `usize::MAX`).
    fn left(&self, rate: Option<&DispatchRate>) -> (usize, usize) {
        let left = |limit: i64, used: u64| {
            if limit > 0 {
                usize::try_from((limit as u64).saturating_sub(used).max(1)).unwrap_or(usize::MAX)
            } else {
                usize::MAX
            }
        };
        match rate {
            Some(rate) => (
                left(rate.dispatch_throttling_rate_in_msg, self.messages),
                left(rate.dispatch_throttling_rate_in_byte, self.bytes),
            ),
            None => (usize::MAX, usize::MAX),
        }
    }

    fn record(&mut self, messages: u64, bytes: u64) {
        self.messages += messages;
        self.bytes += bytes;
    }
}

/// One entry sent and not yet confirmed.
struct Sent {
    position: Position,
    messages: u64,
    bytes: usize,
    receipt: SendReceipt,
    /// Its share of the memory bound, released with it.
    _memory: Held,
}

/// One read: where it starts (moved past what was handled), the memory reserved for it, and
/// the memory the next read should wait for.
struct Read<'a> {
    next: &'a mut Position,
    budget: Held,
    wanted: usize,
}

/// A send the remote answered.
struct Confirmed {
    sent: Sent,
    /// False for a duplicate the remote already held (answered with the id -1:-1).
    stored: bool,
}

/// A send that failed: the entry and why.
struct SendFailure {
    position: Position,
    error: meridian_client::Error,
}

/// What to do with an entry read from the log.
enum Plan {
    Skip,
    Send {
        message: Box<ProducerMessage>,
        messages: u64,
    },
}

struct Worker {
    topic: TopicName,
    log: Arc<Log>,
    local_cluster: String,
    remote: RemoteCluster,
    partitions: Option<u32>,
    clients: Arc<RemoteClients>,
    cursor: String,
    producer_name: String,
    status: Arc<Status>,
    stopped: watch::Receiver<bool>,
    rates: watch::Receiver<Option<DispatchRate>>,
    throttle: Throttle,
    /// The origin position of the last entry sent in this session, or at its start the last
    /// one the remote confirmed (the cursor's chain property): the previous link of the next
    /// entry sent. `None`: the next entry starts a chain.
    chain: Option<Position>,
    /// The remote confirmed something since the last failure (resets the backoff).
    confirmed: bool,
    /// The last entry counted in `msgOutCount` (sent again, it is not counted again).
    counted_through: Option<Position>,
    resets: watch::Receiver<u64>,
    cursor_lock: Arc<Mutex<()>>,
    /// This replicator's access to the memory bound, within its remote's share.
    memory: RemoteShare,
}

impl Worker {
    async fn run(mut self) {
        let mut delay = BACKOFF_INITIAL;
        // Why the replicator is stopped, logged as an ERROR once, not at every retry.
        let mut stopped_for: Option<String> = None;
        // Why it keeps failing (a peer whose certificate is not trusted, a link down): logged
        // as a WARN when the reason changes, not at every retry; the stats show it meanwhile.
        let mut failing_for: Option<String> = None;
        let mut client: Option<Client> = None;
        let clients = self.clients.clone();
        loop {
            if *self.stopped.borrow() {
                break;
            }
            let ended = match &client {
                Some(client) => self.session(client).await,
                None => match clients.get(&self.remote).await {
                    Ok(created) => {
                        client = Some(created);
                        continue;
                    }
                    Err(error) => Ended::Refused(format!(
                        "invalid remote cluster URL or TLS settings: {error}"
                    )),
                },
            };
            self.status.set_connection(None);
            if std::mem::take(&mut self.confirmed) {
                // The remote confirmed something since the last failure: the next one is new.
                delay = BACKOFF_INITIAL;
                stopped_for = None;
                failing_for = None;
            }
            let wait = match ended {
                Ended::Stopped => break,
                Ended::Failed(reason) => {
                    if failing_for.as_ref() == Some(&reason) {
                        tracing::debug!(topic = %self.topic, remote = %self.remote.name, %reason, retry_in = ?delay, "replication still interrupted");
                    } else {
                        tracing::warn!(topic = %self.topic, remote = %self.remote.name, %reason, retry_in = ?delay, "replication interrupted");
                    }
                    self.status.set_state(format!("Disconnected: {reason}"));
                    failing_for = Some(reason);
                    let wait = delay;
                    delay = (delay * 2).min(BACKOFF_MAX);
                    wait
                }
                Ended::Refused(reason) => {
                    if stopped_for.as_ref() == Some(&reason) {
                        tracing::debug!(topic = %self.topic, remote = %self.remote.name, %reason, "replication still stopped");
                    } else {
                        tracing::error!(topic = %self.topic, remote = %self.remote.name, %reason, "replication stopped");
                    }
                    self.status.set_state(format!("Stopped: {reason}"));
                    stopped_for = Some(reason);
                    BACKOFF_MAX
                }
            };
            tokio::select! {
                _ = self.stopped.changed() => {}
                _ = self.resets.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        self.status.set_state("Stopped");
        tracing::debug!(topic = %self.topic, remote = %self.remote.name, "replicator stopped");
    }

    /// Runs `work` unless the replicator is stopped first (then `None`).
    async fn unless_stopped<T>(&mut self, work: impl Future<Output = T>) -> Option<T> {
        if *self.stopped.borrow_and_update() {
            return None;
        }
        tokio::select! {
            _ = self.stopped.changed() => None,
            done = work => Some(done),
        }
    }

    /// One connected session: prepare the remote topic, create the producer, replicate until
    /// stopped or something fails. Every wait on the remote is bounded and ends on stop.
    async fn session(&mut self, client: &Client) -> Ended {
        self.status.set_state("Connecting");
        if let Some(peer) = self.remote.peer() {
            let topic = self.topic.clone();
            let partitions = self.partitions;
            let prepare = tokio::task::spawn_blocking(move || {
                prepare_remote_topic(&peer, &topic, partitions)
            });
            match self.unless_stopped(prepare).await {
                None => return Ended::Stopped,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(Prepare::Mismatch(reason)))) => return Ended::Refused(reason),
                Some(Ok(Err(Prepare::Failed(reason)))) => return Ended::Failed(reason),
                Some(Err(error)) => return Ended::Failed(error.to_string()),
            }
        }
        // A failed send fails everything after it (`stop_on_failure`): nothing is sent past a
        // gap, and the session starts again from the cursor.
        let create = client
            .producer(self.topic.to_string())
            .name(self.producer_name.clone())
            .send_timeout(SEND_TIMEOUT)
            .stop_on_failure()
            .max_pending(MAX_IN_FLIGHT_ENTRIES)
            .create();
        let producer = match self.unless_stopped(create).await {
            None => return Ended::Stopped,
            Some(Ok(producer)) => producer,
            Some(Err(error)) => {
                let reason = format!("creating the remote producer failed: {error}");
                // A remote that refuses the producer itself for good (its topic terminated,
                // not allowed) stops the replicator as a refused entry does, not as a link
                // that is down.
                return if refused_for_good(&error) {
                    Ended::Refused(reason)
                } else {
                    Ended::Failed(reason)
                };
            }
        };
        self.status
            .set_connection(Some(producer.connection_watch()));
        self.status.set_state("Started");
        tracing::info!(topic = %self.topic, remote = %self.remote.name, "replicator started");
        let ended = self.replicate(&producer).await;
        // What is in flight is resent from the cursor by the next session: do not wait for it.
        // Closing on the remote (bounded by the operation timeout) finishes in the background
        // if the replicator is stopped meanwhile; otherwise the next session starts after it.
        let closing = tokio::spawn(async move { producer.close_now().await });
        let _ = self.unless_stopped(closing).await;
        ended
    }

    /// The read → send → acknowledge loop.
    async fn replicate(&mut self, producer: &Producer) -> Ended {
        let mut tail = self.log.watch_durable();
        let cursor = {
            let cursor_lock = self.cursor_lock.clone();
            let _held = cursor_lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.resets.borrow_and_update();
            self.log.cursor(&self.cursor)
        };
        let Some(cursor) = cursor else {
            return Ended::Refused(format!("cursor {} is gone", self.cursor));
        };
        self.chain = cursor
            .properties
            .get(CHAIN_CURSOR_PROPERTY)
            .and_then(|value| parse_position(value))
            .map(origin_position);
        // Start after the mark-delete position: a rewind to the first unconfirmed entry. With
        // none, start before everything: entries appended and not yet durable count too, so
        // neither the first durable entry nor the end of the log is the right place.
        let mut next = match cursor.mark_delete {
            Some(mark_delete) => self.log.next_position(mark_delete),
            None => Position::new(0, 0),
        };
        let mut in_flight = InFlight::default();
        let mut throttled_until: Option<Instant> = None;
        let memory = self.memory.clone();
        // Memory reserved for the next read, and how much to ask for.
        let mut reserved: Option<Held> = None;
        let mut wanted = READ_MAX_BYTES;
        loop {
            if *self.stopped.borrow() {
                return Ended::Stopped;
            }
            let (confirmed, failed) = in_flight.take_confirmed();
            self.confirm(confirmed);
            if let Some(failure) = failed {
                return self.send_failed(failure);
            }
            let readable = self.log.last_position().is_some_and(|last| next <= last);

            if throttled_until.is_some_and(|until| Instant::now() >= until) {
                throttled_until = None;
            }
            if throttled_until.is_none() {
                throttled_until = self
                    .throttle
                    .wait(self.rates.borrow().as_ref())
                    .map(|wait| Instant::now() + wait);
            }
            let may_read = in_flight.has_room() && readable && throttled_until.is_none();
            if may_read && reserved.is_none() {
                reserved = memory.try_reserve(wanted);
            }
            if let (true, Some(budget)) = (may_read, reserved.take()) {
                let mut read = Read {
                    next: &mut next,
                    budget,
                    wanted: READ_MAX_BYTES,
                };
                if let Err(ended) = self.send_more(producer, &mut read, &mut in_flight).await {
                    return ended;
                }
                wanted = read.wanted;
                continue;
            }
            let wait_for_memory = may_read;
            let wait_for_tail = in_flight.has_room() && !readable;
            let throttle_sleep = async {
                match throttled_until {
                    Some(until) => tokio::time::sleep_until(until).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.stopped.changed() => return Ended::Stopped,
                _ = self.resets.changed() => return Ended::Failed("the replication cursor was moved".into()),
                confirmed = in_flight.next_confirmed() => match confirmed {
                    Ok(done) => self.confirm(vec![done]),
                    Err(failure) => return self.send_failed(failure),
                },
                changed = tail.changed(), if wait_for_tail => {
                    if changed.is_err() {
                        return Ended::Failed("the topic's log closed".into());
                    }
                }
                () = throttle_sleep => {}
                _ = self.rates.changed() => throttled_until = None,
                budget = memory.reserve(wanted), if wait_for_memory => reserved = Some(budget),
            }
        }
    }

    /// Reads the next entries (as many as there is room, memory and rate for) and sends what
    /// must be replicated; acknowledges the rest at once.
    async fn send_more(
        &mut self,
        producer: &Producer,
        read: &mut Read<'_>,
        in_flight: &mut InFlight,
    ) -> Result<(), Ended> {
        // Under a rate limit, read no more than the period has left (every entry holds at
        // least one message; at least one entry is always read).
        let (messages_left, bytes_left) = self.throttle.left(self.rates.borrow().as_ref());
        let room = in_flight.room().min(READ_MAX_ENTRIES).min(messages_left);
        let max_bytes = READ_MAX_BYTES.min(bytes_left).min(read.budget.bytes());
        let log = self.log.clone();
        let next = &mut *read.next;
        let from = *next;
        let result =
            tokio::task::spawn_blocking(move || log.read_from(from, room, max_bytes)).await;
        let entries = match result {
            Ok(Ok(entries)) => entries,
            Ok(Err(meridian_storage::StorageError::PositionNotFound { .. })) => {
                // Trimmed away under us (retention, a reset): go on with what is left.
                *next = self.log.first_position().unwrap_or(*next);
                return Ok(());
            }
            Ok(Err(error)) => {
                return Err(Ended::Failed(format!("reading the log failed: {error}")))
            }
            Err(error) => return Err(Ended::Failed(error.to_string())),
        };
        let mut skipped = Vec::new();
        for entry in entries {
            let position = entry.position;
            if self.log.is_acknowledged(&self.cursor, position) {
                *next = self.log.next_position(position);
                continue;
            }
            let bytes = entry.data.len();
            let Some(memory) = self.memory.take(&mut read.budget, bytes) else {
                // Not enough memory free now: this entry is read again once it is.
                read.wanted = bytes;
                break;
            };
            *next = self.log.next_position(position);
            let Plan::Send { message, messages } = self.plan(entry) else {
                skipped.push(position);
                continue;
            };
            let receipt = producer
                .send(*message)
                .await
                .map_err(|error| self.send_failed(SendFailure { position, error }))?;
            self.chain = Some(origin_position(position));
            self.throttle.record(messages, bytes as u64);
            in_flight.push(Sent {
                position,
                messages,
                bytes,
                receipt,
                _memory: memory,
            });
        }
        self.acknowledge(&skipped);
        Ok(())
    }

    /// Skips what must not be replicated; prepares the rest as the next link of the chain.
    fn plan(&self, entry: Entry) -> Plan {
        let Ok((mut metadata, payload)) = meridian_wire::entry_parts(entry.data) else {
            tracing::warn!(topic = %self.topic, position = %entry.position, "skipping an entry whose metadata does not decode");
            return Plan::Skip;
        };
        if !meant_for(&metadata, &self.remote.name) {
            return Plan::Skip;
        }
        metadata.replicated_from = Some(self.local_cluster.clone());
        metadata
            .properties
            .retain(|property| !is_replication_property(property));
        metadata.properties.push(KeyValue {
            key: ORIGIN_PROPERTY.to_string(),
            value: format_position(origin_position(entry.position)),
        });
        if let Some(previous) = self.chain {
            metadata.properties.push(KeyValue {
                key: PREVIOUS_PROPERTY.to_string(),
                value: format_position(previous),
            });
        }
        let messages =
            u64::try_from(metadata.num_messages_in_batch.unwrap_or(1).max(1)).unwrap_or(1);
        Plan::Send {
            message: Box::new(ProducerMessage::entry(metadata, payload)),
            messages,
        }
    }

    /// How a session ends after a send failed: an error retrying cannot fix (the remote
    /// refuses the entry: too large for it, a gap, a terminated topic) stops the replicator at
    /// that entry until the cause is fixed; anything else is retried after a backoff.
    fn send_failed(&self, failure: SendFailure) -> Ended {
        let SendFailure { position, error } = failure;
        let permanent = matches!(error, meridian_client::Error::MessageTooLarge { .. })
            || refused_for_good(&error);
        let reason = format!(
            "entry {} was not replicated: {error}",
            format_position(position)
        );
        if permanent {
            Ended::Refused(reason)
        } else {
            Ended::Failed(reason)
        }
    }

    /// Counts what the remote stored and acknowledges the confirmed entries' source entries.
    fn confirm(&mut self, confirmed: Vec<Confirmed>) {
        let Some(last) = confirmed.last() else {
            return;
        };
        let cursor_lock = self.cursor_lock.clone();
        let _held = cursor_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.resets.has_changed().unwrap_or(true) {
            // An admin moved the cursor: what was in flight no longer counts.
            return;
        }
        // The chain's head first, then the acknowledgements: a cursor never has acknowledged
        // an entry its chain property does not cover (both are persisted together).
        let head = BTreeMap::from([(
            CHAIN_CURSOR_PROPERTY.to_string(),
            format_position(origin_position(last.sent.position)),
        )]);
        if let Err(error) = self.log.set_cursor_properties(&self.cursor, head) {
            tracing::warn!(topic = %self.topic, remote = %self.remote.name, %error, "recording the replication chain failed");
            return;
        }
        let positions: Vec<Position> = confirmed
            .iter()
            .map(|done| {
                // Counted once: an entry the remote stored now, or one it answers as a
                // duplicate that this replicator has not counted yet (the remote stored an
                // earlier send whose receipt was lost with the connection).
                let position = done.sent.position;
                if done.stored
                    || self
                        .counted_through
                        .is_none_or(|counted| position > counted)
                {
                    self.status
                        .out
                        .record(done.sent.messages, done.sent.bytes as u64);
                }
                self.counted_through = self.counted_through.max(Some(position));
                position
            })
            .collect();
        self.acknowledge(&positions);
        self.confirmed = true;
    }

    fn acknowledge(&self, positions: &[Position]) {
        if positions.is_empty() {
            return;
        }
        if let Err(error) = self.log.acknowledge(&self.cursor, positions) {
            tracing::warn!(topic = %self.topic, remote = %self.remote.name, %error, "acknowledging replicated entries failed");
        }
        self.status.cursor_moved.notify_one();
    }
}

/// Whether the remote refused for a reason retrying cannot fix (an operator must act: raise a
/// limit, reset the cursor, re-create the topic): the replicator stops instead of backing off.
fn refused_for_good(error: &meridian_client::Error) -> bool {
    matches!(
        error.server_error(),
        Some(ServerError::NotAllowedError | ServerError::TopicTerminatedError)
    )
}

/// Entries sent and not yet confirmed, oldest first. Receipts complete in this order.
#[derive(Default)]
struct InFlight {
    sent: VecDeque<Sent>,
    bytes: usize,
}

impl InFlight {
    fn room(&self) -> usize {
        MAX_IN_FLIGHT_ENTRIES.saturating_sub(self.sent.len())
    }

    fn has_room(&self) -> bool {
        self.room() > 0 && self.bytes < MAX_IN_FLIGHT_BYTES
    }

    fn push(&mut self, sent: Sent) {
        self.bytes += sent.bytes;
        self.sent.push_back(sent);
    }

    /// The head, answered with `result`.
    fn complete(
        &mut self,
        result: meridian_client::Result<MessageId>,
    ) -> Result<Confirmed, SendFailure> {
        let Some(sent) = self.sent.pop_front() else {
            return Err(SendFailure {
                position: Position::new(0, 0),
                error: meridian_client::Error::NotAllowed("confirmation without a send".into()),
            });
        };
        self.bytes -= sent.bytes;
        match result {
            Ok(id) => Ok(Confirmed {
                stored: id.ledger_id != u64::MAX,
                sent,
            }),
            Err(error) => Err(SendFailure {
                position: sent.position,
                error,
            }),
        }
    }

    /// The sends confirmed so far, without waiting, and the failure that ended them if one
    /// failed.
    fn take_confirmed(&mut self) -> (Vec<Confirmed>, Option<SendFailure>) {
        let mut confirmed = Vec::new();
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        while let Some(head) = self.sent.front_mut() {
            match std::pin::Pin::new(&mut head.receipt).poll(&mut context) {
                std::task::Poll::Pending => break,
                std::task::Poll::Ready(result) => match self.complete(result) {
                    Ok(done) => confirmed.push(done),
                    Err(failure) => return (confirmed, Some(failure)),
                },
            }
        }
        (confirmed, None)
    }

    /// Waits for the oldest send's answer (forever if nothing is in flight).
    async fn next_confirmed(&mut self) -> Result<Confirmed, SendFailure> {
        let Some(head) = self.sent.front_mut() else {
            return std::future::pending().await;
        };
        let result = (&mut head.receipt).await;
        self.complete(result)
    }
}
