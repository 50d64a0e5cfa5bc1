//! Feed metadata: small text labels a feed carries in manifests
//! (`FeedInfo.metadata`), such as the name of the gateway that writes it.
//!
//! Our own writers carry [`crate::Options::writer_metadata`]. A remote feed keeps
//! what the first peer that offered it with metadata said, in the file
//! `feeds/<hex key>/info` (a protobuf `FeedInfo`), and is offered on with it.
//! Metadata is a label, not proof: any member can claim any name, so the feed key
//! stays the identity. Bounded in size, since peers choose it.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::Path,
};

use prost::Message;

use crate::{keys::FeedKey, proto::pb};

/// Metadata of one feed.
pub type FeedMetadata = BTreeMap<String, String>;

/// Most entries kept per feed; further ones are dropped.
pub const MAX_ENTRIES: usize = 8;
/// Longest key kept, in bytes.
pub const MAX_KEY_LEN: usize = 64;
/// Longest value kept, in bytes.
pub const MAX_VALUE_LEN: usize = 256;
/// Most feeds whose offered metadata waits for the feed to be created.
const MAX_PENDING: usize = 1024;
const INFO_FILE: &str = "info";
/// Larger than any file [`write_info`] writes.
const MAX_INFO_LEN: u64 = 16 * 1024;

/// `metadata` within the bounds: entries with an empty or too long key or value,
/// or with control characters, are dropped, then all past [`MAX_ENTRIES`].
pub(crate) fn bounded(metadata: &FeedMetadata) -> FeedMetadata {
    let fits = |text: &str, max: usize| text.len() <= max && !text.chars().any(char::is_control);
    metadata
        .iter()
        .filter(|(k, v)| !k.is_empty() && fits(k, MAX_KEY_LEN) && fits(v, MAX_VALUE_LEN))
        .take(MAX_ENTRIES)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The metadata recorded for a remote feed in `dir`, if any. A file that cannot
/// be read is treated as none: metadata is only a label.
pub(crate) fn read_info(dir: &Path, key: &FeedKey) -> Option<FeedMetadata> {
    let bytes = read_at_most(&dir.join(INFO_FILE), MAX_INFO_LEN)?;
    decode_info(&bytes, key)
}

/// The metadata an `info` file's bytes hold for feed `key`, bounded; `None` if they
/// are not a `FeedInfo` of that feed or hold no usable entry.
fn decode_info(bytes: &[u8], key: &FeedKey) -> Option<FeedMetadata> {
    let info = pb::FeedInfo::decode(bytes).ok()?;
    if info.key != key.as_bytes() {
        return None;
    }
    let metadata = bounded(&info.metadata);
    (!metadata.is_empty()).then_some(metadata)
}

/// The file at `path` if it holds at most `max` bytes: its length is checked while
/// reading, not only beforehand, so a file that grows (or a special file reporting
/// no length) is never read whole.
pub(crate) fn read_at_most(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > max {
        tracing::warn!(path = %path.display(), "ignoring a file larger than {max} bytes");
        return None;
    }
    Some(bytes)
}

/// Records `metadata` for the feed in `dir`, replacing the file whole (a crash
/// leaves the old file or the new one, never a torn one).
pub(crate) async fn write_info(
    dir: &Path,
    key: &FeedKey,
    metadata: &FeedMetadata,
) -> std::io::Result<()> {
    let bytes = pb::FeedInfo {
        key: key.as_bytes().to_vec(),
        length: None,
        metadata: metadata.clone().into_iter().collect(),
    }
    .encode_to_vec();
    let partial = dir.join(format!("{INFO_FILE}.partial"));
    tokio::fs::write(&partial, bytes).await?;
    tokio::fs::rename(&partial, dir.join(INFO_FILE)).await
}

/// The file in a local writer's directory that holds its name, so the name
/// survives the loss of the index (see `Multifeed::repair`).
const WRITER_NAME_FILE: &str = "writer-name";

/// The local writer name kept in the feed directory `dir`, if any. Bounded by
/// the index's own limit on names.
pub(crate) fn read_writer_name(dir: &Path) -> Option<String> {
    let path = dir.join(WRITER_NAME_FILE);
    let name = String::from_utf8(read_at_most(&path, crate::index::MAX_NAME_LEN as u64)?).ok()?;
    (!name.is_empty()).then_some(name)
}

/// Keeps the local writer name `name` in its feed directory `dir`, replacing the
/// file whole (a crash leaves the old file or the new one).
pub(crate) fn write_writer_name(dir: &Path, name: &str) -> std::io::Result<()> {
    let partial = dir.join(format!("{WRITER_NAME_FILE}.partial"));
    std::fs::write(&partial, name)?;
    std::fs::rename(&partial, dir.join(WRITER_NAME_FILE))
}

/// Offered metadata of feeds not created yet (they may be requested next). Full,
/// it forgets the oldest offer: feeds offered and never created (offered empty,
/// or junk) must not shut out the labels of feeds created later.
#[derive(Default)]
pub(crate) struct Pending {
    by_key: HashMap<FeedKey, FeedMetadata>,
    /// Keys in order of first offer; may hold keys already taken.
    order: VecDeque<FeedKey>,
}

impl Pending {
    /// Keeps `metadata` for `key` unless already known.
    pub(crate) fn offer(&mut self, key: FeedKey, metadata: FeedMetadata) {
        if self.by_key.contains_key(&key) {
            return;
        }
        while self.by_key.len() >= MAX_PENDING {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.by_key.remove(&oldest);
        }
        self.by_key.insert(key, metadata);
        self.order.push_back(key);
        // Keys taken since leave stale entries behind: drop them before they pile up.
        if self.order.len() > 2 * MAX_PENDING {
            let by_key = &self.by_key;
            self.order.retain(|k| by_key.contains_key(k));
        }
    }

    pub(crate) fn take(&mut self, key: &FeedKey) -> Option<FeedMetadata> {
        self.by_key.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_chosen_metadata_is_bounded() {
        let mut offered = FeedMetadata::new();
        offered.insert("gateway".into(), "site-a".into());
        offered.insert("".into(), "empty key".into());
        offered.insert("k".repeat(MAX_KEY_LEN + 1), "long key".into());
        offered.insert("long".into(), "v".repeat(MAX_VALUE_LEN + 1));
        offered.insert("paint".into(), "\u{1b}[31m".into());
        for i in 0..100 {
            offered.insert(format!("x{i:03}"), "y".into());
        }
        let kept = bounded(&offered);
        assert_eq!(kept.len(), MAX_ENTRIES);
        assert_eq!(kept.get("gateway").map(String::as_str), Some("site-a"));
        assert!(!kept.contains_key("paint") && !kept.contains_key("long"));
    }

    #[tokio::test]
    async fn info_round_trips_and_a_bad_file_is_no_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let key = FeedKey::from_bytes([3; 32]);
        assert_eq!(read_info(dir.path(), &key), None);
        let metadata: FeedMetadata = [("gateway".to_string(), "site-a".to_string())].into();
        write_info(dir.path(), &key, &metadata).await.unwrap();
        assert_eq!(read_info(dir.path(), &key), Some(metadata));
        // Another feed's file, or garbage, reads as none.
        assert_eq!(read_info(dir.path(), &FeedKey::from_bytes([4; 32])), None);
        std::fs::write(dir.path().join(INFO_FILE), [0xff; 40]).unwrap();
        assert_eq!(read_info(dir.path(), &key), None);
    }

    /// What decoding an `info` file may allocate beyond 8 times its size: the map of
    /// every entry the file lists (B-tree nodes of 11 entries, whatever their size),
    /// before [`bounded`] keeps a few.
    const INFO_FIXED_BYTES: usize = 32 * MAX_INFO_LEN as usize;

    fn check_info(
        bytes: &[u8],
        key: &FeedKey,
    ) -> Result<bool, proptest::test_runner::TestCaseError> {
        use proptest::prelude::*;
        let (decoded, peak) = crate::alloc_probe::peak_bytes(|| decode_info(bytes, key));
        prop_assert!(
            crate::fuzz_support::within_bound(bytes.len(), peak, INFO_FIXED_BYTES),
            "{peak} bytes allocated for an info file of {}",
            bytes.len()
        );
        let Some(metadata) = decoded else {
            return Ok(false);
        };
        prop_assert!(!metadata.is_empty() && metadata.len() <= MAX_ENTRIES);
        prop_assert_eq!(&bounded(&metadata), &metadata);
        let encoded = pb::FeedInfo {
            key: key.as_bytes().to_vec(),
            length: None,
            metadata: metadata.clone(),
        }
        .encode_to_vec();
        prop_assert_eq!(decode_info(&encoded, key), Some(metadata));
        Ok(true)
    }

    /// Arbitrary bytes, valid `info` files (the labels a peer offered) and mutated
    /// ones through what reads them.
    #[test]
    fn fuzz_feed_info_files() {
        use proptest::prelude::*;
        let key = FeedKey::from_bytes([3; 32]);
        let valid = (
            proptest::collection::btree_map(".{0,8}", ".{0,16}", 0..12),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(move |(metadata, length)| {
                pb::FeedInfo {
                    key: key.as_bytes().to_vec(),
                    length,
                    metadata,
                }
                .encode_to_vec()
            })
            .boxed();
        let decoded = std::cell::Cell::new(0u64);
        let strategy = crate::fuzz_support::hostile_inputs(valid);
        let inputs = crate::fuzz_support::fuzz_for("feed info files", strategy, 1024, |bytes| {
            decoded.set(decoded.get() + u64::from(check_info(&bytes, &key)?));
            Ok(())
        });
        println!(
            "feed info files: {} of {inputs} inputs decoded",
            decoded.get()
        );
        assert!(decoded.get() > 0 && decoded.get() < inputs);
    }

    /// `info` files of the largest size read, filled with the most entries, and
    /// larger ones: refused, or decoded within the bound; a file longer than its
    /// limit is not read whole, even when it says it is empty.
    #[test]
    fn hostile_maximum_size_info_files_are_bounded() {
        let key = FeedKey::from_bytes([3; 32]);
        let field = crate::fuzz_support::length_delimited;
        let fill = |entry: &dyn Fn(usize) -> Vec<u8>| {
            let mut bytes = field(0x0a, key.as_bytes());
            for i in 0.. {
                let next = entry(i);
                if bytes.len() + next.len() > MAX_INFO_LEN as usize {
                    break;
                }
                bytes.extend_from_slice(&next);
            }
            bytes
        };
        // Distinct short keys with empty values: the most map entries a file holds.
        let most_entries = fill(&|i| field(0x1a, &field(0x0a, format!("{i:x}").as_bytes())));
        let empty_entries = fill(&|_| vec![0x1a, 0x00]);
        let longest_values = fill(&|i| {
            field(
                0x1a,
                &[
                    field(0x0a, format!("{i:x}").as_bytes()),
                    field(0x12, &[b'v'; 1000]),
                ]
                .concat(),
            )
        });
        for (name, bytes) in [
            ("most entries", most_entries),
            ("empty entries", empty_entries),
            ("longest values", longest_values),
        ] {
            assert!(bytes.len() <= MAX_INFO_LEN as usize, "{name}");
            let (result, peak) = crate::alloc_probe::peak_bytes(|| decode_info(&bytes, &key));
            println!(
                "hostile info file {name}: {} bytes, {} ({peak} bytes allocated at the peak, {:.2}x)",
                bytes.len(),
                if result.is_some() {
                    "decoded"
                } else {
                    "no metadata"
                },
                peak as f64 / bytes.len() as f64
            );
            // The file is small enough for its whole map, the fixed allowance.
            assert!(
                crate::fuzz_support::within_bound(bytes.len(), peak, INFO_FIXED_BYTES),
                "{name}: {peak} bytes"
            );
            assert!(check_info(&bytes, &key).is_ok(), "{name}");
        }
        // A file one byte past the limit is ignored, and so is a special file of
        // endless bytes that reports no length.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INFO_FILE);
        std::fs::write(&path, vec![0x20; MAX_INFO_LEN as usize + 1]).unwrap();
        assert_eq!(read_info(dir.path(), &key), None);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let (read, peak) = crate::alloc_probe::peak_bytes(|| read_info(dir.path(), &key));
        assert_eq!(read, None);
        assert!(
            peak <= 4 * MAX_INFO_LEN as usize,
            "{peak} bytes read from /dev/zero"
        );
        std::os::unix::fs::symlink("/dev/zero", dir.path().join(WRITER_NAME_FILE)).unwrap();
        let (name, peak) = crate::alloc_probe::peak_bytes(|| read_writer_name(dir.path()));
        assert_eq!(name, None);
        assert!(
            peak <= 4 * crate::index::MAX_NAME_LEN,
            "{peak} bytes read from /dev/zero"
        );
    }

    #[test]
    fn pending_is_bounded_keeps_the_newest_and_the_first_offer_wins() {
        let mut pending = Pending::default();
        let meta = |v: &str| -> FeedMetadata { [("gateway".to_string(), v.to_string())].into() };
        let key = |i: u32| {
            let mut bytes = [9u8; 32];
            bytes[..4].copy_from_slice(&i.to_le_bytes());
            FeedKey::from_bytes(bytes)
        };
        pending.offer(key(0), meta("first"));
        pending.offer(key(0), meta("second"));
        assert_eq!(pending.take(&key(0)), Some(meta("first")));
        // Many more offers than the bound, some taken on the way (as feeds are created).
        for i in 1..=(5 * MAX_PENDING as u32) {
            pending.offer(key(i), meta("x"));
            if i % 3 == 0 {
                assert!(pending.take(&key(i)).is_some());
            }
        }
        assert!(pending.by_key.len() <= MAX_PENDING);
        assert!(pending.order.len() <= 2 * MAX_PENDING);
        let newest = key(5 * MAX_PENDING as u32 - 1);
        assert_eq!(pending.take(&newest), Some(meta("x")));
        assert_eq!(
            pending.take(&key(1)),
            None,
            "the oldest offers were forgotten"
        );
    }
}
