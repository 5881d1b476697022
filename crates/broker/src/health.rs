//! Topics the broker cannot serve, and why: a log that could not be opened (a corrupt or
//! unreadable segment, a log directory that fails its checks), a log poisoned by a failed
//! write or fsync, or a loaded log a read found corrupt.
//!
//! The registry is what makes such failures visible: each is logged once at ERROR with the
//! topic and its cause (again only if the cause changes), counted for `/metrics`, and listed
//! in the health check's details. Clients get the same reason in their error
//! ([`crate::BrokerError::TopicUnavailable`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Topics listed at most; failures beyond it are counted and logged, not listed, so that a
/// disk full of broken logs cannot grow the registry without bound.
pub const MAX_LISTED_FAILURES: usize = 10_000;

/// Names of failed topics beyond the list remembered at most, only so that a client retrying
/// one of them is not logged and counted again. Beyond it, further topics are neither logged
/// nor counted one by one: a single ERROR line says so.
pub const MAX_UNLISTED_FAILURES: usize = 100_000;

/// Why a topic cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FailureKind {
    /// Its log could not be opened; every load attempt fails until an operator fixes it.
    LoadFailed,
    /// A write or fsync failed, so the log refuses appends until it is reopened (unloaded); or
    /// a read found corrupted data, so it refuses reads and appends until then.
    Poisoned,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::LoadFailed => "loadFailed",
            FailureKind::Poisoned => "poisoned",
        }
    }
}

/// One topic the broker cannot serve.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicFailure {
    pub topic: String,
    pub kind: FailureKind,
    pub reason: String,
    /// When the failure was first seen (milliseconds since the Unix epoch).
    pub since_ms: u64,
}

/// The broker's registry of topics it cannot serve.
#[derive(Debug, Default)]
pub struct TopicHealth {
    failures: Mutex<BTreeMap<String, TopicFailure>>,
    /// Failed topics not listed because the list is full (names only).
    unlisted: Mutex<HashSet<String>>,
    /// Whether the line saying that even `unlisted` is full was logged.
    unlisted_full_logged: AtomicBool,
    load_failures_total: AtomicU64,
    poisoned_total: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl TopicHealth {
    /// Records a failure. Logs it at ERROR and counts it only when it is new for the topic
    /// (or its kind or cause changed): a client retrying the same broken topic adds nothing.
    pub fn record(&self, topic: &str, kind: FailureKind, reason: &str) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(known) = failures.get(topic) {
            if known.kind == kind && known.reason == reason {
                return;
            }
        }
        let listed = failures.len() < MAX_LISTED_FAILURES || failures.contains_key(topic);
        if !listed && !self.remember_unlisted(topic) {
            return;
        }
        match kind {
            FailureKind::LoadFailed => {
                self.load_failures_total.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    topic,
                    cause = reason,
                    "topic cannot be loaded; clients get this reason until the log is repaired"
                );
            }
            FailureKind::Poisoned => {
                self.poisoned_total.fetch_add(1, Ordering::Relaxed);
                tracing::error!(topic, cause = reason, "topic log poisoned; producing refused until the topic is unloaded and its log reopened");
            }
        }
        if !listed {
            return;
        }
        failures.insert(
            topic.to_string(),
            TopicFailure {
                topic: topic.to_string(),
                kind,
                reason: reason.to_string(),
                since_ms: now_ms(),
            },
        );
    }

    /// A failed topic that the full list leaves out: whether it is new (to be logged and
    /// counted). A retry of one already seen is not; nor is any once even the names of unlisted
    /// topics fill their bound (said once, in one ERROR line).
    fn remember_unlisted(&self, topic: &str) -> bool {
        let mut unlisted = self
            .unlisted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if unlisted.contains(topic) {
            return false;
        }
        if unlisted.len() >= MAX_UNLISTED_FAILURES {
            if !self.unlisted_full_logged.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    listed = MAX_LISTED_FAILURES,
                    remembered = MAX_UNLISTED_FAILURES,
                    "more topics cannot be served than the health registry keeps; further ones are neither logged nor counted one by one"
                );
            }
            return false;
        }
        unlisted.insert(topic.to_string());
        true
    }

    fn forget_unlisted(&self, topic: &str) {
        self.unlisted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(topic);
    }

    /// The topic loaded (again): whatever failure it had is over.
    pub fn recovered(&self, topic: &str) {
        self.forget_unlisted(topic);
        let removed = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(topic);
        if let Some(failure) = removed {
            tracing::info!(
                topic,
                was = failure.kind.as_str(),
                "topic serves again after a failure"
            );
        }
    }

    /// The topic was deleted: its failure, if any, is no longer listed.
    pub fn forget(&self, topic: &str) {
        self.forget_unlisted(topic);
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(topic);
    }

    /// The topic's failure, if it has one.
    pub fn failure(&self, topic: &str) -> Option<TopicFailure> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(topic)
            .cloned()
    }

    /// Every topic the broker cannot serve now, by name.
    pub fn failures(&self) -> Vec<TopicFailure> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Distinct load failures since the broker started.
    pub fn load_failures_total(&self) -> u64 {
        self.load_failures_total.load(Ordering::Relaxed)
    }

    /// Logs poisoned since the broker started.
    pub fn poisoned_total(&self) -> u64 {
        self.poisoned_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retried_failure_beyond_the_list_counts_once() {
        let health = TopicHealth::default();
        let name = |index: usize| format!("persistent://t/n/broken-{index}");
        for index in 0..MAX_LISTED_FAILURES + 5 {
            health.record(&name(index), FailureKind::LoadFailed, "corrupt");
        }
        // Clients retry every topic, the unlisted ones too.
        for index in 0..MAX_LISTED_FAILURES + 5 {
            health.record(&name(index), FailureKind::LoadFailed, "corrupt");
        }
        assert_eq!(health.failures().len(), MAX_LISTED_FAILURES);
        assert_eq!(
            health.load_failures_total(),
            (MAX_LISTED_FAILURES + 5) as u64
        );
        // One of them repaired, then broken again: a new failure.
        health.recovered(&name(MAX_LISTED_FAILURES + 1));
        health.record(
            &name(MAX_LISTED_FAILURES + 1),
            FailureKind::LoadFailed,
            "corrupt",
        );
        assert_eq!(
            health.load_failures_total(),
            (MAX_LISTED_FAILURES + 6) as u64
        );
    }

    #[test]
    fn a_repeated_failure_counts_once_and_recovery_clears_it() {
        let health = TopicHealth::default();
        health.record("persistent://t/n/a", FailureKind::LoadFailed, "corrupt");
        health.record("persistent://t/n/a", FailureKind::LoadFailed, "corrupt");
        assert_eq!(health.load_failures_total(), 1);
        assert_eq!(health.failures().len(), 1);
        health.record("persistent://t/n/a", FailureKind::LoadFailed, "other cause");
        assert_eq!(health.load_failures_total(), 2);
        health.recovered("persistent://t/n/a");
        assert!(health.failure("persistent://t/n/a").is_none());
        health.record("persistent://t/n/a", FailureKind::Poisoned, "fsync failed");
        assert_eq!(health.poisoned_total(), 1);
        assert_eq!(
            health
                .failure("persistent://t/n/a")
                .map(|failure| failure.kind),
            Some(FailureKind::Poisoned)
        );
    }
}
