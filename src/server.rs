//! The agent's handling of one authenticated connection.
//!
//! [`handle`] takes a stream on which the mTLS handshake has already
//! succeeded, the peer's identity and a snapshot of the agent's state, and
//! answers exactly one request. It does not care who dialled: the listener in
//! `applets/agent.rs` produces such streams today, and a reverse-connection
//! transport (the agent dials out from behind NAT) can produce them later.
//!
//! Order of checks (wire.md §1.7, §2.3): revoked serial → read the request
//! (limits, timeout) → route → trusted-dispatcher gate → parse → allowlist →
//! agent auth hook → execute. Application refusals on `/run` are HTTP 200
//! with `exit: -1` and an `error`, as the Perl dispatcher expects.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use miniserde::json::{Array, Object, Value};

use crate::allowlist::Allowlist;
use crate::audit;
use crate::config::AgentConfig;
use crate::hook::{self, Decision, NoHook};
use crate::http::{self, Conn, HttpError, Limits};
use crate::trust::TrustedMap;
use crate::wire::{Obj, get_bool, get_str, get_str_array, parse_object, str_array};

/// Who is on the other end.
#[derive(Debug, Clone)]
pub struct Peer {
    /// TCP source address.
    pub ip: IpAddr,
    /// Certificate serial as read from TLS (lowercase, e.g. `02`).
    pub serial_raw: String,
    /// Canonical serial.
    pub serial: String,
    /// The TLS session was resumed (the certificate was checked in an
    /// earlier full handshake of the same ticket).
    pub resumed: bool,
    /// This request came on a connection kept open after an earlier one.
    pub kept: bool,
}

impl Peer {
    /// Build from the address, the raw serial and how the session started.
    pub fn new(ip: IpAddr, serial_raw: String, resumed: bool) -> Peer {
        let serial = crate::wire::canonical_serial(&serial_raw).unwrap_or_default();
        Peer { ip, serial_raw, serial, resumed, kept: false }
    }

    /// `full`, `resumed` or `kept` (a connection kept open after an earlier
    /// request), for the audit trail.
    pub fn tls(&self) -> &'static str {
        if self.kept {
            "kept"
        } else if self.resumed {
            "resumed"
        } else {
            "full"
        }
    }
}

/// Everything a request may consult; replaced whole on SIGHUP, so a request
/// in flight keeps the snapshot it started with.
#[derive(Debug, Clone)]
pub struct AgentState {
    /// agent.conf.
    pub config: AgentConfig,
    /// scripts.conf.
    pub allowlist: Allowlist,
    /// Trusted dispatchers.
    pub trusted: TrustedMap,
    /// Revoked serials.
    pub revoked: BTreeSet<String>,
    /// Host name reported to dispatchers.
    pub host: String,
    /// Our certificate's notAfter (or `unknown`).
    pub expiry: String,
    /// Where this agent's audit lines go (passed on to detached runners).
    pub log: crate::config::LogTarget,
    /// Schema sidecars of allowlisted scripts, by script name.
    pub schemas: std::collections::BTreeMap<String, crate::allowlist::Schema>,
}

/// A reply: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub code: u16,
    /// JSON text.
    pub body: String,
}

fn reply(code: u16, o: Obj) -> Reply {
    Reply { code, body: o.to_json() }
}

fn error_reply(code: u16, msg: &str) -> Reply {
    reply(code, Obj::new().s("error", msg))
}

/// What [`handle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The status sent (0 if none).
    pub code: u16,
    /// The reply said `Connection: keep-alive`: another request may follow.
    pub keep: bool,
}

/// Answer one request on `conn`; the request must have arrived by
/// `deadline`. With `may_keep`, a client that asked to keep the connection
/// (`Connection: keep-alive`, our dispatcher's API server) is told it may;
/// anyone else gets upstream's reply byte for byte and the connection ends.
pub async fn handle<C: Conn>(
    conn: &mut C,
    peer: &Peer,
    state: &AgentState,
    deadline: std::time::Instant,
    may_keep: bool,
) -> Served {
    let peer_ip = peer.ip.to_string();
    let mut keep = false;
    // The revocation list and the serial gate are checked on every request,
    // with the state of the moment: a kept connection loses its rights at
    // the same reload as a new one.
    let r = if !peer.serial.is_empty() && state.revoked.contains(&peer.serial) {
        audit::warn("revoked-cert", &[("PEER", &peer_ip), ("SERIAL", &peer.serial), ("TLS", peer.tls())]);
        error_reply(403, "certificate revoked")
    } else {
        let limits = Limits::default();
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match crate::time::timeout(left, http::read_request(conn, &limits)).await {
            None => {
                audit::warn("request-timeout", &[("PEER", &peer_ip)]);
                error_reply(408, "request timeout")
            }
            Some(Err(HttpError::Io(_))) => return Served { code: 0, keep: false },
            // A kept connection the client closed instead of using it.
            Some(Err(HttpError::Status(400, "empty request"))) if peer.kept => return Served { code: 0, keep: false },
            Some(Err(HttpError::Status(code, msg))) => {
                audit::warn("bad-request", &[("PEER", &peer_ip), ("STATUS", &code.to_string()), ("REASON", msg)]);
                error_reply(code, msg)
            }
            Some(Ok(req)) => {
                keep = may_keep && req.keep_alive;
                route(&req, peer, state).await
            }
        }
    };
    let sent = if keep {
        http::write_response_kept(conn, r.code, &r.body).await
    } else {
        http::write_response(conn, r.code, &r.body).await
    };
    match sent {
        Ok(()) => Served { code: r.code, keep },
        Err(_) => Served { code: 0, keep: false },
    }
}

async fn route(req: &http::Request, peer: &Peer, state: &AgentState) -> Reply {
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/run") => run(req, peer, state).await,
        ("POST", "/ping") => ping(req, peer, state),
        ("GET", "/capabilities") => capabilities(peer, state).await,
        ("POST", "/rotate-serial") => crate::rotate::rotate_serial(req, peer, state).await,
        ("GET", p) if p.strip_prefix("/result/").is_some_and(crate::wire::valid_reqid) => result(&p[8..], peer, state),
        // Renewal (src/renew.rs): behind the trusted-dispatcher gate, unlike upstream.
        ("POST", "/renew") => match gate(peer, state, &crate::renew::reqid_of(req)) {
            Ok(d) => crate::renew::serve_renew(req, peer, d, state).await,
            Err(r) => r,
        },
        ("POST", "/renew-complete") => match gate(peer, state, &crate::renew::reqid_of(req)) {
            Ok(d) => crate::renew::serve_renew_complete(req, peer, d, state).await,
            Err(r) => r,
        },
        _ => error_reply(404, "not found"),
    }
}

/// The trusted-dispatcher gate: the caller's dispatcher id, or a 403.
pub(crate) fn gate<'a>(peer: &Peer, state: &'a AgentState, reqid: &str) -> Result<&'a str, Reply> {
    match state.trusted.lookup(&peer.serial) {
        Some(id) => Ok(id),
        None => {
            let reqid = if reqid.is_empty() { "(none)" } else { reqid };
            audit::warn(
                "serial-reject",
                &[("PEER", &peer.ip.to_string()), ("PEER_SERIAL", &peer.serial), ("REQID", reqid)],
            );
            Err(reply(403, Obj::new().s("error", "serial mismatch").s("status", "forbidden")))
        }
    }
}

fn body_text(req: &http::Request) -> String {
    String::from_utf8_lossy(&req.body).into_owned()
}

async fn run(req: &http::Request, peer: &Peer, state: &AgentState) -> Reply {
    let parsed = parse_object(&body_text(req));
    let reqid = parsed.as_ref().and_then(|o| get_str(o, "reqid")).unwrap_or_default();
    let dispatcher = match gate(peer, state, &reqid) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let peer_ip = peer.ip.to_string();
    let bad = |why: &str| {
        audit::warn(
            "bad-request",
            &[("PEER", &peer_ip), ("DISPATCHER", dispatcher), ("REQID", &reqid), ("REASON", why)],
        );
    };
    let Some(o) = parsed else {
        bad("invalid JSON");
        return reply(200, Obj::new().i("exit", -1).s("error", "invalid JSON"));
    };
    let Ok(args) = get_str_array(&o, "args") else {
        bad("args must be an array");
        return reply(200, Obj::new().i("exit", -1).s("error", "args must be an array").s("reqid", &reqid));
    };
    let args = args.unwrap_or_default();
    let script = get_str(&o, "script").unwrap_or_default();
    let username = get_str(&o, "username").unwrap_or_default();
    let token = get_str(&o, "token").unwrap_or_default();
    let refuse =
        |msg: &str| reply(200, Obj::new().s("script", &script).i("exit", -1).s("error", msg).s("reqid", &reqid));
    let detached = get_bool(&o, "async") == Some(true);
    if detached && !crate::wire::valid_reqid(&reqid) {
        bad("async run without a valid reqid");
        return refuse("async run requires a valid reqid");
    }
    if args.iter().any(|a| a.contains('\0')) {
        bad("NUL byte in an argument");
        return refuse("arguments must not contain NUL bytes");
    }
    // `REFUSAL` for the allowlist's verdict, `REASON` for the hook's (upstream's key).
    let log_deny = |key: &str, why: &str| {
        audit::warn(
            "deny",
            &[("SCRIPT", &script), ("PEER", &peer_ip), ("REQID", &reqid), ("DISPATCHER", dispatcher), (key, why)],
        );
    };
    let dirs = &state.config.script_dirs;
    let entry = match state.allowlist.resolve(&script, dirs) {
        Ok(e) => e,
        Err(why) => {
            log_deny("REFUSAL", why.reason());
            return refuse("script not permitted");
        }
    };
    let args_json = miniserde::json::to_string(&str_array(&args));
    let ctx = hook::Context {
        action: "run".into(),
        script: script.clone(),
        args: args.clone(),
        username: username.clone(),
        token: token.clone(),
        source_ip: peer_ip.clone(),
        dispatcher: dispatcher.into(),
        dispatcher_serial: peer.serial_raw.clone(),
        reqid: reqid.clone(),
        ..Default::default()
    };
    if let Decision::Deny { reason, .. } =
        hook::authorize(state.config.auth_hook.as_deref(), state.config.auth_hook_timeout, &ctx, NoHook::AgentPass)
            .await
    {
        log_deny("REASON", &reason);
        return refuse(&format!("not authorised: {reason}"));
    }
    let stdin = Obj::new()
        .s("script", &script)
        .v("args", str_array(&args))
        .s("reqid", &reqid)
        .s("peer_ip", &peer_ip)
        .s("username", &username)
        .s("token", &token)
        .s("dispatcher", dispatcher)
        .s("timestamp", crate::time::now_iso())
        .to_json();
    if detached {
        let job = crate::asyncrun::Job {
            record: PathBuf::new(),
            reqid: reqid.clone(),
            script: script.clone(),
            owner: dispatcher.to_string(),
            started: crate::time::now_iso(),
            path: entry.path.clone(),
            args,
            stdin,
            stdin_timeout: state.config.stdin_timeout.as_secs(),
            max_output: state.config.max_output as u64,
            timeout: entry.timeout.map(|t| t.as_secs()).unwrap_or(0),
            peer: peer_ip.clone(),
            username: username.clone(),
        };
        return start_detached(job, state).await;
    }
    let spec = crate::exec::Spec {
        stdin_timeout: state.config.stdin_timeout,
        max_output: state.config.max_output,
        timeout: entry.timeout,
        ..crate::exec::Spec::new(entry.path.clone(), args, stdin.into_bytes())
    };
    let out = crate::exec::run(&spec).await;
    if let Some(n) = out.stdin_unwritten {
        audit::warn("stdin-timeout", &[("BYTES", &n.to_string()), ("REQID", &reqid), ("SCRIPT", &script)]);
    }
    let exit = out.exit.to_string();
    let user = if username.is_empty() { "(none)" } else { username.as_str() };
    let mut fields = vec![
        ("SCRIPT", script.as_str()),
        ("EXIT", exit.as_str()),
        ("PEER", peer_ip.as_str()),
        ("DISPATCHER", dispatcher),
        ("REQID", reqid.as_str()),
        ("USER", user),
        ("ARGS", args_json.as_str()),
        ("TLS", peer.tls()),
    ];
    if out.timed_out {
        fields.push(("TIMEOUT", "killed"));
    }
    if out.truncated {
        fields.push(("TRUNCATED", "yes"));
    }
    audit::info("run", &fields);
    let mut r = Obj::new()
        .s("script", &script)
        .i("exit", out.exit as i64)
        .s("stdout", String::from_utf8_lossy(&out.stdout))
        .s("stderr", String::from_utf8_lossy(&out.stderr))
        .s("reqid", &reqid);
    if out.truncated {
        r = r.b("truncated", true);
    }
    if out.timed_out {
        let secs = entry.timeout.map(|t| t.as_secs()).unwrap_or(0);
        r = r.b("timed_out", true).s("error", format!("timed out after {secs}s; process group killed"));
    }
    reply(200, r)
}

/// Accept a detached run: lock, record, hand over to a runner, 202.
async fn start_detached(mut job: crate::asyncrun::Job, state: &AgentState) -> Reply {
    let store = crate::asyncrun::Store::new(&state.config.async_runs_dir);
    store.purge();
    let fields = [
        ("SCRIPT", job.script.as_str()),
        ("PEER", job.peer.as_str()),
        ("DISPATCHER", job.owner.as_str()),
        ("REQID", job.reqid.as_str()),
    ];
    let failed = |e: String| {
        audit::err("async-store-fail", &[("REQID", &job.reqid), ("ERROR", &e)]);
        reply(
            200,
            Obj::new()
                .s("script", &job.script)
                .i("exit", -1)
                .s("reqid", &job.reqid)
                .s("error", "could not start async job"),
        )
    };
    let Some(path) = store.record_path(&job.owner, &job.reqid) else {
        return failed("invalid owner or reqid".into());
    };
    if path.exists() {
        // A reqid names one result: a second run under it would overwrite the first.
        audit::warn("run-async-refused", &[fields.as_slice(), &[("REASON", "reqid-reused")]].concat());
        return reply(
            200,
            Obj::new()
                .s("script", &job.script)
                .i("exit", -1)
                .s("reqid", &job.reqid)
                .s("error", "request id already used for an async run; use a new reqid"),
        );
    }
    let lock = match store.try_lock(&job.script) {
        Ok(Some(l)) => l,
        Ok(None) => {
            audit::warn("run-async-busy", &fields);
            return reply(
                409,
                Obj::new()
                    .s("script", &job.script)
                    .s("status", "busy")
                    .s("reqid", &job.reqid)
                    .s("error", "script already running"),
            );
        }
        Err(e) => return failed(e.to_string()),
    };
    job.record = path;
    if let Err(e) = store.write(&job.record, &job.running_record()) {
        return failed(e.to_string());
    }
    if let Err(e) = crate::asyncrun::spawn_runner(&job, lock, &state.log).await {
        let _ = std::fs::remove_file(&job.record);
        return failed(format!("cannot start the runner: {e}"));
    }
    audit::info("run-async", &fields);
    reply(202, Obj::new().s("script", &job.script).s("status", "accepted").s("reqid", &job.reqid))
}

/// `GET /result/<reqid>`: the caller's own detached-run record.
fn result(reqid: &str, peer: &Peer, state: &AgentState) -> Reply {
    let dispatcher = match gate(peer, state, reqid) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let store = crate::asyncrun::Store::new(&state.config.async_runs_dir);
    let peer_ip = peer.ip.to_string();
    let who = [("PEER", peer_ip.as_str()), ("DISPATCHER", dispatcher), ("REQID", reqid)];
    match store.read(dispatcher, reqid) {
        Some(record) => {
            let status = crate::asyncrun::status_of(&record);
            let mut f = who.to_vec();
            f.push(("STATUS", &status));
            audit::info("result", &f);
            Reply { code: 200, body: miniserde::json::to_string(&record) }
        }
        None => {
            if store.owned_by_other(dispatcher, reqid) {
                let mut f = who.to_vec();
                f.push(("REASON", "not-owner"));
                audit::warn("result-deny", &f);
            } else {
                audit::info("result-miss", &who);
            }
            // Not-owner and unknown are deliberately indistinguishable.
            reply(404, Obj::new().s("status", "unknown").s("reqid", reqid))
        }
    }
}

fn ping(req: &http::Request, peer: &Peer, state: &AgentState) -> Reply {
    let o = parse_object(&body_text(req)).unwrap_or_default();
    let reqid = get_str(&o, "reqid").unwrap_or_default();
    let dispatcher = match gate(peer, state, &reqid) {
        Ok(d) => d,
        Err(r) => return r,
    };
    audit::info(
        "ping",
        &[("PEER", &peer.ip.to_string()), ("DISPATCHER", dispatcher), ("REQID", &reqid), ("TLS", peer.tls())],
    );
    let staged = state.config.cert_staging_path.exists();
    reply(
        200,
        Obj::new()
            .s("status", "ok")
            .s("host", &state.host)
            .s("version", crate::VERSION)
            .s("expiry", &state.expiry)
            .b("staged", staged)
            .s("reqid", &reqid),
    )
}

async fn capabilities(peer: &Peer, state: &AgentState) -> Reply {
    let peer_ip = peer.ip.to_string();
    let deny = |reason: &str| {
        audit::warn("capabilities-deny", &[("PEER", &peer_ip), ("PEER_SERIAL", &peer.serial), ("REASON", reason)]);
        error_reply(403, "forbidden")
    };
    if state.trusted.0.is_empty() {
        return deny("no trusted dispatchers stored");
    }
    let Some(dispatcher) = state.trusted.lookup(&peer.serial) else {
        return deny("serial-mismatch");
    };
    let ctx = hook::Context {
        action: "discovery".into(),
        source_ip: peer_ip.clone(),
        dispatcher: dispatcher.into(),
        dispatcher_serial: peer.serial_raw.clone(),
        ..Default::default()
    };
    if let Decision::Deny { reason, .. } =
        hook::authorize(state.config.auth_hook.as_deref(), state.config.auth_hook_timeout, &ctx, NoHook::AgentPass)
            .await
    {
        audit::warn("capabilities-deny", &[("PEER", &peer_ip), ("DISPATCHER", dispatcher), ("REASON", &reason)]);
        return error_reply(403, "not authorised");
    }
    let mut scripts = Array::new();
    for s in state.allowlist.scripts.values() {
        let mut e = Obj::new()
            .s("name", &s.name)
            .s("path", s.path.display().to_string())
            .b("executable", crate::fsutil::is_executable(&s.path))
            .s("profile", &s.profile);
        if let Some(t) = s.timeout {
            e = e.i("timeout", t.as_secs() as i64);
        }
        if let Some(schema) = state.schemas.get(&s.name) {
            e = e.v("schema", schema.body.clone()).s("schema_version", &schema.version);
        }
        scripts.push(e.into_value());
    }
    let mut tags = Object::new();
    for (k, v) in &state.config.tags {
        tags.insert(k.clone(), Value::String(v.clone()));
    }
    audit::info(
        "capabilities",
        &[("PEER", &peer_ip), ("DISPATCHER", dispatcher), ("SCRIPTS", &scripts.len().to_string())],
    );
    reply(
        200,
        Obj::new()
            .s("status", "ok")
            .s("host", &state.host)
            .s("version", crate::VERSION)
            .v("scripts", Value::Array(scripts))
            .v("tags", Value::Object(tags)),
    )
}

/// The reply for a connection over `max_children`.
pub fn busy_reply() -> Reply {
    error_reply(503, "agent busy: too many concurrent connections")
}

/// Our certificate's expiry text, or `unknown`.
pub fn cert_expiry(cert: &std::path::Path) -> String {
    crate::ca::load_cert(cert).map(|c| crate::ca::not_after(&c)).unwrap_or_else(|_| "unknown".into())
}

/// The staging path in use.
pub fn staging_path(state: &AgentState) -> PathBuf {
    state.config.cert_staging_path.clone()
}
