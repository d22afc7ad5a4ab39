//! Operator verbs that manage the dispatcher's identity and its registry:
//! `rotate-cert`, `serial-status`, `unpair`, `edit-agent`.

use std::net::IpAddr;

use argh::FromArgs;
use ctrl_exec::audit;
use ctrl_exec::dispatch::Engine;
use ctrl_exec::error::{AppResult, EXIT_OK, Fail};
use ctrl_exec::registry::{AgentRecord, Registry};
use ctrl_exec::rotation::{self, Broadcast};
use ctrl_exec::wire::{Obj, get_str, valid_agent_name};
use miniserde::json::{self, Array, Value};

use super::common;

#[derive(FromArgs)]
/// Replace the dispatcher certificate and tell every agent to trust the new
/// serial (the old one stays in use for agents that have not confirmed yet,
/// until cert_overlap_days have passed).
#[argh(subcommand, name = "rotate-cert", help_triggers("-h", "--help"))]
pub struct RotateCertArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
    /// maintenance only: rotate if the certificate is due (cert_renewal_days),
    /// retry the broadcast, mark agents past the overlap window stale and
    /// retire the previous serial
    #[argh(switch)]
    check: bool,
    /// rotate even though agents have not confirmed the previous rotation
    /// (they will need re-pairing)
    #[argh(switch)]
    force: bool,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
}

#[derive(FromArgs)]
/// Show the rotation state and which dispatcher serial each agent trusts.
#[argh(subcommand, name = "serial-status", help_triggers("-h", "--help"))]
pub struct SerialStatusArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
/// Forget a registered agent (nothing is sent to it; its certificate stays
/// valid until it expires).
#[argh(subcommand, name = "unpair", help_triggers("-h", "--help"))]
pub struct UnpairArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// registry name
    #[argh(positional)]
    name: String,
}

#[derive(FromArgs)]
/// Change how a registered agent is reached, or its registry name.
#[argh(subcommand, name = "edit-agent", help_triggers("-h", "--help"))]
pub struct EditAgentArgs {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// new registry name
    #[argh(option)]
    rename: Option<String>,
    /// address to connect to
    #[argh(option)]
    ip: Option<String>,
    /// agent port (1-65535)
    #[argh(option)]
    agent_port: Option<String>,
    /// connect by 'ip' or by 'hostname'
    #[argh(option)]
    lookup_by: Option<String>,
    /// print the updated record as JSON
    #[argh(switch)]
    json: bool,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// registry name
    #[argh(positional)]
    name: String,
}

fn open_engine(cfg: ctrl_exec::config::DispatcherConfig) -> Result<Engine, Fail> {
    Engine::open(cfg, true).map_err(|e| Fail::new(format!("cannot load the dispatcher identity: {e}")))
}

fn failures_json(b: &Broadcast) -> Value {
    let mut arr = Array::new();
    for (host, e) in &b.failed {
        arr.push(Obj::new().s("host", host).s("error", e).into_value());
    }
    Value::Array(arr)
}

fn print_broadcast(b: &Broadcast) {
    println!("  Updated: {}", b.updated.len());
    println!("  Failed:  {}", b.failed.len());
    if !b.failed.is_empty() {
        println!();
        println!("Agents requiring attention:");
        for (host, e) in &b.failed {
            println!("  {host:<30}  {e}");
        }
        println!();
        println!("Failed agents will be retried automatically by the check loop.");
        println!("Agents offline longer than the overlap window will require re-pairing.");
    }
}

/// `rotate-cert [--check] [--force] [--json]`.
pub fn rotate_cert(a: RotateCertArgs) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit("ctrl-exec-dispatcher", &cfg.log, a.log_stderr);
    let engine = open_engine(cfg)?;
    if a.check {
        return check(&engine, a.json);
    }
    if !a.json {
        println!("Rotating dispatcher certificate...");
    }
    let r = match smol::block_on(rotation::rotate(&engine, a.force)) {
        Ok(r) => r,
        Err(e) => return Err(Fail::new(format!("Rotation failed: {e}"))),
    };
    if !a.json {
        println!("New serial:      {}", r.new_serial);
        println!("Old serial:      {}", if r.old_serial.is_empty() { "(none)" } else { &r.old_serial });
        println!("Overlap expires: {}", r.overlap_expires);
        println!("Agents pending:  {}", r.agents);
        println!();
        println!("Broadcasting new serial to agents...");
    }
    let b = smol::block_on(rotation::broadcast(&engine)).map_err(|e| Fail::new(format!("Broadcast failed: {e}")))?;
    if a.json {
        println!(
            "{}",
            Obj::new()
                .b("ok", true)
                .s("new_serial", &r.new_serial)
                .s("old_serial", &r.old_serial)
                .s("overlap_expires", &r.overlap_expires)
                .i("pending", r.agents as i64)
                .i("updated", b.updated.len() as i64)
                .v("failed", failures_json(&b))
                .to_json()
        );
    } else {
        print_broadcast(&b);
    }
    Ok(EXIT_OK)
}

fn check(engine: &Engine, json_out: bool) -> AppResult {
    let m = rotation::rotation_maintenance(&engine.cfg, engine);
    if json_out {
        let mut o = Obj::new().b("ok", m.errors.is_empty());
        if let Some(d) = m.days_left {
            o = o.i("days_left", d);
        }
        o = o.i("threshold", i64::from(engine.cfg.cert_renewal_days));
        if let Some(r) = &m.rotated {
            o = o.v(
                "rotated",
                Obj::new()
                    .s("new_serial", &r.new_serial)
                    .s("old_serial", &r.old_serial)
                    .s("overlap_expires", &r.overlap_expires)
                    .into_value(),
            );
        }
        o = o
            .i("updated", m.broadcast.updated.len() as i64)
            .v("failed", failures_json(&m.broadcast))
            .v("stale", ctrl_exec::wire::str_array(&m.stale));
        if let Some(r) = &m.retired {
            o = o.v(
                "retired",
                Obj::new()
                    .s("serial", &r.serial)
                    .i("agents", r.result.updated.len() as i64)
                    .v("failed", failures_json(&r.result))
                    .into_value(),
            );
        }
        let mut errs = Array::new();
        for (phase, e) in &m.errors {
            errs.push(Obj::new().s("phase", *phase).s("error", e).into_value());
        }
        println!("{}", o.v("errors", Value::Array(errs)).to_json());
    } else {
        match m.days_left {
            Some(d) => println!(
                "Dispatcher certificate: {d} day(s) left (rotation at {} or fewer).",
                engine.cfg.cert_renewal_days
            ),
            None => println!("Dispatcher certificate: expiry unknown."),
        }
        if let Some(r) = &m.rotated {
            println!(
                "Rotated: new serial {}, old serial {}, overlap until {}.",
                r.new_serial, r.old_serial, r.overlap_expires
            );
        }
        if m.broadcast.updated.is_empty() && m.broadcast.failed.is_empty() {
            println!("Broadcast: no agent waiting for the current serial.");
        } else {
            println!("Broadcasting the current serial to agents that have not confirmed it...");
            print_broadcast(&m.broadcast);
        }
        if !m.stale.is_empty() {
            println!("Stale (overlap window over, must be re-paired): {}", m.stale.join(", "));
        }
        if let Some(r) = &m.retired {
            println!("Retired previous serial {} on {} agent(s).", r.serial, r.result.updated.len());
            for (host, e) in &r.result.failed {
                println!("  {host:<30}  {e}");
            }
        }
        for (phase, e) in &m.errors {
            eprintln!("{phase}: {e}");
        }
    }
    Ok(if m.errors.is_empty() { EXIT_OK } else { ctrl_exec::error::EXIT_FAIL })
}

/// `serial-status [--json]`.
pub fn serial_status(a: SerialStatusArgs) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    let state = match rotation::read_state(&cfg.rotation_file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("warning: {} is corrupt ({e}); showing no rotation state", cfg.rotation_file.display());
            None
        }
    };
    let recs = rotation::records(&Registry::new(&cfg.registry_dir));
    if a.json {
        let mut arr = Array::new();
        for r in &recs {
            arr.push(Value::Object(r.to_object()));
        }
        let st = state.map(|s| Value::Object(s.to_object())).unwrap_or(Value::Null);
        println!("{}", Obj::new().v("state", st).v("agents", Value::Array(arr)).to_json());
        return Ok(EXIT_OK);
    }
    match &state {
        Some(s) => {
            println!("Current serial:  {}", s.current_serial);
            println!("Previous serial: {}", s.previous_serial.as_deref().unwrap_or("(none)"));
            println!("Rotated at:      {}", s.rotated_at);
            println!("Overlap expires: {}", s.overlap_expires);
            if let Some(r) = &s.previous_retired {
                println!("Retired at:      {r}");
            }
        }
        None => println!("No rotation has been performed."),
    }
    println!();
    if recs.is_empty() {
        println!("No registered agents.");
        return Ok(EXIT_OK);
    }
    let header = format!("{:<30} {:<10} {:<24} SERIAL", "HOSTNAME", "STATUS", "CONFIRMED");
    println!("{header}");
    println!("{}", "-".repeat(header.len() + 12));
    for r in recs {
        let confirmed = get_str(&r.raw, "serial_confirmed").unwrap_or_default();
        let serial = if r.dispatcher_serial.chars().count() > 16 {
            format!("{}...", r.dispatcher_serial.chars().take(16).collect::<String>())
        } else {
            r.dispatcher_serial.clone()
        };
        let confirmed = if confirmed.is_empty() { "-".to_string() } else { confirmed };
        println!("{:<30} {:<10} {:<24} {}", r.hostname, r.serial_status, confirmed, serial);
    }
    Ok(EXIT_OK)
}

/// `unpair <name>`.
pub fn unpair(a: UnpairArgs) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit("ctrl-exec-dispatcher", &cfg.log, a.log_stderr);
    let reg = Registry::new(&cfg.registry_dir);
    let fail = |msg: String| Fail::new(format!("Unpair failed: {msg}"));
    if !valid_agent_name(&a.name) {
        return Err(fail(format!("No registry entry for '{}'", a.name)));
    }
    let _lock = reg.lock().map_err(|e| fail(e.to_string()))?;
    let rec = match reg.get(&a.name) {
        Ok(Some(r)) => r,
        Ok(None) => return Err(fail(format!("No registry entry for '{}'", a.name))),
        Err(e) => return Err(fail(e.to_string())),
    };
    let path = cfg.registry_dir.join(format!("{}.json", a.name));
    std::fs::remove_file(&path).map_err(|e| fail(format!("cannot remove {}: {e}", path.display())))?;
    rotation::sync_dir(&path);
    let expiry = if rec.expiry.is_empty() { "unknown".to_string() } else { rec.expiry.clone() };
    audit::info("unpair", &[("AGENT", &a.name), ("EXPIRY", &expiry)]);
    println!("Unpaired '{}': removed from the registry; it will no longer be renewed or reachable by name.", a.name);
    println!("Its certificate remains valid until {expiry}.");
    println!(
        "Decommission the agent (delete its key and certificate), or add its certificate serial to the\nrevoked_serials list of every other agent and reload them, so the certificate cannot be used elsewhere."
    );
    Ok(EXIT_OK)
}

/// `edit-agent <name> [--rename] [--ip] [--agent-port] [--lookup-by] [--json]`.
pub fn edit_agent(a: EditAgentArgs) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit("ctrl-exec-dispatcher", &cfg.log, a.log_stderr);
    if a.rename.is_none() && a.ip.is_none() && a.agent_port.is_none() && a.lookup_by.is_none() {
        return Err(Fail::usage(
            "Nothing to change: give at least one of --rename <name>, --ip <addr>, --agent-port <n>, --lookup-by ip|hostname",
        ));
    }
    if let Some(l) = &a.lookup_by
        && l != "ip"
        && l != "hostname"
    {
        return Err(Fail::usage("--lookup-by must be 'ip' or 'hostname'"));
    }
    let port = match &a.agent_port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.starts_with(|c: char| c.is_ascii_digit()) => Some(n),
            _ => return Err(Fail::usage("--agent-port must be a port number (1-65535)")),
        },
    };
    if let Some(ip) = &a.ip
        && ip.parse::<IpAddr>().is_err()
    {
        return Err(Fail::usage("--ip must be an IPv4 or IPv6 address"));
    }
    if let Some(n) = &a.rename
        && !valid_agent_name(n)
    {
        return Err(Fail::usage(format!(
            "invalid agent name '{n}': use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )));
    }
    let reg = Registry::new(&cfg.registry_dir);
    let fail = |msg: String| Fail::new(format!("Edit failed: {msg}"));
    let _lock = reg.lock().map_err(|e| fail(e.to_string()))?;
    let mut rec: AgentRecord = match valid_agent_name(&a.name).then(|| reg.get(&a.name)) {
        Some(Ok(Some(r))) => r,
        Some(Err(e)) => return Err(fail(e.to_string())),
        _ => return Err(fail(format!("No registry entry for '{}'", a.name))),
    };
    let old_name = rec.hostname.clone();
    let renamed = a.rename.as_ref().filter(|n| **n != old_name);
    if let Some(n) = renamed
        && reg.get(n).map_err(|e| fail(e.to_string()))?.is_some()
    {
        return Err(fail(format!("an agent named '{n}' is already registered")));
    }
    if let Some(ip) = &a.ip {
        rec.ip = ip.clone();
    }
    if let Some(p) = port {
        rec.port = p;
    }
    if let Some(l) = &a.lookup_by {
        rec.lookup_by = l.clone();
    }
    if let Some(n) = renamed {
        rec.hostname = n.clone();
    }
    // A rename writes the new record before removing the old one: a crash
    // in between leaves both, never neither.
    reg.put(&rec).map_err(|e| fail(e.to_string()))?;
    if renamed.is_some() {
        let old = cfg.registry_dir.join(format!("{old_name}.json"));
        std::fs::remove_file(&old).map_err(|e| fail(format!("cannot remove {}: {e}", old.display())))?;
        rotation::sync_dir(&old);
    }
    let port_s = port.map(|p| p.to_string());
    let mut fields: Vec<(&str, &str)> = vec![("AGENT", &rec.hostname)];
    if renamed.is_some() {
        fields.push(("RENAMED_FROM", &old_name));
    }
    if let Some(ip) = &a.ip {
        fields.push(("IP", ip));
    }
    if let Some(p) = &port_s {
        fields.push(("PORT", p));
    }
    if let Some(l) = &a.lookup_by {
        fields.push(("LOOKUP_BY", l));
    }
    audit::info("edit-agent", &fields);
    if a.json {
        println!("{}", json::to_string(&rec.to_object()));
    } else {
        println!("Updated agent '{}'.", rec.hostname);
        if renamed.is_some() {
            println!("  renamed from: {old_name}");
        }
        println!("  ip:        {}", rec.ip);
        println!("  port:      {}", rec.port);
        println!("  lookup_by: {}", rec.lookup_by);
    }
    Ok(EXIT_OK)
}
