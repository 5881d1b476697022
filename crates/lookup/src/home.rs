//! Which cluster is a tenant's home, and a small cache of the answers.
//!
//! # The rule
//!
//! - The home is the cluster of the set that has the tenant.
//! - When several have it, a cluster with a migration record for it is the source of a
//!   migration and is home, until its record reaches `producersRedirected` (then
//!   `consumersRedirected`, `done`): from then on the record's `targetCluster` is home, and
//!   the rule is applied again there (a tenant can move on). Several without any record (a
//!   tenant replicated between clusters, not moving): the first of them in `--clusters` order.
//! - A known home is re-checked on its own (it still has the tenant, and its record does not
//!   send the tenant elsewhere): the other clusters need not be up. Only a tenant without a
//!   known home, or whose home lost it, asks every member; then **every member must answer**,
//!   because the silent one could be the source of a migration and so the home. An unanswered
//!   question is [`LookupError::Unreachable`] (retriable), never a guess.
//!
//! # The cache
//!
//! At most `capacity` tenants (the least recently used goes first). A home is fresh for
//! `fresh_for`; the first lookup after that re-checks it while the tenant's other lookups wait
//! for that one answer (one check per tenant at a time). Failures are not cached, but the last
//! home is kept as the starting point of the next check.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clusters::{Cluster, Clusters};
use crate::error::LookupError;
use crate::lock;

/// Most migrations followed from one cluster to the next in one check.
const MAX_HOPS: usize = 8;

/// Where `tenant` lives now, starting from `known` (its last home) when there is one.
pub async fn resolve(
    clusters: &Clusters,
    tenant: &str,
    known: Option<Cluster>,
) -> Result<Cluster, LookupError> {
    if let Some(home) = known {
        if let Some(home) = follow(clusters, tenant, home).await? {
            return Ok(home);
        }
    }
    discover(clusters, tenant).await
}

/// From a cluster that had the tenant, follows its migration records to the home. `None`: the
/// cluster no longer has the tenant (deleted, cleaned up after a migration).
async fn follow(
    clusters: &Clusters,
    tenant: &str,
    start: Cluster,
) -> Result<Option<Cluster>, LookupError> {
    let mut current = start;
    for _ in 0..MAX_HOPS {
        if !clusters.has_tenant(&current.web_url, tenant).await? {
            return Ok(None);
        }
        match clusters.migration(&current.web_url, tenant).await? {
            Some(record) if record.redirected() => {
                current = clusters.named(&record.target_cluster, &current).await?;
            }
            _ => return Ok(Some(current)),
        }
    }
    Err(LookupError::Internal(format!(
        "tenant {tenant}: more than {MAX_HOPS} migrations in a row (a cycle of records?)"
    )))
}

/// Asks every member whether it has the tenant, then applies the rule.
async fn discover(clusters: &Clusters, tenant: &str) -> Result<Cluster, LookupError> {
    let answers = futures::future::join_all((0..clusters.member_count()).map(|index| async move {
        clusters
            .has_tenant(clusters.member_url(index), tenant)
            .await
            .map(|has| (index, has))
    }))
    .await;
    let mut holders = Vec::new();
    for answer in answers {
        let (index, has) = answer?;
        if has {
            holders.push(index);
        }
    }
    let Some(&first) = holders.first() else {
        return Err(LookupError::NoHome {
            tenant: tenant.to_string(),
            clusters: clusters.member_urls(),
        });
    };
    let mut start = first;
    if holders.len() > 1 {
        for &index in &holders {
            if clusters
                .migration(clusters.member_url(index), tenant)
                .await?
                .is_some()
            {
                start = index;
                break;
            }
        }
    }
    let start = clusters.member(start).await?;
    follow(clusters, tenant, start.clone())
        .await?
        // It lost the tenant between the two questions: ask again next time.
        .ok_or_else(|| LookupError::Unreachable {
            cluster: start.web_url,
            reason: format!("tenant {tenant} disappeared while its home was being decided"),
        })
}

/// The tenants' homes, bounded and briefly fresh.
pub struct HomeCache {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    capacity: usize,
    fresh_for: Duration,
}

/// One tenant's entry: the home and when it was checked, behind an async lock so that one
/// check runs at a time per tenant.
struct Slot {
    known: tokio::sync::Mutex<Option<(Cluster, Instant)>>,
    used: Mutex<Instant>,
}

impl HomeCache {
    pub fn new(capacity: usize, fresh_for: Duration) -> HomeCache {
        HomeCache {
            slots: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            fresh_for,
        }
    }

    /// The home of `tenant`: cached if fresh, else `check(last known home)`.
    pub async fn home<F, Fut>(&self, tenant: &str, check: F) -> Result<Cluster, LookupError>
    where
        F: FnOnce(Option<Cluster>) -> Fut,
        Fut: Future<Output = Result<Cluster, LookupError>>,
    {
        let slot = self.slot(tenant);
        let mut known = slot.known.lock().await;
        if let Some((home, checked)) = known.as_ref() {
            if checked.elapsed() < self.fresh_for {
                return Ok(home.clone());
            }
        }
        let last = known.as_ref().map(|(home, _)| home.clone());
        match check(last).await {
            Ok(home) => {
                if known.as_ref().is_some_and(|(old, _)| old != &home) {
                    tracing::info!(tenant, home = %home.name, "tenant's home changed");
                }
                *known = Some((home.clone(), Instant::now()));
                Ok(home)
            }
            Err(error) => Err(error),
        }
    }

    /// The tenant's slot, made (and the least recently used evicted) if needed.
    fn slot(&self, tenant: &str) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(tenant) {
            *lock(&slot.used) = Instant::now();
            return slot.clone();
        }
        if slots.len() >= self.capacity {
            let oldest = slots
                .iter()
                .min_by_key(|(_, slot)| *lock(&slot.used))
                .map(|(tenant, _)| tenant.clone());
            if let Some(oldest) = oldest {
                slots.remove(&oldest);
            }
        }
        let slot = Arc::new(Slot {
            known: tokio::sync::Mutex::new(None),
            used: Mutex::new(Instant::now()),
        });
        slots.insert(tenant.to_string(), slot.clone());
        slot
    }

    /// Tenants cached now.
    pub fn cached_tenants(&self) -> usize {
        lock(&self.slots).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            web_url: format!("http://{name}"),
            broker_url: format!("pulsar://{name}"),
        }
    }

    #[tokio::test]
    async fn a_fresh_home_is_reused_a_stale_one_is_rechecked_from_the_last_home() {
        let cache = HomeCache::new(10, Duration::from_secs(3600));
        let home = cache.home("t", |_| async { Ok(cluster("a")) }).await;
        assert_eq!(home.expect("home").name, "a");
        let again = cache
            .home("t", |_| async { panic!("a fresh home is not checked") })
            .await;
        assert_eq!(again.expect("home").name, "a");

        let stale = HomeCache::new(10, Duration::ZERO);
        let _ = stale.home("t", |_| async { Ok(cluster("a")) }).await;
        let moved = stale
            .home("t", |last| async move {
                assert_eq!(last.expect("the last home").name, "a");
                Ok(cluster("b"))
            })
            .await;
        assert_eq!(moved.expect("home").name, "b");
    }

    #[tokio::test]
    async fn a_failed_check_is_not_cached_and_keeps_the_last_home() {
        let cache = HomeCache::new(10, Duration::ZERO);
        let _ = cache.home("t", |_| async { Ok(cluster("a")) }).await;
        let failed = cache
            .home("t", |_| async {
                Err(LookupError::Unreachable {
                    cluster: "a".into(),
                    reason: "down".into(),
                })
            })
            .await;
        assert!(failed.is_err());
        let next = cache
            .home("t", |last| async move {
                assert_eq!(last.expect("kept").name, "a");
                Ok(cluster("a"))
            })
            .await;
        assert!(next.is_ok());
    }

    #[tokio::test]
    async fn the_cache_holds_at_most_its_capacity() {
        let cache = HomeCache::new(3, Duration::from_secs(3600));
        for tenant in ["t1", "t2", "t3", "t4", "t5"] {
            let _ = cache.home(tenant, |_| async { Ok(cluster("a")) }).await;
        }
        assert_eq!(cache.cached_tenants(), 3);
    }
}
