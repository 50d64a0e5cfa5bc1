//! Printing: timestamps, messages, JSON lines.

use multifeed::topics::ReceivedMessage;
use serde_json::json;

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC) for milliseconds since the Unix epoch.
pub fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

/// A message with the name of the gateway that wrote it, when known.
pub struct Labelled {
    pub message: ReceivedMessage,
    pub gateway: Option<String>,
}

/// The name of the gateway writing `feed`, when its metadata says.
pub fn gateway_of(feed: &multifeed::Feed) -> Option<String> {
    feed.metadata().get(GATEWAY).cloned()
}

/// The name of the gateway writing the feed `key` of `group`, when known.
pub fn gateway_for(group: &multifeed::Multifeed, key: multifeed::FeedKey) -> Option<String> {
    group.feed(key).and_then(|f| gateway_of(&f))
}

/// The metadata entry naming a feed's gateway.
pub const GATEWAY: &str = "gateway";

/// One message as a line: time, the gateway that wrote it (else its feed's short
/// key), payload.
pub fn message_line(m: &ReceivedMessage, gateway: Option<&str>) -> String {
    let writer = match gateway {
        Some(name) => printable(name),
        None => m.address.key.to_hex()[..8].to_owned(),
    };
    format!(
        "{}  {}  {}",
        format_time(m.message.timestamp_ms),
        writer,
        printable(&String::from_utf8_lossy(&m.message.payload))
    )
}

/// `text` with control characters escaped (`\n`, `\u{1b}`), so a payload stays on
/// its line and cannot move the cursor or recolour the terminal.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// One message as a JSON object. The payload is a string when it is UTF-8, else
/// `payload_base64`; `gateway` when the writer's feed names it.
pub fn message_json(m: &ReceivedMessage, gateway: Option<&str>) -> serde_json::Value {
    let mut value = json!({
        "topic": m.message.topic,
        "time_ms": m.message.timestamp_ms,
        "time": format_time(m.message.timestamp_ms),
        "address": m.address.to_string(),
        "key": m.address.key.to_hex(),
        "seq": m.address.seq,
        "index": m.address.index,
    });
    match std::str::from_utf8(&m.message.payload) {
        Ok(text) => value["payload"] = json!(text),
        Err(_) => {
            use base64::Engine as _;
            value["payload_base64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&m.message.payload));
        }
    }
    if let Some(ct) = &m.message.content_type {
        value["content_type"] = json!(ct);
    }
    if let Some(gateway) = gateway {
        value["gateway"] = json!(gateway);
    }
    value
}

/// A member feed as `feeds --json` prints it and the node's `/feeds` answers.
pub async fn feed_json(feed: &multifeed::Feed) -> serde_json::Value {
    json!({
        "key": feed.key().to_hex(),
        "name": feed.name(),
        "gateway": gateway_of(feed),
        "metadata": feed.metadata(),
        "local": feed.is_local(),
        "length": feed.len().await,
        "held": feed.contiguous_len().await,
        "bytes": feed.byte_len().await,
    })
}

/// The heading of the `feeds` table.
pub fn feeds_heading() -> String {
    format!(
        "{:<64}  {:<16}  {:<20}  {:<6}  {:>9}  {:>9}  {:>10}",
        "key", "gateway", "name", "kind", "length", "held", "bytes"
    )
}

/// One row of the `feeds` table, from [`feed_json`].
pub fn feed_line(row: &serde_json::Value) -> String {
    let kind = if row["local"].as_bool() == Some(true) {
        "local"
    } else {
        "remote"
    };
    format!(
        "{:<64}  {:<16}  {:<20}  {:<6}  {:>9}  {:>9}  {:>10}",
        row["key"].as_str().unwrap_or("?"),
        printable(row["gateway"].as_str().unwrap_or("-")),
        row["name"].as_str().unwrap_or("-"),
        kind,
        row["length"].as_u64().unwrap_or(0),
        row["held"].as_u64().unwrap_or(0),
        bytes(row["bytes"].as_u64().unwrap_or(0))
    )
}

/// A verify report as rows (`verify --json` prints one per line; the node's
/// `/verify` answers them all).
pub fn verify_rows(report: &multifeed::VerifyReport) -> Vec<serde_json::Value> {
    use multifeed::FeedStatus;
    let mut rows = Vec::new();
    for feed in &report.feeds {
        let (ok, seq, reason) = match &feed.status {
            FeedStatus::Ok => (true, None, None),
            FeedStatus::Damaged { seq, reason } => (false, *seq, Some(reason.as_str())),
            _ => (false, None, Some("unknown")),
        };
        rows.push(
            json!({"key": feed.key.to_hex(), "name": feed.name, "length": feed.length,
                         "checked": feed.checked, "fork": feed.fork, "ok": ok,
                         "unmarked": feed.unmarked,
                         "damaged_at": seq, "reason": reason}),
        );
    }
    for skipped in &report.skipped {
        let key = skipped
            .key
            .map(|k| k.to_hex())
            .unwrap_or_else(|| "?".into());
        let access_refused = skipped.kind == multifeed::SkipKind::AccessRefused;
        rows.push(
            json!({"key": key, "name": skipped.name, "ok": false, "skipped": true,
                         "access_refused": access_refused,
                         "path": skipped.path, "reason": skipped.reason}),
        );
    }
    for path in &report.unlisted {
        let key = path.file_name().map(|n| n.to_string_lossy().into_owned());
        rows.push(json!({"key": key, "ok": false, "unlisted": true, "path": path}));
    }
    rows
}

/// One line of `verify`'s text output, from a row of [`verify_rows`].
pub fn verify_line(row: &serde_json::Value) -> String {
    let key = row["key"].as_str().unwrap_or("?");
    let name = row["name"].as_str().unwrap_or("(remote)");
    let reason = row["reason"].as_str().unwrap_or_default();
    if row["unlisted"].as_bool() == Some(true) {
        return format!(
            "UNLISTED {key}: the store's index does not list the feed directory {}: its blocks are kept but neither read nor replicated",
            row["path"].as_str().unwrap_or("?")
        );
    }
    if row["access_refused"].as_bool() == Some(true) {
        return format!(
            "REFUSED  {key}  {name}: the system refused access to its files ({}): {reason}",
            row["path"].as_str().unwrap_or("?")
        );
    }
    if row["skipped"].as_bool() == Some(true) {
        return format!(
            "DAMAGED  {key}  {name}: cannot be loaded ({}): {reason}",
            row["path"].as_str().unwrap_or("?")
        );
    }
    if row["ok"].as_bool() == Some(true) {
        let fork = row["fork"].as_u64().unwrap_or(0);
        let unmarked = row["unmarked"].as_u64().unwrap_or(0);
        format!(
            "ok       {key}  {name}: {} of {} blocks held and verified{}{}",
            row["checked"].as_u64().unwrap_or(0),
            row["length"].as_u64().unwrap_or(0),
            if fork > 0 {
                format!(" (truncated by its writer: fork {fork})")
            } else {
                String::new()
            },
            if unmarked > 0 {
                format!(
                    "; note: the data file holds {unmarked} more intact blocks its bitfield does not mark held (a damaged bitfield, or downloads a crash cut off): the next sync fetches them again"
                )
            } else {
                String::new()
            }
        )
    } else {
        let at = row["damaged_at"]
            .as_u64()
            .map_or("its signed tree".to_owned(), |s| format!("block {s}"));
        format!("DAMAGED  {key}  {name}: at {at}: {reason}")
    }
}

/// `1.5 KiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_cannot_paint_the_terminal() {
        assert_eq!(printable("21.5"), "21.5");
        assert_eq!(printable("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(printable("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(printable("grüße"), "grüße");
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(format_time(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }
}
