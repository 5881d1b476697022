//! The Rust `pulsar` crate (unmodified, from crates.io) against real `meridian standalone`
//! processes.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use common::BrokerProcess;
use futures::TryStreamExt;
use pulsar::consumer::{ConsumerOptions, InitialPosition};
use pulsar::message::proto::command_subscribe::SubType;
use pulsar::producer::{Message, ProducerOptions};
use pulsar::{Consumer, Pulsar, TokioExecutor};

async fn client(broker: &BrokerProcess) -> Pulsar<TokioExecutor> {
    Pulsar::builder(broker.url(), TokioExecutor)
        .build()
        .await
        .expect("connect")
}

async fn consumer(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    subscription: &str,
    sub_type: SubType,
) -> Consumer<Vec<u8>, TokioExecutor> {
    pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(subscription)
        .with_subscription_type(sub_type)
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .build()
        .await
        .expect("subscribe")
}

/// Receives one message, failing the test if none arrives in time.
async fn receive(
    consumer: &mut Consumer<Vec<u8>, TokioExecutor>,
) -> pulsar::consumer::Message<Vec<u8>> {
    tokio::time::timeout(Duration::from_secs(20), consumer.try_next())
        .await
        .expect("a message arrives")
        .expect("no consumer error")
        .expect("stream open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_compressed_messages_round_trip_byte_exact_in_order() {
    let broker = BrokerProcess::start(&[]);
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/rust-round-trip";
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .with_name("rust-producer")
        .with_options(ProducerOptions {
            batch_size: Some(25),
            compression: Some(pulsar::compression::Compression::Lz4(
                pulsar::compression::CompressionLz4::default(),
            )),
            ..Default::default()
        })
        .build()
        .await
        .expect("producer");
    let mut receipts = Vec::new();
    for index in 0..200u32 {
        let mut properties = HashMap::new();
        properties.insert("index".to_string(), index.to_string());
        let message = Message {
            payload: format!("payload-{index}-{}", "z".repeat(index as usize)).into_bytes(),
            partition_key: Some(format!("key-{}", index % 7)),
            properties,
            ..Default::default()
        };
        receipts.push(producer.send_non_blocking(message).await.expect("queued"));
    }
    producer.send_batch().await.expect("flush batch");
    for receipt in receipts {
        receipt.await.expect("receipt");
    }

    let mut consumer = consumer(&pulsar, topic, "rust-sub", SubType::Exclusive).await;
    for index in 0..200u32 {
        let message = receive(&mut consumer).await;
        assert_eq!(
            message.payload.data,
            format!("payload-{index}-{}", "z".repeat(index as usize)).into_bytes()
        );
        let properties: BTreeMap<String, String> = message
            .payload
            .metadata
            .properties
            .iter()
            .map(|pair| (pair.key.clone(), pair.value.clone()))
            .collect();
        assert_eq!(properties.get("index"), Some(&index.to_string()));
        assert_eq!(
            message.payload.metadata.partition_key.as_deref(),
            Some(format!("key-{}", index % 7).as_str())
        );
        consumer.ack(&message).await.expect("ack");
    }
    drop(consumer);
    drop(pulsar);
    broker.assert_no_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_consumers_split_the_load_and_survivors_get_a_closed_consumers_messages() {
    let broker = BrokerProcess::start(&[]);
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/rust-shared";
    let mut first = consumer(&pulsar, topic, "workers", SubType::Shared).await;
    let mut second = consumer(&pulsar, topic, "workers", SubType::Shared).await;
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .build()
        .await
        .expect("producer");
    for index in 0..40u32 {
        producer
            .send_non_blocking(index.to_string().into_bytes())
            .await
            .expect("queued")
            .await
            .expect("receipt");
    }
    // The first consumer takes a few messages and leaves without acknowledging them.
    let mut unacked = HashSet::new();
    for _ in 0..3 {
        unacked.insert(receive(&mut first).await.payload.data);
    }
    drop(first);
    // The second consumer ends up with every message, the first one's among them.
    let mut seen = HashSet::new();
    while seen.len() < 40 {
        let message = receive(&mut second).await;
        seen.insert(message.payload.data.clone());
        second.ack(&message).await.expect("ack");
    }
    assert!(unacked.is_subset(&seen));
    broker.assert_no_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_kill_minus_nine() {
    let mut broker = BrokerProcess::start(&[]);
    let topic = "persistent://public/default/rust-kill9";
    let mut acknowledged = Vec::new();
    {
        let pulsar = client(&broker).await;
        let mut producer = pulsar
            .producer()
            .with_topic(topic)
            .build()
            .await
            .expect("producer");
        for index in 0..300u32 {
            producer
                .send_non_blocking(format!("durable-{index}").into_bytes())
                .await
                .expect("queued")
                .await
                .expect("receipt");
            acknowledged.push(format!("durable-{index}").into_bytes());
        }
        // Kill the broker while the client is still connected.
        broker.kill9();
    }
    broker.restart();
    let pulsar = client(&broker).await;
    let mut consumer = consumer(&pulsar, topic, "after-crash", SubType::Exclusive).await;
    for expected in &acknowledged {
        let message = receive(&mut consumer).await;
        assert_eq!(&message.payload.data, expected);
        consumer.ack(&message).await.expect("ack");
    }
}
