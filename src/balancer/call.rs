//! The call layer: what holds for a call as a whole, whatever its attempts.
//!
//! Its deadline (the caller's `grpc-timeout`, capped by the method's
//! service-config `timeout`, else by `call_timeout` for a unary call),
//! whether it waits for an endpoint (`waitForReady`), the `user-agent`, its
//! record for metrics, and its attempts: as the method's `retryPolicy`
//! ([`super::retry`]) or `hedgingPolicy` ([`super::hedge`]) says, else one, plus one transparent retry on another
//! endpoint when the request never left this process (the connection closed
//! before it was sent). Each attempt (pick, send, classify) lives in
//! [`super::attempt`].

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::sync::watch;
use tokio::time::Instant;

use super::attempt::{attempt, Attempt};
use super::hedge::call_with_hedging;
use super::pool::Shared;
use super::replay::Replay;
use super::retry::{call_with_retries, Retries};
use super::ring_hash::{request_hash, RingPlan};
use super::{classify, deadline, BoxError};
use crate::config_store::ServiceConfigStatus;
use crate::metrics::{CallMetrics, CallRecord};
use crate::service_config::{LoadBalancing, Policy};
use crate::time::deadline_after;

/// What every call through one balancer shares.
#[derive(Debug, Clone)]
pub(crate) struct CallConfig {
    pub(crate) no_endpoint_timeout: Duration,
    pub(crate) call_timeout: Option<Duration>,
    /// Paths (`/pkg.Service/Method`) and service prefixes (`/pkg.Service/`)
    /// of streaming methods, which `call_timeout` does not bound.
    pub(crate) streams: Arc<std::collections::HashSet<String>>,
    pub(crate) fail_fast: bool,
    pub(crate) max_waiting: usize,
    pub(crate) user_agent: HeaderValue,
    /// Per-method settings (gRPC's service config) in force: the
    /// builder's, or etcd's (see [`crate::config_store`]).
    pub(crate) config: watch::Receiver<ServiceConfigStatus>,
    /// What retries share: throttle, budget, replay limits.
    pub(crate) retries: Arc<Retries>,
}

/// What holds for one call's attempts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// The call's deadline, if any.
    pub(crate) deadline: Option<Instant>,
    /// Fail at once while no endpoint is in rotation (false: gRPC's
    /// wait-for-ready, until the deadline).
    pub(crate) fail_fast: bool,
    /// Under ring hash, the call's key and the ring's settings; else the
    /// cost-weighted pick.
    pub(crate) ring: Option<RingPlan>,
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

    /// When the fail-fast gate closes, for a balancer without endpoints
    /// since `empty_since`.
    pub(crate) fn gate(&self, empty_since: Instant) -> Instant {
        deadline_after(empty_since, self.no_endpoint_timeout)
    }
}

/// Carries out one call through the balancer.
pub(crate) async fn call(
    shared: Arc<Shared>,
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
    let mut record = Some(CallRecord::new(&metrics, now, !stream));
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
            .map_or(cfg.fail_fast, |wait| !wait),
        ring: match config.load_balancing {
            LoadBalancing::RingHash(ring) => Some(RingPlan {
                hash: request_hash(request.headers(), &config.hash_header),
                config: ring,
            }),
            _ => None,
        },
    };
    request
        .headers_mut()
        .entry(http::header::USER_AGENT)
        .or_insert_with(|| cfg.user_agent.clone());
    let retries = || cfg.retries.for_call(config.retry_throttling.as_ref());
    let result = match method.and_then(|m| m.policy.as_ref()) {
        Some(Policy::Retry(policy)) => {
            call_with_retries(&shared, &cfg, request, plan, policy, retries(), &mut record).await
        }
        Some(Policy::Hedging(policy)) => {
            call_with_hedging(&shared, &cfg, request, plan, policy, retries(), &mut record).await
        }
        _ => once(&shared, &cfg, request, plan, &mut record).await,
    };
    if let (Err(e), Some(mut record)) = (&result, record) {
        record.finish(classify::code_of(&**e));
    }
    result
}

/// A call without a retry policy: one attempt, plus one transparent retry
/// on another endpoint when no server processed the request (it never left
/// this process, or the server refused the stream). The body replays from
/// the buffer retries use, so a refused stream can be sent again; a body
/// that outgrew it cannot.
async fn once(
    shared: &Shared,
    cfg: &CallConfig,
    request: http::Request<tonic::body::Body>,
    plan: Plan,
    record: &mut Option<CallRecord>,
) -> Result<http::Response<tonic::body::Body>, BoxError> {
    let (parts, replay) = Replay::split(request, cfg.retries.replay());
    let mut outcome = attempt(shared, cfg, replay.request(&parts), plan, &[], record).await;
    if let Attempt::Unprocessed { endpoint, error } = outcome {
        if !replay.can_replay() {
            return Err(Box::new(classify::transport_failure(
                endpoint.addr(),
                &error,
            )));
        }
        tracing::debug!(addr = %endpoint.addr(), %error,
            "request not processed; sending it to another endpoint");
        crate::metrics::retry(&shared.service, "transparent");
        outcome = attempt(
            shared,
            cfg,
            replay.request(&parts),
            plan,
            &[endpoint],
            record,
        )
        .await;
    }
    match outcome {
        Attempt::Response(response) => Ok(response),
        Attempt::Status { response, code, .. } => Ok(finish(record, code, response)),
        Attempt::Failed(error) => Err(error),
        Attempt::Unprocessed { endpoint, error } => Err(Box::new(classify::transport_failure(
            endpoint.addr(),
            &error,
        ))),
    }
}

/// A trailers-only response is final: its status is the call's.
pub(crate) fn finish(
    record: &mut Option<CallRecord>,
    code: tonic::Code,
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    if let Some(mut r) = record.take() {
        r.finish(code);
    }
    response
}
