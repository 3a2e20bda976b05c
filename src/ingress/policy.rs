//! The outcome policy of JetStream deliveries, as pure functions: an attempt's result,
//! its delivery count, the consumer's `max_deliver` and the route's `backoff` decide
//! between ack, a delayed nak and a dead letter. Retries belong to JetStream: a nak with a
//! delay is the only retry there is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;

use crate::dlq::Reason;

/// What one HTTP call to the app came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The app answered with this status.
    Status(StatusCode),
    /// Connection refused, reset, or any other transport failure.
    Unreachable,
    /// No answer within the route's timeout.
    Timeout,
}

/// What to do with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Ack, waiting for the server's confirmation.
    Ack,
    /// Nak, asking the server to redeliver after this delay.
    Nak(Duration),
    /// Publish a dead letter, then term.
    DeadLetter(Reason),
}

/// A route's retry settings, as the consumer has them.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The consumer's `max_deliver`; zero or negative means unlimited.
    pub max_deliver: i64,
    pub backoff: &'a [Duration],
}

/// Retry-After values past this are clamped: a typo'd or hostile header must not park a
/// message for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The cap of the default backoff (used when the route has no `backoff` list).
pub const MAX_DEFAULT_BACKOFF: Duration = Duration::from_secs(60);

/// The outcome policy:
///
/// | attempt | outcome |
/// |---|---|
/// | 2xx | ack |
/// | 408, 429, 5xx, unreachable, timeout | nak after `Retry-After`, else `backoff[delivered-1]` (last repeats) |
/// | the same, on the last delivery | dead letter (`status`, or `app_unreachable`) |
/// | any other status (4xx, and 1xx/3xx which a client cannot act on) | dead letter (`poison`) |
///
/// `delivered` is the message's delivery count (1 on the first delivery); `retry_after`
/// the raw header value; `now` dates HTTP-date Retry-After values.
pub fn outcome_for(attempt: Attempt, retry_after: Option<&str>, delivered: u64, policy: &Policy<'_>, now: SystemTime) -> Outcome {
    let last = policy.max_deliver > 0 && delivered >= policy.max_deliver as u64;
    let reason = match attempt {
        Attempt::Status(s) if s.is_success() => return Outcome::Ack,
        Attempt::Status(s) if is_retryable(s) => Reason::Status,
        Attempt::Status(_) => return Outcome::DeadLetter(Reason::Poison),
        Attempt::Unreachable | Attempt::Timeout => Reason::AppUnreachable,
    };
    if last {
        return Outcome::DeadLetter(reason);
    }
    let delay = match (attempt, retry_after.and_then(|v| parse_retry_after(v, now))) {
        (Attempt::Status(_), Some(d)) => d,
        _ => backoff(policy.backoff, delivered),
    };
    Outcome::Nak(delay)
}

/// 408, 429 and 5xx: the failures that a later attempt may not hit.
pub fn is_retryable(s: StatusCode) -> bool {
    s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error()
}

/// The delay before delivery `delivered + 1`: `backoff[delivered-1]`, the last entry
/// repeating; without a list, 1s·2^(delivered-1) capped at [`MAX_DEFAULT_BACKOFF`].
pub fn backoff(list: &[Duration], delivered: u64) -> Duration {
    let n = delivered.max(1) - 1;
    match list {
        [] => Duration::from_secs(1u64 << n.min(6)).min(MAX_DEFAULT_BACKOFF),
        l => l[(n as usize).min(l.len() - 1)],
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date; clamped to
/// [`MAX_RETRY_AFTER`]; a date in the past means "now". `None` when unparseable.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    let d = if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(v.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        parse_http_date(v)?.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`: the only form servers may send (RFC
/// 9110 §5.6.7). The obsolete forms are not worth a dependency.
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 29
        || &b[3..5] != b", "
        || &b[25..] != b" GMT"
        || b[7] != b' '
        || b[11] != b' '
        || b[16] != b' '
        || b[19] != b':'
        || b[22] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let t = &s[r];
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok()).flatten()
    };
    let day = num(5..7)?;
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month = MONTHS.iter().position(|m| *m == &s[8..11])? as u64 + 1;
    let year = num(12..16)?;
    let (hh, mm, ss) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if !(1..=31).contains(&day) || year < 1970 || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let days = days_from_civil(year as i64, month as i64, day as i64);
    let secs = u64::try_from(days).ok()? * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u16) -> Attempt = |c| Attempt::Status(StatusCode::from_u16(c).unwrap());
    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777) // Sun, 06 Nov 1994 08:49:37 GMT
    }

    #[test]
    fn every_row_of_the_policy() {
        let list = [ms(300), ms(600)];
        let p = Policy { max_deliver: 3, backoff: &list };
        assert_eq!(outcome_for(S(200), None, 1, &p, now()), Outcome::Ack);
        assert_eq!(outcome_for(S(204), None, 3, &p, now()), Outcome::Ack);
        for c in [408, 429, 500, 502, 503, 504] {
            assert_eq!(outcome_for(S(c), None, 1, &p, now()), Outcome::Nak(ms(300)), "{c}");
            assert_eq!(outcome_for(S(c), None, 2, &p, now()), Outcome::Nak(ms(600)), "{c}");
            assert_eq!(outcome_for(S(c), None, 3, &p, now()), Outcome::DeadLetter(Reason::Status), "{c}");
        }
        for a in [Attempt::Unreachable, Attempt::Timeout] {
            assert_eq!(outcome_for(a, None, 1, &p, now()), Outcome::Nak(ms(300)));
            assert_eq!(outcome_for(a, Some("5"), 2, &p, now()), Outcome::Nak(ms(600)), "Retry-After needs a response");
            assert_eq!(outcome_for(a, None, 3, &p, now()), Outcome::DeadLetter(Reason::AppUnreachable));
        }
        for c in [400, 401, 403, 404, 409, 410, 413, 422, 302, 101] {
            assert_eq!(outcome_for(S(c), None, 1, &p, now()), Outcome::DeadLetter(Reason::Poison), "{c}");
        }
    }

    #[test]
    fn retry_after_wins_over_backoff() {
        let p = Policy { max_deliver: 5, backoff: &[ms(300)] };
        assert_eq!(outcome_for(S(429), Some("2"), 1, &p, now()), Outcome::Nak(Duration::from_secs(2)));
        assert_eq!(outcome_for(S(503), Some("Sun, 06 Nov 1994 08:49:40 GMT"), 1, &p, now()), Outcome::Nak(Duration::from_secs(3)));
        assert_eq!(outcome_for(S(503), Some("Sun, 06 Nov 1994 08:49:00 GMT"), 1, &p, now()), Outcome::Nak(Duration::ZERO));
        assert_eq!(outcome_for(S(503), Some("soon"), 1, &p, now()), Outcome::Nak(ms(300)));
        assert_eq!(outcome_for(S(503), Some("999999999"), 1, &p, now()), Outcome::Nak(MAX_RETRY_AFTER));
        // …but not over the last delivery.
        assert_eq!(outcome_for(S(503), Some("1"), 5, &p, now()), Outcome::DeadLetter(Reason::Status));
    }

    #[test]
    fn unlimited_deliveries_never_dead_letter_retryable_failures() {
        let p = Policy { max_deliver: -1, backoff: &[] };
        assert_eq!(outcome_for(S(500), None, 1000, &p, now()), Outcome::Nak(MAX_DEFAULT_BACKOFF));
        assert_eq!(outcome_for(S(400), None, 1, &p, now()), Outcome::DeadLetter(Reason::Poison));
    }

    #[test]
    fn backoff_indexes_by_delivery_and_repeats_the_last() {
        let l = [ms(1), ms(2), ms(3)];
        assert_eq!(backoff(&l, 0), ms(1));
        assert_eq!(backoff(&l, 1), ms(1));
        assert_eq!(backoff(&l, 3), ms(3));
        assert_eq!(backoff(&l, 99), ms(3));
        assert_eq!(backoff(&[], 1), Duration::from_secs(1));
        assert_eq!(backoff(&[], 3), Duration::from_secs(4));
        assert_eq!(backoff(&[], 64), MAX_DEFAULT_BACKOFF);
    }

    #[test]
    fn http_dates() {
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(now()));
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(UNIX_EPOCH));
        assert_eq!(parse_http_date("Tue, 29 Feb 2028 23:59:59 GMT"), Some(UNIX_EPOCH + Duration::from_secs(1_835_481_599)));
        for bad in [
            "",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT ",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad:?}");
        }
        assert_eq!(parse_retry_after(" 7 ", now()), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("-1", now()), None);
    }
}
