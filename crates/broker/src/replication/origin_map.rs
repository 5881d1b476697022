//! Where a log's entries come from, remembered as runs, so that the replicated-subscription sync
//! task translates a subscription's acknowledgements into origin coordinates without reading the
//! same entries again at every tick.
//!
//! A run is a stretch of consecutive entries of one ledger whose origin positions are
//! consecutive too (entries this cluster stored itself are one run per ledger; replicated
//! entries of one origin are one run until either side moves to another ledger). Walking a
//! subscription then costs per run and per acknowledged range, not per entry; only entries not
//! seen before are read from the log.

use std::collections::VecDeque;
use std::sync::Arc;

use meridian_storage::{Log, Position};

use meridian_wire::proto::KeyValue;
use meridian_wire::MessageMetadata;

use super::chain;
use crate::error::Result;

/// Entries read per storage call.
const READ_BATCH: usize = 1000;
/// The most runs a map keeps (72 bytes each, under 10 MB with the queue's spare capacity; an
/// origin's name and a replication list are shared with recent runs, not allocated per run):
/// entries beyond it are read from the log at each
/// visit instead of being remembered, so a log of entries from many origins interleaved one by
/// one costs reads, never unbounded memory.
pub const MAX_RUNS: usize = 100_000;
/// How many of the last runs a new run looks at for an origin name to share.
const RECENT_RUNS: usize = 8;

/// The most runs of written entries a topic keeps for its origin maps between two sync ticks
/// (about 90 bytes each); entries beyond it are not kept, and the maps read them from the log.
pub const MAX_WRITTEN: usize = 50_000;

/// A replicated entry as it was written: its position here, and where it comes from (known to
/// the replicator's publish path), so that origin maps learn it without reading it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenEntry {
    pub position: Position,
    /// The log's rollback count before the append: a note from before a rollback may name a
    /// position that now holds another entry.
    pub rollbacks: u64,
    pub cluster: String,
    /// Its position in `cluster`.
    pub origin: Position,
    /// Its replication list (empty: every cluster).
    pub replicate_to: Vec<String>,
}

/// `count` written entries from `first` on, at consecutive positions of one ledger and
/// consecutive origin positions of one origin ledger, with one replication list and rollback
/// count: what a replicator writes in a row is kept as one run, not entry by entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenRun {
    pub first: WrittenEntry,
    pub count: u64,
}

impl WrittenRun {
    /// Whether `entry` comes right after the run's last entry, in both coordinates.
    fn continued_by(&self, entry: &WrittenEntry) -> bool {
        let first = &self.first;
        first.rollbacks == entry.rollbacks
            && first.position.ledger_id == entry.position.ledger_id
            && first.position.entry_id.checked_add(self.count) == Some(entry.position.entry_id)
            && first.origin.ledger_id == entry.origin.ledger_id
            && first.origin.entry_id.checked_add(self.count) == Some(entry.origin.entry_id)
            && first.cluster == entry.cluster
            && first.replicate_to == entry.replicate_to
    }

    /// The run without its first `count` entries.
    fn skip(&mut self, count: u64) {
        debug_assert!(count < self.count);
        self.first.position.entry_id += count;
        self.first.origin.entry_id += count;
        self.count -= count;
    }

    fn last_position(&self) -> Position {
        Position::new(
            self.first.position.ledger_id,
            self.first.position.entry_id + (self.count - 1),
        )
    }
}

/// The replicated entries written since the sync task last took them, in position order, as
/// at most [`MAX_WRITTEN`] runs.
#[derive(Debug, Default)]
pub struct Written {
    runs: VecDeque<WrittenRun>,
}

impl Written {
    /// Notes an entry just appended (under the topic's lock: in position order).
    pub fn record(&mut self, entry: WrittenEntry) {
        if let Some(run) = self.runs.back_mut() {
            if run.continued_by(&entry) {
                run.count += 1;
                return;
            }
        }
        if self.runs.len() < MAX_WRITTEN {
            self.runs.push_back(WrittenRun {
                first: entry,
                count: 1,
            });
        }
    }

    /// Forgets everything noted (an append failed: the positions noted may hold nothing).
    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// Takes the entries noted at or before `durable` (the rest may still fail), given with
    /// the log's rollback count read together with it: every entry noted before a rollback is
    /// dropped (its position may hold another entry now, or be given again later; such entries
    /// are read from the log).
    pub fn take_durable(
        &mut self,
        (durable, rollbacks): (Option<Position>, u64),
    ) -> Vec<WrittenRun> {
        let Some(durable) = durable else {
            return Vec::new();
        };
        // Within one rollback count, notes are in position order.
        self.runs.retain(|run| run.first.rollbacks == rollbacks);
        let count = self
            .runs
            .partition_point(|run| run.last_position() <= durable);
        let mut taken: Vec<WrittenRun> = self.runs.drain(..count).collect();
        // A run the durable position ends inside of: its durable part.
        if let Some(run) = self.runs.front_mut() {
            let first = run.first.position;
            if first.ledger_id == durable.ledger_id && first.entry_id <= durable.entry_id {
                let durable_count = durable.entry_id - first.entry_id + 1;
                taken.push(WrittenRun {
                    first: run.first.clone(),
                    count: durable_count,
                });
                run.skip(durable_count);
            }
        }
        taken
    }
}

/// Where a stored entry comes from: `(cluster, position there)`. Markers have none (they are
/// never delivered), nor do replicated entries without an origin position.
pub fn entry_origin(
    local_cluster: &str,
    position: Position,
    metadata: &MessageMetadata,
) -> Option<(String, Position)> {
    origin_from(
        local_cluster,
        position,
        metadata.marker_type.is_some(),
        metadata.replicated_from.as_deref(),
        &metadata.properties,
    )
}

/// [`entry_origin`] from the fields it looks at: whether the entry is a marker, the cluster it
/// was replicated from and its properties (which name its position there).
fn origin_from(
    local_cluster: &str,
    position: Position,
    marker: bool,
    replicated_from: Option<&str>,
    properties: &[KeyValue],
) -> Option<(String, Position)> {
    if marker {
        return None;
    }
    let Some(cluster) = replicated_from else {
        return Some((local_cluster.to_string(), chain::origin_position(position)));
    };
    let origin = properties
        .iter()
        .find(|property| property.key == chain::ORIGIN_PROPERTY)?;
    Some((cluster.to_string(), chain::parse_position(&origin.value)?))
}

/// The fields of an entry's metadata a map needs, with their tags in `MessageMetadata`:
/// entries are read once each, and decoding only these skips allocating (and dropping) the
/// producer name and every other field.
#[derive(Clone, PartialEq, prost::Message)]
struct OriginFields {
    #[prost(message, repeated, tag = "4")]
    properties: Vec<KeyValue>,
    #[prost(string, optional, tag = "5")]
    replicated_from: Option<String>,
    #[prost(string, repeated, tag = "7")]
    replicate_to: Vec<String>,
    #[prost(int32, optional, tag = "20")]
    marker_type: Option<i32>,
}

/// Consecutive entries `first..=last` of one ledger that all come from one origin at
/// consecutive positions (`origin` is the origin of `first`), or that have no origin (markers).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    ledger: u64,
    first: u64,
    last: u64,
    origin: Option<(Arc<str>, Position)>,
    /// The entries' replication list (empty: every cluster).
    replicate_to: Arc<[String]>,
}

/// A stretch of entries handed to a visitor: `first..=last` of one ledger, with the origin of
/// `first` (the origin positions of the others follow it one by one).
#[derive(Debug, Clone, Copy)]
pub struct Span<'a> {
    pub ledger: u64,
    pub first: u64,
    pub last: u64,
    pub origin: Option<(&'a str, Position)>,
    /// The entries' replication list (empty: every cluster).
    pub replicate_to: &'a [String],
}

impl Span<'_> {
    /// The origin position of entry `entry_id` of the span.
    pub fn origin_at(&self, entry_id: u64) -> Option<Position> {
        self.origin.map(|(_, origin)| {
            Position::new(origin.ledger_id, origin.entry_id + (entry_id - self.first))
        })
    }
}

/// The origins of a stretch of a log, as runs.
#[derive(Debug, Clone, Default)]
pub struct OriginMap {
    runs: VecDeque<Run>,
    /// Every entry of the log from the first position up to the second (inclusive) is
    /// described by `runs`; positions without a run hold no entry.
    covers: Option<(Position, Position)>,
    /// Entries read from the log so far.
    entries_read: u64,
}

impl OriginMap {
    /// How many entries visits read from the log so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn entries_read(&self) -> u64 {
        self.entries_read
    }

    /// Calls `each` with the entries of `log` from `start` to `end` (inclusive), in order, as
    /// spans, until `each` returns `false`. Entries the map describes are not read again; the
    /// others are read and remembered (up to [`MAX_RUNS`]).
    pub fn visit(
        &mut self,
        log: &Log,
        local_cluster: &str,
        start: Position,
        end: Position,
        mut each: impl FnMut(Span<'_>) -> bool,
    ) -> Result<()> {
        if start > end {
            return Ok(());
        }
        let (next, remembering) = match self.covers {
            Some((from, through)) if from <= start => {
                let first_run = self
                    .runs
                    .partition_point(|run| Position::new(run.ledger, run.last) < start);
                for run in self.runs.range(first_run..) {
                    if Position::new(run.ledger, run.first) > end {
                        break;
                    }
                    let first = if run.ledger == start.ledger_id {
                        run.first.max(start.entry_id)
                    } else {
                        run.first
                    };
                    let last = if run.ledger == end.ledger_id {
                        run.last.min(end.entry_id)
                    } else {
                        run.last
                    };
                    let origin = run.origin.as_ref().map(|(cluster, origin)| {
                        let at = origin.entry_id + (first - run.first);
                        (&**cluster, Position::new(origin.ledger_id, at))
                    });
                    let span = Span {
                        ledger: run.ledger,
                        first,
                        last,
                        origin,
                        replicate_to: &run.replicate_to,
                    };
                    if !each(span) {
                        return Ok(());
                    }
                }
                if through >= end {
                    return Ok(());
                }
                if start > through && self.runs.len() >= MAX_RUNS {
                    // Full, and the visit starts past it: read only what it asks for.
                    (start, false)
                } else {
                    (log.next_position(through), true)
                }
            }
            _ => {
                // Nothing remembered where this visit starts: begin afresh there.
                self.runs.clear();
                self.covers = None;
                (start, true)
            }
        };
        self.read(log, local_cluster, (next, remembering), start, end, each)
    }

    /// Reads the log from `next` on until `end` and hands what lies in `start..=end` to `each`;
    /// with `remembering` (`next` is right after what the map covers, or where it begins
    /// afresh) the map remembers what it reads.
    fn read(
        &mut self,
        log: &Log,
        local_cluster: &str,
        (mut next, mut remembering): (Position, bool),
        start: Position,
        end: Position,
        mut each: impl FnMut(Span<'_>) -> bool,
    ) -> Result<()> {
        loop {
            let limit = if next.ledger_id == end.ledger_id {
                usize::try_from(end.entry_id.saturating_sub(next.entry_id))
                    .unwrap_or(READ_BATCH)
                    .saturating_add(1)
                    .min(READ_BATCH)
            } else {
                READ_BATCH
            };
            let entries = log.read_from(next, limit, 16 * 1024 * 1024)?;
            let Some(last) = entries.last().map(|entry| entry.position) else {
                return Ok(());
            };
            let mut going = true;
            for entry in entries {
                self.entries_read += 1;
                let position = entry.position;
                let (origin, replicate_to) =
                    match meridian_wire::entry_metadata_fields::<OriginFields>(&entry.data) {
                        Ok(fields) => (
                            origin_from(
                                local_cluster,
                                position,
                                fields.marker_type.is_some(),
                                fields.replicated_from.as_deref(),
                                &fields.properties,
                            ),
                            fields.replicate_to,
                        ),
                        Err(_) => (None, Vec::new()),
                    };
                if going && position >= start && position <= end {
                    going = each(Span {
                        ledger: position.ledger_id,
                        first: position.entry_id,
                        last: position.entry_id,
                        origin: origin
                            .as_ref()
                            .map(|(cluster, origin)| (cluster.as_str(), *origin)),
                        replicate_to: &replicate_to,
                    });
                }
                // Once one entry could not be remembered, the ones after it are not either:
                // the map covers one unbroken stretch.
                remembering = remembering
                    && self.remember(
                        position,
                        origin.as_ref().map(|(cluster, at)| (cluster.as_str(), *at)),
                        &replicate_to,
                        1,
                    );
            }
            if !going {
                return Ok(());
            }
            if last >= end {
                return Ok(());
            }
            next = log.next_position(last);
        }
    }

    /// Adds the entry at `position`, read right after the last one the map covers; `false`
    /// when the map is full.
    /// `count` entries from `position` on (consecutive, their origin positions too) are added
    /// at once.
    fn remember(
        &mut self,
        position: Position,
        origin: Option<(&str, Position)>,
        replicate_to: &[String],
        count: u64,
    ) -> bool {
        debug_assert!(count > 0);
        let last = Position::new(position.ledger_id, position.entry_id + (count - 1));
        if let Some(run) = self.runs.back_mut() {
            // Only an entry right after the run can extend it (an entry of the next ledger
            // starts a run of its own; its entry id may be below the run's first).
            let follows = run.ledger == position.ledger_id && run.last + 1 == position.entry_id;
            let same_origin = || match (&run.origin, &origin) {
                (None, None) => true,
                (Some((cluster, first)), Some((entry_cluster, entry_origin))) => {
                    **cluster == **entry_cluster
                        && first.ledger_id == entry_origin.ledger_id
                        && first.entry_id + (position.entry_id - run.first) == entry_origin.entry_id
                }
                _ => false,
            };
            if follows && same_origin() && *run.replicate_to == *replicate_to {
                run.last = last.entry_id;
                self.extend_cover(last);
                return true;
            }
        }
        if self.runs.len() >= MAX_RUNS {
            return false;
        }
        let origin = origin.map(|(cluster, origin)| {
            // The name is shared with a recent run of the same origin (origins that alternate
            // entry by entry allocate it once, not once per run).
            let known = self
                .runs
                .iter()
                .rev()
                .take(RECENT_RUNS)
                .filter_map(|run| run.origin.as_ref())
                .find(|(known, _)| **known == *cluster);
            let cluster = match known {
                Some((known, _)) => known.clone(),
                None => Arc::from(cluster),
            };
            (cluster, origin)
        });
        // Runs share the previous run's replication list when it is the same (nearly always
        // empty): no allocation per run for it.
        let replicate_to = match self.runs.back() {
            Some(run) if *run.replicate_to == *replicate_to => run.replicate_to.clone(),
            _ => Arc::from(replicate_to),
        };
        self.runs.push_back(Run {
            ledger: position.ledger_id,
            first: position.entry_id,
            last: last.entry_id,
            origin,
            replicate_to,
        });
        self.extend_cover(last);
        true
    }

    /// Remembers the written entries of `written` (ascending) that follow what the map covers
    /// without a gap (or, when it covers nothing, from the first of them on), so that visits
    /// need not read them from `log`: a run at a time. Stops at the first entry that does not
    /// follow (another entry was stored between them, one the map must read) or when the map
    /// is full.
    pub fn learn_written(&mut self, log: &Log, written: &[WrittenRun]) {
        let mut through = self.covers.map(|(_, through)| through);
        for run in written {
            let mut run = std::borrow::Cow::Borrowed(run);
            if let Some(through) = through {
                if run.last_position() <= through {
                    continue;
                }
                let first = run.first.position;
                if first <= through {
                    // The map covers the run's beginning (same ledger: the run ends after it).
                    run.to_mut().skip(through.entry_id - first.entry_id + 1);
                }
                let first = run.first.position;
                let follows = (first.ledger_id == through.ledger_id
                    && first.entry_id == through.entry_id + 1)
                    || first == log.next_position(through);
                if !follows {
                    return;
                }
            }
            let origin = Some((run.first.cluster.as_str(), run.first.origin));
            if !self.remember(
                run.first.position,
                origin,
                &run.first.replicate_to,
                run.count,
            ) {
                return;
            }
            through = Some(run.last_position());
        }
    }

    fn extend_cover(&mut self, position: Position) {
        let from = self.covers.map_or(position, |(from, _)| from);
        self.covers = Some((from, position));
    }

    /// Forgets the entries at or before `position` (acknowledged for good: no walk goes back
    /// there unless a subscription is reset, and then the map reads them again).
    pub fn forget_through(&mut self, position: Position) {
        let Some((from, through)) = self.covers else {
            return;
        };
        if position < from {
            return;
        }
        while let Some(run) = self.runs.front_mut() {
            if Position::new(run.ledger, run.last) <= position {
                self.runs.pop_front();
            } else {
                if run.ledger == position.ledger_id && run.first <= position.entry_id {
                    let cut = position.entry_id + 1 - run.first;
                    run.first = position.entry_id + 1;
                    if let Some((_, origin)) = run.origin.as_mut() {
                        origin.entry_id += cut;
                    }
                }
                break;
            }
        }
        let after = Position::new(position.ledger_id, position.entry_id.saturating_add(1));
        self.covers = (position < through).then_some((after, through));
        if self.covers.is_none() {
            self.runs.clear();
        }
    }
}
