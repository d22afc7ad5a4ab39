//! Small helpers every role shares: argument parsing around argh, config
//! loading with operator-facing errors, and audit setup.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use argh::FromArgs;
use ctrl_exec::config::{DISPATCHER_CONF, DispatcherConfig, LogTarget};
use ctrl_exec::error::Fail;

/// Split argv at the first literal `--`: (before, after).
pub fn split_dashdash(args: &[String]) -> (Vec<String>, Vec<String>) {
    match args.iter().position(|a| a == "--") {
        Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
        None => (args.to_vec(), Vec::new()),
    }
}

/// Parse with argh; `--help` prints to stdout and ends the program with 0,
/// a usage error ends it with 2 after printing to stderr.
pub fn parse<T: FromArgs>(invoked: &str, args: &[String]) -> Result<T, Fail> {
    let cmd: Vec<&str> = invoked.split(' ').collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    T::from_args(&cmd, &argv).map_err(|e| match e.status {
        Ok(()) => {
            print!("{}", e.output);
            Fail { code: 0, msg: String::new() }
        }
        Err(()) => Fail::usage(format!("{}\nRun '{invoked} --help' for usage.", e.output.trim_end())),
    })
}

/// The dispatcher config path: `--config`, else `$CTRL_EXEC_CONFIG`, else the default.
pub fn dispatcher_conf_path(flag: &Option<String>) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var("CTRL_EXEC_CONFIG").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| DISPATCHER_CONF.into())
        .into()
}

/// Load ctrl-exec.conf; errors exit 78 naming file and line.
pub fn load_dispatcher(flag: &Option<String>) -> Result<DispatcherConfig, Fail> {
    let path = dispatcher_conf_path(flag);
    DispatcherConfig::load(&path)
        .map_err(|e| Fail::config(format!("configuration error: {e}\n(config file: {})", path.display())))
}

/// Start the audit trail for this process.
pub fn init_audit(ident: &'static str, target: &LogTarget, force_stderr: bool) {
    let t = if force_stderr { LogTarget::Stderr } else { target.clone() };
    ctrl_exec::audit::init(ident, &t);
}

/// Does `p` exist? (for readable "missing" messages)
pub fn missing(paths: &[&Path]) -> Vec<String> {
    paths.iter().filter(|p| !p.exists()).map(|p| p.display().to_string()).collect()
}

/// Counts a live connection until dropped (the listeners' `max_children`).
pub struct Live(Rc<Cell<usize>>);

impl Live {
    /// Count one more in `n` until the guard is dropped.
    pub fn enter(n: &Rc<Cell<usize>>) -> Live {
        n.set(n.get() + 1);
        Live(n.clone())
    }
}

/// Wait up to `wait` for the next request on a kept connection (`ready`:
/// the connection becomes readable), counted in `idle` meanwhile. True if
/// something arrived: data, or the peer's close.
pub async fn next_request(
    idle: &Rc<Cell<usize>>,
    wait: std::time::Duration,
    ready: impl std::future::Future<Output = std::io::Result<()>>,
) -> bool {
    let _waiting = Live::enter(idle);
    matches!(ctrl_exec::time::timeout(wait, ready).await, Some(Ok(())))
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// The peer's address, with IPv4-mapped IPv6 shown as IPv4.
pub fn peer_ip(addr: &SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Start `cmd` in a session of its own, so that it outlives the operator's
/// terminal and this process (background pairing sessions and requests).
pub fn new_session(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}
