//! Keys: the group's shared key, member feed keys and writer key pairs.

use std::{fmt, str::FromStr};

use hypercore::{PartialKeypair, SigningKey, VerifyingKey};

use crate::error::{Error, Result};

fn parse_32(input: &str) -> Result<[u8; 32]> {
    let shown: String = input.chars().take(80).collect();
    let trimmed = input.trim();
    if trimmed.len() != 64 {
        return Err(Error::InvalidKey {
            input: shown,
            reason: format!("{} characters", trimmed.len()),
        });
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(trimmed, &mut out).map_err(|e| Error::InvalidKey {
        input: shown,
        reason: e.to_string(),
    })?;
    Ok(out)
}

fn from_slice(bytes: &[u8]) -> Result<[u8; 32]> {
    bytes.try_into().map_err(|_| Error::InvalidKey {
        input: format!("<{} bytes>", bytes.len()),
        reason: format!("{} bytes", bytes.len()),
    })
}

/// The 32-byte key that defines a group. Peers prove knowledge of it to each other;
/// it is never written to disk and never used as a member feed's key.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey([u8; 32]);

impl SharedKey {
    /// A fresh random shared key, for a new group.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key from a slice that must be 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        from_slice(bytes).map(Self)
    }

    /// The key from 64 hex characters (either case). An error never repeats the
    /// input: a mistyped shared key is still almost all of the secret.
    pub fn from_hex(text: &str) -> Result<Self> {
        parse_32(text).map(Self).map_err(|e| match e {
            Error::InvalidKey { reason, .. } => Error::InvalidKey {
                input: "(the shared key, not shown)".into(),
                reason,
            },
            other => other,
        })
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, for printing to the user who owns the group.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Context string of [`SharedKey::discovery_topic`]; changing it splits the network.
const DISCOVERY_CONTEXT: &[u8] = b"multifeed discovery topic v1";

impl SharedKey {
    /// The topic under which the group's nodes find each other (mDNS, the
    /// Hyperswarm DHT): BLAKE2b-256 keyed by the shared key over a fixed context
    /// string. It is a one-way function of the key: knowing the topic finds peers,
    /// but reveals nothing that lets a stranger pass the replication handshake.
    pub fn discovery_topic(&self) -> DiscoveryTopic {
        use blake2::digest::{FixedOutput, Mac, typenum::U32};
        // A 32-byte key is always accepted by the keyed mode (at most 64).
        let Ok(mut mac) = <blake2::Blake2bMac<U32> as Mac>::new_from_slice(&self.0) else {
            unreachable!("BLAKE2b takes a 32-byte key")
        };
        Mac::update(&mut mac, DISCOVERY_CONTEXT);
        DiscoveryTopic(mac.finalize_fixed().into())
    }
}

/// A group's discovery topic (see [`SharedKey::discovery_topic`]): public, 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiscoveryTopic([u8; 32]);

impl DiscoveryTopic {
    /// The raw bytes (a Hyperswarm topic).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for DiscoveryTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiscoveryTopic({})", self.to_hex())
    }
}

impl fmt::Display for DiscoveryTopic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SharedKey {
    // The key is a secret: never print it by accident.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedKey(<redacted>)")
    }
}

impl FromStr for SharedKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_hex(s)
    }
}

/// The public key of a member feed (an ed25519 public key, 32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FeedKey([u8; 32]);

impl FeedKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key from a slice that must be 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        from_slice(bytes).map(Self)
    }

    /// The key from 64 hex characters (either case).
    pub fn from_hex(text: &str) -> Result<Self> {
        parse_32(text).map(Self)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0).map_err(|e| Error::InvalidKey {
            input: self.to_hex(),
            reason: format!("not an ed25519 public key ({e})"),
        })
    }
}

impl fmt::Display for FeedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for FeedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FeedKey({})", &hex::encode(&self.0[..6]))
    }
}

impl FromStr for FeedKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_hex(s)
    }
}

impl From<[u8; 32]> for FeedKey {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// Anything that names a feed: a [`FeedKey`], 32 bytes, or hex text (either case).
pub trait AsFeedKey {
    /// The key, or an error saying why the input is not one.
    fn as_feed_key(&self) -> Result<FeedKey>;
}

impl AsFeedKey for FeedKey {
    fn as_feed_key(&self) -> Result<FeedKey> {
        Ok(*self)
    }
}
impl AsFeedKey for &FeedKey {
    fn as_feed_key(&self) -> Result<FeedKey> {
        Ok(**self)
    }
}
impl AsFeedKey for [u8; 32] {
    fn as_feed_key(&self) -> Result<FeedKey> {
        Ok(FeedKey(*self))
    }
}
impl AsFeedKey for &[u8] {
    fn as_feed_key(&self) -> Result<FeedKey> {
        FeedKey::from_slice(self)
    }
}
impl AsFeedKey for &str {
    fn as_feed_key(&self) -> Result<FeedKey> {
        FeedKey::from_hex(self)
    }
}
impl AsFeedKey for String {
    fn as_feed_key(&self) -> Result<FeedKey> {
        FeedKey::from_hex(self)
    }
}

/// An ed25519 key pair that owns a writable feed.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        Self(hypercore::generate_signing_key())
    }

    /// A key pair from its 32-byte secret seed, for deterministic identities.
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }

    /// The 32-byte secret seed. Keep it secret.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key, which is the feed's key.
    pub fn public_key(&self) -> FeedKey {
        FeedKey(self.0.verifying_key().to_bytes())
    }

    pub(crate) fn to_partial(&self) -> PartialKeypair {
        PartialKeypair {
            public: self.0.verifying_key(),
            secret: Some(self.0.clone()),
        }
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keypair(public={:?})", self.public_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mistyped shared key (one character short, or one wrong character) is
    /// refused without echoing any of it.
    #[test]
    fn a_bad_shared_key_is_never_echoed() {
        let secret = "3f1c9a7e".repeat(8);
        for bad in [&secret[..63], &format!("{}x", &secret[..63])] {
            let message = SharedKey::from_hex(bad).unwrap_err().to_string();
            assert!(!message.contains(&secret[..16]), "{message}");
            assert!(!message.contains(&secret[40..56]), "{message}");
        }
        assert!(SharedKey::from_hex(&secret).is_ok());
    }

    /// Text typed or pasted as a key (arbitrary, valid hex in either case with
    /// spaces around, mutated hex) through `FeedKey` and `SharedKey` parsing: a key
    /// that prints back as the text, or a typed error that never repeats a shared
    /// key; error text is all they allocate.
    #[test]
    fn fuzz_typed_keys() {
        use proptest::prelude::*;
        let valid = (any::<[u8; 32]>(), any::<bool>(), "[ \t\n]{0,2}")
            .prop_map(|(bytes, upper, space)| {
                let hex = hex::encode(bytes);
                let hex = if upper { hex.to_uppercase() } else { hex };
                format!("{space}{hex}{space}").into_bytes()
            })
            .boxed();
        let strategy = prop_oneof![
            ".{0,100}".prop_map(String::into_bytes),
            crate::fuzz_support::hostile_inputs(valid),
        ]
        .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .boxed();
        let parsed = std::cell::Cell::new(0u64);
        let inputs = crate::fuzz_support::fuzz_for("typed keys", strategy, 1024, |text| {
            let (feed, peak) = crate::alloc_probe::peak_bytes(|| FeedKey::from_hex(&text));
            prop_assert!(
                crate::fuzz_support::within_bound(text.len(), peak, 1024),
                "{peak} bytes"
            );
            let (shared, peak) = crate::alloc_probe::peak_bytes(|| SharedKey::from_hex(&text));
            prop_assert!(
                crate::fuzz_support::within_bound(text.len(), peak, 1024),
                "{peak} bytes"
            );
            let trimmed = text.trim();
            match (feed, shared) {
                (Ok(feed), Ok(shared)) => {
                    prop_assert!(feed.to_hex().eq_ignore_ascii_case(trimmed));
                    prop_assert_eq!(shared.to_hex(), feed.to_hex());
                    parsed.set(parsed.get() + 1);
                }
                (Err(Error::InvalidKey { .. }), Err(Error::InvalidKey { input, reason })) => {
                    let hexish = trimmed.len() >= 16
                        && trimmed.chars().take(16).all(|c| c.is_ascii_hexdigit());
                    if hexish {
                        let secret = &trimmed[..16];
                        prop_assert!(!input.contains(secret) && !reason.contains(secret));
                    }
                }
                (feed, shared) => {
                    return Err(TestCaseError::fail(format!(
                        "the two parsers disagree: {feed:?} / {}",
                        shared
                            .map(|_| "a shared key".to_string())
                            .unwrap_or_else(|e| e.to_string())
                    )));
                }
            }
            Ok(())
        });
        println!("typed keys: {} of {inputs} inputs parsed", parsed.get());
        assert!(parsed.get() > 0 && parsed.get() < inputs);
    }

    /// Pinned against an independent BLAKE2b (Python's `hashlib.blake2b(context,
    /// key=key, digest_size=32)`): the topic is part of the wire, other
    /// implementations must find the same peers.
    #[test]
    fn the_discovery_topic_is_a_keyed_blake2b_of_the_context() {
        let key = SharedKey::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(
            key.discovery_topic().to_hex(),
            "7c79b730061bdd8f9a6fd1f0992c8f31d3882e146a64154bbe1a8c1ed9f8931a"
        );
        let other = SharedKey::generate();
        assert_ne!(other.discovery_topic(), key.discovery_topic());
        assert!(!key.discovery_topic().to_hex().contains(&key.to_hex()[..16]));
    }
}
