//! Creating the feeds a peer offers, in a task of its own.
//!
//! A feed new to us is created on trial (see `Multifeed::hold_candidates`): it
//! costs a directory and four files before its channel can open, and becomes a
//! member only once it delivered. Done on the session loop, that work serialises with all
//! channel traffic (10,000 new feeds took about 2 s of it); here it runs beside
//! the loop and a little ahead of it, so channels for feeds created earlier sync
//! while later ones are being created.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use super::preauth::AdmissionAccount;
use crate::{
    FeedKey, Multifeed,
    error::{Error, Result},
};

/// Feeds created together under one hold of the writer lock.
const BATCH: usize = 64;
/// Created batches waiting for the session before the task pauses.
const BATCHES_AHEAD: usize = 4;

/// Feeds created by one batch, in the order they were submitted.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) keys: Vec<FeedKey>,
    /// The keys this session now holds on trial (the others were members by then);
    /// each hold is released with `Multifeed::release_candidates`.
    pub(crate) held: Vec<FeedKey>,
}

/// The session's handle on its admission task.
pub(crate) struct Admission {
    /// Keys submitted and not yet handed back. Its size is bounded by the cap on
    /// feeds a peer may offer, which the session enforces before submitting.
    waiting: Arc<Mutex<VecDeque<FeedKey>>>,
    wake: Arc<Notify>,
    admitted: mpsc::Receiver<Result<Admitted>>,
    pending: HashSet<FeedKey>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Admission {
    /// `account`, if any, is charged for each feed this session puts on trial; the
    /// session refunds it as it lets go of them.
    pub(crate) fn spawn(multifeed: Multifeed, account: Option<AdmissionAccount>) -> Self {
        let waiting = Arc::new(Mutex::new(VecDeque::new()));
        let wake = Arc::new(Notify::new());
        let (tx, admitted) = mpsc::channel(BATCHES_AHEAD);
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(admit(
            multifeed,
            account,
            waiting.clone(),
            wake.clone(),
            stop.clone(),
            tx,
        ));
        Self {
            waiting,
            wake,
            admitted,
            pending: HashSet::new(),
            stop,
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

    /// Stops the task once its current batch is created (never midway, so no
    /// half-created feed is left behind by us), waits for it and returns the keys
    /// of batches the session never took: their holds are the caller's to release.
    pub(crate) async fn shutdown(self) -> Vec<FeedKey> {
        let Admission {
            mut admitted,
            mut task,
            stop,
            wake,
            ..
        } = self;
        stop.store(true, Ordering::Release);
        wake.notify_one();
        let mut held = Vec::new();
        loop {
            tokio::select! {
                batch = admitted.recv() => match batch {
                    Some(Ok(batch)) => held.extend(batch.held),
                    Some(Err(_)) => {}
                    None => break,
                },
                _ = &mut task => break,
            }
        }
        while let Ok(batch) = admitted.try_recv() {
            if let Ok(batch) = batch {
                held.extend(batch.held);
            }
        }
        held
    }
}

async fn admit(
    multifeed: Multifeed,
    account: Option<AdmissionAccount>,
    waiting: Arc<Mutex<VecDeque<FeedKey>>>,
    wake: Arc<Notify>,
    stop: Arc<AtomicBool>,
    admitted: mpsc::Sender<Result<Admitted>>,
) {
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
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
        // The peer's places are taken before the feeds are created, and what was
        // not held (members by then) is given back.
        if let Some(account) = &account
            && !account.try_charge(batch.len())
        {
            let _ = admitted
                .send(Err(Error::TooManyUnprovenFeeds {
                    limit: account.limit(),
                    scope: crate::AdmissionScope::Peer,
                }))
                .await;
            return;
        }
        let result = multifeed.hold_candidates(&batch).await;
        if let Some(account) = &account {
            account.refund(batch.len() - result.as_ref().map_or(0, Vec::len));
        }
        let result = result.map(|held| Admitted { keys: batch, held });
        let failed = result.is_err();
        if admitted.send(result).await.is_err() || failed {
            return;
        }
    }
}
