//! A call's deadline, enforced on the client side.
//!
//! gRPC carries the deadline in the `grpc-timeout` header
//! (`Request::set_timeout` writes it). tonic's `Channel` enforces it locally
//! with its `GrpcTimeout` layer, but only until the response headers arrive;
//! a server that sends headers and then stalls holds the call. Here the same
//! deadline also bounds the wait for an endpoint and the response body, so
//! nothing in the balancer holds a call past it.
//!
//! The response body's share of it lives in [`super::body`].
//!
//! Parsing follows tonic (`transport/service/grpc_timeout.rs`) and the gRPC
//! HTTP/2 spec: at most 8 ASCII digits and a unit (`H M S m u n`); an invalid
//! header is ignored, as tonic does.

use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

/// A name made once: looking a header up by `&str` parses the name on
/// every call.
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The largest value the header can carry: 8 digits.
const MAX_DIGITS: u64 = 99_999_999;

/// The timeout a request carries in its `grpc-timeout` header, if valid.
pub(crate) fn from_header(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `timeout` as a `grpc-timeout` value: the finest unit whose count fits in
/// 8 digits, rounded up, so the server's deadline is never shorter than the
/// one the client enforces.
pub(crate) fn to_header(timeout: Duration) -> HeaderValue {
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let nanos = timeout.as_nanos();
    for (per, unit) in units {
        let count = nanos.div_ceil(per);
        if count <= u128::from(MAX_DIGITS) {
            return header_value(count, unit);
        }
    }
    header_value(u128::from(MAX_DIGITS), 'H')
}

fn header_value(count: u128, unit: char) -> HeaderValue {
    // Digits and an ASCII letter: always a valid header value.
    HeaderValue::from_str(&format!("{count}{unit}"))
        .unwrap_or_else(|_| HeaderValue::from_static("99999999H"))
}

/// The deadline of a call that starts `now`: the earlier of the request's own
/// `grpc-timeout` and `default` (the balancer's `call_timeout`). When the
/// default is the earlier one, the header is rewritten so the server stops
/// working on the call at the same moment the client gives up on it.
pub(crate) fn apply(
    now: Instant,
    headers: &mut http::HeaderMap,
    default: Option<Duration>,
) -> Option<Instant> {
    let own = from_header(headers);
    let timeout = match (own, default) {
        (Some(a), Some(b)) if b < a => {
            headers.insert(GRPC_TIMEOUT, to_header(b));
            b
        }
        (None, Some(b)) => {
            headers.insert(GRPC_TIMEOUT, to_header(b));
            b
        }
        (Some(a), _) => a,
        (None, None) => return None,
    };
    Some(crate::time::deadline_after(now, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_rejects_the_rest() {
        let parse = |s: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(GRPC_TIMEOUT, HeaderValue::from_static(s));
            from_header(&h)
        };
        assert_eq!(parse("3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("7S"), Some(Duration::from_secs(7)));
        assert_eq!(parse("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "1x", "-1m", "123456789m", "1.5S", " 1S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn encodes_in_eight_digits_without_shortening() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_millis(200),
            Duration::from_secs(99),
            Duration::from_secs(100),
            Duration::from_secs(86_400 * 365),
            Duration::MAX,
        ] {
            let v = to_header(d);
            let mut h = http::HeaderMap::new();
            h.insert(GRPC_TIMEOUT, v.clone());
            let back = from_header(&h).unwrap_or_else(|| panic!("{v:?} does not parse"));
            assert!(
                back >= d.min(Duration::from_secs(MAX_DIGITS * 3600)),
                "{d:?} -> {v:?}"
            );
        }
        assert_eq!(to_header(Duration::from_millis(200)), "200000u");
        assert_eq!(to_header(Duration::from_secs(1)), "1000000u");
    }

    #[test]
    fn the_earlier_deadline_wins_and_reaches_the_server() {
        let now = Instant::now();
        let mut h = http::HeaderMap::new();
        assert_eq!(apply(now, &mut h, None), None);
        assert!(h.get(GRPC_TIMEOUT).is_none());

        let d = apply(now, &mut h, Some(Duration::from_secs(2)));
        assert_eq!(d, Some(now + Duration::from_secs(2)));
        assert_eq!(from_header(&h), Some(Duration::from_secs(2)));

        h.insert(GRPC_TIMEOUT, HeaderValue::from_static("300m"));
        let d = apply(now, &mut h, Some(Duration::from_secs(2)));
        assert_eq!(d, Some(now + Duration::from_millis(300)));
        assert_eq!(from_header(&h), Some(Duration::from_millis(300)));

        assert!(apply(now, &mut h, Some(Duration::MAX)).is_some());
    }
}
