//! Agent certificate renewal (wire.md §2.9, §4.1; behaviour.md §3.11, §10.2).
//!
//! The agent keeps its key for life; only its certificate is renewed, in
//! three steps driven by the dispatcher:
//!
//! 1. after a successful `/ping` whose `expiry` leaves less than half of
//!    `cert_days` and whose `staged` is not true, the dispatcher (the CLI's
//!    `ping` and `maintain`, never the API server) asks `POST /renew`; the
//!    agent answers with a CSR made from its existing key, `CN=<the name it
//!    reports in /ping>`;
//! 2. the dispatcher checks the CSR (the CN must be the registry name), signs
//!    it for `cert_days` and sends it with `POST /renew-complete`; the agent
//!    checks it against its own CA file and key and stages it (0640) at
//!    `cert_staging_path`, leaving the live certificate alone;
//! 3. at its next start, `promote-cert` checks the staged file again with
//!    [`check_renewed_cert`] and installs it.
//!
//! Differences from upstream: both endpoints pass the trusted-dispatcher
//! gate like `/run` (upstream leaves them open to any CA-signed client), and
//! the dispatcher counts a renewal only when the agent answers
//! `status: "ok"` with `staged: true` (upstream looks at the HTTP status only).

use miniserde::json::Object;
use openssl::x509::X509;

use crate::audit;
use crate::ca::{self, CaFiles};
use crate::client::Target;
use crate::config::AgentConfig;
use crate::dispatch::Engine;
use crate::http;
use crate::registry::Registry;
use crate::server::{AgentState, Peer, Reply};
use crate::wire::{Obj, get_bool, get_str, parse_object};

// ---------------------------------------------------------------------------
// Agent side
// ---------------------------------------------------------------------------

fn ok_reply(o: Obj) -> Reply {
    Reply { code: 200, body: o.to_json() }
}

/// Every refusal of these endpoints is HTTP 200 with `status: "error"`.
fn error_reply(msg: &str) -> Reply {
    ok_reply(Obj::new().s("status", "error").s("error", msg))
}

fn body_object(req: &http::Request) -> Object {
    // Invalid JSON counts as `{}`, as upstream does for these bodies.
    parse_object(&String::from_utf8_lossy(&req.body)).unwrap_or_default()
}

/// The request id of a `/renew` or `/renew-complete` body (empty if none),
/// for the trusted-dispatcher gate's log line.
pub fn reqid_of(req: &http::Request) -> String {
    get_str(&body_object(req), "reqid").unwrap_or_default()
}

/// A CSR for the key at `key_path`, `CN=<cn>`, as PEM.
fn make_csr_pem(key_path: &std::path::Path, cn: &str) -> Result<Vec<u8>, (&'static str, String)> {
    let key = ca::load_key(key_path).map_err(|e| ("agent key not available", e.to_string()))?;
    let csr = ca::make_csr(&key, cn).map_err(|e| ("could not generate CSR", e.to_string()))?;
    csr.to_pem().map_err(|e| ("could not generate CSR", e.to_string()))
}

/// `POST /renew` from a trusted dispatcher: a CSR from the agent's own key.
pub async fn serve_renew(req: &http::Request, peer: &Peer, dispatcher: &str, state: &AgentState) -> Reply {
    let reqid = reqid_of(req);
    let peer_ip = peer.ip.to_string();
    let key = state.config.key.clone();
    let cn = state.host.clone();
    // A private-key operation: seconds on a small router with RSA-4096, so
    // off the thread that serves every other connection.
    match smol::unblock(move || make_csr_pem(&key, &cn)).await {
        Ok(pem) => {
            audit::info(
                "renew",
                &[("PEER", &peer_ip), ("DISPATCHER", dispatcher), ("REQID", &reqid), ("STATUS", "csr-generated")],
            );
            ok_reply(Obj::new().s("status", "ok").s("csr", String::from_utf8_lossy(&pem)).s("reqid", &reqid))
        }
        Err((msg, detail)) => {
            audit::err(
                "renew",
                &[
                    ("PEER", &peer_ip),
                    ("DISPATCHER", dispatcher),
                    ("REQID", &reqid),
                    ("ERROR", &format!("{msg}: {detail}")),
                ],
            );
            error_reply(msg)
        }
    }
}

/// Why `pem` may not replace this agent's certificate: it must be one PEM
/// certificate, signed by the agent's own CA (`ca`), for the agent's own key
/// (`key`), and not expired. Shared by `/renew-complete` and `promote-cert`.
pub fn check_renewed_cert(cfg: &AgentConfig, pem: &[u8]) -> Result<X509, String> {
    let cert = X509::from_pem(pem).map_err(|_| "renewed cert is not a PEM certificate".to_string())?;
    if !cfg.ca.exists() {
        return Err(format!("CA cert not found at '{}'", cfg.ca.display()));
    }
    let ca_cert = ca::load_cert(&cfg.ca).map_err(|e| e.to_string())?;
    if !ca::verifies_against(&cert, &ca_cert) {
        return Err("renewed cert does not verify against the agent CA".into());
    }
    let key = ca::load_key(&cfg.key).map_err(|_| "agent key not available".to_string())?;
    if !cert.public_key().map(|p| p.public_eq(&key)).unwrap_or(false) {
        return Err("renewed cert public key does not match the agent key".into());
    }
    let not_after = crate::time::parse_openssl_date(&ca::not_after(&cert));
    if not_after.is_none_or(|t| t <= crate::time::unix_now()) {
        return Err("renewed cert has already expired".into());
    }
    Ok(cert)
}

/// `POST /renew-complete` from a trusted dispatcher: check the certificate
/// and stage it (the live one stays until `promote-cert` at the next start).
pub async fn serve_renew_complete(req: &http::Request, peer: &Peer, dispatcher: &str, state: &AgentState) -> Reply {
    let o = body_object(req);
    let reqid = get_str(&o, "reqid").unwrap_or_default();
    let peer_ip = peer.ip.to_string();
    let who = [("PEER", peer_ip.as_str()), ("DISPATCHER", dispatcher), ("REQID", reqid.as_str())];
    let fail = |msg: &str| {
        audit::err("renew-complete", &[who.as_slice(), &[("ERROR", msg)]].concat());
        error_reply(msg)
    };
    let pem = get_str(&o, "cert").unwrap_or_default();
    if pem.trim().is_empty() {
        return fail("cert required");
    }
    // The delivered `ca` is ignored: the agent trusts only its own CA file.
    let cert = match check_renewed_cert(&state.config, pem.as_bytes()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    // Stage exactly the one certificate that was checked, nothing around it.
    let staged = cert.to_pem().map_err(|e| e.to_string()).and_then(|clean| {
        crate::fsutil::atomic_write(&state.config.cert_staging_path, &clean, 0o640).map_err(|e| e.to_string())
    });
    if let Err(e) = staged {
        return fail(&format!("could not stage cert: {e}"));
    }
    let (serial, expiry) = (ca::cert_serial(&cert), ca::not_after(&cert));
    audit::info(
        "renew-complete",
        &[who.as_slice(), &[("STATUS", "cert-staged"), ("SERIAL", &serial), ("EXPIRY", &expiry)]].concat(),
    );
    ok_reply(Obj::new().s("status", "ok").s("reqid", &reqid).b("staged", true))
}

// ---------------------------------------------------------------------------
// Dispatcher side
// ---------------------------------------------------------------------------

/// Is a certificate expiring at `expiry` (OpenSSL notAfter text) due for
/// renewal at `now`? True when less than half of `cert_days` remains and no
/// renewed certificate is already staged. An unparsable expiry (`unknown`)
/// is never due.
pub fn due(expiry: &str, staged: bool, cert_days: u32, now: i64) -> bool {
    if staged {
        return false;
    }
    match crate::time::parse_openssl_date(expiry) {
        // (not_after - now) < cert_days / 2 days, without rounding the half away.
        Some(not_after) => (not_after - now).saturating_mul(2) < i64::from(cert_days) * 86_400,
        None => false,
    }
}

/// Is this `/ping` result (as built by [`Engine::ping`]) due for renewal?
pub fn result_due(result: &Object, cert_days: u32, now: i64) -> bool {
    get_str(result, "status").as_deref() == Some("ok")
        && due(&get_str(result, "expiry").unwrap_or_default(), get_bool(result, "staged") == Some(true), cert_days, now)
}

/// What became of one host's renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new certificate is staged on the agent and recorded in the registry.
    Renewed {
        /// The new certificate's notAfter.
        expiry: String,
        /// Its serial.
        serial: String,
    },
    /// The exchange failed (logged as `renew` at ERR); retried next time.
    Failed(String),
    /// Due, but this process cannot sign (no readable CA key).
    Skipped(String),
}

/// Counts of one renewal pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Hosts whose certificate was due.
    pub due: usize,
    /// Renewed.
    pub renewed: usize,
    /// Failed.
    pub failed: usize,
    /// Skipped (no CA key).
    pub skipped: usize,
}

/// Renew the certificates of the hosts in `results` (the `/ping` results of
/// `targets`) that are due, and note the outcome in each such result:
/// `renewed: true` (with `renewed_expiry`, `renewed_serial`), `renew_error`
/// or `renew_skipped`. Nothing else in a result changes: a renewal never
/// alters a ping's outcome.
pub async fn renew_due(engine: &Engine, targets: &[Target], results: &mut [Object]) -> Summary {
    let now = crate::time::unix_now();
    let cfg = &engine.cfg;
    let due_hosts: Vec<&Target> = results
        .iter()
        .filter(|r| result_due(r, cfg.cert_days, now))
        .filter_map(|r| {
            let host = get_str(r, "host")?;
            targets.iter().find(|t| t.name == host)
        })
        .collect();
    let mut summary = Summary { due: due_hosts.len(), ..Summary::default() };
    if due_hosts.is_empty() {
        return summary;
    }
    let mut outcomes: Vec<(String, Outcome)> = Vec::new();
    let files = CaFiles::new(&cfg.ca, &cfg.ca_dir);
    // Only a process that can read the CA key can sign (root's timer, an
    // operator with access); anyone else leaves renewal to them.
    let ca_pem = files.load().and_then(|(ca_cert, _)| Ok(ca_cert.to_pem()?));
    match ca_pem {
        Err(e) => {
            let why = format!("cannot sign agent certificates here: {e}");
            for t in &due_hosts {
                audit::warn("renew", &[("TARGET", &t.display()), ("STATUS", "skipped"), ("REASON", &why)]);
                outcomes.push((t.name.clone(), Outcome::Skipped(why.clone())));
            }
        }
        Ok(ca_pem) => {
            let ca_pem = String::from_utf8_lossy(&ca_pem).into_owned();
            crate::fanout::for_each(
                due_hosts,
                cfg.max_parallel,
                |t| {
                    let (files, ca_pem) = (&files, &ca_pem);
                    async move { (t.name.clone(), renew_one(engine, files, ca_pem, t).await) }
                },
                |o| outcomes.push(o),
            )
            .await;
        }
    }
    for (host, outcome) in outcomes {
        let Some(r) = results.iter_mut().find(|r| get_str(r, "host").as_deref() == Some(host.as_str())) else {
            continue;
        };
        let mut set = |k: &str, v: miniserde::json::Value| {
            r.insert(k.into(), v);
        };
        use miniserde::json::Value;
        match outcome {
            Outcome::Renewed { expiry, serial } => {
                summary.renewed += 1;
                set("renewed", Value::Bool(true));
                set("renewed_expiry", Value::String(expiry));
                set("renewed_serial", Value::String(serial));
            }
            Outcome::Failed(e) => {
                summary.failed += 1;
                set("renew_error", Value::String(e));
            }
            Outcome::Skipped(why) => {
                summary.skipped += 1;
                set("renew_skipped", Value::String(why));
            }
        }
    }
    summary
}

/// The JSON object of a 2xx agent reply with `status: "ok"`, or what went wrong.
async fn agent_call(engine: &Engine, t: &Target, path: &str, body: &str) -> Result<Object, String> {
    let resp = engine.call(t, "POST", path, Some(body)).await.map_err(|e| e.describe(t))?;
    let o = parse_object(&String::from_utf8_lossy(&resp.body));
    if !(200..300).contains(&resp.code) {
        return Err(format!("{path}: {}", crate::dispatch::status_error(resp.code, &o)));
    }
    let o = o.ok_or_else(|| format!("{path}: invalid JSON response"))?;
    match get_str(&o, "status").as_deref() {
        Some("ok") => Ok(o),
        _ => Err(format!(
            "{path}: the agent refused: {}",
            get_str(&o, "error").unwrap_or_else(|| "no status \"ok\" in its reply".into())
        )),
    }
}

/// One renewal exchange with `t`, logged as `renew` / `renew-complete`.
async fn renew_one(engine: &Engine, files: &CaFiles, ca_pem: &str, t: &Target) -> Outcome {
    let reqid = crate::wire::new_reqid();
    let target = t.display();
    audit::info("renew", &[("TARGET", &target), ("STATUS", "starting"), ("REQID", &reqid)]);
    let start = std::time::Instant::now();
    let r = exchange(engine, files, ca_pem, t, &reqid).await;
    // Both exchanges, the signing and the registry update.
    let took = crate::dispatch::rtt(start.elapsed());
    match r {
        Ok((expiry, serial)) => {
            audit::info(
                "renew-complete",
                &[("TARGET", &target), ("EXPIRY", &expiry), ("REQID", &reqid), ("SERIAL", &serial), ("RTT", &took)],
            );
            Outcome::Renewed { expiry, serial }
        }
        Err(e) => {
            audit::err("renew", &[("TARGET", &target), ("ERROR", &e), ("REQID", &reqid), ("RTT", &took)]);
            Outcome::Failed(e)
        }
    }
}

async fn exchange(
    engine: &Engine,
    files: &CaFiles,
    ca_pem: &str,
    t: &Target,
    reqid: &str,
) -> Result<(String, String), String> {
    let o = agent_call(engine, t, "/renew", &Obj::new().s("reqid", reqid).to_json()).await?;
    let csr = get_str(&o, "csr").ok_or("/renew: the agent's reply has no csr")?;
    // The CSR must name the agent as the registry knows it: an agent renamed
    // (or reporting another name) is not renewed under either name.
    let req = ca::check_csr(csr.as_bytes(), Some(&t.name)).map_err(|e| format!("CSR refused: {e}"))?;
    let pubkey = req.public_key().map_err(|e| format!("CSR refused: {e}"))?;
    let cert = files
        .issue(&pubkey, &t.name, engine.cfg.cert_days)
        .map_err(|e| format!("cannot sign the renewed certificate: {e}"))?;
    let pem = cert.to_pem().map_err(|e| format!("cannot encode the renewed certificate: {e}"))?;
    let body = Obj::new().s("cert", String::from_utf8_lossy(&pem)).s("ca", ca_pem).s("reqid", reqid).to_json();
    let o = agent_call(engine, t, "/renew-complete", &body).await?;
    if get_bool(&o, "staged") != Some(true) {
        return Err("/renew-complete: the agent did not confirm staged: true".into());
    }
    let (expiry, serial) = (ca::not_after(&cert), ca::cert_serial(&cert));
    let reg = Registry::new(&engine.cfg.registry_dir);
    let recorded = (|| {
        let _lock = reg.lock()?;
        match reg.get(&t.name)? {
            Some(mut rec) => {
                rec.expiry = expiry.clone();
                reg.put(&rec).map(|()| true)
            }
            None => Ok(false),
        }
    })();
    match recorded {
        Ok(true) => Ok((expiry, serial)),
        Ok(false) => {
            Err(format!("the certificate is staged on the agent, but '{}' left the registry meanwhile", t.name))
        }
        Err(e) => Err(format!("the certificate is staged on the agent, but the registry was not updated: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    #[test]
    fn due_at_half_of_cert_days() {
        let exp = "Jun  7 16:28:00 2028 GMT";
        let t = crate::time::parse_openssl_date(exp).unwrap();
        // 365-day certificates: due below 182.5 days left.
        assert!(!due(exp, false, 365, t - 183 * DAY));
        assert!(!due(exp, false, 365, t - 182 * DAY - DAY / 2), "exactly half is not below half");
        assert!(due(exp, false, 365, t - 182 * DAY - DAY / 2 + 1));
        assert!(due(exp, false, 365, t - 10 * DAY));
        assert!(due(exp, false, 365, t + DAY), "an expired certificate is due too");
        assert!(!due(exp, true, 365, t - 10 * DAY), "staged: the agent already has one");
        assert!(due(exp, false, 1, t - DAY / 2 + 1));
        assert!(!due(exp, false, 1, t - DAY / 2));
    }

    #[test]
    fn unparsable_expiry_is_never_due() {
        for e in ["unknown", "", "2028-06-07T16:28:00Z", "Jun 7 16:28 2028 GMT", "Jun  7 16:28:00 2028 UTC"] {
            assert!(!due(e, false, 365, 0), "{e}");
        }
        // single-digit days with one or two spaces both parse
        assert!(due(
            "Jun 7 16:28:00 2028 GMT",
            false,
            365,
            crate::time::parse_openssl_date("Jun  7 16:28:00 2028 GMT").unwrap()
        ));
    }

    #[test]
    fn only_ok_results_are_due() {
        let now = crate::time::parse_openssl_date("Jan  1 00:00:00 2028 GMT").unwrap();
        let r = |status: &str, staged: bool| {
            Obj::new().s("status", status).s("expiry", "Jan 10 00:00:00 2028 GMT").b("staged", staged).0
        };
        assert!(result_due(&r("ok", false), 365, now));
        assert!(!result_due(&r("ok", true), 365, now));
        assert!(!result_due(&r("error", false), 365, now));
        assert!(!result_due(&Obj::new().s("status", "ok").0, 365, now), "no expiry");
    }

    #[test]
    fn renewed_certificates_are_checked_like_the_live_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        let files = CaFiles::new(&p.join("ca.crt"), p);
        files.create(ca::KeyType::EcP256, 30).unwrap();
        let key = ca::KeyType::EcP256.generate().unwrap();
        std::fs::write(p.join("agent.key"), ca::key_pem(&key).unwrap()).unwrap();
        let public = |k: &openssl::pkey::PKey<openssl::pkey::Private>| {
            openssl::pkey::PKey::public_key_from_pem(&k.public_key_to_pem().unwrap()).unwrap()
        };
        let text = "port = 1\ncert = agent.crt\nkey = agent.key\nca = ca.crt\n";
        let cfg = AgentConfig::from_raw(crate::config::parse(&p.join("agent.conf"), text).unwrap()).unwrap();
        let good = files.issue(&public(&key), "a1", 10).unwrap();
        assert!(check_renewed_cert(&cfg, &good.to_pem().unwrap()).is_ok());
        assert_eq!(check_renewed_cert(&cfg, b"junk").unwrap_err(), "renewed cert is not a PEM certificate");
        let other = ca::KeyType::EcP256.generate().unwrap();
        let wrong_key = files.issue(&public(&other), "a1", 10).unwrap();
        assert!(check_renewed_cert(&cfg, &wrong_key.to_pem().unwrap()).unwrap_err().contains("does not match"));
        let foreign = CaFiles::new(&p.join("f/ca.crt"), &p.join("f"));
        foreign.create(ca::KeyType::EcP256, 30).unwrap();
        let foreign_cert = foreign.issue(&public(&key), "a1", 10).unwrap();
        assert!(check_renewed_cert(&cfg, &foreign_cert.to_pem().unwrap()).unwrap_err().contains("does not verify"));
        std::fs::remove_file(p.join("ca.crt")).unwrap();
        assert!(check_renewed_cert(&cfg, &good.to_pem().unwrap()).unwrap_err().starts_with("CA cert not found at '"));
    }
}
