//! Running one allowlisted script: no shell, a clean environment, the
//! request context on stdin, capped output, an optional time limit.
//!
//! - argv is `[path, args…]` handed to `execve` directly: no shell and no
//!   `PATH` search anywhere, so `; $(rm -rf /)` is just an argument.
//! - The environment is replaced: a fixed `PATH` plus `HOME`, `LANG`,
//!   `LC_ALL`, `TZ`, `TERM`, `USER`, `LOGNAME` copied from the agent. Request
//!   data never travels in the environment.
//! - The context JSON is written to stdin within `stdin_timeout`; then stdin
//!   is closed either way (the script sees EOF and keeps running).
//! - stdout and stderr are read concurrently (no pipe deadlock) through a
//!   [`Capture`] that keeps at most `max_output` bytes of each and then keeps
//!   draining, so a chatty script never blocks and memory stays bounded. The
//!   capture is a stream of chunks, so a streaming response can later be fed
//!   from the same place.
//! - The script leads its own process group. On `timeout` the whole group is
//!   killed (children and grandchildren too) and the outcome says so. After
//!   the script itself exits, its output pipes get a short grace period: a
//!   background process that inherited them cannot hold the reply hostage.
//!
//! Exit codes (upstream's): the script's own status; 126 if it died from a
//! signal; 127 if it could not be executed; -1 for an agent-side failure.
//!
//! Reaping is async-process's job (pidfd, or SIGCHLD on old kernels): this
//! module never installs a SIGCHLD handler and never calls `waitpid(-1)`.

use std::cell::Cell;
use std::future::Future;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::pin::pin;
use std::process::Stdio;
use std::task::Poll;
use std::time::Duration;

use smol::Timer;
use smol::io::{AsyncReadExt, AsyncWriteExt};

/// `PATH` given to every script.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Variables copied from the agent's own environment when present.
pub const PASSED_ENV: [&str; 7] = ["HOME", "LANG", "LC_ALL", "TZ", "TERM", "USER", "LOGNAME"];
/// How long output pipes may stay open after the script itself exited.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Absolute path of the executable.
    pub path: PathBuf,
    /// Arguments after argv[0], verbatim.
    pub args: Vec<String>,
    /// Bytes for stdin (the context JSON).
    pub stdin: Vec<u8>,
    /// Time allowed to deliver `stdin`.
    pub stdin_timeout: Duration,
    /// Cap per output stream, in bytes.
    pub max_output: usize,
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
    /// Keep the caller's environment (auth hooks) instead of the clean one.
    pub inherit_env: bool,
    /// Extra variables set on top.
    pub env: Vec<(String, String)>,
}

impl Spec {
    /// A script run with the clean environment and no time limit.
    pub fn new(path: PathBuf, args: Vec<String>, stdin: Vec<u8>) -> Spec {
        Spec {
            path,
            args,
            stdin,
            stdin_timeout: Duration::from_secs(10),
            max_output: 1 << 20,
            timeout: None,
            inherit_env: false,
            env: Vec::new(),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Exit code as reported on the wire.
    pub exit: i32,
    /// Captured stdout (at most `max_output` bytes).
    pub stdout: Vec<u8>,
    /// Captured stderr (at most `max_output` bytes).
    pub stderr: Vec<u8>,
    /// Some output was dropped because of the cap.
    pub truncated: bool,
    /// The time limit expired and the process group was killed.
    pub timed_out: bool,
    /// Bytes of stdin not delivered when `stdin_timeout` expired.
    pub stdin_unwritten: Option<usize>,
}

/// A capped sink for one output stream.
#[derive(Debug, Default)]
pub struct Capture {
    /// Kept bytes.
    pub data: Vec<u8>,
    cap: usize,
    /// Bytes seen beyond the cap.
    pub dropped: u64,
}

impl Capture {
    /// A capture keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Capture {
        Capture { data: Vec::new(), cap, dropped: 0 }
    }

    /// Take one chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        let room = self.cap.saturating_sub(self.data.len());
        let keep = room.min(chunk.len());
        self.data.extend_from_slice(&chunk[..keep]);
        self.dropped += (chunk.len() - keep) as u64;
    }

    /// Read `r` to its end into this capture.
    pub async fn drain(&mut self, mut r: impl smol::io::AsyncRead + Unpin) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => self.push(&buf[..n]),
            }
        }
    }
}

/// Kills the process group on drop unless disarmed.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    fn kill(&self) {
        if self.pgid > 0 {
            // SAFETY: signalling a process group we created; failure is harmless.
            unsafe {
                libc::kill(-self.pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.kill();
        }
    }
}

fn spawn_failure(spec: &Spec, e: &std::io::Error) -> Outcome {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR | libc::EISDIR) => 127,
        _ => -1,
    };
    Outcome {
        exit: code,
        stderr: format!("cannot execute {}: {e}\n", spec.path.display()).into_bytes(),
        ..Outcome::default()
    }
}

/// Run the script to completion (or to its time limit).
pub async fn run(spec: &Spec) -> Outcome {
    let mut std_cmd = std::process::Command::new(&spec.path);
    std_cmd.args(&spec.args).process_group(0);
    if !spec.inherit_env {
        std_cmd.env_clear().env("PATH", SAFE_PATH);
        for k in PASSED_ENV {
            if let Some(v) = std::env::var_os(k) {
                std_cmd.env(k, v);
            }
        }
    }
    std_cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    // async-process's From<std::process::Command> resets stdio: set it here.
    let mut cmd = smol::process::Command::from(std_cmd);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return spawn_failure(spec, &e),
    };
    let mut guard = GroupGuard { pgid: child.id() as i32, armed: true };
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());

    let written = Cell::new(0usize);
    let stdin_timed_out = Cell::new(false);
    let feed = async {
        let Some(mut pipe) = stdin else { return };
        let write = async {
            while written.get() < spec.stdin.len() {
                match pipe.write(&spec.stdin[written.get()..]).await {
                    Ok(0) | Err(_) => return, // the script closed stdin: fine
                    Ok(n) => written.set(written.get() + n),
                }
            }
            let _ = pipe.flush().await;
        };
        if crate::time::timeout(spec.stdin_timeout, write).await.is_none() {
            stdin_timed_out.set(true);
        }
        drop(pipe);
    };
    let mut out = Capture::new(spec.max_output);
    let mut err = Capture::new(spec.max_output);
    let (status, timed_out) = {
        let io = smol::future::zip(
            feed,
            smol::future::zip(
                async {
                    if let Some(s) = stdout {
                        out.drain(s).await
                    }
                },
                async {
                    if let Some(s) = stderr {
                        err.drain(s).await
                    }
                },
            ),
        );
        let mut io = pin!(io);
        let mut status_fut = pin!(child.status());
        let mut deadline = spec.timeout.map(Timer::after);
        let mut grace: Option<Timer> = None;
        let (mut status, mut io_done, mut timed_out) = (None, false, false);
        std::future::poll_fn(|cx| {
            loop {
                if !io_done && io.as_mut().poll(cx).is_ready() {
                    io_done = true;
                }
                if status.is_none()
                    && let Poll::Ready(s) = status_fut.as_mut().poll(cx)
                {
                    status = Some(s);
                    grace = Some(Timer::after(DRAIN_GRACE));
                }
                if status.is_some() && io_done {
                    return Poll::Ready(());
                }
                if let Some(t) = deadline.as_mut()
                    && std::pin::Pin::new(t).poll(cx).is_ready()
                {
                    timed_out = true;
                    deadline = None;
                    guard.kill();
                    continue; // poll again so the exit registers a wake-up
                }
                if let Some(g) = grace.as_mut()
                    && std::pin::Pin::new(g).poll(cx).is_ready()
                {
                    return Poll::Ready(()); // abandon pipes held by leftovers
                }
                return Poll::Pending;
            }
        })
        .await;
        (status, timed_out)
    };
    guard.armed = false;
    let exit = match status {
        Some(Ok(s)) => s.code().unwrap_or(if s.signal().is_some() { 126 } else { -1 }),
        Some(Err(_)) | None => -1,
    };
    Outcome {
        exit,
        truncated: out.dropped > 0 || err.dropped > 0,
        stdout: out.data,
        stderr: err.data,
        timed_out,
        stdin_unwritten: stdin_timed_out.get().then(|| spec.stdin.len() - written.get()),
    }
}

/// Write an executable script for a test without this process ever
/// holding it open for writing: `cp` writes it. A test thread spawning a
/// process at the same moment would otherwise carry our write descriptor
/// into its child until that child's exec, and the script's own exec would
/// then fail with "Text file busy" (ETXTBSY).
#[cfg(test)]
pub(crate) fn write_script(p: &std::path::Path, text: &str) {
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), text).unwrap();
    assert!(std::process::Command::new("cp").arg(src.path()).arg(p).status().unwrap().success());
    std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, args: &[&str]) -> Spec {
        let d = std::env::temp_dir().join(format!("ce-exec-{}", crate::wire::new_reqid()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("s.sh");
        write_script(&p, &format!("#!/bin/sh\n{script}\n"));
        Spec::new(p, args.iter().map(|s| s.to_string()).collect(), b"{\"ctx\":1}".to_vec())
    }

    #[test]
    fn argv_env_stdin() {
        let mut s = sh(
            r#"for a in "$@"; do printf '[%s]' "$a"; done; echo; cat; echo; env | sort | grep -v '^PWD=\|^SHLVL=\|^_='; exit 3"#,
            &["a b", "$(id)", "", ";rm"],
        );
        s.stdin = b"{\"reqid\":\"x\"}".to_vec();
        let o = smol::block_on(run(&s));
        let out = String::from_utf8(o.stdout).unwrap();
        assert_eq!(o.exit, 3, "{}", String::from_utf8_lossy(&o.stderr));
        assert!(out.starts_with("[a b][$(id)][][;rm]\n{\"reqid\":\"x\"}\n"), "{out}");
        assert!(out.contains(&format!("PATH={SAFE_PATH}")), "{out}");
        for line in out.lines().skip(2) {
            let k = line.split('=').next().unwrap();
            assert!(k == "PATH" || PASSED_ENV.contains(&k), "leaked {line}");
        }
    }

    #[test]
    fn output_cap_keeps_draining() {
        let mut s = sh("head -c 3000000 /dev/zero; head -c 10 /dev/zero >&2; echo done >&2", &[]);
        s.max_output = 1000;
        let o = smol::block_on(run(&s));
        assert_eq!(o.exit, 0);
        assert_eq!(o.stdout.len(), 1000);
        assert!(o.truncated);
        assert_eq!(o.stderr.len(), 15);
    }

    #[test]
    fn timeout_kills_the_group() {
        let marker = std::env::temp_dir().join(format!("ce-gc-{}", crate::wire::new_reqid()));
        let mut s = sh(&format!("(sleep 3; touch {}) & echo started; sleep 30", marker.display()), &[]);
        s.timeout = Some(Duration::from_millis(300));
        let t = std::time::Instant::now();
        let o = smol::block_on(run(&s));
        assert!(o.timed_out);
        assert_eq!(o.exit, 126);
        assert_eq!(o.stdout, b"started\n");
        assert!(t.elapsed() < Duration::from_secs(3));
        std::thread::sleep(Duration::from_millis(3300));
        assert!(!marker.exists(), "grandchild survived the group kill");
    }

    #[test]
    fn leftover_background_process_does_not_hold_the_reply() {
        let s = sh("sleep 30 & echo bye", &[]);
        let t = std::time::Instant::now();
        let o = smol::block_on(run(&s));
        assert_eq!(o.exit, 0);
        assert_eq!(o.stdout, b"bye\n");
        assert!(t.elapsed() < DRAIN_GRACE + Duration::from_secs(2));
    }

    #[test]
    fn stdin_timeout_closes_and_reports() {
        let mut s = sh("sleep 1; echo ok", &[]);
        s.stdin = vec![b'x'; 4 << 20];
        s.stdin_timeout = Duration::from_millis(200);
        let o = smol::block_on(run(&s));
        assert_eq!(o.exit, 0);
        assert!(o.stdin_unwritten.unwrap() > 3 << 20);
    }

    #[test]
    fn exec_failures_map_to_127() {
        let mut s = sh("exit 0", &[]);
        std::fs::set_permissions(&s.path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert_eq!(smol::block_on(run(&s)).exit, 127);
        s.path = PathBuf::from("/nonexistent/x");
        assert_eq!(smol::block_on(run(&s)).exit, 127);
        let s = sh("kill -TERM $$", &[]);
        assert_eq!(smol::block_on(run(&s)).exit, 126);
    }
}
