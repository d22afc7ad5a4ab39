//! Dispatcher locks: one run of a script on a host at a time, from this
//! dispatcher (wire.md §7.5, behaviour.md §11.3).
//!
//! A lock is an exclusive `flock` on `<locks_dir>/<host>--<script>.lock`,
//! taken without waiting for every host of a run before any agent is
//! contacted, and held until the last result is in (for an async run: until
//! every host has answered the submission). Unlike upstream, which only
//! probed these files, the lock really is held, so a second run of the same
//! script on the same host is refused (`Locked:`, 409) rather than started
//! twice. Locks are per dispatcher host; HA instances do not share them.
//! Each file records its host and script, so `list-locks` can show them
//! even when the names contain `--`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::fsutil::{self, FsError};

/// The locks directory.
#[derive(Debug, Clone)]
pub struct Locks {
    dir: PathBuf,
}

/// Locks held for one run; released on drop.
#[derive(Debug)]
pub struct Held {
    files: Vec<File>,
    /// `host:script` of each lock.
    pub names: Vec<String>,
}

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' }).collect()
}

fn try_flock(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(false) } else { Err(e) }
}

impl Locks {
    /// The locks in `dir` (created on first use).
    pub fn new(dir: &Path) -> Locks {
        Locks { dir: dir.to_path_buf() }
    }

    fn open(&self, host: &str, script: &str) -> Result<File, FsError> {
        let path = self.dir.join(format!("{}--{}.lock", sanitize(host), sanitize(script)));
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o660)
            .open(&path)
            .map_err(|e| FsError::new("open lock file", &path, e))
    }

    /// Take the lock of `script` on every host, or none: `Err(conflicts)`
    /// lists `host:script` for each lock another run holds.
    pub fn acquire(&self, hosts: &[String], script: &str) -> Result<Result<Held, Vec<String>>, FsError> {
        fsutil::ensure_dir(&self.dir, 0o770)?;
        let mut held = Held { files: Vec::new(), names: Vec::new() };
        let mut conflicts = Vec::new();
        for host in hosts {
            let mut f = self.open(host, script)?;
            match try_flock(&f) {
                Ok(true) => {
                    // Say whose lock this is (for list-locks); it is ours now.
                    let _ = f.set_len(0);
                    let _ = f.write_all(format!("{host}\n{script}\n").as_bytes());
                    held.files.push(f);
                    held.names.push(format!("{host}:{script}"));
                }
                Ok(false) => conflicts.push(format!("{host}:{script}")),
                Err(e) => return Err(FsError::new("lock", &self.dir, e)),
            }
        }
        Ok(if conflicts.is_empty() { Ok(held) } else { Err(conflicts) })
    }

    /// Every lock currently held by some run: `(host, script)`, sorted.
    pub fn held(&self) -> Result<Vec<(String, String)>, FsError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(FsError::new("read directory", &self.dir, e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "lock") {
                continue;
            }
            let Ok(mut f) = File::open(&p) else { continue };
            // A lock we can take is free: release it again at once.
            if try_flock(&f).unwrap_or(true) {
                continue;
            }
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let mut lines = text.lines();
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let (host, script) = match (lines.next(), lines.next()) {
                (Some(h), Some(s)) => (h.to_string(), s.to_string()),
                _ => match name.split_once("--") {
                    Some((h, s)) => (h.to_string(), s.to_string()),
                    None => (name.clone(), String::new()),
                },
            };
            out.push((host, script));
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing_and_listed_while_held() {
        let d = tempfile::tempdir().unwrap();
        let l = Locks::new(&d.path().join("locks"));
        let hosts = vec!["web--1".to_string(), "db1".to_string()];
        let first = l.acquire(&hosts, "deploy").unwrap().unwrap();
        assert_eq!(first.names, vec!["web--1:deploy", "db1:deploy"]);
        assert_eq!(l.held().unwrap(), vec![("db1".into(), "deploy".into()), ("web--1".into(), "deploy".into())]);
        // an overlapping run gets the conflicts and holds nothing
        let c = l.acquire(&["db1".to_string(), "other".to_string()], "deploy").unwrap().unwrap_err();
        assert_eq!(c, vec!["db1:deploy"]);
        assert!(l.acquire(&["other".to_string()], "deploy").unwrap().is_ok(), "nothing was left held");
        // another script on the same host is fine
        assert!(l.acquire(&hosts, "backup").unwrap().is_ok());
        drop(first);
        assert!(l.held().unwrap().is_empty());
        assert!(l.acquire(&hosts, "deploy").unwrap().is_ok());
    }
}
