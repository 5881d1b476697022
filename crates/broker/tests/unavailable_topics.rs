//! A topic whose log is poisoned by a failed fsync is reported as unavailable: producers get
//! the reason at once, the failure is counted once, and reloading the topic clears it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;
use meridian_broker::health::FailureKind;
use meridian_broker::outbound::{outbound_queue, OutboundSender};
use meridian_broker::resources::{Policies, TenantInfo};
use meridian_broker::{
    AccessMode, Broker, BrokerConfig, BrokerError, NewProducer, Publish, TopicName,
};
use meridian_metadata::EmbeddedStore;
use meridian_storage::{SimIo, Storage, StorageConfig};

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
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_makes_the_topic_unavailable_with_its_reason_until_reloaded() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let io = Arc::new(SimIo::new());
    let storage = Storage::open_with_io("/sim/storage", StorageConfig::default(), io.clone())
        .expect("storage opens");
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
    let name = TopicName::parse("persistent://t/n/poisoned").expect("valid name");
    let topic = broker.topic(&name, true).await.expect("topic loads");
    let (sink, _receiver) = outbound_queue(1 << 20);
    let grant = topic
        .add_producer(broker.next_key(), new_producer(sink.clone(), 1))
        .expect("producer admitted");
    topic
        .publish(grant.key, &grant.name, publish(0))
        .expect("publish accepted")
        .await
        .expect("publish durable");

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
