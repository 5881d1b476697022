//! The orphan sweep: deletes the data objects and manifests of this cluster that no topic's
//! index references and that are older than `orphan_grace`.
//!
//! Orphans come from commits whose PUT succeeded and whose etcd transaction failed or was
//! fenced, compactions interrupted between their PUT and their transaction, manifests a
//! trim cut from a chain, and deleted topics. A data object holds many topics' batches (one
//! object per broker commit): it is garbage only when no topic references it.
//!
//! **Why the grace period makes it safe.** The sweep first lists the objects (with the
//! store's `LastModified`), then reads every index from etcd. An object can become
//! referenced after the listing only through a commit or compaction whose PUT stored it
//! and whose transaction had not run yet; such a transaction runs within the commit
//! deadline (plus one attempt's overrun) of its PUT, far less than `orphan_grace` (1 hour by
//! default, at least twice the commit deadline): so an object older than the grace period
//! that no index references at the time of the reads never will be. Refs that a compaction
//! moves from `objects/` keys into a manifest while the sweep reads are seen either as keys
//! or in the new manifest: etcd is read twice, and the union counts.
//!
//! **Who sweeps.** Any broker may: the sweep is safe when several run at once. To avoid the
//! duplicate work, a broker sweeps only while it holds the etcd key `sweeper` (created on its
//! session's lease when absent, so it moves to another broker when this one dies). Any error
//! reading an index or a manifest ends the sweep before it deletes anything. A sweep stops
//! early (between two requests) when the engine closes.

use std::collections::HashSet;
use std::time::{SystemTime, UNIX_EPOCH};

use meridian_etcd::{Compare, Op};

use crate::engine::EngineShared;
use crate::keys::{self, Head, ManifestRef, ObjectRef};
use crate::{ObjectLogError, Result};

/// The etcd key (under the cluster root) of the broker that sweeps.
pub const SWEEPER_KEY: &str = "sweeper";
/// Most objects one sweep lists per prefix (the rest waits for the next sweep).
const MAX_LISTED_PER_SWEEP: usize = 100_000;

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// `false`: another broker holds the sweeper key, and nothing was looked at.
    pub swept: bool,
    pub data_objects_deleted: u64,
    pub manifests_deleted: u64,
    /// Objects old enough to be swept but referenced by an index (kept).
    pub referenced: u64,
    /// Unreferenced objects kept because they are younger than the grace period.
    pub young_kept: u64,
}

fn failed(cause: impl std::fmt::Display) -> ObjectLogError {
    ObjectLogError::Sweep(cause.to_string())
}

/// Takes (or confirms) the sweeper key on this broker's lease; `false` if another holds it.
fn hold_sweeper_key(shared: &EngineShared) -> Result<bool> {
    let key = shared.cluster.key(SWEEPER_KEY);
    let client = shared.cluster.client();
    let lease = shared.session.lease_id();
    if let Some(holder) = client.get(&key).map_err(failed)? {
        return Ok(holder.lease == lease);
    }
    let put = Op::Put {
        key: key.clone(),
        value: shared.config.broker_id.as_bytes().to_vec(),
        lease,
    };
    let result = client
        .txn(&[Compare::Absent(key)], &[put], &[])
        .map_err(failed)?;
    Ok(result.succeeded)
}

/// One sweep (see the module's comment).
pub(crate) fn sweep(shared: &EngineShared) -> Result<SweepReport> {
    if !hold_sweeper_key(shared)? {
        return Ok(SweepReport::default());
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .unwrap_or_default();
    let grace_ms = shared.config.orphan_grace.as_millis() as u64;
    let mut report = SweepReport {
        swept: true,
        ..SweepReport::default()
    };
    // 1. The objects, listed before any index is read.
    let mut old = Vec::new();
    for prefix in [
        keys::data_prefix(&shared.object_prefix),
        keys::all_manifests_prefix(&shared.object_prefix),
    ] {
        let mut continuation: Option<String> = None;
        let mut listed = 0;
        loop {
            if shared.stopping() {
                return Ok(report);
            }
            let page = shared
                .store
                .list_page(&prefix, continuation.as_deref())
                .map_err(failed)?;
            listed += page.objects.len();
            for object in page.objects {
                match object.last_modified_ms {
                    Some(stored) if now_ms.saturating_sub(stored) >= grace_ms => {
                        old.push(object.key)
                    }
                    _ => report.young_kept += 1,
                }
            }
            match page.next {
                Some(token) if listed < MAX_LISTED_PER_SWEEP => continuation = Some(token),
                _ => break,
            }
        }
    }
    // 2. Everything the indexes reference, read twice.
    let referenced = referenced_objects(shared)?;
    // 3. Old and unreferenced: garbage.
    let manifests = keys::all_manifests_prefix(&shared.object_prefix);
    for key in old {
        // A closing engine (shutdown, a new session) does not wait for a long sweep.
        if shared.stopping() {
            break;
        }
        if referenced.contains(&key) {
            report.referenced += 1;
            continue;
        }
        shared.store.delete(&key).map_err(failed)?;
        if key.starts_with(&manifests) {
            report.manifests_deleted += 1;
        } else {
            report.data_objects_deleted += 1;
        }
    }
    tracing::info!(?report, "orphan sweep done");
    Ok(report)
}

/// Every data object and manifest referenced by a topic's index: `objects/` keys, heads, and
/// the manifests the heads chain to. etcd is read twice (see the module's comment).
fn referenced_objects(shared: &EngineShared) -> Result<HashSet<String>> {
    let mut referenced = HashSet::new();
    let root = shared.cluster.key("logs/");
    for _pass in 0..2 {
        let mut heads: Vec<(String, ManifestRef, u64)> = Vec::new();
        let mut bad = None;
        shared
            .cluster
            .client()
            .scan_prefix(&root, 1000, false, |page| {
                for kv in page {
                    let Some(relative) = kv.key.strip_prefix(&root) else {
                        continue;
                    };
                    if let Some(topic) = relative.strip_suffix("/head") {
                        match keys::decode::<Head>(&kv.key, &kv.value) {
                            Ok(head) => {
                                heads.extend(head.manifest.map(|manifest| {
                                    (topic.to_string(), manifest, head.first_entry)
                                }))
                            }
                            Err(error) => {
                                bad.get_or_insert(error);
                            }
                        }
                    } else {
                        match keys::decode::<ObjectRef>(&kv.key, &kv.value) {
                            Ok(reference) => {
                                referenced.insert(reference.object);
                            }
                            Err(error) => {
                                bad.get_or_insert(error);
                            }
                        }
                    }
                }
            })
            .map_err(failed)?;
        if let Some(error) = bad {
            return Err(failed(error));
        }
        for (topic, newest, start) in heads {
            if referenced.contains(&newest.object) {
                continue;
            }
            // The chain's manifests and every data object they name.
            let chain =
                crate::manifest::chain_objects(&shared.store, &topic, &newest, start, |key| {
                    referenced.contains(key)
                })
                .map_err(failed)?;
            referenced.extend(chain);
        }
    }
    Ok(referenced)
}
