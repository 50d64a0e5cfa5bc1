//! The node's local HTTP API (axum).
//!
//! | route | what |
//! |---|---|
//! | `POST /topics/{topic}/messages` | publish one message: the body is the payload, `Content-Type` is kept |
//! | `POST /topics/{topic}/batch` | publish NDJSON lines `{"payload": "..."}` (or `payload_base64`, optional `content_type`, `time_ms`) |
//! | `GET /topics/{topic}/messages?from=CURSOR&limit=N` | read, as `read --json` does: messages and the cursor past them |
//! | `GET /topics/{topic}/events?from=CURSOR` | follow as Server-Sent Events; each event's id is the cursor past it, so `Last-Event-ID` resumes |
//!
//! Both reads take `tail=N` instead of `from`: start with the last N messages of
//! each gateway's feed of the topic (`tail=0`: only what comes next).
//! | `GET /topics`, `/feeds`, `/peers`, `/health`, `/metrics` | what they say; `/metrics` in Prometheus text |
//! | `GET /verify` | re-check every feed, as `multifeed verify` does |
//! | `GET /` | the live web page (see [`web`]) |
//!
//! A publish is answered (201, with the messages' addresses) only once the
//! messages are appended: written to the operating system, so they survive a
//! kill of the process ([`multifeed::Durability::Process`]). Single publishes
//! that arrive together are committed together (one signed append per topic,
//! one block per message); no lock is held across the write.
//!
//! Off loopback every request but the page's own files must carry the token:
//! `Authorization: Bearer <token>`, or for a `GET` (all the page makes) the
//! page's session cookie.

use std::{
    collections::HashMap, convert::Infallible, sync::Arc, sync::atomic::Ordering, time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, Query, Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    middleware::{self, Next},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::{Stream, StreamExt};
use multifeed::{
    Error, Topics,
    topics::{Cursor, Message, MessageAddress, Packing},
};
use serde::Deserialize;
use serde_json::json;
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use super::{Shared, peers::PeerState, web};
use crate::cli::{ndjson, output, store};

/// Messages a read returns when no `limit` is given, and at most.
const DEFAULT_READ_LIMIT: usize = 1_000;
const MAX_READ_LIMIT: usize = 10_000;
/// Largest request body: one payload, or an NDJSON batch.
const MAX_BODY: usize = 32 * 1024 * 1024;

/// Single publishes waiting for the group committer; a full queue holds the
/// next request back (backpressure), it never grows.
const PUBLISH_QUEUE: usize = 4_096;
/// Most single publishes of one topic committed in one append.
const MAX_GROUP: usize = 1_024;

/// One single publish waiting to be committed, and where to answer.
struct Pending {
    message: Message,
    reply: oneshot::Sender<Result<MessageAddress, Error>>,
}

/// The API's state: the node's, and the queue of the group committer.
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
    publish: mpsc::Sender<Pending>,
}

/// Serves the API on `listener` until `cancel`; requests in flight finish first,
/// then the committer publishes what is queued and ends.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
    // Owned here: it ends once the server (which holds every sender) has.
    let committer = tokio::spawn(commit_groups(shared.topics.clone(), queue));
    use axum::ServiceExt as _;
    use tower::Layer as _;
    // Before routing: a route's `{topic}` is one path segment.
    let app = tower::util::MapRequestLayer::new(topic_slashes_encoded)
        .layer(router(Api { shared, publish }));
    let stop = cancel.clone();
    if let Err(e) = axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!("the HTTP API stopped: {e}");
    }
    if let Err(e) = committer.await {
        tracing::error!("the publish committer failed: {e}");
    }
}

/// Group commit: single publishes that arrive while an append runs are appended
/// together, one block each, in one signed append per topic; each is answered
/// once that append has returned. Should a group fail, its messages are
/// published one by one if it was refused before anything was written (an
/// invalid message), so each request gets its own error.
async fn commit_groups(topics: Topics, mut queue: mpsc::Receiver<Pending>) {
    let mut waiting = Vec::new();
    while queue.recv_many(&mut waiting, MAX_GROUP).await > 0 {
        let mut by_topic: HashMap<String, Vec<Pending>> = HashMap::new();
        for pending in waiting.drain(..) {
            by_topic
                .entry(pending.message.topic.clone())
                .or_default()
                .push(pending);
        }
        for (_, group) in by_topic {
            let messages = group.iter().map(|p| p.message.clone());
            match topics
                .publish_batch_with(messages, Packing::one_per_block())
                .await
            {
                Ok(addresses) => {
                    for (pending, address) in group.into_iter().zip(addresses) {
                        let _ = pending.reply.send(Ok(address));
                    }
                }
                // Refused before anything was written: find whose message it was.
                Err(Error::InvalidTopic { .. } | Error::InvalidMessage { .. }) => {
                    for pending in group {
                        let result = topics.publish(pending.message).await;
                        let _ = pending.reply.send(result);
                    }
                }
                // The append itself failed: retrying might write twice.
                Err(e) => {
                    let reason = e.to_string();
                    for pending in group {
                        let _ = pending.reply.send(Err(Error::Io {
                            context: format!("publishing to {:?}", pending.message.topic),
                            source: std::io::Error::other(reason.clone()),
                        }));
                    }
                }
            }
        }
    }
}

/// `/topics/sensors/temp/messages` as `/topics/sensors%2Ftemp/messages`: MQTT
/// topics hold `/`, and a client should not have to encode it. The last segment
/// names the action, everything between `/topics/` and it the topic.
fn topic_slashes_encoded(mut request: Request) -> Request {
    let path = request.uri().path();
    let Some((topic, action)) = path
        .strip_prefix("/topics/")
        .and_then(|rest| rest.rsplit_once('/'))
    else {
        return request;
    };
    if !topic.contains('/') || !matches!(action, "messages" | "batch" | "events") {
        return request;
    }
    let mut path_and_query = format!("/topics/{}/{action}", topic.replace('/', "%2F"));
    if let Some(query) = request.uri().query() {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    let mut parts = request.uri().clone().into_parts();
    if let Ok(rewritten) = path_and_query.parse() {
        parts.path_and_query = Some(rewritten);
        if let Ok(uri) = axum::http::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
    request
}

pub fn router(api: Api) -> Router {
    let shared = api.shared.clone();
    Router::new()
        .route("/health", get(health))
        .route("/peers", get(peers))
        .route("/topics", get(topics))
        .route("/feeds", get(feeds))
        .route("/verify", get(verify))
        .route("/metrics", get(metrics))
        .route(
            "/topics/{topic}/messages",
            post(publish_one).get(read_messages),
        )
        .route("/topics/{topic}/batch", post(publish_batch))
        .route("/topics/{topic}/events", get(follow))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(shared, authorize))
        // The page's files hold no data: served without the token, so that
        // the page can ask for it.
        .merge(web::router())
        .with_state(api)
}

/// An error answered as `{"error": {"kind", "message"}}`.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        let (status, kind) = match &error {
            Error::InvalidTopic { .. } => (StatusCode::BAD_REQUEST, "invalid_topic"),
            Error::InvalidMessage { .. } => (StatusCode::BAD_REQUEST, "invalid_message"),
            Error::InvalidCursor { .. } => (StatusCode::BAD_REQUEST, "invalid_cursor"),
            Error::Closed => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "storage"),
        };
        Self {
            status,
            kind,
            message: error.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": {"kind": self.kind, "message": self.message}})),
        )
            .into_response()
    }
}

async fn authorize(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &shared.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            // Reads only: a cookie rides along with requests the page didn't
            // make, so it never authorizes a publish.
            .or_else(|| {
                (request.method() == Method::GET)
                    .then(|| web::token_cookie(request.headers()))
                    .flatten()
            });
        if !given.is_some_and(|given| super::same_secret(given.trim().as_bytes(), token.as_bytes()))
        {
            return Err(ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "unauthorized",
                message: "this API needs the group's token: send `Authorization: Bearer <token>` with the token from the file beside the key file (in a browser, open the page as /#token=<token>)".into(),
            });
        }
    }
    let response = next.run(request).await;
    if response.status().is_server_error() {
        shared.metrics.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    Ok(response)
}

/// Metric lines as a JSON object, each named without `prefix`.
fn counters<'a>(
    lines: impl IntoIterator<Item = (&'a str, &'a str, &'a str, u64)>,
    prefix: &str,
) -> serde_json::Map<String, serde_json::Value> {
    lines
        .into_iter()
        .map(|(name, _, _, value)| (name.trim_start_matches(prefix).to_owned(), json!(value)))
        .collect()
}

async fn health(State(Api { shared, .. }): State<Api>) -> Json<serde_json::Value> {
    let peers = shared.peers.snapshot();
    let connected = peers
        .iter()
        .filter(|p| p.state == PeerState::Connected)
        .count();
    Json(json!({
        "status": "ok",
        "group": store::group_id(shared.group.shared_key()),
        "node": shared.registry.own().to_string(),
        "gateway": shared.gateway,
        "started_ms": shared.started_ms,
        "feeds": shared.group.feeds().len(),
        "peers": peers.len(),
        "peers_connected": connected,
        "discovery": counters(shared.metrics.discovery.lines(), "multifeed_discovery_"),
        "mqtt": shared
            .mqtt
            .then(|| counters(shared.metrics.mqtt.lines(), "multifeed_mqtt_")),
    }))
}

async fn peers(State(Api { shared, .. }): State<Api>) -> Json<serde_json::Value> {
    let rows: Vec<serde_json::Value> = shared
        .peers
        .snapshot()
        .into_iter()
        .map(|row| {
            let since = output::format_time(row.since_ms);
            let mut value = serde_json::to_value(row).unwrap_or_default();
            value["since"] = json!(since);
            value
        })
        .collect();
    Json(json!({ "peers": rows }))
}

async fn topics(
    State(Api { shared, .. }): State<Api>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "topics": shared.topics.topics().await? })))
}

async fn feeds(State(Api { shared, .. }): State<Api>) -> Json<serde_json::Value> {
    let mut feeds = Vec::new();
    for feed in shared.group.feeds() {
        feeds.push(output::feed_json(&feed).await);
    }
    Json(json!({ "feeds": feeds }))
}

/// Re-checks every feed, as `multifeed verify` does; 200 either way, with `ok`.
async fn verify(
    State(Api { shared, .. }): State<Api>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let report = shared.group.verify().await?;
    Ok(Json(json!({
        "ok": report.is_ok(),
        "damaged": report.damaged(),
        "feeds": output::verify_rows(&report),
    })))
}

async fn metrics(State(Api { shared, .. }): State<Api>) -> impl IntoResponse {
    let peers = shared.peers.snapshot();
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    let m = &shared.metrics;
    metric(
        "multifeed_published_messages_total",
        "counter",
        "Messages published through this API.",
        m.published_messages.load(Ordering::Relaxed),
    );
    metric(
        "multifeed_published_bytes_total",
        "counter",
        "Payload bytes published through this API.",
        m.published_bytes.load(Ordering::Relaxed),
    );
    metric(
        "multifeed_http_errors_total",
        "counter",
        "HTTP requests answered with a server error.",
        m.http_errors.load(Ordering::Relaxed),
    );
    for (name, kind, help, value) in m.mqtt.lines() {
        metric(name, kind, help, value);
    }
    for (name, kind, help, value) in m.discovery.lines() {
        metric(name, kind, help, value);
    }
    // Replication lag: blocks this node knows exist (signed lengths it has seen)
    // but does not hold yet.
    let mut missing = 0u64;
    for feed in shared.group.feeds() {
        missing += feed.len().await.saturating_sub(feed.contiguous_len().await);
    }
    metric(
        "multifeed_blocks_missing",
        "gauge",
        "Blocks of member feeds known to exist but not held here yet (replication lag).",
        missing,
    );
    let admissions = shared.group.admission_stats();
    metric(
        "multifeed_feeds_unproven",
        "gauge",
        "Feeds a peer offered that are on trial until they deliver a verified block.",
        admissions.unproven as u64,
    );
    metric(
        "multifeed_feeds_admitted_total",
        "counter",
        "Offered feeds admitted as members after delivering.",
        admissions.admitted,
    );
    metric(
        "multifeed_feeds_discarded_total",
        "counter",
        "Offered feeds discarded because they delivered nothing.",
        admissions.discarded,
    );
    metric(
        "multifeed_admission_limit_hits_total",
        "counter",
        "Sessions ended because a peer offered too many feeds that delivered nothing.",
        admissions.limit_hits,
    );
    metric(
        "multifeed_feeds",
        "gauge",
        "Member feeds held.",
        shared.group.feeds().len() as u64,
    );
    metric(
        "multifeed_peers_connected",
        "gauge",
        "Peers with a live session.",
        peers
            .iter()
            .filter(|p| p.state == PeerState::Connected)
            .count() as u64,
    );
    metric(
        "multifeed_received_blocks_total",
        "counter",
        "Verified blocks received from peers listed now.",
        peers.iter().map(|p| p.blocks_received).sum(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

fn published(shared: &Shared, count: usize, bytes: usize) {
    shared
        .metrics
        .published_messages
        .fetch_add(count as u64, Ordering::Relaxed);
    shared
        .metrics
        .published_bytes
        .fetch_add(bytes as u64, Ordering::Relaxed);
}

async fn publish_one(
    State(Api { shared, publish }): State<Api>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let mut message = Message::new(topic, body.to_vec());
    if let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        message = message.with_content_type(content_type);
    }
    let (reply, answer) = oneshot::channel();
    let stopping = || Error::Closed;
    publish
        .send(Pending { message, reply })
        .await
        .map_err(|_| stopping())?;
    let address = answer.await.map_err(|_| stopping())??;
    published(&shared, 1, body.len());
    Ok((
        StatusCode::CREATED,
        Json(json!({ "address": address.to_string() })),
    ))
}

fn batch_message(topic: &str, number: usize, line: &str) -> Result<Option<Message>, ApiError> {
    ndjson::parse(topic, number, line, &ndjson::Defaults::default())
        .map_err(|e| ApiError::bad_request("invalid_batch", e.to_string()))
}

async fn publish_batch(
    State(Api { shared, .. }): State<Api>,
    Path(topic): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("invalid_batch", "the batch is not UTF-8 NDJSON"))?;
    let mut messages = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        messages.extend(batch_message(&topic, i + 1, line)?);
    }
    let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    let count = messages.len();
    let addresses = shared.topics.publish_batch(messages).await?;
    published(&shared, count, bytes);
    let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    Ok((StatusCode::CREATED, Json(json!({ "addresses": addresses }))))
}

/// The name of the gateway that wrote `m`, when its feed says.
fn gateway(shared: &Shared, m: &multifeed::topics::ReceivedMessage) -> Option<String> {
    output::gateway_for(&shared.group, m.address.key)
}

#[derive(Deserialize)]
struct ReadQuery {
    from: Option<String>,
    limit: Option<usize>,
    /// Start at the last this many messages of each feed, when `from` is absent.
    tail: Option<usize>,
}

/// Where a read starts: the cursor given, else the tail asked for, else the
/// beginning.
async fn start_cursor(
    shared: &Shared,
    topic: &str,
    from: Option<&str>,
    tail: Option<usize>,
) -> Result<Cursor, ApiError> {
    match (from.map(str::trim).filter(|t| !t.is_empty()), tail) {
        (None, Some(tail)) => Ok(shared
            .topics
            .tail_cursor(topic, tail.min(MAX_READ_LIMIT))
            .await?),
        (from, _) => parse_cursor(from),
    }
}

fn parse_cursor(text: Option<&str>) -> Result<Cursor, ApiError> {
    match text.map(str::trim).filter(|t| !t.is_empty()) {
        None => Ok(Cursor::default()),
        Some(text) => text.parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_cursor",
                "malformed cursor: pass the `cursor` text a previous read returned",
            )
        }),
    }
}

async fn read_messages(
    State(Api { shared, .. }): State<Api>,
    Path(topic): Path<String>,
    Query(query): Query<ReadQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let cursor = start_cursor(&shared, &topic, query.from.as_deref(), query.tail).await?;
    let limit = query
        .limit
        .unwrap_or(DEFAULT_READ_LIMIT)
        .min(MAX_READ_LIMIT);
    let (messages, next) = shared.topics.read(&topic, &cursor, limit).await?;
    let messages: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| output::message_json(m, gateway(&shared, m).as_deref()))
        .collect();
    Ok(Json(
        json!({ "messages": messages, "cursor": next.to_string() }),
    ))
}

async fn follow(
    State(Api { shared, .. }): State<Api>,
    Path(topic): Path<String>,
    Query(query): Query<ReadQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    // A reconnecting browser sends the last id it saw: that cursor wins.
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let from = last_id.as_deref().or(query.from.as_deref());
    let cursor = start_cursor(&shared, &topic, from, query.tail).await?;
    // Refuses a bad topic or a cursor of another topic now, as a 400, and scopes
    // the cursor to the topic so its text is the one `read` prints.
    let (_, mut cursor) = shared.topics.read(&topic, &cursor, 0).await?;
    let stream = shared
        .topics
        .follow(&topic, cursor.clone())
        .take_until(shared.stopping.clone().cancelled_owned())
        .map(move |item| {
            let event = match item {
                Ok(received) => {
                    cursor.advance(&received.address);
                    Event::default()
                        .event("message")
                        .id(cursor.to_string())
                        .data(
                            output::message_json(&received, gateway(&shared, &received).as_deref())
                                .to_string(),
                        )
                }
                Err(e) => Event::default().event("error").data(e.to_string()),
            };
            Ok(event)
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_lines_take_text_or_base64() {
        let m = batch_message(
            "t",
            1,
            r#"{"payload": "21.5", "content_type": "text/plain"}"#,
        )
        .ok()
        .flatten()
        .unwrap();
        assert_eq!(m.payload, b"21.5");
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        let m = batch_message("t", 1, r#"{"payload_base64": "AAE=", "time_ms": 7}"#)
            .ok()
            .flatten()
            .unwrap();
        assert_eq!((m.payload, m.timestamp_ms), (vec![0, 1], 7));
        assert!(batch_message("t", 1, r#"{"payload": "a", "payload_base64": "AA=="}"#).is_err());
        assert!(batch_message("t", 1, "21.5").is_err());
        assert!(batch_message("t", 1, r#"{"payload": "a", "extra": 1}"#).is_err());
        const { assert!(multifeed::topics::MAX_PAYLOAD_LEN < MAX_BODY) };
    }
}
