//! Recent entries kept in memory, so that consumers keeping up with producers never touch the
//! disk.
//!
//! Each log caches a contiguous run of its newest entries. The total across all logs is bounded
//! by `cache_max_bytes`: a log that needs room evicts its own oldest entries, and if that is not
//! enough it stops caching until room appears (consumed entries are evicted by maintenance).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::log::Entry;
use crate::Position;

#[derive(Debug, Default)]
pub(crate) struct EntryCache {
    entries: VecDeque<Entry>,
}

impl EntryCache {
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Caches the newest entry of the log, evicting this log's oldest entries if the engine-wide
    /// budget `max_bytes` (tracked in `used_bytes`) would be exceeded.
    pub(crate) fn insert(&mut self, entry: Entry, used_bytes: &AtomicU64, max_bytes: u64) {
        let contiguous = self.entries.back().is_none_or(|last| {
            last.position.ledger_id == entry.position.ledger_id
                && last.position.entry_id + 1 == entry.position.entry_id
        });
        if !contiguous {
            self.clear(used_bytes);
        }
        let size = entry.data.len() as u64;
        let mut total = used_bytes.fetch_add(size, Ordering::Relaxed) + size;
        while total > max_bytes {
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            let freed = oldest.data.len() as u64;
            used_bytes.fetch_sub(freed, Ordering::Relaxed);
            total -= freed;
        }
        if total > max_bytes {
            // Other logs hold the budget: do not cache (the cache stays contiguous because it
            // is now empty).
            used_bytes.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        self.entries.push_back(entry);
    }

    pub(crate) fn get(&self, position: Position) -> Option<&Entry> {
        let first = self.entries.front()?.position;
        if first.ledger_id != position.ledger_id || position.entry_id < first.entry_id {
            return None;
        }
        let entry = self
            .entries
            .get((position.entry_id - first.entry_id) as usize)?;
        debug_assert_eq!(entry.position, position);
        Some(entry)
    }

    /// Drops entries at or before `position`.
    pub(crate) fn evict_up_to(&mut self, position: Position, used_bytes: &AtomicU64) {
        while self
            .entries
            .front()
            .is_some_and(|entry| entry.position <= position)
        {
            if let Some(entry) = self.entries.pop_front() {
                used_bytes.fetch_sub(entry.data.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Drops entries at or after `position`.
    pub(crate) fn truncate_from(&mut self, position: Position, used_bytes: &AtomicU64) {
        while self
            .entries
            .back()
            .is_some_and(|entry| entry.position >= position)
        {
            if let Some(entry) = self.entries.pop_back() {
                used_bytes.fetch_sub(entry.data.len() as u64, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn clear(&mut self, used_bytes: &AtomicU64) {
        let bytes: u64 = self
            .entries
            .iter()
            .map(|entry| entry.data.len() as u64)
            .sum();
        used_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.entries.clear();
    }
}
