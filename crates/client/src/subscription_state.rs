//! Meridian's replicated-subscription states on the binary protocol (a Meridian extension, not
//! Pulsar): a broker's subscription sync sends another cluster the acknowledgement state of a
//! replicated subscription as a REPLICATED_SUBSCRIPTION_STATE command on a connection to the
//! broker that owns the topic there, instead of an HTTP post.
//!
//! Only a broker that announced the command in CONNECTED gets it; for any other (Pulsar, an
//! older Meridian, one configured not to take it) and for a state larger than the broker's frame
//! limit, [`Client::send_subscription_state`] sends nothing and says so, and the caller posts
//! the state over HTTP as before. A broker that announces version 2 of the state encoding
//! ([`StateFormat::Compact`]) gets the compact protobuf form; others the JSON text.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use meridian_wire::proto::{CommandReplicatedSubscriptionState, MeridianStateFormat};
use meridian_wire::CommandType;

use crate::client::Client;
use crate::connection::{command, BrokerAddress};
use crate::error::{Error, Result};
use crate::topic::normalize_topic;

/// Topics whose owner is remembered at most; beyond, the memory starts over (a lookup each).
const OWNERS_MAX: usize = 10_000;

/// What a command may add to a state within one frame: the sizes, the command's fields, the
/// topic and subscription names are counted on top of this.
const COMMAND_OVERHEAD_BYTES: usize = 64;

/// How a state is encoded (the command's `format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFormat {
    /// The JSON text of the HTTP endpoint: every broker that takes the command takes it.
    Json,
    /// The `MeridianSubscriptionState` protobuf message: only a broker that announced version 2
    /// of the state encoding in CONNECTED.
    Compact,
}

/// What a broker answered to a replicated-subscription state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateAnswer {
    /// Stored durably and applied.
    Taken,
    /// Refused as older than the state the broker holds from the same cluster, whose `seq` this
    /// is.
    Older { stored_seq: u64 },
    /// Not sent: the broker does not take the command, or the state exceeds its frame limit.
    NotSent,
}

/// The broker that owns each topic states were sent for, so that a state every 100 ms does not
/// cost a lookup each. Forgotten when a send fails.
#[derive(Default)]
pub(crate) struct Owners(Mutex<HashMap<String, BrokerAddress>>);

impl Owners {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, BrokerAddress>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, topic: &str) -> Option<BrokerAddress> {
        self.map().get(topic).cloned()
    }

    fn remember(&self, topic: &str, address: BrokerAddress) {
        let mut owners = self.map();
        if owners.len() >= OWNERS_MAX && !owners.contains_key(topic) {
            owners.clear();
        }
        owners.insert(topic.to_string(), address);
    }

    fn forget(&self, topic: &str) {
        self.map().remove(topic);
    }
}

impl Client {
    /// Sends a Meridian replicated-subscription state for `subscription` of `topic` to the
    /// broker that owns the topic, if that broker takes Meridian's REPLICATED_SUBSCRIPTION_STATE
    /// command ([`StateAnswer::NotSent`] otherwise). `encode` is given the richest encoding
    /// the broker takes ([`StateFormat::Compact`] if it announced it) and returns the state in
    /// the encoding it chose, with that encoding. `Err(Error::Server)` when the broker refused
    /// it for another reason; `Err(Error::Timeout)` when it did not answer within `timeout`.
    pub async fn send_subscription_state(
        &self,
        topic: &str,
        subscription: &str,
        encode: impl FnOnce(StateFormat) -> (StateFormat, Bytes),
        timeout: Duration,
    ) -> Result<StateAnswer> {
        let topic = normalize_topic(topic)?;
        let result = self
            .send_state_to_owner(&topic, subscription, encode, timeout)
            .await;
        if result.is_err() {
            // The topic may have moved (an unload, cluster mode's owner changing): look it up
            // again next time.
            self.inner.state_owners.forget(&topic);
        }
        result
    }

    async fn send_state_to_owner(
        &self,
        topic: &str,
        subscription: &str,
        encode: impl FnOnce(StateFormat) -> (StateFormat, Bytes),
        timeout: Duration,
    ) -> Result<StateAnswer> {
        // Sent every sync interval: the lookup and the connection attempt are boxed, so that
        // this future stays small when the owner and its connection are known (the usual case).
        let pool = &self.inner.pool;
        let address = match self.inner.state_owners.get(topic) {
            Some(address) => address,
            None => {
                let address = Box::pin(pool.lookup(topic)).await?;
                self.inner.state_owners.remember(topic, address.clone());
                address
            }
        };
        let connection = match pool.open_connection(&address) {
            Some(connection) => connection,
            None => Box::pin(pool.get(&address)).await?,
        };
        if !connection.takes_subscription_states() {
            return Ok(StateAnswer::NotSent);
        }
        let best = if connection.takes_compact_subscription_states() {
            StateFormat::Compact
        } else {
            StateFormat::Json
        };
        let (format, state) = encode(best);
        let size = state
            .len()
            .saturating_add(topic.len())
            .saturating_add(subscription.len())
            .saturating_add(COMMAND_OVERHEAD_BYTES);
        if size > connection.max_message_size() {
            return Ok(StateAnswer::NotSent);
        }
        let reply = connection
            .request(
                "replicated subscription state",
                Some(timeout),
                |request_id| meridian_wire::BaseCommand {
                    replicated_subscription_state: Some(Box::new(
                        CommandReplicatedSubscriptionState {
                            request_id,
                            topic: topic.to_string(),
                            subscription: subscription.to_string(),
                            state,
                            // Absent for JSON: what a broker from before the field reads.
                            format: (format == StateFormat::Compact)
                                .then_some(MeridianStateFormat::Compact as i32),
                        },
                    )),
                    ..command(CommandType::ReplicatedSubscriptionState)
                },
            )
            .await?;
        let response = reply
            .replicated_subscription_state_response
            .ok_or_else(|| Error::Protocol {
                address: address.to_string(),
                reason: "REPLICATED_SUBSCRIPTION_STATE_RESPONSE without its body".to_string(),
            })?;
        match (response.error, response.stored_seq) {
            (None, _) => Ok(StateAnswer::Taken),
            (Some(_), Some(stored_seq)) => Ok(StateAnswer::Older { stored_seq }),
            (Some(code), None) => Err(Error::server(
                code,
                response.message.unwrap_or_else(|| {
                    format!("the state of {subscription} on {topic} was refused")
                }),
            )),
        }
    }
}
