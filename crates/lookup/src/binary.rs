//! The front door's Pulsar protocol listener: CONNECT/CONNECTED, PING/PONG, LOOKUP and
//! PARTITIONED_METADATA; any other command gets an ERROR saying what the front door serves.
//!
//! One task reads a connection's frames; each LOOKUP or PARTITIONED_METADATA is answered in a
//! task of its own (a partitioned topic's lookups go out together), at most
//! `max_pending_lookups_per_connection` at once: at the limit the reader waits, which is the
//! back-pressure. Replies go through a queue of that size plus a margin to one writer task.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use meridian_server::listener::{accept_loop, ConnectionLimits};
use meridian_wire::proto::command_lookup_topic_response::LookupType;
use meridian_wire::proto::command_partitioned_topic_metadata_response::LookupType as MetadataLookupType;
use meridian_wire::proto::{
    CommandConnected, CommandError, CommandLookupTopicResponse,
    CommandPartitionedTopicMetadataResponse, CommandPing, CommandPong, FeatureFlags,
};
use meridian_wire::{BaseCommand, CommandType, ServerError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{FrontDoor, LookupConfig};

/// The highest protocol version the front door speaks: the broker's, since clients keep the
/// version they negotiate here for nothing but this connection.
const PROTOCOL_VERSION: i32 = meridian_server::PROTOCOL_VERSION;
const SERVER_VERSION: &str = concat!("Meridian lookup ", env!("CARGO_PKG_VERSION"));
/// Replies that are not answers to requests (PONG, PING, ERROR) a connection may queue beyond
/// its pending requests.
const REPLY_MARGIN: usize = 16;

pub async fn serve(
    listener: TcpListener,
    front_door: Arc<FrontDoor>,
    config: Arc<LookupConfig>,
    shutdown: CancellationToken,
) {
    let limits = ConnectionLimits {
        max_connections: config.max_connections,
        max_connections_per_ip: config.max_connections_per_ip,
    };
    let token = shutdown.clone();
    accept_loop("lookup", listener, limits, shutdown, move |stream, peer| {
        run(
            stream,
            peer,
            front_door.clone(),
            config.clone(),
            token.clone(),
        )
    })
    .await;
}

/// Why a connection is closed (logged at debug level: clients come and go).
struct Close(String);

async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    front_door: Arc<FrontDoor>,
    config: Arc<LookupConfig>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let pending = config.max_pending_lookups_per_connection.max(1);
    let (replies, outbox) = mpsc::channel(pending + REPLY_MARGIN);
    let writer = tokio::spawn(write_replies(writer, outbox, config.keep_alive_interval));
    let mut connection = Connection {
        front_door,
        replies,
        requests: Arc::new(Semaphore::new(pending)),
        connected: false,
    };
    let outcome = connection
        .read_frames(&mut reader, &config, &shutdown)
        .await;
    if let Err(Close(reason)) = outcome {
        tracing::debug!(%peer, reason, "lookup connection closed");
    }
    // The writer ends once every request task has sent its answer and dropped its sender.
    drop(connection);
    let _ = writer.await;
}

struct Connection {
    front_door: Arc<FrontDoor>,
    replies: mpsc::Sender<BaseCommand>,
    requests: Arc<Semaphore>,
    connected: bool,
}

impl Connection {
    async fn read_frames(
        &mut self,
        reader: &mut tokio::net::tcp::OwnedReadHalf,
        config: &LookupConfig,
        shutdown: &CancellationToken,
    ) -> Result<(), Close> {
        let mut buffer = BytesMut::with_capacity(4096);
        // Only whole frames count as traffic: bytes dribbled in keep no connection open.
        let opened = Instant::now();
        let mut last_frame = opened;
        let mut pinged = false;
        loop {
            while let Some(frame) = meridian_wire::decode_frame(&mut buffer, config.max_frame_size)
                .map_err(|error| Close(format!("bad frame: {error}")))?
            {
                last_frame = Instant::now();
                pinged = false;
                let command = match frame {
                    meridian_wire::Frame::Simple(command) => *command,
                    meridian_wire::Frame::Payload(payload) => payload.command,
                };
                self.handle(command, shutdown).await?;
            }
            let deadline = if !self.connected {
                opened + config.connect_timeout
            } else if pinged {
                last_frame + config.keep_alive_interval * 2
            } else {
                last_frame + config.keep_alive_interval
            };
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline.into(), reader.read_buf(&mut buffer)) => read,
                _ = shutdown.cancelled() => return Err(Close("shutting down".into())),
            };
            match read {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(Close(format!("read failed: {error}"))),
                Err(_) if !self.connected => {
                    return Err(Close("no CONNECT within the connect timeout".into()))
                }
                Err(_) if pinged => return Err(Close("no frame since a PING".into())),
                Err(_) => {
                    pinged = true;
                    self.reply(BaseCommand {
                        ping: Some(CommandPing {}),
                        ..command(CommandType::Ping)
                    })
                    .await?;
                }
            }
        }
    }

    async fn handle(
        &mut self,
        base: BaseCommand,
        shutdown: &CancellationToken,
    ) -> Result<(), Close> {
        let kind = meridian_wire::command_type(&base);
        if !self.connected {
            return match (kind, base.connect) {
                (Some(CommandType::Connect), Some(connect)) => {
                    self.connected = true;
                    let version = connect.protocol_version().clamp(0, PROTOCOL_VERSION);
                    self.reply(BaseCommand {
                        connected: Some(Box::new(CommandConnected {
                            server_version: SERVER_VERSION.into(),
                            protocol_version: Some(version),
                            max_message_size: Some(meridian_wire::DEFAULT_MAX_MESSAGE_SIZE as i32),
                            feature_flags: Some(FeatureFlags::default()),
                        })),
                        ..command(CommandType::Connected)
                    })
                    .await
                }
                _ => Err(Close("the first command was not CONNECT".into())),
            };
        }
        match kind {
            Some(CommandType::Ping) => {
                self.reply(BaseCommand {
                    pong: Some(CommandPong {}),
                    ..command(CommandType::Pong)
                })
                .await
            }
            Some(CommandType::Pong) => Ok(()),
            Some(CommandType::Connect) => {
                self.reply(error(
                    0,
                    ServerError::NotAllowedError,
                    "already connected".into(),
                ))
                .await
            }
            Some(CommandType::Lookup) => {
                let Some(request) = base.lookup else {
                    return Err(Close("LOOKUP without its body".into()));
                };
                self.answer(shutdown, move |front_door| async move {
                    lookup_response(request.request_id, front_door.lookup(&request.topic).await)
                })
                .await
            }
            Some(CommandType::PartitionedMetadata) => {
                let Some(request) = base.partitioned_metadata else {
                    return Err(Close("PARTITIONED_METADATA without its body".into()));
                };
                self.answer(shutdown, move |front_door| async move {
                    metadata_response(
                        request.request_id,
                        front_door.partitions(&request.topic).await,
                    )
                })
                .await
            }
            _ => {
                let name = kind.map_or_else(
                    || format!("type {}", base.r#type),
                    |kind| kind.as_str_name().to_string(),
                );
                self.reply(error(
                    request_id_of(&base),
                    ServerError::NotAllowedError,
                    format!(
                        "{name} is not served by the lookup front door, which answers only \
                         CONNECT, PING, LOOKUP and PARTITIONED_METADATA: connect to the broker \
                         its LOOKUP names"
                    ),
                ))
                .await
            }
        }
    }

    /// Answers one request in a task of its own, once a request slot is free.
    async fn answer<F, Fut>(&self, shutdown: &CancellationToken, respond: F) -> Result<(), Close>
    where
        F: FnOnce(Arc<FrontDoor>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = BaseCommand> + Send + 'static,
    {
        let permit = tokio::select! {
            permit = self.requests.clone().acquire_owned() => permit
                .map_err(|_| Close("request slots closed".into()))?,
            _ = shutdown.cancelled() => return Err(Close("shutting down".into())),
        };
        let front_door = self.front_door.clone();
        let replies = self.replies.clone();
        tokio::spawn(async move {
            let reply = respond(front_door).await;
            // The queue has room for every request in flight: this does not wait.
            let _ = replies.send(reply).await;
            drop(permit);
        });
        Ok(())
    }

    async fn reply(&self, command: BaseCommand) -> Result<(), Close> {
        self.replies
            .send(command)
            .await
            .map_err(|_| Close("the writer stopped".into()))
    }
}

fn lookup_response(
    request_id: u64,
    answer: Result<crate::Answer, crate::LookupError>,
) -> BaseCommand {
    let response = match answer {
        Ok(answer) => CommandLookupTopicResponse {
            request_id,
            response: Some(LookupType::Connect as i32),
            broker_service_url: answer.broker_url,
            broker_service_url_tls: answer.broker_url_tls,
            authoritative: Some(true),
            ..Default::default()
        },
        Err(failure) => {
            tracing::debug!(request_id, %failure, "lookup failed");
            CommandLookupTopicResponse {
                request_id,
                response: Some(LookupType::Failed as i32),
                error: Some(failure.server_error() as i32),
                message: Some(failure.to_string()),
                ..Default::default()
            }
        }
    };
    BaseCommand {
        lookup_response: Some(Box::new(response)),
        ..command(CommandType::LookupResponse)
    }
}

fn metadata_response(request_id: u64, partitions: Result<u32, crate::LookupError>) -> BaseCommand {
    let response = match partitions {
        Ok(partitions) => CommandPartitionedTopicMetadataResponse {
            request_id,
            partitions: Some(partitions),
            response: Some(MetadataLookupType::Success as i32),
            ..Default::default()
        },
        Err(failure) => {
            tracing::debug!(request_id, %failure, "partitioned metadata failed");
            CommandPartitionedTopicMetadataResponse {
                request_id,
                response: Some(MetadataLookupType::Failed as i32),
                error: Some(failure.server_error() as i32),
                message: Some(failure.to_string()),
                ..Default::default()
            }
        }
    };
    BaseCommand {
        partitioned_metadata_response: Some(Box::new(response)),
        ..command(CommandType::PartitionedMetadataResponse)
    }
}

fn error(request_id: u64, code: ServerError, message: String) -> BaseCommand {
    BaseCommand {
        error: Some(Box::new(CommandError {
            request_id,
            error: code as i32,
            message,
        })),
        ..command(CommandType::Error)
    }
}

/// The request id of the commands a client may send here by mistake, so that its request
/// fails at once with the ERROR (0 for the rest).
fn request_id_of(base: &BaseCommand) -> u64 {
    None.or(base.producer.as_ref().map(|c| c.request_id))
        .or(base.subscribe.as_ref().map(|c| c.request_id))
        .or(base.get_topics_of_namespace.as_ref().map(|c| c.request_id))
        .or(base.get_schema.as_ref().map(|c| c.request_id))
        .or(base.get_or_create_schema.as_ref().map(|c| c.request_id))
        .or(base.unsubscribe.as_ref().map(|c| c.request_id))
        .or(base.close_producer.as_ref().map(|c| c.request_id))
        .or(base.close_consumer.as_ref().map(|c| c.request_id))
        .or(base.seek.as_ref().map(|c| c.request_id))
        .or(base.get_last_message_id.as_ref().map(|c| c.request_id))
        .unwrap_or(0)
}

fn command(kind: CommandType) -> BaseCommand {
    BaseCommand {
        r#type: kind as i32,
        ..Default::default()
    }
}

/// Writes queued replies until every sender is gone; a write that makes no progress for
/// `stall` closes the connection.
async fn write_replies(
    mut writer: OwnedWriteHalf,
    mut outbox: mpsc::Receiver<BaseCommand>,
    stall: Duration,
) {
    let mut buffer = BytesMut::with_capacity(1024);
    while let Some(reply) = outbox.recv().await {
        buffer.clear();
        if let Err(error) = meridian_wire::encode_command(&reply, &mut buffer) {
            tracing::warn!(%error, "cannot encode a lookup reply");
            continue;
        }
        match tokio::time::timeout(stall, writer.write_all(&buffer)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    let _ = writer.shutdown().await;
}
