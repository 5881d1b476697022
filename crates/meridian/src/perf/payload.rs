//! Message payloads: a 16-byte header stamped at send time, then filler.
//!
//! Header layout (little-endian): bytes 0..8 the run's id, bytes 8..16 the send time in
//! nanoseconds since the run's start `Instant`. A consumer in the same process subtracts the
//! send time from its own clock reading against the same `Instant`: end-to-end latency with
//! a monotonic clock and nanosecond resolution, free of wall-clock steps. The run id tells
//! this run's messages from a backlog left by an earlier run (whose send times are against
//! another `Instant` and mean nothing here).
//!
//! The filler is random upper-case letters, as pulsar-perf uses: about 4.7 bits of entropy
//! per byte, so compression codecs have realistic work to do, neither incompressible noise nor
//! zeros that shrink to nothing.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Bytes of the header; payloads shorter than this carry no send time.
pub const HEADER_BYTES: usize = 16;

/// A random 64-bit number from the standard library's per-process hash keys.
pub fn random_u64() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0x6d65_7269_6469_616e);
    hasher.finish()
}

/// The payload every message starts from.
#[derive(Clone)]
pub struct PayloadTemplate {
    run_id: u64,
    filler: Vec<u8>,
}

impl PayloadTemplate {
    /// A template of `size` bytes for the run `run_id`, filled from `seed`.
    pub fn new(size: usize, run_id: u64, seed: u64) -> PayloadTemplate {
        // xorshift64*: plenty for filler, and keeps the bytes reproducible per seed.
        let mut state = seed | 1;
        let filler = (0..size)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let random = state.wrapping_mul(0x2545_f491_4f6c_dd1d);
                b'A' + ((random >> 32) % 26) as u8
            })
            .collect();
        PayloadTemplate { run_id, filler }
    }

    /// A payload stamped with `sent_ns` (when it is long enough to hold the header).
    pub fn stamp(&self, sent_ns: u64) -> Vec<u8> {
        let mut payload = self.filler.clone();
        if let Some(header) = payload.get_mut(..HEADER_BYTES) {
            header[..8].copy_from_slice(&self.run_id.to_le_bytes());
            header[8..].copy_from_slice(&sent_ns.to_le_bytes());
        }
        payload
    }
}

/// The send time of a payload stamped by the run `run_id`, or `None` for a payload of
/// another run (or another writer) or one too short to hold a header.
pub fn sent_ns(payload: &[u8], run_id: u64) -> Option<u64> {
    let header = payload.get(..HEADER_BYTES)?;
    let (id, sent) = header.split_at(8);
    if u64::from_le_bytes(id.try_into().ok()?) != run_id {
        return None;
    }
    Some(u64::from_le_bytes(sent.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_round_trips() {
        let template = PayloadTemplate::new(100, 42, 7);
        let payload = template.stamp(123_456_789);
        assert_eq!(payload.len(), 100);
        assert_eq!(sent_ns(&payload, 42), Some(123_456_789));
        assert_eq!(sent_ns(&payload, 43), None, "another run's message");
    }

    #[test]
    fn short_and_foreign_payloads_carry_no_time() {
        assert_eq!(sent_ns(b"hello", 42), None);
        let short = PayloadTemplate::new(10, 42, 7).stamp(5);
        assert_eq!(short.len(), 10);
        assert_eq!(sent_ns(&short, 42), None);
        assert_eq!(PayloadTemplate::new(0, 42, 7).stamp(5), Vec::<u8>::new());
    }

    #[test]
    fn the_filler_is_letters_and_varies() {
        let payload = PayloadTemplate::new(4096, 1, 99).stamp(0);
        let filler = &payload[HEADER_BYTES..];
        assert!(filler.iter().all(u8::is_ascii_uppercase));
        let distinct = (b'A'..=b'Z')
            .filter(|letter| filler.contains(letter))
            .count();
        assert_eq!(distinct, 26);
    }
}
