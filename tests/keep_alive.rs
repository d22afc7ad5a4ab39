//! Kept agent connections: the API server asks our agents to keep a
//! connection open between requests (`Connection: keep-alive`); the agent
//! agrees, checks every request against its state of the moment, and gives
//! anyone who did not ask upstream's one-request-per-connection reply.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

fn run_ok(api: &Api, host: &str) {
    let (c, b) = api.post("/run", &format!(r#"{{"hosts":["{host}"],"script":"echo","args":["x"]}}"#));
    assert_eq!(c, 200, "{b}");
    let r = &results(&json(&b))[0];
    assert_eq!(jstr(r, "exit"), "0", "{b}");
    assert_eq!(jstr(r, "stdout"), "[x]\n", "{b}");
}

/// The `TLS=` value of each `ACTION=run` line in an agent log.
fn run_tls(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("ACTION=run "))
        .filter_map(|l| l.split(" TLS=").nth(1).map(|t| t.split(' ').next().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn the_api_server_reuses_agent_connections_and_revocation_still_applies_at_once() {
    let d = Dispatcher::new();
    let a = d.agent("a1");
    let api = Api::start(&d, "api_auth_default = allow");
    for _ in 0..4 {
        run_ok(&api, "a1");
    }
    let tls = run_tls(&a.log());
    assert_eq!(tls.len(), 4, "{}", a.log());
    assert_eq!(tls[0], "full", "{}", a.log());
    assert!(tls[1..].iter().all(|t| t == "kept"), "later runs reuse the connection: {tls:?}");
    // Revoke the dispatcher while its connection is open and idle: the very
    // next request on that connection is refused.
    std::fs::write(a.dir.join("revoked-serials"), "serial=02\n").unwrap();
    a.reload();
    let (c, b) = api.post("/run", r#"{"hosts":["a1"],"script":"echo"}"#);
    assert_eq!(c, 200, "{b}");
    assert_eq!(jstr(&results(&json(&b))[0], "error"), "forbidden: certificate revoked", "{b}");
    assert!(a.log().contains("ACTION=revoked-cert PEER=127.0.0.1 SERIAL=2 TLS=kept"), "{}", a.log());
    // Lifting it works the same way.
    std::fs::write(a.dir.join("revoked-serials"), "").unwrap();
    a.reload();
    run_ok(&api, "a1");
}

#[test]
fn a_restarted_or_unwilling_agent_costs_no_run() {
    let d = Dispatcher::new();
    let mut a = d.agent("a1");
    let api = Api::start(&d, "api_auth_default = allow");
    run_ok(&api, "a1");
    run_ok(&api, "a1");
    // The agent restarts: the kept connection is dead, and the next run
    // notices before sending anything and connects anew.
    a.stop();
    a.start();
    run_ok(&api, "a1");
    run_ok(&api, "a1");
    // (A restart voids the agent's tickets: a full handshake.)
    assert_eq!(run_tls(&a.log()), ["full", "kept"], "{}", a.log());
    // An agent configured not to keep connections answers each on its own.
    a.stop();
    a.configure("keep_alive = 0");
    a.start();
    for _ in 0..3 {
        run_ok(&api, "a1");
    }
    assert_eq!(run_tls(&a.log()), ["full", "resumed", "resumed"], "{}", a.log());
    // And an API server told not to keep them never asks.
    drop(api);
    a.stop();
    let mut f = std::fs::OpenOptions::new().append(true).open(a.conf()).unwrap();
    writeln!(f, "keep_alive = 10").unwrap();
    a.start();
    let api = Api::start(&d, "agent_keep_alive = off");
    for _ in 0..3 {
        run_ok(&api, "a1");
    }
    assert!(run_tls(&a.log()).iter().all(|t| t != "kept"), "{}", a.log());
}

fn request(keep: bool) -> Vec<u8> {
    let body = r#"{"script":"echo","args":["k"],"reqid":"00000000000000aa"}"#;
    let conn = if keep { "Connection: keep-alive\r\n" } else { "" };
    format!(
        "POST /run HTTP/1.1\r\nHost: a\r\n{conn}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Read one reply framed by Content-Length: (head, body).
fn read_reply(s: &mut impl Read) -> (String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed mid-head: {}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("Content-Length");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, String::from_utf8(body).unwrap())
}

#[test]
fn the_agent_keeps_a_connection_only_when_asked_and_only_while_it_is_used() {
    let d = Dispatcher::new();
    let a = d.enroll("a1");
    let mut a = a;
    a.script("echo", "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done\necho\n", "");
    a.configure("keep_alive = 1");
    a.start();
    let p = d.path();
    let id = (p.join("dispatcher.crt"), p.join("dispatcher.key"));
    let connect = || tls_client(a.port, Some((&id.0, &id.1)), &p.join("ca.crt")).unwrap();

    // Asked: the reply says so, and three requests share one connection.
    let mut s = connect();
    for _ in 0..3 {
        s.write_all(&request(true)).unwrap();
        let (head, body) = read_reply(&mut s);
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");
        assert_eq!(jstr(&json(&body), "stdout"), "[k]\n");
    }
    // Left idle past keep_alive (1 s), the agent closes it.
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(t.elapsed() >= Duration::from_millis(800), "closed too early: {:?}", t.elapsed());
    assert_eq!(run_tls(&a.log()), ["full", "kept", "kept"], "{}", a.log());

    // Not asked (upstream's dispatcher): upstream's reply, then the end.
    let mut s = connect();
    s.write_all(&request(false)).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let all = String::from_utf8(all).unwrap();
    assert!(all.starts_with("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: "), "{all}");
    assert!(!all.contains("Connection"), "{all}");

    // A client that pipelines (bytes beyond the body) is answered once and closed.
    let mut s = connect();
    let mut two = request(true);
    two.extend_from_slice(&request(true));
    s.write_all(&two).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let all = String::from_utf8(all).unwrap();
    assert_eq!(all.matches("HTTP/1.0 200").count(), 1, "{all}");
    assert!(!all.contains("Connection: keep-alive"), "{all}");
}

#[test]
fn api_clients_may_keep_their_connection_too() {
    let d = Dispatcher::new();
    let _a = d.agent("a1");
    let api = Api::start(&d, "api_auth_default = allow\napi_keep_alive = 1");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", api.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let body = r#"{"hosts":["a1"],"script":"echo","args":["k"]}"#;
    for i in 0..3 {
        let req = if i == 1 {
            "GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".to_string()
        } else {
            format!(
                "POST /run HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        s.write_all(req.as_bytes()).unwrap();
        let (head, reply) = read_reply(&mut s);
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}{reply}");
        assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");
        if i != 1 {
            assert_eq!(jstr(&results(&json(&reply))[0], "stdout"), "[k]\n", "{reply}");
        }
    }
    // Idle past api_keep_alive: closed.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(api.log().matches("ACTION=api-request").count(), 3, "{}", api.log());
    // Without the header: upstream's one request per connection.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", api.port)).unwrap();
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.0 200 OK\r\n") && !all.contains("Connection"), "{all}");
    // A request that cannot be framed ends the connection whatever was asked.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", api.port)).unwrap();
    s.write_all(b"POST /run HTTP/1.1\r\nConnection: keep-alive\r\nContent-Length: five\r\n\r\n{nope}").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    assert!(all.starts_with("HTTP/1.0 400") && !all.contains("keep-alive"), "{all}");
}
