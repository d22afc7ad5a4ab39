//! What happens to a running script: output caps, time limits that kill the
//! whole process group, and reloads or shutdowns while it runs.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn output_is_capped_with_a_truncation_flag() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script(
        "chatty",
        "#!/bin/sh\nhead -c 500000 /dev/zero | tr '\\0' a\nhead -c 300 /dev/zero | tr '\\0' e >&2\n",
        "",
    );
    a.configure("max_output = 1000");
    a.start();
    let o = d.ok(&["run", "--json", "web1", "chatty"]);
    let r = &results(&json(&stdout(&o)))[0];
    assert_eq!(jstr(r, "stdout"), "a".repeat(1000));
    assert_eq!(jstr(r, "stderr"), "e".repeat(300));
    assert_eq!(jstr(r, "truncated"), "true");
    assert!(a.log().contains("TRUNCATED=yes"));
    let o = d.ok(&["run", "web1", "chatty"]);
    assert!(stdout(&o).contains("NOTE: output truncated"), "{}", stdout(&o));
}

#[test]
fn a_timeout_kills_the_whole_process_group_and_says_so() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    let marker = d.path().join("grandchild-survived");
    a.script(
        "hang",
        &format!("#!/bin/sh\n(sleep 2; touch {}) &\necho working\nsleep 60\n", marker.display()),
        "timeout=1",
    );
    a.start();
    let t = Instant::now();
    let o = d.run(&["run", "--json", "web1", "hang"]);
    assert!(t.elapsed() < Duration::from_secs(15));
    assert_eq!(o.status.code(), Some(1));
    let r = &results(&json(&stdout(&o)))[0];
    assert_eq!(jstr(r, "timed_out"), "true");
    assert_eq!(jstr(r, "exit"), "126");
    assert_eq!(jstr(r, "stdout"), "working\n");
    assert!(jstr(r, "error").contains("timed out after 1s"), "{r:?}");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!marker.exists(), "a grandchild outlived the timeout");
    assert!(a.log().contains("TIMEOUT=killed"));
}

#[test]
fn sighup_reloads_the_allowlist_without_touching_a_running_script() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    let started = d.path().join("started");
    a.script("slow", &format!("#!/bin/sh\ntouch {}\nsleep 2\necho finished\n", started.display()), "");
    let newer = a.dir.join("scripts/newer.sh");
    write_exec(&newer, "#!/bin/sh\necho newer\n");
    a.start();
    let slow = d.cmd(&["run", "--json", "web1", "slow"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    wait_file(&started);
    // Replace the allowlist while `slow` runs: drop it, add `newer`.
    std::fs::write(a.dir.join("scripts.conf"), format!("newer = {}\n", newer.display())).unwrap();
    a.reload();
    assert!(a.log().contains("ACTION=reload ") && a.log().contains("SCRIPTS=1"), "{}", a.log());
    let out = slow.wait_with_output().unwrap();
    assert!(out.status.success(), "the in-flight run was disturbed");
    assert_eq!(jstr(&results(&json(&stdout(&out)))[0], "stdout"), "finished\n");
    assert!(stdout(&d.ok(&["run", "web1", "newer"])).contains("newer"));
    let o = d.run(&["run", "--json", "web1", "slow"]);
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "error"), "script not permitted");
}

#[test]
fn a_broken_reload_keeps_the_running_configuration() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    a.configure("this line is not a setting");
    a.signal(libc::SIGHUP);
    assert!(a.wait_log("ACTION=reload-fail", Duration::from_secs(5)), "{}", a.log());
    assert!(a.log().contains("agent.conf:"), "the failure names the file and line: {}", a.log());
    d.ok(&["run", "web1", "echo"]);
}

#[test]
fn sigterm_lets_running_scripts_finish() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    let started = d.path().join("started");
    a.script("slow", &format!("#!/bin/sh\ntouch {}\nsleep 1\necho done\n", started.display()), "");
    a.start();
    let slow = d.cmd(&["run", "--json", "web1", "slow"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    wait_file(&started);
    let status = a.stop();
    assert!(status.success(), "{status}");
    let out = slow.wait_with_output().unwrap();
    assert_eq!(jstr(&results(&json(&stdout(&out)))[0], "stdout"), "done\n");
    assert!(a.log().contains("ACTION=stop GRACE=30 LIVE=1"), "{}", a.log());
    let o = d.run(&["ping", "--json", "web1"]);
    assert!(jstr(&results(&json(&stdout(&o)))[0], "error").contains("connection refused"));
}

#[test]
fn the_script_gets_a_clean_environment_and_the_context_on_stdin() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script("ctx", "#!/bin/sh\ncat\necho\nenv | sort\n", "");
    a.start();
    let o = d
        .cmd(&["run", "--json", "--username", "bob", "web1", "ctx", "--", "x"])
        .env("ENVEXEC_TOKEN", "s3cret")
        .env("LEAKY_SECRET", "nope")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = jstr(&results(&json(&stdout(&o)))[0], "stdout");
    let ctx = json(out.lines().next().unwrap());
    assert_eq!(jstr(&ctx, "script"), "ctx");
    assert_eq!(jstr(&ctx, "username"), "bob");
    assert_eq!(jstr(&ctx, "token"), "s3cret");
    assert_eq!(jstr(&ctx, "dispatcher"), "test-dispatcher");
    assert_eq!(jstr(&ctx, "peer_ip"), "127.0.0.1");
    assert_eq!(jstr(&ctx, "args"), r#"["x"]"#);
    assert_eq!(jstr(&ctx, "reqid").len(), 16);
    assert!(!out.contains("LEAKY_SECRET") && !out.contains("ENVEXEC"), "{out}");
    assert!(out.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), "{out}");
    assert!(!a.log().contains("s3cret"), "tokens are never logged");
}
