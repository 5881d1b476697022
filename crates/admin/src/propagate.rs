//! Configure once: when a namespace's replication clusters are set on this cluster, the same
//! tenant, namespace and policies are created or updated on every other named cluster through
//! its admin API (`serviceUrl` in the cluster registry), so an operator does not have to
//! repeat the configuration on each cluster. Configuring each cluster by hand still works: every
//! step is idempotent (an existing cluster entry or tenant is kept), and a namespace that already
//! exists on the other cluster gets the new replication list only if it *follows* this one (its
//! list was this cluster's previous list, or is the new one already). A cluster given its own
//! list by hand (say `["c"]` alone, for one-way replication into `c`) keeps it.
//!
//! The requests this sends carry the header [`PROPAGATED_HEADER`]; a cluster that receives one
//! applies it without propagating further, so two clusters never bounce a change between them.
//! Propagation runs in the background with capped backoff, so an unreachable cluster neither
//! fails nor slows the local change; it stops when the namespace's clusters change again (the
//! newer change propagates itself).

use std::collections::BTreeSet;
use std::time::Duration;

use meridian_broker::peer::Peer;
use meridian_broker::resources::{ClusterData, Policies, TenantInfo};

use crate::AppState;

/// Marks an admin request as sent by another cluster's propagation.
pub const PROPAGATED_HEADER: &str = "x-meridian-propagated-from";

const ATTEMPTS: u32 = 30;
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What one remote cluster must receive.
#[derive(Clone)]
struct Change {
    local_cluster: String,
    remote: String,
    /// Its admin API, with the credentials of its registration.
    peer: Peer,
    /// Registry entries of every cluster the namespace names (without link-specific proxies).
    registry: Vec<(String, ClusterData)>,
    tenant: String,
    tenant_info: TenantInfo,
    namespace: String,
    policies: Policies,
    /// This cluster's list before the change.
    previous: Vec<String>,
}

/// Starts propagating the namespace's replication settings to the other clusters it names.
pub fn spawn(broker: &AppState, tenant: &str, namespace: &str, previous: Vec<String>) {
    let resources = broker.resources();
    let local_cluster = broker.config().cluster_name.clone();
    let (Ok(tenant_info), Ok(policies)) = (
        resources.tenant(tenant),
        resources.policies(tenant, namespace),
    ) else {
        return;
    };
    let registry: Vec<(String, ClusterData)> = policies
        .replication_clusters
        .iter()
        .filter_map(|name| {
            let mut data = resources.cluster(name).ok()?;
            data.proxy_service_url = None;
            data.proxy_protocol = None;
            Some((name.clone(), data))
        })
        .collect();
    for remote in &policies.replication_clusters {
        if *remote == local_cluster {
            continue;
        }
        let peer = resources
            .cluster(remote)
            .ok()
            .and_then(|data| Peer::of(remote, &data));
        let Some(peer) = peer else {
            tracing::warn!(cluster = %remote, namespace = %format!("{tenant}/{namespace}"), "cannot propagate the namespace: the cluster has no serviceUrl");
            continue;
        };
        let change = Change {
            local_cluster: local_cluster.clone(),
            remote: remote.clone(),
            peer,
            registry: registry.clone(),
            tenant: tenant.to_string(),
            tenant_info: tenant_info.clone(),
            namespace: namespace.to_string(),
            policies: policies.clone(),
            previous: previous.clone(),
        };
        tokio::spawn(run(broker.clone(), change));
    }
}

async fn run(broker: AppState, change: Change) {
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=ATTEMPTS {
        let current = broker
            .resources()
            .policies(&change.tenant, &change.namespace)
            .map(|policies| policies.replication_clusters);
        if current.as_ref().ok() != Some(&change.policies.replication_clusters) {
            return;
        }
        let pushed = {
            let change = change.clone();
            tokio::task::spawn_blocking(move || push(&change)).await
        };
        let error = match pushed {
            Ok(Ok(())) => {
                tracing::info!(cluster = %change.remote, namespace = %format!("{}/{}", change.tenant, change.namespace), "namespace replication settings propagated");
                return;
            }
            Ok(Err(error)) => error,
            Err(error) => error.to_string(),
        };
        tracing::warn!(cluster = %change.remote, namespace = %format!("{}/{}", change.tenant, change.namespace), attempt, %error, "propagating the namespace failed; will retry");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(BACKOFF_MAX);
    }
    tracing::error!(cluster = %change.remote, namespace = %format!("{}/{}", change.tenant, change.namespace), "gave up propagating the namespace; configure it on that cluster by hand");
}

/// The idempotent steps, in dependency order: clusters, tenant, namespace, replication.
fn push(change: &Change) -> Result<(), String> {
    let agent =
        meridian_broker::peer::PeerAgent::new(|builder| builder.timeout(Duration::from_secs(10)));
    let request = |method: &str, path: &str| {
        change
            .peer
            .request(&agent, method, &format!("/admin/v2{path}"))
            .set(PROPAGATED_HEADER, &change.local_cluster)
    };
    let send = |method: &str, path: &str, body: Option<String>| -> Result<u16, String> {
        let request = request(method, path).set("Content-Type", "application/json");
        let result = match body {
            Some(body) => request.send_string(&body),
            None => request.call(),
        };
        match result {
            Ok(response) => Ok(response.status()),
            Err(ureq::Error::Status(409, _)) => Ok(409),
            Err(ureq::Error::Status(code, response)) => Err(format!(
                "{method} {path}: HTTP {code}: {}",
                response.into_string().unwrap_or_default()
            )),
            Err(error) => Err(format!("{method} {path}: {error}")),
        }
    };
    for (name, data) in &change.registry {
        send("PUT", &format!("/clusters/{name}"), Some(json(data)))?;
    }
    let wanted: BTreeSet<&String> = change.policies.replication_clusters.iter().collect();
    let mut tenant_info = change.tenant_info.clone();
    for cluster in &wanted {
        if !tenant_info.allowed_clusters.contains(cluster) {
            tenant_info.allowed_clusters.push((*cluster).clone());
        }
    }
    let tenant_path = format!("/tenants/{}", change.tenant);
    if send("PUT", &tenant_path, Some(json(&tenant_info)))? == 409 {
        // The tenant exists there: widen its allowed clusters if they lack ours.
        let mut remote: TenantInfo = request("GET", &tenant_path)
            .call()
            .map_err(|error| format!("GET {tenant_path}: {error}"))?
            .into_json()
            .map_err(|error| format!("GET {tenant_path}: {error}"))?;
        let missing: Vec<String> = wanted
            .iter()
            .filter(|cluster| !remote.allowed_clusters.contains(cluster))
            .map(|cluster| (*cluster).clone())
            .collect();
        if !missing.is_empty() {
            remote.allowed_clusters.extend(missing);
            send("POST", &tenant_path, Some(json(&remote)))?;
        }
    }
    let namespace_path = format!("/namespaces/{}/{}", change.tenant, change.namespace);
    if send("PUT", &namespace_path, Some(json(&change.policies)))? != 409 {
        // Created with our policies, replication list included.
        return Ok(());
    }
    let replication_path = format!("{namespace_path}/replication");
    let theirs: Vec<String> = request("GET", &replication_path)
        .call()
        .map_err(|error| format!("GET {replication_path}: {error}"))?
        .into_json()
        .map_err(|error| format!("GET {replication_path}: {error}"))?;
    let as_set = |list: &[String]| list.iter().cloned().collect::<BTreeSet<String>>();
    let wanted = as_set(&change.policies.replication_clusters);
    let theirs = as_set(&theirs);
    if theirs == wanted {
        return Ok(());
    }
    if theirs != as_set(&change.previous) {
        tracing::info!(cluster = %change.remote, namespace = %format!("{}/{}", change.tenant, change.namespace), ?theirs, "the cluster has its own replication list; left as it is");
        return Ok(());
    }
    send(
        "POST",
        &replication_path,
        Some(json(&change.policies.replication_clusters)),
    )?;
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
