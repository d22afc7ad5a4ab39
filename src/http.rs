//! HTTP/1.0 framing with limits, for both ends of a connection.
//!
//! One request and one response per connection, bodies framed by
//! `Content-Length` (JSON). Nothing here knows about routes.
//!
//! What we accept (liberal, wire.md §2.1): `METHOD PATH [VERSION]` with any
//! version, CRLF or bare-LF line ends, case-insensitive header names, extra
//! headers ignored, at most [`Limits::max_headers`] header lines (431 above),
//! a body of at most [`Limits::max_body`] bytes (413 before reading it).
//! What we send (strict): exactly `HTTP/1.0 <code> <phrase>`, `Content-Type:
//! application/json`, `Content-Length`, a blank line and the body, then close
//! — the bytes a Perl dispatcher expects.

use std::fmt;
use std::io;

/// A byte stream we can speak HTTP over (TLS or plain TCP).
#[allow(async_fn_in_trait)]
pub trait Conn {
    /// Read some bytes; `Ok(0)` at end of stream.
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write the whole buffer.
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
}

impl Conn for smol::Async<std::net::TcpStream> {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        smol::io::AsyncReadExt::read(self, buf).await
    }
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        smol::io::AsyncWriteExt::write_all(self, buf).await
    }
}

impl Conn for crate::tls::TlsStream {
    async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        crate::tls::TlsStream::read(self, buf).await
    }
    async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        crate::tls::TlsStream::write_all(self, buf).await
    }
}

/// Limits applied while reading a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest accepted body (413 above).
    pub max_body: usize,
    /// Most header lines (431 above).
    pub max_headers: usize,
    /// Most bytes of request line plus headers (431 above).
    pub max_head_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body: 1 << 20, max_headers: 32, max_head_bytes: 64 << 10 }
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path, verbatim.
    pub path: String,
    /// Header names lowercased, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// The client asked to keep the connection (`Connection: keep-alive`)
    /// and sent nothing beyond this request.
    pub keep_alive: bool,
}

/// Does a `Connection` header list the `keep-alive` token?
fn asks_keep_alive(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .filter(|(k, _)| k == "connection")
        .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("keep-alive")))
}

impl Request {
    /// First header with this (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read.
#[derive(Debug)]
pub enum HttpError {
    /// Answer with this status and `{"error": msg}`.
    Status(u16, &'static str),
    /// The connection failed or closed early; nothing can be answered.
    Io(io::Error),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Status(c, m) => write!(f, "{c} {m}"),
            HttpError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The reason phrase of a status code (one shared table, as upstream).
pub fn phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// End of the head (`\r\n\r\n` or `\n\n`), as the index just past it.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Read bytes until the end of the head; returns (buffer, head length).
async fn read_head<C: Conn>(c: &mut C, max_head: usize) -> Result<(Vec<u8>, usize), HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        // An empty first line means "no request line" whatever follows.
        if buf.first() == Some(&b'\n') || buf.starts_with(b"\r\n") {
            return Err(HttpError::Status(400, "empty request"));
        }
        if let Some(end) = head_end(&buf) {
            return Ok((buf, end));
        }
        if buf.len() > max_head {
            return Err(HttpError::Status(431, "request headers too large"));
        }
        let n = c.read(&mut chunk).await.map_err(HttpError::Io)?;
        if n == 0 {
            return Err(if buf.iter().all(|b| b.is_ascii_whitespace()) {
                HttpError::Status(400, "empty request")
            } else {
                HttpError::Status(400, "incomplete request")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Request line and headers.
type Head = (String, String, Vec<(String, String)>);

fn parse_head(head: &[u8], limits: &Limits) -> Result<Head, HttpError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or("").trim();
    if first.is_empty() {
        return Err(HttpError::Status(400, "empty request"));
    }
    let mut parts = first.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Err(HttpError::Status(400, "malformed request line"));
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if headers.len() >= limits.max_headers {
            return Err(HttpError::Status(431, "too many headers"));
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((method.to_string(), path.to_string(), headers))
}

fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, HttpError> {
    match headers.iter().find(|(k, _)| k == "content-length") {
        None => Ok(None),
        Some((_, v)) => match v.parse::<u64>() {
            Ok(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            Err(_) => Err(HttpError::Status(400, "invalid Content-Length")),
        },
    }
}

/// Read one request, enforcing `limits`. A body larger than the limit is
/// refused from its `Content-Length` alone, before any of it is read.
pub async fn read_request<C: Conn>(c: &mut C, limits: &Limits) -> Result<Request, HttpError> {
    let (mut buf, end) = read_head(c, limits.max_head_bytes).await?;
    let (method, path, headers) = parse_head(&buf[..end], limits)?;
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && !v.eq_ignore_ascii_case("identity")) {
        return Err(HttpError::Status(400, "chunked bodies are not supported; send Content-Length"));
    }
    let len = content_length(&headers)?.unwrap_or(0);
    if len > limits.max_body {
        return Err(HttpError::Status(413, "request too large"));
    }
    let mut body = buf.split_off(end);
    // Bytes beyond the body (a pipelining client): answered, then closed.
    let trailing = body.len() > len;
    body.truncate(len);
    let mut chunk = [0u8; 16 << 10];
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        let n = c.read(&mut chunk[..want]).await.map_err(HttpError::Io)?;
        if n == 0 {
            return Err(HttpError::Status(400, "request body shorter than Content-Length"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let keep_alive = !trailing && asks_keep_alive(&headers);
    Ok(Request { method, path, headers, body, keep_alive })
}

/// The exact bytes of a response (upstream's, byte for byte).
pub fn response_bytes(code: u16, body: &str) -> Vec<u8> {
    response_bytes_with(code, body, false)
}

/// The bytes of a response, saying `Connection: keep-alive` if `keep`.
fn response_bytes_with(code: u16, body: &str, keep: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        phrase(code),
        body.len(),
        if keep { "Connection: keep-alive\r\n" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Write a response.
pub async fn write_response<C: Conn>(c: &mut C, code: u16, body: &str) -> io::Result<()> {
    c.write_all(&response_bytes(code, body)).await
}

/// Write a response that keeps the connection open for another request.
pub async fn write_response_kept<C: Conn>(c: &mut C, code: u16, body: &str) -> io::Result<()> {
    c.write_all(&response_bytes_with(code, body, true)).await
}

/// Write a client request with a JSON body (or none).
pub async fn write_request<C: Conn>(
    c: &mut C,
    method: &str,
    path: &str,
    host: &str,
    body: Option<&str>,
    keep_alive: bool,
) -> io::Result<()> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ctrl-exec/{}\r\nConnection: {}\r\n",
        crate::VERSION,
        if keep_alive { "keep-alive" } else { "close" }
    );
    if let Some(b) = body {
        out.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b.as_bytes());
    }
    c.write_all(&bytes).await
}

/// A response as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub code: u16,
    /// Body bytes.
    pub body: Vec<u8>,
    /// The server said `Connection: keep-alive`, framed the body with
    /// `Content-Length` and sent nothing more: the connection may carry
    /// another request.
    pub keep_alive: bool,
}

/// Read a response: `Content-Length` bytes if given, else to end of stream.
pub async fn read_response<C: Conn>(c: &mut C, max_body: usize) -> Result<Response, HttpError> {
    let (mut buf, end) = read_head(c, 64 << 10).await.map_err(|e| match e {
        HttpError::Status(..) => HttpError::Io(io::Error::new(io::ErrorKind::InvalidData, "no HTTP response")),
        other => other,
    })?;
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let status = lines.next().unwrap_or("");
    let mut sp = status.split_whitespace();
    let code = match (sp.next(), sp.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code,
        _ => {
            return Err(HttpError::Io(io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP status line")));
        }
    };
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    let len = content_length(&headers)
        .map_err(|_| HttpError::Io(io::Error::new(io::ErrorKind::InvalidData, "invalid Content-Length")))?;
    let mut body = buf.split_off(end);
    let trailing = len.is_some_and(|l| body.len() > l);
    let limit = len.unwrap_or(max_body).min(max_body);
    if len.is_some_and(|l| l > max_body) {
        return Err(HttpError::Io(io::Error::new(io::ErrorKind::InvalidData, "response too large")));
    }
    let mut chunk = [0u8; 16 << 10];
    while body.len() < limit {
        // Never read past the body: what follows belongs to the connection.
        let want = (limit - body.len()).min(chunk.len());
        let n = c.read(&mut chunk[..want]).await.map_err(HttpError::Io)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    if let Some(l) = len {
        if body.len() < l {
            return Err(HttpError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "response shorter than Content-Length",
            )));
        }
        body.truncate(l);
    }
    let keep_alive = len.is_some() && !trailing && asks_keep_alive(&headers);
    Ok(Response { code, body, keep_alive })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory connection delivering `input` in chunks of `step` bytes.
    struct Mem {
        input: Vec<u8>,
        pos: usize,
        step: usize,
        out: Vec<u8>,
    }

    impl Conn for Mem {
        async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.input.len() - self.pos);
            buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
        async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
            self.out.extend_from_slice(buf);
            Ok(())
        }
    }

    fn read(input: &[u8], step: usize) -> Result<Request, HttpError> {
        let mut m = Mem { input: input.to_vec(), pos: 0, step, out: vec![] };
        smol::block_on(read_request(&mut m, &Limits::default()))
    }

    fn status(r: Result<Request, HttpError>) -> u16 {
        match r {
            Ok(_) => 200,
            Err(HttpError::Status(c, _)) => c,
            Err(HttpError::Io(_)) => 0,
        }
    }

    #[test]
    fn lwp_style_request() {
        let body = r#"{"script":"x"}"#;
        let raw = format!(
            "POST /run HTTP/1.1\r\nTE: deflate,gzip;q=0.3\r\nConnection: TE, close\r\nHost: a:1\r\nUser-Agent: libwww-perl/6.68\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\r\n{body}",
            body.len()
        );
        for step in [1, 3, 7, 4096] {
            let r = read(raw.as_bytes(), step).unwrap();
            assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/run"));
            assert_eq!(r.body, body.as_bytes());
            assert_eq!(r.header("content-type"), Some("application/json"));
        }
    }

    #[test]
    fn keep_alive_is_asked_by_token_and_lost_to_pipelining() {
        let ask = |conn: &str, extra: &str| {
            let raw = format!("POST /run HTTP/1.1\r\n{conn}Content-Length: 2\r\n\r\n{{}}{extra}");
            read(raw.as_bytes(), 4096).unwrap().keep_alive
        };
        assert!(ask("Connection: keep-alive\r\n", ""));
        assert!(ask("Connection: TE, Keep-Alive\r\n", ""));
        assert!(!ask("Connection: TE, close\r\n", ""), "upstream's dispatcher");
        assert!(!ask("", ""));
        assert!(!ask("Connection: keep-alives\r\n", ""));
        assert!(!ask("Connection: keep-alive\r\n", "GET / HTTP/1.0\r\n\r\n"), "bytes after the body");
    }

    #[test]
    fn a_response_may_keep_its_connection_only_when_framed_and_said() {
        let resp = |raw: &str| {
            let mut m = Mem { input: raw.as_bytes().to_vec(), pos: 0, step: 4096, out: vec![] };
            smol::block_on(read_response(&mut m, 1 << 20)).unwrap()
        };
        let r = resp("HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}");
        assert!(r.keep_alive && r.body == b"{}");
        assert!(!resp("HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}").keep_alive);
        assert!(!resp("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n{}").keep_alive, "no length");
        let extra = resp("HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}junk");
        assert!(!extra.keep_alive && extra.body == b"{}", "bytes beyond the body");
        // Our replies: upstream's bytes unless keeping, then one more header.
        assert_eq!(response_bytes(200, "{}"), response_bytes_with(200, "{}", false));
        let kept = String::from_utf8(response_bytes_with(200, "{}", true)).unwrap();
        assert!(kept.ends_with("Content-Length: 2\r\nConnection: keep-alive\r\n\r\n{}"), "{kept}");
    }

    #[test]
    fn lf_only_and_no_body() {
        let r = read(b"GET /capabilities HTTP/1.0\nHost: x\n\n", 5).unwrap();
        assert_eq!(r.path, "/capabilities");
        assert!(r.body.is_empty());
    }

    #[test]
    fn limits_table() {
        let hdrs = |n: usize| {
            let mut s = String::from("POST /run HTTP/1.0\r\n");
            for i in 0..n {
                s.push_str(&format!("X-Filler-{i}: y\r\n"));
            }
            s.push_str("\r\n");
            s
        };
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (hdrs(32).into_bytes(), 200),
            (hdrs(33).into_bytes(), 431),
            (b"POST /run HTTP/1.0\r\nContent-Length: 1048577\r\n\r\n".to_vec(), 413),
            (b"POST /run HTTP/1.0\r\nContent-Length: 1048576\r\n\r\n".to_vec(), 400),
            (b"POST /run HTTP/1.0\r\nContent-Length: -1\r\n\r\n".to_vec(), 400),
            (b"POST /run HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), 400),
            (b"\r\n\r\n".to_vec(), 400),
            (b"".to_vec(), 400),
            (b"GARBAGE\r\n\r\n".to_vec(), 400),
            (vec![b'a'; 70 << 10], 431),
        ];
        for (input, want) in cases {
            assert_eq!(status(read(&input, 999)), want, "{:?}", String::from_utf8_lossy(&input[..input.len().min(60)]));
        }
    }

    #[test]
    fn response_bytes_are_exact() {
        assert_eq!(
            response_bytes(404, r#"{"error":"not found"}"#),
            b"HTTP/1.0 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n{\"error\":\"not found\"}".to_vec()
        );
    }

    #[test]
    fn client_reads_with_and_without_length() {
        let mut m = Mem { input: response_bytes(200, "{}"), pos: 0, step: 2, out: vec![] };
        let r = smol::block_on(read_response(&mut m, 1 << 20)).unwrap();
        assert_eq!((r.code, r.body), (200, b"{}".to_vec()));
        let mut m = Mem { input: b"HTTP/1.0 403 Forbidden\r\n\r\n{\"a\":1}".to_vec(), pos: 0, step: 4, out: vec![] };
        let r = smol::block_on(read_response(&mut m, 1 << 20)).unwrap();
        assert_eq!((r.code, r.body), (403, b"{\"a\":1}".to_vec()));
    }

    proptest::proptest! {
        #[test]
        fn reader_never_panics(input in proptest::collection::vec(0u8..=255, 0..600), step in 1usize..64) {
            let _ = read(&input, step);
            let mut m = Mem { input, pos: 0, step, out: vec![] };
            let _ = smol::block_on(read_response(&mut m, 1 << 16));
        }
    }
}
