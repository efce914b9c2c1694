//! The response body of a call: it keeps the call counted on its endpoint
//! until the body ends, enforces the call's deadline while it streams, and
//! reads the gRPC status from the trailers, where a streaming call (and any
//! call whose status is not in the headers) carries it. A gRPC failure is an
//! HTTP 200; without reading the trailers a failing backend looks healthy.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::classify::{cancelled_by_deadline, to_deadline_exceeded, transport_failure};
use super::replay::Abort;
use crate::balancer::error::deadline_exceeded;
use crate::balancer::pool::{InFlight, Outcome};
use crate::metrics::{AttemptRecord, CallRecord};

/// What a [`CallBody`] holds for its call while the body streams.
pub(crate) trait Tracked {
    /// The call ended with this gRPC status (`None`: the stream failed)
    /// at `now`.
    fn ended(&mut self, status: Option<tonic::Code>, now: tokio::time::Instant);
    /// The deadline passed before the body ended.
    fn expired(self);
    /// The endpoint's address, for errors that name it.
    fn addr(&self) -> &str;
    /// The call's trailers arrived (a load report may be in them).
    fn trailers(&mut self, _trailers: &http::HeaderMap) {}
}

impl Tracked for InFlight {
    fn ended(&mut self, status: Option<tonic::Code>, now: tokio::time::Instant) {
        let outcome = match status {
            Some(code) => Outcome::of(code, self.policy()),
            None => Outcome::Failure,
        };
        self.settle_at(outcome, now);
    }

    fn expired(self) {
        self.timed_out();
    }

    fn addr(&self) -> &str {
        InFlight::addr(self)
    }

    fn trailers(&mut self, trailers: &http::HeaderMap) {
        self.load_report(trailers);
    }
}

/// Made once: a lookup by `&str` parses the name each time (twice a call).
pub(crate) const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The gRPC status in `headers` (a trailers-only response, or trailers).
pub(crate) fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get(GRPC_STATUS)?.to_str().ok()?;
    Some(tonic::Code::from(value.trim().parse::<i32>().unwrap_or(2)))
}

/// A response body that keeps its call counted as in flight on its
/// endpoint until the body ends, and fails with `DeadlineExceeded` when the
/// call's deadline passes before it does (a server that sent headers and
/// then stalled).
pub(crate) struct CallBody<B, T = InFlight> {
    /// Dropped as soon as the deadline ends the call, which resets the
    /// stream (h2 does when both halves are gone; `abort` sees to the
    /// request half); `None` from then on.
    inner: Option<B>,
    timer: Option<Pin<Box<Sleep>>>,
    in_flight: Option<T>,
    /// The call's final status and its attempt's, for metrics.
    record: (CallRecord, AttemptRecord),
    /// Ends the request body once the call is over (trailers read,
    /// deadline passed, stream failed, or this body dropped), so the
    /// stream is reset even while the caller holds its request sender.
    abort: Option<Abort>,
}

impl<B, T> CallBody<B, T> {
    pub(crate) fn new(
        inner: B,
        timer: Option<Pin<Box<Sleep>>>,
        in_flight: T,
        record: (CallRecord, AttemptRecord),
        abort: Option<Abort>,
    ) -> Self {
        Self {
            inner: Some(inner),
            timer,
            in_flight: Some(in_flight),
            record,
            abort,
        }
    }
}

impl<B, T: Tracked> CallBody<B, T> {
    /// The call (and the attempt it took) ended with `code`.
    fn finish(&mut self, code: tonic::Code, now: tokio::time::Instant) {
        self.record.0.finish_at(code, Some(now));
        self.record.1.finish_at(code, Some(now));
    }

    /// The deadline ended the call: the stream goes, the wait is recorded.
    fn expire(&mut self) -> Box<dyn std::error::Error + Send + Sync> {
        self.abort.take();
        self.inner.take();
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.expired();
        }
        self.finish(tonic::Code::DeadlineExceeded, tokio::time::Instant::now());
        Box::new(deadline_exceeded(format_args!(
            "while the response was streaming"
        )))
    }

    /// Whether the call's deadline has passed.
    fn past_deadline(&self) -> bool {
        self.timer
            .as_ref()
            .is_some_and(|t| tokio::time::Instant::now() >= t.deadline())
    }
}

impl<B, T> Body for CallBody<B, T>
where
    T: Tracked + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            return Poll::Ready(match frame {
                Some(Ok(mut f)) => {
                    if f.is_trailers() {
                        let deadline = this.timer.as_ref().map(|t| t.deadline());
                        let code = f.trailers_mut().map_or(tonic::Code::Unknown, |trailers| {
                            match status_of(trailers).unwrap_or(tonic::Code::Unknown) {
                                code if cancelled_by_deadline(code, deadline) => {
                                    to_deadline_exceeded(trailers);
                                    tonic::Code::DeadlineExceeded
                                }
                                code => code,
                            }
                        });
                        // One clock read ends the call, its attempt and its
                        // account on the endpoint.
                        let now = tokio::time::Instant::now();
                        this.finish(code, now);
                        // The trailers end the call: it leaves the endpoint's
                        // load now, not when the caller drops the stream.
                        if let Some(mut call) = this.in_flight.take() {
                            if let Some(trailers) = f.trailers_ref() {
                                call.trailers(trailers);
                            }
                            call.ended(Some(code), now);
                        }
                        this.abort.take();
                    }
                    Some(Ok(f))
                }
                // The request body ended itself at the deadline and the
                // stream was reset for it (see `replay`).
                Some(Err(_)) if this.in_flight.is_some() && this.past_deadline() => {
                    Some(Err(this.expire()))
                }
                Some(Err(e)) => {
                    let e: Self::Error = e.into();
                    this.abort.take();
                    Some(Err(match this.in_flight.take() {
                        // A lost connection reads UNAVAILABLE, naming the
                        // endpoint (see `classify`).
                        Some(mut call) => {
                            let now = tokio::time::Instant::now();
                            call.ended(None, now);
                            let status = transport_failure(call.addr(), &*e);
                            this.finish(status.code(), now);
                            Box::new(status)
                        }
                        None => e,
                    }))
                }
                None => {
                    // Without trailers: tonic reports the missing status.
                    this.finish(tonic::Code::Internal, tokio::time::Instant::now());
                    this.in_flight.take();
                    this.abort.take();
                    None
                }
            });
        }
        if let Some(timer) = this.timer.as_mut() {
            ready!(timer.as_mut().poll(cx));
            return Poll::Ready(Some(Err(this.expire())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::time::Instant;

    /// 1 once expired, 2 once dropped without expiring, 3 failed stream,
    /// 10 + code once ended with a status.
    struct Probe(Arc<AtomicU8>);

    impl Tracked for Probe {
        fn ended(&mut self, status: Option<tonic::Code>, _: Instant) {
            let v = status.map_or(3, |c| 10 + c as u8);
            self.0.store(v, Ordering::SeqCst);
        }

        fn expired(self) {
            self.0.store(1, Ordering::SeqCst);
            std::mem::forget(self);
        }

        fn addr(&self) -> &str {
            "probe:1"
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            if self.0.load(Ordering::SeqCst) == 0 {
                self.0.store(2, Ordering::SeqCst);
            }
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

    /// A body that ends with trailers carrying `grpc-status: status`.
    struct Ends(Option<&'static str>);

    impl Body for Ends {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.take().map(|status| {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static(status));
                trailers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static("Timeout expired"),
                );
                Ok(Frame::trailers(trailers))
            }))
        }
    }

    /// The status in the trailers a body ends with, and what it recorded.
    async fn ended_with(status: &'static str, deadline_in: Duration) -> (String, u8) {
        let state = Arc::new(AtomicU8::new(0));
        let timer = Box::pin(tokio::time::sleep_until(Instant::now() + deadline_in));
        let mut body = CallBody::new(
            Ends(Some(status)),
            Some(timer),
            Probe(state.clone()),
            (CallRecord::none(), AttemptRecord::none()),
            None,
        );
        // The deadline passes before the trailers are read, as when the
        // server's timer beat the client's by a tick.
        tokio::time::advance(Duration::from_millis(50)).await;
        let frame = next(&mut body).await.unwrap().unwrap();
        let trailers = frame.into_trailers().unwrap();
        let code = trailers["grpc-status"].to_str().unwrap().to_owned();
        (code, state.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_from_the_servers_timer_reads_deadline_exceeded() {
        // The deadline (20 ms) passed: tonic's server said CANCELLED for it.
        let (code, state) = ended_with("1", Duration::from_millis(20)).await;
        assert_eq!(code, "4");
        assert_eq!(state, 10 + tonic::Code::DeadlineExceeded as u8);
        // The deadline is far: a CANCELLED is the server's own word.
        let (code, state) = ended_with("1", Duration::from_secs(5)).await;
        assert_eq!(code, "1");
        assert_eq!(state, 10 + tonic::Code::Cancelled as u8);
        // Other codes are never touched.
        let (code, _) = ended_with("14", Duration::from_millis(20)).await;
        assert_eq!(code, "14");
    }

    async fn next<B: Body + Unpin>(body: &mut B) -> Option<Result<Frame<B::Data>, B::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_the_deadline_and_records_the_wait() {
        let state = Arc::new(AtomicU8::new(0));
        let start = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(start + Duration::from_millis(300)));
        let mut body = CallBody::new(
            Stalled(false),
            Some(timer),
            Probe(state.clone()),
            (CallRecord::none(), AttemptRecord::none()),
            None,
        );
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
        let mut body = CallBody::new(
            Stalled(false),
            None,
            Probe(state.clone()),
            (CallRecord::none(), AttemptRecord::none()),
            None,
        );
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

    /// Data, then trailers with `grpc-status: 14`.
    struct Failing(u8);

    impl Body for Failing {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0 += 1;
            Poll::Ready(match self.0 {
                1 => Some(Ok(Frame::data(Bytes::from_static(b"x")))),
                2 => {
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", http::HeaderValue::from_static("14"));
                    Some(Ok(Frame::trailers(t)))
                }
                _ => None,
            })
        }
    }

    #[tokio::test]
    async fn a_status_in_the_trailers_is_reported() {
        let state = Arc::new(AtomicU8::new(0));
        let mut body = CallBody::new(
            Failing(0),
            None,
            Probe(state.clone()),
            (CallRecord::none(), AttemptRecord::none()),
            None,
        );
        while next(&mut body).await.is_some() {}
        assert_eq!(
            state.load(Ordering::SeqCst),
            10 + tonic::Code::Unavailable as u8
        );
    }
}
