//! `meridian admin` against a real broker: tables by default, JSON on request, the server's
//! reason and a non-zero exit code on errors.

mod common;

use std::process::{Command, Output};

use common::BrokerProcess;

fn admin(broker: &BrokerProcess, arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .arg("admin")
        .arg("--url")
        .arg(format!("http://127.0.0.1:{}", broker.web_port))
        .args(arguments)
        .env("NO_COLOR", "1")
        .output()
        .expect("run meridian admin")
}

fn succeed(broker: &BrokerProcess, arguments: &[&str]) -> String {
    let output = admin(broker, arguments);
    assert!(
        output.status.success(),
        "meridian admin {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn admin_cli_manages_tenants_namespaces_and_topics() {
    let broker = BrokerProcess::start(&[]);
    succeed(
        &broker,
        &[
            "tenants",
            "create",
            "acme",
            "--allowed-clusters",
            "standalone",
        ],
    );
    assert!(succeed(&broker, &["tenants", "list"])
        .lines()
        .any(|line| line == "acme"));
    succeed(&broker, &["namespaces", "create", "acme/orders"]);
    succeed(
        &broker,
        &[
            "namespaces",
            "set-retention",
            "acme/orders",
            "--time",
            "2h",
            "--size",
            "100M",
        ],
    );
    let retention = succeed(&broker, &["namespaces", "get-retention", "acme/orders"]);
    assert!(
        retention
            .lines()
            .any(|line| line.starts_with("retentionTimeInMinutes") && line.ends_with(" 120")),
        "{retention}"
    );
    succeed(
        &broker,
        &[
            "namespaces",
            "set-message-ttl",
            "acme/orders",
            "--ttl",
            "300",
        ],
    );
    succeed(
        &broker,
        &[
            "namespaces",
            "set-backlog-quota",
            "acme/orders",
            "--limit",
            "1G",
            "--policy",
            "producer_request_hold",
        ],
    );
    succeed(
        &broker,
        &["namespaces", "set-deduplication", "acme/orders", "--enable"],
    );
    let policies = succeed(
        &broker,
        &["--output", "json", "namespaces", "policies", "acme/orders"],
    );
    let policies: serde_json::Value = serde_json::from_str(&policies).expect("JSON output");
    assert_eq!(policies["message_ttl_in_seconds"], 300);
    assert_eq!(policies["deduplicationEnabled"], true);
    assert_eq!(
        policies["backlog_quota_map"]["destination_storage"]["limitSize"],
        1u64 << 30
    );

    succeed(
        &broker,
        &[
            "topics",
            "create-partitioned-topic",
            "persistent://acme/orders/parted",
            "-p",
            "2",
        ],
    );
    succeed(&broker, &["topics", "create", "acme/orders/plain"]);
    succeed(
        &broker,
        &[
            "topics",
            "create-subscription",
            "acme/orders/plain",
            "-s",
            "audit",
            "-m",
            "earliest",
        ],
    );
    let topics = succeed(&broker, &["topics", "list", "acme/orders"]);
    assert!(
        topics.contains("persistent://acme/orders/parted-partition-1"),
        "{topics}"
    );
    assert_eq!(
        succeed(&broker, &["topics", "subscriptions", "acme/orders/plain"]).trim(),
        "audit"
    );
    let stats = succeed(
        &broker,
        &["--output", "json", "topics", "stats", "acme/orders/plain"],
    );
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("JSON stats");
    assert_eq!(stats["subscriptions"]["audit"]["msgBacklog"], 0);
    let internal = succeed(&broker, &["topics", "stats-internal", "acme/orders/plain"]);
    assert!(
        internal.contains("cursors.audit.markDeletePosition"),
        "{internal}"
    );
    succeed(
        &broker,
        &[
            "topics",
            "reset-cursor",
            "acme/orders/plain",
            "-s",
            "audit",
            "--time",
            "1h",
        ],
    );
    succeed(
        &broker,
        &[
            "topics",
            "skip",
            "acme/orders/plain",
            "-s",
            "audit",
            "-n",
            "1",
        ],
    );
    succeed(
        &broker,
        &["topics", "unsubscribe", "acme/orders/plain", "-s", "audit"],
    );

    // Errors: the server's reason on stderr and a failing exit code.
    let duplicate = admin(
        &broker,
        &[
            "tenants",
            "create",
            "acme",
            "--allowed-clusters",
            "standalone",
        ],
    );
    assert!(!duplicate.status.success());
    let message = String::from_utf8_lossy(&duplicate.stderr);
    assert!(
        message.contains("409") && message.contains("already exists"),
        "{message}"
    );
    let missing = admin(&broker, &["topics", "stats", "acme/orders/none"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let bad_size = admin(
        &broker,
        &[
            "namespaces",
            "set-retention",
            "acme/orders",
            "--time",
            "1h",
            "--size",
            "lots",
        ],
    );
    assert!(!bad_size.status.success());
    assert!(String::from_utf8_lossy(&bad_size.stderr).contains("invalid size"));
    broker.assert_no_errors();
}

#[test]
fn admin_cli_brokers_verbs_answer_like_pulsar_admin() {
    let broker = BrokerProcess::start(&[]);
    let address = format!("127.0.0.1:{}", broker.web_port);
    assert_eq!(
        succeed(&broker, &["brokers", "list", "standalone"]).trim(),
        address
    );
    assert_eq!(succeed(&broker, &["brokers", "list"]).trim(), address);
    assert_eq!(succeed(&broker, &["brokers", "healthcheck"]).trim(), "ok");
    assert_eq!(
        succeed(&broker, &["brokers", "version"]).trim(),
        env!("CARGO_PKG_VERSION")
    );
    let details = succeed(
        &broker,
        &["--output", "json", "brokers", "healthcheck", "--details"],
    );
    let details: serde_json::Value = serde_json::from_str(&details).expect("JSON");
    assert_eq!(details["status"], "ok");
    let runtime = succeed(
        &broker,
        &["--output", "json", "brokers", "get-runtime-config"],
    );
    let runtime: serde_json::Value = serde_json::from_str(&runtime).expect("JSON");
    assert_eq!(runtime["web_port"], broker.web_port.to_string());
    let dynamic = succeed(
        &broker,
        &["--output", "json", "brokers", "list-dynamic-config"],
    );
    assert_eq!(dynamic.trim(), "[]");
    let stats = succeed(&broker, &["--output", "json", "broker-stats", "topics"]);
    assert!(
        serde_json::from_str::<serde_json::Value>(&stats)
            .expect("JSON")
            .is_object(),
        "{stats}"
    );
    let unknown = admin(&broker, &["brokers", "list", "nowhere"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("nowhere"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}
