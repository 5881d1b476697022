//! One memory bound for every replicator of a broker (`replication_max_memory_bytes`).

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bytes of entries that replicators may hold in memory (read, sent and not yet confirmed),
/// across all of them: a remote that is slow or down for many topics cannot make the broker
/// grow. Each entry holds its share from the read until the remote's receipt.
pub(crate) struct MemoryBudget {
    semaphore: Arc<Semaphore>,
    total: usize,
}

impl MemoryBudget {
    pub(crate) fn new(total: usize) -> MemoryBudget {
        let total = total.clamp(1, u32::MAX as usize);
        MemoryBudget {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// `bytes` (at most the whole budget) if they are free now.
    pub(crate) fn try_reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        self.semaphore
            .clone()
            .try_acquire_many_owned(self.clamp(bytes))
            .ok()
    }

    /// `bytes` (at most the whole budget), once they are free.
    pub(crate) async fn reserve(&self, bytes: usize) -> OwnedSemaphorePermit {
        match self
            .semaphore
            .clone()
            .acquire_many_owned(self.clamp(bytes))
            .await
        {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    fn clamp(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.clamp(1, self.total)).unwrap_or(u32::MAX)
    }

    /// Takes an entry's share of `bytes` out of `reserved`, reserving more if it falls short;
    /// `None` if the memory is not free now. An entry larger than the whole budget gets it all.
    pub(crate) fn take(
        &self,
        reserved: &mut OwnedSemaphorePermit,
        bytes: usize,
    ) -> Option<OwnedSemaphorePermit> {
        let have = reserved.num_permits();
        if have < bytes && have < self.total {
            reserved.merge(self.try_reserve(bytes - have)?);
        }
        reserved.split(bytes.min(reserved.num_permits()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_take_their_share_and_wait_when_the_budget_is_used() {
        let budget = MemoryBudget::new(1000);
        let mut reserved = budget.try_reserve(600).expect("free");
        let first = budget
            .take(&mut reserved, 400)
            .expect("within what was reserved");
        assert_eq!((first.num_permits(), reserved.num_permits()), (400, 200));
        let second = budget
            .take(&mut reserved, 500)
            .expect("topped up from what is free");
        assert_eq!((second.num_permits(), reserved.num_permits()), (500, 0));
        assert!(
            budget.take(&mut reserved, 200).is_none(),
            "only 100 bytes are free"
        );
        drop((first, second, reserved));
        let mut whole = budget
            .try_reserve(5000)
            .expect("clamped to the whole budget");
        assert_eq!(whole.num_permits(), 1000);
        let huge = budget
            .take(&mut whole, 5000)
            .expect("larger than the budget");
        assert_eq!(huge.num_permits(), 1000, "it gets all of it");
        assert!(budget.try_reserve(1).is_none());
    }
}
