//! TLS for every role: one policy, one CA, and a small async adapter.
//!
//! Policy (wire.md §1.2, identical on every listener and client): TLS 1.2
//! and 1.3 only; TLS 1.2 ciphers ECDHE with AES-GCM only; TLS 1.3 suites
//! AES-256-GCM, CHACHA20-POLY1305, AES-128-GCM. Trust is exactly the
//! deployment CA: contexts are built from `SslContextBuilder::new`, which
//! loads no system roots, and only our CA is added to the store. No host name
//! is checked: identity is "signed by our CA", then the serial map decides.
//!
//! The agent's context *requires* a client certificate (`PEER |
//! FAIL_IF_NO_PEER_CERT`): a client without one fails the handshake, unlike
//! upstream, which let it reach the serial-exempt renewal endpoints.
//!
//! The async adapter: `openssl::ssl::SslStream` runs over a non-blocking
//! socket registered with smol's reactor; every operation is retried after
//! awaiting readability on `WANT_READ` or writability on `WANT_WRITE`. It is
//! ~80 lines instead of a dependency, and it only assumes one request and one
//! response per connection (no `AsyncRead` composition is needed). Dropping a
//! pending write loses the TLS state, which is fine: a timeout drops the whole
//! connection anyway.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::Duration;

use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslMethod, SslMode, SslOptions, SslSession, SslSessionCacheMode,
    SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::X509;
use smol::Async;

/// TLS 1.2 cipher list (exactly upstream's).
pub const TLS12_CIPHERS: &str = "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256";
/// TLS 1.3 suites (exactly upstream's).
pub const TLS13_SUITES: &str = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256";

/// A TLS setup or handshake failure, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn load_identity(b: &mut SslContextBuilder, cert: &Path, key: &Path, ca: &Path) -> Result<(), TlsError> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", p.display())))
    };
    let cert_pem = read(cert, "certificate")?;
    let key_pem = read(key, "private key")?;
    let ca_pem = read(ca, "CA certificate")?;
    let cert_x =
        X509::from_pem(&cert_pem).map_err(|_| TlsError(format!("{} is not a PEM certificate", cert.display())))?;
    let key_p = openssl::pkey::PKey::private_key_from_pem(&key_pem)
        .map_err(|_| TlsError(format!("{} is not a PEM private key", key.display())))?;
    let cas = X509::stack_from_pem(&ca_pem)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| TlsError(format!("{} holds no PEM certificate", ca.display())))?;
    b.set_certificate(&cert_x).map_err(|e| TlsError(format!("cannot use {}: {e}", cert.display())))?;
    b.set_private_key(&key_p).map_err(|e| TlsError(format!("cannot use {}: {e}", key.display())))?;
    b.check_private_key().map_err(|_| {
        TlsError(format!("private key {} does not belong to certificate {}", key.display(), cert.display()))
    })?;
    for c in cas {
        b.cert_store_mut().add_cert(c).map_err(|e| TlsError(format!("cannot trust {}: {e}", ca.display())))?;
    }
    Ok(())
}

fn policy(method: SslMethod) -> Result<SslContextBuilder, TlsError> {
    let e = |e: openssl::error::ErrorStack| TlsError(format!("TLS setup: {e}"));
    let mut b = SslContextBuilder::new(method).map_err(e)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(e)?;
    b.set_cipher_list(TLS12_CIPHERS).map_err(e)?;
    b.set_ciphersuites(TLS13_SUITES).map_err(e)?;
    b.set_options(
        SslOptions::NO_COMPRESSION
            | SslOptions::NO_RENEGOTIATION
            | SslOptions::CIPHER_SERVER_PREFERENCE
            | SslOptions::IGNORE_UNEXPECTED_EOF,
    );
    b.set_mode(SslMode::ENABLE_PARTIAL_WRITE | SslMode::ACCEPT_MOVING_WRITE_BUFFER | SslMode::RELEASE_BUFFERS);
    Ok(b)
}

/// Default for how long an agent's resumption tickets are honoured.
pub const TICKET_LIFETIME_SECS: u64 = 3600;

unsafe extern "C" {
    // Plain functions of every OpenSSL 1.1.1+/3.x libssl the crate does not wrap.
    fn SSL_CTX_set_timeout(ctx: *mut std::ffi::c_void, t: std::ffi::c_long) -> std::ffi::c_long;
    fn SSL_SESSION_is_resumable(s: *const std::ffi::c_void) -> std::ffi::c_int;
}

/// Context for an mTLS server (the agent): our cert, client cert required
/// and verified against `ca`.
pub fn server_context(cert: &Path, key: &Path, ca: &Path, ticket_lifetime: Duration) -> Result<SslContext, TlsError> {
    let mut b = policy(SslMethod::tls_server())?;
    load_identity(&mut b, cert, key, ca)?;
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    b.set_session_id_context(b"ctrl-exec").map_err(|e| TlsError(format!("TLS setup: {e}")))?;
    if let Ok(c) = X509::from_pem(&std::fs::read(ca).unwrap_or_default()) {
        let _ = b.add_client_ca(&c);
    }
    // Resumption: one stateless ticket per handshake, sealed with keys that
    // live only in this context (a restart or SIGHUP reload voids them all),
    // valid for `ticket_lifetime`. The ticket carries the client
    // certificate of the full handshake, so the serial gate and the
    // revocation list apply to resumed connections exactly as to new ones.
    // No server-side cache: nothing grows with the number of clients.
    b.set_num_tickets(1).map_err(|e| TlsError(format!("TLS setup: {e}")))?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    // SAFETY: the builder owns a live SSL_CTX; the call only sets a number.
    unsafe {
        SSL_CTX_set_timeout(b.as_ptr().cast(), ticket_lifetime.as_secs() as std::ffi::c_long);
    }
    Ok(b.build())
}

/// Context for a server that does not ask for client certificates (the
/// API server's optional TLS): same policy, our certificate and key only.
pub fn plain_server_context(cert: &Path, key: &Path) -> Result<SslContext, TlsError> {
    let mut b = policy(SslMethod::tls_server())?;
    let e = |p: &Path, what: &str, err: openssl::error::ErrorStack| {
        TlsError(format!("cannot use {what} {}: {err}", p.display()))
    };
    b.set_certificate_chain_file(cert).map_err(|err| e(cert, "certificate", err))?;
    b.set_private_key_file(key, openssl::ssl::SslFiletype::PEM).map_err(|err| e(key, "private key", err))?;
    b.check_private_key().map_err(|_| {
        TlsError(format!("private key {} does not belong to certificate {}", key.display(), cert.display()))
    })?;
    b.set_verify(SslVerifyMode::NONE);
    Ok(b.build())
}

/// Context for an mTLS client (the dispatcher): our cert presented, the
/// server verified against `ca` only, host name not checked.
pub fn client_context(cert: &Path, key: &Path, ca: &Path) -> Result<SslContext, TlsError> {
    let mut b = policy(SslMethod::tls_client())?;
    load_identity(&mut b, cert, key, ca)?;
    b.set_verify(SslVerifyMode::PEER);
    b.set_session_cache_mode(SslSessionCacheMode::CLIENT | SslSessionCacheMode::NO_INTERNAL);
    Ok(b.build())
}

/// Context for an agent asking to be paired: no certificate of its own
/// yet, and nothing to verify the dispatcher with (the 6-digit pairing code
/// compared by two people is the check, wire.md §3.5).
pub fn pairing_client_context() -> Result<SslContext, TlsError> {
    let mut b = policy(SslMethod::tls_client())?;
    b.set_verify(SslVerifyMode::NONE);
    Ok(b.build())
}

/// The non-blocking socket under an `SslStream`.
#[derive(Debug)]
pub struct Io(pub Async<TcpStream>);

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.get_ref().read(buf)
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_ref().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An established TLS connection on the smol reactor.
#[derive(Debug)]
pub struct TlsStream {
    s: SslStream<Io>,
}

/// Why an operation on the stream stopped.
#[derive(Debug)]
enum Stop {
    Ssl(openssl::ssl::Error),
    Io(io::Error),
}

impl Stop {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            Stop::Ssl(e) => Some(e.code()),
            Stop::Io(_) => None,
        }
    }

    fn into_io(self) -> io::Error {
        match self {
            Stop::Io(e) => e,
            Stop::Ssl(e) => match e.into_io_error() {
                Ok(io) => io,
                Err(e) => io::Error::other(describe(&e)),
            },
        }
    }
}

/// Short text for a TLS error (the library's reason, not its whole stack).
fn describe(e: &openssl::ssl::Error) -> String {
    if let Some(stack) = e.ssl_error()
        && let Some(first) = stack.errors().first()
    {
        return first.reason().unwrap_or("TLS error").to_string();
    }
    match e.io_error() {
        Some(io) => io.to_string(),
        None if e.code() == ErrorCode::SYSCALL => "connection closed during handshake".into(),
        None => format!("TLS error code {}", e.code().as_raw()),
    }
}

impl TlsStream {
    async fn drive<T>(
        s: &mut SslStream<Io>,
        mut op: impl FnMut(&mut SslStream<Io>) -> Result<T, openssl::ssl::Error>,
    ) -> Result<T, Stop> {
        loop {
            match op(s) {
                Ok(v) => return Ok(v),
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    s.get_ref().0.readable().await.map_err(Stop::Io)?;
                }
                Err(e) if e.code() == ErrorCode::WANT_WRITE => {
                    s.get_ref().0.writable().await.map_err(Stop::Io)?;
                }
                Err(e) => return Err(Stop::Ssl(e)),
            }
        }
    }

    async fn handshake(
        ctx: &SslContext,
        tcp: Async<TcpStream>,
        server: bool,
        resume: Option<&SslSession>,
    ) -> Result<TlsStream, TlsError> {
        let mut ssl = Ssl::new(ctx).map_err(|e| TlsError(format!("TLS setup: {e}")))?;
        if let Some(session) = resume {
            // SAFETY: the session was serialised by a connection of a context
            // built by client_context() with the same identity (the cache is
            // keyed by our certificate); OpenSSL falls back to a full
            // handshake if the agent rejects it.
            unsafe { ssl.set_session(session) }.map_err(|e| TlsError(format!("TLS setup: {e}")))?;
        }
        let mut s = SslStream::new(ssl, Io(tcp)).map_err(|e| TlsError(format!("TLS setup: {e}")))?;
        let r =
            if server { Self::drive(&mut s, |s| s.accept()).await } else { Self::drive(&mut s, |s| s.connect()).await };
        match r {
            Ok(()) => Ok(TlsStream { s }),
            Err(Stop::Io(e)) => Err(TlsError(e.to_string())),
            Err(Stop::Ssl(e)) => {
                let v = s.ssl().verify_result();
                let why = if v != openssl::x509::X509VerifyResult::OK {
                    format!("{} ({})", describe(&e), v.error_string())
                } else {
                    describe(&e)
                };
                Err(TlsError(why))
            }
        }
    }

    /// Server side of the handshake.
    pub async fn accept(ctx: &SslContext, tcp: Async<TcpStream>) -> Result<TlsStream, TlsError> {
        Self::handshake(ctx, tcp, true, None).await
    }

    /// Client side of the handshake, offering `resume` if given.
    pub async fn connect(
        ctx: &SslContext,
        tcp: Async<TcpStream>,
        resume: Option<&SslSession>,
    ) -> Result<TlsStream, TlsError> {
        Self::handshake(ctx, tcp, false, resume).await
    }

    /// Did this connection resume an earlier session?
    pub fn resumed(&self) -> bool {
        self.s.ssl().session_reused()
    }

    /// The session to offer next time, as DER, once the peer sent a ticket
    /// (TLS 1.3 tickets arrive after the handshake: call this after reading).
    pub fn resumable_session(&self) -> Option<Vec<u8>> {
        use foreign_types::ForeignTypeRef;
        let session = self.s.ssl().session()?;
        // SAFETY: a live SSL_SESSION owned by this connection; read only.
        let ok = unsafe { SSL_SESSION_is_resumable(session.as_ptr().cast()) } == 1;
        if ok { session.to_der().ok() } else { None }
    }

    /// Nothing waits to be read: no buffered record, and the socket shows
    /// neither data nor a close. An idle kept connection must be quiet.
    pub fn quiet(&self) -> bool {
        if self.s.ssl().pending() > 0 {
            return false;
        }
        let mut b = [0u8; 1];
        // The socket is non-blocking (Async): WouldBlock means nothing arrived.
        matches!(self.s.get_ref().0.get_ref().peek(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Wait until there is something to read (data, or the peer's close).
    pub async fn readable(&self) -> io::Result<()> {
        if self.s.ssl().pending() > 0 {
            return Ok(());
        }
        self.s.get_ref().0.readable().await
    }

    /// Read some bytes; `Ok(0)` at end of stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Self::drive(&mut self.s, |s| s.ssl_read(buf)).await {
            Ok(n) => Ok(n),
            Err(e) if e.code() == Some(ErrorCode::ZERO_RETURN) => Ok(0),
            Err(Stop::Ssl(e)) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => Ok(0),
            Err(e) => Err(e.into_io()),
        }
    }

    /// Write the whole buffer.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = Self::drive(&mut self.s, |s| s.ssl_write(buf)).await.map_err(Stop::into_io)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Send close_notify and stop writing; unread input is drained for up
    /// to `linger` so the peer sees our reply rather than a reset.
    pub async fn close(mut self, linger: std::time::Duration) {
        let _ = crate::time::timeout(linger, Self::drive(&mut self.s, |s| s.shutdown())).await;
        let _ = self.s.get_ref().0.get_ref().shutdown(Shutdown::Write);
        let mut sink = [0u8; 4096];
        let _ = crate::time::timeout(linger, async {
            let mut total = 0usize;
            while total < (4 << 20) {
                match self.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
    }

    /// The peer's certificate, if it sent one.
    pub fn peer_cert(&self) -> Option<X509> {
        self.s.ssl().peer_certificate()
    }

    /// The peer certificate's serial as OpenSSL prints it, lowercased
    /// (serial 2 reads `02`); empty when there is no peer certificate.
    pub fn peer_serial_raw(&self) -> String {
        self.peer_cert()
            .and_then(|c| c.serial_number().to_bn().ok())
            .and_then(|bn| bn.to_hex_str().ok().map(|s| s.to_ascii_lowercase()))
            .unwrap_or_default()
    }

    /// Negotiated protocol and cipher, e.g. `TLSv1.3 TLS_AES_256_GCM_SHA384`.
    pub fn describe_session(&self) -> String {
        let ssl = self.s.ssl();
        format!("{} {}", ssl.version_str(), ssl.current_cipher().map(|c| c.name()).unwrap_or("?"))
    }
}
