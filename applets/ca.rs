//! The private CA (`ctrl-exec-ca`, also `ctrl-exec ca` and the upstream
//! CLI verbs): `setup-ca`, `setup-ctrl-exec`, `enroll`.
//!
//! `enroll` is the network-free provisioning path: it makes an agent's key and
//! certificate here, signs it, registers the agent, and hands the identity
//! over either as a directory (`--out`) or as a text bundle on stdout
//! (`--bundle`, for a serial console), which `ctrl-exec-agent install-bundle`
//! unpacks. The registry entry is written last, so a failure anywhere earlier
//! leaves no half-enrolled agent behind.

use std::io::IsTerminal;
use std::net::IpAddr;

use argh::FromArgs;
use ctrl_exec::audit;
use ctrl_exec::bundle::Bundle;
use ctrl_exec::ca::{self, CaFiles};
use ctrl_exec::error::{AppResult, EXIT_OK, Fail};
use ctrl_exec::registry::{AgentRecord, Registry};
use ctrl_exec::trust::TrustedMap;
use ctrl_exec::wire::valid_agent_name;

use super::common;

mod pairing;

#[derive(FromArgs)]
/// ctrl-exec private CA: create the CA and the dispatcher certificate, enrol
/// agents, and pair them over the network.
#[argh(help_triggers("-h", "--help"))]
struct CaCli {
    #[argh(subcommand)]
    verb: Verb,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Verb {
    SetupCa(SetupCa),
    SetupCtrlExec(SetupCtrlExec),
    Enroll(Enroll),
    PairingMode(pairing::PairingMode),
    ListRequests(pairing::ListRequests),
    Approve(pairing::Approve),
    Deny(pairing::Deny),
    Sign(pairing::Sign),
}

#[derive(FromArgs)]
/// Create the CA key (0600) and self-signed certificate; refuses to overwrite.
#[argh(subcommand, name = "setup-ca", help_triggers("-h", "--help"))]
struct SetupCa {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
}

#[derive(FromArgs)]
/// Create the dispatcher key and certificate signed by the CA.
#[argh(subcommand, name = "setup-ctrl-exec", help_triggers("-h", "--help"))]
struct SetupCtrlExec {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// replace an existing dispatcher certificate without asking (every
    /// enrolled agent must then be re-enrolled)
    #[argh(switch)]
    yes: bool,
}

#[derive(FromArgs)]
/// Enrol an agent without a network: make its key and certificate, register
/// it, and write its identity to --out <dir> or as a text bundle (--bundle).
#[argh(subcommand, name = "enroll", help_triggers("-h", "--help"))]
struct Enroll {
    /// config file (default $CTRL_EXEC_CONFIG or /etc/ctrl-exec/ctrl-exec.conf)
    #[argh(option)]
    config: Option<String>,
    /// address the dispatcher connects to (default: connect by name)
    #[argh(option)]
    ip: Option<String>,
    /// agent listen port (default 7443)
    #[argh(option, default = "7443")]
    agent_port: u16,
    /// agent listen address written into agent.conf (default 0.0.0.0)
    #[argh(option, default = "String::from(\"0.0.0.0\")")]
    bind: String,
    /// write the agent's files into this directory
    #[argh(option)]
    out: Option<String>,
    /// print the identity as a text bundle on stdout
    #[argh(switch)]
    bundle: bool,
    /// replace an existing registration (and files in --out)
    #[argh(switch)]
    force: bool,
    /// write audit lines to stderr instead of syslog
    #[argh(switch)]
    log_stderr: bool,
    /// agent name (registry name and certificate CN)
    #[argh(positional)]
    name: String,
}

/// Entry point of the CA role.
pub fn main(invoked: &str, args: &[String]) -> AppResult {
    let cli: CaCli = common::parse(invoked, args)?;
    match cli.verb {
        Verb::SetupCa(a) => setup_ca(a),
        Verb::SetupCtrlExec(a) => setup_ctrl_exec(a),
        Verb::Enroll(a) => enroll(a),
        Verb::PairingMode(a) => pairing::pairing_mode(a),
        Verb::ListRequests(a) => pairing::list_requests(a),
        Verb::Approve(a) => pairing::approve(a),
        Verb::Deny(a) => pairing::deny(a),
        Verb::Sign(a) => pairing::sign(a),
    }
}

fn setup_ca(a: SetupCa) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    let files = CaFiles::new(&cfg.ca, &cfg.ca_dir);
    files.check_absent()?;
    eprintln!("Generating the {} CA key (this can take a while on slow hardware)...", cfg.key_type.describe());
    files.create(cfg.key_type, 3650)?;
    println!("CA created.");
    println!("  key:         {} (0600; keep it on this host, never copy it)", files.key.display());
    println!("  certificate: {}", files.cert.display());
    println!("Next: ctrl-exec setup-ctrl-exec --config {}", cfg.path.display());
    Ok(EXIT_OK)
}

fn setup_ctrl_exec(a: SetupCtrlExec) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    let files = CaFiles::new(&cfg.ca, &cfg.ca_dir);
    files.load()?;
    if cfg.cert.exists() {
        let agents = Registry::new(&cfg.registry_dir).names()?.len();
        if agents > 0 && !a.yes {
            let msg = format!(
                "{} already exists and {agents} agent(s) trust its serial: a new dispatcher certificate means re-enrolling every one of them.",
                cfg.cert.display()
            );
            if !std::io::stdin().is_terminal() {
                return Err(Fail::new(format!("{msg}\nRe-run with --yes to replace it anyway.")));
            }
            eprint!("{msg}\nReplace it? [y/N] ");
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            if line.trim() != "y" {
                eprintln!("Aborted; nothing changed.");
                return Ok(EXIT_OK);
            }
        }
    }
    eprintln!("Generating the {} dispatcher key...", cfg.key_type.describe());
    let key = cfg.key_type.generate()?;
    let pubkey = openssl::pkey::PKey::public_key_from_pem(&key.public_key_to_pem().map_err(ca::CaError::from)?)
        .map_err(ca::CaError::from)?;
    let cert = files.issue(&pubkey, "ctrl-exec-dispatcher", 825)?;
    for p in [&cfg.key, &cfg.cert] {
        if let Some(d) = p.parent() {
            ctrl_exec::fsutil::ensure_dir(d, 0o750)?;
        }
    }
    ctrl_exec::fsutil::atomic_write(&cfg.key, &ca::key_pem(&key)?, 0o600)?;
    ctrl_exec::fsutil::atomic_write(&cfg.cert, &cert.to_pem().map_err(ca::CaError::from)?, 0o644)?;
    println!("Dispatcher certificate created (serial {}).", ca::cert_serial(&cert));
    println!("  key:         {} (0600)", cfg.key.display());
    println!("  certificate: {} (expires {})", cfg.cert.display(), ca::not_after(&cert));
    Ok(EXIT_OK)
}

fn enroll(a: Enroll) -> AppResult {
    let cfg = common::load_dispatcher(&a.config)?;
    common::init_audit("ctrl-exec-dispatcher", &cfg.log, a.log_stderr);
    if !valid_agent_name(&a.name) {
        return Err(Fail::usage(format!(
            "invalid agent name '{}': use letters, digits, '.', '_' or '-', starting with a letter or digit",
            a.name
        )));
    }
    if a.out.is_none() && !a.bundle {
        return Err(Fail::usage("say where the agent's identity goes: --out <dir> and/or --bundle"));
    }
    if let Some(ip) = &a.ip
        && ip.parse::<IpAddr>().is_err()
    {
        return Err(Fail::usage(format!("--ip must be an IPv4 or IPv6 address, not '{ip}'")));
    }
    if a.agent_port == 0 {
        return Err(Fail::usage("--agent-port must be a port number (1-65535)"));
    }
    if a.bind.parse::<IpAddr>().is_err() {
        return Err(Fail::usage(format!("--bind must be an IPv4 or IPv6 address, not '{}'", a.bind)));
    }
    let reg = Registry::new(&cfg.registry_dir);
    let refuse_existing = || -> Result<(), Fail> {
        if reg.get(&a.name)?.is_some() && !a.force {
            return Err(Fail::new(format!(
                "agent '{}' is already registered; use --force to enrol it again (its old certificate stays valid until it expires; if that key may be compromised, re-enrol it with a new key and keep the old certificate off the network)",
                a.name
            )));
        }
        Ok(())
    };
    refuse_existing()?;
    if let Some(out) = &a.out {
        // Refuse before a serial is spent on a certificate nobody can install.
        let key = std::path::Path::new(out).join("agent.key");
        if key.exists() && !a.force {
            return Err(Fail::new(format!(
                "{} already exists: that directory holds another agent identity (use --force to replace it)",
                key.display()
            )));
        }
    }
    let files = CaFiles::new(&cfg.ca, &cfg.ca_dir);
    files.load()?;
    let disp_cert =
        ca::load_cert(&cfg.cert).map_err(|e| Fail::new(format!("{e}\n(run 'ctrl-exec setup-ctrl-exec' first)")))?;
    let disp_serial = ca::cert_serial(&disp_cert);
    eprintln!("Generating the {} key for '{}'...", cfg.key_type.describe(), a.name);
    let key = cfg.key_type.generate()?;
    let pubkey = openssl::pkey::PKey::public_key_from_pem(&key.public_key_to_pem().map_err(ca::CaError::from)?)
        .map_err(ca::CaError::from)?;
    let cert = files.issue(&pubkey, &a.name, cfg.cert_days)?;
    let mut trusted = TrustedMap::default();
    trusted.0.insert(disp_serial.clone(), cfg.dispatcher_id.clone());
    let ca_pem = std::fs::read(&cfg.ca).map_err(|e| Fail::new(format!("cannot read {}: {e}", cfg.ca.display())))?;
    let bundle = Bundle {
        name: a.name.clone(),
        port: a.agent_port,
        bind: a.bind.clone(),
        files: vec![
            ("agent.key".into(), ca::key_pem(&key)?),
            ("agent.crt".into(), cert.to_pem().map_err(ca::CaError::from)?),
            ("ca.crt".into(), ca_pem),
            ("ctrl-exec-dispatchers".into(), trusted.render().into_bytes()),
        ],
    };
    // Checked again under the registry lock (key generation ran without it,
    // as it can take minutes on slow hardware): of two enrolments of one
    // name, only one gets past this point.
    let _lock = reg.lock()?;
    refuse_existing()?;
    if let Some(out) = &a.out {
        for line in bundle.install(std::path::Path::new(out), None, a.force)? {
            eprintln!("  {line}");
        }
    }
    let mut rec = AgentRecord::new(
        &a.name,
        a.ip.as_deref().unwrap_or(""),
        a.agent_port,
        if a.ip.is_some() { "ip" } else { "hostname" },
    );
    rec.expiry = ca::not_after(&cert);
    rec.reqid = ctrl_exec::wire::new_reqid();
    rec.dispatcher_serial = disp_serial.clone();
    rec.serial_status = "current".into();
    rec.raw.insert("serial_confirmed".into(), miniserde::json::Value::String(rec.paired.clone()));
    reg.put(&rec)?;
    if a.bundle {
        print!("{}", bundle.render());
    }
    let serial = ca::cert_serial(&cert);
    audit::info(
        "enroll",
        &[
            ("AGENT", &a.name),
            ("IP", a.ip.as_deref().unwrap_or("")),
            ("PORT", &a.agent_port.to_string()),
            ("SERIAL", &serial),
            ("EXPIRY", &rec.expiry),
        ],
    );
    eprintln!("Enrolled '{}' (certificate serial {serial}, expires {}).", a.name, rec.expiry);
    if let Some(out) = &a.out {
        eprintln!("Start it with: ctrl-exec-agent serve --config {out}/agent.conf");
    }
    Ok(EXIT_OK)
}
