//! Geo-replication between real `meridian standalone` processes (one per cluster), driven
//! through the admin API and Meridian's own client.
//!
//! The Python suite (`compat/test_replication.py`) covers the topologies and link faults with
//! the official client; these tests cover configure-once, a remote that stays down while a
//! large backlog accumulates (memory must stay flat), and kill -9 of the remote in the middle of
//! replication (the remote's de-duplication by origin position must drop every resent entry).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, Admin, BrokerProcess};
use meridian_broker::replication::origin_acks::{OriginAcks, OriginProgress};
use meridian_broker::replication::state_format;
use meridian_broker::replication::subscription_sync::SyncedAcks;
use meridian_client::{
    Client, Consumer, InitialPosition, Producer, ProducerMessage, StateAnswer, StateFormat,
};
use meridian_storage::Position;

const WAIT: Duration = Duration::from_secs(120);

/// A cluster: its broker process and admin client.
struct Cluster {
    name: &'static str,
    broker: BrokerProcess,
}

impl Cluster {
    fn start(name: &'static str, environment: &[(&str, &str)]) -> Cluster {
        Cluster {
            name,
            broker: BrokerProcess::start_with_env(&["--cluster-name", name], environment),
        }
    }

    fn admin(&self) -> Admin {
        Admin::new(&self.broker)
    }

    fn registry_entry(&self) -> String {
        serde_json::json!({
            "serviceUrl": format!("http://127.0.0.1:{}", self.broker.web_port),
            "brokerServiceUrl": self.broker.url(),
        })
        .to_string()
    }

    async fn client(&self) -> Client {
        Client::builder(self.broker.url())
            .operation_timeout(Duration::from_secs(30))
            .build()
            .await
            .expect("client")
    }

    fn stats(&self, topic: &str) -> serde_json::Value {
        self.admin().ok(self
            .admin()
            .get(&format!("/admin/v2/persistent/t/ns/{topic}/stats")))
    }
}

/// Registers `remotes` on `on`, creates tenant `t` (allowed: every cluster) and namespace
/// `t/ns` there, and sets its replication clusters: configured on that one cluster only.
fn configure(on: &Cluster, remotes: &[&Cluster]) {
    let admin = on.admin();
    for remote in remotes {
        admin.ok(admin.put(
            &format!("/admin/v2/clusters/{}", remote.name),
            Some(&remote.registry_entry()),
        ));
    }
    let mut clusters = vec![on.name];
    clusters.extend(remotes.iter().map(|remote| remote.name));
    let clusters = serde_json::json!(clusters).to_string();
    admin.ok(admin.put(
        "/admin/v2/tenants/t",
        Some(&format!(
            r#"{{"adminRoles":[],"allowedClusters":{clusters}}}"#
        )),
    ));
    admin.ok(admin.put("/admin/v2/namespaces/t/ns", None));
    admin.ok(admin.post("/admin/v2/namespaces/t/ns/replication", &clusters));
}

/// Waits until the namespace exists on `cluster` with these replication clusters.
fn await_namespace(cluster: &Cluster, clusters: &[&str]) {
    let admin = cluster.admin();
    let wanted = serde_json::json!(clusters);
    assert!(
        eventually(WAIT, || {
            let (status, body) = admin.get("/admin/v2/namespaces/t/ns/replication");
            status == 200 && body == wanted
        }),
        "namespace t/ns never reached {} with clusters {wanted}",
        cluster.name
    );
}

/// Clusters a and b, started with these environments, with `t/ns` replicated between them:
/// configured on a only, then awaited on b (configure-once).
fn replicated_pair(environment_a: &[(&str, &str)]) -> (Cluster, Cluster) {
    replicated_pair_with(environment_a, &[])
}

/// `replicated_pair` with b's environment too.
fn replicated_pair_with(
    environment_a: &[(&str, &str)],
    environment_b: &[(&str, &str)],
) -> (Cluster, Cluster) {
    let a = Cluster::start("a", environment_a);
    let b = Cluster::start("b", environment_b);
    configure(&a, &[&b]);
    await_namespace(&b, &["a", "b"]);
    (a, b)
}

/// Creates the subscription the tests read with on `cluster`, so that it keeps every message
/// from now on even while nobody is connected.
async fn create_subscription(cluster: &Cluster, topic: &str) {
    let client = cluster.client().await;
    subscribe(&client, topic)
        .await
        .close()
        .await
        .expect("close");
    client.close().await;
}

async fn subscribe(client: &Client, topic: &str) -> Consumer {
    client
        .consumer(format!("persistent://t/ns/{topic}"))
        .subscription("check")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .expect("subscribe")
}

/// Receives until `expected` messages arrived (failing on a duplicate payload), then makes
/// sure nothing else follows for a moment. Returns the messages by payload, and the payloads
/// in arrival order.
async fn receive_exactly(
    consumer: &Consumer,
    expected: usize,
    clusters: &[&Cluster],
) -> (BTreeMap<Vec<u8>, meridian_client::Message>, Vec<Vec<u8>>) {
    let mut received = BTreeMap::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    while received.len() < expected {
        let message = tokio::time::timeout(WAIT, consumer.receive())
            .await
            .unwrap_or_else(|_| {
                let logs: Vec<String> = clusters
                    .iter()
                    .map(|cluster| {
                        let local = consumer.topic().rsplit('/').next().unwrap_or_default();
                        let stats = cluster
                            .admin()
                            .get(&format!("/admin/v2/persistent/t/ns/{local}/stats"));
                        let internal = cluster
                            .admin()
                            .get(&format!("/admin/v2/persistent/t/ns/{local}/internalStats"));
                        format!(
                            "--- {}: stats {}\ninternal stats {}\nlog:\n{}",
                            cluster.name,
                            stats.1,
                            internal.1,
                            cluster.broker.log()
                        )
                    })
                    .collect();
                panic!(
                    "only {} of {expected} messages arrived; received {:?}\n{}",
                    received.len(),
                    order
                        .iter()
                        .map(|payload: &Vec<u8>| String::from_utf8_lossy(payload)
                            .chars()
                            .take(16)
                            .collect::<String>())
                        .collect::<Vec<_>>(),
                    logs.join("\n")
                )
            })
            .expect("receive");
        consumer.ack(&message).await.expect("ack");
        let payload = message.payload.to_vec();
        order.push(payload.clone());
        assert!(
            received.insert(payload.clone(), message).is_none(),
            "duplicate message {:?}",
            String::from_utf8_lossy(&payload)
        );
    }
    // A duplicate would come right behind the originals.
    if let Ok(Ok(extra)) = tokio::time::timeout(Duration::from_secs(2), consumer.receive()).await {
        panic!(
            "unexpected extra message {:?}",
            String::from_utf8_lossy(&extra.payload)
        );
    }
    (received, order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configure_once_replicates_both_ways_with_everything_kept() {
    // Only cluster a is configured; it creates the cluster entry, tenant and namespace on b.
    let (a, b) = replicated_pair(&[]);
    let b_admin = b.admin();
    let tenant = b_admin.ok(b_admin.get("/admin/v2/tenants/t"));
    assert!(
        tenant["allowedClusters"].to_string().contains("\"a\""),
        "tenant on b lacks cluster a: {tenant}"
    );

    let topic = "configured-once";
    let (client_a, client_b) = (a.client().await, b.client().await);
    let consumer_a = subscribe(&client_a, topic).await;
    let consumer_b = subscribe(&client_b, topic).await;
    let producer_a = client_a
        .producer(format!("persistent://t/ns/{topic}"))
        .name("writer-a")
        .batching(10, 1 << 20, Duration::from_millis(5))
        .create()
        .await
        .expect("producer on a");
    let producer_b = client_b
        .producer(format!("persistent://t/ns/{topic}"))
        .name("writer-b")
        .create()
        .await
        .expect("producer on b");
    let mut receipts = Vec::new();
    for index in 0..50u64 {
        receipts.push(
            producer_a
                .send(
                    ProducerMessage::new(format!("a-{index}"))
                        .with_key(format!("key-{}", index % 7))
                        .with_property("index", index.to_string())
                        .with_event_time(1_000 + index),
                )
                .await
                .expect("send on a"),
        );
        receipts.push(
            producer_b
                .send(ProducerMessage::new(format!("b-{index}")))
                .await
                .expect("send on b"),
        );
    }
    for receipt in receipts {
        receipt.await.expect("receipt");
    }

    for consumer in [&consumer_a, &consumer_b] {
        let (received, _) = receive_exactly(consumer, 100, &[&a, &b]).await;
        for index in 0..50u64 {
            let from_a = &received[format!("a-{index}").as_bytes()];
            assert_eq!(
                from_a.key.as_deref(),
                Some(format!("key-{}", index % 7).as_str())
            );
            assert_eq!(
                from_a.properties,
                BTreeMap::from([("index".to_string(), index.to_string())]),
                "properties changed (the origin position must not show)"
            );
            assert_eq!(from_a.event_time, Some(1_000 + index));
            assert_eq!(from_a.producer_name, "writer-a");
            assert_eq!(
                received[format!("b-{index}").as_bytes()].producer_name,
                "writer-b"
            );
        }
    }
    let stats = a.stats(topic);
    assert_eq!(stats["replication"]["b"]["connected"], true, "{stats}");
    assert_eq!(
        stats["replication"]["b"]["msgOutCount"].as_u64(),
        Some(50),
        "{stats}"
    );
    assert!(
        stats["replication"]["b"]["msgInCount"].as_u64() == Some(50),
        "inbound count from b: {stats}"
    );
    let metrics = ureq::get(&format!("http://127.0.0.1:{}/metrics", a.broker.web_port))
        .call()
        .expect("metrics")
        .into_string()
        .expect("metrics text");
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("pulsar_replication_backlog{")
                && line.contains("remote_cluster=\"b\"")),
        "no replication backlog metric:\n{metrics}"
    );
    client_a.close().await;
    client_b.close().await;
    a.broker.assert_no_errors();
    b.broker.assert_no_errors();
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kilobytes| kilobytes * 1024)
        .expect("VmRSS")
}

/// a and b replicating `topic`, with a 16 MiB entry cache on a (so that the cache is not what
/// grows), the reading subscription on b, b stopped, and a batching producer on a.
async fn remote_down(topic: &str) -> (Cluster, Cluster, Client, Producer) {
    let (a, mut b) = replicated_pair(&[("MERIDIAN_STORAGE__CACHE_MAX_BYTES", "16777216")]);
    create_subscription(&b, topic).await;
    b.broker.stop();
    let client_a = a.client().await;
    let producer = client_a
        .producer(format!("persistent://t/ns/{topic}"))
        .batching(16, 1 << 20, Duration::from_millis(2))
        .create()
        .await
        .expect("producer");
    (a, b, client_a, producer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_down_backlog_stays_on_disk_then_catches_up() {
    // The broker's memory other than its entry cache must not grow with the backlog.
    let topic = "backlog";
    let (a, mut b, client_a, producer) = remote_down(topic).await;
    let total = 3_200usize; // 200 MiB
    let pid = a.broker.pid();
    let before = rss_bytes(pid);
    let peak = produce_sampling_rss(&producer, total, 64 * 1024, pid).await;
    let stats = a.stats(topic);
    assert_eq!(stats["replication"]["b"]["connected"], false, "{stats}");
    assert!(
        stats["replication"]["b"]["replicationBacklog"]
            .as_u64()
            .is_some_and(|backlog| backlog > 0),
        "{stats}"
    );
    // The 200 MiB backlog is on disk: the broker's memory grows by its bounded buffers and
    // caches only (44 MiB measured), far less than the backlog.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 100 * 1024 * 1024,
        "broker RSS grew by {} MiB while the remote was down",
        growth / (1024 * 1024)
    );

    b.broker.restart();
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    let (received, _) = receive_exactly(&consumer_b, total, &[&a, &b]).await;
    assert_eq!(received.len(), total);
    assert!(eventually(WAIT, || {
        a.stats(topic)["replication"]["b"]["replicationBacklog"].as_u64() == Some(0)
    }));
    client_a.close().await;
    client_b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_remote_mid_replication_leaves_no_duplicates() {
    let (a, mut b) = replicated_pair(&[]);
    let topic = "remote-crash";
    create_subscription(&b, topic).await;

    let client_a = a.client().await;
    let producer = producer(&client_a, topic).await;
    let total = 3_000usize;
    let mut receipts = Vec::new();
    for index in 0..total {
        receipts.push(producer.send(format!("m-{index:06}")).await.expect("send"));
        if index == total / 3 {
            // Kill the remote while entries are in flight to it.
            assert!(eventually(WAIT, || {
                a.stats(topic)["replication"]["b"]["msgOutCount"]
                    .as_u64()
                    .is_some_and(|sent| sent > 0)
            }));
            b.broker.kill9();
        }
        if index == 2 * total / 3 {
            b.broker.restart();
        }
    }
    for receipt in receipts {
        receipt.await.expect("receipt");
    }
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    let (_, order) = receive_exactly(&consumer_b, total, &[&a, &b]).await;
    // Per-producer order is kept: payloads arrive in the order they were sent.
    let sent: Vec<Vec<u8>> = (0..total)
        .map(|index| format!("m-{index:06}").into_bytes())
        .collect();
    assert!(order == sent, "replicated messages arrived out of order");
    client_a.close().await;
    client_b.close().await;
}

/// A producer on `t/ns/<topic>` with the default settings.
async fn producer(client: &Client, topic: &str) -> Producer {
    client
        .producer(format!("persistent://t/ns/{topic}"))
        .create()
        .await
        .expect("producer")
}

/// Produces `count` messages named `<prefix>-<index>` and waits for their receipts.
async fn produce(client: &Client, topic: &str, prefix: &str, count: usize) {
    let producer = producer(client, topic).await;
    for index in 0..count {
        producer
            .send_and_wait(format!("{prefix}-{index}"))
            .await
            .expect("send");
    }
    producer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_cluster_starts_at_latest_or_back_fills_from_earliest() {
    for (start_at, back_filled) in [("latest", false), ("earliest", true)] {
        let a = Cluster::start("a", &[("MERIDIAN_REPLICATION_START_AT", start_at)]);
        let b = Cluster::start("b", &[]);
        // The namespace is local to a at first.
        configure(&a, &[]);
        let admin = a.admin();
        admin.ok(admin.put("/admin/v2/clusters/b", Some(&b.registry_entry())));
        admin.ok(admin.post(
            "/admin/v2/tenants/t",
            r#"{"adminRoles":[],"allowedClusters":["a","b"]}"#,
        ));
        let topic = "added-later";
        let client_a = a.client().await;
        produce(&client_a, topic, "before", 20).await;

        // Adding b while the topic is loaded starts its replicator at once.
        admin.ok(admin.post("/admin/v2/namespaces/t/ns/replication", r#"["a","b"]"#));
        await_namespace(&b, &["a", "b"]);
        assert!(eventually(WAIT, || {
            a.stats(topic)["replication"]["b"]["connected"] == true
        }));
        produce(&client_a, topic, "after", 20).await;

        let client_b = b.client().await;
        let consumer_b = subscribe(&client_b, topic).await;
        let expected = if back_filled { 40 } else { 20 };
        let (received, _) = receive_exactly(&consumer_b, expected, &[&a, &b]).await;
        assert!(
            received.contains_key(b"after-19".as_slice()),
            "start at {start_at}: the messages after the change must arrive"
        );
        assert_eq!(
            received.contains_key(b"before-0".as_slice()),
            back_filled,
            "start at {start_at}: earlier messages back-filled or not"
        );

        // Removing b stops its replicator and deletes its cursor.
        admin.ok(admin.post("/admin/v2/namespaces/t/ns/replication", r#"["a"]"#));
        assert!(eventually(WAIT, || {
            let internal =
                admin.ok(admin.get(&format!("/admin/v2/persistent/t/ns/{topic}/internalStats")));
            internal["cursors"].get("pulsar.repl.b").is_none()
        }));
        client_a.close().await;
        client_b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicator_dispatch_rate_caps_what_is_sent_per_period() {
    let (a, b) = replicated_pair(&[]);
    let admin = a.admin();
    // Five messages per hour: the replicator must stop at five.
    admin.ok(admin.post(
        "/admin/v2/namespaces/t/ns/replicatorDispatchRate",
        r#"{"dispatchThrottlingRateInMsg":5,"dispatchThrottlingRateInByte":0,"ratePeriodInSecond":3600}"#,
    ));
    let rate = admin.ok(admin.get("/admin/v2/namespaces/t/ns/replicatorDispatchRate"));
    assert_eq!(rate["dispatchThrottlingRateInMsg"], 5, "{rate}");
    let topic = "throttled";
    let client_a = a.client().await;
    produce(&client_a, topic, "m", 20).await;
    assert!(
        eventually(WAIT, || {
            let stats = a.stats(topic);
            stats["replication"]["b"]["msgOutCount"].as_u64() == Some(5)
                && stats["replication"]["b"]["replicationBacklog"].as_u64() == Some(15)
        }),
        "the replicator did not stop at the limit: {}",
        a.stats(topic)
    );
    // Lifting the limit lets the rest through at once.
    admin.ok(admin.delete("/admin/v2/namespaces/t/ns/replicatorDispatchRate"));
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    let (received, _) = receive_exactly(&consumer_b, 20, &[&a, &b]).await;
    assert_eq!(received.len(), 20);
    client_a.close().await;
    client_b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicators_to_one_cluster_share_its_connection() {
    let (a, b) = replicated_pair(&[]);
    let client_a = a.client().await;
    let topics = ["shared-0", "shared-1", "shared-2", "shared-3"];
    for topic in topics {
        produce(&client_a, topic, topic, 1).await;
    }
    // On b, each topic's producer from a's replicator comes from the same client address.
    let mut addresses = std::collections::BTreeSet::new();
    for topic in topics {
        let mut address = None;
        assert!(
            eventually(WAIT, || {
                // 404 until a's replicator has created the topic on b.
                let (status, stats) = b
                    .admin()
                    .get(&format!("/admin/v2/persistent/t/ns/{topic}/stats"));
                address = stats["replication"]["a"]["inboundConnection"]
                    .as_str()
                    .map(str::to_string);
                status == 200 && address.is_some()
            }),
            "no inbound replication on b for {topic}"
        );
        addresses.extend(address);
    }
    assert_eq!(
        addresses.len(),
        1,
        "replicators opened several connections: {addresses:?}"
    );
    client_a.close().await;
}

/// Replicates 30 messages from a to b, lets `disrupt` take the source's positions back to the
/// start (b still remembers the old ones), and checks that 30 more messages still arrive: they
/// must not be taken for duplicates of the first life.
async fn replicates_after(topic: &str, disrupt: impl FnOnce(&mut Cluster, &Cluster)) {
    let (mut a, b) = replicated_pair(&[]);
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    let client_a = a.client().await;
    produce(&client_a, topic, "first-life", 30).await;
    receive_exactly(&consumer_b, 30, &[&a, &b]).await;
    client_a.close().await;

    disrupt(&mut a, &b);
    let client_a = a.client().await;
    produce(&client_a, topic, "second-life", 30).await;
    let (received, _) = receive_exactly(&consumer_b, 30, &[&a, &b]).await;
    assert!(
        received.contains_key(b"second-life-0".as_slice()),
        "the second life's messages were taken for duplicates"
    );
    client_a.close().await;
    client_b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_deleted_and_created_again_still_replicates() {
    // Deleted on a only; b keeps the topic.
    replicates_after("reborn", |a, _| {
        let admin = a.admin();
        admin.ok(admin.delete("/admin/v2/persistent/t/ns/reborn?force=true"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_cluster_rebuilt_from_scratch_still_replicates() {
    // Cluster a loses everything and is configured again.
    replicates_after("rebuilt", |a, b| {
        a.broker.rebuild();
        configure(a, &[b]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_resumes_after_a_restart_without_any_client() {
    let (mut a, mut b) = replicated_pair(&[]);
    let topic = "untouched";
    create_subscription(&b, topic).await;
    b.broker.stop();
    let client_a = a.client().await;
    produce(&client_a, topic, "waiting", 25).await;
    client_a.close().await;

    // a restarts and nobody uses the topic there; b comes back.
    a.broker.stop();
    a.broker.restart();
    b.broker.restart();
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    let (received, _) = receive_exactly(&consumer_b, 25, &[&a, &b]).await;
    assert_eq!(received.len(), 25);
    client_b.close().await;
}

/// `prefix` padded with dots to `size` bytes.
fn padded(prefix: &str, size: usize) -> String {
    format!("{prefix}{}", ".".repeat(size - prefix.len()))
}

/// Receives one message per prefix in `expected`, each once, starting with these prefixes in
/// this order.
async fn receive_in_order(consumer: &Consumer, expected: &[&str], clusters: &[&Cluster]) {
    let (_, order) = receive_exactly(consumer, expected.len(), clusters).await;
    for (payload, prefix) in order.iter().zip(expected) {
        assert!(
            payload.starts_with(prefix.as_bytes()),
            "expected {prefix:?} next, got {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(16)])
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_at_the_frame_limit_reaches_a_remote_with_the_same_limits() {
    // Both clusters take 64 KiB payloads plus the 10 KiB frame padding. The message below fills
    // a's frame limit exactly; the metadata the replicator adds must not make b refuse it.
    const LIMIT: usize = 64 * 1024;
    let limit = LIMIT.to_string();
    let environment = [("MERIDIAN_MAX_MESSAGE_SIZE", limit.as_str())];
    let (a, b) = replicated_pair_with(&environment, &environment);
    let topic = "at-the-limit";
    create_subscription(&b, topic).await;
    let client_a = a.client().await;
    let producer = producer(&client_a, topic).await;
    let payload = padded("full-frame-", LIMIT);
    let message = |padding: usize| {
        ProducerMessage::new(payload.clone()).with_property("padding", "p".repeat(padding))
    };
    // The client reports the frame size of a message too large: shrink the property by the
    // excess to land exactly on the limit.
    let probe = 12 * 1024;
    let excess = match producer.send_and_wait(message(probe)).await {
        Err(meridian_client::Error::MessageTooLarge { size, max_size }) => {
            size - (max_size + meridian_wire::FRAME_SIZE_PADDING)
        }
        other => panic!("a frame over the limit was not refused: {other:?}"),
    };
    producer
        .send_and_wait(message(probe - excess))
        .await
        .expect("a frame exactly at the limit is accepted");
    producer.send_and_wait("after").await.expect("send");
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    receive_in_order(&consumer_b, &["full-frame-", "after"], &[&a, &b]).await;
    client_a.close().await;
    client_b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicators_stay_within_their_memory_bound_and_still_send_entries_larger_than_it() {
    // 1 MiB for every replicator of a together: entries of 700 KiB can only be sent one at a
    // time, and one of 1.5 MiB only with the whole bound. All of them arrive, in order.
    let (a, b) = replicated_pair(&[("MERIDIAN_REPLICATION_MAX_MEMORY_BYTES", "1048576")]);
    let topic = "tight-memory";
    create_subscription(&b, topic).await;
    let client_a = a.client().await;
    let producer = producer(&client_a, topic).await;
    let mut names = Vec::new();
    for index in 0..8 {
        let size = if index == 5 { 1536 * 1024 } else { 700 * 1024 };
        let name = format!("large-{index}-");
        producer
            .send_and_wait(padded(&name, size))
            .await
            .expect("send");
        names.push(name);
    }
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    let expected: Vec<&str> = names.iter().map(String::as_str).collect();
    receive_in_order(&consumer_b, &expected, &[&a, &b]).await;
    client_a.close().await;
    client_b.close().await;
}

/// What a replicator from cluster x sends: an entry with its origin position and, unless it
/// starts a chain, the origin position of the entry it sent before.
fn replicated(payload: &str, origin: &str, previous: Option<&str>) -> ProducerMessage {
    let message = ProducerMessage::new(payload.to_string())
        .with_replicated_from("x")
        .with_property("__MSG_PROP_REPL_SOURCE_POSITION", origin);
    match previous {
        Some(previous) => message.with_property("__MSG_PROP_REPL_PREVIOUS_POSITION", previous),
        None => message,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_refuses_an_entry_that_does_not_continue_its_chain() {
    // A replicator of cluster x, played by hand: entry 5:3 claims to follow 5:2, which the
    // remote never got; it is refused instead of being stored after a gap.
    let b = Cluster::start("b", &[]);
    let client = b.client().await;
    let topic = "persistent://public/default/chain";
    let consumer = client
        .consumer(topic)
        .subscription("check")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .expect("subscribe");
    let replicator = || {
        client
            .producer(topic)
            .name("pulsar.repl.x-->b")
            .stop_on_failure()
            .create()
    };
    let first = replicator().await.expect("producer");
    first
        .send_and_wait(replicated("x-1", "5:1", None))
        .await
        .expect("the first entry of a chain is stored");
    let refused = first
        .send_and_wait(replicated("x-3", "5:3", Some("5:2")))
        .await
        .expect_err("an entry after a gap must be refused");
    assert!(
        refused.to_string().contains("replication gap"),
        "unexpected error: {refused}"
    );
    first.close_now().await.expect("close");

    let second = replicator().await.expect("producer");
    for (payload, origin, previous) in [
        ("x-2", "5:2", "5:1"),
        ("x-3", "5:3", "5:2"),
        ("x-1", "5:1", "4:9"),
    ] {
        second
            .send_and_wait(replicated(payload, origin, Some(previous)))
            .await
            .expect("the chain goes on; a resent entry is a duplicate");
    }
    let mut received = Vec::new();
    while received.len() < 3 {
        let message = tokio::time::timeout(WAIT, consumer.receive())
            .await
            .expect("a message in time")
            .expect("receive");
        consumer.ack(&message).await.expect("ack");
        received.push(String::from_utf8_lossy(&message.payload).into_owned());
    }
    assert_eq!(received, ["x-1", "x-2", "x-3"]);
    if let Ok(Ok(extra)) = tokio::time::timeout(Duration::from_secs(2), consumer.receive()).await {
        panic!("unexpected extra message {:?}", extra.payload);
    }
    client.close().await;
}

/// Produces `count` messages of `size` bytes, 256 receipts awaited at a time, and returns the
/// highest RSS of process `pid` seen meanwhile.
async fn produce_sampling_rss(producer: &Producer, count: usize, size: usize, pid: u32) -> u64 {
    let mut peak = rss_bytes(pid);
    let mut receipts = Vec::new();
    for index in 0..count {
        let body = padded(&format!("{index:08}-"), size);
        receipts.push(producer.send(body).await.expect("send"));
        if receipts.len() >= 256 || index + 1 == count {
            for receipt in receipts.drain(..) {
                receipt.await.expect("receipt");
            }
            peak = peak.max(rss_bytes(pid));
        }
    }
    peak
}

/// A benchmark's size in MiB: environment variable `name`, else `default`.
fn bench_mebibytes(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A benchmark, not run in CI (`docs/BENCHMARKS.md`): `MERIDIAN_BENCH_BACKLOG_MIB` (default
/// 1024) of 64 KiB messages pile up on a (16 MiB entry cache) while b is down, then drain;
/// a's RSS is sampled while the backlog builds and while it drains, and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored, see docs/BENCHMARKS.md"]
async fn bench_catch_up_of_a_large_backlog() {
    let mebibytes = bench_mebibytes("MERIDIAN_BENCH_BACKLOG_MIB", 1024);
    let topic = "bench-backlog";
    let (a, mut b, client_a, producer) = remote_down(topic).await;
    let total = mebibytes * 16;
    let pid = a.broker.pid();
    let start = rss_bytes(pid);
    let building = produce_sampling_rss(&producer, total, 64 * 1024, pid).await;
    let began = std::time::Instant::now();
    b.broker.restart();
    let client_b = b.client().await;
    let consumer_b = subscribe(&client_b, topic).await;
    let mut draining = rss_bytes(pid);
    for count in 1..=total {
        let message = tokio::time::timeout(WAIT, consumer_b.receive())
            .await
            .expect("catch-up stalled")
            .expect("receive");
        consumer_b.ack(&message).await.expect("ack");
        if count % 256 == 0 {
            draining = draining.max(rss_bytes(pid));
        }
    }
    let mib = |bytes: u64| bytes / (1024 * 1024);
    eprintln!(
        "backlog {mebibytes} MiB: a's RSS {} MiB at start, peak {} MiB while it built, peak {} MiB while it drained in {:.1} s",
        mib(start),
        mib(building),
        mib(draining),
        began.elapsed().as_secs_f64()
    );
    client_a.close().await;
    client_b.close().await;
}

/// A benchmark, not run in CI (`docs/BENCHMARKS.md`): a topic of 100 partitions on a replicates
/// to b and to c, and c is down. `MERIDIAN_BENCH_PARTITIONED_MIB` (default 256) of 16 KiB
/// messages are produced; a's RSS is sampled until everything reached b, and printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored, see docs/BENCHMARKS.md"]
async fn bench_100_partitions_to_two_remotes_one_down() {
    let mebibytes = bench_mebibytes("MERIDIAN_BENCH_PARTITIONED_MIB", 256);
    let cache = [("MERIDIAN_STORAGE__CACHE_MAX_BYTES", "16777216")];
    let a = Cluster::start("a", &cache);
    let b = Cluster::start("b", &[]);
    let mut c = Cluster::start("c", &[]);
    configure(&a, &[&b, &c]);
    await_namespace(&b, &["a", "b", "c"]);
    await_namespace(&c, &["a", "b", "c"]);
    let topic = "bench-partitions";
    let admin = a.admin();
    admin.ok(admin.put(
        &format!("/admin/v2/persistent/t/ns/{topic}/partitions"),
        Some("100"),
    ));
    c.broker.stop();
    let client_a = a.client().await;
    let producer = producer(&client_a, topic).await;
    let pid = a.broker.pid();
    let start = rss_bytes(pid);
    let mut peak = produce_sampling_rss(&producer, mebibytes * 64, 16 * 1024, pid).await;
    let backlog_to = |remote: &str| -> u64 {
        (0..100)
            .map(|index| {
                a.stats(&format!("{topic}-partition-{index}"))["replication"][remote]
                    ["replicationBacklog"]
                    .as_u64()
                    .unwrap_or(u64::MAX)
            })
            .fold(0, u64::saturating_add)
    };
    assert!(
        eventually(WAIT, || {
            peak = peak.max(rss_bytes(pid));
            backlog_to("b") == 0
        }),
        "the backlog to b did not drain"
    );
    let mib = |bytes: u64| bytes / (1024 * 1024);
    eprintln!(
        "100 partitions, {mebibytes} MiB, c down: a's RSS {} MiB at start, peak {} MiB, {} MiB at the end; backlog to c {} entries",
        mib(start),
        mib(peak),
        mib(rss_bytes(pid)),
        backlog_to("c")
    );
    client_a.close().await;
}

/// Meridian's REPLICATED_SUBSCRIPTION_STATE command (what the subscription sync sends to a
/// broker that announces it): a state is stored; an older one from the same cluster is refused
/// with the `seq` held, as the HTTP endpoint's 409 does, and a state that does not decode gets
/// a clear error; neither changes what is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_subscription_states_on_the_binary_protocol_refuse_older_and_bad_ones() {
    let b = Cluster::start("b", &[]);
    let admin = b.admin();
    // The sender, a, only needs to be registered here.
    admin.ok(admin.put(
        "/admin/v2/clusters/a",
        Some(r#"{"serviceUrl":"http://127.0.0.1:9","brokerServiceUrl":"pulsar://127.0.0.1:9"}"#),
    ));
    admin.ok(admin.put(
        "/admin/v2/tenants/t",
        Some(r#"{"adminRoles":[],"allowedClusters":["b"]}"#),
    ));
    admin.ok(admin.put("/admin/v2/namespaces/t/ns", None));
    admin.ok(admin.put("/admin/v2/persistent/t/ns/states", None));
    let client = b.client().await;
    let topic = "persistent://t/ns/states";
    let state = |seq: u64| {
        bytes::Bytes::from(format!(
            r#"{{"cluster":"a","acks":{{"origins":{{}}}},"seq":{seq}}}"#
        ))
    };
    let held_seq = || {
        let internal = admin.ok(admin.get("/admin/v2/persistent/t/ns/states/internalStats"));
        let stored = internal["cursors"]["billing"]["properties"]["meridian.synced.a"]
            .as_str()
            .map(str::to_owned)
            .expect("a's state is held");
        serde_json::from_str::<serde_json::Value>(&stored).expect("JSON")["seq"].as_u64()
    };
    let send = |body: bytes::Bytes| {
        client.send_subscription_state(topic, "billing", |_| (StateFormat::Json, body), WAIT)
    };

    assert_eq!(send(state(200)).await.expect("taken"), StateAnswer::Taken);
    assert_eq!(held_seq(), Some(200));

    assert_eq!(
        send(state(100)).await.expect("answered"),
        StateAnswer::Older { stored_seq: 200 }
    );
    assert_eq!(
        held_seq(),
        Some(200),
        "the older state replaced the newer one"
    );

    let bad = send(bytes::Bytes::from_static(b"{\"cluster\":")).await;
    assert!(
        matches!(&bad, Err(meridian_client::Error::Server { message, .. })
            if message.contains("invalid replicated subscription state")),
        "{bad:?}"
    );
    assert_eq!(held_seq(), Some(200));

    assert_eq!(send(state(300)).await.expect("taken"), StateAnswer::Taken);
    assert_eq!(held_seq(), Some(300));

    // The compact form (b announces it): taken, and held with its `seq` where it was.
    let compact = |seq: u64, ranges: Vec<(Position, Position)>| {
        let mut acks = OriginAcks::default();
        acks.origins.insert(
            "a".to_string(),
            OriginProgress {
                acked_below: Some(Position::new(3, 0)),
                ranges,
                stored_from: Some(Position::new(3, 0)),
                batches: Vec::new(),
            },
        );
        let state = SyncedAcks {
            cluster: "a".into(),
            acks,
            reset_at: None,
            seq: Some(seq),
        };
        bytes::Bytes::from(state_format::encode_compact(&state))
    };
    let send_compact = |body: bytes::Bytes| {
        client.send_subscription_state(
            topic,
            "billing",
            |best| {
                assert_eq!(best, StateFormat::Compact, "b announces the compact form");
                (StateFormat::Compact, body)
            },
            WAIT,
        )
    };
    let ranges = vec![(Position::new(3, 5), Position::new(3, 7))];
    assert_eq!(
        send_compact(compact(400, ranges)).await.expect("taken"),
        StateAnswer::Taken
    );
    assert_eq!(held_seq(), Some(400));
    assert_eq!(
        send_compact(compact(350, Vec::new()))
            .await
            .expect("answered"),
        StateAnswer::Older { stored_seq: 400 }
    );
    // Malformed compact states: bytes that are no such message, and ranges out of order.
    let reversed = vec![
        (Position::new(3, 9), Position::new(3, 9)),
        (Position::new(3, 5), Position::new(3, 7)),
    ];
    for bad in [
        bytes::Bytes::from_static(b"{\"cluster\":"),
        compact(500, reversed),
    ] {
        let refused = send_compact(bad).await;
        assert!(
            matches!(&refused, Err(meridian_client::Error::Server { message, .. })
                if message.contains("invalid replicated subscription state (compact)")),
            "{refused:?}"
        );
        assert_eq!(
            held_seq(),
            Some(400),
            "a refused state changed what is held"
        );
    }
    client.close().await;
    b.broker.assert_no_errors();
}
