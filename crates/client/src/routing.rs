//! Choosing the partition of a message on a partitioned topic, as Pulsar's
//! Java client does by default: a message with a key goes to
//! `murmur3_32(key) & i32::MAX` modulo the partition count, so every client
//! sends a key to the same partition; a message without a key goes round
//! robin.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Picks partitions for one producer.
#[derive(Debug)]
pub(crate) struct Router {
    partitions: usize,
    next: AtomicUsize,
}

impl Router {
    /// A router over `partitions` (at least one) partitions, starting the
    /// round robin at `start` so that producers do not all begin on partition 0.
    pub(crate) fn new(partitions: usize, start: usize) -> Router {
        Router {
            partitions: partitions.max(1),
            next: AtomicUsize::new(start),
        }
    }

    /// The partition for a message with this key (or none).
    pub(crate) fn choose(&self, key: Option<&str>) -> usize {
        match key {
            Some(key) => key_partition(key, self.partitions),
            None => self.next.fetch_add(1, Ordering::Relaxed) % self.partitions,
        }
    }
}

/// Java's `Murmur3_32Hash.makeHash`: MurmurHash3 x86 32-bit with seed 0 over
/// the UTF-8 bytes, sign bit cleared.
pub fn key_hash(key: &str) -> u32 {
    // Reading from a byte slice cannot fail; 0 is unreachable.
    murmur3::murmur3_32(&mut key.as_bytes(), 0).unwrap_or(0) & (i32::MAX as u32)
}

/// The partition of `key` among `partitions`.
pub fn key_partition(key: &str, partitions: usize) -> usize {
    key_hash(key) as usize % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_murmur3_x86_32_with_the_sign_bit_cleared() {
        // Published MurmurHash3_x86_32 vectors (seed 0).
        assert_eq!(key_hash(""), 0);
        assert_eq!(key_hash("hello"), 0x248b_fa47);
        assert_eq!(
            key_hash("The quick brown fox jumps over the lazy dog"),
            0x2e4f_f723
        );
        // A value with the top bit set loses it, as Java's `& Integer.MAX_VALUE` does.
        let raw = murmur3::murmur3_32(&mut &b"aaaa"[..], 0).expect("hash");
        assert_eq!(key_hash("aaaa"), raw & 0x7fff_ffff);
    }

    #[test]
    fn keys_always_go_to_the_same_partition() {
        let router = Router::new(3, 0);
        for key in ["a", "b", "customer-17", "κλειδί"] {
            let first = router.choose(Some(key));
            assert!(first < 3);
            for _ in 0..10 {
                assert_eq!(router.choose(Some(key)), first);
            }
        }
    }

    #[test]
    fn keyless_messages_go_round_robin() {
        let router = Router::new(3, 2);
        let chosen: Vec<usize> = (0..6).map(|_| router.choose(None)).collect();
        assert_eq!(chosen, vec![2, 0, 1, 2, 0, 1]);
    }

    #[test]
    fn keys_spread_over_partitions() {
        let mut counts = [0usize; 4];
        for index in 0..4000 {
            counts[key_partition(&format!("key-{index}"), 4)] += 1;
        }
        assert!(counts.iter().all(|count| *count > 800), "{counts:?}");
    }
}
