//! Expired deadlines answered as `DEADLINE_EXCEEDED`, as grpc-go's server
//! answers them.
//!
//! tonic's server enforces a call's `grpc-timeout` itself and answers
//! `CANCELLED: Timeout expired` when it passes, so an alert on
//! `DEADLINE_EXCEEDED` misses every call the server's timer ended first.
//! tonic's timeout sits outside every layer a server adds, and it polls
//! the call before its own timer: this layer ends the call at the same
//! deadline, one timer tick (1 ms) earlier so that it fires no later than
//! tonic's, and answers `DEADLINE_EXCEEDED` (the handler is dropped, as
//! tonic would drop it). The server's clock starts after the client's, so
//! answering a tick early still answers after the client's deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::Sleep;

use crate::time::TIMER_TICK;

/// The `grpc-timeout` layer of [`builder`](super::builder): answers a call
/// whose deadline passed with `DEADLINE_EXCEEDED`, as grpc-go's server does,
/// where tonic's own timer answers `CANCELLED`. tonic's timeout sits outside
/// every layer a server adds and polls the call before its own timer, so
/// this layer ends the call one timer tick (1 ms) before tonic's deadline;
/// the handler is dropped, as tonic would drop it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline(inner)
    }
}

/// Answers a call whose `grpc-timeout` passed with `DEADLINE_EXCEEDED`.
/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S>(S);

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timer = crate::balancer::grpc_timeout(request.headers()).map(|t| {
            let now = tokio::time::Instant::now();
            Box::pin(tokio::time::sleep_until(crate::time::deadline_after(
                now,
                t.saturating_sub(TIMER_TICK),
            )))
        });
        DeadlineFuture {
            inner: Box::pin(self.0.call(request)),
            timer,
        }
    }
}

/// The future of [`Deadline`].
pub struct DeadlineFuture<F> {
    inner: Pin<Box<F>>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<F> std::fmt::Debug for DeadlineFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineFuture").finish_non_exhaustive()
    }
}

impl<F, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if let Poll::Ready(r) = self.inner.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if let Some(timer) = self.timer.as_mut() {
            std::task::ready!(timer.as_mut().poll(cx));
            let status = tonic::Status::deadline_exceeded("deadline exceeded on the server");
            return Poll::Ready(Ok(status.into_http()));
        }
        Poll::Pending
    }
}
