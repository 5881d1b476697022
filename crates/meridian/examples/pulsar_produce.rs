//! An independent load generator for the publish path: the Rust `pulsar` crate (not Meridian's
//! own client) produces batched messages as fast as receipts come back, and the broker's CPU
//! time and context switches are read from `/proc/<pid>` over the
//! measured window. `scripts/bench/produce_cpu.py` runs it against a fresh broker
//! (`docs/BENCHMARKS.md`, "Publish path CPU").
//!
//! ```sh
//! cargo build --release -p meridian --example pulsar_produce
//! target/release/examples/pulsar_produce --url pulsar://127.0.0.1:16780 --broker-pid <pid> \
//!     --size 1024 --warmup 3 --duration 10
//! ```
//!
//! Prints one JSON object: messages and entries (distinct receipt positions) acknowledged in
//! the window, and the broker's CPU µs per message, and context switches and minor page faults
//! per entry (syscalls by name: the script's `--strace` round).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use pulsar::consumer::{ConsumerOptions, InitialPosition};
use pulsar::producer::ProducerOptions;
use pulsar::{Consumer, Pulsar, SubType, TokioExecutor};

struct Options {
    url: String,
    broker_pid: u32,
    size: usize,
    topics: usize,
    warmup: f64,
    duration: f64,
    batch_messages: u32,
    batch_bytes: usize,
    /// The producers' batch timeout.
    batch_delay: Duration,
    max_pending: usize,
    topic_prefix: String,
    /// Drain mode: produce this many messages (not measured), then measure one consumer per
    /// topic reading them all from the earliest position (cached entries).
    fill: u64,
    /// Latency mode: one consumer per topic reads while the producers send this many messages
    /// per second in total (0: produce only, as fast as receipts come back).
    rate: f64,
}

fn parse() -> Options {
    let mut options = Options {
        url: "pulsar://127.0.0.1:6650".into(),
        broker_pid: 0,
        size: 1024,
        topics: 1,
        warmup: 3.0,
        duration: 10.0,
        batch_messages: 1000,
        batch_bytes: 128 * 1024,
        batch_delay: Duration::from_millis(1),
        max_pending: 2000,
        topic_prefix: "persistent://public/default/produce-cpu".into(),
        fill: 0,
        rate: 0.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        let number = || {
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("{flag} {value}"))
        };
        match flag.as_str() {
            "--url" => options.url = value.clone(),
            "--broker-pid" => options.broker_pid = number() as u32,
            "--size" => options.size = number() as usize,
            "--topics" => options.topics = number() as usize,
            "--warmup" => options.warmup = number(),
            "--duration" => options.duration = number(),
            "--batch-max-messages" => options.batch_messages = number() as u32,
            "--batch-max-bytes" => options.batch_bytes = number() as usize,
            "--batch-max-delay-ms" => options.batch_delay = Duration::from_secs_f64(number() / 1e3),
            "--max-pending" => options.max_pending = number() as usize,
            "--topic-prefix" => options.topic_prefix = value.clone(),
            "--fill" => options.fill = number() as u64,
            "--rate" => options.rate = number(),
            _ => panic!("unknown option {flag}"),
        }
    }
    options
}

/// What the kernel counts for the broker process, summed over its threads.
#[derive(Clone, Default)]
struct BrokerCounters {
    user_ticks: u64,
    system_ticks: u64,
    /// Time on a CPU in nanoseconds (`schedstat`), summed over the threads alive when read:
    /// precise where the ticks are 10 ms, but a thread that ends takes its time with it.
    running_ns: u64,
    /// The threads read for `running_ns`.
    threads: Vec<u64>,
    voluntary_switches: u64,
    involuntary_switches: u64,
    minor_faults: u64,
}

fn broker_counters(pid: u32) -> BrokerCounters {
    let mut counters = BrokerCounters::default();
    if pid == 0 {
        return counters;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), counted from 0 at the state:
    // minflt is the 8th, utime the 12th, stime the 13th.
    if let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) {
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok());
        counters.minor_faults = field(7).unwrap_or(0);
        counters.user_ticks = field(11).unwrap_or(0);
        counters.system_ticks = field(12).unwrap_or(0);
    }
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Some(id) = task.file_name().to_str().and_then(|id| id.parse().ok()) {
                counters.threads.push(id);
            }
            let schedstat =
                std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            counters.running_ns += schedstat
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            for line in status.lines() {
                let value = |prefix: &str| {
                    line.strip_prefix(prefix)
                        .and_then(|rest| rest.trim().parse::<u64>().ok())
                };
                if let Some(count) = value("voluntary_ctxt_switches:") {
                    counters.voluntary_switches += count;
                }
                if let Some(count) = value("nonvoluntary_ctxt_switches:") {
                    counters.involuntary_switches += count;
                }
            }
        }
    }
    counters
}

/// Receipts (or, with consumers, deliveries) counted in the measured window.
#[derive(Default)]
struct Window {
    messages: AtomicU64,
    /// (topic, which partition, ledger id, entry id): ledger ids of different topics, or of
    /// a partitioned topic's partitions, may be equal. The partition is told by the receipt's
    /// producer id (a partitioned producer has one per partition; receipts carry no
    /// partition) or by the delivered message's id.
    entries: Mutex<HashSet<(usize, u64, u64, u64)>>,
    /// Latency mode: publish-to-delivery latencies in µs.
    latencies: Mutex<Vec<u64>>,
}

impl Window {
    fn count(&self, topic: usize, partition: u64, ledger_id: u64, entry_id: u64) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.entries
            .lock()
            .expect("entries")
            .insert((topic, partition, ledger_id, entry_id));
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64
}

/// Reads one topic until `stop` (or `limit` messages), acknowledging each message and counting
/// those delivered while `measuring`; in latency mode the payload's first 8 bytes are its send time.
async fn consume(
    mut consumer: Consumer<Vec<u8>, TokioExecutor>,
    topic: usize,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    window: Arc<Window>,
    limit: u64,
    timed: bool,
) {
    let mut received = 0u64;
    while !stop.load(Ordering::Relaxed) && received < limit {
        let next = tokio::time::timeout(Duration::from_millis(100), consumer.try_next()).await;
        let Ok(message) = next else { continue };
        let message = message.expect("receive").expect("consumer stream ended");
        received += 1;
        if measuring.load(Ordering::Relaxed) {
            let id = &message.message_id.id;
            let partition = id.partition.unwrap_or(-1) as u64;
            window.count(topic, partition, id.ledger_id, id.entry_id);
            if timed {
                let data = &message.payload.data;
                let sent = u64::from_le_bytes(data[..8].try_into().expect("timestamp"));
                window
                    .latencies
                    .lock()
                    .expect("latencies")
                    .push(now_micros().saturating_sub(sent));
            }
        }
        consumer.ack(&message).await.expect("ack");
    }
    let _ = consumer.close().await;
}

async fn subscribe(
    pulsar: &Pulsar<TokioExecutor>,
    options: &Options,
    topic: usize,
    position: InitialPosition,
) -> Result<Consumer<Vec<u8>, TokioExecutor>, pulsar::Error> {
    pulsar
        .consumer()
        .with_topic(format!("{}-{topic}", options.topic_prefix))
        .with_subscription(format!("bench-{topic}"))
        .with_subscription_type(SubType::Exclusive)
        .with_options(ConsumerOptions::default().with_initial_position(position))
        .build()
        .await
}

/// One consumer per topic, each reading at most `limit` messages; latency mode (`--rate`) reads
/// send timestamps. `shared` is (measuring, stop, window).
async fn spawn_consumers(
    pulsar: &Pulsar<TokioExecutor>,
    options: &Options,
    position: InitialPosition,
    shared: (Arc<AtomicBool>, Arc<AtomicBool>, Arc<Window>),
    limit: u64,
) -> Result<Vec<tokio::task::JoinHandle<()>>, pulsar::Error> {
    let mut consumers = Vec::new();
    for topic in 0..options.topics {
        let consumer = subscribe(pulsar, options, topic, position.clone()).await?;
        let (measuring, stop, window) = (shared.0.clone(), shared.1.clone(), shared.2.clone());
        let timed = options.rate > 0.0;
        consumers.push(tokio::spawn(consume(
            consumer, topic, measuring, stop, window, limit, timed,
        )));
    }
    Ok(consumers)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = parse();
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(options.url.clone(), TokioExecutor)
        .build()
        .await?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let consumers_stop = Arc::new(AtomicBool::new(false));
    let window = Arc::new(Window::default());
    // Messages acknowledged since the start (drain mode stops producing at `--fill`).
    let produced = Arc::new(AtomicU64::new(0));
    let payload: Vec<u8> = (0..options.size.max(8))
        .map(|index| b'A' + (index * 7 % 26) as u8)
        .collect();
    let timed = options.rate > 0.0;
    let mut consumers = Vec::new();
    if options.fill > 0 {
        // Drain mode: the subscriptions exist before the fill. Without one, the fill is in no
        // backlog and, with no retention configured, the broker may delete it before the
        // consumers come (as Pulsar does), and the drain would wait for messages that are gone.
        for topic in 0..options.topics {
            let mut consumer =
                subscribe(&pulsar, &options, topic, InitialPosition::Earliest).await?;
            consumer.close().await?;
        }
    }
    if timed {
        let shared = (measuring.clone(), consumers_stop.clone(), window.clone());
        consumers =
            spawn_consumers(&pulsar, &options, InitialPosition::Latest, shared, u64::MAX).await?;
    }
    let mut tasks = Vec::new();
    for topic in 0..options.topics {
        let mut producer = pulsar
            .producer()
            .with_topic(format!("{}-{topic}", options.topic_prefix))
            .with_options(ProducerOptions {
                batch_size: Some(options.batch_messages),
                batch_byte_size: Some(options.batch_bytes),
                batch_timeout: Some(options.batch_delay),
                ..Default::default()
            })
            .build()
            .await?;
        let (measuring, stop, window, produced, mut payload) = (
            measuring.clone(),
            stop.clone(),
            window.clone(),
            produced.clone(),
            payload.clone(),
        );
        let max_pending = options.max_pending;
        let (fill, count_receipts) = (options.fill, options.fill == 0 && !timed);
        let interval = timed.then(|| Duration::from_secs_f64(options.topics as f64 / options.rate));
        tasks.push(tokio::spawn(async move {
            let mut pending = VecDeque::with_capacity(max_pending);
            let account = |receipt: pulsar::proto::CommandSendReceipt| {
                produced.fetch_add(1, Ordering::Relaxed);
                if count_receipts && measuring.load(Ordering::Relaxed) {
                    if let Some(id) = receipt.message_id {
                        window.count(topic, receipt.producer_id, id.ledger_id, id.entry_id);
                    }
                }
            };
            let started = tokio::time::Instant::now();
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed)
                && (fill == 0 || produced.load(Ordering::Relaxed) < fill)
            {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(started + interval * sent).await;
                    sent += 1;
                    payload[..8].copy_from_slice(&now_micros().to_le_bytes());
                }
                let receipt = producer
                    .send_non_blocking(payload.clone())
                    .await
                    .expect("send queued");
                pending.push_back(receipt);
                if pending.len() >= max_pending {
                    let oldest = pending.pop_front().expect("pending receipt");
                    account(oldest.await.expect("receipt"));
                }
            }
            producer.send_batch().await.expect("flush");
            for receipt in pending {
                account(receipt.await.expect("receipt"));
            }
            let _ = producer.close().await;
        }));
    }
    if options.fill > 0 {
        // Drain mode: fill, then measure the consumers alone reading it all back.
        for task in tasks.drain(..) {
            task.await?;
        }
        let total = produced.load(Ordering::Relaxed);
        let per_topic = total / options.topics as u64;
        measuring.store(true, Ordering::Relaxed);
        let before = broker_counters(options.broker_pid);
        let started = Instant::now();
        let shared = (measuring.clone(), consumers_stop.clone(), window.clone());
        consumers = spawn_consumers(
            &pulsar,
            &options,
            InitialPosition::Earliest,
            shared,
            per_topic,
        )
        .await?;
        for consumer in consumers.drain(..) {
            consumer.await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let after = broker_counters(options.broker_pid);
        report(&window, &before, &after, seconds);
        return Ok(());
    }
    tokio::time::sleep(Duration::from_secs_f64(options.warmup)).await;
    let before = broker_counters(options.broker_pid);
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(options.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let after = broker_counters(options.broker_pid);
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    consumers_stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        consumer.await?;
    }
    report(&window, &before, &after, seconds);
    Ok(())
}

/// Prints the window's figures as one JSON object.
fn report(window: &Window, before: &BrokerCounters, after: &BrokerCounters, seconds: f64) {
    let messages = window.messages.load(Ordering::Relaxed);
    let entries = window.entries.lock().expect("entries").len() as u64;
    // USER_HZ: /proc reports CPU time in hundredths of a second on Linux.
    let ticks_per_second = 100.0;
    let user_seconds = (after.user_ticks - before.user_ticks) as f64 / ticks_per_second;
    let system_seconds = (after.system_ticks - before.system_ticks) as f64 / ticks_per_second;
    let cpu_seconds = user_seconds + system_seconds;
    // Threads that ended within the window: their running time is missing from the
    // precise figure (which then reads low), not from the ticks.
    let threads_ended = before
        .threads
        .iter()
        .filter(|id| !after.threads.contains(id))
        .count();
    let running_seconds = after.running_ns.saturating_sub(before.running_ns) as f64 / 1e9;
    let per_message = |seconds: f64| seconds * 1e6 / messages.max(1) as f64;
    let per_entry = |after: u64, before: u64| (after - before) as f64 / entries.max(1) as f64;
    let mut latencies = std::mem::take(&mut *window.latencies.lock().expect("latencies"));
    latencies.sort_unstable();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |&micros| micros as f64 / 1000.0)
    };
    println!(
        "{{\"messages\": {messages}, \"entries\": {entries}, \"seconds\": {seconds:.3}, \
         \"msg_per_s\": {:.0}, \"broker_cpu_s\": {cpu_seconds:.2}, \
         \"broker_cpu_us_per_msg\": {:.3}, \"user_us_per_msg\": {:.3}, \
         \"system_us_per_msg\": {:.3}, \"running_us_per_msg\": {:.3}, \
         \"threads_ended\": {threads_ended}, \"voluntary_switches_per_entry\": {:.2}, \
         \"involuntary_switches_per_entry\": {:.2}, \"minor_faults_per_entry\": {:.2}, \
         \"latency_ms_p50\": {:.2}, \
         \"latency_ms_p99\": {:.2}, \"latency_ms_max\": {:.2}}}",
        messages as f64 / seconds,
        per_message(cpu_seconds),
        per_message(user_seconds),
        per_message(system_seconds),
        per_message(running_seconds),
        per_entry(after.voluntary_switches, before.voluntary_switches),
        per_entry(after.involuntary_switches, before.involuntary_switches),
        per_entry(after.minor_faults, before.minor_faults),
        quantile(0.5),
        quantile(0.99),
        quantile(1.0),
    );
}
