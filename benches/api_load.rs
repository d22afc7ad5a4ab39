//! Load generator for the API server, used by `make bench`.
//!
//! `api_load <port> <clients> <seconds> <host>...` keeps `clients`
//! connections busy with `POST /run` of the script `trivial`, each request to
//! the next host in turn, for `seconds`, then prints one line:
//! `requests=<n> ok=<n> errors=<n> rps=<f> median_ms=<f> p95_ms=<f>`.
//! A request counts as ok when the API answers 200 and the agent's exit is 0.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn one(port: u16, host: &str) -> bool {
    let body = format!(r#"{{"hosts":["{host}"],"script":"trivial"}}"#);
    let req = format!(
        "POST /run HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_nodelay(true);
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut out = Vec::with_capacity(1024);
    if s.read_to_end(&mut out).is_err() {
        return false;
    }
    let text = String::from_utf8_lossy(&out);
    text.starts_with("HTTP/1.0 200") && text.contains(r#""exit":0"#)
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
    let start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, next, lat, errors, hosts) =
                (stop.clone(), next.clone(), lat.clone(), errors.clone(), hosts.clone());
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let h = &hosts[next.fetch_add(1, Ordering::Relaxed) % hosts.len()];
                    let t = Instant::now();
                    if one(port, h) {
                        mine.push(t.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
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
    let errs = errors.load(Ordering::Relaxed);
    println!(
        "requests={} ok={} errors={} rps={:.0} median_ms={:.1} p95_ms={:.1}",
        l.len() + errs,
        l.len(),
        errs,
        l.len() as f64 / took,
        pick(0.5),
        pick(0.95)
    );
}
