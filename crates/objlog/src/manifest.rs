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

/// The refs of the chain ending at `newest` (none: no manifest) from entry `start` (the
/// head's first entry: manifests that end before it were trimmed, and are not read), oldest
/// first. Every manifest read is checked: its format, its topic, that its refs run without a
/// gap and match what its reference says, and that the one before it ends right before it
/// (so the walk ends).
pub(crate) fn load_chain(
    store: &ObjectStore,
    topic: &str,
    newest: Option<&ManifestRef>,
    start: u64,
) -> std::result::Result<Vec<ObjectRef>, String> {
    let mut manifests: Vec<Vec<ObjectRef>> = Vec::new();
    let mut next = newest
        .filter(|manifest| manifest.last_entry >= start)
        .cloned();
    while let Some(reference) = next {
        let mut manifest = read_manifest(store, topic, &reference)?;
        manifest.refs.retain(|r| r.first_entry >= start);
        next = manifest
            .previous
            .filter(|previous| previous.last_entry >= start);
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
    start: u64,
    known: impl Fn(&str) -> bool,
) -> std::result::Result<Vec<String>, String> {
    let mut objects = Vec::new();
    let mut next = Some(newest.clone()).filter(|manifest| manifest.last_entry >= start);
    while let Some(reference) = next {
        if known(&reference.object) {
            break;
        }
        let manifest = read_manifest(store, topic, &reference)?;
        objects.push(reference.object);
        let kept = manifest.refs.into_iter().filter(|r| r.first_entry >= start);
        objects.extend(kept.map(|r| r.object));
        next = manifest
            .previous
            .filter(|previous| previous.last_entry >= start);
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
    let keys_moved = Op::DeleteRange {
        from: keys::object_ref_key(name, first_entry),
        to: keys::object_ref_key(name, last_entry + 1),
    };
    let revision = commit_head(
        shared,
        topic,
        head_revision,
        Some(keys_moved),
        &new_head,
        "manifest commit",
    )?;
    tracing::info!(
        topic = name,
        manifest = %reference.object,
        refs = reference.refs,
        bytes = bytes.len(),
        elapsed_us = started.elapsed().as_micros() as u64,
        "index keys moved into a manifest"
    );
    topic.compacted(reference.clone(), revision);
    Ok(Some(reference))
}

/// One fenced transaction under the topic's ownership: compare the head at `head_revision`,
/// run `delete` (if any), put `new_head`. Returns the revision. `Fenced` makes the bundle's topics
/// refuse appends (`NotOwner`); a lost answer or failed compare is resolved by reading the
/// head back (applied only if it holds `new_head`).
fn commit_head(
    shared: &EngineShared,
    topic: &TopicLog,
    head_revision: u64,
    delete: Option<Op>,
    new_head: &Head,
    operation: &'static str,
) -> Result<u64> {
    let head_key = keys::head_key(topic.name());
    let mut operations: Vec<Op> = delete.into_iter().collect();
    operations.push(Op::Put {
        key: head_key.clone(),
        value: keys::encode(new_head),
        lease: 0,
    });
    let compares = [Compare::ModRevision(head_key.clone(), head_revision)];
    let failed = |cause: String| ObjectLogError::WriteFailed {
        topic: topic.name().to_string(),
        operation,
        cause,
    };
    match shared
        .session
        .fenced_commit(topic.ownership(), &compares, &operations)
    {
        Ok(revision) => Ok(revision),
        Err(EtcdError::Fenced { current, .. }) => {
            let detail =
                format!("a {operation} was fenced; the bundle is now owned by {current:?}");
            shared.fence_bundle(topic.bundle(), &detail);
            Err(topic.not_owner(&detail))
        }
        Err(error @ (EtcdError::OutcomeUnknown { .. } | EtcdError::CompareFailed { .. })) => {
            // Applied after all? The head says.
            let key = shared.cluster.key(&head_key);
            match shared.cluster.client().get(&key) {
                Ok(Some(kv)) if keys::decode::<Head>(&key, &kv.value).as_ref() == Ok(new_head) => {
                    Ok(kv.mod_revision)
                }
                _ => Err(failed(error.to_string())),
            }
        }
        Err(error) => Err(failed(error.to_string())),
    }
}

/// Drops the refs the topic asked to trim ([`TopicLog::request_trim`]) from its index: one
/// fenced transaction deletes their `objects/` keys and writes the head with its new first
/// entry (and without the manifest chain once none of its refs remain). The data objects and
/// manifests left unreferenced go to the orphan sweep. The caller holds the commit lock.
pub(crate) fn trim(shared: &EngineShared, topic: &TopicLog) -> Result<bool> {
    let Some(plan) = topic.trim_plan() else {
        return Ok(false);
    };
    let name = topic.name();
    let delete = plan.keys.map(|(from, to)| Op::DeleteRange {
        from: keys::object_ref_key(name, from),
        to: keys::object_ref_key(name, to),
    });
    let revision = commit_head(
        shared,
        topic,
        plan.head_revision,
        delete,
        &plan.head,
        "trim commit",
    )?;
    tracing::info!(
        topic = name,
        first_entry = plan.head.first_entry,
        refs = plan.keep_from,
        "trimmed entries left the index"
    );
    topic.trimmed(&plan, revision);
    Ok(true)
}
