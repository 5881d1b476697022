//! A subscription: a cursor, its consumers, and the dispatcher that sends them entries.
//!
//! The dispatcher is one task per subscription. Each round it plans under the state lock (what
//! to read: entries waiting for redelivery first, then new ones from the read position, as many
//! as consumers have permits for), reads outside the lock, assigns each entry to a consumer by
//! the subscription type and queues its MESSAGE frame on that consumer's connection without
//! waiting. It sleeps until new entries are durable, permits arrive, consumers change, a
//! delayed message falls due, or a full connection it skipped has room again.
//!
//! A consumer can take an entry only if it has permits, is below its unacknowledged limit and
//! its connection's outbound queue is below its byte limit: a client that asks for messages and
//! never reads them fills its own queue and is then skipped, so the other consumers of a Shared
//! or Key_Shared subscription keep their rate (the dispatcher never awaits one connection).
//!
//! Bookkeeping per entry in flight: `pending` (which consumer has it, how many messages it
//! holds, its sticky-key hash) until it is acknowledged; `replay` for entries to send again
//! (negative acks, closed consumers, entries no consumer could take yet); `redelivery_counts`
//! for `redelivery_count`; `delayed` for Shared/Key_Shared messages with `deliver_at_time`.
//!
//! Ordering rules: Exclusive and Failover send everything to one active consumer in log order
//! (replays first). Key_Shared sends all messages of one sticky key to one consumer; a key is
//! *blocked* while an earlier message of it waits for replay, and a consumer that joins while
//! messages are in flight receives no new messages until every message before its joining point
//! is acknowledged (so a key moved to it never overtakes its own earlier messages).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use meridian_storage::{ChangeKind, Entry, InitialPosition, Log, Position};
use meridian_wire::proto::{
    base_command, BaseCommand, CommandActiveConsumerChange, CommandCloseConsumer, CommandMessage,
    CommandReachedEndOfTopic, IntRange, MessageIdData,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::Notify;

use crate::batch_acks;
use crate::clock::now_ms;
use crate::config::BrokerConfig;
use crate::error::{BrokerError, Result};
use crate::outbound::{command_frame, Outbound, OutboundSender, Staged};
use crate::replication::subscription_sync::{self, SyncedAcks};
use crate::stats::{ConsumerStats, Meter, SubscriptionStats};

mod in_flight;
use in_flight::InFlight;

/// The fields of an entry's metadata that dispatch reads for every entry, with their tags in
/// `MessageMetadata`: decoding only these skips allocating (and dropping) the producer name and
/// the rest, once per delivered entry. Keys are read as bytes (a string on the wire is the same
/// bytes).
#[derive(Clone, PartialEq, prost::Message)]
struct DispatchFields {
    #[prost(string, optional, tag = "5")]
    replicated_from: Option<String>,
    #[prost(bytes = "vec", optional, tag = "6")]
    partition_key: Option<Vec<u8>>,
    #[prost(int32, optional, tag = "11")]
    num_messages_in_batch: Option<i32>,
    #[prost(bytes = "vec", optional, tag = "18")]
    ordering_key: Option<Vec<u8>>,
    #[prost(int64, optional, tag = "19")]
    deliver_at_time: Option<i64>,
    #[prost(int32, optional, tag = "20")]
    marker_type: Option<i32>,
}

/// Pulsar's subscription types (wire values 0..=3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionType {
    Exclusive,
    Shared,
    Failover,
    KeyShared,
}

impl SubscriptionType {
    pub fn from_wire(value: i32) -> Option<SubscriptionType> {
        match value {
            0 => Some(SubscriptionType::Exclusive),
            1 => Some(SubscriptionType::Shared),
            2 => Some(SubscriptionType::Failover),
            3 => Some(SubscriptionType::KeyShared),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SubscriptionType::Exclusive => "Exclusive",
            SubscriptionType::Shared => "Shared",
            SubscriptionType::Failover => "Failover",
            SubscriptionType::KeyShared => "Key_Shared",
        }
    }

    fn honours_delays(self) -> bool {
        matches!(self, SubscriptionType::Shared | SubscriptionType::KeyShared)
    }
}

/// Size of Key_Shared's hash space (Pulsar's 0..65535).
const HASH_RANGE: u32 = 65_536;
/// Points per consumer on the Key_Shared consistent-hash ring.
const RING_POINTS_PER_CONSUMER: u32 = 100;

/// Murmur3-32 of a sticky key, folded into the Key_Shared hash space.
pub fn sticky_key_hash(key: &[u8]) -> u16 {
    let hash = murmur3::murmur3_32(&mut std::io::Cursor::new(key), 0).unwrap_or(0);
    (hash % HASH_RANGE) as u16
}

/// A consumer as the connection describes it when subscribing.
pub struct NewConsumer {
    pub consumer_id: u64,
    pub name: String,
    pub priority: i32,
    pub kind: SubscriptionType,
    pub sink: OutboundSender,
    /// Set by the subscription when it closes the consumer itself (seek, unload).
    pub closed: Arc<AtomicBool>,
    /// Key_Shared STICKY mode: the hash ranges this consumer asked for (inclusive).
    pub sticky_ranges: Vec<IntRange>,
    /// Key_Shared `allow_out_of_order_delivery`.
    pub allow_out_of_order: bool,
    /// SUBSCRIBE's `replicate_subscription_state`: the consumer asks for the subscription's
    /// state to be replicated to the topic's other clusters.
    pub replicate_state: bool,
    pub address: String,
    pub client_version: String,
    /// The protocol version the client's connection negotiated (TOPIC_MIGRATED needs 20).
    pub protocol_version: i32,
}

struct ConsumerSlot {
    key: u64,
    consumer_id: u64,
    name: String,
    priority: i32,
    permits: i64,
    unacked_messages: u64,
    sink: OutboundSender,
    closed: Arc<AtomicBool>,
    sticky_ranges: Vec<(u16, u16)>,
    /// Key_Shared: joined while messages were in flight; gets no new messages at or after this
    /// position until everything before it is acknowledged.
    held_from: Option<Position>,
    /// REACHED_END_OF_TOPIC was sent.
    told_end: bool,
    address: String,
    client_version: String,
    connected_since: String,
    meter: Meter,
    protocol_version: i32,
}

struct Pending {
    consumer_key: u64,
    messages: u32,
    hash: Option<u16>,
}

struct DispatchState {
    kind: SubscriptionType,
    consumers: Vec<ConsumerSlot>,
    round_robin: usize,
    /// Next entry to read from the log.
    read_position: Position,
    /// Entries to send again before new ones, with their sticky-key hash if known.
    replay: BTreeMap<Position, Option<u16>>,
    pending: InFlight<Pending>,
    redelivery_counts: HashMap<Position, u32>,
    /// Delayed messages by (deliver-at time in ms, position).
    delayed: BTreeMap<(u64, Position), Option<u16>>,
    /// Active consumer of an Exclusive or Failover subscription.
    active: Option<u64>,
    /// Key_Shared consistent-hash ring: (point, consumer key), sorted.
    ring: Vec<(u16, u64)>,
    /// Bumped by seek: reads planned before it are discarded.
    generation: u64,
    /// Messages per entry lately, to turn permits (messages) into entries to read.
    messages_per_entry: MessagesPerEntry,
}

/// A moving average of the messages per entry dispatched (batches make an entry many
/// messages), as Pulsar's dispatchers keep one: a consumer's permits count messages, and a
/// read of as many entries as it has permits would fetch, for 1,000 permits and batches of
/// 128 messages, 100 entries of which 8 go out — the rest went back to the replay set and were
/// read again, one at a time, in later rounds (issue 16).
#[derive(Clone, Copy, Debug)]
struct MessagesPerEntry {
    /// In 1/16 of a message.
    sixteenths: u64,
}

impl Default for MessagesPerEntry {
    /// One message per entry until entries are seen: never fewer entries read than before.
    fn default() -> Self {
        MessagesPerEntry { sixteenths: 16 }
    }
}

impl MessagesPerEntry {
    /// Counts an entry of `messages` messages: each moves the average by a tenth of the way.
    fn record(&mut self, messages: u32) {
        let sample = u64::from(messages.max(1)) * 16;
        self.sixteenths = ((self.sixteenths * 9 + sample) / 10).max(16);
    }

    /// Entries to read for `permits` messages: enough to use them all (the last entry may
    /// take the consumer's permits below zero, as a whole batch goes out), at least one.
    fn entries_for(self, permits: u64) -> u64 {
        // Flows add up (saturating) to far more permits than anyone sends messages for.
        permits.saturating_mul(16).div_ceil(self.sixteenths).max(1)
    }
}

/// What one dispatch round reads.
enum ReadPlan {
    Replay(Vec<Position>),
    New { from: Position, max_entries: usize },
}

impl ReadPlan {
    /// The planned entries if the log's cache holds them all (`None`: they need the files).
    fn read_cached(
        &self,
        log: &Log,
        max_bytes: usize,
    ) -> meridian_storage::Result<Option<Vec<Entry>>> {
        match self {
            ReadPlan::Replay(positions) => log.read_positions_cached(positions),
            ReadPlan::New { from, max_entries } => {
                log.read_from_cached(*from, *max_entries, max_bytes)
            }
        }
    }

    /// The planned entries, from the files where the cache no longer holds them (blocking).
    fn read(&self, log: &Log, max_bytes: usize) -> meridian_storage::Result<Vec<Entry>> {
        match self {
            ReadPlan::Replay(positions) => log.read_positions(positions),
            ReadPlan::New { from, max_entries } => log.read_from(*from, *max_entries, max_bytes),
        }
    }
}

/// The outcome of one dispatch round.
enum Round {
    Progress,
    Idle { wake_at_ms: Option<u64> },
}

pub struct Subscription {
    pub name: String,
    /// Name of the storage cursor (the subscription name, or a generated one for readers).
    cursor: String,
    durable: bool,
    topic: String,
    partition_index: i32,
    log: Arc<Log>,
    config: Arc<BrokerConfig>,
    state: Mutex<DispatchState>,
    /// Wakes the dispatcher; shared with the connections it skipped because they were full.
    wake: Arc<Notify>,
    stopped: AtomicBool,
    /// A tenant migration stopped dispatch here (`crate::migration`): nothing more is sent.
    dispatch_paused: AtomicBool,
    meter_out: Meter,
    redelivered: Meter,
    /// The topic's termination flag.
    terminated: Arc<AtomicBool>,
    /// For a replicated subscription: the states other clusters sent. Entries they cover were
    /// acknowledged there, so the dispatcher acknowledges them here instead of delivering them.
    acknowledged_elsewhere: std::sync::RwLock<Vec<SyncedAcks>>,
    /// The topic's lock over cursor-property changes.
    properties_lock: Arc<Mutex<()>>,
    /// Entries acknowledged in part (batch-index acknowledgements), as kept in the cursor.
    batch_acks: Mutex<batch_acks::Partial>,
    /// The log is a cluster-mode local copy (`--storage`): message ids of the topic's earlier
    /// copies are translated to this one's ([`crate::cluster::logs::position_in_copy`]).
    copy_entry_ids: bool,
}

fn message_id(position: Position, partition_index: i32) -> MessageIdData {
    MessageIdData {
        ledger_id: position.ledger_id,
        entry_id: position.entry_id,
        partition: Some(partition_index),
        ..MessageIdData::default()
    }
}

/// Where reading starts after a mark-delete position. With none, before everything: the first
/// *durable* entry or the end of the log would skip entries appended and not yet durable.
fn position_after(log: &Log, mark_delete: Option<Position>) -> Position {
    match mark_delete {
        Some(position) => log.next_position(position),
        None => Position::new(0, 0),
    }
}

/// Where a subscription's cursor starts.
#[derive(Debug, Clone, Copy)]
pub enum StartPosition {
    Initial(InitialPosition),
    /// Deliver from this entry on (readers).
    At(Position),
}

/// Dispatch rounds that made progress, one after the other, after which a dispatcher lets the
/// runtime's other tasks run (see `dispatch_loop`).
const ROUNDS_BEFORE_YIELD: u32 = 4;

impl Subscription {
    /// Opens (or creates) the subscription's cursor and starts its dispatcher task.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        name: String,
        cursor: String,
        durable: bool,
        kind: SubscriptionType,
        start: StartPosition,
        topic: String,
        partition_index: i32,
        log: Arc<Log>,
        config: Arc<BrokerConfig>,
        terminated: Arc<AtomicBool>,
        properties_lock: Arc<Mutex<()>>,
        copy_entry_ids: bool,
    ) -> Result<Arc<Subscription>> {
        let mark_delete = match start {
            StartPosition::Initial(initial) => {
                log.open_cursor_with(&cursor, initial, durable)?.mark_delete
            }
            StartPosition::At(position) => {
                log.open_cursor_with(&cursor, InitialPosition::Earliest, durable)?;
                let mark_delete = log.previous_position(position);
                log.reset_cursor(&cursor, mark_delete)?;
                mark_delete
            }
        };
        let read_position = position_after(&log, mark_delete);
        let cursor_state = log.cursor(&cursor).unwrap_or_default();
        let received_states = subscription_sync::received(&cursor_state);
        let partial = batch_acks::decode(&cursor_state.properties);
        let subscription = Arc::new(Subscription {
            name,
            cursor,
            durable,
            topic,
            partition_index,
            state: Mutex::new(DispatchState {
                kind,
                consumers: Vec::new(),
                round_robin: 0,
                read_position,
                replay: BTreeMap::new(),
                pending: InFlight::default(),
                redelivery_counts: HashMap::new(),
                delayed: BTreeMap::new(),
                active: None,
                ring: Vec::new(),
                generation: 0,
                messages_per_entry: MessagesPerEntry::default(),
            }),
            log,
            config,
            wake: Arc::new(Notify::new()),
            stopped: AtomicBool::new(false),
            dispatch_paused: AtomicBool::new(false),
            meter_out: Meter::default(),
            redelivered: Meter::default(),
            terminated,
            acknowledged_elsewhere: std::sync::RwLock::new(received_states),
            properties_lock,
            batch_acks: Mutex::new(partial),
            copy_entry_ids,
        });
        let dispatcher = subscription.clone();
        tokio::spawn(async move { dispatcher.dispatch_loop().await });
        Ok(subscription)
    }

    /// A position a client sent, in this log: in cluster mode, one of an earlier copy of the
    /// topic (a message id from before a move) becomes this copy's position of the same entry.
    fn position_here(&self, position: Position) -> Position {
        crate::cluster::logs::position_in_copy(&self.log, self.copy_entry_ids, position)
    }

    fn lock(&self) -> MutexGuard<'_, DispatchState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// Replaces the states other clusters sent (replicated subscriptions).
    pub(crate) fn set_acknowledged_elsewhere(&self, received: Vec<SyncedAcks>) {
        *self
            .acknowledged_elsewhere
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = received;
    }

    fn is_acknowledged_elsewhere(
        &self,
        position: Position,
        metadata: &meridian_wire::MessageMetadata,
    ) -> bool {
        let received = self
            .acknowledged_elsewhere
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        subscription_sync::acknowledged_elsewhere(
            &received,
            &self.config.cluster_name,
            position,
            metadata,
        )
    }

    /// What other clusters acknowledged of the batch entry at `position` (replicated
    /// subscriptions, batch-index acknowledgements enabled): its `ack_set` words, if some
    /// messages and not all.
    fn acknowledged_in_part_elsewhere(
        &self,
        position: Position,
        metadata: &meridian_wire::MessageMetadata,
    ) -> Option<Vec<u64>> {
        if !self.config.batch_index_ack_enabled {
            return None;
        }
        let received = self
            .acknowledged_elsewhere
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if received.is_empty() {
            return None;
        }
        subscription_sync::acknowledged_in_part_elsewhere(
            &received,
            &self.config.cluster_name,
            position,
            metadata,
        )
    }

    pub fn cursor_name(&self) -> &str {
        &self.cursor
    }

    /// Whether the subscription has acknowledged the entry at `position` (a message id as
    /// its consumers know it).
    pub fn is_acknowledged(&self, position: Position) -> bool {
        self.log
            .is_acknowledged(&self.cursor, self.position_here(position))
    }

    pub fn kind(&self) -> SubscriptionType {
        self.lock().kind
    }

    pub fn consumer_count(&self) -> usize {
        self.lock().consumers.len()
    }

    /// Tenant migration: dispatches nothing more (for good: the consumers move elsewhere).
    pub(crate) fn pause_dispatch(&self) {
        self.dispatch_paused.store(true, Ordering::SeqCst);
    }

    /// Messages delivered to consumers and not acknowledged yet.
    pub(crate) fn delivered_unacknowledged(&self) -> usize {
        self.lock().pending.len()
    }

    /// Tenant migration: tells every consumer to move to `broker_service_url` (TOPIC_MIGRATED to
    /// clients of protocol 20 or later) and closes it (CLOSE_CONSUMER).
    pub(crate) fn migrate_consumers(&self, broker_service_url: &str) {
        let moved: Vec<(OutboundSender, Outbound)> = self
            .lock()
            .consumers
            .iter()
            .filter(|consumer| consumer.protocol_version >= 20)
            .map(|consumer| {
                let command = crate::topic::topic_migrated(
                    consumer.consumer_id,
                    meridian_wire::proto::command_topic_migrated::ResourceType::Consumer,
                    broker_service_url,
                );
                (consumer.sink.clone(), command_frame(&command))
            })
            .collect();
        send_now(moved);
        let frames = self.close_all_consumers();
        send_now(frames);
    }

    /// Stops the dispatcher and closes every consumer (CLOSE_CONSUMER is sent to each).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let frames = self.close_all_consumers();
        send_now(frames);
        self.wake.notify_one();
    }

    /// Adds a consumer; returns its broker-wide key.
    pub(crate) fn add_consumer(&self, key: u64, consumer: NewConsumer) -> Result<()> {
        let mut frames = Vec::new();
        {
            let mut state = self.lock();
            if !state.consumers.is_empty() {
                if state.kind != consumer.kind {
                    return Err(BrokerError::ConsumerBusy(format!(
                        "subscription {} is of type {}, not {}",
                        self.name,
                        state.kind.name(),
                        consumer.kind.name()
                    )));
                }
                if state.kind == SubscriptionType::Exclusive {
                    return Err(BrokerError::ConsumerBusy(format!(
                        "exclusive consumer is already connected to subscription {}",
                        self.name
                    )));
                }
            }
            if consumer.kind == SubscriptionType::KeyShared {
                check_sticky_ranges(&self.name, &state.consumers, &consumer.sticky_ranges)?;
            }
            state.kind = consumer.kind;
            let in_flight = !state.pending.is_empty() || !state.replay.is_empty();
            let held_from = (consumer.kind == SubscriptionType::KeyShared
                && in_flight
                && !consumer.allow_out_of_order)
                .then_some(state.read_position);
            let sticky_ranges = consumer
                .sticky_ranges
                .iter()
                .map(|range| {
                    (
                        range.start.clamp(0, 65_535) as u16,
                        range.end.clamp(0, 65_535) as u16,
                    )
                })
                .collect();
            state.consumers.push(ConsumerSlot {
                key,
                consumer_id: consumer.consumer_id,
                name: consumer.name,
                priority: consumer.priority,
                permits: 0,
                unacked_messages: 0,
                sink: consumer.sink,
                closed: consumer.closed,
                sticky_ranges,
                held_from,
                told_end: false,
                address: consumer.address,
                client_version: consumer.client_version,
                connected_since: crate::clock::now_rfc3339(),
                meter: Meter::default(),
                protocol_version: consumer.protocol_version,
            });
            self.membership_changed(&mut state, &mut frames);
        }
        send_now(frames);
        self.wake.notify_one();
        Ok(())
    }

    /// Removes a consumer; its unacknowledged messages go to the others (or wait for the next
    /// one) with a higher redelivery count.
    pub(crate) fn remove_consumer(&self, key: u64) {
        let mut frames = Vec::new();
        {
            let mut state = self.lock();
            let Some(index) = state
                .consumers
                .iter()
                .position(|consumer| consumer.key == key)
            else {
                return;
            };
            state.consumers.remove(index);
            redeliver_pending_of(&mut state, key, None, true);
            self.membership_changed(&mut state, &mut frames);
        }
        send_now(frames);
        self.wake.notify_one();
    }

    /// Recomputes the active consumer (Exclusive/Failover) or the hash ring (Key_Shared).
    fn membership_changed(
        &self,
        state: &mut DispatchState,
        frames: &mut Vec<(OutboundSender, Outbound)>,
    ) {
        match state.kind {
            SubscriptionType::Exclusive | SubscriptionType::Failover => {
                let mut order: Vec<&ConsumerSlot> = state.consumers.iter().collect();
                order.sort_by(|a, b| {
                    (a.priority, &a.name, a.key).cmp(&(b.priority, &b.name, b.key))
                });
                let active = if order.is_empty() {
                    None
                } else {
                    let index = if self.partition_index >= 0 {
                        self.partition_index as usize % order.len()
                    } else {
                        0
                    };
                    Some(order[index].key)
                };
                let changed = active != state.active;
                if changed {
                    if let Some(previous) = state.active {
                        // The previous active consumer's messages go to the new one.
                        redeliver_pending_of(state, previous, None, false);
                    }
                    state.active = active;
                }
                if state.kind == SubscriptionType::Failover {
                    for consumer in &state.consumers {
                        let command = BaseCommand {
                            r#type: base_command::Type::ActiveConsumerChange as i32,
                            active_consumer_change: Some(CommandActiveConsumerChange {
                                consumer_id: consumer.consumer_id,
                                is_active: Some(Some(consumer.key) == active),
                            }),
                            ..BaseCommand::default()
                        };
                        frames.push((consumer.sink.clone(), command_frame(&command)));
                    }
                }
            }
            SubscriptionType::KeyShared => {
                let mut ring = Vec::new();
                for consumer in state
                    .consumers
                    .iter()
                    .filter(|consumer| consumer.sticky_ranges.is_empty())
                {
                    for point in 0..RING_POINTS_PER_CONSUMER {
                        let label = format!("{}-{}-{point}", consumer.name, consumer.key);
                        ring.push((sticky_key_hash(label.as_bytes()), consumer.key));
                    }
                }
                ring.sort_unstable();
                state.ring = ring;
            }
            SubscriptionType::Shared => {}
        }
    }

    /// Adds permits (counted in messages).
    pub fn flow(&self, key: u64, permits: u32) {
        {
            let mut state = self.lock();
            if let Some(consumer) = state
                .consumers
                .iter_mut()
                .find(|consumer| consumer.key == key)
            {
                consumer.permits = consumer.permits.saturating_add(i64::from(permits));
                tracing::trace!(subscription = %self.name, added = permits, permits = consumer.permits, "flow");
            }
        }
        self.wake.notify_one();
    }

    /// Acknowledges individual entries. Positions of entries that do not exist (never did, or
    /// were trimmed) are ignored, as Pulsar does: stored, they would lower the backlog.
    pub fn acknowledge(&self, positions: &[Position]) -> Result<()> {
        self.acknowledge_as(positions, ChangeKind::Own)
    }

    /// [`Subscription::acknowledge`], for the users `kind` names (see [`ChangeKind`]).
    pub fn acknowledge_as(&self, positions: &[Position], kind: ChangeKind) -> Result<()> {
        // One position (an ACK of one message, the common case) needs no `Vec`.
        let one: [Position; 1];
        let many: Vec<Position>;
        let here: &[Position] = match positions {
            [position] => {
                one = [self.position_here(*position)];
                &one
            }
            _ => {
                many = positions
                    .iter()
                    .map(|position| self.position_here(*position))
                    .collect();
                &many
            }
        };
        // Clients acknowledge a batch message by message (the `pulsar` crate sends one ACK per
        // message, each naming the batch's entry): once the entry is acknowledged the others
        // change nothing in the cursor, and the log tells so without touching it. The log
        // ignores positions where it holds no entry (a client's bad message id).
        let mut positions = here;
        let accepted: Vec<Position>;
        let cursor_changed = match self.log.acknowledge_changed(&self.cursor, positions, kind) {
            Ok(changed) => changed,
            Err(meridian_storage::StorageError::TooManyAcknowledgedRanges {
                refused,
                limit,
                ..
            }) => {
                // Only a client acknowledging entries it was not sent gets here (dispatch stops
                // before the limit): the refused entries stay unacknowledged and pending, so
                // they are delivered again.
                tracing::warn!(topic = %self.topic, subscription = %self.name, limit, refused = refused.len(), "acknowledgements refused: the subscription holds the maximum of acknowledged ranges (cursor_max_ranges); those messages will be delivered again");
                accepted = positions
                    .iter()
                    .copied()
                    .filter(|position| !refused.contains(position))
                    .collect();
                positions = &accepted[..];
                true
            }
            Err(error) => return Err(error.into()),
        };
        let forgotten = {
            let mut state = self.lock();
            positions.iter().fold(false, |forgotten, position| {
                forget_pending(&mut state, *position)
                    | state.replay.remove(position).is_some()
                    | forgotten
            })
        };
        if cursor_changed || forgotten {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Batch-index acknowledgements: per entry, the words of its batch's `ack_set` (bit set:
    /// message not acknowledged). Kept with the cursor; an entry acknowledged whole this way is
    /// acknowledged. Ignored unless the broker has batch-index acknowledgements enabled.
    pub fn acknowledge_batch_indexes(&self, acks: &[(Position, Vec<u64>)]) -> Result<()> {
        if acks.is_empty() || !self.config.batch_index_ack_enabled {
            return Ok(());
        }
        let acks: Vec<(Position, Vec<u64>)> = acks
            .iter()
            .map(|(position, words)| (self.position_here(*position), words.clone()))
            .collect();
        let acks = &acks[..];
        let complete = {
            let _properties = self
                .properties_lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let (partial, complete) = batch_acks::record(&self.log, &self.cursor, acks)?;
            *self
                .batch_acks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = partial;
            complete
        };
        if complete.is_empty() {
            return Ok(());
        }
        self.acknowledge(&complete)
    }

    /// The `ack_set` to send with the entry at `position`: its messages acknowledged so far.
    fn ack_set(&self, position: Position) -> Vec<i64> {
        if !self.config.batch_index_ack_enabled {
            return Vec::new();
        }
        self.batch_acks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&position)
            .map(|words| batch_acks::to_wire(words))
            .unwrap_or_default()
    }

    /// Acknowledges everything up to and including `position`; a position beyond the last
    /// entry is ignored (as Pulsar: it would acknowledge messages not yet written).
    pub fn acknowledge_cumulative(&self, position: Position) -> Result<()> {
        let position = self.position_here(position);
        if self.log.last_position().is_none_or(|last| position > last) {
            tracing::debug!(topic = %self.topic, subscription = %self.name, %position, "cumulative acknowledgement beyond the last entry ignored");
            return Ok(());
        }
        self.log.acknowledge_cumulative(&self.cursor, position)?;
        {
            let mut state = self.lock();
            let acknowledged = state.pending.positions_up_to(position);
            for acknowledged in acknowledged {
                forget_pending(&mut state, acknowledged);
            }
            state.replay = state
                .replay
                .split_off(&Position::new(position.ledger_id, position.entry_id + 1));
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Sends a consumer's unacknowledged messages again: all of them (`None`), or the given ones.
    pub fn redeliver(&self, key: u64, positions: Option<Vec<Position>>) {
        let positions = positions.map(|positions| {
            positions
                .into_iter()
                .map(|position| self.position_here(position))
                .collect()
        });
        {
            let mut state = self.lock();
            redeliver_pending_of(&mut state, key, positions, true);
        }
        self.wake.notify_one();
    }

    /// Moves the cursor so that delivery restarts after `mark_delete`, and disconnects every
    /// consumer (they reconnect and resubscribe, as with Pulsar).
    pub(crate) fn seek(&self, mark_delete: Option<Position>) -> Result<()> {
        let frames = self.close_all_consumers();
        self.log.reset_cursor(&self.cursor, mark_delete)?;
        // Messages acknowledged in part are delivered again whole (the topic drops them from
        // the cursor's properties).
        self.batch_acks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
        {
            let mut state = self.lock();
            state.read_position = position_after(&self.log, mark_delete);
            state.replay.clear();
            state.pending.clear();
            state.delayed.clear();
            state.redelivery_counts.clear();
            state.generation += 1;
        }
        send_now(frames);
        self.wake.notify_one();
        Ok(())
    }

    fn close_all_consumers(&self) -> Vec<(OutboundSender, Outbound)> {
        let mut state = self.lock();
        let mut frames = Vec::new();
        for consumer in state.consumers.drain(..) {
            consumer.closed.store(true, Ordering::SeqCst);
            let command = BaseCommand {
                r#type: base_command::Type::CloseConsumer as i32,
                close_consumer: Some(Box::new(CommandCloseConsumer {
                    consumer_id: consumer.consumer_id,
                    request_id: 0,
                    ..CommandCloseConsumer::default()
                })),
                ..BaseCommand::default()
            };
            frames.push((consumer.sink.clone(), command_frame(&command)));
        }
        let pending: Vec<Position> = state.pending.iter().map(|(position, _)| position).collect();
        for position in pending {
            state.pending.remove(position);
            state.replay.insert(position, None);
        }
        state.active = None;
        state.ring.clear();
        frames
    }

    /// Makes the dispatcher look at the state again.
    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    /// For a terminated topic: tells consumers that have everything that the topic ended.
    fn end_of_topic_frames(&self, state: &mut DispatchState) -> Vec<(OutboundSender, Outbound)> {
        let drained = self.terminated.load(Ordering::SeqCst)
            && state.replay.is_empty()
            && state.delayed.is_empty()
            && self
                .log
                .last_position()
                .is_none_or(|last| state.read_position > last);
        if !drained {
            return Vec::new();
        }
        let mut frames = Vec::new();
        for consumer in state
            .consumers
            .iter_mut()
            .filter(|consumer| !consumer.told_end)
        {
            consumer.told_end = true;
            let command = BaseCommand {
                r#type: base_command::Type::ReachedEndOfTopic as i32,
                reached_end_of_topic: Some(CommandReachedEndOfTopic {
                    consumer_id: consumer.consumer_id,
                }),
                ..BaseCommand::default()
            };
            frames.push((consumer.sink.clone(), command_frame(&command)));
        }
        frames
    }

    /// Messages and bytes dispatched to consumers so far.
    pub(crate) fn dispatched(&self) -> (u64, u64) {
        (self.meter_out.messages(), self.meter_out.bytes())
    }

    pub(crate) fn sample_rates(&self) {
        self.meter_out.sample();
        self.redelivered.sample();
        for consumer in &self.lock().consumers {
            consumer.meter.sample();
        }
    }

    /// This subscription's part of Pulsar's `SubscriptionStats` (backlog figures are filled in
    /// by the topic, which knows the cursor).
    pub fn stats(&self) -> SubscriptionStats {
        let (msg_rate_out, msg_throughput_out) = self.meter_out.rates();
        let state = self.lock();
        let max_unacked = self.config.max_unacked_messages_per_consumer;
        let consumers: Vec<ConsumerStats> = state
            .consumers
            .iter()
            .map(|consumer| {
                let (rate, throughput) = consumer.meter.rates();
                ConsumerStats {
                    consumer_name: consumer.name.clone(),
                    msg_rate_out: rate,
                    msg_throughput_out: throughput,
                    bytes_out_counter: consumer.meter.bytes(),
                    msg_out_counter: consumer.meter.messages(),
                    available_permits: consumer.permits,
                    unacked_messages: consumer.unacked_messages,
                    blocked_consumer_on_unacked_msgs: consumer.unacked_messages >= max_unacked,
                    address: consumer.address.clone(),
                    connected_since: consumer.connected_since.clone(),
                    client_version: consumer.client_version.clone(),
                }
            })
            .collect();
        let active_consumer_name = state
            .active
            .and_then(|active| {
                state
                    .consumers
                    .iter()
                    .find(|consumer| consumer.key == active)
            })
            .map(|consumer| consumer.name.clone());
        SubscriptionStats {
            msg_rate_out,
            msg_throughput_out,
            bytes_out_counter: self.meter_out.bytes(),
            msg_out_counter: self.meter_out.messages(),
            msg_rate_redeliver: self.redelivered.rates().0,
            msg_delayed: state.delayed.len() as u64,
            msg_in_replay: state.replay.len() as u64,
            unacked_messages: consumers
                .iter()
                .map(|consumer| consumer.unacked_messages)
                .sum(),
            kind: state.kind.name().to_string(),
            active_consumer_name,
            consumers,
            is_durable: self.durable,
            blocked_subscription_on_unacked_msgs: self.range_headroom(&state) == 0,
            ..SubscriptionStats::default()
        }
    }

    /// Messages delivered and not yet acknowledged, over all consumers.
    pub fn unacked_messages(&self) -> u64 {
        self.lock()
            .consumers
            .iter()
            .map(|consumer| consumer.unacked_messages)
            .sum()
    }

    async fn dispatch_loop(self: Arc<Self>) {
        let mut durable = self.log.watch_durable();
        let mut progress_in_a_row: u32 = 0;
        loop {
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            // Arm the wake-ups before looking at the state, so none is missed.
            let notified = self.wake.notified();
            durable.borrow_and_update();
            match self.dispatch_round().await {
                // A round served from the entry cache awaits nothing: without a yield, a
                // subscription catching up on a cached backlog would keep its worker thread
                // (and every task queued behind it) until the backlog is out. Not after every
                // round: a consumer keeping up mostly gets one round per flow of permits, and
                // a yield there only delays it.
                Round::Progress => {
                    progress_in_a_row += 1;
                    if progress_in_a_row.is_multiple_of(ROUNDS_BEFORE_YIELD) {
                        tokio::task::yield_now().await;
                    }
                }
                Round::Idle { wake_at_ms } => {
                    progress_in_a_row = 0;
                    let sleep = wake_at_ms
                        .map(|at| Duration::from_millis(at.saturating_sub(now_ms()).max(1)));
                    tokio::select! {
                        _ = notified => {}
                        changed = durable.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        _ = tokio::time::sleep(sleep.unwrap_or(Duration::from_secs(3600))), if sleep.is_some() => {}
                    }
                }
            }
        }
    }

    async fn dispatch_round(&self) -> Round {
        if self.dispatch_paused.load(Ordering::SeqCst) {
            return Round::Idle { wake_at_ms: None };
        }
        let (plan, generation) = {
            let mut state = self.lock();
            let now = now_ms();
            let due: Vec<((u64, Position), Option<u16>)> = state
                .delayed
                .range(..(now + 1, Position::new(0, 0)))
                .map(|(key, hash)| (*key, *hash))
                .collect();
            for (key, hash) in due {
                state.delayed.remove(&key);
                state.replay.insert(key.1, hash);
            }
            let wake_at_ms = state.delayed.keys().next().map(|(at, _)| *at);
            send_now(self.end_of_topic_frames(&mut state));
            let permits = self.available_permits(&state);
            if permits == 0 {
                tracing::trace!(
                    topic = %self.topic,
                    subscription = %self.name,
                    replay = state.replay.len(),
                    pending = state.pending.len(),
                    consumers = ?state.consumers.iter().map(|consumer| (consumer.permits, consumer.unacked_messages)).collect::<Vec<_>>(),
                    "dispatcher idle: no permits"
                );
                return Round::Idle { wake_at_ms };
            }
            let max_entries = state
                .messages_per_entry
                .entries_for(permits)
                .min(self.config.dispatch_max_entries_per_read as u64)
                as usize;
            let replay = self.replay_to_send(&state, max_entries);
            let plan = if !replay.is_empty() {
                ReadPlan::Replay(replay)
            } else if state.replay.len() < self.config.max_redelivery_backlog
                && state.delayed.len() < self.config.max_delayed_messages
                && self.range_headroom(&state) > 0
                && self
                    .log
                    .last_position()
                    .is_some_and(|last| last >= state.read_position)
            {
                ReadPlan::New {
                    from: state.read_position,
                    max_entries: max_entries.min(self.range_headroom(&state) as usize),
                }
            } else {
                return Round::Idle { wake_at_ms };
            };
            (plan, state.generation)
        };

        let log = self.log.clone();
        let max_bytes = self.config.dispatch_max_bytes_per_read;
        let planned_replay: Vec<Position> = match &plan {
            ReadPlan::Replay(positions) => positions.clone(),
            ReadPlan::New { .. } => Vec::new(),
        };
        let is_replay = !planned_replay.is_empty();
        // Entries still in the cache are taken here; a blocking thread (a hand-off and a
        // wake-up each way) is only for reads from the files.
        // A read that panics (a bug) costs this round, as on a blocking thread, and not the
        // dispatcher task: the round is retried like a failed read.
        let cached = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            plan.read_cached(&log, max_bytes)
        }));
        let read = match cached {
            Ok(Ok(Some(entries))) => Ok(Ok(entries)),
            Ok(Err(error)) => Ok(Err(error)),
            Ok(Ok(None)) => tokio::task::spawn_blocking(move || plan.read(&log, max_bytes))
                .await
                .map_err(|error| error.to_string()),
            Err(_) => Err("the read from the cache panicked".to_string()),
        };
        let entries = match read {
            Ok(Ok(entries)) => entries,
            Ok(Err(error)) => {
                // A log that refuses service was reported once, when it was found (health);
                // the retries that meet it again add nothing to the ERROR log.
                if matches!(error, meridian_storage::StorageError::Corrupted { .. }) {
                    tracing::debug!(topic = %self.topic, subscription = %self.name, %error, "dispatch read refused: the log refuses service");
                } else {
                    tracing::error!(topic = %self.topic, subscription = %self.name, %error, "dispatch read failed");
                }
                return Round::Idle {
                    wake_at_ms: Some(now_ms() + 1000),
                };
            }
            Err(error) => {
                tracing::error!(topic = %self.topic, subscription = %self.name, %error, "dispatch read task failed");
                return Round::Idle {
                    wake_at_ms: Some(now_ms() + 1000),
                };
            }
        };

        let mut state = self.lock();
        if state.generation != generation {
            return Round::Progress;
        }
        let replay_before = state.replay.len();
        // Planned entries that no longer exist (trimmed) leave the replay set.
        if is_replay {
            let read: HashSet<Position> = entries.iter().map(|entry| entry.position).collect();
            for position in &planned_replay {
                if !read.contains(position) {
                    state.replay.remove(position);
                }
            }
        }
        self.assign(&mut state, entries, is_replay);
        if is_replay && state.replay.len() >= replay_before {
            // Nothing left the replay set (each entry read went back to it: nobody could take
            // it): wait for permits, acks or room. Entries that left it without going out
            // (acknowledged meanwhile by an admin's skip or expiry, or another cluster; trimmed)
            // are progress: the replay entries after them, and new ones, are for the next round.
            return Round::Idle {
                wake_at_ms: state.delayed.keys().next().map(|(at, _)| *at),
            };
        }
        Round::Progress
    }

    /// How many new entries may go out: the storage's `cursor_max_ranges` less the cursor's
    /// ranges of individually acknowledged entries and the messages in flight (each of whose
    /// acknowledgements can start one more range), so that acknowledgements of what was sent
    /// never exceed the limit. At 0 the subscription is blocked (Pulsar's blocked subscription)
    /// until acknowledgements arrive; entries to redeliver still go out, since their
    /// acknowledgements fill the gaps between ranges.
    ///
    /// Entries before the end of the last range are gaps between ranges (after a restart, or
    /// acknowledged from elsewhere): they always go out, or a subscription at the limit with
    /// nothing in flight would wait forever.
    fn range_headroom(&self, state: &DispatchState) -> u64 {
        let in_flight: u64 = state
            .consumers
            .iter()
            .map(|consumer| consumer.unacked_messages)
            .sum();
        let (ranges, last_acknowledged) = self.log.acknowledged_ranges(&self.cursor);
        let headroom =
            (self.log.cursor_max_ranges() as u64).saturating_sub(ranges as u64 + in_flight);
        let gaps = match last_acknowledged {
            Some(last) if last >= state.read_position => {
                let before = self.log.previous_position(state.read_position);
                self.log
                    .entries_after(before)
                    .saturating_sub(self.log.entries_after(Some(last)))
            }
            _ => 0,
        };
        headroom + gaps
    }

    /// Whether `consumer` can take a message now: permits, below its unacknowledged limit, and
    /// room on its connection. One that lacks only room asks its connection to wake the
    /// dispatcher once it has drained, and is skipped meanwhile.
    fn can_take(&self, consumer: &ConsumerSlot) -> bool {
        if consumer.permits <= 0
            || consumer.unacked_messages >= self.config.max_unacked_messages_per_consumer
            || consumer.closed.load(Ordering::Relaxed)
            || consumer.sink.is_closed()
        {
            return false;
        }
        if consumer.sink.has_room() {
            return true;
        }
        consumer.sink.notify_when_room(&self.wake);
        false
    }

    /// Permits of the consumers that can receive now.
    fn available_permits(&self, state: &DispatchState) -> u64 {
        let usable = |consumer: &ConsumerSlot| {
            if self.can_take(consumer) {
                consumer.permits as u64
            } else {
                0
            }
        };
        match state.kind {
            SubscriptionType::Exclusive | SubscriptionType::Failover => state
                .active
                .and_then(|active| {
                    state
                        .consumers
                        .iter()
                        .find(|consumer| consumer.key == active)
                })
                .map(usable)
                .unwrap_or(0),
            SubscriptionType::Shared | SubscriptionType::KeyShared => {
                state.consumers.iter().map(usable).sum()
            }
        }
    }

    /// The replay entries to read this round, oldest first. For Key_Shared only those whose
    /// key's consumer can take them now: the entries of a consumer that does not read must not
    /// hide, at the head of the replay set, those of the others.
    fn replay_to_send(&self, state: &DispatchState, max_entries: usize) -> Vec<Position> {
        let can_send = |hash: &Option<u16>| match (state.kind, hash) {
            (SubscriptionType::KeyShared, Some(hash)) => self
                .key_shared_owner(state, *hash)
                .and_then(|key| state.consumers.iter().find(|consumer| consumer.key == key))
                .is_some_and(|consumer| self.can_take(consumer)),
            _ => true,
        };
        state
            .replay
            .iter()
            .filter(|(_, hash)| can_send(hash))
            .take(max_entries)
            .map(|(position, _)| *position)
            .collect()
    }

    fn key_shared_owner(&self, state: &DispatchState, hash: u16) -> Option<u64> {
        if let Some(consumer) = state.consumers.iter().find(|consumer| {
            consumer
                .sticky_ranges
                .iter()
                .any(|(start, end)| (*start..=*end).contains(&hash))
        }) {
            return Some(consumer.key);
        }
        if state.ring.is_empty() {
            return None;
        }
        let index = state.ring.partition_point(|(point, _)| *point < hash);
        Some(state.ring[index % state.ring.len()].1)
    }

    /// Assigns entries to consumers and queues their MESSAGE frames (never waiting: a consumer
    /// is chosen only while its connection has room).
    fn assign(&self, state: &mut DispatchState, entries: Vec<Entry>, is_replay: bool) {
        let now = now_ms();
        // Key_Shared: keys with an earlier message waiting for replay must not be overtaken.
        let mut blocked_hashes: HashSet<u16> = if is_replay {
            HashSet::new()
        } else {
            state.replay.values().flatten().copied().collect()
        };
        let mut last_read = None;
        // Whether other clusters' acknowledgements are known here (replicated subscriptions).
        let acknowledged_elsewhere = !self
            .acknowledged_elsewhere
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_empty();
        // Each consumer's frames go to its connection together (counted against the
        // connection's limit one by one, as `can_take` looks at it): when this is dropped.
        let mut staged: Vec<Option<Staged>> = state.consumers.iter().map(|_| None).collect();
        // New entries' acknowledgements looked up for the whole round under one hold of the
        // log's lock, not once per entry. Replayed ones were delivered before, and may be
        // acknowledged while the round goes on: each is looked up at its turn, so that one
        // acknowledged meanwhile is not delivered again.
        let round_lookup = (!is_replay).then(|| {
            let positions: Vec<Position> = entries.iter().map(|entry| entry.position).collect();
            self.log.acknowledged_each(&self.cursor, &positions)
        });
        for (index, entry) in entries.into_iter().enumerate() {
            let position = entry.position;
            last_read = Some(position);
            if is_replay {
                state.replay.remove(&position);
            }
            let acknowledged = match &round_lookup {
                Some(acknowledged) => acknowledged[index],
                None => self.log.is_acknowledged(&self.cursor, position),
            };
            if acknowledged || state.pending.contains(position) {
                continue;
            }
            // Storage verified its own checksum on read; the producer's was verified on publish.
            let (messages, hash, deliver_at, is_marker, replicated) =
                match meridian_wire::entry_metadata_fields::<DispatchFields>(&entry.data) {
                    Ok(fields) => {
                        let key: &[u8] = match (&fields.ordering_key, &fields.partition_key) {
                            (Some(ordering_key), _) if !ordering_key.is_empty() => ordering_key,
                            (_, Some(partition_key)) if !partition_key.is_empty() => partition_key,
                            _ => b"NONE_KEY",
                        };
                        (
                            fields.num_messages_in_batch.unwrap_or(1).max(1) as u32,
                            sticky_key_hash(key),
                            fields
                                .deliver_at_time
                                .filter(|at| *at > 0)
                                .map(|at| at as u64),
                            fields.marker_type.is_some(),
                            fields.replicated_from.is_some(),
                        )
                    }
                    Err(error) => {
                        tracing::warn!(topic = %self.topic, %position, %error, "entry metadata does not decode; delivering it as one message");
                        (1, sticky_key_hash(b"NONE_KEY"), None, false, false)
                    }
                };
            // The whole metadata only where replication needs it: to strip a replicated
            // entry's origin, or to match the entry against other clusters' states.
            let parsed = (replicated || acknowledged_elsewhere)
                .then(|| meridian_wire::entry_metadata(entry.data.clone()).ok())
                .flatten();
            let covered_elsewhere = parsed
                .as_ref()
                .is_some_and(|metadata| self.is_acknowledged_elsewhere(position, metadata));
            // A batch another cluster acknowledged in part (its state may arrive before the
            // batch does): its messages acknowledged there are skipped here too, at once, not
            // only after the sync task's next tick records them.
            let mut ack_set = self.ack_set(position);
            if !covered_elsewhere {
                if let Some(words) = parsed
                    .as_ref()
                    .and_then(|metadata| self.acknowledged_in_part_elsewhere(position, metadata))
                {
                    let local = (!ack_set.is_empty()).then(|| batch_acks::from_wire(&ack_set));
                    ack_set = batch_acks::to_wire(&batch_acks::merge(local.as_deref(), &words));
                }
            }
            let covered_elsewhere = covered_elsewhere
                || (!ack_set.is_empty()
                    && batch_acks::is_complete(&batch_acks::from_wire(&ack_set)));
            if is_marker || covered_elsewhere {
                // What other clusters' states cover (with what was acknowledged here in part)
                // is theirs to tell: mirrored, as the sync's applications.
                let kind = if is_marker {
                    ChangeKind::Own
                } else {
                    ChangeKind::Mirrored
                };
                if let Err(error) = self.log.acknowledge_as(&self.cursor, &[position], kind) {
                    tracing::error!(topic = %self.topic, %error, "acknowledging a marker or an entry acknowledged in another cluster failed");
                }
                continue;
            }
            if let Some(at) = deliver_at {
                if at > now && state.kind.honours_delays() && self.config.delayed_delivery_enabled {
                    state.delayed.insert((at, position), Some(hash));
                    continue;
                }
            }
            let hash_for_routing = (state.kind == SubscriptionType::KeyShared).then_some(hash);
            let chosen = match hash_for_routing {
                Some(hash) if blocked_hashes.contains(&hash) => None,
                _ => self.choose_consumer(state, position, hash_for_routing),
            };
            let Some(consumer_index) = chosen else {
                // Nobody can take it now: keep it (and, for Key_Shared, everything after it
                // with the same key) for a later round.
                state.replay.insert(position, Some(hash));
                if let Some(hash) = hash_for_routing {
                    blocked_hashes.insert(hash);
                }
                continue;
            };
            let redelivery_count = if state.redelivery_counts.is_empty() {
                0
            } else {
                state.redelivery_counts.get(&position).copied().unwrap_or(0)
            };
            state.messages_per_entry.record(messages);
            let consumer = &mut state.consumers[consumer_index];
            consumer.permits -= i64::from(messages);
            consumer.unacked_messages += u64::from(messages);
            consumer
                .meter
                .record(u64::from(messages), entry.data.len() as u64);
            self.meter_out
                .record(u64::from(messages), entry.data.len() as u64);
            if redelivery_count > 0 {
                self.redelivered.record(u64::from(messages), 0);
            }
            let command = CommandMessage {
                consumer_id: consumer.consumer_id,
                message_id: message_id(position, self.partition_index),
                redelivery_count: (redelivery_count > 0).then_some(redelivery_count),
                ack_set,
                ..CommandMessage::default()
            };
            let data = match &parsed {
                Some(metadata) => crate::replication::chain::without_origin(metadata, entry.data),
                None => entry.data,
            };
            match meridian_wire::encode_message_frame(command, data) {
                Ok(frame) => staged[consumer_index]
                    .get_or_insert_with(|| Staged::new(&consumer.sink))
                    .push(frame),
                Err(error) => {
                    tracing::error!(topic = %self.topic, %error, "encoding MESSAGE failed")
                }
            }
            let consumer_key = consumer.key;
            state.pending.insert(
                position,
                Pending {
                    consumer_key,
                    messages,
                    hash: Some(hash),
                },
            );
        }
        if !is_replay {
            if let Some(last) = last_read {
                if last >= state.read_position {
                    state.read_position = self.log.next_position(last);
                }
            }
        }
    }

    /// The index of the consumer that gets `position`, if one can take it now.
    fn choose_consumer(
        &self,
        state: &mut DispatchState,
        position: Position,
        hash: Option<u16>,
    ) -> Option<usize> {
        let can_take = |consumer: &ConsumerSlot| self.can_take(consumer);
        match state.kind {
            SubscriptionType::Exclusive | SubscriptionType::Failover => {
                let active = state.active?;
                let index = state
                    .consumers
                    .iter()
                    .position(|consumer| consumer.key == active)?;
                can_take(&state.consumers[index]).then_some(index)
            }
            SubscriptionType::Shared => {
                let count = state.consumers.len();
                // Lowest priority level first, round robin within it.
                let best_priority = state
                    .consumers
                    .iter()
                    .filter(|consumer| can_take(consumer))
                    .map(|consumer| consumer.priority)
                    .min()?;
                for step in 0..count {
                    let index = (state.round_robin + step) % count;
                    let consumer = &state.consumers[index];
                    if consumer.priority == best_priority && can_take(consumer) {
                        state.round_robin = (index + 1) % count;
                        return Some(index);
                    }
                }
                None
            }
            SubscriptionType::KeyShared => {
                let owner = self.key_shared_owner(state, hash?)?;
                let index = state
                    .consumers
                    .iter()
                    .position(|consumer| consumer.key == owner)?;
                if let Some(held_from) = state.consumers[index].held_from {
                    let earlier_in_flight =
                        state.pending.first().is_some_and(|first| first < held_from)
                            || state.replay.range(..held_from).next().is_some();
                    if earlier_in_flight && position >= held_from {
                        return None;
                    }
                    if !earlier_in_flight {
                        state.consumers[index].held_from = None;
                    }
                }
                can_take(&state.consumers[index]).then_some(index)
            }
        }
    }
}

/// Drops the pending record of an acknowledged entry; true if there was one (or a
/// redelivery count).
fn forget_pending(state: &mut DispatchState, position: Position) -> bool {
    let pending = state.pending.remove(position);
    if let Some(pending) = &pending {
        if let Some(consumer) = state
            .consumers
            .iter_mut()
            .find(|consumer| consumer.key == pending.consumer_key)
        {
            consumer.unacked_messages = consumer
                .unacked_messages
                .saturating_sub(u64::from(pending.messages));
        }
    }
    // Usually empty (only negative acknowledgements and redeliveries fill it): not hashed then.
    let counted =
        !state.redelivery_counts.is_empty() && state.redelivery_counts.remove(&position).is_some();
    counted | pending.is_some()
}

/// Moves a consumer's pending entries (all, or the listed ones) to the replay set.
fn redeliver_pending_of(
    state: &mut DispatchState,
    key: u64,
    positions: Option<Vec<Position>>,
    count_it: bool,
) {
    let chosen: Vec<Position> = match positions {
        Some(positions) => positions
            .into_iter()
            .filter(|position| {
                state
                    .pending
                    .get(*position)
                    .is_some_and(|pending| pending.consumer_key == key)
            })
            .collect(),
        None => state
            .pending
            .iter()
            .filter(|(_, pending)| pending.consumer_key == key)
            .map(|(position, _)| position)
            .collect(),
    };
    for position in chosen {
        if let Some(pending) = state.pending.remove(position) {
            if let Some(consumer) = state
                .consumers
                .iter_mut()
                .find(|consumer| consumer.key == key)
            {
                consumer.unacked_messages = consumer
                    .unacked_messages
                    .saturating_sub(u64::from(pending.messages));
            }
            state.replay.insert(position, pending.hash);
            if count_it {
                *state.redelivery_counts.entry(position).or_insert(0) += 1;
            }
        }
    }
}

/// Sends frames without waiting (control frames; a full queue drops them with a warning, and
/// a closed one means the consumer is gone anyway).
fn send_now(frames: Vec<(OutboundSender, Outbound)>) {
    for (sink, frame) in frames {
        if let Err(TrySendError::Full(_)) = sink.try_send(frame) {
            tracing::warn!("connection queue full; control frame dropped");
        }
    }
}

/// A Key_Shared consumer may join only in the subscription's mode (auto-split, or sticky with
/// ranges of its own), and its sticky ranges must be well formed and overlap neither each other
/// nor another consumer's, as in Pulsar: otherwise one consumer could claim every key of a
/// subscription and, never reading, stop everybody else.
fn check_sticky_ranges(
    subscription: &str,
    consumers: &[ConsumerSlot],
    ranges: &[IntRange],
) -> Result<()> {
    let sticky = !ranges.is_empty();
    if let Some(existing) = consumers.first() {
        if existing.sticky_ranges.is_empty() == sticky {
            let (mode, other) = if sticky {
                ("auto-split", "sticky")
            } else {
                ("sticky", "auto-split")
            };
            return Err(BrokerError::ConsumerBusy(format!(
                "Key_Shared subscription {subscription} is in {mode} mode: a {other} consumer cannot join"
            )));
        }
    }
    let mut claimed: Vec<(i32, i32, Option<&str>)> = Vec::with_capacity(ranges.len());
    for range in ranges {
        if range.start < 0 || range.end > 65_535 || range.start > range.end {
            return Err(BrokerError::NotAllowed(format!(
                "invalid sticky hash range [{}, {}]: ranges lie within [0, 65535], start <= end",
                range.start, range.end
            )));
        }
        claimed.push((range.start, range.end, None));
    }
    for consumer in consumers {
        for (start, end) in &consumer.sticky_ranges {
            claimed.push((
                i32::from(*start),
                i32::from(*end),
                Some(consumer.name.as_str()),
            ));
        }
    }
    claimed.sort_unstable();
    for pair in claimed.windows(2) {
        let ((start, end, owner), (next_start, next_end, next_owner)) = (pair[0], pair[1]);
        if next_start <= end {
            let holder = match owner.or(next_owner) {
                Some(name) => format!("consumer {name:?}"),
                None => "the same consumer".to_string(),
            };
            return Err(BrokerError::ConsumerBusy(format!(
                "sticky hash ranges [{start}, {end}] and [{next_start}, {next_end}] overlap \
                 (one held by {holder}) on subscription {subscription}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use meridian_storage::{InitialPosition, Storage, StorageConfig};
    use meridian_wire::proto::MessageMetadata;

    use super::{MessagesPerEntry, NewConsumer, StartPosition, Subscription, SubscriptionType};
    use crate::config::BrokerConfig;
    use crate::outbound::{outbound_queue, OutboundReceiver};

    /// Subscription `name` of `log` with one Exclusive consumer (key 1) whose connection has
    /// room for everything: its dispatcher task is started, the connection's receiving end
    /// is returned.
    fn subscribed(
        log: &Arc<meridian_storage::Log>,
        name: &str,
    ) -> (Arc<Subscription>, OutboundReceiver) {
        let subscription = Subscription::open(
            name.to_string(),
            name.to_string(),
            true,
            SubscriptionType::Exclusive,
            StartPosition::Initial(InitialPosition::Earliest),
            "persistent://t/n/fair".to_string(),
            -1,
            log.clone(),
            Arc::new(BrokerConfig::default()),
            Arc::new(AtomicBool::new(false)),
            Arc::new(Mutex::new(())),
            false,
        )
        .expect("subscription");
        let (sink, receiver) = outbound_queue(256 << 20);
        subscription
            .add_consumer(
                1,
                NewConsumer {
                    consumer_id: 1,
                    name: format!("{name}-consumer"),
                    priority: 0,
                    kind: SubscriptionType::Exclusive,
                    sink,
                    closed: Arc::new(AtomicBool::new(false)),
                    sticky_ranges: Vec::new(),
                    allow_out_of_order: false,
                    replicate_state: false,
                    address: "127.0.0.1:1".to_string(),
                    client_version: "test".to_string(),
                    protocol_version: 21,
                },
            )
            .expect("consumer");
        (subscription, receiver)
    }

    fn messages_queued(receiver: &mut OutboundReceiver) -> usize {
        std::iter::from_fn(|| receiver.try_recv())
            .map(|frame| frame.messages())
            .sum()
    }

    /// A dispatcher whose reads are all served from the entry cache never waits for anything:
    /// one subscription catching up on a cached backlog must still let the runtime's other
    /// tasks run between its read rounds (here, on one thread, another subscription's
    /// dispatcher), rather than deliver its whole backlog before anybody else gets a message.
    #[tokio::test]
    async fn a_dispatcher_reading_from_the_cache_lets_other_subscriptions_deliver_between_rounds() {
        const ENTRIES: usize = 2_000;
        let directory = tempfile::tempdir().expect("directory");
        let storage = Storage::open(directory.path(), StorageConfig::default()).expect("storage");
        let log = storage.open_log("fair").expect("log");
        let appends: Vec<_> = (0..ENTRIES)
            .map(|index| {
                let metadata = MessageMetadata {
                    producer_name: "p".to_string(),
                    sequence_id: index as u64,
                    publish_time: 1,
                    ..MessageMetadata::default()
                };
                let entry = meridian_wire::encode_entry(&metadata, b"payload").expect("encodes");
                log.append(entry, 1).expect("appends")
            })
            .collect();
        for append in appends {
            append.await.expect("durable");
        }
        let (first, mut first_receiver) = subscribed(&log, "first");
        let (second, mut second_receiver) = subscribed(&log, "second");
        // Both consumers ask for the whole backlog; the first subscription's dispatcher is
        // woken first.
        first.flow(1, ENTRIES as u32);
        second.flow(1, ENTRIES as u32);

        // The second subscription's first message...
        let mut second_total = 0;
        while second_total == 0 {
            second_total += second_receiver.recv().await.expect("open").messages();
        }
        // ...did not have to wait for the first subscription's whole backlog to go out.
        let delivered_first = messages_queued(&mut first_receiver);
        assert!(
            delivered_first < ENTRIES,
            "the first subscription delivered all its {delivered_first} messages before the \
             second one delivered any"
        );
        // Nothing is lost: both get everything once the runtime lets them finish.
        let mut first_total = delivered_first;
        while first_total < ENTRIES {
            first_total += first_receiver.recv().await.expect("open").messages();
        }
        while second_total < ENTRIES {
            second_total += second_receiver.recv().await.expect("open").messages();
        }
        first.stop();
        second.stop();
    }

    #[test]
    fn permits_become_entries_by_the_messages_per_entry_seen() {
        let mut average = MessagesPerEntry::default();
        // Unbatched until entries are seen: one entry per permit.
        assert_eq!(average.entries_for(1000), 1000);
        assert_eq!(average.entries_for(0), 1);
        for _ in 0..60 {
            average.record(128);
        }
        // 1,000 permits take 8 batches of 128 (the eighth takes the permits below zero).
        assert_eq!(average.entries_for(1000), 8);
        assert_eq!(average.entries_for(1), 1);
        // Back to single messages: the average follows within tens of entries.
        for _ in 0..60 {
            average.record(1);
        }
        assert_eq!(average.entries_for(1000), 1000);
        average.record(0);
        assert_eq!(average.entries_for(5), 5);
        // A client's flows may add up to any count of permits.
        assert_eq!(average.entries_for(u64::MAX), 1 << 60);
    }
}
