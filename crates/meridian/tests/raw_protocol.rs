//! Protocol-level tests that need control no client library gives: frames written by hand on a
//! plain socket, pipelined and abandoned at chosen moments, against a real broker process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{Admin, BrokerProcess};
use meridian_wire::proto::{
    base_command::Type, command_ack, CommandAck, CommandCloseProducer, CommandConnect,
    CommandProducer, CommandSend, CommandSubscribe, MessageIdData, MessageMetadata,
};
use meridian_wire::{
    decode_frame, encode_command, encode_send_frame, BaseCommand, Frame, ServerError,
};

/// A hand-driven protocol connection.
struct RawConnection {
    stream: TcpStream,
    input: BytesMut,
}

impl RawConnection {
    fn connect(broker: &BrokerProcess) -> RawConnection {
        let stream = TcpStream::connect(("127.0.0.1", broker.broker_port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let mut connection = RawConnection {
            stream,
            input: BytesMut::new(),
        };
        connection.write(&command(
            Type::Connect,
            BaseCommand {
                connect: Some(Box::new(CommandConnect {
                    client_version: "raw-protocol-test".into(),
                    protocol_version: Some(20),
                    ..Default::default()
                })),
                ..Default::default()
            },
        ));
        let reply = connection.read();
        assert_eq!(reply.r#type, Type::Connected as i32, "{reply:?}");
        connection
    }

    fn write(&mut self, frame: &[u8]) {
        self.stream.write_all(frame).expect("write");
    }

    /// Writes from another thread, so that a long pipeline cannot deadlock against replies
    /// this side has not read yet.
    fn write_in_background(&self, frames: Vec<u8>) -> std::thread::JoinHandle<()> {
        let mut stream = self.stream.try_clone().expect("clone socket");
        std::thread::spawn(move || {
            // The broker may see the connection go away first; that is the test's business.
            let _ = stream.write_all(&frames);
        })
    }

    /// The next frame's command.
    fn read(&mut self) -> BaseCommand {
        loop {
            if let Some(frame) = decode_frame(&mut self.input, 6 * 1024 * 1024).expect("frame") {
                return match frame {
                    Frame::Simple(command) => *command,
                    Frame::Payload(payload) => payload.command,
                };
            }
            let mut chunk = [0u8; 64 * 1024];
            let read = self.stream.read(&mut chunk).expect("read");
            assert!(read > 0, "the broker closed the connection");
            self.input.extend_from_slice(&chunk[..read]);
        }
    }

    /// Creates a producer and returns the last sequence id the broker knows for its name. A
    /// name still held by a connection the broker has not finished closing is retried, as
    /// clients do.
    fn create_producer(&mut self, topic: &str, name: &str) -> i64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        for request_id in 1.. {
            self.write(&command(
                Type::Producer,
                BaseCommand {
                    producer: Some(Box::new(CommandProducer {
                        topic: topic.into(),
                        producer_id: 1,
                        request_id,
                        producer_name: Some(name.into()),
                        ..Default::default()
                    })),
                    ..Default::default()
                },
            ));
            let reply = self.read();
            if let Some(success) = reply.producer_success {
                return success.last_sequence_id.unwrap_or(-1);
            }
            let busy = reply
                .error
                .as_ref()
                .is_some_and(|error| error.error == ServerError::ProducerBusy as i32);
            assert!(
                busy && Instant::now() < deadline,
                "PRODUCER refused: {reply:?}"
            );
        }
        unreachable!()
    }

    /// Subscribes (Exclusive) and waits for the broker's SUCCESS.
    fn subscribe(&mut self, topic: &str, subscription: &str, consumer_id: u64) {
        self.write(&command(
            Type::Subscribe,
            BaseCommand {
                subscribe: Some(Box::new(CommandSubscribe {
                    topic: topic.into(),
                    subscription: subscription.into(),
                    consumer_id,
                    request_id: 100 + consumer_id,
                    ..Default::default()
                })),
                ..Default::default()
            },
        ));
        let reply = self.read();
        assert!(reply.success.is_some(), "SUBSCRIBE refused: {reply:?}");
    }
}

fn command(kind: Type, mut base: BaseCommand) -> Vec<u8> {
    base.r#type = kind as i32;
    let mut buffer = BytesMut::new();
    encode_command(&base, &mut buffer).expect("encode");
    buffer.to_vec()
}

fn send_frame(name: &str, sequence_id: u64) -> Vec<u8> {
    let metadata = MessageMetadata {
        producer_name: name.into(),
        sequence_id,
        publish_time: 1,
        ..Default::default()
    };
    let send = CommandSend {
        producer_id: 1,
        sequence_id,
        ..Default::default()
    };
    let frame = encode_send_frame(send, &metadata, format!("m{sequence_id}").as_bytes())
        .expect("encode SEND");
    frame.to_bytes().to_vec()
}

/// A connection that drops with thousands of sends in flight must not leave the topic's
/// de-duplication state waiting for receipts that will never be sent: the producer, back under
/// the same name, resends and is answered (a duplicate is acknowledged), never told forever that
/// its messages "may still be in flight".
#[test]
fn sends_in_flight_when_the_connection_drops_are_still_accounted_for() {
    let broker = BrokerProcess::start_with_env(&[], &[("MERIDIAN_DEDUPLICATION_ENABLED", "true")]);
    let topic = "persistent://public/default/dropped-with-sends-in-flight";
    let name = "dropping-producer";
    const SENDS: u64 = 3000;

    let mut first = RawConnection::connect(&broker);
    first.create_producer(topic, name);
    let pipelined: Vec<u8> = (0..SENDS)
        .flat_map(|sequence| send_frame(name, sequence))
        .collect();
    let _writer = first.write_in_background(pipelined);
    // Read a few receipts so that the broker is surely working through the pipeline, then
    // vanish without reading the rest.
    for _ in 0..3 {
        let reply = first.read();
        assert!(reply.send_receipt.is_some(), "{reply:?}");
    }
    drop(first);

    // Back under the same name, the producer learns the last sequence id the broker took and
    // resends everything up to it: each resend must end with a receipt (a duplicate), never with
    // an endless "may still be in flight". (Nothing new is sent: a newer stored message would
    // paper over the bookkeeping of the older ones.)
    let mut again = RawConnection::connect(&broker);
    let last = again.create_producer(topic, name);
    assert!(
        last >= 2,
        "the broker acknowledged sequences 0..=2, yet reports {last}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut unanswered: Vec<u64> = (0..=last.unsigned_abs()).collect();
    while !unanswered.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} resends are still refused as possibly in flight, e.g. sequence {}",
            unanswered.len(),
            unanswered[0]
        );
        let resend: Vec<u8> = unanswered
            .iter()
            .flat_map(|&sequence| send_frame(name, sequence))
            .collect();
        let writer = again.write_in_background(resend);
        let mut refused = Vec::new();
        for &sequence in &unanswered {
            let reply = again.read();
            match (reply.send_receipt, reply.send_error) {
                (Some(receipt), None) => assert_eq!(receipt.sequence_id, sequence),
                (None, Some(error)) => {
                    assert_eq!(error.sequence_id, sequence);
                    refused.push(sequence);
                }
                _ => panic!("unexpected reply {:?}", reply.r#type),
            }
        }
        writer.join().expect("writer");
        unanswered = refused;
    }
    broker.assert_no_errors();
}

/// A producer closed with sends in flight gets every receipt before the close's SUCCESS, as
/// from Pulsar: a client fails the sends still without a receipt when the close succeeds, so a
/// receipt that came after it would turn a stored message into a reported failure (and the
/// application's retry into a duplicate).
#[test]
fn closing_a_producer_answers_after_the_receipts_of_its_sends_in_flight() {
    let broker = BrokerProcess::start(&[]);
    let topic = "persistent://public/default/closed-with-sends-in-flight";
    let name = "closing-producer";
    const SENDS: u64 = 200;
    const CLOSE_REQUEST: u64 = 1000;

    let mut connection = RawConnection::connect(&broker);
    connection.create_producer(topic, name);
    let mut frames: Vec<u8> = (0..SENDS)
        .flat_map(|sequence| send_frame(name, sequence))
        .collect();
    frames.extend(command(
        Type::CloseProducer,
        BaseCommand {
            close_producer: Some(Box::new(CommandCloseProducer {
                producer_id: 1,
                request_id: CLOSE_REQUEST,
                ..Default::default()
            })),
            ..Default::default()
        },
    ));
    let writer = connection.write_in_background(frames);
    let mut receipts = 0;
    loop {
        let reply = connection.read();
        if let Some(receipt) = reply.send_receipt {
            assert_eq!(receipt.sequence_id, receipts, "receipts out of order");
            receipts += 1;
            continue;
        }
        let success = reply.success.expect("a receipt or the close's SUCCESS");
        assert_eq!(success.request_id, CLOSE_REQUEST);
        break;
    }
    writer.join().expect("writer");
    assert_eq!(
        receipts, SENDS,
        "the close was answered before the receipts of the sends made before it"
    );
    broker.assert_no_errors();
}

/// The `pulsar` crate acknowledges a batch message by message, each ACK naming the batch's
/// entry, and the broker settles the repeats of one read without its locks. ACKs written
/// together must still each count for the consumer and the entry they name: two subscriptions'
/// ACKs of the same entry, and one consumer's ACKs of two entries, each repeated.
#[test]
fn acknowledgements_written_together_count_for_each_consumer_and_entry_they_name() {
    let broker = BrokerProcess::start(&[]);
    let admin = Admin::new(&broker);
    let topic = "persistent://public/default/acks-written-together";
    let name = "acked-producer";

    let mut connection = RawConnection::connect(&broker);
    for (consumer_id, subscription) in [(1, "a"), (2, "b")] {
        connection.subscribe(topic, subscription, consumer_id);
    }
    connection.create_producer(topic, name);
    let mut entries = Vec::new();
    for sequence in 0..3 {
        connection.write(&send_frame(name, sequence));
        let receipt = connection.read().send_receipt.expect("a receipt");
        let id = receipt.message_id.expect("the stored message's id");
        entries.push((id.ledger_id, id.entry_id));
    }
    let [first, second, _third] = entries[..] else {
        unreachable!()
    };

    // Subscription a acknowledges the first entry; b the first two. Each ACK names one message
    // of a batch of 3 (as the crate's do), all in one write: b's ACKs of the first entry follow
    // a's of the same entry, and b's of the second follow its own of the first.
    let mut frames = Vec::new();
    for (consumer_id, entry) in [(1, first), (2, first), (2, second)] {
        for batch_index in 0..3 {
            frames.extend(ack_frame(consumer_id, entry, batch_index, None));
        }
    }
    // Answered once the broker has handled everything before it (and changes nothing).
    frames.extend(ack_frame(1, first, 0, Some(7)));
    connection.write(&frames);
    let response = connection.read().ack_response.expect("ACK_RESPONSE");
    assert_eq!((response.request_id, response.error), (Some(7), None));

    let stats =
        admin.ok(admin.get("/admin/v2/persistent/public/default/acks-written-together/stats"));
    let backlog = |subscription: &str| stats["subscriptions"][subscription]["msgBacklog"].clone();
    assert_eq!(
        (backlog("a"), backlog("b")),
        (serde_json::json!(2), serde_json::json!(1)),
        "backlogs of a and b after a acknowledged one entry of three and b two: {stats}"
    );
    broker.assert_no_errors();
}

/// An individual ACK of one message of a batch entry, with a request id if given.
fn ack_frame(
    consumer_id: u64,
    (ledger_id, entry_id): (u64, u64),
    batch_index: i32,
    request_id: Option<u64>,
) -> Vec<u8> {
    command(
        Type::Ack,
        BaseCommand {
            ack: Some(CommandAck {
                consumer_id,
                ack_type: command_ack::AckType::Individual as i32,
                message_id: vec![MessageIdData {
                    ledger_id,
                    entry_id,
                    batch_index: Some(batch_index),
                    batch_size: Some(3),
                    ..Default::default()
                }],
                request_id,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}
