//! The tasks that load the broker: one per producer (plus one receipt collector per partition
//! of its topic) and one per consumer.
//!
//! A producer task paces itself with its own token bucket, stamps each payload with the send
//! time, calls `send` (which waits while `max_pending` messages are outstanding: the client's
//! back-pressure) and hands the receipt to a collector. Collectors await receipts and record
//! publish latency, send call to receipt. The client completes a partition's receipts in
//! order, and routes messages without a key round robin, one message per partition in turn;
//! so message `k` goes to collector `k mod partitions`, and each collector holds the receipts
//! of one partition in the order they complete. With a single collector, a slow partition's
//! receipt would hold up the others' and inflate their latency.
//!
//! A consumer task receives, records, and acknowledges each message individually.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use meridian_client::{Consumer, Producer, SendReceipt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::pacing::TokenBucket;
use super::payload::{self, PayloadTemplate};
use super::stats::{lock, SharedRecorder};

/// What every task of a run shares: the clocks, the counters, and the stop conditions.
pub struct Shared {
    /// The time base: payload stamps are nanoseconds since this instant.
    pub start: Instant,
    /// Samples sent (publish, end-to-end) or received (consume) from here on are measured;
    /// earlier ones are warmup.
    pub measure_start: Instant,
    /// `measure_start - start` in nanoseconds, to classify stamped payloads.
    pub warmup_ns: u64,
    /// Tells this run's payloads from an earlier run's backlog.
    pub run_id: u64,
    /// `--messages`: sends allowed in total, warmup included. Producers claim them one by one.
    pub send_limit: Option<u64>,
    /// Sends claimed so far (may run past `send_limit` by one per producer: a failed claim).
    pub claimed: AtomicU64,
    /// Messages handed to the client (`send` returned a receipt), acknowledged or not yet.
    pub handed: AtomicU64,
    /// Messages the broker acknowledged.
    pub published: AtomicU64,
    /// Sends that failed (send timeout, broker error).
    pub send_errors: AtomicU64,
    /// Whether the first send error has been printed (later ones are only counted).
    pub send_error_reported: AtomicBool,
    /// Messages received and counted: this run's own (end-to-end) or all (consume).
    pub received: AtomicU64,
    /// End-to-end: messages of another run, acknowledged but not counted.
    pub received_other: AtomicU64,
    /// Consumers count no more than this many; `u64::MAX` until known. Consume with
    /// `--messages` sets it at the start, end-to-end when the producers have finished.
    pub receive_target: AtomicU64,
    /// Cancelled when `received` reaches `receive_target`.
    pub enough_received: CancellationToken,
    /// Cancelled by a task that fails, so that the run stops at once.
    pub failed: CancellationToken,
}

impl Shared {
    /// Nanoseconds since `start`.
    pub fn now_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Takes one send from `--messages`; false when none are left.
    fn claim_send(&self) -> bool {
        match self.send_limit {
            None => true,
            Some(limit) => self.claimed.fetch_add(1, Ordering::Relaxed) < limit,
        }
    }

    /// Counts one received message unless the target is reached; true when counted.
    fn claim_receive(&self) -> bool {
        let target = self.receive_target.load(Ordering::Acquire);
        let counted = self
            .received
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |received| {
                (received < target).then_some(received + 1)
            });
        match counted {
            Ok(previous) => {
                if previous + 1 >= target {
                    self.enough_received.cancel();
                }
                true
            }
            Err(_) => {
                self.enough_received.cancel();
                false
            }
        }
    }

    /// Sets the receive target and notices whether it is already met.
    pub fn set_receive_target(&self, target: u64) {
        self.receive_target.store(target, Ordering::Release);
        if self.received.load(Ordering::Acquire) >= target {
            self.enough_received.cancel();
        }
    }
}

fn microseconds(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// One producer's task and what it needs.
pub struct ProducerWorker {
    pub producer: Producer,
    pub recorder: SharedRecorder,
    /// `None`: as fast as the broker and `max_pending` allow.
    pub bucket: Option<TokenBucket>,
    pub template: PayloadTemplate,
    /// Receipts queued per collector: `max_pending`, so collectors never hold up sends
    /// that the client would accept.
    pub lane_capacity: usize,
}

/// Sends until `stop` (or `--messages` runs out), waits for every receipt, closes the producer.
pub async fn produce(
    shared: Arc<Shared>,
    worker: ProducerWorker,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let ProducerWorker {
        producer,
        recorder,
        mut bucket,
        template,
        lane_capacity,
    } = worker;
    let size = template.stamp(0).len() as u64;
    let mut lanes = Vec::new();
    let mut collectors = Vec::new();
    for _ in 0..producer.partitions().max(1) {
        let (lane, receipts) = mpsc::channel(lane_capacity.max(1));
        lanes.push(lane);
        collectors.push(tokio::spawn(collect_receipts(
            shared.clone(),
            receipts,
            recorder.clone(),
            size,
        )));
    }

    let mut result = Ok(());
    let mut sent: usize = 0;
    while !stop.is_cancelled() && shared.claim_send() {
        if let Some(bucket) = bucket.as_mut() {
            let wait = bucket.reserve(Instant::now());
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
        let sent_at = Instant::now();
        let payload = template.stamp(shared.now_ns(sent_at));
        let receipt = tokio::select! {
            receipt = producer.send(payload) => receipt,
            _ = stop.cancelled() => break,
        };
        let receipt = match receipt {
            Ok(receipt) => receipt,
            Err(error) => {
                result = Err(error).with_context(|| format!("sending to {}", producer.topic()));
                shared.failed.cancel();
                break;
            }
        };
        let lane = &lanes[sent % lanes.len()];
        shared.handed.fetch_add(1, Ordering::Relaxed);
        if lane.send((sent_at, receipt)).await.is_err() {
            // A collector only ends early if it panicked; its join below reports that.
            break;
        }
        sent += 1;
    }

    drop(lanes);
    for collector in collectors {
        if let Err(error) = collector.await {
            if result.is_ok() {
                result = Err(error).context("a receipt collector failed");
            }
        }
    }
    let closed = producer
        .close()
        .await
        .with_context(|| format!("closing the producer of {}", producer.topic()));
    result.and(closed)
}

/// Awaits one lane's receipts in order and records publish latency.
async fn collect_receipts(
    shared: Arc<Shared>,
    mut receipts: mpsc::Receiver<(Instant, SendReceipt)>,
    recorder: SharedRecorder,
    size: u64,
) {
    while let Some((sent_at, receipt)) = receipts.recv().await {
        match receipt.await {
            Ok(_) => {
                let latency_us = microseconds(sent_at.elapsed());
                lock(&recorder).record(sent_at >= shared.measure_start, size, latency_us);
                shared.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                shared.send_errors.fetch_add(1, Ordering::Relaxed);
                if !shared.send_error_reported.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "warning: a send failed: {error} (further failures are only counted)"
                    );
                }
            }
        }
    }
}

/// Where a consumer's latency starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum LatencyFrom {
    /// The send time stamped in the payload by this process (end-to-end).
    PayloadStamp,
    /// The message's `publish_time`, milliseconds since the epoch by the producer's clock
    /// (consume, for messages produced elsewhere).
    PublishTime,
}

/// One consumer's task and what it needs.
pub struct ConsumerWorker {
    pub consumer: Consumer,
    pub recorder: SharedRecorder,
    pub latency_from: LatencyFrom,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Receives and acknowledges until `stop`, then closes the consumer.
pub async fn consume(
    shared: Arc<Shared>,
    worker: ConsumerWorker,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let ConsumerWorker {
        consumer,
        recorder,
        latency_from,
    } = worker;
    let mut result = Ok(());
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            received = consumer.receive() => received,
        };
        let message = match received {
            Ok(message) => message,
            Err(error) => {
                result = Err(error).with_context(|| format!("receiving from {}", consumer.topic()));
                shared.failed.cancel();
                break;
            }
        };
        let now = Instant::now();
        let sample = match latency_from {
            LatencyFrom::PayloadStamp => {
                payload::sent_ns(&message.payload, shared.run_id).map(|sent_ns| {
                    let latency_us = shared.now_ns(now).saturating_sub(sent_ns) / 1000;
                    (sent_ns >= shared.warmup_ns, latency_us)
                })
            }
            LatencyFrom::PublishTime => {
                let latency_us = unix_ms()
                    .saturating_sub(message.publish_time)
                    .saturating_mul(1000);
                Some((now >= shared.measure_start, latency_us))
            }
        };
        match sample {
            Some((measuring, latency_us)) => {
                if !shared.claim_receive() {
                    // Beyond `--messages`: leave it unacknowledged for whoever consumes next.
                    continue;
                }
                lock(&recorder).record(measuring, message.payload.len() as u64, latency_us);
            }
            None => {
                shared.received_other.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(error) = consumer.ack(&message).await {
            result = Err(error).with_context(|| format!("acknowledging on {}", consumer.topic()));
            shared.failed.cancel();
            break;
        }
    }
    let closed = consumer
        .close()
        .await
        .with_context(|| format!("closing the consumer of {}", consumer.topic()));
    result.and(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(send_limit: Option<u64>) -> Shared {
        let start = Instant::now();
        Shared {
            start,
            measure_start: start,
            warmup_ns: 0,
            run_id: 1,
            send_limit,
            claimed: AtomicU64::new(0),
            handed: AtomicU64::new(0),
            published: AtomicU64::new(0),
            send_errors: AtomicU64::new(0),
            send_error_reported: AtomicBool::new(false),
            received: AtomicU64::new(0),
            received_other: AtomicU64::new(0),
            receive_target: AtomicU64::new(u64::MAX),
            enough_received: CancellationToken::new(),
            failed: CancellationToken::new(),
        }
    }

    #[test]
    fn sends_stop_at_the_limit() {
        let shared = shared(Some(3));
        let claimed = (0..10).filter(|_| shared.claim_send()).count();
        assert_eq!(claimed, 3);
        let unlimited = self::shared(None);
        assert!((0..10).all(|_| unlimited.claim_send()));
    }

    #[test]
    fn receiving_stops_counting_at_the_target() {
        let shared = shared(None);
        assert!(shared.claim_receive());
        assert!(!shared.enough_received.is_cancelled());
        shared.set_receive_target(3);
        assert!(!shared.enough_received.is_cancelled());
        assert!(shared.claim_receive());
        assert!(shared.claim_receive());
        assert!(shared.enough_received.is_cancelled());
        assert!(
            !shared.claim_receive(),
            "a fourth message is beyond the target"
        );
        assert_eq!(shared.received.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_target_already_met_is_noticed_when_set() {
        let shared = shared(None);
        assert!(shared.claim_receive());
        assert!(shared.claim_receive());
        shared.set_receive_target(2);
        assert!(shared.enough_received.is_cancelled());
    }
}
