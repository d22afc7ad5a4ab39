//! The operator CLI (`ctrl-exec`, `ced`, `ctrl-exec-dispatcher`):
//! `run`, `ping`, `list-agents`.
//!
//! One process, one thread: every host is a future on the same executor,
//! at most `max_parallel` at once; results print as they complete. The exit
//! code policy is here and only here: `run` exits 0 only if every host ran
//! the script and it exited 0; `ping` exits 0 only if every host answered.

use argh::FromArgs;
use ctrl_exec::client::Target;
use ctrl_exec::dispatch::{self, Engine, ResolveError, RunRequest};
use ctrl_exec::error::{AppResult, EXIT_FAIL, EXIT_OK, Fail};
use ctrl_exec::hook::{self, Decision, NoHook};
use ctrl_exec::registry::Registry;
use ctrl_exec::wire::{Obj, get_i64, get_str};
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
    ListAgents(ListArgs),
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
        Verb::ListAgents(a) if after.is_empty() => list_agents(a),
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

fn print_run(res: &Object) {
    use std::io::Write;
    let exit = get_i64(res, "exit").unwrap_or(-1);
    let label = if exit == 0 { "OK" } else { "FAIL" };
    let mut out = String::new();
    out.push_str(&format!(
        "==> {}  [{label}  exit:{exit}  {}  req:{}]\n",
        get_str(res, "host").unwrap_or_default(),
        get_str(res, "rtt").unwrap_or_default(),
        get_str(res, "reqid").unwrap_or_default()
    ));
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
    let mut results = Array::new();
    let mut failed = 0usize;
    if !a.json {
        println!("{:<30}  {:<8}  {:<8}  {:<28}  VERSION", "HOST", "STATUS", "RTT", "CERT EXPIRY");
        println!("{}", "-".repeat(85));
    }
    smol::block_on(p.engine.ping(&p.targets, &p.reqid, |res| {
        if get_str(&res, "status").as_deref() != Some("ok") {
            failed += 1;
        }
        if !a.json {
            print_ping(&res);
        }
        results.push(Value::Object(res));
    }));
    if a.json {
        println!("{}", Obj::new().b("ok", true).v("results", Value::Array(results)).to_json());
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
