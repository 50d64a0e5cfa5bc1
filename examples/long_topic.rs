//! Fills a topic of an existing store with one message per block, quickly: the
//! long feeds the crash loop (`scripts/crash-loop.sh`) needs, past the 32,768
//! blocks of one bitfield page. Through `multifeed write` that many blocks would
//! take as many separate appends, since stdin lines that arrive together share
//! a block.
//!
//! `cargo run --release --example long_topic -- DIR KEY_HEX TOPIC COUNT`
//! (the store must not be in use; messages are `TOPIC-0`, `TOPIC-1`, ...).

use multifeed::{
    Multifeed, Options, SharedKey, StorageConfig, Topics,
    topics::{Message, Packing},
};

/// Messages per signed append (each still its own block).
const PER_CALL: u64 = 1000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, key, topic, count] = args.as_slice() else {
        return Err("usage: long_topic DIR KEY_HEX TOPIC COUNT".into());
    };
    let count: u64 = count.parse()?;
    let key = SharedKey::from_hex(key.trim())?;
    let group = Multifeed::open(StorageConfig::dir(dir), key, Options::default()).await?;
    let topics = Topics::new(group.clone());
    let mut next = 0;
    while next < count {
        let end = (next + PER_CALL).min(count);
        let batch: Vec<Message> = (next..end)
            .map(|i| Message::new(topic.as_str(), format!("{topic}-{i}")))
            .collect();
        topics
            .publish_batch_with(batch, Packing::one_per_block())
            .await?;
        next = end;
    }
    group.close().await?;
    println!("{count} messages in topic {topic}, one per block");
    Ok(())
}
