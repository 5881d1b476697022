//! An engine that a failing test leaks instead of closing: its close could wait for a flush
//! that never comes, and the test would hang instead of failing.

use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::Duration;

use meridian_storage::Storage;

/// How long a close may take before the test fails (it waits for a lost flush).
pub const CLOSE_LIMIT: Duration = Duration::from_secs(60);

/// One test's engine, shared with the test's threads through [`get`](Engine::get). Dropped
/// outside a panic it is closed within [`CLOSE_LIMIT`]; in a panic it is leaked.
pub struct Engine(Option<Arc<Storage>>);

impl Engine {
    pub fn new(storage: Storage) -> Engine {
        Engine(Some(Arc::new(storage)))
    }

    pub fn get(&self) -> Arc<Storage> {
        self.0.clone().expect("open")
    }

    /// The engine itself, for a test that takes it apart; no other user may hold it.
    pub fn into_storage(mut self) -> Storage {
        let storage = self.0.take().expect("open");
        Arc::into_inner(storage).expect("no other user of the engine")
    }

    /// Closes the engine; fails the test if that takes longer than [`CLOSE_LIMIT`].
    pub fn close(self) -> meridian_storage::Result<()> {
        close_within(self.into_storage())
    }
}

impl std::ops::Deref for Engine {
    type Target = Storage;
    fn deref(&self) -> &Storage {
        self.0.as_ref().expect("open")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let Some(storage) = self.0.take() else {
            return;
        };
        if std::thread::panicking() {
            std::mem::forget(storage);
        } else if let Some(storage) = Arc::into_inner(storage) {
            let _ = close_within(storage);
        }
    }
}

/// Closes `storage` on a thread of its own; fails the test if that takes longer than
/// [`CLOSE_LIMIT`] (the close waits for a flush nobody does).
pub fn close_within(storage: Storage) -> meridian_storage::Result<()> {
    let (done_tx, done_rx) = channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(storage.close());
    });
    done_rx
        .recv_timeout(CLOSE_LIMIT)
        .expect("the engine stops (no log waits for a lost flush)")
}
