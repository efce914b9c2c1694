//! Capped exponential back-off with full jitter.
//!
//! Every retry loop in the crate goes through this, so that a fleet of
//! processes that lost etcd at the same moment does not come back at the same
//! moment (go-zero's fixed one-second retry is a thundering herd).

use std::time::Duration;

use rand::Rng;

/// How long a request etcd refused for the user's permissions waits before
/// it is asked again: it fails the same way until an operator changes the
/// grants, and 10,000 clients retrying every second are 10,000 refused
/// requests a second. Between 60 and 66 s, so that a fleet spreads out.
pub(crate) fn refused_retry() -> Duration {
    REFUSED_RETRY + jitter(REFUSED_RETRY / 10)
}

pub(crate) const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// A retry loop's memory of refusals: the first of a run is said loudly
/// (a warning that names the grant), the repeats quietly; a success
/// forgets, so that a grant revoked later is said again.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    said: bool,
}

impl Refusals {
    /// Notes that etcd refused the request for `key` with `error` (which
    /// names the grant): counts it, says it once per run (`keeping` is
    /// what stays in force meanwhile), and returns the wait before the
    /// next attempt ([`refused_retry`]).
    pub(crate) fn refused(&mut self, key: &str, error: &crate::Error, keeping: &str) -> Duration {
        crate::metrics::refused(key);
        let delay = refused_retry();
        if std::mem::replace(&mut self.said, true) {
            tracing::debug!(%key, %error, retry_in = ?delay, "etcd refused this again");
        } else {
            tracing::warn!(%key, %error, retry_in = ?delay, keeping,
                "etcd refused this request; asking again once a minute");
        }
        delay
    }

    /// The request succeeded.
    pub(crate) fn clear(&mut self) {
        self.said = false;
    }
}

/// Delays of `base * 2^n`, capped at `max`, each drawn uniformly from
/// `[delay/2, delay]` so retries spread out but never collapse to zero.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The next delay; grows until `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        jitter(exp)
    }

    /// Retries made since the last [`reset`](Self::reset).
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A delay drawn uniformly from `[d/2, d]`: spread out, never near zero.
pub(crate) fn jitter(d: Duration) -> Duration {
    let lo = d / 2;
    lo + rand::rng().random_range(Duration::ZERO..=d - lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        let capped = b.next_delay();
        assert!(capped >= Duration::from_secs(1), "{capped:?}");
        assert_eq!(b.attempts(), 32);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    proptest::proptest! {
        /// For any base, cap and run of failures, each pause lies in the
        /// upper half of `min(base × 2^k, cap)`: it never passes the cap,
        /// never falls below half of it once reached (so a dead endpoint
        /// costs at most one attempt per cap/2), and a reset starts over.
        #[test]
        fn each_pause_is_the_upper_half_of_the_doubled_base_up_to_the_cap(
            base_ms in 1u64..2_000,
            cap_ms in 1u64..200_000,
            failures in 1usize..64,
        ) {
            let (base, cap) = (Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let mut b = Backoff::new(base, cap);
            let cap = cap.max(base);
            for k in 0..failures {
                let nominal = base.saturating_mul(1u32 << k.min(20)).min(cap);
                let d = b.next_delay();
                proptest::prop_assert!(d <= nominal && d >= nominal / 2, "pause {k}: {d:?} for {nominal:?}");
            }
            b.reset();
            let d = b.next_delay();
            proptest::prop_assert!(d <= base.min(cap) && d >= base.min(cap) / 2);
        }
    }
}
