//! Hedging as gRFC A6 specifies it (as grpc-java does; grpc-go does not
//! hedge), for the methods whose service config sets a `hedgingPolicy`.
//!
//! * The first attempt goes at once; each further one `hedgingDelay` after
//!   the previous, up to `maxAttempts` in all (capped at 5), each on an
//!   endpoint no earlier attempt of the call used: a hedge that would land
//!   on a busy replica again helps nobody. With no such endpoint in
//!   rotation, no further hedge is sent.
//! * The first response headers (or `OK`) win: the call is committed to
//!   that attempt and the others are cancelled at once (their streams
//!   reset, so the servers stop working on them).
//! * A status in `nonFatalStatusCodes` lets the others go on and sends the
//!   next hedge at once (or after the server's `grpc-retry-pushback-ms`; a
//!   negative or malformed one stops hedging); any other status ends the
//!   call with it and cancels the rest.
//! * Hedges replay the request body from the same buffer as retries; they
//!   take from `retryThrottling` and the retry budget like retries, so they
//!   stop when most calls fail; they carry `grpc-previous-rpc-attempts`.
//! * One deadline covers all of them.

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::attempt::{send, Attempt};
use super::classify;
use super::ctx::Call;
use super::throttle::{pushback, Pushback, MAX_ATTEMPTS};
use crate::balancer::error::{deadline_exceeded, BoxError};
use crate::balancer::pool::Ready;
use crate::metrics::{AttemptRecord, CallRecord, Hedged};
use crate::service_config::HedgingPolicy;

/// The call, hedged as `policy` says.
pub(crate) async fn run(
    call: &mut Call<'_>,
    policy: &HedgingPolicy,
) -> Result<http::Response<tonic::body::Body>, BoxError> {
    let plan = call.plan;
    let max = policy.max_attempts.min(MAX_ATTEMPTS) as usize;
    let hedged = Hedged::new();
    if let Some(r) = call.record.as_mut() {
        r.hedging(&hedged);
    }
    let mut used: Vec<Arc<Ready>> = Vec::new();
    let mut running: JoinSet<(usize, Attempt)> = JoinSet::new();
    let mut next_at = Instant::now();
    let mut stopped = false;
    let mut last: Option<(
        tonic::Code,
        Result<http::Response<tonic::body::Body>, BoxError>,
    )> = None;
    call.retries.budget.deposit();
    loop {
        if !stopped && used.len() < max && Instant::now() >= next_at {
            let first = used.is_empty();
            let distinct = call
                .router
                .pool
                .ready()
                .iter()
                .any(|e| !used.iter().any(|u| Arc::ptr_eq(u, e)));
            let refused = if first {
                None
            } else if !distinct {
                Some("no other endpoint")
            } else {
                call.refuse_another(call.retries.throttle_blocks())
            };
            if let Some(reason) = refused {
                tracing::debug!(reason, sent = used.len(), "no further hedge");
                if let Some(r) = &call.record {
                    r.hedge_result(reason);
                }
                stopped = true;
            } else {
                let mut attempt = call
                    .record
                    .as_ref()
                    .map_or_else(AttemptRecord::none, CallRecord::attempt);
                match call.router.pick(plan, &used).await {
                    Ok(picked) => {
                        let ep = picked.ep.clone();
                        let index = used.len();
                        used.push(ep.clone());
                        let (request, abort) = call.request(index);
                        if index > 0 {
                            tracing::debug!(addr = %ep.addr(), hedge = index, "hedging");
                            hedged.sent();
                            if let Some(r) = &call.record {
                                r.hedge_result("sent");
                            }
                        }
                        let mut own = call.record.as_ref().map(|r| r.for_hedge(&hedged, index));
                        running.spawn(async move {
                            let outcome =
                                send(picked, request, abort, plan, &mut own, attempt).await;
                            (index, outcome)
                        });
                        next_at = crate::time::deadline_after(Instant::now(), policy.hedging_delay);
                    }
                    Err(e) => {
                        attempt.finish(classify::code_of(&*e));
                        if first {
                            return Err(e);
                        }
                        stopped = true;
                    }
                }
            }
        }
        if running.is_empty() {
            // Nothing in flight, nothing more to send: the last answer is
            // the call's.
            return match last {
                Some((code, Ok(response))) => Ok(call.finish(code, response)),
                Some((_, Err(e))) => Err(e),
                None => Err(Box::new(tonic::Status::unavailable(
                    "no hedged attempt could be sent",
                ))),
            };
        }
        let hedge_due = !stopped && used.len() < max;
        let joined = tokio::select! {
            joined = running.join_next() => joined,
            () = tokio::time::sleep_until(next_at), if hedge_due => continue,
            () = sleep_until_deadline(plan.deadline) => {
                return Err(Box::new(deadline_exceeded(format_args!(
                    "waiting for any of {} hedged attempts", used.len()
                ))));
            }
        };
        let Some(Ok((index, outcome))) = joined else {
            continue; // a task that panicked or was cancelled: the others go on
        };
        let (code, said, answer) = match outcome {
            Attempt::Response(response) => {
                hedged.won(index);
                if let Some(r) = call.record.take() {
                    r.discard();
                }
                call.retries.success();
                return Ok(response);
            }
            Attempt::Status { response, code, .. } if code == tonic::Code::Ok => {
                call.retries.success();
                return Ok(call.finish(code, response));
            }
            Attempt::Status { response, code, .. } => {
                let said = pushback(response.headers());
                (code, said, Ok(response))
            }
            Attempt::Failed(error) => (classify::code_of(&*error), Pushback::None, Err(error)),
            Attempt::Unprocessed { endpoint, error } => {
                // No server processed it: another hedge at once, elsewhere,
                // whatever the policy's codes say.
                let status = classify::transport_failure(endpoint.addr(), &error);
                last = Some((status.code(), Err(Box::new(status))));
                next_at = Instant::now();
                continue;
            }
        };
        if !policy.non_fatal_status_codes.contains(&code) {
            // Fatal: the call ends with it; the others are cancelled when
            // `running` is dropped.
            return match answer {
                Ok(response) => Ok(call.finish(code, response)),
                Err(e) => Err(e),
            };
        }
        // Takes a token; whether more hedges may follow is asked before
        // each is sent.
        let _ = call.retries.failure();
        match said {
            Pushback::Stop => stopped = true,
            Pushback::Wait(d) => next_at = crate::time::deadline_after(Instant::now(), d),
            Pushback::None => next_at = Instant::now(),
        }
        last = Some((code, answer));
    }
}

/// Resolves at `deadline`, or never without one.
async fn sleep_until_deadline(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
