//! Agent certificate renewal end to end: a ping renews a certificate past
//! half its life, the agent stages it, `promote-cert` installs it at the
//! next start; crashes in between, bad certificates, a renamed agent and a
//! dispatcher without the CA key; `maintain`.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use common::*;

/// Append lines to ctrl-exec.conf (the last occurrence of a key wins).
fn configure(d: &Dispatcher, extra: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(&d.conf).unwrap();
    writeln!(f, "{extra}").unwrap();
}

/// A dispatcher that enrols 2-day certificates and then renews for 10 days,
/// so every agent it enrolled is past half of `cert_days` at once.
fn short_lived() -> Dispatcher {
    Dispatcher::with_config("cert_days = 2")
}

fn renew_for_ten_days(d: &Dispatcher) {
    configure(d, "cert_days = 10");
}

/// `ctrl-exec agent <verb> --config <agent.conf>`.
fn agent_verb(a: &Agent, verb: &str) -> Output {
    Command::new(bin()).args(["agent", verb, "--config", a.conf().to_str().unwrap()]).output().unwrap()
}

fn serial_of_pem(pem: &[u8]) -> String {
    ctrl_exec::ca::cert_serial(&openssl::x509::X509::from_pem(pem).unwrap())
}

fn file_serial(p: &Path) -> String {
    serial_of_pem(&std::fs::read(p).unwrap())
}

/// The serial of the certificate the agent presents on a new TLS connection.
fn served_serial(d: &Dispatcher, a: &Agent) -> String {
    let p = d.path();
    let s =
        tls_client(a.port, Some((&p.join("dispatcher.crt"), &p.join("dispatcher.key"))), &p.join("ca.crt")).unwrap();
    ctrl_exec::ca::cert_serial(&s.ssl().peer_certificate().expect("the agent presents a certificate"))
}

fn registry_expiry(d: &Dispatcher, name: &str) -> String {
    let text = std::fs::read_to_string(d.path().join("agents").join(format!("{name}.json"))).unwrap();
    jstr(&json(&text), "expiry")
}

/// `ping --json` of one host: (exit code, its result, stderr).
fn ping_json(d: &Dispatcher, host: &str, extra: &[&str]) -> (i32, miniserde::json::Object, String) {
    let mut args = vec!["ping", "--json", "--log-stderr"];
    args.extend_from_slice(extra);
    args.push(host);
    let o = d.run(&args);
    let r = results(&json(&stdout(&o))).remove(0);
    (o.status.code().unwrap_or(-1), r, stderr(&o))
}

fn lines_with<'a>(log: &'a str, action: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(&format!("ACTION={action} "))).collect()
}

#[test]
fn a_due_certificate_is_renewed_staged_and_promoted_at_the_next_start() {
    let d = short_lived();
    let mut a = d.agent("web1");
    let live = a.dir.join("agent.crt");
    let staged = a.dir.join("agent.crt.staged");
    let old_pem = std::fs::read(&live).unwrap();
    let old_serial = serial_of_pem(&old_pem);
    let old_expiry = registry_expiry(&d, "web1");
    renew_for_ten_days(&d);

    // --no-renew: a plain ping
    let (code, r, log) = ping_json(&d, "web1", &["--no-renew"]);
    assert_eq!(code, 0);
    assert!(!r.contains_key("renewed") && !r.contains_key("renew_error"), "{r:?}");
    assert!(lines_with(&log, "renew").is_empty(), "{log}");
    assert!(!staged.exists());

    // a ping renews: one extra line in the text output
    let o = d.run(&["ping", "--log-stderr", "web1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("web1: certificate renewed (serial "), "{out}");
    assert!(out.contains("staged on the agent until its next restart"), "{out}");
    let log = stderr(&o);
    let starting = lines_with(&log, "renew");
    assert_eq!(starting.len(), 1, "{log}");
    assert!(starting[0].contains("STATUS=starting") && starting[0].contains("TARGET=127.0.0.1:"), "{log}");
    let done = lines_with(&log, "renew-complete");
    assert_eq!(done.len(), 1, "{log}");
    assert!(done[0].contains("EXPIRY=") && done[0].contains("REQID=") && done[0].contains("RTT="), "{log}");
    // The renewal round trip (both exchanges, signing, registry update), for `--nocapture` readers.
    eprintln!("renewal: {}", done[0]);
    // a fresh reqid for the exchange, not the ping's
    assert_ne!(reqids(&log, "renew"), reqids(&log, "ping"));

    // the agent staged it (0640) and kept the live certificate
    assert!(a.wait_log("STATUS=cert-staged", Duration::from_secs(5)), "{}", a.log());
    assert!(a.log().contains("STATUS=csr-generated"), "{}", a.log());
    assert_eq!(ctrl_exec::fsutil::mode_of(&staged), Some(0o640));
    assert_eq!(std::fs::read(&live).unwrap(), old_pem, "the live certificate is untouched");
    let new_serial = file_serial(&staged);
    assert_ne!(new_serial, old_serial);
    assert_eq!(served_serial(&d, &a), old_serial, "the running agent keeps its certificate");

    // the registry has the new expiry, 10 days out
    let new_expiry = registry_expiry(&d, "web1");
    assert_ne!(new_expiry, old_expiry);
    let left = ctrl_exec::time::parse_openssl_date(&new_expiry).unwrap() - ctrl_exec::time::unix_now();
    assert!(left > 9 * 86_400 && left <= 10 * 86_400, "{new_expiry}");
    assert!(done[0].contains(&format!("EXPIRY=\"{new_expiry}\"")), "{log}");

    // the agent now says staged: a second ping does not renew again
    let (code, r, log) = ping_json(&d, "web1", &[]);
    assert_eq!(code, 0);
    assert_eq!(jstr(&r, "staged"), "true");
    assert!(!r.contains_key("renewed"), "{r:?}");
    assert!(lines_with(&log, "renew").is_empty(), "{log}");
    assert_eq!(file_serial(&staged), new_serial, "nothing re-staged");
    assert_eq!(agent_verb(&a, "cert-staged").status.code(), Some(0));

    // promote at the next start, as the systemd unit does
    a.stop();
    let o = agent_verb(&a, "promote-cert");
    assert!(o.status.success() && stdout(&o).contains("Installed"), "{}", stdout(&o));
    assert!(!staged.exists());
    assert_eq!(agent_verb(&a, "cert-staged").status.code(), Some(1));
    a.start();
    assert_eq!(served_serial(&d, &a), new_serial);
    let (code, r, _) = ping_json(&d, "web1", &[]);
    assert_eq!(code, 0);
    assert_eq!((jstr(&r, "expiry"), jstr(&r, "staged")), (new_expiry.clone(), "false".to_string()));
    assert!(!r.contains_key("renewed"), "a 10-day certificate is not due for a 10-day cert_days: {r:?}");
    let o = d.ok(&["run", "web1", "echo", "--", "after renewal"]);
    assert!(stdout(&o).contains("[after renewal]"), "{}", stdout(&o));
}

#[test]
fn a_crash_between_staging_and_promotion_keeps_the_old_certificate() {
    let d = short_lived();
    let mut a = d.agent("web1");
    let staged = a.dir.join("agent.crt.staged");
    let old_serial = file_serial(&a.dir.join("agent.crt"));
    renew_for_ten_days(&d);
    let (code, r, _) = ping_json(&d, "web1", &[]);
    assert_eq!(code, 0);
    assert_eq!(jstr(&r, "status"), "ok");
    assert_eq!(jstr(&r, "renewed"), "true", "{r:?}");
    assert_eq!(jstr(&r, "renewed_serial"), file_serial(&staged));
    let new_serial = file_serial(&staged);

    // kill -9, restart without promote-cert: the old certificate still serves
    let mut child = a.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    a.start();
    assert_eq!(served_serial(&d, &a), old_serial);
    assert_eq!(agent_verb(&a, "cert-staged").status.code(), Some(0));
    let (code, r, _) = ping_json(&d, "web1", &[]);
    assert_eq!((code, jstr(&r, "staged")), (0, "true".to_string()));
    assert!(stdout(&d.ok(&["run", "web1", "echo", "--", "x"])).contains("[x]"));

    // and the staged certificate is still good for promotion
    a.stop();
    assert!(stdout(&agent_verb(&a, "promote-cert")).contains("Installed"));
    a.start();
    assert_eq!(served_serial(&d, &a), new_serial);
    assert!(stdout(&d.ok(&["run", "web1", "echo", "--", "y"])).contains("[y]"));
}

#[test]
fn renew_endpoints_are_gated_and_refuse_bad_certificates() {
    let d = Dispatcher::new();
    let a = d.agent("web1");
    let other = d.enroll("web2"); // same CA, another key, not trusted by web1
    let staged = a.dir.join("agent.crt.staged");
    let live = std::fs::read(a.dir.join("agent.crt")).unwrap();
    let agent_key = ctrl_exec::ca::load_key(&a.dir.join("agent.key")).unwrap();
    let public = openssl::pkey::PKey::public_key_from_pem(&agent_key.public_key_to_pem().unwrap()).unwrap();

    // /renew: a CSR from the agent's own key, CN = the name it reports
    let (code, body) = split_reply(&raw_exchange(&d, a.port, &post("/renew", r#"{"reqid":"ab12"}"#)).unwrap());
    assert_eq!(code, 200, "{body}");
    let o = json(&body);
    assert_eq!((jstr(&o, "status"), jstr(&o, "reqid")), ("ok".to_string(), "ab12".to_string()));
    let csr = ctrl_exec::ca::check_csr(jstr(&o, "csr").as_bytes(), Some("web1")).unwrap();
    assert!(csr.public_key().unwrap().public_eq(&agent_key), "the key is kept, never regenerated");

    // a client certificate from the same CA that is not in the trusted map: 403, like /run
    let p = other.dir.clone();
    for path in ["/renew", "/renew-complete"] {
        let mut s = tls_client(a.port, Some((&p.join("agent.crt"), &p.join("agent.key"))), &p.join("ca.crt")).unwrap();
        s.write_all(&post(path, r#"{"reqid":"cd34","cert":"x"}"#)).unwrap();
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut out);
        let (code, body) = split_reply(&String::from_utf8_lossy(&out));
        assert_eq!(code, 403, "{path}: {body}");
        assert_eq!(jstr(&json(&body), "error"), "serial mismatch");
    }
    assert!(a.log().contains("ACTION=serial-reject") && a.log().contains("REQID=cd34"), "{}", a.log());

    // bad certificates: refused with upstream's messages, nothing staged
    let foreign = Dispatcher::new();
    let foreign_ca = ctrl_exec::ca::CaFiles::new(&foreign.path().join("ca.crt"), foreign.path());
    let foreign_cert = foreign_ca.issue(&public, "web1", 10).unwrap().to_pem().unwrap();
    let wrong_key = std::fs::read(other.dir.join("agent.crt")).unwrap();
    let corrupt = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n".to_vec();
    let cases: [(&[u8], &str); 3] = [
        (&corrupt, "renewed cert is not a PEM certificate"),
        (&foreign_cert, "renewed cert does not verify against the agent CA"),
        (&wrong_key, "renewed cert public key does not match the agent key"),
    ];
    let complete = |cert: &str| {
        let body = ctrl_exec::wire::Obj::new().s("cert", cert).s("ca", "ignored").s("reqid", "ef56").to_json();
        let (code, body) = split_reply(&raw_exchange(&d, a.port, &post("/renew-complete", &body)).unwrap());
        assert_eq!(code, 200, "{body}");
        json(&body)
    };
    for (pem, want) in cases {
        let o = complete(&String::from_utf8_lossy(pem));
        assert_eq!((jstr(&o, "status"), jstr(&o, "error")), ("error".to_string(), want.to_string()));
        assert!(!staged.exists(), "{want}");
    }
    let o = complete("");
    assert_eq!(jstr(&o, "error"), "cert required");
    let (_, body) = split_reply(&raw_exchange(&d, a.port, &post("/renew-complete", "not json")).unwrap());
    assert_eq!(jstr(&json(&body), "error"), "cert required");
    assert!(a.log().contains("ACTION=renew-complete") && a.log().contains("ERROR="), "{}", a.log());

    // a good one is staged; ping says so
    let ca = ctrl_exec::ca::CaFiles::new(&d.path().join("ca.crt"), d.path());
    let good = ca.issue(&public, "web1", 10).unwrap().to_pem().unwrap();
    let o = complete(&String::from_utf8_lossy(&good));
    assert_eq!(
        (jstr(&o, "status"), jstr(&o, "staged"), jstr(&o, "reqid")),
        ("ok".into(), "true".into(), "ef56".into())
    );
    assert_eq!(std::fs::read(&staged).unwrap(), good);
    assert_eq!(std::fs::read(a.dir.join("agent.crt")).unwrap(), live);
    let (_, r, _) = ping_json(&d, "web1", &[]);
    assert_eq!(jstr(&r, "staged"), "true");

    // promote-cert discards each bad file and keeps the live certificate
    for (pem, want) in cases {
        std::fs::write(&staged, pem).unwrap();
        let o = agent_verb(&a, "promote-cert");
        assert!(o.status.success(), "promote-cert never fails");
        assert!(stdout(&o).contains("Discarded") && stdout(&o).contains(want), "{}", stdout(&o));
        assert!(!staged.exists(), "{want}");
        assert_eq!(std::fs::read(a.dir.join("agent.crt")).unwrap(), live, "{want}");
    }
}

#[test]
fn a_renamed_agent_is_not_renewed_and_its_ping_stays_ok() {
    let d = short_lived();
    let a = d.agent("web1");
    renew_for_ten_days(&d);
    // rename in the registry only: the agent still calls itself web1
    let agents = d.path().join("agents");
    let text = std::fs::read_to_string(agents.join("web1.json")).unwrap();
    std::fs::write(agents.join("web2.json"), text.replace("\"hostname\":\"web1\"", "\"hostname\":\"web2\"")).unwrap();
    std::fs::remove_file(agents.join("web1.json")).unwrap();
    let before = registry_expiry(&d, "web2");

    let o = d.run(&["ping", "--log-stderr", "web2"]);
    assert_eq!(o.status.code(), Some(0), "the ping itself is fine: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("web2 (web1)") && out.contains("  ok  "), "{out}");
    assert!(
        out.contains("web2: certificate renewal failed: CSR refused: CSR common name 'web1' does not match 'web2'"),
        "{out}"
    );
    let log = stderr(&o);
    let failed: Vec<&str> = lines_with(&log, "renew").into_iter().filter(|l| l.contains("ERROR=")).collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(failed[0].contains("does not match") && failed[0].contains("REQID="), "{log}");
    assert!(lines_with(&log, "renew-complete").is_empty(), "{log}");
    assert!(!a.dir.join("agent.crt.staged").exists());
    assert_eq!(registry_expiry(&d, "web2"), before);

    let (code, r, _) = ping_json(&d, "web2", &[]);
    assert_eq!((code, jstr(&r, "status")), (0, "ok".to_string()));
    assert!(jstr(&r, "renew_error").contains("does not match 'web2'"), "{r:?}");
    assert!(!r.contains_key("renewed"));
}

#[test]
fn without_the_ca_key_renewal_is_skipped_and_the_api_never_renews() {
    let d = short_lived();
    let a = d.agent("web1");
    let before = registry_expiry(&d, "web1");
    // the API server pings without renewing, even with the CA key at hand
    renew_for_ten_days(&d);
    let api = Api::start(&d, "api_auth_default = allow");
    let (c, b) = api.post("/ping", r#"{"hosts":["web1"]}"#);
    assert_eq!(c, 200, "{b}");
    let r = &results(&json(&b))[0];
    assert_eq!((jstr(r, "status"), jstr(r, "staged")), ("ok".to_string(), "false".to_string()));
    assert!(!r.contains_key("renewed") && !r.contains_key("renew_error"), "{r:?}");
    assert!(lines_with(&api.log(), "renew").is_empty(), "{}", api.log());
    drop(api);

    // an operator who cannot read the CA key: ping ok, renewal skipped, said why
    configure(&d, &format!("ca_dir = {}", d.path().join("no-ca-here").display()));
    let (code, r, log) = ping_json(&d, "web1", &[]);
    assert_eq!((code, jstr(&r, "status")), (0, "ok".to_string()));
    assert!(jstr(&r, "renew_skipped").contains("no CA key at"), "{r:?}");
    let skipped = lines_with(&log, "renew");
    assert_eq!(skipped.len(), 1, "{log}");
    assert!(skipped[0].contains("STATUS=skipped") && skipped[0].contains("REASON="), "{log}");
    assert!(!a.dir.join("agent.crt.staged").exists());
    assert_eq!(registry_expiry(&d, "web1"), before);
    let o = d.run(&["ping", "web1"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("web1: certificate renewal due but skipped: "), "{}", stdout(&o));
}

/// Set a file's modification time `age` into the past.
fn age_file(p: &Path, age: Duration) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn maintain_pings_every_agent_renews_and_purges_each_phase_on_its_own() {
    let d = short_lived();
    let a = d.agent("web1");
    let _down = d.enroll("web2"); // registered, never started
    renew_for_ten_days(&d);
    let runs = d.path().join("runs");
    std::fs::create_dir_all(&runs).unwrap();
    let (old, fresh) = (runs.join("0123456789abcdef.json"), runs.join("fedcba9876543210.json"));
    std::fs::write(&old, "{}").unwrap();
    std::fs::write(&fresh, "{}").unwrap();
    age_file(&old, Duration::from_secs(2 * 86_400));

    let o = d.run(&["maintain", "--log-stderr"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("web1: certificate renewed (serial "), "{out}");
    assert!(out.ends_with("Maintenance run: 1/2 agents pinged, dispatcher cert checked.\n"), "{out}");
    let log = stderr(&o);
    let m = lines_with(&log, "maintain");
    assert_eq!(m.len(), 1, "{log}");
    for f in ["AGENTS=2", "PINGED=1", "RENEWED=1", "PURGED=1"] {
        assert!(m[0].contains(f), "{f}: {log}");
    }
    assert_eq!(lines_with(&log, "ping").len(), 2, "both agents pinged: {log}");
    assert!(a.dir.join("agent.crt.staged").exists());
    assert!(!old.exists() && fresh.exists(), "only records older than 24 h are purged");

    // JSON; web1 is staged now, so nothing more to renew
    let o = d.run(&["maintain", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    let doc = json(&stdout(&o));
    assert_eq!(
        ["ok", "agents", "pinged", "renewed"].map(|k| jstr(&doc, k)),
        ["true", "2", "1", "0"].map(String::from),
        "{doc:?}"
    );

    // a phase that fails does not stop the next one
    std::fs::write(&old, "{}").unwrap();
    age_file(&old, Duration::from_secs(2 * 86_400));
    std::fs::rename(d.path().join("dispatcher.crt"), d.path().join("dispatcher.crt.away")).unwrap();
    let o = d.run(&["maintain", "--json", "--log-stderr"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let doc = json(&stdout(&o));
    assert_eq!(jstr(&doc, "ok"), "false");
    assert!(jstr(&doc, "errors").contains("\"phase\":\"ping\""), "{doc:?}");
    let log = stderr(&o);
    let failed: Vec<&str> = lines_with(&log, "maintain").into_iter().filter(|l| l.contains("PHASE=ping")).collect();
    assert_eq!(failed.len(), 1, "{log}");
    assert!(failed[0].contains("ERROR="), "{log}");
    assert!(!old.exists(), "the purge ran after the ping phase failed");
}
