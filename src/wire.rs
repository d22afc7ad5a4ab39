//! What crosses the wire, independent of transport: JSON helpers, request
//! ids, serial canonicalisation and the name rules shared by both sides.
//!
//! JSON goes through `miniserde::json::Value` rather than derived structs,
//! because the protocol's replies differ in *which keys are present* (a
//! refused run has `error` and no `stdout`; an invalid-JSON reply has neither
//! `script` nor `reqid`), and because we must be liberal with what a Perl peer
//! sends (a port as a string, a missing field) while checking every field we
//! use ourselves.

use miniserde::json::{self, Array, Number, Object, Value};

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A fresh request id: 16 lowercase hex characters from the CSPRNG.
///
/// Panics only if OpenSSL's CSPRNG cannot be seeded, in which case nothing
/// secure can be done anyway (upstream also refuses to fall back).
pub fn new_reqid() -> String {
    let mut b = [0u8; 8];
    openssl::rand::rand_bytes(&mut b).expect("CSPRNG unavailable");
    hex(&b)
}

/// Canonical form of a certificate serial: lowercase hex, no leading zeros.
///
/// Accepts `0x`-prefixed, `serial=`-prefixed (raw `openssl x509 -serial`
/// output), colon-separated (`DE:AD:BE:EF`) and plain hex, in any case. Unlike
/// upstream, a string of decimal digits is **hex** too: serials are printed
/// in hex by every tool that writes them into our files, and upstream's
/// decimal reading made the function non-idempotent (hex `20` became `14`
/// and then `e`). Returns `None` for anything that is not a hex number.
pub fn canonical_serial(input: &str) -> Option<String> {
    let mut s = input.trim();
    if s.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("serial=")) {
        s = &s[7..];
    }
    if s.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("0x")) {
        s = &s[2..];
    }
    let digits: String = s.chars().filter(|c| *c != ':').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    // A colon may only separate byte groups, not start or end the string.
    if s.starts_with(':') || s.ends_with(':') || s.contains("::") {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    Some(if trimmed.is_empty() { "0".into() } else { trimmed.to_ascii_lowercase() })
}

/// Script names: word characters and hyphen (`[A-Za-z0-9_-]+`), at most 128.
pub fn valid_script_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Agent registry names: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 253 bytes.
pub fn valid_agent_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// Dispatcher ids: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub fn valid_dispatcher_id(id: &str) -> bool {
    valid_agent_name(id) && id.len() <= 64
}

/// Turn any string (e.g. a host name) into a valid dispatcher id.
pub fn sanitize_dispatcher_id(raw: &str) -> String {
    let mapped: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).collect();
    let start = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let out: String = start.chars().take(64).collect();
    if out.is_empty() { "dispatcher".into() } else { out }
}

/// Request ids the agent accepts where a reqid becomes a file name.
pub fn valid_reqid(id: &str) -> bool {
    valid_script_name(id)
}

/// Builder for a JSON object reply.
#[derive(Debug, Default, Clone)]
pub struct Obj(pub Object);

impl Obj {
    /// An empty object.
    pub fn new() -> Self {
        Obj(Object::new())
    }
    /// Add a string field.
    pub fn s(mut self, k: &str, v: impl Into<String>) -> Self {
        self.0.insert(k.into(), Value::String(v.into()));
        self
    }
    /// Add an integer field.
    pub fn i(mut self, k: &str, v: i64) -> Self {
        self.0.insert(k.into(), int(v));
        self
    }
    /// Add a boolean field.
    pub fn b(mut self, k: &str, v: bool) -> Self {
        self.0.insert(k.into(), Value::Bool(v));
        self
    }
    /// Add any value.
    pub fn v(mut self, k: &str, v: Value) -> Self {
        self.0.insert(k.into(), v);
        self
    }
    /// Add a string field only when `v` is `Some`.
    pub fn opt_s(self, k: &str, v: Option<&str>) -> Self {
        match v {
            Some(v) => self.s(k, v),
            None => self,
        }
    }
    /// Compact JSON text.
    pub fn to_json(&self) -> String {
        json::to_string(&self.0)
    }
    /// The finished value.
    pub fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

/// An integer JSON value.
pub fn int(v: i64) -> Value {
    if v >= 0 { Value::Number(Number::U64(v as u64)) } else { Value::Number(Number::I64(v)) }
}

/// A JSON array of strings.
pub fn str_array<S: AsRef<str>>(items: &[S]) -> Value {
    let mut a = Array::new();
    for s in items {
        a.push(Value::String(s.as_ref().to_string()));
    }
    Value::Array(a)
}

/// Parse a JSON object; anything else (including an array) is an error.
pub fn parse_object(text: &str) -> Option<Object> {
    match json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// A string field; numbers are accepted and stringified (Perl peers are loose).
pub fn get_str(o: &Object, k: &str) -> Option<String> {
    match o.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(num_to_string(n)),
        _ => None,
    }
}

/// An integer field; numeric strings are accepted.
pub fn get_i64(o: &Object, k: &str) -> Option<i64> {
    match o.get(k)? {
        Value::Number(Number::U64(u)) => i64::try_from(*u).ok(),
        Value::Number(Number::I64(i)) => Some(*i),
        Value::Number(Number::F64(f)) if f.fract() == 0.0 => Some(*f as i64),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A boolean field; Perl-style `1`/`0` numbers are accepted.
pub fn get_bool(o: &Object, k: &str) -> Option<bool> {
    match o.get(k)? {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => Some(num_to_string(n) != "0"),
        _ => None,
    }
}

/// Text of a JSON number as Perl would print it.
pub fn num_to_string(n: &Number) -> String {
    match n {
        Number::U64(u) => u.to_string(),
        Number::I64(i) => i.to_string(),
        Number::F64(f) => f.to_string(),
    }
}

/// A field that is present but has the wrong JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongType;

/// A string-array field: `Ok(None)` if absent, `Err` if present but not an array.
/// Non-string elements are stringified like a Perl peer would.
pub fn get_str_array(o: &Object, k: &str) -> Result<Option<Vec<String>>, WrongType> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(
            a.iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => num_to_string(n),
                    Value::Bool(b) => {
                        if *b {
                            "1".into()
                        } else {
                            "".into()
                        }
                    }
                    Value::Null => String::new(),
                    other => json::to_string(other),
                })
                .collect(),
        )),
        Some(_) => Err(WrongType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_spellings_agree() {
        for s in ["1f", "1F", "0x1f", "0X001F", "serial=1F", "SERIAL=001f", "00:1F", "1f\n"] {
            assert_eq!(canonical_serial(s).as_deref(), Some("1f"), "{s:?}");
        }
        assert_eq!(canonical_serial("02").as_deref(), Some("2"));
        assert_eq!(canonical_serial("serial=10").as_deref(), Some("10"));
        assert_eq!(canonical_serial("0").as_deref(), Some("0"));
        assert_eq!(canonical_serial("00").as_deref(), Some("0"));
        for bad in ["", "xyz", "-5", "0x", "serial=", ":1f", "1f:", "1::f", "1 f", "g1"] {
            assert_eq!(canonical_serial(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn serial_is_idempotent_and_form_independent(bytes in proptest::collection::vec(0u8..=255, 1..20)) {
            let plain = hex(&bytes);
            let colon = bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":");
            let c = canonical_serial(&plain).unwrap();
            proptest::prop_assert_eq!(canonical_serial(&c).unwrap(), c.clone());
            proptest::prop_assert_eq!(canonical_serial(&colon).unwrap(), c.clone());
            proptest::prop_assert_eq!(canonical_serial(&format!("serial={}", plain.to_uppercase())).unwrap(), c.clone());
            proptest::prop_assert_eq!(canonical_serial(&format!("0x{plain}")).unwrap(), c);
        }

        #[test]
        fn serial_never_panics(s in ".*") {
            let _ = canonical_serial(&s);
        }
    }

    #[test]
    fn names() {
        let good = ["echo", "backup-mysql", "a_b", "X9"];
        let bad = ["", "../x", "a/b", "a b", "a;b", "$(id)", ".", "a.b", "é"];
        for g in good {
            assert!(valid_script_name(g), "{g}");
        }
        for b in bad {
            assert!(!valid_script_name(b), "{b}");
        }
        assert!(valid_agent_name("web-1.example.org"));
        assert!(!valid_agent_name("-web"));
        assert!(!valid_agent_name("web/1"));
        assert_eq!(sanitize_dispatcher_id("..my host!"), "my-host-");
        assert_eq!(sanitize_dispatcher_id("***"), "dispatcher");
        assert_eq!(sanitize_dispatcher_id(&"a".repeat(100)).len(), 64);
    }

    #[test]
    fn reqid_shape() {
        let r = new_reqid();
        assert_eq!(r.len(), 16);
        assert!(r.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_ne!(r, new_reqid());
    }

    #[test]
    fn loose_fields() {
        let o = parse_object(r#"{"port":"7443","n":5,"args":["a",1,true],"x":{}}"#).unwrap();
        assert_eq!(get_i64(&o, "port"), Some(7443));
        assert_eq!(get_str(&o, "n").as_deref(), Some("5"));
        assert_eq!(get_str_array(&o, "args").unwrap().unwrap(), vec!["a", "1", "1"]);
        assert!(get_str_array(&o, "x").is_err());
        assert!(parse_object("[1]").is_none());
        assert!(parse_object("{bad").is_none());
    }
}
