//! [`Multifeed::verify`]: re-checks every held block of every member feed against
//! the feed's signed Merkle tree.
//!
//! For each feed, a fresh in-memory, read-only hypercore with the same public key
//! is fed proofs made from the stored core, exactly as a peer would be: the first
//! proof carries the signed upgrade to the stored length (checking the signature
//! over the tree's roots), then one proof per held block (checking the block's hash
//! and its path up to those roots). A flipped bit in a block, a tree node or the
//! signature shows up as a failed proof, or as a value differing from what `get`
//! returns, at the first block it touches.

use futures::FutureExt;
use hypercore::{Hypercore, HypercoreBuilder, PartialKeypair, Storage};
use hypercore_schema::{RequestBlock, RequestUpgrade};

use crate::{
    error::{Error, Result},
    feed::Feed,
    keys::FeedKey,
    multifeed::{Multifeed, SkippedFeed},
};

/// What [`Multifeed::verify`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct VerifyReport {
    /// One entry per loaded member feed, in order of admission.
    pub feeds: Vec<FeedReport>,
    /// Members that could not even be loaded at open (see [`Multifeed::skipped`]).
    pub skipped: Vec<SkippedFeed>,
}

impl VerifyReport {
    /// Whether every feed checked out and none was skipped.
    pub fn is_ok(&self) -> bool {
        self.skipped.is_empty() && self.feeds.iter().all(|f| f.status == FeedStatus::Ok)
    }

    /// Number of damaged or skipped feeds.
    pub fn damaged(&self) -> usize {
        self.skipped.len()
            + self
                .feeds
                .iter()
                .filter(|f| f.status != FeedStatus::Ok)
                .count()
    }
}

/// The verification of one feed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedReport {
    /// The feed's key.
    pub key: FeedKey,
    /// Its local writer name, if it is ours.
    pub name: Option<String>,
    /// Its length (signed).
    pub length: u64,
    /// Blocks held here and checked.
    pub checked: u64,
    /// Times the feed was truncated by its writer (hypercore's fork id); 0 normally.
    pub fork: u64,
    /// The outcome.
    pub status: FeedStatus,
}

/// The outcome of verifying one feed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedStatus {
    /// Every held block matches the signed tree.
    Ok,
    /// The feed's storage is damaged.
    Damaged {
        /// The first block found damaged, if the damage is in a block's proof or
        /// value (`None`: the signed tree itself).
        seq: Option<u64>,
        /// What failed.
        reason: String,
    },
}

impl Multifeed {
    /// Re-checks every held block of every member against its signed Merkle tree
    /// (see the `verify` module docs). Damage is reported, never returned as an
    /// error; errors are only for a closed group or a failure to set up a check.
    pub async fn verify(&self) -> Result<VerifyReport> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let mut feeds = Vec::new();
        for feed in self.feeds() {
            feeds.push(verify_feed(&feed).await?);
        }
        Ok(VerifyReport {
            feeds,
            skipped: self.skipped().to_vec(),
        })
    }
}

async fn verify_feed(feed: &Feed) -> Result<FeedReport> {
    let key = feed.key();
    let public = key.verifying_key()?;
    let mut core = feed.shared().core().await?;
    let info = core.info();
    let mut report = FeedReport {
        key,
        name: feed.name().map(str::to_owned),
        length: info.length,
        checked: 0,
        fork: info.fork,
        status: FeedStatus::Ok,
    };
    if info.length == 0 {
        return Ok(report);
    }
    // Damaged files can trip assertions inside hypercore: contain them.
    let checked = std::panic::AssertUnwindSafe(check_blocks(&mut core, public, info.length))
        .catch_unwind()
        .await;
    match checked {
        Ok(Err(e)) => return Err(Error::core(key, e)),
        Ok(Ok((checked, status))) => {
            report.checked = checked;
            report.status = status;
        }
        Err(_) => {
            report.status = FeedStatus::Damaged {
                seq: None,
                reason: "reading its files failed (they are damaged)".into(),
            }
        }
    }
    Ok(report)
}

/// A fresh core is dropped and rebuilt after this many blocks, so verifying a
/// long feed holds at most this many blocks in memory.
const BLOCKS_PER_CHECKER: u64 = 4096;

/// An empty in-memory, read-only core of the feed with key `public`.
async fn checker(public: hypercore::VerifyingKey) -> Result<Hypercore, hypercore::HypercoreError> {
    HypercoreBuilder::new(Storage::new_memory().await?)
        .key_pair(PartialKeypair {
            public,
            secret: None,
        })
        .build()
        .await
}

/// Feeds fresh cores the signed upgrade and every held block of `core`.
async fn check_blocks(
    core: &mut Hypercore,
    public: hypercore::VerifyingKey,
    length: u64,
) -> Result<(u64, FeedStatus), hypercore::HypercoreError> {
    let damaged = |seq: Option<u64>, reason: String| FeedStatus::Damaged { seq, reason };
    let mut fresh = checker(public).await?;
    let mut upgraded = false;
    let mut checked = 0;
    for seq in 0..length {
        if checked > 0 && checked % BLOCKS_PER_CHECKER == 0 && upgraded {
            fresh = checker(public).await?;
            upgraded = false;
        }
        let stored = match core.get(seq).await {
            Ok(Some(value)) => value,
            Ok(None) => continue, // not held here (sparse): nothing to check
            Err(e) => {
                return Ok((
                    checked,
                    damaged(Some(seq), format!("cannot read the block: {e}")),
                ));
            }
        };
        let nodes = match fresh.missing_nodes(seq).await {
            Ok(nodes) => nodes,
            Err(e) => {
                return Ok((
                    checked,
                    damaged(Some(seq), format!("cannot check the block: {e}")),
                ));
            }
        };
        let upgrade = (!upgraded).then_some(RequestUpgrade { start: 0, length });
        let proof = match core
            .create_proof(
                Some(RequestBlock { index: seq, nodes }),
                None,
                None,
                upgrade,
            )
            .await
        {
            Ok(Some(proof)) => proof,
            Ok(None) => {
                return Ok((
                    checked,
                    damaged(Some(seq), "its proof cannot be built".into()),
                ));
            }
            Err(e) => {
                let seq = upgraded.then_some(seq);
                return Ok((
                    checked,
                    damaged(seq, format!("its Merkle tree is unreadable: {e}")),
                ));
            }
        };
        match fresh.verify_and_apply_proof(&proof).await {
            Ok(true) => {}
            Ok(false) => {
                return Ok((
                    checked,
                    damaged(Some(seq), "its proof does not apply".into()),
                ));
            }
            Err(e) => {
                let what = if upgraded {
                    "the block does not match the signed Merkle tree"
                } else {
                    "the block or the signed Merkle tree does not verify"
                };
                return Ok((checked, damaged(Some(seq), format!("{what}: {e}"))));
            }
        }
        upgraded = true;
        match fresh.get(seq).await {
            Ok(Some(verified)) if verified == stored => checked += 1,
            Ok(_) => {
                return Ok((
                    checked,
                    damaged(
                        Some(seq),
                        "the stored value differs from the verified one".into(),
                    ),
                ));
            }
            Err(e) => {
                return Ok((
                    checked,
                    damaged(Some(seq), format!("cannot re-read the block: {e}")),
                ));
            }
        }
    }
    Ok((checked, FeedStatus::Ok))
}
