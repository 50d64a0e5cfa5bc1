//! A group written by an earlier build (`fixtures/store-v1`, see `fixtures/README.md`)
//! still opens exactly as it was: the same members, names, lengths and messages,
//! every signature and Merkle proof valid, and its local writer still writable. A
//! change to the on-disk layout, the index records or the topic block encoding that
//! breaks existing stores fails here.

use std::path::{Path, PathBuf};

use multifeed::{
    FeedKey, Multifeed, Options, SharedKey, StorageConfig, Topics,
    topics::{Cursor, Message},
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/store-v1")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A scratch copy of gateway A's store (opening must not need write access to
/// the fixture, and the test appends to the copy).
fn gateway_a() -> (tempfile::TempDir, PathBuf, SharedKey) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("gateway-a");
    copy_dir(&fixture().join("gateway-a"), &dir);
    let key = std::fs::read_to_string(fixture().join("gateway-a.key")).unwrap();
    let key = SharedKey::from_hex(key.trim()).unwrap();
    (scratch, dir, key)
}

async fn open(dir: &Path, key: &SharedKey) -> Multifeed {
    Multifeed::open(StorageConfig::dir(dir), key.clone(), Options::default())
        .await
        .expect("the v1 store opens")
}

async fn payloads(topics: &Topics, topic: &str) -> Vec<String> {
    let (messages, _) = topics.read(topic, &Cursor::default(), 100).await.unwrap();
    let stamps: Vec<u64> = messages.iter().map(|m| m.message.timestamp_ms).collect();
    assert!(stamps.is_sorted(), "merged by timestamp: {stamps:?}");
    messages
        .into_iter()
        .map(|m| String::from_utf8(m.message.payload).unwrap())
        .collect()
}

fn key(hex: &str) -> FeedKey {
    FeedKey::from_hex(hex).unwrap()
}

const LOCAL_TEMP: &str = "9cd5721e282e3468a90550d04d33a293264124db8362f8a7f42b665cb1df6b76";
const REMOTE_TEMP: &str = "43a93a2acd08737915d2cec15f6f5d6d67581e814c2118a452aa52ab35934b83";
const REMOTE_HUMIDITY: &str = "ac7ab10c8abaa0d617583fb27ca669e8a36efec2ae853267f856d595d6b88ce3";

#[tokio::test]
async fn a_v1_store_reopens_as_it_was_and_stays_writable() {
    let (_scratch, dir, shared) = gateway_a();
    let group = open(&dir, &shared).await;
    assert!(group.skipped().is_empty(), "{:?}", group.skipped());

    let mut members: Vec<(FeedKey, Option<String>, bool, u64)> = Vec::new();
    for feed in group.feeds() {
        members.push((
            feed.key(),
            feed.name().map(str::to_owned),
            feed.is_local(),
            feed.len().await,
        ));
    }
    members.sort();
    let mut expected = vec![
        (key(LOCAL_TEMP), Some("topic/temp".to_string()), true, 3),
        (key(REMOTE_TEMP), None, false, 1),
        (key(REMOTE_HUMIDITY), None, false, 1),
    ];
    expected.sort();
    assert_eq!(members, expected);

    let report = group.verify().await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.feeds.iter().map(|f| f.checked).sum::<u64>(), 5);

    let topics = Topics::new(group.clone());
    assert_eq!(
        payloads(&topics, "temp").await,
        ["a-1 21.5", "a-2 21.7", "a-3 21.9", "b-1 18.0"]
    );
    assert_eq!(payloads(&topics, "humidity").await, ["b-2 55%"]);

    // The writer's secret key came back from the index: it can still append.
    topics
        .publish(Message::new("temp", "a-4 22.0"))
        .await
        .unwrap();
    group.close().await.unwrap();

    let group = open(&dir, &shared).await;
    let topics = Topics::new(group.clone());
    let temp = payloads(&topics, "temp").await;
    assert_eq!(temp.len(), 5);
    assert_eq!(temp.last().map(String::as_str), Some("a-4 22.0"));
    assert_eq!(group.feed(key(LOCAL_TEMP)).unwrap().len().await, 4);
    assert!(group.verify().await.unwrap().is_ok());
    group.close().await.unwrap();
}

/// The command-line tool reads the same store through its key file and group id.
#[test]
fn the_cli_lists_a_v1_store() {
    let (_scratch, dir, shared) = gateway_a();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_multifeed"))
        .args(["--dir", dir.to_str().unwrap(), "--key", &shared.to_hex()])
        .args(["--json", "feeds"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed = String::from_utf8(output.stdout).unwrap();
    for hex in [LOCAL_TEMP, REMOTE_TEMP, REMOTE_HUMIDITY] {
        assert!(listed.contains(hex), "{hex} missing from {listed}");
    }
    assert_eq!(listed.lines().count(), 3, "{listed}");
}
