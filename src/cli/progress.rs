//! How much of a sync has arrived: blocks received against what the peer's
//! manifest announced beyond what this side already held.

use std::{collections::HashMap, time::Duration};

use multifeed::{FeedKey, Multifeed};

use super::output;

/// Blocks to come and blocks received on one connection.
#[derive(Debug, Default)]
pub struct Tally {
    /// Contiguous blocks held per feed when the connection started.
    held: HashMap<FeedKey, u64>,
    /// The longest length the peer announced per feed.
    announced: HashMap<FeedKey, u64>,
    /// Running totals per feed on this connection (blocks, bytes).
    received: HashMap<FeedKey, (u64, u64)>,
}

impl Tally {
    /// A tally starting from what `group` holds now.
    pub async fn of(group: &Multifeed) -> Self {
        let mut held = HashMap::new();
        for feed in group.feeds() {
            held.insert(feed.key(), feed.contiguous_len().await);
        }
        Self::new(held)
    }

    /// What the store holds now against the start and the announcement: blocks
    /// that arrived and blocks announced that are still missing, exact whatever
    /// events were missed; bytes as far as progress reports said.
    pub async fn settle(&self, group: &Multifeed) -> Settled {
        let mut settled = Settled::default();
        for feed in group.feeds() {
            let key = feed.key();
            let now = feed.contiguous_len().await;
            let then = self.held.get(&key).copied().unwrap_or(0);
            settled.blocks += now.saturating_sub(then);
            let announced = self.announced.get(&key).copied().unwrap_or(0);
            settled.missing += announced.saturating_sub(now);
        }
        settled.bytes = self.received().1;
        // Announced feeds that never became members here.
        for (key, announced) in &self.announced {
            if group.feed(*key).is_none() {
                settled.missing += announced;
            }
        }
        settled
    }

    pub fn new(held: HashMap<FeedKey, u64>) -> Self {
        Self {
            held,
            ..Self::default()
        }
    }

    /// The peer's manifest: its keys and the lengths it announced.
    pub fn on_remote_feeds(&mut self, keys: &[FeedKey], lengths: &[Option<u64>]) {
        for (key, length) in keys.iter().zip(lengths) {
            if let Some(length) = length {
                let announced = self.announced.entry(*key).or_default();
                *announced = (*announced).max(*length);
            }
        }
    }

    /// A feed's running totals on this connection.
    pub fn on_progress(&mut self, key: FeedKey, blocks: u64, bytes: u64) {
        let seen = self.received.entry(key).or_default();
        *seen = (seen.0.max(blocks), seen.1.max(bytes));
    }

    /// Blocks the peer announced that this side did not hold, at least as many as
    /// already arrived (a peer appending meanwhile sends more than it announced).
    pub fn expected(&self) -> u64 {
        let announced: u64 = self
            .announced
            .iter()
            .map(|(key, len)| len.saturating_sub(self.held.get(key).copied().unwrap_or(0)))
            .sum();
        announced.max(self.received().0)
    }

    /// Blocks and bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        self.received
            .values()
            .fold((0, 0), |(blocks, bytes), r| (blocks + r.0, bytes + r.1))
    }

    /// Whether a feed received at least what the peer announced beyond what we held.
    pub fn caught_up(&self, key: &FeedKey) -> bool {
        let announced = self.announced.get(key).copied().unwrap_or(0);
        let held = self.held.get(key).copied().unwrap_or(0);
        self.received_of(key).0 >= announced.saturating_sub(held)
    }

    /// The blocks of one feed received on this connection.
    pub fn received_of(&self, key: &FeedKey) -> (u64, u64) {
        self.received.get(key).copied().unwrap_or_default()
    }
}

/// What a connection brought, measured on the store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Blocks that arrived.
    pub blocks: u64,
    /// Bytes received, as far as progress reports said.
    pub bytes: u64,
    /// Blocks the peer announced that are still missing.
    pub missing: u64,
}

/// A progress bar on stderr: blocks against the expected total, with a
/// percentage, the bytes so far and an ETA.
pub fn bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {percent:>3}%  {pos}/{len} blocks  {msg}  ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// Shows `tally` on `bar`.
pub fn show(bar: &indicatif::ProgressBar, tally: &Tally) {
    let (blocks, bytes) = tally.received();
    bar.set_length(tally.expected());
    bar.set_position(blocks);
    bar.set_message(output::bytes(bytes));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> FeedKey {
        FeedKey::from_bytes([n; 32])
    }

    #[test]
    fn counts_blocks_against_what_the_peer_announced_beyond_what_we_held() {
        // We hold 40 of feed 1 and nothing of feed 2.
        let mut tally = Tally::new(HashMap::from([(key(1), 40)]));
        assert_eq!(tally.expected(), 0);
        tally.on_remote_feeds(&[key(1), key(2)], &[Some(100), Some(50)]);
        assert_eq!(tally.expected(), 60 + 50);
        // Running totals per feed: the latest counts, not the sum of reports.
        tally.on_progress(key(2), 10, 1000);
        tally.on_progress(key(2), 30, 3000);
        tally.on_progress(key(1), 5, 500);
        assert_eq!(tally.received(), (35, 3500));
        assert!(!tally.caught_up(&key(2)));
        tally.on_progress(key(2), 50, 5000);
        assert!(tally.caught_up(&key(2)));
        tally.on_progress(key(2), 30, 3000);
        // A later manifest raises what is expected; an older, shorter one does not lower it.
        tally.on_remote_feeds(&[key(2)], &[Some(70)]);
        tally.on_remote_feeds(&[key(2)], &[Some(60)]);
        assert_eq!(tally.expected(), 60 + 70);
        // A length not announced adds nothing; more received than announced stretches it.
        tally.on_remote_feeds(&[key(3)], &[None]);
        tally.on_progress(key(3), 500, 5);
        // Reports are running totals and never go back: feed 2 counts its 50.
        assert_eq!(tally.expected(), 5 + 50 + 500);
        // A peer shorter than what we hold expects nothing from it.
        let mut tally = Tally::new(HashMap::from([(key(1), 40)]));
        tally.on_remote_feeds(&[key(1)], &[Some(10)]);
        assert_eq!(tally.expected(), 0);
    }
}
