//! Manifests: a topic's index moved out of etcd, so that etcd holds a bounded number of keys
//! per topic however long its log grows.
//!
//! A compaction takes every ref of the topic that has an `objects/` key, PUTs them as one
//! [`Manifest`] object under a key never used before, then runs ONE fenced transaction under
//! the owner's epoch: compare the head's `mod_revision`, delete the keys (one range delete),
//! put the head with `manifest` pointing at the new object. Each manifest names the one before
//! it, so the head reaches the whole chain. A crash between the PUT and the transaction leaves
//! only an unreferenced object (the orphan sweep deletes it); a fenced owner's transaction
//! fails and nothing in etcd changes.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use meridian_etcd::{Compare, EtcdError, Op};
use meridian_objstore::ObjectStore;

use crate::engine::{retry, EngineShared};
use crate::keys::{self, Head, Manifest, ManifestRef, ObjectRef, MANIFEST_FORMAT};
use crate::topic::TopicLog;
use crate::{ObjectLogError, Result};

/// The refs of the chain ending at `newest` (none: no manifest), oldest first. Every manifest
/// is checked: its format, its topic, that its refs run without a gap and match what its
/// reference says, and that the one before it ends right before it (so the walk ends).
pub(crate) fn load_chain(
    store: &ObjectStore,
    topic: &str,
    newest: Option<&ManifestRef>,
) -> std::result::Result<Vec<ObjectRef>, String> {
    let mut manifests: Vec<Vec<ObjectRef>> = Vec::new();
    let mut next = newest.cloned();
    while let Some(reference) = next {
        let manifest = read_manifest(store, topic, &reference)?;
        next = manifest.previous;
        if let Some(previous) = &next {
            if previous.last_entry.checked_add(1) != Some(reference.first_entry) {
                return Err(format!(
                    "manifest {} follows {}, which ends at entry {} instead of {}",
                    reference.object,
                    previous.object,
                    previous.last_entry,
                    reference.first_entry.saturating_sub(1)
                ));
            }
        }
        manifests.push(manifest.refs);
    }
    Ok(manifests.into_iter().rev().flatten().collect())
}

/// Reads and checks one manifest.
fn read_manifest(
    store: &ObjectStore,
    topic: &str,
    reference: &ManifestRef,
) -> std::result::Result<Manifest, String> {
    let bytes = store
        .get(&reference.object)
        .map_err(|error| error.to_string())?;
    let manifest: Manifest = keys::decode(&reference.object, &bytes)?;
    let bad = |what: String| format!("manifest {}: {what}", reference.object);
    if manifest.format != MANIFEST_FORMAT {
        return Err(bad(format!(
            "format {} is not {MANIFEST_FORMAT}",
            manifest.format
        )));
    }
    if manifest.topic != topic {
        return Err(bad(format!("holds topic {}", manifest.topic)));
    }
    let (Some(first), Some(last)) = (manifest.refs.first(), manifest.refs.last()) else {
        return Err(bad("holds no refs".to_string()));
    };
    if first.first_entry != reference.first_entry
        || last.last_entry != reference.last_entry
        || manifest.refs.len() as u64 != reference.refs
    {
        return Err(bad(format!(
            "holds {} refs of entries {}..={}, its reference says {} of {}..={}",
            manifest.refs.len(),
            first.first_entry,
            last.last_entry,
            reference.refs,
            reference.first_entry,
            reference.last_entry
        )));
    }
    for pair in manifest.refs.windows(2) {
        if pair[0].last_entry < pair[0].first_entry
            || pair[0].last_entry.checked_add(1) != Some(pair[1].first_entry)
        {
            return Err(bad(format!(
                "entries {}..={} are followed by {}..={}",
                pair[0].first_entry, pair[0].last_entry, pair[1].first_entry, pair[1].last_entry
            )));
        }
    }
    Ok(manifest)
}

/// Whether `reference` is in the chain ending at `newest` (the read-back of a commit whose
/// `objects/` key a compaction may already have moved).
pub(crate) fn chain_holds(
    store: &ObjectStore,
    topic: &str,
    newest: Option<&ManifestRef>,
    reference: &ObjectRef,
) -> std::result::Result<bool, String> {
    let mut next = newest.cloned();
    while let Some(manifest) = next {
        if manifest.last_entry < reference.first_entry {
            return Ok(false);
        }
        let read = read_manifest(store, topic, &manifest)?;
        if manifest.first_entry <= reference.first_entry {
            return Ok(read.refs.contains(reference));
        }
        next = read.previous;
    }
    Ok(false)
}

/// The keys of the manifests of the chain from `newest` and of every data object they
/// reference, for the orphan sweep; the walk stops at a manifest `known` already has (its
/// chain was walked before).
pub(crate) fn chain_objects(
    store: &ObjectStore,
    topic: &str,
    newest: &ManifestRef,
    known: impl Fn(&str) -> bool,
) -> std::result::Result<Vec<String>, String> {
    let mut objects = Vec::new();
    let mut next = Some(newest.clone());
    while let Some(reference) = next {
        if known(&reference.object) {
            break;
        }
        let manifest = read_manifest(store, topic, &reference)?;
        objects.push(reference.object);
        objects.extend(manifest.refs.into_iter().map(|r| r.object));
        next = manifest.previous;
    }
    Ok(objects)
}

/// Moves every `objects/` key of `topic` into a new manifest (see the module's comment).
/// The caller holds the engine's commit lock, so no commit of the topic runs meanwhile.
pub(crate) fn compact(
    shared: &EngineShared,
    topic: &TopicLog,
    deadline: Instant,
) -> Result<Option<ManifestRef>> {
    let Some((refs, head, head_revision)) = topic.compaction_plan() else {
        return Ok(None);
    };
    let name = topic.name();
    let (Some(first), Some(last)) = (refs.first(), refs.last()) else {
        return Ok(None);
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_nanos() as u64)
        .unwrap_or_default();
    let epoch = topic.ownership().epoch();
    let reference = ManifestRef {
        object: keys::manifest_key(
            &shared.object_prefix,
            name,
            (first.first_entry, last.last_entry),
            epoch,
            nanos,
        ),
        first_entry: first.first_entry,
        last_entry: last.last_entry,
        refs: refs.len() as u64,
    };
    let (first_entry, last_entry) = (first.first_entry, last.last_entry);
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        topic: name.to_string(),
        previous: head.manifest.clone(),
        refs,
    };
    let bytes = keys::encode(&manifest);
    let started = Instant::now();
    let put = retry(
        shared,
        deadline,
        || {
            let left = deadline.saturating_duration_since(Instant::now());
            shared.store.put_within(&reference.object, &bytes, left)
        },
        |error| error.is_retryable(),
    );
    if let Err(error) = put {
        return Err(ObjectLogError::Unavailable {
            topic: name.to_string(),
            operation: "manifest PUT",
            waited_ms: started.elapsed().as_millis() as u64,
            deadline_ms: shared.config.commit_deadline.as_millis() as u64,
            cause: error.to_string(),
        });
    }
    let new_head = Head {
        manifest: Some(reference.clone()),
        ..head
    };
    let head_key = keys::head_key(name);
    let operations = [
        Op::DeleteRange {
            from: keys::object_ref_key(name, first_entry),
            to: keys::object_ref_key(name, last_entry + 1),
        },
        Op::Put {
            key: head_key.clone(),
            value: keys::encode(&new_head),
            lease: 0,
        },
    ];
    let compares = [Compare::ModRevision(head_key.clone(), head_revision)];
    let outcome = shared
        .session
        .fenced_commit(topic.ownership(), &compares, &operations);
    let revision = match outcome {
        Ok(revision) => revision,
        Err(EtcdError::Fenced { current, .. }) => {
            let detail =
                format!("a manifest commit was fenced; the bundle is now owned by {current:?}");
            shared.fence_bundle(topic.bundle(), &detail);
            return Err(topic.not_owner(&detail));
        }
        Err(error @ (EtcdError::OutcomeUnknown { .. } | EtcdError::CompareFailed { .. })) => {
            // Applied after all? The head says.
            let key = shared.cluster.key(&head_key);
            let found = shared.cluster.client().get(&key).ok().flatten();
            match found {
                Some(kv) if keys::decode::<Head>(&key, &kv.value).ok() == Some(new_head) => {
                    kv.mod_revision
                }
                _ => {
                    return Err(ObjectLogError::WriteFailed {
                        topic: name.to_string(),
                        operation: "manifest commit",
                        cause: error.to_string(),
                    })
                }
            }
        }
        Err(error) => {
            return Err(ObjectLogError::WriteFailed {
                topic: name.to_string(),
                operation: "manifest commit",
                cause: error.to_string(),
            })
        }
    };
    tracing::info!(
        topic = name,
        manifest = %reference.object,
        refs = reference.refs,
        bytes = bytes.len(),
        "index keys moved into a manifest"
    );
    topic.compacted(reference.clone(), revision);
    Ok(Some(reference))
}
