//! Network pairing on the dispatcher: `pairing-mode` (foreground, or
//! `start`/`stop` in the background), `list-requests`, `approve`, `deny`.
//!
//! The listener is one process on one thread with a task per waiting agent;
//! the protocol and the queue are in `ctrl_exec::pairing`.

use std::cell::RefCell;
use std::io::{BufRead, IsTerminal};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use argh::FromArgs;
use async_signal::{Signal, Signals};
use ctrl_exec::audit;
use ctrl_exec::config::DispatcherConfig;
use ctrl_exec::error::{AppResult, EXIT_FAIL, EXIT_OK, Fail};
use ctrl_exec::fsutil::{self, FileLock};
use ctrl_exec::offline;
use ctrl_exec::pairing::{self, Answer, ListenerCfg, Overrides, Pending, Queue};
use ctrl_exec::ratelimit::{RateLimit, Verdict};
use ctrl_exec::tls::TlsStream;
use ctrl_exec::wire::Obj;
use miniserde::json::Value;
use openssl::ssl::SslContext;
use smol::stream::StreamExt;
use smol::{Async, LocalExecutor, Timer};

use super::common::{self, Live, peer_ip};

#[derive(FromArgs)]
/// Accept pairing requests from agents on the pairing port (default 7444):
/// in the foreground (interactive on a terminal), or `start` / `stop` a
/// background session.
#[argh(subcommand, name = "pairing-mode", help_triggers("-h", "--help"))]
pub struct PairingMode {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// stop after this many seconds (1-600; default pairing_timeout or 600)
    #[argh(option)]
    timeout: Option<u64>,
    /// listen port (default pairing_port or 7444)
    #[argh(option)]
    port: Option<u16>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// internal: the detached process of `pairing-mode start`
    #[argh(switch)]
    background_child: bool,
    /// start or stop a background session (none: run in the foreground)
    #[argh(positional)]
    action: Option<String>,
}

#[derive(FromArgs)]
/// List pending pairing requests (requests whose agent is gone are dropped).
#[argh(subcommand, name = "list-requests", help_triggers("-h", "--help"))]
pub struct ListRequests {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// machine-readable output
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Approve a pending request: sign the agent's CSR, register the agent, and
/// send it its certificate over the connection it is waiting on.
#[argh(subcommand, name = "approve", help_triggers("-h", "--help"))]
pub struct Approve {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// how to address the agent: ip or hostname (default: the agent's suggestion, else hostname)
    #[argh(option)]
    lookup_by: Option<String>,
    /// address to register (default: the one the agent reported, else its source address)
    #[argh(option)]
    ip: Option<String>,
    /// the agent's port (default: the one it reported, else 7443)
    #[argh(option)]
    agent_port: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// the request id (from list-requests)
    #[argh(positional)]
    id: String,
}

#[derive(FromArgs)]
/// Deny a pending request; the agent is told "rejected by operator".
#[argh(subcommand, name = "deny", help_triggers("-h", "--help"))]
pub struct Deny {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// the request id (from list-requests)
    #[argh(positional)]
    id: String,
}

#[derive(FromArgs)]
/// Sign an offline pairing request read on stdin (from `ctrl-exec-agent
/// request-pairing --offline`): show its code, ask on the terminal, sign,
/// register the agent and print the reply for `install-reply`. Signing the
/// same request again prints the same reply.
#[argh(subcommand, name = "sign", help_triggers("-h", "--help"))]
pub struct Sign {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// do not ask (for scripts that compared the code themselves)
    #[argh(switch)]
    yes: bool,
    /// how to address the agent: ip or hostname (default: the request's, else hostname)
    #[argh(option)]
    lookup_by: Option<String>,
    /// address to register (default: the one in the request, if any)
    #[argh(option)]
    ip: Option<String>,
    /// the agent's port (default: the one in the request, else 7443)
    #[argh(option)]
    agent_port: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
}

const IDENT: &str = "ctrl-exec-dispatcher";

/// Ask a yes/no question on the controlling terminal (stdin carries the
/// request).
fn confirm(text: &str) -> Result<bool, Fail> {
    use std::io::Write;
    let tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty").map_err(|_| {
        Fail::usage("no terminal to ask for confirmation: compare the code yourself, then re-run with --yes")
    })?;
    let mut w = &tty;
    let _ = write!(w, "{text}");
    let _ = w.flush();
    let mut line = String::new();
    std::io::BufReader::new(&tty)
        .read_line(&mut line)
        .map_err(|e| Fail::new(format!("cannot read the answer: {e}")))?;
    Ok(matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes"))
}

/// `sign`: the CA's half of offline pairing.
pub fn sign(a: Sign) -> AppResult {
    use std::io::Read;
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit(IDENT, &cfg.log, a.log_stderr);
    let o = overrides(a.lookup_by, a.ip, a.agent_port)?;
    let mut text = String::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| Fail::new(format!("cannot read the request from stdin: {e}")))?;
    let req = offline::parse_request(&text)?;
    let store = offline::reply_store(&cfg.pairing.dir, &req);
    let again = |reply: String| {
        eprintln!("This request was signed before; here is the same reply again (no new certificate).");
        if !registered(&cfg, &req.hostname) {
            eprintln!(
                "Note: '{}' is no longer registered (unpaired?) and was not registered again: make a new request on the agent (request-pairing --offline --force).",
                req.hostname
            );
        }
        print!("{reply}");
        Ok(EXIT_OK)
    };
    if let Ok(reply) = std::fs::read_to_string(&store) {
        return again(reply);
    }
    let ip = o.ip.clone().or(req.ip.clone()).unwrap_or_default();
    let lookup = o.lookup_by.as_deref().or(req.lookup_by.as_deref()).unwrap_or("hostname");
    if lookup == "ip" && ip.is_empty() {
        return Err(Fail::usage(format!(
            "'{}' asks to be reached by address, but an offline request carries none: pass --ip <its address> (or --lookup-by hostname)",
            req.hostname
        )));
    }
    let mut about = format!(
        "Offline pairing request:\n  Agent: {}\n  Code:  {}\n  Port:  {}\n  Addr:  {}\n",
        req.hostname,
        req.code(),
        o.port.or(req.port).unwrap_or(ctrl_exec::registry::DEFAULT_PORT),
        if lookup == "ip" { ip.as_str() } else { "(by name)" }
    );
    let replaces = registered(&cfg, &req.hostname);
    if replaces {
        about.push_str(&format!(
            "  NOTE:  '{}' is already registered; signing replaces that registration\n",
            req.hostname
        ));
    }
    if a.yes {
        eprint!("{about}");
    } else if !confirm(&format!("{about}Sign it? Only if the agent's console shows code {}. [y/N] ", req.code()))? {
        eprintln!("Not signed; nothing changed.");
        return Ok(EXIT_FAIL);
    }
    // One signer at a time; whoever comes second prints the first's reply.
    let _lock = answer_lock(&cfg)?;
    if let Ok(reply) = std::fs::read_to_string(&store) {
        return again(reply);
    }
    let reqid = ctrl_exec::wire::new_reqid();
    let signed = pairing::sign_and_register(&cfg, &reqid, &req, &ip, &o)?;
    let reply = offline::render_reply(&req.hostname, &signed.approval);
    if let Some(d) = store.parent() {
        fsutil::ensure_dir(d, 0o700)?;
    }
    fsutil::atomic_write(&store, reply.as_bytes(), 0o600)?;
    audit::info(
        "pair-approve",
        &[("AGENT", &req.hostname), ("REQID", &reqid), ("SERIAL", &signed.serial), ("MODE", "offline")],
    );
    if replaces {
        eprintln!("This replaced the earlier registration of '{}' (its tags were kept).", req.hostname);
    }
    eprintln!(
        "Signed and registered '{}' (certificate serial {}). Paste this reply into 'ctrl-exec-agent install-reply':",
        req.hostname, signed.serial
    );
    print!("{reply}");
    Ok(EXIT_OK)
}

fn queue(cfg: &DispatcherConfig) -> Queue {
    Queue::new(&cfg.pairing.dir)
}

fn answer_lock(cfg: &DispatcherConfig) -> Result<FileLock, Fail> {
    fsutil::ensure_dir(&cfg.pairing.dir, 0o700)?;
    Ok(FileLock::exclusive(&cfg.pairing.dir.join(".answer.lock"))?)
}

/// Validate `approve`'s overrides with upstream's messages.
fn overrides(lookup_by: Option<String>, ip: Option<String>, port: Option<String>) -> Result<Overrides, Fail> {
    if let Some(l) = &lookup_by
        && pairing::lookup_by(Some(l)).is_none()
    {
        return Err(Fail::usage("--lookup-by must be 'ip' or 'hostname'"));
    }
    if let Some(i) = &ip
        && !pairing::is_ip(i)
    {
        return Err(Fail::usage("--ip must be an IPv4 or IPv6 address"));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.starts_with(|c: char| c.is_ascii_digit()) => Some(n),
            _ => return Err(Fail::usage("--agent-port must be a port number (1-65535)")),
        },
    };
    Ok(Overrides { lookup_by, ip, port })
}

/// Approve one request; returns the lines to show the operator.
fn approve_one(cfg: &DispatcherConfig, id: &str, o: &Overrides) -> Result<Vec<String>, Fail> {
    let q = queue(cfg);
    let _lock = answer_lock(cfg)?;
    let p = q.get(id)?.ok_or_else(|| Fail::new(format!("No pending request '{id}'")))?;
    if q.answer_of(id).is_some() {
        return Err(Fail::new(format!("Request '{id}' has already been answered")));
    }
    if !q.held(id) {
        q.remove(id);
        return Err(Fail::new(format!(
            "The agent '{}' that sent request '{id}' is no longer connected (pairing mode stopped, or the agent gave up).\nNothing was signed or registered. Ask it to run request-pairing again.",
            p.req.hostname
        )));
    }
    let replaced = registered(cfg, &p.req.hostname);
    let signed = pairing::sign_and_register(cfg, id, &p.req, &p.ip, o)?;
    q.answer(id, &Answer::Approved(signed.approval.to_json()))?;
    audit::info("pair-approve", &[("AGENT", &p.req.hostname), ("REQID", id), ("SERIAL", &signed.serial)]);
    let r = &signed.record;
    let mut lines = vec![
        format!("Approved '{}' ({id}). The certificate goes to the agent within a second.", r.hostname),
        format!(
            "  Registered:  {}   lookup_by={}   addr={}:{}",
            r.hostname,
            r.lookup_by,
            if r.lookup_by == "ip" { &r.ip } else { &r.hostname },
            r.port
        ),
    ];
    if replaced {
        lines.push(format!("  This replaced the earlier registration of '{}' (its tags were kept).", r.hostname));
    }
    if signed.approval.dispatcher_serial.is_empty() {
        lines.push("  WARNING: the dispatcher certificate has no serial; the agent will refuse every request.".into());
    }
    lines.push("  If this dispatcher cannot reach it that way, fix it without re-pairing:".into());
    // Behind NAT the agent reports its private address; the dispatcher
    // reaches it (if at all) at the address the request came from.
    let reach = if p.source_ip.is_empty() { &p.ip } else { &p.source_ip };
    if !reach.is_empty() {
        lines.push(format!("    ctrl-exec edit-agent {} --lookup-by ip --ip {}", r.hostname, reach));
    }
    if !p.reverse_dns.is_empty() && p.reverse_dns != r.hostname {
        lines.push(format!("    ctrl-exec edit-agent {} --rename {}", r.hostname, p.reverse_dns));
    }
    Ok(lines)
}

fn deny_one(cfg: &DispatcherConfig, id: &str) -> Result<String, Fail> {
    let q = queue(cfg);
    let _lock = answer_lock(cfg)?;
    let p = q.get(id)?.ok_or_else(|| Fail::new(format!("No pending request '{id}'")))?;
    if q.answer_of(id).is_some() {
        return Err(Fail::new(format!("Request '{id}' has already been answered")));
    }
    audit::info("pair-deny", &[("AGENT", &p.req.hostname), ("REQID", id)]);
    if q.held(id) {
        q.answer(id, &Answer::Denied(pairing::denial("rejected by operator")))?;
        Ok(format!("Denied request '{id}'."))
    } else {
        q.remove(id);
        Ok(format!("Denied request '{id}' (the agent had already disconnected)."))
    }
}

/// `approve <id>`.
pub fn approve(a: Approve) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit(IDENT, &cfg.log, a.log_stderr);
    let o = overrides(a.lookup_by, a.ip, a.agent_port)?;
    for l in approve_one(&cfg, &a.id, &o)? {
        println!("{l}");
    }
    Ok(EXIT_OK)
}

/// `deny <id>`.
pub fn deny(a: Deny) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit(IDENT, &cfg.log, a.log_stderr);
    println!("{}", deny_one(&cfg, &a.id)?);
    Ok(EXIT_OK)
}

/// `list-requests [--json]`.
pub fn list_requests(a: ListRequests) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    let q = queue(&cfg);
    q.expire();
    let list = q.list();
    if a.json {
        let items: Vec<Value> = list
            .iter()
            .map(|p| {
                Obj::new()
                    .s("id", &p.id)
                    .s("hostname", &p.req.hostname)
                    .s("ip", &p.ip)
                    .s("source_ip", &p.source_ip)
                    .s("reverse_dns", &p.reverse_dns)
                    .b("reverse_confirmed", p.reverse_confirmed)
                    .s("code", &p.code)
                    .s("received", &p.received)
                    .opt_s("lookup_by", p.req.lookup_by.as_deref())
                    .v("port", p.req.port.map(|n| ctrl_exec::wire::int(n as i64)).unwrap_or(Value::Null))
                    .into_value()
            })
            .collect();
        let arr: miniserde::json::Array = items.into_iter().collect();
        println!("{}", Obj::new().b("ok", true).v("requests", Value::Array(arr)).to_json());
        return Ok(EXIT_OK);
    }
    if list.is_empty() {
        println!("No pending pairing requests.");
        return Ok(EXIT_OK);
    }
    print!("{}", table(&list));
    Ok(EXIT_OK)
}

fn rdns(p: &Pending) -> String {
    if p.reverse_dns.is_empty() {
        "-".into()
    } else {
        format!("{} {}", p.reverse_dns, if p.reverse_confirmed { "(ok)" } else { "(?)" })
    }
}

fn table(list: &[Pending]) -> String {
    let mut s = format!("{:<18}{:<26}{:<18}{:<30}{}\n", "ID", "HOSTNAME", "SOURCE IP", "REVERSE DNS", "CODE");
    s.push_str(&"-".repeat(98));
    s.push('\n');
    for p in list {
        s.push_str(&format!("{:<18}{:<26}{:<18}{:<30}{}\n", p.id, p.req.hostname, p.source_ip, rdns(p), p.code));
    }
    s.push_str("\nReverse DNS is how this dispatcher resolves the agent's address; (ok) = forward-confirmed.\n");
    s.push_str("Compare CODE with the code the agent shows before you approve.\n");
    s
}

/// Is `name` already registered? (approving replaces that registration)
fn registered(cfg: &DispatcherConfig, name: &str) -> bool {
    ctrl_exec::registry::Registry::new(&cfg.registry_dir).get(name).ok().flatten().is_some()
}

fn details(cfg: &DispatcherConfig, p: &Pending) -> String {
    let mut s = format!(
        "  Agent:     {}\n  Code:      {}\n  ID:        {}\n  Received:  {}\n  Source IP: {}\n",
        p.req.hostname, p.code, p.id, p.received, p.source_ip
    );
    if registered(cfg, &p.req.hostname) {
        s.push_str(&format!(
            "  NOTE:      '{}' is already registered; approving replaces that registration\n",
            p.req.hostname
        ));
    }
    if p.ip != p.source_ip {
        s.push_str(&format!("  Reported:  {} (differs from the source address: NAT in between?)\n", p.ip));
    }
    s.push_str(&format!(
        "  Reverse:   {}\n",
        if p.reverse_dns.is_empty() {
            "none".to_string()
        } else {
            format!("{} ({})", p.reverse_dns, if p.reverse_confirmed { "forward-confirmed" } else { "unconfirmed" })
        }
    ));
    s
}

fn session_timeout(cfg: &DispatcherConfig, flag: Option<u64>) -> Result<u64, Fail> {
    let t = flag.unwrap_or(cfg.pairing.timeout);
    if !(1..=600).contains(&t) {
        return Err(Fail::usage("--timeout must be between 1 and 600 seconds"));
    }
    Ok(t)
}

/// `pairing-mode [start|stop]`.
pub fn pairing_mode(a: PairingMode) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit(IDENT, &cfg.log, a.log_stderr);
    let timeout = session_timeout(&cfg, a.timeout)?;
    let port = a.port.unwrap_or(cfg.pairing.port);
    match a.action.as_deref() {
        None if a.background_child => session(&cfg, port, timeout, false, true),
        None => {
            let interactive = std::io::stdin().is_terminal();
            session(&cfg, port, timeout, interactive, false)
        }
        Some("start") => start(&cfg, port, timeout, a.log_stderr),
        Some("stop") => stop(&cfg),
        Some(x) => {
            Err(Fail::usage(format!("unknown action '{x}': use start, stop, or nothing for a foreground session")))
        }
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } == 0
}

/// The pid of a running background session, if any (a stale pid file, or
/// one naming an unrelated process, counts as none).
fn running_session(cfg: &DispatcherConfig) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(&cfg.pairing.pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline).contains("pairing-mode");
    (pid_alive(pid) && ours).then_some(pid)
}

fn start(cfg: &DispatcherConfig, port: u16, timeout: u64, log_stderr: bool) -> AppResult {
    use std::os::unix::process::CommandExt;
    if let Some(pid) = running_session(cfg) {
        return Err(Fail::new(format!(
            "pairing mode is already running in the background (PID {pid}); stop it with 'ctrl-exec pairing-mode stop'"
        )));
    }
    let _ = std::fs::remove_file(&cfg.pairing.pidfile);
    let missing = common::missing(&[&cfg.cert, &cfg.key]);
    if !missing.is_empty() {
        return Err(Fail::new(format!("missing {} (run 'ctrl-exec setup-ctrl-exec' first)", missing.join(", "))));
    }
    let conf = std::fs::canonicalize(&cfg.path).unwrap_or(cfg.path.clone());
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("ctrl-exec").args(["ca", "pairing-mode", "--background-child", "--config"]).arg(&conf).args([
        "--timeout",
        &timeout.to_string(),
        "--port",
        &port.to_string(),
    ]);
    if log_stderr {
        cmd.arg("--log-stderr");
    }
    cmd.current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    common::new_session(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| Fail::new(format!("cannot start the background session: {e}")))?;
    let pid = child.id() as i32;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if running_session(cfg) == Some(pid) {
            println!("Pairing mode running in the background (PID {pid}, port {port}, stops in {timeout}s).");
            println!("Stop it with: ctrl-exec pairing-mode stop");
            return Ok(EXIT_OK);
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(Fail::new(format!("the background session ended at once ({st}): {}", err.trim())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(Fail::new(format!("the background session (PID {pid}) did not report in 5s; check the logs")))
}

fn stop(cfg: &DispatcherConfig) -> AppResult {
    let Some(pid) = running_session(cfg) else {
        let _ = std::fs::remove_file(&cfg.pairing.pidfile);
        println!("No background pairing mode is running.");
        return Ok(EXIT_OK);
    };
    // SAFETY: plain kill(2) on the pid our own session wrote.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let t = Instant::now();
    while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if pid_alive(pid) {
        return Err(Fail::new(format!("pairing mode (PID {pid}) did not stop within 5s")));
    }
    let _ = std::fs::remove_file(&cfg.pairing.pidfile);
    audit::info("pairing-mode-stop", &[("PID", &pid.to_string())]);
    println!("Pairing mode stopped (PID {pid}).");
    Ok(EXIT_OK)
}

enum Event {
    Conn(std::io::Result<(Async<TcpStream>, SocketAddr)>),
    Line(Option<String>),
    Stop(&'static str),
}

struct Session<'a> {
    cfg: &'a DispatcherConfig,
    tls: SslContext,
    listener: ListenerCfg,
    limit: RefCell<Option<RateLimit>>,
}

fn session(cfg: &DispatcherConfig, port: u16, timeout: u64, interactive: bool, background: bool) -> AppResult {
    let missing = common::missing(&[&cfg.cert, &cfg.key]);
    if !missing.is_empty() {
        return Err(Fail::new(format!("missing {} (run 'ctrl-exec setup-ctrl-exec' first)", missing.join(", "))));
    }
    let tls = ctrl_exec::tls::plain_server_context(&cfg.cert, &cfg.key)
        .map_err(|e| Fail::new(format!("cannot load the dispatcher certificate: {e}")))?;
    let ip: IpAddr = cfg.pairing.bind.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let addr = SocketAddr::new(ip, port);
    let tcp = TcpListener::bind(addr).and_then(Async::new).map_err(|e| {
        Fail::new(format!("cannot listen on {addr}: {e} (is another pairing session running? see 'pairing-mode stop')"))
    })?;
    let port = tcp.get_ref().local_addr().map(|a| a.port()).unwrap_or(port);
    let signals = Signals::new([Signal::Term, Signal::Int])
        .map_err(|e| Fail::new(format!("cannot install signal handlers: {e}")))?;
    let q = queue(cfg);
    fsutil::ensure_dir(&q.dir, 0o700)?;
    q.expire();
    if background {
        fsutil::atomic_write(&cfg.pairing.pidfile, format!("{}\n", std::process::id()).as_bytes(), 0o644)?;
        audit::info(
            "pairing-mode-start",
            &[("PID", &std::process::id().to_string()), ("TIMEOUT", &timeout.to_string())],
        );
    }
    audit::info("pairing-mode-start", &[("PORT", &port.to_string())]);
    if !background {
        println!("Pairing mode active on port {port} (auto-stops in {timeout}s). Ctrl-C ends it.");
        if !interactive {
            println!("Answer requests from another shell: ctrl-exec list-requests, then approve <id> or deny <id>.");
        }
    }
    let s = Session {
        cfg,
        tls,
        listener: ListenerCfg {
            queue: q,
            max_queue: cfg.pairing.max_queue,
            wait: pairing::APPROVAL_WAIT,
            poll: Duration::from_millis(250),
            request_timeout: Duration::from_secs(30),
            registry: Some(ctrl_exec::registry::Registry::new(&cfg.registry_dir)),
        },
        limit: RefCell::new(
            cfg.pairing.rate_limit.map(|(n, w, b)| RateLimit::new(n, Duration::from_secs(w), Duration::from_secs(b))),
        ),
    };
    let lines = interactive.then(stdin_lines);
    let ex = LocalExecutor::new();
    let why = smol::block_on(ex.run(accept_loop(&ex, &s, tcp, signals, Duration::from_secs(timeout), lines)));
    let action = if why == "timeout" { "pairing-mode-timeout" } else { "pairing-mode-stop" };
    audit::info(action, &[("PORT", &port.to_string())]);
    if background && running_session(cfg) == Some(std::process::id() as i32) {
        let _ = std::fs::remove_file(&cfg.pairing.pidfile);
    }
    if !background {
        println!("Pairing mode ended ({why}).");
    }
    Ok(EXIT_OK)
}

/// Lines typed on the terminal, read by a helper thread (stdin cannot be
/// read without blocking).
fn stdin_lines() -> smol::channel::Receiver<String> {
    let (tx, rx) = smol::channel::unbounded();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send_blocking(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    rx
}

async fn accept_loop<'a>(
    ex: &LocalExecutor<'a>,
    s: &'a Session<'a>,
    tcp: Async<TcpListener>,
    mut signals: Signals,
    limit: Duration,
    mut lines: Option<smol::channel::Receiver<String>>,
) -> &'static str {
    let live = Rc::new(std::cell::Cell::new(0usize));
    let deadline = Instant::now() + limit;
    let mut shown: Vec<String> = Vec::new();
    let mut listed: Vec<String> = Vec::new();
    let why = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = smol::future::or(
            smol::future::or(async { Event::Conn(tcp.accept().await) }, async {
                signals.next().await;
                Event::Stop("stopped")
            }),
            smol::future::or(
                async {
                    Timer::after(left).await;
                    Event::Stop("timeout")
                },
                async {
                    match &lines {
                        Some(rx) => match smol::future::or(async { rx.recv().await.ok() }, async {
                            Timer::after(Duration::from_millis(500)).await;
                            Some(String::new())
                        })
                        .await
                        {
                            Some(l) => Event::Line(Some(l)),
                            None => Event::Line(None),
                        },
                        None => std::future::pending().await,
                    }
                },
            ),
        )
        .await;
        match ev {
            Event::Conn(Ok((tcp, addr))) => {
                let ip = peer_ip(&addr);
                if s.limit.borrow().as_ref().is_some_and(|l| l.is_blocked(ip, Instant::now())) {
                    continue;
                }
                let guard = Live::enter(&live);
                ex.spawn(connection(s, tcp, ip, guard)).detach();
            }
            Event::Conn(Err(e)) => {
                audit::err("accept-error", &[("REASON", &e.to_string())]);
                Timer::after(Duration::from_millis(100)).await;
            }
            Event::Line(Some(l)) => {
                if interact(s, &l, &mut shown, &mut listed) {
                    break "quit";
                }
            }
            Event::Line(None) => {
                println!("(input closed; answer requests with 'ctrl-exec approve <id>' or 'deny <id>')");
                lines = None;
            }
            Event::Stop(why) => break why,
        }
    };
    drop(tcp);
    // Agents still waiting hear that the session ended rather than nothing.
    let q = &s.listener.queue;
    for p in q.list() {
        if q.held(&p.id) {
            let _ = q.answer(&p.id, &Answer::Denied(pairing::denial("pairing mode ended before approval")));
        }
    }
    let t = Instant::now();
    while live.get() > 0 && t.elapsed() < Duration::from_secs(3) {
        Timer::after(Duration::from_millis(50)).await;
    }
    why
}

async fn connection(s: &Session<'_>, tcp: Async<TcpStream>, ip: IpAddr, _live: Live) {
    // An agent's reachability probe connects and closes without a byte:
    // not an attempt, so not counted.
    let limit = Duration::from_secs(30);
    let probe = ctrl_exec::time::timeout(limit, async {
        let _ = tcp.readable().await;
        matches!(tcp.get_ref().peek(&mut [0u8; 1]), Ok(0))
    });
    if probe.await != Some(false) {
        return;
    }
    let failed = match ctrl_exec::time::timeout(limit, TlsStream::accept(&s.tls, tcp)).await {
        Some(Ok(mut tls)) => {
            let outcome = pairing::serve(&mut tls, ip, &s.listener).await;
            tls.close(Duration::from_millis(200)).await;
            outcome == pairing::Outcome::Refused
        }
        _ => true,
    };
    if failed && s.limit.borrow_mut().as_mut().map(|l| l.check(ip, Instant::now())) == Some(Verdict::BlockStarts) {
        audit::warn("rate-block", &[("IP", &ip.to_string()), ("PORT", "pairing")]);
    }
}

/// Handle one typed line (empty: a periodic look for new requests).
/// Returns true to end the session.
///
/// Numbers (`a2`) refer to the list as it was last shown, so a request
/// arriving or leaving in between never shifts the choice onto another one.
fn interact(s: &Session<'_>, line: &str, shown: &mut Vec<String>, listed: &mut Vec<String>) -> bool {
    let q = &s.listener.queue;
    let pending = q.list();
    let cmd = line.trim().to_ascii_lowercase();
    if cmd.is_empty() {
        let new: Vec<&Pending> = pending.iter().filter(|p| !shown.contains(&p.id)).collect();
        if new.is_empty() {
            return false;
        }
        for p in &new {
            shown.push(p.id.clone());
        }
        *listed = prompt(s.cfg, &pending);
        return false;
    }
    let pick = |rest: &str| -> Result<&Pending, String> {
        let id = if rest.is_empty() {
            match listed.as_slice() {
                [one] => one,
                _ => return Err("Which one? Use a1, d2, ... (see 'list').".into()),
            }
        } else {
            match rest.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).and_then(|i| listed.get(i)) {
                Some(id) => id,
                None => return Err("No such number in the last list; type 'list' to see it again.".into()),
            }
        };
        pending.iter().find(|p| p.id == *id).ok_or_else(|| format!("Request {id} is no longer pending."))
    };
    match cmd.as_str() {
        "q" | "quit" => return true,
        "l" | "list" => *listed = prompt(s.cfg, &pending),
        "s" | "skip" => println!("Left pending."),
        c if c.starts_with('a') || c.starts_with('d') => {
            let rest = c.trim_start_matches(|ch: char| ch.is_ascii_alphabetic());
            let p = match pick(rest) {
                Ok(p) => p,
                Err(why) => {
                    println!("{why}");
                    return false;
                }
            };
            let r = if c.starts_with('a') {
                approve_one(s.cfg, &p.id, &Overrides::default())
            } else {
                deny_one(s.cfg, &p.id).map(|l| vec![l])
            };
            match r {
                Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                Err(e) => println!("{e}"),
            }
        }
        _ => println!("Type a (accept), d (deny), s (skip), list, or quit."),
    }
    false
}

/// Show the pending requests; returns their ids in the order shown.
fn prompt(cfg: &DispatcherConfig, pending: &[Pending]) -> Vec<String> {
    match pending {
        [] => println!("No pending pairing requests."),
        [one] => {
            println!("\nPairing request:\n{}", details(cfg, one));
            println!("Accept, Deny, or Skip? [a/d/s]");
        }
        many => {
            println!("\n{} pending pairing requests:", many.len());
            for (i, p) in many.iter().enumerate() {
                println!("[{}]\n{}", i + 1, details(cfg, p));
            }
            println!("Type aN to accept, dN to deny request N, list, or quit.");
        }
    }
    pending.iter().map(|p| p.id.clone()).collect()
}
