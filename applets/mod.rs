//! The role table and dispatch.
//!
//! One table lists every role once: its program name, the Perl-era aliases,
//! the subcommand that selects it from the main binary, its syslog ident, and
//! its entry point. The same table drives dispatch, `--help`, `--version` and
//! `--install-links` (BusyBox-style symlinks). Verbs that belong to the CA
//! role but that upstream operators type on the dispatcher CLI (`setup-ca`,
//! `setup-ctrl-exec`, `enroll`) are routed here, so applets never call one
//! another.

pub mod agent;
pub mod ca;
pub mod cli;
pub mod common;
pub mod fleet;
pub mod maintain;
pub mod server;

use ctrl_exec::error::{AppResult, EXIT_FAIL, EXIT_OK, EXIT_USAGE};

/// One role of the multicall binary.
pub struct Role {
    /// Program name (and symlink name).
    pub name: &'static str,
    /// Other names that select it (upstream's).
    pub aliases: &'static [&'static str],
    /// `ctrl-exec <sub>` selects it too (empty for the default role).
    pub sub: &'static str,
    /// One-line description.
    pub summary: &'static str,
    /// Entry point: `(program name as invoked, arguments after it)`.
    pub main: fn(&str, &[String]) -> AppResult,
}

/// Every role. The first one is the default.
pub const ROLES: &[Role] = &[
    Role {
        name: "ctrl-exec",
        aliases: &["ctrl-exec-dispatcher", "ced"],
        sub: "",
        summary: "operator CLI: run, status, wait, ping, maintain, list-agents, edit-agent, rotate-cert, ...",
        main: cli::main,
    },
    Role {
        name: "ctrl-exec-agent",
        aliases: &["cea"],
        sub: "agent",
        summary: "the mTLS agent on each managed host: serve, self-check, install-bundle",
        main: agent::main,
    },
    Role {
        name: "ctrl-exec-server",
        aliases: &["ctrl-exec-api"],
        sub: "server",
        summary: "HTTP API for tools and AI agents: run, ping, discovery, status",
        main: server::main,
    },
    Role {
        name: "ctrl-exec-ca",
        aliases: &[],
        sub: "ca",
        summary: "the private CA: setup-ca, setup-ctrl-exec, enroll, pairing-mode, approve",
        main: ca::main,
    },
];

/// CLI verbs served by the CA role.
const CA_VERBS: &[&str] =
    &["setup-ca", "setup-ctrl-exec", "enroll", "pairing-mode", "list-requests", "approve", "deny", "sign"];

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn top_help() -> String {
    let mut s = format!(
        "ctrl-exec {} - run named, allowlisted scripts on remote hosts over mutual TLS\n\n\
         Usage: ctrl-exec <verb> [options]          (operator CLI)\n       \
         ctrl-exec <role> <verb> [options]   (any role)\n       \
         <role-name> <verb> [options]        (through a symlink)\n\nRoles:\n",
        ctrl_exec::VERSION
    );
    for r in ROLES {
        let sel = if r.sub.is_empty() { String::from("(default)") } else { format!("ctrl-exec {}", r.sub) };
        let aliases = if r.aliases.is_empty() { String::new() } else { format!("; also {}", r.aliases.join(", ")) };
        s.push_str(&format!("  {:<17} {:<19} {}{}\n", r.name, sel, r.summary, aliases));
    }
    s.push_str(
        "\nOperator verbs:\n\
         \x20 run <host>[:<port>]... <script> [-- <arg>...]   run a script on agents (--async: detached)\n\
         \x20 status <reqid> | wait <reqid> [--timeout <s>]  follow a detached run\n\
         \x20 ping <host>[:<port>]...                        check agents answer (and renew due certificates)\n\
         \x20 maintain [--json]                              ping every agent with renewal, purge old run records\n\
         \x20 list-agents [--json] [--tags k=v,...]          show the registry\n\
         \x20 list-locks [--json]                            scripts held by running runs\n\
         \x20 edit-agent <name> [--rename|--ip|--agent-port|--lookup-by]  change a registry entry\n\
         \x20 unpair <name>                                  forget a registered agent\n\
         \x20 rotate-cert [--check] [--json]                 rotate the dispatcher certificate\n\
         \x20 serial-status [--json]                         rotation state, serial per agent\n\
         \x20 setup-ca | setup-ctrl-exec | enroll <name> ...  CA verbs (see ctrl-exec ca --help)\n\
         \x20 pairing-mode [start|stop] [--timeout <s>]      accept pairing requests from agents\n\
         \x20 list-requests [--json] | approve <id> | deny <id>  answer them\n\
         \x20 sign [--yes] < request                         sign an offline (serial console) pairing request\n\
         \nOther:\n\
         \x20 --version                print the version\n\
         \x20 --install-links <dir>    create a symlink per role in <dir>\n\
         \x20 <verb> --help            help for one verb\n",
    );
    s
}

fn install_links(dir: &str) -> u8 {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ctrl-exec: cannot find own executable: {e}");
            return EXIT_FAIL;
        }
    };
    let mut code = EXIT_OK;
    for r in ROLES.iter().skip(1) {
        let link = std::path::Path::new(dir).join(r.name);
        let _ = std::fs::remove_file(&link);
        match std::os::unix::fs::symlink(&exe, &link) {
            Ok(()) => println!("{} -> {}", link.display(), exe.display()),
            Err(e) => {
                eprintln!("ctrl-exec: cannot create {}: {e}", link.display());
                code = EXIT_FAIL;
            }
        }
    }
    code
}

/// Run the binary with its full argv; returns the exit code.
pub fn dispatch(argv: Vec<String>) -> u8 {
    let prog = argv.first().map(|s| basename(s).to_string()).unwrap_or_else(|| "ctrl-exec".into());
    let by_name = ROLES.iter().find(|r| r.name == prog || r.aliases.contains(&prog.as_str()));
    let (role, invoked, rest): (&Role, String, &[String]) = match by_name {
        Some(r) if !r.sub.is_empty() => (r, prog.clone(), &argv[1..]),
        _ => {
            // The default role, or a binary under another name: look at the first argument.
            let first = argv.get(1).map(String::as_str).unwrap_or("");
            match ROLES.iter().find(|r| !r.sub.is_empty() && r.sub == first) {
                Some(r) => (r, format!("{prog} {first}"), &argv[2..]),
                None => (&ROLES[0], prog.clone(), &argv[1..]),
            }
        }
    };
    let first = rest.first().map(String::as_str);
    if role.sub.is_empty() {
        match first {
            None => {
                eprint!("{}", top_help());
                return EXIT_USAGE;
            }
            Some("--help" | "-h" | "help") => {
                print!("{}", top_help());
                return EXIT_OK;
            }
            Some("--install-links") => {
                return match rest.get(1) {
                    Some(dir) => install_links(dir),
                    None => {
                        eprintln!("ctrl-exec: --install-links needs a directory");
                        EXIT_USAGE
                    }
                };
            }
            Some(v) if CA_VERBS.contains(&v) => {
                let ca = ROLES.iter().find(|r| r.sub == "ca").expect("the CA role is in the table");
                return finish(&invoked, (ca.main)(&invoked, rest));
            }
            _ => {}
        }
    }
    if first == Some("--version") {
        let name = if role.sub.is_empty() { "ctrl-exec" } else { role.name };
        println!("{name} {}", ctrl_exec::VERSION);
        return EXIT_OK;
    }
    finish(&invoked, (role.main)(&invoked, rest))
}

fn finish(invoked: &str, r: AppResult) -> u8 {
    match r {
        Ok(code) => code,
        Err(f) => {
            let who = invoked.split(' ').next().unwrap_or(invoked);
            for line in f.msg.lines() {
                eprintln!("{who}: {line}");
            }
            f.code
        }
    }
}
