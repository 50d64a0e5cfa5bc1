//! On-disk storage for hypercores: a plain-file backend without per-write fsync,
//! plus batched syncs (group commit) for power-loss durability.
//!
//! The stock `hypercore::Storage::new_disk` fsyncs after every write (about 2.4
//! fsyncs per appended entry). This backend writes with positioned writes into
//! the OS page cache instead, so a write that returned survives a crash of the
//! process; [`SyncSet::sync`] makes everything written so far survive a power
//! loss, and concurrent callers share one round of fsyncs.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex as StdMutex, RwLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use hypercore::{Storage, StorageTraits, Store};
use random_access_storage::{RandomAccess, RandomAccessError};

use crate::error::{Error, Result};

/// Where a multifeed keeps its feeds.
#[derive(Debug, Clone)]
pub enum StorageConfig {
    /// A directory on local disk (created if missing).
    Dir(PathBuf),
    /// Process memory; everything is gone when the multifeed is dropped.
    Memory,
}

impl StorageConfig {
    /// Storage in the given directory.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        StorageConfig::Dir(path.into())
    }
}

/// What an append that returned `Ok` survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Written to the operating system before `append` returns: survives a crash
    /// or kill of the process, not a power loss or kernel crash unless
    /// [`Feed::flush`](crate::Feed::flush) or
    /// [`Multifeed::flush`](crate::Multifeed::flush) returned since. This is what
    /// JS hypercore does, and it is the fast default.
    #[default]
    Process,
    /// Synced to stable storage before `append` returns: survives a power loss.
    /// Concurrent appends to one feed share their fsyncs (group commit).
    PowerLoss,
}

/// Bounds the number of files a multifeed keeps open: a group of 10,000 feeds must
/// not need 40,000 file descriptors. Files are reopened on demand and the least
/// recently used ones closed (CLOCK approximation). Closing a file loses nothing:
/// writes are already in the OS, and a later sync reopens the file to fsync it.
#[derive(Debug)]
pub(crate) struct FilePool {
    max_open: usize,
    open: StdMutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    slots: Vec<Weak<FileSlot>>,
    hand: usize,
}

impl FilePool {
    pub(crate) fn new(max_open: usize) -> Arc<Self> {
        Arc::new(Self {
            max_open: max_open.max(8),
            open: StdMutex::new(PoolState::default()),
        })
    }

    /// Records that `slot` just opened its file, closing others if over the limit.
    fn register(&self, slot: &Arc<FileSlot>) {
        let Ok(mut state) = self.open.lock() else {
            return;
        };
        state.slots.push(Arc::downgrade(slot));
        // Each slot gets at most two looks: one to clear its bit, one to evict it.
        let mut budget = state.slots.len() * 2;
        while state.slots.len() > self.max_open && budget > 0 {
            budget -= 1;
            let at = state.hand % state.slots.len();
            let Some(candidate) = state.slots[at].upgrade() else {
                state.slots.swap_remove(at);
                continue;
            };
            if candidate.referenced.swap(false, Ordering::Relaxed) {
                state.hand = at + 1;
                continue;
            }
            // A slot in use right now (including the caller's) is skipped, never waited on.
            if let Ok(mut file) = candidate.file.try_write() {
                if matches!(*file, SlotFile::Open(_)) {
                    *file = SlotFile::Evicted;
                }
                state.slots.swap_remove(at);
            } else {
                state.hand = at + 1;
            }
        }
    }
}

#[derive(Debug)]
enum SlotFile {
    Open(File),
    /// Closed by the pool; reopened on next use.
    Evicted,
    /// Closed for good by [`SyncSet::close`].
    Closed,
}

/// One file of a core, open or not, shared by the core's storage and its [`SyncSet`].
#[derive(Debug)]
struct FileSlot {
    path: PathBuf,
    file: RwLock<SlotFile>,
    referenced: AtomicBool,
    pool: Arc<FilePool>,
}

fn closed_error() -> io::Error {
    io::Error::other("the multifeed was closed")
}

impl FileSlot {
    fn with<T>(self: &Arc<Self>, f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        self.referenced.store(true, Ordering::Relaxed);
        {
            let guard = self
                .file
                .read()
                .map_err(|_| io::Error::other("file lock poisoned"))?;
            match &*guard {
                SlotFile::Open(file) => return f(file),
                SlotFile::Closed => return Err(closed_error()),
                SlotFile::Evicted => {}
            }
        }
        let mut guard = self
            .file
            .write()
            .map_err(|_| io::Error::other("file lock poisoned"))?;
        if matches!(*guard, SlotFile::Evicted) {
            let file = OpenOptions::new().read(true).write(true).open(&self.path)?;
            *guard = SlotFile::Open(file);
            self.pool.register(self);
        }
        match &*guard {
            SlotFile::Open(file) => f(file),
            _ => Err(closed_error()),
        }
    }

    fn close(&self) {
        if let Ok(mut file) = self.file.write() {
            *file = SlotFile::Closed;
        }
    }
}

/// Where oplog entries start (after the two 4 KiB header slots).
const OPLOG_ENTRIES_AT: usize = 8192;

/// The prefix of an oplog that hypercore 0.16 can replay correctly.
///
/// Its entry decoder tests the "has tree nodes" flag (2) where it should test the
/// "has upgrade" (4) and "has bitfield" (8) flags, so only entries with all three,
/// or with none of them, decode as written. Local appends always carry all three;
/// a downloaded block or upgrade-only proof does not, and replaying it fails
/// ("Could not parse changeset signature") or misreads the bitfield. Replay stops
/// before the first such entry: those downloads are simply fetched again, and no
/// local append is affected.
fn replayable_oplog_len(oplog: &[u8]) -> usize {
    let mut at = OPLOG_ENTRIES_AT;
    while let Some(leader) = oplog.get(at..at + 8) {
        let combined = u32::from_le_bytes([leader[4], leader[5], leader[6], leader[7]]);
        let len = (combined >> 2) as usize;
        let Some(flags) = oplog
            .get(at + 8)
            .filter(|_| len > 0 && at + 8 + len <= oplog.len())
        else {
            break;
        };
        let decodable = flags & 0b1110 == 0b1110 || flags & 0b1110 == 0;
        if !decodable {
            return at;
        }
        at += 8 + len;
    }
    oplog.len()
}

/// Page size of the tree read cache.
const PAGE: u64 = 4096;
/// Pages of a tree file kept in memory (64 KiB per busy feed).
const MAX_PAGES: usize = 16;
/// Reads of a tree file before it gets a cache: small feeds never pay for one.
const CACHE_AFTER_READS: u64 = 256;

/// Recently read pages of a Merkle tree file. Serving and verifying a proof reads
/// several 40-byte nodes near the same places (roots, the recent tail); without this
/// each node is a system call, the largest cost of replicating one big feed.
#[derive(Debug, Default)]
struct PageCache {
    reads: u64,
    clock: u64,
    pages: std::collections::HashMap<u64, (Box<[u8]>, u64)>,
}

impl PageCache {
    fn enabled(&self) -> bool {
        self.reads >= CACHE_AFTER_READS
    }

    /// Copies `buf.len()` bytes at `offset` from cached pages, loading missing ones
    /// with `load(page_offset, page_buf)`.
    fn read(
        &mut self,
        offset: u64,
        buf: &mut [u8],
        mut load: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let page = at / PAGE;
            self.clock += 1;
            let clock = self.clock;
            if !self.pages.contains_key(&page) {
                if self.pages.len() >= MAX_PAGES
                    && let Some(oldest) = self
                        .pages
                        .iter()
                        .min_by_key(|(_, (_, used))| *used)
                        .map(|(k, _)| *k)
                {
                    self.pages.remove(&oldest);
                }
                let mut data = vec![0u8; PAGE as usize].into_boxed_slice();
                load(page * PAGE, &mut data)?;
                self.pages.insert(page, (data, clock));
            }
            let (data, used) = self.pages.get_mut(&page).expect("page inserted above");
            *used = clock;
            let within = (at - page * PAGE) as usize;
            let n = (PAGE as usize - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&data[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// Keeps cached pages equal to the file after a write.
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (&page, (bytes, _)) in self.pages.iter_mut() {
            let start = page * PAGE;
            let end = start + PAGE;
            let (from, to) = (offset.max(start), (offset + data.len() as u64).min(end));
            if from < to {
                bytes[(from - start) as usize..(to - start) as usize]
                    .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            }
        }
    }
}

/// Largest amount of tree writes held before they are written anyway.
const MAX_HELD_BYTES: usize = 1 << 20;

/// Merkle-tree node writes held back until the core next writes its oplog.
///
/// Hypercore flushes the tree nodes of a batch in hash-map order, one 40-byte write
/// each, and writes its oplog right after. Holding the nodes until that oplog write
/// (or a read, truncate, sync or drop, whichever comes first) lets them reach the
/// file sorted, neighbours merged into one write: the same bytes, in the same order
/// relative to the oplog, with a fraction of the system calls (one feed of 100,000
/// blocks made about 800,000 such writes).
#[derive(Debug, Default)]
struct HeldWrites {
    file: Option<Arc<FileSlot>>,
    writes: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
    /// The core's count of writes issued to the OS, bumped as held writes go out.
    issued: Arc<AtomicU64>,
}

impl HeldWrites {
    /// Whether a held write touches `start..end`.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.writes
            .range(..end)
            .next_back()
            .is_some_and(|(at, data)| at + data.len() as u64 > start)
    }

    /// Whether a held write reaches past `at` (held writes never overlap, so the
    /// last one ends furthest).
    fn ends_after(&self, at: u64) -> bool {
        self.writes
            .last_key_value()
            .is_some_and(|(start, data)| start + data.len() as u64 > at)
    }

    fn hold(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if let Some(held) = self.writes.get_mut(&offset)
            && held.len() == data.len()
        {
            held.copy_from_slice(data);
            return Ok(());
        }
        if self.overlaps(offset, offset + data.len() as u64) || self.bytes >= MAX_HELD_BYTES {
            self.flush()?;
        }
        self.bytes += data.len();
        self.writes.insert(offset, data.to_vec());
        Ok(())
    }

    /// Writes everything held, in offset order, contiguous writes as one.
    fn flush(&mut self) -> io::Result<()> {
        if self.writes.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.writes);
        self.bytes = 0;
        let Some(file) = &self.file else {
            return Err(io::Error::other("held tree writes without a file"));
        };
        let write_run = |(start, buf): (u64, Vec<u8>)| {
            file.with(|f| f.write_all_at(&buf, start))?;
            self.issued.fetch_add(1, Ordering::Release);
            io::Result::Ok(())
        };
        let mut run: Option<(u64, Vec<u8>)> = None;
        for (at, data) in writes {
            match &mut run {
                Some((start, buf)) if *start + buf.len() as u64 == at => {
                    buf.extend_from_slice(&data)
                }
                _ => {
                    if let Some(done) = run.replace((at, data)) {
                        write_run(done)?;
                    }
                }
            }
        }
        run.map_or(Ok(()), write_run)
    }
}

fn lock_held(held: &StdMutex<HeldWrites>) -> io::Result<std::sync::MutexGuard<'_, HeldWrites>> {
    held.lock()
        .map_err(|_| io::Error::other("held writes lock poisoned"))
}

/// A file's part in holding tree writes back (see [`HeldWrites`]).
#[derive(Debug)]
enum Held {
    /// Writes go straight to the file.
    No,
    /// The tree file: its writes are held.
    Holder(Arc<StdMutex<HeldWrites>>),
    /// The oplog: held tree writes go out before it changes.
    Barrier(Arc<StdMutex<HeldWrites>>),
}

/// One file of a hypercore, written with positioned writes and no fsync.
#[derive(Debug)]
struct PlainFile {
    /// Read cache, for the tree file only.
    cache: Option<PageCache>,
    /// For the core's oplog: its length, mirrored for [`SyncSet::has_oplog_entries`]
    /// (see also [`replayable_oplog_len`]).
    oplog_len: Option<Arc<AtomicU64>>,
    file: Arc<FileSlot>,
    length: u64,
    writes: Arc<AtomicU64>,
    held: Held,
}

impl PlainFile {
    fn mirror_oplog_len(&self) {
        if let Some(len) = &self.oplog_len {
            len.store(self.length, Ordering::Release);
        }
    }

    /// Writes out held tree writes, whichever side of them this file is on.
    fn flush_held(&self) -> io::Result<()> {
        match &self.held {
            Held::No => Ok(()),
            Held::Holder(held) | Held::Barrier(held) => lock_held(held)?.flush(),
        }
    }
}

impl Drop for PlainFile {
    fn drop(&mut self) {
        if matches!(self.held, Held::Holder(_))
            && let Err(error) = self.flush_held()
        {
            tracing::warn!(path = %self.file.path.display(), %error, "writing held tree nodes failed");
        }
    }
}

fn io_err(context: &str, path: &Path, e: io::Error) -> RandomAccessError {
    RandomAccessError::IO {
        return_code: e.raw_os_error(),
        context: Some(format!("{context} {}", path.display())),
        source: e,
    }
}

#[async_trait::async_trait]
impl RandomAccess for PlainFile {
    async fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), RandomAccessError> {
        if let Held::Holder(held) = &self.held {
            lock_held(held)?.hold(offset, data)?;
        } else {
            // An oplog write is the barrier: held tree writes go first.
            self.flush_held()?;
            self.file.with(|f| f.write_all_at(data, offset))?;
            self.writes.fetch_add(1, Ordering::Release);
        }
        if let Some(cache) = &mut self.cache {
            cache.write(offset, data);
        }
        self.length = self.length.max(offset + data.len() as u64);
        self.mirror_oplog_len();
        Ok(())
    }

    async fn read(&mut self, offset: u64, length: u64) -> Result<Vec<u8>, RandomAccessError> {
        let end = offset.saturating_add(length);
        if end > self.length {
            return Err(RandomAccessError::OutOfBounds {
                offset,
                end: Some(end),
                length: self.length,
            });
        }
        if let Held::Holder(held) = &self.held {
            // From the start of the page, as the cache loads whole pages. A held
            // write past the range may extend the file: without it the read would
            // meet the file's end.
            let start = offset / PAGE * PAGE;
            let mut held = lock_held(held)?;
            if held.ends_after(start) {
                held.flush()?;
            }
        }
        // Bounded by the file's own length, checked above.
        let mut buf = vec![0u8; length as usize];
        match &mut self.cache {
            Some(cache) if cache.enabled() && length <= PAGE => {
                let (file, file_len) = (&self.file, self.length);
                cache.read(offset, &mut buf, |page_at, page| {
                    // The last page may run past the end of the file: the rest stays zero.
                    let n = (file_len.saturating_sub(page_at)).min(PAGE) as usize;
                    file.with(|f| f.read_exact_at(&mut page[..n], page_at))
                })?;
            }
            cache => {
                if let Some(cache) = cache {
                    cache.reads += 1;
                }
                self.file.with(|f| f.read_exact_at(&mut buf, offset))?;
            }
        }
        if self.oplog_len.is_some() && offset == 0 && length == self.length {
            // The whole-oplog read happens once, when the core opens.
            buf.truncate(replayable_oplog_len(&buf));
        }
        Ok(buf)
    }

    async fn del(&mut self, offset: u64, length: u64) -> Result<(), RandomAccessError> {
        if offset > self.length {
            return Err(RandomAccessError::OutOfBounds {
                offset,
                end: None,
                length: self.length,
            });
        }
        if length == 0 {
            return Ok(());
        }
        if offset.saturating_add(length) >= self.length {
            return self.truncate(offset).await;
        }
        self.flush_held()?;
        if let Some(cache) = &mut self.cache {
            cache.pages.clear();
        }
        // Zero the range in bounded chunks; hypercore only deletes cleared blocks.
        const CHUNK: u64 = 64 * 1024;
        let zeros = vec![0u8; CHUNK.min(length) as usize];
        let mut at = offset;
        let end = offset + length;
        while at < end {
            let n = CHUNK.min(end - at) as usize;
            self.file.with(|f| f.write_all_at(&zeros[..n], at))?;
            at += n as u64;
        }
        self.writes.fetch_add(1, Ordering::Release);
        Ok(())
    }

    async fn truncate(&mut self, length: u64) -> Result<(), RandomAccessError> {
        self.flush_held()?;
        self.file.with(|f| f.set_len(length))?;
        if let Some(cache) = &mut self.cache {
            cache.pages.clear();
        }
        self.length = length;
        self.writes.fetch_add(1, Ordering::Release);
        self.mirror_oplog_len();
        Ok(())
    }

    async fn len(&mut self) -> Result<u64, RandomAccessError> {
        Ok(self.length)
    }

    async fn is_empty(&mut self) -> Result<bool, RandomAccessError> {
        Ok(self.length == 0)
    }

    async fn sync_all(&mut self) -> Result<(), RandomAccessError> {
        self.flush_held()?;
        self.file.with(|f| f.sync_data())?;
        Ok(())
    }
}

/// The files of one hypercore, kept so they can be synced from outside the core.
#[derive(Debug, Default)]
pub(crate) struct SyncSet {
    files: StdMutex<Vec<Arc<FileSlot>>>,
    dir: Option<PathBuf>,
    /// Count of writes issued to any file of this set.
    writes: Arc<AtomicU64>,
    /// Length of the oplog file.
    oplog_len: Arc<AtomicU64>,
    /// Tree writes not yet issued (see [`HeldWrites`]).
    held: Arc<StdMutex<HeldWrites>>,
    /// Highest write count known to be on stable storage; the lock serialises syncs.
    synced: tokio::sync::Mutex<u64>,
    /// Copy of `synced` readable without the lock.
    durable: AtomicU64,
}

impl SyncSet {
    /// An empty set for the core stored in `dir`.
    pub(crate) fn for_dir(dir: &Path) -> Arc<Self> {
        let writes = Arc::new(AtomicU64::new(0));
        Arc::new(SyncSet {
            dir: Some(dir.to_path_buf()),
            held: Arc::new(StdMutex::new(HeldWrites {
                issued: writes.clone(),
                ..Default::default()
            })),
            writes,
            ..Default::default()
        })
    }

    /// The set's slot for the file at `path`, if it has one.
    fn slot(&self, path: &Path) -> Option<Arc<FileSlot>> {
        let files = self.files.lock().ok()?;
        files.iter().find(|slot| slot.path == path).cloned()
    }

    /// Closes the files' descriptors (their core was unloaded); they reopen on use.
    pub(crate) fn release_files(&self) {
        let Ok(files) = self.files.lock() else {
            return;
        };
        for slot in files.iter() {
            if let Ok(mut file) = slot.file.write()
                && matches!(*file, SlotFile::Open(_))
            {
                *file = SlotFile::Evicted;
            }
        }
    }

    /// Whether the core's oplog holds entries not yet folded into its tree and
    /// bitfield (hypercore folds them in on every fourth operation).
    pub(crate) fn has_oplog_entries(&self) -> bool {
        self.oplog_len.load(Ordering::Acquire) > OPLOG_ENTRIES_AT as u64
    }

    /// Makes every write issued so far durable. Callers that arrive while a sync
    /// runs wait for it and then find their writes covered, so N concurrent
    /// appends cost one round of fsyncs, not N.
    pub(crate) async fn sync(self: &Arc<Self>) -> Result<()> {
        let wanted = self.writes.load(Ordering::Acquire);
        let mut synced = self.synced.lock().await;
        if *synced >= wanted {
            return Ok(());
        }
        // Everything issued up to now is covered by this round.
        let target = self.writes.load(Ordering::Acquire);
        let files: Vec<Arc<FileSlot>> = self.files.lock().map(|f| f.clone()).unwrap_or_default();
        let dir = self.dir.clone();
        let held = self.held.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            lock_held(&held)?.flush()?;
            for file in &files {
                file.with(|f| f.sync_data())?;
            }
            if let Some(dir) = dir {
                // New files must also be reachable after a power loss.
                File::open(&dir)?.sync_all()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::io("sync", io::Error::other(e)))?
        .map_err(|e| Error::io("sync feed files", e))?;
        *synced = target;
        self.durable.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Whether writes were issued since they were last made durable.
    pub(crate) fn needs_sync(&self) -> bool {
        self.writes.load(Ordering::Acquire) > self.durable.load(Ordering::Acquire)
    }

    /// Count of writes issued so far (a mark for [`SyncSet::mark_durable`]).
    pub(crate) fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Records that writes up to `mark` reached stable storage by other means (a
    /// filesystem-wide sync that began after they were written out).
    pub(crate) async fn mark_durable(&self, mark: u64) {
        let mut synced = self.synced.lock().await;
        *synced = (*synced).max(mark);
        self.durable.fetch_max(mark, Ordering::AcqRel);
    }

    /// Syncs, then closes every file: later reads and writes fail, and the
    /// directory can be removed.
    pub(crate) async fn close(self: &Arc<Self>) -> Result<()> {
        let synced = self.sync().await;
        if let Ok(mut files) = self.files.lock() {
            for slot in files.drain(..) {
                slot.close();
            }
        }
        synced
    }
}

/// Makes everything written to the filesystem that holds `dir` durable, with one
/// `syncfs` instead of an fsync per file (cheaper for many feeds at once).
pub(crate) async fn sync_filesystem(dir: &Path) -> Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        let handle = File::open(&dir)?;
        rustix::fs::syncfs(&handle)?;
        Ok(())
    })
    .await
    .map_err(|e| Error::io("sync", io::Error::other(e)))?
    .map_err(|e| Error::io("sync the storage filesystem", e))
}

fn store_file_name(store: &Store) -> &'static str {
    match store {
        Store::Tree => "tree",
        Store::Data => "data",
        Store::Bitfield => "bitfield",
        Store::Oplog => "oplog",
    }
}

/// Storage for one hypercore.
pub(crate) struct CoreStorage {
    pub(crate) storage: Storage,
    pub(crate) sync: Option<Arc<SyncSet>>,
}

/// Opens (creating if `create`) the plain-file storage of one hypercore in `dir`,
/// with a fresh [`SyncSet`].
pub(crate) async fn open_dir(
    dir: &Path,
    create: bool,
    pool: &Arc<FilePool>,
) -> Result<CoreStorage> {
    let set = SyncSet::for_dir(dir);
    let storage = open_dir_with(dir, create, pool, &set).await?;
    Ok(CoreStorage {
        storage,
        sync: Some(set),
    })
}

/// Opens the plain-file storage of one hypercore in `dir` through `set`, reusing
/// the set's file slots when the core is opened again after an unload.
pub(crate) async fn open_dir_with(
    dir: &Path,
    create: bool,
    pool: &Arc<FilePool>,
    set: &Arc<SyncSet>,
) -> Result<Storage> {
    // A directory made just now holds no files: they need no stat (four system
    // calls per feed, a twentieth of the time taken to learn 10,000 new feeds).
    let fresh = create && make_dir(dir)?;
    let dir_owned = dir.to_path_buf();
    let set_for_open = set.clone();
    let pool = pool.clone();
    Storage::open(
        move |store| {
            let path = dir_owned.join(store_file_name(&store));
            let store = store.clone();
            let set = set_for_open.clone();
            let pool = pool.clone();
            Box::pin(async move {
                // Existing files are only stat'ed here; they open on first use.
                let length = if fresh {
                    None
                } else {
                    match std::fs::metadata(&path) {
                        Ok(meta) => Some(meta.len()),
                        Err(e) if create && e.kind() == io::ErrorKind::NotFound => None,
                        Err(e) => return Err(io_err("stat", &path, e)),
                    }
                };
                let slot = match set.slot(&path) {
                    Some(slot) => slot,
                    None => {
                        let slot = new_slot(path.clone(), length.is_some(), &pool)?;
                        if let Ok(mut files) = set.files.lock() {
                            files.push(slot.clone());
                        }
                        slot
                    }
                };
                let length = length.unwrap_or(0);
                let held = match store {
                    Store::Tree => {
                        if let Ok(mut held) = set.held.lock() {
                            held.file = Some(slot.clone());
                        }
                        Held::Holder(set.held.clone())
                    }
                    Store::Oplog => Held::Barrier(set.held.clone()),
                    Store::Data | Store::Bitfield => Held::No,
                };
                let file = PlainFile {
                    cache: matches!(store, Store::Tree).then(PageCache::default),
                    oplog_len: matches!(store, Store::Oplog).then(|| set.oplog_len.clone()),
                    file: slot,
                    length,
                    writes: set.writes.clone(),
                    held,
                };
                file.mirror_oplog_len();
                Ok(Box::new(file) as Box<dyn StorageTraits + Send>)
            })
        },
        false,
    )
    .await
    .map_err(|e| Error::Damaged {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Creates `dir` (and missing parents); returns whether it did not exist before.
fn make_dir(dir: &Path) -> Result<bool> {
    let context = || format!("create {}", dir.display());
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(context(), e))?;
            Ok(true)
        }
        Err(e) => Err(Error::io(context(), e)),
    }
}

/// A slot for the file at `path`, creating the file unless it `exists`.
fn new_slot(
    path: PathBuf,
    exists: bool,
    pool: &Arc<FilePool>,
) -> std::result::Result<Arc<FileSlot>, RandomAccessError> {
    let file = if exists {
        SlotFile::Evicted
    } else {
        SlotFile::Open(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io_err("create", &path, e))?,
        )
    };
    let slot = Arc::new(FileSlot {
        path,
        file: RwLock::new(file),
        referenced: AtomicBool::new(true),
        pool: pool.clone(),
    });
    if !exists {
        pool.register(&slot);
    }
    Ok(slot)
}

/// In-memory storage for one hypercore.
pub(crate) async fn open_memory() -> Result<CoreStorage> {
    let storage = Storage::new_memory()
        .await
        .map_err(|e| Error::core("memory", e))?;
    Ok(CoreStorage {
        storage,
        sync: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree cache always reads what the file holds, across writes that extend
    /// the file, overwrite cached pages, and truncations.
    #[tokio::test]
    async fn cached_tree_reads_match_the_file() {
        exercise_tree_file(false).await;
    }

    #[tokio::test]
    async fn held_tree_writes_reach_the_file_before_the_oplog_changes() {
        exercise_tree_file(true).await;
    }

    fn slot(pool: &Arc<FilePool>, path: &Path) -> Arc<FileSlot> {
        std::fs::write(path, b"").unwrap();
        Arc::new(FileSlot {
            path: path.to_path_buf(),
            file: RwLock::new(SlotFile::Evicted),
            referenced: AtomicBool::new(true),
            pool: pool.clone(),
        })
    }

    /// Random writes, reads and truncates of a tree file against a model of its
    /// bytes. With `hold`, its writes are held and an oplog file is the barrier:
    /// after each oplog write the tree file on disk must equal the model.
    async fn exercise_tree_file(hold: bool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::new(64);
        let path = dir.path().join("tree");
        let tree_slot = slot(&pool, &path);
        let issued = Arc::new(AtomicU64::new(0));
        let held = Arc::new(StdMutex::new(HeldWrites {
            file: Some(tree_slot.clone()),
            issued: issued.clone(),
            ..Default::default()
        }));
        let mut file = PlainFile {
            cache: Some(PageCache::default()),
            oplog_len: None,
            file: tree_slot,
            length: 0,
            writes: issued.clone(),
            held: if hold {
                Held::Holder(held.clone())
            } else {
                Held::No
            },
        };
        let mut oplog = PlainFile {
            cache: None,
            oplog_len: None,
            file: slot(&pool, &dir.path().join("oplog")),
            length: 0,
            writes: issued.clone(),
            held: Held::Barrier(held.clone()),
        };
        let mut model: Vec<u8> = Vec::new();
        let mut seed = 7u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for step in 0..20_000u64 {
            match next() % 10 {
                0..=3 => {
                    // Append or overwrite a 40-byte node.
                    let at = if model.is_empty() {
                        0
                    } else {
                        next() % (model.len() as u64 + 40)
                    };
                    let data = [step as u8; 40];
                    file.write(at, &data).await.unwrap();
                    if model.len() < (at + 40) as usize {
                        model.resize((at + 40) as usize, 0);
                    }
                    model[at as usize..at as usize + 40].copy_from_slice(&data);
                }
                4 if step % 1000 == 4 => {
                    let to = next() % (model.len() as u64 + 1);
                    file.truncate(to).await.unwrap();
                    model.truncate(to as usize);
                }
                5 if hold && step % 7 == 0 => {
                    let writes_before = issued.load(Ordering::Acquire);
                    oplog.write(0, b"header").await.unwrap();
                    assert_eq!(std::fs::read(&path).unwrap(), model, "step {step}");
                    assert!(issued.load(Ordering::Acquire) > writes_before);
                }
                _ if model.len() >= 40 => {
                    let len = 1 + next() % 80.min(model.len() as u64);
                    let at = next() % (model.len() as u64 - len + 1);
                    let got = file.read(at, len).await.unwrap();
                    assert_eq!(got, &model[at as usize..(at + len) as usize], "step {step}");
                }
                _ => {}
            }
        }
        assert!(
            file.cache.as_ref().unwrap().enabled(),
            "the cache was exercised"
        );
        drop(file);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            model,
            "dropping writes what is held"
        );
    }
}
