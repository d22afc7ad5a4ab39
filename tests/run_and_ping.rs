//! Operator scenarios for `run` and `ping`: the happy path in both output
//! forms, arguments that would be dangerous in a shell, refusals, fan-out,
//! exit codes, and the audit trail shared by both sides.

mod common;

use common::*;

#[test]
fn a_run_reaches_the_script_and_prints_its_output() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let o = d.run(&["run", "web1", "echo", "--", "hello", "two words"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let first = out.lines().next().unwrap();
    assert!(first.starts_with("==> web1  [OK  exit:0  "), "{out}");
    assert!(first.contains("  req:") && first.ends_with(']'), "{out}");
    assert!(out.contains("\n[hello][two words]\n"), "{out}");
    drop(a);
}

#[test]
fn json_output_has_boolean_ok_and_the_agent_fields() {
    let d = Dispatcher::new();
    let _a = d.agent("web1");
    let o = d.ok(&["run", "--json", "web1", "echo", "--", "x"]);
    let doc = json(&stdout(&o));
    assert!(matches!(doc.get("ok"), Some(miniserde::json::Value::Bool(true))));
    let r = &results(&doc)[0];
    for k in ["host", "script", "exit", "stdout", "stderr", "reqid", "rtt"] {
        assert!(r.contains_key(k), "missing {k} in {r:?}");
    }
    assert_eq!(jstr(r, "host"), "web1");
    assert_eq!(jstr(r, "exit"), "0");
    assert_eq!(jstr(r, "stdout"), "[x]\n");
    assert_eq!(jstr(r, "reqid").len(), 16);
    assert!(jstr(r, "rtt").ends_with("ms"));
}

#[test]
fn shell_metacharacters_arrive_byte_for_byte_and_nothing_is_executed() {
    let d = Dispatcher::new();
    let marker = d.path().join("pwned");
    let a = d.agent("web1");
    let nasty = format!("; $(touch {m}) \"q\" 'x' * `touch {m}` | touch {m} && touch {m}", m = marker.display());
    let o = d.ok(&["run", "--json", "web1", "echo", "--", &nasty, "", "*", "$HOME", "a\tb\\c", "héllo ✓ 日本"]);
    let r = &results(&json(&stdout(&o)))[0];
    assert_eq!(jstr(r, "stdout"), format!("[{nasty}][][*][$HOME][a\tb\\c][héllo ✓ 日本]\n"));
    assert!(!marker.exists(), "an argument was executed by a shell");
    // the exact upstream test string from the issue
    let upstream = "; $(touch /tmp/pwned) \"q\" 'x' *";
    let o = d.ok(&["run", "--json", "web1", "echo", "--", upstream]);
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "stdout"), format!("[{upstream}]\n"));
    drop(a);
}

#[test]
fn random_arguments_round_trip_exactly() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    // NUL-separated, so every byte of every argument comes back distinguishable.
    a.script("nul", "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done\n", "");
    a.start();
    let mut runner = TestRunner::new(Config { cases: 12, ..Config::default() });
    let strategy = proptest::collection::vec("[^\u{0}]{0,40}", 0..25);
    runner
        .run(&strategy, |args| {
            let mut argv = vec!["run", "--json", "web1", "nul", "--"];
            argv.extend(args.iter().map(String::as_str));
            let o = d.run(&argv);
            prop_assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
            let got = jstr(&results(&json(&stdout(&o)))[0], "stdout");
            let want: String = args.iter().map(|s| format!("{s}\0")).collect();
            prop_assert_eq!(got, want);
            Ok(())
        })
        .unwrap();
}

#[test]
fn refused_script_names_never_run() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script("echo", "#!/bin/sh\necho ran\n", "");
    // A script outside script_dirs (dropped when the allowlist loads) and a
    // symlink that is inside at load time and swapped to escape afterwards
    // (caught when it is run).
    let outside = d.path().join("outside.sh");
    write_exec(&outside, "#!/bin/sh\necho escaped\n");
    let link = a.dir.join("scripts/link.sh");
    std::os::unix::fs::symlink(a.dir.join("scripts/echo.sh"), &link).unwrap();
    std::fs::write(
        a.dir.join("scripts.conf"),
        format!(
            "echo = {s}/echo.sh\noutside = {o}\nlink = {s}/link.sh\n",
            s = a.dir.join("scripts").display(),
            o = outside.display()
        ),
    )
    .unwrap();
    a.configure(&format!("script_dirs = {}", a.dir.join("scripts").display()));
    a.start();
    assert!(a.log().contains("skipped 'outside'"), "{}", a.log());
    assert!(stdout(&d.ok(&["run", "web1", "link"])).contains("ran"), "the symlink is fine while it points inside");
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    for name in ["nosuch", "../x", "a/b", "..", "a b", "$(id)", "x;y", "echo.sh", "ECHO", "outside", "link"] {
        let o = d.run(&["run", "--json", "web1", name]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        let r = &results(&json(&stdout(&o)))[0];
        assert_eq!(jstr(r, "exit"), "-1", "{name}: {r:?}");
        assert_eq!(jstr(r, "error"), "script not permitted", "{name}");
        assert!(!r.contains_key("stdout"), "{name}");
    }
    let log = a.log();
    assert!(log.contains("ACTION=deny") && log.contains("REFUSAL=outside-script-dirs"), "{log}");
    assert!(log.contains("REFUSAL=invalid-name") && log.contains("REFUSAL=not-allowlisted"), "{log}");
    assert_eq!(log.matches(": ACTION=run ").count(), 1, "only the first, legitimate link run may run: {log}");
    // the allowed one still runs
    let o = d.ok(&["run", "web1", "echo"]);
    assert!(stdout(&o).contains("ran"));
}

#[test]
fn failing_script_sets_exit_code_and_shows_stderr() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script("fail", "#!/bin/sh\necho \"failing with $1\" >&2\nexit $1\n", "");
    a.start();
    let o = d.run(&["run", "web1", "fail", "--", "3"]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.starts_with("==> web1  [FAIL  exit:3  "), "{out}");
    assert!(out.contains("    STDERR: failing with 3\n"), "{out}");
}

#[test]
fn unknown_agents_are_refused_before_any_connection() {
    let d = Dispatcher::new();
    let _a = d.agent("web1");
    let o = d.run(&["run", "web1", "ghost", "echo"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("unknown agent(s): ghost"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "nothing may run when a name is unknown");
}

#[test]
fn usage_errors_are_clear_and_exit_2() {
    let d = Dispatcher::new();
    for args in [vec!["run"], vec!["run", "echo"], vec!["ping"], vec!["frobnicate"], vec!["run", "a:99999", "x"]] {
        let o = d.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty());
    }
}

#[test]
fn ping_prints_a_table_and_json() {
    let d = Dispatcher::new();
    let _a = d.agent("web1");
    let o = d.ok(&["ping", "web1"]);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("HOST                            STATUS    RTT       CERT EXPIRY"), "{out}");
    assert_eq!(lines[1], "-".repeat(85));
    assert!(lines[2].starts_with("web1 ") && lines[2].contains(" ok ") && lines[2].contains(" GMT "), "{out}");
    let o = d.ok(&["ping", "--json", "web1"]);
    let r = &results(&json(&stdout(&o)))[0];
    assert_eq!(jstr(r, "status"), "ok");
    assert_eq!(jstr(r, "staged"), "false");
    assert_eq!(jstr(r, "version"), env!("CARGO_PKG_VERSION"));
    assert!(!r.contains_key("reported_hostname"), "enrolment makes the agent report its registry name");
}

#[test]
fn fan_out_to_twenty_agents_with_one_stopped() {
    let d = Dispatcher::new();
    let mut agents: Vec<Agent> = (0..20).map(|i| d.agent(&format!("a{i:02}"))).collect();
    agents[7].stop();
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let mut argv: Vec<&str> = vec!["run", "--json"];
    argv.extend(names.iter().map(String::as_str));
    argv.extend(["echo", "--", "fan"]);
    let o = d.run(&argv);
    assert_eq!(o.status.code(), Some(1), "one host failed, so run exits 1");
    let rs = results(&json(&stdout(&o)));
    assert_eq!(rs.len(), 20);
    let reqid = jstr(&rs[0], "reqid");
    for r in &rs {
        assert_eq!(jstr(r, "reqid"), reqid, "one reqid for the whole operation");
        if jstr(r, "host") == "a07" {
            assert_eq!(jstr(r, "exit"), "-1");
            let e = jstr(r, "error");
            assert!(e.contains("did not respond on port") && e.contains("connection refused"), "{e}");
        } else {
            assert_eq!(jstr(r, "exit"), "0", "{r:?}");
            assert_eq!(jstr(r, "stdout"), "[fan]\n");
        }
    }
    // ping: the same host fails, the command says so in its exit code
    let mut pargv: Vec<&str> = vec!["ping"];
    pargv.extend(names.iter().map(String::as_str));
    let o = d.run(&pargv);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stdout(&o).lines().filter(|l| l.contains(" ok ")).count(), 19, "{}", stdout(&o));
    assert!(stdout(&o).contains("ERROR: host 'a07' did not respond"), "{}", stdout(&o));
}

#[test]
fn both_sides_log_the_same_reqid_with_user_script_args_and_exit() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let o = d.cmd(&["run", "--username", "alice", "web1", "echo", "--", "a b"]).output().unwrap();
    assert!(o.status.success());
    let disp = stderr(&o);
    let dispatch = reqids(&disp, "dispatch");
    let disp_run = reqids(&disp, "run");
    assert_eq!(dispatch.len(), 1, "{disp}");
    assert_eq!(disp_run, dispatch);
    assert!(a.wait_log(&format!("REQID={}", dispatch[0]), std::time::Duration::from_secs(5)));
    let agent_line = a.log().lines().find(|l| l.contains(": ACTION=run ")).unwrap().to_string();
    for needle in
        ["USER=alice", "SCRIPT=echo", "EXIT=0", "PEER=127.0.0.1", "DISPATCHER=test-dispatcher", r#"ARGS="[\"a b\"]""#]
    {
        assert!(agent_line.contains(needle), "{needle} missing in {agent_line}");
    }
    let disp_line = disp.lines().find(|l| l.contains(": ACTION=run ")).unwrap();
    for needle in ["USER=alice", "SCRIPT=echo", "EXIT=0", "TARGET=127.0.0.1:", r#"ARGS="[\"a b\"]""#] {
        assert!(disp_line.contains(needle), "{needle} missing in {disp_line}");
    }
    // ACTION first, then keys in byte order
    let keys: Vec<&str> = agent_line
        .split_once(": ")
        .unwrap()
        .1
        .split(' ')
        .filter_map(|w| w.split_once('=').map(|(k, _)| k))
        .filter(|k| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert_eq!(keys[0], "ACTION");
    let mut sorted = keys[1..].to_vec();
    sorted.sort();
    assert_eq!(keys[1..].to_vec(), sorted);
}

#[test]
fn list_agents_shows_the_registry() {
    let d = Dispatcher::new();
    let o = d.ok(&["list-agents"]);
    assert_eq!(stdout(&o).trim(), "No registered agents.");
    let _a = d.enroll("web1");
    let o = d.ok(&["list-agents"]);
    let out = stdout(&o);
    assert!(out.starts_with("HOSTNAME"), "{out}");
    let row = out.lines().nth(2).unwrap();
    assert!(row.starts_with("web1 ") && row.contains("127.0.0.1") && row.contains(" ip "), "{row}");
    let days: i64 = row.split_whitespace().last().unwrap().parse().unwrap();
    assert!((360..=366).contains(&days), "{row}");
    let o = d.ok(&["list-agents", "--json"]);
    let text = stdout(&o);
    assert!(text.starts_with("[{") && text.contains("\"hostname\":\"web1\""), "{text}");
    let o = d.ok(&["list-agents", "--tags", "env=prod"]);
    assert_eq!(stdout(&o).trim(), "No agents match the tag filter.");
    assert_eq!(d.run(&["list-agents", "--tags", "novalue"]).status.code(), Some(2));
}

#[test]
fn repeated_runs_resume_the_tls_session_and_keep_every_check() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let tls_of = |a: &Agent| -> Vec<String> {
        a.log()
            .lines()
            .filter(|l| l.contains(": ACTION=run "))
            .map(|l| {
                assert!(l.contains("DISPATCHER=test-dispatcher"), "the serial gate ran: {l}");
                l.split_whitespace().find_map(|w| w.strip_prefix("TLS=")).unwrap_or("?").to_string()
            })
            .collect()
    };
    d.ok(&["run", "web1", "echo"]);
    d.ok(&["run", "web1", "echo"]);
    d.ok(&["run", "web1", "echo"]);
    assert_eq!(tls_of(&a), ["full", "resumed", "resumed"]);
    // one private file per agent, in a private directory per dispatcher identity
    let dirs: Vec<_> = std::fs::read_dir(d.path().join("tls-sessions")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1);
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
    };
    assert_eq!(mode(&dirs[0]), 0o700);
    let files: Vec<_> = std::fs::read_dir(&dirs[0]).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1);
    assert_eq!(mode(&files[0]), 0o600);
    // a reload voids every ticket: the next run authenticates in full again
    a.reload();
    d.ok(&["run", "web1", "echo"]);
    d.ok(&["run", "web1", "echo"]);
    assert_eq!(tls_of(&a), ["full", "resumed", "resumed", "full", "resumed"]);
    // a corrupt cache file costs a full handshake, nothing more
    std::fs::write(&files[0], b"garbage").unwrap();
    d.ok(&["run", "web1", "echo"]);
    assert_eq!(tls_of(&a).last().map(String::as_str), Some("full"));
}

#[test]
fn the_session_cache_can_be_turned_off() {
    let d = Dispatcher::with_config("tls_session_cache = off");
    let a = d.agent("web1");
    d.ok(&["run", "web1", "echo"]);
    d.ok(&["run", "web1", "echo"]);
    assert_eq!(a.log().matches("TLS=full").count(), 2, "{}", a.log());
    assert!(!d.path().join("tls-sessions").exists());
}

#[test]
fn a_chain_of_resumptions_ends_when_the_agent_renews_its_ticket_keys() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script("echo", "#!/bin/sh\necho hi\n", "");
    a.configure("tls_ticket_lifetime = 2");
    a.start();
    // Each resumed connection brings a fresh ticket; without the renewal of
    // the ticket keys this chain would never authenticate in full again.
    for _ in 0..8 {
        d.ok(&["run", "web1", "echo"]);
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let log = a.log();
    let tls: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(": ACTION=run "))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("TLS=")))
        .collect();
    assert_eq!(tls[0], "full");
    assert_eq!(tls[1], "resumed");
    assert!(tls[2..].contains(&"full"), "no full handshake in 4 s with 2 s tickets: {tls:?}");
}
