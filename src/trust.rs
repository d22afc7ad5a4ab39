//! Who the agent trusts: the trusted-dispatcher map and the revocation list.
//!
//! Both files key on certificate serials in canonical form
//! ([`crate::wire::canonical_serial`]). The map says which dispatcher a
//! serial belongs to (`<serial> <dispatcher-id>` per line); the revocation
//! list names serials refused on every connection. Both are read at start and
//! on SIGHUP; a bad line is skipped with a warning, never fatal, and a missing
//! file means "nobody" (map) or "nothing revoked" (list).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;

use crate::wire::{canonical_serial, valid_dispatcher_id};

/// Serial → dispatcher id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedMap(pub BTreeMap<String, String>);

/// The result of loading a list file: its entries and per-line warnings.
#[derive(Debug, Clone, Default)]
pub struct Loaded<T> {
    /// What was read.
    pub value: T,
    /// `false` when the file does not exist.
    pub present: bool,
    /// One message per skipped line.
    pub warnings: Vec<String>,
}

fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn content(line: &str) -> &str {
    line.split('#').next().unwrap_or("").trim()
}

/// One map line: `Some(Ok(entry))`, `Some(Err(text))` for a bad line, `None` for nothing.
fn map_line(line: &str) -> Option<Result<(String, String), &str>> {
    let l = content(line);
    if l.is_empty() {
        return None;
    }
    let mut it = l.split_whitespace();
    Some(match (it.next().and_then(canonical_serial), it.next()) {
        (Some(serial), Some(id)) if valid_dispatcher_id(id) => Ok((serial, id.to_string())),
        _ => Err(l),
    })
}

impl TrustedMap {
    /// Read the map; unreadable (not missing) files are an error.
    pub fn load(path: &Path) -> io::Result<Loaded<TrustedMap>> {
        let Some(text) = read_optional(path)? else {
            return Ok(Loaded { value: TrustedMap::default(), present: false, warnings: vec![] });
        };
        let mut map = BTreeMap::new();
        let mut warnings = Vec::new();
        for (i, line) in text.lines().enumerate() {
            match map_line(line) {
                Some(Ok((serial, id))) => {
                    map.insert(serial, id);
                }
                Some(Err(l)) => warnings.push(format!(
                    "{}:{}: skipped '{l}' (expected '<hex serial> <dispatcher-id>')",
                    path.display(),
                    i + 1
                )),
                None => {}
            }
        }
        Ok(Loaded { value: TrustedMap(map), present: true, warnings })
    }

    /// Parse map text, skipping bad lines.
    pub fn parse(text: &str) -> TrustedMap {
        TrustedMap(text.lines().filter_map(map_line).filter_map(Result::ok).collect())
    }

    /// The dispatcher id for a (canonical) serial.
    pub fn lookup(&self, serial: &str) -> Option<&str> {
        self.0.get(serial).map(|s| s.as_str())
    }

    /// The file text: two comment lines, then entries sorted by serial.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "# ctrl-exec trusted dispatchers: <serial> <id>, one per line.\n# Managed by pairing - do not edit by hand.\n",
        );
        for (serial, id) in &self.0 {
            s.push_str(&format!("{serial} {id}\n"));
        }
        s
    }

    /// Write the map atomically (0644).
    pub fn save(&self, path: &Path) -> Result<(), crate::fsutil::FsError> {
        crate::fsutil::atomic_write(path, self.render().as_bytes(), 0o644)
    }
}

/// Load the revocation list (one serial per line, `#` comments).
pub fn load_revoked(path: &Path) -> io::Result<Loaded<BTreeSet<String>>> {
    let Some(text) = read_optional(path)? else {
        return Ok(Loaded { value: BTreeSet::new(), present: false, warnings: vec![] });
    };
    let mut set = BTreeSet::new();
    let mut warnings = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = content(line);
        if l.is_empty() {
            continue;
        }
        match canonical_serial(l) {
            Some(s) => {
                set.insert(s);
            }
            None => warnings.push(format!("{}:{}: skipped '{}' (not a hex serial)", path.display(), i + 1, l)),
        }
    }
    Ok(Loaded { value: set, present: true, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trip_and_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("map");
        std::fs::write(&p, "# c\n02 perl-peer\n1F other # note\nzz bad\n7 -bad\n\n3\n").unwrap();
        let l = TrustedMap::load(&p).unwrap();
        assert_eq!(l.value.lookup("2"), Some("perl-peer"));
        assert_eq!(l.value.lookup("1f"), Some("other"));
        assert_eq!(l.warnings.len(), 3, "{:?}", l.warnings);
        l.value.save(&p).unwrap();
        let again = TrustedMap::load(&p).unwrap();
        assert_eq!(again.value, l.value);
        assert!(again.warnings.is_empty());
        assert!(std::fs::read_to_string(&p).unwrap().starts_with("# ctrl-exec trusted dispatchers"));
    }

    #[test]
    fn missing_files_are_empty() {
        let d = tempfile::tempdir().unwrap();
        let l = TrustedMap::load(&d.path().join("none")).unwrap();
        assert!(!l.present && l.value.0.is_empty());
        let r = load_revoked(&d.path().join("none")).unwrap();
        assert!(!r.present && r.value.is_empty());
    }

    #[test]
    fn revocation_spellings() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rev");
        std::fs::write(&p, "serial=0A\n00:1f # old dispatcher\n0x7B\nnot-a-serial\n").unwrap();
        let r = load_revoked(&p).unwrap();
        assert_eq!(r.value.iter().cloned().collect::<Vec<_>>(), vec!["1f", "7b", "a"]);
        assert_eq!(r.warnings.len(), 1);
    }
}
