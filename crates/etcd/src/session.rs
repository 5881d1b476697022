//! A broker's session: its registration on an etcd lease, the thread that keeps the lease alive,
//! the signal that it is lost, and bundle ownership with epochs and fenced commits.
//!
//! Invariants (docs/cluster.md, "Ownership, lookup and fencing"):
//! - `owners/<bundle>` exists only while its owner's lease lives, and holds `{broker_id, epoch}`.
//! - `epochs/<bundle>` never goes back: every acquisition writes `last + 1` in the same
//!   transaction that creates the owner key, comparing the epoch key's `mod_revision`, so two
//!   brokers racing cannot both win, nor win with the same epoch.
//! - A fenced commit compares `owners/<bundle>` with this broker's exact record: once the lease
//!   expired or another broker acquired the bundle, no commit of the old owner can succeed,
//!   whatever the old owner believes (etcd decides, not the old owner's clock).
//! - The lease is reported lost no later than etcd could expire it: the local deadline runs from
//!   when the last successful keepalive was *sent*, plus the TTL etcd granted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::client::{Client, Compare, KeyValue, Op};
use crate::{check_name, Cluster, EtcdError, Result};

/// Attempts of [`Session::try_acquire`] when only the epoch key moved under it (another broker
/// acquired and released the bundle in between).
const ACQUIRE_ATTEMPTS: usize = 8;
/// Pause between keepalive attempts after a failed one.
const KEEPALIVE_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// The shortest deadline given to one keepalive request.
const KEEPALIVE_MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// Settings of a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The lease's time to live: how long after the broker stops renewing (crash, pause,
    /// partition) its keys disappear and its bundles can move. At least 1 s (etcd may raise it
    /// to its minimum).
    pub ttl: Duration,
    /// How often the lease is renewed; `None` = a third of the TTL. Must be below the TTL.
    pub keepalive_interval: Option<Duration>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            ttl: Duration::from_secs(10),
            keepalive_interval: None,
        }
    }
}

/// Why a session's lease is gone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    /// etcd answered that the lease no longer exists (expired or revoked).
    #[error("etcd reports the lease expired or revoked")]
    Expired,
    /// No keepalive succeeded before the TTL ran out (etcd unreachable, process paused).
    #[error("no successful keepalive within the lease TTL of {ttl:?}")]
    NotRenewed { ttl: Duration },
    /// The session was closed by its owner.
    #[error("the session was closed")]
    Closed,
}

/// The value of `owners/<bundle>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub broker_id: String,
    pub epoch: u64,
}

impl OwnerRecord {
    /// The stored bytes (JSON with a fixed field order, so equal records are equal bytes, which
    /// the fenced commit's value compare relies on).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<OwnerRecord> {
        serde_json::from_slice(bytes).map_err(|error| EtcdError::BadData {
            key: key.to_string(),
            message: format!("not an owner record: {error}"),
        })
    }
}

/// Proof of having acquired a bundle: what fenced commits and release compare against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    bundle: String,
    record: OwnerRecord,
    /// The etcd revision of the acquisition.
    revision: u64,
}

impl Ownership {
    pub fn bundle(&self) -> &str {
        &self.bundle
    }

    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    /// The etcd revision at which the bundle was acquired.
    pub fn revision(&self) -> u64 {
        self.revision
    }
}

/// The outcome of [`Session::try_acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// This broker now owns the bundle under a new epoch.
    Acquired(Ownership),
    /// The bundle is owned (possibly by this broker, acquired earlier).
    Owned(OwnerRecord),
}

/// State shared with the keepalive thread.
struct Shared {
    lost: watch::Sender<Option<LeaseLost>>,
    renewals: AtomicU64,
}

impl Shared {
    /// Records the first reason the lease was lost; later ones are ignored.
    fn mark_lost(&self, reason: LeaseLost) {
        self.lost.send_if_modified(|state| {
            if state.is_none() {
                *state = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

/// A broker's registration `brokers/<id>` on a lease, renewed by a background thread.
///
/// Dropping the session stops renewing (the lease then expires after its TTL, like a crash);
/// [`Session::close`] revokes it at once, releasing every bundle the broker owns.
pub struct Session {
    cluster: Cluster,
    broker_id: String,
    lease: i64,
    ttl: Duration,
    shared: Arc<Shared>,
    /// Dropping it stops the keepalive thread.
    stop: Option<mpsc::Sender<()>>,
    keepalive: Option<JoinHandle<()>>,
}

impl Session {
    /// Grants a lease, registers `brokers/<broker_id>` = `registration` on it (refused when a
    /// live session already registered the id) and starts renewing it.
    pub fn start(
        cluster: Cluster,
        broker_id: &str,
        registration: &[u8],
        options: SessionOptions,
    ) -> Result<Session> {
        check_name("broker id", broker_id, false)?;
        let client = cluster.client().clone();
        let granted_at = Instant::now();
        let (lease, ttl) = client.lease_grant(options.ttl)?;
        let interval = options.keepalive_interval.unwrap_or(ttl / 3);
        if interval.is_zero() || interval >= ttl {
            // Best effort: an unused lease also expires by itself.
            let _ = client.lease_revoke(lease);
            return Err(EtcdError::Config(format!(
                "keepalive interval {interval:?} must be above zero and below the lease TTL {ttl:?}"
            )));
        }
        let key = cluster.key(&format!("brokers/{broker_id}"));
        let registered = client.txn(
            &[Compare::Absent(key.clone())],
            &[Op::Put {
                key,
                value: registration.to_vec(),
                lease,
            }],
            &[],
        );
        match registered {
            Ok(result) if result.succeeded => {}
            outcome => {
                // Best effort: an unused lease also expires by itself.
                let _ = client.lease_revoke(lease);
                outcome?;
                return Err(EtcdError::AlreadyRegistered {
                    broker_id: broker_id.to_string(),
                });
            }
        }
        let shared = Arc::new(Shared {
            lost: watch::channel(None).0,
            renewals: AtomicU64::new(0),
        });
        let (stop, stopped) = mpsc::channel();
        let keepalive = {
            let shared = shared.clone();
            let broker_id = broker_id.to_string();
            let deadline = granted_at + ttl;
            std::thread::Builder::new()
                .name(format!("etcd-lease-{broker_id}"))
                .spawn(move || {
                    keepalive_loop(
                        &client, &broker_id, lease, ttl, interval, deadline, &shared, &stopped,
                    )
                })
                .map_err(|error| {
                    EtcdError::Config(format!("starting the keepalive thread: {error}"))
                })?
        };
        tracing::info!(broker_id, lease, ?ttl, "registered in etcd");
        Ok(Session {
            cluster,
            broker_id: broker_id.to_string(),
            lease,
            ttl,
            shared,
            stop: Some(stop),
            keepalive: Some(keepalive),
        })
    }

    pub fn broker_id(&self) -> &str {
        &self.broker_id
    }

    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// The TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Successful renewals so far.
    pub fn renewals(&self) -> u64 {
        self.shared.renewals.load(Ordering::Relaxed)
    }

    /// `false` once the lease is known lost (see [`Session::lost`]).
    pub fn is_alive(&self) -> bool {
        self.shared.lost.borrow().is_none()
    }

    /// A channel that becomes `Some(reason)` the moment the lease is known lost. The broker must
    /// then stop serving every bundle at once: its owner keys are gone or about to be.
    pub fn lost(&self) -> watch::Receiver<Option<LeaseLost>> {
        self.shared.lost.subscribe()
    }

    fn check_alive(&self) -> Result<()> {
        match self.shared.lost.borrow().clone() {
            None => Ok(()),
            Some(reason) => Err(EtcdError::SessionLost {
                broker_id: self.broker_id.clone(),
                reason,
            }),
        }
    }

    /// Maps "lease not found" to a lost session (and records it).
    fn on_lease_error(&self, error: EtcdError) -> EtcdError {
        if let EtcdError::LeaseNotFound { .. } = error {
            self.shared.mark_lost(LeaseLost::Expired);
            return EtcdError::SessionLost {
                broker_id: self.broker_id.clone(),
                reason: LeaseLost::Expired,
            };
        }
        error
    }

    fn client(&self) -> &Client {
        self.cluster.client()
    }

    fn bundle_keys(&self, bundle: &str) -> Result<(String, String)> {
        check_name("bundle", bundle, true)?;
        Ok((
            self.cluster.key(&format!("owners/{bundle}")),
            self.cluster.key(&format!("epochs/{bundle}")),
        ))
    }

    /// Takes `bundle` if nobody owns it: in one transaction, creates `owners/<bundle>` =
    /// `{broker_id, epoch}` on this session's lease and sets `epochs/<bundle>` to `epoch`, the
    /// previous epoch + 1.
    pub fn try_acquire(&self, bundle: &str) -> Result<Acquire> {
        self.try_acquire_if(bundle, &[])
    }

    /// [`Session::try_acquire`] that also requires `conditions` (keys relative to the cluster
    /// root), e.g. that the namespace's bundle boundaries are still those the bundle was
    /// computed from. When a condition does not hold (and nobody owns the bundle),
    /// [`EtcdError::CompareFailed`] names its key: the caller re-reads and tries again.
    pub fn try_acquire_if(&self, bundle: &str, conditions: &[Compare]) -> Result<Acquire> {
        self.check_alive()?;
        let (owner_key, epoch_key) = self.bundle_keys(bundle)?;
        let conditions = self.rooted(conditions);
        let mut epoch_kv = self.client().get(&epoch_key)?;
        for _ in 0..ACQUIRE_ATTEMPTS {
            let (last, last_revision) = match &epoch_kv {
                None => (0, 0),
                Some(kv) => (parse_epoch(kv)?, kv.mod_revision),
            };
            let record = OwnerRecord {
                broker_id: self.broker_id.clone(),
                epoch: last + 1,
            };
            let mut compares = vec![
                Compare::Absent(owner_key.clone()),
                Compare::ModRevision(epoch_key.clone(), last_revision),
            ];
            compares.extend(conditions.iter().cloned());
            let result = self
                .client()
                .txn(
                    &compares,
                    &[
                        Op::Put {
                            key: owner_key.clone(),
                            value: record.encode(),
                            lease: self.lease,
                        },
                        Op::Put {
                            key: epoch_key.clone(),
                            value: record.epoch.to_string().into_bytes(),
                            lease: 0,
                        },
                    ],
                    &[Op::Get(owner_key.clone()), Op::Get(epoch_key.clone())],
                )
                .map_err(|error| self.on_lease_error(error))?;
            if result.succeeded {
                tracing::info!(bundle, epoch = record.epoch, broker_id = %self.broker_id, "bundle acquired");
                return Ok(Acquire::Acquired(Ownership {
                    bundle: bundle.to_string(),
                    record,
                    revision: result.revision,
                }));
            }
            let mut reads = result.reads.into_iter();
            if let Some(Some(owner)) = reads.next() {
                return Ok(Acquire::Owned(OwnerRecord::decode(
                    &owner_key,
                    &owner.value,
                )?));
            }
            // Nobody owns it, but the epoch moved (acquired and released in between): retry
            // from the epoch just read. If it did not move, a condition failed.
            epoch_kv = reads.next().flatten();
            let epoch_moved = epoch_kv.as_ref().map_or(0, |kv| kv.mod_revision) != last_revision;
            if !epoch_moved {
                if let Some(condition) = conditions.first() {
                    return Err(EtcdError::CompareFailed {
                        operation: "acquire bundle",
                        key: compare_key(condition).to_string(),
                    });
                }
            }
        }
        Err(EtcdError::CompareFailed {
            operation: "acquire bundle",
            key: epoch_key,
        })
    }

    /// Gives `ownership` up: deletes the owner key if it still holds this broker and epoch.
    /// Returns whether it did.
    pub fn release(&self, ownership: &Ownership) -> Result<bool> {
        let (owner_key, _) = self.bundle_keys(&ownership.bundle)?;
        let result = self.client().txn(
            &[Compare::Value(owner_key.clone(), ownership.record.encode())],
            &[Op::Delete(owner_key)],
            &[],
        )?;
        Ok(result.succeeded)
    }

    /// Commits `operations` (keys relative to the cluster root) in one transaction that
    /// succeeds only while `owners/<bundle>` still holds this broker and `ownership`'s epoch, and
    /// every compare of `compares` holds. Returns the revision of the commit.
    ///
    /// Errors: [`EtcdError::Fenced`] when the bundle is no longer ours under this epoch (stop
    /// serving it); [`EtcdError::CompareFailed`] naming the first of `compares` that did not
    /// hold while the ownership did; [`EtcdError::OutcomeUnknown`] when the answer was lost
    /// (read back, e.g. the head key, to learn whether it applied).
    pub fn fenced_commit(
        &self,
        ownership: &Ownership,
        compares: &[Compare],
        operations: &[Op],
    ) -> Result<u64> {
        let (owner_key, _) = self.bundle_keys(&ownership.bundle)?;
        let compares = self.rooted(compares);
        let operations: Vec<Op> = operations
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => Op::Put {
                    key: self.cluster.key(key),
                    value: value.clone(),
                    lease: *lease,
                },
                Op::Delete(key) => Op::Delete(self.cluster.key(key)),
                Op::DeleteRange { from, to } => Op::DeleteRange {
                    from: self.cluster.key(from),
                    to: self.cluster.key(to),
                },
                Op::Get(key) => Op::Get(self.cluster.key(key)),
            })
            .collect();
        let mut all = Vec::with_capacity(compares.len() + 1);
        all.push(Compare::Value(owner_key.clone(), ownership.record.encode()));
        all.extend(compares.iter().cloned());
        let mut failure = vec![Op::Get(owner_key.clone())];
        failure.extend(
            compares
                .iter()
                .map(|compare| Op::Get(compare_key(compare).to_string())),
        );
        let result = self
            .client()
            .txn(&all, &operations, &failure)
            .map_err(|error| self.on_lease_error(error))?;
        if result.succeeded {
            return Ok(result.revision);
        }
        let mut reads = result.reads.into_iter();
        let current = reads
            .next()
            .flatten()
            .map(|owner| OwnerRecord::decode(&owner_key, &owner.value))
            .transpose()?;
        if current.as_ref() != Some(&ownership.record) {
            tracing::warn!(
                bundle = %ownership.bundle,
                epoch = ownership.record.epoch,
                ?current,
                "fenced commit refused: the bundle is no longer ours"
            );
            return Err(EtcdError::Fenced {
                bundle: ownership.bundle.clone(),
                epoch: ownership.record.epoch,
                current,
            });
        }
        let failed = compares
            .iter()
            .zip(reads)
            .find(|(compare, found)| !holds(compare, found.as_ref()))
            .map(|(compare, _)| compare_key(compare).to_string())
            .unwrap_or_else(|| "(a compare that changed again since)".to_string());
        Err(EtcdError::CompareFailed {
            operation: "fenced commit",
            key: failed,
        })
    }

    /// Writes `key` (relative to the cluster root) on this session's lease: it disappears with
    /// the session (a load report, a leader's decision).
    pub fn put_leased(&self, key: &str, value: &[u8]) -> Result<()> {
        self.check_alive()?;
        self.client()
            .txn(
                &[],
                &[Op::Put {
                    key: self.cluster.key(key),
                    value: value.to_vec(),
                    lease: self.lease,
                }],
                &[],
            )
            .map_err(|error| self.on_lease_error(error))?;
        Ok(())
    }

    /// Campaigns for the single role named by `key` (relative to the cluster root): takes it
    /// when nobody holds it, by creating the key with this broker's id on this session's lease.
    /// Returns whether this session holds it now. It is held until the session ends (the lease
    /// goes, so does the key), as with etcd's election API.
    pub fn campaign(&self, key: &str) -> Result<bool> {
        self.check_alive()?;
        let key = self.cluster.key(key);
        let result = self
            .client()
            .txn(
                &[Compare::Absent(key.clone())],
                &[Op::Put {
                    key: key.clone(),
                    value: self.broker_id.as_bytes().to_vec(),
                    lease: self.lease,
                }],
                &[Op::Get(key)],
            )
            .map_err(|error| self.on_lease_error(error))?;
        if result.succeeded {
            return Ok(true);
        }
        let holder = result.reads.into_iter().next().flatten();
        Ok(holder.is_some_and(|holder| holder.lease == self.lease))
    }

    /// `compares` with their keys under the cluster root.
    fn rooted(&self, compares: &[Compare]) -> Vec<Compare> {
        compares
            .iter()
            .map(|compare| match compare {
                Compare::Absent(key) => Compare::Absent(self.cluster.key(key)),
                Compare::ModRevision(key, revision) => {
                    Compare::ModRevision(self.cluster.key(key), *revision)
                }
                Compare::Value(key, value) => Compare::Value(self.cluster.key(key), value.clone()),
            })
            .collect()
    }

    /// Stops renewing and revokes the lease: `brokers/<id>` and every owner key of this broker
    /// disappear at once.
    pub fn close(mut self) -> Result<()> {
        self.stop_keepalive();
        self.shared.mark_lost(LeaseLost::Closed);
        self.client().lease_revoke(self.lease)
    }

    fn stop_keepalive(&mut self) {
        self.stop.take();
        if let Some(thread) = self.keepalive.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Do not wait for a keepalive in flight: the thread sees the closed channel next time.
        self.stop.take();
    }
}

fn compare_key(compare: &Compare) -> &str {
    match compare {
        Compare::Absent(key) | Compare::ModRevision(key, _) | Compare::Value(key, _) => key,
    }
}

/// Whether `compare` holds for the key's current state `found`.
fn holds(compare: &Compare, found: Option<&KeyValue>) -> bool {
    match compare {
        Compare::Absent(_) => found.is_none(),
        Compare::ModRevision(_, revision) => found.map_or(0, |kv| kv.mod_revision) == *revision,
        Compare::Value(_, value) => found.is_some_and(|kv| &kv.value == value),
    }
}

fn parse_epoch(kv: &KeyValue) -> Result<u64> {
    std::str::from_utf8(&kv.value)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| EtcdError::BadData {
            key: kv.key.clone(),
            message: "not a decimal epoch".to_string(),
        })
}

/// Renews `lease` every `interval` until stopped or lost. `deadline` is when the lease may
/// expire if not renewed: when it passes without a successful renewal, or etcd says the lease
/// is gone, the loss is signalled and the thread ends.
#[allow(clippy::too_many_arguments)]
fn keepalive_loop(
    client: &Client,
    broker_id: &str,
    lease: i64,
    ttl: Duration,
    interval: Duration,
    mut deadline: Instant,
    shared: &Shared,
    stopped: &mpsc::Receiver<()>,
) {
    let mut next = Instant::now() + interval;
    loop {
        let now = Instant::now();
        if now >= deadline {
            tracing::error!(
                broker_id,
                lease,
                ?ttl,
                "etcd lease not renewed within its TTL: lost"
            );
            shared.mark_lost(LeaseLost::NotRenewed { ttl });
            return;
        }
        let wake = next.min(deadline);
        match stopped.recv_timeout(wake.saturating_duration_since(now)) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let sent = Instant::now();
        if sent < next || sent >= deadline {
            continue;
        }
        let timeout = client
            .options()
            .request_timeout
            .min(deadline - sent)
            .max(KEEPALIVE_MIN_TIMEOUT);
        match client.lease_keepalive(lease, timeout) {
            Ok(Some(granted)) => {
                deadline = sent + granted;
                next = sent + interval;
                shared.renewals.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) | Err(EtcdError::LeaseNotFound { .. }) => {
                tracing::error!(broker_id, lease, "etcd lease expired or revoked: lost");
                shared.mark_lost(LeaseLost::Expired);
                return;
            }
            Err(error) => {
                tracing::warn!(broker_id, lease, %error, "etcd lease renewal failed; retrying");
                next = Instant::now() + KEEPALIVE_RETRY_PAUSE;
            }
        }
    }
}
