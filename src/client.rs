//! The dispatcher's side of one exchange with one agent.
//!
//! [`connect`] opens TCP and runs the mTLS handshake; [`exchange`] writes one
//! request and reads one response over any connected stream. They are
//! separate so that a later reverse mode (the agent dials out, the dispatcher
//! serves requests over that stream) reuses [`exchange`] unchanged.
//! Transport failures become [`CallError`]s that say what an operator should
//! check, in upstream's words.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use openssl::ssl::{SslContext, SslSession};
use smol::Async;

use crate::http::{self, HttpError, Response};
use crate::tls::TlsStream;

/// Where to reach one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Registry name (results are keyed by it).
    pub name: String,
    /// Name or address to connect to.
    pub addr: String,
    /// Port.
    pub port: u16,
}

impl Target {
    /// `addr:port` for logs (`TARGET=`).
    pub fn display(&self) -> String {
        if self.addr.contains(':') {
            format!("[{}]:{}", self.addr, self.port)
        } else {
            format!("{}:{}", self.addr, self.port)
        }
    }
}

/// Time limits of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake.
    pub connect: Duration,
    /// Waiting for the agent's reply once the request is on its way.
    pub read: Duration,
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The name did not resolve.
    Resolve,
    /// Connection refused.
    Refused,
    /// No route to the host.
    Unreachable,
    /// Connect (or handshake) took too long.
    ConnectTimeout,
    /// The handshake failed.
    Tls(String),
    /// The reply did not come in time.
    ReadTimeout(u64),
    /// The connection broke.
    Io(String),
}

impl CallError {
    /// Operator text for this failure against `t`.
    pub fn describe(&self, t: &Target) -> String {
        let n = &t.name;
        match self {
            CallError::Resolve => {
                format!("host '{n}' did not resolve - check the name or use an IP address")
            }
            CallError::Refused => format!(
                "host '{n}' did not respond on port {} - connection refused (agent not running, or wrong port?)",
                t.port
            ),
            CallError::Unreachable => {
                format!("host '{n}' is unreachable - no route to host or network down")
            }
            CallError::ConnectTimeout => {
                format!("host '{n}' did not respond - connection timed out")
            }
            CallError::Tls(why) => {
                format!("TLS handshake with '{n}' failed - certificate or trust mismatch ({why})")
            }
            CallError::ReadTimeout(s) => format!("read timeout after {s}s"),
            CallError::Io(e) => format!("connection to '{n}' failed: {e}"),
        }
    }
}

fn classify(e: &io::Error) -> CallError {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => CallError::Refused,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => CallError::Unreachable,
        Some(libc::ETIMEDOUT) => CallError::ConnectTimeout,
        _ => CallError::Io(e.to_string()),
    }
}

async fn addresses(t: &Target) -> Result<Vec<SocketAddr>, CallError> {
    if let Ok(ip) = t.addr.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, t.port)]);
    }
    // getaddrinfo blocks: smol runs it on its small blocking pool.
    match smol::net::resolve((t.addr.as_str(), t.port)).await {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(CallError::Resolve),
    }
}

/// Resumable TLS sessions kept between runs, so that a repeated call to the
/// same agent skips both RSA signatures of a full handshake. The agent
/// renews its ticket keys every hour, so a cached session never carries an
/// authentication older than that.
///
/// One small file per agent address, in a directory named after a hash of
/// the dispatcher certificate (a new dispatcher identity never offers an old
/// session). Files are 0600 in a 0700 directory: a session is worth as much
/// as the dispatcher key until the agent renews its ticket keys (hourly). Losing
/// or corrupting the cache only costs a full handshake, so writes skip fsync.
#[derive(Debug)]
pub struct SessionCache {
    /// Files on disk (one-shot CLI processes), or `None` for memory only
    /// (a long-running server, which never needs to write them out).
    dir: Option<PathBuf>,
    mem: std::cell::RefCell<std::collections::HashMap<String, Vec<u8>>>,
}

impl SessionCache {
    /// The cache under `base` for the identity in `cert_pem`; `None` if the
    /// directory cannot be created (runs then simply do full handshakes).
    pub fn open(base: &Path, cert_pem: &[u8]) -> Option<SessionCache> {
        let id = crate::wire::hex(&openssl::sha::sha256(cert_pem)[..8]);
        let dir = base.join(id);
        crate::fsutil::ensure_dir(&dir, 0o700).ok()?;
        Some(SessionCache { dir: Some(dir), mem: Default::default() })
    }

    /// A cache that lives as long as this process.
    pub fn in_memory() -> SessionCache {
        SessionCache { dir: None, mem: Default::default() }
    }

    /// File name (and memory key) for a target.
    fn key(t: &Target) -> String {
        let addr: String =
            t.addr.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
        let tag = crate::wire::hex(&openssl::sha::sha256(format!("{}\n{}", t.addr, t.port).as_bytes())[..4]);
        format!("{addr}_{}-{tag}.der", t.port)
    }

    /// The saved session for `t`, if any.
    pub fn load(&self, t: &Target) -> Option<SslSession> {
        let der = match &self.dir {
            Some(d) => std::fs::read(d.join(Self::key(t))).ok()?,
            None => self.mem.borrow().get(&Self::key(t))?.clone(),
        };
        SslSession::from_der(&der).ok()
    }

    /// Save a session for `t` (best effort).
    pub fn store(&self, t: &Target, der: &[u8]) {
        match &self.dir {
            Some(d) => {
                let _ = crate::fsutil::atomic_write_nosync(&d.join(Self::key(t)), der, 0o600);
            }
            None => {
                self.mem.borrow_mut().insert(Self::key(t), der.to_vec());
            }
        }
    }

    /// Drop the session for `t`.
    pub fn forget(&self, t: &Target) {
        match &self.dir {
            Some(d) => {
                let _ = std::fs::remove_file(d.join(Self::key(t)));
            }
            None => {
                self.mem.borrow_mut().remove(&Self::key(t));
            }
        }
    }
}

/// Connect and complete the mTLS handshake, resuming a cached session when
/// there is one.
pub async fn connect(
    ctx: &SslContext,
    t: &Target,
    timeout: Duration,
    cache: Option<&SessionCache>,
) -> Result<TlsStream, CallError> {
    let session = cache.and_then(|c| c.load(t));
    let attempt = async {
        let mut last = CallError::Resolve;
        for addr in addresses(t).await? {
            match Async::<TcpStream>::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.get_ref().set_nodelay(true);
                    return TlsStream::connect(ctx, tcp, session.as_ref()).await.map_err(|e| CallError::Tls(e.0));
                }
                Err(e) => last = classify(&e),
            }
        }
        Err(last)
    };
    crate::time::timeout(timeout, attempt).await.unwrap_or(Err(CallError::ConnectTimeout))
}

/// Largest reply we accept (two capped outputs, JSON-escaped, fit easily).
pub const MAX_RESPONSE: usize = 64 << 20;

/// One request/response over an established stream; `keep_alive` asks the
/// agent to keep the connection open afterwards.
pub async fn exchange<C: http::Conn>(
    conn: &mut C,
    host_header: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    read_timeout: Duration,
    keep_alive: bool,
) -> Result<Response, CallError> {
    let work = async {
        // If the agent refuses early (413) our write may fail: still read its reply.
        let wrote = http::write_request(conn, method, path, host_header, body, keep_alive).await;
        match http::read_response(conn, MAX_RESPONSE).await {
            Ok(r) => Ok(r),
            // TLS 1.3 delivers the agent's verdict on our certificate with the first read.
            Err(HttpError::Io(e)) if e.to_string().contains("alert") => Err(CallError::Tls(e.to_string())),
            Err(HttpError::Io(e)) => Err(CallError::Io(wrote.err().unwrap_or(e).to_string())),
            Err(HttpError::Status(_, m)) => Err(CallError::Io(m.to_string())),
        }
    };
    crate::time::timeout(read_timeout, work).await.unwrap_or(Err(CallError::ReadTimeout(read_timeout.as_secs())))
}

/// Connections to agents kept open between requests (a long-running
/// dispatcher: the API server). Our agents keep a connection open when asked
/// to (`Connection: keep-alive`); upstream's agents answer one request and
/// close, and are simply never pooled.
///
/// A connection is reused only if it has been idle less than [`POOL_IDLE`]
/// (well inside the agent's own idle timeout, so the agent never closes one
/// we are about to use), is younger than [`POOL_AGE`], and shows nothing to
/// read (no close, no stray bytes). A request is never retried on another
/// connection: a run must not start twice.
#[derive(Default)]
pub struct Pool {
    idle: std::cell::RefCell<std::collections::HashMap<String, Vec<Kept>>>,
    swept: std::cell::Cell<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("idle", &self.len()).finish()
    }
}

struct Kept {
    s: TlsStream,
    born: std::time::Instant,
    since: std::time::Instant,
}

/// Longest a pooled connection waits for its next request.
pub const POOL_IDLE: Duration = Duration::from_secs(2);
/// Oldest a pooled connection gets (it is closed after its last use past this).
pub const POOL_AGE: Duration = Duration::from_secs(60);
/// Most idle connections kept per agent.
pub const POOL_PER_AGENT: usize = 8;

impl Kept {
    fn usable(&self) -> bool {
        self.since.elapsed() < POOL_IDLE && self.born.elapsed() < POOL_AGE && self.s.quiet()
    }
}

impl Pool {
    /// Idle connections held now.
    pub fn len(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }

    /// Is the pool empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn take(&self, t: &Target) -> Option<Kept> {
        self.sweep();
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&SessionCache::key(t))?;
        while let Some(k) = list.pop() {
            if k.usable() {
                return Some(k);
            }
        }
        None
    }

    fn put(&self, t: &Target, s: TlsStream, born: std::time::Instant) {
        if born.elapsed() >= POOL_AGE {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(SessionCache::key(t)).or_default();
        if list.len() < POOL_PER_AGENT {
            list.push(Kept { s, born, since: std::time::Instant::now() });
        }
    }

    /// Drop what can no longer be used, at most once a second, so that
    /// connections to agents no longer called do not linger.
    fn sweep(&self) {
        let now = std::time::Instant::now();
        if self.swept.get().is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            return;
        }
        self.swept.set(Some(now));
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(Kept::usable);
        }
        idle.retain(|_, l| !l.is_empty());
    }
}

/// Connect, exchange, close; keep the agent's fresh ticket for next time.
/// With a `pool`, an idle connection to the agent is used instead when there
/// is one, and the connection is kept afterwards if the agent agrees.
#[allow(clippy::too_many_arguments)]
pub async fn call(
    ctx: &SslContext,
    t: &Target,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeouts: Timeouts,
    cache: Option<&SessionCache>,
    pool: Option<&Pool>,
) -> Result<Response, CallError> {
    if let Some(mut k) = pool.and_then(|p| p.take(t)) {
        let r = exchange(&mut k.s, &t.display(), method, path, body, timeouts.read, true).await;
        match (&r, pool) {
            (Ok(resp), Some(p)) if resp.keep_alive => p.put(t, k.s, k.born),
            _ => k.s.close(Duration::from_millis(0)).await,
        }
        return r;
    }
    let born = std::time::Instant::now();
    let mut s = match connect(ctx, t, timeouts.connect, cache).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(c) = cache {
                c.forget(t);
            }
            return Err(e);
        }
    };
    let r = exchange(&mut s, &t.display(), method, path, body, timeouts.read, pool.is_some()).await;
    if let (Some(c), Ok(_)) = (cache, &r) {
        match s.resumable_session() {
            Some(der) => c.store(t, &der),
            None => c.forget(t),
        }
    }
    match (&r, pool) {
        (Ok(resp), Some(p)) if resp.keep_alive => p.put(t, s, born),
        _ => s.close(Duration::from_millis(0)).await,
    }
    r
}
