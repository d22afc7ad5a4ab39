//! Network pairing end to end: the real listener (`pairing-mode`) and the
//! real agent (`request-pairing`) on loopback, answered with `approve` /
//! `deny`, plus raw requests for the refusals (hostile names, bad CSRs,
//! oversized bodies), a Perl agent's captured request, queue limits, rate
//! limits, agents that go away, background sessions and `kill -9`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A foreground `pairing-mode` session on a free port.
struct Listener {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Listener {
    fn start(d: &Dispatcher, extra: &[&str]) -> Listener {
        let port = free_port();
        let log = d.path().join(format!("pairing-{port}.log"));
        let ps = port.to_string();
        let mut args = vec!["pairing-mode", "--port", &ps, "--log-stderr"];
        args.extend_from_slice(extra);
        let child = d.cmd(&args).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let l = Listener { child, port, log };
        assert!(l.wait_log("ACTION=pairing-mode-start", Duration::from_secs(10)), "listener: {}", l.text());
        l
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str, d: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < d {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ctrl-exec agent request-pairing` for an agent in `<tmp>/<name>`.
fn request(d: &Dispatcher, port: u16, name: &str, extra: &[&str]) -> Command {
    let dir = d.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = Command::new(bin());
    c.args(["agent", "request-pairing", "--dispatcher", "127.0.0.1", "--port", &port.to_string()])
        .args(["--config", dir.join("agent.conf").to_str().unwrap(), "--name", name, "--key-type", "ec256"])
        .arg("--log-stderr")
        .args(extra)
        .stdin(Stdio::null());
    c
}

/// Pending requests as `list-requests --json` shows them.
fn pending(d: &Dispatcher) -> Vec<miniserde::json::Object> {
    let o = json(&stdout(&d.ok(&["list-requests", "--json"])));
    match o.get("requests") {
        Some(miniserde::json::Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                miniserde::json::Value::Object(o) => o.clone(),
                _ => panic!("not an object"),
            })
            .collect(),
        _ => panic!("no requests array"),
    }
}

/// Wait until `n` requests are pending; returns them.
fn wait_pending(d: &Dispatcher, n: usize) -> Vec<miniserde::json::Object> {
    let t = Instant::now();
    loop {
        let p = pending(d);
        if p.len() == n {
            return p;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "expected {n} pending, have {}", p.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Start a request whose output is captured line by line.
struct Requester {
    child: Child,
    out: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Requester {
    fn spawn(mut c: Command) -> Requester {
        let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Requester { child, out: rx, seen: vec![] }
    }

    /// Wait for a line containing `needle`; returns it.
    fn line(&mut self, needle: &str) -> String {
        let t = Instant::now();
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            match self.out.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => self.seen.push(l),
                Err(_) => assert!(t.elapsed() < Duration::from_secs(30), "no '{needle}' in {:?}", self.seen),
            }
        }
    }

    fn finish(mut self) -> (i32, String) {
        let st = self.child.wait().unwrap();
        while let Ok(l) = self.out.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        (st.code().unwrap_or(-1), self.seen.join("\n"))
    }
}

fn pair_raw(port: u16, body: &str) -> openssl::ssl::SslStream<std::net::TcpStream> {
    let mut s = tls_client(port, None, Path::new("/dev/null")).unwrap();
    s.write_all(&post("/pair", body)).unwrap();
    s
}

/// Read one HTTP response (Content-Length framed) from a raw stream.
fn read_one(s: &mut impl Read) -> (u16, miniserde::json::Object) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "connection closed in the headers: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len: usize = text
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (code, json(&String::from_utf8_lossy(&body)))
}

fn csr_pem(name: &str) -> String {
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let mut b = openssl::x509::X509ReqBuilder::new().unwrap();
    let mut n = openssl::x509::X509NameBuilder::new().unwrap();
    n.append_entry_by_text("CN", name).unwrap();
    b.set_subject_name(&n.build()).unwrap();
    b.set_pubkey(&key).unwrap();
    b.sign(&key, openssl::hash::MessageDigest::sha256()).unwrap();
    String::from_utf8(b.build().to_pem().unwrap()).unwrap()
}

#[test]
fn approved_agent_gets_its_identity_and_serves_runs() {
    let d = Dispatcher::new();
    let l = Listener::start(&d, &["--timeout", "120"]);
    let port = free_port();
    let mut r =
        Requester::spawn(request(&d, l.port, "edge-1", &["--lookup-by", "ip", "--agent-port", &port.to_string()]));
    let code_line = r.line("Pairing code:");
    let code = code_line.split_whitespace().last().unwrap().to_string();
    let p = wait_pending(&d, 1);
    assert_eq!(jstr(&p[0], "code"), code, "both sides show the same code");
    assert_eq!(jstr(&p[0], "hostname"), "edge-1");
    assert_eq!(jstr(&p[0], "source_ip"), "127.0.0.1");
    let human = stdout(&d.ok(&["list-requests"]));
    assert!(human.contains(&code) && human.contains("edge-1"), "{human}");
    let id = jstr(&p[0], "id");
    let out = stdout(&d.ok(&["approve", &id]));
    assert!(out.contains("Approved 'edge-1'") && out.contains("lookup_by=ip"), "{out}");
    let (rc, text) = r.finish();
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("Pairing complete"), "{text}");
    assert!(text.contains("ACTION=pair-complete") && text.contains("DISPATCHER=test-dispatcher"), "{text}");
    assert!(l.wait_log("ACTION=pair-delivered", Duration::from_secs(5)), "{}", l.text());
    assert!(pending(&d).is_empty());
    // The registry knows it as paired, with the suggested lookup and port.
    let rec = json(&std::fs::read_to_string(d.path().join("agents/edge-1.json")).unwrap());
    assert_eq!(jstr(&rec, "lookup_by"), "ip");
    assert_eq!(jstr(&rec, "port"), port.to_string());
    assert_eq!(jstr(&rec, "reqid"), id);
    assert_eq!(jstr(&rec, "serial_status"), "current");
    // The agent's files: key private, the dispatcher trusted, a working agent.conf.
    let dir = d.path().join("edge-1");
    assert_eq!(std::fs::metadata(dir.join("agent.key")).unwrap().permissions().mode() & 0o777, 0o600);
    let map = std::fs::read_to_string(dir.join("ctrl-exec-dispatchers")).unwrap();
    assert!(map.lines().any(|l| l.ends_with(" test-dispatcher")), "{map}");
    let mut a = Agent { dir: dir.clone(), port, name: "edge-1".into(), child: None };
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    a.script("echo", "#!/bin/sh\necho paired \"$@\"\n", "");
    a.start();
    let o = d.ok(&["run", "edge-1", "echo", "--", "ok"]);
    assert!(stdout(&o).contains("paired ok"), "{}", stdout(&o));
    // Pairing again needs --force: the identity is not replaced by accident.
    let again = request(&d, l.port, "edge-1", &[]).output().unwrap();
    assert_ne!(again.status.code(), Some(0));
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn denial_and_timeouts_are_reported_and_leave_nothing_behind() {
    let d = Dispatcher::new();
    let l = Listener::start(&d, &["--timeout", "120"]);
    // Denied by the operator: exit 3, nothing installed.
    let mut r = Requester::spawn(request(&d, l.port, "denied-1", &[]));
    r.line("waiting for approval");
    let id = jstr(&wait_pending(&d, 1)[0], "id");
    assert!(stdout(&d.ok(&["deny", &id])).contains(&format!("Denied request '{id}'")));
    let (rc, text) = r.finish();
    assert_eq!(rc, 3, "{text}");
    assert!(text.contains("rejected by operator"), "{text}");
    assert!(!d.path().join("denied-1/agent.key").exists());
    assert!(!d.path().join("agents/denied-1.json").exists());
    // The agent gives up first: exit 2; the request disappears at once and
    // approving it is refused without signing anything.
    let mut r = Requester::spawn(request(&d, l.port, "slow-1", &["--timeout", "1"]));
    r.line("waiting for approval");
    let (rc, text) = r.finish();
    assert_eq!(rc, 2, "{text}");
    assert!(l.wait_log("ACTION=pair-abandoned AGENT=slow-1", Duration::from_secs(5)), "{}", l.text());
    assert!(pending(&d).is_empty());
    // The listener's session ends while an agent waits: it is told so.
    drop(l);
    let l2 = Listener::start(&d, &["--timeout", "3"]);
    let r = Requester::spawn(request(&d, l2.port, "late-1", &[]));
    let (rc, text) = r.finish();
    assert_eq!(rc, 3, "{text}");
    assert!(text.contains("pairing mode ended"), "{text}");
    assert!(l2.wait_log("ACTION=pairing-mode-timeout", Duration::from_secs(5)));
    // Nothing listens any more: the agent fails fast with guidance.
    let o = request(&d, l2.port, "late-2", &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pairing mode"), "{}", stderr(&o));
    // Unknown ids.
    let o = d.run(&["approve", "0123456789abcdef"]);
    assert!(!o.status.success() && stderr(&o).contains("No pending request"), "{}", stderr(&o));
    let o = d.run(&["deny", "../../etc"]);
    assert!(!o.status.success() && stderr(&o).contains("No pending request"), "{}", stderr(&o));
}

#[test]
fn an_agent_that_disconnects_is_never_signed() {
    let d = Dispatcher::new();
    let l = Listener::start(&d, &[]);
    let body = format!(
        r#"{{"hostname":"gone-1","csr":{},"nonce":"00112233445566778899aabbccddeeff"}}"#,
        miniserde::json::to_string(&csr_pem("gone-1"))
    );
    let mut s = pair_raw(l.port, &body);
    let (code, first) = read_one(&mut s);
    assert_eq!((code, jstr(&first, "status").as_str()), (200, "pending"));
    let id = jstr(&first, "reqid");
    assert_eq!(wait_pending(&d, 1).len(), 1);
    drop(s);
    assert!(l.wait_log("ACTION=pair-abandoned AGENT=gone-1", Duration::from_secs(5)), "{}", l.text());
    let o = d.run(&["approve", &id]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("No pending request") || stderr(&o).contains("no longer connected"), "{}", stderr(&o));
    assert!(!d.path().join("agents/gone-1.json").exists(), "nothing registered");
}

#[test]
fn hostile_and_malformed_requests_are_refused() {
    let d = Dispatcher::with_config("pairing_max_queue = 2\npairing_rate_limit_disable = 1");
    let l = Listener::start(&d, &[]);
    let csr = miniserde::json::to_string(&csr_pem("x"));
    for name in ["../etc/passwd", "-rf", "a b", "a;reboot", "agent/1", ".hidden", "x\u{e9}"] {
        let body = format!(r#"{{"hostname":{},"csr":{csr},"nonce":"ab"}}"#, miniserde::json::to_string(name));
        let (_, r) = read_one(&mut pair_raw(l.port, &body));
        assert_eq!((jstr(&r, "status").as_str(), jstr(&r, "reason").as_str()), ("error", "invalid hostname"), "{name}");
    }
    for body in ["not json", "{}", r#"{"hostname":"a"}"#, r#"{"csr":"x"}"#, "[1,2]"] {
        let (_, r) = read_one(&mut pair_raw(l.port, body));
        assert_eq!(jstr(&r, "reason"), "invalid request", "{body}");
    }
    let (_, r) = read_one(&mut pair_raw(l.port, r#"{"hostname":"a","csr":"garbage"}"#));
    assert_eq!(jstr(&r, "status"), "error");
    // Bytes after the CSR would change the code without spoiling the CSR:
    // such a request is refused, so the code cannot be tuned that way.
    let tuned = miniserde::json::to_string(&format!("{}tuning-0042", csr_pem("a")));
    let (_, r) = read_one(&mut pair_raw(l.port, &format!(r#"{{"hostname":"a","csr":{tuned}}}"#)));
    assert_eq!(jstr(&r, "status"), "error");
    assert!(l.text().contains("REASON=invalid-csr"));
    let big = format!(r#"{{"hostname":"a","csr":"{}"}}"#, "A".repeat(70_000));
    let (_, r) = read_one(&mut pair_raw(l.port, &big));
    assert_eq!(jstr(&r, "reason"), "request too large");
    assert!(l.text().contains("REASON=invalid-hostname") && l.text().contains("REASON=body-too-large"));
    assert!(pending(&d).is_empty(), "nothing was queued");
    // A CSR that only looks like one is queued, and approving it fails
    // without registering anything.
    let fake = "-----BEGIN CERTIFICATE REQUEST-----\nTUlJQ1ZqQ0NBVDRDQVFBd0VURVBNQTBHQTFVRUF3d0dZV2RsYm5RdQ==\n-----END CERTIFICATE REQUEST-----\n";
    let body = format!(r#"{{"hostname":"fake-1","csr":{}}}"#, miniserde::json::to_string(fake));
    let mut held1 = pair_raw(l.port, &body);
    let (_, first) = read_one(&mut held1);
    let o = d.run(&["approve", &jstr(&first, "reqid")]);
    assert!(!o.status.success() && stderr(&o).contains("cannot sign"), "{}", stderr(&o));
    assert!(!d.path().join("agents/fake-1.json").exists());
    // The queue holds at most pairing_max_queue requests.
    let body = format!(r#"{{"hostname":"q-2","csr":{csr}}}"#);
    let mut held2 = pair_raw(l.port, &body);
    assert_eq!(jstr(&read_one(&mut held2).1, "status"), "pending");
    let (_, r) = read_one(&mut pair_raw(l.port, &format!(r#"{{"hostname":"q-3","csr":{csr}}}"#)));
    assert_eq!(jstr(&r, "reason"), "pairing queue full");
    assert!(l.text().contains("REASON=queue-full"));
    // The real agent reports the refusal.
    let o = request(&d, l.port, "q-4", &[]).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("pairing queue full"), "{}", stderr(&o));
    // Overrides at approval are validated with upstream's messages.
    for (flag, value, msg) in [
        ("--lookup-by", "dns", "--lookup-by must be 'ip' or 'hostname'"),
        ("--ip", "example.org", "--ip must be an IPv4 or IPv6 address"),
        ("--agent-port", "70000", "--agent-port must be a port number (1-65535)"),
    ] {
        let o = d.run(&["approve", "0123456789abcdef", flag, value]);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains(msg), "{}", stderr(&o));
    }
    drop((held1, held2));
}

#[test]
fn a_perl_agents_request_is_served_byte_compatibly() {
    let d = Dispatcher::new();
    let l = Listener::start(&d, &[]);
    let raw = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/pairing/pair-approved.request"))
        .unwrap();
    let mut s = tls_client(l.port, None, Path::new("/dev/null")).unwrap();
    s.write_all(&raw).unwrap();
    let (code, first) = read_one(&mut s);
    assert_eq!(code, 200);
    let mut keys: Vec<&String> = first.keys().collect();
    keys.sort();
    assert_eq!(keys, ["reqid", "status"]);
    let p = wait_pending(&d, 1);
    // The Perl agent sent its port as a string and showed code 906164.
    assert_eq!(jstr(&p[0], "code"), "906164");
    assert_eq!(jstr(&p[0], "port"), "35913");
    d.ok(&["approve", &jstr(&first, "reqid")]);
    let (code, second) = read_one(&mut s);
    assert_eq!(code, 200);
    let mut keys: Vec<&String> = second.keys().collect();
    keys.sort();
    assert_eq!(keys, ["ca", "cert", "dispatcher_id", "dispatcher_serial", "nonce", "status"]);
    assert_eq!(jstr(&second, "status"), "approved");
    assert_eq!(jstr(&second, "nonce"), "1a1ea610b4527cbe5a0dd2ec9927abb5");
    assert_eq!(jstr(&second, "dispatcher_id"), "test-dispatcher");
    let cert = openssl::x509::X509::from_pem(jstr(&second, "cert").as_bytes()).unwrap();
    let ca = openssl::x509::X509::from_pem(&std::fs::read(d.path().join("ca.crt")).unwrap()).unwrap();
    assert!(cert.verify(&ca.public_key().unwrap()).unwrap());
    let rec = json(&std::fs::read_to_string(d.path().join("agents/vm.json")).unwrap());
    assert_eq!(
        (jstr(&rec, "ip"), jstr(&rec, "port"), jstr(&rec, "lookup_by")),
        ("127.0.0.1".into(), "35913".into(), "ip".into())
    );
}

#[test]
fn background_sessions_and_background_requests() {
    let d = Dispatcher::new();
    let port = free_port();
    let ps = port.to_string();
    let o = d.ok(&["pairing-mode", "start", "--port", &ps, "--timeout", "60"]);
    assert!(stdout(&o).contains("running in the background"), "{}", stdout(&o));
    let pid: i32 = std::fs::read_to_string(d.path().join("pairing-mode.pid")).unwrap().trim().parse().unwrap();
    let o = d.run(&["pairing-mode", "start", "--port", &ps]);
    assert!(!o.status.success() && stderr(&o).contains("already running"), "{}", stderr(&o));
    // A background request prints its id and leaves a detached waiter.
    let t = Instant::now();
    let o = request(&d, port, "bg-1", &["--background", "--timeout", "60"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    assert_eq!(id.len(), 16, "{}", stdout(&o));
    let code = stderr(&o).lines().find_map(|l| l.strip_prefix("Pairing code: ")).unwrap_or_default().to_string();
    assert!(code.starts_with(&jstr(&wait_pending(&d, 1)[0], "code")), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(jstr(&wait_pending(&d, 1)[0], "id"), id);
    d.ok(&["approve", &id]);
    wait_file(&d.path().join("bg-1/agent.conf"));
    assert!(d.path().join("bg-1/agent.crt").exists());
    // Timeouts beyond 600 s are refused in background mode.
    let o = request(&d, port, "bg-2", &["--background", "--timeout", "601"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = d.ok(&["pairing-mode", "stop"]);
    assert!(stdout(&o).contains(&format!("stopped (PID {pid})")), "{}", stdout(&o));
    assert!(!d.path().join("pairing-mode.pid").exists());
    let o = d.ok(&["pairing-mode", "stop"]);
    assert!(stdout(&o).contains("No background pairing mode is running"));
    let o = d.run(&["pairing-mode", "--timeout", "0"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn preflight_fails_before_anything_is_sent() {
    let d = Dispatcher::new();
    let l = Listener::start(&d, &[]);
    // The config directory cannot exist (a file is in the way).
    std::fs::write(d.path().join("blocker"), "").unwrap();
    let o = Command::new(bin())
        .args(["agent", "request-pairing", "--dispatcher", "127.0.0.1", "--port", &l.port.to_string()])
        .args(["--config", d.path().join("blocker/agent.conf").to_str().unwrap(), "--name", "pf-1"])
        .arg("--log-stderr")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot write the agent's identity"), "{}", stderr(&o));
    assert!(!l.text().contains("pair-request"), "nothing reached the listener");
    let o = request(&d, l.port, "bad name", &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = request(&d, l.port, "pf-2", &["--lookup-by", "dns"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn the_pairing_port_is_rate_limited_per_address() {
    let d = Dispatcher::with_config("pairing_rate_limit_volume = 3/60/300");
    let l = Listener::start(&d, &[]);
    // Good requests and bare probes do not count, so a fleet behind one
    // NAT address can pair in bulk.
    let csr = miniserde::json::to_string(&csr_pem("x"));
    let mut held = Vec::new();
    for i in 0..5 {
        drop(std::net::TcpStream::connect(("127.0.0.1", l.port)).unwrap());
        let mut s = pair_raw(l.port, &format!(r#"{{"hostname":"ok-{i}","csr":{csr}}}"#));
        assert_eq!(jstr(&read_one(&mut s).1, "status"), "pending");
        held.push(s);
    }
    // Failed attempts do: the fourth failure starts the block.
    for _ in 0..4 {
        let (_, r) = read_one(&mut pair_raw(l.port, "{}"));
        assert_eq!(jstr(&r, "reason"), "invalid request");
    }
    // The next connection is closed without a word.
    let blocked = tls_client(l.port, None, Path::new("/dev/null"));
    assert!(blocked.is_err() || blocked.unwrap().read(&mut [0u8; 16]).unwrap_or(0) == 0);
    assert!(l.wait_log("ACTION=rate-block", Duration::from_secs(5)), "{}", l.text());
}

/// A pid no process has: a reaped child's.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn kill_9_during_pairing_never_leaves_a_half_written_file() {
    let d = Dispatcher::new();
    let l = Listener::start(&d, &["--timeout", "300"]);
    for i in 0..6u64 {
        let name = format!("k9-{i}");
        // What an earlier killed install left: swept by the next request.
        let planted = d.path().join(&name).join(format!(".agent.crt.tmp-{}-0a1b2c", dead_pid()));
        std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
        std::fs::write(&planted, "-----BEGIN").unwrap();
        let mut r = Requester::spawn(request(&d, l.port, &name, &["--force"]));
        r.line("waiting for approval");
        assert!(!planted.exists(), "stale temp file not swept");
        let id = jstr(&wait_pending(&d, 1)[0], "id");
        // Kill the approver or the agent at a different moment each round.
        let mut approver = d.cmd(&["approve", &id]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(i * 7));
        if i % 2 == 0 {
            let _ = approver.kill();
        } else {
            let _ = r.child.kill();
        }
        let _ = approver.wait();
        let _ = r.child.kill();
        let _ = r.child.wait();
        // Let the listener notice, then check every state file parses.
        std::thread::sleep(Duration::from_millis(300));
        for e in std::fs::read_dir(d.path().join("agents")).into_iter().flatten().flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                json(&std::fs::read_to_string(&p).unwrap());
            }
        }
        for e in std::fs::read_dir(d.path().join("pairing")).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with('.') || n == ".answer.lock", "temp file left: {n}");
            if !n.starts_with('.') {
                json(&std::fs::read_to_string(e.path()).unwrap_or_else(|_| "{}".into()));
            }
        }
        let dir = d.path().join(&name);
        for f in ["agent.key", "agent.crt", "ca.crt"] {
            if let Ok(t) = std::fs::read_to_string(dir.join(f)) {
                assert!(t.starts_with("-----BEGIN") && t.trim_end().ends_with("-----"), "{f} half written");
            }
        }
        // A kill in the middle of an install may leave a temporary file
        // (never a half-written real one); the next request sweeps it
        // before it even connects.
        let temps = |dir: &Path| {
            std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
                .count()
        };
        if temps(&dir) > 0 {
            let again = request(&d, free_port(), &name, &["--force"]).output().unwrap();
            assert!(!again.status.success());
            assert_eq!(temps(&dir), 0, "temp file not swept in {}", dir.display());
        }
        // The queue recovers: nothing pending is left behind for long.
        let t = Instant::now();
        while !pending(&d).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(5), "request left pending");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // And pairing still works afterwards.
    let mut r = Requester::spawn(request(&d, l.port, "k9-final", &["--force"]));
    r.line("waiting for approval");
    d.ok(&["approve", &jstr(&wait_pending(&d, 1)[0], "id")]);
    assert_eq!(r.finish().0, 0);
}

#[test]
fn interactive_session_on_a_terminal() {
    let d = Dispatcher::new();
    let (mut master, slave) = pty();
    let port = free_port();
    let mut cmd = d.cmd(&["pairing-mode", "--port", &port.to_string(), "--timeout", "120"]);
    let mut listener =
        cmd.stdin(slave.try_clone().unwrap()).stdout(slave.try_clone().unwrap()).stderr(Stdio::null()).spawn().unwrap();
    drop((slave, cmd));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(String::from_utf8_lossy(&buf[..n]).into_owned()).is_err() {
                break;
            }
        }
    });
    let mut screen = String::new();
    let expect = |needle: &str, screen: &mut String| {
        let t = Instant::now();
        while !screen.contains(needle) {
            assert!(t.elapsed() < Duration::from_secs(30), "no '{needle}' on the terminal: {screen}");
            if let Ok(chunk) = rx.recv_timeout(Duration::from_millis(100)) {
                screen.push_str(&chunk);
            }
        }
    };
    expect("Pairing mode active", &mut screen);
    let mut r = Requester::spawn(request(&d, port, "tty-1", &[]));
    let code = r.line("Pairing code:").split_whitespace().last().unwrap().to_string();
    expect("Accept, Deny, or Skip? [a/d/s]", &mut screen);
    assert!(screen.contains(&code) && screen.contains("tty-1"), "{screen}");
    master.write_all(b"a\n").unwrap();
    expect("Approved 'tty-1'", &mut screen);
    assert_eq!(r.finish().0, 0);
    master.write_all(b"quit\n").unwrap();
    expect("Pairing mode ended (quit)", &mut screen);
    assert!(listener.wait().unwrap().success());
    assert!(d.path().join("agents/tty-1.json").exists());
}

#[test]
fn our_agent_speaks_to_a_perl_listener() {
    // A stand-in for the Perl listener: reads the request as Perl does
    // (headers up to CRLFCRLF, Content-Length anywhere in them), checks its
    // shape, and answers with the two responses captured from Perl.
    let d = Dispatcher::new();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (cert, key) = (d.path().join("dispatcher.crt"), d.path().join("dispatcher.key"));
    let server = std::thread::spawn(move || {
        use openssl::ssl::{Ssl, SslContext, SslFiletype, SslMethod};
        let mut b = SslContext::builder(SslMethod::tls_server()).unwrap();
        b.set_certificate_file(&cert, SslFiletype::PEM).unwrap();
        b.set_private_key_file(&key, SslFiletype::PEM).unwrap();
        let ctx = b.build();
        loop {
            let (s, _) = tcp.accept().unwrap();
            // The agent's reachability probe connects and closes first.
            let Ok(mut s) = Ssl::new(&ctx).unwrap().accept(s) else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length:").map(|v| v.trim().parse().unwrap()))
                .unwrap();
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            let golden =
                std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/pairing/pair-denied.response"))
                    .unwrap();
            // Both captured responses, on the same connection.
            let split = golden.windows(8).skip(1).position(|w| w == b"HTTP/1.0").unwrap() + 1;
            s.write_all(&golden[..split]).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(&golden[split..]).unwrap();
            return (head, String::from_utf8(body).unwrap());
        }
    });
    let mut r = Requester::spawn(request(&d, port, "perl-peer-1", &["--lookup-by", "ip", "--agent-port", "7443"]));
    r.line("Pairing failed");
    let (rc, text) = r.finish();
    assert_eq!(rc, 3, "{text}");
    assert!(text.contains("rejected by operator") && text.contains("a9f0c76e18e3ce82"), "{text}");
    let (head, body) = server.join().unwrap();
    assert!(head.starts_with("POST /pair HTTP/1.0\r\n"), "{head}");
    assert!(head.contains("Content-Type: application/json\r\n"), "{head}");
    let o = json(&body);
    let mut keys: Vec<&String> = o.keys().collect();
    keys.sort();
    assert_eq!(keys, ["csr", "hostname", "ip", "lookup_by", "nonce", "port"]);
    assert_eq!(jstr(&o, "nonce").len(), 32);
    assert_eq!(jstr(&o, "port"), "7443");
    assert!(jstr(&o, "csr").starts_with("-----BEGIN CERTIFICATE REQUEST-----\n"));
    assert!(!d.path().join("perl-peer-1/agent.key").exists(), "nothing stored on denial");
}
