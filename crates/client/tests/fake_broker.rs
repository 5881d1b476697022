//! The client against scripted fake brokers, for behaviour a real broker
//! does not show on demand: lookup redirects, out-of-order receipts,
//! SEND_ERROR, broker-initiated PING. Each fake serves the Pulsar protocol
//! through `meridian_wire` on a loopback port and answers the way its test
//! script says.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meridian_client::{Client, Error};
use meridian_wire::proto::command_lookup_topic_response::LookupType;
use meridian_wire::proto::{
    CommandConnected, CommandLookupTopicResponse, CommandPartitionedTopicMetadataResponse,
    CommandPing, CommandPong, CommandProducerSuccess, CommandSendError, CommandSendReceipt,
    CommandSuccess, MessageIdData,
};
use meridian_wire::{
    command_type, decode_frame, encode_command, BaseCommand, CommandType, Frame, ServerError,
    DEFAULT_MAX_FRAME_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PATIENCE: Duration = Duration::from_secs(20);

/// What a fake does after a frame.
enum Action {
    Reply(BaseCommand),
}

/// A script: given the connection's number (1, 2, ...) and a frame, what to do.
type Script = Arc<dyn Fn(usize, &Frame) -> Vec<Action> + Send + Sync>;

fn command(kind: CommandType) -> BaseCommand {
    BaseCommand {
        r#type: kind as i32,
        ..BaseCommand::default()
    }
}

/// Starts a fake broker; returns its `host:port`.
async fn fake_broker(
    script: impl Fn(&str, usize, &Frame) -> Vec<Action> + Send + Sync + 'static,
) -> String {
    fake_broker_counting_closes(script, Arc::new(Mutex::new(0))).await
}

/// Starts a fake broker that counts the connections its clients closed.
async fn fake_broker_counting_closes(
    script: impl Fn(&str, usize, &Frame) -> Vec<Action> + Send + Sync + 'static,
    closed_by_client: Arc<Mutex<usize>>,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let own_address = address.clone();
    let script: Script = Arc::new(move |connection, frame| script(&own_address, connection, frame));
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((stream, _)) = listener.accept().await {
            connections += 1;
            let script = script.clone();
            let closed_by_client = closed_by_client.clone();
            let number = connections;
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.into_split();
                let mut buffer = BytesMut::new();
                loop {
                    while let Ok(Some(frame)) = decode_frame(&mut buffer, DEFAULT_MAX_FRAME_SIZE) {
                        for action in script(number, &frame) {
                            let Action::Reply(reply) = action;
                            let mut out = BytesMut::new();
                            encode_command(&reply, &mut out).expect("encode");
                            if writer.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    }
                    match reader.read_buf(&mut buffer).await {
                        Ok(0) | Err(_) => {
                            *closed_by_client.lock().expect("lock") += 1;
                            return;
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    address
}

/// The answers every fake gives: handshake, "not partitioned", "I own it",
/// producer success, PONG, and success for closes.
fn standard(address: &str, frame: &Frame) -> Vec<Action> {
    let base = frame.command();
    let reply = match command_type(base) {
        Some(CommandType::Connect) => BaseCommand {
            connected: Some(Box::new(CommandConnected {
                server_version: "fake".into(),
                protocol_version: Some(20),
                max_message_size: Some(1 << 20),
                feature_flags: None,
            })),
            ..command(CommandType::Connected)
        },
        Some(CommandType::PartitionedMetadata) => BaseCommand {
            partitioned_metadata_response: Some(Box::new(
                CommandPartitionedTopicMetadataResponse {
                    partitions: Some(0),
                    request_id: base
                        .partitioned_metadata
                        .as_ref()
                        .map_or(0, |m| m.request_id),
                    response: Some(0),
                    ..Default::default()
                },
            )),
            ..command(CommandType::PartitionedMetadataResponse)
        },
        Some(CommandType::Lookup) => lookup_reply(base, LookupType::Connect, address, true),
        Some(CommandType::Producer) => BaseCommand {
            producer_success: Some(Box::new(CommandProducerSuccess {
                request_id: base.producer.as_ref().map_or(0, |p| p.request_id),
                producer_name: "fake-producer".into(),
                last_sequence_id: Some(-1),
                ..Default::default()
            })),
            ..command(CommandType::ProducerSuccess)
        },
        Some(CommandType::Ping) => BaseCommand {
            pong: Some(CommandPong {}),
            ..command(CommandType::Pong)
        },
        Some(CommandType::CloseProducer) => BaseCommand {
            success: Some(Box::new(CommandSuccess {
                request_id: base.close_producer.as_ref().map_or(0, |c| c.request_id),
                schema: None,
            })),
            ..command(CommandType::Success)
        },
        _ => return Vec::new(),
    };
    vec![Action::Reply(reply)]
}

fn lookup_reply(
    base: &BaseCommand,
    response: LookupType,
    target: &str,
    authoritative: bool,
) -> BaseCommand {
    BaseCommand {
        lookup_response: Some(Box::new(CommandLookupTopicResponse {
            broker_service_url: Some(format!("pulsar://{target}")),
            response: Some(response as i32),
            request_id: base.lookup.as_ref().map_or(0, |l| l.request_id),
            authoritative: Some(authoritative),
            ..Default::default()
        })),
        ..command(CommandType::LookupResponse)
    }
}

fn receipt(sequence_id: u64, entry_id: u64) -> Action {
    Action::Reply(BaseCommand {
        send_receipt: Some(CommandSendReceipt {
            producer_id: 0,
            sequence_id,
            message_id: Some(MessageIdData {
                ledger_id: 7,
                entry_id,
                ..Default::default()
            }),
            highest_sequence_id: Some(sequence_id),
        }),
        ..command(CommandType::SendReceipt)
    })
}

async fn client(address: &str) -> Client {
    Client::builder(format!("pulsar://{address}"))
        .operation_timeout(Duration::from_secs(5))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(100))
        .max_lookup_redirects(3)
        .build()
        .await
        .expect("client")
}

#[tokio::test]
async fn lookup_follows_redirects_and_passes_authoritative_on() {
    let seen_authoritative = Arc::new(Mutex::new(Vec::new()));
    let seen = seen_authoritative.clone();
    let owner = fake_broker(move |address, _, frame| {
        if let Some(lookup) = &frame.command().lookup {
            seen.lock().expect("lock").push(lookup.authoritative());
        }
        standard(address, frame)
    })
    .await;
    let target = owner.clone();
    let front = fake_broker(
        move |address, _, frame| match command_type(frame.command()) {
            Some(CommandType::Lookup) => vec![Action::Reply(lookup_reply(
                frame.command(),
                LookupType::Redirect,
                &target,
                true,
            ))],
            _ => standard(address, frame),
        },
    )
    .await;
    let client = client(&front).await;
    let broker = client.lookup("t").await.expect("lookup");
    assert_eq!(broker, owner);
    assert_eq!(*seen_authoritative.lock().expect("lock"), vec![true]);
}

#[tokio::test]
async fn endless_redirects_end_in_an_error() {
    let looping = fake_broker(|address, _, frame| match command_type(frame.command()) {
        Some(CommandType::Lookup) => vec![Action::Reply(lookup_reply(
            frame.command(),
            LookupType::Redirect,
            address,
            false,
        ))],
        _ => standard(address, frame),
    })
    .await;
    let client = client(&looping).await;
    let result = client.lookup("t").await;
    assert!(
        matches!(
            result,
            Err(Error::TooManyRedirects {
                max_redirects: 3,
                ..
            })
        ),
        "{result:?}"
    );
}

/// Every SEND the fake saw: (connection number, sequence id, entry bytes).
type Sends = Arc<Mutex<Vec<(usize, u64, Bytes)>>>;

fn record_send(sends: &Sends, connection: usize, frame: &Frame) -> Option<u64> {
    let Frame::Payload(payload) = frame else {
        return None;
    };
    let send = payload.command.send.as_ref()?;
    sends
        .lock()
        .expect("lock")
        .push((connection, send.sequence_id, payload.entry.bytes.clone()));
    Some(send.sequence_id)
}

/// Whether the fake saw exactly one SEND so far (the one just recorded).
fn first_send(sends: &Sends) -> bool {
    sends.lock().expect("lock").len() == 1
}

/// The producer was closed on the broker and created again on the same connection, and the
/// message resent: the connection, shared with other producers, stayed up.
fn assert_recreated_on_the_same_connection(sends: &Sends, closes: &Arc<Mutex<usize>>) {
    let sends = sends.lock().expect("lock").clone();
    assert!(sends.len() >= 2, "{sends:?}");
    let (first_connection, first_sequence, first_bytes) = &sends[0];
    let (last_connection, last_sequence, last_bytes) = &sends[sends.len() - 1];
    assert_eq!(
        first_connection, last_connection,
        "resent on the same connection"
    );
    assert_eq!(first_sequence, last_sequence, "the original sequence id");
    assert_eq!(first_bytes, last_bytes, "the same entry, byte for byte");
    assert_eq!(
        *closes.lock().expect("lock"),
        1,
        "CLOSE_PRODUCER before re-creating"
    );
}

/// Counts CLOSE_PRODUCER commands.
fn count_close_producer(closes: &Arc<Mutex<usize>>, frame: &Frame) {
    if command_type(frame.command()) == Some(CommandType::CloseProducer) {
        *closes.lock().expect("lock") += 1;
    }
}

#[tokio::test]
async fn an_out_of_order_receipt_recreates_the_producer_and_resends() {
    let sends: Sends = Arc::new(Mutex::new(Vec::new()));
    let closes = Arc::new(Mutex::new(0));
    let (recorded, counted) = (sends.clone(), closes.clone());
    let broker = fake_broker(move |address, connection, frame| {
        count_close_producer(&counted, frame);
        match record_send(&recorded, connection, frame) {
            // First send: acknowledge a message that was never sent.
            Some(sequence_id) if first_send(&recorded) => vec![receipt(sequence_id + 5, 0)],
            Some(sequence_id) => vec![receipt(sequence_id, 42)],
            None => standard(address, frame),
        }
    })
    .await;
    let client = client(&broker).await;
    let producer = client.producer("t").create().await.expect("producer");
    assert_eq!(producer.name(), "fake-producer");
    let id = tokio::time::timeout(PATIENCE, producer.send_and_wait("hello"))
        .await
        .expect("resent and acknowledged")
        .expect("send");
    assert_eq!((id.ledger_id, id.entry_id), (7, 42));
    assert_recreated_on_the_same_connection(&sends, &closes);
}

#[tokio::test]
async fn a_send_error_recreates_only_that_producer_and_resends() {
    let sends: Sends = Arc::new(Mutex::new(Vec::new()));
    let closes = Arc::new(Mutex::new(0));
    let (recorded, counted) = (sends.clone(), closes.clone());
    let broker = fake_broker(move |address, connection, frame| {
        count_close_producer(&counted, frame);
        match record_send(&recorded, connection, frame) {
            Some(sequence_id) if first_send(&recorded) => vec![Action::Reply(BaseCommand {
                send_error: Some(Box::new(CommandSendError {
                    producer_id: 0,
                    sequence_id,
                    error: ServerError::PersistenceError as i32,
                    message: "disk on fire".into(),
                })),
                ..command(CommandType::SendError)
            })],
            Some(sequence_id) => vec![receipt(sequence_id, 9)],
            None => standard(address, frame),
        }
    })
    .await;
    let client = client(&broker).await;
    let producer = client.producer("t").create().await.expect("producer");
    let id = tokio::time::timeout(PATIENCE, producer.send_and_wait("again"))
        .await
        .expect("resent")
        .expect("send");
    assert_eq!(id.entry_id, 9);
    assert_recreated_on_the_same_connection(&sends, &closes);
}

#[tokio::test]
async fn a_checksum_error_fails_only_that_message() {
    let broker = fake_broker(move |address, _, frame| match frame {
        Frame::Payload(payload) => {
            let sequence_id = payload
                .command
                .send
                .as_ref()
                .map_or(0, |send| send.sequence_id);
            if sequence_id == 0 {
                vec![Action::Reply(BaseCommand {
                    send_error: Some(Box::new(CommandSendError {
                        producer_id: 0,
                        sequence_id,
                        error: ServerError::ChecksumError as i32,
                        message: "corrupt".into(),
                    })),
                    ..command(CommandType::SendError)
                })]
            } else {
                vec![receipt(sequence_id, sequence_id)]
            }
        }
        _ => standard(address, frame),
    })
    .await;
    let client = client(&broker).await;
    let producer = client.producer("t").create().await.expect("producer");
    let first = producer.send_and_wait("corrupted").await;
    assert_eq!(
        first.err().and_then(|error| error.server_error()),
        Some(ServerError::ChecksumError)
    );
    let second = producer.send_and_wait("fine").await.expect("second send");
    assert_eq!(second.entry_id, 1);
}

#[tokio::test]
async fn the_client_answers_ping_with_pong() {
    let pongs = Arc::new(Mutex::new(0usize));
    let counted = pongs.clone();
    let broker = fake_broker(
        move |address, _, frame| match command_type(frame.command()) {
            // Ping the client as soon as it has connected.
            Some(CommandType::Connect) => {
                let mut actions = standard(address, frame);
                actions.push(Action::Reply(BaseCommand {
                    ping: Some(CommandPing {}),
                    ..command(CommandType::Ping)
                }));
                actions
            }
            Some(CommandType::Pong) => {
                *counted.lock().expect("lock") += 1;
                Vec::new()
            }
            _ => standard(address, frame),
        },
    )
    .await;
    let client = client(&broker).await;
    client.partitions("t").await.expect("partitions");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while *pongs.lock().expect("lock") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no PONG");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_silent_broker_is_dropped_by_keep_alive() {
    // Answers requests but never PING: once nothing at all has arrived for
    // two keep-alive intervals, the client must close the connection.
    let closed_by_client = Arc::new(Mutex::new(0usize));
    let broker = fake_broker_counting_closes(
        |address, _, frame| match command_type(frame.command()) {
            Some(CommandType::Ping) => Vec::new(),
            _ => standard(address, frame),
        },
        closed_by_client.clone(),
    )
    .await;
    let client = Client::builder(format!("pulsar://{broker}"))
        .keep_alive_interval(Duration::from_millis(100))
        .build()
        .await
        .expect("client");
    client.partitions("t").await.expect("first request");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while *closed_by_client.lock().expect("lock") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent connection was never closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The next request opens a new connection.
    client
        .partitions("t")
        .await
        .expect("request on a new connection");
}

#[tokio::test]
async fn with_stop_on_failure_nothing_is_sent_after_a_failed_message() {
    let sends: Sends = Arc::new(Mutex::new(Vec::new()));
    let recorded = sends.clone();
    let broker = fake_broker(move |address, connection, frame| {
        match record_send(&recorded, connection, frame) {
            Some(sequence_id) => vec![receipt(sequence_id, sequence_id)],
            None => standard(address, frame),
        }
    })
    .await;
    let client = client(&broker).await;
    let producer = client
        .producer("t")
        .stop_on_failure()
        .create()
        .await
        .expect("producer");
    // Queued back to back, as a pipelining caller does, before any outcome is known.
    let fits = producer.send("fits").await.expect("queued");
    let too_large = producer
        .send(vec![0u8; (1 << 20) + 1])
        .await
        .expect("queued");
    let after = producer.send("after").await.expect("queued");
    assert_eq!(fits.await.expect("first send").entry_id, 0);
    assert!(matches!(
        too_large.await,
        Err(Error::MessageTooLarge { .. })
    ));
    assert!(
        after.await.is_err(),
        "a message after the failed one was sent"
    );
    assert!(producer.send_and_wait("later").await.is_err());
    let sent: Vec<u64> = sends
        .lock()
        .expect("lock")
        .iter()
        .map(|send| send.1)
        .collect();
    assert_eq!(
        sent,
        vec![0],
        "only the message before the failure reached the broker"
    );
}
