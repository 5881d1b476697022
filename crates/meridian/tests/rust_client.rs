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

/// A producer on `topic` that has sent `count` messages, each its index as text, every one
/// acknowledged (in order) before it returns.
async fn producer_after_numbered_sends(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    count: u32,
) -> pulsar::Producer<TokioExecutor> {
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .build()
        .await
        .expect("producer");
    for index in 0..count {
        producer
            .send_non_blocking(index.to_string().into_bytes())
            .await
            .expect("queued")
            .await
            .expect("receipt");
    }
    producer
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
    let _producer = producer_after_numbered_sends(&pulsar, topic, 40).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_at_its_acknowledged_range_limit_pauses_and_loses_no_acknowledgement() {
    // `cursor_max_ranges` bounds the memory of a subscription's individually acknowledged
    // ranges. The dispatcher never lets ranges plus messages in flight pass it: the
    // subscription blocks (as Pulsar's blocked subscription) until acknowledgements make room,
    // then goes on; every acknowledgement counts, before and after a restart.
    let mut broker =
        BrokerProcess::start_with_env(&[], &[("MERIDIAN_STORAGE__CURSOR_MAX_RANGES", "10")]);
    let admin = common::Admin::new(&broker);
    let stats_path = "/admin/v2/persistent/public/default/rust-range-limit/stats";
    let subscription_stats = |admin: &common::Admin| {
        tokio::task::block_in_place(|| admin.ok(admin.get(stats_path)))["subscriptions"]["bounded"]
            .clone()
    };
    let await_stats = |admin: &common::Admin, blocked: bool, unacked: u64, ranges: u64| {
        let mut last = serde_json::Value::Null;
        let reached = common::eventually(Duration::from_secs(20), || {
            last = subscription_stats(admin);
            last["blockedSubscriptionOnUnackedMsgs"] == blocked
                && last["unackedMessages"] == unacked
                && last["nonContiguousDeletedMessagesRanges"] == ranges
        });
        assert!(
            reached,
            "expected blocked {blocked}, {unacked} unacknowledged, {ranges} ranges; stats: {last}"
        );
    };
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/rust-range-limit";
    let mut bounded = consumer(&pulsar, topic, "bounded", SubType::Shared).await;
    let producer = producer_after_numbered_sends(&pulsar, topic, 40).await;
    let payload = |message: &pulsar::consumer::Message<Vec<u8>>| {
        String::from_utf8_lossy(&message.payload.data).into_owned()
    };

    // Ten messages go out, then the subscription is blocked.
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(receive(&mut bounded).await);
    }
    await_stats(&admin, true, 10, 0);
    // Acknowledging every other one makes five ranges: still 5 + 5 in flight.
    for index in [1, 3, 5, 7, 9] {
        bounded.ack(&held[index]).await.expect("ack");
    }
    await_stats(&admin, true, 5, 5);
    // The first one moves the mark-delete position: four ranges, four in flight, two more go.
    bounded.ack(&held[0]).await.expect("ack");
    let mut received: Vec<String> = held.iter().map(payload).collect();
    for _ in 0..2 {
        let message = receive(&mut bounded).await;
        received.push(payload(&message));
        held.push(message);
    }
    await_stats(&admin, true, 6, 4);
    for index in [2, 4, 6, 8, 10, 11] {
        bounded.ack(&held[index]).await.expect("ack");
    }
    // The rest flows as it is acknowledged.
    while received.len() < 40 {
        let message = receive(&mut bounded).await;
        received.push(payload(&message));
        bounded.ack(&message).await.expect("ack");
    }
    let expected: Vec<String> = (0..40).map(|index| index.to_string()).collect();
    assert_eq!(received, expected, "each message exactly once, in order");
    await_stats(&admin, false, 0, 0);
    drop(bounded);
    drop(producer);
    drop(pulsar);

    // After a restart nothing acknowledged comes back: the next message is the new one.
    broker.stop();
    broker.restart();
    let pulsar = client(&broker).await;
    let mut bounded = consumer(&pulsar, topic, "bounded", SubType::Shared).await;
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .build()
        .await
        .expect("producer");
    producer
        .send_non_blocking(b"40".to_vec())
        .await
        .expect("queued")
        .await
        .expect("receipt");
    assert_eq!(payload(&receive(&mut bounded).await), "40");
    drop(bounded);
    drop(producer);
    drop(pulsar);
    broker.assert_no_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_at_its_range_limit_with_nothing_in_flight_still_delivers_the_gaps() {
    // Acknowledgements of entries a consumer was not sent (a client acknowledging by id, or
    // another cluster's acknowledgements of a replicated subscription) can fill the range limit
    // while nothing is in flight. The entries between the ranges must still be delivered: their
    // acknowledgements are what shrinks the ranges again.
    let broker =
        BrokerProcess::start_with_env(&[], &[("MERIDIAN_STORAGE__CURSOR_MAX_RANGES", "10")]);
    let pulsar = client(&broker).await;
    let topic = "persistent://public/default/rust-range-gaps";
    let mut bounded = consumer(&pulsar, topic, "bounded", SubType::Shared).await;
    let producer = producer_after_numbered_sends(&pulsar, topic, 60).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(receive(&mut bounded).await);
    }
    // Entries 21, 23, ..., 39, never sent to this consumer, acknowledged by id: ten ranges.
    let first = held[0].message_id().clone();
    for entry in (21..40u64).step_by(2) {
        let mut id = first.clone();
        id.entry_id = first.entry_id + entry;
        bounded.ack_with_id(topic, id).await.expect("ack by id");
    }
    for message in &held {
        bounded.ack(message).await.expect("ack");
    }
    let mut received: Vec<u32> = held
        .iter()
        .map(|message| {
            String::from_utf8_lossy(&message.payload.data)
                .parse()
                .expect("index")
        })
        .collect();
    let expected: Vec<u32> = (0..60)
        .filter(|index| !(21..40).contains(index) || index % 2 == 0)
        .collect();
    while received.len() < expected.len() {
        let message = receive(&mut bounded).await;
        received.push(
            String::from_utf8_lossy(&message.payload.data)
                .parse()
                .expect("index"),
        );
        bounded.ack(&message).await.expect("ack");
    }
    assert_eq!(received, expected);
    drop(bounded);
    drop(producer);
    drop(pulsar);
    broker.assert_no_errors();
}
