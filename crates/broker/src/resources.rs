//! Clusters, tenants, namespaces and their policies, as records in the metadata store.
//!
//! Keys: `/clusters/<name>`, `/tenants/<name>`, `/namespaces/<tenant>/<namespace>`, and
//! `/topic-policies/<tenant>/<namespace>/<topic>` for topic-level overrides. Values are JSON in
//! Pulsar's shapes (`ClusterData`, `TenantInfo`, `Policies`); fields Meridian does not interpret
//! are kept as they were written, so scripts can round-trip them.

use std::collections::BTreeMap;
use std::sync::Arc;

use meridian_metadata::{ExpectedVersion, MetadataError, MetadataStore};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{BrokerError, Result};
use crate::topic_name::{is_valid_entity_name, TopicName};

/// Pulsar's `ClusterData`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterData {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_url_tls: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_service_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_service_url_tls: Option<String>,
    #[serde(default)]
    pub peer_cluster_names: Vec<String>,
    /// Replication connections to this cluster go through this proxy when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_service_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Pulsar's `TenantInfo`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantInfo {
    #[serde(default)]
    pub admin_roles: Vec<String>,
    #[serde(default)]
    pub allowed_clusters: Vec<String>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Pulsar's `RetentionPolicies`: -1 means unlimited, 0 means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicies {
    pub retention_time_in_minutes: i64,
    #[serde(rename = "retentionSizeInMB")]
    pub retention_size_in_mb: i64,
}

/// What a backlog quota does when exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BacklogQuotaPolicy {
    ProducerRequestHold,
    ProducerException,
    ConsumerBacklogEviction,
}

/// Pulsar's `BacklogQuota`: a size (bytes) and/or an age (seconds) limit, -1 meaning none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BacklogQuota {
    #[serde(default = "unlimited", alias = "limit")]
    pub limit_size: i64,
    #[serde(default = "unlimited")]
    pub limit_time: i64,
    pub policy: BacklogQuotaPolicy,
}

fn unlimited() -> i64 {
    -1
}

/// Pulsar's `AutoTopicCreationOverride`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoTopicCreationOverride {
    pub allow_auto_topic_creation: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_num_partitions: Option<u32>,
}

/// Pulsar's `DispatchRate` (here: the replicator dispatch rate).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DispatchRate {
    /// Messages per period (0 or less: unlimited).
    #[serde(default)]
    pub dispatch_throttling_rate_in_msg: i64,
    /// Bytes per period (0 or less: unlimited).
    #[serde(default)]
    pub dispatch_throttling_rate_in_byte: i64,
    #[serde(default = "one_second")]
    pub rate_period_in_second: u32,
    #[serde(default)]
    pub relative_to_publish_rate: bool,
}

fn one_second() -> u32 {
    1
}

impl DispatchRate {
    /// Whether the rate limits anything.
    pub fn is_limited(&self) -> bool {
        self.dispatch_throttling_rate_in_msg > 0 || self.dispatch_throttling_rate_in_byte > 0
    }
}

/// Pulsar's namespace `Policies` (the fields Meridian enforces; the rest are kept as written).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Policies {
    #[serde(default)]
    pub replication_clusters: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policies: Option<RetentionPolicies>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl_in_seconds: Option<i64>,
    #[serde(default)]
    pub backlog_quota_map: BTreeMap<String, BacklogQuota>,
    #[serde(
        rename = "deduplicationEnabled",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub deduplication_enabled: Option<bool>,
    #[serde(
        rename = "autoTopicCreationOverride",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub auto_topic_creation_override: Option<AutoTopicCreationOverride>,
    /// Replicator dispatch rates, keyed by the cluster they apply in.
    #[serde(
        rename = "replicatorDispatchRate",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub replicator_dispatch_rate: BTreeMap<String, DispatchRate>,
    /// How often replicated subscriptions sync between clusters (Meridian's own policy).
    #[serde(
        rename = "replicatedSubscriptionSyncIntervalMs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub replicated_subscription_sync_interval_ms: Option<u64>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

/// Topic-level overrides of namespace policies (Pulsar's `TopicPolicies`, the fields Meridian
/// enforces).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicPolicies {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_clusters: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_policies: Option<RetentionPolicies>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_ttl_in_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub backlog_quota_map: BTreeMap<String, BacklogQuota>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplication_enabled: Option<bool>,
}

/// The policies in force for one topic: topic overrides, else namespace policies, else broker
/// defaults (applied by the caller).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EffectivePolicies {
    pub replication_clusters: Vec<String>,
    pub retention: Option<RetentionPolicies>,
    pub message_ttl_seconds: Option<i64>,
    pub backlog_quotas: BTreeMap<String, BacklogQuota>,
    pub deduplication_enabled: Option<bool>,
    /// The namespace's replicator dispatch rates by cluster.
    pub replicator_dispatch_rate: BTreeMap<String, DispatchRate>,
    /// The namespace's replicated-subscription sync interval, if it sets one.
    pub replicated_subscription_sync_interval_ms: Option<u64>,
}

fn not_found(what: &str, name: &str) -> BrokerError {
    BrokerError::NotFound(format!("{what} {name} does not exist"))
}

/// Typed access to the cluster, tenant and namespace records.
pub struct Resources {
    metadata: Arc<dyn MetadataStore>,
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|error| BrokerError::Metadata(format!("record {key} is unreadable: {error}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|error| BrokerError::Metadata(error.to_string()))
}

fn validate_name(what: &str, name: &str) -> Result<()> {
    if is_valid_entity_name(name) {
        Ok(())
    } else {
        Err(BrokerError::PreconditionFailed(format!(
            "invalid {what} name {name:?}: use letters, digits and -_=:."
        )))
    }
}

impl Resources {
    pub fn new(metadata: Arc<dyn MetadataStore>) -> Resources {
        Resources { metadata }
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.metadata.get(key)? {
            Some(stored) => decode(key, &stored.value).map(Some),
            None => Ok(None),
        }
    }

    fn create<T: Serialize>(&self, key: &str, value: &T, what: &str, name: &str) -> Result<()> {
        match self
            .metadata
            .put(key, &encode(value)?, ExpectedVersion::Absent)
        {
            Ok(_) => Ok(()),
            Err(MetadataError::BadVersion { .. }) => Err(BrokerError::AlreadyExists(format!(
                "{what} {name} already exists"
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// Reads, changes and writes back a record, retrying if it changed concurrently.
    fn update<T: Serialize + DeserializeOwned>(
        &self,
        key: &str,
        what: &str,
        name: &str,
        mut change: impl FnMut(&mut T) -> Result<()>,
    ) -> Result<T> {
        loop {
            let stored = self
                .metadata
                .get(key)?
                .ok_or_else(|| not_found(what, name))?;
            let mut value: T = decode(key, &stored.value)?;
            change(&mut value)?;
            match self.metadata.put(
                key,
                &encode(&value)?,
                ExpectedVersion::Exactly(stored.version),
            ) {
                Ok(_) => return Ok(value),
                Err(MetadataError::BadVersion { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }

    fn list(&self, parent: &str) -> Result<Vec<String>> {
        Ok(self.metadata.children(parent)?)
    }

    // Clusters.

    pub fn clusters(&self) -> Result<Vec<String>> {
        self.list("/clusters")
    }

    pub fn cluster(&self, name: &str) -> Result<ClusterData> {
        self.get(&format!("/clusters/{name}"))?
            .ok_or_else(|| not_found("cluster", name))
    }

    pub fn create_cluster(&self, name: &str, data: &ClusterData) -> Result<()> {
        validate_name("cluster", name)?;
        validate_cluster_urls(data)?;
        self.create(&format!("/clusters/{name}"), data, "cluster", name)
    }

    pub fn update_cluster(&self, name: &str, data: &ClusterData) -> Result<()> {
        validate_cluster_urls(data)?;
        self.update(
            &format!("/clusters/{name}"),
            "cluster",
            name,
            |stored: &mut ClusterData| {
                *stored = data.clone();
                Ok(())
            },
        )?;
        Ok(())
    }

    pub fn delete_cluster(&self, name: &str) -> Result<()> {
        self.cluster(name)?;
        for tenant in self.tenants()? {
            if self
                .tenant(&tenant)?
                .allowed_clusters
                .iter()
                .any(|cluster| cluster == name)
            {
                return Err(BrokerError::PreconditionFailed(format!(
                    "cluster {name} is still allowed for tenant {tenant}"
                )));
            }
        }
        self.metadata
            .delete(&format!("/clusters/{name}"), ExpectedVersion::Any)?;
        Ok(())
    }

    // Tenants.

    pub fn tenants(&self) -> Result<Vec<String>> {
        self.list("/tenants")
    }

    pub fn tenant(&self, name: &str) -> Result<TenantInfo> {
        self.get(&format!("/tenants/{name}"))?
            .ok_or_else(|| not_found("tenant", name))
    }

    fn check_clusters_exist(&self, clusters: &[String]) -> Result<()> {
        let known = self.clusters()?;
        for cluster in clusters {
            if !known.contains(cluster) {
                return Err(BrokerError::PreconditionFailed(format!(
                    "cluster {cluster} does not exist"
                )));
            }
        }
        Ok(())
    }

    pub fn create_tenant(&self, name: &str, info: &TenantInfo) -> Result<()> {
        validate_name("tenant", name)?;
        self.check_clusters_exist(&info.allowed_clusters)?;
        self.create(&format!("/tenants/{name}"), info, "tenant", name)
    }

    pub fn update_tenant(&self, name: &str, info: &TenantInfo) -> Result<()> {
        self.check_clusters_exist(&info.allowed_clusters)?;
        let namespaces = self.namespaces(name)?;
        self.update(&format!("/tenants/{name}"), "tenant", name, |stored: &mut TenantInfo| {
            let removed: Vec<&String> = stored
                .allowed_clusters
                .iter()
                .filter(|cluster| !info.allowed_clusters.contains(cluster))
                .collect();
            if !removed.is_empty() && !namespaces.is_empty() {
                return Err(BrokerError::PreconditionFailed(format!(
                    "clusters {removed:?} cannot be removed from tenant {name} while it has namespaces"
                )));
            }
            *stored = info.clone();
            Ok(())
        })?;
        Ok(())
    }

    pub fn delete_tenant(&self, name: &str) -> Result<()> {
        self.tenant(name)?;
        if !self.namespaces(name)?.is_empty() {
            return Err(BrokerError::Conflict(format!(
                "tenant {name} still has namespaces"
            )));
        }
        self.metadata
            .delete(&format!("/tenants/{name}"), ExpectedVersion::Any)?;
        Ok(())
    }

    // Namespaces.

    /// Namespaces of a tenant, as `tenant/namespace`.
    pub fn namespaces(&self, tenant: &str) -> Result<Vec<String>> {
        Ok(self
            .list(&format!("/namespaces/{tenant}"))?
            .into_iter()
            .map(|namespace| format!("{tenant}/{namespace}"))
            .collect())
    }

    pub fn namespace_exists(&self, tenant: &str, namespace: &str) -> Result<bool> {
        Ok(self
            .metadata
            .get(&format!("/namespaces/{tenant}/{namespace}"))?
            .is_some())
    }

    pub fn policies(&self, tenant: &str, namespace: &str) -> Result<Policies> {
        self.get(&format!("/namespaces/{tenant}/{namespace}"))?
            .ok_or_else(|| not_found("namespace", &format!("{tenant}/{namespace}")))
    }

    pub fn create_namespace(
        &self,
        tenant: &str,
        namespace: &str,
        policies: &Policies,
    ) -> Result<()> {
        let info = self.tenant(tenant)?;
        validate_name("namespace", namespace)?;
        self.check_replication_clusters(&info, tenant, &policies.replication_clusters)?;
        self.create(
            &format!("/namespaces/{tenant}/{namespace}"),
            policies,
            "namespace",
            &format!("{tenant}/{namespace}"),
        )
    }

    fn check_replication_clusters(
        &self,
        info: &TenantInfo,
        tenant: &str,
        clusters: &[String],
    ) -> Result<()> {
        self.check_clusters_exist(clusters)?;
        for cluster in clusters {
            if !info.allowed_clusters.contains(cluster) {
                return Err(BrokerError::PreconditionFailed(format!(
                    "cluster {cluster} is not in the allowed clusters of tenant {tenant}"
                )));
            }
        }
        Ok(())
    }

    /// Changes a namespace's policies.
    pub fn update_policies(
        &self,
        tenant: &str,
        namespace: &str,
        change: impl FnMut(&mut Policies) -> Result<()>,
    ) -> Result<Policies> {
        self.update(
            &format!("/namespaces/{tenant}/{namespace}"),
            "namespace",
            &format!("{tenant}/{namespace}"),
            change,
        )
    }

    pub fn set_replication_clusters(
        &self,
        tenant: &str,
        namespace: &str,
        clusters: Vec<String>,
    ) -> Result<()> {
        let info = self.tenant(tenant)?;
        self.check_replication_clusters(&info, tenant, &clusters)?;
        self.update_policies(tenant, namespace, |policies| {
            policies.replication_clusters = clusters.clone();
            Ok(())
        })?;
        Ok(())
    }

    pub fn delete_namespace(&self, tenant: &str, namespace: &str) -> Result<()> {
        self.policies(tenant, namespace)?;
        self.metadata.delete(
            &format!("/namespaces/{tenant}/{namespace}"),
            ExpectedVersion::Any,
        )?;
        Ok(())
    }

    // Topic-level policies.

    fn topic_policies_key(topic: &TopicName) -> String {
        let base = topic.base();
        format!(
            "/topic-policies/{}/{}/{}",
            base.tenant, base.namespace, base.local
        )
    }

    pub fn topic_policies(&self, topic: &TopicName) -> Result<TopicPolicies> {
        Ok(self
            .get(&Self::topic_policies_key(topic))?
            .unwrap_or_default())
    }

    pub fn update_topic_policies(
        &self,
        topic: &TopicName,
        mut change: impl FnMut(&mut TopicPolicies),
    ) -> Result<()> {
        let key = Self::topic_policies_key(topic);
        loop {
            let stored = self.metadata.get(&key)?;
            let (mut policies, expected) = match &stored {
                Some(stored) => (
                    decode::<TopicPolicies>(&key, &stored.value)?,
                    ExpectedVersion::Exactly(stored.version),
                ),
                None => (TopicPolicies::default(), ExpectedVersion::Absent),
            };
            change(&mut policies);
            match self.metadata.put(&key, &encode(&policies)?, expected) {
                Ok(_) => return Ok(()),
                Err(MetadataError::BadVersion { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }

    pub fn delete_topic_policies(&self, topic: &TopicName) -> Result<()> {
        self.metadata
            .delete(&Self::topic_policies_key(topic), ExpectedVersion::Any)?;
        Ok(())
    }

    /// Topic overrides over namespace policies.
    pub fn effective_policies(&self, topic: &TopicName) -> Result<EffectivePolicies> {
        let namespace = self
            .get::<Policies>(&format!("/namespaces/{}/{}", topic.tenant, topic.namespace))?
            .unwrap_or_default();
        let overrides = self.topic_policies(topic)?;
        let mut backlog_quotas = namespace.backlog_quota_map.clone();
        backlog_quotas.extend(overrides.backlog_quota_map.clone());
        Ok(EffectivePolicies {
            replication_clusters: overrides
                .replication_clusters
                .clone()
                .unwrap_or(namespace.replication_clusters.clone()),
            retention: overrides
                .retention_policies
                .or(namespace.retention_policies),
            message_ttl_seconds: overrides
                .message_ttl_in_seconds
                .or(namespace.message_ttl_in_seconds),
            backlog_quotas,
            deduplication_enabled: overrides
                .deduplication_enabled
                .or(namespace.deduplication_enabled),
            replicator_dispatch_rate: namespace.replicator_dispatch_rate,
            replicated_subscription_sync_interval_ms: namespace
                .replicated_subscription_sync_interval_ms,
        })
    }
}

fn validate_cluster_urls(data: &ClusterData) -> Result<()> {
    let checks = [
        (
            &data.service_url,
            &["http://", "https://"][..],
            "serviceUrl",
        ),
        (&data.service_url_tls, &["https://"][..], "serviceUrlTls"),
        (
            &data.broker_service_url,
            &["pulsar://"][..],
            "brokerServiceUrl",
        ),
        (
            &data.broker_service_url_tls,
            &["pulsar+ssl://"][..],
            "brokerServiceUrlTls",
        ),
        (
            &data.proxy_service_url,
            &["pulsar://", "pulsar+ssl://"][..],
            "proxyServiceUrl",
        ),
    ];
    for (value, schemes, field) in checks {
        if let Some(url) = value {
            if !url.is_empty() && !schemes.iter().any(|scheme| url.starts_with(scheme)) {
                return Err(BrokerError::BadRequest(format!(
                    "{field} {url:?} must start with {}",
                    schemes.join(" or ")
                )));
            }
        }
    }
    Ok(())
}
