//! Test fixtures: a real etcd process on free loopback ports with a temporary data directory,
//! and a TCP proxy that can cut a client off from it (a network partition).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a condition is awaited before the test fails (the machine may be busy).
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `condition` until it returns `Some`, failing the test with `what` after [`WAIT`].
pub fn wait_until<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port for an etcd the tests start: from 20000–25999, below Linux's ephemeral range
/// (32768 and up), so that no port the kernel hands out meanwhile (to a client connection, or to
/// another test's `bind(0)`) can take it before etcd binds it — not even while a stopped etcd
/// waits to be started again on the same ports — and from a per-process counter, so that two
/// tests running at once never pick the same one. `crates/objstore`'s fixture uses 26000–31999.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = std::process::id() % 6_000;
    loop {
        let offset = u32::from(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = 20_000 + (start + offset) % 6_000;
        let port = u16::try_from(port).expect("below 26000");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The etcd binary: `ETCD_BIN`, else `etcd` on `PATH`. `None` when the tests are to be skipped.
fn etcd_binary() -> Option<PathBuf> {
    if std::env::var("MERIDIAN_SKIP_ETCD_TESTS").as_deref() == Ok("1") {
        eprintln!("MERIDIAN_SKIP_ETCD_TESTS=1: skipping a test that needs a real etcd");
        return None;
    }
    let found = match std::env::var_os("ETCD_BIN") {
        Some(path) => Some(PathBuf::from(path)).filter(|path| path.is_file()),
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|directory| directory.join("etcd"))
                .find(|candidate| candidate.is_file())
        }),
    };
    match found {
        Some(path) => Some(path),
        None => panic!(
            "these tests need a real etcd server and none was found (ETCD_BIN={:?}, else `etcd` \
             on PATH): install the Debian package etcd-server (scripts/test.sh does), or set \
             ETCD_BIN, or set MERIDIAN_SKIP_ETCD_TESTS=1 to skip them",
            std::env::var_os("ETCD_BIN")
        ),
    }
}

/// A real etcd server, killed by PID when dropped.
pub struct Etcd {
    binary: PathBuf,
    directory: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Starts etcd and waits until it is healthy; `None` when the tests are skipped.
    pub fn start() -> Option<Etcd> {
        let binary = etcd_binary()?;
        let mut etcd = Etcd {
            binary,
            directory: tempfile::tempdir().expect("temporary directory"),
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
        };
        etcd.launch();
        Some(etcd)
    }

    /// `etcd://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.address())
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn log_path(&self) -> PathBuf {
        self.directory.path().join("etcd.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.directory.path().join("data")
    }

    fn launch(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new(&self.binary)
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", self.binary.display()));
        self.child = Some(child);
        self.wait_healthy(&client);
    }

    fn wait_healthy(&mut self, client: &str) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(2))
            .build();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "etcd exited with {status} while starting; its log:\n{}",
                    log_tail(&self.log_path())
                );
            }
            let healthy = agent
                .get(&format!("{client}/health"))
                .call()
                .ok()
                .and_then(|response| response.into_string().ok())
                .is_some_and(|body| body.contains("\"true\""));
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy; its log:\n{}",
                log_tail(&self.log_path())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Compacts the key history up to `revision`: watches from older revisions can no longer
    /// replay it.
    pub fn compact(&self, revision: u64) {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build()
            .post(&format!("http://{}/v3/kv/compaction", self.address()))
            .send_string(&format!(r#"{{"revision":"{revision}","physical":true}}"#))
            .expect("compact");
    }

    /// Kills the process (SIGKILL, by PID: a crash) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data directory and ports.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn directory(&self) -> &Path {
        self.directory.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A loopback TCP proxy to etcd that can be cut (every connection closed, new ones dropped) and
/// healed: a network partition between one client and etcd.
pub struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let target = target.to_string();
        {
            let cut = cut.clone();
            let connections = connections.clone();
            std::thread::spawn(move || {
                for incoming in listener.incoming() {
                    let Ok(incoming) = incoming else { continue };
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: the client sees the connection closed
                    }
                    let Ok(outgoing) = TcpStream::connect(&target) else {
                        continue;
                    };
                    let mut registry = connections.lock().expect("proxy registry");
                    for stream in [&incoming, &outgoing] {
                        if let Ok(clone) = stream.try_clone() {
                            registry.push(clone);
                        }
                    }
                    drop(registry);
                    pipe(&incoming, &outgoing);
                    pipe(&outgoing, &incoming);
                }
            });
        }
        Proxy {
            port,
            cut,
            connections,
        }
    }

    pub fn url(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.port)
    }

    /// Closes every connection through the proxy and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for stream in self.connections.lock().expect("proxy registry").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` on a thread until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if to.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
