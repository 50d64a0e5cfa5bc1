//! The message line: one JSON object per message. `read --json` prints it,
//! `write --format ndjson` and the node's batch route take it, so a topic read
//! from one store can be written into another, binary payloads included.
//!
//! ```text
//! {"payload": "21.5", "content_type": "text/plain", "time_ms": 1764576000000}
//! {"payload_base64": "AAEC"}
//! ```

use base64::Engine as _;
use multifeed::topics::Message;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::json;

/// A line that is not a message, with the line number (from 1).
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error(
        "line {number} is not a message object ({reason}); give one JSON object per line, e.g. {{\"payload\": \"21.5\"}}"
    )]
    NotAMessage { number: usize, reason: String },
    #[error("line {number}: payload_base64 is not base64 ({reason})")]
    NotBase64 { number: usize, reason: String },
    #[error("line {number}: give exactly one of payload and payload_base64")]
    PayloadChoice { number: usize },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    payload: Option<String>,
    payload_base64: Option<String>,
    content_type: Option<String>,
    time_ms: Option<u64>,
    // What `read --json` adds: accepted and ignored, so its output can be written
    // back. A misspelt field is still refused.
    #[serde(default, rename = "topic")]
    _topic: Option<IgnoredAny>,
    #[serde(default, rename = "time")]
    _time: Option<IgnoredAny>,
    #[serde(default, rename = "address")]
    _address: Option<IgnoredAny>,
    #[serde(default, rename = "key")]
    _key: Option<IgnoredAny>,
    #[serde(default, rename = "seq")]
    _seq: Option<IgnoredAny>,
    #[serde(default, rename = "index")]
    _index: Option<IgnoredAny>,
    #[serde(default, rename = "gateway")]
    _gateway: Option<IgnoredAny>,
    /// `read --json` ends with a line holding only its cursor.
    cursor: Option<IgnoredAny>,
}

/// Line `number` (from 1) as a message for `topic`; `None` for the cursor line
/// `read --json` ends with. Its `time_ms` and `content_type`, when present,
/// override what `defaults` carries.
pub fn parse(
    topic: &str,
    number: usize,
    line: &str,
    defaults: &Defaults,
) -> Result<Option<Message>, LineError> {
    let parsed: Line = serde_json::from_str(line).map_err(|e| LineError::NotAMessage {
        number,
        reason: e.to_string(),
    })?;
    let payload = match (parsed.payload, parsed.payload_base64) {
        (None, None) if parsed.cursor.is_some() => return Ok(None),
        (Some(text), None) => text.into_bytes(),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| LineError::NotBase64 {
                number,
                reason: e.to_string(),
            })?,
        _ => return Err(LineError::PayloadChoice { number }),
    };
    let mut message = Message::new(topic, payload);
    if let Some(ms) = parsed.time_ms.or(defaults.timestamp_ms) {
        message = message.with_timestamp_ms(ms);
    }
    if let Some(content_type) = parsed
        .content_type
        .or_else(|| defaults.content_type.clone())
    {
        message = message.with_content_type(content_type);
    }
    Ok(Some(message))
}

/// What a line leaves out.
#[derive(Debug, Default, Clone)]
pub struct Defaults {
    pub timestamp_ms: Option<u64>,
    pub content_type: Option<String>,
}

/// `message` as a line: the payload as text when it is UTF-8, else base64.
pub fn encode(message: &Message) -> String {
    let mut line = json!({"time_ms": message.timestamp_ms});
    match std::str::from_utf8(&message.payload) {
        Ok(text) => line["payload"] = json!(text),
        Err(_) => {
            line["payload_base64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&message.payload))
        }
    }
    if let Some(ct) = &message.content_type {
        line["content_type"] = json!(ct);
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(payload: &[u8]) -> Vec<u8> {
        let message = Message::new("t", payload.to_vec())
            .with_timestamp_ms(7)
            .with_content_type("application/octet-stream");
        let back = parse("t", 1, &encode(&message), &Defaults::default())
            .unwrap()
            .unwrap();
        assert_eq!(back.timestamp_ms, 7);
        assert_eq!(
            back.content_type.as_deref(),
            Some("application/octet-stream")
        );
        back.payload
    }

    #[test]
    fn every_payload_survives_a_line() {
        for payload in [
            &b""[..],
            b"21.5",
            b"line one\nline two\r\n",
            b"\x00\x01\xff\xfe",
            "caf\u{e9} \u{1b}[31m".as_bytes(),
        ] {
            assert_eq!(roundtrip(payload), payload);
        }
    }

    #[test]
    fn what_read_json_prints_is_accepted() {
        let line = r#"{"topic":"t","time_ms":5,"time":"1970-01-01T00:00:00.005Z","address":"a","key":"k","seq":0,"index":0,"gateway":"roof-a","payload":"x"}"#;
        let m = parse("other", 3, line, &Defaults::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.topic.as_str(), m.payload.as_slice(), m.timestamp_ms),
            ("other", &b"x"[..], 5)
        );
    }

    #[test]
    fn the_cursor_line_read_json_ends_with_is_skipped() {
        let d = Defaults::default();
        assert!(parse("t", 9, r#"{"cursor":"abc"}"#, &d).unwrap().is_none());
    }

    #[test]
    fn defaults_fill_what_a_line_leaves_out() {
        let defaults = Defaults {
            timestamp_ms: Some(9),
            content_type: Some("text/plain".into()),
        };
        let m = parse("t", 1, r#"{"payload":"x"}"#, &defaults)
            .unwrap()
            .unwrap();
        assert_eq!(
            (m.timestamp_ms, m.content_type.as_deref()),
            (9, Some("text/plain"))
        );
        let m = parse(
            "t",
            1,
            r#"{"payload":"x","time_ms":3,"content_type":"a/b"}"#,
            &defaults,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (m.timestamp_ms, m.content_type.as_deref()),
            (3, Some("a/b"))
        );
    }

    #[test]
    fn bad_lines_say_which_and_why() {
        let d = Defaults::default();
        assert!(matches!(
            parse("t", 4, "21.5", &d),
            Err(LineError::NotAMessage { number: 4, .. })
        ));
        assert!(matches!(
            parse("t", 2, r#"{"paylod":"x"}"#, &d),
            Err(LineError::NotAMessage { number: 2, .. })
        ));
        assert!(matches!(
            parse("t", 1, r#"{"payload_base64":"%%"}"#, &d),
            Err(LineError::NotBase64 { .. })
        ));
        assert!(matches!(
            parse("t", 1, r#"{"payload":"a","payload_base64":"AA=="}"#, &d),
            Err(LineError::PayloadChoice { .. })
        ));
        assert!(matches!(
            parse("t", 1, r#"{}"#, &d),
            Err(LineError::PayloadChoice { .. })
        ));
    }
}
