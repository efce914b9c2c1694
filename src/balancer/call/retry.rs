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
//!   another is in rotation, under the cost-weighted pick (a replica that
//!   just failed is the likeliest to fail again); under ring hash on the
//!   key's home again while it is in rotation (its cache is the point),
//!   walking on only when it is out or the request never reached it (a
//!   transparent retry). Each retry carries `grpc-previous-rpc-attempts`.
//! * **Never making an outage worse**: A6's `retryThrottling` when the
//!   config sets it (tokens start at `maxTokens`, a retryable failure takes
//!   one, a success gives back `tokenRatio`, no retry while at or below half),
//!   and always a budget as linkerd keeps ([`super::budget`]: retries at
//!   most 20 % of calls, plus 10 per second).
//!
//! Hedging lives in [`super::hedge`] and shares all of this.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::attempt::Attempt;
use super::classify;
use super::ctx::Call;
use super::throttle::{pushback, Pushback, MAX_ATTEMPTS};
use crate::balancer::error::{deadline_exceeded, BoxError};
use crate::balancer::pool::Ready;
use crate::service_config::RetryPolicy;

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
pub(crate) async fn run(
    call: &mut Call<'_>,
    policy: &RetryPolicy,
) -> Result<http::Response<tonic::body::Body>, BoxError> {
    let max = policy.max_attempts.min(MAX_ATTEMPTS);
    call.retries.budget.deposit();
    let mut attempts = 1;
    let mut backoffs = 0;
    let mut transparent = false;
    let mut last: Option<Arc<Ready>> = None;
    // Under ring hash a retry goes back to the key's home while it is in
    // rotation (a cache keeps its hit); only a transparent retry, whose
    // request never reached a server, moves on.
    let stay = call.plan.ring.is_some();
    let mut moved_on = false;
    loop {
        // Another endpoint than the one that failed, while there is one.
        let avoid = match &last {
            Some(ep) if (!stay || moved_on) && call.router.pool.ready().len() > 1 => {
                std::slice::from_ref(ep)
            }
            _ => &[],
        };
        moved_on = false;
        let outcome = call.attempt(attempts - 1, avoid).await;
        let (code, failed_on, said, failure) = match outcome {
            Attempt::Response(response) => {
                call.retries.success();
                return Ok(response);
            }
            Attempt::Status {
                response,
                code,
                endpoint,
            } => {
                if code == tonic::Code::Ok {
                    call.retries.success();
                    return Ok(call.finish(code, response));
                }
                let said = pushback(response.headers());
                (code, Some(endpoint), said, Ok(response))
            }
            Attempt::Failed(error) => {
                (classify::code_of(&*error), None, Pushback::None, Err(error))
            }
            Attempt::Unprocessed { endpoint, error } => {
                if !transparent && call.replay.can_replay() {
                    // No server processed it: again at once, elsewhere,
                    // not counted as an attempt.
                    transparent = true;
                    tracing::debug!(addr = %endpoint.addr(), %error,
                        "request not processed; sending it to another endpoint");
                    if let Some(r) = call.record.as_mut() {
                        r.transparent();
                    }
                    last = Some(endpoint);
                    moved_on = true;
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
        let throttled = retryable && !call.retries.failure();
        let refused = if !retryable {
            Some("not retryable")
        } else if attempts >= max as usize {
            Some("attempts used up")
        } else if said == Pushback::Stop {
            Some("the server said not to")
        } else {
            call.refuse_another(throttled)
        };
        if let Some(reason) = refused {
            if retryable {
                tracing::debug!(%code, attempts, reason, "not retrying");
                call.retry_result(reason);
            }
            return match failure {
                Ok(response) => Ok(call.finish(code, response)),
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
        if let Some(deadline) = call.plan.deadline.filter(|d| *d <= at) {
            tokio::time::sleep_until(deadline).await;
            return Err(Box::new(deadline_exceeded(format_args!(
                "waiting to retry after {code:?} (attempt {attempts} of {max})"
            ))));
        }
        tracing::debug!(%code, attempt = attempts, ?delay,
            addr = failed_on.as_ref().map_or("", |e| e.addr()), "retrying");
        if let Some(r) = call.record.as_mut() {
            r.retried(at.saturating_duration_since(now));
        }
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
}
