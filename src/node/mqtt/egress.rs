//! Egress (`serve --mqtt-publish-remote PREFIX`): messages that arrive from
//! other gateways by replication are published on this gateway's MQTT side
//! under `PREFIX/<gateway>/<topic>`, so local dashboards and actuators see the
//! whole group with a plain MQTT subscription.
//!
//! - Where: to the external broker (QoS 1) when the node mirrors one, and to the
//!   embedded listener's subscribers (QoS 0, best effort: a subscriber that
//!   falls behind loses messages, counted) when it listens.
//! - Never echoed: only feeds written by other gateways are published, and
//!   nothing under the prefix is ever mirrored back into the group
//!   ([`super::Rules`]).
//! - Where it stands is kept per topic in `<store>/mqtt-egress` (a cursor per
//!   topic, saved at most once a second and at stop), so a restart resumes:
//!   after a crash the last second may be published again, never skipped. On
//!   the first run the topics already held start at their end; a topic first
//!   seen later is published from its start.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use futures::{
    StreamExt,
    stream::{BoxStream, FuturesUnordered, SelectAll},
};
use multifeed::{
    Event, FeedKey, Topics,
    topics::{Cursor, ReceivedMessage},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    MqttMetrics,
    filter::{matches, topic_level},
};

/// Messages queued for one listener subscriber before further ones are dropped.
pub const SUBSCRIBER_QUEUE: usize = 1_024;

/// Most filters one listener client may subscribe to.
pub const MAX_CLIENT_FILTERS: usize = 32;

/// One message on its way out.
#[derive(Debug)]
pub struct Delivery {
    pub topic: String,
    pub payload: Bytes,
    pub content_type: Option<String>,
}

/// The embedded listener's subscribed clients. Delivery never waits: a full
/// queue drops the message for that client.
#[derive(Default)]
pub struct Subscribers {
    next_id: AtomicU64,
    clients: Mutex<HashMap<u64, Subscriber>>,
}

struct Subscriber {
    filters: Vec<String>,
    queue: mpsc::Sender<Arc<Delivery>>,
}

impl Subscribers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Subscriber>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new client with no filters yet; its deliveries come out of the receiver.
    pub fn register(self: &Arc<Self>) -> Subscription {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (queue, deliveries) = mpsc::channel(SUBSCRIBER_QUEUE);
        self.lock().insert(
            id,
            Subscriber {
                filters: Vec::new(),
                queue,
            },
        );
        Subscription {
            id,
            subscribers: self.clone(),
            deliveries,
        }
    }

    /// Hands `delivery` to every client with a matching filter; returns how many
    /// got it and how many had no room.
    pub fn deliver(&self, delivery: &Arc<Delivery>) -> (u64, u64) {
        let (mut sent, mut dropped) = (0, 0);
        for subscriber in self.lock().values() {
            if subscriber
                .filters
                .iter()
                .any(|f| matches(&delivery.topic, f))
            {
                match subscriber.queue.try_send(delivery.clone()) {
                    Ok(()) => sent += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        (sent, dropped)
    }
}

/// One client's place among the subscribers; it leaves when dropped.
pub struct Subscription {
    id: u64,
    subscribers: Arc<Subscribers>,
    pub deliveries: mpsc::Receiver<Arc<Delivery>>,
}

impl Subscription {
    /// Adds `filter` (already checked); false when the client has its maximum.
    pub fn add(&self, filter: &str) -> bool {
        let mut clients = self.subscribers.lock();
        let Some(me) = clients.get_mut(&self.id) else {
            return false;
        };
        if me.filters.iter().any(|f| f == filter) {
            return true;
        }
        if me.filters.len() >= MAX_CLIENT_FILTERS {
            return false;
        }
        me.filters.push(filter.to_owned());
        true
    }

    pub fn remove(&self, filter: &str) {
        if let Some(me) = self.subscribers.lock().get_mut(&self.id) {
            me.filters.retain(|f| f != filter);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.subscribers.lock().remove(&self.id);
    }
}

/// Where egress publishes.
#[derive(Clone, Default)]
pub struct Sinks {
    pub listener: Option<Arc<Subscribers>>,
    pub broker: Option<rumqttc::AsyncClient>,
}

/// The file keeping egress's place in `dir`.
pub fn state_path(dir: &Path) -> PathBuf {
    dir.join("mqtt-egress")
}

/// The saved cursors, one line per topic: `topic<TAB>cursor`. `None` if there
/// is no file yet (the first run).
fn load(path: &Path) -> Option<HashMap<String, Cursor>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(
                "cannot read {} ({e}); MQTT egress starts at the end of every topic",
                path.display()
            );
            return None;
        }
    };
    let mut cursors = HashMap::new();
    for line in text.lines() {
        let parsed = line
            .split_once('\t')
            .and_then(|(topic, cursor)| Some((topic.to_owned(), cursor.parse().ok()?)));
        match parsed {
            Some((topic, cursor)) => {
                cursors.insert(topic, cursor);
            }
            None => tracing::warn!(
                "passing over a damaged line of {}; that topic is published again from its start",
                path.display()
            ),
        }
    }
    Some(cursors)
}

/// Writes the cursors to a new file and renames it over the old one.
fn save(path: &Path, cursors: &HashMap<String, Cursor>) -> std::io::Result<()> {
    use std::io::Write;
    let mut text = String::new();
    for (topic, cursor) in cursors {
        // Topics hold no control characters, so no tab or newline.
        text.push_str(&format!("{topic}\t{cursor}\n"));
    }
    let partial = path.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

type Followed = (String, multifeed::Result<ReceivedMessage>);

/// Publishes other gateways' messages under `prefix` until `cancel`.
pub async fn run(
    topics: Topics,
    prefix: String,
    dir: PathBuf,
    sinks: Sinks,
    metrics: Arc<MqttMetrics>,
    cancel: CancellationToken,
) {
    let path = state_path(&dir);
    let loaded = load(&path);
    // Only the first scan of the first run starts topics at their end.
    let mut start_at_end = loaded.is_none();
    let mut cursors = loaded.unwrap_or_default();
    let group = topics.group().clone();
    // Subscribed before the first scan, so no feed is missed between them.
    let mut events = group.events();
    let mut followed: HashSet<String> = HashSet::new();
    let mut streams: SelectAll<BoxStream<'static, Followed>> = SelectAll::new();
    // Remote feeds still empty: their topic is known once block 0 arrives.
    let mut waiting = FuturesUnordered::new();
    let wait_for_block = |feed: multifeed::Feed| {
        let mut len = feed.subscribe_len();
        async move {
            let _ = len.wait_for(|l| *l > 0).await;
        }
    };
    for feed in group.feeds() {
        if !feed.is_local() && feed.is_empty().await {
            waiting.push(wait_for_block(feed));
        }
    }
    let mut scan = true;
    // The first run writes its file at once, so the next run is not a first one.
    let mut dirty = start_at_end;
    let mut save_tick = tokio::time::interval(Duration::from_secs(1));
    save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if std::mem::take(&mut scan) {
            match topics.topics().await {
                Ok(all) => {
                    for topic in all {
                        if is_own_output(&topic, &prefix) || !followed.insert(topic.clone()) {
                            continue;
                        }
                        let cursor = match cursors.get(&topic) {
                            Some(cursor) => cursor.clone(),
                            None if start_at_end => match topics.tail_cursor(&topic, 0).await {
                                Ok(cursor) => {
                                    cursors.insert(topic.clone(), cursor.clone());
                                    dirty = true;
                                    cursor
                                }
                                Err(e) => {
                                    tracing::warn!("MQTT egress cannot start {topic:?}: {e}");
                                    continue;
                                }
                            },
                            None => Cursor::new(),
                        };
                        let name = topic.clone();
                        streams.push(
                            topics
                                .follow(&topic, cursor)
                                .map(move |item| (name.clone(), item))
                                .boxed(),
                        );
                    }
                }
                Err(e) => tracing::warn!("MQTT egress cannot list the topics: {e}"),
            }
            start_at_end = false;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = save_tick.tick() => {
                if std::mem::take(&mut dirty) {
                    persist(&path, &cursors).await;
                }
            }
            Some(event) = events.next() => match event {
                Event::FeedAdded { key, local: false, .. } => {
                    if let Some(feed) = group.feed(key) {
                        waiting.push(wait_for_block(feed));
                    }
                }
                Event::Lagged { .. } => scan = true,
                _ => {}
            },
            Some(()) = waiting.next(), if !waiting.is_empty() => scan = true,
            Some((topic, item)) = streams.next(), if !streams.is_empty() => {
                let received = match item {
                    Ok(received) => received,
                    Err(multifeed::Error::Closed) => break,
                    Err(e) => {
                        tracing::warn!("MQTT egress stops publishing {topic:?}: {e}");
                        continue;
                    }
                };
                let key = received.address.key;
                if let Some(out) = delivery(&group, key, &prefix, &received) {
                    let out = Arc::new(out);
                    if !publish(&sinks, &out, &metrics, &cancel).await {
                        break;
                    }
                }
                cursors.entry(topic).or_default().advance(&received.address);
                dirty = true;
            }
        }
    }
    if dirty {
        persist(&path, &cursors).await;
    }
}

/// Topics egress itself made (a mirrored broker may hold them): never published again.
fn is_own_output(topic: &str, prefix: &str) -> bool {
    super::filter::is_under(topic, prefix)
}

/// What to publish for `received`, or `None` when this gateway wrote it.
fn delivery(
    group: &multifeed::Multifeed,
    key: FeedKey,
    prefix: &str,
    received: &ReceivedMessage,
) -> Option<Delivery> {
    let feed = group.feed(key)?;
    if feed.is_local() {
        return None;
    }
    let gateway = match crate::cli::output::gateway_of(&feed) {
        Some(name) => topic_level(&name),
        None => key.to_hex()[..8].to_owned(),
    };
    Some(Delivery {
        topic: format!("{prefix}/{gateway}/{}", received.message.topic),
        payload: Bytes::from(received.message.payload.clone()),
        content_type: received.message.content_type.clone(),
    })
}

/// Sends `out` to every sink; false when the node is stopping.
async fn publish(
    sinks: &Sinks,
    out: &Arc<Delivery>,
    metrics: &MqttMetrics,
    cancel: &CancellationToken,
) -> bool {
    if let Some(subscribers) = &sinks.listener {
        let (_, dropped) = subscribers.deliver(out);
        metrics.egress_dropped.fetch_add(dropped, Ordering::Relaxed);
    }
    if let Some(client) = &sinks.broker {
        // Waits while the client's queue is full (the broker is away): egress
        // holds its place instead of dropping.
        let sent = tokio::select! {
            () = cancel.cancelled() => return false,
            sent = client.publish_bytes(
                out.topic.clone(),
                rumqttc::QoS::AtLeastOnce,
                false,
                out.payload.clone(),
            ) => sent,
        };
        if sent.is_err() {
            return false;
        }
    }
    metrics.egress_published.fetch_add(1, Ordering::Relaxed);
    true
}

async fn persist(path: &Path, cursors: &HashMap<String, Cursor>) {
    let (path, cursors) = (path.to_owned(), cursors.clone());
    let result =
        tokio::task::spawn_blocking(move || save(&path, &cursors).map_err(|e| (path, e))).await;
    if let Ok(Err((path, e))) = result {
        tracing::warn!(
            "cannot save MQTT egress's place in {} ({e}); after a restart some messages may be published again",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_what_matches_and_lose_what_overflows() {
        let subscribers = Arc::new(Subscribers::default());
        let mut a = subscribers.register();
        let b = subscribers.register();
        assert!(a.add("remote/+/temp"));
        assert!(b.add("remote/#"));
        let out = |topic: &str| {
            Arc::new(Delivery {
                topic: topic.into(),
                payload: Bytes::from_static(b"x"),
                content_type: None,
            })
        };
        assert_eq!(subscribers.deliver(&out("remote/gw/temp")), (2, 0));
        assert_eq!(subscribers.deliver(&out("remote/gw/hum")), (1, 0));
        assert_eq!(a.deliveries.try_recv().unwrap().topic, "remote/gw/temp");
        assert!(a.deliveries.try_recv().is_err());
        for _ in 1..SUBSCRIBER_QUEUE {
            subscribers.deliver(&out("remote/gw/hum"));
        }
        // b's queue is full now: the next one is dropped for b only.
        assert_eq!(subscribers.deliver(&out("remote/gw/temp")), (1, 1));
        drop(b);
        assert_eq!(subscribers.deliver(&out("remote/gw/temp")), (1, 0));
        for i in 1..MAX_CLIENT_FILTERS {
            assert!(a.add(&format!("f/{i}")));
        }
        assert!(!a.add("one/more"));
        a.remove("f/1");
        assert!(a.add("one/more"));
    }

    #[test]
    fn the_place_survives_a_restart_and_a_damaged_line_only_costs_its_topic() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_path(dir.path());
        assert!(load(&path).is_none());
        let mut cursors = HashMap::new();
        cursors.insert("a/b".to_owned(), Cursor::new());
        save(&path, &cursors).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("{text}junk\n")).unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.len(), 1);
        assert!(loaded.contains_key("a/b"));
    }
}
