//! The audit trail: `ACTION=` event lines and where they go.
//!
//! Every event is one line: `ACTION=<action>` first, then the other keys in
//! byte order, each `KEY=value`. A value that is empty prints as `KEY=`; a
//! value containing whitespace, a quote, a backslash or a control character is
//! wrapped in double quotes with `\\`, `\"`, `\n`, `\t` and `\xNN` escapes, so a
//! hostile argument cannot forge a second key or a second line. Tokens are
//! never logged; script output is never logged.
//!
//! Lines go through the `log` facade to our own RFC 3164 backend rather than
//! the `syslog` crate: that crate stamps UTC, never reconnects after syslogd
//! restarts (silently losing audit lines) and names every role after the
//! binary. Ours sends each line with `send_to` on an unbound datagram socket,
//! so a re-created `/dev/log` is picked up by construction; uses local time;
//! facility daemon; the role's own ident; and falls back to stderr (prefixed
//! with the ident) when no syslog socket answers.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::config::LogTarget;

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Normal operation (`info`).
    Info,
    /// Something was refused or looks wrong (`warning`).
    Warning,
    /// Something failed (`err`).
    Err,
}

const MAX_VALUE: usize = 2048;

fn push_value(out: &mut String, v: &str) {
    let v = if v.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        &v[..end]
    } else {
        v
    };
    let needs_quotes = v.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\' || c.is_control());
    if !needs_quotes {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Format one event line (without ident or syslog header).
pub fn format_line(action: &str, fields: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = fields.iter().collect();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut out = String::with_capacity(64 + fields.len() * 24);
    out.push_str("ACTION=");
    push_value(&mut out, action);
    for (k, v) in sorted {
        out.push(' ');
        out.push_str(k);
        out.push('=');
        push_value(&mut out, v);
    }
    out
}

/// Emit one event.
pub fn event(level: Level, action: &str, fields: &[(&str, &str)]) {
    let line = format_line(action, fields);
    let lvl = match level {
        Level::Info => log::Level::Info,
        Level::Warning => log::Level::Warn,
        Level::Err => log::Level::Error,
    };
    log::log!(lvl, "{line}");
}

/// Shorthand for an info event.
pub fn info(action: &str, fields: &[(&str, &str)]) {
    event(Level::Info, action, fields)
}

/// Shorthand for a warning event.
pub fn warn(action: &str, fields: &[(&str, &str)]) {
    event(Level::Warning, action, fields)
}

/// Shorthand for an error event.
pub fn err(action: &str, fields: &[(&str, &str)]) {
    event(Level::Err, action, fields)
}

struct Sink {
    ident: &'static str,
    socket: Option<(PathBuf, Mutex<Option<UnixDatagram>>)>,
}

impl Sink {
    fn to_stderr(&self, line: &str) {
        // One write per line: stderr is unbuffered, and lines of processes
        // sharing a log file must not interleave.
        let _ = std::io::stderr().lock().write_all(format!("{}: {}\n", self.ident, line).as_bytes());
    }

    fn to_syslog(&self, path: &PathBuf, sock: &Mutex<Option<UnixDatagram>>, sev: u8, line: &str) -> bool {
        const DAEMON: u8 = 3;
        let msg = format!(
            "<{}>{} {}[{}]: {}",
            (DAEMON << 3) | sev,
            crate::time::syslog_stamp(),
            self.ident,
            std::process::id(),
            line
        );
        let mut guard = match sock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if guard.is_none() {
            *guard = UnixDatagram::unbound().ok();
        }
        match guard.as_ref() {
            Some(s) => s.send_to(msg.as_bytes(), path).is_ok(),
            None => false,
        }
    }
}

impl log::Log for Sink {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = record.args().to_string();
        let sev = match record.level() {
            log::Level::Error => 3,
            log::Level::Warn => 4,
            _ => 6,
        };
        match &self.socket {
            Some((path, sock)) if self.to_syslog(path, sock, sev, &line) => {}
            _ => self.to_stderr(&line),
        }
    }

    fn flush(&self) {}
}

/// Install the process-wide audit sink. Later calls are ignored.
pub fn init(ident: &'static str, target: &LogTarget) {
    let socket = match target {
        LogTarget::Syslog(p) => Some((p.clone(), Mutex::new(None))),
        LogTarget::Stderr => None,
    };
    if log::set_boxed_logger(Box::new(Sink { ident, socket })).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_first_then_sorted() {
        let l = format_line("run", &[("SCRIPT", "echo"), ("EXIT", "0"), ("REQID", "ab"), ("DISPATCHER", "")]);
        assert_eq!(l, "ACTION=run DISPATCHER= EXIT=0 REQID=ab SCRIPT=echo");
    }

    #[test]
    fn hostile_values_are_quoted_and_escaped() {
        let l = format_line("run", &[("ARGS", "a b\" EXIT=0\nACTION=x"), ("E", "x\\y")]);
        assert_eq!(l, r#"ACTION=run ARGS="a b\" EXIT=0\nACTION=x" E="x\\y""#);
        assert!(!l.contains('\n'));
    }

    proptest::proptest! {
        #[test]
        fn one_line_always(v in "(?s).{0,200}") {
            let l = format_line("x", &[("V", &v)]);
            proptest::prop_assert!(!l.contains('\n') && !l.contains('\r'));
            proptest::prop_assert!(l.starts_with("ACTION=x V="));
        }
    }

    #[test]
    fn syslog_datagram_format() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("log.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let sink = Sink { ident: "ctrl-exec-agent", socket: Some((path.clone(), Mutex::new(None))) };
        assert!(sink.to_syslog(&path, sink.socket.as_ref().map(|s| &s.1).unwrap(), 4, "ACTION=deny X=1"));
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).unwrap();
        let msg = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(msg.starts_with("<28>"), "{msg}");
        assert!(msg.contains(&format!(" ctrl-exec-agent[{}]: ACTION=deny X=1", std::process::id())), "{msg}");
        // re-created socket (a syslogd restart) is picked up without reconnecting
        drop(rx);
        std::fs::remove_file(&path).unwrap();
        let rx = UnixDatagram::bind(&path).unwrap();
        assert!(sink.to_syslog(&path, sink.socket.as_ref().map(|s| &s.1).unwrap(), 6, "ACTION=ping"));
        let n = rx.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("<30>"));
    }
}
