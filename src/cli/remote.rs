//! The CLI's way into a store a running node holds.
//!
//! A node (`multifeed serve`) holds its store's lock for as long as it runs. So an
//! operator can use the same commands whether or not it is up, the node writes
//! `<dir>/node-api` naming its local HTTP API, and `write`, `read` (with
//! `--follow`), `topics`, `feeds` and `verify` go through that API when the lock is
//! taken. The file is removed when the node stops; one left by a killed node is
//! stale and ignored (its lock went with the process).

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, bail};
use multifeed::{
    FeedKey,
    topics::{Cursor, Message, MessageAddress, ReceivedMessage},
};
use serde::{Deserialize, Serialize};

use super::output::Labelled;
use serde_json::Value;

/// The file in a store naming the API of the node that holds it.
pub const NODE_API_FILE: &str = "node-api";

/// What `<dir>/node-api` says.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeApiFile {
    /// Where the node's HTTP API answers (a loopback address when it listens on all).
    pub http: SocketAddr,
    /// The node's process id, for the operator.
    pub pid: u32,
}

/// Writes `<dir>/node-api` for a node whose API answers on `bound`.
pub fn write_api_file(dir: &Path, bound: SocketAddr) -> anyhow::Result<()> {
    // A node bound to every interface answers on loopback too.
    let http = if bound.ip().is_unspecified() {
        let loopback = match bound {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        SocketAddr::new(loopback, bound.port())
    } else {
        bound
    };
    let file = NodeApiFile {
        http,
        pid: std::process::id(),
    };
    let path = dir.join(NODE_API_FILE);
    let text = serde_json::to_string(&file)?;
    // Written whole and renamed into place: a CLI never reads half of it.
    let partial = dir.join(format!("{NODE_API_FILE}.partial"));
    std::fs::write(&partial, format!("{text}\n"))
        .and_then(|()| std::fs::rename(&partial, &path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Removes `<dir>/node-api` (the node is stopping, or it was stale).
pub fn remove_api_file(dir: &Path) {
    let path = dir.join(NODE_API_FILE);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
}

/// A client of the local API of the node holding a store.
pub struct NodeApi {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

/// Largest node API file read; the node writes one short JSON line.
const MAX_API_FILE: u64 = 4096;

impl NodeApi {
    /// The API of the node holding the store at `dir`, if its file names one.
    pub fn find(dir: &Path, token: Option<String>) -> anyhow::Result<Option<Self>> {
        let path = dir.join(NODE_API_FILE);
        let text = match super::store::read_bounded(&path, MAX_API_FILE, "a node's API file") {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let file: NodeApiFile = serde_json::from_str(text.trim()).with_context(|| {
            format!(
                "{} is not a node's API file; stop the process holding the store, or remove the file",
                path.display()
            )
        })?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("cannot start an HTTP client")?;
        Ok(Some(Self {
            base: format!("http://{}", file.http),
            token,
            client,
        }))
    }

    /// Where the API answers.
    pub fn address(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; a 2xx answer's response, else the API's error in our words.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| {
            anyhow::anyhow!(
                "the store is held by a running node whose API at {} does not answer ({e}); wait for it to start, or stop it (`serve` holds the store while it runs)",
                self.base
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body: Value = response.json_or_default().await;
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("it answered {status}"));
        bail!("the node holding the store refused: {message}")
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        Ok(response.json_or_default().await)
    }

    /// Publishes one message (through the batch route, which keeps its timestamp);
    /// its address.
    pub async fn publish(&self, message: Message) -> anyhow::Result<String> {
        let topic = message.topic.clone();
        let mut addresses = self.publish_batch(&topic, &[message]).await?;
        addresses
            .pop()
            .context("the node's answer to a publish had no address")
    }

    /// Publishes `messages` (all of one topic) in one batch; their addresses.
    pub async fn publish_batch(
        &self,
        topic: &str,
        messages: &[Message],
    ) -> anyhow::Result<Vec<String>> {
        let mut body = String::new();
        for m in messages {
            body.push_str(&super::ndjson::encode(m));
            body.push('\n');
        }
        let request = self
            .request(reqwest::Method::POST, &topic_path(topic, "batch"))
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .body(body);
        let answer: Value = self.send(request).await?.json_or_default().await;
        let addresses: Vec<String> = answer["addresses"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if addresses.len() != messages.len() {
            bail!(
                "the node acknowledged {} of {} messages; read the topic to see which arrived",
                addresses.len(),
                messages.len()
            );
        }
        Ok(addresses)
    }

    /// Reads up to `limit` messages of `topic` after `cursor`, and the cursor past them.
    pub async fn read(
        &self,
        topic: &str,
        cursor: &Cursor,
        limit: usize,
    ) -> anyhow::Result<(Vec<Labelled>, Cursor)> {
        let from = cursor.to_string();
        let request = self
            .request(reqwest::Method::GET, &topic_path(topic, "messages"))
            .query(&[("from", from.as_str()), ("limit", &limit.to_string())]);
        let answer: Value = self.send(request).await?.json_or_default().await;
        let messages = answer["messages"]
            .as_array()
            .map(|all| {
                all.iter()
                    .map(message_from_json)
                    .collect::<Option<Vec<_>>>()
            })
            .unwrap_or(Some(Vec::new()))
            .context("the node answered a read with a malformed message")?;
        let next = answer["cursor"]
            .as_str()
            .context("the node's answer to a read had no cursor")?
            .parse()
            .map_err(|e| anyhow::anyhow!("the node answered with a malformed cursor: {e}"))?;
        Ok((messages, next))
    }

    /// The cursor at the last `tail` messages of each feed of `topic`.
    pub async fn tail_cursor(&self, topic: &str, tail: usize) -> anyhow::Result<Cursor> {
        let request = self
            .request(reqwest::Method::GET, &topic_path(topic, "messages"))
            .query(&[("tail", tail.to_string()), ("limit", "0".to_owned())]);
        let answer: Value = self.send(request).await?.json_or_default().await;
        answer["cursor"]
            .as_str()
            .context("the node's answer to a read had no cursor")?
            .parse()
            .map_err(|e| anyhow::anyhow!("the node answered with a malformed cursor: {e}"))
    }

    /// Follows `topic` from `cursor` as Server-Sent Events.
    pub async fn follow(&self, topic: &str, cursor: &Cursor) -> anyhow::Result<Events> {
        let request = self
            .request(reqwest::Method::GET, &topic_path(topic, "events"))
            .query(&[("from", cursor.to_string())]);
        let response = self.send(request).await?;
        Ok(Events {
            response,
            buffer: Vec::new(),
        })
    }

    /// The topics the node holds.
    pub async fn topics(&self) -> anyhow::Result<Vec<String>> {
        let answer = self.get("/topics").await?;
        Ok(answer["topics"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The node's feeds, one JSON object each (as `feeds --json` prints them).
    pub async fn feeds(&self) -> anyhow::Result<Vec<Value>> {
        let answer = self.get("/feeds").await?;
        Ok(answer["feeds"].as_array().cloned().unwrap_or_default())
    }

    /// The node's peers, one JSON object each (as `/peers` gives them).
    pub async fn peers(&self) -> anyhow::Result<Vec<Value>> {
        let answer = self.get("/peers").await?;
        Ok(answer["peers"].as_array().cloned().unwrap_or_default())
    }

    /// Verifies every feed on the node; the report, as `/verify` gives it.
    pub async fn verify(&self) -> anyhow::Result<Value> {
        self.get("/verify").await
    }
}

/// `/topics/<topic>/<what>`, the topic escaped for a path.
fn topic_path(topic: &str, what: &str) -> String {
    let mut escaped = String::new();
    for byte in topic.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            escaped.push(byte as char);
        } else {
            escaped.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("/topics/{escaped}/{what}")
}

/// The messages of a followed topic as they arrive.
pub struct Events {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Events {
    /// The next message and the cursor past it; `None` once the node ends the stream
    /// (it stopped, or was killed).
    pub async fn next(&mut self) -> anyhow::Result<Option<(Labelled, Cursor)>> {
        loop {
            if let Some(end) = find_event_end(&self.buffer) {
                let event: Vec<u8> = self.buffer.drain(..end).collect();
                if let Some(item) = parse_event(&event)? {
                    return Ok(Some(item));
                }
                continue;
            }
            // An event is a few KiB at most; a stream that never ends one is not a node.
            if self.buffer.len() > MAX_EVENT {
                bail!("the node sent an event over {MAX_EVENT} bytes; is it a multifeed node?");
            }
            match self.response.chunk().await {
                Ok(Some(chunk)) => self.buffer.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                // A node killed mid-stream breaks its chunked body off: it stopped.
                Err(e) => {
                    tracing::debug!("the node's event stream broke off: {e}");
                    return Ok(None);
                }
            }
        }
    }
}

/// Largest event accepted from the node: a message of the largest payload, base64.
const MAX_EVENT: usize = 4 * multifeed::topics::MAX_PAYLOAD_LEN;

/// Where the first event in `buffer` ends (past its blank line).
fn find_event_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| at + 2)
}

/// A message event, or `None` for a keep-alive comment.
fn parse_event(event: &[u8]) -> anyhow::Result<Option<(Labelled, Cursor)>> {
    let text = String::from_utf8_lossy(event);
    let (mut kind, mut id, mut data) = ("message", None, String::new());
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            kind = if value.trim() == "message" {
                "message"
            } else {
                "error"
            };
        } else if let Some(value) = line.strip_prefix("id:") {
            id = Some(value.trim().to_owned());
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    if data.is_empty() {
        return Ok(None);
    }
    if kind == "error" {
        bail!("the node could not read on: {data}");
    }
    let value: Value = serde_json::from_str(&data).context("the node sent a malformed event")?;
    let message = message_from_json(&value).context("the node sent a malformed message")?;
    let cursor = id
        .context("the node sent a message without its cursor")?
        .parse()
        .map_err(|e| anyhow::anyhow!("the node sent a malformed cursor: {e}"))?;
    Ok(Some((message, cursor)))
}

/// A message from its JSON form ([`super::output::message_json`]).
pub fn message_from_json(value: &Value) -> Option<Labelled> {
    use base64::Engine as _;
    let payload = match (value["payload"].as_str(), value["payload_base64"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?,
        (None, None) => return None,
    };
    let mut message = Message::new(value["topic"].as_str()?, payload)
        .with_timestamp_ms(value["time_ms"].as_u64()?);
    if let Some(ct) = value["content_type"].as_str() {
        message = message.with_content_type(ct);
    }
    let address = MessageAddress {
        key: FeedKey::from_hex(value["key"].as_str()?).ok()?,
        seq: value["seq"].as_u64()?,
        index: u32::try_from(value["index"].as_u64()?).ok()?,
    };
    Some(Labelled {
        message: ReceivedMessage { address, message },
        gateway: value["gateway"].as_str().map(str::to_owned),
    })
}

/// Reads a JSON body, or `null` when there is none or it is not JSON.
trait JsonOrDefault {
    async fn json_or_default(self) -> Value;
}

impl JsonOrDefault for reqwest::Response {
    async fn json_or_default(self) -> Value {
        match self.bytes().await {
            Ok(body) => serde_json::from_slice(&body).unwrap_or_default(),
            Err(_) => Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endless API file is refused after its bound, with what to do.
    #[test]
    fn an_endless_api_file_is_refused_after_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.path().join(NODE_API_FILE)).unwrap();
        let (result, peak) = crate::alloc_probe::peak_bytes(|| NodeApi::find(dir.path(), None));
        let error = format!("{:#}", result.err().expect("refused"));
        assert!(error.contains("not a node's API file"), "{error}");
        assert!(peak <= 4 * MAX_API_FILE as usize, "{peak} bytes");
    }

    #[test]
    fn topics_are_escaped_in_paths() {
        assert_eq!(topic_path("temp", "batch"), "/topics/temp/batch");
        assert_eq!(
            topic_path("sensors/a b", "messages"),
            "/topics/sensors%2Fa%20b/messages"
        );
    }

    #[test]
    fn events_split_on_blank_lines_and_comments_are_skipped() {
        let stream = b": keep-alive\n\nevent: message\nid: c1\ndata: {}\n\n";
        let end = find_event_end(stream).unwrap();
        assert!(parse_event(&stream[..end]).unwrap().is_none());
        assert_eq!(find_event_end(&stream[end..]), Some(stream.len() - end));
        assert!(parse_event(b"event: error\ndata: gone\n\n").is_err());
    }
}
