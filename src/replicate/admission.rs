//! Creating the feeds a peer offers, in a task of its own.
//!
//! A new remote feed costs a directory, four files and an index record before its
//! channel can open. Done on the session loop, that work serialises with all
//! channel traffic (10,000 new feeds took about 2 s of it); here it runs beside
//! the loop and a little ahead of it, so channels for feeds created earlier sync
//! while later ones are being created.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
};

use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use crate::{FeedKey, Multifeed, error::Result};

/// Feeds created and recorded together: one index append (one signature) each.
const BATCH: usize = 64;
/// Created batches waiting for the session before the task pauses.
const BATCHES_AHEAD: usize = 4;

/// Feeds created by one batch, in the order they were submitted.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) keys: Vec<FeedKey>,
    /// How many of them were new members (the others already were).
    pub(crate) created: usize,
}

/// The session's handle on its admission task.
pub(crate) struct Admission {
    /// Keys submitted and not yet handed back. Its size is bounded by the cap on
    /// feeds a peer may offer, which the session enforces before submitting.
    waiting: Arc<Mutex<VecDeque<FeedKey>>>,
    wake: Arc<Notify>,
    admitted: mpsc::Receiver<Result<Admitted>>,
    pending: HashSet<FeedKey>,
    task: JoinHandle<()>,
}

impl Admission {
    pub(crate) fn spawn(multifeed: Multifeed) -> Self {
        let waiting = Arc::new(Mutex::new(VecDeque::new()));
        let wake = Arc::new(Notify::new());
        let (tx, admitted) = mpsc::channel(BATCHES_AHEAD);
        let task = tokio::spawn(admit(multifeed, waiting.clone(), wake.clone(), tx));
        Self {
            waiting,
            wake,
            admitted,
            pending: HashSet::new(),
            task,
        }
    }

    /// Queues `keys` to be created as remote members; keys already queued are skipped.
    pub(crate) fn submit(&mut self, keys: impl IntoIterator<Item = FeedKey>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            if self.pending.insert(key) {
                waiting.push_back(key);
            }
        }
        drop(waiting);
        self.wake.notify_one();
    }

    /// The next created batch. Pending forever when nothing is in progress, so it
    /// can sit in a `select!`.
    pub(crate) async fn next(&mut self) -> Result<Admitted> {
        if self.pending.is_empty() {
            return std::future::pending().await;
        }
        match self.admitted.recv().await {
            Some(Ok(batch)) => {
                for key in &batch.keys {
                    self.pending.remove(key);
                }
                Ok(batch)
            }
            Some(Err(error)) => Err(error),
            // The task only stops early after reporting an error, or when the
            // multifeed is closed under it.
            None => Err(crate::Error::Closed),
        }
    }

    /// Stops the task once its current batch is recorded (never midway, so no
    /// half-created feed is left behind by us) and waits for it.
    pub(crate) async fn shutdown(self) {
        let Admission { admitted, task, .. } = self;
        drop(admitted);
        let _ = task.await;
    }
}

async fn admit(
    multifeed: Multifeed,
    waiting: Arc<Mutex<VecDeque<FeedKey>>>,
    wake: Arc<Notify>,
    admitted: mpsc::Sender<Result<Admitted>>,
) {
    loop {
        let batch: Vec<FeedKey> = {
            let mut waiting = waiting.lock().unwrap_or_else(|e| e.into_inner());
            let n = waiting.len().min(BATCH);
            waiting.drain(..n).collect()
        };
        if batch.is_empty() {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = admitted.closed() => return,
            }
        }
        if admitted.is_closed() {
            return;
        }
        let result = multifeed
            .admit_remotes(&batch)
            .await
            .map(|created| Admitted {
                keys: batch,
                created,
            });
        let failed = result.is_err();
        if admitted.send(result).await.is_err() || failed {
            return;
        }
    }
}
