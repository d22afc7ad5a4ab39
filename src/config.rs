//! Configuration files: `key = value` lines with `[sections]`.
//!
//! One parser serves `ctrl-exec.conf` and `agent.conf`. Rules (upstream
//! compatible, stricter where upstream silently misread a file):
//! - whole-line `#` comments and blank lines are ignored; an inline `# …`
//!   after a value is part of the value, so a value that fails to parse and
//!   contains `#` gets a hint;
//! - `[tags]` and `[profile <name>]` are known sections; other sections are
//!   ignored (so newer files load in older binaries);
//! - any other line is an error naming the file and line;
//! - unknown keys are ignored; the last occurrence of a key wins;
//! - relative paths are taken relative to the directory of the config file.
//!
//! Every error says which file and line, and the applets exit 78 (EX_CONFIG).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ca::KeyType;

/// A configuration problem, with the file and (when known) line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number, if the problem is on one line.
    pub line: Option<usize>,
    /// What is wrong and what to do.
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.path.display(), l, self.msg),
            None => write!(f, "{}: {}", self.path.display(), self.msg),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Which section a line belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Section {
    /// Before any `[section]` header.
    Main,
    /// `[tags]`.
    Tags,
    /// `[profile <name>]`.
    Profile(String),
    /// Any other section (ignored by the typed loaders).
    Other(String),
}

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its section.
    pub section: Section,
    /// The key.
    pub key: String,
    /// The value, trimmed.
    pub value: String,
    /// 1-based line number.
    pub line: usize,
}

/// A parsed file before typing.
#[derive(Debug, Clone)]
pub struct RawConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// All entries in file order.
    pub entries: Vec<Entry>,
    /// Every section header, in file order (a section may have no entries).
    pub headers: Vec<Section>,
}

fn valid_key(k: &str) -> bool {
    let mut b = k.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
}

/// Parse config text. Never panics; any malformed line is an error.
pub fn parse(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    let mut section = Section::Main;
    let mut entries = Vec::new();
    let mut headers = Vec::new();
    let err = |line: usize, msg: String| ConfigError { path: path.to_path_buf(), line: Some(line), msg };
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(inner) = line.strip_prefix('[') {
            let Some(inner) = inner.strip_suffix(']') else {
                return Err(err(n, format!("malformed section header '{line}' (expected '[name]')")));
            };
            let mut words = inner.split_whitespace();
            section = match (words.next(), words.next(), words.next()) {
                (Some("tags"), None, _) => Section::Tags,
                (Some("profile"), Some(name), None) if valid_key(name) => Section::Profile(name.into()),
                (Some("profile"), _, _) => {
                    return Err(err(n, format!("malformed profile header '{line}' (expected '[profile <name>]')")));
                }
                (Some(other), _, _) => Section::Other(other.into()),
                (None, _, _) => return Err(err(n, "empty section header '[]'".into())),
            };
            headers.push(section.clone());
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(err(n, format!("malformed config line '{}' (expected 'key = value')", clip(line))));
        };
        let key = k.trim();
        if !valid_key(key) {
            return Err(err(n, format!("malformed config line '{}' (invalid key '{}')", clip(line), clip(key))));
        }
        entries.push(Entry { section: section.clone(), key: key.into(), value: v.trim().into(), line: n });
    }
    Ok(RawConfig { path: path.to_path_buf(), entries, headers })
}

fn clip(s: &str) -> String {
    if s.chars().count() > 60 { format!("{}…", s.chars().take(60).collect::<String>()) } else { s.into() }
}

/// Read and parse a file.
pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        line: None,
        msg: format!("cannot read config file: {e}"),
    })?;
    parse(path, &text)
}

impl RawConfig {
    /// The last main-section entry for `key` (aliases tried in order).
    pub fn get(&self, keys: &[&str]) -> Option<&Entry> {
        keys.iter().find_map(|k| self.entries.iter().rev().find(|e| e.section == Section::Main && e.key == *k))
    }

    fn err(&self, e: Option<&Entry>, msg: String) -> ConfigError {
        ConfigError { path: self.path.clone(), line: e.map(|e| e.line), msg }
    }

    fn bad_value(&self, e: &Entry, what: &str) -> ConfigError {
        let hint = if e.value.contains('#') {
            " (inline comments are not supported: put '#' at the start of its own line)"
        } else {
            ""
        };
        self.err(Some(e), format!("invalid value '{}' for '{}': expected {what}{hint}", clip(&e.value), e.key))
    }

    /// Resolve a path value relative to the config file's directory.
    pub fn resolve(&self, v: &str) -> PathBuf {
        let p = PathBuf::from(v);
        if p.is_absolute() { p } else { self.path.parent().unwrap_or(Path::new(".")).join(p) }
    }

    /// A required non-empty string.
    pub fn req(&self, key: &str) -> Result<&Entry, ConfigError> {
        match self.get(&[key]) {
            Some(e) if !e.value.is_empty() => Ok(e),
            Some(e) => Err(self.err(Some(e), format!("'{key}' must not be empty"))),
            None => Err(self.err(None, format!("missing '{key}' (add a line '{key} = …')"))),
        }
    }

    /// A required path.
    pub fn req_path(&self, key: &str) -> Result<PathBuf, ConfigError> {
        Ok(self.resolve(&self.req(key)?.value))
    }

    /// An optional path (empty value = unset).
    pub fn opt_path(&self, key: &str) -> Option<PathBuf> {
        self.get(&[key]).filter(|e| !e.value.is_empty()).map(|e| self.resolve(&e.value))
    }

    /// A path with a default.
    pub fn path_or(&self, key: &str, default: &str) -> PathBuf {
        self.opt_path(key).unwrap_or_else(|| PathBuf::from(default))
    }

    /// An optional non-empty string.
    pub fn opt_str(&self, keys: &[&str]) -> Option<String> {
        self.get(keys).filter(|e| !e.value.is_empty()).map(|e| e.value.clone())
    }

    /// An unsigned integer in `min..=max`, or the default.
    pub fn num(&self, keys: &[&str], default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
        let Some(e) = self.get(keys) else {
            return Ok(default);
        };
        match e.value.parse::<u64>() {
            Ok(v) if (min..=max).contains(&v) && e.value.starts_with(|c: char| c.is_ascii_digit()) => Ok(v),
            _ => Err(self.bad_value(e, &format!("a whole number from {min} to {max}"))),
        }
    }

    /// Seconds as a duration.
    pub fn secs(&self, keys: &[&str], default: u64, min: u64, max: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.num(keys, default, min, max)?))
    }

    /// A rate limit `count/window/block` (e.g. `10/60/300`: more than 10
    /// connections in 60 s blocks the source for 300 s).
    pub fn volume(&self, key: &str, default: (u32, u64, u64)) -> Result<(u32, u64, u64), ConfigError> {
        let Some(e) = self.get(&[key]) else {
            return Ok(default);
        };
        let parts: Vec<Option<u64>> = e.value.split('/').map(|p| p.trim().parse::<u64>().ok()).collect();
        match parts.as_slice() {
            [Some(n), Some(w), Some(b)] if (1..=1_000_000).contains(n) && *w >= 1 && *b >= 1 => Ok((*n as u32, *w, *b)),
            _ => Err(self.bad_value(e, "count/window/block, e.g. 10/60/300")),
        }
    }

    /// A boolean: 1/y/yes/true/on or 0/n/no/false/off.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        let Some(e) = self.get(&[key]) else {
            return Ok(default);
        };
        match e.value.to_ascii_lowercase().as_str() {
            "1" | "y" | "yes" | "true" | "on" => Ok(true),
            "0" | "n" | "no" | "false" | "off" | "" => Ok(false),
            _ => Err(self.bad_value(e, "yes or no")),
        }
    }

    /// One of a fixed set of words.
    pub fn choice(
        &self,
        key: &str,
        default: &'static str,
        allowed: &[&'static str],
    ) -> Result<&'static str, ConfigError> {
        let Some(e) = self.get(&[key]) else {
            return Ok(default);
        };
        let v = e.value.to_ascii_lowercase();
        allowed
            .iter()
            .find(|a| **a == v)
            .copied()
            .ok_or_else(|| self.bad_value(e, &format!("one of {}", allowed.join(", "))))
    }

    fn log_target(&self) -> Result<LogTarget, ConfigError> {
        let socket = self.path_or("syslog_socket", "/dev/log");
        Ok(match self.choice("log", "syslog", &["syslog", "stderr"])? {
            "stderr" => LogTarget::Stderr,
            _ => LogTarget::Syslog(socket),
        })
    }

    fn key_type(&self) -> Result<KeyType, ConfigError> {
        let Some(e) = self.get(&["key_type"]) else {
            return Ok(KeyType::default());
        };
        KeyType::parse(&e.value).ok_or_else(|| self.bad_value(e, "rsa4096, rsa3072, rsa2048 or ec256"))
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// RFC 3164 datagrams to this socket (falls back to stderr when absent).
    Syslog(PathBuf),
    /// Lines on stderr.
    Stderr,
}

/// Default agent config path.
pub const AGENT_CONF: &str = "/etc/ctrl-exec-agent/agent.conf";
/// Default allowlist path.
pub const AGENT_SCRIPTS: &str = "/etc/ctrl-exec-agent/scripts.conf";
/// Default dispatcher config path.
pub const DISPATCHER_CONF: &str = "/etc/ctrl-exec/ctrl-exec.conf";

/// `agent.conf`, typed.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// Listen port (`port`, required).
    pub port: u16,
    /// Listen address (`bind`, default `0.0.0.0`).
    pub bind: String,
    /// Agent certificate.
    pub cert: PathBuf,
    /// Agent private key.
    pub key: PathBuf,
    /// The one trusted CA.
    pub ca: PathBuf,
    /// Allowlist path (`allowlist`; `--allowlist` overrides).
    pub allowlist: PathBuf,
    /// Trusted-dispatcher map.
    pub trusted_dispatchers_path: PathBuf,
    /// Revocation list.
    pub revoked_serials: PathBuf,
    /// Approved script directories (empty = no restriction).
    pub script_dirs: Vec<PathBuf>,
    /// Agent-side auth hook.
    pub auth_hook: Option<PathBuf>,
    /// Hook timeout.
    pub auth_hook_timeout: Duration,
    /// Time allowed to deliver the context JSON to a script.
    pub stdin_timeout: Duration,
    /// Concurrent connections before 503.
    pub max_children: usize,
    /// Cap on captured stdout and on stderr, each, in bytes.
    pub max_output: usize,
    /// One deadline for the TLS handshake and reading the request, together.
    pub request_timeout: Duration,
    /// Time in-flight runs get to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a connection a dispatcher asked to keep open may wait for
    /// its next request (`keep_alive`; zero: one request per connection).
    pub keep_alive: Duration,
    /// How long resumption tickets are honoured; the ticket keys are renewed
    /// this often, which bounds the age of any resumed authentication.
    pub tls_ticket_lifetime: Duration,
    /// Renewal staging path.
    pub cert_staging_path: PathBuf,
    /// Async run store.
    pub async_runs_dir: PathBuf,
    /// Host name reported in `/ping` and `/capabilities` (`hostname`; default: the kernel's host name).
    pub hostname: Option<String>,
    /// `[tags]` in file order.
    pub tags: Vec<(String, String)>,
    /// Names of the `[profile <name>]` sections.
    pub profiles: BTreeSet<String>,
    /// Audit sink.
    pub log: LogTarget,
}

impl AgentConfig {
    /// Load and check `agent.conf`.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        Self::from_raw(load(path)?)
    }

    /// Type a parsed file.
    pub fn from_raw(raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let port = {
            let e = raw.req("port")?;
            match e.value.parse::<u16>() {
                Ok(p) if p > 0 && e.value.starts_with(|c: char| c.is_ascii_digit()) => p,
                _ => return Err(raw.bad_value(e, "a port number from 1 to 65535")),
            }
        };
        let bind = raw.opt_str(&["bind"]).unwrap_or_else(|| "0.0.0.0".into());
        if bind.parse::<std::net::IpAddr>().is_err() {
            let e = raw.get(&["bind"]);
            return Err(raw.err(e, format!("invalid value '{bind}' for 'bind': expected an IPv4 or IPv6 address")));
        }
        let script_dirs = raw
            .opt_str(&["script_dirs"])
            .map(|v| v.split(':').filter(|s| !s.trim().is_empty()).map(|s| raw.resolve(s.trim())).collect())
            .unwrap_or_default();
        let mut tags: Vec<(String, String)> = Vec::new();
        for e in raw.entries.iter().filter(|e| e.section == Section::Tags) {
            tags.retain(|(k, _)| *k != e.key);
            tags.push((e.key.clone(), e.value.clone()));
        }
        for e in &raw.entries {
            if matches!(e.section, Section::Profile(_)) && e.key == "caps" && e.value.contains('#') {
                return Err(raw.bad_value(e, "a list of CAP_* names"));
            }
        }
        let profiles = raw
            .headers
            .iter()
            .filter_map(|h| match h {
                Section::Profile(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        Ok(AgentConfig {
            port,
            bind,
            cert: raw.req_path("cert")?,
            key: raw.req_path("key")?,
            ca: raw.req_path("ca")?,
            allowlist: raw.path_or("allowlist", AGENT_SCRIPTS),
            trusted_dispatchers_path: raw
                .path_or("trusted_dispatchers_path", "/var/lib/ctrl-exec-agent/ctrl-exec-dispatchers"),
            revoked_serials: raw.path_or("revoked_serials", "/etc/ctrl-exec-agent/revoked-serials"),
            script_dirs,
            auth_hook: raw.opt_path("auth_hook"),
            auth_hook_timeout: raw.secs(&["auth_hook_timeout"], 10, 1, 3600)?,
            stdin_timeout: raw.secs(&["stdin_timeout"], 10, 1, 3600)?,
            max_children: raw.num(&["max_children"], 256, 1, 65_535)? as usize,
            max_output: raw.num(&["max_output"], 1 << 20, 0, 256 << 20)? as usize,
            request_timeout: raw.secs(&["request_timeout"], 30, 1, 3600)?,
            shutdown_grace: raw.secs(&["shutdown_grace"], 30, 0, 86_400)?,
            keep_alive: raw.secs(&["keep_alive"], 10, 0, 300)?,
            tls_ticket_lifetime: raw.secs(&["tls_ticket_lifetime"], crate::tls::TICKET_LIFETIME_SECS, 1, 86_400)?,
            cert_staging_path: raw.path_or("cert_staging_path", "/var/lib/ctrl-exec-agent/agent.crt.staged"),
            async_runs_dir: raw.path_or("async_runs_dir", "/var/lib/ctrl-exec-agent/runs"),
            hostname: raw.opt_str(&["hostname"]),
            tags,
            profiles,
            log: raw.log_target()?,
            path: raw.path,
        })
    }
}

/// `ctrl-exec.conf`, typed.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// Dispatcher certificate.
    pub cert: PathBuf,
    /// Dispatcher private key.
    pub key: PathBuf,
    /// CA certificate.
    pub ca: PathBuf,
    /// Directory holding `ca.key` and `ca.serial`.
    pub ca_dir: PathBuf,
    /// Agent registry directory.
    pub registry_dir: PathBuf,
    /// Dispatcher-side auth hook.
    pub auth_hook: Option<PathBuf>,
    /// Hook timeout.
    pub auth_hook_timeout: Duration,
    /// Deadline for an agent's reply once the request is sent.
    pub read_timeout: Duration,
    /// Per-host TCP connect + TLS handshake timeout.
    pub connect_timeout: Duration,
    /// Hosts contacted at once.
    pub max_parallel: usize,
    /// Identity delivered to agents.
    pub dispatcher_id: String,
    /// Lifetime of agent certificates issued here.
    pub cert_days: u32,
    /// Key type for keys generated here.
    pub key_type: KeyType,
    /// Where resumable TLS sessions are kept (`None`: always full handshakes).
    pub tls_session_cache: Option<PathBuf>,
    /// How long an API client connection that asked to be kept open
    /// (`Connection: keep-alive`) waits for its next request (0: never kept).
    pub api_keep_alive: Duration,
    /// The API server keeps agent connections open between requests
    /// (`agent_keep_alive`, default on; agents that do not agree close them).
    pub agent_keep_alive: bool,
    /// Run store of the API (and of async runs).
    pub runs_dir: PathBuf,
    /// Dispatcher locks (one run of a script per host at a time).
    pub locks_dir: PathBuf,
    /// API server listen address.
    pub api_bind: String,
    /// API server port.
    pub api_port: u16,
    /// API TLS certificate and key (TLS only when both are set and exist).
    pub api_tls: Option<(PathBuf, PathBuf)>,
    /// Concurrent API requests before 503.
    pub api_max_children: usize,
    /// Without a hook, may API requests pass (`allow`) or not (`deny`)?
    pub api_auth_default_allow: bool,
    /// 403 bodies say only "forbidden".
    pub auth_deny_generic: bool,
    /// Audit sink.
    pub log: LogTarget,
    /// Rotate the dispatcher certificate when fewer whole days remain.
    pub cert_renewal_days: u32,
    /// How long the previous dispatcher serial stays in use after a rotation.
    pub cert_overlap_days: u32,
    /// Rotation state (`rotation.json`).
    pub rotation_file: PathBuf,
    /// Lifetime of a rotated dispatcher certificate (`cert_days` if set, else 825).
    pub dispatcher_cert_days: u32,
    /// Pairing settings.
    pub pairing: PairingConfig,
}

/// The pairing listener's settings (`pairing_*` keys of ctrl-exec.conf).
#[derive(Debug, Clone)]
pub struct PairingConfig {
    /// Queue directory (`pairing_dir`, default `<state>/pairing`).
    pub dir: PathBuf,
    /// Listen address (`pairing_bind`, default 0.0.0.0).
    pub bind: String,
    /// Listen port (`pairing_port`, default 7444).
    pub port: u16,
    /// Most pending requests (`pairing_max_queue`, default 10).
    pub max_queue: usize,
    /// Session length in seconds (`pairing_timeout`, 1-600, default 600).
    pub timeout: u64,
    /// Connections per source address: `(count, window s, block s)`, or
    /// `None` when `pairing_rate_limit_disable` is set.
    pub rate_limit: Option<(u32, u64, u64)>,
    /// Pid file of a background session.
    pub pidfile: PathBuf,
}

impl DispatcherConfig {
    /// Load and check `ctrl-exec.conf`.
    pub fn load(path: &Path) -> Result<DispatcherConfig, ConfigError> {
        Self::from_raw(load(path)?)
    }

    /// Type a parsed file.
    pub fn from_raw(raw: RawConfig) -> Result<DispatcherConfig, ConfigError> {
        let dispatcher_id = match raw.get(&["dispatcher_id"]).filter(|e| !e.value.is_empty()) {
            Some(e) if crate::wire::valid_dispatcher_id(&e.value) => e.value.clone(),
            Some(e) => {
                return Err(
                    raw.bad_value(e, "letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64")
                );
            }
            None => crate::wire::sanitize_dispatcher_id(&host_name()),
        };
        let registry_dir = raw.path_or("registry_dir", "/var/lib/ctrl-exec/agents");
        let state_dir = registry_dir.parent().unwrap_or(Path::new("/var/lib/ctrl-exec")).to_path_buf();
        let pairing = PairingConfig {
            dir: raw.opt_path("pairing_dir").unwrap_or_else(|| state_dir.join("pairing")),
            bind: {
                let bind = raw.opt_str(&["pairing_bind"]).unwrap_or_else(|| "0.0.0.0".into());
                if bind.parse::<std::net::IpAddr>().is_err() {
                    let e = raw.get(&["pairing_bind"]);
                    return Err(
                        raw.err(e, format!("invalid value '{bind}' for 'pairing_bind': expected an IP address"))
                    );
                }
                bind
            },
            port: raw.num(&["pairing_port"], 7444, 1, 65_535)? as u16,
            max_queue: raw.num(&["pairing_max_queue"], 10, 1, 10_000)? as usize,
            timeout: raw.num(&["pairing_timeout"], 600, 1, 600)?,
            rate_limit: if raw.flag("pairing_rate_limit_disable", false)? {
                None
            } else {
                Some(raw.volume("pairing_rate_limit_volume", (10, 60, 300))?)
            },
            pidfile: state_dir.join("pairing-mode.pid"),
        };
        let rotation_file = raw
            .opt_path("rotation_file")
            .unwrap_or_else(|| registry_dir.parent().unwrap_or(Path::new("/var/lib/ctrl-exec")).join("rotation.json"));
        Ok(DispatcherConfig {
            pairing,
            cert: raw.req_path("cert")?,
            key: raw.req_path("key")?,
            ca: raw.req_path("ca")?,
            ca_dir: raw.path_or("ca_dir", "/etc/ctrl-exec"),
            auth_hook: raw.opt_path("auth_hook"),
            auth_hook_timeout: raw.secs(&["auth_hook_timeout"], 10, 1, 3600)?,
            read_timeout: raw.secs(&["read_timeout", "timeout"], 60, 1, 86_400)?,
            connect_timeout: raw.secs(&["connect_timeout"], 10, 1, 3600)?,
            max_parallel: raw.num(&["max_parallel"], 64, 1, 100_000)? as usize,
            dispatcher_id,
            cert_days: raw.num(&["cert_days"], 365, 1, 36_500)? as u32,
            key_type: raw.key_type()?,
            tls_session_cache: match raw.get(&["tls_session_cache"]).map(|e| (e.value.to_ascii_lowercase(), e)) {
                Some((v, _)) if ["off", "no", "none", "0"].contains(&v.as_str()) => None,
                Some((_, e)) if !e.value.is_empty() => Some(raw.resolve(&e.value)),
                _ => Some(registry_dir.parent().unwrap_or(Path::new("/var/lib/ctrl-exec")).join("tls-sessions")),
            },
            api_keep_alive: raw.secs(&["api_keep_alive"], 5, 0, 300)?,
            agent_keep_alive: raw.choice("agent_keep_alive", "on", &["on", "off"])? == "on",
            runs_dir: raw
                .opt_path("runs_dir")
                .unwrap_or_else(|| registry_dir.parent().unwrap_or(Path::new("/var/lib/ctrl-exec")).join("runs")),
            locks_dir: raw
                .opt_path("locks_dir")
                .unwrap_or_else(|| registry_dir.parent().unwrap_or(Path::new("/var/lib/ctrl-exec")).join("locks")),
            registry_dir,
            api_bind: {
                let bind = raw.opt_str(&["api_bind"]).unwrap_or_else(|| "127.0.0.1".into());
                if bind.parse::<std::net::IpAddr>().is_err() {
                    let e = raw.get(&["api_bind"]);
                    return Err(raw.err(e, format!("invalid value '{bind}' for 'api_bind': expected an IP address")));
                }
                bind
            },
            api_port: raw.num(&["api_port"], 7445, 1, 65_535)? as u16,
            api_tls: match (raw.opt_path("api_cert"), raw.opt_path("api_key")) {
                (Some(c), Some(k)) if c.exists() && k.exists() => Some((c, k)),
                _ => None,
            },
            api_max_children: raw.num(&["api_max_children"], 64, 1, 65_535)? as usize,
            api_auth_default_allow: raw.choice("api_auth_default", "deny", &["deny", "allow"])? == "allow",
            auth_deny_generic: raw.flag("auth_deny_generic", false)?,
            log: raw.log_target()?,
            cert_renewal_days: raw.num(&["cert_renewal_days"], 90, 0, 36_500)? as u32,
            cert_overlap_days: raw.num(&["cert_overlap_days"], 30, 0, 3650)? as u32,
            rotation_file,
            dispatcher_cert_days: raw.num(&["cert_days"], 825, 1, 36_500)? as u32,
            path: raw.path,
        })
    }
}

/// This host's name as the kernel knows it.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<RawConfig, ConfigError> {
        parse(Path::new("/etc/x.conf"), text)
    }

    #[test]
    fn sections_and_comments() {
        let c = p("# c\nport = 7443\n\n[tags]\nenv = prod\n[profile web]\nrun_as = www\n[future]\nx = 1\n").unwrap();
        assert_eq!(c.entries.len(), 4);
        assert_eq!(c.entries[1].section, Section::Tags);
        assert_eq!(c.entries[2].section, Section::Profile("web".into()));
        assert_eq!(c.get(&["port"]).unwrap().value, "7443");
        assert!(c.get(&["x"]).is_none(), "keys of other sections are not main keys");
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let e = p("port = 1\nthis is wrong\n").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().starts_with("/etc/x.conf:2: malformed config line"), "{e}");
        let e = p("[profile]\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        let e = p("[tags\n").unwrap_err();
        assert_eq!(e.line, Some(1));
        let e = p(" = x\n").unwrap_err();
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn typed_errors_point_at_the_line() {
        let c = p("port = 7443 # agent port\ncert=a\nkey=b\nca=c\n").unwrap();
        let e = AgentConfig::from_raw(c).unwrap_err();
        assert_eq!(e.line, Some(1));
        assert!(e.msg.contains("inline comments"), "{e}");
        let c = p("cert=a\nkey=b\nca=c\n").unwrap();
        let e = AgentConfig::from_raw(c).unwrap_err();
        assert!(e.msg.contains("missing 'port'"), "{e}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let c = p("port=1\ncert=agent.crt\nkey=/abs/agent.key\nca=ca.crt\n").unwrap();
        let a = AgentConfig::from_raw(c).unwrap();
        assert_eq!(a.cert, PathBuf::from("/etc/agent.crt"));
        assert_eq!(a.key, PathBuf::from("/abs/agent.key"));
        assert_eq!(a.bind, "0.0.0.0");
        assert_eq!(a.max_output, 1 << 20);
    }

    #[test]
    fn table_of_bad_values() {
        let base = "cert=a\nkey=b\nca=c\n";
        for (line, needle) in
            [("port = 70000", "port number"), ("port = x", "port number"), ("port = +7443", "port number")]
        {
            let e = AgentConfig::from_raw(p(&format!("{line}\n{base}")).unwrap()).unwrap_err();
            assert!(e.msg.contains(needle), "{line}: {e}");
            assert_eq!(e.line, Some(1));
        }
        for (line, needle) in [
            ("max_children = 0", "whole number"),
            ("max_children = +5", "whole number"),
            ("tls_ticket_lifetime = 0", "whole number"),
            ("stdin_timeout = -1", "whole number"),
            ("bind = localhost", "IPv4 or IPv6"),
            ("log = file", "one of"),
        ] {
            let e = AgentConfig::from_raw(p(&format!("port=1\n{base}{line}\n")).unwrap()).unwrap_err();
            assert!(e.msg.contains(needle), "{line}: {e}");
        }
        for (line, needle) in [
            ("max_parallel = 0", "whole number"),
            ("dispatcher_id = -bad", "letters"),
            ("key_type = dsa", "rsa4096"),
            ("read_timeout = soon", "whole number"),
        ] {
            let e = DispatcherConfig::from_raw(p(&format!("{base}{line}\n")).unwrap()).unwrap_err();
            assert!(e.msg.contains(needle), "{line}: {e}");
            assert_eq!(e.line, Some(4), "{line}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(s in "(?s).{0,400}") {
            let _ = p(&s);
        }

        #[test]
        fn well_formed_lines_round_trip(k in "[a-z_][a-z0-9_-]{0,20}", v in "[^\n#]{0,40}") {
            let c = p(&format!("{k} = {v}\n")).unwrap();
            proptest::prop_assert_eq!(&c.entries[0].key, &k);
            proptest::prop_assert_eq!(&c.entries[0].value, v.trim());
        }
    }
}
