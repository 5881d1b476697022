//! The load balancer: moves bundles off busy brokers (docs/cluster.md, "Built: the load
//! balancer").
//!
//! - **Load reports.** Every broker writes `load/<broker-id>` on its lease every report
//!   interval: per owned bundle, the messages and bytes per second its loaded topics received
//!   and dispatched during the interval ([`LoadReport`]).
//! - **The leader.** Every shedding interval each broker campaigns for `leader` (a key on its
//!   lease: one holder while it lives). The leader reads every report and, when the busiest
//!   broker's throughput is more than the threshold above the average, picks the one bundle whose
//!   move to the least-loaded broker lowers the peak most ([`plan`]), and writes
//!   `assign/<bundle>` = `{from, to}` on its own lease ([`Assignment`]).
//! - **The move.** The owner sees the assignment at its next report and unloads the bundle (as
//!   the admin API's unload does: clients closed, cursors persisted, owner key released). The
//!   clients look their topics up again; a lookup of a bundle nobody owns that has an assignment
//!   to another live broker answers with that broker, which takes the bundle
//!   ([`super::ClusterMode::lookup`]) and deletes the assignment.
//!
//! A bundle that moved rests for the grace period before it may move again, and the leader
//! waits for reports that cover a whole interval after its last move before it decides anew, so
//! a bundle does not bounce on stale figures.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{bundles, lock, unavailable, ClusterMode};
use crate::clock::now_ms;
use crate::error::Result;
use crate::stats::Traffic;
use crate::Broker;

/// The load balancer's settings (`load_balancer_*` in docs/configuration.md).
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// Pulsar's `loadBalancerEnabled`: without it, brokers neither report nor shed.
    pub enabled: bool,
    /// How often a broker writes its load report and looks for bundles assigned away.
    pub report_interval: Duration,
    /// How often the leader looks for a bundle to move (Pulsar's
    /// `loadBalancerSheddingIntervalMinutes`).
    pub shedding_interval: Duration,
    /// How far above the average a broker's throughput must be for a bundle to leave it, in
    /// percent (Pulsar's `loadBalancerBrokerThresholdShedderPercentage`).
    pub threshold_percentage: f64,
    /// The least throughput (bytes per second, in and out) a bundle must carry to be moved
    /// (Pulsar's `loadBalancerBundleUnloadMinThroughputThreshold`, in MB there).
    pub min_bundle_throughput: f64,
    /// How long a moved bundle stays where it went (Pulsar's
    /// `loadBalancerSheddingGracePeriodMinutes`).
    pub grace_period: Duration,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            enabled: true,
            report_interval: Duration::from_secs(10),
            shedding_interval: Duration::from_secs(60),
            threshold_percentage: 10.0,
            min_bundle_throughput: 10.0 * 1024.0 * 1024.0,
            grace_period: Duration::from_secs(30 * 60),
        }
    }
}

/// One bundle's traffic over the last report interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BundleLoad {
    pub msg_rate_in: f64,
    pub msg_rate_out: f64,
    pub msg_throughput_in: f64,
    pub msg_throughput_out: f64,
    /// Its topics loaded on the owner.
    pub topics: u64,
}

impl BundleLoad {
    /// Bytes per second in and out: what the balancer evens out.
    pub fn throughput(&self) -> f64 {
        self.msg_throughput_in + self.msg_throughput_out
    }
}

/// The value of `load/<broker-id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub broker_id: String,
    /// When the report was made (ms since the Unix epoch, the reporting broker's clock).
    pub timestamp: u64,
    /// Every bundle the broker owns, with its traffic.
    pub bundles: BTreeMap<String, BundleLoad>,
}

impl LoadReport {
    pub fn throughput(&self) -> f64 {
        self.bundles.values().map(BundleLoad::throughput).sum()
    }
}

/// The value of `assign/<bundle>`: the leader's decision that the bundle leaves `from` for
/// `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub from: String,
    pub to: String,
    /// When the leader decided (ms since the Unix epoch).
    pub timestamp: u64,
}

/// A bundle to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub bundle: String,
    pub from: String,
    pub to: String,
}

pub(super) fn assignment_key(bundle: &str) -> String {
    format!("assign/{bundle}")
}

/// How long an assignment stands: a bundle that did not move by then (its target died, its
/// owner could not unload it) is placed as any unowned bundle again.
pub(super) fn assignment_lifetime(config: &BalancerConfig) -> Duration {
    config.shedding_interval * 2 + config.report_interval * 3 + Duration::from_secs(30)
}

/// The leader's decision on one set of reports: which bundle to move, if any. Only the busiest
/// broker sheds, one bundle at a time, to the least-loaded broker, and only when the move
/// lowers the higher of the two brokers' throughputs. `resting` tells bundles that moved within
/// the grace period.
pub fn plan(
    reports: &[LoadReport],
    config: &BalancerConfig,
    resting: impl Fn(&str) -> bool,
) -> Option<Move> {
    if reports.len() < 2 {
        return None;
    }
    let load = |report: &LoadReport| report.throughput();
    let average = reports.iter().map(load).sum::<f64>() / reports.len() as f64;
    // Ties go to the lower broker id, so every run decides the same way on the same figures.
    let by_load = |a: &&LoadReport, b: &&LoadReport| {
        load(a)
            .total_cmp(&load(b))
            .then_with(|| b.broker_id.cmp(&a.broker_id))
    };
    let busiest = reports.iter().max_by(by_load)?;
    let lightest = reports.iter().min_by(by_load)?;
    let (busy, light) = (load(busiest), load(lightest));
    if busy <= average * (1.0 + config.threshold_percentage / 100.0) || busy <= light {
        return None;
    }
    busiest
        .bundles
        .iter()
        .filter(|(bundle, bundle_load)| {
            bundle_load.throughput() > 0.0
                && bundle_load.throughput() >= config.min_bundle_throughput
                && !resting(bundle)
        })
        .map(|(bundle, bundle_load)| {
            let moved = bundle_load.throughput();
            (bundle, (busy - moved).max(light + moved))
        })
        .filter(|(_, peak)| *peak < busy)
        .min_by(|(a, peak_a), (b, peak_b)| peak_a.total_cmp(peak_b).then_with(|| a.cmp(b)))
        .map(|(bundle, _)| Move {
            bundle: bundle.clone(),
            from: busiest.broker_id.clone(),
            to: lightest.broker_id.clone(),
        })
}

/// Per-bundle traffic from per-topic counters: the reporter keeps each loaded topic's counters
/// of the previous report and turns the difference into rates.
#[derive(Default)]
struct Meter {
    previous: HashMap<String, Traffic>,
    at: Option<Instant>,
}

impl Meter {
    /// The load of each of `owned` over the time since the last call, from `topics`' counters
    /// (a topic seen for the first time counts from now on).
    fn loads(
        &mut self,
        owned: &[String],
        topics: &[(String, crate::topic_name::TopicName, Traffic)],
    ) -> BTreeMap<String, BundleLoad> {
        let now = Instant::now();
        let elapsed = self
            .at
            .map(|at| now.duration_since(at).as_secs_f64())
            .filter(|elapsed| *elapsed > 0.0);
        self.at = Some(now);
        let mut loads: BTreeMap<String, BundleLoad> = owned
            .iter()
            .map(|bundle| (bundle.clone(), BundleLoad::default()))
            .collect();
        let mut current = HashMap::with_capacity(topics.len());
        for (key, name, traffic) in topics {
            let before = self.previous.get(key).copied();
            current.insert(key.clone(), *traffic);
            let Some(bundle) = owned
                .iter()
                .find(|bundle| bundles::bundle_holds(bundle, name))
            else {
                continue;
            };
            let load = loads.entry(bundle.clone()).or_default();
            load.topics += 1;
            let (Some(before), Some(elapsed)) = (before, elapsed) else {
                continue;
            };
            let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / elapsed;
            load.msg_rate_in += rate(traffic.messages_in, before.messages_in);
            load.msg_rate_out += rate(traffic.messages_out, before.messages_out);
            load.msg_throughput_in += rate(traffic.bytes_in, before.bytes_in);
            load.msg_throughput_out += rate(traffic.bytes_out, before.bytes_out);
        }
        self.previous = current;
        loads
    }
}

/// The leader's memory between runs.
#[derive(Default)]
struct Leader {
    /// Bundles it moved, and when: they rest for the grace period.
    moved: HashMap<String, Instant>,
    /// When it last moved a bundle (ms since the Unix epoch).
    last_move_ms: Option<u64>,
}

/// Runs the load balancer of this broker until the process ends: reports every report
/// interval, and campaigns and sheds every shedding interval.
pub async fn run(broker: Arc<Broker>, mode: Arc<ClusterMode>, config: BalancerConfig) {
    *lock(&mode.balancer) = config.clone();
    if !config.enabled {
        return;
    }
    if mode.logs().is_none() {
        // A bundle's topics would not follow it: their entries stay on this broker's disk.
        tracing::info!(
            "load balancer off: without --storage each broker keeps its topics on its own disk"
        );
        return;
    }
    let mut meter = Meter::default();
    let mut leader = Leader::default();
    let mut reports = tokio::time::interval(config.report_interval);
    let mut shedding = tokio::time::interval(config.shedding_interval);
    reports.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    shedding.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    shedding.tick().await; // the first tick is immediate: shed only once reports exist
    loop {
        tokio::select! {
            _ = reports.tick() => {
                if let Err(error) = report(&broker, &mode, &mut meter).await {
                    tracing::warn!(%error, "load report not written");
                }
            }
            _ = shedding.tick() => {
                if let Err(error) = shed(&mode, &config, &mut leader).await {
                    tracing::warn!(%error, "load shedding skipped");
                }
            }
        }
    }
}

/// Writes this broker's load report, then unloads every bundle it owns that the leader
/// assigned to another broker.
async fn report(broker: &Arc<Broker>, mode: &Arc<ClusterMode>, meter: &mut Meter) -> Result<()> {
    let owned = mode.owned_bundles();
    let topics: Vec<_> = broker
        .loaded_topics()
        .iter()
        .map(|topic| (topic.name.to_string(), topic.name.clone(), topic.traffic()))
        .collect();
    let report = LoadReport {
        broker_id: mode.broker_id().to_string(),
        timestamp: now_ms(),
        bundles: meter.loads(&owned, &topics),
    };
    let value = serde_json::to_vec(&report).unwrap_or_default();
    let (writer, key) = (mode.clone(), format!("load/{}", mode.broker_id()));
    let assigned_away = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let Some(session) = writer.live_session() else {
            return Ok(Vec::new());
        };
        session.put_leased(&key, &value).map_err(unavailable)?;
        Ok(writer
            .assignments()?
            .into_iter()
            .filter(|(bundle, assignment)| {
                assignment.from == writer.broker_id
                    && assignment.to != writer.broker_id
                    && writer.owns(bundle)
            })
            .map(|(bundle, _)| bundle)
            .collect())
    })
    .await
    .map_err(|error| crate::error::BrokerError::Unknown(error.to_string()))??;
    for bundle in assigned_away {
        tracing::info!(
            bundle,
            "the load balancer moves this bundle away: unloading it"
        );
        if let Err(error) = mode.unload_bundle(broker, &bundle).await {
            tracing::warn!(bundle, %error, "unloading a bundle the load balancer moved failed");
        }
    }
    Ok(())
}

/// One leader run: campaigns, and when this broker leads, moves at most one bundle.
async fn shed(mode: &Arc<ClusterMode>, config: &BalancerConfig, leader: &mut Leader) -> Result<()> {
    let mode = mode.clone();
    let config = config.clone();
    let mut state = std::mem::take(leader);
    let (state, outcome) = tokio::task::spawn_blocking(move || {
        let outcome = shed_blocking(&mode, &config, &mut state);
        (state, outcome)
    })
    .await
    .map_err(|error| crate::error::BrokerError::Unknown(error.to_string()))?;
    *leader = state;
    outcome
}

fn shed_blocking(mode: &ClusterMode, config: &BalancerConfig, leader: &mut Leader) -> Result<()> {
    let Some(session) = mode.live_session() else {
        return Ok(());
    };
    if !session.campaign("leader").map_err(unavailable)? {
        *leader = Leader::default(); // another broker leads: forget our moves
        return Ok(());
    }
    let now = now_ms();
    let lifetime = assignment_lifetime(config).as_millis() as u64;
    for (bundle, assignment) in mode.assignments()? {
        if now.saturating_sub(assignment.timestamp) > lifetime {
            mode.assignment_done(&bundle);
        }
    }
    let reports = mode.load_reports()?;
    // Figures from before the last move ended say nothing about where things stand now.
    if let Some(last) = leader.last_move_ms {
        let settled = last + 2 * config.report_interval.as_millis() as u64;
        if reports.iter().any(|report| report.timestamp < settled) {
            return Ok(());
        }
    }
    leader
        .moved
        .retain(|_, at| at.elapsed() < config.grace_period);
    let Some(decision) = plan(&reports, config, |bundle| leader.moved.contains_key(bundle)) else {
        return Ok(());
    };
    let assignment = Assignment {
        from: decision.from.clone(),
        to: decision.to.clone(),
        timestamp: now,
    };
    session
        .put_leased(
            &assignment_key(&decision.bundle),
            &serde_json::to_vec(&assignment).unwrap_or_default(),
        )
        .map_err(unavailable)?;
    tracing::info!(
        bundle = %decision.bundle,
        from = %decision.from,
        to = %decision.to,
        "load balancer: moving a bundle off the busiest broker"
    );
    leader.moved.insert(decision.bundle, Instant::now());
    leader.last_move_ms = Some(now);
    Ok(())
}

impl ClusterMode {
    /// Every broker's last load report (live brokers only: reports live on their leases).
    /// Blocking.
    pub fn load_reports(&self) -> Result<Vec<LoadReport>> {
        let prefix = self.cluster.key("load/");
        let mut reports = Vec::new();
        self.cluster
            .client()
            .scan_prefix(&prefix, 1000, false, |page| {
                reports.extend(
                    page.iter()
                        .filter_map(|kv| serde_json::from_slice::<LoadReport>(&kv.value).ok()),
                );
            })
            .map_err(unavailable)?;
        Ok(reports)
    }

    /// The leader's standing assignments, by bundle. Blocking.
    fn assignments(&self) -> Result<Vec<(String, Assignment)>> {
        let prefix = self.cluster.key("assign/");
        let mut assignments = Vec::new();
        self.cluster
            .client()
            .scan_prefix(&prefix, 1000, false, |page| {
                assignments.extend(page.iter().filter_map(|kv| {
                    let bundle = kv.key.strip_prefix(&prefix)?.to_string();
                    let assignment = serde_json::from_slice::<Assignment>(&kv.value).ok()?;
                    Some((bundle, assignment))
                }));
            })
            .map_err(unavailable)?;
        Ok(assignments)
    }

    /// The broker the load balancer assigned `bundle` (nobody owns it) to, if that is another
    /// broker and the assignment stands. Blocking.
    pub(super) fn assigned_to_other(&self, bundle: &str) -> Result<Option<String>> {
        let key = self.cluster.key(&assignment_key(bundle));
        let Some(kv) = self.cluster.client().get(&key).map_err(unavailable)? else {
            return Ok(None);
        };
        let Ok(assignment) = serde_json::from_slice::<Assignment>(&kv.value) else {
            return Ok(None);
        };
        let lifetime = assignment_lifetime(&lock(&self.balancer).clone()).as_millis() as u64;
        if assignment.to == self.broker_id
            || now_ms().saturating_sub(assignment.timestamp) > lifetime
        {
            return Ok(None);
        }
        Ok(Some(assignment.to))
    }

    /// Deletes the assignment of `bundle`: this broker just took the bundle, or (the leader) the
    /// assignment expired. Best effort: an assignment left behind expires.
    pub(super) fn assignment_done(&self, bundle: &str) {
        let key = self.cluster.key(&assignment_key(bundle));
        if let Err(error) = self
            .cluster
            .client()
            .txn(&[], &[meridian_etcd::Op::Delete(key)], &[])
        {
            tracing::debug!(bundle, %error, "deleting a done assignment failed; it expires");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BalancerConfig {
        BalancerConfig {
            min_bundle_throughput: 0.0,
            ..BalancerConfig::default()
        }
    }

    fn report(broker: &str, bundles: &[(&str, f64)]) -> LoadReport {
        LoadReport {
            broker_id: broker.to_string(),
            timestamp: 0,
            bundles: bundles
                .iter()
                .map(|(bundle, throughput)| {
                    let load = BundleLoad {
                        msg_throughput_in: *throughput,
                        ..BundleLoad::default()
                    };
                    (bundle.to_string(), load)
                })
                .collect(),
        }
    }

    #[test]
    fn the_busiest_broker_sheds_the_bundle_that_evens_out_the_load() {
        let reports = [
            report(
                "a",
                &[
                    ("ns/1", 100.0),
                    ("ns/2", 100.0),
                    ("ns/3", 100.0),
                    ("ns/4", 100.0),
                ],
            ),
            report("b", &[]),
        ];
        let decision = plan(&reports, &config(), |_| false).expect("a move");
        assert_eq!((decision.from.as_str(), decision.to.as_str()), ("a", "b"));
        assert_eq!(decision.bundle, "ns/1");
        // The next run, once the move shows in the reports: one more, then balance.
        let reports = [
            report("a", &[("ns/2", 100.0), ("ns/3", 100.0), ("ns/4", 100.0)]),
            report("b", &[("ns/1", 100.0)]),
        ];
        assert_eq!(
            plan(&reports, &config(), |_| false).expect("a move").bundle,
            "ns/2"
        );
        let reports = [
            report("a", &[("ns/3", 100.0), ("ns/4", 100.0)]),
            report("b", &[("ns/1", 100.0), ("ns/2", 100.0)]),
        ];
        assert_eq!(plan(&reports, &config(), |_| false), None);
    }

    #[test]
    fn a_move_that_would_only_move_the_peak_is_not_made() {
        // One hot bundle: moving it makes b the busiest by as much.
        let reports = [report("a", &[("ns/1", 1000.0)]), report("b", &[])];
        assert_eq!(plan(&reports, &config(), |_| false), None);
        // A hot and a warm one: the warm one moves, the hot one stays.
        let reports = [
            report("a", &[("ns/1", 1000.0), ("ns/2", 300.0)]),
            report("b", &[("ns/3", 200.0)]),
        ];
        assert_eq!(
            plan(&reports, &config(), |_| false).expect("a move").bundle,
            "ns/2"
        );
    }

    #[test]
    fn nothing_moves_within_the_threshold_below_the_minimum_or_while_resting() {
        let balanced = [
            report("a", &[("ns/1", 105.0)]),
            report("b", &[("ns/2", 95.0)]),
        ];
        assert_eq!(plan(&balanced, &config(), |_| false), None);
        let reports = [
            report("a", &[("ns/1", 60.0), ("ns/2", 60.0)]),
            report("b", &[]),
        ];
        let strict = BalancerConfig {
            min_bundle_throughput: 100.0,
            ..config()
        };
        assert_eq!(plan(&reports, &strict, |_| false), None);
        assert_eq!(
            plan(&reports, &config(), |bundle| bundle == "ns/1")
                .expect("a move")
                .bundle,
            "ns/2"
        );
        assert_eq!(plan(&reports, &config(), |_| true), None);
        assert_eq!(plan(&reports[..1], &config(), |_| false), None);
    }

    #[test]
    fn bundle_loads_are_rates_of_the_counters_between_reports() {
        let name = crate::topic_name::TopicName::parse("persistent://t/ns/x").expect("name");
        let bundle = bundles::bundle_of(&name, 1);
        let owned = vec![bundle.clone()];
        let mut meter = Meter::default();
        let traffic = |messages: u64| Traffic {
            messages_in: messages,
            bytes_in: messages * 10,
            messages_out: messages / 2,
            bytes_out: messages * 5,
        };
        let first = meter.loads(&owned, &[(name.to_string(), name.clone(), traffic(1000))]);
        assert_eq!(
            first[&bundle].throughput(),
            0.0,
            "no figure before a second report"
        );
        assert_eq!(first[&bundle].topics, 1);
        meter.at = Some(Instant::now() - Duration::from_secs(2));
        let second = meter.loads(&owned, &[(name.to_string(), name.clone(), traffic(3000))]);
        let load = &second[&bundle];
        // Two seconds and a little more went by: rates of 1,000 messages per second at most.
        assert!(
            load.msg_rate_in <= 1000.0 && load.msg_rate_in > 800.0,
            "{load:?}"
        );
        assert!(load.msg_throughput_in <= 10_000.0 && load.msg_throughput_in > 8_000.0);
        assert!(load.msg_throughput_out <= 5_000.0 && load.msg_throughput_out > 4_000.0);
    }
}
