//! The dispatcher's client identities: the current certificate and, during a
//! rotation's overlap window, the previous one.
//!
//! After `rotate-cert` the new certificate is at the configured `cert`/`key`
//! paths and the one it replaced is kept beside them as `<cert>.prev` and
//! `<key>.prev`. Each agent is then spoken to with the certificate it is
//! known to trust ([`Identities::for_agent`]): the new one once its registry
//! record says it confirmed the new serial (`serial_status = current` and
//! `dispatcher_serial` = the current serial), the previous one otherwise. So
//! no run fails while a rotation is being broadcast, and the `add` broadcast
//! itself goes out under the old, already trusted serial. Retirement deletes
//! the `.prev` files, and from then on everybody gets the new certificate.
//!
//! Each identity has its own TLS context and its own session cache, so a
//! resumed session never crosses from one certificate to the other.
//!
//! A rotation installs the new key and certificate by renaming
//! `<key>.next` and `<cert>.next` over the live files once `rotation.json`
//! names the new serial. Two renames cannot be one atomic step; if a crash
//! falls between them, [`load`] finds the matching pair among the live and
//! `.next` files and finishes the installation when it may write there.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use openssl::pkey::{PKey, Private};
use openssl::ssl::SslContext;
use openssl::x509::X509;

use crate::client::SessionCache;
use crate::config::DispatcherConfig;
use crate::registry::AgentRecord;
use crate::tls::TlsError;

/// `<path>.prev`: the identity a rotation replaced.
pub fn prev_path(p: &Path) -> PathBuf {
    suffixed(p, "prev")
}

/// `<path>.next`: a rotation's new identity before it is installed.
pub fn next_path(p: &Path) -> PathBuf {
    suffixed(p, "next")
}

fn suffixed(p: &Path, ext: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// One certificate and key, ready to connect.
pub struct Identity {
    /// Canonical serial of the certificate.
    pub serial: String,
    /// Certificate file it was loaded from.
    pub cert_path: PathBuf,
    /// TLS client context presenting it.
    pub ctx: SslContext,
    /// Resumable sessions made with it (and only with it).
    pub cache: Option<SessionCache>,
    /// Open connections made with it, for a long-running dispatcher.
    pub pool: Option<crate::client::Pool>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("serial", &self.serial).field("cert", &self.cert_path).finish()
    }
}

/// The identities in use and what they were loaded from.
#[derive(Debug)]
pub struct Identities {
    /// The configured certificate (the new one after a rotation).
    pub current: Identity,
    /// The replaced certificate, during the overlap window.
    pub previous: Option<Identity>,
    stamp: Stamp,
}

/// Modification times and sizes of the files an identity set depends on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stamp(Vec<Option<(SystemTime, u64, u64)>>);

impl Stamp {
    /// Stat the files behind `cfg`'s identities.
    pub fn of(cfg: &DispatcherConfig) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let files = [cfg.cert.clone(), cfg.key.clone(), prev_path(&cfg.cert), cfg.rotation_file.clone()];
        Stamp(
            files
                .iter()
                .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino()))))
                .collect(),
        )
    }
}

impl Identities {
    /// The identity to present to an agent with this registry record (or none).
    pub fn for_agent(&self, rec: Option<&AgentRecord>) -> &Identity {
        match (&self.previous, rec) {
            (None, _) => &self.current,
            (Some(_), Some(r)) if confirmed(r, &self.current.serial) => &self.current,
            (Some(prev), _) => prev,
        }
    }

    /// Did the files change since these identities were loaded?
    pub fn stale(&self, cfg: &DispatcherConfig) -> bool {
        Stamp::of(cfg) != self.stamp
    }
}

/// Has this agent confirmed that it trusts `serial`?
pub fn confirmed(rec: &AgentRecord, serial: &str) -> bool {
    rec.serial_status == "current" && rec.dispatcher_serial == serial
}

/// A certificate and key read from disk, checked to belong together.
pub struct Pair {
    /// The certificate.
    pub cert: X509,
    /// Its private key.
    pub key: PKey<Private>,
    /// Canonical serial.
    pub serial: String,
}

/// Read `cert` and `key`; `None` unless both parse and match.
pub fn read_pair(cert: &Path, key: &Path) -> Option<Pair> {
    let c = X509::from_pem(&std::fs::read(cert).ok()?).ok()?;
    let k = PKey::private_key_from_pem(&std::fs::read(key).ok()?).ok()?;
    if !c.public_key().ok()?.public_eq(&k) {
        return None;
    }
    Some(Pair { serial: crate::ca::cert_serial(&c), cert: c, key: k })
}

/// Finish an interrupted installation: when the live cert and key do not
/// match but a `.next` file completes a pair whose serial `rotation.json`
/// names as current, rename it into place. Returns the paths of the pair to
/// use (the live ones after a successful repair, or the `.next` ones if this
/// process may not write there), or `None` if nothing needed doing.
pub fn repair(cfg: &DispatcherConfig, current_serial: Option<&str>) -> Option<(PathBuf, PathBuf)> {
    let (cert, key) = (&cfg.cert, &cfg.key);
    if read_pair(cert, key).is_some_and(|p| current_serial.is_none_or(|s| s == p.serial)) {
        return None;
    }
    let want = current_serial?;
    let (ncert, nkey) = (next_path(cert), next_path(key));
    let candidates = [(ncert.clone(), nkey.clone()), (ncert.clone(), key.clone()), (cert.clone(), nkey.clone())];
    let (c, k) = candidates.into_iter().find(|(c, k)| read_pair(c, k).is_some_and(|p| p.serial == want))?;
    let mut ok = true;
    if k != *key {
        ok &= std::fs::rename(&k, key).is_ok();
        crate::rotation::failpoint("key-installed");
    }
    if c != *cert && ok {
        ok &= std::fs::rename(&c, cert).is_ok();
    }
    crate::rotation::sync_dir(cert);
    if ok && read_pair(cert, key).is_some_and(|p| p.serial == want) {
        crate::audit::info("cert-install-repair", &[("SERIAL", want)]);
        Some((cert.clone(), key.clone()))
    } else {
        // Read-only here (an unprivileged API server): use the pair where it is.
        let (c, k) = [(ncert.clone(), nkey.clone()), (ncert, key.clone()), (cert.clone(), nkey)]
            .into_iter()
            .find(|(c, k)| read_pair(c, k).is_some_and(|p| p.serial == want))?;
        Some((c, k))
    }
}

fn make(cfg: &DispatcherConfig, cert: &Path, key: &Path, persistent: bool) -> Result<Identity, TlsError> {
    let ctx = crate::tls::client_context(cert, key, &cfg.ca)?;
    let pem = std::fs::read(cert).unwrap_or_default();
    let serial = X509::from_pem(&pem).map(|c| crate::ca::cert_serial(&c)).unwrap_or_default();
    let cache = match (&cfg.tls_session_cache, persistent) {
        (None, _) => None,
        // The directory is named after the certificate: one cache per identity.
        (Some(dir), true) => SessionCache::open(dir, &pem),
        (Some(_), false) => Some(SessionCache::in_memory()),
    };
    // A one-shot CLI sends one request per agent: nothing to keep.
    let pool = (!persistent && cfg.agent_keep_alive).then(crate::client::Pool::default);
    Ok(Identity { serial, cert_path: cert.to_path_buf(), ctx, cache, pool })
}

/// Load the current identity and, during an overlap window, the previous
/// one. `persistent` keeps TLS sessions on disk (one-shot CLI) rather than
/// in memory (a long-running server).
pub fn load(cfg: &DispatcherConfig, persistent: bool) -> Result<Identities, TlsError> {
    // A rotation commits rotation.json first and installs the new pair
    // after it. Read with no state but after the install, the new pair would
    // look like the only identity and go to agents that do not trust it yet.
    // So the state is read on both sides of the certificates: if it changed
    // in between, a rotation slipped in, and the load starts again.
    let mut attempt = 0;
    loop {
        let before = std::fs::read(&cfg.rotation_file).ok();
        let ids = load_once(cfg, persistent)?;
        attempt += 1;
        if std::fs::read(&cfg.rotation_file).ok() == before || attempt >= 5 {
            return Ok(ids);
        }
    }
}

fn load_once(cfg: &DispatcherConfig, persistent: bool) -> Result<Identities, TlsError> {
    let stamp = Stamp::of(cfg);
    let state = crate::rotation::load_state(&cfg.rotation_file);
    let (cert, key) = repair(cfg, state.as_ref().map(|s| s.current_serial.as_str()))
        .unwrap_or_else(|| (cfg.cert.clone(), cfg.key.clone()));
    let current = make(cfg, &cert, &key, persistent)?;
    let previous = match state.as_ref().and_then(|s| s.previous_serial.as_deref()) {
        Some(prev) if prev != current.serial => {
            let (pc, pk) = (prev_path(&cfg.cert), prev_path(&cfg.key));
            match read_pair(&pc, &pk) {
                Some(p) if p.serial == prev => make(cfg, &pc, &pk, persistent).ok(),
                _ => None,
            }
        }
        _ => None,
    };
    Ok(Identities { current, previous, stamp })
}
