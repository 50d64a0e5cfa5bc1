//! The [`Multifeed`] handle: named local writers, remote feeds, the hidden index,
//! events and the storage lifecycle.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use futures::{Stream, StreamExt};
use hypercore::{HypercoreBuilder, PartialKeypair};
use tokio::sync::{Mutex, broadcast};

use crate::{
    error::{Error, Result},
    feed::Feed,
    index::{IndexCore, IndexRecord, MAX_NAME_LEN},
    keys::{AsFeedKey, FeedKey, Keypair, SharedKey},
    residency::{self, CoreSource, Residency, SharedFeed},
    storage::{self, Durability, FilePool, StorageConfig, SyncSet},
};

/// Options for [`Multifeed::open`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// What an acknowledged append survives. Default: [`Durability::Process`].
    pub durability: Durability,
    /// How many events a slow [`Multifeed::events`] subscriber may fall behind
    /// before it gets [`Event::Lagged`]. Default: 1024.
    pub event_capacity: usize,
    /// Most files kept open at once across all feeds; others are reopened on demand.
    /// Default: 1024.
    pub max_open_files: usize,
    /// Most feeds whose hypercore is kept loaded in memory (about 20 KB each); the
    /// least recently used others are unloaded and load again on use. Their
    /// lengths stay known. Default: 256. In-memory groups keep every feed loaded.
    pub max_loaded_feeds: usize,
    /// Most feeds requested from peers that may wait at once, over all sessions,
    /// before they deliver a verified block or signed length and become members
    /// (see [`AdmissionStats`]). A session that would pass it ends with
    /// [`Error::TooManyUnprovenFeeds`]. Default: 4096.
    pub max_unproven_feeds: usize,
    /// Metadata our own writers carry when offered to peers (see
    /// [`Feed::metadata`]), e.g. `gateway` = this gateway's name. Kept within
    /// small bounds (8 entries, keys ≤ 64 bytes, values ≤ 256). Default: none.
    pub writer_metadata: crate::FeedMetadata,
    /// Opens the group for reading only (a store on a read-only mount, or files
    /// this process may not write): nothing on disk is created, written,
    /// truncated or synced, and the fixes an open would write are made in memory
    /// only. Appends, new writers, replication and [`Multifeed::repair`] fail
    /// with [`Error::ReadOnly`]. No other process may write the group meanwhile
    /// (the CLI holds a shared lock for that). Default: false.
    pub read_only: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            event_capacity: 1024,
            max_open_files: 1024,
            max_loaded_feeds: 256,
            max_unproven_feeds: 4096,
            writer_metadata: Default::default(),
            read_only: false,
        }
    }
}

impl Options {
    /// Sets [`Options::writer_metadata`].
    pub fn writer_metadata(mut self, metadata: crate::FeedMetadata) -> Self {
        self.writer_metadata = metadata;
        self
    }

    /// Sets [`Options::read_only`].
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets [`Options::durability`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Sets [`Options::max_open_files`].
    pub fn max_open_files(mut self, max: usize) -> Self {
        self.max_open_files = max;
        self
    }

    /// Sets [`Options::max_loaded_feeds`].
    pub fn max_loaded_feeds(mut self, max: usize) -> Self {
        self.max_loaded_feeds = max;
        self
    }

    /// Sets [`Options::max_unproven_feeds`].
    pub fn max_unproven_feeds(mut self, max: usize) -> Self {
        self.max_unproven_feeds = max;
        self
    }

    /// Sets [`Options::event_capacity`].
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity;
        self
    }
}

/// Something that happened to the multifeed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A feed became a member: a new local writer, or a remote feed.
    FeedAdded {
        /// The feed's key.
        key: FeedKey,
        /// Its local writer name, if it is ours.
        name: Option<String>,
        /// Whether it is a local (writable) feed.
        local: bool,
    },
    /// The subscriber fell behind and missed this many events; call
    /// [`Multifeed::feeds`] to resynchronise.
    Lagged {
        /// Number of events dropped.
        missed: u64,
    },
}

/// A member feed that was recorded in the index but could not be loaded at open.
/// The other feeds load regardless.
#[derive(Debug, Clone)]
pub struct SkippedFeed {
    /// The feed's key, if the index record itself was readable.
    pub key: Option<FeedKey>,
    /// Its local writer name, if any.
    pub name: Option<String>,
    /// Where its storage was expected.
    pub path: PathBuf,
    /// What was wrong.
    pub reason: String,
    /// Whether its files are damaged or could not be opened.
    pub kind: SkipKind,
}

/// Why a member feed was skipped at open (see [`SkippedFeed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SkipKind {
    /// Its files are missing, damaged or belong to another feed.
    Damaged,
    /// The operating system refused access to its files (permissions, an
    /// immutable file, a read-only mount): nothing is known to be damaged.
    AccessRefused,
}

/// How feeds offered by peers fared: a feed a session asked for is held on
/// trial (its files exist, it is no member, it is offered to nobody) until it
/// delivers a verified block or signed length, then admitted; one that never
/// delivers is discarded with its files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdmissionStats {
    /// Feeds on trial now.
    pub unproven: usize,
    /// Feeds admitted as members after delivering.
    pub admitted: u64,
    /// Feeds discarded because they delivered nothing.
    pub discarded: u64,
    /// Sessions ended because a limit on unproven feeds was reached
    /// ([`Error::TooManyUnprovenFeeds`]).
    pub limit_hits: u64,
}

/// A feed on trial and how many sessions hold it.
struct Candidate {
    feed: Feed,
    holders: usize,
}

#[derive(Default)]
struct Members {
    order: Vec<Feed>,
    by_key: HashMap<FeedKey, usize>,
    by_name: HashMap<String, usize>,
}

impl Members {
    fn insert(&mut self, feed: Feed) {
        let at = self.order.len();
        self.by_key.insert(feed.key(), at);
        if let Some(name) = feed.name() {
            self.by_name.insert(name.to_owned(), at);
        }
        self.order.push(feed);
    }
}

struct Inner {
    storage: StorageConfig,
    shared_key: SharedKey,
    options: Options,
    /// Serialises every change to membership (the writer lock): names are checked
    /// under the same lock that creates feeds, so concurrent `writer` calls agree.
    write: Mutex<Option<IndexCore>>,
    members: RwLock<Members>,
    events: broadcast::Sender<Event>,
    skipped: Vec<SkippedFeed>,
    /// Feed directories found at open that the index does not list (until `repair`).
    unlisted: std::sync::Mutex<Vec<PathBuf>>,
    pool: Arc<FilePool>,
    residency: Arc<Residency>,
    closed: AtomicBool,
    /// Feeds on trial, changed only under `write`.
    candidates: std::sync::Mutex<HashMap<FeedKey, Candidate>>,
    admitted: AtomicU64,
    discarded: AtomicU64,
    limit_hits: AtomicU64,
    /// Metadata peers offered for feeds not created yet.
    pending_metadata: std::sync::Mutex<crate::metadata::Pending>,
}

/// A group of hypercores under one shared key. Cheap to clone: clones share one group.
///
/// Every peer writes only its own feeds (named local writers); remote feeds are
/// read-only copies learnt from peers. Membership is kept in a hidden local index
/// so that reopening recomposes the group exactly, in order of admission.
#[derive(Clone)]
pub struct Multifeed {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Multifeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Multifeed")
            .field("storage", &self.inner.storage)
            .field("feeds", &self.feeds().len())
            .finish()
    }
}

fn feeds_dir(root: &Path) -> PathBuf {
    root.join("feeds")
}

fn feed_dir(root: &Path, key: &FeedKey) -> PathBuf {
    feeds_dir(root).join(key.to_hex())
}

/// A file in the directory of a feed on trial, written before the feed's own
/// files and removed once the feed is recorded as a member: a directory holding
/// it and unknown to the index was left by a crash during a trial, and holds no
/// feed that was ever admitted. Directories without it are never deleted (one
/// may hold the only copy of a feed whose index record was lost).
const ON_TRIAL_MARK: &str = "on-trial";

impl Multifeed {
    /// Opens the group stored in `storage` (creating it if empty) under `shared_key`.
    ///
    /// Every member recorded in the index is loaded, local writers writable again.
    /// A member whose storage is missing or damaged is skipped and listed in
    /// [`Multifeed::skipped`]; the others load. The shared key is kept in memory only.
    pub async fn open(
        storage: StorageConfig,
        shared_key: SharedKey,
        options: Options,
    ) -> Result<Self> {
        let read_only = options.read_only;
        if let (StorageConfig::Dir(root), false) = (&storage, read_only) {
            std::fs::create_dir_all(feeds_dir(root)).map_err(|e| {
                Error::io(format!("create storage directory {}", root.display()), e)
            })?;
        }
        let pool = FilePool::with_mode(options.max_open_files, read_only);
        let residency = Residency::new(options.max_loaded_feeds);
        let mut index = IndexCore::open(&storage, options.durability, &pool).await?;
        let (records, bad) = index.records().await?;
        let recorded: HashSet<FeedKey> = records.iter().map(|r| r.key).collect();
        if let (StorageConfig::Dir(root), false) = (&storage, read_only) {
            // Every record readable: a feed on trial that is in none of them was
            // never admitted, and its files can go.
            clear_trial_leftovers(root, &recorded, bad.is_empty());
        }
        // Read-only, those leftovers stay: they are no member and no lost feed.
        let hide_trial_leftovers = read_only && bad.is_empty();
        let mut skipped: Vec<SkippedFeed> = bad
            .into_iter()
            .map(|b| SkippedFeed {
                key: None,
                name: None,
                path: match &storage {
                    StorageConfig::Dir(root) => crate::index::index_dir(root),
                    StorageConfig::Memory => PathBuf::new(),
                },
                reason: format!("index record {} unreadable: {}", b.seq, b.reason),
                kind: SkipKind::Damaged,
            })
            .collect();

        let mut members = Members::default();
        for record in records {
            if members.by_key.contains_key(&record.key)
                || record
                    .local_name
                    .as_ref()
                    .is_some_and(|n| members.by_name.contains_key(n))
            {
                continue;
            }
            match load_feed(&storage, &record, options.durability, &pool, &residency).await {
                Ok(feed) => {
                    if let (StorageConfig::Dir(root), Some(name), false) =
                        (&storage, feed.name(), read_only)
                    {
                        keep_writer_name(&feed_dir(root, &record.key), name);
                    }
                    let metadata = match (&storage, feed.is_local()) {
                        (_, true) => Some(crate::metadata::bounded(&options.writer_metadata)),
                        (StorageConfig::Dir(root), false) => {
                            crate::metadata::read_info(&feed_dir(root, &record.key), &record.key)
                        }
                        (StorageConfig::Memory, false) => None,
                    };
                    if let Some(metadata) = metadata {
                        let _ = feed.inner.metadata.set(metadata);
                    }
                    members.insert(feed)
                }
                Err((reason, kind)) => {
                    let path = match &storage {
                        StorageConfig::Dir(root) => feed_dir(root, &record.key),
                        StorageConfig::Memory => PathBuf::new(),
                    };
                    tracing::warn!(key = %record.key, path = %path.display(), %reason, "skipping member feed");
                    skipped.push(SkippedFeed {
                        key: Some(record.key),
                        name: record.local_name.clone(),
                        path,
                        reason,
                        kind,
                    });
                }
            }
        }
        let unlisted = match &storage {
            StorageConfig::Dir(root) => {
                let mut unlisted = unlisted_feed_dirs(root, &members, &skipped);
                if hide_trial_leftovers {
                    unlisted.retain(|dir| !dir.join(ON_TRIAL_MARK).is_file());
                }
                unlisted
            }
            StorageConfig::Memory => Vec::new(),
        };

        let (events, _) = broadcast::channel(options.event_capacity.max(1));
        Ok(Self {
            inner: Arc::new(Inner {
                storage,
                shared_key,
                options,
                write: Mutex::new(Some(index)),
                members: RwLock::new(members),
                events,
                skipped,
                unlisted: std::sync::Mutex::new(unlisted),
                pool,
                residency,
                closed: AtomicBool::new(false),
                candidates: Default::default(),
                admitted: AtomicU64::new(0),
                discarded: AtomicU64::new(0),
                limit_hits: AtomicU64::new(0),
                pending_metadata: Default::default(),
            }),
        })
    }

    /// The group's shared key.
    pub fn shared_key(&self) -> &SharedKey {
        &self.inner.shared_key
    }

    /// Where the group is stored.
    pub fn storage(&self) -> &StorageConfig {
        &self.inner.storage
    }

    /// Whether the group was opened with [`Options::read_only`].
    pub fn is_read_only(&self) -> bool {
        self.inner.options.read_only
    }

    /// [`Error::ReadOnly`] for `what` if the group was opened read-only.
    fn refuse_if_read_only(&self, what: impl FnOnce() -> String) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::read_only(what()));
        }
        Ok(())
    }

    /// Members that were recorded but could not be loaded at open.
    pub fn skipped(&self) -> &[SkippedFeed] {
        &self.inner.skipped
    }

    /// Feed directories found under `feeds/` at open that the index does not list:
    /// their blocks are kept but neither read nor replicated. A lost or damaged
    /// index leaves every feed here; an interrupted writer creation or download
    /// can leave one. Never deleted by multifeed; [`Multifeed::repair`] lists them
    /// again.
    pub fn unlisted_feed_dirs(&self) -> Vec<PathBuf> {
        self.lock_unlisted().clone()
    }

    fn lock_unlisted(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.inner
            .unlisted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes every unlisted feed directory ([`Multifeed::unlisted_feed_dirs`])
    /// back into the index, as it was: a directory holding a secret key is a
    /// local writer again, under the name kept in it (`writer-name`; a store
    /// written before that file existed gets `topic/<T>` for a topic feed, from
    /// its first message, else `recovered-<key prefix>`), any other one a remote
    /// feed. Nothing is deleted or rewritten; a directory that cannot be taken
    /// back is left as it is, with the reason.
    pub async fn repair(&self) -> Result<RepairReport> {
        let StorageConfig::Dir(root) = &self.inner.storage else {
            return Ok(RepairReport::default());
        };
        self.refuse_if_read_only(|| "repairing the index".into())?;
        let mut index = self.inner.write.lock().await;
        let index = index.as_mut().ok_or(Error::Closed)?;
        let mut report = RepairReport::default();
        let unlisted = self.unlisted_feed_dirs();
        for dir in unlisted {
            match self.relist(root, &dir).await {
                Ok((record, feed)) => {
                    index.append(&record).await?;
                    report
                        .relisted
                        .push((record.key, record.local_name.clone()));
                    self.admit(feed);
                    self.lock_unlisted().retain(|d| *d != dir);
                }
                Err(reason) => report.left.push((dir, reason)),
            }
        }
        Ok(report)
    }

    /// The index record and loaded feed of the unlisted feed directory `dir`.
    async fn relist(
        &self,
        root: &Path,
        dir: &Path,
    ) -> std::result::Result<(IndexRecord, Feed), String> {
        let key = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| FeedKey::from_hex(n).ok())
            .ok_or("its name is not a feed key")?;
        if self.contains(&key) {
            return Err("its key is already a member".into());
        }
        // Never admitted: a peer offered it and a crash came before it proved
        // itself. Taking it in would admit what the peer never proved.
        if dir.join(ON_TRIAL_MARK).is_file() {
            return Err(
                "it was a feed on trial, never admitted (left by an interrupted session); delete it or let the next sync fetch it again".into(),
            );
        }
        let (pool, residency) = (&self.inner.pool, &self.inner.residency);
        let durability = self.inner.options.durability;
        let storage = &self.inner.storage;
        // Loading as a local writer fails unless the directory holds the secret key.
        let probe = IndexRecord::new(key, Some(String::new()));
        let local = load_feed(storage, &probe, durability, pool, residency)
            .await
            .is_ok();
        let name = match (local, crate::metadata::read_writer_name(dir)) {
            (false, _) => None,
            (true, Some(name)) => Some(name),
            (true, None) => Some(self.guess_writer_name(storage, key).await),
        };
        if let Some(name) = &name {
            validate_name(name).map_err(|e| e.to_string())?;
            if let Some(other) =
                self.read_members(|m| m.by_name.get(name).map(|&i| m.order[i].key()))
            {
                return Err(format!("its writer name {name:?} is taken by feed {other}"));
            }
        }
        let record = IndexRecord::new(key, name);
        let feed = load_feed(storage, &record, durability, pool, residency)
            .await
            .map_err(|(reason, _)| reason)?;
        let metadata = match &record.local_name {
            Some(name) => {
                keep_writer_name(dir, name);
                Some(crate::metadata::bounded(
                    &self.inner.options.writer_metadata,
                ))
            }
            None => crate::metadata::read_info(&feed_dir(root, &key), &key),
        };
        if let Some(metadata) = metadata {
            let _ = feed.inner.metadata.set(metadata);
        }
        Ok((record, feed))
    }

    /// A name for a local writer whose name was lost with the index: `topic/<T>`
    /// for a feed of topic `T` when that name is free, else `recovered-<key prefix>`.
    async fn guess_writer_name(&self, storage: &StorageConfig, key: FeedKey) -> String {
        let fallback = format!("recovered-{}", &key.to_hex()[..16]);
        let probe = IndexRecord::new(key, None);
        let (pool, residency) = (&self.inner.pool, &self.inner.residency);
        let durability = self.inner.options.durability;
        let Ok(feed) = load_feed(storage, &probe, durability, pool, residency).await else {
            return fallback;
        };
        let topic = match feed.get(0).await {
            Ok(Some(block)) => crate::topics::block_topic(&block),
            _ => None,
        };
        match topic.map(|t| format!("{}{t}", crate::topics::WRITER_PREFIX)) {
            Some(name) if self.read_members(|m| !m.by_name.contains_key(&name)) => name,
            _ => fallback,
        }
    }

    /// Every member feed, local and remote, in order of admission. Never includes
    /// the hidden index core. Empty after [`Multifeed::close`].
    pub fn feeds(&self) -> Vec<Feed> {
        self.read_members(|m| m.order.clone())
    }

    /// The local writers, in order of admission; each has a [`Feed::name`].
    pub fn writers(&self) -> Vec<Feed> {
        self.read_members(|m| m.order.iter().filter(|f| f.is_local()).cloned().collect())
    }

    /// The member feed with this key (a [`FeedKey`], 32 bytes, or hex in either
    /// case), or `None` if it is not a member or the input is not a key.
    pub fn feed(&self, key: impl AsFeedKey) -> Option<Feed> {
        let key = key.as_feed_key().ok()?;
        self.read_members(|m| m.by_key.get(&key).map(|&i| m.order[i].clone()))
    }

    /// Whether a feed with this key is a member.
    pub fn contains(&self, key: &FeedKey) -> bool {
        self.read_members(|m| m.by_key.contains_key(key))
    }

    fn read_members<T>(&self, f: impl FnOnce(&Members) -> T) -> T {
        // A poisoned lock only means a panic elsewhere; the data is still consistent
        // because every mutation is a single insert.
        let members = self.inner.members.read().unwrap_or_else(|e| e.into_inner());
        f(&members)
    }

    /// The local writer called `name`, created with a fresh key pair on first use.
    ///
    /// Concurrent calls with the same name return the same feed. Names are local
    /// labels, never sent to peers, and never resolve to a remote feed.
    pub async fn writer(&self, name: &str) -> Result<Feed> {
        self.writer_inner(name, None).await
    }

    /// Like [`Multifeed::writer`] but with a given key pair, for deterministic
    /// identities. Fails if `name` already exists with another key, or if the key
    /// is already a remote member.
    pub async fn writer_with_keypair(&self, name: &str, keypair: Keypair) -> Result<Feed> {
        self.writer_inner(name, Some(keypair)).await
    }

    async fn writer_inner(&self, name: &str, keypair: Option<Keypair>) -> Result<Feed> {
        validate_name(name)?;
        if self.is_read_only() {
            // An existing writer is still handed out: only its appends are refused.
            if let Some(existing) =
                self.read_members(|m| m.by_name.get(name).map(|&i| m.order[i].clone()))
                && keypair
                    .as_ref()
                    .is_none_or(|kp| kp.public_key() == existing.key())
            {
                return Ok(existing);
            }
            return Err(Error::read_only(format!("creating writer {name:?}")));
        }
        let mut index = self.inner.write.lock().await;
        let index = index.as_mut().ok_or(Error::Closed)?;
        if let Some(existing) =
            self.read_members(|m| m.by_name.get(name).map(|&i| m.order[i].clone()))
        {
            if let Some(kp) = &keypair
                && kp.public_key() != existing.key()
            {
                return Err(Error::WriterKeyMismatch {
                    name: name.to_owned(),
                    existing: existing.key().to_hex(),
                });
            }
            return Ok(existing);
        }
        let keypair = keypair.unwrap_or_else(Keypair::generate);
        let key = keypair.public_key();
        if key.as_bytes() == self.inner.shared_key.as_bytes() {
            return Err(Error::SharedKeyAsFeedKey);
        }
        if self.contains(&key) {
            return Err(Error::KeyConflict {
                key: key.to_hex(),
                role: "a remote feed or another writer",
                hint: "a key pair can own only one writer; use another key pair",
            });
        }
        let record = IndexRecord::new(key, Some(name.to_owned()));
        let feed = self.create_feed(&record, keypair.to_partial()).await?;
        if let StorageConfig::Dir(root) = &self.inner.storage {
            // Before the index record: a crash in between leaves a directory that
            // `repair` takes back under this name.
            let dir = feed_dir(root, &key);
            crate::metadata::write_writer_name(&dir, name).map_err(|e| {
                Error::io(format!("write the writer name into {}", dir.display()), e)
            })?;
        }
        index.append(&record).await?;
        self.admit(feed.clone());
        Ok(feed)
    }

    /// Adds a remote (read-only) feed by key; replication fills it. Returns the
    /// existing member if the key is one already (local or remote).
    pub async fn add_remote(&self, key: impl AsFeedKey) -> Result<Feed> {
        let key = key.as_feed_key()?;
        self.admit_remotes(&[key]).await?;
        // Only a close in between can take it away again.
        self.feed(key).ok_or(Error::Closed)
    }

    /// Adds remote feeds, recording the new ones in one index batch (one signature
    /// for a whole batch of keys learnt from a peer). Returns how many were new.
    pub(crate) async fn admit_remotes(&self, keys: &[FeedKey]) -> Result<usize> {
        if keys.iter().all(|key| self.contains(key)) {
            return Ok(0);
        }
        self.refuse_if_read_only(|| "adding a remote feed".into())?;
        let mut index = self.inner.write.lock().await;
        let index = index.as_mut().ok_or(Error::Closed)?;
        let mut created = Vec::new();
        for &key in keys {
            if self.contains(&key) || created.iter().any(|(f, _): &(Feed, _)| f.key() == key) {
                continue;
            }
            let (record, keypair) = self.remote_record(key)?;
            match self.create_feed(&record, keypair).await {
                Ok(feed) => created.push((feed, record)),
                Err(error) => {
                    self.discard_unrecorded(created, Some(key)).await;
                    return Err(error);
                }
            }
        }
        let records: Vec<IndexRecord> = created.iter().map(|(_, r)| r.clone()).collect();
        if let Err(error) = index.append_batch(&records).await {
            self.discard_unrecorded(created, None).await;
            return Err(error);
        }
        let count = created.len();
        for (feed, _) in created {
            self.admit(feed);
        }
        Ok(count)
    }

    /// How feeds offered by peers fared so far (for a metric).
    pub fn admission_stats(&self) -> AdmissionStats {
        AdmissionStats {
            unproven: self.lock_candidates().len(),
            admitted: self.inner.admitted.load(Ordering::Relaxed),
            discarded: self.inner.discarded.load(Ordering::Relaxed),
            limit_hits: self.inner.limit_hits.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn count_limit_hit(&self) {
        self.inner.limit_hits.fetch_add(1, Ordering::Relaxed);
    }

    fn lock_candidates(&self) -> std::sync::MutexGuard<'_, HashMap<FeedKey, Candidate>> {
        self.inner
            .candidates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A feed on trial, for a session to replicate into.
    pub(crate) fn candidate(&self, key: &FeedKey) -> Option<Feed> {
        self.lock_candidates().get(key).map(|c| c.feed.clone())
    }

    /// Takes a hold on each key that is not a member: a feed on trial, created
    /// (files, no index record) by the first holder. Returns the keys held. Fails
    /// with [`Error::TooManyUnprovenFeeds`] past [`Options::max_unproven_feeds`].
    pub(crate) async fn hold_candidates(&self, keys: &[FeedKey]) -> Result<Vec<FeedKey>> {
        self.refuse_if_read_only(|| "taking feeds from a peer".into())?;
        let _write = self.inner.write.lock().await;
        if _write.is_none() {
            return Err(Error::Closed);
        }
        let mut held = Vec::new();
        for &key in keys {
            if self.contains(&key) {
                continue;
            }
            if let Some(candidate) = self.lock_candidates().get_mut(&key) {
                candidate.holders += 1;
                held.push(key);
                continue;
            }
            let limit = self.inner.options.max_unproven_feeds;
            let created = if self.lock_candidates().len() >= limit {
                Err(Error::TooManyUnprovenFeeds {
                    limit,
                    scope: crate::AdmissionScope::Group,
                })
            } else {
                self.create_candidate(key).await
            };
            match created {
                Ok(feed) => {
                    self.lock_candidates()
                        .insert(key, Candidate { feed, holders: 1 });
                    held.push(key);
                }
                Err(error) => {
                    // The batch fails as a whole: its holds go too.
                    self.drop_holds_locked(&held).await;
                    return Err(error);
                }
            }
        }
        Ok(held)
    }

    /// The index record and read-only keypair of a peer's feed `key`; refuses the
    /// group's shared key and a key that is no public key.
    fn remote_record(&self, key: FeedKey) -> Result<(IndexRecord, PartialKeypair)> {
        if key.as_bytes() == self.inner.shared_key.as_bytes() {
            return Err(Error::SharedKeyAsFeedKey);
        }
        let keypair = PartialKeypair {
            public: key.verifying_key()?,
            secret: None,
        };
        Ok((IndexRecord::new(key, None), keypair))
    }

    async fn create_candidate(&self, key: FeedKey) -> Result<Feed> {
        let (record, keypair) = self.remote_record(key)?;
        if let StorageConfig::Dir(root) = &self.inner.storage {
            let dir = feed_dir(root, &key);
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::File::create(dir.join(ON_TRIAL_MARK)).map(drop))
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let created = self.create_feed(&record, keypair).await;
        if created.is_err() {
            self.discard_unrecorded(Vec::<(Feed, ())>::new(), Some(key))
                .await;
        }
        created
    }

    /// Drops holds without admitting anything (the writer lock is held).
    async fn drop_holds_locked(&self, keys: &[FeedKey]) {
        let mut discard = Vec::new();
        {
            let mut candidates = self.lock_candidates();
            for key in keys {
                if let Some(candidate) = candidates.get_mut(key) {
                    candidate.holders = candidate.holders.saturating_sub(1);
                    if candidate.holders == 0
                        && let Some(c) = candidates.remove(key)
                    {
                        discard.push((c.feed, ()));
                    }
                }
            }
        }
        self.discard_unrecorded(discard, None).await;
    }

    /// Drops one hold on each key. A feed on trial that delivered (its length is
    /// signed and above zero) becomes a member, recorded in one index batch, even
    /// if others still hold it; one that delivered nothing is discarded with its
    /// files once nobody holds it. Returns how many became members.
    pub(crate) async fn release_candidates(&self, keys: &[FeedKey]) -> Result<usize> {
        let mut write = self.inner.write.lock().await;
        let Some(index) = write.as_mut() else {
            return Err(Error::Closed);
        };
        let mut promote = Vec::new();
        let mut discard = Vec::new();
        {
            let mut candidates = self.lock_candidates();
            for key in keys {
                let Some(candidate) = candidates.get_mut(key) else {
                    continue;
                };
                candidate.holders = candidate.holders.saturating_sub(1);
                if candidate.feed.shared().info().length > 0 {
                    if let Some(c) = candidates.remove(key) {
                        promote.push(c.feed);
                    }
                } else if candidate.holders == 0
                    && let Some(c) = candidates.remove(key)
                {
                    discard.push(c.feed);
                }
            }
        }
        self.inner
            .discarded
            .fetch_add(discard.len() as u64, Ordering::Relaxed);
        self.discard_unrecorded(discard.into_iter().map(|f| (f, ())).collect(), None)
            .await;
        if promote.is_empty() {
            return Ok(0);
        }
        let records: Vec<IndexRecord> = promote
            .iter()
            .map(|f| IndexRecord::new(f.key(), None))
            .collect();
        if let Err(error) = index.append_batch(&records).await {
            // Back on trial: a later release retries, the last one discards.
            let mut candidates = self.lock_candidates();
            for feed in promote {
                candidates.insert(feed.key(), Candidate { feed, holders: 0 });
            }
            return Err(error);
        }
        let count = promote.len();
        self.inner
            .admitted
            .fetch_add(count as u64, Ordering::Relaxed);
        if let StorageConfig::Dir(root) = &self.inner.storage {
            for feed in &promote {
                // A member now: its directory must survive any crash from here on
                // (a mark left behind is cleared at the next open).
                let mark = feed_dir(root, &feed.key()).join(ON_TRIAL_MARK);
                if let Err(error) = std::fs::remove_file(&mark)
                    && error.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::debug!(path = %mark.display(), %error, "removing the on-trial mark of a new member");
                }
            }
        }
        for feed in promote {
            self.admit(feed);
        }
        Ok(count)
    }

    /// Undoes the creation of feeds that never made it into the index (and of the
    /// `failed` one, if its creation got half-way), so a failed admission leaves no
    /// directories behind (best effort: what cannot be removed is reported as an
    /// orphan at the next open).
    async fn discard_unrecorded<R>(&self, created: Vec<(Feed, R)>, failed: Option<FeedKey>) {
        let mut keys = Vec::with_capacity(created.len() + 1);
        for (feed, _) in created {
            keys.push(feed.key());
            if let Err(error) = feed.close().await {
                tracing::debug!(key = %feed.key(), %error, "closing an unrecorded feed");
            }
        }
        keys.extend(failed);
        if let StorageConfig::Dir(root) = &self.inner.storage {
            for key in &keys {
                let dir = feed_dir(root, key);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(path = %dir.display(), %error, "cannot remove the files of a feed that was not admitted");
                    }
                }
            }
        }
    }

    async fn create_feed(&self, record: &IndexRecord, keypair: PartialKeypair) -> Result<Feed> {
        let (storage, source) = match &self.inner.storage {
            StorageConfig::Dir(root) => {
                let dir = feed_dir(root, &record.key);
                let sync = SyncSet::for_dir(&dir);
                let storage = storage::open_dir_with(&dir, true, &self.inner.pool, &sync).await?;
                let source = CoreSource {
                    dir,
                    pool: self.inner.pool.clone(),
                    sync,
                    residency: self.inner.residency.clone(),
                };
                (storage, Some(source))
            }
            StorageConfig::Memory => (storage::open_memory().await?.storage, None),
        };
        let core = HypercoreBuilder::new(storage)
            .key_pair(keypair)
            .build()
            .await
            .map_err(|e| Error::core(record.key, e))?;
        let sync = source.as_ref().map(|s| s.sync.clone());
        if let (Some(sync), Durability::PowerLoss) = (&sync, self.inner.options.durability) {
            sync.sync().await?;
        }
        let local = record.local_name.is_some();
        let shared = SharedFeed::new(record.key, local, core, source).await;
        let feed = Feed::new(
            record.local_name.clone(),
            shared,
            sync,
            self.inner.options.durability,
        );
        if local {
            let metadata = crate::metadata::bounded(&self.inner.options.writer_metadata);
            let _ = feed.inner.metadata.set(metadata);
        } else {
            let offered = self.lock_pending_metadata().take(&record.key);
            if let Some(metadata) = offered {
                self.record_metadata(&feed, metadata).await;
            }
        }
        Ok(feed)
    }

    fn lock_pending_metadata(&self) -> std::sync::MutexGuard<'_, crate::metadata::Pending> {
        self.inner
            .pending_metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Metadata a peer offered with feeds (the first offer of each feed wins):
    /// recorded for remote feeds we hold, kept for a while for feeds we may
    /// create next. Never changes our own writers'.
    pub(crate) async fn learn_metadata(&self, offered: Vec<(FeedKey, crate::FeedMetadata)>) {
        for (key, metadata) in offered {
            let metadata = crate::metadata::bounded(&metadata);
            if metadata.is_empty() {
                continue;
            }
            match self.feed(key).or_else(|| self.candidate(&key)) {
                Some(feed) if feed.is_local() || feed.inner.metadata.get().is_some() => {}
                Some(feed) => self.record_metadata(&feed, metadata).await,
                None => self.lock_pending_metadata().offer(key, metadata),
            }
        }
    }

    /// Sets a remote feed's metadata and keeps it beside its files. Only the call
    /// that sets it writes the file, so the file and memory agree when two sessions
    /// offer labels at once. A failed write only costs the label after a restart.
    async fn record_metadata(&self, feed: &Feed, metadata: crate::FeedMetadata) {
        if feed.inner.metadata.set(metadata.clone()).is_err() {
            return;
        }
        if let StorageConfig::Dir(root) = &self.inner.storage {
            let key = feed.key();
            if let Err(e) =
                crate::metadata::write_info(&feed_dir(root, &key), &key, &metadata).await
            {
                tracing::warn!(%key, "cannot record the feed's metadata: {e}");
            }
        }
    }

    fn admit(&self, feed: Feed) {
        let event = Event::FeedAdded {
            key: feed.key(),
            name: feed.name().map(str::to_owned),
            local: feed.is_local(),
        };
        self.inner
            .members
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(feed);
        // No subscribers is fine.
        let _ = self.inner.events.send(event);
    }

    /// A stream of [`Event`]s. It first yields a `FeedAdded` for every feed that is
    /// already a member (including those loaded at open), then each change as it
    /// happens, so a subscriber sees every member exactly once. Bounded: a
    /// subscriber more than [`Options::event_capacity`] events behind gets
    /// [`Event::Lagged`].
    pub fn events(&self) -> impl Stream<Item = Event> + Send + Unpin + 'static {
        // Subscribing under the read lock means no feed is admitted between the
        // snapshot and the subscription.
        let (snapshot, receiver) = {
            let members = self.inner.members.read().unwrap_or_else(|e| e.into_inner());
            let snapshot: Vec<Event> = members
                .order
                .iter()
                .map(|f| Event::FeedAdded {
                    key: f.key(),
                    name: f.name().map(str::to_owned),
                    local: f.is_local(),
                })
                .collect();
            (snapshot, self.inner.events.subscribe())
        };
        let live = futures::stream::unfold(receiver, |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((event, rx)),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    Some((Event::Lagged { missed }, rx))
                }
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        Box::pin(futures::stream::iter(snapshot).chain(live))
    }

    /// Makes everything written so far, in every feed and the index, survive a
    /// power loss (one round of fsyncs per feed).
    pub async fn flush(&self) -> Result<()> {
        if self.is_read_only() {
            // Nothing was written, so nothing is synced.
            return if self.is_closed() {
                Err(Error::Closed)
            } else {
                Ok(())
            };
        }
        // The write lock only for the snapshot: held across the fsyncs, it would
        // stall `writer()` and replication's admissions for as long as they take.
        let index = {
            let index = self.inner.write.lock().await;
            index.as_ref().ok_or(Error::Closed)?.flusher()
        };
        let feeds = self.feeds();
        self.sync_many(&feeds).await?;
        for feed in feeds {
            feed.flush().await?;
        }
        index.flush().await
    }

    /// Whether [`Multifeed::close`] has completed.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Flushes every feed and the index to stable storage and releases every file
    /// handle: the storage directory can be deleted as soon as this returns.
    /// Idempotent; concurrent calls all return once the group is closed. Feed
    /// handles held elsewhere fail with [`Error::Closed`] afterwards.
    pub async fn close(&self) -> Result<()> {
        let mut index = self.inner.write.lock().await;
        let Some(index_core) = index.take() else {
            return Ok(());
        };
        let feeds = std::mem::take(
            &mut *self
                .inner
                .members
                .write()
                .unwrap_or_else(|e| e.into_inner()),
        );
        // Feeds still on trial are no members: they leave no files behind.
        let candidates: Vec<(Feed, ())> = self
            .lock_candidates()
            .drain()
            .map(|(_, c)| (c.feed, ()))
            .collect();
        self.discard_unrecorded(candidates, None).await;
        let mut first_error = self.sync_many(&feeds.order).await.err();
        for feed in &feeds.order {
            if let Err(e) = feed.close().await {
                first_error.get_or_insert(e);
            }
        }
        if let Err(e) = index_core.close().await {
            first_error.get_or_insert(e);
        }
        self.inner.closed.store(true, Ordering::Release);
        first_error.map_or(Ok(()), Err)
    }
}

/// From this many feeds with unsynced writes on, one filesystem-wide sync is cheaper
/// than an fsync per file (closing 10,000 fresh feeds: one call, not 50,000).
const GROUP_SYNC_MIN: usize = 16;

impl Multifeed {
    /// Makes the writes of many feeds durable at once; feeds it covers then skip their
    /// own fsyncs. Does nothing for a few feeds or in-memory storage.
    async fn sync_many(&self, feeds: &[Feed]) -> Result<()> {
        let StorageConfig::Dir(root) = &self.inner.storage else {
            return Ok(());
        };
        let dirty: Vec<_> = feeds
            .iter()
            .filter_map(|feed| feed.inner.sync.clone())
            .filter(|sync| sync.needs_sync())
            .collect();
        if dirty.len() < GROUP_SYNC_MIN {
            return Ok(());
        }
        // Marks first: every write counted in a mark has returned, so it is in the
        // OS before the filesystem sync starts.
        let marks: Vec<u64> = dirty.iter().map(|sync| sync.write_count()).collect();
        storage::sync_filesystem(root).await?;
        for (sync, mark) in dirty.iter().zip(marks) {
            sync.mark_durable(mark).await;
        }
        Ok(())
    }
}

fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NAME_LEN {
        "it is longer than 1024 bytes"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        name: name.chars().take(64).collect(),
        reason,
    })
}

/// Opens one recorded member; any failure becomes a reason to skip it.
async fn load_feed(
    storage: &StorageConfig,
    record: &IndexRecord,
    durability: Durability,
    pool: &Arc<FilePool>,
    residency: &Arc<Residency>,
) -> std::result::Result<Feed, (String, SkipKind)> {
    let damaged = |reason: &str| (reason.to_owned(), SkipKind::Damaged);
    let StorageConfig::Dir(root) = storage else {
        return Err(damaged("in-memory storage does not survive a reopen"));
    };
    let dir = feed_dir(root, &record.key);
    match std::fs::metadata(dir.join("oplog")) {
        Ok(m) if m.len() > 0 => {}
        Ok(_) => return Err(damaged("its oplog is empty")),
        Err(e) if crate::storage::is_access_refused(&e) => {
            return Err((
                format!("its directory cannot be read ({e})"),
                SkipKind::AccessRefused,
            ));
        }
        Err(_) => return Err(damaged("its directory or oplog is missing")),
    }
    let source = CoreSource {
        sync: SyncSet::for_dir(&dir),
        dir,
        pool: pool.clone(),
        residency: residency.clone(),
    };
    let local = record.local_name.is_some();
    let core = residency::load(&source, record.key, local)
        .await
        .map_err(|e| match e {
            Error::Damaged { reason, .. } => (reason, SkipKind::Damaged),
            other if other.is_access_refused() => (other.to_string(), SkipKind::AccessRefused),
            other => (other.to_string(), SkipKind::Damaged),
        })?;
    let sync = source.sync.clone();
    let shared = SharedFeed::new(record.key, local, core, Some(source)).await;
    Ok(Feed::new(
        record.local_name.clone(),
        shared,
        Some(sync),
        durability,
    ))
}

/// Directories of feeds on trial left by a crash ([`ON_TRIAL_MARK`]): removed
/// unless the index records the feed (then only the mark goes) or some index
/// record is unreadable (`index_complete` false: the feed may be that record's).
/// An empty directory of a feed the index does not know goes too.
fn clear_trial_leftovers(root: &Path, recorded: &HashSet<FeedKey>, index_complete: bool) {
    let Ok(entries) = std::fs::read_dir(feeds_dir(root)) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let key = entry
            .file_name()
            .to_str()
            .and_then(|n| FeedKey::from_hex(n).ok());
        let mark = dir.join(ON_TRIAL_MARK);
        if !mark.is_file() {
            // Made, and the crash came before the mark: it holds nothing.
            if key.is_some_and(|key| !recorded.contains(&key))
                && std::fs::read_dir(&dir).is_ok_and(|mut files| files.next().is_none())
            {
                let _ = std::fs::remove_dir(&dir);
            }
            continue;
        }
        let removed = match key {
            Some(key) if recorded.contains(&key) => std::fs::remove_file(&mark),
            Some(_) if index_complete => std::fs::remove_dir_all(&dir).inspect(|()| {
                tracing::info!(path = %dir.display(), "removed a feed left on trial by an interrupted session (never admitted)");
            }),
            _ => continue,
        };
        if let Err(error) = removed {
            tracing::warn!(path = %dir.display(), %error, "cannot clear a feed left on trial by an interrupted session");
        }
    }
}

/// Writes a local writer's name into its directory if it is not there yet (stores
/// written before the file existed), so `repair` can restore it.
fn keep_writer_name(dir: &Path, name: &str) {
    if crate::metadata::read_writer_name(dir).as_deref() == Some(name) {
        return;
    }
    if let Err(error) = crate::metadata::write_writer_name(dir, name) {
        tracing::warn!(path = %dir.display(), %error, "cannot keep the writer name beside its feed");
    }
}

/// What [`Multifeed::repair`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RepairReport {
    /// Feeds taken back into the index: key, and local writer name (`None`: remote).
    pub relisted: Vec<(FeedKey, Option<String>)>,
    /// Unlisted directories left as they are, and why.
    pub left: Vec<(PathBuf, String)>,
}

/// The directories under `feeds/` that are neither members nor skipped members:
/// left by a lost or damaged index, or by a crash between creating a feed and
/// recording it.
fn unlisted_feed_dirs(root: &Path, members: &Members, skipped: &[SkippedFeed]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(feeds_dir(root)) else {
        return Vec::new();
    };
    let mut unlisted = Vec::new();
    for entry in entries.flatten() {
        let key = entry
            .file_name()
            .to_str()
            .and_then(|n| FeedKey::from_hex(n).ok());
        let listed = key.is_some_and(|k| {
            members.by_key.contains_key(&k) || skipped.iter().any(|s| s.key == Some(k))
        });
        if !listed && entry.path().is_dir() {
            tracing::info!(path = %entry.path().display(), "feed directory not in the member index");
            unlisted.push(entry.path());
        }
    }
    unlisted.sort();
    unlisted
}

#[cfg(test)]
mod flush_tests {
    use super::*;
    use crate::{Options, SharedKey};

    /// `flush` must not hold the group's write lock while it waits on fsyncs: a
    /// writer is created while a flush is stuck behind a feed's sync.
    #[tokio::test]
    async fn a_writer_is_created_while_a_flush_waits_on_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let group = Multifeed::open(
            StorageConfig::Dir(dir.path().to_path_buf()),
            SharedKey::generate(),
            Options::default(),
        )
        .await
        .unwrap();
        let first = group.writer("first").await.unwrap();
        first.append(b"reading").await.unwrap();
        let sync = first.inner.sync.clone().unwrap();
        let held = sync.hold_syncs().await;

        let flushing = tokio::spawn({
            let group = group.clone();
            async move { group.flush().await }
        });
        // Let the flush take its snapshot and block on the held sync.
        while sync.waiting_syncs() == 0 {
            tokio::task::yield_now().await;
        }
        let second =
            tokio::time::timeout(std::time::Duration::from_secs(30), group.writer("second"))
                .await
                .expect("writer() blocked behind a flush waiting on an fsync")
                .unwrap();
        assert!(!flushing.is_finished());
        drop(held);
        flushing.await.unwrap().unwrap();
        second.append(b"after").await.unwrap();
        group.close().await.unwrap();
    }
}
