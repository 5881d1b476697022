//! `meridian admin`: pulsar-admin's nouns and verbs over the `/admin/v2` REST API.
//!
//! Output is a human-readable table by default and the server's JSON with `--output json`. An
//! error response exits non-zero with the server's reason.

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use meridian_broker::topic_name::encode_path_segment;
use serde_json::{json, Value};

#[derive(Args)]
pub struct AdminArgs {
    /// Web service URL of the broker (`http://` or `https://`).
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080",
        env = "MERIDIAN_ADMIN_URL"
    )]
    url: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(flatten)]
    auth: crate::tokens_cli::AuthTokenArgs,
    #[command(flatten)]
    tls: crate::tls_cli::TlsArgs,
    #[command(subcommand)]
    noun: Noun,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Noun {
    /// Clusters known to this cluster.
    #[command(subcommand)]
    Clusters(ClusterVerb),
    /// Tenants.
    #[command(subcommand)]
    Tenants(TenantVerb),
    /// Namespaces and their policies.
    #[command(subcommand)]
    Namespaces(NamespaceVerb),
    /// Topics, partitions and subscriptions.
    #[command(subcommand)]
    Topics(TopicVerb),
    /// The brokers of a cluster, their health, version and configuration.
    #[command(subcommand)]
    Brokers(BrokerVerb),
    /// Statistics of everything this broker serves.
    #[command(subcommand, name = "broker-stats")]
    BrokerStats(BrokerStatsVerb),
}

#[derive(Subcommand)]
enum BrokerVerb {
    /// Active brokers of a cluster, or of this one without a name (web service addresses).
    ///
    /// Example: meridian admin brokers list standalone
    List { cluster: Option<String> },
    /// The leader broker (a single broker leads its cluster).
    ///
    /// Example: meridian admin brokers leader-broker
    LeaderBroker,
    /// Health check: prints `ok`, or with --details the topics the broker cannot serve.
    ///
    /// Example: meridian admin brokers healthcheck --details
    Healthcheck {
        /// List the topics that cannot be served and why (JSON).
        #[arg(long)]
        details: bool,
    },
    /// The broker's version.
    ///
    /// Example: meridian admin brokers version
    Version,
    /// Names of the settings that can be changed at runtime (none in Meridian).
    ///
    /// Example: meridian admin brokers list-dynamic-config
    ListDynamicConfig,
    /// Values of settings changed at runtime (none in Meridian).
    ///
    /// Example: meridian admin brokers get-all-dynamic-config
    GetAllDynamicConfig,
    /// The effective configuration the broker runs with.
    ///
    /// Example: meridian admin brokers get-runtime-config
    GetRuntimeConfig,
}

#[derive(Subcommand)]
enum BrokerStatsVerb {
    /// Stats of every loaded topic, by namespace and bundle.
    ///
    /// Example: meridian admin --output json broker-stats topics
    Topics,
}

#[derive(Subcommand)]
enum ClusterVerb {
    /// List the clusters.
    ///
    /// Example: meridian admin clusters list
    List,
    /// Show a cluster's URLs.
    ///
    /// Example: meridian admin clusters get standalone
    Get { cluster: String },
    /// Register a cluster (for replication: the remote's URLs).
    ///
    /// Example: meridian admin clusters create east --url http://east:8080 --broker-url pulsar://east:6650
    Create(ClusterData),
    /// Change a cluster's URLs.
    ///
    /// Example: meridian admin clusters update east --url http://east2:8080 --broker-url pulsar://east2:6650
    Update(ClusterData),
    /// Remove a cluster.
    ///
    /// Example: meridian admin clusters delete east
    Delete { cluster: String },
}

#[derive(Args)]
struct ClusterData {
    cluster: String,
    /// HTTP service URL (http://host:8080).
    #[arg(long)]
    url: Option<String>,
    /// Broker service URL (pulsar://host:6650).
    #[arg(long)]
    broker_url: Option<String>,
}

#[derive(Subcommand)]
enum TenantVerb {
    /// List the tenants.
    ///
    /// Example: meridian admin tenants list
    List,
    /// Show a tenant's admin roles and allowed clusters.
    ///
    /// Example: meridian admin tenants get acme
    Get { tenant: String },
    /// Create a tenant.
    ///
    /// Example: meridian admin tenants create acme --allowed-clusters standalone
    Create(TenantData),
    /// Change a tenant's admin roles and allowed clusters.
    ///
    /// Example: meridian admin tenants update acme --allowed-clusters standalone,east
    Update(TenantData),
    /// Delete a tenant (it must have no namespaces).
    ///
    /// Example: meridian admin tenants delete acme
    Delete { tenant: String },
    /// Migrate a tenant from this cluster to another one: start it (`--to`, with `--hold` to
    /// stop before its clients are redirected), release a held one (`--redirect`), show its
    /// progress phase by phase (`--status`), abort it (`--abort`, before the redirect), or
    /// remove the tenant from this cluster once it is done (`--cleanup`).
    ///
    /// Example: meridian admin tenants migrate acme --to east
    Migrate(MigrateArgs),
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["to", "status", "abort", "redirect", "cleanup"])))]
struct MigrateArgs {
    tenant: String,
    /// The cluster to move the tenant to (registered on this cluster).
    #[arg(long)]
    to: Option<String>,
    /// With --to: stop before redirecting the tenant's clients (once the target holds its
    /// messages and subscription state) until --redirect.
    #[arg(long, requires = "to")]
    hold: bool,
    /// Release a migration held before its redirect (started with --hold).
    #[arg(long)]
    redirect: bool,
    /// Once the migration is done and no client of the tenant is left on this cluster:
    /// delete the tenant's topics, namespaces and the tenant here (freeing their disk), and
    /// take this cluster out of the target's replication lists.
    #[arg(long)]
    cleanup: bool,
    /// Show the migration's phase and progress.
    #[arg(long)]
    status: bool,
    /// Abort the migration (before its redirect phase) and put this cluster's settings back.
    #[arg(long)]
    abort: bool,
}

#[derive(Args)]
struct TenantData {
    tenant: String,
    /// Comma-separated admin roles.
    #[arg(long, value_delimiter = ',')]
    admin_roles: Vec<String>,
    /// Comma-separated clusters the tenant may use.
    #[arg(long, value_delimiter = ',')]
    allowed_clusters: Vec<String>,
}

#[derive(Subcommand)]
enum NamespaceVerb {
    /// Namespaces of a tenant.
    ///
    /// Example: meridian admin namespaces list acme
    List { tenant: String },
    /// Create tenant/namespace.
    ///
    /// Example: meridian admin namespaces create acme/orders --clusters standalone
    Create {
        namespace: String,
        #[arg(long, value_delimiter = ',')]
        clusters: Vec<String>,
    },
    /// Delete a namespace (--force: with its topics).
    ///
    /// Example: meridian admin namespaces delete acme/orders --force
    Delete {
        namespace: String,
        #[arg(long, short)]
        force: bool,
    },
    /// All policies of a namespace.
    ///
    /// Example: meridian admin namespaces policies acme/orders
    Policies { namespace: String },
    /// Roles and the actions granted to them on a namespace.
    ///
    /// Example: meridian admin namespaces permissions acme/orders
    Permissions { namespace: String },
    /// Grant a role actions (produce, consume) on every topic of a namespace.
    ///
    /// Example: meridian admin namespaces grant-permission acme/orders --role app1 --actions produce,consume
    GrantPermission {
        namespace: String,
        #[arg(long)]
        role: String,
        #[arg(long, value_delimiter = ',', required = true)]
        actions: Vec<String>,
    },
    /// Revoke a role's namespace-wide grant.
    ///
    /// Example: meridian admin namespaces revoke-permission acme/orders --role app1
    RevokePermission {
        namespace: String,
        #[arg(long)]
        role: String,
    },
    /// Set the clusters the namespace replicates to.
    ///
    /// Example: meridian admin namespaces set-clusters acme/orders --clusters standalone,east
    SetClusters {
        namespace: String,
        #[arg(long, value_delimiter = ',', required = true)]
        clusters: Vec<String>,
    },
    /// Show the clusters the namespace replicates to.
    ///
    /// Example: meridian admin namespaces get-clusters acme/orders
    GetClusters { namespace: String },
    /// Retention of acknowledged messages: --time 3h, --size 500M (-1 unlimited, 0 none).
    ///
    /// Example: meridian admin namespaces set-retention acme/orders --time 3h --size 500M
    SetRetention {
        namespace: String,
        #[arg(long, allow_hyphen_values = true)]
        time: String,
        #[arg(long, allow_hyphen_values = true)]
        size: String,
    },
    /// Show the retention policy.
    ///
    /// Example: meridian admin namespaces get-retention acme/orders
    GetRetention { namespace: String },
    /// Message TTL in seconds (0: none).
    ///
    /// Example: meridian admin namespaces set-message-ttl acme/orders --ttl 3600
    SetMessageTtl {
        namespace: String,
        #[arg(long)]
        ttl: u64,
    },
    /// Show the message TTL in seconds.
    ///
    /// Example: meridian admin namespaces get-message-ttl acme/orders
    GetMessageTtl { namespace: String },
    /// Caps what each replicator of the namespace sends per period (0: no cap).
    ///
    /// Example: meridian admin namespaces set-replicator-dispatch-rate acme/orders --msg-dispatch-rate 1000
    SetReplicatorDispatchRate {
        namespace: String,
        #[arg(long, default_value_t = 0)]
        msg_dispatch_rate: i64,
        #[arg(long, default_value_t = 0)]
        byte_dispatch_rate: i64,
        /// Period in seconds.
        #[arg(long, default_value_t = 1)]
        dispatch_rate_period: u32,
    },
    /// Show the replicators' dispatch rate cap.
    ///
    /// Example: meridian admin namespaces get-replicator-dispatch-rate acme/orders
    GetReplicatorDispatchRate { namespace: String },
    /// Remove the replicators' dispatch rate cap.
    ///
    /// Example: meridian admin namespaces remove-replicator-dispatch-rate acme/orders
    RemoveReplicatorDispatchRate { namespace: String },
    /// Backlog quota: --limit 10G and/or --limit-time 3600, with a policy.
    ///
    /// Example: meridian admin namespaces set-backlog-quota acme/orders --limit 10G --policy producer_request_hold
    SetBacklogQuota {
        namespace: String,
        #[arg(long, allow_hyphen_values = true)]
        limit: Option<String>,
        #[arg(long, allow_hyphen_values = true)]
        limit_time: Option<i64>,
        #[arg(long, value_parser = ["producer_request_hold", "producer_exception", "consumer_backlog_eviction"])]
        policy: String,
        #[arg(long = "type", default_value = "destination_storage", value_parser = ["destination_storage", "message_age"])]
        quota_type: String,
    },
    /// Show the backlog quotas.
    ///
    /// Example: meridian admin namespaces get-backlog-quotas acme/orders
    GetBacklogQuotas { namespace: String },
    /// Turn message de-duplication on or off.
    ///
    /// Example: meridian admin namespaces set-deduplication acme/orders --enable
    SetDeduplication {
        namespace: String,
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
    /// Unload the namespace, or one bundle of it (clients reconnect). In cluster mode each
    /// bundle's owner closes its topics and releases it; the next lookup assigns it again.
    ///
    /// Example: meridian admin namespaces unload acme/orders --bundle 0x00000000_0x40000000
    Unload {
        namespace: String,
        /// One bundle's hash range, as Pulsar names it (`0x00000000_0x40000000`).
        #[arg(long, short = 'b')]
        bundle: Option<String>,
    },
    /// Split one bundle in two equal halves (cluster mode; its topics are unloaded and the
    /// next lookups assign the halves).
    ///
    /// Example: meridian admin namespaces split-bundle acme/orders --bundle 0x00000000_0x40000000
    SplitBundle {
        namespace: String,
        /// The bundle's hash range, as Pulsar names it (`0x00000000_0x40000000`).
        #[arg(long, short = 'b')]
        bundle: String,
    },
    /// List the namespace's topics.
    ///
    /// Example: meridian admin namespaces topics acme/orders
    Topics { namespace: String },
}

#[derive(Subcommand)]
enum TopicVerb {
    /// Topics of tenant/namespace.
    ///
    /// Example: meridian admin topics list acme/orders
    List { namespace: String },
    /// Roles and their actions on a topic (its own grants and its namespace's).
    ///
    /// Example: meridian admin topics permissions acme/orders/events
    Permissions { topic: String },
    /// Grant a role actions (produce, consume) on a topic.
    ///
    /// Example: meridian admin topics grant-permission acme/orders/events --role app1 --actions consume
    GrantPermission {
        topic: String,
        #[arg(long)]
        role: String,
        #[arg(long, value_delimiter = ',', required = true)]
        actions: Vec<String>,
    },
    /// Revoke a role's grant on a topic.
    ///
    /// Example: meridian admin topics revoke-permission acme/orders/events --role app1
    RevokePermission {
        topic: String,
        #[arg(long)]
        role: String,
    },
    /// Create a non-partitioned topic.
    ///
    /// Example: meridian admin topics create acme/orders/events
    Create { topic: String },
    /// Create a partitioned topic.
    ///
    /// Example: meridian admin topics create-partitioned-topic acme/orders/events -p 4
    CreatePartitionedTopic {
        topic: String,
        #[arg(long, short)]
        partitions: u32,
    },
    /// Grow a partitioned topic to more partitions.
    ///
    /// Example: meridian admin topics update-partitioned-topic acme/orders/events -p 8
    UpdatePartitionedTopic {
        topic: String,
        #[arg(long, short)]
        partitions: u32,
    },
    /// Show a partitioned topic's partition count.
    ///
    /// Example: meridian admin topics get-partitioned-topic-metadata acme/orders/events
    GetPartitionedTopicMetadata { topic: String },
    /// Delete a topic (--force: even with clients connected).
    ///
    /// Example: meridian admin topics delete acme/orders/events
    Delete {
        topic: String,
        #[arg(long, short)]
        force: bool,
    },
    /// Delete a partitioned topic and its partitions.
    ///
    /// Example: meridian admin topics delete-partitioned-topic acme/orders/events
    DeletePartitionedTopic {
        topic: String,
        #[arg(long, short)]
        force: bool,
    },
    /// Show a topic's stats (rates, backlogs, producers, subscriptions), or why it cannot be loaded.
    ///
    /// Example: meridian admin topics stats acme/orders/events
    Stats { topic: String },
    /// Show a partitioned topic's stats, summed and per partition.
    ///
    /// Example: meridian admin topics partitioned-stats acme/orders/events
    PartitionedStats { topic: String },
    /// Show a topic's storage-level stats (segments, cursors).
    ///
    /// Example: meridian admin topics stats-internal acme/orders/events
    StatsInternal { topic: String },
    /// Show the id of a topic's last message.
    ///
    /// Example: meridian admin topics last-message-id acme/orders/events
    LastMessageId { topic: String },
    /// List a topic's subscriptions.
    ///
    /// Example: meridian admin topics subscriptions acme/orders/events
    Subscriptions { topic: String },
    /// Create a subscription at latest, earliest or a message id.
    ///
    /// Example: meridian admin topics create-subscription acme/orders/events -s billing -m earliest
    CreateSubscription {
        topic: String,
        #[arg(long, short)]
        subscription: String,
        /// Start position: latest, earliest or ledger:entry.
        #[arg(long, short, default_value = "latest")]
        message_id: String,
    },
    /// Delete a subscription (--force: even with consumers).
    ///
    /// Example: meridian admin topics unsubscribe acme/orders/events -s billing
    Unsubscribe {
        topic: String,
        #[arg(long, short)]
        subscription: String,
        #[arg(long, short)]
        force: bool,
    },
    /// Reset a subscription to a time (--time 10m: ten minutes ago) or a message id.
    ///
    /// Example: meridian admin topics reset-cursor acme/orders/events -s billing --time 10m
    ResetCursor {
        topic: String,
        #[arg(long, short)]
        subscription: String,
        #[arg(long, short, conflicts_with = "message_id")]
        time: Option<String>,
        #[arg(long, short)]
        message_id: Option<String>,
    },
    /// Skip messages of a subscription's backlog.
    ///
    /// Example: meridian admin topics skip acme/orders/events -s billing -n 10
    Skip {
        topic: String,
        #[arg(long, short)]
        subscription: String,
        #[arg(long, short = 'n')]
        count: u64,
    },
    /// Skip a subscription's whole backlog.
    ///
    /// Example: meridian admin topics skip-all acme/orders/events -s billing
    SkipAll {
        topic: String,
        #[arg(long, short)]
        subscription: String,
    },
    /// Acknowledge a subscription's messages older than N seconds.
    ///
    /// Example: meridian admin topics expire-messages acme/orders/events -s billing -t 3600
    ExpireMessages {
        topic: String,
        #[arg(long, short)]
        subscription: String,
        #[arg(long, short = 't')]
        expire_time_in_seconds: u64,
    },
    /// Print the next messages of a subscription without acknowledging them.
    ///
    /// Example: meridian admin topics peek-messages acme/orders/events -s billing -n 3
    PeekMessages {
        topic: String,
        #[arg(long, short)]
        subscription: String,
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u64,
    },
    /// Unload a topic (clients reconnect; reopens its log).
    ///
    /// Example: meridian admin topics unload acme/orders/events
    Unload { topic: String },
    /// Terminate a topic: no more messages are accepted.
    ///
    /// Example: meridian admin topics terminate acme/orders/events
    Terminate { topic: String },
}

/// `persistent://t/ns/x`, `t/ns/x` or `x` → the REST path part `t/ns/x`.
fn topic_path(topic: &str) -> anyhow::Result<String> {
    let name = meridian_broker::TopicName::parse(topic).map_err(|error| anyhow!("{error}"))?;
    Ok(format!(
        "{}/{}/{}",
        name.tenant,
        name.namespace,
        encode_path_segment(&name.local)
    ))
}

/// `10`, `10s`, `5m`, `3h`, `2d`, `1w` → seconds (or minutes with `to_minutes`); `-1` stays -1.
fn parse_duration_seconds(text: &str) -> anyhow::Result<i64> {
    if text == "-1" {
        return Ok(-1);
    }
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: i64 = number
        .parse()
        .with_context(|| format!("invalid duration {text:?}"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        other => bail!("invalid duration unit {other:?} in {text:?} (use s, m, h, d or w)"),
    };
    Ok(value * factor)
}

/// `100`, `10K`, `5M`, `2G`, `1T` → bytes; `-1` stays -1.
fn parse_size_bytes(text: &str) -> anyhow::Result<i64> {
    if text == "-1" {
        return Ok(-1);
    }
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let value: i64 = number
        .parse()
        .with_context(|| format!("invalid size {text:?}"))?;
    let factor: i64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        other => bail!("invalid size unit {other:?} in {text:?} (use K, M, G or T)"),
    };
    Ok(value * factor)
}

fn message_id_body(text: &str) -> anyhow::Result<Value> {
    Ok(match text {
        "latest" => json!({ "ledgerId": i64::MAX, "entryId": i64::MAX }),
        "earliest" => json!({ "ledgerId": -1, "entryId": -1 }),
        other => {
            let (ledger, entry) = other.split_once(':').ok_or_else(|| {
                anyhow!("message id {other:?} must be latest, earliest or ledger:entry")
            })?;
            json!({ "ledgerId": ledger.parse::<i64>()?, "entryId": entry.parse::<i64>()? })
        }
    })
}

/// Redirects (307/308) followed per call.
const MAX_REDIRECTS: usize = 3;

struct Http {
    base: String,
    /// Plain, or TLS with the `--tls-*` settings for an `https://` base.
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer <token>`.
    token: Option<String>,
}

enum Reply {
    Json(Value),
    Text(String),
}

impl Http {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Reply> {
        let mut url = format!("{}{}", self.base.trim_end_matches('/'), path);
        // ureq follows redirects of GET only; a cluster-mode broker answers a call that only
        // the bundle's owner can serve (a bundle unload, topic calls) with 307 to the owner,
        // which keeps the method and body, as pulsar-admin follows it.
        let mut redirects = 0;
        let response = loop {
            let mut request = self.agent.request(method, &url);
            if let Some(token) = &self.token {
                request = request.set("Authorization", &format!("Bearer {token}"));
            }
            let response = match &body {
                Some(body) => request.send_json(body.clone()),
                None => request.call(),
            };
            let location = match &response {
                Ok(answer) if matches!(answer.status(), 307 | 308) => {
                    answer.header("Location").map(str::to_string)
                }
                _ => None,
            };
            match location {
                Some(location) if redirects < MAX_REDIRECTS => {
                    redirects += 1;
                    url = location;
                }
                Some(location) => {
                    bail!("more than {MAX_REDIRECTS} redirects; the last to {location}")
                }
                None => break response,
            }
        };
        let response = match response {
            Ok(response) => response,
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let reason = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|value| {
                        value
                            .get("reason")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or(text);
                bail!("{status}: {reason}");
            }
            Err(error) => bail!("cannot reach {url}: {error}"),
        };
        let is_json = response.content_type() == "application/json";
        let text = response.into_string().context("reading the response")?;
        if is_json {
            Ok(Reply::Json(
                serde_json::from_str(&text).context("the server sent invalid JSON")?,
            ))
        } else {
            Ok(Reply::Text(text))
        }
    }
}

/// Renders a JSON value as indented `key  value` rows (lists: one item per line).
fn table(value: &Value, prefix: &str, out: &mut String) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                match value {
                    Value::Object(inner) if !inner.is_empty() => table(value, &path, out),
                    Value::Array(items) if items.iter().any(|item| item.is_object()) => {
                        for (index, item) in items.iter().enumerate() {
                            table(item, &format!("{path}[{index}]"), out);
                        }
                    }
                    other => out.push_str(&format!("{path:<60} {}\n", scalar(other))),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Object(_) => table(item, prefix, out),
                    other => out.push_str(&format!("{}\n", scalar(other))),
                }
            }
        }
        other => out.push_str(&format!("{}\n", scalar(other))),
    }
}

/// A migration's status: who, where, the phase, then one line per phase with its progress.
fn migration(status: &Value) -> String {
    let field = |name: &str| status.get(name).map(scalar).unwrap_or_default();
    let mut out = format!(
        "tenant {} migrating from {} to {}: {}\n",
        field("tenant"),
        field("sourceCluster"),
        field("targetCluster"),
        field("phase")
    );
    if let Some(reason) = status.get("pausedReason").and_then(Value::as_str) {
        out.push_str(&format!("PAUSED: {reason}\n"));
    }
    for phase in status
        .get("phases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let get = |name: &str| phase.get(name).map(scalar).unwrap_or_default();
        out.push_str(&format!(
            "  {:<22} {:<9} {}\n",
            get("name"),
            get("state"),
            get("progress")
        ));
    }
    out
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".into(),
        Value::Array(items) => items.iter().map(scalar).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

pub fn run(arguments: AdminArgs) -> anyhow::Result<()> {
    let agent =
        meridian_client::http_agent(&arguments.url, &arguments.tls.options(), |agent| agent)?;
    let http = Http {
        agent,
        base: arguments.url,
        token: arguments.auth.token()?,
    };
    let mut migration_view = false;
    let (method, path, body): (&str, String, Option<Value>) = match arguments.noun {
        Noun::Clusters(verb) => match verb {
            ClusterVerb::List => ("GET", "/admin/v2/clusters".into(), None),
            ClusterVerb::Get { cluster } => ("GET", format!("/admin/v2/clusters/{cluster}"), None),
            ClusterVerb::Create(data) => (
                "PUT",
                format!("/admin/v2/clusters/{}", data.cluster),
                Some(json!({ "serviceUrl": data.url, "brokerServiceUrl": data.broker_url })),
            ),
            ClusterVerb::Update(data) => (
                "POST",
                format!("/admin/v2/clusters/{}", data.cluster),
                Some(json!({ "serviceUrl": data.url, "brokerServiceUrl": data.broker_url })),
            ),
            ClusterVerb::Delete { cluster } => {
                ("DELETE", format!("/admin/v2/clusters/{cluster}"), None)
            }
        },
        Noun::Tenants(verb) => match verb {
            TenantVerb::List => ("GET", "/admin/v2/tenants".into(), None),
            TenantVerb::Get { tenant } => ("GET", format!("/admin/v2/tenants/{tenant}"), None),
            TenantVerb::Create(data) => (
                "PUT",
                format!("/admin/v2/tenants/{}", data.tenant),
                Some(
                    json!({ "adminRoles": data.admin_roles, "allowedClusters": data.allowed_clusters }),
                ),
            ),
            TenantVerb::Update(data) => (
                "POST",
                format!("/admin/v2/tenants/{}", data.tenant),
                Some(
                    json!({ "adminRoles": data.admin_roles, "allowedClusters": data.allowed_clusters }),
                ),
            ),
            TenantVerb::Delete { tenant } => {
                ("DELETE", format!("/admin/v2/tenants/{tenant}"), None)
            }
            TenantVerb::Migrate(migrate) => {
                let path = format!("/admin/v2/tenants/{}/migration", migrate.tenant);
                let request = match (migrate.to, migrate.abort, migrate.redirect) {
                    (Some(target), _, _) => (
                        "POST",
                        path,
                        Some(
                            json!({ "targetCluster": target, "holdBeforeRedirect": migrate.hold }),
                        ),
                    ),
                    (None, true, _) => ("DELETE", path, None),
                    (None, false, true) => ("POST", format!("{path}/redirect"), None),
                    (None, false, false) if migrate.cleanup => {
                        ("POST", format!("{path}/cleanup"), None)
                    }
                    (None, false, false) => ("GET", path, None),
                };
                migration_view = true;
                request
            }
        },
        Noun::Namespaces(verb) => namespace_request(verb)?,
        Noun::Topics(verb) => topic_request(verb)?,
        Noun::Brokers(verb) => {
            let path = match verb {
                BrokerVerb::List { cluster: None } => "/admin/v2/brokers".into(),
                BrokerVerb::List {
                    cluster: Some(cluster),
                } => format!("/admin/v2/brokers/{}", encode_path_segment(&cluster)),
                BrokerVerb::LeaderBroker => "/admin/v2/brokers/leaderBroker".into(),
                BrokerVerb::Healthcheck { details } => {
                    format!(
                        "/admin/v2/brokers/health{}",
                        if details { "?details=true" } else { "" }
                    )
                }
                BrokerVerb::Version => "/admin/v2/brokers/version".into(),
                BrokerVerb::ListDynamicConfig => "/admin/v2/brokers/configuration".into(),
                BrokerVerb::GetAllDynamicConfig => "/admin/v2/brokers/configuration/values".into(),
                BrokerVerb::GetRuntimeConfig => "/admin/v2/brokers/configuration/runtime".into(),
            };
            ("GET", path, None)
        }
        Noun::BrokerStats(BrokerStatsVerb::Topics) => {
            ("GET", "/admin/v2/broker-stats/topics".into(), None)
        }
    };
    let reply = http.call(method, &path, body)?;
    match (reply, arguments.output) {
        (Reply::Json(value), Output::Json) => println!("{}", serde_json::to_string_pretty(&value)?),
        (Reply::Json(value), Output::Table) if migration_view => print!("{}", migration(&value)),
        (Reply::Json(value), Output::Table) => {
            let mut out = String::new();
            table(&value, "", &mut out);
            print!("{out}");
        }
        (Reply::Text(text), _) => {
            if !text.is_empty() {
                println!("{text}");
            }
        }
    }
    Ok(())
}

fn namespace_request(verb: NamespaceVerb) -> anyhow::Result<(&'static str, String, Option<Value>)> {
    let path = |namespace: &str, rest: &str| format!("/admin/v2/namespaces/{namespace}{rest}");
    Ok(match verb {
        NamespaceVerb::List { tenant } => ("GET", format!("/admin/v2/namespaces/{tenant}"), None),
        NamespaceVerb::Create {
            namespace,
            clusters,
        } => (
            "PUT",
            path(&namespace, ""),
            (!clusters.is_empty()).then(|| json!({ "replication_clusters": clusters })),
        ),
        NamespaceVerb::Delete { namespace, force } => {
            ("DELETE", path(&namespace, &format!("?force={force}")), None)
        }
        NamespaceVerb::Policies { namespace } => ("GET", path(&namespace, ""), None),
        NamespaceVerb::Permissions { namespace } => ("GET", path(&namespace, "/permissions"), None),
        NamespaceVerb::GrantPermission {
            namespace,
            role,
            actions,
        } => (
            "POST",
            path(&namespace, &format!("/permissions/{role}")),
            Some(json!(actions)),
        ),
        NamespaceVerb::RevokePermission { namespace, role } => (
            "DELETE",
            path(&namespace, &format!("/permissions/{role}")),
            None,
        ),
        NamespaceVerb::SetClusters {
            namespace,
            clusters,
        } => (
            "POST",
            path(&namespace, "/replication"),
            Some(json!(clusters)),
        ),
        NamespaceVerb::GetClusters { namespace } => ("GET", path(&namespace, "/replication"), None),
        NamespaceVerb::SetRetention {
            namespace,
            time,
            size,
        } => {
            let seconds = parse_duration_seconds(&time)?;
            let minutes = if seconds < 0 { -1 } else { seconds / 60 };
            let bytes = parse_size_bytes(&size)?;
            let megabytes = if bytes < 0 { -1 } else { bytes / (1 << 20) };
            (
                "POST",
                path(&namespace, "/retention"),
                Some(json!({ "retentionTimeInMinutes": minutes, "retentionSizeInMB": megabytes })),
            )
        }
        NamespaceVerb::GetRetention { namespace } => ("GET", path(&namespace, "/retention"), None),
        NamespaceVerb::SetMessageTtl { namespace, ttl } => {
            ("POST", path(&namespace, "/messageTTL"), Some(json!(ttl)))
        }
        NamespaceVerb::GetMessageTtl { namespace } => {
            ("GET", path(&namespace, "/messageTTL"), None)
        }
        NamespaceVerb::SetReplicatorDispatchRate {
            namespace,
            msg_dispatch_rate,
            byte_dispatch_rate,
            dispatch_rate_period,
        } => (
            "POST",
            path(&namespace, "/replicatorDispatchRate"),
            Some(json!({
                "dispatchThrottlingRateInMsg": msg_dispatch_rate,
                "dispatchThrottlingRateInByte": byte_dispatch_rate,
                "ratePeriodInSecond": dispatch_rate_period,
                "relativeToPublishRate": false,
            })),
        ),
        NamespaceVerb::GetReplicatorDispatchRate { namespace } => {
            ("GET", path(&namespace, "/replicatorDispatchRate"), None)
        }
        NamespaceVerb::RemoveReplicatorDispatchRate { namespace } => {
            ("DELETE", path(&namespace, "/replicatorDispatchRate"), None)
        }
        NamespaceVerb::SetBacklogQuota {
            namespace,
            limit,
            limit_time,
            policy,
            quota_type,
        } => {
            let limit_size = match limit {
                Some(limit) => parse_size_bytes(&limit)?,
                None => -1,
            };
            (
                "POST",
                path(
                    &namespace,
                    &format!("/backlogQuota?backlogQuotaType={quota_type}"),
                ),
                Some(
                    json!({ "limitSize": limit_size, "limitTime": limit_time.unwrap_or(-1), "policy": policy }),
                ),
            )
        }
        NamespaceVerb::GetBacklogQuotas { namespace } => {
            ("GET", path(&namespace, "/backlogQuotaMap"), None)
        }
        NamespaceVerb::SetDeduplication {
            namespace,
            enable,
            disable,
        } => {
            if enable == disable {
                bail!("give exactly one of --enable or --disable");
            }
            (
                "POST",
                path(&namespace, "/deduplication"),
                Some(json!(enable)),
            )
        }
        NamespaceVerb::Unload { namespace, bundle } => match bundle {
            None => ("PUT", path(&namespace, "/unload"), None),
            Some(bundle) => ("PUT", path(&namespace, &format!("/{bundle}/unload")), None),
        },
        NamespaceVerb::SplitBundle { namespace, bundle } => (
            "PUT",
            path(
                &namespace,
                &format!("/{bundle}/split?unload=true&splitAlgorithmName=range_equally_divide"),
            ),
            None,
        ),
        NamespaceVerb::Topics { namespace } => ("GET", path(&namespace, "/topics"), None),
    })
}

fn topic_request(verb: TopicVerb) -> anyhow::Result<(&'static str, String, Option<Value>)> {
    let base = |topic: &str| -> anyhow::Result<String> {
        Ok(format!("/admin/v2/persistent/{}", topic_path(topic)?))
    };
    Ok(match verb {
        TopicVerb::List { namespace } => ("GET", format!("/admin/v2/persistent/{namespace}"), None),
        TopicVerb::Create { topic } => ("PUT", base(&topic)?, None),
        TopicVerb::Permissions { topic } => ("GET", format!("{}/permissions", base(&topic)?), None),
        TopicVerb::GrantPermission {
            topic,
            role,
            actions,
        } => (
            "POST",
            format!("{}/permissions/{role}", base(&topic)?),
            Some(json!(actions)),
        ),
        TopicVerb::RevokePermission { topic, role } => (
            "DELETE",
            format!("{}/permissions/{role}", base(&topic)?),
            None,
        ),
        TopicVerb::CreatePartitionedTopic { topic, partitions } => (
            "PUT",
            format!("{}/partitions", base(&topic)?),
            Some(json!(partitions)),
        ),
        TopicVerb::UpdatePartitionedTopic { topic, partitions } => (
            "POST",
            format!("{}/partitions", base(&topic)?),
            Some(json!(partitions)),
        ),
        TopicVerb::GetPartitionedTopicMetadata { topic } => {
            ("GET", format!("{}/partitions", base(&topic)?), None)
        }
        TopicVerb::Delete { topic, force } => {
            ("DELETE", format!("{}?force={force}", base(&topic)?), None)
        }
        TopicVerb::DeletePartitionedTopic { topic, force } => (
            "DELETE",
            format!("{}/partitions?force={force}", base(&topic)?),
            None,
        ),
        TopicVerb::Stats { topic } => ("GET", format!("{}/stats", base(&topic)?), None),
        TopicVerb::PartitionedStats { topic } => {
            ("GET", format!("{}/partitioned-stats", base(&topic)?), None)
        }
        TopicVerb::StatsInternal { topic } => {
            ("GET", format!("{}/internalStats", base(&topic)?), None)
        }
        TopicVerb::LastMessageId { topic } => {
            ("GET", format!("{}/lastMessageId", base(&topic)?), None)
        }
        TopicVerb::Subscriptions { topic } => {
            ("GET", format!("{}/subscriptions", base(&topic)?), None)
        }
        TopicVerb::CreateSubscription {
            topic,
            subscription,
            message_id,
        } => (
            "PUT",
            format!(
                "{}/subscription/{}",
                base(&topic)?,
                encode_path_segment(&subscription)
            ),
            Some(message_id_body(&message_id)?),
        ),
        TopicVerb::Unsubscribe {
            topic,
            subscription,
            force,
        } => (
            "DELETE",
            format!(
                "{}/subscription/{}?force={force}",
                base(&topic)?,
                encode_path_segment(&subscription)
            ),
            None,
        ),
        TopicVerb::ResetCursor {
            topic,
            subscription,
            time,
            message_id,
        } => {
            let subscription_path = format!(
                "{}/subscription/{}",
                base(&topic)?,
                encode_path_segment(&subscription)
            );
            match (time, message_id) {
                (Some(time), _) => {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|elapsed| elapsed.as_millis() as i64)?;
                    let timestamp = now_ms - parse_duration_seconds(&time)? * 1000;
                    (
                        "POST",
                        format!("{subscription_path}/resetcursor/{timestamp}"),
                        None,
                    )
                }
                (None, Some(message_id)) => (
                    "POST",
                    format!("{subscription_path}/resetcursor"),
                    Some(message_id_body(&message_id)?),
                ),
                (None, None) => bail!("give --time or --message-id"),
            }
        }
        TopicVerb::Skip {
            topic,
            subscription,
            count,
        } => (
            "POST",
            format!(
                "{}/subscription/{}/skip/{count}",
                base(&topic)?,
                encode_path_segment(&subscription)
            ),
            None,
        ),
        TopicVerb::SkipAll {
            topic,
            subscription,
        } => (
            "POST",
            format!(
                "{}/subscription/{}/skip_all",
                base(&topic)?,
                encode_path_segment(&subscription)
            ),
            None,
        ),
        TopicVerb::ExpireMessages {
            topic,
            subscription,
            expire_time_in_seconds,
        } => (
            "POST",
            format!(
                "{}/subscription/{}/expireMessages/{expire_time_in_seconds}",
                base(&topic)?,
                encode_path_segment(&subscription)
            ),
            None,
        ),
        TopicVerb::PeekMessages {
            topic,
            subscription,
            count,
        } => (
            "GET",
            format!(
                "{}/subscription/{}/position/{count}",
                base(&topic)?,
                encode_path_segment(&subscription)
            ),
            None,
        ),
        TopicVerb::Unload { topic } => ("PUT", format!("{}/unload", base(&topic)?), None),
        TopicVerb::Terminate { topic } => ("POST", format!("{}/terminate", base(&topic)?), None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_names() {
        assert_eq!(parse_duration_seconds("90").expect("seconds"), 90);
        assert_eq!(parse_duration_seconds("3h").expect("hours"), 10_800);
        assert_eq!(parse_duration_seconds("-1").expect("unlimited"), -1);
        assert!(parse_duration_seconds("3y").is_err());
        assert_eq!(parse_size_bytes("10M").expect("size"), 10 << 20);
        assert!(parse_size_bytes("ten").is_err());
        assert_eq!(
            topic_path("orders").expect("short"),
            "public/default/orders"
        );
        assert_eq!(
            topic_path("persistent://a/b/c d").expect("encoded"),
            "a/b/c%20d"
        );
        assert!(topic_path("persistent://a/b").is_err());
    }
}
