//! Saying how sessions end and what a dialer does, as text on stderr or JSON
//! lines on stdout.

use std::time::Duration;

use multifeed::{DialEvent, Error, ReplicationSummary, SessionEnd};
use serde_json::json;

use super::output;

/// Prints a line on stdout. A long-running command must not die because whoever
/// read its output went away (println! panics on a broken pipe).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
pub(crate) use say;

/// Prints a line on stdout for a command whose output is its result (read,
/// feeds, topics, verify, ...). When the reader went away (`multifeed read t |
/// head -1`), the command stops there quietly with exit code 141, as a shell
/// reports a process ended by SIGPIPE, where println! would panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::report::print_result_line(format_args!($($arg)*))
    };
}
pub(crate) use out;

/// Exit code of a command whose output reader went away: 128 + SIGPIPE, what
/// a shell shows for `seq 1000000 | head -1` under `set -o pipefail`.
pub const BROKEN_PIPE_EXIT: i32 = 141;

/// See [`out!`].
pub fn print_result_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    match written {
        Ok(()) => {}
        // Nothing is pending: every change a command made is written before it prints.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(BROKEN_PIPE_EXIT)
        }
        Err(e) => {
            tell!("error: cannot write the output: {e}");
            std::process::exit(1)
        }
    }
}

/// Prints a line on stderr, never panicking.
macro_rules! tell {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
pub(crate) use tell;

/// Why a session ended: a stable code for JSON and words for people.
pub fn end_reason(result: Result<&ReplicationSummary, &Error>) -> (&'static str, String) {
    match result {
        Ok(summary) => match summary.ended {
            SessionEnd::Completed => ("completed", "completed".into()),
            SessionEnd::LocalStop => ("local_stop", "stopped here".into()),
            SessionEnd::PeerClosed => ("peer_closed", "the peer closed the session".into()),
            _ => ("ended", summary.ended.to_string()),
        },
        Err(Error::IdleTimeout { after }) => (
            "idle_timeout",
            format!("idle timeout: the peer went silent for {after:?}"),
        ),
        Err(Error::Stalled { after }) => (
            "stalled",
            format!("stalled: the peer stayed connected but sent nothing useful for {after:?}"),
        ),
        Err(Error::HandshakeTimeout { after }) => (
            "handshake_timeout",
            format!("no handshake from the peer within {after:?}"),
        ),
        Err(Error::ServerBusy { max_peers }) => (
            "server_busy",
            format!("the server is full (it serves {max_peers} peers at once)"),
        ),
        Err(Error::ConnectionLost { reason }) => {
            ("connection_lost", format!("connection lost: {reason}"))
        }
        Err(
            e @ (Error::SharedKeyMismatch
            | Error::VersionMismatch { .. }
            | Error::ClientMismatch { .. }),
        ) => ("refused", format!("refused: {e}")),
        Err(e) if e.is_peer_fault() => ("peer_fault", format!("peer fault: {e}")),
        Err(e) => ("local_error", format!("local error: {e}")),
    }
}

pub fn summary_json(peer: &str, s: &ReplicationSummary) -> serde_json::Value {
    json!({
        "peer": peer,
        "feeds_learnt": s.feeds_learnt,
        "feeds_synced": s.feeds_synced,
        "blocks_received": s.blocks_received,
        "bytes_received": s.bytes_received,
        "blocks_sent": s.blocks_sent,
        "bytes_sent": s.bytes_sent,
    })
}

pub fn summary_text(s: &ReplicationSummary) -> String {
    format!(
        "received {} blocks ({}), sent {} blocks ({}), learnt {} feeds, {} feeds in sync",
        s.blocks_received,
        output::bytes(s.bytes_received),
        s.blocks_sent,
        output::bytes(s.bytes_sent),
        s.feeds_learnt,
        s.feeds_synced
    )
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Reports a dialer's connection events (not its sessions' own events): text on
/// stderr, or JSON lines on stdout.
pub struct DialReport {
    pub peer: String,
    pub json: bool,
    sessions: u64,
}

impl DialReport {
    pub fn new(peer: &str, json: bool) -> Self {
        Self {
            peer: peer.to_owned(),
            json,
            sessions: 0,
        }
    }

    pub fn event(&mut self, event: &DialEvent) {
        let peer = self.peer.as_str();
        match event {
            DialEvent::Connecting { attempt } => {
                if self.json {
                    say!(
                        "{}",
                        json!({"event": "connecting", "peer": peer, "attempt": attempt})
                    );
                }
            }
            DialEvent::ConnectFailed { error, retry_in } => {
                if self.json {
                    say!(
                        "{}",
                        json!({"event": "connect_failed", "peer": peer, "error": error.to_string(),
                               "retry_in_ms": millis(*retry_in)})
                    );
                } else {
                    tell!(
                        "cannot reach {peer} ({error}); retrying in {}",
                        seconds(*retry_in)
                    );
                }
            }
            DialEvent::Connected { .. } => {
                self.sessions += 1;
                if self.json {
                    say!(
                        "{}",
                        json!({"event": "connected", "peer": peer, "session": self.sessions})
                    );
                } else if self.sessions == 1 {
                    tell!("connected to {peer}, replicating live (Ctrl-C to stop)");
                } else {
                    tell!("reconnected to {peer}");
                }
            }
            DialEvent::SessionEnded {
                result,
                lasted,
                retry_in,
            } => {
                let (code, words) = end_reason(result.as_ref().map_err(|e| &**e));
                if self.json {
                    let mut line = json!({"event": "disconnected", "peer": peer, "reason": code,
                                          "lasted_ms": millis(*lasted)});
                    if let Err(e) = result {
                        line["error"] = json!(e.to_string());
                    }
                    if let Some(retry_in) = retry_in {
                        line["retry_in_ms"] = json!(millis(*retry_in));
                    }
                    say!("{line}");
                } else if let Some(retry_in) = retry_in {
                    tell!(
                        "connection to {peer} lost ({words}); reconnecting in {}",
                        seconds(*retry_in)
                    );
                }
            }
            DialEvent::GaveUp { error } => {
                if self.json {
                    say!(
                        "{}",
                        json!({"event": "gave_up", "peer": peer, "error": error.to_string()})
                    );
                }
            }
            DialEvent::Replication(_) => {}
            other => tracing::debug!(?other, "dialer event"),
        }
    }
}
