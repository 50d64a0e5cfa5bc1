//! A member feed: one hypercore, local (writable) or remote (read-only).

use std::sync::Arc;

use blake2::{Blake2b, Digest, digest::consts::U32};
use futures::FutureExt;
use tokio::sync::watch;

pub(crate) use crate::residency::SharedFeed;
use crate::{
    error::{Error, Result},
    keys::FeedKey,
    metadata::FeedMetadata,
    storage::{Durability, SyncSet},
};

pub(crate) struct FeedInner {
    pub(crate) key: FeedKey,
    pub(crate) name: Option<String>,
    pub(crate) shared: Arc<SharedFeed>,
    pub(crate) sync: Option<Arc<SyncSet>>,
    pub(crate) durability: Durability,
    /// Set once: our writer metadata, or what a peer first offered (see `metadata.rs`).
    pub(crate) metadata: std::sync::OnceLock<FeedMetadata>,
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
        name: Option<String>,
        shared: Arc<SharedFeed>,
        sync: Option<Arc<SyncSet>>,
        durability: Durability,
    ) -> Self {
        Feed {
            inner: Arc::new(FeedInner {
                key: shared.key,
                name,
                shared,
                sync,
                durability,
                metadata: std::sync::OnceLock::new(),
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

    /// The feed's metadata (such as `gateway`, the name of the gateway writing it):
    /// for our own writers [`crate::Options::writer_metadata`], for a remote feed
    /// what the first peer that offered it with metadata said; empty if none. A
    /// label, not proof: any member can claim any name.
    pub fn metadata(&self) -> &FeedMetadata {
        static NONE: FeedMetadata = FeedMetadata::new();
        self.inner.metadata.get().unwrap_or(&NONE)
    }

    /// Whether this is one of our own writers (and so writable).
    pub fn is_local(&self) -> bool {
        self.inner.name.is_some()
    }

    /// Number of blocks in the feed (as far as this peer knows).
    pub async fn len(&self) -> u64 {
        self.inner.shared.info().length
    }

    /// Whether the feed has no blocks yet.
    pub async fn is_empty(&self) -> bool {
        self.len().await == 0
    }

    /// Number of blocks held locally, counted from the start without a gap.
    pub async fn contiguous_len(&self) -> u64 {
        self.inner.shared.info().contiguous_length
    }

    /// Total bytes of the feed's blocks.
    pub async fn byte_len(&self) -> u64 {
        self.inner.shared.info().byte_length
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.shared.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Syncs and releases the feed's files; later operations fail with [`Error::Closed`].
    pub(crate) async fn close(&self) -> Result<()> {
        // Waits for any append or download half-way through.
        if !self.inner.shared.close().await {
            return Ok(());
        }
        match &self.inner.sync {
            Some(sync) => sync.close().await,
            None => Ok(()),
        }
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
        if self.inner.shared.is_read_only() {
            return Err(Error::read_only(format!(
                "appending to feed {}",
                self.key()
            )));
        }
        let (first, length) = {
            let mut core = self.inner.shared.core().await?;
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
    ///
    /// A block read from disk is checked against its Merkle leaf (one BLAKE2b of
    /// the block) before it is returned: damaged bytes, a damaged tree node or a
    /// truncated file give [`Error::DamagedBlock`], never wrong data.
    pub async fn get(&self, seq: u64) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        if seq >= self.inner.shared.info().length {
            return Ok(None);
        }
        let mut core = self.inner.shared.core().await?;
        if seq >= core.info().length {
            return Ok(None);
        }
        // Damaged files can trip assertions inside hypercore: contain them.
        let read = std::panic::AssertUnwindSafe(core.get(seq))
            .catch_unwind()
            .await;
        let value = match read {
            Ok(Ok(value)) => value,
            // The OS refused (permissions, I/O): not damage to the data.
            Ok(Err(e @ hypercore::HypercoreError::IO { .. })) => {
                return Err(Error::core(self.key(), e));
            }
            Ok(Err(e)) => return Err(self.damaged(seq, unreadable(&e))),
            Err(_) => {
                return Err(self.damaged(seq, "reading it tripped over inconsistent files".into()));
            }
        };
        if let (Some(value), Some(sync)) = (&value, &self.inner.sync) {
            let leaf = sync
                .leaf(seq)
                .map_err(|e| Error::io(format!("read feed {}", self.key()), e))?;
            let Some(leaf) = leaf else {
                return Err(self.damaged(seq, MISSING_LEAF.into()));
            };
            if leaf.length != value.len() as u64 || leaf_hash(value) != leaf.hash {
                return Err(self.damaged(
                    seq,
                    "its bytes do not match the hash its Merkle tree holds".into(),
                ));
            }
        }
        Ok(value)
    }

    /// Blocks below `length` that `held` says are not held, yet whose bytes the
    /// data file holds intact (they match their Merkle leaf): the count and the
    /// first. Some means a damaged bitfield. Walks the leaves from block 0 for
    /// the offsets, up to the first leaf the tree file lacks (a sparse remote
    /// feed's offsets past it are unknown). Nothing for in-memory storage.
    pub(crate) fn intact_unmarked(
        &self,
        length: u64,
        held: impl Fn(u64) -> bool,
    ) -> Result<(u64, Option<u64>)> {
        let Some(sync) = &self.inner.sync else {
            return Ok((0, None));
        };
        let Some(dir) = sync.dir() else {
            return Ok((0, None));
        };
        let path = dir.join("data");
        let io_error = |e| Error::io(format!("read {}", path.display()), e);
        let data = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, None)),
            Err(e) => return Err(io_error(e)),
        };
        let data_len = data.metadata().map_err(io_error)?.len();
        let (mut offset, mut count, mut first) = (0u64, 0u64, None);
        let mut buf = Vec::new();
        for seq in 0..length {
            let Some(leaf) = sync.leaf(seq).map_err(io_error)? else {
                break;
            };
            let end = offset.saturating_add(leaf.length);
            if leaf.length > 0 && end <= data_len && !held(seq) {
                // Bounded by the data file's length, checked above.
                buf.resize(leaf.length as usize, 0);
                std::os::unix::fs::FileExt::read_exact_at(&data, &mut buf, offset)
                    .map_err(io_error)?;
                if leaf_hash(&buf) == leaf.hash {
                    count += 1;
                    first.get_or_insert(seq);
                }
            }
            offset = end;
        }
        Ok((count, first))
    }

    fn damaged(&self, seq: u64, reason: String) -> Error {
        Error::DamagedBlock {
            key: self.key().to_hex(),
            seq,
            reason,
        }
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

/// Hypercore's Merkle leaf hash of a block: BLAKE2b-256 over a zero type byte,
/// the block's length (u64, little-endian) and the block. Computed here without
/// the allocation `hypercore_schema::Hash::data` makes for the length.
fn leaf_hash(block: &[u8]) -> [u8; 32] {
    let mut hasher = Blake2b::<U32>::new();
    hasher.update([0u8]);
    hasher.update((block.len() as u64).to_le_bytes());
    hasher.update(block);
    hasher.finalize().into()
}

const MISSING_LEAF: &str = "its Merkle tree node is missing or blank";

/// Why hypercore could not read a block it marks as held, in our words.
fn unreadable(error: &hypercore::HypercoreError) -> String {
    match error {
        hypercore::HypercoreError::InvalidOperation { context }
            if context.contains("out of bounds") =>
        {
            "its data or tree file ends before it (truncated)".into()
        }
        hypercore::HypercoreError::InvalidOperation { context } if context.contains("blank") => {
            MISSING_LEAF.into()
        }
        other => format!("its files cannot be read as a block ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use hypercore_schema::Hash;

    use super::leaf_hash;

    #[test]
    fn the_leaf_hash_is_hypercores() {
        for len in [0usize, 1, 100, 127, 128, 129, 4096, 70_000] {
            let block: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            assert_eq!(
                leaf_hash(&block).as_slice(),
                Hash::data(&block).as_bytes(),
                "{len}"
            );
        }
    }
}
