//! Review of the receiver that covers received states by spans and ranges: its results against
//! the per-entry rule the dispatcher uses ([`acknowledged_elsewhere`],
//! [`acknowledged_in_part_elsewhere`]) applied to every entry of the log, read back one by one,
//! on logs and states meant to be hostile; and the run-based [`Written`] against noting entries
//! one by one.

use std::collections::BTreeMap;
use std::time::Duration;

use meridian_storage::{InitialPosition, Log, Position};
use meridian_wire::proto::KeyValue;
use meridian_wire::MessageMetadata;

use super::origin_acks::{OriginAcks, OriginProgress};
use super::origin_map::{OriginMap, Written, WrittenEntry, WrittenRun};
use super::subscription_sync::{
    acknowledged_elsewhere, acknowledged_in_part_elsewhere, covered_by, position_after,
    positions_in, stored_seq, SyncedAcks,
};

/// A tiny deterministic generator (xorshift): `next(bound)` in `0..bound`.
fn generator(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |bound: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % bound.max(1)
    }
}

fn metadata_of(
    origin: Option<(&str, Position)>,
    marker: bool,
    replicate_to: &[&str],
) -> MessageMetadata {
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
            key: super::chain::ORIGIN_PROPERTY.to_owned(),
            value: format!("{}:{}", position.ledger_id, position.entry_id),
        });
    }
    metadata
}

/// The per-entry rule: every entry from `start` on that is neither at or before the
/// mark-delete position nor acknowledged, tested alone against `received`.
fn per_entry(
    log: &Log,
    start: Position,
    received: &[SyncedAcks],
) -> (Vec<Position>, Vec<(Position, Vec<u64>)>) {
    let state = log.cursor("sub").expect("cursor");
    let (mut whole, mut in_part) = (Vec::new(), Vec::new());
    for entry in log
        .read_from(Position::new(0, 0), 1_000_000, usize::MAX)
        .expect("read")
    {
        let position = entry.position;
        if position < start
            || state.mark_delete.is_some_and(|mark| position <= mark)
            || state.acknowledged.contains(position)
        {
            continue;
        }
        let metadata = meridian_wire::entry_metadata(entry.data).expect("metadata");
        if acknowledged_elsewhere(received, "a", position, &metadata) {
            whole.push(position);
        } else if let Some(words) =
            acknowledged_in_part_elsewhere(received, "a", position, &metadata)
        {
            in_part.push((position, words));
        }
    }
    (whole, in_part)
}

/// A random position near `base` (an origin's next position): in its ledger or up to two
/// before, entry 0 often (a bound at the start of a ledger), past its end sometimes.
fn near(next: &mut dyn FnMut(u64) -> u64, base: Position) -> Position {
    let ledger = base.ledger_id.saturating_sub(next(3));
    let entry_id = match next(6) {
        0 => 0,
        1 => base.entry_id + next(4),
        _ => next(base.entry_id + 2),
    };
    Position::new(ledger, entry_id)
}

/// Three other origins (c, d, f) interleaved entry by entry and in stretches with this
/// cluster's own entries and markers, origin ledgers rolling (to entry 0 or further on) and
/// gaps in origin positions, replication lists that leave out one sender, the other, both, or
/// name only the origin; states from b, e and the origin c itself (which a replication list
/// never leaves out), with ranges across ledgers, bounds at entry 0, `stored_from` after
/// `acked_below`, batches on entries the log holds; maps kept across appends and taught by
/// the run-based `Written`. Whatever the new covering acknowledges, whole or in part, must be
/// exactly what the per-entry rule gives.
#[test]
fn hostile_covering_agrees_with_the_per_entry_rule() {
    let directory = tempfile::tempdir().expect("tempdir");
    let storage = relaxed_storage(directory.path());
    let name = "persistent://t/n/review";
    let mut next = generator(0x9e37_79b9_7f4a_7c15);
    let mut origin_next = BTreeMap::from([
        ("c", Position::new(9, 0)),
        ("d", Position::new(4, 5)),
        ("f", Position::new(1, 0)),
    ]);
    // Every origin position given, per origin: states speak of these (and of others).
    let mut given: BTreeMap<&str, Vec<Position>> = BTreeMap::new();
    let mut kept = OriginMap::default();
    let mut written = Written::default();
    let mut checked = (0usize, 0usize, 0usize);
    let mut trimmed = 0;
    for round in 0..24 {
        let log = storage.open_log(name).expect("log");
        if log.cursor("sub").is_none() {
            log.open_cursor("sub", InitialPosition::Earliest)
                .expect("cursor");
            log.open_cursor("hold", InitialPosition::Earliest)
                .expect("cursor");
        }
        let (mut stretch, mut kind) = (0, 0);
        let mut last = None;
        for _ in 0..10 + next(50) {
            if stretch == 0 {
                kind = next(12);
                // Often one entry per stretch: origins alternate entry by entry.
                stretch = if next(3) == 0 { 1 } else { 1 + next(10) };
            }
            stretch -= 1;
            let replicate_to: &[&str] = match next(12) {
                0 => &["b"],
                1 => &["e"],
                2 => &["x"],
                3 => &["b", "e"],
                _ => &[],
            };
            let (origin, marker) = match kind {
                0 => (None, true),
                1..=3 => (None, false),
                pick => {
                    let cluster = match pick {
                        4..=6 => "c",
                        7..=9 => "d",
                        _ => "f",
                    };
                    let at = origin_next.get_mut(cluster).expect("origin");
                    let position = *at;
                    *at = match next(12) {
                        0 => Position::new(at.ledger_id + 1, 0),
                        1 => Position::new(at.ledger_id + 1 + next(2), next(3)),
                        2 => Position::new(at.ledger_id, at.entry_id + 2 + next(3)),
                        _ => Position::new(at.ledger_id, at.entry_id + 1),
                    };
                    given.entry(cluster).or_default().push(position);
                    (Some((cluster, position)), false)
                }
            };
            // A list naming only the origin reaches none of b, e.
            let only_origin = [origin.map_or("a", |(cluster, _)| cluster)];
            let replicate_to = if next(15) == 0 {
                &only_origin[..]
            } else {
                replicate_to
            };
            let metadata = metadata_of(origin, marker, replicate_to);
            let data = meridian_wire::encode_entry(&metadata, b"x").expect("encode");
            let append = log.append(data, 1).expect("append");
            let position = append.wait().expect("durable");
            if let Some((cluster, at)) = origin {
                written.record(WrittenEntry {
                    position,
                    rollbacks: 0,
                    cluster: cluster.to_string(),
                    origin: at,
                    replicate_to: metadata.replicate_to.clone(),
                });
            }
            last = Some(position);
        }
        let last = last.expect("appended");
        // Taken durable in two steps: a run split at the durable position.
        let early =
            written.take_durable((Some(Position::new(last.ledger_id, last.entry_id / 2)), 0));
        kept.learn_written(&log, &early);
        let rest = written.take_durable((Some(last), 0));
        kept.learn_written(&log, &rest);
        let positions: Vec<Position> = log
            .read_from(Position::new(0, 0), 1_000_000, usize::MAX)
            .expect("read")
            .iter()
            .map(|entry| entry.position)
            .collect();
        if round % 5 == 4 {
            // Both cursors past most of the log, ending inside a span: the ledgers before go,
            // and the kept map still describes them.
            let through = &positions[..positions.len() * 3 / 4];
            log.acknowledge("hold", through).expect("ack");
            log.acknowledge("sub", through).expect("ack");
            log.persist_cursors().expect("persist");
            log.trim().expect("trim");
            trimmed += usize::from(
                log.read_from(Position::new(0, 0), 1, usize::MAX)
                    .expect("read")[0]
                    .position
                    > positions[0],
            );
        }
        let positions: Vec<Position> = log
            .read_from(Position::new(0, 0), 1_000_000, usize::MAX)
            .expect("read")
            .iter()
            .map(|entry| entry.position)
            .collect();
        let count = positions.len() as u64;
        for _ in 0..20 {
            for _ in 0..next(4) {
                let at = next(count) as usize;
                let until = (at + 1 + next(8) as usize).min(positions.len());
                let _ = log.acknowledge("sub", &positions[at..until]);
            }
            let mut received = Vec::new();
            for sender in ["b", "c", "e"] {
                if next(4) == 0 {
                    continue;
                }
                let mut origins = BTreeMap::new();
                let own_next = log.last_position().expect("entries");
                for (cluster, base) in [
                    (
                        "a",
                        Position::new(own_next.ledger_id, own_next.entry_id + 1),
                    ),
                    ("c", origin_next["c"]),
                    ("d", origin_next["d"]),
                    ("f", origin_next["f"]),
                ] {
                    if next(5) == 0 {
                        continue;
                    }
                    let known = given.get(cluster).map(Vec::as_slice).unwrap_or(&[]);
                    let pick = |next: &mut dyn FnMut(u64) -> u64| match known.len() {
                        length if length > 0 && next(2) == 0 => known[next(length as u64) as usize],
                        _ => near(next, base),
                    };
                    let mut marks: Vec<Position> =
                        (0..2 * next(8)).map(|_| pick(&mut next)).collect();
                    marks.sort();
                    marks.dedup();
                    let ranges: Vec<(Position, Position)> = marks
                        .chunks_exact(2)
                        .map(|pair| (pair[0], pair[1]))
                        .collect();
                    let below = pick(&mut next);
                    let stored_from = match next(5) {
                        0 => None,
                        1 => Some(pick(&mut next)),
                        2 => Some(Position::new(0, 0)),
                        _ => Some(Position::new(below.ledger_id, next(below.entry_id + 1))),
                    };
                    let batches: Vec<(Position, Vec<u64>)> = (0..next(4))
                        .map(|_| pick(&mut next))
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .map(|position| (position, vec![next(255) + 1, next(3)]))
                        .collect();
                    origins.insert(
                        cluster.to_string(),
                        OriginProgress {
                            acked_below: (next(4) != 0).then_some(below),
                            stored_from,
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
            let (whole, in_part) = per_entry(&log, start, &received);
            for (which, map) in [("kept", &mut kept), ("fresh", &mut OriginMap::default())] {
                let covered = covered_by(&log, map, &state.acknowledged, start, &received, "a")
                    .expect("covered");
                assert_eq!(
                    positions_in(&covered.whole),
                    whole,
                    "round {round}, {which} map: whole, states {received:?}"
                );
                assert_eq!(
                    covered.in_part, in_part,
                    "round {round}, {which} map: in part"
                );
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
    assert!(checked.1 > 300 && checked.2 > 5, "{checked:?}");
    assert!(trimmed > 0, "no ledger was deleted");
}

/// Notes taken entry by entry, as `Written` kept them before runs: at most `MAX_WRITTEN`,
/// those of an older rollback count dropped, the ones at or before the durable position taken.
#[derive(Default)]
struct EntryByEntry {
    entries: Vec<WrittenEntry>,
}

impl EntryByEntry {
    fn take_durable(&mut self, (durable, rollbacks): (Option<Position>, u64)) -> Vec<WrittenEntry> {
        let Some(durable) = durable else {
            return Vec::new();
        };
        self.entries.retain(|entry| entry.rollbacks == rollbacks);
        let count = self
            .entries
            .partition_point(|entry| entry.position <= durable);
        self.entries.drain(..count).collect()
    }
}

fn entries_of(runs: &[WrittenRun]) -> Vec<WrittenEntry> {
    runs.iter()
        .flat_map(|run| {
            (0..run.count).map(move |offset| WrittenEntry {
                position: Position::new(
                    run.first.position.ledger_id,
                    run.first.position.entry_id + offset,
                ),
                origin: Position::new(
                    run.first.origin.ledger_id,
                    run.first.origin.entry_id + offset,
                ),
                ..run.first.clone()
            })
        })
        .collect()
}

/// Appends noted in runs, origins that skip or roll, replication lists that change, rollbacks
/// (positions given again under a higher count, as after a failed append), ledger rolls here,
/// durable positions inside runs, in gaps and before everything: the runs taken, entry by
/// entry, are exactly the entries the old per-entry `Written` gave.
#[test]
fn written_runs_give_exactly_what_entry_by_entry_notes_gave() {
    let mut next = generator(0x0123_4567_89ab_cdef);
    for round in 0..200 {
        let mut runs = Written::default();
        let mut entries = EntryByEntry::default();
        let mut here = Position::new(3, 0);
        let mut durable = Position::new(2, 0);
        let mut rollbacks = 0;
        let mut origin = Position::new(7, 0);
        for step in 0..200 {
            match next(20) {
                0 => {
                    // An append failed: everything after the durable position is given again.
                    rollbacks += 1;
                    here = Position::new(durable.ledger_id.max(3), durable.entry_id + 1);
                }
                1 => here = Position::new(here.ledger_id + 1, 0),
                2..=4 => {
                    // The durable position only grows: inside a run, in a gap, or where it was.
                    let ahead = next(6);
                    durable = durable.max(Position::new(
                        here.ledger_id,
                        here.entry_id.saturating_sub(ahead),
                    ));
                    let taken = entries_of(&runs.take_durable((Some(durable), rollbacks)));
                    let expected = entries.take_durable((Some(durable), rollbacks));
                    assert_eq!(taken, expected, "round {round}, step {step}");
                }
                _ => {
                    origin = match next(10) {
                        0 => Position::new(origin.ledger_id + 1, 0),
                        1 => Position::new(origin.ledger_id, origin.entry_id + 2),
                        _ => Position::new(origin.ledger_id, origin.entry_id + 1),
                    };
                    let entry = WrittenEntry {
                        position: here,
                        rollbacks,
                        cluster: if next(8) == 0 { "d" } else { "c" }.to_string(),
                        origin,
                        replicate_to: if next(8) == 0 {
                            vec!["b".to_string()]
                        } else {
                            Vec::new()
                        },
                    };
                    // Now and then an entry of this cluster's own lies between (not noted).
                    if next(6) != 0 {
                        runs.record(entry.clone());
                        entries.entries.push(entry);
                    }
                    here = Position::new(here.ledger_id, here.entry_id + 1);
                }
            }
        }
    }
}

/// The receiver keeps a state as the text it came in (decoded as a `SyncedAcks` first) and
/// reads its `seq` from the text's end: for every text that decodes, in any layout another
/// broker may write (field order, spaces, escaped key names, a newline after it, `seq`
/// first, last or absent), the `seq` read is the one decoded.
#[test]
fn the_seq_read_from_a_stored_state_is_the_decoded_one_in_every_layout() {
    let acks =
        r#"{"origins":{"c":{"ackedBelow":"3:7","ranges":[["3:9","3:12"]],"storedFrom":"3:0"}}}"#;
    let texts = [
        format!(r#"{{"cluster":"b","acks":{acks},"seq":12}}"#),
        format!(r#"{{"cluster":"b","acks":{acks},"resetAt":5,"seq":0}}"#),
        format!(r#"{{"seq":12,"cluster":"b","acks":{acks}}}"#),
        format!(r#"{{"cluster":"b","seq":12,"acks":{acks},"resetAt":9}}"#),
        format!(r#"{{"cluster":"b","acks":{acks},"s\u0065q":12}}"#),
        format!(r#"{{"cluster":"b","acks":{acks},"seq": 12 }}"#),
        format!("{{\"cluster\":\"b\",\"acks\":{acks},\"seq\":12}}\n"),
        format!(r#"{{"cluster":"b\",\"seq\":99","acks":{acks},"seq":12}}"#),
        format!(r#"{{"cluster":"b","acks":{acks},"resetAt":4}}"#),
        format!(r#"{{"cluster":"b","acks":{acks},"seq":null}}"#),
        format!(r#"{{"cluster":"b","acks":{acks},"seq":18446744073709551615}}"#),
    ];
    let mut decoded_some = 0;
    for text in &texts {
        let decoded: SyncedAcks = serde_json::from_str(text).expect(text);
        assert_eq!(stored_seq(text), decoded.seq, "{text}");
        decoded_some += usize::from(decoded.seq.is_some());
    }
    assert_eq!(decoded_some, 9);
    // Texts that do not decode are never stored (`receive_from_cluster` refuses them first);
    // a duplicated `seq` is one of them.
    let twice = format!(r#"{{"cluster":"b","acks":{acks},"seq":1,"seq":9}}"#);
    assert!(serde_json::from_str::<SyncedAcks>(&twice).is_err());
}

// Review 11: a receiver that walks again only after its own changes, and sends nothing once
// every target settled on an unchanged state (`only_mirrored_since_walked`, `Tracked::settled`).

use std::sync::Arc;

use super::replicated_subscriptions::only_repeats;
use super::subscription_sync::receive;
use super::subscription_sync::review_hooks::{relaxed_storage, remote, test_topic, Ticks};
use crate::topic::Topic;

/// `cluster`'s state for subscription `sub`: this cluster's entries below `below` acknowledged
/// (stored there from `first`).
fn state_from(cluster: &str, (first, below): (Position, Position), seq: u64) -> SyncedAcks {
    let progress = OriginProgress {
        acked_below: Some(below),
        stored_from: Some(first),
        ..Default::default()
    };
    SyncedAcks {
        cluster: cluster.to_string(),
        acks: OriginAcks {
            origins: BTreeMap::from([("standalone".to_string(), progress)]),
        },
        reset_at: None,
        seq: Some(seq),
    }
}

fn deliver(topic: &Arc<Topic>, state: &SyncedAcks) {
    let raw = serde_json::to_string(state).expect("encoded");
    receive(topic, "sub", (state.clone(), raw), "standalone").expect("received");
}

/// Ten entries stored here, on a test broker's topic `name`.
fn append_ten(topic: &Topic) -> Vec<Position> {
    super::subscription_sync::review_hooks::append_own(topic, 10, || {
        meridian_wire::encode_entry(&metadata_of(None, false, &[]), b"x").expect("encode")
    })
}

/// b's acknowledgements go back without a reset (its subscription deleted and created again,
/// or b rebuilt from an empty data directory and this cluster's entries sent to it again):
/// b's new state no longer holds what its consumers acknowledged before, which this cluster
/// mirrored. This cluster must tell b again (as it did before receivers skipped walks: its
/// state no longer only repeats b's), or b's consumers get those messages a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_whose_acknowledgements_went_back_is_told_them_again() {
    let (_directory, _broker, topic) = test_topic("went-back").await;
    tokio::task::block_in_place(|| {
        let positions = append_ten(&topic);
        let remotes = [remote("b")];
        let mut ticks = Ticks::default();
        // b's consumers acknowledged nothing yet: the subscription comes with b's first state.
        deliver(&topic, &state_from("b", (positions[0], positions[0]), 1));
        ticks.tick(&topic, &remotes, "sub");
        // Then the first six, mirrored here: an echo of b's, nothing goes out.
        let six = state_from("b", (positions[0], positions[6]), 2);
        deliver(&topic, &six);
        assert_eq!(
            topic.log().cursor("sub").expect("cursor").mark_delete,
            Some(positions[5])
        );
        let (body, _) = ticks.tick(&topic, &remotes, "sub");
        assert!(body.is_none_or(|body| only_repeats(&body, &six)));
        assert_eq!(ticks.tick(&topic, &remotes, "sub").0, None, "settled");

        // b starts over: its next state acknowledges nothing.
        let empty = state_from("b", (positions[0], positions[0]), 3);
        deliver(&topic, &empty);
        let body = (0..3)
            .find_map(|_| ticks.tick(&topic, &remotes, "sub").0)
            .expect("a state for b, which no longer holds the first six");
        assert!(!only_repeats(&body, &empty), "not sent: {body:?}");
        assert!(
            only_repeats(&six, &body),
            "the first six are not in the state: {body:?}"
        );
    });
}

/// A remote added after every target settled on an unchanged state gets it: settling holds
/// for the targets it was made with only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_added_after_the_state_settled_gets_it() {
    let (_directory, _broker, topic) = test_topic("added").await;
    tokio::task::block_in_place(|| {
        let positions = append_ten(&topic);
        let mut ticks = Ticks::default();
        let six = state_from("b", (positions[0], positions[6]), 1);
        deliver(&topic, &six);
        // A consumer here acknowledged the ninth; b confirmed the state that says so.
        topic
            .log()
            .acknowledge("sub", &[positions[8]])
            .expect("acknowledged");
        let (body, _) = ticks.tick(&topic, &[remote("b")], "sub");
        let body = body.expect("the own acknowledgement goes to b");
        ticks.confirm("sub", "b", body.clone(), Duration::ZERO);
        // The next tick finds it confirmed (settles), the one after has nothing to look at.
        ticks.tick(&topic, &[remote("b")], "sub");
        assert_eq!(ticks.tick(&topic, &[remote("b")], "sub").0, None);
        // b sends more, mirrored here; then c joins.
        deliver(&topic, &state_from("b", (positions[0], positions[7]), 2));
        assert_eq!(ticks.tick(&topic, &[remote("b")], "sub").0, None);
        let (body, targets) = ticks.tick(&topic, &[remote("b"), remote("c")], "sub");
        assert_eq!(targets, ["b", "c"]);
        let body = body.expect("c has not got the state");
        assert!(
            only_repeats(&six, &body),
            "c would not learn b's acknowledgements: {body:?}"
        );
    });
}

/// Entries of a third cluster x (registered here, replicating here one way) arrive after the
/// receiver's last walk, and b's consumers acknowledge them: the state now speaks of x's
/// entries, so x is one of its targets (what b acknowledged reaches x through this cluster,
/// as before receivers skipped walks), though nothing changed here but what b's state made
/// this cluster acknowledge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_clusters_entries_acknowledged_by_the_sender_make_it_a_target() {
    let (_directory, _broker, topic) = test_topic("third").await;
    tokio::task::block_in_place(|| {
        topic
            .set_replication(crate::topic::ReplicationPlan {
                configured: Vec::new(),
                remotes: Vec::new(),
                partitions: None,
                rate: None,
                start_at_earliest: false,
                earliest_remotes: Vec::new(),
                registered: vec![remote("b"), remote("x")],
            })
            .expect("registered clusters");
        let positions = append_ten(&topic);
        let remotes = [remote("b")];
        let mut ticks = Ticks::default();
        deliver(&topic, &state_from("b", (positions[0], positions[0]), 1));
        let (_, targets) = ticks.tick(&topic, &remotes, "sub");
        assert_eq!(targets, ["b"]);
        // x's first five entries arrive; b's consumers acknowledge them and all of this
        // cluster's.
        let from_x: Vec<Position> = (0..5)
            .map(|index| {
                let metadata = metadata_of(Some(("x", Position::new(7, index))), false, &[]);
                let data = meridian_wire::encode_entry(&metadata, b"x").expect("encode");
                let append = topic.log().append(data, 1).expect("append");
                append.wait().expect("durable")
            })
            .collect();
        let mut all = state_from("b", (positions[0], Position::new(u64::MAX, 0)), 2);
        all.acks.origins.insert(
            "x".to_string(),
            OriginProgress {
                acked_below: Some(Position::new(7, 5)),
                stored_from: Some(Position::new(7, 0)),
                ..Default::default()
            },
        );
        deliver(&topic, &all);
        assert_eq!(
            topic.log().cursor("sub").expect("cursor").mark_delete,
            from_x.last().copied(),
            "b's state covers x's entries here"
        );
        let (body, targets) = ticks.tick(&topic, &remotes, "sub");
        assert_eq!(targets, ["b", "x"], "state: {body:?}");
        let body = body.expect("a state for x");
        assert!(body.acks.origins.contains_key("x"), "{body:?}");
    });
}

/// A confirmation 30 s old no longer settles the state, also while the receiver skips its
/// walks (only b's states change here): the state goes to b again (the resend that gives a
/// cluster that lost it its state back), with this cluster's own acknowledgement in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_confirmed_30_s_ago_is_sent_again_while_walks_are_skipped() {
    let (_directory, _broker, topic) = test_topic("resend").await;
    tokio::task::block_in_place(|| {
        let positions = append_ten(&topic);
        let remotes = [remote("b")];
        let mut ticks = Ticks::default();
        deliver(&topic, &state_from("b", (positions[0], positions[3]), 1));
        topic
            .log()
            .acknowledge("sub", &[positions[8]])
            .expect("acknowledged");
        let (body, _) = ticks.tick(&topic, &remotes, "sub");
        let body = body.expect("the own acknowledgement goes to b");
        // Confirmed 29 s ago: settled for about a second more.
        ticks.confirm("sub", "b", body.clone(), Duration::from_secs(29));
        ticks.tick(&topic, &remotes, "sub");
        assert_eq!(ticks.tick(&topic, &remotes, "sub").0, None, "settled");
        // b's consumers go on (mirrored here, no walk) until the confirmation is 30 s old.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut seq = 2;
        let again = loop {
            // Growing, then the same (never going back: that alone would make it walk).
            let below = (3 + seq as usize).min(7);
            deliver(
                &topic,
                &state_from("b", (positions[0], positions[below]), seq),
            );
            seq += 1;
            if let (Some(again), _) = ticks.tick(&topic, &remotes, "sub") {
                break again;
            }
            assert!(std::time::Instant::now() < deadline, "never sent again");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(only_repeats(&body, &again), "{again:?}");
    });
}

/// As [`a_sender_whose_acknowledgements_went_back_is_told_them_again`], with the receiver's
/// walk after b's acknowledgements were mirrored here: the walk that b's going back causes
/// finds the cursor as the last one saw it, and the state is still an echo of b's older state
/// only, no longer of what b holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_whose_acknowledgements_went_back_after_the_walk_is_told_them_again() {
    let (_directory, _broker, topic) = test_topic("went-back-walked").await;
    tokio::task::block_in_place(|| {
        let positions = append_ten(&topic);
        let remotes = [remote("b")];
        let mut ticks = Ticks::default();
        let six = state_from("b", (positions[0], positions[6]), 1);
        deliver(&topic, &six);
        let (body, _) = ticks.tick(&topic, &remotes, "sub");
        let body = body.expect("the first tick walks");
        assert!(only_repeats(&body, &six), "an echo: {body:?}");
        assert_eq!(ticks.tick(&topic, &remotes, "sub").0, None, "settled");

        let empty = state_from("b", (positions[0], positions[0]), 2);
        deliver(&topic, &empty);
        let body = (0..3)
            .find_map(|_| ticks.tick(&topic, &remotes, "sub").0)
            .expect("a state for b, which no longer holds the first six");
        assert!(!only_repeats(&body, &empty), "not sent: {body:?}");
        assert!(only_repeats(&six, &body), "{body:?}");
    });
}
