//! Creating a migrating tenant's metadata on the target cluster through its admin API. Every
//! call is idempotent, so a migration that paused or restarted simply runs them again.

use std::time::Duration;

use crate::peer::{Peer, PeerAgent};
use crate::resources::{ClusterData, Policies, TenantInfo};

/// Header naming the cluster a request comes from; the target applies it without propagating
/// it further (the same header geo-replication's "configure once" uses).
const PROPAGATED_HEADER: &str = "x-meridian-propagated-from";

/// Each admin call to the target gives up after this long (the migration pauses and retries).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the target must hold before the source starts replicating to it.
pub(super) struct TargetMetadata {
    pub local_cluster: String,
    /// The target's admin API, with the credentials of its registration.
    pub target: Peer,
    /// Registry entries of every cluster the tenant's namespaces name (link proxies removed).
    pub registry: Vec<(String, ClusterData)>,
    pub tenant: String,
    pub tenant_info: TenantInfo,
    /// `(namespace without the tenant, policies with the target in the replication list)`.
    pub namespaces: Vec<(String, Policies)>,
    /// Partitioned topics `(namespace, topic, partitions)`, created with the same partition
    /// count (replicators would create them too, but only once a partition holds a message).
    pub partitioned: Vec<(String, String, u32)>,
}

/// What the migration creates on the target (and an abort deletes again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Created {
    Tenant,
    /// A namespace, without the tenant.
    Namespace(String),
}

/// One admin call to the target: `Ok((status, body))` for 2xx, 404 and 409; `Err` otherwise.
fn call(
    agent: &PeerAgent,
    target: &Peer,
    from: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(u16, String), String> {
    let request = target
        .request(agent, method, &format!("/admin/v2{path}"))
        .set(PROPAGATED_HEADER, from)
        .set("Content-Type", "application/json");
    let result = match body {
        Some(body) => request.send_string(&body),
        None => request.call(),
    };
    match result {
        Ok(response) => Ok((
            response.status(),
            response.into_string().unwrap_or_default(),
        )),
        Err(ureq::Error::Status(code @ (404 | 409), _)) => Ok((code, String::new())),
        Err(ureq::Error::Status(code, response)) => Err(format!(
            "target refused {method} {path}: HTTP {code}: {}",
            response.into_string().unwrap_or_default()
        )),
        Err(error) => Err(format!("target unreachable ({method} {path}): {error}")),
    }
}

fn agent() -> PeerAgent {
    PeerAgent::new(|builder| builder.timeout(CALL_TIMEOUT))
}

/// Creates (or completes) the cluster entries, the tenant and each namespace on the target.
/// What it is about to create is passed to `note` first (which makes it durable), so that an
/// abort, even after a crash, knows what to delete. `Err` carries a reason for the status.
pub(super) fn push(
    wanted: &TargetMetadata,
    note: &dyn Fn(Created) -> Result<(), String>,
) -> Result<(), String> {
    let agent = agent();
    let call = |method: &str, path: &str, body: Option<String>| {
        call(
            &agent,
            &wanted.target,
            &wanted.local_cluster,
            method,
            path,
            body,
        )
    };
    // A target that is itself the source of a migration of this tenant (one that moved it
    // here and is not cleaned up) still sends the tenant's clients away: they would go back
    // and forth between the two clusters.
    let (status, text) = call(
        "GET",
        &format!("/tenants/{}/migration", wanted.tenant),
        None,
    )?;
    if status == 200 {
        let phase = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|value| Some(value.get("phase")?.as_str()?.to_string()))
            .unwrap_or_default();
        return Err(format!(
            "the target still has this tenant's own migration record (phase {phase}): finish it there first (--cleanup on the target once done, or --abort)"
        ));
    }
    for (name, data) in &wanted.registry {
        call("PUT", &format!("/clusters/{name}"), Some(json(data)))?;
    }
    let tenant_path = format!("/tenants/{}", wanted.tenant);
    if call("GET", &tenant_path, None)?.0 == 404 {
        note(Created::Tenant)?;
    }
    if call("PUT", &tenant_path, Some(json(&wanted.tenant_info)))?.0 == 409 {
        let (_, text) = call("GET", &tenant_path, None)?;
        let mut theirs: TenantInfo = serde_json::from_str(&text)
            .map_err(|error| format!("target sent an unreadable tenant: {error}"))?;
        let missing: Vec<String> = wanted
            .tenant_info
            .allowed_clusters
            .iter()
            .filter(|cluster| !theirs.allowed_clusters.contains(cluster))
            .cloned()
            .collect();
        if !missing.is_empty() {
            theirs.allowed_clusters.extend(missing);
            call("POST", &tenant_path, Some(json(&theirs)))?;
        }
    }
    for (namespace, policies) in &wanted.namespaces {
        let path = format!("/namespaces/{}/{namespace}", wanted.tenant);
        if call("GET", &path, None)?.0 == 404 {
            note(Created::Namespace(namespace.clone()))?;
        }
        if call("PUT", &path, Some(json(policies)))?.0 != 409 {
            continue;
        }
        // The namespace exists there: make sure its list has every cluster ours has.
        let replication = format!("{path}/replication");
        let (_, text) = call("GET", &replication, None)?;
        let mut theirs: Vec<String> = serde_json::from_str(&text)
            .map_err(|error| format!("target sent an unreadable replication list: {error}"))?;
        let before = theirs.len();
        for cluster in &policies.replication_clusters {
            if !theirs.contains(cluster) {
                theirs.push(cluster.clone());
            }
        }
        if theirs.len() != before {
            call("POST", &replication, Some(json(&theirs)))?;
        }
    }
    for (namespace, topic, partitions) in &wanted.partitioned {
        let path = format!(
            "/persistent/{}/{namespace}/{}/partitions",
            wanted.tenant,
            crate::topic_name::encode_path_segment(topic)
        );
        if call("PUT", &path, Some(partitions.to_string()))?.0 != 409 {
            continue;
        }
        // It exists there: grown here since it was copied, it grows there too.
        let (_, text) = call("GET", &path, None)?;
        let theirs = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|value| value.get("partitions")?.as_u64())
            .ok_or_else(|| format!("target sent an unreadable partition count for {topic}"))?;
        if theirs < u64::from(*partitions) {
            call("POST", &path, Some(partitions.to_string()))?;
        }
    }
    Ok(())
}

/// Deletes on the target what the migration created there: the namespaces (with their topics,
/// which only replication wrote before any redirect) and the tenant. Gone already is fine.
pub(super) fn remove(
    target: &Peer,
    local_cluster: &str,
    tenant: &str,
    namespaces: &[String],
    tenant_created: bool,
) -> Result<(), String> {
    let agent = agent();
    for namespace in namespaces {
        call(
            &agent,
            target,
            local_cluster,
            "DELETE",
            &format!("/namespaces/{tenant}/{namespace}?force=true"),
            None,
        )?;
    }
    if tenant_created {
        call(
            &agent,
            target,
            local_cluster,
            "DELETE",
            &format!("/tenants/{tenant}"),
            None,
        )?;
    }
    Ok(())
}

/// After a migration: the source leaves the replication list of each of the tenant's
/// namespaces on the target (nothing replicates back to it any more). Gone already is fine.
pub(super) fn forget_source(
    target: &Peer,
    source_cluster: &str,
    tenant: &str,
    namespaces: &[String],
) -> Result<(), String> {
    let agent = agent();
    let call = |method: &str, path: &str, body: Option<String>| {
        call(&agent, target, source_cluster, method, path, body)
    };
    for namespace in namespaces {
        let path = format!("/namespaces/{tenant}/{namespace}/replication");
        let (status, text) = call("GET", &path, None)?;
        if status == 404 {
            continue;
        }
        let mut clusters: Vec<String> = serde_json::from_str(&text)
            .map_err(|error| format!("target sent an unreadable replication list: {error}"))?;
        if !clusters.iter().any(|cluster| cluster == source_cluster) {
            continue;
        }
        clusters.retain(|cluster| cluster != source_cluster);
        call("POST", &path, Some(json(&clusters)))?;
    }
    Ok(())
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
