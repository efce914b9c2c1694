//! The request body of a call that may be sent again: gRFC A6's replay
//! buffer, in the manner of linkerd's `ReplayBody`.
//!
//! Each attempt gets a [`ReplayBody`]: it first yields what earlier
//! attempts already read from the caller's body, then reads on from the
//! caller's body itself, keeping a copy. Attempts are sequential, so one
//! body at a time reads the caller's; a later attempt whose predecessor
//! still holds it (hyper may still be sending it) waits until it is
//! dropped.
//!
//! The copy is bounded per call (default 256 KiB, as grpc-go) and per
//! balancer (all calls together): a call whose body outgrows either stops
//! buffering and can no longer be retried, as A6 says; its current attempt
//! goes on unharmed. A body that fails cannot be replayed either.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

type Inner = tonic::body::Body;

/// Limits on what is kept for replay.
#[derive(Debug, Clone)]
pub(crate) struct ReplayLimits {
    /// Bytes one call may keep.
    pub(crate) per_call: usize,
    /// Bytes all calls of a balancer may keep together, and what they keep
    /// now.
    pub(crate) total: usize,
    pub(crate) in_use: Arc<AtomicUsize>,
}

/// One call's request body, shared by its attempts.
pub(crate) struct Replay {
    state: Arc<Mutex<State>>,
}

struct State {
    /// The caller's body, while no attempt reads it (`None` at its end).
    inner: Option<Inner>,
    /// Data read so far, while it fits.
    frames: Vec<Bytes>,
    buffered: usize,
    trailers: Option<HeaderMap>,
    /// The caller's body has ended.
    ended: bool,
    /// Outgrew a limit, or the caller's body failed: no more replays.
    spent: bool,
    /// The call settled on an attempt (the call layer dropped its
    /// [`Replay`]): what that attempt still reads is not kept, so a stream
    /// that lives for hours holds only what it sent before its response.
    committed: bool,
    /// An attempt waiting for the caller's body to be handed back.
    waiter: Option<Waker>,
    limits: ReplayLimits,
}

impl Drop for State {
    fn drop(&mut self) {
        self.limits
            .in_use
            .fetch_sub(self.buffered, Ordering::Relaxed);
    }
}

impl Replay {
    pub(crate) fn new(body: Inner, limits: ReplayLimits) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                inner: Some(body),
                frames: Vec::new(),
                buffered: 0,
                trailers: None,
                ended: false,
                spent: false,
                committed: false,
                waiter: None,
                limits,
            })),
        }
    }

    /// Splits `request` into the head every attempt copies and its body
    /// kept for replay.
    pub(crate) fn split(
        request: http::Request<Inner>,
        limits: &ReplayLimits,
    ) -> (http::request::Parts, Self) {
        let (parts, body) = request.into_parts();
        (parts, Self::new(body, limits.clone()))
    }

    /// Whether another attempt can send the whole body again.
    pub(crate) fn can_replay(&self) -> bool {
        !lock(&self.state).spent
    }

    /// The next attempt's request: the call's `parts` with a replayed body.
    pub(crate) fn request(&self, parts: &http::request::Parts) -> http::Request<Inner> {
        let mut request = http::Request::new(Inner::new(self.body()));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.version_mut() = parts.version;
        *request.headers_mut() = parts.headers.clone();
        *request.extensions_mut() = parts.extensions.clone();
        request
    }

    /// A body for the next attempt.
    pub(crate) fn body(&self) -> ReplayBody {
        ReplayBody {
            state: self.state.clone(),
            next: 0,
            inner: None,
            trailers_sent: false,
        }
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        lock(&self.state).committed = true;
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// One attempt's request body. See the [module docs](self).
pub(crate) struct ReplayBody {
    state: Arc<Mutex<State>>,
    /// The next buffered frame to yield.
    next: usize,
    /// The caller's body, while this attempt reads it.
    inner: Option<Inner>,
    trailers_sent: bool,
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            let mut state = lock(&self.state);
            state.inner = Some(inner);
            if let Some(w) = state.waiter.take() {
                w.wake();
            }
        }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if this.inner.is_none() {
            let mut state = lock(&this.state);
            if state.spent {
                // An earlier attempt, still sending, read past what fits:
                // this one cannot send the whole body again.
                return Poll::Ready(Some(Err(tonic::Status::unavailable(
                    "the request body outgrew the replay buffer while an earlier attempt sent it",
                ))));
            }
            if let Some(frame) = state.frames.get(this.next) {
                this.next += 1;
                return Poll::Ready(Some(Ok(Frame::data(frame.clone()))));
            }
            if state.ended {
                if this.trailers_sent {
                    return Poll::Ready(None);
                }
                this.trailers_sent = true;
                return Poll::Ready(state.trailers.clone().map(|t| Ok(Frame::trailers(t))));
            }
            match state.inner.take() {
                Some(inner) => this.inner = Some(inner),
                None => {
                    // The previous attempt still holds it.
                    state.waiter = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Pending;
        };
        let polled = Pin::new(inner).poll_frame(cx);
        let Poll::Ready(frame) = polled else {
            return Poll::Pending;
        };
        let mut state = lock(&this.state);
        match frame {
            None => {
                state.ended = true;
                this.trailers_sent = true;
                this.inner = None;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                state.spent = true;
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    state.keep(data);
                    this.next = state.frames.len();
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl State {
    /// Keeps a copy of `data` for later attempts, while it fits.
    fn keep(&mut self, data: &Bytes) {
        if self.spent || self.committed {
            return;
        }
        let len = data.len();
        let fits_call = self.buffered + len <= self.limits.per_call;
        let fits_all = fits_call
            && self
                .limits
                .in_use
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                    (used + len <= self.limits.total).then_some(used + len)
                })
                .is_ok();
        if fits_all {
            self.frames.push(data.clone());
            self.buffered += len;
        } else {
            tracing::debug!(
                buffered = self.buffered,
                "request body outgrew the replay buffer; the call will not be retried"
            );
            self.spent = true;
            self.limits
                .in_use
                .fetch_sub(self.buffered, Ordering::Relaxed);
            self.buffered = 0;
            self.frames = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A caller's body: frames, `None` = not ready yet (wakes on the next
    /// poll), then the end.
    struct Scripted(VecDeque<Option<Frame<Bytes>>>);

    impl Body for Scripted {
        type Data = Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            match self.0.pop_front() {
                Some(Some(f)) => Poll::Ready(Some(Ok(f))),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    fn limits(per_call: usize, total: usize) -> ReplayLimits {
        ReplayLimits {
            per_call,
            total,
            in_use: Arc::default(),
        }
    }

    fn body(frames: Vec<Option<&'static str>>, trailers: bool) -> Inner {
        let mut q: VecDeque<_> = frames
            .into_iter()
            .map(|f| f.map(|s| Frame::data(Bytes::from_static(s.as_bytes()))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-t", http::HeaderValue::from_static("1"));
            q.push_back(Some(Frame::trailers(t)));
        }
        Inner::new(Scripted(q))
    }

    /// Everything a body yields: data as text, trailers as "T".
    async fn drain(mut b: ReplayBody) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut b).poll_frame(cx)).await {
            let f = f.unwrap();
            match f.into_data() {
                Ok(d) => out.push(String::from_utf8(d.to_vec()).unwrap()),
                Err(f) => {
                    assert!(f.is_trailers());
                    out.push("T".into());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn every_attempt_sends_the_same_body() {
        let r = Replay::new(
            body(vec![Some("a"), None, Some("b")], true),
            limits(1024, 1 << 20),
        );
        let first = drain(r.body()).await;
        assert_eq!(first, ["a", "b", "T"]);
        assert!(r.can_replay());
        assert_eq!(drain(r.body()).await, first);
        assert_eq!(drain(r.body()).await, first);
    }

    #[tokio::test]
    async fn a_second_attempt_replays_then_reads_on_where_the_first_stopped() {
        let r = Replay::new(
            body(vec![Some("a"), Some("b"), Some("c")], false),
            limits(1024, 1 << 20),
        );
        let mut first = r.body();
        let f = std::future::poll_fn(|cx| Pin::new(&mut first).poll_frame(cx)).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "a");
        drop(first); // the first attempt failed after sending "a"
        assert_eq!(drain(r.body()).await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_body_that_outgrows_a_limit_is_sent_once_and_never_again() {
        let in_use = limits(3, 1 << 20);
        let r = Replay::new(body(vec![Some("ab"), Some("cd")], false), in_use.clone());
        assert_eq!(
            drain(r.body()).await,
            ["ab", "cd"],
            "the attempt itself is unharmed"
        );
        assert!(!r.can_replay());
        assert_eq!(
            in_use.in_use.load(Ordering::Relaxed),
            0,
            "its copy is released"
        );
        // The balancer-wide limit counts every call's copy.
        let shared = limits(1024, 3);
        let a = Replay::new(body(vec![Some("ab")], false), shared.clone());
        drain(a.body()).await;
        let b = Replay::new(body(vec![Some("cd")], false), shared.clone());
        drain(b.body()).await;
        assert!(a.can_replay() && !b.can_replay());
        drop(a);
        assert_eq!(shared.in_use.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_committed_call_keeps_nothing_more_of_what_it_sends() {
        let l = limits(1024, 1 << 20);
        let r = Replay::new(
            body(vec![Some("ab"), Some("cd"), Some("ef")], false),
            l.clone(),
        );
        let mut attempt = r.body();
        let f = std::future::poll_fn(|cx| Pin::new(&mut attempt).poll_frame(cx)).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "ab");
        // Response headers: the call layer lets go of its Replay, and the
        // stream goes on sending.
        drop(r);
        for expected in ["cd", "ef"] {
            let f = std::future::poll_fn(|cx| Pin::new(&mut attempt).poll_frame(cx)).await;
            assert_eq!(f.unwrap().unwrap().into_data().unwrap(), expected);
        }
        assert_eq!(l.in_use.load(Ordering::Relaxed), 2, "only what came before");
        drop(attempt);
        assert_eq!(
            l.in_use.load(Ordering::Relaxed),
            0,
            "released with the stream"
        );
    }

    #[tokio::test]
    async fn an_attempt_waits_while_the_previous_one_still_holds_the_body() {
        let r = Replay::new(
            body(vec![Some("a"), Some("b")], false),
            limits(1024, 1 << 20),
        );
        let mut first = r.body();
        let f = std::future::poll_fn(|cx| Pin::new(&mut first).poll_frame(cx)).await;
        assert!(f.is_some());
        let mut second = r.body();
        // It replays "a", then must wait for the caller's body.
        let f = std::future::poll_fn(|cx| Pin::new(&mut second).poll_frame(cx)).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "a");
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            std::future::poll_fn(|cx| Pin::new(&mut second).poll_frame(cx)),
        )
        .await;
        assert!(waiting.is_err(), "the first attempt still holds the body");
        drop(first);
        assert_eq!(drain(second).await, ["b"]);
    }
}
