//! The HTTP API server over real HTTP on loopback, against real agents:
//! every endpoint, the error shapes, the limits, and the auth layers.

mod common;

use common::*;

fn keys(o: &miniserde::json::Object) -> Vec<String> {
    let mut k: Vec<String> = o.keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn health_is_public_and_everything_else_is_denied_without_a_hook() {
    let d = Dispatcher::new();
    let api = Api::start(&d, "");
    let (c, b) = api.get("/health");
    assert_eq!(c, 200);
    capture("HealthResponse", &b);
    assert_eq!(jstr(&json(&b), "ok"), "true");
    assert_eq!(jstr(&json(&b), "version"), env!("CARGO_PKG_VERSION"));
    for (m, p) in
        [("GET", "/"), ("GET", "/openapi.json"), ("POST", "/run"), ("GET", "/discovery"), ("GET", "/status/ab")]
    {
        let (c, b) = api.call(m, p, &[], None);
        assert_eq!(c, 403, "{m} {p}");
        capture("ErrorResponse", &b);
        let o = json(&b);
        assert_eq!(jstr(&o, "ok"), "false");
        assert_eq!(jstr(&o, "error"), "no auth hook configured");
        assert_eq!(jstr(&o, "code"), "1");
    }
    assert!(api.log().contains("ACTION=api-request LEN=0 METHOD=GET PATH=/health PEER=127.0.0.1"), "{}", api.log());
    assert!(api.log().contains("REASON=no-hook-deny"), "{}", api.log());
}

#[test]
fn run_ping_discovery_and_status_end_to_end() {
    let d = Dispatcher::new();
    let _a1 = d.agent("a1");
    let mut a2 = d.enroll("a2");
    a2.script("echo", "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done\necho\n", "");
    a2.configure("[tags]\nrole = db");
    a2.start();
    let api = Api::start(&d, "api_auth_default = allow");
    // index and the static document
    let (c, b) = api.get("/");
    assert_eq!(c, 200);
    capture("IndexResponse", &b);
    assert_eq!(jstr(&json(&b), "name"), "ctrl-exec-api");
    let (c, b) = api.get("/openapi.json");
    assert_eq!(c, 200);
    assert_eq!(jstr(&json(&b), "openapi"), "3.1.0");
    // run
    let (c, b) = api.post("/run", r#"{"hosts":["a1","a2"],"script":"echo","args":["two words","héllo ✓","$(id);|&"],"username":"alice","token":"tok123"}"#);
    assert_eq!(c, 200, "{b}");
    capture("RunResponse", &b);
    let o = json(&b);
    assert_eq!(keys(&o), ["ok", "reqid", "results"]);
    let reqid = jstr(&o, "reqid");
    let rs = results(&o);
    assert_eq!(rs.len(), 2);
    for r in &rs {
        assert_eq!(keys(r), ["exit", "host", "reqid", "rtt", "script", "stderr", "stdout"]);
        assert_eq!(jstr(r, "stdout"), "[two words][héllo ✓][$(id);|&]\n");
        assert_eq!(jstr(r, "reqid"), reqid);
    }
    // the stored record, without the submitter
    let (c, b) = api.get(&format!("/status/{reqid}"));
    assert_eq!(c, 200, "{b}");
    capture("StatusResponse", &b);
    let s = json(&b);
    assert_eq!(keys(&s), ["complete", "completed", "hosts", "mode", "ok", "reqid", "results", "script"]);
    assert_eq!(jstr(&s, "mode"), "sync");
    assert_eq!(jstr(&s, "hosts"), r#"["a1","a2"]"#);
    // a refused script is a per-host failure inside a 200
    let (c, b) = api.post("/run", r#"{"hosts":["a1"],"script":"nosuch"}"#);
    assert_eq!(c, 200);
    capture("RunResponse", &b);
    let r = &results(&json(&b))[0];
    assert_eq!((jstr(r, "exit"), jstr(r, "error")), ("-1".to_string(), "script not permitted".to_string()));
    // ping
    let (c, b) = api.post("/ping", r#"{"hosts":["a1","a2"]}"#);
    assert_eq!(c, 200);
    capture("PingResponse", &b);
    for r in results(&json(&b)) {
        assert_eq!(jstr(&r, "status"), "ok");
        assert!(
            ["expiry", "host", "reqid", "rtt", "staged", "status", "version"].iter().all(|k| r.contains_key(*k)),
            "{r:?}"
        );
    }
    // discovery, all and named, caches tags in the registry
    let (c, b) = api.get("/discovery");
    assert_eq!(c, 200);
    capture("DiscoveryResponse", &b);
    let hosts = match json(&b).get("hosts") {
        Some(miniserde::json::Value::Object(h)) => h.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(keys(&hosts), ["a1", "a2"]);
    let (c, b) = api.post("/discovery", r#"{"hosts":["a2"]}"#);
    assert_eq!(c, 200);
    assert!(b.contains(r#""role":"db""#), "{b}");
    let o = d.ok(&["list-agents", "--tags", "role=db"]);
    assert!(stdout(&o).contains("a2") && !stdout(&o).contains("a1 "), "{}", stdout(&o));
    // the API and the agent log the same reqid
    assert!(api.log().contains("ACTION=dispatch") && api.log().contains(&reqid));
    assert!(_a1.log().contains(&format!("REQID={reqid}")));
}

#[test]
fn errors_have_the_documented_shapes() {
    let d = Dispatcher::new();
    let _a = d.agent("a1");
    let api = Api::start(&d, "api_auth_default = allow");
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, u16, &'a str, &'a str);
    let cases: &[Case] = &[
        ("POST", "/run", None, 400, "bad request", "request body required"),
        ("POST", "/run", Some("{not json"), 400, "bad request", "invalid JSON body"),
        (
            "POST",
            "/run",
            Some(r#"{"hosts":[],"script":"echo"}"#),
            400,
            "bad request",
            "hosts must be a non-empty array",
        ),
        (
            "POST",
            "/run",
            Some(r#"{"hosts":"a1","script":"echo"}"#),
            400,
            "bad request",
            "hosts must be a non-empty array",
        ),
        (
            "POST",
            "/run",
            Some(r#"{"hosts":["a1"]}"#),
            400,
            "bad request",
            "script name required (alphanumeric and hyphens only)",
        ),
        (
            "POST",
            "/run",
            Some(r#"{"hosts":["a1"],"script":"../x"}"#),
            400,
            "bad request",
            "script name required (alphanumeric and hyphens only)",
        ),
        (
            "POST",
            "/run",
            Some(r#"{"hosts":["a1"],"script":"echo","args":"x"}"#),
            400,
            "bad request",
            "args must be an array",
        ),
        (
            "POST",
            "/run",
            Some(r#"{"hosts":["ghost","a1"],"script":"echo"}"#),
            404,
            "unknown agent",
            "not a registered agent: ghost",
        ),
        ("POST", "/ping", Some(r#"{"hosts":["ghost"]}"#), 404, "unknown agent", "not a registered agent: ghost"),
        ("POST", "/ping", Some("{}"), 400, "bad request", "hosts must be a non-empty array"),
        ("GET", "/nosuch", None, 404, "not found", "no route for GET /nosuch"),
        ("GET", "/status/NOT-HEX", None, 404, "not found", "no route for GET /status/NOT-HEX"),
        ("GET", "/status/00000000deadbeef", None, 404, "not found", "no result for reqid 00000000deadbeef"),
        ("DELETE", "/run", None, 404, "not found", "no route for DELETE /run"),
    ];
    for (m, p, body, code, error, detail) in cases {
        let (c, b) = api.call(m, p, &[], *body);
        assert_eq!(c, *code, "{m} {p} {body:?}: {b}");
        capture("ErrorResponse", &b);
        let o = json(&b);
        assert_eq!(jstr(&o, "ok"), "false", "{b}");
        assert_eq!(jstr(&o, "error"), *error, "{m} {p}");
        assert_eq!(jstr(&o, "detail"), *detail, "{m} {p}");
    }
    // limits, from the Perl peer's own request bytes
    let golden = |n: &str| {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/api").join(n)).unwrap()
    };
    for case in ["post-413-body-too-large", "get-431-too-many-headers", "malformed-json"] {
        let (c, b) = api.raw(&golden(&format!("{case}.request")));
        let perl = String::from_utf8(golden(&format!("{case}.response"))).unwrap();
        let (pc, pb) = split_reply(&perl);
        assert_eq!(c, pc, "{case}");
        let (o, p) = (json(&b), json(&pb));
        assert_eq!(keys(&o), keys(&p), "{case}");
        for k in keys(&p) {
            assert_eq!(jstr(&o, &k), jstr(&p, &k), "{case}: {k}");
        }
    }
}

#[test]
fn hooks_decide_each_layer_and_status_is_owner_gated() {
    let tmp = tempfile::tempdir().unwrap();
    let seen = tmp.path().join("seen");
    // Deny bad tokens everywhere; for status, only the submitter's token.
    let hook = tmp.path().join("hook");
    write_exec(
        &hook,
        &format!(
            "#!/bin/sh\nctx=$(cat)\necho \"$ENVEXEC_ACTION $ENVEXEC_PATH token=$ENVEXEC_TOKEN sub=$ENVEXEC_SUBMITTER\" >> {s}\n\
             case \"$ENVEXEC_TOKEN\" in bad*) exit 2;; esac\n\
             [ \"$ENVEXEC_ACTION\" = run ] && [ \"$ENVEXEC_SCRIPT\" = forbidden ] && exit 3\n\
             [ \"$ENVEXEC_ACTION\" = status ] && [ \"$ENVEXEC_TOKEN\" != \"tok-$ENVEXEC_SUBMITTER\" ] && exit 1\n\
             exit 0\n",
            s = seen.display()
        ),
    );
    let d = Dispatcher::with_config(&format!("auth_hook = {}", hook.display()));
    let mut a = d.enroll("a1");
    a.script("echo", "#!/bin/sh\ncat\n", "");
    a.script("forbidden", "#!/bin/sh\necho no\n", "");
    a.start();
    let api = Api::start(&d, "");
    // the pre-route gate sees the path, and a bearer token
    let (c, b) = api.call("GET", "/", &["Authorization: Bearer bad-token"], None);
    assert_eq!((c, jstr(&json(&b), "error"), jstr(&json(&b), "code")), (403, "bad credentials".into(), "2".into()));
    let (c, b) = api.post("/run", r#"{"hosts":["a1"],"script":"forbidden","token":"good"}"#);
    assert_eq!(
        (c, jstr(&json(&b), "error"), jstr(&json(&b), "code")),
        (403, "insufficient privilege".into(), "3".into())
    );
    // the token travels API -> hooks -> agent -> script stdin
    let (c, b) = api.post("/run", r#"{"hosts":["a1"],"script":"echo","username":"alice","token":"tok-alice"}"#);
    assert_eq!(c, 200, "{b}");
    let o = json(&b);
    let ctx = json(&jstr(&results(&o)[0], "stdout"));
    assert_eq!((jstr(&ctx, "token"), jstr(&ctx, "username")), ("tok-alice".into(), "alice".into()));
    let reqid = jstr(&o, "reqid");
    // only the submitter (by the hook's rule) can read the result; others get a 404
    let (c, _) = api.call("GET", &format!("/status/{reqid}"), &["Authorization: Bearer tok-mallory"], None);
    assert_eq!(c, 404);
    let (c, b) = api.call("GET", &format!("/status/{reqid}"), &["Authorization: Bearer tok-alice"], None);
    assert_eq!(c, 200, "{b}");
    assert!(!b.contains("submitter"), "{b}");
    let log = std::fs::read_to_string(&seen).unwrap();
    assert!(log.contains("api / token=bad-token"), "{log}");
    assert!(log.contains("api /run token=good"), "{log}");
    assert!(log.contains("status  token=tok-mallory sub=alice"), "{log}");
}

#[test]
fn generic_denials_and_overload() {
    let tmp = tempfile::tempdir().unwrap();
    let hook = tmp.path().join("hook");
    write_exec(&hook, "#!/bin/sh\n[ \"$ENVEXEC_TOKEN\" = ok ] || exit 3\n");
    let d = Dispatcher::with_config(&format!("auth_hook = {}\nauth_deny_generic = yes", hook.display()));
    let mut a = d.enroll("a1");
    let started = d.path().join("started");
    a.script("hold", &format!("#!/bin/sh\ntouch {}\nsleep 3\necho held\n", started.display()), "");
    a.start();
    let api = Api::start(&d, "api_max_children = 1");
    let (c, b) = api.post("/ping", r#"{"hosts":["a1"],"token":"nope"}"#);
    assert_eq!((c, b.as_str()), (403, r#"{"error":"forbidden","ok":false}"#));
    // one slow request holds the only slot: the next one gets 503
    let port = api.port;
    let slow = std::thread::spawn(move || Api::raw_port(port, r#"{"hosts":["a1"],"script":"hold","token":"ok"}"#));
    let t = std::time::Instant::now();
    while !started.exists() {
        if slow.is_finished() {
            panic!("slow request ended early: {:?}\n{}", slow.join().unwrap(), api.log());
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (c, b) = api.get("/health");
    assert_eq!(c, 503, "{b}");
    assert_eq!(jstr(&json(&b), "detail"), "too many concurrent requests");
    let (c, b) = slow.join().unwrap();
    assert_eq!(c, 200, "{b}");
    assert!(b.contains("held"));
    assert!(api.log().contains("ACTION=api-overload"));
}

#[test]
fn the_api_speaks_tls_when_given_a_certificate() {
    let d = Dispatcher::new();
    let p = d.path();
    let api = Api::start(&d, &format!("api_cert = {0}/dispatcher.crt\napi_key = {0}/dispatcher.key", p.display()));
    assert!(api.log().contains("TLS=yes"), "{}", api.log());
    let mut s = tls_client(api.port, None, &p.join("ca.crt")).expect("no client certificate is needed");
    use std::io::{Read, Write};
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (c, b) = split_reply(&out);
    assert_eq!(c, 200, "{out}");
    assert_eq!(jstr(&json(&b), "ok"), "true");
    // plain HTTP is not answered on a TLS port
    let (c, _) = api.get("/health");
    assert_eq!(c, 0);
}

#[test]
fn the_live_document_describes_the_fleet_and_validates() {
    let d = Dispatcher::new();
    let mut a1 = d.enroll("web-01");
    let deploy = a1.script("deploy", "#!/bin/sh\necho deployed\n", "");
    std::fs::write(format!("{}.schema.json", deploy.display()), r#"{"version":"2","args":[{"name":"tag"}]}"#).unwrap();
    a1.script("uptime", "#!/bin/sh\nuptime\n", "");
    a1.start();
    let mut a2 = d.enroll("db-01");
    a2.script("deploy", "#!/bin/sh\necho deployed\n", "");
    a2.script("backup", "#!/bin/sh\necho backed up\n", "");
    a2.start();
    let down = d.enroll("down-01");
    down.script("secret", "#!/bin/sh\necho\n", "");
    let api = Api::start(&d, "api_auth_default = allow");
    let (c, b) = api.get("/");
    assert_eq!(c, 200);
    assert_eq!(jstr(&json(&b), "live_spec"), "/openapi-live.json");
    assert!(b.contains(r#""path":"/openapi-live.json""#), "{b}");

    let (c, b) = api.get("/openapi-live.json");
    assert_eq!(c, 200, "{b}");
    capture("OpenAPI", &b);
    let doc = json(&b);
    let get = |o: &miniserde::json::Object, path: &[&str]| -> String {
        let mut cur = o.clone();
        for k in &path[..path.len() - 1] {
            cur = json(&jstr(&cur, k));
        }
        jstr(&cur, path[path.len() - 1])
    };
    // every registered name, reachable or not, is a valid host
    for body in ["PingRequest", "RunRequest", "DiscoveryRequest"] {
        assert_eq!(
            get(&doc, &["components", "schemas", body, "properties", "hosts", "items", "enum"]),
            r#"["db-01","down-01","web-01"]"#,
            "{body}"
        );
    }
    // scripts come from the agents that answered
    assert_eq!(
        get(&doc, &["components", "schemas", "RunRequest", "properties", "script", "enum"]),
        r#"["backup","deploy","uptime"]"#
    );
    assert_eq!(
        get(&doc, &["x-ctrl-exec-scripts", "deploy"]),
        r#"[{"hosts":["db-01"]},{"hosts":["web-01"],"schema":{"args":[{"name":"tag"}],"version":"2"},"schema_version":"2"}]"#
    );
    let version = get(&doc, &["info", "version"]);
    let (base, stamp) = version.split_once('+').expect("version+epoch");
    assert_eq!(base, env!("CARGO_PKG_VERSION"));
    assert!(stamp.parse::<u64>().unwrap() > 1_700_000_000, "{version}");
    // the static document is served unchanged
    let (_, s) = api.get("/openapi.json");
    assert!(!json(&s).contains_key("x-ctrl-exec-scripts") && !s.contains("down-01"));

    // the live document tells what discovery tells, so it passes the same hook check
    let tmp = tempfile::tempdir().unwrap();
    let hook = tmp.path().join("hook");
    write_exec(&hook, "#!/bin/sh\n[ \"$ENVEXEC_ACTION\" = ping ] && exit 3\nexit 0\n");
    let d2 = Dispatcher::with_config(&format!("auth_hook = {}", hook.display()));
    let api2 = Api::start(&d2, "");
    let (c, b) = api2.get("/openapi-live.json");
    assert_eq!((c, jstr(&json(&b), "error")), (403, "insufficient privilege".into()), "{b}");
}
