//! The live OpenAPI document: the static document specialised for this
//! fleet, so a tool or an AI agent reading it learns which hosts exist, which
//! scripts they offer and which argument schemas those scripts publish.
//!
//! The transformation is pure: it takes the static document, the registry
//! names and the `/capabilities` answers already collected, and returns the
//! new document. Nothing is cached and nothing is written.

use std::collections::BTreeMap;

use miniserde::json::{self, Array, Object, Value};

use crate::wire::{get_str, str_array};

/// Why the live document could not be built (only a broken static document).
#[derive(Debug)]
pub struct SpecError(pub String);

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One script as advertised by one host: its `schema_version` and `schema`
/// when the agent found a sidecar.
struct Seen {
    host: String,
    version: Option<String>,
    schema: Option<Value>,
}

/// Builds the live document.
///
/// - `names`: every registry name (the `hosts` enum of the request bodies);
/// - `caps`: the `/capabilities` results of the hosts that answered
///   (`status` other than `ok` is ignored, as are unreachable hosts);
/// - `now`: Unix time, appended to `info.version` (`0.1.0+1764075000`) so UI
///   tools treat every response as a new document.
pub fn live(static_doc: &str, names: &[String], caps: &[Object], now: u64) -> Result<String, SpecError> {
    let mut doc: Object =
        json::from_str(static_doc).map_err(|_| SpecError("the static OpenAPI document is not valid JSON".into()))?;

    let mut scripts: BTreeMap<String, Vec<Seen>> = BTreeMap::new();
    for c in caps {
        if get_str(c, "status").as_deref() != Some("ok") {
            continue;
        }
        let host = get_str(c, "host").unwrap_or_default();
        let Some(Value::Array(list)) = c.get("scripts") else { continue };
        for s in list {
            let Value::Object(s) = s else { continue };
            let Some(name) = get_str(s, "name") else { continue };
            let schema = s.get("schema").filter(|v| matches!(v, Value::Object(_))).cloned();
            let version = schema.as_ref().and_then(|_| get_str(s, "schema_version"));
            scripts.entry(name).or_default().push(Seen { host: host.clone(), version, schema });
        }
    }

    let mut sorted_names = names.to_vec();
    sorted_names.sort();
    sorted_names.dedup();
    {
        let schemas = section(&mut doc, &["components", "schemas"])?;
        for body in ["PingRequest", "RunRequest", "DiscoveryRequest"] {
            let props = section(schemas, &[body, "properties"])?;
            // The shared `Hosts` schema is inlined so the enum applies to this body only.
            let min_items = body != "DiscoveryRequest";
            let mut items = Object::new();
            items.insert("type".into(), Value::String("string".into()));
            if !sorted_names.is_empty() {
                items.insert("enum".into(), str_array(&sorted_names));
            }
            let mut hosts = Object::new();
            hosts.insert("type".into(), Value::String("array".into()));
            if min_items {
                hosts.insert("minItems".into(), crate::wire::int(1));
            }
            hosts.insert("items".into(), Value::Object(items));
            props.insert("hosts".into(), Value::Object(hosts));
        }
        if !scripts.is_empty() {
            let script = section(schemas, &["RunRequest", "properties", "script"])?;
            let all: Vec<&String> = scripts.keys().collect();
            script.insert("enum".into(), str_array(&all));
        }
    }

    let mut ext = Object::new();
    for (name, seen) in scripts {
        ext.insert(name, Value::Array(variants(seen)));
    }
    doc.insert("x-ctrl-exec-scripts".into(), Value::Object(ext));

    let info = section(&mut doc, &["info"])?;
    let base = get_str(info, "version").unwrap_or_else(|| crate::VERSION.into());
    let base = base.split('+').next().unwrap_or_default().to_string();
    info.insert("version".into(), Value::String(format!("{base}+{now}")));
    Ok(json::to_string(&doc))
}

/// Groups one script's hosts by `schema_version`: hosts without a sidecar
/// first, then each version in order. Hosts claiming the same version with
/// different bodies get one variant per body (never one silently chosen).
/// Each variant lists its hosts sorted.
fn variants(seen: Vec<Seen>) -> Array {
    type Key = (Option<String>, Option<String>);
    let mut groups: BTreeMap<Key, (Vec<String>, Option<Value>)> = BTreeMap::new();
    for s in seen {
        let body = s.schema.as_ref().map(json::to_string);
        let g = groups.entry((s.version, body)).or_insert_with(|| (Vec::new(), s.schema));
        g.0.push(s.host);
    }
    let mut out = Array::new();
    for ((version, _), (mut hosts, schema)) in groups {
        hosts.sort();
        hosts.dedup();
        let mut v = Object::new();
        v.insert("hosts".into(), str_array(&hosts));
        if let Some(ver) = version {
            v.insert("schema_version".into(), Value::String(ver));
        }
        if let Some(s) = schema {
            v.insert("schema".into(), s);
        }
        out.push(Value::Object(v));
    }
    out
}

/// The object at `path` inside `doc`, or an error naming the missing part.
fn section<'a>(doc: &'a mut Object, path: &[&str]) -> Result<&'a mut Object, SpecError> {
    let mut cur = doc;
    for (i, key) in path.iter().enumerate() {
        cur = match cur.get_mut(*key) {
            Some(Value::Object(o)) => o,
            _ => {
                return Err(SpecError(format!(
                    "the static OpenAPI document has no object at {}",
                    path[..=i].join(".")
                )));
            }
        };
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Obj, parse_object};

    const DOC: &str = include_str!("../docs/openapi.json");

    fn script(name: &str, schema: Option<(&str, &str)>) -> Value {
        let mut o = Obj::new().s("name", name).s("path", format!("/opt/s/{name}.sh"));
        if let Some((ver, body)) = schema {
            o = o.s("schema_version", ver).v("schema", Value::Object(parse_object(body).unwrap()));
        }
        o.into_value()
    }

    fn caps(host: &str, status: &str, scripts: Vec<Value>) -> Object {
        let mut a = Array::new();
        a.extend(scripts);
        Obj::new().s("host", host).s("status", status).v("scripts", Value::Array(a)).0
    }

    fn at<'a>(o: &'a Object, path: &[&str]) -> &'a Value {
        let mut cur = o;
        for k in &path[..path.len() - 1] {
            cur = match cur.get(*k) {
                Some(Value::Object(o)) => o,
                other => panic!("no object at {k}: {other:?}"),
            };
        }
        cur.get(path[path.len() - 1]).unwrap_or_else(|| panic!("missing {path:?}"))
    }

    #[test]
    fn enums_extension_and_version_reflect_the_fleet() {
        let names = vec!["web-02".to_string(), "db-01".into(), "web-01".into(), "gone".into()];
        let c = vec![
            caps(
                "web-01",
                "ok",
                vec![script("deploy", Some(("2", r#"{"version":"2","args":[]}"#))), script("uptime", None)],
            ),
            caps("web-02", "ok", vec![script("deploy", Some(("2", r#"{"version":"2","args":[]}"#)))]),
            caps("db-01", "ok", vec![script("deploy", Some(("1", r#"{"version":"1"}"#))), script("backup", None)]),
            caps("gone", "error", vec![script("secret", None)]),
        ];
        let out = parse_object(&live(DOC, &names, &c, 1_764_075_000).unwrap()).unwrap();
        let host_enum =
            json::to_string(at(&out, &["components", "schemas", "RunRequest", "properties", "hosts", "items", "enum"]));
        assert_eq!(host_enum, r#"["db-01","gone","web-01","web-02"]"#);
        for body in ["PingRequest", "DiscoveryRequest"] {
            let e = at(&out, &["components", "schemas", body, "properties", "hosts", "items", "enum"]);
            assert_eq!(json::to_string(e), host_enum);
        }
        // The unreachable host's script is not offered.
        let script_enum = at(&out, &["components", "schemas", "RunRequest", "properties", "script", "enum"]);
        assert_eq!(json::to_string(script_enum), r#"["backup","deploy","uptime"]"#);
        let deploy = json::to_string(at(&out, &["x-ctrl-exec-scripts", "deploy"]));
        assert_eq!(
            deploy,
            r#"[{"hosts":["db-01"],"schema":{"version":"1"},"schema_version":"1"},{"hosts":["web-01","web-02"],"schema":{"args":[],"version":"2"},"schema_version":"2"}]"#
        );
        assert_eq!(json::to_string(at(&out, &["x-ctrl-exec-scripts", "uptime"])), r#"[{"hosts":["web-01"]}]"#);
        let version = get_str(
            match at(&out, &["info"]) {
                Value::Object(o) => o,
                _ => unreachable!(),
            },
            "version",
        );
        assert_eq!(version.as_deref(), Some(format!("{}+1764075000", crate::VERSION).as_str()));
        // The static document itself is untouched by the transformation.
        assert!(!parse_object(DOC).unwrap().contains_key("x-ctrl-exec-scripts"));
    }

    #[test]
    fn one_version_with_two_bodies_gives_two_variants() {
        let c = vec![
            caps("h2", "ok", vec![script("x", Some(("1", r#"{"version":"1","b":2}"#)))]),
            caps("h1", "ok", vec![script("x", Some(("1", r#"{"version":"1","a":1}"#)))]),
            caps("h3", "ok", vec![script("x", Some(("1", r#"{"version":"1","a":1}"#)))]),
        ];
        let out = parse_object(&live(DOC, &[], &c, 1).unwrap()).unwrap();
        assert_eq!(
            json::to_string(at(&out, &["x-ctrl-exec-scripts", "x"])),
            r#"[{"hosts":["h1","h3"],"schema":{"a":1,"version":"1"},"schema_version":"1"},{"hosts":["h2"],"schema":{"b":2,"version":"1"},"schema_version":"1"}]"#
        );
    }

    #[test]
    fn an_empty_fleet_leaves_no_empty_enum() {
        let out = live(DOC, &[], &[], 7).unwrap();
        assert!(!out.contains("\"enum\":[]"), "an empty enum would make every request invalid");
        assert!(out.contains("\"x-ctrl-exec-scripts\":{}"));
    }

    #[test]
    fn a_version_with_a_build_suffix_gets_one_suffix() {
        let doc = DOC.replacen(&format!("\"version\": \"{}\"", crate::VERSION), "\"version\": \"9.9.9+abc\"", 1);
        assert!(doc.contains("9.9.9+abc"));
        assert!(live(&doc, &[], &[], 42).unwrap().contains("\"version\":\"9.9.9+42\""));
    }

    #[test]
    fn a_broken_static_document_is_an_error_not_a_panic() {
        assert!(live("not json", &[], &[], 1).is_err());
        assert!(live("{}", &[], &[], 1).unwrap_err().0.contains("components"));
    }
}
