//! Which feeds have their hypercore loaded in memory.
//!
//! A loaded hypercore costs about 20 KB (its in-memory bitfield alone is a 16 KB
//! page), so a group of 10,000 feeds cannot keep every core loaded. A feed's core
//! loads on first use, and once more than [`Options::max_loaded_feeds`] are loaded
//! the least recently used ones unload (CLOCK, as in the file pool). A feed's
//! lengths stay known while it is unloaded, so manifests, [`Feed::len`] and
//! listings never load it.
//!
//! [`Options::max_loaded_feeds`]: crate::Options::max_loaded_feeds
//! [`Feed::len`]: crate::Feed::len

use std::{
    ops::{Deref, DerefMut},
    path::PathBuf,
    sync::{
        Arc, Mutex as StdMutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::FutureExt;
use hypercore::{Hypercore, HypercoreBuilder};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard, OwnedMutexGuard, watch};

use crate::{
    error::{Error, Result},
    keys::FeedKey,
    storage::{self, FilePool, SyncSet},
};

/// A feed's lengths, kept current whether or not its core is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CoreInfo {
    pub(crate) length: u64,
    pub(crate) byte_length: u64,
    pub(crate) contiguous_length: u64,
    pub(crate) fork: u64,
}

impl From<&hypercore::Info> for CoreInfo {
    fn from(info: &hypercore::Info) -> Self {
        CoreInfo {
            length: info.length,
            byte_length: info.byte_length,
            contiguous_length: info.contiguous_length,
            fork: info.fork,
        }
    }
}

/// Where an unloaded core is loaded from again.
pub(crate) struct CoreSource {
    pub(crate) dir: PathBuf,
    pub(crate) pool: Arc<FilePool>,
    pub(crate) sync: Arc<SyncSet>,
    pub(crate) residency: Arc<Residency>,
}

/// The hypercore of a feed (loaded or not) with its lengths and a change signal,
/// shared by the feed handles and every replication session carrying the feed.
pub(crate) struct SharedFeed {
    pub(crate) key: FeedKey,
    /// Whether we hold the secret key (a local writer).
    local: bool,
    core: Arc<Mutex<Option<Hypercore>>>,
    /// `None`: in-memory storage, loaded for good.
    source: Option<CoreSource>,
    info: StdMutex<CoreInfo>,
    /// Holds the local length; bumped on every local append or verified download.
    pub(crate) changed: watch::Sender<u64>,
    recently_used: AtomicBool,
    closed: AtomicBool,
}

impl SharedFeed {
    /// A feed around a core that was just opened or created. With a `source`, the
    /// core counts against the residency limit and may be unloaded later.
    pub(crate) async fn new(
        key: FeedKey,
        local: bool,
        core: Hypercore,
        source: Option<CoreSource>,
    ) -> Arc<Self> {
        let info = CoreInfo::from(&core.info());
        let (changed, _) = watch::channel(info.length);
        let feed = Arc::new(SharedFeed {
            key,
            local,
            core: Arc::new(Mutex::new(Some(core))),
            source,
            info: StdMutex::new(info),
            changed,
            recently_used: AtomicBool::new(true),
            closed: AtomicBool::new(false),
        });
        if let Some(source) = &feed.source {
            let guard = feed.core.lock().await;
            let victims = source.residency.loaded(&feed);
            drop(guard);
            unload_all(victims).await;
        }
        feed
    }

    /// Whether its files are opened for reading only (a group opened read-only).
    pub(crate) fn is_read_only(&self) -> bool {
        self.source
            .as_ref()
            .is_some_and(|source| source.pool.is_read_only())
    }

    /// The feed's lengths as of the last completed operation; never loads the core.
    pub(crate) fn info(&self) -> CoreInfo {
        *self.info.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive access to the core, loading it if it was unloaded.
    pub(crate) async fn core(self: &Arc<Self>) -> Result<CoreGuard<'_>> {
        let mut slot = self.core.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        self.recently_used.store(true, Ordering::Relaxed);
        let mut victims = Vec::new();
        if slot.is_none() {
            let source = self.source.as_ref().ok_or(Error::Closed)?;
            *slot = Some(load(source, self.key, self.local).await?);
            victims = source.residency.loaded(self);
        }
        // Victims were locked with try_lock, never waited on, so this cannot deadlock.
        unload_all(victims).await;
        let guard = MutexGuard::try_map(slot, Option::as_mut).map_err(|_| Error::Closed)?;
        Ok(CoreGuard { guard, feed: self })
    }

    /// Settles and unloads the core for good; later [`SharedFeed::core`] calls fail
    /// with [`Error::Closed`]. Returns whether this call closed it.
    pub(crate) async fn close(&self) -> bool {
        let mut slot = self.core.lock().await;
        if self.closed.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.unload(&mut slot).await;
        true
    }

    /// Drops the core in `slot` (this feed's, locked), first settling a remote
    /// feed's downloads. In-memory cores stay: their storage is the core itself.
    async fn unload(&self, slot: &mut Option<Hypercore>) {
        let Some(source) = &self.source else {
            return;
        };
        if let Some(core) = slot.as_mut()
            && !self.local
            && !source.pool.is_read_only()
        {
            settle_downloads(core, &source.sync).await;
        }
        *slot = None;
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn is_loaded(&self) -> bool {
        self.core.try_lock().map(|c| c.is_some()).unwrap_or(true)
    }
}

/// Exclusive access to a loaded core. Dropping it records the core's new lengths.
pub(crate) struct CoreGuard<'a> {
    guard: MappedMutexGuard<'a, Hypercore>,
    feed: &'a SharedFeed,
}

impl Deref for CoreGuard<'_> {
    type Target = Hypercore;
    fn deref(&self) -> &Hypercore {
        &self.guard
    }
}

impl DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Hypercore {
        &mut self.guard
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        let info = CoreInfo::from(&self.guard.info());
        *self.feed.info.lock().unwrap_or_else(|e| e.into_inner()) = info;
    }
}

/// Opens a feed's core from its directory, checking it is the expected feed.
pub(crate) async fn load(source: &CoreSource, key: FeedKey, local: bool) -> Result<Hypercore> {
    let storage = storage::open_dir_with(&source.dir, false, &source.pool, &source.sync).await?;
    let damaged = |reason: String| Error::Damaged {
        path: source.dir.clone(),
        reason,
    };
    // Damaged files can trip assertions inside hypercore: contain them.
    let opened = std::panic::AssertUnwindSafe(HypercoreBuilder::new(storage).open(true).build())
        .catch_unwind()
        .await;
    let core = match opened {
        Ok(Ok(core)) => core,
        // The OS refused (permissions, a read-only mount): not damage.
        Ok(Err(hypercore::HypercoreError::IO { source: e, .. }))
            if storage::is_access_refused(&e) =>
        {
            return Err(Error::io(
                format!("open the feed files in {}", source.dir.display()),
                e,
            ));
        }
        Ok(Err(e)) => return Err(damaged(format!("cannot open: {e}"))),
        Err(_) => return Err(damaged("cannot open: its files are damaged".into())),
    };
    let key_pair = core.key_pair();
    if key_pair.public.to_bytes() != *key.as_bytes() {
        return Err(damaged("its files belong to another feed".into()));
    }
    if local && key_pair.secret.is_none() {
        return Err(damaged(
            "it is recorded as a local writer but its secret key is missing".into(),
        ));
    }
    Ok(core)
}

type Victim = (Arc<SharedFeed>, OwnedMutexGuard<Option<Hypercore>>);

/// Unloads cores picked by [`Residency::loaded`], each still locked.
async fn unload_all(victims: Vec<Victim>) {
    for (feed, mut slot) in victims {
        feed.unload(&mut slot).await;
        if let Some(source) = &feed.source {
            source.sync.release_files();
        }
    }
}

/// Bounds the number of loaded cores of one multifeed.
pub(crate) struct Residency {
    max_loaded: usize,
    state: StdMutex<ResidencyState>,
}

#[derive(Default)]
struct ResidencyState {
    loaded: Vec<Weak<SharedFeed>>,
    hand: usize,
}

impl Residency {
    pub(crate) fn new(max_loaded: usize) -> Arc<Self> {
        Arc::new(Self {
            max_loaded: max_loaded.max(1),
            state: StdMutex::new(ResidencyState::default()),
        })
    }

    /// Records that `feed` just loaded its core (the caller holds its lock) and
    /// picks cores to unload if over the limit. Cores in use are skipped, never
    /// waited on, as is any core used since the hand last passed it.
    fn loaded(&self, feed: &Arc<SharedFeed>) -> Vec<Victim> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.loaded.push(Arc::downgrade(feed));
        let mut victims = Vec::new();
        let mut budget = state.loaded.len() * 2;
        while state.loaded.len() > self.max_loaded && budget > 0 {
            budget -= 1;
            let at = state.hand % state.loaded.len();
            let Some(candidate) = state.loaded[at].upgrade() else {
                state.loaded.swap_remove(at);
                continue;
            };
            if Arc::ptr_eq(&candidate, feed)
                || candidate.recently_used.swap(false, Ordering::Relaxed)
            {
                state.hand = at + 1;
                continue;
            }
            match candidate.core.clone().try_lock_owned() {
                Ok(slot) => {
                    state.loaded.swap_remove(at);
                    if slot.is_some() {
                        victims.push((candidate, slot));
                    }
                }
                Err(_) => state.hand = at + 1,
            }
        }
        victims
    }
}

/// Folds a remote feed's pending oplog entries into its tree and bitfield.
///
/// hypercore 0.16 cannot replay downloaded-block entries from its oplog on open
/// (docs/upstream-defects.md, defect 10: replay stops before them), so without
/// this the last few downloads would be fetched again after a reload. It folds
/// entries in on every fourth operation; re-applying a proof of a block we already
/// hold is such an operation and changes nothing.
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

#[cfg(test)]
mod tests {
    use crate::{Multifeed, Options, ReplicateOptions, SharedKey, StorageConfig};

    fn loaded(group: &Multifeed) -> usize {
        group
            .feeds()
            .iter()
            .filter(|f| f.shared().is_loaded())
            .count()
    }

    async fn open(dir: &std::path::Path, key: &SharedKey, max_loaded: usize) -> Multifeed {
        let options = Options::default().max_loaded_feeds(max_loaded);
        Multifeed::open(StorageConfig::dir(dir), key.clone(), options)
            .await
            .unwrap()
    }

    /// Twenty writers under a limit of four: never more than four cores loaded, every
    /// feed still readable and writable, lengths known without loading, and a
    /// reopen (also under the limit) finds everything.
    #[tokio::test]
    async fn cores_beyond_the_limit_unload_and_reload_transparently() {
        let dir = tempfile::tempdir().unwrap();
        let key = SharedKey::generate();
        let group = open(dir.path(), &key, 4).await;
        for round in 0..3u8 {
            for i in 0..20 {
                let writer = group.writer(&format!("w{i}")).await.unwrap();
                writer.append(&[round, i]).await.unwrap();
                assert!(loaded(&group) <= 4, "{} cores loaded", loaded(&group));
            }
        }
        for feed in group.feeds() {
            assert_eq!(feed.len().await, 3);
        }
        for (i, feed) in group.feeds().iter().enumerate() {
            for round in 0..3u8 {
                let block = feed.get(round as u64).await.unwrap();
                assert_eq!(block, Some(vec![round, i as u8]));
            }
            assert!(loaded(&group) <= 4);
        }
        group.close().await.unwrap();

        let group = open(dir.path(), &key, 4).await;
        assert!(group.skipped().is_empty());
        assert_eq!(group.feeds().len(), 20);
        assert!(loaded(&group) <= 4);
        for (i, feed) in group.feeds().iter().enumerate() {
            assert_eq!(feed.len().await, 3);
            assert_eq!(feed.get(2).await.unwrap(), Some(vec![2, i as u8]));
            assert_eq!(feed.append(b"again").await.unwrap(), 3);
        }
        group.close().await.unwrap();
    }

    /// Downloaded blocks survive their core being unloaded mid-session and reloaded
    /// (hypercore 0.16 cannot replay download entries from its oplog, so unloading
    /// must fold them in first), and survive a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn downloads_survive_unloading() {
        let key = SharedKey::generate();
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = open(da.path(), &key, 256).await;
        let b = open(db.path(), &key, 2).await;
        for i in 0..12u8 {
            let writer = a.writer(&format!("w{i}")).await.unwrap();
            for seq in 0..5u8 {
                writer.append(&[i, seq]).await.unwrap();
            }
        }
        let (x, y) = tokio::io::duplex(1 << 16);
        let (ra, rb) = tokio::join!(
            a.replicate(x, ReplicateOptions::new(true)),
            b.replicate(y, ReplicateOptions::new(false))
        );
        ra.unwrap();
        assert_eq!(rb.unwrap().blocks_received, 60);
        assert!(loaded(&b) <= 2);
        let check = |group: Multifeed| async move {
            assert_eq!(group.feeds().len(), 12);
            for feed in group.feeds() {
                assert_eq!(feed.contiguous_len().await, 5);
                let first = feed.get(0).await.unwrap().unwrap();
                assert_eq!(feed.get(4).await.unwrap(), Some(vec![first[0], 4]));
            }
        };
        check(b.clone()).await;
        b.close().await.unwrap();
        check(open(db.path(), &key, 2).await).await;
        a.close().await.unwrap();
    }
}
