//! The `multifeed` client commands against a hostile server (issue 11): a frame
//! announcing a 2^40-entry bitfield, a frame past the size limit, and a server
//! that holds the group's key (a compromised member) flooding channels, sending a
//! manifest past the limit, or offering feeds that never deliver. The client
//! never aborts or hangs: one-shot `sync` ends with exit 1 naming the peer's
//! fault, `sync --live` and `read --follow --peer` report the fault, keep trying
//! and stop cleanly on SIGTERM; the store verifies afterwards and holds nothing
//! of the server's.

mod cli_common;
mod common;

use std::{collections::HashMap, net::SocketAddr};

use cli_common::*;
use common::rogue::{self, raw_noise};
use futures::{SinkExt, StreamExt};

/// A Bitfield message (type 7) on channel 1 announcing 2^40 entries.
const BITFIELD_2_POW_40: [u8; 12] = [1, 7, 0, 0xff, 0, 0, 0, 0, 0, 1, 0, 0];

#[derive(Clone, Copy, Debug)]
enum Hostility {
    HugeBitfield,
    /// One Noise message bigger than any frame the client accepts.
    BigFrame,
    /// A member that opens channels for 300 feeds nobody offered.
    ChannelFlood,
    /// A member whose manifest lists more feeds than a peer may offer (100,000,
    /// `ReplicateOptions::max_offered_feeds`) in one message of 3.8 MB.
    OversizedManifest,
    /// A member offering 2,000 feeds that never deliver: it answers each
    /// channel the client opens for them, and closes it at once.
    JunkManifest,
}

impl Hostility {
    fn needs_key(self) -> bool {
        !matches!(self, Hostility::HugeBitfield | Hostility::BigFrame)
    }
}

/// A server on 127.0.0.1 that completes Noise with every client and then does
/// `hostility`, keeping the connection open; `key` is the group's, for the
/// hostile members. Runs on its own runtime.
fn hostile_server(
    hostility: Hostility,
    key: [u8; 32],
) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let mut held = Vec::new();
            // Ends when the test process exits.
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                if hostility.needs_key() {
                    tokio::spawn(hostile_member(socket, key, hostility));
                    continue;
                }
                let mut cipher = raw_noise(socket, false).await;
                let frame = match hostility {
                    Hostility::HugeBitfield => BITFIELD_2_POW_40.to_vec(),
                    _ => vec![0x01; 6 * 1024 * 1024],
                };
                let _ = cipher.send(frame).await;
                held.push(cipher);
            }
        });
    });
    (addr, thread)
}

/// One connection of a hostile member, answering as the server.
async fn hostile_member(socket: tokio::net::TcpStream, key: [u8; 32], hostility: Hostility) {
    use hypercore_protocol::{Event, Message, discovery_key, schema::Extension};
    let mut protocol = rogue::member_protocol_as(socket, key, false).await;
    let mut junk = HashMap::new();
    let manifest = match hostility {
        Hostility::OversizedManifest => Some(rogue::junk_manifest(100_001, 1)),
        Hostility::JunkManifest => {
            let (manifest, keys) = rogue::junk_manifest_with_keys(2_000, 1);
            junk = keys.into_iter().map(|k| (discovery_key(&k), k)).collect();
            Some(manifest)
        }
        _ => None,
    };
    // Channels are kept: hypercore-protocol ends the connection when a message
    // arrives for a channel whose handle was dropped.
    let mut channels = Vec::new();
    while let Some(event) = protocol.next().await {
        // A message the client sent on a channel closed here is an error of
        // this side's protocol, not the connection's end.
        let event = match event {
            Ok(event) => event,
            Err(_) => continue,
        };
        match event {
            Event::Channel(channel) if channel.key() == &key => {
                let mut messages = vec![rogue::wire::handshake()];
                messages.extend(manifest.clone());
                messages.push(rogue::wire::empty_request());
                for message in messages {
                    let extension = Extension {
                        name: "multifeed/exchange".to_string(),
                        message,
                    };
                    if channel.send(Message::Extension(extension)).await.is_err() {
                        break;
                    }
                }
                channels.push(channel);
                if let Hostility::ChannelFlood = hostility {
                    for _ in 0..300 {
                        if protocol.open(rand::random()).await.is_err() {
                            break;
                        }
                    }
                }
            }
            Event::DiscoveryKey(dk) => {
                if let Some(feed) = junk.get(&dk) {
                    let _ = protocol.open(*feed).await;
                }
            }
            // A junk feed's channel: it never delivers.
            Event::Channel(channel) => {
                let _ = channel.close().await;
                channels.push(channel);
            }
            _ => {}
        }
    }
    std::future::pending::<()>().await;
}

/// The group's shared key, from the key file beside `gw`'s directory.
fn group_key(gw: &Gw) -> [u8; 32] {
    let mut file = gw.dir.as_os_str().to_os_string();
    file.push(".key");
    let hex = std::fs::read_to_string(file).unwrap();
    hex::decode(hex.trim()).unwrap().try_into().unwrap()
}

#[test]
fn client_commands_survive_a_hostile_server_and_blame_it() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let gw = &gws[0];
    gw.ok(&["write", "t", "kept"]);
    let feeds_before = gw.ok(&["feeds"]);
    for hostility in [
        Hostility::HugeBitfield,
        Hostility::BigFrame,
        Hostility::ChannelFlood,
        Hostility::OversizedManifest,
        Hostility::JunkManifest,
    ] {
        let (addr, _server) = hostile_server(hostility, group_key(gw));
        let addr = addr.to_string();

        let started = std::time::Instant::now();
        let out = gw.run(&["--json", "sync", &addr]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{hostility:?}: {stderr}");
        let error: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
        eprintln!(
            "{hostility:?}: sync ended in {:.2?}: {error}",
            started.elapsed()
        );
        let kind = error["error"]["kind"].as_str().unwrap_or_default();
        let message = error["error"]["message"].as_str().unwrap();
        match hostility {
            Hostility::JunkManifest => assert_eq!(kind, "too_many_unproven_feeds", "{error}"),
            _ => {
                assert_eq!(kind, "peer_fault", "{hostility:?}: {error}");
                assert!(
                    message.contains("the peer broke the protocol"),
                    "{hostility:?}: {message}"
                );
            }
        }
        assert!(
            message.contains(&addr) && message.contains("the local store is intact"),
            "{hostility:?}: {message}"
        );

        for args in [
            vec!["sync", "--live", addr.as_str()],
            vec!["read", "t", "--follow", "--peer", addr.as_str()],
        ] {
            let mut client = Running::spawn(gw.cmd(&args));
            let line = client.stderr_line("peer");
            assert!(
                line.contains(&addr)
                    && line.contains("peer fault")
                    && line.contains("reconnecting"),
                "{hostility:?} {args:?}: {line}"
            );
            client.signal("TERM");
            let (status, _, stderr) = client.finish();
            assert_ne!(status.code(), Some(134), "{hostility:?} {args:?} aborted");
            assert!(
                status.code() == Some(0) || status.code() == Some(143),
                "{hostility:?} {args:?}: {status}: {stderr}"
            );
        }
        gw.verify();
        assert_eq!(gw.read("t", None).0, vec!["kept".to_string()]);
        assert_eq!(
            gw.ok(&["feeds"]),
            feeds_before,
            "{hostility:?}: a feed of the server's was kept"
        );
    }
}
