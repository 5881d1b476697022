//! Remote clusters: where they are, the clients replicators share to reach them, and making
//! the remote topic exist with the local partition count (through the remote's admin API).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use meridian_client::Client;

use super::memory::MemoryBudget;
use crate::peer::{ClusterTls, Peer, PeerAgent};
use crate::resources::ClusterData;
use crate::topic_name::TopicName;

/// The first wait after a replication failure (replicators, the client's reconnections).
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// The longest wait between replication attempts.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A remote cluster as the cluster registry describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RemoteCluster {
    pub name: String,
    /// `http://...` (or `https://...`) of its admin API, used to create the remote topic.
    pub service_url: Option<String>,
    /// `pulsar://...` of its brokers (`pulsar+ssl://...` with `brokerClientTlsEnabled`).
    pub broker_service_url: String,
    /// When set, every replication connection goes through this proxy (`pulsar+ssl://` for a
    /// registration with `brokerClientTlsEnabled`, `pulsar://` otherwise).
    pub proxy_service_url: Option<String>,
    /// Token replication and topic creation authenticate with, from the registration's
    /// `authenticationParameters` (Pulsar's cluster-data field; `token:...`, `file:///...`).
    pub auth_token: Option<String>,
    /// TLS settings of `pulsar+ssl://` and `https://` (the registration's trust, client
    /// certificate and insecure fields).
    pub tls: meridian_client::TlsOptions,
}

impl RemoteCluster {
    /// The remote as registered; `None` if it has no broker service URL (no
    /// `brokerServiceUrlTls` when `brokerClientTlsEnabled`). With `brokerClientTlsEnabled`,
    /// replication and the admin calls use the TLS URLs, as Pulsar's do.
    pub fn from_data(name: &str, data: &ClusterData) -> Option<RemoteCluster> {
        let non_empty = |value: &Option<String>| value.clone().filter(|url| !url.is_empty());
        let tls = ClusterTls::of(data);
        Some(RemoteCluster {
            name: name.to_string(),
            service_url: tls.service_url(data),
            broker_service_url: tls.broker_service_url(data)?,
            proxy_service_url: non_empty(&data.proxy_service_url),
            auth_token: crate::peer::auth_token_of(name, data),
            tls: tls.options,
        })
    }

    /// Its admin API with its credentials, if it has a `serviceUrl`.
    pub fn peer(&self) -> Option<Peer> {
        let service_url = self.service_url.as_deref()?;
        Some(Peer::new(service_url, self.auth_token.clone()).with_tls(self.tls.clone()))
    }

    async fn client(&self) -> meridian_client::Result<Client> {
        let mut builder = Client::builder(self.broker_service_url.clone())
            .operation_timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            .keep_alive_interval(Duration::from_secs(10))
            .reconnect_backoff(BACKOFF_INITIAL, BACKOFF_MAX);
        if let Some(proxy) = &self.proxy_service_url {
            builder = builder.proxy_url(proxy.clone());
        }
        if let Some(token) = &self.auth_token {
            builder = builder.auth_token(token.clone());
        }
        builder.tls(self.tls.clone()).build().await
    }
}

/// What every replicator of a broker shares: one client per remote cluster (their producers
/// share its connections instead of opening one each) and the memory bound.
pub(crate) struct RemoteClients {
    clients: tokio::sync::Mutex<HashMap<RemoteCluster, Client>>,
    memory: Arc<MemoryBudget>,
}

impl RemoteClients {
    /// `max_memory_bytes`: the bytes of entries all replicators together hold in memory.
    pub(crate) fn new(max_memory_bytes: usize) -> RemoteClients {
        RemoteClients {
            clients: tokio::sync::Mutex::default(),
            memory: MemoryBudget::new(max_memory_bytes),
        }
    }

    /// The client of `remote` if it exists and the map is free, without an await (the
    /// subscription sync asks at every state it sends; [`Self::get`]'s future holds a client's
    /// construction).
    pub(crate) fn existing(&self, remote: &RemoteCluster) -> Option<Client> {
        self.clients.try_lock().ok()?.get(remote).cloned()
    }

    pub(crate) async fn get(&self, remote: &RemoteCluster) -> meridian_client::Result<Client> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(remote) {
            return Ok(client.clone());
        }
        let client = remote.client().await?;
        clients.insert(remote.clone(), client.clone());
        Ok(client)
    }

    /// The memory bound of all replicators.
    pub(crate) fn memory(&self) -> &Arc<MemoryBudget> {
        &self.memory
    }

    /// Closes the clients of remotes that are no longer registered as they were.
    pub(crate) async fn retain(&self, current: &[RemoteCluster]) {
        let stale: Vec<Client> = {
            let mut clients = self.clients.lock().await;
            let names: Vec<RemoteCluster> = clients
                .keys()
                .filter(|remote| !current.contains(remote))
                .cloned()
                .collect();
            names
                .iter()
                .filter_map(|remote| clients.remove(remote))
                .collect()
        };
        for client in stale {
            client.close().await;
        }
    }
}

pub(crate) enum Prepare {
    Mismatch(String),
    Failed(String),
}

#[derive(serde::Deserialize)]
struct PartitionedMetadata {
    partitions: u32,
}

/// Makes the topic exist on the remote cluster with the local partition count.
pub(crate) fn prepare_remote_topic(
    peer: &Peer,
    topic: &TopicName,
    partitions: Option<u32>,
) -> Result<(), Prepare> {
    let base = topic.base();
    let path = format!(
        "/admin/v2/persistent/{}/{}/{}",
        base.tenant, base.namespace, base.local
    );
    let agent = PeerAgent::new(|builder| builder.timeout(Duration::from_secs(10)));
    let failed = |what: &str, error: ureq::Error| {
        Prepare::Failed(format!(
            "{what} on the remote cluster failed: {}",
            describe(error)
        ))
    };
    let remote_partitions = |agent: &PeerAgent| -> Result<u32, Prepare> {
        let metadata: PartitionedMetadata = peer
            .request(agent, "GET", &format!("{path}/partitions"))
            .call()
            .map_err(|error| failed("reading the partition count", error))?
            .into_json()
            .map_err(|error| Prepare::Failed(format!("bad partition metadata: {error}")))?;
        Ok(metadata.partitions)
    };
    let mismatch = |remote: u32| {
        Prepare::Mismatch(format!(
            "partitions inconsistent: {} has {} locally and {remote} on the remote cluster",
            base,
            partitions.unwrap_or(0)
        ))
    };
    let existing = remote_partitions(&agent)?;
    let wanted = partitions.unwrap_or(0);
    if existing == wanted && wanted > 0 {
        return Ok(());
    }
    if existing != 0 {
        return Err(mismatch(existing));
    }
    let created = match partitions {
        Some(count) => peer.call(
            &agent,
            "PUT",
            &format!("{path}/partitions"),
            Some(("application/json", &count.to_string())),
        ),
        None => peer.call(&agent, "PUT", &path, None),
    };
    match created {
        Ok(_) | Err(ureq::Error::Status(409, _)) => {}
        Err(error) => return Err(failed("creating the topic", error)),
    }
    // Someone else may have created it first, with another shape.
    let now = remote_partitions(&agent)?;
    if now != wanted {
        return Err(mismatch(now));
    }
    Ok(())
}

fn describe(error: ureq::Error) -> String {
    match error {
        ureq::Error::Status(code, response) => {
            let body = response.into_string().unwrap_or_default();
            format!("HTTP {code}: {body}")
        }
        other => other.to_string(),
    }
}
