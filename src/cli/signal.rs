//! Ctrl-C and SIGTERM, and the exit status of a command they interrupted.

use std::fmt;

/// The signal that asked a command to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM.
    Terminate,
}

impl Signal {
    /// The shell's convention: 128 + the signal's number.
    pub fn exit_code(self) -> i32 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Interrupt => "Ctrl-C",
            Signal::Terminate => "SIGTERM",
        })
    }
}

/// Resolves on Ctrl-C or SIGTERM, saying which.
pub async fn shutdown_signal() -> Signal {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Signal::Interrupt,
        () = terminate => Signal::Terminate,
    }
}

/// A command stopped by a signal before it finished its job; `main` prints it
/// (without the `error:` prefix) and exits with the signal's status.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: Signal,
    /// What was done before the signal, and what to do next.
    pub report: String,
}

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "interrupted ({}): {}", self.signal, self.report)
    }
}

impl std::error::Error for Interrupted {}
