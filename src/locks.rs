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
use std::io::Read;
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

/// `<host>--<script>.lock` when that name cannot be read two ways (no `--`
/// inside either name, no `-` at their edges, nothing to sanitise); otherwise
/// a readable stem plus a hash of the exact pair, so `a` + `b--c` and
/// `a--b` + `c` never share a lock.
fn file_name(host: &str, script: &str) -> String {
    let plain = |s: &str| {
        !s.is_empty()
            && !s.contains("--")
            && !s.starts_with('-')
            && !s.ends_with('-')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    };
    if plain(host) && plain(script) {
        return format!("{host}--{script}.lock");
    }
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "_.".contains(c) { c } else { '_' }).collect()
    };
    let digest = openssl::sha::sha256(format!("{host}\0{script}").as_bytes());
    format!("{}--{}--{}.lock", clean(host), clean(script), crate::wire::hex(&digest[..8]))
}

/// Does the lock file (read from its start) hold exactly `names`?
fn holds(f: &File, names: &str) -> bool {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; names.len() + 1];
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return false,
        }
    }
    buf[..got] == *names.as_bytes()
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

    /// Open (creating if needed) the lock file of `host` and `script`. A new
    /// file is 0660 and belongs to the directory's owner and group, so the
    /// CLI run as root and the API server's user can both take it later.
    /// Read access is enough for `flock`: a file we may not write is still
    /// usable, it just does not get our names written into it.
    fn open(&self, host: &str, script: &str) -> Result<(File, bool), FsError> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(file_name(host, script));
        // Lock files stay: after the first run of a pair this open succeeds.
        if let Ok(f) = OpenOptions::new().read(true).write(true).open(&path) {
            return Ok((f, true));
        }
        let opened = OpenOptions::new().read(true).write(true).create_new(true).mode(0o660).open(&path);
        match opened {
            Ok(f) => {
                let _ = f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o660));
                if let Ok(m) = std::fs::metadata(&self.dir) {
                    // Only root may give a file away; for anyone else this is a no-op or fails harmlessly.
                    let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
                }
                return Ok((f, true));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(FsError::new("create lock file", &path, e)),
        }
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                File::open(&path).map(|f| (f, false)).map_err(|e| FsError::new("open lock file", &path, e))
            }
            Err(e) => Err(FsError::new("open lock file", &path, e)),
        }
    }

    /// Take the lock of `script` on every host, or none: `Err(conflicts)`
    /// lists `host:script` for each lock another run holds.
    pub fn acquire(&self, hosts: &[String], script: &str) -> Result<Result<Held, Vec<String>>, FsError> {
        if !self.dir.is_dir() {
            fsutil::ensure_dir(&self.dir, 0o770)?;
            // 2770 whatever the umask: setgid, so lock files get the
            // directory's group (behaviour.md §1.5); mkdir ignores both.
            let _ = std::fs::set_permissions(&self.dir, std::os::unix::fs::PermissionsExt::from_mode(0o2770));
        }
        let mut held = Held { files: Vec::new(), names: Vec::new() };
        let mut conflicts = Vec::new();
        for host in hosts {
            let (f, writable) = self.open(host, script)?;
            match try_flock(&f) {
                Ok(true) => {
                    // Say whose lock this is (for list-locks); it is ours now.
                    // Usually the file already says so (the same pair took
                    // it before): then it is left alone.
                    let names = format!("{host}\n{script}\n");
                    if writable && !holds(&f, &names) {
                        use std::os::unix::fs::FileExt;
                        let _ = f.set_len(0);
                        let _ = f.write_all_at(names.as_bytes(), 0);
                    }
                    held.files.push(f);
                    held.names.push(format!("{host}:{script}"));
                }
                Ok(false) => conflicts.push(format!("{host}:{script}")),
                Err(e) => return Err(FsError::new("lock", &self.dir, e)),
            }
        }
        Ok(if conflicts.is_empty() { Ok(held) } else { Err(conflicts) })
    }

    /// Every lock currently held by some run: `(host, script)`, sorted. A
    /// lock file this user cannot open or test is an error, never "free".
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
            let mut f = match File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(FsError::new("open lock file", &p, e)),
            };
            // A lock we can take is free: release it again at once.
            match try_flock(&f) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => return Err(FsError::new("test lock file", &p, e)),
            }
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            let mut lines = text.lines();
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let (host, script) = match (lines.next(), lines.next()) {
                (Some(h), Some(s)) => (h.to_string(), s.to_string()),
                _ => match name.split_once("--").map(|(h, s)| (h, s.split("--").next().unwrap_or(s))) {
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

    #[test]
    fn a_lock_file_names_its_pair_after_every_acquire() {
        let d = tempfile::tempdir().unwrap();
        let l = Locks::new(&d.path().join("locks"));
        let path = d.path().join("locks/web1--deploy.lock");
        drop(l.acquire(&["web1".into()], "deploy").unwrap().unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "web1\ndeploy\n");
        // Garbage (longer, shorter, a prefix) is replaced from the start.
        for junk in ["something much longer than the names\n", "w", "web1\ndeploy\nextra\n", ""] {
            std::fs::write(&path, junk).unwrap();
            drop(l.acquire(&["web1".into()], "deploy").unwrap().unwrap());
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "web1\ndeploy\n", "after {junk:?}");
        }
        assert_eq!(l.held().unwrap(), vec![]);
    }

    #[test]
    fn names_with_dashes_never_share_a_lock_file() {
        assert_eq!(file_name("web1", "deploy"), "web1--deploy.lock");
        for (a, b) in [(("a", "b--c"), ("a--b", "c")), (("a-", "b"), ("a", "-b")), (("x", "y-"), ("x-", "y"))] {
            assert_ne!(file_name(a.0, a.1), file_name(b.0, b.1), "{a:?} vs {b:?}");
        }
        let d = tempfile::tempdir().unwrap();
        let l = Locks::new(&d.path().join("locks"));
        let _one = l.acquire(&["a".into()], "b--c").unwrap().unwrap();
        assert!(l.acquire(&["a--b".into()], "c").unwrap().is_ok(), "a different pair is not a conflict");
        assert_eq!(l.held().unwrap(), vec![("a".into(), "b--c".into())]);
    }

    #[test]
    fn lock_files_are_group_shared() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("locks");
        let l = Locks::new(&dir);
        // (the usual umask 022 would otherwise leave 0640 and 0750)
        drop(l.acquire(&["h1".into()], "s1").unwrap().unwrap());
        let mode = std::fs::metadata(dir.join("h1--s1.lock")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777, 0o2770);
    }
}
