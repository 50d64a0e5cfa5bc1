//! Replication: the feed exchange over the Hypercore v10 wire protocol.
//!
//! - `transport`: framing, Noise, and the workarounds for hypercore-protocol's defects.
//! - `feed_sync`: IO-less state machine replicating one feed over one channel.
//! - `feed_task`: the async driver of `feed_sync` against a shared core.

#![allow(dead_code, unreachable_pub)]

pub(crate) mod feed_sync;
pub(crate) mod feed_task;
pub(crate) mod transport;
