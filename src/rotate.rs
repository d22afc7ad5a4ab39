//! The agent's `POST /rotate-serial` (wire.md §2.8, behaviour.md §3.10).
//!
//! A trusted dispatcher tells the agent to trust another serial of its own
//! (`add`, during a dispatcher certificate rotation) or to stop trusting one
//! (`remove`, when the previous serial is retired). The dispatcher identity
//! is never read from the body: it is the id the caller's own, already
//! trusted serial maps to. A dispatcher may therefore only add serials for
//! itself, and only remove serials that are its own; a serial that belongs
//! to another dispatcher is refused either way (upstream would let `add`
//! re-attribute it, which would hand one dispatcher another's run history).
//!
//! The map file on disk is the source of truth: it is read, changed and
//! written back atomically with no await point in between (the agent serves
//! every connection on one thread, so two rotations cannot interleave). Then
//! the listener is told to reload: [`reload_generation`] moves on, which the
//! accept loop checks before it hands the next connection a snapshot (so the
//! dispatcher's very next connection already meets the new map), and SIGHUP
//! is raised on the agent itself when the listener asked for it
//! ([`reload_by_signal`]), which runs the ordinary reload at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::audit;
use crate::hook::{self, Decision, NoHook};
use crate::http;
use crate::server::{AgentState, Peer, Reply, gate};
use crate::trust::TrustedMap;
use crate::wire::{Obj, canonical_serial, get_str, parse_object};

static GENERATION: AtomicUsize = AtomicUsize::new(0);
static SIGNAL: AtomicBool = AtomicBool::new(false);

/// Moves on every time `/rotate-serial` changed the trusted map on disk.
pub fn reload_generation() -> usize {
    GENERATION.load(Ordering::SeqCst)
}

/// Called by a listener that reloads on SIGHUP: after a change, raise SIGHUP
/// on this process too (never done otherwise, since without a handler the
/// signal would end the process).
pub fn reload_by_signal() {
    SIGNAL.store(true, Ordering::SeqCst);
}

fn request_reload() {
    GENERATION.fetch_add(1, Ordering::SeqCst);
    if SIGNAL.load(Ordering::SeqCst) {
        // SAFETY: signalling our own process, whose SIGHUP handler is installed.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGHUP);
        }
    }
}

fn status_error(msg: &str) -> Reply {
    Reply { code: 200, body: Obj::new().s("status", "error").s("error", msg).to_json() }
}

/// What a valid request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Trust the serial for the caller's dispatcher id.
    Add,
    /// Stop trusting one of the caller's serials.
    Remove,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
        }
    }
}

/// Apply `action` for `dispatcher` to `map`: `Ok(true)` if it changed,
/// `Err` (the reply's error text) if the serial belongs to someone else.
pub fn apply(map: &mut TrustedMap, action: Action, serial: &str, dispatcher: &str) -> Result<bool, String> {
    match (action, map.lookup(serial)) {
        (_, Some(owner)) if owner != dispatcher => Err(format!("serial not owned by '{dispatcher}'")),
        (Action::Add, Some(_)) => Ok(false),
        (Action::Add, None) => {
            map.0.insert(serial.to_string(), dispatcher.to_string());
            Ok(true)
        }
        (Action::Remove, Some(_)) => {
            map.0.remove(serial);
            Ok(true)
        }
        (Action::Remove, None) => Ok(false),
    }
}

/// `POST /rotate-serial`.
pub async fn rotate_serial(req: &http::Request, peer: &Peer, state: &AgentState) -> Reply {
    let dispatcher = match gate(peer, state, "") {
        Ok(d) => d.to_string(),
        Err(r) => return r,
    };
    let body = parse_object(&String::from_utf8_lossy(&req.body)).unwrap_or_default();
    let raw_serial = get_str(&body, "serial").unwrap_or_default();
    if raw_serial.trim().is_empty() {
        return status_error("serial required");
    }
    let action = match get_str(&body, "action").as_deref() {
        None | Some("add") => Action::Add,
        Some("remove") => Action::Remove,
        Some(other) => return status_error(&format!("invalid action '{other}'")),
    };
    let peer_ip = peer.ip.to_string();
    let ctx = hook::Context {
        action: "rotate".into(),
        args: vec![action.name().to_string(), raw_serial.clone()],
        token: get_str(&body, "token").unwrap_or_default(),
        source_ip: peer_ip.clone(),
        dispatcher: dispatcher.clone(),
        dispatcher_serial: peer.serial_raw.clone(),
        ..Default::default()
    };
    if let Decision::Deny { reason, .. } =
        hook::authorize(state.config.auth_hook.as_deref(), state.config.auth_hook_timeout, &ctx, NoHook::AgentPass)
            .await
    {
        audit::warn("rotate-deny", &[("DISPATCHER", &dispatcher), ("PEER", &peer_ip), ("REASON", &reason)]);
        return Reply { code: 403, body: Obj::new().s("error", format!("not authorised: {reason}")).to_json() };
    }
    let Some(serial) = canonical_serial(&raw_serial) else {
        return status_error(&format!("invalid serial '{raw_serial}' (expected a hex certificate serial)"));
    };
    let path = &state.config.trusted_dispatchers_path;
    let fail = |error: String| {
        audit::err("rotate-fail", &[("DISPATCHER", &dispatcher), ("PEER", &peer_ip), ("ERROR", &error)]);
        status_error(&error)
    };
    // From here to the write there is no await: nothing else runs in between.
    let mut map = match TrustedMap::load(path) {
        Ok(l) => l.value,
        Err(e) => return fail(format!("cannot read the trusted-dispatcher map {}: {e}", path.display())),
    };
    let changed = match apply(&mut map, action, &serial, &dispatcher) {
        Ok(c) => c,
        Err(e) => {
            audit::warn("rotate-deny", &[("DISPATCHER", &dispatcher), ("PEER", &peer_ip), ("REASON", &e)]);
            return status_error(&e);
        }
    };
    if changed {
        if let Err(e) = map.save(path) {
            return fail(format!(
                "{e}; the trusted-dispatcher map must be writable by the agent (set trusted_dispatchers_path to a file in its state directory, e.g. /var/lib/ctrl-exec-agent/ctrl-exec-dispatchers)"
            ));
        }
        request_reload();
    }
    audit::info(
        "rotate",
        &[("DISPATCHER", &dispatcher), ("PEER", &peer_ip), ("SERIAL", &serial), ("SERIAL_ACTION", action.name())],
    );
    Reply {
        code: 200,
        body: Obj::new()
            .s("status", "ok")
            .s("action", action.name())
            .s("serial", &serial)
            .s("dispatcher", &dispatcher)
            .to_json(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_remove_only_own_serials() {
        let mut m = TrustedMap::default();
        m.0.insert("2".into(), "d1".into());
        m.0.insert("7".into(), "other".into());
        assert_eq!(apply(&mut m, Action::Add, "6", "d1"), Ok(true));
        assert_eq!(apply(&mut m, Action::Add, "6", "d1"), Ok(false));
        assert_eq!(apply(&mut m, Action::Add, "7", "d1"), Err("serial not owned by 'd1'".into()));
        assert_eq!(apply(&mut m, Action::Remove, "7", "d1"), Err("serial not owned by 'd1'".into()));
        assert_eq!(apply(&mut m, Action::Remove, "2", "d1"), Ok(true));
        assert_eq!(apply(&mut m, Action::Remove, "2", "d1"), Ok(false));
        assert_eq!(m.lookup("6"), Some("d1"));
        assert_eq!(m.lookup("7"), Some("other"));
    }
}
