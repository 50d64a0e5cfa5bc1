//! The announce topic (`multifeed/announce` unless configured): publishing a
//! topic filter there makes every gateway of the group mirror it from its
//! broker.
//!
//! An announcement is mirrored like any other message, into the group's topic
//! of the same name, so the filters are kept durably in the log and replicate
//! as a small command log: every gateway follows that topic from its start and
//! subscribes to each filter it holds, whenever it learns of it (at start, or
//! when a peer's announcement arrives by replication).

use std::{collections::BTreeSet, sync::Arc, sync::atomic::Ordering};

use futures::StreamExt;
use multifeed::{Topics, topics::Cursor};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{MqttMetrics, filter::filter_problem};

/// The announce topic when none is configured.
pub const DEFAULT_TOPIC: &str = "multifeed/announce";

/// Most filters announced to a group that a gateway subscribes to. Members are
/// trusted with the key, not with the node's memory or its broker's.
pub const MAX_FILTERS: usize = 256;

/// The filters announced so far: the state, without IO.
#[derive(Debug, Default)]
pub struct Announced {
    filters: BTreeSet<String>,
}

/// What an announcement did.
#[derive(Debug, PartialEq, Eq)]
pub enum Learnt {
    /// A filter not announced before: subscribe to it.
    New(String),
    /// Announced before.
    Known,
    /// Not a filter: never appended here, but a peer's log may hold one.
    Invalid(&'static str),
    /// [`MAX_FILTERS`] are announced already.
    Full,
}

impl Announced {
    /// Takes an announcement's payload.
    pub fn learn(&mut self, payload: &[u8]) -> Learnt {
        let filter = match announcement(payload) {
            Ok(filter) => filter,
            Err(reason) => return Learnt::Invalid(reason),
        };
        if self.filters.contains(filter) {
            Learnt::Known
        } else if self.filters.len() >= MAX_FILTERS {
            Learnt::Full
        } else {
            self.filters.insert(filter.to_owned());
            Learnt::New(filter.to_owned())
        }
    }

    pub fn len(&self) -> usize {
        self.filters.len()
    }
}

/// The filter an announcement's payload holds, or why it holds none.
pub fn announcement(payload: &[u8]) -> Result<&str, &'static str> {
    let text = std::str::from_utf8(payload).map_err(|_| "it is not UTF-8")?;
    let filter = text.trim();
    match filter_problem(filter) {
        Some(reason) => Err(reason),
        None => Ok(filter),
    }
}

/// Follows the announce topic from its start until `cancel`, handing each new
/// filter to `subscribe` (the broker client, when there is one).
pub async fn follow(
    topics: Topics,
    topic: String,
    subscribe: Option<mpsc::Sender<String>>,
    metrics: Arc<MqttMetrics>,
    cancel: CancellationToken,
) {
    let mut announced = Announced::default();
    let mut stream = topics.follow(&topic, Cursor::new());
    let mut warned_full = false;
    loop {
        let item = tokio::select! {
            () = cancel.cancelled() => return,
            item = stream.next() => item,
        };
        let received = match item {
            Some(Ok(received)) => received,
            Some(Err(multifeed::Error::Closed)) | None => return,
            Some(Err(e)) => {
                tracing::error!("cannot read the announce topic {topic:?}: {e}");
                return;
            }
        };
        match announced.learn(&received.message.payload) {
            Learnt::New(filter) => {
                metrics
                    .announced_filters
                    .store(announced.len() as u64, Ordering::Relaxed);
                tracing::info!("mirroring {filter:?}: it was announced to the group");
                if let Some(subscribe) = &subscribe
                    && subscribe.send(filter).await.is_err()
                {
                    return;
                }
            }
            Learnt::Known => {}
            Learnt::Invalid(reason) => tracing::debug!(
                key = %received.address.key,
                "passing over an announcement that is no filter: {reason}"
            ),
            Learnt::Full => {
                if !warned_full {
                    warned_full = true;
                    tracing::warn!(
                        "more than {MAX_FILTERS} filters were announced to the group; the rest are not mirrored"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_filters_learnt_once_and_bounded() {
        let mut announced = Announced::default();
        assert_eq!(announced.learn(b"alerts/#"), Learnt::New("alerts/#".into()));
        assert_eq!(announced.learn(b" alerts/#\n"), Learnt::Known);
        assert!(matches!(announced.learn(b"a/#/b"), Learnt::Invalid(_)));
        assert!(matches!(announced.learn(b"\xff"), Learnt::Invalid(_)));
        assert!(matches!(announced.learn(b""), Learnt::Invalid(_)));
        for i in 1..MAX_FILTERS {
            assert!(matches!(
                announced.learn(format!("t/{i}").as_bytes()),
                Learnt::New(_)
            ));
        }
        assert_eq!(announced.learn(b"one/more"), Learnt::Full);
        assert_eq!(announced.learn(b"t/1"), Learnt::Known);
        assert_eq!(announced.len(), MAX_FILTERS);
    }
}
