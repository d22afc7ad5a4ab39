//! The auth hook on both sides: allow, each denial code, timeouts, a missing
//! hook, and the token travelling CLI → dispatcher hook → agent hook → script.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn hook(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    write_exec(&p, &format!("#!/bin/sh\n{body}\n"));
    p
}

#[test]
fn dispatcher_hook_allows_denies_and_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let seen = tmp.path().join("seen.json");
    let h = hook(
        tmp.path(),
        "hook",
        &format!(
            "cat > {}\necho >> {0}\nenv | grep ^ENVEXEC_ >> {}\nexit \"$(cat {}/code)\"",
            seen.display(),
            seen.display(),
            tmp.path().display()
        ),
    );
    let d = Dispatcher::with_config(&format!("auth_hook = {}\nauth_hook_timeout = 1", h.display()));
    let _a = d.agent("web1");
    let code = tmp.path().join("code");
    for (c, reason) in [(1, "denied"), (2, "bad credentials"), (3, "insufficient privilege"), (7, "hook exited 7")] {
        std::fs::write(&code, c.to_string()).unwrap();
        let o = d.run(&["run", "web1", "echo"]);
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(
            stderr(&o).lines().find(|l| l.starts_with("Denied")).unwrap_or(""),
            format!("Denied: {reason}"),
            "{}",
            stderr(&o)
        );
        assert!(stdout(&o).is_empty(), "nothing was dispatched");
        let o = d.run(&["run", "--json", "web1", "echo"]);
        let doc = json(&stdout(&o));
        assert_eq!(jstr(&doc, "ok"), "false");
        assert_eq!(jstr(&doc, "code"), c.to_string());
        assert_eq!(jstr(&doc, "error"), reason);
    }
    std::fs::write(&code, "0").unwrap();
    let o =
        d.cmd(&["run", "--username", "carol", "--token", "tkn", "web1", "echo", "--", "a", "b c"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&seen).unwrap();
    let ctx = json(text.lines().next().unwrap());
    assert_eq!(jstr(&ctx, "action"), "run");
    assert_eq!(jstr(&ctx, "script"), "echo");
    assert_eq!(jstr(&ctx, "hosts"), r#"["web1"]"#);
    assert_eq!(jstr(&ctx, "args"), r#"["a","b c"]"#);
    assert_eq!(jstr(&ctx, "username"), "carol");
    assert_eq!(jstr(&ctx, "token"), "tkn");
    assert_eq!(jstr(&ctx, "source_ip"), "127.0.0.1");
    assert!(
        text.contains("ENVEXEC_ACTION=run")
            && text.contains("ENVEXEC_ARGS_JSON=[\"a\",\"b c\"]")
            && text.contains("ENVEXEC_HOSTS=web1")
    );
    assert!(stderr(&o).contains("ACTION=auth AUTHACTION=run") && stderr(&o).contains("RESULT=pass"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("tkn"), "the token is never logged");
    // ping goes through the hook with its own action
    std::fs::write(&code, "0").unwrap();
    d.ok(&["ping", "web1"]);
    assert!(std::fs::read_to_string(&seen).unwrap().contains("\"action\":\"ping\""));
    // a hook that hangs is killed and the request denied
    let slow = hook(tmp.path(), "hook", "sleep 30");
    let _ = slow;
    let t = Instant::now();
    let o = d.run(&["run", "web1", "echo"]);
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Denied: auth hook timed out after 1s"), "{}", stderr(&o));
    assert!(stderr(&o).contains("ACTION=auth-hook-timeout TIMEOUT=1"), "{}", stderr(&o));
}

#[test]
fn a_missing_dispatcher_hook_denies_everything() {
    let d = Dispatcher::with_config("auth_hook = /nonexistent/hook");
    let _a = d.agent("web1");
    let o = d.run(&["run", "web1", "echo"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Denied: auth hook not found or not executable: /nonexistent/hook"), "{}", stderr(&o));
    assert!(stderr(&o).contains("RESULT=error"));
}

#[test]
fn agent_hook_sees_the_dispatcher_and_the_forwarded_token() {
    let d = Dispatcher::new();
    let mut a = d.enroll("web1");
    a.script("echo", "#!/bin/sh\necho ran\n", "");
    let seen = a.dir.join("seen");
    // allow only the token "let-me-in"
    let h = hook(
        &a.dir,
        "agent-hook",
        &format!(
            "cat > {s}\necho >> {s}\nenv | grep ^ENVEXEC_ >> {s}\n[ \"$ENVEXEC_TOKEN\" = let-me-in ] || exit 3",
            s = seen.display()
        ),
    );
    a.configure(&format!("auth_hook = {}", h.display()));
    a.start();
    let o = d.cmd(&["run", "--json", "web1", "echo"]).env("ENVEXEC_TOKEN", "wrong").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let r = &results(&json(&stdout(&o)))[0];
    assert_eq!(jstr(r, "error"), "not authorised: insufficient privilege");
    assert!(a.log().contains("ACTION=deny") && a.log().contains("REASON=\"insufficient privilege\""), "{}", a.log());
    let o = d.cmd(&["run", "--json", "web1", "echo"]).env("ENVEXEC_TOKEN", "let-me-in").output().unwrap();
    assert!(o.status.success());
    assert_eq!(jstr(&results(&json(&stdout(&o)))[0], "stdout"), "ran\n");
    let text = std::fs::read_to_string(&seen).unwrap();
    let ctx = json(text.lines().next().unwrap());
    assert_eq!(jstr(&ctx, "dispatcher"), "test-dispatcher");
    assert_eq!(jstr(&ctx, "dispatcher_serial"), "02");
    assert_eq!(jstr(&ctx, "hosts"), "[]");
    assert!(text.contains("ENVEXEC_DISPATCHER=test-dispatcher"));
}

#[test]
fn an_agent_with_an_unusable_hook_refuses_to_start() {
    let d = Dispatcher::new();
    let a = d.enroll("web1");
    a.configure("auth_hook = /nonexistent/agent-hook");
    let o = std::process::Command::new(bin())
        .args(["agent", "serve", "--log-stderr", "--config", a.conf().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78));
    assert!(
        stderr(&o).contains("auth_hook /nonexistent/agent-hook does not exist or is not executable"),
        "{}",
        stderr(&o)
    );
}
