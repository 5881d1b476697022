//! Frames the broker hands to a connection's writer, through a queue bounded in bytes.
//!
//! One queue per connection. Its limit is in bytes because frames vary from a 10-byte PONG to a
//! 5 MiB MESSAGE: a limit in frames would let one slow client hold gigabytes. Three ways in:
//! - [`OutboundSender::send`] waits for room (responses, receipts: their sender slows down with
//!   the client, which is the back-pressure);
//! - [`OutboundSender::push`] never waits: dispatchers check [`OutboundSender::has_room`] first
//!   and skip a full connection, so one client that does not read never holds up the others
//!   (the limit is then exceeded by at most one frame per dispatcher, i.e. per subscription
//!   consumed on the connection);
//! - [`OutboundSender::try_send`] for small control frames, which may use a little headroom
//!   beyond the limit so that CLOSE_CONSUMER or a PING still reaches a connection full of
//!   messages, and are dropped beyond it.
//!
//! A dispatch round's MESSAGE frames for one consumer go through [`Staged`]: each counts
//! against the limit as it is added, as if pushed, and the round's frames are handed to the
//! writer together, as one [`Outbound::Payloads`] (one hand-off through the channel per round
//! instead of one per message; issue 16).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Bytes, BytesMut};
use meridian_wire::encode::PayloadFrame;
use meridian_wire::{encode_command, BaseCommand};
use tokio::sync::mpsc::error::{SendError, TrySendError};
use tokio::sync::{mpsc, Notify};

/// Bytes queued in every connection's queue together (the `meridian_outbound_queued_bytes`
/// metric).
static QUEUED_BYTES_ALL_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Bytes queued for clients over all connections, not yet written to their sockets.
pub fn queued_bytes_all_connections() -> usize {
    QUEUED_BYTES_ALL_CONNECTIONS.load(Ordering::Relaxed)
}

/// Headroom beyond the byte limit for control frames ([`OutboundSender::try_send`]).
pub const CONTROL_HEADROOM_BYTES: usize = 64 * 1024;

/// MESSAGE frames queued together in one [`Outbound::Payloads`] at most: their slices
/// (two each) fit in one vectored write of the connection's writer.
pub const MAX_STAGED_FRAMES: usize = 128;

/// Bytes after which a [`Staged`] run goes to the writer (it ends with the frame that crossed
/// it). The writer frees a queue's room after each of its writes, about 1 MiB at most: a run
/// of a whole round (up to 5 MiB) would hold the room back until all of it is on the socket,
/// and a slow but reading client's answers would wait for room that long.
pub const MAX_STAGED_BYTES: usize = 256 * 1024;

/// One frame, or a run of MESSAGE frames, to write to a client, already encoded.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A simple command frame.
    Frame(Bytes),
    /// MESSAGE frames of one dispatch round, in order ([`Staged`]; at most
    /// [`MAX_STAGED_FRAMES`]), each a fresh header in front of a stored entry (never copied).
    Payloads(Payloads),
}

/// MESSAGE frames written one after the other, with their length on the wire.
#[derive(Debug, Clone, Default)]
pub struct Payloads {
    frames: Vec<PayloadFrame>,
    bytes: usize,
}

impl Payloads {
    pub fn frames(&self) -> &[PayloadFrame] {
        &self.frames
    }
}

/// Memory a queued frame takes beyond its bytes, counted against the limit: the queue's slot
/// (an `Outbound`, 112 bytes: it holds a MESSAGE frame's header inline) and a command frame's
/// allocation (its header and rounding, up to 64 bytes). A queue of 30-byte receipts (for a
/// producer that never reads them) would otherwise hold about six times its limit in memory.
pub const FRAME_OVERHEAD_BYTES: usize = std::mem::size_of::<Outbound>() + 64;

impl Outbound {
    /// Bytes this frame takes on the wire.
    pub fn len(&self) -> usize {
        match self {
            Outbound::Frame(frame) => frame.len(),
            Outbound::Payloads(payloads) => payloads.bytes,
        }
    }

    /// The MESSAGE frames this item holds.
    pub fn messages(&self) -> usize {
        match self {
            Outbound::Frame(_) => 0,
            Outbound::Payloads(payloads) => payloads.frames.len(),
        }
    }

    /// The slices a vectored write of this item takes: a MESSAGE's header and entry are two.
    pub fn slices(&self) -> usize {
        match self {
            Outbound::Frame(_) => 1,
            Outbound::Payloads(payloads) => 2 * payloads.frames.len(),
        }
    }

    /// What this item counts against its queue's limit: its bytes plus
    /// [`FRAME_OVERHEAD_BYTES`] for each frame in it.
    pub fn charge(&self) -> usize {
        self.len() + FRAME_OVERHEAD_BYTES * self.messages().max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// State shared by the two ends of one connection's queue.
struct Queue {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Wakes senders waiting in [`OutboundSender::send`] once bytes were written.
    room: Notify,
    /// Dispatchers that skipped this connection because it was full; woken when it has room.
    waiting_dispatchers: Mutex<Vec<Weak<Notify>>>,
}

impl Queue {
    fn has_room(&self) -> bool {
        self.queued_bytes.load(Ordering::SeqCst) < self.max_bytes
    }

    fn wake_everybody(&self) {
        self.room.notify_waiters();
        let waiting = std::mem::take(
            &mut *self
                .waiting_dispatchers
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for dispatcher in waiting.iter().filter_map(Weak::upgrade) {
            dispatcher.notify_one();
        }
    }
}

/// Where a connection's frames go: cloned for each producer and consumer of the connection.
#[derive(Clone)]
pub struct OutboundSender {
    frames: mpsc::UnboundedSender<Outbound>,
    queue: Arc<Queue>,
}

/// The connection writer's end of the queue.
pub struct OutboundReceiver {
    frames: mpsc::UnboundedReceiver<Outbound>,
    queue: Arc<Queue>,
    /// Bytes received from the queue and not yet reported [`written`](Self::written).
    unwritten: usize,
}

/// A connection's outbound queue holding at most about `max_bytes` (see the module notes).
pub fn outbound_queue(max_bytes: usize) -> (OutboundSender, OutboundReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let queue = Arc::new(Queue {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        room: Notify::new(),
        waiting_dispatchers: Mutex::new(Vec::new()),
    });
    (
        OutboundSender {
            frames: sender,
            queue: queue.clone(),
        },
        OutboundReceiver {
            frames: receiver,
            queue,
            unwritten: 0,
        },
    )
}

impl OutboundSender {
    /// Whether the queue holds less than its limit.
    pub fn has_room(&self) -> bool {
        self.queue.has_room()
    }

    /// Bytes queued and not yet written to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.queue.queued_bytes.load(Ordering::SeqCst)
    }

    /// Queues a frame without waiting, whatever the queue holds: for callers that checked
    /// [`has_room`](Self::has_room) and must not wait on one client.
    pub fn push(&self, frame: Outbound) -> Result<(), SendError<Outbound>> {
        let length = frame.charge();
        self.count(length);
        self.send_counted(frame, length)
    }

    /// Counts `length` bytes against the queue (and the total over all connections).
    fn count(&self, length: usize) {
        self.queue.queued_bytes.fetch_add(length, Ordering::SeqCst);
        QUEUED_BYTES_ALL_CONNECTIONS.fetch_add(length, Ordering::Relaxed);
    }

    /// Hands the writer a frame already [`count`](Self::count)ed as `length` bytes; a closed
    /// queue gives it back and its bytes leave the count.
    fn send_counted(&self, frame: Outbound, length: usize) -> Result<(), SendError<Outbound>> {
        self.frames.send(frame).inspect_err(|_| {
            self.queue.queued_bytes.fetch_sub(length, Ordering::SeqCst);
            QUEUED_BYTES_ALL_CONNECTIONS.fetch_sub(length, Ordering::Relaxed);
        })
    }

    /// Waits until the queue has room, then queues the frame. Fails only once the connection's
    /// writer is gone.
    pub async fn send(&self, frame: Outbound) -> Result<(), SendError<Outbound>> {
        loop {
            let room = self.queue.room.notified();
            tokio::pin!(room);
            // Registered before looking, so a write finishing in between is not missed.
            room.as_mut().enable();
            if self.frames.is_closed() {
                return Err(SendError(frame));
            }
            if self.has_room() {
                return self.push(frame);
            }
            room.await;
        }
    }

    /// Queues a small control frame if the queue holds less than its limit plus
    /// [`CONTROL_HEADROOM_BYTES`]; otherwise gives it back as `Full`.
    pub fn try_send(&self, frame: Outbound) -> Result<(), TrySendError<Outbound>> {
        if self.frames.is_closed() {
            return Err(TrySendError::Closed(frame));
        }
        let limit = self.queue.max_bytes.saturating_add(CONTROL_HEADROOM_BYTES);
        if self.queued_bytes().saturating_add(frame.charge()) > limit {
            return Err(TrySendError::Full(frame));
        }
        self.push(frame)
            .map_err(|SendError(frame)| TrySendError::Closed(frame))
    }

    /// Whether the connection's writer is gone (its consumers are about to be removed).
    pub fn is_closed(&self) -> bool {
        self.frames.is_closed()
    }

    /// Asks for `dispatcher` to be notified once this queue has room again. Nothing is promised
    /// for a closed queue: the connection removes its consumers.
    pub fn notify_when_room(&self, dispatcher: &Arc<Notify>) {
        let mut waiting = self
            .queue
            .waiting_dispatchers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        waiting.retain(|waiter| waiter.strong_count() > 0);
        if !waiting
            .iter()
            .any(|waiter| std::ptr::eq(waiter.as_ptr(), Arc::as_ptr(dispatcher)))
        {
            waiting.push(Arc::downgrade(dispatcher));
        }
        drop(waiting);
        // The writer may have made room between the caller's check and the registration.
        // (Not when closed: a dispatcher woken for a closed queue would register again at once
        // and spin.)
        if self.has_room() && !self.frames.is_closed() {
            self.queue.wake_everybody();
        }
    }
}

/// A dispatch round's MESSAGE frames for one consumer on their way to its connection's queue.
/// Each counts against the queue's limit as it is [`push`](Self::push)ed, so that
/// [`OutboundSender::has_room`] stops the round exactly as when every frame was queued on its
/// own; the writer gets them together when the round ends (the `Staged` is dropped) or when
/// [`MAX_STAGED_FRAMES`] or [`MAX_STAGED_BYTES`] have gathered.
pub struct Staged {
    sink: OutboundSender,
    payloads: Payloads,
}

impl Staged {
    pub fn new(sink: &OutboundSender) -> Staged {
        Staged {
            sink: sink.clone(),
            payloads: Payloads::default(),
        }
    }

    /// Adds a MESSAGE frame, counted against the queue at once.
    pub fn push(&mut self, frame: PayloadFrame) {
        let length = frame.frame_length();
        self.sink.count(length + FRAME_OVERHEAD_BYTES);
        self.payloads.bytes += length;
        self.payloads.frames.push(frame);
        if self.payloads.frames.len() >= MAX_STAGED_FRAMES
            || self.payloads.bytes >= MAX_STAGED_BYTES
        {
            self.hand_over();
        }
    }

    /// Queues the frames gathered so far. (A closed connection drops its consumers, which puts
    /// their messages back: frames it refuses are only taken off the count.)
    fn hand_over(&mut self) {
        if self.payloads.frames.is_empty() {
            return;
        }
        let payloads = Outbound::Payloads(std::mem::take(&mut self.payloads));
        let length = payloads.charge();
        let _ = self.sink.send_counted(payloads, length);
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.hand_over();
    }
}

impl OutboundReceiver {
    /// The next frame, or `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let frame = self.frames.recv().await?;
        self.unwritten += frame.charge();
        Some(frame)
    }

    /// The next frame if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let frame = self.frames.try_recv().ok()?;
        self.unwritten += frame.charge();
        Some(frame)
    }

    /// Takes `bytes` off the queue's count and the total.
    fn release(&self, bytes: usize) {
        self.queue.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
        QUEUED_BYTES_ALL_CONNECTIONS.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Records that received frames reached the socket: frees their room (`bytes` is the sum
    /// of their [`Outbound::charge`]).
    pub fn written(&mut self, bytes: usize) {
        let bytes = bytes.min(self.unwritten);
        self.unwritten -= bytes;
        self.release(bytes);
        if self.queue.has_room() {
            self.queue.wake_everybody();
        }
    }
}

impl Drop for OutboundReceiver {
    fn drop(&mut self) {
        // Senders waiting for room learn that the connection is gone.
        self.frames.close();
        // What was never written leaves the count with the queue (frames pushed after the
        // close are refused, and their pusher takes them off itself).
        let mut unwritten = std::mem::take(&mut self.unwritten);
        while let Ok(frame) = self.frames.try_recv() {
            unwritten += frame.charge();
        }
        self.release(unwritten);
        self.queue.wake_everybody();
    }
}

/// Encodes a simple command frame. Commands built by the broker always encode.
pub fn command_frame(command: &BaseCommand) -> Outbound {
    let mut buffer = BytesMut::new();
    if let Err(error) = encode_command(command, &mut buffer) {
        tracing::error!(%error, "encoding a command failed");
    }
    Outbound::Frame(buffer.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame that counts `charge` bytes against its queue (at least the overhead).
    fn frame(charge: usize) -> Outbound {
        Outbound::Frame(Bytes::from(vec![
            0u8;
            charge.saturating_sub(FRAME_OVERHEAD_BYTES)
        ]))
    }

    #[tokio::test]
    async fn the_limit_is_in_bytes_and_writing_frees_room() {
        const O: usize = FRAME_OVERHEAD_BYTES;
        let (sender, mut receiver) = outbound_queue(2 * O + 100);
        sender.push(frame(O + 60)).expect("push");
        assert!(sender.has_room());
        sender.push(frame(O + 60)).expect("push beyond the limit");
        assert!(!sender.has_room());
        assert_eq!(sender.queued_bytes(), 2 * O + 120);

        let dispatcher = Arc::new(Notify::new());
        sender.notify_when_room(&dispatcher);
        let woken = dispatcher.notified();
        let waiting_send = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send(frame(O + 10)).await }
        });
        let first = receiver.recv().await.expect("frame");
        receiver.written(first.charge());
        woken.await;
        waiting_send.await.expect("task").expect("send");
        assert_eq!(sender.queued_bytes(), 2 * O + 70);
    }

    #[test]
    fn tiny_frames_count_their_overhead() {
        // A producer that never reads its receipts: 30-byte frames fill a 1 MiB queue after
        // about 5,100 of them, not 35,000 (each takes about 160 bytes of memory).
        let limit = 1024 * 1024;
        let (sender, _receiver) = outbound_queue(limit);
        let receipt = || Outbound::Frame(Bytes::from(vec![0u8; 30]));
        let mut queued = 0;
        while sender.has_room() {
            sender.push(receipt()).expect("push");
            queued += 1;
        }
        assert_eq!(queued, limit.div_ceil(30 + FRAME_OVERHEAD_BYTES));
    }

    fn message(length: usize) -> PayloadFrame {
        let command = meridian_wire::proto::CommandMessage::default();
        meridian_wire::encode_message_frame(command, Bytes::from(vec![7u8; length]))
            .expect("encodes")
    }

    /// A dispatch round stops at a full connection as when it queued each frame on its own:
    /// staged frames count at once, and reach the writer together when the round ends.
    #[test]
    fn staged_frames_count_against_the_limit_as_they_are_added() {
        let (sender, mut receiver) = outbound_queue(10 * 1024);
        let mut staged = Staged::new(&sender);
        let mut count = 0;
        while sender.has_room() {
            staged.push(message(1000));
            count += 1;
        }
        let one = message(1000).frame_length() + FRAME_OVERHEAD_BYTES;
        assert_eq!(count, (10 * 1024usize).div_ceil(one));
        assert_eq!(sender.queued_bytes(), count * one);
        assert!(
            receiver.try_recv().is_none(),
            "nothing reaches the writer before the end"
        );
        drop(staged);
        let run = receiver.try_recv().expect("the round's frames");
        assert_eq!((run.messages(), run.charge()), (count, count * one));
        assert!(receiver.try_recv().is_none(), "in one item");
        receiver.written(run.charge());
        assert_eq!(sender.queued_bytes(), 0);

        // A long round goes to the writer in runs of at most MAX_STAGED_FRAMES, or of the
        // frame that crosses MAX_STAGED_BYTES.
        let runs = |count: usize, length: usize, receiver: &mut OutboundReceiver| {
            let mut staged = Staged::new(&sender);
            for _ in 0..count {
                staged.push(message(length));
            }
            drop(staged);
            let runs: Vec<usize> = std::iter::from_fn(|| receiver.try_recv())
                .map(|run| run.messages())
                .collect();
            runs
        };
        assert_eq!(
            runs(MAX_STAGED_FRAMES + 1, 1, &mut receiver),
            [MAX_STAGED_FRAMES, 1]
        );
        let per_run = MAX_STAGED_BYTES.div_ceil(message(64 * 1024).frame_length());
        assert_eq!(runs(per_run + 1, 64 * 1024, &mut receiver), [per_run, 1]);

        // A closed connection's refused frames leave the count.
        drop(receiver);
        let mut staged = Staged::new(&sender);
        staged.push(message(100));
        drop(staged);
        assert_eq!(sender.queued_bytes(), 0);
    }

    #[test]
    fn control_frames_use_the_headroom_then_are_refused() {
        let (sender, receiver) = outbound_queue(100);
        sender.push(frame(100)).expect("push");
        assert!(sender.try_send(frame(10)).is_ok());
        assert!(matches!(
            sender.try_send(frame(CONTROL_HEADROOM_BYTES)),
            Err(TrySendError::Full(_))
        ));
        drop(receiver);
        assert_eq!(sender.queued_bytes(), 0, "a closed queue holds nothing");
        assert!(matches!(
            sender.try_send(frame(1)),
            Err(TrySendError::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_closed_queue_does_not_wake_its_dispatchers_again() {
        let (sender, receiver) = outbound_queue(10);
        sender.push(frame(20)).expect("push");
        drop(receiver);
        let dispatcher = Arc::new(Notify::new());
        sender.notify_when_room(&dispatcher);
        // A wake stored now would make a dispatcher that registers on every round spin.
        let woken = tokio::select! {
            biased;
            _ = dispatcher.notified() => true,
            _ = std::future::ready(()) => false,
        };
        assert!(!woken);
    }
}
