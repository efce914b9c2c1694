//! What keeps retries and hedges from making an outage worse, and what the
//! server says about them: gRFC A6's `retryThrottling` token bucket
//! ([`Throttle`]), the budget every call shares ([`super::budget`]),
//! the replay buffer's limits, and `grpc-retry-pushback-ms` ([`pushback`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;

use super::budget::RetryBudget;
use super::replay::ReplayLimits;
use crate::service_config::RetryThrottling;

/// gRPC's cap on `maxAttempts` (A6: larger values are treated as 5).
pub(crate) const MAX_ATTEMPTS: u32 = 5;
const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// What a balancer's retries share: the throttle, the budget, the replay
/// buffer's limits.
pub(crate) struct Retries {
    /// A6's token bucket of the config in force (see [`Retries::for_call`]).
    throttle: Mutex<Option<Arc<Throttle>>>,
    budget: RetryBudget,
    replay: ReplayLimits,
}

impl std::fmt::Debug for Retries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retries")
            .field("throttle", &self.throttle)
            .finish_non_exhaustive()
    }
}

impl Retries {
    pub(crate) fn new() -> Self {
        Self {
            throttle: Mutex::default(),
            budget: RetryBudget::new(),
            replay: ReplayLimits {
                per_call: 256 * 1024,
                total: 16 * 1024 * 1024,
                in_use: Arc::default(),
            },
        }
    }

    /// What one call's retries or hedges use, under the config's
    /// `retryThrottling`. The bucket is kept while its parameters stay the
    /// same, so a config written again (or another field changed) keeps
    /// its tokens; new parameters start a full bucket, as in grpc-go.
    pub(crate) fn for_call(&self, throttling: Option<&RetryThrottling>) -> CallRetries<'_> {
        let throttle = throttling.map(|params| {
            let mut current = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
            match &*current {
                Some(t) if t.params == *params => t.clone(),
                _ => current.insert(Arc::new(Throttle::new(params))).clone(),
            }
        });
        CallRetries {
            throttle,
            budget: &self.budget,
            replay: &self.replay,
        }
    }
}

/// One call's view of [`Retries`].
pub(crate) struct CallRetries<'a> {
    throttle: Option<Arc<Throttle>>,
    pub(crate) budget: &'a RetryBudget,
    pub(crate) replay: &'a ReplayLimits,
}

impl CallRetries<'_> {
    /// A call succeeded: the throttle gets `tokenRatio` back.
    pub(crate) fn success(&self) {
        if let Some(t) = &self.throttle {
            t.success();
        }
    }

    /// A retryable (or non-fatal) failure takes a token; whether a retry
    /// may follow (always, without `retryThrottling`).
    pub(crate) fn failure(&self) -> bool {
        self.throttle.as_deref().is_none_or(Throttle::failure)
    }

    /// Whether the throttle forbids further attempts now.
    pub(crate) fn throttle_blocks(&self) -> bool {
        self.throttle.as_deref().is_some_and(Throttle::blocks)
    }
}

/// A6's token bucket.
#[derive(Debug)]
pub(crate) struct Throttle {
    params: RetryThrottling,
    max: f64,
    ratio: f64,
    tokens: Mutex<f64>,
}

impl Throttle {
    pub(crate) fn new(t: &RetryThrottling) -> Self {
        Self {
            params: t.clone(),
            max: t.max_tokens,
            ratio: t.token_ratio,
            tokens: Mutex::new(t.max_tokens),
        }
    }

    /// A retryable failure: takes a token; whether a retry may follow.
    pub(crate) fn failure(&self) -> bool {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *t = (*t - 1.0).max(0.0);
        *t > self.max / 2.0
    }

    /// Whether retries and hedges are held back: tokens at or below half.
    pub(crate) fn blocks(&self) -> bool {
        *self.tokens.lock().unwrap_or_else(|p| p.into_inner()) <= self.max / 2.0
    }

    /// A success gives back `ratio`.
    pub(crate) fn success(&self) {
        let mut t = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        *t = (*t + self.ratio).min(self.max);
    }

    #[cfg(test)]
    fn tokens(&self) -> f64 {
        *self.tokens.lock().unwrap()
    }
}

/// What the server said about retrying.
#[derive(Debug, PartialEq)]
pub(crate) enum Pushback {
    /// Nothing: the back-off decides.
    None,
    /// Retry after exactly this.
    Wait(Duration),
    /// Do not retry (a negative or malformed value).
    Stop,
}

/// The server's `grpc-retry-pushback-ms`, as grpc-go reads it.
pub(crate) fn pushback(headers: &HeaderMap) -> Pushback {
    let mut values = headers.get_all(GRPC_RETRY_PUSHBACK_MS).iter();
    let Some(value) = values.next() else {
        return Pushback::None;
    };
    if values.next().is_some() {
        return Pushback::Stop; // several values: malformed, as grpc-go reads it
    }
    match value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
    {
        Some(ms) if ms >= 0 => Pushback::Wait(Duration::from_millis(ms.unsigned_abs())),
        _ => Pushback::Stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushback_values_as_grpc_go_reads_them() {
        let p = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(GRPC_RETRY_PUSHBACK_MS, http::HeaderValue::from_static(v));
            }
            pushback(&h)
        };
        assert_eq!(p(&[]), Pushback::None);
        assert_eq!(p(&["250"]), Pushback::Wait(Duration::from_millis(250)));
        assert_eq!(p(&["0"]), Pushback::Wait(Duration::ZERO));
        assert_eq!(p(&["-1"]), Pushback::Stop);
        assert_eq!(p(&["soon"]), Pushback::Stop);
        assert_eq!(p(&["1", "2"]), Pushback::Stop);
    }

    /// grpc-go's `TestRetryThrottling` table: maxTokens 10, tokenRatio 0.5.
    #[test]
    fn throttling_follows_the_a6_token_arithmetic() {
        let t = Throttle::new(&RetryThrottling {
            max_tokens: 10.0,
            token_ratio: 0.5,
        });
        // 10 → 9 → 8 → 7 → 6: retries allowed while tokens stay above 5.
        for _ in 0..4 {
            assert!(t.failure());
        }
        assert_eq!(t.tokens(), 6.0);
        assert!(!t.failure(), "at 5, half of maxTokens: throttled");
        t.success();
        assert_eq!(t.tokens(), 5.5);
        assert!(!t.failure(), "4.5");
        for _ in 0..3 {
            t.success();
        }
        assert_eq!(t.tokens(), 6.0);
        assert!(!t.failure(), "back to 5");
        for _ in 0..100 {
            t.success();
        }
        assert_eq!(t.tokens(), 10.0, "never above maxTokens");
        for _ in 0..100 {
            t.failure();
        }
        assert_eq!(t.tokens(), 0.0, "never below 0");
    }
}
