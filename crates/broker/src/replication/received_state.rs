//! A replicated subscription's state arriving from another cluster, by either transport: the
//! binary protocol's REPLICATED_SUBSCRIPTION_STATE command (a Meridian extension, announced in
//! CONNECTED unless `replicated_subscriptions_state_command` is off) or the admin API's
//! `POST …/subscription/{sub}/replicatedSubscriptionState` (what senders use with a broker that
//! does not announce the command). The command's state is JSON text or, from a sender that saw
//! this broker announce it, the compact form ([`state_format`]). Both run
//! [`receive_from_cluster`]: decode the state, check
//! its sender is a registered cluster, find the topic, and hand it to
//! [`subscription_sync::receive`], which stores it durably and applies it before the answer.
//!
//! The one module of `replication` that uses [`Broker`]: it is the receiving side's entry point,
//! as the admin handlers and the connection are.

use std::sync::Arc;

use meridian_wire::proto::{
    CommandReplicatedSubscriptionState, CommandReplicatedSubscriptionStateResponse,
    MeridianStateFormat,
};
use meridian_wire::{BaseCommand, CommandType, ServerError};
use tokio::sync::Semaphore;

use super::state_format;
use super::subscription_sync::{self, stored_seq_in, SyncedAcks};
use crate::broker::Broker;
use crate::error::{BrokerError, Result};
use crate::outbound::{command_frame, OutboundSender};
use crate::topic_name::TopicName;

/// Decodes `raw` (a state's JSON text), checks it and has the topic's subscription
/// `subscription` store and apply it. Refusals: `BadRequest` for a state that does not decode,
/// `NotFound` for a topic that does not exist, `PreconditionFailed` for an unregistered sender,
/// and whatever [`subscription_sync::receive`] refuses (`Conflict` with the `seq` held for a
/// state older than it). A refused state changes nothing.
pub async fn receive_from_cluster(
    broker: &Broker,
    topic: &TopicName,
    subscription: String,
    raw: String,
) -> Result<()> {
    let acks: SyncedAcks = serde_json::from_str(&raw).map_err(|error| {
        BrokerError::BadRequest(format!("invalid replicated subscription state: {error}"))
    })?;
    receive_decoded(broker, topic, subscription, (acks, raw)).await
}

/// [`receive_from_cluster`] for a state already decoded; `raw`: the text to store for it.
async fn receive_decoded(
    broker: &Broker,
    topic: &TopicName,
    subscription: String,
    (acks, raw): (SyncedAcks, String),
) -> Result<()> {
    if !broker.exists(topic) {
        return Err(BrokerError::NotFound(format!(
            "topic {topic} does not exist"
        )));
    }
    let loaded = broker.topic(topic, false).await?;
    // Only a registered cluster can speak for a subscription's other copies. The topic's list
    // of registered clusters answers at no cost; the metadata store (a read and a decode, at
    // every state) only for a cluster not in it, which may be one registered a moment ago.
    if loaded.registered_cluster(&acks.cluster).is_none() {
        if let Err(BrokerError::NotFound(_)) = broker.resources().cluster(&acks.cluster) {
            return Err(BrokerError::PreconditionFailed(format!(
                "cluster {} is not registered here",
                acks.cluster
            )));
        }
    }
    let local_cluster = broker.config().cluster_name.clone();
    tokio::task::spawn_blocking(move || {
        subscription_sync::receive(&loaded, &subscription, (acks, raw), &local_cluster)
    })
    .await
    .map_err(|error| BrokerError::Unknown(error.to_string()))?
}

/// States received as commands and being applied at once, broker-wide: a connection that sends
/// more waits (its next frames with it) until one is done.
const COMMANDS_IN_FLIGHT_MAX: usize = 64;
static COMMANDS_IN_FLIGHT: Semaphore = Semaphore::const_new(COMMANDS_IN_FLIGHT_MAX);

/// Takes a REPLICATED_SUBSCRIPTION_STATE command (its sender's permission already checked) and
/// answers it on `outbound` once the state is stored and applied, from a task of its own: the
/// state's durable write (an fsync) must not hold up the frames behind it on the connection,
/// which is a replication connection whose SENDs would wait.
pub async fn take_command(
    broker: Arc<Broker>,
    request: CommandReplicatedSubscriptionState,
    outbound: OutboundSender,
) {
    let Ok(permit) = COMMANDS_IN_FLIGHT.acquire().await else {
        return;
    };
    tokio::spawn(async move {
        let response = receive_command(&broker, request).await;
        drop(permit);
        let _ = outbound.send(answer(response)).await;
    });
}

/// The frame of a REPLICATED_SUBSCRIPTION_STATE's answer.
pub fn answer(response: CommandReplicatedSubscriptionStateResponse) -> crate::outbound::Outbound {
    command_frame(&BaseCommand {
        r#type: CommandType::ReplicatedSubscriptionStateResponse as i32,
        replicated_subscription_state_response: Some(response),
        ..BaseCommand::default()
    })
}

/// Runs a REPLICATED_SUBSCRIPTION_STATE command (its sender's permission already checked) and
/// returns the answer: no error when the state was stored and applied; the error, and for a
/// state older than the one held the `seq` held.
async fn receive_command(
    broker: &Broker,
    request: CommandReplicatedSubscriptionState,
) -> CommandReplicatedSubscriptionStateResponse {
    let request_id = request.request_id;
    let outcome = async {
        if !broker.config().replicated_subscriptions_state_command {
            return Err(BrokerError::NotAllowed(
                "this broker takes replicated subscription states over HTTP only \
                 (replicated_subscriptions_state_command = false)"
                    .into(),
            ));
        }
        let topic = TopicName::parse(&request.topic)?;
        match request.format {
            None | Some(0) => {
                let raw = String::from_utf8(request.state.to_vec()).map_err(|_| {
                    BrokerError::BadRequest(
                        "invalid replicated subscription state: not UTF-8".into(),
                    )
                })?;
                receive_from_cluster(broker, &topic, request.subscription, raw).await
            }
            Some(format) if format == MeridianStateFormat::Compact as i32 => {
                let decoded = state_format::decode_compact(&request.state).map_err(|error| {
                    BrokerError::BadRequest(format!(
                        "invalid replicated subscription state (compact): {error}"
                    ))
                })?;
                receive_decoded(broker, &topic, request.subscription, decoded).await
            }
            Some(format) => Err(BrokerError::BadRequest(format!(
                "invalid replicated subscription state: unknown format {format}"
            ))),
        }
    }
    .await;
    match outcome {
        Ok(()) => CommandReplicatedSubscriptionStateResponse {
            request_id,
            ..Default::default()
        },
        Err(error) => {
            let message = error.to_string();
            let stored_seq = match error {
                BrokerError::Conflict(_) => stored_seq_in(&message),
                _ => None,
            };
            refusal(request_id, error.server_error(), message, stored_seq)
        }
    }
}

/// The answer to a REPLICATED_SUBSCRIPTION_STATE that was refused.
pub fn refusal(
    request_id: u64,
    error: ServerError,
    message: String,
    stored_seq: Option<u64>,
) -> CommandReplicatedSubscriptionStateResponse {
    CommandReplicatedSubscriptionStateResponse {
        request_id,
        error: Some(error as i32),
        message: Some(message),
        stored_seq,
    }
}
