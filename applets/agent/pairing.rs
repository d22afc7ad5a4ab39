//! `ctrl-exec-agent request-pairing`: ask a dispatcher in pairing mode for
//! an identity, wait for the operator, install the answer. The protocol is
//! in `ctrl_exec::pairagent`.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use argh::FromArgs;
use ctrl_exec::audit;
use ctrl_exec::ca::{self, KeyType};
use ctrl_exec::error::{AppResult, EXIT_OK, EXIT_USAGE, Fail};
use ctrl_exec::offline::{self, PendingFiles};
use ctrl_exec::pairagent::{self, Dispatcher, Outcome, Plan};
use ctrl_exec::pairing::{self, PairRequest};

use super::common;

/// Exit code when nobody answered in time (upstream).
pub const EXIT_TIMEOUT: u8 = 2;
/// Exit code when the request was denied (upstream).
pub const EXIT_DENIED: u8 = 3;

#[derive(FromArgs)]
/// Ask a dispatcher in pairing mode for this agent's certificate; the
/// operator approves it after comparing the 6-digit code shown on both sides.
#[argh(subcommand, name = "request-pairing", help_triggers("-h", "--help"))]
pub struct RequestPairing {
    /// agent.conf whose paths receive the identity (default
    /// /etc/ctrl-exec-agent/agent.conf; written if absent)
    #[argh(option)]
    config: Option<String>,
    /// the dispatcher's name or address (not with --offline)
    #[argh(option)]
    dispatcher: Option<String>,
    /// print the request as text for a console or copy and paste instead
    /// of connecting (answer with the CA's `sign`, then `install-reply`);
    /// repeating it prints the same request until a reply is installed
    #[argh(switch)]
    offline: bool,
    /// the dispatcher's pairing port (default 7444)
    #[argh(option, default = "pairing::DEFAULT_PORT")]
    port: u16,
    /// suggest how the dispatcher addresses this agent: ip or hostname
    #[argh(option)]
    lookup_by: Option<String>,
    /// name to register (default: hostname from agent.conf, else this host's FQDN)
    #[argh(option)]
    name: Option<String>,
    /// this agent's port to register (default: port from agent.conf, else 7443)
    #[argh(option)]
    agent_port: Option<u16>,
    /// key type: rsa4096 (default), rsa3072, rsa2048 or ec256
    #[argh(option)]
    key_type: Option<String>,
    /// print the request id, then wait detached (up to --timeout)
    #[argh(switch)]
    background: bool,
    /// seconds to wait for the operator (background: default 30, at most 600;
    /// foreground: default 660)
    #[argh(option)]
    timeout: Option<u64>,
    /// pair again although this agent already has an identity (new key);
    /// with --offline also: discard a pending request and make a new one
    #[argh(switch)]
    force: bool,
    /// directory for run-time state in a new agent.conf (staged
    /// certificates, detached-run results); absolute
    #[argh(option)]
    state_dir: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// internal: the detached process of --background
    #[argh(switch)]
    background_child: bool,
}

struct Checked {
    plan: Plan,
    name: String,
    key_type: KeyType,
    wait: Duration,
}

fn check(a: &RequestPairing, conf: &Path) -> Result<Checked, Fail> {
    if let Some(l) = &a.lookup_by
        && pairing::lookup_by(Some(l)).is_none()
    {
        return Err(Fail::usage("--lookup-by must be 'ip' or 'hostname'"));
    }
    if a.port == 0 || a.agent_port == Some(0) {
        return Err(Fail::usage("ports must be from 1 to 65535"));
    }
    let key_type = match &a.key_type {
        None => KeyType::default(),
        Some(k) => KeyType::parse(k)
            .ok_or_else(|| Fail::usage(format!("--key-type must be rsa4096, rsa3072, rsa2048 or ec256, not '{k}'")))?,
    };
    let wait = match (a.background || a.background_child, a.timeout) {
        (true, Some(t)) if !(1..=600).contains(&t) => {
            return Err(Fail::usage("--timeout must be from 1 to 600 seconds in background mode"));
        }
        (true, t) => Duration::from_secs(t.unwrap_or(30)),
        (false, Some(0)) => return Err(Fail::usage("--timeout must be at least 1 second")),
        (false, t) => Duration::from_secs(t.unwrap_or(660)),
    };
    if let Some(s) = &a.state_dir
        && !Path::new(s).is_absolute()
    {
        return Err(Fail::usage(format!("--state-dir must be an absolute path, not {s}")));
    }
    let plan = Plan::for_conf(conf)?;
    if plan.paired() && !a.force {
        return Err(Fail::new(format!(
            "this agent already has an identity ({}); pairing again replaces its key: add --force to do so",
            plan.paths.cert.display()
        )));
    }
    plan.preflight()?;
    let name = match a.name.clone().or_else(|| plan.name.clone()) {
        Some(n) => n,
        None => {
            let (n, fqdn) = pairagent::own_name();
            if !fqdn && !a.background_child {
                eprintln!(
                    "Warning: this host has no fully-qualified domain name; registering the short name '{n}'.\n\
                     A dispatcher on another network may not resolve it: configure a domain, pass --name,\n\
                     or pair with --lookup-by ip so the dispatcher reaches this agent by address."
                );
            }
            n
        }
    };
    if !ctrl_exec::wire::valid_agent_name(&name) {
        return Err(Fail::usage(format!(
            "'{name}' cannot be an agent name: use letters, digits, '.', '_' or '-', starting with a letter or digit (pass --name)"
        )));
    }
    Ok(Checked { plan, name, key_type, wait })
}

/// The agent.conf path, with the audit trail started as that file says
/// (syslog when it does not exist yet).
fn start(config: &Option<String>, log_stderr: bool) -> PathBuf {
    let conf = PathBuf::from(config.as_deref().unwrap_or(ctrl_exec::config::AGENT_CONF));
    let log = match ctrl_exec::config::AgentConfig::load(&conf) {
        Ok(c) => c.log,
        Err(_) => ctrl_exec::config::LogTarget::Syslog("/dev/log".into()),
    };
    common::init_audit("ctrl-exec-agent", &log, log_stderr);
    conf
}

/// `request-pairing`.
pub fn request_pairing(a: RequestPairing) -> AppResult {
    let conf = start(&a.config, a.log_stderr);
    if a.offline {
        if a.dispatcher.is_some() || a.background {
            return Err(Fail::usage("--offline does not go with --dispatcher or --background"));
        }
        return offline_request(&a, &conf);
    }
    let Some(host) = a.dispatcher.clone() else {
        return Err(Fail::usage("say where the dispatcher is: --dispatcher <host> (or use --offline)"));
    };
    let c = check(&a, &conf)?;
    if a.background {
        return background_parent(&conf);
    }
    let d = Dispatcher { host, port: a.port };
    let quiet = a.background_child;
    let say = |s: &str| {
        if !quiet {
            println!("{s}");
        }
    };
    smol::block_on(async {
        // Fail fast, before a slow key generation, when nothing listens.
        drop(d.tcp(Duration::from_secs(5)).await?);
        say(&format!("Generating the {} key and CSR for '{}'...", c.key_type.describe(), c.name));
        let key = c.key_type.generate()?;
        let key_pem = ca::key_pem(&key)?;
        let csr = ca::make_csr(&key, &c.name)?;
        let csr_pem = String::from_utf8_lossy(&csr.to_pem().map_err(ca::CaError::from)?).into_owned();
        let mut req = PairRequest {
            hostname: c.name.clone(),
            csr: csr_pem,
            nonce: pairagent::new_nonce()?,
            ip: None,
            port: Some(a.agent_port.unwrap_or(c.plan.port)),
            lookup_by: a.lookup_by.clone(),
        };
        say(&format!(
            "Pairing code: {}\n  Check that the dispatcher shows the same code before the request is approved.\n",
            req.code()
        ));
        say(&format!("Connecting to the dispatcher at {}:{} for pairing...", d.host, d.port));
        let waiting = pairagent::send(&d, &mut req, Duration::from_secs(30)).await?;
        if quiet {
            // The parent process relays this line and exits.
            println!("{} {}", waiting.reqid, req.code());
        } else {
            say(&format!("Request {} is waiting for approval (up to {}s).", waiting.reqid, c.wait.as_secs()));
        }
        let reqid = waiting.reqid.clone();
        match waiting.answer(&req.nonce, c.wait).await {
            Ok(Outcome::Approved(ap)) => {
                let state = a.state_dir.as_deref().map(Path::new);
                let port = a.agent_port.unwrap_or(c.plan.port);
                let report = c.plan.install(&c.name, port, &key_pem, &ap, state)?;
                audit::info(
                    "pair-complete",
                    &[
                        ("STATUS", "approved"),
                        ("DISPATCHER", &ap.dispatcher_id),
                        ("DISPATCHER_HOST", &d.host),
                        ("REQID", &reqid),
                        ("AGENT", &c.name),
                    ],
                );
                if !quiet {
                    for l in report {
                        println!("  {l}");
                    }
                    println!("Pairing complete. Certificates stored.");
                    next_steps(&conf);
                }
                Ok(EXIT_OK)
            }
            Ok(Outcome::Denied(reason)) => {
                audit::warn("pair-denied", &[("REASON", &reason), ("REQID", &reqid), ("DISPATCHER_HOST", &d.host)]);
                Err(Fail::new(format!("Pairing failed: {reason}")).with_code(EXIT_DENIED))
            }
            Err(e) if e.0.starts_with("no answer") => {
                audit::warn("pair-timeout", &[("REQID", &reqid), ("DISPATCHER_HOST", &d.host)]);
                Err(Fail::new(format!("Pairing failed: {e}")).with_code(EXIT_TIMEOUT))
            }
            Err(e) => {
                audit::warn("pair-denied", &[("REASON", &e.0), ("REQID", &reqid), ("DISPATCHER_HOST", &d.host)]);
                Err(Fail::new(format!("Pairing failed: {e}")).with_code(EXIT_DENIED))
            }
        }
    })
}

/// `request-pairing --offline`: print the request (the same one again while
/// it waits for its reply).
fn offline_request(a: &RequestPairing, conf: &Path) -> AppResult {
    let plan = Plan::for_conf(conf)?;
    let pending = PendingFiles::beside(&plan.paths.key);
    let tail = |code: &str| {
        eprintln!("Pairing code: {code}");
        eprintln!("Copy the block from BEGIN to END into 'ctrl-exec-ca sign' on the dispatcher and check that");
        eprintln!("it shows the same code; then paste its reply into:");
        eprintln!("    ctrl-exec-agent install-reply --config {}", conf.display());
    };
    if a.state_dir.is_some() || a.timeout.is_some() {
        return Err(Fail::usage(
            "--state-dir and --timeout do not apply to --offline (give --state-dir to install-reply)",
        ));
    }
    match pending.load() {
        Some(_) if a.force => {
            eprintln!("Discarding the earlier request (--force): its reply can no longer be installed.");
            pending.clear();
        }
        _ => {}
    }
    if let Some((_, req)) = pending.load() {
        eprintln!(
            "This agent's earlier request is still waiting for its reply; here it is again (--force starts over)."
        );
        print!("{}", offline::render_request(&req));
        tail(&req.code());
        return Ok(EXIT_OK);
    }
    let c = check(a, conf)?;
    eprintln!("Generating the {} key and CSR for '{}'...", c.key_type.describe(), c.name);
    let key = c.key_type.generate()?;
    let key_pem = ca::key_pem(&key)?;
    let csr = ca::make_csr(&key, &c.name)?;
    let req = PairRequest {
        hostname: c.name.clone(),
        csr: String::from_utf8_lossy(&csr.to_pem().map_err(ca::CaError::from)?).into_owned(),
        nonce: pairagent::new_nonce()?,
        ip: None,
        port: Some(a.agent_port.unwrap_or(c.plan.port)),
        lookup_by: a.lookup_by.clone(),
    };
    let text = offline::render_request(&req);
    pending.save(&key_pem, &text)?;
    audit::info("pair-request", &[("AGENT", &c.name), ("MODE", "offline"), ("CODE", &req.code())]);
    print!("{text}");
    tail(&req.code());
    Ok(EXIT_OK)
}

#[derive(FromArgs)]
/// Install the reply of `ctrl-exec-ca sign` (read on stdin) to an offline
/// pairing request; installing it again changes nothing.
#[argh(subcommand, name = "install-reply", help_triggers("-h", "--help"))]
pub struct InstallReply {
    /// agent.conf whose paths receive the identity (default
    /// /etc/ctrl-exec-agent/agent.conf; written if absent)
    #[argh(option)]
    config: Option<String>,
    /// directory for run-time state in a new agent.conf; absolute
    #[argh(option)]
    state_dir: Option<String>,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
}

/// `install-reply`.
pub fn install_reply(a: InstallReply) -> AppResult {
    let conf = start(&a.config, a.log_stderr);
    if let Some(s) = &a.state_dir
        && !Path::new(s).is_absolute()
    {
        return Err(Fail::usage(format!("--state-dir must be an absolute path, not {s}")));
    }
    let mut text = String::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| Fail::new(format!("cannot read the reply from stdin: {e}")))?;
    let (name, ap) = offline::parse_reply(&text)?;
    let plan = Plan::for_conf(&conf)?;
    let pending = PendingFiles::beside(&plan.paths.key);
    let Some((key_pem, req)) = pending.load() else {
        if std::fs::read_to_string(&plan.paths.cert).is_ok_and(|c| c == ap.cert) {
            println!("This reply is already installed ({}); nothing to do.", plan.paths.cert.display());
            return Ok(EXIT_OK);
        }
        return Err(Fail::new(format!(
            "no pending pairing request for {}: run 'ctrl-exec-agent request-pairing --offline --config {}' first",
            conf.display(),
            conf.display()
        )));
    };
    if ap.nonce != req.nonce || name != req.hostname {
        return Err(Fail::new(
            "this reply answers a different request (its name or nonce differ from the pending one); nothing was installed",
        ));
    }
    plan.preflight()?;
    let state = a.state_dir.as_deref().map(Path::new);
    let report = plan.install(&req.hostname, req.port.unwrap_or(plan.port), &key_pem, &ap, state)?;
    pending.clear();
    audit::info(
        "pair-complete",
        &[("STATUS", "approved"), ("MODE", "offline"), ("DISPATCHER", &ap.dispatcher_id), ("AGENT", &name)],
    );
    for l in report {
        println!("  {l}");
    }
    println!("Pairing complete. Certificates stored.");
    next_steps(&conf);
    Ok(EXIT_OK)
}

fn next_steps(conf: &Path) {
    let running = std::fs::read_dir("/proc").ok().is_some_and(|rd| {
        rd.filter_map(|e| e.ok()).any(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("serve") && (cmd.contains("ctrl-exec-agent") || cmd.contains("ctrl-exec\0agent"))
        })
    });
    if running {
        println!("\nAn agent is already running: restart it so it uses the new certificate.");
    } else {
        println!("\nThe agent is paired but not running yet. Start it:");
        if Path::new("/run/systemd/system").exists() {
            println!("\n    systemctl enable --now ctrl-exec-agent");
        } else if Path::new("/etc/rc.common").exists() {
            println!("\n    uci set ctrl-exec.agent.enabled=1; uci commit ctrl-exec");
            println!("    /etc/init.d/ctrl-exec-agent enable; /etc/init.d/ctrl-exec-agent start");
        }
        println!("\n    ctrl-exec-agent serve --config {}", conf.display());
    }
    println!("\nThen check it with: ctrl-exec-agent self-check --config {}", conf.display());
}

/// `--background`: a detached copy of this command does the work; we print
/// the request id it reports (or its error) and leave it waiting.
fn background_parent(_conf: &Path) -> AppResult {
    use std::os::unix::process::CommandExt;
    let mut args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--background").collect();
    // Whatever role name we were called by, the copy runs the agent role.
    if args.first().map(String::as_str) == Some("agent") {
        args.remove(0);
    }
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0("ctrl-exec-agent")
        .args(&args)
        .arg("--background-child")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    common::new_session(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| Fail::new(format!("cannot start the background request: {e}")))?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let mut words = line.split_whitespace();
    if let (Some(id), Some(code)) = (words.next(), words.next())
        && ctrl_exec::wire::valid_reqid(id)
    {
        println!("{id}");
        eprintln!("Pairing code: {code} (compare it with the dispatcher's before the request is approved)");
        return Ok(EXIT_OK);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let st = child.wait().map_err(|e| Fail::new(e.to_string()))?;
    let code = st.code().map(|c| c as u8).filter(|c| *c != 0).unwrap_or(EXIT_USAGE);
    let msg = err.lines().map(|l| l.strip_prefix("ctrl-exec-agent: ").unwrap_or(l)).collect::<Vec<_>>().join("\n");
    Err(Fail::new(if msg.is_empty() { "the background request failed".into() } else { msg }).with_code(code))
}
