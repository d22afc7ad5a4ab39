//! Pairing, dispatcher side: the request an agent sends, the queue of
//! requests waiting for an operator, the approval that signs a CSR and
//! registers the agent, and the listener's handling of one connection
//! (wire.md §3, behaviour.md §4).
//!
//! The queue is a directory of small files shared by the listener (one
//! process, one task per waiting agent) and the operator's `approve` /
//! `deny` commands (other processes):
//!
//! | file | written by | meaning |
//! | --- | --- | --- |
//! | `<id>.json` | listener | a pending request; the listener holds an `flock` on it for as long as the agent's connection is open |
//! | `<id>.approved` | `approve` | the approval body the listener sends on |
//! | `<id>.denied` | `deny` | the denial body the listener sends on |
//!
//! The lock is what lets `approve` refuse a request whose agent has gone
//! (upstream signs it anyway and the certificate is never delivered), and lets
//! `list-requests` drop such requests at once instead of after ten minutes.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use miniserde::json::{Object, Value};

use crate::audit;
use crate::ca::{self, CaFiles};
use crate::config::DispatcherConfig;
use crate::fsutil::{self, FsError};
use crate::http::{self, Conn, HttpError, Limits};
use crate::registry::{AgentRecord, Registry, RegistryError};
use crate::wire::{Obj, get_i64, get_str, parse_object, valid_agent_name, valid_reqid};

/// Default pairing port.
pub const DEFAULT_PORT: u16 = 7444;
/// Largest `/pair` body accepted (upstream: 64 KiB).
pub const MAX_BODY: usize = 64 << 10;
/// A pending request older than this is dropped (upstream: 600 s).
pub const STALE_SECS: i64 = 600;
/// How long a listener waits for the operator (upstream: 600 s).
pub const APPROVAL_WAIT: Duration = Duration::from_secs(600);

/// A pairing problem, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairError(pub String);

impl fmt::Display for PairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PairError {}

impl From<ca::CaError> for PairError {
    fn from(e: ca::CaError) -> Self {
        PairError(e.to_string())
    }
}

impl From<FsError> for PairError {
    fn from(e: FsError) -> Self {
        PairError(e.to_string())
    }
}

impl From<RegistryError> for PairError {
    fn from(e: RegistryError) -> Self {
        PairError(e.to_string())
    }
}

impl From<PairError> for crate::error::Fail {
    fn from(e: PairError) -> Self {
        crate::error::Fail::new(e.0)
    }
}

/// `ip` or `hostname`, or nothing for anything else.
pub fn lookup_by(v: Option<&str>) -> Option<String> {
    match v {
        Some(s @ ("ip" | "hostname")) => Some(s.to_string()),
        _ => None,
    }
}

/// An address as people write it (IPv4-mapped IPv6 shown as IPv4).
pub fn plain_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Is `s` an IPv4 or IPv6 literal?
pub fn is_ip(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
}

/// The body of `POST /pair`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairRequest {
    /// The agent's name (registry key, certificate CN).
    pub hostname: String,
    /// The CSR exactly as sent: the pairing code is computed over it.
    pub csr: String,
    /// 32 hex digits echoed in the approval.
    pub nonce: String,
    /// The agent's own address of the connection (helps behind NAT).
    pub ip: Option<String>,
    /// The agent's operational port.
    pub port: Option<u16>,
    /// How the agent suggests being addressed.
    pub lookup_by: Option<String>,
}

impl PairRequest {
    /// Parse a body. Errors are the reasons sent back to the agent.
    /// Liberal in what a Perl agent sends: `port` may be a string.
    pub fn parse(body: &str) -> Result<PairRequest, &'static str> {
        let o = parse_object(body).ok_or("invalid request")?;
        let (Some(hostname), Some(csr)) = (get_str(&o, "hostname"), get_str(&o, "csr")) else {
            return Err("invalid request");
        };
        if hostname.is_empty() || csr.is_empty() {
            return Err("invalid request");
        }
        if !valid_agent_name(&hostname) {
            return Err("invalid hostname");
        }
        let port = get_i64(&o, "port")
            .or_else(|| get_str(&o, "port").and_then(|s| s.trim().parse().ok()))
            .filter(|p| (1..=65_535).contains(p))
            .map(|p| p as u16);
        Ok(PairRequest {
            hostname,
            csr,
            nonce: get_str(&o, "nonce").unwrap_or_default(),
            ip: get_str(&o, "ip").filter(|s| is_ip(s)),
            port,
            lookup_by: lookup_by(get_str(&o, "lookup_by").as_deref()),
        })
    }

    /// The JSON body (strict: `port` is a number).
    pub fn to_json(&self) -> String {
        let mut o = Obj::new().s("hostname", &self.hostname).s("csr", &self.csr).s("nonce", &self.nonce);
        if let Some(ip) = &self.ip {
            o = o.s("ip", ip);
        }
        if let Some(p) = self.port {
            o = o.i("port", p as i64);
        }
        o.opt_s("lookup_by", self.lookup_by.as_deref()).to_json()
    }

    /// The 6-digit code both sides show.
    pub fn code(&self) -> String {
        ca::pairing_code(self.csr.as_bytes())
    }
}

/// What the dispatcher sends an approved agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// The agent's certificate (PEM).
    pub cert: String,
    /// The CA certificate (PEM).
    pub ca: String,
    /// The request's nonce, echoed.
    pub nonce: String,
    /// Canonical serial of the dispatcher certificate the agent must trust.
    pub dispatcher_serial: String,
    /// The dispatcher's id for the trusted map.
    pub dispatcher_id: String,
}

impl Approval {
    /// The approval body.
    pub fn to_json(&self) -> String {
        Obj::new()
            .s("status", "approved")
            .s("cert", &self.cert)
            .s("ca", &self.ca)
            .s("nonce", &self.nonce)
            .s("dispatcher_serial", &self.dispatcher_serial)
            .s("dispatcher_id", &self.dispatcher_id)
            .to_json()
    }

    /// Parse an approval body (`status` must be `approved`).
    pub fn parse(o: &Object) -> Option<Approval> {
        if get_str(o, "status").as_deref() != Some("approved") {
            return None;
        }
        Some(Approval {
            cert: get_str(o, "cert").filter(|s| !s.is_empty())?,
            ca: get_str(o, "ca").filter(|s| !s.is_empty())?,
            nonce: get_str(o, "nonce").unwrap_or_default(),
            dispatcher_serial: get_str(o, "dispatcher_serial").unwrap_or_default(),
            dispatcher_id: get_str(o, "dispatcher_id").unwrap_or_default(),
        })
    }
}

/// Is `csr` one PEM certificate request and nothing else? Text around the
/// block would leave the CSR valid while changing the pairing code, which is
/// computed over the whole string: refusing it keeps an attacker from tuning
/// the code by appending bytes (wire.md §3.5).
pub fn plain_csr(csr: &str) -> bool {
    const BEGIN: &str = "-----BEGIN CERTIFICATE REQUEST-----";
    const END: &str = "-----END CERTIFICATE REQUEST-----";
    let body = csr.strip_suffix('\n').unwrap_or(csr);
    let body = body.strip_suffix('\r').unwrap_or(body);
    body.starts_with(BEGIN) && body.ends_with(END) && body.matches("-----").count() == 4 && csr.is_ascii()
}

/// A denial body.
pub fn denial(reason: &str) -> String {
    Obj::new().s("status", "denied").s("reason", reason).to_json()
}

/// An error body (refused before queueing).
pub fn refusal(reason: &str) -> String {
    Obj::new().s("status", "error").s("reason", reason).to_json()
}

/// A queued request (`<id>.json`, wire.md §7.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Pairing request id (16 hex).
    pub id: String,
    /// The request.
    pub req: PairRequest,
    /// Address to register: the agent-reported one if valid, else `source_ip`.
    pub ip: String,
    /// TCP source address.
    pub source_ip: String,
    /// When it arrived (ISO UTC).
    pub received: String,
    /// The pairing code.
    pub code: String,
    /// PTR name of the source address (empty if none).
    pub reverse_dns: String,
    /// The PTR name resolves back to the source address.
    pub reverse_confirmed: bool,
}

impl Pending {
    /// The queue file's JSON.
    pub fn to_json(&self) -> String {
        Obj::new()
            .s("id", &self.id)
            .s("hostname", &self.req.hostname)
            .s("ip", &self.ip)
            .s("source_ip", &self.source_ip)
            .s("csr", &self.req.csr)
            .s("nonce", &self.req.nonce)
            .v("lookup_by", self.req.lookup_by.clone().map(Value::String).unwrap_or(Value::Null))
            .v("port", self.req.port.map(|p| crate::wire::int(p as i64)).unwrap_or(Value::Null))
            .s("received", &self.received)
            .s("code", &self.code)
            .s("reverse_dns", &self.reverse_dns)
            .i("reverse_confirmed", self.reverse_confirmed as i64)
            .to_json()
    }

    /// Parse a queue file.
    pub fn parse(text: &str) -> Option<Pending> {
        let o = parse_object(text)?;
        let id = get_str(&o, "id").filter(|i| valid_reqid(i))?;
        let port = get_i64(&o, "port")
            .or_else(|| get_str(&o, "port").and_then(|s| s.parse().ok()))
            .filter(|p| (1..=65_535).contains(p))
            .map(|p| p as u16);
        let source_ip = get_str(&o, "source_ip").unwrap_or_default();
        let req = PairRequest {
            hostname: get_str(&o, "hostname").filter(|h| valid_agent_name(h))?,
            csr: get_str(&o, "csr")?,
            nonce: get_str(&o, "nonce").unwrap_or_default(),
            ip: None,
            port,
            lookup_by: lookup_by(get_str(&o, "lookup_by").as_deref()),
        };
        Some(Pending {
            id,
            ip: get_str(&o, "ip").filter(|s| is_ip(s)).unwrap_or_else(|| source_ip.clone()),
            source_ip,
            code: get_str(&o, "code").unwrap_or_else(|| req.code()),
            received: get_str(&o, "received").unwrap_or_default(),
            reverse_dns: get_str(&o, "reverse_dns").unwrap_or_default(),
            reverse_confirmed: get_i64(&o, "reverse_confirmed").unwrap_or(0) != 0
                || o.get("reverse_confirmed").is_some_and(|v| matches!(v, Value::Bool(true))),
            req,
        })
    }
}

/// The operator's answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Approval body to send.
    Approved(String),
    /// Denial body to send.
    Denied(String),
}

/// The pairing queue directory.
#[derive(Debug, Clone)]
pub struct Queue {
    /// The directory (`<state>/pairing`).
    pub dir: PathBuf,
}

/// A pending request held by the listener: the open, locked queue file.
#[derive(Debug)]
pub struct Hold {
    _file: File,
}

fn try_lock(f: &File) -> bool {
    // SAFETY: flock on a descriptor we own; non-blocking.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

impl Queue {
    /// The queue in `dir` (created on first write).
    pub fn new(dir: &Path) -> Queue {
        Queue { dir: dir.to_path_buf() }
    }

    fn file(&self, id: &str, ext: &str) -> Result<PathBuf, PairError> {
        if !valid_reqid(id) {
            return Err(PairError(format!("No pending request '{id}'")));
        }
        Ok(self.dir.join(format!("{id}.{ext}")))
    }

    /// Write a pending request, locked from the moment it appears, and keep
    /// it locked until the returned [`Hold`] is dropped.
    pub fn enqueue(&self, p: &Pending) -> Result<Hold, PairError> {
        fsutil::ensure_dir(&self.dir, 0o700)?;
        let path = self.file(&p.id, "json")?;
        let tmp = self.dir.join(format!(".{}.json.tmp", p.id));
        let result = (|| -> std::io::Result<File> {
            let mut f = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp)?;
            if !try_lock(&f) {
                return Err(std::io::Error::other("cannot lock a new queue file"));
            }
            f.write_all(p.to_json().as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            Ok(f)
        })();
        match result {
            Ok(f) => Ok(Hold { _file: f }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(FsError::new("write", &path, e).into())
            }
        }
    }

    /// A pending request by id.
    pub fn get(&self, id: &str) -> Result<Option<Pending>, PairError> {
        let path = self.file(id, "json")?;
        match std::fs::read_to_string(&path) {
            Ok(t) => Pending::parse(&t)
                .map(Some)
                .ok_or_else(|| PairError(format!("{} is not a valid pairing request file", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FsError::new("read", &path, e).into()),
        }
    }

    /// Is a listener still holding this request's connection?
    pub fn held(&self, id: &str) -> bool {
        let Ok(path) = self.file(id, "json") else { return false };
        match File::open(path) {
            Ok(f) => !try_lock(&f),
            Err(_) => false,
        }
    }

    /// Pending requests (no answer yet), oldest first.
    pub fn list(&self) -> Vec<Pending> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return vec![] };
        let mut out: Vec<Pending> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(String::from))
            .filter(|id| valid_reqid(id) && self.answer_of(id).is_none())
            .filter_map(|id| self.get(&id).ok().flatten())
            .collect();
        out.sort_by(|a, b| (&a.received, &a.id).cmp(&(&b.received, &b.id)));
        out
    }

    /// Drop requests nobody can deliver to: no listener holds them, or they
    /// are older than [`STALE_SECS`]. Returns how many went.
    pub fn expire(&self) -> usize {
        fsutil::sweep_temp(&self.dir);
        let now = crate::time::unix_now();
        let mut n = 0;
        for p in self.list() {
            let age = self
                .file(&p.id, "json")
                .ok()
                .and_then(|f| std::fs::metadata(f).ok())
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| now - d.as_secs() as i64)
                .unwrap_or(0);
            if age > STALE_SECS || !self.held(&p.id) {
                self.remove(&p.id);
                n += 1;
            }
        }
        n
    }

    /// Write the operator's answer for the listener to deliver.
    pub fn answer(&self, id: &str, a: &Answer) -> Result<(), PairError> {
        let (ext, body) = match a {
            Answer::Approved(b) => ("approved", b),
            Answer::Denied(b) => ("denied", b),
        };
        Ok(fsutil::atomic_write(&self.file(id, ext)?, body.as_bytes(), 0o600)?)
    }

    /// The answer waiting for `id`, if any.
    pub fn answer_of(&self, id: &str) -> Option<Answer> {
        if let Ok(b) = std::fs::read_to_string(self.file(id, "approved").ok()?) {
            return Some(Answer::Approved(b));
        }
        std::fs::read_to_string(self.file(id, "denied").ok()?).ok().map(Answer::Denied)
    }

    /// Forget a request and its answer, with any temporary file a killed
    /// writer left for it (`.<id>.approved.tmp-…`): once the request is
    /// gone, a late rename would only fail, which the writer reports.
    pub fn remove(&self, id: &str) {
        for ext in ["json", "approved", "denied"] {
            if let Ok(p) = self.file(id, ext) {
                let _ = std::fs::remove_file(p);
            }
        }
        if !valid_reqid(id) {
            return;
        }
        let prefix = format!(".{id}.");
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix) && n.contains(".tmp")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Requests not yet answered.
    pub fn pending_count(&self) -> usize {
        self.list().len()
    }
}

/// What the operator may override at approval.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--lookup-by`.
    pub lookup_by: Option<String>,
    /// `--ip`.
    pub ip: Option<String>,
    /// `--agent-port`.
    pub port: Option<u16>,
}

/// An approved agent.
#[derive(Debug, Clone)]
pub struct Signed {
    /// What goes to the agent.
    pub approval: Approval,
    /// What was registered.
    pub record: AgentRecord,
    /// Serial of the agent's new certificate.
    pub serial: String,
}

/// The dispatcher's serial and id as delivered to agents.
pub fn dispatcher_identity(cfg: &DispatcherConfig) -> Result<(String, String), PairError> {
    let cert =
        ca::load_cert(&cfg.cert).map_err(|e| PairError(format!("{e}\n(run 'ctrl-exec setup-ctrl-exec' first)")))?;
    Ok((ca::cert_serial(&cert), cfg.dispatcher_id.clone()))
}

/// Sign an agent's CSR and register it: the one approval step shared by
/// network pairing (`approve`) and offline provisioning (`ca sign`).
/// The registry record is written last, under the registry lock.
pub fn sign_and_register(
    cfg: &DispatcherConfig,
    reqid: &str,
    req: &PairRequest,
    queued_ip: &str,
    o: &Overrides,
) -> Result<Signed, PairError> {
    let csr = ca::check_csr(req.csr.as_bytes(), None).map_err(|e| PairError(format!("cannot sign: {e}")))?;
    let pubkey = csr.public_key().map_err(ca::CaError::from)?;
    let lookup = o.lookup_by.clone().or_else(|| req.lookup_by.clone()).unwrap_or_else(|| "hostname".into());
    let port = o.port.or(req.port).unwrap_or(crate::registry::DEFAULT_PORT);
    let ip = o.ip.clone().unwrap_or_else(|| queued_ip.to_string());
    let (serial, id) = dispatcher_identity(cfg)?;
    let files = CaFiles::new(&cfg.ca, &cfg.ca_dir);
    let cert = files.issue(&pubkey, &req.hostname, cfg.cert_days)?;
    let ca_pem = std::fs::read_to_string(&cfg.ca).map_err(|e| FsError::new("read", &cfg.ca, e))?;
    let approval = Approval {
        cert: String::from_utf8_lossy(&cert.to_pem().map_err(ca::CaError::from)?).into_owned(),
        ca: ca_pem,
        nonce: req.nonce.clone(),
        dispatcher_serial: serial.clone(),
        dispatcher_id: id,
    };
    let reg = Registry::new(&cfg.registry_dir);
    let mut rec = AgentRecord::new(&req.hostname, &ip, port, &lookup);
    rec.expiry = ca::not_after(&cert);
    rec.reqid = reqid.to_string();
    rec.dispatcher_serial = serial.clone();
    if serial.is_empty() {
        rec.serial_status = "unknown".into();
    } else {
        rec.serial_status = "current".into();
        rec.raw.insert("serial_confirmed".into(), Value::String(rec.paired.clone()));
    }
    {
        let _lock = reg.lock()?;
        // Re-pairing a name keeps what discovery learnt about it.
        if let Some(old) = reg.get(&req.hostname).ok().flatten()
            && let Some(tags) = old.raw.get("tags")
        {
            rec.raw.insert("tags".into(), tags.clone());
        }
        reg.put(&rec)?;
    }
    Ok(Signed { approval, record: rec, serial: ca::cert_serial(&cert) })
}

/// Reverse DNS of `ip` (name, forward-confirmed), within `limit`.
pub async fn reverse_dns(ip: IpAddr, limit: Duration) -> (String, bool) {
    let lookup = smol::unblock(move || {
        let name = ptr_name(ip)?;
        let confirmed = std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), 0))
            .map(|mut it| it.any(|a| a.ip() == ip))
            .unwrap_or(false);
        Some((name, confirmed))
    });
    crate::time::timeout(limit, lookup).await.flatten().unwrap_or_default()
}

fn ptr_name(ip: IpAddr) -> Option<String> {
    let sa = socket2_addr(ip);
    let mut host = [0 as libc::c_char; 1025];
    // SAFETY: `sa` is a valid sockaddr of the given length; `host` is a
    // writable buffer of the given length; no service name is requested.
    let rc = unsafe {
        libc::getnameinfo(
            (&sa.0 as *const libc::sockaddr_storage).cast(),
            sa.1,
            host.as_mut_ptr(),
            host.len() as libc::socklen_t,
            std::ptr::null_mut(),
            0,
            libc::NI_NAMEREQD,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: getnameinfo NUL-terminates `host` on success.
    let name = unsafe { std::ffi::CStr::from_ptr(host.as_ptr()) }.to_string_lossy().into_owned();
    (!name.is_empty()).then_some(name)
}

fn socket2_addr(ip: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match ip {
        IpAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(v4.octets()) };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        IpAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr = libc::in6_addr { s6_addr: v6.octets() };
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// What a listener needs to serve one agent.
#[derive(Debug, Clone)]
pub struct ListenerCfg {
    /// The queue.
    pub queue: Queue,
    /// Most pending requests at once.
    pub max_queue: usize,
    /// How long to wait for the operator.
    pub wait: Duration,
    /// How often to look for the operator's answer.
    pub poll: Duration,
    /// Deadline for the request to arrive after the handshake.
    pub request_timeout: Duration,
    /// The registry, to withdraw an approval that could not be delivered.
    pub registry: Option<Registry>,
}

/// An approval that never reached its agent: remove the registration it
/// made (if it is still that approval's), so no agent is listed that has no
/// certificate.
fn withdraw(l: &ListenerCfg, agent: &str, id: &str) -> &'static str {
    let Some(reg) = &l.registry else { return "kept" };
    let Ok(_lock) = reg.lock() else { return "kept" };
    match reg.get(agent) {
        Ok(Some(rec)) if rec.reqid == id && reg.remove(agent).is_ok() => "withdrawn",
        _ => "kept",
    }
}

/// How one pairing connection ended (for the caller's bookkeeping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Refused before queueing.
    Refused,
    /// Approval delivered.
    Approved,
    /// Denial delivered.
    Denied,
    /// Nobody answered in time.
    TimedOut,
    /// The agent went away while waiting.
    Gone,
}

/// Serve one agent's pairing connection: read `/pair`, validate, queue,
/// answer `pending`, then wait for the operator's answer (or the agent
/// leaving) and send it as a second response on the same connection.
pub async fn serve<C: Conn>(conn: &mut C, source: IpAddr, l: &ListenerCfg) -> Outcome {
    let src = source.to_string();
    let limits = Limits { max_body: MAX_BODY, ..Limits::default() };
    let req = match crate::time::timeout(l.request_timeout, http::read_request(conn, &limits)).await {
        None | Some(Err(HttpError::Io(_))) => return Outcome::Refused,
        Some(Err(HttpError::Status(413, _))) => {
            audit::warn("pair-reject", &[("IP", &src), ("REASON", "body-too-large")]);
            let _ = http::write_response(conn, 200, &refusal("request too large")).await;
            return Outcome::Refused;
        }
        Some(Err(HttpError::Status(_, why))) => {
            audit::warn("pair-reject", &[("IP", &src), ("REASON", why)]);
            let _ = http::write_response(conn, 200, &refusal("invalid request")).await;
            return Outcome::Refused;
        }
        Some(Ok(r)) => r,
    };
    let body = String::from_utf8_lossy(&req.body).into_owned();
    let pr = match PairRequest::parse(&body) {
        Ok(p) => p,
        Err(reason) => {
            let tag = if reason == "invalid hostname" { "invalid-hostname" } else { "invalid-request" };
            audit::warn("pair-reject", &[("IP", &src), ("REASON", tag)]);
            let _ = http::write_response(conn, 200, &refusal(reason)).await;
            return Outcome::Refused;
        }
    };
    if pr.csr.len() > ca::MAX_CSR || !plain_csr(&pr.csr) {
        audit::warn("pair-reject", &[("AGENT", &pr.hostname), ("IP", &src), ("REASON", "invalid-csr")]);
        let _ = http::write_response(
            conn,
            200,
            &refusal("invalid request: the CSR must be a PEM certificate request of at most 10 KiB"),
        )
        .await;
        return Outcome::Refused;
    }
    l.queue.expire();
    if l.queue.pending_count() >= l.max_queue {
        audit::warn("pair-reject", &[("AGENT", &pr.hostname), ("IP", &src), ("REASON", "queue-full")]);
        let _ = http::write_response(conn, 200, &refusal("pairing queue full")).await;
        return Outcome::Refused;
    }
    let (reverse_dns, reverse_confirmed) = reverse_dns(source, Duration::from_secs(2)).await;
    let id = crate::wire::new_reqid();
    let pending = Pending {
        id: id.clone(),
        ip: pr.ip.clone().unwrap_or_else(|| src.clone()),
        source_ip: src.clone(),
        received: crate::time::now_iso(),
        code: pr.code(),
        reverse_dns,
        reverse_confirmed,
        req: pr,
    };
    let hold = match l.queue.enqueue(&pending) {
        Ok(h) => h,
        Err(e) => {
            audit::err("pair-reject", &[("AGENT", &pending.req.hostname), ("IP", &src), ("ERROR", &e.0)]);
            let _ = http::write_response(conn, 200, &refusal("dispatcher cannot queue the request")).await;
            return Outcome::Refused;
        }
    };
    let agent = pending.req.hostname.clone();
    let mut fields: Vec<(&str, &str)> = vec![("AGENT", &agent), ("IP", &src), ("REQID", &id), ("STATUS", "pending")];
    if let Some(r) = &pending.req.ip {
        fields.push(("REPORTED_IP", r));
    }
    audit::info("pair-request", &fields);
    let first = Obj::new().s("status", "pending").s("reqid", &id).to_json();
    if http::write_response(conn, 200, &first).await.is_err() {
        drop(hold);
        l.queue.remove(&id);
        return Outcome::Gone;
    }
    let outcome = wait_for_answer(conn, l, &id).await;
    let (outcome, body) = match outcome {
        Waited::Answer(Answer::Approved(b)) => (Outcome::Approved, b),
        Waited::Answer(Answer::Denied(b)) => (Outcome::Denied, b),
        Waited::TimedOut => {
            audit::warn("pair-timeout", &[("AGENT", &agent), ("REQID", &id)]);
            (Outcome::TimedOut, denial("approval timeout"))
        }
        Waited::Gone => {
            let approved = matches!(l.queue.answer_of(&id), Some(Answer::Approved(_)));
            drop(hold);
            l.queue.remove(&id);
            if approved {
                let reg = withdraw(l, &agent, &id);
                let f = [
                    ("AGENT", agent.as_str()),
                    ("REQID", &id),
                    ("STATUS", "gone-after-approval"),
                    ("REGISTRATION", reg),
                ];
                audit::warn("pair-abandoned", &f);
            } else {
                audit::warn("pair-abandoned", &[("AGENT", &agent), ("REQID", &id), ("STATUS", "gone")]);
            }
            return Outcome::Gone;
        }
    };
    let sent = http::write_response(conn, 200, &body).await;
    drop(hold);
    l.queue.remove(&id);
    if let Err(e) = sent {
        let reg = if outcome == Outcome::Approved { withdraw(l, &agent, &id) } else { "kept" };
        let f = [("AGENT", agent.as_str()), ("REQID", &id), ("ERROR", &e.to_string()), ("REGISTRATION", reg)];
        audit::warn("pair-abandoned", &f);
        return Outcome::Gone;
    }
    audit::info(
        "pair-delivered",
        &[("AGENT", &agent), ("REQID", &id), ("STATUS", &format!("{outcome:?}").to_lowercase())],
    );
    outcome
}

enum Waited {
    Answer(Answer),
    TimedOut,
    Gone,
}

async fn wait_for_answer<C: Conn>(conn: &mut C, l: &ListenerCfg, id: &str) -> Waited {
    let deadline = std::time::Instant::now() + l.wait;
    let mut buf = [0u8; 512];
    loop {
        if let Some(a) = l.queue.answer_of(id) {
            return Waited::Answer(a);
        }
        if std::time::Instant::now() >= deadline {
            return Waited::TimedOut;
        }
        // The agent never sends after its request: a read that finishes
        // means it closed the connection (or broke the protocol).
        match crate::time::timeout(l.poll, conn.read(&mut buf)).await {
            None => {}
            Some(Ok(n)) if n > 0 => {}
            Some(_) => return Waited::Gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_request_parses_with_port_as_string() {
        let body = r#"{"lookup_by":"ip","port":"35913","csr":"-----BEGIN CERTIFICATE REQUEST-----\nX\n","nonce":"1a1ea610b4527cbe5a0dd2ec9927abb5","ip":"127.0.0.1","hostname":"vm"}"#;
        let r = PairRequest::parse(body).unwrap();
        assert_eq!((r.port, r.lookup_by.as_deref(), r.ip.as_deref()), (Some(35913), Some("ip"), Some("127.0.0.1")));
        let back = PairRequest::parse(&r.to_json()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn only_a_bare_pem_csr_is_queued() {
        let csr = "-----BEGIN CERTIFICATE REQUEST-----\nQUJD\n-----END CERTIFICATE REQUEST-----\n";
        assert!(plain_csr(csr));
        assert!(plain_csr(csr.trim_end()));
        assert!(!plain_csr(&format!("{csr}junk to tune the code")));
        assert!(!plain_csr(&format!("x{csr}")));
        assert!(!plain_csr(&format!("{csr}{csr}")));
        assert!(!plain_csr("garbage"));
    }

    #[test]
    fn request_refusals() {
        assert_eq!(PairRequest::parse("nope"), Err("invalid request"));
        assert_eq!(PairRequest::parse(r#"{"hostname":"a"}"#), Err("invalid request"));
        for bad in ["-x", "a b", "a/b", "..", "a;rm", "é"] {
            let body = Obj::new().s("hostname", bad).s("csr", "c").to_json();
            assert_eq!(PairRequest::parse(&body), Err("invalid hostname"), "{bad}");
        }
        let body = r#"{"hostname":"a","csr":"c","port":99999,"ip":"not-an-ip","lookup_by":"dns"}"#;
        let r = PairRequest::parse(body).unwrap();
        assert_eq!((r.port, r.ip, r.lookup_by), (None, None, None));
    }

    #[test]
    fn queue_file_matches_perl_shape() {
        let golden = r#"{"reverse_confirmed":1,"reverse_dns":"localhost","hostname":"vm","code":"906164","csr":"-----BEGIN CERTIFICATE REQUEST-----\nX\n","ip":"127.0.0.1","nonce":"1a","source_ip":"127.0.0.1","received":"2026-11-25T12:39:13Z","lookup_by":"ip","port":35913,"id":"a62506045138d4ef"}"#;
        let p = Pending::parse(golden).unwrap();
        assert!(p.reverse_confirmed);
        assert_eq!(p.code, "906164");
        let again = Pending::parse(&p.to_json()).unwrap();
        assert_eq!(again, p);
        let keys = parse_object(&p.to_json()).unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys.len(), 12);
    }

    /// A queue in a temporary directory holding one request with this id.
    fn queue_of(id: &str) -> (tempfile::TempDir, Queue, Pending, Hold) {
        let d = tempfile::tempdir().unwrap();
        let q = Queue::new(d.path());
        let p = Pending::parse(&format!(r#"{{"id":"{id}","hostname":"h","csr":"c","source_ip":"10.0.0.1"}}"#)).unwrap();
        let hold = q.enqueue(&p).unwrap();
        (d, q, p, hold)
    }

    #[test]
    fn queue_lock_tells_whether_a_listener_holds_the_request() {
        let (_d, q, p, hold) = queue_of("00000000000000a1");
        assert!(q.held(&p.id));
        assert_eq!(q.expire(), 0);
        assert_eq!(q.list().len(), 1);
        q.answer(&p.id, &Answer::Denied(denial("rejected by operator"))).unwrap();
        assert!(q.list().is_empty(), "answered requests are not pending");
        assert!(matches!(q.answer_of(&p.id), Some(Answer::Denied(_))));
        q.remove(&p.id);
        q.enqueue(&p).unwrap();
        drop(hold);
        // The second enqueue's hold was dropped at once: nobody holds it.
        assert!(!q.held(&p.id));
        assert_eq!(q.expire(), 1);
        assert!(q.get(&p.id).unwrap().is_none());
        assert!(q.get("../x").is_err());
    }

    #[test]
    fn removing_a_request_sweeps_what_a_killed_writer_left() {
        let (d, q, p, _hold) = queue_of("00000000000000b2");
        let left = d.path().join(".00000000000000b2.approved.tmp-123-abcdef");
        let other = d.path().join(".00000000000000c3.approved.tmp-123-abcdef");
        std::fs::write(&left, "{").unwrap();
        std::fs::write(&other, "{").unwrap();
        q.remove(&p.id);
        assert!(!left.exists(), "this request's temp file goes with it");
        assert!(other.exists(), "another request's temp file stays");
        assert!(q.get(&p.id).unwrap().is_none());
    }
}
