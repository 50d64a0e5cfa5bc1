//! The `multifeed` command-line tool: a sensor gateway's view of a group.
//!
//! Every command works on one storage directory (`--dir`) under one shared key
//! (`--key`, `MULTIFEED_KEY`, or the key file `init`/`join` wrote next to the
//! directory). Errors end with one line saying what happened and what to do, and a
//! non-zero exit; everything already written stays.

// The library's test-only allocator probe and fuzz support, for the binary's own
// decoders (MQTT packets); the same files, not copies.
#[cfg(test)]
#[path = "alloc_probe.rs"]
mod alloc_probe;
mod cli;
#[cfg(test)]
#[path = "fuzz_support.rs"]
#[allow(dead_code)] // the binary's tests use part of it
mod fuzz_support;
mod node;

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf};

use clap::{ArgAction, Parser, Subcommand};
use cli::config::pick;

#[derive(Parser)]
#[command(
    name = "multifeed",
    version,
    about = "Gateways that publish to topics, sync with each other and read a merged view",
    after_help = "Start with `multifeed demo`. Logs: -v, -vv or RUST_LOG."
)]
struct Cli {
    /// Read settings from this TOML file (flags override it); see the README's example.
    #[arg(long, global = true, value_name = "FILE", env = cli::config::CONFIG_ENV)]
    config: Option<PathBuf>,
    /// The group's storage directory [default: the per-user data directory, e.g. ~/.local/share/multifeed].
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// The group's shared key (64 hex characters). Overrides MULTIFEED_KEY and the key file `<DIR>.key`.
    #[arg(long, global = true, value_name = "HEX")]
    key: Option<String>,
    /// Print JSON lines instead of text (read, topics, feeds, sync, serve, verify, init).
    #[arg(long, global = true)]
    json: bool,
    /// More logs on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run: the size of `Serve` costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Start a new group: generate a shared key, write the key file and print the key.
    Init,
    /// Join an existing group with its shared key (as printed by `init` elsewhere).
    Join {
        /// The group's shared key (64 hex characters).
        key: String,
    },
    /// Publish to a topic: the message given, or one message per line of stdin.
    Write {
        /// The topic, e.g. `temperature`.
        topic: String,
        /// The message; without it, every non-empty line of stdin is a message.
        message: Option<String>,
        /// Content type recorded with each message (e.g. application/json).
        #[arg(long)]
        content_type: Option<String>,
        /// Print nothing (by default each message's address is printed).
        #[arg(short, long)]
        quiet: bool,
        /// The readings' time instead of now: RFC 3339 (2026-12-01T08:00:00Z, or with
        /// milliseconds) or milliseconds since the Unix epoch.
        #[arg(long, value_name = "TIME", value_parser = parse_timestamp)]
        timestamp: Option<u64>,
        /// How stdin holds messages: `lines` (one text message per line) or
        /// `ndjson` (one JSON object per line, binary-safe, as `read --json` prints).
        #[arg(long, value_enum, default_value_t)]
        format: cli::commands::StdinFormat,
    },
    /// Print a topic's messages merged by time from every gateway, then the cursor (on stderr).
    Read {
        /// The topic.
        topic: String,
        /// Resume after the messages a previous read returned (its printed cursor).
        #[arg(long, value_name = "CURSOR", conflicts_with = "tail")]
        from: Option<String>,
        /// Start at the last N messages of each gateway (0: only new ones with --follow).
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Print at most this many messages.
        #[arg(long)]
        limit: Option<usize>,
        /// Keep printing messages as they arrive (until Ctrl-C).
        #[arg(short, long)]
        follow: bool,
        /// With --follow: also replicate live with the peer at this address meanwhile.
        #[arg(long, value_name = "ADDR", requires = "follow")]
        peer: Option<String>,
    },
    /// List the topics this gateway holds messages of.
    Topics,
    /// List the member feeds: key, local name, local or remote, length, bytes.
    Feeds,
    /// Run the gateway node until Ctrl-C or SIGTERM: accept peers, dial peers and
    /// keep dialing, replicate live with all of them, and answer local clients over HTTP.
    Serve {
        /// Accept peers on this address, e.g. 0.0.0.0:7000 (port 0: any free port).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Dial this peer (a running `multifeed serve --listen`) and keep dialing after
        /// every loss, with backoff. Repeatable.
        #[arg(long = "peer", value_name = "ADDR")]
        peers: Vec<String>,
        /// Find the group's peers by the shared key alone and dial them: `lan` announces
        /// this node (its --listen port) over mDNS and looks for the others on the local
        /// network; `dht` announces and looks up the group's topic on the Hyperswarm
        /// DHT (needs --bootstrap, or --dht-public). Repeatable.
        #[arg(long, value_enum, value_name = "HOW")]
        discover: Vec<DiscoverHow>,
        /// The UDP port of mDNS for --discover lan [default: 5353]; another port keeps a
        /// set of nodes apart from the LAN's mDNS (all of them must use the same).
        #[arg(long, value_name = "PORT")]
        mdns_port: Option<u16>,
        /// Serve the HTTP API here, e.g. 127.0.0.1:8080. Off loopback it requires the
        /// group's token (the file `<DIR>.token` written by init/join).
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
        /// Most peers accepted at once [default: 256].
        #[arg(long, value_name = "N")]
        max_peers: Option<usize>,
        /// Seconds allowed to connect to a peer and to complete a handshake [default: 10].
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// This gateway's name, shown with its messages everywhere they replicate
        /// (kept in the store) [default: the host name].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        #[command(flatten)]
        mqtt: MqttFlags,
        #[command(flatten)]
        caps: CapFlags,
        #[arg(long, value_name = "N", help = cap_help(GROUP_CAP_HELP, node::AdmissionCaps::default().group_max_unproven_feeds))]
        group_max_unproven_feeds: Option<NonZeroUsize>,
        #[command(flatten)]
        discovery: DiscoveryFlags,
    },
    /// Replicate with a peer: once (default) or live until Ctrl-C.
    Sync {
        /// The peer's address (a running `multifeed serve`), e.g. 10.0.0.2:7000.
        addr: String,
        /// Keep replicating new data until Ctrl-C.
        #[arg(long)]
        live: bool,
        /// Seconds allowed to connect and complete the handshake [default: 10].
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        #[command(flatten)]
        caps: CapFlags,
    },
    /// Re-check every feed's Merkle tree and signatures; report damage.
    Verify,
    /// Rebuild a lost or damaged index from the feed directories: every feed
    /// directory the index does not list is taken back, writers under their
    /// names. Deletes nothing (a damaged index/ is kept beside the new one).
    Repair,
    /// Three gateway nodes on loopback publish sensor readings while they replicate
    /// live, then show the merged view and their peers.
    Demo {
        /// Directory for the demo's gateways (default: a temporary directory, removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the nodes running with their web pages until Ctrl-C.
        #[arg(long)]
        stay: bool,
    },
}

/// `serve`'s discovery flags.
#[derive(Debug, clap::Args)]
struct DiscoveryFlags {
    /// A DHT node to join through, HOST:PORT (one you run, or one you trust).
    /// Repeatable.
    #[arg(long = "bootstrap", value_name = "HOST:PORT")]
    bootstrap: Vec<String>,
    /// Join the public Hyperswarm DHT through its bootstrap nodes (node1..3.hyperdht.org).
    #[arg(long)]
    dht_public: bool,
    /// The DHT's local UDP address [default: 0.0.0.0:0].
    #[arg(long, value_name = "ADDR")]
    dht_bind: Option<String>,
}

impl DiscoveryFlags {
    #[cfg(feature = "dht")]
    async fn dht(
        &self,
        discover: &[DiscoverHow],
        max_peers: usize,
    ) -> anyhow::Result<Option<node::dht::DhtConfig>> {
        if !discover.contains(&DiscoverHow::Dht) {
            if !self.bootstrap.is_empty() || self.dht_public || self.dht_bind.is_some() {
                anyhow::bail!(
                    "--bootstrap, --dht-public and --dht-bind are for the DHT: add --discover dht"
                );
            }
            return Ok(None);
        }
        let config = node::dht::DhtConfig::new(
            &self.bootstrap,
            self.dht_public,
            self.dht_bind.as_deref(),
            max_peers,
        )
        .await?;
        Ok(Some(config))
    }

    #[cfg(not(feature = "dht"))]
    fn refuse_dht(&self, discover: &[DiscoverHow]) -> anyhow::Result<()> {
        if discover.contains(&DiscoverHow::Dht) {
            anyhow::bail!(
                "this multifeed was built without DHT support; build it with `cargo build --release --features dht`"
            );
        }
        Ok(())
    }
}

/// Global options every command gets.
pub struct Global {
    pub dir: Option<PathBuf>,
    pub key: Option<String>,
    pub json: bool,
}

fn init_logs(verbose: u8) {
    // The hypercore crates log an ERROR for every ordinary disconnect; we report
    // what matters ourselves. RUST_LOG overrides this.
    // The DHT crates (`--discover dht`) log every lost packet and trace their framing
    // at INFO; the node says what matters.
    let default = match verbose {
        0 => {
            "warn,hypercore=off,hypercore_protocol=off,hypercore_handshake=off,dht_rpc=off,hyperdht=off,hyperswarm=off,udx=off,uint24le_framing=off"
        }
        1 => {
            "info,hypercore=off,hypercore_protocol=off,hypercore_handshake=off,dht_rpc=off,hyperdht=off,hyperswarm=off,udx=off,uint24le_framing=off"
        }
        2 => {
            "debug,hypercore=info,hypercore_protocol=info,hypercore_handshake=info,dht_rpc=info,hyperdht=info,hyperswarm=info,udx=info,uint24le_framing=warn"
        }
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a pipe or a log file.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let config = match cli.config.as_deref().map(cli::config::ConfigFile::load) {
        None => cli::config::ConfigFile::default(),
        Some(Ok(config)) => config,
        Some(Err(e)) => exit_with(cli.json, &e),
    };
    init_logs(cli.verbose.max(config.verbose.unwrap_or(0)));
    let global = Global {
        dir: cli.dir.or(config.dir),
        key: cli.key,
        json: cli.json || config.json.unwrap_or(false),
    };
    let result = match cli.command {
        Command::Init => cli::commands::init(&global).await,
        Command::Join { key } => cli::commands::join(&global, &key).await,
        Command::Write {
            topic,
            message,
            content_type,
            quiet,
            timestamp,
            format,
        } => {
            let options = cli::commands::WriteOptions {
                content_type,
                quiet,
                timestamp_ms: timestamp,
                format,
            };
            cli::commands::write(&global, &topic, message, options).await
        }
        Command::Read {
            topic,
            from,
            tail,
            limit,
            follow,
            peer,
        } => cli::commands::read(&global, &topic, from, tail, limit, follow, peer).await,
        Command::Topics => cli::commands::topics(&global).await,
        Command::Feeds => cli::commands::feeds(&global).await,
        Command::Serve {
            listen,
            peers,
            discover,
            mdns_port,
            http,
            max_peers,
            timeout,
            name,
            mqtt,
            caps,
            group_max_unproven_feeds,
            discovery,
        } => {
            let file = config.serve;
            let mqtt = mqtt.config(&file);
            let caps = node::AdmissionCaps {
                group_max_unproven_feeds: pick_cap(
                    group_max_unproven_feeds,
                    file.group_max_unproven_feeds,
                    node::AdmissionCaps::default().group_max_unproven_feeds,
                ),
                ..caps.caps(file.caps())
            };
            let discover = if discover.is_empty() {
                file.discover
            } else {
                discover
            };
            let max_peers = pick(max_peers, file.max_peers, 256);
            #[cfg(feature = "dht")]
            let dht = match discovery.dht(&discover, max_peers).await {
                Ok(dht) => dht,
                Err(e) => exit_with(global.json, &e),
            };
            #[cfg(not(feature = "dht"))]
            if let Err(e) = discovery.refuse_dht(&discover) {
                exit_with(global.json, &e);
            }
            let lan =
                discover
                    .contains(&DiscoverHow::Lan)
                    .then(|| node::discovery::lan::LanConfig {
                        mdns_port: pick(mdns_port, file.mdns_port, node::discovery::lan::MDNS_PORT),
                    });
            let node = node::NodeConfig {
                listen: listen.or(file.listen),
                peers: if peers.is_empty() { file.peers } else { peers },
                lan,
                http: http.or(file.http),
                token: None,
                max_peers,
                timeout: std::time::Duration::from_secs(pick(timeout, file.timeout, 10)),
                json: global.json,
                quiet: false,
                name: name.or(file.name),
                mqtt,
                caps,
                #[cfg(feature = "dht")]
                dht,
            };
            cli::net::serve(&global, node).await
        }
        Command::Sync {
            addr,
            live,
            timeout,
            caps,
        } => {
            let timeout = pick(timeout, config.sync.timeout, 10);
            let caps = caps.caps(config.sync.caps());
            cli::net::sync(&global, &addr, live, timeout, &caps).await
        }
        Command::Verify => cli::commands::verify(&global).await,
        Command::Repair => cli::commands::repair(&global).await,
        Command::Demo { dir, stay } => cli::demo::run(dir, stay).await,
    };
    if let Err(e) = result {
        if let Some(interrupted) = e.downcast_ref::<cli::signal::Interrupted>() {
            eprintln!("{interrupted}");
            std::process::exit(interrupted.signal.exit_code());
        }
        exit_with(global.json, &e);
    }
}

/// Says what went wrong (one line, or one JSON object with `--json`) and exits 1.
fn exit_with(json: bool, e: &anyhow::Error) -> ! {
    if json {
        eprintln!(
            "{}",
            serde_json::json!({"error": {"kind": error_kind(e), "message": error_text(e)}})
        );
    } else {
        eprintln!("error: {}", error_text(e));
    }
    std::process::exit(1);
}

/// The kind of a command's error for `--json`: the library's code when it came
/// from the library, else what the CLI knows of it.
fn error_kind(error: &anyhow::Error) -> &'static str {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<multifeed::Error>() {
            return e.code();
        }
        if let Some(failed) = cause.downcast_ref::<cli::net::SyncFailed>() {
            return failed.error.code();
        }
        if cause.is::<cli::config::InvalidConfig>() {
            return "invalid_config";
        }
        if cause.is::<cli::store::InUse>() {
            return "store_in_use";
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return match e.kind() {
                ConnectionRefused | TimedOut | HostUnreachable | NetworkUnreachable => {
                    "unreachable"
                }
                _ => "io",
            };
        }
    }
    "error"
}

/// An error and its causes on one line, each said once: our errors already
/// include their cause's text, which `{:#}` would repeat.
fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// `--timestamp`: RFC 3339 or milliseconds since the Unix epoch.
pub(crate) fn parse_timestamp(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|e| {
        format!("{e}; give RFC 3339 (2026-12-01T08:00:00Z) or milliseconds since 1970")
    })?;
    time.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| "a time before 1970 cannot be a reading's time".into())
}

/// Parses `host:port`, resolving names.
pub async fn resolve_addr(addr: &str) -> anyhow::Result<SocketAddr> {
    use anyhow::Context;
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| {
            format!("cannot resolve the address {addr:?}; expected HOST:PORT, e.g. 127.0.0.1:7000")
        })?
        .next()
        .with_context(|| format!("the address {addr:?} resolves to nothing; expected HOST:PORT"))
}

/// `serve`'s and `sync`'s caps on what a peer's offer of feeds may cost.
#[derive(clap::Args, Debug)]
struct CapFlags {
    #[arg(long, value_name = "N", help = cap_help(OFFERED_HELP, node::AdmissionCaps::default().max_offered_feeds))]
    max_offered_feeds: Option<NonZeroUsize>,
    #[arg(long, value_name = "N", help = cap_help(UNPROVEN_HELP, node::AdmissionCaps::default().max_unproven_feeds))]
    max_unproven_feeds: Option<NonZeroUsize>,
    #[arg(long, value_name = "N", help = cap_help(WAITING_HELP, node::AdmissionCaps::default().max_waiting_feeds))]
    max_waiting_feeds: Option<NonZeroUsize>,
}

const OFFERED_HELP: &str =
    "Most feeds one peer may offer; a peer offering more is refused as faulty";
const UNPROVEN_HELP: &str = "Most feeds new to us that one peer's offer may have on trial at once (requested, nothing verified yet); also what a session may give up on before it ends, and, with --listen, what one source address may hold";
const WAITING_HELP: &str = "Most offered feeds new to us requested and waiting for a place on trial, per session; the rest of the offer is requested as places free up";
const GROUP_CAP_HELP: &str =
    "Most feeds on trial at once over all sessions of the group; a session that would pass it ends";

/// A cap's help with the library's default, so the text cannot fall behind it.
fn cap_help(text: &str, default: usize) -> String {
    format!("{text} [default: {default}]")
}

/// A cap's flag when given, else the file's, else the library's default.
/// A way of finding peers (`serve --discover`).
#[derive(clap::ValueEnum, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DiscoverHow {
    /// mDNS/DNS-SD on the local network.
    Lan,
    /// The Hyperswarm DHT (a build with the cargo feature `dht`; needs --bootstrap,
    /// or --dht-public).
    Dht,
}

fn pick_cap(flag: Option<NonZeroUsize>, file: Option<NonZeroUsize>, default: usize) -> usize {
    flag.or(file).map_or(default, NonZeroUsize::get)
}

impl CapFlags {
    fn caps(self, file: cli::config::CapConfig) -> node::AdmissionCaps {
        let default = node::AdmissionCaps::default();
        node::AdmissionCaps {
            max_offered_feeds: pick_cap(
                self.max_offered_feeds,
                file.max_offered_feeds,
                default.max_offered_feeds,
            ),
            max_unproven_feeds: pick_cap(
                self.max_unproven_feeds,
                file.max_unproven_feeds,
                default.max_unproven_feeds,
            ),
            max_waiting_feeds: pick_cap(
                self.max_waiting_feeds,
                file.max_waiting_feeds,
                default.max_waiting_feeds,
            ),
            ..default
        }
    }
}

/// `serve`'s MQTT ingest flags.
#[derive(clap::Args, Debug)]
struct MqttFlags {
    /// Accept MQTT 3.1.1 and 5 clients here; their publishes land in the topic of
    /// the same name, and a QoS 1 publish is acknowledged only once appended.
    /// Without a value: 127.0.0.1:1883.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:1883")]
    mqtt_listen: Option<String>,
    /// Accept MQTT clients on an address other than loopback, although the listener
    /// has no authentication (only on a trusted network).
    #[arg(long)]
    mqtt_allow_anonymous: bool,
    /// Milliseconds the first MQTT message of a batch waits for more to share its
    /// append (0: only those that arrive while an append runs) [default: 0].
    #[arg(long, value_name = "MS")]
    mqtt_linger_ms: Option<u64>,
    /// Most MQTT messages appended at once [default: 4096].
    #[arg(long, value_name = "N")]
    mqtt_batch_max: Option<usize>,
    /// Largest MQTT packet accepted, in bytes; a client sending a larger one is
    /// disconnected [default: 262144].
    #[arg(long, value_name = "BYTES")]
    mqtt_max_packet: Option<usize>,
    /// Most MQTT clients connected at once [default: 1024].
    #[arg(long, value_name = "N")]
    mqtt_max_clients: Option<usize>,
    /// Most QoS 1 publishes of one client awaiting their PUBACK [default: 256].
    #[arg(long, value_name = "N")]
    mqtt_max_inflight: Option<u16>,
    /// Mirror from this MQTT broker, e.g. mqtt://127.0.0.1:1883 (mqtts:// for TLS): the node keeps a
    /// persistent session there and acknowledges each message only once appended.
    #[arg(long, value_name = "URL")]
    mqtt_broker: Option<String>,
    /// A topic filter to mirror from the broker (wildcards allowed). Repeatable.
    /// Filters announced to the group are mirrored as well.
    #[arg(long = "mqtt-subscribe", value_name = "FILTER")]
    mqtt_subscribe: Vec<String>,
    /// The topic where publishing a filter (e.g. `alerts/#`) makes every gateway
    /// of the group mirror it from its broker [default: multifeed/announce].
    #[arg(long, value_name = "TOPIC")]
    mqtt_announce_topic: Option<String>,
    /// Publish the messages other gateways wrote, as they arrive by replication,
    /// under PREFIX/<gateway>/<topic>: to the broker (QoS 1) and to this node's
    /// MQTT clients that subscribe (QoS 0). Nothing under PREFIX is mirrored.
    #[arg(long, value_name = "PREFIX")]
    mqtt_publish_remote: Option<String>,
    /// Take a message's time from this MQTT 5 user property (RFC 3339 or
    /// milliseconds since 1970) when it has one, instead of the time it arrived;
    /// a value that is no time gets the publish refused.
    #[arg(long, value_name = "NAME")]
    mqtt_timestamp_property: Option<String>,
    /// For an mqtts:// broker: the CA certificates (PEM) to trust instead of the
    /// system's.
    #[arg(long, value_name = "PEM")]
    mqtt_ca_file: Option<std::path::PathBuf>,
    /// For an mqtts:// broker that asks for one: this node's certificate chain (PEM);
    /// with --mqtt-client-key.
    #[arg(long, value_name = "PEM", requires = "mqtt_client_key")]
    mqtt_client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --mqtt-client-cert.
    #[arg(long, value_name = "PEM", requires = "mqtt_client_cert")]
    mqtt_client_key: Option<std::path::PathBuf>,
    /// User name for the broker.
    #[arg(long, value_name = "NAME", env = "MULTIFEED_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// Password for the broker (better given in the environment).
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "MULTIFEED_MQTT_PASSWORD",
        hide_env_values = true
    )]
    mqtt_password: Option<String>,
}

impl MqttFlags {
    /// The flags over the config file's `[serve]` keys of the same names.
    fn config(self, file: &cli::config::ServeConfig) -> node::mqtt::MqttConfig {
        let mut config = node::mqtt::MqttConfig {
            listen: self.mqtt_listen.or(file.mqtt_listen.clone()),
            allow_anonymous: self.mqtt_allow_anonymous
                || file.mqtt_allow_anonymous.unwrap_or(false),
            announce_topic: self
                .mqtt_announce_topic
                .or(file.mqtt_announce_topic.clone())
                .unwrap_or_default(),
            publish_remote: self
                .mqtt_publish_remote
                .or(file.mqtt_publish_remote.clone()),
            timestamp_property: self
                .mqtt_timestamp_property
                .or(file.mqtt_timestamp_property.clone()),
            ..Default::default()
        };
        // The defaults are those of `Batching` and `Limits`, held in one place.
        let (batching, limits) = (config.batching, config.limits);
        config.batching.linger = pick(
            self.mqtt_linger_ms.map(std::time::Duration::from_millis),
            file.mqtt_linger_ms.map(std::time::Duration::from_millis),
            batching.linger,
        );
        config.batching.max_messages = pick(
            self.mqtt_batch_max,
            file.mqtt_batch_max,
            batching.max_messages,
        )
        .max(1);
        // A payload larger than a message may be could never be appended.
        config.limits.max_packet = pick(
            self.mqtt_max_packet,
            file.mqtt_max_packet,
            limits.max_packet,
        )
        .clamp(1024, multifeed::topics::MAX_PAYLOAD_LEN + 64 * 1024);
        config.limits.max_clients = pick(
            self.mqtt_max_clients,
            file.mqtt_max_clients,
            limits.max_clients,
        )
        .max(1);
        config.limits.max_inflight = pick(
            self.mqtt_max_inflight,
            file.mqtt_max_inflight,
            limits.max_inflight,
        )
        .max(1);
        let filters = if self.mqtt_subscribe.is_empty() {
            file.mqtt_subscribes.clone()
        } else {
            self.mqtt_subscribe
        };
        config.broker = self.mqtt_broker.or(file.mqtt_broker.clone()).map(|url| {
            node::mqtt::broker::BrokerConfig {
                url,
                filters,
                username: self.mqtt_username.or(file.mqtt_username.clone()),
                password: self.mqtt_password,
                // Filled in from the store when the node starts.
                client_id: String::new(),
                max_packet: config.limits.max_packet,
                ca_file: self.mqtt_ca_file.or(file.mqtt_ca_file.clone()),
                client_cert: self.mqtt_client_cert.zip(self.mqtt_client_key).or(file
                    .mqtt_client_cert
                    .clone()
                    .zip(file.mqtt_client_key.clone())),
            }
        });
        config
    }
}
