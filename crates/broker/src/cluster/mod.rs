//! Cluster mode: this broker's membership of a cluster on etcd and the namespace bundles it owns
//! (issue 17; `docs/cluster.md`, "Built: brokers on etcd").
//!
//! - The broker registers as `brokers/<id>` on a lease ([`meridian_etcd::Session`]) with its
//!   URLs ([`Registration`]).
//! - A topic belongs to a bundle of its namespace ([`bundles`]). The broker serves a topic only
//!   while it owns the topic's bundle: [`ClusterMode::ensure_owned`] (called by
//!   `Broker::topic`) takes an unowned bundle and refuses one another broker owns.
//! - [`ClusterMode::lookup`] answers LOOKUP, `/lookup/v2` and the admin redirects: this broker
//!   (taking the bundle if nobody owns it) or the owner's registration.
//! - [`watch_lease`]: when the lease is lost the broker drops every bundle at once, closes the
//!   clients of every loaded topic (they look the topic up again), and registers anew.
//!
//! - [`ClusterMode::unload_bundle`]: the admin API's unload (namespace or bundle) on the
//!   owner: stop serving the bundle, close its topics (cursors persisted), release it.
//!
//! What is not here yet: no load balancing (a lookup of an unowned bundle takes it here), no
//! split of bundles.

pub mod bundles;
pub mod logs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use meridian_etcd::{
    Acquire, Cluster, EtcdError, LeaseLost, OwnerRecord, Ownership, Session, SessionOptions,
};
use serde::{Deserialize, Serialize};

use crate::error::{BrokerError, Result};
use crate::topic_name::TopicName;
use crate::Broker;

/// The value of `brokers/<id>`: where clients and other brokers reach this broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    pub broker_service_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_service_url_tls: Option<String>,
    pub web_service_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_service_url_tls: Option<String>,
    /// Meridian's version.
    #[serde(default)]
    pub version: String,
    /// When the broker started, ms since the Unix epoch.
    #[serde(default)]
    pub start_timestamp: u64,
}

/// Who serves a topic's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This broker (it owns the bundle now).
    This,
    /// Another live broker.
    Other {
        broker_id: String,
        registration: Registration,
    },
}

/// This broker's place in a cluster: its session (lease and registration) and the bundles it
/// owns under that session.
pub struct ClusterMode {
    cluster: Cluster,
    broker_id: String,
    registration: Vec<u8>,
    session_options: SessionOptions,
    bundles_per_namespace: u32,
    session: RwLock<Option<Arc<Session>>>,
    /// Bundles owned under the current session. Cleared when the session is lost.
    owned: Mutex<HashMap<String, Ownership>>,
    /// Held (on a blocking thread) while a bundle's owner is read and taken, so two requests
    /// of this broker never race each other for one bundle.
    acquiring: Mutex<()>,
    /// With `--storage`: topics' entries and cursors on the object store and etcd. Without,
    /// each broker keeps its topics in its own local storage.
    logs: Option<Arc<logs::ClusterLogs>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An etcd failure as the broker reports it: clients retry (ServiceNotReady, HTTP 503).
fn unavailable(error: EtcdError) -> BrokerError {
    BrokerError::NotServedHere(format!("cluster metadata unavailable: {error}"))
}

impl ClusterMode {
    /// Registers `broker_id` in `cluster` on a lease of `lease_ttl`. An id still registered by
    /// a previous run (killed less than a TTL ago) is waited for, up to twice the TTL.
    /// Blocking.
    pub fn join(
        cluster: Cluster,
        broker_id: &str,
        registration: &Registration,
        lease_ttl: Duration,
        bundles_per_namespace: u32,
        logs: Option<Arc<logs::ClusterLogs>>,
    ) -> std::result::Result<Arc<ClusterMode>, EtcdError> {
        let mode = ClusterMode {
            cluster,
            broker_id: broker_id.to_string(),
            registration: serde_json::to_vec(registration).unwrap_or_default(),
            session_options: SessionOptions {
                ttl: lease_ttl,
                keepalive_interval: None,
            },
            bundles_per_namespace: bundles_per_namespace.clamp(1, bundles::MAX_BUNDLES),
            session: RwLock::new(None),
            owned: Mutex::new(HashMap::new()),
            acquiring: Mutex::new(()),
            logs,
        };
        let deadline = std::time::Instant::now() + lease_ttl * 2;
        loop {
            match mode.start_session() {
                Ok(()) => return Ok(Arc::new(mode)),
                Err(EtcdError::AlreadyRegistered { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    tracing::info!(
                        broker_id,
                        "broker id still registered by an earlier run; waiting for its lease to expire"
                    );
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn start_session(&self) -> std::result::Result<(), EtcdError> {
        let session = self.cluster.start_session(
            &self.broker_id,
            &self.registration,
            self.session_options.clone(),
        )?;
        let session = Arc::new(session);
        if let Some(logs) = &self.logs {
            if let Err(error) = logs.start_engine(self.cluster.clone(), session.clone()) {
                tracing::error!(%error, "the object-store log did not start; topics cannot be served");
            }
        }
        *self
            .session
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(session);
        Ok(())
    }

    /// The object-store side, with `--storage`.
    pub fn logs(&self) -> Option<&Arc<logs::ClusterLogs>> {
        self.logs.as_ref()
    }

    /// Stops serving `bundle` (a commit found another owner). Its topics are unloaded by the
    /// caller.
    pub(crate) fn forget_bundle(&self, bundle: &str) {
        lock(&self.owned).remove(bundle);
    }

    /// Deletes `topic`'s object-store log and cursors (`--storage` only), under this broker's
    /// ownership of its bundle. Blocking.
    pub(crate) fn delete_log(&self, logs: &logs::ClusterLogs, topic: &str) -> Result<()> {
        let name = TopicName::parse(topic)?;
        let bundle = self.bundle_of(&name);
        let session = self.live_session();
        let ownership = lock(&self.owned).get(&bundle).cloned();
        match (ownership, session) {
            (Some(ownership), Some(session)) => {
                logs.delete(&self.cluster, &session, topic, &ownership)
            }
            _ => Err(BrokerError::NotServedHere(format!(
                "topic {topic}: this broker does not own bundle {bundle}; look it up again"
            ))),
        }
    }

    /// Opens `topic`'s log on the object store under this broker's ownership of its bundle
    /// (`--storage` only). Blocking.
    pub(crate) fn open_log(
        &self,
        logs: &logs::ClusterLogs,
        storage: &meridian_storage::Storage,
        topic: &str,
    ) -> Result<Arc<meridian_storage::Log>> {
        let name = TopicName::parse(topic)?;
        let bundle = self.bundle_of(&name);
        let ownership = match (lock(&self.owned).get(&bundle).cloned(), self.live_session()) {
            (Some(ownership), Some(_)) => ownership,
            _ => {
                return Err(BrokerError::NotServedHere(format!(
                    "topic {topic}: this broker does not own bundle {bundle}; look it up again"
                )))
            }
        };
        logs.open(storage, &self.cluster, topic, ownership)
    }

    pub fn broker_id(&self) -> &str {
        &self.broker_id
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The current session if its lease is alive.
    fn live_session(&self) -> Option<Arc<Session>> {
        self.session
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .filter(|session| session.is_alive())
    }

    /// The bundle `topic` belongs to.
    pub fn bundle_of(&self, topic: &TopicName) -> String {
        bundles::bundle_of(topic, self.bundles_per_namespace)
    }

    /// The bundles this broker owns now, sorted.
    pub fn owned_bundles(&self) -> Vec<String> {
        let mut bundles: Vec<String> = lock(&self.owned).keys().cloned().collect();
        bundles.sort();
        bundles
    }

    fn owns(&self, bundle: &str) -> bool {
        lock(&self.owned).contains_key(bundle) && self.live_session().is_some()
    }

    /// Succeeds when this broker may serve `topic`: it owns the topic's bundle, or took it now
    /// because nobody did. Another owner (or etcd out of reach) is `NotServedHere`
    /// (ServiceNotReady): the client looks the topic up again and is sent to the owner.
    pub async fn ensure_owned(self: &Arc<Self>, broker: &Broker, topic: &TopicName) -> Result<()> {
        match self.lookup(broker, topic).await? {
            Owner::This => Ok(()),
            Owner::Other { broker_id, .. } => Err(BrokerError::NotServedHere(format!(
                "topic {topic} is in bundle {}, owned by broker {broker_id}; look it up again",
                self.bundle_of(topic)
            ))),
        }
    }

    /// Who serves `topic`: its bundle's owner, or this broker, which takes the bundle if nobody
    /// owns it. A namespace that does not exist is `TopicNotFound` (no bundle of it is taken).
    pub async fn lookup(self: &Arc<Self>, broker: &Broker, topic: &TopicName) -> Result<Owner> {
        let bundle = self.bundle_of(topic);
        if self.owns(&bundle) {
            return Ok(Owner::This);
        }
        if !broker
            .resources()
            .namespace_exists(&topic.tenant, &topic.namespace)?
        {
            return Err(BrokerError::TopicNotFound(format!(
                "topic {topic} does not exist: namespace {} does not exist",
                topic.namespace_name()
            )));
        }
        self.resolve(bundle).await
    }

    async fn resolve(self: &Arc<Self>, bundle: String) -> Result<Owner> {
        let mode = self.clone();
        tokio::task::spawn_blocking(move || mode.resolve_blocking(&bundle))
            .await
            .map_err(|error| BrokerError::Unknown(format!("bundle lookup task failed: {error}")))?
    }

    fn resolve_blocking(&self, bundle: &str) -> Result<Owner> {
        let _serialized = lock(&self.acquiring);
        let session = self.live_session().ok_or_else(|| {
            BrokerError::NotServedHere(format!(
                "broker {} has no live etcd session (lease lost; registering again)",
                self.broker_id
            ))
        })?;
        if lock(&self.owned).contains_key(bundle) {
            return Ok(Owner::This);
        }
        let record = match self.cluster.owner(bundle).map_err(unavailable)? {
            Some(record) => record,
            None => match session.try_acquire(bundle).map_err(unavailable)? {
                Acquire::Acquired(ownership) => {
                    tracing::info!(
                        bundle,
                        epoch = ownership.epoch(),
                        "bundle acquired: this broker serves its topics"
                    );
                    lock(&self.owned).insert(bundle.to_string(), ownership);
                    return Ok(Owner::This);
                }
                Acquire::Owned(record) => record,
            },
        };
        self.other_owner(bundle, record)
    }

    fn other_owner(&self, bundle: &str, record: OwnerRecord) -> Result<Owner> {
        if record.broker_id == self.broker_id {
            // Ours but not served: being unloaded (released once its topics are closed), or
            // held under an earlier session whose lease has not expired yet (a restart within
            // the TTL). Nobody may serve it until the key goes.
            return Err(BrokerError::NotServedHere(format!(
                "bundle {bundle} is still held by this broker (epoch {}) while it is unloaded, \
                 or by an earlier session of it until that lease expires; look it up again",
                record.epoch
            )));
        }
        let key = self.cluster.key(&format!("brokers/{}", record.broker_id));
        let registration = self
            .cluster
            .client()
            .get(&key)
            .map_err(unavailable)?
            .ok_or_else(|| {
                BrokerError::NotServedHere(format!(
                    "bundle {bundle}: its owner {} is no longer registered; retry",
                    record.broker_id
                ))
            })?;
        let registration: Registration =
            serde_json::from_slice(&registration.value).map_err(|error| {
                BrokerError::Metadata(format!("{key} holds no broker registration: {error}"))
            })?;
        Ok(Owner::Other {
            broker_id: record.broker_id,
            registration,
        })
    }

    /// The bundles of a namespace (`tenant/namespace/0xLLLLLLLL_0xUUUUUUUU`), in hash order.
    pub fn bundles_of_namespace(&self, tenant: &str, namespace: &str) -> Vec<String> {
        bundles::bundles_of_namespace(tenant, namespace, self.bundles_per_namespace)
    }

    /// Who owns `bundle` now, without taking it: `None` when nobody does (nothing to unload),
    /// or when the owner key is this broker's from an earlier session (nothing is loaded under
    /// it; it goes with that session's lease).
    pub async fn bundle_owner(self: &Arc<Self>, bundle: &str) -> Result<Option<Owner>> {
        if self.owns(bundle) {
            return Ok(Some(Owner::This));
        }
        let mode = self.clone();
        let bundle = bundle.to_string();
        tokio::task::spawn_blocking(move || {
            let _serialized = lock(&mode.acquiring);
            if mode.owns(&bundle) {
                return Ok(Some(Owner::This));
            }
            match mode.cluster.owner(&bundle).map_err(unavailable)? {
                None => Ok(None),
                Some(record) if record.broker_id == mode.broker_id => Ok(None),
                Some(record) => mode.other_owner(&bundle, record).map(Some),
            }
        })
        .await
        .map_err(|error| BrokerError::Unknown(format!("bundle lookup task failed: {error}")))?
    }

    /// Unloads `bundle` if this broker owns it, as Pulsar's bundle unload does: the bundle is
    /// forgotten first (no new producer, consumer or lookup is served for it: they get
    /// `ServiceNotReady` and look up again), then every loaded topic of it is unloaded (its
    /// producers and consumers closed, its pending appends committed or failed retriably, its
    /// cursors and de-duplication snapshot persisted to etcd under the still-held ownership),
    /// then the owner key is released so that the next lookup assigns the bundle anew (epoch +
    /// 1). Returns whether this broker owned it. When the release fails (etcd out of reach) the
    /// broker keeps the bundle and serves it again, and the error is returned.
    pub async fn unload_bundle(self: &Arc<Self>, broker: &Broker, bundle: &str) -> Result<bool> {
        let Some(ownership) = lock(&self.owned).remove(bundle) else {
            return Ok(false);
        };
        tracing::info!(
            bundle,
            epoch = ownership.epoch(),
            "unloading bundle: closing its topics, then releasing it"
        );
        let topics = self.unload_topics_of(broker, bundle).await;
        let mode = self.clone();
        let held = ownership.clone();
        let released = tokio::task::spawn_blocking(move || match mode.live_session() {
            // Without a live session the owner key goes (or went) with the lease.
            None => Ok(false),
            Some(session) => session.release(&held).map_err(unavailable),
        })
        .await
        .map_err(|error| BrokerError::Unknown(format!("bundle release task failed: {error}")))
        .and_then(|released| released);
        if let Err(error) = released {
            tracing::warn!(bundle, %error, "releasing the unloaded bundle failed; still serving it");
            lock(&self.owned).insert(bundle.to_string(), ownership);
            return Err(error);
        }
        // A topic whose load was under way when the bundle was forgotten: it can commit nothing
        // more (fenced), so it goes too.
        let late = self.unload_topics_of(broker, bundle).await;
        tracing::info!(
            bundle,
            topics = topics + late,
            "bundle unloaded and released; the next lookup assigns it"
        );
        Ok(true)
    }

    async fn unload_topics_of(&self, broker: &Broker, bundle: &str) -> usize {
        let topics: Vec<TopicName> = broker
            .loaded_topics()
            .into_iter()
            .map(|topic| topic.name.clone())
            .filter(|name| self.bundle_of(name) == bundle)
            .collect();
        for name in &topics {
            broker.unload(name).await;
        }
        topics.len()
    }

    /// The ids of the brokers registered in the cluster now (live leases), sorted. Blocking.
    pub fn registered_brokers(&self) -> Result<Vec<String>> {
        let prefix = self.cluster.key("brokers/");
        let mut ids = Vec::new();
        self.cluster
            .client()
            .scan_prefix(&prefix, 1000, true, |page| {
                ids.extend(
                    page.iter()
                        .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string)),
                );
            })
            .map_err(unavailable)?;
        Ok(ids)
    }

    /// Forgets every bundle (the lease is gone, so are the owner keys) and the session.
    fn drop_all(&self) -> usize {
        let dropped = lock(&self.owned).drain().count();
        self.session
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        dropped
    }

    /// Revokes the lease (at shutdown), releasing every bundle at once. Blocking.
    pub fn leave(&self) {
        lock(&self.owned).clear();
        let session = self
            .session
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(session) = session.and_then(Arc::into_inner) {
            if let Err(error) = session.close() {
                tracing::warn!(%error, "revoking the etcd lease failed; it expires by itself");
            }
        }
    }
}

/// Watches the session's lease. When it is lost the broker stops serving every bundle at once:
/// ownership is forgotten first (no new producer, consumer or lookup is served), then every
/// loaded topic is unloaded, closing its producers and consumers so that clients look their
/// topics up again. Then it registers anew (a new session), retrying every second.
pub async fn watch_lease(broker: Arc<Broker>, mode: Arc<ClusterMode>) {
    loop {
        let Some(session) = mode.live_session() else {
            rejoin(&mode).await;
            continue;
        };
        let mut lost = session.lost();
        drop(session);
        let reason = match lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            Err(_) => None,
        };
        if matches!(reason, Some(LeaseLost::Closed) | None) {
            return; // shutting down: `leave` revoked the lease
        }
        let bundles = mode.drop_all();
        let topics = broker.loaded_topics();
        tracing::error!(
            reason = ?reason,
            bundles,
            topics = topics.len(),
            "etcd lease lost: no longer serving any bundle; closing the clients of every topic"
        );
        for topic in topics {
            broker.unload(&topic.name).await;
        }
        rejoin(&mode).await;
    }
}

async fn rejoin(mode: &Arc<ClusterMode>) {
    loop {
        let attempt = mode.clone();
        match tokio::task::spawn_blocking(move || attempt.start_session()).await {
            Ok(Ok(())) => {
                tracing::info!(broker_id = mode.broker_id(), "registered in etcd again");
                return;
            }
            Ok(Err(error)) => tracing::warn!(%error, "registering in etcd again failed; retrying"),
            Err(error) => tracing::warn!(%error, "registration task failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps loaded topics' policies current when another broker's admin API changes them: every
/// namespace or topic-policy record written in the shared metadata store re-reads the policies
/// of the loaded topics of that namespace (as an admin call on this broker does).
pub async fn watch_policies(broker: Arc<Broker>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut changes = broker.metadata().watch();
    loop {
        let key = match changes.recv().await {
            Ok(change) => change.key,
            Err(RecvError::Lagged(_)) => {
                // Missed changes: re-read everything loaded.
                let mut tenants: Vec<String> = broker
                    .loaded_topics()
                    .iter()
                    .map(|topic| topic.name.tenant.clone())
                    .collect();
                tenants.dedup();
                for tenant in tenants {
                    broker.policies_changed(&tenant, None).await;
                }
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let mut parts = key.trim_start_matches('/').split('/');
        let (Some(kind), Some(tenant), Some(namespace)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if matches!(kind, "namespaces" | "topic-policies") {
            broker.policies_changed(tenant, Some(namespace)).await;
        }
    }
}
