//! The group's cap on feeds on trial cannot be filled by one hostile member: its
//! sessions together hold at most one session's worth (`PeerAdmissions`), so a
//! legitimate member still gets its feeds admitted.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use common::{rogue, *};
use multifeed::{
    AdmissionScope, Error, Multifeed, Options, ReplicateOptions, StorageConfig,
    replicate::preauth::PeerAdmissions,
};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The session cap (the default) and a group cap of two sessions' worth.
const SESSION_CAP: usize = 256;
const GROUP_CAP: usize = 2 * SESSION_CAP;
const HOSTILE_SESSIONS: usize = 3;

async fn connect_from(local: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(local.into(), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// A member connects three times at once from one address, each session offering
/// 300 fresh keys that never deliver. Without a cap per address, two such sessions
/// fill the group's 512 places and the legitimate member's new feed is refused
/// (its sync fails with the group's `TooManyUnprovenFeeds`). With it, the hostile
/// address holds at most 256, its sessions past that end as its fault, and the
/// legitimate member (another address) syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_member_cannot_fill_the_group_cap_across_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Multifeed::open(
        StorageConfig::dir(dir.path()),
        shared_key(),
        Options::default().max_unproven_feeds(GROUP_CAP),
    )
    .await
    .unwrap();
    let admissions = PeerAdmissions::new(SESSION_CAP);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    let accepting = {
        let server = server.clone();
        let admissions = admissions.clone();
        tokio::spawn(async move {
            loop {
                let (socket, peer) = listener.accept().await.unwrap();
                let options = ReplicateOptions::new(false)
                    .live(true)
                    .admission_account(admissions.account(peer.ip()));
                let replication = server.start_replication(socket, options);
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let _ = ended_tx.send((peer.ip(), replication.finish().await));
                });
            }
        })
    };

    let hostile_ip = Ipv4Addr::new(127, 0, 0, 1);
    let mut hostile = Vec::new();
    for _ in 0..HOSTILE_SESSIONS {
        let socket = connect_from(hostile_ip, addr).await;
        let manifests = vec![rogue::junk_manifest(300, 5)];
        hostile
            .push(rogue::junk_offering_member(socket, *shared_key().as_bytes(), manifests).await);
    }
    // A hostile session that wanted places past the address's share ends as its fault.
    let (ip, result) = tokio::time::timeout(WAIT_LONG, ended.recv())
        .await
        .expect("no hostile session was cut off at the cap per address")
        .unwrap();
    assert_eq!(ip, IpAddr::from(hostile_ip));
    assert!(
        matches!(
            result,
            Err(Error::TooManyUnprovenFeeds {
                limit: SESSION_CAP,
                scope: AdmissionScope::Peer
            })
        ),
        "{result:?}"
    );
    assert!(admissions.held(hostile_ip.into()) <= SESSION_CAP);
    assert!(server.admission_stats().unproven <= SESSION_CAP);

    // The legitimate member, from another address, gets its feed admitted.
    let member = open_memory().await;
    let writer = member.writer("legit").await.unwrap();
    writer.append(b"hello").await.unwrap();
    let socket = connect_from(Ipv4Addr::new(127, 0, 0, 2), addr).await;
    let summary = tokio::time::timeout(
        WAIT_LONG,
        member.replicate(socket, ReplicateOptions::new(true)),
    )
    .await
    .expect("the legitimate sync hung")
    .expect("the legitimate sync failed");
    assert_eq!(summary.blocks_sent, 1);
    assert_eq!(
        server.feed(writer.key()).unwrap().get(0).await.unwrap(),
        Some(b"hello".to_vec())
    );
    assert!(admissions.held(hostile_ip.into()) <= SESSION_CAP);

    // The hostile member leaves: every place its sessions held comes back, and the
    // feeds they had on trial leave no files.
    for task in hostile {
        task.abort();
    }
    let mut hostile_ended = 1;
    while hostile_ended < HOSTILE_SESSIONS {
        let (ip, _) = tokio::time::timeout(WAIT_LONG, ended.recv())
            .await
            .expect("a hostile session outlived its connection")
            .unwrap();
        hostile_ended += usize::from(ip == IpAddr::from(hostile_ip));
    }
    assert_eq!(admissions.held(hostile_ip.into()), 0);
    assert_eq!(server.admission_stats().unproven, 0);
    let feed_dirs = std::fs::read_dir(dir.path().join("feeds")).unwrap().count();
    assert_eq!(feed_dirs, 1, "only the legitimate member's feed is left");
    accepting.abort();
}

const WAIT_LONG: std::time::Duration = std::time::Duration::from_secs(30);
