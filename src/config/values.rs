//! Parsers for the value syntaxes the routing file (and the command line) accepts:
//! durations, sizes, http:// URLs, and `host:port` splitting.

use std::num::ParseIntError;
use std::time::Duration;

/// A value that does not parse; the text names the input, so a diagnostic can quote it.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    // The cause stays in the text too: diagnostics print only the top-level message.
    #[error("{input:?} is not a duration like \"5s\" or \"250ms\" ({source})")]
    Duration {
        input: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("{input:?} is not a size like \"1MiB\"")]
    SizeNumber {
        input: String,
        #[source]
        source: ParseIntError,
    },
    #[error("{input:?} has an unknown unit; use B, KiB, MiB, GiB, KB, MB or GB")]
    SizeUnit { input: String },
    #[error("{input:?} is too large")]
    SizeTooLarge { input: String },
    #[error("{input:?} is not a URL ({source})")]
    Url {
        input: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("{input:?} must be an http:// URL")]
    UrlNotHttp { input: String },
    #[error("{input:?} has no host")]
    UrlWithoutHost { input: String },
    #[error("server {input:?} must be nats://, tls://, ws:// or wss://")]
    ServerScheme { input: String },
}

/// A NATS server URL as `[nats] servers` takes it: a known scheme, or none (nats://).
/// The environment and command-line overrides are checked with it too.
pub fn parse_server_url(s: &str) -> Result<String, ValueError> {
    let known_scheme = ["nats://", "tls://", "ws://", "wss://"].iter().any(|scheme| s.starts_with(scheme));
    if s.trim().is_empty() || (!known_scheme && s.contains("://")) {
        return Err(ValueError::ServerScheme { input: s.to_owned() });
    }
    Ok(s.to_owned())
}

/// Parses `5s`, `250ms`, `2m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    humantime::parse_duration(s.trim()).map_err(|source| ValueError::Duration { input: s.to_owned(), source })
}

/// Parses `1MiB`, `512KiB`, `64KB`, `1048576`.
pub fn parse_size(s: &str) -> Result<usize, ValueError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num.parse().map_err(|source| ValueError::SizeNumber { input: s.to_owned(), source })?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => return Err(ValueError::SizeUnit { input: s.to_owned() }),
    };
    n.checked_mul(mult).ok_or_else(|| ValueError::SizeTooLarge { input: s.to_owned() })
}

/// Parses an absolute `http://host[:port]/…` URL (the app and `http`-mode upstreams).
pub fn parse_http_url(s: &str) -> Result<http::Uri, ValueError> {
    let uri: http::Uri = s.parse().map_err(|source| ValueError::Url { input: s.to_owned(), source })?;
    if uri.scheme_str() != Some("http") {
        return Err(ValueError::UrlNotHttp { input: s.to_owned() });
    }
    if uri.authority().is_none() {
        return Err(ValueError::UrlWithoutHost { input: s.to_owned() });
    }
    Ok(uri)
}

/// `host:port` → `host`; keeps bracketed IPv6 literals whole.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal; without its ']' (a malformed Host header) keep it whole. The
        // old slice panicked there (found by fuzzing).
        return host.find(']').map(|end| &host[..=end]).unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("64KB").unwrap(), 64_000);
        assert_eq!(parse_size("17").unwrap(), 17);
        assert!(parse_size("1XB").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("svc:80"), "svc");
        assert_eq!(strip_port("svc"), "svc");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}

/// `text` with the userinfo of every URL in it (`nats://user:pass@host` → `nats://***@host`)
/// masked: server URLs may carry credentials, and errors and logs must never print them.
pub fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the first '/', ',', quote or whitespace; userinfo before its last '@'.
        let end = tail.find(|c: char| c == '/' || c == ',' || c == '"' || c == '\'' || c.is_whitespace()).unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod redact_tests {
    use super::redact_userinfo;

    #[test]
    fn userinfo_is_masked_wherever_a_url_appears() {
        assert_eq!(redact_userinfo("nats://user:pass@127.0.0.1:1"), "nats://***@127.0.0.1:1");
        assert_eq!(
            redact_userinfo("at nats://a:b@h1:4222, tls://tok@h2/x and \"ws://c:d@h3\""),
            "at nats://***@h1:4222, tls://***@h2/x and \"ws://***@h3\""
        );
        assert_eq!(redact_userinfo("nats://u:p@ss@h"), "nats://***@h");
        assert_eq!(redact_userinfo("nats://127.0.0.1:4222 ok"), "nats://127.0.0.1:4222 ok");
    }
}
