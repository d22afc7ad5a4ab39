//! Atomic writes and advisory locks: the only way state reaches the disk.
//!
//! Every state file (registry records, certificates, keys, the trusted map,
//! the CA serial counter) is written through [`atomic_write`]: a temporary
//! file in the same directory, created with its final mode (so a key is never
//! briefly world-readable), written, `fsync`ed, renamed over the target, and
//! the directory `fsync`ed. A crash at any point leaves either the old file or
//! the new one, never a half-written one.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// An I/O failure on a named path.
#[derive(Debug)]
pub struct FsError {
    /// What we were doing ("write", "read", "lock", …).
    pub op: &'static str,
    /// The path involved.
    pub path: PathBuf,
    /// The underlying error.
    pub err: io::Error,
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot {} {}: {}", self.op, self.path.display(), self.err)?;
        if self.err.kind() == io::ErrorKind::PermissionDenied {
            write!(f, " (run as a user that may write there, e.g. with sudo)")?;
        }
        Ok(())
    }
}

impl std::error::Error for FsError {}

impl FsError {
    /// Wrap an io::Error with the operation and path.
    pub fn new(op: &'static str, path: &Path, err: io::Error) -> Self {
        FsError { op, path: path.to_path_buf(), err }
    }
}

/// Read a whole file as UTF-8 text, naming the path on failure.
pub fn read_text(path: &Path) -> Result<String, FsError> {
    fs::read_to_string(path).map_err(|e| FsError::new("read", path, e))
}

/// Write `data` to `path` atomically with permission bits `mode`.
pub fn atomic_write(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    write_file(path, data, mode, None, true)
}

/// Replace `path` atomically, keeping the mode and ownership of the file it
/// replaces (an operator's `chgrp ctrl-exec-agent agent.key; chmod 0640`
/// survives a re-install); a new file gets `default_mode`.
pub fn atomic_replace(path: &Path, data: &[u8], default_mode: u32) -> Result<(), FsError> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(m) => write_file(path, data, m.mode() & 0o7777, Some((m.uid(), m.gid())), true),
        Err(_) => write_file(path, data, default_mode, None, true),
    }
}

/// Like [`atomic_write`] without the fsyncs, for caches whose loss is harmless.
pub fn atomic_write_nosync(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    write_file(path, data, mode, None, false)
}

/// Like [`atomic_write_nosync`], giving the file the owner and group of the
/// directory it is in (when run as root; otherwise the writer's own). Used by
/// stores shared by a root CLI and an unprivileged service.
pub fn atomic_write_nosync_dir_owner(path: &Path, data: &[u8], mode: u32) -> Result<(), FsError> {
    use std::os::unix::fs::MetadataExt;
    let owner = path.parent().and_then(|d| fs::metadata(d).ok()).map(|m| (m.uid(), m.gid()));
    write_file(path, data, mode, owner, false)
}

fn write_file(path: &Path, data: &[u8], mode: u32, owner: Option<(u32, u32)>, sync: bool) -> Result<(), FsError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let mut rnd = [0u8; 6];
    let _ = openssl::rand::rand_bytes(&mut rnd);
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), crate::wire::hex(&rnd)));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have narrowed the mode; state files need exactly `mode`.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            // Only root may give a file away; anyone else keeps their own ownership.
            let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
        }
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp, path)?;
        if sync && let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(FsError::new("write", path, e));
    }
    Ok(())
}

/// Remove the temporary files that writers killed mid-write left in `dir`
/// (`.<name>.tmp-<pid>-<hex>`, see [`atomic_write`]) when that process is
/// gone. The real files were never touched by them. Returns how many went.
pub fn sweep_temp(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(temp_writer) else { continue };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let gone = pid != std::process::id()
            && unsafe { libc::kill(pid as libc::pid_t, 0) } == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// The writer's pid if `name` is one of our temporary files.
fn temp_writer(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, tail) = rest.rsplit_once(".tmp-")?;
    let (pid, hex) = tail.split_once('-')?;
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Create a directory and its parents with `mode` for the ones created.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), FsError> {
    use std::os::unix::fs::DirBuilderExt;
    if path.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new().recursive(true).mode(mode).create(path).map_err(|e| FsError::new("create directory", path, e))
}

/// An exclusive `flock` held until drop.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Block until the exclusive lock on `path` (created 0600 if missing) is held.
    pub fn exclusive(path: &Path) -> Result<FileLock, FsError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| FsError::new("open lock file", path, e))?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(FsError::new("lock", path, io::Error::last_os_error()));
        }
        Ok(FileLock { _file: file })
    }
}

/// Whether this process could create or write files in directory `dir`
/// (or, if it does not exist yet, create it): `Err` says why not, e.g. a
/// read-only file system under a service sandbox.
pub fn check_writable_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p,
            _ => {
                probe = Path::new(".");
                break;
            }
        }
    }
    if !probe.is_dir() {
        return Err(format!("{} is not a directory", probe.display()));
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0 {
        Ok(())
    } else {
        Err(format!("{}: {}", probe.display(), io::Error::last_os_error()))
    }
}

/// Permission bits of a file (for self-checks and tests).
pub fn mode_of(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o7777)
}

/// True if `path` is a regular file with an execute bit that this process may use.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access() only reads the NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.pem");
        atomic_write(&p, b"one", 0o600).unwrap();
        assert_eq!(mode_of(&p), Some(0o600));
        atomic_write(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(mode_of(&p), Some(0o644));
        // no temp files left behind
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_replace_keeps_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.key");
        atomic_write(&p, b"one", 0o640).unwrap();
        atomic_replace(&p, b"two", 0o600).unwrap();
        assert_eq!((fs::read(&p).unwrap(), mode_of(&p)), (b"two".to_vec(), Some(0o640)));
        let q = d.path().join("new");
        atomic_replace(&q, b"x", 0o600).unwrap();
        assert_eq!(mode_of(&q), Some(0o600));
    }

    #[test]
    fn atomic_write_into_missing_dir_fails_cleanly() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nope/x");
        let e = atomic_write(&p, b"x", 0o600).unwrap_err();
        assert!(e.to_string().contains("nope/x"), "{e}");
    }

    #[test]
    fn sweep_removes_only_temp_files_of_dead_writers() {
        let d = tempfile::tempdir().unwrap();
        // A child that has exited and been reaped: its pid is free.
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let dead = c.id();
        c.wait().unwrap();
        let mine = std::process::id();
        let names = [
            format!(".agent.crt.tmp-{dead}-0a1b2c"),
            format!(".agent.crt.tmp-{mine}-0a1b2c"),
            format!("agent.crt.tmp-{dead}-0a1b2c"),
            format!(".agent.crt.tmp-{dead}-notahex"),
            "agent.crt".to_string(),
        ];
        for n in &names {
            fs::write(d.path().join(n), "x").unwrap();
        }
        assert_eq!(sweep_temp(d.path()), 1);
        assert!(!d.path().join(&names[0]).exists());
        assert!(names[1..].iter().all(|n| d.path().join(n).exists()));
        assert_eq!(temp_writer(".a.json.tmp-42-ff"), Some(42));
        assert_eq!(temp_writer(".a.json.tmp-0-ff"), None);
        assert_eq!(sweep_temp(&d.path().join("missing")), 0);
    }

    #[test]
    fn writable_dir_check_walks_up_to_an_existing_parent() {
        let d = tempfile::tempdir().unwrap();
        assert!(check_writable_dir(&d.path().join("not/yet/there")).is_ok());
        let ro = d.path().join("ro");
        fs::create_dir(&ro).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        // root ignores mode bits; the check is only meaningful for others
        if unsafe { libc::geteuid() } != 0 {
            assert!(check_writable_dir(&ro.join("runs")).is_err());
        }
        let file = d.path().join("f");
        fs::write(&file, "").unwrap();
        assert!(check_writable_dir(&file.join("runs")).unwrap_err().contains("not a directory"));
    }
}
