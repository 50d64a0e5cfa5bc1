//! An independent rogue peer for the hostile tests: its own Noise over TCP, no
//! `Protocol`, no checks, so it can send what a correct peer never would.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt, future};
use hypercore_handshake::{Cipher, HandshakePattern, state_machine::hc_specific::generate_keypair};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const WAIT: Duration = Duration::from_secs(30);

/// The framed socket under the rogue's cipher. An ended or failed connection just goes
/// quiet: hypercore_handshake's cipher panics on an inbound error.
pub struct QuietIo(Framed<TcpStream, LengthDelimitedCodec>);

impl Stream for QuietIo {
    type Item = io::Result<Vec<u8>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame.to_vec()))),
            Poll::Ready(_) | Poll::Pending => Poll::Pending,
        }
    }
}

impl futures::Sink<Vec<u8>> for QuietIo {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        SinkExt::<Bytes>::poll_ready_unpin(&mut self.0, cx)
    }
    fn start_send(mut self: Pin<&mut Self>, item: Vec<u8>) -> io::Result<()> {
        self.0.start_send_unpin(Bytes::from(item))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        SinkExt::<Bytes>::poll_flush_unpin(&mut self.0, cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        SinkExt::<Bytes>::poll_close_unpin(&mut self.0, cx)
    }
}

/// A raw Noise XX endpoint over 3-byte little-endian framing: no `Protocol`, no checks.
pub async fn raw_noise(socket: TcpStream, initiator: bool) -> Cipher {
    let codec = LengthDelimitedCodec::builder()
        .little_endian()
        .length_field_length(3)
        .max_frame_length((1 << 24) - 1)
        .new_codec();
    let io = QuietIo(Framed::new(socket, codec));
    let io = Some(Box::new(io) as Box<dyn hypercore_handshake::CipherIo<Error = io::Error>>);
    let mut cipher = if initiator {
        Cipher::new_dht_init_with_pattern(io, HandshakePattern::XX, None, &[]).unwrap()
    } else {
        let keypair = generate_keypair().unwrap();
        Cipher::resp_from_private_with_pattern(io, &keypair, HandshakePattern::XX, &[]).unwrap()
    };
    tokio::time::timeout(
        WAIT,
        future::poll_fn(|cx| {
            // Events (handshake payloads) are dropped; poll until pending so a waker is set.
            while !cipher.ready() {
                match cipher.poll_next_unpin(cx) {
                    Poll::Ready(Some(_)) => {}
                    Poll::Ready(None) => panic!("rogue: connection ended in the handshake"),
                    Poll::Pending => return Poll::Pending,
                }
            }
            Poll::Ready(())
        }),
    )
    .await
    .expect("rogue: Noise handshake timed out");
    cipher
}

/// The rogue's Noise cipher for a `Protocol`, with the handshake completed before
/// `Protocol` sees it (an early `open` would go out without a capability) and the
/// frames that arrived during the handshake replayed afterwards.
pub struct MemberCipher {
    cipher: Cipher,
    queued: std::collections::VecDeque<Vec<u8>>,
}

impl MemberCipher {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        use hypercore_handshake::CipherEvent;
        loop {
            let polled = Pin::new(&mut self.cipher).poll_next(cx);
            let pending = polled.is_pending();
            match polled {
                Poll::Ready(Some(CipherEvent::Message(frame))) => self.queued.push_back(frame),
                Poll::Ready(Some(CipherEvent::HandshakePayload(_))) | Poll::Pending => {}
                Poll::Ready(Some(CipherEvent::ErrStuff(e))) => {
                    panic!("rogue: Noise handshake failed: {e}")
                }
                Poll::Ready(None) => panic!("rogue: the connection ended during the handshake"),
            }
            if self.cipher.ready() {
                return Poll::Ready(());
            }
            if pending {
                return Poll::Pending;
            }
        }
    }
}

impl Stream for MemberCipher {
    type Item = hypercore_handshake::CipherEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(frame) = self.queued.pop_front() {
            return Poll::Ready(Some(hypercore_handshake::CipherEvent::Message(frame)));
        }
        Pin::new(&mut self.cipher).poll_next(cx)
    }
}

impl futures::Sink<Vec<u8>> for MemberCipher {
    type Error = io::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.cipher).poll_ready(cx)
    }
    fn start_send(mut self: Pin<&mut Self>, item: Vec<u8>) -> io::Result<()> {
        Pin::new(&mut self.cipher).start_send(item)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.cipher).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.cipher).poll_close(cx)
    }
}

impl hypercore_handshake::CipherTrait for MemberCipher {
    fn remote_public_key(&self) -> Option<[u8; hypercore_handshake::state_machine::PUBLIC_KEYLEN]> {
        hypercore_handshake::CipherTrait::remote_public_key(&self.cipher)
    }
    fn local_public_key(&self) -> [u8; hypercore_handshake::state_machine::PUBLIC_KEYLEN] {
        hypercore_handshake::CipherTrait::local_public_key(&self.cipher)
    }
    fn handshake_hash(&self) -> Option<Vec<u8>> {
        hypercore_handshake::CipherTrait::handshake_hash(&self.cipher)
    }
    fn is_initiator(&self) -> bool {
        hypercore_handshake::CipherTrait::is_initiator(&self.cipher)
    }
}

/// A hostile member: it holds the key, so it authenticates (its `Open` for the
/// group carries a valid capability), and then does what it likes through the
/// returned `Protocol`. Connects as the initiator.
pub async fn member_protocol(
    socket: TcpStream,
    shared_key: [u8; 32],
) -> hypercore_protocol::Protocol {
    member_protocol_as(socket, shared_key, true).await
}

/// [`member_protocol`] on either side of the Noise handshake: a hostile server
/// answers as the responder.
pub async fn member_protocol_as(
    socket: TcpStream,
    shared_key: [u8; 32],
    initiator: bool,
) -> hypercore_protocol::Protocol {
    let codec = LengthDelimitedCodec::builder()
        .little_endian()
        .length_field_length(3)
        .max_frame_length((1 << 24) - 1)
        .new_codec();
    let io = QuietIo(Framed::new(socket, codec));
    let io = Some(Box::new(io) as Box<dyn hypercore_handshake::CipherIo<Error = io::Error>>);
    let cipher = if initiator {
        Cipher::new_dht_init_with_pattern(io, HandshakePattern::XX, None, &[]).unwrap()
    } else {
        let keypair = generate_keypair().unwrap();
        Cipher::resp_from_private_with_pattern(io, &keypair, HandshakePattern::XX, &[]).unwrap()
    };
    let mut cipher = MemberCipher {
        cipher,
        queued: Default::default(),
    };
    tokio::time::timeout(WAIT, future::poll_fn(|cx| cipher.poll_handshake(cx)))
        .await
        .expect("rogue: Noise handshake timed out");
    let protocol = hypercore_protocol::Protocol::new(Box::new(cipher));
    protocol
        .open(shared_key)
        .await
        .expect("rogue: open command");
    protocol
}

/// The feed-exchange messages a rogue sends, written from `proto/multifeed.proto`
/// by hand (only what the rogue needs).
pub mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Handshake {
        #[prost(string, tag = "1")]
        pub client: String,
        #[prost(string, tag = "2")]
        pub protocol_version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FeedInfo {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(uint64, optional, tag = "2")]
        pub length: Option<u64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Manifest {
        #[prost(message, repeated, tag = "1")]
        pub feeds: Vec<FeedInfo>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Request {
        #[prost(bytes = "vec", repeated, tag = "1")]
        pub keys: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ExchangeMessage {
        #[prost(oneof = "Body", tags = "1, 2, 3")]
        pub body: Option<Body>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Body {
        #[prost(message, tag = "1")]
        Handshake(Handshake),
        #[prost(message, tag = "2")]
        Manifest(Manifest),
        #[prost(message, tag = "3")]
        Request(Request),
    }

    /// This implementation's handshake, encoded.
    pub fn handshake() -> Vec<u8> {
        use prost::Message as _;
        ExchangeMessage {
            body: Some(Body::Handshake(Handshake {
                client: multifeed::CLIENT_NAME.to_string(),
                protocol_version: multifeed::PROTOCOL_VERSION.to_string(),
            })),
        }
        .encode_to_vec()
    }

    /// A request for nothing, encoded.
    pub fn empty_request() -> Vec<u8> {
        use prost::Message as _;
        ExchangeMessage {
            body: Some(Body::Request(Request { keys: Vec::new() })),
        }
        .encode_to_vec()
    }
}

/// `count` fresh feed keys (real ed25519 public keys: the serve side refuses
/// anything else outright), each offered as holding `length` blocks.
pub fn junk_manifest(count: usize, length: u64) -> Vec<u8> {
    junk_manifest_with_keys(count, length).0
}

/// [`junk_manifest`] and its keys, for a rogue that answers channels of them.
pub fn junk_manifest_with_keys(count: usize, length: u64) -> (Vec<u8>, Vec<[u8; 32]>) {
    let keys: Vec<[u8; 32]> = (0..count)
        .map(|_| *multifeed::Keypair::generate().public_key().as_bytes())
        .collect();
    (manifest_of(&keys, length), keys)
}

/// A manifest offering `keys`, each as holding `length` blocks.
pub fn manifest_of(keys: &[[u8; 32]], length: u64) -> Vec<u8> {
    use prost::Message as _;
    let feeds = keys
        .iter()
        .map(|key| wire::FeedInfo {
            key: key.to_vec(),
            length: Some(length),
        })
        .collect();
    wire::ExchangeMessage {
        body: Some(wire::Body::Manifest(wire::Manifest { feeds })),
    }
    .encode_to_vec()
}

/// A hostile member that offers junk: after the handshake it sends each of
/// `manifests` (fresh keys that will never deliver anything), then keeps the
/// connection open, answering nothing, until dropped. Resolves once every
/// manifest was sent (or the connection ended).
pub async fn junk_offering_member(
    socket: TcpStream,
    shared_key: [u8; 32],
    manifests: Vec<Vec<u8>>,
) -> tokio::task::JoinHandle<()> {
    use hypercore_protocol::{Event, Message, schema::Extension};
    use prost::Message as _;
    let mut protocol = member_protocol(socket, shared_key).await;
    let (sent_tx, sent) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut sent_tx = Some(sent_tx);
        let mut root = None;
        while let Some(Ok(event)) = protocol.next().await {
            if let Event::Channel(channel) = event
                && channel.key() == &shared_key
                && root.is_none()
            {
                let handshake = wire::ExchangeMessage {
                    body: Some(wire::Body::Handshake(wire::Handshake {
                        client: multifeed::CLIENT_NAME.to_string(),
                        protocol_version: multifeed::PROTOCOL_VERSION.to_string(),
                    })),
                };
                let mut messages = vec![handshake.encode_to_vec()];
                messages.extend(manifests.iter().cloned());
                for message in messages {
                    let sent = channel
                        .send(Message::Extension(Extension {
                            name: "multifeed/exchange".to_string(),
                            message,
                        }))
                        .await;
                    if sent.is_err() {
                        break;
                    }
                }
                root = Some(channel);
                if let Some(tx) = sent_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
        drop(sent_tx);
        // Held open (quietly) until aborted.
        std::future::pending::<()>().await;
    });
    let _ = tokio::time::timeout(WAIT * 4, sent).await;
    task
}
