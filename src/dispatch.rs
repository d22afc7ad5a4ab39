//! The dispatcher's operations on many agents: resolve names through the
//! registry, fan out one request per host, turn every reply (or failure)
//! into a result object, and log each host's outcome.
//!
//! The CLI and the API server both drive these; they differ only in how they
//! authorise, present and store results. Result objects keep upstream's
//! shapes (wire.md §2.10): a run result is the agent's reply plus `host`,
//! `rtt` and `reqid`, or `{host, script, exit: -1, error, rtt, reqid}`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use miniserde::json::{self, Object, Value};

use crate::audit;
use crate::client::{self, CallError, Target, Timeouts};
use crate::config::DispatcherConfig;
use crate::http::Response;
use crate::identity::Identities;
use crate::registry::{DEFAULT_PORT, Registry, RegistryError};
use crate::wire::{Obj, get_i64, get_str, parse_object, str_array};

/// Why host names could not be resolved.
#[derive(Debug)]
pub enum ResolveError {
    /// `name:port` with a bad port.
    BadPort(String),
    /// Names that are not registered agents.
    Unknown(Vec<String>),
    /// The registry could not be read.
    Registry(RegistryError),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::BadPort(t) => write!(f, "invalid port in '{t}' (expected <host>:<1-65535>)"),
            ResolveError::Unknown(n) => write!(f, "unknown agent(s): {}", n.join(", ")),
            ResolveError::Registry(e) => write!(f, "{e}"),
        }
    }
}

fn split_port(typed: &str) -> Result<(String, Option<u16>), ResolveError> {
    match typed.rsplit_once(':') {
        Some((name, p)) => match p.parse::<u16>() {
            Ok(port) if port > 0 && p.starts_with(|c: char| c.is_ascii_digit()) => Ok((name.to_string(), Some(port))),
            _ => Err(ResolveError::BadPort(typed.to_string())),
        },
        None => Ok((typed.to_string(), None)),
    }
}

/// Registry-only resolution: every name (optionally `name:port`) must be a
/// registered agent; duplicates are dropped. `port_flag` replaces the port of
/// agents registered on the default port.
pub fn resolve(reg: &Registry, typed: &[String], port_flag: Option<u16>) -> Result<Vec<Target>, ResolveError> {
    let mut out: Vec<Target> = Vec::new();
    let mut unknown = Vec::new();
    for t in typed {
        let (name, port) = split_port(t)?;
        if out.iter().any(|x| x.name == name) || unknown.contains(&name) {
            continue;
        }
        let rec = match reg.get(&name) {
            Ok(Some(r)) => r,
            Ok(None) | Err(RegistryError::BadName(_)) => {
                unknown.push(name);
                continue;
            }
            Err(e) => return Err(ResolveError::Registry(e)),
        };
        let stored = rec.port;
        let port = port.unwrap_or(match port_flag {
            Some(p) if stored == DEFAULT_PORT => p,
            _ => stored,
        });
        out.push(Target { name, addr: rec.connect_addr().to_string(), port });
    }
    if unknown.is_empty() { Ok(out) } else { Err(ResolveError::Unknown(unknown)) }
}

/// What a run request carries to every host.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Allowlist name.
    pub script: String,
    /// Arguments, verbatim.
    pub args: Vec<String>,
    /// One id for the whole operation.
    pub reqid: String,
    /// Advisory identity.
    pub username: String,
    /// Credential forwarded to the agent hook and the script.
    pub token: String,
}

/// The dispatcher's identity and settings, ready to contact agents.
///
/// It holds the current certificate and, during a rotation's overlap
/// window, the previous one, and presents to each agent the one that agent
/// trusts (see [`crate::identity`]). A long-running process notices a
/// rotation by itself: before a fan-out, at most once a second, it compares
/// the certificate files' metadata with what it loaded.
pub struct Engine {
    /// ctrl-exec.conf.
    pub cfg: DispatcherConfig,
    ids: RefCell<Rc<Identities>>,
    checked: Cell<Instant>,
    persistent: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("cfg", &self.cfg.path).finish()
    }
}

/// `"42ms"`.
pub fn rtt(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// The error text for a non-2xx agent reply (upstream's wording).
pub fn status_error(code: u16, body: &Option<Object>) -> String {
    let agent_err = body.as_ref().and_then(|o| get_str(o, "error")).unwrap_or_default();
    match code {
        403 => format!("forbidden: {agent_err}"),
        413 => "request too large".into(),
        _ if agent_err.is_empty() => format!("{code} {}", crate::http::phrase(code)),
        _ => format!("{code} {}: {agent_err}", crate::http::phrase(code)),
    }
}

/// A 2xx reply's JSON object, or the operator text for what went wrong.
fn reply_object(t: &Target, r: Result<Response, CallError>) -> Result<Object, String> {
    let resp = r.map_err(|e| e.describe(t))?;
    let body = parse_object(&String::from_utf8_lossy(&resp.body));
    if !(200..300).contains(&resp.code) {
        return Err(status_error(resp.code, &body));
    }
    body.ok_or_else(|| "invalid JSON response".to_string())
}

/// The result object of one host's run.
pub fn run_result(t: &Target, script: &str, reqid: &str, took: Duration, r: Result<Response, CallError>) -> Object {
    match reply_object(t, r) {
        Ok(mut o) => {
            o.insert("host".into(), Value::String(t.name.clone()));
            o.insert("rtt".into(), Value::String(rtt(took)));
            o.entry("reqid".into()).or_insert_with(|| Value::String(reqid.into()));
            o.entry("script".into()).or_insert_with(|| Value::String(script.into()));
            o.entry("exit".into()).or_insert_with(|| crate::wire::int(-1));
            o
        }
        Err(error) => {
            Obj::new()
                .s("host", &t.name)
                .s("script", script)
                .i("exit", -1)
                .s("error", error)
                .s("reqid", reqid)
                .s("rtt", rtt(took))
                .0
        }
    }
}

/// The result object of a host that answered `/ping` or `/capabilities`:
/// the agent's reply with `host` set to the registry name (and
/// `reported_hostname` when the agent calls itself something else).
fn status_result(t: &Target, took: Duration, r: Result<Response, CallError>) -> Object {
    match reply_object(t, r) {
        Ok(mut o) => {
            if let Some(reported) = get_str(&o, "host").filter(|h| *h != t.name) {
                o.insert("reported_hostname".into(), Value::String(reported));
            }
            o.insert("host".into(), Value::String(t.name.clone()));
            o.insert("rtt".into(), Value::String(rtt(took)));
            o
        }
        Err(error) => Obj::new().s("host", &t.name).s("status", "error").s("error", error).s("rtt", rtt(took)).0,
    }
}

/// Log the `dispatch` line of a run (sync or detached) and build the `/run`
/// body every agent gets; returns the arguments as JSON (for the per-host
/// lines) and the body.
fn dispatch_start(targets: &[Target], req: &RunRequest, detached: bool) -> (String, String) {
    let args_json = json::to_string(&str_array(&req.args));
    let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    audit::info(
        "dispatch",
        &[
            ("SCRIPT", &req.script),
            ("HOSTS", &names.join(",")),
            ("REQID", &req.reqid),
            ("MODE", if detached { "async" } else { "sync" }),
            ("USER", user_or_none(&req.username)),
            ("ARGS", &args_json),
        ],
    );
    let mut body = Obj::new()
        .s("script", &req.script)
        .v("args", str_array(&req.args))
        .s("reqid", &req.reqid)
        .s("username", &req.username)
        .s("token", &req.token);
    if detached {
        body = body.b("async", true);
    }
    (args_json, body.to_json())
}

fn user_or_none(u: &str) -> &str {
    if u.is_empty() { "(none)" } else { u }
}

impl Engine {
    /// Load the dispatcher identity; `persistent_cache` keeps TLS sessions in
    /// `tls_session_cache` (one-shot CLI) rather than in memory only (server).
    pub fn open(cfg: DispatcherConfig, persistent_cache: bool) -> Result<Engine, crate::tls::TlsError> {
        let ids = crate::identity::load(&cfg, persistent_cache)?;
        Ok(Engine {
            cfg,
            ids: RefCell::new(Rc::new(ids)),
            checked: Cell::new(Instant::now()),
            persistent: persistent_cache,
        })
    }

    /// The identities in use now.
    pub fn identities(&self) -> Rc<Identities> {
        self.ids.borrow().clone()
    }

    /// Load the identities again (after a rotation, or on SIGHUP). On
    /// failure the ones in use stay and the error is returned.
    pub fn reload_identities(&self) -> Result<(), crate::tls::TlsError> {
        self.checked.set(Instant::now());
        let ids = crate::identity::load(&self.cfg, self.persistent)?;
        *self.ids.borrow_mut() = Rc::new(ids);
        Ok(())
    }

    /// Reload if the certificate files changed; looks at most once a second.
    fn refresh_identities(&self) {
        if self.checked.get().elapsed() < Duration::from_secs(1) {
            return;
        }
        self.checked.set(Instant::now());
        if self.ids.borrow().stale(&self.cfg) {
            match self.reload_identities() {
                Ok(()) => {
                    let ids = self.identities();
                    let prev = ids.previous.as_ref().map(|p| p.serial.as_str()).unwrap_or("(none)");
                    audit::info("identity-reload", &[("SERIAL", &ids.current.serial), ("PREVIOUS", prev)]);
                }
                Err(e) => {
                    audit::err("identity-reload-fail", &[("ERROR", &e.0), ("RESULT", "kept the loaded identity")])
                }
            }
        }
    }

    /// The registry.
    pub fn registry(&self) -> Registry {
        Registry::new(&self.cfg.registry_dir)
    }

    fn timeouts(&self) -> Timeouts {
        Timeouts { connect: self.cfg.connect_timeout, read: self.cfg.read_timeout }
    }

    /// One exchange with one target outside a fan-out (e.g. the renewal
    /// exchange that follows a ping), with the usual timeouts and session cache.
    pub async fn call(&self, t: &Target, method: &str, path: &str, body: Option<&str>) -> Result<Response, CallError> {
        self.refresh_identities();
        let ids = self.identities();
        let rec = self.registry().get(&t.name).ok().flatten();
        let id = ids.for_agent(rec.as_ref());
        client::call(&id.ctx, t, method, path, body, self.timeouts(), id.cache.as_ref(), id.pool.as_ref()).await
    }

    async fn fan<R>(
        &self,
        targets: &[Target],
        method: &str,
        path: &str,
        body: Option<&str>,
        mut done: impl FnMut(&Target, Duration, Result<Response, CallError>) -> R,
    ) {
        let tmo = self.timeouts();
        self.refresh_identities();
        let ids = self.identities();
        let reg = self.registry();
        let ids = &ids;
        let reg = &reg;
        crate::fanout::for_each(
            targets.iter(),
            self.cfg.max_parallel,
            |t| async move {
                let rec = reg.get(&t.name).ok().flatten();
                let id = ids.for_agent(rec.as_ref());
                let start = Instant::now();
                let r = client::call(&id.ctx, t, method, path, body, tmo, id.cache.as_ref(), id.pool.as_ref()).await;
                (t, start.elapsed(), r)
            },
            |(t, took, r)| {
                done(t, took, r);
            },
        )
        .await
    }

    /// POST `body` to `path` on every target (each with the identity it
    /// trusts); `done` gets the reply object of a 2xx answer, or the error text.
    pub async fn post_each(
        &self,
        targets: &[Target],
        path: &str,
        body: &str,
        mut done: impl FnMut(&Target, Duration, Result<Object, String>),
    ) {
        self.fan(targets, "POST", path, Some(body), |t, took, r| done(t, took, reply_object(t, r))).await
    }

    /// Run a script on every target; `done` gets each result as it completes.
    pub async fn run(&self, targets: &[Target], req: &RunRequest, mut done: impl FnMut(Object)) {
        let (args_json, body) = dispatch_start(targets, req, false);
        let user = user_or_none(&req.username);
        self.fan(targets, "POST", "/run", Some(&body), |t, took, r| {
            let res = run_result(t, &req.script, &req.reqid, took, r);
            let (target, rt) = (t.display(), rtt(took));
            let exit = get_i64(&res, "exit").unwrap_or(-1).to_string();
            let mut fields = vec![
                ("SCRIPT", req.script.as_str()),
                ("TARGET", target.as_str()),
                ("RTT", rt.as_str()),
                ("REQID", req.reqid.as_str()),
                ("USER", user),
                ("ARGS", args_json.as_str()),
            ];
            match get_str(&res, "error") {
                // A transport failure or an agent refusal (no output): ERROR.
                Some(e) if !res.contains_key("stdout") => {
                    fields.push(("ERROR", &e));
                    audit::err("run", &fields);
                }
                _ => {
                    fields.push(("EXIT", &exit));
                    audit::info("run", &fields);
                }
            }
            done(res);
        })
        .await
    }

    /// Ping every target.
    pub async fn ping(&self, targets: &[Target], reqid: &str, mut done: impl FnMut(Object)) {
        let body = Obj::new().s("reqid", reqid).to_json();
        self.fan(targets, "POST", "/ping", Some(&body), |t, took, r| {
            let res = status_result(t, took, r);
            let (target, rt) = (t.display(), rtt(took));
            if get_str(&res, "status").as_deref() == Some("ok") {
                audit::info("ping", &[("TARGET", &target), ("RESULT", "ok"), ("RTT", &rt), ("REQID", reqid)]);
            } else {
                let e = get_str(&res, "error").unwrap_or_default();
                audit::err("ping", &[("TARGET", &target), ("ERROR", &e), ("RTT", &rt), ("REQID", reqid)]);
            }
            done(res);
        })
        .await
    }

    /// Ask every target for its scripts and tags; cache the tags of those
    /// that answered in the registry (for `list-agents --tags`).
    pub async fn capabilities(&self, targets: &[Target], mut done: impl FnMut(Object)) {
        let tags: RefCell<HashMap<String, Value>> = RefCell::new(HashMap::new());
        self.fan(targets, "GET", "/capabilities", None, |t, took, r| {
            let res = status_result(t, took, r);
            let (target, rt) = (t.display(), rtt(took));
            if get_str(&res, "status").as_deref() == Some("ok") {
                let n = match res.get("scripts") {
                    Some(Value::Array(a)) => a.len(),
                    _ => 0,
                };
                audit::info("capabilities", &[("TARGET", &target), ("SCRIPTS", &n.to_string()), ("RTT", &rt)]);
                if let Some(t_obj @ Value::Object(_)) = res.get("tags") {
                    tags.borrow_mut().insert(t.name.clone(), t_obj.clone());
                }
            } else {
                let e = get_str(&res, "error").unwrap_or_default();
                audit::err("capabilities", &[("TARGET", &target), ("ERROR", &e), ("RTT", &rt)]);
            }
            done(res);
        })
        .await;
        let reg = self.registry();
        let Ok(_lock) = reg.lock() else { return };
        for (name, value) in tags.into_inner() {
            if let Ok(Some(mut rec)) = reg.get(&name) {
                if rec.raw.get("tags").map(json::to_string) == Some(json::to_string(&value)) {
                    continue;
                }
                rec.raw.insert("tags".into(), value);
                let _ = reg.put(&rec);
            }
        }
    }
}

/// Per-host state of an async run as the dispatcher records it.
pub fn is_pending(status: &str) -> bool {
    status == "accepted" || status == "running"
}

impl Engine {
    /// Submit a detached run to every target (`"async": true`); `done` gets
    /// `{host, script, status: accepted|busy|error, error?, reqid, rtt}`.
    pub async fn submit(&self, targets: &[Target], req: &RunRequest, mut done: impl FnMut(Object)) {
        let (_, body) = dispatch_start(targets, req, true);
        self.fan(targets, "POST", "/run", Some(&body), |t, took, r| {
            let base =
                Obj::new().s("host", &t.name).s("script", &req.script).s("reqid", &req.reqid).s("rtt", rtt(took));
            let (status, error) = match r {
                Ok(resp) if resp.code == 202 => ("accepted", None),
                Ok(resp) => {
                    let body = parse_object(&String::from_utf8_lossy(&resp.body));
                    match resp.code {
                        409 => ("busy", Some(body.and_then(|o| get_str(&o, "error")).unwrap_or_else(|| "busy".into()))),
                        200..=299 => (
                            "error",
                            Some(
                                body.and_then(|o| get_str(&o, "error"))
                                    .unwrap_or_else(|| "the agent did not accept the run".into()),
                            ),
                        ),
                        c => ("error", Some(status_error(c, &body))),
                    }
                }
                Err(e) => ("error", Some(e.describe(t))),
            };
            let (target, rt) = (t.display(), rtt(took));
            let mut fields = vec![
                ("SCRIPT", req.script.as_str()),
                ("TARGET", target.as_str()),
                ("STATUS", status),
                ("RTT", rt.as_str()),
                ("REQID", req.reqid.as_str()),
            ];
            if let Some(e) = &error {
                fields.push(("ERROR", e));
            }
            match status {
                "accepted" => audit::info("run-async", &fields),
                "busy" => audit::warn("run-async", &fields),
                _ => audit::err("run-async", &fields),
            }
            let mut o = base.s("status", status);
            if let Some(e) = error {
                o = o.s("error", e);
            }
            done(o.0);
        })
        .await
    }

    /// Fetch `GET /result/<reqid>` from every pending host of an async record
    /// and merge: done (exit, stdout, stderr), still running, `expired` (the
    /// agent no longer has it), or `fetch_error` kept beside a pending state.
    pub async fn refresh(&self, record: &mut Object) {
        let reqid = get_str(record, "reqid").unwrap_or_default();
        let Some(Value::Object(hosts)) = record.get_mut("hosts") else { return };
        let pending: Vec<String> = hosts
            .iter()
            .filter(|(_, v)| matches!(v, Value::Object(o) if is_pending(&get_str(o, "status").unwrap_or_default())))
            .map(|(k, _)| k.clone())
            .collect();
        let mut targets = Vec::new();
        for name in &pending {
            match resolve(&self.registry(), std::slice::from_ref(name), None) {
                Ok(mut t) => {
                    let submitted = match hosts.get(name) {
                        Some(Value::Object(h)) => get_i64(h, "port").and_then(|p| u16::try_from(p).ok()),
                        _ => None,
                    };
                    if let (Some(p), Some(t)) = (submitted, t.first_mut()) {
                        t.port = p;
                    }
                    targets.append(&mut t)
                }
                Err(e) => {
                    if let Some(Value::Object(h)) = hosts.get_mut(name) {
                        h.insert("fetch_error".into(), Value::String(e.to_string()));
                    }
                }
            }
        }
        let path = format!("/result/{reqid}");
        let mut updates: Vec<(String, Object)> = Vec::new();
        self.fan(&targets, "GET", &path, None, |t, took, r| {
            let (target, rt) = (t.display(), rtt(took));
            let mut h = Obj::new();
            match r {
                Ok(resp) if resp.code == 200 => {
                    let rec = parse_object(&String::from_utf8_lossy(&resp.body)).unwrap_or_default();
                    let status = get_str(&rec, "status").unwrap_or_default();
                    audit::info("result", &[("TARGET", &target), ("STATUS", &status), ("RTT", &rt), ("REQID", &reqid)]);
                    if status == "done" {
                        h = h.s("status", "done");
                        for k in ["exit", "stdout", "stderr", "truncated", "timed_out", "error", "finished"] {
                            if let Some(v) = rec.get(k) {
                                h = h.v(k, v.clone());
                            }
                        }
                    } else {
                        h = h.s("status", "running");
                    }
                }
                Ok(resp) if resp.code == 404 => {
                    audit::info(
                        "result",
                        &[("TARGET", &target), ("STATUS", "expired"), ("RTT", &rt), ("REQID", &reqid)],
                    );
                    h = h
                        .s("status", "expired")
                        .s("error", "the agent has no result for this request (expired or never stored)");
                }
                other => {
                    let e = match other {
                        Ok(resp) => status_error(resp.code, &parse_object(&String::from_utf8_lossy(&resp.body))),
                        Err(e) => e.describe(t),
                    };
                    audit::err("result", &[("TARGET", &target), ("ERROR", &e), ("RTT", &rt), ("REQID", &reqid)]);
                    h = h.s("fetch_error", e);
                }
            }
            updates.push((t.name.clone(), h.0));
        })
        .await;
        for (name, upd) in updates {
            if let Some(Value::Object(h)) = hosts.get_mut(&name) {
                h.remove("fetch_error");
                for (k, v) in upd {
                    h.insert(k, v);
                }
            }
        }
        let pending: Vec<String> = hosts
            .iter()
            .filter(|(_, v)| matches!(v, Value::Object(o) if is_pending(&get_str(o, "status").unwrap_or_default())))
            .map(|(k, _)| k.clone())
            .collect();
        record.insert("complete".into(), Value::Bool(pending.is_empty()));
        record.insert("pending".into(), str_array(&pending));
    }
}

/// A new async record from submit results.
///
/// Each host keeps the `port` it was reached at, so `status` and `wait` find
/// it again when it was given as `name:port` or with `--port`.
pub fn async_record(
    reqid: &str,
    script: &str,
    targets: &[Target],
    results: &[Object],
    submitter: Option<(&str, &str)>,
) -> Object {
    let mut hosts = Object::new();
    let mut pending = Vec::new();
    for r in results {
        let name = get_str(r, "host").unwrap_or_default();
        let status = get_str(r, "status").unwrap_or_default();
        if is_pending(&status) {
            pending.push(name.clone());
        }
        let mut h = Obj::new().s("status", &status);
        if let Some(t) = targets.iter().find(|t| t.name == name) {
            h = h.i("port", i64::from(t.port));
        }
        if let Some(e) = get_str(r, "error") {
            h = h.s("error", e);
        }
        hosts.insert(name, h.into_value());
    }
    let mut o = Obj::new()
        .s("reqid", reqid)
        .s("script", script)
        .s("mode", "async")
        .v("hosts", Value::Object(hosts))
        .i("created", crate::time::unix_now())
        .v("pending", str_array(&pending))
        .b("complete", pending.is_empty());
    if let Some((u, ip)) = submitter {
        o = o.v("submitter", Obj::new().s("username", u).s("source_ip", ip).into_value());
    }
    o.0
}

/// Dispatcher locks held for one run; released (and logged) on drop.
#[derive(Debug)]
pub struct RunLock {
    held: crate::locks::Held,
    script: String,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let hosts: Vec<&str> = self.held.names.iter().filter_map(|n| n.rsplit_once(':').map(|(h, _)| h)).collect();
        audit::info("lock-release", &[("HOSTS", &hosts.join(",")), ("SCRIPT", &self.script)]);
    }
}

/// Why a run could not take its locks.
#[derive(Debug)]
pub enum LockError {
    /// Another run holds these (`host:script`).
    Conflicts(Vec<String>),
    /// The lock files could not be used.
    Fs(crate::fsutil::FsError),
}

impl Engine {
    /// Take the locks of `script` on every target, all or none.
    pub fn lock(&self, targets: &[Target], script: &str) -> Result<RunLock, LockError> {
        let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
        match crate::locks::Locks::new(&self.cfg.locks_dir).acquire(&names, script) {
            Ok(Ok(held)) => {
                for n in &names {
                    audit::info("lock-acquire", &[("HOST", n), ("SCRIPT", script)]);
                }
                Ok(RunLock { held, script: script.to_string() })
            }
            Ok(Err(conflicts)) => {
                audit::warn("lock-conflict", &[("CONFLICTS", &conflicts.join(","))]);
                Err(LockError::Conflicts(conflicts))
            }
            Err(e) => Err(LockError::Fs(e)),
        }
    }
}
