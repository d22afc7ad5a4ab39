//! The enrolment bundle: an agent's identity as one text-safe stream.
//!
//! `ctrl-exec-ca enroll --bundle` prints it; `ctrl-exec-agent install-bundle`
//! reads it on stdin. It is meant to survive a serial console or a copy and
//! paste: ASCII only, lines of at most 76 characters, anything before the
//! BEGIN line and after the END line is ignored (console noise), line ends
//! and trailing blanks do not matter, and a SHA-256 over the content detects
//! truncation or corruption, in which case nothing at all is installed.
//!
//! ```text
//! -----BEGIN CTRL-EXEC AGENT BUNDLE-----
//! Version: 1
//! Name: web1
//! Port: 7443
//! Bind: 0.0.0.0
//! File: agent.key 600 3272
//! <base64, 76 columns>
//! File: …
//! Sha256: <hex over every trimmed line above, joined by \n>
//! -----END CTRL-EXEC AGENT BUNDLE-----
//! ```
//!
//! Installing is idempotent: the same bundle installed twice gives the same
//! files; a bundle carrying a *different* key is refused unless forced, and
//! `agent.conf` / `scripts.conf` are written only when absent so an
//! operator's edits survive a re-install.

use std::fmt;
use std::path::Path;

use crate::fsutil;
use crate::trust::TrustedMap;

const KIND: &str = "AGENT BUNDLE";

/// Files a bundle may carry, with their modes.
pub const FILES: [(&str, u32); 4] =
    [("agent.key", 0o600), ("agent.crt", 0o644), ("ca.crt", 0o644), ("ctrl-exec-dispatchers", 0o644)];

/// A bundle problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleError(pub String);

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BundleError {}

impl From<BundleError> for crate::error::Fail {
    fn from(e: BundleError) -> Self {
        crate::error::Fail::new(e.0)
    }
}

/// An agent identity in transit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Agent name (registry name; reported host name).
    pub name: String,
    /// Listen port.
    pub port: u16,
    /// Listen address.
    pub bind: String,
    /// `(file name, content)` for each of [`FILES`].
    pub files: Vec<(String, Vec<u8>)>,
}

fn mode_of(name: &str) -> Option<u32> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

impl Bundle {
    /// The text form.
    pub fn render(&self) -> String {
        let mut lines = vec![
            "Version: 1".to_string(),
            format!("Name: {}", self.name),
            format!("Port: {}", self.port),
            format!("Bind: {}", self.bind),
        ];
        for (name, data) in &self.files {
            lines.push(format!("File: {name} {:o} {}", mode_of(name).unwrap_or(0o600), data.len()));
            lines.extend(crate::armor::base64_lines(data));
        }
        crate::armor::wrap(KIND, &lines)
    }

    /// Parse the text form (surrounding noise allowed).
    pub fn parse(text: &str) -> Result<Bundle, BundleError> {
        let e = |m: &str| BundleError(m.to_string());
        let owned = crate::armor::unwrap(KIND, "bundle", text).map_err(|x| BundleError(x.0))?;
        let body: Vec<&str> = owned.iter().map(String::as_str).collect();
        let mut name = None;
        let mut port = None;
        let mut bind = "0.0.0.0".to_string();
        let mut files: Vec<(String, usize, String)> = Vec::new();
        for l in body {
            if let Some(v) = l.strip_prefix("Name:") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = l.strip_prefix("Port:") {
                port = v.trim().parse::<u16>().ok();
            } else if let Some(v) = l.strip_prefix("Bind:") {
                bind = v.trim().to_string();
            } else if let Some(v) = l.strip_prefix("File:") {
                let mut it = v.split_whitespace();
                let (Some(n), Some(_mode), Some(len)) = (it.next(), it.next(), it.next().and_then(|s| s.parse().ok()))
                else {
                    return Err(e("malformed File line in bundle"));
                };
                if mode_of(n).is_none() {
                    return Err(BundleError(format!("bundle carries an unexpected file '{n}'")));
                }
                files.push((n.to_string(), len, String::new()));
            } else if l.starts_with("Version:") {
                if l != "Version: 1" {
                    return Err(e("bundle version not supported by this ctrl-exec; upgrade the agent"));
                }
            } else if let Some(f) = files.last_mut() {
                f.2.push_str(l);
            }
        }
        let name = name.filter(|n| crate::wire::valid_agent_name(n)).ok_or_else(|| e("bundle has no valid Name"))?;
        let port = port.filter(|p| *p > 0).ok_or_else(|| e("bundle has no valid Port"))?;
        if bind.parse::<std::net::IpAddr>().is_err() {
            return Err(BundleError(format!("bundle has an invalid Bind address '{bind}'")));
        }
        let mut out = Vec::new();
        for (n, len, b64) in files {
            let data = openssl::base64::decode_block(&b64)
                .map_err(|_| BundleError(format!("file '{n}' is not valid base64")))?;
            if data.len() != len {
                return Err(BundleError(format!("file '{n}' has {} bytes, expected {len}", data.len())));
            }
            out.push((n, data));
        }
        for (n, _) in FILES {
            if !out.iter().any(|(f, _)| f == n) {
                return Err(BundleError(format!("bundle lacks {n}")));
            }
        }
        Ok(Bundle { name, port, bind, files: out })
    }

    fn file(&self, name: &str) -> &[u8] {
        self.files.iter().find(|(n, _)| n == name).map(|(_, d)| d.as_slice()).unwrap_or(&[])
    }

    /// Write the identity into `dir`. Returns one line per file for the operator.
    ///
    /// `state`: where the agent writes at run time (staged certificate,
    /// detached-run results). `None` keeps them in `dir`, which suits a
    /// self-contained directory; a read-only `/etc` needs a separate one.
    pub fn install(&self, dir: &Path, state: Option<&Path>, force: bool) -> Result<Vec<String>, BundleError> {
        self.install_at(&dir.join("agent.conf"), state, force)
    }

    /// Write the identity for the agent configured by `conf`: where that
    /// file exists, its `key`, `cert`, `ca`, `trusted_dispatchers_path` and
    /// `allowlist` say where the files go; otherwise they go next to it
    /// under their usual names and a fresh `agent.conf` is written.
    pub fn install_at(&self, conf: &Path, state: Option<&Path>, force: bool) -> Result<Vec<String>, BundleError> {
        let fs_err = |e: fsutil::FsError| BundleError(e.to_string());
        let paths = InstallPaths::for_conf(conf)?;
        let dir = paths.dir.as_path();
        fsutil::ensure_dir(dir, 0o750).map_err(fs_err)?;
        if let Some(s) = state {
            if !s.is_absolute() {
                return Err(BundleError(format!("--state-dir must be an absolute path, not {}", s.display())));
            }
            fsutil::ensure_dir(s, 0o750).map_err(fs_err)?;
        }
        for d in [&paths.key, &paths.cert, &paths.ca, &paths.trusted].iter().filter_map(|p| p.parent()) {
            fsutil::ensure_dir(d, 0o750).map_err(fs_err)?;
        }
        let key_path = paths.key.clone();
        if let Ok(existing) = std::fs::read(&key_path)
            && existing != self.file("agent.key")
            && !force
        {
            return Err(BundleError(format!(
                "{} already holds a different key: this directory belongs to another agent identity (use --force to replace it)",
                key_path.display()
            )));
        }
        let mut report = Vec::new();
        let mut put = |p: &Path, data: &[u8], mode: u32| -> Result<(), BundleError> {
            if std::fs::read(p).is_ok_and(|d| d == data) {
                report.push(format!("unchanged {}", p.display()));
                return Ok(());
            }
            fsutil::atomic_replace(p, data, mode).map_err(fs_err)?;
            report.push(format!("wrote     {}", p.display()));
            Ok(())
        };
        // Key first, certificate last: a crash in between leaves a key/cert
        // mismatch the agent refuses to serve with, and re-running the
        // install finishes it.
        put(&key_path, self.file("agent.key"), 0o600)?;
        put(&paths.ca, self.file("ca.crt"), 0o644)?;
        // The trusted map is merged, not replaced: entries for other
        // dispatchers sharing this agent survive.
        let map_path = paths.trusted.clone();
        let mut map = TrustedMap::load(&map_path).map(|l| l.value).unwrap_or_default();
        let incoming = TrustedMap::parse(&String::from_utf8_lossy(self.file("ctrl-exec-dispatchers")));
        map.0.extend(incoming.0);
        put(&map_path, map.render().as_bytes(), 0o644)?;
        put(&paths.cert, self.file("agent.crt"), 0o644)?;
        let conf = conf.to_path_buf();
        match std::fs::read_to_string(&conf) {
            Ok(text) => {
                let (updated, changes) = set_listen(&text, self.port, &self.bind);
                if changes.is_empty() {
                    report.push(format!("kept      {} (already present)", conf.display()));
                } else {
                    fsutil::atomic_replace(&conf, updated.as_bytes(), 0o640).map_err(fs_err)?;
                    report.push(format!("updated   {} ({})", conf.display(), changes.join(", ")));
                }
            }
            Err(_) => {
                fsutil::atomic_write(&conf, agent_conf(&self.name, self.port, &self.bind, state).as_bytes(), 0o640)
                    .map_err(fs_err)?;
                report.push(format!("wrote     {}", conf.display()));
            }
        }
        let scripts = paths.allowlist;
        if scripts.exists() {
            report.push(format!("kept      {} (already present)", scripts.display()));
        } else {
            fsutil::atomic_write(&scripts, SCRIPTS_TEMPLATE.as_bytes(), 0o640).map_err(fs_err)?;
            report.push(format!("wrote     {}", scripts.display()));
        }
        Ok(report)
    }
}

/// Where an installed identity's files go.
#[derive(Debug, Clone)]
pub struct InstallPaths {
    /// The configuration's directory.
    pub dir: std::path::PathBuf,
    /// Private key.
    pub key: std::path::PathBuf,
    /// Certificate.
    pub cert: std::path::PathBuf,
    /// CA certificate.
    pub ca: std::path::PathBuf,
    /// Trusted-dispatcher map.
    pub trusted: std::path::PathBuf,
    /// Allowlist.
    pub allowlist: std::path::PathBuf,
    /// The configuration file exists (its paths were used).
    pub configured: bool,
}

impl InstallPaths {
    /// Paths for the agent configured by `conf` (see [`Bundle::install_at`]).
    pub fn for_conf(conf: &Path) -> Result<InstallPaths, BundleError> {
        let dir = match conf.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        if conf.exists() {
            let c = crate::config::AgentConfig::load(conf).map_err(|e| BundleError(e.to_string()))?;
            return Ok(InstallPaths {
                dir,
                key: c.key,
                cert: c.cert,
                ca: c.ca,
                trusted: c.trusted_dispatchers_path,
                allowlist: c.allowlist,
                configured: true,
            });
        }
        Ok(InstallPaths {
            key: dir.join("agent.key"),
            cert: dir.join("agent.crt"),
            ca: dir.join("ca.crt"),
            trusted: dir.join("ctrl-exec-dispatchers"),
            allowlist: dir.join("scripts.conf"),
            configured: false,
            dir,
        })
    }
}

/// Set `port` and `bind` in an existing agent.conf, keeping every other line
/// (comments, hand edits). Returns the new text and what changed.
fn set_listen(text: &str, port: u16, bind: &str) -> (String, Vec<String>) {
    let mut out = Vec::new();
    let mut changes = Vec::new();
    let mut seen = (false, false);
    let mut in_main = true;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_main = false;
        }
        let key = t.split('=').next().unwrap_or("").trim();
        let value = t.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
        if in_main && !t.starts_with('#') && (key == "port" || key == "bind") {
            let want = if key == "port" { port.to_string() } else { bind.to_string() };
            if key == "port" {
                seen.0 = true
            } else {
                seen.1 = true
            }
            if value != want {
                changes.push(format!("{key} {value} -> {want}"));
                out.push(format!("{key} = {want}"));
                continue;
            }
        }
        out.push(line.to_string());
    }
    let mut head = Vec::new();
    if !seen.0 {
        changes.push(format!("port -> {port}"));
        head.push(format!("port = {port}"));
    }
    if !seen.1 && bind != "0.0.0.0" {
        changes.push(format!("bind -> {bind}"));
        head.push(format!("bind = {bind}"));
    }
    head.extend(out);
    let mut text = head.join("\n");
    text.push('\n');
    (text, changes)
}

/// A ready `agent.conf` whose paths are relative to its own directory, so the
/// directory can be moved or copied as a whole; with `state`, the files the
/// agent writes at run time go there instead.
pub fn agent_conf(name: &str, port: u16, bind: &str, state: Option<&Path>) -> String {
    let (staged, runs) = match state {
        Some(s) => (s.join("agent.crt.staged").display().to_string(), s.join("runs").display().to_string()),
        None => ("agent.crt.staged".into(), "runs".into()),
    };
    format!(
        "# ctrl-exec agent configuration for '{name}', written at enrolment.\n\
         # Relative paths are relative to this file's directory.\n\
         port = {port}\n\
         bind = {bind}\n\
         hostname = {name}\n\
         cert = agent.crt\n\
         key = agent.key\n\
         ca = ca.crt\n\
         allowlist = scripts.conf\n\
         trusted_dispatchers_path = ctrl-exec-dispatchers\n\
         revoked_serials = revoked-serials\n\
         cert_staging_path = {staged}\n\
         async_runs_dir = {runs}\n\
         # max_output = 1048576\n\
         # auth_hook = /etc/ctrl-exec-agent/auth-hook\n\
         # script_dirs = /opt/ctrl-exec-scripts\n"
    )
}

/// The allowlist written at enrolment: empty, with the syntax explained.
pub const SCRIPTS_TEMPLATE: &str = "# ctrl-exec allowlist: <name> = <absolute path> [timeout=<seconds>]\n\
# Only scripts named here can run. Arguments reach the script as argv,\n\
# never through a shell. Reload with SIGHUP after editing.\n\
# disk-usage = /opt/ctrl-exec-scripts/disk-usage.sh timeout=30\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bundle {
        Bundle {
            name: "web1".into(),
            port: 7443,
            bind: "0.0.0.0".into(),
            files: FILES
                .iter()
                .map(|(n, _)| (n.to_string(), format!("{n} content\n").repeat(40).into_bytes()))
                .collect(),
        }
    }

    #[test]
    fn round_trip_through_a_noisy_console() {
        let b = sample();
        let text = b.render();
        assert!(text.lines().all(|l| l.len() <= 76 && l.is_ascii()));
        let noisy = format!("login: root\r\n# {}\r\ntrailing junk\n", text.replace('\n', "  \r\n"));
        assert_eq!(Bundle::parse(&noisy).unwrap(), b);
    }

    #[test]
    fn damage_is_detected() {
        let text = sample().render();
        let lines: Vec<&str> = text.lines().collect();
        // drop a line in the middle
        let cut: String = lines.iter().enumerate().filter(|(i, _)| *i != 8).map(|(_, l)| format!("{l}\n")).collect();
        assert!(Bundle::parse(&cut).unwrap_err().0.contains("checksum"));
        // cut off before the end
        let short: String = lines[..lines.len() - 3].iter().map(|l| format!("{l}\n")).collect();
        assert!(Bundle::parse(&short).unwrap_err().0.contains("incomplete"));
        // a flipped character
        let flipped = text.replacen("Port: 7443", "Port: 7444", 1);
        assert!(Bundle::parse(&flipped).is_err());
        assert!(Bundle::parse("hello").is_err());
    }

    #[test]
    fn reinstall_updates_the_port_and_merges_trust() {
        let d = tempfile::tempdir().unwrap();
        let mut b = sample();
        b.files[3].1 = b"2 disp-a\n".to_vec();
        b.install(d.path(), None, false).unwrap();
        let conf = d.path().join("agent.conf");
        let text = std::fs::read_to_string(&conf).unwrap().replace("# max_output = 1048576", "max_output = 5000");
        std::fs::write(&conf, text).unwrap();
        std::fs::write(d.path().join("ctrl-exec-dispatchers"), "2 disp-a\n7b disp-b\n").unwrap();
        b.port = 7444;
        b.bind = "127.0.0.1".into();
        let report = b.install(d.path(), None, false).unwrap();
        assert!(
            report.iter().any(|l| l.contains("port 7443 -> 7444") && l.contains("bind 0.0.0.0 -> 127.0.0.1")),
            "{report:?}"
        );
        let text = std::fs::read_to_string(&conf).unwrap();
        assert!(
            text.contains("\nport = 7444\n")
                && text.contains("\nbind = 127.0.0.1\n")
                && text.contains("max_output = 5000")
        );
        let map = std::fs::read_to_string(d.path().join("ctrl-exec-dispatchers")).unwrap();
        assert!(map.contains("2 disp-a\n") && map.contains("7b disp-b\n"), "{map}");
        crate::config::AgentConfig::load(&conf).unwrap();
    }

    #[test]
    fn install_is_idempotent_and_guards_identity() {
        let d = tempfile::tempdir().unwrap();
        let b = sample();
        b.install(d.path(), None, false).unwrap();
        assert_eq!(fsutil::mode_of(&d.path().join("agent.key")), Some(0o600));
        std::fs::write(d.path().join("scripts.conf"), "mine = /bin/true\n").unwrap();
        let again = b.install(d.path(), None, false).unwrap();
        assert!(again.iter().filter(|l| l.starts_with("unchanged")).count() == 4, "{again:?}");
        assert_eq!(std::fs::read_to_string(d.path().join("scripts.conf")).unwrap(), "mine = /bin/true\n");
        let mut other = sample();
        other.files[0].1 = b"another key".to_vec();
        assert!(other.install(d.path(), None, false).unwrap_err().0.contains("different key"));
        other.install(d.path(), None, true).unwrap();
        assert_eq!(std::fs::read(d.path().join("agent.key")).unwrap(), b"another key");
    }
}
