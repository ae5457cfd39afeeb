//! Server pushback: how long the upstream asked us to wait.
//!
//! Read from, in the answer's headers:
//! - `grpc-retry-pushback-ms` (gRFC A6): milliseconds; a negative or
//!   malformed value means "do not retry";
//! - `retry-after-ms`: milliseconds;
//! - `Retry-After`: seconds or an HTTP-date;
//! - `x-ratelimit-reset-requests` / `x-ratelimit-reset-tokens` (OpenAI
//!   style): Go durations such as `6m0s`, `1.5s`, `12ms`;
//! - `anthropic-ratelimit-*-reset`: RFC 3339 times.
//!
//! When several are present, the longest wait wins: the upstream is
//! saying it cannot serve the request before then.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// What the upstream asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushback {
    /// Nothing: back off as usual.
    None,
    /// Wait at least this long.
    Wait(Duration),
    /// Do not retry.
    Stop,
}

/// Reads the pushback of an answer's headers, relative to `now` for
/// absolute times.
pub fn parse(headers: &HeaderMap, now: SystemTime) -> Pushback {
    if let Some(value) = headers.get("grpc-retry-pushback-ms") {
        return match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
        {
            Some(ms) if ms >= 0 => Pushback::Wait(Duration::from_millis(ms as u64)),
            _ => Pushback::Stop,
        };
    }
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let mut waits = Vec::new();
    if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<u64>().ok()) {
        waits.push(Duration::from_millis(ms));
    }
    if let Some(value) = text("retry-after") {
        if let Ok(seconds) = value.parse::<u64>() {
            waits.push(Duration::from_secs(seconds));
        } else if let Ok(at) = httpdate::parse_http_date(value) {
            waits.push(at.duration_since(now).unwrap_or_default());
        }
    }
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        if let Some(wait) = text(name).and_then(parse_go_duration) {
            waits.push(wait);
        }
    }
    for (name, value) in headers {
        let name = name.as_str();
        if name.starts_with("anthropic-ratelimit-") && name.ends_with("-reset") {
            let at = value
                .to_str()
                .ok()
                .and_then(|v| humantime::parse_rfc3339_weak(v.trim()).ok());
            if let Some(at) = at {
                waits.push(at.duration_since(now).unwrap_or_default());
            }
        }
    }
    waits
        .into_iter()
        .max()
        .map_or(Pushback::None, Pushback::Wait)
}

/// Parses a Go duration: `6m0s`, `1h2m3.5s`, `12ms`, `250us`, `1.5s`.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn now() -> SystemTime {
        httpdate::parse_http_date("Sat, 28 Nov 2026 07:00:00 GMT").unwrap()
    }

    fn secs(s: u64) -> Pushback {
        Pushback::Wait(Duration::from_secs(s))
    }

    #[test]
    fn grpc_pushback() {
        assert_eq!(
            parse(&headers(&[("grpc-retry-pushback-ms", "1500")]), now()),
            Pushback::Wait(Duration::from_millis(1500))
        );
        assert_eq!(
            parse(&headers(&[("grpc-retry-pushback-ms", "-1")]), now()),
            Pushback::Stop
        );
        assert_eq!(
            parse(&headers(&[("grpc-retry-pushback-ms", "soon")]), now()),
            Pushback::Stop
        );
    }

    #[test]
    fn retry_after_seconds_date_and_ms() {
        assert_eq!(parse(&headers(&[("retry-after", "7")]), now()), secs(7));
        assert_eq!(
            parse(
                &headers(&[("retry-after", "Sat, 28 Nov 2026 07:00:30 GMT")]),
                now()
            ),
            secs(30)
        );
        assert_eq!(
            parse(
                &headers(&[("retry-after", "Sat, 28 Nov 2026 06:00:00 GMT")]),
                now()
            ),
            secs(0),
            "a past date: no wait"
        );
        assert_eq!(
            parse(&headers(&[("retry-after-ms", "250")]), now()),
            Pushback::Wait(Duration::from_millis(250))
        );
        assert_eq!(
            parse(&headers(&[("retry-after", "whenever")]), now()),
            Pushback::None
        );
        assert_eq!(parse(&headers(&[]), now()), Pushback::None);
    }

    #[test]
    fn llm_provider_reset_headers() {
        let h = headers(&[
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ]);
        assert_eq!(parse(&h, now()), secs(360), "the longer wait wins");
        let h = headers(&[
            ("anthropic-ratelimit-requests-reset", "2026-11-28T07:00:05Z"),
            ("anthropic-ratelimit-tokens-reset", "2026-11-28T07:00:12Z"),
        ]);
        assert_eq!(parse(&h, now()), secs(12));
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_go_duration("20us"), Some(Duration::from_micros(20)));
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5 parsecs"), None);
        assert_eq!(parse_go_duration("s"), None);
    }
}
