//! Detached ("async") runs: the agent's runner, lock and result store, the
//! owner gate on results, and following a run with `status` and `wait`,
//! from the CLI and from the API, across agents that are slow or down.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn post_run(d: &Dispatcher, port: u16, body: &str) -> (u16, miniserde::json::Object) {
    let (c, b) = split_reply(&raw_exchange(d, port, &post("/run", body)).unwrap());
    (c, json(&b))
}

fn get_result(cert_dir: &std::path::Path, cert: &str, port: u16, reqid: &str) -> (u16, miniserde::json::Object) {
    let mut s = tls_client(
        port,
        Some((&cert_dir.join(format!("{cert}.crt")), &cert_dir.join(format!("{cert}.key")))),
        &cert_dir.join("ca.crt"),
    )
    .unwrap();
    use std::io::{Read, Write};
    s.write_all(format!("GET /result/{reqid} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (c, b) = split_reply(&out);
    (c, json(&b))
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(15), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_agent_runs_detached_one_per_script_and_keeps_results_per_dispatcher() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    let gate = d.path().join("gate");
    a.script(
        "slow",
        &format!(
            "#!/bin/sh\nwhile [ ! -e {} ]; do sleep 0.05; done\necho \"done $1\"\necho err >&2\nexit 3\n",
            gate.display()
        ),
        "",
    );
    a.start();
    let (c, o) = post_run(&d, a.port, r#"{"script":"slow","args":["x"],"reqid":"r1","async":true}"#);
    assert_eq!((c, jstr(&o, "status")), (202, "accepted".into()));
    assert_eq!(jstr(&o, "reqid"), "r1");
    // one detached run per script: the second is refused while the first runs
    let (c, o) = post_run(&d, a.port, r#"{"script":"slow","reqid":"r2","async":true}"#);
    assert_eq!((c, jstr(&o, "status"), jstr(&o, "error")), (409, "busy".into(), "script already running".into()));
    // a reqid that could not be a file name is refused
    let (c, o) = post_run(&d, a.port, r#"{"script":"slow","reqid":"bad/reqid","async":true}"#);
    assert_eq!((c, jstr(&o, "exit"), jstr(&o, "error")), (200, "-1".into(), "async run requires a valid reqid".into()));
    // not-allowlisted scripts are refused exactly as for sync runs
    let (c, o) = post_run(&d, a.port, r#"{"script":"nosuch","reqid":"r3","async":true}"#);
    assert_eq!((c, jstr(&o, "error")), (200, "script not permitted".into()));
    let (c, o) = get_result(d.path(), "dispatcher", a.port, "r1");
    assert_eq!((c, jstr(&o, "status")), (200, "running".into()));
    assert_eq!(jstr(&o, "owner"), "test-dispatcher");
    // another dispatcher trusted by the same agent cannot read it
    let other = std::fs::read_to_string(&d.conf)
        .unwrap()
        .replace("dispatcher.crt", "other.crt")
        .replace("dispatcher.key", "other.key");
    let other_conf = d.path().join("other.conf");
    std::fs::write(&other_conf, other).unwrap();
    let o = std::process::Command::new(bin())
        .args(["setup-ctrl-exec", "--yes", "--config", other_conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut map = std::fs::read_to_string(a.dir.join("ctrl-exec-dispatchers")).unwrap();
    map.push_str("4 other-dispatcher\n");
    std::fs::write(a.dir.join("ctrl-exec-dispatchers"), map).unwrap();
    a.reload();
    let (c, o) = get_result(d.path(), "other", a.port, "r1");
    assert_eq!((c, jstr(&o, "status")), (404, "unknown".into()));
    assert!(a.log().contains("ACTION=result-deny") && a.log().contains("REASON=not-owner"), "{}", a.log());
    // release the script; the runner writes the final record and frees the lock
    std::fs::write(&gate, "").unwrap();
    until("the done record", || jstr(&get_result(d.path(), "dispatcher", a.port, "r1").1, "status") == "done");
    let (_, o) = get_result(d.path(), "dispatcher", a.port, "r1");
    assert_eq!(
        (jstr(&o, "exit"), jstr(&o, "stdout"), jstr(&o, "stderr")),
        ("3".into(), "done x\n".into(), "err\n".into())
    );
    for k in ["reqid", "status", "script", "owner", "started", "finished", "exit", "stdout", "stderr"] {
        assert!(o.contains_key(k), "{k} missing in {o:?}");
    }
    assert!(a.log().contains("MODE=async") && a.log().contains("REQID=r1"), "{}", a.log());
    let (c, _) = post_run(&d, a.port, r#"{"script":"slow","reqid":"r4","async":true}"#);
    assert_eq!(c, 202, "the lock is free again");
    // a reqid names one result: reusing it is refused, the first result stays
    let (c, o) = post_run(&d, a.port, r#"{"script":"slow","reqid":"r1","async":true}"#);
    assert_eq!((c, jstr(&o, "exit")), (200, "-1".into()), "{o:?}");
    assert!(jstr(&o, "error").contains("already used"), "{o:?}");
    assert_eq!(jstr(&get_result(d.path(), "dispatcher", a.port, "r1").1, "stdout"), "done x\n");
    let (c, o) = get_result(d.path(), "dispatcher", a.port, "0123456789abcdef");
    assert_eq!((c, jstr(&o, "status"), jstr(&o, "reqid")), (404, "unknown".into(), "0123456789abcdef".into()));
}

#[test]
fn cli_follows_an_async_run_across_slow_fast_and_stopped_agents() {
    let d = Dispatcher::new();
    let gate = d.path().join("gate");
    let mut slow = d.enroll("slow1");
    slow.script("job", &format!("#!/bin/sh\nwhile [ ! -e {} ]; do sleep 0.05; done\necho slow\n", gate.display()), "");
    slow.start();
    let mut fast = d.enroll("fast1");
    fast.script("job", "#!/bin/sh\necho fast\n", "");
    fast.start();
    let down = d.enroll("down1");
    down.script("job", "#!/bin/sh\necho never\n", "");
    let o = d.run(&["run", "--async", "slow1", "fast1", "down1", "job"]);
    assert_eq!(o.status.code(), Some(0), "at least one host accepted");
    let out = stdout(&o);
    let reqid = out.lines().next().unwrap().split("req:").nth(1).unwrap().to_string();
    assert!(out.contains("==> slow1  [accepted") && out.contains("==> fast1  [accepted"), "{out}");
    assert!(out.contains("==> down1  [ERROR: host 'down1' did not respond on port"), "{out}");
    assert!(out.contains(&format!("Check progress with: ctrl-exec status {reqid}")), "{out}");
    // status while the slow one is still running
    until("fast1 to finish", || stdout(&d.run(&["status", &reqid])).contains("==> fast1  [done  exit:0]"));
    let o = d.ok(&["status", "--json", &reqid]);
    let rec = json(&stdout(&o));
    assert_eq!((jstr(&rec, "complete"), jstr(&rec, "pending")), ("false".into(), r#"["slow1"]"#.into()));
    let o = d.run(&["wait", "--timeout", "1", &reqid]);
    assert_eq!(o.status.code(), Some(2), "still pending at the timeout");
    assert!(stdout(&o).contains("[PENDING]"));
    // the result outlives the agent process: stop it, let the job finish, restart
    slow.stop();
    std::fs::write(&gate, "").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    slow.start();
    let o = d.run(&["wait", "--timeout", "20", &reqid]);
    assert_eq!(o.status.code(), Some(1), "complete, but one host never ran it");
    let text = stdout(&o);
    assert!(text.contains("[COMPLETE]") && text.contains("==> slow1  [done  exit:0]\nslow\n"), "{text}");
    assert!(text.contains("==> down1  [ERROR]"), "{text}");
    // unknown ids
    let o = d.run(&["status", "00000000deadbeef"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("No such request: 00000000deadbeef"));
    let o = d.run(&["status", "--json", "00000000deadbeef"]);
    assert_eq!(stdout(&o).trim(), r#"{"error":"not found","ok":false,"reqid":"00000000deadbeef"}"#);
}

#[test]
fn async_runs_keep_the_script_timeout_and_wait_reports_success() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script("hang", "#!/bin/sh\necho before\nsleep 30\n", "timeout=1");
    a.script("ok", "#!/bin/sh\necho fine\n", "");
    a.start();
    let o = d.ok(&["run", "--async", "--json", "web1", "ok"]);
    let reqid = jstr(&json(&stdout(&o)), "reqid");
    let o = d.run(&["wait", "--json", &reqid]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = d.ok(&["run", "--async", "--json", "web1", "hang"]);
    let reqid = jstr(&json(&stdout(&o)), "reqid");
    let o = d.run(&["wait", "--json", "--timeout", "20", &reqid]);
    assert_eq!(o.status.code(), Some(1));
    let rec = json(&stdout(&o));
    let h = match rec.get("hosts") {
        Some(miniserde::json::Value::Object(h)) => match h.get("web1") {
            Some(miniserde::json::Value::Object(w)) => w.clone(),
            _ => panic!(),
        },
        _ => panic!("{rec:?}"),
    };
    assert_eq!(
        (jstr(&h, "exit"), jstr(&h, "timed_out"), jstr(&h, "stdout")),
        ("126".into(), "true".into(), "before\n".into())
    );
}

#[test]
fn the_api_submits_async_runs_and_status_collects_them() {
    let d = Dispatcher::new();
    let gate = d.path().join("gate");
    let mut a = d.enroll("web1");
    a.script("job", &format!("#!/bin/sh\nwhile [ ! -e {} ]; do sleep 0.05; done\necho done\n", gate.display()), "");
    a.start();
    let api = Api::start(&d, "api_auth_default = allow");
    let (c, b) = api.post("/run", r#"{"hosts":["web1"],"script":"job","async":true,"username":"alice"}"#);
    assert_eq!(c, 202, "{b}");
    capture("AsyncSubmitResponse", &b);
    let o = json(&b);
    assert_eq!(jstr(&o, "async"), "true");
    let reqid = jstr(&o, "reqid");
    assert_eq!(jstr(&results(&o)[0], "status"), "accepted");
    let (c, b) = api.get(&format!("/status/{reqid}"));
    assert_eq!(c, 200, "{b}");
    capture("StatusResponse", &b);
    let s = json(&b);
    assert_eq!((jstr(&s, "mode"), jstr(&s, "complete")), ("async".into(), "false".into()));
    assert!(!b.contains("submitter"));
    std::fs::write(&gate, "").unwrap();
    until("the API to report completion", || api.get(&format!("/status/{reqid}")).1.contains(r#""complete":true"#));
    let (_, b) = api.get(&format!("/status/{reqid}"));
    capture("StatusResponse", &b);
    assert!(b.contains(r#""stdout":"done\n""#) && b.contains(r#""status":"done""#), "{b}");
    // the CLI sees the same record
    let o = d.ok(&["status", &reqid]);
    assert!(stdout(&o).contains("==> web1  [done  exit:0]"), "{}", stdout(&o));
}

#[test]
fn a_lock_holds_for_the_whole_run_and_refuses_a_second_one() {
    let d = Dispatcher::new();
    let gate = d.path().join("gate");
    let started = d.path().join("started");
    let mut a = d.enroll("web1");
    a.script(
        "deploy",
        &format!(
            "#!/bin/sh\ntouch {}\nwhile [ ! -e {} ]; do sleep 0.05; done\necho deployed\n",
            started.display(),
            gate.display()
        ),
        "",
    );
    a.script("other", "#!/bin/sh\necho other\n", "");
    a.start();
    assert_eq!(stdout(&d.ok(&["list-locks"])).trim(), "No locks currently held.");
    let first = d
        .cmd(&["run", "web1", "deploy"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_file(&started);
    // the same script on the same host is refused while the first run holds the lock
    let o = d.run(&["run", "web1", "deploy"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Locked: already running: web1:deploy"), "{}", stderr(&o));
    let o = d.run(&["run", "--json", "web1", "deploy"]);
    assert_eq!(stdout(&o).trim(), r#"{"code":4,"conflicts":["web1:deploy"],"error":"locked","ok":false}"#);
    // other scripts are not blocked, and list-locks shows the held one
    assert!(stdout(&d.ok(&["run", "web1", "other"])).contains("other"));
    let o = d.ok(&["list-locks", "--json"]);
    assert_eq!(stdout(&o).trim(), r#"{"locks":[{"host":"web1","script":"deploy"}],"ok":true}"#);
    // the API refuses the same run with 409
    let api = Api::start(&d, "api_auth_default = allow");
    let (c, b) = api.post("/run", r#"{"hosts":["web1"],"script":"deploy"}"#);
    assert_eq!(c, 409, "{b}");
    capture("ErrorResponse", &b);
    assert_eq!((jstr(&json(&b), "error"), jstr(&json(&b), "code")), ("locked".into(), "4".into()));
    std::fs::write(&gate, "").unwrap();
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success() && stdout(&out).contains("deployed"));
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        log.contains("ACTION=lock-acquire HOST=web1 SCRIPT=deploy")
            && log.contains("ACTION=lock-release HOSTS=web1 SCRIPT=deploy"),
        "{log}"
    );
    // released: it runs again
    assert!(stdout(&d.ok(&["run", "web1", "deploy"])).contains("deployed"));
    assert_eq!(stdout(&d.ok(&["list-locks"])).trim(), "No locks currently held.");
}

#[test]
fn a_detached_script_gets_the_usual_environment_and_cannot_keep_the_lock() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    // The script leaves a background process behind: it must not inherit the lock.
    a.script("bg", "#!/bin/sh\nsleep 3 </dev/null >/dev/null 2>&1 &\necho \"home=$HOME\"\n", "");
    // Start the agent from a copy of the binary, then replace that copy the
    // way a package upgrade does (a new file renamed over the old one).
    let exe = d.path().join("ctrl-exec-copy");
    std::fs::copy(bin(), &exe).unwrap();
    a.start_exe(&exe);
    let fresh = d.path().join("ctrl-exec-new");
    std::fs::copy(bin(), &fresh).unwrap();
    std::fs::rename(&fresh, &exe).unwrap();

    let (c, o) = post_run(&d, a.port, r#"{"script":"bg","reqid":"e1","async":true}"#);
    assert_eq!((c, jstr(&o, "status")), (202, "accepted".into()), "{o:?}");
    let done = |reqid: &str| jstr(&get_result(d.path(), "dispatcher", a.port, reqid).1, "status") == "done";
    until("the first run to finish", || done("e1"));
    let (_, r) = get_result(d.path(), "dispatcher", a.port, "e1");
    let home = std::env::var("HOME").unwrap_or_default();
    assert_eq!(jstr(&r, "stdout"), format!("home={home}\n"), "{r:?}");
    // The sleep is still running, yet the script is free again.
    let (c, o) = post_run(&d, a.port, r#"{"script":"bg","reqid":"e2","async":true}"#);
    assert_eq!((c, jstr(&o, "status")), (202, "accepted".into()), "{o:?}");
    until("the second run to finish", || done("e2"));
}

#[test]
fn status_finds_a_host_again_at_the_port_it_was_submitted_to() {
    let d = Dispatcher::new();
    let mut a = d.enroll("moved1");
    a.script("job", "#!/bin/sh\necho moved\n", "");
    // The agent now listens elsewhere than the registry says.
    let port = free_port();
    let conf = std::fs::read_to_string(a.conf()).unwrap();
    let conf: String = conf
        .lines()
        .map(|l| if l.starts_with("port =") { format!("port = {port}\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(a.conf(), conf).unwrap();
    a.port = port;
    a.start();
    let o = d.ok(&["run", "--async", "--json", &format!("moved1:{port}"), "job"]);
    let reqid = jstr(&json(&stdout(&o)), "reqid");
    let o = d.run(&["wait", "--timeout", "20", &reqid]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("==> moved1  [done  exit:0]\nmoved\n"), "{}", stdout(&o));
    let rec = json(&stdout(&d.ok(&["status", "--json", &reqid])));
    assert!(jstr(&rec, "hosts").contains(&format!("\"port\":{port}")), "{rec:?}");
}
