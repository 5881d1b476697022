//! Topic names: the short forms users type, normalised to the full names the
//! broker expects, and the names of partitions.

use crate::error::{Error, Result};

/// Normalises a topic name the way Pulsar does:
///
/// - `my-topic` → `persistent://public/default/my-topic`
/// - `tenant/namespace/my-topic` → `persistent://tenant/namespace/my-topic`
/// - `persistent://…` and `non-persistent://…` are checked and kept, with
///   three parts after the scheme (or four, the legacy form with a cluster).
pub fn normalize_topic(topic: &str) -> Result<String> {
    let invalid = |reason| Error::InvalidTopicName {
        topic: topic.to_string(),
        reason,
    };
    if topic.is_empty() {
        return Err(invalid("empty"));
    }
    let (domain, rest) = match topic.split_once("://") {
        Some((domain, rest)) => (domain, rest),
        None => {
            return match topic.matches('/').count() {
                0 => Ok(format!("persistent://public/default/{topic}")),
                2 => normalize_topic(&format!("persistent://{topic}")),
                _ => Err(invalid(
                    "expected `topic`, `tenant/namespace/topic` or `persistent://tenant/namespace/topic`",
                )),
            };
        }
    };
    if domain != "persistent" && domain != "non-persistent" {
        return Err(invalid("the domain must be persistent or non-persistent"));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if !(parts.len() == 3 || parts.len() == 4) || parts.iter().any(|part| part.is_empty()) {
        return Err(invalid("expected tenant/namespace/topic after the domain"));
    }
    Ok(topic.to_string())
}

/// The name of partition `index` of the partitioned topic `topic`.
pub fn partition_topic(topic: &str, index: u32) -> String {
    format!("{topic}-partition-{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_become_full_names() {
        assert_eq!(
            normalize_topic("orders").ok().as_deref(),
            Some("persistent://public/default/orders")
        );
        assert_eq!(
            normalize_topic("acme/eu/orders").ok().as_deref(),
            Some("persistent://acme/eu/orders")
        );
        assert_eq!(
            normalize_topic("non-persistent://acme/eu/orders")
                .ok()
                .as_deref(),
            Some("non-persistent://acme/eu/orders")
        );
    }

    #[test]
    fn malformed_names_are_refused() {
        assert!(normalize_topic("").is_err());
        assert!(normalize_topic("a/b").is_err());
        assert!(normalize_topic("kafka://a/b/c").is_err());
        assert!(normalize_topic("persistent://a//c").is_err());
    }

    #[test]
    fn partitions_are_suffixed() {
        assert_eq!(
            partition_topic("persistent://public/default/t", 2),
            "persistent://public/default/t-partition-2"
        );
    }
}
