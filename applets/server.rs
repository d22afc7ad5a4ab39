//! The HTTP API server (`ctrl-exec-server`, `ctrl-exec server`, alias
//! `ctrl-exec-api`): run, ping, discovery and status for cron jobs, tools and
//! AI agents, on `api_bind:api_port` (127.0.0.1:7445 by default).
//!
//! One thread, one task per connection (at most `api_max_children`, 503
//! above), one request per connection, HTTP/1.0 replies, JSON bodies. Every
//! request is logged (`api-request`) and then passes the pre-route gate: the
//! auth hook with action `api` and the request's path, or
//! `api_auth_default` when there is no hook. `/health` alone skips the gate,
//! so a load balancer can probe it. Agents are contacted through the same
//! engine as the CLI (`src/dispatch.rs`); TLS sessions to agents are kept in
//! memory, so repeated calls skip the RSA signatures. A dispatcher
//! certificate rotation is picked up without a restart (the engine looks at
//! the certificate files at most once a second; SIGHUP reloads them at once).

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::time::{Duration, Instant};

use argh::FromArgs;
use async_signal::{Signal, Signals};
use ctrl_exec::audit;
use ctrl_exec::dispatch::{self, Engine, LockError, ResolveError, RunRequest};
use ctrl_exec::error::{AppResult, EXIT_OK, Fail};
use ctrl_exec::hook::{self, Decision, NoHook};
use ctrl_exec::http::{self, Conn, HttpError, Limits, Request};
use ctrl_exec::runstore::{RunStore, TTL_SECS};
use ctrl_exec::tls::TlsStream;
use ctrl_exec::wire::{Obj, get_bool, get_str, get_str_array, parse_object, str_array, valid_script_name};
use miniserde::json::{Array, Object, Value};
use openssl::ssl::SslContext;
use smol::stream::StreamExt;
use smol::{Async, LocalExecutor, Timer};

use super::common::{self, Live, peer_ip};

/// The static OpenAPI document, served verbatim at `/openapi.json`.
const OPENAPI: &str = include_str!("../docs/openapi.json");

/// Time a client gets to send its request (TLS handshake included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(FromArgs)]
/// ctrl-exec HTTP API for tools and AI agents: run, ping, discovery, status.
#[argh(help_triggers("-h", "--help"))]
struct ServerCli {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
}

/// Everything a request handler may use.
struct App {
    engine: Engine,
    tls: Option<SslContext>,
    store: RunStore,
    /// Requests being served (`api_max_children`).
    live: Rc<Cell<usize>>,
    /// Client connections kept open, waiting for their next request.
    idle: Rc<Cell<usize>>,
    /// SIGTERM came: no connection is kept any more.
    stopping: Cell<bool>,
}

/// Most requests one kept client connection carries.
const KEPT_REQUESTS: u32 = 1000;

/// Entry point of the API server role.
pub fn main(invoked: &str, args: &[String]) -> AppResult {
    let a: ServerCli = common::parse(invoked, args)?;
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit("ctrl-exec-api", &cfg.log, a.log_stderr);
    let tls = match &cfg.api_tls {
        Some((cert, key)) => Some(
            ctrl_exec::tls::plain_server_context(cert, key)
                .map_err(|e| Fail::config(format!("API TLS (api_cert, api_key): {e}")))?,
        ),
        None => None,
    };
    let ip: IpAddr = cfg.api_bind.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let addr = SocketAddr::new(ip, cfg.api_port);
    let listener =
        TcpListener::bind(addr).and_then(Async::new).map_err(|e| Fail::new(format!("cannot listen on {addr}: {e}")))?;
    let port = listener.get_ref().local_addr().map(|a| a.port()).unwrap_or(addr.port());
    let signals = Signals::new([Signal::Term, Signal::Int, Signal::Hup])
        .map_err(|e| Fail::new(format!("cannot install signal handlers: {e}")))?;
    let store = RunStore::new(&cfg.runs_dir);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let engine =
        Engine::open(cfg, false).map_err(|e| Fail::new(format!("cannot load the dispatcher identity: {e}")))?;
    let app = App {
        engine,
        tls,
        store,
        live: Rc::new(Cell::new(0)),
        idle: Rc::new(Cell::new(0)),
        stopping: Cell::new(false),
    };
    audit::info(
        "api-start",
        &[
            ("PORT", &port.to_string()),
            ("BIND", &ip.to_string()),
            ("TLS", if app.tls.is_some() { "yes" } else { "no" }),
        ],
    );
    println!("ctrl-exec API listening on {scheme}://{}", SocketAddr::new(ip, port));
    let ex = LocalExecutor::new();
    smol::block_on(ex.run(accept_loop(&ex, &app, listener, signals)));
    audit::info("api-stop", &[]);
    Ok(EXIT_OK)
}

enum Event {
    Conn(std::io::Result<(Async<TcpStream>, SocketAddr)>),
    Reload,
    Stop,
}

async fn accept_loop<'a>(ex: &LocalExecutor<'a>, app: &'a App, listener: Async<TcpListener>, mut signals: Signals) {
    let live = app.live.clone();
    loop {
        let ev = smol::future::or(async { Event::Conn(listener.accept().await) }, async {
            match signals.next().await {
                Some(Ok(Signal::Hup)) => Event::Reload,
                _ => Event::Stop,
            }
        })
        .await;
        match ev {
            Event::Conn(Ok((tcp, addr))) => {
                let _ = tcp.get_ref().set_nodelay(true);
                let peer = peer_ip(&addr);
                let overloaded = live.get() >= app.engine.cfg.api_max_children;
                let guard = Live::enter(&live);
                let n = live.get();
                ex.spawn(connection(app, tcp, peer, overloaded.then_some(n), guard)).detach();
            }
            Event::Conn(Err(e)) => {
                audit::err("accept-error", &[("REASON", &e.to_string())]);
                Timer::after(Duration::from_millis(100)).await;
            }
            Event::Reload => match app.engine.reload_identities() {
                // The dispatcher certificate (after a rotation on another node, say).
                Ok(()) => {
                    let ids = app.engine.identities();
                    let prev = ids.previous.as_ref().map(|p| p.serial.as_str()).unwrap_or("(none)");
                    audit::info("identity-reload", &[("SERIAL", &ids.current.serial), ("PREVIOUS", prev)]);
                }
                Err(e) => {
                    audit::err("identity-reload-fail", &[("ERROR", &e.0), ("RESULT", "kept the loaded identity")])
                }
            },
            Event::Stop => break,
        }
    }
    drop(listener);
    app.stopping.set(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.get() > 0 && Instant::now() < deadline {
        Timer::after(Duration::from_millis(50)).await;
    }
}

/// A client connection, with or without TLS.
enum ApiConn {
    Plain(Async<TcpStream>),
    Tls(TlsStream),
}

impl Conn for ApiConn {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ApiConn::Plain(s) => Conn::read(s, buf).await,
            ApiConn::Tls(s) => Conn::read(s, buf).await,
        }
    }
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            ApiConn::Plain(s) => Conn::write_all(s, buf).await,
            ApiConn::Tls(s) => Conn::write_all(s, buf).await,
        }
    }
}

impl ApiConn {
    /// Wait until the client sends something (or closes).
    async fn readable(&self) -> std::io::Result<()> {
        match self {
            ApiConn::Plain(s) => s.readable().await,
            ApiConn::Tls(s) => s.readable().await,
        }
    }

    /// Stop writing, then drain what the client still sends for a moment, so
    /// it reads our reply instead of a reset.
    async fn close(self) {
        let linger = Duration::from_millis(500);
        match self {
            ApiConn::Tls(s) => s.close(linger).await,
            ApiConn::Plain(mut s) => {
                let _ = s.get_ref().shutdown(std::net::Shutdown::Write);
                let mut sink = [0u8; 4096];
                let _ = ctrl_exec::time::timeout(linger, async {
                    let mut total = 0usize;
                    while total < (4 << 20) {
                        match Conn::read(&mut s, &mut sink).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => total += n,
                        }
                    }
                })
                .await;
            }
        }
    }
}

/// A reply: status and JSON.
type Reply = (u16, String);

fn reply(code: u16, o: Obj) -> Reply {
    (code, o.to_json())
}

/// `{"ok":false,"error":<class>,"detail":<text>}`.
fn error(code: u16, class: &str, detail: &str) -> Reply {
    reply(code, Obj::new().b("ok", false).s("error", class).s("detail", detail))
}

/// One connection; `live` is released once the reply is written (the
/// lingering close after it does not hold a slot).
///
/// A client that asks for it (`Connection: keep-alive`, as HTTP/1.1
/// clients and `wrk` do) may send further requests on the connection: each
/// waits at most `api_keep_alive`, takes an `api_max_children` slot when it
/// arrives (503 and close when none is free) and is handled like a request
/// on a new connection. The connection ends after [`KEPT_REQUESTS`]
/// requests, on SIGTERM, and is not kept while `api_max_children`
/// connections are already waiting.
async fn connection(app: &App, tcp: Async<TcpStream>, peer: IpAddr, overloaded: Option<usize>, live: Live) {
    // One deadline for the handshake and the first request; then one per request.
    let mut deadline = Instant::now() + REQUEST_TIMEOUT;
    let peer_s = peer.to_string();
    let mut conn = match &app.tls {
        None => ApiConn::Plain(tcp),
        Some(ctx) => match ctrl_exec::time::timeout(REQUEST_TIMEOUT, TlsStream::accept(ctx, tcp)).await {
            Some(Ok(s)) => ApiConn::Tls(s),
            Some(Err(e)) => {
                audit::warn("tls-failure", &[("PEER", &peer_s), ("REASON", &e.0)]);
                return;
            }
            None => {
                audit::warn("tls-failure", &[("PEER", &peer_s), ("REASON", "handshake timed out")]);
                return;
            }
        },
    };
    let cfg = &app.engine.cfg;
    let mut overloaded = overloaded;
    let mut live = Some(live);
    let mut n = 0u32;
    loop {
        n += 1;
        let may_keep = !cfg.api_keep_alive.is_zero()
            && !app.stopping.get()
            && n < KEPT_REQUESTS
            && app.idle.get() < cfg.api_max_children;
        let ((code, body), keep) = if let Some(busy) = overloaded {
            audit::warn("api-overload", &[("PEER", &peer_s), ("LIVE", &busy.to_string())]);
            (error(503, "service unavailable", "too many concurrent requests"), false)
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            match ctrl_exec::time::timeout(left, http::read_request(&mut conn, &Limits::default())).await {
                None => (error(408, "request timeout", "the request did not arrive in time"), false),
                Some(Err(HttpError::Io(_))) => break,
                // A kept connection the client closed instead of using it.
                Some(Err(HttpError::Status(400, "empty request"))) if n > 1 => break,
                Some(Err(HttpError::Status(413, _))) => {
                    (error(413, "payload too large", "body exceeds 1048576 bytes"), false)
                }
                Some(Err(HttpError::Status(431, _))) => {
                    (error(431, "request header fields too large", "more than 32 header lines"), false)
                }
                Some(Err(HttpError::Status(c, m))) => (error(c, "bad request", m), false),
                Some(Ok(req)) => {
                    let len = req.body.len().to_string();
                    audit::info(
                        "api-request",
                        &[("METHOD", &req.method), ("PATH", &req.path), ("PEER", &peer_s), ("LEN", &len)],
                    );
                    (handle(app, &req, peer).await, may_keep && req.keep_alive)
                }
            }
        };
        let sent = if keep {
            http::write_response_kept(&mut conn, code, &body).await
        } else {
            http::write_response(&mut conn, code, &body).await
        };
        live = None;
        if !keep || sent.is_err() {
            break;
        }
        // Wait, without a slot, for the next request.
        if !common::next_request(&app.idle, cfg.api_keep_alive, conn.readable()).await || app.stopping.get() {
            break;
        }
        deadline = Instant::now() + REQUEST_TIMEOUT;
        overloaded = (app.live.get() >= cfg.api_max_children).then_some(app.live.get());
        live = Some(Live::enter(&app.live));
    }
    drop(live);
    conn.close().await;
}

/// Caller details every hook call shares.
struct Caller {
    ip: String,
    token: String,
    body: Option<Object>,
}

impl Caller {
    fn new(req: &Request, peer: IpAddr) -> Caller {
        let text = String::from_utf8_lossy(&req.body);
        let body = if text.trim_start().starts_with('{') { parse_object(&text) } else { None };
        let bearer = req
            .header("authorization")
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(|t| t.trim().to_string());
        let token = body.as_ref().and_then(|o| get_str(o, "token")).or(bearer).unwrap_or_default();
        Caller { ip: peer.to_string(), token, body }
    }

    fn username(&self) -> String {
        self.body.as_ref().and_then(|o| get_str(o, "username")).unwrap_or_default()
    }
}

impl App {
    fn no_hook(&self) -> NoHook {
        if self.engine.cfg.api_auth_default_allow { NoHook::ApiAllow } else { NoHook::ApiDeny }
    }

    async fn authorize(&self, ctx: &hook::Context) -> Result<(), Reply> {
        let cfg = &self.engine.cfg;
        match hook::authorize(cfg.auth_hook.as_deref(), cfg.auth_hook_timeout, ctx, self.no_hook()).await {
            Decision::Allow => Ok(()),
            Decision::Deny { .. } if cfg.auth_deny_generic => {
                Err(reply(403, Obj::new().b("ok", false).s("error", "forbidden")))
            }
            Decision::Deny { code, reason } => {
                Err(reply(403, Obj::new().b("ok", false).s("error", reason).i("code", code as i64)))
            }
        }
    }

    fn resolve(&self, hosts: &[String]) -> Result<Vec<ctrl_exec::client::Target>, Reply> {
        dispatch::resolve(&self.engine.registry(), hosts, None).map_err(|e| match e {
            ResolveError::Unknown(names) => {
                error(404, "unknown agent", &format!("not a registered agent: {}", names.join(", ")))
            }
            ResolveError::BadPort(t) => error(400, "bad request", &format!("invalid port in '{t}'")),
            ResolveError::Registry(e) => error(500, "internal error", &e.to_string()),
        })
    }
}

async fn handle(app: &App, req: &Request, peer: IpAddr) -> Reply {
    let (method, path) = (req.method.as_str(), req.path.as_str());
    if (method, path) == ("GET", "/health") {
        return reply(200, Obj::new().b("ok", true).s("version", ctrl_exec::VERSION));
    }
    let caller = Caller::new(req, peer);
    let gate = hook::Context {
        action: "api".into(),
        token: caller.token.clone(),
        source_ip: caller.ip.clone(),
        path: path.into(),
        ..Default::default()
    };
    if let Err(r) = app.authorize(&gate).await {
        return r;
    }
    let r = match (method, path) {
        ("GET", "/") => Ok(index()),
        ("GET", "/openapi.json") => Ok((200, OPENAPI.to_string())),
        ("GET", "/openapi-live.json") => live_spec(app, &caller).await,
        ("POST", "/ping") => ping(app, req, &caller).await,
        ("POST", "/run") => run(app, req, &caller).await,
        ("GET" | "POST", "/discovery") => discovery(app, method, &caller).await,
        ("GET", p) if p.strip_prefix("/status/").is_some_and(is_hex_id) => status(app, &p[8..], &caller).await,
        _ => Err(error(404, "not found", &format!("no route for {method} {path}"))),
    };
    r.unwrap_or_else(|e| e)
}

fn is_hex_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn index() -> Reply {
    let mut endpoints = Array::new();
    for (m, p) in [
        ("GET", "/health"),
        ("POST", "/ping"),
        ("POST", "/run"),
        ("GET", "/discovery"),
        ("POST", "/discovery"),
        ("GET", "/status/{reqid}"),
        ("GET", "/openapi.json"),
        ("GET", "/openapi-live.json"),
    ] {
        endpoints.push(Obj::new().s("method", m).s("path", p).into_value());
    }
    reply(
        200,
        Obj::new()
            .s("name", "ctrl-exec-api")
            .s("version", ctrl_exec::VERSION)
            .s("spec", "/openapi.json")
            .s("live_spec", "/openapi-live.json")
            .v("endpoints", Value::Array(endpoints)),
    )
}

/// The JSON body of a POST that requires one.
fn required_body(req: &Request, caller: &Caller) -> Result<Object, Reply> {
    if req.body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(error(400, "bad request", "request body required"));
    }
    caller.body.clone().ok_or_else(|| error(400, "bad request", "invalid JSON body"))
}

/// `hosts`: a non-empty array of strings.
fn hosts_of(o: &Object) -> Result<Vec<String>, Reply> {
    match get_str_array(o, "hosts") {
        Ok(Some(h)) if !h.is_empty() => Ok(h),
        _ => Err(error(400, "bad request", "hosts must be a non-empty array")),
    }
}

async fn ping(app: &App, req: &Request, caller: &Caller) -> Result<Reply, Reply> {
    let o = required_body(req, caller)?;
    let hosts = hosts_of(&o)?;
    let reqid = ctrl_exec::wire::new_reqid();
    app.authorize(&hook::Context {
        action: "ping".into(),
        hosts: hosts.clone(),
        username: caller.username(),
        token: caller.token.clone(),
        source_ip: caller.ip.clone(),
        reqid: reqid.clone(),
        ..Default::default()
    })
    .await?;
    let targets = app.resolve(&hosts)?;
    let mut results = Array::new();
    app.engine.ping(&targets, &reqid, |r| results.push(Value::Object(r))).await;
    Ok(reply(200, Obj::new().b("ok", true).v("results", Value::Array(results))))
}

async fn run(app: &App, req: &Request, caller: &Caller) -> Result<Reply, Reply> {
    let o = required_body(req, caller)?;
    let hosts = hosts_of(&o)?;
    let script = get_str(&o, "script").unwrap_or_default();
    if !valid_script_name(&script) {
        return Err(error(400, "bad request", "script name required (alphanumeric and hyphens only)"));
    }
    let args = match get_str_array(&o, "args") {
        Ok(a) => a.unwrap_or_default(),
        Err(_) => return Err(error(400, "bad request", "args must be an array")),
    };
    if args.iter().any(|a| a.contains('\0')) {
        return Err(error(400, "bad request", "arguments must not contain NUL bytes"));
    }
    let detach = get_bool(&o, "async") == Some(true);
    let username = caller.username();
    let reqid = ctrl_exec::wire::new_reqid();
    app.authorize(&hook::Context {
        action: "run".into(),
        script: script.clone(),
        hosts: hosts.clone(),
        args: args.clone(),
        username: username.clone(),
        token: caller.token.clone(),
        source_ip: caller.ip.clone(),
        reqid: reqid.clone(),
        ..Default::default()
    })
    .await?;
    let targets = app.resolve(&hosts)?;
    let _lock = match app.engine.lock(&targets, &script) {
        Ok(l) => l,
        Err(LockError::Conflicts(c)) => {
            return Err(reply(
                409,
                Obj::new().b("ok", false).s("error", "locked").i("code", 4).v("conflicts", str_array(&c)),
            ));
        }
        Err(LockError::Fs(e)) => return Err(error(500, "internal error", &format!("cannot take the run locks: {e}"))),
    };
    let run = RunRequest {
        script: script.clone(),
        args,
        reqid: reqid.clone(),
        username: username.clone(),
        token: caller.token.clone(),
    };
    if detach {
        let mut results = Vec::new();
        app.engine.submit(&targets, &run, |r| results.push(r)).await;
        let record = dispatch::async_record(&reqid, &script, &targets, &results, Some((&username, &caller.ip)));
        if let Err(e) = app.store.put(&reqid, &record) {
            audit::warn("run-store-fail", &[("REQID", &reqid), ("ERROR", &e.to_string())]);
        }
        let arr: Array = results.into_iter().map(Value::Object).collect();
        return Ok(reply(
            202,
            Obj::new().b("ok", true).s("reqid", &reqid).b("async", true).v("results", Value::Array(arr)),
        ));
    }
    let mut results = Array::new();
    app.engine.run(&targets, &run, |r| results.push(Value::Object(r))).await;
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    let record = Obj::new()
        .s("reqid", &reqid)
        .s("script", &script)
        .s("mode", "sync")
        .v("hosts", str_array(&names))
        .v("results", Value::Array(results.clone()))
        .i("completed", ctrl_exec::time::unix_now())
        .b("complete", true)
        .v("submitter", Obj::new().s("username", &username).s("source_ip", &caller.ip).into_value());
    if let Err(e) = app.store.put(&reqid, &record.0) {
        audit::warn("run-store-fail", &[("REQID", &reqid), ("ERROR", &e.to_string())]);
    }
    Ok(reply(200, Obj::new().b("ok", true).s("reqid", &reqid).v("results", Value::Array(results))))
}

async fn discovery(app: &App, method: &str, caller: &Caller) -> Result<Reply, Reply> {
    // POST may name hosts; an absent or unreadable body means "all agents".
    let named = match (method, &caller.body) {
        ("POST", Some(o)) => get_str_array(o, "hosts").ok().flatten().filter(|h| !h.is_empty()),
        _ => None,
    };
    let hosts = match named {
        Some(h) => h,
        None => app.engine.registry().names().map_err(|e| error(500, "internal error", &e.to_string()))?,
    };
    let mut by_host = Object::new();
    for r in capabilities(app, caller, &hosts).await? {
        let name = get_str(&r, "host").unwrap_or_default();
        by_host.insert(name, Value::Object(r));
    }
    Ok(reply(200, Obj::new().b("ok", true).v("hosts", Value::Object(by_host))))
}

/// `/capabilities` of `hosts`, after the hook check both discovery documents
/// pass (action `ping` with those hosts).
async fn capabilities(app: &App, caller: &Caller, hosts: &[String]) -> Result<Vec<Object>, Reply> {
    app.authorize(&hook::Context {
        action: "ping".into(),
        hosts: hosts.to_vec(),
        username: caller.username(),
        token: caller.token.clone(),
        source_ip: caller.ip.clone(),
        ..Default::default()
    })
    .await?;
    let targets = app.resolve(hosts)?;
    let mut caps = Vec::new();
    app.engine.capabilities(&targets, |r| caps.push(r)).await;
    Ok(caps)
}

/// `GET /openapi-live.json`: the static document with the fleet's hosts and
/// scripts as enums and the scripts' schemas in `x-ctrl-exec-scripts`,
/// rebuilt from `/capabilities` on every request. It tells as much as
/// `GET /discovery`, so it passes the same hook check (action `ping`, all hosts).
async fn live_spec(app: &App, caller: &Caller) -> Result<Reply, Reply> {
    let names = app.engine.registry().names().map_err(|e| error(500, "internal error", &e.to_string()))?;
    let caps = capabilities(app, caller, &names).await?;
    let now = u64::try_from(ctrl_exec::time::unix_now()).unwrap_or(0);
    ctrl_exec::openapi::live(OPENAPI, &names, &caps, now)
        .map(|doc| (200, doc))
        .map_err(|e| error(500, "internal error", &e.to_string()))
}

async fn status(app: &App, reqid: &str, caller: &Caller) -> Result<Reply, Reply> {
    app.store.purge(Duration::from_secs(TTL_SECS));
    let not_found = || error(404, "not found", &format!("no result for reqid {reqid}"));
    let mut record = match app.store.get(reqid) {
        Ok(Some(r)) => r,
        Ok(None) => return Err(not_found()),
        Err(e) => return Err(error(500, "cannot read result", &e.to_string())),
    };
    let submitter = match record.remove("submitter") {
        Some(Value::Object(s)) => {
            Some((get_str(&s, "username").unwrap_or_default(), get_str(&s, "source_ip").unwrap_or_default()))
        }
        _ => None,
    };
    let ctx = hook::Context {
        action: "status".into(),
        token: caller.token.clone(),
        source_ip: caller.ip.clone(),
        reqid: reqid.into(),
        submitter,
        ..Default::default()
    };
    // A refusal looks exactly like an unknown id: no existence disclosure.
    app.authorize(&ctx).await.map_err(|_| not_found())?;
    if get_str(&record, "mode").as_deref() == Some("async") && get_bool(&record, "complete") != Some(true) {
        app.engine.refresh(&mut record).await;
        let mut stored = record.clone();
        if let Some((u, ip)) = &ctx.submitter {
            stored.insert("submitter".into(), Obj::new().s("username", u).s("source_ip", ip).into_value());
        }
        if let Err(e) = app.store.put(reqid, &stored) {
            audit::warn("run-store-fail", &[("REQID", reqid), ("ERROR", &e.to_string())]);
        }
    }
    record.insert("ok".into(), Value::Bool(true));
    Ok((200, miniserde::json::to_string(&record)))
}
