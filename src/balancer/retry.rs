//! Retries as gRFC A6 specifies them, for the methods whose service config
//! sets a `retryPolicy`.
//!
//! * **What is retried**: an attempt that failed before response headers
//!   (a lost connection: `UNAVAILABLE`), or a trailers-only response, with a
//!   code in `retryableStatusCodes`. Response headers without a status
//!   commit the call to its attempt (grpc-go does the same): what follows is
//!   the application's.
//! * **How often**: at most `maxAttempts` attempts in all, capped at 5 as
//!   A6 says; the request body is replayed from a buffer (see
//!   [`super::replay`]); a body that outgrew it is not retried.
//! * **When**: after `random(0, min(initialBackoff × multiplier^(n−1),
//!   maxBackoff))` (A6's full jitter, as grpc-go), or after exactly the
//!   server's `grpc-retry-pushback-ms` (a negative or malformed value stops
//!   retrying), after which the back-off starts over. One deadline covers
//!   every attempt and the waits between them.
//! * **Where**: on another endpoint than the one that failed, whenever
//!   another is in rotation. Each retry carries `grpc-previous-rpc-attempts`.
//! * **Never making an outage worse**: A6's `retryThrottling` when the
//!   config sets it (tokens start at `maxTokens`, a retryable failure takes
//!   one, a success gives back `tokenRatio`, no retry while at or below half),
//!   and always a budget as linkerd keeps ([`super::budget`]: retries at
//!   most 20 % of calls, plus 10 per second).
//!
//! Hedging lives in [`super::hedge`] and shares all of this.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use rand::Rng;

use super::attempt::{attempt, Attempt};
use super::budget::RetryBudget;
use super::call::{finish, CallConfig, Plan};
use super::endpoint::Ready;
use super::pool::Shared;
use super::replay::{Replay, ReplayLimits};
use super::{classify, deadline, BoxError};
use crate::metrics::CallRecord;
use crate::service_config::{RetryPolicy, RetryThrottling};

/// gRPC's cap on `maxAttempts` (A6: larger values are treated as 5).
pub(crate) const MAX_ATTEMPTS: u32 = 5;
const GRPC_PREVIOUS_RPC_ATTEMPTS: &str = "grpc-previous-rpc-attempts";
const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// What a balancer's retries share: the throttle, the budget, the replay
/// buffer's limits.
pub(crate) struct Retries {
    /// A6's token bucket of the config in force (see [`Retries::for_call`]).
    throttle: Mutex<Option<Arc<Throttle>>>,
    budget: RetryBudget,
    replay: ReplayLimits,
}

impl Retries {
    /// The replay buffer's limits, which every call shares.
    pub(crate) fn replay(&self) -> &ReplayLimits {
        &self.replay
    }
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

/// The `n`-th back-off (from 0): uniform in [0, min(initial × mult^n, max)].
fn backoff(policy: &RetryPolicy, n: u32) -> Duration {
    let cap = policy.initial_backoff.as_secs_f64()
        * policy
            .backoff_multiplier
            .powi(i32::try_from(n).unwrap_or(i32::MAX));
    let cap = cap.min(policy.max_backoff.as_secs_f64());
    let cap = if cap.is_finite() {
        cap
    } else {
        policy.max_backoff.as_secs_f64()
    };
    Duration::from_secs_f64(rand::rng().random_range(0.0..=cap.max(0.0)))
}

/// The call, attempted as `policy` allows.
pub(crate) async fn call_with_retries(
    shared: &Shared,
    cfg: &CallConfig,
    request: http::Request<tonic::body::Body>,
    plan: Plan,
    policy: &RetryPolicy,
    retries: CallRetries<'_>,
    record: &mut Option<CallRecord>,
) -> Result<http::Response<tonic::body::Body>, BoxError> {
    let (parts, replay) = Replay::split(request, retries.replay);
    let max = policy.max_attempts.min(MAX_ATTEMPTS);
    retries.budget.deposit();
    let mut attempts = 1;
    let mut backoffs = 0;
    let mut transparent = false;
    let mut last: Option<Arc<Ready>> = None;
    loop {
        let mut request = replay.request(&parts);
        if attempts > 1 {
            request
                .headers_mut()
                .insert(GRPC_PREVIOUS_RPC_ATTEMPTS, (attempts - 1).into());
        }
        // Another endpoint than the one that failed, while there is one.
        let avoid = match &last {
            Some(ep) if shared.ready().len() > 1 => std::slice::from_ref(ep),
            _ => &[],
        };
        let outcome = attempt(shared, cfg, request, plan, avoid, record).await;
        let (code, failed_on, said, failure) = match outcome {
            Attempt::Response(response) => {
                retries.success();
                return Ok(response);
            }
            Attempt::Status {
                response,
                code,
                endpoint,
            } => {
                if code == tonic::Code::Ok {
                    retries.success();
                    return Ok(finish(record, code, response));
                }
                let said = pushback(response.headers());
                (code, Some(endpoint), said, Ok(response))
            }
            Attempt::Failed(error) => {
                (classify::code_of(&*error), None, Pushback::None, Err(error))
            }
            Attempt::Unprocessed { endpoint, error } => {
                if !transparent && replay.can_replay() {
                    // No server processed it: again at once, elsewhere,
                    // not counted as an attempt.
                    transparent = true;
                    tracing::debug!(addr = %endpoint.addr(), %error,
                        "request not processed; sending it to another endpoint");
                    crate::metrics::retry(&shared.service, "transparent");
                    last = Some(endpoint);
                    continue;
                }
                let status = classify::transport_failure(endpoint.addr(), &error);
                (
                    status.code(),
                    Some(endpoint),
                    Pushback::None,
                    Err(Box::new(status) as BoxError),
                )
            }
        };
        let retryable =
            policy.retryable_status_codes.contains(&code) && code != tonic::Code::DeadlineExceeded;
        // Every retryable failure takes a token, whether or not a retry
        // follows (A6).
        let throttled = retryable && !retries.failure();
        let refused = if !retryable {
            Some("not retryable")
        } else if attempts >= max {
            Some("attempts used up")
        } else if said == Pushback::Stop {
            Some("the server said not to")
        } else if !replay.can_replay() {
            Some("request body outgrew the replay buffer")
        } else if throttled {
            Some("throttled (retryThrottling)")
        } else if !retries.budget.withdraw() {
            Some("retry budget spent")
        } else {
            None
        };
        if let Some(reason) = refused {
            if retryable {
                tracing::debug!(%code, attempts, reason, "not retrying");
                crate::metrics::retry(&shared.service, reason);
            }
            return match failure {
                Ok(response) => Ok(finish(record, code, response)),
                Err(e) => Err(e),
            };
        }
        let delay = match said {
            Pushback::Wait(d) => {
                backoffs = 0;
                d
            }
            _ => {
                let d = backoff(policy, backoffs);
                backoffs += 1;
                d
            }
        };
        let now = tokio::time::Instant::now();
        let at = crate::time::deadline_after(now, delay);
        if let Some(deadline) = plan.deadline.filter(|d| *d <= at) {
            tokio::time::sleep_until(deadline).await;
            return Err(Box::new(deadline::exceeded(format_args!(
                "waiting to retry after {code:?} (attempt {attempts} of {max})"
            ))));
        }
        tracing::debug!(%code, attempt = attempts, ?delay,
            addr = failed_on.as_ref().map_or("", |e| e.addr()), "retrying");
        crate::metrics::retry(&shared.service, "retried");
        drop(failure);
        tokio::time::sleep_until(at).await;
        last = failed_on;
        attempts += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            backoff_multiplier: 2.0,
            retryable_status_codes: vec![tonic::Code::Unavailable],
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_growing_cap() {
        let p = policy();
        for (n, cap) in [(0, 100), (1, 200), (2, 300), (3, 300), (40, 300)] {
            let draws: Vec<Duration> = (0..200).map(|_| backoff(&p, n)).collect();
            let cap = Duration::from_millis(cap);
            assert!(draws.iter().all(|d| *d <= cap), "n={n}");
            assert!(draws.iter().any(|d| *d < cap / 4), "n={n}: jitter from 0");
            assert!(
                draws.iter().any(|d| *d > cap * 3 / 4),
                "n={n}: up to the cap"
            );
        }
    }

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
