//! The `multifeed` client commands against a hostile server (issue 11): a frame
//! announcing a 2^40-entry bitfield, and a frame past the size limit. The client
//! never aborts: one-shot `sync` ends with exit 1 naming the peer's fault, `sync
//! --live` and `read --follow --peer` report the fault, keep trying and stop
//! cleanly on SIGTERM; the store verifies afterwards.

mod cli_common;
mod common;

use std::net::SocketAddr;

use cli_common::*;
use common::rogue::raw_noise;
use futures::SinkExt;

/// A Bitfield message (type 7) on channel 1 announcing 2^40 entries.
const BITFIELD_2_POW_40: [u8; 12] = [1, 7, 0, 0xff, 0, 0, 0, 0, 0, 1, 0, 0];

#[derive(Clone, Copy, Debug)]
enum Hostility {
    HugeBitfield,
    /// One Noise message bigger than any frame the client accepts.
    BigFrame,
}

/// A server on 127.0.0.1 that completes Noise with every client and then sends
/// the hostile frame, keeping the connection open. Runs on its own runtime.
fn hostile_server(hostility: Hostility) -> (SocketAddr, std::thread::JoinHandle<()>) {
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
                let mut cipher = raw_noise(socket, false).await;
                let frame = match hostility {
                    Hostility::HugeBitfield => BITFIELD_2_POW_40.to_vec(),
                    Hostility::BigFrame => vec![0x01; 6 * 1024 * 1024],
                };
                let _ = cipher.send(frame).await;
                held.push(cipher);
            }
        });
    });
    (addr, thread)
}

#[test]
fn client_commands_survive_a_hostile_server_and_blame_it() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let gw = &gws[0];
    gw.ok(&["write", "t", "kept"]);
    for hostility in [Hostility::HugeBitfield, Hostility::BigFrame] {
        let (addr, _server) = hostile_server(hostility);
        let addr = addr.to_string();

        let out = gw.run(&["--json", "sync", &addr]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{hostility:?}: {stderr}");
        let error: serde_json::Value = serde_json::from_str(stderr.trim()).unwrap();
        assert_eq!(
            error["error"]["kind"], "peer_fault",
            "{hostility:?}: {error}"
        );
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&addr)
                && message.contains("the peer broke the protocol")
                && message.contains("the local store is intact"),
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
    }
}
