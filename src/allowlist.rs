//! The allowlist (`scripts.conf`): the hard gate of the agent.
//!
//! A script runs only if its *name* is listed here. Each line is
//! `<name> = <absolute path> [annotation=value …]`; annotations may stand
//! before or after the path. Known annotations: `profile=<name>` (the
//! privilege profile, default `default`) and `timeout=<seconds>` (kill the
//! script's whole process group after that long). Unknown annotations are
//! kept for forward compatibility and reported as warnings.
//!
//! Malformed entries are skipped with a warning rather than failing the
//! whole file, so one typo does not take every script away; a skipped entry
//! simply cannot run. When `script_dirs` is set, an entry must resolve
//! (symlinks and `..` collapsed) inside one of those directories, both when
//! the file is loaded and again at every execution, so a symlink swapped in
//! later is caught.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wire::valid_script_name;

/// One allowlisted script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    /// The name callers use.
    pub name: String,
    /// Absolute path of the executable.
    pub path: PathBuf,
    /// Privilege profile name.
    pub profile: String,
    /// Per-run time limit.
    pub timeout: Option<Duration>,
}

/// The loaded allowlist.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    /// Scripts by name.
    pub scripts: BTreeMap<String, Script>,
    /// One message per skipped or doubtful line.
    pub warnings: Vec<String>,
}

/// Why a requested script may not run (logged; the caller only ever sees
/// "script not permitted").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The name breaks the `[A-Za-z0-9_-]+` rule.
    InvalidName,
    /// Not in the allowlist.
    NotAllowlisted,
    /// Resolves outside `script_dirs` (or cannot be resolved).
    OutsideScriptDirs,
}

impl Refusal {
    /// Short reason for the audit line.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::InvalidName => "invalid-name",
            Refusal::NotAllowlisted => "not-allowlisted",
            Refusal::OutsideScriptDirs => "outside-script-dirs",
        }
    }
}

/// Is `path` (resolved) inside one of `dirs` (resolved)?
pub fn inside_dirs(path: &Path, dirs: &[PathBuf]) -> bool {
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    dirs.iter().any(|d| std::fs::canonicalize(d).is_ok_and(|rd| real.starts_with(&rd)))
}

fn is_annotation(tok: &str) -> Option<(&str, &str)> {
    let (k, v) = tok.split_once('=')?;
    (!k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')).then_some((k, v))
}

impl Allowlist {
    /// Parse allowlist text. `script_dirs` (may be empty) filters entries.
    pub fn parse(path: &Path, text: &str, script_dirs: &[PathBuf]) -> Allowlist {
        let mut list = Allowlist::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut warn = |msg: String| list.warnings.push(format!("{}:{}: {msg}", path.display(), i + 1));
            let Some((name, value)) = line.split_once('=') else {
                warn(format!("skipped '{line}': expected '<name> = <absolute path>'"));
                continue;
            };
            let name = name.trim();
            if !valid_script_name(name) {
                warn(format!("skipped '{name}': names may only hold letters, digits, '_' and '-'"));
                continue;
            }
            let mut paths = Vec::new();
            let mut profile = "default".to_string();
            let mut timeout = None;
            let mut bad = None;
            for tok in value.split_whitespace() {
                match is_annotation(tok) {
                    Some(("profile", "")) => bad = Some("empty profile= annotation".to_string()),
                    Some(("profile", v)) => profile = v.to_string(),
                    Some(("timeout", v)) => match v.strip_suffix('s').unwrap_or(v).parse::<u64>() {
                        Ok(s) if (1..=7 * 86_400).contains(&s) && v.starts_with(|c: char| c.is_ascii_digit()) => {
                            timeout = Some(Duration::from_secs(s))
                        }
                        _ => bad = Some(format!("invalid timeout '{v}' (whole seconds, 1 to 604800)")),
                    },
                    Some((k, _)) => warn(format!("'{name}': unknown annotation '{k}' ignored")),
                    None => paths.push(tok),
                }
            }
            let reason = match (bad, paths.as_slice()) {
                (Some(b), _) => Some(b),
                (None, []) => Some("no path".to_string()),
                (None, [_, _, ..]) => Some("more than one path".to_string()),
                (None, [p]) if !p.starts_with('/') => Some(format!("path '{p}' is not absolute")),
                (None, [p]) if !script_dirs.is_empty() && !inside_dirs(Path::new(p), script_dirs) => {
                    Some(format!("path '{p}' is not inside script_dirs (or does not exist)"))
                }
                _ => None,
            };
            if let Some(r) = reason {
                warn(format!("skipped '{name}': {r}"));
                continue;
            }
            let script = Script { name: name.to_string(), path: PathBuf::from(paths[0]), profile, timeout };
            if list.scripts.insert(name.to_string(), script).is_some() {
                warn(format!("'{name}' listed again: the later line wins"));
            }
        }
        list
    }

    /// Read and parse the allowlist file.
    pub fn load(path: &Path, script_dirs: &[PathBuf]) -> Result<Allowlist, crate::fsutil::FsError> {
        let text = crate::fsutil::read_text(path)?;
        Ok(Self::parse(path, &text, script_dirs))
    }

    /// Decide whether `name` may run now.
    pub fn resolve(&self, name: &str, script_dirs: &[PathBuf]) -> Result<&Script, Refusal> {
        if !valid_script_name(name) {
            return Err(Refusal::InvalidName);
        }
        let s = self.scripts.get(name).ok_or(Refusal::NotAllowlisted)?;
        if !script_dirs.is_empty() && !inside_dirs(&s.path, script_dirs) {
            return Err(Refusal::OutsideScriptDirs);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_annotations() {
        let text = "# c\necho = /bin/echo\nslow = timeout=5 /bin/sleep profile=web\nbad name = /x\nrel = bin/x\ntwo = /a /b\nnone = profile=x\nt = /x timeout=0\nfut = /x future=1\necho = /usr/bin/echo\np = /x timeout=+5\nq = /x timeout=5ss\nr = /x profile=\ns = /x timeout=30s\n";
        let l = Allowlist::parse(Path::new("s.conf"), text, &[]);
        assert_eq!(l.scripts.len(), 4, "{:?}", l.scripts.keys());
        assert_eq!(l.scripts["s"].timeout, Some(Duration::from_secs(30)));
        let slow = &l.scripts["slow"];
        assert_eq!(slow.timeout, Some(Duration::from_secs(5)));
        assert_eq!(slow.profile, "web");
        assert_eq!(l.scripts["echo"].path, PathBuf::from("/usr/bin/echo"));
        assert_eq!(l.scripts["fut"].profile, "default");
        assert!(l.warnings.iter().any(|w| w.contains("s.conf:4:")), "{:?}", l.warnings);
        assert_eq!(l.warnings.len(), 10, "{:?}", l.warnings);
    }

    #[test]
    fn resolution_table() {
        let d = tempfile::tempdir().unwrap();
        let ok_dir = d.path().join("scripts");
        std::fs::create_dir(&ok_dir).unwrap();
        std::fs::write(ok_dir.join("a.sh"), "#!/bin/sh\n").unwrap();
        std::fs::write(d.path().join("outside.sh"), "#!/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(d.path().join("outside.sh"), ok_dir.join("link.sh")).unwrap();
        let text = format!("a = {0}/a.sh\nlink = {0}/link.sh\ndotdot = {0}/../outside.sh\n", ok_dir.display());
        let all = Allowlist::parse(Path::new("s"), &text, &[]);
        let dirs = vec![ok_dir.clone()];
        let cases = [
            ("a", Ok(())),
            ("link", Err(Refusal::OutsideScriptDirs)),
            ("dotdot", Err(Refusal::OutsideScriptDirs)),
            ("missing", Err(Refusal::NotAllowlisted)),
            ("../x", Err(Refusal::InvalidName)),
            ("a/b", Err(Refusal::InvalidName)),
            ("", Err(Refusal::InvalidName)),
            ("a;b", Err(Refusal::InvalidName)),
        ];
        for (name, want) in cases {
            assert_eq!(all.resolve(name, &dirs).map(|_| ()), want, "{name}");
        }
        // Loading with script_dirs drops the escaping entries up front.
        let filtered = Allowlist::parse(Path::new("s"), &text, &dirs);
        assert_eq!(filtered.scripts.keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(filtered.warnings.len(), 2);
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "(?s).{0,300}") {
            let _ = Allowlist::parse(Path::new("x"), &s, &[]);
        }
    }
}

/// Largest schema sidecar read (bigger ones are treated as absent).
pub const MAX_SCHEMA: u64 = 64 << 10;

/// A script's schema sidecar (`<script path>.schema.json`): the body,
/// advertised verbatim, and its version.
#[derive(Debug, Clone)]
pub struct Schema {
    /// The sidecar's JSON object, never interpreted here.
    pub body: miniserde::json::Value,
    /// Its own `version` when valid, else `sha256:` + 12 hex of the canonical JSON.
    pub version: String,
}

/// Read the sidecar of `script`: `Ok(None)` when there is none, `Err(why)`
/// when there is one that cannot be used (then it is treated as absent).
/// Also returns why an explicit `version` was not used, if it was not.
pub fn load_schema(script: &Path) -> Result<Option<(Schema, Option<String>)>, String> {
    let mut p = script.as_os_str().to_owned();
    p.push(".schema.json");
    let path = PathBuf::from(p);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if meta.len() > MAX_SCHEMA {
        return Err(format!("{} is larger than {MAX_SCHEMA} bytes", path.display()));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let Some(obj) = crate::wire::parse_object(&text) else {
        return Err(format!("{} is not a JSON object", path.display()));
    };
    let body = miniserde::json::Value::Object(obj);
    // Canonical form: keys sorted (miniserde's objects are ordered maps), no spaces.
    let canonical = || {
        format!(
            "sha256:{}",
            &crate::wire::hex(&openssl::sha::sha256(miniserde::json::to_string(&body).as_bytes()))[..12]
        )
    };
    let explicit = match &body {
        miniserde::json::Value::Object(o) => o.get("version").cloned(),
        _ => None,
    };
    let (version, note) = match explicit {
        None => (canonical(), None),
        Some(miniserde::json::Value::String(v))
            if (1..=64).contains(&v.len())
                && !v.starts_with("sha256:")
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
        {
            (v, None)
        }
        Some(_) => {
            (canonical(), Some("version is not [A-Za-z0-9._-]{1,64} (or starts with sha256:); derived one".into()))
        }
    };
    Ok(Some((Schema { body, version }, note)))
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    #[test]
    fn sidecar_versions() {
        let d = tempfile::tempdir().unwrap();
        let script = d.path().join("echo.sh");
        assert!(load_schema(&script).unwrap().is_none());
        // the Perl peer's own sidecar and the version it derived
        std::fs::write(
            d.path().join("echo.sh.schema.json"),
            r#"{"description":"print the arguments","arguments":[{"name":"words","type":"string","required":false}]}"#,
        )
        .unwrap();
        assert_eq!(load_schema(&script).unwrap().unwrap().0.version, "sha256:45126df154ea");
        std::fs::write(d.path().join("echo.sh.schema.json"), r#"{"version":"1.2.0","arguments":[]}"#).unwrap();
        assert_eq!(load_schema(&script).unwrap().unwrap().0.version, "1.2.0");
        std::fs::write(d.path().join("echo.sh.schema.json"), r#"{"version":"sha256:fake"}"#).unwrap();
        let (s, note) = load_schema(&script).unwrap().unwrap();
        assert!(s.version.starts_with("sha256:") && s.version != "sha256:fake" && note.is_some());
        std::fs::write(d.path().join("echo.sh.schema.json"), "[1,2]").unwrap();
        assert!(load_schema(&script).is_err());
        std::fs::write(d.path().join("echo.sh.schema.json"), vec![b' '; (MAX_SCHEMA + 1) as usize]).unwrap();
        assert!(load_schema(&script).is_err());
    }
}
