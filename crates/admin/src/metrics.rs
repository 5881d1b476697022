//! `GET /metrics`: Prometheus text with Pulsar's metric names, labelled by cluster, namespace
//! and topic (and subscription where Pulsar has that label).

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use crate::AppState;

/// One metric family: help text, type, and samples (labels, value).
struct Family {
    help: &'static str,
    kind: &'static str,
    samples: Vec<(String, f64)>,
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn metrics(State(broker): State<AppState>) -> impl IntoResponse {
    let cluster = escape(&broker.config().cluster_name);
    let mut families: BTreeMap<&'static str, Family> = BTreeMap::new();
    let mut add =
        |name: &'static str, help: &'static str, kind: &'static str, labels: String, value: f64| {
            families
                .entry(name)
                .or_insert_with(|| Family {
                    help,
                    kind,
                    samples: Vec::new(),
                })
                .samples
                .push((labels, value));
        };
    add(
        "meridian_outbound_queued_bytes",
        "Bytes queued for clients and not yet written to their sockets, all connections (each bounded by max_outbound_bytes_per_connection)",
        "gauge",
        format!("cluster=\"{cluster}\""),
        meridian_broker::outbound::queued_bytes_all_connections() as f64,
    );
    add(
        "meridian_loaded_topics",
        "Topics and partitions loaded now (bounded by max_loaded_topics)",
        "gauge",
        format!("cluster=\"{cluster}\""),
        broker.loaded_topics().len() as f64,
    );
    let health = broker.health();
    add(
        "meridian_topic_load_failures_total",
        "Distinct failures to open a topic's log (corrupt or unreadable files) since the broker started",
        "counter",
        format!("cluster=\"{cluster}\""),
        health.load_failures_total() as f64,
    );
    add(
        "meridian_topic_poisoned_total",
        "Topic logs poisoned by a failed write or fsync, or refusing service after a read found corrupted data, since the broker started",
        "counter",
        format!("cluster=\"{cluster}\""),
        health.poisoned_total() as f64,
    );
    let failures = health.failures();
    for kind in [
        meridian_broker::health::FailureKind::LoadFailed,
        meridian_broker::health::FailureKind::Poisoned,
    ] {
        add(
            "meridian_unavailable_topics",
            "Topics the broker cannot serve now, by kind (loadFailed: the log cannot be opened; poisoned: a write or fsync failed, or a read found corrupted data)",
            "gauge",
            format!("cluster=\"{cluster}\",kind=\"{}\"", kind.as_str()),
            failures.iter().filter(|failure| failure.kind == kind).count() as f64,
        );
    }
    let mut topics_per_namespace: BTreeMap<String, u64> = BTreeMap::new();
    for topic in broker.all_topics() {
        if let Ok(name) = meridian_broker::TopicName::parse(&topic) {
            *topics_per_namespace
                .entry(name.namespace_name())
                .or_insert(0) += 1;
        }
    }
    for (namespace, count) in &topics_per_namespace {
        add(
            "pulsar_topics_count",
            "Number of topics in the namespace",
            "gauge",
            format!("cluster=\"{cluster}\",namespace=\"{}\"", escape(namespace)),
            *count as f64,
        );
    }
    for topic in broker.loaded_topics() {
        let Ok(policies) = broker.resources().effective_policies(&topic.name) else {
            continue;
        };
        let stats = topic.stats(&policies);
        let labels = format!(
            "cluster=\"{cluster}\",namespace=\"{}\",topic=\"{}\"",
            escape(&topic.name.namespace_name()),
            escape(topic.full_name())
        );
        let backlog: u64 = stats
            .subscriptions
            .values()
            .map(|subscription| subscription.msg_backlog)
            .sum();
        let consumers: usize = stats
            .subscriptions
            .values()
            .map(|subscription| subscription.consumers.len())
            .sum();
        let gauges: [(&'static str, &'static str, f64); 11] = [
            (
                "pulsar_subscriptions_count",
                "Number of subscriptions",
                stats.subscriptions.len() as f64,
            ),
            (
                "pulsar_producers_count",
                "Number of producers",
                stats.publishers.len() as f64,
            ),
            (
                "pulsar_consumers_count",
                "Number of consumers",
                consumers as f64,
            ),
            (
                "pulsar_rate_in",
                "Messages per second published",
                stats.msg_rate_in,
            ),
            (
                "pulsar_rate_out",
                "Messages per second dispatched",
                stats.msg_rate_out,
            ),
            (
                "pulsar_throughput_in",
                "Bytes per second published",
                stats.msg_throughput_in,
            ),
            (
                "pulsar_throughput_out",
                "Bytes per second dispatched",
                stats.msg_throughput_out,
            ),
            (
                "pulsar_storage_size",
                "Bytes stored for the topic",
                stats.storage_size as f64,
            ),
            (
                "pulsar_storage_backlog_size",
                "Bytes of the largest subscription backlog",
                stats.backlog_size as f64,
            ),
            (
                "pulsar_msg_backlog",
                "Entries not yet acknowledged, over all subscriptions",
                backlog as f64,
            ),
            (
                "pulsar_in_messages_total",
                "Messages published since the topic was loaded",
                stats.msg_in_counter as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            add(name, help, kind, labels.clone(), value);
        }
        add(
            "pulsar_in_bytes_total",
            "Bytes published since the topic was loaded",
            "counter",
            labels.clone(),
            stats.bytes_in_counter as f64,
        );
        for (remote, replication) in &stats.replication {
            let labels = format!("{labels},remote_cluster=\"{}\"", escape(remote));
            let samples: [(&'static str, &'static str, f64); 9] = [
                (
                    "pulsar_replication_rate_in",
                    "Messages per second replicated in from the remote cluster",
                    replication.msg_rate_in,
                ),
                (
                    "pulsar_replication_rate_out",
                    "Messages per second replicated out to the remote cluster",
                    replication.msg_rate_out,
                ),
                (
                    "pulsar_replication_throughput_in",
                    "Bytes per second replicated in from the remote cluster",
                    replication.msg_throughput_in,
                ),
                (
                    "pulsar_replication_throughput_out",
                    "Bytes per second replicated out to the remote cluster",
                    replication.msg_throughput_out,
                ),
                (
                    "pulsar_replication_backlog",
                    "Entries not yet replicated to the remote cluster",
                    replication.replication_backlog as f64,
                ),
                (
                    "pulsar_replication_delay_in_seconds",
                    "Age of the oldest message sent and not yet confirmed by the remote cluster",
                    replication.replication_delay_in_seconds as f64,
                ),
                (
                    "pulsar_replication_connected_count",
                    "1 if the replicator to the remote cluster is connected",
                    f64::from(u8::from(replication.connected)),
                ),
                (
                    "pulsar_replication_disconnected_count",
                    "1 if the replicator to the remote cluster is not connected",
                    f64::from(u8::from(!replication.connected)),
                ),
                (
                    "meridian_replication_stopped_count",
                    "1 if the replicator to the remote cluster is stopped until its cause is fixed \
                     (state Stopped: <reason> in topic stats)",
                    f64::from(u8::from(replication.state.starts_with("Stopped: "))),
                ),
            ];
            // Only an outbound replicator has a connection state.
            let outbound = !replication.state.is_empty();
            for (name, help, value) in samples {
                if outbound || !name.ends_with("_count") {
                    add(name, help, "gauge", labels.clone(), value);
                }
            }
        }
        for (subscription, subscription_stats) in &stats.subscriptions {
            let labels = format!("{labels},subscription=\"{}\"", escape(subscription));
            add(
                "pulsar_subscription_back_log",
                "Entries the subscription has not acknowledged",
                "gauge",
                labels.clone(),
                subscription_stats.msg_backlog as f64,
            );
            add(
                "pulsar_subscription_unacked_messages",
                "Messages delivered and not acknowledged",
                "gauge",
                labels.clone(),
                subscription_stats.unacked_messages as f64,
            );
            add(
                "pulsar_subscription_msg_rate_out",
                "Messages per second dispatched to the subscription",
                "gauge",
                labels.clone(),
                subscription_stats.msg_rate_out,
            );
            for (remote, sync) in &subscription_stats.replicated_subscription_sync {
                let labels = format!("{labels},remote_cluster=\"{}\"", escape(remote));
                add(
                    "meridian_replicated_subscription_unsent_seconds",
                    "How long the replicated subscription's current state has waited to reach the remote cluster",
                    "gauge",
                    labels.clone(),
                    sync.unsent_for_ms as f64 / 1000.0,
                );
                if let Some(received) = sync.last_received_timestamp {
                    add(
                        "meridian_replicated_subscription_last_received_timestamp_seconds",
                        "When the remote cluster's state of the subscription was last received and applied",
                        "gauge",
                        labels,
                        received as f64 / 1000.0,
                    );
                }
            }
        }
    }
    let mut text = String::new();
    for (name, family) in families {
        let _ = writeln!(text, "# HELP {name} {}", family.help);
        let _ = writeln!(text, "# TYPE {name} {}", family.kind);
        for (labels, value) in family.samples {
            let _ = writeln!(text, "{name}{{{labels}}} {value}");
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
