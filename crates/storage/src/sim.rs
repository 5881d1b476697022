//! An in-memory, crash-simulating implementation of [`Io`] for tests.
//!
//! Each file keeps two versions of its bytes: what was written (what reads see) and what was
//! last made durable by `sync`. Directory entries likewise exist at once but are durable only
//! after `sync_dir` on their parent. [`SimIo::crash`] returns the file system as a machine would
//! find it after a power cut: only durable names, each file with its durable bytes plus, depending
//! on the [`CrashMode`], a prefix of what was written after the last sync, possibly ending in
//! garbage. Faults can be injected: failing writes, failing syncs, and a capacity that makes
//! writes fail with "no space left on device".

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::io::{parent_dir, Io, IoFile};

/// What survives of the bytes written after the last sync when the simulated machine crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Unsynced bytes are lost entirely.
    LoseUnsynced,
    /// A random prefix of the unsynced bytes survives (a torn write).
    TornPrefix,
    /// A random prefix survives and its last bytes are overwritten with garbage.
    TornWithGarbage,
}

type FileId = u64;

#[derive(Debug, Default, Clone)]
struct FileData {
    written: Vec<u8>,
    durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct State {
    next_file_id: FileId,
    files: HashMap<FileId, FileData>,
    /// Directory entries as reads see them.
    names: BTreeMap<PathBuf, FileId>,
    /// Directory entries that survive a crash.
    durable_names: BTreeMap<PathBuf, FileId>,
    capacity_bytes: Option<u64>,
    failing_writes: u32,
    failing_syncs: u32,
    writes: u64,
    syncs: u64,
}

impl State {
    /// Bytes of the files that still have a name (removed files no longer use space).
    fn used_bytes(&self) -> u64 {
        self.names
            .values()
            .filter_map(|file_id| self.files.get(file_id))
            .map(|file| file.written.len() as u64)
            .sum()
    }
}

/// The simulated file system. Cloning shares the same state.
#[derive(Clone, Default)]
pub struct SimIo {
    state: Arc<Mutex<State>>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure"))
}

impl SimIo {
    pub fn new() -> Self {
        SimIo::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a test assertion; the state is
        // still consistent, so keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes the next `count` writes fail with an I/O error.
    pub fn fail_writes(&self, count: u32) {
        self.lock().failing_writes = count;
    }

    /// Makes the next `count` syncs fail with an I/O error.
    pub fn fail_syncs(&self, count: u32) {
        self.lock().failing_syncs = count;
    }

    /// Limits the total bytes of all files; writes beyond it fail with `StorageFull`.
    pub fn set_capacity(&self, capacity_bytes: Option<u64>) {
        self.lock().capacity_bytes = capacity_bytes;
    }

    /// Total bytes of all files as reads see them.
    pub fn used_bytes(&self) -> u64 {
        self.lock().used_bytes()
    }

    /// Number of successful `sync` calls so far.
    pub fn sync_count(&self) -> u64 {
        self.lock().syncs
    }

    /// The file system a restarted machine would see after a power cut now.
    pub fn crash(&self, mode: CrashMode, seed: u64) -> SimIo {
        let state = self.lock();
        let mut random = SmallRng::seed_from_u64(seed);
        let mut crashed = State {
            next_file_id: state.next_file_id,
            ..State::default()
        };
        for (path, file_id) in &state.durable_names {
            let Some(file) = state.files.get(file_id) else {
                continue;
            };
            let mut bytes = file.durable.clone();
            let common = bytes.len().min(file.written.len());
            let unsynced = file.written.get(common..).unwrap_or_default();
            if file.written.len() >= bytes.len() && !unsynced.is_empty() {
                match mode {
                    CrashMode::LoseUnsynced => {}
                    CrashMode::TornPrefix | CrashMode::TornWithGarbage => {
                        let kept = random.gen_range(0..=unsynced.len());
                        bytes.extend_from_slice(&unsynced[..kept]);
                        if mode == CrashMode::TornWithGarbage && kept > 0 {
                            let garbage = random.gen_range(1..=kept.min(64));
                            let length = bytes.len();
                            for byte in &mut bytes[length - garbage..] {
                                *byte = random.gen();
                            }
                        }
                    }
                }
            }
            crashed.files.insert(
                *file_id,
                FileData {
                    written: bytes.clone(),
                    durable: bytes,
                },
            );
            crashed.names.insert(path.clone(), *file_id);
            crashed.durable_names.insert(path.clone(), *file_id);
        }
        SimIo {
            state: Arc::new(Mutex::new(crashed)),
        }
    }

    /// Reads a whole file, as reads see it (for tests that inspect or damage files).
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let file_id = state.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(state.files[file_id].written.clone())
    }

    /// Replaces a whole file's bytes, durably (for tests that damage files).
    pub fn write_file(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut state = self.lock();
        let file_id = *state.names.get(path).ok_or_else(|| not_found(path))?;
        let file = state.files.entry(file_id).or_default();
        file.written = bytes.clone();
        file.durable = bytes;
        Ok(())
    }

    /// Every file path that currently exists.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock().names.keys().cloned().collect()
    }
}

struct SimFile {
    io: SimIo,
    file_id: FileId,
}

impl SimFile {
    fn with_data<T>(
        &self,
        operation: impl FnOnce(&mut State, FileId) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut state = self.io.lock();
        if !state.files.contains_key(&self.file_id) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "file was removed"));
        }
        operation(&mut state, self.file_id)
    }
}

impl IoFile for SimFile {
    fn read_exact_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_data(|state, file_id| {
            let data = &state.files[&file_id].written;
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let end = start.saturating_add(buffer.len());
            let source = data.get(start..end).ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of file")
            })?;
            buffer.copy_from_slice(source);
            Ok(())
        })
    }

    fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.with_data(|state, file_id| {
            if state.failing_writes > 0 {
                state.failing_writes -= 1;
                return Err(injected("write"));
            }
            let start = usize::try_from(offset).map_err(io::Error::other)?;
            let end = start + bytes.len();
            let current = state.files[&file_id].written.len();
            if let Some(capacity) = state.capacity_bytes {
                let growth = end.saturating_sub(current) as u64;
                if state.used_bytes() + growth > capacity {
                    // Like a real file system, write what fits before failing.
                    let room = capacity.saturating_sub(state.used_bytes()) as usize;
                    let fits = (current + room).saturating_sub(start).min(bytes.len());
                    let data = &mut state
                        .files
                        .get_mut(&file_id)
                        .expect("checked above")
                        .written;
                    if start + fits > data.len() {
                        data.resize(start + fits, 0);
                    }
                    data[start..start + fits].copy_from_slice(&bytes[..fits]);
                    return Err(io::Error::new(
                        io::ErrorKind::StorageFull,
                        "no space left on device",
                    ));
                }
            }
            state.writes += 1;
            let data = &mut state
                .files
                .get_mut(&file_id)
                .expect("checked above")
                .written;
            if end > data.len() {
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
            Ok(())
        })
    }

    fn sync(&self) -> io::Result<()> {
        self.with_data(|state, file_id| {
            if state.failing_syncs > 0 {
                state.failing_syncs -= 1;
                return Err(injected("fsync"));
            }
            state.syncs += 1;
            let file = state.files.get_mut(&file_id).expect("checked above");
            file.durable = file.written.clone();
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with_data(|state, file_id| Ok(state.files[&file_id].written.len() as u64))
    }

    fn set_len(&self, length: u64) -> io::Result<()> {
        self.with_data(|state, file_id| {
            let length = usize::try_from(length).map_err(io::Error::other)?;
            state
                .files
                .get_mut(&file_id)
                .expect("checked above")
                .written
                .resize(length, 0);
            Ok(())
        })
    }
}

impl Io for SimIo {
    fn create_dir_all(&self, _path: &Path) -> io::Result<()> {
        // Directories are implicit in the simulated file system.
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        let mut names = Vec::new();
        for entry in state.names.keys() {
            if let Ok(rest) = entry.strip_prefix(path) {
                if let Some(first) = rest.components().next() {
                    let name = first.as_os_str().to_string_lossy().into_owned();
                    if names.last() != Some(&name) && !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        Ok(names)
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.lock();
        state.names.contains_key(path) || state.names.keys().any(|name| name.starts_with(path))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        let state = self.lock();
        let file_id = *state.names.get(path).ok_or_else(|| not_found(path))?;
        Ok(Arc::new(SimFile {
            io: self.clone(),
            file_id,
        }))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        let mut state = self.lock();
        if state.names.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        let file_id = state.next_file_id;
        state.next_file_id += 1;
        state.files.insert(file_id, FileData::default());
        state.names.insert(path.to_path_buf(), file_id);
        Ok(Arc::new(SimFile {
            io: self.clone(),
            file_id,
        }))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.names.remove(path).ok_or_else(|| not_found(path))?;
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.names.retain(|name, _| !name.starts_with(path));
        state
            .durable_names
            .retain(|name, _| !name.starts_with(path));
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let file_id = state.names.remove(from).ok_or_else(|| not_found(from))?;
        state.names.insert(to.to_path_buf(), file_id);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let in_dir = |name: &PathBuf| parent_dir(name) == path;
        let current: Vec<(PathBuf, FileId)> = state
            .names
            .iter()
            .filter(|(name, _)| in_dir(name))
            .map(|(name, id)| (name.clone(), *id))
            .collect();
        state.durable_names.retain(|name, _| !in_dir(name));
        state.durable_names.extend(current);
        Ok(())
    }
}
