//! A background thread that produces batches ahead of the trainer into a bounded queue; the
//! plumbing both batch loaders share. The producer stops after its first error (which is
//! delivered) or when the queue's reader is dropped.

use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use crate::shards::ShardError;

pub(crate) struct Prefetch<T> {
    rx: Receiver<Result<T, ShardError>>,
    worker: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetch<T> {
    /// Runs `next` on a thread named `name`, keeping up to `depth` results queued.
    pub(crate) fn spawn(
        name: &str,
        depth: usize,
        mut next: impl FnMut() -> Result<T, ShardError> + Send + 'static,
    ) -> Result<Self, ShardError> {
        let (tx, rx) = sync_channel(depth.max(1));
        let worker = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || loop {
                let item = next();
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    return;
                }
            })
            .map_err(|e| ShardError::Io {
                path: "<loader thread>".into(),
                message: e.to_string(),
            })?;
        Ok(Self {
            rx,
            worker: Some(worker),
        })
    }

    /// The next item (blocks until it is ready).
    pub(crate) fn next(&mut self) -> Result<T, ShardError> {
        self.rx.recv().unwrap_or_else(|_| {
            Err(ShardError::Io {
                path: "<loader thread>".into(),
                message: "the loader thread stopped".into(),
            })
        })
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        // Unblock a producer waiting on a full queue, then let it finish.
        let (_, dead) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, dead));
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
