//! The receiver queue: messages a consumer's engine has decoded and the
//! application has not yet received.
//!
//! The queue is bounded by flow control, not by a capacity check: the engine
//! grants the broker `receiver_queue_size` permits, the broker sends at most
//! that many messages (a batch entry may overshoot by the rest of its batch,
//! as in Pulsar), and permits are granted again only for messages the
//! application has received (or the engine has skipped). So the queue never
//! holds more than `receiver_queue_size` plus one batch, and a broker that
//! ignores its permits is caught earlier, by the bounded event channel of the
//! connection (which then closes).
//!
//! The application side pops messages and counts them; once half the queue
//! size has been received, it wakes the engine to send FLOW for them. The
//! mutex is held only for queue operations, never across an await.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::error::Error;
use crate::message::Message;
use crate::message_id::MessageId;

#[derive(Default)]
struct QueueState {
    messages: VecDeque<Message>,
    /// Messages received or skipped since the last FLOW.
    consumed: u32,
    /// The last message the application received.
    last_dequeued: Option<MessageId>,
    /// Why the queue will never fill again (the consumer closed or failed).
    closed: Option<Error>,
    end_of_topic: bool,
}

/// What [`ReceiverQueue::pop`] found.
pub(crate) enum Popped {
    Message(Message),
    /// Nothing now; more may come.
    Empty,
    /// Nothing now and never again.
    Closed(Error),
    /// Nothing now; the topic is terminated and fully delivered.
    EndOfTopic,
}

pub(crate) struct ReceiverQueue {
    state: Mutex<QueueState>,
    /// Wakes receivers; shared by the partitions of one consumer.
    ready: Arc<Notify>,
    /// Wakes the engine when enough messages were consumed to grant permits.
    pub(crate) flow: Notify,
    refill_threshold: u32,
}

impl ReceiverQueue {
    pub(crate) fn new(ready: Arc<Notify>, receiver_queue_size: u32) -> ReceiverQueue {
        ReceiverQueue {
            state: Mutex::new(QueueState::default()),
            ready,
            flow: Notify::new(),
            refill_threshold: (receiver_queue_size / 2).max(1),
        }
    }

    fn state(&self) -> MutexGuard<'_, QueueState> {
        // Every update is complete before the lock is released.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds decoded messages, in order.
    pub(crate) fn push(&self, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        self.state().messages.extend(messages);
        self.ready.notify_one();
    }

    /// Takes the next message for the application.
    pub(crate) fn pop(&self) -> Popped {
        let (popped, more, refill) = {
            let mut state = self.state();
            match state.messages.pop_front() {
                Some(message) => {
                    state.consumed = state.consumed.saturating_add(1);
                    state.last_dequeued = Some(message.id);
                    let refill = state.consumed >= self.refill_threshold;
                    (Popped::Message(message), !state.messages.is_empty(), refill)
                }
                None => {
                    let popped = match (&state.closed, state.end_of_topic) {
                        (Some(error), _) => Popped::Closed(error.clone()),
                        (None, true) => Popped::EndOfTopic,
                        (None, false) => Popped::Empty,
                    };
                    (popped, false, false)
                }
            }
        };
        if refill {
            self.flow.notify_one();
        }
        if more {
            // Another receiver may be waiting for what is left.
            self.ready.notify_one();
        }
        popped
    }

    /// Counts messages the engine dropped without queueing them; returns
    /// whether enough are consumed to grant permits.
    pub(crate) fn add_consumed(&self, count: u32) -> bool {
        let mut state = self.state();
        state.consumed = state.consumed.saturating_add(count);
        state.consumed >= self.refill_threshold
    }

    /// Takes the count of consumed messages, to grant as permits.
    pub(crate) fn take_consumed(&self) -> u32 {
        std::mem::take(&mut self.state().consumed)
    }

    /// Empties the queue (seek, redeliver-all). The dropped messages count
    /// as consumed: the broker spent permits on them.
    pub(crate) fn clear(&self) {
        let mut state = self.state();
        let cleared = u32::try_from(state.messages.len()).unwrap_or(u32::MAX);
        state.messages.clear();
        state.consumed = state.consumed.saturating_add(cleared);
    }

    /// Empties the queue for a new subscription: permits start afresh.
    pub(crate) fn reset(&self) {
        let mut state = self.state();
        state.messages.clear();
        state.consumed = 0;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.state().messages.is_empty()
    }

    pub(crate) fn last_dequeued(&self) -> Option<MessageId> {
        self.state().last_dequeued
    }

    pub(crate) fn set_last_dequeued(&self, id: Option<MessageId>) {
        self.state().last_dequeued = id;
    }

    pub(crate) fn set_end_of_topic(&self) {
        self.state().end_of_topic = true;
        self.ready.notify_waiters();
        self.ready.notify_one();
    }

    /// No more messages will come; receivers get `error` once the queue is empty.
    pub(crate) fn close(&self, error: Error) {
        {
            let mut state = self.state();
            if state.closed.is_none() {
                state.closed = Some(error);
            }
        }
        self.ready.notify_waiters();
        self.ready.notify_one();
    }
}
