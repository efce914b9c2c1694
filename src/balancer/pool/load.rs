//! What the balancer knows about one endpoint's load and health, and the
//! cost the pick compares.
//!
//! * **Latency**: an asymmetric EWMA of response latency, in the spirit of
//!   peak-EWMA (Finagle, tower): a slower sample closes a quarter of the gap,
//!   a faster one pulls the estimate down by at least a quarter. A new endpoint starts at a conservative prior (tower
//!   does the same) that its first sample replaces, so it is neither flooded
//!   nor starved before it has a baseline; an estimate older than the probe
//!   interval is stale and the next sample replaces it, so a backend that
//!   recovered is believed as soon as it answers.
//! * **Latency is time to response headers.** A unary call's headers come
//!   with its answer (tonic and grpc-go servers send them when the handler
//!   returns), so for unary calls this is the whole call; a stream's are
//!   sent when it opens, so a stream teaches how fast the server answers,
//!   never how long the stream stays open.
//! * **Load and age**: the cost multiplies the latency by the calls in
//!   flight + 1, streams included: an open stream is load, half a call's
//!   worth (see [`STREAM_LOAD`]). Only the calls still **waiting for their response headers** age:
//!   the latency is at least their mean age, so a backend that stops
//!   answering (pending unary calls, stream openings left unanswered) looks
//!   slower every millisecond instead of looking idle, while a stream that
//!   has been open for an hour does not make its endpoint look an hour
//!   slow (that starved an endpoint holding one stream of nearly every
//!   unary call).
//! * **Health**: an EWMA of call outcomes (1 = every call succeeded). Errors
//!   come back fast, so without it a failing backend would look the best.
//!   It is kept across an ejection: an endpoint back from one regains its
//!   share as its calls succeed (gRPC's A50 gives it full traffic at once).
//! * **Probes**: an endpoint that has had no call for the probe interval and
//!   has none waiting for headers is given the next one, so every endpoint in rotation
//!   keeps fresh samples (at most one probe per interval, a bounded share).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// How much of a call's load an open stream is. A stream holds server
/// resources (memory, a slot of the stream limit, the work of its
/// messages), but unlike a unary call in flight it is mostly not work queued
/// ahead of the next call. tower's and linkerd's pending count ends at the
/// response headers (a stream counts as nothing), Envoy's least-request
/// counts it as one request; at one, a replica holding a single stream lost
/// half of its unary share to four callers (12-19 % where 25 % is fair).
/// Half keeps a replica that holds many streams from being loaded with
/// unary calls too, and one that holds a few at its share.
const STREAM_LOAD: f64 = 0.5;
/// How strongly one outcome moves the health estimate.
const HEALTH_ALPHA: f64 = 0.25;
/// A faster sample pulls the estimate down by at least this share.
const MIN_PULL: f64 = 0.25;
/// A slower sample pushes the estimate up by this share of the gap.
const RISE: f64 = 0.25;

/// Tunables shared by every endpoint of a balancer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadConfig {
    /// The balancer's epoch: every time stamp is µs since it, so one `now`
    /// serves a whole pick.
    pub(crate) base: Instant,
    /// The latency assumed before the first sample.
    pub(crate) prior: Duration,
    /// Time constant weighting a faster sample against the estimate.
    pub(crate) tau: Duration,
    /// An endpoint idle this long gets the next call; an estimate this old is
    /// replaced by the next sample.
    pub(crate) probe_interval: Duration,
}

impl LoadConfig {
    /// Microseconds since the epoch (at least 1, so 0 can mean "never").
    pub(crate) fn now(&self) -> u64 {
        self.at(Instant::now())
    }

    /// `instant` in microseconds since the epoch (at least 1).
    pub(crate) fn at(&self, instant: Instant) -> u64 {
        u64::try_from(instant.saturating_duration_since(self.base).as_micros())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

/// One endpoint's load. Lock-free: every call touches it.
#[derive(Debug)]
pub(crate) struct Load {
    cfg: LoadConfig,
    /// Latency estimate in µs (f64 bits).
    rtt_us: AtomicU64,
    /// When the estimate was last fed, µs since `base`; 0 = never.
    sampled_at: AtomicU64,
    /// Calls in flight, open streams included.
    pending: AtomicUsize,
    /// Calls in flight still waiting for their response headers.
    awaiting: AtomicUsize,
    /// Sum of the start times of the calls waiting for headers (µs since
    /// `base`), wrapping: exact as long as the true sum fits, which it does
    /// for decades of uptime with thousands of calls in flight.
    started_sum: AtomicU64,
    /// Success EWMA in [0, 1] (f64 bits).
    health: AtomicU64,
    /// When a call was last routed here, µs since `base`.
    picked_at: AtomicU64,
}

impl Load {
    pub(crate) fn new(cfg: LoadConfig) -> Self {
        Self {
            cfg,
            rtt_us: AtomicU64::new((cfg.prior.as_secs_f64() * 1e6).to_bits()),
            sampled_at: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            awaiting: AtomicUsize::new(0),
            started_sum: AtomicU64::new(0),
            health: AtomicU64::new(1f64.to_bits()),
            picked_at: AtomicU64::new(0),
        }
    }

    /// Microseconds since the epoch (at least 1, so 0 can mean "never").
    pub(crate) fn now(&self) -> u64 {
        self.cfg.now()
    }

    /// `instant` as a time stamp of [`now`](Self::now)'s kind.
    pub(crate) fn at(&self, instant: Instant) -> u64 {
        self.cfg.at(instant)
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Calls in flight that have their response headers: open streams (and
    /// unary bodies being read).
    pub(crate) fn open_streams(&self) -> usize {
        self.pending()
            .saturating_sub(self.awaiting.load(Ordering::Relaxed))
    }

    /// The latency estimate in µs, without the pending calls' age.
    pub(crate) fn latency_us(&self) -> f64 {
        f64::from_bits(self.rtt_us.load(Ordering::Relaxed))
    }

    pub(crate) fn health(&self) -> f64 {
        f64::from_bits(self.health.load(Ordering::Relaxed))
    }

    /// The cost of one more call here at `now`: latency (at least the mean
    /// age of the calls waiting for headers) × (load / weight + 1), where the
    /// load is the calls waiting for headers plus half the open streams
    /// ([`STREAM_LOAD`]). The
    /// weight scales the queue, as in Envoy's weighted least-request: a
    /// backend of weight 3 is expected to carry three times the calls, so
    /// equal backends keep their weighted shares under any concurrency.
    pub(crate) fn cost(&self, now: u64, weight: f64) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed);
        let awaiting = self.awaiting.load(Ordering::Relaxed);
        let mut latency = self.latency_us();
        if awaiting > 0 {
            let sum = self.started_sum.load(Ordering::Relaxed);
            let mean_start = sum / awaiting as u64;
            latency = latency.max(now.saturating_sub(mean_start) as f64);
        }
        let open = pending.saturating_sub(awaiting);
        let load = awaiting as f64 + open as f64 * STREAM_LOAD;
        latency.max(1.0) * (load / weight.max(1.0) + 1.0)
    }

    /// Claims the probe slot when the endpoint has been left idle for the
    /// probe interval: at most one caller wins it per interval.
    pub(crate) fn claim_probe(&self, now: u64) -> bool {
        let interval = self.cfg.probe_interval.as_micros() as u64;
        let last = self.picked_at.load(Ordering::Relaxed);
        // Never picked (0): a new endpoint's first call comes at once, so its
        // first answer replaces the prior.
        self.awaiting.load(Ordering::Relaxed) == 0
            && (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .picked_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// A call starts at `now` (read by the caller: the pick's), waiting for
    /// its response headers: returns its start time for
    /// [`headers`](Self::headers) and [`end`](Self::end).
    pub(crate) fn start(&self, now: u64) -> u64 {
        self.picked_at.store(now, Ordering::Relaxed);
        self.started_sum.fetch_add(now, Ordering::Relaxed);
        self.awaiting.fetch_add(1, Ordering::Relaxed);
        self.pending.fetch_add(1, Ordering::Relaxed);
        now
    }

    /// The call that started at `started` got its response headers (or
    /// gave up waiting for them): from now on it is load, not age.
    pub(crate) fn headers(&self, started: u64) {
        self.started_sum.fetch_sub(started, Ordering::Relaxed);
        self.awaiting.fetch_sub(1, Ordering::Relaxed);
    }

    /// The call that started at `started` is no longer in flight (`awaiting`:
    /// it never had its headers). Returns the calls in flight before it
    /// ended.
    pub(crate) fn end(&self, started: u64, awaiting: bool) -> usize {
        if awaiting {
            self.headers(started);
        }
        self.pending.fetch_sub(1, Ordering::Relaxed)
    }

    /// Feeds a latency sample (µs) taken at `now`.
    pub(crate) fn observe(&self, sample_us: f64, now: u64) {
        let current = self.latency_us();
        let last = self.sampled_at.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(last);
        let stale = last == 0 || elapsed >= self.cfg.probe_interval.as_micros() as u64;
        let next = if stale {
            sample_us
        } else if sample_us > current {
            // Up fast but not all the way: one scheduling hiccup should not
            // push a healthy endpoint out for a second; a slow one gets
            // there within a few samples, and calls that stall show in the
            // cost through their age at once anyway.
            current + (sample_us - current) * RISE
        } else {
            let tau = self.cfg.tau.as_micros().max(1) as f64;
            let w = (-(elapsed as f64) / tau).exp().min(1.0 - MIN_PULL);
            current * w + sample_us * (1.0 - w)
        };
        // Racing updates may overwrite each other; each is a valid estimate.
        self.rtt_us.store(next.to_bits(), Ordering::Relaxed);
        self.sampled_at.store(now, Ordering::Relaxed);
    }

    /// Feeds a call's outcome into the health estimate.
    pub(crate) fn outcome(&self, ok: bool) {
        let h = self.health();
        let next = h * (1.0 - HEALTH_ALPHA) + if ok { HEALTH_ALPHA } else { 0.0 };
        self.health.store(next.to_bits(), Ordering::Relaxed);
    }

    /// A call here hit its deadline at `now`: the next probe waits a full
    /// interval from now, so a frozen endpoint holds at most one caller
    /// every other interval.
    pub(crate) fn timed_out(&self, now: u64) {
        self.picked_at.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load() -> Load {
        Load::new(LoadConfig {
            base: Instant::now(),
            prior: Duration::from_millis(30),
            tau: Duration::from_secs(1),
            probe_interval: Duration::from_secs(1),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_sample_replaces_the_prior_and_slow_ones_count_fast() {
        let l = load();
        assert_eq!(l.latency_us(), 30_000.0);
        tokio::time::advance(Duration::from_millis(1)).await;
        l.observe(300.0, l.now());
        assert_eq!(l.latency_us(), 300.0, "the prior is not an observation");
        tokio::time::advance(Duration::from_millis(1)).await;
        l.observe(40_300.0, l.now());
        assert_eq!(
            l.latency_us(),
            10_300.0,
            "a slow sample closes a quarter of the gap"
        );
        l.observe(40_300.0, l.now());
        assert_eq!(l.latency_us(), 17_800.0);
        tokio::time::advance(Duration::from_millis(1)).await;
        l.observe(300.0, l.now());
        let e = l.latency_us();
        assert!(
            e < 20_000.0 * 0.76 && e > 300.0,
            "pulled down, not reset: {e}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_estimate_is_replaced_by_the_next_sample() {
        let l = load();
        l.observe(6_000_000.0, l.now()); // a late answer after a freeze
        tokio::time::advance(Duration::from_millis(1_001)).await;
        l.observe(300.0, l.now());
        assert_eq!(l.latency_us(), 300.0);
    }

    #[tokio::test(start_paused = true)]
    async fn stuck_calls_make_an_endpoint_costlier_every_millisecond() {
        let l = load();
        l.observe(300.0, l.now());
        let idle = l.cost(l.now(), 1.0);
        let started = l.start(l.now());
        let c0 = l.cost(l.now(), 1.0);
        assert!(c0 > idle, "a call in flight costs");
        tokio::time::advance(Duration::from_millis(50)).await;
        let c50 = l.cost(l.now(), 1.0);
        tokio::time::advance(Duration::from_millis(50)).await;
        let c100 = l.cost(l.now(), 1.0);
        assert!(c100 > c50 && c50 > c0, "{c0} {c50} {c100}");
        assert!((c100 - 2.0 * 100_000.0).abs() < 10.0, "{c100}");
        assert_eq!(l.end(started, true), 1);
        assert_eq!(l.cost(l.now(), 1.0), idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_is_load_not_age() {
        let l = load();
        l.observe(300.0, l.now());
        let idle = l.cost(l.now(), 1.0);
        let stream = l.start(l.now());
        l.headers(stream);
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(l.open_streams(), 1);
        assert_eq!(
            l.cost(l.now(), 1.0),
            1.5 * idle,
            "half a call's worth of load, however long it is open"
        );
        // A stream opening that gets no answer ages like any call.
        let unanswered = l.start(l.now());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(l.cost(l.now(), 1.0), 100_000.0 * 2.5);
        l.end(unanswered, true);
        l.end(stream, false);
        assert_eq!(l.cost(l.now(), 1.0), idle);
        assert_eq!(l.open_streams(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_per_interval_and_only_when_idle() {
        let l = load();
        assert!(
            l.claim_probe(l.now()),
            "a new endpoint's first call is a probe"
        );
        let l = load();
        let t = l.start(l.now());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!l.claim_probe(l.now()), "a call is in flight");
        l.end(t, true);
        assert!(l.claim_probe(l.now()));
        assert!(!l.claim_probe(l.now()), "claimed once");
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!l.claim_probe(l.now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(l.claim_probe(l.now()));
    }

    #[test]
    fn health_falls_with_failures_and_resets() {
        let l = load();
        for _ in 0..10 {
            l.outcome(false);
        }
        assert!(l.health() < 0.06, "{}", l.health());
        l.outcome(true);
        assert!(l.health() > 0.25);
    }
}
