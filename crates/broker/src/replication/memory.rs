//! One memory bound for every replicator of a broker (`replication_max_memory_bytes`), shared
//! fairly between remote clusters.
//!
//! Entries a replicator has read and the remote has not confirmed yet are held in memory (the
//! client keeps them to resend after a reconnection). All replicators together hold at most
//! the budget, whatever the number of partitions and remotes, so a remote that is slow or down
//! for many topics cannot make the broker grow. And the replicators of one remote cluster
//! together hold at most `budget / remotes` (the remotes that have replicators now): a remote
//! that accepts entries and never answers holds its share until its sends time out, while the
//! others keep their own share and go on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// The budget of all replicators.
pub(crate) struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
    /// Per remote cluster: its replicators and the bytes they hold.
    remotes: Mutex<HashMap<String, RemoteUse>>,
    /// Woken whenever bytes are released or the number of remotes changes.
    changed: Notify,
}

#[derive(Default)]
struct RemoteUse {
    replicators: usize,
    held: usize,
}

impl MemoryBudget {
    pub(crate) fn new(total: usize) -> Arc<MemoryBudget> {
        let total = total.clamp(1, u32::MAX as usize);
        Arc::new(MemoryBudget {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
            remotes: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        })
    }

    /// The share of a replicator to `remote`; it counts that remote as one to share with while
    /// it lives.
    pub(crate) fn join(self: &Arc<Self>, remote: &str) -> RemoteShare {
        self.lock()
            .entry(remote.to_string())
            .or_default()
            .replicators += 1;
        self.changed.notify_waiters();
        RemoteShare(Arc::new(Membership {
            budget: self.clone(),
            remote: remote.to_string(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, RemoteUse>> {
        self.remotes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What each remote may hold now: the budget divided by the remotes with replicators.
    fn share(remotes: &HashMap<String, RemoteUse>, total: usize) -> usize {
        let sharing = remotes.values().filter(|use_| use_.replicators > 0).count();
        (total / sharing.max(1)).max(1)
    }

    /// `bytes` (at most the remote's share) for `remote`, if they are free now.
    fn try_reserve(self: &Arc<Self>, remote: &str, bytes: usize) -> Option<Held> {
        let mut remotes = self.lock();
        let share = Self::share(&remotes, self.total);
        let wanted = bytes.clamp(1, share);
        let use_ = remotes.entry(remote.to_string()).or_default();
        if use_.held + wanted > share {
            return None;
        }
        let permit = self
            .semaphore
            .clone()
            .try_acquire_many_owned(u32::try_from(wanted).unwrap_or(u32::MAX))
            .ok()?;
        use_.held += wanted;
        Some(Held {
            permit: Some(permit),
            budget: self.clone(),
            remote: remote.to_string(),
        })
    }

    fn release(&self, remote: &str, bytes: usize) {
        {
            let mut remotes = self.lock();
            if let Some(use_) = remotes.get_mut(remote) {
                use_.held = use_.held.saturating_sub(bytes);
                if use_.replicators == 0 && use_.held == 0 {
                    remotes.remove(remote);
                }
            }
        }
        self.changed.notify_waiters();
    }

    fn leave(&self, remote: &str) {
        {
            let mut remotes = self.lock();
            if let Some(use_) = remotes.get_mut(remote) {
                use_.replicators = use_.replicators.saturating_sub(1);
                if use_.replicators == 0 && use_.held == 0 {
                    remotes.remove(remote);
                }
            }
        }
        self.changed.notify_waiters();
    }
}

/// A replicator's membership; the remote stops counting when the last one of it is gone.
struct Membership {
    budget: Arc<MemoryBudget>,
    remote: String,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.budget.leave(&self.remote);
    }
}

/// A replicator's access to the budget, within its remote's share.
#[derive(Clone)]
pub(crate) struct RemoteShare(Arc<Membership>);

impl RemoteShare {
    /// `bytes` (at most the remote's share) if they are free now.
    pub(crate) fn try_reserve(&self, bytes: usize) -> Option<Held> {
        self.0.budget.try_reserve(&self.0.remote, bytes)
    }

    /// `bytes` (at most the remote's share), once they are free.
    pub(crate) async fn reserve(&self, bytes: usize) -> Held {
        loop {
            let changed = self.0.budget.changed.notified();
            tokio::pin!(changed);
            // Registered before the check, so a release in between is not missed.
            changed.as_mut().enable();
            if let Some(held) = self.try_reserve(bytes) {
                return held;
            }
            changed.await;
        }
    }

    /// Takes an entry's share of `bytes` out of `reserved`, reserving more if it falls short;
    /// `None` if the memory is not free now. An entry larger than the remote's share gets what
    /// the remote may hold.
    pub(crate) fn take(&self, reserved: &mut Held, bytes: usize) -> Option<Held> {
        let have = reserved.bytes();
        if have < bytes {
            if let Some(more) = self.try_reserve(bytes - have) {
                reserved.merge(more);
            } else if have == 0 {
                return None;
            } else {
                // Whatever the remote may hold more is taken; with none, the entry waits
                // unless what is reserved is all this remote may hold.
                let share = {
                    let remotes = self.0.budget.lock();
                    MemoryBudget::share(&remotes, self.0.budget.total)
                };
                if have < share {
                    return None;
                }
            }
        }
        reserved.split(bytes.min(reserved.bytes()))
    }
}

/// Bytes of the budget held by one remote's replicator; released when dropped.
pub(crate) struct Held {
    permit: Option<OwnedSemaphorePermit>,
    budget: Arc<MemoryBudget>,
    remote: String,
}

impl Held {
    pub(crate) fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    fn merge(&mut self, mut other: Held) {
        match (self.permit.as_mut(), other.permit.take()) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (None, theirs) => self.permit = theirs,
            (Some(_), None) => {}
        }
    }

    /// `bytes` of these (at most all of them) as a separate holding.
    fn split(&mut self, bytes: usize) -> Option<Held> {
        let permit = self.permit.as_mut()?.split(bytes)?;
        Some(Held {
            permit: Some(permit),
            budget: self.budget.clone(),
            remote: self.remote.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let bytes = self.bytes();
        // The semaphore's permits go back first, then the remote's count and the wake-up.
        drop(self.permit.take());
        if bytes > 0 {
            self.budget.release(&self.remote, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_take_their_share_and_wait_when_the_budget_is_used() {
        let budget = MemoryBudget::new(1000);
        let share = budget.join("b");
        let mut reserved = share.try_reserve(600).expect("free");
        let first = share
            .take(&mut reserved, 400)
            .expect("within what was reserved");
        assert_eq!((first.bytes(), reserved.bytes()), (400, 200));
        let second = share
            .take(&mut reserved, 500)
            .expect("topped up from what is free");
        assert_eq!((second.bytes(), reserved.bytes()), (500, 0));
        assert!(
            share.take(&mut reserved, 200).is_none(),
            "only 100 bytes are free"
        );
        drop((first, second, reserved));
        let mut whole = share
            .try_reserve(5000)
            .expect("clamped to the whole budget");
        assert_eq!(whole.bytes(), 1000);
        let huge = share
            .take(&mut whole, 5000)
            .expect("larger than the budget");
        assert_eq!(huge.bytes(), 1000, "it gets all of it");
        assert!(share.try_reserve(1).is_none());
    }

    #[test]
    fn each_remote_keeps_its_share_and_a_leaving_remote_gives_its_share_back() {
        let budget = MemoryBudget::new(1000);
        let to_b = budget.join("b");
        let to_c = budget.join("c");
        let held_by_b = to_b.try_reserve(1000).expect("b's share");
        assert_eq!(held_by_b.bytes(), 500, "b may hold half");
        assert!(to_b.try_reserve(1).is_none(), "b holds its whole share");
        let held_by_c = to_c.try_reserve(500).expect("c's share is free");
        assert_eq!(held_by_c.bytes(), 500);
        drop(held_by_c);
        drop(to_c);
        let more = to_b
            .try_reserve(500)
            .expect("c left: b alone may hold the whole budget");
        assert_eq!(held_by_b.bytes() + more.bytes(), 1000);
    }

    #[tokio::test]
    async fn a_waiting_reservation_is_woken_by_a_release() {
        let budget = MemoryBudget::new(1000);
        let share = budget.join("b");
        let held = share.try_reserve(1000).expect("free");
        let waiting = tokio::spawn({
            let share = share.clone();
            async move { share.reserve(300).await.bytes() }
        });
        tokio::task::yield_now().await;
        drop(held);
        assert_eq!(waiting.await.expect("the reservation completes"), 300);
    }
}
