//! Who gets in: client certificates, the trusted-dispatcher gate, the
//! revocation list, and the request limits (413, 431, slow clients, 503).

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

#[test]
fn a_client_without_a_certificate_fails_the_handshake() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let r = tls_client(a.port, None, &d.path().join("ca.crt")).and_then(|mut s| {
        // TLS 1.3: the server's verdict on the (missing) certificate arrives with the first read.
        let _ = s.write_all(&post("/ping", "{}"));
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut buf).map_err(|e| e.to_string()).map(|_| buf)
    });
    match r {
        Err(_) => {}
        Ok(buf) => assert!(buf.is_empty(), "a certless client got a reply: {}", String::from_utf8_lossy(&buf)),
    }
    assert!(a.wait_log("ACTION=tls-failure", Duration::from_secs(5)), "{}", a.log());
    assert!(a.log().contains("certificate"), "{}", a.log());
}

#[test]
fn a_dispatcher_from_another_ca_is_refused() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let rogue = Dispatcher::new();
    // The rogue dispatcher knows the agent's address, but not its CA.
    std::fs::create_dir_all(rogue.path().join("agents")).unwrap();
    std::fs::copy(d.path().join("agents/web1.json"), rogue.path().join("agents/web1.json")).unwrap();
    let o = rogue.run(&["run", "--json", "web1", "echo"]);
    assert_eq!(o.status.code(), Some(1));
    let e = jstr(&results(&json(&stdout(&o)))[0], "error");
    assert!(e.starts_with("TLS handshake with 'web1' failed - certificate or trust mismatch"), "{e}");
    assert!(a.wait_log("ACTION=tls-failure", Duration::from_secs(5)), "{}", a.log());
    assert!(!a.log().contains(": ACTION=run "));
}

/// A second dispatcher identity signed by the same CA, not in any trusted map.
fn second_identity(d: &Dispatcher) -> std::path::PathBuf {
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
    conf
}

#[test]
fn an_untrusted_serial_from_our_own_ca_is_refused() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let other = second_identity(&d);
    for (verb, path) in [("run", "/run"), ("ping", "/ping")] {
        let mut args = vec![verb, "--json", "web1"];
        if verb == "run" {
            args.push("echo");
        }
        let o = std::process::Command::new(bin()).args(&args).env("CTRL_EXEC_CONFIG", &other).output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{path}");
        let e = jstr(&results(&json(&stdout(&o)))[0], "error");
        assert_eq!(e, "forbidden: serial mismatch", "{path}");
    }
    assert!(a.log().contains("ACTION=serial-reject"), "{}", a.log());
    assert!(a.log().contains("PEER_SERIAL=4"), "the second identity has serial 4: {}", a.log());
    // capabilities answer a different body for the same refusal
    let mut s =
        tls_client(a.port, Some((&d.path().join("other.crt"), &d.path().join("other.key"))), &d.path().join("ca.crt"))
            .unwrap();
    s.write_all(b"GET /capabilities HTTP/1.0\r\n\r\n").unwrap();
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut s, &mut buf).unwrap();
    assert_eq!(split_reply(&buf), (403, r#"{"error":"forbidden"}"#.to_string()));
}

#[test]
fn a_revoked_serial_is_refused_right_after_sighup() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    d.ok(&["run", "web1", "echo"]);
    // The dispatcher's serial is 2; revoke it in the colon spelling openssl prints.
    std::fs::write(a.dir.join("revoked-serials"), "# compromised dispatcher\n02:\n").unwrap();
    a.reload();
    assert!(a.log().contains("ACTION=config-warn"), "a malformed line is reported: {}", a.log());
    std::fs::write(a.dir.join("revoked-serials"), "# compromised dispatcher\nserial=02\n").unwrap();
    a.reload();
    let o = d.run(&["run", "--json", "web1", "echo"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "error"), "forbidden: certificate revoked");
    assert!(a.log().contains("ACTION=revoked-cert PEER=127.0.0.1 SERIAL=2"), "{}", a.log());
    let o = d.run(&["ping", "web1"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn oversized_body_gets_413_and_too_many_headers_get_431() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let reply = raw_exchange(
        &d,
        a.port,
        b"POST /run HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 1048577\r\n\r\n",
    )
    .unwrap();
    assert_eq!(split_reply(&reply), (413, r#"{"error":"request too large"}"#.into()));
    // a real oversized body being streamed at us also gets its 413
    let mut big = b"POST /run HTTP/1.0\r\nContent-Length: 2000000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 2_000_000));
    let reply = raw_exchange(&d, a.port, &big).unwrap();
    assert_eq!(split_reply(&reply).0, 413);
    let mut req = String::from("POST /ping HTTP/1.1\r\n");
    for i in 0..33 {
        req.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    req.push_str("Content-Length: 2\r\n\r\n{}");
    let reply = raw_exchange(&d, a.port, req.as_bytes()).unwrap();
    assert_eq!(split_reply(&reply), (431, r#"{"error":"too many headers"}"#.into()));
}

#[test]
fn a_slow_client_is_cut_off() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.configure("request_timeout = 1");
    a.start();
    let p = d.path();
    let mut s =
        tls_client(a.port, Some((&p.join("dispatcher.crt"), &p.join("dispatcher.key"))), &p.join("ca.crt")).unwrap();
    s.write_all(b"POST /run HTTP/1.0\r\nContent-Length: 50\r\n").unwrap(); // and then nothing
    let mut buf = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut buf);
    assert_eq!(split_reply(&buf), (408, r#"{"error":"request timeout"}"#.into()));
    assert!(a.log().contains("ACTION=request-timeout"));
    // the agent is still serving
    d.ok(&["ping", "web1"]);
}

#[test]
fn connections_over_max_children_get_503() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    let started = d.path().join("started");
    a.script("hold", &format!("#!/bin/sh\ntouch {}\nsleep 3\necho held\n", started.display()), "");
    a.configure("max_children = 1");
    a.start();
    let holder = d.cmd(&["run", "web1", "hold"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    wait_file(&started);
    let o = d.run(&["ping", "--json", "web1"]);
    assert_eq!(o.status.code(), Some(1));
    let e = jstr(&results(&json(&stdout(&o)))[0], "error");
    assert!(e.starts_with("503 Service Unavailable: agent busy"), "{e}");
    assert!(a.log().contains("ACTION=overload"), "{}", a.log());
    let held = holder.wait_with_output().unwrap();
    assert!(held.status.success() && stdout(&held).contains("held"), "the running request is unaffected");
    d.ok(&["ping", "web1"]);
}

#[test]
fn an_agent_that_distrusts_our_ca_reports_a_trust_mismatch() {
    // The agent trusts a different CA: the handshake completes on our side and
    // the agent's refusal arrives with the first read (TLS 1.3).
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    let rogue = Dispatcher::new();
    std::fs::copy(rogue.path().join("ca.crt"), a.dir.join("ca.crt")).unwrap();
    a.start();
    let o = d.run(&["run", "--json", "web1", "echo"]);
    assert_eq!(o.status.code(), Some(1));
    let e = jstr(&results(&json(&stdout(&o)))[0], "error");
    assert!(e.starts_with("TLS handshake with 'web1' failed - certificate or trust mismatch"), "{e}");
}

#[test]
fn a_cached_session_is_never_offered_by_another_identity() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    d.ok(&["run", "web1", "echo"]);
    d.ok(&["run", "web1", "echo"]); // a resumable session is now cached for the trusted identity
    assert!(a.log().contains("TLS=resumed"));
    let other = second_identity(&d);
    let o = std::process::Command::new(bin())
        .args(["run", "--json", "web1", "echo"])
        .env("CTRL_EXEC_CONFIG", &other)
        .output()
        .unwrap();
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "error"), "forbidden: serial mismatch");
}
