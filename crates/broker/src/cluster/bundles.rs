//! Namespace bundles: which hash range of its namespace a topic falls in.
//!
//! As in Pulsar, a namespace's hash space `[0x00000000, 0xffffffff]` is cut into equal ranges
//! (`defaultNumberOfNamespaceBundles`, 4 by default), named `0x00000000_0x40000000`, and a
//! topic belongs to the range holding the CRC-32 (IEEE, the zlib/Guava `crc32` one) of its full
//! name, `persistent://tenant/ns/local` (each partition by its own name). A range holds its
//! lower bound and not its upper one, except the last range, which also holds `0xffffffff`.

use crate::topic_name::TopicName;

/// Largest bundle count accepted for a namespace (Pulsar's limit is 2^32; this bounds the
/// work of naming bundles).
pub const MAX_BUNDLES: u32 = 1 << 16;

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), bit by bit: topic names are short
/// and a lookup hashes one.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// The bundle of `topic` among `count` equal bundles of its namespace:
/// `tenant/namespace/0xLLLLLLLL_0xUUUUUUUU`, the key path its ownership lives under in etcd.
pub fn bundle_of(topic: &TopicName, count: u32) -> String {
    let (lower, upper) = range_of(crc32(topic.to_string().as_bytes()), count);
    format!(
        "{}/{}/0x{lower:08x}_0x{upper:08x}",
        topic.tenant, topic.namespace
    )
}

/// The range `(lower, upper)` of `count` equal ranges that holds `hash`.
pub fn range_of(hash: u32, count: u32) -> (u32, u32) {
    let count = u64::from(count.clamp(1, MAX_BUNDLES));
    let size = (1u64 << 32) / count;
    let index = (u64::from(hash) / size).min(count - 1);
    let lower = index * size;
    let upper = if index == count - 1 {
        u64::from(u32::MAX)
    } else {
        lower + size
    };
    (lower as u32, upper as u32)
}

/// The boundaries of `count` equal bundles: `0`, each range's upper bound, `0xffffffff` last.
pub fn default_boundaries(count: u32) -> Vec<u32> {
    let count = count.clamp(1, MAX_BUNDLES);
    let size = (1u64 << 32) / u64::from(count);
    let mut boundaries: Vec<u32> = (0..u64::from(count))
        .map(|index| (index * size) as u32)
        .collect();
    boundaries.push(u32::MAX);
    boundaries
}

/// Whether `boundaries` cut the whole hash space: `0` first, `0xffffffff` last, increasing,
/// at most [`MAX_BUNDLES`] ranges.
pub fn valid_boundaries(boundaries: &[u32]) -> bool {
    boundaries.len() >= 2
        && boundaries.len() <= MAX_BUNDLES as usize + 1
        && boundaries.first() == Some(&0)
        && boundaries.last() == Some(&u32::MAX)
        && boundaries.windows(2).all(|pair| pair[0] < pair[1])
}

/// The names of the bundles `boundaries` cut a namespace into, in hash order:
/// `tenant/namespace/0xLLLLLLLL_0xUUUUUUUU`.
pub fn bundle_names(tenant: &str, namespace: &str, boundaries: &[u32]) -> Vec<String> {
    boundaries
        .windows(2)
        .map(|pair| bundle_name(tenant, namespace, pair[0], pair[1]))
        .collect()
}

pub fn bundle_name(tenant: &str, namespace: &str, lower: u32, upper: u32) -> String {
    format!("{tenant}/{namespace}/0x{lower:08x}_0x{upper:08x}")
}

/// The bundle of `topic` among the ranges `boundaries` cut its namespace into (valid ones,
/// see [`valid_boundaries`]).
pub fn bundle_in(topic: &TopicName, boundaries: &[u32]) -> String {
    let hash = crc32(topic.to_string().as_bytes());
    let index = boundaries
        .windows(2)
        .position(|pair| range_holds_hash(hash, (pair[0], pair[1])))
        .unwrap_or(0);
    let (lower, upper) = (boundaries[index], boundaries[index + 1]);
    bundle_name(&topic.tenant, &topic.namespace, lower, upper)
}

/// Whether bundle `bundle` (`tenant/namespace/range`) holds `topic`.
pub fn bundle_holds(bundle: &str, topic: &TopicName) -> bool {
    let prefix = format!("{}/{}/", topic.tenant, topic.namespace);
    bundle
        .strip_prefix(&prefix)
        .and_then(parse_range)
        .is_some_and(|range| range_holds(topic, range))
}

/// The bounds of a bundle range named as Pulsar names it (`0x00000000_0x40000000`); `None`
/// when the name is not of that form or the lower bound is not below the upper one.
pub fn parse_range(range: &str) -> Option<(u32, u32)> {
    let (lower, upper) = range.split_once('_')?;
    let parse = |bound: &str| {
        let digits = bound.strip_prefix("0x")?;
        if digits.len() != 8 {
            return None;
        }
        u32::from_str_radix(digits, 16).ok()
    };
    let (lower, upper) = (parse(lower)?, parse(upper)?);
    (lower < upper).then_some((lower, upper))
}

/// Whether `topic` hashes into the range `(lower, upper)` (the upper bound included only when
/// it is `0xffffffff`, the last range's).
pub fn range_holds(topic: &TopicName, (lower, upper): (u32, u32)) -> bool {
    range_holds_hash(crc32(topic.to_string().as_bytes()), (lower, upper))
}

fn range_holds_hash(hash: u32, (lower, upper): (u32, u32)) -> bool {
    hash >= lower && (hash < upper || upper == u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn four_bundles_have_pulsars_boundaries() {
        assert_eq!(range_of(0, 4), (0, 0x4000_0000));
        assert_eq!(range_of(0x3fff_ffff, 4), (0, 0x4000_0000));
        assert_eq!(range_of(0x4000_0000, 4), (0x4000_0000, 0x8000_0000));
        assert_eq!(range_of(0xc000_0000, 4), (0xc000_0000, 0xffff_ffff));
        assert_eq!(range_of(u32::MAX, 4), (0xc000_0000, 0xffff_ffff));
        assert_eq!(range_of(u32::MAX, 3).1, u32::MAX);
        assert_eq!(range_of(12345, 1), (0, u32::MAX));
    }

    #[test]
    fn a_topic_maps_to_the_range_of_its_full_names_hash() {
        let topic = TopicName::parse("persistent://public/default/orders").expect("valid name");
        let hash = crc32(b"persistent://public/default/orders");
        let (lower, upper) = range_of(hash, 4);
        assert_eq!(
            bundle_of(&topic, 4),
            format!("public/default/0x{lower:08x}_0x{upper:08x}")
        );
        // Partitions are topics of their own and spread over the bundles.
        let bundles: std::collections::BTreeSet<String> = (0..16)
            .map(|index| bundle_of(&topic.partition(index), 4))
            .collect();
        assert!(bundles.len() > 1, "{bundles:?}");
    }

    #[test]
    fn a_namespaces_bundles_cover_the_hash_space_and_parse_back() {
        let names = bundle_names("public", "default", &default_boundaries(4));
        assert_eq!(
            names,
            [
                "public/default/0x00000000_0x40000000",
                "public/default/0x40000000_0x80000000",
                "public/default/0x80000000_0xc0000000",
                "public/default/0xc0000000_0xffffffff",
            ]
        );
        assert_eq!(
            parse_range("0x40000000_0x80000000"),
            Some((0x4000_0000, 0x8000_0000))
        );
        for bad in [
            "",
            "0x4_0x8",
            "0x80000000_0x40000000",
            "40000000_80000000",
            "0x4000000g_0x80000000",
        ] {
            assert_eq!(parse_range(bad), None, "{bad}");
        }
        let topic = TopicName::parse("persistent://public/default/orders").expect("valid name");
        let range = names
            .iter()
            .filter(|name| {
                range_holds(
                    &topic,
                    parse_range(name.rsplit('/').next().unwrap_or("")).unwrap_or((0, 0)),
                )
            })
            .cloned()
            .collect::<Vec<_>>();
        assert_eq!(range, [bundle_of(&topic, 4)]);
        assert_eq!(
            bundle_in(&topic, &default_boundaries(4)),
            bundle_of(&topic, 4)
        );
        assert!(bundle_holds(&bundle_of(&topic, 4), &topic));
        assert!(!bundle_holds("public/other/0x00000000_0xffffffff", &topic));
    }

    #[test]
    fn split_boundaries_place_topics_in_the_halves() {
        assert!(valid_boundaries(&default_boundaries(4)));
        assert!(!valid_boundaries(&[0, 5, 5, u32::MAX]));
        assert!(!valid_boundaries(&[1, u32::MAX]));
        let topic = TopicName::parse("persistent://public/default/orders").expect("valid name");
        let whole = bundle_of(&topic, 4);
        let (lower, upper) = parse_range(whole.rsplit('/').next().unwrap_or("")).expect("range");
        let middle = lower + (upper - lower) / 2;
        let mut split = default_boundaries(4);
        split.push(middle);
        split.sort_unstable();
        assert!(valid_boundaries(&split));
        let half = bundle_in(&topic, &split);
        assert!(bundle_holds(&half, &topic));
        assert!(
            half == bundle_name("public", "default", lower, middle)
                || half == bundle_name("public", "default", middle, upper),
            "{half}"
        );
        assert_eq!(bundle_names("public", "default", &split).len(), 5);
    }
}
