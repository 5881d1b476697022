//! The clusters the front door serves, and every call it makes to them.
//!
//! A member is named on the command line by its web URL. Its name and binary URL are learned
//! from the cluster itself, once: the name from `GET /admin/v2/brokers/configuration/runtime`
//! (`cluster_name`, or Pulsar's `clusterName`), the URLs from its own registration
//! `GET /admin/v2/clusters/{name}`. A cluster that is not a member (a migration's target
//! outside the set) is found in the registry of the cluster that names it.
//!
//! Admin calls are blocking `ureq` requests on tokio's blocking pool, each with a deadline and
//! a cap on the bytes read, at most [`MAX_CONCURRENT_ADMIN_CALLS`] at once. LOOKUP and PARTITIONED_METADATA are forwarded with
//! [`meridian_client::Client`], one per binary URL (its pool keeps one connection open).

use std::collections::HashMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use meridian_broker::peer::{Peer, PeerAgent};
use meridian_broker::topic_name::is_valid_entity_name;
use meridian_client::{Client, TlsOptions};
use serde_json::Value;

use crate::error::LookupError;
use crate::lock;

/// Most bytes read from one admin answer (a tenant, a migration status, a registration).
const MAX_ADMIN_BODY_BYTES: u64 = 1024 * 1024;

/// Most forwarding clients kept (one per binary URL: members and migration targets).
const MAX_FORWARDING_CLIENTS: usize = 256;

/// Admin calls in progress at once (each holds a thread of tokio's blocking pool, whose queue
/// is not bounded): more wait here.
const MAX_CONCURRENT_ADMIN_CALLS: usize = 64;

/// Redirects a forwarded LOOKUP may follow at the home cluster.
const MAX_FORWARDED_REDIRECTS: u32 = 8;

/// A cluster clients can be sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    /// Its admin/HTTP URL as the front door calls it: `http://host:port`, or its
    /// `serviceUrlTls` (`https://`) for a cluster reached over TLS.
    pub web_url: String,
    /// Its binary protocol URL as the front door forwards to it: `pulsar://host:port`, or its
    /// `brokerServiceUrlTls` (`pulsar+ssl://`) for a cluster reached over TLS.
    pub broker_url: String,
    /// What it registered, for HTTP lookup answers: `serviceUrl` and `serviceUrlTls`.
    pub service_url: Option<String>,
    pub service_url_tls: Option<String>,
}

/// A member of the set: its web URL, and what it said about itself once it answered.
struct Member {
    web_url: String,
    identity: Mutex<Option<Cluster>>,
    /// Its last admin call failed (logged once per change, not per lookup).
    unreachable: AtomicBool,
}

/// What a source's migration record says (`GET /admin/v2/tenants/{t}/migration`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationRecord {
    pub phase: String,
    pub target_cluster: String,
}

impl MigrationRecord {
    /// From `producersRedirected` on, the target is the tenant's home.
    pub fn redirected(&self) -> bool {
        matches!(
            self.phase.as_str(),
            "producersRedirected" | "consumersRedirected" | "done"
        )
    }
}

/// The members, an HTTP agent and the forwarding clients.
///
/// A member named by an `https://` URL is reached over TLS: its admin calls at its
/// `serviceUrlTls`, its forwarded requests at its `brokerServiceUrlTls`, with the front door's
/// TLS settings (`--tls-trust-cert-path`, ...); so is a cluster found in its registry.
pub struct Clusters {
    members: Vec<Member>,
    agent: std::sync::Arc<PeerAgent>,
    /// Token every call to a cluster authenticates with (admin calls, forwarded requests).
    auth_token: Option<String>,
    request_timeout: Duration,
    /// TLS settings of `https://` and `pulsar+ssl://` calls.
    tls: TlsOptions,
    clients: Mutex<HashMap<String, Client>>,
    admin_calls: tokio::sync::Semaphore,
}

impl Clusters {
    /// Members named by their web URLs, in the order given (the order breaks ties, see
    /// [`crate::home`]). `request_timeout` bounds every admin call and forwarded request;
    /// `auth_token`, if any, authenticates each of them.
    pub fn new(
        web_urls: &[String],
        request_timeout: Duration,
        auth_token: Option<String>,
        tls: TlsOptions,
    ) -> Clusters {
        Clusters {
            members: web_urls
                .iter()
                .map(|url| Member {
                    web_url: url.trim_end_matches('/').to_string(),
                    identity: Mutex::new(None),
                    unreachable: AtomicBool::new(false),
                })
                .collect(),
            agent: std::sync::Arc::new(PeerAgent::new(move |builder| {
                builder
                    .timeout_connect(request_timeout)
                    .timeout(request_timeout)
                    .redirects(0)
            })),
            auth_token,
            request_timeout,
            tls,
            clients: Mutex::new(HashMap::new()),
            admin_calls: tokio::sync::Semaphore::new(MAX_CONCURRENT_ADMIN_CALLS),
        }
    }

    /// How many members there are.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// The web URLs of the members, comma-separated (for messages).
    pub fn member_urls(&self) -> String {
        self.members
            .iter()
            .map(|member| member.web_url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The web URL of member `index`.
    pub fn member_url(&self, index: usize) -> &str {
        self.members
            .get(index)
            .map_or("", |member| member.web_url.as_str())
    }

    /// Member `index` as a [`Cluster`]: asks it for its name and URLs the first time.
    pub async fn member(&self, index: usize) -> Result<Cluster, LookupError> {
        let Some(member) = self.members.get(index) else {
            return Err(LookupError::Internal(format!("no member {index}")));
        };
        if let Some(known) = lock(&member.identity).clone() {
            return Ok(known);
        }
        let runtime = self
            .get_json(&member.web_url, "/admin/v2/brokers/configuration/runtime")
            .await?
            .ok_or_else(|| unreachable(&member.web_url, "no runtime configuration (404)"))?;
        let name = ["cluster_name", "clusterName"]
            .iter()
            .find_map(|key| runtime.get(*key).and_then(Value::as_str))
            .filter(|name| is_valid_entity_name(name))
            .ok_or_else(|| {
                unreachable(
                    &member.web_url,
                    "its runtime configuration names no valid cluster_name",
                )
            })?
            .to_string();
        let cluster = self.registered(&member.web_url, &name).await?;
        *lock(&member.identity) = Some(cluster.clone());
        tracing::info!(cluster = %cluster.name, web_url = %cluster.web_url, broker_url = %cluster.broker_url, "cluster identified");
        Ok(cluster)
    }

    /// The cluster called `name`: a member if one has that name, else the registration of
    /// `name` on `via` (a migration's target outside the set).
    pub async fn named(&self, name: &str, via: &Cluster) -> Result<Cluster, LookupError> {
        for index in 0..self.members.len() {
            if let Some(known) = self
                .members
                .get(index)
                .and_then(|member| lock(&member.identity).clone())
            {
                if known.name == name {
                    return Ok(known);
                }
            }
        }
        if !is_valid_entity_name(name) {
            return Err(LookupError::UnknownCluster {
                name: name.to_string(),
                reason: format!("{} names it, and it is not a valid name", via.name),
            });
        }
        self.registered(&via.web_url, name).await
    }

    /// Registration of cluster `name` as the cluster at `web_url` has it (its TLS URLs are the
    /// ones to call when `web_url` is `https://`).
    async fn registered(&self, web_url: &str, name: &str) -> Result<Cluster, LookupError> {
        let entry = self
            .get_json(web_url, &format!("/admin/v2/clusters/{name}"))
            .await?
            .ok_or_else(|| LookupError::UnknownCluster {
                name: name.to_string(),
                reason: format!("{web_url} has no registration of it"),
            })?;
        let url = |key: &str| {
            entry
                .get(key)
                .and_then(Value::as_str)
                .filter(|url| !url.is_empty())
                .map(|url| url.trim_end_matches('/').to_string())
        };
        let tls = web_url.starts_with("https://");
        let (web, broker) = match tls {
            true => ("serviceUrlTls", "brokerServiceUrlTls"),
            false => ("serviceUrl", "brokerServiceUrl"),
        };
        match (url(web), url(broker)) {
            (Some(web_url), Some(broker_url)) => Ok(Cluster {
                name: name.to_string(),
                web_url,
                broker_url,
                service_url: url("serviceUrl"),
                service_url_tls: url("serviceUrlTls"),
            }),
            _ => Err(LookupError::UnknownCluster {
                name: name.to_string(),
                reason: format!("its registration on {web_url} lacks {web} or {broker}"),
            }),
        }
    }

    /// Whether the cluster at `web_url` has `tenant`.
    pub async fn has_tenant(&self, web_url: &str, tenant: &str) -> Result<bool, LookupError> {
        Ok(self
            .get_json(web_url, &format!("/admin/v2/tenants/{tenant}"))
            .await?
            .is_some())
    }

    /// The migration record of `tenant` on the cluster at `web_url` (None: no migration).
    pub async fn migration(
        &self,
        web_url: &str,
        tenant: &str,
    ) -> Result<Option<MigrationRecord>, LookupError> {
        let Some(status) = self
            .get_json(web_url, &format!("/admin/v2/tenants/{tenant}/migration"))
            .await?
        else {
            return Ok(None);
        };
        let field = |key: &str| status.get(key).and_then(Value::as_str).map(str::to_string);
        match (field("phase"), field("targetCluster")) {
            (Some(phase), Some(target_cluster)) => Ok(Some(MigrationRecord {
                phase,
                target_cluster,
            })),
            // A record the front door cannot read must not send clients anywhere.
            _ => Err(unreachable(
                web_url,
                &format!("the migration status of {tenant} lacks phase or targetCluster"),
            )),
        }
    }

    /// The forwarding client for `cluster`'s binary URL.
    pub async fn client(&self, cluster: &Cluster) -> Result<Client, LookupError> {
        if let Some(client) = lock(&self.clients).get(&cluster.broker_url) {
            return Ok(client.clone());
        }
        let mut builder = Client::builder(cluster.broker_url.clone())
            .operation_timeout(self.request_timeout)
            .connect_timeout(self.request_timeout)
            .max_lookup_redirects(MAX_FORWARDED_REDIRECTS)
            .tls(self.tls.clone());
        if let Some(token) = &self.auth_token {
            builder = builder.auth_token(token.clone());
        }
        let client = builder
            .build()
            .await
            .map_err(|error| LookupError::UnknownCluster {
                name: cluster.name.clone(),
                reason: format!("its brokerServiceUrl {}: {error}", cluster.broker_url),
            })?;
        let mut clients = lock(&self.clients);
        if clients.len() >= MAX_FORWARDING_CLIENTS && !clients.contains_key(&cluster.broker_url) {
            // Registrations changed many times: start again rather than grow.
            clients.clear();
        }
        Ok(clients
            .entry(cluster.broker_url.clone())
            .or_insert(client)
            .clone())
    }

    /// `GET web_url + path` as JSON: `None` on 404; any other failure names the cluster.
    async fn get_json(&self, web_url: &str, path: &str) -> Result<Option<Value>, LookupError> {
        let _slot = self
            .admin_calls
            .acquire()
            .await
            .map_err(|_| LookupError::Internal("admin call slots closed".into()))?;
        let agent = self.agent.clone();
        let peer = Peer::new(web_url, self.auth_token.clone()).with_tls(self.tls.clone());
        let url = peer.url(path);
        let path = path.to_string();
        let outcome =
            tokio::task::spawn_blocking(move || match peer.request(&agent, "GET", &path).call() {
                Ok(response) => {
                    let mut body = Vec::new();
                    response
                        .into_reader()
                        .take(MAX_ADMIN_BODY_BYTES)
                        .read_to_end(&mut body)
                        .map_err(|error| format!("reading GET {url}: {error}"))?;
                    serde_json::from_slice(&body)
                        .map(Some)
                        .map_err(|error| format!("GET {url} answered no JSON: {error}"))
                }
                Err(ureq::Error::Status(404, _)) => Ok(None),
                Err(ureq::Error::Status(code, _)) => Err(format!("GET {url} answered {code}")),
                // ureq's transport errors name the URL.
                Err(error) => Err(error.to_string()),
            })
            .await
            .map_err(|error| LookupError::Internal(format!("admin call task: {error}")))?;
        if let Some(member) = self.members.iter().find(|member| member.web_url == web_url) {
            let failed = outcome.is_err();
            if member.unreachable.swap(failed, Ordering::Relaxed) != failed {
                match &outcome {
                    Err(reason) => tracing::warn!(cluster = web_url, reason, "cluster unreachable: lookups that need its answer fail with ServiceNotReady until it answers"),
                    Ok(_) => tracing::info!(cluster = web_url, "cluster answers again"),
                }
            }
        }
        outcome.map_err(|reason| unreachable(web_url, &reason))
    }
}

fn unreachable(web_url: &str, reason: &str) -> LookupError {
    LookupError::Unreachable {
        cluster: web_url.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_home_from_producers_redirected_on() {
        let record = |phase: &str| MigrationRecord {
            phase: phase.to_string(),
            target_cluster: "b".to_string(),
        };
        for phase in [
            "copyingMetadata",
            "replicating",
            "caughtUp",
            "subscriptionsSynced",
            "aborting",
        ] {
            assert!(!record(phase).redirected(), "{phase}");
        }
        for phase in ["producersRedirected", "consumersRedirected", "done"] {
            assert!(record(phase).redirected(), "{phase}");
        }
    }
}
