//! A topic (or one partition of a partitioned topic): its log, producers, subscriptions and
//! de-duplication state.
//!
//! Lock order: a topic's state lock may be held while taking a subscription's or the log's
//! lock, never the other way round.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use meridian_storage::{InitialPosition, Log, Position};
use tokio::sync::oneshot;

use crate::broker::BrokerShared;
use crate::dedup::{Dedup, Verdict, DEDUP_CURSOR};
use crate::error::{BrokerError, Result};
use crate::subscription::{NewConsumer, StartPosition, Subscription, SubscriptionType};
use crate::topic_name::TopicName;

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
}

/// A future that completes when a publish is durable: `Some(position)`, or `None` for a
/// duplicate that was not stored again.
pub type PublishFuture = Pin<Box<dyn Future<Output = Result<Option<Position>>> + Send>>;

struct ProducerEntry {
    name: String,
    mode: AccessMode,
}

struct Waiting {
    key: u64,
    name: String,
    ready: oneshot::Sender<()>,
}

struct TopicState {
    producers: HashMap<u64, ProducerEntry>,
    waiting_for_exclusive: VecDeque<Waiting>,
    subscriptions: HashMap<String, Arc<Subscription>>,
    dedup: Option<Dedup>,
    /// Appended entries whose completion has not been processed yet (bounds dedup snapshots).
    in_flight: BTreeSet<Position>,
}

pub struct Topic {
    pub name: TopicName,
    full_name: String,
    partition_index: i32,
    log: Arc<Log>,
    shared: Arc<BrokerShared>,
    state: Mutex<TopicState>,
}

/// Cursor names the broker uses for itself; never shown or usable as subscriptions.
pub fn is_system_cursor(name: &str) -> bool {
    name == DEDUP_CURSOR || name.starts_with("__reader-")
}

impl Topic {
    /// Opens the topic's log and recovers its de-duplication state. Blocking: call it off the
    /// async runtime.
    pub(crate) fn load(shared: Arc<BrokerShared>, name: TopicName) -> Result<Arc<Topic>> {
        let full_name = name.to_string();
        let log = shared.storage.open_log(&full_name)?;
        let dedup = if shared.config.deduplication_enabled {
            Some(recover_dedup(&log)?)
        } else {
            if log.cursor(DEDUP_CURSOR).is_some() {
                // De-duplication was switched off: its cursor must not hold back trimming.
                log.delete_cursor(DEDUP_CURSOR)?;
            }
            None
        };
        let partition_index = name.partition_index().map_or(-1, |index| index as i32);
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
            }),
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

    /// Admits a producer, enforcing unique names and access modes.
    pub fn add_producer(&self, key: u64, request: NewProducer) -> Result<ProducerGrant> {
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
                .any(|waiting| waiting.name == name)
        {
            return Err(BrokerError::ProducerBusy(format!(
                "producer with name '{name}' is already connected to topic {}",
                self.full_name
            )));
        }
        let last_sequence_id = state
            .dedup
            .as_ref()
            .map_or(-1, |dedup| dedup.last_sequence_id(&name));
        let exclusive_holder = state
            .producers
            .values()
            .find(|producer| producer.mode.is_exclusive());
        let mut ready = None;
        match request.mode {
            AccessMode::Shared => {
                if exclusive_holder.is_some() {
                    return Err(BrokerError::ProducerBusy(format!(
                        "topic {} has an exclusive producer",
                        self.full_name
                    )));
                }
            }
            AccessMode::Exclusive | AccessMode::ExclusiveWithFencing => {
                if !state.producers.is_empty() {
                    return Err(BrokerError::ProducerFenced(format!(
                        "topic {} already has {} producer(s); exclusive access refused",
                        self.full_name,
                        state.producers.len()
                    )));
                }
            }
            AccessMode::WaitForExclusive => {
                if !state.producers.is_empty() {
                    let (sender, receiver) = oneshot::channel();
                    state.waiting_for_exclusive.push_back(Waiting {
                        key,
                        name: name.clone(),
                        ready: sender,
                    });
                    ready = Some(receiver);
                }
            }
        }
        if ready.is_none() {
            state.producers.insert(
                key,
                ProducerEntry {
                    name: name.clone(),
                    mode: request.mode,
                },
            );
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
        if state.producers.remove(&key).is_none() || !state.producers.is_empty() {
            return;
        }
        while let Some(next) = state.waiting_for_exclusive.pop_front() {
            if next.ready.send(()).is_ok() {
                state.producers.insert(
                    next.key,
                    ProducerEntry {
                        name: next.name,
                        mode: AccessMode::WaitForExclusive,
                    },
                );
                return;
            }
        }
    }

    /// Appends an entry (exactly the bytes the producer sent after the command) unless
    /// de-duplication recognises it.
    pub fn publish(
        self: &Arc<Self>,
        producer_name: &str,
        sequence_id: u64,
        highest_sequence_id: u64,
        entry: Bytes,
        publish_time_ms: u64,
    ) -> Result<PublishFuture> {
        let highest = sequence_id.max(highest_sequence_id);
        let pending = {
            let mut state = self.lock();
            match state.dedup.as_mut().map(|dedup| dedup.check(producer_name, sequence_id, highest)) {
                Some(Verdict::Duplicate) => return Ok(Box::pin(std::future::ready(Ok(None)))),
                Some(Verdict::Unknown) => {
                    return Err(BrokerError::Unknown(format!(
                        "message {sequence_id} of producer {producer_name} may still be in flight; retry"
                    )))
                }
                Some(Verdict::New) | None => {}
            }
            match self.log.append(entry, publish_time_ms) {
                Ok(pending) => {
                    if state.dedup.is_some() {
                        state.in_flight.insert(pending.position());
                    }
                    pending
                }
                Err(error) => {
                    if let Some(dedup) = state.dedup.as_mut() {
                        dedup.reset_pushed();
                    }
                    return Err(error.into());
                }
            }
        };
        let topic = self.clone();
        let producer_name = producer_name.to_string();
        Ok(Box::pin(async move {
            let position = pending.position();
            let result = pending.await;
            topic.append_completed(&producer_name, highest, position, result.is_ok());
            Ok(Some(result?))
        }))
    }

    fn append_completed(
        &self,
        producer_name: &str,
        highest_sequence_id: u64,
        position: Position,
        succeeded: bool,
    ) {
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
        dedup.persisted(producer_name, highest_sequence_id);
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
        if subscription.is_empty() || is_system_cursor(subscription) {
            return Err(BrokerError::NotAllowed(format!(
                "invalid subscription name {subscription:?}"
            )));
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
                )?;
                state
                    .subscriptions
                    .insert(subscription.to_string(), created.clone());
                (created, true)
            }
        };
        if let Err(error) = existing.add_consumer(key, consumer) {
            if created {
                self.drop_subscription(&mut state, subscription);
            }
            return Err(error);
        }
        Ok(existing)
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
    }

    fn drop_subscription(&self, state: &mut TopicState, subscription: &str) {
        if let Some(removed) = state.subscriptions.remove(subscription) {
            removed.stop();
            if let Err(error) = self.log.delete_cursor(removed.cursor_name()) {
                tracing::warn!(topic = %self.full_name, %error, "deleting cursor failed");
            }
        }
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
        let mark_delete = match target {
            SeekTarget::Earliest => None,
            SeekTarget::Latest => self.log.last_position(),
            SeekTarget::Position(position) => self.log.previous_position(position),
            SeekTarget::PublishTime(time) => match self.log.find_by_publish_time(time)? {
                Some(position) => self.log.previous_position(position),
                None => self.log.last_position(),
            },
        };
        existing.seek(mark_delete)
    }

    /// The last entry's position and, if it is a batch, the index of its last message.
    pub fn last_message_id(&self) -> Result<Option<(Position, i32)>> {
        let Some(last) = self.log.last_position() else {
            return Ok(None);
        };
        let entry = self.log.read(last)?;
        let batch_index = match meridian_wire::parse_entry(entry.data) {
            Ok(parsed) => match parsed.metadata.num_messages_in_batch {
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
            .filter(|name| !is_system_cursor(name))
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
            if let Ok(parsed) = meridian_wire::parse_entry(entry.data) {
                let metadata = parsed.metadata;
                let batch_last = metadata.sequence_id
                    + (metadata.num_messages_in_batch.unwrap_or(1).max(1) as u64 - 1);
                let highest = batch_last.max(metadata.highest_sequence_id.unwrap_or(0));
                dedup.persisted(&metadata.producer_name, highest);
            }
        }
        next = log.next_position(last);
    }
    Ok(dedup)
}
