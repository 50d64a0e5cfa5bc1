//! # multifeed
//!
//! A group of hypercores (append-only, signed, Merkle-verified logs) held under one
//! **shared key**. Every peer writes only its own feeds; replication merges
//! everyone's feeds, so the group behaves like a multi-writer log.
//!
//! ## Layout
//!
//! - [`Multifeed`] (`multifeed.rs`): the handle — named local writers, remote
//!   feeds, events, flush and close.
//! - [`Feed`] (`feed.rs`): one member hypercore: append, get, length.
//! - `index.rs`: the hidden, local-only index core that records members so a group
//!   reopens exactly as it was. Never listed, never replicated.
//! - `residency.rs`: loads feeds' hypercores on use and unloads the least recently
//!   used, so memory stays bounded however many feeds a group has.
//! - `storage.rs`: the plain-file storage backend and group-commit syncs
//!   ([`Durability`]).
//! - [`replicate`]: replication with one peer over any byte stream
//!   ([`Multifeed::start_replication`], [`Replication`]), and the [`Dialer`]
//!   ([`Multifeed::dial`]) that keeps a live session going across connection
//!   losses, reconnecting with capped, jittered exponential [`Backoff`].
//!   Inside it: an IO-less session core (`session_core.rs`) driven by a tokio
//!   task (`session.rs`), a deterministic simulator of that core (`sim.rs`),
//!   checks of every frame's declared sizes before the protocol crate decodes it
//!   (`frame_check.rs`), limits for peers not yet authenticated (`preauth.rs`),
//!   and bounded admission of offered feeds (`admission.rs`).
//! - `exchange.rs`: the feed exchange on the root channel — the semver
//!   handshake and the manifests of feeds each side holds (protobuf).
//! - `metadata.rs`: [`FeedMetadata`] — labels a feed carries in manifests (the
//!   gateway that writes it), bounded, kept beside a remote feed's files.
//! - [`keys`]: [`SharedKey`], [`FeedKey`], [`Keypair`].
//! - [`topics`]: [`Topics`] — timestamped messages published to topics by many
//!   writers, read merged with a resumable cursor, or followed live.
//! - [`verify`]: [`Multifeed::verify`] re-checks every stored block against
//!   its feed's signed Merkle tree.
//! - [`Error`] (`error.rs`): one typed error enum.
//! - `proto/multifeed.proto`: the wire schema of the feed exchange and the index
//!   record format (generated code stays private).
//!
//! The `multifeed` binary (`src/main.rs`, `src/cli/`, `src/node/`) is built with
//! the default `cli` feature: the commands, the gateway node with its HTTP API and
//! web page. A library user depends on `multifeed` with `default-features = false`
//! and builds none of that (no clap, axum, reqwest, …).
//!
//! ## Storage layout
//!
//! ```text
//! <dir>/index/            the hidden index core (tree, data, bitfield, oplog)
//! <dir>/feeds/<hex key>/  one directory per member feed
//! ```
//!
//! The shared key is never written to disk.
//!
//! ## Example (see also the README)
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), multifeed::Error> {
//! use multifeed::{Multifeed, Options, SharedKey, StorageConfig};
//!
//! let dir = tempfile::tempdir().unwrap();
//! let key = SharedKey::generate();
//! let group = Multifeed::open(StorageConfig::dir(dir.path()), key.clone(), Options::default()).await?;
//! let temperature = group.writer("temperature").await?;
//! temperature.append(b"21.5").await?;
//! group.close().await?;
//!
//! // Reopening recomposes the group: same writers, same keys, same data.
//! let group = Multifeed::open(StorageConfig::dir(dir.path()), key, Options::default()).await?;
//! let temperature = group.writer("temperature").await?;
//! assert_eq!(temperature.get(0).await?, Some(b"21.5".to_vec()));
//! # Ok(()) }
//! ```
// No unsafe code, but for the test-only allocator probe (`alloc_probe.rs`).
#![cfg_attr(not(test), forbid(unsafe_code))]
#![cfg_attr(test, deny(unsafe_code))]
#![deny(missing_docs)]

#[cfg(test)]
mod alloc_probe;
mod error;
mod exchange;
mod feed;
#[cfg(test)]
mod fuzz_support;
mod index;
pub mod keys;
mod metadata;
mod multifeed;
mod proto;
pub mod replicate;
mod residency;
mod storage;
pub mod topics;
pub mod verify;

// Compiles and runs the README's example as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use crate::{
    error::{AdmissionScope, Error, Result},
    exchange::{CLIENT_NAME, PROTOCOL_VERSION},
    feed::Feed,
    keys::{AsFeedKey, DiscoveryTopic, FeedKey, Keypair, SharedKey},
    metadata::FeedMetadata,
    multifeed::{AdmissionStats, Event, Multifeed, Options, RepairReport, SkipKind, SkippedFeed},
    replicate::{
        Backoff, BackoffPolicy, DialEvent, DialOptions, DialSummary, Dialer, PreAuth,
        ReplicateOptions, Replication, ReplicationEvent, ReplicationSummary, SessionEnd,
    },
    storage::{Durability, StorageConfig},
    topics::Topics,
    verify::{FeedReport, FeedStatus, VerifyReport},
};
