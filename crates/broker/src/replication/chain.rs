//! The replication chain: how a replicated entry names where it comes from and what its
//! replicator sent before it to the same remote, so that the remote can prove it holds every
//! entry meant for it (`docs/replication.md`, "No silent gap: the chain").
//!
//! A replicated entry carries `replicated_from` (the origin cluster) and two properties, both
//! `"<ledger>:<entry>"`: [`ORIGIN_PROPERTY`], its position in the origin cluster, and
//! [`PREVIOUS_PROPERTY`], the origin position of the entry the same replicator sent before it
//! (absent on the first entry of a chain). The remote stores a new entry only if that previous
//! position is the last one it stored from the origin ([`check_chain`]); the replicator keeps
//! the last confirmed position in its cursor's [`CHAIN_CURSOR_PROPERTY`], so the chain survives
//! restarts on both sides.

use bytes::Bytes;
use meridian_storage::Position;
use meridian_wire::proto::KeyValue;
use meridian_wire::MessageMetadata;

use crate::dedup::{position_sequence, Dedup, Verdict};

/// The property that carries an entry's origin position (`<ledger>:<entry>`).
pub const ORIGIN_PROPERTY: &str = "__MSG_PROP_REPL_SOURCE_POSITION";
/// The property that carries the origin position of the entry the replicator sent before this
/// one to the same remote (the chain the remote checks); absent on the first entry of a chain.
pub const PREVIOUS_PROPERTY: &str = "__MSG_PROP_REPL_PREVIOUS_POSITION";
/// Property of the replicator's cursor: the origin position of the last entry the remote
/// confirmed, where the chain goes on after a restart.
pub const CHAIN_CURSOR_PROPERTY: &str = "replication.lastConfirmed";

/// The lowest ledger id of a topic's local copy in cluster mode with `--storage`
/// (`crates/broker/src/cluster/logs.rs`: epoch × 2^41). Every copy holds one ledger whose entry
/// `n` is the object-store log's entry `n`, so the same entry has a new ledger id after each
/// move; standalone's ledger ids (start times in ms) stay below it until 2039.
pub const COPY_LEDGER_FLOOR: u64 = 1 << 41;

/// A position of this cluster's log as other clusters know it (origin coordinates): the
/// position itself, except in a cluster-mode copy, whose entries are named by their entry id
/// under [`COPY_LEDGER_FLOOR`] whichever copy (owner) holds them. So an entry keeps its origin
/// position across moves of its topic: a replicator resending after a move sends positions the
/// remote recognises, and replicated subscriptions' states keep naming the same entries.
/// Monotonic within a log.
pub fn origin_position(position: Position) -> Position {
    if position.ledger_id >= COPY_LEDGER_FLOOR {
        Position::new(COPY_LEDGER_FLOOR, position.entry_id)
    } else {
        position
    }
}

/// Where a replicated entry comes from, as its metadata says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub cluster: String,
    /// Its position in the origin cluster.
    pub position: Position,
    /// The origin position of the entry its replicator sent before it to this cluster;
    /// `None` on the first entry of a chain.
    pub previous: Option<Position>,
    /// What it teaches about its producer: `(learned key, highest sequence id)`
    /// ([`crate::dedup::learned_from`]).
    pub learned: Option<(String, crate::dedup::Sequence)>,
    /// Its replication list (empty: every cluster).
    pub replicate_to: Vec<String>,
    /// A marker (never delivered, without an origin for replicated subscriptions).
    pub marker: bool,
}

/// The origin of a replicated entry, from its metadata.
pub fn origin_of(metadata: &MessageMetadata) -> Option<Origin> {
    let cluster = metadata.replicated_from.as_ref()?;
    let property = |key: &str| {
        metadata
            .properties
            .iter()
            .find(|property| property.key == key)
            .map(|property| property.value.as_str())
    };
    Some(Origin {
        cluster: cluster.clone(),
        position: parse_position(property(ORIGIN_PROPERTY)?)?,
        previous: property(PREVIOUS_PROPERTY).and_then(parse_position),
        learned: crate::dedup::learned_from(metadata),
        replicate_to: metadata.replicate_to.clone(),
        marker: metadata.marker_type.is_some(),
    })
}

pub(crate) fn parse_position(value: &str) -> Option<Position> {
    let (ledger, entry) = value.split_once(':')?;
    Some(Position::new(ledger.parse().ok()?, entry.parse().ok()?))
}

pub(crate) fn format_position(position: Position) -> String {
    format!("{}:{}", position.ledger_id, position.entry_id)
}

pub(crate) fn is_replication_property(property: &KeyValue) -> bool {
    property.key == ORIGIN_PROPERTY || property.key == PREVIOUS_PROPERTY
}

/// A replicated entry as consumers get it: without the origin and chain properties, which only
/// replication uses, so that applications see the properties they sent. Other entries are
/// returned as they are, without a copy.
pub fn without_origin(metadata: &MessageMetadata, entry: Bytes) -> Bytes {
    if metadata.replicated_from.is_none()
        || !metadata.properties.iter().any(is_replication_property)
    {
        return entry;
    }
    let Ok((mut metadata, payload)) = meridian_wire::entry_parts(entry.clone()) else {
        return entry;
    };
    metadata
        .properties
        .retain(|property| !is_replication_property(property));
    meridian_wire::encode_entry(&metadata, &payload).unwrap_or(entry)
}

/// The remote's verdict on a replicated entry: a duplicate, or new if it continues its chain.
pub(crate) fn check_chain(dedup: &mut Dedup, key: &str, origin: &Origin) -> Verdict {
    let sequence = |position: Position| position_sequence(position.ledger_id, position.entry_id);
    dedup.check_replicated(
        key,
        sequence(origin.position),
        origin.previous.map(sequence),
    )
}

/// Why the remote refuses an entry that does not continue its chain.
pub fn gap_message(origin: &Origin, last: Option<(u64, u64)>) -> String {
    let show =
        |position: Option<Position>| position.map_or_else(|| "none".to_string(), format_position);
    format!(
        "replication gap: entry {} from cluster {} follows {}, but the last entry stored from {} is {}",
        format_position(origin.position),
        origin.cluster,
        show(origin.previous),
        origin.cluster,
        show(last.map(|(ledger, entry)| Position::new(ledger, entry))),
    )
}
