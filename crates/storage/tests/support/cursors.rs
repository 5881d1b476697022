//! For the cursor tests: logs of small numbered entries.

use std::sync::Arc;

use bytes::Bytes;
use meridian_storage::{Log, Position};

/// Appends `count` entries of 200 bytes (entry `i` filled with byte `i`, published at `i`) and
/// waits until all are durable.
pub fn append(log: &Arc<Log>, count: u64) -> Vec<Position> {
    let pending: Vec<_> = (0..count)
        .map(|index| {
            log.append(Bytes::from(vec![index as u8; 200]), index)
                .expect("append")
        })
        .collect();
    pending
        .into_iter()
        .map(|append| append.wait().expect("durable"))
        .collect()
}
