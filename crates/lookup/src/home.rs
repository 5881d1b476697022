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

use crate::clusters::{Cluster, Clusters, MigrationRecord};
use crate::error::LookupError;
use crate::lock;

/// Most migrations followed from one cluster to the next in one check.
const MAX_HOPS: usize = 8;

/// The questions the rule asks the clusters: the seam between the rule and the network, so
/// that the rule is unit-tested without one. [`Clusters`] is the real one.
pub(crate) trait Directory {
    /// How many members there are, and each one's web URL.
    fn member_count(&self) -> usize;
    fn member_url(&self, index: usize) -> &str;
    /// The members' web URLs, for messages.
    fn member_urls(&self) -> String;
    /// Member `index` with its name and URLs.
    async fn member(&self, index: usize) -> Result<Cluster, LookupError>;
    /// The cluster called `name`, as `via` (which names it) knows it.
    async fn named(&self, name: &str, via: &Cluster) -> Result<Cluster, LookupError>;
    /// Whether the cluster at `web_url` has `tenant`.
    async fn has_tenant(&self, web_url: &str, tenant: &str) -> Result<bool, LookupError>;
    /// The migration record of `tenant` at `web_url`, if any.
    async fn migration(
        &self,
        web_url: &str,
        tenant: &str,
    ) -> Result<Option<MigrationRecord>, LookupError>;
}

impl Directory for Clusters {
    fn member_count(&self) -> usize {
        Clusters::member_count(self)
    }
    fn member_url(&self, index: usize) -> &str {
        Clusters::member_url(self, index)
    }
    fn member_urls(&self) -> String {
        Clusters::member_urls(self)
    }
    async fn member(&self, index: usize) -> Result<Cluster, LookupError> {
        Clusters::member(self, index).await
    }
    async fn named(&self, name: &str, via: &Cluster) -> Result<Cluster, LookupError> {
        Clusters::named(self, name, via).await
    }
    async fn has_tenant(&self, web_url: &str, tenant: &str) -> Result<bool, LookupError> {
        Clusters::has_tenant(self, web_url, tenant).await
    }
    async fn migration(
        &self,
        web_url: &str,
        tenant: &str,
    ) -> Result<Option<MigrationRecord>, LookupError> {
        Clusters::migration(self, web_url, tenant).await
    }
}

/// Where `tenant` lives now, starting from `known` (its last home) when there is one.
pub(crate) async fn resolve<D: Directory>(
    clusters: &D,
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
async fn follow<D: Directory>(
    clusters: &D,
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
async fn discover<D: Directory>(clusters: &D, tenant: &str) -> Result<Cluster, LookupError> {
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
/// check runs at a time per tenant. The lock is held across the check on purpose (a single
/// flight: a thousand lookups of a partitioned topic make one check, not a thousand); only
/// the same tenant's lookups wait, and every call the check makes has a deadline.
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
    use std::collections::HashSet;

    /// Clusters as the rule sees them: who is up, who has which tenant, which records.
    #[derive(Default)]
    struct World {
        clusters: Vec<Fake>,
        /// How many of `clusters` (the first ones) are members; the others are only registered.
        members: usize,
    }

    struct Fake {
        cluster: Cluster,
        up: bool,
        tenants: HashSet<String>,
        records: HashMap<String, MigrationRecord>,
    }

    impl World {
        fn with(mut self, name: &str, member: bool, tenants: &[&str]) -> World {
            let fake = Fake {
                cluster: cluster(name),
                up: true,
                tenants: tenants.iter().map(|tenant| tenant.to_string()).collect(),
                records: HashMap::new(),
            };
            if member {
                self.clusters.insert(self.members, fake);
                self.members += 1;
            } else {
                self.clusters.push(fake);
            }
            self
        }

        fn migrating(mut self, source: &str, tenant: &str, phase: &str, target: &str) -> World {
            self.fake_mut(source).records.insert(
                tenant.to_string(),
                MigrationRecord {
                    phase: phase.to_string(),
                    target_cluster: target.to_string(),
                },
            );
            self
        }

        fn down(mut self, name: &str) -> World {
            self.fake_mut(name).up = false;
            self
        }

        fn fake_mut(&mut self, name: &str) -> &mut Fake {
            self.clusters
                .iter_mut()
                .find(|fake| fake.cluster.name == name)
                .expect("a cluster of the world")
        }

        fn at(&self, web_url: &str) -> Result<&Fake, LookupError> {
            let fake = self
                .clusters
                .iter()
                .find(|fake| fake.cluster.web_url == web_url)
                .expect("a cluster of the world");
            if fake.up {
                Ok(fake)
            } else {
                Err(LookupError::Unreachable {
                    cluster: web_url.to_string(),
                    reason: "down".into(),
                })
            }
        }
    }

    impl Directory for World {
        fn member_count(&self) -> usize {
            self.members
        }
        fn member_url(&self, index: usize) -> &str {
            &self.clusters[index].cluster.web_url
        }
        fn member_urls(&self) -> String {
            (0..self.members)
                .map(|index| self.member_url(index))
                .collect::<Vec<_>>()
                .join(", ")
        }
        async fn member(&self, index: usize) -> Result<Cluster, LookupError> {
            Ok(self.at(self.member_url(index))?.cluster.clone())
        }
        async fn named(&self, name: &str, via: &Cluster) -> Result<Cluster, LookupError> {
            self.at(&via.web_url)?;
            self.clusters
                .iter()
                .find(|fake| fake.cluster.name == name)
                .map(|fake| fake.cluster.clone())
                .ok_or_else(|| LookupError::UnknownCluster {
                    name: name.to_string(),
                    reason: "not registered".into(),
                })
        }
        async fn has_tenant(&self, web_url: &str, tenant: &str) -> Result<bool, LookupError> {
            Ok(self.at(web_url)?.tenants.contains(tenant))
        }
        async fn migration(
            &self,
            web_url: &str,
            tenant: &str,
        ) -> Result<Option<MigrationRecord>, LookupError> {
            Ok(self.at(web_url)?.records.get(tenant).cloned())
        }
    }

    async fn home(world: &World, known: Option<&str>) -> Result<String, LookupError> {
        resolve(world, "t", known.map(cluster))
            .await
            .map(|home| home.name)
    }

    #[tokio::test]
    async fn the_home_is_the_cluster_with_the_tenant() {
        let world = World::default()
            .with("a", true, &[])
            .with("b", true, &["t"]);
        assert_eq!(home(&world, None).await.expect("home"), "b");
        let nowhere = World::default().with("a", true, &[]);
        assert!(matches!(
            home(&nowhere, None).await,
            Err(LookupError::NoHome { .. })
        ));
    }

    #[tokio::test]
    async fn a_migration_source_is_home_until_producers_are_redirected() {
        // b is listed first and has the tenant too, but a is the source of a migration.
        let before = World::default()
            .with("b", true, &["t"])
            .with("a", true, &["t"])
            .migrating("a", "t", "subscriptionsSynced", "b");
        assert_eq!(home(&before, None).await.expect("home"), "a");
        for phase in ["producersRedirected", "consumersRedirected", "done"] {
            let after = World::default()
                .with("a", true, &["t"])
                .with("b", true, &["t"])
                .migrating("a", "t", phase, "b");
            assert_eq!(home(&after, None).await.expect("home"), "b", "{phase}");
            assert_eq!(home(&after, Some("a")).await.expect("home"), "b", "{phase}");
        }
        // Without any record, the first listed of those with the tenant.
        let replicated = World::default()
            .with("b", true, &["t"])
            .with("a", true, &["t"]);
        assert_eq!(home(&replicated, None).await.expect("home"), "b");
    }

    #[tokio::test]
    async fn a_target_outside_the_set_and_a_chain_of_moves_are_followed() {
        let world = World::default()
            .with("a", true, &["t"])
            .with("b", true, &[])
            .with("c", false, &["t"])
            .with("d", false, &["t"])
            .migrating("a", "t", "done", "c")
            .migrating("c", "t", "producersRedirected", "d");
        assert_eq!(home(&world, None).await.expect("home"), "d");
        let cycle = World::default()
            .with("a", true, &["t"])
            .with("b", true, &["t"])
            .migrating("a", "t", "done", "b")
            .migrating("b", "t", "done", "a");
        assert!(home(&cycle, None).await.is_err());
    }

    #[tokio::test]
    async fn a_silent_member_blocks_only_tenants_without_a_known_home() {
        let world = World::default()
            .with("a", true, &["t"])
            .with("b", true, &[])
            .down("b");
        match home(&world, None).await {
            Err(LookupError::Unreachable { cluster, .. }) => assert_eq!(cluster, "http://b"),
            other => panic!("expected b unreachable, got {other:?}"),
        }
        assert_eq!(home(&world, Some("a")).await.expect("home"), "a");
        // The known home down: no guess either.
        let home_down = World::default()
            .with("a", true, &["t"])
            .with("b", true, &["t"])
            .down("a");
        assert!(matches!(
            home(&home_down, Some("a")).await,
            Err(LookupError::Unreachable { .. })
        ));
    }

    #[tokio::test]
    async fn a_home_that_lost_the_tenant_is_replaced() {
        let world = World::default()
            .with("a", true, &[])
            .with("b", true, &["t"]);
        assert_eq!(home(&world, Some("a")).await.expect("home"), "b");
    }

    fn cluster(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            web_url: format!("http://{name}"),
            broker_url: format!("pulsar://{name}"),
            service_url: None,
            service_url_tls: None,
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
