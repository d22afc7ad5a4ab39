//! Offline pairing through a pseudo-terminal: the agent's request and the
//! CA's reply cross a "console" (a pty pair, with the CRLF line ends and
//! interleaved messages a real one has), a line is lost on the way, the
//! step is repeated, and the agent ends up serving runs. The CA's
//! confirmation prompt is answered on its controlling terminal.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Run `cmd` with stdout and stderr on a console (pty) and return what the
/// console showed, with the exit code.
fn on_console(mut cmd: Command) -> (i32, String) {
    let (mut master, slave) = pty();
    let child =
        cmd.stdin(Stdio::null()).stdout(slave.try_clone().unwrap()).stderr(slave.try_clone().unwrap()).spawn().unwrap();
    // Every copy of the slave must close for the master to see the end.
    drop((slave, cmd));
    let out = child.wait_with_output().unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // After the last writer closes, the master reads the rest, then EIO.
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
    }
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&text).into_owned())
}

/// Run `cmd` feeding `input` on stdin.
fn with_stdin(mut cmd: Command, input: &str) -> std::process::Output {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// The text with one line removed: the first line containing `needle`
/// after the line containing `after`.
fn drop_line(text: &str, after: &str, skip: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.contains(after)).unwrap();
    let gone = start + skip;
    lines.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, l)| *l).collect::<Vec<_>>().join("\r\n")
}

fn agent_cmd(d: &Dispatcher, name: &str, args: &[&str]) -> Command {
    let dir = d.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = Command::new(bin());
    c.arg("agent").args(args).args(["--config", dir.join("agent.conf").to_str().unwrap(), "--log-stderr"]);
    c
}

fn request_cmd(d: &Dispatcher, name: &str, port: u16) -> Command {
    agent_cmd(
        d,
        name,
        &[
            "request-pairing",
            "--offline",
            "--name",
            name,
            "--key-type",
            "ec256",
            "--lookup-by",
            "ip",
            "--agent-port",
            &port.to_string(),
        ],
    )
}

#[test]
fn offline_round_trip_over_a_console_with_a_lost_line() {
    let d = Dispatcher::new();
    let port = free_port();
    // 1. The agent prints its request on the console.
    let (rc, console) = on_console(request_cmd(&d, "edge-9", port));
    assert_eq!(rc, 0, "{console}");
    assert!(console.contains("\r\n"), "a console turns LF into CRLF");
    let code = console.lines().find_map(|l| l.trim().strip_prefix("Pairing code: ")).unwrap().to_string();
    // 2. A line of the CSR is lost on the way: nothing is signed.
    let damaged = drop_line(&console, "BEGIN CERTIFICATE REQUEST", 2);
    let o = with_stdin(d.cmd(&["sign", "--yes", "--ip", "127.0.0.1"]), &damaged);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
    assert!(!d.path().join("agents/edge-9.json").exists(), "nothing registered");
    // 3. The agent is asked again: the same request (same key, same code).
    let (rc, again) = on_console(request_cmd(&d, "edge-9", port));
    assert_eq!(rc, 0);
    assert!(again.contains("still waiting") && again.contains(&code), "{again}");
    let block = |t: &str| -> String {
        let lines: Vec<&str> = t.lines().map(|l| l.trim_end()).collect();
        let b = lines.iter().position(|l| l.contains("BEGIN CTRL-EXEC")).unwrap();
        let e = lines.iter().position(|l| l.contains("END CTRL-EXEC")).unwrap();
        lines[b..=e].join("\n")
    };
    assert_eq!(block(&console), block(&again));
    let o = with_stdin(d.cmd(&["sign", "--yes", "--ip", "127.0.0.1"]), &again);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&code), "the CA shows the same code: {}", stderr(&o));
    let reply = stdout(&o);
    let rec = json(&std::fs::read_to_string(d.path().join("agents/edge-9.json")).unwrap());
    assert_eq!((jstr(&rec, "lookup_by"), jstr(&rec, "port")), ("ip".to_string(), port.to_string()));
    // Signing the same request again gives the same reply, not a second certificate.
    let o = with_stdin(d.cmd(&["sign", "--yes"]), &again);
    assert!(o.status.success());
    assert_eq!(stdout(&o), reply);
    assert!(stderr(&o).contains("signed before"));
    // 4. The reply crosses the console back; a line is lost: nothing installed.
    let (rc, shown) = on_console({
        let mut c = Command::new("cat");
        c.arg(d.path().join("reply.txt"));
        std::fs::write(d.path().join("reply.txt"), &reply).unwrap();
        c
    });
    assert_eq!(rc, 0);
    let damaged = drop_line(&shown, "BEGIN CERTIFICATE", 3);
    let o = with_stdin(agent_cmd(&d, "edge-9", &["install-reply"]), &damaged);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("damaged"), "{}", stderr(&o));
    assert!(!d.path().join("edge-9/agent.crt").exists(), "nothing installed");
    // 5. Repeated whole: installed; repeated again: nothing changes.
    let o = with_stdin(agent_cmd(&d, "edge-9", &["install-reply"]), &shown);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Pairing complete"));
    let crt = std::fs::read(d.path().join("edge-9/agent.crt")).unwrap();
    let o = with_stdin(agent_cmd(&d, "edge-9", &["install-reply"]), &shown);
    assert!(o.status.success() && stdout(&o).contains("already installed"), "{}", stdout(&o));
    assert_eq!(std::fs::read(d.path().join("edge-9/agent.crt")).unwrap(), crt);
    assert!(!d.path().join("edge-9/pairing-request.key").exists(), "the pending key is gone once installed");
    // 6. The agent serves runs.
    let dir = d.path().join("edge-9");
    let mut a = Agent { dir: dir.clone(), port, name: "edge-9".into(), child: None };
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    a.script("hello", "#!/bin/sh\necho hello \"$1\"\n", "");
    a.start();
    let o = d.ok(&["run", "edge-9", "hello", "--", "console"]);
    assert!(stdout(&o).contains("hello console"), "{}", stdout(&o));
    // A reply for another request is refused, with or without a pending one.
    let (_, other) = on_console(request_cmd(&d, "edge-10", free_port()));
    let o = with_stdin(d.cmd(&["sign", "--yes", "--ip", "127.0.0.1"]), &other);
    assert!(o.status.success(), "{}", stderr(&o));
    let reply10 = stdout(&o);
    let o = with_stdin(agent_cmd(&d, "edge-11", &["install-reply"]), &reply10);
    assert!(!o.status.success() && stderr(&o).contains("no pending pairing request"), "{}", stderr(&o));
    on_console(request_cmd(&d, "edge-12", free_port()));
    let o = with_stdin(agent_cmd(&d, "edge-12", &["install-reply"]), &reply10);
    assert!(!o.status.success() && stderr(&o).contains("answers a different request"), "{}", stderr(&o));
    assert!(!d.path().join("edge-12/agent.crt").exists());
    // --force starts over with a new key and code.
    let (_, first) = on_console(request_cmd(&d, "edge-12", free_port()));
    let mut c = request_cmd(&d, "edge-12", free_port());
    c.arg("--force");
    let (_, fresh) = on_console(c);
    assert!(fresh.contains("Discarding"), "{fresh}");
    assert_ne!(block(&first), block(&fresh));
    // Reached by address but no address given: refused before signing.
    let o = with_stdin(d.cmd(&["sign", "--yes"]), &fresh);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--ip"), "{}", stderr(&o));
    assert!(!d.path().join("agents/edge-12.json").exists());
}

#[test]
fn the_ca_asks_on_its_terminal_before_signing() {
    let d = Dispatcher::new();
    let (_, request) = on_console(request_cmd(&d, "asked-1", free_port()));
    for (answer, signed) in [("n", false), ("y", true)] {
        let (mut master, slave) = pty();
        let slave_fd = slave.as_raw_fd();
        let mut cmd = d.cmd(&["sign", "--ip", "127.0.0.1"]);
        // SAFETY: in the child, between fork and exec: a new session whose
        // controlling terminal is the pty (async-signal-safe calls only).
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                libc::ioctl(slave_fd, libc::TIOCSCTTY as _, 0);
                Ok(())
            });
        }
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        drop((slave, cmd));
        child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
        // Wait for the question on the terminal, then answer it there.
        let mut seen = Vec::new();
        let t = Instant::now();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("[y/N]") {
            assert!(t.elapsed() < Duration::from_secs(20), "no prompt: {}", String::from_utf8_lossy(&seen));
            let n = master.read(&mut buf).unwrap();
            seen.extend_from_slice(&buf[..n]);
        }
        let prompt = String::from_utf8_lossy(&seen).into_owned();
        assert!(prompt.contains("asked-1") && prompt.contains("Code:"), "{prompt}");
        master.write_all(format!("{answer}\n").as_bytes()).unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!(o.status.success(), signed, "{}", stderr(&o));
        assert_eq!(d.path().join("agents/asked-1.json").exists(), signed);
        assert_eq!(stdout(&o).contains("BEGIN CTRL-EXEC PAIRING REPLY"), signed);
    }
    // Without a terminal and without --yes, nothing is signed.
    let (_, req2) = on_console(request_cmd(&d, "asked-2", free_port()));
    let mut cmd = d.cmd(&["sign", "--ip", "127.0.0.1"]);
    // SAFETY: setsid between fork and exec: no controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let o = with_stdin(cmd, &req2);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--yes"), "{}", stderr(&o));
    assert!(!d.path().join("agents/asked-2.json").exists());
}
