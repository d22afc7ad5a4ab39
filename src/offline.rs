//! Offline pairing: the same request and approval as network pairing, carried
//! as text over whatever reaches the host (a 9600-baud serial console, a
//! copy and paste through a jump host, a flaky cellular shell).
//!
//! ```text
//! agent                                   dispatcher (CA)
//! request-pairing --offline  --text-->    ca sign        (shows the code, asks)
//! install-reply              <--text--    (prints the reply)
//! ```
//!
//! Both texts are [`crate::armor`] blocks: a dropped or mangled line is
//! detected and nothing happens. Every step can be repeated with the same
//! result: the agent keeps its pending key and request until a reply is
//! installed and prints the same request again; the CA keeps each reply
//! keyed by the CSR and prints the same reply again instead of signing twice;
//! installing a reply that is already installed changes nothing.

use std::path::{Path, PathBuf};

use crate::armor;
use crate::pairing::{Approval, PairError, PairRequest};

const REQUEST: &str = "PAIRING REQUEST";
const REPLY: &str = "PAIRING REPLY";

fn field<'a>(lines: &[&'a str], key: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')).map(str::trim))
}

/// PEM blocks (`-----BEGIN <label>-----` … `-----END <label>-----`) among
/// `lines`, rebuilt exactly as OpenSSL writes them (LF, final newline).
fn pem_blocks(lines: &[&str], label: &str) -> Vec<String> {
    let (b, e) = (format!("-----BEGIN {label}-----"), format!("-----END {label}-----"));
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for l in lines {
        if *l == b {
            cur = Some(format!("{l}\n"));
        } else if let Some(c) = cur.as_mut() {
            c.push_str(l);
            c.push('\n');
            if *l == e {
                out.extend(cur.take());
            }
        }
    }
    out
}

fn pem_lines(pem: &str) -> impl Iterator<Item = String> + '_ {
    pem.lines().map(|l| l.trim_end().to_string()).filter(|l| !l.is_empty())
}

/// The request as text for the console.
pub fn render_request(r: &PairRequest) -> String {
    let mut lines = vec![
        "Version: 1".to_string(),
        format!("Name: {}", r.hostname),
        format!("Nonce: {}", r.nonce),
        format!("Code: {}", r.code()),
    ];
    if let Some(p) = r.port {
        lines.push(format!("Port: {p}"));
    }
    if let Some(l) = &r.lookup_by {
        lines.push(format!("Lookup-By: {l}"));
    }
    if let Some(ip) = &r.ip {
        lines.push(format!("IP: {ip}"));
    }
    lines.extend(pem_lines(&r.csr));
    armor::wrap(REQUEST, &lines)
}

/// Read a request; the code it states must match its CSR.
pub fn parse_request(text: &str) -> Result<PairRequest, PairError> {
    let owned = armor::unwrap(REQUEST, "pairing request", text).map_err(|e| PairError(e.0))?;
    let lines: Vec<&str> = owned.iter().map(String::as_str).collect();
    if field(&lines, "Version") != Some("1") {
        return Err(PairError("pairing request version not supported by this ctrl-exec; upgrade it".into()));
    }
    let name = field(&lines, "Name").unwrap_or_default();
    if !crate::wire::valid_agent_name(name) {
        return Err(PairError(format!("the pairing request names an invalid agent '{name}'")));
    }
    let csr = match pem_blocks(&lines, "CERTIFICATE REQUEST").as_slice() {
        [one] => one.clone(),
        _ => return Err(PairError("the pairing request must carry exactly one CSR".into())),
    };
    let port = match field(&lines, "Port") {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| PairError(format!("the pairing request has an invalid port '{p}'")))?,
        ),
    };
    let r = PairRequest {
        hostname: name.to_string(),
        csr,
        nonce: field(&lines, "Nonce").unwrap_or_default().to_string(),
        ip: field(&lines, "IP").filter(|s| crate::pairing::is_ip(s)).map(String::from),
        port,
        lookup_by: crate::pairing::lookup_by(field(&lines, "Lookup-By")),
    };
    if field(&lines, "Code") != Some(r.code().as_str()) {
        return Err(PairError("the pairing request's code does not match its CSR (damaged in transit?)".into()));
    }
    Ok(r)
}

/// The reply as text for the console.
pub fn render_reply(name: &str, a: &Approval) -> String {
    let mut lines = vec![
        "Version: 1".to_string(),
        format!("Name: {name}"),
        format!("Nonce: {}", a.nonce),
        format!("Dispatcher-Serial: {}", a.dispatcher_serial),
        format!("Dispatcher-Id: {}", a.dispatcher_id),
    ];
    lines.extend(pem_lines(&a.cert));
    lines.extend(pem_lines(&a.ca));
    armor::wrap(REPLY, &lines)
}

/// Read a reply: the agent name and the approval.
pub fn parse_reply(text: &str) -> Result<(String, Approval), PairError> {
    let owned = armor::unwrap(REPLY, "pairing reply", text).map_err(|e| PairError(e.0))?;
    let lines: Vec<&str> = owned.iter().map(String::as_str).collect();
    if field(&lines, "Version") != Some("1") {
        return Err(PairError("pairing reply version not supported by this ctrl-exec; upgrade it".into()));
    }
    let certs = pem_blocks(&lines, "CERTIFICATE");
    let [cert, ca] = certs.as_slice() else {
        return Err(PairError("the pairing reply must carry the agent and CA certificates".into()));
    };
    let a = Approval {
        cert: cert.clone(),
        ca: ca.clone(),
        nonce: field(&lines, "Nonce").unwrap_or_default().to_string(),
        dispatcher_serial: field(&lines, "Dispatcher-Serial").unwrap_or_default().to_string(),
        dispatcher_id: field(&lines, "Dispatcher-Id").unwrap_or_default().to_string(),
    };
    Ok((field(&lines, "Name").unwrap_or_default().to_string(), a))
}

/// The agent's pending offline request: its key and the request text,
/// next to where the key will live.
#[derive(Debug, Clone)]
pub struct PendingFiles {
    /// The private key made for the request (0600).
    pub key: PathBuf,
    /// The request as printed.
    pub request: PathBuf,
}

impl PendingFiles {
    /// Pending files for an agent whose key goes to `key_path`.
    pub fn beside(key_path: &Path) -> PendingFiles {
        let dir = key_path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        PendingFiles { key: dir.join("pairing-request.key"), request: dir.join("pairing-request.txt") }
    }

    /// The pending key and request, if both are there and readable.
    pub fn load(&self) -> Option<(Vec<u8>, PairRequest)> {
        let key = std::fs::read(&self.key).ok()?;
        let req = parse_request(&std::fs::read_to_string(&self.request).ok()?).ok()?;
        Some((key, req))
    }

    /// Keep a new request: the key first, so a request on disk always has
    /// its key.
    pub fn save(&self, key_pem: &[u8], text: &str) -> Result<(), PairError> {
        crate::fsutil::atomic_write(&self.key, key_pem, 0o600)?;
        crate::fsutil::atomic_write(&self.request, text.as_bytes(), 0o600)?;
        Ok(())
    }

    /// Forget the request once its reply is installed.
    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.request);
        let _ = std::fs::remove_file(&self.key);
    }
}

/// Where the CA keeps the reply to each request it signed, so that signing
/// the same request again prints the same reply (no second certificate).
pub fn reply_store(pairing_dir: &Path, req: &PairRequest) -> PathBuf {
    let id = crate::wire::hex(&openssl::sha::sha256(req.csr.as_bytes()));
    pairing_dir.join("offline").join(format!("{id}.reply"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> PairRequest {
        let key = crate::ca::KeyType::EcP256.generate().unwrap();
        let csr = crate::ca::make_csr(&key, "edge-7").unwrap();
        PairRequest {
            hostname: "edge-7".into(),
            csr: String::from_utf8(csr.to_pem().unwrap()).unwrap(),
            nonce: "00112233445566778899aabbccddeeff".into(),
            ip: Some("192.0.2.7".into()),
            port: Some(7443),
            lookup_by: Some("ip".into()),
        }
    }

    #[test]
    fn request_round_trips_through_a_crlf_console() {
        let r = request();
        let text = render_request(&r);
        assert!(text.lines().all(|l| l.len() <= armor::WIDTH && l.is_ascii()));
        let console = format!("router# {}\r\nrouter# ", text.replace('\n', "\r\n"));
        let back = parse_request(&console).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.code(), r.code(), "the code is computed over the exact CSR text");
    }

    #[test]
    fn a_changed_request_is_refused() {
        let text = render_request(&request());
        let lines: Vec<&str> = text.lines().collect();
        let dropped: Vec<&str> = lines.iter().enumerate().filter(|(i, _)| *i != 8).map(|(_, l)| *l).collect();
        assert!(parse_request(&dropped.join("\n")).unwrap_err().0.contains("damaged"));
    }

    #[test]
    fn reply_round_trips() {
        let a = Approval {
            cert: "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n".into(),
            ca: "-----BEGIN CERTIFICATE-----\nREVG\n-----END CERTIFICATE-----\n".into(),
            nonce: "ab".into(),
            dispatcher_serial: "2".into(),
            dispatcher_id: "d1".into(),
        };
        let (name, back) = parse_reply(&render_reply("edge-7", &a)).unwrap();
        assert_eq!((name.as_str(), back), ("edge-7", a));
    }
}
