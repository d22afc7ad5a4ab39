//! The auth hook: ctrl-exec's only policy engine, shared by both sides.
//!
//! A hook is any executable. It is run directly (no shell, no arguments)
//! with the request context as one JSON object on stdin and as `ENVEXEC_*`
//! variables on top of the caller's environment; its output is discarded. It
//! answers with its exit status: 0 allow, 1 deny, 2 bad credentials, 3
//! insufficient privilege, anything else "hook exited N". A hook that does not
//! finish within its timeout is killed with its whole process group and the
//! request is denied. A configured hook that is missing or not executable
//! denies everything (fail closed).
//!
//! Every decision is logged as an `auth` event (the token never is).

use std::path::Path;
use std::time::Duration;

use miniserde::json::Value;

use crate::audit;
use crate::wire::{Obj, str_array};

/// Everything a hook is told about a request.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// `run`, `ping`, `discovery`, …
    pub action: String,
    /// Script name (empty for non-run actions).
    pub script: String,
    /// Target hosts as typed (dispatcher side).
    pub hosts: Vec<String>,
    /// Script arguments.
    pub args: Vec<String>,
    /// Advisory identity.
    pub username: String,
    /// Opaque credential (never logged).
    pub token: String,
    /// Caller address (`127.0.0.1` for the CLI).
    pub source_ip: String,
    /// Agent side: the calling dispatcher's id.
    pub dispatcher: String,
    /// Agent side: the caller's certificate serial as read from TLS.
    pub dispatcher_serial: String,
    /// Request id.
    pub reqid: String,
    /// API gate: the request path (`/run`, `/status/…`).
    pub path: String,
    /// `status` action: who submitted the run (`username`, `source_ip`).
    pub submitter: Option<(String, String)>,
}

impl Context {
    /// The stdin JSON.
    pub fn to_json(&self, timestamp: &str) -> String {
        Obj::new()
            .s("action", &self.action)
            .s("script", &self.script)
            .v("hosts", str_array(&self.hosts))
            .v("args", str_array(&self.args))
            .s("username", &self.username)
            .s("token", &self.token)
            .s("source_ip", &self.source_ip)
            .s("dispatcher", &self.dispatcher)
            .s("dispatcher_serial", &self.dispatcher_serial)
            .s("reqid", &self.reqid)
            .s("path", &self.path)
            .v(
                "submitter",
                match &self.submitter {
                    Some((u, ip)) => Obj::new().s("username", u).s("source_ip", ip).into_value(),
                    None => Value::Null,
                },
            )
            .s("timestamp", timestamp)
            .to_json()
    }

    /// The `ENVEXEC_*` variables.
    pub fn env(&self, timestamp: &str) -> Vec<(String, String)> {
        let args_json = miniserde::json::to_string(&str_array(&self.args));
        [
            ("ENVEXEC_ACTION", self.action.clone()),
            ("ENVEXEC_SCRIPT", self.script.clone()),
            ("ENVEXEC_HOSTS", self.hosts.join(",")),
            ("ENVEXEC_ARGS", self.args.join(" ")),
            ("ENVEXEC_ARGS_JSON", args_json),
            ("ENVEXEC_USERNAME", self.username.clone()),
            ("ENVEXEC_TOKEN", self.token.clone()),
            ("ENVEXEC_SOURCE_IP", self.source_ip.clone()),
            ("ENVEXEC_DISPATCHER", self.dispatcher.clone()),
            ("ENVEXEC_DISPATCHER_SERIAL", self.dispatcher_serial.clone()),
            ("ENVEXEC_REQID", self.reqid.clone()),
            ("ENVEXEC_PATH", self.path.clone()),
            ("ENVEXEC_SUBMITTER", self.submitter.as_ref().map(|s| s.0.clone()).unwrap_or_default()),
            ("ENVEXEC_SUBMITTER_IP", self.submitter.as_ref().map(|s| s.1.clone()).unwrap_or_default()),
            ("ENVEXEC_TIMESTAMP", timestamp.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.replace('\0', "")))
        .collect()
    }
}

/// A hook's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refused, with the code (1-3 or the hook's exit) and its reason text.
    Deny {
        /// Denial code (the hook's exit status, or 1).
        code: i32,
        /// `denied`, `bad credentials`, `insufficient privilege`, `hook exited N`, …
        reason: String,
    },
}

/// What to do when no hook is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoHook {
    /// Dispatcher CLI: pass and log `REASON=no-hook-cli` (Unix permissions gate the CLI).
    CliPass,
    /// Agent: pass silently (mTLS, the serial map and the allowlist gate it).
    AgentPass,
    /// API with `api_auth_default = allow`: pass, log `REASON=no-hook-allow`.
    ApiAllow,
    /// API with `api_auth_default = deny`: deny (code 1), log `REASON=no-hook-deny`.
    ApiDeny,
}

/// Reason text for a hook exit status.
pub fn reason_for(code: i32) -> String {
    match code {
        1 => "denied".into(),
        2 => "bad credentials".into(),
        3 => "insufficient privilege".into(),
        n => format!("hook exited {n}"),
    }
}

fn log_decision(ctx: &Context, result: &str, level: audit::Level, extra: &[(&str, &str)]) {
    let user = if ctx.username.is_empty() { "(none)" } else { ctx.username.as_str() };
    let mut fields = vec![
        ("RESULT", result),
        ("AUTHACTION", ctx.action.as_str()),
        ("USER", user),
        ("IP", ctx.source_ip.as_str()),
        ("DISPATCHER", ctx.dispatcher.as_str()),
    ];
    fields.extend_from_slice(extra);
    audit::event(level, "auth", &fields);
}

/// Ask the hook (if any) whether this request may proceed.
pub async fn authorize(hook: Option<&Path>, timeout: Duration, ctx: &Context, no_hook: NoHook) -> Decision {
    let Some(path) = hook else {
        match no_hook {
            NoHook::CliPass => log_decision(ctx, "pass", audit::Level::Info, &[("REASON", "no-hook-cli")]),
            NoHook::AgentPass => {}
            NoHook::ApiAllow => log_decision(ctx, "pass", audit::Level::Info, &[("REASON", "no-hook-allow")]),
            NoHook::ApiDeny => {
                log_decision(ctx, "deny", audit::Level::Warning, &[("REASON", "no-hook-deny")]);
                return Decision::Deny { code: 1, reason: "no auth hook configured".into() };
            }
        }
        return Decision::Allow;
    };
    if !crate::fsutil::is_executable(path) {
        let p = path.display().to_string();
        audit::err("auth", &[("RESULT", "error"), ("REASON", "hook-not-executable"), ("HOOK", &p)]);
        return Decision::Deny { code: 1, reason: format!("auth hook not found or not executable: {p}") };
    }
    let ts = crate::time::now_iso();
    let spec = crate::exec::Spec {
        stdin_timeout: timeout,
        max_output: 0,
        timeout: Some(timeout),
        inherit_env: true,
        env: ctx.env(&ts),
        ..crate::exec::Spec::new(path.to_path_buf(), vec![], ctx.to_json(&ts).into_bytes())
    };
    let out = crate::exec::run(&spec).await;
    if out.timed_out {
        audit::warn("auth-hook-timeout", &[("TIMEOUT", &timeout.as_secs().to_string())]);
        let reason = format!("auth hook timed out after {}s", timeout.as_secs());
        log_decision(ctx, "deny", audit::Level::Warning, &[("REASON", &reason)]);
        return Decision::Deny { code: 1, reason };
    }
    match out.exit {
        0 => {
            log_decision(ctx, "pass", audit::Level::Info, &[]);
            Decision::Allow
        }
        code => {
            // -1/127: the hook could not be run at all; deny generically.
            let code = if code < 0 || code == 127 { 1 } else { code };
            let reason = reason_for(code);
            log_decision(ctx, "deny", audit::Level::Warning, &[("REASON", &reason)]);
            Decision::Deny { code, reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_json_and_env() {
        let ctx = Context {
            action: "run".into(),
            script: "echo".into(),
            hosts: vec!["a".into(), "b".into()],
            args: vec!["x y".into(), "\"q\"".into()],
            ..Context::default()
        };
        let j = crate::wire::parse_object(&ctx.to_json("T")).unwrap();
        assert_eq!(crate::wire::get_str_array(&j, "args").unwrap().unwrap(), vec!["x y", "\"q\""]);
        assert!(matches!(j.get("submitter"), Some(Value::Null)));
        let env: std::collections::HashMap<_, _> = ctx.env("T").into_iter().collect();
        assert_eq!(env["ENVEXEC_HOSTS"], "a,b");
        assert_eq!(env["ENVEXEC_ARGS_JSON"], r#"["x y","\"q\""]"#);
    }

    fn hook(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hook");
        crate::exec::write_script(&p, &format!("#!/bin/sh\n{body}\n"));
        (d, p)
    }

    #[test]
    fn exit_codes_table() {
        let ctx = Context { action: "run".into(), ..Context::default() };
        for (body, want) in [
            ("exit 0", Decision::Allow),
            ("exit 1", Decision::Deny { code: 1, reason: "denied".into() }),
            ("exit 2", Decision::Deny { code: 2, reason: "bad credentials".into() }),
            ("exit 3", Decision::Deny { code: 3, reason: "insufficient privilege".into() }),
            ("exit 9", Decision::Deny { code: 9, reason: "hook exited 9".into() }),
            ("[ \"$ENVEXEC_ACTION\" = run ] && grep -q '\"action\":\"run\"'", Decision::Allow),
        ] {
            let (_d, p) = hook(body);
            let got = smol::block_on(authorize(Some(&p), Duration::from_secs(5), &ctx, NoHook::AgentPass));
            assert_eq!(got, want, "{body}");
        }
    }

    #[test]
    fn timeout_and_missing_deny() {
        let ctx = Context::default();
        let (_d, p) = hook("sleep 30");
        let t = std::time::Instant::now();
        let got = smol::block_on(authorize(Some(&p), Duration::from_millis(300), &ctx, NoHook::AgentPass));
        assert!(matches!(got, Decision::Deny { code: 1, .. }));
        assert!(t.elapsed() < Duration::from_secs(5));
        let got = smol::block_on(authorize(
            Some(Path::new("/nonexistent/hook")),
            Duration::from_secs(1),
            &ctx,
            NoHook::AgentPass,
        ));
        assert!(matches!(got, Decision::Deny { code: 1, ref reason } if reason.contains("not executable")));
        assert_eq!(smol::block_on(authorize(None, Duration::from_secs(1), &ctx, NoHook::AgentPass)), Decision::Allow);
    }
}
