//! The dispatcher's agent registry: one JSON file per agent.
//!
//! `<registry_dir>/<name>.json` holds how to reach an agent and what we know
//! of its certificate (wire.md §7.1). The CLI may only address agents listed
//! here. Records are written atomically under the registry-wide lock
//! (`.registry.lock`), so concurrent writers never lose each other's updates;
//! keys we do not know are kept as they were, so a record written by a newer
//! version or by the Perl dispatcher survives a rewrite.

use std::path::{Path, PathBuf};

use miniserde::json::{self, Object, Value};

use crate::fsutil::{self, FileLock, FsError};
use crate::wire::{get_i64, get_str, valid_agent_name};

/// Default agent port.
pub const DEFAULT_PORT: u16 = 7443;

/// One registered agent.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    /// Registry name (= file name).
    pub hostname: String,
    /// Stored address.
    pub ip: String,
    /// When it was paired or enrolled (ISO UTC).
    pub paired: String,
    /// Agent certificate notAfter.
    pub expiry: String,
    /// Pairing / enrolment request id.
    pub reqid: String,
    /// `hostname` (connect by name) or `ip` (connect to `ip`).
    pub lookup_by: String,
    /// Agent port.
    pub port: u16,
    /// Dispatcher serial this agent trusts.
    pub dispatcher_serial: String,
    /// `current`, `pending`, `stale` or `unknown`.
    pub serial_status: String,
    /// Every field as read (unknown ones included), updated on write.
    pub raw: Object,
}

impl AgentRecord {
    /// A fresh record.
    pub fn new(hostname: &str, ip: &str, port: u16, lookup_by: &str) -> AgentRecord {
        AgentRecord {
            hostname: hostname.into(),
            ip: ip.into(),
            paired: crate::time::now_iso(),
            expiry: String::new(),
            reqid: String::new(),
            lookup_by: lookup_by.into(),
            port,
            dispatcher_serial: String::new(),
            serial_status: "unknown".into(),
            raw: Object::new(),
        }
    }

    /// Parse a record file's text.
    pub fn from_json(name: &str, text: &str) -> Option<AgentRecord> {
        let o = crate::wire::parse_object(text)?;
        let port = get_i64(&o, "port").filter(|p| (1..=65_535).contains(p)).unwrap_or(DEFAULT_PORT as i64) as u16;
        let lookup_by = match get_str(&o, "lookup_by").as_deref() {
            Some("ip") => "ip",
            _ => "hostname",
        };
        Some(AgentRecord {
            hostname: name.to_string(),
            ip: get_str(&o, "ip").unwrap_or_default(),
            paired: get_str(&o, "paired").unwrap_or_default(),
            expiry: get_str(&o, "expiry").unwrap_or_default(),
            reqid: get_str(&o, "reqid").unwrap_or_default(),
            lookup_by: lookup_by.into(),
            port,
            dispatcher_serial: get_str(&o, "dispatcher_serial").unwrap_or_default(),
            serial_status: get_str(&o, "serial_status").unwrap_or_else(|| "unknown".into()),
            raw: o,
        })
    }

    /// The record as a JSON object (known fields over the raw ones).
    pub fn to_object(&self) -> Object {
        let mut o = self.raw.clone();
        let mut set = |k: &str, v: Value| {
            o.insert(k.into(), v);
        };
        set("hostname", Value::String(self.hostname.clone()));
        set("ip", Value::String(self.ip.clone()));
        set("paired", Value::String(self.paired.clone()));
        set("expiry", Value::String(self.expiry.clone()));
        set("reqid", Value::String(self.reqid.clone()));
        set("lookup_by", Value::String(self.lookup_by.clone()));
        set("port", crate::wire::int(self.port as i64));
        set("dispatcher_serial", Value::String(self.dispatcher_serial.clone()));
        set("serial_status", Value::String(self.serial_status.clone()));
        for k in ["serial_broadcast", "serial_confirmed"] {
            if !o.contains_key(k) {
                o.insert(k.into(), Value::String(String::new()));
            }
        }
        if !o.contains_key("tags") {
            o.insert("tags".into(), Value::Object(Object::new()));
        }
        o
    }

    /// Where to connect: the name itself, or the stored IP for `lookup_by = ip`.
    pub fn connect_addr(&self) -> &str {
        if self.lookup_by == "ip" && !self.ip.is_empty() { &self.ip } else { &self.hostname }
    }
}

/// A registry directory.
#[derive(Debug, Clone)]
pub struct Registry {
    /// The directory.
    pub dir: PathBuf,
}

/// Registry failures.
#[derive(Debug)]
pub enum RegistryError {
    /// File system trouble.
    Fs(FsError),
    /// A name that may not be a registry key.
    BadName(String),
    /// A file that is not a record.
    Corrupt(PathBuf),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Fs(e) => write!(f, "{e}"),
            RegistryError::BadName(n) => write!(
                f,
                "invalid agent name '{n}': use letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
            RegistryError::Corrupt(p) => {
                write!(f, "{} is not a valid registry record", p.display())
            }
        }
    }
}

impl From<FsError> for RegistryError {
    fn from(e: FsError) -> Self {
        RegistryError::Fs(e)
    }
}

impl From<RegistryError> for crate::error::Fail {
    fn from(e: RegistryError) -> Self {
        crate::error::Fail::new(e.to_string())
    }
}

impl Registry {
    /// Open (not create) a registry directory.
    pub fn new(dir: &Path) -> Registry {
        Registry { dir: dir.to_path_buf() }
    }

    fn file(&self, name: &str) -> Result<PathBuf, RegistryError> {
        if !valid_agent_name(name) {
            return Err(RegistryError::BadName(name.into()));
        }
        Ok(self.dir.join(format!("{name}.json")))
    }

    /// Take the registry-wide lock (creating the directory if needed).
    pub fn lock(&self) -> Result<FileLock, RegistryError> {
        fsutil::ensure_dir(&self.dir, 0o750)?;
        Ok(FileLock::exclusive(&self.dir.join(".registry.lock"))?)
    }

    /// One record, if present.
    pub fn get(&self, name: &str) -> Result<Option<AgentRecord>, RegistryError> {
        let path = self.file(name)?;
        match std::fs::read_to_string(&path) {
            Ok(t) => AgentRecord::from_json(name, &t).map(Some).ok_or(RegistryError::Corrupt(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FsError::new("read", &path, e).into()),
        }
    }

    /// All registered names, sorted, from the directory listing alone.
    pub fn names(&self) -> Result<Vec<String>, RegistryError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(FsError::new("read directory", &self.dir, e).into()),
        };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(String::from))
            .filter(|n| valid_agent_name(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Delete a record (caller holds the lock); absent is not an error.
    pub fn remove(&self, name: &str) -> Result<(), RegistryError> {
        let path = self.file(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FsError::new("remove", &path, e).into()),
        }
    }

    /// Write a record (caller holds the lock for read-modify-write).
    pub fn put(&self, rec: &AgentRecord) -> Result<(), RegistryError> {
        let path = self.file(&rec.hostname)?;
        fsutil::ensure_dir(&self.dir, 0o750)?;
        let text = json::to_string(&rec.to_object());
        Ok(fsutil::atomic_write(&path, text.as_bytes(), 0o644)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_record_round_trips_with_unknown_keys() {
        let perl = r#"{"dispatcher_serial":"2","tags":{"env":"x"},"ip":"127.0.0.1","hostname":"perl-agent1","lookup_by":"ip","serial_confirmed":"2026-11-25T12:35:15Z","paired":"2026-11-25T12:35:15Z","port":35900,"reqid":"ef685d87b93f27f3","serial_broadcast":"","expiry":"Feb 27 12:35:15 2029 GMT","serial_status":"current","future":1}"#;
        let r = AgentRecord::from_json("perl-agent1", perl).unwrap();
        assert_eq!((r.port, r.lookup_by.as_str(), r.connect_addr()), (35900, "ip", "127.0.0.1"));
        let d = tempfile::tempdir().unwrap();
        let reg = Registry::new(d.path());
        reg.put(&r).unwrap();
        let back = reg.get("perl-agent1").unwrap().unwrap();
        assert_eq!(back.raw.get("future").map(json::to_string), Some("1".into()));
        assert_eq!(back.to_object().len(), 13);
        assert_eq!(reg.names().unwrap(), vec!["perl-agent1"]);
        assert!(reg.get("nobody").unwrap().is_none());
        assert!(matches!(reg.get("../etc/passwd"), Err(RegistryError::BadName(_))));
    }

    #[test]
    fn loose_values_normalise() {
        let r = AgentRecord::from_json("a", r#"{"port":"99999","lookup_by":"dns"}"#).unwrap();
        assert_eq!((r.port, r.lookup_by.as_str(), r.connect_addr()), (DEFAULT_PORT, "hostname", "a"));
    }
}
