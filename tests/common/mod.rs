//! Shared scaffolding for the end-to-end tests: a throw-away dispatcher (CA,
//! dispatcher identity, registry) in a temporary directory, agents enrolled
//! into it and started as real `ctrl-exec agent serve` processes on
//! ephemeral 127.0.0.1 ports, and a raw mTLS client for byte-level checks.
//! Nothing needs root and nothing touches /etc.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ctrl-exec"))
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Write an executable without this (multi-threaded) test process holding
/// it open for writing: `cp` writes it. Otherwise a process spawned by
/// another test thread at that moment can carry the write descriptor until
/// its exec, and executing the file fails with "Text file busy".
pub fn write_exec(path: &Path, body: &str) {
    let src = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src.path(), body).unwrap();
    assert!(Command::new("cp").arg(src.path()).arg(path).status().unwrap().success());
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Wait (at most 10 s) until `path` exists, e.g. a marker a script touches.
pub fn wait_file(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A dispatcher with its own CA in a temp dir.
pub struct Dispatcher {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

impl Dispatcher {
    pub fn new() -> Dispatcher {
        Self::with_config("")
    }

    /// `extra` is appended to ctrl-exec.conf.
    pub fn with_config(extra: &str) -> Dispatcher {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let conf = p.join("ctrl-exec.conf");
        std::fs::write(
            &conf,
            format!(
                "cert = {d}/dispatcher.crt\nkey = {d}/dispatcher.key\nca = {d}/ca.crt\nca_dir = {d}\nregistry_dir = {d}/agents\n\
                 dispatcher_id = test-dispatcher\nkey_type = rsa2048\nlog = stderr\nread_timeout = 20\n{extra}\n",
                d = p.display()
            ),
        )
        .unwrap();
        let d = Dispatcher { dir, conf };
        d.ok(&["setup-ca"]);
        d.ok(&["setup-ctrl-exec"]);
        d
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `ctrl-exec <args>` with this dispatcher's config in the environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args).env("CTRL_EXEC_CONFIG", &self.conf).env_remove("ENVEXEC_TOKEN").stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and insist on exit 0.
    pub fn ok(&self, args: &[&str]) -> Output {
        let o = self.run(args);
        assert!(o.status.success(), "ctrl-exec {args:?} failed: {}\n{}", stdout(&o), stderr(&o));
        o
    }

    /// Enrol an agent on a fresh port into <tmp>/<name> (not started).
    pub fn enroll(&self, name: &str) -> Agent {
        let port = free_port();
        let dir = self.path().join(name);
        self.ok(&[
            "enroll",
            name,
            "--ip",
            "127.0.0.1",
            "--agent-port",
            &port.to_string(),
            "--out",
            dir.to_str().unwrap(),
        ]);
        std::fs::create_dir_all(dir.join("scripts")).unwrap();
        Agent { dir, port, name: name.into(), child: None }
    }

    /// Enrol and start an agent with an `echo` script that prints its args.
    pub fn agent(&self, name: &str) -> Agent {
        let mut a = self.enroll(name);
        a.script("echo", "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done\necho\n", "");
        a.start();
        a
    }
}

/// An enrolled agent.
pub struct Agent {
    pub dir: PathBuf,
    pub port: u16,
    pub name: String,
    pub child: Option<Child>,
}

impl Agent {
    pub fn conf(&self) -> PathBuf {
        self.dir.join("agent.conf")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Append lines to agent.conf.
    pub fn configure(&self, extra: &str) {
        let mut f = std::fs::OpenOptions::new().append(true).open(self.conf()).unwrap();
        writeln!(f, "{extra}").unwrap();
    }

    /// Write an executable script and list it in scripts.conf.
    pub fn script(&self, name: &str, body: &str, annotations: &str) -> PathBuf {
        let p = self.dir.join("scripts").join(format!("{name}.sh"));
        write_exec(&p, body);
        let mut f = std::fs::OpenOptions::new().append(true).open(self.dir.join("scripts.conf")).unwrap();
        writeln!(f, "{name} = {} {annotations}", p.display()).unwrap();
        p
    }

    pub fn start(&mut self) {
        self.start_exe(&bin());
    }

    /// Start the agent from a given copy of the binary.
    pub fn start_exe(&mut self, exe: &Path) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(exe)
            .args(["agent", "serve", "--log-stderr", "--config", self.conf().to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        while !self.log().contains("ACTION=start") {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent {} exited with {st}: {}", self.name, self.log());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "agent {} did not start: {}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("agent not running").id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGHUP, then wait until the agent logged the reload (or its failure).
    pub fn reload(&self) {
        let before = self.log().matches("ACTION=reload").count();
        self.signal(libc::SIGHUP);
        let t = Instant::now();
        while self.log().matches("ACTION=reload").count() == before {
            assert!(t.elapsed() < Duration::from_secs(10), "no reload logged: {}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM and wait for exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let st = self.child.as_mut().unwrap().wait().unwrap();
        self.child = None;
        st
    }

    /// Wait up to `d` for a log line containing `needle`.
    pub fn wait_log(&self, needle: &str, d: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < d {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw TLS client: connect to `port` presenting `cert`/`key` (or no
/// certificate), trusting `ca`.
pub fn tls_client(
    port: u16,
    identity: Option<(&Path, &Path)>,
    ca: &Path,
) -> Result<openssl::ssl::SslStream<TcpStream>, String> {
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_verify(SslVerifyMode::NONE);
    if let Some((cert, key)) = identity {
        b.set_certificate_file(cert, openssl::ssl::SslFiletype::PEM).unwrap();
        b.set_private_key_file(key, openssl::ssl::SslFiletype::PEM).unwrap();
    }
    let _ = ca;
    let c = b.build();
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut cfg = c.configure().unwrap();
    cfg.set_verify_hostname(false);
    cfg.connect("localhost", tcp).map_err(|e| e.to_string())
}

/// Send raw bytes as the dispatcher and return the whole reply (status line included).
pub fn raw_exchange(d: &Dispatcher, port: u16, request: &[u8]) -> Result<String, String> {
    let p = d.path();
    let mut s = tls_client(port, Some((&p.join("dispatcher.crt"), &p.join("dispatcher.key"))), &p.join("ca.crt"))?;
    // TLS 1.3 reports a refused client certificate only at the first read.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(e) if !out.is_empty() => Ok(format!("{}<error: {e}>", String::from_utf8_lossy(&out))),
        Err(e) => Err(e.to_string()),
    }
}

/// Status code and JSON body of a raw reply.
pub fn split_reply(reply: &str) -> (u16, String) {
    let code = reply.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// `POST <path>` with a JSON body, as raw bytes.
pub fn post(path: &str, body: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// Parse a JSON object with miniserde.
pub fn json(text: &str) -> miniserde::json::Object {
    match miniserde::json::from_str::<miniserde::json::Value>(text.trim()) {
        Ok(miniserde::json::Value::Object(o)) => o,
        _ => panic!("not a JSON object: {text}"),
    }
}

pub fn jstr(o: &miniserde::json::Object, k: &str) -> String {
    match o.get(k) {
        Some(miniserde::json::Value::String(s)) => s.clone(),
        Some(v) => miniserde::json::to_string(v),
        None => String::new(),
    }
}

/// The `results` array of a CLI --json document.
pub fn results(o: &miniserde::json::Object) -> Vec<miniserde::json::Object> {
    match o.get("results") {
        Some(miniserde::json::Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                miniserde::json::Value::Object(o) => o.clone(),
                _ => panic!("result is not an object"),
            })
            .collect(),
        _ => panic!("no results array"),
    }
}

/// Every `REQID=` value on lines with `ACTION=<action>`.
pub fn reqids(log: &str, action: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(&format!(": ACTION={action} ")))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("REQID=")).map(String::from))
        .collect()
}

/// A running API server (`ctrl-exec server`) of a dispatcher.
pub struct Api {
    pub port: u16,
    pub log: PathBuf,
    child: Child,
}

impl Api {
    /// Start the API of `d` on a fresh port (`extra` is appended to its config first).
    pub fn start(d: &Dispatcher, extra: &str) -> Api {
        let port = free_port();
        let mut f = std::fs::OpenOptions::new().append(true).open(&d.conf).unwrap();
        writeln!(f, "api_port = {port}\n{extra}").unwrap();
        let log = d.path().join(format!("api-{port}.log"));
        let child = d
            .cmd(&["server", "--log-stderr"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let api = Api { port, log, child };
        let t = Instant::now();
        while !api.log().contains("ACTION=api-start") {
            assert!(t.elapsed() < Duration::from_secs(10), "API did not start: {}", api.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        api
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One plain-HTTP exchange: (status, body).
    pub fn call(&self, method: &str, path: &str, headers: &[&str], body: Option<&str>) -> (u16, String) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.raw(req.as_bytes())
    }

    /// Raw bytes in, (status, body) out.
    pub fn raw(&self, bytes: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        split_reply(&String::from_utf8_lossy(&out))
    }

    /// A POST /run to an API on `port`, from another thread.
    pub fn raw_port(port: u16, body: &str) -> (u16, String) {
        let req = format!(
            "POST /run HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        split_reply(&String::from_utf8_lossy(&out))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.call("GET", path, &[], None)
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.call("POST", path, &[], Some(body))
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keep an API response for scripts/check-openapi.py, which validates it
/// against the named schema of docs/openapi.json (`make test` runs it).
pub fn capture(schema: &str, body: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-captures");
    std::fs::create_dir_all(&dir).unwrap();
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::fs::write(dir.join(format!("{schema}-{}-{n}.json", std::process::id())), body).unwrap();
}

// --- dispatcher certificate rotation (tests/rotation.rs) -------------------

impl Dispatcher {
    /// The registry record of `name`.
    pub fn record(&self, name: &str) -> miniserde::json::Object {
        json(&std::fs::read_to_string(self.path().join("agents").join(format!("{name}.json"))).unwrap())
    }

    /// `rotation.json`, if there is one (next to the registry by default).
    pub fn rotation_state(&self) -> Option<miniserde::json::Object> {
        std::fs::read_to_string(self.path().join("rotation.json")).ok().map(|t| json(&t))
    }
}

impl Agent {
    /// The trusted-dispatcher map as written on disk.
    pub fn trusted(&self) -> String {
        std::fs::read_to_string(self.dir.join("ctrl-exec-dispatchers")).unwrap_or_default()
    }
}

/// Do the PEM certificate and private key at these paths belong together?
pub fn pair_matches(cert: &Path, key: &Path) -> bool {
    let (Ok(c), Ok(k)) = (std::fs::read(cert), std::fs::read(key)) else { return false };
    match (openssl::x509::X509::from_pem(&c), openssl::pkey::PKey::private_key_from_pem(&k)) {
        (Ok(c), Ok(k)) => c.public_key().map(|p| p.public_eq(&k)).unwrap_or(false),
        _ => false,
    }
}

/// Serial (lowercase hex, no leading zeros) of the PEM certificate at `cert`.
pub fn cert_serial(cert: &Path) -> String {
    let c = openssl::x509::X509::from_pem(&std::fs::read(cert).unwrap()).unwrap();
    let hex = c.serial_number().to_bn().unwrap().to_hex_str().unwrap().to_ascii_lowercase();
    let t = hex.trim_start_matches('0');
    if t.is_empty() { "0".into() } else { t.into() }
}

/// A pseudo-terminal pair: (master, slave).
pub fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty writes two new descriptors into m and s.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut()) };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: fresh descriptors we now own.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}
