//! Where a gateway's group lives, its shared key, and opening it safely.
//!
//! - The storage directory (`--dir`, default: the per-user data directory).
//! - The shared key: `--key`, else `MULTIFEED_KEY`, else the key file `<dir>.key`,
//!   a sibling of the storage directory written by `init`/`join` with mode 0600.
//!   The store itself never holds the key.
//! - `<dir>/group-id`: the group's public fingerprint (the hypercore discovery key
//!   of the shared key, which every peer sees on the wire anyway), so a wrong key
//!   is refused before anything is written.
//! - `<dir>/LOCK`: an exclusive lock held while a command has the group open for
//!   writing. `read`, `feeds`, `topics` and `verify` on a store this process cannot
//!   write (a read-only mount, permissions, immutable files) open it read-only
//!   under a shared lock instead: readers coexist, and a writer is refused while
//!   any runs (and they while a writer runs), so nobody reads a store half-written.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use fs4::fs_std::FileExt;
use multifeed::{Multifeed, Options, SharedKey, SkipKind, StorageConfig, Topics};

use super::{
    output,
    remote::{self, NodeApi},
    report::tell,
};
use crate::Global;
use crate::node::AdmissionCaps;

/// Opens the group of the global options.
pub async fn open(global: &Global) -> anyhow::Result<Store> {
    open_as(global, None, &AdmissionCaps::default()).await
}

/// What a command does with the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// It may change the store: opened for writing or not at all.
    Write,
    /// It only reads: a store this process cannot write is opened read-only.
    Read,
}

/// Opens the group of the global options for a command that only reads: for
/// writing if it can be written (as every command did before), else read-only
/// under a shared lock, with one line on stderr saying so and why.
pub async fn open_for_reading(global: &Global) -> anyhow::Result<Store> {
    let dir = resolve_dir(global.dir.as_deref())?;
    let why = match open(global).await {
        Ok(store) => match store.access_refused_member() {
            // A member whose files refused writing: read-only, everything reads.
            Some(why) => {
                store.close().await?;
                why
            }
            None => return Ok(store),
        },
        Err(error) => match access_refused(&error) {
            Some(why) => why,
            None => return Err(error),
        },
    };
    let (key, source) = resolve_key(global.key.as_deref(), &dir)?;
    let store = Store::open_read_only(&dir, key, source).await?;
    tell!(
        "note: the store at {} cannot be written here ({why}), so it is opened read-only and writes are disabled",
        dir.display()
    );
    Ok(store)
}

/// How the OS refused access, if `error` comes from such a refusal (permissions,
/// an immutable file, a read-only mount) rather than from damage or a bad key.
pub fn access_refused(error: &anyhow::Error) -> Option<&'static str> {
    error.chain().find_map(|cause| {
        let kind = if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            e.kind()
        } else if let Some(multifeed::Error::Io { source, .. }) =
            cause.downcast_ref::<multifeed::Error>()
        {
            source.kind()
        } else {
            return None;
        };
        refusal_words(kind)
    })
}

fn refusal_words(kind: std::io::ErrorKind) -> Option<&'static str> {
    match kind {
        std::io::ErrorKind::ReadOnlyFilesystem => Some("read-only file system"),
        std::io::ErrorKind::PermissionDenied => {
            Some("permission denied: file permissions or an immutable file")
        }
        _ => None,
    }
}

/// The store cannot be written: opening it for a command that changes it failed
/// because the OS refused (not because anything is damaged).
#[derive(Debug)]
pub struct NotWritable {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl std::fmt::Display for NotWritable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what_to_do = if self.source.kind() == std::io::ErrorKind::ReadOnlyFilesystem {
            "remount it read-write or copy it to a writable place"
        } else {
            "check the owner and permissions of its files and that none is immutable (lsattr shows an 'i'; chattr -i clears it)"
        };
        write!(
            f,
            "the store at {} cannot be written ({} on {}); this command changes the store, so {what_to_do}. Nothing is damaged: read, feeds, topics and verify work on it as it is",
            self.dir.display(),
            refusal_words(self.source.kind()).unwrap_or("refused"),
            self.path.display(),
        )
    }
}

impl std::error::Error for NotWritable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// [`open`], renaming the gateway to `name` when given, with the group's cap
/// of `caps`.
pub async fn open_as(
    global: &Global,
    name: Option<&str>,
    caps: &AdmissionCaps,
) -> anyhow::Result<Store> {
    let dir = resolve_dir(global.dir.as_deref())?;
    let (key, source) = resolve_key(global.key.as_deref(), &dir)?;
    if source == KeySource::File && !is_group_dir(&dir) {
        bail!(
            "no group at {} although its key file exists; run `multifeed join <key>` to set it up again",
            dir.display()
        );
    }
    // Only init/join create a store: a mistyped --dir with a key at hand must not
    // quietly start an empty group that reads as "no messages".
    if !is_group_dir(&dir) {
        bail!(
            "no multifeed store at {}; run `multifeed init` to start a group there or `multifeed join <key>` to join one, or check --dir",
            dir.display()
        );
    }
    Store::open_as(&dir, key, source, name, caps).await
}

/// Environment variable holding the shared key.
pub const KEY_ENV: &str = "MULTIFEED_KEY";
const GROUP_ID_FILE: &str = "group-id";
const LOCK_FILE: &str = "LOCK";

/// Where the key given to a command came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Flag,
    Env,
    File,
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySource::Flag => "--key",
            KeySource::Env => KEY_ENV,
            KeySource::File => "the key file",
        })
    }
}

/// The storage directory: `--dir` or `<data dir>/multifeed`.
pub fn resolve_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => dirs::data_dir()
            .context("no per-user data directory on this system; pass --dir DIR")?
            .join("multifeed"),
    };
    std::path::absolute(&dir)
        .with_context(|| format!("cannot resolve the directory {}", dir.display()))
}

/// The key file of a storage directory: `<dir>.key`, next to it (never inside).
pub fn key_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let name = dir.file_name().with_context(|| {
        format!(
            "{} cannot hold a group (no directory name); pass another --dir",
            dir.display()
        )
    })?;
    let mut name = name.to_os_string();
    name.push(".key");
    Ok(dir.with_file_name(name))
}

fn parse_key(text: &str, source: KeySource) -> anyhow::Result<SharedKey> {
    SharedKey::from_hex(text.trim()).map_err(|_| {
        anyhow::anyhow!(
            "malformed shared key from {source}: expected 64 hex characters as printed by `multifeed init`"
        )
    })
}

/// The shared key: `--key`, else `MULTIFEED_KEY`, else the key file.
pub fn resolve_key(flag: Option<&str>, dir: &Path) -> anyhow::Result<(SharedKey, KeySource)> {
    if let Some(text) = flag {
        return Ok((parse_key(text, KeySource::Flag)?, KeySource::Flag));
    }
    if let Some(text) = std::env::var_os(KEY_ENV) {
        let text = text
            .into_string()
            .map_err(|_| anyhow::anyhow!("malformed shared key from {KEY_ENV}: not UTF-8"))?;
        if !text.trim().is_empty() {
            return Ok((parse_key(&text, KeySource::Env)?, KeySource::Env));
        }
    }
    let path = key_file(dir)?;
    match read_small_file(&path) {
        Ok(text) => {
            if let Ok(meta) = std::fs::metadata(&path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(path = %path.display(), "the key file is readable by other users; run chmod 600 on it");
            }
            let key = SharedKey::from_hex(text.trim()).map_err(|_| {
                anyhow::anyhow!(
                    "the key file {} is damaged (not 64 hex characters); run `multifeed join <key>` again with the group's key",
                    path.display()
                )
            })?;
            Ok((key, KeySource::File))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "no shared key for {}: run `multifeed init` to start a group or `multifeed join <key>` to join one, or pass --key / {KEY_ENV}",
            dir.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot read the key file {}", path.display())),
    }
}

/// Writes the key file with mode 0600; refuses to overwrite one holding another key.
pub fn write_key_file(dir: &Path, key: &SharedKey) -> anyhow::Result<PathBuf> {
    let path = key_file(dir)?;
    if let Ok(existing) = read_small_file(&path) {
        if existing.trim().eq_ignore_ascii_case(&key.to_hex()) {
            return Ok(path);
        }
        bail!(
            "{} already has a key file for another group ({}); use another --dir for this group, or delete that file if the old group is gone",
            dir.display(),
            path.display()
        );
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create the key file {}", path.display()))?;
    writeln!(file, "{}", key.to_hex())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write the key file {}", path.display()))?;
    Ok(path)
}

/// Largest key, token, group-id or gateway-name file read; each holds one short line.
const MAX_SMALL_FILE: u64 = 4096;

/// A file multifeed keeps one short line in, read with its size bounded while
/// reading: a file that is much larger (or endless, like a link to /dev/zero) is
/// not one multifeed wrote, and is refused instead of read whole.
fn read_small_file(path: &Path) -> std::io::Result<String> {
    read_bounded(path, MAX_SMALL_FILE, "the one-line file multifeed wrote")
}

/// The text of `path` if it holds at most `max` bytes, read with that bound
/// enforced while reading (a link to /dev/zero reports a size of 0); `what` says
/// what the file should be, for the error.
pub(crate) fn read_bounded(path: &Path, max: u64, what: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    File::open(path)?.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "it holds more than {max} bytes, so it is not {what}; check the path, or restore or remove the file"
            ),
        ));
    }
    Ok(text)
}

/// The HTTP API token file of a storage directory: `<dir>.token`, beside the key file.
pub fn token_file(dir: &Path) -> anyhow::Result<PathBuf> {
    Ok(key_file(dir)?.with_extension("token"))
}

/// Writes a fresh random token file (mode 0600) unless one exists.
pub fn write_token_file(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = token_file(dir)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path);
    match file {
        Ok(mut file) => {
            let token: [u8; 32] = rand::random();
            writeln!(file, "{}", hex::encode(token))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write the token file {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot create the token file {}", path.display()));
        }
    }
    Ok(path)
}

/// The HTTP API token, if the token file exists.
pub fn read_token_file(dir: &Path) -> anyhow::Result<Option<String>> {
    let path = token_file(dir)?;
    match read_small_file(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().to_owned())),
        Ok(_) => anyhow::bail!(
            "the token file {} is empty; delete it and run `multifeed join <key>` to make a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read the token file {}", path.display())),
    }
}

/// The public fingerprint of a group (hex discovery key of the shared key).
pub fn group_id(key: &SharedKey) -> String {
    hex::encode(hypercore_protocol::discovery_key(key.as_bytes()))
}

/// Whether `dir` already holds a group.
pub fn is_group_dir(dir: &Path) -> bool {
    dir.join(GROUP_ID_FILE).exists() || dir.join("index").exists()
}

/// Checks `key` against the group id the store at `dir` keeps; `false` if it keeps
/// none yet.
fn check_group_id(dir: &Path, key: &SharedKey, source: KeySource) -> anyhow::Result<bool> {
    let id = group_id(key);
    let id_path = dir.join(GROUP_ID_FILE);
    match read_small_file(&id_path) {
        Ok(stored) if stored.trim() == id => Ok(true),
        Ok(stored) => bail!(
            "wrong shared key for the group at {} (key from {source}): the group's id is {}, this key's is {}; pass the key the group was created with, or use another --dir",
            dir.display(),
            short(stored.trim()),
            short(&id)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", id_path.display())),
    }
}

/// The store is locked by another process.
#[derive(Debug)]
pub struct InUse {
    pub dir: PathBuf,
}

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the group at {} is in use by another multifeed process (sync --live, read --follow, or a reader of a store it cannot write); stop it first, or talk to it over the network with `sync`",
            self.dir.display()
        )
    }
}

impl std::error::Error for InUse {}

/// Where a command works: on the store itself, or through the node that holds it.
pub enum Access {
    Local(Store),
    Node(NodeApi),
}

/// Opens the group of the global options (read-only for a command that only
/// reads, when the store cannot be written), or, while a node holds it, reaches
/// the node's API instead (after checking the key against the store's group id,
/// as opening would).
pub async fn open_or_node(global: &Global, want: Want) -> anyhow::Result<Access> {
    let opened = match want {
        Want::Write => open(global).await,
        Want::Read => open_for_reading(global).await,
    };
    let error = match opened {
        Ok(store) => return Ok(Access::Local(store)),
        Err(error) => error,
    };
    let Some(in_use) = error.downcast_ref::<InUse>() else {
        return Err(error);
    };
    let dir = in_use.dir.clone();
    let (key, source) = resolve_key(global.key.as_deref(), &dir)?;
    check_group_id(&dir, &key, source)?;
    let token = read_token_file(&dir).unwrap_or_default();
    match NodeApi::find(&dir, token)? {
        Some(api) => {
            tracing::info!(
                "the store is held by a node; going through its API at {}",
                api.address()
            );
            Ok(Access::Node(api))
        }
        None => Err(error),
    }
}

/// An open group with its directory lock.
pub struct Store {
    pub dir: PathBuf,
    /// This gateway's name, which its feeds carry.
    pub name: String,
    pub group: Multifeed,
    pub topics: Topics,
    /// `None` when opened read-only and no `LOCK` file could be had.
    _lock: Option<File>,
}

impl Store {
    /// Opens the group in `dir` under `key`: takes the lock, checks the group id,
    /// opens the group and warns about members that could not be loaded.
    pub async fn open(dir: &Path, key: SharedKey, source: KeySource) -> anyhow::Result<Self> {
        Self::open_as(dir, key, source, None, &AdmissionCaps::default()).await
    }

    /// [`Store::open`], renaming the gateway to `name` first when given (kept in
    /// `<dir>/gateway-name`; its feeds carry the name to peers), with the group's
    /// cap of `caps`.
    pub async fn open_as(
        dir: &Path,
        key: SharedKey,
        source: KeySource,
        name: Option<&str>,
        caps: &AdmissionCaps,
    ) -> anyhow::Result<Self> {
        // A bad name is refused before anything is touched.
        if let Some(name) = name {
            check_gateway_name(name)?;
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the storage directory {}", dir.display()))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| match refusal_words(e.kind()) {
                Some(_) => anyhow::Error::new(NotWritable {
                    dir: dir.to_path_buf(),
                    path: lock_path.clone(),
                    source: e,
                }),
                None => {
                    anyhow::Error::new(e).context(format!("cannot open {}", lock_path.display()))
                }
            })?;
        if !lock
            .try_lock_exclusive()
            .with_context(|| format!("cannot lock {}", lock_path.display()))?
        {
            return Err(InUse {
                dir: dir.to_path_buf(),
            }
            .into());
        }
        // Ours now: an API file left by a node that was killed names nothing.
        remote::remove_api_file(dir);
        if !check_group_id(dir, &key, source)? {
            let id_path = dir.join(GROUP_ID_FILE);
            std::fs::write(&id_path, format!("{}\n", group_id(&key)))
                .with_context(|| format!("cannot write {}", id_path.display()))?;
        }
        let name = match name {
            Some(name) => {
                write_gateway_name(dir, name)?;
                name.to_owned()
            }
            None => gateway_name(dir),
        };
        let metadata = [(output::GATEWAY.to_owned(), name.clone())].into();
        let options = Options::default()
            .writer_metadata(metadata)
            .max_unproven_feeds(caps.group_max_unproven_feeds);
        let group = Multifeed::open(StorageConfig::dir(dir), key, options)
            .await
            .with_context(|| format!("cannot open the group at {}", dir.display()))?;
        Ok(Self::opened(dir, name, group, Some(lock)))
    }

    /// The store over an opened `group`, after warning about members it could
    /// not load.
    fn opened(dir: &Path, name: String, group: Multifeed, lock: Option<File>) -> Self {
        warn_about_members(dir, &group);
        Self {
            dir: dir.to_path_buf(),
            name,
            topics: Topics::new(group.clone()),
            group,
            _lock: lock,
        }
    }

    /// Opens the group in `dir` read-only: nothing in the directory is created
    /// or changed. Holds a shared lock on `LOCK` when it exists, so readers
    /// coexist while a writer (which locks it exclusively) is kept out.
    pub async fn open_read_only(
        dir: &Path,
        key: SharedKey,
        source: KeySource,
    ) -> anyhow::Result<Self> {
        let lock_path = dir.join(LOCK_FILE);
        let lock = match File::open(&lock_path) {
            Ok(lock) => {
                if !FileExt::try_lock_shared(&lock)
                    .with_context(|| format!("cannot lock {}", lock_path.display()))?
                {
                    return Err(InUse {
                        dir: dir.to_path_buf(),
                    }
                    .into());
                }
                Some(lock)
            }
            // Never opened for writing here, so no writer can be running on it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open {}", lock_path.display()));
            }
        };
        check_group_id(dir, &key, source)?;
        let name = gateway_name(dir);
        // In memory only: what our own writers' messages are labelled with.
        let metadata = [(output::GATEWAY.to_owned(), name.clone())].into();
        let options = Options::default().writer_metadata(metadata).read_only(true);
        let group = Multifeed::open(StorageConfig::dir(dir), key, options)
            .await
            .with_context(|| format!("cannot open the group at {} read-only", dir.display()))?;
        Ok(Self::opened(dir, name, group, lock))
    }

    /// Why a member feed could not be opened, if the OS refused access to its files.
    fn access_refused_member(&self) -> Option<&'static str> {
        self.group
            .skipped()
            .iter()
            .filter(|skipped| skipped.kind == SkipKind::AccessRefused)
            .find_map(|skipped| {
                if skipped.reason.contains("Read-only file system") {
                    Some("read-only file system")
                } else {
                    refusal_words(std::io::ErrorKind::PermissionDenied)
                }
            })
    }

    /// Flushes and closes the group (the lock is released on drop).
    pub async fn close(self) -> anyhow::Result<()> {
        self.group
            .close()
            .await
            .with_context(|| format!("closing the group at {}", self.dir.display()))
    }
}

/// Warns about members that could not be loaded and feed directories the index
/// does not list.
fn warn_about_members(dir: &Path, group: &Multifeed) {
    for skipped in group.skipped() {
        let key = skipped
            .key
            .map(|k| k.to_hex())
            .unwrap_or_else(|| "?".into());
        if skipped.kind == SkipKind::AccessRefused {
            tracing::warn!(
                "member feed {key} skipped: the system refused access to its files in {} ({}); nothing is known to be damaged: check their owner and permissions and that none is immutable (lsattr shows an 'i'; chattr -i clears it)",
                skipped.path.display(),
                skipped.reason
            );
            continue;
        }
        tracing::warn!(
            "damaged member feed {key} skipped ({}): {}; run `multifeed verify`, then restore it from a backup or delete its directory to re-sync it from peers",
            skipped.path.display(),
            skipped.reason
        );
    }
    let unlisted = group.unlisted_feed_dirs();
    if !unlisted.is_empty() {
        // Not an empty store: feeds it holds are missing from what it shows.
        tracing::warn!(
            "{} feed directories under {} are not in the store's index, so their messages are neither read nor replicated (a lost or damaged index/, or an interrupted writer creation or download); run `multifeed verify` for the list",
            unlisted.len(),
            dir.join("feeds").display()
        );
    }
}

const GATEWAY_NAME_FILE: &str = "gateway-name";
/// Longest gateway name, in bytes (what peers keep of a feed's label).
const MAX_GATEWAY_NAME: usize = 64;

/// This gateway's name: `<dir>/gateway-name`, else the host name.
pub fn gateway_name(dir: &Path) -> String {
    read_small_file(&dir.join(GATEWAY_NAME_FILE))
        .ok()
        .map(|text| text.trim().to_owned())
        .filter(|name| check_gateway_name(name).is_ok())
        .unwrap_or_else(host_name)
}

/// The machine's host name, or `gateway` when it has none.
fn host_name() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy().trim().to_owned();
    if check_gateway_name(&name).is_ok() {
        name
    } else {
        "gateway".into()
    }
}

/// A gateway name is 1 to 64 bytes of printable text.
fn check_gateway_name(name: &str) -> anyhow::Result<()> {
    if name.trim().is_empty() || name.len() > MAX_GATEWAY_NAME || name.chars().any(char::is_control)
    {
        bail!(
            "a gateway name is 1 to {MAX_GATEWAY_NAME} bytes of printable text, such as site-a or the host name"
        );
    }
    Ok(())
}

fn write_gateway_name(dir: &Path, name: &str) -> anyhow::Result<()> {
    let path = dir.join(GATEWAY_NAME_FILE);
    std::fs::write(&path, format!("{}\n", name.trim()))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn short(id: &str) -> &str {
    &id[..id.len().min(16)]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key, token, group-id or gateway-name file that is endless (a link to
    /// /dev/zero reports no length) or too large is refused, never read whole.
    #[test]
    fn small_files_are_read_with_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let endless = dir.path().join("group-id");
        std::os::unix::fs::symlink("/dev/zero", &endless).unwrap();
        let (result, peak) = crate::alloc_probe::peak_bytes(|| read_small_file(&endless));
        let error = result.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
        assert!(peak <= 4 * MAX_SMALL_FILE as usize, "{peak} bytes");
        let large = dir.path().join("gateway-name");
        std::fs::write(&large, "g".repeat(MAX_SMALL_FILE as usize + 1)).unwrap();
        assert!(read_small_file(&large).is_err());
        std::fs::write(&large, "north-7\n").unwrap();
        assert_eq!(read_small_file(&large).unwrap(), "north-7\n");
        assert_eq!(gateway_name(dir.path()), "north-7");
    }
}
