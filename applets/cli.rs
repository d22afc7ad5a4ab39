//! The operator CLI (`ctrl-exec`, `ced`, `ctrl-exec-dispatcher`):
//! `run`, `ping`, `status`, `wait`, `list-agents`, `list-locks`, `maintain` (and,
//! in `fleet.rs`, `rotate-cert`, `serial-status`, `unpair`, `edit-agent`).
//!
//! One process, one thread: every host is a future on the same executor,
//! at most `max_parallel` at once; results print as they complete. The exit
//! code policy is here and only here: `run` exits 0 only if every host ran
//! the script and it exited 0; `ping` exits 0 only if every host answered.

use argh::FromArgs;
use ctrl_exec::client::Target;
use ctrl_exec::dispatch::{self, Engine, LockError, ResolveError, RunRequest};
use ctrl_exec::error::{AppResult, EXIT_FAIL, EXIT_OK, Fail};
use ctrl_exec::hook::{self, Decision, NoHook};
use ctrl_exec::registry::Registry;
use ctrl_exec::runstore::RunStore;
use ctrl_exec::wire::{Obj, get_i64, get_str, str_array};
use miniserde::json::{self, Array, Object, Value};

use super::common;

#[derive(FromArgs)]
/// ctrl-exec operator CLI: run allowlisted scripts on agents over mutual TLS.
#[argh(help_triggers("-h", "--help"))]
struct Cli {
    #[argh(subcommand)]
    verb: Verb,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Verb {
    Run(RunArgs),
    Ping(PingArgs),
    Status(StatusArgs),
    Wait(WaitArgs),
    ListAgents(ListArgs),
    ListLocks(ListLocksArgs),
    Maintain(super::maintain::MaintainArgs),
    RotateCert(super::fleet::RotateCertArgs),
    SerialStatus(super::fleet::SerialStatusArgs),
    Unpair(super::fleet::UnpairArgs),
    EditAgent(super::fleet::EditAgentArgs),
}

#[derive(FromArgs)]
/// Show which host:script locks running runs hold right now.
#[argh(subcommand, name = "list-locks", help_triggers("-h", "--help"))]
struct ListLocksArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Show a recorded run (an async run: fetch what its agents have now).
#[argh(subcommand, name = "status", help_triggers("-h", "--help"))]
struct StatusArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print the record as JSON
    #[argh(switch)]
    json: bool,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// request id
    #[argh(positional)]
    reqid: String,
}

#[derive(FromArgs)]
/// Wait until an async run is complete on every host (exit 0: all exited 0,
/// 1: some failed, 2: still pending at the timeout).
#[argh(subcommand, name = "wait", help_triggers("-h", "--help"))]
struct WaitArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print the final record as JSON
    #[argh(switch)]
    json: bool,
    /// seconds to wait (default 300)
    #[argh(option, default = "300")]
    timeout: u64,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// request id
    #[argh(positional)]
    reqid: String,
}

#[derive(FromArgs)]
/// Run an allowlisted script on agents: run <host>[:<port>]... <script> [-- <arg>...].
/// Everything after `--` reaches the script as argv, byte for byte.
#[argh(subcommand, name = "run", help_triggers("-h", "--help"))]
struct RunArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print one JSON document instead of text
    #[argh(switch)]
    json: bool,
    /// advisory user name for hooks and the script (default $USER)
    #[argh(option)]
    username: Option<String>,
    /// credential for hooks and the script (default $ENVEXEC_TOKEN; the
    /// environment keeps it out of `ps`)
    #[argh(option)]
    token: Option<String>,
    /// port for hosts registered on the default port
    #[argh(option)]
    port: Option<u16>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// start the script detached on every host and return at once; follow
    /// it with `status` or `wait`
    #[argh(switch, long = "async")]
    detach: bool,
    /// registered hosts, then the script name
    #[argh(positional)]
    targets: Vec<String>,
}

#[derive(FromArgs)]
/// Check that agents answer: ping <host>[:<port>]...
#[argh(subcommand, name = "ping", help_triggers("-h", "--help"))]
struct PingArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print one JSON document instead of a table
    #[argh(switch)]
    json: bool,
    /// advisory user name for the hook (default $USER)
    #[argh(option)]
    username: Option<String>,
    /// credential for the hook (default $ENVEXEC_TOKEN)
    #[argh(option)]
    token: Option<String>,
    /// port for hosts registered on the default port
    #[argh(option)]
    port: Option<u16>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// do not renew agent certificates that are due (see docs/cli.md)
    #[argh(switch)]
    no_renew: bool,
    /// registered hosts
    #[argh(positional)]
    hosts: Vec<String>,
}

#[derive(FromArgs)]
/// Show the agent registry.
#[argh(subcommand, name = "list-agents", help_triggers("-h", "--help"))]
struct ListArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print the registry records as JSON
    #[argh(switch)]
    json: bool,
    /// only agents whose cached tags match every k=v (comma-separated)
    #[argh(option)]
    tags: Option<String>,
}

/// Entry point of the CLI role.
pub fn main(invoked: &str, args: &[String]) -> AppResult {
    let (before, after) = common::split_dashdash(args);
    let cli: Cli = common::parse(invoked, &before)?;
    match cli.verb {
        Verb::Run(a) => run(a, after),
        Verb::Ping(a) if after.is_empty() => ping(a),
        Verb::Status(a) if after.is_empty() => status(a),
        Verb::Wait(a) if after.is_empty() => wait(a),
        Verb::ListAgents(a) if after.is_empty() => list_agents(a),
        Verb::ListLocks(a) if after.is_empty() => list_locks(a),
        Verb::Maintain(a) if after.is_empty() => super::maintain::maintain(a),
        Verb::RotateCert(a) if after.is_empty() => super::fleet::rotate_cert(a),
        Verb::SerialStatus(a) if after.is_empty() => super::fleet::serial_status(a),
        Verb::Unpair(a) if after.is_empty() => super::fleet::unpair(a),
        Verb::EditAgent(a) if after.is_empty() => super::fleet::edit_agent(a),
        _ => Err(Fail::usage("only 'run' takes arguments after '--'")),
    }
}

/// Shared set-up of the verbs that contact agents.
struct Prepared {
    engine: Engine,
    targets: Vec<Target>,
    username: String,
    token: String,
    reqid: String,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    config: &Option<String>,
    log_stderr: bool,
    typed: Vec<String>,
    port: Option<u16>,
    username: Option<String>,
    token: Option<String>,
    action: &str,
    script: &str,
    args: &[String],
    json_out: bool,
) -> Result<Result<Prepared, u8>, Fail> {
    let cfg = common::load_dispatcher(config)?;
    common::init_audit("ctrl-exec-dispatcher", &cfg.log, log_stderr);
    let username = username.or_else(|| std::env::var("USER").ok()).unwrap_or_default();
    let token = token.or_else(|| std::env::var("ENVEXEC_TOKEN").ok()).unwrap_or_default();
    let reqid = ctrl_exec::wire::new_reqid();
    let hctx = hook::Context {
        action: action.into(),
        script: script.into(),
        hosts: typed.clone(),
        args: args.to_vec(),
        username: username.clone(),
        token: token.clone(),
        source_ip: "127.0.0.1".into(),
        reqid: reqid.clone(),
        ..Default::default()
    };
    let decision =
        smol::block_on(hook::authorize(cfg.auth_hook.as_deref(), cfg.auth_hook_timeout, &hctx, NoHook::CliPass));
    if let Decision::Deny { code, reason } = decision {
        if json_out {
            println!("{}", Obj::new().b("ok", false).s("error", &reason).i("code", code as i64).to_json());
        } else {
            eprintln!("Denied: {reason}");
        }
        return Ok(Err(EXIT_FAIL));
    }
    let targets = dispatch::resolve(&Registry::new(&cfg.registry_dir), &typed, port).map_err(|e| match e {
        ResolveError::BadPort(_) => Fail::usage(e.to_string()),
        ResolveError::Unknown(_) => Fail::new(format!("{e}; run 'ctrl-exec list-agents' to see registered agents")),
        ResolveError::Registry(_) => Fail::new(e.to_string()),
    })?;
    let engine = Engine::open(cfg, true).map_err(|e| Fail::new(format!("cannot load the dispatcher identity: {e}")))?;
    Ok(Ok(Prepared { engine, targets, username, token, reqid }))
}

fn run(a: RunArgs, script_args: Vec<String>) -> AppResult {
    let mut words = a.targets;
    let Some(script) = words.pop() else {
        return Err(Fail::usage("usage: run <host>[:<port>]... <script> [-- <arg>...]"));
    };
    if words.is_empty() {
        return Err(Fail::usage(format!(
            "no host given for script '{script}' (usage: run <host>... <script> [-- <arg>...])"
        )));
    }
    let p = match prepare(
        &a.config,
        a.log_stderr,
        words,
        a.port,
        a.username,
        a.token,
        "run",
        &script,
        &script_args,
        a.json,
    )? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let req = RunRequest { script, args: script_args, reqid: p.reqid, username: p.username, token: p.token };
    // Held until every host has answered (for --async: has taken the job).
    let _lock = match p.engine.lock(&p.targets, &req.script) {
        Ok(l) => l,
        Err(LockError::Conflicts(c)) => {
            if a.json {
                println!(
                    "{}",
                    Obj::new().b("ok", false).s("error", "locked").i("code", 4).v("conflicts", str_array(&c)).to_json()
                );
            } else {
                eprintln!("Locked: already running: {}", c.join(", "));
            }
            return Ok(EXIT_FAIL);
        }
        Err(LockError::Fs(e)) => return Err(Fail::new(format!("cannot take the run locks: {e}"))),
    };
    if a.detach {
        return submit(&p.engine, &p.targets, &req, a.json);
    }
    let mut results = Array::new();
    let mut all_ok = true;
    smol::block_on(p.engine.run(&p.targets, &req, |res| {
        if get_i64(&res, "exit") != Some(0) {
            all_ok = false;
        }
        if !a.json {
            print_run(&res);
        }
        results.push(Value::Object(res));
    }));
    if a.json {
        println!("{}", Obj::new().b("ok", true).v("results", Value::Array(results)).to_json());
    }
    Ok(if all_ok { EXIT_OK } else { EXIT_FAIL })
}

/// `run --async`: submit, record, say how to follow it.
fn submit(engine: &Engine, targets: &[Target], req: &RunRequest, json_out: bool) -> AppResult {
    let mut results = Vec::new();
    if !json_out {
        println!("Submitted async run  req:{}", req.reqid);
    }
    smol::block_on(engine.submit(targets, req, |r| {
        if !json_out {
            let (host, rtt) = (get_str(&r, "host").unwrap_or_default(), get_str(&r, "rtt").unwrap_or_default());
            match (get_str(&r, "status").as_deref(), get_str(&r, "error")) {
                (Some("accepted"), _) => println!("==> {host}  [accepted  {rtt}]"),
                (Some("busy"), e) => println!("==> {host}  [BUSY: {}]", e.unwrap_or_default()),
                (_, e) => println!("==> {host}  [ERROR: {}]", e.unwrap_or_default()),
            }
        }
        results.push(r);
    }));
    let record = dispatch::async_record(&req.reqid, &req.script, targets, &results, Some((&req.username, "127.0.0.1")));
    if let Err(e) = RunStore::new(&engine.cfg.runs_dir).put(&req.reqid, &record) {
        eprintln!("warning: the run was submitted but could not be recorded ({e}); 'status' will not find it");
    }
    let accepted = results.iter().any(|r| get_str(r, "status").as_deref() == Some("accepted"));
    if json_out {
        let arr: Array = results.into_iter().map(Value::Object).collect();
        println!("{}", Obj::new().b("ok", true).s("reqid", &req.reqid).v("results", Value::Array(arr)).to_json());
    } else {
        println!("Check progress with: ctrl-exec status {}", req.reqid);
    }
    Ok(if accepted { EXIT_OK } else { EXIT_FAIL })
}

/// Load a record and, for a pending async run, fetch what its agents have.
fn load_run(config: &Option<String>, log_stderr: bool, reqid: &str) -> Result<Option<(Engine, Object)>, Fail> {
    let cfg = common::load_dispatcher(config)?;
    common::init_audit("ctrl-exec-dispatcher", &cfg.log, log_stderr);
    let store = RunStore::new(&cfg.runs_dir);
    store.purge(std::time::Duration::from_secs(ctrl_exec::runstore::TTL_SECS));
    let Some(record) = store.get(reqid)? else { return Ok(None) };
    let engine = Engine::open(cfg, true).map_err(|e| Fail::new(format!("cannot load the dispatcher identity: {e}")))?;
    Ok(Some((engine, record)))
}

/// Fetch pending results and store the merged record.
fn refresh(engine: &Engine, record: &mut Object) {
    if get_str(record, "mode").as_deref() != Some("async")
        || ctrl_exec::wire::get_bool(record, "complete") == Some(true)
    {
        return;
    }
    smol::block_on(engine.refresh(record));
    let reqid = get_str(record, "reqid").unwrap_or_default();
    if let Err(e) = RunStore::new(&engine.cfg.runs_dir).put(&reqid, record) {
        eprintln!("warning: cannot update the record: {e}");
    }
}

fn not_found(reqid: &str, json_out: bool) -> AppResult {
    if json_out {
        println!("{}", Obj::new().b("ok", false).s("error", "not found").s("reqid", reqid).to_json());
    } else {
        eprintln!("No such request: {reqid}");
    }
    Ok(EXIT_FAIL)
}

fn print_record(record: &Object, json_out: bool) {
    if json_out {
        let mut r = record.clone();
        r.insert("ok".into(), Value::Bool(true));
        println!("{}", json::to_string(&r));
        return;
    }
    let complete = ctrl_exec::wire::get_bool(record, "complete") == Some(true);
    println!(
        "Request {}  (script: {})  [{}]",
        get_str(record, "reqid").unwrap_or_default(),
        get_str(record, "script").unwrap_or_default(),
        if complete { "COMPLETE" } else { "PENDING" }
    );
    match (get_str(record, "mode").as_deref(), record.get("hosts"), record.get("results")) {
        (Some("async"), Some(Value::Object(hosts)), _) => {
            for (name, h) in hosts {
                let Value::Object(h) = h else { continue };
                let status = get_str(h, "status").unwrap_or_default();
                match status.as_str() {
                    "done" => {
                        let mut shown = h.clone();
                        shown.insert("host".into(), Value::String(name.clone()));
                        print_done(&shown);
                    }
                    s if dispatch::is_pending(s) => {
                        println!("==> {name}  [{s}]");
                        if let Some(e) = get_str(h, "fetch_error") {
                            println!("    (fetch pending: {e})");
                        }
                    }
                    s => {
                        println!("==> {name}  [{}]", s.to_ascii_uppercase());
                        if let Some(e) = get_str(h, "error") {
                            println!("    ERROR: {e}");
                        }
                    }
                }
            }
        }
        (_, _, Some(Value::Array(results))) => {
            for r in results {
                if let Value::Object(r) = r {
                    print_run(r);
                }
            }
        }
        _ => {}
    }
}

/// An async host that finished: like a run block, without rtt and reqid.
fn print_done(h: &Object) {
    let exit = get_i64(h, "exit").unwrap_or(-1);
    println!("==> {}  [done  exit:{exit}]", get_str(h, "host").unwrap_or_default());
    print_output(h);
}

fn status(a: StatusArgs) -> AppResult {
    let Some((engine, mut record)) = load_run(&a.config, a.log_stderr, &a.reqid)? else {
        return not_found(&a.reqid, a.json);
    };
    refresh(&engine, &mut record);
    print_record(&record, a.json);
    Ok(EXIT_OK)
}

fn wait(a: WaitArgs) -> AppResult {
    let Some((engine, mut record)) = load_run(&a.config, a.log_stderr, &a.reqid)? else {
        return not_found(&a.reqid, a.json);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(a.timeout);
    loop {
        refresh(&engine, &mut record);
        if ctrl_exec::wire::get_bool(&record, "complete") == Some(true) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            print_record(&record, a.json);
            return Ok(2);
        }
        std::thread::sleep(std::time::Duration::from_secs(2).min(deadline - std::time::Instant::now()));
    }
    print_record(&record, a.json);
    let all_ok = match (record.get("hosts"), record.get("results")) {
        (Some(Value::Object(hosts)), _) => hosts.values().all(|h| {
            matches!(h, Value::Object(h) if get_str(h, "status").as_deref() == Some("done") && get_i64(h, "exit") == Some(0))
        }),
        (_, Some(Value::Array(rs))) => rs.iter().all(|r| matches!(r, Value::Object(r) if get_i64(r, "exit") == Some(0))),
        _ => false,
    };
    Ok(if all_ok { EXIT_OK } else { EXIT_FAIL })
}

fn print_run(res: &Object) {
    let exit = get_i64(res, "exit").unwrap_or(-1);
    let label = if exit == 0 { "OK" } else { "FAIL" };
    println!(
        "==> {}  [{label}  exit:{exit}  {}  req:{}]",
        get_str(res, "host").unwrap_or_default(),
        get_str(res, "rtt").unwrap_or_default(),
        get_str(res, "reqid").unwrap_or_default()
    );
    print_output(res);
}

/// The body of a host's block: error, stdout verbatim, stderr, notes.
fn print_output(res: &Object) {
    use std::io::Write;
    let mut out = String::new();
    if let Some(e) = get_str(res, "error").filter(|e| !e.is_empty()) {
        out.push_str(&format!("    ERROR: {e}\n"));
    }
    let stdout = get_str(res, "stdout").unwrap_or_default();
    if !stdout.trim().is_empty() {
        out.push_str(&stdout);
        if !stdout.ends_with('\n') {
            out.push('\n');
        }
    }
    let stderr = get_str(res, "stderr").unwrap_or_default();
    if !stderr.trim().is_empty() {
        out.push_str(&format!("    STDERR: {}\n", stderr.trim_end()));
    }
    if ctrl_exec::wire::get_bool(res, "truncated") == Some(true) {
        out.push_str("    NOTE: output truncated by the agent's max_output limit\n");
    }
    let mut so = std::io::stdout().lock();
    let _ = so.write_all(out.as_bytes());
    let _ = so.flush();
}

fn ping(a: PingArgs) -> AppResult {
    if a.hosts.is_empty() {
        return Err(Fail::usage("usage: ping <host>[:<port>]..."));
    }
    let p = match prepare(&a.config, a.log_stderr, a.hosts, a.port, a.username, a.token, "ping", "", &[], a.json)? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let mut results: Vec<Object> = Vec::new();
    let mut failed = 0usize;
    if !a.json {
        println!("{:<30}  {:<8}  {:<8}  {:<28}  VERSION", "HOST", "STATUS", "RTT", "CERT EXPIRY");
        println!("{}", "-".repeat(85));
    }
    smol::block_on(async {
        p.engine
            .ping(&p.targets, &p.reqid, |res| {
                if get_str(&res, "status").as_deref() != Some("ok") {
                    failed += 1;
                }
                if !a.json {
                    print_ping(&res);
                }
                results.push(res);
            })
            .await;
        // Renewal never changes a ping's result or the exit status.
        if !a.no_renew {
            ctrl_exec::renew::renew_due(&p.engine, &p.targets, &mut results).await;
        }
    });
    if a.json {
        let arr: Array = results.into_iter().map(Value::Object).collect();
        println!("{}", Obj::new().b("ok", true).v("results", Value::Array(arr)).to_json());
    } else {
        print_renewals(&results);
    }
    Ok(if failed == 0 { EXIT_OK } else { EXIT_FAIL })
}

fn print_ping(res: &Object) {
    let mut host = get_str(res, "host").unwrap_or_default();
    if let Some(r) = get_str(res, "reported_hostname") {
        host = format!("{host} ({r})");
    }
    let status = get_str(res, "status").unwrap_or_default();
    let ok = status == "ok";
    let or_q = |k: &str| {
        if ok { get_str(res, k).unwrap_or_else(|| "?".into()) } else { "?".into() }
    };
    println!(
        "{:<30}  {:<8}  {:<8}  {:<28}  {}",
        host,
        status,
        get_str(res, "rtt").unwrap_or_default(),
        or_q("expiry"),
        or_q("version")
    );
    if !ok {
        println!("    ERROR: {}", get_str(res, "error").unwrap_or_default());
    }
}

/// One line per host whose certificate renewal was attempted or skipped.
pub(crate) fn print_renewals(results: &[Object]) {
    for r in results {
        let host = get_str(r, "host").unwrap_or_default();
        if ctrl_exec::wire::get_bool(r, "renewed") == Some(true) {
            println!(
                "{host}: certificate renewed (serial {}, expires {}); staged on the agent until its next restart",
                get_str(r, "renewed_serial").unwrap_or_default(),
                get_str(r, "renewed_expiry").unwrap_or_default()
            );
        } else if let Some(e) = get_str(r, "renew_error") {
            println!("{host}: certificate renewal failed: {e}");
        } else if let Some(why) = get_str(r, "renew_skipped") {
            println!("{host}: certificate renewal due but skipped: {why}");
        }
    }
}

fn list_agents(a: ListArgs) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    let mut filter = Vec::new();
    if let Some(spec) = &a.tags {
        for pair in spec.split(',').filter(|p| !p.trim().is_empty()) {
            match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => filter.push((k.trim().to_string(), v.trim().to_string())),
                _ => {
                    return Err(Fail::usage(format!("invalid tag filter '{pair}': expected key=value")));
                }
            }
        }
    }
    let reg = Registry::new(&cfg.registry_dir);
    let mut recs = Vec::new();
    for name in reg.names()? {
        let rec = match reg.get(&name) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("warning: skipped {e}");
                continue;
            }
        };
        if let Some(r) = rec {
            let tags = match r.raw.get("tags") {
                Some(Value::Object(t)) => t.clone(),
                _ => Object::new(),
            };
            if filter.iter().all(|(k, v)| get_str(&tags, k).as_deref() == Some(v.as_str())) {
                recs.push(r);
            }
        }
    }
    if a.json {
        let mut arr = Array::new();
        for r in &recs {
            arr.push(Value::Object(r.to_object()));
        }
        println!("{}", json::to_string(&Value::Array(arr)));
        return Ok(EXIT_OK);
    }
    if recs.is_empty() {
        println!("{}", if filter.is_empty() { "No registered agents." } else { "No agents match the tag filter." });
        return Ok(EXIT_OK);
    }
    let header = format!(
        "{:<30} {:<16} {:<5} {:<8} {:<22} {:<24} DAYS LEFT",
        "HOSTNAME", "IP", "PORT", "LOOKUP", "PAIRED", "CERT EXPIRY"
    );
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    let now = ctrl_exec::time::unix_now();
    for r in recs {
        let days = ctrl_exec::time::parse_openssl_date(&r.expiry)
            .map(|t| (t - now).div_euclid(86_400).to_string())
            .unwrap_or_else(|| "?".into());
        println!(
            "{:<30} {:<16} {:<5} {:<8} {:<22} {:<24} {}",
            r.hostname, r.ip, r.port, r.lookup_by, r.paired, r.expiry, days
        );
    }
    Ok(EXIT_OK)
}

fn list_locks(a: ListLocksArgs) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    let held = ctrl_exec::locks::Locks::new(&cfg.locks_dir).held()?;
    if a.json {
        let mut arr = Array::new();
        for (h, s) in &held {
            arr.push(Obj::new().s("host", h).s("script", s).into_value());
        }
        println!("{}", Obj::new().b("ok", true).v("locks", Value::Array(arr)).to_json());
    } else if held.is_empty() {
        println!("No locks currently held.");
    } else {
        println!("{:<30} SCRIPT", "HOST");
        println!("{}", "-".repeat(50));
        for (h, s) in &held {
            println!("{h:<30} {s}");
        }
    }
    Ok(EXIT_OK)
}
