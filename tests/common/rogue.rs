//! An independent rogue peer for the hostile tests: its own Noise over TCP, no
//! `Protocol`, no checks, so it can send what a correct peer never would.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt, future};
use hypercore_handshake::{Cipher, HandshakePattern, state_machine::hc_specific::generate_keypair};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const WAIT: Duration = Duration::from_secs(30);

/// The framed socket under the rogue's cipher. An ended or failed connection just goes
/// quiet: hypercore_handshake's cipher panics on an inbound error.
pub struct QuietIo(Framed<TcpStream, LengthDelimitedCodec>);

impl futures::Stream for QuietIo {
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
