//! Installing and starting: roles and their names, the CA, enrolment (as a
//! directory and as a text bundle), configuration errors, and the agent's
//! offline checks.

mod common;

use common::*;
use std::process::Command;

fn run_as(name: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join(name);
    std::os::unix::fs::symlink(bin(), &link).unwrap();
    Command::new(&link).args(args).output().unwrap()
}

#[test]
fn roles_come_from_argv0_or_the_first_argument() {
    let v = env!("CARGO_PKG_VERSION");
    for (name, want) in [
        ("ctrl-exec", "ctrl-exec"),
        ("ced", "ctrl-exec"),
        ("ctrl-exec-dispatcher", "ctrl-exec"),
        ("ctrl-exec-agent", "ctrl-exec-agent"),
        ("cea", "ctrl-exec-agent"),
        ("ctrl-exec-ca", "ctrl-exec-ca"),
    ] {
        let o = run_as(name, &["--version"]);
        assert_eq!(stdout(&o), format!("{want} {v}\n"), "{name}");
    }
    let o = Command::new(bin()).args(["agent", "--version"]).output().unwrap();
    assert_eq!(stdout(&o), format!("ctrl-exec-agent {v}\n"));
    let o = Command::new(bin()).arg("--help").output().unwrap();
    assert!(o.status.success());
    for needle in
        ["ctrl-exec-agent", "ctrl-exec-ca", "cea", "ced", "run <host>", "ping <host>", "list-agents", "--install-links"]
    {
        assert!(stdout(&o).contains(needle), "help lacks {needle}");
    }
    // the agent without a verb prints its usage and succeeds
    let o = run_as("ctrl-exec-agent", &[]);
    assert!(o.status.success() && stdout(&o).contains("serve"), "{}", stdout(&o));
    let o = run_as("ctrl-exec-agent", &["dance"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("dance"), "{}", stderr(&o));
    let o = Command::new(bin()).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "no verb is a usage error");
    // `ca` subcommand and the CLI verbs reach the same CA code
    let o = Command::new(bin()).args(["ca", "setup-ca", "--help"]).output().unwrap();
    assert!(o.status.success() && stdout(&o).contains("refuses to overwrite"), "{}", stdout(&o));
}

#[test]
fn install_links_creates_one_symlink_per_role() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin()).args(["--install-links", dir.path().to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["ctrl-exec-agent", "ctrl-exec-ca"] {
        let l = dir.path().join(name);
        assert!(std::fs::symlink_metadata(&l).unwrap().file_type().is_symlink());
        let o = Command::new(&l).arg("--version").output().unwrap();
        assert!(stdout(&o).starts_with(name));
    }
}

#[test]
fn the_ca_is_created_once_with_private_keys_0600_and_verifies_with_openssl() {
    let d = Dispatcher::new();
    let p = d.path();
    for (f, mode) in [
        ("ca.key", 0o600),
        ("dispatcher.key", 0o600),
        ("ca.crt", 0o644),
        ("dispatcher.crt", 0o644),
        ("ca.serial", 0o600),
    ] {
        let m = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p.join(f)).unwrap().permissions()) & 0o777;
        assert_eq!(m, mode, "{f}");
    }
    let before = std::fs::read(p.join("ca.key")).unwrap();
    let o = d.run(&["setup-ca"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("refusing to overwrite"), "{}", stderr(&o));
    assert_eq!(std::fs::read(p.join("ca.key")).unwrap(), before);
    let a = d.enroll("web1");
    // cross-check with an independent verifier
    let o = Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            p.join("ca.crt").to_str().unwrap(),
            p.join("dispatcher.crt").to_str().unwrap(),
            a.dir.join("agent.crt").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-serial", "-in", a.dir.join("agent.crt").to_str().unwrap()])
        .output()
        .unwrap();
    let text = stdout(&o);
    assert!(text.contains("CN = web1") || text.contains("CN=web1"), "{text}");
    assert!(text.contains("serial=03"), "serials are sequential: {text}");
    // a second dispatcher certificate with agents registered needs confirmation
    let o = d.run(&["setup-ctrl-exec"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
}

#[test]
fn enrolment_writes_a_ready_agent_and_registers_it() {
    let d = Dispatcher::new();
    let a = d.enroll("web1");
    for f in ["agent.key", "agent.crt", "ca.crt", "ctrl-exec-dispatchers", "agent.conf", "scripts.conf"] {
        assert!(a.dir.join(f).exists(), "{f}");
    }
    let m = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(a.dir.join("agent.key")).unwrap().permissions())
        & 0o777;
    assert_eq!(m, 0o600);
    let map = std::fs::read_to_string(a.dir.join("ctrl-exec-dispatchers")).unwrap();
    assert!(map.ends_with("\n2 test-dispatcher\n"), "{map}");
    let rec = json(&std::fs::read_to_string(d.path().join("agents/web1.json")).unwrap());
    assert_eq!(jstr(&rec, "hostname"), "web1");
    assert_eq!(jstr(&rec, "ip"), "127.0.0.1");
    assert_eq!(jstr(&rec, "lookup_by"), "ip");
    assert_eq!(jstr(&rec, "port"), a.port.to_string());
    assert_eq!(jstr(&rec, "dispatcher_serial"), "2");
    assert_eq!(jstr(&rec, "serial_status"), "current");
    assert!(jstr(&rec, "expiry").ends_with(" GMT"));
    // an existing name is refused unless --force
    let o = d.run(&["enroll", "web1", "--ip", "127.0.0.1", "--out", a.dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already registered"), "{}", stderr(&o));
    let o = d.run(&[
        "enroll",
        "web1",
        "--ip",
        "127.0.0.1",
        "--agent-port",
        &a.port.to_string(),
        "--out",
        a.dir.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // bad input never leaves a half-enrolled agent
    for (args, needle) in [
        (vec!["enroll", "bad/name", "--out", "x"], "invalid agent name"),
        (vec!["enroll", "web2", "--ip", "not-an-ip", "--out", "x"], "--ip must be"),
        (vec!["enroll", "web2"], "--out <dir> and/or --bundle"),
    ] {
        let o = d.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains(needle), "{}", stderr(&o));
    }
    assert!(!d.path().join("agents/web2.json").exists());
}

#[test]
fn a_bundle_carries_the_identity_over_a_text_channel() {
    let d = Dispatcher::new();
    let port = free_port();
    let o = d.ok(&["enroll", "router1", "--ip", "127.0.0.1", "--agent-port", &port.to_string(), "--bundle"]);
    let text = stdout(&o);
    assert!(text.lines().all(|l| l.len() <= 76 && l.is_ascii()), "console-safe lines");
    let dir = d.path().join("router1");
    let install = |input: &str, extra: &[&str]| {
        let mut c = Command::new(bin());
        c.args(["agent", "install-bundle", "--dir", dir.to_str().unwrap()]).args(extra);
        c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    // a line lost in transit: nothing is installed
    let lines: Vec<&str> = text.lines().collect();
    let damaged: String =
        lines.iter().enumerate().filter(|(i, _)| *i != lines.len() / 2).map(|(_, l)| format!("{l}\n")).collect();
    let o = install(&damaged, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("send it again"), "{}", stderr(&o));
    assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().count() == 0, "a damaged bundle wrote files");
    // console noise and CRLF line ends are fine; installing twice is fine
    let noisy = format!("root@OpenWrt:~# cat > /tmp/b\r\n{}\r\nroot@OpenWrt:~# \r\n", text.replace('\n', "\r\n"));
    let o = install(&noisy, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = install(&text, &[]);
    assert!(o.status.success() && stdout(&o).contains("unchanged"), "{}", stdout(&o));
    let mut a = Agent { dir: dir.clone(), port, name: "router1".into(), child: None };
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    a.script("uptime", "#!/bin/sh\necho up\n", "");
    a.start();
    assert!(stdout(&d.ok(&["run", "router1", "uptime"])).contains("up"));
    // a different identity for the same directory needs --force
    let o2 = d.ok(&["enroll", "router2", "--ip", "127.0.0.1", "--bundle"]);
    let o = install(&stdout(&o2), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("different key"), "{}", stderr(&o));
}

#[test]
fn malformed_configs_name_file_and_line_and_exit_78() {
    let d = Dispatcher::new();
    let a = d.enroll("web1");
    a.configure("port 7443");
    let o = Command::new(bin()).args(["agent", "serve", "--config", a.conf().to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(78));
    let lines = std::fs::read_to_string(a.conf()).unwrap().lines().count();
    assert!(
        stderr(&o).contains(&format!("{}:{lines}: malformed config line 'port 7443'", a.conf().display())),
        "{}",
        stderr(&o)
    );
    // dispatcher side, with a bad value
    let bad = d.path().join("bad.conf");
    std::fs::write(&bad, "cert = a\nkey = b\nca = c\nmax_parallel = lots\n").unwrap();
    let o = Command::new(bin()).args(["run", "web1", "echo", "--config", bad.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(78));
    assert!(
        stderr(&o).contains(&format!("{}:4: invalid value 'lots' for 'max_parallel'", bad.display())),
        "{}",
        stderr(&o)
    );
    let o = Command::new(bin()).args(["ping", "x", "--config", "/nonexistent.conf"]).output().unwrap();
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("/nonexistent.conf"));
}

#[test]
fn an_unpaired_agent_says_how_to_pair_and_exits_78() {
    let d = tempfile::tempdir().unwrap();
    let conf = d.path().join("agent.conf");
    std::fs::write(&conf, "port = 7443\ncert = agent.crt\nkey = agent.key\nca = ca.crt\n").unwrap();
    let o = Command::new(bin()).args(["agent", "serve", "--config", conf.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("not paired yet") && stderr(&o).contains("install-bundle"), "{}", stderr(&o));
    let o = Command::new(bin()).args(["agent", "paired", "--config", conf.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    let o = Command::new(bin()).args(["agent", "pairing-status", "--config", conf.to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).starts_with("Not paired. Reason: missing file"), "{}", stdout(&o));
}

#[test]
fn self_check_passes_on_a_good_agent_and_fails_on_each_problem() {
    let d = Dispatcher::new();
    let a = d.enroll("web1");
    let script = a.script("ok", "#!/bin/sh\n", "");
    let check =
        || Command::new(bin()).args(["agent", "self-check", "--config", a.conf().to_str().unwrap()]).output().unwrap();
    let o = check();
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stdout(&o).contains("all") && stdout(&o).contains("checks passed"));
    let o =
        Command::new(bin()).args(["agent", "pairing-status", "--config", a.conf().to_str().unwrap()]).output().unwrap();
    assert!(o.status.success() && stdout(&o).starts_with("Paired. Certificate expires: "));
    let o = Command::new(bin()).args(["agent", "paired", "--config", a.conf().to_str().unwrap()]).output().unwrap();
    assert!(o.status.success());
    // one problem at a time
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("NOT EXECUTABLE"), "{}", stdout(&o));
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(a.dir.join("ctrl-exec-dispatchers"), "# empty\n").unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("none (every request will be refused)"), "{}", stdout(&o));
}

#[test]
fn arguments_that_are_not_utf8_are_refused_not_altered() {
    use std::os::unix::ffi::OsStrExt;
    let o = Command::new(bin())
        .args(["run", "web1", "echo", "--"])
        .arg(std::ffi::OsStr::from_bytes(b"caf\xe9"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("argument 5") && stderr(&o).contains("not valid UTF-8"), "{}", stderr(&o));
}

#[test]
fn a_staged_certificate_is_promoted_only_when_it_fits() {
    let d = Dispatcher::new();
    let a = d.enroll("web1");
    let p = d.path();
    let ca = ctrl_exec::ca::CaFiles::new(&p.join("ca.crt"), p);
    let agent_key = ctrl_exec::ca::load_key(&a.dir.join("agent.key")).unwrap();
    let public = |k: &openssl::pkey::PKey<openssl::pkey::Private>| {
        openssl::pkey::PKey::public_key_from_pem(&k.public_key_to_pem().unwrap()).unwrap()
    };
    let staged = a.dir.join("agent.crt.staged");
    let conf = a.conf();
    let agent =
        |verb: &str| Command::new(bin()).args(["agent", verb, "--config", conf.to_str().unwrap()]).output().unwrap();
    assert_eq!(agent("cert-staged").status.code(), Some(1));
    // a certificate for another key is discarded and the live one kept
    let other = ctrl_exec::ca::KeyType::EcP256.generate().unwrap();
    let wrong = ca.issue(&public(&other), "web1", 30).unwrap();
    std::fs::write(&staged, wrong.to_pem().unwrap()).unwrap();
    assert_eq!(agent("cert-staged").status.code(), Some(0));
    let live = std::fs::read(a.dir.join("agent.crt")).unwrap();
    let o = agent("promote-cert");
    assert!(o.status.success());
    assert!(stdout(&o).contains("does not match the agent key"), "{}", stdout(&o));
    assert_eq!(std::fs::read(a.dir.join("agent.crt")).unwrap(), live);
    assert!(!staged.exists());
    // a renewal of the same key is installed
    let renewed = ca.issue(&public(&agent_key), "web1", 30).unwrap();
    std::fs::write(&staged, renewed.to_pem().unwrap()).unwrap();
    let o = agent("promote-cert");
    assert!(o.status.success() && stdout(&o).contains("Installed"), "{}", stdout(&o));
    assert_eq!(std::fs::read(a.dir.join("agent.crt")).unwrap(), renewed.to_pem().unwrap());
    assert!(!staged.exists());
    assert_eq!(agent("cert-staged").status.code(), Some(1));
    // and the agent serves with it
    let mut a = a;
    a.script("echo", "#!/bin/sh\necho renewed\n", "");
    a.start();
    assert!(stdout(&d.ok(&["run", "web1", "echo"])).contains("renewed"));
    // a broken config never fails the start sequence
    let o = Command::new(bin()).args(["agent", "promote-cert", "--config", "/nonexistent"]).output().unwrap();
    assert!(o.status.success());
}

#[test]
fn serve_check_validates_without_listening() {
    let d = Dispatcher::new();
    let a = d.enroll("web1");
    let check = || {
        Command::new(bin())
            .args(["agent", "serve", "--check", "--config", a.conf().to_str().unwrap()])
            .output()
            .unwrap()
    };
    let o = check();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("configuration OK"));
    // nothing listens afterwards
    assert!(std::net::TcpStream::connect(("127.0.0.1", a.port)).is_err());
    std::fs::write(a.dir.join("scripts.conf"), "web = /bin/true profile=hardened\n").unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("uses profile 'hardened'"), "{}", stderr(&o));
}

#[test]
fn state_can_live_outside_a_read_only_config_dir_and_unwritable_state_is_reported() {
    let d = Dispatcher::new();
    let port = free_port();
    let o = d.ok(&["enroll", "gw1", "--ip", "127.0.0.1", "--agent-port", &port.to_string(), "--bundle"]);
    let (etc, var) = (d.path().join("etc-agent"), d.path().join("var-agent"));
    let install = |extra: &[&str]| {
        let mut c = Command::new(bin());
        c.args(["agent", "install-bundle", "--dir", etc.to_str().unwrap()]).args(extra);
        c.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), stdout(&o).as_bytes()).unwrap();
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    let r = install(&["--state-dir", "relative/state"]);
    assert_eq!(r.status.code(), Some(1));
    assert!(stderr(&r).contains("absolute"), "{}", stderr(&r));
    let r = install(&["--state-dir", var.to_str().unwrap()]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert!(var.is_dir());
    let conf = std::fs::read_to_string(etc.join("agent.conf")).unwrap();
    assert!(conf.contains(&format!("async_runs_dir = {}/runs", var.display())), "{conf}");
    assert!(conf.contains(&format!("cert_staging_path = {}/agent.crt.staged", var.display())), "{conf}");
    // the detached run writes its result under the state directory
    let mut a = Agent { dir: etc.clone(), port, name: "gw1".into(), child: None };
    std::fs::create_dir_all(etc.join("scripts")).unwrap();
    a.script("uptime", "#!/bin/sh\necho up\n", "");
    a.start();
    let o = d.ok(&["run", "gw1", "uptime", "--async", "--json"]);
    let reqid = jstr(&json(&stdout(&o)), "reqid");
    let o = d.ok(&["wait", &reqid, "--timeout", "20"]);
    assert!(stdout(&o).contains("up"), "{}", stdout(&o));
    assert!(std::fs::read_dir(var.join("runs")).unwrap().count() > 0);
    a.stop();
    // a state path that cannot be written is reported at start and by --check
    let blocker = d.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    a.configure(&format!("async_runs_dir = {}/runs", blocker.display()));
    let o = Command::new(bin())
        .args(["agent", "serve", "--check", "--config", a.conf().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: async_runs_dir:") && stderr(&o).contains("not a directory"),
        "{}",
        stderr(&o)
    );
    a.start();
    assert!(a.log().contains("ENTRY=async_runs_dir"), "{}", a.log());
}
