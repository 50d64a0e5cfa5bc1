//! Stores the process cannot write: read-only bind mounts and immutable files
//! (both need root; a test skips with a printed reason where they are not
//! permitted), and listings that show whether anything under a directory changed.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

/// Every entry under `dir` (itself included) with its kind, size, mode and
/// modification time in nanoseconds: equal listings mean nothing was created,
/// removed, written, truncated or re-permissioned.
pub fn listing(dir: &Path) -> BTreeMap<PathBuf, (bool, u64, u32, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
        out.insert(
            path.clone(),
            (meta.is_dir(), meta.len(), meta.mode(), mtime),
        );
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
        }
    }
    out
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A read-only bind mount of a directory, unmounted on drop.
pub struct ReadOnlyMount {
    pub path: PathBuf,
}

impl ReadOnlyMount {
    /// Mounts `source` read-only at `target` (created); `Err` with the reason
    /// when mounting is not permitted here.
    pub fn new(source: &Path, target: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(target).map_err(|e| e.to_string())?;
        let (source, target_str) = (source.to_str().unwrap(), target.to_str().unwrap());
        run("mount", &["--bind", source, target_str])?;
        let mount = ReadOnlyMount {
            path: target.to_path_buf(),
        };
        run("mount", &["-o", "remount,ro,bind", target_str])?;
        // The kernel must really refuse writes there.
        match std::fs::write(target.join(".probe"), b"x") {
            Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => Ok(mount),
            other => Err(format!("the bind mount is not read-only: {other:?}")),
        }
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        if let Err(e) = run("umount", &[self.path.to_str().unwrap()]) {
            eprintln!("cannot unmount {}: {e}", self.path.display());
        }
    }
}

/// Files made immutable (`chattr +i`), made mutable again on drop.
pub struct Immutable {
    paths: Vec<PathBuf>,
}

impl Immutable {
    /// Makes `paths` immutable (a directory with everything under it); `Err`
    /// with the reason when the filesystem or the user cannot.
    pub fn new(paths: &[&Path]) -> Result<Self, String> {
        let mut made = Immutable { paths: Vec::new() };
        for path in paths {
            let path_str = path.to_str().unwrap();
            // Undone on drop even if it fails half-way.
            made.paths.push(path.to_path_buf());
            if path.is_dir() {
                run("chattr", &["-R", "+i", path_str])?;
            } else {
                run("chattr", &["+i", path_str])?;
            }
        }
        Ok(made)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in &self.paths {
            if let Err(e) = run("chattr", &["-R", "-i", path.to_str().unwrap()]) {
                eprintln!("cannot make {} mutable again: {e}", path.display());
            }
        }
    }
}

/// Whether root's writes to an immutable file are refused here (they are on
/// ext4, xfs, btrfs; tmpfs and overlay may lack the flag).
pub fn immutable_files_supported(dir: &Path) -> Result<(), String> {
    let probe = dir.join(".immutable-probe");
    std::fs::write(&probe, b"x").map_err(|e| e.to_string())?;
    let result = Immutable::new(&[&probe]).and_then(|guard| {
        let refused = std::fs::OpenOptions::new()
            .append(true)
            .open(&probe)
            .is_err();
        drop(guard);
        if refused {
            Ok(())
        } else {
            Err("an immutable file was still writable".into())
        }
    });
    let _ = std::fs::remove_file(&probe);
    result
}
