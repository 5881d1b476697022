//! `meridian standalone` configuration: one TOML file, environment overrides, CLI flags.
//!
//! Precedence, lowest first: built-in defaults, the `--config` file, environment variables
//! `MERIDIAN_<KEY>` (nested keys with a double underscore: `MERIDIAN_STORAGE__SEGMENT_MAX_BYTES`),
//! then command-line flags. Every key is documented in `docs/configuration.md`; unknown keys are
//! an error that names the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use meridian_admin::HttpLimits;
use meridian_auth::SecurityConfig;
use meridian_broker::{AutoTopicCreationType, BrokerConfig};
use meridian_server::ServerConfig;
use meridian_storage::{FlushPolicy, StorageConfig};
use serde::{Deserialize, Serialize};

use crate::logging::LogFormat;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub cluster_name: String,
    pub data_dir: PathBuf,
    pub bind_address: String,
    /// Host name that lookups return; defaults to `bind_address`.
    pub advertised_address: Option<String>,
    pub broker_port: u16,
    pub web_port: u16,
    pub allow_auto_topic_creation: bool,
    pub allow_auto_topic_creation_type: AutoTopicCreationType,
    pub default_num_partitions: u32,
    pub max_num_partitions_per_partitioned_topic: u32,
    pub max_topics_per_namespace: usize,
    pub max_loaded_topics: usize,
    pub max_message_size: usize,
    pub deduplication_enabled: bool,
    /// Acknowledgements of single messages inside a batch are kept
    /// (`acknowledgmentAtBatchIndexLevelEnabled`).
    pub acknowledgment_at_batch_index_level_enabled: bool,
    /// Where a topic's new replicator starts: `latest` (Pulsar's default) or `earliest`
    /// (back-fill the messages already stored).
    pub replication_start_at: ReplicationStart,
    /// How often replicated subscriptions sync between clusters, unless a namespace says.
    pub replicated_subscriptions_sync_interval_ms: u64,
    /// Announce and take Meridian's REPLICATED_SUBSCRIPTION_STATE command (other clusters then
    /// send replicated subscriptions' states on the binary protocol instead of HTTP).
    pub replicated_subscriptions_state_command: bool,
    /// Announce that the command's state may come in the compact (protobuf) form instead of
    /// JSON text.
    pub replicated_subscriptions_state_compact: bool,
    /// Bytes of replicated entries held in memory (read and not yet confirmed by the remote)
    /// across every replicator of this broker.
    pub replication_max_memory_bytes: usize,
    pub max_connections: usize,
    /// Connections served at once from one IP address (0: no limit).
    pub max_connections_per_ip: usize,
    /// Bytes queued for one connection's socket before the broker stops sending to it.
    pub max_outbound_bytes_per_connection: usize,
    pub keep_alive_interval_seconds: u64,
    /// Time a new connection has to complete its CONNECT handshake.
    pub connect_timeout_seconds: u64,
    /// HTTP connections served at once.
    pub http_max_connections: usize,
    /// HTTP connections served at once from one IP address (0: no limit).
    pub http_max_connections_per_ip: usize,
    /// Time an HTTP client has to send a request's headers (also closes idle connections).
    pub http_header_read_timeout_seconds: u64,
    /// Time an HTTP client has to send a request's body, from the end of its headers.
    pub http_request_body_timeout_seconds: u64,
    /// Time an HTTP response write may make no progress before the connection is closed.
    pub http_write_timeout_seconds: u64,
    pub max_pending_sends_per_producer: usize,
    /// Producers one connection may hold (0: no limit).
    pub max_producers_per_connection: usize,
    /// Consumers one connection may hold (0: no limit).
    pub max_consumers_per_connection: usize,
    /// Durable subscriptions of one topic (0: no limit).
    pub max_subscriptions_per_topic: usize,
    /// Bytes of large frames all connections may be receiving at once.
    pub max_inbound_frame_buffer_bytes: usize,
    pub max_unacked_messages_per_consumer: u64,
    /// How often TTL expiry, backlog quotas and retention are enforced.
    pub policy_check_interval_seconds: u64,
    /// How often message and byte rates are recomputed for stats.
    pub stats_interval_seconds: u64,
    /// Log lines on stderr: `text` or `json` (`--log-format` overrides it).
    pub log_format: LogFormat,
    /// `meridian broker` only: the etcd endpoints of the cluster's metadata
    /// (`metadataStoreUrl`), `etcd://host:2379,host:2379`.
    pub metadata_store_url: Option<String>,
    /// `meridian broker` only: TTL of the broker's etcd lease, the time after a crash before
    /// its bundles can move (Pulsar's `metadataStoreSessionTimeoutMillis`, in seconds).
    pub etcd_lease_ttl_seconds: u64,
    /// `meridian broker` only: bundles per namespace (`defaultNumberOfNamespaceBundles`).
    pub default_number_of_namespace_bundles: u32,
    /// `meridian broker` only: the load balancer moves bundles off busy brokers
    /// (`loadBalancerEnabled`).
    pub load_balancer_enabled: bool,
    /// How often each broker writes its load report.
    pub load_balancer_report_interval_seconds: u64,
    /// How often the leader looks for a bundle to move (`loadBalancerSheddingIntervalMinutes`).
    pub load_balancer_shedding_interval_seconds: u64,
    /// Percent above the average throughput at which a broker sheds a bundle
    /// (`loadBalancerBrokerThresholdShedderPercentage`).
    pub load_balancer_broker_threshold_shedder_percentage: u64,
    /// The least throughput, in MB/s, of a bundle worth moving
    /// (`loadBalancerBundleUnloadMinThroughputThreshold`).
    pub load_balancer_bundle_unload_min_throughput_threshold: f64,
    /// How long a moved bundle stays put (`loadBalancerSheddingGracePeriodMinutes`).
    pub load_balancer_shedding_grace_period_seconds: u64,
    /// `meridian broker` only: `s3://bucket/prefix` where topics' entries are stored (the
    /// object-store log; cursors go to etcd). Unset: each broker keeps the topics it owns in
    /// its own local storage.
    pub storage_url: Option<String>,
    /// `meridian broker --storage` only: `http(s)://host:port` of the S3 API.
    pub s3_endpoint: Option<String>,
    /// SigV4 signing region.
    pub s3_region: String,
    /// `true`: `endpoint/bucket/key` (SeaweedFS, MinIO, Garage); `false`: virtual-hosted.
    pub s3_path_style: bool,
    /// A file holding `ACCESS_KEY_ID:SECRET_ACCESS_KEY`; without it the credentials come from
    /// `MERIDIAN_S3_ACCESS_KEY_ID` and `MERIDIAN_S3_SECRET_ACCESS_KEY`.
    pub s3_access_key_file: Option<PathBuf>,
    /// `meridian broker --storage` only: a topic's index keys in etcd past this many are moved
    /// into one manifest object (0: never).
    pub object_log_manifest_threshold: usize,
    /// `meridian broker --storage` only: unreferenced data objects and manifests older than
    /// this are deleted by the orphan sweep.
    pub object_log_orphan_grace_seconds: u64,
    /// Clients must present a valid token (`authenticationEnabled`).
    pub authentication_enabled: bool,
    /// Roles are checked against permissions (`authorizationEnabled`).
    pub authorization_enabled: bool,
    /// Roles allowed everything (`superUserRoles`).
    pub super_user_roles: Vec<String>,
    /// Roles other clusters replicate with (Meridian's; see docs/security.md).
    pub replicator_roles: Vec<String>,
    /// HMAC key of tokens (`tokenSecretKey`): `file:///path`, `data:;base64,...` or base64.
    pub token_secret_key: Option<String>,
    /// Public key of tokens (`tokenPublicKey`), DER or PEM, the same forms.
    pub token_public_key: Option<String>,
    /// Claim holding the role (`tokenAuthClaim`).
    pub token_auth_claim: String,
    /// Audience a token must name, if set (`tokenAudience`).
    pub token_audience: Option<String>,
    /// How often connections are checked for expired credentials
    /// (`authenticationRefreshCheckSeconds`).
    pub authentication_refresh_check_seconds: u64,
    /// Append-only JSON-lines audit log of admin mutations and security failures.
    pub audit_log_file: Option<PathBuf>,
    /// Binary-protocol connections one authenticated role may hold at once (0: no limit).
    pub max_connections_per_role: usize,
    /// Port of the binary protocol over TLS, `pulsar+ssl://` (`brokerServicePortTls`).
    pub broker_port_tls: Option<u16>,
    /// Port of HTTPS (`webServicePortTls`).
    pub web_port_tls: Option<u16>,
    /// PEM certificate chain of both TLS ports (`tlsCertificateFilePath`), reloaded on change.
    pub tls_certificate_file_path: Option<PathBuf>,
    /// PEM private key of both TLS ports (`tlsKeyFilePath`), reloaded on change.
    pub tls_key_file_path: Option<PathBuf>,
    /// PEM CA certificates that client certificates must chain to
    /// (`tlsTrustCertsFilePath`).
    pub tls_trust_certs_file_path: Option<PathBuf>,
    /// Clients of the TLS ports must present a certificate issued by those CAs (mutual TLS,
    /// `tlsRequireTrustedClientCertOnConnect`).
    pub tls_require_trusted_client_cert_on_connect: bool,
    /// CONNECT may authenticate with the client certificate, its CN as the role (Pulsar's
    /// `AuthenticationProviderTls` among `authenticationProviders`); needs mutual TLS.
    pub tls_authentication_enabled: bool,
    /// The plain ports (`broker_port`, `web_port`) are served; false: TLS ports only.
    pub plain_ports_enabled: bool,
    pub storage: StorageSection,
}

/// Where a new replicator starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationStart {
    Latest,
    Earliest,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// `fsync` (default) or `relaxed-write-only` (NOT durable against machine crashes).
    pub flush_policy: String,
    pub relaxed_fsync_interval_ms: u64,
    pub segment_max_bytes: u64,
    pub cache_max_bytes: u64,
    pub pending_max_bytes_per_log: u64,
    pub flush_threads: usize,
    pub cursor_persist_interval_ms: u64,
    pub cursor_max_persisted_ranges: usize,
    pub cursor_max_ranges: usize,
    pub trim_interval_ms: u64,
    pub recycled_segments_max: usize,
    pub entry_wal: bool,
    pub entry_wal_group_wait_us: u64,
    pub entry_wal_group_idle_us: u64,
}

impl Default for Config {
    fn default() -> Self {
        let broker = BrokerConfig::default();
        let server = ServerConfig::default();
        let http = HttpLimits::default();
        let security = SecurityConfig::default();
        Config {
            cluster_name: broker.cluster_name,
            data_dir: PathBuf::from("./data"),
            bind_address: "127.0.0.1".into(),
            advertised_address: None,
            broker_port: 6650,
            web_port: 8080,
            allow_auto_topic_creation: broker.allow_auto_topic_creation,
            allow_auto_topic_creation_type: broker.auto_topic_creation_type,
            default_num_partitions: broker.default_num_partitions,
            max_num_partitions_per_partitioned_topic: broker
                .max_num_partitions_per_partitioned_topic,
            max_topics_per_namespace: broker.max_topics_per_namespace,
            max_loaded_topics: broker.max_loaded_topics,
            max_message_size: broker.max_message_size,
            deduplication_enabled: broker.deduplication_enabled,
            acknowledgment_at_batch_index_level_enabled: broker.batch_index_ack_enabled,
            replication_start_at: ReplicationStart::Latest,
            replicated_subscriptions_sync_interval_ms: broker
                .replicated_subscriptions_sync_interval
                .as_millis() as u64,
            replicated_subscriptions_state_command: broker.replicated_subscriptions_state_command,
            replicated_subscriptions_state_compact: broker.replicated_subscriptions_state_compact,
            replication_max_memory_bytes: broker.replication_max_memory_bytes,
            max_connections: server.max_connections,
            max_connections_per_ip: server.max_connections_per_ip,
            max_outbound_bytes_per_connection: server.max_outbound_bytes,
            keep_alive_interval_seconds: server.keep_alive_interval.as_secs(),
            connect_timeout_seconds: server.connect_timeout.as_secs(),
            http_max_connections: http.max_connections,
            http_max_connections_per_ip: http.max_connections_per_ip,
            http_header_read_timeout_seconds: http.header_read_timeout.as_secs(),
            http_request_body_timeout_seconds: http.body_timeout.as_secs(),
            http_write_timeout_seconds: http.write_stall_timeout.as_secs(),
            max_pending_sends_per_producer: server.max_pending_sends_per_producer,
            max_producers_per_connection: server.max_producers_per_connection,
            max_consumers_per_connection: server.max_consumers_per_connection,
            max_subscriptions_per_topic: server.max_subscriptions_per_topic,
            max_inbound_frame_buffer_bytes: server.max_inbound_frame_buffer_bytes,
            max_unacked_messages_per_consumer: broker.max_unacked_messages_per_consumer,
            policy_check_interval_seconds: 60,
            stats_interval_seconds: 5,
            log_format: LogFormat::Text,
            metadata_store_url: None,
            etcd_lease_ttl_seconds: 10,
            default_number_of_namespace_bundles: 4,
            load_balancer_enabled: true,
            load_balancer_report_interval_seconds: 10,
            load_balancer_shedding_interval_seconds: 60,
            load_balancer_broker_threshold_shedder_percentage: 10,
            load_balancer_bundle_unload_min_throughput_threshold: 10.0,
            load_balancer_shedding_grace_period_seconds: 1800,
            storage_url: None,
            s3_endpoint: None,
            s3_region: "us-east-1".to_string(),
            s3_path_style: true,
            s3_access_key_file: None,
            object_log_manifest_threshold: 1000,
            object_log_orphan_grace_seconds: 3600,
            authentication_enabled: security.authentication_enabled,
            authorization_enabled: security.authorization_enabled,
            super_user_roles: security.super_user_roles,
            replicator_roles: security.replicator_roles,
            token_secret_key: None,
            token_public_key: None,
            token_auth_claim: security.token_auth_claim,
            token_audience: None,
            authentication_refresh_check_seconds: security.authentication_refresh_check.as_secs(),
            audit_log_file: None,
            max_connections_per_role: security.max_connections_per_role,
            broker_port_tls: None,
            web_port_tls: None,
            tls_certificate_file_path: None,
            tls_key_file_path: None,
            tls_trust_certs_file_path: None,
            tls_require_trusted_client_cert_on_connect: false,
            tls_authentication_enabled: security.tls_authentication_enabled,
            plain_ports_enabled: true,
            storage: StorageSection::default(),
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        let storage = StorageConfig::default();
        StorageSection {
            flush_policy: "fsync".into(),
            relaxed_fsync_interval_ms: 1000,
            segment_max_bytes: storage.segment_max_bytes,
            cache_max_bytes: storage.cache_max_bytes,
            pending_max_bytes_per_log: storage.pending_max_bytes_per_log,
            flush_threads: storage.flush_threads,
            cursor_persist_interval_ms: storage.cursor_persist_interval.as_millis() as u64,
            cursor_max_persisted_ranges: storage.cursor_max_persisted_ranges,
            cursor_max_ranges: storage.cursor_max_ranges,
            trim_interval_ms: storage.trim_interval.as_millis() as u64,
            recycled_segments_max: storage.recycled_segments_max,
            entry_wal: storage.entry_wal,
            entry_wal_group_wait_us: storage.entry_wal_group_wait.as_micros() as u64,
            entry_wal_group_idle_us: storage.entry_wal_group_idle.as_micros() as u64,
        }
    }
}

/// Keys without a default value (absent from the serialized defaults).
const OPTIONAL_KEYS: &[&str] = &[
    "advertised_address",
    "token_secret_key",
    "token_public_key",
    "token_audience",
    "audit_log_file",
    "broker_port_tls",
    "web_port_tls",
    "tls_certificate_file_path",
    "tls_key_file_path",
    "tls_trust_certs_file_path",
    "storage_url",
    "s3_endpoint",
    "s3_access_key_file",
];

/// Keys whose values are secrets: never shown in the runtime configuration.
const SECRET_KEYS: &[&str] = &["token_secret_key"];

/// Reads a value given in an environment variable as TOML (number, boolean), else as a string.
fn env_value(raw: &str) -> toml::Value {
    let parsed: Result<toml::Table, _> = toml::from_str(&format!("value = {raw}"));
    match parsed.ok().and_then(|mut table| table.remove("value")) {
        Some(value) => value,
        None => toml::Value::String(raw.to_string()),
    }
}

impl Config {
    /// Loads the file (if any), then applies `MERIDIAN_*` environment variables.
    pub fn load(
        file: Option<&Path>,
        environment: impl Iterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut table = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<toml::Table>(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        let known =
            toml::Value::try_from(Config::default()).context("listing configuration keys")?;
        for (name, raw) in environment {
            let Some(key) = name.strip_prefix("MERIDIAN_") else {
                continue;
            };
            let path: Vec<String> = key
                .to_ascii_lowercase()
                .split("__")
                .map(str::to_string)
                .collect();
            // Other tools' MERIDIAN_* variables (MERIDIAN_BIN, MERIDIAN_ADMIN_URL, ...) are not
            // configuration: only variables naming a known key apply.
            let is_key = (path.len() == 1 && OPTIONAL_KEYS.contains(&path[0].as_str()))
                || path
                    .iter()
                    .try_fold(&known, |value, part| value.get(part))
                    .is_some_and(|value| !value.is_table());
            if !is_key {
                continue;
            }
            let Some((last, parents)) = path.split_last() else {
                continue;
            };
            let mut target = &mut table;
            for parent in parents {
                let entry = target
                    .entry(parent.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(inner) = entry else {
                    bail!("environment variable {name}: {parent} is not a section");
                };
                target = inner;
            }
            target.insert(last.clone(), env_value(&raw));
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.cluster_name.is_empty()
            || !meridian_broker::topic_name::is_valid_entity_name(&self.cluster_name)
        {
            bail!("cluster_name {:?} is not a valid name", self.cluster_name);
        }
        if !(10..=60_000).contains(&self.replicated_subscriptions_sync_interval_ms) {
            bail!("replicated_subscriptions_sync_interval_ms must be between 10 and 60000");
        }
        if self.default_num_partitions == 0 {
            bail!("default_num_partitions must be at least 1");
        }
        let max_partitions = self.max_num_partitions_per_partitioned_topic;
        if max_partitions > 0 && self.default_num_partitions > max_partitions {
            bail!("default_num_partitions exceeds max_num_partitions_per_partitioned_topic");
        }
        if self.max_message_size == 0 || self.max_message_size > 100 * 1024 * 1024 {
            bail!("max_message_size must be between 1 byte and 100 MiB");
        }
        if self.replication_max_memory_bytes < 1024 * 1024 {
            bail!("replication_max_memory_bytes must be at least 1 MiB");
        }
        if self.policy_check_interval_seconds == 0 || self.stats_interval_seconds == 0 {
            bail!("policy_check_interval_seconds and stats_interval_seconds must be positive");
        }
        if !(2..=3600).contains(&self.etcd_lease_ttl_seconds) {
            bail!("etcd_lease_ttl_seconds must be between 2 and 3600");
        }
        if !(1..=65_536).contains(&self.default_number_of_namespace_bundles) {
            bail!("default_number_of_namespace_bundles must be between 1 and 65536");
        }
        if self.load_balancer_report_interval_seconds == 0
            || self.load_balancer_shedding_interval_seconds == 0
        {
            bail!(
                "load_balancer_report_interval_seconds and \
                 load_balancer_shedding_interval_seconds must be positive"
            );
        }
        let threshold = self.load_balancer_bundle_unload_min_throughput_threshold;
        if threshold.is_nan() || threshold < 0.0 {
            bail!("load_balancer_bundle_unload_min_throughput_threshold must be 0 or more");
        }
        if self.storage_url.is_some() != self.s3_endpoint.is_some() {
            bail!("storage_url (--storage) and s3_endpoint (--s3-endpoint) go together");
        }
        if self.keep_alive_interval_seconds == 0 || self.connect_timeout_seconds == 0 {
            bail!("keep_alive_interval_seconds and connect_timeout_seconds must be positive");
        }
        if self.max_inbound_frame_buffer_bytes < self.max_message_size + meridian_broker_padding() {
            bail!(
                "max_inbound_frame_buffer_bytes must hold at least one frame of the largest \
                 message (max_message_size plus 11 KiB)"
            );
        }
        if self.max_outbound_bytes_per_connection == 0 {
            bail!("max_outbound_bytes_per_connection must be positive");
        }
        if self.http_max_connections == 0
            || self.http_header_read_timeout_seconds == 0
            || self.http_request_body_timeout_seconds == 0
            || self.http_write_timeout_seconds == 0
        {
            bail!("http_max_connections and the http_*_timeout_seconds settings must be positive");
        }
        let tls_ports = self.broker_port_tls.is_some() || self.web_port_tls.is_some();
        if tls_ports
            && (self.tls_certificate_file_path.is_none() || self.tls_key_file_path.is_none())
        {
            bail!("broker_port_tls / web_port_tls need tls_certificate_file_path and tls_key_file_path");
        }
        if self.tls_require_trusted_client_cert_on_connect
            && self.tls_trust_certs_file_path.is_none()
        {
            bail!("tls_require_trusted_client_cert_on_connect needs tls_trust_certs_file_path");
        }
        if self.tls_authentication_enabled && !self.tls_require_trusted_client_cert_on_connect {
            bail!("tls_authentication_enabled needs tls_require_trusted_client_cert_on_connect (mutual TLS)");
        }
        if !self.plain_ports_enabled
            && (self.broker_port_tls.is_none() || self.web_port_tls.is_none())
        {
            bail!("plain_ports_enabled = false needs broker_port_tls and web_port_tls");
        }
        if self.authentication_refresh_check_seconds == 0 {
            bail!("authentication_refresh_check_seconds must be positive");
        }
        if !matches!(
            self.storage.flush_policy.as_str(),
            "fsync" | "relaxed-write-only"
        ) {
            bail!(
                "storage.flush_policy must be \"fsync\" or \"relaxed-write-only\", not {:?}",
                self.storage.flush_policy
            );
        }
        // The storage engine checks its configuration again in its own terms (durations, not
        // these keys' units); the refusals here name the key the operator set.
        let storage = &self.storage;
        for (key, micros) in [
            (
                "storage.entry_wal_group_wait_us",
                storage.entry_wal_group_wait_us,
            ),
            (
                "storage.entry_wal_group_idle_us",
                storage.entry_wal_group_idle_us,
            ),
        ] {
            let max = meridian_storage::ENTRY_WAL_GROUP_LIMIT_MAX;
            if Duration::from_micros(micros) > max {
                bail!(
                    "{key} must be at most {} (an hour), not {micros}",
                    max.as_micros()
                );
            }
        }
        for (key, millis) in [
            (
                "storage.cursor_persist_interval_ms",
                storage.cursor_persist_interval_ms,
            ),
            ("storage.trim_interval_ms", storage.trim_interval_ms),
        ] {
            if millis == 0 {
                bail!("{key} must be positive");
            }
        }
        self.storage_config()
            .validate()
            .map_err(|reason| anyhow::anyhow!("storage: {reason}"))?;
        Ok(())
    }

    /// The effective configuration as flat `key = value` strings (nested sections as
    /// `section.key`), for `GET /admin/v2/brokers/configuration/runtime`.
    pub fn runtime_values(&self) -> std::collections::BTreeMap<String, String> {
        fn flatten(
            prefix: &str,
            value: &serde_json::Value,
            into: &mut std::collections::BTreeMap<String, String>,
        ) {
            match value {
                serde_json::Value::Object(fields) => {
                    for (key, value) in fields {
                        let key = if prefix.is_empty() {
                            key.clone()
                        } else {
                            format!("{prefix}.{key}")
                        };
                        flatten(&key, value, into);
                    }
                }
                serde_json::Value::String(text) => {
                    into.insert(prefix.to_string(), text.clone());
                }
                serde_json::Value::Null => {
                    into.insert(prefix.to_string(), String::new());
                }
                other => {
                    into.insert(prefix.to_string(), other.to_string());
                }
            }
        }
        let mut values = std::collections::BTreeMap::new();
        if let Ok(value) = serde_json::to_value(self) {
            flatten("", &value, &mut values);
        }
        for key in SECRET_KEYS {
            if let Some(value) = values.get_mut(*key) {
                if !value.is_empty() && !value.starts_with("file:") && !value.starts_with('/') {
                    *value = "(hidden)".into();
                }
            }
        }
        values
    }

    pub fn advertised_address(&self) -> &str {
        self.advertised_address
            .as_deref()
            .unwrap_or(&self.bind_address)
    }

    pub fn storage_config(&self) -> StorageConfig {
        let storage = &self.storage;
        StorageConfig {
            flush_policy: if storage.flush_policy == "relaxed-write-only" {
                FlushPolicy::RelaxedWriteOnly {
                    fsync_interval: Duration::from_millis(storage.relaxed_fsync_interval_ms.max(1)),
                }
            } else {
                FlushPolicy::Fsync
            },
            segment_max_bytes: storage.segment_max_bytes,
            // An entry is a message plus Pulsar's frame padding.
            entry_max_bytes: self.max_message_size + meridian_broker_padding(),
            cache_max_bytes: storage.cache_max_bytes,
            pending_max_bytes_per_log: storage.pending_max_bytes_per_log,
            flush_threads: storage.flush_threads,
            cursor_persist_interval: Duration::from_millis(storage.cursor_persist_interval_ms),
            cursor_max_persisted_ranges: storage.cursor_max_persisted_ranges,
            cursor_max_ranges: storage.cursor_max_ranges,
            trim_interval: Duration::from_millis(storage.trim_interval_ms),
            recycled_segments_max: storage.recycled_segments_max,
            entry_wal: storage.entry_wal,
            entry_wal_group_wait: Duration::from_micros(storage.entry_wal_group_wait_us),
            entry_wal_group_idle: Duration::from_micros(storage.entry_wal_group_idle_us),
        }
    }

    pub fn broker_config(&self) -> BrokerConfig {
        BrokerConfig {
            cluster_name: self.cluster_name.clone(),
            broker_service_url: format!(
                "pulsar://{}:{}",
                self.advertised_address(),
                self.broker_port
            ),
            web_service_url: format!("http://{}:{}", self.advertised_address(), self.web_port),
            broker_service_url_tls: self
                .broker_port_tls
                .map(|port| format!("pulsar+ssl://{}:{port}", self.advertised_address())),
            web_service_url_tls: self
                .web_port_tls
                .map(|port| format!("https://{}:{port}", self.advertised_address())),
            allow_auto_topic_creation: self.allow_auto_topic_creation,
            auto_topic_creation_type: self.allow_auto_topic_creation_type,
            default_num_partitions: self.default_num_partitions,
            max_num_partitions_per_partitioned_topic: self.max_num_partitions_per_partitioned_topic,
            max_topics_per_namespace: self.max_topics_per_namespace,
            max_loaded_topics: self.max_loaded_topics,
            max_message_size: self.max_message_size,
            deduplication_enabled: self.deduplication_enabled,
            batch_index_ack_enabled: self.acknowledgment_at_batch_index_level_enabled,
            replication_start_earliest: self.replication_start_at == ReplicationStart::Earliest,
            replicated_subscriptions_sync_interval: std::time::Duration::from_millis(
                self.replicated_subscriptions_sync_interval_ms,
            ),
            replicated_subscriptions_state_command: self.replicated_subscriptions_state_command,
            replicated_subscriptions_state_compact: self.replicated_subscriptions_state_compact,
            replication_max_memory_bytes: self.replication_max_memory_bytes,
            max_unacked_messages_per_consumer: self.max_unacked_messages_per_consumer,
            ..BrokerConfig::default()
        }
    }

    /// The load balancer of `meridian broker`.
    pub fn balancer_config(&self) -> meridian_broker::cluster::balance::BalancerConfig {
        meridian_broker::cluster::balance::BalancerConfig {
            enabled: self.load_balancer_enabled,
            report_interval: Duration::from_secs(self.load_balancer_report_interval_seconds),
            shedding_interval: Duration::from_secs(self.load_balancer_shedding_interval_seconds),
            threshold_percentage: self.load_balancer_broker_threshold_shedder_percentage as f64,
            min_bundle_throughput: self.load_balancer_bundle_unload_min_throughput_threshold
                * 1024.0
                * 1024.0,
            grace_period: Duration::from_secs(self.load_balancer_shedding_grace_period_seconds),
        }
    }

    pub fn http_limits(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.http_max_connections,
            max_connections_per_ip: self.http_max_connections_per_ip,
            header_read_timeout: Duration::from_secs(self.http_header_read_timeout_seconds),
            body_timeout: Duration::from_secs(self.http_request_body_timeout_seconds),
            write_stall_timeout: Duration::from_secs(self.http_write_timeout_seconds),
        }
    }

    pub fn server_config(&self) -> ServerConfig {
        ServerConfig {
            max_frame_size: self.max_message_size + meridian_broker_padding(),
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_outbound_bytes: self.max_outbound_bytes_per_connection,
            keep_alive_interval: Duration::from_secs(self.keep_alive_interval_seconds),
            connect_timeout: Duration::from_secs(self.connect_timeout_seconds),
            max_pending_sends_per_producer: self.max_pending_sends_per_producer,
            max_producers_per_connection: self.max_producers_per_connection,
            max_consumers_per_connection: self.max_consumers_per_connection,
            max_subscriptions_per_topic: self.max_subscriptions_per_topic,
            max_inbound_frame_buffer_bytes: self.max_inbound_frame_buffer_bytes,
            ..ServerConfig::default()
        }
    }

    pub fn security_config(&self) -> SecurityConfig {
        SecurityConfig {
            authentication_enabled: self.authentication_enabled,
            authorization_enabled: self.authorization_enabled,
            super_user_roles: self.super_user_roles.clone(),
            replicator_roles: self.replicator_roles.clone(),
            token_secret_key: self.token_secret_key.clone(),
            token_public_key: self.token_public_key.clone(),
            token_auth_claim: self.token_auth_claim.clone(),
            token_audience: self.token_audience.clone(),
            authentication_refresh_check: Duration::from_secs(
                self.authentication_refresh_check_seconds,
            ),
            audit_log_file: self.audit_log_file.clone(),
            max_connections_per_role: self.max_connections_per_role,
            tls_authentication_enabled: self.tls_authentication_enabled,
        }
    }
}

/// What a frame and a stored entry may hold beyond `max_message_size`: Pulsar's frame padding
/// for the command and metadata, and the metadata geo-replication adds on top.
fn meridian_broker_padding() -> usize {
    meridian_wire::FRAME_SIZE_PADDING + meridian_wire::REPLICATION_METADATA_ALLOWANCE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_environment_and_errors() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("meridian.toml");
        std::fs::write(
            &path,
            "broker_port = 7000\nallow_auto_topic_creation_type = \"partitioned\"\n[storage]\nsegment_max_bytes = 67108864\n",
        )
        .expect("write");
        let environment = vec![
            ("MERIDIAN_WEB_PORT".to_string(), "9000".to_string()),
            (
                "MERIDIAN_STORAGE__FLUSH_POLICY".to_string(),
                "relaxed-write-only".to_string(),
            ),
            ("OTHER".to_string(), "ignored".to_string()),
            ("MERIDIAN_BIN".to_string(), "/not/a/key".to_string()),
            (
                "MERIDIAN_ADVERTISED_ADDRESS".to_string(),
                "broker.example".to_string(),
            ),
        ];
        let config = Config::load(Some(&path), environment.into_iter()).expect("load");
        assert_eq!(config.broker_port, 7000);
        assert_eq!(config.web_port, 9000);
        assert_eq!(config.advertised_address(), "broker.example");
        assert_eq!(
            config.allow_auto_topic_creation_type,
            AutoTopicCreationType::Partitioned
        );
        assert_eq!(config.storage.segment_max_bytes, 64 * 1024 * 1024);
        assert!(matches!(
            config.storage_config().flush_policy,
            FlushPolicy::RelaxedWriteOnly { .. }
        ));

        std::fs::write(&path, "brokr_port = 1\n").expect("write");
        let error = Config::load(Some(&path), std::iter::empty()).expect_err("unknown key");
        assert!(format!("{error:#}").contains("brokr_port"), "{error:#}");
        std::fs::write(&path, "[storage]\nflush_policy = \"sometimes\"\n").expect("write");
        let error = Config::load(Some(&path), std::iter::empty()).expect_err("bad value");
        assert!(format!("{error:#}").contains("flush_policy"), "{error:#}");
    }

    /// A storage setting out of range is refused naming the key as the operator wrote it (with
    /// its unit), not the storage engine's field; the bound itself is accepted.
    #[test]
    fn storage_settings_out_of_range_name_their_keys() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("meridian.toml");
        for (setting, key) in [
            (
                "entry_wal_group_wait_us = 3600000001",
                "storage.entry_wal_group_wait_us",
            ),
            (
                "entry_wal_group_idle_us = 3600000001",
                "storage.entry_wal_group_idle_us",
            ),
            (
                "cursor_persist_interval_ms = 0",
                "storage.cursor_persist_interval_ms",
            ),
            ("trim_interval_ms = 0", "storage.trim_interval_ms"),
        ] {
            std::fs::write(&path, format!("[storage]\n{setting}\n")).expect("write");
            let error = Config::load(Some(&path), std::iter::empty()).expect_err(setting);
            assert!(format!("{error:#}").contains(key), "{setting}: {error:#}");
        }
        std::fs::write(
            &path,
            "[storage]\nentry_wal_group_wait_us = 3600000000\nentry_wal_group_idle_us = 3600000000\n",
        )
        .expect("write");
        Config::load(Some(&path), std::iter::empty()).expect("an hour is accepted");
    }
}
