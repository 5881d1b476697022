//! What a topic needs from the broker that loaded it, and nothing more: the configuration, the
//! storage engine, producer-name generation and the replicators' remote clients. The broker
//! owns one [`TopicContext`] and hands every topic it loads a reference to it, so `topic`
//! depends on this narrow handle instead of on `broker` (dependencies point one way:
//! `broker → topic → context`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use meridian_storage::{Log, Storage};

use crate::config::BrokerConfig;
use crate::health::TopicHealth;
use crate::replication::remote::RemoteClients;

/// What every topic of a broker shares.
pub(crate) struct TopicContext {
    pub(crate) config: Arc<BrokerConfig>,
    pub(crate) storage: Storage,
    producer_names: AtomicU64,
    /// Makes generated producer names unique across restarts (they key de-duplication state).
    instance: String,
    /// The clients replicators use, one per remote cluster.
    pub(crate) remote_clients: Arc<RemoteClients>,
    /// Topics that cannot be served, and why.
    pub(crate) health: TopicHealth,
    /// Cluster mode (set once, before serving). With `--storage` topics' logs are opened
    /// through it: the log-store seam (`cluster::logs`).
    pub(crate) cluster: std::sync::OnceLock<Arc<crate::cluster::ClusterMode>>,
}

impl TopicContext {
    /// `instance` tells this process's generated producer names from earlier ones.
    pub(crate) fn new(
        config: BrokerConfig,
        storage: Storage,
        instance: String,
        remote_clients: Arc<RemoteClients>,
    ) -> TopicContext {
        TopicContext {
            config: Arc::new(config),
            storage,
            producer_names: AtomicU64::new(0),
            instance,
            remote_clients,
            health: TopicHealth::default(),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// Opens a topic's log: the local engine's, or in cluster mode with `--storage` the local
    /// working copy rebuilt from the object store with the object-store log attached. Blocking.
    pub(crate) fn open_log(&self, name: &str) -> crate::error::Result<Arc<Log>> {
        match self.cluster.get() {
            Some(mode) => match mode.logs() {
                Some(logs) => mode.open_log(logs, &self.storage, name),
                None => Ok(self.storage.open_log(name)?),
            },
            None => Ok(self.storage.open_log(name)?),
        }
    }

    /// Deletes a topic's log: the local one, and in cluster mode with `--storage` its
    /// object-store log and cursors first. Blocking.
    pub(crate) fn delete_log(&self, name: &str) -> crate::error::Result<()> {
        if let Some(mode) = self.cluster.get() {
            if let Some(logs) = mode.logs() {
                mode.delete_log(logs, name)?;
            }
        }
        Ok(self.storage.delete_log(name)?)
    }

    /// Closes a topic's log (its cursors written to etcd first in cluster mode); `log`, if
    /// known, is the one being closed (a topic loaded again meanwhile is not closed). Blocking.
    pub(crate) fn close_log(
        &self,
        name: &str,
        log: Option<&Arc<Log>>,
    ) -> meridian_storage::Result<()> {
        if let Some(logs) = self.cluster.get().and_then(|mode| mode.logs()) {
            logs.close(name, log, self.storage.config().cursor_max_persisted_ranges);
        }
        self.storage.close_log(name)
    }

    pub(crate) fn generate_producer_name(&self) -> String {
        let counter = self.producer_names.fetch_add(1, Ordering::Relaxed);
        format!("{}-{}-{counter}", self.config.cluster_name, self.instance)
    }
}
