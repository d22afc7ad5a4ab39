//! Detached ("async") runs on the agent.
//!
//! `POST /run` with `"async": true` answers 202 at once; the script runs in a
//! separate runner process and its result waits in the store until a
//! dispatcher fetches it with `GET /result/<reqid>` (wire.md §2.5, §5.5).
//!
//! - The store is `<async_runs_dir>/<dispatcher id>/<reqid>.json`, one
//!   partition per owning dispatcher: a dispatcher can only ever read its own
//!   results. Records are written atomically (0640) and purged after 24 h.
//! - At most one detached run per script: the agent takes an exclusive,
//!   non-blocking `flock` on `<async_runs_dir>/.locks/<script>.lock` (busy →
//!   409) and hands that very lock to the runner as file descriptor 3, so it
//!   is held exactly as long as the runner lives, with no window between the
//!   check and the run.
//! - The runner is this binary again (`ctrl-exec agent async-run`), in a
//!   session of its own, reading its [`Job`] on stdin. It is not a child the
//!   agent waits for: it outlives the HTTP connection and an agent restart,
//!   runs the script exactly as a synchronous run would (same limits), and
//!   writes the final record.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use miniserde::json::{Object, Value};

use crate::fsutil::{self, FsError};
use crate::wire::{Obj, get_i64, get_str, get_str_array, valid_dispatcher_id, valid_reqid};

/// How long records are kept.
pub const TTL: Duration = Duration::from_secs(86_400);

/// The agent's async store.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store under `async_runs_dir`.
    pub fn new(dir: &Path) -> Store {
        Store { dir: dir.to_path_buf() }
    }

    /// Where the record of `reqid` owned by `owner` lives.
    pub fn record_path(&self, owner: &str, reqid: &str) -> Option<PathBuf> {
        (valid_dispatcher_id(owner) && valid_reqid(reqid)).then(|| self.dir.join(owner).join(format!("{reqid}.json")))
    }

    /// Take the per-script lock without waiting: `Ok(None)` if a detached run
    /// of that script holds it.
    pub fn try_lock(&self, script: &str) -> Result<Option<File>, FsError> {
        let locks = self.dir.join(".locks");
        fsutil::ensure_dir(&locks, 0o750)?;
        let name: String =
            script.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' }).collect();
        let path = locks.join(format!("{name}.lock"));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o640)
            .open(&path)
            .map_err(|e| FsError::new("open lock file", &path, e))?;
        // SAFETY: flock on a descriptor we own.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(f));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(None) } else { Err(FsError::new("lock", &path, e)) }
    }

    /// Write a record atomically.
    pub fn write(&self, path: &Path, record: &Object) -> Result<(), FsError> {
        if let Some(d) = path.parent() {
            fsutil::ensure_dir(d, 0o750)?;
        }
        fsutil::atomic_write(path, miniserde::json::to_string(record).as_bytes(), 0o640)
    }

    /// The caller's own record, if any.
    pub fn read(&self, owner: &str, reqid: &str) -> Option<Object> {
        let p = self.record_path(owner, reqid)?;
        crate::wire::parse_object(&std::fs::read_to_string(p).ok()?)
    }

    /// Does another dispatcher own a record with this id? (for the audit trail only)
    pub fn owned_by_other(&self, owner: &str, reqid: &str) -> bool {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return false };
        rd.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n != owner && !n.starts_with('.') && e.path().join(format!("{reqid}.json")).is_file()
        })
    }

    /// Remove records older than [`TTL`] in every partition.
    pub fn purge(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return };
        let now = SystemTime::now();
        for part in rd.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')) {
            let Ok(files) = std::fs::read_dir(part.path()) else { continue };
            for f in files.flatten() {
                let old = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age > TTL);
                if old {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}

/// Everything a runner needs, passed on its stdin as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Record to write when done.
    pub record: PathBuf,
    /// Request id.
    pub reqid: String,
    /// Allowlist name.
    pub script: String,
    /// Owning dispatcher id.
    pub owner: String,
    /// When the agent accepted it (ISO UTC).
    pub started: String,
    /// Executable.
    pub path: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// The context JSON for the script's stdin.
    pub stdin: String,
    /// Seconds to deliver `stdin`.
    pub stdin_timeout: u64,
    /// Output cap per stream.
    pub max_output: u64,
    /// Script time limit in seconds (0: none).
    pub timeout: u64,
    /// Peer address, for the audit line.
    pub peer: String,
    /// Advisory user, for the audit line.
    pub username: String,
}

impl Job {
    /// As JSON.
    pub fn to_json(&self) -> String {
        Obj::new()
            .s("record", self.record.display().to_string())
            .s("reqid", &self.reqid)
            .s("script", &self.script)
            .s("owner", &self.owner)
            .s("started", &self.started)
            .s("path", self.path.display().to_string())
            .v("args", crate::wire::str_array(&self.args))
            .s("stdin", &self.stdin)
            .i("stdin_timeout", self.stdin_timeout as i64)
            .i("max_output", self.max_output as i64)
            .i("timeout", self.timeout as i64)
            .s("peer", &self.peer)
            .s("username", &self.username)
            .to_json()
    }

    /// From JSON.
    pub fn from_json(text: &str) -> Option<Job> {
        let o = crate::wire::parse_object(text)?;
        let n = |k: &str| get_i64(&o, k).and_then(|v| u64::try_from(v).ok());
        Some(Job {
            record: get_str(&o, "record")?.into(),
            reqid: get_str(&o, "reqid")?,
            script: get_str(&o, "script")?,
            owner: get_str(&o, "owner")?,
            started: get_str(&o, "started")?,
            path: get_str(&o, "path")?.into(),
            args: get_str_array(&o, "args").ok()??,
            stdin: get_str(&o, "stdin")?,
            stdin_timeout: n("stdin_timeout")?,
            max_output: n("max_output")?,
            timeout: n("timeout")?,
            peer: get_str(&o, "peer").unwrap_or_default(),
            username: get_str(&o, "username").unwrap_or_default(),
        })
    }

    /// The record while the job runs.
    pub fn running_record(&self) -> Object {
        Obj::new()
            .s("reqid", &self.reqid)
            .s("status", "running")
            .s("script", &self.script)
            .s("owner", &self.owner)
            .s("started", &self.started)
            .0
    }

    /// The record once the script has finished.
    pub fn done_record(&self, out: &crate::exec::Outcome) -> Object {
        let mut r = Obj::new()
            .s("reqid", &self.reqid)
            .s("status", "done")
            .s("script", &self.script)
            .s("owner", &self.owner)
            .s("started", &self.started)
            .s("finished", crate::time::now_iso())
            .i("exit", out.exit as i64)
            .s("stdout", String::from_utf8_lossy(&out.stdout))
            .s("stderr", String::from_utf8_lossy(&out.stderr));
        if out.truncated {
            r = r.b("truncated", true);
        }
        if out.timed_out {
            r = r.b("timed_out", true).s("error", format!("timed out after {}s; process group killed", self.timeout));
        }
        r.0
    }

    /// The exec specification.
    pub fn spec(&self) -> crate::exec::Spec {
        crate::exec::Spec {
            stdin_timeout: Duration::from_secs(self.stdin_timeout),
            max_output: self.max_output as usize,
            timeout: (self.timeout > 0).then(|| Duration::from_secs(self.timeout)),
            ..crate::exec::Spec::new(self.path.clone(), self.args.clone(), self.stdin.clone().into_bytes())
        }
    }
}

/// Start a detached runner for `job`, handing it `lock` as fd 3; it logs
/// where the agent logs (`log`). Returns once the job is on its way; the
/// runner is reaped in the background.
pub async fn spawn_runner(job: &Job, lock: File, log: &crate::config::LogTarget) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    // /proc/self/exe still reaches this very binary after an upgrade has
    // replaced (unlinked) the file on disk; the path may not.
    let exe = match Path::new("/proc/self/exe").exists() {
        true => std::path::PathBuf::from("/proc/self/exe"),
        false => std::env::current_exe()?,
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.arg0("ctrl-exec").args(["agent", "async-run"]);
    // The runner passes on to the script what a synchronous run passes on:
    // PATH and the agent's own locale and identity variables.
    cmd.env_clear().env("PATH", crate::exec::SAFE_PATH);
    for k in crate::exec::PASSED_ENV {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    if let crate::config::LogTarget::Syslog(sock) = log {
        cmd.arg("--syslog-socket").arg(sock);
    }
    let fd = lock.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Own session: no controlling terminal, not in the agent's process
            // group, so stopping the agent does not stop the job.
            libc::setsid();
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut cmd = smol::process::Command::from(cmd);
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::inherit()).reap_on_drop(true);
    let mut child = cmd.spawn()?;
    drop(lock); // the runner holds it now
    if let Some(mut stdin) = child.stdin.take() {
        use smol::io::AsyncWriteExt;
        stdin.write_all(job.to_json().as_bytes()).await?;
    }
    Ok(())
}

/// Value of a record's `status`.
pub fn status_of(record: &Object) -> String {
    match record.get("status") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_round_trip_and_records() {
        let job = Job {
            record: "/x/d/r.json".into(),
            reqid: "ab".into(),
            script: "slow".into(),
            owner: "d".into(),
            started: "T".into(),
            path: "/bin/true".into(),
            args: vec!["a b".into(), "".into()],
            stdin: "{\"x\":1}".into(),
            stdin_timeout: 10,
            max_output: 100,
            timeout: 0,
            peer: "127.0.0.1".into(),
            username: "u".into(),
        };
        assert_eq!(Job::from_json(&job.to_json()).unwrap(), job);
        assert_eq!(status_of(&job.running_record()), "running");
        assert!(Job::from_json("{}").is_none());
    }

    #[test]
    fn lock_is_exclusive_and_records_are_partitioned() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path());
        let held = s.try_lock("slow").unwrap().expect("free");
        assert!(s.try_lock("slow").unwrap().is_none(), "a second lock must fail");
        assert!(s.try_lock("other").unwrap().is_some());
        drop(held);
        assert!(s.try_lock("slow").unwrap().is_some());
        let p = s.record_path("disp-a", "r1").unwrap();
        s.write(&p, &Obj::new().s("status", "running").0).unwrap();
        assert!(s.read("disp-a", "r1").is_some());
        assert!(s.read("disp-b", "r1").is_none());
        assert!(s.owned_by_other("disp-b", "r1"));
        assert!(s.record_path("../x", "r1").is_none());
        assert!(s.record_path("d", "a/b").is_none());
    }
}
