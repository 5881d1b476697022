//! The accept loop both of Meridian's listeners use (the protocol port here, the HTTP port in
//! `meridian-admin`): a bound on connections served at once, a bound per IP address, and a
//! backoff when accepting fails.
//!
//! - At most `max_connections` are served at once: the loop takes a slot before it accepts,
//!   so further clients wait in the kernel's listen backlog until one closes.
//! - At most `max_connections_per_ip` of them come from one IP address; more are closed as
//!   soon as they are accepted, so one host cannot take every slot.
//! - When accepting fails (out of file descriptors), the loop pauses, doubling the pause up to
//!   a second, instead of retrying at once, and logs the failures at most once per
//!   [`ACCEPT_LOG_INTERVAL`].
//!
//! Shutdown is a cancellation token: the loop stops accepting and returns once every
//! connection's task has ended.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How many connections a listener serves.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Connections served at once from one IP address; more are closed at once (0: no limit).
    pub max_connections_per_ip: usize,
}

/// Accepts connections on `listener` within `limits` and runs `serve(stream, peer)` for each
/// in its own task, until `shutdown` is cancelled and every such task has ended. `name` tells
/// the listeners apart in the log.
pub async fn accept_loop<F, Fut>(
    name: &'static str,
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_address = PerAddress::new(limits.max_connections_per_ip);
    let mut backoff = AcceptBackoff::default();
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
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(error) => {
                // Out of descriptors (or memory): retrying at once would spin and flood the log.
                let pause = backoff.failed(name, &error);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let Some(address_slot) = per_address.claim(peer.ip()) else {
            tracing::debug!(listener = name, peer = %peer, limit = limits.max_connections_per_ip, "too many connections from this address; closed");
            drop(stream);
            continue;
        };
        let connection = serve(stream, peer);
        tracker.spawn(async move {
            connection.await;
            drop(address_slot);
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Connections per IP address, bounded.
#[derive(Clone)]
struct PerAddress {
    limit: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection's place in its address's count; released on drop.
struct AddressSlot {
    address: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerAddress {
    fn new(limit: usize) -> PerAddress {
        PerAddress {
            limit,
            counts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A slot for one more connection from `address`, unless it is at the limit (0: none).
    fn claim(&self, address: IpAddr) -> Option<AddressSlot> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = counts.entry(address).or_insert(0);
        if self.limit > 0 && *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            address,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// Failures are logged at most once per this interval (with a count of those not logged).
pub const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(10);
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Pauses between failed accepts, doubling up to [`ACCEPT_PAUSE_MAX`], and rate-limits their
/// log lines.
#[derive(Default)]
struct AcceptBackoff {
    pause: Option<Duration>,
    last_logged: Option<Instant>,
    not_logged: u64,
}

impl AcceptBackoff {
    fn succeeded(&mut self) {
        self.pause = None;
    }

    /// Logs (if due) and returns how long to wait before accepting again.
    fn failed(&mut self, name: &str, error: &std::io::Error) -> Duration {
        let pause = self
            .pause
            .map_or(ACCEPT_PAUSE_MIN, |pause| (pause * 2).min(ACCEPT_PAUSE_MAX));
        self.pause = Some(pause);
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= ACCEPT_LOG_INTERVAL);
        if due {
            tracing::warn!(listener = name, %error, not_logged = self.not_logged, pause_ms = pause.as_millis() as u64, "accept failed; pausing before accepting again");
            self.last_logged = Some(Instant::now());
            self.not_logged = 0;
        } else {
            self.not_logged += 1;
        }
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_is_limited_and_slots_come_back() {
        let per_address = PerAddress::new(2);
        let first: IpAddr = "127.0.0.1".parse().expect("address");
        let other: IpAddr = "127.0.0.2".parse().expect("address");
        let a = per_address.claim(first).expect("first");
        let _b = per_address.claim(first).expect("second");
        assert!(per_address.claim(first).is_none());
        assert!(per_address.claim(other).is_some());
        drop(a);
        assert!(per_address.claim(first).is_some());
    }

    #[test]
    fn accept_failures_back_off_and_are_logged_once_per_interval() {
        let mut backoff = AcceptBackoff::default();
        let error = std::io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..10).map(|_| backoff.failed("test", &error)).collect();
        assert_eq!(pauses[0], ACCEPT_PAUSE_MIN);
        assert_eq!(pauses[1], ACCEPT_PAUSE_MIN * 2);
        assert_eq!(*pauses.last().expect("pause"), ACCEPT_PAUSE_MAX);
        assert_eq!(backoff.not_logged, 9);
        backoff.succeeded();
        assert_eq!(backoff.failed("test", &error), ACCEPT_PAUSE_MIN);
    }
}
