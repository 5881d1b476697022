//! The schema registry: versioned schemas per topic (shared by a partitioned topic's
//! partitions), kept in the metadata store under `/schemas/<tenant>/<namespace>/<topic>/<version>`.
//!
//! Compatibility: a schema of another type than the topic's latest is refused
//! (`IncompatibleSchema`); a new definition of the same type becomes a new version. Deeper
//! Avro/JSON compatibility checks (Pulsar's strategies) are not implemented yet.

use std::sync::Arc;

use meridian_metadata::{ExpectedVersion, MetadataStore};
use meridian_wire::proto::{schema, KeyValue, Schema};
use serde::{Deserialize, Serialize};

use crate::error::{BrokerError, Result};
use crate::topic_name::TopicName;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredSchema {
    name: String,
    schema_type: i32,
    data: Vec<u8>,
    properties: Vec<(String, String)>,
}

impl StoredSchema {
    fn from_wire(schema: &Schema) -> StoredSchema {
        let mut properties: Vec<(String, String)> = schema
            .properties
            .iter()
            .map(|property| (property.key.clone(), property.value.clone()))
            .collect();
        properties.sort();
        StoredSchema {
            name: schema.name.clone(),
            schema_type: schema.r#type,
            data: schema.schema_data.to_vec(),
            properties,
        }
    }

    fn to_wire(&self) -> Schema {
        Schema {
            name: self.name.clone(),
            schema_data: self.data.clone().into(),
            r#type: self.schema_type,
            properties: self
                .properties
                .iter()
                .map(|(key, value)| KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
        }
    }

    fn same_definition(&self, other: &StoredSchema) -> bool {
        self.schema_type == other.schema_type
            && self.data == other.data
            && self.properties == other.properties
    }
}

/// Schema versions go on the wire as 8-byte big-endian numbers, like Pulsar's registry.
pub fn encode_version(version: u64) -> Vec<u8> {
    version.to_be_bytes().to_vec()
}

pub fn decode_version(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub struct SchemaRegistry {
    metadata: Arc<dyn MetadataStore>,
}

impl SchemaRegistry {
    pub fn new(metadata: Arc<dyn MetadataStore>) -> SchemaRegistry {
        SchemaRegistry { metadata }
    }

    fn topic_key(topic: &TopicName) -> String {
        let base = topic.base();
        format!("/schemas/{}/{}/{}", base.tenant, base.namespace, base.local)
    }

    fn versions(&self, topic: &TopicName) -> Result<Vec<u64>> {
        let mut versions: Vec<u64> = self
            .metadata
            .children(&Self::topic_key(topic))?
            .iter()
            .filter_map(|child| child.parse().ok())
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    fn load(&self, topic: &TopicName, version: u64) -> Result<Option<StoredSchema>> {
        let key = format!("{}/{version:020}", Self::topic_key(topic));
        let Some(stored) = self.metadata.get(&key)? else {
            return Ok(None);
        };
        serde_json::from_slice(&stored.value)
            .map(Some)
            .map_err(|error| BrokerError::Metadata(format!("schema {key} is unreadable: {error}")))
    }

    /// The schema at `version`, or the latest one; `None` if there is none.
    pub fn get(&self, topic: &TopicName, version: Option<u64>) -> Result<Option<(u64, Schema)>> {
        let version = match version {
            Some(version) => version,
            None => match self.versions(topic)?.last() {
                Some(latest) => *latest,
                None => return Ok(None),
            },
        };
        Ok(self
            .load(topic, version)?
            .map(|stored| (version, stored.to_wire())))
    }

    /// The version of `schema` on `topic`, registering it as a new version if needed.
    pub fn get_or_create(&self, topic: &TopicName, schema: &Schema) -> Result<u64> {
        let candidate = StoredSchema::from_wire(schema);
        let versions = self.versions(topic)?;
        let mut latest = None;
        for version in &versions {
            if let Some(existing) = self.load(topic, *version)? {
                if existing.same_definition(&candidate) {
                    return Ok(*version);
                }
                latest = Some(existing);
            }
        }
        if let Some(latest) = latest {
            if latest.schema_type != candidate.schema_type {
                let name = |schema_type: i32| {
                    schema::Type::try_from(schema_type)
                        .map(|kind| kind.as_str_name().to_string())
                        .unwrap_or_else(|_| schema_type.to_string())
                };
                return Err(BrokerError::IncompatibleSchema(format!(
                    "topic {} has a {} schema; a {} schema is incompatible",
                    topic.base(),
                    name(latest.schema_type),
                    name(candidate.schema_type)
                )));
            }
        }
        let version = versions.last().map_or(0, |latest| latest + 1);
        let key = format!("{}/{version:020}", Self::topic_key(topic));
        let value = serde_json::to_vec(&candidate)
            .map_err(|error| BrokerError::Metadata(error.to_string()))?;
        self.metadata.put(&key, &value, ExpectedVersion::Absent)?;
        Ok(version)
    }
}
