//! One try of a call on one endpoint.
//!
//! The endpoint comes from the route layer ([`Router::pick`](crate::balancer::route::Router::pick),
//! called by [`super::ctx::Call::attempt`] or a hedge); here: send, wait for the response headers within the
//! deadline, and classify what came back: a status in the headers
//! (trailers-only) settles the attempt at once, otherwise the body reads it
//! from the trailers ([`super::body`]); a transport failure is
//! `UNAVAILABLE` naming the endpoint ([`super::classify`]). The endpoint's
//! load and health learn from every attempt ([`InFlight`](crate::balancer::pool::InFlight)).

use std::sync::Arc;

use super::body::{self, CallBody};
use super::classify;
use super::replay::Abort;
use crate::balancer::error::{deadline_exceeded, BoxError};
use crate::balancer::pool::{Outcome, Ready};
use crate::balancer::route::{Picked, Plan};
use crate::metrics::{AttemptRecord, CallRecord};

/// How one attempt ended.
pub(crate) enum Attempt {
    /// The response headers arrived without a status: the call is committed
    /// to this attempt, whose body reads the status from the trailers.
    Response(http::Response<tonic::body::Body>),
    /// A trailers-only response: its status is `code`. The call layer
    /// decides whether it is final (and records it) or retried.
    Status {
        response: http::Response<tonic::body::Body>,
        code: tonic::Code,
        endpoint: Arc<Ready>,
    },
    /// No server processed the request: it never left this process, or
    /// the server refused its stream (`REFUSED_STREAM`, or a stream above
    /// the last one a graceful `GOAWAY` said it would process). It may be
    /// sent again, whatever the retry policy (gRPC's transparent retry).
    Unprocessed {
        endpoint: Arc<Ready>,
        error: hyper::Error,
    },
    /// It failed, possibly after reaching a server.
    Failed(BoxError),
}

/// Sends `request` to `ep` and waits for the response headers within the
/// plan's deadline. `abort` ends the request body when the attempt is over:
/// here, or in the response body that carries it on; so does `attempt`,
/// the attempt's record, which reports its status once it has one.
pub(crate) async fn send(
    picked: Picked,
    request: http::Request<tonic::body::Body>,
    abort: Abort,
    plan: Plan,
    record: &mut Option<CallRecord>,
    mut attempt: AttemptRecord,
) -> Attempt {
    let outcome = exchange(picked, request, abort, plan, record, &mut attempt).await;
    match &outcome {
        Attempt::Response(_) => {} // the body reports it
        Attempt::Status { code, .. } => attempt.finish(*code),
        Attempt::Failed(e) => attempt.finish(classify::code_of(&**e)),
        Attempt::Unprocessed { .. } => attempt.finish(tonic::Code::Unavailable),
    }
    outcome
}

async fn exchange(
    Picked { ep, at }: Picked,
    mut request: http::Request<tonic::body::Body>,
    abort: Abort,
    plan: Plan,
    record: &mut Option<CallRecord>,
    attempt: &mut AttemptRecord,
) -> Attempt {
    *request.uri_mut() = match ep.uri(request.uri()) {
        Ok(uri) => uri,
        Err(e) => return Attempt::Failed(Box::new(e)),
    };
    // tokio's timer fires on 1 ms ticks: a deadline shorter than that (or
    // one spent waiting for an endpoint) would not stop the call below.
    if plan
        .deadline
        .is_some_and(|d| tokio::time::Instant::now() >= d)
    {
        return Attempt::Failed(Box::new(deadline_exceeded(format_args!(
            "before the call was sent to {}",
            ep.addr()
        ))));
    }
    let mut in_flight = ep.start(at);
    // Weighted round robin weighs endpoints by their servers' reports:
    // each response's, unless they come out of band (`pool::orca`).
    if let Some(wrr) = plan.wrr.filter(|w| !w.enable_oob_load_report) {
        in_flight.read_load_reports(wrr.error_utilization_penalty);
    }
    let send = ep.sender().try_send_request(request);
    // One timer per call: it bounds the response headers here and then
    // moves into the body.
    let mut timer = plan.deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
    let result = match timer.as_mut() {
        None => send.await,
        Some(timer) => tokio::select! {
            biased;
            r = send => r,
            () = timer.as_mut() => {
                in_flight.timed_out();
                return Attempt::Failed(Box::new(deadline_exceeded(format_args!(
                    "waiting for response headers from {}", ep.addr()
                ))));
            }
        },
    };
    match result {
        Ok(mut response) => {
            // A trailers-only response carries its status in the headers;
            // otherwise the body reports it from the trailers.
            let code = match body::status_of(response.headers()) {
                _ if response.status() != http::StatusCode::OK => Some(tonic::Code::Unknown),
                Some(code) if classify::cancelled_by_deadline(code, plan.deadline) => {
                    classify::to_deadline_exceeded(response.headers_mut());
                    Some(tonic::Code::DeadlineExceeded)
                }
                code => code,
            };
            let Some(code) = code else {
                in_flight.headers_arrived(true);
                let record = record.take().unwrap_or_else(CallRecord::none);
                let attempt = std::mem::replace(attempt, AttemptRecord::none());
                return Attempt::Response(response.map(|body| {
                    tonic::body::Body::new(CallBody::new(
                        body,
                        timer,
                        in_flight,
                        (record, attempt),
                        Some(abort),
                    ))
                }));
            };
            in_flight.load_report(response.headers());
            let outcome = match response.status() {
                http::StatusCode::OK => Outcome::of(code, in_flight.policy()),
                _ => Outcome::Failure,
            };
            in_flight.headers_arrived(outcome == Outcome::Success);
            in_flight.settle(outcome);
            let response = response.map(|body| {
                tonic::body::Body::new(CallBody::new(
                    body,
                    timer,
                    in_flight,
                    (CallRecord::none(), AttemptRecord::none()),
                    Some(abort),
                ))
            });
            Attempt::Status {
                response,
                code,
                endpoint: ep,
            }
        }
        // The request body ends itself at the deadline (see `replay`): the
        // reset that follows is the deadline's doing.
        Err(_)
            if plan
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d) =>
        {
            in_flight.timed_out();
            Attempt::Failed(Box::new(deadline_exceeded(format_args!(
                "waiting for response headers from {}",
                ep.addr()
            ))))
        }
        Err(mut e) => {
            in_flight.settle(Outcome::Failure);
            drop(in_flight);
            let unsent = e.take_message();
            let error = e.into_error();
            if error.is_closed() || unsent.is_some() {
                // The connector takes it out of rotation and reconnects.
                ep.closed.notify_one();
            }
            if unsent.is_some() || classify::unprocessed(&error) {
                Attempt::Unprocessed {
                    endpoint: ep,
                    error,
                }
            } else {
                Attempt::Failed(Box::new(classify::transport_failure(ep.addr(), &error)))
            }
        }
    }
}
