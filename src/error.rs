//! The crate's error type.

use std::{io, path::PathBuf};

/// Everything that can go wrong in multifeed.
///
/// Variants carry enough context to tell a user what happened and what to do.
/// Faults caused by a peer are separate variants from local ones.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key given as text or bytes is not 32 bytes of (hex) data.
    #[error("invalid key {input:?}: {reason}; expected 32 bytes, written as 64 hex characters")]
    InvalidKey {
        /// What was given (truncated for display).
        input: String,
        /// Why it was refused.
        reason: String,
    },

    /// A writer name that cannot be used.
    #[error("invalid writer name {name:?}: {reason}")]
    InvalidName {
        /// The refused name.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The shared key was offered as the key of a member feed.
    #[error(
        "the shared key cannot be used as a member feed's key; generate a fresh key pair for the writer"
    )]
    SharedKeyAsFeedKey,

    /// A key pair was passed for a writer name that already exists with another key.
    #[error(
        "writer {name:?} already exists with key {existing}; open it without a key pair, or pick another name"
    )]
    WriterKeyMismatch {
        /// The writer name.
        name: String,
        /// Hex key of the existing writer.
        existing: String,
    },

    /// A feed with this key is already a member, in a role that conflicts with the request.
    #[error("feed {key} is already a member ({role}); {hint}")]
    KeyConflict {
        /// Hex key of the feed.
        key: String,
        /// The role it already has.
        role: &'static str,
        /// What to do instead.
        hint: &'static str,
    },

    /// An append on a feed this peer cannot write.
    #[error("feed {key} is read-only here (a remote member); only its owner can append to it")]
    NotWritable {
        /// Hex key of the feed.
        key: String,
    },

    /// A change to a group opened with [`Options::read_only`](crate::Options::read_only):
    /// appends, new writers, replication and repairs are refused before anything
    /// is written.
    #[error(
        "the group was opened read-only, so {what} is refused and nothing was written; open it without the read-only option (on a writable file system, with write permission) to change it"
    )]
    ReadOnly {
        /// What was refused, e.g. "appending to feed 12ab…".
        what: String,
    },

    /// The multifeed was closed.
    #[error("the multifeed is closed; open it again to keep using it")]
    Closed,

    /// An I/O error on local storage.
    #[error("storage I/O error ({context}): {}", describe_io(source))]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An error from the hypercore of one member feed.
    #[error("feed {key}: {source}")]
    Core {
        /// Hex key of the feed (or "index" for the hidden index core).
        key: String,
        /// The underlying hypercore error.
        #[source]
        source: hypercore::HypercoreError,
    },

    /// The peer speaks another major version of the feed-exchange protocol (or sent
    /// no parsable version). Nothing was exchanged and neither store changed.
    #[error(
        "protocol version mismatch: we speak {ours}, the peer speaks {theirs:?}; upgrade the older side to the same major version"
    )]
    VersionMismatch {
        /// Our protocol version.
        ours: String,
        /// The version the peer announced (possibly empty or unparsable).
        theirs: String,
    },

    /// The peer is another kind of client.
    #[error(
        "client mismatch: we are {ours:?}, the peer is {theirs:?}; both sides must run a compatible multifeed client"
    )]
    ClientMismatch {
        /// Our client name.
        ours: String,
        /// The peer's client name.
        theirs: String,
    },

    /// The peer does not know our shared key (it opened another group's root channel).
    #[error(
        "the peer belongs to another group (different shared key); check the key on both sides"
    )]
    SharedKeyMismatch,

    /// The peer did not complete the handshake in time: wrong shared key, not a
    /// multifeed peer, or a stalled link.
    #[error(
        "no handshake from the peer within {after:?}: it may use another shared key, not be a multifeed peer, or be unreachable"
    )]
    HandshakeTimeout {
        /// The configured handshake timeout.
        after: std::time::Duration,
    },

    /// The peer is a server with every peer slot taken: it turned this connection
    /// away after checking it was a member. Not a fault; retry later.
    #[error(
        "the peer is full (it serves at most {max_peers} peers at once) and turned this connection away; try again later"
    )]
    ServerBusy {
        /// How many peers it serves at once.
        max_peers: u32,
    },

    /// Nothing was received from the peer for the idle timeout.
    #[error(
        "the peer went silent for {after:?} (dead or cut off); reconnect to resume, nothing received so far is lost"
    )]
    IdleTimeout {
        /// The configured idle timeout.
        after: std::time::Duration,
    },

    /// The peer stayed connected (keep-alives arrived) but sent nothing that moved
    /// replication on while we waited on it.
    #[error(
        "the peer kept the connection alive but sent no feed data, answers or exchange messages for {after:?} while replication waited on it (an overloaded or faulty peer); reconnect to resume, nothing received so far is lost, or raise ReplicateOptions::stall_timeout for a very slow link"
    )]
    Stalled {
        /// The configured stall timeout.
        after: std::time::Duration,
    },

    /// The connection ended or broke before replication finished.
    #[error(
        "connection lost before replication finished ({reason}); reconnect to resume, nothing received so far is lost"
    )]
    ConnectionLost {
        /// What ended it.
        reason: String,
    },

    /// Too many feeds requested from peers have not delivered anything yet: a
    /// member offered feeds that hold nothing (a buggy or hostile member), or
    /// peers together keep more unproven feeds pending than the group allows.
    /// Nothing of them was admitted; the local store is intact.
    #[error(
        "{} more than {limit} feeds that delivered nothing (no verified block or signed length); they were not admitted and the local store is intact. The peer may be faulty or hostile; if it is a trusted member that really holds that many empty feeds, raise {}",
        scope.who(), scope.setting()
    )]
    TooManyUnprovenFeeds {
        /// The limit that was passed.
        limit: usize,
        /// Whether it is this session's limit or the whole group's.
        scope: AdmissionScope,
    },

    /// The peer broke the protocol or a limit (oversized message, too many feeds, ...).
    #[error(
        "the peer broke the protocol: {reason}; the connection was closed and the local store is intact"
    )]
    PeerFault {
        /// What it did.
        reason: String,
    },

    /// The peer sent a block that failed verification (bad signature or Merkle proof).
    #[error(
        "feed {key}: the peer sent data that failed verification ({reason}); it was rejected and the local feed is intact"
    )]
    InvalidData {
        /// Hex key of the feed.
        key: String,
        /// What failed.
        reason: String,
    },

    /// Stored data is damaged: it cannot be decoded or does not match what the index recorded.
    #[error("damaged storage at {}: {reason}; restore it from a backup or delete it to re-sync from peers", path.display())]
    Damaged {
        /// The damaged file or directory.
        path: PathBuf,
        /// What was found.
        reason: String,
    },

    /// A block read from local storage does not match the feed's Merkle tree
    /// (its bytes, its tree node or its place in the data file are damaged), so
    /// it was not returned. The feed's other blocks are still readable.
    #[error("feed {key}, block {seq}: damaged on disk ({reason}); {DAMAGED_BLOCK_ADVICE}")]
    DamagedBlock {
        /// Hex key of the feed.
        key: String,
        /// The block's sequence number.
        seq: u64,
        /// What did not match.
        reason: String,
    },

    /// A topic name that cannot be used (see `topics`).
    #[error(
        "invalid topic {topic:?}: {reason}; topics are 1 to 200 bytes of UTF-8 without control characters"
    )]
    InvalidTopic {
        /// The refused topic (truncated for display).
        topic: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// A message that cannot be published (too large, bad content type, ...).
    #[error("invalid message: {reason}")]
    InvalidMessage {
        /// Why it was refused, and what to do instead.
        reason: String,
    },

    /// A cursor's text form could not be read.
    #[error(
        "invalid cursor: {reason}; pass a string produced by Cursor::to_string, or start from Cursor::default()"
    )]
    InvalidCursor {
        /// What was wrong with it.
        reason: String,
    },
}

impl Error {
    /// A refusal decided at the handshake that both sides must see (our
    /// handshake still goes out before the connection ends), a full server included.
    pub(crate) fn is_handshake_refusal(&self) -> bool {
        matches!(
            self,
            Error::VersionMismatch { .. }
                | Error::ClientMismatch { .. }
                | Error::SharedKeyMismatch
                | Error::ServerBusy { .. }
        )
    }

    /// A stable snake_case name of the kind of error, for scripts and APIs.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidKey { .. } => "invalid_key",
            Error::InvalidName { .. } => "invalid_name",
            Error::SharedKeyAsFeedKey => "shared_key_as_feed_key",
            Error::WriterKeyMismatch { .. } => "writer_key_mismatch",
            Error::KeyConflict { .. } => "key_conflict",
            Error::NotWritable { .. } => "not_writable",
            Error::ReadOnly { .. } => "read_only",
            Error::Closed => "closed",
            Error::Io { .. } => "io",
            Error::Core { .. } => "storage",
            Error::VersionMismatch { .. } => "version_mismatch",
            Error::ClientMismatch { .. } => "client_mismatch",
            Error::SharedKeyMismatch => "shared_key_mismatch",
            Error::HandshakeTimeout { .. } => "handshake_timeout",
            Error::ServerBusy { .. } => "server_busy",
            Error::IdleTimeout { .. } => "idle_timeout",
            Error::Stalled { .. } => "stalled",
            Error::ConnectionLost { .. } => "connection_lost",
            Error::PeerFault { .. } => "peer_fault",
            Error::InvalidData { .. } => "invalid_data",
            Error::Damaged { .. } => "damaged",
            Error::DamagedBlock { .. } => "damaged_block",
            Error::InvalidTopic { .. } => "invalid_topic",
            Error::InvalidMessage { .. } => "invalid_message",
            Error::InvalidCursor { .. } => "invalid_cursor",
            Error::TooManyUnprovenFeeds { .. } => "too_many_unproven_feeds",
        }
    }

    /// Whether the error was caused by the peer (or the link to it) rather than locally.
    pub fn is_peer_fault(&self) -> bool {
        matches!(
            self,
            Error::VersionMismatch { .. }
                | Error::ClientMismatch { .. }
                | Error::SharedKeyMismatch
                | Error::HandshakeTimeout { .. }
                | Error::ServerBusy { .. }
                | Error::IdleTimeout { .. }
                | Error::Stalled { .. }
                | Error::PeerFault { .. }
                | Error::TooManyUnprovenFeeds { .. }
                | Error::InvalidData { .. }
                | Error::ConnectionLost { .. }
        )
    }

    /// Whether the operating system refused access to the store's files
    /// (permissions, an immutable file, a read-only mount): nothing is damaged,
    /// and opening the group with [`Options::read_only`](crate::Options::read_only)
    /// may still read it.
    pub fn is_access_refused(&self) -> bool {
        matches!(self, Error::Io { source, .. } if crate::storage::is_access_refused(source))
    }

    pub(crate) fn read_only(what: impl Into<String>) -> Self {
        Error::ReadOnly { what: what.into() }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn core(key: impl std::fmt::Display, source: hypercore::HypercoreError) -> Self {
        match source {
            // hypercore's text for these is its own internals ("RandomAccess IO
            // error. Context: None"); the OS error is what the user can act on.
            hypercore::HypercoreError::IO { source, .. } => Error::Io {
                context: format!("feed {key}"),
                source,
            },
            source => Error::Core {
                key: key.to_string(),
                source,
            },
        }
    }
}

/// Which limit on unproven feeds was passed (see [`Error::TooManyUnprovenFeeds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdmissionScope {
    /// One session's: `ReplicateOptions::max_unproven_feeds`.
    Session,
    /// The group's, over every session at once: `Options::max_unproven_feeds`.
    Group,
    /// One peer address's, over all of its sessions at once (`PeerAdmissions`).
    Peer,
}

impl AdmissionScope {
    fn who(self) -> &'static str {
        match self {
            AdmissionScope::Session => "the peer offered",
            AdmissionScope::Group => "peers together have pending",
            AdmissionScope::Peer => "the peer's sessions together offered",
        }
    }

    fn setting(self) -> &'static str {
        match self {
            AdmissionScope::Session => "ReplicateOptions::max_unproven_feeds",
            AdmissionScope::Group => "the group's Options::max_unproven_feeds",
            AdmissionScope::Peer => "the limit per peer address (PeerAdmissions)",
        }
    }
}

/// An OS error in our words, with what to do where there is something to do.
fn describe_io(error: &io::Error) -> String {
    let advice = match error.kind() {
        io::ErrorKind::StorageFull => "the disk is full; free some space, then try again",
        io::ErrorKind::PermissionDenied => {
            "permission denied (not damage); check the owner and permissions of the store's files and that none is immutable (lsattr shows an 'i'; chattr -i clears it)"
        }
        io::ErrorKind::ReadOnlyFilesystem => {
            "the file system is read-only (not damage); writes need the store on a writable mount, reading works as it is"
        }
        io::ErrorKind::QuotaExceeded => {
            "the disk quota is used up; free some space, then try again"
        }
        _ => return error.to_string(),
    };
    format!("{advice} ({error})")
}

/// What to do about a damaged block ([`Error::DamagedBlock`]).
pub(crate) const DAMAGED_BLOCK_ADVICE: &str = "the feed's other blocks are unaffected. Restore the feed's files from a backup, or, for a feed another gateway writes, delete its directory under feeds/ and sync to fetch it again";

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
