//! A stub Pulsar broker that acknowledges every SEND at once and stores nothing. Producing to it
//! with `meridian perf produce` measures the load generator's own ceiling on this machine, which
//! tells whether a broker benchmark is limited by the broker or by the client
//! (`docs/BENCHMARKS.md`).
//!
//! ```sh
//! cargo run --release -p meridian --example stub_broker -- 16790
//! target/release/meridian perf produce --url pulsar://127.0.0.1:16790 --size 1024 --duration 10
//! ```
//!
//! It answers only what a producer needs (CONNECT, PARTITIONED_METADATA, LOOKUP, PRODUCER,
//! SEND, CLOSE_PRODUCER, PING) and ignores everything else.

use bytes::BytesMut;
use meridian_wire::proto::command_lookup_topic_response::LookupType;
use meridian_wire::proto::command_partitioned_topic_metadata_response::LookupType as MetadataLookup;
use meridian_wire::proto::{
    CommandConnected, CommandLookupTopicResponse, CommandPartitionedTopicMetadataResponse,
    CommandPong, CommandProducerSuccess, CommandSendReceipt, CommandSuccess,
};
use meridian_wire::{decode_frame, encode_command, BaseCommand, CommandType, Frame, MessageIdData};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_FRAME: usize = 6 * 1024 * 1024;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|port| port.parse().ok())
        .unwrap_or(16790);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("stub broker on pulsar://127.0.0.1:{port}: acknowledges every SEND, stores nothing");
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        tokio::spawn(serve(socket, port));
    }
}

/// Reads what has arrived, answers every complete frame, writes the answers in one go.
async fn serve(mut socket: TcpStream, port: u16) {
    let mut input = BytesMut::with_capacity(1 << 20);
    let mut output = BytesMut::with_capacity(1 << 16);
    let mut entries = 0u64;
    loop {
        match socket.read_buf(&mut input).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let frame = match decode_frame(&mut input, MAX_FRAME) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(_) => return,
            };
            let reply = match frame {
                Frame::Payload(payload) => payload.command.send.map(|send| {
                    entries += 1;
                    command(
                        CommandType::SendReceipt,
                        BaseCommand {
                            send_receipt: Some(CommandSendReceipt {
                                producer_id: send.producer_id,
                                sequence_id: send.sequence_id,
                                message_id: Some(MessageIdData {
                                    ledger_id: 1,
                                    entry_id: entries,
                                    ..MessageIdData::default()
                                }),
                                highest_sequence_id: send.highest_sequence_id,
                            }),
                            ..BaseCommand::default()
                        },
                    )
                }),
                Frame::Simple(request) => reply_to(*request, port),
            };
            if let Some(reply) = reply {
                if encode_command(&reply, &mut output).is_err() {
                    return;
                }
            }
        }
        if !output.is_empty() {
            if socket.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
        }
    }
}

fn command(kind: CommandType, body: BaseCommand) -> BaseCommand {
    BaseCommand {
        r#type: kind as i32,
        ..body
    }
}

fn reply_to(request: BaseCommand, port: u16) -> Option<BaseCommand> {
    if let Some(connect) = request.connect {
        return Some(command(
            CommandType::Connected,
            BaseCommand {
                connected: Some(Box::new(CommandConnected {
                    server_version: "meridian-stub".into(),
                    protocol_version: Some(connect.protocol_version().min(20)),
                    max_message_size: Some(5 * 1024 * 1024),
                    ..CommandConnected::default()
                })),
                ..BaseCommand::default()
            },
        ));
    }
    if let Some(metadata) = request.partitioned_metadata {
        return Some(command(
            CommandType::PartitionedMetadataResponse,
            BaseCommand {
                partitioned_metadata_response: Some(Box::new(
                    CommandPartitionedTopicMetadataResponse {
                        partitions: Some(0),
                        request_id: metadata.request_id,
                        response: Some(MetadataLookup::Success as i32),
                        ..CommandPartitionedTopicMetadataResponse::default()
                    },
                )),
                ..BaseCommand::default()
            },
        ));
    }
    if let Some(lookup) = request.lookup {
        return Some(command(
            CommandType::LookupResponse,
            BaseCommand {
                lookup_response: Some(Box::new(CommandLookupTopicResponse {
                    broker_service_url: Some(format!("pulsar://127.0.0.1:{port}")),
                    response: Some(LookupType::Connect as i32),
                    request_id: lookup.request_id,
                    authoritative: Some(true),
                    ..CommandLookupTopicResponse::default()
                })),
                ..BaseCommand::default()
            },
        ));
    }
    if let Some(producer) = request.producer {
        return Some(command(
            CommandType::ProducerSuccess,
            BaseCommand {
                producer_success: Some(Box::new(CommandProducerSuccess {
                    request_id: producer.request_id,
                    producer_name: producer
                        .producer_name
                        .unwrap_or_else(|| format!("stub-{}", producer.producer_id)),
                    last_sequence_id: Some(-1),
                    producer_ready: Some(true),
                    ..CommandProducerSuccess::default()
                })),
                ..BaseCommand::default()
            },
        ));
    }
    if let Some(close) = request.close_producer {
        return Some(command(
            CommandType::Success,
            BaseCommand {
                success: Some(Box::new(CommandSuccess {
                    request_id: close.request_id,
                    schema: None,
                })),
                ..BaseCommand::default()
            },
        ));
    }
    if request.ping.is_some() {
        return Some(command(
            CommandType::Pong,
            BaseCommand {
                pong: Some(CommandPong {}),
                ..BaseCommand::default()
            },
        ));
    }
    None
}
