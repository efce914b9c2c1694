//! A call's deadline, enforced on the client side.
//!
//! gRPC carries the deadline in the `grpc-timeout` header
//! (`Request::set_timeout` writes it). tonic's `Channel` enforces it locally
//! with its `GrpcTimeout` layer, but only until the response headers arrive;
//! a server that sends headers and then stalls holds the call. Here the same
//! deadline also bounds the wait for an endpoint and the response body, so
//! nothing in the balancer holds a call past it.
//!
//! Parsing follows tonic (`transport/service/grpc_timeout.rs`) and the gRPC
//! HTTP/2 spec: at most 8 ASCII digits and a unit (`H M S m u n`); an invalid
//! header is ignored, as tonic does.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::endpoint::InFlight;

/// What a [`CallBody`] holds for its call while the body streams.
pub(crate) trait Tracked {
    /// The deadline passed before the body ended.
    fn expired(self);
}

impl Tracked for InFlight {
    fn expired(self) {
        self.timed_out();
    }
}

const GRPC_TIMEOUT: &str = "grpc-timeout";

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

/// The error a call fails with when its deadline passes.
pub(crate) fn exceeded(what: std::fmt::Arguments<'_>) -> tonic::Status {
    tonic::Status::deadline_exceeded(format!("deadline exceeded {what}"))
}

pin_project_lite::pin_project! {
    /// A response body that keeps its call counted as in flight on its
    /// endpoint until the body ends, and fails with `DeadlineExceeded` when
    /// the call's deadline passes before it does (a server that sent headers
    /// and then stalled).
    pub(crate) struct CallBody<B, T = InFlight> {
        #[pin]
        inner: B,
        timer: Option<Pin<Box<Sleep>>>,
        in_flight: Option<T>,
        expired: bool,
    }
}

impl<B, T> CallBody<B, T> {
    pub(crate) fn new(inner: B, timer: Option<Pin<Box<Sleep>>>, in_flight: T) -> Self {
        Self {
            inner,
            timer,
            in_flight: Some(in_flight),
            expired: false,
        }
    }
}

impl<B, T> Body for CallBody<B, T>
where
    T: Tracked,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if frame.is_none() || matches!(&frame, Some(Err(_))) {
                this.in_flight.take();
            }
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        if let Some(timer) = this.timer.as_mut() {
            ready!(timer.as_mut().poll(cx));
            *this.expired = true;
            if let Some(in_flight) = this.in_flight.take() {
                in_flight.expired();
            }
            let status = exceeded(format_args!("while the response was streaming"));
            return Poll::Ready(Some(Err(Box::new(status))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;

    /// 1 once expired, 2 once dropped without expiring.
    struct Probe(Arc<AtomicU8>);

    impl Tracked for Probe {
        fn expired(self) {
            self.0.store(1, Ordering::SeqCst);
            std::mem::forget(self);
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.store(2, Ordering::SeqCst);
        }
    }

    /// A body that sends one frame, then nothing: a server that stalled.
    struct Stalled(bool);

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            }
        }
    }

    async fn next<B: Body + Unpin>(body: &mut B) -> Option<Result<Frame<B::Data>, B::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_the_deadline_and_records_the_wait() {
        let state = Arc::new(AtomicU8::new(0));
        let start = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(start + Duration::from_millis(300)));
        let mut body = CallBody::new(Stalled(false), Some(timer), Probe(state.clone()));
        assert!(
            next(&mut body).await.unwrap().is_ok(),
            "frames pass through"
        );
        let err = next(&mut body).await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(state.load(Ordering::SeqCst), 1, "the wait was recorded");
        assert!(next(&mut body).await.is_none(), "then the body ends");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_the_body_waits_and_the_call_ends_with_it() {
        let state = Arc::new(AtomicU8::new(0));
        let mut body = CallBody::new(Stalled(false), None, Probe(state.clone()));
        assert!(next(&mut body).await.is_some());
        let waited = tokio::time::timeout(Duration::from_secs(3600), next(&mut body)).await;
        assert!(waited.is_err(), "no deadline: nothing cuts the body");
        assert_eq!(state.load(Ordering::SeqCst), 0);
        drop(body);
        assert_eq!(
            state.load(Ordering::SeqCst),
            2,
            "dropping the body ends the call"
        );
    }

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
