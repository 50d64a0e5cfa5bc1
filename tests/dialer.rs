//! The dialer: reconnects after losses with its backoff, catches up, stops cleanly,
//! and gives up on refusals. Delays are checked on tokio's paused clock (in-memory
//! pipes); the restart of a server on disk runs over real TCP on 127.0.0.1.

mod common;

use std::{
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use multifeed::{
    BackoffPolicy, DialEvent, DialOptions, Dialer, Error, Multifeed, ReplicateOptions, Replication,
    SessionEnd, SharedKey, StorageConfig,
};
use tokio::{io::DuplexStream, time::Instant};

/// Long enough for anything on a busy host; on the paused clock it is virtual.
const WAIT: Duration = Duration::from_secs(60);

/// A responder reachable through in-memory pipes, which a test takes down (its
/// sessions die with it) and brings back.
#[derive(Clone)]
struct PipeServer {
    group: Multifeed,
    options: ReplicateOptions,
    state: Arc<Mutex<PipeState>>,
}

#[derive(Default)]
struct PipeState {
    down: bool,
    /// Connections that get a peer that never says anything.
    silent_next: usize,
    silent: Vec<DuplexStream>,
    sessions: Vec<Replication>,
}

impl PipeServer {
    fn new(group: Multifeed) -> Self {
        Self::with_options(group, ReplicateOptions::new(false).live(true))
    }

    fn with_options(group: Multifeed, options: ReplicateOptions) -> Self {
        Self {
            group,
            options,
            state: Arc::default(),
        }
    }

    fn connector(
        &self,
    ) -> impl FnMut() -> futures::future::Ready<
        io::Result<(DuplexStream, Option<std::net::SocketAddr>)>,
    > + Send
    + 'static {
        let server = self.clone();
        move || {
            let mut state = server.state.lock().unwrap();
            if state.down {
                return futures::future::ready(Err(io::ErrorKind::ConnectionRefused.into()));
            }
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            if state.silent_next > 0 {
                state.silent_next -= 1;
                state.silent.push(theirs);
            } else {
                let session = server
                    .group
                    .start_replication(theirs, server.options.clone());
                state.sessions.push(session);
            }
            futures::future::ready(Ok((ours, None)))
        }
    }

    /// The server dies: its sessions end abruptly, and it refuses connections.
    fn crash(&self) {
        let mut state = self.state.lock().unwrap();
        state.down = true;
        state.sessions.clear();
        state.silent.clear();
    }

    fn restart(&self) {
        self.state.lock().unwrap().down = false;
    }

    fn sessions(&self) -> usize {
        self.state.lock().unwrap().sessions.len()
    }
}

/// The next event that is not a session's own, within [`WAIT`].
async fn next(dialer: &mut Dialer) -> DialEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            match dialer.next_event().await {
                Some(DialEvent::Replication(_)) => continue,
                Some(event) => return event,
                None => panic!("the dialer ended"),
            }
        }
    })
    .await
    .expect("timed out waiting for a dialer event")
}

fn policy() -> BackoffPolicy {
    BackoffPolicy::default()
}

#[tokio::test(start_paused = true)]
async fn reconnects_after_a_loss_with_jittered_growing_delays_and_catches_up() {
    let server = PipeServer::new(open_memory().await);
    let writer = server.group.writer("sensor").await.unwrap();
    writer.append(b"0").await.unwrap();
    let client = open_memory().await;
    let mut dialer = client.dial_with(server.connector(), DialOptions::default().jitter_seed(9));

    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connecting { attempt: 1 }
    ));
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connected { .. }
    ));
    wait_for_len(&client, writer.key(), 1).await;

    // The server dies: the session ends with the loss and a first, short delay.
    server.crash();
    let DialEvent::SessionEnded {
        result: Err(error),
        retry_in: Some(mut delay),
        ..
    } = next(&mut dialer).await
    else {
        panic!("expected the session to end with an error and a retry");
    };
    assert!(matches!(*error, Error::ConnectionLost { .. }), "{error}");
    assert!(
        delay >= policy().initial && delay <= policy().initial * 3,
        "{delay:?}"
    );

    // Each failed attempt comes after exactly its delay; delays stay bounded.
    let mut delays = vec![delay];
    for attempt in 2..=9 {
        let waited_from = Instant::now();
        let DialEvent::Connecting { attempt: n } = next(&mut dialer).await else {
            panic!("expected an attempt");
        };
        assert_eq!(n, attempt);
        let waited = waited_from.elapsed();
        assert!(
            waited >= delay && waited <= delay + Duration::from_millis(2),
            "waited {waited:?} for a delay of {delay:?}"
        );
        let DialEvent::ConnectFailed { error, retry_in } = next(&mut dialer).await else {
            panic!("expected a refused connection");
        };
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        // The ceiling doubles with each failure in a row.
        let ceiling = (policy().initial * 2u32.pow(attempt as u32)).min(policy().max);
        assert!(
            retry_in >= policy().initial && retry_in <= ceiling,
            "{retry_in:?}"
        );
        delay = retry_in;
        delays.push(delay);
    }
    // Jittered, not a fixed ladder, and growing on the whole.
    assert!(delays.windows(2).any(|w| w[1] < w[0] * 2), "{delays:?}");
    assert!(
        delays[5..].iter().max().unwrap() > &(delays[0] * 4),
        "{delays:?}"
    );

    // Meanwhile the writer went on; the server comes back and the client catches up.
    for i in 1..6u8 {
        writer.append(&[b'0' + i]).await.unwrap();
    }
    server.restart();
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connecting { attempt: 10 }
    ));
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connected { .. }
    ));
    wait_for_len(&client, writer.key(), 6).await;

    // A stop ends the running session cleanly, without a retry.
    dialer.stop();
    let DialEvent::SessionEnded {
        result: Ok(summary),
        retry_in: None,
        ..
    } = next(&mut dialer).await
    else {
        panic!("expected a clean end");
    };
    assert_eq!(summary.ended, SessionEnd::LocalStop);
    let total = dialer.finish().await.unwrap();
    assert_eq!((total.attempts, total.sessions), (10, 2));
    // Counted from progress reports, of which a broken session may lose its last.
    assert!((5..=6).contains(&total.blocks_received), "{total:?}");
    assert_eq!(contents(&client).await, contents(&server.group).await);
}

#[tokio::test(start_paused = true)]
async fn a_live_session_between_stores_in_sync_stays_up_and_a_long_one_resets_the_backoff() {
    let server = PipeServer::new(open_memory().await);
    let writer = server.group.writer("sensor").await.unwrap();
    writer.append(b"0").await.unwrap();
    let client = open_memory().await;
    client
        .writer("own")
        .await
        .unwrap()
        .append(b"c")
        .await
        .unwrap();
    let mut dialer = client.dial_with(server.connector(), DialOptions::default().jitter_seed(3));
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connecting { .. }
    ));
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connected { .. }
    ));
    wait_for_len(&client, writer.key(), 1).await;

    // Ten idle minutes: keep-alives only, the session never ends.
    let quiet = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            match dialer.next_event().await {
                Some(DialEvent::Replication(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the idle session ended: {quiet:?}");
    // Data written after the quiet spell still arrives on the same session.
    writer.append(b"1").await.unwrap();
    wait_for_len(&client, writer.key(), 2).await;
    assert_eq!(server.sessions(), 1);

    // Fail a few times to grow the delay, reconnect, then run long: the next loss
    // starts the schedule over.
    server.crash();
    let mut last = Duration::ZERO;
    loop {
        match next(&mut dialer).await {
            DialEvent::SessionEnded {
                retry_in: Some(d), ..
            }
            | DialEvent::ConnectFailed { retry_in: d, .. } => last = d,
            DialEvent::Connecting { attempt } if attempt >= 8 => break,
            _ => {}
        }
    }
    assert!(last > policy().initial * 2, "{last:?}");
    server.restart();
    // The eighth attempt was already refused or connects; wait for a session.
    loop {
        if let DialEvent::Connected { .. } = next(&mut dialer).await {
            break;
        }
    }
    tokio::time::sleep(policy().reset_after * 2).await;
    server.crash();
    loop {
        if let DialEvent::SessionEnded {
            retry_in: Some(d), ..
        } = next(&mut dialer).await
        {
            assert!(d <= policy().initial * 2, "not reset: {d:?}");
            break;
        }
    }
    dialer.stop();
    dialer.finish().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_times_out_the_handshake_and_is_retried() {
    let server = PipeServer::new(open_memory().await);
    let writer = server.group.writer("sensor").await.unwrap();
    writer.append(b"0").await.unwrap();
    server.state.lock().unwrap().silent_next = 2;
    let client = open_memory().await;
    let options = DialOptions::default()
        .jitter_seed(5)
        .replicate(ReplicateOptions::new(true).handshake_timeout(Duration::from_secs(5)));
    let mut dialer = client.dial_with(server.connector(), options);
    for _ in 0..2 {
        assert!(matches!(
            next(&mut dialer).await,
            DialEvent::Connecting { .. }
        ));
        assert!(matches!(
            next(&mut dialer).await,
            DialEvent::Connected { .. }
        ));
        let DialEvent::SessionEnded {
            result: Err(error),
            retry_in: Some(_),
            lasted,
        } = next(&mut dialer).await
        else {
            panic!("expected a retry after the handshake timeout");
        };
        assert!(matches!(*error, Error::HandshakeTimeout { .. }), "{error}");
        let timeout = Duration::from_secs(5);
        assert!(
            lasted >= timeout && lasted <= timeout + Duration::from_millis(2),
            "{lasted:?}"
        );
    }
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connecting { attempt: 3 }
    ));
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connected { .. }
    ));
    wait_for_len(&client, writer.key(), 1).await;
    dialer.stop();
    dialer.finish().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_a_delay_ends_the_dialer_at_once() {
    let server = PipeServer::new(open_memory().await);
    server.crash();
    let client = open_memory().await;
    let minute = Duration::from_secs(60);
    let options =
        DialOptions::default().backoff(BackoffPolicy::default().initial(minute).max(minute));
    let mut dialer = client.dial_with(server.connector(), options);
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connecting { .. }
    ));
    let DialEvent::ConnectFailed { retry_in, .. } = next(&mut dialer).await else {
        panic!("expected a refused connection");
    };
    assert_eq!(retry_in, minute);
    let stopped_at = Instant::now();
    dialer.stop();
    let summary = dialer.finish().await.unwrap();
    assert_eq!(stopped_at.elapsed(), Duration::ZERO);
    assert_eq!((summary.attempts, summary.sessions), (1, 0));
}

/// Dials a server that refuses us for good; returns the error the dialer gave up
/// with, after checking it tried only once and reported it.
async fn gives_up_on(server: PipeServer) -> Error {
    let client = open_memory().await;
    client
        .writer("own")
        .await
        .unwrap()
        .append(b"x")
        .await
        .unwrap();
    let mut dialer = client.dial_with(server.connector(), DialOptions::default().jitter_seed(1));
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connecting { attempt: 1 }
    ));
    assert!(matches!(
        next(&mut dialer).await,
        DialEvent::Connected { .. }
    ));
    let DialEvent::SessionEnded {
        result: Err(reported),
        retry_in: None,
        ..
    } = next(&mut dialer).await
    else {
        panic!("expected the session to fail without a retry");
    };
    let DialEvent::GaveUp { error } = next(&mut dialer).await else {
        panic!("expected the dialer to give up");
    };
    assert!(Arc::ptr_eq(&reported, &error));
    let returned = dialer.finish().await.unwrap_err();
    assert_eq!(returned.to_string(), error.to_string());
    returned
}

#[tokio::test(start_paused = true)]
async fn refusals_stop_the_dialer_with_their_error() {
    let stranger = Multifeed::open(
        StorageConfig::Memory,
        SharedKey::from_bytes([0x77; 32]),
        multifeed::Options::default(),
    )
    .await
    .unwrap();
    stranger
        .writer("w")
        .await
        .unwrap()
        .append(b"s")
        .await
        .unwrap();
    let error = gives_up_on(PipeServer::new(stranger)).await;
    assert!(matches!(error, Error::SharedKeyMismatch), "{error}");

    let newer = PipeServer::with_options(
        open_memory().await,
        ReplicateOptions::new(false)
            .live(true)
            .protocol_version("2.0.0"),
    );
    let error = gives_up_on(newer).await;
    assert!(matches!(error, Error::VersionMismatch { .. }), "{error}");

    let other_client = PipeServer::with_options(
        open_memory().await,
        ReplicateOptions::new(false)
            .live(true)
            .client_name("another-client"),
    );
    let error = gives_up_on(other_client).await;
    assert!(matches!(error, Error::ClientMismatch { .. }), "{error}");
}

/// A server on disk behind a real TCP listener; dropping it (or [`TcpServer::kill`])
/// ends every session abruptly, as a killed process would.
struct TcpServer {
    group: Multifeed,
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TcpServer {
    async fn start(dir: &std::path::Path, addr: &str) -> Self {
        let group = open_dir(dir).await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = group.clone();
        let task = tokio::spawn(async move {
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let session =
                    serving.start_replication(socket, ReplicateOptions::new(false).live(true));
                sessions.spawn(session.finish());
            }
        });
        Self { group, addr, task }
    }

    async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
        self.group.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_over_tcp_to_a_server_restarted_from_disk() {
    let server_dir = tempfile::tempdir().unwrap();
    let client_dir = tempfile::tempdir().unwrap();
    let client = open_dir(client_dir.path()).await;
    let mut server = TcpServer::start(server_dir.path(), "127.0.0.1:0").await;
    let addr = server.addr;
    let key = server.group.writer("sensor").await.unwrap().key();
    let options = DialOptions::default().jitter_seed(2).backoff(
        BackoffPolicy::default()
            .initial(Duration::from_millis(10))
            .max(Duration::from_millis(200)),
    );
    let mut dialer = client.dial(addr.to_string(), options);
    for round in 1..=5u64 {
        let writer = server.group.writer("sensor").await.unwrap();
        writer.append(format!("{round}").as_bytes()).await.unwrap();
        loop {
            if let DialEvent::Connected { peer } = next(&mut dialer).await {
                assert_eq!(peer, Some(addr));
                break;
            }
        }
        wait_for_len(&client, key, round).await;
        // Kill the server; the client notices, and its next attempt is refused.
        server.kill().await;
        loop {
            match next(&mut dialer).await {
                DialEvent::SessionEnded {
                    result, retry_in, ..
                } => {
                    assert!(retry_in.is_some(), "{result:?}");
                }
                DialEvent::ConnectFailed { error, .. } => {
                    assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
                    break;
                }
                _ => {}
            }
        }
        server = TcpServer::start(server_dir.path(), &addr.to_string()).await;
    }
    dialer.stop();
    let summary = dialer.finish().await.unwrap();
    // The sixth server may or may not have been reached before the stop.
    assert!((5..=6).contains(&summary.sessions), "{summary:?}");
    server.kill().await;
    let server = open_dir(server_dir.path()).await;
    assert_eq!(contents(&client).await, contents(&server).await);
}
