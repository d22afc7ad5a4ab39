//! Pairing, agent side: find out where the identity goes, check that it can
//! be written before anything reaches the network, send the request, wait
//! for the operator's answer on the same connection, and install what the
//! dispatcher sent (wire.md §3, behaviour.md §4.2).
//!
//! Every path follows the agent's configuration file: an existing
//! `agent.conf` says where its key, certificate, CA and trusted map live;
//! without one they go next to where it will be written. So pairing runs
//! unprivileged in a scratch directory as well as as root in `/etc`.
//! Nothing is written until the approval has arrived and checked out, and the
//! key never leaves this host.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use smol::Async;

use crate::bundle::{Bundle, InstallPaths};
use crate::ca;
use crate::http;
use crate::pairing::{Approval, PairError, PairRequest};
use crate::tls::TlsStream;
use crate::trust::TrustedMap;
use crate::wire::get_str;

/// Where the identity of the agent configured by `conf` goes, and what is
/// already known from that file.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The agent configuration file (written if absent).
    pub conf: PathBuf,
    /// File locations.
    pub paths: InstallPaths,
    /// Operational port from agent.conf (7443 without one).
    pub port: u16,
    /// `hostname` from agent.conf, if set.
    pub name: Option<String>,
    /// Listen address from agent.conf (0.0.0.0 without one).
    pub bind: String,
}

impl Plan {
    /// Read `conf` if it exists.
    pub fn for_conf(conf: &Path) -> Result<Plan, PairError> {
        let paths = InstallPaths::for_conf(conf).map_err(|e| PairError(e.0))?;
        let (port, name, bind) = if paths.configured {
            let c = crate::config::AgentConfig::load(conf).map_err(|e| PairError(e.to_string()))?;
            (c.port, c.hostname, c.bind)
        } else {
            (crate::registry::DEFAULT_PORT, None, "0.0.0.0".to_string())
        };
        Ok(Plan { conf: conf.to_path_buf(), paths, port, name, bind })
    }

    /// Refuse early, before a key is made or a request queued, if any file
    /// of the identity could not be written.
    pub fn preflight(&self) -> Result<(), PairError> {
        let mut dirs: Vec<&Path> = vec![&self.paths.dir];
        for p in [&self.paths.key, &self.paths.cert, &self.paths.ca, &self.paths.trusted] {
            if let Some(d) = p.parent() {
                dirs.push(d);
            }
        }
        for d in dirs {
            // What an earlier run killed mid-install left behind.
            crate::fsutil::sweep_temp(d);
            if let Err(why) = crate::fsutil::check_writable_dir(d) {
                return Err(PairError(format!(
                    "cannot write the agent's identity: {why}\nRe-run as root or with sudo, or pass --config <dir>/agent.conf for a directory you can write."
                )));
            }
        }
        Ok(())
    }

    /// Is there already a complete identity here?
    pub fn paired(&self) -> bool {
        self.paths.key.exists() && self.paths.cert.exists() && self.paths.ca.exists()
    }

    /// Install an approval: key, certificate, CA, the dispatcher added to
    /// the trusted map (other dispatchers' entries stay), and an agent.conf
    /// if there was none (listening on `port`). Each file is replaced
    /// atomically.
    pub fn install(
        &self,
        name: &str,
        port: u16,
        key_pem: &[u8],
        a: &Approval,
        state: Option<&Path>,
    ) -> Result<Vec<String>, PairError> {
        check_approval(key_pem, a)?;
        let mut map = TrustedMap::default();
        if let Some(serial) = crate::wire::canonical_serial(&a.dispatcher_serial).filter(|s| !s.is_empty()) {
            let id = if a.dispatcher_id.is_empty() { serial.clone() } else { a.dispatcher_id.clone() };
            map.0.insert(serial, id);
        }
        let bundle = Bundle {
            name: name.to_string(),
            port,
            bind: self.bind.clone(),
            files: vec![
                ("agent.key".into(), key_pem.to_vec()),
                ("agent.crt".into(), a.cert.clone().into_bytes()),
                ("ca.crt".into(), a.ca.clone().into_bytes()),
                ("ctrl-exec-dispatchers".into(), map.render().into_bytes()),
            ],
        };
        bundle.install_at(&self.conf, state, true).map_err(|e| PairError(e.0))
    }
}

/// Check that an approval fits the key we made: the certificate is signed
/// by the CA that came with it and carries our public key.
pub fn check_approval(key_pem: &[u8], a: &Approval) -> Result<(), PairError> {
    let cert = openssl::x509::X509::from_pem(a.cert.as_bytes())
        .map_err(|_| PairError("the dispatcher sent a certificate that cannot be parsed".into()))?;
    let ca_cert = openssl::x509::X509::from_pem(a.ca.as_bytes())
        .map_err(|_| PairError("the dispatcher sent a CA certificate that cannot be parsed".into()))?;
    if !ca::verifies_against(&cert, &ca_cert) {
        return Err(PairError("the certificate from the dispatcher is not signed by the CA it sent".into()));
    }
    let key = openssl::pkey::PKey::private_key_from_pem(key_pem).map_err(ca::CaError::from)?;
    let ours = key.public_key_to_der().map_err(ca::CaError::from)?;
    let theirs = cert.public_key().and_then(|k| k.public_key_to_der()).map_err(ca::CaError::from)?;
    if ours != theirs {
        return Err(PairError("the certificate from the dispatcher is not for this agent's key".into()));
    }
    Ok(())
}

/// This host's name for pairing, and whether it has a domain part.
pub fn own_name() -> (String, bool) {
    let short = crate::config::host_name();
    if short.contains('.') {
        return (short, true);
    }
    match canonical_name(&short) {
        Some(fqdn) if fqdn.contains('.') && crate::wire::valid_agent_name(&fqdn) => (fqdn, true),
        _ => (short, false),
    }
}

fn canonical_name(host: &str) -> Option<String> {
    let c = std::ffi::CString::new(host).ok()?;
    // SAFETY: an all-zero addrinfo is a valid hints value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_flags = libc::AI_CANONNAME;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C string, hints and out pointer; the result is freed below.
    let rc = unsafe { libc::getaddrinfo(c.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 || res.is_null() {
        return None;
    }
    // SAFETY: res is a valid list from getaddrinfo; ai_canonname is NUL-terminated when set.
    unsafe {
        let cn = (*res).ai_canonname;
        let n = (!cn.is_null()).then(|| std::ffi::CStr::from_ptr(cn).to_string_lossy().into_owned());
        libc::freeaddrinfo(res);
        n
    }
}

/// Where the dispatcher's pairing listener is.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    /// Name or address as typed.
    pub host: String,
    /// Pairing port.
    pub port: u16,
}

impl Dispatcher {
    async fn addresses(&self) -> Result<Vec<SocketAddr>, PairError> {
        if let Ok(ip) = self.host.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        match smol::net::resolve((self.host.as_str(), self.port)).await {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(PairError(format!(
                "cannot resolve the dispatcher name '{}': check the name or use its IP address",
                self.host
            ))),
        }
    }

    /// Open a TCP connection (the pre-flight probe uses it and closes it).
    pub async fn tcp(&self, limit: Duration) -> Result<Async<TcpStream>, PairError> {
        let addrs = self.addresses().await?;
        let attempt = async {
            let mut last = None;
            for a in &addrs {
                match Async::<TcpStream>::connect(*a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
        };
        match crate::time::timeout(limit, attempt).await {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(PairError(format!(
                "connection refused by {}:{} - is pairing mode running there? Start it with 'ctrl-exec pairing-mode' on the dispatcher",
                self.host, self.port
            ))),
            Some(Err(e)) => Err(PairError(format!("cannot reach {}:{}: {e}", self.host, self.port))),
            None => Err(PairError(format!(
                "no answer from {}:{} within {}s - check the address, the port and any firewall in between",
                self.host,
                self.port,
                limit.as_secs()
            ))),
        }
    }
}

/// A request on its way: the open connection and the dispatcher's id for it.
pub struct Waiting {
    tls: TlsStream,
    /// The dispatcher's pairing request id.
    pub reqid: String,
}

/// How the dispatcher answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Approved (the nonce matched).
    Approved(Approval),
    /// Denied, with the reason.
    Denied(String),
}

/// Connect without verifying the dispatcher (there is nothing to verify it
/// with yet: the pairing code is the check), send the request and read the
/// `pending` answer. `ip` in the request is filled with our end of the
/// connection when not set.
pub async fn send(d: &Dispatcher, req: &mut PairRequest, limit: Duration) -> Result<Waiting, PairError> {
    let tcp = d.tcp(limit).await?;
    if req.ip.is_none() {
        req.ip = tcp.get_ref().local_addr().ok().map(|a| crate::pairing::plain_ip(a.ip()).to_string());
    }
    let ctx = crate::tls::pairing_client_context().map_err(|e| PairError(e.0))?;
    let not_pairing = || {
        PairError(format!(
            "{}:{} accepted the connection but did not answer as a ctrl-exec pairing listener (wrong port? or this address is blocked for a while after repeated failed attempts)",
            d.host, d.port
        ))
    };
    let mut tls = crate::time::timeout(limit, TlsStream::connect(&ctx, tcp, None))
        .await
        .ok_or_else(not_pairing)?
        .map_err(|_| not_pairing())?;
    let body = req.to_json();
    let head =
        format!("POST /pair HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    tls.write_all(&bytes).await.map_err(|_| not_pairing())?;
    let r = crate::time::timeout(limit, http::read_response(&mut tls, 64 << 10))
        .await
        .ok_or_else(not_pairing)?
        .map_err(|_| not_pairing())?;
    let o = crate::wire::parse_object(&String::from_utf8_lossy(&r.body)).ok_or_else(not_pairing)?;
    match (get_str(&o, "status").as_deref(), get_str(&o, "reqid")) {
        (Some("pending"), Some(id)) if !id.is_empty() => Ok(Waiting { tls, reqid: id }),
        (Some("error"), _) => Err(PairError(format!(
            "the dispatcher refused the request: {}",
            get_str(&o, "reason").unwrap_or_else(|| "no reason given".into())
        ))),
        _ => Err(not_pairing()),
    }
}

impl Waiting {
    /// Wait up to `limit` for the operator's answer.
    pub async fn answer(mut self, nonce: &str, limit: Duration) -> Result<Outcome, PairError> {
        let r = match crate::time::timeout(limit, http::read_response(&mut self.tls, 1 << 20)).await {
            None => return Err(PairError(format!("no answer from the dispatcher within {}s", limit.as_secs()))),
            Some(Err(e)) => {
                return Err(PairError(format!(
                    "the dispatcher closed the connection before answering ({e}); was pairing mode stopped?"
                )));
            }
            Some(Ok(r)) => r,
        };
        let o = crate::wire::parse_object(&String::from_utf8_lossy(&r.body))
            .ok_or_else(|| PairError("the dispatcher's answer is not JSON".into()))?;
        if let Some(a) = Approval::parse(&o) {
            if a.nonce != nonce {
                return Err(PairError("nonce mismatch in pairing result; nothing was stored".into()));
            }
            return Ok(Outcome::Approved(a));
        }
        Ok(Outcome::Denied(get_str(&o, "reason").unwrap_or_else(|| "denied".into())))
    }
}

/// 32 lowercase hex digits from the system's CSPRNG.
pub fn new_nonce() -> Result<String, PairError> {
    let mut b = [0u8; 16];
    openssl::rand::rand_bytes(&mut b).map_err(ca::CaError::from)?;
    Ok(crate::wire::hex(&b))
}
