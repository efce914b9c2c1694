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
//!
//! # Ending an attempt from the response side
//!
//! hyper sends a request body from a task of its own, and keeps the HTTP/2
//! stream open for as long as that task holds the body: a caller that still
//! holds its request sender (a bidi or client stream) would keep the stream,
//! and the server's handler, alive after the call ended on the client —
//! response dropped, deadline passed, trailers read. So each attempt's body
//! comes with an [`Abort`] that the response side fires when its call is
//! over: the body then fails with `CANCEL`, hyper resets the stream
//! (`RST_STREAM CANCEL`, as grpc-go does when a call's context ends), and the
//! caller's body is dropped, so its sender learns the call is over. The body
//! also ends itself at the call's deadline while it waits for the caller, so
//! the reset does not depend on anyone reading the response. A body that
//! never waits (every unary call) pays two atomic operations for this.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

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
    shared: Arc<Shared>,
}

/// What a call's attempts share: the state behind a lock, and the two bit
/// sets (one bit per attempt) that let an [`Abort`] skip the lock when the
/// attempt's body is not waiting.
struct Shared {
    state: Mutex<State>,
    /// Attempts whose call ended on the response side.
    aborted: AtomicU64,
    /// Attempts with a waker in `State::wakers` (changed under the lock).
    parked: AtomicU64,
    /// Attempts handed out so far.
    attempts: AtomicU32,
    /// Attempt bodies alive now.
    bodies: AtomicUsize,
    /// The call's deadline, which a waiting body enforces itself.
    deadline: Option<Instant>,
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
    /// Attempts waiting (for the caller's body, or for another attempt to
    /// hand it back), by attempt bit.
    wakers: Vec<(u64, Waker)>,
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
    pub(crate) fn new(body: Inner, limits: ReplayLimits, deadline: Option<Instant>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    inner: Some(body),
                    frames: Vec::new(),
                    buffered: 0,
                    trailers: None,
                    ended: false,
                    spent: false,
                    committed: false,
                    wakers: Vec::new(),
                    limits,
                }),
                aborted: AtomicU64::new(0),
                parked: AtomicU64::new(0),
                attempts: AtomicU32::new(0),
                bodies: AtomicUsize::new(0),
                deadline,
            }),
        }
    }

    /// Splits `request` into the head every attempt copies and its body
    /// kept for replay.
    pub(crate) fn split(
        request: http::Request<Inner>,
        limits: &ReplayLimits,
        deadline: Option<Instant>,
    ) -> (http::request::Parts, Self) {
        let (parts, body) = request.into_parts();
        (parts, Self::new(body, limits.clone(), deadline))
    }

    /// Whether another attempt can send the whole body again.
    pub(crate) fn can_replay(&self) -> bool {
        !self.shared.lock().spent
    }

    /// The next attempt's request: the call's `parts` with a replayed body,
    /// and what ends that attempt's body from the response side. The first
    /// attempt takes the caller's extensions; later ones go without: below
    /// the balancer only hyper reads a request's extensions (extended
    /// CONNECT, which gRPC does not use), and copying them cost every call
    /// a map and a box.
    pub(crate) fn request(
        &self,
        parts: &mut http::request::Parts,
    ) -> (http::Request<Inner>, Abort) {
        let (body, abort) = self.body();
        let mut request = http::Request::new(Inner::new(body));
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = parts.uri.clone();
        *request.version_mut() = parts.version;
        *request.headers_mut() = parts.headers.clone();
        *request.extensions_mut() = std::mem::take(&mut parts.extensions);
        (request, abort)
    }

    /// A body for the next attempt, and its [`Abort`].
    pub(crate) fn body(&self) -> (ReplayBody, Abort) {
        // A call has at most 5 attempts plus a transparent retry (A6); the
        // last bit is shared by anything past 63, which never happens.
        let n = self.shared.attempts.fetch_add(1, Ordering::Relaxed);
        let bit = 1u64 << n.min(63);
        self.shared.bodies.fetch_add(1, Ordering::Relaxed);
        let body = ReplayBody {
            shared: self.shared.clone(),
            bit,
            next: 0,
            inner: None,
            trailers_sent: false,
            at_end: false,
            peeked: None,
            timer: None,
        };
        let abort = Abort {
            shared: Arc::downgrade(&self.shared),
            bit,
        };
        (body, abort)
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.committed = true;
        // No attempt will read the caller's body again.
        let unread = match self.shared.bodies.load(Ordering::Relaxed) {
            0 => state.inner.take(),
            _ => None,
        };
        drop(state);
        drop(unread);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn aborted(&self, bit: u64) -> bool {
        self.aborted.load(Ordering::SeqCst) & bit != 0
    }

    /// Wakes every waiting attempt: the caller's body was handed back,
    /// ended or failed, or the buffer was spent.
    fn wake_all(&self, state: &mut State) {
        self.parked.store(0, Ordering::SeqCst);
        for (_, w) in state.wakers.drain(..) {
            w.wake();
        }
    }
}

/// Ends one attempt's request body when dropped (see the [module
/// docs](self)): the response side holds it for as long as the attempt's
/// call goes on. It does not keep the call's body or replay buffer alive:
/// a stream that outlives its request keeps neither.
#[must_use = "dropping an Abort ends its attempt's request body"]
pub(crate) struct Abort {
    shared: Weak<Shared>,
    bit: u64,
}

impl Drop for Abort {
    fn drop(&mut self) {
        // Gone: no attempt body is left to end.
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        shared.aborted.fetch_or(self.bit, Ordering::SeqCst);
        // Sequentially consistent with the body's `park`: either it sees
        // the abort, or this sees it parked and wakes it.
        if shared.parked.load(Ordering::SeqCst) & self.bit == 0 {
            return;
        }
        let mut state = shared.lock();
        let woken = state
            .wakers
            .iter()
            .position(|(bit, _)| *bit == self.bit)
            .map(|i| state.wakers.swap_remove(i).1);
        shared.parked.fetch_and(!self.bit, Ordering::SeqCst);
        drop(state);
        if let Some(w) = woken {
            w.wake();
        }
    }
}

/// One attempt's request body. See the [module docs](self).
pub(crate) struct ReplayBody {
    shared: Arc<Shared>,
    /// This attempt's bit in `Shared::aborted` and `Shared::parked`.
    bit: u64,
    /// The next buffered frame to yield.
    next: usize,
    /// The caller's body, while this attempt reads it.
    inner: Option<Inner>,
    trailers_sent: bool,
    /// Nothing follows the frame just yielded: hyper sends it with
    /// `END_STREAM` (see [`ReplayBody::is_end_stream`]).
    at_end: bool,
    /// A frame read from the caller's body while looking for its end,
    /// already accounted for (kept for replay, or the body spent), yielded
    /// next.
    peeked: Option<Result<Frame<Bytes>, tonic::Status>>,
    /// The call's deadline, armed the first time this body waits.
    timer: Option<Pin<Box<Sleep>>>,
}

impl ReplayBody {
    /// Hands the caller's body back for the next attempt, or drops it when
    /// the call is settled and no other attempt is left to read it (its
    /// sender then learns the call is over).
    fn release(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        let mut state = self.shared.lock();
        if state.committed && self.shared.bodies.load(Ordering::Relaxed) == 1 {
            drop(state);
            drop(inner);
            return;
        }
        state.inner = Some(inner);
        // Anyone waiting may take it now.
        self.shared.wake_all(&mut state);
    }

    /// The attempt is over: hyper resets the stream on this error.
    fn cancel(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        self.release();
        let mut status = tonic::Status::cancelled(why);
        status.set_source(Arc::new(h2::Error::from(h2::Reason::CANCEL)));
        Poll::Ready(Some(Err(status)))
    }

    /// Registers to be woken when the attempt is aborted (or the caller's
    /// body handed back), then checks once more for an abort.
    fn park(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(deadline) = self.shared.deadline {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_ready() {
                return self.cancel("the call's deadline passed");
            }
        }
        let mut state = self.shared.lock();
        match state.wakers.iter_mut().find(|(bit, _)| *bit == self.bit) {
            Some((_, w)) => w.clone_from(cx.waker()),
            None => state.wakers.push((self.bit, cx.waker().clone())),
        }
        self.shared.parked.fetch_or(self.bit, Ordering::SeqCst);
        drop(state);
        if self.shared.aborted(self.bit) {
            return self.cancel("the call ended");
        }
        Poll::Pending
    }

    /// The next frame: replayed, or read from the caller's body.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if self.at_end {
            return Poll::Ready(None);
        }
        if self.inner.is_none() {
            let mut state = self.shared.lock();
            if state.spent {
                // An earlier attempt, still sending, read past what fits:
                // this one cannot send the whole body again.
                return Poll::Ready(Some(Err(tonic::Status::unavailable(
                    "the request body outgrew the replay buffer while an earlier attempt sent it",
                ))));
            }
            if let Some(frame) = state.frames.get(self.next) {
                self.next += 1;
                self.at_end =
                    state.ended && state.trailers.is_none() && self.next == state.frames.len();
                self.trailers_sent |= self.at_end;
                return Poll::Ready(Some(Ok(Frame::data(frame.clone()))));
            }
            if state.ended {
                if self.trailers_sent {
                    return Poll::Ready(None);
                }
                self.trailers_sent = true;
                return Poll::Ready(state.trailers.clone().map(|t| Ok(Frame::trailers(t))));
            }
            match state.inner.take() {
                Some(inner) => self.inner = Some(inner),
                // The previous attempt still holds it.
                None => return Poll::Pending,
            }
        }
        let next = match self.peeked.take() {
            Some(peeked) => Poll::Ready(Some(peeked)),
            None => self.read(cx),
        };
        let ready = match next {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => frame,
            other => return other,
        };
        // Look for the end right away: a body that ends with this frame (a
        // unary request) is sent as one DATA frame with `END_STREAM`, not a
        // small DATA frame and an empty one to end it. Besides saving a
        // frame, this keeps unary requests out of h2's small-frame budget
        // (h2 >= 0.4.16 servers): that budget is charged for every non-final
        // DATA frame, and never refunded for one that arrives on a stream
        // the server has already answered and reset (h2 0.4.20), so calls
        // cancelled in a storm used it up until the server closed the
        // connection (GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames").
        if self.inner.is_some() {
            match self.read(cx) {
                Poll::Ready(None) => self.at_end = true,
                Poll::Ready(Some(next)) => self.peeked = Some(next),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Some(Ok(ready)))
    }

    /// Reads the next frame from the caller's body and accounts for it:
    /// data kept for replay, trailers kept, the end or a failure told to
    /// the attempts waiting.
    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Pending;
        };
        let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) else {
            return Poll::Pending;
        };
        let mut state = self.shared.lock();
        let ready = match frame {
            None => {
                state.ended = true;
                self.trailers_sent = true;
                self.inner = None;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                state.spent = true;
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    state.keep(data);
                    self.next = state.frames.len();
                } else if let Some(trailers) = frame.trailers_ref() {
                    state.trailers = Some(trailers.clone());
                    self.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        };
        // Attempts waiting for this one learn that the body ended or can
        // no longer be replayed (a new frame they learn when it hands the
        // body back).
        if (state.ended || state.spent) && !state.wakers.is_empty() {
            self.shared.wake_all(&mut state);
        }
        ready
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        self.release();
        self.shared.bodies.fetch_sub(1, Ordering::Relaxed);
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
        if this.shared.aborted(this.bit) {
            return this.cancel("the call ended");
        }
        match this.poll_next(cx) {
            Poll::Pending => this.park(cx),
            ready => ready,
        }
    }

    /// True once the frame just yielded is the body's last: hyper then
    /// ends the stream with it. Before the first frame it is not known (the
    /// caller's body is not polled ahead), so an empty body still ends with
    /// an empty DATA frame, which is final and costs the server nothing.
    fn is_end_stream(&self) -> bool {
        self.at_end
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

    /// The next frame `b` yields.
    async fn next(b: &mut ReplayBody) -> Option<Result<Frame<Bytes>, tonic::Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *b).poll_frame(cx)).await
    }

    /// Everything a body yields: data as text, trailers as "T".
    async fn drain((mut b, _abort): (ReplayBody, Abort)) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = next(&mut b).await {
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

    /// Everything a body yields, each with whether the body said it was
    /// the last (`is_end_stream` right after it, as hyper asks).
    async fn frames_and_ends(b: &mut ReplayBody) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        while let Some(f) = next(b).await {
            let f = f.unwrap();
            let text = match f.into_data() {
                Ok(d) => String::from_utf8(d.to_vec()).unwrap(),
                Err(_) => "T".to_owned(),
            };
            out.push((text, b.is_end_stream()));
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(64))]

        /// For any body (data frames, waits between them and before the
        /// end, trailers or not) every attempt yields the same frames, and
        /// a body says "last" on its last data frame and nowhere else: when
        /// no trailers follow and the end came without a wait (the first
        /// attempt finds it by reading one frame ahead; a replay always
        /// knows). hyper sends that frame with END_STREAM: a unary request
        /// is one DATA frame.
        #[test]
        fn the_last_frame_and_only_it_ends_the_stream(
            frames in proptest::collection::vec(("[a-z]{1,3}", proptest::bool::ANY), 1..6),
            wait_before_end in proptest::bool::ANY,
            trailers in proptest::bool::ANY,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut script: Vec<Option<&'static str>> = Vec::new();
                for (text, wait) in &frames {
                    if *wait {
                        script.push(None);
                    }
                    script.push(Some(Box::leak(text.clone().into_boxed_str())));
                }
                if wait_before_end {
                    script.push(None);
                }
                let r = Replay::new(body(script, trailers), limits(1024, 1 << 20), None);
                let mut expected: Vec<String> = frames.iter().map(|(t, _)| t.clone()).collect();
                if trailers {
                    expected.push("T".into());
                }
                let last_data = frames.len() - 1;
                for (attempt, knows_end) in [(1, !wait_before_end), (2, true), (3, true)] {
                    let (mut b, _abort) = r.body();
                    let got = frames_and_ends(&mut b).await;
                    let texts: Vec<&String> = got.iter().map(|(t, _)| t).collect();
                    assert_eq!(texts, expected.iter().collect::<Vec<_>>(), "attempt {attempt}");
                    for (i, (_, end)) in got.iter().enumerate() {
                        let want = i == last_data && !trailers && knows_end;
                        assert_eq!(*end, want, "attempt {attempt}, frame {i}: {got:?}");
                    }
                }
            });
        }
    }

    #[tokio::test]
    async fn every_attempt_sends_the_same_body() {
        let r = Replay::new(
            body(vec![Some("a"), None, Some("b")], true),
            limits(1024, 1 << 20),
            None,
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
            None,
        );
        let (mut first, _a1) = r.body();
        let f = next(&mut first).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "a");
        drop(first); // the first attempt failed after sending "a"
        assert_eq!(drain(r.body()).await, ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn a_body_that_outgrows_a_limit_is_sent_once_and_never_again() {
        let in_use = limits(3, 1 << 20);
        let r = Replay::new(
            body(vec![Some("ab"), Some("cd")], false),
            in_use.clone(),
            None,
        );
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
        let a = Replay::new(body(vec![Some("ab")], false), shared.clone(), None);
        drain(a.body()).await;
        let b = Replay::new(body(vec![Some("cd")], false), shared.clone(), None);
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
            None,
        );
        let (mut attempt, _a) = r.body();
        let f = next(&mut attempt).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "ab");
        // Response headers: the call layer lets go of its Replay, and the
        // stream goes on sending.
        drop(r);
        for expected in ["cd", "ef"] {
            let f = next(&mut attempt).await;
            assert_eq!(f.unwrap().unwrap().into_data().unwrap(), expected);
        }
        // "ab", and "cd" read with it to see whether "ab" was the last.
        assert_eq!(l.in_use.load(Ordering::Relaxed), 4, "only what came before");
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
            body(vec![Some("a"), None, Some("b")], false),
            limits(1024, 1 << 20),
            None,
        );
        let (mut first, _a1) = r.body();
        let f = next(&mut first).await;
        assert!(f.is_some());
        let (mut second, _a2) = r.body();
        // It replays "a", then must wait for the caller's body.
        let f = next(&mut second).await;
        assert_eq!(f.unwrap().unwrap().into_data().unwrap(), "a");
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(20), next(&mut second)).await;
        assert!(waiting.is_err(), "the first attempt still holds the body");
        drop(first);
        assert_eq!(drain((second, _a2)).await, ["b"]);
    }

    /// A caller's streaming body: frames come from `tx`, which the caller
    /// holds for as long as it likes.
    struct Chan(tokio::sync::mpsc::Receiver<Bytes>);

    impl Body for Chan {
        type Data = Bytes;
        type Error = tonic::Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            self.0.poll_recv(cx).map(|f| f.map(|d| Ok(Frame::data(d))))
        }
    }

    fn streaming() -> (tokio::sync::mpsc::Sender<Bytes>, Inner) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (tx, Inner::new(Chan(rx)))
    }

    /// The reason hyper resets the stream with when `status` ends a body.
    fn reset_reason(status: &tonic::Status) -> Option<h2::Reason> {
        let source = std::error::Error::source(status)?;
        source.downcast_ref::<h2::Error>()?.reason()
    }

    #[tokio::test]
    async fn an_ended_call_cancels_its_waiting_body_and_frees_the_senders_stream() {
        let (tx, caller) = streaming();
        let r = Replay::new(caller, limits(1024, 1 << 20), None);
        let (mut body, abort) = r.body();
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(next(&mut body).await.unwrap().is_ok());
        // hyper's task waits on the caller's sender, which sends no more.
        let task = tokio::spawn(async move { (next(&mut body).await, body) });
        tokio::task::yield_now().await;
        assert!(!task.is_finished(), "the body waits for the caller");
        drop(r); // response headers: the call committed to this attempt
        drop(abort); // ... and then ended (response dropped, deadline, trailers)
        let (frame, body) = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the abort wakes the waiting body")
            .unwrap();
        let status = frame.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Cancelled);
        assert_eq!(reset_reason(&status), Some(h2::Reason::CANCEL));
        drop(body); // hyper drops the body after resetting the stream
        assert!(
            tx.is_closed(),
            "the caller's sender learns the call is over"
        );
    }

    #[tokio::test]
    async fn an_abort_ends_its_own_attempt_only() {
        let (tx, caller) = streaming();
        let r = Replay::new(caller, limits(1024, 1 << 20), None);
        let (mut first, a1) = r.body();
        let (second, a2) = r.body();
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(next(&mut first).await.unwrap().is_ok());
        // A retried trailers-only response is dropped: its attempt ends,
        // and the caller's body goes back for the next one.
        drop(a1);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), next(&mut first));
        assert!(ended.await.expect("the abort ends it").unwrap().is_err());
        drop(first);
        assert!(!tx.is_closed(), "the call goes on");
        tx.send(Bytes::from_static(b"b")).await.unwrap();
        drop(tx);
        assert_eq!(drain((second, a2)).await, ["a", "b"]);
    }

    #[tokio::test]
    async fn every_waiting_attempt_wakes_when_the_body_ends() {
        let (tx, caller) = streaming();
        let r = Replay::new(caller, limits(1024, 1 << 20), None);
        let (mut first, _a1) = r.body();
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(next(&mut first).await.unwrap().is_ok());
        // Two hedges replay "a", then both wait for the first attempt.
        let hedges: Vec<_> = (0..2).map(|_| tokio::spawn(drain(r.body()))).collect();
        tokio::task::yield_now().await;
        drop(tx);
        assert!(next(&mut first).await.is_none());
        for hedge in hedges {
            let sent = tokio::time::timeout(std::time::Duration::from_secs(5), hedge)
                .await
                .expect("every waiting hedge is woken")
                .unwrap();
            assert_eq!(sent, ["a"]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_body_ends_itself_at_the_deadline() {
        let (tx, caller) = streaming();
        let start = Instant::now();
        let deadline = start + std::time::Duration::from_millis(300);
        let r = Replay::new(caller, limits(1024, 1 << 20), Some(deadline));
        let (mut body, _abort) = r.body();
        drop(r);
        // Nobody reads the response; the caller holds its sender.
        let status = next(&mut body).await.unwrap().unwrap_err();
        assert_eq!(start.elapsed(), std::time::Duration::from_millis(300));
        assert_eq!(reset_reason(&status), Some(h2::Reason::CANCEL));
        drop(body);
        assert!(tx.is_closed());
    }
}
