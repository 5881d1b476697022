//! A topic whose log is poisoned by a failed fsync is reported as unavailable: producers get
//! the reason at once, the failure is counted and logged once, and reloading the topic clears
//! it. A producer fenced by a tenant migration has nothing stored after the fence.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use meridian_broker::health::FailureKind;
use meridian_broker::outbound::{outbound_queue, OutboundSender};
use meridian_broker::resources::{Policies, TenantInfo};
use meridian_broker::{
    AccessMode, Broker, BrokerConfig, BrokerError, NewProducer, ProducerGrant, Publish, Topic,
    TopicName,
};
use meridian_metadata::EmbeddedStore;
use meridian_storage::{FlushPolicy, SimIo, Storage, StorageConfig};

/// Every line logged by this test binary (all tests: filter by topic).
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        LOG.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_log() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// The ERROR lines logged so far that name `topic`.
fn error_lines(topic: &str) -> Vec<String> {
    String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
        .lines()
        .filter(|line| line.contains(" ERROR ") && line.contains(topic))
        .map(str::to_string)
        .collect()
}

fn new_producer(sink: OutboundSender, id: u64) -> NewProducer {
    NewProducer {
        name: None,
        mode: AccessMode::Shared,
        producer_id: id,
        sink,
        closed: Arc::new(AtomicBool::new(false)),
        address: "test".into(),
        client_version: "test".into(),
        protocol_version: 20,
    }
}

fn publish(sequence_id: u64) -> Publish {
    Publish {
        messages: 1,
        sequence_id,
        highest_sequence_id: sequence_id,
        entry: Bytes::from_static(b"payload"),
        publish_time_ms: 1,
        origin: None,
        local_replicate_to: None,
        checksum: None,
    }
}

/// A broker on simulated storage with namespace `t/n` (the directory holds its metadata).
fn simulated_broker(config: StorageConfig) -> (tempfile::TempDir, Arc<SimIo>, Arc<Broker>) {
    let directory = tempfile::tempdir().expect("temporary directory");
    let io = Arc::new(SimIo::new());
    let storage = Storage::open_with_io("/sim/storage", config, io.clone()).expect("storage opens");
    let metadata = EmbeddedStore::open(&directory.path().join("metadata")).expect("metadata opens");
    let broker = Broker::new(BrokerConfig::default(), storage, metadata).expect("broker starts");
    broker
        .resources()
        .create_tenant("t", &TenantInfo::default())
        .expect("tenant created");
    broker
        .resources()
        .create_namespace("t", "n", &Policies::default())
        .expect("namespace created");
    (directory, io, broker)
}

/// Loads `name` with a producer (id 1) that stored one message; its `closed` flag too.
async fn topic_with_a_producer(
    broker: &Arc<Broker>,
    name: &TopicName,
    sink: OutboundSender,
) -> (Arc<Topic>, ProducerGrant, Arc<AtomicBool>) {
    let topic = broker.topic(name, true).await.expect("topic loads");
    let request = new_producer(sink, 1);
    let closed = request.closed.clone();
    let grant = topic
        .add_producer(broker.next_key(), request)
        .expect("producer admitted");
    topic
        .publish(grant.key, &grant.name, publish(0))
        .expect("publish accepted")
        .await
        .expect("publish durable");
    (topic, grant, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_makes_the_topic_unavailable_with_its_reason_until_reloaded() {
    let (_directory, io, broker) = simulated_broker(StorageConfig::default());
    let name = TopicName::parse("persistent://t/n/poisoned").expect("valid name");
    let (sink, _receiver) = outbound_queue(1 << 20);
    let (topic, grant, _) = topic_with_a_producer(&broker, &name, sink.clone()).await;

    io.fail_syncs(1);
    let failed = topic
        .publish(grant.key, &grant.name, publish(1))
        .expect("publish accepted")
        .await;
    assert!(
        matches!(&failed, Err(BrokerError::TopicUnavailable { reason, .. }) if reason.contains("poisoned")),
        "{failed:?}"
    );
    // Later sends and new producers get the same reason at once.
    let later = match topic.publish(grant.key, &grant.name, publish(2)) {
        Ok(pending) => pending.await.map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(
        matches!(later, Err(BrokerError::TopicUnavailable { .. })),
        "{later:?}"
    );
    let refused = topic.add_producer(broker.next_key(), new_producer(sink.clone(), 2));
    assert!(
        matches!(&refused, Err(BrokerError::TopicUnavailable { reason, .. }) if reason.contains("unload")),
        "{:?}",
        refused.err()
    );
    let health = broker.health();
    assert_eq!(health.poisoned_total(), 1);
    let failures = health.failures();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].kind, FailureKind::Poisoned);
    assert_eq!(failures[0].topic, name.to_string());

    // Unloading reopens the log: the topic serves again.
    broker.unload(&name).await;
    let reloaded = broker.topic(&name, true).await.expect("topic loads");
    assert!(broker.health().failures().is_empty());
    let grant = reloaded
        .add_producer(broker.next_key(), new_producer(sink, 3))
        .expect("producer admitted");
    reloaded
        .publish(grant.key, &grant.name, publish(3))
        .expect("publish accepted")
        .await
        .expect("publish durable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_relaxed_fsync_is_logged_once_with_topic_and_cause() {
    // Models a disk that fails an fsync in relaxed mode: the sends were acknowledged after
    // their write, so the failure happens in the background, with no client request failing.
    capture_log();
    let (_directory, io, broker) = simulated_broker(StorageConfig {
        flush_policy: FlushPolicy::RelaxedWriteOnly {
            fsync_interval: Duration::from_millis(20),
        },
        ..StorageConfig::default()
    });
    let name = TopicName::parse("persistent://t/n/relaxed-poisoned").expect("valid name");
    let topic = broker.topic(&name, true).await.expect("topic loads");
    let (sink, _receiver) = outbound_queue(1 << 20);
    let grant = topic
        .add_producer(broker.next_key(), new_producer(sink.clone(), 1))
        .expect("producer admitted");

    io.fail_syncs(1);
    topic
        .publish(grant.key, &grant.name, publish(0))
        .expect("publish accepted")
        .await
        .expect("acknowledged after its write (relaxed mode)");
    // The background fsync fails: the operator learns it at once, before any client does.
    let deadline = Instant::now() + Duration::from_secs(30);
    while error_lines(&name.to_string()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no ERROR line for the failed fsync"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(broker.health().poisoned_total(), 1);

    // A client then meets the failure: it gets the reason, and nothing more is logged.
    let refused = match topic.publish(grant.key, &grant.name, publish(1)) {
        Ok(pending) => pending.await.map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(
        matches!(&refused, Err(BrokerError::TopicUnavailable { reason, .. }) if reason.contains("relaxed mode")),
        "{refused:?}"
    );
    let lines = error_lines(&name.to_string());
    assert_eq!(lines.len(), 1, "one ERROR line, not {lines:#?}");
    let line = &lines[0];
    assert!(
        line.contains(&format!("topic={name}")) || line.contains(&format!("topic=\"{name}\"")),
        "{line}"
    );
    assert!(
        line.contains("cause=") && line.contains("injected fsync failure") && line.contains("lost"),
        "{line}"
    );
    assert_eq!(broker.health().poisoned_total(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_topics_that_cannot_load_leave_nothing_behind() {
    let (_directory, _io, broker) = simulated_broker(StorageConfig::default());
    // Names a client may send at will: in a namespace that does not exist, or not created
    // (automatic creation not asked for).
    for index in 0..500 {
        for name in [
            format!("persistent://t/no-such-namespace/x{index}"),
            format!("persistent://t/n/not-created-{index}"),
        ] {
            let name = TopicName::parse(&name).expect("valid name");
            assert!(matches!(
                broker.topic(&name, false).await,
                Err(BrokerError::TopicNotFound(_))
            ));
        }
    }
    assert_eq!(
        broker.topic_slots(),
        0,
        "failed loads held on to their slots"
    );
    // A topic that loads keeps its slot.
    let name = TopicName::parse("persistent://t/n/real").expect("valid name");
    broker.topic(&name, true).await.expect("topic loads");
    assert_eq!(broker.topic_slots(), 1);
}

/// A tenant migration's fence closes a producer while its connection may be passing a SEND to
/// the topic: that SEND must not be stored once the fence is in place (the migration counts
/// the replication backlog after the fence and then sends the producer to the target, which
/// would otherwise miss the message or get it after the producer's next ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_that_reaches_the_topic_after_its_producer_was_fenced_is_not_stored() {
    let (_directory, _io, broker) = simulated_broker(StorageConfig::default());
    let name = TopicName::parse("persistent://t/n/fenced").expect("valid name");
    let (sink, _receiver) = outbound_queue(1 << 20);
    let (topic, grant, closed) = topic_with_a_producer(&broker, &name, sink).await;
    let stored = topic.internal_stats().number_of_entries;
    // The fence marks the producer closed (what `fence_producers` does) and the SEND that the
    // connection checked just before arrives now.
    closed.store(true, std::sync::atomic::Ordering::SeqCst);
    let late = match topic.publish(grant.key, &grant.name, publish(1)) {
        Ok(pending) => pending.await.map(|_| ()),
        Err(error) => Err(error),
    };
    assert!(
        matches!(late, Err(BrokerError::TenantMigrated(_))),
        "{late:?}"
    );
    assert_eq!(
        topic.internal_stats().number_of_entries,
        stored,
        "the fenced send was stored"
    );
}
