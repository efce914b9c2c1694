//! The retry budget that is always on when a method has a retry or hedging
//! policy, so that retries never multiply an outage: retries (and hedges)
//! at most 20 % of the calls made, plus 10 per second, with at most 100
//! saved up.
//!
//! linkerd and finagle keep the same budget as a sliding window (tower's
//! `TpsBudget`: 20 % of the calls of the last 10 s plus a reserve of 100 per
//! window). That window really spans up to one slot more than its ten
//! seconds, and its reserve is whole again every window, so a run of every
//! call failing was measured at 0.21 retries per call plus 19 per second,
//! above the bound it is meant to keep. A token bucket keeps it exactly:
//! every call adds 0.2 tokens, time adds 10 per second, a retry takes one,
//! and the balance is capped at 100 (what ten quiet seconds save, as the
//! window's reserve), where it starts, so that a new client can retry its
//! first failures. Over any interval the retries are at most 0.2 × its
//! calls + 10 per second + what was saved at its start.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

// In thousandths of a token, so that five calls make exactly one retry.
/// One retry.
const TOKEN: u64 = 1_000;
/// What one call adds: a fifth of a retry.
const PER_CALL: u64 = TOKEN / 5;
/// What time adds: 10 retries per second, one thousandth every 100 us.
const TICK: Duration = Duration::from_micros(100);
/// The most that can be saved up: ten seconds of the floor.
const CAP: u64 = 100 * TOKEN;

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct RetryBudget {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Thousandths of a token.
    tokens: u64,
    /// Time is counted up to here.
    at: Instant,
}

impl RetryBudget {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                tokens: CAP,
                at: Instant::now(),
            }),
        }
    }

    /// A call was made.
    pub(crate) fn deposit(&self) {
        self.with(|s| s.tokens = (s.tokens + PER_CALL).min(CAP));
    }

    /// Whether a retry (or hedge) may be made now; takes its token if so.
    pub(crate) fn withdraw(&self) -> bool {
        self.with(|s| {
            let allowed = s.tokens >= TOKEN;
            if allowed {
                s.tokens -= TOKEN;
            }
            allowed
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = Instant::now().saturating_duration_since(s.at);
        let ticks = elapsed.as_micros() / TICK.as_micros();
        if ticks > 0 {
            let ticks = u64::try_from(ticks).unwrap_or(u64::MAX);
            s.tokens = s.tokens.saturating_add(ticks).min(CAP);
            // The remainder counts towards the next tick.
            s.at += TICK * u32::try_from(ticks).unwrap_or(u32::MAX);
        }
        f(&mut s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spend(b: &RetryBudget) -> u32 {
        let mut n = 0;
        while b.withdraw() {
            n += 1;
            assert!(n <= 1_000, "the budget never runs dry");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_fifth_of_the_calls_plus_ten_per_second() {
        let b = RetryBudget::new();
        assert_eq!(spend(&b), 100, "ten seconds' worth to start with");
        for _ in 0..100 {
            b.deposit();
        }
        assert_eq!(spend(&b), 20, "a fifth of the calls");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(spend(&b), 5, "ten per second");
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..1_000 {
            b.deposit();
        }
        assert_eq!(spend(&b), 100, "at most 100 saved up");
    }

    #[tokio::test(start_paused = true)]
    async fn every_call_failing_stays_within_the_bound() {
        // 1,000 calls per second for 20 s, each retried while allowed.
        let b = RetryBudget::new();
        let saved = spend(&b);
        let mut retries = 0;
        for _ in 0..20_000 {
            b.deposit();
            retries += u32::from(b.withdraw());
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(saved, 100);
        let bound = 0.2 * 20_000.0 + 10.0 * 20.0;
        assert!(f64::from(retries) <= bound, "{retries} > {bound}");
        assert!(
            f64::from(retries) >= bound - 2.0,
            "{retries}: the budget is used"
        );
    }
}
