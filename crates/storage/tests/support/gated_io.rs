//! A file system whose operations can be stopped at a chosen point: a test arms a one-shot
//! gate for an operation on a path, learns that an engine thread got there, changes things
//! (frees space, appends, closes), then lets the thread go on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use meridian_storage::{Io, IoFile, Position, SimIo, Storage, StorageConfig};

/// Which paths an armed gate stops.
enum PathMatch {
    Exactly(PathBuf),
    EndsWith(String),
    Contains(String),
}

impl PathMatch {
    fn matches(&self, path: &Path) -> bool {
        if let PathMatch::Exactly(exactly) = self {
            return path == exactly;
        }
        let path = path.to_string_lossy();
        match self {
            PathMatch::Exactly(_) => false,
            PathMatch::EndsWith(suffix) => path.ends_with(suffix.as_str()),
            PathMatch::Contains(part) => path.contains(part.as_str()),
        }
    }
}

struct Gate {
    operation: &'static str,
    path: PathMatch,
    reached: Sender<()>,
    release: Receiver<()>,
}

type GateSlot = Arc<Mutex<Option<Gate>>>;

/// Stops here if the armed gate is for `operation` on `path`: signals the test, then waits
/// until it releases the gate (or drops the sender).
fn pass(gate: &GateSlot, operation: &'static str, path: &Path) {
    let armed = {
        let mut slot = gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let matches = slot
            .as_ref()
            .is_some_and(|gate| gate.operation == operation && gate.path.matches(path));
        if matches {
            slot.take()
        } else {
            None
        }
    };
    if let Some(gate) = armed {
        let _ = gate.reached.send(());
        let _ = gate.release.recv();
    }
}

/// A [`SimIo`] with a gate. Operations that can be stopped: "create", "list_dir", "read",
/// "write", "sync" (before they run) and "write_failed" (after a write that returned an error).
/// It also counts the bytes read from files.
pub struct GatedIo {
    inner: SimIo,
    gate: GateSlot,
    bytes_read: Arc<AtomicU64>,
}

impl GatedIo {
    pub fn new(inner: SimIo) -> Arc<GatedIo> {
        Arc::new(GatedIo {
            inner,
            gate: Arc::new(Mutex::new(None)),
            bytes_read: Arc::default(),
        })
    }

    /// Bytes read from every file so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Arms a one-shot gate: the next `operation` on a path ending in `path_suffix` signals the
    /// returned receiver, then waits until the returned sender sends or is dropped.
    pub fn arm(&self, operation: &'static str, path_suffix: &str) -> (Receiver<()>, Sender<()>) {
        self.arm_for(operation, PathMatch::EndsWith(path_suffix.to_string()))
    }

    /// [`GatedIo::arm`] for exactly the file at `path` (by the name it was opened under).
    pub fn arm_exactly(&self, operation: &'static str, path: &Path) -> (Receiver<()>, Sender<()>) {
        self.arm_for(operation, PathMatch::Exactly(path.to_path_buf()))
    }

    /// [`GatedIo::arm`] for a path that contains `path_part` anywhere.
    pub fn arm_containing(
        &self,
        operation: &'static str,
        path_part: &str,
    ) -> (Receiver<()>, Sender<()>) {
        self.arm_for(operation, PathMatch::Contains(path_part.to_string()))
    }

    fn arm_for(&self, operation: &'static str, path: PathMatch) -> (Receiver<()>, Sender<()>) {
        let (reached_tx, reached_rx) = channel();
        let (release_tx, release_rx) = channel();
        *self
            .gate
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Gate {
            operation,
            path,
            reached: reached_tx,
            release: release_rx,
        });
        (reached_rx, release_tx)
    }

    fn wrap(&self, path: &Path, file: Arc<dyn IoFile>) -> Arc<dyn IoFile> {
        Arc::new(GatedFile {
            inner: file,
            path: path.to_path_buf(),
            gate: self.gate.clone(),
            bytes_read: self.bytes_read.clone(),
        })
    }
}

struct GatedFile {
    inner: Arc<dyn IoFile>,
    path: PathBuf,
    gate: GateSlot,
    bytes_read: Arc<AtomicU64>,
}

impl IoFile for GatedFile {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> std::io::Result<()> {
        pass(&self.gate, "read", &self.path);
        self.bytes_read
            .fetch_add(buffer.len() as u64, Ordering::Relaxed);
        self.inner.read_exact_at(buffer, offset)
    }
    fn write_all_at(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        pass(&self.gate, "write", &self.path);
        let result = self.inner.write_all_at(bytes, offset);
        if result.is_err() {
            pass(&self.gate, "write_failed", &self.path);
        }
        result
    }
    fn sync(&self) -> std::io::Result<()> {
        pass(&self.gate, "sync", &self.path);
        self.inner.sync()
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn set_len(&self, length: u64) -> std::io::Result<()> {
        self.inner.set_len(length)
    }
}

impl Io for GatedIo {
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
        pass(&self.gate, "list_dir", path);
        self.inner.list_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn open(&self, path: &Path) -> std::io::Result<Arc<dyn IoFile>> {
        let file = self.inner.open(path)?;
        Ok(self.wrap(path, file))
    }
    fn create(&self, path: &Path) -> std::io::Result<Arc<dyn IoFile>> {
        pass(&self.gate, "create", path);
        let file = self.inner.create(path)?;
        Ok(self.wrap(path, file))
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(path)
    }
}

/// Appends `payloads` to log `name` of an engine on a fresh gated [`SimIo`] (at `/data`),
/// closes the engine and opens it again, every segment sealed: the file system, the reopened
/// engine and the entries' positions.
pub fn sealed_log(
    config: StorageConfig,
    name: &str,
    payloads: impl Iterator<Item = Bytes>,
) -> (Arc<GatedIo>, Storage, Vec<Position>) {
    let io = GatedIo::new(SimIo::new());
    let positions = {
        let storage = Storage::open_with_io("/data", config.clone(), io.clone()).expect("open");
        let log = storage.open_log(name).expect("log");
        let appends: Vec<_> = payloads
            .map(|payload| log.append(payload, 1_000).expect("append"))
            .collect();
        let positions = appends
            .into_iter()
            .map(|append| append.wait().expect("durable"))
            .collect();
        drop(log);
        storage.close().expect("close");
        positions
    };
    let storage = Storage::open_with_io("/data", config, io.clone()).expect("reopen");
    (io, storage, positions)
}
