//! On-disk storage for hypercores: a plain-file backend without per-write fsync,
//! plus batched syncs (group commit) for power-loss durability.
//!
//! The stock `hypercore::Storage::new_disk` fsyncs after every write (about 2.4
//! fsyncs per appended entry). This backend writes with positioned writes into
//! the OS page cache instead, so a write that returned survives a crash of the
//! process; [`SyncSet::sync`] makes everything written so far survive a power
//! loss, and concurrent callers share one round of fsyncs.

use std::{
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

/// One file of a hypercore, written with positioned writes and no fsync.
#[derive(Debug)]
struct PlainFile {
    /// For the core's oplog: its length, mirrored for [`SyncSet::has_oplog_entries`]
    /// (see also [`replayable_oplog_len`]).
    oplog_len: Option<Arc<AtomicU64>>,
    file: Arc<FileSlot>,
    length: u64,
    writes: Arc<AtomicU64>,
}

impl PlainFile {
    fn mirror_oplog_len(&self) {
        if let Some(len) = &self.oplog_len {
            len.store(self.length, Ordering::Release);
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
        self.file.with(|f| f.write_all_at(data, offset))?;
        self.length = self.length.max(offset + data.len() as u64);
        self.writes.fetch_add(1, Ordering::Release);
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
        // Bounded by the file's own length, checked above.
        let mut buf = vec![0u8; length as usize];
        self.file.with(|f| f.read_exact_at(&mut buf, offset))?;
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
        self.file.with(|f| f.set_len(length))?;
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
    /// Highest write count known to be on stable storage; the lock serialises syncs.
    synced: tokio::sync::Mutex<u64>,
}

impl SyncSet {
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
        tokio::task::spawn_blocking(move || -> io::Result<()> {
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
        Ok(())
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

/// Opens (creating if `create`) the plain-file storage of one hypercore in `dir`.
pub(crate) async fn open_dir(
    dir: &Path,
    create: bool,
    pool: &Arc<FilePool>,
) -> Result<CoreStorage> {
    if create {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    }
    let set = Arc::new(SyncSet {
        dir: Some(dir.to_path_buf()),
        ..Default::default()
    });
    let dir_owned = dir.to_path_buf();
    let set_for_open = set.clone();
    let pool = pool.clone();
    let storage = Storage::open(
        move |store| {
            let path = dir_owned.join(store_file_name(&store));
            let store = store.clone();
            let set = set_for_open.clone();
            let pool = pool.clone();
            Box::pin(async move {
                // Existing files are only stat'ed here; they open on first use.
                let (file, length) = match std::fs::metadata(&path) {
                    Ok(meta) => (SlotFile::Evicted, meta.len()),
                    Err(e) if create && e.kind() == io::ErrorKind::NotFound => {
                        let file = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&path)
                            .map_err(|e| io_err("create", &path, e))?;
                        (SlotFile::Open(file), 0)
                    }
                    Err(e) => return Err(io_err("stat", &path, e)),
                };
                let opened = matches!(file, SlotFile::Open(_));
                let slot = Arc::new(FileSlot {
                    path,
                    file: RwLock::new(file),
                    referenced: AtomicBool::new(true),
                    pool: pool.clone(),
                });
                if opened {
                    pool.register(&slot);
                }
                if let Ok(mut files) = set.files.lock() {
                    files.push(slot.clone());
                }
                let file = PlainFile {
                    oplog_len: matches!(store, Store::Oplog).then(|| set.oplog_len.clone()),
                    file: slot,
                    length,
                    writes: set.writes.clone(),
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
    })?;
    Ok(CoreStorage {
        storage,
        sync: Some(set),
    })
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
