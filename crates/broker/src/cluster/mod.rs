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
//! - [`ClusterMode::split_bundle`]: cut a bundle in two equal halves: as an unload, then the
//!   namespace's new boundaries (`bundles/<tenant>/<ns>`) written with the release in one
//!   fenced transaction. Lookups compute a topic's bundle from the boundaries (cached per
//!   namespace) and take a bundle only under a compare of their revision, so a stale view
//!   cannot take a bundle that was split.
//!
//! - [`balance`]: load reports, the leader and bundle shedding; a lookup of a bundle nobody
//!   owns takes it here unless the load balancer assigned it to another live broker.

pub mod balance;
pub mod bundles;
pub mod logs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use meridian_etcd::{
    Acquire, Cluster, Compare, EtcdError, LeaseLost, Op, OwnerRecord, Ownership, Session,
    SessionOptions,
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

impl Registration {
    /// The web service URL to send a client to: the HTTPS one when the client came over TLS
    /// (and the broker has one), so that a redirect never moves a request and its
    /// credentials from HTTPS to plain HTTP.
    pub fn web_url(&self, over_tls: bool) -> &str {
        match (&self.web_service_url_tls, over_tls) {
            (Some(url), true) => url,
            _ => &self.web_service_url,
        }
    }
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

/// A namespace's bundle boundaries and the `mod_revision` of `bundles/<tenant>/<ns>` they were
/// read at (0: the key is absent, the namespace has the default equal bundles).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Boundaries {
    bounds: Vec<u32>,
    revision: u64,
}

/// The value of `bundles/<tenant>/<ns>`, written by a bundle split.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredBoundaries {
    boundaries: Vec<u32>,
}

fn boundaries_key(tenant: &str, namespace: &str) -> String {
    format!("bundles/{tenant}/{namespace}")
}

impl Boundaries {
    /// The acquisition condition: the boundaries are still these.
    fn unchanged(&self, key: &str) -> Compare {
        match self.revision {
            0 => Compare::Absent(key.to_string()),
            revision => Compare::ModRevision(key.to_string(), revision),
        }
    }
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
    /// Each namespace's bundle boundaries as last read from `bundles/<tenant>/<ns>` (absent:
    /// the default equal bundles). A stale entry is harmless: a bundle is taken only under a
    /// compare of the boundaries' revision, and a failed compare re-reads them.
    boundaries: Mutex<HashMap<String, Boundaries>>,
    /// With `--storage`: topics' entries and cursors on the object store and etcd. Without,
    /// each broker keeps its topics in its own local storage.
    logs: Option<Arc<logs::ClusterLogs>>,
    /// The load balancer's settings, once it runs (for how long its assignments stand).
    balancer: Mutex<balance::BalancerConfig>,
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
            boundaries: Mutex::new(HashMap::new()),
            logs,
            balancer: Mutex::new(balance::BalancerConfig::default()),
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
        let session = self.live_session();
        match (self.owned_bundle_of(&name), session) {
            (Some(ownership), Some(session)) => {
                logs.delete(&self.cluster, &session, topic, &ownership)
            }
            _ => Err(BrokerError::NotServedHere(format!(
                "topic {topic}: this broker does not own its bundle; look it up again"
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
        let ownership = match (self.owned_bundle_of(&name), self.live_session()) {
            (Some(ownership), Some(_)) => ownership,
            _ => {
                return Err(BrokerError::NotServedHere(format!(
                    "topic {topic}: this broker does not own its bundle; look it up again"
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

    /// The ownership of the bundle holding `topic`, if this broker owns it. (An owned bundle
    /// is always one of the namespace's current bundles: only its owner splits it.)
    fn owned_bundle_of(&self, topic: &TopicName) -> Option<Ownership> {
        lock(&self.owned)
            .iter()
            .find(|(bundle, _)| bundles::bundle_holds(bundle, topic))
            .map(|(_, ownership)| ownership.clone())
    }

    /// A namespace's bundle boundaries: cached, or read from etcd (`fresh`, or not cached).
    /// Blocking.
    fn boundaries(&self, tenant: &str, namespace: &str, fresh: bool) -> Result<Boundaries> {
        let name = format!("{tenant}/{namespace}");
        if !fresh {
            if let Some(cached) = lock(&self.boundaries).get(&name) {
                return Ok(cached.clone());
            }
        }
        let key = self.cluster.key(&boundaries_key(tenant, namespace));
        let read = match self.cluster.client().get(&key).map_err(unavailable)? {
            None => Boundaries {
                bounds: bundles::default_boundaries(self.bundles_per_namespace),
                revision: 0,
            },
            Some(kv) => {
                let stored: StoredBoundaries =
                    serde_json::from_slice(&kv.value).map_err(|error| {
                        BrokerError::Metadata(format!("{key} holds no bundle boundaries: {error}"))
                    })?;
                if !bundles::valid_boundaries(&stored.boundaries) {
                    return Err(BrokerError::Metadata(format!(
                        "{key} holds invalid bundle boundaries {:?}",
                        stored.boundaries
                    )));
                }
                Boundaries {
                    bounds: stored.boundaries,
                    revision: kv.mod_revision,
                }
            }
        };
        lock(&self.boundaries).insert(name, read.clone());
        Ok(read)
    }

    /// The bundles of a namespace (`tenant/namespace/0xLLLLLLLL_0xUUUUUUUU`), in hash order,
    /// as etcd holds them now.
    pub async fn bundles_of_namespace(
        self: &Arc<Self>,
        tenant: &str,
        namespace: &str,
    ) -> Result<Vec<String>> {
        let mode = self.clone();
        let (tenant, namespace) = (tenant.to_string(), namespace.to_string());
        tokio::task::spawn_blocking(move || {
            let boundaries = mode.boundaries(&tenant, &namespace, true)?;
            Ok(bundles::bundle_names(
                &tenant,
                &namespace,
                &boundaries.bounds,
            ))
        })
        .await
        .map_err(|error| BrokerError::Unknown(format!("bundle listing task failed: {error}")))?
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

    fn owns_topic(&self, topic: &TopicName) -> bool {
        self.owned_bundle_of(topic).is_some() && self.live_session().is_some()
    }

    /// Succeeds when this broker may serve `topic`: it owns the topic's bundle, or took it now
    /// because nobody did. Another owner (or etcd out of reach) is `NotServedHere`
    /// (ServiceNotReady): the client looks the topic up again and is sent to the owner.
    pub async fn ensure_owned(self: &Arc<Self>, broker: &Broker, topic: &TopicName) -> Result<()> {
        match self.lookup(broker, topic).await? {
            Owner::This => Ok(()),
            Owner::Other { broker_id, .. } => Err(BrokerError::NotServedHere(format!(
                "topic {topic} is in a bundle owned by broker {broker_id}; look it up again"
            ))),
        }
    }

    /// Who serves `topic`: its bundle's owner, or this broker, which takes the bundle if nobody
    /// owns it. A namespace that does not exist is `TopicNotFound` (no bundle of it is taken).
    pub async fn lookup(self: &Arc<Self>, broker: &Broker, topic: &TopicName) -> Result<Owner> {
        if self.owns_topic(topic) {
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
        let mode = self.clone();
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || mode.resolve_blocking(&topic))
            .await
            .map_err(|error| BrokerError::Unknown(format!("bundle lookup task failed: {error}")))?
    }

    fn resolve_blocking(&self, topic: &TopicName) -> Result<Owner> {
        let _serialized = lock(&self.acquiring);
        let session = self.live_session().ok_or_else(|| {
            BrokerError::NotServedHere(format!(
                "broker {} has no live etcd session (lease lost; registering again)",
                self.broker_id
            ))
        })?;
        if self.owned_bundle_of(topic).is_some() {
            return Ok(Owner::This);
        }
        let key = boundaries_key(&topic.tenant, &topic.namespace);
        let mut fresh = false;
        loop {
            let boundaries = self.boundaries(&topic.tenant, &topic.namespace, fresh)?;
            let bundle = bundles::bundle_in(topic, &boundaries.bounds);
            let record = match self.cluster.owner(&bundle).map_err(unavailable)? {
                Some(record) => record,
                None => {
                    // The load balancer moves it to another broker: send the client there.
                    if let Some(target) = self.assigned_to_other(&bundle)? {
                        if let Some(registration) = self.registration_of(&target)? {
                            return Ok(Owner::Other {
                                broker_id: target,
                                registration,
                            });
                        }
                    }
                    match self.acquire(&session, &bundle, &boundaries.unchanged(&key)) {
                        Ok(Some(record)) => record,
                        Ok(None) => {
                            self.assignment_done(&bundle);
                            return Ok(Owner::This);
                        }
                        // The namespace's bundles changed (a split): read them again, once.
                        Err(EtcdError::CompareFailed { .. }) if !fresh => {
                            fresh = true;
                            continue;
                        }
                        Err(error) => return Err(unavailable(error)),
                    }
                }
            };
            return self.other_owner(&bundle, record);
        }
    }

    /// Takes `bundle` if nobody owns it and `condition` holds: `None` when this broker now
    /// owns it, else its owner. Blocking; the caller holds `acquiring`.
    fn acquire(
        &self,
        session: &Session,
        bundle: &str,
        condition: &Compare,
    ) -> std::result::Result<Option<OwnerRecord>, EtcdError> {
        match session.try_acquire_if(bundle, std::slice::from_ref(condition))? {
            Acquire::Acquired(ownership) => {
                tracing::info!(
                    bundle,
                    epoch = ownership.epoch(),
                    "bundle acquired: this broker serves its topics"
                );
                lock(&self.owned).insert(bundle.to_string(), ownership);
                Ok(None)
            }
            Acquire::Owned(record) => Ok(Some(record)),
        }
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
        let registration = self.registration_of(&record.broker_id)?.ok_or_else(|| {
            BrokerError::NotServedHere(format!(
                "bundle {bundle}: its owner {} is no longer registered; retry",
                record.broker_id
            ))
        })?;
        Ok(Owner::Other {
            broker_id: record.broker_id,
            registration,
        })
    }

    /// The registration of a live broker, `None` when it is not registered. Blocking.
    fn registration_of(&self, broker_id: &str) -> Result<Option<Registration>> {
        let key = self.cluster.key(&format!("brokers/{broker_id}"));
        let Some(registration) = self.cluster.client().get(&key).map_err(unavailable)? else {
            return Ok(None);
        };
        serde_json::from_slice(&registration.value)
            .map(Some)
            .map_err(|error| {
                BrokerError::Metadata(format!("{key} holds no broker registration: {error}"))
            })
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
        let ((), topics) = self
            .close_bundle_then(broker, bundle, ownership, "unload", |mode, held| {
                match mode.live_session() {
                    // Without a live session the owner key goes (or went) with the lease.
                    None => Ok(()),
                    Some(session) => session.release(held).map(|_| ()).map_err(unavailable),
                }
            })
            .await?;
        tracing::info!(
            bundle,
            topics,
            "bundle unloaded and released; the next lookup assigns it"
        );
        Ok(true)
    }

    /// The common part of unload and split, once `bundle` is forgotten (`ownership` taken out
    /// of `owned`): closes its topics (their cursors persisted under the ownership still held),
    /// runs `finish` (the etcd side) on a blocking thread, then closes any topic whose load was
    /// under way meanwhile (its commits are fenced by then). When `finish` fails the bundle is
    /// served again and the error returned. Returns `finish`'s value and the topics closed.
    async fn close_bundle_then<T: Send + 'static>(
        self: &Arc<Self>,
        broker: &Broker,
        bundle: &str,
        ownership: Ownership,
        action: &'static str,
        finish: impl FnOnce(&ClusterMode, &Ownership) -> Result<T> + Send + 'static,
    ) -> Result<(T, usize)> {
        tracing::info!(
            bundle,
            epoch = ownership.epoch(),
            action,
            "closing the bundle's topics"
        );
        let topics = self.unload_topics_of(broker, bundle).await;
        let mode = self.clone();
        let held = ownership.clone();
        let finished = tokio::task::spawn_blocking(move || finish(&mode, &held))
            .await
            .map_err(|error| BrokerError::Unknown(format!("bundle {action} task failed: {error}")))
            .and_then(|finished| finished);
        match finished {
            Ok(value) => {
                let late = self.unload_topics_of(broker, bundle).await;
                Ok((value, topics + late))
            }
            Err(error) => {
                tracing::warn!(bundle, action, %error, "the bundle's {action} failed; still serving it");
                lock(&self.owned).insert(bundle.to_string(), ownership);
                Err(error)
            }
        }
    }

    /// Splits `bundle` (`tenant/namespace/0xLLLLLLLL_0xUUUUUUUU`) into two equal halves
    /// (Pulsar's `range_equally_divide`), on this broker, which takes the bundle first if
    /// nobody owns it. As an unload: the bundle is forgotten and its topics closed (cursors
    /// persisted); then one fenced transaction writes the namespace's new boundaries
    /// (`bundles/<tenant>/<ns>`), gives each half the bundle's epoch (so the next owner's
    /// epoch, and message ids, keep growing) and deletes the bundle's owner key. The next
    /// lookups assign the halves. Returns their names. Another owner: `NotServedHere`.
    pub async fn split_bundle(
        self: &Arc<Self>,
        broker: &Broker,
        bundle: &str,
    ) -> Result<[String; 2]> {
        let mut parts = bundle.splitn(3, '/');
        let (Some(tenant), Some(namespace), Some(range)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(BrokerError::PreconditionFailed(format!(
                "{bundle} names no bundle"
            )));
        };
        let (lower, upper) = bundles::parse_range(range).ok_or_else(|| {
            BrokerError::PreconditionFailed(format!("invalid bundle range {range}"))
        })?;
        if upper - lower < 2 {
            return Err(BrokerError::PreconditionFailed(format!(
                "bundle {bundle} is too small to split"
            )));
        }
        let middle = lower + (upper - lower) / 2;
        let (tenant, namespace) = (tenant.to_string(), namespace.to_string());
        if !self.owns(bundle) {
            let mode = self.clone();
            let (tenant, namespace, bundle) =
                (tenant.clone(), namespace.clone(), bundle.to_string());
            tokio::task::spawn_blocking(move || mode.take_bundle(&tenant, &namespace, &bundle))
                .await
                .map_err(|error| BrokerError::Unknown(format!("bundle task failed: {error}")))??;
        }
        let Some(ownership) = lock(&self.owned).remove(bundle) else {
            return Err(BrokerError::NotServedHere(format!(
                "bundle {bundle} is not served by this broker now; retry"
            )));
        };
        let (halves, topics) = self
            .close_bundle_then(broker, bundle, ownership, "split", move |mode, held| {
                mode.commit_split(&tenant, &namespace, held, (lower, middle, upper))
            })
            .await?;
        tracing::info!(
            bundle,
            lower_half = %halves[0],
            upper_half = %halves[1],
            topics,
            "bundle split and released; the next lookups assign its halves"
        );
        Ok(halves)
    }

    /// Takes `bundle` for a split when nobody owns it (it must be one of the namespace's
    /// bundles now). Blocking.
    fn take_bundle(&self, tenant: &str, namespace: &str, bundle: &str) -> Result<()> {
        let _serialized = lock(&self.acquiring);
        if lock(&self.owned).contains_key(bundle) {
            return Ok(());
        }
        let session = self.live_session().ok_or_else(|| {
            BrokerError::NotServedHere("no live etcd session (lease lost)".to_string())
        })?;
        let boundaries = self.boundaries(tenant, namespace, true)?;
        if !bundles::bundle_names(tenant, namespace, &boundaries.bounds)
            .iter()
            .any(|name| name == bundle)
        {
            return Err(BrokerError::NotFound(format!(
                "{bundle} is not a bundle of namespace {tenant}/{namespace}"
            )));
        }
        let condition = boundaries.unchanged(&boundaries_key(tenant, namespace));
        let owner = match self.cluster.owner(bundle).map_err(unavailable)? {
            None => self
                .acquire(&session, bundle, &condition)
                .map_err(unavailable)?,
            Some(record) => Some(record),
        };
        match owner {
            None => Ok(()),
            Some(record) => Err(BrokerError::NotServedHere(format!(
                "bundle {bundle} is owned by broker {}; retry",
                record.broker_id
            ))),
        }
    }

    /// The split's transaction (see [`ClusterMode::split_bundle`]). Blocking.
    fn commit_split(
        &self,
        tenant: &str,
        namespace: &str,
        ownership: &Ownership,
        (lower, middle, upper): (u32, u32, u32),
    ) -> Result<[String; 2]> {
        let session = self.live_session().ok_or_else(|| {
            BrokerError::NotServedHere("no live etcd session (lease lost)".to_string())
        })?;
        let current = self.boundaries(tenant, namespace, true)?;
        let at = current
            .bounds
            .windows(2)
            .position(|pair| pair == [lower, upper])
            .ok_or_else(|| {
                BrokerError::NotFound(format!(
                    "{} is no longer a bundle of namespace {tenant}/{namespace}",
                    ownership.bundle()
                ))
            })?;
        let mut bounds = current.bounds.clone();
        bounds.insert(at + 1, middle);
        if !bundles::valid_boundaries(&bounds) {
            return Err(BrokerError::PreconditionFailed(format!(
                "namespace {tenant}/{namespace} has the most bundles allowed ({})",
                bundles::MAX_BUNDLES
            )));
        }
        let key = boundaries_key(tenant, namespace);
        let value = serde_json::to_vec(&StoredBoundaries {
            boundaries: bounds.clone(),
        })
        .map_err(|error| BrokerError::Metadata(error.to_string()))?;
        let halves = [
            bundles::bundle_name(tenant, namespace, lower, middle),
            bundles::bundle_name(tenant, namespace, middle, upper),
        ];
        let epoch = ownership.epoch().to_string().into_bytes();
        let mut operations = vec![Op::Put {
            key: key.clone(),
            value,
            lease: 0,
        }];
        for half in &halves {
            operations.push(Op::Put {
                key: format!("epochs/{half}"),
                value: epoch.clone(),
                lease: 0,
            });
        }
        operations.push(Op::Delete(format!("owners/{}", ownership.bundle())));
        let revision = session
            .fenced_commit(ownership, &[current.unchanged(&key)], &operations)
            .map_err(unavailable)?;
        lock(&self.boundaries).insert(
            format!("{tenant}/{namespace}"),
            Boundaries { bounds, revision },
        );
        Ok(halves)
    }

    async fn unload_topics_of(&self, broker: &Broker, bundle: &str) -> usize {
        let topics: Vec<TopicName> = broker
            .loaded_topics()
            .into_iter()
            .map(|topic| topic.name.clone())
            .filter(|name| bundles::bundle_holds(bundle, name))
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
            Ok(change) if !change.is_missed() => change.key,
            Ok(_) | Err(RecvError::Lagged(_)) => {
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
