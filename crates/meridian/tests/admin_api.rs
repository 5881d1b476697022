//! The `/admin/v2` REST API against a real broker: every resource, its error cases, and the
//! policies the broker enforces.

mod common;

use std::time::Duration;

use common::{assert_error, eventually, Admin, BrokerProcess};
use pulsar::consumer::{ConsumerOptions, InitialPosition};
use pulsar::message::proto::command_subscribe::SubType;
use pulsar::{Pulsar, TokioExecutor};
use serde_json::json;

/// A client that gives up at the first refusal, so that a test sees the broker's answer.
async fn client_without_retries(broker: &BrokerProcess) -> Pulsar<TokioExecutor> {
    Pulsar::builder(broker.url(), TokioExecutor)
        .with_operation_retry_options(pulsar::OperationRetryOptions {
            max_retries: Some(0),
            ..Default::default()
        })
        .build()
        .await
        .expect("connect")
}

/// The error a producer on `topic` is refused with.
async fn refused_producer(pulsar: &Pulsar<TokioExecutor>, topic: &str, what: &str) -> String {
    pulsar
        .producer()
        .with_topic(topic)
        .build()
        .await
        .err()
        .expect(what)
        .to_string()
}

fn setup_tenant(admin: &Admin, tenant: &str, namespace: &str) {
    admin.ok(admin.put(
        &format!("/admin/v2/tenants/{tenant}"),
        Some(r#"{"adminRoles":["ops"],"allowedClusters":["standalone"]}"#),
    ));
    admin.ok(admin.put(&format!("/admin/v2/namespaces/{tenant}/{namespace}"), None));
}

#[test]
fn clusters_and_tenants() {
    let broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    assert_eq!(
        admin.ok(admin.get("/admin/v2/clusters")),
        json!(["standalone"])
    );
    let own = admin.ok(admin.get("/admin/v2/clusters/standalone"));
    assert_eq!(own["brokerServiceUrl"], json!(broker.url()));

    let east = r#"{"serviceUrl":"http://east:8080","brokerServiceUrl":"pulsar://east:6650","peerClusterNames":["west"]}"#;
    admin.ok(admin.put("/admin/v2/clusters/east", Some(east)));
    assert_error(admin.put("/admin/v2/clusters/east", Some(east)), 409);
    assert_error(admin.put("/admin/v2/clusters/bad%20name", Some(east)), 412);
    assert_error(
        admin.put(
            "/admin/v2/clusters/west",
            Some(r#"{"brokerServiceUrl":"http://x"}"#),
        ),
        400,
    );
    assert_error(admin.put("/admin/v2/clusters/west", Some("{not json")), 400);
    assert_eq!(
        admin.ok(admin.get("/admin/v2/clusters/east"))["peerClusterNames"],
        json!(["west"])
    );
    admin.ok(admin.post(
        "/admin/v2/clusters/east",
        r#"{"serviceUrl":"http://east2:8080"}"#,
    ));
    assert_eq!(
        admin.ok(admin.get("/admin/v2/clusters/east"))["serviceUrl"],
        json!("http://east2:8080")
    );
    assert_error(admin.get("/admin/v2/clusters/nowhere"), 404);

    assert_eq!(admin.ok(admin.get("/admin/v2/tenants")), json!(["public"]));
    admin.ok(admin.put(
        "/admin/v2/tenants/acme",
        Some(r#"{"adminRoles":["ops"],"allowedClusters":["standalone","east"]}"#),
    ));
    assert_error(
        admin.put("/admin/v2/tenants/acme", Some(r#"{"allowedClusters":[]}"#)),
        409,
    );
    assert_error(
        admin.put(
            "/admin/v2/tenants/other",
            Some(r#"{"allowedClusters":["mars"]}"#),
        ),
        412,
    );
    assert_eq!(
        admin.ok(admin.get("/admin/v2/tenants/acme"))["adminRoles"],
        json!(["ops"])
    );
    // A cluster still allowed for a tenant cannot be deleted.
    assert_error(admin.delete("/admin/v2/clusters/east"), 412);
    admin.ok(admin.put("/admin/v2/namespaces/acme/orders", None));
    // A tenant with namespaces cannot be deleted, nor lose clusters.
    assert_error(admin.delete("/admin/v2/tenants/acme"), 409);
    assert_error(
        admin.post(
            "/admin/v2/tenants/acme",
            r#"{"allowedClusters":["standalone"]}"#,
        ),
        412,
    );
    admin.ok(admin.delete("/admin/v2/namespaces/acme/orders"));
    admin.ok(admin.delete("/admin/v2/tenants/acme"));
    admin.ok(admin.delete("/admin/v2/clusters/east"));
    assert_error(admin.get("/admin/v2/tenants/acme"), 404);
    broker.assert_no_errors();
}

#[test]
fn namespaces_and_their_policies() {
    let broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    setup_tenant(&admin, "acme", "orders");
    assert_eq!(
        admin.ok(admin.get("/admin/v2/namespaces/acme")),
        json!(["acme/orders"])
    );
    assert_error(admin.put("/admin/v2/namespaces/acme/orders", None), 409);
    assert_error(admin.put("/admin/v2/namespaces/nobody/orders", None), 404);
    assert_error(admin.get("/admin/v2/namespaces/acme/missing"), 404);
    admin.ok(admin.put(
        "/admin/v2/namespaces/acme/billing",
        Some(r#"{"replication_clusters":["standalone"],"message_ttl_in_seconds":30,"bundles":{"numBundles":4}}"#),
    ));
    let policies = admin.ok(admin.get("/admin/v2/namespaces/acme/billing"));
    assert_eq!(policies["message_ttl_in_seconds"], json!(30));
    assert_eq!(
        policies["bundles"],
        json!({"numBundles": 4}),
        "unknown policy fields are kept"
    );

    let ns = "/admin/v2/namespaces/acme/orders";
    assert_eq!(
        admin.ok(admin.get(&format!("{ns}/replication"))),
        json!(["standalone"])
    );
    assert_error(admin.post(&format!("{ns}/replication"), r#"["mars"]"#), 412);
    assert_error(admin.post(&format!("{ns}/replication"), r#"[]"#), 412);
    admin.ok(admin.post(
        &format!("{ns}/retention"),
        r#"{"retentionTimeInMinutes":60,"retentionSizeInMB":-1}"#,
    ));
    assert_eq!(
        admin.ok(admin.get(&format!("{ns}/retention"))),
        json!({"retentionTimeInMinutes":60,"retentionSizeInMB":-1})
    );
    assert_error(
        admin.post(
            &format!("{ns}/retention"),
            r#"{"retentionTimeInMinutes":-5,"retentionSizeInMB":1}"#,
        ),
        412,
    );
    admin.ok(admin.post(&format!("{ns}/messageTTL"), "120"));
    assert_eq!(admin.ok(admin.get(&format!("{ns}/messageTTL"))), json!(120));
    assert_error(admin.post(&format!("{ns}/messageTTL"), "-3"), 412);
    assert_error(admin.post(&format!("{ns}/messageTTL"), "\"soon\""), 400);
    admin.ok(admin.post(
        &format!("{ns}/backlogQuota?backlogQuotaType=destination_storage"),
        r#"{"limitSize":1048576,"policy":"producer_exception"}"#,
    ));
    assert_eq!(
        admin.ok(admin.get(&format!("{ns}/backlogQuotaMap")))["destination_storage"]["policy"],
        json!("producer_exception")
    );
    assert_error(
        admin.post(
            &format!("{ns}/backlogQuota?backlogQuotaType=elsewhere"),
            r#"{"limitSize":1,"policy":"producer_exception"}"#,
        ),
        400,
    );
    assert_error(
        admin.post(
            &format!("{ns}/backlogQuota"),
            r#"{"limitSize":1,"policy":"shrug"}"#,
        ),
        400,
    );
    admin.ok(admin.delete(&format!(
        "{ns}/backlogQuota?backlogQuotaType=destination_storage"
    )));
    admin.ok(admin.post(&format!("{ns}/deduplication"), "true"));
    assert_eq!(
        admin.ok(admin.get(&format!("{ns}/deduplication"))),
        json!(true)
    );
    admin.ok(admin.delete(&format!("{ns}/deduplication")));
    admin.ok(admin.delete(&format!("{ns}/retention")));
    admin.ok(admin.delete(&format!("{ns}/messageTTL")));
    let policies = admin.ok(admin.get(ns));
    assert!(
        policies.get("retention_policies").is_none()
            && policies.get("message_ttl_in_seconds").is_none()
    );
    admin.ok(admin.post(
        &format!("{ns}/autoTopicCreation"),
        r#"{"allowAutoTopicCreation":false}"#,
    ));
    assert_error(
        admin.post(
            &format!("{ns}/autoTopicCreation"),
            r#"{"allowAutoTopicCreation":true,"topicType":"round"}"#,
        ),
        400,
    );

    // A namespace with topics is only deleted with force.
    admin.ok(admin.put("/admin/v2/persistent/acme/orders/kept", None));
    assert_error(admin.delete(ns), 409);
    admin.ok(admin.delete(&format!("{ns}?force=true")));
    assert_error(admin.get(ns), 404);
    broker.assert_no_errors();
}

async fn produce(pulsar: &Pulsar<TokioExecutor>, topic: &str, count: usize, size: usize) {
    let mut producer = pulsar
        .producer()
        .with_topic(topic)
        .build()
        .await
        .expect("producer");
    for index in 0..count {
        let mut payload = format!("{index}-").into_bytes();
        payload.resize(size.max(payload.len()), b'x');
        producer
            .send_non_blocking(payload)
            .await
            .expect("queued")
            .await
            .expect("receipt");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_subscriptions_and_stats() {
    let broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    setup_tenant(&admin, "acme", "orders");
    let base = "/admin/v2/persistent/acme/orders";
    admin.ok(admin.put(&format!("{base}/plain"), None));
    assert_error(admin.put(&format!("{base}/plain"), None), 409);
    admin.ok(admin.put(&format!("{base}/parted/partitions"), Some("3")));
    assert_error(
        admin.put(&format!("{base}/parted/partitions"), Some("3")),
        409,
    );
    assert_error(
        admin.put(&format!("{base}/other/partitions"), Some("zero")),
        400,
    );
    assert_eq!(
        admin.ok(admin.get(&format!("{base}/parted/partitions"))),
        json!({"partitions": 3})
    );
    admin.ok(admin.post(&format!("{base}/parted/partitions"), "5"));
    assert_error(admin.post(&format!("{base}/parted/partitions"), "2"), 412);
    assert_eq!(
        admin.ok(admin.get(&format!("{base}/partitioned"))),
        json!(["persistent://acme/orders/parted"])
    );
    let all = admin.ok(admin.get(base));
    assert!(all
        .as_array()
        .expect("list")
        .contains(&json!("persistent://acme/orders/plain")));
    assert!(all
        .as_array()
        .expect("list")
        .contains(&json!("persistent://acme/orders/parted-partition-4")));
    assert_error(admin.get(&format!("{base}/missing/stats")), 404);
    assert_error(
        admin.get("/admin/v2/persistent/acme/nowhere/plain/stats"),
        404,
    );

    let topic = "persistent://acme/orders/plain";
    let pulsar = Pulsar::builder(broker.url(), TokioExecutor)
        .build()
        .await
        .expect("connect");
    admin.ok(admin.put(
        &format!("{base}/plain/subscription/audit"),
        Some(r#"{"ledgerId":-1,"entryId":-1}"#),
    ));
    assert_error(
        admin.put(&format!("{base}/plain/subscription/audit"), None),
        409,
    );
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    produce(&pulsar, topic, 20, 100).await;
    assert_eq!(
        admin.ok(admin.get(&format!("{base}/plain/subscriptions"))),
        json!(["audit"])
    );

    let stats = admin.ok(admin.get(&format!("{base}/plain/stats")));
    assert_eq!(stats["msgInCounter"], json!(20));
    assert_eq!(stats["subscriptions"]["audit"]["msgBacklog"], json!(20));
    assert!(stats["storageSize"].as_u64().expect("size") > 2000);
    let internal = admin.ok(admin.get(&format!("{base}/plain/internalStats")));
    assert_eq!(internal["numberOfEntries"], json!(20));
    assert_eq!(
        internal["cursors"]["audit"]["markDeletePosition"],
        json!("-1:-1")
    );
    let last = admin.ok(admin.get(&format!("{base}/plain/lastMessageId")));
    assert_eq!(last["entryId"], json!(19));

    // Peek the third unacknowledged message, then skip and expire.
    let (status, body) = admin.get(&format!("{base}/plain/subscription/audit/position/3"));
    assert_eq!(status, 200);
    assert!(body.as_str().expect("payload").starts_with("2-"));
    admin.ok(admin.post(&format!("{base}/plain/subscription/audit/skip/5"), ""));
    let backlog = |admin: &Admin| {
        admin.ok(admin.get(&format!("{base}/plain/stats")))["subscriptions"]["audit"]["msgBacklog"]
            .clone()
    };
    assert_eq!(backlog(&admin), json!(15));
    admin.ok(admin.post(
        &format!("{base}/plain/subscription/audit/resetcursor/{before}"),
        "",
    ));
    assert_eq!(backlog(&admin), json!(20));
    admin.ok(admin.post(
        &format!("{base}/plain/subscription/audit/resetcursor"),
        &format!(r#"{{"ledgerId":{},"entryId":10}}"#, last["ledgerId"]),
    ));
    assert_eq!(backlog(&admin), json!(10));
    admin.ok(admin.post(
        &format!("{base}/plain/subscription/audit/expireMessages/0"),
        "",
    ));
    assert_eq!(backlog(&admin), json!(0));
    admin.ok(admin.post(
        &format!("{base}/plain/subscription/audit/resetcursor/0"),
        "",
    ));
    admin.ok(admin.post(&format!("{base}/plain/subscription/audit/skip_all"), ""));
    assert_eq!(backlog(&admin), json!(0));
    assert_error(
        admin.post(&format!("{base}/plain/subscription/nobody/skip/1"), ""),
        404,
    );

    // Partitioned stats aggregate the partitions.
    produce(&pulsar, "persistent://acme/orders/parted", 10, 10).await;
    let parted = admin.ok(admin.get(&format!("{base}/parted/partitioned-stats")));
    assert_eq!(parted["msgInCounter"], json!(10));
    assert_eq!(parted["metadata"]["partitions"], json!(5));
    assert_eq!(
        parted["partitions"].as_object().expect("partitions").len(),
        5
    );

    let lookup = admin.ok(admin.get("/lookup/v2/topic/persistent/acme/orders/anything"));
    assert_eq!(lookup["brokerUrl"], json!(broker.url()));
    let (status, metrics) = admin.get("/metrics");
    assert_eq!(status, 200);
    let metrics = metrics.as_str().expect("text").to_string();
    for name in [
        "pulsar_topics_count",
        "pulsar_rate_in",
        "pulsar_storage_size",
        "pulsar_msg_backlog",
        "pulsar_subscription_back_log",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "missing {name} in\n{metrics}"
        );
    }
    // A topic with a connected consumer is only deleted with force.
    let _consumer: pulsar::Consumer<Vec<u8>, TokioExecutor> = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription("live")
        .with_subscription_type(SubType::Shared)
        .with_options(ConsumerOptions::default().with_initial_position(InitialPosition::Earliest))
        .build()
        .await
        .expect("consumer");
    assert_error(admin.delete(&format!("{base}/plain")), 412);
    assert_error(
        admin.delete(&format!("{base}/plain/subscription/live")),
        412,
    );
    admin.ok(admin.delete(&format!("{base}/plain/subscription/audit")));
    // The disconnected consumer resubscribes at once; without auto-creation it cannot bring the
    // deleted topic back.
    admin.ok(admin.post(
        "/admin/v2/namespaces/acme/orders/autoTopicCreation",
        r#"{"allowAutoTopicCreation":false}"#,
    ));
    admin.ok(admin.delete(&format!("{base}/plain?force=true")));
    assert_error(admin.get(&format!("{base}/plain/stats")), 404);
    admin.ok(admin.delete(&format!("{base}/parted/partitions?force=true")));
    assert_eq!(
        admin.ok(admin.get(&format!("{base}/partitioned"))),
        json!([])
    );

    broker.assert_no_errors();
}

/// A config file that makes policy checks run every second.
fn fast_policy_config(directory: &std::path::Path, extra: &str) -> String {
    let path = directory.join("meridian.toml");
    std::fs::write(
        &path,
        format!("policy_check_interval_seconds = 1\nstats_interval_seconds = 1\nmax_message_size = 32768\n{extra}\n[storage]\ntrim_interval_ms = 200\nsegment_max_bytes = 65536\n"),
    )
    .expect("config");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expires_and_retention_trims_disk() {
    let directory = tempfile::tempdir().expect("tempdir");
    let config = fast_policy_config(directory.path(), "");
    let broker = BrokerProcess::start(&["--config", &config]);
    let admin = Admin::new(&broker);
    setup_tenant(&admin, "acme", "events");
    let base = "/admin/v2/persistent/acme/events";
    let pulsar = Pulsar::builder(broker.url(), TokioExecutor)
        .build()
        .await
        .expect("connect");

    // TTL: a subscription's old messages are acknowledged by expiry.
    admin.ok(admin.put(&format!("{base}/ttl"), None));
    admin.ok(admin.put(
        &format!("{base}/ttl/subscription/slow"),
        Some(r#"{"ledgerId":-1,"entryId":-1}"#),
    ));
    produce(&pulsar, "persistent://acme/events/ttl", 10, 100).await;
    admin.ok(admin.post("/admin/v2/namespaces/acme/events/messageTTL", "1"));
    assert!(eventually(Duration::from_secs(20), || {
        admin.ok(admin.get(&format!("{base}/ttl/stats")))["subscriptions"]["slow"]["msgBacklog"]
            == json!(0)
    }));

    // Retention: consumed data is deleted and storage really shrinks.
    admin.ok(admin.put(&format!("{base}/retained"), None));
    admin.ok(admin.put(
        &format!("{base}/retained/subscription/reader"),
        Some(r#"{"ledgerId":-1,"entryId":-1}"#),
    ));
    produce(&pulsar, "persistent://acme/events/retained", 300, 1000).await;
    let size_before = admin.ok(admin.get(&format!("{base}/retained/stats")))["storageSize"]
        .as_u64()
        .expect("size");
    assert!(size_before > 250_000);
    admin.ok(admin.post(&format!("{base}/retained/subscription/reader/skip_all"), ""));
    assert!(eventually(Duration::from_secs(20), || {
        let size = admin.ok(admin.get(&format!("{base}/retained/stats")))["storageSize"]
            .as_u64()
            .unwrap_or(u64::MAX);
        size < size_before / 4
    }));
    broker.assert_no_errors();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_quotas_hold_reject_or_evict() {
    let directory = tempfile::tempdir().expect("tempdir");
    let config = fast_policy_config(directory.path(), "");
    let broker = BrokerProcess::start(&["--config", &config]);
    let admin = Admin::new(&broker);
    let pulsar = client_without_retries(&broker).await;
    for (namespace, policy) in [
        ("hold", "producer_request_hold"),
        ("exception", "producer_exception"),
        ("evict", "consumer_backlog_eviction"),
    ] {
        setup_tenant(&admin, namespace, "ns");
        let base = format!("/admin/v2/persistent/{namespace}/ns");
        admin.ok(admin.put(&format!("{base}/t"), None));
        admin.ok(admin.put(
            &format!("{base}/t/subscription/idle"),
            Some(r#"{"ledgerId":-1,"entryId":-1}"#),
        ));
        admin.ok(admin.post(
            &format!("/admin/v2/namespaces/{namespace}/ns/backlogQuota?backlogQuotaType=destination_storage"),
            &format!(r#"{{"limitSize":20000,"policy":"{policy}"}}"#),
        ));
        let topic = format!("persistent://{namespace}/ns/t");
        produce(&pulsar, &topic, 40, 1000).await;
        if policy == "consumer_backlog_eviction" {
            // The idle subscription is moved forward until its backlog fits the quota again.
            assert!(eventually(Duration::from_secs(20), || {
                let backlog = admin.ok(admin.get(&format!("{base}/t/stats")))["subscriptions"]
                    ["idle"]["backlogSize"]
                    .as_u64()
                    .unwrap_or(u64::MAX);
                backlog <= 20_000
            }));
            produce(&pulsar, &topic, 1, 10).await;
        } else {
            // New producers are refused while the backlog exceeds the quota.
            let refused = pulsar.producer().with_topic(&topic).build().await;
            let error = refused.err().expect("producer refused").to_string();
            assert!(
                error.contains("ProducerBlockedQuotaExceeded"),
                "{policy}: {error}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_creation_override_and_namespace_deduplication() {
    let broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    setup_tenant(&admin, "acme", "strict");
    admin.ok(admin.post(
        "/admin/v2/namespaces/acme/strict/autoTopicCreation",
        r#"{"allowAutoTopicCreation":false}"#,
    ));
    let pulsar = client_without_retries(&broker).await;
    let error = refused_producer(
        &pulsar,
        "persistent://acme/strict/unknown",
        "unknown topic refused",
    )
    .await;
    assert!(error.contains("TopicNotFound"), "{error}");
    admin.ok(admin.put("/admin/v2/persistent/acme/strict/known", None));
    produce(&pulsar, "persistent://acme/strict/known", 1, 10).await;

    // De-duplication switched on for one namespace only.
    setup_tenant(&admin, "dedup", "on");
    admin.ok(admin.post("/admin/v2/namespaces/dedup/on/deduplication", "true"));
    admin.ok(admin.put("/admin/v2/persistent/dedup/on/t", None));
    produce(&pulsar, "persistent://dedup/on/t", 1, 10).await;
    let stats = admin.ok(admin.get("/admin/v2/persistent/dedup/on/t/stats"));
    assert_eq!(stats["deduplicationStatus"], json!("Enabled"));
    let stats = admin.ok(admin.get("/admin/v2/persistent/acme/strict/known/stats"));
    assert_eq!(stats["deduplicationStatus"], json!("Disabled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_topics_refuse_producers_across_restarts() {
    let mut broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    let pulsar = client_without_retries(&broker).await;
    produce(&pulsar, "persistent://public/default/ending", 3, 10).await;
    let last = admin.ok(admin.post("/admin/v2/persistent/public/default/ending/terminate", ""));
    assert_eq!(last["entryId"], json!(2));
    let refused = pulsar
        .producer()
        .with_topic("persistent://public/default/ending")
        .build()
        .await;
    assert!(refused
        .err()
        .expect("refused")
        .to_string()
        .contains("TopicTerminated"));
    assert_error(
        admin.post("/admin/v2/persistent/public/default/nothing/terminate", ""),
        404,
    );
    drop(pulsar);
    broker.stop();
    broker.restart();
    let pulsar = client_without_retries(&broker).await;
    let refused = pulsar
        .producer()
        .with_topic("persistent://public/default/ending")
        .build()
        .await;
    assert!(refused
        .err()
        .expect("still refused")
        .to_string()
        .contains("TopicTerminated"));
}

#[test]
fn topic_level_policies_override_the_namespace() {
    let broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    setup_tenant(&admin, "acme", "orders");
    let topic = "/admin/v2/persistent/acme/orders/special";
    admin.ok(admin.put(topic, None));
    admin.ok(admin.post(
        "/admin/v2/namespaces/acme/orders/backlogQuota",
        r#"{"limitSize":1000000,"policy":"producer_request_hold"}"#,
    ));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/stats")))["backlogQuotaLimitSize"],
        json!(1_000_000)
    );
    admin.ok(admin.post(
        &format!("{topic}/backlogQuota?backlogQuotaType=destination_storage"),
        r#"{"limitSize":5000,"policy":"producer_exception"}"#,
    ));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/stats")))["backlogQuotaLimitSize"],
        json!(5000)
    );
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/backlogQuotaMap")))["destination_storage"]["policy"],
        json!("producer_exception")
    );
    admin.ok(admin.delete(&format!(
        "{topic}/backlogQuota?backlogQuotaType=destination_storage"
    )));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/stats")))["backlogQuotaLimitSize"],
        json!(1_000_000)
    );

    admin.ok(admin.call("POST", &format!("{topic}/messageTTL?messageTTL=45"), None));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/messageTTL"))),
        json!(45)
    );
    admin.ok(admin.delete(&format!("{topic}/messageTTL")));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/messageTTL"))),
        json!(null)
    );
    admin.ok(admin.post(
        &format!("{topic}/retention"),
        r#"{"retentionTimeInMinutes":-1,"retentionSizeInMB":100}"#,
    ));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/retention")))["retentionSizeInMB"],
        json!(100)
    );
    admin.ok(admin.post(&format!("{topic}/deduplicationEnabled"), "true"));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/stats")))["deduplicationStatus"],
        json!("Enabled")
    );
    admin.ok(admin.post(&format!("{topic}/replication"), r#"["standalone"]"#));
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/replication"))),
        json!(["standalone"])
    );
    assert_error(
        admin.post(&format!("{topic}/replication"), r#"["mars"]"#),
        412,
    );

    assert_eq!(
        admin.ok(admin.get("/admin/v2/namespaces/acme/orders/topics")),
        json!(["persistent://acme/orders/special"])
    );
    admin.ok(admin.put("/admin/v2/namespaces/acme/orders/unload", None));
    admin.ok(admin.put(&format!("{topic}/unload"), None));
    // Still there after the unload, loaded again on demand.
    assert_eq!(
        admin.ok(admin.get(&format!("{topic}/stats")))["deduplicationStatus"],
        json!("Enabled")
    );
    broker.assert_no_errors();
}

/// Names and error messages a user reads: a control character is refused in a subscription name
/// (over REST and the protocol), a topic in a namespace that does not exist says just that, and
/// a log written to a file carries no terminal colour codes even when `NO_COLOR` is unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_messages_and_plain_logs() {
    let broker = BrokerProcess::start_with_env(&[], &[("NO_COLOR", "")]);
    let admin = Admin::new(&broker);
    admin.ok(admin.put("/admin/v2/persistent/public/default/named", None));

    let reply = admin.put(
        "/admin/v2/persistent/public/default/named/subscription/bad%00name",
        None,
    );
    let reason = reply.1["reason"].as_str().unwrap_or_default().to_string();
    assert_error(reply, 412);
    assert!(reason.contains("control characters"), "{reason}");

    let pulsar = client_without_retries(&broker).await;
    let refused = pulsar
        .consumer()
        .with_topic("persistent://public/default/named")
        .with_subscription("nul\0inside")
        .build::<Vec<u8>>()
        .await;
    let error = refused.err().expect("NUL refused").to_string();
    assert!(error.contains("control characters"), "{error}");

    let refused = pulsar
        .producer()
        .with_topic("persistent://public/nowhere/topic")
        .build()
        .await;
    let error = refused
        .err()
        .expect("missing namespace refused")
        .to_string();
    assert!(
        error.contains("namespace public/nowhere does not exist")
            && !error.contains("does not exist does not exist"),
        "{error}"
    );

    let log = broker.log();
    assert!(log.contains("INFO"), "the broker logged nothing: {log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
}

/// Every topic-level call works on one partition of a partitioned topic, as in Pulsar: a
/// partition is a plain topic (its subscriptions, skip, reset, terminate), never a partitioned
/// topic of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_calls_work_on_a_single_partition() {
    let broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    let base = "/admin/v2/persistent/public/default";
    admin.ok(admin.put(&format!("{base}/p3/partitions"), Some("3")));
    admin.ok(admin.put(&format!("{base}/p3/subscription/sub1"), None));
    let pulsar = Pulsar::builder(broker.url(), TokioExecutor)
        .build()
        .await
        .expect("connect");
    produce(&pulsar, "persistent://public/default/p3-partition-0", 4, 10).await;

    let partition = format!("{base}/p3-partition-0");
    let subscriptions = admin.ok(admin.get(&format!("{partition}/subscriptions")));
    assert_eq!(subscriptions, json!(["sub1"]));
    let backlog = |admin: &Admin| {
        admin.ok(admin.get(&format!("{partition}/stats")))["subscriptions"]["sub1"]["msgBacklog"]
            .as_u64()
    };
    assert_eq!(backlog(&admin), Some(4));
    admin.ok(admin.post(&format!("{partition}/subscription/sub1/skip/1"), ""));
    assert_eq!(backlog(&admin), Some(3));
    admin.ok(admin.post(&format!("{partition}/subscription/sub1/skip_all"), ""));
    assert_eq!(backlog(&admin), Some(0));
    admin.ok(admin.post(
        &format!("{partition}/subscription/sub1/resetcursor"),
        r#"{"ledgerId":-1,"entryId":-1}"#,
    ));
    assert_eq!(backlog(&admin), Some(4));
    admin.ok(admin.put(&format!("{partition}/subscription/sub2"), None));
    admin.ok(admin.delete(&format!("{partition}/subscription/sub2")));

    assert_eq!(
        admin.ok(admin.get(&format!("{partition}/partitions")))["partitions"],
        json!(0),
        "a partition is not partitioned itself"
    );
    assert_error(admin.get(&format!("{partition}/partitioned-stats")), 404);
    let terminated = admin.ok(admin.post(&format!("{partition}/terminate"), ""));
    assert_eq!(terminated["partitionIndex"], json!(0));
    // The other partitions are untouched.
    let others = admin.ok(admin.get(&format!("{base}/p3-partition-1/subscriptions")));
    assert_eq!(others, json!(["sub1"]));
    broker.assert_no_errors();
}

/// Pulsar's limits on partitions per topic and topics per namespace, and a budget of loaded
/// topics: each is refused with a clear reason (412 over REST, an error code on the protocol;
/// 503 and a retry for the loaded-topic budget), and what exists keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_count_limits_are_enforced() {
    let broker = BrokerProcess::start_with_env(
        &[],
        &[
            ("MERIDIAN_MAX_NUM_PARTITIONS_PER_PARTITIONED_TOPIC", "4"),
            ("MERIDIAN_MAX_TOPICS_PER_NAMESPACE", "6"),
            ("MERIDIAN_MAX_LOADED_TOPICS", "3"),
        ],
    );
    let admin = Admin::new(&broker);
    let base = "/admin/v2/persistent/public/default";
    assert_error(
        admin.put(&format!("{base}/wide/partitions"), Some("5")),
        412,
    );
    admin.ok(admin.put(&format!("{base}/wide/partitions"), Some("4")));
    assert_error(admin.post(&format!("{base}/wide/partitions"), "5"), 412);
    admin.ok(admin.put(&format!("{base}/fifth"), None));
    admin.ok(admin.put(&format!("{base}/sixth"), None));
    assert_error(admin.put(&format!("{base}/seventh"), None), 412);
    assert_error(
        admin.put(&format!("{base}/more/partitions"), Some("1")),
        412,
    );

    let pulsar = client_without_retries(&broker).await;
    let error = refused_producer(
        &pulsar,
        "persistent://public/default/auto-created",
        "namespace full",
    )
    .await;
    assert!(error.contains("max_topics_per_namespace"), "{error}");

    // Three topics loaded by their producers; a fourth is refused until one is unloaded.
    for index in 0..3 {
        produce(
            &pulsar,
            &format!("persistent://public/default/wide-partition-{index}"),
            1,
            10,
        )
        .await;
    }
    let stats = admin.get(&format!("{base}/fifth/stats"));
    assert_error(stats, 503);
    // No client left to load the topic again once it is unloaded.
    drop(pulsar);
    admin.ok(admin.put(&format!("{base}/wide-partition-0/unload"), None));
    assert!(
        eventually(Duration::from_secs(10), || admin
            .get(&format!("{base}/fifth/stats"))
            .0
            == 200),
        "an unloaded topic makes room"
    );
}

/// Creates and deletes of one topic racing each other answer as Pulsar does — created (204),
/// already exists (409), does not exist (404) — never a storage failure (500), and the topic
/// ends in a consistent state: after a last delete it is gone, after a last create it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_and_deletes_stay_consistent() {
    let broker = BrokerProcess::start(&[]);
    let path = "/admin/v2/persistent/public/default/contested";
    let workers: Vec<_> = (0..6)
        .map(|worker| {
            let admin = Admin::new(&broker);
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for round in 0..40 {
                    let reply = if (worker + round) % 2 == 0 {
                        admin.put(path, None)
                    } else {
                        admin.delete(path)
                    };
                    statuses.push((reply.0, reply.1.to_string()));
                }
                statuses
            })
        })
        .collect();
    for worker in workers {
        for (status, body) in worker.join().expect("worker") {
            assert!(
                [200, 204, 404, 409].contains(&status),
                "unexpected {status}: {body}"
            );
        }
    }
    let admin = Admin::new(&broker);
    let deleted = admin.delete(path).0;
    assert!([200, 204, 404].contains(&deleted));
    let topics = admin.ok(admin.get("/admin/v2/persistent/public/default"));
    assert!(!topics.to_string().contains("contested"), "{topics}");
    admin.ok(admin.put(path, None));
    let pulsar = Pulsar::builder(broker.url(), TokioExecutor)
        .build()
        .await
        .expect("connect");
    produce(&pulsar, "persistent://public/default/contested", 3, 10).await;
    let stats = admin.ok(admin.get(&format!("{path}/stats")));
    assert_eq!(stats["msgInCounter"], json!(3));
    broker.assert_no_errors();
}
