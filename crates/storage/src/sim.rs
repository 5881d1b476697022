//! An in-memory, crash-simulating implementation of [`Io`] for tests.
//!
//! Each file keeps two versions of its bytes: what was written (what reads see) and what was
//! last made durable by `sync`. Directory entries (files and directories alike) exist at once,
//! but a creation, rename or removal is durable only after `sync_dir` on its parent; until then
//! a power cut may or may not have written it back, and each pending change independently
//! survives or not. A file whose directory did not survive is gone with it. `remove_dir_all` is
//! a sequence of removals, one entry at a time, that a crash can interrupt.
//!
//! [`SimIo::crash`] returns the file system as a machine would find it after a power cut: the
//! durable names plus, depending on the [`CrashMode`], some of the pending name changes; each
//! file with its durable bytes plus a prefix of what was written after the last sync, possibly
//! ending in garbage. A file created but never synced can so survive with a torn header. A
//! truncation not followed by a sync may be lost while the writes before it survive (they may
//! have been written back), so bytes cut off without a sync can come back.
//! [`SimIo::crash_before_operation`] takes that snapshot at an exact step of a workload, so a test
//! can crash at every step in turn. Faults can be injected: failing writes, failing syncs, and a
//! capacity that makes writes, and the creation of files once it is reached, fail with "no
//! space left on device".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::io::{parent_dir, Io, IoFile};

/// What survives of the changes made after the last sync when the simulated machine crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Unsynced bytes and unsynced directory changes are lost entirely.
    LoseUnsynced,
    /// A random prefix of each file's unsynced bytes survives (a torn write), and each unsynced
    /// directory change survives or not at random.
    TornPrefix,
    /// As `TornPrefix`, and the last surviving unsynced bytes are overwritten with garbage.
    TornWithGarbage,
}

type FileId = u64;

#[derive(Debug, Default, Clone)]
struct FileData {
    written: Vec<u8>,
    durable: Vec<u8>,
    /// What was written before the first truncation since the last sync: a power cut may keep
    /// those writes (written back before) but not the truncation.
    truncated_from: Option<Vec<u8>>,
}

/// What a name refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(FileId),
    Directory,
}

/// A directory change not yet made durable by a `sync_dir` of its parent.
#[derive(Debug, Clone)]
enum NameChange {
    Create {
        path: PathBuf,
        node: Node,
    },
    Remove {
        path: PathBuf,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
        node: Node,
    },
}

impl NameChange {
    /// Whether a `sync_dir` of `directory` makes this change durable.
    fn is_in(&self, directory: &Path) -> bool {
        match self {
            NameChange::Create { path, .. } | NameChange::Remove { path } => {
                parent_dir(path) == directory
            }
            NameChange::Rename { from, to, .. } => {
                parent_dir(from) == directory || parent_dir(to) == directory
            }
        }
    }

    /// Whether every name this change touches is below `directory`.
    fn is_below(&self, directory: &Path) -> bool {
        let below = |path: &Path| path != directory && path.starts_with(directory);
        match self {
            NameChange::Create { path, .. } | NameChange::Remove { path } => below(path),
            NameChange::Rename { from, to, .. } => below(from) && below(to),
        }
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, Node>) {
        match self {
            NameChange::Create { path, node } => {
                names.insert(path.clone(), *node);
            }
            NameChange::Remove { path } => {
                names.remove(path);
            }
            NameChange::Rename { from, to, node } => {
                // The renamed entry is on disk even if its creation's own change was lost:
                // a file system persists a rename only with the entry it renames.
                names.entry(from.clone()).or_insert(*node);
                rename_subtree(names, from, to);
            }
        }
    }
}

/// Moves `from` and everything below it to `to`, replacing whatever was at `to`.
fn rename_subtree(names: &mut BTreeMap<PathBuf, Node>, from: &Path, to: &Path) {
    names.retain(|name, _| !name.starts_with(to));
    let moved: Vec<(PathBuf, Node)> = names
        .iter()
        .filter(|(name, _)| name.starts_with(from))
        .map(|(name, node)| (name.clone(), *node))
        .collect();
    for (name, node) in moved {
        names.remove(&name);
        let renamed = match name.strip_prefix(from) {
            Ok(rest) if !rest.as_os_str().is_empty() => to.join(rest),
            _ => to.to_path_buf(),
        };
        names.insert(renamed, node);
    }
}

/// When to take a crash snapshot: before the mutating operation with this index.
#[derive(Debug, Clone, Copy)]
struct CrashPlan {
    operation: u64,
    mode: CrashMode,
    seed: u64,
}

#[derive(Debug, Default)]
struct State {
    next_file_id: FileId,
    files: HashMap<FileId, FileData>,
    /// Directory entries as reads see them.
    names: BTreeMap<PathBuf, Node>,
    /// Directory entries that survive a crash.
    durable_names: BTreeMap<PathBuf, Node>,
    /// Directory changes made since the last `sync_dir` of their parent, oldest first.
    pending_changes: Vec<NameChange>,
    /// Every directory ever created here. Any other directory (the root of the simulated tree,
    /// say) is taken to exist durably from the start.
    created_directories: BTreeSet<PathBuf>,
    capacity_bytes: Option<u64>,
    failing_writes: u32,
    failing_syncs: u32,
    /// The directory sync this many directory syncs from now fails (0: none).
    failing_dir_sync: u32,
    writes: u64,
    syncs: u64,
    /// File handles opened or created and not yet dropped.
    open_handles: u64,
    /// The most handles open at once.
    peak_open_handles: u64,
    /// Mutating operations so far (creations, writes, syncs, truncations, removals, renames).
    operations: u64,
    crash_plan: Option<CrashPlan>,
    crashed: Option<Box<State>>,
}

impl State {
    /// Bytes of the files that still have a name (removed files no longer use space).
    fn used_bytes(&self) -> u64 {
        self.names
            .values()
            .filter_map(|node| match node {
                Node::File(file_id) => self.files.get(file_id),
                Node::Directory => None,
            })
            .map(|file| file.written.len() as u64)
            .sum()
    }

    fn file_id(&self, path: &Path) -> io::Result<FileId> {
        match self.names.get(path) {
            Some(Node::File(file_id)) => Ok(*file_id),
            Some(Node::Directory) => Err(io::Error::other(format!(
                "{} is a directory",
                path.display()
            ))),
            None => Err(not_found(path)),
        }
    }

    /// Whether `path` is a directory: the root, a created directory, or one that was never
    /// created here but has entries below it (the tree the simulation starts from).
    fn directory_exists(&self, path: &Path) -> bool {
        path.parent().is_none()
            || self.names.get(path) == Some(&Node::Directory)
            || !self.created_directories.contains(path)
                && self
                    .names
                    .keys()
                    .any(|name| name != path && name.starts_with(path))
    }

    /// Counts one mutating operation, taking the planned crash snapshot first if it is due.
    fn step(&mut self) {
        if let Some(plan) = self.crash_plan {
            if plan.operation == self.operations && self.crashed.is_none() {
                self.crashed = Some(Box::new(self.after_crash(plan.mode, plan.seed)));
            }
        }
        self.operations += 1;
    }

    /// Changes the visible namespace and remembers the change until its directory is synced.
    fn change_names(&mut self, change: NameChange) {
        change.apply(&mut self.names);
        self.pending_changes.push(change);
    }

    /// The state a restarted machine would find after a power cut now.
    fn after_crash(&self, mode: CrashMode, seed: u64) -> State {
        let mut random = SmallRng::seed_from_u64(seed);
        let mut names = self.durable_names.clone();
        if mode != CrashMode::LoseUnsynced {
            for change in &self.pending_changes {
                if random.gen_bool(0.5) {
                    change.apply(&mut names);
                }
            }
        }
        // An entry whose directory did not survive went with it.
        let orphaned: Vec<PathBuf> = names
            .keys()
            .filter(|name| {
                name.ancestors().skip(1).any(|ancestor| {
                    self.created_directories.contains(ancestor)
                        && names.get(ancestor) != Some(&Node::Directory)
                })
            })
            .cloned()
            .collect();
        for name in orphaned {
            names.remove(&name);
        }
        let mut crashed = State {
            next_file_id: self.next_file_id,
            created_directories: self.created_directories.clone(),
            ..State::default()
        };
        for node in names.values() {
            let Node::File(file_id) = node else {
                continue;
            };
            let Some(file) = self.files.get(file_id) else {
                continue;
            };
            crashed.files.entry(*file_id).or_insert_with(|| {
                let bytes = surviving_bytes(file, mode, &mut random);
                FileData {
                    written: bytes.clone(),
                    durable: bytes,
                    truncated_from: None,
                }
            });
        }
        crashed.names = names.clone();
        crashed.durable_names = names;
        crashed
    }
}

/// A file's bytes after a power cut: the durable ones plus, depending on `mode`, a torn prefix
/// of what was written after the last sync.
fn surviving_bytes(file: &FileData, mode: CrashMode, random: &mut SmallRng) -> Vec<u8> {
    let mut bytes = file.durable.clone();
    let written = match &file.truncated_from {
        Some(before) if mode != CrashMode::LoseUnsynced && random.gen_bool(0.5) => before,
        _ => &file.written,
    };
    let common = bytes.len().min(written.len());
    let unsynced = written.get(common..).unwrap_or_default();
    if written.len() >= bytes.len() && !unsynced.is_empty() {
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
    bytes
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

    /// Makes the `nth` directory sync from now (1 for the next one) fail with an I/O error,
    /// leaving the directory changes it would have made durable pending.
    pub fn fail_nth_dir_sync(&self, nth: u32) {
        self.lock().failing_dir_sync = nth;
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

    /// Number of file handles currently open (opened or created, not yet dropped): what file
    /// descriptors the engine would hold.
    pub fn open_files(&self) -> u64 {
        self.lock().open_handles
    }

    /// The most file handles that were open at once since this file system was created (or
    /// came out of a crash): the file descriptors the engine would have needed.
    pub fn peak_open_files(&self) -> u64 {
        self.lock().peak_open_handles
    }

    /// Number of mutating operations (creations, writes, syncs, truncations, removals, renames,
    /// directory syncs) so far: the crash points of a workload.
    pub fn operation_count(&self) -> u64 {
        self.lock().operations
    }

    /// The file system a restarted machine would see after a power cut now.
    pub fn crash(&self, mode: CrashMode, seed: u64) -> SimIo {
        SimIo {
            state: Arc::new(Mutex::new(self.lock().after_crash(mode, seed))),
        }
    }

    /// Plans a power cut just before mutating operation number `operation` (counted from
    /// this file system's creation): the snapshot is taken then, while the workload carries on;
    /// collect it with [`SimIo::take_crashed`].
    pub fn crash_before_operation(&self, operation: u64, mode: CrashMode, seed: u64) {
        self.lock().crash_plan = Some(CrashPlan {
            operation,
            mode,
            seed,
        });
    }

    /// The file system as the planned power cut left it, if it has happened.
    pub fn take_crashed(&self) -> Option<SimIo> {
        let crashed = self.lock().crashed.take()?;
        Some(SimIo {
            state: Arc::new(Mutex::new(*crashed)),
        })
    }

    /// Reads a whole file, as reads see it (for tests that inspect or damage files).
    pub fn read_file(&self, path: &Path) -> io::Result<Vec<u8>> {
        let state = self.lock();
        let file_id = state.file_id(path)?;
        Ok(state.files[&file_id].written.clone())
    }

    /// Replaces a whole file's bytes, durably (for tests that damage files).
    pub fn write_file(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut state = self.lock();
        let file_id = state.file_id(path)?;
        let file = state.files.entry(file_id).or_default();
        file.written = bytes.clone();
        file.durable = bytes;
        file.truncated_from = None;
        Ok(())
    }

    /// Every file path that currently exists.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.lock()
            .names
            .iter()
            .filter(|(_, node)| matches!(node, Node::File(_)))
            .map(|(name, _)| name.clone())
            .collect()
    }
}

struct SimFile {
    io: SimIo,
    file_id: FileId,
}

impl SimFile {
    /// A handle to `file_id`, counted in `open_handles` until dropped. Takes the locked state.
    fn handle(io: &SimIo, state: &mut State, file_id: FileId) -> Arc<dyn IoFile> {
        state.open_handles += 1;
        state.peak_open_handles = state.peak_open_handles.max(state.open_handles);
        Arc::new(SimFile {
            io: io.clone(),
            file_id,
        })
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        self.io.lock().open_handles -= 1;
    }
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
            state.step();
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
            state.step();
            if state.failing_syncs > 0 {
                state.failing_syncs -= 1;
                return Err(injected("fsync"));
            }
            state.syncs += 1;
            let file = state.files.get_mut(&file_id).expect("checked above");
            file.durable = file.written.clone();
            file.truncated_from = None;
            Ok(())
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with_data(|state, file_id| Ok(state.files[&file_id].written.len() as u64))
    }

    fn set_len(&self, length: u64) -> io::Result<()> {
        self.with_data(|state, file_id| {
            state.step();
            let length = usize::try_from(length).map_err(io::Error::other)?;
            let file = state.files.get_mut(&file_id).expect("checked above");
            if length < file.written.len() && file.truncated_from.is_none() {
                file.truncated_from = Some(file.written.clone());
            }
            file.written.resize(length, 0);
            Ok(())
        })
    }
}

impl Io for SimIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let mut missing: Vec<&Path> = path
            .ancestors()
            .take_while(|ancestor| !state.directory_exists(ancestor))
            .collect();
        missing.reverse();
        for directory in missing {
            if let Some(Node::File(_)) = state.names.get(directory) {
                return Err(io::Error::other(format!(
                    "{} is a file",
                    directory.display()
                )));
            }
            state.step();
            state.created_directories.insert(directory.to_path_buf());
            state.change_names(NameChange::Create {
                path: directory.to_path_buf(),
                node: Node::Directory,
            });
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let state = self.lock();
        let mut names = BTreeSet::new();
        for entry in state.names.keys() {
            if let Ok(rest) = entry.strip_prefix(path) {
                if let Some(first) = rest.components().next() {
                    names.insert(first.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    fn exists(&self, path: &Path) -> bool {
        let state = self.lock();
        state.names.contains_key(path) || state.names.keys().any(|name| name.starts_with(path))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        let mut state = self.lock();
        let file_id = state.file_id(path)?;
        Ok(SimFile::handle(self, &mut state, file_id))
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        let mut state = self.lock();
        if state.names.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        state.step();
        // A full file system has no room for a new entry either (directory block, inode).
        if state
            .capacity_bytes
            .is_some_and(|capacity| state.used_bytes() >= capacity)
        {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device",
            ));
        }
        let file_id = state.next_file_id;
        state.next_file_id += 1;
        state.files.insert(file_id, FileData::default());
        state.change_names(NameChange::Create {
            path: path.to_path_buf(),
            node: Node::File(file_id),
        });
        Ok(SimFile::handle(self, &mut state, file_id))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.file_id(path)?;
        state.step();
        state.change_names(NameChange::Remove {
            path: path.to_path_buf(),
        });
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        // One entry at a time, deepest first, each a step a crash can land before, as the
        // real `remove_dir_all` does with one unlink or rmdir per entry.
        loop {
            let mut state = self.lock();
            let Some(next) = state
                .names
                .keys()
                .filter(|name| name.starts_with(path))
                .max_by_key(|name| name.components().count())
                .cloned()
            else {
                return Ok(());
            };
            state.step();
            state.change_names(NameChange::Remove { path: next });
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        let node = *state.names.get(from).ok_or_else(|| not_found(from))?;
        state.step();
        if node == Node::Directory {
            state.created_directories.insert(to.to_path_buf());
        }
        state.change_names(NameChange::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            node,
        });
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.step();
        if state.failing_dir_sync > 0 {
            state.failing_dir_sync -= 1;
            if state.failing_dir_sync == 0 {
                return Err(injected("directory fsync"));
            }
        }
        // A directory whose removal is made durable here takes the changes below it made
        // before that removal: no sync can reach them any more (a test that creates and
        // deletes a log in a loop would otherwise pile them up and slow every step down), and
        // none can come back into a later directory of the same name.
        let changes = std::mem::take(&mut state.pending_changes);
        let mut gone: Vec<(usize, PathBuf)> = Vec::new();
        for (index, change) in changes.iter().enumerate() {
            if !change.is_in(path) {
                continue;
            }
            if let NameChange::Remove { path: removed } = change {
                if state.durable_names.get(removed) == Some(&Node::Directory) {
                    gone.push((index, removed.clone()));
                }
            }
            change.apply(&mut state.durable_names);
        }
        let pending = changes
            .into_iter()
            .enumerate()
            .filter(|(index, change)| {
                !change.is_in(path)
                    && !gone
                        .iter()
                        .any(|(removal, directory)| index < removal && change.is_below(directory))
            })
            .map(|(_, change)| change)
            .collect();
        state.pending_changes = pending;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_cut_off_without_a_sync_can_come_back_after_a_power_cut() {
        let io = SimIo::new();
        let path = Path::new("/x/file");
        let file = io.create(path).expect("create");
        io.sync_dir(Path::new("/x")).expect("sync dir");
        file.write_all_at(b"durable", 0).expect("write");
        file.sync().expect("sync");
        file.write_all_at(b"-unsynced", 7).expect("write");
        file.set_len(7).expect("truncate");
        let survivors: BTreeSet<Vec<u8>> = (0..32)
            .map(|seed| {
                io.crash(CrashMode::TornPrefix, seed)
                    .read_file(path)
                    .expect("read")
            })
            .collect();
        assert!(survivors.contains(b"durable".as_slice()), "{survivors:?}");
        assert!(
            survivors.contains(b"durable-unsynced".as_slice()),
            "{survivors:?}"
        );
        file.sync().expect("sync the truncation");
        for seed in 0..8 {
            let crashed = io.crash(CrashMode::TornPrefix, seed);
            assert_eq!(crashed.read_file(path).expect("read"), b"durable");
        }
    }
}
