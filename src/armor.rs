//! Text armour for anything that crosses a serial console, a copy and paste
//! or a flaky link: the enrolment bundle, the offline pairing request and
//! its reply.
//!
//! ```text
//! -----BEGIN CTRL-EXEC <KIND>-----
//! Key: value
//! <more lines, ASCII, at most 76 characters>
//! Sha256: <hex over every trimmed, non-empty line above, joined by \n>
//! -----END CTRL-EXEC <KIND>-----
//! ```
//!
//! Reading is tolerant of what consoles do to text (noise before and after,
//! prompts glued in front of the BEGIN line, CRLF, trailing blanks, blank
//! lines) and strict about content: a lost, cut or altered line fails the
//! checksum, and then nothing at all may be acted upon.

use std::fmt;

/// Longest line written.
pub const WIDTH: usize = 76;

/// Why armoured text was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmorError(pub String);

impl fmt::Display for ArmorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArmorError {}

fn begin(kind: &str) -> String {
    format!("-----BEGIN CTRL-EXEC {kind}-----")
}

fn end(kind: &str) -> String {
    format!("-----END CTRL-EXEC {kind}-----")
}

fn checksum(lines: &[&str]) -> String {
    crate::wire::hex(&openssl::sha::sha256(lines.join("\n").as_bytes()))
}

/// Wrap `lines`. A line longer than [`WIDTH`] (a very long name) is
/// folded: every piece but the last ends with `\`, which neither names
/// nor base64 nor PEM ever contain.
pub fn wrap(kind: &str, lines: &[String]) -> String {
    let mut out: Vec<String> = Vec::new();
    for l in lines {
        let chars: Vec<char> = l.chars().collect();
        if chars.len() <= WIDTH {
            out.push(l.clone());
            continue;
        }
        let pieces: Vec<String> = chars.chunks(WIDTH - 1).map(|c| c.iter().collect()).collect();
        let last = pieces.len() - 1;
        for (i, p) in pieces.into_iter().enumerate() {
            out.push(if i < last { format!("{p}\\") } else { p });
        }
    }
    let refs: Vec<&str> = out.iter().map(String::as_str).collect();
    format!("{}\n{}\nSha256: {}\n{}\n", begin(kind), out.join("\n"), checksum(&refs), end(kind))
}

/// `data` as base64 lines of [`WIDTH`] characters.
pub fn base64_lines(data: &[u8]) -> Vec<String> {
    let b64 = openssl::base64::encode_block(data);
    b64.as_bytes().chunks(WIDTH).map(|c| String::from_utf8_lossy(c).into_owned()).collect()
}

/// The checked body lines (trimmed, blanks dropped, folded lines joined)
/// of the first `kind` block in `text`. `what` names the block in
/// messages ("bundle", ...).
pub fn unwrap(kind: &str, what: &str, text: &str) -> Result<Vec<String>, ArmorError> {
    let (b, e) = (begin(kind), end(kind));
    let mut lines = text.lines().map(|l| l.trim());
    if !lines.by_ref().any(|l| l.ends_with(&b)) {
        return Err(ArmorError(format!("no {what} found: expected a line '{b}'")));
    }
    let mut body = Vec::new();
    let mut sum = None;
    for l in lines.by_ref() {
        if l.starts_with(&e) {
            break;
        }
        if let Some(s) = l.strip_prefix("Sha256:") {
            sum = Some(s.trim().to_ascii_lowercase());
        } else if !l.is_empty() {
            body.push(l);
        }
    }
    let Some(sum) = sum else {
        return Err(ArmorError(format!(
            "the {what} is incomplete (no Sha256 line): it was cut off in transit; send it again"
        )));
    };
    if checksum(&body) != sum {
        return Err(ArmorError(format!(
            "the {what} is damaged (checksum mismatch: a line was lost or changed in transit); send it again; nothing was done"
        )));
    }
    let mut joined: Vec<String> = Vec::new();
    let mut open = false;
    for l in body {
        let (piece, more) = match l.strip_suffix('\\') {
            Some(p) => (p, true),
            None => (l, false),
        };
        match joined.last_mut() {
            Some(last) if open => last.push_str(piece),
            _ => joined.push(piece.to_string()),
        }
        open = more;
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_survives_console_noise() {
        let lines = vec!["Version: 1".to_string(), "Name: a".to_string()];
        let text = wrap("THING", &lines);
        let noisy = format!("login: root\r\n# {}", text.replace('\n', "  \r\n\r\n"));
        assert_eq!(unwrap("THING", "thing", &noisy).unwrap(), vec!["Version: 1", "Name: a"]);
        assert!(text.lines().all(|l| l.len() <= WIDTH));
    }

    #[test]
    fn long_lines_are_folded_and_joined() {
        let long = format!("Name: {}", "a".repeat(200));
        let lines = vec!["Version: 1".to_string(), long.clone(), "x".to_string()];
        let text = wrap("THING", &lines);
        assert!(text.lines().all(|l| l.len() <= WIDTH), "{text}");
        assert_eq!(unwrap("THING", "thing", &text).unwrap(), lines);
    }

    #[test]
    fn a_lost_or_changed_line_is_detected() {
        let lines: Vec<String> = (0..5).map(|i| format!("line {i}")).collect();
        let text = wrap("THING", &lines);
        let dropped: Vec<&str> = text.lines().enumerate().filter(|(i, _)| *i != 3).map(|(_, l)| l).collect();
        assert!(unwrap("THING", "thing", &dropped.join("\n")).unwrap_err().0.contains("damaged"));
        let cut: String = text.lines().take(4).collect::<Vec<_>>().join("\n");
        assert!(unwrap("THING", "thing", &cut).unwrap_err().0.contains("incomplete"));
        assert!(unwrap("OTHER", "other", &text).unwrap_err().0.contains("no other found"));
    }
}
