//! `--config FILE`: a gateway's settings in TOML, so a service runs with one
//! argument. A key is a flag's name without the dashes; flags on the command line
//! override the file. The shared key is never in it (use the key file or
//! `MULTIFEED_KEY`): config files get copied and shared, keys must not.
//!
//! ```toml
//! dir = "/var/lib/multifeed/site-a"   # relative paths: from the file's folder
//!
//! [serve]
//! listen = "0.0.0.0:7000"
//! peers = ["10.0.0.2:7000", "gw-b.local:7000"]
//! http = "127.0.0.1:8080"
//! max-peers = 64
//! timeout = 10
//! name = "site-a"
//! ```

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;
use serde::de::IgnoredAny;

/// The environment variable naming a config file when `--config` is not given.
pub const CONFIG_ENV: &str = "MULTIFEED_CONFIG";

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub dir: Option<PathBuf>,
    pub json: Option<bool>,
    pub verbose: Option<u8>,
    #[serde(default)]
    pub serve: ServeConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    /// Refused with its own words (see the module docs).
    key: Option<IgnoredAny>,
}

/// `[serve]`: the flags of `multifeed serve`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    pub listen: Option<String>,
    /// `--peer`, repeatable on the command line.
    #[serde(default, alias = "peer")]
    pub peers: Vec<String>,
    /// `--discover`, repeatable on the command line.
    #[serde(default)]
    pub discover: Vec<crate::DiscoverHow>,
    pub mdns_port: Option<u16>,
    pub http: Option<String>,
    pub max_peers: Option<usize>,
    pub timeout: Option<u64>,
    pub name: Option<String>,
    pub mqtt_listen: Option<String>,
    pub mqtt_allow_anonymous: Option<bool>,
    pub mqtt_linger_ms: Option<u64>,
    pub mqtt_batch_max: Option<usize>,
    pub mqtt_max_packet: Option<usize>,
    pub mqtt_max_clients: Option<usize>,
    pub mqtt_max_inflight: Option<u16>,
    pub mqtt_broker: Option<String>,
    /// `--mqtt-subscribe`, repeatable on the command line.
    #[serde(default, alias = "mqtt-subscribe")]
    pub mqtt_subscribes: Vec<String>,
    pub mqtt_username: Option<String>,
    pub mqtt_announce_topic: Option<String>,
    pub mqtt_timestamp_property: Option<String>,
    pub mqtt_ca_file: Option<std::path::PathBuf>,
    pub mqtt_client_cert: Option<std::path::PathBuf>,
    pub mqtt_client_key: Option<std::path::PathBuf>,
    pub mqtt_publish_remote: Option<String>,
    // The broker's password stays in MULTIFEED_MQTT_PASSWORD, like the key.
    pub max_offered_feeds: Option<NonZeroUsize>,
    pub max_unproven_feeds: Option<NonZeroUsize>,
    pub max_waiting_feeds: Option<NonZeroUsize>,
    pub group_max_unproven_feeds: Option<NonZeroUsize>,
}

/// The caps on peers' offers that `[serve]` and `[sync]` both take (see
/// `--max-offered-feeds`). Not flattened into them: serde's `flatten` would
/// turn off `deny_unknown_fields`, and a typo must stay an error.
#[derive(Debug, Default, Clone, Copy)]
pub struct CapConfig {
    pub max_offered_feeds: Option<NonZeroUsize>,
    pub max_unproven_feeds: Option<NonZeroUsize>,
    pub max_waiting_feeds: Option<NonZeroUsize>,
}

impl ServeConfig {
    pub fn caps(&self) -> CapConfig {
        CapConfig {
            max_offered_feeds: self.max_offered_feeds,
            max_unproven_feeds: self.max_unproven_feeds,
            max_waiting_feeds: self.max_waiting_feeds,
        }
    }
}

impl SyncConfig {
    pub fn caps(&self) -> CapConfig {
        CapConfig {
            max_offered_feeds: self.max_offered_feeds,
            max_unproven_feeds: self.max_unproven_feeds,
            max_waiting_feeds: self.max_waiting_feeds,
        }
    }
}

/// `[sync]`: the flags of `multifeed sync`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SyncConfig {
    pub timeout: Option<u64>,
    pub max_offered_feeds: Option<NonZeroUsize>,
    pub max_unproven_feeds: Option<NonZeroUsize>,
    pub max_waiting_feeds: Option<NonZeroUsize>,
}

/// Largest config file read (1 MiB); a real one is a few hundred bytes.
const MAX_CONFIG_FILE: u64 = 1 << 20;

impl ConfigFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = super::store::read_bounded(path, MAX_CONFIG_FILE, "a multifeed config file")
            .with_context(|| {
            format!(
                "cannot read the config file {}; check the path given to --config or {CONFIG_ENV}",
                path.display()
            )
        })?;
        let mut config = Self::parse(&text)
            .with_context(|| format!("the config file {} is not valid", path.display()))?;
        // Relative paths mean from the file's folder, wherever the command runs.
        let base = path.parent().unwrap_or(Path::new("."));
        let serve = &mut config.serve;
        for path in [
            &mut config.dir,
            &mut serve.mqtt_ca_file,
            &mut serve.mqtt_client_cert,
            &mut serve.mqtt_client_key,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        Ok(config)
    }

    fn parse(text: &str) -> Result<Self, InvalidConfig> {
        let config: Self = toml::from_str(text).map_err(|e| {
            InvalidConfig(format!(
                "{}; keys are the flags' names without dashes (see the README's example gateway config)",
                e.to_string().trim_end()
            ))
        })?;
        if config.key.is_some() {
            return Err(InvalidConfig(format!(
                "it holds `key`, and the shared key never goes in a config file; remove it and keep the key in the key file `<dir>.key` (written by init/join) or in {}",
                super::store::KEY_ENV
            )));
        }
        Ok(config)
    }
}

/// What is wrong with a config file's content (`--json` kind `invalid_config`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(String);

/// A flag's value when given, else the file's, else the default.
pub fn pick<T>(flag: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(file).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endless config file (a link to /dev/zero reports 0 bytes) is refused
    /// after its bound, not read until memory runs out.
    #[test]
    fn an_endless_config_file_is_refused_after_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("multifeed.toml");
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        let (result, peak) = crate::alloc_probe::peak_bytes(|| ConfigFile::load(&path));
        let error = format!("{:#}", result.unwrap_err());
        assert!(error.contains("not a multifeed config file"), "{error}");
        assert!(peak <= 4 * MAX_CONFIG_FILE as usize, "{peak} bytes");
    }

    #[test]
    fn the_readme_example_parses() {
        let text = r#"
            dir = "site-a"
            verbose = 1
            [serve]
            listen = "0.0.0.0:7000"
            peers = ["10.0.0.2:7000"]
            http = "127.0.0.1:8080"
            max-peers = 64
            timeout = 10
            [sync]
            timeout = 30
        "#;
        let config = ConfigFile::parse(text).unwrap();
        assert_eq!(config.serve.max_peers, Some(64));
        assert_eq!(config.serve.peers, ["10.0.0.2:7000"]);
        assert_eq!(config.sync.timeout, Some(30));
    }

    #[test]
    fn discovery_parses_and_an_unknown_way_is_refused() {
        let config =
            ConfigFile::parse("[serve]\ndiscover = [\"lan\"]\nmdns-port = 5454\n").unwrap();
        assert_eq!(config.serve.discover, [crate::DiscoverHow::Lan]);
        assert_eq!(config.serve.mdns_port, Some(5454));
        let refused = ConfigFile::parse("[serve]\ndiscover = [\"carrier-pigeon\"]\n").unwrap_err();
        assert!(
            format!("{refused:#}").contains("carrier-pigeon"),
            "{refused:#}"
        );
    }

    #[test]
    fn caps_parse_and_zero_is_refused() {
        let text = "[serve]\nmax-unproven-feeds = 8\ngroup-max-unproven-feeds = 64\n[sync]\nmax-offered-feeds = 2\n";
        let config = ConfigFile::parse(text).unwrap();
        assert_eq!(
            config.serve.caps().max_unproven_feeds.map(|n| n.get()),
            Some(8)
        );
        assert_eq!(
            config.serve.group_max_unproven_feeds.map(|n| n.get()),
            Some(64)
        );
        assert_eq!(
            config.sync.caps().max_offered_feeds.map(|n| n.get()),
            Some(2)
        );
        assert!(ConfigFile::parse("[sync]\nmax-waiting-feeds = 0\n").is_err());
        assert!(ConfigFile::parse("[sync]\nmax-waiting-feed = 3\n").is_err());
    }

    #[test]
    fn a_typo_names_the_key() {
        let error = ConfigFile::parse("[serve]\nmax-peer = 3\n").unwrap_err();
        assert!(format!("{error:#}").contains("max-peer"), "{error:#}");
    }

    #[test]
    fn the_key_is_refused() {
        let error = ConfigFile::parse(&format!("key = \"{}\"\n", "a".repeat(64))).unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("never goes in a config file"), "{text}");
        assert!(
            !text.contains(&"a".repeat(64)),
            "the key is not echoed: {text}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        assert_eq!(pick(Some(1), Some(2), 3), 1);
        assert_eq!(pick(None, Some(2), 3), 2);
        assert_eq!(pick(None, None, 3), 3);
    }
}
