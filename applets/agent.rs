//! The agent role (`ctrl-exec-agent`, `cea`, `ctrl-exec agent`).
//!
//! `serve` runs the mTLS listener on one thread: each connection is a task
//! on a local executor (no thread or process per connection), bounded by
//! `max_children`. The agent's whole state (config, allowlist, trusted map,
//! revocation list, TLS context) is one immutable snapshot behind an `Rc`;
//! SIGHUP builds a new snapshot and swaps it in, so connections already
//! running keep the one they started with and nothing in flight is dropped.
//! A reload that fails (a typo in agent.conf) keeps the old snapshot and says
//! why. SIGTERM/SIGINT stop accepting and give running scripts
//! `shutdown_grace` seconds to finish.

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use argh::FromArgs;
use async_signal::{Signal, Signals};
use ctrl_exec::allowlist::Allowlist;
use ctrl_exec::audit;
use ctrl_exec::bundle::Bundle;
use ctrl_exec::config::{AGENT_CONF, AgentConfig};
use ctrl_exec::error::{AppResult, EXIT_CONFIG, EXIT_FAIL, EXIT_OK, Fail};
use ctrl_exec::server::{self, AgentState, Peer};
use ctrl_exec::tls::TlsStream;
use ctrl_exec::trust::{self, TrustedMap};
use openssl::ssl::SslContext;
use smol::stream::StreamExt;
use smol::{Async, LocalExecutor, Timer};

use super::common::{self, Live, peer_ip};

mod pairing;

#[derive(FromArgs)]
/// ctrl-exec agent: serves allowlisted scripts to trusted dispatchers over mutual TLS.
#[argh(help_triggers("-h", "--help"))]
struct AgentCli {
    #[argh(subcommand)]
    verb: Option<Verb>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Verb {
    Serve(Serve),
    SelfCheck(SelfCheck),
    PairingStatus(PairingStatus),
    Paired(Paired),
    InstallBundle(InstallBundle),
    PromoteCert(PromoteCert),
    AsyncRun(AsyncRun),
    CertStaged(CertStaged),
    RequestPairing(pairing::RequestPairing),
    InstallReply(pairing::InstallReply),
}

#[derive(FromArgs)]
/// Run the mTLS listener (SIGHUP reloads, SIGTERM stops gracefully).
#[argh(subcommand, name = "serve", help_triggers("-h", "--help"))]
struct Serve {
    /// agent.conf (default /etc/ctrl-exec-agent/agent.conf)
    #[argh(option)]
    config: Option<String>,
    /// allowlist, overriding `allowlist` in agent.conf
    #[argh(option)]
    allowlist: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// load and check everything `serve` would, then exit (0, or 78 with the
    /// reason) without listening: for init scripts before a (re)start
    #[argh(switch)]
    check: bool,
}

#[derive(FromArgs)]
/// Check the configuration, allowlist, certificates and scripts offline;
/// exits non-zero if any check fails.
#[argh(subcommand, name = "self-check", help_triggers("-h", "--help"))]
struct SelfCheck {
    /// agent.conf (default /etc/ctrl-exec-agent/agent.conf)
    #[argh(option)]
    config: Option<String>,
    /// allowlist, overriding `allowlist` in agent.conf
    #[argh(option)]
    allowlist: Option<String>,
}

#[derive(FromArgs)]
/// Say whether this agent has an identity, and when it expires.
#[argh(subcommand, name = "pairing-status", help_triggers("-h", "--help"))]
struct PairingStatus {
    /// agent.conf (default /etc/ctrl-exec-agent/agent.conf)
    #[argh(option)]
    config: Option<String>,
}

#[derive(FromArgs)]
/// Exit 0 if certificate, key and CA files exist (for init scripts), else 1.
#[argh(subcommand, name = "paired", help_triggers("-h", "--help"))]
struct Paired {
    /// agent.conf (default /etc/ctrl-exec-agent/agent.conf)
    #[argh(option)]
    config: Option<String>,
}

#[derive(FromArgs)]
/// Install a staged renewed certificate if it is valid (run before `serve`,
/// e.g. from the init script); never fails, so it cannot block a start.
#[argh(subcommand, name = "promote-cert", help_triggers("-h", "--help"))]
struct PromoteCert {
    /// agent.conf (default /etc/ctrl-exec-agent/agent.conf)
    #[argh(option)]
    config: Option<String>,
}

#[derive(FromArgs)]
/// Internal: run one detached job handed over by `serve` on stdin.
#[argh(subcommand, name = "async-run", help_triggers("-h", "--help"))]
struct AsyncRun {
    /// write audit lines to syslog at this socket instead of stderr
    #[argh(option)]
    syslog_socket: Option<String>,
}

#[derive(FromArgs)]
/// Exit 0 if a renewed certificate is staged (waiting for `promote-cert`), else 1.
#[argh(subcommand, name = "cert-staged", help_triggers("-h", "--help"))]
struct CertStaged {
    /// agent.conf (default /etc/ctrl-exec-agent/agent.conf)
    #[argh(option)]
    config: Option<String>,
}

#[derive(FromArgs)]
/// Unpack an enrolment bundle (from `ctrl-exec-ca enroll --bundle`) read on stdin.
#[argh(subcommand, name = "install-bundle", help_triggers("-h", "--help"))]
struct InstallBundle {
    /// directory to install into (created if needed)
    #[argh(option)]
    dir: String,
    /// replace an existing, different agent identity in --dir
    #[argh(switch)]
    force: bool,
    /// absolute directory for what the agent writes while running (staged
    /// certificate, detached-run results) when --dir will be read-only, e.g.
    /// /var/lib/ctrl-exec-agent under the shipped systemd unit
    #[argh(option)]
    state_dir: Option<String>,
}

/// Entry point of the agent role.
pub fn main(invoked: &str, args: &[String]) -> AppResult {
    let cli: AgentCli = common::parse(invoked, args)?;
    match cli.verb {
        None => {
            let _ = common::parse::<AgentCli>(invoked, &["--help".into()]);
            Ok(EXIT_OK)
        }
        Some(Verb::Serve(a)) => serve(a),
        Some(Verb::SelfCheck(a)) => self_check(a),
        Some(Verb::PairingStatus(a)) => pairing_status(a),
        Some(Verb::Paired(a)) => Ok(match load_config(&a.config) {
            Ok(cfg) if common::missing(&[&cfg.cert, &cfg.key, &cfg.ca]).is_empty() => EXIT_OK,
            _ => EXIT_FAIL,
        }),
        Some(Verb::InstallBundle(a)) => install_bundle(a),
        Some(Verb::PromoteCert(a)) => promote_cert(a),
        Some(Verb::AsyncRun(a)) => async_run(a),
        Some(Verb::RequestPairing(a)) => pairing::request_pairing(a),
        Some(Verb::InstallReply(a)) => pairing::install_reply(a),
        Some(Verb::CertStaged(a)) => Ok(match load_config(&a.config) {
            Ok(cfg) if cfg.cert_staging_path.is_file() => EXIT_OK,
            _ => EXIT_FAIL,
        }),
    }
}

fn conf_path(flag: &Option<String>) -> PathBuf {
    PathBuf::from(flag.as_deref().unwrap_or(AGENT_CONF))
}

fn load_config(flag: &Option<String>) -> Result<AgentConfig, Fail> {
    let path = conf_path(flag);
    AgentConfig::load(&path).map_err(|e| Fail::config(format!("configuration error: {e}")))
}

/// Everything the listener swaps on reload.
struct Snapshot {
    state: Rc<AgentState>,
    tls: Rc<SslContext>,
    /// When `tls` (and so its ticket keys) was made.
    tls_since: Instant,
    /// What loading noticed, logged once the snapshot is taken into use.
    notes: Vec<(&'static str, String)>,
    /// Schema sidecars that were skipped or whose version was derived:
    /// (action, script, reason).
    schema_notes: Vec<(&'static str, String, String)>,
}

impl Snapshot {
    /// Log what loading noticed (only for a snapshot that is used, so a
    /// failed reload does not leave warnings about files it never adopted).
    fn announce(&self) {
        for (entry, msg) in &self.notes {
            if *entry == "revoked-serials-absent" {
                audit::info(
                    "revoked-serials-absent",
                    &[("PATH", msg), ("REASON", "file not found; nothing is revoked")],
                );
            } else {
                audit::warn("config-warn", &[("ENTRY", entry), ("MSG", msg)]);
            }
        }
        for (action, script, reason) in &self.schema_notes {
            audit::warn(action, &[("SCRIPT", script), ("REASON", reason)]);
        }
    }

    /// Replace the TLS context, which voids every resumption ticket it issued.
    /// Done every `tls_ticket_lifetime`, so no chain of resumed sessions
    /// outlives an hour since the full handshake (and certificate check) it
    /// started from. On failure the old context stays and we retry later.
    fn renew_tickets(&mut self) {
        let c = &self.state.config;
        match ctrl_exec::tls::server_context(&c.cert, &c.key, &c.ca, c.tls_ticket_lifetime) {
            Ok(tls) => self.tls = Rc::new(tls),
            Err(e) => audit::err("tls-renew-fail", &[("ERROR", &e.0), ("RESULT", "kept the running TLS context")]),
        }
        self.tls_since = Instant::now();
    }
}

/// Build a snapshot from the files on disk; log what was skipped.
fn load_snapshot(cfg: AgentConfig, allowlist: &Option<String>, log_stderr: bool) -> Result<Snapshot, Fail> {
    let list_path = allowlist.as_ref().map(PathBuf::from).unwrap_or_else(|| cfg.allowlist.clone());
    let list = Allowlist::load(&list_path, &cfg.script_dirs)
        .map_err(|e| Fail::config(format!("{e}\n(the allowlist is required: create it, even empty)")))?;
    let mut notes: Vec<(&'static str, String)> = list.warnings.iter().map(|w| ("allowlist", w.clone())).collect();
    for s in list.scripts.values() {
        if s.profile != "default" && !cfg.profiles.contains(&s.profile) {
            return Err(Fail::config(format!(
                "{}: script '{}' uses profile '{}', which {} does not define (add a [profile {}] section)",
                list_path.display(),
                s.name,
                s.profile,
                cfg.path.display(),
                s.profile
            )));
        }
    }
    let declared: Vec<&str> = cfg.profiles.iter().map(String::as_str).filter(|p| *p != "default").collect();
    if !declared.is_empty() {
        notes.push((
            "profiles",
            format!(
                "profiles {} are parsed but not enforced: this agent has no privilege-separated executor yet, so every script runs as the agent's own user",
                declared.join(", ")
            ),
        ));
    }
    if let Some(h) = &cfg.auth_hook
        && !ctrl_exec::fsutil::is_executable(h)
    {
        return Err(Fail::config(format!(
            "{}: auth_hook {} does not exist or is not executable",
            cfg.path.display(),
            h.display()
        )));
    }
    let trusted = TrustedMap::load(&cfg.trusted_dispatchers_path)
        .map_err(|e| Fail::config(format!("cannot read {}: {e}", cfg.trusted_dispatchers_path.display())))?;
    notes.extend(trusted.warnings.iter().map(|w| ("trusted-dispatchers", w.clone())));
    let revoked = trust::load_revoked(&cfg.revoked_serials)
        .map_err(|e| Fail::config(format!("cannot read {}: {e}", cfg.revoked_serials.display())))?;
    if !revoked.present {
        notes.push(("revoked-serials-absent", cfg.revoked_serials.display().to_string()));
    }
    notes.extend(revoked.warnings.iter().map(|w| ("revoked-serials", w.clone())));
    // Written at run time: say so at start rather than at the first detached
    // run or renewal (a read-only /etc under a service sandbox, typically).
    let staging_dir = cfg.cert_staging_path.parent().unwrap_or(Path::new("."));
    for (key, dir, what) in [
        ("async_runs_dir", cfg.async_runs_dir.as_path(), "detached (async) runs will be refused"),
        ("cert_staging_path", staging_dir, "certificate renewals cannot be staged"),
    ] {
        if let Err(why) = ctrl_exec::fsutil::check_writable_dir(dir) {
            notes.push((key, format!("{} is not writable ({why}): {what}", dir.display())));
        }
    }
    let mut schemas = std::collections::BTreeMap::new();
    let mut schema_notes = Vec::new();
    for s in list.scripts.values() {
        match ctrl_exec::allowlist::load_schema(&s.path) {
            Ok(Some((schema, note))) => {
                if let Some(n) = note {
                    schema_notes.push(("schema-version-derive", s.name.clone(), n));
                }
                schemas.insert(s.name.clone(), schema);
            }
            Ok(None) => {}
            Err(why) => schema_notes.push(("schema-skip", s.name.clone(), why)),
        }
    }
    let tls = ctrl_exec::tls::server_context(&cfg.cert, &cfg.key, &cfg.ca, cfg.tls_ticket_lifetime)
        .map_err(|e| Fail::config(format!("cannot set up TLS: {e}")))?;
    let state = AgentState {
        host: cfg.hostname.clone().unwrap_or_else(ctrl_exec::config::host_name),
        expiry: server::cert_expiry(&cfg.cert),
        log: if log_stderr { ctrl_exec::config::LogTarget::Stderr } else { cfg.log.clone() },
        schemas,
        allowlist: list,
        trusted: trusted.value,
        revoked: revoked.value,
        config: cfg,
    };
    Ok(Snapshot { state: Rc::new(state), tls: Rc::new(tls), tls_since: Instant::now(), notes, schema_notes })
}

fn not_paired(cfg: &AgentConfig) -> Option<String> {
    let missing = common::missing(&[&cfg.cert, &cfg.key, &cfg.ca]);
    (!missing.is_empty()).then(|| {
        format!(
            "not paired yet: missing {}\nOn the dispatcher: ctrl-exec-ca enroll <name> --ip <addr> --bundle > bundle.txt\nHere:            ctrl-exec-agent install-bundle --dir {} < bundle.txt",
            missing.join(", "),
            cfg.cert.parent().map(|p| p.display().to_string()).unwrap_or_else(|| ".".into())
        )
    })
}

fn serve(a: Serve) -> AppResult {
    let cfg = load_config(&a.config)?;
    common::init_audit("ctrl-exec-agent", &cfg.log, a.log_stderr);
    if let Some(msg) = not_paired(&cfg) {
        return Err(Fail::config(msg));
    }
    let addr = SocketAddr::new(cfg.bind.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0])), cfg.port);
    let snap = load_snapshot(cfg, &a.allowlist, a.log_stderr)?;
    if a.check {
        for (entry, msg) in snap.notes.iter().filter(|(e, _)| *e != "revoked-serials-absent") {
            eprintln!("warning: {entry}: {msg}");
        }
        println!("{}: configuration OK", snap.state.config.path.display());
        return Ok(EXIT_OK);
    }
    snap.announce();
    let listener =
        TcpListener::bind(addr).and_then(Async::new).map_err(|e| Fail::new(format!("cannot listen on {addr}: {e}")))?;
    let port = listener.get_ref().local_addr().map(|a| a.port()).unwrap_or(addr.port());
    let signals = Signals::new([Signal::Hup, Signal::Term, Signal::Int])
        .map_err(|e| Fail::new(format!("cannot install signal handlers: {e}")))?;
    audit::info(
        "start",
        &[("PORT", &port.to_string()), ("BIND", &addr.ip().to_string()), ("VERSION", ctrl_exec::VERSION)],
    );
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(accept_loop(&ex, listener, signals, snap, a)));
    Ok(EXIT_OK)
}

enum Event {
    Conn(std::io::Result<(Async<TcpStream>, SocketAddr)>),
    Signal(Option<std::io::Result<Signal>>),
}

/// What the listener and its connections share.
struct Shared {
    current: RefCell<Snapshot>,
    a: Serve,
    /// What only a restart changes: compared with every reload, not with the previous one.
    started: (u16, String, ctrl_exec::config::LogTarget),
    seen_generation: Cell<usize>,
    /// Connections with a request in progress (`max_children`).
    live: Rc<Cell<usize>>,
    /// Connections kept open, waiting for their next request.
    idle: Rc<Cell<usize>>,
    /// SIGTERM came: no connection is kept any more.
    stopping: Cell<bool>,
}

impl Shared {
    /// The state and TLS context for the next connection or request: picks
    /// up a trusted-map change made by `/rotate-serial` (likely on the same
    /// dispatcher's next request) and renews the ticket keys when due.
    fn fresh(&self) -> (Rc<AgentState>, Rc<SslContext>) {
        let generation = ctrl_exec::rotate::reload_generation();
        if generation != self.seen_generation.get() {
            self.seen_generation.set(generation);
            reload(&self.current, &self.a, &self.started, self.live.get());
        }
        let renew = {
            let c = self.current.borrow();
            c.tls_since.elapsed() >= c.state.config.tls_ticket_lifetime
        };
        if renew {
            self.current.borrow_mut().renew_tickets();
        }
        let c = self.current.borrow();
        (c.state.clone(), c.tls.clone())
    }
}

async fn accept_loop(
    ex: &LocalExecutor<'_>,
    listener: Async<TcpListener>,
    mut signals: Signals,
    snap: Snapshot,
    a: Serve,
) {
    let started = (snap.state.config.port, snap.state.config.bind.clone(), snap.state.config.log.clone());
    let shared = Rc::new(Shared {
        current: RefCell::new(snap),
        a,
        started,
        seen_generation: Cell::new(ctrl_exec::rotate::reload_generation()),
        live: Rc::new(Cell::new(0usize)),
        idle: Rc::new(Cell::new(0usize)),
        stopping: Cell::new(false),
    });
    let live = shared.live.clone();
    let rejecting = Rc::new(Cell::new(0usize));
    ctrl_exec::rotate::reload_by_signal();
    loop {
        let ev = smol::future::or(async { Event::Conn(listener.accept().await) }, async {
            Event::Signal(signals.next().await)
        })
        .await;
        match ev {
            Event::Conn(Ok((tcp, addr))) => {
                let (state, tls) = shared.fresh();
                if live.get() >= state.config.max_children {
                    // Answer 503 when we can afford the handshake; beyond that, just close.
                    if rejecting.get() < 32 {
                        let guard = Live::enter(&rejecting);
                        let n = live.get();
                        ex.spawn(async move {
                            let _g = guard;
                            reject_busy(tcp, addr, &tls, n).await;
                        })
                        .detach();
                    }
                    continue;
                }
                let guard = Live::enter(&live);
                let shared = shared.clone();
                ex.spawn(async move { connection(tcp, addr, &tls, state, &shared, guard).await }).detach();
            }
            Event::Conn(Err(e)) => {
                // Out of descriptors or an aborted connection: wait and go on.
                audit::err("accept-error", &[("PEER", "unknown"), ("REASON", &e.to_string())]);
                Timer::after(Duration::from_millis(100)).await;
            }
            Event::Signal(Some(Ok(Signal::Hup))) => {
                shared.seen_generation.set(ctrl_exec::rotate::reload_generation());
                reload(&shared.current, &shared.a, &shared.started, live.get());
            }
            Event::Signal(_) => break,
        }
    }
    drop(listener);
    shared.stopping.set(true);
    let grace = shared.current.borrow().state.config.shutdown_grace;
    audit::info("stop", &[("LIVE", &live.get().to_string()), ("GRACE", &grace.as_secs().to_string())]);
    let deadline = Instant::now() + grace;
    while live.get() > 0 && Instant::now() < deadline {
        Timer::after(Duration::from_millis(50)).await;
    }
    if live.get() > 0 {
        audit::warn("stop-forced", &[("LIVE", &live.get().to_string())]);
    }
}

/// Build a new snapshot from the files on disk and swap it in (SIGHUP, or a
/// trusted-map change made by `/rotate-serial`); on failure keep the old one.
fn reload(current: &RefCell<Snapshot>, a: &Serve, started: &(u16, String, ctrl_exec::config::LogTarget), live: usize) {
    let running = current.borrow().state.config.clone();
    match AgentConfig::load(&running.path)
        .map_err(|e| Fail::config(e.to_string()))
        .and_then(|cfg| load_snapshot(cfg, &a.allowlist, a.log_stderr))
    {
        Ok(next) => {
            let c = &next.state.config;
            if c.port != started.0 || c.bind != started.1 {
                audit::warn("reload-warn", &[("MSG", "port and bind changes take effect at the next restart")]);
            }
            if c.log != started.2 && !a.log_stderr {
                audit::warn("reload-warn", &[("MSG", "log and syslog_socket changes take effect at the next restart")]);
            }
            let s = &next.state;
            audit::info(
                "reload",
                &[
                    ("SCRIPTS", &s.allowlist.scripts.len().to_string()),
                    ("TRUSTED", &s.trusted.0.len().to_string()),
                    ("REVOKED", &s.revoked.len().to_string()),
                    ("LIVE", &live.to_string()),
                ],
            );
            next.announce();
            *current.borrow_mut() = next;
        }
        Err(f) => audit::err("reload-fail", &[("ERROR", &f.msg), ("RESULT", "kept the running configuration")]),
    }
}

async fn handshake(tcp: Async<TcpStream>, addr: &SocketAddr, tls: &SslContext, limit: Duration) -> Option<TlsStream> {
    let _ = tcp.get_ref().set_nodelay(true);
    let ip = peer_ip(addr).to_string();
    match ctrl_exec::time::timeout(limit, TlsStream::accept(tls, tcp)).await {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            audit::warn("tls-failure", &[("PEER", &ip), ("REASON", &e.0)]);
            None
        }
        None => {
            audit::warn("tls-failure", &[("PEER", &ip), ("REASON", "handshake timed out")]);
            None
        }
    }
}

/// Most requests one kept connection carries before the agent closes it.
const KEPT_REQUESTS: u32 = 1000;

/// One connection; `live` is released once the reply is written (the
/// lingering close after it does not hold one of the `max_children` slots).
///
/// A dispatcher that asks for it (our API server) may send further requests
/// on the same connection: the agent waits up to `keep_alive` for each one,
/// takes a `max_children` slot again when it arrives (503 and close when
/// none is free), and checks it against the state of that moment. A kept
/// connection ends after [`KEPT_REQUESTS`] requests, once it is older than
/// `tls_ticket_lifetime` (the bound on any resumed authentication), on
/// SIGTERM, and when `max_children` connections are already waiting.
async fn connection(
    tcp: Async<TcpStream>,
    addr: SocketAddr,
    tls: &SslContext,
    state: Rc<AgentState>,
    shared: &Shared,
    live: Live,
) {
    let born = Instant::now();
    // One deadline covers the handshake and the request together.
    let deadline = born + state.config.request_timeout;
    let Some(mut s) = handshake(tcp, &addr, tls, state.config.request_timeout).await else {
        return;
    };
    let mut peer = Peer::new(peer_ip(&addr), s.peer_serial_raw(), s.resumed());
    let may_keep = |state: &AgentState, n: u32| {
        !state.config.keep_alive.is_zero()
            && !shared.stopping.get()
            && n < KEPT_REQUESTS
            && born.elapsed() < state.config.tls_ticket_lifetime
            && shared.idle.get() < state.config.max_children
    };
    let mut served = server::handle(&mut s, &peer, &state, deadline, may_keep(&state, 1)).await;
    drop(live);
    let mut n = 1;
    while served.keep {
        if !common::next_request(&shared.idle, state.config.keep_alive, s.readable()).await || shared.stopping.get() {
            break;
        }
        let (state, _) = shared.fresh();
        if shared.live.get() >= state.config.max_children {
            audit::warn("overload", &[("PEER", &peer.ip.to_string()), ("LIVE", &shared.live.get().to_string())]);
            let r = server::busy_reply();
            let _ = ctrl_exec::http::write_response(&mut s, r.code, &r.body).await;
            break;
        }
        let live = Live::enter(&shared.live);
        n += 1;
        peer.kept = true;
        let deadline = Instant::now() + state.config.request_timeout;
        served = server::handle(&mut s, &peer, &state, deadline, may_keep(&state, n)).await;
        drop(live);
    }
    s.close(Duration::from_millis(500)).await;
}

async fn reject_busy(tcp: Async<TcpStream>, addr: SocketAddr, tls: &SslContext, live: usize) {
    audit::warn("overload", &[("PEER", &peer_ip(&addr).to_string()), ("LIVE", &live.to_string())]);
    let Some(mut s) = handshake(tcp, &addr, tls, Duration::from_secs(5)).await else {
        return;
    };
    let r = server::busy_reply();
    let _ = ctrl_exec::http::write_response(&mut s, r.code, &r.body).await;
    s.close(Duration::from_millis(200)).await;
}

fn self_check(a: SelfCheck) -> AppResult {
    let cfg = load_config(&a.config)?;
    common::init_audit("ctrl-exec-agent", &ctrl_exec::config::LogTarget::Stderr, true);
    let mut failed = 0usize;
    let mut total = 0usize;
    let mut check = |ok: bool, what: String| {
        total += 1;
        if !ok {
            failed += 1;
        }
        println!("  [{}] {what}", if ok { "ok  " } else { "FAIL" });
    };
    check(true, format!("config {} (port {}, bind {})", cfg.path.display(), cfg.port, cfg.bind));
    let list_path = a.allowlist.as_ref().map(PathBuf::from).unwrap_or_else(|| cfg.allowlist.clone());
    match Allowlist::load(&list_path, &cfg.script_dirs) {
        Ok(list) => {
            check(
                list.warnings.is_empty(),
                format!(
                    "allowlist {}: {} script(s), {} skipped or doubtful line(s)",
                    list_path.display(),
                    list.scripts.len(),
                    list.warnings.len()
                ),
            );
            for w in &list.warnings {
                println!("         {w}");
            }
            for s in list.scripts.values() {
                let exec = ctrl_exec::fsutil::is_executable(&s.path);
                let profile_ok = s.profile == "default" || cfg.profiles.contains(&s.profile);
                let detail = match (exec, profile_ok) {
                    (false, _) => "NOT EXECUTABLE".to_string(),
                    (true, false) => {
                        format!("profile '{}' is not defined in agent.conf", s.profile)
                    }
                    (true, true) => "executable".to_string(),
                };
                check(exec && profile_ok, format!("script {} -> {} ({detail})", s.name, s.path.display()));
            }
        }
        Err(e) => check(false, format!("allowlist: {e}")),
    }
    match not_paired(&cfg) {
        Some(msg) => check(false, msg.lines().next().unwrap_or("").to_string()),
        None => match ctrl_exec::ca::load_cert(&cfg.cert) {
            Ok(cert) => {
                let exp = ctrl_exec::ca::not_after(&cert);
                let left =
                    ctrl_exec::time::parse_openssl_date(&exp).map(|t| (t - ctrl_exec::time::unix_now()) / 86_400);
                check(
                    left.is_some_and(|d| d >= 0),
                    format!(
                        "certificate {} (serial {}, expires {exp})",
                        cfg.cert.display(),
                        ctrl_exec::ca::cert_serial(&cert)
                    ),
                );
                match ctrl_exec::ca::load_cert(&cfg.ca) {
                    Ok(ca) => check(
                        ctrl_exec::ca::verifies_against(&cert, &ca),
                        format!("certificate is signed by the CA in {}", cfg.ca.display()),
                    ),
                    Err(e) => check(false, e.to_string()),
                }
                match ctrl_exec::tls::server_context(&cfg.cert, &cfg.key, &cfg.ca, cfg.tls_ticket_lifetime) {
                    Ok(_) => check(true, "key matches certificate; TLS context builds".into()),
                    Err(e) => check(false, format!("TLS: {e}")),
                }
            }
            Err(e) => check(false, e.to_string()),
        },
    }
    match TrustedMap::load(&cfg.trusted_dispatchers_path) {
        Ok(t) => {
            let list: Vec<String> = t.value.0.iter().map(|(s, id)| format!("{s} -> {id}")).collect();
            check(
                !t.value.0.is_empty(),
                format!(
                    "trusted dispatchers {}: {}",
                    cfg.trusted_dispatchers_path.display(),
                    if list.is_empty() { "none (every request will be refused)".into() } else { list.join(", ") }
                ),
            );
        }
        Err(e) => check(false, format!("trusted dispatchers {}: {e}", cfg.trusted_dispatchers_path.display())),
    }
    match trust::load_revoked(&cfg.revoked_serials) {
        Ok(r) if !r.present => {
            check(true, format!("revocation list {}: absent (nothing revoked)", cfg.revoked_serials.display()))
        }
        Ok(r) => check(
            r.warnings.is_empty(),
            format!(
                "revocation list {}: {} serial(s), {} bad line(s)",
                cfg.revoked_serials.display(),
                r.value.len(),
                r.warnings.len()
            ),
        ),
        Err(e) => check(false, format!("revocation list {}: {e}", cfg.revoked_serials.display())),
    }
    let declared: Vec<&str> = cfg.profiles.iter().map(String::as_str).filter(|p| *p != "default").collect();
    if !declared.is_empty() {
        println!(
            "  [note] profiles {} are parsed but not enforced (no privilege-separated executor yet)",
            declared.join(", ")
        );
    }
    match &cfg.auth_hook {
        None => check(true, "auth hook: none".into()),
        Some(h) => check(ctrl_exec::fsutil::is_executable(h), format!("auth hook {}", h.display())),
    }
    if failed == 0 {
        println!("self-check: all {total} checks passed");
        Ok(EXIT_OK)
    } else {
        println!("self-check: {failed} of {total} checks FAILED");
        Ok(EXIT_FAIL)
    }
}

fn pairing_status(a: PairingStatus) -> AppResult {
    let cfg = match load_config(&a.config) {
        Ok(c) => c,
        Err(f) => {
            println!("Not paired. Reason: {}", f.msg);
            return Ok(if f.code == EXIT_CONFIG { EXIT_FAIL } else { f.code });
        }
    };
    let missing = common::missing(&[&cfg.cert, &cfg.key, &cfg.ca]);
    if !missing.is_empty() {
        println!("Not paired. Reason: missing file {}", missing.join(", "));
        return Ok(EXIT_FAIL);
    }
    match ctrl_exec::ca::load_cert(&cfg.cert) {
        Ok(c) => {
            println!("Paired. Certificate expires: {}", ctrl_exec::ca::not_after(&c));
            Ok(EXIT_OK)
        }
        Err(e) => {
            println!("Not paired. Reason: cannot parse cert: {e}");
            Ok(EXIT_FAIL)
        }
    }
}

fn promote_cert(a: PromoteCert) -> AppResult {
    let cfg = match load_config(&a.config) {
        Ok(c) => c,
        Err(f) => {
            eprintln!("promote-cert: nothing done: {}", f.msg);
            return Ok(EXIT_OK);
        }
    };
    common::init_audit("ctrl-exec-agent", &cfg.log, false);
    let staged = &cfg.cert_staging_path;
    let Ok(pem) = std::fs::read(staged) else {
        return Ok(EXIT_OK); // the common case: nothing to do, nothing to say
    };
    let result = ctrl_exec::renew::check_renewed_cert(&cfg, &pem).and_then(|_| {
        // Keep the live certificate's owner and mode (group-readable for the agent user).
        ctrl_exec::fsutil::atomic_replace(&cfg.cert, &pem, 0o644).map_err(|e| e.to_string())
    });
    let _ = std::fs::remove_file(staged);
    match result {
        Ok(()) => {
            audit::info("cert-promote", &[("STATUS", "installed")]);
            println!("Installed the renewed certificate from {} as {}.", staged.display(), cfg.cert.display());
        }
        Err(e) => {
            audit::warn("cert-promote", &[("ERROR", &e)]);
            println!("Discarded the staged certificate {}: {e}.", staged.display());
        }
    }
    Ok(EXIT_OK)
}

/// The detached runner: run the job's script, write its final record, log
/// its `run` line. File descriptor 3 is the script's lock, held until exit.
fn async_run(a: AsyncRun) -> AppResult {
    let target = match a.syslog_socket {
        Some(p) => ctrl_exec::config::LogTarget::Syslog(p.into()),
        None => ctrl_exec::config::LogTarget::Stderr,
    };
    common::init_audit("ctrl-exec-agent", &target, false);
    // The lock stays with this process: the script and anything it leaves
    // behind must not inherit it (nor be able to release it).
    // SAFETY: fcntl on a descriptor number only changes that descriptor's flags.
    unsafe {
        let flags = libc::fcntl(3, libc::F_GETFD);
        if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags | libc::FD_CLOEXEC) < 0 {
            return Err(Fail::new("the runner was started without its lock on descriptor 3"));
        }
    }
    let mut text = String::new();
    std::io::stdin()
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(|e| Fail::new(format!("cannot read the job: {e}")))?;
    let job = ctrl_exec::asyncrun::Job::from_json(&text).ok_or_else(|| Fail::new("malformed job on stdin"))?;
    let out = smol::block_on(ctrl_exec::exec::run(&job.spec()));
    if let Some(n) = out.stdin_unwritten {
        audit::warn("stdin-timeout", &[("BYTES", &n.to_string()), ("REQID", &job.reqid), ("SCRIPT", &job.script)]);
    }
    let store = ctrl_exec::asyncrun::Store::new(job.record.parent().and_then(|p| p.parent()).unwrap_or(Path::new(".")));
    if let Err(e) = store.write(&job.record, &job.done_record(&out)) {
        audit::err("async-store-fail", &[("REQID", &job.reqid), ("ERROR", &e.to_string())]);
    }
    let exit = out.exit.to_string();
    let args = miniserde::json::to_string(&ctrl_exec::wire::str_array(&job.args));
    let user = if job.username.is_empty() { "(none)" } else { job.username.as_str() };
    let mut fields = vec![
        ("SCRIPT", job.script.as_str()),
        ("EXIT", exit.as_str()),
        ("PEER", job.peer.as_str()),
        ("DISPATCHER", job.owner.as_str()),
        ("REQID", job.reqid.as_str()),
        ("USER", user),
        ("ARGS", args.as_str()),
        ("MODE", "async"),
    ];
    if out.timed_out {
        fields.push(("TIMEOUT", "killed"));
    }
    if out.truncated {
        fields.push(("TRUNCATED", "yes"));
    }
    audit::info("run", &fields);
    Ok(EXIT_OK)
}

fn install_bundle(a: InstallBundle) -> AppResult {
    let mut text = String::new();
    std::io::stdin()
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(|e| Fail::new(format!("cannot read the bundle from stdin: {e}")))?;
    let b = Bundle::parse(&text)?;
    let dir = Path::new(&a.dir);
    for line in b.install(dir, a.state_dir.as_deref().map(Path::new), a.force)? {
        println!("  {line}");
    }
    println!("Installed the identity of '{}' in {}.", b.name, dir.display());
    println!(
        "Add scripts to {}/scripts.conf, then start: ctrl-exec-agent serve --config {}/agent.conf",
        dir.display(),
        dir.display()
    );
    Ok(EXIT_OK)
}
