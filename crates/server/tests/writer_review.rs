//! Review of issue 16's writer change: a connection's writer task yields once (`yield_now`)
//! after the first frame of a burst before it drains its queue into one `writev`. These tests
//! try to stall or reorder what it writes: on a current-thread runtime whose run queue never
//! empties, and on a multi-thread runtime where another task keeps calling `block_in_place`.
//! A hand-driven client (a plain socket) checks that a lone frame is answered with nothing
//! else going on, that receipts of many producers on one connection come back each in the
//! order of its SENDs, and that CLOSE_PRODUCER is answered after the receipts before it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meridian_broker::resources::{Policies, TenantInfo};
use meridian_broker::{Broker, BrokerConfig};
use meridian_server::ServerConfig;
use meridian_storage::{SimIo, Storage, StorageConfig};
use meridian_wire::proto::{
    base_command::Type, CommandCloseProducer, CommandConnect, CommandPing, CommandProducer,
    CommandSend, MessageMetadata,
};
use meridian_wire::{decode_frame, encode_command, encode_send_frame, BaseCommand, Frame};
use tokio_util::sync::CancellationToken;

/// Long enough that only a stall exceeds it.
const STALL: Duration = Duration::from_secs(60);

/// What keeps the server's runtime busy besides the connection.
#[derive(Clone, Copy, Debug)]
enum Runtime {
    /// One thread, and a task that yields forever: the run queue never empties.
    CurrentThreadNeverIdle,
    /// Two workers, and a task that keeps entering `block_in_place` (the worker hands its
    /// core, and whatever it deferred, to another thread each time).
    MultiThreadBlockInPlace,
}

/// A broker serving on a local port from its own thread and runtime; stopped when dropped.
struct Server {
    port: u16,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    _directory: tempfile::TempDir,
}

impl Server {
    fn start(runtime: Runtime) -> Server {
        let directory = tempfile::tempdir().expect("temporary directory");
        let metadata_path = directory.path().join("metadata");
        let shutdown = CancellationToken::new();
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let runtime_handle = match runtime {
                Runtime::CurrentThreadNeverIdle => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build(),
                Runtime::MultiThreadBlockInPlace => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build(),
            }
            .expect("runtime");
            runtime_handle.block_on(async move {
                let storage = Storage::open_with_io(
                    "/sim/storage",
                    StorageConfig {
                        flush_threads: 2,
                        ..StorageConfig::default()
                    },
                    Arc::new(SimIo::new()),
                )
                .expect("storage");
                let metadata =
                    meridian_metadata::EmbeddedStore::open(&metadata_path).expect("metadata");
                let broker =
                    Broker::new(BrokerConfig::default(), storage, metadata).expect("broker");
                broker
                    .resources()
                    .create_tenant("public", &TenantInfo::default())
                    .expect("tenant");
                broker
                    .resources()
                    .create_namespace("public", "default", &Policies::default())
                    .expect("namespace");
                let busy = token.clone();
                let noise = tokio::spawn(async move {
                    while !busy.is_cancelled() {
                        if matches!(runtime, Runtime::MultiThreadBlockInPlace) {
                            tokio::task::block_in_place(std::thread::yield_now);
                        }
                        tokio::task::yield_now().await;
                    }
                });
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let _ = port_tx.send(listener.local_addr().expect("address").port());
                let config = ServerConfig {
                    // No keep-alive ping comes to wake anything during a test.
                    keep_alive_interval: Duration::from_secs(3600),
                    ..ServerConfig::default()
                };
                meridian_server::serve(listener, broker, config, token).await;
                let _ = noise.await;
            });
        });
        let port = port_rx.recv_timeout(STALL).expect("the server starts");
        Server {
            port,
            shutdown,
            thread: Some(thread),
            _directory: directory,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            if !std::thread::panicking() {
                let _ = thread.join();
            }
        }
    }
}

/// A hand-driven protocol connection.
struct Client {
    stream: TcpStream,
    input: BytesMut,
}

fn command(kind: Type, mut base: BaseCommand) -> Vec<u8> {
    base.r#type = kind as i32;
    let mut buffer = BytesMut::new();
    encode_command(&base, &mut buffer).expect("encode");
    buffer.to_vec()
}

impl Client {
    fn connect(server: &Server) -> Client {
        let stream = TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
        // A read that waits this long means the broker never wrote what it owed.
        stream.set_read_timeout(Some(STALL)).expect("read timeout");
        let mut client = Client {
            stream,
            input: BytesMut::new(),
        };
        client.write(&command(
            Type::Connect,
            BaseCommand {
                connect: Some(Box::new(CommandConnect {
                    client_version: "writer-review".into(),
                    protocol_version: Some(20),
                    ..Default::default()
                })),
                ..Default::default()
            },
        ));
        let reply = client.read();
        assert_eq!(reply.r#type, Type::Connected as i32, "{reply:?}");
        client
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    fn read(&mut self) -> BaseCommand {
        loop {
            if let Some(frame) = decode_frame(&mut self.input, 6 * 1024 * 1024).expect("frame") {
                return match frame {
                    Frame::Simple(command) => *command,
                    Frame::Payload(payload) => payload.command,
                };
            }
            let mut chunk = [0u8; 64 * 1024];
            let read = self
                .stream
                .read(&mut chunk)
                .expect("the broker answers (a read timing out is a stall)");
            assert!(read > 0, "the broker closed the connection");
            self.input.extend_from_slice(&chunk[..read]);
        }
    }

    fn create_producer(&mut self, topic: &str, producer_id: u64) {
        self.write(&command(
            Type::Producer,
            BaseCommand {
                producer: Some(Box::new(CommandProducer {
                    topic: topic.into(),
                    producer_id,
                    request_id: producer_id,
                    producer_name: Some(format!("p{producer_id}")),
                    ..Default::default()
                })),
                ..Default::default()
            },
        ));
        let reply = self.read();
        assert!(reply.producer_success.is_some(), "{reply:?}");
    }
}

fn send_frame(producer_id: u64, sequence_id: u64) -> Vec<u8> {
    let metadata = MessageMetadata {
        producer_name: format!("p{producer_id}"),
        sequence_id,
        publish_time: 1,
        ..Default::default()
    };
    let send = CommandSend {
        producer_id,
        sequence_id,
        ..Default::default()
    };
    encode_send_frame(send, &metadata, format!("m{sequence_id}").as_bytes())
        .expect("encode SEND")
        .to_bytes()
        .to_vec()
}

const RUNTIMES: [Runtime; 2] = [
    Runtime::CurrentThreadNeverIdle,
    Runtime::MultiThreadBlockInPlace,
];

/// A lone PING, with no other frame, timer or connection to wake the writer after its yield:
/// the PONG comes back. Repeated, so that some land while the runtime is busiest.
#[test]
fn a_lone_frame_is_written_with_nothing_else_going_on() {
    for runtime in RUNTIMES {
        let server = Server::start(runtime);
        let mut client = Client::connect(&server);
        for _ in 0..200 {
            client.write(&command(
                Type::Ping,
                BaseCommand {
                    ping: Some(CommandPing {}),
                    ..Default::default()
                },
            ));
            let reply = client.read();
            assert_eq!(reply.r#type, Type::Pong as i32, "{runtime:?}: {reply:?}");
        }
    }
}

/// Many producers on one connection, over two topics, with their SENDs interleaved and
/// pipelined: each producer's receipts come back in the order of its SENDs, every one of them,
/// and a CLOSE_PRODUCER sent right after a producer's last SEND is answered after all of that
/// producer's receipts.
#[test]
fn receipts_of_many_producers_keep_each_producers_order_and_close_comes_after_them() {
    const PRODUCERS: u64 = 8;
    const SENDS: u64 = 300;
    for runtime in RUNTIMES {
        let server = Server::start(runtime);
        let mut client = Client::connect(&server);
        for producer_id in 1..=PRODUCERS {
            let topic = format!(
                "persistent://public/default/writer-review-{}",
                producer_id % 2
            );
            client.create_producer(&topic, producer_id);
        }
        let mut frames = Vec::new();
        for sequence_id in 0..SENDS {
            for producer_id in 1..=PRODUCERS {
                frames.extend(send_frame(producer_id, sequence_id));
            }
        }
        for producer_id in 1..=PRODUCERS {
            frames.extend(command(
                Type::CloseProducer,
                BaseCommand {
                    close_producer: Some(Box::new(CommandCloseProducer {
                        producer_id,
                        request_id: 1000 + producer_id,
                        ..Default::default()
                    })),
                    ..Default::default()
                },
            ));
        }
        // Written from another thread: the pipeline is larger than the socket buffers, and
        // the receipts must be read meanwhile.
        let mut writer = client.stream.try_clone().expect("clone socket");
        let writing = std::thread::spawn(move || writer.write_all(&frames));
        let mut next = vec![0u64; PRODUCERS as usize + 1];
        let mut closed = vec![false; PRODUCERS as usize + 1];
        while closed[1..].iter().any(|closed| !closed) {
            let reply = client.read();
            if let Some(receipt) = &reply.send_receipt {
                let producer = receipt.producer_id as usize;
                assert!(
                    !closed[producer],
                    "{runtime:?}: a receipt after CLOSE_PRODUCER's answer"
                );
                assert_eq!(
                    receipt.sequence_id, next[producer],
                    "{runtime:?}: producer {producer}'s receipts out of order"
                );
                next[producer] += 1;
            } else if let Some(success) = &reply.success {
                let producer = (success.request_id - 1000) as usize;
                assert_eq!(
                    next[producer], SENDS,
                    "{runtime:?}: CLOSE_PRODUCER answered before producer {producer}'s receipts"
                );
                closed[producer] = true;
            } else {
                panic!("{runtime:?}: unexpected reply {reply:?}");
            }
        }
        writing
            .join()
            .expect("writer thread")
            .expect("the pipeline is written");
    }
}
