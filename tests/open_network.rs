//! A server open to anyone (issue 11): strangers wait for their handshake in slots of
//! their own and never hold a member's place; a full server tells a member so, as a
//! typed `ServerBusy` that a dialer retries; a stranger learns nothing of it.
//!
//! The server here accepts as `serve` does (unauthenticated slots per address and in
//! total, peer slots taken on authentication), over TCP on 127.0.0.1.

mod common;

use std::{net::IpAddr, time::Duration};

use common::*;
use multifeed::{
    BackoffPolicy, DialEvent, DialOptions, Error, Multifeed, Options, PreAuth, ReplicateOptions,
    ReplicationEvent, ReplicationSummary, SharedKey, StorageConfig,
    replicate::preauth::{ConnectionSlots, PeerSlots, PreAuthLimits, SlotLimits},
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

const WAIT: Duration = Duration::from_secs(30);

/// A server that accepts as `serve` does; each session's result is reported.
struct OpenServer {
    addr: std::net::SocketAddr,
    slots: ConnectionSlots,
    peers: PeerSlots,
    results: mpsc::UnboundedReceiver<multifeed::Result<ReplicationSummary>>,
    task: JoinHandle<()>,
}

impl OpenServer {
    async fn start(group: Multifeed, max_peers: usize, limits: PreAuthLimits) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slots = ConnectionSlots::new(SlotLimits::default());
        let peers = PeerSlots::new(max_peers);
        let (tx, results) = mpsc::unbounded_channel();
        let task = tokio::spawn({
            let (slots, peers) = (slots.clone(), peers.clone());
            async move {
                loop {
                    let (socket, from) = listener.accept().await.unwrap();
                    let Ok(slot) = slots.try_admit(from.ip()) else {
                        continue;
                    };
                    let pre_auth = PreAuth::with_peer_slots(limits, peers.clone()).with_slot(slot);
                    let (group, tx) = (group.clone(), tx.clone());
                    tokio::spawn(async move {
                        let options = ReplicateOptions::new(false).live(true).pre_auth(pre_auth);
                        let _ = tx.send(group.replicate(socket, options).await);
                    });
                }
            }
        });
        Self {
            addr,
            slots,
            peers,
            results,
            task,
        }
    }

    async fn next_result(&mut self) -> multifeed::Result<ReplicationSummary> {
        tokio::time::timeout(WAIT, self.results.recv())
            .await
            .expect("the server's session did not end")
            .expect("server gone")
    }
}

/// A TCP connection to `to` from the loopback address `from` (all of 127/8 is local
/// on Linux), so tests can play several hosts.
async fn connect_from(from: IpAddr, to: std::net::SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    socket.connect(to).await.unwrap()
}

async fn group_with(name: &str, blocks: &[&[u8]]) -> Multifeed {
    let group = open_memory().await;
    group
        .writer(name)
        .await
        .unwrap()
        .append_batch(blocks)
        .await
        .unwrap();
    group
}

fn short_deadline() -> PreAuthLimits {
    PreAuthLimits {
        deadline: Duration::from_secs(1),
        ..PreAuthLimits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_tells_a_member_it_is_busy_and_a_dialer_retries_until_it_gets_in() {
    let server_group = group_with("server", &[b"s0", b"s1"]).await;
    let mut server = OpenServer::start(server_group.clone(), 1, short_deadline()).await;

    // Member A holds the only peer slot.
    let a = group_with("a", &[b"a0"]).await;
    let mut held = a.start_replication(
        TcpStream::connect(server.addr).await.unwrap(),
        ReplicateOptions::new(true).live(true),
    );
    loop {
        let event = tokio::time::timeout(WAIT, held.next_event()).await.unwrap();
        if let Some(ReplicationEvent::RemoteFeeds { .. }) = event {
            break;
        }
    }
    assert_eq!(server.peers.in_use(), 1);

    // Member B is told, and gets nothing.
    let b = group_with("b", &[b"b0"]).await;
    let result = b
        .replicate(
            TcpStream::connect(server.addr).await.unwrap(),
            ReplicateOptions::new(true),
        )
        .await;
    assert!(
        matches!(result, Err(Error::ServerBusy { max_peers: 1 })),
        "{result:?}"
    );
    assert!(
        !multifeed::replicate::is_fatal(&result.unwrap_err()),
        "busy is retried"
    );
    assert_eq!(b.feeds().len(), 1, "nothing learnt from a full server");
    assert!(matches!(
        server.next_result().await,
        Err(Error::ServerBusy { max_peers: 1 })
    ));

    // A stranger (another group's key) is never told: its answer is the same as
    // from a server with room, and it never took a peer slot.
    let stranger = Multifeed::open(
        StorageConfig::Memory,
        SharedKey::from_bytes([0x77; 32]),
        Options::default(),
    )
    .await
    .unwrap();
    let result = stranger
        .replicate(
            TcpStream::connect(server.addr).await.unwrap(),
            ReplicateOptions::new(true).handshake_timeout(Duration::from_secs(5)),
        )
        .await;
    assert!(
        !matches!(result, Err(Error::ServerBusy { .. })),
        "{result:?}"
    );
    let server_side = server.next_result().await;
    assert!(
        !matches!(server_side, Err(Error::ServerBusy { .. })),
        "{server_side:?}"
    );
    assert_eq!(stranger.feeds().len(), 0);
    assert_eq!(server.peers.in_use(), 1);

    // B's dialer is turned away, backs off and retries; once A leaves it gets in.
    let mut dialer = b.dial(
        server.addr.to_string(),
        DialOptions::default()
            .backoff(
                BackoffPolicy::default()
                    .initial(Duration::from_millis(20))
                    .max(Duration::from_millis(200)),
            )
            .jitter_seed(7),
    );
    let mut turned_away = 0;
    while turned_away < 2 {
        match tokio::time::timeout(WAIT, dialer.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            DialEvent::SessionEnded {
                result: Err(error),
                retry_in,
                ..
            } => {
                assert!(
                    matches!(*error, Error::ServerBusy { max_peers: 1 }),
                    "{error}"
                );
                assert!(retry_in.is_some(), "busy is not fatal");
                turned_away += 1;
            }
            DialEvent::GaveUp { error } => panic!("the dialer gave up: {error}"),
            _ => {}
        }
    }
    held.stop();
    held.finish().await.unwrap();
    let server_key = server_group.feeds()[0].key();
    wait_for_len(&b, server_key, 2).await;
    dialer.stop();
    dialer.finish().await.unwrap();
    assert_eq!(server.slots.in_use(), 0);
    server.task.abort();
}

/// 256 connections that never say a word (from another host) cannot keep a member
/// out: they get at most their address's unauthenticated slots, hold no peer slot,
/// and are cut off at the deadline; meanwhile a member syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_strangers_cannot_lock_out_a_member() {
    let server_group = group_with("server", &[b"s0", b"s1"]).await;
    let mut server = OpenServer::start(server_group.clone(), 4, short_deadline()).await;
    let attacker: IpAddr = [127, 0, 0, 2].into();
    let mut silent = Vec::new();
    for _ in 0..256 {
        silent.push(connect_from(attacker, server.addr).await);
    }
    let member = group_with("member", &[b"m0"]).await;
    let socket = connect_from([127, 0, 0, 1].into(), server.addr).await;
    let summary = tokio::time::timeout(WAIT, member.replicate(socket, ReplicateOptions::new(true)))
        .await
        .expect("the member's sync timed out")
        .expect("a member syncs while strangers wait");
    assert_eq!(summary.blocks_received, 2);
    // Only the attacker's 8 connections got a slot; each ends as a handshake timeout.
    let mut timeouts = 0;
    let mut member_done = false;
    while timeouts < SlotLimits::default().max_per_address || !member_done {
        match server.next_result().await {
            Err(Error::HandshakeTimeout { after }) => {
                assert_eq!(after, short_deadline().deadline);
                timeouts += 1;
            }
            Ok(_) => member_done = true,
            other => panic!("unexpected end: {other:?}"),
        }
    }
    assert_eq!(timeouts, SlotLimits::default().max_per_address);
    let refused = server.slots.refusals_due();
    assert_eq!(server.slots.in_use(), 0);
    assert_eq!(server.peers.in_use(), 0);
    drop((silent, refused));
    server.task.abort();
}
