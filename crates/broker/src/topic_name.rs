//! Pulsar topic names: `persistent://tenant/namespace/local[-partition-N]`.

use std::fmt;

use crate::error::BrokerError;

const PARTITION_SUFFIX: &str = "-partition-";

/// The one limit on a topic name's length: storage keeps a topic in a directory named after its
/// full name, escaped (every byte other than an ASCII letter, digit, `-`, `_` or `.` takes three
/// bytes, see `meridian_storage`'s `encode_name`), and that name may have at most this many
/// bytes. Checked when a name is parsed, so a name too long is `InvalidTopicName` (HTTP 412)
/// before anything is created.
pub const MAX_ESCAPED_TOPIC_NAME_BYTES: usize =
    meridian_storage::engine::ENCODED_LOG_NAME_MAX_BYTES;

/// Length of `name` as storage escapes it.
fn escaped_length(name: &str) -> usize {
    name.bytes()
        .enumerate()
        .map(|(index, byte)| {
            let plain = byte.is_ascii_alphanumeric()
                || byte == b'-'
                || byte == b'_'
                || (byte == b'.' && index > 0);
            if plain {
                1
            } else {
                3
            }
        })
        .sum()
}

/// A parsed, validated topic name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName {
    pub tenant: String,
    pub namespace: String,
    /// The local name, including any `-partition-N` suffix.
    pub local: String,
}

fn invalid(name: &str, reason: impl Into<String>) -> BrokerError {
    BrokerError::InvalidTopicName {
        name: name.chars().take(256).collect(),
        reason: reason.into(),
    }
}

/// Tenant and namespace names: Pulsar's `[-=:.\w]+`.
pub fn is_valid_entity_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "_-=:.".contains(character))
}

impl TopicName {
    /// Parses a full or short topic name. Short forms: `local` means
    /// `persistent://public/default/local`; `tenant/namespace/local` means persistent.
    pub fn parse(name: &str) -> Result<TopicName, BrokerError> {
        if name.is_empty() {
            return Err(invalid(name, "empty"));
        }
        if name.len() > MAX_ESCAPED_TOPIC_NAME_BYTES {
            return Err(invalid(name, Self::too_long()));
        }
        let rest = if let Some(rest) = name.strip_prefix("persistent://") {
            rest
        } else if name.starts_with("non-persistent://") {
            return Err(invalid(name, "non-persistent topics are not supported"));
        } else if name.contains("://") {
            return Err(invalid(name, "the domain must be persistent://"));
        } else if !name.contains('/') {
            return TopicName::parse(&format!("persistent://public/default/{name}"));
        } else {
            name
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let [tenant, namespace, local] = parts[..] else {
            let reason = if parts.len() == 4 {
                "the legacy tenant/cluster/namespace/topic form is not supported"
            } else {
                "expected tenant/namespace/topic"
            };
            return Err(invalid(name, reason));
        };
        if !is_valid_entity_name(tenant) {
            return Err(invalid(name, format!("invalid tenant name {tenant:?}")));
        }
        if !is_valid_entity_name(namespace) {
            return Err(invalid(
                name,
                format!("invalid namespace name {namespace:?}"),
            ));
        }
        if local.is_empty() {
            return Err(invalid(name, "empty topic name"));
        }
        if local.chars().any(|character| character.is_control()) {
            return Err(invalid(name, "control characters in the topic name"));
        }
        let parsed = TopicName {
            tenant: tenant.to_string(),
            namespace: namespace.to_string(),
            local: local.to_string(),
        };
        if escaped_length(&parsed.to_string()) > MAX_ESCAPED_TOPIC_NAME_BYTES {
            return Err(invalid(name, Self::too_long()));
        }
        Ok(parsed)
    }

    fn too_long() -> String {
        format!(
            "longer than {MAX_ESCAPED_TOPIC_NAME_BYTES} bytes once escaped for storage \
             (characters other than letters, digits, '-', '_' and '.' count three)"
        )
    }

    /// Checks that every partition's name of a topic with `partitions` partitions is within
    /// the length limit (the last one is the longest).
    pub fn check_partition_names(&self, partitions: u32) -> Result<(), BrokerError> {
        let last = self.partition(partitions.saturating_sub(1)).to_string();
        if escaped_length(&last) > MAX_ESCAPED_TOPIC_NAME_BYTES {
            return Err(invalid(&last, Self::too_long()));
        }
        Ok(())
    }

    /// `tenant/namespace`.
    pub fn namespace_name(&self) -> String {
        format!("{}/{}", self.tenant, self.namespace)
    }

    /// The partition index if this is a partition (`-partition-N`, N without leading zeros).
    pub fn partition_index(&self) -> Option<u32> {
        let (_, index) = self.local.rsplit_once(PARTITION_SUFFIX)?;
        if index.is_empty() || (index.len() > 1 && index.starts_with('0')) {
            return None;
        }
        index.parse().ok()
    }

    /// The partitioned topic this partition belongs to (itself if not a partition).
    pub fn base(&self) -> TopicName {
        match (
            self.partition_index(),
            self.local.rsplit_once(PARTITION_SUFFIX),
        ) {
            (Some(_), Some((base, _))) => TopicName {
                local: base.to_string(),
                ..self.clone()
            },
            _ => self.clone(),
        }
    }

    /// Partition `index` of this topic.
    pub fn partition(&self, index: u32) -> TopicName {
        TopicName {
            local: format!("{}{PARTITION_SUFFIX}{index}", self.local),
            ..self.clone()
        }
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "persistent://{}/{}/{}",
            self.tenant, self.namespace, self.local
        )
    }
}

/// Percent-encodes one segment of a URL path (a topic's local name, a subscription name), as
/// the admin API's clients must.
pub fn encode_path_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_length_limit_counted_as_storage_escapes_it() {
        let prefix = "persistent://public/default/";
        // "persistent://public/default/" escapes to 38 bytes.
        let fits = format!("{prefix}{}", "a".repeat(MAX_ESCAPED_TOPIC_NAME_BYTES - 38));
        assert!(TopicName::parse(&fits).is_ok());
        let longer = format!("{fits}a");
        assert!(matches!(
            TopicName::parse(&longer),
            Err(BrokerError::InvalidTopicName { .. })
        ));
        let escaped = format!("{prefix}{}", ":".repeat(80));
        assert!(TopicName::parse(&escaped).is_err());
        let name = TopicName::parse(&format!("{prefix}{}", "a".repeat(200))).expect("fits");
        assert!(name.check_partition_names(1).is_ok());
        assert!(name.check_partition_names(100).is_err());
    }

    #[test]
    fn parses_full_and_short_names() {
        let full = TopicName::parse("persistent://acme/orders/eu-partition-3").expect("full");
        assert_eq!(full.to_string(), "persistent://acme/orders/eu-partition-3");
        assert_eq!(full.partition_index(), Some(3));
        assert_eq!(full.base().to_string(), "persistent://acme/orders/eu");
        assert_eq!(
            full.base().partition(0).to_string(),
            "persistent://acme/orders/eu-partition-0"
        );
        assert_eq!(
            TopicName::parse("t").expect("short").to_string(),
            "persistent://public/default/t"
        );
        assert_eq!(
            TopicName::parse("a/b/c").expect("three").to_string(),
            "persistent://a/b/c"
        );
        assert_eq!(
            TopicName::parse("persistent://a/b/x-partition-01")
                .expect("name")
                .partition_index(),
            None
        );
    }

    #[test]
    fn rejects_invalid_names() {
        for name in [
            "",
            "persistent://a/b",
            "persistent://a/b/c/d",
            "persistent://a b/c/d",
            "persistent://a/b/",
            "http://a/b/c",
            "non-persistent://a/b/c",
            "persistent://a/b/c\u{7}",
        ] {
            assert!(TopicName::parse(name).is_err(), "{name:?} accepted");
        }
    }
}
