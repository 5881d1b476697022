//! What encoding and decoding one replicated-subscription state costs, in each form: the JSON
//! text (HTTP, and the binary command to a broker that takes nothing else), the compact
//! protobuf form of the binary command, and the text a receiver stores for a compact state.
//!
//! ```text
//! cargo run --release -p meridian-broker --example state_encoding -- [ranges] [rounds] [only]
//! ```
//!
//! The state has one origin whose acknowledgements beyond the bound are `ranges` ranges of
//! nine entries with one left out between them (one message in ten held back, as in
//! `scripts/bench/replicated_subscriptions.py`). Prints the bytes of each form and the time
//! per state (the best of five runs of `rounds`). `only` (`json-encode`, `json-decode`,
//! `compact-encode`, `compact-decode`, `stored-decode`) runs that one alone, `rounds` times,
//! for an instruction count under `valgrind --tool=callgrind` (divide by `rounds`).

use std::hint::black_box;
use std::time::Instant;

use meridian_broker::replication::origin_acks::{OriginAcks, OriginProgress};
use meridian_broker::replication::state_format;
use meridian_broker::replication::subscription_sync::SyncedAcks;
use meridian_storage::Position;

/// A named operation on one state.
type Part<'a> = (&'static str, Box<dyn Fn() + 'a>);

fn state(ranges: u64) -> SyncedAcks {
    let ledger = 1_234;
    let first = 48_000;
    let mut acks = OriginAcks::default();
    acks.origins.insert(
        "east".to_string(),
        OriginProgress {
            acked_below: Some(Position::new(ledger, first)),
            ranges: (0..ranges)
                .map(|index| {
                    let start = first + 1 + index * 10;
                    (
                        Position::new(ledger, start),
                        Position::new(ledger, start + 8),
                    )
                })
                .collect(),
            stored_from: Some(Position::new(1_200, 0)),
            batches: Vec::new(),
        },
    );
    SyncedAcks {
        cluster: "east".to_string(),
        acks,
        reset_at: None,
        seq: Some(1_764_650_000_000),
    }
}

/// Nanoseconds per call of `f`, the best of five runs of `rounds` calls.
fn time(rounds: u32, mut f: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..rounds {
                f();
            }
            started.elapsed().as_nanos() as f64 / f64::from(rounds)
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let ranges: u64 = arguments.first().map_or(Ok(10), |text| text.parse())?;
    let rounds: u32 = arguments.get(1).map_or(Ok(2_000), |text| text.parse())?;
    let state = state(ranges);
    let json = serde_json::to_string(&state)?;
    let compact = state_format::encode_compact(&state);
    let (decoded, stored) =
        state_format::decode_compact(&compact).map_err(|error| format!("decoding: {error}"))?;
    assert_eq!(decoded, state);
    assert_eq!(serde_json::from_str::<SyncedAcks>(&stored)?, state);
    let parts: [Part; 5] = [
        (
            "json-encode",
            Box::new(|| {
                black_box(serde_json::to_string(black_box(&state)).unwrap_or_default());
            }),
        ),
        (
            "json-decode",
            Box::new(|| {
                black_box(serde_json::from_str::<SyncedAcks>(black_box(&json)).ok());
            }),
        ),
        (
            "compact-encode",
            Box::new(|| {
                black_box(state_format::encode_compact(black_box(&state)));
            }),
        ),
        (
            "compact-decode",
            Box::new(|| {
                black_box(state_format::decode_compact(black_box(&compact)).ok());
            }),
        ),
        (
            "stored-decode",
            Box::new(|| {
                black_box(serde_json::from_str::<SyncedAcks>(black_box(&stored)).ok());
            }),
        ),
    ];
    if let Some(only) = arguments.get(2) {
        let (_, f) = parts
            .iter()
            .find(|(name, _)| name == only)
            .ok_or_else(|| format!("no part named {only}"))?;
        for _ in 0..rounds {
            f();
        }
        return Ok(());
    }
    println!(
        "{ranges} ranges: JSON {} bytes, compact {} bytes, stored (compact) {} bytes",
        json.len(),
        compact.len(),
        stored.len()
    );
    for (name, f) in &parts {
        println!("  {name}: {:.0} ns per state", time(rounds, f));
    }
    Ok(())
}
