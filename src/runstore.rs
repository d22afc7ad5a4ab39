//! The dispatcher's run store: one JSON record per request id.
//!
//! `<runs_dir>/<reqid>.json` (wire.md §7.4) holds what a later
//! `GET /status/<reqid>` returns: for a synchronous API run the results and
//! who submitted it. Records are written atomically (0640) and purged by
//! modification time after [`TTL_SECS`]. Request ids are checked before they
//! become file names.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use miniserde::json::{self, Object};

use crate::fsutil::{self, FsError};

/// How long a record is kept (upstream: 24 h).
pub const TTL_SECS: u64 = 86_400;

/// A run store directory.
#[derive(Debug, Clone)]
pub struct RunStore {
    dir: PathBuf,
}

impl RunStore {
    /// The store in `dir` (created on first write).
    pub fn new(dir: &Path) -> RunStore {
        RunStore { dir: dir.to_path_buf() }
    }

    fn file(&self, reqid: &str) -> Option<PathBuf> {
        crate::wire::valid_reqid(reqid).then(|| self.dir.join(format!("{reqid}.json")))
    }

    /// Write a record.
    pub fn put(&self, reqid: &str, record: &Object) -> Result<(), FsError> {
        let Some(path) = self.file(reqid) else {
            return Err(FsError::new("write", &self.dir, std::io::Error::other("invalid request id")));
        };
        fsutil::ensure_dir(&self.dir, 0o750)?;
        // No fsync: a record lost in a crash costs a /status 404, and a busy API
        // writes one per run (hundreds a second). Records belong to the
        // directory's owner, so one written by root's CLI stays readable and
        // rewritable by the API server's user.
        fsutil::atomic_write_nosync_dir_owner(&path, json::to_string(record).as_bytes(), 0o640)
    }

    /// Read a record; `Ok(None)` if there is none (or the id is invalid).
    pub fn get(&self, reqid: &str) -> Result<Option<Object>, FsError> {
        let Some(path) = self.file(reqid) else { return Ok(None) };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(crate::wire::parse_object(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FsError::new("read", &path, e)),
        }
    }

    /// Remove records older than `ttl`; returns how many went.
    pub fn purge(&self, ttl: Duration) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return 0 };
        let now = SystemTime::now();
        let mut n = 0;
        for e in rd.flatten() {
            let p = e.path();
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > ttl);
            if old && p.extension().is_some_and(|x| x == "json") && std::fs::remove_file(&p).is_ok() {
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_take_the_owner_of_the_runs_directory() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("runs");
        std::fs::create_dir(&dir).unwrap();
        // SAFETY: plain libc queries and a chown of our own temporary directory.
        let root = unsafe { libc::geteuid() } == 0;
        let want = if root {
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            65534
        } else {
            unsafe { libc::geteuid() }
        };
        let s = RunStore::new(&dir);
        s.put("cd34", &crate::wire::Obj::new().s("reqid", "cd34").0).unwrap();
        let m = std::fs::metadata(dir.join("cd34.json")).unwrap();
        assert_eq!(m.uid(), want, "root wrote it, but the directory's owner must keep access");
    }

    #[test]
    fn put_get_purge() {
        let d = tempfile::tempdir().unwrap();
        let s = RunStore::new(&d.path().join("runs"));
        let rec = crate::wire::Obj::new().s("reqid", "ab12").0;
        s.put("ab12", &rec).unwrap();
        assert_eq!(s.get("ab12").unwrap().unwrap().len(), 1);
        assert_eq!(fsutil::mode_of(&d.path().join("runs/ab12.json")), Some(0o640));
        assert!(s.get("../etc/passwd").unwrap().is_none());
        assert!(s.put("a/b", &rec).is_err());
        assert!(s.get("nope").unwrap().is_none());
        assert_eq!(s.purge(Duration::from_secs(3600)), 0);
        assert_eq!(s.purge(Duration::ZERO), 1);
        assert!(s.get("ab12").unwrap().is_none());
    }
}
