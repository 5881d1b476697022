//! Replicated subscriptions: clusters tell each other exactly what their consumers acknowledged.
//!
//! Every sync interval (and at once when a consumer of a replicated subscription closes), a
//! topic's sync task walks each replicated subscription's acknowledgements, expresses them in
//! origin coordinates ([`OriginAcks`]) and, when they changed, sends them to every other cluster
//! the topic replicates to: as Meridian's REPLICATED_SUBSCRIPTION_STATE command on the
//! replicators' client of that cluster (to the broker that owns the topic there), or, when that
//! broker does not announce the command, through its admin API
//! (`POST …/subscription/{sub}/replicatedSubscriptionState`, a Meridian extension too). The
//! receiving cluster creates the subscription where it is missing, keeps the latest state of each
//! sender durably (cursor property `meridian.synced.<cluster>`) and acknowledges every entry of
//! its own that the state covers: now, and for entries that arrive later, at the next tick after
//! they do.
//!
//! Acknowledgements only ever add up: a state never un-acknowledges an entry in the receiving
//! cluster, so consumers should be active in one cluster at a time (as with Pulsar).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use meridian_client::{StateAnswer, StateFormat};
use meridian_storage::{ChangeKind, CursorState, Log, Position, RangeSet};
use meridian_wire::MessageMetadata;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use super::origin_acks::{OriginAcks, OriginAcksBuilder};
pub use super::origin_map::entry_origin;
#[cfg(test)]
use super::origin_map::WrittenRun;
use super::origin_map::{OriginMap, Span, Written, WrittenEntry};
use super::replicated_subscriptions;
use super::state_format;
use crate::batch_acks;
use crate::clock::now_ms;
use crate::error::{BrokerError, Result};
use crate::replication::chain;
use crate::replication::remote::{RemoteClients, RemoteCluster};
use crate::stats::SubscriptionSyncStats;
use crate::topic::Topic;
use crate::topic_name::{encode_path_segment, TopicName};

/// Prefix of the cursor property that keeps the latest state received from one cluster.
pub const SYNCED_PROPERTY_PREFIX: &str = "meridian.synced.";
/// Prefix of the cursor property with the time (ms) a state from one cluster was last received.
pub const RECEIVED_AT_PROPERTY_PREFIX: &str = "meridian.received-at.";

/// How often a topic without replicated subscriptions is looked at again.
const IDLE_INTERVAL: Duration = Duration::from_secs(5);
/// An unchanged state is sent again this often, so that a remote that lost it (a cluster rebuilt
/// from an empty data directory) gets it back.
const RESEND_UNCHANGED_AFTER: Duration = Duration::from_secs(30);

/// What one cluster sends another: the acknowledgements of one subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncedAcks {
    /// The sending cluster.
    pub cluster: String,
    /// In JSON, an object, or the base64 text of its compact form (as a receiver stores a state
    /// that came compact, [`super::state_format`]).
    #[serde(deserialize_with = "super::state_format::deserialize_acks")]
    pub acks: OriginAcks,
    /// When a user last moved the subscription back in the sending cluster (ms): a receiver that
    /// saw an older value resets its copy before applying `acks`.
    #[serde(rename = "resetAt", default, skip_serializing_if = "Option::is_none")]
    pub reset_at: Option<u64>,
    /// The state's place among the sender's states for this subscription: the sender's clock
    /// (ms) when the state changed, raised past the previous state's and past any a receiver
    /// answered with, so it grows across sender restarts. A receiver holding a state with a
    /// higher value refuses this one (409, [`STALE_STATE_MARKER`]), so a post that landed late
    /// never replaces a newer state. Absent from senders before it existed: always taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

/// The `seq` of a stored state, read without decoding the rest of it.
#[derive(Deserialize)]
struct StoredSeq {
    #[serde(default)]
    seq: Option<u64>,
}

/// The `seq` of a stored state (JSON, as received). A state as serialized here ends with it
/// (`…,"seq":<n>}`): read from the end, so that a state with many ranges is not scanned at every
/// state received; any other text is decoded.
pub(crate) fn stored_seq(stored: &str) -> Option<u64> {
    let at_end = stored
        .strip_suffix('}')
        .map(|text| text.trim_end_matches(|c: char| c.is_ascii_digit()))
        .filter(|text| text.ends_with(",\"seq\":"))
        .and_then(|text| stored[text.len()..stored.len() - 1].parse().ok());
    match at_end {
        Some(seq) => Some(seq),
        None => serde_json::from_str::<StoredSeq>(stored).ok()?.seq,
    }
}

/// Precedes, in a receiver's refusal of an older state, the `seq` of the state it holds.
pub const STALE_STATE_MARKER: &str = "storedSeq=";

/// The `seq` a receiver that refused a state as older holds, read from its answer.
pub(crate) fn stored_seq_in(reply: &str) -> Option<u64> {
    let (_, after) = reply.split_once(STALE_STATE_MARKER)?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Whether an entry was meant for `cluster` too: it comes from there, or its replication list
/// does not leave it out.
fn reached(replicate_to: &[String], origin_cluster: &str, cluster: &str) -> bool {
    origin_cluster == cluster
        || replicate_to.is_empty()
        || replicate_to.iter().any(|name| name == cluster)
}

/// What the log holds of each origin up to a mark-delete position: per origin, the origin
/// positions of its first entry in the log and of its last entry at or before the position.
#[derive(Debug, Clone, Default)]
struct Frontier {
    /// The mark-delete position it describes.
    at: Option<Position>,
    /// Per origin, its last entry at or before `at`.
    through: BTreeMap<String, Position>,
    /// Per origin, its first entry in the log (as far as the log went back when the frontier
    /// was first found).
    first: BTreeMap<String, Position>,
}

impl Frontier {
    /// The frontier at `mark_delete`: moved forward from `known` by reading the entries in
    /// between (what consumers just acknowledged, usually still cached), or found by reading
    /// the log from its start to `mark_delete`, so that every origin present in the topic is
    /// part of it (once per subscription while the topic is loaded, and after a reset).
    fn at(
        log: &Log,
        map: &mut OriginMap,
        local_cluster: &str,
        mark_delete: Option<Position>,
        known: Option<&Frontier>,
    ) -> Result<Frontier> {
        if let Some(known) = known.filter(|known| known.at == mark_delete) {
            return Ok(known.clone());
        }
        let (mut frontier, start) = match known.filter(|known| known.at <= mark_delete) {
            Some(known) => (known.clone(), position_after(log, known.at)),
            None => (
                Frontier::default(),
                log.first_position().unwrap_or(Position::new(0, 0)),
            ),
        };
        frontier.at = mark_delete;
        let Some(end) = mark_delete else {
            return Ok(frontier);
        };
        map.visit(log, local_cluster, start, end, |span| {
            if let Some((cluster, first)) = span.origin {
                let last = span.origin_at(span.last).unwrap_or(first);
                if !frontier.first.contains_key(cluster) {
                    frontier.first.insert(cluster.to_string(), first);
                }
                frontier.through.insert(cluster.to_string(), last);
            }
            true
        })?;
        Ok(frontier)
    }
}

impl Frontier {
    /// Completes the frontier for this cluster's own entries, whose origin positions are
    /// positions of this log: every one at or before the mark-delete position is acknowledged,
    /// and every one from `local_from` (the first one the subscription's walks met, see
    /// [`LOCAL_STORED_FROM_PROPERTY`]) on was stored here. So the state still speaks for them
    /// after the log was trimmed and the topic loaded again, when the walk from the log's start
    /// no longer meets them. A cluster that never stored an entry of its own is left out.
    fn with_own_entries(
        mut self,
        local_cluster: &str,
        mark_delete: Option<Position>,
        local_from: Option<Position>,
    ) -> Frontier {
        let own_entries = local_from.is_some() || self.first.contains_key(local_cluster);
        if let (true, Some(mark_delete)) = (own_entries, mark_delete) {
            self.through.insert(
                local_cluster.to_string(),
                chain::origin_position(mark_delete),
            );
        }
        if let Some(from) = local_from.map(chain::origin_position) {
            let first = self.first.entry(local_cluster.to_string()).or_insert(from);
            *first = (*first).min(from);
        }
        self
    }
}

/// The cursor property with the first entry of this cluster's own that the replicated
/// subscription's walks met: its own entries from there on were stored here, even once trimmed
/// from the log.
pub const LOCAL_STORED_FROM_PROPERTY: &str = "meridian.stored-from";

fn local_stored_from(state: &CursorState) -> Option<Position> {
    state
        .properties
        .get(LOCAL_STORED_FROM_PROPERTY)
        .and_then(|value| chain::parse_position(value))
}

/// Records `first` as [`LOCAL_STORED_FROM_PROPERTY`] unless the cursor has one. The caller
/// holds the topic's cursor-properties lock.
fn note_local_stored_from(log: &Log, cursor: &str, first: Position) -> Result<()> {
    let Some(state) = log.cursor(cursor) else {
        return Ok(());
    };
    if local_stored_from(&state).is_some() {
        return Ok(());
    }
    let mut properties = state.properties;
    properties.insert(
        LOCAL_STORED_FROM_PROPERTY.to_string(),
        format!("{}:{}", first.ledger_id, first.entry_id),
    );
    // The sync's own note, not a change of what was acknowledged: the walk that made it need
    // not run again for it.
    log.set_cursor_properties_as(cursor, properties, ChangeKind::Mirrored)?;
    Ok(())
}

/// Where reading starts after a mark-delete position.
pub(crate) fn position_after(log: &Log, mark_delete: Option<Position>) -> Position {
    match mark_delete {
        Some(position) => log.next_position(position),
        None => Position::new(0, 0),
    }
}

/// A walk over a subscription's entries: the cursor state it saw and what it found.
#[derive(Debug, Clone)]
struct Walked {
    mark_delete: Option<Position>,
    acknowledged: RangeSet,
    partial: batch_acks::Partial,
    /// Per origin, its first entry the walk met (or the frontier knew).
    stored_from: BTreeMap<String, Position>,
    acks: OriginAcks,
    /// The cursor's version when it was read (see [`Log::cursor_versioned`]).
    version: u64,
}

/// The acknowledgements of a subscription whose cursor is in `state`, in origin coordinates,
/// given the frontier at its mark-delete position. The entries' origins come from `map`
/// (read from the log only where it has not seen them), and each stretch of entries of one
/// origin that are all acknowledged or all not is one step: the cost follows the acknowledged
/// ranges, not the entries between the mark-delete position and the last acknowledgement.
fn origin_acks(
    log: &Log,
    map: &mut OriginMap,
    state: &CursorState,
    frontier: &Frontier,
    local_cluster: &str,
) -> Result<Walked> {
    // Batches acknowledged in part count as unacknowledged, with their words alongside.
    let partial = batch_acks::decode(&state.properties);
    let mut builder = OriginAcksBuilder::new(&frontier.through);
    // An origin whose first entry lies after the mark-delete position starts where the walk
    // first meets it.
    let mut stored_from = frontier.first.clone();
    let start = position_after(log, state.mark_delete);
    let last_acknowledged = state.acknowledged.last();
    let end = last_acknowledged.max(partial.keys().next_back().copied());
    if let Some(end) = end.filter(|end| *end >= start) {
        let mut ranges = state
            .acknowledged
            .iter()
            .skip_while(|(ledger, _, last)| Position::new(*ledger, *last) < start)
            .peekable();
        map.visit(log, local_cluster, start, end, |span| {
            let Some((cluster, _)) = span.origin else {
                return true;
            };
            if !stored_from.contains_key(cluster) {
                let first = span.origin_at(span.first).expect("an origin");
                stored_from.insert(cluster.to_string(), first);
            }
            feed_span(&mut builder, span, cluster, &mut ranges, &partial);
            true
        })?;
    }
    let acks = builder.finish(&stored_from);
    Ok(Walked {
        mark_delete: state.mark_delete,
        acknowledged: state.acknowledged.clone(),
        partial,
        stored_from,
        acks,
        version: 0,
    })
}

/// Feeds the entries of `span` (of origin `cluster`) to `builder`, split where their
/// acknowledgement changes: `ranges` are the cursor's acknowledged ranges (as
/// [`RangeSet::iter`] gives them) from the span on, consumed as the walk passes them; `partial`
/// the batches acknowledged in part.
fn feed_span(
    builder: &mut OriginAcksBuilder,
    span: Span<'_>,
    cluster: &str,
    ranges: &mut std::iter::Peekable<impl Iterator<Item = (u64, u64, u64)>>,
    partial: &batch_acks::Partial,
) {
    let ledger = span.ledger;
    let origin_at = |entry_id: u64| span.origin_at(entry_id).expect("an origin");
    let mut next = span.first;
    while next <= span.last {
        while ranges
            .peek()
            .is_some_and(|(range_ledger, _, last)| (*range_ledger, *last) < (ledger, next))
        {
            ranges.next();
        }
        let (acknowledged, upto) = match ranges.peek() {
            Some(&(range_ledger, first, last)) if range_ledger == ledger && first <= next => {
                (true, last.min(span.last))
            }
            Some(&(range_ledger, first, _)) if range_ledger == ledger && first <= span.last => {
                (false, first - 1)
            }
            _ => (false, span.last),
        };
        if !acknowledged {
            // A batch acknowledged in part ends the unacknowledged stretch before it.
            let in_part = partial
                .range(Position::new(ledger, next)..=Position::new(ledger, upto))
                .next();
            if let Some((position, words)) = in_part {
                if position.entry_id > next {
                    builder.span(
                        cluster,
                        origin_at(next),
                        origin_at(position.entry_id - 1),
                        false,
                    );
                }
                builder.entry_in_part(cluster, origin_at(position.entry_id), false, Some(words));
                next = position.entry_id + 1;
                continue;
            }
        }
        builder.span(cluster, origin_at(next), origin_at(upto), acknowledged);
        next = upto + 1;
    }
}

/// The states other clusters sent for a subscription, as stored (raw JSON, in key order).
fn received_states(state: &CursorState) -> Vec<&String> {
    state
        .properties
        .iter()
        .filter(|(key, _)| key.starts_with(SYNCED_PROPERTY_PREFIX))
        .map(|(_, value)| value)
        .collect()
}

/// The states other clusters sent for a subscription, decoded.
pub fn received(state: &CursorState) -> Vec<SyncedAcks> {
    received_states(state)
        .into_iter()
        .filter_map(|value| serde_json::from_str(value).ok())
        .collect()
}

/// Whether a state another cluster sent covers the entry at `position` (with `metadata`): its
/// consumers acknowledged it there.
pub fn acknowledged_elsewhere(
    received: &[SyncedAcks],
    local_cluster: &str,
    position: Position,
    metadata: &MessageMetadata,
) -> bool {
    if received.is_empty() {
        return false;
    }
    let Some((cluster, origin)) = entry_origin(local_cluster, position, metadata) else {
        return false;
    };
    covered_elsewhere(received, &cluster, origin, &metadata.replicate_to)
}

/// Whether a state another cluster sent covers the entry of `cluster` at `origin` (with the
/// replication list `replicate_to`).
fn covered_elsewhere(
    received: &[SyncedAcks],
    cluster: &str,
    origin: Position,
    replicate_to: &[String],
) -> bool {
    received.iter().any(|sender| {
        let reached = reached(replicate_to, cluster, &sender.cluster);
        sender.acks.covers(cluster, origin, reached)
    })
}

/// What the states other clusters sent acknowledge of the batch entry at `position` (with
/// `metadata`) when none acknowledged it whole: the `ack_set` words of the messages no sender
/// acknowledged, if some sender acknowledged some.
pub(crate) fn acknowledged_in_part_elsewhere(
    received: &[SyncedAcks],
    local_cluster: &str,
    position: Position,
    metadata: &MessageMetadata,
) -> Option<Vec<u64>> {
    let (cluster, origin) = entry_origin(local_cluster, position, metadata)?;
    covered_in_part_elsewhere(received, &cluster, origin, &metadata.replicate_to)
}

/// [`acknowledged_in_part_elsewhere`] for the entry of `cluster` at `origin` (with the
/// replication list `replicate_to`).
fn covered_in_part_elsewhere(
    received: &[SyncedAcks],
    cluster: &str,
    origin: Position,
    replicate_to: &[String],
) -> Option<Vec<u64>> {
    let mut merged: Option<Vec<u64>> = None;
    for sender in received {
        let reached = reached(replicate_to, cluster, &sender.cluster);
        if let Some(words) = sender.acks.partial(cluster, origin, reached) {
            merged = Some(batch_acks::merge(merged.as_deref(), words));
        }
    }
    merged
}

/// Consecutive entries of one ledger: (ledger id, first entry id, last entry id).
pub(crate) type EntryRun = (u64, u64, u64);

/// What the states other clusters sent cover of a subscription's unacknowledged entries.
#[derive(Debug, Default)]
pub(crate) struct Covered {
    /// Entries acknowledged whole elsewhere, as runs in log order.
    pub(crate) whole: Vec<EntryRun>,
    /// Batch entries acknowledged in part elsewhere, with the `ack_set` words left.
    pub(crate) in_part: Vec<(Position, Vec<u64>)>,
    /// The last entry looked at, or the log's last entry when none after the entries looked
    /// at can be covered.
    walked: Option<Position>,
    /// How many unacknowledged entries were looked at.
    read: usize,
}

/// Per origin, the bound from which on none of `received` covers an entry of that origin,
/// whole or in part. An origin no state covers anything of is absent.
fn covered_bounds(received: &[SyncedAcks]) -> BTreeMap<String, Position> {
    let mut bounds: BTreeMap<String, Position> = BTreeMap::new();
    for sender in received {
        for (origin, progress) in &sender.acks.origins {
            let bound = progress
                .acked_below
                .filter(|_| progress.stored_from.is_some())
                .max(progress.ranges.last().map(|(_, end)| just_after(*end)))
                .max(
                    progress
                        .batches
                        .last()
                        .map(|(position, _)| just_after(*position)),
                );
            if let Some(bound) = bound {
                let known = bounds.entry(origin.clone()).or_insert(bound);
                *known = (*known).max(bound);
            }
        }
    }
    bounds
}

fn just_after(position: Position) -> Position {
    Position::new(position.ledger_id, position.entry_id.saturating_add(1))
}

/// Entries `first..=last` of one ledger whose positions in some coordinates (their origin's,
/// or this cluster's own) are consecutive, starting at `at_first`.
#[derive(Debug, Clone, Copy)]
struct Stretch {
    first: u64,
    last: u64,
    at_first: Position,
}

impl Stretch {
    /// The entries whose positions lie in `from..=to` (inclusive both), as entry ids.
    fn within(&self, from: Position, to: Position) -> Option<(u64, u64)> {
        let (ledger, base) = (self.at_first.ledger_id, self.at_first.entry_id);
        let top = base.saturating_add(self.last - self.first);
        let low = match from.ledger_id.cmp(&ledger) {
            std::cmp::Ordering::Less => base,
            std::cmp::Ordering::Equal => from.entry_id.max(base),
            std::cmp::Ordering::Greater => return None,
        };
        let high = match to.ledger_id.cmp(&ledger) {
            std::cmp::Ordering::Greater => top,
            std::cmp::Ordering::Equal => to.entry_id.min(top),
            std::cmp::Ordering::Less => return None,
        };
        (low <= high).then(|| (self.first + (low - base), self.first + (high - base)))
    }

    /// The entries whose positions lie below `bound`.
    fn below(&self, from: Position, bound: Position) -> Option<(u64, u64)> {
        let to = match bound.entry_id.checked_sub(1) {
            Some(entry_id) => Position::new(bound.ledger_id, entry_id),
            // Below entry 0 of a ledger: the ledgers before it, whole.
            None => Position::new(bound.ledger_id.checked_sub(1)?, u64::MAX),
        };
        self.within(from, to)
    }

    /// The first entry whose position is at or beyond `bound`.
    fn first_reaching(&self, bound: Position) -> Option<u64> {
        self.within(bound, Position::new(u64::MAX, u64::MAX))
            .map(|(first, _)| first)
    }
}

/// The entries of `stretch` (of origin `cluster`, with the replication list `replicate_to`)
/// that `received` covers whole, as ascending, disjoint entry-id intervals in `into` (cleared
/// first): each state's `acked_below` and ranges mapped onto the stretch, so the cost follows
/// the ranges, not the entries.
fn covered_in(
    received: &[SyncedAcks],
    (cluster, replicate_to): (&str, &[String]),
    stretch: Stretch,
    into: &mut Vec<(u64, u64)>,
) {
    into.clear();
    let top = Position::new(
        stretch.at_first.ledger_id,
        stretch
            .at_first
            .entry_id
            .saturating_add(stretch.last - stretch.first),
    );
    for sender in received {
        if !reached(replicate_to, cluster, &sender.cluster) {
            continue;
        }
        let Some(progress) = sender.acks.origins.get(cluster) else {
            continue;
        };
        if let (Some(from), Some(bound)) = (progress.stored_from, progress.acked_below) {
            into.extend(stretch.below(from, bound));
        }
        let first = progress
            .ranges
            .partition_point(|(_, end)| *end < stretch.at_first);
        for (start, end) in &progress.ranges[first..] {
            if *start > top {
                break;
            }
            into.extend(stretch.within(*start, *end));
        }
    }
    // One sender's intervals are ascending already; several are merged.
    into.sort_unstable();
    let mut merged = 0;
    for index in 0..into.len() {
        let (first, last) = into[index];
        if merged > 0 && into[merged - 1].1.saturating_add(1) >= first {
            into[merged - 1].1 = into[merged - 1].1.max(last);
        } else {
            into[merged] = (first, last);
            merged += 1;
        }
    }
    into.truncate(merged);
}

/// The unacknowledged entries from `start` on that `received` covers. Each origin's entries
/// are stored in the order of their origin positions, so once an entry of an origin at or
/// beyond that origin's [`covered_bounds`] has been met, no later entry of it can be covered:
/// when that holds for every origin the states speak of, the walk stops there, and its cost
/// follows the covered part of the subscription, not a long backlog after it. The entries'
/// origins come from `map` (the log is read only for entries no walk met before) as spans of
/// consecutive origin positions, and each span's covered entries are found from the states'
/// bounds and ranges mapped onto it, less the ranges `acknowledged` holds: the cost follows
/// spans and ranges, not entries.
pub(crate) fn covered_by(
    log: &Log,
    map: &mut OriginMap,
    acknowledged: &RangeSet,
    start: Position,
    received: &[SyncedAcks],
    local_cluster: &str,
) -> Result<Covered> {
    let mut open = covered_bounds(received);
    let mut covered = Covered::default();
    let last = log.last_position();
    let Some(end) = last.filter(|_| !open.is_empty()) else {
        covered.walked = last;
        return Ok(covered);
    };
    let mut ranges = acknowledged.iter_from(start).peekable();
    let mut stopped = false;
    let mut whole: Vec<(u64, u64)> = Vec::new();
    let mut left: Vec<u64> = Vec::new();
    map.visit(log, local_cluster, start, end, |span| {
        // Where in the span each origin still open is passed: the span's own origin, and this
        // cluster's, whose entries are their own origin positions.
        let origin = span.origin.map(|(cluster, at_first)| {
            (
                cluster,
                Stretch {
                    first: span.first,
                    last: span.last,
                    at_first,
                },
            )
        });
        let own = Stretch {
            first: span.first,
            last: span.last,
            at_first: chain::origin_position(Position::new(span.ledger, span.first)),
        };
        let passes_origin = origin.and_then(|(cluster, stretch)| {
            let bound = open.get(cluster)?;
            Some((cluster, stretch.first_reaching(*bound)))
        });
        let passes_own = open
            .get(local_cluster)
            .map(|bound| own.first_reaching(*bound));
        // The walk stops in this span when every origin open is passed in it: at the entry
        // where the last of them is.
        let others_open = open.keys().any(|cluster| {
            cluster != local_cluster
                && passes_origin.is_none_or(|(passed, _)| passed != cluster.as_str())
        });
        let stop = if others_open {
            None
        } else {
            match (passes_origin, passes_own) {
                (Some((_, Some(at))), None) | (None, Some(Some(at))) => Some(at),
                (Some((_, Some(at))), Some(Some(own_at))) => Some(at.max(own_at)),
                // The span's origin is this cluster: one bound for both.
                (Some((passed, Some(at))), Some(None)) if passed == local_cluster => Some(at),
                _ => None,
            }
        };
        let upto = stop.unwrap_or(span.last);
        if let Some((cluster, stretch)) = origin {
            let stretch = Stretch {
                last: upto,
                ..stretch
            };
            covered_in(received, (cluster, span.replicate_to), stretch, &mut whole);
        } else {
            whole.clear();
        }
        // The span's unacknowledged entries, piece by piece between the acknowledged ranges,
        // and what of each piece the states cover.
        let mut next = span.first;
        let mut covering = whole.iter().copied().peekable();
        left.clear();
        while next <= upto {
            while ranges
                .peek()
                .is_some_and(|(ledger, _, last)| (*ledger, *last) < (span.ledger, next))
            {
                ranges.next();
            }
            let piece_end = match ranges.peek() {
                Some(&(ledger, first, last)) if ledger == span.ledger && first <= next => {
                    if last >= upto {
                        break;
                    }
                    next = last + 1;
                    continue;
                }
                Some(&(ledger, first, _)) if ledger == span.ledger && first <= upto => first - 1,
                _ => upto,
            };
            covered.read += usize::try_from(piece_end - next + 1).unwrap_or(usize::MAX);
            while covering.peek().is_some_and(|(_, last)| *last < next) {
                covering.next();
            }
            let mut from = next;
            while let Some(&(first, last)) = covering.peek() {
                if first > piece_end {
                    break;
                }
                let run = (first.max(from), last.min(piece_end));
                if run.0 > from {
                    left.extend([from, run.0 - 1]);
                }
                match covered.whole.last_mut() {
                    Some((ledger, _, last))
                        if *ledger == span.ledger && last.checked_add(1) == Some(run.0) =>
                    {
                        *last = run.1;
                    }
                    _ => covered.whole.push((span.ledger, run.0, run.1)),
                }
                if last > piece_end {
                    from = piece_end.saturating_add(1);
                    break;
                }
                from = last + 1;
                covering.next();
            }
            if from <= piece_end {
                left.extend([from, piece_end]);
            }
            if piece_end >= upto {
                break;
            }
            next = piece_end + 1;
        }
        // Batch entries among the ones left (unacknowledged, not covered whole): acknowledged
        // in part elsewhere.
        if let Some((cluster, stretch)) = origin {
            in_part_of(
                received,
                (cluster, span.replicate_to),
                Stretch {
                    last: upto,
                    ..stretch
                },
                (span.ledger, &left),
                &mut covered.in_part,
            );
        }
        if let Some((cluster, Some(_))) = passes_origin {
            open.remove(cluster);
        }
        if let Some(Some(_)) = passes_own {
            open.remove(local_cluster);
        }
        if stop.is_some() || open.is_empty() {
            stopped = true;
            return false;
        }
        true
    })?;
    // Entries after the stop (even ones appended meanwhile) come later in their origin's
    // order than one already beyond what the states cover.
    covered.walked = if stopped {
        log.last_position()
    } else {
        Some(end).filter(|end| *end >= start)
    };
    Ok(covered)
}

/// Every entry of `runs`, one by one.
pub(crate) fn positions_in(runs: &[EntryRun]) -> Vec<Position> {
    runs.iter()
        .flat_map(|&(ledger, first, last)| {
            (first..=last).map(move |entry_id| Position::new(ledger, entry_id))
        })
        .collect()
}

/// The batch entries of `stretch` (of origin `cluster`, with `replicate_to`) in `left` (entry-id
/// intervals of `ledger`, as flat pairs: the unacknowledged entries not covered whole) that
/// `received` acknowledges in part, appended to `into` in log order.
fn in_part_of(
    received: &[SyncedAcks],
    (cluster, replicate_to): (&str, &[String]),
    stretch: Stretch,
    (ledger, left): (u64, &[u64]),
    into: &mut Vec<(Position, Vec<u64>)>,
) {
    if left.is_empty() {
        return;
    }
    let mut candidates: Vec<u64> = Vec::new();
    for sender in received {
        let Some(progress) = sender.acks.origins.get(cluster) else {
            continue;
        };
        if progress.batches.is_empty() || !reached(replicate_to, cluster, &sender.cluster) {
            continue;
        }
        let first = progress
            .batches
            .partition_point(|(position, _)| *position < stretch.at_first);
        for (position, _) in &progress.batches[first..] {
            match stretch.within(*position, *position) {
                Some((entry_id, _)) => candidates.push(entry_id),
                None => break,
            }
        }
    }
    candidates.sort_unstable();
    candidates.dedup();
    let mut pieces = left.chunks_exact(2).peekable();
    for entry_id in candidates {
        while pieces.peek().is_some_and(|piece| piece[1] < entry_id) {
            pieces.next();
        }
        if pieces.peek().is_none_or(|piece| piece[0] > entry_id) {
            continue;
        }
        let origin = Position::new(
            stretch.at_first.ledger_id,
            stretch.at_first.entry_id + (entry_id - stretch.first),
        );
        if let Some(words) = covered_in_part_elsewhere(received, cluster, origin, replicate_to) {
            into.push((Position::new(ledger, entry_id), words));
        }
    }
}

/// Acknowledges, in subscription `name` of `topic`, every unacknowledged entry that a state
/// received from another cluster covers, looking at entries after the mark-delete position and
/// at or after `from`. `held`: the states the cursor held when they were read (raw, as
/// [`received_states`] gives them), and `received` the same decoded. Returns the last position
/// it looked at; `None` when the cursor no longer holds those states.
fn apply(
    topic: &Topic,
    name: &str,
    (local_cluster, from): (&str, Option<Position>),
    map: &mut OriginMap,
    (held, received): (&[String], &[SyncedAcks]),
) -> Result<Option<Position>> {
    let log = topic.log();
    // Only the acknowledgements are copied, not the cursor's properties (the states).
    let Some((mark_delete, acknowledged)) = log.cursor_acknowledged(name) else {
        return Ok(None);
    };
    if received.is_empty() {
        return Ok(None);
    }
    let start = position_after(log, mark_delete).max(from.unwrap_or(Position::new(0, 0)));
    let Covered {
        whole: covered,
        in_part,
        walked,
        ..
    } = covered_by(log, map, &acknowledged, start, received, local_cluster)?;
    let subscription = topic.subscription(name);
    {
        // A reset (another cluster's, adopted by `receive`, or one made here) may have dropped
        // these states while this looked: what they cover must then stay unacknowledged, or
        // the reset would be undone here and, through this cluster's next state, everywhere.
        // Resets change the states under this lock, so they cannot slip in before the
        // acknowledgements below.
        let _properties = topic.lock_cursor_properties();
        let still_held = log
            .with_cursor(name, |current| {
                received_states(current).into_iter().eq(held.iter())
            })
            .unwrap_or(held.is_empty());
        if !still_held {
            return Ok(None);
        }
        if !covered.is_empty() {
            // Mirrored: what other clusters acknowledged is not this cluster's to tell them
            // (the sync task walks again only after the subscription's own changes).
            match &subscription {
                Some(subscription) => {
                    subscription.acknowledge_as(&positions_in(&covered), ChangeKind::Mirrored)?
                }
                None => {
                    // Covered entries come in runs (what the other cluster's consumers
                    // acknowledged since its last state): a run is one insertion.
                    log.acknowledge_ranges(name, &covered, ChangeKind::Mirrored)?;
                }
            }
        }
    }
    if !in_part.is_empty() && topic.batch_index_ack_enabled() {
        match &subscription {
            Some(subscription) => subscription.acknowledge_batch_indexes(&in_part)?,
            None => {
                let properties_lock = topic.lock_cursor_properties();
                let (_, complete) = batch_acks::record(log, name, &in_part)?;
                drop(properties_lock);
                log.acknowledge(name, &complete)?;
            }
        }
    }
    Ok(walked)
}

/// Keeps a state received from `acks.cluster` for subscription `name` (creating the subscription,
/// replicated, where it is missing) and applies it to the entries stored now. `raw`: the JSON
/// text `acks` was decoded from, stored as it is.
pub fn receive(
    topic: &Arc<Topic>,
    name: &str,
    (acks, raw): (SyncedAcks, String),
    local_cluster: &str,
) -> Result<()> {
    if acks.cluster == local_cluster {
        return Err(BrokerError::BadRequest(
            "a cluster does not send subscription state to itself".into(),
        ));
    }
    // Never the broker's own cursors (a replicator's, de-duplication's): a state applied to a
    // replication cursor would skip entries it has not sent.
    crate::topic::check_subscription_name(name).map_err(BrokerError::PreconditionFailed)?;
    let log = topic.log();
    let properties_lock = topic.lock_cursor_properties();
    // The cursor is read once (a copy of its whole state each time), and again only after a
    // reset changed it: this runs at every state received.
    let mut cursor = match log.cursor(name) {
        Some(cursor) => cursor,
        None => {
            topic.create_subscription(name, Some(None))?;
            log.cursor(name).unwrap_or_default()
        }
    };
    let key = format!("{SYNCED_PROPERTY_PREFIX}{}", acks.cluster);
    let stored_seq = cursor
        .properties
        .get(&key)
        .and_then(|value| stored_seq(value));
    if let (Some(stored), Some(seq)) = (stored_seq, acks.seq) {
        if seq < stored {
            // Older than the state held (a post that landed late, or a sender whose clock
            // stepped back): kept out; the answer tells the sender where to go on from.
            return Err(BrokerError::Conflict(format!(
                "replicated subscription state {seq} from {} is older than the one held, {STALE_STATE_MARKER}{stored}",
                acks.cluster
            )));
        }
    }
    let own_reset = replicated_subscriptions::reset_at(&cursor);
    if acks.reset_at < own_reset {
        // Sent before the sender learnt of a reset made since: it would undo the reset.
        tracing::debug!(topic = %topic.name, subscription = name, from = %acks.cluster, "ignoring a replicated subscription state older than the last reset");
        return Ok(());
    }
    let reset = acks.reset_at > own_reset;
    if reset {
        // A user moved the subscription back in the sender: start over from its state alone.
        topic.reset_subscription_here(name, None)?;
        tracing::info!(topic = %topic.name, subscription = name, from = %acks.cluster, "replicated subscription reset by another cluster");
        cursor = log.cursor(name).unwrap_or_default();
    }
    let mut properties = std::mem::take(&mut cursor.properties);
    if let (true, Some(reset_at)) = (reset, acks.reset_at) {
        replicated_subscriptions::adopt_reset(&mut properties, reset_at);
        properties.remove(crate::batch_acks::PROPERTY);
    }
    replicated_subscriptions::mark(&mut properties, true);
    // A state that no longer covers the one it replaces (the sender's acknowledgements went
    // back without a reset: its subscription deleted and created again, the cluster rebuilt)
    // makes what this cluster mirrored from the older one news to the sender: a change of
    // this subscription's own, so that the sync task walks again and tells it (skipping the
    // walk is right only while the sender holds all it ever sent).
    // (The previous state as this broker last received it, else decoded from the cursor.)
    let sync = topic.subscription_sync();
    let went_back = properties.get(&key).is_some_and(|previous| {
        let previous = sync
            .as_ref()
            .and_then(|sync| sync.take_last_received(name, &acks.cluster, stored_seq))
            .or_else(|| serde_json::from_str::<SyncedAcks>(previous).ok());
        previous.is_none_or(|previous| !replicated_subscriptions::only_repeats(&previous, &acks))
    });
    if let Some(sync) = &sync {
        sync.note_last_received(name, acks.clone());
    }
    properties.insert(key.clone(), raw);
    properties.insert(
        format!("{RECEIVED_AT_PROPERTY_PREFIX}{}", acks.cluster),
        now_ms().to_string(),
    );
    // What the cursor holds once the properties are set (under the lock, so nothing else
    // changes them): the states as stored, and decoded (this one as it came, the other
    // clusters' from the cursor).
    let applied: Vec<String> = properties
        .iter()
        .filter(|(stored_key, _)| stored_key.starts_with(SYNCED_PROPERTY_PREFIX))
        .map(|(_, value)| value.clone())
        .collect();
    let mut all: Vec<SyncedAcks> = properties
        .iter()
        .filter(|(stored_key, _)| {
            stored_key.starts_with(SYNCED_PROPERTY_PREFIX) && **stored_key != key
        })
        .filter_map(|(_, value)| serde_json::from_str(value).ok())
        .collect();
    all.push(acks);
    let kind = if went_back {
        ChangeKind::Own
    } else {
        ChangeKind::Mirrored
    };
    log.set_cursor_properties_as(name, properties, kind)?;
    if let Some(subscription) = topic.subscription(name) {
        // Its dispatcher acknowledges what the states cover instead of delivering it, also
        // for entries that arrive before the sync task's next tick.
        subscription.set_acknowledged_elsewhere(all.clone());
    }
    drop(properties_lock);
    // Entries that arrive later are covered by the sync task's next ticks.
    topic.ensure_subscription_sync();
    let walked = match topic.subscription_sync() {
        Some(sync) => with_origins(topic, &sync.origins, name, |map| {
            apply(topic, name, (local_cluster, None), map, (&applied, &all))
        })?,
        None => apply(
            topic,
            name,
            (local_cluster, None),
            &mut OriginMap::default(),
            (&applied, &all),
        )?,
    };
    if let Some(sync) = topic.subscription_sync() {
        // The sync task's next tick need not walk again (or decode) what this application did.
        sync.note_applied(name, (applied, walked), all);
    }
    // The sender takes the answer as "b has it": it must survive a crash of this cluster.
    log.persist_cursors()?;
    Ok(())
}

/// How sending one subscription's state to one remote cluster stands.
#[derive(Debug, Clone, Default)]
struct SendStatus {
    last_sent_ms: Option<u64>,
    /// Since when the current state differs from what the remote confirmed.
    unsent_since_ms: Option<u64>,
    /// Posts that failed in a row, the last one's error, and when to try again (a remote that
    /// refuses, down or no longer knowing the topic, is asked again later and later).
    failures: u32,
    last_error: Option<String>,
    next_attempt: Option<Instant>,
    /// How the last state the remote confirmed travelled.
    transport: Option<Transport>,
}

/// A topic's sync task: sends its replicated subscriptions' state to the other clusters and
/// applies what they sent as entries arrive. Stops when the topic is gone.
pub struct SubscriptionSync {
    wake: Arc<Notify>,
    /// By (subscription, remote cluster).
    sending: Arc<Mutex<HashMap<(String, String), SendStatus>>>,
    /// Applications made when a state arrived, for the task to take over.
    applied_on_receipt: Arc<Mutex<AppliedOnReceipt>>,
    /// Per replicated subscription, the origins of its entries as far as walks and
    /// applications read them (shared with applications on receipt).
    origins: Arc<Mutex<Origins>>,
    /// Replicated entries written since the origin maps last learned them; kept only once the
    /// topic has a replicated subscription (`recording`).
    written: Mutex<Written>,
    recording: AtomicBool,
    /// By (subscription, sending cluster), the state last received, decoded (so that the
    /// next one is compared with it without decoding it again from the cursor).
    last_received: Mutex<HashMap<(String, String), SyncedAcks>>,
}

/// Runs `f` with the origin map of subscription `name`, after every map of the topic learned
/// the replicated entries written since (so that they need not be read back from the log).
fn with_origins<R>(
    topic: &Topic,
    origins: &Mutex<Origins>,
    name: &str,
    f: impl FnOnce(&mut OriginMap) -> R,
) -> R {
    let mut origins = origins
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !origins.contains_key(name) {
        origins.insert(name.to_string(), OriginMap::default());
    }
    if let Some(sync) = topic.subscription_sync() {
        sync.recording.store(true, Ordering::Relaxed);
        let written = sync
            .written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take_durable(topic.log().last_position_and_rollbacks());
        if !written.is_empty() {
            for map in origins.values_mut() {
                map.learn_written(topic.log(), &written);
            }
        }
    }
    f(origins.get_mut(name).expect("inserted above"))
}

/// Per subscription, the received states (as stored) an application on receipt applied, the
/// last entry it looked at, and the states decoded.
type AppliedOnReceipt = HashMap<String, (Vec<String>, Option<Position>, Vec<SyncedAcks>)>;

/// Per replicated subscription, the origins of its entries (see [`OriginMap`]).
type Origins = HashMap<String, OriginMap>;

impl SubscriptionSync {
    pub fn start(topic: Weak<Topic>, name: TopicName, local_cluster: String) -> SubscriptionSync {
        let wake = Arc::new(Notify::new());
        let sending = Arc::new(Mutex::new(HashMap::new()));
        let applied_on_receipt = Arc::new(Mutex::new(HashMap::new()));
        let origins = Arc::new(Mutex::new(HashMap::new()));
        tokio::spawn(run(
            topic,
            name,
            local_cluster,
            wake.clone(),
            sending.clone(),
            (applied_on_receipt.clone(), origins.clone()),
        ));
        SubscriptionSync {
            wake,
            sending,
            applied_on_receipt,
            origins,
            written: Mutex::new(Written::default()),
            recording: AtomicBool::new(false),
            last_received: Mutex::default(),
        }
    }

    /// Takes the state last received from `cluster` for `subscription` if it is the one with
    /// `seq` (the one its cursor holds).
    fn take_last_received(
        &self,
        subscription: &str,
        cluster: &str,
        seq: Option<u64>,
    ) -> Option<SyncedAcks> {
        let mut last = self
            .last_received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        last.remove(&(subscription.to_string(), cluster.to_string()))
            .filter(|state| seq.is_some() && state.seq == seq)
    }

    fn note_last_received(&self, subscription: &str, state: SyncedAcks) {
        self.last_received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert((subscription.to_string(), state.cluster.clone()), state);
    }

    /// Notes that the replicated entry from `origin` was just appended at `position` (called
    /// under the topic's lock, so in position order). Markers are not noted: the origin maps
    /// read them (they have no origin there).
    /// `rollbacks`: the log's rollback count read before the append (see [`Log::rollbacks`]).
    pub fn note_written(&self, position: Position, rollbacks: u64, origin: super::chain::Origin) {
        if origin.marker || !self.recording.load(Ordering::Relaxed) {
            return;
        }
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .record(WrittenEntry {
                position,
                rollbacks,
                cluster: origin.cluster,
                origin: origin.position,
                replicate_to: origin.replicate_to,
            });
    }

    /// Whether entries written are noted ([`SubscriptionSync::note_written`] keeps them): once
    /// the topic's replicated subscriptions are walked.
    pub fn records_written(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    /// Forgets the entries noted as written: an append failed.
    pub fn forget_written(&self) {
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// Notes that `received` (the states of `subscription` as stored) were just applied, up to
    /// the entry at `walked`; `decoded`: the same states, decoded.
    fn note_applied(
        &self,
        subscription: &str,
        (received, walked): (Vec<String>, Option<Position>),
        decoded: Vec<SyncedAcks>,
    ) {
        self.applied_on_receipt
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(subscription.to_string(), (received, walked, decoded));
    }

    /// The sync stats of subscription `name`, whose cursor is in `cursor`, per other cluster.
    pub fn stats(
        &self,
        name: &str,
        cursor: &CursorState,
    ) -> BTreeMap<String, SubscriptionSyncStats> {
        let now = now_ms();
        let mut stats: BTreeMap<String, SubscriptionSyncStats> = BTreeMap::new();
        for ((subscription, remote), status) in self
            .sending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
        {
            if subscription == name {
                let entry = stats.entry(remote.clone()).or_default();
                entry.last_sent_timestamp = status.last_sent_ms;
                entry.unsent_for_ms = status
                    .unsent_since_ms
                    .map_or(0, |since| now.saturating_sub(since));
                entry.failed_attempts = status.failures;
                entry.last_error = status.last_error.clone();
                entry.transport = status.transport.map(Transport::name);
                entry.encoding = status.transport.map(Transport::encoding);
            }
        }
        for (key, value) in &cursor.properties {
            if let Some(cluster) = key.strip_prefix(RECEIVED_AT_PROPERTY_PREFIX) {
                stats
                    .entry(cluster.to_string())
                    .or_default()
                    .last_received_timestamp = value.parse().ok();
            }
        }
        stats
    }

    /// Sends changed state now instead of at the next tick (a consumer closed), also to a
    /// remote whose failed posts are being retried later and later: the consumer may be about
    /// to move there. If this post fails too, the backoff goes on from where it was.
    pub fn now(&self) {
        let mut sending = self
            .sending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for status in sending.values_mut() {
            status.next_attempt = None;
        }
        drop(sending);
        self.wake.notify_one();
    }
}

/// The outcome of one post of a state to a remote cluster.
struct Posted {
    /// (subscription, remote cluster)
    key: (String, String),
    body: SyncedAcks,
    /// When the post started (ms): the time the state was sent.
    sent_at_ms: u64,
    result: std::result::Result<Transport, SendError>,
}

/// What the sync task remembers of one replicated subscription between ticks.
#[derive(Default)]
struct Tracked {
    /// The frontier at the mark-delete position the last walk saw.
    frontier: Option<Frontier>,
    /// The last walk: the cursor state it saw and its result.
    walked: Option<Walked>,
    /// Per remote cluster, the state it confirmed and when.
    sent: HashMap<String, (SyncedAcks, Instant)>,
    /// The received states as last applied, and the last entry that application looked at.
    applied: Option<(Vec<String>, Option<Position>)>,
    /// The received states as last decoded: as stored, and decoded.
    decoded: Option<(Vec<String>, Vec<SyncedAcks>)>,
    /// The last state's content (acknowledgements, reset time) and its `seq`.
    last_state: Option<(OriginAcks, Option<u64>, u64)>,
    /// The highest `seq` a receiver answered it holds: the next state goes past it.
    seq_floor: u64,
    /// The last state every target settled on, if they all did.
    settled: Option<Settled>,
}

/// A state every target of a subscription settled on: each confirmed it (and then gets it
/// again when the confirmation is [`RESEND_UNCHANGED_AFTER`] old) or already held all of it.
#[derive(Debug, Clone)]
struct Settled {
    seq: u64,
    /// The cursor's version when it settled: a target that held all of the state settled
    /// only until the subscription's next own change (see `receive`: a sender whose state went
    /// back no longer holds it).
    version: u64,
    /// Per target, until when it stands (`None`: the target held all of the state itself).
    until: Vec<(String, Option<Instant>)>,
}

impl Tracked {
    /// Whether every one of `targets` settled on the state `seq` and still stands by it, the
    /// cursor at `version`.
    fn settled_with(&self, (seq, version): (u64, u64), targets: &[RemoteCluster]) -> bool {
        let now = Instant::now();
        self.settled.as_ref().is_some_and(|settled| {
            settled.seq == seq
                && settled.until.len() == targets.len()
                && targets.iter().all(|target| {
                    settled.until.iter().any(|(name, until)| {
                        *name == target.name
                            && match until {
                                Some(until) => now < *until,
                                None => settled.version == version,
                            }
                    })
                })
        })
    }

    /// The `seq` of a state with this content: the last one's while the content and the
    /// receivers allow, else a new one above it, above the clock and above what receivers hold.
    fn seq_for(&mut self, acks: &OriginAcks, reset_at: Option<u64>) -> u64 {
        if let Some((last_acks, last_reset, seq)) = &self.last_state {
            if last_acks == acks && *last_reset == reset_at && *seq > self.seq_floor {
                return *seq;
            }
        }
        let previous = self.last_state.as_ref().map_or(0, |(_, _, seq)| *seq);
        let seq = now_ms()
            .max(previous.saturating_add(1))
            .max(self.seq_floor.saturating_add(1));
        self.last_state = Some((acks.clone(), reset_at, seq));
        seq
    }
}

/// One replicated subscription's state at this tick, for the clusters in `targets`.
struct Outgoing {
    cursor: String,
    /// `None`: unchanged, and every target settled on it ([`Tracked::settled_with`]).
    body: Option<SyncedAcks>,
    targets: Vec<RemoteCluster>,
}

/// The first wait after a failed post; it doubles with each failure in a row, up to the max.
const RETRY_INITIAL: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Failures in a row after which a remote's refusal is logged as a warning (once).
const RETRY_WARN_AFTER: u32 = 5;

async fn run(
    topic: Weak<Topic>,
    name: TopicName,
    local_cluster: String,
    wake: Arc<Notify>,
    sending: Arc<Mutex<HashMap<(String, String), SendStatus>>>,
    (applied_on_receipt, origins): (Arc<Mutex<AppliedOnReceipt>>, Arc<Mutex<Origins>>),
) {
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut idle = false;
    // Posts run as tasks of their own, so that a remote that does not answer never delays the
    // others (or this topic's next ticks); at most one per subscription and remote at a time.
    let mut in_flight: HashSet<(String, String)> = HashSet::new();
    let (posted, mut outcomes) = mpsc::unbounded_channel::<Posted>();
    loop {
        // The interval can change with the namespace's policy. A topic without replicated
        // subscriptions is looked at rarely; marking one replicated wakes the task.
        let Some(interval) = topic.upgrade().map(|topic| topic.sync_interval()) else {
            return;
        };
        let interval = if idle { IDLE_INTERVAL } else { interval };
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = wake.notified() => {}
        }
        let Some(topic) = topic.upgrade() else {
            return;
        };
        if topic.is_closed() {
            return;
        }
        while let Ok(outcome) = outcomes.try_recv() {
            in_flight.remove(&outcome.key);
            match outcome.result {
                Ok(transport) => note_confirmed(
                    &mut tracked,
                    &sending,
                    outcome.key,
                    outcome.body,
                    (outcome.sent_at_ms, transport),
                ),
                Err(SendError {
                    stored_seq,
                    message: error,
                }) => {
                    if let (Some(stored), Some(entry)) =
                        (stored_seq, tracked.get_mut(&outcome.key.0))
                    {
                        // The receiver holds a later state (this sender's clock stepped back
                        // across a restart): the next state goes past it, at once.
                        entry.seq_floor = entry.seq_floor.max(stored);
                        update_status(&sending, &outcome.key, |status| {
                            status.failures = 0;
                            status.next_attempt = None;
                        });
                        continue;
                    }
                    let (failures, wait) = update_status(&sending, &outcome.key, |status| {
                        status.failures = status.failures.saturating_add(1);
                        let wait = RETRY_INITIAL
                            .saturating_mul(2u32.saturating_pow(status.failures.min(16) - 1))
                            .min(RETRY_MAX);
                        status.next_attempt = Some(Instant::now() + wait);
                        status.last_error = Some(error.clone());
                        (status.failures, wait)
                    });
                    let (subscription, remote) = &outcome.key;
                    if failures == RETRY_WARN_AFTER {
                        tracing::warn!(topic = %name, %subscription, %remote, %error, failures, "sending replicated subscription state keeps failing; retrying with a growing wait (up to 30 s)");
                    } else {
                        tracing::debug!(topic = %name, %subscription, %remote, %error, ?wait, "sending replicated subscription state failed; retrying later");
                    }
                }
            }
        }
        let remotes = topic.replication_remotes_running();
        // Applying received states and walking acknowledgements read the log: on a blocking
        // thread, so that a long walk (the first after a load reads from the log's start) never
        // holds up the runtime's workers.
        let (replicated, outgoing, back) = {
            let (topic, local_cluster, applied_on_receipt, origins) = (
                topic.clone(),
                local_cluster.clone(),
                applied_on_receipt.clone(),
                origins.clone(),
            );
            let mut tracked = std::mem::take(&mut tracked);
            let read = tokio::task::spawn_blocking(move || {
                let (replicated, outgoing) = read_states(
                    &topic,
                    &local_cluster,
                    &remotes,
                    &mut tracked,
                    (&applied_on_receipt, &origins),
                );
                (replicated, outgoing, tracked)
            });
            match read.await {
                Ok(read) => read,
                Err(error) => {
                    tracing::error!(topic = %name, %error, "the replicated subscription sync task failed");
                    return;
                }
            }
        };
        tracked = back;
        let mut targets_seen: HashSet<String> = HashSet::new();
        for Outgoing {
            cursor,
            body,
            targets,
        } in outgoing
        {
            let Some(entry) = tracked.get_mut(&cursor) else {
                continue;
            };
            targets_seen.extend(targets.iter().map(|remote| remote.name.clone()));
            let Some(body) = body else {
                continue;
            };
            let settled = settle(entry, &body, &targets);
            for (remote, confirmed) in targets.iter().zip(settled) {
                let key = (cursor.clone(), remote.name.clone());
                let waiting = update_status(&sending, &key, |status| {
                    if confirmed {
                        status.unsent_since_ms = None;
                    } else {
                        status.unsent_since_ms.get_or_insert_with(now_ms);
                    }
                    status.next_attempt.is_some_and(|at| Instant::now() < at)
                });
                if confirmed || waiting || !in_flight.insert(key.clone()) {
                    continue;
                }
                let (remote, topic_name, body, posted, clients) = (
                    remote.clone(),
                    name.clone(),
                    body.clone(),
                    posted.clone(),
                    topic.remote_clients(),
                );
                tokio::spawn(async move {
                    let sent_at_ms = now_ms();
                    let result = send(&clients, &remote, &topic_name, &key.0, &body).await;
                    let _ = posted.send(Posted {
                        key,
                        body,
                        sent_at_ms,
                        result,
                    });
                });
            }
        }
        idle = replicated.is_empty();
        applied_on_receipt
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|cursor, _| replicated.contains(cursor));
        tracked.retain(|cursor, _| replicated.contains(cursor));
        origins
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|cursor, _| replicated.contains(cursor));
        if let Some(sync) = topic.subscription_sync() {
            sync.last_received
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .retain(|(cursor, _), _| replicated.contains(cursor));
        }
        sending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|(cursor, remote), _| {
                replicated.contains(cursor) && targets_seen.contains(remote)
            });
        drop(topic);
    }
}

/// Per target, whether `body` needs no post to it: it confirmed this state less than
/// [`RESEND_UNCHANGED_AFTER`] ago, or held all of it already. Notes in `entry` whether they all
/// settled (so that the next ticks need not look again while the state stays the same).
fn settle(entry: &mut Tracked, body: &SyncedAcks, targets: &[RemoteCluster]) -> Vec<bool> {
    let now = Instant::now();
    let mut settled = Some(Settled {
        seq: body.seq.unwrap_or_default(),
        version: entry.walked.as_ref().map_or(0, |walked| walked.version),
        until: Vec::with_capacity(targets.len()),
    });
    let verdicts = targets
        .iter()
        .map(|remote| {
            let confirmed_until = entry
                .sent
                .get(&remote.name)
                .filter(|(state, _)| state == body)
                .map(|(_, at)| *at + RESEND_UNCHANGED_AFTER)
                .filter(|until| now < *until);
            let until = match confirmed_until {
                Some(until) => Some(Some(until)),
                None => only_repeats_remote(entry, &remote.name, body).then_some(None),
            };
            match (&mut settled, until) {
                (Some(settled), Some(until)) => settled.until.push((remote.name.clone(), until)),
                _ => settled = None,
            }
            until.is_some()
        })
        .collect();
    entry.settled = settled;
    verdicts
}

/// Whether `body` only repeats what the state `remote` sent (as last decoded here) says, so
/// that `remote` already holds all of it: the echo of its own state, not sent.
fn only_repeats_remote(entry: &Tracked, remote: &str, body: &SyncedAcks) -> bool {
    entry.decoded.as_ref().is_some_and(|(_, held)| {
        held.iter().any(|held| {
            held.cluster == remote && replicated_subscriptions::only_repeats(body, held)
        })
    })
}

/// Decodes the received states of a subscription again if they changed since last decoded.
/// `state`: the cursor the walk read (states and acknowledgements read at once, so every
/// acknowledgement the walk saw that a received state caused comes with that state or a newer
/// one, and the echo test, [`only_repeats_remote`], compares with states at least as new).
/// (The next application finds them decoded.)
fn refresh_received(state: &CursorState, entry: &mut Tracked) {
    let held = received_states(state);
    if entry
        .decoded
        .as_ref()
        .is_some_and(|(known, _)| held.iter().copied().eq(known))
    {
        return;
    }
    entry.decoded = Some((held.into_iter().cloned().collect(), received(state)));
}

/// The part of a tick that reads the log: applies the states other clusters sent to each
/// replicated subscription and walks its acknowledgements into the state to send. Returns the
/// replicated subscriptions and, where some other cluster is to be told, their states.
fn read_states(
    topic: &Topic,
    local_cluster: &str,
    remotes: &[RemoteCluster],
    tracked: &mut HashMap<String, Tracked>,
    (applied_on_receipt, origins): (&Mutex<AppliedOnReceipt>, &Mutex<Origins>),
) -> (Vec<String>, Vec<Outgoing>) {
    let name = topic.log().name().to_string();
    // Without another cluster to tell, there is nothing to walk for.
    let anyone = !remotes.is_empty() || topic.has_registered_clusters();
    let mut replicated = Vec::new();
    let mut outgoing = Vec::new();
    for cursor in topic.log().cursor_names() {
        // The broker's own cursors are never replicated subscriptions (`receive` refuses
        // them): not copied to find out.
        if crate::topic::is_system_cursor(&cursor) || crate::topic::is_replicator_cursor(&cursor) {
            continue;
        }
        let Some((state, version)) = topic.log().cursor_versioned(&cursor) else {
            continue;
        };
        if !replicated_subscriptions::is_replicated(&state) {
            continue;
        }
        replicated.push(cursor.clone());
        let entry = tracked.entry(cursor.clone()).or_default();
        let noted = applied_on_receipt
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&cursor);
        if let Some((received, walked, decoded)) = noted {
            entry.decoded = Some((received.clone(), decoded));
            entry.applied = Some((received, walked));
        }
        let (applied, walked) = with_origins(topic, origins, &cursor, |map| {
            let applied = apply_received(topic, &cursor, &state, local_cluster, entry, map);
            // The cursor as read above, unless the application may have acknowledged
            // entries since.
            let fresh;
            let seen = match applied {
                Ok(false) => Some((&state, version)),
                _ => {
                    fresh = topic.log().cursor_versioned(&cursor);
                    fresh.as_ref().map(|(state, version)| (state, *version))
                }
            };
            let walked = anyone.then(|| match seen {
                Some((seen, version)) => {
                    let mirrored_only = only_mirrored_since_walked(
                        topic,
                        (seen, version),
                        (remotes, local_cluster),
                        entry,
                    );
                    if mirrored_only {
                        return Ok(true);
                    }
                    let walked = walk(topic, (&cursor, seen, version), local_cluster, entry, map);
                    refresh_received(seen, entry);
                    walked
                }
                None => Err(BrokerError::SubscriptionNotFound {
                    topic: topic.log().name().to_string(),
                    subscription: cursor.clone(),
                }),
            });
            (applied, walked)
        });
        if let Err(error) = applied {
            tracing::warn!(topic = %name, subscription = %cursor, %error, "applying replicated subscription state failed");
        }
        let Some(walked) = walked else {
            continue;
        };
        let reset_at = replicated_subscriptions::reset_at(&state);
        let unchanged = match walked {
            Ok(unchanged) => unchanged,
            Err(error) => {
                tracing::warn!(topic = %name, subscription = %cursor, %error, "reading replicated subscription state failed");
                continue;
            }
        };
        let Some(walked) = entry.walked.take() else {
            continue;
        };
        let targets = targets(topic, remotes, &walked.acks, local_cluster);
        let seq = entry.seq_for(&walked.acks, reset_at);
        // The state every target settled on, unchanged: nothing to compare or send.
        let settled = unchanged && entry.settled_with((seq, walked.version), &targets);
        let body = (!settled).then(|| SyncedAcks {
            cluster: local_cluster.to_string(),
            acks: walked.acks.clone(),
            reset_at,
            seq: Some(seq),
        });
        entry.walked = Some(walked);
        outgoing.push(Outgoing {
            cursor,
            body,
            targets,
        });
    }
    (replicated, outgoing)
}

/// The clusters a subscription's state goes to: those the topic replicates to, and the origins
/// of the entries the state speaks of where they are registered clusters (with one-way
/// replication a->b, b's consumers' acknowledgements must reach a for a failback).
fn targets(
    topic: &Topic,
    remotes: &[RemoteCluster],
    acks: &OriginAcks,
    local_cluster: &str,
) -> Vec<RemoteCluster> {
    let mut targets = remotes.to_vec();
    for origin in acks.origins.keys() {
        if origin == local_cluster || targets.iter().any(|remote| remote.name == *origin) {
            continue;
        }
        targets.extend(topic.registered_cluster(origin));
    }
    targets
}

/// Notes that the remote in `key` confirmed `body`, posted at `sent_at_ms`. A state that is
/// no longer the latest (the subscription moved on while it was posted) leaves the newer one
/// unsent; the last-sent time is when the confirmed state was posted, not when the outcome
/// was taken in.
fn note_confirmed(
    tracked: &mut HashMap<String, Tracked>,
    sending: &Mutex<HashMap<(String, String), SendStatus>>,
    key: (String, String),
    body: SyncedAcks,
    (sent_at_ms, transport): (u64, Transport),
) {
    let mut latest = true;
    if let Some(entry) = tracked.get_mut(&key.0) {
        latest = entry
            .last_state
            .as_ref()
            .is_none_or(|(_, _, seq)| body.seq.is_none_or(|confirmed| confirmed >= *seq));
        entry.sent.insert(key.1.clone(), (body, Instant::now()));
    }
    update_status(sending, &key, |status| {
        status.last_sent_ms = status.last_sent_ms.max(Some(sent_at_ms));
        status.transport = Some(transport);
        if latest {
            status.unsent_since_ms = None;
        }
        status.failures = 0;
        status.last_error = None;
        status.next_attempt = None;
    });
}

fn update_status<R>(
    sending: &Mutex<HashMap<(String, String), SendStatus>>,
    key: &(String, String),
    change: impl FnOnce(&mut SendStatus) -> R,
) -> R {
    let mut sending = sending
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    change(sending.entry(key.clone()).or_default())
}

/// Applies the states other clusters sent: to every entry after the mark-delete position when
/// they changed, else only to the entries that arrived since the last application. Returns
/// whether it looked at entries (and so may have acknowledged some).
fn apply_received(
    topic: &Topic,
    cursor: &str,
    state: &CursorState,
    local_cluster: &str,
    tracked: &mut Tracked,
    map: &mut OriginMap,
) -> Result<bool> {
    let held = received_states(state);
    if held.is_empty() {
        return Ok(false);
    }
    // The states are compared where they are stored, and copied only when they changed.
    let (received, from, previous) = match tracked.applied.take() {
        Some((applied, walked)) if held.iter().copied().eq(&applied) => {
            if walked.is_some() && topic.log().last_position() == walked {
                tracked.applied = Some((applied, walked));
                return Ok(false);
            }
            let from = walked.map(|last| topic.log().next_position(last));
            (applied, from, walked)
        }
        other => (
            held.into_iter().cloned().collect::<Vec<String>>(),
            None,
            other.and_then(|(_, walked)| walked),
        ),
    };
    let decoded = match tracked.decoded.take() {
        Some((raw, decoded)) if raw == received => (raw, decoded),
        _ => (received.clone(), self::received(state)),
    };
    let walked = apply(
        topic,
        cursor,
        (local_cluster, from),
        map,
        (&received, &decoded.1),
    )?;
    tracked.decoded = Some(decoded);
    tracked.applied = Some((received, walked.or(previous)));
    Ok(true)
}

/// Whether the last walk still speaks for the subscription because all that changed since is
/// what one other cluster's state made it acknowledge (mirrored, see [`ChangeKind`]), and that
/// cluster is the only one the state goes to: walking again would only add what that cluster
/// itself sent, which it holds (an echo, never sent; the receiver's walk at every state it
/// applied was most of its sync work). With states from two or more clusters, or targets
/// beyond the sender, the walk runs, so that what one sent still reaches the others through
/// this cluster's state.
fn only_mirrored_since_walked(
    topic: &Topic,
    (state, version): (&CursorState, u64),
    (remotes, local_cluster): (&[RemoteCluster], &str),
    tracked: &Tracked,
) -> bool {
    let Some(walked) = tracked
        .walked
        .as_ref()
        .filter(|walked| walked.version == version)
    else {
        return false;
    };
    let mut senders = state
        .properties
        .keys()
        .filter_map(|key| key.strip_prefix(SYNCED_PROPERTY_PREFIX));
    let (Some(sender), None) = (senders.next(), senders.next()) else {
        return false;
    };
    // A walk now would also speak of the origins whose entries the sender's state made this
    // cluster acknowledge since (a third cluster's, which may not be among the last walk's):
    // registered, they are targets too.
    let Some((_, held)) = tracked.decoded.as_ref() else {
        return false;
    };
    let origins = walked
        .acks
        .origins
        .keys()
        .chain(held.iter().flat_map(|held| held.acks.origins.keys()));
    let mut targets = remotes.iter().map(|remote| remote.name.as_str()).chain(
        origins.map(String::as_str).filter(|origin| {
            *origin != local_cluster && topic.registered_cluster(origin).is_some()
        }),
    );
    targets.all(|target| target == sender)
}

/// The subscription's state in origin coordinates, into `tracked.walked`; walks again only
/// when the cursor moved, reading from the log only entries no walk read before. Returns
/// whether the state is the last walk's.
/// `state`: the cursor as read at once (with the received states it held), and its version.
fn walk(
    topic: &Topic,
    (cursor, state, version): (&str, &CursorState, u64),
    local_cluster: &str,
    tracked: &mut Tracked,
    map: &mut OriginMap,
) -> Result<bool> {
    let log = topic.log();
    if let Some(walked) = &mut tracked.walked {
        if walked.mark_delete == state.mark_delete
            && walked.acknowledged == state.acknowledged
            && walked.partial == batch_acks::decode(&state.properties)
        {
            walked.version = version;
            return Ok(true);
        }
    }
    let local_from = local_stored_from(state);
    let frontier = Frontier::at(
        log,
        map,
        local_cluster,
        state.mark_delete,
        tracked.frontier.as_ref(),
    )?
    .with_own_entries(local_cluster, state.mark_delete, local_from);
    let walked = origin_acks(log, map, state, &frontier, local_cluster)?;
    if let Some(mark_delete) = state.mark_delete {
        // No walk goes back before the mark-delete position unless the subscription is
        // reset (and then the map reads the log again).
        map.forget_through(mark_delete);
    }
    if let (None, Some(first)) = (local_from, walked.stored_from.get(local_cluster)) {
        let _properties = topic.lock_cursor_properties();
        note_local_stored_from(log, cursor, *first)?;
    }
    tracked.frontier = Some(frontier);
    tracked.walked = Some(Walked { version, ..walked });
    Ok(false)
}

/// How a state reached a remote cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// Meridian's REPLICATED_SUBSCRIPTION_STATE command on a replication connection, the state
    /// in the compact form or as JSON text (a broker that does not take the compact form).
    Binary { compact: bool },
    /// A post to the remote's admin API: a remote that does not announce the command (an older
    /// Meridian, or `replicated_subscriptions_state_command = false`), a state larger than
    /// its frame limit, or brokers that cannot be reached on the binary protocol.
    Http,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Binary { .. } => "binary",
            Transport::Http => "http",
        }
    }

    /// The state's encoding.
    fn encoding(self) -> &'static str {
        match self {
            Transport::Binary { compact: true } => "compact",
            Transport::Binary { compact: false } | Transport::Http => "json",
        }
    }
}

/// How long a remote has to answer one state, by either transport.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one subscription's state to a remote cluster: as a command on the replicators' client
/// of that cluster (to the broker that owns the topic there), or, if that broker does not take
/// the command, as a post to the remote's admin API.
async fn send(
    clients: &RemoteClients,
    remote: &RemoteCluster,
    topic: &TopicName,
    subscription: &str,
    body: &SyncedAcks,
) -> std::result::Result<Transport, SendError> {
    // Strings and numbers only: encoding cannot fail.
    let json = || bytes::Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    // Failures to reach the remote's brokers on the binary protocol (connecting, a lookup, a
    // connection lost or an answer that does not come) fall through to HTTP: the admin API may
    // be reachable when the replication connections are not, and a state that arrives before
    // the entries it covers is applied when they do. A broker's refusal is final.
    let client = match clients.existing(remote) {
        Some(client) => Ok(client),
        None => Box::pin(clients.get(remote)).await,
    };
    // The compact form to a broker that takes it, else the JSON text.
    let mut compact = false;
    let encode = |best| match best {
        StateFormat::Compact => {
            compact = true;
            let state = bytes::Bytes::from(state_format::encode_compact(body));
            (StateFormat::Compact, state)
        }
        StateFormat::Json => (StateFormat::Json, json()),
    };
    let unreachable = match client {
        Ok(client) => match client
            .send_subscription_state(&topic.to_string(), subscription, encode, SEND_TIMEOUT)
            .await
        {
            Ok(StateAnswer::Taken) => return Ok(Transport::Binary { compact }),
            Ok(StateAnswer::Older { stored_seq }) => {
                return Err(SendError {
                    stored_seq: Some(stored_seq),
                    message: format!(
                        "refused as older than the state held, {STALE_STATE_MARKER}{stored_seq}"
                    ),
                })
            }
            Ok(StateAnswer::NotSent) => None,
            Err(error) if error.server_error().is_some() => {
                return Err(SendError::from(error.to_string()))
            }
            Err(error) => Some(error.to_string()),
        },
        Err(error) => Some(error.to_string()),
    };
    if let Some(error) = &unreachable {
        tracing::debug!(remote = %remote.name, %topic, %subscription, %error, "sending a replicated subscription state on the binary protocol failed; posting it over HTTP");
    }
    let Some(peer) = remote.peer() else {
        return Err(SendError::from(unreachable.unwrap_or_else(|| {
            format!(
                "cluster {} has no serviceUrl (and does not take states on the binary protocol)",
                remote.name
            )
        })));
    };
    let path = format!(
        "/admin/v2/persistent/{}/{}/{}/subscription/{}/replicatedSubscriptionState",
        topic.tenant,
        topic.namespace,
        encode_path_segment(&topic.local),
        encode_path_segment(subscription),
    );
    let text = json();
    tokio::task::spawn_blocking(move || {
        // The JSON text the state was encoded to, as the body of the post.
        let json = std::str::from_utf8(&text).unwrap_or_default();
        match peer.call(
            http_agent(),
            "POST",
            &path,
            Some(("application/json", json)),
        ) {
            Ok(_) => Ok(Transport::Http),
            Err(ureq::Error::Status(409, response)) => {
                let reply = response.into_string().unwrap_or_default();
                Err(SendError {
                    stored_seq: stored_seq_in(&reply),
                    message: format!("409: {reply}"),
                })
            }
            Err(error) => Err(SendError::from(error.to_string())),
        }
    })
    .await
    .map_err(|error| SendError::from(error.to_string()))?
}

/// A post that failed: why, and the `seq` of the state the receiver holds when it refused the
/// post's as older.
#[derive(Debug)]
struct SendError {
    stored_seq: Option<u64>,
    message: String,
}

impl From<String> for SendError {
    fn from(message: String) -> Self {
        SendError {
            stored_seq: None,
            message,
        }
    }
}

/// One HTTP client for every sync task of the process, so that posts to a remote cluster reuse
/// its connections instead of opening one each.
fn http_agent() -> &'static crate::peer::PeerAgent {
    static AGENT: std::sync::OnceLock<crate::peer::PeerAgent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        crate::peer::PeerAgent::new(|builder| {
            builder
                .timeout(SEND_TIMEOUT)
                .max_idle_connections_per_host(4)
        })
    })
}

/// What `review_tests` drives: one subscription's ticks as [`run`] takes them (no posts).
#[cfg(test)]
pub(super) mod review_hooks {
    use super::*;
    use meridian_storage::{FlushPolicy, Storage, StorageConfig};

    /// Appends `count` entries made by `entry` to `topic` as this cluster's own, and waits
    /// until they are durable; returns their positions.
    pub(crate) fn append_own(
        topic: &Topic,
        count: usize,
        entry: impl Fn() -> bytes::Bytes,
    ) -> Vec<Position> {
        let pending: Vec<_> = (0..count)
            .map(|_| topic.log().append(entry(), 1).expect("append"))
            .collect();
        pending
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect()
    }

    /// Storage in `directory` that does not fsync at every append (the tests' logs).
    pub(crate) fn relaxed_storage(directory: &std::path::Path) -> Storage {
        let config = StorageConfig {
            flush_policy: FlushPolicy::RelaxedWriteOnly {
                fsync_interval: Duration::from_secs(1),
            },
            ..StorageConfig::default()
        };
        Storage::open(directory, config).expect("storage")
    }

    /// A test broker (in a directory kept as long as the handle) and its topic
    /// `persistent://t/n/<name>`.
    pub(crate) async fn test_topic(
        name: &str,
    ) -> (tempfile::TempDir, Arc<crate::broker::Broker>, Arc<Topic>) {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(&directory.path().join("storage"));
        let broker = crate::broker::test_broker(directory.path(), storage);
        let name = TopicName::parse(&format!("persistent://t/n/{name}")).expect("name");
        let topic = broker.topic(&name, true).await.expect("topic");
        (directory, broker, topic)
    }

    /// A remote cluster `name` for the tests (nothing listens at its address).
    pub(crate) fn remote(name: &str) -> RemoteCluster {
        RemoteCluster {
            name: name.to_string(),
            service_url: None,
            broker_service_url: "pulsar://127.0.0.1:1".to_string(),
            proxy_service_url: None,
            auth_token: None,
            tls: Default::default(),
        }
    }

    /// A sync task's memory between ticks.
    #[derive(Default)]
    pub(crate) struct Ticks {
        tracked: HashMap<String, Tracked>,
        applied: Mutex<AppliedOnReceipt>,
        origins: Mutex<Origins>,
    }

    impl Ticks {
        /// One tick for subscription `cursor`: its state and targets, and whether a body was
        /// made (`None`: unchanged and settled). Settles it as the task's loop does.
        pub(crate) fn tick(
            &mut self,
            topic: &Topic,
            remotes: &[RemoteCluster],
            cursor: &str,
        ) -> (Option<SyncedAcks>, Vec<String>) {
            let (_, outgoing) = read_states(
                topic,
                "standalone",
                remotes,
                &mut self.tracked,
                (&self.applied, &self.origins),
            );
            let Some(Outgoing { body, targets, .. }) = outgoing
                .into_iter()
                .find(|outgoing| outgoing.cursor == cursor)
            else {
                return (None, Vec::new());
            };
            if let Some(body) = &body {
                settle(
                    self.tracked.get_mut(cursor).expect("tracked"),
                    body,
                    &targets,
                );
            }
            (
                body,
                targets.into_iter().map(|remote| remote.name).collect(),
            )
        }

        /// Whether every target of `cursor` settled on its last state.
        pub(crate) fn settled(&self, cursor: &str) -> bool {
            self.tracked
                .get(cursor)
                .is_some_and(|entry| entry.settled.is_some())
        }

        /// Forgets that the targets of `cursor` settled (as a failed post would).
        pub(crate) fn unsettle(&mut self, cursor: &str) {
            if let Some(entry) = self.tracked.get_mut(cursor) {
                entry.settled = None;
            }
        }

        /// `remote` confirmed `body`, `ago` before now.
        pub(crate) fn confirm(
            &mut self,
            cursor: &str,
            remote: &str,
            body: SyncedAcks,
            ago: Duration,
        ) {
            let at = Instant::now().checked_sub(ago).expect("uptime");
            self.tracked
                .get_mut(cursor)
                .expect("tracked")
                .sent
                .insert(remote.to_string(), (body, at));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::review_hooks::relaxed_storage;
    use super::*;
    use meridian_storage::{FlushPolicy, InitialPosition, Storage, StorageConfig};
    use meridian_wire::proto::KeyValue;

    /// An entry as a producer in this cluster wrote it, or as replicated from `origin`.
    fn entry(origin: Option<(&str, Position)>) -> bytes::Bytes {
        entry_with(origin, false, &[])
    }

    /// A log of `count` entries, every third one replicated from c; returns it with the
    /// positions.
    fn mixed_log(storage: &Storage, count: u64) -> (Arc<Log>, Vec<Position>) {
        let log = storage.open_log("persistent://t/n/mixed").expect("log");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        let mut pending = Vec::new();
        for index in 0..count {
            let origin = (index % 3 == 0).then(|| ("c", Position::new(9, index)));
            pending.push(log.append(entry(origin), 1).expect("append"));
        }
        let positions = pending
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect();
        (log, positions)
    }

    /// A log of 200 entries in stretches: 0..40 stored here, 40..80 replicated from c at
    /// consecutive origin positions, 80..120 alternating between here and c, 120..160 from d,
    /// 160..200 here.
    fn stretched_log(storage: &Storage) -> (Arc<Log>, Vec<Position>) {
        let log = storage.open_log("persistent://t/n/stretched").expect("log");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        let mut pending = Vec::new();
        for index in 0..200u64 {
            let origin = match index {
                40..=79 => Some(("c", Position::new(9, 100 + index))),
                80..=119 if index % 2 == 0 => Some(("c", Position::new(10, index))),
                120..=159 => Some(("d", Position::new(4, index))),
                _ => None,
            };
            pending.push(log.append(entry(origin), 1).expect("append"));
        }
        let positions = pending
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect();
        (log, positions)
    }

    /// The state of the cursor in `state`, found the plain way: every entry of the log read,
    /// and fed to the builder one by one.
    fn reference_acks(log: &Log, state: &CursorState, local_cluster: &str) -> OriginAcks {
        let partial = batch_acks::decode(&state.properties);
        let entries = log
            .read_from(Position::new(0, 0), 100_000, usize::MAX)
            .expect("read");
        let origins: Vec<(Position, Option<(String, Position)>)> = entries
            .iter()
            .map(|entry| {
                let metadata = meridian_wire::entry_metadata(entry.data.clone()).expect("metadata");
                let origin = entry_origin(local_cluster, entry.position, &metadata);
                (entry.position, origin)
            })
            .collect();
        let mut through = BTreeMap::new();
        let mut stored_from = BTreeMap::new();
        for (position, origin) in &origins {
            if let Some((cluster, origin)) = origin {
                stored_from.entry(cluster.clone()).or_insert(*origin);
                if Some(*position) <= state.mark_delete {
                    through.insert(cluster.clone(), *origin);
                }
            }
        }
        let mut builder = OriginAcksBuilder::new(&through);
        let end = state
            .acknowledged
            .last()
            .max(partial.keys().next_back().copied());
        for (position, origin) in &origins {
            let Some((cluster, origin)) = origin else {
                continue;
            };
            if Some(*position) <= state.mark_delete || Some(*position) > end {
                continue;
            }
            let words = partial.get(position).map(Vec::as_slice);
            builder.entry_in_part(cluster, *origin, state.is_acknowledged(*position), words);
        }
        builder.finish(&stored_from)
    }

    /// The sync task's walk: the frontier, then the acknowledgements, with a kept map.
    fn walk_with(log: &Log, map: &mut OriginMap, known: Option<&Frontier>) -> (Frontier, Walked) {
        let state = log.cursor("sub").expect("cursor");
        let frontier = Frontier::at(log, map, "a", state.mark_delete, known).expect("frontier");
        let walked = origin_acks(log, map, &state, &frontier, "a").expect("walk");
        if let Some(mark_delete) = state.mark_delete {
            map.forget_through(mark_delete);
        }
        (frontier, walked)
    }

    /// A walk of `state` in cluster a as after a load: fresh origin maps, no frontier known;
    /// `own_entries`: with the entries a stored itself that the cursor notes.
    fn fresh_walk(log: &Log, state: &CursorState, own_entries: bool) -> Walked {
        let mut frontier =
            Frontier::at(log, &mut OriginMap::default(), "a", state.mark_delete, None)
                .expect("frontier");
        if own_entries {
            frontier = frontier.with_own_entries("a", state.mark_delete, local_stored_from(state));
        }
        origin_acks(log, &mut OriginMap::default(), state, &frontier, "a").expect("walk")
    }

    /// Every entry from `from` to `to` with its origin, as `map` describes it.
    fn origins_in(
        map: &mut OriginMap,
        log: &Log,
        (from, to): (Position, Position),
    ) -> Vec<(Position, Option<(String, Position)>)> {
        let mut found = Vec::new();
        map.visit(log, "a", from, to, |span| {
            for entry_id in span.first..=span.last {
                let origin = span.origin.zip(span.origin_at(entry_id));
                found.push((
                    Position::new(span.ledger, entry_id),
                    origin.map(|((cluster, _), at)| (cluster.to_string(), at)),
                ));
            }
            true
        })
        .expect("visit");
        found
    }

    #[test]
    fn entries_noted_as_written_are_not_read_back() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let (log, positions) = stretched_log(&storage);
        let mut map = OriginMap::default();
        origins_in(&mut map, &log, (positions[0], positions[39]));
        let read = map.entries_read();
        // The replicator's publish path noted 40..80 (from c) and 82, but not 80 and 81.
        let noted = |index: usize| WrittenEntry {
            position: positions[index],
            rollbacks: 0,
            cluster: "c".to_string(),
            origin: if index < 80 {
                Position::new(9, 100 + index as u64)
            } else {
                Position::new(10, index as u64)
            },
            replicate_to: Vec::new(),
        };
        let mut written = Written::default();
        for index in (40..80).chain([82]) {
            written.record(noted(index));
        }
        let written = written.take_durable((log.last_position(), 0));
        // 40..80 as one run (consecutive here and in c), 82 alone.
        assert_eq!(
            written.iter().map(|run| run.count).collect::<Vec<_>>(),
            vec![40, 1]
        );
        map.learn_written(&log, &written);
        let learned = origins_in(&mut map, &log, (positions[0], positions[99]));
        // Only 80..100 were read: 82 did not follow what the map covered, so it was read too.
        assert_eq!(map.entries_read(), read + 20);
        let reference = origins_in(
            &mut OriginMap::default(),
            &log,
            (positions[0], positions[99]),
        );
        assert_eq!(learned, reference);
    }

    /// This cluster's own entries, noted as the publish path writes them (origin: themselves),
    /// are learned like replicated ones: a walk over them reads none, and finds the origins
    /// that reading them gives.
    #[test]
    fn own_entries_noted_as_written_are_not_read_back() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let (log, positions) = stretched_log(&storage);
        let mut map = OriginMap::default();
        // A first walk read 0..10; then the publish path of cluster a (the tests' local
        // cluster) noted its entries 10..40, the replicator's noted c's 40..80.
        origins_in(&mut map, &log, (positions[0], positions[9]));
        let read = map.entries_read();
        let mut written = Written::default();
        for (index, position) in positions.iter().enumerate().take(80).skip(10) {
            let (cluster, origin) = if index < 40 {
                ("a", chain::origin_position(*position))
            } else {
                ("c", Position::new(9, 100 + index as u64))
            };
            written.record(WrittenEntry {
                position: *position,
                rollbacks: 0,
                cluster: cluster.to_string(),
                origin,
                replicate_to: Vec::new(),
            });
        }
        let written = written.take_durable((log.last_position(), 0));
        map.learn_written(&log, &written);
        let learned = origins_in(&mut map, &log, (positions[0], positions[79]));
        assert_eq!(
            map.entries_read(),
            read,
            "an entry noted as written was read"
        );
        let mut reading = OriginMap::default();
        let reference = origins_in(&mut reading, &log, (positions[0], positions[79]));
        assert_eq!(reading.entries_read(), 80);
        assert_eq!(learned, reference);
    }

    /// A disk-full rollback gives positions again: what was noted before it is never taken
    /// (it may name an entry that is not there any more), what was noted after it is.
    #[test]
    fn entries_noted_before_a_rollback_are_dropped() {
        let note = |entry_id: u64, rollbacks: u64| WrittenEntry {
            position: Position::new(7, entry_id),
            rollbacks,
            cluster: "c".to_string(),
            origin: Position::new(9, entry_id),
            replicate_to: Vec::new(),
        };
        let mut written = Written::default();
        for entry_id in 0..4 {
            written.record(note(entry_id, 0));
        }
        // 2 and 3 failed and were rolled back; 2 was given again to an entry noted after.
        written.record(note(2, 1));
        let taken = written.take_durable((Some(Position::new(7, 2)), 1));
        assert_eq!(
            taken,
            vec![WrittenRun {
                first: note(2, 1),
                count: 1
            }]
        );
        // Nothing from before the rollback is left to take later either.
        assert!(written
            .take_durable((Some(Position::new(7, 9)), 1))
            .is_empty());
    }

    /// Entries written in a row are kept as one run; the durable position may end inside it,
    /// and a map that already covers its beginning learns the rest.
    #[test]
    fn written_runs_split_at_the_durable_position_and_are_learned_from_where_a_map_ends() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let (log, positions) = stretched_log(&storage);
        let noted = |index: usize| WrittenEntry {
            position: positions[index],
            rollbacks: 0,
            cluster: "c".to_string(),
            origin: Position::new(9, 100 + index as u64),
            replicate_to: Vec::new(),
        };
        let mut written = Written::default();
        for index in 40..80 {
            written.record(noted(index));
        }
        let first = written.take_durable((Some(positions[49]), 0));
        assert_eq!(
            first,
            vec![WrittenRun {
                first: noted(40),
                count: 10
            }]
        );
        let rest = written.take_durable((log.last_position(), 0));
        assert_eq!(
            rest,
            vec![WrittenRun {
                first: noted(50),
                count: 30
            }]
        );
        // A map that read up to 59 learns 60..80 from the runs (40..50 and 50..60 it has).
        let mut map = OriginMap::default();
        origins_in(&mut map, &log, (positions[0], positions[59]));
        let read = map.entries_read();
        map.learn_written(&log, &first);
        map.learn_written(&log, &rest);
        let learned = origins_in(&mut map, &log, (positions[0], positions[79]));
        assert_eq!(map.entries_read(), read, "60..80 were learned, not read");
        let reference = origins_in(
            &mut OriginMap::default(),
            &log,
            (positions[0], positions[79]),
        );
        assert_eq!(learned, reference);
    }

    #[test]
    fn an_older_acknowledgement_is_translated_without_reading_the_log_again() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let (log, positions) = stretched_log(&storage);
        // Entry 2 stays unacknowledged; 3..150 acknowledged except 33, 41, 90 and 125.
        log.acknowledge("sub", &positions[..2]).expect("ack");
        let acknowledged: Vec<Position> = (3..150)
            .filter(|index| ![33, 41, 90, 125].contains(index))
            .map(|index| positions[index])
            .collect();
        log.acknowledge("sub", &acknowledged).expect("ack");
        let mut map = OriginMap::default();
        let (frontier, first) = walk_with(&log, &mut map, None);
        let state = log.cursor("sub").expect("cursor");
        assert_eq!(first.acks, reference_acks(&log, &state, "a"));
        let read = map.entries_read();
        // Consumers acknowledge older messages (the held-back ones of a Shared subscription).
        log.acknowledge("sub", &[positions[41], positions[125]])
            .expect("ack");
        let (_, second) = walk_with(&log, &mut map, Some(&frontier));
        let state = log.cursor("sub").expect("cursor");
        assert_eq!(second.acks, reference_acks(&log, &state, "a"));
        assert_ne!(second.acks, first.acks);
        assert_eq!(
            map.entries_read(),
            read,
            "the second walk read entries the first had read"
        );
        // Acknowledgements further on read only the entries no walk met yet.
        log.acknowledge("sub", &positions[150..170]).expect("ack");
        let (_, third) = walk_with(&log, &mut map, Some(&frontier));
        let state = log.cursor("sub").expect("cursor");
        assert_eq!(third.acks, reference_acks(&log, &state, "a"));
        assert_eq!(map.entries_read(), read + 20);
    }

    #[test]
    fn walks_with_a_kept_map_agree_with_reading_every_entry_under_random_acknowledgements() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let (mixed, mixed_positions) = mixed_log(&storage, 120);
        let (stretched, stretched_positions) = stretched_log(&storage);
        for (log, positions) in [(mixed, mixed_positions), (stretched, stretched_positions)] {
            let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
            let mut next = move |bound: usize| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed % bound as u64) as usize
            };
            let mut map = OriginMap::default();
            let mut frontier: Option<Frontier> = None;
            for step in 0..400 {
                match next(20) {
                    0 => {
                        let at = next(positions.len());
                        log.reset_cursor("sub", Some(positions[at])).expect("reset");
                    }
                    1 => {
                        let at = next(positions.len());
                        log.acknowledge_cumulative("sub", positions[at])
                            .expect("ack");
                    }
                    2 => {
                        let at = next(positions.len());
                        let properties = BTreeMap::from([(
                            batch_acks::PROPERTY.to_string(),
                            format!("{}:{}=5", positions[at].ledger_id, positions[at].entry_id),
                        )]);
                        log.set_cursor_properties("sub", properties).expect("set");
                    }
                    3 => {
                        let at = next(positions.len());
                        let until = (at + next(30)).min(positions.len());
                        let _ = log.acknowledge("sub", &positions[at..until]);
                    }
                    _ => {
                        let at = next(positions.len());
                        let _ = log.acknowledge("sub", &[positions[at]]);
                    }
                }
                let (found, walked) = walk_with(&log, &mut map, frontier.as_ref());
                let state = log.cursor("sub").expect("cursor");
                assert_eq!(
                    walked.acks,
                    reference_acks(&log, &state, "a"),
                    "step {step}"
                );
                frontier = Some(found);
            }
        }
    }

    #[test]
    fn a_log_trimmed_before_the_topic_loads_again_still_speaks_for_its_own_entries() {
        let directory = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            flush_policy: FlushPolicy::RelaxedWriteOnly {
                fsync_interval: Duration::from_secs(1),
            },
            segment_max_bytes: 4096,
            entry_max_bytes: 512,
            ..StorageConfig::default()
        };
        let storage = Storage::open(directory.path(), config).expect("storage");
        let log = storage.open_log("persistent://t/n/trimmed").expect("log");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        let pending: Vec<_> = (0..200)
            .map(|_| log.append(entry(None), 1).expect("append"))
            .collect();
        let positions: Vec<Position> = pending
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect();
        // A first acknowledgement and the sync task's walk, while the log still holds every
        // entry.
        log.acknowledge_cumulative("sub", positions[0])
            .expect("ack");
        let state = log.cursor("sub").expect("cursor");
        let first = fresh_walk(&log, &state, false);
        note_local_stored_from(&log, "sub", first.stored_from["a"]).expect("noted");
        // Its consumers acknowledge everything; the consumed segments are deleted.
        log.acknowledge_cumulative("sub", positions[199])
            .expect("ack");
        log.persist_cursors().expect("persist");
        log.trim().expect("trim");
        assert!(log.first_position() > Some(positions[0]), "trimmed");
        // The topic loads again: the walk starts over from the log as it is now.
        let state = log.cursor("sub").expect("cursor");
        let acks = fresh_walk(&log, &state, true).acks;
        for position in [positions[0], positions[100], positions[199]] {
            assert!(
                acks.covers("a", position, true),
                "{position:?} was acknowledged here: {acks:?}"
            );
        }
    }

    #[test]
    fn applying_a_state_reads_only_as_far_as_it_can_cover() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        // A backlog of 1,000 entries, every third replicated from c; b's consumers acknowledged
        // a's entries before the 10th and c's 3..=6.
        let (log, positions) = mixed_log(&storage, 1000);
        let origins = BTreeMap::from([
            (
                "a".to_string(),
                super::super::origin_acks::OriginProgress {
                    acked_below: Some(positions[10]),
                    stored_from: Some(positions[0]),
                    ..Default::default()
                },
            ),
            (
                "c".to_string(),
                super::super::origin_acks::OriginProgress {
                    acked_below: Some(Position::new(9, 0)),
                    stored_from: Some(Position::new(9, 0)),
                    ranges: vec![(Position::new(9, 3), Position::new(9, 6))],
                    ..Default::default()
                },
            ),
        ]);
        let received = vec![from_b(origins, None, None)];
        let state = log.cursor("sub").expect("cursor");
        let covered = covered_by(
            &log,
            &mut OriginMap::default(),
            &state.acknowledged,
            positions[0],
            &received,
            "a",
        )
        .expect("walk");
        let expected: Vec<Position> = [1, 2, 3, 4, 5, 6, 7, 8]
            .iter()
            .map(|index| positions[*index])
            .collect();
        assert_eq!(positions_in(&covered.whole), expected);
        assert!(
            covered.read <= 11,
            "read {} entries of a backlog of 1,000 to apply a state covering the first 9",
            covered.read
        );
        // Nothing after can be covered by this state: the next ticks need not look at it.
        assert_eq!(covered.walked, Some(positions[999]));
    }

    #[test]
    fn a_sender_whose_clock_stepped_back_goes_past_the_state_a_receiver_holds() {
        let mut tracked = Tracked::default();
        let acks = OriginAcks::default();
        let first = tracked.seq_for(&acks, None);
        assert_eq!(
            tracked.seq_for(&acks, None),
            first,
            "unchanged state, same seq"
        );
        // A receiver holds a state from before a restart, stamped far ahead of this clock.
        let reply = format!(
            "{{\"reason\":\"state 5 from a is older than the one held, {STALE_STATE_MARKER}{}\"}}",
            first + 3_600_000
        );
        let stored = stored_seq_in(&reply).expect("parsed");
        assert_eq!(stored, first + 3_600_000);
        tracked.seq_floor = stored;
        assert!(tracked.seq_for(&acks, None) > stored);
        assert_eq!(stored_seq_in("409: no marker"), None);
    }

    #[test]
    fn applying_a_state_looks_only_at_unacknowledged_entries() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let (log, positions) = mixed_log(&storage, 40);
        log.acknowledge("sub", &positions[5..30]).expect("ack");
        log.acknowledge("sub", &positions[31..38]).expect("ack");
        let state = log.cursor("sub").expect("cursor");
        // b acknowledged everything of a's and c's up to far beyond the log.
        let everything = super::super::origin_acks::OriginProgress {
            acked_below: Some(Position::new(u64::MAX, 0)),
            stored_from: Some(Position::new(0, 0)),
            ..Default::default()
        };
        let received = vec![SyncedAcks {
            cluster: "b".to_string(),
            acks: OriginAcks {
                origins: BTreeMap::from([
                    ("a".to_string(), everything.clone()),
                    ("c".to_string(), everything),
                ]),
            },
            reset_at: None,
            seq: None,
        }];
        let covered = covered_by(
            &log,
            &mut OriginMap::default(),
            &state.acknowledged,
            positions[2],
            &received,
            "a",
        )
        .expect("walk");
        let expected: Vec<Position> = [2, 3, 4, 30, 38, 39]
            .iter()
            .map(|index| positions[*index])
            .collect();
        assert_eq!(positions_in(&covered.whole), expected);
        assert_eq!(covered.read, expected.len());
        assert_eq!(covered.walked, Some(positions[39]));
    }

    #[test]
    fn an_origin_far_behind_the_mark_delete_position_is_part_of_the_state() {
        let directory = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            flush_policy: FlushPolicy::RelaxedWriteOnly {
                fsync_interval: Duration::from_secs(1),
            },
            ..StorageConfig::default()
        };
        let storage = Storage::open(directory.path(), config).expect("storage");
        let log = storage.open_log("persistent://t/n/far").expect("log");
        log.open_cursor("sub", InitialPosition::Earliest)
            .expect("cursor");
        // One entry from c, then more local entries than any fixed look-back would cover.
        let from_c = log
            .append(entry(Some(("c", Position::new(7, 3)))), 1)
            .expect("append");
        let mut last = from_c;
        for _ in 0..12_000 {
            last = log.append(entry(None), 1).expect("append");
        }
        let last = last.wait().expect("durable");
        log.acknowledge_cumulative("sub", last).expect("ack");
        let state = log.cursor("sub").expect("cursor");

        let acks = fresh_walk(&log, &state, false).acks;
        assert!(
            acks.covers("c", Position::new(7, 3), true),
            "c's entry is acknowledged: {acks:?}"
        );
        assert!(!acks.covers("c", Position::new(7, 4), true));
        assert!(acks.covers("a", last, true));
    }

    /// An entry of `origin` (`None`: stored here), optionally a marker or with a replication
    /// list.
    fn entry_with(
        origin: Option<(&str, Position)>,
        marker: bool,
        replicate_to: &[&str],
    ) -> bytes::Bytes {
        let mut metadata = MessageMetadata {
            producer_name: "p".to_owned(),
            publish_time: 1,
            replicate_to: replicate_to.iter().map(|name| name.to_string()).collect(),
            ..MessageMetadata::default()
        };
        if marker {
            metadata.marker_type =
                Some(meridian_wire::proto::MarkerType::ReplicatedSubscriptionSnapshot as i32);
        }
        if let Some((cluster, position)) = origin {
            metadata.replicated_from = Some(cluster.to_owned());
            metadata.properties.push(KeyValue {
                key: crate::replication::chain::ORIGIN_PROPERTY.to_owned(),
                value: format!("{}:{}", position.ledger_id, position.entry_id),
            });
        }
        meridian_wire::encode_entry(&metadata, b"x").expect("encode")
    }

    #[test]
    fn kept_maps_agree_with_fresh_ones_across_ledgers_appends_and_applications() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let name = "persistent://t/n/ledgers";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        // Each origin's next origin position: its entries reach this log in that order.
        let mut origin_next =
            BTreeMap::from([("c", Position::new(9, 0)), ("d", Position::new(4, 0))]);
        let append = |log: &Arc<Log>,
                      count: u64,
                      next: &mut dyn FnMut(u64) -> u64,
                      origin_next: &mut BTreeMap<&str, Position>| {
            let mut last = None;
            for _ in 0..count {
                let data = match next(10) {
                    0 => entry_with(None, true, &[]),
                    1..=3 => entry_with(None, false, &[]),
                    pick => {
                        let cluster = if pick < 8 { "c" } else { "d" };
                        let at = origin_next.get_mut(cluster).expect("origin");
                        let position = *at;
                        // Now and then the origin moves to another ledger, or skips
                        // entries not meant for this cluster.
                        *at = match next(12) {
                            0 => Position::new(at.ledger_id + 1, 0),
                            1 => Position::new(at.ledger_id, at.entry_id + 2),
                            _ => Position::new(at.ledger_id, at.entry_id + 1),
                        };
                        let replicate_to: &[&str] = if next(7) == 0 { &["b"] } else { &[] };
                        entry_with(Some((cluster, position)), false, replicate_to)
                    }
                };
                last = Some(log.append(data, 1).expect("append"));
            }
            if let Some(last) = last {
                last.wait().expect("durable");
            }
        };
        // Three ledgers of earlier opens of the log, then the current one.
        for _ in 0..3 {
            let log = storage.open_log(name).expect("log");
            if log.cursor("sub").is_none() {
                log.open_cursor("sub", InitialPosition::Earliest)
                    .expect("cursor");
            }
            append(&log, 40, &mut next, &mut origin_next);
            drop(log);
            storage.close_log(name).expect("close");
        }
        let log = storage.open_log(name).expect("log");
        let mut map = OriginMap::default();
        let mut frontier: Option<Frontier> = None;
        for step in 0..300 {
            let positions: Vec<Position> = log
                .read_from(Position::new(0, 0), 100_000, usize::MAX)
                .expect("read")
                .iter()
                .map(|entry| entry.position)
                .collect();
            let count = positions.len() as u64;
            let pick = |next: &mut dyn FnMut(u64) -> u64| positions[next(count) as usize];
            match next(12) {
                0 | 1 => {
                    let count = 1 + next(8);
                    append(&log, count, &mut next, &mut origin_next);
                }
                2 => {
                    let at = pick(&mut next);
                    log.reset_cursor("sub", Some(at)).expect("reset");
                }
                3 => {
                    let at = pick(&mut next);
                    log.acknowledge_cumulative("sub", at).expect("ack");
                }
                4 => {
                    let at = next(count) as usize;
                    let until = (at + next(30) as usize).min(positions.len());
                    let _ = log.acknowledge("sub", &positions[at..until]);
                }
                5 => {
                    // An application of a state from b: covers what it says, read through
                    // the kept map and through a fresh one alike.
                    let state = log.cursor("sub").expect("cursor");
                    let mut origins = BTreeMap::new();
                    for (cluster, base) in [
                        ("a", *positions.last().expect("entries")),
                        ("c", origin_next["c"]),
                        ("d", origin_next["d"]),
                    ] {
                        let below = Position::new(
                            base.ledger_id.saturating_sub(next(2)),
                            next(base.entry_id + 1),
                        );
                        let from = Position::new(below.ledger_id, next(below.entry_id + 1));
                        let start = Position::new(below.ledger_id, below.entry_id + next(5));
                        let range = (
                            start,
                            Position::new(start.ledger_id, start.entry_id + next(5)),
                        );
                        origins.insert(
                            cluster.to_string(),
                            super::super::origin_acks::OriginProgress {
                                acked_below: Some(below),
                                stored_from: Some(from),
                                ranges: vec![range],
                                ..Default::default()
                            },
                        );
                    }
                    let received = vec![from_b(origins, None, None)];
                    let start = position_after(&log, state.mark_delete);
                    let kept =
                        covered_by(&log, &mut map, &state.acknowledged, start, &received, "a")
                            .expect("kept");
                    let fresh = covered_by(
                        &log,
                        &mut OriginMap::default(),
                        &state.acknowledged,
                        start,
                        &received,
                        "a",
                    )
                    .expect("fresh");
                    assert_eq!(kept.whole, fresh.whole, "step {step}");
                    assert_eq!(kept.walked, fresh.walked, "step {step}");
                    log.acknowledge("sub", &positions_in(&kept.whole))
                        .expect("ack");
                }
                _ => {
                    let at = pick(&mut next);
                    let _ = log.acknowledge("sub", &[at]);
                }
            }
            let (found, walked) = walk_with(&log, &mut map, frontier.as_ref());
            let state = log.cursor("sub").expect("cursor");
            // Consumed ledgers are deleted: the kept frontier remembers where each origin
            // began before that, the plain reading starts at what is left.
            let (mut kept, plain) = (walked.acks, reference_acks(&log, &state, "a"));
            for (origin, progress) in &mut kept.origins {
                let read = plain.origins.get(origin).expect("same origins");
                assert!(progress.stored_from <= read.stored_from, "step {step}");
                progress.stored_from = read.stored_from;
            }
            assert_eq!(kept, plain, "step {step}");
            frontier = Some(found);
        }
    }

    /// The covering rule entry by entry (how `covered_by` worked before it went by spans and
    /// ranges): every unacknowledged entry from `start` on tested against the states alone.
    fn covered_entry_by_entry(
        log: &Log,
        map: &mut OriginMap,
        acknowledged: &RangeSet,
        start: Position,
        received: &[SyncedAcks],
        local_cluster: &str,
    ) -> (Vec<Position>, Vec<(Position, Vec<u64>)>) {
        let mut open = covered_bounds(received);
        let (mut whole, mut in_part) = (Vec::new(), Vec::new());
        let Some(end) = log.last_position().filter(|_| !open.is_empty()) else {
            return (whole, in_part);
        };
        let mut ranges = acknowledged
            .iter()
            .skip_while(|(ledger, _, last)| Position::new(*ledger, *last) < start)
            .peekable();
        map.visit(log, local_cluster, start, end, |span| {
            let mut next = span.first;
            while next <= span.last {
                while ranges
                    .peek()
                    .is_some_and(|(ledger, _, last)| (*ledger, *last) < (span.ledger, next))
                {
                    ranges.next();
                }
                if let Some(&(ledger, first, last)) = ranges.peek() {
                    if ledger == span.ledger && first <= next {
                        next = last.saturating_add(1);
                        continue;
                    }
                }
                let position = Position::new(span.ledger, next);
                if let (Some((cluster, _)), Some(origin)) = (span.origin, span.origin_at(next)) {
                    if covered_elsewhere(received, cluster, origin, span.replicate_to) {
                        whole.push(position);
                    } else if let Some(words) =
                        covered_in_part_elsewhere(received, cluster, origin, span.replicate_to)
                    {
                        in_part.push((position, words));
                    }
                    if open.get(cluster).is_some_and(|bound| origin >= *bound) {
                        open.remove(cluster);
                    }
                }
                // This cluster's own entries are their own origin positions.
                if open
                    .get(local_cluster)
                    .is_some_and(|bound| chain::origin_position(position) >= *bound)
                {
                    open.remove(local_cluster);
                }
                if open.is_empty() {
                    return false;
                }
                next += 1;
            }
            true
        })
        .expect("visit");
        (whole, in_part)
    }

    #[test]
    fn covering_by_spans_and_ranges_agrees_with_testing_every_entry() {
        let directory = tempfile::tempdir().expect("tempdir");
        let storage = relaxed_storage(directory.path());
        let name = "persistent://t/n/covering";
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound.max(1)
        };
        // Each origin's next origin position: its entries reach this log in that order.
        let mut origin_next =
            BTreeMap::from([("c", Position::new(9, 0)), ("d", Position::new(4, 0))]);
        let mut checked = (0, 0, 0);
        for round in 0..30 {
            // Entries in a new ledger (one per open of the log): stored here, markers,
            // replicated from c and d in stretches, some meant for b only.
            let log = storage.open_log(name).expect("log");
            if log.cursor("sub").is_none() {
                log.open_cursor("sub", InitialPosition::Earliest)
                    .expect("cursor");
                // Holds every ledger: none is deleted while the rounds read the log.
                log.open_cursor("hold", InitialPosition::Earliest)
                    .expect("cursor");
            }
            let mut last = None;
            let mut stretch = 0;
            let mut kind = 0;
            for _ in 0..20 + next(60) {
                if stretch == 0 {
                    kind = next(10);
                    stretch = 1 + next(12);
                }
                stretch -= 1;
                let data = match kind {
                    0 => entry_with(None, true, &[]),
                    1..=3 => entry_with(None, false, &[]),
                    pick => {
                        let cluster = if pick < 8 { "c" } else { "d" };
                        let at = origin_next.get_mut(cluster).expect("origin");
                        let position = *at;
                        *at = match next(15) {
                            0 => Position::new(at.ledger_id + 1, next(3)),
                            1 => Position::new(at.ledger_id, at.entry_id + 2),
                            _ => Position::new(at.ledger_id, at.entry_id + 1),
                        };
                        let replicate_to: &[&str] = match next(9) {
                            0 => &["b"],
                            1 => &["e", cluster],
                            _ => &[],
                        };
                        entry_with(Some((cluster, position)), false, replicate_to)
                    }
                };
                last = Some(log.append(data, 1).expect("append"));
            }
            last.expect("appended").wait().expect("durable");
            let positions: Vec<Position> = log
                .read_from(Position::new(0, 0), 100_000, usize::MAX)
                .expect("read")
                .iter()
                .map(|entry| entry.position)
                .collect();
            let count = positions.len() as u64;
            let mut map = OriginMap::default();
            for _ in 0..25 {
                // Acknowledgements here, in runs and one by one.
                for _ in 0..next(4) {
                    let at = next(count) as usize;
                    let until = (at + 1 + next(6) as usize).min(positions.len());
                    let _ = log.acknowledge("sub", &positions[at..until]);
                }
                // States from b and e about every origin, a (this cluster) included.
                let mut received = Vec::new();
                for sender in ["b", "e"] {
                    if next(3) == 0 {
                        continue;
                    }
                    let mut origins = BTreeMap::new();
                    for (cluster, base) in [
                        ("a", *positions.last().expect("entries")),
                        ("c", origin_next["c"]),
                        ("d", origin_next["d"]),
                    ] {
                        let at = |next: &mut dyn FnMut(u64) -> u64| {
                            Position::new(
                                base.ledger_id.saturating_sub(next(3)),
                                next(base.entry_id + 3),
                            )
                        };
                        let mut marks: Vec<Position> =
                            (0..2 * next(6)).map(|_| at(&mut next)).collect();
                        marks.sort();
                        marks.dedup();
                        let ranges: Vec<(Position, Position)> = marks
                            .chunks_exact(2)
                            .map(|pair| (pair[0], pair[1]))
                            .collect();
                        let below = at(&mut next);
                        let batches: Vec<(Position, Vec<u64>)> = (0..next(3))
                            .map(|_| at(&mut next))
                            .collect::<std::collections::BTreeSet<_>>()
                            .into_iter()
                            .map(|position| (position, vec![next(255) + 1]))
                            .collect();
                        origins.insert(
                            cluster.to_string(),
                            super::super::origin_acks::OriginProgress {
                                acked_below: (next(4) != 0).then_some(below),
                                stored_from: (next(4) != 0).then(|| {
                                    Position::new(below.ledger_id, next(below.entry_id + 1))
                                }),
                                ranges,
                                batches,
                            },
                        );
                    }
                    received.push(SyncedAcks {
                        cluster: sender.to_string(),
                        acks: OriginAcks { origins },
                        reset_at: None,
                        seq: None,
                    });
                }
                let state = log.cursor("sub").expect("cursor");
                let after = position_after(&log, state.mark_delete);
                let start = if next(3) == 0 {
                    after.max(positions[next(count) as usize])
                } else {
                    after
                };
                let (whole, in_part) = covered_entry_by_entry(
                    &log,
                    &mut OriginMap::default(),
                    &state.acknowledged,
                    start,
                    &received,
                    "a",
                );
                for map in [&mut map, &mut OriginMap::default()] {
                    let covered = covered_by(&log, map, &state.acknowledged, start, &received, "a")
                        .expect("covered");
                    assert_eq!(positions_in(&covered.whole), whole, "round {round}");
                    assert_eq!(covered.in_part, in_part, "round {round}");
                    // Runs are maximal: two runs never touch.
                    for pair in covered.whole.windows(2) {
                        assert!(
                            pair[0].0 < pair[1].0 || pair[0].2 + 1 < pair[1].1,
                            "round {round}: {:?}",
                            covered.whole
                        );
                    }
                }
                checked.0 += 1;
                checked.1 += whole.len();
                checked.2 += in_part.len();
                if next(2) == 0 {
                    log.acknowledge("sub", &whole).expect("ack");
                }
            }
            drop(log);
            storage.close_log(name).expect("close");
        }
        // The comparisons were not empty ones.
        assert!(checked.1 > 1000 && checked.2 > 20, "{checked:?}");
    }

    #[test]
    fn the_seq_of_a_stored_state_is_read_from_its_end_or_decoded() {
        let acks = OriginAcks {
            origins: BTreeMap::from([(
                "a".to_string(),
                super::super::origin_acks::OriginProgress {
                    acked_below: Some(Position::new(3, 7)),
                    stored_from: Some(Position::new(3, 0)),
                    ranges: vec![(Position::new(3, 9), Position::new(3, 12))],
                    ..Default::default()
                },
            )]),
        };
        for (reset_at, seq) in [
            (None, Some(1_764_000_000_123)),
            (Some(5), Some(0)),
            (None, None),
        ] {
            let state = SyncedAcks {
                cluster: "b".to_string(),
                acks: acks.clone(),
                reset_at,
                seq,
            };
            let text = serde_json::to_string(&state).expect("encode");
            assert_eq!(stored_seq(&text), seq, "{text}");
            // Other layouts (another sender's field order, spaces) are decoded.
            let spaced = serde_json::to_string_pretty(&state).expect("encode");
            assert_eq!(stored_seq(&spaced), seq, "{spaced}");
        }
        let reordered = r#"{"seq":42,"cluster":"b","acks":{"origins":{}}}"#;
        assert_eq!(stored_seq(reordered), Some(42));
        assert_eq!(stored_seq("not json"), None);
    }

    /// A state from b about `origins`.
    fn from_b(
        origins: BTreeMap<String, super::super::origin_acks::OriginProgress>,
        reset_at: Option<u64>,
        seq: Option<u64>,
    ) -> SyncedAcks {
        SyncedAcks {
            cluster: "b".to_string(),
            acks: OriginAcks { origins },
            reset_at,
            seq,
        }
    }

    /// A state from b covering this cluster's entries below `below` (stored from `first`).
    /// A state as the admin API hands it to `receive`: decoded, with the text it came as.
    fn as_received(acks: SyncedAcks) -> (SyncedAcks, String) {
        let raw = serde_json::to_string(&acks).expect("encoded");
        (acks, raw)
    }

    fn state_from_b(
        first: Position,
        below: Position,
        reset_at: Option<u64>,
        seq: u64,
    ) -> SyncedAcks {
        let progress = super::super::origin_acks::OriginProgress {
            acked_below: Some(below),
            stored_from: Some(first),
            ..Default::default()
        };
        let origins = BTreeMap::from([("standalone".to_string(), progress)]);
        from_b(origins, reset_at, Some(seq))
    }

    /// Appends `count` entries of this cluster's own to `topic`; returns their positions.
    fn append_own(topic: &Topic, count: usize) -> Vec<Position> {
        review_hooks::append_own(topic, count, || entry(None))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_state_a_reset_dropped_while_it_was_being_applied_acknowledges_nothing() {
        let (_directory, _broker, topic) = review_hooks::test_topic("reset").await;
        // The sync's work runs on blocking threads.
        tokio::task::block_in_place(|| {
            let positions = append_own(&topic, 10);
            // b's consumers acknowledged all ten.
            let after_last = Position::new(positions[9].ledger_id, positions[9].entry_id + 1);
            let everything = state_from_b(positions[0], after_last, None, 1);
            receive(&topic, "sub", as_received(everything), "standalone").expect("received");
            assert_eq!(
                topic.log().cursor("sub").expect("cursor").mark_delete,
                Some(positions[9])
            );
            // The sync task reads the cursor for its next application...
            let read_before = topic.log().cursor("sub").expect("cursor");
            // ...and b's user moves the subscription back: b's next state resets the copy here and
            // acknowledges only the first two.
            let moved_back = state_from_b(positions[0], positions[2], Some(now_ms()), 2);
            receive(&topic, "sub", as_received(moved_back), "standalone").expect("received");
            assert_eq!(
                topic.log().cursor("sub").expect("cursor").mark_delete,
                Some(positions[1])
            );
            // The application that read the cursor before the reset goes on.
            apply_received(
                &topic,
                "sub",
                &read_before,
                "standalone",
                &mut Tracked::default(),
                &mut OriginMap::default(),
            )
            .expect("applied");
            let cursor = topic.log().cursor("sub").expect("cursor");
            assert_eq!(
                cursor.mark_delete,
                Some(positions[1]),
                "the reset was undone: {cursor:?}"
            );
            assert!(positions[2..]
                .iter()
                .all(|position| !cursor.is_acknowledged(*position)));
        });
    }

    /// A receiver walks its subscription again only after changes of its own: what the one
    /// cluster that sent states made it acknowledge is that cluster's own news (an echo, once
    /// every target settled nothing is compared or sent), while an acknowledgement made here
    /// after such applications is in the next state, and with states from two clusters the
    /// walk runs at every change (what one sent reaches the others through this state).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receiver_walks_again_after_its_own_changes_not_after_mirrored_ones() {
        let (_directory, _broker, topic) = review_hooks::test_topic("mirrored").await;
        tokio::task::block_in_place(|| {
            let positions = append_own(&topic, 10);
            let mut ticks = review_hooks::Ticks::default();
            let remotes = [review_hooks::remote("b")];
            // One replicated subscription, whose state goes to b.
            let tick = |ticks: &mut review_hooks::Ticks| {
                let (body, targets) = ticks.tick(&topic, &remotes, "sub");
                assert_eq!(targets, ["b"]);
                body
            };
            let from_b = |below: usize, seq: u64| {
                let state = state_from_b(positions[0], positions[below], None, seq);
                receive(&topic, "sub", as_received(state.clone()), "standalone").expect("received");
                state
            };

            // b's consumers acknowledged the first three: the first walk makes a state that
            // only repeats b's, which b need not be sent.
            let first = from_b(3, 1);
            let walked = tick(&mut ticks).expect("the first tick walks");
            assert!(replicated_subscriptions::only_repeats(&walked, &first));
            assert!(ticks.settled("sub"), "an echo settles");
            // Then the first six: mirrored here, nothing to walk, compare or send.
            from_b(6, 2);
            assert_eq!(
                topic.log().cursor("sub").expect("cursor").mark_delete,
                Some(positions[5])
            );
            assert_eq!(tick(&mut ticks), None);

            // A consumer here acknowledges the ninth: the next state says so.
            topic
                .log()
                .acknowledge("sub", &[positions[8]])
                .expect("acknowledged");
            let own = tick(&mut ticks).expect("an own acknowledgement is walked");
            let latest = state_from_b(positions[0], positions[6], None, 2);
            assert!(
                !replicated_subscriptions::only_repeats(&own, &latest),
                "the acknowledgement made here is not in the state: {own:?}"
            );
            assert_eq!(tick(&mut ticks), Some(own.clone()), "sent until confirmed");

            // With a state from c as well, every change is walked again.
            let from_c = SyncedAcks {
                cluster: "c".to_string(),
                ..state_from_b(positions[0], positions[1], None, 1)
            };
            receive(&topic, "sub", as_received(from_c), "standalone").expect("received");
            tick(&mut ticks);
            ticks.unsettle("sub");
            from_b(7, 3);
            let walked = tick(&mut ticks).expect("walked with two senders");
            assert_ne!(
                walked.acks, own.acks,
                "b's seventh is not in the state: {walked:?}"
            );
        });
    }

    /// The outcome of an older post taken in after the subscription moved on: the newer state
    /// stays unsent (stats must not say the current state was confirmed), and the last-sent
    /// time is when each confirmed state was posted.
    #[test]
    fn an_older_state_confirmed_late_leaves_the_newer_one_unsent() {
        let key = ("sub".to_string(), "b".to_string());
        let state = |seq: u64| SyncedAcks {
            cluster: "a".to_string(),
            acks: OriginAcks::default(),
            reset_at: None,
            seq: Some(seq),
        };
        let mut tracked = HashMap::new();
        tracked.insert(
            "sub".to_string(),
            Tracked {
                last_state: Some((OriginAcks::default(), None, 20)),
                ..Tracked::default()
            },
        );
        let sending = Mutex::new(HashMap::new());
        update_status(&sending, &key, |status| status.unsent_since_ms = Some(5));
        let status = |sending: &Mutex<HashMap<(String, String), SendStatus>>| {
            let sending = sending.lock().expect("not poisoned");
            let status = &sending[&key];
            (status.last_sent_ms, status.unsent_since_ms)
        };

        note_confirmed(
            &mut tracked,
            &sending,
            key.clone(),
            state(10),
            (100, Transport::Binary { compact: true }),
        );
        assert_eq!(status(&sending), (Some(100), Some(5)));

        note_confirmed(
            &mut tracked,
            &sending,
            key.clone(),
            state(20),
            (90, Transport::Binary { compact: true }),
        );
        assert_eq!(status(&sending), (Some(100), None));
    }
}
