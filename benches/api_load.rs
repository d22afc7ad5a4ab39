//! Load generator for the API server, used by `make bench`.
//!
//! `api_load <port> <clients> <seconds> <host>...` keeps `clients`
//! connections busy with `POST /run`, each request to the next host in turn,
//! for `seconds`, then prints one line:
//! `requests=<n> ok=<n> locked=<n> errors=<n> rps=<f> median_ms=<f> p95_ms=<f>`.
//! Client `i` runs the script `trivial-<i>`: a synchronous run holds the
//! dispatcher lock for its host and script, so clients sharing one script
//! would mostly measure 409s. A request counts as ok when the API answers 200
//! and the agent's exit is 0; `locked` counts 409s (which should stay 0).
//!
//! With `API_LOAD_KEEP=1` in the environment each client keeps its
//! connection open (`Connection: keep-alive`, as `wrk` and HTTP/1.1 client
//! libraries do) and reconnects only when the server closes it; otherwise
//! every request opens a new connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

enum Outcome {
    Ok,
    Locked,
    Failed,
}

/// Judge one response.
fn outcome(text: &str) -> Outcome {
    if text.starts_with("HTTP/1.0 200") && text.contains(r#""exit":0"#) {
        Outcome::Ok
    } else if text.starts_with("HTTP/1.0 409") {
        Outcome::Locked
    } else {
        Outcome::Failed
    }
}

/// One request on a kept connection (opened when `conn` is empty); the
/// connection stays in `conn` if the server agreed to keep it.
fn kept(conn: &mut Option<TcpStream>, port: u16, host: &str, script: &str) -> Outcome {
    let body = format!(r#"{{"hosts":["{host}"],"script":"{script}"}}"#);
    let req = format!(
        "POST /run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    );
    if conn.is_none() {
        let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else { return Outcome::Failed };
        let _ = s.set_nodelay(true);
        *conn = Some(s);
    }
    let s = conn.as_mut().unwrap();
    if s.write_all(req.as_bytes()).is_err() {
        *conn = None;
        return Outcome::Failed;
    }
    // Head, then Content-Length bytes of body.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_end, len) = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            let len = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok());
            break (i + 4, len.unwrap_or(0usize));
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                *conn = None;
                return Outcome::Failed;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    while buf.len() < head_end + len {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => {
                *conn = None;
                return Outcome::Failed;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    if !text[..head_end].to_ascii_lowercase().contains("connection: keep-alive") {
        *conn = None;
    }
    outcome(&text)
}

fn one(port: u16, host: &str, script: &str) -> Outcome {
    let body = format!(r#"{{"hosts":["{host}"],"script":"{script}"}}"#);
    let req = format!(
        "POST /run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return Outcome::Failed };
    let _ = s.set_nodelay(true);
    if s.write_all(req.as_bytes()).is_err() {
        return Outcome::Failed;
    }
    let mut out = Vec::with_capacity(1024);
    if s.read_to_end(&mut out).is_err() {
        return Outcome::Failed;
    }
    outcome(&String::from_utf8_lossy(&out))
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: api_load <port> <clients> <seconds> <host>...");
        std::process::exit(2);
    }
    let port: u16 = a[1].parse().expect("port");
    let clients: usize = a[2].parse().expect("clients");
    let secs: u64 = a[3].parse().expect("seconds");
    let hosts: Arc<Vec<String>> = Arc::new(a[4..].to_vec());
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(AtomicUsize::new(0));
    let locked = Arc::new(AtomicUsize::new(0));
    let keep = std::env::var("API_LOAD_KEEP").is_ok_and(|v| v == "1");
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (stop, next, lat, errors, locked, hosts) =
                (stop.clone(), next.clone(), lat.clone(), errors.clone(), locked.clone(), hosts.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                let script = format!("trivial-{i}");
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    let h = &hosts[next.fetch_add(1, Ordering::Relaxed) % hosts.len()];
                    let t = Instant::now();
                    let r = if keep { kept(&mut conn, port, h, &script) } else { one(port, h, &script) };
                    match r {
                        Outcome::Ok => mine.push(t.elapsed().as_secs_f64() * 1000.0),
                        Outcome::Locked => _ = locked.fetch_add(1, Ordering::Relaxed),
                        Outcome::Failed => _ = errors.fetch_add(1, Ordering::Relaxed),
                    }
                }
                lat.lock().unwrap().extend(mine);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let took = start.elapsed().as_secs_f64();
    let mut l = lat.lock().unwrap().clone();
    l.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pick =
        |q: f64| if l.is_empty() { 0.0 } else { l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1] };
    let (errs, lk) = (errors.load(Ordering::Relaxed), locked.load(Ordering::Relaxed));
    println!(
        "requests={} ok={} locked={} errors={} rps={:.0} median_ms={:.1} p95_ms={:.1}",
        l.len() + errs + lk,
        l.len(),
        lk,
        errs,
        l.len() as f64 / took,
        pick(0.5),
        pick(0.95)
    );
}
