//! Passive outlier detection: see [`OutlierDetection`].

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Passive outlier detection: endpoints that fail calls leave the rotation
/// for a while and come back by themselves.
///
/// Semantics follow gRPC's outlier detection (gRFC A50) where they fit:
///
/// * a call fails when its gRPC status is one of the failure codes (default
///   `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DATA_LOSS`) or the transport
///   failed; the status is read from a trailers-only response's headers or
///   from the trailers at the end of the body, so streaming calls count too;
/// * an endpoint is ejected after `consecutive_failures` failures in a row
///   (A50's consecutive-errors ejection, Envoy's `consecutive_5xx`), or when
///   at least `min_requests` calls in one `interval` failed at
///   `failure_rate` or more (A50's failure-percentage ejection);
/// * it is ejected for `base_ejection_time` × the number of times it was
///   ejected in a row, capped at `max_ejection_time`; the count starts over
///   once it has stayed in rotation for ten base ejection times;
/// * back from an ejection it is on probation: a failure before its first
///   success ejects it again at once (a circuit breaker's half-open state;
///   A50 waits for the rules to trip again);
/// * at most `max_ejection_percent` of the connected endpoints are ejected
///   at once (default 50 %, A50's is 10 %), and never the last one: a
///   service-wide failure is not turned into "no endpoint".
///
/// Differences from A50: no success-rate (standard deviation) ejection; the
/// window is per endpoint and starts with its first call, not a timer over
/// all endpoints; an ejected endpoint's connection stays open; and an
/// endpoint back from ejection regains its share as its calls succeed
/// instead of all at once (its success estimate is kept), so a backend
/// that still fails costs a probe per second, not another run of failures.
#[derive(Debug, Clone)]
pub struct OutlierDetection {
    pub(crate) consecutive_failures: u32,
    pub(crate) failure_rate: f64,
    pub(crate) min_requests: u32,
    pub(crate) interval: Duration,
    pub(crate) base_ejection_time: Duration,
    pub(crate) max_ejection_time: Duration,
    pub(crate) max_ejection_percent: u32,
    /// Bit `c` set: gRPC code `c` is a failure.
    pub(crate) failure_codes: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        use tonic::Code;
        Self {
            consecutive_failures: 5,
            failure_rate: 0.85,
            min_requests: 50,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            failure_codes: mask(&[
                Code::Unavailable,
                Code::Internal,
                Code::Unknown,
                Code::DataLoss,
            ]),
        }
    }
}

fn mask(codes: &[tonic::Code]) -> u32 {
    codes.iter().fold(0, |m, c| m | 1 << (*c as u32 & 31))
}

impl OutlierDetection {
    /// The defaults: 5 consecutive failures, or 85 % of at least 50 calls in
    /// 10 s; 30 s base ejection, 300 s at most, at most 50 % ejected.
    pub fn new() -> Self {
        Self::default()
    }

    /// No ejection at all (failures still lower an endpoint's share).
    pub fn disabled() -> Self {
        Self {
            consecutive_failures: 0,
            min_requests: 0,
            ..Self::default()
        }
    }

    /// Failures in a row that eject an endpoint (0: never by this rule).
    #[must_use]
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n;
        self
    }

    /// Ejects an endpoint when at least `min_requests` calls in one
    /// `interval` failed at `rate` (0..=1) or more; `min_requests` 0 turns
    /// this rule off.
    #[must_use]
    pub fn failure_rate(mut self, rate: f64, min_requests: u32, interval: Duration) -> Self {
        self.failure_rate = rate;
        self.min_requests = min_requests;
        self.interval = crate::time::cap(interval);
        self
    }

    /// The first ejection's length, and the longest (default 30 s / 300 s).
    #[must_use]
    pub fn ejection_time(mut self, base: Duration, max: Duration) -> Self {
        self.base_ejection_time = crate::time::cap(base);
        self.max_ejection_time = crate::time::cap(max);
        self
    }

    /// The most endpoints ejected at once, in percent of those connected
    /// (default 50).
    #[must_use]
    pub fn max_ejection_percent(mut self, percent: u32) -> Self {
        self.max_ejection_percent = percent;
        self
    }

    /// The gRPC codes that count as failures (transport errors always do).
    #[must_use]
    pub fn failure_codes(mut self, codes: &[tonic::Code]) -> Self {
        self.failure_codes = mask(codes);
        self
    }

    pub(crate) fn is_failure(&self, code: tonic::Code) -> bool {
        self.failure_codes & (1 << (code as u32 & 31)) != 0
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.failure_rate) || self.failure_rate.is_nan() {
            return Err(format!(
                "outlier detection: failure_rate {} is not between 0 and 1",
                self.failure_rate
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(format!(
                "outlier detection: max_ejection_percent {} is over 100",
                self.max_ejection_percent
            ));
        }
        if self.base_ejection_time.is_zero() || self.interval.is_zero() {
            return Err("outlier detection: ejection time and interval must be above zero".into());
        }
        Ok(())
    }

    /// How long the `nth` ejection in a row lasts.
    pub(crate) fn ejection_time_for(&self, nth: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(nth.max(1))
            .min(self.max_ejection_time.max(self.base_ejection_time))
    }
}

/// One endpoint's failure accounting, fed by every call.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// Just back from an ejection: one failure before a success ejects it
    /// again (a circuit breaker's half-open state).
    probation: AtomicBool,
    consecutive: AtomicU32,
    window_start: AtomicU64,
    window_calls: AtomicU32,
    window_failures: AtomicU32,
    requested: AtomicBool,
    /// Wakes the endpoint's connector, which applies the ejection.
    pub(crate) eject: Notify,
}

impl Tracker {
    /// Records one outcome at `now` (µs); asks for ejection when a rule trips.
    pub(crate) fn record(&self, ok: bool, now: u64, cfg: &OutlierDetection) {
        let interval = cfg.interval.as_micros() as u64;
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= interval
            && self
                .window_start
                .compare_exchange(start, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.window_calls.store(0, Ordering::Relaxed);
            self.window_failures.store(0, Ordering::Relaxed);
        }
        let calls = self.window_calls.fetch_add(1, Ordering::Relaxed) + 1;
        if ok {
            self.consecutive.store(0, Ordering::Relaxed);
            self.probation.store(false, Ordering::Relaxed);
            return;
        }
        let on_probation = self.probation.load(Ordering::Relaxed);
        let failures = self.window_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let in_a_row = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let by_count = cfg.consecutive_failures > 0 && in_a_row >= cfg.consecutive_failures;
        let by_rate = cfg.min_requests > 0
            && calls >= cfg.min_requests
            && f64::from(failures) >= cfg.failure_rate * f64::from(calls);
        let ejectable = cfg.consecutive_failures > 0 || cfg.min_requests > 0;
        if (by_count || by_rate || (on_probation && ejectable))
            && !self.requested.swap(true, Ordering::Relaxed)
        {
            self.eject.notify_one();
        }
    }

    /// The ejection ended: the next failure before a success ejects again.
    pub(crate) fn on_probation(&self) {
        self.probation.store(true, Ordering::Relaxed);
    }

    /// The connector handled the request (ejected, or refused by the budget):
    /// counting starts over.
    pub(crate) fn clear(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        self.window_calls.store(0, Ordering::Relaxed);
        self.window_failures.store(0, Ordering::Relaxed);
        self.requested.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn consecutive_failures_ask_once() {
        let cfg = OutlierDetection::new().consecutive_failures(3);
        let t = Tracker::default();
        for _ in 0..2 {
            t.record(false, 10, &cfg);
        }
        t.record(true, 10, &cfg);
        for _ in 0..2 {
            t.record(false, 10, &cfg);
        }
        assert!(
            !t.requested.load(Ordering::Relaxed),
            "a success breaks the run"
        );
        t.record(false, 10, &cfg);
        assert!(t.requested.load(Ordering::Relaxed));
        tokio::time::timeout(Duration::from_millis(10), t.eject.notified())
            .await
            .expect("the connector is woken");
    }

    #[test]
    fn on_probation_one_failure_asks_and_a_success_ends_it() {
        let cfg = OutlierDetection::new();
        let t = Tracker::default();
        t.on_probation();
        t.record(true, 1, &cfg);
        t.record(false, 1, &cfg);
        assert!(
            !t.requested.load(Ordering::Relaxed),
            "a success ended probation"
        );
        t.clear();
        t.on_probation();
        t.record(false, 1, &cfg);
        assert!(t.requested.load(Ordering::Relaxed));
        let t = Tracker::default();
        t.on_probation();
        t.record(false, 1, &OutlierDetection::disabled());
        assert!(!t.requested.load(Ordering::Relaxed), "disabled means never");
    }

    #[test]
    fn a_failure_rate_over_enough_calls_asks() {
        let cfg = OutlierDetection::new()
            .consecutive_failures(0)
            .failure_rate(0.5, 10, Duration::from_secs(1));
        let t = Tracker::default();
        for i in 0..10 {
            t.record(i % 2 == 0, 1, &cfg);
        }
        assert!(t.requested.load(Ordering::Relaxed), "5 of 10 failed");
        let t = Tracker::default();
        for i in 0..10 {
            // A new window every call: never enough calls in one.
            t.record(i % 2 == 0, 1 + i * 1_000_000, &cfg);
        }
        assert!(!t.requested.load(Ordering::Relaxed));
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let cfg = OutlierDetection::new()
            .ejection_time(Duration::from_secs(30), Duration::from_secs(100));
        assert_eq!(cfg.ejection_time_for(1), Duration::from_secs(30));
        assert_eq!(cfg.ejection_time_for(3), Duration::from_secs(90));
        assert_eq!(cfg.ejection_time_for(9), Duration::from_secs(100));
        assert!(cfg.is_failure(tonic::Code::Unavailable));
        assert!(!cfg.is_failure(tonic::Code::NotFound));
        assert!(OutlierDetection::new()
            .failure_rate(1.5, 1, Duration::from_secs(1))
            .check()
            .is_err());
    }
}
