//! A member feed: one hypercore, local (writable) or remote (read-only).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use hypercore::Hypercore;
use tokio::sync::{Mutex, watch};

use crate::{
    error::{Error, Result},
    keys::FeedKey,
    storage::{Durability, SyncSet},
};

/// The hypercore of a feed together with a change signal, shared by the feed
/// handles and every replication session that carries the feed.
pub(crate) struct SharedFeed {
    pub(crate) core: Mutex<Hypercore>,
    /// Holds the local length; bumped on every local append or verified download.
    pub(crate) changed: watch::Sender<u64>,
}

pub(crate) struct FeedInner {
    pub(crate) key: FeedKey,
    pub(crate) name: Option<String>,
    pub(crate) shared: Arc<SharedFeed>,
    pub(crate) sync: Option<Arc<SyncSet>>,
    pub(crate) durability: Durability,
    pub(crate) closed: AtomicBool,
}

/// A handle to one member feed. Cheap to clone; all clones share one hypercore.
#[derive(Clone)]
pub struct Feed {
    pub(crate) inner: Arc<FeedInner>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("key", &self.inner.key)
            .field("name", &self.inner.name)
            .finish()
    }
}

impl PartialEq for Feed {
    fn eq(&self, other: &Self) -> bool {
        self.inner.key == other.inner.key
    }
}
impl Eq for Feed {}

impl Feed {
    pub(crate) fn new(
        key: FeedKey,
        name: Option<String>,
        core: Hypercore,
        sync: Option<Arc<SyncSet>>,
        durability: Durability,
    ) -> Self {
        let length = core.info().length;
        let (changed, _) = watch::channel(length);
        Feed {
            inner: Arc::new(FeedInner {
                key,
                name,
                shared: Arc::new(SharedFeed {
                    core: Mutex::new(core),
                    changed,
                }),
                sync,
                durability,
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The feed's public key.
    pub fn key(&self) -> FeedKey {
        self.inner.key
    }

    /// The local writer name, or `None` for a remote feed.
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }

    /// Whether this is one of our own writers (and so writable).
    pub fn is_local(&self) -> bool {
        self.inner.name.is_some()
    }

    /// Number of blocks in the feed (as far as this peer knows).
    pub async fn len(&self) -> u64 {
        self.inner.shared.core.lock().await.info().length
    }

    /// Whether the feed has no blocks yet.
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Number of blocks held locally, counted from the start without a gap.
    pub async fn contiguous_len(&self) -> u64 {
        self.inner.shared.core.lock().await.info().contiguous_length
    }

    /// Total bytes of the feed's blocks.
    pub async fn byte_len(&self) -> u64 {
        self.inner.shared.core.lock().await.info().byte_length
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Syncs and releases the feed's files; later operations fail with [`Error::Closed`].
    pub(crate) async fn close(&self) -> Result<()> {
        // Holding the core lock means no append or download is half-way through.
        let mut core = self.inner.shared.core.lock().await;
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let Some(sync) = &self.inner.sync else {
            return Ok(());
        };
        if !self.is_local() {
            settle_downloads(&mut core, sync).await;
        }
        sync.close().await
    }

    /// Appends one block; returns its sequence number.
    pub async fn append(&self, data: &[u8]) -> Result<u64> {
        self.append_batch(&[data]).await
    }

    /// Appends several blocks in one signed batch; returns the sequence number of
    /// the first. Much faster than single appends: one signature per batch.
    pub async fn append_batch<B: AsRef<[u8]>>(&self, blocks: &[B]) -> Result<u64> {
        self.check_open()?;
        if !self.is_local() {
            return Err(Error::NotWritable {
                key: self.key().to_hex(),
            });
        }
        let (first, length) = {
            let mut core = self.inner.shared.core.lock().await;
            let first = core.info().length;
            let outcome = core.append_batch(blocks).await.map_err(|e| match e {
                hypercore::HypercoreError::NotWritable => Error::NotWritable {
                    key: self.key().to_hex(),
                },
                e => Error::core(self.key(), e),
            })?;
            (first, outcome.length)
        };
        self.inner.shared.changed.send_replace(length);
        if self.inner.durability == Durability::PowerLoss {
            self.flush().await?;
        }
        Ok(first)
    }

    /// The block at `seq`, or `None` if this peer does not hold it (yet).
    pub async fn get(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        let mut core = self.inner.shared.core.lock().await;
        if seq >= core.info().length {
            return Ok(None);
        }
        core.get(seq).await.map_err(|e| Error::core(self.key(), e))
    }

    /// Makes every block written so far survive a power loss. Concurrent flushes
    /// share one round of fsyncs. A no-op for in-memory storage.
    pub async fn flush(&self) -> Result<()> {
        self.check_open()?;
        match &self.inner.sync {
            Some(sync) => sync.sync().await,
            None => Ok(()),
        }
    }

    /// A receiver that changes whenever the feed grows (local append or download).
    pub fn subscribe_len(&self) -> watch::Receiver<u64> {
        self.inner.shared.changed.subscribe()
    }

    pub(crate) fn shared(&self) -> &Arc<SharedFeed> {
        &self.inner.shared
    }
}

/// Folds a remote feed's pending oplog entries into its tree and bitfield.
///
/// hypercore 0.16 cannot replay downloaded-block entries from its oplog on open
/// (see `storage::replayable_oplog_len`), so without this the last few downloads
/// would be fetched again after a reopen. It folds entries in on every fourth
/// operation; re-applying a proof of a block we already hold is such an operation
/// and changes nothing, and its own entry carries no tree nodes, so it replays fine.
async fn settle_downloads(core: &mut Hypercore, sync: &SyncSet) {
    for _ in 0..4 {
        if !sync.has_oplog_entries() {
            return;
        }
        let held = core.info().contiguous_length;
        let Some(index) = held.checked_sub(1) else {
            return;
        };
        let block = hypercore_schema::RequestBlock { index, nodes: 0 };
        let Ok(Some(proof)) = core.create_proof(Some(block), None, None, None).await else {
            return;
        };
        if core.verify_and_apply_proof(&proof).await.is_err() {
            return;
        }
    }
}
