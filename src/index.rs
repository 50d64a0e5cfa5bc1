//! The hidden index core: a local-only hypercore whose blocks record, in order of
//! admission, every member feed's key and local name. It is never listed and never
//! offered to peers; reopening a multifeed replays it.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use hypercore::{Hypercore, HypercoreBuilder};
use prost::Message;

use crate::{
    error::{Error, Result},
    keys::FeedKey,
    proto::pb,
    storage::{self, Durability, FilePool, StorageConfig, SyncSet},
};

/// Largest index record we accept; a record is a key, a name and a timestamp.
const MAX_RECORD_LEN: usize = 64 * 1024;
pub(crate) const MAX_NAME_LEN: usize = 1024;

/// One admitted member feed, as recorded in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexRecord {
    pub(crate) key: FeedKey,
    pub(crate) local_name: Option<String>,
    pub(crate) admitted_at_ms: u64,
}

impl IndexRecord {
    pub(crate) fn new(key: FeedKey, local_name: Option<String>) -> Self {
        let admitted_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self {
            key,
            local_name,
            admitted_at_ms,
        }
    }

    fn encode(&self) -> Vec<u8> {
        pb::IndexRecord {
            key: self.key.as_bytes().to_vec(),
            local_name: self.local_name.clone(),
            admitted_at_ms: self.admitted_at_ms,
        }
        .encode_to_vec()
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(format!("record of {} bytes", bytes.len()));
        }
        let record = pb::IndexRecord::decode(bytes).map_err(|e| e.to_string())?;
        let key = FeedKey::from_slice(&record.key).map_err(|e| e.to_string())?;
        if record
            .local_name
            .as_ref()
            .is_some_and(|n| n.len() > MAX_NAME_LEN)
        {
            return Err("local name too long".into());
        }
        Ok(Self {
            key,
            local_name: record.local_name,
            admitted_at_ms: record.admitted_at_ms,
        })
    }
}

/// The index core with its storage.
pub(crate) struct IndexCore {
    core: Hypercore,
    sync: Option<Arc<SyncSet>>,
    durability: Durability,
}

/// Syncs the files of one core, if it has any.
pub(crate) struct Flusher(Option<Arc<SyncSet>>);

impl Flusher {
    pub(crate) async fn flush(self) -> Result<()> {
        match self.0 {
            Some(sync) => sync.sync().await,
            None => Ok(()),
        }
    }
}

/// A record that could not be read back, reported and skipped.
pub(crate) struct BadRecord {
    pub(crate) seq: u64,
    pub(crate) reason: String,
}

pub(crate) fn index_dir(root: &Path) -> PathBuf {
    root.join("index")
}

impl IndexCore {
    /// Opens the index of `storage`, creating an empty one if there is none.
    pub(crate) async fn open(
        storage: &StorageConfig,
        durability: Durability,
        pool: &Arc<FilePool>,
    ) -> Result<Self> {
        let (core_storage, path, exists) = match storage {
            StorageConfig::Dir(root) => {
                let dir = index_dir(root);
                let exists = std::fs::metadata(dir.join("oplog"))
                    .map(|m| m.len() > 0)
                    .unwrap_or(false);
                if pool.is_read_only() && !exists {
                    // Nothing to create on a read-only store: an empty index in
                    // memory, so the feed directories show as unlisted.
                    (storage::open_memory().await?, dir, false)
                } else {
                    (storage::open_dir(&dir, true, pool).await?, dir, exists)
                }
            }
            StorageConfig::Memory => (
                storage::open_memory().await?,
                PathBuf::from(":memory:"),
                false,
            ),
        };
        // The index core's own key pair is random and local: it never leaves this machine.
        let core = HypercoreBuilder::new(core_storage.storage)
            .open(exists)
            .build()
            .await
            .map_err(|e| match e {
                // The OS refused (permissions, a read-only mount): not damage.
                hypercore::HypercoreError::IO { source, .. }
                    if storage::is_access_refused(&source) =>
                {
                    Error::io(format!("open the member index {}", path.display()), source)
                }
                e => Error::Damaged {
                    path: path.clone(),
                    reason: format!("the member index cannot be opened: {e}"),
                },
            })?;
        Ok(Self {
            core,
            sync: core_storage.sync,
            durability,
        })
    }

    /// Every record in admission order, plus those that could not be decoded.
    pub(crate) async fn records(&mut self) -> Result<(Vec<IndexRecord>, Vec<BadRecord>)> {
        let length = self.core.info().length;
        let mut records = Vec::with_capacity(length.min(1 << 20) as usize);
        let mut bad = Vec::new();
        for seq in 0..length {
            match self.core.get(seq).await {
                Ok(Some(bytes)) => match IndexRecord::decode(&bytes) {
                    Ok(record) => records.push(record),
                    Err(reason) => bad.push(BadRecord { seq, reason }),
                },
                Ok(None) => bad.push(BadRecord {
                    seq,
                    reason: "record missing".into(),
                }),
                Err(e) => bad.push(BadRecord {
                    seq,
                    reason: e.to_string(),
                }),
            }
        }
        Ok((records, bad))
    }

    /// Appends a record; durable as the multifeed's [`Durability`] says.
    pub(crate) async fn append(&mut self, record: &IndexRecord) -> Result<()> {
        self.append_batch(std::slice::from_ref(record)).await
    }

    /// Appends several records in one signed batch, durable alike.
    pub(crate) async fn append_batch(&mut self, records: &[IndexRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let encoded: Vec<Vec<u8>> = records.iter().map(IndexRecord::encode).collect();
        self.core
            .append_batch(&encoded)
            .await
            .map_err(|e| Error::core("index", e))?;
        if self.durability == Durability::PowerLoss {
            self.flusher().flush().await?;
        }
        Ok(())
    }

    /// What syncs the index; a separate value because `Hypercore` is not `Sync`,
    /// so no future may hold `&IndexCore` across an await.
    pub(crate) fn flusher(&self) -> Flusher {
        Flusher(self.sync.clone())
    }

    /// Syncs and releases the index's files.
    pub(crate) async fn close(self) -> Result<()> {
        let sync = self.sync.clone();
        drop(self);
        match sync {
            Some(sync) => sync.close().await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let record = IndexRecord::new(FeedKey::from_bytes([7; 32]), Some("sensors".into()));
        assert_eq!(IndexRecord::decode(&record.encode()).unwrap(), record);
    }

    /// What decoding a record may allocate beyond 8 times its size: prost's error text.
    const RECORD_FIXED_BYTES: usize = 4096;

    fn check_record(bytes: &[u8]) -> Result<bool, proptest::test_runner::TestCaseError> {
        use proptest::prelude::*;
        let (decoded, peak) = crate::alloc_probe::peak_bytes(|| IndexRecord::decode(bytes));
        prop_assert!(
            crate::fuzz_support::within_bound(bytes.len(), peak, RECORD_FIXED_BYTES),
            "{peak} bytes allocated for a record of {}",
            bytes.len()
        );
        let Ok(record) = decoded else {
            return Ok(false);
        };
        prop_assert!(
            record
                .local_name
                .as_ref()
                .is_none_or(|n| n.len() <= MAX_NAME_LEN)
        );
        prop_assert_eq!(IndexRecord::decode(&record.encode()), Ok(record));
        Ok(true)
    }

    /// Arbitrary bytes, valid records and mutated ones through `IndexRecord::decode`
    /// (the index is local, but a damaged disk can hand it anything).
    #[test]
    fn fuzz_index_records() {
        use proptest::prelude::*;
        let valid = (
            any::<[u8; 32]>(),
            proptest::option::of(".{0,40}"),
            any::<u64>(),
        )
            .prop_map(|(key, local_name, admitted_at_ms)| {
                IndexRecord {
                    key: FeedKey::from_bytes(key),
                    local_name,
                    admitted_at_ms,
                }
                .encode()
            })
            .boxed();
        let decoded = std::cell::Cell::new(0u64);
        let strategy = crate::fuzz_support::hostile_inputs(valid);
        let inputs = crate::fuzz_support::fuzz_for("index records", strategy, 1024, |bytes| {
            decoded.set(decoded.get() + u64::from(check_record(&bytes)?));
            Ok(())
        });
        println!(
            "index records: {} of {inputs} inputs decoded",
            decoded.get()
        );
        assert!(decoded.get() > 0 && decoded.get() < inputs);
    }

    /// Records of the largest accepted size, filled with repeated fields and the
    /// longest values: refused or decoded within the bound.
    #[test]
    fn hostile_maximum_size_records_are_bounded() {
        let field = crate::fuzz_support::length_delimited;
        let key = field(0x0a, &[1; 32]);
        let fill = |unit: Vec<u8>| {
            let mut bytes = key.clone();
            while bytes.len() + unit.len() <= MAX_RECORD_LEN {
                bytes.extend_from_slice(&unit);
            }
            bytes
        };
        let name = "n".repeat(MAX_NAME_LEN);
        for (name, bytes, ok) in [
            ("repeated keys", fill(key.clone()), true),
            (
                "repeated longest names",
                fill(field(0x12, name.as_bytes())),
                true,
            ),
            (
                "repeated timestamps",
                fill(vec![0x18, 0xff, 0xff, 0xff, 0xff, 0x0f]),
                true,
            ),
            (
                "one name of the whole record",
                [key.clone(), field(0x12, &vec![b'n'; MAX_RECORD_LEN - 40])].concat(),
                false,
            ),
            ("unknown fields", fill(vec![0x20, 0x01]), true),
            (
                "one byte too many",
                [fill(vec![0x20, 0x01]), vec![0; 2]].concat(),
                false,
            ),
        ] {
            let (result, peak) = crate::alloc_probe::peak_bytes(|| IndexRecord::decode(&bytes));
            println!(
                "hostile index record {name}: {} bytes, {} ({peak} bytes allocated at the peak)",
                bytes.len(),
                if result.is_ok() { "decoded" } else { "refused" },
            );
            assert_eq!(result.is_ok(), ok, "{name}: {result:?}");
            assert!(
                crate::fuzz_support::within_hostile_bound(bytes.len(), peak),
                "{name}: {peak} bytes"
            );
            assert!(check_record(&bytes).is_ok(), "{name}");
        }
    }

    #[test]
    fn garbage_record_is_an_error_not_a_panic() {
        for bytes in [
            &b"\xff\xff\xff"[..],
            b"\x0a\x05abc",
            b"",
            &[0x0a, 0x03, 1, 2, 3],
        ] {
            assert!(IndexRecord::decode(bytes).is_err(), "{bytes:?}");
        }
    }
}
