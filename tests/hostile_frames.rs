//! Frames that once aborted the process (issue 11): hypercore-protocol 0.7.2 decodes a
//! frame before any channel or capability check, and compact-encoding 2.2.0 reserves a
//! vector by the count the peer declares. A host that completes the Noise handshake (no
//! shared key needed) sent one 12-byte frame, a Bitfield of 2^40 words, and the process
//! died with "memory allocation of 4398046511104 bytes failed".
//!
//! Here a rogue speaks its own Noise over TCP on 127.0.0.1 and sends such frames to a
//! server (and, as a server, to a client); the node must survive with a typed peer
//! fault, and a legitimate peer must still sync with it afterwards.

mod common;

use std::time::Duration;

use common::{rogue::raw_noise, *};
use futures::SinkExt;
use multifeed::{Error, Multifeed, ReplicateOptions};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

const WAIT: Duration = Duration::from_secs(30);

/// The 12-byte frame: channel 1, Bitfield (type 7), start 0, then 2^40 words declared
/// as a u64 uint (`ff` + 8 bytes) with no word following.
const BITFIELD_2_POW_40: [u8; 12] = [1, 7, 0, 0xff, 0, 0, 0, 0, 0, 1, 0, 0];

/// Other hostile frames, one per vector the crate reserves by a declared count: a Data
/// block with 2^40 nodes; a Data upgrade whose additional nodes declare u64::MAX; a batch
/// whose second message declares 2^40 hash nodes.
fn more_hostile_frames() -> Vec<Vec<u8>> {
    let u64_uint = |n: u64| [&[0xff][..], &n.to_le_bytes()].concat();
    vec![
        // ch 1, Data, flags=block, request 0, fork 0, index 0, value len 0, nodes 2^40
        [&[1, 3, 1, 0, 0, 0, 0][..], &u64_uint(1 << 40)].concat(),
        // ch 1, Data, flags=upgrade, 0, 0, start 0, length 0, nodes 0, additional u64::MAX
        [&[1, 3, 8, 0, 0, 0, 0, 0][..], &u64_uint(u64::MAX)].concat(),
        // batch on ch 1: Cancel(5), then Data flags=hash, 0, 0, index 0, nodes 2^40
        [
            &[0, 0, 1, 2, 2, 5, 14, 3, 2, 0, 0, 0][..],
            &u64_uint(1 << 40),
        ]
        .concat(),
    ]
}

/// A server as `serve` runs one: every accepted connection replicates in its own task;
/// each session's result is reported.
struct Server {
    addr: String,
    results: mpsc::UnboundedReceiver<multifeed::Result<multifeed::ReplicationSummary>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(group: Multifeed) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, results) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let (socket, _) = listener.accept().await.unwrap();
                let (group, tx) = (group.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(group.replicate(socket, ReplicateOptions::new(false)).await);
                });
            }
        });
        Self {
            addr,
            results,
            task,
        }
    }

    async fn next_result(&mut self) -> multifeed::Result<multifeed::ReplicationSummary> {
        tokio::time::timeout(WAIT, self.results.recv())
            .await
            .expect("the server's session did not end")
            .expect("server gone")
    }
}

fn assert_frame_fault(result: multifeed::Result<multifeed::ReplicationSummary>, field: &str) {
    match result {
        Err(Error::PeerFault { reason }) => {
            assert!(
                reason.contains("invalid frame") && reason.contains(field),
                "{reason}"
            );
        }
        other => panic!("expected a peer fault naming {field}, got {other:?}"),
    }
}

/// A group holding one writer with a few blocks.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_client_cannot_abort_a_server_and_members_still_sync() {
    let server_group = group_with("server", &[b"s0", b"s1"]).await;
    let mut server = Server::start(server_group.clone()).await;

    let mut frames = vec![BITFIELD_2_POW_40.to_vec()];
    frames.extend(more_hostile_frames());
    let fields = [
        "Bitfield words",
        "Data block nodes",
        "Data upgrade additional nodes",
        "Data hash nodes",
    ];
    for (frame, field) in frames.into_iter().zip(fields) {
        // No shared key: the Noise handshake is all it takes.
        let socket = TcpStream::connect(&server.addr).await.unwrap();
        let mut rogue = raw_noise(socket, true).await;
        rogue.send(frame).await.unwrap();
        assert_frame_fault(server.next_result().await, field);
        drop(rogue);
    }

    // The server lives on: a member syncs both ways through it.
    let member = group_with("member", &[b"m0", b"m1", b"m2"]).await;
    let socket = TcpStream::connect(&server.addr).await.unwrap();
    let summary = tokio::time::timeout(WAIT, member.replicate(socket, ReplicateOptions::new(true)))
        .await
        .expect("sync timed out")
        .expect("a member syncs after the attacks");
    assert_eq!(summary.blocks_received, 2);
    server
        .next_result()
        .await
        .expect("the server's side of the sync");
    assert_eq!(contents(&member).await, contents(&server_group).await);
    server.task.abort();
}

/// The same frame from a hostile server to a client (`sync`, `sync --live`,
/// `read --follow --peer` connect this way), one-shot and live.
#[tokio::test]
async fn a_rogue_server_cannot_abort_a_client() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let rogue = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            let mut cipher = raw_noise(socket, false).await;
            cipher.send(BITFIELD_2_POW_40.to_vec()).await.unwrap();
            held.push(cipher); // the connection stays open: the client must end it
        }
    });
    let client = group_with("client", &[b"c0"]).await;
    for live in [false, true] {
        let socket = TcpStream::connect(addr).await.unwrap();
        let result = tokio::time::timeout(
            WAIT,
            client.replicate(socket, ReplicateOptions::new(true).live(live)),
        )
        .await
        .expect("the client's session did not end");
        assert_frame_fault(result, "Bitfield words");
    }
    rogue.abort();
    assert_eq!(
        contents(&client).await[0].1,
        vec![b"c0".to_vec()],
        "the client's store is intact"
    );
}
