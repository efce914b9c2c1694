//! The call layer: what holds for a call as a whole, whatever its attempts.
//!
//! Its deadline (the caller's `grpc-timeout`, capped by the method's
//! service-config `timeout`, else by `call_timeout` for a unary call),
//! whether it waits for an endpoint (`waitForReady`), the `user-agent`, its
//! record for metrics, and its attempts: as the method's `retryPolicy`
//! ([`retry`]) or `hedgingPolicy` ([`hedge`]) says, else one, plus one
//! transparent retry on another endpoint when no server processed the
//! request. A call's shared state is one [`ctx::Call`]; each try (send,
//! wait for headers, classify) lives in [`attempt`], and the response body
//! carries the deadline and the accounting on ([`body`]).
//!
//! Below this layer: `route` picks the endpoint, `pool` owns it.

mod attempt;
mod body;
mod budget;
mod classify;
mod ctx;
mod deadline;
mod hedge;
mod replay;
mod retry;
mod throttle;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;
use tokio::time::Instant;

use attempt::Attempt;
use ctx::Call;
pub(crate) use deadline::from_header as grpc_timeout;
pub(crate) use throttle::Retries;

use super::error::BoxError;
use super::route::{Plan, RingPlan, Router};
use crate::config_store::ServiceConfigStatus;
use crate::metrics::{CallMetrics, CallRecord};
use crate::service_config::{LoadBalancing, Policy};

/// What every call through one balancer shares.
#[derive(Debug, Clone)]
pub(crate) struct CallConfig {
    pub(crate) call_timeout: Option<Duration>,
    /// Paths (`/pkg.Service/Method`) and service prefixes (`/pkg.Service/`)
    /// of streaming methods, which `call_timeout` does not bound.
    pub(crate) streams: Arc<std::collections::HashSet<String>>,
    pub(crate) user_agent: HeaderValue,
    /// Per-method settings (gRPC's service config) in force: the
    /// builder's, or etcd's (see [`crate::config_store`]).
    pub(crate) config: watch::Receiver<ServiceConfigStatus>,
    /// What retries share: throttle, budget, replay limits.
    pub(crate) retries: Arc<Retries>,
}

impl CallConfig {
    /// Whether `path` names a method declared as streaming.
    pub(crate) fn is_stream(&self, path: &str) -> bool {
        if self.streams.is_empty() {
            return false;
        }
        let service = path.rfind('/').map_or(path, |i| &path[..=i]);
        self.streams.contains(path) || self.streams.contains(service)
    }
}

/// Carries out one call through the balancer.
pub(crate) async fn call(
    router: Arc<Router>,
    cfg: Arc<CallConfig>,
    metrics: Arc<CallMetrics>,
    mut request: http::Request<tonic::body::Body>,
) -> Result<http::Response<tonic::body::Body>, BoxError> {
    let now = Instant::now();
    let path = request.uri().path();
    let stream = cfg.is_stream(path);
    // One read lock and one reference count: a config that changes during
    // the call does not change it.
    let config = cfg.config.borrow().config.clone();
    let method = if config.method_configs.is_empty() {
        None
    } else {
        config.method(path)
    };
    let record = Some(CallRecord::new(metrics.method(&request), now));
    // The method's configured timeout where set (streams included, as in
    // gRPC), else call_timeout for unary calls; the call's own deadline
    // wins when it is earlier.
    let default = match method.and_then(|m| m.timeout) {
        Some(t) => Some(t),
        None => cfg.call_timeout.filter(|_| !stream),
    };
    let plan = Plan {
        deadline: deadline::apply(now, request.headers_mut(), default),
        fail_fast: method
            .and_then(|m| m.wait_for_ready)
            .map_or(router.wait.fail_fast, |wait| !wait),
        ring: match config.load_balancing {
            LoadBalancing::RingHash(ring) => Some(RingPlan {
                hash: router.key(request.headers(), &config.hash_header),
                config: ring,
            }),
            _ => None,
        },
        wrr: match config.load_balancing {
            LoadBalancing::WeightedRoundRobin(wrr) => Some(wrr),
            _ => None,
        },
    };
    request
        .headers_mut()
        .entry(http::header::USER_AGENT)
        .or_insert_with(|| cfg.user_agent.clone());
    let retries = cfg.retries.for_call(config.retry_throttling.as_ref());
    let mut call = Call::new(&router, plan, request, retries, record);
    let result = match method.and_then(|m| m.policy.as_ref()) {
        Some(Policy::Retry(policy)) => retry::run(&mut call, policy).await,
        Some(Policy::Hedging(policy)) => hedge::run(&mut call, policy).await,
        _ => once(&mut call).await,
    };
    if let (Err(e), Some(mut record)) = (&result, call.record.take()) {
        record.finish(classify::code_of(&**e));
    }
    result
}

/// A call without a retry policy: one attempt, plus one transparent retry
/// on another endpoint when no server processed the request (it never left
/// this process, or the server refused the stream). The body replays from
/// the buffer retries use, so a refused stream can be sent again; a body
/// that outgrew it cannot.
async fn once(call: &mut Call<'_>) -> Result<http::Response<tonic::body::Body>, BoxError> {
    let mut outcome = call.attempt(0, &[]).await;
    if let Attempt::Unprocessed { endpoint, error } = outcome {
        if !call.replay.can_replay() {
            return Err(Box::new(classify::transport_failure(
                endpoint.addr(),
                &error,
            )));
        }
        tracing::debug!(addr = %endpoint.addr(), %error,
            "request not processed; sending it to another endpoint");
        if let Some(r) = call.record.as_mut() {
            r.transparent();
        }
        outcome = call.attempt(0, &[endpoint]).await;
    }
    match outcome {
        Attempt::Response(response) => Ok(response),
        Attempt::Status { response, code, .. } => Ok(call.finish(code, response)),
        Attempt::Failed(error) => Err(error),
        Attempt::Unprocessed { endpoint, error } => Err(Box::new(classify::transport_failure(
            endpoint.addr(),
            &error,
        ))),
    }
}
