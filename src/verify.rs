//! [`Multifeed::verify`]: re-checks every held block of every member feed against
//! the feed's signed Merkle tree.
//!
//! For each feed, the signature over the tree's roots is checked by feeding a
//! fresh in-memory, read-only hypercore with the same public key the upgrade proof
//! a peer would get. Then every held block is checked against those roots: whole
//! subtrees by recomputing them from the blocks as `get` returns them, partly held
//! ones (and any that does not match) block by block with the proofs a peer would
//! get, which names the first damaged block. A flipped bit in a block, in a tree
//! node that reads depend on, or in the signature is found.

use futures::FutureExt;
use hypercore::{Hypercore, HypercoreBuilder, PartialKeypair, Storage};
use hypercore_schema::{Hash, Node, Proof, RequestBlock, RequestUpgrade};

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
    /// Feed directories the index does not list (see
    /// [`Multifeed::unlisted_feed_dirs`]): data this store holds but does not use.
    pub unlisted: Vec<std::path::PathBuf>,
}

impl VerifyReport {
    /// Whether every feed checked out, none was skipped, and the index lists
    /// every feed directory. A store whose index was lost is never ok.
    pub fn is_ok(&self) -> bool {
        self.skipped.is_empty()
            && self.unlisted.is_empty()
            && self.feeds.iter().all(|f| f.status == FeedStatus::Ok)
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
    /// Blocks of a remote feed its bitfield does not mark held whose bytes the
    /// data file holds intact: a damaged bitfield, or downloads a crash cut off
    /// before they were marked. Not damage (nothing held is wrong, and the next
    /// sync fetches them again), but a zeroed bitfield shows here.
    pub unmarked: u64,
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
            unlisted: self.unlisted_feed_dirs().to_vec(),
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
        unmarked: 0,
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
            if report.status == FeedStatus::Ok && checked < info.length {
                let (unmarked, first) = feed.intact_unmarked(info.length, |seq| core.has(seq))?;
                if !feed.is_local() {
                    // A crash mid-download leaves a few such blocks too: a note.
                    report.unmarked = unmarked;
                } else if unmarked > 0 {
                    // Our own writer's bitfield lost bits of blocks it still holds.
                    report.status = FeedStatus::Damaged {
                        seq: first,
                        reason: format!(
                            "its bitfield marks {checked} of {} blocks held, but the data file holds {unmarked} more intact ones (the first is block {}): the bitfield is damaged; restore the feed's directory from a backup (no peer can send back blocks only this gateway wrote)",
                            info.length,
                            first.unwrap_or_default()
                        ),
                    };
                } else {
                    // Our own writer wrote every block of its feed: one it no
                    // longer holds was lost here, never just not downloaded yet.
                    let first = (0..info.length).find(|&seq| !core.has(seq));
                    report.status = FeedStatus::Damaged {
                        seq: first,
                        reason: format!(
                            "this gateway wrote {} blocks to it but holds only {checked}: its bitfield or data file is damaged; restore the feed's directory from a backup",
                            info.length
                        ),
                    };
                }
            }
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

/// A checker core is dropped and rebuilt after this many blocks, so verifying a
/// long feed through proofs holds at most this many blocks in memory.
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

/// The roots of a tree of `length` blocks, as (flat-tree index, first block, blocks).
fn full_roots(length: u64) -> Vec<(u64, u64, u64)> {
    let mut roots = Vec::new();
    let mut start = 0;
    let mut left = length;
    while left > 0 {
        let span = 1u64 << (63 - left.leading_zeros());
        roots.push((2 * start + span - 1, start, span));
        start += span;
        left -= span;
    }
    roots
}

fn damaged(seq: Option<u64>, reason: impl Into<String>) -> FeedStatus {
    FeedStatus::Damaged {
        seq,
        reason: reason.into(),
    }
}

/// Checks every held block of `core` against its signed tree.
///
/// The signed roots are checked once, by feeding a fresh checker core the upgrade
/// proof a peer would get. Each root's subtree whose blocks are all held is then
/// recomputed from the blocks as read (one hash per block and per parent) and
/// compared with its signed root. Blocks of partly held subtrees, and of a subtree
/// that does not match, are checked one by one with block proofs, which names the
/// first damaged block. (hypercore 0.16 panics when one proof carries both the
/// upgrade and a block past the first root: docs/upstream-defects.md, defect 8.)
async fn check_blocks(
    core: &mut Hypercore,
    public: hypercore::VerifyingKey,
    length: u64,
) -> Result<(u64, FeedStatus), hypercore::HypercoreError> {
    let upgrade = RequestUpgrade { start: 0, length };
    let signed = match core.create_proof(None, None, None, Some(upgrade)).await {
        Ok(Some(proof)) => proof,
        Ok(None) => return Ok((0, damaged(None, "its signed Merkle tree cannot be read"))),
        Err(e) => {
            return Ok((
                0,
                damaged(None, format!("its Merkle tree is unreadable: {e}")),
            ));
        }
    };
    let mut checker = Checker::new(public, signed).await?;
    if let Some(status) = checker.trust_roots().await? {
        return Ok((0, status));
    }
    let roots: Vec<Node> = checker
        .signed
        .upgrade
        .as_ref()
        .map(|u| u.nodes.clone())
        .unwrap_or_default();
    let mut checked = 0;
    for (index, start, span) in full_roots(length) {
        let Some(root) = roots.iter().find(|n| n.index == index) else {
            return Ok((
                checked,
                damaged(None, "its signed Merkle tree lacks a root"),
            ));
        };
        let root = (root.hash.clone(), root.length);
        let end = start + span;
        let all_held = (start..end).all(|seq| core.has(seq));
        if all_held {
            match recompute(core, start, end).await {
                Ok(computed) if computed == root => {
                    checked += span;
                    continue;
                }
                Ok(_) => {}
                Err((seq, e)) => {
                    return Ok((
                        checked,
                        damaged(Some(seq), format!("cannot read the block: {e}")),
                    ));
                }
            }
        }
        for seq in start..end {
            if !core.has(seq) {
                continue; // not held here (sparse): nothing to check
            }
            if let Some(status) = checker.check(core, seq).await? {
                return Ok((checked, status));
            }
            checked += 1;
        }
        if all_held {
            // Every block checked out one by one, yet they did not add up.
            return Ok((
                checked,
                damaged(None, "its blocks do not add up to the signed Merkle tree"),
            ));
        }
    }
    Ok((checked, FeedStatus::Ok))
}

/// The (hash, byte length) of the subtree over blocks `start..end` (a whole
/// subtree), computed from the blocks as `core` reads them.
async fn recompute(
    core: &mut Hypercore,
    start: u64,
    end: u64,
) -> std::result::Result<(Vec<u8>, u64), (u64, String)> {
    // Pending subtrees, largest first; two of equal size merge into their parent.
    let mut stack: Vec<(Node, u64)> = Vec::new();
    for seq in start..end {
        let value = match core.get(seq).await {
            Ok(Some(value)) => value,
            Ok(None) => return Err((seq, "it is not there".into())),
            Err(e) => return Err((seq, e.to_string())),
        };
        let hash = Hash::data(&value).as_bytes().to_vec();
        let mut node = (Node::new(2 * seq, hash, value.len() as u64), 1);
        while let Some((left, blocks)) = stack.pop_if(|(_, blocks)| *blocks == node.1) {
            let parent = Hash::parent(&left, &node.0).as_bytes().to_vec();
            let index = (left.index + node.0.index) / 2;
            node = (
                Node::new(index, parent, left.length + node.0.length),
                blocks * 2,
            );
        }
        stack.push(node);
    }
    match stack.pop() {
        Some((root, _)) if stack.is_empty() => Ok((root.hash, root.length)),
        _ => Err((start, "the range is not a whole subtree".into())),
    }
}

/// Checks blocks one by one, as a peer would on receiving them.
struct Checker {
    public: hypercore::VerifyingKey,
    /// The upgrade proof to the stored length: the signed roots.
    signed: Proof,
    core: Hypercore,
    blocks: u64,
}

impl Checker {
    async fn new(
        public: hypercore::VerifyingKey,
        signed: Proof,
    ) -> Result<Self, hypercore::HypercoreError> {
        Ok(Checker {
            public,
            signed,
            core: checker(public).await?,
            blocks: 0,
        })
    }

    /// Has the checker trust the signed roots; a status if they do not verify.
    async fn trust_roots(&mut self) -> Result<Option<FeedStatus>, hypercore::HypercoreError> {
        Ok(match self.core.verify_and_apply_proof(&self.signed).await {
            Ok(true) => None,
            Ok(false) => Some(damaged(None, "its signed Merkle tree does not apply")),
            Err(e) => Some(damaged(
                None,
                format!("its signed Merkle tree does not verify: {e}"),
            )),
        })
    }

    /// Checks block `seq` of `core` with a proof; a status if it is damaged.
    async fn check(
        &mut self,
        core: &mut Hypercore,
        seq: u64,
    ) -> Result<Option<FeedStatus>, hypercore::HypercoreError> {
        if self.blocks == BLOCKS_PER_CHECKER {
            self.core = checker(self.public).await?;
            self.blocks = 0;
            if let Some(status) = self.trust_roots().await? {
                return Ok(Some(status));
            }
        }
        let nodes = match self.core.missing_nodes(seq).await {
            Ok(nodes) => nodes,
            Err(e) => {
                return Ok(Some(damaged(
                    Some(seq),
                    format!("cannot check the block: {e}"),
                )));
            }
        };
        let request = RequestBlock { index: seq, nodes };
        let proof = match core.create_proof(Some(request), None, None, None).await {
            Ok(Some(proof)) => proof,
            Ok(None) => return Ok(Some(damaged(Some(seq), "its proof cannot be built"))),
            Err(e) => {
                return Ok(Some(damaged(
                    Some(seq),
                    format!("its Merkle tree is unreadable: {e}"),
                )));
            }
        };
        self.blocks += 1;
        Ok(match self.core.verify_and_apply_proof(&proof).await {
            Ok(true) => None,
            Ok(false) => Some(damaged(Some(seq), "its proof does not apply")),
            Err(e) => Some(damaged(
                Some(seq),
                format!("the block does not match the signed Merkle tree: {e}"),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::full_roots;

    #[test]
    fn full_roots_cover_the_length_largest_first() {
        assert_eq!(full_roots(0), []);
        assert_eq!(full_roots(1), [(0, 0, 1)]);
        assert_eq!(full_roots(5), [(3, 0, 4), (8, 4, 1)]);
        assert_eq!(full_roots(6), [(3, 0, 4), (9, 4, 2)]);
        assert_eq!(
            full_roots(4097),
            [(4095, 0, 4096), (8192, 4096, 1)],
            "4,097 blocks: the case that made hypercore panic"
        );
    }
}
