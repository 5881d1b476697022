//! Meridian's Pulsar protocol server: the TCP listener and one task per connection.
//!
//! The listener bounds the number of connections with a semaphore; shutdown is a cancellation
//! token: the listener stops accepting, every connection stops reading, releases its producers
//! and consumers and drains its outbound queue, and [`serve`] returns once all are done.

mod connection;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meridian_broker::Broker;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use connection::{DEFAULT_KEEP_ALIVE, PROTOCOL_VERSION};

/// Limits of the protocol server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest frame accepted; a larger one closes the connection (Pulsar: max message size
    /// plus 10 KiB of padding).
    pub max_frame_size: usize,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Idle time before the broker pings a client; twice this without traffic closes it.
    pub keep_alive_interval: Duration,
    /// Frames queued for one connection's socket before senders wait.
    pub outbound_queue_frames: usize,
    /// SENDs of one producer awaiting their receipt before the connection stops reading.
    pub max_pending_sends_per_producer: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_frame_size: meridian_wire::DEFAULT_MAX_FRAME_SIZE,
            max_connections: 10_000,
            keep_alive_interval: DEFAULT_KEEP_ALIVE,
            outbound_queue_frames: 4096,
            max_pending_sends_per_producer: 1000,
        }
    }
}

/// Serves Pulsar clients on `listener` until `shutdown` is cancelled and every connection has
/// closed.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: ServerConfig,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer): (_, SocketAddr) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                continue;
            }
        };
        let broker = broker.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            connection::run(stream, peer, broker, config, shutdown).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}
