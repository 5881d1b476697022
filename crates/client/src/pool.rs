//! The connection pool and topic lookup.
//!
//! The pool keeps one connection per broker address. Concurrent callers for
//! the same address share one connection attempt (a `OnceCell` per address);
//! a closed connection is replaced by the next caller that finds it.
//!
//! Lookup follows Pulsar's binary lookup: PARTITIONED_METADATA on a
//! connection to the service URL, then LOOKUP, following `Redirect` answers
//! (passing on their `authoritative` flag) up to a limit, until a `Connect`
//! answer names the broker that owns the topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use meridian_wire::proto::command_lookup_topic_response::LookupType;
use meridian_wire::proto::command_partitioned_topic_metadata_response::LookupType as MetadataLookupType;
use meridian_wire::proto::{CommandLookupTopic, CommandPartitionedTopicMetadata};
use meridian_wire::CommandType;
use tokio::sync::OnceCell;

use crate::connection::{command, BrokerAddress, Connection, ConnectionSettings};
use crate::error::{Error, Result};

type Slot = Arc<OnceCell<Arc<Connection>>>;

/// Connections by broker address.
pub(crate) struct ConnectionPool {
    settings: ConnectionSettings,
    slots: Mutex<HashMap<BrokerAddress, Slot>>,
    /// The `host:port` entries of the service URL, tried in turn.
    service_addresses: Vec<String>,
    next_service_address: AtomicUsize,
    max_lookup_redirects: u32,
    /// When set, every connection physically goes to this `host:port` (a
    /// proxy), still naming the broker it is meant for.
    proxy: Option<String>,
}

impl ConnectionPool {
    pub(crate) fn new(
        settings: ConnectionSettings,
        service_addresses: Vec<String>,
        max_lookup_redirects: u32,
        proxy: Option<String>,
    ) -> ConnectionPool {
        ConnectionPool {
            settings,
            slots: Mutex::new(HashMap::new()),
            service_addresses,
            next_service_address: AtomicUsize::new(0),
            max_lookup_redirects,
            proxy,
        }
    }

    pub(crate) fn operation_timeout(&self) -> std::time::Duration {
        self.settings.operation_timeout
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<BrokerAddress, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Where a connection to `address` physically goes: the proxy, if there is one.
    fn through_proxy<'a>(&self, address: &'a BrokerAddress) -> std::borrow::Cow<'a, BrokerAddress> {
        match &self.proxy {
            Some(proxy) => std::borrow::Cow::Owned(BrokerAddress {
                logical: address.logical.clone(),
                physical: proxy.clone(),
            }),
            None => std::borrow::Cow::Borrowed(address),
        }
    }

    /// The open connection to `address`, if there is one: without an await, for callers that
    /// send often and should not build [`Self::get`]'s future (which holds a whole connection
    /// attempt) each time.
    pub(crate) fn open_connection(&self, address: &BrokerAddress) -> Option<Arc<Connection>> {
        let address = self.through_proxy(address);
        let slot = self.slots().get(address.as_ref()).cloned()?;
        slot.get()
            .filter(|connection| !connection.is_closed())
            .cloned()
    }

    /// An open connection to `address`, opening one if needed.
    pub(crate) async fn get(&self, address: &BrokerAddress) -> Result<Arc<Connection>> {
        let address = self.through_proxy(address);
        let address = address.as_ref();
        // Two rounds: the second replaces a connection found closed in the first.
        for _ in 0..2 {
            let slot = self.slots().entry(address.clone()).or_default().clone();
            let connection = slot
                .get_or_try_init(|| Connection::connect(address.clone(), self.settings.clone()))
                .await?;
            if !connection.is_closed() {
                return Ok(connection.clone());
            }
            let mut slots = self.slots();
            if slots
                .get(address)
                .is_some_and(|current| Arc::ptr_eq(current, &slot))
            {
                slots.remove(address);
            }
        }
        Err(Error::Disconnected {
            address: address.to_string(),
        })
    }

    /// A connection to one of the service URL's addresses (lookups and
    /// partition metadata go there), trying each address once.
    pub(crate) async fn service_connection(&self) -> Result<Arc<Connection>> {
        let count = self.service_addresses.len().max(1);
        let mut last_error = None;
        for _ in 0..count {
            let index = self.next_service_address.load(Ordering::Relaxed) % count;
            let Some(address) = self.service_addresses.get(index) else {
                break;
            };
            match self.get(&BrokerAddress::direct(address.clone())).await {
                Ok(connection) => return Ok(connection),
                Err(error) => {
                    // Move on to the next address for this and later calls.
                    self.next_service_address.fetch_add(1, Ordering::Relaxed);
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::InvalidServiceUrl {
            url: String::new(),
            reason: "no address",
        }))
    }

    /// The number of partitions of `topic` (0: not partitioned).
    pub(crate) async fn partitions(&self, topic: &str) -> Result<u32> {
        let connection = self.service_connection().await?;
        let reply = connection
            .request(
                "partitioned metadata",
                Some(self.operation_timeout()),
                |request_id| meridian_wire::BaseCommand {
                    partitioned_metadata: Some(Box::new(CommandPartitionedTopicMetadata {
                        topic: topic.to_string(),
                        request_id,
                        ..CommandPartitionedTopicMetadata::default()
                    })),
                    ..command(CommandType::PartitionedMetadata)
                },
            )
            .await?;
        let response = reply
            .partitioned_metadata_response
            .ok_or_else(|| Error::Protocol {
                address: connection.address().to_string(),
                reason: "PARTITIONED_METADATA_RESPONSE without its body".to_string(),
            })?;
        if response.response == Some(MetadataLookupType::Failed as i32) {
            return Err(Error::server(
                response.error.unwrap_or(0),
                response.message.unwrap_or_default(),
            ));
        }
        Ok(response.partitions.unwrap_or(0))
    }

    /// The broker that owns `topic`.
    pub(crate) async fn lookup(&self, topic: &str) -> Result<BrokerAddress> {
        Ok(self.lookup_answer(topic).await?.0)
    }

    /// The broker that owns `topic`, and the URLs the final answer named.
    pub(crate) async fn lookup_answer(&self, topic: &str) -> Result<(BrokerAddress, BrokerUrls)> {
        let mut connection = self.service_connection().await?;
        let mut authoritative = false;
        for _ in 0..=self.max_lookup_redirects {
            let reply = connection
                .request("lookup", Some(self.operation_timeout()), |request_id| {
                    meridian_wire::BaseCommand {
                        lookup: Some(Box::new(CommandLookupTopic {
                            topic: topic.to_string(),
                            request_id,
                            authoritative: Some(authoritative),
                            ..CommandLookupTopic::default()
                        })),
                        ..command(CommandType::Lookup)
                    }
                })
                .await?;
            let response = reply.lookup_response.ok_or_else(|| Error::Protocol {
                address: connection.address().to_string(),
                reason: "LOOKUP_RESPONSE without its body".to_string(),
            })?;
            // A TLS client goes on with TLS: the broker's `pulsar+ssl://` URL.
            let tls = self.settings.tls.is_some();
            let target = || {
                match tls {
                    true => response.broker_service_url_tls.as_deref(),
                    false => response.broker_service_url.as_deref(),
                }
                .filter(|url| !url.is_empty())
                .map(strip_scheme)
                .ok_or_else(|| Error::Protocol {
                    address: connection.address().to_string(),
                    reason: format!(
                        "lookup of {topic} named no {}broker URL",
                        if tls { "TLS " } else { "" }
                    ),
                })
            };
            match LookupType::try_from(response.response.unwrap_or(LookupType::Failed as i32)) {
                Ok(LookupType::Connect) => {
                    let logical = target()?;
                    let urls = BrokerUrls {
                        broker_service_url: response.broker_service_url.clone(),
                        broker_service_url_tls: response.broker_service_url_tls.clone(),
                    };
                    if response.proxy_through_service_url() {
                        let address = BrokerAddress {
                            logical,
                            physical: connection.address().physical.clone(),
                        };
                        return Ok((address, urls));
                    }
                    return Ok((BrokerAddress::direct(logical), urls));
                }
                Ok(LookupType::Redirect) => {
                    let next = target()?;
                    tracing::debug!(topic, broker = %next, authoritative = response.authoritative(), "lookup redirected");
                    authoritative = response.authoritative();
                    connection = self.get(&BrokerAddress::direct(next)).await?;
                }
                _ => {
                    return Err(Error::server(
                        response.error.unwrap_or(0),
                        response
                            .message
                            .unwrap_or_else(|| format!("lookup of {topic} failed")),
                    ))
                }
            }
        }
        Err(Error::TooManyRedirects {
            topic: topic.to_string(),
            max_redirects: self.max_lookup_redirects,
        })
    }

    /// Closes every connection.
    pub(crate) fn close_all(&self) {
        let slots: Vec<Slot> = self.slots().drain().map(|(_, slot)| slot).collect();
        for slot in slots {
            if let Some(connection) = slot.get() {
                connection.close(Error::Disconnected {
                    address: connection.address().to_string(),
                });
            }
        }
    }
}

/// The URLs of the broker a lookup ended at, as it answered them (empty ones as `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerUrls {
    /// `pulsar://host:port`.
    pub broker_service_url: Option<String>,
    /// `pulsar+ssl://host:port`.
    pub broker_service_url_tls: Option<String>,
}

/// `pulsar://host:port` → `host:port` (a bare `host:port` is kept).
pub(crate) fn strip_scheme(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.trim_end_matches('/').to_string()
}

/// A service URL taken apart: its `host:port` entries and whether it is TLS.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ServiceUrl {
    pub(crate) addresses: Vec<String>,
    /// `pulsar+ssl://`.
    pub(crate) tls: bool,
}

/// Parses `pulsar://host[:port][,host[:port]...]` (default port 6650) or the same with
/// `pulsar+ssl://` (default port 6651).
pub(crate) fn parse_service_url(url: &str) -> Result<ServiceUrl> {
    let invalid = |reason| Error::InvalidServiceUrl {
        url: url.to_string(),
        reason,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(invalid(
            "expected pulsar://host:port or pulsar+ssl://host:port",
        ));
    };
    let (tls, default_port) = match scheme {
        "pulsar" => (false, 6650),
        "pulsar+ssl" => (true, 6651),
        _ => return Err(invalid("expected pulsar:// or pulsar+ssl://")),
    };
    let rest = rest.trim_end_matches('/');
    let mut addresses = Vec::new();
    for host in rest.split(',') {
        if host.is_empty() || host.contains('/') {
            return Err(invalid("expected host[:port] entries separated by commas"));
        }
        // An IPv6 literal is bracketed: [::1]:6650.
        let has_port = match host.rfind(']') {
            Some(bracket) => host[bracket..].contains(':'),
            None => host.contains(':'),
        };
        addresses.push(if has_port {
            host.to_string()
        } else {
            format!("{host}:{default_port}")
        });
    }
    Ok(ServiceUrl { addresses, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_urls_parse_to_addresses() {
        let plain = |addresses: &[&str]| ServiceUrl {
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            tls: false,
        };
        let tls = |addresses: &[&str]| ServiceUrl {
            tls: true,
            ..plain(addresses)
        };
        assert_eq!(
            parse_service_url("pulsar://localhost:6650").ok(),
            Some(plain(&["localhost:6650"]))
        );
        assert_eq!(
            parse_service_url("pulsar://a,b:7000/").ok(),
            Some(plain(&["a:6650", "b:7000"]))
        );
        assert_eq!(
            parse_service_url("pulsar://[::1]").ok(),
            Some(plain(&["[::1]:6650"]))
        );
        assert_eq!(
            parse_service_url("pulsar+ssl://a:7651").ok(),
            Some(tls(&["a:7651"]))
        );
        assert_eq!(
            parse_service_url("pulsar+ssl://a,[::1],10.0.0.1").ok(),
            Some(tls(&["a:6651", "[::1]:6651", "10.0.0.1:6651"]))
        );
        assert!(parse_service_url("pulsar+tls://a:6651").is_err());
        assert!(parse_service_url("http://a:8080").is_err());
        assert!(parse_service_url("a:6650").is_err());
    }

    #[test]
    fn broker_urls_lose_their_scheme() {
        assert_eq!(strip_scheme("pulsar://10.0.0.1:6650"), "10.0.0.1:6650");
        assert_eq!(strip_scheme("pulsar://b:6650/"), "b:6650");
        assert_eq!(strip_scheme("b:6650"), "b:6650");
    }
}
