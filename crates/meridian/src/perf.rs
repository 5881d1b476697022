//! `meridian perf produce|consume|end-to-end`: throughput and latency of a broker, in the
//! spirit of `pulsar-perf`, through Meridian's own client.
//!
//! Every mode prints one line per second (rates, latency percentiles, backlog) and a summary
//! at the end: totals, average rates over the measured window, and p50/p95/p99/p99.9/max of
//! publish latency (send call to the broker's receipt) and end-to-end latency (send call to
//! reception, or publish time to reception in `consume`). With `--output json` the summary is
//! one JSON object on stdout and the per-second lines go to stderr. Latencies are recorded in
//! HDR histograms (microseconds, 3 significant digits, up to an hour); samples of the
//! `--warmup` go to histograms of their own that are thrown away. With `--broker-pid`, the
//! broker's CPU time, context switches, read/write system calls and minor page faults over the
//! measured window are reported, per message too.
//!
//! # Layout
//!
//! - this file: the command line, validation, setup (partitioned topics through the admin
//!   API, consumers before producers so that a new subscription sees every message), and the
//!   run itself: when to stop producing, how long to let consumers drain, Ctrl-C, the
//!   summary.
//! - `workers`: the producer, receipt-collector and consumer tasks, and the state they share.
//! - `pacing`: the token bucket behind `--rate`. `payload`: the send-time stamp in each
//!   payload. `stats`: windows of counts and histograms. `report`: the per-second line and
//!   the summary. `broker_cpu`: the broker's counters in `/proc/PID`.
//!
//! # The measured window
//!
//! The run starts once every consumer and producer exists. The first `--warmup` seconds are
//! warmup; the measured window follows. With `--duration`, producers (and in `consume`,
//! consumers) stop `--duration` seconds after the warmup; with `--messages`, once that many
//! messages (warmup included) were sent, or received in `consume`. In `end-to-end`, consumers
//! then get up to `--drain-timeout` seconds to receive what was acknowledged. Publish rates
//! cover the measured window up to the last receipt; receive rates up to the last message
//! received (end-to-end) or the stop (consume).

mod broker_cpu;
mod pacing;
mod payload;
mod report;
mod stats;
mod workers;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use meridian_client::{Client, Compression, InitialPosition, SubscriptionType};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::pacing::TokenBucket;
use self::payload::{PayloadTemplate, HEADER_BYTES};
use self::report::{BrokerCpu, Summary, Throughput, Tick};
use self::stats::Recorders;
use self::workers::{ConsumerWorker, LatencyFrom, ProducerWorker, Shared};

#[derive(Args)]
pub struct PerfArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Publish and measure publish latency (send call to the broker's receipt).
    ///
    /// Example: meridian perf produce --topic-prefix perf --duration 30
    Produce {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        producing: Producing,
    },
    /// Receive from a subscription; end-to-end latency from each message's publish time
    /// (milliseconds, by the producer's clock).
    ///
    /// Example: meridian perf consume --topic-prefix perf --duration 30
    Consume {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        consuming: Consuming,
    },
    /// Produce and consume in this process; end-to-end latency from the send call to
    /// reception, stamped in the payload.
    ///
    /// Example: meridian perf end-to-end --topic-prefix perf --messages 100000
    EndToEnd {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        producing: Producing,
        #[command(flatten)]
        consuming: Consuming,
        /// Seconds to wait, after the producers stop, for the consumers to receive every
        /// acknowledged message.
        #[arg(long, default_value_t = 30)]
        drain_timeout: u64,
    },
}

/// Options of every mode.
#[derive(Args, Serialize)]
struct Common {
    /// Broker service URL (`pulsar://` or `pulsar+ssl://`).
    #[arg(
        long,
        default_value = "pulsar://127.0.0.1:6650",
        env = "MERIDIAN_SERVICE_URL"
    )]
    url: String,
    /// Admin API URL, used to create partitioned topics (with --partitions).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    admin_url: String,
    /// TLS settings of `pulsar+ssl://` and `https://` URLs.
    #[command(flatten)]
    #[serde(skip)]
    tls: crate::tls_cli::TlsArgs,
    /// Number of topics, named <topic-prefix>-0 .. <topic-prefix>-(N-1).
    #[arg(long, default_value_t = 1)]
    topics: u32,
    /// Topic name prefix: a short name (public/default) or a full persistent:// name.
    #[arg(long, default_value = "perf")]
    topic_prefix: String,
    /// Create each topic with this many partitions through the admin API (0: not
    /// partitioned). An existing partitioned topic must have this many already.
    #[arg(long, default_value_t = 0)]
    partitions: u32,
    /// Seconds to measure, after the warmup (default 10 unless --messages is given).
    #[arg(long, conflicts_with = "messages")]
    duration: Option<u64>,
    /// Messages to send in total (produce, end-to-end) or to receive (consume), warmup
    /// included.
    #[arg(long)]
    messages: Option<u64>,
    /// Seconds at the start whose samples are left out of the summary.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Summary format: text, or one JSON object on stdout (per-second lines go to stderr).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Report this process's CPU time (the broker's) over the measured window, from
    /// /proc/PID/stat.
    #[arg(long)]
    broker_pid: Option<u32>,
}

/// Options of the modes that produce.
#[derive(Args, Serialize)]
struct Producing {
    /// Producers per topic.
    #[arg(long, default_value_t = 1)]
    producers: u32,
    /// Payload size in bytes (end-to-end: at least 16, for the send-time stamp).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per second across all producers (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Messages per batch at most (0: no batching).
    #[arg(long, default_value_t = 1000)]
    batch_max_messages: usize,
    /// Payload bytes per batch at most.
    #[arg(long, default_value_t = 128 * 1024)]
    batch_max_bytes: usize,
    /// Milliseconds a batch waits for more messages at most.
    #[arg(long, default_value_t = 1)]
    batch_max_delay: u64,
    /// Payload compression.
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    compression: CompressionArg,
    /// Messages outstanding per producer and partition before sends wait.
    #[arg(long, default_value_t = 1000)]
    max_pending: usize,
}

/// Options of the modes that consume.
#[derive(Args, Serialize)]
struct Consuming {
    /// Consumers per topic.
    #[arg(long, default_value_t = 1)]
    consumers: u32,
    /// Subscription name.
    #[arg(long, default_value = "perf-sub")]
    subscription: String,
    /// Subscription type.
    #[arg(long, value_enum, default_value_t = Kind::Exclusive)]
    subscription_type: Kind,
    /// Where a new subscription starts.
    #[arg(long, value_enum, default_value_t = Position::Latest)]
    subscription_position: Position,
    /// Messages each consumer buffers ahead of receive (flow-control permits).
    #[arg(long, default_value_t = 1000)]
    receiver_queue_size: u32,
    /// How long acknowledgements wait to go out together, in milliseconds (one ACK frame for
    /// up to 1000 messages, as the official clients); 0 sends each entry's at once.
    #[arg(long, default_value_t = 100)]
    ack_group_ms: u64,
    /// Service URL the consumers use (default: --url). In end-to-end mode with another
    /// cluster's URL, the latency measured is the geo-replication lag.
    #[arg(long)]
    consumer_url: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum CompressionArg {
    None,
    Lz4,
    Zlib,
    Zstd,
    Snappy,
}

impl CompressionArg {
    fn codec(self) -> Compression {
        match self {
            CompressionArg::None => Compression::None,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zlib => Compression::Zlib,
            CompressionArg::Zstd => Compression::Zstd,
            CompressionArg::Snappy => Compression::Snappy,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Exclusive,
    Shared,
    Failover,
    #[value(name = "key_shared")]
    KeyShared,
}

impl Kind {
    fn sub_type(self) -> SubscriptionType {
        match self {
            Kind::Exclusive => SubscriptionType::Exclusive,
            Kind::Shared => SubscriptionType::Shared,
            Kind::Failover => SubscriptionType::Failover,
            Kind::KeyShared => SubscriptionType::KeyShared,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Position {
    Latest,
    Earliest,
}

/// The run's settings as the summary's `config`.
#[derive(Serialize)]
struct Settings<'a> {
    #[serde(flatten)]
    common: &'a Common,
    #[serde(flatten)]
    producing: Option<&'a Producing>,
    #[serde(flatten)]
    consuming: Option<&'a Consuming>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout: Option<u64>,
}

/// A mode's options, unpacked.
struct Plan {
    name: &'static str,
    common: Common,
    producing: Option<Producing>,
    consuming: Option<Consuming>,
    /// End-to-end only.
    drain_timeout: Option<Duration>,
}

impl Plan {
    fn new(mode: Mode) -> Plan {
        let (name, mut common, producing, consuming, drain_timeout) = match mode {
            Mode::Produce { common, producing } => ("produce", common, Some(producing), None, None),
            Mode::Consume { common, consuming } => ("consume", common, None, Some(consuming), None),
            Mode::EndToEnd {
                common,
                producing,
                consuming,
                drain_timeout,
            } => (
                "end-to-end",
                common,
                Some(producing),
                Some(consuming),
                Some(Duration::from_secs(drain_timeout)),
            ),
        };
        if common.duration.is_none() && common.messages.is_none() {
            common.duration = Some(10);
        }
        Plan {
            name,
            common,
            producing,
            consuming,
            drain_timeout,
        }
    }

    fn end_to_end(&self) -> bool {
        self.producing.is_some() && self.consuming.is_some()
    }

    /// Checks what clap cannot; errors name the flag.
    fn validate(&self) -> anyhow::Result<()> {
        let common = &self.common;
        if common.topics == 0 {
            bail!("--topics must be at least 1");
        }
        if common.duration == Some(0) {
            bail!("--duration must be at least 1 second");
        }
        if common.messages == Some(0) {
            bail!("--messages must be at least 1");
        }
        if let Some(producing) = &self.producing {
            if producing.producers == 0 {
                bail!("--producers must be at least 1");
            }
            if producing.max_pending == 0 {
                bail!("--max-pending must be at least 1");
            }
            if self.end_to_end() && producing.size < HEADER_BYTES {
                bail!(
                    "--size must be at least {HEADER_BYTES} bytes in end-to-end mode: each \
                     payload carries its send time"
                );
            }
            if producing.batch_max_messages > 0 && producing.batch_max_bytes == 0 {
                bail!("--batch-max-bytes must be at least 1 when batching");
            }
        }
        if let Some(consuming) = &self.consuming {
            if consuming.consumers == 0 {
                bail!("--consumers must be at least 1");
            }
            if consuming.consumers > 1 && consuming.subscription_type == Kind::Exclusive {
                bail!(
                    "--subscription-type exclusive admits one consumer per topic; use shared, \
                     failover or key_shared with --consumers {}",
                    consuming.consumers
                );
            }
            if consuming.receiver_queue_size == 0 {
                bail!("--receiver-queue-size must be at least 1");
            }
        }
        Ok(())
    }

    fn topics(&self) -> Vec<String> {
        (0..self.common.topics)
            .map(|index| format!("{}-{index}", self.common.topic_prefix))
            .collect()
    }

    /// The first line of the text summary.
    fn heading(&self) -> String {
        let common = &self.common;
        let mut heading = format!(
            "meridian perf {}: {} topic(s) x {} partition(s)",
            self.name, common.topics, common.partitions
        );
        if let Some(producing) = &self.producing {
            heading.push_str(&format!(
                ", {} producer(s) per topic, {} B messages, rate {}, {}, compression {}",
                producing.producers,
                producing.size,
                match producing.rate {
                    0 => "unlimited".to_string(),
                    rate => format!("{rate} msg/s"),
                },
                match producing.batch_max_messages {
                    0 => "no batching".to_string(),
                    messages => format!(
                        "batches of at most {messages} messages / {} B / {} ms",
                        producing.batch_max_bytes, producing.batch_max_delay
                    ),
                },
                producing.compression.codec().name()
            ));
        }
        if let Some(consuming) = &self.consuming {
            heading.push_str(&format!(
                ", {} consumer(s) per topic on {} ({})",
                consuming.consumers,
                consuming.subscription,
                serde_json::to_value(consuming.subscription_type)
                    .ok()
                    .and_then(|value| value.as_str().map(str::to_string))
                    .unwrap_or_default()
            ));
        }
        heading
    }
}

/// Creates `topic` with `partitions` partitions through the admin API; an existing
/// partitioned topic with the same count is fine. Blocking (ureq).
fn create_partitioned_topic(
    admin_url: &str,
    tls: &meridian_client::TlsOptions,
    topic: &str,
    partitions: u32,
) -> anyhow::Result<()> {
    let full =
        meridian_client::normalize_topic(topic).with_context(|| format!("topic name {topic:?}"))?;
    let Some(path) = full.strip_prefix("persistent://") else {
        bail!("--partitions needs persistent topics, and {full} is not one");
    };
    let url = format!(
        "{}/admin/v2/persistent/{path}/partitions",
        admin_url.trim_end_matches('/')
    );
    let agent = meridian_client::http_agent(admin_url, tls, |agent| {
        agent.timeout(Duration::from_secs(30))
    })?;
    match agent
        .put(&url)
        .set("Content-Type", "application/json")
        .send_string(&partitions.to_string())
    {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(409, _)) => {
            let existing: serde_json::Value = agent
                .get(&url)
                .call()
                .with_context(|| format!("GET {url}"))?
                .into_json()
                .with_context(|| format!("reading the reply of GET {url}"))?;
            let count = existing
                .get("partitions")
                .and_then(serde_json::Value::as_u64);
            if count == Some(u64::from(partitions)) {
                Ok(())
            } else {
                bail!(
                    "{full} exists with {} partitions, not {partitions}; delete it or pick \
                     another --topic-prefix",
                    count.map_or_else(|| "no".to_string(), |count| count.to_string())
                )
            }
        }
        Err(ureq::Error::Status(status, response)) => bail!(
            "creating {full} with {partitions} partitions: PUT {url} answered {status}: {}",
            response.into_string().unwrap_or_default()
        ),
        Err(error) => Err(error).with_context(|| format!("PUT {url}")),
    }
}

/// Awaits tasks in order; the first error wins, and a panic is an error too.
async fn join_all(tasks: Vec<JoinHandle<anyhow::Result<()>>>) -> anyhow::Result<()> {
    let mut result = Ok(());
    for task in tasks {
        let outcome = match task.await {
            Ok(outcome) => outcome,
            Err(error) => Err(error).context("a perf task failed"),
        };
        if result.is_ok() {
            result = outcome;
        }
    }
    result
}

/// Seconds from `from` to `to`, zero if `to` is earlier.
fn seconds_between(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

pub async fn run(arguments: PerfArgs) -> anyhow::Result<()> {
    let plan = Plan::new(arguments.mode);
    plan.validate()?;
    if let Some(pid) = plan.common.broker_pid {
        // Fail before connecting if the process cannot be observed.
        broker_cpu::sample(pid).context("--broker-pid")?;
    }
    if plan.common.partitions > 0 {
        for topic in plan.topics() {
            let admin_url = plan.common.admin_url.clone();
            let tls = plan.common.tls.options();
            let partitions = plan.common.partitions;
            tokio::task::spawn_blocking(move || {
                create_partitioned_topic(&admin_url, &tls, &topic, partitions)
            })
            .await
            .context("the admin request task failed")??;
        }
    }
    let client = Client::builder(plan.common.url.as_str())
        .tls(plan.common.tls.options())
        .build()
        .await
        .with_context(|| format!("connecting to {}", plan.common.url))?;
    let consumer_client = match plan
        .consuming
        .as_ref()
        .and_then(|consuming| consuming.consumer_url.as_deref())
    {
        Some(url) => Some(
            Client::builder(url)
                .tls(plan.common.tls.options())
                .build()
                .await
                .with_context(|| format!("connecting to {url}"))?,
        ),
        None => None,
    };
    let result = run_with(&plan, &client, consumer_client.as_ref().unwrap_or(&client)).await;
    client.close().await;
    if let Some(consumer_client) = consumer_client {
        consumer_client.close().await;
    }
    let summary = result?;
    match plan.common.output {
        Output::Text => print!("{}", summary.text(&plan.heading())),
        Output::Json => println!(
            "{}",
            serde_json::to_string(&summary).context("encoding the summary")?
        ),
    }
    Ok(())
}

type RunSummary<'a> = Summary<Settings<'a>>;

async fn run_with<'a>(
    plan: &'a Plan,
    client: &Client,
    consumer_client: &Client,
) -> anyhow::Result<RunSummary<'a>> {
    let common = &plan.common;
    let topics = plan.topics();
    let shards = std::thread::available_parallelism().map_or(4, |threads| threads.get() * 2);
    let publish_recorders = Recorders::new(shards);
    let receive_recorders = Recorders::new(shards);
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the Ctrl-C handler")?;

    // Consumers first: a new subscription starts at the end of the topic, so it must exist
    // before the first message is sent for end-to-end to receive everything.
    let mut consumer_workers = Vec::new();
    if let Some(consuming) = &plan.consuming {
        for topic in &topics {
            for index in 0..consuming.consumers {
                let consumer = consumer_client
                    .consumer(topic.as_str())
                    .subscription(consuming.subscription.as_str())
                    .sub_type(consuming.subscription_type.sub_type())
                    .initial_position(match consuming.subscription_position {
                        Position::Latest => InitialPosition::Latest,
                        Position::Earliest => InitialPosition::Earliest,
                    })
                    .receiver_queue_size(consuming.receiver_queue_size)
                    .ack_group_time(Duration::from_millis(consuming.ack_group_ms))
                    .consumer_name(format!("{}-{index}", consuming.subscription))
                    .subscribe()
                    .await
                    .with_context(|| {
                        format!("subscribing to {topic} as {}", consuming.subscription)
                    })?;
                consumer_workers.push(ConsumerWorker {
                    consumer,
                    recorder: receive_recorders.recorder(consumer_workers.len()),
                    latency_from: if plan.end_to_end() {
                        LatencyFrom::PayloadStamp
                    } else {
                        LatencyFrom::PublishTime
                    },
                });
            }
        }
    }

    let run_id = payload::random_u64();
    let mut producers = Vec::new();
    if let Some(producing) = &plan.producing {
        for topic in &topics {
            for _ in 0..producing.producers {
                let mut builder = client
                    .producer(topic.as_str())
                    .compression(producing.compression.codec())
                    .max_pending(producing.max_pending);
                if producing.batch_max_messages > 0 {
                    builder = builder.batching(
                        producing.batch_max_messages,
                        producing.batch_max_bytes,
                        Duration::from_millis(producing.batch_max_delay),
                    );
                }
                let producer = builder
                    .create()
                    .await
                    .with_context(|| format!("creating a producer on {topic}"))?;
                producers.push(producer);
            }
        }
    }

    let start = Instant::now();
    let measure_start = start + Duration::from_secs(common.warmup);
    let shared = Arc::new(Shared {
        start,
        measure_start,
        warmup_ns: u64::try_from(Duration::from_secs(common.warmup).as_nanos()).unwrap_or(u64::MAX),
        run_id,
        send_limit: common.messages.filter(|_| plan.producing.is_some()),
        claimed: AtomicU64::new(0),
        handed: AtomicU64::new(0),
        published: AtomicU64::new(0),
        send_errors: AtomicU64::new(0),
        send_error_reported: AtomicBool::new(false),
        received: AtomicU64::new(0),
        received_other: AtomicU64::new(0),
        receive_target: AtomicU64::new(match (plan.producing.is_some(), common.messages) {
            (false, Some(messages)) => messages,
            _ => u64::MAX,
        }),
        enough_received: CancellationToken::new(),
        failed: CancellationToken::new(),
    });

    let stop_producers = CancellationToken::new();
    let stop_consumers = CancellationToken::new();
    let stop_reporting = CancellationToken::new();
    let consumer_tasks: Vec<_> = consumer_workers
        .into_iter()
        .map(|worker| {
            tokio::spawn(workers::consume(
                shared.clone(),
                worker,
                stop_consumers.clone(),
            ))
        })
        .collect();
    let producer_count = producers.len();
    let producer_tasks: Vec<_> = match &plan.producing {
        None => Vec::new(),
        Some(producing) => producers
            .into_iter()
            .enumerate()
            .map(|(index, producer)| {
                let worker = ProducerWorker {
                    producer,
                    recorder: publish_recorders.recorder(index),
                    // Each producer gets an equal share of the total rate.
                    bucket: (producing.rate > 0).then(|| {
                        TokenBucket::new(producing.rate as f64 / producer_count as f64, start)
                    }),
                    template: PayloadTemplate::new(producing.size, run_id, payload::random_u64()),
                    lane_capacity: producing.max_pending,
                };
                tokio::spawn(workers::produce(
                    shared.clone(),
                    worker,
                    stop_producers.clone(),
                ))
            })
            .collect(),
    };
    let reporter = tokio::spawn(report_every_second(
        shared.clone(),
        plan.producing.is_some().then(|| publish_recorders.clone()),
        plan.consuming.is_some().then(|| receive_recorders.clone()),
        plan.end_to_end(),
        common.output,
        stop_reporting.clone(),
    ));
    let cpu_at_measure_start = common.broker_pid.map(|pid| {
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_start.into()).await;
            broker_cpu::sample(pid)
        })
    });

    // Phase 1: until the duration is over, the messages are sent (or received, in consume),
    // Ctrl-C, or a failure.
    let mut interrupted = false;
    let producing = join_all(producer_tasks);
    tokio::pin!(producing);
    let mut producing_result = None;
    let deadline = common
        .duration
        .map(|seconds| measure_start + Duration::from_secs(seconds));
    tokio::select! {
        result = &mut producing, if producer_count > 0 => producing_result = Some(result),
        _ = sleep_until_or_never(deadline) => {}
        _ = shared.enough_received.cancelled(), if plan.producing.is_none() => {}
        _ = interrupt.recv() => interrupted = true,
        _ = shared.failed.cancelled() => {}
    }
    stop_producers.cancel();
    let producing_result = match producing_result {
        Some(result) => result,
        None => producing.await,
    };
    let publish_end = Instant::now();

    // Phase 2, end-to-end: let the consumers receive what the broker acknowledged.
    let mut undrained = false;
    if let Some(drain_timeout) = plan.drain_timeout {
        if !interrupted && !shared.failed.is_cancelled() {
            shared.set_receive_target(shared.published.load(Ordering::Acquire));
            tokio::select! {
                _ = shared.enough_received.cancelled() => {}
                _ = tokio::time::sleep(drain_timeout) => undrained = true,
                _ = interrupt.recv() => interrupted = true,
                _ = shared.failed.cancelled() => {}
            }
        }
    }
    let receive_end = Instant::now();
    let cpu_at_end = common
        .broker_pid
        .map(broker_cpu::sample)
        .transpose()
        .context("--broker-pid")?;
    stop_consumers.cancel();
    let consuming_result = join_all(consumer_tasks).await;
    stop_reporting.cancel();
    let _ = reporter.await;
    producing_result?;
    consuming_result?;

    let sent = shared.published.load(Ordering::Acquire);
    let received = shared.received.load(Ordering::Acquire);
    if undrained {
        eprintln!(
            "warning: {} acknowledged messages were not received within --drain-timeout",
            sent.saturating_sub(received)
        );
    }
    let measured_publish = plan
        .producing
        .is_some()
        .then(|| publish_recorders.measured());
    let measured_receive = plan
        .consuming
        .is_some()
        .then(|| receive_recorders.measured());
    let measure_end = if plan.consuming.is_some() {
        receive_end
    } else {
        publish_end
    };
    let cpu_at_measure_start = match cpu_at_measure_start {
        Some(task) if measure_end >= measure_start => Some(
            task.await
                .context("the CPU sampling task failed")?
                .context("--broker-pid")?,
        ),
        Some(task) => {
            task.abort();
            None
        }
        None => None,
    };
    let broker_cpu = match (common.broker_pid, cpu_at_measure_start, cpu_at_end) {
        (Some(pid), Some(before), Some(after)) => {
            let messages = measured_publish
                .as_ref()
                .or(measured_receive.as_ref())
                .map_or(0, |window| window.messages);
            Some(BrokerCpu::between(pid, &before, &after, messages))
        }
        _ => None,
    };

    Ok(Summary {
        mode: plan.name,
        config: Settings {
            common: &plan.common,
            producing: plan.producing.as_ref(),
            consuming: plan.consuming.as_ref(),
            drain_timeout: plan.drain_timeout.map(|timeout| timeout.as_secs()),
        },
        interrupted,
        warmup_s: common.warmup as f64,
        sent: plan.producing.is_some().then_some(sent),
        send_errors: plan
            .producing
            .is_some()
            .then(|| shared.send_errors.load(Ordering::Acquire)),
        received: plan.consuming.is_some().then_some(received),
        received_other: plan
            .end_to_end()
            .then(|| shared.received_other.load(Ordering::Acquire)),
        publish: measured_publish
            .as_ref()
            .map(|window| Throughput::new(window, seconds_between(measure_start, publish_end))),
        receive: measured_receive
            .as_ref()
            .map(|window| Throughput::new(window, seconds_between(measure_start, receive_end))),
        publish_latency_ms: measured_publish
            .as_ref()
            .and_then(|window| window.latency()),
        end_to_end_latency_ms: measured_receive
            .as_ref()
            .and_then(|window| window.latency()),
        broker_cpu,
    })
}

async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Prints a line per second until `stop`: to stdout, or to stderr when stdout is reserved
/// for the JSON summary.
async fn report_every_second(
    shared: Arc<Shared>,
    publish: Option<Recorders>,
    receive: Option<Recorders>,
    backlog: bool,
    output: Output,
    stop: CancellationToken,
) {
    let mut previous = shared.start;
    let mut ticks = tokio::time::interval_at(
        (shared.start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = Instant::now();
        let publish_window = publish.as_ref().map(Recorders::take_interval);
        let receive_window = receive.as_ref().map(Recorders::take_interval);
        let line = report::tick_line(&Tick {
            elapsed_s: seconds_between(shared.start, now),
            interval_s: seconds_between(previous, now),
            warmup: now < shared.measure_start,
            publish: publish_window.as_ref(),
            receive: receive_window.as_ref(),
            // Sent and not yet received, in flight to the broker included: counting only
            // acknowledged messages would go negative whenever a consumer receives a message
            // before its producer has processed the receipt.
            backlog: backlog.then(|| {
                let handed = shared.handed.load(Ordering::Relaxed);
                let failed = shared.send_errors.load(Ordering::Relaxed);
                let received = shared.received.load(Ordering::Relaxed);
                handed.saturating_sub(failed).saturating_sub(received)
            }),
        });
        previous = now;
        match output {
            Output::Text => println!("{line}"),
            Output::Json => eprintln!("{line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        perf: PerfArgs,
    }

    fn plan(arguments: &[&str]) -> anyhow::Result<Plan> {
        let cli = Cli::try_parse_from(std::iter::once("perf").chain(arguments.iter().copied()))?;
        let plan = Plan::new(cli.perf.mode);
        plan.validate()?;
        Ok(plan)
    }

    #[test]
    fn defaults_follow_pulsar_perf() {
        let plan = plan(&["end-to-end"]).expect("valid");
        assert_eq!(plan.common.url, "pulsar://127.0.0.1:6650");
        assert_eq!(plan.common.admin_url, "http://127.0.0.1:8080");
        assert_eq!(plan.common.duration, Some(10), "ten seconds by default");
        assert_eq!(plan.topics(), vec!["perf-0".to_string()]);
        let producing = plan.producing.as_ref().expect("produces");
        assert_eq!(producing.size, 1024);
        assert_eq!(producing.batch_max_messages, 1000);
        assert_eq!(producing.batch_max_bytes, 128 * 1024);
        assert_eq!(producing.batch_max_delay, 1);
        assert_eq!(producing.max_pending, 1000);
        let consuming = plan.consuming.as_ref().expect("consumes");
        assert_eq!(consuming.subscription, "perf-sub");
        assert!(plan.end_to_end());
    }

    #[test]
    fn messages_replace_the_default_duration_and_exclude_it() {
        let plan = plan(&["produce", "--messages", "5"]).expect("valid");
        assert_eq!(plan.common.duration, None);
        assert_eq!(plan.common.messages, Some(5));
        assert!(self::plan(&["produce", "--messages", "5", "--duration", "3"]).is_err());
    }

    #[test]
    fn topics_are_numbered_after_the_prefix() {
        let plan = plan(&["consume", "--topics", "3", "--topic-prefix", "bench"]).expect("valid");
        assert_eq!(plan.topics(), ["bench-0", "bench-1", "bench-2"]);
    }

    #[test]
    fn invalid_combinations_name_the_flag() {
        let error = |arguments: &[&str]| match plan(arguments) {
            Ok(_) => panic!("{arguments:?} was accepted"),
            Err(error) => error.to_string(),
        };
        assert!(error(&["end-to-end", "--size", "8"]).contains("--size"));
        assert!(error(&["consume", "--consumers", "2"]).contains("--subscription-type"));
        assert!(error(&["produce", "--producers", "0"]).contains("--producers"));
        assert!(error(&["produce", "--topics", "0"]).contains("--topics"));
        assert!(error(&["produce", "--compression", "brotli"]).contains("brotli"));
        assert!(plan(&[
            "consume",
            "--consumers",
            "2",
            "--subscription-type",
            "key_shared"
        ])
        .is_ok());
        assert!(
            plan(&["produce", "--size", "0"]).is_ok(),
            "produce takes any size"
        );
    }

    #[test]
    fn partitioned_topic_paths_come_from_full_names() {
        // No admin server listens on port 9 (discard): the error names the URL built.
        let error = create_partitioned_topic(
            "http://127.0.0.1:9/",
            &meridian_client::TlsOptions::default(),
            "tenant/ns/t",
            2,
        )
        .expect_err("nothing listens");
        assert!(
            format!("{error:#}")
                .contains("http://127.0.0.1:9/admin/v2/persistent/tenant/ns/t/partitions"),
            "{error:#}"
        );
    }
}
