//! NATS subjects and the templates around them: validation, wildcard matching, rendering
//! subjects from path captures (egress) and app paths from subject tokens (ingress).
//!
//! Everything here is pure; rendering refuses any captured value that is not exactly one
//! subject token, so a request can never inject a wildcard or an extra token.

use std::borrow::Cow;
use std::fmt;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

/// Is `t` one literal subject token (no separators, wildcards, whitespace or control
/// characters)? Control characters too: a percent-decoded capture like `%7F` or `%01`
/// must not reach a subject (found by fuzzing; config subjects already refused them).
pub fn is_valid_token(t: &str) -> bool {
    !t.is_empty() && !t.bytes().any(|b| matches!(b, b'.' | b'*' | b'>') || b.is_ascii_whitespace() || b.is_ascii_control())
}

/// The longest subject a template may render. nats-server closes the connection on a
/// control line (`HPUB <subject> <reply> <sizes>`) over its `max_control_line` (4 KiB by
/// default), dropping every route and consumer of the sidecar with it: a path capture
/// must never get near that. 1 KiB is far above any real subject (NATS advises < 256).
pub const MAX_SUBJECT_LEN: usize = 1024;

/// nats-server's default `max_control_line`; the server does not announce its own.
pub const MAX_CONTROL_LINE: usize = 4096;

/// The length of the longest control line a message to `subject` with a reply subject of
/// `reply_len` bytes can take: `HPUB <subject> <reply> <header bytes> <total bytes>\r\n`,
/// the sizes counted at their widest (20 digits each).
pub fn control_line_len(subject: &str, reply_len: usize) -> usize {
    "HPUB ".len() + subject.len() + 1 + reply_len + 1 + 20 + 1 + 20 + "\r\n".len()
}

/// Why a subject or a captured value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("it is empty")]
    Empty,
    #[error("token {0} is empty")]
    EmptyToken(usize),
    #[error("token {0:?} contains whitespace or a control character")]
    Whitespace(String),
    #[error("'>' is only allowed as the last token")]
    FullWildcardNotLast,
    #[error("wildcard {0:?} must be a whole token")]
    PartialWildcard(String),
    #[error("wildcards are not allowed here")]
    Wildcard,
    #[error("unbalanced '{{' or '}}' in {0:?}")]
    Braces(String),
    #[error("capture name {0:?} is not a plain name")]
    CaptureName(String),
}

/// Why a value captured from a request cannot become a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("path parameter `{name}` is missing")]
    Missing { name: String },
    #[error("path parameter `{name}` = {value:?} is not a single subject token (no '.', '*', '>', whitespace, or empty)")]
    InvalidToken { name: String, value: String },
    #[error("the subject would be {len} bytes long; the limit is {max}")]
    TooLong { len: usize, max: usize },
}

fn check_token(tok: &str, idx: usize, wildcards: bool) -> Result<(), SubjectError> {
    if tok.is_empty() {
        return Err(SubjectError::EmptyToken(idx + 1));
    }
    if tok.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(SubjectError::Whitespace(tok.to_owned()));
    }
    if tok == "*" || tok == ">" {
        return if wildcards { Ok(()) } else { Err(SubjectError::Wildcard) };
    }
    if tok.contains('*') || tok.contains('>') {
        return Err(SubjectError::PartialWildcard(tok.to_owned()));
    }
    Ok(())
}

/// A subscription subject, possibly with `*` and a trailing `>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SubjectPattern {
    raw: String,
    tokens: Vec<String>,
}

impl fmt::Debug for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.raw, f)
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl SubjectPattern {
    pub fn parse(s: &str) -> Result<Self, SubjectError> {
        if s.is_empty() {
            return Err(SubjectError::Empty);
        }
        let tokens: Vec<String> = s.split('.').map(str::to_owned).collect();
        for (i, t) in tokens.iter().enumerate() {
            check_token(t, i, true)?;
            if t == ">" && i + 1 != tokens.len() {
                return Err(SubjectError::FullWildcardNotLast);
            }
        }
        Ok(Self { raw: s.to_owned(), tokens })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn has_wildcards(&self) -> bool {
        self.tokens.iter().any(|t| t == "*" || t == ">")
    }

    /// Can a subject matched by this pattern have a token at 1-based position `n`?
    pub fn has_token(&self, n: usize) -> bool {
        n >= 1 && (n <= self.tokens.len() || self.tokens.last().is_some_and(|t| t == ">"))
    }

    /// Does the literal subject `subject` match this pattern?
    pub fn matches(&self, subject: &str) -> bool {
        let mut it = subject.split('.');
        for t in &self.tokens {
            match (t.as_str(), it.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (lit, Some(s)) if lit == s => {}
                _ => return false,
            }
        }
        it.next().is_none()
    }

    /// Is every subject matched by `other` also matched by `self`?
    pub fn covers(&self, other: &SubjectPattern) -> bool {
        let mut theirs = other.tokens.iter();
        for mine in &self.tokens {
            let Some(t) = theirs.next() else { return false };
            match (mine.as_str(), t.as_str()) {
                (">", _) => return true,
                ("*", ">") => return false,
                ("*", _) => {}
                (a, b) if a == b => {}
                _ => return false,
            }
        }
        theirs.next().is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Capture(String),
}

/// A publish subject with `{name}` placeholders filled from path captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate {
    raw: String,
    pieces: Vec<Piece>,
}

fn split_braces(s: &str) -> Result<Vec<Piece>, SubjectError> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or_else(|| SubjectError::Braces(s.to_owned()))? + open;
        if open > 0 {
            pieces.push(Piece::Lit(rest[..open].to_owned()));
        }
        let name = &rest[open + 1..close];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(SubjectError::CaptureName(name.to_owned()));
        }
        pieces.push(Piece::Capture(name.to_owned()));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(SubjectError::Braces(s.to_owned()));
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest.to_owned()));
    }
    Ok(pieces)
}

impl SubjectTemplate {
    pub fn parse(s: &str) -> Result<Self, SubjectError> {
        if s.is_empty() {
            return Err(SubjectError::Empty);
        }
        let pieces = split_braces(s)?;
        // Validate the shape with every capture standing for one plain token.
        let probe: String = pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(l) => l.as_str(),
                Piece::Capture(_) => "x",
            })
            .collect();
        for (i, t) in probe.split('.').enumerate() {
            check_token(t, i, false)?;
        }
        Ok(Self { raw: s.to_owned(), pieces })
    }

    /// A subject without captures, braces included (a NestJS object pattern's subject is
    /// `{"cmd":"sum"}`).
    pub fn literal(s: &str) -> Result<Self, SubjectError> {
        if s.is_empty() {
            return Err(SubjectError::Empty);
        }
        for (i, t) in s.split('.').enumerate() {
            check_token(t, i, false)?;
        }
        Ok(Self { raw: s.to_owned(), pieces: vec![Piece::Lit(s.to_owned())] })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn captures(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Capture(c) => Some(c.as_str()),
            Piece::Lit(_) => None,
        })
    }

    /// A concrete subject of the template's shape, for coverage checks.
    pub fn probe(&self) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(l) => l.as_str(),
                Piece::Capture(_) => "x",
            })
            .collect()
    }

    /// Renders the subject; `param` looks up a raw (percent-encoded) path capture.
    pub fn render<'p>(&self, param: impl Fn(&str) -> Option<&'p str>) -> Result<String, RenderError> {
        if let [Piece::Lit(l)] = self.pieces.as_slice() {
            return Ok(l.clone());
        }
        let mut out = String::with_capacity(self.raw.len() + 16);
        for p in &self.pieces {
            match p {
                Piece::Lit(l) => out.push_str(l),
                Piece::Capture(name) => {
                    let raw = param(name).ok_or_else(|| RenderError::Missing { name: name.clone() })?;
                    // Decode first: `%2E` must not smuggle a '.' past the check.
                    let value: Cow<'_, str> = percent_decode_str(raw).decode_utf8_lossy();
                    if !is_valid_token(&value) {
                        return Err(RenderError::InvalidToken { name: name.clone(), value: value.into_owned() });
                    }
                    out.push_str(&value);
                    // Checked as it grows: a 5,000-byte capture is refused without
                    // building the whole subject.
                    if out.len() > MAX_SUBJECT_LEN {
                        return Err(RenderError::TooLong { len: out.len(), max: MAX_SUBJECT_LEN });
                    }
                }
            }
        }
        if out.len() > MAX_SUBJECT_LEN {
            return Err(RenderError::TooLong { len: out.len(), max: MAX_SUBJECT_LEN });
        }
        Ok(out)
    }
}

/// The capture names of a matchit path pattern, after checking that matchit accepts it.
pub fn path_captures(path: &str) -> Result<Vec<String>, String> {
    if !path.starts_with('/') {
        return Err("it must start with '/'".into());
    }
    let mut router = matchit::Router::new();
    router.insert(path, ()).map_err(|e| e.to_string())?;
    let pieces = split_braces(&path.replace("{*", "{")).map_err(|e| e.to_string())?;
    Ok(pieces
        .into_iter()
        .filter_map(|p| match p {
            Piece::Capture(c) => Some(c),
            Piece::Lit(_) => None,
        })
        .collect())
}

/// The path with capture names erased: two routes with the same shape match the same requests.
pub fn path_shape(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else { break };
        let close = close + open;
        out.push_str(if rest[open + 1..].starts_with('*') { "{*}" } else { "{}" });
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Characters escaped when a subject token goes into a URL path segment.
const SEGMENT: &AsciiSet =
    &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'<').add(b'>').add(b'?').add(b'`').add(b'{').add(b'}').add(b'/').add(b'%');

#[derive(Debug, Clone, PartialEq, Eq)]
enum PathPiece {
    Lit(String),
    Token(usize),
}

/// An app path with `{N}` standing for the N-th (1-based) token of the received subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    raw: String,
    pieces: Vec<PathPiece>,
}

impl PathTemplate {
    pub fn parse(s: &str) -> Result<Self, String> {
        if !s.starts_with('/') {
            return Err("it must start with '/'".into());
        }
        let pieces = split_braces(s)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|p| match p {
                Piece::Lit(l) => Ok(PathPiece::Lit(l)),
                Piece::Capture(c) => match c.parse::<usize>() {
                    Ok(n) if n >= 1 => Ok(PathPiece::Token(n)),
                    _ => Err(format!("{{{c}}} must be a subject token number from 1")),
                },
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { raw: s.to_owned(), pieces })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn max_token(&self) -> Option<usize> {
        self.pieces
            .iter()
            .filter_map(|p| match p {
                PathPiece::Token(n) => Some(*n),
                PathPiece::Lit(_) => None,
            })
            .max()
    }

    /// Renders the path for a received subject; tokens are percent-encoded as one segment.
    pub fn render(&self, subject: &str) -> String {
        if let [PathPiece::Lit(l)] = self.pieces.as_slice() {
            return l.clone();
        }
        let tokens: Vec<&str> = subject.split('.').collect();
        let mut out = String::with_capacity(self.raw.len() + subject.len());
        for p in &self.pieces {
            match p {
                PathPiece::Lit(l) => out.push_str(l),
                PathPiece::Token(n) => {
                    if let Some(t) = tokens.get(n - 1) {
                        out.extend(utf8_percent_encode(t, SEGMENT));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_valid_token("abc-1_2"));
        for bad in ["", "a.b", "*", ">", "a b", "a\tb", "x*"] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn patterns_parse_and_match() {
        let p = SubjectPattern::parse("agent.*.execution.>").unwrap();
        assert!(p.matches("agent.7.execution.requested"));
        assert!(p.matches("agent.7.execution.a.b"));
        assert!(!p.matches("agent.7.execution"));
        assert!(!p.matches("agent.7.x.requested"));
        assert!(SubjectPattern::parse("a.>.b").is_err());
        assert!(SubjectPattern::parse("a..b").is_err());
        assert!(SubjectPattern::parse("a.b*").is_err());
        assert!(SubjectPattern::parse("a b").is_err());
    }

    #[test]
    fn coverage() {
        let p = |s| SubjectPattern::parse(s).unwrap();
        assert!(p("workflow.>").covers(&p("workflow.execution.started")));
        assert!(p("workflow.>").covers(&p("workflow.*.x")));
        assert!(!p("workflow.*").covers(&p("workflow.>")));
        assert!(p("a.*.c").covers(&p("a.b.c")));
        assert!(!p("a.b.c").covers(&p("a.*.c")));
        assert!(!p("a.b").covers(&p("a.b.c")));
    }

    #[test]
    fn templates_render_single_tokens_only() {
        let t = SubjectTemplate::parse("agent.{agent_id}.execution.requested").unwrap();
        assert_eq!(t.captures().collect::<Vec<_>>(), ["agent_id"]);
        assert_eq!(t.render(|_| Some("7")).unwrap(), "agent.7.execution.requested");
        for evil in ["a.b", "*", ">", "", "a%2Eb", "a%20b", "%3E"] {
            let e = t.render(|_| Some(evil)).unwrap_err();
            assert!(matches!(e, RenderError::InvalidToken { .. }), "{evil:?}: {e:?}");
        }
        assert!(matches!(t.render(|_| None), Err(RenderError::Missing { .. })));
        assert!(SubjectTemplate::parse("a.*").is_err());
        assert!(SubjectTemplate::parse("a.{x").is_err());
        assert!(SubjectTemplate::parse("a.{x.y}").is_err());
        let mixed = SubjectTemplate::parse("job-{id}.done").unwrap();
        assert_eq!(mixed.render(|_| Some("9")).unwrap(), "job-9.done");
        // A capture long enough to break the server's control line is refused.
        let long = "a".repeat(5000);
        assert!(matches!(mixed.render(|_| Some(&long)), Err(RenderError::TooLong { max: MAX_SUBJECT_LEN, .. })));
        let fits = "a".repeat(MAX_SUBJECT_LEN - "job-.done".len());
        assert_eq!(mixed.render(|_| Some(&fits)).unwrap().len(), MAX_SUBJECT_LEN);
        assert!(control_line_len(&"a".repeat(MAX_SUBJECT_LEN), 256) < MAX_CONTROL_LINE);
    }

    #[test]
    fn path_shapes_and_captures() {
        assert_eq!(path_shape("/a/{x}/b/{*rest}"), "/a/{}/b/{*}");
        assert_eq!(path_captures("/a/{x}/{*rest}").unwrap(), ["x", "rest"]);
        assert!(path_captures("a/b").is_err());
        assert!(path_captures("/a/{*rest}/b").is_err());
    }

    #[test]
    fn path_templates_take_subject_tokens() {
        let t = PathTemplate::parse("/agents/{2}/execute").unwrap();
        assert_eq!(t.max_token(), Some(2));
        assert_eq!(t.render("agent.42.execution.requested"), "/agents/42/execute");
        assert_eq!(t.render("agent.a/b?c.execution"), "/agents/a%2Fb%3Fc/execute");
        assert!(PathTemplate::parse("/x/{0}").is_err());
        assert!(PathTemplate::parse("/x/{name}").is_err());
    }
}
