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

/// Resolves on Ctrl-C or SIGTERM, saying which. The handlers are installed when
/// this is called, not when the future is first polled: a signal that comes
/// between the call and the first poll (say, right after a command printed that it
/// is up) is caught too, instead of killing the process uncleanly.
pub fn shutdown_signal() -> impl std::future::Future<Output = Signal> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).ok();
    let mut terminate = signal(SignalKind::terminate()).ok();
    async move {
        let interrupted = async {
            match interrupt.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let terminated = async {
            match terminate.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = interrupted => Signal::Interrupt,
            _ = terminated => Signal::Terminate,
        }
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
