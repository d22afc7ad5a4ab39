//! Dispatcher certificate rotation (behaviour.md §10.3, wire.md §4.2, §7.3).
//!
//! A rotation replaces the dispatcher's key and certificate and tells every
//! agent to trust the new serial. Unlike upstream, no run fails meanwhile:
//! the replaced identity is kept as `<cert>.prev`/`<key>.prev` for the
//! overlap window and each agent is spoken to with the certificate it is
//! known to trust ([`crate::identity`]), so the `add` broadcast goes out
//! under the old serial and agents that missed it keep working until they
//! catch up or the window ends.
//!
//! Steps of [`rotate`], each leaving a state the next process can use:
//! 1. new key and certificate (CA-signed) to `<key>.next`, `<cert>.next`;
//! 2. the live pair copied to `<key>.prev`, `<cert>.prev`;
//! 3. `rotation.json` names the new serial as current and the old one as
//!    previous: the commit point (before it, the `.next` files are discarded
//!    by the next rotation; after it, any process finishes step 4);
//! 4. `.next` renamed over the live files (see [`crate::identity::repair`]);
//! 5. every agent marked `pending` under one registry lock (an agent whose
//!    record still names the old serial is treated the same way anyway).
//!
//! The maintenance phase ([`maintenance`], also `rotate-cert --check`)
//! rotates when the certificate is due, broadcasts to agents that have not
//! confirmed, marks agents `stale` once the window is over and then retires
//! the previous serial: `remove` to every confirmed agent, `previous_retired`
//! stamped, `.prev` files deleted.

use std::path::Path;

use miniserde::json::{self, Object, Value};

use crate::audit;
use crate::ca::{self, CaFiles};
use crate::config::DispatcherConfig;
use crate::dispatch::Engine;
use crate::fsutil::{self, FileLock, FsError};
use crate::identity::{self, confirmed, next_path, prev_path, read_pair};
use crate::registry::{AgentRecord, Registry};
use crate::wire::{Obj, get_i64, get_str, parse_object};

/// `rotation.json`.
#[derive(Debug, Clone)]
pub struct RotationState {
    /// Serial of the configured certificate.
    pub current_serial: String,
    /// Serial it replaced, until retired.
    pub previous_serial: Option<String>,
    /// When the rotation happened (ISO UTC).
    pub rotated_at: String,
    /// End of the overlap window (ISO UTC).
    pub overlap_expires: String,
    /// Length of the window in days.
    pub overlap_days: i64,
    /// When the previous serial was retired.
    pub previous_retired: Option<String>,
    /// Every field as read (unknown ones kept).
    pub raw: Object,
}

impl RotationState {
    /// Parse the file's text; `Err` says what is wrong.
    pub fn from_json(text: &str) -> Result<RotationState, String> {
        let o = parse_object(text).ok_or("not a JSON object")?;
        let serial = |k: &str| get_str(&o, k).filter(|s| !s.is_empty()).and_then(|s| crate::wire::canonical_serial(&s));
        let current_serial = serial("current_serial").ok_or("current_serial missing or not a serial")?;
        let overlap_expires = get_str(&o, "overlap_expires").unwrap_or_default();
        if crate::time::parse_iso_utc(&overlap_expires).is_none() {
            return Err("overlap_expires missing or not an ISO UTC time".into());
        }
        Ok(RotationState {
            current_serial,
            previous_serial: serial("previous_serial"),
            rotated_at: get_str(&o, "rotated_at").unwrap_or_default(),
            overlap_expires,
            overlap_days: get_i64(&o, "overlap_days").unwrap_or(0),
            previous_retired: get_str(&o, "previous_retired").filter(|s| !s.is_empty()),
            raw: o,
        })
    }

    /// The JSON object to write.
    pub fn to_object(&self) -> Object {
        let mut o = self.raw.clone();
        o.insert("current_serial".into(), Value::String(self.current_serial.clone()));
        match &self.previous_serial {
            Some(p) => o.insert("previous_serial".into(), Value::String(p.clone())),
            None => o.remove("previous_serial"),
        };
        o.insert("rotated_at".into(), Value::String(self.rotated_at.clone()));
        o.insert("overlap_expires".into(), Value::String(self.overlap_expires.clone()));
        o.insert("overlap_days".into(), crate::wire::int(self.overlap_days));
        if let Some(r) = &self.previous_retired {
            o.insert("previous_retired".into(), Value::String(r.clone()));
        }
        o
    }

    /// Is the overlap window over at `now`?
    pub fn overlap_over(&self, now: i64) -> bool {
        crate::time::parse_iso_utc(&self.overlap_expires).is_none_or(|t| now >= t)
    }
}

/// Read `rotation.json`: `Ok(None)` if absent, `Err` if unreadable or corrupt.
pub fn read_state(path: &Path) -> Result<Option<RotationState>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) => RotationState::from_json(&t).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Read `rotation.json`; a corrupt file is logged (`rotation-state-corrupt`)
/// and treated as no state.
pub fn load_state(path: &Path) -> Option<RotationState> {
    match read_state(path) {
        Ok(s) => s,
        Err(e) => {
            audit::err(
                "rotation-state-corrupt",
                &[("PATH", &path.display().to_string()), ("ERROR", &e), ("REASON", "treated as no rotation state")],
            );
            None
        }
    }
}

/// Write `rotation.json` atomically (0640).
pub fn save_state(path: &Path, st: &RotationState) -> Result<(), FsError> {
    if let Some(d) = path.parent() {
        fsutil::ensure_dir(d, 0o750)?;
    }
    fsutil::atomic_write(path, json::to_string(&st.to_object()).as_bytes(), 0o640)
}

/// Crash tests: when `CTRL_EXEC_TEST_CRASH_AT` names this point, die at
/// once as `kill -9` would (no destructors, no buffered output). Only in
/// debug builds (the ones the tests run): a release binary ignores it.
pub fn failpoint(name: &str) {
    if cfg!(debug_assertions) && std::env::var("CTRL_EXEC_TEST_CRASH_AT").is_ok_and(|v| v == name) {
        // SAFETY: ends this process immediately, like a SIGKILL.
        unsafe { libc::_exit(137) }
    }
}

/// fsync the directory holding `p` (after renames in it).
pub fn sync_dir(p: &Path) {
    if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(f) = std::fs::File::open(d)
    {
        let _ = f.sync_all();
    }
}

/// Write `path` atomically with the mode and owner of `like` (or `default_mode`).
fn write_like(path: &Path, data: &[u8], like: &Path, default_mode: u32) -> Result<(), FsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(like).ok();
    let mode = meta.as_ref().map(|m| m.mode() & 0o777).unwrap_or(default_mode);
    fsutil::atomic_write(path, data, mode)?;
    if let Some(m) = meta {
        // Only root may give a file away; anyone else keeps their own ownership.
        let _ = std::os::unix::fs::chown(path, Some(m.uid()), Some(m.gid()));
    }
    Ok(())
}

fn lock(cfg: &DispatcherConfig) -> Result<FileLock, FsError> {
    let dir = cfg.rotation_file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fsutil::ensure_dir(dir, 0o750)?;
    FileLock::exclusive(&dir.join(".rotation.lock"))
}

/// Every readable registry record, sorted by name.
pub fn records(reg: &Registry) -> Vec<AgentRecord> {
    reg.names().unwrap_or_default().iter().filter_map(|n| reg.get(n).ok().flatten()).collect()
}

/// Does this agent still need to be told about `current`?
pub fn needs_add(rec: &AgentRecord, current: &str) -> bool {
    rec.serial_status != "stale" && !confirmed(rec, current)
}

fn set(rec: &mut AgentRecord, key: &str, value: &str) {
    rec.raw.insert(key.into(), Value::String(value.into()));
}

/// Tidy up after an interrupted rotation or retirement (caller holds the
/// rotation lock, so no rotation is under way): finish a committed
/// installation, drop `.next` files of one that never committed, and drop
/// `.prev` files of a retired serial.
fn settle(cfg: &DispatcherConfig) {
    let state = load_state(&cfg.rotation_file);
    if let Some(st) = &state {
        identity::repair(cfg, Some(&st.current_serial));
    }
    for p in [next_path(&cfg.key), next_path(&cfg.cert)] {
        let _ = std::fs::remove_file(p);
    }
    if state.is_some_and(|s| s.previous_serial.is_none()) {
        for p in [prev_path(&cfg.cert), prev_path(&cfg.key)] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What [`rotate`] did.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The replaced serial.
    pub old_serial: String,
    /// The new serial.
    pub new_serial: String,
    /// End of the overlap window.
    pub overlap_expires: String,
    /// Agents marked pending.
    pub agents: usize,
}

/// Replace the dispatcher certificate (no broadcast; see [`broadcast`]).
///
/// Refuses while an earlier rotation's previous identity is still needed by
/// agents that have not confirmed its successor, unless `force`; an earlier
/// previous serial nobody needs any more is retired first.
pub async fn rotate(engine: &Engine, force: bool) -> Result<Rotated, String> {
    let r = rotate_inner(engine, force).await;
    if let Err(e) = &r {
        audit::err("cert-rotation-fail", &[("ERROR", e)]);
    }
    r
}

async fn rotate_inner(engine: &Engine, force: bool) -> Result<Rotated, String> {
    let cfg = &engine.cfg;
    let _lock = lock(cfg).map_err(|e| e.to_string())?;
    settle(cfg);
    let state = load_state(&cfg.rotation_file);
    let live = read_pair(&cfg.cert, &cfg.key).ok_or_else(|| {
        format!(
            "{} and {} are not a readable, matching certificate and key (run 'ctrl-exec setup-ctrl-exec' first)",
            cfg.cert.display(),
            cfg.key.display()
        )
    })?;
    let reg = engine.registry();
    if let Some(st) = state.as_ref().filter(|s| s.previous_serial.is_some()) {
        let waiting: Vec<String> =
            records(&reg).into_iter().filter(|r| needs_add(r, &st.current_serial)).map(|r| r.hostname).collect();
        if !waiting.is_empty() && !force {
            return Err(format!(
                "the previous rotation is still in its overlap window (until {}) and {} agent(s) have not confirmed serial {} yet: {}. Retry them with 'ctrl-exec rotate-cert --check', or use --force (they would then need re-pairing)",
                st.overlap_expires,
                waiting.len(),
                st.current_serial,
                waiting.join(", ")
            ));
        }
        // Nobody needs the older serial any more: take it out of the agents' maps now.
        let mut st = st.clone();
        retire(engine, &mut st).await;
    }
    let files = CaFiles::new(&cfg.ca, &cfg.ca_dir);
    let key = cfg.key_type.generate().map_err(|e| e.to_string())?;
    let pubkey = key
        .public_key_to_pem()
        .and_then(|p| openssl::pkey::PKey::public_key_from_pem(&p))
        .map_err(|e| format!("OpenSSL: {e}"))?;
    let cert = files.issue(&pubkey, "ctrl-exec-dispatcher", cfg.dispatcher_cert_days).map_err(|e| e.to_string())?;
    let new_serial = ca::cert_serial(&cert);
    let key_pem = ca::key_pem(&key).map_err(|e| e.to_string())?;
    let cert_pem = cert.to_pem().map_err(|e| format!("OpenSSL: {e}"))?;
    let e = |e: FsError| e.to_string();
    write_like(&next_path(&cfg.key), &key_pem, &cfg.key, 0o600).map_err(e)?;
    write_like(&next_path(&cfg.cert), &cert_pem, &cfg.cert, 0o644).map_err(e)?;
    failpoint("staged");
    let old_key = std::fs::read(&cfg.key).map_err(|err| format!("cannot read {}: {err}", cfg.key.display()))?;
    let old_cert = std::fs::read(&cfg.cert).map_err(|err| format!("cannot read {}: {err}", cfg.cert.display()))?;
    write_like(&prev_path(&cfg.key), &old_key, &cfg.key, 0o600).map_err(e)?;
    failpoint("prev-key");
    write_like(&prev_path(&cfg.cert), &old_cert, &cfg.cert, 0o644).map_err(e)?;
    let now = crate::time::unix_now();
    let overlap_expires = crate::time::iso_utc(now + i64::from(cfg.cert_overlap_days) * 86_400);
    let st = RotationState {
        current_serial: new_serial.clone(),
        previous_serial: Some(live.serial.clone()),
        rotated_at: crate::time::iso_utc(now),
        overlap_expires: overlap_expires.clone(),
        overlap_days: i64::from(cfg.cert_overlap_days),
        previous_retired: None,
        raw: Object::new(),
    };
    save_state(&cfg.rotation_file, &st).map_err(e)?;
    failpoint("committed");
    identity::repair(cfg, Some(&new_serial));
    failpoint("installed");
    if read_pair(&cfg.cert, &cfg.key).is_none_or(|p| p.serial != new_serial) {
        return Err(format!(
            "the new certificate (serial {new_serial}) is recorded but could not be installed at {}; the next ctrl-exec command with write access there completes it",
            cfg.cert.display()
        ));
    }
    let agents = {
        let _reg_lock = reg.lock().map_err(|e| e.to_string())?;
        let stamp = crate::time::iso_utc(now);
        let mut n = 0;
        for mut rec in records(&reg) {
            rec.serial_status = "pending".into();
            set(&mut rec, "serial_broadcast", &stamp);
            reg.put(&rec).map_err(|e| e.to_string())?;
            n += 1;
            failpoint("marking");
        }
        n
    };
    audit::info(
        "cert-rotated",
        &[
            ("OLD_SERIAL", &live.serial),
            ("NEW_SERIAL", &new_serial),
            ("OVERLAP_EXPIRES", &overlap_expires),
            ("AGENTS", &agents.to_string()),
        ],
    );
    engine.reload_identities().map_err(|e| e.0)?;
    Ok(Rotated { old_serial: live.serial, new_serial, overlap_expires, agents })
}

/// What a broadcast did.
#[derive(Debug, Clone, Default)]
pub struct Broadcast {
    /// Agents that now trust the current serial.
    pub updated: Vec<String>,
    /// Agents that could not be updated, with why.
    pub failed: Vec<(String, String)>,
}

/// Did an agent accept a `/rotate-serial`? (2xx, then `exit` if present,
/// else `status == "ok"`.)
fn accepted(reply: &Object) -> Result<(), String> {
    let code = match get_i64(reply, "exit") {
        Some(c) => c,
        None if get_str(reply, "status").as_deref() == Some("ok") => 0,
        None => -1,
    };
    if code == 0 {
        Ok(())
    } else {
        Err(get_str(reply, "error").unwrap_or_else(|| "the agent did not confirm the change".into()))
    }
}

/// POST `/rotate-serial` to `names`; (successes, failures).
async fn send(engine: &Engine, names: &[String], serial: &str, action: &str) -> Broadcast {
    let reg = engine.registry();
    let targets = match crate::dispatch::resolve(&reg, names, None) {
        Ok(t) => t,
        Err(e) => {
            return Broadcast { updated: vec![], failed: names.iter().map(|n| (n.clone(), e.to_string())).collect() };
        }
    };
    let body = Obj::new().s("serial", serial).s("action", action).to_json();
    let mut out = Broadcast::default();
    engine
        .post_each(&targets, "/rotate-serial", &body, |t, _took, r| match r.and_then(|o| accepted(&o)) {
            Ok(()) => out.updated.push(t.name.clone()),
            Err(e) => out.failed.push((t.name.clone(), e)),
        })
        .await;
    out.updated.sort();
    out.failed.sort();
    out
}

/// Tell every agent that has not confirmed the current serial to trust it
/// (sent with the previous identity, which those agents trust).
pub async fn broadcast(engine: &Engine) -> Result<Broadcast, String> {
    let _lock = lock(&engine.cfg).map_err(|e| e.to_string())?;
    let Some(st) = load_state(&engine.cfg.rotation_file) else { return Ok(Broadcast::default()) };
    let reg = engine.registry();
    let names: Vec<String> =
        records(&reg).into_iter().filter(|r| needs_add(r, &st.current_serial)).map(|r| r.hostname).collect();
    if names.is_empty() {
        return Ok(Broadcast::default());
    }
    audit::info(
        "serial-broadcast",
        &[("HOSTS", &names.join(",")), ("SERIAL", &st.current_serial), ("DISPATCHER", &engine.cfg.dispatcher_id)],
    );
    let out = send(engine, &names, &st.current_serial, "add").await;
    failpoint("broadcast-sent");
    {
        let _reg_lock = reg.lock().map_err(|e| e.to_string())?;
        let now = crate::time::now_iso();
        for name in &out.updated {
            if let Ok(Some(mut rec)) = reg.get(name) {
                rec.serial_status = "current".into();
                rec.dispatcher_serial = st.current_serial.clone();
                set(&mut rec, "serial_confirmed", &now);
                reg.put(&rec).map_err(|e| e.to_string())?;
            }
            audit::info("serial-confirmed", &[("AGENT", name)]);
        }
    }
    for (name, e) in &out.failed {
        audit::warn("serial-broadcast-fail", &[("AGENT", name), ("ERROR", e)]);
    }
    Ok(out)
}

/// After the overlap window: agents that never confirmed become `stale`.
pub fn expire_stale(cfg: &DispatcherConfig) -> Result<Vec<String>, String> {
    let Some(st) = load_state(&cfg.rotation_file) else { return Ok(vec![]) };
    if !st.overlap_over(crate::time::unix_now()) {
        return Ok(vec![]);
    }
    let reg = Registry::new(&cfg.registry_dir);
    let _reg_lock = reg.lock().map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for mut rec in records(&reg).into_iter().filter(|r| needs_add(r, &st.current_serial)) {
        rec.serial_status = "stale".into();
        reg.put(&rec).map_err(|e| e.to_string())?;
        audit::warn(
            "serial-stale",
            &[("AGENT", &rec.hostname), ("REASON", "overlap window expired without confirmation")],
        );
        out.push(rec.hostname);
    }
    Ok(out)
}

/// What retirement did.
#[derive(Debug, Clone)]
pub struct Retired {
    /// The retired serial.
    pub serial: String,
    /// Agents that removed it, and those that could not be reached.
    pub result: Broadcast,
}

/// Take the previous serial out of every confirmed agent's map, then forget
/// it (one attempt, as upstream: an agent missed here keeps an unused entry).
async fn retire(engine: &Engine, st: &mut RotationState) -> Option<Retired> {
    let cfg = &engine.cfg;
    let serial = st.previous_serial.clone()?;
    let names: Vec<String> = records(&engine.registry())
        .into_iter()
        .filter(|r| confirmed(r, &st.current_serial))
        .map(|r| r.hostname)
        .collect();
    let result = if names.is_empty() {
        Broadcast::default()
    } else {
        audit::info("serial-retire", &[("HOSTS", &names.join(",")), ("SERIAL", &serial)]);
        send(engine, &names, &serial, "remove").await
    };
    for (name, e) in &result.failed {
        audit::warn("serial-retire-error", &[("AGENT", name), ("ERROR", e)]);
    }
    failpoint("retire-sent");
    st.previous_serial = None;
    st.previous_retired = Some(crate::time::now_iso());
    if let Err(e) = save_state(&cfg.rotation_file, st) {
        audit::err("serial-retire-error", &[("ERROR", &e.to_string())]);
        return Some(Retired { serial, result });
    }
    failpoint("retired");
    for p in [prev_path(&cfg.cert), prev_path(&cfg.key)] {
        let _ = std::fs::remove_file(p);
    }
    sync_dir(&cfg.cert);
    let _ = engine.reload_identities();
    Some(Retired { serial, result })
}

/// Retire the previous serial once the overlap window is over.
pub async fn retire_if_due(engine: &Engine) -> Option<Retired> {
    let _lock = lock(&engine.cfg).ok()?;
    let mut st = load_state(&engine.cfg.rotation_file)?;
    if st.previous_serial.is_none() || !st.overlap_over(crate::time::unix_now()) {
        return None;
    }
    retire(engine, &mut st).await
}

/// Whole days the configured certificate has left.
pub fn days_left(cfg: &DispatcherConfig) -> Result<i64, String> {
    let cert = ca::load_cert(&cfg.cert).map_err(|e| e.to_string())?;
    let t = crate::time::parse_openssl_date(&ca::not_after(&cert))
        .ok_or_else(|| format!("cannot read the expiry of {}", cfg.cert.display()))?;
    Ok((t - crate::time::unix_now()).div_euclid(86_400))
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Default)]
pub struct Maintenance {
    /// Days left on the certificate when checked.
    pub days_left: Option<i64>,
    /// The rotation made because the certificate was due.
    pub rotated: Option<Rotated>,
    /// The add broadcast.
    pub broadcast: Broadcast,
    /// Agents marked stale.
    pub stale: Vec<String>,
    /// The retirement of the previous serial.
    pub retired: Option<Retired>,
    /// Phases that failed: (phase, error).
    pub errors: Vec<(&'static str, String)>,
}

/// The rotation part of `maintain` (and `rotate-cert --check`): rotate if
/// the certificate has at most `cert_renewal_days` left, broadcast to agents
/// that have not confirmed the current serial, mark those past the overlap
/// window stale, retire the previous serial. Each phase runs even if an
/// earlier one failed.
pub async fn maintenance(engine: &Engine) -> Maintenance {
    let cfg = &engine.cfg;
    let mut m = Maintenance::default();
    // Files left by an interrupted rotation or retirement.
    match lock(cfg) {
        Ok(_lock) => {
            settle(cfg);
            let _ = engine.reload_identities();
        }
        Err(e) => m.errors.push(("settle", e.to_string())),
    }
    match days_left(cfg) {
        Ok(d) => {
            m.days_left = Some(d);
            let threshold = i64::from(cfg.cert_renewal_days);
            audit::info("cert-check", &[("DAYS_LEFT", &d.to_string()), ("THRESHOLD", &threshold.to_string())]);
            if d <= threshold {
                audit::info("cert-renewal-start", &[("DAYS_LEFT", &d.to_string())]);
                match rotate(engine, false).await {
                    Ok(r) => m.rotated = Some(r),
                    Err(e) => {
                        audit::warn("cert-check-warn", &[("ERROR", &e)]);
                        m.errors.push(("rotate", e));
                    }
                }
            }
        }
        Err(e) => {
            audit::warn("cert-check-error", &[("ERROR", &e)]);
            m.errors.push(("check", e));
        }
    }
    match broadcast(engine).await {
        Ok(b) => m.broadcast = b,
        Err(e) => {
            audit::err("serial-broadcast-error", &[("ERROR", &e)]);
            m.errors.push(("broadcast", e));
        }
    }
    match expire_stale(cfg) {
        Ok(s) => m.stale = s,
        Err(e) => {
            audit::warn("expire-stale-error", &[("ERROR", &e)]);
            m.errors.push(("expire", e));
        }
    }
    m.retired = retire_if_due(engine).await;
    m
}

/// [`maintenance`] for synchronous callers (the `maintain` verb): `cfg` is
/// the configuration `engine` was opened with.
pub fn rotation_maintenance(cfg: &DispatcherConfig, engine: &Engine) -> Maintenance {
    debug_assert_eq!(cfg.rotation_file, engine.cfg.rotation_file);
    smol::block_on(maintenance(engine))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_state_round_trips() {
        let text = r#"{"previous_serial":"2","overlap_expires":"2026-12-25T12:40:33Z","current_serial":"6","rotated_at":"2026-11-25T12:40:33Z","overlap_days":30}"#;
        let st = RotationState::from_json(text).unwrap();
        assert_eq!(st.current_serial, "6");
        assert_eq!(st.previous_serial.as_deref(), Some("2"));
        assert!(!st.overlap_over(1_798_202_432));
        assert!(st.overlap_over(1_798_202_433));
        let back = RotationState::from_json(&json::to_string(&st.to_object())).unwrap();
        assert_eq!(json::to_string(&back.to_object()), json::to_string(&st.to_object()));
        let mut retired = st.clone();
        retired.previous_serial = None;
        retired.previous_retired = Some("2026-12-26T00:00:00Z".into());
        let o = retired.to_object();
        assert!(!o.contains_key("previous_serial"));
        assert_eq!(get_str(&o, "previous_retired").as_deref(), Some("2026-12-26T00:00:00Z"));
    }

    #[test]
    fn corrupt_states_are_errors() {
        for bad in ["", "[]", "{}", r#"{"current_serial":"zz","overlap_expires":"2026-12-25T12:40:33Z"}"#] {
            assert!(RotationState::from_json(bad).is_err(), "{bad}");
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rotation.json");
        assert!(matches!(read_state(&p), Ok(None)));
        std::fs::write(&p, "{\"current_serial\":").unwrap();
        assert!(read_state(&p).is_err());
        assert!(load_state(&p).is_none());
    }
}
