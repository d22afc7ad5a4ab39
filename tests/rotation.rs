//! Dispatcher certificate rotation end to end: `rotate-cert` across agents
//! with one of them down, runs that keep working throughout (CLI and API),
//! catch-up, the overlap window's end (stale agents, retirement), the
//! agent's `/rotate-serial` edge cases, `serial-status`, `unpair`,
//! `edit-agent`, revocation of one dispatcher while others are served, and
//! `kill -9` in the middle of a rotation.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

fn status_of(d: &Dispatcher, name: &str) -> (String, String) {
    let r = d.record(name);
    (jstr(&r, "serial_status"), jstr(&r, "dispatcher_serial"))
}

fn run_ok(d: &Dispatcher, hosts: &[&str]) {
    let mut args = vec!["run", "--json"];
    args.extend_from_slice(hosts);
    args.push("echo");
    args.extend(["--", "x"]);
    let o = d.run(&args);
    assert_eq!(o.status.code(), Some(0), "run {hosts:?}: {}\n{}", stdout(&o), stderr(&o));
    for r in results(&json(&stdout(&o))) {
        assert_eq!(jstr(&r, "stdout"), "[x]\n", "{r:?}");
    }
}

#[test]
fn rotation_reaches_live_agents_and_the_one_that_was_down_catches_up() {
    let d = Dispatcher::new();
    let a1 = d.agent("a1");
    let a2 = d.agent("a2");
    let mut a3 = d.agent("a3");
    let old = cert_serial(&d.path().join("dispatcher.crt"));
    run_ok(&d, &["a1", "a2", "a3"]);
    a3.stop();

    // Runs keep going while the rotation happens (before, between and after the broadcast).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let conf = d.conf.clone();
    let flag = stop.clone();
    let runner = std::thread::spawn(move || {
        let mut outcomes = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            let o = std::process::Command::new(bin())
                .args(["run", "--json", "a1", "a2", "echo", "--", "x"])
                .env("CTRL_EXEC_CONFIG", &conf)
                .output()
                .unwrap();
            outcomes.push((o.status.code(), stdout(&o)));
        }
        outcomes
    });
    std::thread::sleep(Duration::from_millis(300));
    let o = d.run(&["rotate-cert"]);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let outcomes = runner.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    assert!(outcomes.len() >= 2, "runs during the rotation: {}", outcomes.len());
    for (code, out) in &outcomes {
        assert_eq!(*code, Some(0), "a run failed during the rotation: {out}");
    }

    let out = stdout(&o);
    let new = cert_serial(&d.path().join("dispatcher.crt"));
    assert_ne!(new, old);
    assert!(out.starts_with("Rotating dispatcher certificate...\n"), "{out}");
    assert!(out.contains(&format!("New serial:      {new}\n")), "{out}");
    assert!(out.contains(&format!("Old serial:      {old}\n")), "{out}");
    assert!(out.contains("Agents pending:  3\n"), "{out}");
    assert!(out.contains("  Updated: 2\n  Failed:  1\n"), "{out}");
    assert!(out.contains("Agents requiring attention:\n  a3  "), "{out}");
    assert!(out.contains("connection refused"), "{out}");
    assert!(out.contains("Agents offline longer than the overlap window will require re-pairing."), "{out}");
    let log = stderr(&o);
    for action in ["cert-rotated", "serial-broadcast", "serial-confirmed", "serial-broadcast-fail"] {
        assert!(log.contains(&format!("ACTION={action} ")), "{action}: {log}");
    }
    assert_eq!(status_of(&d, "a1"), ("current".into(), new.clone()));
    assert_eq!(status_of(&d, "a2"), ("current".into(), new.clone()));
    assert_eq!(status_of(&d, "a3"), ("pending".into(), old.clone()));
    let st = d.rotation_state().unwrap();
    assert_eq!((jstr(&st, "current_serial"), jstr(&st, "previous_serial")), (new.clone(), old.clone()));
    assert_eq!(jstr(&st, "overlap_days"), "30");
    for a in [&a1, &a2] {
        let map = a.trusted();
        assert!(map.contains(&format!("\n{old} test-dispatcher\n")), "{map}");
        assert!(map.contains(&format!("\n{new} test-dispatcher\n")), "{map}");
        assert!(
            a.log().contains(&format!(
                "ACTION=rotate DISPATCHER=test-dispatcher PEER=127.0.0.1 SERIAL={new} SERIAL_ACTION=add"
            )),
            "{}",
            a.log()
        );
    }
    assert!(d.path().join("dispatcher.crt.prev").exists() && d.path().join("dispatcher.key.prev").exists());

    // The confirmed agents are spoken to with the new certificate: they work
    // even without the old serial in their map.
    let map = a1.trusted().replace(&format!("{old} test-dispatcher\n"), "");
    std::fs::write(a1.dir.join("ctrl-exec-dispatchers"), map).unwrap();
    a1.reload();
    run_ok(&d, &["a1", "a2"]);

    // The agent that was down is spoken to with the old certificate.
    a3.start();
    run_ok(&d, &["a3"]);
    assert_eq!(status_of(&d, "a3").0, "pending");

    // Catch-up.
    let o = d.ok(&["rotate-cert", "--check"]);
    let out = stdout(&o);
    assert!(out.contains("  Updated: 1\n  Failed:  0\n"), "{out}");
    assert!(out.contains("day(s) left (rotation at 90 or fewer)"), "{out}");
    assert_eq!(status_of(&d, "a3"), ("current".into(), new.clone()));
    run_ok(&d, &["a1", "a2", "a3"]);
    // Nothing left to do.
    let o = d.ok(&["rotate-cert", "--check", "--json"]);
    let doc = json(&stdout(&o));
    assert_eq!(jstr(&doc, "updated"), "0");
    assert_eq!(jstr(&doc, "failed"), "[]");
    assert!(!doc.contains_key("retired"), "{doc:?}");
}

#[test]
fn the_api_server_follows_a_rotation_without_a_restart() {
    let d = Dispatcher::with_config("api_auth_default = allow\ncert_overlap_days = 0");
    let _a1 = d.agent("a1");
    let api = Api::start(&d, "");
    let call = || api.post("/run", r#"{"hosts":["a1"],"script":"echo","args":["x"]}"#);
    assert_eq!(call().0, 200);
    d.ok(&["rotate-cert"]);
    // a1 confirmed: the API must now present the new certificate.
    let (code, body) = call();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""exit":0"#), "{body}");
    // Window of 0 days: retire at once; the agent then only trusts the new serial.
    let o = d.ok(&["rotate-cert", "--check"]);
    assert!(stdout(&o).contains("Retired previous serial 2 on 1 agent(s)."), "{}", stdout(&o));
    std::thread::sleep(Duration::from_millis(1100));
    let (code, body) = call();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""exit":0"#), "{body}");
    assert!(api.log().contains("ACTION=identity-reload"), "{}", api.log());
}

#[test]
fn after_the_overlap_window_pending_agents_go_stale_and_the_old_serial_is_retired() {
    let d = Dispatcher::new();
    let a1 = d.agent("a1");
    let mut a2 = d.agent("a2");
    a2.stop();
    d.ok(&["rotate-cert"]);
    let new = cert_serial(&d.path().join("dispatcher.crt"));
    // Move the end of the window into the past.
    let path = d.path().join("rotation.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let st = json(&text);
    let text = text.replace(&jstr(&st, "overlap_expires"), "2020-01-01T00:00:00Z");
    std::fs::write(&path, text).unwrap();

    let o = d.ok(&["rotate-cert", "--check"]);
    let (out, log) = (stdout(&o), stderr(&o));
    assert!(out.contains("Stale (overlap window over, must be re-paired): a2"), "{out}");
    assert!(out.contains("Retired previous serial 2 on 1 agent(s)."), "{out}");
    assert!(
        log.contains("ACTION=serial-stale AGENT=a2 REASON=\"overlap window expired without confirmation\""),
        "{log}"
    );
    assert!(log.contains("ACTION=serial-retire HOSTS=a1 SERIAL=2"), "{log}");
    assert_eq!(status_of(&d, "a2").0, "stale");
    let map = a1.trusted();
    assert!(!map.contains("\n2 test-dispatcher\n"), "{map}");
    assert!(map.contains(&format!("\n{new} test-dispatcher\n")), "{map}");
    assert!(!d.path().join("dispatcher.crt.prev").exists());
    assert!(!d.path().join("dispatcher.key.prev").exists());
    let st = d.rotation_state().unwrap();
    assert!(!st.contains_key("previous_serial"), "{st:?}");
    assert!(!jstr(&st, "previous_retired").is_empty());
    run_ok(&d, &["a1"]);
    // The stale agent only knows the retired serial: it must be re-paired.
    a2.start();
    let o = d.run(&["run", "--json", "a2", "echo"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "error"), "forbidden: serial mismatch");
    // A second rotation is allowed now (nothing pending but a stale agent).
    d.ok(&["rotate-cert"]);
}

#[test]
fn a_second_rotation_waits_for_agents_of_the_first() {
    let d = Dispatcher::new();
    let _a1 = d.agent("a1");
    let mut a2 = d.agent("a2");
    a2.stop();
    d.ok(&["rotate-cert"]);
    let o = d.run(&["rotate-cert"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let e = stderr(&o);
    assert!(e.contains("Rotation failed: the previous rotation is still in its overlap window"), "{e}");
    assert!(e.contains(": a2."), "{e}");
    assert!(e.contains("ACTION=cert-rotation-fail"), "{e}");
    a2.start();
    d.ok(&["rotate-cert", "--check"]);
    // All confirmed: the next rotation first retires serial 2 from both agents.
    let o = d.ok(&["rotate-cert"]);
    assert!(stderr(&o).contains("ACTION=serial-retire HOSTS=a1,a2 SERIAL=2"), "{}", stderr(&o));
    assert!(stdout(&o).contains("  Updated: 2\n  Failed:  0\n"), "{}", stdout(&o));
    run_ok(&d, &["a1", "a2"]);
}

#[test]
fn rotate_serial_edge_cases_over_mutual_tls() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    let hook = a.dir.join("hook.sh");
    write_exec(
        &hook,
        "#!/bin/sh\n[ \"$ENVEXEC_ACTION\" = rotate ] && [ \"$ENVEXEC_TOKEN\" = nope ] && exit 1\nexit 0\n",
    );
    a.configure(&format!("auth_hook = {}", hook.display()));
    a.start();
    let call = |body: &str| split_reply(&raw_exchange(&d, a.port, &post("/rotate-serial", body)).unwrap());
    let call = |body: &str| {
        let (code, reply) = call(body);
        let o = json(&reply);
        (code, format!("{}|{}", jstr(&o, "status"), jstr(&o, "error")))
    };
    let err = |msg: &str| (200, format!("error|{msg}"));
    assert_eq!(call("{}"), err("serial required"));
    assert_eq!(call("not json"), err("serial required"));
    assert_eq!(call(r#"{"serial":"1f","action":"foo"}"#), err("invalid action 'foo'"));
    assert_eq!(call(r#"{"serial":"xyz"}"#), err("invalid serial 'xyz' (expected a hex certificate serial)"));
    let (code, body) =
        split_reply(&raw_exchange(&d, a.port, &post("/rotate-serial", r#"{"serial":"00:1F"}"#)).unwrap());
    assert_eq!(code, 200);
    let o = json(&body);
    assert_eq!(
        (jstr(&o, "status"), jstr(&o, "action"), jstr(&o, "serial"), jstr(&o, "dispatcher")),
        ("ok".into(), "add".into(), "1f".into(), "test-dispatcher".into())
    );
    assert!(a.trusted().contains("\n1f test-dispatcher\n"), "{}", a.trusted());
    // The agent reloaded its map by itself: serial 1f is trusted at once.
    assert!(a.wait_log("ACTION=reload ", Duration::from_secs(5)), "{}", a.log());

    // Another dispatcher's serial: neither removable nor claimable.
    let map = a.trusted() + "7a other-dispatcher\n";
    std::fs::write(a.dir.join("ctrl-exec-dispatchers"), map).unwrap();
    a.reload();
    assert_eq!(call(r#"{"serial":"7a","action":"remove"}"#), err("serial not owned by 'test-dispatcher'"));
    assert_eq!(call(r#"{"serial":"7a","action":"add"}"#), err("serial not owned by 'test-dispatcher'"));
    assert!(a.trusted().contains("\n7a other-dispatcher\n"));
    // Removing an absent serial is a no-op; removing our own works.
    assert_eq!(call(r#"{"serial":"99","action":"remove"}"#).0, 200);
    assert_eq!(call(r#"{"serial":"1f","action":"remove"}"#), (200, "ok|".into()));
    assert!(!a.trusted().contains("1f test-dispatcher"));

    // The hook decides (action rotate, token from the body).
    let (code, body) = call(r#"{"serial":"20","token":"nope"}"#);
    assert_eq!(code, 403);
    assert!(body.starts_with("|not authorised: "), "{body}");
    assert!(a.log().contains("ACTION=rotate-deny DISPATCHER=test-dispatcher"), "{}", a.log());
    assert!(!a.trusted().contains("\n20 "));

    // A certificate of our CA that no map entry names.
    let conf = d.path().join("other.conf");
    let text = std::fs::read_to_string(&d.conf)
        .unwrap()
        .replace("dispatcher.crt", "other.crt")
        .replace("dispatcher.key", "other.key");
    std::fs::write(&conf, text).unwrap();
    let o = std::process::Command::new(bin())
        .args(["setup-ctrl-exec", "--yes", "--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let p = d.path();
    let mut s = tls_client(a.port, Some((&p.join("other.crt"), &p.join("other.key"))), &p.join("ca.crt")).unwrap();
    s.write_all(&post("/rotate-serial", r#"{"serial":"2","action":"remove"}"#)).unwrap();
    let mut buf = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut buf);
    assert_eq!(split_reply(&buf), (403, r#"{"error":"serial mismatch","status":"forbidden"}"#.into()));
    assert!(a.trusted().contains("\n2 test-dispatcher\n"));
}

#[test]
fn rotate_serial_reports_a_map_it_cannot_write() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    std::fs::create_dir(a.dir.join("state")).unwrap();
    std::fs::copy(a.dir.join("ctrl-exec-dispatchers"), a.dir.join("state/map")).unwrap();
    a.configure("trusted_dispatchers_path = state/map");
    a.start();
    // Make the map unwritable for the agent, even when the tests run as root:
    // its directory turns into a plain file.
    std::fs::rename(a.dir.join("state"), a.dir.join("state.gone")).unwrap();
    std::fs::write(a.dir.join("state"), "").unwrap();
    let (code, body) = split_reply(&raw_exchange(&d, a.port, &post("/rotate-serial", r#"{"serial":"1f"}"#)).unwrap());
    assert_eq!(code, 200);
    let o = json(&body);
    assert_eq!(jstr(&o, "status"), "error");
    assert!(jstr(&o, "error").contains("state/map"), "{body}");
    assert!(a.log().contains("ACTION=rotate-fail DISPATCHER=test-dispatcher"), "{}", a.log());
}

#[test]
fn serial_status_human_and_json() {
    let d = Dispatcher::new();
    let _a1 = d.agent("a1");
    let o = d.ok(&["serial-status"]);
    let out = stdout(&o);
    assert!(out.starts_with("No rotation has been performed.\n\n"), "{out}");
    assert!(out.contains("HOSTNAME                       STATUS     CONFIRMED                SERIAL\n"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("a1 ") && l.contains(" current ") && l.ends_with(" 2")), "{out}");
    let doc = json(&stdout(&d.ok(&["serial-status", "--json"])));
    assert_eq!(jstr(&doc, "state"), "null");
    d.ok(&["rotate-cert"]);
    let out = stdout(&d.ok(&["serial-status"]));
    assert!(out.starts_with("Current serial:  "), "{out}");
    assert!(out.contains("Previous serial: 2\n"), "{out}");
    assert!(out.contains("Overlap expires: "), "{out}");
    let doc = json(&stdout(&d.ok(&["serial-status", "--json"])));
    let st = match doc.get("state") {
        Some(miniserde::json::Value::Object(o)) => o.clone(),
        other => panic!("{other:?}"),
    };
    for k in ["current_serial", "previous_serial", "rotated_at", "overlap_expires", "overlap_days"] {
        assert!(st.contains_key(k), "{k}");
    }
    match doc.get("agents") {
        Some(miniserde::json::Value::Array(a)) => assert_eq!(a.len(), 1),
        other => panic!("{other:?}"),
    }
    // A corrupt state file is reported and treated as no state.
    std::fs::write(d.path().join("rotation.json"), "{").unwrap();
    let o = d.ok(&["serial-status"]);
    assert!(stdout(&o).starts_with("No rotation has been performed."), "{}", stdout(&o));
    let o = d.run(&["run", "a1", "echo"]);
    assert!(stderr(&o).contains("ACTION=rotation-state-corrupt"), "{}", stderr(&o));
}

#[test]
fn unpair_and_edit_agent() {
    let d = Dispatcher::new();
    let a1 = d.agent("a1");
    let _a2 = d.agent("a2");
    // edit-agent: validation first, with upstream's messages.
    for (args, msg) in [
        (vec!["edit-agent", "a1"], "Nothing to change"),
        (vec!["edit-agent", "a1", "--ip", "not-an-ip"], "--ip must be an IPv4 or IPv6 address"),
        (vec!["edit-agent", "a1", "--agent-port", "0"], "--agent-port must be a port number (1-65535)"),
        (vec!["edit-agent", "a1", "--agent-port", "70000"], "--agent-port must be a port number (1-65535)"),
        (vec!["edit-agent", "a1", "--lookup-by", "dns"], "--lookup-by must be 'ip' or 'hostname'"),
        (vec!["edit-agent", "a1", "--rename", "a2"], "Edit failed: an agent named 'a2' is already registered"),
        (vec!["edit-agent", "a1", "--rename", "-bad"], "invalid agent name '-bad'"),
        (vec!["edit-agent", "nobody", "--ip", "127.0.0.1"], "Edit failed: No registry entry for 'nobody'"),
    ] {
        let o = d.run(&args);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
    }
    let before = std::fs::read_to_string(d.path().join("agents/a1.json")).unwrap();
    let o = d.ok(&["edit-agent", "a1", "--agent-port", "1"]);
    assert_eq!(
        stdout(&o),
        "Updated agent 'a1'.\n  ip:        127.0.0.1\n  port:      1\n  lookup_by: ip\n",
        "{}",
        stdout(&o)
    );
    assert!(stderr(&o).contains("ACTION=edit-agent AGENT=a1 PORT=1"), "{}", stderr(&o));
    assert_ne!(before, std::fs::read_to_string(d.path().join("agents/a1.json")).unwrap());
    let port = a1.port.to_string();
    let o = d.ok(&["edit-agent", "a1", "--rename", "web1", "--agent-port", &port, "--json"]);
    let rec = json(&stdout(&o));
    assert_eq!((jstr(&rec, "hostname"), jstr(&rec, "port")), ("web1".into(), port.clone()));
    assert_eq!(jstr(&rec, "dispatcher_serial"), "2", "certificate fields are kept");
    assert!(
        stderr(&o).contains(&format!("ACTION=edit-agent AGENT=web1 PORT={port} RENAMED_FROM=a1")),
        "{}",
        stderr(&o)
    );
    assert!(!d.path().join("agents/a1.json").exists());
    // Trust is by CA and serial, not by name: the renamed agent still runs.
    let o = d.ok(&["run", "--json", "web1", "echo"]);
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "host"), "web1");

    let o = d.run(&["unpair", "nobody"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Unpair failed: No registry entry for 'nobody'"), "{}", stderr(&o));
    let o = d.ok(&["unpair", "web1"]);
    assert!(stdout(&o).contains("remains valid until "), "{}", stdout(&o));
    assert!(stdout(&o).contains("revoked_serials"), "{}", stdout(&o));
    assert!(stderr(&o).contains("ACTION=unpair AGENT=web1 EXPIRY="), "{}", stderr(&o));
    let o = d.run(&["run", "web1", "echo"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("unknown agent(s): web1"), "{}", stderr(&o));
}

#[test]
fn a_revoked_dispatcher_is_refused_while_the_listener_keeps_serving_others() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script("echo", "#!/bin/sh\necho ok\n", "");
    let started = d.path().join("started");
    a.script("slow", &format!("#!/bin/sh\ntouch {}\nsleep 2\necho slow-done\n", started.display()), "");
    // A second dispatcher of the same CA, trusted too.
    let conf = d.path().join("other.conf");
    let text = std::fs::read_to_string(&d.conf)
        .unwrap()
        .replace("dispatcher.crt", "other.crt")
        .replace("dispatcher.key", "other.key")
        .replace("test-dispatcher", "other-dispatcher");
    std::fs::write(&conf, text).unwrap();
    let o = std::process::Command::new(bin())
        .args(["setup-ctrl-exec", "--yes", "--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let other = cert_serial(&d.path().join("other.crt"));
    let mut f = std::fs::OpenOptions::new().append(true).open(a.dir.join("ctrl-exec-dispatchers")).unwrap();
    writeln!(f, "{other} other-dispatcher").unwrap();
    a.start();
    let other_run = || {
        std::process::Command::new(bin())
            .args(["run", "--json", "web1", "echo"])
            .env("CTRL_EXEC_CONFIG", &conf)
            .output()
            .unwrap()
    };
    assert_eq!(other_run().status.code(), Some(0));
    let pid = a.pid();
    // A run of the first dispatcher is in flight while the second is revoked.
    let conf1 = d.conf.clone();
    let slow = std::thread::spawn(move || {
        std::process::Command::new(bin())
            .args(["run", "--json", "web1", "slow"])
            .env("CTRL_EXEC_CONFIG", conf1)
            .output()
            .unwrap()
    });
    wait_file(&started);
    std::fs::write(a.dir.join("revoked-serials"), format!("{other}\n")).unwrap();
    a.reload();
    let o = other_run();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "error"), "forbidden: certificate revoked");
    d.ok(&["run", "web1", "echo"]);
    let o = slow.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("slow-done"));
    assert_eq!(a.pid(), pid, "same listener process");
    assert!(a.log().contains(&format!("ACTION=revoked-cert PEER=127.0.0.1 SERIAL={other}")), "{}", a.log());
}

/// A few pseudo-random numbers without a crate.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

#[test]
fn kill_9_during_rotate_cert_leaves_usable_state() {
    let d = Dispatcher::new();
    let _a1 = d.agent("a1");
    let _a2 = d.agent("a2");
    // How long an undisturbed rotation takes here, to aim the kills inside it.
    let t = Instant::now();
    d.ok(&["rotate-cert"]);
    let span = (t.elapsed().as_millis() as u64).max(20);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut rng = Lcg(seed);
    eprintln!("seed {seed}, undisturbed rotation {span} ms");
    for i in 0..10 {
        let mut child = d
            .cmd(&["rotate-cert"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let wait = rng.next(span + span / 4);
        std::thread::sleep(Duration::from_millis(wait));
        // SAFETY: our own child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGKILL);
        }
        let st = child.wait().unwrap();
        eprintln!("iteration {i}: killed after {wait} ms ({st})");
        after_crash(&d, &format!("iteration {i}, killed after {wait} ms"));
    }
}

/// Check what a crashed `rotate-cert` left, then that everything works.
fn after_crash(d: &Dispatcher, what: &str) {
    for e in std::fs::read_dir(d.path().join("agents")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            let rec = json(&std::fs::read_to_string(&p).unwrap());
            assert!(!jstr(&rec, "serial_status").is_empty(), "{what}: {}", p.display());
        }
    }
    let st = d.rotation_state();
    if let Some(st) = &st {
        assert!(!jstr(st, "current_serial").is_empty(), "{what}: {st:?}");
        if st.contains_key("previous_serial") {
            let (c, k) = (d.path().join("dispatcher.crt.prev"), d.path().join("dispatcher.key.prev"));
            assert!(pair_matches(&c, &k), "{what}: previous pair");
            assert_eq!(cert_serial(&c), jstr(st, "previous_serial"), "{what}");
        }
    }
    // Runs work straight away, whatever the moment of the crash.
    run_ok(d, &["a1", "a2"]);
    let o = d.run(&["rotate-cert", "--check"]);
    assert_eq!(o.status.code(), Some(0), "{what}: {}\n{}", stdout(&o), stderr(&o));
    let (cert, key) = (d.path().join("dispatcher.crt"), d.path().join("dispatcher.key"));
    assert!(pair_matches(&cert, &key), "{what}");
    assert!(!d.path().join("dispatcher.crt.next").exists() || st.is_none(), "{what}: .next left over");
    let current = cert_serial(&cert);
    if let Some(st) = d.rotation_state() {
        assert_eq!(jstr(&st, "current_serial"), current, "{what}");
    }
    for n in ["a1", "a2"] {
        assert_eq!(status_of(d, n), ("current".into(), current.clone()), "{what}: {n}");
    }
    run_ok(d, &["a1", "a2"]);
}

#[test]
fn a_crash_at_each_step_of_a_rotation_leaves_usable_state() {
    let d = Dispatcher::new();
    let _a1 = d.agent("a1");
    let _a2 = d.agent("a2");
    d.ok(&["rotate-cert"]);
    for point in [
        "retire-sent",
        "retired",
        "staged",
        "prev-key",
        "committed",
        "key-installed",
        "installed",
        "marking",
        "broadcast-sent",
    ] {
        let o = d.cmd(&["rotate-cert"]).env("CTRL_EXEC_TEST_CRASH_AT", point).output().unwrap();
        assert_eq!(o.status.code(), Some(137), "{point} was not reached: {}\n{}", stdout(&o), stderr(&o));
        after_crash(&d, point);
    }
}
